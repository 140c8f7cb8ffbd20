"""Multi-scale deformable attention on the GPU: the launchers of kernels/msda.cu.

The same computation as the NumPy backend (:mod:`cudcn.backends.numpy.msda`,
the specification), with the notation of :mod:`cudcn.msda_geometry`. An
*item* is (image, query, head): N*Lq*M of them, each a row of D channels of
the output. The kernels give each item a group of lanes of one warp:

- forward (``msda_forward``): lanes over D in blocks of 16 bytes
  (:func:`forward_lanes`), every (level, point)'s location and weight read
  once per item and broadcast to the group by shuffles, four corner loads in
  flight at once (kernels/sampling.cuh), float32 sums (float64 for float64);
- backward (``msda_backward``): lanes over D one channel each, interleaved
  (:func:`backward_lanes`: enough lanes that a warp's loads and float32
  atomics fill whole 32-byte sectors); location and attention-weight
  gradients by fixed-order shuffle reductions; the value gradient by atomics
  into a zero-filled float32 (float64) accumulator, converted to the dtype
  after (``accum_to_storage``) -- or, with
  :func:`cudcn.config.deterministic_algorithms` on, by sorting every
  bilinear corner by the value element it lands on and summing each
  element's corners in that fixed order (``msda_value_keys``, then
  :func:`cudcn.backends.cuda.gathers.sorted_gather`): bitwise repeatable, in
  chunks of (image, query) pairs whose sort fits the workspace budget.

Lane groups, their launches, the sorted gather and the accumulator's
conversion are shared with DCNv3 (:mod:`cudcn.backends.cuda.gathers`).

The level sizes and starts travel as a small (L, 3) int64 table, copied to
the device asynchronously on CuPy's current stream (``asarray`` stages it
through pinned memory). Every launch goes through the engine
(:mod:`cudcn.backends.cuda.engine`) with 32- or 64-bit indexing chosen per
launch from the sizes involved, on the arrays' device and CuPy's current
stream; nothing waits for the device.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cudcn import config
from cudcn.backends.cuda import gathers, kernels
from cudcn.backends.cuda.engine import Engine, grid_stride
from cudcn.backends.cuda.gathers import group_launch
from cudcn.backends.cuda.launchers import SORTED_BYTES_PER_CORNER, index_type
from cudcn.errors import ArgumentError
from cudcn.msda_geometry import MSDAGeometry


def forward_lanes(geom: MSDAGeometry) -> int:
    """Lanes per item in the forward (:func:`cudcn.backends.cuda.gathers.forward_lanes`)."""
    return gathers.forward_lanes(geom.dtype, geom.channels)


def backward_lanes(geom: MSDAGeometry) -> int:
    """Lanes per item in the backward (:func:`cudcn.backends.cuda.gathers.backward_lanes`)."""
    return gathers.backward_lanes(geom.dtype, geom.channels)


def _level_table(engine: Engine, geom: MSDAGeometry) -> Any:
    """(L, 3) int64 rows (H_l, W_l, s_l) on the engine's device."""
    for level, (height, width) in enumerate(geom.shapes):
        if height * width >= 2**31:
            raise ArgumentError(
                f"level {level} has {height}x{width} = {height * width} pixels; the CUDA kernels "
                f"take fewer than 2^31 pixels per level")
    table = np.array([(h, w, s) for (h, w), s in zip(geom.shapes, geom.starts)], np.int64)
    return engine.xp.asarray(table)


def _items(geom: MSDAGeometry) -> int:
    return geom.batch * geom.queries * geom.heads


def _shape_args(geom: MSDAGeometry, itype: type) -> list:
    """queries, pixels, heads, channels, levels, points: the kernels' shape arguments."""
    return [np.int32(geom.queries), itype(geom.pixels), np.int32(geom.heads), np.int32(geom.channels),
            np.int32(geom.levels), np.int32(geom.points)]


def forward(engine: Engine, geom: MSDAGeometry, value: Any, sampling_locations: Any, attention_weights: Any) -> Any:
    """Output (N, Lq, M*D) in the value's dtype; every element written."""
    xp = engine.xp
    out = xp.empty(geom.output_shape, geom.dtype)
    items = _items(geom)
    if out.size == 0:
        return out
    value, locations, weights = (xp.ascontiguousarray(a) for a in (value, sampling_locations, attention_weights))
    lanes = forward_lanes(geom)
    index, itype = index_type(engine, value.size, locations.size, out.size)
    engine.launch(
        "msda_forward", geom.dtype.name, index, group_launch(engine, "msda_forward", items, lanes),
        [value, _level_table(engine, geom), locations, weights, itype(items), *_shape_args(geom, itype),
         np.int32(lanes), out],
    )
    return out


def backward(engine: Engine, geom: MSDAGeometry, grad_output: Any, value: Any, sampling_locations: Any,
             attention_weights: Any) -> tuple[Any, Any, Any]:
    """Gradients (value, sampling_locations, attention_weights), each in its
    argument's shape and the dtype."""
    xp = engine.xp
    dtype = geom.dtype.name
    types = kernels.TYPES[dtype]
    grad_output, value, locations, weights = (
        xp.ascontiguousarray(a) for a in (grad_output, value, sampling_locations, attention_weights))
    grad_locations = xp.empty(locations.shape, geom.dtype)
    grad_weights = xp.empty(weights.shape, geom.dtype)
    accum = xp.zeros(value.shape, types.accum_dtype)  # the value gradient, summed in float32 (float64)
    items = _items(geom)
    deterministic = config.are_deterministic_algorithms_enabled()
    if items:
        table = _level_table(engine, geom)
        lanes = backward_lanes(geom)
        index, itype = index_type(engine, value.size, locations.size, grad_output.size)
        engine.launch(
            "msda_backward", dtype, index, group_launch(engine, "msda_backward", items, lanes),
            [grad_output, value, table, locations, weights, itype(items), *_shape_args(geom, itype),
             np.int32(lanes), np.int32(not deterministic), accum, grad_locations, grad_weights],
        )
        if deterministic:
            _sorted_value_gradient(engine, geom, grad_output, table, locations, weights, accum)
    return gathers.to_storage(engine, accum, geom.dtype), grad_locations, grad_weights


def sorted_bytes_per_pair(geom: MSDAGeometry) -> int:
    """Workspace of the deterministic value gradient per (image, query)
    pair, at most: its 4*M*L*P bilinear corners, each a key, a weight, the
    sort's buffers and order, and the sorted key
    (:data:`cudcn.backends.cuda.launchers.SORTED_BYTES_PER_CORNER`)."""
    return 4 * geom.heads * geom.levels * geom.points * SORTED_BYTES_PER_CORNER


def sorted_chunks(geom: MSDAGeometry) -> list[slice]:
    """Slices of the flattened (image, query) pairs for the deterministic
    value gradient, each within the workspace budget
    (:func:`cudcn.backends.cuda.gathers.sorted_chunks`: its corners, and 16
    bytes per pixel and head of every image the chunk touches)."""
    return gathers.sorted_chunks(geom.batch * geom.queries, geom.queries, sorted_bytes_per_pair(geom),
                                 geom.pixels * geom.heads)


def _sorted_value_gradient(engine: Engine, geom: MSDAGeometry, grad_output: Any, table: Any, locations: Any,
                           weights: Any, accum: Any) -> None:
    """accum += the value gradient, summed per value element in a fixed
    order: per chunk of pairs (:func:`_sorted_chunk`), in order, so the
    result depends on the workspace budget and never on the grid."""
    for chunk in sorted_chunks(geom):
        _sorted_chunk(engine, geom, chunk, grad_output, table, locations, weights, accum)


def _sorted_chunk(engine: Engine, geom: MSDAGeometry, chunk: slice, grad_output: Any, table: Any, locations: Any,
                  weights: Any, accum: Any) -> None:
    """One chunk of (image, query) pairs: keys and weights of every corner,
    then :func:`cudcn.backends.cuda.gathers.sorted_gather`. Its arrays go
    when it returns, before the next chunk's are made."""
    xp = engine.xp
    dtype = geom.dtype.name
    per_item = geom.levels * geom.points
    first_item, items = chunk.start * geom.heads, (chunk.stop - chunk.start) * geom.heads
    first_image, last_image = chunk.start // geom.queries, (chunk.stop - 1) // geom.queries
    segments = (last_image - first_image + 1) * geom.pixels * geom.heads  # also the sentinel key
    entries = 4 * items * per_item
    index, itype = index_type(engine, entries, segments + 1, locations.size, (first_item + items) * per_item)
    keys = xp.empty(entries, itype)
    key_weights = xp.empty(entries, kernels.TYPES[dtype].accum_dtype)
    engine.launch(
        "msda_value_keys", dtype, index, grid_stride(engine, "msda_value_keys", items * per_item),
        [table, locations, weights, itype(first_item), itype(items), np.int32(geom.queries),
         itype(geom.pixels), np.int32(geom.heads), np.int32(geom.levels), np.int32(geom.points),
         itype(segments), keys, key_weights],
    )
    target = accum[first_image:last_image + 1]  # contiguous: the chunk's images
    gathers.sorted_gather(engine, geom.dtype, keys, key_weights, segments, grad_output, first_item, geom.channels,
                          4 * per_item, target)
