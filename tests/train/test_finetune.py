"""Fine-tune: the frozen-trunk cache is exact, resume continues where it stopped, NaN stops the run."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bakeoff.train.data.cache import load_cache
from bakeoff.train.data.dataset import load_dataset
from bakeoff.train.features import FeatureStore, extract
from bakeoff.train.finetune import (
    FinetuneConfig,
    ImageSource,
    TrainingDiverged,
    TrunkSource,
    TunedPart,
    ViewTrunkSource,
    batch_loss,
    finetune,
    load_resume,
    make_optimizer,
    save_resume,
    set_train_mode,
    trainable_parameters,
)
from bakeoff.train.losses import MultiLabelLoss
from bakeoff.train.preprocess import Preprocess
from bakeoff.train.registry import TaggingModel, get_spec
from bakeoff.train.weights import create_backbone
from tests.conftest import TINY_CACHE, TINY_MODELS


def _setup(tiny_data, family="dinov2"):
    name, size = TINY_MODELS[family]
    spec = get_spec(family, name, size)
    backbone, _ = create_backbone(spec, "random", seed=0)
    ds = load_dataset(tiny_data)
    model = TaggingModel(backbone, len(ds.taxonomy))
    prep = Preprocess(spec.img_size, spec.mean, spec.std)
    images = load_cache(ds, TINY_CACHE)
    rows = ds.split_indices("train")
    return model, ds, prep, images, rows, ds.labels()[rows]


@pytest.mark.parametrize("family", ["cnn", "dinov2", "clip"])
def test_cached_and_uncached_paths_give_the_same_loss(tiny_data, tmp_path, family):
    model, ds, prep, images, rows, y = _setup(tiny_data, family)
    store = FeatureStore(tmp_path, "trunk32")
    trunk = extract(model.backbone, prep, images, rows, store, ("trunk",), batch_size=16, dtype="float32",
                    progress=False)["trunk"]
    pos = np.array([5, 0, 17, 3, 9, 11, 2, 30])
    set_train_mode(model)
    model.eval()  # no dropout/BatchNorm-batch-statistics randomness between the two forward passes
    loss_fn = MultiLabelLoss("bce")
    yb = torch.as_tensor(y[pos], dtype=torch.float32)
    cached = batch_loss(TunedPart(model), TrunkSource(trunk, torch.device("cpu"))(pos), yb, loss_fn, amp=True)
    uncached = batch_loss(TunedPart(model), ImageSource(model, images, rows, prep)(pos), yb, loss_fn, amp=True)
    torch.testing.assert_close(cached, uncached, rtol=1e-6, atol=1e-6)
    # the default float16 cache differs only by float16 rounding of the trunk activations
    trunk16 = extract(model.backbone, prep, images, rows, FeatureStore(tmp_path, "trunk16"), ("trunk",),
                      batch_size=16, progress=False)["trunk"]
    half = batch_loss(TunedPart(model), TrunkSource(trunk16, torch.device("cpu"))(pos), yb, loss_fn, amp=True)
    assert abs(half.item() - cached.item()) < 1e-2 * abs(cached.item())


def test_only_last_blocks_and_head_are_trainable(tiny_data):
    model, *_ = _setup(tiny_data)
    params = trainable_parameters(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if any(p is q for q in params)}
    assert any(n.startswith("head.") for n in trainable)
    assert all(n.startswith(("head.", "backbone.model.norm.", "backbone.model.blocks.8.", "backbone.model.blocks.9.",
                             "backbone.model.blocks.10.", "backbone.model.blocks.11.")) for n in trainable)
    assert not any("patch_embed" in n or "blocks.7." in n for n in trainable)


def _run(tiny_data, tmp_path, resume_dir, stop=None, resume=False):
    model, ds, prep, images, rows, y = _setup(tiny_data, "cnn")
    val_rows = ds.split_indices("val")
    cfg = FinetuneConfig(epochs=3, batch_size=32, patience=5)
    src = ImageSource(model, images, rows, prep)
    val = ImageSource(model, images, val_rows, prep)
    out = finetune(model, src, y, val, ds.labels()[val_rows], cfg, resume_dir, resume=resume, progress=False,
                   stop_after_epochs=stop)
    return model, out


def test_resume_after_interrupt_matches_an_uninterrupted_run(tiny_data, tmp_path):
    full, summary = _run(tiny_data, tmp_path, tmp_path / "a")
    assert summary["finished"] and summary["epochs"] == 3
    _, partial = _run(tiny_data, tmp_path, tmp_path / "b", stop=1)
    assert not partial["finished"] and partial["epochs"] == 1
    resumed, summary_b = _run(tiny_data, tmp_path, tmp_path / "b", resume=True)
    assert summary_b["finished"] and summary_b["epochs"] == 3
    assert summary_b["best_epoch"] == summary["best_epoch"]
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)
    # the optimizer ends where the uninterrupted run's does: same step counts, same AdamW moments
    a, b = (json.loads((tmp_path / d / "resume.json").read_text()) for d in "ab")
    assert a["opt_steps"] == b["opt_steps"] and a["step"] == b["step"] and len(a["opt_steps"]) > 0
    moments_a, moments_b = (load_file(str(tmp_path / d / "resume.safetensors")) for d in "ab")
    for k in (k for k in moments_a if k.startswith("opt.")):
        torch.testing.assert_close(moments_a[k], moments_b[k], rtol=1e-4, atol=1e-6, msg=k)


def test_resume_restores_the_optimizer_on_the_parameters_device_and_dtype(tiny_data, tmp_path):
    """load_resume reads the file to CPU; the AdamW state must follow each parameter (to its GPU when resuming
    there; here, to float64 parameters: the same casting path, Optimizer.load_state_dict), and keep its step."""
    model, _, prep, images, rows, y = _setup(tiny_data, "cnn")
    cfg = FinetuneConfig(batch_size=8, amp=False)
    src = ImageSource(model, images, rows, prep, amp=False)
    loss_fn = MultiLabelLoss("bce")
    yb = torch.as_tensor(y[:8], dtype=torch.float32)
    opt = make_optimizer(model, cfg)
    set_train_mode(model)
    for _ in range(2):
        opt.zero_grad()
        batch_loss(TunedPart(model), src(np.arange(8)), yb, loss_fn, amp=False).backward()
        opt.step()
    save_resume(tmp_path, model, opt, {"epoch": 1}, {})

    other, *_ = _setup(tiny_data, "cnn")
    other = other.double()  # parameters unlike the (float32, CPU) tensors in the file
    opt2 = make_optimizer(other, cfg)
    state, _ = load_resume(tmp_path, other, opt2)
    assert state == {"epoch": 1}
    names = {id(p): n for n, p in other.named_parameters()}
    saved_names = {id(p): n for n, p in model.named_parameters()}
    saved = {saved_names[id(p)]: st for p, st in opt.state.items()}
    restored = 0
    for group in opt2.param_groups:
        for p in group["params"]:
            st = opt2.state[p]
            for key in ("exp_avg", "exp_avg_sq"):
                assert st[key].dtype == p.dtype == torch.float64 and st[key].device == p.device, (names[id(p)], key)
                torch.testing.assert_close(st[key], saved[names[id(p)]][key].double())
            assert float(st["step"]) == float(saved[names[id(p)]]["step"]) == 2.0
            restored += 1
    assert restored == len(trainable_parameters(other)) > 0
    # and AdamW steps on from there (mixed float32 state and float64 gradients would fail in its update)
    opt2.zero_grad()  # the same random-init stem (seed 0), so the float32 model's trunk activations, in float64
    batch_loss(TunedPart(other), (src(np.arange(8))[0].double(), None), yb.double(), loss_fn, amp=False).backward()
    opt2.step()
    assert all(float(opt2.state[p]["step"]) == 3.0 for g in opt2.param_groups for p in g["params"])


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_data, tmp_path):
    model, ds, prep, images, rows, y = _setup(tiny_data, "cnn")
    val_rows = ds.split_indices("val")
    cfg = FinetuneConfig(epochs=2, batch_size=32)
    src = ImageSource(model, images, rows, prep)
    val = ImageSource(model, images, val_rows, prep)
    finetune(model, src, y, val, ds.labels()[val_rows], cfg, tmp_path, progress=False, stop_after_epochs=1)
    saved = (tmp_path / "resume.safetensors").read_bytes()

    def poisoned(pos):
        return torch.full_like(src(pos)[0], float("nan")), None

    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        finetune(model, poisoned, y, val, ds.labels()[val_rows], cfg, tmp_path, resume=True, progress=False)
    assert (tmp_path / "resume.safetensors").read_bytes() == saved


def test_fp32_depthwise_on_cpu_only_for_the_block():
    from bakeoff.train.finetune import fp32_depthwise

    dw, pw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.nn.Conv2d(8, 4, 1)
    block = torch.nn.Sequential(dw, pw)
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        plain, plain_dw = block(x), dw(x)
        with fp32_depthwise([block], torch.device("cpu")), torch.autocast("cpu", dtype=torch.bfloat16):
            assert dw(x).dtype == torch.float32 and pw(x).dtype == torch.bfloat16  # only the depthwise one
            torch.testing.assert_close(dw(x), plain_dw)  # the fp32 convolution itself
        with fp32_depthwise([block], torch.device("meta")), torch.autocast("cpu", dtype=torch.bfloat16):
            assert dw(x).dtype == torch.bfloat16  # another device: untouched
        assert "forward" not in vars(dw)  # restored after the block
        torch.testing.assert_close(block(x), plain)


def test_view_trunk_source_shows_each_image_as_one_seeded_view_per_epoch():
    n = 300
    trunks = [np.stack([np.full((2, 1, 1), 10 * v + r % 7, np.float16) for r in range(n)]) for v in range(3)]
    sides = [np.stack([np.full(3, 1000 * v + r, np.float32) for r in range(n)]) for v in range(3)]
    src = ViewTrunkSource(trunks, torch.device("cpu"), seed=4)
    trunk = lambda s, p: s(p)[0][:, 0, 0, 0]  # noqa: E731
    pos = np.array([5, 0, 299, 5])
    assert torch.equal(trunk(src, pos), torch.tensor([5.0, 0, 5, 5]))  # before any epoch: the originals
    assert src(pos)[1] is None  # no side input
    src.set_epoch(1)
    views = trunk(src, np.arange(n)).numpy() // 10
    assert all(70 <= c <= 130 for c in np.bincount(views.astype(int), minlength=3))  # about 1/3 each
    got = trunk(src, pos)  # any order, duplicates: each image as its drawn view, same rows
    np.testing.assert_array_equal(got.numpy(), [10 * views[p] + p % 7 for p in pos])
    again = ViewTrunkSource(trunks, torch.device("cpu"), seed=4)
    again.set_epoch(1)  # a resumed run (or another rank) draws the same
    assert torch.equal(trunk(again, np.arange(n)), trunk(src, np.arange(n)))
    # with side inputs (each view's colour histograms), an image's side input is that of the view it shows
    with_sides = ViewTrunkSource(trunks, torch.device("cpu"), seed=4, sides=sides)
    with_sides.set_epoch(1)
    h, side = with_sides(pos)
    torch.testing.assert_close(h[:, 0, 0, 0], got)
    np.testing.assert_array_equal(side[:, 0].numpy(), [1000 * views[p] + p for p in pos])
    src.set_epoch(2)
    assert not np.array_equal(trunk(src, np.arange(n)).numpy() // 10, views)
    assert src(np.arange(0))[0].shape == (0, 2, 1, 1)  # an empty slice (a rank with no rows of a batch)
    assert with_sides(np.arange(0))[1].shape == (0, 3)
    with pytest.raises(ValueError, match="same rows"):
        ViewTrunkSource([trunks[0], trunks[1][:10]], torch.device("cpu"))
