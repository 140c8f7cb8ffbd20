"""Independent references for exact identities: an ordinary convolution and a shift.

Written with NumPy padding and slicing, sharing nothing with cudcn.
"""

from __future__ import annotations

import numpy as np


def conv2d(input, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """Plain grouped 2-D cross-correlation, (N, C, H, W) -> (N, O, Ho, Wo), float64."""
    n, c, h, w = input.shape
    o, cg, kh, kw = weight.shape
    groups = c // cg
    padded = np.pad(np.asarray(input, np.float64), ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2))
    out_h = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = np.zeros((n, o, out_h, out_w))
    og = o // groups
    for g in range(groups):
        x = padded[:, g * cg:(g + 1) * cg]
        wg = np.asarray(weight[g * og:(g + 1) * og], np.float64)
        for i in range(kh):
            for j in range(kw):
                r0, c0 = i * dilation[0], j * dilation[1]
                window = x[:, :, r0:r0 + stride[0] * (out_h - 1) + 1:stride[0], c0:c0 + stride[1] * (out_w - 1) + 1:stride[1]]
                out[:, g * og:(g + 1) * og] += np.einsum("nchw,oc->nohw", window, wg[:, :, i, j])
    if bias is not None:
        out += np.asarray(bias, np.float64).reshape(1, -1, 1, 1)
    return out


def shift(input, dy: int, dx: int):
    """out[..., y, x] = input[..., y + dy, x + dx], zero where that is outside."""
    out = np.zeros_like(input)
    h, w = input.shape[-2:]
    ys, yd = slice(max(dy, 0), h + min(dy, 0)), slice(max(-dy, 0), h + min(-dy, 0))
    xs, xd = slice(max(dx, 0), w + min(dx, 0)), slice(max(-dx, 0), w + min(-dx, 0))
    out[..., yd, xd] = input[..., ys, xs]
    return out
