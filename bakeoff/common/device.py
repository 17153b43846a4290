"""Device, precision and thread choices shared by training, evaluation and benchmarks."""
from __future__ import annotations

import contextlib
import os
import platform
from importlib import metadata

import torch


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CPU (AVX-512 bf16: ~2.5x faster than fp32 here) and on GPU."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def setup_threads(n: int | None = None) -> int:
    """Use every core for intra-op work (the default can be lower in containers), or ``$OMP_NUM_THREADS``.

    Two processes sharing two cores should run with one thread each: OpenMP threads that wait for a core
    the other process holds make both many times slower than running them one after the other.
    """
    n = cpu_threads(n)
    torch.set_num_threads(n)
    return n


def cpu_threads(threads: int | None = None) -> int:
    """CPU intra-op threads to use: ``threads``, else ``$OMP_NUM_THREADS``, else every core."""
    return threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


PACKAGES = ("torch", "torchvision", "timm", "open_clip_torch", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu",
            "tensorrt", "cuda-python", "cuda-bindings", "pycuda")


def library_versions() -> dict[str, str]:
    """Python and the installed versions of the packages that decide a number here (those present)."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    found["torch"] = torch.__version__  # with its build tag (+cu130, +cpu), which the package metadata drops
    return found
