"""Run a frozen backbone over cached images once; keep its outputs on disk (float16 by default).

Three outputs, computed in one pass when several are asked for (also into several stores: :func:`extract_all`,
which the grid uses to fill the probe's features and the fine-tune's trunk in one pass per backbone):
- ``features``: the pooled feature vector (what the linear probe trains on);
- ``trunk``: the stem's output, i.e. the input of the last 4 blocks (what the fine-tune trains from when
  augmentation is off: the frozen trunk gives the same output every epoch, so caching it is exact up to the
  cache dtype);
- ``colour``: the model's side input (:meth:`TaggingModel.side`, the colour histograms of ``--colour``), computed
  from the preprocessed images without the backbone when asked for alone.
A cache directory is keyed by everything its content depends on and holds one sharded array per output
(``<dir>/<output>/shard-*.npy``, files of at most 1 GiB, ``$BAKEOFF_SHARD_BYTES``: :mod:`bakeoff.common.shards`;
a single ``<output>.npy`` from an earlier version is read as one shard); a chunk-progress file makes an
interrupted extraction resume, and ``meta.json`` (written last) marks it complete. A complete store is never
rewritten, so it is read without a lock; an extraction holds the store's lock (``<dir>/.lock``,
:mod:`bakeoff.common.lock`), and a second process asking for the same store waits for it, then reuses the complete
store (or resumes it, when the holder died half-way).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bakeoff.common import shards
from bakeoff.common.device import autocast
from bakeoff.common.distributed import World, world
from bakeoff.common.io import read_json, write_json
from bakeoff.common.lock import hold
from bakeoff.common.shards import ShardedArray
from bakeoff.train.preprocess import Preprocess
from bakeoff.train.registry import Backbone

OUTPUTS = ("features", "trunk", "colour")


def cache_key(**parts) -> str:
    """A short stable hash of the (JSON-able) inputs a cache depends on."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def iter_batches(images: np.ndarray, rows: np.ndarray, batch_size: int, start: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """(offset, uint8 batch) over ``rows`` of the image cache, read one batch ahead in a thread."""
    offsets = range(start, len(rows), batch_size)
    read = lambda o: images[rows[o:o + batch_size]]  # noqa: E731  (fancy index: a writable copy)
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(read, offsets[0]) if len(offsets) else None
        for k, o in enumerate(offsets):
            batch = fut.result()
            if k + 1 < len(offsets):
                fut = pool.submit(read, offsets[k + 1])
            yield o, batch


class FeatureStore:
    """A directory of sharded outputs for ``rows`` of a dataset, keyed and resumable."""

    def __init__(self, root: Path, key: str):
        self.dir = Path(root) / key
        self.key = key
        self.built_here = False  # set by extract when this process computed (part of) it

    @property
    def complete(self) -> bool:
        meta = self.dir / "meta.json"
        return meta.exists() and read_json(meta).get("key") == self.key

    def holds(self, outputs: tuple[str, ...]) -> bool:
        """Complete, with every one of ``outputs``."""
        return self.complete and all(shards.exists(self.dir / o) for o in outputs)

    def load(self, name: str) -> ShardedArray:
        """Output ``name``, read-only, indexed like a memmap (``np.asarray`` reads it whole)."""
        if not self.complete:
            raise FileNotFoundError(f"{self.dir}: feature cache incomplete")
        return shards.load(self.dir / name)

    def rows(self) -> np.ndarray:
        return np.load(self.dir / "rows.npy")


@dataclass(frozen=True)
class Target:
    """What one store of a pass receives: its ``outputs``, kept as ``dtype``."""

    store: FeatureStore
    outputs: tuple[str, ...]
    dtype: str = "float16"


def extract(backbone: Backbone, preprocess: Preprocess, images: np.ndarray, rows: np.ndarray, store: FeatureStore,
            outputs: Iterable[str] = ("features",), *, batch_size: int = 64, dtype: str = "float16",
            amp: bool = True, describe: dict | None = None, progress: bool = True,
            side: torch.nn.Module | None = None) -> dict[str, ShardedArray]:
    """Compute ``outputs`` for image-cache ``rows`` into ``store`` (resuming a partial run) under the store's lock,
    unless it holds them already (or another process completed it meanwhile); return them (read-only)."""
    return extract_all(backbone, preprocess, images, rows, [Target(store, tuple(outputs), dtype)],
                       batch_size=batch_size, amp=amp, describe=describe, progress=progress, side=side)[0]


@torch.no_grad()
def extract_all(backbone: Backbone, preprocess: Preprocess, images: np.ndarray, rows: np.ndarray,
                targets: Sequence[Target], *, batch_size: int = 64, amp: bool = True, describe: dict | None = None,
                progress: bool = True, side: torch.nn.Module | None = None) -> list[dict[str, ShardedArray]]:
    """:func:`extract` (``side``: the module of output ``colour``) for several stores in one pass over the images
    (each store resumes on its own), holding the locks of the stores still to build, taken in the order of their
    paths (so two processes never deadlock); returns each target's outputs.

    Under torchrun the ranks share the pass (:func:`_compute`); rank 0 alone takes the locks and decides what is
    still to build, so the ranks of one job never wait for each other's locks and other jobs wait for rank 0's.
    """
    w = world()
    with contextlib.ExitStack() as locks:
        todo: list[int] = []
        pending = [t for t in targets if not t.store.holds(t.outputs)] if w.main else []
        for t in sorted(pending, key=lambda t: str(t.store.dir)):
            locks.enter_context(hold(t.store.dir / ".lock", f"feature cache {t.store.dir}", wait=True))
        if pending:
            todo = [i for i, t in enumerate(targets) if not t.store.holds(t.outputs)]
        todo = w.broadcast(todo)
        if todo:
            _compute(backbone, preprocess, images, rows, [targets[i] for i in todo], batch_size, amp, describe,
                     progress, side)
            for i in todo:
                targets[i].store.built_here = True
    return [{o: t.store.load(o) for o in t.outputs} for t in targets]


def _same_store(state: dict, target: Target, n: int) -> bool:
    """Whether a progress record describes ``target``'s arrays: same key, outputs and number of rows."""
    return state.get("key") == target.store.key and state.get("outputs") == list(target.outputs) and state.get("n") == n


def _allocate(target: Target, rows: np.ndarray, shapes: Callable[[], dict[str, tuple[int, ...]]],
              per_shard: Callable[[], int]) -> None:
    """Keep the target's arrays when its ``progress.json`` says they are this key's, else allocate them anew
    (``shapes`` and ``per_shard``, the rows of a shard, asked), forgetting every progress record."""
    store, progress_file = target.store, target.store.dir / "progress.json"
    state = read_json(progress_file) if progress_file.exists() else {}
    if _same_store(state, target, len(rows)):
        return
    (store.dir / "meta.json").unlink(missing_ok=True)  # the arrays are rewritten: not complete meanwhile
    for f in store.dir.glob("progress.*-of-*.json"):
        f.unlink()
    np.save(store.dir / "rows.npy", rows)
    for o in target.outputs:
        shards.create(store.dir / o, (len(rows), *shapes()[o]), target.dtype, per_shard())
    write_json(progress_file, {"key": store.key, "outputs": list(target.outputs), "n": len(rows), "done": 0,
                               "seconds": 0.0})


def _progress(target: Target, n: int, w: World, part: tuple[int, int]) -> tuple[Path, dict]:
    """This rank's progress record for its ``part`` of the rows (``done``: the next row offset), resumed when it
    matches (key, outputs, rows, part), else new. One process: ``progress.json``; rank r of W:
    ``progress.r-of-W.json``."""
    lo, hi = part
    store = target.store
    path = store.dir / (f"progress.{w.rank}-of-{w.size}.json" if w.distributed else "progress.json")
    state = read_json(path) if path.exists() else {}
    if _same_store(state, target, n) and (state.get("lo", 0), state.get("hi", n)) == (lo, hi):
        return path, state
    return path, {"key": store.key, "outputs": list(target.outputs), "n": n, "lo": lo, "hi": hi, "done": lo,
                  "seconds": 0.0}


def _compute(backbone: Backbone, preprocess: Preprocess, images: np.ndarray, rows: np.ndarray,
             targets: list[Target], batch_size: int, amp: bool, describe: dict | None, progress: bool,
             side: torch.nn.Module | None = None) -> None:
    """:func:`extract_all`'s work, with the targets' locks held: one pass from the earliest resume point; each
    store's progress advances with the pass.

    Under torchrun rank 0 allocates the arrays, every array of the pass with the same rows per shard; then each
    rank computes its contiguous part of the rows (:meth:`World.write_part`: a machine writes whole shards, its ranks
    share them by rows) into them, keeping its own progress record, and rank 0 marks the stores complete
    (``meta.json``, with the slowest rank's seconds) once every rank has flushed. Ranks of one machine may write
    disjoint rows of one file (one page cache); a machine with no whole shard to write waits.
    """
    device = preprocess.device
    backbone.eval().to(device)
    w = world()
    wanted = {o for t in targets for o in t.outputs}
    if "colour" in wanted and side is None:
        raise ValueError("output 'colour' asked for without the module that computes it (side)")
    run_backbone = bool(wanted & {"trunk", "features"})

    @functools.cache
    def shapes() -> dict[str, tuple[int, ...]]:
        out = {"features": (backbone.feature_dim,), "colour": (side.dim,) if side is not None else ()}
        if run_backbone:
            with autocast(device, amp):
                out["trunk"] = tuple(backbone.stem(preprocess(images[rows[:1]])).shape[1:])
        return out

    @functools.cache
    def per_shard() -> int:  # the rows of the largest output's shard, so that the parts can align with every array
        return min(shards.rows_per_shard(int(np.prod(shapes()[o])) * np.dtype(t.dtype).itemsize)
                   for t in targets for o in t.outputs)

    if w.main:
        for t in targets:
            _allocate(t, rows, shapes, per_shard)
    w.barrier()
    arrays = [{o: shards.load(t.store.dir / o) for o in t.outputs} for t in targets]
    unit = math.lcm(*(a.rows_per_shard for arr in arrays for a in arr.values()))
    lo, hi = w.write_part(len(rows), unit)
    records = [_progress(t, len(rows), w, (lo, hi)) for t in targets]
    start = min(state["done"] for _, state in records)
    t0 = time.perf_counter()
    bar = tqdm(total=hi - lo, initial=start - lo, desc=f"extract {'+'.join(sorted(wanted))}", unit="img",
               disable=not progress, leave=False)
    with contextlib.ExitStack() as files:  # on leaving, every writer flushes (fsync)
        writers = [{o: files.enter_context(a.writer(lo, hi)) for o, a in arr.items()} for arr in arrays]
        for k, (off, batch) in enumerate(iter_batches(images, rows[:hi], batch_size, start=start)):
            x = preprocess(batch)
            out = {"colour": side(x) if "colour" in wanted else None}
            if run_backbone:
                with autocast(device, amp):
                    h = backbone.stem(x)
                    out |= {"trunk": h, "features": backbone.tail(h) if "features" in wanted else None}
            done = off + len(batch)
            for (_, state), arr in zip(records, writers):
                for o, a in arr.items():
                    a[off:done] = out[o].float().cpu().numpy()
                state["done"] = done
            if k % 16 == 15 or done == hi:
                seconds = time.perf_counter() - t0
                t0 = time.perf_counter()
                for (path, state), arr in zip(records, writers):
                    for a in arr.values():
                        a.flush()
                    state["seconds"] += seconds
                    write_json(path, state)
            bar.update(len(batch))
    bar.close()
    seconds = [float(w.gather(np.array([state["seconds"]])).max()) for _, state in records]
    if w.main:
        for t, s in zip(targets, seconds):
            write_json(t.store.dir / "meta.json", {"key": t.store.key, "outputs": list(t.outputs), "n": len(rows),
                                                   "pass": sorted(wanted), "dtype": t.dtype, "seconds": s,
                                                   "ranks": w.size,
                                                   "describe": describe or {}})
    w.barrier()


def extraction_seconds(store: FeatureStore) -> float:
    return float(read_json(store.dir / "meta.json").get("seconds", 0.0)) if store.complete else 0.0


@torch.no_grad()
def predict_logits(model: torch.nn.Module, preprocess: Preprocess, images: np.ndarray, rows: np.ndarray, *,
                   batch_size: int = 64, amp: bool = False, progress: bool = False) -> np.ndarray:
    """The whole model's logits for image-cache ``rows`` (float32; fp32 unless ``amp``), as evaluation runs it."""
    model.eval()
    out = []
    bar = tqdm(total=len(rows), desc="predict", unit="img", disable=not progress, leave=False)
    for _, batch in iter_batches(images, rows, batch_size):
        with autocast(preprocess.device, amp):
            out.append(model(preprocess(batch)).float().cpu().numpy())
        bar.update(len(batch))
    bar.close()
    return np.concatenate(out) if out else np.zeros((0, model.head.out_features), np.float32)
