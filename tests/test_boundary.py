"""Gradients at the kinks: integer sampling positions, the image border included.

At an integer y (or x) the bilinear sample has a kink; cudcn, like
torchvision, returns the one-sided derivative towards y + 1 everywhere,
including y = -1 (value 0, slope towards row 0) and y = H - 1, H. These tests
need no torchvision: they compare against one-sided finite differences in
float64 and against the loop oracle's gradients.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import cudcn
from cudcn import oracle
from strategies import calls, offsets_on_kinks

FIELDS = ("input", "offset", "weight", "bias", "mask")


@given(calls(min_batch=1))
def test_offset_gradient_is_the_one_sided_difference_towards_plus_one(call):
    """Every sampling point on -1, 0, interior, H-1 or H (rows and columns):
    the analytic offset gradient equals (f(offset + eps) - f(offset)) / eps,
    element by element (float64)."""
    rng = np.random.default_rng(call.seed)
    call.offset = offsets_on_kinks(call, rng)
    out = cudcn.deform_conv2d(**call.kwargs)
    grad_output = rng.standard_normal(out.shape)
    grads = cudcn.deform_conv2d_backward(grad_output, **call.kwargs)
    eps = 1e-7
    loss = np.vdot(grad_output, out)
    flat = call.offset.reshape(-1)
    numeric = np.empty(flat.size)
    for index in range(flat.size):
        moved = flat.copy()
        moved[index] += eps
        kwargs = dict(call.kwargs, offset=moved.reshape(call.offset.shape))
        numeric[index] = (np.vdot(grad_output, cudcn.deform_conv2d(**kwargs)) - loss) / eps
    scale = max(1.0, np.abs(numeric).max(initial=0.0))
    np.testing.assert_allclose(grads.offset.reshape(-1), numeric, rtol=0, atol=1e-5 * scale)


@given(calls(max_batch=1, max_size=5), st.floats(0.3, 1.0))
def test_every_gradient_matches_the_oracle_on_kinks(call, fraction):
    """The NumPy backend's five gradients equal the loop oracle's, with many
    points on integer positions and the border (float64)."""
    rng = np.random.default_rng(call.seed)
    call.offset = offsets_on_kinks(call, rng, fraction)
    out = oracle.deform_conv2d(**call.kwargs)
    np.testing.assert_allclose(cudcn.deform_conv2d(**call.kwargs), out, rtol=1e-12, atol=1e-12)
    grad_output = rng.standard_normal(out.shape)
    expected = oracle.deform_conv2d_backward(grad_output, **call.kwargs)
    got = cudcn.deform_conv2d_backward(grad_output, **call.kwargs)
    for name, g, e in zip(FIELDS, got, expected):
        if e is None:
            assert g is None, name
        else:
            np.testing.assert_allclose(g, e, rtol=1e-11, atol=1e-11, err_msg=name)


def test_row_minus_one_has_the_slope_towards_row_zero():
    """The torchvision example: zero offsets, padding 1, so the first output
    row samples row -1 exactly. Its row-offset gradient is the slope towards
    row 0 (paddle and mmcv return 0 there)."""
    rng = np.random.default_rng(0)
    x = rng.random((1, 1, 4, 4))
    w = np.ones((1, 1, 3, 3))
    offset = np.zeros((1, 18, 4, 4))
    grads = cudcn.deform_conv2d_backward(np.ones((1, 1, 4, 4)), x, offset, w, padding=1)
    # Kernel point (0, 1) of output (0, 0) samples (y, x) = (-1, 0): the slope
    # towards row 0 is x[0, 0, 0, 0].
    k = 0 * 3 + 1
    assert grads.offset[0, 2 * k, 0, 0] == pytest.approx(x[0, 0, 0, 0], abs=1e-15)
    # Its column derivative is 0: the value is 0 along all of row -1.
    assert grads.offset[0, 2 * k + 1, 0, 0] == 0
    # Kernel point (1, 0) of output (0, 0) samples (0, -1): column slope towards column 0.
    k = 1 * 3 + 0
    assert grads.offset[0, 2 * k + 1, 0, 0] == pytest.approx(x[0, 0, 0, 0], abs=1e-15)
    # The value there is 0: no input gradient and no change in the forward.
    building_blocks = dict(kernel_size=3, padding=1)
    columns = cudcn.deform_im2col(x, offset, **building_blocks)
    assert columns[0, 0, 1, 0] == 0 and columns[0, 0, 3, 0] == 0


def test_oracle_slope_at_the_border():
    image = np.array([[1.0, 2.0], [3.0, 5.0]])
    assert oracle.bilinear_slope(image, -1.0, 0.0) == (1.0, 0.0)
    assert oracle.bilinear_slope(image, 0.0, -1.0) == (0.0, 1.0)
    assert oracle.bilinear_slope(image, 1.0, 0.0) == (-3.0, 2.0)  # towards row 2, outside
    assert oracle.bilinear_slope(image, 2.0, 0.0) == (0.0, 0.0)
    assert oracle.bilinear_slope(image, -1.5, 0.0) == (0.0, 0.0)
    assert oracle.bilinear_slope(image, float("nan"), 0.0) == (0.0, 0.0)
