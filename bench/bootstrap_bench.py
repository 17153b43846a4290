"""Time the paired bootstrap workload of one report: six runs x (macro-F1 + tail-F1) x 1000 resamples.

    python -m bench.bootstrap_bench [--n 5000] [--tags 256] [--resamples 1000] [--runs 6]

Synthetic long-tailed labels and noisy predictions; prints the timings and the machine they ran on.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from bakeoff.evaluate.bootstrap import bootstrap_indices, bootstrap_macro_f1
from bakeoff.evaluate.metrics import bucket_masks


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000, help="test images")
    ap.add_argument("--tags", type=int, default=256)
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=6)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    train_counts = np.round(np.exp(rng.uniform(np.log(5), np.log(5000), size=args.tags))).astype(int)  # log-uniform
    y = rng.random((args.n, args.tags)) < np.clip(train_counts / 20_000, 2e-4, 0.3)
    preds = [np.where(rng.random(y.shape) < 0.97, y, ~y) for _ in range(args.runs)]
    tail = bucket_masks(train_counts)["tail"]

    t0 = time.perf_counter()
    idx = bootstrap_indices(args.n, args.resamples)
    t_idx = time.perf_counter() - t0
    t0 = time.perf_counter()
    for pred in preds:
        bootstrap_macro_f1(y, pred, idx)
        bootstrap_macro_f1(y, pred, idx, tags_mask=tail)
    t_boot = time.perf_counter() - t0

    print(f"machine: {cpu_name()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.machine()}, "
          f"python {platform.python_version()}, numpy {np.__version__}")
    print(f"workload: {args.runs} runs x (macro-F1 + tail-F1 over {int(tail.sum())} tail tags) x "
          f"{args.resamples} resamples, N={args.n}, T={args.tags}")
    print(f"bootstrap_indices: {t_idx:.3f} s")
    print(f"bootstrap_macro_f1: {t_boot:.2f} s total, {t_boot / (2 * args.runs):.3f} s per call")


if __name__ == "__main__":
    main()
