"""The fused backward: no column buffer, the column gradients live on chip.

kernels/dcn_fused_backward.cu describes the kernels (built on the tiles of
kernels/dcn_fused_sampling.cuh, as the fused forward); in short:

1. ``fused_backward_weight``: the weight gradient as an implicit GEMM,
   sum over pixels of grad_output x columns, the columns sampled from the
   input as they are needed. The pixels are cut into a fixed number of
   splits (:func:`weight_splits`: enough for a launch of
   :data:`~cudcn.backends.cuda.launchers.FUSED_TARGET_BLOCKS` blocks where
   the workspace allows, from the geometry and the workspace budget only,
   never from the device); with one split the kernel writes the weight
   gradient, else each split's float32 part goes to a workspace and
   ``fused_weight_split_sum`` adds the parts in split order. Deterministic.
2. ``fused_backward_data``: per tile of output pixels, kernel point and
   offset group, the column gradients grad_output x W^T on tensor cores in
   shared memory, consumed there: the offset and mask gradients by
   fixed-order sums (deterministic), the input gradient by float32 atomics:
   straight into the float32 result, or, for float16 and bfloat16, into a
   float32 accumulator for a few images at a time (:func:`data_chunks`:
   as many as fit, and at least as many as a launch of FUSED_TARGET_BLOCKS
   blocks needs where the budget allows) that is then rounded into the result.
3. The bias gradient is the sum of grad_output over images and pixels, as in
   :mod:`cudcn.backends.cuda.im2col_gemm`.

Workspace: the weight as a (groups, K*C/groups, O/groups) matrix in the
dtype, then the larger of the split parts and the accumulator, each held
under :func:`workspace_limit`, 1/16 of the column buffer that im2col + GEMM
would use for one chunk of the same call (the accumulator may take up to
1/:data:`~cudcn.backends.cuda.fused.TARGET_SHARE` of the budget where
fewer images would leave a launch short of its target).

Operands as in the fused forward (:mod:`cudcn.backends.cuda.fused` picks
them): float16 and bfloat16 MMAs, TF32 MMAs for float32 with TF32 on, else
float32 FMAs (``_fma`` kernels); float64 stays on im2col + GEMM. Not with
deterministic algorithms on (:func:`why_not`): the input gradient is added
with float atomics, and no deterministic scheme fits the workspace -- the
sorted gather of :func:`cudcn.backends.cuda.launchers.col2im_sorted` needs
the column gradients in memory and up to 56 bytes per sampled corner, a
fixed-point accumulator 8 to 16 bytes per input element and a bound on the
sums -- so im2col + GEMM's sorted col2im computes that call.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cudcn import config
from cudcn.backends.cuda import kernels, launchers
from cudcn.backends.cuda.engine import Engine, Launch, grid_stride, kernel_launch
from cudcn.backends import layout
from cudcn.backends.layout import weight_matrix
from cudcn.geometry import Geometry

#: The kernels' units (FusedTile): fused_backward_data takes 64 output
#: pixels, fused_backward_weight 64 output channels (the A tile's rows) by
#: up to 64 channels (the B tile's).
DATA_PIXELS = kernels.FUSED_PIXELS
WEIGHT_OUTPUTS = kernels.FUSED_PIXELS
WEIGHT_SLICE = kernels.FUSED_OUT_CHANNELS

#: At most this many pixel splits of the weight gradient, each of at least
#: PIXELS_PER_SPLIT pixels (a split's sums are one block's work).
MAX_SPLITS = 64
PIXELS_PER_SPLIT = 1024
#: Each workspace piece stays under the column buffer of one im2col chunk
#: divided by this.
WORKSPACE_SHARE = 16
#: Where more images are needed for a launch of FUSED_TARGET_BLOCKS blocks,
#: the input-gradient accumulator may take up to 1/TARGET_SHARE of the budget.
TARGET_SHARE = 32


def why_not(geom: Geometry) -> str | None:
    """None when the fused backward can run this call (its dtype and device
    aside: :func:`cudcn.backends.cuda.fused.applies` checks those), else why not."""
    if config.are_deterministic_algorithms_enabled():
        return ("deterministic algorithms: the fused backward adds the input gradient with float atomics, "
                "and the sorted gather of im2col + GEMM needs the column gradients in memory")
    return None


def workspace_limit(geom: Geometry) -> int:
    """Bytes each workspace piece may take: 1/WORKSPACE_SHARE of the column
    buffer of the largest im2col chunk of this call (its chunks are balanced,
    :func:`cudcn.backends.layout.chunks`; at least one byte)."""
    per_image = geom.out_pixels * geom.kernel_points * geom.in_channels * geom.dtype.itemsize
    images = max((part.stop - part.start for part in layout.chunks(geom, geom.dtype)), default=1)
    return max(per_image * images // WORKSPACE_SHARE, 1)


def weight_splits(geom: Geometry) -> int:
    """Pixel splits of the weight gradient: as many as give its launch
    FUSED_TARGET_BLOCKS blocks, but no more than keep a split at
    PIXELS_PER_SPLIT pixels or more, than MAX_SPLITS, or than fit their
    float32 parts in :func:`workspace_limit`; at least one. A function of the
    geometry and the workspace budget alone, so the sums' order never
    depends on the device."""
    pixels = geom.batch * geom.out_pixels
    weight_bytes = 4 * geom.out_channels * (geom.in_channels // geom.groups) * geom.kernel_points
    fit = workspace_limit(geom) // max(weight_bytes, 1)
    wanted = -(-launchers.FUSED_TARGET_BLOCKS // max(_weight_units(geom, 1), 1))
    return max(1, min(wanted, pixels // PIXELS_PER_SPLIT, MAX_SPLITS, fit))


def data_chunks(geom: Geometry) -> list[slice]:
    """The batch in chunks, one launch of the input, offset and mask
    gradients each: all of it in float32 (atomics straight into the
    result); in float16 and bfloat16, whose float32 input-gradient
    accumulator is a workspace, as many images as :func:`workspace_limit`
    holds, and, where a launch would have fewer than FUSED_TARGET_BLOCKS
    blocks, as many as reach it within 1/TARGET_SHARE of the budget
    (:func:`launchers.fused_chunks`)."""
    if geom.dtype == np.float32:
        return [slice(0, geom.batch)]
    per_image = max(4 * geom.in_channels * geom.height * geom.width, 1)
    points = geom.kernel_points * geom.offset_groups
    pixel_tiles = -(-launchers.FUSED_TARGET_BLOCKS // max(points, 1))
    wanted = -(-pixel_tiles * DATA_PIXELS // max(geom.out_pixels, 1))
    return launchers.fused_chunks(geom.batch, workspace_limit(geom) // per_image, wanted,
                                  config.get_workspace_bytes() // TARGET_SHARE // per_image)


def _segments_per_group(geom: Geometry) -> int:
    """The most offset groups that one convolution group's channels overlap."""
    per_group, per_offset_group = geom.in_channels // geom.groups, geom.in_channels // geom.offset_groups
    return max(
        ((r + 1) * per_group - 1) // per_offset_group - r * per_group // per_offset_group + 1
        for r in range(geom.groups)
    )


def _weight_units(geom: Geometry, splits: int) -> int:
    """fused_backward_weight's work units: (group, segment, slice, kernel point, output tile, split)."""
    per_group, per_offset_group = geom.in_channels // geom.groups, geom.in_channels // geom.offset_groups
    slices = -(-min(per_group, per_offset_group) // WEIGHT_SLICE)
    out_tiles = -(-(geom.out_channels // geom.groups) // WEIGHT_OUTPUTS)
    return geom.groups * _segments_per_group(geom) * slices * geom.kernel_points * out_tiles * splits


def _units_launch(engine: Engine, kernel: str, units: int) -> Launch:
    """Blocks of ``kernel`` striding over `units` work units, at most the engine's block cap."""
    return kernel_launch(kernel, (max(1, min(units, engine.max_blocks)), 1, 1), engine.block)


def _weight_gradient(engine: Engine, geom: Geometry, suffix: str, grad_output, input, offset, mask,
                     grad_weight) -> None:
    """grad_weight (O, C/groups, kh, kw) = the weight gradient."""
    xp = engine.xp
    pixels = geom.batch * geom.out_pixels
    if grad_weight.size == 0:
        return
    if pixels == 0:
        grad_weight[...] = 0
        return
    splits = weight_splits(geom)
    split_pixels = -(-pixels // splits)
    segments = _segments_per_group(geom)
    units = _weight_units(geom, splits)
    parts = xp.empty((splits, grad_weight.size), np.float32) if splits > 1 else None
    index, itype = launchers.index_type(
        engine, grad_output.size, input.size, offset.size, grad_weight.size * splits, units
    )
    kernel = "fused_backward_weight" + suffix
    engine.launch(
        kernel, geom.dtype.name, index, _units_launch(engine, kernel, units),
        [grad_output, input, offset, *launchers.mask_args(mask, offset),
         *launchers.shape_args(geom, geom.batch, geom.groups), np.int32(geom.out_channels),
         np.int32(segments), np.int32(splits), np.int32(split_pixels), grad_weight,
         grad_weight if parts is None else parts],
    )
    if parts is not None:
        index, itype = launchers.index_type(engine, parts.size)
        engine.launch(
            "fused_weight_split_sum", geom.dtype.name, index,
            grid_stride(engine, "fused_weight_split_sum", grad_weight.size),
            [parts, np.int32(splits), itype(grad_weight.size), np.int32(geom.kernel_points), grad_weight],
        )


def _data_gradients(engine: Engine, geom: Geometry, suffix: str, grad_output, input, offset, weight, mask,
                    grad_input, grad_offset, grad_mask) -> None:
    """The input, offset and mask gradients into the given arrays; a float32
    grad_input must be zero-filled (the atomics add to it)."""
    xp = engine.xp
    if geom.batch == 0:
        return
    single = geom.dtype == np.float32  # atomics straight into the result
    matrix = xp.ascontiguousarray(weight_matrix(geom, weight, geom.dtype))  # (groups, K*Cg, Og)
    for part in data_chunks(geom):
        # One view of each array: the emulated engine hands an array passed
        # twice to the kernel as one buffer only when it is the same object.
        chunk_offset, chunk_grad_offset = offset[part], grad_offset[part]
        chunk_mask = None if mask is None else mask[part]
        accumulator = grad_input[part] if single else xp.zeros(input[part].shape, np.float32)
        n = accumulator.shape[0]
        units = -(-n * geom.out_pixels // DATA_PIXELS) * geom.kernel_points * geom.offset_groups
        index, itype = launchers.index_type(
            engine, grad_output[part].size, input[part].size, chunk_offset.size, units
        )
        kernel = "fused_backward_data" + suffix
        engine.launch(
            kernel, geom.dtype.name, index, _units_launch(engine, kernel, units),
            [grad_output[part], input[part], chunk_offset, *launchers.mask_args(chunk_mask, chunk_offset),
             matrix, *launchers.shape_args(geom, n, geom.groups), np.int32(geom.out_channels), accumulator,
             chunk_grad_offset, chunk_grad_offset if grad_mask is None else grad_mask[part]],
        )
        if not single:
            # A plain conversion: (n*C, H*W, 1) "channels-last" is (n*C, 1, H*W);
            # H*W fits the kernel's int (validate), C*H*W may not.
            index, itype = launchers.index_type(engine, accumulator.size)
            engine.launch(
                "from_channels_last", geom.dtype.name, index,
                launchers.layout_launch(engine, "from_channels_last", n * geom.in_channels, 1,
                                        geom.height * geom.width),
                [accumulator, itype(accumulator.size), np.int32(1), np.int32(geom.height * geom.width),
                 grad_input[part]],
            )
        del accumulator


def backward(engine: Engine, geom: Geometry, grad_output: Any, input: Any, offset: Any, weight: Any, mask: Any,
             tensor_cores: bool = True):
    """Gradients (input, offset, weight, bias or None, mask or None), as
    :func:`cudcn.backends.cuda.im2col_gemm.backward` returns them.

    tensor_cores: MMAs (float16, bfloat16, TF32 for float32), else float32
    FMAs (float32 only)."""
    xp = engine.xp
    suffix = "" if tensor_cores else "_fma"
    grad_output, input, offset = (xp.ascontiguousarray(a) for a in (grad_output, input, offset))
    mask = None if mask is None else xp.ascontiguousarray(mask)
    # The results first: what is allocated after them is the workspace.
    single = geom.dtype == np.float32
    grad_input = xp.zeros(input.shape, np.float32) if single else xp.empty(input.shape, geom.dtype)
    grad_offset = xp.empty(offset.shape, geom.dtype)
    grad_mask = None if mask is None else xp.empty(mask.shape, geom.dtype)
    grad_weight = xp.empty(weight.shape, geom.dtype)
    _weight_gradient(engine, geom, suffix, grad_output, input, offset, mask, grad_weight)
    _data_gradients(engine, geom, suffix, grad_output, input, offset, weight, mask, grad_input, grad_offset, grad_mask)
    grad_bias = None
    if geom.has_bias:  # summed in float32 as it is read, as im2col + GEMM does
        grad_bias = xp.sum(grad_output, axis=(0, 2, 3), dtype=np.float32).astype(geom.dtype, copy=False)
    return grad_input, grad_offset, grad_weight, grad_bias, grad_mask
