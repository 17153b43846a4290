import json

import numpy as np
import pytest

from bakeoff.train.data.dataset import SPLITS, DatasetError, Rejected, load_dataset, write_dataset
from bakeoff.train.data.splits import (
    ensure_coverage,
    format_stats,
    iterative_stratification,
    prepare,
    random_split,
    split_counts,
)


def long_tail_labels(n=1500, t=30, seed=0):
    """Rows with 0-3 labels drawn from a power law: a few head labels, a long tail."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, t + 1) ** 1.3
    y = np.zeros((n, t), dtype=np.uint8)
    for i in range(n):
        k = rng.integers(0, 4)
        y[i, rng.choice(t, size=k, replace=False, p=p / p.sum())] = 1
    return y


def test_split_counts_exact_and_fractional():
    assert split_counts({"a": 3, "b": 7}, 10) == {"a": 3, "b": 7}
    assert split_counts({"a": 0.25, "b": 0.25, "c": 0.5}, 10) == {"a": 3, "b": 2, "c": 5}
    assert sum(split_counts({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, 100).values()) == 100
    with pytest.raises(ValueError, match="sum to the 10 rows"):
        split_counts({"a": 3, "b": 8}, 10)
    with pytest.raises(ValueError, match="sum to 1"):
        split_counts({"a": 0.5, "b": 0.6}, 10)


def test_stratification_sizes_partition_and_proportions():
    y = long_tail_labels()
    sizes = {"test": 300, "val": 150, "train": 1050}
    parts = iterative_stratification(y, sizes, seed=0)
    assert {k: len(v) for k, v in parts.items()} == sizes
    assert np.array_equal(np.sort(np.concatenate(list(parts.values()))), np.arange(len(y)))
    total = y.sum(0)
    dev = np.abs(y[parts["test"]].sum(0) - total * 300 / len(y))
    assert dev.max() <= 1  # every label's test count within one row of its proportional share
    rand = random_split(y, sizes, seed=0)
    assert {k: len(v) for k, v in rand.items()} == sizes
    assert dev.mean() < np.abs(y[rand["test"]].sum(0) - total * 300 / len(y)).mean() / 2


def test_stratification_rare_labels_spread_and_unlabelled_rows_fill_demand():
    y = np.zeros((100, 2), dtype=np.uint8)
    y[:4, 0] = 1  # 4 rows of a rare label, 2 splits of equal demand -> 2 each
    y[4:10, 1] = 1
    parts = iterative_stratification(y, {"a": 0.5, "b": 0.5}, seed=3)
    assert [int(y[parts[k], 0].sum()) for k in "ab"] == [2, 2]
    assert [int(y[parts[k], 1].sum()) for k in "ab"] == [3, 3]
    assert [len(parts[k]) for k in "ab"] == [50, 50]


def test_stratification_deterministic_per_seed():
    y = long_tail_labels(n=600)
    sizes = {"test": 0.2, "train": 0.8}
    a, b = iterative_stratification(y, sizes, seed=1), iterative_stratification(y, sizes, seed=1)
    assert all(np.array_equal(a[k], b[k]) for k in sizes)
    c = iterative_stratification(y, sizes, seed=2)
    assert not np.array_equal(a["test"], c["test"])


def test_ensure_coverage_fills_gaps_by_swaps():
    y = np.zeros((20, 2), dtype=np.uint8)
    y[:3, 0] = 1  # a 3-image tag, all in split 0
    y[3:, 1] = 1
    assign = np.array([0] * 12 + [1] * 4 + [2] * 4)
    need = np.array([[1, 1], [1, 1], [1, 1]])
    moved = ensure_coverage(y, assign, need)
    assert moved == 4
    assert np.bincount(assign).tolist() == [12, 4, 4]
    assert [int(y[assign == s, 0].sum()) for s in range(3)] == [1, 1, 1]


@pytest.fixture
def crafted(tmp_path):
    """400 rows; style=a/b/c/d have 3/4/2/1 images, style=e 30; taxonomy deliberately not alphabetical."""
    counts = {"style=d": 1, "style=b": 4, "style=e": 30, "style=a": 3, "style=c": 2}
    tags = [["kind=item"] for _ in range(400)]
    for i in range(200):
        tags[i].append("colour=red")
    for i in range(200, 300):
        tags[i].append("colour=blue")
    row = 0
    for tag, k in counts.items():
        for _ in range(k):
            tags[row * 7 % 400].append(tag)
            row += 1
    taxonomy = ["kind=item", "colour=red", "colour=blue", *counts]
    rejected = [Rejected("styles.csv", 5, "x", "missing value: gender"), Rejected("styles.csv", 9, "y", "duplicate id")]
    ids = [f"p{i:03d}" for i in range(400)]
    write_dataset(tmp_path / "ds", ids, [f"images/{i}.jpg" for i in ids], tags, taxonomy, rejected)
    return tmp_path / "ds"


def test_prepare_writes_splits_and_stats(crafted):
    stats = prepare(crafted, test_size=0.2, val_fraction=0.1, seed=0, long_tail_threshold=10, head_threshold=100)
    ds = load_dataset(crafted)
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 288, "val": 32, "test": 80}
    assert ds.split_meta["seed"] == 0 and ds.split_meta["method"] == "iterative"
    assert ds.split_meta["sizes"] == stats["splits"] == {"train": 288, "val": 32, "test": 80}
    y = ds.labels()
    per = {k: y[ds.split_indices(k)].sum(0) for k in ("train", "val", "test")}
    tax = ds.taxonomy
    assert stats["tags"] == {t: {k: int(per[k][j]) for k in per} for j, t in enumerate(tax)}
    assert stats["long_tail"] == ["style=d", "style=b", "style=a", "style=c"]  # taxonomy order
    assert stats["long_tail_in_test"] == sum(per["test"][tax.index(t)] > 0 for t in stats["long_tail"])
    for j, total in enumerate(y.sum(0)):  # coverage guarantee
        assert per["train"][j] >= 1
        if total >= 3:
            assert per["val"][j] >= 1 and per["test"][j] >= 1
    assert stats["buckets"]["head"] == ["kind=item", "colour=red"]
    assert stats["buckets"]["medium"] == ["colour=blue", "style=e"]
    assert stats["too_few_images"] == ["style=d", "style=c"]
    assert stats["n_rejected"] == 2
    assert stats["coverage_gaps"] == {"train": [], "val": [], "test": []}
    assert json.loads((crafted / "stats.json").read_text()) == stats
    text = format_stats(stats)
    assert "rejected rows: 2" in text and "style=b" in text and "tail (< 10) 4" in text


def test_prepare_is_stable_per_seed(crafted):
    prepare(crafted, test_size=0.2, seed=0)
    first = json.loads((crafted / SPLITS).read_text())
    prepare(crafted, test_size=0.2, seed=0)
    again = json.loads((crafted / SPLITS).read_text())
    assert all(first[k] == again[k] for k in ("train", "val", "test"))
    prepare(crafted, test_size=0.2, seed=1)
    other = json.loads((crafted / SPLITS).read_text())
    assert first["test"] != other["test"]


def test_prepare_exact_test_count_and_too_small(crafted):
    stats = prepare(crafted, test_size=50, val_fraction=0.1)
    assert stats["splits"] == {"train": 315, "val": 35, "test": 50}
    with pytest.raises(DatasetError, match=r"400 images are too few for test_size=5000.*5300"):
        prepare(crafted)


def test_prepare_random_method(crafted):
    stats = prepare(crafted, test_size=0.2, method="random")
    assert stats["method"] == "random" and stats["splits"]["test"] == 80
    with pytest.raises(ValueError, match="unknown split method"):
        prepare(crafted, method="kfold")
