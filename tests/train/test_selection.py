"""Validation-only choices: threshold shrinkage, cross-fitting, tau, and the probe's sweep selection."""
import numpy as np
import pytest

from train.probe import ProbeConfig, train_probe
from train.selection import crossfit_thresholds, fit_decision, folds, macro_f1, select_tau
from train.thresholds import fit_shrunk_thresholds, fit_thresholds, pooled_threshold


def test_shrinkage_pulls_a_one_positive_tag_to_its_bucket():
    rng = np.random.default_rng(0)
    y = (rng.random((400, 4)) < 0.3).astype(np.uint8)
    s = np.clip(y * 0.4 + rng.random((400, 4)) * 0.6, 0, 1)
    y[:, 3] = 0
    y[7, 3] = 1  # tag 3: one validation positive
    s[7, 3] = 0.95
    buckets = np.zeros(4, dtype=int)
    own = fit_thresholds(y, s)
    tb = pooled_threshold(y[:, :4], s[:, :4])
    for k in (1.0, 10.0):
        t = fit_shrunk_thresholds(y, s, buckets, k)
        assert t[3] == pytest.approx((own[3] + k * tb) / (1 + k))
    np.testing.assert_array_equal(fit_shrunk_thresholds(y, s, buckets, 0.0), own)
    # a tag with many positives barely moves
    many = fit_shrunk_thresholds(y, s, buckets, 3.0)
    assert abs(many[0] - own[0]) < abs(many[3] - own[3])


def test_crossfit_thresholds_never_see_their_own_fold():
    rng = np.random.default_rng(1)
    y = (rng.random((200, 3)) < 0.4).astype(np.uint8)
    s = rng.random((200, 3))
    fold = folds(200)
    base = crossfit_thresholds(y, s, np.zeros(3, int), 1.0, fold)
    y2 = y.copy()
    y2[fold == 0] = 1 - y2[fold == 0]  # change only fold 0's labels
    again = crossfit_thresholds(y2, s, np.zeros(3, int), 1.0, fold)
    np.testing.assert_array_equal(base[fold == 0], again[fold == 0])
    assert not np.array_equal(base[fold == 1], again[fold == 1])


def test_select_tau_recovers_an_under_predicted_rare_value():
    rng = np.random.default_rng(2)
    n = 600
    truth = rng.choice(3, size=n, p=[0.8, 0.15, 0.05])
    y = np.eye(3, dtype=np.uint8)[truth]
    counts = np.array([800, 150, 50])
    # a classifier that learned the prior too well: logits = signal + log prior
    z = 1.2 * y + np.log(counts / counts.sum()) + rng.normal(0, 0.6, (n, 3))
    tau, scores = select_tau(y, z, [[0, 1, 2]], np.log((counts + 1) / (counts + 1).sum()))
    assert tau > 0 and scores[f"{tau:g}"] > scores["0"]
    fitted = fit_decision(y, z, [[0, 1, 2]], counts)
    assert fitted.tau == tau and fitted.report["selection"]["val_macro_f1_crossfit"] == pytest.approx(scores[f"{tau:g}"])


def test_macro_f1_counts_tags_with_a_positive():
    y = np.array([[1, 0, 0], [0, 1, 0]])
    p = np.array([[1, 0, 1], [1, 1, 0]])
    assert macro_f1(y, p) == pytest.approx((2 / 3 + 1) / 2)
    assert np.isnan(macro_f1(y, p, np.array([False, False, True])))


def test_probe_sweep_selects_the_best_validation_setting():
    rng = np.random.default_rng(3)
    n, d, t = 300, 200, 5  # few images, many noisy dimensions: regularisation matters
    w = np.zeros((d, t))
    w[:5] = rng.normal(size=(5, t)) * 2
    x = rng.normal(size=(n + 400, d)).astype(np.float32)
    y = (rng.random((n + 400, t)) < 1 / (1 + np.exp(-(x @ w - 1)))).astype(np.uint8)
    cfg = ProbeConfig(weight_decays=(1e-4, 1e-1, 3.0, 30.0, 300.0), epochs=30, batch_size=64, eval_every=3, lr=1e-2)
    res = train_probe(x[:n], y[:n], x[n:], y[n:], cfg)
    maps = [s["val_map"] for s in res.sweep]
    assert res.best["weight_decay"] == cfg.weight_decays[int(np.argmax(maps))]
    assert res.best["on_grid_edge"] == (int(np.argmax(maps)) in (0, len(maps) - 1))
    assert max(maps) > min(maps) + 0.01  # the grid spans settings that matter


def test_free_tag_thresholds_pool_only_free_tags():
    """Group tags' softmax scores must not pull a bucket's pooled threshold (rare free tags score low)."""
    rng = np.random.default_rng(4)
    n = 400
    truth = rng.integers(0, 10, n)
    y = np.zeros((n, 14), dtype=np.uint8)
    y[np.arange(n), truth] = 1
    z = np.full((n, 14), -3.0)
    z[np.arange(n), truth] = 3.0  # a confident field of 10 values
    rare = rng.choice(n, size=12, replace=False)
    for j, rows in zip(range(10, 14), np.split(rare, 4)):
        y[rows, j] = 1
        z[rows, j] = -1.5  # rare free tags: positives at sigmoid ~0.18, negatives at ~0.05
    fitted = fit_decision(y, z, [list(range(10))], np.full(14, 20), shrink=10.0)
    free_only = fit_decision(y[:, 10:], z[:, 10:], [], np.full(4, 20), shrink=10.0)
    np.testing.assert_allclose(fitted.decision.thresholds[10:], free_only.decision.thresholds)
    assert macro_f1(y[:, 10:], fitted.decision.apply(fitted.decision.scores(z))[:, 10:]) == 1.0


def test_finetune_grid_holds_the_default_rate():
    from train.strategies import BLOCK_LR, finetune_lrs

    for trials in (2, 3, 8):
        grid = finetune_lrs("cnn", None, trials)
        assert len(grid) == trials and BLOCK_LR["cnn"] in grid and grid == tuple(sorted(grid))
    assert finetune_lrs("cnn", 1e-4, 8).count(1e-4) == 1 and finetune_lrs("dinov2", None, 1) == (BLOCK_LR["dinov2"],)
