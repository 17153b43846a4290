"""The decoded-image cache: every image decoded once, padded square, resized to S, in one uint8 sharded array.

``DATASET/cache/images_<S>/`` holds an N x S x S x 3 uint8 array in manifest order, split into shard files of at most
1 GiB (``$BAKEOFF_SHARD_BYTES``; :mod:`bakeoff.common.shards`: plain ``.npy`` files, ``np.load(mmap_mode="r")``
reads each without copying); ``images_<S>.json`` is its header. :func:`load_cache` returns a read-only view that
indexes like the memmap earlier versions returned; a single ``images_<S>.npy`` that they wrote is read (and
refreshed) as a one-shard cache. The build runs in chunks of rows (a shard holds whole chunks), and the header
records, per chunk, a fingerprint of its source files taken when the chunk was written: a chunk is done when its
recorded fingerprint equals the current one. So an interrupted build resumes where it stopped, and after an edit
only the chunks whose files changed are rebuilt.

Two fingerprints per chunk, as git's index does it: a stat one (each file's manifest row, path, size and
``mtime_ns``; one ``stat`` per file, well under a second for 44k files, so every ``load_cache`` checks it) and a
content one (row, path and bytes, hashed while the chunk is decoded). When the stat fingerprint of a chunk
differs, its files are read and the content fingerprint decides: equal bytes (a dataset copied or re-mounted
without preserving mtimes) keep the chunk, and the header's stat fingerprint is refreshed when the header is
writable; changed bytes make it stale. A replacement that keeps size and mtime (``cp -p`` of another image of the
same size) goes unnoticed, as it does for git.

A build holds the cache's lock (``images_<S>.lock``, :mod:`bakeoff.common.lock`): a second process that needs the
same cache waits for it, then finds it complete and reuses it (or resumes it, when the holder died half-way). A
complete cache is read without the lock. A header refresh by content (above) may be written without it: at worst it
loses a concurrent build's progress record, which makes chunks be rebuilt, never marks unbuilt rows done (a chunk
counts as done only when its fingerprint equals the sources' current one).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm import tqdm

from bakeoff.common import shards
from bakeoff.common.distributed import World
from bakeoff.common.io import read_json, write_json
from bakeoff.common.lock import hold
from bakeoff.common.shards import ShardedArray
from bakeoff.common.workers import pool_context
from bakeoff.train.data.dataset import CACHE_DIR, MANIFEST, Dataset, DatasetError

VERSION = 1
CHUNK_ROWS = 512
RESAMPLE = Image.Resampling.LANCZOS


class CacheError(DatasetError):
    """A missing, incomplete or stale image cache; the message says how to rebuild it."""


def border_colour(a: np.ndarray) -> tuple[int, ...]:
    """Per-channel median of the outermost pixels of an H x W x C image."""
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    return tuple(int(v) for v in np.median(border, axis=0).round())


def square_image(image: Image.Image, size: int) -> np.ndarray:
    """An RGB image padded to a centred square with its border colour, resized to ``size``: S x S x 3 uint8."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    image = image.convert("RGB")
    w, h = image.size
    side = max(w, h)
    if w != h:
        canvas = Image.new("RGB", (side, side), border_colour(np.asarray(image)))
        canvas.paste(image, ((side - w) // 2, (side - h) // 2))
        image = canvas
    if side != size:
        image = image.resize((size, size), RESAMPLE)
    return np.asarray(image)


def load_square(path: str | os.PathLike | io.BytesIO, size: int) -> np.ndarray:
    """Decode the image at ``path`` (or in a buffer) (JPEGs at the smallest DCT scale that keeps >= ``size``) as ``square_image``."""
    with Image.open(path) as image:
        image.draft("RGB", (size, size))
        return square_image(image, size)


def resize_batch(x: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """uint8 N x H x W x 3 (numpy, or a tensor on any device) -> float32 N x 3 x size x size in [0, 1].

    Bilinear, antialiased when downscaling; move ``x`` to the device first, uint8 is 4x cheaper to copy.
    """
    if isinstance(x, np.ndarray) and not x.flags.writeable:
        x = np.array(x)  # torch refuses to wrap read-only memory (a memmap slice) without a warning
    t = torch.as_tensor(x).permute(0, 3, 1, 2).float().div_(255)
    h, w = t.shape[-2:]
    if (h, w) == (size, size):
        return t
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=max(h, w) > size)


def cache_paths(ds: Dataset, size: int) -> tuple[Path, Path]:
    """The sharded array (a directory, :mod:`bakeoff.common.shards`) and the header of the cache at ``size``."""
    base = ds.root / CACHE_DIR / f"images_{size}"
    return base, base.with_suffix(".json")


def _images_hash(ds: Dataset) -> str:
    return hashlib.sha256("\n".join(ds.images).encode()).hexdigest()


def _chunk(ds: Dataset, k: int, chunk_rows: int) -> range:
    return range(k * chunk_rows, min((k + 1) * chunk_rows, len(ds)))


def _content_update(h: "hashlib._Hash", i: int, entry: str, data: bytes) -> None:
    """Add row ``i`` (its manifest entry, not the resolved path, so a moved dataset matches) and its bytes."""
    h.update(f"{i}\0{entry}\0{len(data)}\n".encode())
    h.update(data)


def _content_fingerprint(ds: Dataset, k: int, chunk_rows: int) -> str:
    """sha256 over (row, path, bytes) of chunk ``k``'s source files."""
    h = hashlib.sha256()
    for i in _chunk(ds, k, chunk_rows):
        _content_update(h, i, ds.images[i], ds.image_path(i).read_bytes())
    return h.hexdigest()


def _stat_fingerprint(ds: Dataset, k: int, chunk_rows: int) -> str:
    """sha256 over (row, path, size, mtime_ns) of chunk ``k``'s source files."""
    h = hashlib.sha256()
    for i in _chunk(ds, k, chunk_rows):
        path = ds.image_path(i)
        try:
            st = os.stat(path)
        except OSError as e:
            raise DatasetError(f"{ds.root / MANIFEST}: row {i + 1} (id {ds.ids[i]}): image {path}: {e.strerror}") from e
        h.update(f"{i}\0{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _fingerprints(ds: Dataset, chunk_rows: int) -> list[str]:
    """Per chunk: :func:`_stat_fingerprint`."""
    return [_stat_fingerprint(ds, k, chunk_rows) for k in range(-(-len(ds) // chunk_rows))]


@dataclass
class _State:
    """What is on disk for one cache resolution, against the dataset as it is now."""

    data: Path  # the sharded array
    header_path: Path
    header: dict  # the header to continue with (a fresh one when nothing usable is on disk)
    current: list[str]  # fingerprints of the source files now, per chunk
    fresh: bool  # nothing on disk can be reused
    reason: str  # why it is unusable or unfinished; "" when complete and current

    @property
    def done(self) -> list[bool]:
        return [a == b for a, b in zip(self.header["chunks"], self.current)]


def _inspect(ds: Dataset, size: int, chunk_rows: int = CHUNK_ROWS) -> _State:
    data, header_path = cache_paths(ds, size)
    n = len(ds)
    shape = [n, size, size, 3]
    old = read_json(header_path) if header_path.exists() else None
    if old is not None:
        chunk_rows = old.get("chunk_rows", chunk_rows)
    current = _fingerprints(ds, chunk_rows)
    new = {
        "version": VERSION, "size": size, "n": n, "shape": shape, "dtype": "uint8", "chunk_rows": chunk_rows,
        "images_hash": _images_hash(ds),
        "fingerprint": "per chunk: chunks = sha256 of row, path, size, mtime_ns; contents = sha256 of row, path, bytes",
        "resample": "pad to square with border median, PIL lanczos", "chunks": [None] * len(current),
        "contents": [None] * len(current),
        "complete": False, "build_seconds": 0.0, "built": None,
    }
    if old is None or not shards.exists(data):
        return _State(data, header_path, new, current, True, "missing")
    if old.get("version") != VERSION or old.get("shape") != shape or len(old.get("chunks", ())) != len(current):
        return _State(data, header_path, new, current, True, f"stale: built for shape {old.get('shape')}, dataset needs {shape}")
    try:
        on_disk = shards.load(data)
    except (ValueError, OSError) as e:
        return _State(data, header_path, new, current, True, f"unreadable data: {e}")
    if list(on_disk.shape) != shape or on_disk.dtype != np.uint8:
        return _State(data, header_path, new, current, True,
                      f"data {data.name} has shape {on_disk.shape}, expected {shape}")
    state = _State(data, header_path, old, current, False, "")
    if old["images_hash"] == new["images_hash"]:
        _verify_by_content(ds, state)
    done = state.done
    stale = [k for k, (fp, ok) in enumerate(zip(old["chunks"], done)) if fp is not None and not ok]
    if old["images_hash"] != new["images_hash"]:
        state.reason = "stale: the manifest's image list changed since the cache was built"
    elif stale:
        k = stale[0]
        state.reason = (f"stale: source images changed in {len(stale)} of {len(done)} chunks "
                        f"(first: rows {k * chunk_rows + 1}-{min((k + 1) * chunk_rows, n)})")
    elif not all(done) or not old["complete"]:
        state.reason = f"incomplete: {sum(done)} of {len(done)} chunks built"
    return state


def _verify_by_content(ds: Dataset, state: _State) -> None:
    """Chunks whose stat fingerprint changed but whose bytes did not are current again: refresh them."""
    h = state.header
    contents = h.setdefault("contents", [None] * len(h["chunks"]))
    refreshed = False
    for k, ok in enumerate(state.done):
        if not ok and h["chunks"][k] is not None and contents[k] is not None:
            if _content_fingerprint(ds, k, h["chunk_rows"]) == contents[k]:
                h["chunks"][k] = state.current[k]
                refreshed = True
    if refreshed:
        try:
            write_json(state.header_path, h)
        except OSError:  # a read-only cache still loads; the next check reads the bytes again
            pass


def _build_chunk(task: tuple[str, int, list[tuple[int, str, str, str]], int, str]) -> tuple[int, str]:
    """Decode one chunk's images into its shard; returns (chunk index, content fingerprint) (runs in a worker)."""
    data, k, rows, size, manifest = task
    h = hashlib.sha256()
    with shards.load(data).writer(rows[0][0], rows[-1][0] + 1) as out:  # flushed (fsync) on leaving
        for i, row_id, entry, path in rows:
            try:
                raw = Path(path).read_bytes()
                _content_update(h, i, entry, raw)
                out[i] = load_square(io.BytesIO(raw), size)
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... on damaged files
                raise DatasetError(f"{manifest}: row {i + 1} (id {row_id}): cannot decode image {path}: {type(e).__name__}: {e}") from None
    return k, h.hexdigest()


def build_cache(
    ds: Dataset,
    size: int = 128,
    workers: int | None = None,
    progress: bool = True,
    chunk_rows: int = CHUNK_ROWS,
    on_chunk: Callable[[int], None] | None = None,
    world: World | None = None,
) -> Path:
    """Build (or finish, or refresh) the cache at ``size``; returns its sharded array's directory.

    Chunks already done with unchanged sources are kept. ``workers`` processes (default: all CPUs; 1 runs
    in-process). ``on_chunk(k)`` is called after chunk ``k`` is recorded done. The header says complete only
    once every chunk is done. Builds under the cache's lock, waiting for another process's build. Under torchrun
    (``world`` of several ranks, every rank calling) the ranks share the chunks: :func:`_build_shared`.
    """
    if world is not None and world.distributed:
        return _build_shared(ds, size, world, workers, progress, chunk_rows)
    state = _inspect(ds, size, chunk_rows)
    if state.reason:
        with hold(state.data.with_suffix(".lock"), f"image cache {state.data}", wait=True):
            state = _inspect(ds, size, chunk_rows)  # another process may have built it while this one waited
            if state.reason:
                _build(ds, state, size, workers, progress, on_chunk)
    return state.data


def _reset(ds: Dataset, state: _State) -> list[int]:
    """Start (or go on with) a build, with the cache's lock held: the array created when nothing on disk is
    usable, the header keeping only the chunks that are current; returns the chunks still to build."""
    header = state.header
    if state.fresh:
        shards.create(state.data, tuple(header["shape"]), np.uint8, multiple=header["chunk_rows"])
    done = state.done
    header["chunks"] = [fp if ok else None for fp, ok in zip(state.current, done)]
    header["contents"] = [c if ok else None for c, ok in zip(header.get("contents", [None] * len(done)), done)]
    header["built_by"] = [r if ok else None for r, ok in zip(header.get("built_by", [0] * len(done)), done)]
    header["images_hash"] = _images_hash(ds)
    header["complete"] = False
    write_json(state.header_path, header)
    return [k for k, ok in enumerate(done) if not ok]


def _decode(ds: Dataset, data: Path, todo: list[int], size: int, chunk_rows: int, workers: int | None,
            progress: bool, done: Callable[[int, str], None]) -> None:
    """Decode chunks ``todo`` into the array at ``data`` in ``workers`` processes; ``done(k, content
    fingerprint)`` after each."""
    tasks = [(str(data), k, [(i, ds.ids[i], ds.images[i], str(ds.image_path(i))) for i in _chunk(ds, k, chunk_rows)],
              size, str(ds.root / MANIFEST)) for k in todo]
    n_rows = {t[1]: len(t[2]) for t in tasks}
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks)))
    with tqdm(total=sum(n_rows.values()), unit="img", disable=not progress, desc=f"cache {size}px") as bar:
        pool = pool_context().Pool(workers) if workers > 1 else None
        try:
            for k, content in (pool.imap_unordered(_build_chunk, tasks) if pool else map(_build_chunk, tasks)):
                done(k, content)
                bar.update(n_rows[k])
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()


def _finish(state: _State) -> None:
    state.header["complete"] = True
    state.header["built"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_json(state.header_path, state.header)


def _build(ds: Dataset, state: _State, size: int, workers: int | None, progress: bool,
           on_chunk: Callable[[int], None] | None) -> None:
    """:func:`build_cache`'s work, with the cache's lock held."""
    header = state.header
    todo = _reset(ds, state)
    start, spent = time.perf_counter(), header["build_seconds"]

    def done(k: int, content: str) -> None:
        header["chunks"][k], header["contents"][k], header["built_by"][k] = state.current[k], content, 0
        header["build_seconds"] = round(spent + time.perf_counter() - start, 3)
        write_json(state.header_path, header)
        if on_chunk is not None:
            on_chunk(k)

    _decode(ds, state.data, todo, size, header["chunk_rows"], workers, progress, done)
    _finish(state)


def _fold_records(state: _State, usable: bool = True) -> None:
    """Chunks the ranks of a shared build recorded (``images_<S>.rank<r>-of-<W>.json``: stat fingerprint, content
    fingerprint, rank) go into the header when their sources are unchanged (none when not ``usable``: the records
    of an array about to be created anew); the records are then removed."""
    h = state.header
    built_by = h.setdefault("built_by", [None] * len(h["chunks"]))  # headers of earlier versions have none
    for path in sorted(state.header_path.parent.glob(f"{state.data.name}.rank*.json")):
        for key, (fp, content, rank) in (read_json(path)["chunks"] if usable else {}).items():
            k = int(key)
            if k < len(state.current) and fp == state.current[k]:
                h["chunks"][k], h["contents"][k], built_by[k] = fp, content, rank
        path.unlink()


def _build_shared(ds: Dataset, size: int, w: World, workers: int | None, progress: bool, chunk_rows: int) -> Path:
    """:func:`build_cache` under torchrun, every rank calling. Rank 0 holds the cache's lock throughout, folds in
    what an interrupted shared build recorded and says which chunks are still to build; the ranks share them
    (:meth:`World.write_part` over chunks: a machine decodes whole shards, its ranks split them), each with
    ``workers`` processes (default: its share of the machine's CPUs) and each recording the chunks it finishes in
    its own file (so an interrupted job resumes them); rank 0 folds the records into the header and marks it
    complete once every rank is done."""
    data, _ = cache_paths(ds, size)
    with contextlib.ExitStack() as stack:
        plan = None
        if w.main:
            t0 = time.perf_counter()
            state = _inspect(ds, size, chunk_rows)
            if state.reason:
                stack.enter_context(hold(data.with_suffix(".lock"), f"image cache {data}", wait=True))
                state = _inspect(ds, size, chunk_rows)
            if state.reason:
                _fold_records(state, usable=not state.fresh)  # what an interrupted shared build finished
                plan = (_reset(ds, state), state.header["chunk_rows"])
        plan = w.broadcast(plan)
        if plan is not None:
            todo, rows = plan
            per_shard = max(1, -(-shards.load(data).rows_per_shard // rows))  # chunks per shard
            lo, hi = w.write_part(-(-len(ds) // rows), per_shard)
            record = data.with_name(f"{data.name}.rank{w.rank}-of-{w.size}.json")
            mine: dict[str, list] = {}

            def done(k: int, content: str) -> None:
                mine[str(k)] = [_stat_fingerprint(ds, k, rows), content, w.rank]
                write_json(record, {"chunks": mine})

            share = workers or max(1, (os.cpu_count() or 1) // (w.local_size or w.size))
            _decode(ds, data, [k for k in todo if lo <= k < hi], size, rows, share, progress and w.main, done)
            w.barrier()
            if w.main:
                _fold_records(state)
                state.header["build_seconds"] = round(state.header["build_seconds"] + time.perf_counter() - t0, 3)
                _finish(state)
        w.barrier()
    return data


def load_cache(ds: Dataset, size: int = 128) -> ShardedArray:
    """The complete, current cache at ``size`` as a read-only N x S x S x 3 uint8 array (indexed like a memmap:
    ``images[rows]`` is a new uint8 array); else ``CacheError``."""
    state = _inspect(ds, size)
    if state.reason:
        raise CacheError(f"{state.header_path}: image cache {state.reason}; build it with "
                         f"`python -m train.data cache {ds.root} --size {size}`")
    return shards.load(state.data)


def cache_status(ds: Dataset, size: int = 128) -> str:
    """One line: whether the cache at ``size`` is complete and current, and what it holds."""
    state = _inspect(ds, size)
    h = state.header
    if state.reason:
        return f"{state.data}: {state.reason}"
    files = shards.load(state.data).files
    gb, largest = np.prod(h["shape"]) / 1e9, max((f.stat().st_size for f in files), default=0) / 1e9
    return (f"{state.data}: complete, {' x '.join(map(str, h['shape']))} uint8 ({gb:.2f} GB in {len(files)} "
            f"file{'s' * (len(files) > 1)}, the largest {largest:.2f} GB), "
            f"built {h['built']} in {h['build_seconds']:.0f} s")
