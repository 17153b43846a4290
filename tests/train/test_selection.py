"""Validation-only choices: threshold shrinkage, cross-fitting, tau; the probe's sweep (its selection, loss,
optimiser, seed and folded head)."""
import numpy as np
import pytest
import torch

from bakeoff.train.heads import HeadLoss, tag_scores
from bakeoff.train.losses import class_balanced_pos_weight
from bakeoff.train.probe import ProbeConfig, _AdamW, _SweepLoss, train_probe
from bakeoff.train.selection import crossfit_thresholds, fit_decision, folds, macro_f1, select_tau
from bakeoff.train.thresholds import fit_shrunk_thresholds, fit_thresholds, pooled_threshold
from bakeoff.train.valmetrics import batched_macro_ap


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


def _grouped_problem(seed: int = 5, n: int = 500, d: int = 12):
    """Two single-valued fields whose tags are interleaved with free tags (0, 3, 5 / 1, 4; free 2, 6)."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, d)) * rng.uniform(0.5, 4, d) + rng.normal(size=d) * 3).astype(np.float32)  # raw scale
    y = np.zeros((n, 7), dtype=np.uint8)
    for field, first in (([0, 3, 5], 0), ([1, 4], 3)):  # a field's value: the arg-max of its features + noise
        noisy = x[:, first:first + len(field)] + rng.gumbel(size=(n, len(field)))
        y[np.arange(n), np.array(field)[noisy.argmax(1)]] = 1
    y[:, [2, 6]] = rng.random((n, 2)) < 1 / (1 + np.exp(-x[:, [6, 7]]))
    y[:40, [1, 4]] = 0  # some images have no value in the second field
    return x, y, [[0, 3, 5], [1, 4]]


@pytest.mark.parametrize("kind", ["bce", "balanced", "asl"])
@pytest.mark.parametrize("grouped", [True, False])
def test_sweep_loss_is_the_head_loss_with_its_gradient(kind, grouped):
    _, y, groups = _grouped_problem()
    y = torch.as_tensor(y[:64])
    pw = class_balanced_pos_weight(y.sum(0).numpy(), len(y)) if kind == "balanced" else None
    loss = HeadLoss(groups if grouped else (), kind, pw, n_tags=7)
    fast = _SweepLoss(loss, 7, 3)
    z = torch.randn(3 * 7, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)  # the layout
    want = loss(z[fast.rows].transpose(1, 2), y.float())  # as S x B x T logits
    want_grad, = torch.autograd.grad(want.sum(), z)
    torch.testing.assert_close(fast.value(z.detach(), y), want)
    torch.testing.assert_close(fast.gradient(z.detach(), y), want_grad)


def test_sweep_optimiser_is_adamw_with_a_decay_per_column():
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(6, 2, generator=g), torch.randn(2, generator=g)
    ours = _AdamW([w.clone(), b.clone()], [torch.tensor([0.5, 20.0]), None])
    cols = [w[:, :1].clone().requires_grad_(), w[:, 1:].clone().requires_grad_(), b.clone().requires_grad_()]
    ref = torch.optim.AdamW([{"params": [cols[0]], "weight_decay": 0.5}, {"params": [cols[1]], "weight_decay": 20.0},
                             {"params": [cols[2]], "weight_decay": 0.0}])
    for step in range(10):
        lr = 0.01 / (1 + step)
        grads = [torch.randn(6, 2, generator=g), torch.randn(2, generator=g)]
        ours.step(grads, lr)
        for group, grad in zip(ref.param_groups, (grads[0][:, :1], grads[0][:, 1:], grads[1])):
            group["lr"], group["params"][0].grad = lr, grad
        ref.step()
    torch.testing.assert_close(ours.params[0], torch.cat(cols[:2], 1).detach())
    torch.testing.assert_close(ours.params[1], cols[2].detach())


def test_folded_head_scores_raw_features_as_the_sweep_scored_them():
    x, y, groups = _grouped_problem()
    cfg = ProbeConfig(weight_decays=(1e-3, 0.1, 3.0), epochs=4, batch_size=100, eval_every=1, lr=3e-2)
    res = train_probe(x[:350], y[:350], x[350:], y[350:], cfg, HeadLoss(groups, n_tags=7))
    with torch.no_grad():
        scores = tag_scores(res.head(torch.as_tensor(x[350:]))[None], groups)
    assert batched_macro_ap(torch.as_tensor(y[350:]), scores)[0] == pytest.approx(res.best["val_map"], abs=1e-6)
    assert res.best["val_map"] > 0.7  # the fields are learnt, tags in their own order


def test_head_is_its_best_epoch_not_its_last():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(380, 300)).astype(np.float32)  # 80 training images, 300 dimensions: it overfits
    y = (rng.random((380, 4)) < 1 / (1 + np.exp(1 - 2 * x[:, :4]))).astype(np.uint8)
    cfg = ProbeConfig(weight_decays=(1e-3,), epochs=10, batch_size=40, eval_every=1, lr=3e-2)
    res = train_probe(x[:80], y[:80], x[80:], y[80:], cfg)
    last = res.history[-1]["val_map"]["wd=0.001"]
    assert res.best["epoch"] < cfg.epochs and res.best["val_map"] > last + 1e-3
    with torch.no_grad():
        scores = torch.sigmoid(res.head(torch.as_tensor(x[80:])))[None]
    assert batched_macro_ap(torch.as_tensor(y[80:]), scores)[0] == pytest.approx(res.best["val_map"], abs=1e-6)


def test_shared_scale_keeps_a_histogram_block_on_one_scale():
    """Columns are standardised one by one, so rescaling a column changes nothing; the columns of ``shared_scale``
    share one scale (a histogram bin that is rarely non-zero is not blown up), so rescaling one of them does."""
    x, y, groups = _grouped_problem()
    rng = np.random.default_rng(3)
    hist = np.zeros((len(x), 4), np.float32)
    hist[:, 0] = rng.random(len(x))
    hist[rng.random(len(x)) < 0.02, 3] = 0.05  # a rare, small bin
    cfg = ProbeConfig(weight_decays=(0.1,), epochs=3, batch_size=100, eval_every=1, lr=3e-2, amp=False)

    def val_logits(h: np.ndarray, shared: slice | None) -> torch.Tensor:
        xx = np.concatenate([x, h], 1)
        res = train_probe(xx[:350], y[:350], xx[350:], y[350:], cfg, HeadLoss(groups, n_tags=7), shared_scale=shared)
        with torch.no_grad():
            return res.head(torch.as_tensor(xx[350:]))

    scaled = hist * np.array([1, 1, 1, 100], np.float32)
    block = slice(x.shape[1], None)
    torch.testing.assert_close(val_logits(scaled, None), val_logits(hist, None), atol=2e-3, rtol=2e-3)
    assert not torch.allclose(val_logits(scaled, block), val_logits(hist, block), atol=2e-2)


def test_each_setting_trains_as_if_alone():
    """The settings share batches, not weights: each one's decay, bias and best epoch stay its own."""
    x, y, groups = _grouped_problem()

    def sweep(decays: tuple[float, ...]) -> list[dict]:
        cfg = ProbeConfig(weight_decays=decays, epochs=3, batch_size=100, eval_every=1, lr=3e-2)
        return train_probe(x[:350], y[:350], x[350:], y[350:], cfg, HeadLoss(groups, n_tags=7)).sweep

    alone = sweep((1e-3,)) + sweep((3.0,))
    for joint, single in zip(sweep((1e-3, 3.0)), alone, strict=True):
        assert joint["epoch"] == single["epoch"] and joint["val_map"] == pytest.approx(single["val_map"], abs=1e-4)


def test_probe_is_deterministic_given_its_seed():
    x, y, groups = _grouped_problem()
    cfg = ProbeConfig(weight_decays=(1e-3, 1.0), epochs=2, batch_size=128, eval_every=1)
    runs = [train_probe(x[:350], y[:350], x[350:], y[350:], c, HeadLoss(groups, n_tags=7))
            for c in (cfg, cfg, ProbeConfig(**{**vars(cfg), "seed": 1}))]
    assert runs[0].sweep == runs[1].sweep and runs[0].history == runs[1].history
    torch.testing.assert_close(runs[0].head.state_dict(), runs[1].head.state_dict(), rtol=0, atol=0)
    assert not torch.equal(runs[0].head.weight, runs[2].head.weight)


def test_probe_refuses_a_loss_its_sweep_loss_does_not_match():
    class Doubled(HeadLoss):
        def forward(self, logits, targets):
            return 2 * super().forward(logits, targets)

    x, y, groups = _grouped_problem()
    with pytest.raises(RuntimeError, match="_SweepLoss"):
        train_probe(x[:350], y[:350], x[350:], y[350:], ProbeConfig(epochs=1), Doubled(groups, n_tags=7))


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
    from bakeoff.train.strategies import BLOCK_LR, finetune_lrs

    for trials in (2, 3, 8):
        grid = finetune_lrs("cnn", None, trials)
        assert len(grid) == trials and BLOCK_LR["cnn"] in grid and grid == tuple(sorted(grid))
    assert finetune_lrs("cnn", 1e-4, 8).count(1e-4) == 1 and finetune_lrs("dinov2", None, 1) == (BLOCK_LR["dinov2"],)
