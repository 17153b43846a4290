"""One pass per backbone: the probe's extraction also fills the fine-tune's frozen-trunk cache (share_pass)."""
import json
from pathlib import Path

import numpy as np
import pytest

from bakeoff.common import shards
from bakeoff.train import features as F
from bakeoff.train import run as R
from tests.conftest import tiny_options


def _cache(out: Path, what: str) -> Path:
    (d,) = (out / ".cache").glob(f"{what}-*")
    return d


def test_joint_pass_writes_what_each_strategy_writes_alone(tiny_runs, tiny_data, tmp_path):
    """tiny_runs trained the probe and the fine-tune each with its own pass; the joint pass gives the same bytes."""
    R.train_pair(tiny_data, tmp_path, tiny_options("cnn", "probe"), share_pass=True)
    for what, name in (("features", "features"), ("trunk", "trunk")):
        alone, joint = _cache(tiny_runs, what), _cache(tmp_path, what)
        assert joint.name == alone.name  # the same key: the fine-tune finds it
        a, b = np.asarray(shards.load(alone / name)), np.asarray(shards.load(joint / name))
        assert a.dtype == b.dtype == np.float16 and a.shape == b.shape
        assert a.tobytes() == b.tobytes()
        assert (np.load(alone / "rows.npy") == np.load(joint / "rows.npy")).all()


def _count_stem_images(monkeypatch) -> list[int]:
    """Images through the stem of every backbone create_backbone makes, one entry per call."""
    calls: list[int] = []
    create = R.create_backbone

    def counting(*a, **k):
        backbone, info = create(*a, **k)
        stem = backbone.stem
        backbone.stem = lambda x: (calls.append(len(x)), stem(x))[1]
        return backbone, info

    monkeypatch.setattr(R, "create_backbone", counting)
    return calls


def test_probe_then_finetune_is_one_pass(tiny_data, tmp_path, monkeypatch):
    calls = _count_stem_images(monkeypatch)
    probe = R.train_pair(tiny_data, tmp_path, tiny_options("cnn", "probe"), share_pass=True)
    cfg = json.loads((probe / "config.json").read_text())
    n_train, n_val = cfg["dataset"]["n_train_used"], cfg["dataset"]["n_val"]
    assert sum(calls) == 1 + n_train + n_val + n_val  # shape probe, the joint pass, the validation pass
    assert cfg["summary"]["trunk_cache"] == _cache(tmp_path, "trunk").name
    calls.clear()
    ft = R.train_pair(tiny_data, tmp_path, tiny_options("cnn", "ft"))
    assert sum(calls) == n_val  # only the validation pass: the trunk came from the probe's pass
    assert json.loads((ft / "timing.json").read_text())["caches_reused"]["trunk"] is True


def _extraction(data: Path) -> tuple:
    """(backbone, preprocess, images, train rows) for extracting from ``data`` with a random-init MobileNetV2."""
    from bakeoff.train.data.cache import load_cache
    from bakeoff.train.data.dataset import load_dataset
    from bakeoff.train.preprocess import Preprocess
    from bakeoff.train.registry import get_spec
    from bakeoff.train.weights import create_backbone

    spec = get_spec("cnn", "mobilenetv2_100", 32)
    backbone, _ = create_backbone(spec, "random", seed=0)
    ds = load_dataset(data)
    return backbone, Preprocess(spec.img_size, spec.mean, spec.std), load_cache(ds, 32), ds.split_indices("train")


def test_joint_pass_resumes_each_store_and_locks_in_path_order(tiny_data, tmp_path, monkeypatch):
    backbone, prep, images, rows = _extraction(tiny_data)
    kw = {"batch_size": 4, "progress": False}
    ref = F.extract_all(backbone, prep, images, rows, [F.Target(F.FeatureStore(tmp_path / "ref", "f"), ("features",)),
                                                       F.Target(F.FeatureStore(tmp_path / "ref", "t"), ("trunk",))], **kw)
    # the features store is half done (as an interrupted probe leaves it), the trunk store is new
    F.extract(backbone, prep, images, rows, F.FeatureStore(tmp_path, "b-features"), **kw)
    progress = tmp_path / "b-features" / "progress.json"
    state = json.loads(progress.read_text()) | {"done": 64}
    progress.write_text(json.dumps(state))
    (tmp_path / "b-features" / "meta.json").unlink()
    held = []
    hold = F.hold
    monkeypatch.setattr(F, "hold", lambda path, what, wait: (held.append(Path(path).parent.name), hold(path, what, wait))[1])
    targets = [F.Target(F.FeatureStore(tmp_path, "b-features"), ("features",)),
               F.Target(F.FeatureStore(tmp_path, "a-trunk"), ("trunk",))]
    got = F.extract_all(backbone, prep, images, rows, targets, **kw)
    assert held == ["a-trunk", "b-features"]  # a fixed order, whatever the caller's
    for r, g in zip(ref, got):
        for o in r:
            assert np.asarray(r[o]).tobytes() == np.asarray(g[o]).tobytes()
    assert all(t.store.built_here and t.store.complete for t in targets)


@pytest.mark.parametrize("flags, shared", [([], True), (["--augment"], False)])
def test_all_shares_the_probe_pass_unless_the_finetune_augments(tiny_data, tmp_path, monkeypatch, flags, shared):
    from bakeoff.train import __main__ as M

    seen = {}

    def train_pair(data, out, opts, share_pass=False):
        seen[opts.family, opts.strategy] = share_pass
        return Path(out)

    monkeypatch.setattr(M, "train_pair", train_pair)
    monkeypatch.chdir(tmp_path)
    assert M.main(["--all", "--data", str(tiny_data), "--out", str(tmp_path / "runs"), "--weights", "random",
                   "--no-progress", "-q", *flags]) == 0
    assert seen == {(fam, s): shared and s == "probe" for fam in ("cnn", "dinov2", "clip") for s in ("probe", "ft")}


def test_stores_cut_into_small_shards_read_back_the_same_and_resume(tiny_data, tmp_path, monkeypatch):
    """One pass into stores of many small shard files (every array of the pass cut at the same rows) equals one
    into single-shard stores; interrupted, it resumes where its progress record says."""
    backbone, prep, images, rows = _extraction(tiny_data)
    kw = {"batch_size": 4, "progress": False}

    def targets(root):
        return [F.Target(F.FeatureStore(root, "f"), ("features",)), F.Target(F.FeatureStore(root, "t"), ("trunk",))]

    ref = F.extract_all(backbone, prep, images, rows, targets(tmp_path / "one"), **kw)
    widest = max(ref[0]["features"].row_bytes, ref[1]["trunk"].row_bytes)
    monkeypatch.setenv(shards.ENV, str(shards.HEADER_ROOM + 20 * widest))  # 20 rows of the widest output a shard
    small = targets(tmp_path / "small")
    stopped = []
    real = F.iter_batches

    def interrupted(*a, **k):  # the pass dies in its 21st batch, as a killed process would
        for i, item in enumerate(real(*a, **k)):
            if i == 20 and not stopped:
                stopped.append(i)
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(F, "iter_batches", interrupted)
    with pytest.raises(KeyboardInterrupt):
        F.extract_all(backbone, prep, images, rows, small, **kw)
    progress = json.loads((tmp_path / "small" / "f" / "progress.json").read_text())
    assert progress["done"] == 64  # recorded every 16 batches
    got = F.extract_all(backbone, prep, images, rows, small, **kw)
    for r, g, t in zip(ref, got, small):
        (o,) = t.outputs
        assert len(r[o].files) == 1 and g[o].rows_per_shard == 20 and len(g[o].files) == -(-len(rows) // 20)
        assert max(f.stat().st_size for f in g[o].files) <= shards.shard_bytes()
        assert np.asarray(r[o]).tobytes() == np.asarray(g[o]).tobytes()
