"""Run directories: artifacts, atomicity, refusal paths, LP-then-FT, and the CLI's per-family flags."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bakeoff.train import run as R
from bakeoff.train.__main__ import per_family
from bakeoff.train.data.dataset import load_dataset, write_dataset
from tests.conftest import TINY_CACHE, tiny_options


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


def test_finetune_trials_are_compressed_schedules_then_the_best_rate_from_the_start(tiny_runs):
    d = tiny_runs / "cnn-ft"
    cfg = json.loads((d / "config.json").read_text())
    tuning, grid = cfg["summary"]["tuning"], cfg["summary"]["tuning"]["grid"]
    recs = [json.loads(line) for line in (d / "history.jsonl").read_text().splitlines()]
    trials = [r for r in recs if "trial" in r]
    final = [r for r in recs if r.get("run") == "final"]
    assert len(trials) == tuning["trials"] * tuning["trial_epochs"] == 2 and len(final) == 2 == cfg["options"]["epochs"]
    # each trial ran a whole schedule: its one epoch's last step (5 here) had the rate decayed to 15% of the grid's,
    # while the final run, on the full schedule, ends its first epoch near the top of its cosine (85%)
    assert all(r["epoch"] == 1 and r["lr"] < 0.2 * grid[r["trial"]] for r in trials)
    best = max(trials, key=lambda r: r["val_map"])["trial"]
    assert cfg["summary"]["finetune"]["lr"] == grid[best]
    assert final[0]["lr"] > 0.5 * grid[best] and [r["epoch"] for r in final] == [1, 2]
    assert [s["lr"] for s in cfg["summary"]["sweep"]] == grid
    assert not list((d / "resume").glob("trial-*")) and (d / "resume" / "final").is_dir()


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
    from bakeoff.train.data.cache import load_cache
    from bakeoff.train.features import predict_logits
    from bakeoff.train.preprocess import Preprocess
    from bakeoff.train.selection import fit_decision

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


@pytest.fixture(scope="module")
def longtail_probe(tiny_data, tmp_path_factory):
    """A tiny probe with rebalance=crt and aug_views=1, with what its head sweep was given."""
    from bakeoff.train import strategies

    calls = []

    def spy(x_train, y_train, x_val, y_val, *a, **k):
        calls.append((np.array(x_train), np.array(y_train), np.array(x_val), np.array(y_val)))
        return train_probe(x_train, y_train, x_val, y_val, *a, **k)

    train_probe = strategies.train_probe
    out = tmp_path_factory.mktemp("longtail")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(strategies, "train_probe", spy)
        run_dir = R.train_pair(tiny_data, out, tiny_options("cnn", "probe", rebalance="crt", aug_views=1))
    return out, run_dir, calls[0]


def test_probe_trains_on_the_crt_resample_of_originals_and_views(longtail_probe, tiny_data):
    from bakeoff.train.features import FeatureStore
    from bakeoff.train.rebalance import repeat_factors, repeat_threshold, resample

    out, run_dir, (x_train, y_train, x_val, y_val) = longtail_probe
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["status"] == "complete" and (cfg["options"]["rebalance"], cfg["options"]["aug_views"]) == ("crt", 1)
    ds = load_dataset(tiny_data)
    rows_train, rows_val = ds.split_indices("train"), ds.split_indices("val")
    n = len(rows_train)
    feats = np.array(FeatureStore(out / ".cache", cfg["summary"]["feature_cache"]).load("features"), np.float32)
    (view_key,) = cfg["summary"]["aug_views"]["caches"]
    view = FeatureStore(out / ".cache", view_key)
    assert np.array_equal(view.rows(), rows_train)  # views of training images only
    views = np.array(view.load("features"), np.float32)
    assert views.shape == (n, feats.shape[1]) and np.abs(views - feats[:n]).max() > 0  # a view is not the original
    # validation is the un-augmented features, as they are
    np.testing.assert_array_equal(x_val, feats[n:])
    np.testing.assert_array_equal(y_val, ds.labels()[rows_val])
    # training: originals + the view (labels repeated), then the seeded repeat-factor re-sample of them
    y2 = np.tile(ds.labels()[rows_train], (2, 1))
    t = repeat_threshold(ds.stats()["long_tail_threshold"], n)
    idx = resample(repeat_factors(y2, t), seed=0)
    np.testing.assert_array_equal(x_train, np.concatenate([feats[:n], views])[idx])
    np.testing.assert_array_equal(y_train, y2[idx])
    crt = cfg["summary"]["crt"]
    assert crt["n_images"] == 2 * n and crt["n_resampled"] == len(idx) > 2 * n and crt["repeat_threshold"] == t
    assert "cRT re-sample of train + 1 augmented view per image" in cfg["summary"]["tuning"]["searched"]


def test_view_features_are_reused_never_recomputed(longtail_probe, tiny_data):
    out, run_dir, _ = longtail_probe
    key = json.loads((run_dir / "config.json").read_text())["summary"]["aug_views"]["caches"][0]
    meta = out / ".cache" / key / "meta.json"
    stamp = meta.stat().st_mtime_ns
    other = R.train_pair(tiny_data, out, tiny_options("cnn", "probe", aug_views=1))  # another run of the backbone
    timing = json.loads((other / "timing.json").read_text())
    assert timing["caches_reused"] == {"features": True, "views": True} and timing["seconds"]["view_extraction"] > 0
    assert meta.stat().st_mtime_ns == stamp and len(list((out / ".cache").glob("view-*"))) == 1
    two = R.train_pair(tiny_data, out, tiny_options("cnn", "probe", aug_views=2))  # view 1 kept, view 2 added
    assert json.loads((two / "timing.json").read_text())["caches_reused"]["views"] is False
    assert meta.stat().st_mtime_ns == stamp and len(list((out / ".cache").glob("view-*"))) == 2


def test_finetune_with_views_trains_on_the_views_trunks_filled_by_the_probes_pass(tiny_data, tmp_path, monkeypatch):
    from bakeoff.train import strategies
    from bakeoff.train.features import FeatureStore
    from bakeoff.train.finetune import ViewTrunkSource

    probe = R.train_pair(tiny_data, tmp_path, tiny_options("cnn", "probe", aug_views=2), share_pass=True)
    seen = []
    finetune = strategies.finetune

    def spy(model, train_source, *a, **k):
        seen.append(train_source)
        return finetune(model, train_source, *a, **k)

    monkeypatch.setattr(strategies, "finetune", spy)
    run_dir = R.train_pair(tiny_data, tmp_path, tiny_options("cnn", "ft", aug_views=2, trials=1))
    cfg = json.loads((run_dir / "config.json").read_text())
    timing = json.loads((run_dir / "timing.json").read_text())
    assert timing["caches_reused"] == {"trunk": True, "views": True}  # the probe's one pass filled them
    assert cfg["summary"]["finetune"]["views"] == 2 and len(cfg["summary"]["aug_views"]["caches"]) == 2
    (src,) = seen
    assert isinstance(src, ViewTrunkSource) and len(src.sources) == 3
    trunk = FeatureStore(tmp_path / ".cache", json.loads((probe / "config.json").read_text())["summary"]["trunk_cache"])
    n = cfg["dataset"]["n_train_used"]
    np.testing.assert_array_equal(src.sources[0].trunk, trunk.load("trunk")[:n])
    for key, s in zip(cfg["summary"]["aug_views"]["caches"], src.sources[1:]):
        view = FeatureStore(tmp_path / ".cache", key)
        assert np.array_equal(view.rows(), load_dataset(tiny_data).split_indices("train"))
        np.testing.assert_array_equal(s.trunk, view.load("trunk"))
        assert np.abs(np.asarray(s.trunk, np.float32) - np.asarray(trunk.load("trunk")[:n], np.float32)).max() > 0
    with pytest.raises(ValueError, match="choose one"):
        R.train_pair(tiny_data, tmp_path, tiny_options("cnn", "ft", aug_views=1, augment=True))


def test_finetune_crt_retrains_the_head_on_fine_tuned_features(tiny_data, tmp_path, monkeypatch):
    from bakeoff.train import strategies

    calls = []
    train_probe = strategies.train_probe

    def spy(x_train, y_train, x_val, y_val, *a, **k):
        result = train_probe(x_train, y_train, x_val, y_val, *a, **k)
        calls.append((len(x_train), len(x_val), x_train.shape[1], result.head))
        return result

    monkeypatch.setattr(strategies, "train_probe", spy)
    run_dir = R.train_pair(tiny_data, tmp_path, tiny_options("cnn", "ft", rebalance="crt"))
    cfg = json.loads((run_dir / "config.json").read_text())
    ((n_train, n_val, dim, head),) = calls
    crt = cfg["summary"]["crt"]
    assert n_train == crt["n_resampled"] > crt["n_images"] == cfg["dataset"]["n_train_used"]
    assert n_val == cfg["dataset"]["n_val"] and dim == head.in_features
    assert crt["selected"]["weight_decay"] in crt["probe"]["weight_decays"]
    assert {"crt_features", "crt_head"} <= set(json.loads((run_dir / "timing.json").read_text())["seconds"])
    state = load_file(str(run_dir / "model.safetensors"))  # the saved head is the cRT head (+ logit adjustment)
    torch.testing.assert_close(state["head.weight"], head.weight.detach())
    shift = torch.tensor(cfg["decision"]["bias_shift"], dtype=torch.float32)
    torch.testing.assert_close(state["head.bias"], head.bias.detach() + shift)
