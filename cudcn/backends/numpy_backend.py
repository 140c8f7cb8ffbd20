"""NumPy backend: deformable convolution in vectorised NumPy.

This file is cudcn's readable specification. A deformable convolution is

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
The computation is three steps:

1. im2col: sample every (output pixel, kernel point, channel) into a column
   buffer ``columns[n, h*Wo + w, k, c]`` (N, Ho*Wo, kh*kw, C_in), times the mask;
2. a matrix product of the columns with the weight, per convolution group;
3. for the gradients, col2im scatters column gradients back onto the input,
   and col2im_coord turns them into offset and mask gradients.

Channels are the last axis of the columns so that each sample gathers one
contiguous row of channels: NumPy's fancy indexing is then fast. Notation is
that of :mod:`cudcn.geometry`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from cudcn.backends import layout
from cudcn.geometry import Geometry


def _compute_dtype(dtype: np.dtype) -> np.dtype:
    """float64 stays float64; float16, bfloat16 and float32 compute in float32."""
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


class _Corners(NamedTuple):
    """Bilinear sampling of one chunk, per corner of the 2x2 neighbourhood.

    Every array is (4, n, L, K, G), corner order (y0, x0), (y0, x0+1),
    (y0+1, x0), (y0+1, x0+1). A corner outside the image, or of a point that
    counts 0, has index H*W (a padding pixel that reads as zero and absorbs
    scattered gradients) and weight and derivatives 0. A point exactly on row
    or column -1 has weight 0 at every corner but keeps its derivatives (the
    one-sided slope towards the image, torchvision's rule).
    """

    index: np.ndarray  # flat pixel index y*W + x
    weight: np.ndarray  # bilinear weight (without the mask)
    d_dy: np.ndarray  # derivative of the weight with respect to y
    d_dx: np.ndarray  # derivative of the weight with respect to x


def _corners(geom: Geometry, offset: np.ndarray, dtype: np.dtype) -> _Corners:
    """Sampling points of a chunk of images, offset (n, 2*G*K, Ho, Wo)."""
    n, G, K = offset.shape[0], geom.offset_groups, geom.kernel_points
    H, W, L = geom.height, geom.width, geom.out_pixels

    # (n, G, K, 2, Ho, Wo) -> dy, dx as (n, L, K, G)
    off = offset.reshape(n, G, K, 2, geom.out_h, geom.out_w).astype(dtype, copy=False)
    dy = off[:, :, :, 0].transpose(0, 3, 4, 2, 1).reshape(n, L, K, G)
    dx = off[:, :, :, 1].transpose(0, 3, 4, 2, 1).reshape(n, L, K, G)

    i, j = np.divmod(np.arange(K), geom.kernel_w)
    rows = np.arange(geom.out_h) * geom.stride_h - geom.pad_h
    cols = np.arange(geom.out_w) * geom.stride_w - geom.pad_w
    shape = (geom.out_h, geom.out_w, K)
    base_y = np.broadcast_to(rows[:, None, None] + i * geom.dil_h, shape)
    base_x = np.broadcast_to(cols[None, :, None] + j * geom.dil_w, shape)
    y = base_y.reshape(1, L, K, 1).astype(dtype) + dy
    x = base_x.reshape(1, L, K, 1).astype(dtype) + dx

    # NaN fails every comparison, so non-finite offsets land outside too.
    # A point on row -1 (or column -1) has value 0 but, as in torchvision, the
    # one-sided slope towards row 0: it reaches the image for the derivatives.
    reach = (y >= -1) & (y < H) & (x >= -1) & (x < W)
    inside = reach & (y > -1) & (x > -1)
    y = np.where(reach, y, 0)
    x = np.where(reach, x, 0)
    y0, x0 = np.floor(y), np.floor(x)
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    y0, x0 = y0.astype(np.intp), x0.astype(np.intp)

    corners = (
        # corner y, corner x, weight, d weight/dy, d weight/dx
        (y0, x0, hy * hx, -hx, -hy),
        (y0, x0 + 1, hy * lx, -lx, hy),
        (y0 + 1, x0, ly * hx, hx, -ly),
        (y0 + 1, x0 + 1, ly * lx, lx, ly),
    )
    index, weight, d_dy, d_dx = [], [], [], []
    for cy, cx, w, wy, wx in corners:
        ok = reach & (cy >= 0) & (cy < H) & (cx >= 0) & (cx < W)
        index.append(np.where(ok, cy * W + cx, H * W))
        weight.append(w * (ok & inside))
        d_dy.append(wy * ok)
        d_dx.append(wx * ok)
    return _Corners(*(np.stack(a) for a in (index, weight, d_dy, d_dx)))


def _mask_nlkg(geom: Geometry, mask: np.ndarray | None, n: int, dtype: np.dtype):
    """Mask (n, G*K, Ho, Wo) as (n, L, K, G); 1 when there is no mask."""
    if mask is None:
        return np.ones((1, 1, 1, 1), dtype)
    G, K = geom.offset_groups, geom.kernel_points
    m = mask.reshape(n, G, K, geom.out_pixels).astype(dtype, copy=False)
    return m.transpose(0, 3, 2, 1)


def _pixels_last(geom: Geometry, input: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Input (n, C, H, W) as (n, H*W + 1, G, C/G), a zero padding pixel last."""
    n, G = input.shape[0], geom.offset_groups
    out = np.zeros((n, geom.height * geom.width + 1, geom.in_channels), dtype)
    out[:, :-1] = input.reshape(n, geom.in_channels, geom.height * geom.width).transpose(0, 2, 1)
    return out.reshape(n, geom.height * geom.width + 1, G, geom.in_channels // G)


def _gather(pixels: np.ndarray, index: np.ndarray) -> np.ndarray:
    """pixels (n, H*W+1, G, Cg) at index (n, L, K, G) -> (n, L, K, G, Cg)."""
    n, G = pixels.shape[0], pixels.shape[2]
    return pixels[np.arange(n)[:, None, None, None], index, np.arange(G)]


def _im2col(geom, input, corners, mask, dtype) -> np.ndarray:
    """Columns (n, L, K, C) of one chunk."""
    pixels = _pixels_last(geom, input, dtype)
    columns = 0
    for c in range(4):
        columns = columns + (corners.weight[c] * mask)[..., None] * _gather(
            pixels, corners.index[c]
        )
    n, L, K, G, Cg = columns.shape
    return columns.reshape(n, L, K, G * Cg)


def _col2im(geom, columns, corners, mask, dtype) -> np.ndarray:
    """Scatter column gradients (n, L, K, C) onto the input: (n, C, H, W)."""
    n, L, K, C = columns.shape
    G = geom.offset_groups
    Cg = C // G
    pixels = geom.height * geom.width + 1
    columns = columns.reshape(n, L, K, G, Cg)
    # Flat position of (image, pixel, offset group, channel) in (n, HW+1, G, Cg).
    row = (np.arange(n)[:, None, None, None] * pixels * G + np.arange(G)) * Cg
    channel = np.arange(Cg)
    grad = np.zeros(n * pixels * C)
    for c in range(4):
        key = (row + corners.index[c] * (G * Cg))[..., None] + channel
        values = columns * (corners.weight[c] * mask)[..., None]
        grad += np.bincount(key.ravel(), values.ravel(), minlength=grad.size)
    grad = grad.reshape(n, pixels, C)[:, :-1].astype(dtype, copy=False)
    return grad.transpose(0, 2, 1).reshape(n, C, geom.height, geom.width)


def _col2im_coord(geom, columns, input, corners, mask, dtype):
    """Offset (n, 2GK, Ho, Wo) and mask (n, GK, Ho, Wo) gradients of a chunk.

    With s_c = sum over a group's channels of column gradient * corner value,
    d out/d y = mask * sum_c d_dy_c * s_c, likewise for x, and
    d out/d mask = sum_c weight_c * s_c.
    """
    n, L, K, C = columns.shape
    G = geom.offset_groups
    pixels = _pixels_last(geom, input, dtype)
    columns = columns.reshape(n, L, K, G, C // G)
    grad_y = grad_x = grad_m = 0
    for c in range(4):
        s = np.einsum("...c,...c->...", columns, _gather(pixels, corners.index[c]))
        grad_y = grad_y + corners.d_dy[c] * s
        grad_x = grad_x + corners.d_dx[c] * s
        grad_m = grad_m + corners.weight[c] * s

    def to_nchw(a):  # (n, L, K, G) -> (n, G, K, Ho, Wo)
        return a.transpose(0, 3, 2, 1).reshape(n, G, K, geom.out_h, geom.out_w)

    grad_offset = np.stack([to_nchw(grad_y * mask), to_nchw(grad_x * mask)], axis=3)
    grad_offset = grad_offset.reshape(n, 2 * G * K, geom.out_h, geom.out_w)
    grad_mask = to_nchw(grad_m).reshape(n, G * K, geom.out_h, geom.out_w)
    return grad_offset, grad_mask












def _chunk_mask(mask, part):
    return None if mask is None else mask[part]


def forward(geom, input, offset, weight, bias, mask):
    """Output (N, C_out, Ho, Wo) in the input's dtype."""
    dtype = _compute_dtype(geom.dtype)
    out = np.empty((geom.batch, geom.out_channels, geom.out_h, geom.out_w), dtype)
    w = layout.weight_matrix(geom, weight, dtype)
    for part in layout.chunks(geom, dtype):
        x, off = input[part], offset[part]
        n = x.shape[0]
        m = _mask_nlkg(geom, _chunk_mask(mask, part), n, dtype)
        columns = _im2col(geom, x, _corners(geom, off, dtype), m, dtype)
        y = np.matmul(layout.grouped_columns(geom, columns), w)  # (groups, n*L, O/groups)
        y = y.transpose(1, 0, 2).reshape(n, geom.out_h, geom.out_w, geom.out_channels)
        out[part] = y.transpose(0, 3, 1, 2)
    if bias is not None:
        out += bias.astype(dtype).reshape(1, -1, 1, 1)
    return out.astype(geom.dtype, copy=False)


def backward(geom, grad_output, input, offset, weight, mask):
    """Gradients (input, offset, weight, bias or None, mask or None)."""
    dtype = _compute_dtype(geom.dtype)
    grad_input = np.empty((geom.batch, geom.in_channels, geom.height, geom.width), dtype)
    grad_offset = np.empty(offset.shape, dtype)
    grad_mask = np.empty(mask.shape, dtype) if mask is not None else None
    w = layout.weight_matrix(geom, weight, dtype)
    grad_w = np.zeros_like(w)
    g = geom.groups
    for part in layout.chunks(geom, dtype):
        x, off = input[part], offset[part]
        n = x.shape[0]
        m = _mask_nlkg(geom, _chunk_mask(mask, part), n, dtype)
        corners = _corners(geom, off, dtype)
        go = grad_output[part].astype(dtype, copy=False)
        go = go.reshape(n, g, -1, geom.out_pixels).transpose(1, 0, 3, 2)
        go = go.reshape(g, n * geom.out_pixels, -1)  # (groups, n*L, O/groups)
        columns = _im2col(geom, x, corners, m, dtype)
        grad_w += np.matmul(layout.grouped_columns(geom, columns).transpose(0, 2, 1), go)
        grad_columns = layout.ungrouped_columns(geom, np.matmul(go, w.transpose(0, 2, 1)), n)
        grad_input[part] = _col2im(geom, grad_columns, corners, m, dtype)
        g_off, g_mask = _col2im_coord(geom, grad_columns, x, corners, m, dtype)
        grad_offset[part] = g_off
        if grad_mask is not None:
            grad_mask[part] = g_mask
    grad_bias = None
    if geom.has_bias:
        grad_bias = grad_output.astype(dtype, copy=False).sum(axis=(0, 2, 3))
    grads = (grad_input, grad_offset, layout.weight_from_matrix(geom, grad_w), grad_bias, grad_mask)
    return tuple(None if a is None else a.astype(geom.dtype, copy=False) for a in grads)


def im2col(geom, input, offset, mask):
    """Columns (N, Ho*Wo, kh*kw, C_in), mask applied."""
    dtype = _compute_dtype(geom.dtype)
    m = _mask_nlkg(geom, mask, geom.batch, dtype)
    columns = _im2col(geom, input, _corners(geom, offset, dtype), m, dtype)
    return columns.astype(geom.dtype)


def col2im(geom, columns, offset, mask):
    """Input gradient (N, C_in, H, W) from column gradients (N, Ho*Wo, kh*kw, C_in)."""
    dtype = _compute_dtype(geom.dtype)
    m = _mask_nlkg(geom, mask, geom.batch, dtype)
    cols = columns.astype(dtype, copy=False)
    grad = _col2im(geom, cols, _corners(geom, offset, dtype), m, dtype)
    return grad.astype(geom.dtype)


def col2im_coord(geom, columns, input, offset, mask):
    """Offset gradient (N, 2GK, Ho, Wo) and mask gradient (N, GK, Ho, Wo) or None."""
    dtype = _compute_dtype(geom.dtype)
    m = _mask_nlkg(geom, mask, geom.batch, dtype)
    cols = columns.astype(dtype, copy=False)
    g_off, g_mask = _col2im_coord(geom, cols, input, _corners(geom, offset, dtype), m, dtype)
    return g_off.astype(geom.dtype), (None if mask is None else g_mask.astype(geom.dtype))
