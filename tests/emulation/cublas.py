"""cuBLAS's strided batched GEMM (``cublasGemmStridedBatchedEx``), run by NumPy.

:func:`gemm_strided_batched` reads the operands exactly as cuBLAS would from
a :class:`cudcn.backends.cuda.engine.Gemm` (offsets, leading dimensions,
strides, transposes; column-major), so that the backend's translation of a
row-major product into those arguments is checked on the CPU. It also checks
what cuBLAS requires of them (leading dimensions, every matrix inside its
array, no two matrices of C overlapping) and computes as cuBLAS does: the
operands widened to float32 (float64), TF32 rounding of both operands when
asked, the sum in float32 (float64), C read only when beta is not 0, and C
rounded once to its dtype.
"""

from __future__ import annotations

import numpy as np

from cudcn.backends.cuda.engine import GEMM_TYPES, Gemm


def round_to_tf32(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to TF32 (10 explicit significand bits), to nearest, ties away from zero.

    What the tensor cores see of a float32 operand under
    CUBLAS_COMPUTE_32F_FAST_TF32 (the exponent range stays float32's).
    """
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    finite = (bits & 0x7F800000) != 0x7F800000
    rounded = np.where(finite, (bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000), bits)
    return rounded.astype(np.uint32).view(np.float32)


def _matrices(call: Gemm, array: np.ndarray, offset: int, rows: int, cols: int, ld: int, stride: int,
              writeable: bool = False) -> np.ndarray:
    """(batch, rows, cols) column-major matrices inside the flat ``array``, from ``offset``."""
    assert array.flags.c_contiguous, "cuBLAS reads flat memory: the array must be C-contiguous"
    assert rows >= 1 and cols >= 1 and ld >= rows, f"leading dimension {ld} < rows {rows}"
    assert offset >= 0 and stride >= 0
    last = offset + (call.batch - 1) * stride + (cols - 1) * ld + rows
    assert last <= array.size, f"a matrix reaches past its array ({last} > {array.size} elements)"
    item = array.itemsize
    flat = array.reshape(-1)[offset:]
    return np.lib.stride_tricks.as_strided(
        flat, (call.batch, rows, cols), (stride * item, item, ld * item), writeable=writeable
    )


def gemm_strided_batched(call: Gemm) -> None:
    """C = op(A) @ op(B) + beta * C for each matrix of the batch, in place."""
    assert (call.a.dtype.name, call.c.dtype.name) in GEMM_TYPES and call.b.dtype == call.a.dtype
    wide = np.float64 if call.c.dtype == np.float64 else np.float32
    a = _matrices(call, call.a, call.offset_a, *((call.k, call.m) if call.trans_a else (call.m, call.k)),
                  call.lda, call.stride_a)
    b = _matrices(call, call.b, call.offset_b, *((call.n, call.k) if call.trans_b else (call.k, call.n)),
                  call.ldb, call.stride_b)
    if call.trans_a:
        a = a.transpose(0, 2, 1)
    if call.trans_b:
        b = b.transpose(0, 2, 1)
    a, b = a.astype(wide), b.astype(wide)
    if call.tf32:
        a, b = round_to_tf32(a), round_to_tf32(b)
    product = np.matmul(a, b)
    c = _matrices(call, call.c, call.offset_c, call.m, call.n, call.ldc, call.stride_c, writeable=True)
    # cuBLAS writes the matrices of C concurrently: they must not overlap.
    if call.batch > 1:
        assert call.stride_c >= (call.n - 1) * call.ldc + call.m, "matrices of C overlap"
    if call.beta != 0:  # with beta = 0 cuBLAS never reads C (it may hold NaN)
        product = product + wide(call.beta) * c.astype(wide)
    c[...] = product.astype(call.c.dtype)
