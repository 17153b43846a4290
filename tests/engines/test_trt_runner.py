"""TrtRunner's pure parts, and its whole predict path over fake tensorrt / CUDA modules (both TensorRT APIs)."""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import types

import numpy as np
import pytest
import torch

from engines.runners import MissingExport
from engines.trt_runner import EngineError, TensorSpec, TrtRunner, api_for, nbytes, resolve_shape, version_tuple

SIZE, TAGS = 8, 30


def test_api_by_version():
    assert version_tuple("10.3.0.26") == (10, 3, 0, 26) and version_tuple("8.6.1.post1") == (8, 6, 1)
    assert [api_for(v) for v in ("7.2.3", "8.4.3.1", "8.5.1", "8.6.1.post1", "10.0.1", "11.0.0")] == \
        ["v2", "v2", "v3", "v3", "v3", "v3"]


def test_shapes_and_sizes():
    dynamic = TensorSpec("input", 0, True, (-1, 3, 224, 224), np.dtype(np.float16),
                         ((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224)))
    assert resolve_shape(dynamic, 8) == (8, 3, 224, 224) and dynamic.max_batch == 32
    assert nbytes(resolve_shape(dynamic, dynamic.max_batch), dynamic.dtype) == 32 * 3 * 224 * 224 * 2
    with pytest.raises(EngineError, match=r"batch 64 is outside the engine's optimisation profile .*\[1, 32\]"):
        resolve_shape(dynamic, 64)
    static = TensorSpec("input", 0, True, (4, 3, 224, 224), np.dtype(np.float32))
    assert resolve_shape(static, 4) == (4, 3, 224, 224) and static.max_batch == 4
    with pytest.raises(EngineError, match="static batch of 4, asked for 2"):
        resolve_shape(static, 2)
    with pytest.raises(EngineError, match="dynamic non-batch axes"):
        resolve_shape(TensorSpec("input", 0, True, (-1, 3, -1, -1), np.dtype(np.float32)), 1)


# ---------------------------------------------------------------- fakes of tensorrt and the CUDA runtime

class FakeCuda:
    """Device memory as numpy byte arrays; a clock that H2D (1 ms), compute (5 ms) and D2H (2 ms) advance."""

    def __init__(self):
        self.mem, self.now, self.graph_launches, self.captures = {}, 0.0, 0, 0
        self.capturing = False

    def malloc(self, n):
        ptr = 0x1000 * (len(self.mem) + 1)
        self.mem[ptr] = np.zeros(n, np.uint8)
        return ptr

    def free(self, ptr):
        del self.mem[ptr]

    def host_empty(self, n):
        return np.zeros(n, np.uint8)

    def stream(self):
        return "stream"

    def handle(self, stream):
        return 7

    def h2d(self, dst, src, stream):
        self.mem[dst][:src.nbytes] = src.view(np.uint8).ravel()
        self.now += 1.0

    def d2h(self, dst, src, stream):
        dst.view(np.uint8).ravel()[:] = self.mem[src][:dst.nbytes]
        self.now += 2.0

    def event(self):
        return {}

    def record(self, event, stream):
        event["t"] = self.now

    def elapsed_ms(self, start, end):
        return end["t"] - start["t"]

    def sync(self, stream):
        pass

    def begin_capture(self, stream):
        self.capturing = True

    def end_capture(self, stream):
        self.capturing, self.captures = False, self.captures + 1
        return "graph"

    def launch(self, graph, stream):
        self.graph_launches += 1
        self.ctx.run()

    def close(self):
        pass


def expected_logits(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1).astype(np.float32).mean(1, keepdims=True) * np.arange(TAGS, dtype=np.float32)


class FakeContext:
    def __init__(self, cuda):
        self.cuda, self.addr, self.shape, self.shape_calls, self.enqueues = cuda, {}, None, 0, 0
        cuda.ctx = self

    def run(self):
        n = self.shape[0]
        x = self.cuda.mem[self.addr["input"]][:nbytes(self.shape, np.float16)].view(np.float16).reshape(self.shape)
        out = expected_logits(x).astype(np.float16).view(np.uint8).ravel()
        self.cuda.mem[self.addr["logits"]][:out.size] = out
        self.cuda.now += 5.0
        assert n <= 8

    # tensor-name API (TensorRT >= 8.5)
    def set_tensor_address(self, name, ptr):
        self.addr[name] = ptr

    def set_input_shape(self, name, shape):
        assert name == "input"
        self.shape, self.shape_calls = tuple(shape), self.shape_calls + 1

    def execute_async_v3(self, stream_handle):
        assert stream_handle == 7
        self.enqueues += 1
        if not self.cuda.capturing:
            self.run()

    # bindings API (TensorRT < 8.5)
    def set_binding_shape(self, index, shape):
        assert index == 0
        self.shape, self.shape_calls = tuple(shape), self.shape_calls + 1

    def execute_async_v2(self, bindings, stream_handle):
        self.addr = {"input": bindings[0], "logits": bindings[1]}
        self.enqueues += 1
        self.run()


IO = [("input", True, (-1, 3, SIZE, SIZE)), ("logits", False, (-1, TAGS))]
PROFILE = ((1, 3, SIZE, SIZE), (4, 3, SIZE, SIZE), (8, 3, SIZE, SIZE))


class FakeEngine:
    def __init__(self, cuda):
        self.cuda = cuda
        self.num_io_tensors = self.num_bindings = len(IO)

    def create_execution_context(self):
        return FakeContext(self.cuda)

    def get_tensor_name(self, i):
        return IO[i][0]

    def get_tensor_mode(self, name):
        return "IN" if dict((n, m) for n, m, _ in IO)[name] else "OUT"

    def get_tensor_shape(self, name):
        return dict((n, s) for n, _, s in IO)[name]

    def get_tensor_dtype(self, name):
        return np.float16

    def get_tensor_profile_shape(self, name, profile):
        return PROFILE

    def get_binding_name(self, i):
        return IO[i][0]

    def binding_is_input(self, i):
        return IO[i][1]

    def get_binding_shape(self, i):
        return IO[i][2]

    def get_binding_dtype(self, i):
        return np.float16

    def get_profile_shape(self, profile, i):
        return PROFILE


def fake_trt(version: str, cuda: FakeCuda):
    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            assert blob == b"fake engine"
            return FakeEngine(cuda)

    return types.SimpleNamespace(__version__=version, Logger=Logger, Runtime=Runtime, nptype=lambda dt: dt,
                                 TensorIOMode=types.SimpleNamespace(INPUT="IN", OUTPUT="OUT"))


class EngineMismatch(RuntimeError):
    pass


@pytest.fixture
def sidecar(monkeypatch):
    """A stand-in for export.tensorrt.check_engine_sidecar: records calls; refuses engines named '*bad*'."""
    calls = []

    def check_engine_sidecar(engine_path, onnx_path=None):
        calls.append(engine_path)
        if "bad" in engine_path.name:
            raise EngineMismatch(f"{engine_path}: built for Tesla T4 / TensorRT 10.3, this is NVIDIA H200 / 10.8")
        return {"gpu": "Fake GPU"}

    module = types.ModuleType("export.tensorrt")
    module.check_engine_sidecar, module.EngineMismatch = check_engine_sidecar, EngineMismatch
    monkeypatch.setitem(sys.modules, "export.tensorrt", module)
    return calls


@pytest.fixture
def trt_run(run_onnx, tmp_path):
    run = tmp_path / "cnn-probe"
    run.mkdir()
    for name in ("config.json", "thresholds.json"):
        shutil.copy(run_onnx / name, run / name)
    (run / "export").mkdir()
    (run / "export" / "model.fakegpu.fp16.engine").write_bytes(b"fake engine")
    return run


def batch(n: int) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(n))


@pytest.mark.parametrize("version, api", [("10.3.0", "v3"), ("8.4.3", "v2")])
def test_predict_through_either_api(trt_run, sidecar, version, api):
    cuda = FakeCuda()
    runner = TrtRunner(trt_run, trt_module=fake_trt(version, cuda), cuda=cuda)
    assert runner.api == api and runner.max_batch == 8 and sidecar == [runner.path]
    assert sorted(a.nbytes for a in cuda.mem.values()) == [8 * TAGS * 2, 8 * 3 * SIZE * SIZE * 2]  # max batch, fp16
    for n in (3, 3, 8, 1):
        x = batch(n)
        got = runner.predict(x)
        assert got.dtype == np.float32 and got.shape == (n, TAGS)
        np.testing.assert_allclose(got, expected_logits(x.numpy().astype(np.float16)), rtol=2e-3, atol=2e-3)
    assert runner.context.shape_calls == 3  # the shape is set only when it changes
    assert runner.last_timing == {"gpu_compute_ms": 5.0, "host_latency_ms": 8.0}
    assert runner.describe()["api"] == api and runner.describe()["tensorrt"] == version
    with pytest.raises(EngineError, match="outside the engine's optimisation profile"):
        runner.predict(batch(9))
    runner.close()
    assert cuda.mem == {}


def test_cuda_graph_is_captured_once_per_shape(trt_run, sidecar):
    cuda = FakeCuda()
    runner = TrtRunner(trt_run, trt_module=fake_trt("10.3.0", cuda), cuda=cuda, cuda_graph=True)
    for n in (2, 2, 2, 4):
        x = batch(n)
        np.testing.assert_allclose(runner.predict(x), expected_logits(x.numpy().astype(np.float16)), rtol=2e-3, atol=2e-3)
    assert cuda.captures == 2 and cuda.graph_launches == 4
    with pytest.raises(EngineError, match="CUDA graphs need TensorRT >= 8.5"):
        TrtRunner(trt_run, trt_module=fake_trt("8.4.3", cuda), cuda=cuda, cuda_graph=True)


def test_refuses_mismatched_missing_and_stale_engines(trt_run, sidecar, tmp_path):
    cuda = FakeCuda()
    bad = trt_run / "export" / "model.bad.fp16.engine"
    shutil.move(trt_run / "export" / "model.fakegpu.fp16.engine", bad)
    with pytest.raises(EngineMismatch, match="built for Tesla T4"):
        TrtRunner(trt_run, trt_module=fake_trt("10.3.0", cuda), cuda=cuda)
    bad.unlink()
    with pytest.raises(MissingExport, match=r"no model.<gpu>.fp16.engine; build one on the target GPU"):
        TrtRunner(trt_run, trt_module=fake_trt("10.3.0", cuda), cuda=cuda)
    (trt_run / "export" / "model.fakegpu.fp16.engine").write_bytes(b"fake engine")
    cfg = json.loads((trt_run / "config.json").read_text())
    (trt_run / "config.json").write_text(json.dumps(cfg | {"taxonomy": cfg["taxonomy"] + ["extra"]}))
    with pytest.raises(EngineError, match="30 outputs but the run has 31 tags; the engine is stale"):
        TrtRunner(trt_run, trt_module=fake_trt("10.3.0", cuda), cuda=cuda)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_without_tensorrt_says_what_to_install(trt_run, sidecar):
    with pytest.raises(EngineError, match=r"tensorrt is not installed: pip install -e .\[trt\]"):
        TrtRunner(trt_run)


def build_engine(onnx_file, engine_file, max_batch: int = 8) -> None:
    """A dynamic-batch FP16 engine straight from the TensorRT API (what export does, minus its sidecar)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    explicit = 0 if version_tuple(trt.__version__)[0] >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(explicit)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(onnx_file.read_bytes()), [parser.get_error(i) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    if hasattr(trt.BuilderFlag, "FP16"):  # gone in TensorRT 11 (strongly typed networks)
        config.set_flag(trt.BuilderFlag.FP16)
    shape = tuple(network.get_input(0).shape)[1:]
    profile = builder.create_optimization_profile()
    profile.set_shape("input", (1, *shape), (4, *shape), (max_batch, *shape))
    config.add_optimization_profile(profile)
    engine_file.write_bytes(bytes(builder.build_serialized_network(network, config)))


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available(),
                    reason="needs tensorrt and a CUDA GPU")
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_real_engine_matches_torch(run_onnx, trt_run, sidecar, cuda_graph):
    from engines.runners import TorchRunner

    build_engine(run_onnx / "export" / "model.onnx", trt_run / "export" / "model.fakegpu.fp16.engine")
    size = json.loads((run_onnx / "config.json").read_text())["preprocess"]["img_size"]
    x = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(0))
    expected = TorchRunner(run_onnx, device="cpu").predict(x)
    runner = TrtRunner(trt_run, cuda_graph=cuda_graph)
    for _ in range(2):
        got = runner.predict(x)
        assert np.abs(got - expected).max() < 2e-2 * np.abs(expected).max()
    assert 0 < runner.last_timing["gpu_compute_ms"] <= runner.last_timing["host_latency_ms"]
    runner.close()
