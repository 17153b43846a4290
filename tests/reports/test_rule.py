"""reports.rule on the fabricated scenario (tests/reports/conftest.py): constraints, ties, flags, gaps."""
from __future__ import annotations

import pytest

from reports.artifacts import load_pairs
from reports.paired import Comparer, comparer_for
from reports.rule import Constraints, candidates, recommend


@pytest.fixture(scope="module")
def scenario(fake_runs):
    runs, data = fake_runs
    pairs = load_pairs(runs)
    return pairs, comparer_for([p.reference for p in pairs if p.reference is not None], str(data))


def rec(scenario, **kw) -> dict:
    pairs, comparer = scenario
    return recommend(pairs, Constraints(**kw), comparer)


def test_without_constraints_the_most_accurate_pair_wins_and_is_separated(scenario):
    r = rec(scenario)
    assert r["chosen"] == "dinov2-ft" and r["runner_up"] == "clip-probe"
    assert r["separable"] is True and r["top_two"]["ci"][0] > 0
    assert "highest macro-F1" in r["why"] and "no latency budget" in r["rule"][1]
    assert "Could not consider" not in " ".join(r["text"])  # without a budget no pair needs a latency


def test_latency_budget_excludes_the_most_accurate_pair(scenario):
    r = rec(scenario, latency_budget_ms=20)
    excluded = {e["pair"]: e["reason"] for e in r["excluded"]}
    assert set(excluded) == {"dinov2-ft", "dinov2-probe"}
    assert "exceeds the 20 ms budget" in excluded["dinov2-ft"] and "160 ms" in excluded["dinov2-ft"]
    assert r["chosen"] not in excluded and "p99 latency at batch 1 <= 20 ms" in r["rule"][1]
    assert r["not_considered"] == [{"pair": "cnn-ft", "reason": "no latency measured on any runtime"}]
    assert "Could not consider: cnn-ft (no latency measured on any runtime)." in r["text"]


def test_top_two_that_cannot_be_separated_are_said_so_and_tie_breakers_decide(scenario):
    r = rec(scenario, latency_budget_ms=20)
    assert {r["chosen"], r["runner_up"]} == {"clip-probe", "clip-ft"}
    lo, hi = r["top_two"]["ci"]
    assert lo <= 0 <= hi and r["separable"] is False
    assert any("**the data cannot separate the top two**" in t for t in r["text"])
    # tied on macro-F1 and on tail F1: the faster-training pair (clip-probe, 70 s vs 300 s) is chosen
    assert r["chosen"] == "clip-probe" and "trains fastest" in r["why"]


def test_random_init_and_non_t4_latency_are_flagged_in_the_text(scenario):
    r = rec(scenario, latency_budget_ms=20)
    text = " ".join(r["text"])
    assert r["flags"]["cnn-probe"][0].startswith("random init")
    assert "Runs with random-init weights (cnn-probe) are not a valid comparison" in text
    assert "not measured on a T4" in r["flags"]["clip-ft"][0] and "Flag — clip-ft" in text
    assert "clip-probe" not in r["flags"]  # its fastest latency is a TensorRT measurement on a T4
    assert "p99 3 ms at batch 1 on TensorRT fp16" in text


def test_target_runtime_uses_its_latency_an_estimate_last_and_its_own_accuracy(scenario):
    r = rec(scenario, target_runtime="tensorrt", latency_budget_ms=20)
    assert sorted(r["considered"]) == ["clip-probe", "dinov2-probe"]
    assert "T4 ESTIMATE" in r["flags"]["dinov2-probe"][-1]
    assert {u["pair"] for u in r["not_considered"]} == {"cnn-probe", "cnn-ft", "dinov2-ft", "clip-ft"}
    assert "no latency measured on tensorrt" in r["not_considered"][0]["reason"]
    pairs, _ = scenario
    by_name = {c.name: c for c in candidates(pairs, Constraints(target_runtime="onnxruntime"))[0]}
    assert by_name["clip-ft"].evaluation.name == "onnxruntime"  # benchmarked and scored on ONNX Runtime
    assert by_name["dinov2-ft"].evaluation.name == "torch"  # scored on ONNX Runtime, never benchmarked there


def test_a_failed_evaluation_on_the_target_runtime_excludes_the_pair(scenario):
    r = rec(scenario, target_runtime="onnxruntime-fp16")
    (excluded,) = r["excluded"]
    assert excluded["pair"] == "cnn-probe" and "ONNX Runtime fp16 evaluation failed" in excluded["reason"]
    assert rec(scenario)["chosen"] == "dinov2-ft"  # the default rule judges PyTorch fp32 accuracy


def test_min_tail_f1_excludes_weak_tails(scenario):
    r = rec(scenario, min_tail_f1=0.1)
    excluded = {e["pair"]: e["reason"] for e in r["excluded"]}
    assert set(excluded) == {"cnn-probe", "cnn-ft"} and "below the 0.1 floor" in excluded["cnn-ft"]


def test_no_candidate_left(scenario):
    r = rec(scenario, latency_budget_ms=0.5)
    assert r["chosen"] is None and r["text"][0] == "**No pair can be recommended**: no pair meets the constraints."
    assert r["text"][1].startswith("Excluded by the constraints: cnn-probe (p99 ")


def test_without_test_labels_the_rule_says_it_fell_back_to_ci_overlap(scenario):
    pairs, _ = scenario
    r = recommend(pairs, Constraints(latency_budget_ms=20), Comparer(None, unavailable="dataset gone"))
    assert r["paired_bootstrap"] is False and r["comparisons"] == []
    assert any(t.startswith("No paired bootstrap (dataset gone)") and "cannot separate" in t for t in r["text"])


@pytest.mark.parametrize("kw, match", [({"target_runtime": "tflite"}, "target runtime"),
                                       ({"latency_budget_ms": 0}, "must be positive")])
def test_bad_constraints_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        Constraints(**kw)
