"""Reading artifacts: names shared with evaluate and engines, refusing stale or missing inputs, number format."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from bakeoff.common.io import read_json, write_json
from bakeoff.reports import fmt
from bakeoff.reports.__main__ import main
from bakeoff.reports.artifacts import (
    DEFAULT_PRECISION,
    ReportError,
    export_eval_name,
    load_pairs,
    parity_eval_name,
    run_name,
)
from bakeoff.reports.longtail import disagreements
from bakeoff.reports.paired import comparer_for


@pytest.fixture
def runs_copy(fake_runs, tmp_path) -> Path:
    """A copy of the fabricated runs, free to damage."""
    return Path(shutil.copytree(fake_runs[0], tmp_path / "runs"))


def compare_top(runs: Path, data: Path, a: str = "dinov2-ft", b: str = "clip-ft") -> dict:
    pairs = {p.name: p for p in load_pairs(runs)}
    comparer = comparer_for([p.reference for p in pairs.values() if p.reference is not None], str(data))
    return comparer.compare(pairs[a].reference, pairs[b].reference)


def test_names_match_what_evaluate_and_bench_write(tmp_path):
    from bakeoff.engines.bench import DEFAULT_PRECISION as BENCH_DEFAULT
    from bakeoff.engines.bench import latency_path
    from bakeoff.evaluate.score import eval_name

    assert DEFAULT_PRECISION == BENCH_DEFAULT
    for runtime, precision in (("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp16"), ("tensorrt", "fp16")):
        assert run_name(runtime, precision) == eval_name(runtime, precision)
        assert latency_path(tmp_path, runtime, precision).stem == run_name(runtime, precision)
    assert [export_eval_name(f) for f in ("model.onnx", "model.fp16.onnx", "model.tesla-t4.fp16.engine",
                                          "model.tesla-t4.fp16.engine.json", "parity.json")] == \
        ["onnxruntime", "onnxruntime-fp16", "tensorrt", None, None]


def test_parity_results_map_to_the_evaluations_that_score_them(fake_runs):
    assert [parity_eval_name(k) for k in ("onnx_fp32", "onnx_fp16", "tensorrt_fp16")] == \
        ["onnxruntime", "onnxruntime-fp16", "tensorrt"]
    pairs = {p.name: p for p in load_pairs(fake_runs[0])}
    failed = pairs["dinov2-ft"].parity_failures
    assert list(failed) == ["onnxruntime"] and failed["onnxruntime"].source == "dinov2-ft/export/parity.json"
    assert any("decisions flip" in f for f in failed["onnxruntime"].value)
    assert pairs["clip-ft"].parity_failures == {} and pairs["cnn-ft"].parity_failures == {}


@pytest.mark.parametrize("name", ["thresholds.json", "model.safetensors"])
def test_evaluations_scored_before_the_thresholds_or_model_changed_are_stale(runs_copy, fake_runs, name):
    assert compare_top(runs_copy, fake_runs[1])["separated"]
    path = runs_copy / "dinov2-ft" / name
    if name == "thresholds.json":
        write_json(path, read_json(path) | {"thresholds": [0.3] * len(read_json(path)["thresholds"])})
    else:
        path.write_bytes(b"1" * 1000)
    pair = {p.name: p for p in load_pairs(runs_copy)}["dinov2-ft"]
    assert pair.reference is None and "torch" not in pair.evals and pair.stale["torch"] == name
    assert pair.unscored_reason() == f"eval/torch is stale ({name} changed since it was scored): re-evaluate"
    assert {p.name: p for p in load_pairs(runs_copy)}["clip-ft"].stale == {}  # the other runs are untouched


def test_a_missing_predictions_file_is_named(runs_copy, fake_runs):
    (runs_copy / "clip-ft" / "eval" / "torch" / "predictions.npy").unlink()
    with pytest.raises(ReportError, match=r"clip-ft/eval/torch/predictions\.npy: cannot be read"):
        compare_top(runs_copy, fake_runs[1])


def rewrite_per_tag(path: Path, change) -> None:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    rows = change(rows)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_disagreements_match_tags_by_name_and_refuse_different_tag_sets(runs_copy):
    before = disagreements([p for p in load_pairs(runs_copy) if not p.random_init])
    per_tag = runs_copy / "clip-ft" / "eval" / "torch" / "per_tag.csv"
    rewrite_per_tag(per_tag, lambda rows: rows[::-1])
    assert disagreements([p for p in load_pairs(runs_copy) if not p.random_init]) == before
    rewrite_per_tag(per_tag, lambda rows: [r | {"name": "tag=renamed"} if r["name"] == "tag=t20" else r for r in rows])
    with pytest.raises(ReportError, match=r"clip-ft/eval/torch/per_tag\.csv: its tags differ .*tag=renamed"):
        disagreements([p for p in load_pairs(runs_copy) if not p.random_init])


@pytest.mark.parametrize("target, message", [("onnxruntime-fp64", "choose from"), ("torch-bf16", "present: ")])
def test_cli_refuses_an_unknown_or_absent_target_runtime(fake_runs, tmp_path, capsys, target, message):
    assert main(["--runs", str(fake_runs[0]), "--out", str(tmp_path), "--target-runtime", target]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: target runtime {target!r}") and message in err


@pytest.mark.parametrize("x, digits, text", [(-1e-6, 4, "+0.0000"), (-0.00006, 4, "−0.0001"), (0.0123, 3, "+0.012"),
                                             (None, 3, fmt.DASH)])
def test_signed_never_prints_negative_zero(x, digits, text):
    assert fmt.signed(x, digits) == text
    assert fmt.num(-1e-9) == "0.000"


@pytest.mark.parametrize("x, ci, text", [
    (0.0029, (0.0004, 0.0054), "+0.0029 [+0.0004, +0.0054]"),  # a bound that would print +0.000 gets 4 decimals
    (0.0123, (0.0051, 0.0201), "+0.012 [+0.005, +0.020]"),
    (0.014, (-0.001, 0.031), "+0.014 [−0.001, +0.031]"),
    (0.0001, (0.0, 0.00002), "+0.00010 [+0.00000, +0.00002]"),  # an exact 0 bound stays 0
])
def test_signed_ci_never_shows_a_nonzero_bound_as_zero(x, ci, text):
    assert fmt.signed_ci(x, ci) == text


@pytest.mark.parametrize("seconds, text", [(0.46, "0.5 s"), (4.04, "4.0 s"), (47.2, "47 s"), (402, "6.7 min")])
def test_duration(seconds, text):
    assert fmt.duration(seconds) == text


def test_predictions_shape_is_checked(runs_copy):
    path = runs_copy / "clip-ft" / "eval" / "torch" / "predictions.npy"
    np.save(path, np.zeros((3, 3), np.float32))
    (clip_ft,) = [p for p in load_pairs(runs_copy) if p.name == "clip-ft"]
    with pytest.raises(ReportError, match=r"shape \(3, 3\)"):
        clip_ft.reference.predictions()


def test_decisions_follow_the_runs_rule_groups_by_argmax(runs_copy, fake_runs):
    """A run whose thresholds.json has a group (re-scored with softmax scores there): its tags are decided by the
    group's arg-max, one per image, in the paired comparisons too; runs without groups keep score >= threshold."""
    from bakeoff.train.data.dataset import load_dataset
    from tests.reports.conftest import write_eval

    ds = load_dataset(fake_runs[1])
    run, group = runs_copy / "clip-ft", [0, 1, 2]
    probs = np.load(run / "eval" / "torch" / "predictions.npy").astype(np.float64)
    doc = read_json(run / "thresholds.json")
    write_json(run / "thresholds.json", doc | {"groups": [[ds.taxonomy[j] for j in group]]})
    assert "torch" in {p.name: p for p in load_pairs(runs_copy)}["clip-ft"].stale  # scored by the old rule
    z = np.log(probs[:, group] / (1 - probs[:, group]))
    scores = probs.copy()
    scores[:, group] = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    write_eval(run, ds, scores.astype(np.float32))

    pairs = {p.name: p for p in load_pairs(runs_copy)}
    ev = pairs["clip-ft"].reference
    assert ev is not None and ev.decision().groups == (tuple(group),)
    want = scores.astype(np.float32) >= np.asarray(doc["thresholds"])
    want[:, group] = np.eye(3, dtype=bool)[np.argmax(scores[:, group], axis=1)]
    np.testing.assert_array_equal(ev.decisions(), want)
    assert (ev.decisions()[:, group].sum(axis=1) == 1).all()
    assert [(r["threshold"], r["decided_by"]) for r in ev.per_tag[:4]] == \
        [(None, "argmax:tag")] * 3 + [(0.5, "threshold")]
    other = pairs["dinov2-ft"].reference  # no groups: the plain rule on its sigmoid scores
    np.testing.assert_array_equal(other.decisions(), np.asarray(other.predictions()) >= 0.5)
    res = compare_top(runs_copy, fake_runs[1], "clip-ft", "dinov2-ft")
    assert res["observed_diff"] == pytest.approx(ev.doc["macro_f1"] - other.doc["macro_f1"])

    metrics = run / "eval" / "torch" / "metrics.json"  # the same files without the record of softmax scores
    write_json(metrics, {k: v for k, v in read_json(metrics).items() if k != "decision"})
    assert "torch" in {p.name: p for p in load_pairs(runs_copy)}["clip-ft"].stale
