"""torchrun support: the process group, this process's place in it, and the few collectives the stages use.

One process (no torchrun) is ``World(rank=0, size=1)``, and every helper below is then a no-op: nothing needs a
distributed setup. Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` in the environment, as torchrun
sets them) :func:`init` joins the default process group, NCCL when CUDA is there and gloo otherwise, as
``torch.distributed.init_process_group`` documents; :func:`world` then describes it. Conventions (DINOv2's
training code keeps the same ones): rank 0 ("main") writes every artifact and log line; the ranks share a pass
over rows by contiguous slices (:meth:`World.part`), and :meth:`World.gather` puts the slices back in row order.
Rows written into shard files are shared by :meth:`World.write_part`: a machine writes whole shards.
"""
from __future__ import annotations

import os
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's rank among ``size`` processes (``local_rank`` of ``local_size`` on its machine) and the
    group's backend."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int | None = None  # ranks on this machine; None: all of them
    backend: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def part(self, n: int) -> tuple[int, int]:
        """[lo, hi) of this rank's contiguous slice of ``range(n)``; slice sizes differ by at most one."""
        return bounds(n, self.size, self.rank)

    def write_part(self, n: int, unit: int) -> tuple[int, int]:
        """[lo, hi) of the ``n`` rows this rank writes into files of ``unit`` rows (shards): :func:`writer_rows`
        over the machines of the group (a collective: every rank calls it)."""
        machines = sorted(set(self.gather(np.array([self.rank - self.local_rank])).tolist()))
        return writer_rows(n, unit, self.rank, machines, self.size)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (any picklable value; the other ranks' ``obj`` is ignored)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, part: np.ndarray) -> np.ndarray:
        """Every rank's ``part`` (rows of one array), concatenated in rank order, on every rank."""
        if not self.distributed:
            return part
        parts: list = [None] * self.size
        dist.all_gather_object(parts, np.ascontiguousarray(part))
        return np.concatenate([p for p in parts if len(p)] or parts[:1])  # a rank with no rows may not know the width

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the ranks."""
        if not self.distributed:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device="cuda" if self.backend == "nccl" else "cpu")
        dist.all_reduce(t)  # NCCL reduces CUDA tensors only, gloo CPU ones
        return float(t.item()) / self.size


def bounds(n: int, size: int, rank: int) -> tuple[int, int]:
    """[lo, hi) of part ``rank`` of ``range(n)`` cut into ``size`` contiguous parts (``np.array_split``'s cut)."""
    q, r = divmod(n, size)
    lo = rank * q + min(rank, r)
    return lo, lo + q + (rank < r)


def writer_rows(n: int, unit: int, rank: int, machines: Sequence[int], size: int) -> tuple[int, int]:
    """[lo, hi) of the ``n`` rows that rank ``rank`` of ``size`` writes. ``machines``: the first rank of each
    machine, ascending (torchrun numbers a machine's ranks contiguously). Each machine takes a contiguous part of
    whole ``unit``-row blocks (shards), so no shard file is written from two machines (pages of one file written from
    two machines, over NFS say, are written back whole and clobber each other); the ranks of a machine split its part
    by rows. A store smaller than one block is written by the first machine alone."""
    m = bisect_right(machines, rank) - 1
    first, last = machines[m], machines[m + 1] if m + 1 < len(machines) else size
    a, b = bounds(-(-n // unit), len(machines), m)
    lo, hi = min(a * unit, n), min(b * unit, n)
    p, q = bounds(hi - lo, last - first, rank - first)
    return lo + p, lo + q


def launched() -> bool:
    """Started by torchrun (or another launcher that sets torch.distributed's environment) with several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(timeout_minutes: float | None = None) -> World:
    """Join the process group torchrun described (once; later calls return it); a single process stays alone.

    The timeout bounds how long a rank waits in a collective, e.g. for the slowest rank's share of a large
    catalog's image cache: ``timeout_minutes``, else ``$BAKEOFF_DIST_TIMEOUT_MIN``, else 180.
    """
    minutes = timeout_minutes or float(os.environ.get("BAKEOFF_DIST_TIMEOUT_MIN") or 180)
    if launched() and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timedelta(minutes=minutes))
    return world()


def world() -> World:
    """The process group this process belongs to, or a world of one."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    size = dist.get_world_size()
    return World(dist.get_rank(), size, int(os.environ.get("LOCAL_RANK", "0")),
                 int(os.environ.get("LOCAL_WORLD_SIZE", size)), dist.get_backend())


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
