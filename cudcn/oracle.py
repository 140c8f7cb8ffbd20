"""The formula, literally: Python loops over every output element.

An independent oracle for tests and ``cudcn check``. It shares no code with
the backends (not even the validation) and is meant for tiny shapes only.
Computes in float64 and returns float64.

The sample at (y, x) is the bilinear interpolation of the image padded with
zeros on every side; a point with y <= -1, y >= H, x <= -1 or x >= W, or a
non-finite one, counts 0. Derivatives are those of that interpolation, and
at an integer coordinate (a kink) the one-sided derivative towards +1 --
also at -1, where the value is 0 and the slope towards row (column) 0 is not
(torchvision's rule).
"""

from __future__ import annotations

import math

import numpy as np


def _pixel(image: np.ndarray, row: int, col: int) -> float:
    """image[row, col], or 0 outside the image."""
    height, width = image.shape
    return float(image[row, col]) if 0 <= row < height and 0 <= col < width else 0.0


def _corners(y: float, x: float):
    """The four corners around (y, x): (row, column, bilinear weight)."""
    y0, x0 = math.floor(y), math.floor(x)
    ly, lx = y - y0, x - x0
    return (
        (y0, x0, (1 - ly) * (1 - lx)),
        (y0, x0 + 1, (1 - ly) * lx),
        (y0 + 1, x0, ly * (1 - lx)),
        (y0 + 1, x0 + 1, ly * lx),
    )


def bilinear(image: np.ndarray, y: float, x: float) -> float:
    """Sample image (H, W) at (y, x); outside pixels count 0."""
    height, width = image.shape
    if not (-1 < y < height and -1 < x < width):  # also False for NaN
        return 0.0
    return sum(weight * _pixel(image, r, c) for r, c, weight in _corners(y, x))


def bilinear_slope(image: np.ndarray, y: float, x: float) -> tuple[float, float]:
    """(d/dy, d/dx) of :func:`bilinear`, one-sided towards +1 at integer coordinates."""
    if not (math.isfinite(y) and math.isfinite(x)):
        return 0.0, 0.0
    y0, x0 = math.floor(y), math.floor(x)
    ly, lx = y - y0, x - x0

    def p(row, col):
        return _pixel(image, row, col)

    d_dy = (1 - lx) * (p(y0 + 1, x0) - p(y0, x0)) + lx * (p(y0 + 1, x0 + 1) - p(y0, x0 + 1))
    d_dx = (1 - ly) * (p(y0, x0 + 1) - p(y0, x0)) + ly * (p(y0 + 1, x0 + 1) - p(y0 + 1, x0))
    return d_dy, d_dx


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _terms(input, offset, weight, stride, padding, dilation, mask):
    """Every term of the sum: (n, o, h, w, c, cg, i, j, y, x, offset channel, mask channel, m)."""
    n_batch, in_channels, height, width = input.shape
    out_channels, group_channels, kh, kw = weight.shape
    groups = in_channels // group_channels
    offset_groups = offset.shape[1] // (2 * kh * kw)
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    out_h = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    per_offset_group = in_channels // offset_groups
    for n in range(n_batch):
        for o in range(out_channels):
            group = o // (out_channels // groups)
            for h in range(out_h):
                for w in range(out_w):
                    for cg in range(group_channels):
                        c = group * group_channels + cg
                        g = c // per_offset_group
                        for i in range(kh):
                            for j in range(kw):
                                k = i * kw + j
                                at = g * 2 * kh * kw + 2 * k
                                y = h * sh - ph + i * dh + float(offset[n, at, h, w])
                                x = w * sw - pw + j * dw + float(offset[n, at + 1, h, w])
                                m_at = g * kh * kw + k
                                m = 1.0 if mask is None else float(mask[n, m_at, h, w])
                                yield n, o, h, w, c, cg, i, j, y, x, at, m_at, m


def _output_shape(input, offset, weight):
    return (input.shape[0], weight.shape[0], offset.shape[2], offset.shape[3])


def deform_conv2d(input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None):
    """torchvision.ops.deform_conv2d's formula, element by element (float64)."""
    input, offset, weight = (np.asarray(a, np.float64) for a in (input, offset, weight))
    out = np.zeros(_output_shape(input, offset, weight))
    if bias is not None:
        out += np.asarray(bias, np.float64).reshape(1, -1, 1, 1)
    for n, o, h, w, c, cg, i, j, y, x, _, _, m in _terms(input, offset, weight, stride, padding, dilation, mask):
        out[n, o, h, w] += float(weight[o, cg, i, j]) * m * bilinear(input[n, c], y, x)
    return out


def deform_conv2d_backward(grad_output, input, offset, weight, bias=None, stride=1, padding=0,
                           dilation=1, mask=None):
    """Gradients (input, offset, weight, bias, mask) of the same sum (float64).

    bias and mask gradients are None when bias or mask is None.
    """
    grad_output, input, offset, weight = (
        np.asarray(a, np.float64) for a in (grad_output, input, offset, weight)
    )
    grad_input = np.zeros_like(input)
    grad_offset = np.zeros_like(offset)
    grad_weight = np.zeros_like(weight)
    grad_mask = None if mask is None else np.zeros(np.shape(mask))
    _, _, height, width = input.shape
    for n, o, h, w, c, cg, i, j, y, x, at, m_at, m in _terms(input, offset, weight, stride, padding, dilation, mask):
        go = float(grad_output[n, o, h, w])
        wt = float(weight[o, cg, i, j])
        value = bilinear(input[n, c], y, x)
        grad_weight[o, cg, i, j] += go * m * value
        if grad_mask is not None:
            grad_mask[n, m_at, h, w] += go * wt * value
        d_dy, d_dx = bilinear_slope(input[n, c], y, x)
        grad_offset[n, at, h, w] += go * wt * m * d_dy
        grad_offset[n, at + 1, h, w] += go * wt * m * d_dx
        if -1 < y < height and -1 < x < width:
            for r, col, corner_weight in _corners(y, x):
                if 0 <= r < height and 0 <= col < width:
                    grad_input[n, c, r, col] += go * wt * m * corner_weight
    grad_bias = None if bias is None else grad_output.sum(axis=(0, 2, 3))
    return grad_input, grad_offset, grad_weight, grad_bias, grad_mask
