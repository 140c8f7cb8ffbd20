"""Threads for the NumPy backend: a call's work shared out in parts, one per CPU.

scipy's sparse products run on one thread, so each operator splits its work
(images, or queries) into contiguous parts and runs them at once in a pool
of threads made once and kept; scipy and NumPy release the GIL. Results are
gathered in part order, so any sum over parts is bitwise repeatable on a
given number of CPUs.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor


def cpu_count() -> int:
    """CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def parts(items: range, work: int, min_work: int) -> list[slice]:
    """Contiguous parts of ``items`` (a range with step 1): a part per CPU, at
    most one per item and one per ``min_work`` units of ``work`` (the whole
    range's). Each part gets the same number of items, give or take one."""
    count = max(1, min(cpu_count(), len(items), work // min_work))
    bounds = [items.start + len(items) * i // count for i in range(count + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


@functools.cache
def _blas():
    """threadpoolctl's handle on the BLAS libraries NumPy loaded (found once)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@functools.cache
def _pool() -> ThreadPoolExecutor:
    """The threads that run parts beside the calling thread (made once)."""
    return ThreadPoolExecutor(max(cpu_count() - 1, 1), thread_name_prefix="cudcn")


def in_threads(fn, parts: list[slice], blas_threads: bool = False) -> list:
    """[fn(part) for part in parts], the first part in the calling thread and
    each other in a thread of its own (the threads are made once and kept).

    scipy's sparse products and NumPy's gathers and GEMMs release the GIL, so
    the parts run at once; scipy's products are single-threaded, so this is
    how they use every core. Meanwhile BLAS runs one thread per part: its own
    threads would only compete with the parts' (and, waiting for each other,
    stall whenever a core is busy with something else). With blas_threads
    and a single part, BLAS keeps its own threads: a caller asks for that
    only where one part has enough work for several, so that BLAS's threads
    are the only parallelism there is; for less work they cost more than
    they give, and an idle OpenBLAS thread then spins for about 0.1 s on a
    core the caller may need.
    """
    if len(parts) == 1 and blas_threads:
        return [fn(parts[0])]
    with _blas().limit(limits=1, user_api="blas"):
        others = [_pool().submit(fn, part) for part in parts[1:]]
        results = [fn(parts[0])]
        return results + [future.result() for future in others]
