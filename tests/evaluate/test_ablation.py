"""bakeoff.evaluate.ablation on the tiny cnn-probe run: every variant, the baseline's zero difference, ordered CIs, the
selected hyper-parameters, validation-only fitting, the run's own configuration reproduced (cRT runs too), the
re-sampling choice made on validation, caching and the CLI."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from bakeoff.common.io import read_json, sha256_file, write_json
from bakeoff.evaluate import ablation as A
from bakeoff.evaluate import score as S
from bakeoff.train.data.dataset import Dataset, load_dataset
from bakeoff.train.heads import TAUS
from bakeoff.train.rebalance import repeat_factors, repeat_threshold, resample
from bakeoff.train.run import train_pair
from bakeoff.train.selection import SHRINK_STRENGTHS
from tests.conftest import tiny_options

ALL = [v.name for v in A.VARIANTS]
SELECTED = ("weight_decay", "epoch", "val_map", "tau", "shrink")


def copy_probe(tiny_runs: Path, dst: Path, with_ft: bool = False) -> Path:
    """The tiny cnn-probe run and its feature cache (and the fine-tune run, to see it skipped) under ``dst``."""
    for pair in ("cnn-probe", "cnn-ft") if with_ft else ("cnn-probe",):
        shutil.copytree(tiny_runs / pair, dst / pair, ignore=shutil.ignore_patterns("eval"))
    for d in (tiny_runs / ".cache").glob("features-*"):
        shutil.copytree(d, dst / ".cache" / d.name)
    return dst


@pytest.fixture(scope="module")
def ablated(tiny_runs, tiny_data, tmp_path_factory):
    runs = copy_probe(tiny_runs, tmp_path_factory.mktemp("ablation"), with_ft=True)
    S.evaluate_run(runs / "cnn-probe", tiny_data, "torch", device="cpu")  # the run's own test score, to reproduce
    lines: list[str] = []
    results = A.ablate_all(runs, tiny_data, device="cpu", log=lines.append)
    return runs, results, lines


def test_every_variant_scored_with_provenance(ablated, tiny_data):
    runs, results, lines = ablated
    assert results["cnn-ft"]["status"] == "skipped"  # fine-tunes are not ablated
    doc = read_json(runs / "cnn-probe" / "eval" / A.ABLATION)
    assert doc == results["cnn-probe"]
    ds = load_dataset(tiny_data)
    rows, y_test, ids = S.test_split(ds)
    assert doc["groups"]["n"] > 0 and doc["skipped"] == {}  # the synthetic catalog has single-valued fields
    assert list(doc["variants"]) == ALL
    assert doc["run"]["model_sha256"] == sha256_file(runs / "cnn-probe" / "model.safetensors")
    assert doc["dataset"]["hash"] == ds.content_hash()
    assert doc["test"] == {**doc["test"], "n_images": len(rows), "ids_sha256": ids}
    assert doc["random_init"] and doc["warning"]
    # the heads trained on the run's own cached features, found by the key the probe derives
    assert (runs / ".cache" / doc["train"]["features"]["key"]).is_dir()
    assert doc["train"]["features"]["found"] == "recorded by the run (summary.feature_cache)"
    assert (runs / ".cache" / doc["eval_features"]["key"] / "meta.json").is_file()
    assert any("\nvariant " in entry and "field+la+shrink" in entry for entry in lines)  # the printed table


def test_baseline_difference_is_zero_and_intervals_are_ordered(ablated):
    doc = ablated[1]["cnn-probe"]
    for name, v in doc["variants"].items():
        for metric in A.METRICS:
            s = v["test"][metric]
            lo, hi = s["ci"]
            assert lo <= hi and 0 <= lo <= 1 and 0 <= hi <= 1
            vs = s["vs_baseline"]
            assert vs["ci"][0] <= vs["ci"][1] and 0 <= vs["p_better"] <= 1
            assert vs["verdict"] == A.verdict(vs["ci"])
            assert vs["delta"] == pytest.approx(s["value"] - doc["variants"]["baseline"]["test"][metric]["value"])
            if name == "baseline":
                assert vs["delta"] == 0 and vs["ci"] == [0, 0] and vs["p_better"] == 0.5
                assert vs["verdict"] == A.NO_HELP
    assert A.verdict([0.01, 0.02]) == A.HELPS and A.verdict([-0.02, -0.01]) == A.HURTS
    assert A.verdict([-0.01, 0.02]) == A.NO_HELP and A.verdict([None, None]) == A.UNDEFINED


def test_selected_hyper_parameters_recorded(ablated):
    runs, results, _ = ablated
    doc = results["cnn-probe"]
    config = read_json(runs / "cnn-probe" / "config.json")
    grid = config["summary"]["probe"]["weight_decays"]
    assert doc["probe"]["weight_decays"] == grid and doc["probe"]["epochs"] == config["summary"]["probe"]["epochs"]
    for name, v in doc["variants"].items():
        spec = next(x for x in A.VARIANTS if x.name == name)
        sel = v["selected"]
        assert sel["weight_decay"] in grid and [s["weight_decay"] for s in v["sweep"]] == grid
        assert sel["tau"] in TAUS and sel["shrink"] in SHRINK_STRENGTHS
        if spec.tau is not None:
            assert sel["tau"] == spec.tau and v["validation"]["tau_macro_f1"] == {}
        else:
            assert set(v["validation"]["tau_macro_f1"]) == {f"{t:g}" for t in TAUS}
        if spec.shrink is not None:
            assert sel["shrink"] == spec.shrink
        else:
            assert set(v["validation"]["shrink_crossfit_macro_f1"]) == {f"{k:g}" for k in SHRINK_STRENGTHS}
        assert (v["head"]["kind"], v["head"]["loss"]) == (spec.head, spec.loss)
    # variants with the same head kind and loss share one trained head
    by = doc["variants"]
    assert by["shrink"]["head"]["shared_with"] == "baseline" and by["field+la"]["head"]["shared_with"] == "field"
    assert by["shrink"]["selected"]["weight_decay"] == by["baseline"]["selected"]["weight_decay"]


def test_the_runs_own_configuration_is_reproduced(ablated):
    """The toolkit's default variant (the run's options) retrains the run's head, picks its tau, shrinkage and
    thresholds, and scores the run's own PyTorch test macro-F1."""
    rep = ablated[1]["cnn-probe"]["reproduces_run"]
    assert rep["variant"] == "field+la+shrink"
    assert rep["max_abs_head_diff"] < 1e-5 and rep["same_groups"] and rep["max_abs_threshold_diff"] < 1e-6
    assert rep["tau"]["ablation"] == rep["tau"]["run"] and rep["shrink"]["ablation"] == rep["shrink"]["run"]
    f1 = rep["test_macro_f1"]
    assert f1["ablation"] == pytest.approx(f1["eval/torch"], abs=1e-9)
    assert f1["tail_ablation"] == pytest.approx(f1["tail_eval/torch"], abs=1e-9)


class Relabelled(Dataset):
    """The same dataset (and hash) with other test labels: what a peek at test would change."""

    original_hash: str = ""

    def content_hash(self) -> str:
        return self.original_hash


def test_selection_reads_validation_only(ablated, tiny_data):
    runs, results, _ = ablated
    ds = load_dataset(tiny_data)
    test = set(ds.split_indices("test").tolist())
    rng = np.random.default_rng(1)
    tags = [list(ds.tags[i]) if i not in test else list(rng.choice(ds.taxonomy, size=2, replace=False))
            for i in range(len(ds))]
    other = Relabelled(**{f.name: getattr(ds, f.name) for f in dataclasses.fields(Dataset)} | {"tags": tags})
    other.original_hash = ds.content_hash()
    doc = A.ablate_run(runs / "cnn-probe", other, device="cpu", write=False)
    before = results["cnn-probe"]
    for name, v in doc["variants"].items():
        b = before["variants"][name]
        assert {k: v["selected"][k] for k in SELECTED} == {k: b["selected"][k] for k in SELECTED}, name
        assert v["validation"] == b["validation"] and v["sweep"] == b["sweep"]
    assert any(doc["variants"][n]["test"]["macro_f1"]["value"] != before["variants"][n]["test"]["macro_f1"]["value"]
               for n in ALL)  # the test labels did change the scores
    assert read_json(runs / "cnn-probe" / "eval" / A.ABLATION) == before  # write=False wrote nothing


def test_no_single_valued_field_skips_field_variants(ablated, tiny_data, monkeypatch):
    monkeypatch.setattr(A, "single_valued_groups", lambda *a: [])
    doc = A.ablate_run(ablated[0] / "cnn-probe", tiny_data, device="cpu", write=False)
    assert list(doc["variants"]) == ["baseline", "shrink", "asl", "balanced", "crt"]
    assert set(doc["skipped"]) == {"field", "field+la", "field+la+shrink", "field+la+shrink+crt"}
    assert all("no single-valued field" in why for why in doc["skipped"].values())


def test_feature_cache_found_by_search_or_re_extracted(tiny_runs, tiny_data, tmp_path):
    runs = copy_probe(tiny_runs, tmp_path)
    config = read_json(runs / "cnn-probe" / "config.json") | {"run_dir": str(runs / "cnn-probe")}
    ds = load_dataset(tiny_data)
    rows = np.concatenate(A._expected_rows(config, ds))
    store, how = A.find_train_store(runs / ".cache", config, rows)
    original = np.array(store.load("features"))
    moved = runs / ".cache" / "features-0123456789abcdef"  # a cache keyed by another (e.g. older) formula
    store.dir.rename(moved)
    write_json(moved / "meta.json", read_json(moved / "meta.json") | {"key": moved.name})
    found, how = A.find_train_store(runs / ".cache", config, rows)
    assert found.dir == moved and how.startswith("search")
    recorded = config | {"summary": config["summary"] | {"feature_cache": moved.name}}  # if run_probe records it
    found, how = A.find_train_store(runs / ".cache", recorded, rows)
    assert found.dir == moved and how.startswith("recorded by the run")
    shutil.rmtree(moved)
    assert A.find_train_store(runs / ".cache", config, rows)[0] is None
    doc = A.ablate_run(runs / "cnn-probe", ds, device="cpu", write=False)
    assert doc["train"]["features"]["found"].startswith("re-extracted")
    assert np.array_equal(np.array(A.find_train_store(runs / ".cache", config, rows)[0].load("features")), original)
    assert doc["reproduces_run"]["max_abs_head_diff"] < 1e-5


def test_kept_when_current_redone_when_the_checkpoint_changes(tiny_runs, tiny_data, tmp_path, capsys):
    runs = copy_probe(tiny_runs, tmp_path)
    assert A.main(["--runs", str(runs), "--data", str(tiny_data), "--pairs", "cnn-probe", "--device", "cpu",
                   "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "field+la+shrink" in out and "wrote" in out
    path = runs / "cnn-probe" / "eval" / A.ABLATION
    first = read_json(path)
    lines: list[str] = []
    assert A.ablate_all(runs, tiny_data, device="cpu", log=lines.append)["cnn-probe"] == first
    assert any("current" in line for line in lines) and read_json(path) == first
    model = runs / "cnn-probe" / "model.safetensors"
    state = load_file(str(model))
    state["head.bias"] = state["head.bias"] + 0.5
    save_file(state, str(model))  # a retrained checkpoint
    second = A.ablate_all(runs, tiny_data, device="cpu", log=lines.append)["cnn-probe"]
    assert second["run"]["model_sha256"] == sha256_file(model) != first["run"]["model_sha256"]
    assert second["eval_features"]["key"] != first["eval_features"]["key"]
    forced = A.ablate_all(runs, tiny_data, device="cpu", force=True, log=lines.append)["cnn-probe"]
    assert forced["created"] >= second["created"] and forced["variants"].keys() == second["variants"].keys()


def test_crt_variants_train_on_the_resample_and_choose_on_validation(ablated, tiny_data):
    doc = ablated[1]["cnn-probe"]
    ds = load_dataset(tiny_data)
    rows_train = ds.split_indices("train")
    t = repeat_threshold(ds.stats()["long_tail_threshold"], len(rows_train))
    expected = len(resample(repeat_factors(ds.labels()[rows_train], t), doc["probe"]["seed"]))
    by = doc["variants"]
    for name, plain in (("crt", "baseline"), ("field+la+shrink+crt", "field+la+shrink")):
        head = by[name]["head"]
        assert head["rebalance"] == "crt" and head["shared_with"] is None  # its own head: another training set
        assert head["resample"]["n_resampled"] == expected > head["resample"]["n_images"] == len(rows_train)
        assert by[plain]["head"]["rebalance"] == "none" and by[plain]["head"]["resample"] is None
    assert by["field+la+shrink+crt"]["selected"]["tau"] in TAUS  # selected on validation, as its plain twin's
    # every variant records its validation scores; the re-sampling choice reads them and nothing else
    for v in by.values():
        val = v["validation"]
        assert 0 <= val["tail_f1_crossfit"] <= 1 and val["tail_f1_crossfit_se"] >= 0
        assert val["macro_f1_crossfit_se"] >= 0
    choices = doc["rebalance_on_validation"]["choices"]
    assert [(c["with"], c["without"]) for c in choices] == [("crt", "baseline"),
                                                           ("field+la+shrink+crt", "field+la+shrink")]
    for c in choices:
        with_, without = by[c["with"]]["validation"], by[c["without"]]["validation"]
        assert c["val_tail_f1"] == {c["with"]: with_["tail_f1_crossfit"], c["without"]: without["tail_f1_crossfit"]}
        gain = with_["tail_f1_crossfit"] - without["tail_f1_crossfit"]
        assert c["tail_gain"] == pytest.approx(gain)
        assert c["choice"] == ("crt" if gain > without["tail_f1_crossfit_se"] else "none")
    assert "test is not read" in doc["rebalance_on_validation"]["rule"]


def test_a_crt_run_is_reproduced_and_an_aug_views_run_is_not(tiny_data, tmp_path):
    run = train_pair(tiny_data, tmp_path, tiny_options("cnn", "probe", rebalance="crt"))
    doc = A.ablate_run(run, tiny_data, device="cpu", write=False)
    rep = doc["reproduces_run"]
    assert rep["variant"] == "field+la+shrink+crt" and rep["max_abs_head_diff"] < 1e-5
    assert rep["tau"]["ablation"] == rep["tau"]["run"] and rep["max_abs_threshold_diff"] < 1e-6
    config = read_json(run / "config.json")
    assert A.run_variant(config | {"options": config["options"] | {"aug_views": 1}}, True) is None
