"""Run a frozen backbone over cached images once; keep its outputs on disk (float16 by default).

Two outputs, computed in one pass when both are asked for:
- ``features``: the pooled feature vector (what the linear probe trains on);
- ``trunk``: the stem's output, i.e. the input of the last 4 blocks (what the fine-tune trains from when
  augmentation is off: the frozen trunk gives the same output every epoch, so caching it is exact up to the
  cache dtype).
A cache directory is keyed by everything its content depends on; a chunk-progress file makes an interrupted
extraction resume, and ``meta.json`` (written last) marks it complete. A complete store is never rewritten, so it
is read without a lock; an extraction holds the store's lock (``<dir>/.lock``, :mod:`bakeoff.common.lock`), and a
second process asking for the same store waits for it, then reuses the complete store (or resumes it, when the
holder died half-way).
"""
from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from bakeoff.common.device import autocast
from bakeoff.common.io import read_json, write_json
from bakeoff.common.lock import hold
from bakeoff.train.preprocess import Preprocess
from bakeoff.train.registry import Backbone

OUTPUTS = ("features", "trunk")


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
    """A directory of memory-mapped outputs for ``rows`` of a dataset, keyed and resumable."""

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
        return self.complete and all((self.dir / f"{o}.npy").exists() for o in outputs)

    def load(self, name: str) -> np.ndarray:
        if not self.complete:
            raise FileNotFoundError(f"{self.dir}: feature cache incomplete")
        return np.load(self.dir / f"{name}.npy", mmap_mode="r")

    def rows(self) -> np.ndarray:
        return np.load(self.dir / "rows.npy")


@torch.no_grad()
def extract(backbone: Backbone, preprocess: Preprocess, images: np.ndarray, rows: np.ndarray, store: FeatureStore,
            outputs: Iterable[str] = ("features",), *, batch_size: int = 64, dtype: str = "float16",
            amp: bool = True, describe: dict | None = None, progress: bool = True) -> dict[str, np.ndarray]:
    """Compute ``outputs`` for image-cache ``rows`` into ``store`` (resuming a partial run) under the store's lock,
    unless it holds them already (or another process completed it meanwhile); return memmaps."""
    outputs = tuple(outputs)
    if not store.holds(outputs):
        with hold(store.dir / ".lock", f"feature cache {store.dir}", wait=True):
            if not store.holds(outputs):
                _compute(backbone, preprocess, images, rows, store, outputs, batch_size, dtype, amp, describe, progress)
                store.built_here = True
    return {o: store.load(o) for o in outputs}


def _compute(backbone: Backbone, preprocess: Preprocess, images: np.ndarray, rows: np.ndarray, store: FeatureStore,
             outputs: tuple[str, ...], batch_size: int, dtype: str, amp: bool, describe: dict | None,
             progress: bool) -> None:
    """:func:`extract`'s work, with the store's lock held."""
    device = preprocess.device
    backbone.eval().to(device)
    progress_file = store.dir / "progress.json"
    state = read_json(progress_file) if progress_file.exists() else {}
    if state.get("key") != store.key or state.get("outputs") != list(outputs) or state.get("n") != len(rows):
        (store.dir / "meta.json").unlink(missing_ok=True)  # the arrays are rewritten: not complete meanwhile
        state = {"key": store.key, "outputs": list(outputs), "n": len(rows), "done": 0, "seconds": 0.0}
        np.save(store.dir / "rows.npy", rows)
        with autocast(device, amp):
            probe = backbone.stem(preprocess(images[rows[:1]]))
        shapes = {"trunk": tuple(probe.shape[1:]), "features": (backbone.feature_dim,)}
        for o in outputs:
            np.lib.format.open_memmap(store.dir / f"{o}.npy", mode="w+", dtype=dtype, shape=(len(rows), *shapes[o]))
        write_json(progress_file, state)
    arrays = {o: np.load(store.dir / f"{o}.npy", mmap_mode="r+") for o in outputs}
    t0 = time.perf_counter()
    bar = tqdm(total=len(rows), initial=state["done"], desc=f"extract {'+'.join(outputs)}", unit="img",
               disable=not progress, leave=False)
    for off, batch in iter_batches(images, rows, batch_size, start=state["done"]):
        with autocast(device, amp):
            h = backbone.stem(preprocess(batch))
            f = backbone.tail(h) if "features" in outputs else None
        if "trunk" in arrays:
            arrays["trunk"][off:off + len(batch)] = h.float().cpu().numpy()
        if f is not None:
            arrays["features"][off:off + len(batch)] = f.float().cpu().numpy()
        state["done"] = off + len(batch)
        if state["done"] % (batch_size * 16) == 0 or state["done"] == len(rows):
            for a in arrays.values():
                a.flush()
            state["seconds"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            write_json(progress_file, state)
        bar.update(len(batch))
    bar.close()
    for a in arrays.values():
        a.flush()
    write_json(store.dir / "meta.json", {"key": store.key, "outputs": list(outputs), "n": len(rows), "dtype": dtype,
                                         "seconds": state["seconds"], "describe": describe or {}})


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
