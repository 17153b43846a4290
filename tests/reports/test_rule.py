"""reports.rule on the fabricated scenario (tests/reports/conftest.py): runtimes judged, constraints, ties,
training cost, random init, flags, gaps."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from reports.artifacts import NO_ENGINE, ReportError, load_pairs
from reports.paired import Comparer, comparer_for
from reports.rule import Constraints, candidates, recommend
from train.data.io import write_json


@pytest.fixture(scope="module")
def scenario(fake_runs):
    runs, data = fake_runs
    pairs = load_pairs(runs)
    return pairs, comparer_for([p.reference for p in pairs if p.reference is not None], str(data))


def rec(scenario, **kw) -> dict:
    pairs, comparer = scenario
    return recommend(pairs, Constraints(**kw), comparer)


def judged(scenario, **kw) -> dict:
    """Every pair the rule could judge, by name."""
    pairs, _ = scenario
    return {c.name: c for c in candidates(pairs, Constraints(**kw))[3]}


def test_without_constraints_the_most_accurate_pair_wins_and_is_separated(scenario):
    r = rec(scenario)
    assert r["chosen"] == "dinov2-ft" and r["runner_up"] == "clip-probe"
    assert r["separable"] is True and r["top_two"]["ci"][0] > 0
    assert "highest macro-F1" in r["why"] and "no latency budget" in r["rule"][1]
    assert "Could not consider" not in " ".join(r["text"])  # without a budget no pair needs a latency


def test_without_a_target_each_pair_is_judged_on_its_fastest_runtime_that_did_not_fail(scenario):
    by_name = judged(scenario)
    # cnn-probe is fastest on ONNX Runtime fp16 (4 ms), but that evaluation failed: judged on PyTorch (6 ms)
    assert by_name["cnn-probe"].latency.eval_name == "torch" and by_name["cnn-probe"].evaluation.name == "torch"
    # clip-probe is fastest on TensorRT and was evaluated there: that evaluation's accuracy is used
    assert by_name["clip-probe"].latency.eval_name == "tensorrt" and by_name["clip-probe"].evaluation.name == "tensorrt"
    assert by_name["clip-probe"].metric().source == "clip-probe/eval/tensorrt/metrics.json"
    # dinov2-ft is fastest on ONNX Runtime fp16, never evaluated: PyTorch fp32 accuracy, flagged
    ft = by_name["dinov2-ft"]
    assert ft.latency.eval_name == "onnxruntime-fp16" and ft.evaluation.name == "torch" and not ft.accuracy_measured
    assert "accuracy not measured on this runtime (ONNX Runtime fp16" in ft.flags[-1]
    assert by_name["cnn-ft"].latency is None and by_name["cnn-ft"].evaluation.name == "torch"
    r = rec(scenario)
    assert "whose own evaluation did not fail" in r["rule"][0]
    assert "accuracy not measured on this runtime" in r["rule"][0]
    assert "p99 100 ms at batch 1 on ONNX Runtime fp16" in r["text"][0]


def test_latency_budget_excludes_the_most_accurate_pair(scenario):
    r = rec(scenario, latency_budget_ms=20)
    excluded = {e["pair"]: e["reason"] for e in r["excluded"]}
    assert set(excluded) == {"dinov2-ft", "dinov2-probe", "cnn-probe"}
    assert "p99 100 ms at batch 1 (ONNX Runtime fp16) exceeds the 20 ms budget" in excluded["dinov2-ft"]
    assert r["chosen"] not in excluded and "p99 latency at batch 1 <= 20 ms" in r["rule"][1]
    reason = "no latency measured on any runtime whose evaluation did not fail and whose export passed parity"
    assert r["not_considered"] == [{"pair": "cnn-ft", "reason": reason}]
    assert f"Could not consider: cnn-ft ({reason})." in r["text"]


def test_top_two_that_cannot_be_separated_are_said_so_and_training_cost_decides(scenario):
    r = rec(scenario, latency_budget_ms=20)
    assert {r["chosen"], r["runner_up"]} == {"clip-probe", "clip-ft"}
    lo, hi = r["top_two"]["ci"]
    assert lo <= 0 <= hi and r["separable"] is False
    assert any("**the data cannot separate the top two**" in t for t in r["text"])
    # tied on macro-F1 and on tail F1: clip-probe costs 70 s; clip-ft 300 s plus the 70 s probe it starts from
    assert r["chosen"] == "clip-probe" and "lowest training cost (70 s)" in r["why"]
    runner = next(t for t in r["text"] if t.startswith("Runner-up: clip-ft"))
    assert "trained in 6.2 min (fine-tune plus the linear probe it starts from)" in runner
    assert "plus the linear probe's for a fine-tune that starts from the probe's head" in r["rule"][3]


def test_training_cost_is_the_sum_of_phases_plus_the_probe_for_a_fine_tune(scenario):
    by_name = judged(scenario)
    # dinov2-probe's timing.json total (understated: written before reused caches counted) is not used
    assert by_name["dinov2-probe"].cost.value == pytest.approx(90)
    assert by_name["dinov2-ft"].cost.value == pytest.approx(400 + 90)
    assert by_name["dinov2-ft"].cost.source == "dinov2-ft/timing.json + dinov2-probe/timing.json"
    assert by_name["cnn-probe"].cost.value == pytest.approx(50)


def test_every_flagged_pair_is_named_in_the_text_not_only_the_top_two(scenario):
    r = rec(scenario, latency_budget_ms=20)
    text = r["text"]
    assert set(r["flags"]) == {"cnn-probe", "dinov2-probe", "dinov2-ft", "clip-ft"}
    assert "Flag — random init — not a valid comparison: cnn-probe." in text
    cpu = next(t for t in text if t.startswith("Flag — latency not measured on a T4"))
    assert all(p in cpu for p in ("cnn-probe", "dinov2-probe", "dinov2-ft", "clip-ft"))
    assert any(t.startswith("Flag — accuracy not measured on this runtime") and "dinov2-ft" in t for t in text)
    assert "clip-probe" not in r["flags"]  # its fastest latency is a TensorRT measurement on a T4, evaluated there


def test_random_init_pairs_lose_to_any_eligible_pretrained_pair(scenario):
    r = rec(scenario)
    assert {"pair": "cnn-probe", "reason": "random-init weights, and pretrained pairs are eligible"} in r["excluded"]
    assert r["all_random_init"] is False and "eligible only when no pretrained pair is" in r["rule"][2]


def test_when_only_random_init_pairs_are_eligible_the_recommendation_warns(scenario):
    pairs, comparer = scenario
    r = recommend([p for p in pairs if p.random_init], Constraints(), comparer)
    assert r["chosen"] == "cnn-probe" and r["all_random_init"] is True
    assert "**Warning: every eligible pair uses random-init weights, so this is not a valid backbone comparison**" \
        in r["text"][2]


def test_target_runtime_takes_accuracy_from_its_own_evaluation_and_an_estimate_last(scenario):
    r = rec(scenario, target_runtime="tensorrt")
    assert sorted(r["considered"]) == ["clip-probe", "dinov2-probe"]
    assert "T4 ESTIMATE" in r["flags"]["dinov2-probe"][-1]
    unknown = {u["pair"]: u["reason"] for u in r["not_considered"]}
    assert set(unknown) == {"cnn-probe", "cnn-ft", "dinov2-ft", "clip-ft"}
    assert unknown["dinov2-ft"] == f"not evaluated on TensorRT fp16 because {NO_ENGINE}"  # the root cause
    assert "(TensorRT fp16)" in r["text"][0] and "cannot be considered" in r["rule"][0]
    assert "latency/tensorrt.json where measured, else T4 ESTIMATES" in r["rule"][0]  # clip-probe has one
    by_name = judged(scenario, target_runtime="onnxruntime")
    assert by_name["clip-ft"].evaluation.name == "onnxruntime" and by_name["clip-ft"].latency.eval_name == "onnxruntime"
    # scored on ONNX Runtime fp32 but only benchmarked at fp16: its accuracy, no latency
    assert by_name["dinov2-ft"].evaluation.name == "onnxruntime" and by_name["dinov2-ft"].latency is None
    assert set(by_name) == {"clip-ft", "dinov2-ft"}


def test_a_t4_estimate_never_satisfies_a_latency_budget(scenario):
    r = rec(scenario, target_runtime="tensorrt", latency_budget_ms=20)
    assert r["considered"] == ["clip-probe"]  # dinov2-probe's estimate (a fraction of a ms) does not count
    assert {"pair": "dinov2-probe", "reason": "its only TensorRT fp16 latency is a T4 ESTIMATE, which never satisfies "
                                              "a latency budget"} in r["not_considered"]
    assert "a T4 ESTIMATE never satisfies the budget" in r["rule"][1]
    assert "measured on the pair's benchmark device (named in the flags when it is not a T4)" in r["rule"][1]


def test_a_failed_evaluation_on_the_target_runtime_excludes_the_pair(scenario):
    r = rec(scenario, target_runtime="onnxruntime-fp16")
    excluded = {e["pair"]: e["reason"] for e in r["excluded"]}
    assert set(excluded) == {"cnn-probe", "cnn-ft"}  # cnn-ft was never benchmarked there: still excluded
    assert "ONNX Runtime fp16 evaluation failed" in excluded["cnn-ft"]
    assert {"pair": "dinov2-ft", "reason": "not evaluated on ONNX Runtime fp16"} in r["not_considered"]
    # clip-ft's evaluation there is outside the export tolerance: flagged, not excluded
    assert r["chosen"] == "clip-ft"
    assert "Flag — ONNX Runtime fp16 macro-F1 differs from PyTorch fp32 by more than the ±0.005 export tolerance: " \
           "clip-ft." in r["text"]


def test_an_export_that_failed_parity_excludes_its_runtime_and_is_flagged(scenario):
    r = rec(scenario, target_runtime="onnxruntime")
    excluded = {e["pair"]: e["reason"] for e in r["excluded"]}
    assert excluded["dinov2-ft"].startswith("its ONNX Runtime fp32 export failed its parity check (") \
        and "decisions flip" in excluded["dinov2-ft"]
    assert r["chosen"] == "clip-ft"
    assert "or whose exported model for it failed its parity check against PyTorch fp32, is excluded" in r["rule"][0]
    default = rec(scenario)
    assert "Flag — ONNX Runtime fp32 export FAILED its parity check (not used to judge the pair): dinov2-ft." \
        in default["text"]
    assert "whose exported model did not fail its parity check" in default["rule"][0]
    assert "export tolerance (±0.002 fp32, ±0.005 fp16 / bf16)" in default["rule"][0]


@pytest.fixture
def runs_copy(fake_runs, tmp_path) -> Path:
    """A copy of the fabricated runs, free to change."""
    return Path(shutil.copytree(fake_runs[0], tmp_path / "runs"))


def test_an_engine_whose_sidecar_records_failed_parity_is_not_used_to_judge_the_pair(runs_copy, fake_runs):
    engine = runs_copy / "clip-probe" / "export" / "model.tesla-t4.fp16.engine"
    engine.parent.mkdir(parents=True, exist_ok=True)
    engine.write_bytes(b"engine")
    write_json(engine.with_name(engine.name + ".json"),
               {"engine": engine.name, "parity": {"status": "failed", "failures": ["900 of 9000 decisions flip"]}})
    pairs = load_pairs(runs_copy)
    comparer = comparer_for([p.reference for p in pairs if p.reference is not None], str(fake_runs[1]))
    clip_probe = next(p for p in pairs if p.name == "clip-probe")
    assert list(clip_probe.parity_failures) == ["tensorrt"]
    assert clip_probe.parity_failures["tensorrt"].source == "clip-probe/export/model.tesla-t4.fp16.engine.json"
    # its fastest runtime (TensorRT on a T4, 3 ms) failed parity: judged on the next one, PyTorch fp32 (16 ms)
    cand = {c.name: c for c in candidates(pairs, Constraints())[3]}["clip-probe"]
    assert cand.latency.eval_name == "torch" and cand.evaluation.name == "torch"
    r = recommend(pairs, Constraints(target_runtime="tensorrt"), comparer)
    assert {"pair": "clip-probe", "reason": "its TensorRT fp16 export failed its parity check (900 of 9000 decisions "
                                            "flip)"} in r["excluded"]
    assert "Flag — TensorRT fp16 export FAILED its parity check (not used to judge the pair): clip-probe." in r["text"]


def test_without_any_tensorrt_engine_the_message_gives_the_root_cause(runs_copy, fake_runs):
    for path in (*runs_copy.glob("*/eval/tensorrt"), *runs_copy.glob("*/latency/tensorrt.json")):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    pairs = load_pairs(runs_copy)
    r = recommend(pairs, Constraints(target_runtime="tensorrt"), Comparer(None, unavailable="not needed"))
    assert r["text"][0] == ("**No pair can be recommended**: no pair could be considered: for every pair, not "
                            f"evaluated on TensorRT fp16 because {NO_ENGINE}.")
    assert "latency/tensorrt.json" not in r["rule"][0]  # no such file: line 1 does not cite it
    assert "T4 ESTIMATES (roofline projections stored in the pairs' other latency files, not measurements) only, as " \
           "no pair has a measured TensorRT fp16 latency" in r["rule"][0]
    assert r["text"][-1] == ("Could not consider: cnn-probe, cnn-ft, dinov2-probe, dinov2-ft, clip-probe, clip-ft "
                             f"(not evaluated on TensorRT fp16 because {NO_ENGINE}).")


def test_min_tail_f1_excludes_weak_tails_naming_the_runtime_judged(scenario):
    r = rec(scenario, min_tail_f1=0.1)
    excluded = {e["pair"]: e["reason"] for e in r["excluded"]}
    assert set(excluded) == {"cnn-probe", "cnn-ft"} and "on PyTorch fp32 is below the 0.1 floor" in excluded["cnn-ft"]
    assert "long-tail macro-F1 >= 0.1, of the evaluation the pair is judged on" in r["rule"][1]


def test_no_candidate_left(scenario):
    r = rec(scenario, latency_budget_ms=0.5)
    assert r["chosen"] is None and r["text"][0] == "**No pair can be recommended**: no pair meets the constraints."
    assert next(t for t in r["text"] if t.startswith("Excluded")).startswith("Excluded: cnn-probe (p99 ")


def test_without_test_labels_the_rule_says_it_fell_back_to_ci_overlap(scenario):
    pairs, _ = scenario
    r = recommend(pairs, Constraints(latency_budget_ms=20), Comparer(None, unavailable="dataset gone"))
    assert r["paired_bootstrap"] is False and r["comparisons"] == []
    assert any(t.startswith("No paired bootstrap (dataset gone)") and "cannot separate" in t for t in r["text"])


@pytest.mark.parametrize("kw, match", [({"target_runtime": "tflite"}, "target runtime"),
                                       ({"target_runtime": "onnxruntime-fp64"}, "target runtime"),
                                       ({"latency_budget_ms": 0}, "must be positive")])
def test_bad_constraints_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        Constraints(**kw)


def test_a_target_runtime_absent_from_the_runs_is_refused(scenario):
    with pytest.raises(ReportError, match=r"'torch-bf16'.*present: onnxruntime, onnxruntime-fp16, tensorrt, torch"):
        rec(scenario, target_runtime="torch-bf16")
