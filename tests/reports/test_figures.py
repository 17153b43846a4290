"""The figures' data (pure functions over artifacts) and drawing edge cases."""
from __future__ import annotations

from bakeoff.reports.artifacts import load_pairs
from bakeoff.reports.build import bucket_rows, latency_points
from bakeoff.reports.figures import (
    OTHER_PHASES,
    bucket_bars,
    family_labels,
    front_key,
    merge_minor_phases,
    pair_tick,
    pareto_front,
    pareto_points,
)


def point(pair: str, latency: float, f1: float | None, accuracy: str = "own", estimate: bool = False,
          parity_failed: bool = False) -> dict:
    return {"pair": pair, "latency_ms": latency, "macro_f1": f1, "accuracy": accuracy, "estimate": estimate,
            "parity_failed": parity_failed, "random_init": False, "label": "ONNX Runtime fp32"}


def test_pareto_front():
    points = [(10.0, 0.5), (1.0, 0.3), (5.0, 0.3), (2.0, 0.45), (20.0, 0.49), (1.0, 0.2)]
    assert pareto_front(points) == [1, 3, 0]


def test_pareto_points_leave_out_failed_evaluations_and_estimates():
    points = [point("a", 10, 0.5), point("b", 2, 0.4), point("c", 1, None, "failed"),
              point("d", 0.5, 0.9, estimate=True),
              point("e", 5, 0.45, "pytorch"), point("f", 3, 0.3)]
    assert [p["pair"] for p in pareto_points(points)] == ["b", "e", "a"]
    points.append(point("g", 1.5, 0.6, parity_failed=True))  # would dominate b and e, but its export failed parity
    assert [p["pair"] for p in pareto_points(points)] == ["b", "e", "a"]
    assert front_key(pareto_points(points))[:2] == ["1  b · ONNX Runtime fp32: 2 ms, 0.400",
                                                    "2  e · ONNX Runtime fp32: 5 ms, 0.450"]


def test_phases_too_short_to_see_are_merged_into_other():
    rows = [{"pair": "a", "random_init": False,
             "phases": {"weights_load": 2.0, "feature_extraction": 500.0, "head_training": 20.0, "thresholds": 1.0}},
            {"pair": "b", "random_init": False,
             "phases": {"weights_load": 3.0, "trunk_caching": 300.0, "block_training": 900.0, "thresholds": 0.5}}]
    merged, minor = merge_minor_phases(rows)  # under 1% of the longest bar (1203.5 s) in every row
    assert minor == ["weights_load", "thresholds"]
    assert merged[0]["phases"] == {"feature_extraction": 500.0, "head_training": 20.0, OTHER_PHASES: 3.0}
    assert merged[1]["phases"][OTHER_PHASES] == 3.5 and rows[1]["phases"]["thresholds"] == 0.5  # input untouched
    assert [sum(r["phases"].values()) for r in merged] == [sum(r["phases"].values()) for r in rows]
    assert merge_minor_phases(rows, share=0.002) == (rows, [])  # one short phase alone is left as it is

def test_figure_1_points_take_each_runtimes_own_accuracy(fake_runs):
    runs, _ = fake_runs
    points = {(p["pair"], p["label"]): p for p in latency_points(load_pairs(runs))}
    failed = points["cnn-probe", "ONNX Runtime fp16"]  # its evaluation failed: not drawn, not on the front
    assert failed["accuracy"] == "failed" and failed["macro_f1"] is None
    assert failed["sources"][1] == "cnn-probe/eval/onnxruntime-fp16/metrics.json"
    unevaluated = points["dinov2-ft", "ONNX Runtime fp16"]
    assert unevaluated["accuracy"] == "pytorch" and unevaluated["sources"][1] == "dinov2-ft/eval/torch/metrics.json"
    own = points["clip-probe", "TensorRT fp16"]
    assert own["accuracy"] == "own" and own["sources"][1] == "clip-probe/eval/tensorrt/metrics.json"
    estimate = points["dinov2-probe", "T4 ESTIMATE (TensorRT fp16)"]
    assert estimate["sources"][1] == "dinov2-probe/eval/tensorrt/metrics.json"
    front = [(p["pair"], p["label"]) for p in pareto_points(list(points.values()))]
    assert front == [("clip-probe", "TensorRT fp16"), ("dinov2-ft", "ONNX Runtime fp16")]
    assert points["cnn-probe", "PyTorch fp32"]["random_init"] is True


def test_random_init_is_marked_in_legends_and_axis_labels():
    rows = [{"pair": "cnn-probe", "family": "cnn", "random_init": True},
            {"pair": "cnn-ft", "family": "cnn", "random_init": False},
            {"pair": "clip-probe", "family": "clip", "random_init": True},
            {"pair": "clip-probe", "family": "clip", "random_init": True},  # one pair, two runtimes
            {"pair": "dinov2-ft", "family": "dinov2", "random_init": False}]
    assert family_labels(rows) == {"cnn": "CNN (cnn-probe random init)", "clip": "CLIP (random init)",
                                   "dinov2": "DINOv2"}
    assert [pair_tick(r) for r in rows[:2]] == ["cnn-probe (random init)", "cnn-ft"]


def test_a_ci_that_excludes_its_point_draws_a_clipped_whisker(fake_runs, tmp_path):
    rows, titles = bucket_rows(load_pairs(fake_runs[0]))
    rows[0]["values"]["tail"] = (0.40, 0.42, 0.50)  # a percentile CI above its point
    path = bucket_bars(rows, titles, tmp_path / "f2.png")  # matplotlib refuses a negative whisker length
    assert path.stat().st_size > 10_000
