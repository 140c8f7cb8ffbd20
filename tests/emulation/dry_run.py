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

With ``record=True`` the engine also records what a GPU would have to do
beyond the kernels, for the performance model (benchmarks/gpu_model.py):
its ``xp`` is then :class:`RecordingNumpy`, whose arrays
(:class:`TrackedArray`) count every array operation the backend does itself
-- a fill, a copy, a cast, a reduction: each a CuPy kernel on a GPU -- in
``host_ops``, without doing it (the values are never read); ``footprints``
holds the bytes of the distinct arrays each launch is handed, and
``gemm_calls`` each GEMM's sizes, dtypes and whether it reads C.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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

    def __init__(self, capability: int = 90, record: bool = False) -> None:
        self.capability = capability
        self.launches: list[tuple[str, Launch]] = []
        self.gemms: list[tuple[int, int, int, int, str]] = []
        self.footprints: list[int] = []  # of each launch: bytes of the distinct arrays it is handed
        self.gemm_calls: list[dict[str, Any]] = []
        self.host_ops: list[HostOp] = []
        if record:
            self.xp = RecordingNumpy(self)

    def launch(self, kernel: str, dtype: str, index: str, launch: Launch, args: Sequence[Any]) -> None:
        self.launches.append((cuda_kernels.name_expression(kernel, dtype, index), launch))
        arrays = {(a.__array_interface__["data"][0], a.nbytes) for a in args if isinstance(a, np.ndarray)}
        self.footprints.append(sum(nbytes for _, nbytes in arrays))

    def gemm(self, call: Any) -> None:
        self.gemms.append((call.m, call.n, call.k, call.batch, call.a.dtype.name))
        self.gemm_calls.append(dict(
            m=call.m, n=call.n, k=call.k, batch=call.batch, operand_dtype=call.a.dtype.name,
            out_dtype=call.c.dtype.name, tf32=call.tf32, reads_c=call.beta != 0,
            shared_a=call.stride_a == 0, shared_b=call.stride_b == 0,
        ))

    def track(self, array: np.ndarray) -> TrackedArray:
        """``array`` as an argument whose operations this engine records (``record=True``)."""
        tracked = array.view(TrackedArray)
        tracked.recorder = self
        return tracked

    def record(self, kind: str, read: int, written: int, strided: bool = False) -> None:
        self.host_ops.append(HostOp(kind, read, written, strided))


@dataclass(frozen=True)
class HostOp:
    """An array operation of the backend's own (a CuPy kernel on a GPU): its
    kind ("zeros", "assign", "copy", "astype", "reduce"), the bytes it reads
    and writes, and whether it reads across strides (a transposing copy)."""

    kind: str
    read: int
    written: int
    strided: bool = False


class TrackedArray(np.ndarray):
    """A NumPy array whose fills, copies and casts its engine records instead
    of doing (a dry run never reads values). Views keep the engine."""

    recorder: Any = None

    def __array_finalize__(self, obj: Any) -> None:
        self.recorder = getattr(obj, "recorder", None)

    def _record(self, kind: str, read: int, written: int, strided: bool = False) -> None:
        if self.recorder is not None:
            self.recorder.record(kind, read, written, strided)

    def __setitem__(self, key: Any, value: Any) -> None:
        target = np.ndarray.__getitem__(self, key)
        source = value if isinstance(value, np.ndarray) else None
        self._record("assign", 0 if source is None else source.nbytes, target.nbytes,
                     strided=source is not None and not source.flags.c_contiguous)

    def astype(self, dtype: Any, *args: Any, copy: bool = True, **kwargs: Any) -> np.ndarray:
        dtype = np.dtype(dtype)
        if not copy and dtype == self.dtype:
            return self
        result = _like(self.recorder, self.shape, dtype)
        self._record("astype", self.nbytes, result.nbytes)
        return result

    def reshape(self, *shape: Any, **kwargs: Any) -> np.ndarray:
        try:  # a view where NumPy (and CuPy) can make one ...
            return super().reshape(*shape, copy=False, **kwargs)
        except ValueError:  # ... else a copy, recorded
            size_only = np.lib.stride_tricks.as_strided(np.zeros(1, np.int8), self.shape, (0,) * self.ndim)
            result = _like(self.recorder, size_only.reshape(*shape, **kwargs).shape, self.dtype)
            self._record("copy", self.nbytes, result.nbytes, strided=True)
            return result


def _like(recorder: Any, shape: Any, dtype: Any) -> TrackedArray:
    array = np.empty(shape, dtype).view(TrackedArray)
    array.recorder = recorder
    return array


class RecordingNumpy:
    """NumPy for a recording dry run: ``empty`` and ``zeros`` make
    :class:`TrackedArray`; ``zeros``, a copying ``ascontiguousarray`` and
    ``sum`` are recorded, not done."""

    def __init__(self, recorder: DryRunEngine) -> None:
        self.recorder = recorder

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)

    def empty(self, shape: Any, dtype: Any = float) -> TrackedArray:
        return _like(self.recorder, shape, dtype)

    def zeros(self, shape: Any, dtype: Any = float) -> TrackedArray:
        array = _like(self.recorder, shape, dtype)
        self.recorder.record("zeros", 0, array.nbytes)
        return array

    def ascontiguousarray(self, array: Any) -> Any:
        if isinstance(array, np.ndarray) and array.flags.c_contiguous:
            return array
        result = _like(self.recorder, np.shape(array), np.asarray(array).dtype)
        self.recorder.record("copy", result.nbytes, result.nbytes, strided=True)
        return result

    def sum(self, array: np.ndarray, axis: Any = None, dtype: Any = None, **kwargs: Any) -> TrackedArray:
        axes = range(array.ndim) if axis is None else (axis,) if isinstance(axis, int) else axis
        shape = tuple(d for i, d in enumerate(array.shape) if i not in {a % array.ndim for a in axes})
        result = _like(self.recorder, shape, dtype or array.dtype)
        self.recorder.record("reduce", array.nbytes, result.nbytes)
        return result


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
