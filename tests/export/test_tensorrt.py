"""TensorRT export: the pure parts everywhere, the build driven by a fake ``tensorrt``; a real build on a GPU.

The fake is faithful, per major version, to every TensorRT name ``export.tensorrt`` uses. Each was read from the
real Python bindings of the wheels ``tensorrt_cu12_bindings-10.13.3.9`` and ``tensorrt_cu13_bindings-11.4.0.106``
(cp311 manylinux_2_28_x86_64, from PyPI): ``tensorrt.so`` imported against stub libnvinfer/libnvonnxparser/
libnvinfer_plugin libraries (no GPU), then ``dir()``, the enum values (``int(...)``) and the pybind signatures
(``__doc__``) of each name. ``nptype`` is Python code in the wheels' ``__init__.py``.

| name                                                    | 10.13.3.9                       | 11.4.0.106               |
|---------------------------------------------------------|---------------------------------|--------------------------|
| ``Logger(Logger.WARNING)``, ``Builder(logger)``         | yes (WARNING = 2)               | yes (WARNING = 2)        |
| ``Builder.create_network(flags: int = 0)``              | yes                             | yes                      |
| ``NetworkDefinitionCreationFlag.EXPLICIT_BATCH``        | 0                               | absent                   |
| ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``        | 1                               | 0 (deprecated, ignored)  |
| ``OnnxParser(network, logger).parse_from_file -> bool``, ``num_errors``, ``get_error`` | yes | yes          |
| ``Builder.create_builder_config``, ``create_optimization_profile``, ``build_serialized_network -> IHostMemory | None`` | yes | yes |
| ``IBuilderConfig.set_memory_pool_limit``, ``MemoryPoolType.WORKSPACE`` (0) | yes          | yes                      |
| ``IBuilderConfig.set_flag``                             | yes                             | yes                      |
| ``BuilderFlag.FP16`` / ``INT8`` / ``BF16``              | 0 / 1 / 17                      | absent                   |
| ``BuilderFlag.OBEY_PRECISION_CONSTRAINTS`` / ``PREFER_PRECISION_CONSTRAINTS`` | 9 / 10    | absent                   |
| ``BuilderFlag.TF32``                                    | 6                               | 6                        |
| ``IBuilderConfig.add_optimization_profile -> int``      | index, or -1 on a bad profile   | same                     |
| ``IOptimizationProfile.set_shape(input, min, opt, max)``| yes                             | yes                      |
| ``IBuilderConfig.create_timing_cache(buffer)``, ``set_timing_cache(cache, ignore_mismatch) -> bool``, ``get_timing_cache``, ``ITimingCache.serialize`` | yes | yes |
| ``INetworkDefinition.num_layers``, ``get_layer``, ``get_input`` | yes                     | yes                      |
| ``ILayer.name``, ``type``, ``num_outputs``, ``get_output``, ``ITensor.dtype`` | yes       | yes (``ITensor.dtype`` read-only) |
| ``ILayer.precision`` (settable), ``ILayer.set_output_type`` | yes                         | absent                   |
| ``IElementWiseLayer.op``, ``IUnaryLayer.op``            | yes                             | yes                      |
| ``LayerType.NORMALIZATION/SOFTMAX/REDUCE/ELEMENTWISE/UNARY``, ``ElementWiseOperation.POW``, ``UnaryOperation.SQRT`` | yes | yes |
| ``float32`` / ``float16`` (``DataType``)                | 0 / 1                           | 0 / 1                    |
| ``Runtime(logger).deserialize_cuda_engine -> ICudaEngine | None`` | yes                     | yes                      |
| ``ICudaEngine.create_execution_context``, ``num_io_tensors``, ``get_tensor_name``, ``get_tensor_mode``, ``get_tensor_dtype``, ``get_tensor_profile_shape(name, profile)`` | yes | yes |
| ``TensorIOMode.INPUT``                                  | 1                               | 1                        |
| ``IExecutionContext.set_input_shape -> bool``, ``get_tensor_shape`` | yes                 | yes                      |
| ``IExecutionContext.set_tensor_address(name, int) -> bool``, ``execute_async_v3(int) -> bool`` | yes | yes        |
| ``num_bindings``, ``execute_async_v2``, ``set_binding_shape`` (pre-8.5 bindings API) | absent | absent            |

Build progress and log severity, checked in the source of the Python bindings (NVIDIA/TensorRT
``python/src/infer/pyCore.cpp`` at tags v10.0.0, v10.13.3 and v11.1, ``include/NvInfer.h``,
``include/NvInferRuntime.h``), not in the wheels above; the NVIDIA sample ``samples/python/simple_progress_monitor``
uses them the same way:

| name                                                    | 10.0 - 10.13.3                  | 11.1                     |
|---------------------------------------------------------|---------------------------------|--------------------------|
| ``IProgressMonitor`` (pybind trampoline: a subclass must call ``IProgressMonitor.__init__(self)``) | yes | yes  |
| ``phase_start(phase_name, parent_phase, num_steps)``; ``parent_phase`` None (nullptr) for a top-level phase | yes | yes |
| ``step_complete(phase_name, step) -> bool``, steps 0 .. num_steps - 1; False (an exception too) cancels the build | yes | yes |
| ``phase_finish(phase_name)``, possibly before every step was reported | yes                  | yes                      |
| an exception in a callback: caught, ``[ERROR] Exception caught in <callback>()`` on stderr | yes | yes           |
| ``IBuilderConfig.progress_monitor`` (property; setter ``keep_alive<1, 2>``) | yes          | yes                      |
| ``Logger.Severity`` INTERNAL_ERROR / ERROR / WARNING / INFO / VERBOSE | 0 / 1 / 2 / 3 / 4  | 0 / 1 / 2 / 3 / 4        |

The runner's names (and cuda-python's / pycuda's) are listed in tests/engines/test_trt_runner.py.
"""
from __future__ import annotations

import enum
import itertools
import json
import logging
import re
import shutil
import sys
import types
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from tqdm import tqdm

from bakeoff.common.log import setup_logging
from bakeoff.export import tensorrt as T
from bakeoff.export.parity import ParityFailed, ort_logits
from bakeoff.export.pipeline import ExportOptions, export_run

H200 = {"tensorrt": "10.3.0", "gpu": "NVIDIA H200", "compute_capability": "9.0", "gpu_slug": "h200"}
T4 = {"tensorrt": "10.3.0", "gpu": "Tesla T4", "compute_capability": "7.5", "gpu_slug": "t4"}


def test_profile_shapes():
    assert T.profile_shapes(224, 1, 8, 32) == ((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224))
    for bad in ((0, 1, 2), (4, 2, 8), (1, 16, 8)):
        with pytest.raises(ValueError, match="1 <= min <= opt <= max"):
            T.profile_shapes(224, *bad)


@pytest.mark.parametrize("version, path", [("10.3.0.26", T.WEAK_FP16), ("10.13.1", T.WEAK_FP16),
                                           ("11.0.0", T.STRONGLY_TYPED), ("12.1", T.STRONGLY_TYPED)])
def test_build_path_by_major_version(version, path):
    assert T.build_path(version) == path


def test_build_path_refuses_old_or_odd_versions():
    with pytest.raises(T.EngineBuildError, match="8.6.1 is too old"):
        T.build_path("8.6.1")
    with pytest.raises(ValueError, match="unrecognised TensorRT version"):
        T.build_path("dev")


def test_layers_to_pin():
    layers = [("ln", "NORMALIZATION", None), ("attn/softmax", "SOFTMAX", None), ("mean", "REDUCE", None),
              ("var", "ELEMENTWISE", "POW"), ("std", "UNARY", "SQRT"), ("res", "ELEMENTWISE", "SUM"),
              ("gelu", "UNARY", "ERF"), ("qkv", "MATRIX_MULTIPLY", None), ("conv", "CONVOLUTION", None)]
    assert T.layers_to_pin(layers) == ["ln", "attn/softmax", "mean", "var", "std"]


@pytest.mark.parametrize("name, slug", [("Tesla T4", "t4"), ("NVIDIA H200", "h200"),
                                        ("NVIDIA GeForce RTX 4090", "rtx-4090"), ("NVIDIA A100-SXM4-80GB", "a100-sxm4-80gb")])
def test_gpu_slug(name, slug):
    assert T.gpu_slug(name) == slug
    assert T.engine_name({"gpu_slug": slug}) == f"model.{slug}.fp16.engine"


def test_target_warning():
    assert T.target_warning(None, H200) is None and T.target_warning("t4", T4) is None
    msg = T.target_warning("t4", H200)
    assert "NVIDIA H200 (sm_90), not a Tesla T4 (sm_75)" in msg and "not T4-tuned" in msg and "rebuild it on a Tesla T4" in msg
    with pytest.raises(ValueError, match="unknown --target 'a10'"):
        T.target_warning("a10", H200)


def test_timing_cache_is_per_gpu_and_version(tmp_path):
    assert T.timing_cache_path(tmp_path, T4) == tmp_path / ".trt_timing.t4-trt10.3.0.cache"
    assert T.timing_cache_path(tmp_path, T4) != T.timing_cache_path(tmp_path, H200)


# importing, not find_spec: bindings installed without libnvinfer are found but do not import
NO_TRT = pytest.mark.skipif(T._import_tensorrt()[0] is not None, reason="tensorrt imports here")


@NO_TRT
def test_no_environment_without_tensorrt():
    assert T.current_trt_environment() is None
    assert T.trt_unavailable_reason().startswith("tensorrt is not importable")


# -- sidecar -----------------------------------------------------------------------------------------------

PASSED = {"parity": {"status": "passed", "flip_rate": 0.0, "max_abs_prob": 1e-4, "failures": []}}


@pytest.fixture
def engine(tmp_path) -> Path:
    """An 'engine', its ONNX and the run's checkpoint in RUNS/cnn-probe/, with a parity-checked T4 sidecar."""
    run = tmp_path / "runs" / "cnn-probe"
    (run / "export").mkdir(parents=True)
    (run / "model.safetensors").write_bytes(b"weights v1")
    (run / "export" / "model.onnx").write_bytes(b"onnx v1")
    path = run / "export" / "model.t4.fp16.engine"
    path.write_bytes(b"plan")
    info = {"tensorrt": T4["tensorrt"], "gpu": T4["gpu"], "compute_capability": T4["compute_capability"],
            "profile": {"min": [1, 3, 32, 32]}, "precision": "fp16", "onnx": "model.onnx",
            "onnx_sha256": T.sha256_file(run / "export" / "model.onnx"),
            "checkpoint_sha256": T.sha256_file(run / "model.safetensors"), "engine_sha256": T.sha256_file(path),
            "built": "now"} | PASSED
    assert T.write_engine_sidecar(path, info) == run / "export" / "model.t4.fp16.engine.json"
    return path


def rebuild_hint(engine: Path) -> str:
    runs = engine.parents[2]
    return re.escape(f"Rebuild it on this GPU: python -m export --fp16 --runs {runs} --pairs cnn-probe")


def test_sidecar_roundtrip(engine):
    info = T.read_engine_sidecar(engine)
    assert info["engine"] == engine.name and info["gpu"] == "Tesla T4"
    assert T.check_engine_sidecar(engine, env=T4) == info
    assert T.check_engine_sidecar(engine, engine.parents[1], env=T4) == info
    with pytest.raises(ValueError, match="sidecar info lacks"):
        T.write_engine_sidecar(engine, {"gpu": "x"})


@pytest.mark.parametrize("env, message", [
    (H200, r"built for sm_75, this GPU is sm_90; built on Tesla T4, this is NVIDIA H200\. "),
    (T4 | {"tensorrt": "10.8.0"}, r"TensorRT 10.3.0 built it, this is TensorRT 10.8.0\. "),
])
def test_sidecar_refuses_another_machine(engine, env, message):
    with pytest.raises(T.EngineMismatch, match=message + rebuild_hint(engine)):
        T.check_engine_sidecar(engine, env=env)


@NO_TRT
def test_sidecar_refuses_any_engine_without_tensorrt(engine):
    with pytest.raises(T.EngineMismatch, match=r"built with TensorRT 10.3.0 on Tesla T4 \(sm_75\), but tensorrt is not"):
        T.check_engine_sidecar(engine)


@pytest.mark.parametrize("change, message", [
    (lambda e: e.with_name("model.onnx").write_bytes(b"onnx v2"), "model.onnx, which it was built from, was re-exported"),
    (lambda e: e.with_name("model.onnx").unlink(), "model.onnx, which it was built from, is missing"),
    (lambda e: e.write_bytes(b"another plan"), "the engine file changed since its sidecar was written"),
    (lambda e: e.unlink(), "the engine file is missing"),
    (lambda e: (e.parents[1] / "model.safetensors").write_bytes(b"weights v2"),
     "the run's checkpoint model.safetensors changed \\(retrained\\)"),
    (lambda e: (e.parents[1] / "model.safetensors").unlink(), "the run's checkpoint model.safetensors is missing"),
])
def test_sidecar_refuses_changed_or_missing_sources(engine, change, message):
    change(engine)
    with pytest.raises(T.EngineMismatch, match=f"{message}.*{rebuild_hint(engine)}"):
        T.check_engine_sidecar(engine, env=T4)


def test_sidecar_refuses_engines_without_a_passed_parity_check(engine):
    info = T.read_engine_sidecar(engine)
    T.write_engine_sidecar(engine, info | {"parity": {"status": "failed", "failures": ["90 of 7680 decisions flip"]}})
    with pytest.raises(T.EngineMismatch, match="failed the parity check against PyTorch.*90 of 7680 decisions flip"):
        T.check_engine_sidecar(engine, env=T4)
    T.write_engine_sidecar(engine, {k: v for k, v in info.items() if k != "parity"})
    with pytest.raises(T.EngineMismatch, match="never checked against PyTorch.*" + rebuild_hint(engine)):
        T.check_engine_sidecar(engine, env=T4)


@pytest.mark.parametrize("text, problem", [
    (None, r"no sidecar model.t4.fp16.engine.json, so its GPU, TensorRT version and sources are unknown"),
    ("{not json", r"model.t4.fp16.engine.json: not a valid sidecar \(JSONDecodeError: "),
    ("[1, 2]", r"model.t4.fp16.engine.json: not a valid sidecar \(a JSON list, not an object\)"),
    ("drop", r"model.t4.fp16.engine.json: not a valid sidecar \(it lacks checkpoint_sha256, engine_sha256\)"),
])
def test_sidecar_refuses_missing_or_malformed_sidecars(engine, text, problem):
    sidecar = T.sidecar_path(engine)
    if text is None:
        sidecar.unlink()
    elif text == "drop":
        info = json.loads(sidecar.read_text())
        sidecar.write_text(json.dumps({k: v for k, v in info.items() if k not in ("checkpoint_sha256", "engine_sha256")}))
    else:
        sidecar.write_text(text)
    with pytest.raises(T.EngineMismatch, match=f"{problem}.*{rebuild_hint(engine)}"):
        T.check_engine_sidecar(engine, env=T4)


# -- the build, driven by a fake tensorrt module ------------------------------------------------------------

class Trt10BuilderFlag(enum.IntEnum):  # the members export.tensorrt may touch, with TensorRT 10.13's values
    FP16 = 0
    INT8 = 1
    TF32 = 6
    OBEY_PRECISION_CONSTRAINTS = 9
    PREFER_PRECISION_CONSTRAINTS = 10
    BF16 = 17


class Trt11BuilderFlag(enum.IntEnum):  # 11.4: the precision flags are gone
    TF32 = 6


class Trt10CreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1


class Trt11CreationFlag(enum.IntEnum):  # 11.4: EXPLICIT_BATCH gone, STRONGLY_TYPED deprecated (always on)
    STRONGLY_TYPED = 0


class FakeLayer:
    """A TensorRT 11 ``ILayer``: like a pybind object, it refuses attributes it does not have (``precision``)."""

    __slots__ = ("_dtype", "_op", "name", "type")

    def __init__(self, name: str, kind: str, op: str | None = None, dtype: str = "float32"):
        self.name, self.type, self._op, self._dtype = name, types.SimpleNamespace(name=kind), op, dtype

    num_outputs = 1

    def get_output(self, i):
        return types.SimpleNamespace(dtype=self._dtype)


class FakeLayer10(FakeLayer):
    """A TensorRT 10 ``ILayer``: ``precision`` and ``set_output_type`` exist."""

    __slots__ = ("output_types", "precision")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.precision, self.output_types = None, {}

    def set_output_type(self, index, dtype):
        self.output_types[index] = dtype


def with_op(layer_class: type) -> type:
    """What ``layer.__class__ = trt.IElementWiseLayer`` (or ``IUnaryLayer``) exposes: ``op``."""
    return type("OpLayer", (layer_class,), {"__slots__": (), "op": property(lambda self: types.SimpleNamespace(name=self._op))})


class FakeLogger:
    """``tensorrt.Logger(min_severity)``, with ``ILogger.Severity``'s values (exported into ``Logger``)."""

    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = 0, 1, 2, 3, 4
    made: ClassVar[list[int]] = []  # the severity of every logger made, in order

    def __init__(self, level):
        assert level in (self.INTERNAL_ERROR, self.ERROR, self.WARNING, self.INFO, self.VERBOSE)
        FakeLogger.made.append(level)


class _Trampoline(type):
    """pybind11's check on a Python subclass of a bound C++ class: its ``__init__`` must call the base's."""

    def __call__(cls, *args, **kwargs):
        obj = super().__call__(*args, **kwargs)
        if not getattr(obj, "_bound", False):
            raise TypeError(f"{cls.__name__}.__init__() must be called when overriding __init__")
        return obj


class FakeProgressMonitor(metaclass=_Trampoline):
    """``tensorrt.IProgressMonitor``: the three callbacks are pure virtual (the base's raise)."""

    def __init__(self):
        self._bound = True

    def phase_start(self, phase_name, parent_phase, num_steps):
        raise RuntimeError('Tried to call pure virtual function "IProgressMonitor::phaseStart"')

    def step_complete(self, phase_name, step):
        raise RuntimeError('Tried to call pure virtual function "IProgressMonitor::stepComplete"')

    def phase_finish(self, phase_name):
        raise RuntimeError('Tried to call pure virtual function "IProgressMonitor::phaseFinish"')


# The phases a fake build reports: (name, parent, steps), in the order they start; a phase's children run between
# its first and second step. (Real phase names and their nesting vary with TensorRT's version: NvInfer.h.)
FAKE_PHASES = [("Building engine", None, 3), ("Optimizing network", "Building engine", 2),
               ("Tactic selection", "Optimizing network", 4)]


def drive_monitor(monitor, log: dict) -> bool:
    """Report ``FAKE_PHASES`` to ``monitor`` as TensorRT's trampoline does; False when it cancelled the build.

    Each call is recorded in ``log["monitor"]``. An exception in a callback is caught and printed (``[ERROR]
    Exception caught in ...``) as the bindings do, and in ``step_complete`` it cancels, like a False (pybind's bool
    conversion: None is False). On a cancel the active phases finish, innermost first, and no step follows."""
    calls = log.setdefault("monitor", [])

    def call(name, *args):
        calls.append((name, *args))
        try:
            return getattr(monitor, name)(*args)
        except Exception as e:  # noqa: BLE001
            print(f"[ERROR] Exception caught in {name}(): {e}", file=sys.stderr)
            return False

    def run(name, parent, steps) -> bool:
        call("phase_start", name, parent, steps)
        for step in range(steps):
            if step == 1:
                for child in [p for p in FAKE_PHASES if p[1] == name]:
                    if not run(*child):
                        call("phase_finish", name)
                        return False
            if not bool(call("step_complete", name, step)):
                call("phase_finish", name)
                return False
        call("phase_finish", name)
        return True

    return run(*FAKE_PHASES[0])


VIT_LAYERS = [("conv", "CONVOLUTION"), ("ln1", "NORMALIZATION"), ("qk", "MATRIX_MULTIPLY"), ("softmax", "SOFTMAX"),
              ("res", "ELEMENTWISE", "SUM"), ("pow", "ELEMENTWISE", "POW"), ("erf", "UNARY", "ERF"),
              ("sqrt", "UNARY", "SQRT"), ("pool", "REDUCE"),
              ("shape-sum", "REDUCE", None, "int32")]


def fake_trt(version: str, log: dict, refused_caches: tuple[bytes, ...] = (),
             input_shape: tuple[int, ...] = (-1, 3, -1, -1), progress_api: bool = True) -> types.SimpleNamespace:
    """Just enough of the tensorrt module (of ``version``'s major: 10 or 11) for ``build_engine``, with the real
    bindings' names and values (module docstring); records what was asked of it in ``log``.

    ``set_timing_cache`` refuses caches made from ``refused_caches`` (as TensorRT does a corrupt one), and
    ``add_optimization_profile`` returns -1 for a profile TensorRT would refuse (unset, not min <= opt <= max, or
    at odds with the network input's ``input_shape``, where -1 is a dynamic axis). With ``progress_api`` (the
    bindings of 10.0 on) it has ``IProgressMonitor`` and ``IBuilderConfig.progress_monitor``, and a build reports
    ``FAKE_PHASES`` to the monitor set there (a monitor that cancels makes the build return None); without it,
    neither name exists."""
    trt10 = version.startswith("10.")
    layer_class = FakeLayer10 if trt10 else FakeLayer
    network = types.SimpleNamespace(layers=[layer_class(*spec) for spec in VIT_LAYERS])
    network.num_layers = len(network.layers)
    network.get_layer = lambda i: network.layers[i]
    network.get_input = lambda i: types.SimpleNamespace(name="images", shape=input_shape)
    flag_type = Trt10BuilderFlag if trt10 else Trt11BuilderFlag

    class Cache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return self.data + b"+timings"

    class Config:
        def __init__(self):
            log["flags"], log["profiles"] = set(), []

        def set_flag(self, flag):
            assert isinstance(flag, flag_type)
            log["flags"].add(flag)

        def set_memory_pool_limit(self, pool, size):
            log["workspace"] = (pool, size)

        def add_optimization_profile(self, profile) -> int:
            shapes = getattr(profile, "shapes", None)
            if shapes is None or not all(a <= b for lo, hi in itertools.pairwise(shapes[1:]) for a, b in zip(lo, hi)):
                return -1
            if any(len(dims) != len(input_shape) or any(d not in (-1, x) for d, x in zip(input_shape, dims))
                   for dims in shapes[1:]):
                return -1
            log["profiles"].append(shapes)
            return len(log["profiles"]) - 1

        def create_timing_cache(self, data):
            log.setdefault("caches_offered", []).append(data)
            return Cache(data)

        def set_timing_cache(self, cache, ignore_mismatch) -> bool:
            assert ignore_mismatch is False
            if cache.data in refused_caches:
                return False
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class ConfigWithMonitor(Config):
        _monitor = None

        @property
        def progress_monitor(self):
            return self._monitor

        @progress_monitor.setter
        def progress_monitor(self, monitor):
            if monitor is not None and not isinstance(monitor, FakeProgressMonitor):  # pybind's argument check
                raise TypeError("progress_monitor: incompatible function arguments")
            self._monitor = monitor

    class Profile:
        def set_shape(self, name, *shapes):
            self.shapes = (name, *shapes)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags: int = 0):
            assert isinstance(flags, int)
            log["network_flags"] = flags
            return network

        create_builder_config = staticmethod(ConfigWithMonitor if progress_api else Config)
        create_optimization_profile = staticmethod(Profile)

        def build_serialized_network(self, net, config):
            monitor = getattr(config, "progress_monitor", None)
            if monitor is not None and not drive_monitor(monitor, log):
                return None  # cancelled by the monitor
            return b"serialized plan"

    class Parser:
        def __init__(self, net, logger):
            pass

        def parse_from_file(self, path):
            log["parsed"] = Path(path).name
            return True

    log["network"] = network
    module = types.SimpleNamespace(
        __version__=version, Logger=FakeLogger, Builder=Builder, OnnxParser=Parser, BuilderFlag=flag_type,
        NetworkDefinitionCreationFlag=Trt10CreationFlag if trt10 else Trt11CreationFlag, float32="float32",
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="workspace"), IElementWiseLayer=with_op(layer_class),
        IUnaryLayer=with_op(layer_class))
    if progress_api:
        module.IProgressMonitor = FakeProgressMonitor
    return module


def test_the_fakes_have_the_real_api_of_each_version():
    """The names TensorRT 11 removed are absent from its fake, present in TensorRT 10's; the enum values are the
    real bindings' (module docstring)."""
    t10, t11 = fake_trt("10.13.3.9", {}), fake_trt("11.4.0.106", {})
    assert int(t10.NetworkDefinitionCreationFlag.STRONGLY_TYPED) == 1 and t10.NetworkDefinitionCreationFlag.EXPLICIT_BATCH == 0
    assert int(t11.NetworkDefinitionCreationFlag.STRONGLY_TYPED) == 0
    assert not hasattr(t11.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
    for name in ("FP16", "BF16", "INT8", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS"):
        assert hasattr(t10.BuilderFlag, name) and not hasattr(t11.BuilderFlag, name)
    layer10, layer11 = t10.IElementWiseLayer("x", "ELEMENTWISE", "POW"), t11.IElementWiseLayer("x", "ELEMENTWISE", "POW")
    layer10.precision = "float32"
    layer10.set_output_type(0, "float32")
    with pytest.raises(AttributeError):
        layer11.precision = "float32"
    assert not hasattr(layer11, "set_output_type") and layer11.op.name == "POW"
    config = t10.Builder(None).create_builder_config()
    assert config.add_optimization_profile(t10.Builder(None).create_optimization_profile()) == -1  # no shapes set
    for trt in (t10, t11):  # build progress (10.0 on): a pybind trampoline class and a config property
        config = trt.Builder(None).create_builder_config()
        assert config.progress_monitor is None

        class Forgets(trt.IProgressMonitor):
            def __init__(self):  # does not call IProgressMonitor.__init__
                pass

        with pytest.raises(TypeError, match="must be called when overriding __init__"):
            Forgets()
        with pytest.raises(RuntimeError, match="pure virtual"):
            trt.IProgressMonitor().step_complete("phase", 0)
        with pytest.raises(TypeError, match="incompatible function arguments"):
            config.progress_monitor = object()
    bare = fake_trt("10.13.3.9", {}, progress_api=False)
    assert not hasattr(bare, "IProgressMonitor") and not hasattr(bare.Builder(None).create_builder_config(),
                                                                 "progress_monitor")


@pytest.fixture
def onnx_pair(tmp_path) -> tuple[Path, Path]:
    export = tmp_path / "runs" / "vit-probe" / "export"
    export.mkdir(parents=True)
    (export.parent / "model.safetensors").write_bytes(b"weights")
    (export / "model.onnx").write_bytes(b"fp32 graph")
    (export / "model.fp16.onnx").write_bytes(b"fp16 graph")
    return export / "model.onnx", export / "model.fp16.onnx"


def test_build_trt10_pins_fragile_layers_fp32(onnx_pair):
    fp32, fp16 = onnx_pair
    log: dict = {}
    engine = fp32.with_name(T.engine_name(H200))
    cache = fp32.parents[2] / ".cache-file"
    cache.write_bytes(b"old")  # a timing cache from an earlier build is reused and extended
    info = T.build_engine(fp32, fp16, engine, 32, T.EngineOptions(target="t4"), cache, H200, "ckpt-sha",
                          trt=fake_trt("10.3.0", log))
    assert log["parsed"] == "model.onnx" and log["network_flags"] == 0
    assert log["flags"] == {Trt10BuilderFlag.FP16, Trt10BuilderFlag.OBEY_PRECISION_CONSTRAINTS}
    assert info["pinned_fp32_layers"] == ["ln1", "pool", "pow", "softmax", "sqrt"]
    for layer in log["network"].layers:
        pinned = layer.name in info["pinned_fp32_layers"]
        assert (layer.precision == "float32") is pinned and (layer.output_types == {0: "float32"}) is pinned
    assert log["workspace"] == ("workspace", 4 << 30)
    assert log["profiles"] == [("images", (1, 3, 32, 32), (8, 3, 32, 32), (32, 3, 32, 32))]
    assert log["caches_offered"] == [b"old"] and cache.read_bytes() == b"old+timings"
    assert engine.read_bytes() == b"serialized plan"
    side = json.loads(T.sidecar_path(engine).read_text())
    assert side["onnx"] == "model.onnx" and side["onnx_sha256"] == T.sha256_file(fp32) and side["build_path"] == T.WEAK_FP16
    assert side["checkpoint_sha256"] == "ckpt-sha" and "parity" not in side
    assert side["profile"]["opt"] == [8, 3, 32, 32] and "not T4-tuned" in side["target_warning"]


def test_build_trt11_is_strongly_typed_from_the_fp16_onnx(onnx_pair):
    fp32, fp16 = onnx_pair
    log: dict = {}
    env = T4 | {"tensorrt": "11.4.0.106"}
    engine = fp32.with_name(T.engine_name(env))
    cache = T.timing_cache_path(fp32.parents[2], env)
    opts = T.EngineOptions(min_batch=2, opt_batch=4, max_batch=16, workspace_gb=1.5, target="t4")
    checkpoint = T.sha256_file(fp32.parents[1] / "model.safetensors")
    info = T.build_engine(fp32, fp16, engine, 28, opts, cache, env, checkpoint, trt=fake_trt("11.4.0.106", log))
    # no creation flags: strongly typed is always on in TensorRT 11 (its deprecated STRONGLY_TYPED flag is 0)
    assert log["parsed"] == "model.fp16.onnx" and log["network_flags"] == 0 and log["flags"] == set()
    assert info["pinned_fp32_layers"] == []
    assert log["caches_offered"] == [b""] and cache.read_bytes() == b"+timings"
    assert log["workspace"][1] == int(1.5 * (1 << 30))
    assert info["onnx_sha256"] == T.sha256_file(fp16) and info["target_warning"] is None
    assert info["profile"]["min"] == [2, 3, 28, 28]
    with pytest.raises(T.EngineMismatch, match="never checked against PyTorch"):  # until the export's parity check
        T.check_engine_sidecar(engine, env=env)
    T.write_engine_sidecar(engine, info | PASSED)
    assert T.check_engine_sidecar(engine, env=env)["build_path"] == T.STRONGLY_TYPED


def test_build_replaces_a_refused_timing_cache(onnx_pair):
    fp32, fp16 = onnx_pair
    log: dict = {}
    cache = fp32.parents[2] / ".cache-file"
    cache.write_bytes(b"corrupt")
    with pytest.warns(UserWarning, match="TensorRT refused this timing cache.*building with a fresh one"):
        T.build_engine(fp32, fp16, fp32.with_name("e.engine"), 32, T.EngineOptions(), cache, H200, "sha",
                       trt=fake_trt("10.3.0", log, refused_caches=(b"corrupt",)))
    assert log["caches_offered"] == [b"corrupt", b""] and cache.read_bytes() == b"+timings"
    with pytest.raises(T.EngineBuildError, match="refused an empty timing cache"):
        T.build_engine(fp32, fp16, fp32.with_name("e.engine"), 32, T.EngineOptions(), fp32.with_name("none"), H200,
                       "sha", trt=fake_trt("10.3.0", {}, refused_caches=(b"",)))


def test_build_stops_when_tensorrt_refuses_the_profile(onnx_pair):
    """``add_optimization_profile`` returns -1 (not an exception) for a profile at odds with the network: the build
    stops there, naming the profile, and writes no engine."""
    fp32, fp16 = onnx_pair
    log: dict = {}
    engine = fp32.with_name("e.engine")
    trt = fake_trt("10.13.3.9", log, input_shape=(-1, 3, 224, 224))  # a static 224 px graph; the profile asks 32
    with pytest.raises(T.EngineBuildError, match=r"refused the optimisation profile 'images' min \(1, 3, 32, 32\)"):
        T.build_engine(fp32, fp16, engine, 32, T.EngineOptions(), fp32.with_name("c"), T4, "sha", trt=trt)
    assert log["profiles"] == [] and not engine.exists()
    T.build_engine(fp32, fp16, engine, 224, T.EngineOptions(), fp32.with_name("c"), T4, "sha", trt=trt)
    assert log["profiles"][0][1] == (1, 3, 224, 224) and engine.exists()


def test_build_reports_parser_errors(onnx_pair):
    fp32, fp16 = onnx_pair
    trt = fake_trt("10.3.0", {})
    trt.OnnxParser = lambda net, logger: types.SimpleNamespace(parse_from_file=lambda p: False, num_errors=1,
                                                               get_error=lambda i: "unsupported op Foo")
    with pytest.raises(T.EngineBuildError, match=r"model.onnx: TensorRT 10.3.0 cannot parse it: unsupported op Foo"):
        T.build_engine(fp32, fp16, fp32.with_name("e.engine"), 32, T.EngineOptions(), fp32.with_name("c"), T4, "sha",
                       trt=trt)


def test_a_refused_input_shape_names_the_profile():
    engine = types.SimpleNamespace(get_tensor_profile_shape=lambda name, i: [(2, 3, 8, 8), (4, 3, 8, 8), (8, 3, 8, 8)])
    shapes = []
    context = types.SimpleNamespace(set_input_shape=lambda name, shape: shapes.append(shape) or shape[0] >= 2)
    T.set_input_shape(engine, context, "images", (2, 3, 8, 8), Path("m.engine"))
    with pytest.raises(T.EngineMismatch, match=r"m.engine: TensorRT refused input shape \(1, 3, 8, 8\) for 'images'; "
                                               r"the engine's profile takes batches 2 to 8"):
        T.set_input_shape(engine, context, "images", (1, 3, 8, 8), Path("m.engine"))
    assert shapes == [(2, 3, 8, 8), (1, 3, 8, 8)]


# -- a real engine, where TensorRT and a GPU exist ----------------------------------------------------------

@pytest.mark.skipif(T.trt_unavailable_reason() is not None, reason=f"needs TensorRT and a CUDA GPU: {T.trt_unavailable_reason()}")
def test_real_engine_matches_onnxruntime(tiny_runs, tmp_path):
    shutil.copytree(tiny_runs / "cnn-probe", tmp_path / "cnn-probe")
    report = export_run(tmp_path / "cnn-probe", ExportOptions(fp16=True), log=lambda line: None)
    env = T.current_trt_environment()
    engine = tmp_path / "cnn-probe" / "export" / T.engine_name(env)
    assert report["status"] == "passed" and report["results"]["tensorrt_fp16"]["file"] == engine.name
    side = T.check_engine_sidecar(engine)
    assert side["compute_capability"] == env["compute_capability"] and side["parity"]["status"] == "passed"
    assert T.timing_cache_path(tmp_path, env).exists()


# -- the pipeline's engine step, with TensorRT faked (the ONNX export is the fixture's, and is reused) ---------

@pytest.fixture
def fake_gpu(cnn_export, tmp_path, monkeypatch):
    """(copy of the exported cnn-probe run, ``machine(env)``: pretend to be ``env`` with a fake TensorRT; its
    ``built`` list records every engine built). The ONNX export is current, so it must be reused, not redone."""
    *_, run = cnn_export
    shutil.copytree(run, tmp_path / "runs" / "cnn-probe")
    built, build_engine = [], T.build_engine

    def no_onnx_export(*args, **kwargs):
        raise AssertionError("the current ONNX export was redone")

    def machine(env: dict) -> None:
        fake = fake_trt(env["tensorrt"], {})

        def build(*args, **kwargs):
            built.append(args[2].name)
            return build_engine(*args, **kwargs, trt=fake)

        monkeypatch.setattr(T, "current_trt_environment", lambda: env)
        monkeypatch.setattr(T, "build_engine", build)

    monkeypatch.setattr("bakeoff.export.pipeline.export_onnx", no_onnx_export)
    monkeypatch.setattr("bakeoff.export.pipeline.convert_fp16", no_onnx_export)
    machine.built = built
    return tmp_path / "runs" / "cnn-probe", machine


def fake_engine_logits(shift: float):
    """The FP16 ONNX's logits through onnxruntime, plus ``shift`` on even tags and minus it on odd ones: what a
    (good or broken) engine returns (one constant shift would be invisible to a softmax group)."""
    def logits(path, inputs, batch_size):
        z = ort_logits(path.with_name("model.fp16.onnx"), inputs, batch_size)
        return z + np.where(np.arange(z.shape[1]) % 2, -shift, shift).astype(z.dtype)
    return logits


def test_pipeline_builds_checks_and_records_an_engine(fake_gpu, monkeypatch):
    run, machine = fake_gpu
    machine(H200)
    monkeypatch.setattr(T, "engine_logits", fake_engine_logits(0.0))
    lines = []
    report = export_run(run, ExportOptions(fp16=True, engine=T.EngineOptions(target="t4")), log=lines.append)
    engine = run / "export" / "model.h200.fp16.engine"
    assert lines[0] == "cnn-probe: ONNX export is current, reused; building the engine: no model.h200.fp16.engine yet"
    assert any(line.startswith("WARNING cnn-probe: built on NVIDIA H200 (sm_90), not a Tesla T4") for line in lines)
    assert "cnn-probe: built model.h200.fp16.engine (TensorRT 10.3.0, weak-fp16" in lines[-2]
    result = report["results"]["tensorrt_fp16"]
    assert report["status"] == result["status"] == "passed" and result["file"] == engine.name
    side = T.check_engine_sidecar(engine, env=H200)
    assert side["parity"] == {"status": "passed", "flip_rate": result["flip_rate"], "max_abs_prob": result["max_abs_prob"],
                              "failures": []}
    assert side["onnx"] == "model.onnx" and "not T4-tuned" in side["target_warning"]
    assert side["checkpoint_sha256"] == T.sha256_file(run / "model.safetensors") == report["source_sha256"]
    assert T.timing_cache_path(run.parent, H200).exists()

    lines.clear()  # a second export finds it current, and still warns that it is not T4-tuned
    assert export_run(run, ExportOptions(fp16=True, engine=T.EngineOptions(target="t4")), log=lines.append) == report
    assert machine.built == [engine.name]
    assert lines[0] == "cnn-probe: export is current (same checkpoint), parity passed; skipped (--force redoes it)"
    assert lines[1].startswith("WARNING cnn-probe: built on NVIDIA H200 (sm_90), not a Tesla T4") and len(lines) == 2


def test_pipeline_builds_each_gpus_engine_and_rebuilds_stale_ones(fake_gpu, monkeypatch):
    run, machine = fake_gpu
    monkeypatch.setattr(T, "engine_logits", fake_engine_logits(0.0))
    opts = ExportOptions(fp16=True)
    for env in (H200, T4, H200, T4 | {"tensorrt": "10.8.0"}):  # moved to a T4, back, then TensorRT upgraded
        machine(env)
        export_run(run, opts, log=lambda line: None)
        T.check_engine_sidecar(run / "export" / T.engine_name(env), env=env)
    assert machine.built == ["model.h200.fp16.engine", "model.t4.fp16.engine", "model.t4.fp16.engine"]
    assert sorted(p.name for p in (run / "export").glob("*.engine")) == ["model.h200.fp16.engine", "model.t4.fp16.engine"]


def test_a_refused_engines_rebuild_command_rebuilds_it(fake_gpu, monkeypatch, cli):
    run, machine = fake_gpu
    machine(H200)
    monkeypatch.setattr(T, "engine_logits", fake_engine_logits(0.0))
    export_run(run, ExportOptions(fp16=True), log=lambda line: None)
    engine = run / "export" / "model.h200.fp16.engine"
    side = T.read_engine_sidecar(engine)
    T.write_engine_sidecar(engine, {k: v for k, v in side.items() if k != "parity"})  # stopped before its parity check
    with pytest.raises(T.EngineMismatch) as refused:
        T.check_engine_sidecar(engine)
    command = re.search(r"Rebuild it on this GPU: python -m export (.+)$", str(refused.value)).group(1)
    code, _, err = cli(*command.split())
    assert code == 0, err
    assert machine.built == [engine.name] * 2 and T.check_engine_sidecar(engine)["parity"]["status"] == "passed"


def test_pipeline_refuses_an_engine_that_fails_parity(fake_gpu, monkeypatch):
    run, machine = fake_gpu
    machine(H200)
    monkeypatch.setattr(T, "engine_logits", fake_engine_logits(2.0))
    with pytest.raises(ParityFailed, match="tensorrt_fp16: .* decisions flip"):
        export_run(run, ExportOptions(fp16=True), log=lambda line: None)
    report = json.loads((run / "export" / "parity.json").read_text())
    assert report["status"] == "failed" and report["results"]["onnx_fp16"]["status"] == "passed"
    with pytest.raises(T.EngineMismatch, match="failed the parity check against PyTorch"):
        T.check_engine_sidecar(run / "export" / "model.h200.fp16.engine", env=H200)


# -- build progress: TensorRT's IProgressMonitor callbacks drive the bars ---------------------------------------

class RecordingBar(tqdm):
    """A real tqdm bar that keeps every bar made and the steps each was advanced by (also when disabled)."""

    made: ClassVar[list[RecordingBar]] = []

    def __init__(self, *args, **kwargs):
        self.steps: list[float] = []
        self.shown = not kwargs.get("disable", False)  # (close() sets disable)
        super().__init__(*args, **kwargs)
        RecordingBar.made.append(self)

    def update(self, n=1):
        self.steps.append(n)
        return super().update(n)


@pytest.fixture
def bars(monkeypatch):
    """The bars made through ``bakeoff.common.log.progress_bar`` during the test (RecordingBar)."""
    RecordingBar.made = []
    monkeypatch.setattr("bakeoff.common.log.tqdm", RecordingBar)
    return RecordingBar.made


@pytest.fixture
def verbosity():
    """``setup_logging`` for the test; the ``bakeoff`` logger's level is restored afterwards."""
    logger = logging.getLogger("bakeoff")
    before = logger.level
    yield lambda **kw: setup_logging(**kw)
    logger.setLevel(before)


@pytest.mark.parametrize("version", ["10.13.3.9", "11.4.0.106"])
def test_progress_monitor_callbacks_drive_one_bar_per_phase(onnx_pair, bars, version, verbosity, capsys):
    fp32, fp16 = onnx_pair
    log: dict = {}
    verbosity(verbose=True)
    engine = fp32.with_name("e.engine")
    T.build_engine(fp32, fp16, engine, 32, T.EngineOptions(), fp32.with_name("c"), T4, "sha",
                   trt=fake_trt(version, log), progress=True)
    assert engine.read_bytes() == b"serialized plan"  # the monitor never cancelled the build
    # every callback of FAKE_PHASES reached the monitor, and every step_complete answered True
    assert [c for c in log["monitor"] if c[0] == "phase_start"] == [("phase_start", *p) for p in FAKE_PHASES]
    assert sum(c[0] == "step_complete" for c in log["monitor"]) == sum(p[2] for p in FAKE_PHASES)
    assert [(b.desc, b.total, sum(b.steps), b.shown) for b in bars] == [
        ("TensorRT Building engine", 3, 3, True), ("TensorRT   Optimizing network", 2, 2, True),
        ("TensorRT     Tactic selection", 4, 4, True)]  # one bar per phase, nested phases indented
    assert all(b.steps == [1] * b.total for b in bars)  # one step at a time, as TensorRT reports them
    err = capsys.readouterr().err
    assert "[ERROR] Exception caught" not in err
    assert "TensorRT     Tactic selection: 4/4 steps in" in err and "TensorRT Building engine: 3/3 steps" in err  # -v
    assert f"TensorRT {version} " in err and "layers pinned to fp32" in err


def test_progress_monitor_without_bars_still_reports_phases_at_debug(onnx_pair, bars, verbosity, capsys):
    fp32, fp16 = onnx_pair
    verbosity(verbose=True)
    T.build_engine(fp32, fp16, fp32.with_name("e.engine"), 32, T.EngineOptions(), fp32.with_name("c"), T4, "sha",
                   trt=fake_trt("10.13.3.9", {}), progress=False)
    assert [b.shown for b in bars] == [False, False, False]
    assert "TensorRT Building engine: 3/3 steps in" in capsys.readouterr().err


def test_a_failing_bar_never_cancels_the_build(onnx_pair, monkeypatch, capsys):
    """The bindings read an exception (or a false answer) in ``step_complete`` as a request to cancel: the
    monitor swallows its own errors and always answers True."""
    fp32, fp16 = onnx_pair

    class Broken:
        def __init__(self, *a, **k):
            pass

        def update(self, n=1):
            raise OSError("the terminal went away")

        close = update

    monkeypatch.setattr(T, "progress_bar", Broken)
    log: dict = {}
    engine = fp32.with_name("e.engine")
    T.build_engine(fp32, fp16, engine, 32, T.EngineOptions(), fp32.with_name("c"), T4, "sha",
                   trt=fake_trt("10.13.3.9", log), progress=True)
    assert engine.exists() and "[ERROR] Exception caught" not in capsys.readouterr().err
    assert sum(c[0] == "step_complete" for c in log["monitor"]) == 9  # the build ran to its end


def test_the_fake_cancels_on_a_false_step_like_tensorrt(onnx_pair):
    """The fake's contract, which the monitor relies on: a step_complete answering False (or raising) stops the
    build; then every active phase finishes, innermost first."""
    log: dict = {}

    class Cancels(FakeProgressMonitor):
        def phase_start(self, *a):
            pass

        def step_complete(self, name, step):
            return name != "Optimizing network"

        def phase_finish(self, name):
            pass

    assert not drive_monitor(Cancels(), log)
    assert log["monitor"][-3:] == [("step_complete", "Optimizing network", 0), ("phase_finish", "Optimizing network"),
                                   ("phase_finish", "Building engine")]


def test_a_build_without_the_progress_api_has_no_monitor(onnx_pair, bars):
    fp32, fp16 = onnx_pair
    log: dict = {}
    assert T.progress_monitor(fake_trt("10.13.3.9", {}, progress_api=False)) is None
    T.build_engine(fp32, fp16, fp32.with_name("e.engine"), 32, T.EngineOptions(), fp32.with_name("c"), T4, "sha",
                   trt=fake_trt("10.13.3.9", log, progress_api=False), progress=True)
    assert "monitor" not in log and bars == [] and fp32.with_name("e.engine").exists()


@pytest.mark.parametrize("flags, severity", [({}, FakeLogger.WARNING), ({"quiet": True}, FakeLogger.WARNING),
                                             ({"verbose": True}, FakeLogger.INFO)])
def test_tensorrt_log_severity_follows_the_verbosity(onnx_pair, verbosity, flags, severity):
    fp32, fp16 = onnx_pair
    verbosity(**flags)
    T.build_engine(fp32, fp16, fp32.with_name("e.engine"), 32, T.EngineOptions(), fp32.with_name("c"), T4, "sha",
                   trt=fake_trt("10.13.3.9", {}))
    assert FakeLogger.made[-1] == severity


def test_export_steps_and_build_phases_show_as_bars(fake_gpu, monkeypatch, bars):
    """An export whose ONNX is current, on a (fake) GPU: the run's bar counts its 4 steps, and the engine
    build's phases get their bars under it."""
    run, machine = fake_gpu
    machine(H200)
    monkeypatch.setattr(T, "engine_logits", fake_engine_logits(0.0))
    export_run(run, ExportOptions(fp16=True, progress=True), log=lambda line: None)
    steps, *phases = bars
    assert (steps.desc, steps.total, steps.steps, steps.shown) == ("cnn-probe", 4, [1, 1, 1, 1], True)
    assert [b.desc for b in phases] == ["TensorRT Building engine", "TensorRT   Optimizing network",
                                        "TensorRT     Tactic selection"]
    assert all(sum(b.steps) == b.total for b in phases)
