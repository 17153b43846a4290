"""A copy of the tiny cnn-probe run with ONNX exports made here (fp32, and fp16 via onnxconverter_common)."""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch


def export_onnx(run_dir: Path, fp16: bool = True) -> Path:
    """``run_dir/export/model.onnx`` (+ ``model.fp16.onnx``) the way the export stage makes them."""
    import onnx
    from onnxconverter_common import float16

    from train.run import load_run

    model, config, _ = load_run(run_dir)
    size = config["preprocess"]["img_size"]
    path = run_dir / "export" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # the legacy exporter's deprecation; fp16's "number will be truncated"
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        torch.onnx.export(model, torch.zeros(2, 3, size, size), str(path), opset_version=17,
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          input_names=["input"], output_names=["logits"], dynamo=False)
        if fp16:
            half = float16.convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
            onnx.save(half, str(path.with_name("model.fp16.onnx")))
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
