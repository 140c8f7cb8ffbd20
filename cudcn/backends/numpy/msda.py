"""NumPy backend: multi-scale deformable attention (MSDA) as a sparse sampling matrix.

This module is the readable specification of Deformable DETR's
``ms_deform_attn_core_pytorch``. With the notation of
:mod:`cudcn.msda_geometry`::

    out[n, q, m*D + d] = sum_{l, p} a[n, q, m, l, p] * bilinear(value_l[n, :, :, m, d], y, x)

    x = sampling_locations[n, q, m, l, p, 0] * W_l - 0.5
    y = sampling_locations[n, q, m, l, p, 1] * H_l - 0.5
    value_l[n, r, c, m, d] = value[n, s_l + r*W_l + c, m, d]     (H_l, W_l) = spatial_shapes[l]

with a = attention_weights (applied as given: no softmax here). Locations
are normalised, (0, 0) the top-left corner of a level and (1, 1) its
bottom-right corner, so the pixel coordinates are those of
``grid_sample(align_corners=False)`` on 2*location - 1. ``bilinear`` is the
shared core's (:mod:`cudcn.backends.numpy.sampling`): a pixel outside the
level counts 0 (``padding_mode="zeros"``), a point with y <= -1, y >= H_l,
x <= -1 or x >= W_l (or a non-finite location) counts 0 as a whole, and at
an integer pixel coordinate the derivative is the one-sided one towards +1.

Sampling is one sparse matrix
-----------------------------
- X is the value as (rows, D), head-major: a row per (image, head, pixel),
  row n*(M*S + 1) + m*S + s holding value[n, s, m, :], and after each
  image's M*S rows one zero row, the "outside" row of the core. A point of
  level l, head m reads rows m*S + s_l + r*W_l + c of its image: a head's
  pixels are contiguous, so neighbouring corners are neighbouring rows.
- S has a row per (image, query, head), N*Lq*M rows, and one point per
  (level, point), L*P points summed in each row: 4*L*P entries, the
  bilinear weights of the four corners times the attention weight.
- The output is S·X: (N*Lq*M, D), the output (N, Lq, M*D) as it lies in
  memory. The block-sum over (level, point) is the CSR row itself: no
  (point, channel) intermediate is ever formed.

Within a part of the work (below) the rows of S are ordered head first,
(m, then image and query), so that consecutive rows read one head's pixels
(a few MB instead of all heads'); the part's S·X is transposed into place.

Gradients, with G = grad_output seen as (N*Lq*M, D):

- value: Sᵀ·G (the zero rows dropped);
- with the corner products ``s[c, point] = <G[row], X[corner c]>``, the core
  gives d/dy, d/dx (times the attention weight) and d/da per point
  (:func:`cudcn.backends.numpy.sampling.location_gradients`);
- sampling_locations: d/dx * W_l and d/dy * H_l (the chain rule of
  x = u*W_l - 0.5); attention_weights: d/da.

Work and memory: the (image, query) pairs are processed in chunks whose S
and per-point arrays (about 100 bytes per point, :data:`_BYTES_PER_POINT`)
fit the workspace budget (:mod:`cudcn.config`), each chunk shared out among
threads in parts (:mod:`cudcn.backends.numpy.parallel`). A part reads only
the images its queries belong to; its value gradient covers those images,
and the parts' are added in a fixed order, so results are bitwise
repeatable on a given number of CPUs. Beyond the arguments and results:
X (the value in the compute dtype), and per part its S and the corner rows
gathered a block at a time. float16 and bfloat16 compute in float32.
"""

from __future__ import annotations

import numpy as np

from cudcn.backends.numpy import parallel
from cudcn.backends.numpy.sampling import Sampling, compute_dtype, corner_products, location_gradients, sample
from cudcn.config import images_per_chunk
from cudcn.msda_geometry import MSDAGeometry

#: Bytes a point costs while its chunk runs: S's four indices and values,
#: the fractions and weight, the corner products and the temporaries of
#: building S (float32; float64 counts the same, a little generously).
_BYTES_PER_POINT = 100

#: Fewest points worth a thread of their own.
_MIN_PART_POINTS = 2**13


def _pixel_rows(geom: MSDAGeometry, value: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """X: value (N, S, M, D) head-major as (N, M*S + 1, D), a zero row ending each image."""
    n, rows = geom.batch, geom.heads * geom.pixels
    pixels = np.empty((n, rows + 1, geom.channels), dtype)
    pixels[:, :rows].reshape(n, geom.heads, geom.pixels, geom.channels)[...] = value.transpose(0, 2, 1, 3)
    pixels[:, rows] = 0
    return pixels


def _level_sizes(geom: MSDAGeometry, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(H_l, W_l) as two (L, 1) arrays, to broadcast over (..., L, P)."""
    sizes = np.array(geom.shapes, dtype).reshape(geom.levels, 2, 1)
    return sizes[:, 0], sizes[:, 1]


def _pairs(geom: MSDAGeometry, *arrays: np.ndarray) -> list[np.ndarray]:
    """Each array (N, Lq, M, ...) as (M, N*Lq, ...): heads first, (image, query) pairs flattened."""
    pairs = geom.batch * geom.queries
    return [a.reshape(pairs, geom.heads, *a.shape[3:]).swapaxes(0, 1) for a in arrays]


def _sampling(geom: MSDAGeometry, pairs: slice, locations, weights, dtype: np.dtype) -> tuple[Sampling, slice]:
    """S of the (image, query) ``pairs``, rows (head, pair); and the images
    they read: S's columns are those images' rows of X. locations and
    weights as :func:`_pairs` gives them."""
    M, L, P = geom.heads, geom.levels, geom.points
    locations, weights = locations[:, pairs], weights[:, pairs]
    images = slice(pairs.start // geom.queries, (pairs.stop - 1) // geom.queries + 1)

    # Points (M, pairs, L, P) in that order in memory, as S's rows want them.
    heights, widths = _level_sizes(geom, dtype)
    x = np.multiply(locations[..., 0], widths, dtype=dtype, order="C")
    x -= 0.5
    y = np.multiply(locations[..., 1], heights, dtype=dtype, order="C")
    y -= 0.5

    # Row of X of pixel (0, 0) of level l, head m, in each pair's image.
    image_rows = M * geom.pixels + 1
    image = np.arange(pairs.start, pairs.stop) // geom.queries - images.start
    first = (image[:, None, None] * image_rows + np.arange(M)[:, None, None, None] * geom.pixels
             + np.array(geom.starts)[:, None])
    outside = (images.stop - images.start) * image_rows - 1
    heights, widths = _level_sizes(geom, np.int64)
    return sample(y, x, heights, widths, first, 1, outside, weights, L * P), images


def _chunks(geom: MSDAGeometry) -> list[slice]:
    """Slices of the flattened (image, query) pairs whose points fit the workspace budget."""
    pairs = geom.batch * geom.queries
    step = images_per_chunk(geom.heads * geom.levels * geom.points * _BYTES_PER_POINT, pairs)
    return [slice(s, min(s + step, pairs)) for s in range(0, pairs, step)]


def _parts(geom: MSDAGeometry, chunk: slice) -> list[slice]:
    points = (chunk.stop - chunk.start) * geom.heads * geom.levels * geom.points
    return parallel.parts(range(chunk.start, chunk.stop), points, _MIN_PART_POINTS)


def forward(geom: MSDAGeometry, value, sampling_locations, attention_weights) -> np.ndarray:
    """Output (N, Lq, M*D) in the value's dtype."""
    dtype = compute_dtype(geom.dtype)
    pixels = _pixel_rows(geom, value, dtype)
    locations, weights = _pairs(geom, sampling_locations, attention_weights)
    out = np.empty((geom.batch * geom.queries, geom.heads, geom.channels), dtype)

    def run(part: slice) -> None:
        sampling, images = _sampling(geom, part, locations, weights, dtype)
        rows = sampling.matrix @ pixels[images].reshape(-1, geom.channels)  # (M*pairs, D)
        out[part] = rows.reshape(geom.heads, -1, geom.channels).swapaxes(0, 1)

    for chunk in _chunks(geom):
        parallel.in_threads(run, _parts(geom, chunk))
    return out.reshape(geom.output_shape).astype(geom.dtype, copy=False)


def backward(geom: MSDAGeometry, grad_output, value, sampling_locations, attention_weights):
    """Gradients (value, sampling_locations, attention_weights), each in its argument's shape and dtype."""
    dtype = compute_dtype(geom.dtype)
    M, L, P, D = geom.heads, geom.levels, geom.points, geom.channels
    pixels = _pixel_rows(geom, value, dtype)
    locations, weights, grad_rows = _pairs(
        geom, sampling_locations, attention_weights, grad_output.reshape(geom.batch, geom.queries, M, D))
    grad_value = np.zeros(value.shape, dtype)
    grad_locations = np.empty((geom.batch * geom.queries, M, L, P, 2), dtype)
    grad_weights = np.empty((geom.batch * geom.queries, M, L, P), dtype)
    heights, widths = _level_sizes(geom, dtype)

    def run(part: slice):
        sampling, images = _sampling(geom, part, locations, weights, dtype)
        x = pixels[images].reshape(-1, D)
        g = np.ascontiguousarray(grad_rows[:, part], dtype).reshape(-1, D)  # rows (head, pair)
        grad_y, grad_x, grad_a = location_gradients(sampling, corner_products(sampling, g, x))
        shape = (M, part.stop - part.start, L, P)
        np.multiply(grad_x.reshape(shape), widths, out=grad_locations[part, ..., 0].swapaxes(0, 1))
        np.multiply(grad_y.reshape(shape), heights, out=grad_locations[part, ..., 1].swapaxes(0, 1))
        grad_weights[part] = grad_a.reshape(shape).swapaxes(0, 1)
        return images, (sampling.matrix.T @ g).reshape(images.stop - images.start, -1, D)

    for chunk in _chunks(geom):
        for images, part_grad in parallel.in_threads(run, _parts(geom, chunk)):
            # X's rows (head, pixel) back to the value's (pixel, head), summed in a fixed order.
            part_grad = part_grad[:, :-1].reshape(-1, M, geom.pixels, D).swapaxes(1, 2)
            grad_value[images] += part_grad
    return (
        grad_value.astype(geom.dtype, copy=False),
        grad_locations.reshape(sampling_locations.shape).astype(geom.dtype, copy=False),
        grad_weights.reshape(attention_weights.shape).astype(geom.dtype, copy=False),
    )
