"""TrtRunner's pure parts, and its whole predict path over faithful fakes of tensorrt and of both CUDA bindings
(cuda-python's ``cuda.bindings.runtime`` and pycuda), installed as the modules the runner imports; with real
TensorRT and a GPU, the engine the export stage builds, through the real sidecar check.

The fakes have the real APIs' names, signatures, return conventions and enum values, for every name the runner
uses; each was checked here, without a GPU, as follows.

TensorRT (wheels ``tensorrt_cu12_bindings-10.13.3.9`` and ``tensorrt_cu13_bindings-11.4.0.106`` from PyPI,
cp311 manylinux_2_28_x86_64; ``tensorrt.so`` imported against stub libnvinfer / libnvonnxparser /
libnvinfer_plugin libraries, then ``dir()``, ``int()`` of enum members and the pybind ``__doc__`` signatures;
``nptype`` and ``__version__`` are Python in the wheels' ``__init__.py``). The same in both versions:

| name                                                                 | real signature / value                     |
|----------------------------------------------------------------------|--------------------------------------------|
| ``__version__``                                                      | "10.13.3.9" / "11.4.0.106"                 |
| ``Logger(Logger.WARNING)``                                           | WARNING = 2                                |
| ``Runtime(logger).deserialize_cuda_engine(buffer)``                  | -> ICudaEngine, or None if it cannot       |
| ``ICudaEngine.create_execution_context()``                           | -> IExecutionContext (None on failure)     |
| ``ICudaEngine.num_io_tensors``                                       | property                                   |
| ``ICudaEngine.get_tensor_name(index)``                               | -> str                                     |
| ``ICudaEngine.get_tensor_mode(name)``, ``TensorIOMode.INPUT/OUTPUT`` | -> TensorIOMode; INPUT = 1, OUTPUT = 2     |
| ``ICudaEngine.get_tensor_shape(name)``                               | -> Dims (-1 for dynamic axes)              |
| ``ICudaEngine.get_tensor_dtype(name)``, ``nptype(DataType)``         | -> DataType (float32 = 0, float16 = 1)     |
| ``ICudaEngine.get_tensor_profile_shape(name, profile_index)``        | -> [min, opt, max] Dims                    |
| ``IExecutionContext.set_input_shape(name, shape)``                   | -> bool                                    |
| ``IExecutionContext.set_tensor_address(name, memory: int)``          | -> bool                                    |
| ``IExecutionContext.execute_async_v3(stream_handle: int)``           | -> bool                                    |
| ``ICudaEngine.num_bindings``, ``get_binding_*``, ``get_profile_shape``, ``IExecutionContext.execute_async_v2``, ``set_binding_shape`` | absent in both (removed in TensorRT 10) |

cuda-python: ``cuda.bindings.runtime`` of cuda-bindings 13.5.0 (installed here) and 12.9.4 (wheel from PyPI),
imported without a GPU, ``__doc__`` signatures and enum values; every call returns a tuple ``(cudaError_t,
*results)``. ``cuda.cudart`` (the pre-12.6 module) is deprecated in 12.9 and absent in 13: not used.

| name                                                                    | real signature / value                  |
|-------------------------------------------------------------------------|-----------------------------------------|
| ``cudaMalloc(size)`` / ``cudaFree(devPtr)``                             | -> (err, int) / (err,)                  |
| ``cudaMallocHost(size)`` / ``cudaFreeHost(ptr)``                        | -> (err, int) / (err,)                  |
| ``cudaStreamCreate()`` / ``cudaStreamDestroy(stream)``                  | -> (err, cudaStream_t) / (err,); ``int(stream)`` is the handle |
| ``cudaMemcpyAsync(dst, src, count, kind: cudaMemcpyKind, stream)``      | -> (err,); HostToDevice = 1, DeviceToHost = 2 |
| ``cudaEventCreate()`` / ``cudaEventDestroy(event)``                     | -> (err, cudaEvent_t) / (err,)          |
| ``cudaEventRecord(event, stream)``, ``cudaEventElapsedTime(start, end)``| -> (err,), (err, float ms)              |
| ``cudaStreamSynchronize(stream)``                                       | -> (err,)                               |
| ``cudaStreamBeginCapture(stream, mode: cudaStreamCaptureMode)``         | -> (err,); ThreadLocal = 1              |
| ``cudaStreamEndCapture(stream)``                                        | -> (err, cudaGraph_t)                   |
| ``cudaGraphInstantiate(graph, flags: int)``                             | -> (err, cudaGraphExec_t)               |
| ``cudaGraphLaunch(graphExec, stream)``, ``cudaGraphExecDestroy``, ``cudaGraphDestroy`` | -> (err,)                |
| ``cudaGetErrorString(error)``, ``cudaError_t``                          | -> (cudaSuccess, bytes); cudaSuccess = 0, cudaErrorInvalidValue = 1 |

pycuda 2026.1 (github inducer/pycuda at 19bed90, src/wrapper/wrap_cudadrv.cpp and pycuda/autoprimaryctx.py):
``import pycuda.autoprimaryctx`` (retains and pushes the device's primary context, since 2021.1);
``driver.mem_alloc(n)`` -> DeviceAllocation (``int()``, ``free()``); ``driver.pagelocked_empty(shape, dtype)`` ->
ndarray whose ``base`` is a PagelockedHostAllocation (``free()``); ``driver.Stream()`` (``handle``,
``synchronize()``); ``driver.Event()`` (``record(stream)``, ``time_till(end)`` ms); ``driver.memcpy_htod_async(dest,
src, stream)``, ``driver.memcpy_dtoh_async(dest, src, stream)``. It has no stream capture (no CUDA graphs).

The builder's TensorRT names are listed in tests/export/test_tensorrt.py.
"""
from __future__ import annotations

import ctypes
import enum
import json
import shutil
import sys
import types

import numpy as np
import pytest
import torch

from bakeoff.engines.runners import MissingExport
from bakeoff.engines.trt_runner import (
    CudaPython,
    EngineError,
    PyCuda,
    TensorSpec,
    TrtRunner,
    chunks,
    find_engine,
    load_cuda,
    nbytes,
    resolve_shape,
)
from bakeoff.export import tensorrt as T
from bakeoff.train.run import read_run

SIZE, TAGS = 8, 30


def test_shapes_and_sizes():
    dynamic = TensorSpec("input", 0, True, (-1, 3, 224, 224), np.dtype(np.float16),
                         ((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224)))
    assert resolve_shape(dynamic, 8) == (8, 3, 224, 224) and (dynamic.min_batch, dynamic.max_batch) == (1, 32)
    assert nbytes(resolve_shape(dynamic, dynamic.max_batch), dynamic.dtype) == 32 * 3 * 224 * 224 * 2
    with pytest.raises(EngineError, match=r"batch 64 is outside the engine's optimisation profile .*\[1, 32\]"):
        resolve_shape(dynamic, 64)
    static = TensorSpec("input", 0, True, (4, 3, 224, 224), np.dtype(np.float32))
    assert resolve_shape(static, 4) == (4, 3, 224, 224) and static.min_batch == static.max_batch == 4
    with pytest.raises(EngineError, match="static batch of 4, asked for 2"):
        resolve_shape(static, 2)
    with pytest.raises(EngineError, match="dynamic non-batch axes"):
        resolve_shape(TensorSpec("input", 0, True, (-1, 3, -1, -1), np.dtype(np.float32)), 1)


def test_chunks():
    assert chunks(20, 8) == [slice(0, 8), slice(8, 16), slice(16, 20)]
    assert chunks(8, 8) == [slice(0, 8)] and chunks(3, 8) == [slice(0, 3)] and chunks(0, 8) == []


def test_find_engine_picks_this_gpus_among_several(tmp_path):
    export = tmp_path / "cnn-probe" / "export"
    export.mkdir(parents=True)
    for name in ("model.t4.fp16.engine", "model.h200.fp16.engine", "model.h200.fp16.engine.json"):
        (export / name).write_bytes(b"")
    assert find_engine(tmp_path / "cnn-probe", "fp16", "Tesla T4") == export / "model.t4.fp16.engine"
    assert find_engine(tmp_path / "cnn-probe", "fp16", "NVIDIA H200") == export / "model.h200.fp16.engine"
    with pytest.raises(MissingExport, match=r"no model.a100-sxm4-80gb.fp16.engine for this GPU \(NVIDIA A100-SXM4-80GB\); "
                                            r"the engines there \(model.h200.fp16.engine, model.t4.fp16.engine\) are "
                                            r"for other GPUs; build one on it \(run python -m export --runs .* --fp16\)"):
        find_engine(tmp_path / "cnn-probe", "fp16", "NVIDIA A100-SXM4-80GB")
    with pytest.raises(EngineError, match="no CUDA GPU is visible"):
        find_engine(tmp_path / "cnn-probe", "fp16", None)


# ---------------------------------------------------------------- a fake GPU, and the two CUDA bindings over it

class FakeGpu:
    """Device and pinned memory as real host buffers (so addresses are real and copies are ``memmove``), a clock
    that H2D (1 ms), a TensorRT enqueue (5 ms) and D2H (2 ms) advance, stream capture, and a ledger of every
    handle created and not yet destroyed, by kind."""

    def __init__(self):
        self.now, self.buffers, self.capturing, self.graph_launches = 0.0, {}, {}, 0
        self.live: dict[str, set[int]] = {k: set() for k in ("device", "host", "stream", "event", "graph", "graph_exec")}
        self.created = dict.fromkeys(self.live, 0)
        self._next = 0x10

    def new(self, kind: str) -> int:
        self._next += 1
        self.live[kind].add(self._next)
        self.created[kind] += 1
        return self._next

    def destroy(self, kind: str, handle: int) -> bool:
        if handle not in self.live[kind]:
            return False
        self.live[kind].discard(handle)
        return True

    def alloc(self, kind: str, n: int) -> int:
        buf = ctypes.create_string_buffer(max(n, 1))
        ptr = ctypes.addressof(buf)
        self.buffers[ptr] = buf
        self.live[kind].add(ptr)
        self.created[kind] += 1
        return ptr

    def release(self, kind: str, ptr: int) -> bool:
        if ptr not in self.live[kind]:
            return False
        self.live[kind].discard(ptr)
        del self.buffers[ptr]
        return True

    def view(self, ptr: int, n: int) -> np.ndarray:
        return np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(ptr))

    def copy(self, dst: int, src: int, n: int, ms: float) -> None:
        ctypes.memmove(dst, src, n)
        self.now += ms

    def submit(self, stream: int, kernel) -> None:
        """Run ``kernel`` now, or record it into the graph being captured on ``stream``."""
        if stream in self.capturing:
            self.capturing[stream].append(kernel)
        else:
            kernel()

    def is_clean(self) -> bool:
        return all(not handles for handles in self.live.values())


class Handle:
    """cudaStream_t / cudaEvent_t / cudaGraph_t / cudaGraphExec_t: ``int()`` gives the raw handle."""

    def __init__(self, value: int):
        self.value = value

    def __int__(self):
        return self.value


def fake_cuda_bindings_runtime(gpu: FakeGpu) -> types.ModuleType:
    """``cuda.bindings.runtime`` over ``gpu``: the calls the runner makes, each returning ``(cudaError_t, ...)``."""
    rt = types.ModuleType("cuda.bindings.runtime")

    class cudaError_t(enum.IntEnum):
        cudaSuccess = 0
        cudaErrorInvalidValue = 1
        cudaErrorMemoryAllocation = 2
        cudaErrorInvalidResourceHandle = 400

    class cudaMemcpyKind(enum.IntEnum):
        cudaMemcpyHostToHost = 0
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    class cudaStreamCaptureMode(enum.IntEnum):
        cudaStreamCaptureModeGlobal = 0
        cudaStreamCaptureModeThreadLocal = 1
        cudaStreamCaptureModeRelaxed = 2

    ok, bad = (cudaError_t.cudaSuccess,), (cudaError_t.cudaErrorInvalidResourceHandle,)
    messages = {0: b"no error", 1: b"invalid argument", 2: b"out of memory", 400: b"invalid resource handle"}
    rt.cudaError_t, rt.cudaMemcpyKind, rt.cudaStreamCaptureMode = cudaError_t, cudaMemcpyKind, cudaStreamCaptureMode
    rt.cudaGetErrorString = lambda error: (cudaError_t.cudaSuccess, messages[int(error)])
    rt.cudaMalloc = lambda size: (cudaError_t.cudaSuccess, gpu.alloc("device", size))
    rt.cudaFree = lambda ptr: ok if gpu.release("device", int(ptr)) else (cudaError_t.cudaErrorInvalidValue,)
    rt.cudaMallocHost = lambda size: (cudaError_t.cudaSuccess, gpu.alloc("host", size))
    rt.cudaFreeHost = lambda ptr: ok if gpu.release("host", int(ptr)) else (cudaError_t.cudaErrorInvalidValue,)
    rt.cudaStreamCreate = lambda: (cudaError_t.cudaSuccess, Handle(gpu.new("stream")))
    rt.cudaStreamDestroy = lambda stream: ok if gpu.destroy("stream", int(stream)) else bad
    rt.cudaEventCreate = lambda: (cudaError_t.cudaSuccess, Handle(gpu.new("event")))
    rt.cudaEventDestroy = lambda event: ok if gpu.destroy("event", int(event)) else bad
    events: dict[int, float] = {}

    def cudaMemcpyAsync(dst, src, count, kind, stream):
        assert isinstance(kind, cudaMemcpyKind) and int(stream) in gpu.live["stream"]
        gpu.copy(int(dst), int(src), count, {cudaMemcpyKind.cudaMemcpyHostToDevice: 1.0,
                                             cudaMemcpyKind.cudaMemcpyDeviceToHost: 2.0}[kind])
        return ok

    def cudaEventRecord(event, stream):
        if int(event) not in gpu.live["event"] or int(stream) not in gpu.live["stream"]:
            return bad
        events[int(event)] = gpu.now
        return ok

    def cudaEventElapsedTime(start, end):
        return cudaError_t.cudaSuccess, events[int(end)] - events[int(start)]

    def cudaStreamSynchronize(stream):
        return ok if int(stream) in gpu.live["stream"] else bad

    def cudaStreamBeginCapture(stream, mode):
        assert isinstance(mode, cudaStreamCaptureMode)
        gpu.capturing[int(stream)] = []
        return ok

    graphs: dict[int, list] = {}

    def cudaStreamEndCapture(stream):
        handle = gpu.new("graph")
        graphs[handle] = gpu.capturing.pop(int(stream))
        return cudaError_t.cudaSuccess, Handle(handle)

    def cudaGraphInstantiate(graph, flags):
        assert isinstance(flags, int) and int(graph) in gpu.live["graph"]
        handle = gpu.new("graph_exec")
        graphs[handle] = list(graphs[int(graph)])
        return cudaError_t.cudaSuccess, Handle(handle)

    def cudaGraphLaunch(graph_exec, stream):
        if int(graph_exec) not in gpu.live["graph_exec"]:
            return bad
        gpu.graph_launches += 1
        for kernel in graphs[int(graph_exec)]:
            kernel()
        return ok

    rt.cudaMemcpyAsync, rt.cudaEventRecord, rt.cudaEventElapsedTime = cudaMemcpyAsync, cudaEventRecord, cudaEventElapsedTime
    rt.cudaStreamSynchronize, rt.cudaStreamBeginCapture, rt.cudaStreamEndCapture = (
        cudaStreamSynchronize, cudaStreamBeginCapture, cudaStreamEndCapture)
    rt.cudaGraphInstantiate, rt.cudaGraphLaunch = cudaGraphInstantiate, cudaGraphLaunch
    rt.cudaGraphDestroy = lambda graph: ok if gpu.destroy("graph", int(graph)) else bad
    rt.cudaGraphExecDestroy = lambda graph_exec: ok if gpu.destroy("graph_exec", int(graph_exec)) else bad
    return rt


class PagelockedHostAllocation:
    """What ``pycuda.driver.pagelocked_empty`` puts behind its array (``array.base``): ``free()``."""

    def __init__(self, gpu: FakeGpu, shape, dtype):
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        self.gpu, self.ptr = gpu, gpu.alloc("host", n)
        self.__array_interface__ = gpu.view(self.ptr, n).view(dtype).reshape(shape).__array_interface__

    def free(self):
        self.gpu.release("host", self.ptr)


def fake_pycuda_driver(gpu: FakeGpu) -> types.ModuleType:
    """``pycuda.driver`` over ``gpu`` (the calls the runner makes; streams and events die with their objects)."""
    drv = types.ModuleType("pycuda.driver")

    class DeviceAllocation:
        def __init__(self, n):
            self.ptr = gpu.alloc("device", n)

        def __int__(self):
            return self.ptr

        def free(self):
            gpu.release("device", self.ptr)

    class Stream:
        def __init__(self, flags=0):
            self.handle = gpu.new("stream")

        def synchronize(self):
            pass

        def __del__(self):
            gpu.destroy("stream", self.handle)

    class Event:
        def __init__(self, flags=0):
            self.handle = gpu.new("event")

        def record(self, stream=None):
            self.t = gpu.now
            return self

        def time_till(self, end):
            return end.t - self.t

        def __del__(self):
            gpu.destroy("event", self.handle)

    def pagelocked_empty(shape, dtype, order="C", mem_flags=0):
        return np.asarray(PagelockedHostAllocation(gpu, shape, dtype))  # its base is the allocation, as in pycuda

    def memcpy_htod_async(dest, src, stream=None):
        gpu.copy(int(dest), src.ctypes.data, src.nbytes, 1.0)

    def memcpy_dtoh_async(dest, src, stream=None):
        gpu.copy(dest.ctypes.data, int(src), dest.nbytes, 2.0)

    drv.mem_alloc, drv.pagelocked_empty, drv.Stream, drv.Event = DeviceAllocation, pagelocked_empty, Stream, Event
    drv.memcpy_htod_async, drv.memcpy_dtoh_async = memcpy_htod_async, memcpy_dtoh_async
    return drv


def install(monkeypatch, binding: str, gpu: FakeGpu) -> None:
    """Make ``binding`` ("cuda-python", "pycuda" or "none") the CUDA binding the runner can import."""
    if binding == "cuda-python":
        rt = fake_cuda_bindings_runtime(gpu)
        bindings = types.ModuleType("cuda.bindings")
        bindings.runtime = rt
        monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
        monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", rt)
    else:
        monkeypatch.setitem(sys.modules, "cuda.bindings", None)  # import cuda.bindings raises ImportError
    if binding == "pycuda":
        drv = fake_pycuda_driver(gpu)
        pycuda = types.ModuleType("pycuda")
        pycuda.driver = drv
        pycuda.autoprimaryctx = types.ModuleType("pycuda.autoprimaryctx")
        for name, module in (("pycuda", pycuda), ("pycuda.driver", drv), ("pycuda.autoprimaryctx", pycuda.autoprimaryctx)):
            monkeypatch.setitem(sys.modules, name, module)
    else:
        monkeypatch.setitem(sys.modules, "pycuda", None)
        monkeypatch.setitem(sys.modules, "pycuda.autoprimaryctx", None)


def test_load_cuda_prefers_cuda_python_then_pycuda(monkeypatch):
    gpu = FakeGpu()
    install(monkeypatch, "cuda-python", gpu)
    assert isinstance(load_cuda(), CudaPython)
    install(monkeypatch, "pycuda", gpu)
    assert isinstance(load_cuda(), PyCuda)
    install(monkeypatch, "none", gpu)
    with pytest.raises(EngineError, match=r"needs cuda-python \(cuda.bindings\) or pycuda: pip install -e .\[trt\]"):
        load_cuda()


def test_cuda_python_errors_name_the_cuda_error(monkeypatch):
    install(monkeypatch, "cuda-python", FakeGpu())
    cu = CudaPython()
    with pytest.raises(EngineError, match=r"CUDA error .*cudaErrorInvalidValue.*: invalid argument"):
        cu.free(12345)


# ---------------------------------------------------------------- a fake tensorrt (runtime side)

def expected_logits(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1).astype(np.float32).mean(1, keepdims=True) * np.arange(TAGS, dtype=np.float32)


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1


IO = [("input", TensorIOMode.INPUT, (-1, 3, SIZE, SIZE)), ("logits", TensorIOMode.OUTPUT, (-1, TAGS))]
PROFILE = ((1, 3, SIZE, SIZE), (4, 3, SIZE, SIZE), (8, 3, SIZE, SIZE))


class FakeContext:
    """``IExecutionContext``: refusals are False returns, as in TensorRT; ``refuse`` makes it refuse a call."""

    def __init__(self, gpu: FakeGpu, profile):
        self.gpu, self.profile, self.addr, self.shape, self.enqueues = gpu, profile, {}, None, 0
        self.shapes_set: list[tuple[int, ...]] = []
        self.refuse: set[str] = set()

    def set_input_shape(self, name: str, shape) -> bool:
        """False for a batch outside the profile (the runner must never ask for one)."""
        assert name == "input"
        shape = tuple(shape)
        self.shapes_set.append(shape)
        if "set_input_shape" in self.refuse or not self.profile[0][0] <= shape[0] <= self.profile[2][0]:
            return False
        self.shape = shape
        return True

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if "set_tensor_address" in self.refuse or name not in {n for n, _, _ in IO} or not isinstance(memory, int):
            return False
        self.addr[name] = memory
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        """False (nothing enqueued) without an input shape or an address for every I/O tensor, or when refused."""
        assert isinstance(stream_handle, int)
        if "execute_async_v3" in self.refuse or self.shape is None or set(self.addr) != {n for n, _, _ in IO}:
            return False
        if "capture" in self.refuse and stream_handle in self.gpu.capturing:  # an enqueue that cannot be captured
            return False
        self.enqueues += 1
        shape, addr = self.shape, dict(self.addr)

        def kernel():
            x = self.gpu.view(addr["input"], nbytes(shape, np.float16)).view(np.float16).reshape(shape)
            out = expected_logits(x).astype(np.float16).view(np.uint8).ravel()
            self.gpu.view(addr["logits"], out.size)[:] = out
            self.gpu.now += 5.0

        self.gpu.submit(stream_handle, kernel)
        return True


class FakeEngine:
    """``ICudaEngine`` (tensor-name API only: the bindings API is absent, as in TensorRT 10 and 11)."""

    def __init__(self, gpu, profile):
        self.gpu, self.profile, self.contexts = gpu, profile, []
        self.num_io_tensors = len(IO)

    def create_execution_context(self):
        self.contexts.append(FakeContext(self.gpu, self.profile))
        return self.contexts[-1]

    def get_tensor_name(self, index: int) -> str:
        return IO[index][0]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return {n: m for n, m, _ in IO}[name]

    def get_tensor_shape(self, name: str):
        return {n: s for n, _, s in IO}[name]

    def get_tensor_dtype(self, name: str) -> DataType:
        return DataType.HALF

    def get_tensor_profile_shape(self, name: str, profile_index: int):
        assert profile_index == 0
        return list(self.profile)


def fake_trt(version: str, gpu: FakeGpu, profile=PROFILE, engine: bool = True) -> types.SimpleNamespace:
    class Logger:
        WARNING = 2

        def __init__(self, level):
            assert level == self.WARNING

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, serialized_engine):
            assert serialized_engine == b"fake engine"
            return FakeEngine(gpu, profile) if engine else None

    return types.SimpleNamespace(__version__=version, Logger=Logger, Runtime=Runtime, TensorIOMode=TensorIOMode,
                                 nptype=lambda t: {DataType.FLOAT: np.float32, DataType.HALF: np.float16}[t])


def test_the_fakes_have_only_the_real_runtime_api():
    """The pre-TensorRT-10 bindings API is gone from the fakes as from the real bindings; calls return bool."""
    gpu = FakeGpu()
    engine = fake_trt("10.13.3.9", gpu).Runtime(None).deserialize_cuda_engine(b"fake engine")
    context = engine.create_execution_context()
    for name in ("num_bindings", "binding_is_input", "get_binding_shape", "get_binding_dtype", "get_profile_shape"):
        assert not hasattr(engine, name)
    for name in ("execute_async_v2", "set_binding_shape"):
        assert not hasattr(context, name)
    assert context.execute_async_v3(7) is False  # no shape, no addresses: TensorRT refuses, it does not raise
    assert context.set_tensor_address("nope", 0x100) is False and context.set_input_shape("input", (64, 3, 8, 8)) is False


@pytest.fixture
def sidecar(monkeypatch):
    """A stand-in for export.tensorrt.check_engine_sidecar: records calls; refuses T4 engines (this is no T4)."""
    calls = []

    def check_engine_sidecar(engine_path, run_dir=None, env=None):
        calls.append((engine_path, run_dir))
        if ".t4." in engine_path.name:
            raise T.EngineMismatch(f"{engine_path}: built for sm_75, this GPU is sm_90")
        return {"gpu": "Fake GPU"}

    monkeypatch.setattr(T, "check_engine_sidecar", check_engine_sidecar)
    return calls


GPU = "NVIDIA Fake GPU"
ENGINE = "model.fake-gpu.fp16.engine"


@pytest.fixture
def trt_run(run_onnx, tmp_path):
    """A run with the exported ONNX and checkpoint, and a fake engine for GPU (no sidecar)."""
    run = tmp_path / "cnn-probe"
    (run / "export").mkdir(parents=True)
    for name in ("config.json", "thresholds.json", "model.safetensors", "export/model.onnx"):
        shutil.copy(run_onnx / name, run / name)
    (run / "export" / ENGINE).write_bytes(b"fake engine")
    return run


@pytest.fixture
def fake_runner(monkeypatch):
    """``fake_runner(run, binding="cuda-python", version=..., profile=..., **TrtRunner kwargs)`` -> (runner, gpu):
    a TrtRunner over the fake tensorrt, loading ``binding`` (the fake module) as the runner itself does."""
    def make(run, binding: str = "cuda-python", version: str = "10.13.3.9", profile=PROFILE, gpu: FakeGpu | None = None,
             **kw) -> tuple[TrtRunner, FakeGpu]:
        gpu = gpu or FakeGpu()
        install(monkeypatch, binding, gpu)
        return TrtRunner(run, trt_module=fake_trt(version, gpu, profile), gpu=GPU, **kw), gpu
    return make


def batch(n: int) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(n))


def close_to_expected(got: np.ndarray, x: torch.Tensor) -> None:
    np.testing.assert_allclose(got, expected_logits(x.numpy().astype(np.float16)), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("binding, kind", [("cuda-python", CudaPython), ("pycuda", PyCuda)])
@pytest.mark.parametrize("version", ["10.13.3.9", "11.4.0.106"])
def test_predict_through_either_cuda_binding(trt_run, sidecar, fake_runner, binding, kind, version):
    runner, gpu = fake_runner(trt_run, binding, version)
    assert isinstance(runner.cu, kind) and runner.max_batch == 8 and sidecar == [(runner.path, trt_run)]
    assert runner.path.name == ENGINE and runner.device == GPU
    sizes = sorted(len(gpu.buffers[p]) for p in gpu.live["device"])
    assert sizes == [8 * TAGS * 2, 8 * 3 * SIZE * SIZE * 2] and len(gpu.live["host"]) == 2  # max batch, fp16
    for n in (3, 3, 8, 1):
        x = batch(n)
        got = runner.predict(x)
        assert got.dtype == np.float32 and got.shape == (n, TAGS)
        close_to_expected(got, x)
    assert runner.context.shapes_set == [(n, 3, SIZE, SIZE) for n in (3, 8, 1)]  # set only when it changes
    assert runner.last_timing == {"h2d_ms": 1.0, "gpu_compute_ms": 5.0, "d2h_ms": 2.0, "enqueue_ms": pytest.approx(0, abs=50)}
    assert runner.describe()["cuda"] == binding and runner.describe()["tensorrt"] == version
    assert runner.decision.groups == read_run(trt_run)[1].groups  # the run's rule, thresholds.json's groups
    runner.close()
    del runner
    assert gpu.is_clean(), gpu.live


def test_tensorrt_older_than_10_is_refused(trt_run, sidecar, fake_runner):
    with pytest.raises(EngineError, match="TensorRT 8.6.1 is too old: the runner needs TensorRT >= 10"):
        fake_runner(trt_run, version="8.6.1")


def test_batches_above_the_profile_run_in_chunks(trt_run, sidecar, fake_runner):
    runner, _ = fake_runner(trt_run)
    x = batch(20)
    got = runner.predict(x)
    close_to_expected(got, x)
    assert got.shape == (20, TAGS) and [s[0] for s in runner.context.shapes_set] == [8, 4]  # 8, 8, 4
    assert runner.context.enqueues == 3
    assert {k: v for k, v in runner.last_timing.items() if k != "enqueue_ms"} == \
        {"h2d_ms": 3.0, "gpu_compute_ms": 15.0, "d2h_ms": 6.0}  # the three chunks' sums


def test_evaluate_scores_through_the_engine_with_batches_above_its_profile(trt_run, sidecar, tiny_data, monkeypatch):
    """python -m evaluate --runtime tensorrt: evaluate's batch of 128 runs as chunks of the profile's max 8."""
    from bakeoff.evaluate.score import evaluate_run

    config = json.loads((trt_run / "config.json").read_text())
    config["preprocess"]["img_size"] = SIZE  # the fake engine's input size
    (trt_run / "config.json").write_text(json.dumps(config))
    gpu = FakeGpu()
    install(monkeypatch, "cuda-python", gpu)
    trt = fake_trt("10.13.3.9", gpu)
    engines = []
    deserialize = trt.Runtime.deserialize_cuda_engine
    trt.Runtime.deserialize_cuda_engine = lambda self, blob: engines.append(deserialize(self, blob)) or engines[-1]
    m = evaluate_run(trt_run, tiny_data, "tensorrt", batch_size=128, trt_module=trt, gpu=GPU)
    out = trt_run / "eval" / "tensorrt"
    assert m["status"] == "scored" and m["runtime"] == "tensorrt" and m["precision"] == "fp16"
    assert m["device"] == GPU and m["inference"]["batch_size"] == 128
    probs = np.load(out / "predictions.npy")
    assert probs.shape == (m["test"]["n_images"], TAGS) and (out / "per_tag.csv").exists()
    assert max(s[0] for s in engines[0].contexts[0].shapes_set) == 8  # no query above the profile


def test_a_chunk_below_the_profile_min_is_padded(trt_run, sidecar, fake_runner):
    profile = ((2, 3, SIZE, SIZE), (4, 3, SIZE, SIZE), (8, 3, SIZE, SIZE))
    runner, _ = fake_runner(trt_run, profile=profile)
    for n in (1, 9):  # 1 -> a batch of 2; 9 -> 8 + (1 -> 2)
        x = batch(n)
        close_to_expected(runner.predict(x), x)
    assert [s[0] for s in runner.context.shapes_set] == [2, 8, 2]


def test_a_refused_shape_or_bad_input_is_an_error(trt_run, sidecar, fake_runner):
    runner, _ = fake_runner(trt_run)
    runner.context.profile = ((4, 3, SIZE, SIZE),) * 3  # TensorRT disagrees with the profile read at load time
    with pytest.raises(EngineError, match=r"TensorRT refused input shape \(2, 3, 8, 8\); the profile read at load "
                                          r"time takes batches 1 to 8"):
        runner.predict(batch(2))
    with pytest.raises(EngineError, match=r"input of shape \(2, 3, 4, 4\), the engine takes \(N, 3, 8, 8\)"):
        runner.predict(np.zeros((2, 3, 4, 4), np.float32))
    with pytest.raises(EngineError, match="an empty batch"):
        runner.predict(np.zeros((0, 3, SIZE, SIZE), np.float32))


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_a_refused_enqueue_raises_and_returns_no_stale_outputs(trt_run, sidecar, fake_runner, cuda_graph):
    """``execute_async_v3`` returns False (it does not raise) when TensorRT refuses to enqueue: the runner must
    raise, not hand back the previous batch's logits and timings left in its buffers."""
    runner, gpu = fake_runner(trt_run, cuda_graph=cuda_graph)
    x = batch(4)
    close_to_expected(runner.predict(x), x)
    assert runner.last_timing is not None
    runner.context.refuse.add("execute_async_v3")
    if cuda_graph:  # the graph captured for this shape replays without asking TensorRT
        close_to_expected(runner.predict(y := batch(4).flip(0)), y)
    else:
        with pytest.raises(EngineError, match=r"refused to enqueue a batch of shape \(4, 3, 8, 8\).*no outputs"):
            runner.predict(batch(4).flip(0))
        assert runner.last_timing is None
    with pytest.raises(EngineError, match=r"TensorRT refused to enqueue a batch of shape \(2, 3, 8, 8\)"):
        runner.predict(batch(2))
    assert runner.last_timing is None
    runner.close()
    assert gpu.is_clean(), gpu.live


def test_an_enqueue_refused_during_capture_ends_the_capture(trt_run, sidecar, fake_runner):
    runner, gpu = fake_runner(trt_run, cuda_graph=True)
    runner.context.refuse.add("capture")
    with pytest.raises(EngineError, match=r"TensorRT refused to enqueue a batch of shape \(3, 3, 8, 8\)"):
        runner.predict(batch(3))
    assert not gpu.capturing and not gpu.live["graph"] and not gpu.live["graph_exec"]  # abandoned and destroyed
    assert runner.last_timing is None
    runner.context.refuse.clear()
    close_to_expected(runner.predict(x := batch(3)), x)
    runner.close()
    assert gpu.is_clean(), gpu.live


def test_a_refused_tensor_address_is_an_error_and_frees_what_was_made(trt_run, sidecar, monkeypatch):
    gpu = FakeGpu()
    install(monkeypatch, "cuda-python", gpu)
    trt = fake_trt("10.13.3.9", gpu)
    create = FakeEngine.create_execution_context

    def refusing(self):
        context = create(self)
        context.refuse.add("set_tensor_address")
        return context

    monkeypatch.setattr(FakeEngine, "create_execution_context", refusing)
    with pytest.raises(EngineError, match="TensorRT refused the device address of 'input'"):
        TrtRunner(trt_run, trt_module=trt, gpu=GPU)
    assert gpu.is_clean(), gpu.live


def test_cuda_graph_is_captured_once_per_shape(trt_run, sidecar, fake_runner):
    runner, gpu = fake_runner(trt_run, cuda_graph=True)
    for n in (2, 2, 2, 4, 10):  # 10 -> 8 + 2: no new shape
        x = batch(n)
        close_to_expected(runner.predict(x), x)
    assert gpu.created["graph_exec"] == 3 and gpu.graph_launches == 6
    close_to_expected(runner.predict(x), x)  # 10 again: only replays (8 + 2 rows), and the events time them
    assert gpu.graph_launches == 8 and runner.last_timing["gpu_compute_ms"] == 10.0
    runner.close()
    runner.close()  # twice is fine
    assert gpu.is_clean(), gpu.live
    assert gpu.created == {"device": 2, "host": 2, "stream": 1, "event": 4, "graph": 3, "graph_exec": 3}
    with pytest.raises(EngineError, match="the runner is closed"):
        runner.predict(batch(2))


def test_cuda_graphs_need_cuda_python(trt_run, sidecar, fake_runner):
    with pytest.raises(EngineError, match="CUDA graphs need cuda-python .*pycuda has no stream capture"):
        fake_runner(trt_run, "pycuda", cuda_graph=True)


def test_refuses_mismatched_missing_and_stale_engines(trt_run, sidecar, fake_runner):
    (trt_run / "export" / ENGINE).rename(trt_run / "export" / "model.t4.fp16.engine")
    with pytest.raises(T.EngineMismatch, match="built for sm_75"):
        TrtRunner(trt_run, trt_module=fake_trt("10.13.3.9", FakeGpu()), gpu="Tesla T4")
    with pytest.raises(MissingExport, match=rf"no {ENGINE} for this GPU \({GPU}\); the engines there "
                                            r"\(model.t4.fp16.engine\) are for other GPUs"):
        fake_runner(trt_run)
    (trt_run / "export" / ENGINE).write_bytes(b"fake engine")
    cfg = json.loads((trt_run / "config.json").read_text())
    (trt_run / "config.json").write_text(json.dumps(cfg | {"taxonomy": cfg["taxonomy"] + ["extra"]}))
    with pytest.raises(EngineError, match="30 outputs but the run has 31 tags; the engine is stale"):
        fake_runner(trt_run)


def test_an_engine_tensorrt_cannot_deserialize_is_an_error(trt_run, sidecar, monkeypatch):
    install(monkeypatch, "cuda-python", FakeGpu())
    with pytest.raises(EngineError, match="TensorRT 10.13.3.9 could not deserialize it"):
        TrtRunner(trt_run, trt_module=fake_trt("10.13.3.9", FakeGpu(), engine=False), gpu=GPU)


def test_the_real_sidecar_check_guards_the_runner(trt_run, monkeypatch, fake_runner):
    env = {"tensorrt": "10.13.3.9", "gpu": GPU, "compute_capability": "9.0", "gpu_slug": "fake-gpu"}
    monkeypatch.setattr(T, "current_trt_environment", lambda: env)
    engine = trt_run / "export" / ENGINE
    info = {"tensorrt": "10.13.3.9", "gpu": GPU, "compute_capability": "9.0", "profile": {}, "precision": "fp16",
            "onnx": "model.onnx", "onnx_sha256": T.sha256_file(trt_run / "export" / "model.onnx"),
            "checkpoint_sha256": T.sha256_file(trt_run / "model.safetensors"), "engine_sha256": T.sha256_file(engine),
            "built": "now"}
    T.write_engine_sidecar(engine, info)
    with pytest.raises(T.EngineMismatch, match="never checked against PyTorch"):
        fake_runner(trt_run)
    T.write_engine_sidecar(engine, info | {"parity": {"status": "passed"}})
    assert fake_runner(trt_run)[0].sidecar["gpu"] == GPU
    (trt_run / "model.safetensors").write_bytes(b"retrained")
    with pytest.raises(T.EngineMismatch, match="checkpoint model.safetensors changed"):
        fake_runner(trt_run)
    T.sidecar_path(engine).write_text("{")
    with pytest.raises(T.EngineMismatch, match=rf"{ENGINE}.json: not a valid sidecar \(JSONDecodeError"):
        fake_runner(trt_run)


@pytest.mark.skipif(T._import_tensorrt()[0] is not None, reason="tensorrt imports here")
def test_without_tensorrt_says_what_to_install(trt_run, sidecar):
    with pytest.raises(EngineError, match=r"tensorrt is not importable .*: pip install -e .\[trt\]"):
        TrtRunner(trt_run)


def test_bindings_without_their_libraries_say_what_to_install(trt_run, sidecar, monkeypatch):
    """tensorrt's bindings installed without libnvinfer raise OSError on import, not ImportError."""
    def no_libnvinfer(name):
        raise OSError("libnvinfer.so.10: cannot open shared object file: No such file or directory")

    monkeypatch.setattr("bakeoff.engines.trt_runner.importlib.import_module", no_libnvinfer)
    with pytest.raises(EngineError, match=r"tensorrt is not importable \(OSError: libnvinfer.so.10: cannot open"):
        TrtRunner(trt_run)


def real_trt_missing() -> str | None:
    """Why the real-engine test cannot run here (None when it can): imports are tried, not looked up."""
    if (why := T.trt_unavailable_reason()) is not None:
        return why
    for module in ("cuda.bindings.runtime", "pycuda.driver"):
        try:
            __import__(module)
            return None
        except Exception:  # noqa: BLE001, S112  ImportError, or a broken install
            continue
    return "neither cuda-python (cuda.bindings) nor pycuda imports"


@pytest.mark.skipif(real_trt_missing() is not None,
                    reason=f"needs TensorRT, a CUDA GPU and cuda-python: {real_trt_missing()}")
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_exported_engine_matches_torch(tiny_runs, tmp_path, cuda_graph):
    """The engine export builds (its real builder, sidecar and parity check), run by the real runner."""
    from bakeoff.engines.runners import TorchRunner
    from bakeoff.export.pipeline import ExportOptions, export_run

    run = tmp_path / "cnn-probe"
    shutil.copytree(tiny_runs / "cnn-probe", run, ignore=shutil.ignore_patterns("export", "latency", "eval"))
    opts = ExportOptions(fp16=True, engine=T.EngineOptions(min_batch=1, opt_batch=4, max_batch=8))
    assert export_run(run, opts, log=lambda line: None)["results"]["tensorrt_fp16"]["status"] == "passed"
    size = json.loads((run / "config.json").read_text())["preprocess"]["img_size"]
    x = torch.randn(13, 3, size, size, generator=torch.Generator().manual_seed(0))  # 13 > max batch 8: two chunks
    expected = TorchRunner(run, device="cpu").predict(x)
    runner = TrtRunner(run, cuda_graph=cuda_graph)
    assert runner.path.name == T.engine_name(T.current_trt_environment()) and runner.max_batch == 8
    assert runner.sidecar["parity"]["status"] == "passed"
    for _ in range(2):
        got = runner.predict(x)
        assert got.shape == expected.shape and np.abs(got - expected).max() < 2e-2 * np.abs(expected).max()
    assert 0 < runner.last_timing["gpu_compute_ms"] and runner.last_timing["h2d_ms"] > 0
    runner.close()
