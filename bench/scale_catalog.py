"""A large catalog end to end: peak memory per stage, and no cache file above the stated shard size (issue 13).

A synthetic catalog of N small JPEGs (``train.data.synth``'s tags, Zipf long tail, and its renderer, rendered by a
process pool) goes through the toolkit's own CLIs, each stage a subprocess: ``train.data import csv``, ``prepare``
(splits), ``cache`` (the uint8 image cache) and ``train --strategy probe`` (feature extraction into a store, the
weight-decay sweep, the decision rule). Every stage runs with ``$BAKEOFF_SHARD_BYTES`` = the stated shard size.

    python -m bench.scale_catalog                      # 300,000 images of 32 px, 64 MiB shards (~10 min on 2 cores)
    python -m bench.scale_catalog --images 20000       # a quick run (~1 min)
    python -m bench.scale_catalog --images 300000 --shard-bytes 1G --threads 1 --work /big/disk --keep

The probe's backbone has random weights (``--weights random``): this measures time and memory, its scores mean
nothing. Per stage it prints the wall time; the peak RSS of the stage's largest process (``ru_maxrss`` from
``wait4``: the process and the descendants it waited for); the peak RSS of the stage's whole process tree and its
anonymous part, sampled every 0.2 s from /proc (file pages that a process mapped count in its RSS but are
reclaimable; anonymous ones are what the stage holds); and the largest file under the dataset's ``cache/`` and the
runs' ``.cache/`` against the shard size; then the probe's phases (its timing.json). Exit status 1 when a file
exceeds the shard size. The catalog, dataset and runs go to a temporary directory under ``--work`` (default: the
system's), deleted at the end unless ``--keep``.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
from PIL import Image

from bakeoff.common.io import read_json
from bakeoff.common.shards import ENV, shard_bytes
from bakeoff.common.workers import pool_context
from bakeoff.train.data import synth
from bench.synth_bench import cpu_model

REPO = Path(__file__).resolve().parents[1]
SAMPLE_S = 0.2


def _render(job: tuple[Path, np.ndarray, int, int, int]) -> None:
    """Images ``start..`` of the catalog (their tag codes ``codes``) as JPEGs (runs in a worker)."""
    out, codes, start, size, n_tags = job
    render = synth.Renderer(n_tags, size)
    for i, row in enumerate(codes, start=start):
        Image.fromarray(render(row, synth.image_rng(0, i))).save(out / f"{i:07d}.jpg", quality=85)


def make_catalog(root: Path, n: int, size: int, n_tags: int, workers: int) -> Path:
    """``root/catalog.csv`` (id, image, tags) and ``root/images/*.jpg``; returns the CSV."""
    codes = synth.sample_tags(n, np.random.default_rng(0), n_tags, min_count=3)
    (root / "images").mkdir(parents=True)
    cuts = np.linspace(0, n, 8 * workers + 1).astype(int)
    with ProcessPoolExecutor(workers, mp_context=pool_context()) as pool:
        list(pool.map(_render, [(root / "images", codes[a:b], int(a), size, n_tags) for a, b in pairwise(cuts)]))
    with open(root / "catalog.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["id", "image", "tags"])
        for i, tags in enumerate(synth.decode(codes, synth.taxonomy(n_tags))):
            out.writerow([f"p{i:07d}", f"{i:07d}.jpg", "|".join(tags)])
    return root / "catalog.csv"


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from /proc."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # gone meanwhile
                pass
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += [c for c, pp in parent.items() if pp == p]
    return found


def _rss_kb(pid: int) -> tuple[int, int]:
    """(RSS, anonymous RSS) of ``pid`` in KiB (0, 0 when it is gone)."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        return int(fields["VmRSS"].split()[0]), int(fields["RssAnon"].split()[0])
    except (OSError, KeyError, ValueError):
        return 0, 0


@dataclass
class Stage:
    name: str
    seconds: float
    max_rss_mb: float  # the largest single process's peak (wait4)
    tree_mb: float  # sampled peak of the sum over the process tree
    tree_anon_mb: float


def run_stage(name: str, args: list[str], cwd: Path, env: dict, log) -> Stage:
    """Run ``python -m ARGS`` to completion, sampling its process tree's RSS; stop the bench if it fails."""
    log.write(f"\n$ python -m {' '.join(args)}\n")
    log.flush()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    peak, stop = [0, 0], threading.Event()

    def sample() -> None:
        while not stop.wait(SAMPLE_S):
            rss = [_rss_kb(p) for p in _tree(proc.pid)]
            peak[0], peak[1] = max(peak[0], sum(r for r, _ in rss)), max(peak[1], sum(a for _, a in rss))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    stop.set()
    sampler.join()
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{name} failed (exit {proc.returncode}); see {log.name}")
    return Stage(name, seconds, usage.ru_maxrss / 1024, peak[0] / 1024, peak[1] / 1024)


def largest_file(*roots: Path) -> tuple[int, Path | None, int]:
    """(size, path) of the largest file under ``roots``, and how many files there are."""
    files = [p for r in roots if r.exists() for p in r.rglob("*") if p.is_file()]
    big = max(files, key=lambda p: p.stat().st_size, default=None)
    return (big.stat().st_size if big else 0), big, len(files)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=300_000, help="catalog size (default: %(default)s)")
    p.add_argument("--image-px", type=int, default=32, help="side of the generated JPEGs (default: %(default)s)")
    p.add_argument("--tags", type=int, default=250, help="tags, Zipf long tail (default: %(default)s)")
    p.add_argument("--cache-size", type=int, default=32, help="image cache side (default: %(default)s)")
    p.add_argument("--model", default="mobilenetv2_100", help="the probe's CNN (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=32, help="its input size (default: %(default)s)")
    p.add_argument("--probe-epochs", type=int, default=6, help="(default: %(default)s)")
    p.add_argument("--trials", type=int, default=8, help="weight decays of the probe's sweep (default: %(default)s)")
    p.add_argument("--shard-bytes", default="64M",
                   help="the stated shard size, as $BAKEOFF_SHARD_BYTES takes it (default: %(default)s, so that the "
                        "cache and the feature store are cut into several files at this scale)")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="generation processes")
    p.add_argument("--threads", type=int, help="$OMP_NUM_THREADS for the stages (default: unset, every core; on cores "
                                               "that other jobs keep busy, 1 avoids torch's threads waiting on each "
                                               "other)")
    p.add_argument("--work", type=Path, help="where the temporary catalog, dataset and runs go")
    p.add_argument("--keep", action="store_true", help="keep them (the path is printed)")
    a = p.parse_args(argv)
    os.environ[ENV] = a.shard_bytes  # for shard_bytes() below and, with this checkout first on the path, the stages
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    limit = shard_bytes()
    work = Path(tempfile.mkdtemp(prefix="scale-catalog-", dir=a.work))
    data, runs = work / "data", work / "runs"
    print(f"machine: {cpu_model()}, {len(os.sched_getaffinity(0))} usable cores; {a.images:,} images of "
          f"{a.image_px} px, {a.tags} tags; cache {a.cache_size} px; probe {a.model} at {a.image_size} px with RANDOM "
          f"weights (time and memory only); shard size {a.shard_bytes} = {limit:,} bytes; torch threads "
          f"{a.threads or 'all'}; in {work}", flush=True)
    try:
        with open(work / "stages.log", "w") as log:
            t0 = time.perf_counter()
            catalog = make_catalog(work / "catalog", a.images, a.image_px, a.tags, a.workers)
            print(f"generate: {time.perf_counter() - t0:.1f} s (this process's pool; not a toolkit stage)", flush=True)
            stages = [
                ("import", ["bakeoff.train.data", "import", "csv", str(catalog), "--image-root",
                            str(catalog.parent / "images"), "--out", str(data), "--no-progress"]),
                ("prepare", ["bakeoff.train.data", "prepare", str(data), "--test-size", "0.1",
                             "--val-fraction", "0.1"]),
                ("cache", ["bakeoff.train.data", "cache", str(data), "--size", str(a.cache_size), "--no-progress"]),
                ("probe", ["bakeoff.train", "--backbone", "cnn", "--strategy", "probe", "--data", str(data), "--out",
                           str(runs), "--model", a.model, "--weights", "random", "--image-size", str(a.image_size),
                           "--cache-size", str(a.cache_size), "--probe-epochs", str(a.probe_epochs), "--trials",
                           str(a.trials), "--device", "cpu", "--no-progress"]),
            ]
            over = False
            print(f"{'stage':8} {'wall s':>8} {'max RSS MB':>11} {'tree MB':>8} {'anon MB':>8}  largest cache file "
                  f"(limit {limit / 2**20:.0f} MiB)", flush=True)
            for name, args in stages:
                s = run_stage(name, args, work, env, log)
                size, big, count = largest_file(data / "cache", runs / ".cache")
                over |= size > limit
                where = f"{size / 2**20:7.1f} MiB, {big.relative_to(work)} ({count} files)" if big else "no cache yet"
                print(f"{s.name:8} {s.seconds:8.1f} {s.max_rss_mb:11.0f} {s.tree_mb:8.0f} {s.tree_anon_mb:8.0f}  "
                      f"{where}{'  ABOVE THE LIMIT' if size > limit else ''}", flush=True)
        phases = read_json(runs / "cnn-probe" / "timing.json")["seconds"]
        print("probe phases (timing.json): " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items() if k != "wall"))
        print(f"FAILED: a cache file exceeds {limit:,} bytes" if over else f"every cache file within {limit:,} bytes")
        return int(over)
    finally:
        if a.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
