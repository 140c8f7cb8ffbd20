"""A dry run of the CUDA backend: its memory, launches and host time, measured on the CPU.

:class:`DryRunEngine` is an engine on NumPy arrays whose kernels and GEMMs do
nothing (it only records them), so the backend's algorithms run their whole
Python side -- chunking, layouts, every allocation -- at any size: NumPy's
``empty`` reserves memory without touching it, so even the benchmark shapes'
column buffers cost no time and no resident memory.

Its array module is symbolic (:class:`SymbolicNumpy`): the arrays it makes,
and the arguments handed to :meth:`DryRunEngine.adopt`, are
:class:`SymbolicArray` views that keep NumPy's shapes, dtypes, strides and
views but never move data. Everything that would be device work on a GPU
through CuPy -- a copy for ``ascontiguousarray``, ``astype`` or a reshape
that cannot be a view, an assignment into an array, ``zeros`` (a memset), a
reduction, a sort, a gather, ``asarray`` of a host array (an upload) -- is
recorded instead of done, as a :class:`DeviceOp` (its kind, the bytes it
reads and writes, whether it reads across strides). So
:meth:`DryRunEngine.operations` counts every stream operation of a call
(kernels, GEMMs and CuPy's own), and the time a call takes is its host side
alone. A NumPy function the dry run does not model raises, so that no device
work can hide from the count.

With ``record=True`` the engine also keeps, for the performance model
(benchmarks/gpu_model.py), the bytes of the distinct arrays each launch is
handed (``footprints``) and each GEMM's sizes, dtypes and flags
(``gemm_calls``); without it a launch costs the dry run next to nothing, so
that the host time it measures is the backend's.

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
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cudcn.backends.cuda import kernels as cuda_kernels
from cudcn.backends.cuda.engine import Launch, dtype_name


@dataclass(frozen=True)
class DeviceOp:
    """A stream operation of the backend's own (a CuPy kernel, memset or copy
    on a GPU): its kind ("memset", "copy", "cast", "copy into", "fill",
    "reduction", "gather", "upload", ...), the bytes it reads and writes, and
    whether it reads across strides (a transposing copy)."""

    kind: str
    read: int = 0
    written: int = 0
    strided: bool = False


class SymbolicArray(np.ndarray):
    """A NumPy array of the dry run: views as NumPy makes them, device work recorded, no data moved.

    ``_xp`` is the :class:`SymbolicNumpy` that records its operations
    (inherited by every view).
    """

    _xp: SymbolicNumpy | None = None

    def __array_finalize__(self, obj: Any) -> None:
        self._xp = getattr(obj, "_xp", None)

    def _new(self, shape: Any, dtype: Any) -> SymbolicArray:
        return self._xp.empty(shape, dtype) if self._xp is not None else np.empty(shape, dtype).view(SymbolicArray)

    def _record(self, operation: str, read: int = 0, written: int = 0, strided: bool = False) -> None:
        if self._xp is not None:
            self._xp.record(operation, read, written, strided)

    def __setitem__(self, key: Any, value: Any) -> None:
        # An elementwise kernel writing the selection (a fill or a copy).
        written = np.ndarray.__getitem__(self, key).nbytes
        if isinstance(value, np.ndarray):
            self._record("copy into", value.nbytes, written, strided=not value.flags.c_contiguous)
        else:
            self._record("fill", 0, written)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, np.ndarray) or (isinstance(key, tuple) and any(isinstance(k, np.ndarray) for k in key)):
            if not isinstance(key, np.ndarray) or self.ndim != 1:
                raise NotImplementedError("the dry run models fancy indexing of 1-D arrays only")
            result = self._new(key.shape, self.dtype)
            self._record("gather", result.nbytes + key.nbytes, result.nbytes)
            return result
        return super().__getitem__(key)

    def astype(self, dtype: Any, order: str = "K", casting: str = "unsafe", subok: bool = True,
               copy: bool = True) -> SymbolicArray:
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        result = self._new(self.shape, dtype)
        self._record("cast" if np.dtype(dtype) != self.dtype else "copy", self.nbytes, result.nbytes,
                     strided=not self.flags.c_contiguous)
        return result

    def copy(self, order: str = "C") -> SymbolicArray:
        self._record("copy", self.nbytes, self.nbytes, strided=not self.flags.c_contiguous)
        return self._new(self.shape, self.dtype)

    def reshape(self, *shape: Any, order: str = "C") -> SymbolicArray:
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        view = self.view()
        try:
            view.shape = shape  # raises where NumPy's reshape would copy
        except AttributeError:
            self._record("copy", self.nbytes, self.nbytes, strided=True)
            return self._new(_reshaped(self.size, shape), self.dtype)
        return view

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"the dry run does not model the ufunc {ufunc.__name__}.{method}")

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        if func in _SHAPE_ONLY:
            return super().__array_function__(func, types, args, kwargs)
        raise NotImplementedError(f"the dry run does not model numpy.{func.__name__}: use the engine's xp")


def _reshaped(size: int, shape: Sequence[int]) -> tuple[int, ...]:
    """``shape`` with a -1 resolved, for an array of ``size`` elements."""
    shape = tuple(int(s) for s in shape)
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1]))
        shape = tuple(size // max(known, 1) if s == -1 else s for s in shape)
    return shape


#: NumPy functions that only look at shapes and strides (no device work).
_SHAPE_ONLY = frozenset({np.shape, np.ndim, np.size, np.may_share_memory, np.shares_memory, np.result_type})


class SymbolicNumpy:
    """The dry run's array module: what the CUDA backend calls on ``engine.xp``.

    Allocation (``empty``) makes a :class:`SymbolicArray` (counted in
    ``allocations``); device work is recorded in ``ops`` and returns
    arrays of the right shape and dtype with undefined values. Anything else
    raises AttributeError (there is no ``cuda``: the backend then times with
    the host clock and never sees a capturing stream).
    """

    def __init__(self) -> None:
        self.ops: list[DeviceOp] = []
        self.allocations = 0

    def record(self, operation: str, read: int = 0, written: int = 0, strided: bool = False) -> None:
        self.ops.append(DeviceOp(operation, read, written, strided))

    def adopt(self, array: Any) -> Any:
        """``array`` as a symbolic view (None stays None)."""
        if array is None:
            return None
        view = np.asarray(array).view(SymbolicArray)
        view._xp = self
        return view

    def empty(self, shape: Any, dtype: Any = float) -> SymbolicArray:
        self.allocations += 1
        return self.adopt(np.empty(shape, dtype))

    def zeros(self, shape: Any, dtype: Any = float) -> SymbolicArray:
        result = self.empty(shape, dtype)
        self.record("memset", 0, result.nbytes)
        return result

    def ascontiguousarray(self, array: Any, dtype: Any = None) -> SymbolicArray:
        dtype = array.dtype if dtype is None else np.dtype(dtype)
        if array.flags.c_contiguous and dtype == array.dtype:
            return array if isinstance(array, SymbolicArray) else self.adopt(array)
        result = self.empty(array.shape, dtype)
        self.record("copy" if dtype == array.dtype else "cast", array.nbytes, result.nbytes,
                    strided=not array.flags.c_contiguous)
        return result

    def asarray(self, array: Any, dtype: Any = None) -> SymbolicArray:
        """A host array on the device: a copy from the host (MSDA's level table)."""
        if isinstance(array, SymbolicArray) and (dtype is None or np.dtype(dtype) == array.dtype):
            return array
        host = np.asarray(array, dtype)
        self.record("upload", host.nbytes, host.nbytes)
        return self.empty(host.shape, host.dtype)

    def sum(self, array: Any, axis: Any = None, dtype: Any = None, out: Any = None) -> SymbolicArray:
        axes = range(array.ndim) if axis is None else (axis if isinstance(axis, tuple) else (axis,))
        shape = tuple(s for i, s in enumerate(array.shape) if i not in {a % array.ndim for a in axes})
        result = out if out is not None else self.empty(shape, array.dtype if dtype is None else dtype)
        self.record("reduction", array.nbytes, result.nbytes)
        return result

    def argsort(self, array: Any, kind: Any = None) -> SymbolicArray:
        result = self.empty(array.shape, np.int64)
        self.record("sort", array.nbytes, result.nbytes)
        return result

    def searchsorted(self, array: Any, values: Any, side: str = "left") -> SymbolicArray:
        result = self.empty(values.shape, np.int64)
        self.record("search", array.nbytes + values.nbytes, result.nbytes)
        return result

    def arange(self, stop: int, dtype: Any = None) -> SymbolicArray:
        result = self.empty((stop,), dtype or np.int64)
        self.record("arange", 0, result.nbytes)
        return result

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "cuda":  # no CUDA: host timing, no capture
            raise AttributeError(name)
        if isinstance(getattr(np, name, None), type) or name in ("dtype", "ndarray"):
            return getattr(np, name)  # types (np.float32, ...) carry no device work
        raise AttributeError(f"the dry run's xp does not model {name!r}")


class DryRunEngine:
    """A CUDA-backend engine whose launches and GEMMs are recorded, not run.

    Sizes as :class:`cudcn.backends.cuda.engine.CupyEngine` (block, block
    cap), so that index types and chunks are the GPU's; ``capability`` is the
    compute capability it claims. ``launches`` holds (name expression,
    Launch) and ``gemms`` (m, n, k, batch, A's dtype) of each GEMM: no
    reference to an array, which would keep it alive. ``xp`` is a fresh
    :class:`SymbolicNumpy`: hand the call's arguments through :meth:`adopt`
    so that their copies are counted too (``operations`` then holds every
    stream operation; arguments that are not adopted still work).
    ``record=True`` adds ``footprints`` and ``gemm_calls`` (module docstring).
    """

    block = cuda_kernels.BLOCK
    max_blocks = cuda_kernels.MAX_BLOCKS
    threads = cuda_kernels.BLOCK * cuda_kernels.MAX_BLOCKS

    def __init__(self, capability: int = 90, record: bool = False) -> None:
        self.capability = capability
        self.xp = SymbolicNumpy()
        self._launches: list[tuple[str, str, str, Launch]] = []
        self.gemms: list[tuple[int, int, int, int, str]] = []
        self.record = record
        self.footprints: list[int] = []  # of each launch: bytes of the distinct arrays it is handed
        self.gemm_calls: list[dict[str, Any]] = []

    def adopt(self, array: Any) -> Any:
        """A call's argument as a symbolic array of this engine (None stays None)."""
        return self.xp.adopt(array)

    def launch(self, kernel: str, dtype: str, index: str, launch: Launch, args: Sequence[Any]) -> None:
        self._launches.append((kernel, dtype, index, launch))  # named when asked: the record costs little
        if self.record:
            arrays = {(a.__array_interface__["data"][0], a.nbytes) for a in args if isinstance(a, np.ndarray)}
            self.footprints.append(sum(nbytes for _, nbytes in arrays))

    @property
    def launches(self) -> list[tuple[str, Launch]]:
        """(name expression, Launch) of each launch so far."""
        return [(cuda_kernels.name_expression(k, d, i), launch) for k, d, i, launch in self._launches]

    def gemm(self, call: Any) -> None:
        self.gemms.append((call.m, call.n, call.k, call.batch, dtype_name(call.a.dtype)))
        if self.record:
            self.gemm_calls.append(dict(
                m=call.m, n=call.n, k=call.k, batch=call.batch, operand_dtype=dtype_name(call.a.dtype),
                out_dtype=dtype_name(call.c.dtype), tf32=call.tf32, reads_c=call.beta != 0,
                shared_a=call.stride_a == 0, shared_b=call.stride_b == 0,
            ))

    @property
    def device_ops(self) -> list[DeviceOp]:
        """The device work recorded by ``xp`` beyond kernels and GEMMs (memsets, CuPy copies, ...)."""
        return self.xp.ops

    def operations(self) -> Counter:
        """Stream operations so far, by kind: "kernel" (each launch), "gemm",
        and each kind of ``device_ops``."""
        counts = Counter({"kernel": len(self._launches), "gemm": len(self.gemms)})
        counts.update(op.kind for op in self.device_ops)
        return counts

    def clear(self) -> None:
        """Forget what was recorded (allocations included)."""
        self._launches.clear()
        self.gemms.clear()
        self.footprints.clear()
        self.gemm_calls.clear()
        self.xp.ops.clear()
        self.xp.allocations = 0


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
