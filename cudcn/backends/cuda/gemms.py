"""The algorithm's three products, in row-major terms, as cuBLAS GEMMs.

Each function states its product on C-contiguous arrays and translates it
into :class:`~cudcn.backends.cuda.engine.Gemm` calls (column-major): a
row-major (r, c) matrix with row stride ld is, to cuBLAS, the column-major
(c, r) matrix with leading dimension ld. The GEMMs read and write the arrays
where they lie: nothing is copied, cast or transposed on the way.

Half-precision operands (float16, bfloat16) are multiplied on tensor cores
and summed in float32; the result is rounded once to the output's dtype.
float32 operands use TF32 only while :func:`cudcn.config.is_tf32_enabled`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cudcn import config
from cudcn.backends.cuda.engine import Engine, Gemm


def _tf32(operand: Any) -> bool:
    return operand.dtype == np.float32 and config.is_tf32_enabled()


def forward(engine: Engine, columns: Any, matrix: Any, out: Any, beta: float) -> None:
    """out[i, g] = (columns[g, image i] @ matrix[g])^T + beta * out[i, g].

    columns (groups, n*L, D) with D = K*C/groups, image i's rows at
    i*L..(i+1)*L; matrix (groups, D, O/groups); out (n, groups, O/groups, L),
    e.g. a chunk of the NCHW output (beta = 1 adds to a bias written there
    first, so the sum is rounded once).

    Column-major, out[i, g] is the (L, O/groups) matrix with ld L, the product
    of columns[g, image i] (stored (D, L): transposed) and matrix[g] (stored
    (O/groups, D): transposed). One GEMM per group batched over the images,
    or one per image batched over the groups, whichever is fewer calls.
    """
    groups, rows, depth = columns.shape
    n, _, per_group_out, pixels = out.shape
    if out.size == 0:
        return
    image_a, image_c = pixels * depth, groups * per_group_out * pixels  # strides from image to image
    group_a, group_b, group_c = rows * depth, depth * per_group_out, per_group_out * pixels
    common = dict(
        trans_a=True, trans_b=True, m=pixels, n=per_group_out, k=depth,
        a=columns, lda=depth, b=matrix, ldb=per_group_out, beta=beta, c=out, ldc=pixels,
        tf32=_tf32(columns),
    )
    if groups <= n:
        for g in range(groups):
            engine.gemm(Gemm(
                **common, batch=n, stride_a=image_a, stride_b=0, stride_c=image_c,
                offset_a=g * group_a, offset_b=g * group_b, offset_c=g * group_c,
            ))
    else:
        for i in range(n):
            engine.gemm(Gemm(
                **common, batch=groups, stride_a=group_a, stride_b=group_b, stride_c=group_c,
                offset_a=i * image_a, offset_c=i * image_c,
            ))


def column_gradients(engine: Engine, grad_rows: Any, matrix: Any, out: Any) -> None:
    """out (groups, R, D) = grad_rows (groups, R, P) @ matrix (groups, D, P)^T.

    The column gradients: R = n*L rows of output-channel gradients, D =
    K*C/groups. Column-major, out[g] is out[g]^T (D, R) with ld D, the product
    of matrix[g] (stored (P, D): transposed) and grad_rows[g]^T (stored
    (P, R): as it lies). One GEMM batched over the groups.
    """
    groups, rows, per_group_out = grad_rows.shape
    depth = matrix.shape[1]
    if out.size == 0:
        return
    if per_group_out == 0:  # no output channel: nothing reaches the columns (and cuBLAS needs k >= 1)
        out[...] = 0
        return
    engine.gemm(Gemm(
        trans_a=True, trans_b=False, m=depth, n=rows, k=per_group_out,
        a=matrix, lda=per_group_out, stride_a=depth * per_group_out,
        b=grad_rows, ldb=per_group_out, stride_b=rows * per_group_out,
        beta=0.0, c=out, ldc=depth, stride_c=rows * depth, batch=groups,
        tf32=_tf32(matrix),
    ))


def add_transposed_product(engine: Engine, a: Any, b: Any, out: Any, beta: float = 1.0) -> None:
    """out (batch, P, Q) = a (batch, R, P)^T @ b (batch, R, Q) + beta * out, summed in out's dtype.

    The weight gradient: a and b share a dtype; out is float32 (float64), so
    that chunks add up without rounding to a half type (beta = 0 for the
    first, whose out is then not read). Row-major out is
    column-major out^T = b^T a: b is stored as b^T (Q, R) and a as a^T
    (P, R), so op(A) = b as stored and op(B) = a^T transposed.
    """
    batch, rows, p = a.shape
    q = b.shape[2]
    if out.size == 0:
        return
    if rows == 0:  # an empty sum (and cuBLAS needs k >= 1)
        if beta == 0:
            out[...] = 0
        return
    engine.gemm(Gemm(
        trans_a=False, trans_b=True, m=q, n=p, k=rows,
        a=b, lda=q, stride_a=rows * q,
        b=a, ldb=p, stride_b=rows * p,
        beta=beta, c=out, ldc=q, stride_c=p * q, batch=batch,
        tf32=_tf32(a),
    ))
