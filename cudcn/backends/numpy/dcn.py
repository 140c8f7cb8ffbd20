"""NumPy backend: deformable convolution as a sparse sampling matrix.

This module is the readable specification of deformable convolution (the
sampling matrix S itself is built by the shared core,
:mod:`cudcn.backends.numpy.sampling`). A deformable convolution is

    out[n, o, h, w] = bias[o] + sum_{c in group(o), i, j}
        weight[o, c, i, j] * mask[n, g(c), k, h, w] * bilinear(input[n, c], y, x)

    k = i*kw + j,  g(c) = c // (C_in / G)
    y = h*stride_h - pad_h + i*dil_h + offset[n, g*2K + 2k,     h, w]
    x = w*stride_w - pad_w + j*dil_w + offset[n, g*2K + 2k + 1, h, w]

``bilinear`` mixes the four pixels around (y, x); a pixel outside the image
counts 0, and a point with y <= -1, y >= H, x <= -1 or x >= W (or a
non-finite offset) counts 0 as a whole. At an integer y (or x), where the
sample has a kink, the derivative is the one-sided one towards y + 1
(rows y and y + 1) -- also at y = -1, where the value is 0 but the slope
towards row 0 is not (torchvision's rule; paddle and mmcv return 0 there).
Notation is that of :mod:`cudcn.geometry`.

Sampling is a sparse matrix
---------------------------
Bilinear sampling is linear in the input, so for a chunk of n images it is
one sparse matrix S:

- X is the input channels-last, (n*H*W, C): a row per (image, input pixel),
  holding that pixel's channels;
- S has a row per (image, output pixel, kernel point), n*L*K rows, and a
  column per (image, input pixel), plus one last column "outside the image"
  whose row of X is zero;
- each row of S has exactly four entries, the four pixels around its
  sampling point (y, x), corner order (y0, x0), (y0, x0+1), (y0+1, x0),
  (y0+1, x0+1) with y0 = floor(y), x0 = floor(x); the value of an entry is
  the bilinear weight times the mask, so the mask is folded into S. A corner
  outside the image, or any corner of a point that counts 0, points at the
  "outside" column with value 0;
- im2col is S·X: (n*L*K, C), which is the column buffer
  ``columns[n, h*Wo + w, k, c]`` (N, Ho*Wo, kh*kw, C_in) as it lies in memory.

Offset groups are blocks: each offset group g has its own matrix S_g (its
own sampling points and mask) acting on its own C/G channels. The blocks are
interleaved rather than stacked -- row ((image*L + pixel)*K + k)*G + g,
column (image*H*W + pixel)*G + g -- and a row of group g has entries only in
columns of group g. X is then the channels-last input seen as
(n*H*W*G, C/G), the same memory, and S·X is (n*L*K*G, C/G): again the
column buffer, with no copy per group.

The computation is three steps:

1. im2col: ``columns = S·X``;
2. a matrix product of the columns with the weight, per convolution group;
   backwards, the weight gradient is columnsᵀ·grad_out and the column
   gradients are ``dcol = grad_out·weightᵀ``;
3. col2im: the input gradient is ``Sᵀ·dcol`` (the transpose is a CSC view of
   the same arrays: each row of S scatters its four entries);
   col2im_coord: with ``s[r, a, b] = <dcol[r], X[corner (a, b) of row r]>``,
   row-wise dot products of the column gradients with the four corner rows
   (gathered by ``take`` from the 2-D X), and fy = y - y0, fx = x - x0:

       top    = (1 - fx) * s[r, 0, 0] + fx * s[r, 0, 1]   # row y0
       bottom = (1 - fx) * s[r, 1, 0] + fx * s[r, 1, 1]   # row y0 + 1
       d/dmask = (1 - fy) * top + fy * bottom
       d/dy = mask * (bottom - top),  d/dx likewise with rows and columns swapped

   A corner outside the image reads the zero row, so these hold at the border
   too: at y = -1 the top row is outside, fy = 0, the value is 0 and d/dy is
   the bottom row: the slope towards row 0.

Every gather is a ``take`` along the first axis of a 2-D array (no fancy
indexing with three index arrays). The batch is processed in chunks -- as
many images as the workspace budget allows (:mod:`cudcn.config`) -- and S,
built once for a chunk (or for each part of it, below), serves all three
steps. Everything runs in the compute dtype (float32, or float64 for
float64 input): S's values, X and the accumulations of Sᵀ·dcol, so no
float64 scatter buffer is ever needed. Memory beyond the arguments: the
column buffer (in the backward, the column gradients take its place), S and
its per-row arrays (about 50 bytes per row), X, and the corner rows gathered
a block at a time.

Threads: scipy's sparse products run on one thread, so a chunk's images are
shared out among threads, a part per CPU (when each part still gets enough
work), each doing all three steps for its images (scipy and NumPy release
the GIL); meanwhile BLAS runs one thread per part. BLAS keeps its own
threads only for a single image with enough work for two. The parts' column
buffers add up to the chunk's. The weight gradient sums the parts in a fixed
order, so results are bitwise repeatable on a given number of CPUs.
"""

from __future__ import annotations

import numpy as np

from cudcn.backends import layout
from cudcn.backends.numpy import parallel
from cudcn.backends.numpy.sampling import (
    Sampling,
    compute_dtype,
    corner_products,
    location_gradients,
    pixel_rows,
    sample,
)
from cudcn.geometry import Geometry


def _mask_rows(geom: Geometry, mask: np.ndarray | None, dtype: np.dtype) -> np.ndarray | None:
    """Mask (n, G*K, Ho, Wo) as (n*L*K*G,), the row order of S; None stays None."""
    if mask is None:
        return None
    n, G, K = mask.shape[0], geom.offset_groups, geom.kernel_points
    m = mask.reshape(n, G, K, geom.out_pixels).transpose(0, 3, 2, 1)
    return np.ascontiguousarray(m, dtype=dtype).reshape(-1)


def _sampling(geom: Geometry, offset: np.ndarray, mask: np.ndarray | None, dtype: np.dtype) -> Sampling:
    """S, rows r = ((image*L + l)*K + k)*G + g, and the fractions of the
    sampling points of offset (n, 2*G*K, Ho, Wo)."""
    n, G, K = offset.shape[0], geom.offset_groups, geom.kernel_points
    H, W = geom.height, geom.width
    outside = n * H * W * G  # the last column of S

    # Sampling points (n, Ho, Wo, K, G), flat in row order: the regular grid plus the offsets.
    off = offset.reshape(n, G, K, 2, geom.out_h, geom.out_w).transpose(3, 0, 4, 5, 2, 1)
    i, j = np.divmod(np.arange(K), geom.kernel_w)
    grid_y = np.arange(geom.out_h) * geom.stride_h - geom.pad_h
    grid_x = np.arange(geom.out_w) * geom.stride_w - geom.pad_w
    shape = (n, geom.out_pixels * K, G)
    y = np.add(off[0], (grid_y[:, None, None] + i * geom.dil_h)[:, :, :, None], dtype=dtype).reshape(shape)
    x = np.add(off[1], (grid_x[:, None] + j * geom.dil_w)[:, :, None], dtype=dtype).reshape(shape)

    # Column of S of pixel (0, 0) of image i in group g: i*H*W*G + g; pixels G apart.
    image_group = np.arange(n)[:, None, None] * (H * W * G) + np.arange(G)
    return sample(y, x, H, W, image_group, G, outside, _mask_rows(geom, mask, dtype))


#: Channels moved at once by a transpose to channels-last. An image's channel
#: planes lie H*W*itemsize bytes apart, often a multiple of 4 KiB, so the same
#: pixel of every channel falls into one cache set: reading more channels at a
#: time than the cache has ways evicts the lines before their next pixels are
#: read (1.5 ms against 0.35 ms for N8 C64 32x32 float32).
_TRANSPOSE_CHANNELS = 8

#: Pixels moved at once by a transpose to channels-first (rows of C values).
_TRANSPOSE_PIXELS = 256


def _to_channels_last(source: np.ndarray, out: np.ndarray) -> None:
    """out[i, p, c] = source[i, c, p], source (n, C, P), out (n, P, C), any dtypes."""
    for i in range(source.shape[0]):
        for c in range(0, source.shape[1], _TRANSPOSE_CHANNELS):
            out[i, :, c:c + _TRANSPOSE_CHANNELS] = source[i, c:c + _TRANSPOSE_CHANNELS].T


def _to_channels_first(source: np.ndarray, out: np.ndarray) -> None:
    """out[i, c, p] = source[i, p, c], source (n, P, C), out (n, C, P), any dtypes."""
    for i in range(source.shape[0]):
        for p in range(0, source.shape[1], _TRANSPOSE_PIXELS):
            out[i, :, p:p + _TRANSPOSE_PIXELS] = source[i, p:p + _TRANSPOSE_PIXELS].T


def _pixel_rows(geom: Geometry, input: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """X: input (n, C, H, W) channels-last as (n*H*W*G + 1, C/G), a zero row last."""
    n, C, G = input.shape[0], geom.in_channels, geom.offset_groups
    pixels = pixel_rows(n * geom.height * geom.width * G, C // G, dtype)
    P = geom.height * geom.width  # explicit sizes, no -1: an empty batch has size 0
    _to_channels_last(input.reshape(n, C, P), pixels[:-1].reshape(n, P, C))
    return pixels


def _im2col(sampling: Sampling, pixels: np.ndarray) -> np.ndarray:
    """S·X: columns as (n*L*K*G, C/G)."""
    return sampling.matrix @ pixels


def _col2im(geom: Geometry, sampling: Sampling, grad_columns: np.ndarray, out: np.ndarray) -> None:
    """Sᵀ·dcol: input gradient into out (n, C, H, W) from column gradients (n*L*K*G, C/G)."""
    grad = sampling.matrix.T @ grad_columns  # (n*H*W*G + 1, C/G)
    n, C, P = out.shape[0], geom.in_channels, geom.height * geom.width
    _to_channels_first(grad[:-1].reshape(n, P, C), out.reshape(n, C, P))


def _col2im_coord(geom, sampling, grad_columns, pixels, dtype):
    """Offset (n, 2GK, Ho, Wo) and mask (n, GK, Ho, Wo) gradients (None without
    a mask) from column gradients (n*L*K*G, C/G) and X (n*H*W*G + 1, C/G)."""
    s = corner_products(sampling, grad_columns, pixels)
    grad_y, grad_x, grad_mask = location_gradients(sampling, s)

    G, K, L = geom.offset_groups, geom.kernel_points, geom.out_pixels
    n = len(grad_y) // (L * K * G)

    def offset_layout(a):  # rows (n, L, K, G) -> (n, G, K, L)
        return a.reshape(n, L, K, G).transpose(0, 3, 2, 1)

    grad_offset = np.empty((n, G, K, 2, L), dtype)
    grad_offset[:, :, :, 0] = offset_layout(grad_y)
    grad_offset[:, :, :, 1] = offset_layout(grad_x)
    grad_offset = grad_offset.reshape(n, 2 * G * K, geom.out_h, geom.out_w)
    if grad_mask is None:
        return grad_offset, None
    return grad_offset, np.ascontiguousarray(offset_layout(grad_mask)).reshape(n, G * K, geom.out_h, geom.out_w)


def _chunk_mask(mask, part):
    return None if mask is None else mask[part]


def _column_rows(geom: Geometry, columns: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Columns (n, L, K, C) as (n*L*K*G, C/G) in the compute dtype."""
    return np.ascontiguousarray(columns, dtype=dtype).reshape(-1, geom.in_channels // geom.offset_groups)


def _forward_part(geom, input, offset, mask, w, dtype, out) -> None:
    """Output of some images into out (n, C_out, Ho, Wo), without the bias; w from layout.weight_matrix."""
    n, g, L, Og = input.shape[0], geom.groups, geom.out_pixels, geom.out_channels // geom.groups
    sampling = _sampling(geom, offset, mask, dtype)
    columns = _im2col(sampling, _pixel_rows(geom, input, dtype))
    columns = columns.reshape(n, L, geom.kernel_points, geom.in_channels)
    y = np.matmul(layout.grouped_columns(geom, columns), w)  # (groups, n*L, O/groups)
    out = out.reshape(n, g, Og, L)
    for group in range(g):
        _to_channels_first(y[group].reshape(n, L, Og), out[:, group])


def _backward_part(geom, grad_output, input, offset, mask, w, dtype, grad_input):
    """Gradients (offset, mask or None, weight matrix) of some images, the
    input's into grad_input (n, C, H, W).

    S is built once and serves im2col (for the weight gradient), col2im and
    col2im_coord. Its temporaries end with the call.
    """
    n, g, L, Og = input.shape[0], geom.groups, geom.out_pixels, geom.out_channels // geom.groups
    sampling = _sampling(geom, offset, mask, dtype)
    pixels = _pixel_rows(geom, input, dtype)
    # grad_output per group as (O/groups, n*L): whole rows of L values move,
    # where channels-last would need a transpose, and BLAS takes either
    # operand transposed at the same speed.
    go = np.empty((g, Og, n * L), dtype)
    go.reshape(g, Og, n, L)[...] = grad_output.reshape(n, g, Og, L).transpose(1, 2, 0, 3)
    columns = _im2col(sampling, pixels)
    grouped = layout.grouped_columns(geom, columns.reshape(n, geom.out_pixels, geom.kernel_points, -1))
    grad_w = np.matmul(go, grouped).transpose(0, 2, 1)  # (groups, K*C/groups, O/groups)
    # The column gradients take the columns' place; with one convolution group
    # the grouped view is the columns' own memory, so they take it over too.
    out = grouped if g == 1 else None
    del columns
    grad_grouped = np.matmul(go.transpose(0, 2, 1), w.transpose(0, 2, 1), out=out)  # (groups, n*L, K*C/groups)
    grad_columns = layout.ungrouped_columns(geom, grad_grouped, n)
    grad_columns = _column_rows(geom, grad_columns, dtype)
    _col2im(geom, sampling, grad_columns, grad_input)
    grad_offset, grad_mask = _col2im_coord(geom, sampling, grad_columns, pixels, dtype)
    return grad_offset, grad_mask, grad_w


#: Fewest column-buffer values worth a thread of their own: for less work,
#: starting and joining the thread costs about what it saves.
_MIN_PART_VALUES = 2**17


def _column_values(geom: Geometry, images: slice) -> int:
    """Column-buffer values of some images."""
    return len(range(geom.batch)[images]) * geom.out_pixels * geom.kernel_points * geom.in_channels


def _parts(geom: Geometry, chunk: slice) -> list[slice]:
    """The images of a chunk shared out among threads: a part per CPU, at
    most one per image and one per _MIN_PART_VALUES column values. The parts'
    column buffers together are the chunk's."""
    images = range(geom.batch)[chunk]
    return parallel.parts(images, _column_values(geom, chunk), _MIN_PART_VALUES)


def _in_threads(run, geom: Geometry, chunk: slice) -> list:
    """[run(part) for part in the chunk's parts], in threads (parallel.in_threads).

    BLAS keeps its own threads only for a single part with two parts' worth
    of work (a single image), where they are the only parallelism there is.
    With less work they cost more than they give, and afterwards an idle
    OpenBLAS thread spins for about 0.1 s on a core that the caller may need
    (N8 C16 14x14, two CPUs: 2.3x the CPU time, 2.9x the wall time, and 22 ms
    of spinning after).
    """
    parts = _parts(geom, chunk)
    blas_threads = len(parts) == 1 and _column_values(geom, chunk) >= 2 * _MIN_PART_VALUES
    return parallel.in_threads(run, parts, blas_threads=blas_threads)


def forward(geom, input, offset, weight, bias, mask):
    """Output (N, C_out, Ho, Wo) in the input's dtype."""
    dtype = compute_dtype(geom.dtype)
    out = np.empty((geom.batch, geom.out_channels, geom.out_h, geom.out_w), dtype)
    w = layout.weight_matrix(geom, weight, dtype)

    def run(part):
        _forward_part(geom, input[part], offset[part], _chunk_mask(mask, part), w, dtype, out[part])

    for chunk in layout.chunks(geom, dtype):
        _in_threads(run, geom, chunk)
    if bias is not None:
        out += bias.astype(dtype).reshape(1, -1, 1, 1)
    return out.astype(geom.dtype, copy=False)


def backward(geom, grad_output, input, offset, weight, mask):
    """Gradients (input, offset, weight, bias or None, mask or None)."""
    dtype = compute_dtype(geom.dtype)
    grad_input = np.empty((geom.batch, geom.in_channels, geom.height, geom.width), dtype)
    grad_offset = np.empty(offset.shape, dtype)
    grad_mask = np.empty(mask.shape, dtype) if mask is not None else None
    w = layout.weight_matrix(geom, weight, dtype)

    def run(part):
        grads = _backward_part(geom, grad_output[part], input[part], offset[part],
                               _chunk_mask(mask, part), w, dtype, grad_input[part])
        grad_offset[part] = grads[0]
        if grad_mask is not None:
            grad_mask[part] = grads[1]
        return grads[2]

    grad_w = np.zeros_like(w)
    for chunk in layout.chunks(geom, dtype):
        for part_grad_w in _in_threads(run, geom, chunk):
            grad_w += part_grad_w  # in a fixed order: bitwise repeatable
    grad_bias = None
    if geom.has_bias:
        grad_bias = grad_output.astype(dtype, copy=False).sum(axis=(0, 2, 3))
    grads = (grad_input, grad_offset, layout.weight_from_matrix(geom, grad_w), grad_bias, grad_mask)
    return tuple(None if a is None else a.astype(geom.dtype, copy=False) for a in grads)


def im2col(geom, input, offset, mask):
    """Columns (N, Ho*Wo, kh*kw, C_in), mask applied."""
    dtype = compute_dtype(geom.dtype)
    sampling = _sampling(geom, offset, mask, dtype)
    columns = _im2col(sampling, _pixel_rows(geom, input, dtype))
    return columns.reshape(geom.columns_shape).astype(geom.dtype, copy=False)


def col2im(geom, columns, offset, mask):
    """Input gradient (N, C_in, H, W) from column gradients (N, Ho*Wo, kh*kw, C_in)."""
    dtype = compute_dtype(geom.dtype)
    sampling = _sampling(geom, offset, mask, dtype)
    grad = np.empty((geom.batch, geom.in_channels, geom.height, geom.width), dtype)
    _col2im(geom, sampling, _column_rows(geom, columns, dtype), grad)
    return grad.astype(geom.dtype, copy=False)


def col2im_coord(geom, columns, input, offset, mask):
    """Offset gradient (N, 2GK, Ho, Wo) and mask gradient (N, GK, Ho, Wo) or None."""
    dtype = compute_dtype(geom.dtype)
    sampling = _sampling(geom, offset, mask, dtype)
    pixels = _pixel_rows(geom, input, dtype)
    grad_columns = _column_rows(geom, columns, dtype)
    g_off, g_mask = _col2im_coord(geom, sampling, grad_columns, pixels, dtype)
    return g_off.astype(geom.dtype), (None if g_mask is None else g_mask.astype(geom.dtype))
