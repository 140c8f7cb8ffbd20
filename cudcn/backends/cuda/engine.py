"""Where the CUDA backend's steps run: an *engine*.

An engine is an array module ``xp`` plus ``launch`` (run a named kernel
instantiation with a :class:`Launch` shape: grid, block, dynamic shared
memory) and ``gemm`` (one strided batched cuBLAS GEMM, :class:`Gemm`).
:func:`grid_stride` is the one policy for the grid-stride launches of the
sampling and layout kernels (the engine's block size and block cap). On a GPU it is :class:`CupyEngine`; the test
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


#: CUDA's limits on a launch (compute capability 7.5 and newer): threads per
#: block, block and grid extents in (x, y, z), and the most dynamic shared
#: memory a block can have (sm_90's opt-in maximum; smaller GPUs refuse less).
MAX_BLOCK_THREADS = 1024
MAX_BLOCK = (1024, 1024, 64)
MAX_GRID = (2**31 - 1, 65535, 65535)
MAX_SHARED_BYTES = 227 * 1024
#: Dynamic shared memory a kernel may use without opting in.
DEFAULT_SHARED_BYTES = 48 * 1024
WARP = 32


@dataclass(frozen=True)
class Launch:
    """The shape of one kernel launch: kernel<<<grid, block, shared_bytes>>>.

    grid and block are (x, y, z); shared_bytes is the dynamic shared memory
    of each block (``DCN_SHARED_DYNAMIC`` in the kernels). Checked against
    CUDA's limits here, so that the GPU and the emulator refuse the same
    launches.
    """

    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_bytes: int = 0

    def __post_init__(self) -> None:
        for name, dims, limits in (("grid", self.grid, MAX_GRID), ("block", self.block, MAX_BLOCK)):
            if len(dims) != 3 or any(not 1 <= int(d) <= m for d, m in zip(dims, limits)):
                raise ValueError(f"launch {name} must be three extents within {limits}, got {dims}")
        threads = self.block[0] * self.block[1] * self.block[2]
        if threads > MAX_BLOCK_THREADS:
            raise ValueError(f"a block has at most {MAX_BLOCK_THREADS} threads, got {self.block} = {threads}")
        if not 0 <= self.shared_bytes <= MAX_SHARED_BYTES:
            raise ValueError(f"shared_bytes must be in [0, {MAX_SHARED_BYTES}], got {self.shared_bytes}")


class Engine(Protocol):
    """Where the steps run: an array module, a kernel launcher and a GEMM."""

    xp: Any  # cupy (or numpy under host emulation)
    block: int  # threads per block of a grid-stride launch
    max_blocks: int  # the cap on its blocks (the kernels loop over the rest)
    threads: int  # the most threads a grid-stride launch starts (index-type choice)

    def launch(self, kernel: str, dtype: str, index: str, launch: Launch, args: Sequence[Any]) -> None:
        """Run instantiation (kernel, dtype, index) with the given launch shape.

        ``args`` are the kernel's arguments in order: contiguous arrays,
        ``numpy.int32`` and ``numpy.int64`` scalars.
        """

    def gemm(self, call: Gemm) -> None:
        """Run one strided batched GEMM (see :class:`Gemm`)."""


def grid_stride(engine: Engine, threads: int, whole_warps: bool = False) -> Launch:
    """A 1-D launch of the engine's blocks for a grid-stride loop wanting
    ``threads`` threads, capped at ``engine.max_blocks`` blocks.

    whole_warps: kernels that give a warp's lanes to one task (their loops
    are warp-uniform) need blocks of whole warps; the block is then rounded
    up to a multiple of 32.
    """
    block = -(-engine.block // WARP) * WARP if whole_warps else engine.block
    return Launch(grid=(min(max(-(-threads // block), 1), engine.max_blocks), 1, 1), block=(block, 1, 1))


class CupyEngine:
    """Launch through the per-device cupy.RawModule on the current stream."""

    block = kernels.BLOCK
    max_blocks = kernels.MAX_BLOCKS
    threads = kernels.BLOCK * kernels.MAX_BLOCKS  # BLOCK is a whole number of warps

    def __init__(self) -> None:
        import cupy

        self.xp = cupy
        # (device id, name expression) -> kernel: looked up once, not per launch.
        self._functions: dict[tuple[int, str], Any] = {}

    def launch(self, kernel: str, dtype: str, index: str, launch: Launch, args: Sequence[Any]) -> None:
        name = kernels.name_expression(kernel, dtype, index)
        key = (self.xp.cuda.runtime.getDevice(), name)
        function = self._functions.get(key)
        if function is None:
            function = self._functions[key] = kernels.module(dtype).get_function(name)
        if launch.shared_bytes > DEFAULT_SHARED_BYTES and function.max_dynamic_shared_size_bytes < launch.shared_bytes:
            # Above 48 KiB a kernel must opt in (a function attribute, kept
            # per device by the cached RawKernel); the driver refuses the launch
            # if the device has less.
            function.max_dynamic_shared_size_bytes = launch.shared_bytes
        function(launch.grid, launch.block, tuple(args), shared_mem=launch.shared_bytes)

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


