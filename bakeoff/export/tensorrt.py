"""FP16 TensorRT engines from the exported ONNX, and the ``engine.json`` sidecar that ties each engine to its GPU.

An engine only runs on the TensorRT version and GPU compute capability it was built with (TensorRT #70, #756,
#4259), so each one is named for its GPU (``export/model.<gpu-slug>.fp16.engine``) and carries a sidecar
(``model.<gpu-slug>.fp16.engine.json``): TensorRT version, GPU name, compute capability, optimisation profile,
precision, sha256 of the engine, of the ONNX it came from and of the run's checkpoint, build time, and (written
once the export has compared its outputs with PyTorch's) its parity verdict. ``check_engine_sidecar`` refuses an
engine that did not pass parity, or whose sidecar does not match the machine, the ONNX or the checkpoint.

Two build paths, chosen by TensorRT's major version (``build_path``):
- TensorRT 10 (``weak-fp16``): the FP32 ONNX, ``BuilderFlag.FP16`` + ``OBEY_PRECISION_CONSTRAINTS``, and the
  layers that overflow in FP16 (normalisation, softmax, reductions, a decomposed LayerNorm's pow/sqrt) pinned
  to FP32 (``layer.precision`` and ``set_output_type``): TensorRT #2709, #2564.
- TensorRT 11 (``strongly-typed``): the weak-typing API is gone (``BuilderFlag.FP16/BF16/INT8``,
  ``OBEY_PRECISION_CONSTRAINTS``, ``ILayer.precision``, ``set_output_type``); every network is strongly typed
  (``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` is deprecated, ignored, and 0 where TensorRT 10 had 1), so
  the FP16 ONNX (LayerNorm/Softmax already FP32 in its dtypes, export.fp16) is built as is and its dtypes decide.
Both create the network with no creation flags (explicit batch is the only mode since TensorRT 10). TensorRT
reports refusals by return value (``add_optimization_profile`` -1, ``set_tensor_address`` /
``execute_async_v3`` False): each is checked.

The pure parts (profile shapes, build path, which layers to pin, GPU slug, the not-T4 warning, the sidecar)
are plain functions; ``build_engine`` takes the ``tensorrt`` module as a parameter so it can be driven by a
fake where TensorRT is absent.

Build progress: TensorRT (10.0 on, 11 too) reports its optimiser's phases to an ``IProgressMonitor`` set as
``IBuilderConfig.progress_monitor``; ``progress_monitor`` subclasses it to drive one tqdm bar per active phase
(and logs each phase's steps and seconds at DEBUG). Its callbacks never raise and ``step_complete`` always
returns True: the bindings turn an exception, or anything false, into a request to cancel the build. Where the
bindings have no ``IProgressMonitor`` the build runs without one. TensorRT's own log follows the verbosity:
WARNING, INFO with -v (``trt_severity``).
"""
from __future__ import annotations

import logging
import re
import threading
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from bakeoff.common.io import atomic_path, read_json, sha256_file, write_json
from bakeoff.common.log import progress_bar
from bakeoff.export.onnx_export import EXPORT_DIR
from bakeoff.train.run import MODEL

logger = logging.getLogger(__name__)

WEAK_FP16, STRONGLY_TYPED = "weak-fp16", "strongly-typed"
# Layers kept in FP32 on the TensorRT 10 path: TensorRT LayerType name -> ops (None: every op of that type).
PIN_FP32: dict[str, frozenset[str] | None] = {
    "NORMALIZATION": None,  # LayerNormalization (opset >= 17 parses to one INormalizationLayer)
    "SOFTMAX": None,
    "REDUCE": None,  # ReduceMean of a decomposed LayerNorm, and mean pooling
    "ELEMENTWISE": frozenset({"POW"}),  # the variance of a decomposed LayerNorm
    "UNARY": frozenset({"SQRT"}),
}
# --target NAME -> the GPU an engine must be built on to be tuned for it.
TARGETS = {"t4": {"gpu": "Tesla T4", "compute_capability": "7.5"}}
SIDECAR_KEYS = ("tensorrt", "gpu", "compute_capability", "profile", "precision", "onnx", "onnx_sha256",
                "checkpoint_sha256", "engine_sha256", "built")


class EngineMismatch(RuntimeError):
    """An engine that cannot be used (here, or as asked): other TensorRT or GPU, changed sources, no parity pass,
    a missing or malformed sidecar, a shape outside its profile."""


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the ONNX or build the engine; the message carries TensorRT's errors."""


@dataclass(frozen=True)
class EngineOptions:
    """What ``python -m export --fp16`` passes to the builder."""

    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    workspace_gb: float = 4.0  # fits a 16 GB T4 beside the runtime's own memory
    target: str | None = None  # "t4": warn when the build GPU is not one


class Profile(NamedTuple):
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


def profile_shapes(img_size: int, min_batch: int, opt_batch: int, max_batch: int) -> Profile:
    """The optimisation profile of an N x 3 x S x S input; requires 1 <= min <= opt <= max."""
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"batch profile needs 1 <= min <= opt <= max, got min={min_batch} opt={opt_batch} "
                         f"max={max_batch}")
    return Profile(*((b, 3, img_size, img_size) for b in (min_batch, opt_batch, max_batch)))


def profile_text(profile: Profile) -> str:
    return f"min {profile.min} opt {profile.opt} max {profile.max}"


def major_version(version: str) -> int:
    head = version.split(".", 1)[0]
    if not head.isdigit():
        raise ValueError(f"unrecognised TensorRT version {version!r}")
    return int(head)


def build_path(trt_version: str) -> str:
    """``weak-fp16`` for TensorRT 10, ``strongly-typed`` from 11 on (the FP16 builder flag was removed)."""
    major = major_version(trt_version)
    if major < 10:
        raise EngineBuildError(f"TensorRT {trt_version} is too old; the [trt] extra needs tensorrt>=10")
    return WEAK_FP16 if major == 10 else STRONGLY_TYPED


def should_pin(layer_type: str, op: str | None = None) -> bool:
    """Whether a layer (TensorRT ``LayerType`` name, and its op name where it has one) is kept in FP32."""
    if layer_type not in PIN_FP32:
        return False
    ops = PIN_FP32[layer_type]
    return ops is None or op in ops


def layers_to_pin(layers: Iterable[tuple[str, str, str | None]]) -> list[str]:
    """Names of the (name, layer type, op) layers to keep in FP32."""
    return [name for name, kind, op in layers if should_pin(kind, op)]


def gpu_slug(name: str) -> str:
    """'Tesla T4' -> 't4', 'NVIDIA H200' -> 'h200', 'NVIDIA GeForce RTX 4090' -> 'rtx-4090'."""
    s = re.sub(r"\b(nvidia|tesla|geforce|quadro)\b", " ", name.lower())
    return re.sub(r"[^a-z0-9]+", "-", s).strip("-") or "gpu"


def _sm(compute_capability: str) -> str:
    return "sm_" + compute_capability.replace(".", "")


def engine_name(env: dict, precision: str = "fp16") -> str:
    """``model.<gpu slug>.<precision>.engine``: one per GPU, so engines for several GPUs sit side by side."""
    return f"model.{env['gpu_slug']}.{precision}.engine"


def timing_cache_path(runs: Path, env: dict) -> Path:
    """One persistent timing cache per (GPU, TensorRT version): timings do not carry across either."""
    return Path(runs) / f".trt_timing.{env['gpu_slug']}-trt{env['tensorrt']}.cache"


def target_warning(target: str | None, env: dict) -> str | None:
    """Why an engine built in ``env`` is not tuned for ``target`` (None when it is, or no target)."""
    if target is None:
        return None
    if target not in TARGETS:
        raise ValueError(f"unknown --target {target!r}; known: {sorted(TARGETS)}")
    want = TARGETS[target]
    if env["compute_capability"] == want["compute_capability"]:
        return None
    return (f"built on {env['gpu']} ({_sm(env['compute_capability'])}), not a {want['gpu']} "
            f"({_sm(want['compute_capability'])}): the engine is not {target.upper()}-tuned and will "
            f"not load there; rebuild it on a {want['gpu']} (python -m export --fp16 --target {target})")


# -- environment -------------------------------------------------------------------------------------------

def _import_tensorrt() -> tuple[Any, str | None]:
    try:
        import tensorrt
    except Exception as e:  # noqa: BLE001  ImportError, or a broken install raising OSError on its libraries
        return None, f"tensorrt is not importable ({type(e).__name__}: {e}); install the [trt] extra on a GPU machine"
    return tensorrt, None


def _cuda_gpu() -> tuple[dict | None, str | None]:
    import torch

    if not torch.cuda.is_available():
        return None, "no CUDA GPU is visible to torch"
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"gpu": props.name, "compute_capability": f"{props.major}.{props.minor}",
            "gpu_slug": gpu_slug(props.name)}, None


def trt_unavailable_reason() -> str | None:
    """Why no engine can be built here (None when tensorrt imports and a CUDA GPU is present)."""
    trt, why = _import_tensorrt()
    if trt is None:
        return why
    return _cuda_gpu()[1]


def current_trt_environment() -> dict | None:
    """{"tensorrt", "gpu", "compute_capability", "gpu_slug"} of this machine; None without tensorrt or a GPU."""
    trt, _ = _import_tensorrt()
    if trt is None:
        return None
    gpu, _ = _cuda_gpu()
    return None if gpu is None else {"tensorrt": trt.__version__, **gpu}


# -- sidecar -----------------------------------------------------------------------------------------------

def sidecar_path(engine_path: str | Path) -> Path:
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def write_engine_sidecar(engine_path: str | Path, info: dict) -> Path:
    """Write ``info`` (at least SIDECAR_KEYS) beside the engine, atomically; returns the sidecar path."""
    missing = [k for k in SIDECAR_KEYS if k not in info]
    if missing:
        raise ValueError(f"{sidecar_path(engine_path)}: sidecar info lacks {missing}")
    path = sidecar_path(engine_path)
    write_json(path, {"engine": Path(engine_path).name, **info})
    return path


def read_engine_sidecar(engine_path: str | Path) -> dict:
    """The sidecar of ``engine_path``; ``EngineMismatch`` naming the file and the problem when absent or malformed."""
    path = sidecar_path(engine_path)
    if not path.exists():
        raise EngineMismatch(f"{engine_path}: no sidecar {path.name}, so its GPU, TensorRT version and sources "
                             f"are unknown")
    try:
        info = read_json(path)
    except ValueError as e:  # bad JSON, or not UTF-8
        raise EngineMismatch(f"{path}: not a valid sidecar ({type(e).__name__}: {e})") from None
    if not isinstance(info, dict):
        raise EngineMismatch(f"{path}: not a valid sidecar (a JSON {type(info).__name__}, not an object)")
    missing = [k for k in SIDECAR_KEYS if k not in info]
    if missing:
        raise EngineMismatch(f"{path}: not a valid sidecar (it lacks {', '.join(missing)})")
    return info


def rebuild_command(run_dir: Path) -> str:
    return f"python -m export --fp16 --runs {run_dir.parent} --pairs {run_dir.name}"


def source_problems(info: dict, engine_path: Path, run_dir: Path) -> list[str]:
    """What changed since ``info`` was written: the engine file, the ONNX it was built from, the run's checkpoint."""
    problems = []
    files = [(engine_path, info["engine_sha256"], "the engine file", "changed since its sidecar was written"),
             (run_dir / EXPORT_DIR / info["onnx"], info["onnx_sha256"], f"{info['onnx']}, which it was built from,",
              "was re-exported after the engine was built"),
             (run_dir / MODEL, info["checkpoint_sha256"], f"the run's checkpoint {MODEL}",
              "changed (retrained) after the engine was built")]
    for path, sha, what, changed in files:
        if not path.exists():
            problems.append(f"{what} is missing")
        elif sha256_file(path) != sha:
            problems.append(f"{what} {changed}")
    return problems


def check_engine_sidecar(engine_path: str | Path, run_dir: str | Path | None = None,
                         env: dict | None = None) -> dict:
    """The sidecar of an engine usable here; else ``EngineMismatch`` saying what is wrong and how to rebuild.

    Usable: its sidecar is well formed and records a parity check against PyTorch that passed; TensorRT version,
    GPU name and compute capability match ``env`` (default: this machine); the engine, the ONNX it was built
    from (``run_dir``/export/) and the run's checkpoint are unchanged. ``run_dir`` defaults to the run holding
    the engine (RUNS/<pair>/export/<engine>).
    """
    engine_path = Path(engine_path)
    run_dir = Path(run_dir) if run_dir is not None else engine_path.parent.parent
    rebuild = f"Rebuild it on this GPU: {rebuild_command(run_dir)}"
    try:
        info = read_engine_sidecar(engine_path)
    except EngineMismatch as e:
        raise EngineMismatch(f"{e}. {rebuild}") from None
    parity = info.get("parity") if isinstance(info.get("parity"), dict) else {}
    if parity.get("status") == "failed":
        raise EngineMismatch(f"{engine_path}: its outputs failed the parity check against PyTorch when it was built "
                             f"({'; '.join(parity.get('failures', []))}; see parity.json); it is not used")
    if parity.get("status") != "passed":
        raise EngineMismatch(f"{engine_path}: built, but its outputs were never checked against PyTorch (the export "
                             f"stopped before its parity check); it is not used. {rebuild}")
    env = env if env is not None else current_trt_environment()
    built = f"TensorRT {info['tensorrt']} on {info['gpu']} ({_sm(info['compute_capability'])})"
    if env is None:
        raise EngineMismatch(f"{engine_path}: built with {built}, but {trt_unavailable_reason()}")
    problems = []
    if env["tensorrt"] != info["tensorrt"]:
        problems.append(f"TensorRT {info['tensorrt']} built it, this is TensorRT {env['tensorrt']}")
    if env["compute_capability"] != info["compute_capability"]:
        problems.append(f"built for {_sm(info['compute_capability'])}, this GPU is {_sm(env['compute_capability'])}")
    if env["gpu"] != info["gpu"]:
        problems.append(f"built on {info['gpu']}, this is {env['gpu']}")
    problems += source_problems(info, engine_path, run_dir)
    if problems:
        raise EngineMismatch(f"{engine_path}: {'; '.join(problems)}. {rebuild}")
    return info


# -- build -------------------------------------------------------------------------------------------------

def _describe_layers(network: Any, trt: Any) -> Iterable[tuple[Any, str, str | None]]:
    """(layer, LayerType name, op name) for every layer; elementwise/unary layers are downcast to read ``op``."""
    downcast = {"ELEMENTWISE": "IElementWiseLayer", "UNARY": "IUnaryLayer"}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        kind = layer.type.name
        op = None
        if kind in downcast:
            layer.__class__ = getattr(trt, downcast[kind])
            op = layer.op.name
        yield layer, kind, op


def pin_fp32_layers(network: Any, trt: Any) -> list[str]:
    """Constrain the FP16-fragile layers of ``network`` to FP32 (TensorRT 10 weak typing); returns their names."""
    described = [(layer, kind, op) for layer, kind, op in _describe_layers(network, trt)
                 if layer.get_output(0).dtype == trt.float32]  # not shape arithmetic on integers
    names = set(layers_to_pin((layer.name, kind, op) for layer, kind, op in described))
    for layer, _, _ in described:
        if layer.name in names:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
    return sorted(names)


def attach_timing_cache(config: Any, path: Path) -> None:
    """Give the builder ``config`` the timing cache saved at ``path``, or a fresh one when there is none or
    TensorRT refuses it (corrupt, or from another TensorRT or GPU: a warning says so)."""
    for data in ([path.read_bytes()] if path.exists() else []) + [b""]:
        cache = config.create_timing_cache(data)
        if cache is not None and config.set_timing_cache(cache, False):
            return
        if data:
            warnings.warn(f"{path}: TensorRT refused this timing cache (corrupt, or from another TensorRT version or "
                          f"GPU); building with a fresh one, which replaces it", stacklevel=2)
    raise EngineBuildError("TensorRT refused an empty timing cache; the builder config is unusable")


def trt_severity(trt: Any) -> Any:
    """TensorRT's logger severity for this process's verbosity: INFO with -v (the ``bakeoff`` loggers at DEBUG),
    else WARNING (-q keeps warnings too)."""
    return trt.Logger.INFO if logger.isEnabledFor(logging.DEBUG) else trt.Logger.WARNING


def progress_monitor(trt: Any, progress: bool = True) -> Any | None:
    """An instance of a ``trt.IProgressMonitor`` subclass showing TensorRT's build phases as tqdm bars (shown when
    ``progress``; nested phases indented under their parent) and logging each finished phase at DEBUG; None when
    the bindings have no ``IProgressMonitor``. Set it as ``config.progress_monitor`` and call its ``close()``
    after the build (closes the bars of phases TensorRT left open, e.g. on a failed build).

    The callbacks follow TensorRT's contract (``NvInfer.h``, the Python bindings' ``PyProgressMonitor``):
    ``phase_start(phase_name, parent_phase, num_steps)`` (``parent_phase`` None for a top-level phase),
    ``step_complete(phase_name, step)`` for steps 0 .. num_steps - 1, returning True to go on (False, or an
    exception, cancels the build), ``phase_finish(phase_name)``, possibly before every step was reported. They
    may come from several TensorRT threads: a lock guards the bars.
    """
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class BuildProgress(base):
        def __init__(self) -> None:
            base.__init__(self)  # required: the bindings' trampoline class is initialised here
            self._lock = threading.Lock()
            self._phases: dict[str, dict] = {}  # active phase name -> bar, steps done, depth, start

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            try:
                with self._lock:
                    parent = self._phases.get(parent_phase) if parent_phase is not None else None
                    depth = parent["depth"] + 1 if parent else 0
                    bar = progress_bar(progress, total=num_steps, desc="TensorRT " + "  " * depth + phase_name,
                                       unit="step", leave=False)
                    self._phases[phase_name] = {"bar": bar, "steps": 0, "total": num_steps, "depth": depth,
                                                "start": time.perf_counter()}
            except Exception:  # a display problem must not cancel the build
                logger.debug("TensorRT progress: phase_start(%r) failed", phase_name, exc_info=True)

        def step_complete(self, phase_name: str, step: int) -> bool:
            try:
                with self._lock:
                    phase = self._phases.get(phase_name)
                    if phase is not None and step + 1 > phase["steps"]:
                        phase["bar"].update(step + 1 - phase["steps"])
                        phase["steps"] = step + 1
            except Exception:
                logger.debug("TensorRT progress: step_complete(%r) failed", phase_name, exc_info=True)
            return True  # never cancel the build

        def phase_finish(self, phase_name: str) -> None:
            try:
                with self._lock:
                    phase = self._phases.pop(phase_name, None)
                    if phase is not None:
                        phase["bar"].close()
                if phase is not None:
                    logger.debug("TensorRT %s%s: %d/%d steps in %.1f s", "  " * phase["depth"], phase_name,
                                 phase["steps"], phase["total"], time.perf_counter() - phase["start"])
            except Exception:
                logger.debug("TensorRT progress: phase_finish(%r) failed", phase_name, exc_info=True)

        def close(self) -> None:
            with self._lock:
                for phase in self._phases.values():
                    phase["bar"].close()
                self._phases.clear()

    return BuildProgress()


def build_engine(onnx_fp32: Path, onnx_fp16: Path, engine_path: Path, img_size: int, opts: EngineOptions,
                 timing_cache: Path, env: dict, checkpoint_sha256: str, trt: Any = None, *,
                 progress: bool = False) -> dict:
    """Build the FP16 engine at ``engine_path`` + its sidecar (no parity verdict yet); returns the sidecar info.

    TensorRT 10 builds from ``onnx_fp32`` with FP32 pins, TensorRT 11 from ``onnx_fp16`` (strongly typed).
    ``checkpoint_sha256`` is the run checkpoint's, which the ONNX was exported from. With ``progress``, bars
    follow TensorRT's build phases (``progress_monitor``).
    """
    if trt is None:
        trt, why = _import_tensorrt()
        if trt is None:
            raise EngineBuildError(why)
    path = build_path(trt.__version__)
    source = onnx_fp32 if path == WEAK_FP16 else onnx_fp16
    profile = profile_shapes(img_size, opts.min_batch, opts.opt_batch, opts.max_batch)
    trt_logger = trt.Logger(trt_severity(trt))
    builder = trt.Builder(trt_logger)
    network = builder.create_network(0)  # TRT 10: weakly typed; TRT 11: strongly typed, always
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(source)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"{source}: TensorRT {trt.__version__} cannot parse it: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace_gb * (1 << 30)))
    pinned: list[str] = []
    if path == WEAK_FP16:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = pin_fp32_layers(network, trt)
    shape_profile = builder.create_optimization_profile()
    input_name = network.get_input(0).name
    shape_profile.set_shape(input_name, profile.min, profile.opt, profile.max)
    if config.add_optimization_profile(shape_profile) < 0:  # TensorRT's -1: an invalid profile
        raise EngineBuildError(f"{source}: TensorRT {trt.__version__} refused the optimisation profile "
                               f"{input_name!r} min {profile.min} opt {profile.opt} max {profile.max} "
                               "(see its log above)")
    attach_timing_cache(config, timing_cache)
    logger.debug("TensorRT %s %s build from %s (profile %s, workspace %s GB, timing cache %s); %d layers pinned to "
                 "fp32: %s", trt.__version__, path, source, profile_text(profile), opts.workspace_gb, timing_cache,
                 len(pinned), ", ".join(pinned) or "none")
    monitor = progress_monitor(trt, progress)
    if monitor is not None:
        config.progress_monitor = monitor  # the bindings keep it alive as long as the config
    start = time.perf_counter()
    try:
        plan = builder.build_serialized_network(network, config)
    finally:
        if monitor is not None:
            monitor.close()
    if plan is None:
        raise EngineBuildError(f"{source}: TensorRT {trt.__version__} failed to build an engine (see its log above)")
    seconds = time.perf_counter() - start
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(bytes(plan))
    with atomic_path(timing_cache) as tmp:
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    info = {
        "tensorrt": trt.__version__, "gpu": env["gpu"], "compute_capability": env["compute_capability"],
        "profile": {"input": input_name, **{k: list(v) for k, v in profile._asdict().items()}},
        "precision": "fp16" + (f", {len(pinned)} layers pinned to fp32" if path == WEAK_FP16
                               else ", strongly typed from the fp16 ONNX (LayerNorm/Softmax fp32)"),
        "build_path": path, "pinned_fp32_layers": pinned,
        "onnx": source.name, "onnx_sha256": sha256_file(source), "checkpoint_sha256": checkpoint_sha256,
        "engine_sha256": sha256_file(engine_path),
        "options": asdict(opts), "timing_cache": str(timing_cache), "build_seconds": round(seconds, 1),
        "target_warning": target_warning(opts.target, env),
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_engine_sidecar(engine_path, info)
    return info


def set_input_shape(engine: Any, context: Any, name: str, shape: tuple[int, ...], engine_path: Path) -> None:
    """``context.set_input_shape``, raising ``EngineMismatch`` with the profile's batch range when TensorRT refuses."""
    if not context.set_input_shape(name, shape):
        low, _, high = engine.get_tensor_profile_shape(name, 0)
        raise EngineMismatch(f"{engine_path}: TensorRT refused input shape {shape} for {name!r}; the engine's "
                             f"profile takes batches {low[0]} to {high[0]}")


def engine_logits(engine_path: Path, inputs: np.ndarray, batch_size: int, trt: Any = None) -> np.ndarray:
    """Logits of an engine on float32 ``inputs`` (N x 3 x S x S), through torch CUDA buffers (for parity)."""
    import torch

    trt = trt or _import_tensorrt()[0]
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise EngineMismatch(f"{engine_path}: TensorRT {trt.__version__} cannot deserialize it; rebuild it here")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    (inp,) = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    (out,) = [n for n in names if n != inp]
    dtypes = {trt.float32: torch.float32, trt.float16: torch.float16}
    stream = torch.cuda.current_stream()
    outputs = []
    for start in range(0, len(inputs), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(inputs[start:start + batch_size])).cuda()
        x = x.to(dtypes[engine.get_tensor_dtype(inp)])
        set_input_shape(engine, context, inp, tuple(x.shape), engine_path)
        y = torch.empty(tuple(context.get_tensor_shape(out)), dtype=dtypes[engine.get_tensor_dtype(out)], device="cuda")
        for name, tensor in ((inp, x), (out, y)):
            if not context.set_tensor_address(name, tensor.data_ptr()):
                raise EngineMismatch(f"{engine_path}: TensorRT refused the device address of {name!r}")
        if not context.execute_async_v3(stream.cuda_stream):
            raise EngineMismatch(f"{engine_path}: TensorRT refused to run a batch of {len(x)}")
        stream.synchronize()
        outputs.append(y.float().cpu().numpy())
    return np.concatenate(outputs)
