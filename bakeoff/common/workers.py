"""Process pools that are safe to start from a multi-threaded parent."""
from __future__ import annotations

import multiprocessing
from multiprocessing.context import BaseContext


def pool_context() -> BaseContext:
    """``forkserver`` where the platform has it (Linux, macOS), else its default (``spawn`` on Windows).

    The stages start their pools (image checks, the image cache, the synthetic catalog) after torch has started
    its threads; ``fork`` copies such a process with its locks held by threads that do not exist in the child
    (Python 3.12 warns that it may deadlock, and 3.14 makes ``forkserver`` the POSIX default). A worker then
    imports its function's module afresh: a one-off start-up cost per pool.
    """
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else None)
