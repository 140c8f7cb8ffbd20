"""NumPy backend: DCNv3 and DCNv4 as a sparse sampling matrix.

This module is the readable specification of InternImage's DCNv3 operator
(``dcnv3_core_pytorch``, with the padding of its CUDA op) and of DCNv4's,
which is the same operator with its offsets and mask packed in one array.
With the notation of :mod:`cudcn.dcnv3_geometry`, everything channels-last::

    out[n, h, w, g*D + d] = sum_p mask[n, h, w, g*P + p] * bilinear(input[n, :, :, g*D + d], y, x)

    x = w*stride_w - pad_w + c_w + (i_p*dil_w - c_w + offset[n, h, w, g*2P + 2p]    ) * offset_scale
    y = h*stride_h - pad_h + c_h + (j_p*dil_h - c_h + offset[n, h, w, g*2P + 2p + 1]) * offset_scale
    c_w = dil_w*(kw - 1) // 2,   c_h = dil_h*(kh - 1) // 2

- Point p is kernel column i_p and row j_p, **w-major**: p runs over i
  (0..kw-1, outer) and j (0..kh-1, inner), ``p = i*kh + j``; with
  remove_center the centre (kw//2, kh//2) is skipped and the points after
  it move up by one. Offsets are **(x, y)** pairs.
- (c_h + h*stride_h, c_w + w*stride_w) is the reference point in the padded
  input, the centre of the kernel window (for an even kernel, the point
  left of and above the middle); offset_scale scales the kernel grid around
  it and the offset, not the reference point itself.
- The mask is applied as given (the DCNv3 module's softmax over P is the
  module's, not the operator's); the sum is depthwise: group g's points
  sample only group g's D channels.
- Optionally (``geom.softmax``, DCNv3 only, off by default) the operator
  takes the module's softmax into itself: the P mask values of each (pixel,
  group) become ``softmax(m)_p = exp(m_p - max m) / sum_q exp(m_q - max m)``
  in the compute dtype before use, and the mask gradient is the one of
  the values given (the softmax's Jacobian applied:
  ``s_p * (d_p - sum_q s_q d_q)`` with d the gradient by the softmaxed mask).
  The same as applying the softmax to the mask first and calling the
  operator without it.
- ``bilinear`` is the shared core's (:mod:`cudcn.backends.numpy.sampling`):
  a pixel outside the input counts 0, a point with y <= -1, y >= H,
  x <= -1 or x >= W (or a non-finite offset) counts 0 as a whole, and at an
  integer coordinate the derivative is the one-sided one towards +1, also
  at -1, where the value is 0 but the slope towards row (column) 0 is not.

DCNv4: offset_mask (N, Ho, Wo, K8) holds for each group a block of 3P
values, the 2P offsets (x, y) then the P mask values, the G blocks back to
back, and entries G*3P .. K8-1 unread (K8 a multiple of 8). The backend
reads it through views: offsets ``offset_mask[..., :G*3P]`` seen as
(N, Ho, Wo, G, 3P), ``[..., :2P]`` and mask ``[..., 2P:]`` -- no copy. Its
gradient has the same layout, zeros in the unread entries.

Sampling is one sparse matrix
-----------------------------
- X is the input as (rows, D): a row per (image, input pixel, group), row
  n*(H*W*G + 1) + (r*W + c)*G + g holding input[n, r, c, g*D : g*D + D], and
  after each image's rows one zero row, the "outside" row of the core. This
  is the input's own memory order: neighbouring pixels of a group are G
  rows apart.
- S has a row per (image, output pixel, group), N*Ho*Wo*G rows, and sums
  that row's P points: 4*P entries, the bilinear weights of the corners
  times the mask. The mask is folded into S.
- The output is S·X: (N*Ho*Wo*G, D), the output (N, Ho, Wo, G*D) as it lies
  in memory. There is no GEMM and no (point, channel) intermediate.

Gradients, with G_out = grad_output seen as (N*Ho*Wo*G, D):

- input: Sᵀ·G_out (the zero rows dropped);
- with the corner products ``s[c, point] = <G_out[row], X[corner c]>`` the
  core gives d/dy, d/dx (times the mask) and d/dmask per point
  (:func:`cudcn.backends.numpy.sampling.location_gradients`);
- offset: offset_scale * d/dx and offset_scale * d/dy (the chain rule of the
  point formula); mask: d/dmask.

Work and memory: the (image, output pixel) pairs are processed in chunks
whose S and per-point arrays (about :data:`_BYTES_PER_POINT` bytes per
point) fit the workspace budget (:mod:`cudcn.config`), each chunk shared
out among threads in parts (:mod:`cudcn.backends.numpy.parallel`). A part
reads only the images its pixels belong to; the parts' input gradients are
added in a fixed order, so results are bitwise repeatable on a given number
of CPUs. Beyond the arguments and results: X (the input in the compute
dtype), and per part its S and the corner rows gathered a block at a time.
float16 and bfloat16 compute in float32.
"""

from __future__ import annotations

import numpy as np

from cudcn.backends.numpy import parallel
from cudcn.backends.numpy.sampling import Sampling, compute_dtype, corner_products, location_gradients, sample
from cudcn.config import images_per_chunk
from cudcn.dcnv3_geometry import DCNv3Geometry

#: Bytes a point costs while its chunk runs (as for MSDA: S's four indices
#: and values, the fractions and mask, the corner products, temporaries).
_BYTES_PER_POINT = 100

#: Fewest points worth a thread of their own.
_MIN_PART_POINTS = 2**13


def _pixel_rows(geom: DCNv3Geometry, input: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """X: input (N, H, W, G*D) as (N, H*W*G + 1, D), a zero row ending each image."""
    rows = geom.height * geom.width * geom.group
    pixels = np.empty((geom.batch, rows + 1, geom.group_channels), dtype)
    pixels[:, :rows] = input.reshape(geom.batch, rows, geom.group_channels)
    pixels[:, rows] = 0
    return pixels


def _offsets_and_mask(geom: DCNv3Geometry, offset: np.ndarray, mask: np.ndarray):
    """Views of the offsets (N*Ho*Wo, G, P, 2) and the mask (N*Ho*Wo, G, P).

    For DCNv4 (packed) ``offset`` and ``mask`` are both offset_mask, and the
    views pick each group's 2P offsets and P mask values out of it.
    """
    pairs, G, P = geom.batch * geom.out_h * geom.out_w, geom.group, geom.points
    if geom.packed:
        blocks = offset.reshape(pairs, geom.offset_mask_channels)[:, :G * 3 * P].reshape(pairs, G, 3 * P)
        return blocks[..., :2 * P].reshape(pairs, G, P, 2), blocks[..., 2 * P:]
    return offset.reshape(pairs, G, P, 2), mask.reshape(pairs, G, P)


def _kernel_grid(geom: DCNv3Geometry, dtype: np.dtype) -> np.ndarray:
    """(i*dil_w - c_w, j*dil_h - c_h) per point, (P, 2): the kernel grid around the reference point, (x, y) as the offsets."""
    c_h, c_w = geom.centre
    grid = np.array(geom.kernel_grid).reshape(-1, 2)
    return (grid * (geom.dil_w, geom.dil_h) - (c_w, c_h)).astype(dtype)


def softmax_over_points(mask: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """softmax over the last axis (the P points of a (pixel, group)) in ``dtype``:
    exp(m - max m) / sum exp(m - max m). A NaN makes its (pixel, group) NaN."""
    m = np.asarray(mask, dtype)
    e = np.exp(m - m.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _pair_mask(geom: DCNv3Geometry, masks, pairs: slice, dtype: np.dtype) -> np.ndarray:
    """The mask of the (image, output pixel) ``pairs``, (pairs, G, P), as the
    sum applies it: as given, or its softmax over P (``geom.softmax``)."""
    if geom.softmax:
        return softmax_over_points(masks[pairs], dtype)
    return masks[pairs]


def _sampling(geom: DCNv3Geometry, pairs: slice, offsets, mask, dtype: np.dtype) -> tuple[Sampling, slice]:
    """S of the (image, output pixel) ``pairs``, a row per (pair, group);
    and the images they read: S's columns are those images' rows of X.
    offsets as :func:`_offsets_and_mask` gives them, mask the pairs' own
    (:func:`_pair_mask`)."""
    G = geom.group
    out_pixels = geom.out_h * geom.out_w
    pair = np.arange(pairs.start, pairs.stop)
    image, pixel = np.divmod(pair, out_pixels)
    images = slice(pairs.start // out_pixels, (pairs.stop - 1) // out_pixels + 1)

    # Points (pairs, G, P), (x, y) pairs as the offsets give them: the
    # sampling core reads x and y as views.
    c_h, c_w = geom.centre
    points = np.add(offsets[pairs], _kernel_grid(geom, dtype), dtype=dtype)
    if geom.offset_scale != 1:
        points *= geom.offset_scale
    x, y = points[..., 0], points[..., 1]
    x += ((pixel % geom.out_w) * geom.stride_w - geom.pad_w + c_w).astype(dtype)[:, None, None]
    y += ((pixel // geom.out_w) * geom.stride_h - geom.pad_h + c_h).astype(dtype)[:, None, None]

    # Row of X of pixel (0, 0), group g, in each pair's image.
    image_rows = geom.height * geom.width * G + 1
    first = (image - images.start)[:, None, None] * image_rows + np.arange(G)[:, None]
    outside = (images.stop - images.start) * image_rows - 1
    sampling = sample(y, x, geom.height, geom.width, first, G, outside, mask, geom.points)
    return sampling, images


def _chunks(geom: DCNv3Geometry) -> list[slice]:
    """Slices of the flattened (image, output pixel) pairs whose points fit the workspace budget."""
    pairs = geom.batch * geom.out_h * geom.out_w
    step = images_per_chunk(geom.group * geom.points * _BYTES_PER_POINT, pairs)
    return [slice(s, min(s + step, pairs)) for s in range(0, pairs, step)]


def _parts(geom: DCNv3Geometry, chunk: slice) -> list[slice]:
    points = (chunk.stop - chunk.start) * geom.group * geom.points
    return parallel.parts(range(chunk.start, chunk.stop), points, _MIN_PART_POINTS)


def forward(geom: DCNv3Geometry, input, offset, mask) -> np.ndarray:
    """Output (N, Ho, Wo, G*D) in the input's dtype. For DCNv4 (geom.packed)
    ``offset`` and ``mask`` are both offset_mask."""
    dtype = compute_dtype(geom.dtype)
    D = geom.group_channels
    pixels = _pixel_rows(geom, input, dtype)
    offsets, masks = _offsets_and_mask(geom, offset, mask)
    out = np.empty((geom.batch * geom.out_h * geom.out_w, geom.group, D), dtype)

    def run(part: slice) -> None:
        sampling, images = _sampling(geom, part, offsets, _pair_mask(geom, masks, part, dtype), dtype)
        out[part] = (sampling.matrix @ pixels[images].reshape(-1, D)).reshape(-1, geom.group, D)

    for chunk in _chunks(geom):
        parallel.in_threads(run, _parts(geom, chunk))
    return out.reshape(geom.output_shape).astype(geom.dtype, copy=False)


def backward(geom: DCNv3Geometry, grad_output, input, offset, mask):
    """Gradients (input, offset, mask), each in its argument's shape and dtype.

    For DCNv4 (geom.packed) ``offset`` and ``mask`` are both offset_mask, and
    so are the two gradients: one array (N, Ho, Wo, K8), zeros in its unread
    entries, returned twice.
    """
    dtype = compute_dtype(geom.dtype)
    G, D = geom.group, geom.group_channels
    pixels = _pixel_rows(geom, input, dtype)
    offsets, masks = _offsets_and_mask(geom, offset, mask)
    grad_rows = grad_output.reshape(-1, G, D)  # a row per (pair, group)
    grad_input = np.zeros(input.shape, dtype)
    if geom.packed:
        grad_offset = grad_mask = np.zeros(offset.shape, dtype)
    else:
        grad_offset, grad_mask = np.empty(offset.shape, dtype), np.empty(mask.shape, dtype)
    grad_offsets, grad_masks = _offsets_and_mask(geom, grad_offset, grad_mask)

    def run(part: slice):
        mask = _pair_mask(geom, masks, part, dtype)
        sampling, images = _sampling(geom, part, offsets, mask, dtype)
        x = pixels[images].reshape(-1, D)
        g = np.ascontiguousarray(grad_rows[part], dtype).reshape(-1, D)
        grad_y, grad_x, grad_a = location_gradients(sampling, corner_products(sampling, g, x))
        shape = grad_masks[part].shape
        np.multiply(grad_x.reshape(shape), geom.offset_scale, out=grad_offsets[part, ..., 0])
        np.multiply(grad_y.reshape(shape), geom.offset_scale, out=grad_offsets[part, ..., 1])
        grad_a = grad_a.reshape(shape)
        if geom.softmax:  # the softmax's Jacobian: d/dm_p = s_p (d_p - sum_q s_q d_q)
            grad_a = mask * (grad_a - (mask * grad_a).sum(axis=-1, keepdims=True))
        grad_masks[part] = grad_a
        return images, sampling.matrix.T @ g

    image_rows = geom.height * geom.width * G + 1
    for chunk in _chunks(geom):
        for images, part_grad in parallel.in_threads(run, _parts(geom, chunk)):
            # The parts' sums, in a fixed order; each image's zero row dropped.
            part_grad = part_grad.reshape(-1, image_rows, D)[:, :-1]
            grad_input[images] += part_grad.reshape(-1, geom.height, geom.width, G * D)
    grad_input = grad_input.astype(geom.dtype, copy=False)
    if geom.packed:
        grad_offset = grad_mask = grad_offset.astype(geom.dtype, copy=False)
        return grad_input, grad_offset, grad_mask
    return grad_input, grad_offset.astype(geom.dtype, copy=False), grad_mask.astype(geom.dtype, copy=False)
