"""Where the CUDA backend's steps run: an *engine*.

An engine is an array module ``xp`` plus ``launch`` (run a named kernel
instantiation over a number of elements) and ``gemm`` (one strided batched
cuBLAS GEMM, :class:`Gemm`). On a GPU it is :class:`CupyEngine`; the test
suite runs the very same launchers and algorithms with an engine of NumPy
arrays and the kernels compiled for the host (tests/emulation), so layouts,
chunking and GEMM arguments are checked without a GPU too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from cudcn.backends.cuda import kernels


@dataclass(frozen=True)
class Gemm:
    """One strided batched GEMM in cuBLAS's column-major terms.

    For each of ``batch`` matrices: C = op(A) @ op(B) + beta * C, with
    op(A) (m, k), op(B) (k, n) and C (m, n); a matrix X with leading dimension
    ld has element (i, j) at X[i + j*ld]; matrix b of a batch starts at
    b * stride. ``trans_a`` means A is stored (k, m) and op(A) is its
    transpose (likewise B). A and B share one dtype; C is float32 (float64 for
    float64) and the products are summed in C's dtype.
    """

    trans_a: bool
    trans_b: bool
    m: int
    n: int
    k: int
    a: Any
    lda: int
    stride_a: int
    b: Any
    ldb: int
    stride_b: int
    beta: float
    c: Any
    ldc: int
    stride_c: int
    batch: int


class Engine(Protocol):
    """Where the steps run: an array module, a kernel launcher and a GEMM."""

    xp: Any  # cupy (or numpy under host emulation)
    threads: int  # the most threads one launch starts (block size * block cap)

    def launch(self, kernel: str, dtype: str, index: str, total: int, args: Sequence[Any]) -> None:
        """Run instantiation (kernel, dtype, index) over ``total`` elements.

        ``args`` are the kernel's arguments in order: contiguous arrays,
        ``numpy.int32`` and ``numpy.int64`` scalars.
        """

    def gemm(self, call: Gemm) -> None:
        """Run one strided batched GEMM (see :class:`Gemm`)."""


class CupyEngine:
    """Launch through the per-device cupy.RawModule on the current stream."""

    threads = kernels.BLOCK * kernels.MAX_BLOCKS

    def __init__(self) -> None:
        import cupy

        self.xp = cupy
        # (device id, name expression) -> kernel: looked up once, not per launch.
        self._functions: dict[tuple[int, str], Any] = {}

    def launch(self, kernel: str, dtype: str, index: str, total: int, args: Sequence[Any]) -> None:
        name = kernels.name_expression(kernel, dtype, index)
        key = (self.xp.cuda.runtime.getDevice(), name)
        function = self._functions.get(key)
        if function is None:
            function = self._functions[key] = kernels.module(dtype).get_function(name)
        blocks = min(-(-total // kernels.BLOCK), kernels.MAX_BLOCKS)
        function((blocks,), (kernels.BLOCK,), tuple(args))

    def gemm(self, call: Gemm) -> None:
        # cupy.matmul cannot do this: it rounds a float16 product to float16
        # and copies non-contiguous operands. cuBLAS's GemmEx family takes
        # float16 A and B with a float32 C directly, and beta = 1 adds into C.
        from cupy_backends.cuda.api import runtime
        from cupy_backends.cuda.libs import cublas

        data_type = {"float16": runtime.CUDA_R_16F, "float32": runtime.CUDA_R_32F, "float64": runtime.CUDA_R_64F}
        double = call.c.dtype == np.float64
        scale = np.float64 if double else np.float32
        alpha, beta = np.array(1, scale), np.array(call.beta, scale)  # host scalars, read during the call
        operation = {False: cublas.CUBLAS_OP_N, True: cublas.CUBLAS_OP_T}
        cublas.gemmStridedBatchedEx(
            self.xp.cuda.device.get_cublas_handle(),  # bound to the current stream by the call
            operation[call.trans_a], operation[call.trans_b], call.m, call.n, call.k,
            alpha.ctypes.data,
            call.a.data.ptr, data_type[call.a.dtype.name], call.lda, call.stride_a,
            call.b.data.ptr, data_type[call.b.dtype.name], call.ldb, call.stride_b,
            beta.ctypes.data,
            call.c.data.ptr, data_type[call.c.dtype.name], call.ldc, call.stride_c,
            call.batch,
            cublas.CUBLAS_COMPUTE_64F if double else cublas.CUBLAS_COMPUTE_32F,
            cublas.CUBLAS_GEMM_DEFAULT,
        )


_engine: CupyEngine | None = None


def cupy_engine() -> CupyEngine:
    global _engine
    if _engine is None:
        _engine = CupyEngine()
    return _engine


