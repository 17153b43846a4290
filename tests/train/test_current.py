"""A run is current only for the options it was trained with: train.current, and python -m train's use of it."""
import json
from dataclasses import replace

import pytest

from bakeoff.train import current as C
from bakeoff.train.__main__ import main
from bakeoff.train.data.dataset import load_dataset
from bakeoff.train.registry import get_spec
from tests.conftest import TINY_MODELS, tiny_options


def spec_of(opts):
    return get_spec(opts.family, opts.model, opts.image_size)


def changed(config: dict, opts, weights: str = "random", dataset_hash: str | None = None) -> list[str]:
    return C.run_changes(config, opts, spec_of(opts), weights, dataset_hash or config["dataset"]["hash"])


@pytest.fixture(scope="module")
def configs(tiny_runs):
    return {s: json.loads((tiny_runs / f"cnn-{s}" / "config.json").read_text()) for s in ("probe", "ft")}


def test_the_same_options_are_current(configs, tiny_data):
    ds_hash = load_dataset(tiny_data).content_hash()
    for strategy, cfg in configs.items():
        assert changed(cfg, tiny_options("cnn", strategy), dataset_hash=ds_hash) == []


def test_how_a_run_is_driven_does_not_count(configs):
    for strategy, cfg in configs.items():
        opts = tiny_options("cnn", strategy, device="cuda", progress=True, resume=True, weights_dir="/elsewhere")
        assert changed(cfg, opts) == []


def test_changed_options_are_listed_old_to_new(configs):
    opts = tiny_options("cnn", "probe", image_size=48, seed=3)
    assert changed(configs["probe"], opts) == ["image_size 32 -> 48", "seed 0 -> 3"]
    assert changed(configs["ft"], tiny_options("cnn", "ft", cache_size=64)) == ["cache_size 32 -> 64"]
    assert changed(configs["ft"], tiny_options("cnn", "ft"), weights="file /w/m.safetensors (sha256 abc)") == [
        "weights random -> file /w/m.safetensors (sha256 abc)"]
    assert changed(configs["ft"], tiny_options("cnn", "ft"), dataset_hash="f" * 64)[0].endswith("-> ffffffffffff")


def test_each_strategy_counts_only_what_it_reads(configs):
    fine_tune_only = dict(epochs=5, lr=1e-3, batch_size=16, augment=True)
    assert changed(configs["probe"], tiny_options("cnn", "probe", **fine_tune_only)) == []
    assert len(changed(configs["ft"], tiny_options("cnn", "ft", **fine_tune_only))) == 4
    probe = tiny_options("cnn", "probe")
    longer = replace(probe, probe=replace(probe.probe, epochs=probe.probe.epochs + 1))
    assert changed(configs["probe"], longer) == [f"probe.epochs {probe.probe.epochs} -> {probe.probe.epochs + 1}"]
    assert changed(configs["ft"], replace(longer, strategy="ft")) == []


def test_an_unset_option_counts_as_what_it_resolves_to(configs):
    cfg = json.loads(json.dumps(configs["ft"]))
    cfg["options"] |= {"model": None, "image_size": None, "epochs": None}
    cfg["backbone"] |= {"name": "mobilenetv2_100", "img_size": get_spec("cnn", "mobilenetv2_100").img_size}
    native = tiny_options("cnn", "ft", image_size=None, epochs=5)  # FinetuneConfig's default schedule
    assert changed(cfg, native) == []


def test_an_option_newer_than_the_run_counts_as_changed(configs):
    cfg = json.loads(json.dumps(configs["probe"]))
    del cfg["options"]["loss"]
    assert changed(cfg, tiny_options("cnn", "probe")) == [f"loss {C.NOT_RECORDED} -> bce"]


def test_an_interrupted_run_compares_what_it_recorded(configs):
    cfg = {k: v for k, v in configs["probe"].items() if k != "summary"} | {"status": "running"}
    opts = tiny_options("cnn", "probe")
    assert changed(cfg, replace(opts, probe=replace(opts.probe, epochs=99))) == []  # the sweep is not recorded yet
    assert changed(cfg, replace(opts, seed=1)) == ["seed 0 -> 1"]


def tiny_grid(data, out, **sizes) -> list[str]:
    """python -m train --all for the tiny models; ``sizes``: FAMILY=PX overrides."""
    flags = [x for fam, (name, px) in TINY_MODELS.items()
             for x in ("--model", f"{fam}={name}", "--image-size", f"{fam}={sizes.get(fam, px)}")]
    return ["--all", "--data", str(data), "--out", str(out), "--weights", "random", "--cache-size", "32",
            "--epochs", "1", "--probe-epochs", "2", "--batch-size", "32", "--device", "cpu", "--no-progress", *flags]


@pytest.mark.slow
def test_train_all_retrains_only_the_runs_whose_options_changed(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no project file
    out = tmp_path / "runs"
    assert main(tiny_grid(tiny_data, out)) == 0
    models = {p: (out / p / "model.safetensors").stat().st_mtime_ns for p in ("cnn-probe", "dinov2-ft")}
    capsys.readouterr()
    assert main(tiny_grid(tiny_data, out, cnn=24)) == 0
    said = capsys.readouterr().err  # status lines are log lines, on stderr
    assert "cnn-probe: options changed (image_size 32 -> 24): retraining" in said
    assert "cnn-ft: options changed (image_size 32 -> 24): retraining" in said
    assert f"dinov2-ft: current, nothing to do ({out / 'dinov2-ft'}; use --force to retrain)" in said
    assert json.loads((out / "cnn-probe" / "config.json").read_text())["backbone"]["img_size"] == 24
    assert (out / "cnn-probe" / "model.safetensors").stat().st_mtime_ns != models["cnn-probe"]
    assert (out / "dinov2-ft" / "model.safetensors").stat().st_mtime_ns == models["dinov2-ft"]
    one = tiny_grid(tiny_data, out, cnn=24)[1:] + ["--backbone", "dinov2", "--strategy", "ft"]
    assert main(one) == 0 and "dinov2-ft: current, nothing to do" in capsys.readouterr().err
    assert main(one + ["--force"]) == 0 and "dinov2-ft: retraining (--force)" in capsys.readouterr().err
    assert (out / "dinov2-ft" / "model.safetensors").stat().st_mtime_ns != models["dinov2-ft"]


def test_rebalance_and_aug_views_make_a_complete_run_stale(configs, tiny_runs, tiny_data):
    from bakeoff.train.__main__ import plan_run

    assert changed(configs["probe"], tiny_options("cnn", "probe", rebalance="crt")) == ["rebalance none -> crt"]
    assert changed(configs["probe"], tiny_options("cnn", "probe", aug_views=2)) == ["aug_views 0 -> 2"]
    assert changed(configs["ft"], tiny_options("cnn", "ft", rebalance="crt")) == ["rebalance none -> crt"]
    assert changed(configs["ft"], tiny_options("cnn", "ft", aug_views=2)) == []  # the fine-tune augments with --augment
    opts = tiny_options("cnn", "probe", rebalance="crt", aug_views=1)
    ds_hash = load_dataset(tiny_data).content_hash()
    train, resume, say = plan_run(tiny_runs / "cnn-probe", opts, spec_of(opts), "random", ds_hash, force=False)
    assert (train, resume) == (True, False)
    assert say == "options changed (rebalance none -> crt, aug_views 0 -> 1): retraining"


def test_runs_recorded_before_rebalance_and_views_trained_without_them(configs):
    cfg = json.loads(json.dumps(configs["probe"]))
    del cfg["options"]["rebalance"], cfg["options"]["aug_views"]
    assert changed(cfg, tiny_options("cnn", "probe")) == []
    assert changed(cfg, tiny_options("cnn", "probe", rebalance="crt")) == ["rebalance none -> crt"]


def test_a_crt_fine_tune_counts_the_probe_sweep_it_trains_its_head_with(configs):
    cfg = json.loads(json.dumps(configs["ft"]))
    opts = tiny_options("cnn", "ft", rebalance="crt")
    cfg["options"]["rebalance"] = "crt"
    cfg["summary"]["crt"] = {"probe": {"epochs": opts.probe.epochs}}
    assert changed(cfg, opts) == []
    longer = replace(opts, probe=replace(opts.probe, epochs=opts.probe.epochs + 1))
    assert changed(cfg, longer) == [f"probe.epochs {opts.probe.epochs} -> {opts.probe.epochs + 1}"]
