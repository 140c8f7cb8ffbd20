"""The im2col + GEMM algorithm: kernels/*.cu through CuPy, the GEMMs through cuBLAS.

The same three steps as the NumPy backend (:mod:`cudcn.backends.numpy.dcn`,
the specification this backend matches), per chunk of images:

1. ``to_channels_last`` turns the chunk's input (n, C, H, W) into
   (n, H*W, C), so that the sampling kernels read a pixel's channels from
   consecutive addresses;
2. ``deform_im2col`` (a group of lanes per sampling point, the lanes over
   its channels) samples the columns in the grouped layout
   (groups, n*L, K*C/groups) -- for one group exactly the public layout
   (n, L, K, C) -- and cuBLAS GEMMs (:mod:`cudcn.backends.cuda.gemms`)
   multiply them with the weight matrix of every group
   (``layout.weight_matrix``), writing the output (n, O, Ho, Wo) where it
   lies: the bias is written there first and the GEMM adds its product to
   it (beta = 1), so each output value is rounded once;
3. backward: grad_output is laid out once per chunk as rows
   (groups, n*L, O/groups) in the column dtype; one batched GEMM adds the
   weight gradient (in float32/float64) and one writes the column gradients
   over the spent columns. They go through ``deform_col2im`` (atomics into a
   zero-filled float32/float64 channels-last accumulator, then
   ``from_channels_last`` back to NCHW in the dtype) and
   ``deform_col2im_coord`` (offset and mask gradients, no atomics: each lane
   group sums over channels by a fixed-order shuffle reduction). With
   :func:`cudcn.config.deterministic_algorithms` on, the input gradient
   instead sorts the bilinear corners by target pixel and sums each pixel's
   in that fixed order (``deform_col2im_keys``, a stable argsort,
   ``deform_col2im_gather``): bitwise repeatable, at the cost of the sort and
   up to 56 bytes per corner (4 per image, offset group, kernel point and
   output pixel) of workspace, which the chunking counts in the budget. Every
   other step has no atomics, so the whole backward is then repeatable.

The batch is chunked so that the column buffer stays under the workspace
budget (:mod:`cudcn.config`), in as few chunks as fit, of balanced sizes
(:func:`cudcn.backends.layout.chunks`): at the benchmark shapes every launch
then has at least 4 blocks per SM of an H100 (tests/test_workspace.py). Columns and GEMM operands keep the dtype:
float16 and bfloat16 GEMMs run on tensor cores and sum in float32 (cuBLAS
GemmEx), float32 GEMMs use TF32 only with :func:`cudcn.config.tf32` on;
every kernel computes in float32 (float64 for float64). The weight gradient
is summed over all chunks in float32 (float64) by one cuBLAS GEMM per chunk
that adds into it, so a half-precision partial sum is never rounded or
overflows. Everything runs on the arrays' device and CuPy's current stream
there; nothing waits for the device.

Subnormals: CuPy compiles every RawModule with ``-ftz=true``, so float32
arithmetic in the kernels flushes subnormal values (below about 1.2e-38) to
zero (float16 and bfloat16 values are widened to float32 first; float64 is
not affected). ``cudcn compile`` uses the same options
(:func:`cudcn.backends.cuda.compile.runtime_options`).

Every step is written against an engine (:mod:`cudcn.backends.cuda.engine`),
so the test suite runs this very code on the CPU too.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cudcn import config
from cudcn.backends.cuda import gemms, kernels, launchers
from cudcn.backends.cuda.engine import Engine
from cudcn.backends.layout import chunks, weight_from_matrix, weight_matrix
from cudcn.geometry import Geometry


def _chunk(xp: Any, array: Any, part: slice) -> Any:
    return None if array is None else xp.ascontiguousarray(array[part])


def _weight_matrix(engine: Engine, geom: Geometry, weight: Any) -> Any:
    """The weight as a contiguous (groups, K*C/groups, O/groups) GEMM operand in the column dtype."""
    column_dtype = kernels.TYPES[geom.dtype.name].column_dtype
    return engine.xp.ascontiguousarray(weight_matrix(geom, weight, column_dtype))


def forward(engine: Engine, geom: Geometry, input: Any, offset: Any, weight: Any, bias: Any, mask: Any) -> Any:
    xp = engine.xp
    column_dtype = np.dtype(kernels.TYPES[geom.dtype.name].column_dtype)
    groups, L = geom.groups, geom.out_pixels
    per_group_out = geom.out_channels // groups
    out = xp.empty((geom.batch, geom.out_channels, geom.out_h, geom.out_w), geom.dtype)
    if bias is not None:
        # The GEMMs add their products to it (beta = 1) and round once.
        out[...] = bias.reshape(1, geom.out_channels, 1, 1)
    matrix = _weight_matrix(engine, geom, weight)
    for part in chunks(geom, column_dtype):
        off, m = _chunk(xp, offset, part), _chunk(xp, mask, part)
        n = off.shape[0]
        pixels = launchers.channels_last(engine, geom, input[part])
        columns = launchers.im2col(engine, geom, pixels, off, m, groups)
        target = out[part].reshape(n, groups, per_group_out, L)  # a view: the GEMMs write the output
        gemms.forward(engine, columns, matrix, target, beta=0.0 if bias is None else 1.0)
        # Freed before the next chunk allocates its own: otherwise two column
        # buffers would be alive at once (tests/test_workspace.py measures it).
        del columns, pixels
    return out


def backward(engine: Engine, geom: Geometry, grad_output: Any, input: Any, offset: Any, weight: Any, mask: Any):
    xp = engine.xp
    types = kernels.TYPES[geom.dtype.name]
    column_dtype = np.dtype(types.column_dtype)
    groups, L = geom.groups, geom.out_pixels
    per_group_out = geom.out_channels // groups
    grad_input = xp.empty((geom.batch, geom.in_channels, geom.height, geom.width), geom.dtype)
    grad_offset = xp.empty(offset.shape, geom.dtype)
    grad_mask = None if mask is None else xp.empty(mask.shape, geom.dtype)
    matrix = _weight_matrix(engine, geom, weight)  # (groups, K*C/groups, O/groups)
    # Transposed, (groups, O/groups, K*C/groups): the GEMM then reads the
    # columns as they lie.
    grad_matrix_t = xp.zeros((groups, per_group_out, matrix.shape[1]), types.accum_dtype)
    sorted_bytes = 0
    if config.are_deterministic_algorithms_enabled():
        sorted_bytes = launchers.col2im_sorted_bytes_per_image(geom)
    for part in chunks(geom, column_dtype, extra_bytes_per_image=sorted_bytes):
        off, m = _chunk(xp, offset, part), _chunk(xp, mask, part)
        n = off.shape[0]
        pixels = launchers.channels_last(engine, geom, input[part])
        columns = launchers.im2col(engine, geom, pixels, off, m, groups)
        # grad_output (n, O, Ho, Wo) -> rows (groups, n*L, O/groups), in the
        # column dtype: both GEMMs sum over its rows with the columns', which
        # needs the pixels of all images along one stride (one pass over
        # grad_output, 1/(K*C/O) of the column traffic).
        rows = xp.empty((groups, n, L, per_group_out), column_dtype)
        rows[...] = grad_output[part].reshape(n, groups, per_group_out, L).transpose(1, 0, 3, 2)
        rows = rows.reshape(groups, n * L, per_group_out)
        gemms.add_transposed_product(engine, rows, columns, grad_matrix_t)
        # The columns are spent: the column gradients take their place.
        gemms.column_gradients(engine, rows, matrix, columns)
        launchers.col2im(engine, geom, columns, off, m, groups, grad_input[part])
        launchers.col2im_coord(
            engine, geom, columns, pixels, off, m, groups,
            grad_offset[part], None if grad_mask is None else grad_mask[part],
        )
        # Freed before the next chunk allocates its own (as in the forward).
        del columns, pixels, rows
    grad_bias = None
    if geom.has_bias:  # summed in float32 (float64) as it is read: no widened copy
        grad_bias = xp.sum(grad_output, axis=(0, 2, 3), dtype=types.accum_dtype).astype(geom.dtype)
    grad_matrix = grad_matrix_t.transpose(0, 2, 1)
    grad_weight = weight_from_matrix(geom, grad_matrix).astype(geom.dtype, copy=False)
    return grad_input, grad_offset, grad_weight, grad_bias, grad_mask


def _public_columns(engine: Engine, geom: Geometry, columns: Any) -> Any:
    """Public columns (N, L, K, C) as the kernels' (1, N*L, K*C) in the column dtype."""
    xp = engine.xp
    column_dtype = kernels.TYPES[geom.dtype.name].column_dtype
    columns = xp.ascontiguousarray(columns.astype(column_dtype, copy=False))
    return columns.reshape(1, geom.batch * geom.out_pixels, geom.kernel_points * geom.in_channels)


def im2col_public(engine: Engine, geom: Geometry, input: Any, offset: Any, mask: Any) -> Any:
    xp = engine.xp
    offset = xp.ascontiguousarray(offset)
    mask = None if mask is None else xp.ascontiguousarray(mask)
    pixels = launchers.channels_last(engine, geom, input)
    columns = launchers.im2col(engine, geom, pixels, offset, mask, 1)
    return columns.reshape(geom.columns_shape).astype(geom.dtype, copy=False)


def col2im_public(engine: Engine, geom: Geometry, columns: Any, offset: Any, mask: Any) -> Any:
    xp = engine.xp
    offset = xp.ascontiguousarray(offset)
    mask = None if mask is None else xp.ascontiguousarray(mask)
    out = xp.empty((geom.batch, geom.in_channels, geom.height, geom.width), geom.dtype)
    launchers.col2im(engine, geom, _public_columns(engine, geom, columns), offset, mask, 1, out)
    return out


def col2im_coord_public(engine: Engine, geom: Geometry, columns: Any, input: Any, offset: Any, mask: Any):
    xp = engine.xp
    offset = xp.ascontiguousarray(offset)
    mask = None if mask is None else xp.ascontiguousarray(mask)
    grad_offset = xp.empty(offset.shape, geom.dtype)
    grad_mask = None if mask is None else xp.empty(mask.shape, geom.dtype)
    pixels = launchers.channels_last(engine, geom, input)
    launchers.col2im_coord(
        engine, geom, _public_columns(engine, geom, columns), pixels, offset, mask, 1,
        grad_offset, grad_mask,
    )
    return grad_offset, grad_mask


