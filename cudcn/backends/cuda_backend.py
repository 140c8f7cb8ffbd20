"""CUDA backend: kernels/*.cu through CuPy, the GEMMs through cuBLAS.

The same three steps as the NumPy backend (:mod:`cudcn.backends.numpy_backend`,
the specification this backend matches), per chunk of images:

1. ``to_channels_last`` turns the chunk's input (n, C, H, W) into
   (n, H*W, C), so that the sampling kernels read a pixel's channels from
   consecutive addresses;
2. ``deform_im2col`` samples the columns in the grouped layout
   (groups, n*L, K*C/groups) -- for one group exactly the public layout
   (n, L, K, C) -- and one batched cuBLAS GEMM per chunk multiplies them with
   the weight matrix of every group at once (``layout.weight_matrix``);
3. backward: the column gradients (one more batched GEMM, written over the
   columns once the weight gradient has used them) go through
   ``deform_col2im`` (atomics into a zero-filled float32/float64
   channels-last accumulator, then ``from_channels_last`` back to NCHW in the
   dtype) and ``deform_col2im_coord`` (offset and mask gradients, no atomics).
   With :func:`cudcn.config.deterministic_algorithms` on, the input gradient
   instead sorts the bilinear corners by target pixel and sums each pixel's
   in that fixed order (``deform_col2im_keys``, a stable argsort,
   ``deform_col2im_gather``): bitwise repeatable, at the cost of the sort and
   about 30 bytes per corner (4 per image, offset group, kernel point and
   output pixel) of extra workspace per chunk. Every other step has no
   atomics, so the whole backward is then repeatable.

The batch is chunked so that the column buffer stays under the workspace
budget (:mod:`cudcn.config`). float16 columns and GEMMs stay float16 (cuBLAS
accumulates in float32); bfloat16 columns are float32; every kernel computes
in float32 (float64 for float64). The weight gradient is summed over all
chunks in float32 (float64) by one cuBLAS GEMM per chunk that adds into it
(:func:`_add_transposed_product`), so a float16 partial sum is never rounded
or overflows. Everything runs on the arrays' device and CuPy's current stream
there; nothing waits for the device.

Subnormals: CuPy compiles every RawModule with ``-ftz=true``, so float32
arithmetic in the kernels flushes subnormal values (below about 1.2e-38) to
zero (float16 and bfloat16 values are widened to float32 first; float64 is
not affected). ``cudcn compile`` uses the same options
(:data:`cudcn.cuda_kernels.NVRTC_OPTIONS`).

Every step is written against an *engine*: an array module ``xp`` plus a
``launch`` of a named kernel instantiation. On a GPU the engine is CuPy; the
test suite also runs this very code with NumPy arrays and the kernels compiled
for the host (tests/emulation), so the layouts, chunking and GEMM plumbing
below are checked without a GPU too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from cudcn import config, cuda_kernels
from cudcn.backends.layout import chunks, weight_from_matrix, weight_matrix
from cudcn.geometry import Geometry


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

    threads = cuda_kernels.BLOCK * cuda_kernels.MAX_BLOCKS

    def __init__(self) -> None:
        import cupy

        self.xp = cupy
        # (device id, name expression) -> kernel: looked up once, not per launch.
        self._functions: dict[tuple[int, str], Any] = {}

    def launch(self, kernel: str, dtype: str, index: str, total: int, args: Sequence[Any]) -> None:
        name = cuda_kernels.name_expression(kernel, dtype, index)
        key = (self.xp.cuda.runtime.getDevice(), name)
        function = self._functions.get(key)
        if function is None:
            function = self._functions[key] = cuda_kernels.module(dtype).get_function(name)
        blocks = min(-(-total // cuda_kernels.BLOCK), cuda_kernels.MAX_BLOCKS)
        function((blocks,), (cuda_kernels.BLOCK,), tuple(args))

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


def _cupy_engine() -> CupyEngine:
    global _engine
    if _engine is None:
        _engine = CupyEngine()
    return _engine


# --------------------------------------------------------------------------
# Launchers: each allocates its outputs and launches one kernel.


def _index(engine: Engine, *sizes: int) -> tuple[str, type]:
    """``int`` while every tensor a launch touches, plus one grid stride, fits 31 bits."""
    if max(sizes) + engine.threads < 2**31:
        return "int", np.int32
    return "long long", np.int64


def _shape_args(geom: Geometry, batch: int, groups: int) -> list[np.int32]:
    """The kernels' DCN_SHAPE_PARAMS, in order (kernels/dcn_common.cuh)."""
    return [
        np.int32(v)
        for v in (
            batch, geom.in_channels, geom.height, geom.width,
            geom.kernel_h, geom.kernel_w, geom.stride_h, geom.stride_w,
            geom.pad_h, geom.pad_w, geom.dil_h, geom.dil_w,
            geom.out_h, geom.out_w, geom.offset_groups, groups,
        )
    ]


def _mask_args(mask: Any, offset: Any) -> list[Any]:
    # Without a mask the kernels never read the pointer; the offset stands in
    # so that every launch passes a valid device pointer.
    return [offset if mask is None else mask, np.int32(mask is not None)]


def _channels_last(engine: Engine, geom: Geometry, input: Any) -> Any:
    """input (n, C, H, W) -> (n, H*W, C), same dtype."""
    xp = engine.xp
    input = xp.ascontiguousarray(input)
    n, pixels = input.shape[0], geom.height * geom.width
    out = xp.empty((n, pixels, geom.in_channels), input.dtype)
    if out.size:
        index, itype = _index(engine, out.size)
        engine.launch(
            "to_channels_last", geom.dtype.name, index, out.size,
            [input, itype(out.size), np.int32(geom.in_channels), np.int32(pixels), out],
        )
    return out


def _im2col(engine: Engine, geom: Geometry, pixels: Any, offset: Any, mask: Any, groups: int) -> Any:
    """Columns (groups, n*L, K*C/groups) in the column dtype.

    pixels: (n, H*W, C) channels-last input; offset (n, 2GK, Ho, Wo) and mask
    (n, GK, Ho, Wo) or None, contiguous.
    """
    n = pixels.shape[0]
    per_group = geom.kernel_points * geom.in_channels // groups
    columns = engine.xp.empty(
        (groups, n * geom.out_pixels, per_group), cuda_kernels.TYPES[geom.dtype.name].column_dtype
    )
    if columns.size:
        index, itype = _index(engine, columns.size, pixels.size, offset.size)
        engine.launch(
            "deform_im2col", geom.dtype.name, index, columns.size,
            [pixels, offset, *_mask_args(mask, offset), *_shape_args(geom, n, groups),
             itype(columns.size), columns],
        )
    return columns


def _col2im(engine: Engine, geom: Geometry, columns: Any, offset: Any, mask: Any, groups: int, out: Any) -> None:
    """Scatter column gradients (groups, n*L, K*C/groups) into out (n, C, H, W).

    Float atomics by default; with :func:`cudcn.config.are_deterministic_algorithms_enabled`
    the sorted, atomic-free gather (:func:`_col2im_sorted`).
    """
    xp = engine.xp
    n = offset.shape[0]
    types = cuda_kernels.TYPES[geom.dtype.name]
    pixels = geom.height * geom.width
    if n * pixels * geom.in_channels == 0:
        return
    if config.are_deterministic_algorithms_enabled():
        accum = _col2im_sorted(engine, geom, columns, offset, mask, groups)
    else:
        accum = xp.zeros((n, pixels, geom.in_channels), types.accum_dtype)
        if columns.size:
            index, itype = _index(engine, columns.size, accum.size, offset.size)
            engine.launch(
                "deform_col2im", geom.dtype.name, index, columns.size,
                [columns, offset, *_mask_args(mask, offset), *_shape_args(geom, n, groups),
                 itype(columns.size), accum],
            )
    index, itype = _index(engine, accum.size)
    engine.launch(
        "from_channels_last", geom.dtype.name, index, accum.size,
        [accum, itype(accum.size), np.int32(geom.in_channels), np.int32(pixels), out],
    )


def _col2im_sorted(engine: Engine, geom: Geometry, columns: Any, offset: Any, mask: Any, groups: int) -> Any:
    """Input gradient (n, H*W, C) in the accumulator dtype, bitwise repeatable.

    Keys and weights of every bilinear corner (4 per image, offset group,
    kernel point and output pixel), a stable argsort of the keys, segment
    starts by searchsorted, and a gather that sums each segment in sorted
    order (kernels/dcn_col2im_sorted.cu).
    """
    xp = engine.xp
    n = offset.shape[0]
    types = cuda_kernels.TYPES[geom.dtype.name]
    pixels = geom.height * geom.width
    points = n * geom.offset_groups * geom.kernel_points * geom.out_pixels
    entries = 4 * points
    segments = n * geom.offset_groups * pixels  # also the sentinel key
    keys = xp.empty(entries, np.int64)
    weights = xp.empty(entries, types.accum_dtype)
    if points:
        index, itype = _index(engine, entries, offset.size)
        engine.launch(
            "deform_col2im_keys", geom.dtype.name, index, points,
            [offset, *_mask_args(mask, offset), *_shape_args(geom, n, groups), itype(points), keys, weights],
        )
    # A stable sort keeps the entries of one key in entry order: one result,
    # however the sort runs.
    order = xp.argsort(keys, kind="stable")
    starts = xp.searchsorted(keys[order], xp.arange(segments + 1, dtype=np.int64), side="left")
    accum = xp.empty((n, pixels, geom.in_channels), types.accum_dtype)
    index, itype = _index(engine, columns.size, accum.size, entries, segments + 1)
    engine.launch(
        "deform_col2im_gather", geom.dtype.name, index, accum.size,
        [columns, order.astype(np.int64, copy=False), starts.astype(np.int64, copy=False), weights,
         *_shape_args(geom, n, groups), itype(accum.size), accum],
    )
    return accum


def _col2im_coord(
    engine: Engine, geom: Geometry, columns: Any, pixels: Any, offset: Any, mask: Any,
    groups: int, grad_offset: Any, grad_mask: Any,
) -> None:
    """Offset (n, 2GK, Ho, Wo) and mask (n, GK, Ho, Wo) gradients into the given arrays."""
    n = offset.shape[0]
    total = n * geom.offset_groups * geom.kernel_points * geom.out_pixels
    if total == 0:
        return
    index, itype = _index(engine, columns.size, pixels.size, offset.size)
    engine.launch(
        "deform_col2im_coord", geom.dtype.name, index, total,
        [columns, pixels, offset, *_mask_args(mask, offset), *_shape_args(geom, n, groups),
         itype(total), grad_offset, grad_offset if grad_mask is None else grad_mask],
    )


def _add_transposed_product(engine: Engine, a: Any, b: Any, out: Any) -> None:
    """out (batch, P, Q) += a (batch, R, P)^T @ b (batch, R, Q), summed in out's dtype.

    a and b are C-contiguous and share a dtype; out is C-contiguous float32
    (float64). Row-major out is column-major out^T = b^T a: column-major, b
    is stored as b^T (Q, R) and a as a^T (P, R), so op(A) = b as stored and
    op(B) = a^T transposed. Nothing is copied.
    """
    batch, rows, p = a.shape
    q = b.shape[2]
    if out.size == 0 or rows == 0:
        return
    if max(rows, p, q, batch) >= 2**31:
        raise ValueError(f"GEMM sizes must stay below 2^31, got {(batch, rows, p, q)}")
    engine.gemm(Gemm(
        trans_a=False, trans_b=True, m=q, n=p, k=rows,
        a=b, lda=q, stride_a=rows * q,
        b=a, ldb=p, stride_b=rows * p,
        beta=1.0, c=out, ldc=q, stride_c=p * q, batch=batch,
    ))


# --------------------------------------------------------------------------
# The backend, against any engine.


def _chunk(xp: Any, array: Any, part: slice) -> Any:
    return None if array is None else xp.ascontiguousarray(array[part])


def _forward(engine: Engine, geom: Geometry, input: Any, offset: Any, weight: Any, bias: Any, mask: Any) -> Any:
    xp = engine.xp
    types = cuda_kernels.TYPES[geom.dtype.name]
    column_dtype = np.dtype(types.column_dtype)
    groups, L = geom.groups, geom.out_pixels
    per_group_out = geom.out_channels // groups
    out = xp.empty((geom.batch, geom.out_channels, geom.out_h, geom.out_w), geom.dtype)
    matrix = weight_matrix(geom, weight, column_dtype)  # (groups, K*C/groups, O/groups)
    if bias is not None:
        bias = bias.astype(types.accum_dtype).reshape(1, groups, per_group_out, 1)
    for part in chunks(geom, column_dtype):
        off, m = _chunk(xp, offset, part), _chunk(xp, mask, part)
        n = off.shape[0]
        pixels = _channels_last(engine, geom, input[part])
        columns = _im2col(engine, geom, pixels, off, m, groups)
        y = xp.matmul(columns, matrix)  # (groups, n*L, O/groups)
        y = y.reshape(groups, n, L, per_group_out).transpose(1, 0, 3, 2)
        target = out[part].reshape(n, groups, per_group_out, L)
        target[...] = y if bias is None else y + bias
    return out


def _backward(engine: Engine, geom: Geometry, grad_output: Any, input: Any, offset: Any, weight: Any, mask: Any):
    xp = engine.xp
    types = cuda_kernels.TYPES[geom.dtype.name]
    column_dtype = np.dtype(types.column_dtype)
    groups, L = geom.groups, geom.out_pixels
    per_group_out = geom.out_channels // groups
    grad_input = xp.empty((geom.batch, geom.in_channels, geom.height, geom.width), geom.dtype)
    grad_offset = xp.empty(offset.shape, geom.dtype)
    grad_mask = None if mask is None else xp.empty(mask.shape, geom.dtype)
    matrix = weight_matrix(geom, weight, column_dtype)  # (groups, K*C/groups, O/groups)
    # Transposed, (groups, O/groups, K*C/groups): the GEMM then reads the
    # columns as they lie (a transposed operand would make cupy copy them).
    grad_matrix_t = xp.zeros((groups, per_group_out, matrix.shape[1]), types.accum_dtype)
    for part in chunks(geom, column_dtype):
        off, m = _chunk(xp, offset, part), _chunk(xp, mask, part)
        n = off.shape[0]
        pixels = _channels_last(engine, geom, input[part])
        columns = _im2col(engine, geom, pixels, off, m, groups)
        # grad_output (n, O, Ho, Wo) -> (groups, n*L, O/groups), cast on the way.
        go = xp.empty((groups, n, L, per_group_out), column_dtype)
        go[...] = grad_output[part].reshape(n, groups, per_group_out, L).transpose(1, 0, 3, 2)
        go = go.reshape(groups, n * L, per_group_out)
        _add_transposed_product(engine, go, columns, grad_matrix_t)
        # The columns are spent: the column gradients take their place.
        grad_columns = xp.matmul(go, matrix.transpose(0, 2, 1), out=columns)
        _col2im(engine, geom, grad_columns, off, m, groups, grad_input[part])
        _col2im_coord(
            engine, geom, grad_columns, pixels, off, m, groups,
            grad_offset[part], None if grad_mask is None else grad_mask[part],
        )
    grad_bias = None
    if geom.has_bias:
        grad_bias = grad_output.astype(types.accum_dtype).sum(axis=(0, 2, 3)).astype(geom.dtype)
    grad_matrix = grad_matrix_t.transpose(0, 2, 1)
    grad_weight = weight_from_matrix(geom, grad_matrix).astype(geom.dtype, copy=False)
    return grad_input, grad_offset, grad_weight, grad_bias, grad_mask


def _public_columns(engine: Engine, geom: Geometry, columns: Any) -> Any:
    """Public columns (N, L, K, C) as the kernels' (1, N*L, K*C) in the column dtype."""
    xp = engine.xp
    column_dtype = cuda_kernels.TYPES[geom.dtype.name].column_dtype
    columns = xp.ascontiguousarray(columns.astype(column_dtype, copy=False))
    return columns.reshape(1, geom.batch * geom.out_pixels, geom.kernel_points * geom.in_channels)


def _im2col_public(engine: Engine, geom: Geometry, input: Any, offset: Any, mask: Any) -> Any:
    xp = engine.xp
    offset = xp.ascontiguousarray(offset)
    mask = None if mask is None else xp.ascontiguousarray(mask)
    pixels = _channels_last(engine, geom, input)
    columns = _im2col(engine, geom, pixels, offset, mask, 1)
    return columns.reshape(geom.columns_shape).astype(geom.dtype, copy=False)


def _col2im_public(engine: Engine, geom: Geometry, columns: Any, offset: Any, mask: Any) -> Any:
    xp = engine.xp
    offset = xp.ascontiguousarray(offset)
    mask = None if mask is None else xp.ascontiguousarray(mask)
    out = xp.empty((geom.batch, geom.in_channels, geom.height, geom.width), geom.dtype)
    _col2im(engine, geom, _public_columns(engine, geom, columns), offset, mask, 1, out)
    return out


def _col2im_coord_public(engine: Engine, geom: Geometry, columns: Any, input: Any, offset: Any, mask: Any):
    xp = engine.xp
    offset = xp.ascontiguousarray(offset)
    mask = None if mask is None else xp.ascontiguousarray(mask)
    grad_offset = xp.empty(offset.shape, geom.dtype)
    grad_mask = None if mask is None else xp.empty(mask.shape, geom.dtype)
    pixels = _channels_last(engine, geom, input)
    _col2im_coord(
        engine, geom, _public_columns(engine, geom, columns), pixels, offset, mask, 1,
        grad_offset, grad_mask,
    )
    return grad_offset, grad_mask


# --------------------------------------------------------------------------
# The backend interface (cudcn.backends): CuPy arrays, on their own device.


def forward(geom: Geometry, input: Any, offset: Any, weight: Any, bias: Any, mask: Any) -> Any:
    """Output (N, C_out, Ho, Wo) in the input's dtype."""
    with input.device:
        return _forward(_cupy_engine(), geom, input, offset, weight, bias, mask)


def backward(geom: Geometry, grad_output: Any, input: Any, offset: Any, weight: Any, mask: Any):
    """Gradients (input, offset, weight, bias or None, mask or None)."""
    with input.device:
        return _backward(_cupy_engine(), geom, grad_output, input, offset, weight, mask)


def im2col(geom: Geometry, input: Any, offset: Any, mask: Any) -> Any:
    """Columns (N, Ho*Wo, kh*kw, C_in), mask applied."""
    with input.device:
        return _im2col_public(_cupy_engine(), geom, input, offset, mask)


def col2im(geom: Geometry, columns: Any, offset: Any, mask: Any) -> Any:
    """Input gradient (N, C_in, H, W) from column gradients (N, Ho*Wo, kh*kw, C_in)."""
    with columns.device:
        return _col2im_public(_cupy_engine(), geom, columns, offset, mask)


def col2im_coord(geom: Geometry, columns: Any, input: Any, offset: Any, mask: Any):
    """Offset gradient (N, 2GK, Ho, Wo) and mask gradient (N, GK, Ho, Wo) or None."""
    with input.device:
        return _col2im_coord_public(_cupy_engine(), geom, columns, input, offset, mask)
