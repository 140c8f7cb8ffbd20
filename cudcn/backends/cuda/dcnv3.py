"""DCNv3 and DCNv4 on the GPU: the launchers of kernels/dcnv3.cu.

The same computation as the NumPy backend (:mod:`cudcn.backends.numpy.dcnv3`,
the specification), with the notation of :mod:`cudcn.dcnv3_geometry`. An
*item* is (image, output pixel, group): N*Ho*Wo*G of them, each a row of D
channels of the output. The kernels give each item a group of lanes of one
warp, ``channel_lanes x point_lanes``:

- channel lanes: over D in blocks of 16 bytes in the forward, one channel
  each (interleaved) in the backward
  (:func:`cudcn.backends.cuda.gathers.forward_lanes` and ``backward_lanes``,
  shared with multi-scale deformable attention);
- point lanes (:func:`point_lanes`): where the items alone would not give an
  H100 four blocks per SM, the points of an item are split among up to
  ``P`` lanes (a power of two), whose sums a fixed-order butterfly adds.
  The split depends on the call's sizes only, never on the grid.

The forward reads each offset and mask value once per item and gathers four
corners at once (kernels/sampling.cuh), summing in float32 (float64 for
float64). The backward's offset and mask gradients are fixed-order warp
reductions; its input gradient goes by float32 (float64) atomics into a
zero-filled accumulator, converted to the dtype after -- or, with
:func:`cudcn.config.deterministic_algorithms` on, by sorting every bilinear
corner by the input element it lands on and summing each element's corners
in that fixed order (``dcnv3_input_keys``, then
:func:`cudcn.backends.cuda.gathers.sorted_gather`): bitwise repeatable, in
chunks of (image, output pixel) pairs whose sort fits the workspace budget.

DCNv3's separate offset and mask and DCNv4's packed offset_mask are read in
place through the geometry's layouts (:attr:`DCNv3Geometry.offset_layout`);
DCNv4's gradient is one zero-filled array written through the same layouts.
``geometry.softmax`` (DCNv3) fuses the module's softmax of the mask over P:
``dcnv3_softmax_stats`` writes each item's largest mask value and exp sum
(two compute-dtype values an item), the kernels softmax each mask value as
they read it, and the backward's ``dcnv3_softmax_backward`` applies the
Jacobian to the gradient by the softmaxed mask (a float32 or float64
scratch shaped like the mask).

Every launch goes through the engine (:mod:`cudcn.backends.cuda.engine`)
with 32- or 64-bit indexing chosen per launch from the sizes involved, on
the arrays' device and CuPy's current stream; nothing waits for the device.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cudcn import config
from cudcn.backends.cuda import gathers, kernels
from cudcn.backends.cuda.engine import WARP, Engine, grid_stride
from cudcn.backends.cuda.gathers import group_launch
from cudcn.backends.cuda.launchers import SORTED_BYTES_PER_CORNER, index_type
from cudcn.dcnv3_geometry import DCNv3Geometry
from cudcn.errors import ArgumentError

#: Threads that fill an H100 four blocks of :data:`kernels.BLOCK` deep on
#: each of its 132 SMs: below this, an item's points are split among lanes.
FILL_THREADS = 4 * 132 * kernels.BLOCK


def items(geom: DCNv3Geometry) -> int:
    """N*Ho*Wo*G: a row of D output channels each."""
    return geom.batch * geom.out_h * geom.out_w * geom.group


def point_lanes(geom: DCNv3Geometry, channel_lanes: int) -> int:
    """Lanes among which an item's P points are split: doubled from 1 while
    the launch has fewer than :data:`FILL_THREADS` threads, the group stays
    within a warp and each lane keeps a point."""
    lanes, count = 1, items(geom)
    while count * channel_lanes * lanes < FILL_THREADS and 2 * lanes * channel_lanes <= WARP \
            and 2 * lanes <= geom.points:
        lanes *= 2
    return lanes


def forward_lanes(geom: DCNv3Geometry) -> tuple[int, int]:
    """(channel lanes, point lanes) of the forward."""
    channel_lanes = gathers.forward_lanes(geom.dtype, geom.group_channels)
    return channel_lanes, point_lanes(geom, channel_lanes)


def backward_lanes(geom: DCNv3Geometry) -> tuple[int, int]:
    """(channel lanes, point lanes) of the backward."""
    channel_lanes = gathers.backward_lanes(geom.dtype, geom.group_channels)
    return channel_lanes, point_lanes(geom, channel_lanes)


def centre_point(geom: DCNv3Geometry) -> int:
    """The full kh*kw grid's point (w-major) that remove_center drops; kh*kw when none."""
    if geom.remove_center:
        return (geom.kernel_w // 2) * geom.kernel_h + geom.kernel_h // 2
    return geom.kernel_h * geom.kernel_w


def shape_args(geom: DCNv3Geometry) -> list[np.int32]:
    """The kernels' DCNV3_SHAPE_PARAMS, in order (kernels/dcnv3.cu)."""
    values = (geom.height, geom.width, geom.group, geom.group_channels, geom.kernel_h, geom.kernel_w,
              geom.stride_h, geom.stride_w, geom.pad_h, geom.pad_w, geom.dil_h, geom.dil_w, geom.out_h, geom.out_w,
              geom.points, centre_point(geom), *geom.offset_layout, *geom.mask_layout)
    return [np.int32(v) for v in values]


def _offset_scale(geom: DCNv3Geometry) -> np.floating:
    """offset_scale in the compute dtype (float32 but for float64), as the NumPy backend multiplies by it."""
    return (np.float64 if geom.dtype == np.float64 else np.float32)(geom.offset_scale)


def _contiguous(engine: Engine, geom: DCNv3Geometry, offset: Any, mask: Any) -> tuple[Any, Any]:
    """offset and mask contiguous; DCNv4's one array stays one."""
    offset = engine.xp.ascontiguousarray(offset)
    return offset, offset if geom.packed else engine.xp.ascontiguousarray(mask)


def _check_sizes(geom: DCNv3Geometry) -> None:
    if geom.channels >= 2**31:
        raise ArgumentError(f"input has {geom.channels} channels; the CUDA kernels take fewer than 2^31")


def _softmax_stats(engine: Engine, geom: DCNv3Geometry, mask: Any) -> Any:
    """With geom.softmax, each item's largest mask value and exp sum, (items, 2)
    in the compute dtype (``dcnv3_softmax_stats``); else an empty stand-in
    (the kernels do not read it)."""
    xp = engine.xp
    accum_dtype = kernels.TYPES[geom.dtype.name].accum_dtype
    count = items(geom)
    if not geom.softmax or count == 0:
        return xp.empty(0, accum_dtype)
    stats = xp.empty((count, 2), accum_dtype)
    index, itype = index_type(engine, mask.size, stats.size)
    engine.launch("dcnv3_softmax_stats", geom.dtype.name, index, grid_stride(engine, "dcnv3_softmax_stats", count),
                  [mask, *shape_args(geom), itype(count), stats])
    return stats


def forward(engine: Engine, geom: DCNv3Geometry, input: Any, offset: Any, mask: Any) -> Any:
    """Output (N, Ho, Wo, G*D) in the input's dtype; every element written.
    For DCNv4 (geom.packed) ``offset`` and ``mask`` are both offset_mask."""
    xp = engine.xp
    out = xp.empty(geom.output_shape, geom.dtype)
    count = items(geom)
    if out.size == 0:
        return out
    _check_sizes(geom)
    input = xp.ascontiguousarray(input)
    offset, mask = _contiguous(engine, geom, offset, mask)
    stats = _softmax_stats(engine, geom, mask)
    channel_lanes, split = forward_lanes(geom)
    index, itype = index_type(engine, input.size, offset.size, mask.size, out.size, stats.size)
    engine.launch(
        "dcnv3_forward", geom.dtype.name, index, group_launch(engine, "dcnv3_forward", count, channel_lanes * split),
        [input, offset, mask, *shape_args(geom), _offset_scale(geom), itype(count), np.int32(channel_lanes),
         np.int32(split), np.int32(geom.softmax), stats, out],
    )
    return out


def backward(engine: Engine, geom: DCNv3Geometry, grad_output: Any, input: Any, offset: Any, mask: Any):
    """Gradients (input, offset, mask), each in its argument's shape and the
    dtype. For DCNv4 (geom.packed) ``offset`` and ``mask`` are both
    offset_mask, and so are the two gradients: one array, zeros in the
    entries past G*3P, returned twice."""
    xp = engine.xp
    dtype = geom.dtype.name
    accum_dtype = kernels.TYPES[dtype].accum_dtype
    grad_output, input = xp.ascontiguousarray(grad_output), xp.ascontiguousarray(input)
    offset, mask = _contiguous(engine, geom, offset, mask)
    if geom.packed:
        grad_offset = grad_mask = xp.zeros(offset.shape, geom.dtype)
    else:
        grad_offset, grad_mask = xp.empty(offset.shape, geom.dtype), xp.empty(mask.shape, geom.dtype)
    accum = xp.zeros(input.shape, accum_dtype)  # the input gradient, summed in float32 (float64)
    count = items(geom)
    if count == 0:
        return gathers.to_storage(engine, accum, geom.dtype), grad_offset, grad_mask
    _check_sizes(geom)
    deterministic = config.are_deterministic_algorithms_enabled()
    stats = _softmax_stats(engine, geom, mask)
    # With softmax, the gradient by the softmaxed mask, laid out as the mask, before its Jacobian.
    scratch = xp.empty(mask.shape, accum_dtype) if geom.softmax else accum
    channel_lanes, split = backward_lanes(geom)
    index, itype = index_type(engine, input.size, offset.size, mask.size, grad_output.size, stats.size)
    engine.launch(
        "dcnv3_backward", dtype, index, group_launch(engine, "dcnv3_backward", count, channel_lanes * split),
        [grad_output, input, offset, mask, *shape_args(geom), _offset_scale(geom), itype(count),
         np.int32(channel_lanes), np.int32(split), np.int32(geom.softmax), stats, np.int32(not deterministic), accum,
         grad_offset, grad_mask, scratch],
    )
    if geom.softmax:
        index, itype = index_type(engine, mask.size, stats.size)
        engine.launch(
            "dcnv3_softmax_backward", dtype, index, grid_stride(engine, "dcnv3_softmax_backward", count),
            [mask, *shape_args(geom), itype(count), stats, scratch, grad_mask],
        )
    del scratch
    if deterministic:
        _sorted_input_gradient(engine, geom, grad_output, offset, mask, stats, accum)
    return gathers.to_storage(engine, accum, geom.dtype), grad_offset, grad_mask


def sorted_bytes_per_pair(geom: DCNv3Geometry) -> int:
    """Workspace of the deterministic input gradient per (image, output
    pixel) pair, at most: its 4*G*P bilinear corners, each a key, a weight,
    the sort's buffers and order, and the sorted key
    (:data:`cudcn.backends.cuda.launchers.SORTED_BYTES_PER_CORNER`)."""
    return 4 * geom.group * geom.points * SORTED_BYTES_PER_CORNER


def sorted_chunks(geom: DCNv3Geometry) -> list[slice]:
    """Slices of the flattened (image, output pixel) pairs for the
    deterministic input gradient, each within the workspace budget
    (:func:`cudcn.backends.cuda.gathers.sorted_chunks`: its corners, and 16
    bytes per input pixel and group of every image the chunk touches)."""
    pixels = geom.out_h * geom.out_w
    return gathers.sorted_chunks(geom.batch * pixels, pixels, sorted_bytes_per_pair(geom),
                                 geom.height * geom.width * geom.group)


def _sorted_input_gradient(engine: Engine, geom: DCNv3Geometry, grad_output: Any, offset: Any, mask: Any,
                           stats: Any, accum: Any) -> None:
    """accum += the input gradient, summed per input element in a fixed
    order, chunk by chunk of (image, output pixel) pairs, in order: the
    result depends on the workspace budget and never on the grid. Each
    chunk's arrays go before the next chunk's are made."""
    xp = engine.xp
    dtype = geom.dtype.name
    out_pixels = geom.out_h * geom.out_w
    keys_per_image = geom.height * geom.width * geom.group
    for chunk in sorted_chunks(geom):
        first_item, count = chunk.start * geom.group, (chunk.stop - chunk.start) * geom.group
        first_image, last_image = chunk.start // out_pixels, (chunk.stop - 1) // out_pixels
        segments = (last_image - first_image + 1) * keys_per_image  # also the sentinel key
        entries = 4 * count * geom.points
        index, itype = index_type(engine, entries, segments + 1, offset.size, mask.size, stats.size)
        keys = xp.empty(entries, itype)
        key_weights = xp.empty(entries, kernels.TYPES[dtype].accum_dtype)
        engine.launch(
            "dcnv3_input_keys", dtype, index, grid_stride(engine, "dcnv3_input_keys", count * geom.points),
            [offset, mask, *shape_args(geom), _offset_scale(geom), itype(first_item), itype(count),
             np.int32(geom.softmax), stats, itype(segments), keys, key_weights],
        )
        target = accum[first_image:last_image + 1]  # contiguous: the chunk's images
        gathers.sorted_gather(engine, geom.dtype, keys, key_weights, segments, grad_output, first_item,
                              geom.group_channels, 4 * geom.points, target)
        del keys, key_weights
