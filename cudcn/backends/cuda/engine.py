"""Where the CUDA backend's steps run: an *engine*.

An engine is an array module ``xp`` plus ``launch`` (run a named kernel
instantiation with a :class:`Launch` shape: grid, block, dynamic shared
memory), ``gemm`` (one strided batched cuBLAS GEMM, :class:`Gemm`) and the
compute ``capability`` of the device it runs on (which kernels it can run).
:func:`grid_stride` is the one policy for the grid-stride launches of the
sampling and layout kernels (the engine's block size and block cap), and
:func:`kernel_launch` gives every launch its block and dynamic shared
memory (:func:`cudcn.backends.cuda.kernels.block_shape`). On a
GPU the engine is :class:`CupyEngine`; the test suite runs the very same
launchers and algorithms with an engine of NumPy arrays and the kernels
compiled for the host (tests/emulation), so layouts, chunking and GEMM
arguments are checked without a GPU too.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from cudcn.backends.cuda import kernels


@functools.lru_cache(maxsize=None)
def dtype_name(dtype: np.dtype) -> str:
    """``dtype.name``, which NumPy computes anew on every read, looked up once."""
    return dtype.name


#: What one GEMM may combine: (A and B dtype, C dtype), each a cuBLAS
#: GemmEx combination with float32 (float64) compute and scale types.
GEMM_TYPES = frozenset({
    ("float16", "float16"), ("float16", "float32"),
    ("bfloat16", "bfloat16"), ("bfloat16", "float32"),
    ("float32", "float32"), ("float64", "float64"),
})


@dataclass(frozen=True)
class Gemm:
    """One strided batched GEMM in cuBLAS's column-major terms.

    For each of ``batch`` matrices: C = op(A) @ op(B) + beta * C, with
    op(A) (m, k), op(B) (k, n) and C (m, n); a matrix X with leading dimension
    ld has element (i, j) at X[offset + i + j*ld] of the flat, C-contiguous
    array X, and matrix b of a batch starts ``b * stride`` elements further
    (a stride of 0 reuses one matrix). ``trans_a`` means A is stored (k, m)
    and op(A) is its transpose (likewise B).

    A and B share one dtype; (A's dtype, C's dtype) is one of
    :data:`GEMM_TYPES`. The products are summed in float32 (float64 for
    float64) and C is rounded once to its dtype: C = alpha*AB + beta*C in
    one pass. ``tf32`` (float32 operands only) lets cuBLAS round A and B to
    TF32 and use tensor cores (CUBLAS_COMPUTE_32F_FAST_TF32).
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
    offset_a: int = 0
    offset_b: int = 0
    offset_c: int = 0
    tf32: bool = False

    def __post_init__(self) -> None:
        types = (dtype_name(self.a.dtype), dtype_name(self.c.dtype))
        if self.b.dtype != self.a.dtype or types not in GEMM_TYPES:
            raise TypeError(f"no cuBLAS GEMM takes A {self.a.dtype}, B {self.b.dtype}, C {self.c.dtype}")
        if self.tf32 and types != ("float32", "float32"):
            raise TypeError(f"TF32 applies to float32 GEMMs only, got A {self.a.dtype}")
        if max(self.m, self.n, self.k, self.batch, self.lda, self.ldb, self.ldc) >= 2**31:
            raise ValueError(f"GEMM sizes must stay below 2^31, got m, n, k, batch = "
                             f"{(self.m, self.n, self.k, self.batch)}")


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
    capability: int  # compute capability of the current device, e.g. 80 for sm_80

    def launch(self, kernel: str, dtype: str, index: str, launch: Launch, args: Sequence[Any]) -> None:
        """Run instantiation (kernel, dtype, index) with the given launch shape.

        ``args`` are the kernel's arguments in order: contiguous arrays,
        ``numpy.int32`` and ``numpy.int64`` scalars.
        """

    def gemm(self, call: Gemm) -> None:
        """Run one strided batched GEMM (see :class:`Gemm`)."""


@functools.lru_cache(maxsize=4096)
def kernel_launch(kernel: str, grid: tuple[int, int, int], block: int = kernels.BLOCK) -> Launch:
    """A launch of ``kernel`` over ``grid``, its block and dynamic shared
    memory as :func:`cudcn.backends.cuda.kernels.block_shape` gives them
    for an engine whose grid-stride block is ``block``."""
    threads, shared_bytes = kernels.block_shape(kernel, block)
    return Launch(grid=grid, block=(threads, 1, 1), shared_bytes=shared_bytes)


def grid_stride(engine: Engine, kernel: str, threads: int) -> Launch:
    """A 1-D launch of ``kernel`` for a grid-stride loop wanting ``threads``
    threads, capped at ``engine.max_blocks`` blocks; the block is the
    engine's (whole warps for the sampling kernels: :func:`kernel_launch`)."""
    return _grid_stride(kernel, threads, engine.block, engine.max_blocks)


@functools.lru_cache(maxsize=4096)
def _grid_stride(kernel: str, threads: int, block: int, max_blocks: int) -> Launch:
    per_block, _ = kernels.block_shape(kernel, block)
    return kernel_launch(kernel, (min(max(-(-threads // per_block), 1), max_blocks), 1, 1), block)


class CupyEngine:
    """Launch through the per-device cupy.RawModule on the current stream."""

    block = kernels.BLOCK
    max_blocks = kernels.MAX_BLOCKS
    threads = kernels.BLOCK * kernels.MAX_BLOCKS  # BLOCK is a whole number of warps

    def __init__(self) -> None:
        import cupy

        self.xp = cupy
        # (device id, kernel, dtype, index type) -> kernel: looked up once, not per launch.
        self._functions: dict[tuple[int, str, str, str], Any] = {}
        self._capabilities: dict[int, int] = {}
        # device id -> a cuBLAS handle of cudcn's own, for GEMMs captured into CUDA graphs
        self._capture_handles: dict[int, int] = {}

    @property
    def capability(self) -> int:
        """Compute capability of CuPy's current device (e.g. 90 for sm_90)."""
        device = self.xp.cuda.runtime.getDevice()
        known = self._capabilities.get(device)
        if known is None:
            known = self._capabilities[device] = int(self.xp.cuda.Device(device).compute_capability)
        return known

    def launch(self, kernel: str, dtype: str, index: str, launch: Launch, args: Sequence[Any]) -> None:
        key = (self.xp.cuda.runtime.getDevice(), kernel, dtype, index)
        function = self._functions.get(key)
        if function is None:
            name = kernels.name_expression(kernel, dtype, index)
            function = self._functions[key] = kernels.module(dtype).get_function(name)
        if launch.shared_bytes > DEFAULT_SHARED_BYTES and function.max_dynamic_shared_size_bytes < launch.shared_bytes:
            # Above 48 KiB a kernel must opt in (a function attribute, kept
            # per device by the cached RawKernel); the driver refuses the launch
            # if the device has less.
            function.max_dynamic_shared_size_bytes = launch.shared_bytes
        function(launch.grid, launch.block, tuple(args), shared_mem=launch.shared_bytes)

    def gemm(self, call: Gemm) -> None:
        # cupy.matmul cannot do this: for 3-D float16 arrays it computes in
        # float32 copies without tensor cores, and it copies non-contiguous
        # operands. cuBLAS's GemmEx family takes half A and B with a float32
        # or half C directly, sums in float32 and rounds C once.
        from cupy_backends.cuda.api import runtime
        from cupy_backends.cuda.libs import cublas

        arguments = gemm_arguments(call, cublas, runtime)
        device = runtime.getDevice()
        stream = self.xp.cuda.get_current_stream()
        if not stream.is_capturing():
            # bound to the current stream by the call
            cublas.gemmStridedBatchedEx(self.xp.cuda.device.get_cublas_handle(), *arguments)
            if device not in self._capture_handles:  # made now, outside any capture, for a later one
                self._capture_handles[device] = cublas.create()
            return
        handle = self._capture_handles.get(device)
        library = _captured_cublas()
        if handle is None or library is None:
            from cudcn.errors import UnsupportedError

            raise UnsupportedError(
                "a GEMM cannot be captured into a CUDA graph here: "
                + ("run one call outside the capture first (a cuBLAS handle cannot be made during one)"
                   if library is not None else "libcublas was not found in this process")
            )
        # Workspace from the allocator in force: a graph's own pool under
        # torch.cuda.graph; freed after the call, reused in stream order.
        workspace = self.xp.empty(CAPTURE_WORKSPACE_BYTES, np.uint8)
        library.run(handle, stream.ptr, workspace.data.ptr, workspace.nbytes, arguments)

    @property
    def captures_gemms(self) -> bool:
        """Whether GEMMs can run on a stream being captured into a CUDA graph
        on the current device: through libcublas itself (CuPy's cuBLAS
        wrapper refuses them), on a handle made by a GEMM outside a capture."""
        return self.xp.cuda.runtime.getDevice() in self._capture_handles and _captured_cublas() is not None


#: Workspace of a GEMM captured into a CUDA graph (cuBLAS allocates none
#: during a capture; its guide asks for 32 MiB on Hopper, 4 MiB before).
CAPTURE_WORKSPACE_BYTES = 32 * 2**20

#: Host scalars alpha and beta of the GEMMs, by (scale type, value): never
#: written, so one array each serves every call (and stays alive while
#: cuBLAS reads it; under a capture its value is baked into the graph).
_SCALARS: dict[tuple[type, float], np.ndarray] = {}


def _scalar(scale: type, value: float) -> np.ndarray:
    array = _SCALARS.get((scale, value))
    if array is None:
        array = _SCALARS[scale, value] = np.array(value, scale)
        array.flags.writeable = False
    return array


def gemm_arguments(call: Gemm, cublas: Any, runtime: Any) -> tuple:
    """``cublasGemmStridedBatchedEx``'s arguments after the handle, in its
    order, for ``call``. ``cublas`` and ``runtime`` give the constants
    (CuPy's ``cupy_backends`` modules)."""
    double = call.c.dtype == np.float64
    if double:
        compute = cublas.CUBLAS_COMPUTE_64F
    else:
        compute = cublas.CUBLAS_COMPUTE_32F_FAST_TF32 if call.tf32 else cublas.CUBLAS_COMPUTE_32F
    scale = np.float64 if double else np.float32
    alpha, beta = _scalar(scale, 1.0), _scalar(scale, float(call.beta))  # host scalars, read during the call
    data_type = {
        "float16": runtime.CUDA_R_16F, "bfloat16": runtime.CUDA_R_16BF,
        "float32": runtime.CUDA_R_32F, "float64": runtime.CUDA_R_64F,
    }
    operation = {False: cublas.CUBLAS_OP_N, True: cublas.CUBLAS_OP_T}

    def pointer(array: Any, offset: int) -> int:
        return array.data.ptr + offset * array.itemsize

    arguments = (
        operation[call.trans_a], operation[call.trans_b], call.m, call.n, call.k,
        alpha.ctypes.data,
        pointer(call.a, call.offset_a), data_type[dtype_name(call.a.dtype)], call.lda, call.stride_a,
        pointer(call.b, call.offset_b), data_type[dtype_name(call.b.dtype)], call.ldb, call.stride_b,
        beta.ctypes.data,
        pointer(call.c, call.offset_c), data_type[dtype_name(call.c.dtype)], call.ldc, call.stride_c,
        call.batch, compute, cublas.CUBLAS_GEMM_DEFAULT,
    )
    return arguments


class CapturedCublas:
    """The libcublas functions a GEMM captured into a CUDA graph needs, called
    through ctypes.

    CuPy's cuBLAS wrapper (``cupy_backends.cuda.libs.cublas``) binds its
    handle to the current stream before every call and refuses when that
    stream is being captured (its ``setStream`` raises NotImplementedError),
    although cuBLAS itself can be captured given a workspace it need not
    allocate. So a captured GEMM runs on a handle of cudcn's own (made
    outside the capture), bound here to the capturing stream, with a
    workspace of its own, through ``cublasGemmStridedBatchedEx`` itself, with
    the very arguments CuPy's wrapper would get (:func:`gemm_arguments`).
    """

    def __init__(self, library: Any) -> None:
        import ctypes

        pointer, integer, wide = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
        self.set_stream = library.cublasSetStream_v2
        self.set_stream.argtypes = [pointer, pointer]
        self.set_workspace = library.cublasSetWorkspace_v2
        self.set_workspace.argtypes = [pointer, pointer, ctypes.c_size_t]
        self.gemm = library.cublasGemmStridedBatchedEx
        self.gemm.argtypes = [
            pointer, integer, integer, integer, integer, integer, pointer,
            pointer, integer, integer, wide, pointer, integer, integer, wide,
            pointer, pointer, integer, integer, wide, integer, integer, integer,
        ]
        for function in (self.set_stream, self.set_workspace, self.gemm):
            function.restype = integer

    def run(self, handle: int, stream: int, workspace: int, workspace_bytes: int, arguments: tuple) -> None:
        """One GEMM (:func:`gemm_arguments`) on ``handle``, bound to ``stream``, with the given workspace."""
        for name, call in (
            ("cublasSetStream", lambda: self.set_stream(handle, stream)),
            ("cublasSetWorkspace", lambda: self.set_workspace(handle, workspace, workspace_bytes)),
            ("cublasGemmStridedBatchedEx", lambda: self.gemm(handle, *arguments)),
        ):
            status = call()
            if status != 0:
                raise RuntimeError(f"{name} failed during a CUDA-graph capture: cuBLAS status {status}")


def _libcublas_path() -> str | None:
    """The libcublas that CuPy's cuBLAS wrapper loaded into this process, if any."""
    try:
        import cupy_backends.cuda.libs.cublas  # noqa: F401  (loads libcublas)

        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if path.rsplit("/", 1)[-1].startswith("libcublas.so"):
                    return path
    except (ImportError, OSError):
        pass
    import ctypes.util

    return ctypes.util.find_library("cublas")


@functools.lru_cache(maxsize=None)
def _captured_cublas() -> CapturedCublas | None:
    path = _libcublas_path()
    if path is None:
        return None
    import ctypes

    try:
        return CapturedCublas(ctypes.CDLL(path))
    except (OSError, AttributeError):  # no library, or one without these functions
        return None


#: CUDA's explicit handle of the legacy default stream (cudaStreamLegacy),
#: which is also DLPack's stream value for it.
LEGACY_DEFAULT_STREAM = 1


class _StreamHandle:
    """A raw CUDA stream handle in the CUDA stream protocol (for ``Stream.from_external``)."""

    def __init__(self, handle: int) -> None:
        self.handle = handle

    def __cuda_stream__(self) -> tuple[int, int]:
        return 0, self.handle


def external_stream(cupy: Any, handle: int, device_id: int) -> Any:
    """A CuPy stream on a framework's raw CUDA stream ``handle`` of GPU ``device_id``.

    torch and paddle show their default stream, CUDA's legacy default
    stream, as handle 0. To CuPy 0 means "no stream chosen": under
    CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1 it runs on the per-thread default
    stream instead and offers that stream (2) in the DLPack handshake, which
    torch and paddle reject. So 0 becomes cudaStreamLegacy (1): the same
    stream to CUDA, and DLPack's value for it. ``Stream.from_external``
    (CuPy >= 14) leaves the device unknown (-1); it is set here. Older CuPy
    takes handle and device as an ExternalStream.
    """
    handle = handle or LEGACY_DEFAULT_STREAM
    if hasattr(cupy.cuda.Stream, "from_external"):
        stream = cupy.cuda.Stream.from_external(_StreamHandle(handle))
        stream.device_id = device_id
        return stream
    return cupy.cuda.ExternalStream(handle, device_id)


def cupy_bfloat16_problem() -> str | None:
    """Why CuPy cannot hold bfloat16 arrays in this environment, or None if it can.

    CuPy 14 enables bfloat16 (ml_dtypes' type) when it is imported, and only
    with ml_dtypes installed and NumPy >= 2.1.2 (older NumPy crashes on
    bfloat16 loops). Needs no GPU; where one is present,
    ``cupy.empty(1, ml_dtypes.bfloat16)`` is the definitive probe.
    """
    import importlib.util

    from numpy.lib import NumpyVersion

    try:
        import cupy
    except ImportError as error:
        return f"CuPy cannot be imported ({error})"
    major = cupy.__version__.split(".")[0]
    if not major.isdigit() or int(major) < 14:
        return f"CuPy {cupy.__version__} has no bfloat16; it needs CuPy 14 or newer"
    if importlib.util.find_spec("ml_dtypes") is None:
        return "ml_dtypes is not installed; CuPy's bfloat16 is ml_dtypes.bfloat16 (pip install ml_dtypes)"
    if NumpyVersion(np.__version__) < "2.1.2":
        return f"CuPy enables bfloat16 only with NumPy >= 2.1.2, this is NumPy {np.__version__}"
    return None


_engine: CupyEngine | None = None


def cupy_engine() -> CupyEngine:
    global _engine
    if _engine is None:
        _engine = CupyEngine()
    return _engine


