"""bakeoff.evaluate.metrics against scikit-learn, with the edge cases of a long-tailed multi-label test set."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, precision_recall_fscore_support

from bakeoff.evaluate import metrics as M
from bakeoff.train.decision import Decision


def random_case(seed: int, n: int = 300, t: int = 40) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels with a long tail, zero-positive tags, tied (rounded) scores, and thresholds."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, t)) < rng.choice([0.005, 0.02, 0.1, 0.4], size=t)).astype(np.uint8)
    y[:, :3] = 0  # tags with no test positive
    y[0, 3] = 1  # at least one rare tag with a positive
    scores = np.round(np.clip(0.35 * y + rng.random((n, t)) * 0.7, 0, 1), 1 + seed % 2).astype(np.float32)
    return y, scores, rng.uniform(0.2, 0.8, size=t)


def sklearn_ap(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.array([average_precision_score(y[:, j], scores[:, j]) for j in range(y.shape[1])])


SEEDS = [0, 1, 2, 3]


@pytest.mark.parametrize("seed", SEEDS)
def test_per_tag_prf_matches_sklearn_zero_division_0(seed):
    y, s, thr = random_case(seed)
    pred = M.binarize(s, thr)
    pred[:, 5] = False  # a tag never predicted
    pred[:, 6] = True  # a tag always predicted
    p, r, f = M.f1_per_tag(y, pred)
    ref = precision_recall_fscore_support(y, pred, average=None, zero_division=0)
    for ours, theirs in zip((p, r, f), ref[:3]):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-15)
    assert not np.isnan(np.concatenate([p, r, f])).any()
    tp, fp, fn = M.per_tag_counts(y, pred)
    np.testing.assert_array_equal(tp + fn, y.sum(0))
    np.testing.assert_array_equal(tp + fp, pred.sum(0))


@pytest.mark.parametrize("seed", SEEDS)
def test_macro_and_micro_f1_match_sklearn(seed):
    y, s, thr = random_case(seed)
    pred = M.binarize(s, thr)
    scored = np.flatnonzero(y.sum(0) > 0)
    value, n_scored = M.macro_f1(y, pred)
    assert n_scored == len(scored) <= y.shape[1] - 3
    assert value == pytest.approx(f1_score(y, pred, average="macro", labels=scored, zero_division=0), abs=1e-15)
    assert M.micro_f1(y, pred) == pytest.approx(f1_score(y, pred, average="micro", zero_division=0), abs=1e-15)

    mask = np.zeros(y.shape[1], dtype=bool)
    mask[::2] = True
    value, n_scored = M.macro_f1(y, pred, tags_mask=mask)
    labels = np.intersect1d(scored, np.flatnonzero(mask))
    assert n_scored == len(labels)
    assert value == pytest.approx(f1_score(y, pred, average="macro", labels=labels, zero_division=0), abs=1e-15)
    assert M.micro_f1(y, pred, tags_mask=mask) == pytest.approx(
        f1_score(y[:, mask], pred[:, mask], average="micro", zero_division=0), abs=1e-15)


@pytest.mark.parametrize("seed", SEEDS)
def test_average_precision_matches_sklearn_with_ties(seed):
    y, s, _ = random_case(seed)
    assert len(np.unique(s[:, 10])) < len(s)  # rounded scores: ties are present
    ap = M.average_precision_per_tag(y, s)
    scored = y.sum(0) > 0
    np.testing.assert_allclose(ap[scored], sklearn_ap(y, s)[scored], rtol=1e-12, atol=1e-15)
    assert np.isnan(ap[~scored]).all()
    value, n_scored = M.macro_ap(y, s)
    assert n_scored == scored.sum()
    assert value == pytest.approx(sklearn_ap(y, s)[scored].mean(), rel=1e-12)


def test_average_precision_on_logits_and_full_ties():
    rng = np.random.default_rng(7)
    y = (rng.random((50, 4)) < 0.3).astype(int)
    y[0] = 1
    logits = rng.normal(size=(50, 4)) * 5
    logits[:, 1] = 2.0  # one tie group: AP = prevalence
    logits[:, 2] = np.round(logits[:, 2])
    ap = M.average_precision_per_tag(y, logits)
    np.testing.assert_allclose(ap, sklearn_ap(y, logits), rtol=1e-12)
    assert ap[1] == pytest.approx(y[:, 1].mean())


def test_all_negative_and_all_positive_predictions():
    y, _, _ = random_case(0)
    scored = y.sum(0) > 0
    none = np.zeros_like(y)
    p, r, f = M.f1_per_tag(y, none)
    assert (p == 0).all() and (r == 0).all() and (f == 0).all()  # 0, never NaN
    assert M.macro_f1(y, none) == (0.0, scored.sum())
    assert M.micro_f1(y, none) == 0.0

    every = np.ones_like(y)
    p, r, f = M.f1_per_tag(y, every)
    np.testing.assert_allclose(p, y.mean(0))
    np.testing.assert_array_equal(r, scored.astype(float))
    labels = np.flatnonzero(scored)
    assert M.macro_f1(y, every)[0] == pytest.approx(
        f1_score(y, every, average="macro", labels=labels, zero_division=0))


def test_no_scored_tag_gives_nan():
    y = np.zeros((5, 3), dtype=int)
    assert np.isnan(M.macro_f1(y, y)[0]) and M.macro_f1(y, y)[1] == 0
    assert np.isnan(M.micro_f1(y, y))
    assert M.micro_f1(y, np.ones_like(y)) == 0.0  # false positives on absent tags are still errors
    assert np.isnan(M.macro_ap(y, np.random.default_rng(0).random((5, 3)))[0])


def test_single_image():
    y = np.array([[1, 0, 1, 0]])
    s = np.array([[0.9, 0.8, 0.1, 0.2]])
    pred = M.binarize(s, 0.5)
    assert M.macro_f1(y, pred) == (pytest.approx(0.5), 2)
    np.testing.assert_array_equal(M.average_precision_per_tag(y, s), [1.0, np.nan, 1.0, np.nan])
    assert M.micro_f1(y, pred) == pytest.approx(f1_score(y, pred, average="micro", zero_division=0))


def test_binarize_rule_is_greater_or_equal():
    s = np.array([[0.3, 0.5], [0.29, 0.7]])
    np.testing.assert_array_equal(M.binarize(s, np.array([0.3, 0.7])), [[True, False], [False, True]])
    with pytest.raises(ValueError, match="thresholds"):
        M.binarize(s, np.array([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="thresholds: 1 NaN/Inf"):
        M.binarize(s, np.array([0.5, np.nan]))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_raise_with_counts(bad):
    y, s, thr = random_case(0)
    s = s.copy()
    s[4, 7] = bad
    s[9, 7] = np.nan
    with pytest.raises(M.NonFiniteScores, match=r"row 4, tag 7.*failed") as err:
        M.score_run(y, s, thr, np.full(y.shape[1], 100))
    assert err.value.n_nan + err.value.n_inf == 2
    assert err.value.n_nan == 1 + (np.isnan(bad))
    with pytest.raises(M.NonFiniteScores, match="preds.npy: "):
        M.check_finite(s, "preds.npy")
    for fn in (M.binarize, M.average_precision_per_tag):
        with pytest.raises(M.NonFiniteScores):
            fn(*((y, s) if fn is M.average_precision_per_tag else (s, 0.5)))


def test_labels_must_be_binary_and_shapes_match():
    with pytest.raises(ValueError, match="y_true: values must be 0 or 1, found 2 at row 1, tag 0"):
        M.macro_f1(np.array([[1, 0], [2, 0]]), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="does not match"):
        M.macro_f1(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="tags_mask"):
        M.macro_f1(np.zeros((2, 2)), np.zeros((2, 2)), tags_mask=np.ones(3, bool))


def test_bucket_masks_boundaries():
    counts = np.array([0, 49, 50, 499, 500, 10_000])
    masks = M.bucket_masks(counts)
    assert list(masks) == ["tail", "medium", "head"]
    np.testing.assert_array_equal(masks["tail"], [1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(masks["medium"], [0, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(masks["head"], [0, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(M.bucket_masks(counts, tail=10, head=10)["medium"], np.zeros(6, bool))
    with pytest.raises(ValueError, match="tail <= head"):
        M.bucket_masks(counts, tail=600)


def test_score_run_is_consistent_and_json_ready():
    y, s, thr = random_case(1)
    t = y.shape[1]
    train_counts = np.random.default_rng(1).integers(0, 1500, size=t)
    names = [f"tag{j}" for j in range(t)]
    out = M.score_run(y, s, thr, train_counts, tag_names=names)
    json.dumps(out, allow_nan=False)  # NaN became null

    pred = M.binarize(s, thr)
    assert out["n_images"] == y.shape[0] and out["n_tags"] == t
    assert (out["macro_f1"], out["n_tags_scored"]) == pytest.approx(M.macro_f1(y, pred))
    assert out["macro_f1_at_0.5"] == pytest.approx(M.macro_f1(y, M.binarize(s, 0.5))[0])
    assert out["micro_f1"] == pytest.approx(M.micro_f1(y, pred))
    assert out["macro_ap"] == pytest.approx(M.macro_ap(y, s)[0])
    masks = M.bucket_masks(train_counts)
    for name, b in out["buckets"].items():
        assert b["n_tags"] == masks[name].sum()
        assert (b["macro_f1"], b["n_tags_scored"]) == pytest.approx(M.macro_f1(y, pred, masks[name]))
    assert sum(b["n_tags"] for b in out["buckets"].values()) == t
    assert sum(b["n_tags_scored"] for b in out["buckets"].values()) == out["n_tags_scored"]

    rows = out["per_tag"]
    assert [tuple(r) for r in rows] == [M.PER_TAG_COLUMNS] * t
    assert [r["tag"] for r in rows] == list(range(t)) and rows[5]["name"] == "tag5"
    _, _, f1 = M.f1_per_tag(y, pred)
    for r in rows:
        j = r["tag"]
        assert r["support"] == y[:, j].sum() and r["train_count"] == train_counts[j]
        assert r["threshold"] == thr[j] and masks[r["bucket"]][j]
        if r["support"]:
            assert r["f1"] == pytest.approx(f1[j]) and r["ap"] is not None
        else:
            assert r["f1"] is None and r["recall"] is None and r["ap"] is None


def test_score_run_empty_bucket_is_null():
    y, s, thr = random_case(2)
    out = M.score_run(y, s, thr, np.full(y.shape[1], 1000))
    assert out["buckets"]["tail"] == {"train_count_range": [0, 50], "n_tags": 0, "n_tags_scored": 0,
                                      "macro_f1": None, "macro_f1_at_0.5": None, "macro_ap": None}
    assert out["buckets"]["head"]["macro_f1"] == pytest.approx(out["macro_f1"])


def test_binarize_with_a_decision_decides_groups_by_argmax():
    """A 3-tag group: its arg-max is predicted even below its threshold, and two tags above their thresholds
    give one prediction; the free tag keeps ``score >= threshold``."""
    d = Decision(np.array([0.8, 0.5, 0.5, 0.6]), ((0, 1, 2),))
    s = np.array([[0.66, 0.24, 0.10, 0.6],   # arg-max 0.66 < its threshold 0.8: still predicted
                  [0.30, 0.55, 0.15, 0.59],  # arg-max tag 1; the free tag is under its threshold
                  [0.45, 0.45, 0.10, 0.9]])  # a tie: the first tag of the group
    want = [[True, False, False, True], [False, True, False, False], [True, False, False, True]]
    np.testing.assert_array_equal(M.binarize(s, d), want)
    two_above = np.array([[0.9, 0.85, 0.0, 0.0]])  # both above their thresholds
    assert M.binarize(two_above, d)[0, :3].tolist() == [True, False, False]
    assert M.binarize(two_above, 0.5)[0, :3].tolist() == [True, True, False]  # the plain rule would give two
    with pytest.raises(ValueError, match="decision: 4 thresholds for 3 tags"):
        M.binarize(s[:, :3], d)


@pytest.mark.parametrize("seed", SEEDS)
def test_a_decision_without_groups_is_exactly_the_threshold_rule(seed):
    """Old thresholds.json files (no groups): every number equals the plain per-tag threshold rule's."""
    y, s, thr = random_case(seed)
    train_counts = np.random.default_rng(seed).integers(0, 1500, size=y.shape[1])
    names = [f"f{j % 3}=v{j}" for j in range(y.shape[1])]
    np.testing.assert_array_equal(M.binarize(s, Decision(thr)), s >= thr)
    with_decision = M.score_run(y, s, Decision(thr), train_counts, tag_names=names)
    assert with_decision == M.score_run(y, s, thr, train_counts, tag_names=names)
    pred, scored = s >= thr, y.sum(0) > 0
    assert with_decision["macro_f1"] == pytest.approx(
        f1_score(y, pred, average="macro", labels=np.flatnonzero(scored), zero_division=0), abs=1e-15)
    assert with_decision["macro_f1_at_0.5"] == pytest.approx(
        f1_score(y, s >= 0.5, average="macro", labels=np.flatnonzero(scored), zero_division=0), abs=1e-15)
    assert with_decision["threshold_rule"] == "score >= threshold"
    assert with_decision["decision"] == {"score": "sigmoid(logit)", "rule": "score >= threshold", "groups": [],
                                         "n_group_tags": 0, "at_0.5": M.FIXED_RULE}
    assert [r["threshold"] for r in with_decision["per_tag"]] == thr.tolist()
    assert {r["decided_by"] for r in with_decision["per_tag"]} == {"threshold"}


def test_score_run_with_a_group_marks_its_tags_and_decides_by_argmax():
    y, s, thr = random_case(3, t=12)
    group = (4, 5, 6)
    y[:, group] = 0
    y[np.arange(len(y)), np.random.default_rng(0).choice(group, size=len(y))] = 1  # one value per image
    z = s[:, group] * 4
    s[:, group] = np.exp(z) / np.exp(z).sum(1, keepdims=True)  # softmax scores, as decision.scores makes
    d = Decision(thr, (group,))
    names = [f"colour=c{j}" if j in group else f"tag{j}" for j in range(12)]
    out = M.score_run(y, s, d, np.full(12, 100), tag_names=names)

    pred = s >= thr
    pred[:, group] = np.eye(3, dtype=bool)[np.argmax(s[:, group], axis=1)]  # one per image, by arg-max
    scored = np.flatnonzero(y.sum(0) > 0)
    assert out["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", labels=scored, zero_division=0))
    half = s >= 0.5
    half[:, group] = pred[:, group]  # at the fixed rule the group is still decided by arg-max
    assert out["macro_f1_at_0.5"] == pytest.approx(f1_score(y, half, average="macro", labels=scored, zero_division=0))
    rows = out["per_tag"]
    assert [r["decided_by"] for r in rows] == ["argmax:colour" if j in group else "threshold" for j in range(12)]
    assert [r["threshold"] for r in rows] == [None if j in group else thr[j] for j in range(12)]
    assert sum(rows[j]["predicted"] for j in group) == len(y)
    assert out["threshold_rule"] == M.GROUP_RULE and out["decision"]["groups"] == ["colour"]
    assert out["decision"]["n_group_tags"] == 3 and out["decision"]["score"].startswith("softmax")
    assert M.group_names(d, names, {"colour=c4": "hue", "colour=c5": "hue", "colour=c6": "hue"}) == ["hue"]
    assert M.group_names(d) == ["group0"]
    json.dumps(out, allow_nan=False)
