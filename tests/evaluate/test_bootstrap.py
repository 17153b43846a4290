"""bakeoff.evaluate.bootstrap: the vectorised resampling equals the naive loop; intervals and paired comparisons."""
from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pytest

from bakeoff.evaluate import bootstrap as B
from bakeoff.evaluate.metrics import f1_from_counts, f1_per_tag, macro_f1, per_tag_counts


def case(seed: int = 0, n: int = 120, t: int = 25) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, t)) < rng.choice([0.02, 0.1, 0.4], size=t)).astype(np.uint8)
    y[:, 0] = 0  # never positive
    y[:, 1] = 0
    y[7, 1] = 1  # a single positive: absent from about a third of the resamples
    pred = np.where(rng.random((n, t)) < 0.8, y, 1 - y)
    return y, pred


def test_indices_are_seeded_and_in_range():
    idx = B.bootstrap_indices(50, n_resamples=30, seed=3)
    assert idx.shape == (30, 50) and idx.min() >= 0 and idx.max() < 50
    np.testing.assert_array_equal(idx, B.bootstrap_indices(50, n_resamples=30, seed=3))
    assert not np.array_equal(idx, B.bootstrap_indices(50, n_resamples=30, seed=4))


def test_resample_weights_count_multiplicities():
    idx = B.bootstrap_indices(40, n_resamples=6, seed=1)
    w = B.resample_weights(idx, 40)
    assert w.dtype == np.float32 and w.shape == (6, 40)
    for r in range(6):
        np.testing.assert_array_equal(w[r], np.bincount(idx[r], minlength=40))
    with pytest.raises(ValueError, match=r"shape \(R, 41\)"):
        B.resample_weights(idx, 41)
    with pytest.raises(ValueError, match="must lie in"):
        B.resample_weights(idx + 5, 40)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("masked", [False, True])
def test_vectorised_equals_naive_loop(seed, masked):
    y, pred = case(seed)
    mask = (np.arange(y.shape[1]) % 3 != 2) if masked else None
    idx = B.bootstrap_indices(len(y), n_resamples=40, seed=seed)
    fast = B.bootstrap_macro_f1(y, pred, idx, tags_mask=mask)
    keep = np.ones(y.shape[1], bool) if mask is None else mask
    scored = keep & y.any(0)
    _, _, full = f1_per_tag(y, pred)

    def naive_one(rows):  # fixed tag set; a tag without positives in the resample keeps its full-test F1
        _, _, f1 = f1_per_tag(y[rows], pred[rows])
        present = y[rows].any(0)
        return np.where(present, f1, full)[scored].mean()

    naive = np.array([naive_one(i) for i in idx])
    np.testing.assert_allclose(fast, naive, rtol=1e-6)
    # the single-positive tag is missing from some resamples: those resamples still average the same tags
    assert 0 < (~np.isin(idx, 7)).all(axis=1).sum() < len(idx)


def test_bootstrap_centres_on_the_point_estimate_with_rare_tags():
    # 20 common tags predicted perfectly (F1 = 1) and 20 single-positive tags never predicted (F1 = 0):
    # point estimate 0.5. Dropping a rare tag from the resamples that miss it would push them towards 0.6.
    n = 300
    y = np.zeros((n, 40), dtype=np.uint8)
    y[:, :20] = np.random.default_rng(0).random((n, 20)) < 0.3
    y[np.arange(20), np.arange(20, 40)] = 1
    pred = y.copy()
    pred[:, 20:] = 0
    samples = B.bootstrap_macro_f1(y, pred, B.bootstrap_indices(n, 300, seed=0))
    lo, hi = B.bca_interval(samples, 0.5, B.jackknife_macro_f1(y, pred))
    assert macro_f1(y, pred)[0] == 0.5 and lo <= 0.5 <= hi and abs(samples.mean() - 0.5) < 0.01


def test_identity_resample_is_the_point_estimate():
    y, pred = case(2)
    idx = np.arange(len(y))[None, :]
    assert B.bootstrap_macro_f1(y, pred, idx)[0] == pytest.approx(macro_f1(y, pred)[0], rel=1e-12)


def test_no_scored_tag_is_nan():
    y = np.zeros((4, 2), dtype=int)
    idx = np.array([[0, 1, 2, 3], [1, 1, 2, 3]])
    assert np.isnan(B.bootstrap_macro_f1(y, y, idx)).all()


def test_bca_is_the_percentile_interval_without_bias_or_skew():
    samples = np.arange(1001) / 1000
    assert B.bca_interval(samples, 0.5, np.zeros(10)) == pytest.approx((0.025, 0.975))
    assert B.bca_interval(samples, 0.5, np.zeros(10), level=0.5) == pytest.approx((0.25, 0.75))
    assert B.bca_interval(np.append(samples, np.nan), 0.5, np.zeros(10)) == pytest.approx((0.025, 0.975))
    assert np.isnan(B.bca_interval(np.full(3, np.nan), 0.5, np.zeros(3))).all()
    with pytest.raises(ValueError, match="level"):
        B.bca_interval(samples, 0.5, np.zeros(10), level=95)


def test_bca_corrects_bias_and_skew_by_hand():
    samples = np.arange(1001) / 1000  # uniform on [0, 1]: percentile q is q / 100
    # 70% of the resamples lie below the observed 0.6995: z0 = Phi^-1(0.7); skewed jackknife: a != 0
    jack = np.array([0.0, 0.0, 0.0, 1.0])
    d = jack.mean() - jack
    a = np.sum(d ** 3) / (6 * np.sum(d ** 2) ** 1.5)
    n = NormalDist()
    z0 = n.inv_cdf(700.5 / 1001)  # 700 below, 1 equal
    want = [n.cdf(z0 + (z0 + z) / (1 - a * (z0 + z))) for z in (n.inv_cdf(0.025), n.inv_cdf(0.975))]
    assert a != 0 and B.bca_interval(samples, 0.7, jack) == pytest.approx(tuple(want), abs=1e-9)


def test_jackknife_is_leave_one_image_out_with_the_bootstrap_tag_rule():
    rng = np.random.default_rng(3)
    y = (rng.random((30, 6)) < 0.3).astype(np.uint8)
    y[:, 5] = 0
    y[7, 5] = 1  # a single-positive tag: left out, it keeps its full-test F1 (the bootstrap's rule)
    y[:, 4] = 0  # never positive: not scored
    pred = (rng.random((30, 6)) < 0.3).astype(np.uint8)
    pred[7, 5] = 1
    mask = np.array([1, 1, 0, 1, 1, 1], dtype=bool)
    full = {t: macro_f1(y[:, [t]], pred[:, [t]])[0] for t in (0, 1, 3, 5)}
    want = []
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        f1s = [macro_f1(y[keep][:, [t]], pred[keep][:, [t]])[0] if y[keep, t].any() else full[t] for t in full]
        want.append(np.mean(f1s))
    assert B.jackknife_macro_f1(y, pred, mask) == pytest.approx(want, rel=1e-6)


def test_paired_bootstrap():
    y, pred = case(0, n=200)
    idx = B.bootstrap_indices(len(y), n_resamples=200)
    same = B.paired_bootstrap(y, pred, pred, idx)
    assert same["mean_diff"] == 0 and same["ci"] == [0, 0] and same["p_a_better"] == 0.5

    better = B.paired_bootstrap(y, y, pred, idx)  # perfect predictions vs noisy ones
    assert better["p_a_better"] == 1.0 and better["ci"][0] > 0 and better["n_resamples"] == 200
    assert better["observed_diff"] == pytest.approx(better["macro_f1_a"] - better["macro_f1_b"])
    assert better["macro_f1_a"] == 1.0

    rng = np.random.default_rng(5)
    other = np.where(rng.random(y.shape) < 0.8, y, 1 - y)
    ab, ba = B.paired_bootstrap(y, pred, other, idx), B.paired_bootstrap(y, other, pred, idx)
    assert ab["mean_diff"] == pytest.approx(-ba["mean_diff"])
    assert ab["p_a_better"] == pytest.approx(1 - ba["p_a_better"])
    assert ab["ci"] == pytest.approx([-ba["ci"][1], -ba["ci"][0]])
    assert ab["ci"][0] <= ab["mean_diff"] <= ab["ci"][1]


def test_bca_agrees_with_scipy_bootstrap_bca():
    """Same statistic (the fixed-tag-set macro-F1), scipy.stats.bootstrap's own resamples and jackknife."""
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    n, t = 400, 30
    y = (rng.random((n, t)) < rng.uniform(0.005, 0.05, t)).astype(np.uint8)  # rare tags: a skewed statistic
    y[0] = 1
    pred = np.where(rng.random((n, t)) < 0.9, y, 1 - y).astype(np.uint8)
    counts = [(y & pred).astype(float), pred.astype(float), y.astype(float)]
    full = f1_from_counts(*per_tag_counts(y.astype(bool), pred.astype(bool)))

    def statistic(rows, axis=-1):  # rows: (..., m) row indices, any m (the jackknife leaves one out)
        w = np.apply_along_axis(np.bincount, -1, np.atleast_2d(rows), minlength=n).astype(float)
        tp, p, pos = (w @ c for c in counts)
        f1 = np.where(pos > 0, f1_from_counts(tp, p - tp, pos - tp), full).mean(-1)
        return f1 if np.ndim(rows) > 1 else f1[0]

    theirs = stats.bootstrap((np.arange(n),), statistic, vectorized=True, method="BCa", n_resamples=4000,
                             random_state=0).confidence_interval
    ours = B.bca_interval(B.bootstrap_macro_f1(y, pred, B.bootstrap_indices(n, 4000, seed=0)),
                          macro_f1(y, pred)[0], B.jackknife_macro_f1(y, pred))
    # within the Monte Carlo noise of 4,000 resamples; the plain percentile interval is >= 0.01 off at both ends
    assert ours == pytest.approx((theirs.low, theirs.high), abs=0.005)
