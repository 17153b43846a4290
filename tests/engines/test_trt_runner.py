"""TrtRunner's pure parts, and its whole predict path over fake tensorrt / CUDA modules (both TensorRT APIs);
with real TensorRT and a GPU, the engine the export stage builds, through the real sidecar check."""
from __future__ import annotations

import importlib.util
import json
import shutil
import types

import numpy as np
import pytest
import torch

from engines.runners import MissingExport
from engines.trt_runner import (
    EngineError,
    TensorSpec,
    TrtRunner,
    api_for,
    chunks,
    find_engine,
    nbytes,
    resolve_shape,
    version_tuple,
)
from export import tensorrt as T
from train.run import read_run

SIZE, TAGS = 8, 30


def test_api_by_version():
    assert version_tuple("10.3.0.26") == (10, 3, 0, 26) and version_tuple("8.6.1.post1") == (8, 6, 1)
    assert [api_for(v) for v in ("7.2.3", "8.4.3.1", "8.5.1", "8.6.1.post1", "10.0.1", "11.0.0")] == \
        ["v2", "v2", "v3", "v3", "v3", "v3"]


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
    def __init__(self, cuda, profile):
        self.cuda, self.profile, self.addr, self.shape, self.enqueues = cuda, profile, {}, None, 0
        self.shapes_set: list[tuple[int, ...]] = []
        cuda.ctx = self

    def run(self):
        x = self.cuda.mem[self.addr["input"]][:nbytes(self.shape, np.float16)].view(np.float16).reshape(self.shape)
        out = expected_logits(x).astype(np.float16).view(np.uint8).ravel()
        self.cuda.mem[self.addr["logits"]][:out.size] = out
        self.cuda.now += 5.0

    def _set_shape(self, shape) -> bool:
        """TensorRT's verdict: False for a batch outside the profile (the runner must never ask for one)."""
        self.shape = tuple(shape)
        self.shapes_set.append(self.shape)
        return self.profile[0][0] <= self.shape[0] <= self.profile[2][0]

    # tensor-name API (TensorRT >= 8.5)
    def set_tensor_address(self, name, ptr):
        self.addr[name] = ptr

    def set_input_shape(self, name, shape):
        assert name == "input"
        return self._set_shape(shape)

    def execute_async_v3(self, stream_handle):
        assert stream_handle == 7
        self.enqueues += 1
        if not self.cuda.capturing:
            self.run()

    # bindings API (TensorRT < 8.5)
    def set_binding_shape(self, index, shape):
        assert index == 0
        return self._set_shape(shape)

    def execute_async_v2(self, bindings, stream_handle):
        self.addr = {"input": bindings[0], "logits": bindings[1]}
        self.enqueues += 1
        self.run()


IO = [("input", True, (-1, 3, SIZE, SIZE)), ("logits", False, (-1, TAGS))]
PROFILE = ((1, 3, SIZE, SIZE), (4, 3, SIZE, SIZE), (8, 3, SIZE, SIZE))


class FakeEngine:
    def __init__(self, cuda, profile):
        self.cuda, self.profile = cuda, profile
        self.num_io_tensors = self.num_bindings = len(IO)

    def create_execution_context(self):
        return FakeContext(self.cuda, self.profile)

    def get_tensor_name(self, i):
        return IO[i][0]

    def get_tensor_mode(self, name):
        return "IN" if {n: m for n, m, _ in IO}[name] else "OUT"

    def get_tensor_shape(self, name):
        return {n: s for n, _, s in IO}[name]

    def get_tensor_dtype(self, name):
        return np.float16

    def get_tensor_profile_shape(self, name, profile):
        return self.profile

    def get_binding_name(self, i):
        return IO[i][0]

    def binding_is_input(self, i):
        return IO[i][1]

    def get_binding_shape(self, i):
        return IO[i][2]

    def get_binding_dtype(self, i):
        return np.float16

    def get_profile_shape(self, profile, i):
        return self.profile


def fake_trt(version: str, cuda: FakeCuda, profile=PROFILE):
    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            assert blob == b"fake engine"
            return FakeEngine(cuda, profile)

    return types.SimpleNamespace(__version__=version, Logger=Logger, Runtime=Runtime, nptype=lambda dt: dt,
                                 TensorIOMode=types.SimpleNamespace(INPUT="IN", OUTPUT="OUT"))


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


def fake_runner(run, version: str = "10.3.0", profile=PROFILE, **kw) -> tuple[TrtRunner, FakeCuda]:
    cuda = FakeCuda()
    return TrtRunner(run, trt_module=fake_trt(version, cuda, profile), cuda=cuda, gpu=GPU, **kw), cuda


def batch(n: int) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(n))


@pytest.mark.parametrize("version, api", [("10.3.0", "v3"), ("8.4.3", "v2")])
def test_predict_through_either_api(trt_run, sidecar, version, api):
    runner, cuda = fake_runner(trt_run, version)
    assert runner.api == api and runner.max_batch == 8 and sidecar == [(runner.path, trt_run)]
    assert runner.path.name == ENGINE and runner.device == GPU
    assert sorted(a.nbytes for a in cuda.mem.values()) == [8 * TAGS * 2, 8 * 3 * SIZE * SIZE * 2]  # max batch, fp16
    for n in (3, 3, 8, 1):
        x = batch(n)
        got = runner.predict(x)
        assert got.dtype == np.float32 and got.shape == (n, TAGS)
        np.testing.assert_allclose(got, expected_logits(x.numpy().astype(np.float16)), rtol=2e-3, atol=2e-3)
    assert runner.context.shapes_set == [(n, 3, SIZE, SIZE) for n in (3, 8, 1)]  # set only when it changes
    assert runner.last_timing == {"h2d_ms": 1.0, "gpu_compute_ms": 5.0, "d2h_ms": 2.0, "enqueue_ms": pytest.approx(0, abs=50)}
    assert runner.describe()["api"] == api and runner.describe()["tensorrt"] == version
    assert runner.decision.groups == read_run(trt_run)[1].groups  # the run's rule, thresholds.json's groups
    runner.close()
    assert cuda.mem == {}


def test_batches_above_the_profile_run_in_chunks(trt_run, sidecar):
    runner, _ = fake_runner(trt_run)
    x = batch(20)
    got = runner.predict(x)
    np.testing.assert_allclose(got, expected_logits(x.numpy().astype(np.float16)), rtol=2e-3, atol=2e-3)
    assert got.shape == (20, TAGS) and [s[0] for s in runner.context.shapes_set] == [8, 4]  # 8, 8, 4
    assert runner.context.enqueues == 3
    assert {k: v for k, v in runner.last_timing.items() if k != "enqueue_ms"} == \
        {"h2d_ms": 3.0, "gpu_compute_ms": 15.0, "d2h_ms": 6.0}  # the three chunks' sums


def test_evaluate_scores_through_the_engine_with_batches_above_its_profile(trt_run, sidecar, tiny_data):
    """python -m evaluate --runtime tensorrt: evaluate's batch of 128 runs as chunks of the profile's max 8."""
    from evaluate.score import evaluate_run

    config = json.loads((trt_run / "config.json").read_text())
    config["preprocess"]["img_size"] = SIZE  # the fake engine's input size
    (trt_run / "config.json").write_text(json.dumps(config))
    cuda = FakeCuda()
    m = evaluate_run(trt_run, tiny_data, "tensorrt", batch_size=128, trt_module=fake_trt("10.3.0", cuda), cuda=cuda,
                     gpu=GPU)
    out = trt_run / "eval" / "tensorrt"
    assert m["status"] == "scored" and m["runtime"] == "tensorrt" and m["precision"] == "fp16"
    assert m["device"] == GPU and m["inference"]["batch_size"] == 128
    probs = np.load(out / "predictions.npy")
    assert probs.shape == (m["test"]["n_images"], TAGS) and (out / "per_tag.csv").exists()
    assert max(s[0] for s in cuda.ctx.shapes_set) == 8  # no query above the profile


def test_a_chunk_below_the_profile_min_is_padded(trt_run, sidecar):
    profile = ((2, 3, SIZE, SIZE), (4, 3, SIZE, SIZE), (8, 3, SIZE, SIZE))
    runner, _ = fake_runner(trt_run, profile=profile)
    for n in (1, 9):  # 1 -> a batch of 2; 9 -> 8 + (1 -> 2)
        x = batch(n)
        np.testing.assert_allclose(runner.predict(x), expected_logits(x.numpy().astype(np.float16)), rtol=2e-3, atol=2e-3)
    assert [s[0] for s in runner.context.shapes_set] == [2, 8, 2]


def test_a_refused_shape_or_bad_input_is_an_error(trt_run, sidecar):
    runner, _ = fake_runner(trt_run)
    runner.context.profile = ((4, 3, SIZE, SIZE),) * 3  # TensorRT disagrees with the profile read at load time
    with pytest.raises(EngineError, match=r"TensorRT refused input shape \(2, 3, 8, 8\); the profile read at load "
                                          r"time takes batches 1 to 8"):
        runner.predict(batch(2))
    with pytest.raises(EngineError, match=r"input of shape \(2, 3, 4, 4\), the engine takes \(N, 3, 8, 8\)"):
        runner.predict(np.zeros((2, 3, 4, 4), np.float32))
    with pytest.raises(EngineError, match="an empty batch"):
        runner.predict(np.zeros((0, 3, SIZE, SIZE), np.float32))


def test_cuda_graph_is_captured_once_per_shape(trt_run, sidecar):
    runner, cuda = fake_runner(trt_run, cuda_graph=True)
    for n in (2, 2, 2, 4, 10):  # 10 -> 8 + 2: no new shape
        x = batch(n)
        np.testing.assert_allclose(runner.predict(x), expected_logits(x.numpy().astype(np.float16)), rtol=2e-3, atol=2e-3)
    assert cuda.captures == 3 and cuda.graph_launches == 6
    with pytest.raises(EngineError, match="CUDA graphs need TensorRT >= 8.5"):
        fake_runner(trt_run, "8.4.3", cuda_graph=True)


def test_refuses_mismatched_missing_and_stale_engines(trt_run, sidecar):
    (trt_run / "export" / ENGINE).rename(trt_run / "export" / "model.t4.fp16.engine")
    with pytest.raises(T.EngineMismatch, match="built for sm_75"):
        TrtRunner(trt_run, trt_module=fake_trt("10.3.0", FakeCuda()), cuda=FakeCuda(), gpu="Tesla T4")
    with pytest.raises(MissingExport, match=rf"no {ENGINE} for this GPU \({GPU}\); the engines there "
                                            r"\(model.t4.fp16.engine\) are for other GPUs"):
        fake_runner(trt_run)
    (trt_run / "export" / ENGINE).write_bytes(b"fake engine")
    cfg = json.loads((trt_run / "config.json").read_text())
    (trt_run / "config.json").write_text(json.dumps(cfg | {"taxonomy": cfg["taxonomy"] + ["extra"]}))
    with pytest.raises(EngineError, match="30 outputs but the run has 31 tags; the engine is stale"):
        fake_runner(trt_run)


def test_the_real_sidecar_check_guards_the_runner(trt_run, monkeypatch):
    env = {"tensorrt": "10.3.0", "gpu": GPU, "compute_capability": "9.0", "gpu_slug": "fake-gpu"}
    monkeypatch.setattr(T, "current_trt_environment", lambda: env)
    engine = trt_run / "export" / ENGINE
    info = {"tensorrt": "10.3.0", "gpu": GPU, "compute_capability": "9.0", "profile": {}, "precision": "fp16",
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


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_without_tensorrt_says_what_to_install(trt_run, sidecar):
    with pytest.raises(EngineError, match=r"tensorrt is not installed: pip install -e .\[trt\]"):
        TrtRunner(trt_run)


def real_trt_missing() -> str | None:
    """Why the real-engine test cannot run here (None when it can)."""
    if (why := T.trt_unavailable_reason()) is not None:
        return why
    if importlib.util.find_spec("cuda") is None and importlib.util.find_spec("pycuda") is None:
        return "neither cuda-python nor pycuda is installed"
    return None


@pytest.mark.skipif(real_trt_missing() is not None,
                    reason=f"needs TensorRT, a CUDA GPU and cuda-python: {real_trt_missing()}")
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_exported_engine_matches_torch(tiny_runs, tmp_path, cuda_graph):
    """The engine export builds (its real builder, sidecar and parity check), run by the real runner."""
    from engines.runners import TorchRunner
    from export.pipeline import ExportOptions, export_run

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
