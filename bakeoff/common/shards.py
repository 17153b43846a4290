"""Arrays split along axis 0 into fixed-row shard files, so that no single file has to hold a whole catalog.

An array at ``PATH`` is a directory: ``PATH/shards.json`` (shape, dtype, ``rows_per_shard``, the byte limit it was
cut for) and ``PATH/shard-00000.npy``, ``shard-00001.npy``, ...: plain ``.npy`` files of ``rows_per_shard`` rows
each (the last one holds the rest), each readable alone with ``np.load(f, mmap_mode="r")``. ``rows_per_shard`` is
the most rows (a multiple of the caller's ``multiple``, e.g. an image cache's chunk) whose file stays within the
limit: ``SHARD_BYTES`` (1 GiB), or ``$BAKEOFF_SHARD_BYTES`` when set (bytes, or with a K/M/G suffix: ``64M``). An
array keeps the layout it was created with. A single ``PATH.npy`` (what earlier versions wrote) is read, and
written, as a one-shard array.

:func:`create` writes the shard files sparse (their ``.npy`` headers only) and the JSON header last (atomically): an
array exists once its header does. :meth:`ShardedArray.writer` opens only the shard files of the rows it writes, so
writers of disjoint rows never share a file when their rows are cut at shard boundaries (machines that share a file
system each write their own shards). Reads and writes are ``os.pread`` / ``os.pwrite``, not memory maps: pages of
a mapped file that a process touched count in its resident set, so reading a catalog through one map grows the
reader to the catalog's size; here a reader holds the rows it asked for (the kernel's page cache still caches the
files, as it does for any file).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path
from typing import Self

import numpy as np

from bakeoff.common.io import read_json, write_json

SHARD_BYTES = 1 << 30
ENV = "BAKEOFF_SHARD_BYTES"
HEADER = "shards.json"
HEADER_ROOM = 4096  # bytes kept for a shard's .npy header (128 for these shapes)
READ_BYTES = 64 << 20  # at most this much is read by one call, so a whole-array read needs no shard-sized buffer
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def shard_bytes() -> int:
    """The size limit of a new shard file: ``$BAKEOFF_SHARD_BYTES`` (``123``, ``64K``, ``64M``, ``1G``), else 1 GiB."""
    text = os.environ.get(ENV, "").strip().upper()
    try:
        return int(text[:-1]) * _UNITS[text[-1]] if text[-1:] in _UNITS else int(text or SHARD_BYTES)
    except ValueError:
        raise ValueError(f"${ENV}={text!r}: expected bytes, e.g. 1073741824, 64M or 1G") from None


def rows_per_shard(row_bytes: int, multiple: int = 1, limit: int | None = None) -> int:
    """The most rows of ``row_bytes`` bytes, a multiple of ``multiple``, in a shard file of at most ``limit`` bytes
    (default :func:`shard_bytes`)."""
    limit = shard_bytes() if limit is None else limit
    rows = (limit - HEADER_ROOM) // max(row_bytes, 1) // multiple * multiple
    if rows < 1:
        raise ValueError(f"a shard limit of {limit} bytes holds no block of {multiple} rows of {row_bytes} bytes "
                         f"(raise ${ENV})")
    return rows


def _legacy(path: Path) -> Path:
    return path.parent / f"{path.name}.npy"


def exists(path: str | os.PathLike) -> bool:
    """Whether an array (sharded, or a single earlier-version ``.npy`` file) is at ``path``."""
    path = Path(path)
    return (path / HEADER).is_file() or _legacy(path).is_file()


def remove(path: str | os.PathLike) -> None:
    """Delete the array at ``path``, header first (so a half-removed array is no array); its directory is kept."""
    path = Path(path)
    (path / HEADER).unlink(missing_ok=True)
    for f in path.glob("shard-*.npy"):
        f.unlink()
    _legacy(path).unlink(missing_ok=True)


def create(path: str | os.PathLike, shape: tuple[int, ...], dtype: np.dtype | str, rows: int | None = None,
           multiple: int = 1) -> ShardedArray:
    """A new zero-filled array at ``path`` (replacing any there), ``rows`` rows per shard (default: the most that fit
    :func:`shard_bytes`, a multiple of ``multiple``)."""
    path, dtype, limit = Path(path), np.dtype(dtype), shard_bytes()
    n, row = shape[0], tuple(shape[1:])
    row_bytes = int(np.prod(row, dtype=np.int64)) * dtype.itemsize
    rows = rows or rows_per_shard(row_bytes, multiple, limit)
    if HEADER_ROOM + rows * row_bytes > limit:
        raise ValueError(f"{path}: {rows} rows of {row_bytes} bytes exceed the shard limit of {limit} bytes")
    remove(path)
    path.mkdir(parents=True, exist_ok=True)
    for k in range(-(-n // rows)):
        m = min(rows, n - k * rows)
        with open(path / f"shard-{k:05d}.npy", "wb") as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (m, *row)})
            f.truncate(f.tell() + m * row_bytes)  # sparse: no data is written
    write_json(path / HEADER, {"shape": [n, *row], "dtype": dtype.str, "rows_per_shard": rows,
                               "shards": -(-n // rows), "shard_bytes": limit})
    return load(path)


def _npy_header(file: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, byte offset of the data) of a C-order ``.npy`` file."""
    with open(file, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        if fortran:
            raise ValueError(f"{file}: Fortran order; expected C order")
        return shape, dtype, f.tell()


def load(path: str | os.PathLike) -> ShardedArray:
    """The array at ``path`` (a single earlier-version ``PATH.npy`` is one shard), every shard file checked."""
    path = Path(path)
    if (path / HEADER).is_file():
        h = read_json(path / HEADER)
        shape, dtype, rows = tuple(h["shape"]), np.dtype(h["dtype"]), h["rows_per_shard"]
        files = tuple(path / f"shard-{k:05d}.npy" for k in range(h["shards"]))
    elif _legacy(path).is_file():
        files = (_legacy(path),)
        shape, dtype, _ = _npy_header(files[0])
        rows = max(shape[0], 1)
    else:
        raise FileNotFoundError(f"{path}: no array here (neither {path / HEADER} nor {_legacy(path).name})")
    offsets = []
    for k, file in enumerate(files):
        got, got_dtype, offset = _npy_header(file)
        want = (min(rows, shape[0] - k * rows), *shape[1:])
        if got != want or got_dtype != dtype:
            raise ValueError(f"{file}: holds {got} {got_dtype}, expected {want} {dtype}")
        offsets.append(offset)
    return ShardedArray(path, files, tuple(offsets), rows, tuple(shape[1:]), dtype, 0, shape[0])


def _transfer(op, fd: int, buf: np.ndarray, offset: int) -> None:
    """``os.preadv`` / ``os.pwritev`` all of contiguous ``buf`` at ``offset`` (they may move fewer bytes at once)."""
    view = memoryview(buf.reshape(-1).view(np.uint8))
    while view:
        done = op(fd, [view], offset)
        if done == 0:
            raise EOFError(f"file descriptor {fd}: short file at byte {offset}")
        view, offset = view[done:], offset + done


@dataclass(frozen=True, eq=False)
class ShardedArray:
    """Rows ``start:stop`` of a sharded array, read-only, as a memmap is used: ``len``, ``shape``, ``dtype``,
    ``a[i]``, ``a[lo:hi]`` (a view, nothing read), ``a[[i, j, ...]]`` (any order, repeats, negatives, a boolean
    mask; a new array in that order), iteration and ``np.asarray(a)``. A call opens each shard it needs once and
    reads each run of consecutive rows in one ``pread``."""

    path: Path
    files: tuple[Path, ...]
    offsets: tuple[int, ...]  # where each file's data starts (after its .npy header)
    rows_per_shard: int
    row_shape: tuple[int, ...]
    dtype: np.dtype
    start: int
    stop: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.stop - self.start, *self.row_shape)

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, key) -> np.ndarray | ShardedArray:
        if isinstance(key, slice):
            lo, hi, step = key.indices(len(self))
            if step == 1:
                return replace(self, start=self.start + lo, stop=self.start + max(lo, hi))
            key = np.arange(lo, hi, step)
        if isinstance(key, (int, np.integer)):
            return self._gather(self._rows(np.array([key])))[0]
        idx = np.asarray(key)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise IndexError(f"boolean index of shape {idx.shape} for {len(self)} rows")
            idx = np.flatnonzero(idx)
        return self._gather(self._rows(idx if idx.size else idx.astype(np.int64)))

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        if copy is False:
            raise ValueError(f"{self.path}: a sharded array cannot be viewed without a copy")
        return self._gather(np.arange(self.start, self.stop), dtype)

    def _rows(self, idx: np.ndarray) -> np.ndarray:
        """Positions ``idx`` in this view (negatives from the end) as rows of the whole array, checked."""
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise IndexError(f"{self.path}: index rows with integers, a 1-D integer array or a slice (got {idx.dtype} "
                             f"of shape {idx.shape})")
        idx = np.where(idx < 0, idx + len(self), idx)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"{self.path}: row index out of range for {len(self)} rows")
        return idx + self.start

    def _gather(self, rows: np.ndarray, dtype: np.dtype | None = None) -> np.ndarray:
        """Rows ``rows`` of the whole array, in that order: sorted, cut into runs of consecutive rows within one
        shard (and one read's size), one ``pread`` per run."""
        out = np.empty((len(rows), *self.row_shape), self.dtype if dtype is None else dtype)
        if not len(rows):
            return out
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        block = max(1, READ_BYTES // max(self.row_bytes, 1))
        cut = (np.diff(ordered) > 1) | (np.diff(ordered // self.rows_per_shard) != 0) | (np.diff(ordered // block) != 0)
        fds: dict[int, int] = {}
        try:
            for a, b in pairwise([0, *(np.flatnonzero(cut) + 1).tolist(), len(rows)]):
                lo, hi = int(ordered[a]), int(ordered[b - 1]) + 1
                k = lo // self.rows_per_shard
                if k not in fds:
                    fds[k] = os.open(self.files[k], os.O_RDONLY)
                buf = np.empty((hi - lo, *self.row_shape), self.dtype)
                _transfer(os.preadv, fds[k], buf, self.offsets[k] + (lo - k * self.rows_per_shard) * self.row_bytes)
                out[order[a:b]] = buf[ordered[a:b] - lo]
        finally:
            for fd in fds.values():
                os.close(fd)
        return out

    def writer(self, lo: int, hi: int) -> ShardWriter:
        """A writer of rows ``lo:hi`` of this view."""
        return ShardWriter(self, self.start + lo, self.start + hi)


class ShardWriter:
    """Writes rows ``lo:hi`` of a sharded array (``w[i] = row``, ``w[a:b] = rows``; positions as in the array it
    came from), opening only the shard files those rows fall in, as they are written. ``flush`` makes the writes
    durable (``fsync``) and closes the files (so a writer holds only those written since); leaving a ``with`` block
    flushes."""

    def __init__(self, array: ShardedArray, lo: int, hi: int):
        if not array.start <= lo <= hi <= array.stop:
            raise IndexError(f"{array.path}: rows {lo}:{hi} outside {array.start}:{array.stop}")
        self.array, self.lo, self.hi = array, lo, hi
        self.fds: dict[int, int] = {}  # shard -> descriptor, of the shards written since the last flush

    def __setitem__(self, key: int | slice, value: np.ndarray) -> None:
        a = self.array
        lo, hi = (key, key + 1) if isinstance(key, (int, np.integer)) else (key.start, key.stop)
        if isinstance(key, slice) and key.step not in (None, 1):
            raise IndexError(f"{a.path}: write rows as one contiguous slice")
        lo, hi = a.start + lo, a.start + hi
        if not self.lo <= lo <= hi <= self.hi:
            raise IndexError(f"{a.path}: rows {lo}:{hi} outside this writer's {self.lo}:{self.hi}")
        data = np.ascontiguousarray(np.broadcast_to(np.asarray(value, a.dtype), (hi - lo, *a.row_shape)))
        r = a.rows_per_shard
        for k in range(lo // r, (hi - 1) // r + 1) if hi > lo else ():
            if k not in self.fds:
                self.fds[k] = os.open(a.files[k], os.O_WRONLY)
            s, e = max(lo, k * r), min(hi, (k + 1) * r)
            _transfer(os.pwritev, self.fds[k], data[s - lo:e - lo], a.offsets[k] + (s - k * r) * a.row_bytes)

    def flush(self) -> None:
        for fd in self.fds.values():
            os.fsync(fd)
            os.close(fd)
        self.fds = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.flush()
