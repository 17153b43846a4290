"""A second process for tests/train/test_locks.py: ``python -m tests.train.lockworker COMMAND ARGS``.

- ``hold PATH WHAT``: hold the lock at PATH (refused if held), print "held", sleep until killed;
- ``hold-fork PATH WHAT``: the same, with a forked child (a multiprocessing worker's way) whose pid it prints;
- ``extract ROOT KEY DELAY``: print "ready" once imported, and on a line from stdin extract :func:`images` with
  :class:`SlowBackbone` (DELAY s per batch) into the feature store ROOT/KEY; print {"built", "resumed_from", "sum"};
- ``cache DATASET SIZE DELAY``: print "ready", and on a line from stdin build DATASET's image cache at SIZE px in
  chunks of 8 rows, DELAY s after each; print {"chunks"}: how many chunks this process built;
- ``probe SRC DST DELAY``: hold DST's run lock as a probe training would, print "held", sleep DELAY s, copy the
  complete probe run SRC into DST, release.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bakeoff.common.io import read_json
from bakeoff.common.lock import hold
from bakeoff.train.features import FeatureStore, extract
from bakeoff.train.preprocess import Preprocess

ROWS, BATCH = 96, 2  # extract flushes its progress every 16 batches: at rows 32, 64 and 96


class SlowBackbone(torch.nn.Module):
    """Mean colour (stem) and mean colour + its sum (tail), ``delay`` seconds per batch."""

    feature_dim = 4

    def __init__(self, delay: float):
        super().__init__()
        self.delay = delay

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay)
        return x.mean(dim=(2, 3))

    def tail(self, h: torch.Tensor) -> torch.Tensor:
        return torch.cat([h, h.sum(1, keepdim=True)], 1)


def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (ROWS, 8, 8, 3), dtype=np.uint8)


def extract_into(store: FeatureStore, delay: float) -> np.ndarray:
    prep = Preprocess(8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "cpu")
    return np.asarray(extract(SlowBackbone(delay), prep, images(), np.arange(ROWS), store, batch_size=BATCH,
                              amp=False, progress=False)["features"], dtype=np.float32)


def main(cmd: str, *args: str) -> None:
    if cmd in ("hold", "hold-fork"):
        with hold(args[0], args[1], wait=False):
            if cmd == "hold-fork" and (child := os.fork()) == 0:
                time.sleep(600)
                os._exit(0)
            print("held" if cmd == "hold" else f"held, child {child}", flush=True)
            time.sleep(600)
    elif cmd == "extract":
        print("ready", flush=True)
        sys.stdin.readline()
        store = FeatureStore(Path(args[0]), args[1])
        progress = store.dir / "progress.json"
        resumed_from = read_json(progress)["done"] if progress.exists() else 0
        x = extract_into(store, float(args[2]))
        print(json.dumps({"built": store.built_here, "resumed_from": resumed_from, "sum": float(x.sum())}), flush=True)
    elif cmd == "cache":
        from bakeoff.train.data.cache import build_cache
        from bakeoff.train.data.dataset import load_dataset

        built = []
        print("ready", flush=True)
        sys.stdin.readline()
        build_cache(load_dataset(args[0]), int(args[1]), workers=1, progress=False, chunk_rows=8,
                    on_chunk=lambda k: (built.append(k), time.sleep(float(args[2]))))
        print(json.dumps({"chunks": len(built)}), flush=True)
    elif cmd == "probe":
        src, dst = Path(args[0]), Path(args[1])
        with hold(dst / ".lock", f"training {dst.name}", wait=False):
            print("held", flush=True)
            time.sleep(float(args[2]))
            for f in src.iterdir():
                if f.is_file() and f.name != ".lock":
                    shutil.copy2(f, dst / f.name)
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main(*sys.argv[1:])
