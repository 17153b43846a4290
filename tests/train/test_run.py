"""Run directories: artifacts, atomicity, refusal paths, LP-then-FT, and the CLI's per-family flags."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY_CACHE, tiny_options
from train import run as R
from train.__main__ import per_family
from train.data.dataset import load_dataset, write_dataset


def test_complete_run_artifacts(tiny_runs):
    for strategy in ("probe", "ft"):
        d = tiny_runs / f"cnn-{strategy}"
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["status"] == "complete" and cfg["strategy"] == strategy
        assert cfg["weights"]["kind"] == "random" and "not a valid comparison" in cfg["weights"]["warning"]
        assert {"weights_load", "image_cache", "thresholds", "total"} <= set(json.loads((d / "timing.json").read_text())["seconds"])
        thr = json.loads((d / "thresholds.json").read_text())
        assert len(thr["thresholds"]) == len(cfg["taxonomy"]) and thr["fitted_on"] == "val"
        assert (d / "history.jsonl").read_text().strip()
        assert "head.weight" in load_file(str(d / "model.safetensors"))  # safetensors: no pickle involved
    ft = json.loads((tiny_runs / "cnn-ft" / "config.json").read_text())
    assert ft["summary"]["init_head"].startswith("linear probe")  # LP-then-FT
    assert ft["params_trained"] < ft["params_total"]


def test_rebuilt_model_reproduces_training_outputs(tiny_runs, tiny_data):
    ds = load_dataset(tiny_data)
    model, cfg, thr = R.load_run(tiny_runs / "cnn-probe", ds)
    state = load_file(str(tiny_runs / "cnn-probe" / "model.safetensors"))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k])
    assert thr.thresholds.shape == (len(ds.taxonomy),)
    assert model(torch.zeros(2, 3, cfg["preprocess"]["img_size"], cfg["preprocess"]["img_size"])).shape == (2, len(ds.taxonomy))


def test_taxonomy_mismatch_is_refused(tiny_runs, tiny_data, tmp_path):
    ds = load_dataset(tiny_data)
    other = write_dataset(tmp_path / "other", ds.ids, ds.images, ds.tags, taxonomy=list(reversed(ds.taxonomy)))
    with pytest.raises(R.RunError, match="taxonomy"):
        R.load_run(tiny_runs / "cnn-probe", other)


def test_interrupted_run_is_never_complete(tiny_data, tmp_path, monkeypatch):
    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(R, "fit_decision", crash)
    with pytest.raises(KeyboardInterrupt):
        R.train_pair(tiny_data, tmp_path, tiny_options("cnn", "probe"))
    d = tmp_path / "cnn-probe"
    assert json.loads((d / "config.json").read_text())["status"] == "running"
    assert not R.is_complete(d) and not (d / "model.safetensors").exists()
    assert not list(d.glob(".*.tmp"))  # no temp file left behind
    with pytest.raises(R.RunError, match="not a complete run"):
        R.load_run(d)


def test_resume_reuses_feature_cache_and_finishes(tiny_data, tmp_path):
    first = R.train_pair(tiny_data, tmp_path, tiny_options("cnn", "probe"))
    caches = sorted((tmp_path / ".cache").iterdir())
    again = R.train_pair(tiny_data, tmp_path, tiny_options("cnn", "probe", resume=True))
    assert first == again and sorted((tmp_path / ".cache").iterdir()) == caches
    timing = json.loads((again / "timing.json").read_text())
    assert timing["caches_reused"] == {"features": True}  # read from the cache, not recomputed ...
    meta = json.loads((caches[0] / "meta.json").read_text())
    assert timing["seconds"]["feature_extraction"] == round(meta["seconds"], 3) > 0  # ... and its cost still counted


def test_max_train_images_is_a_stratified_subset(tiny_data):
    ds = load_dataset(tiny_data)
    rows = R.train_rows(ds, 60, seed=0)
    train = ds.split_indices("train")
    assert len(rows) == 60 and set(rows) <= set(train)
    y = ds.labels()
    # tags present in train keep roughly their share in the subset
    share_full = y[train].mean(0)
    share_sub = y[rows].mean(0)
    assert np.abs(share_full - share_sub).max() < 0.1


def test_per_family_flags():
    assert per_family(["cnn=efficientnet_lite0"], "--model") == {"cnn": "efficientnet_lite0"}
    assert per_family(["random", "cnn=pretrained"], "--weights") == {"cnn": "pretrained", "dinov2": "random", "clip": "random"}
    with pytest.raises(SystemExit, match="unknown family"):
        per_family(["vgg=random"], "--weights")


def test_decision_is_fitted_on_the_models_own_fp32_validation_logits(tiny_runs, tiny_data):
    """thresholds.json and the folded logit adjustment describe the saved model as evaluation runs it."""
    from train.data.cache import load_cache
    from train.features import predict_logits
    from train.preprocess import Preprocess
    from train.selection import fit_decision

    ds = load_dataset(tiny_data)
    model, cfg, decision = R.load_run(tiny_runs / "cnn-probe", ds)
    groups = [list(g) for g in decision.groups]
    assert cfg["head"]["kind"] == "field" and len(groups) == len(cfg["head"]["groups"]) > 0
    rows = ds.split_indices("val")
    logits = predict_logits(model, Preprocess.from_config(cfg["preprocess"]), load_cache(ds, TINY_CACHE), rows)
    train_counts = np.asarray([ds.stats()["tags"][t]["train"] for t in ds.taxonomy])
    # the saved model already outputs adjusted logits: refitting with tau = 0 gives the same thresholds
    refit = fit_decision(ds.labels()[rows], logits, groups, train_counts, logit_adjust=0.0,
                         shrink=cfg["decision"]["threshold_shrink"])
    np.testing.assert_allclose(refit.decision.thresholds, decision.thresholds, rtol=1e-5)
    sel = cfg["summary"]["selection"]
    assert sel["metric"] == "val_macro_f1_crossfit" and 0 <= sel["val_macro_f1_crossfit"] <= 1
    assert cfg["summary"]["tuning"]["trials"] == 2
