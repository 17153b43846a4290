"""A copy of the tiny cnn-probe run with ONNX exports (fp32 and fp16) made by the export stage's functions."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def export_onnx(run_dir: Path, fp16: bool = True) -> Path:
    """``run_dir/export/model.onnx`` (+ ``model.fp16.onnx``), made by the export stage's own functions."""
    from bakeoff.export.fp16 import convert_fp16
    from bakeoff.export.onnx_export import export_onnx as export_stage

    path = export_stage(run_dir)
    if fp16:
        convert_fp16(path, path.with_name("model.fp16.onnx"))
    return path


@pytest.fixture(scope="session")
def runs_onnx(tiny_runs, tmp_path_factory) -> Path:
    """A runs directory holding ``cnn-probe`` (exported: fp32 + fp16 ONNX) and ``cnn-ft`` (not exported)."""
    runs = tmp_path_factory.mktemp("engines") / "runs"
    for pair in ("cnn-probe", "cnn-ft"):
        shutil.copytree(tiny_runs / pair, runs / pair, ignore=shutil.ignore_patterns("export", "latency", "eval"))
    export_onnx(runs / "cnn-probe")
    return runs


@pytest.fixture(scope="session")
def run_onnx(runs_onnx) -> Path:
    return runs_onnx / "cnn-probe"
