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


class ShiftedGradients:
    """The gradients of a deformable convolution whose offsets are one integer shift.

    3x3 kernel, stride 1, padding 1, one image, one group: x (C, H, W),
    weight (O, C, 3, 3), grad_output (O, H, W), mask (9, H, W). Every kernel
    point k = 3i + j of output pixel (h, w) samples x exactly at the pixel
    (h - 1 + i + dy, w - 1 + j + dx), so each gradient is a sum of shifted
    products (float64; NumPy or CuPy arrays alike). The offset gradient is
    the one-sided slope towards +1 (zero beyond the image), valid where the
    sample lies inside the image. Everything but the weight gradient is
    evaluated at single pixels, so that it stays cheap at any image size.
    """

    def __init__(self, x, weight, grad_output, mask, dy: int, dx: int) -> None:
        self.x, self.weight, self.grad_output, self.mask = x, weight, grad_output, mask
        self.dy, self.dx = dy, dx
        self.height, self.width = x.shape[1:]

    def _sample_at(self, h: int, w: int, k: int) -> tuple[int, int]:
        return h - 1 + k // 3 + self.dy, w - 1 + k % 3 + self.dx

    def _pixel(self, y: int, x: int):
        """x[:, y, x] in float64, zero outside the image."""
        if 0 <= y < self.height and 0 <= x < self.width:
            return self.x[:, y, x].astype(np.float64)
        return self.x[:, 0, 0].astype(np.float64) * 0

    def columns(self, h: int, w: int):
        """Column gradients of output pixel (h, w): (9, C), before the mask."""
        wk = self.weight.astype(np.float64).reshape(*self.weight.shape[:2], 9)
        return (wk * self.grad_output[:, h, w].astype(np.float64).reshape(-1, 1, 1)).sum(axis=0).T

    def weight_gradient(self):
        """(O, C, 3, 3): for each k, (grad_output * mask_k) summed with the shifted image over pixels."""
        o, c = self.weight.shape[:2]
        grad = self.weight.astype(np.float64) * 0
        x = self.x.astype(np.float64)
        for k in range(9):
            sampled = shift(x, k // 3 - 1 + self.dy, k % 3 - 1 + self.dx).reshape(c, -1)
            weighted = (self.grad_output.astype(np.float64) * self.mask[k].astype(np.float64)).reshape(o, -1)
            grad[:, :, k // 3, k % 3] = weighted @ sampled.T
        return grad

    def input_gradient(self, y: int, x: int):
        """(C,) at input pixel (y, x): every (output pixel, kernel point) sampling it."""
        total = self._pixel(0, 0) * 0
        for k in range(9):
            h, w = y + 1 - k // 3 - self.dy, x + 1 - k % 3 - self.dx
            if 0 <= h < self.height and 0 <= w < self.width:
                total = total + float(self.mask[k, h, w]) * self.columns(h, w)[k]
        return total

    def offset_and_mask_gradients(self, h: int, w: int):
        """((9, 2) offset gradient (dy, dx), (9,) mask gradient) of output pixel (h, w)."""
        columns = self.columns(h, w)
        offset, mask = [], []
        for k in range(9):
            y, x = self._sample_at(h, w, k)
            here = self._pixel(y, x)
            weighted = columns[k] * float(self.mask[k, h, w])
            offset.append([float((weighted * (self._pixel(y + 1, x) - here)).sum()),
                           float((weighted * (self._pixel(y, x + 1) - here)).sum())])
            mask.append(float((columns[k] * here).sum()))
        return np.array(offset), np.array(mask)
