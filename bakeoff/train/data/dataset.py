"""The dataset directory contract (DESIGN.md): manifest, taxonomy, splits, stats, rejected rows.

A dataset is a directory; this module is the only code that reads or writes its files, so every stage
sees the same label-matrix column order (the taxonomy) and the same split ids.
"""
from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from bakeoff.common.io import atomic_path, read_json, write_json

MANIFEST = "manifest.csv"
TAXONOMY = "taxonomy.json"
SPLITS = "splits.json"
STATS = "stats.json"
REJECTED = "rejected.csv"
CACHE_DIR = "cache"
TAG_SEP = "|"
SPLIT_NAMES = ("train", "val", "test")


class DatasetError(ValueError):
    """A dataset directory or input file that cannot be used; the message names file, row and problem."""


@dataclass(frozen=True)
class Rejected:
    """One input row that was not imported, and why."""

    source: str  # input file
    row: int  # 1-based data row number in that file (header = row 0); 0 when not row-specific
    id: str
    reason: str


@dataclass
class Dataset:
    """An imported dataset: rows in manifest order, the taxonomy, and (after prepare) the splits."""

    root: Path
    ids: list[str]
    images: list[str]
    tags: list[list[str]]
    taxonomy: list[str]
    fields: dict[str, str] = field(default_factory=dict)  # tag -> field name ("colour" for "colour=Blue")
    splits: dict[str, list[str]] | None = None
    split_meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, i: int) -> Path:
        p = Path(self.images[i])
        return p if p.is_absolute() else self.root / p

    def labels(self) -> np.ndarray:
        """N x T uint8 label matrix, rows in manifest order, columns in taxonomy order."""
        col = {t: j for j, t in enumerate(self.taxonomy)}
        y = np.zeros((len(self.ids), len(self.taxonomy)), dtype=np.uint8)
        for i, tags in enumerate(self.tags):
            y[i, [col[t] for t in tags]] = 1
        return y

    def split_indices(self, name: str) -> np.ndarray:
        """Manifest row indices of split ``name`` (in manifest order)."""
        if self.splits is None:
            raise DatasetError(f"{self.root / SPLITS}: dataset is not prepared; run `python -m train.data prepare {self.root}`")
        if name not in self.splits:
            raise DatasetError(f"{self.root / SPLITS}: no split named {name!r} (have {sorted(self.splits)})")
        pos = {i: k for k, i in enumerate(self.ids)}
        return np.sort(np.array([pos[i] for i in self.splits[name]], dtype=np.int64))

    def content_hash(self) -> str:
        """sha256 over manifest rows, taxonomy and splits: what a run was trained on."""
        h = hashlib.sha256()
        for i, img, tags in zip(self.ids, self.images, self.tags):
            h.update(f"{i},{img},{TAG_SEP.join(tags)}\n".encode())
        h.update(TAG_SEP.join(self.taxonomy).encode())
        if self.splits is not None:
            for name in SPLIT_NAMES:
                h.update(f"\n{name}:".encode() + ",".join(self.splits.get(name, [])).encode())
        return h.hexdigest()

    def stats(self) -> dict:
        path = self.root / STATS
        if not path.exists():
            raise DatasetError(f"{path}: missing; run `python -m train.data prepare {self.root}`")
        return read_json(path)


def field_of(tag: str) -> str:
    """The field a tag belongs to: ``colour=Blue`` -> ``colour``; a bare tag -> ``""``."""
    return tag.split("=", 1)[0] if "=" in tag else ""


def write_dataset(
    root: str | Path,
    ids: Sequence[str],
    images: Sequence[str],
    tags: Sequence[Sequence[str]],
    taxonomy: Sequence[str] | None = None,
    rejected: Iterable[Rejected] = (),
    source: dict | None = None,
) -> Dataset:
    """Write manifest.csv, taxonomy.json and rejected.csv atomically; return the dataset.

    ``taxonomy`` defaults to the sorted set of tags in use, grouped by field.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if taxonomy is None:
        taxonomy = sorted({t for ts in tags for t in ts}, key=lambda t: (field_of(t), t))
    taxonomy = list(taxonomy)
    with atomic_path(root / MANIFEST) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["id", "image", "tags"])
            for i, img, ts in zip(ids, images, tags):
                w.writerow([i, img, TAG_SEP.join(ts)])
    fields = {t: field_of(t) for t in taxonomy}
    write_json(root / TAXONOMY, {"tags": taxonomy, "fields": fields, "source": source or {}})
    write_rejected(root / REJECTED, rejected)
    return Dataset(root, list(ids), list(images), [list(t) for t in tags], taxonomy, fields)


def write_rejected(path: Path, rejected: Iterable[Rejected]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["source", "row", "id", "reason"])
            for r in rejected:
                w.writerow([r.source, r.row, r.id, r.reason])


def read_rejected(root: str | Path) -> list[Rejected]:
    path = Path(root) / REJECTED
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [Rejected(r["source"], int(r["row"]), r["id"], r["reason"]) for r in csv.DictReader(f)]


def load_dataset(root: str | Path) -> Dataset:
    """Read a dataset directory; errors name the file and row."""
    root = Path(root)
    manifest = root / MANIFEST
    if not manifest.exists():
        raise DatasetError(f"{manifest}: not found; {root} is not a dataset directory (import one with `python -m train.data import ...`)")
    tax = read_json(root / TAXONOMY)
    taxonomy = list(tax["tags"])
    known = set(taxonomy)
    ids, images, tags = [], [], []
    with open(manifest, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"id", "image", "tags"} <= set(reader.fieldnames):
            raise DatasetError(f"{manifest}: header must be id,image,tags (got {reader.fieldnames})")
        for n, r in enumerate(reader, start=1):
            ts = [t for t in r["tags"].split(TAG_SEP) if t]
            unknown = [t for t in ts if t not in known]
            if unknown:
                raise DatasetError(f"{manifest}: row {n} (id {r['id']}): tags not in {TAXONOMY}: {unknown}")
            ids.append(r["id"])
            images.append(r["image"])
            tags.append(ts)
    splits, meta = None, {}
    if (root / SPLITS).exists():
        s = read_json(root / SPLITS)
        splits = {k: list(s[k]) for k in SPLIT_NAMES}
        meta = {k: v for k, v in s.items() if k not in SPLIT_NAMES}
    return Dataset(root, ids, images, tags, taxonomy, dict(tax.get("fields", {})), splits, meta)


def write_splits(root: str | Path, splits: dict[str, list[str]], meta: dict) -> None:
    write_json(Path(root) / SPLITS, {**meta, **{k: list(splits[k]) for k in SPLIT_NAMES}})
