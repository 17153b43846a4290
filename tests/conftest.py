"""Shared fixtures: a tiny synthetic dataset (prepared + cached) and tiny runs of each family."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_WEIGHTS = SHARED / "weights"
FASHION = SHARED / "data" / "fashion-product-images-small"
TINY_CACHE = 32
# Small real architectures at a tiny input size, random init: fast enough for CI on 2 cores.
TINY_MODELS = {"cnn": ("mobilenetv2_100", 32), "dinov2": ("vit_small_patch14_dinov2", 28), "clip": ("ViT-S-32", 32)}


def needs_shared(path: Path = SHARED):
    return pytest.mark.skipif(not path.exists(), reason=f"{path} is absent (it lies beside the repo as ../shared)")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """240 synthetic images, 30 tags, 32 px; split 60% / 20% / 20%; image cache at 32 px."""
    from bakeoff.train.data.cache import build_cache
    from bakeoff.train.data.dataset import load_dataset
    from bakeoff.train.data.splits import prepare
    from bakeoff.train.data.synth import generate

    root = tmp_path_factory.mktemp("tiny") / "data"
    generate(root, n_images=240, n_tags=30, seed=0, image_size=32, workers=1)
    prepare(root, test_size=0.2, val_fraction=0.25, seed=0)
    build_cache(load_dataset(root), TINY_CACHE, workers=1, progress=False)
    return root


def tiny_options(family: str, strategy: str, **kw):
    from bakeoff.train.probe import ProbeConfig
    from bakeoff.train.run import RunOptions

    name, size = TINY_MODELS[family]
    base = dict(family=family, strategy=strategy, model=name, weights="random", image_size=size, cache_size=TINY_CACHE,
                epochs=2, batch_size=32, device="cpu", progress=False, trials=2,
                probe=ProbeConfig(lr=3e-3, epochs=3, batch_size=64, eval_every=1))
    return RunOptions(**{**base, **kw})


@pytest.fixture(scope="session")
def tiny_runs(tiny_data, tmp_path_factory) -> Path:
    """cnn-probe and cnn-ft (random-init MobileNetV2 at 32 px) trained on ``tiny_data``."""
    from bakeoff.train.run import train_pair

    out = tmp_path_factory.mktemp("runs")
    for strategy in ("probe", "ft"):
        train_pair(tiny_data, out, tiny_options("cnn", strategy))
    return out


@pytest.fixture(autouse=True)
def restore_log_level():
    """A stage CLI sets the ``bakeoff`` logger's level (-v / -q): each test starts from the level it found."""
    logger = logging.getLogger("bakeoff")
    before = logger.level
    yield
    logger.setLevel(before)


@pytest.fixture
def bars(monkeypatch):
    """Every progress bar the feedback helpers make, recorded (tests.progress.RecordingBar)."""
    from tests.progress import RecordingBar

    RecordingBar.made = []
    monkeypatch.setattr("bakeoff.common.log.tqdm", RecordingBar)
    return RecordingBar.made
