"""The main job's stage plan (reports.pipeline.stages): decided stage by stage, from the artifacts present."""
from __future__ import annotations

from pathlib import Path

from bakeoff.reports.pipeline import parse, stages


def plan(tmp_path: Path, *extra: str) -> dict:
    a = parse(["--data", str(tmp_path / "data"), "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
               *extra])
    return dict(stages(a))


def test_tensorrt_stages_run_only_for_runs_with_an_engine(tmp_path):
    steps = plan(tmp_path)
    assert steps["evaluate tensorrt"]() == f"no TensorRT engine under {tmp_path / 'runs'}/*/export"
    assert isinstance(steps["bench tensorrt"](), str)
    engine = tmp_path / "runs" / "clip-ft" / "export" / "model.tesla-t4.fp16.engine"
    engine.parent.mkdir(parents=True)
    engine.write_bytes(b"engine")  # as the export stage leaves it, after the plan was made
    (tmp_path / "runs" / "cnn-ft" / "export").mkdir(parents=True)
    evaluate, bench = steps["evaluate tensorrt"](), steps["bench tensorrt"]()
    assert evaluate[2:] == ["bakeoff.evaluate", "--runs", str(tmp_path / "runs"), "--data", str(tmp_path / "data"),
                            "--no-progress", "--runtime", "tensorrt", "--pairs", "clip-ft"]
    assert bench[2:4] == ["bakeoff.engines", "bench"] and bench[-4:] == ["--runtime", "tensorrt", "--pairs", "clip-ft"]


def test_report_constraints_are_forwarded(tmp_path):
    report = plan(tmp_path, "--latency-budget-ms", "20", "--target-runtime", "onnxruntime-fp16",
                  "--min-tail-f1", "0.1")["report"]()
    assert report[report.index("--out") + 2:] == ["--latency-budget-ms", "20.0", "--target-runtime",
                                                  "onnxruntime-fp16", "--min-tail-f1", "0.1"]
    assert plan(tmp_path)["report"]()[-2:] == ["--out", str(tmp_path / "out")]


def test_data_stages_are_skipped_once_done(tmp_path):
    steps = plan(tmp_path)
    assert steps["synth"]()[2:4] == ["bakeoff.train.data", "synth"]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.csv").write_text("id,image,tags\n")
    assert steps["synth"]() == "done already" and steps["prepare"]()[2:4] == ["bakeoff.train.data", "prepare"]


def test_first_stage_announces_the_weights_the_train_stage_will_use(tmp_path):
    steps = plan(tmp_path, "--weights", "auto", "--weights-dir", str(tmp_path / "w"), "--model", "cnn=resnet50")
    assert next(iter(steps)) == "weights"
    announce, train = steps["weights"](), steps["train"]()
    assert announce[2:5] == ["bakeoff.train", "--all", "--plan-weights"]
    for flags in (["--weights", "auto", "--weights-dir", str(tmp_path / "w")], ["--model", "cnn=resnet50"]):
        assert " ".join(flags) in " ".join(announce) and " ".join(flags) in " ".join(train)
