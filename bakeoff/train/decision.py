"""How a run's logits become tag decisions: the one rule every stage applies (thresholds.json).

Two kinds of tags:
- *group* tags: the tags of a single-valued field (every training image has exactly one value of it, e.g.
  every product has one ``baseColour``). Their scores are a softmax over the field's tags and the decision is the
  field's arg-max (one value per image; no threshold to fit, so nothing rests on a handful of positives).
- *free* tags (multi-valued fields, bare tags): sigmoid scores, predicted when ``score >= threshold``.

A dataset with no single-valued field has no groups, and the rule is exactly per-tag sigmoid thresholds.
Logit adjustment (Menon et al. 2021) is folded into the head's bias, so exported models need no extra step.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MIN_GROUP = 2  # a field with one tag is a plain binary tag


@dataclass(frozen=True)
class Decision:
    """Per-tag thresholds (used for free tags) and the softmax groups (lists of tag columns)."""

    thresholds: np.ndarray
    groups: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self):
        t = np.asarray(self.thresholds, dtype=np.float64)
        if t.ndim != 1 or not np.isfinite(t).all():
            raise ValueError(f"thresholds: expected a finite 1-D array, got shape {t.shape}")
        cols = [j for g in self.groups for j in g]
        if len(cols) != len(set(cols)) or any(not 0 <= j < t.size for j in cols):
            raise ValueError(f"groups: columns must be distinct tag indices below {t.size}")
        object.__setattr__(self, "thresholds", t)
        object.__setattr__(self, "groups", tuple(tuple(int(j) for j in g) for g in self.groups))

    @property
    def n_tags(self) -> int:
        return self.thresholds.size

    def free_mask(self) -> np.ndarray:
        """True for tags decided by a threshold (not in any group)."""
        mask = np.ones(self.n_tags, dtype=bool)
        for g in self.groups:
            mask[list(g)] = False
        return mask

    def scores(self, logits: np.ndarray) -> np.ndarray:
        """float32 scores: softmax within each group, sigmoid elsewhere (computed in float64)."""
        z = np.asarray(logits, dtype=np.float64)
        out = 1.0 / (1.0 + np.exp(-z))
        for g in self.groups:
            zg = z[:, g]
            e = np.exp(zg - zg.max(axis=1, keepdims=True))
            out[:, g] = e / e.sum(axis=1, keepdims=True)
        return out.astype(np.float32)

    def apply(self, scores: np.ndarray) -> np.ndarray:
        """Bool N x T decisions: arg-max within each group (first on ties), ``score >= threshold`` elsewhere."""
        s = np.asarray(scores)
        if s.ndim != 2 or s.shape[1] != self.n_tags:
            raise ValueError(f"scores: expected N x {self.n_tags}, got shape {s.shape}")
        out = s >= self.thresholds
        rows = np.arange(s.shape[0])
        for g in self.groups:
            g = list(g)
            out[:, g] = False
            out[rows, np.asarray(g)[np.argmax(s[:, g], axis=1)]] = True
        return out

    def to_json(self, taxonomy: Sequence[str], **extra) -> dict:
        return {"thresholds": self.thresholds.tolist(), "tags": list(taxonomy),
                "groups": [[taxonomy[j] for j in g] for g in self.groups],
                "score": "softmax within each group, sigmoid elsewhere",
                "rule": "group: arg-max of the group; other tags: score >= threshold", **extra}

    @classmethod
    def from_json(cls, doc: dict, taxonomy: Sequence[str] | None = None) -> "Decision":
        """Read thresholds.json; files written before groups existed have none (sigmoid thresholds only)."""
        tags = list(doc.get("tags") or taxonomy or [])
        col = {t: j for j, t in enumerate(tags)}
        return cls(np.asarray(doc["thresholds"], dtype=np.float64),
                   tuple(tuple(col[t] for t in g) for g in doc.get("groups", [])))


def single_valued_groups(y_train: np.ndarray, fields: Sequence[str]) -> list[list[int]]:
    """Tag columns of each field (``fields[j]`` names tag j's field, "" for none) of which every training image
    has exactly one value. A field that some images lack stays sigmoid tags (an arg-max would force a value on
    those images), as do a field with fewer than two tags and the empty field."""
    y = np.asarray(y_train, dtype=np.int64)
    by_field: dict[str, list[int]] = {}
    for j, f in enumerate(fields):
        if f:
            by_field.setdefault(f, []).append(j)
    return [cols for cols in by_field.values()
            if len(cols) >= MIN_GROUP and y.shape[0] > 0 and (y[:, cols].sum(axis=1) == 1).all()]
