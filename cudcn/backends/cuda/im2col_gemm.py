"""The im2col + GEMM algorithm: kernels/*.cu through CuPy, the GEMMs through cuBLAS.

The same three steps as the NumPy backend (:mod:`cudcn.backends.numpy.dcn`,
the specification this backend matches), per chunk of images:

1. one ``layout_copies`` launch turns the chunk's input (n, C, H, W) into
   (n, H*W, C), so that the sampling kernels read a pixel's channels from
   consecutive addresses -- and, with the first chunk, lays the weight out
   as the GEMM's matrix of every group (``layout.weight_matrix``) and
   broadcasts the bias into the output;
2. ``deform_im2col`` (a group of lanes per sampling point, the lanes over
   its channels) samples the columns in the grouped layout
   (groups, n*L, K*C/groups) -- for one group exactly the public layout
   (n, L, K, C) -- and cuBLAS GEMMs (:mod:`cudcn.backends.cuda.gemms`)
   multiply them with the weight matrix, writing the output (n, O, Ho, Wo)
   where it lies: the GEMM adds its product to the bias there (beta = 1),
   so each output value is rounded once. Three launches per chunk;
3. backward: one ``layout_copies`` launch per chunk lays out the input
   channels-last and grad_output as rows (groups, n*L, O/groups) in the
   column dtype, zeroes the chunk's input-gradient accumulator and, with
   the first chunk, the weight matrix; one batched GEMM sums the weight
   gradient (in float32/float64, over the chunks) and one writes the
   column gradients over the spent columns. They go through
   ``deform_col2im`` (atomics into the float32/float64 channels-last
   accumulator) and ``deform_col2im_coord`` (offset and mask gradients,
   no atomics: each lane
   group sums over channels by a fixed-order shuffle reduction). With
   :func:`cudcn.config.deterministic_algorithms` on, the input gradient
   instead sorts the bilinear corners by target pixel and sums each pixel's
   in that fixed order (``deform_col2im_keys``, a stable argsort,
   ``deform_col2im_gather``): bitwise repeatable, at the cost of the sort and
   up to 56 bytes per corner (4 per image, offset group, kernel point and
   output pixel) of workspace, which the chunking counts in the budget. Every
   other step has no atomics, so the whole backward is then repeatable. A
   last ``layout_copies`` launch per chunk turns the accumulator back to
   NCHW in the dtype -- and, with the last chunk, the weight gradient into
   the weight's layout and the bias gradient (one reduction of grad_output,
   in float32/float64) into the dtype. Eight launches for one chunk.

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
from cudcn.backends.layout import chunks
from cudcn.geometry import Geometry


def _chunk(xp: Any, array: Any, part: slice) -> Any:
    return None if array is None else xp.ascontiguousarray(array[part])


def _matrix_copy(engine: Engine, geom: Geometry, weight: Any) -> tuple[Any, tuple]:
    """An empty weight matrix (groups, K*C/groups, O/groups) and the layout copy that fills it."""
    matrix = engine.xp.empty(
        (geom.groups, geom.kernel_points * geom.in_channels // geom.groups, geom.out_channels // geom.groups),
        geom.dtype,
    )
    return matrix, (engine.xp.ascontiguousarray(weight), launchers.weight_matrix_view(geom), matrix)


def forward(engine: Engine, geom: Geometry, input: Any, offset: Any, weight: Any, bias: Any, mask: Any) -> Any:
    xp = engine.xp
    column_dtype = np.dtype(kernels.TYPES[geom.dtype_name].column_dtype)
    groups, L = geom.groups, geom.out_pixels
    per_group_out = geom.out_channels // groups
    out = xp.empty((geom.batch, geom.out_channels, geom.out_h, geom.out_w), geom.dtype)
    matrix, matrix_copy = _matrix_copy(engine, geom, weight)
    # Made with the first chunk's layout pass: the weight matrix and, where
    # the GEMMs add their products (beta = 1, rounded once), the bias.
    first = [matrix_copy]
    if bias is not None:
        first.append((xp.ascontiguousarray(bias), launchers.bias_view(geom, geom.batch), out))
    for part in chunks(geom, column_dtype):
        x, off, m = (_chunk(xp, a, part) for a in (input, offset, mask))
        n = off.shape[0]
        pixels = xp.empty((n, geom.height * geom.width, geom.in_channels), geom.dtype)
        launchers.layout_copies(engine, geom, [(x, launchers.channels_last_view(geom, n), pixels), *first])
        first = []
        columns = launchers.im2col(engine, geom, pixels, off, m, groups)
        target = out[part].reshape(n, groups, per_group_out, L)  # a view: the GEMMs write the output
        gemms.forward(engine, columns, matrix, target, beta=0.0 if bias is None else 1.0)
        # Freed before the next chunk allocates its own: otherwise two column
        # buffers would be alive at once (tests/test_workspace.py measures it).
        del columns, pixels
    return out


def backward(engine: Engine, geom: Geometry, grad_output: Any, input: Any, offset: Any, weight: Any, mask: Any):
    xp = engine.xp
    types = kernels.TYPES[geom.dtype_name]
    column_dtype = np.dtype(types.column_dtype)
    groups, L = geom.groups, geom.out_pixels
    per_group_out = geom.out_channels // groups
    pixel_count = geom.height * geom.width
    grad_input = xp.empty((geom.batch, geom.in_channels, geom.height, geom.width), geom.dtype)
    grad_offset = xp.empty(offset.shape, geom.dtype)
    grad_mask = None if mask is None else xp.empty(mask.shape, geom.dtype)
    grad_weight = xp.empty((geom.out_channels, geom.in_channels // groups, geom.kernel_h, geom.kernel_w), geom.dtype)
    grad_bias, bias_sum = None, None
    if geom.has_bias:  # summed in float32 (float64) as it is read: no widened copy
        grad_bias = xp.empty(geom.out_channels, geom.dtype)
        same = np.dtype(types.accum_dtype) == geom.dtype
        bias_sum = xp.sum(grad_output, axis=(0, 2, 3), dtype=types.accum_dtype, out=grad_bias if same else None)
        if same:
            bias_sum = None  # written where it belongs
    if geom.batch == 0:  # no chunk: empty sums
        grad_weight[...] = 0
        if bias_sum is not None:
            grad_bias[...] = 0
        return grad_input, grad_offset, grad_weight, grad_bias, grad_mask
    matrix, matrix_copy = _matrix_copy(engine, geom, weight)  # (groups, K*C/groups, O/groups)
    # Transposed, (groups, O/groups, K*C/groups): the GEMM then reads the
    # columns as they lie. The first chunk's GEMM writes it (beta = 0).
    grad_matrix_t = xp.empty((groups, per_group_out, matrix.shape[1]), types.accum_dtype)
    deterministic = config.are_deterministic_algorithms_enabled()
    sorted_bytes = launchers.col2im_sorted_bytes_per_image(geom) if deterministic else 0
    parts = chunks(geom, column_dtype, extra_bytes_per_image=sorted_bytes)
    for number, part in enumerate(parts):
        x, go, off, m = (_chunk(xp, a, part) for a in (input, grad_output, offset, mask))
        n = off.shape[0]
        pixels = xp.empty((n, pixel_count, geom.in_channels), geom.dtype)
        # grad_output (n, O, Ho, Wo) -> rows (groups, n*L, O/groups), in the
        # column dtype: both GEMMs sum over its rows with the columns', which
        # needs the pixels of all images along one stride (one pass over
        # grad_output, 1/(K*C/O) of the column traffic).
        rows = xp.empty((groups, n * L, per_group_out), column_dtype)
        # The atomics' accumulator, zeroed by the layout pass (the sorted
        # gather makes its own).
        accum = None if deterministic else xp.empty((n, pixel_count, geom.in_channels), types.accum_dtype)
        copies = [(x, launchers.channels_last_view(geom, n), pixels), (go, launchers.rows_view(geom, n), rows)]
        launchers.layout_copies(engine, geom, copies + ([matrix_copy] if number == 0 else []), zero=accum)
        columns = launchers.im2col(engine, geom, pixels, off, m, groups)
        gemms.add_transposed_product(engine, rows, columns, grad_matrix_t, beta=0.0 if number == 0 else 1.0)
        # The columns are spent: the column gradients take their place.
        gemms.column_gradients(engine, rows, matrix, columns)
        accum = launchers.scatter_columns(engine, geom, columns, off, m, groups, accum)
        launchers.col2im_coord(
            engine, geom, columns, pixels, off, m, groups,
            grad_offset[part], None if grad_mask is None else grad_mask[part],
        )
        # Back to NCHW in the dtype; with the last chunk, the weight and bias
        # gradients too.
        copies = [(accum, launchers.from_channels_last_view(geom, n), grad_input[part])]
        if number == len(parts) - 1:
            copies.append((grad_matrix_t, launchers.weight_from_matrix_view(geom), grad_weight))
            if bias_sum is not None:
                copies.append((bias_sum, launchers.flat_view(geom.out_channels), grad_bias))
        launchers.layout_copies(engine, geom, copies, from_accumulator=True)
        # Freed before the next chunk allocates its own (as in the forward).
        del columns, pixels, rows, accum
    return grad_input, grad_offset, grad_weight, grad_bias, grad_mask


def _public_columns(engine: Engine, geom: Geometry, columns: Any) -> Any:
    """Public columns (N, L, K, C) as the kernels' (1, N*L, K*C) in the column dtype."""
    xp = engine.xp
    column_dtype = kernels.TYPES[geom.dtype_name].column_dtype
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


