"""python -m export's feedback: status on stderr by verbosity, a bar across runs (one step per run) and one over
each run's steps. TensorRT's build phases: tests/export/test_tensorrt.py."""
from __future__ import annotations

import contextlib
import io
import shutil

import pytest

from bakeoff.common.log import setup_logging
from bakeoff.export import pipeline
from bakeoff.export.__main__ import main
from bakeoff.export.pipeline import ExportOptions, export_runs, planned_steps
from tests.progress import Terminal


@pytest.fixture
def two_runs(cnn_export, tmp_path):
    """Two copies of the exported cnn-probe run: both current, so an export of them is quick."""
    *_, run = cnn_export
    for name in ("a-probe", "b-probe"):
        shutil.copytree(run, tmp_path / "runs" / name)
    return tmp_path / "runs"


def cli(*argv: str, terminal: bool = False) -> tuple[int, str, str]:
    out, err = io.StringIO(), Terminal() if terminal else io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_default_verbose_and_quiet(two_runs):
    code, out, err = cli("--runs", str(two_runs))
    assert code == 0 and out == ""
    assert err.splitlines() == [f"{p}: export is current (same checkpoint), parity passed; skipped (--force redoes it)"
                                for p in ("a-probe", "b-probe")]  # not a terminal: no bars
    code, out, err = cli("--runs", str(two_runs), "-q")
    assert (code, out, err) == (0, "", "")  # -q: warnings and errors only
    code, _, err = cli("--runs", str(two_runs), "--verbose")
    assert code == 0 and "exporting ['a-probe', 'b-probe'] from" in err and "no --fp16, no engine" in err
    assert "a-probe: export is current" in err


def test_quiet_still_shows_errors_naming_the_run(two_runs):
    (two_runs / "b-probe" / "model.safetensors").unlink()  # a broken run
    code, out, err = cli("--runs", str(two_runs), "-q")
    assert code == 1 and out == ""
    assert "error: FAILED b-probe: FileNotFoundError" in err and "model.safetensors" in err
    assert "error: 1 of 2 runs failed: b-probe" in err and "a-probe" not in err  # -q: not the run that went well


def test_runs_bar_advances_once_per_run_on_a_terminal(two_runs, bars):
    code, _, err = cli("--runs", str(two_runs), terminal=True)
    assert code == 0
    (runs,) = [b for b in bars if b.desc == "export"]
    assert (runs.total, runs.steps, runs.shown) == (2, [1, 1], True)
    assert "export: 100%" in err and "2/2" in err and "a-probe: export is current" in err
    bars.clear()
    assert cli("--runs", str(two_runs), "--no-progress", terminal=True)[2].count("%|") == 0
    assert cli("--runs", str(two_runs), "-q", terminal=True)[2] == ""
    assert [b.shown for b in bars] == [False, False]


def test_a_failed_run_counts_once_and_the_others_go_on(tmp_path, monkeypatch, bars):
    """export_runs: one step per run whatever happens to it; a failure is logged with its error and kept."""
    seen = []

    def export_run(run_dir, opts, log=None):
        seen.append(run_dir.name)
        if run_dir.name == "b-probe":
            raise RuntimeError(f"{run_dir / 'export' / 'model.onnx'}: interpolation nodes ['resize']")

    monkeypatch.setattr(pipeline, "export_run", export_run)
    lines: list[str] = []
    runs = [tmp_path / n for n in ("a-probe", "b-probe", "c-probe")]
    assert export_runs(runs, ExportOptions(progress=True), log=lines.append) == ["b-probe"]
    assert seen == ["a-probe", "b-probe", "c-probe"]
    onnx = tmp_path / "b-probe" / "export" / "model.onnx"
    assert lines == [f"error: FAILED b-probe: RuntimeError: {onnx}: interpolation nodes ['resize']"]
    (bar,) = bars
    assert (bar.desc, bar.total, bar.steps) == ("export", 3, [1, 1, 1])


def test_each_run_has_a_bar_over_its_steps(tiny_runs, tmp_path, bars, capsys):
    """A real export of one run (fp32 only): the run's bar goes through load, ONNX export, parity check."""
    shutil.copytree(tiny_runs / "cnn-probe", tmp_path / "cnn-probe", ignore=shutil.ignore_patterns("export"))
    setup_logging(verbose=True)
    pipeline.export_run(tmp_path / "cnn-probe", ExportOptions(progress=True, n_images=16))
    (steps,) = bars
    assert (steps.desc, steps.total, steps.steps) == ("cnn-probe", 3, [1, 1, 1])
    err = capsys.readouterr().err
    for step in ("load run", "ONNX export", "parity check"):  # -v: each step timed
        assert f"cnn-probe: {step} in " in err
    assert f"wrote {tmp_path / 'cnn-probe' / 'export' / 'model.onnx'} (" in err  # -v: the files written
    assert "cnn-probe: parity passed on 16 test images" in err


def test_planned_steps():
    env = {"gpu": "x"}
    assert planned_steps(ExportOptions(), False, None) == ["load run", "ONNX export", "parity check"]
    assert planned_steps(ExportOptions(fp16=True), False, env) == [
        "load run", "ONNX export", "FP16 conversion", "parity check", "TensorRT engine build", "engine parity check"]
    assert planned_steps(ExportOptions(fp16=True), True, env) == [
        "load run", "parity check", "TensorRT engine build", "engine parity check"]
    assert planned_steps(ExportOptions(fp16=True), False, None)[-1] == "parity check"
