"""Exclusive advisory locks between processes that share a runs directory or a dataset.

``with hold(path, what, wait=...)`` takes ``fcntl.flock(LOCK_EX)`` on the file ``path`` (created when missing, never
deleted: removing a lock file that another process waits on would let two holders in) and writes the holder's
record into it, one JSON line: pid, host, since (when it took the lock, UTC), the command line and ``what`` it is
doing. On release the file is emptied, so a free lock file holds no record. The kernel drops a flock when the last
descriptor of its holder closes, so a holder that crashed or was killed never blocks anyone: the next process takes
the lock at once and overwrites the dead holder's record; and a record is only reported while its lock is held (a
record that names no live process on this host, e.g. before a new holder has written its own, is never shown). A
forked child (a multiprocessing worker) closes its copies of the held locks' descriptors, so it never holds its
parent's lock past the parent's death.

Two policies, chosen per resource by the caller, as users of such tools expect:

- caches (an image cache, a feature store): ``wait=True``. Every process needs the same content; the second says
  whom it waits for, blocks, then checks again: the holder finished the cache and the waiter reuses it, or the
  holder died and the waiter resumes its partial cache (pip's and ccache's caches behave so).
- a run directory: ``wait=False``. A second training of the same pair would retrain what the first is training, or
  overwrite it; it stops at once with :class:`Locked`, naming the holder (as git's ``index.lock`` and apt's
  "Could not get lock ... held by process N" do).

Where it works: POSIX (Linux, macOS) on local file systems, and on NFS where the server supports locks (Linux maps
flock to NFS byte-range locks). Where ``fcntl`` does not exist (Windows) nothing is locked: ``hold`` warns once that
processes sharing a runs directory or dataset are not protected from each other.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

log = logging.getLogger(__name__)
HOST = socket.gethostname()
_HELD: set[int] = set()  # descriptors of the locks this process holds


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as its record says."""

    pid: int
    host: str
    since: str
    command: str
    what: str

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.since} ({self.what}): {self.command}"


class Locked(RuntimeError):
    """Another live process holds the lock (raised by ``hold(..., wait=False)``)."""

    def __init__(self, path: Path, holder: Holder | None):
        self.path, self.holder = path, holder
        super().__init__(f"{path}: locked by {describe(holder)}")


def describe(holder: Holder | None) -> str:
    return str(holder) if holder else "another process (it has not written its record yet)"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _read(path: Path) -> Holder | None:
    try:
        return Holder(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):  # missing, empty, half-written
        return None


def holder(path: str | os.PathLike, seconds: float = 1.0) -> Holder | None:
    """The record of the process holding the lock at ``path``. A new holder writes its record just after it takes
    the lock: for up to ``seconds`` this re-reads while the record is missing or names a process that is not
    running on this host; None if it still does."""
    path, deadline = Path(path), time.monotonic() + seconds
    while True:
        rec = _read(path)
        if rec is not None and (rec.host != HOST or _alive(rec.pid)):
            return rec
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def _close_inherited() -> None:
    """In a forked child: drop the parent's locks (the child's copies of their descriptors)."""
    for fd in _HELD:
        os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited)


@contextlib.contextmanager
def hold(path: str | os.PathLike, what: str, wait: bool) -> Iterator[None]:
    """Hold the exclusive lock at ``path`` (its parent is created) for the ``with`` block, recording this process
    as its holder, doing ``what``. Held by another process: ``wait`` logs whom it waits for and blocks until the
    lock is free; otherwise raises :class:`Locked` naming the holder."""
    path = Path(path)
    if fcntl is None:
        _warn_unprotected()
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise Locked(path, holder(path)) from None
            log.warning("%s: waiting for %s, which holds %s", what, describe(holder(path)), path)
            fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    _HELD.add(fd)
    try:
        record = Holder(os.getpid(), HOST, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        shlex.join(sys.orig_argv), what)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(asdict(record)) + "\n").encode(), 0)
        yield
    finally:
        if fd in _HELD:  # not in a forked child, which has closed its copy already
            _HELD.remove(fd)
            os.ftruncate(fd, 0)
            os.close(fd)  # releases the lock


@functools.cache
def _warn_unprotected() -> None:
    log.warning("no file locking on this platform (no fcntl): processes sharing a runs directory or a dataset "
                "are not protected from each other; run one at a time")
