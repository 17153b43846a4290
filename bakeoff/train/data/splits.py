"""Train/val/test splits by iterative stratification, and the dataset statistics written beside them.

``iterative_stratification`` follows Sechidis, Tsoumakas & Vlahavas (2011), "On the stratification of
multi-label data": labels are processed rarest first; each row carrying the label goes to the split with the
largest remaining demand for that label, ties broken by the largest remaining total demand, then at random.
Two changes make it fit a benchmark: a split that is full takes no more rows (so every split has exactly its
requested size), and the rows of one label are assigned as a group (the split sequence depends only on the
demands, so it is computed first and dealt to the label's rows in random order, which is the original
algorithm with a shuffled row order).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from bakeoff.common.io import sha256_file, write_json
from bakeoff.train.data.dataset import (
    MANIFEST,
    SPLIT_NAMES,
    STATS,
    TAXONOMY,
    Dataset,
    DatasetError,
    load_dataset,
    read_rejected,
    write_splits,
)

MIN_TRAIN_VAL = 300  # rows that must remain for train + val when test_size is a count
MIN_IMAGES = 3  # a tag with this many images gets one in every split
HEAD_THRESHOLD = 500  # train images from which a tag is "head"

Sizes = Mapping[str, int] | Mapping[str, float]


def split_counts(sizes: Sizes, n: int) -> dict[str, int]:
    """Exact split sizes: counts that sum to ``n``, or fractions that sum to 1 (rounded by largest remainder)."""
    values = np.array(list(sizes.values()), dtype=float)
    if all(isinstance(v, (int, np.integer)) for v in sizes.values()):
        if values.sum() != n or (values < 0).any():
            raise ValueError(f"split sizes {dict(sizes)} must be non-negative and sum to the {n} rows")
        return {k: int(v) for k, v in sizes.items()}
    if (values < 0).any() or abs(values.sum() - 1) > 1e-6:
        raise ValueError(f"split fractions {dict(sizes)} must be non-negative and sum to 1")
    exact = values * n
    counts = np.floor(exact).astype(int)
    counts[np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]] += 1
    return dict(zip(sizes, counts.tolist()))


def _deal(k: int, demand: np.ndarray, room: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The splits ``k`` rows go to, one at a time: largest ``demand``, then largest ``room``, then random.

    Full splits are skipped. ``demand`` and ``room`` are decremented in place for every row dealt.
    """
    d, r = demand.tolist(), room.tolist()
    tie = rng.random((k, len(d))).tolist()
    picks = []
    for u in range(k):
        j = max(range(len(d)), key=lambda s: (r[s] > 0, d[s], r[s], tie[u][s]))
        d[j] -= 1
        r[j] -= 1
        picks.append(j)
    demand[:], room[:] = d, r
    return np.array(picks, dtype=np.int64)


def iterative_stratification(y: np.ndarray, sizes: Sizes, seed: int = 0) -> dict[str, np.ndarray]:
    """Split the rows of the N x T label matrix ``y`` into ``sizes`` (exact); returns sorted row indices per split."""
    y = np.asarray(y).astype(bool)
    n = len(y)
    counts = split_counts(sizes, n)
    rng = np.random.default_rng(seed)
    room = np.array(list(counts.values()), dtype=float)
    demand = np.outer(room / max(n, 1), y.sum(0))  # S x T: positives each split still wants
    assign = np.full(n, -1, dtype=np.int64)
    yt = np.ascontiguousarray(y.T)
    left = y.sum(0).astype(np.int64)  # unassigned positives per label
    tie = rng.permutation(y.shape[1])  # random order among equally rare labels
    while left.any():
        live = np.flatnonzero(left)
        label = live[np.lexsort((tie[live], left[live]))[0]]
        rows = rng.permutation(np.flatnonzero(yt[label] & (assign < 0)))
        column = demand[:, label].copy()
        picks = _deal(len(rows), column, room, rng)
        assign[rows] = picks
        for j in range(len(room)):
            got = y[rows[picks == j]].sum(0)
            demand[j] -= got
            left -= got
    rest = rng.permutation(np.flatnonzero(assign < 0))  # rows without labels go by total demand
    assign[rest] = _deal(len(rest), room.copy(), room, rng)
    return {name: np.flatnonzero(assign == j) for j, name in enumerate(counts)}


def random_split(y: np.ndarray, sizes: Sizes, seed: int = 0) -> dict[str, np.ndarray]:
    """Uniformly random split of the rows of ``y`` into ``sizes`` (exact): the unstratified baseline."""
    counts = split_counts(sizes, len(y))
    order = np.random.default_rng(seed).permutation(len(y))
    ends = np.cumsum(list(counts.values()))
    return {name: np.sort(part) for name, part in zip(counts, np.split(order, ends[:-1]))}


METHODS: dict[str, Callable[[np.ndarray, Sizes, int], dict[str, np.ndarray]]] = {
    "iterative": iterative_stratification,
    "random": random_split,
}


def ensure_coverage(y: np.ndarray, assign: np.ndarray, need: np.ndarray) -> int:
    """Swap rows between splits until split ``s`` has ``need[s, t]`` rows of every tag ``t`` where possible.

    ``assign`` (row -> split index) is changed in place; every move is a swap, so split sizes are kept.
    Gaps are filled rarest tag first, a split in index order; a row moves in only from a split with a surplus
    of each of its tags, and the row sent back is the one whose tags are most plentiful. Returns rows moved.
    """
    y = np.asarray(y).astype(bool)
    n_splits = len(need)
    have = np.stack([y[assign == s].sum(0) for s in range(n_splits)]).astype(np.int64)
    moved = 0

    def move(i: int, to: int) -> None:
        have[assign[i]] -= y[i]
        have[to] += y[i]
        assign[i] = to

    for t in np.argsort(y.sum(0), kind="stable"):
        for s in range(n_splits):
            while have[s, t] < need[s, t]:
                spare = have - need
                cand = np.flatnonzero(y[:, t] & (assign != s))
                cand = cand[~(y[cand] & (spare[assign[cand]] < 1)).any(1)]
                if not len(cand):
                    break
                i = cand[np.argmax(spare[assign[cand], t])]
                donor = assign[i]
                move(i, s)
                spare = have - need
                back = np.flatnonzero(assign == s)
                back = back[(back != i) & ~(y[back] & (spare[s] < 1)).any(1)]
                if not len(back):
                    move(i, donor)
                    break
                plenty = np.where(y[back], spare[s], np.iinfo(np.int64).max).min(1)
                move(back[np.argmax(plenty)], donor)
                moved += 2
    return moved


def _test_count(test_size: int | float, n: int, manifest: Path) -> int:
    if 0 < test_size < 1:
        n_test = round(test_size * n)
        if n_test < 1 or n - n_test < 2:
            raise DatasetError(f"{manifest}: {n} images are too few for a test fraction of {test_size}")
        return n_test
    if test_size != int(test_size) or test_size < 1:
        raise DatasetError(f"test_size must be a count >= 1 or a fraction in (0, 1), got {test_size}")
    if n < test_size + MIN_TRAIN_VAL:
        raise DatasetError(
            f"{manifest}: {n} images are too few for test_size={int(test_size)}: need at least "
            f"{int(test_size) + MIN_TRAIN_VAL} ({int(test_size)} test + {MIN_TRAIN_VAL} train/val); "
            f"pass a smaller test_size or a fraction such as 0.1"
        )
    return int(test_size)


def prepare(
    root: str | Path,
    test_size: int | float = 5000,
    val_fraction: float = 0.1,
    seed: int = 0,
    long_tail_threshold: int = 50,
    method: str = "iterative",
    head_threshold: int = HEAD_THRESHOLD,
) -> dict:
    """Split the dataset at ``root`` (test first, exactly ``test_size`` rows, then val from the rest).

    Writes ``splits.json`` and ``stats.json``; returns the stats. Same seed and manifest give the same splits.
    """
    if method not in METHODS:
        raise ValueError(f"unknown split method {method!r}; choose from {sorted(METHODS)}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ds = load_dataset(root)
    y = ds.labels()
    n = len(ds)
    n_test = _test_count(test_size, n, ds.root / MANIFEST)
    n_val = round(val_fraction * (n - n_test))
    split = METHODS[method]
    seed_test, seed_val = np.random.SeedSequence(seed).generate_state(2).tolist()
    first = split(y, {"test": n_test, "rest": n - n_test}, seed_test)
    rest = first["rest"]
    second = split(y[rest], {"train": n - n_test - n_val, "val": n_val}, seed_val)
    assign = np.empty(n, dtype=np.int64)
    assign[first["test"]] = SPLIT_NAMES.index("test")
    for name, rows in second.items():
        assign[rest[rows]] = SPLIT_NAMES.index(name)
    total = y.sum(0)
    sizes = np.bincount(assign, minlength=len(SPLIT_NAMES))
    need = np.stack([total >= (1 if name == "train" else MIN_IMAGES) for name in SPLIT_NAMES]) & (sizes[:, None] > 0)
    moved = ensure_coverage(y, assign, need.astype(np.int64))
    ds.splits = {name: [ds.ids[i] for i in np.flatnonzero(assign == j)] for j, name in enumerate(SPLIT_NAMES)}
    meta = {
        "seed": seed,
        "method": method,
        "test_size": test_size,
        "val_fraction": val_fraction,
        "sizes": {name: len(ds.splits[name]) for name in SPLIT_NAMES},
        "coverage_moves": moved,
        "manifest_sha256": sha256_file(ds.root / MANIFEST),
        "taxonomy_sha256": sha256_file(ds.root / TAXONOMY),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_splits(ds.root, ds.splits, meta)
    ds.split_meta = meta
    stats = dataset_stats(ds, long_tail_threshold, head_threshold)
    write_json(ds.root / STATS, stats)
    return stats


def dataset_stats(ds: Dataset, long_tail_threshold: int = 50, head_threshold: int = HEAD_THRESHOLD) -> dict:
    """Image and per-tag counts per split, long-tail tags (< ``long_tail_threshold`` train images), buckets."""
    y = ds.labels()
    per_split = {name: y[ds.split_indices(name)].sum(0) for name in SPLIT_NAMES}
    train, test, total = per_split["train"], per_split["test"], y.sum(0)
    tax = np.array(ds.taxonomy, dtype=object)
    tail = train < long_tail_threshold
    head = train >= head_threshold
    need = {"train": total >= 1, "val": total >= MIN_IMAGES, "test": total >= MIN_IMAGES}
    return {
        "n_images": len(ds),
        "n_tags": len(ds.taxonomy),
        "seed": ds.split_meta.get("seed"),
        "method": ds.split_meta.get("method"),
        "dataset_hash": ds.content_hash(),
        "splits": {name: len(ds.splits[name]) for name in SPLIT_NAMES},
        "long_tail_threshold": long_tail_threshold,
        "head_threshold": head_threshold,
        "min_images": MIN_IMAGES,
        "long_tail": tax[tail].tolist(),
        "long_tail_in_test": int((tail & (test > 0)).sum()),
        "buckets": {"tail": tax[tail].tolist(), "medium": tax[~tail & ~head].tolist(), "head": tax[head].tolist()},
        "too_few_images": tax[total < MIN_IMAGES].tolist(),
        "coverage_gaps": {
            name: tax[need[name] & (per_split[name] == 0) & (len(ds.splits[name]) > 0)].tolist() for name in SPLIT_NAMES
        },
        "n_rejected": len(read_rejected(ds.root)),
        "tags": {t: {name: int(per_split[name][j]) for name in SPLIT_NAMES} for j, t in enumerate(ds.taxonomy)},
    }


def format_stats(stats: dict) -> str:
    """Human-readable summary of ``stats.json``: sizes, buckets, the long-tail tags, rejected rows."""
    splits, tags = stats["splits"], stats["tags"]
    b, lt = stats["buckets"], stats["long_tail"]
    width = max([len(t) for t in lt] + [3])
    lines = [
        f"images: {stats['n_images']}   tags: {stats['n_tags']}   rejected rows: {stats['n_rejected']}",
        "splits: " + "   ".join(f"{k} {v}" for k, v in splits.items()) + f"   (method {stats['method']}, seed {stats['seed']})",
        f"tags by train images: head (>= {stats['head_threshold']}) {len(b['head'])}   medium {len(b['medium'])}   "
        f"tail (< {stats['long_tail_threshold']}) {len(b['tail'])}",
        f"long tail: {len(lt)} tags, {stats['long_tail_in_test']} with >= 1 test image",
    ]
    if lt:
        lines.append(f"  {'tag':<{width}}  " + "  ".join(f"{k:>6}" for k in splits))
        lines += [f"  {t:<{width}}  " + "  ".join(f"{tags[t][k]:>6}" for k in splits) for t in lt]
    if stats["too_few_images"]:
        lines.append(f"tags with < {stats['min_images']} images: " + ", ".join(stats["too_few_images"]))
    gaps = [f"{t} (no {k})" for k, ts in stats["coverage_gaps"].items() for t in ts]
    if gaps:
        lines.append("coverage gaps: " + ", ".join(gaps))
    return "\n".join(lines)
