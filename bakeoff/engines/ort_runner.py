"""ONNX Runtime over a run's exported ONNX (``export/model.onnx`` or ``export/model.fp16.onnx``).

Execution providers by ``device``: ``cpu``; ``cuda`` (CUDA EP, CPU fallback for unsupported nodes);
``tensorrt`` (TensorRT EP, then CUDA, then CPU); ``auto`` picks CUDA when this onnxruntime build has it.
The TensorRT EP builds FP16 engines for the fp16 precision and keeps its engine and timing caches in
``export/ort-tensorrt-cache/`` (built once per GPU, then reloaded).
A provider that is asked for but missing (or that onnxruntime silently dropped at session creation) is an
error, never a quiet fallback to CPU: a latency figure must say what it ran on.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from bakeoff.common.device import device_name
from bakeoff.common.io import sha256_file
from bakeoff.engines.runners import (
    EXPORT,
    RUNTIMES,
    MissingExport,
    Runner,
    cpu_threads,
    export_hint,
)
from bakeoff.train.run import MODEL, read_run

ONNX_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx"}
PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
ONNX_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
TRT_CACHE = "ort-tensorrt-cache"  # under RUNS/<pair>/export/


def onnx_path(run_dir: str | Path, precision: str = "fp32") -> Path:
    """The exported ONNX file of ``run_dir`` for ``precision``; a clear error when it is missing."""
    if precision not in ONNX_FILES:
        raise ValueError(f"onnxruntime precision {precision!r}: choose from {list(ONNX_FILES)}")
    run_dir = Path(run_dir)
    path = run_dir / EXPORT / ONNX_FILES[precision]
    if not path.exists():
        raise MissingExport(f"{path}: no such file; the run has not been exported "
                            f"({export_hint(run_dir, precision == 'fp16')})")
    return path


def pick_providers(device: str, available: list[str]) -> list[str]:
    """The provider list for ``device``; raises when its first provider is not in ``available``."""
    if device == "auto":
        device = "cuda" if "CUDAExecutionProvider" in available else "cpu"
    if device not in PROVIDERS:
        raise ValueError(f"onnxruntime device {device!r}: choose from {['auto', *PROVIDERS]}")
    wanted = PROVIDERS[device]
    if wanted[0] not in available:
        raise RuntimeError(f"onnxruntime {ort.__version__} here has no {wanted[0]} (available: {available}); "
                           "install onnxruntime-gpu with the matching CUDA/TensorRT libraries")
    return [p for p in wanted if p in available]


def tensorrt_options(precision: str, cache_dir: Path) -> dict[str, str]:
    """TensorRT EP options: FP16 engines for ``fp16``; engine and timing caches in ``cache_dir``.

    Booleans are "True"/"False": onnxruntime's Python binding takes only "True"/"true"/"False"/"false" for them
    (onnxruntime_pybind_state.cc); "1"/"0" raise, and the session then quietly retries without TensorRT.
    """
    return {"trt_fp16_enable": str(precision == "fp16"),
            "trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache_dir),
            "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(cache_dir)}


def with_options(providers: list[str], precision: str, cache_dir: Path) -> list[str | tuple[str, dict[str, str]]]:
    """``providers`` as ``InferenceSession`` takes them, the TensorRT EP with its ``tensorrt_options``."""
    return [(p, tensorrt_options(precision, cache_dir)) if p == "TensorrtExecutionProvider" else p for p in providers]


class OrtRunner(Runner):
    """An ``onnxruntime.InferenceSession`` with pinned intra-op threads: ``threads``, else ``$OMP_NUM_THREADS``,
    else every core."""

    name = "onnxruntime"

    def __init__(self, run_dir: str | Path, device: str = "cpu", precision: str = "fp32", threads: int | None = None):
        run_dir = Path(run_dir)
        self.config, self.decision = read_run(run_dir)
        self.path = onnx_path(run_dir, precision)
        self.precision = precision
        providers = pick_providers(device, ort.get_available_providers())
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = cpu_threads(threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        cache_dir = run_dir / EXPORT / TRT_CACHE
        if "TensorrtExecutionProvider" in providers:
            cache_dir.mkdir(exist_ok=True)
        try:
            self.session = ort.InferenceSession(str(self.path), opts,
                                                providers=with_options(providers, precision, cache_dir))
        except Exception as e:  # onnxruntime's own Fail / InvalidGraph types derive from Exception only
            raise RuntimeError(f"{self.path}: onnxruntime {ort.__version__} cannot load it: {e}") from e
        self.providers = self.session.get_providers()
        if self.providers[0] != providers[0]:  # onnxruntime retries without a provider that failed to start
            raise RuntimeError(f"{self.path}: onnxruntime dropped {providers[0]} when creating the session "
                               f"(it runs on {self.providers}); its own 'EP Error' message above says why (the "
                               "CUDA/TensorRT libraries, or a provider option it refused)")
        (inp,), (out,) = self.session.get_inputs(), self.session.get_outputs()
        self.input_name, self.output_name = inp.name, out.name
        self.input_dtype = ONNX_DTYPES[inp.type]
        n_tags = len(self.config["taxonomy"])
        stale = f"the export is stale ({export_hint(run_dir, precision == 'fp16')})"
        if isinstance(out.shape[-1], int) and out.shape[-1] != n_tags:
            raise ValueError(f"{self.path}: {out.shape[-1]} outputs but the run has {n_tags} tags; {stale}")
        # export.onnx_export records the checkpoint's sha256 in the metadata (ONNX files made elsewhere may not)
        source = self.session.get_modelmeta().custom_metadata_map.get("source_sha256")
        if source and source != sha256_file(run_dir / MODEL):
            raise ValueError(f"{self.path}: exported from another checkpoint than {run_dir / MODEL} "
                             f"(sha256 {source[:12]}...); {stale}")
        on_cpu = self.providers[0] == "CPUExecutionProvider"
        self.threads = self.session.get_session_options().intra_op_num_threads if on_cpu else None
        # device_name(cpu) ends with torch's thread count; say onnxruntime's instead
        self.device = (f"{device_name(torch.device('cpu')).rsplit(' (', 1)[0]} ({self.threads} onnxruntime threads)"
                       if on_cpu else f"{device_name(torch.device('cuda'))} via {self.providers[0]}")

    def describe(self) -> dict:
        return super().describe() | {"providers": self.providers, "onnx": str(self.path)}

    def prepare(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        if isinstance(batch, torch.Tensor):
            batch = batch.detach().cpu().numpy()
        return np.ascontiguousarray(batch, dtype=self.input_dtype)

    def predict(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        (logits,) = self.session.run([self.output_name], {self.input_name: self.prepare(batch)})
        return logits.astype(np.float32, copy=False)


RUNTIMES["onnxruntime"] = OrtRunner
