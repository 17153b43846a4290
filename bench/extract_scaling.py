"""Scaling of feature extraction over torchrun processes on one machine: one process with one thread, one process
with every core's thread, and N processes (torchrun, gloo, one thread each) sharing the pass by rows
(:func:`bakeoff.train.features.extract_all` under :mod:`bakeoff.common.distributed`).

    python -m bench.extract_scaling                                  # MobileNetV2 at 112 px, 1,024 images, N = cores
    python -m bench.extract_scaling --model efficientnet_lite0 --image-size 224 --images 1024 --procs 2

Random init and random uint8 images (speed only). Prints the machine (CPU model, cores), each way's seconds and
images/s, and for N processes the speed-up over one single-threaded process and the efficiency (speed-up / N).
Each way runs in a fresh subprocess (``--worker``), timing the extraction alone (no start-up, no process group set-up).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bakeoff.common import distributed
from bakeoff.common.device import device_name
from bakeoff.train.features import FeatureStore, Target, extract_all
from bench.random_inputs import random_inputs


def worker(a: argparse.Namespace) -> None:
    """One way: extract features of the synthetic images into a new store under ``a.root``; rank 0 prints JSON."""
    w = distributed.init()
    r = random_inputs(a.model, a.image_size, a.images, a.device)
    warm = Target(FeatureStore(a.root, f"warm-{w.size}"), ("features",))
    extract_all(r.backbone, r.preprocess, r.images, r.rows[:a.batch_size * w.size], [warm], batch_size=a.batch_size,
                progress=False)
    w.barrier()
    t = time.perf_counter()
    extract_all(r.backbone, r.preprocess, r.images, r.rows, [Target(FeatureStore(a.root, f"run-{w.size}"), ("features",))],
                batch_size=a.batch_size, progress=False)
    seconds = time.perf_counter() - t
    if w.main:
        print(json.dumps({"seconds": seconds, "device": device_name(r.device),
                          "spec": f"{r.spec.name} @ {r.spec.img_size}px"}))
    distributed.shutdown()


def run_way(a: argparse.Namespace, procs: int, threads: int, root: Path) -> dict:
    args = ["-m", "bench.extract_scaling", "--worker", "--root", str(root), "--model", a.model,
            "--image-size", str(a.image_size), "--images", str(a.images), "--batch-size", str(a.batch_size),
            "--device", a.device]
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"] if procs > 1 else []
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, *launch, *args], capture_output=True, text=True, env=env, check=False,
                          cwd=Path(__file__).resolve().parents[1])
    if proc.returncode:
        raise SystemExit(f"{procs} process(es) x {threads} thread(s) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mobilenetv2_100", help="a cnn registry name or timm model")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--procs", type=int, default=os.cpu_count() or 1, help="torchrun processes (default: cores)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a)
        return 0
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        ways = {(p, t): run_way(a, p, t, Path(tmp) / f"{p}x{t}") for p, t in dict.fromkeys([(1, 1), (1, cores),
                                                                                              (a.procs, 1)])}
    first = next(iter(ways.values()))
    print(f"machine: {first['device'].rsplit(' (', 1)[0]}, {cores} cores; {first['spec']}, batch {a.batch_size}, "
          f"bf16 autocast, {a.images} synthetic images, features float16")
    base = ways[(1, 1)]["seconds"]
    for (procs, threads), r in ways.items():
        line = f"{procs} process(es) x {threads} thread(s): {r['seconds']:.2f} s ({a.images / r['seconds']:.0f} img/s)"
        if procs > 1:
            line += f"; speed-up {base / r['seconds']:.2f}x over 1 x 1, efficiency {base / r['seconds'] / procs:.0%}"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
