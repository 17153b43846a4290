"""Multi-label tagging metrics as pure, vectorised numpy functions.

Arrays are ``N x T`` (images x tags). Labels and predictions are binary (bool or integers in {0, 1});
scores are real numbers (probabilities or logits) and must be finite.

Conventions (they match scikit-learn with ``zero_division=0`` on every tag that is scored):

- A tag is *scored* when it has at least one positive in ``y_true``. Tags with no positive are excluded
  from every macro average (their F1 and AP are undefined, not zero), and the number of scored tags is
  returned with each macro value. A macro average over no scored tag is NaN.
- Per tag, a zero denominator gives 0: precision is 0 when the tag is never predicted, recall is 0 when it
  has no positive, F1 = 2tp / (2tp + fp + fn) is 0 when tp = 0.
- Micro-F1 pools the counts of every tag (in ``tags_mask`` when given), scored or not: a false positive on a
  tag absent from the test set is still an error. It is NaN only when there is no positive and no prediction.
- Decisions follow the run's rule, a :class:`train.decision.Decision` (thresholds.json): the tags of a
  single-valued field (a softmax *group*) are decided by the arg-max within the field, every other (*free*) tag
  is predicted when ``score >= threshold`` (the rule ``train.thresholds`` fits to). A run without groups (every
  thresholds.json written before groups existed) is exactly per-tag ``score >= threshold``; :func:`binarize`
  also takes plain thresholds (a scalar or one per tag) for that rule.
- ``macro_f1_at_0.5`` is the fixed rule beside the fitted one: group tags still by arg-max (a group has no
  threshold to fix), free tags at ``score >= 0.5``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from bakeoff.train.decision import Decision

BUCKETS = ("tail", "medium", "head")
# ``threshold`` is empty for a group tag (no threshold decides it); ``decided_by`` says what does:
# ``threshold`` or ``argmax:<field>``
PER_TAG_COLUMNS = ("tag", "name", "bucket", "support", "predicted", "train_count", "threshold", "decided_by",
                   "precision", "recall", "f1", "ap")
THRESHOLD_RULE = "score >= threshold"
GROUP_RULE = "group tags: arg-max within the field; other tags: score >= threshold"
SCORE_RULE = {False: "sigmoid(logit)", True: "softmax within each group, sigmoid elsewhere"}  # by "has groups"
FIXED_RULE = "group tags: arg-max within the field; other tags: score >= 0.5"


class NonFiniteScores(ValueError):
    """Scores that contain NaN or Inf: the run is reported as failed, not scored."""

    def __init__(self, message: str, n_nan: int, n_inf: int):
        super().__init__(message)
        self.n_nan = n_nan
        self.n_inf = n_inf


def check_finite(scores: np.ndarray, name: str = "scores") -> np.ndarray:
    """Return ``scores`` as a 2-D float array; raise :class:`NonFiniteScores` naming counts and the first bad cell.

    ``name`` (e.g. the predictions file) starts the message.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2 or not np.issubdtype(scores.dtype, np.floating):
        raise ValueError(f"{name}: expected a 2-D float array (images x tags), got {scores.dtype} {scores.shape}")
    bad = ~np.isfinite(scores)
    if bad.any():
        n_nan = int(np.isnan(scores).sum())
        n_inf = int(bad.sum()) - n_nan
        rows, cols = np.nonzero(bad)
        raise NonFiniteScores(
            f"{name}: {n_nan} NaN and {n_inf} Inf values in {len(np.unique(rows))} of {scores.shape[0]} images "
            f"and {len(np.unique(cols))} of {scores.shape[1]} tags (first at row {rows[0]}, tag {cols[0]}); "
            "the run is failed, not scored", n_nan, n_inf)
    return scores


def check_binary(labels: np.ndarray, name: str = "labels") -> np.ndarray:
    """Return ``labels`` as a 2-D bool array; raise ``ValueError`` unless every value is 0 or 1."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (images x tags), got shape {labels.shape}")
    if labels.dtype != bool:
        bad = (labels != 0) & (labels != 1)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise ValueError(f"{name}: values must be 0 or 1, found {labels[r, c].item()!r} at row {r}, tag {c}")
    return labels.astype(bool, copy=False)


def _check_tags(arr: np.ndarray | None, n_tags: int, name: str, dtype=None) -> np.ndarray | None:
    """``arr`` as a 1-D per-tag array of length ``n_tags`` (None passes through)."""
    if arr is None:
        return None
    arr = np.asarray(arr, dtype=dtype)
    if arr.shape != (n_tags,):
        raise ValueError(f"{name}: expected shape ({n_tags},) (one value per tag), got {arr.shape}")
    return arr


def _pair(y_true: np.ndarray, other: np.ndarray, other_name: str) -> tuple[np.ndarray, np.ndarray]:
    y_true = check_binary(y_true, "y_true")
    other = np.asarray(other)
    if other.shape != y_true.shape:
        raise ValueError(f"{other_name}: shape {other.shape} does not match y_true {y_true.shape}")
    return y_true, other


def _divide(num: np.ndarray, den: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """``num / den`` as float64, ``fill`` where ``den == 0``."""
    num = np.asarray(num, dtype=np.float64)
    return np.divide(num, den, out=np.full(np.broadcast(num, den).shape, fill), where=np.asarray(den) != 0)


def _masked_mean(values: np.ndarray, scored: np.ndarray) -> tuple[np.ndarray | float, np.ndarray | int]:
    """Mean of ``values`` over ``scored`` tags (last axis) and the number of them; NaN where none."""
    n = scored.sum(axis=-1)
    total = np.where(scored, values, 0.0).sum(axis=-1)
    mean = _divide(total, n, fill=np.nan)
    return (float(mean), int(n)) if mean.ndim == 0 else (mean, n)


def binarize(scores: np.ndarray, thresholds: Decision | np.ndarray | float) -> np.ndarray:
    """Tag decisions as a bool ``N x T`` array: a :class:`Decision`'s rule (arg-max within each group,
    ``score >= threshold`` elsewhere), or ``scores >= thresholds`` (a scalar, or one threshold per tag)."""
    scores = check_finite(scores)
    if isinstance(thresholds, Decision):
        if thresholds.n_tags != scores.shape[1]:
            raise ValueError(f"decision: {thresholds.n_tags} thresholds for {scores.shape[1]} tags")
        return thresholds.apply(scores)
    if not np.isscalar(thresholds):
        thresholds = _check_tags(thresholds, scores.shape[1], "thresholds")
    if not np.isfinite(thresholds).all():
        raise ValueError(f"thresholds: {int((~np.isfinite(thresholds)).sum())} NaN/Inf values")
    return scores >= thresholds


def per_tag_counts(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True positives, false positives and false negatives per tag, each an int64 array of length T."""
    y_true, y_pred = _pair(y_true, y_pred, "y_pred")
    y_pred = check_binary(y_pred, "y_pred")
    tp = (y_true & y_pred).sum(axis=0, dtype=np.int64)
    return tp, y_pred.sum(axis=0, dtype=np.int64) - tp, y_true.sum(axis=0, dtype=np.int64) - tp


def f1_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """F1 = 2tp / (2tp + fp + fn) elementwise, 0 where the denominator is 0."""
    return _divide(2 * np.asarray(tp), 2 * np.asarray(tp) + fp + fn)


def macro_f1_from_counts(tp: np.ndarray, fp: np.ndarray,
                         fn: np.ndarray) -> tuple[np.ndarray | float, np.ndarray | int]:
    """Macro-F1 over the tags (last axis) with ``tp + fn > 0``, and how many there are.

    Works on any leading shape (e.g. ``R x T`` bootstrap counts gives ``R`` values); NaN where no tag is scored.
    """
    return _masked_mean(f1_from_counts(tp, fp, fn), np.asarray(tp + fn) > 0)


def f1_per_tag(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 per tag (float64, 0 for a zero denominator; see the module conventions)."""
    tp, fp, fn = per_tag_counts(y_true, y_pred)
    return _divide(tp, tp + fp), _divide(tp, tp + fn), f1_from_counts(tp, fp, fn)


def _restrict(tags_mask: np.ndarray | None, n_tags: int) -> np.ndarray:
    mask = _check_tags(tags_mask, n_tags, "tags_mask", dtype=bool)
    return np.ones(n_tags, dtype=bool) if mask is None else mask


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, tags_mask: np.ndarray | None = None) -> tuple[float, int]:
    """Macro-F1 over tags with a positive in ``y_true`` (and in ``tags_mask``), and the number of such tags."""
    tp, fp, fn = per_tag_counts(y_true, y_pred)
    keep = _restrict(tags_mask, tp.shape[0])
    return macro_f1_from_counts(tp[keep], fp[keep], fn[keep])


def micro_f1(y_true: np.ndarray, y_pred: np.ndarray, tags_mask: np.ndarray | None = None) -> float:
    """Micro-F1 from counts pooled over all tags (in ``tags_mask``); NaN with no positive and no prediction."""
    tp, fp, fn = per_tag_counts(y_true, y_pred)
    keep = _restrict(tags_mask, tp.shape[0])
    tp, fp, fn = tp[keep].sum(), fp[keep].sum(), fn[keep].sum()
    return float(_divide(2 * tp, 2 * tp + fp + fn, fill=np.nan))


def average_precision_per_tag(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Average precision per tag, equal to ``sklearn.metrics.average_precision_score`` on each column.

    AP = sum over distinct score thresholds (descending) of (R_k - R_{k-1}) * P_k, no interpolation; tied
    scores form one threshold. Computed as (1/npos) * sum over positives of the precision at the end of
    their tie group. NaN for tags with no positive.
    """
    y_true, scores = _pair(y_true, scores, "scores")
    scores = check_finite(scores)
    n = scores.shape[0]
    order = np.argsort(-scores, axis=0, kind="stable")
    s = np.take_along_axis(scores, order, axis=0)
    y = np.take_along_axis(y_true, order, axis=0)
    tp = np.cumsum(y, axis=0, dtype=np.int64)
    precision = tp / np.arange(1, n + 1)[:, None]
    rows = np.broadcast_to(np.arange(n)[:, None], s.shape)
    group_end = np.ones(s.shape, dtype=bool)
    group_end[:-1] = s[:-1] != s[1:]
    # for every row, the index of the last row of its tie group: reverse running minimum of group ends
    end = np.minimum.accumulate(np.where(group_end, rows, n)[::-1], axis=0)[::-1]
    hit = np.where(y, np.take_along_axis(precision, end, axis=0), 0.0).sum(axis=0)
    return _divide(hit, y.sum(axis=0), fill=np.nan)


def macro_ap(y_true: np.ndarray, scores: np.ndarray, tags_mask: np.ndarray | None = None) -> tuple[float, int]:
    """Mean AP over tags with a positive (and in ``tags_mask``), and the number of such tags."""
    ap = average_precision_per_tag(y_true, scores)
    keep = _restrict(tags_mask, ap.shape[0])
    return _masked_mean(ap[keep], ~np.isnan(ap[keep]))


def bucket_masks(train_counts: np.ndarray, tail: int = 50, head: int = 500) -> dict[str, np.ndarray]:
    """Tag masks by training frequency: tail ``< tail``, medium ``[tail, head)``, head ``>= head``."""
    counts = np.asarray(train_counts)
    if counts.ndim != 1:
        raise ValueError(f"train_counts: expected one count per tag, got shape {counts.shape}")
    if not 0 <= tail <= head:
        raise ValueError(f"bucket bounds: need 0 <= tail <= head, got tail={tail}, head={head}")
    return {"tail": counts < tail, "medium": (counts >= tail) & (counts < head), "head": counts >= head}


def as_decision(rule: Decision | np.ndarray | Sequence[float], n_tags: int) -> Decision:
    """``rule`` as a :class:`Decision` over ``n_tags`` tags; plain thresholds are a Decision without groups."""
    if isinstance(rule, Decision):
        if rule.n_tags != n_tags:
            raise ValueError(f"decision: expected {n_tags} thresholds (one per tag), got {rule.n_tags}")
        return rule
    thresholds = _check_tags(rule, n_tags, "thresholds", dtype=np.float64)
    if not np.isfinite(thresholds).all():
        raise ValueError(f"thresholds: {int((~np.isfinite(thresholds)).sum())} NaN/Inf values")
    return Decision(thresholds)


def at_threshold(decision: Decision, threshold: float) -> Decision:
    """The same groups, every free tag at one fixed ``threshold`` (``macro_f1_at_0.5``'s rule)."""
    return Decision(np.full(decision.n_tags, float(threshold)), decision.groups)


def group_names(decision: Decision, tag_names: Sequence[str] | None = None,
                fields: dict[str, str] | None = None) -> list[str]:
    """One name per group: the field its tags share (``fields``: tag -> field, else the part of each tag name
    before ``=``), or ``group<k>`` when there is no such shared field."""
    def field(tag: str) -> str:
        if fields and fields.get(tag):
            return fields[tag]
        name, sep, _ = tag.partition("=")
        return name if sep else ""

    names = []
    for k, g in enumerate(decision.groups):
        found = set() if tag_names is None else {field(tag_names[j]) for j in g}
        names.append(found.pop() if len(found) == 1 and "" not in found else f"group{k}")
    return names


def describe_decision(decision: Decision, names: Sequence[str]) -> dict:
    """metrics.json's record of the rule: how scores are made and decided, and the groups (field names)."""
    grouped = bool(decision.groups)
    return {"score": SCORE_RULE[grouped], "rule": GROUP_RULE if grouped else THRESHOLD_RULE,
            "groups": list(names), "n_group_tags": int((~decision.free_mask()).sum()), "at_0.5": FIXED_RULE}


def _json_float(x: float) -> float | None:
    """A float for metrics.json: NaN (undefined) becomes None (null)."""
    return None if np.isnan(x) else float(x)


def score_run(y_true: np.ndarray, scores: np.ndarray, decision: Decision | np.ndarray, train_counts: np.ndarray,
              tail: int = 50, head: int = 500, *, tag_names: Sequence[str] | None = None,
              fields: dict[str, str] | None = None) -> dict:
    """Everything a run's ``metrics.json`` and ``per_tag.csv`` need, from test labels and scores.

    ``scores`` are the run's scores (``decision.scores(logits)``: softmax within groups, sigmoid elsewhere),
    ``decision`` its rule (plain per-tag thresholds: a rule without groups). ``macro_f1`` applies the rule
    fitted on validation, ``macro_f1_at_0.5`` the fixed one (group tags by arg-max, free tags at 0.5). Raises
    :class:`NonFiniteScores` first if any score is NaN or Inf. Undefined values (no scored tag) are None.
    Buckets follow :func:`bucket_masks`; ``train_count_range`` is half-open ``[lo, hi)``, ``hi`` None for no
    bound. ``per_tag`` holds one dict per tag with keys :data:`PER_TAG_COLUMNS`; ``recall``, ``f1`` and ``ap``
    are None for tags without a test positive, ``precision`` for tags never predicted, ``threshold`` for group
    tags (``decided_by`` names their field: ``argmax:<field>``; ``fields`` maps tag -> field, see
    :func:`group_names`). ``decision`` records the rule and the groups' names.
    """
    scores = check_finite(scores)
    y_true, scores = _pair(y_true, scores, "scores")
    n_images, n_tags = y_true.shape
    decision = as_decision(decision, n_tags)
    thresholds, free = decision.thresholds, decision.free_mask()
    train_counts = _check_tags(train_counts, n_tags, "train_counts")
    if tag_names is not None and len(tag_names) != n_tags:
        raise ValueError(f"tag_names: expected {n_tags} names, got {len(tag_names)}")
    names = group_names(decision, tag_names, fields)
    decided_by = ["threshold"] * n_tags
    for name, g in zip(names, decision.groups):
        for j in g:
            decided_by[j] = f"argmax:{name}"

    y_pred = binarize(scores, decision)
    precision, recall, f1 = f1_per_tag(y_true, y_pred)
    f1_half = f1_per_tag(y_true, binarize(scores, at_threshold(decision, 0.5)))[2]
    ap = average_precision_per_tag(y_true, scores)
    support = y_true.sum(axis=0)
    predicted = y_pred.sum(axis=0)
    masks = bucket_masks(train_counts, tail, head)
    ranges = {"tail": [0, tail], "medium": [tail, head], "head": [head, None]}

    def summary(mask: np.ndarray) -> dict:
        scored = mask & (support > 0)
        return {"n_tags": int(mask.sum()), "n_tags_scored": int(scored.sum()),
                **{key: _json_float(_masked_mean(values, scored)[0])
                   for key, values in (("macro_f1", f1), ("macro_f1_at_0.5", f1_half), ("macro_ap", ap))}}

    bucket_of = np.select([masks[b] for b in BUCKETS], BUCKETS, default="")
    per_tag = [
        {"tag": j, "name": None if tag_names is None else tag_names[j], "bucket": str(bucket_of[j]),
         "support": int(support[j]), "predicted": int(predicted[j]), "train_count": int(train_counts[j]),
         "threshold": float(thresholds[j]) if free[j] else None, "decided_by": decided_by[j],
         "precision": float(precision[j]) if predicted[j] else None,
         "recall": float(recall[j]) if support[j] else None,
         "f1": float(f1[j]) if support[j] else None,
         "ap": _json_float(ap[j])}
        for j in range(n_tags)]
    return {
        "n_images": n_images,
        **summary(np.ones(n_tags, dtype=bool)),
        "micro_f1": _json_float(micro_f1(y_true, y_pred)),
        "threshold_rule": GROUP_RULE if decision.groups else THRESHOLD_RULE,
        "decision": describe_decision(decision, names),
        "buckets": {b: {"train_count_range": ranges[b], **summary(masks[b])} for b in BUCKETS},
        "per_tag": per_tag,
    }
