"""NumPy backend gradients: adjoint identity, finite differences, building blocks."""

from __future__ import annotations

import numpy as np
from hypothesis import given

import cudcn
from strategies import calls

FIELDS = ("input", "offset", "weight", "bias", "mask")


def _geometry_kwargs(call):
    return dict(kernel_size=call.kernel_size, stride=call.stride, padding=call.padding, dilation=call.dilation)


@given(calls(wild_offsets=True))
def test_col2im_is_the_adjoint_of_im2col(call):
    """<col2im(G), X> = <G, im2col(X)> for any column gradient G (float64)."""
    rng = np.random.default_rng(call.seed)
    columns = cudcn.deform_im2col(call.input, call.offset, mask=call.mask, **_geometry_kwargs(call))
    grad_columns = rng.standard_normal(columns.shape)
    grad_input = cudcn.deform_col2im(grad_columns, call.offset, call.input.shape, mask=call.mask, **_geometry_kwargs(call))
    assert grad_input.shape == call.input.shape
    lhs = np.vdot(grad_input, call.input)
    rhs = np.vdot(grad_columns, columns)
    assert abs(lhs - rhs) <= 1e-12 * max(1.0, np.abs(grad_columns).sum() * np.abs(call.input).max(initial=0.0))


@given(calls())
def test_im2col_layout(call):
    """columns[n, h*Wo + w, i*kw + j, c] is input channel c sampled at kernel point (i, j)."""
    columns = cudcn.deform_im2col(call.input, call.offset, mask=call.mask, **_geometry_kwargs(call))
    n, c, _, _ = call.input.shape
    out_h, out_w = call.offset.shape[2:]
    kh, kw = call.kernel_size
    assert columns.shape == (n, out_h * out_w, kh * kw, c)
    # Summing the columns against the weight must give the convolution.
    if call.groups == 1:
        weight = call.weight.reshape(call.weight.shape[0], c, kh * kw)
        out = np.einsum("nlkc,ock->nol", columns, weight).reshape(n, weight.shape[0], out_h, out_w)
        kwargs = dict(call.kwargs, bias=None)
        np.testing.assert_allclose(out, cudcn.deform_conv2d(**kwargs), rtol=1e-11, atol=1e-11)


def _loss_and_grads(call):
    rng = np.random.default_rng(call.seed + 7)
    out = cudcn.deform_conv2d(**call.kwargs)
    grad_output = rng.standard_normal(out.shape)
    return grad_output, cudcn.deform_conv2d_backward(grad_output, **call.kwargs)


@given(calls(min_batch=1))
def test_every_gradient_matches_central_finite_differences(call):
    """Directional derivatives along random directions, one argument at a time."""
    grad_output, grads = _loss_and_grads(call)
    rng = np.random.default_rng(call.seed + 11)
    step = 1e-6
    for name in FIELDS:
        value = getattr(call, name)
        if value is None:
            assert getattr(grads, name) is None
            continue
        gradient = getattr(grads, name)
        assert gradient.shape == value.shape and gradient.dtype == value.dtype
        direction = rng.standard_normal(value.shape)

        def loss(sign):
            moved = dict(call.kwargs, **{name: value + sign * step * direction})
            return np.vdot(grad_output, cudcn.deform_conv2d(**moved))

        numeric = (loss(1) - loss(-1)) / (2 * step)
        analytic = np.vdot(gradient, direction)
        scale = np.abs(gradient).sum() * np.abs(direction).max() + 1.0
        assert abs(numeric - analytic) <= 1e-6 * scale, name


@given(calls(min_batch=1, max_batch=1, max_size=4))
def test_offset_gradient_elementwise_by_finite_differences(call):
    """Every single offset and mask entry, not only directions."""
    grad_output, grads = _loss_and_grads(call)
    step = 1e-6
    for name in ("offset", "mask"):
        value = getattr(call, name)
        if value is None:
            continue
        numeric = np.empty_like(value)
        for index in np.ndindex(value.shape):
            plus, minus = value.copy(), value.copy()
            plus[index] += step
            minus[index] -= step
            numeric[index] = (
                np.vdot(grad_output, cudcn.deform_conv2d(**dict(call.kwargs, **{name: plus})))
                - np.vdot(grad_output, cudcn.deform_conv2d(**dict(call.kwargs, **{name: minus})))
            ) / (2 * step)
        np.testing.assert_allclose(getattr(grads, name), numeric, rtol=1e-5, atol=1e-6)


@given(calls(wild_offsets=True))
def test_gradients_are_finite_for_nonfinite_offsets(call):
    _, grads = _loss_and_grads(call)
    for name in FIELDS:
        if getattr(grads, name) is not None:
            assert np.isfinite(getattr(grads, name)).all(), name


@given(calls())
def test_building_blocks_compose_the_backward(call):
    """col2im and col2im_coord of W^T grad_output are the backward's input, offset and mask gradients."""
    if call.groups != 1:
        return
    grad_output, grads = _loss_and_grads(call)
    n, c = call.input.shape[:2]
    kh, kw = call.kernel_size
    out_h, out_w = call.offset.shape[2:]
    weight = call.weight.reshape(call.weight.shape[0], c, kh * kw)
    grad_columns = np.einsum("nol,ock->nlkc", grad_output.reshape(n, grad_output.shape[1], out_h * out_w), weight)
    geometry = _geometry_kwargs(call)
    grad_input = cudcn.deform_col2im(grad_columns, call.offset, call.input.shape, mask=call.mask, **geometry)
    grad_offset, grad_mask = cudcn.deform_col2im_coord(grad_columns, call.input, call.offset, mask=call.mask, **geometry)
    np.testing.assert_allclose(grad_input, grads.input, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(grad_offset, grads.offset, rtol=1e-11, atol=1e-11)
    if call.mask is None:
        assert grad_mask is None
    else:
        np.testing.assert_allclose(grad_mask, grads.mask, rtol=1e-11, atol=1e-11)


def test_backward_chunking_and_empty_batch():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((33, 3, 6, 6))
    offset = rng.standard_normal((33, 2 * 9, 6, 6))
    weight = rng.standard_normal((4, 3, 3, 3))
    bias = rng.standard_normal(4)
    mask = rng.random((33, 9, 6, 6))
    grad_output = rng.standard_normal((33, 4, 6, 6))
    whole = cudcn.deform_conv2d_backward(grad_output, x, offset, weight, bias, padding=1, mask=mask)
    with cudcn.workspace_bytes(5 * 36 * 9 * 3 * 8):  # five images per chunk
        chunked = cudcn.deform_conv2d_backward(grad_output, x, offset, weight, bias, padding=1, mask=mask)
    for name in FIELDS:
        np.testing.assert_allclose(getattr(chunked, name), getattr(whole, name), rtol=1e-12, atol=1e-12)

    empty = cudcn.deform_conv2d_backward(grad_output[:0], x[:0], offset[:0], weight, bias, padding=1, mask=mask[:0])
    assert empty.input.shape == (0, 3, 6, 6) and empty.offset.shape == (0, 18, 6, 6)
    assert empty.mask.shape == (0, 9, 6, 6)
    np.testing.assert_array_equal(empty.weight, np.zeros_like(weight))
    np.testing.assert_array_equal(empty.bias, np.zeros_like(bias))


def test_backward_leaves_arguments_untouched_and_keeps_float32():
    rng = np.random.default_rng(4)
    args = [rng.standard_normal(s).astype(np.float32) for s in ((2, 4, 5, 5), (2, 36, 5, 5), (3, 4, 3, 3))]
    mask = rng.random((2, 18, 5, 5)).astype(np.float32)
    grad_output = rng.standard_normal((2, 3, 5, 5)).astype(np.float32)
    copies = [a.copy() for a in (*args, mask, grad_output)]
    grads = cudcn.deform_conv2d_backward(grad_output, *args, padding=1, mask=mask)
    for original, copy in zip((*args, mask, grad_output), copies):
        np.testing.assert_array_equal(original, copy)
    reference = cudcn.deform_conv2d_backward(
        grad_output.astype(np.float64), *[a.astype(np.float64) for a in args], padding=1, mask=mask.astype(np.float64)
    )
    for name in ("input", "offset", "weight", "mask"):
        got = getattr(grads, name)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, getattr(reference, name), rtol=1e-4, atol=1e-4)
