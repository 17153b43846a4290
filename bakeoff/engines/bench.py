"""trtexec-style latency benchmarks of any runner: warm-up by duration, then queries until a minimum duration
AND a minimum count; per-query statistics with trtexec's nearest-rank percentiles, and throughput over the
total host walltime (first timed query's start to the last one's end).

"Latency" means what it means in trtexec's performance summary. For GPU runners that time each query with
CUDA events (``Runner.last_timing``) it is H2D + GPU compute + D2H, reported beside Enqueue Time, H2D
Latency, GPU Compute Time and D2H Latency (and the host wall time of one ``predict`` call, which adds Python
and synchronisation overhead). For CPU runners there is no H2D or D2H: Latency is the host wall time of one
``predict`` call.

``RUNS/<pair>/latency/<runtime>[-<precision>].json`` (the suffix when the precision is not the runtime's
default) holds one benchmark; a T4 projection, when asked for on another device, sits under ``estimate``,
labelled ESTIMATE.
"""
from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from bakeoff.common.device import library_versions
from bakeoff.common.io import write_json
from bakeoff.engines.projection import TARGETS, format_estimate, model_cost, project
from bakeoff.engines.runners import Runner, TorchRunner, open_runner
from bakeoff.train.run import load_run

logger = logging.getLogger(__name__)

DEFAULT_PRECISION = {"torch": "fp32", "onnxruntime": "fp32", "tensorrt": "fp16"}
PERCENTILES = {"p90": 90, "p95": 95, "p99": 99}
LATENCY = "latency"
# per-query GPU figures (ms) from Runner.last_timing, in trtexec's order and words
GPU_FIGURES = {"enqueue_ms": "Enqueue Time", "h2d_ms": "H2D Latency", "gpu_compute_ms": "GPU Compute Time",
               "d2h_ms": "D2H Latency"}
EVENT_LATENCY = "H2D + GPU compute + D2H per query (CUDA events)"
WALL_LATENCY = "host wall time of one predict call (CPU: no H2D or D2H)"


def percentile(ascending: Sequence[float], p: float) -> float:
    """trtexec's nearest rank: ``ascending[max(n - 1 - floor((1 - p/100) * n), 0)]``.

    Evaluated exactly: trtexec's float32 can land one rank off at boundaries (n=100, p=99 gives it the maximum).
    """
    if not 0 <= p <= 100:
        raise ValueError(f"percentile {p} is not in [0, 100]")
    n = len(ascending)
    exclude = math.floor((1 - Fraction(str(p)) / 100) * n)  # str: 99.9 as the decimal it reads as
    return ascending[max(n - 1 - exclude, 0)]


def median(ascending: Sequence[float]) -> float:
    """The middle value; the mean of the two middle values when there is an even number."""
    m = len(ascending) // 2
    return ascending[m] if len(ascending) % 2 else (ascending[m - 1] + ascending[m]) / 2


def latency_stats(samples_ms: Sequence[float] | np.ndarray) -> dict[str, float]:
    """min / mean / median / p90 / p95 / p99 / max of per-query times (ms), as trtexec computes them."""
    a = sorted(float(x) for x in samples_ms)
    if not a:
        raise ValueError("no latency samples")
    stats = {"min": a[0], "mean": math.fsum(a) / len(a), "median": median(a),
             **{k: percentile(a, q) for k, q in PERCENTILES.items()}, "max": a[-1]}
    return {k: round(v, 4) for k, v in stats.items()}


def measure(fn: Callable[[], object], warmup_s: float, min_duration_s: float, min_iters: int,
            clock: Callable[[], float] = time.perf_counter) -> list[tuple[float, float]]:
    """Call ``fn`` for ``warmup_s`` seconds (discarded), then until both ``min_duration_s`` seconds (first timed
    call's start to the last one's end) and ``min_iters`` calls (at least one) have passed.

    Returns each timed call's ``(start, end)`` on ``clock``, in seconds.
    """
    start = clock()
    while clock() - start < warmup_s:
        fn()
    spans: list[tuple[float, float]] = []
    while len(spans) < max(min_iters, 1) or spans[-1][1] - spans[0][0] < min_duration_s:
        t0 = clock()
        fn()
        spans.append((t0, clock()))
    return spans


def summarize(batch: int, spans: list[tuple[float, float]], timings: list[dict[str, float]] | None) -> dict:
    """One batch size's record from its timed queries' ``(start, end)`` (s) and, for GPU runners, their
    ``last_timing``; every time is in ms except the totals (s)."""
    n = len(spans)
    walltime_s = spans[-1][1] - spans[0][0]
    wall_ms = [(end - start) * 1e3 for start, end in spans]
    row = {"batch": batch, "iterations": n, "total_host_walltime_s": round(walltime_s, 4),
           "throughput_qps": round(n / walltime_s, 2), "throughput_ips": round(batch * n / walltime_s, 2)}
    if not timings:
        return row | {"latency_ms": latency_stats(wall_ms), **dict.fromkeys(GPU_FIGURES),
                      "total_gpu_compute_s": None, "wall_ms": None}
    gpu = {k: latency_stats([t[k] for t in timings]) for k in GPU_FIGURES}
    latency_ms = [t["h2d_ms"] + t["gpu_compute_ms"] + t["d2h_ms"] for t in timings]  # trtexec's Latency
    return row | {"latency_ms": latency_stats(latency_ms), **gpu,
                  "total_gpu_compute_s": round(math.fsum(t["gpu_compute_ms"] for t in timings) / 1e3, 4),
                  "wall_ms": latency_stats(wall_ms)}


def random_batch(batch: int, img_size: int, seed: int = 0) -> torch.Tensor:
    """Standard-normal N x 3 x S x S float32 (what normalised images look like to a model), fixed seed."""
    return torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed))


def _tile(images: torch.Tensor, batch: int) -> torch.Tensor:
    reps = -(-batch // len(images))
    return images.repeat(reps, 1, 1, 1)[:batch]


def _queries(runner: Runner, x: np.ndarray | torch.Tensor, warmup_s: float, duration_s: float, min_iters: int,
             clock: Callable[[], float]) -> tuple[list[tuple[float, float]], list[dict | None]]:
    """``measure`` over ``runner.predict(x)``: the timed queries' spans and their ``last_timing``."""
    timings: list[dict | None] = []

    def step() -> None:
        runner.predict(x)
        timings.append(runner.last_timing)

    spans = measure(step, warmup_s, duration_s, min_iters, clock=clock)
    return spans, timings[-len(spans):]  # the warm-up's come first


def bench_runner(runner: Runner, batches: list[int], warmup_s: float = 2.0, duration_s: float = 10.0,
                 min_iters: int = 10, inputs: torch.Tensor | None = None, seed: int = 0,
                 clock: Callable[[], float] = time.perf_counter,
                 on_batch: Callable[[int], None] | None = None) -> dict:
    """Benchmark ``runner`` at each batch size on random inputs (or on ``inputs``, tiled to the batch);
    ``on_batch(batch)`` is called once each batch size is measured (a progress bar's step)."""
    img_size = runner.config["preprocess"]["img_size"]
    too_big = [b for b in batches if runner.max_batch is not None and b > runner.max_batch]
    if too_big:  # trtexec refuses shapes outside the profile too: a chunked query would not be one query
        raise ValueError(f"batch {too_big[0]} is above {runner.name}'s max batch {runner.max_batch} "
                         f"(its optimization profile); rebuild it with a larger --max-batch")
    rows = []
    for b in batches:
        x = runner.prepare(_tile(inputs, b) if inputs is not None else random_batch(b, img_size, seed))
        spans, timings = _queries(runner, x, warmup_s, duration_s, min_iters, clock)
        rows.append(summarize(b, spans, timings if timings[0] else None))
        logger.debug("%s %s batch %d: %d queries in %.3f s, latency median %.4g ms", runner.name, runner.precision, b,
                     rows[-1]["iterations"], rows[-1]["total_host_walltime_s"], rows[-1]["latency_ms"]["median"])
        if on_batch is not None:
            on_batch(b)
    return {"runtime": runner.name, "precision": runner.precision, "device": runner.device,
            "is_t4": is_t4(runner.device), "threads": runner.threads, "runner": runner.describe(),
            "latency_definition": EVENT_LATENCY if runner.last_timing else WALL_LATENCY,
            "img_size": img_size, "warmup_s": warmup_s, "min_duration_s": duration_s, "min_iters": min_iters,
            "batches": rows}


def is_t4(device: str) -> bool:
    return re.search(r"\bT4\b", device, re.IGNORECASE) is not None


def _stats_line(title: str, s: dict) -> str:
    return (f"{title}: min = {s['min']:.4g} ms, max = {s['max']:.4g} ms, mean = {s['mean']:.4g} ms, "
            f"median = {s['median']:.4g} ms, percentile(90%) = {s['p90']:.4g} ms, "
            f"percentile(95%) = {s['p95']:.4g} ms, percentile(99%) = {s['p99']:.4g} ms")


def format_trtexec(result: dict) -> str:
    """The benchmark in trtexec's performance-summary layout, one per batch size (+ the labelled ESTIMATE)."""
    head = f"{result.get('pair', '')} {result['runtime']} {result['precision']} on {result['device']}".strip()
    lines = [f"=== Performance summary === {head}", f"Latency = {result['latency_definition']}"]
    if result["threads"]:
        lines.append(f"CPU threads: {result['threads']} (intra-op, pinned)")
    for r in result["batches"]:
        lines += [f"--- batch {r['batch']} ---",
                  f"Throughput: {r['throughput_qps']:.6g} qps ({r['throughput_ips']:.6g} images/s)",
                  _stats_line("Latency", r["latency_ms"])]
        lines += [_stats_line(title, r[key]) for key, title in GPU_FIGURES.items() if r[key]]
        lines.append(f"Total Host Walltime: {r['total_host_walltime_s']:.6g} s ({r['iterations']} queries after a "
                     f"{result['warmup_s']:g} s warm-up)")
        if r["total_gpu_compute_s"] is not None:
            lines.append(f"Total GPU Compute Time: {r['total_gpu_compute_s']:.6g} s")
        if r["wall_ms"]:
            lines.append(_stats_line("Host wall time of one predict call", r["wall_ms"]))
    others = result.get("cpu_contention")
    if others and others["contended"]:
        lines.append(f"WARNING: other processes used {others['other_cores']:g} of {others['cpus']} cores on average "
                     "during the benchmark, so these CPU figures are pessimistic")
    if result.get("estimate"):
        lines.append(format_estimate(result["estimate"]))
    return "\n".join(lines)


CONTENDED_CORES = 0.2  # other processes' average CPU use (cores) above which CPU figures are flagged


def busy_cpu_seconds(stat: str = "/proc/stat") -> float | None:
    """CPU time every process has spent on all cores (user, nice, system, irq, softirq, steal), in seconds;
    None where /proc/stat is absent (not Linux)."""
    try:
        with open(stat) as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = ticks + [0] * (8 - len(ticks))
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU time of this process, all its threads."""
    t = os.times()
    return t.user + t.system


def contention(busy: tuple[float, float], own: tuple[float, float], wall_s: float, cpus: int) -> dict:
    """How many cores other processes used on average while we measured (busy minus our own CPU time, over the
    wall time): unlike a load average, it does not lag and does not count this benchmark."""
    other = max(0.0, (busy[1] - busy[0]) - (own[1] - own[0])) / wall_s
    return {"other_cores": round(other, 3), "cpus": cpus, "wall_s": round(wall_s, 3),
            "contended": other > CONTENDED_CORES,
            "method": "(all cores' busy time, /proc/stat) - (this process's CPU time), over the benchmark's wall time"}


def latency_path(run_dir: Path, runtime: str, precision: str) -> Path:
    suffix = "" if precision == DEFAULT_PRECISION.get(runtime) else f"-{precision}"
    return Path(run_dir) / LATENCY / f"{runtime}{suffix}.json"


def real_images(data: str | Path, config: dict, n: int) -> torch.Tensor:
    """The first ``n`` test images of dataset ``data``, preprocessed as the run was."""
    from bakeoff.train.data.cache import load_cache
    from bakeoff.train.data.dataset import load_dataset
    from bakeoff.train.preprocess import Preprocess

    ds = load_dataset(data)
    rows = ds.split_indices("test")[:n]
    images = load_cache(ds, config["preprocess"]["cache_size"])[np.sort(rows)]
    return Preprocess.from_config(config["preprocess"], "cpu")(images)


def bench_pair(run_dir: str | Path, runtime: str, batches: list[int], precision: str | None = None,
               warmup_s: float = 2.0, duration_s: float = 10.0, min_iters: int = 10, data: str | Path | None = None,
               project_to: str | None = None, seed: int = 0, write: bool = True,
               on_batch: Callable[[int], None] | None = None, **runner_kw) -> dict:
    """Benchmark one run on one runtime, add the model's cost (and a projection), write the latency JSON;
    ``on_batch(batch)`` is called once each batch size is measured."""
    run_dir = Path(run_dir)
    precision = precision or DEFAULT_PRECISION[runtime]
    start = time.perf_counter()
    runner = open_runner(run_dir, runtime, precision=precision, **runner_kw)
    logger.debug("%s: opened %s in %.1f s: %s", run_dir.name, runner.name, time.perf_counter() - start,
                 runner.describe())
    inputs = real_images(data, runner.config, max(batches)) if data else None
    busy, own, start = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
    try:
        result = bench_runner(runner, batches, warmup_s, duration_s, min_iters, inputs=inputs, seed=seed,
                              on_batch=on_batch)
    finally:
        runner.close()
    # other processes competing for the cores make CPU figures pessimistic (and oversubscribed OpenMP collapses)
    busy_after = busy_cpu_seconds()
    others = None if busy is None or busy_after is None else contention(
        (busy, busy_after), (own, own_cpu_seconds()), time.perf_counter() - start, os.cpu_count() or 1)
    model = runner.model if isinstance(runner, TorchRunner) else load_run(run_dir)[0]
    cost = model_cost(model, result["img_size"])
    result = {"pair": run_dir.name, "run_dir": str(run_dir), **result,
              "input": f"first {len(inputs)} test images of {data}, tiled" if data else f"random normal, seed {seed}",
              "model": {"name": runner.config["backbone"]["name"], "params": cost["params"],
                        "flops_per_image": cost["flops_per_image"], "weight_bytes_fp16": cost["weight_bytes"],
                        "activation_bytes_per_image_fp16": cost["activation_bytes_per_image"]},
              "cpu_contention": others, "date": datetime.now(UTC).isoformat(timespec="seconds"),
              "versions": library_versions(), "estimate": None}
    if project_to and not result["is_t4"]:
        result["estimate"] = project(cost, batches, TARGETS[project_to])
    if write:
        write_json(latency_path(run_dir, runtime, precision), result)
    return result
