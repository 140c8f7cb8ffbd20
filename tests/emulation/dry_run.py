"""A dry run of the CUDA backend: the memory a call allocates, measured on the CPU.

:class:`DryRunEngine` is an engine on NumPy arrays whose kernels and GEMMs do
nothing (it only records them), so the backend's algorithms run their whole
Python side -- chunking, layouts, every allocation -- at any size: NumPy's
``empty`` reserves memory without touching it, so even the benchmark shapes'
column buffers cost no time and no resident memory.

:func:`peak_workspace` runs a call under :mod:`tracemalloc`, to which NumPy
reports every array allocation and release, and returns the peak of the
bytes allocated during the call beyond what the call returns: the workspace
the same call would take from the GPU's allocator, since on a GPU the
backend allocates the same arrays through CuPy, freed when their last
reference goes, exactly as here. (The count also includes the call's small
Python objects, a few kilobytes.)
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cudcn.backends.cuda import kernels as cuda_kernels
from cudcn.backends.cuda.engine import Launch


class DryRunEngine:
    """A CUDA-backend engine whose launches and GEMMs are recorded, not run.

    Sizes as :class:`cudcn.backends.cuda.engine.CupyEngine` (block, block
    cap), so that index types and chunks are the GPU's; ``capability`` is the
    compute capability it claims. ``launches`` holds (name expression,
    Launch) and ``gemms`` (m, n, k, batch, A's dtype) of each GEMM: no
    reference to an array, which would keep it alive.
    """

    xp = np
    block = cuda_kernels.BLOCK
    max_blocks = cuda_kernels.MAX_BLOCKS
    threads = cuda_kernels.BLOCK * cuda_kernels.MAX_BLOCKS

    def __init__(self, capability: int = 90) -> None:
        self.capability = capability
        self.launches: list[tuple[str, Launch]] = []
        self.gemms: list[tuple[int, int, int, int, str]] = []

    def launch(self, kernel: str, dtype: str, index: str, launch: Launch, args: Sequence[Any]) -> None:
        self.launches.append((cuda_kernels.name_expression(kernel, dtype, index), launch))

    def gemm(self, call: Any) -> None:
        self.gemms.append((call.m, call.n, call.k, call.batch, call.a.dtype.name))


def _nbytes(result: Any) -> int:
    if isinstance(result, np.ndarray):
        return result.nbytes
    if isinstance(result, (tuple, list)):
        return sum(_nbytes(r) for r in result)
    return 0


def peak_workspace(call: Callable[[], Any]) -> tuple[int, Any]:
    """(peak bytes allocated during ``call()`` beyond its result, the result).

    Arrays that exist before the call (its inputs) are not counted; the
    result's arrays are, while they are being made, so they are subtracted.
    """
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        result = call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        if started:
            tracemalloc.stop()
    return peak - before - _nbytes(result), result
