"""TensorRT over a run's serialized engine (``export/model.<gpu>.fp16.engine``, checked against its sidecar .json).

Needs ``tensorrt`` (>= 10) and cuda-python (``cuda.bindings.runtime``, cuda-python >= 12.6), with pycuda as a
fallback (no CUDA graphs there). The engine is this GPU's (engines are named per GPU, so several coexist in one
export folder) and must pass export.tensorrt's sidecar check. Pinned host buffers and device buffers are sized
once for the largest batch of the engine's optimisation profile; ``predict`` runs a batch in chunks of at most
that size (the last zero-padded up to the profile's smallest batch), each copied H2D, enqueued and copied D2H on
one stream with every leg timed by CUDA events (``last_timing``: the chunks' sums), optionally replaying one
captured CUDA graph per chunk size.

TensorRT's tensor-name API only (``set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3``: the only
one in TensorRT 10 and 11). Its calls report failure by returning False (a refused shape, address or enqueue):
each result is checked, so a refused call raises ``EngineError`` and never returns stale buffers or timings.
``close`` frees every device, pinned-host, stream, event and CUDA graph handle the runner created. The pure parts
(shape resolution, buffer sizing, chunking) are plain functions.
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib
import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch

from bakeoff.engines.runners import EXPORT, RUNTIMES, MissingExport, Runner, export_hint
from bakeoff.export import tensorrt as trt_export
from bakeoff.train.run import read_run

MIN_TENSORRT = 10  # the [trt] extra's floor; the tensor-name API below is all TensorRT 10 and 11 have


class EngineError(RuntimeError):
    """An engine this runner cannot use as asked (shape, batch, refused call, missing library)."""


@dataclass(frozen=True)
class TensorSpec:
    """One engine input or output: ``shape`` has -1 for dynamic dims; ``profile`` is (min, opt, max) shapes."""

    name: str
    index: int
    is_input: bool
    shape: tuple[int, ...]
    dtype: np.dtype
    profile: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None = None

    @property
    def min_batch(self) -> int:
        return self.profile[0][0] if self.profile else self.shape[0]

    @property
    def max_batch(self) -> int:
        return self.profile[2][0] if self.profile else self.shape[0]


def resolve_shape(spec: TensorSpec, batch: int) -> tuple[int, ...]:
    """The concrete shape of ``spec`` at ``batch``; only the batch axis may be dynamic."""
    if any(d < 0 for d in spec.shape[1:]):
        raise EngineError(f"tensor {spec.name!r} {spec.shape}: dynamic non-batch axes are not supported")
    if spec.shape[0] >= 0 and spec.shape[0] != batch:
        raise EngineError(f"tensor {spec.name!r} has a static batch of {spec.shape[0]}, asked for {batch}")
    if spec.profile and not spec.profile[0][0] <= batch <= spec.profile[2][0]:
        raise EngineError(f"batch {batch} is outside the engine's optimisation profile for {spec.name!r} "
                          f"[{spec.profile[0][0]}, {spec.profile[2][0]}]; rebuild the engine with a wider profile")
    return (batch, *spec.shape[1:])


def nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


def read_io(engine: Any, trt: Any) -> list[TensorSpec]:
    """The engine's I/O tensors (tensor-name API), with optimisation profile 0 of dynamic inputs."""
    specs = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        shape = tuple(engine.get_tensor_shape(name))
        profile = engine.get_tensor_profile_shape(name, 0) if is_input and -1 in shape else None
        specs.append(TensorSpec(name, i, is_input, shape, np.dtype(trt.nptype(engine.get_tensor_dtype(name))),
                                tuple(tuple(s) for s in profile) if profile else None))
    return specs


class CudaPython:
    """The CUDA runtime calls the runner needs, through cuda-python's ``cuda.bindings.runtime`` (each call returns
    ``(cudaError_t, *results)``; an error raises ``EngineError``)."""

    name = "cuda-python"
    graphs = True

    def __init__(self):
        from cuda.bindings import runtime as rt
        self.rt = rt
        self._host: list[int] = []

    def _ok(self, result: tuple) -> Any:
        err, *rest = result
        if err != self.rt.cudaError_t.cudaSuccess:
            text = self.rt.cudaGetErrorString(err)[1]
            raise EngineError(f"CUDA error {getattr(err, 'name', err)} ({int(err)}): "
                              f"{text.decode() if isinstance(text, bytes) else text}")
        return rest[0] if len(rest) == 1 else (rest or None)

    def malloc(self, n: int) -> int:
        return int(self._ok(self.rt.cudaMalloc(n)))

    def free(self, ptr: int) -> None:
        self._ok(self.rt.cudaFree(ptr))

    def host_empty(self, n: int) -> np.ndarray:
        """``n`` bytes of pinned host memory as a uint8 array (freed by ``close``)."""
        ptr = int(self._ok(self.rt.cudaMallocHost(n)))
        self._host.append(ptr)
        return np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(ptr))

    def stream(self) -> Any:
        return self._ok(self.rt.cudaStreamCreate())

    def destroy_stream(self, stream: Any) -> None:
        self._ok(self.rt.cudaStreamDestroy(stream))

    def handle(self, stream: Any) -> int:
        return int(stream)

    def h2d(self, dst: int, src: np.ndarray, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._ok(self.rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, kind, stream))

    def d2h(self, dst: np.ndarray, src: int, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._ok(self.rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, kind, stream))

    def event(self) -> Any:
        return self._ok(self.rt.cudaEventCreate())

    def destroy_event(self, event: Any) -> None:
        self._ok(self.rt.cudaEventDestroy(event))

    def record(self, event: Any, stream: Any) -> None:
        self._ok(self.rt.cudaEventRecord(event, stream))

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return float(self._ok(self.rt.cudaEventElapsedTime(start, end)))

    def sync(self, stream: Any) -> None:
        self._ok(self.rt.cudaStreamSynchronize(stream))

    def begin_capture(self, stream: Any) -> None:
        self._ok(self.rt.cudaStreamBeginCapture(stream, self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))

    def end_capture(self, stream: Any) -> Any:
        """End the capture on ``stream``: its instantiated graph (the captured graph itself is destroyed here)."""
        graph = self._ok(self.rt.cudaStreamEndCapture(stream))
        try:
            return self._ok(self.rt.cudaGraphInstantiate(graph, 0))
        finally:
            self._ok(self.rt.cudaGraphDestroy(graph))

    def launch(self, graph_exec: Any, stream: Any) -> None:
        self._ok(self.rt.cudaGraphLaunch(graph_exec, stream))

    def destroy_graph(self, graph_exec: Any) -> None:
        self._ok(self.rt.cudaGraphExecDestroy(graph_exec))

    def close(self) -> None:
        for ptr in self._host:
            self._ok(self.rt.cudaFreeHost(ptr))
        self._host.clear()


class PyCuda:
    """The same calls through pycuda (>= 2021.1) on the device's primary context (the one torch and TensorRT use);
    pycuda has no stream capture, so no CUDA graphs."""

    name = "pycuda"
    graphs = False

    def __init__(self):
        import pycuda.autoprimaryctx  # noqa: F401  (retains and pushes the primary context)
        import pycuda.driver as drv
        self.drv = drv
        self._alloc: dict[int, Any] = {}
        self._host: list[np.ndarray] = []

    def malloc(self, n: int) -> int:
        alloc = self.drv.mem_alloc(n)
        self._alloc[int(alloc)] = alloc
        return int(alloc)

    def free(self, ptr: int) -> None:
        self._alloc.pop(ptr).free()

    def host_empty(self, n: int) -> np.ndarray:
        """``n`` bytes of pinned host memory as a uint8 array (freed by ``close``)."""
        array = self.drv.pagelocked_empty(n, np.uint8)
        self._host.append(array)
        return array

    def stream(self) -> Any:
        return self.drv.Stream()

    def destroy_stream(self, stream: Any) -> None:
        pass  # pycuda destroys a Stream when its last reference goes; the runner drops its own

    def handle(self, stream: Any) -> int:
        return stream.handle

    def h2d(self, dst: int, src: np.ndarray, stream: Any) -> None:
        self.drv.memcpy_htod_async(dst, src, stream)

    def d2h(self, dst: np.ndarray, src: int, stream: Any) -> None:
        self.drv.memcpy_dtoh_async(dst, src, stream)

    def event(self) -> Any:
        return self.drv.Event()

    def destroy_event(self, event: Any) -> None:
        pass  # as for streams

    def record(self, event: Any, stream: Any) -> None:
        event.record(stream)

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return start.time_till(end)

    def sync(self, stream: Any) -> None:
        stream.synchronize()

    def close(self) -> None:
        for alloc in self._alloc.values():
            alloc.free()
        self._alloc.clear()
        for array in self._host:
            array.base.free()  # the PagelockedHostAllocation behind the array
        self._host.clear()


def load_cuda() -> CudaPython | PyCuda:
    """cuda-python's runtime bindings, else pycuda; ``EngineError`` saying what to install when neither imports."""
    errors = []
    for binding in (CudaPython, PyCuda):
        try:
            return binding()
        except ImportError as e:
            errors.append(f"{binding.name}: {e}")
    raise EngineError("the tensorrt runtime needs cuda-python (cuda.bindings) or pycuda: pip install -e .[trt] "
                      f"({'; '.join(errors)})")


def find_engine(run_dir: Path, precision: str, gpu: str | None) -> Path:
    """``export/model.<gpu slug>.<precision>.engine`` of ``run_dir`` for the GPU named ``gpu``."""
    if gpu is None:
        raise EngineError("no CUDA GPU is visible to torch; the tensorrt runtime needs one")
    export = run_dir / EXPORT
    path = export / trt_export.engine_name({"gpu_slug": trt_export.gpu_slug(gpu)}, precision)
    if path.exists():
        return path
    others = sorted(p.name for p in export.glob(f"model.*.{precision}.engine"))
    there = f"; the engines there ({', '.join(others)}) are for other GPUs" if others else ""
    raise MissingExport(f"{export}: no {path.name} for this GPU ({gpu}){there}; build one on it "
                        f"({export_hint(run_dir, precision == 'fp16')})")


def chunks(n: int, size: int) -> list[slice]:
    """Consecutive slices of at most ``size`` rows covering ``n`` rows."""
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


class TrtRunner(Runner):
    """A deserialized TensorRT engine with one input (N x 3 x S x S) and one output (N x T)."""

    name = "tensorrt"

    def __init__(self, run_dir: str | Path, precision: str = "fp16", engine: str | Path | None = None,
                 cuda_graph: bool = False, device: str = "cuda", trt_module: Any = None, cuda: Any = None,
                 gpu: str | None = None):
        """``engine`` defaults to the run's engine for ``gpu`` (default: the name of torch's current CUDA device)."""
        if device not in ("cuda", "auto"):
            raise ValueError(f"the tensorrt runtime runs on a CUDA GPU, not {device!r}")
        if trt_module is None:
            try:
                trt_module = importlib.import_module("tensorrt")
            except Exception as e:  # noqa: BLE001  ImportError, or OSError from bindings without libnvinfer
                raise EngineError(f"tensorrt is not importable ({type(e).__name__}: {e}): pip install -e .[trt] "
                                  "(on a machine with a GPU)") from None
        run_dir = Path(run_dir)
        self.config, self.decision = read_run(run_dir)
        self.precision = precision
        self.trt_version = trt_module.__version__
        if trt_export.major_version(self.trt_version) < MIN_TENSORRT:
            raise EngineError(f"TensorRT {self.trt_version} is too old: the runner needs TensorRT >= {MIN_TENSORRT}")
        gpu = gpu or (torch.cuda.get_device_name() if torch.cuda.is_available() else None)
        self.path = Path(engine) if engine else find_engine(run_dir, precision, gpu)
        self.sidecar = trt_export.check_engine_sidecar(self.path, run_dir)
        self.cuda_graph = cuda_graph
        self.cu = cuda or load_cuda()
        if cuda_graph and not self.cu.graphs:
            raise EngineError(f"CUDA graphs need cuda-python (pip install cuda-python); {self.cu.name} has no stream "
                              "capture here")
        self._buffers: dict[str, tuple[int, np.ndarray]] = {}
        self._events: list[Any] = []
        self._graphs: dict[tuple[int, ...], Any] = {}
        self.stream = None
        self._logger = trt_module.Logger(trt_module.Logger.WARNING)
        self.engine = trt_module.Runtime(self._logger).deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise EngineError(f"{self.path}: TensorRT {self.trt_version} could not deserialize it (see its log above)")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise EngineError(f"{self.path}: TensorRT could not create an execution context (see its log above)")
        specs = read_io(self.engine, trt_module)
        inputs, outputs = [s for s in specs if s.is_input], [s for s in specs if not s.is_input]
        if len(inputs) != 1 or len(outputs) != 1:
            raise EngineError(f"{self.path}: expected one input and one output, found {[s.name for s in specs]}")
        self.input, self.output = inputs[0], outputs[0]
        self.max_batch = self.input.max_batch
        if self.output.shape[-1] != len(self.config["taxonomy"]):
            raise EngineError(f"{self.path}: {self.output.shape[-1]} outputs but the run has "
                              f"{len(self.config['taxonomy'])} tags; the engine is stale")
        try:
            self.stream = self.cu.stream()
            for spec in (self.input, self.output):
                size = nbytes(resolve_shape(spec, self.max_batch), spec.dtype)
                self._buffers[spec.name] = (self.cu.malloc(size), self.cu.host_empty(size).view(spec.dtype))
                if not self.context.set_tensor_address(spec.name, self._buffers[spec.name][0]):
                    raise EngineError(f"{self.path}: TensorRT refused the device address of {spec.name!r} "
                                      "(see its log above)")
            self._events = [self.cu.event() for _ in range(4)]
        except BaseException:
            self.close()
            raise
        self._shape: tuple[int, ...] | None = None
        self.device = gpu or "CUDA GPU"

    def describe(self) -> dict:
        return super().describe() | {"engine": str(self.path), "tensorrt": self.trt_version, "cuda": self.cu.name,
                                     "cuda_graph": self.cuda_graph, "max_batch": self.max_batch}

    def prepare(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        if isinstance(batch, torch.Tensor):
            batch = batch.detach().cpu().numpy()
        return np.ascontiguousarray(batch, dtype=self.input.dtype)

    def _set_shape(self, shape: tuple[int, ...]) -> None:
        """Set the input shape when it changed; ``EngineError`` when TensorRT refuses it."""
        if shape == self._shape:
            return
        self._shape = None  # unknown until TensorRT accepts the new one
        if not self.context.set_input_shape(self.input.name, shape):
            raise EngineError(f"{self.path}: TensorRT refused input shape {shape}; the profile read at load time "
                              f"takes batches {self.input.min_batch} to {self.input.max_batch} (see its log above)")
        self._shape = shape

    def _execute(self, handle: int, shape: tuple[int, ...]) -> None:
        """One ``execute_async_v3``; ``EngineError`` when TensorRT refuses the enqueue (nothing ran)."""
        if not self.context.execute_async_v3(handle):
            raise EngineError(f"{self.path}: TensorRT refused to enqueue a batch of shape {shape} (see its log "
                              "above); no outputs were produced")

    def _capture(self, handle: int, shape: tuple[int, ...]) -> Any:
        """A CUDA graph of one enqueue at ``shape``; the stream leaves capture mode even when the enqueue fails."""
        self._execute(handle, shape)  # TensorRT wants one plain enqueue after a shape change before capture
        self.cu.begin_capture(self.stream)
        try:
            self._execute(handle, shape)
        except BaseException:
            with contextlib.suppress(EngineError):  # the refusal is the error to report
                self.cu.destroy_graph(self.cu.end_capture(self.stream))
            raise
        return self.cu.end_capture(self.stream)

    def _enqueue(self, shape: tuple[int, ...]) -> None:
        handle = self.cu.handle(self.stream)
        self._set_shape(shape)
        if not self.cuda_graph:
            self._execute(handle, shape)
            return
        if shape not in self._graphs:
            self._graphs[shape] = self._capture(handle, shape)
        self.cu.launch(self._graphs[shape], self.stream)

    def _run(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        """Logits and timings (ms) of at most ``max_batch`` rows, zero-padded up to the profile's min batch."""
        if self.stream is None:
            raise EngineError(f"{self.path}: the runner is closed")
        n = len(x)
        rows = max(n, self.input.min_batch)
        in_shape, out_shape = resolve_shape(self.input, rows), resolve_shape(self.output, rows)
        if x.shape[1:] != in_shape[1:]:
            raise EngineError(f"{self.path}: input of shape {x.shape}, the engine takes (N, "
                              f"{', '.join(map(str, in_shape[1:]))})")
        (d_in, h_in), (d_out, h_out) = self._buffers[self.input.name], self._buffers[self.output.name]
        h_in, h_out = h_in[:math.prod(in_shape)].reshape(in_shape), h_out[:math.prod(out_shape)].reshape(out_shape)
        h_in[:n], h_in[n:] = x, 0
        cu, s, ev = self.cu, self.stream, self._events
        cu.record(ev[0], s)
        cu.h2d(d_in, h_in, s)
        cu.record(ev[1], s)
        start = time.perf_counter()
        try:
            self._enqueue(in_shape)
        except BaseException:
            with contextlib.suppress(EngineError):  # let the queued copy finish before the buffers are reused
                cu.sync(s)
            raise
        enqueue_ms = (time.perf_counter() - start) * 1e3
        cu.record(ev[2], s)
        cu.d2h(h_out, d_out, s)
        cu.record(ev[3], s)
        cu.sync(s)
        h2d, compute, d2h = (cu.elapsed_ms(a, b) for a, b in itertools.pairwise(ev))
        return h_out[:n].astype(np.float32), {"h2d_ms": h2d, "gpu_compute_ms": compute, "d2h_ms": d2h,
                                              "enqueue_ms": enqueue_ms}

    def predict(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """Logits (float32 N x T) of ``batch``, run in chunks of at most the engine's max batch."""
        x = self.prepare(batch)
        if not len(x):
            raise EngineError(f"{self.path}: an empty batch")
        self.last_timing = None  # a failed call leaves no timing behind
        runs = [self._run(x[part]) for part in chunks(len(x), self.max_batch)]
        self.last_timing = {k: math.fsum(t[k] for _, t in runs) for k in runs[0][1]}
        return np.concatenate([logits for logits, _ in runs])

    def close(self) -> None:
        """Free what the runner created: CUDA graph execs, events, the stream, device and pinned buffers. Safe to
        call twice; the runner cannot predict afterwards."""
        cu = getattr(self, "cu", None)
        if cu is None:
            return
        calls = [(cu.destroy_graph, g) for g in self._graphs.values()] + [(cu.destroy_event, e) for e in self._events]
        calls += [(cu.destroy_stream, self.stream)] if self.stream is not None else []
        calls += [(cu.free, d_ptr) for d_ptr, _ in self._buffers.values()]
        self._graphs, self._events, self.stream, self._buffers = {}, [], None, {}
        errors = []
        for free, handle in [*calls, (lambda _: cu.close(), None)]:
            try:  # one handle CUDA refuses to free must not leak the others
                free(handle)
            except EngineError as e:
                errors.append(e)
        if errors:
            raise errors[0]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


RUNTIMES["tensorrt"] = TrtRunner
