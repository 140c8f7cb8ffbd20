"""Forward and all five gradients against paddle.vision.ops.deform_conv2d (CPU, float64).

paddle's op requires C_out divisible by the offset groups; cudcn does not, so
the drawn calls respect that restriction here only.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings

import cudcn
from strategies import calls

paddle = pytest.importorskip("paddle")
pytestmark = pytest.mark.paddle


def paddle_forward_backward(call, grad_output):
    tensors = {
        name: paddle.to_tensor(getattr(call, name), stop_gradient=False)
        for name in ("input", "offset", "weight", "bias", "mask")
        if getattr(call, name) is not None
    }
    out = paddle.vision.ops.deform_conv2d(
        tensors["input"], tensors["offset"], tensors["weight"], tensors.get("bias"),
        stride=list(call.stride), padding=list(call.padding), dilation=list(call.dilation),
        deformable_groups=call.offset_groups, groups=call.groups, mask=tensors.get("mask"),
    )
    out.backward(paddle.to_tensor(grad_output))
    return out.numpy(), {name: t.grad.numpy() for name, t in tensors.items()}


@settings(max_examples=20)
@given(calls(min_batch=1, out_divisible_by_offset_groups=True))
def test_matches_paddle_float64(call):
    out = cudcn.deform_conv2d(**call.kwargs)
    grad_output = np.random.default_rng(call.seed).standard_normal(out.shape)
    expected_out, expected_grads = paddle_forward_backward(call, grad_output)
    np.testing.assert_allclose(out, expected_out, rtol=1e-10, atol=1e-10)
    grads = cudcn.deform_conv2d_backward(grad_output, **call.kwargs)
    for name, expected in expected_grads.items():
        np.testing.assert_allclose(getattr(grads, name), expected, rtol=1e-10, atol=1e-10, err_msg=name)
