"""The references the GPU tests rely on, checked against the NumPy backend at small size."""

from __future__ import annotations

import numpy as np
import pytest

import cudcn
from reference import ShiftedGradients


@pytest.mark.parametrize("dy, dx", [(1, -2), (0, 0), (-1, 1)])
def test_shifted_gradients_match_the_numpy_backend(dy, dx):
    rng = np.random.default_rng(5)
    c, o, h, w = 3, 2, 7, 6
    x = rng.standard_normal((c, h, w))
    weight = rng.standard_normal((o, c, 3, 3))
    grad_output = rng.standard_normal((o, h, w))
    mask = rng.uniform(0, 1, (9, h, w))
    offset = np.zeros((1, 18, h, w))
    offset[:, 0::2], offset[:, 1::2] = dy, dx
    grads = cudcn.deform_conv2d_backward(grad_output[None], x[None], offset, weight, padding=1, mask=mask[None])
    reference = ShiftedGradients(x, weight, grad_output, mask, dy, dx)
    np.testing.assert_allclose(reference.weight_gradient(), grads.weight, rtol=1e-12, atol=1e-12)
    for y in range(h):
        for xx in range(w):
            np.testing.assert_allclose(reference.input_gradient(y, xx), grads.input[0, :, y, xx], atol=1e-12)
    checked = 0
    for hh in range(h):
        for ww in range(w):
            samples = [(hh - 1 + k // 3 + dy, ww - 1 + k % 3 + dx) for k in range(9)]
            if not all(0 <= y < h and 0 <= xx < w for y, xx in samples):
                continue  # the reference's offset gradient holds for samples inside the image
            offset_grad, mask_grad = reference.offset_and_mask_gradients(hh, ww)
            np.testing.assert_allclose(offset_grad, grads.offset[0, :, hh, ww].reshape(9, 2), atol=1e-12)
            np.testing.assert_allclose(mask_grad, grads.mask[0, :, hh, ww], atol=1e-12)
            checked += 1
    assert checked >= 4
