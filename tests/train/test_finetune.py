"""Fine-tune: the frozen-trunk cache is exact, resume continues where it stopped, NaN stops the run."""
import numpy as np
import pytest
import torch

from tests.conftest import TINY_CACHE, TINY_MODELS
from train.data.cache import load_cache
from train.data.dataset import load_dataset
from train.features import FeatureStore, extract
from train.finetune import (
    FinetuneConfig,
    ImageSource,
    TrainingDiverged,
    TrunkSource,
    batch_loss,
    finetune,
    set_train_mode,
    trainable_parameters,
)
from train.losses import MultiLabelLoss
from train.preprocess import Preprocess
from train.registry import TaggingModel, get_spec
from train.weights import create_backbone


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
    cached = batch_loss(model, TrunkSource(trunk, torch.device("cpu"))(pos), yb, loss_fn, amp=True)
    uncached = batch_loss(model, ImageSource(model, images, rows, prep)(pos), yb, loss_fn, amp=True)
    torch.testing.assert_close(cached, uncached, rtol=1e-6, atol=1e-6)
    # the default float16 cache differs only by float16 rounding of the trunk activations
    trunk16 = extract(model.backbone, prep, images, rows, FeatureStore(tmp_path, "trunk16"), ("trunk",),
                      batch_size=16, progress=False)["trunk"]
    half = batch_loss(model, TrunkSource(trunk16, torch.device("cpu"))(pos), yb, loss_fn, amp=True)
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


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_data, tmp_path):
    model, ds, prep, images, rows, y = _setup(tiny_data, "cnn")
    val_rows = ds.split_indices("val")
    cfg = FinetuneConfig(epochs=2, batch_size=32)
    src = ImageSource(model, images, rows, prep)
    val = ImageSource(model, images, val_rows, prep)
    finetune(model, src, y, val, ds.labels()[val_rows], cfg, tmp_path, progress=False, stop_after_epochs=1)
    saved = (tmp_path / "resume.safetensors").read_bytes()

    def poisoned(pos):
        return torch.full_like(src(pos), float("nan"))

    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        finetune(model, poisoned, y, val, ds.labels()[val_rows], cfg, tmp_path, resume=True, progress=False)
    assert (tmp_path / "resume.safetensors").read_bytes() == saved
