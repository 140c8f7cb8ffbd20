"""Launchers: each allocates its outputs and launches one kernel family.

One function per kernel family of ``kernels/`` (layout passes, im2col,
col2im and its deterministic sorted variant, col2im_coord, the column-free
forward); the cuBLAS products are in :mod:`cudcn.backends.cuda.gemms`. They take an engine
(:mod:`cudcn.backends.cuda.engine`) and a validated geometry, pass shapes as
kernel arguments in the order of ``DCN_SHAPE_PARAMS`` (kernels/dcn_common.cuh),
and choose 32- or 64-bit indexing per launch from the sizes involved.

The sampling kernels (im2col, col2im, col2im_coord) give each sampling point
a group of lanes (:func:`lanes_per_point`) and run over whole warps; the
sorted col2im runs one thread per element. All of these are grid-stride
launches of the engine's block size and block cap
(:func:`cudcn.backends.cuda.engine.grid_stride`). The layout passes
(``to_channels_last``, ``from_channels_last`` and ``layout_copies``, which
does several copies and a zero fill in one launch) walk each copy in units
of their own (:func:`copy_plan`): a 32 x 32 tile through shared memory
where the copy transposes, so that loads and stores both run along
contiguous memory, else 1024 elements in the destination's order; a block
takes one unit at a time, up to the block cap. The column-free forward
launches one block per output tile.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from cudcn import config
from cudcn.backends.cuda import kernels
from cudcn.backends.cuda.engine import MAX_GRID, WARP, Engine, Launch, _grid_stride, grid_stride, kernel_launch
from cudcn.geometry import Geometry


def index_type(engine: Engine, *sizes: int) -> tuple[str, type]:
    """``int`` while every tensor a launch touches, plus one grid stride, fits 31 bits."""
    if max(sizes) + engine.threads < 2**31:
        return "int", np.int32
    return "long long", np.int64


def sampling_points(geom: Geometry, n: int) -> int:
    """Sampling points of n images: (image, output pixel, kernel point, offset group)."""
    return n * geom.out_pixels * geom.kernel_points * geom.offset_groups


def lanes_per_point(geom: Geometry, kernel: str = "deform_im2col") -> int:
    """Lanes of a warp given to one sampling point by a sampling kernel:
    enough for one block of channels each across the offset group's
    channels, a power of two up to 32. A block is 16 bytes: of the input or
    column type for im2col and col2im_coord (``ChannelsPerLane``), of the
    accumulator for col2im (4 float32, 2 float64), whose lanes are laid out
    for its atomics (kernels/dcn_col2im.cu)."""
    if kernel == "deform_col2im":
        per_lane = 16 // np.dtype(kernels.TYPES[geom.dtype_name].accum_dtype).itemsize
    else:
        per_lane = kernels.channels_per_lane(geom.dtype_name)
    blocks = -(-(geom.in_channels // geom.offset_groups) // per_lane)
    return min(WARP, 1 << (blocks - 1).bit_length())


def _sampling_launch(engine: Engine, kernel: str, geom: Geometry, n: int):
    """(points, lanes per point, launch) of a sampling kernel over n images."""
    return _sampling_shape(kernel, geom, n, engine.block, engine.max_blocks)


@functools.lru_cache(maxsize=4096)  # a function of the signature alone, made once
def _sampling_shape(kernel: str, geom: Geometry, n: int, block: int, max_blocks: int):
    points = sampling_points(geom, n)
    lanes = lanes_per_point(geom, kernel)
    warps = -(-points * lanes // WARP)
    return points, lanes, _grid_stride(kernel, warps * WARP, block, max_blocks)


@functools.lru_cache(maxsize=4096)  # a function of the signature alone, made once
def shape_args(geom: Geometry, batch: int, groups: int) -> tuple[np.int32, ...]:
    """The kernels' DCN_SHAPE_PARAMS, in order (kernels/dcn_common.cuh)."""
    return tuple(
        np.int32(v)
        for v in (
            batch, geom.in_channels, geom.height, geom.width,
            geom.kernel_h, geom.kernel_w, geom.stride_h, geom.stride_w,
            geom.pad_h, geom.pad_w, geom.dil_h, geom.dil_w,
            geom.out_h, geom.out_w, geom.offset_groups, groups,
        )
    )


def mask_args(mask: Any, offset: Any) -> list[Any]:
    # Without a mask the kernels never read the pointer; the offset stands in
    # so that every launch passes a valid device pointer.
    return [offset if mask is None else mask, np.int32(mask is not None)]


def layout_launch(engine: Engine, kernel: str, n: int, channels: int, pixels: int) -> Launch:
    """A launch of a layout pass (``to_channels_last``, ``from_channels_last``)
    over n images of channels x pixels: a block per tile of
    :data:`~cudcn.backends.cuda.kernels.LAYOUT_TILE` squared elements (a
    single channel or pixel is a plain copy, a block per
    :data:`~cudcn.backends.cuda.kernels.LAYOUT_CHUNK` elements): the walk
    of :func:`copy_plan`, which the kernels take too."""
    rows, cols = (channels, pixels) if kernel == "to_channels_last" else (pixels, channels)
    plan = copy_plan(view((1, n, cols, rows), (0, rows * cols, 1, cols)))
    return _units_launch(engine, kernel, plan.units)


def channels_last(engine: Engine, geom: Geometry, input: Any, out: Any = None) -> Any:
    """input (n, C, H, W) -> (n, H*W, C), same dtype: into ``out`` (contiguous) when given."""
    xp = engine.xp
    input = xp.ascontiguousarray(input)
    n, pixels = input.shape[0], geom.height * geom.width
    if out is None:
        out = xp.empty((n, pixels, geom.in_channels), input.dtype)
    if out.size:
        index, itype = index_type(engine, out.size)
        engine.launch(
            "to_channels_last", geom.dtype_name, index,
            layout_launch(engine, "to_channels_last", n, geom.in_channels, pixels),
            [input, itype(out.size), np.int32(geom.in_channels), np.int32(pixels), out],
        )
    return out


class View(NamedTuple):
    """How one copy of :func:`layout_copies` reads its source.

    The destination is contiguous, of shape ``shape`` (four axes) and
    ``size`` elements; its element (a, b, c, d) is element
    ``a*s0 + b*s1 + c*s2 + d*s3`` of the contiguous source,
    (s0, s1, s2, s3) = ``strides`` (in elements): a transpose, a broadcast
    (stride 0) or a plain copy. Make one with :func:`view`.
    """

    shape: tuple[int, int, int, int]
    strides: tuple[int, int, int, int]
    size: int


def view(shape: tuple[int, int, int, int], strides: tuple[int, int, int, int]) -> View:
    return View(shape, strides, math.prod(shape))


# The views of the algorithms' layout passes: functions of the geometry
# alone, made once per signature.


@functools.lru_cache(maxsize=1024)
def channels_last_view(geom: Geometry, n: int) -> View:
    """(n, H*W, C) from n images (n, C, H, W)."""
    pixels, channels = geom.height * geom.width, geom.in_channels
    return view((1, n, pixels, channels), (0, channels * pixels, 1, pixels))


@functools.lru_cache(maxsize=1024)
def from_channels_last_view(geom: Geometry, n: int) -> View:
    """(n, C, H, W) from n images channels-last (n, H*W, C)."""
    pixels, channels = geom.height * geom.width, geom.in_channels
    return view((1, n, channels, pixels), (0, pixels * channels, 1, channels))


@functools.lru_cache(maxsize=1024)
def weight_matrix_view(geom: Geometry) -> View:
    """The GEMM operand (groups, K, C/groups, O/groups) (``layout.weight_matrix``)
    from the weight (O, C/groups, kh, kw), i.e. (groups, O/groups, C/groups, K)."""
    groups, K = geom.groups, geom.kernel_points
    per_group_out, group_channels = geom.out_channels // groups, geom.in_channels // groups
    return view((groups, K, group_channels, per_group_out),
                (per_group_out * group_channels * K, 1, K, group_channels * K))


@functools.lru_cache(maxsize=1024)
def weight_from_matrix_view(geom: Geometry) -> View:
    """The weight's layout (groups, O/groups, C/groups, K) from the transposed
    GEMM result (groups, O/groups, K, C/groups)."""
    groups, K = geom.groups, geom.kernel_points
    per_group_out, group_channels = geom.out_channels // groups, geom.in_channels // groups
    return view((groups, per_group_out, group_channels, K),
                (per_group_out * K * group_channels, K * group_channels, 1, group_channels))


@functools.lru_cache(maxsize=1024)
def rows_view(geom: Geometry, n: int) -> View:
    """GEMM rows (groups, n, Ho*Wo, O/groups) from n images of grad_output (n, O, Ho, Wo)."""
    groups, L = geom.groups, geom.out_pixels
    per_group_out = geom.out_channels // groups
    return view((groups, n, L, per_group_out), (per_group_out * L, groups * per_group_out * L, 1, L))


@functools.lru_cache(maxsize=1024)
def bias_view(geom: Geometry, n: int) -> View:
    """n images' output (n, O, Ho, Wo) from the bias (O,), broadcast."""
    return view((1, n, geom.out_channels, geom.out_pixels), (0, 0, 1, 0))


@functools.lru_cache(maxsize=1024)
def flat_view(size: int) -> View:
    """A plain copy of ``size`` elements (a conversion of dtype)."""
    return view((1, 1, 1, size), (0, 0, 0, 1))


class CopyPlan(NamedTuple):
    """How ``layout_copies`` walks one copy: ``LayoutCopy``'s fields in
    kernels/dcn_layout.cu, and its units of work.

    The destination's axes in the order of the walk, (a, b, c, d), d the
    destination's contiguous one: their ``sizes``, the ``source`` strides and
    the ``destination`` strides of a, b and c (d's is 1). ``tiled``: c is the
    source's contiguous axis, and the copy goes through 32 x 32 tiles in
    shared memory, each of 32 consecutive (b, c) positions by 32 of d; else
    the destination is walked in order (a plain copy, a conversion, a
    broadcast), ``kernels.LAYOUT_CHUNK`` elements a unit.
    """

    tiled: bool
    sizes: tuple[int, int, int, int]
    source: tuple[int, int, int, int]
    destination: tuple[int, int, int]
    units: int


@functools.lru_cache(maxsize=1024)
def copy_plan(view: View) -> CopyPlan:
    """The walk of a copy through ``view``: tiled where it transposes -- the
    destination's contiguous axis is strided in the source, and another axis
    is the source's contiguous one -- else in destination order.

    Tiled, the source's contiguous axis is c, and b is an axis that carries
    the source's run on (its stride c's size: a tile row then reads 32
    consecutive elements even where c is shorter, as the weight's kernel
    points are) or else the destination's inner one of the other two.
    """
    sizes, strides = view.shape, view.strides
    if max(sizes) + kernels.LAYOUT_CHUNK >= 2**31:  # the kernel carries positions along in 32-bit ints
        raise ValueError(f"layout_copies takes axes of fewer than {2**31 - kernels.LAYOUT_CHUNK} elements, "
                         f"got {sizes}")
    natural = (sizes[1] * sizes[2] * sizes[3], sizes[2] * sizes[3], sizes[3])
    contiguous = [axis for axis in range(3) if strides[axis] == 1 and sizes[axis] > 1]
    tile = kernels.LAYOUT_TILE
    if sizes[3] > 1 and strides[3] not in (0, 1) and contiguous:
        c = contiguous[-1]
        others = [axis for axis in range(3) if axis != c]
        continuing = [axis for axis in others if sizes[axis] > 1 and strides[axis] == sizes[c]]
        b = continuing[-1] if continuing else others[-1]
        a = others[0] if b == others[1] else others[1]
        order = (a, b, c)
        units = sizes[a] * -(-sizes[b] * sizes[c] // tile) * -(-sizes[3] // tile)
        tiled = True
    else:
        order, units, tiled = (0, 1, 2), -(-view.size // kernels.LAYOUT_CHUNK), False
    return CopyPlan(tiled, (*(sizes[axis] for axis in order), sizes[3]),
                    (*(strides[axis] for axis in order), strides[3]), tuple(natural[axis] for axis in order), units)


def _units_launch(engine: Engine, kernel: str, units: int) -> Launch:
    """A launch of a layout kernel: a block per unit, capped at the engine's
    block cap (the kernels loop over the rest)."""
    return kernel_launch(kernel, (min(max(units, 1), engine.max_blocks), 1, 1), engine.block)


#: At most this many copies in one launch of :func:`layout_copies`.
LAYOUT_COPIES = 3


#: The arguments of a copy slot that copies nothing.
_NO_COPY = CopyPlan(False, (0, 1, 1, 1), (0, 0, 0, 0), (0, 0, 0), 0)


@functools.lru_cache(maxsize=1024)
def _layout_scalars(plans: tuple[CopyPlan, ...], zero_words: int, itype: type) -> tuple:
    """layout_copies' scalar arguments: each slot's ``LayoutCopy`` fields
    (whether tiled, sizes, source strides, destination strides), then the
    zero fill's words."""
    scalars: list[Any] = []
    for slot in range(LAYOUT_COPIES):
        plan = plans[slot] if slot < len(plans) else _NO_COPY
        scalars += [np.int32(plan.tiled), *map(np.int32, plan.sizes), *map(itype, plan.source),
                    *map(itype, plan.destination)]
    return (*scalars, itype(zero_words))


def layout_copies(engine: Engine, geom: Geometry, copies: Sequence[tuple[Any, View, Any]], zero: Any = None,
                  from_accumulator: bool = False) -> None:
    """Each ``(source, view, destination)`` copy, and ``zero`` filled with
    zero bits, in one launch (``layout_copies`` in kernels/dcn_layout.cu).

    At most :data:`LAYOUT_COPIES` copies; sources and destinations are
    contiguous, a destination has its view's size. The arrays are in the
    call's dtype, or, with ``from_accumulator``, the sources in its
    accumulator dtype (float32, float64) and the destinations in the dtype.
    ``zero`` is any float array (float32 or float64 accumulators). Copies of
    nothing are left out; with nothing left, nothing is launched. Each copy
    is walked as :func:`copy_plan` says, a transpose through tiles; the
    launch's blocks share out the units of all of them.
    """
    copies = [copy for copy in copies if copy[1].size]
    zero_words = 0 if zero is None else zero.nbytes // 4
    if not copies and not zero_words:
        return
    if len(copies) > LAYOUT_COPIES:
        raise ValueError(f"layout_copies takes at most {LAYOUT_COPIES} copies, got {len(copies)}")
    types = kernels.TYPES[geom.dtype_name]
    source_dtype = types.accum_dtype if from_accumulator else geom.dtype_name
    for source, view, destination in copies:
        if source.dtype != source_dtype or destination.dtype != geom.dtype or destination.size != view.size:
            raise TypeError(f"layout_copies copies {source_dtype} into {geom.dtype_name} arrays of the view's "
                            f"size {view.size}, got {source.dtype} into {destination.dtype} of {destination.size}")
    total = sum(view.size for _, view, _ in copies) + zero_words
    index, itype = index_type(engine, total, *(source.size for source, _, _ in copies))
    placeholder = copies[0][0] if copies else zero  # a valid pointer for each unused slot
    arrays: list[Any] = []
    for slot in range(LAYOUT_COPIES):
        arrays += copies[slot][::2] if slot < len(copies) else (placeholder, placeholder)
    kernel = "layout_copies_from_accum" if from_accumulator else "layout_copies"
    plans = tuple(copy_plan(view) for _, view, _ in copies)
    units = sum(plan.units for plan in plans) + -(-zero_words // kernels.LAYOUT_CHUNK)
    engine.launch(
        kernel, geom.dtype_name, index, _units_launch(engine, kernel, units),
        [*arrays, placeholder if zero is None else zero, *_layout_scalars(plans, zero_words, itype)],
    )


def im2col(engine: Engine, geom: Geometry, pixels: Any, offset: Any, mask: Any, groups: int) -> Any:
    """Columns (groups, n*L, K*C/groups) in the column dtype.

    pixels: (n, H*W, C) channels-last input; offset (n, 2GK, Ho, Wo) and mask
    (n, GK, Ho, Wo) or None, contiguous.
    """
    n = pixels.shape[0]
    per_group = geom.kernel_points * geom.in_channels // groups
    columns = engine.xp.empty(
        (groups, n * geom.out_pixels, per_group), kernels.TYPES[geom.dtype_name].column_dtype
    )
    if columns.size:
        points, lanes, launch = _sampling_launch(engine, "deform_im2col", geom, n)
        index, itype = index_type(engine, columns.size, pixels.size, offset.size)
        engine.launch(
            "deform_im2col", geom.dtype_name, index, launch,
            [pixels, offset, *mask_args(mask, offset), *shape_args(geom, n, groups),
             itype(points), np.int32(lanes), columns],
        )
    return columns


def col2im(engine: Engine, geom: Geometry, columns: Any, offset: Any, mask: Any, groups: int, out: Any) -> None:
    """Scatter column gradients (groups, n*L, K*C/groups) into out (n, C, H, W).

    Float atomics by default; with :func:`cudcn.config.are_deterministic_algorithms_enabled`
    the sorted, atomic-free gather (:func:`col2im_sorted`).
    """
    xp = engine.xp
    n = offset.shape[0]
    types = kernels.TYPES[geom.dtype_name]
    pixels = geom.height * geom.width
    if n * pixels * geom.in_channels == 0:
        return
    accum = None
    if not config.are_deterministic_algorithms_enabled():
        accum = xp.zeros((n, pixels, geom.in_channels), types.accum_dtype)
    accum = scatter_columns(engine, geom, columns, offset, mask, groups, accum)
    index, itype = index_type(engine, accum.size)
    engine.launch(
        "from_channels_last", geom.dtype_name, index,
        layout_launch(engine, "from_channels_last", n, geom.in_channels, pixels),
        [accum, itype(accum.size), np.int32(geom.in_channels), np.int32(pixels), out],
    )


def scatter_columns(engine: Engine, geom: Geometry, columns: Any, offset: Any, mask: Any, groups: int,
                    accum: Any) -> Any:
    """The input gradient (n, H*W, C) in the accumulator dtype from column
    gradients (groups, n*L, K*C/groups): float atomics into ``accum``, zero-filled
    by the caller; with :func:`cudcn.config.are_deterministic_algorithms_enabled`,
    the sorted, atomic-free gather (:func:`col2im_sorted`) into an array of its
    own (``accum`` is then unused, and may be None)."""
    if config.are_deterministic_algorithms_enabled():
        return col2im_sorted(engine, geom, columns, offset, mask, groups)
    n = offset.shape[0]
    if columns.size:
        points, lanes, launch = _sampling_launch(engine, "deform_col2im", geom, n)
        index, itype = index_type(engine, columns.size, accum.size, offset.size)
        engine.launch(
            "deform_col2im", geom.dtype_name, index, launch,
            [columns, offset, *mask_args(mask, offset), *shape_args(geom, n, groups),
             itype(points), np.int32(lanes), accum],
        )
    return accum


#: Bytes of device memory :func:`col2im_sorted` takes per bilinear corner, at
#: most (64-bit keys and float64 weights): the keys and weights, the argsort's
#: copy of the keys, its int64 order and the radix sort's second buffer of
#: each, and the sorted keys that searchsorted reads; 36 bytes with 32-bit
#: keys and float32 weights.
SORTED_BYTES_PER_CORNER = 4 * 8 + 8 + 2 * 8


def col2im_sorted_bytes_per_image(geom: Geometry) -> int:
    """Upper bound of :func:`col2im_sorted`'s workspace per image of a chunk.

    Counted in the workspace budget when the deterministic path runs, so
    that a chunk's sort fits it beside the columns. Its corners (4 per
    offset group, kernel point and output pixel) and one int64 segment
    start per offset group and input pixel.
    """
    corners = 4 * geom.offset_groups * geom.kernel_points * geom.out_pixels
    return corners * SORTED_BYTES_PER_CORNER + 8 * geom.offset_groups * geom.height * geom.width


def col2im_sorted(engine: Engine, geom: Geometry, columns: Any, offset: Any, mask: Any, groups: int) -> Any:
    """Input gradient (n, H*W, C) in the accumulator dtype, bitwise repeatable.

    Keys and weights of every bilinear corner (4 per image, offset group,
    kernel point and output pixel), a stable argsort of the keys, segment
    starts by searchsorted, and a gather that sums each segment in sorted
    order (kernels/dcn_col2im_sorted.cu). The keys have the index type of
    their launch: int32 whenever keys and entries fit 31 bits.
    """
    xp = engine.xp
    n = offset.shape[0]
    types = kernels.TYPES[geom.dtype_name]
    pixels = geom.height * geom.width
    points = n * geom.offset_groups * geom.kernel_points * geom.out_pixels
    entries = 4 * points
    segments = n * geom.offset_groups * pixels  # also the sentinel key
    index, itype = index_type(engine, entries, offset.size, segments + 1)
    keys = xp.empty(entries, itype)
    weights = xp.empty(entries, types.accum_dtype)
    if points:
        engine.launch(
            "deform_col2im_keys", geom.dtype_name, index, grid_stride(engine, "deform_col2im_keys", points),
            [offset, *mask_args(mask, offset), *shape_args(geom, n, groups), itype(points), keys, weights],
        )
    # A stable sort keeps the entries of one key in entry order: one result,
    # however the sort runs.
    order = xp.argsort(keys, kind="stable")
    starts = xp.searchsorted(keys[order], xp.arange(segments + 1, dtype=itype), side="left")
    accum = xp.empty((n, pixels, geom.in_channels), types.accum_dtype)
    index, itype = index_type(engine, columns.size, accum.size, entries, segments + 1)
    engine.launch(
        "deform_col2im_gather", geom.dtype_name, index, grid_stride(engine, "deform_col2im_gather", accum.size),
        [columns, order.astype(np.int64, copy=False), starts.astype(np.int64, copy=False), weights,
         *shape_args(geom, n, groups), itype(accum.size), accum],
    )
    return accum


def col2im_coord(
    engine: Engine, geom: Geometry, columns: Any, pixels: Any, offset: Any, mask: Any,
    groups: int, grad_offset: Any, grad_mask: Any,
) -> None:
    """Offset (n, 2GK, Ho, Wo) and mask (n, GK, Ho, Wo) gradients into the given arrays."""
    n = offset.shape[0]
    if sampling_points(geom, n) == 0:
        return
    points, lanes, launch = _sampling_launch(engine, "deform_col2im_coord", geom, n)
    index, itype = index_type(engine, columns.size, pixels.size, offset.size)
    engine.launch(
        "deform_col2im_coord", geom.dtype_name, index, launch,
        [columns, pixels, offset, *mask_args(mask, offset), *shape_args(geom, n, groups),
         itype(points), np.int32(lanes), grad_offset, grad_offset if grad_mask is None else grad_mask],
    )


def fused_weight(engine: Engine, geom: Geometry, weight: Any) -> Any:
    """The weight (O, C/groups, kh, kw) as the column-free kernels read it:
    (groups, K, O/groups, C/groups), contiguous, same dtype -- a slice's
    weights for one output channel are consecutive."""
    groups, K = geom.groups, geom.kernel_points
    per_group_out, group_channels = geom.out_channels // groups, geom.in_channels // groups
    w = weight.reshape(groups, per_group_out, group_channels, K).transpose(0, 3, 1, 2)
    return engine.xp.ascontiguousarray(w)


#: A column-free launch should have at least this many blocks: 4 resident
#: blocks on each of an H100's 132 SMs. A constant, never the device's own
#: count, so that chunks and splits -- and with them the order of every sum --
#: depend on the geometry and the workspace budget alone.
FUSED_TARGET_BLOCKS = 4 * 132
#: The column-free kernels count pixels and work units in 32-bit ints
#: (element offsets take the launch's index type); below this, with room for
#: a grid-stride step.
FUSED_MAX_COUNT = 2**31 - 2**24


def fused_chunks(batch: int, fit: int, wanted: int, allowed: int) -> list[slice]:
    """The batch in chunks of images, one launch each, their sizes differing
    by one at most: chunks of ``fit`` images (what a base share of the
    workspace holds) where that is at least ``wanted`` (what a launch of
    FUSED_TARGET_BLOCKS blocks needs); else as many chunks as give each
    about ``wanted`` images (the nearest count), none above ``allowed`` (the
    most the workspace lets a chunk take for that). 16 images, 3 wanted, 4
    allowed: 3, 3, 3, 3, 4; 32 images, 17 wanted: 16, 16."""
    least = max(1, min(wanted, allowed))
    if fit >= least:
        count = -(-batch // fit)
    else:
        count = max(1, (2 * batch + least) // (2 * least), -(-batch // max(allowed, 1)))
    count = min(count, max(batch, 1))
    return [slice(batch * i // count, batch * (i + 1) // count) for i in range(count)]


def fused_grid(geom: Geometry, n: int) -> tuple[int, int, int]:
    """Blocks of the column-free forward over n images: (pixel tiles of the
    flattened n*Ho*Wo, groups x output-channel tiles of a group, 1)."""
    pixels = n * geom.out_pixels
    out_tiles = -(-(geom.out_channels // geom.groups) // kernels.FUSED_OUT_CHANNELS)
    return -(-pixels // kernels.FUSED_PIXELS), geom.groups * out_tiles, 1


def fused_fits(geom: Geometry) -> str | None:
    """None when the column-free kernels can take this geometry (the forward's
    grid within CUDA's limits; pixels and work units countable in 32 bits),
    else why not."""
    _, y, _ = fused_grid(geom, 1)
    if y > MAX_GRID[1]:
        return f"groups x output-channel tiles = {y} exceeds the grid's {MAX_GRID[1]} rows"
    pixels = geom.batch * geom.out_pixels
    units = -(-pixels // kernels.FUSED_PIXELS) * geom.kernel_points * geom.offset_groups
    if max(pixels, units) >= FUSED_MAX_COUNT:
        return (f"{pixels} output pixels ({units} work units of 64) exceed the column-free kernels' "
                f"32-bit counts (at most {FUSED_MAX_COUNT - 1})")
    return None


def fused_forward(
    engine: Engine, geom: Geometry, kernel: str, pixels: Any, offset: Any, mask: Any, weight: Any,
    bias: Any, out: Any,
) -> None:
    """out (n, O, Ho, Wo) = the forward of n images, bias included, by a column-free kernel.

    kernel: "deform_fused_forward" (tensor cores) or "deform_fused_forward_fma";
    pixels: (n, H*W, C) channels-last input; offset (n, 2GK, Ho, Wo) and mask
    (n, GK, Ho, Wo) or None, contiguous; weight: :func:`fused_weight`; bias
    (O,) or None; out: contiguous, every element written.
    """
    n = pixels.shape[0]
    if out.size == 0:
        return
    grid = fused_grid(geom, n)
    if grid[0] > MAX_GRID[0]:
        raise ValueError(f"{n} images of {geom.out_pixels} output pixels need {grid[0]} pixel tiles, "
                         f"more than a grid has ({MAX_GRID[0]}): take fewer images per launch")
    index, _ = index_type(engine, pixels.size, offset.size, out.size, weight.size, n * geom.out_pixels)
    engine.launch(
        kernel, geom.dtype_name, index, kernel_launch(kernel, grid, engine.block),
        [pixels, offset, *mask_args(mask, offset), weight, weight if bias is None else bias,
         np.int32(bias is not None), *shape_args(geom, n, geom.groups), np.int32(geom.out_channels), out],
    )
