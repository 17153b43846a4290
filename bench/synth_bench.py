"""Synthetic catalog throughput (images/s, one core and all cores) and the long-tail fraction at 80k images.

    python -m bench.synth_bench [--n 3000] [--size 64] [--n-tags 250]     (from the repository root)

Writes into a temporary directory outside the repository. "cpu" rates divide by the CPU seconds the
render processes used, which stays meaningful on a shared machine; "wall" rates are what a user waits.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from bakeoff.train.data import synth


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def time_generate(n: int, n_tags: int, size: int, workers: int) -> tuple[float, float, float]:
    """(wall images/s, cpu images/s, MB per 1000 images) for one ``generate`` call."""
    with tempfile.TemporaryDirectory(prefix="synth-bench-") as tmp:
        c0, t0 = _cpu_seconds(), time.perf_counter()
        synth.generate(tmp, n_images=n, n_tags=n_tags, seed=0, image_size=size, workers=workers)
        wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
        mb = sum(p.stat().st_size for p in Path(tmp, "images").iterdir()) / 1e6
    return n / wall, n / cpu, mb / n * 1000


def tail_fraction(n: int = 80_000, n_tags: int = 250, train_share: float = 0.75, under: int = 50, seed: int = 0) -> float:
    """Share of tags with under ``under`` expected training images in an ``n``-image catalog."""
    codes = synth.sample_tags(n, np.random.default_rng(seed), n_tags=n_tags)
    counts = np.concatenate([np.bincount(codes[:, j][codes[:, j] >= 0], minlength=len(values))
                             for j, values in enumerate(synth.taxonomy(n_tags).values())])
    return float((counts * train_share < under).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3000, help="images per timing run")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--n-tags", type=int, default=250)
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    print(f"device: {cpu_model()}, {cores} usable cores; python {platform.python_version()}, numpy {np.__version__}")
    print(f"generate n={args.n} n_tags={args.n_tags} size={args.size}px")
    with tempfile.TemporaryDirectory(prefix="synth-warm-") as tmp:  # import, glyph table and page cache warm-up
        synth.generate(tmp, n_images=8, n_tags=args.n_tags, image_size=args.size, workers=1)
    for workers in sorted({1, cores}):
        wall, cpu, mb = time_generate(args.n, args.n_tags, args.size, workers)
        print(f"  workers={workers}: {wall:7.0f} images/s wall, {cpu:7.0f} images/s per cpu-second, {mb:.1f} MB / 1000 images")
    for n in (3000, 80_000):
        frac = tail_fraction(n, args.n_tags)
        print(f"long tail at n={n}: {frac:.1%} of {args.n_tags} tags under 50 training images (75% train)")


if __name__ == "__main__":
    main()
