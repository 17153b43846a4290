"""bakeoff.reports.rule on the fabricated scenario (tests/reports/conftest.py): runtimes judged, constraints, selection on
validation (never on test), ties, latency and training cost, random init, flags, gaps."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bakeoff.common.io import write_json
from bakeoff.reports.artifacts import NO_ENGINE, ReportError, load_pairs
from bakeoff.reports.build import selection_table
from bakeoff.reports.paired import Comparer, comparer_for
from bakeoff.reports.rule import NO_VALIDATION, TEST_ONLY, Constraints, candidates, recommend
from bakeoff.train.data.dataset import load_dataset
from tests.reports.conftest import pair_probabilities, write_eval


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
    assert "highest cross-fitted validation macro-F1 (0.600), more than the margin of 0.005" in r["why"]
    assert "no latency budget" in r["rule"][1]
    assert r["rule"][3].startswith("4. Selected on validation (val_macro_f1_crossfit: cross-fitted validation "
                                   "macro-F1); test reported once, not used to choose.")
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


def test_top_two_tied_on_validation_are_decided_by_latency_and_test_is_only_reported(scenario):
    r = rec(scenario, latency_budget_ms=20)
    assert {r["chosen"], r["runner_up"]} == {"clip-probe", "clip-ft"}
    lo, hi = r["top_two"]["ci"]
    assert lo <= 0 <= hi and r["separable"] is False
    assert any(t.startswith(TEST_ONLY) and "**the test data cannot separate the top two**" in t for t in r["text"])
    # within 0.005 on validation (0.503 vs 0.500): clip-probe is faster (3 ms on TensorRT vs 12 ms on ONNX Runtime)
    assert r["chosen"] == "clip-probe" and "within the margin of 0.005" in r["why"]
    assert "clip-probe has the lowest measured p99 latency at batch 1" in r["why"]
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


def test_min_tail_f1_excludes_weak_validation_tails(scenario):
    r = rec(scenario, min_tail_f1=0.1)
    excluded = {e["pair"]: e["reason"] for e in r["excluded"]}
    assert set(excluded) == {"cnn-probe", "cnn-ft"}
    assert excluded["cnn-ft"] == "cross-fitted validation long-tail F1 0.080 is below the 0.1 floor"
    assert "validation long-tail macro-F1 >= 0.1 (summary.selection.val_tail_f1_crossfit" in r["rule"][1]
    assert "the test long-tail F1 is not used" in r["rule"][1]


def test_no_candidate_left(scenario):
    r = rec(scenario, latency_budget_ms=0.5)
    assert r["chosen"] is None and r["text"][0] == "**No pair can be recommended**: no pair meets the constraints."
    assert next(t for t in r["text"] if t.startswith("Excluded")).startswith("Excluded: cnn-probe (p99 ")


def test_without_test_labels_the_rule_says_it_fell_back_to_ci_overlap(scenario):
    pairs, _ = scenario
    r = recommend(pairs, Constraints(latency_budget_ms=20), Comparer(None, unavailable="dataset gone"))
    assert r["paired_bootstrap"] is False and r["comparisons"] == []
    assert any(t.startswith(f"{TEST_ONLY}no paired bootstrap (dataset gone)") and "cannot separate" in t
               for t in r["text"])
    assert r["chosen"] == "clip-probe"  # the choice does not depend on the test labels being there


@pytest.mark.parametrize("kw, match", [({"target_runtime": "tflite"}, "target runtime"),
                                       ({"target_runtime": "onnxruntime-fp64"}, "target runtime"),
                                       ({"latency_budget_ms": 0}, "must be positive")])
def test_bad_constraints_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        Constraints(**kw)


def test_a_target_runtime_absent_from_the_runs_is_refused(scenario):
    with pytest.raises(ReportError, match=r"'torch-bf16'.*present: onnxruntime, onnxruntime-fp16, tensorrt, torch"):
        rec(scenario, target_runtime="torch-bf16")


# --- selection on validation, never on test ---------------------------------------------------------------------

def fresh(fake_runs) -> list:
    """The fabricated pairs, loaded anew so that a test may change their configs in memory (files untouched)."""
    return load_pairs(fake_runs[0])


def selection(pairs, name: str) -> dict:
    """config.json's summary.selection of pair ``name`` (in memory)."""
    return next(p for p in pairs if p.name == name).config.doc["summary"]["selection"]


def summary_of(pairs, name: str) -> dict:
    return next(p for p in pairs if p.name == name).config.doc["summary"]


def test_changing_only_the_test_predictions_does_not_change_the_recommendation(scenario, runs_copy, fake_runs):
    before = rec(scenario)
    ds = load_dataset(fake_runs[1])
    probs = pair_probabilities(ds.labels()[ds.split_indices("test")])
    write_eval(runs_copy / "dinov2-ft", ds, probs["cnn-probe"])  # dinov2-ft now scores like the worst pair on test
    pairs = load_pairs(runs_copy)
    test_f1 = {p.name: p.reference.doc["macro_f1"] for p in pairs}
    old_f1 = {p.name: p.reference.doc["macro_f1"] for p in scenario[0]}
    assert old_f1["dinov2-ft"] == max(old_f1.values()) and test_f1["dinov2-ft"] < test_f1["clip-probe"]  # flipped
    after = recommend(pairs, Constraints(), comparer_for([p.reference for p in pairs], str(fake_runs[1])))
    assert (after["chosen"], after["runner_up"]) == (before["chosen"], before["runner_up"]) == ("dinov2-ft",
                                                                                                "clip-probe")
    assert after["why"] == before["why"] and after["runner_up_why"] == before["runner_up_why"]
    assert after["rule"] == before["rule"]
    # the test numbers are still reported, and the disagreement is said
    assert f"{test_f1['dinov2-ft']:.3f}" in after["text"][0]
    top_two = next(t for t in after["text"] if t.startswith(TEST_ONLY))
    assert "**test disagrees with validation**: clip-probe is better on the test split, outside noise; the choice " \
           "follows validation" in top_two and after["top_two"]["observed_diff"] < 0


def test_the_rule_follows_validation_when_it_ranks_pairs_opposite_to_test(fake_runs, scenario):
    pairs = fresh(fake_runs)
    by_test = sorted((p for p in pairs if not p.random_init), key=lambda p: p.reference.doc["macro_f1"], reverse=True)
    assert [p.name for p in by_test] == ["dinov2-ft", "clip-probe", "clip-ft", "dinov2-probe", "cnn-ft"]
    for rank, p in enumerate(by_test):  # validation: the exact reverse, 0.1 apart
        selection(pairs, p.name)["val_macro_f1_crossfit"] = 0.3 + 0.1 * rank
    r = recommend(pairs, Constraints(), scenario[1])
    assert (r["chosen"], r["runner_up"]) == ("cnn-ft", "dinov2-probe")  # the two worst on test
    assert r["why"].startswith("highest cross-fitted validation macro-F1 (0.700)")
    assert "Selected on validation (val_macro_f1_crossfit: cross-fitted validation macro-F1); test reported once, " \
           "not used to choose." in r["rule"][3]
    assert any(t.startswith(TEST_ONLY) and "**test disagrees with validation**" in t for t in r["text"])
    # every pair's validation metric beside its test scores, best on validation first
    rows = r["validation"]
    assert [row["pair"] for row in rows][:5] == ["cnn-ft", "dinov2-probe", "clip-ft", "clip-probe", "dinov2-ft"]
    assert rows[0]["outcome"] == "recommended" and rows[1]["outcome"] == "runner-up"
    assert rows[0]["selection_value"] == {"value": 0.7, "source": "cnn-ft/config.json",
                                          "field": "summary.selection.val_macro_f1_crossfit"}
    assert rows[0]["test"]["macro_f1"]["source"] == "cnn-ft/eval/torch/metrics.json"
    table = selection_table(r)
    assert table.header[1] == "Validation val_macro_f1_crossfit: cross-fitted validation macro-F1 (chooses)"
    assert table.header[3] == "Test macro-F1 [95% CI] (reported only)"
    assert table.rows[0][0] == ["**cnn-ft**"] and table.rows[0][1] == ["0.700"] and table.rows[0][-1] == [
        "**recommended**"]
    assert table.notes[0].startswith("Selected on validation (val_macro_f1_crossfit); test reported once, not used "
                                     "to choose.")


def test_old_configs_fall_back_to_the_validation_map_training_recorded_and_say_so(fake_runs, scenario):
    pairs = fresh(fake_runs)
    for p in pairs:  # every run predates summary.selection
        del p.config.doc["summary"]["selection"]
    summary_of(pairs, "clip-ft")["result"]["best_val_map"] = 0.50  # above dinov2-ft's 0.47 (best on test)
    r = recommend(pairs, Constraints(), scenario[1])
    assert r["selection_metric"] == "val_map" and r["chosen"] == "clip-ft"
    assert r["why"].startswith("highest validation mAP (0.500)")
    assert r["rule"][3].startswith("4. Selected on validation (val_map: validation mAP); test reported once, not used "
                                   "to choose.")
    assert "summary.selected.val_map of a probe, summary.result.best_val_map of a fine-tune" in r["rule"][3]
    rows = {row["pair"]: row for row in r["validation"]}
    assert rows["clip-ft"]["selection_value"] == {"value": 0.5, "source": "clip-ft/config.json",
                                                  "field": "summary.result.best_val_map"}
    assert rows["clip-probe"]["selection_value"]["field"] == "summary.selected.val_map"
    assert any(t.startswith("Judged on validation mAP, not the cross-fitted validation macro-F1, because ")
               for t in r["text"])
    assert "from summary.result.best_val_map (older run)" in selection_table(r).rows[0][1]


def test_one_old_config_puts_every_candidate_on_validation_map(fake_runs, scenario):
    pairs = fresh(fake_runs)
    del summary_of(pairs, "cnn-ft")["selection"]  # an older run: only its validation mAP
    selection(pairs, "clip-ft")["val_map"] = 0.50  # clip-ft leads on mAP, dinov2-ft on cross-fitted macro-F1
    r = recommend(pairs, Constraints(), scenario[1])
    assert r["selection_metric"] == "val_map" and r["fallback_to_val_map"] == ["cnn-ft"] and r["chosen"] == "clip-ft"
    assert "used because cnn-ft records no val_macro_f1_crossfit, and every candidate is judged on the same metric" \
        in r["rule"][3]
    rows = {row["pair"]: row for row in r["validation"]}
    assert rows["cnn-ft"]["selection_value"]["field"] == "summary.result.best_val_map"
    assert rows["clip-ft"]["selection_value"]["field"] == "summary.selection.val_map"
    # the same runs with cnn-ft's new config: judged on the cross-fitted macro-F1 again
    assert rec(scenario)["selection_metric"] == "val_macro_f1_crossfit"


def test_a_pair_without_any_validation_metric_is_not_recommended(fake_runs, scenario):
    pairs = fresh(fake_runs)
    del summary_of(pairs, "dinov2-ft")["selection"]
    del summary_of(pairs, "dinov2-ft")["result"]["best_val_map"]
    r = recommend(pairs, Constraints(), scenario[1])
    assert r["chosen"] == "clip-probe" and "dinov2-ft" not in r["considered"]  # the best on test is not chosen
    assert {"pair": "dinov2-ft", "reason": NO_VALIDATION} in r["not_considered"]
    assert any(t.startswith("Could not consider: dinov2-ft (no validation metric in config.json") for t in r["text"])
    row = next(row for row in r["validation"] if row["pair"] == "dinov2-ft")
    assert row["selection_value"] is None and row["outcome"] == "not considered"
    assert row["test"]["macro_f1"]["value"] is not None  # its test score is still reported
    for p in pairs:  # no pair has one: nothing is recommended, whatever the test scores
        p.config.doc["summary"].pop("selection", None)
        p.config.doc["summary"].get("selected", {}).pop("val_map", None)
        p.config.doc["summary"].get("result", {}).pop("best_val_map", None)
    r = recommend(pairs, Constraints(), scenario[1])
    assert r["chosen"] is None and r["text"][0] == ("**No pair can be recommended**: no pair could be considered: "
                                                    f"for every pair, {NO_VALIDATION}.")


def test_min_tail_f1_is_judged_on_the_validation_tail_not_the_test_tail(fake_runs, scenario):
    pairs = fresh(fake_runs)
    test_tail = {p.name: p.reference.doc["buckets"]["tail"]["macro_f1"] for p in pairs}
    assert test_tail["dinov2-ft"] > 0.5 and test_tail["cnn-ft"] < 0.1
    selection(pairs, "dinov2-ft")["val_tail_f1_crossfit"] = 0.05  # the best test tail, a weak validation one
    selection(pairs, "cnn-ft")["val_tail_f1_crossfit"] = 0.5  # the reverse
    selection(pairs, "clip-probe")["val_tail_f1_crossfit"] = float("nan")  # no long-tail validation positive
    del summary_of(pairs, "dinov2-probe")["selection"]  # an older run: no validation tail metric
    r = recommend(pairs, Constraints(min_tail_f1=0.1), scenario[1])
    excluded = {e["pair"]: e["reason"] for e in r["excluded"]}
    unknown = {u["pair"]: u["reason"] for u in r["not_considered"]}
    assert excluded["dinov2-ft"] == "cross-fitted validation long-tail F1 0.050 is below the 0.1 floor"
    assert "cnn-ft" not in excluded and "cnn-ft" in r["considered"]
    assert unknown["clip-probe"].startswith("validation long-tail F1 undefined (no long-tail tag has a validation "
                                            "positive)")
    assert unknown["dinov2-probe"].startswith("no validation long-tail F1 in config.json")
    assert "test long-tail F1 does not stand in" in unknown["dinov2-probe"]
    assert r["chosen"] == "clip-ft"  # 0.503 beats cnn-ft's 0.300


def test_pairs_within_the_margin_on_validation_are_decided_by_measured_latency(fake_runs, scenario):
    def with_validation(values: dict, se: float | None = None, **latency_p99):
        pairs = fresh(fake_runs)
        for p in pairs:
            selection(pairs, p.name)["val_macro_f1_crossfit"] = values.get(p.name, 0.4)
        if se is not None:
            selection(pairs, max(values, key=values.get))["val_macro_f1_se"] = se
        for name, ms in latency_p99.items():
            lat = next(p for p in pairs if p.name == name.replace("_", "-")).measured()[0]
            lat.doc["batches"][0]["latency_ms"]["p99"] = ms
        return recommend(pairs, Constraints(), scenario[1])

    # dinov2-probe leads by 0.003 (< 0.005): clip-ft is faster (12 ms on ONNX Runtime vs 24 ms on PyTorch) though
    # it costs more to train (370 s vs 90 s), and latency comes first
    tie = {"dinov2-probe": 0.700, "clip-ft": 0.697}
    r = with_validation(tie)
    assert (r["chosen"], r["runner_up"]) == ("clip-ft", "dinov2-probe")
    assert r["why"] == ("cross-fitted validation macro-F1 indistinguishable between dinov2-probe (0.700), clip-ft "
                        "(0.697): within the margin of 0.005 (fixed: config.json records no standard error); clip-ft "
                        "has the lowest measured p99 latency at batch 1 (dinov2-probe 24 ms on PyTorch fp32, clip-ft "
                        "12 ms on ONNX Runtime fp32)")
    assert r["margin"]["value"] == 0.005
    assert "indistinguishable on validation; among them the lower measured p99 latency at batch 1" in r["rule"][3]
    # a recorded standard error is the margin: 0.001 separates them, and validation alone decides
    r = with_validation(tie, se=0.001)
    assert r["chosen"] == "dinov2-probe" and r["margin"]["value"] == 0.001
    assert "more than the margin of 0.001 (1 standard error of dinov2-probe's val_macro_f1_crossfit, " \
           "summary.selection.val_macro_f1_se)" in r["why"]
    # latencies within 10% of each other are equal: the higher validation mAP decides, whichever pair has it
    for better, other in (("clip-ft", "dinov2-probe"), ("dinov2-probe", "clip-ft")):
        pairs = fresh(fake_runs)
        selection(pairs, better)["val_map"], selection(pairs, other)["val_map"] = 0.66, 0.65
        for p in pairs:
            selection(pairs, p.name)["val_macro_f1_crossfit"] = tie.get(p.name, 0.4)
        next(p for p in pairs if p.name == "clip-ft").measured()[0].doc["batches"][0]["latency_ms"]["p99"] = 23.0
        r = recommend(pairs, Constraints(), scenario[1])
        assert r["chosen"] == better and "are within 10% of each other" in r["why"]
        assert f"{better} has the highest validation mAP (" in r["why"] and "0.660" in r["why"]
    # a pair without a measured latency comes last (cnn-ft was never benchmarked)
    r = with_validation({"cnn-ft": 0.700, "dinov2-probe": 0.698})
    assert r["chosen"] == "dinov2-probe" and "cnn-ft not measured" in r["why"]


def test_pairs_tied_on_validation_map_and_latency_are_decided_by_training_cost(fake_runs, scenario):
    pairs = fresh(fake_runs)
    for p in pairs:  # runs that record no cross-fitted macro-F1: validation mAP is the selection metric itself
        sel = selection(pairs, p.name)
        sel.pop("val_macro_f1_crossfit", None)
        sel["val_map"] = {"dinov2-probe": 0.700, "clip-ft": 0.698}.get(p.name, 0.4)
    next(p for p in pairs if p.name == "clip-ft").measured()[0].doc["batches"][0]["latency_ms"]["p99"] = 23.0
    r = recommend(pairs, Constraints(), scenario[1])
    assert r["chosen"] == "dinov2-probe" and "are within 10% of each other" in r["why"]
    assert r["why"].endswith("dinov2-probe has the lowest training cost (90 s)")
