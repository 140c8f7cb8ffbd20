"""The formula, literally: Python loops over every output element.

An independent oracle for tests and ``cudcn check``. It shares no code with
the backends (not even the validation) and is meant for tiny shapes only.
Computes in float64 and returns float64.
"""

from __future__ import annotations

import math

import numpy as np


def bilinear(image: np.ndarray, y: float, x: float) -> float:
    """Sample image (H, W) at (y, x); outside pixels count 0."""
    height, width = image.shape
    if not (-1 < y < height and -1 < x < width):  # also False for NaN
        return 0.0
    y0, x0 = math.floor(y), math.floor(x)
    ly, lx = y - y0, x - x0
    total = 0.0
    for cy, cx, weight in (
        (y0, x0, (1 - ly) * (1 - lx)),
        (y0, x0 + 1, (1 - ly) * lx),
        (y0 + 1, x0, ly * (1 - lx)),
        (y0 + 1, x0 + 1, ly * lx),
    ):
        if 0 <= cy < height and 0 <= cx < width:
            total += weight * float(image[cy, cx])
    return total


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def deform_conv2d(input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None):
    """torchvision.ops.deform_conv2d's formula, element by element (float64)."""
    input, offset, weight = (np.asarray(a, np.float64) for a in (input, offset, weight))
    n_batch, in_channels, height, width = input.shape
    out_channels, group_channels, kh, kw = weight.shape
    groups = in_channels // group_channels
    offset_groups = offset.shape[1] // (2 * kh * kw)
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    out_h = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n_batch, out_channels, out_h, out_w))
    per_offset_group = in_channels // offset_groups
    for n in range(n_batch):
        for o in range(out_channels):
            group = o // (out_channels // groups)
            for h in range(out_h):
                for w in range(out_w):
                    total = 0.0 if bias is None else float(bias[o])
                    for cg in range(group_channels):
                        c = group * group_channels + cg
                        g = c // per_offset_group
                        for i in range(kh):
                            for j in range(kw):
                                k = i * kw + j
                                dy = float(offset[n, g * 2 * kh * kw + 2 * k, h, w])
                                dx = float(offset[n, g * 2 * kh * kw + 2 * k + 1, h, w])
                                y = h * sh - ph + i * dh + dy
                                x = w * sw - pw + j * dw + dx
                                m = 1.0 if mask is None else float(mask[n, g * kh * kw + k, h, w])
                                value = bilinear(input[n, c], y, x)
                                total += float(weight[o, cg, i, j]) * m * value
                    out[n, o, h, w] = total
    return out
