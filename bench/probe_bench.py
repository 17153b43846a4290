"""Linear-probe sweep speed: S weight-decay settings trained as one batched problem.

    python -m bench.probe_bench --data data/fashion --features runs/fashion/.cache/features-<key>
    python -m bench.probe_bench --synthetic 35000 1280 256          # no dataset needed

Prints seconds for the whole sweep (wall and this process's CPU time, each run of ``--repeat`` and their
median, with the load average before and after: with one thread, wall time above CPU time is time other
processes held the core; with more, OpenMP threads waiting for a busy core spin, so CPU time grows with
wall time), the selected weight decay (and whether it is on the grid's edge), the validation mAP per setting,
and the device. With ``--data``, the features' rows are split as the run split them (train rows first, then val),
and the dataset's single-valued fields become softmax groups.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from bakeoff.common import shards
from bakeoff.common.device import device_name, pick_device, setup_threads
from bakeoff.train.data.dataset import load_dataset
from bakeoff.train.decision import single_valued_groups
from bakeoff.train.heads import HeadLoss
from bakeoff.train.probe import ProbeConfig, train_probe


def synthetic(n: int, d: int, t: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Features with a planted linear signal and Zipf-like tag frequencies."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.normal(size=(d, t)).astype(np.float32) / np.sqrt(d)
    freq = 0.3 / np.arange(1, t + 1) ** 0.8
    z = x @ w * 3 + np.log(freq / (1 - freq))
    y = (rng.random((n, t)) < 1 / (1 + np.exp(-z))).astype(np.uint8)
    return x, y


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.probe_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="dataset directory the features were extracted from")
    p.add_argument("--features", help="a feature cache directory (RUNS/.cache/features-<key>)")
    p.add_argument("--synthetic", nargs=3, type=int, metavar=("N", "D", "T"), help="random features instead")
    p.add_argument("--epochs", type=int, default=ProbeConfig.epochs, help="probe epochs")
    p.add_argument("--no-amp", action="store_true", help="fp32 matmuls instead of bf16")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, help="CPU threads (default: $OMP_NUM_THREADS, else every core)")
    p.add_argument("--repeat", type=int, default=1, help="time the sweep this many times")
    a = p.parse_args(argv)
    if a.repeat < 1:
        p.error("--repeat must be at least 1")
    threads = setup_threads(a.threads)
    device = pick_device(a.device)
    groups: list[list[int]] = []
    if a.synthetic:
        x, y = synthetic(*a.synthetic)
        n_val = len(x) // 10
        xt, yt, xv, yv = x[n_val:], y[n_val:], x[:n_val], y[:n_val]
    else:
        if not (a.data and a.features):
            p.error("give --data and --features, or --synthetic N D T")
        ds = load_dataset(a.data)
        rows = np.load(f"{a.features}/rows.npy")
        x = np.asarray(shards.load(f"{a.features}/features"), dtype=np.float32)
        y = ds.labels()[rows]
        n_train = int(np.isin(rows, ds.split_indices("train")).sum())
        xt, yt, xv, yv = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
        groups = single_valued_groups(yt, [ds.fields.get(tg, "") for tg in ds.taxonomy])
    cfg = ProbeConfig(epochs=a.epochs, amp=not a.no_amp)
    loss = HeadLoss(groups, n_tags=y.shape[1])
    load = os.getloadavg()[0]
    wall, cpu = [], []
    for _ in range(a.repeat):
        t, c = time.perf_counter(), time.process_time()
        res = train_probe(xt, yt, xv, yv, cfg, loss, device)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    print(f"device: {device_name(device)}, {threads} threads, torch {torch.__version__}, "
          f"{'bf16' if cfg.amp else 'fp32'} matmuls; load average {load:.1f} before, {os.getloadavg()[0]:.1f} after")
    runs = ", ".join(f"{w:.1f} s (CPU {c:.1f} s)" for w, c in zip(wall, cpu))
    print(f"train {xt.shape[0]} x {xt.shape[1]} features, {yt.shape[1]} tags ({len(groups)} softmax groups), "
          f"val {xv.shape[0]}; {len(cfg.grid())} weight decays x {cfg.epochs} epochs: {np.median(wall):.1f} s "
          f"(median of {a.repeat}: {runs})")
    for s in res.sweep:
        mark = " <- selected" if s["weight_decay"] == res.best["weight_decay"] else ""
        print(f"  wd={s['weight_decay']:<8g} val mAP {s['val_map']:.4f} (epoch {s['epoch']}){mark}")
    print(f"selected wd={res.best['weight_decay']:g}; on the grid's edge: {res.best['on_grid_edge']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
