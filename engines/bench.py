"""trtexec-style latency benchmarks of any runner: warm-up by duration, then iterations until a minimum duration
AND a minimum count; per-iteration latency percentiles, throughput, and (GPU runners) GPU compute time and
host latency (H2D + compute + D2H) from CUDA events, apart from the wall-clock latency a caller sees.

``RUNS/<pair>/latency/<runtime>[-<precision>].json`` (the suffix when the precision is not the runtime's
default) holds one benchmark; a T4 projection, when asked for on another device, sits under ``estimate``,
labelled ESTIMATE.
"""
from __future__ import annotations

import os
import platform
import re
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from engines.projection import TARGETS, format_estimate, model_cost, project
from engines.runners import Runner, TorchRunner, open_runner
from train.data.io import write_json
from train.run import load_run

DEFAULT_PRECISION = {"torch": "fp32", "onnxruntime": "fp32", "tensorrt": "fp16"}
PERCENTILES = {"p90": 90, "p95": 95, "p99": 99}
LATENCY = "latency"
PACKAGES = ("torch", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "cuda-python", "cuda-bindings",
            "pycuda", "timm", "open_clip_torch")


def latency_stats(samples_ms: list[float] | np.ndarray) -> dict:
    """min / mean / median / p90 / p95 / p99 / max of per-iteration latencies (ms; linear-interpolated percentiles)."""
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no latency samples")
    stats = {"min": a.min(), "mean": a.mean(), "median": np.median(a),
             **{k: np.percentile(a, q) for k, q in PERCENTILES.items()}, "max": a.max()}
    return {k: round(float(v), 4) for k, v in stats.items()}


def measure(fn: Callable[[], object], warmup_s: float, min_duration_s: float, min_iters: int,
            sync: Callable[[], object] | None = None, clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Call ``fn`` for ``warmup_s`` seconds (discarded), then until both ``min_duration_s`` seconds and
    ``min_iters`` calls have passed; returns each timed call's latency in ms (``sync`` runs inside the timing)."""
    def once() -> float:
        t0 = clock()
        fn()
        if sync is not None:
            sync()
        return (clock() - t0) * 1e3

    start = clock()
    while clock() - start < warmup_s:
        once()
    samples: list[float] = []
    start = clock()
    while len(samples) < min_iters or clock() - start < min_duration_s:
        samples.append(once())
    return samples


def random_batch(batch: int, img_size: int, seed: int = 0) -> torch.Tensor:
    """Standard-normal N x 3 x S x S float32 (what normalised images look like to a model), fixed seed."""
    return torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed))


def _tile(images: torch.Tensor, batch: int) -> torch.Tensor:
    reps = -(-batch // len(images))
    return images.repeat(reps, 1, 1, 1)[:batch]


def bench_runner(runner: Runner, batches: list[int], warmup_s: float = 2.0, duration_s: float = 10.0,
                 min_iters: int = 10, inputs: torch.Tensor | None = None, seed: int = 0,
                 clock: Callable[[], float] = time.perf_counter) -> dict:
    """Benchmark ``runner`` at each batch size on random inputs (or on ``inputs``, tiled to the batch)."""
    img_size = runner.config["preprocess"]["img_size"]
    rows = []
    for b in batches:
        x = runner.prepare(_tile(inputs, b) if inputs is not None else random_batch(b, img_size, seed))
        gpu: list[float] = []
        host: list[float] = []

        def step() -> None:
            runner.predict(x)
            if runner.last_timing:
                gpu.append(runner.last_timing["gpu_compute_ms"])
                host.append(runner.last_timing["host_latency_ms"])

        samples = measure(step, warmup_s, duration_s, min_iters, clock=clock)
        n = len(samples)
        wall_s = sum(samples) / 1e3
        rows.append({"batch": b, "iterations": n, "duration_s": round(wall_s, 4),
                     "latency_ms": latency_stats(samples),
                     "throughput_ips": round(b * n / wall_s, 2),
                     "gpu_compute_ms": latency_stats(gpu[-n:]) if gpu else None,
                     "host_latency_ms": latency_stats(host[-n:]) if host else None})
    return {"runtime": runner.name, "precision": runner.precision, "device": runner.device,
            "is_t4": is_t4(runner.device), "threads": runner.threads, "runner": runner.describe(),
            "img_size": img_size, "warmup_s": warmup_s, "min_duration_s": duration_s, "min_iters": min_iters,
            "batches": rows}


def is_t4(device: str) -> bool:
    return re.search(r"\bT4\b", device, re.IGNORECASE) is not None


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def _stats_line(title: str, s: dict) -> str:
    return (f"{title}: min = {s['min']:.4g} ms, max = {s['max']:.4g} ms, mean = {s['mean']:.4g} ms, "
            f"median = {s['median']:.4g} ms, percentile(90%) = {s['p90']:.4g} ms, "
            f"percentile(95%) = {s['p95']:.4g} ms, percentile(99%) = {s['p99']:.4g} ms")


def format_trtexec(result: dict) -> str:
    """The benchmark in trtexec's layout, one summary per batch size (+ the labelled ESTIMATE, if any)."""
    head = f"{result.get('pair', '')} {result['runtime']} {result['precision']} on {result['device']}".strip()
    lines = [f"=== Performance summary === {head}"]
    for r in result["batches"]:
        lines += [f"--- batch {r['batch']} ---",
                  f"Throughput: {r['iterations'] / r['duration_s']:.4g} qps ({r['throughput_ips']:.4g} images/s)",
                  _stats_line("Latency", r["latency_ms"])]
        if r["host_latency_ms"]:
            lines.append(_stats_line("Host Latency (H2D + GPU compute + D2H)", r["host_latency_ms"]))
        if r["gpu_compute_ms"]:
            lines.append(_stats_line("GPU Compute Time", r["gpu_compute_ms"]))
        lines.append(f"Total Host Walltime: {r['duration_s']:.4g} s ({r['iterations']} iterations, "
                     f"warm-up {result['warmup_s']:g} s)")
    load = result.get("load_average_1m")
    if load and max(load["before"], load["after"]) > load["cpus"]:
        lines.append(f"WARNING: load average {max(load['before'], load['after']):g} on {load['cpus']} CPUs during the "
                     "benchmark: other processes competed for the cores, so these CPU figures are pessimistic")
    if result.get("estimate"):
        lines.append(format_estimate(result["estimate"]))
    return "\n".join(lines)


def latency_path(run_dir: Path, runtime: str, precision: str) -> Path:
    suffix = "" if precision == DEFAULT_PRECISION.get(runtime) else f"-{precision}"
    return Path(run_dir) / LATENCY / f"{runtime}{suffix}.json"


def real_images(data: str | Path, config: dict, n: int) -> torch.Tensor:
    """The first ``n`` test images of dataset ``data``, preprocessed as the run was."""
    from train.data.cache import load_cache
    from train.data.dataset import load_dataset
    from train.preprocess import Preprocess

    ds = load_dataset(data)
    rows = ds.split_indices("test")[:n]
    images = load_cache(ds, config["preprocess"]["cache_size"])[np.sort(rows)]
    return Preprocess.from_config(config["preprocess"], "cpu")(images)


def bench_pair(run_dir: str | Path, runtime: str, batches: list[int], precision: str | None = None,
               warmup_s: float = 2.0, duration_s: float = 10.0, min_iters: int = 10, data: str | Path | None = None,
               project_to: str | None = None, seed: int = 0, write: bool = True, **runner_kw) -> dict:
    """Benchmark one run on one runtime, add the model's cost (and a projection), write the latency JSON."""
    run_dir = Path(run_dir)
    precision = precision or DEFAULT_PRECISION[runtime]
    runner = open_runner(run_dir, runtime, precision=precision, **runner_kw)
    inputs = real_images(data, runner.config, max(batches)) if data else None
    load_before = os.getloadavg()[0]
    result = bench_runner(runner, batches, warmup_s, duration_s, min_iters, inputs=inputs, seed=seed)
    # other processes competing for the cores make CPU figures meaningless (and oversubscribed OpenMP collapses)
    load = {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}
    model = runner.model if isinstance(runner, TorchRunner) else load_run(run_dir)[0]
    cost = model_cost(model, result["img_size"])
    result = {"pair": run_dir.name, "run_dir": str(run_dir), **result,
              "input": f"first {len(inputs)} test images of {data}, tiled" if data else f"random normal, seed {seed}",
              "model": {"name": runner.config["backbone"]["name"], "params": cost["params"],
                        "flops_per_image": cost["flops_per_image"], "weight_bytes_fp16": cost["weight_bytes"],
                        "activation_bytes_per_image_fp16": cost["activation_bytes_per_image"]},
              "load_average_1m": load, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "versions": versions(), "estimate": None}
    if project_to and not result["is_t4"]:
        result["estimate"] = project(cost, batches, TARGETS[project_to])
    if write:
        write_json(latency_path(run_dir, runtime, precision), result)
    return result
