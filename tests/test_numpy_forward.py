"""NumPy backend forward: against the loop oracle and exact identities."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import cudcn
from cudcn import oracle
from reference import conv2d, shift
from strategies import calls


@given(calls())
def test_forward_matches_oracle(call):
    got = cudcn.deform_conv2d(**call.kwargs)
    expected = oracle.deform_conv2d(**call.kwargs)
    assert got.shape == expected.shape
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


@given(calls(wild_offsets=True))
def test_nonfinite_and_huge_offsets_count_zero(call):
    got = cudcn.deform_conv2d(**call.kwargs)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, oracle.deform_conv2d(**call.kwargs), rtol=1e-12, atol=1e-12)


@given(calls(with_mask=False))
def test_zero_offset_is_ordinary_convolution(call):
    kwargs = dict(call.kwargs, offset=np.zeros_like(call.offset))
    expected = conv2d(call.input, call.weight, call.bias, call.stride, call.padding, call.dilation)
    np.testing.assert_allclose(cudcn.deform_conv2d(**kwargs), expected, rtol=1e-12, atol=1e-12)


@given(calls(with_mask=False), st.integers(-3, 3), st.integers(-3, 3))
def test_integer_offset_is_shifted_convolution(call, dy, dx):
    offset = np.zeros_like(call.offset)
    offset[:, 0::2] = dy
    offset[:, 1::2] = dx
    kwargs = dict(call.kwargs, offset=offset)
    # Shift the zero-padded image, so that pixels move in from the padding too.
    ph, pw = call.padding
    padded = np.pad(call.input, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    expected = conv2d(shift(padded, dy, dx), call.weight, call.bias, call.stride, (0, 0), call.dilation)
    np.testing.assert_allclose(cudcn.deform_conv2d(**kwargs), expected, rtol=1e-12, atol=1e-12)


@given(calls(with_mask=True))
def test_mask_of_ones_equals_no_mask(call):
    with_ones = cudcn.deform_conv2d(**dict(call.kwargs, mask=np.ones_like(call.mask)))
    without = cudcn.deform_conv2d(**dict(call.kwargs, mask=None))
    np.testing.assert_allclose(with_ones, without, rtol=1e-13, atol=1e-13)


@given(calls(with_mask=True, with_bias=False), st.floats(-2, 2), st.floats(-2, 2))
def test_linear_in_weight_mask_and_input(call, a, b):
    rng = np.random.default_rng(call.seed + 1)
    for name in ("weight", "mask", "input"):
        other = rng.standard_normal(getattr(call, name).shape)
        one = cudcn.deform_conv2d(**call.kwargs)
        two = cudcn.deform_conv2d(**dict(call.kwargs, **{name: other}))
        mixed = cudcn.deform_conv2d(**dict(call.kwargs, **{name: a * getattr(call, name) + b * other}))
        np.testing.assert_allclose(mixed, a * one + b * two, rtol=1e-10, atol=1e-10)


@given(calls())
def test_grouped_call_is_concatenation_of_per_group_calls(call):
    groups, og = call.groups, call.offset_groups
    cg = call.input.shape[1] // groups
    out_g = call.weight.shape[0] // groups
    k = call.weight.shape[2] * call.weight.shape[3]
    parts = []
    for g in range(groups):
        channels = slice(g * cg, (g + 1) * cg)
        # Offset groups cut across convolution groups: give each group's
        # channels the offsets (and mask) of the offset group they belong to,
        # by repeating per channel block into a call with one offset group per block.
        blocks = []
        mask_blocks = []
        per_og = call.input.shape[1] // og
        for c in range(g * cg, (g + 1) * cg):
            o = c // per_og
            blocks.append(call.offset[:, o * 2 * k:(o + 1) * 2 * k])
            if call.mask is not None:
                mask_blocks.append(call.mask[:, o * k:(o + 1) * k])
        parts.append(cudcn.deform_conv2d(
            call.input[:, channels],
            np.concatenate(blocks, axis=1),
            call.weight[g * out_g:(g + 1) * out_g],
            None if call.bias is None else call.bias[g * out_g:(g + 1) * out_g],
            call.stride, call.padding, call.dilation,
            None if call.mask is None else np.concatenate(mask_blocks, axis=1),
        ))
    np.testing.assert_allclose(cudcn.deform_conv2d(**call.kwargs), np.concatenate(parts, axis=1), rtol=1e-12, atol=1e-12)


@given(calls(min_batch=1, max_batch=3))
def test_result_does_not_depend_on_chunking(call):
    whole = cudcn.deform_conv2d(**call.kwargs)
    with cudcn.workspace_bytes(1):  # one image per chunk
        chunked = cudcn.deform_conv2d(**call.kwargs)
    np.testing.assert_allclose(whole, chunked, rtol=1e-13, atol=1e-13)


def test_batch_not_dividing_the_chunk_size():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((33, 2, 5, 5))
    offset = rng.standard_normal((33, 18, 5, 5))
    weight = rng.standard_normal((3, 2, 3, 3))
    mask = rng.random((33, 9, 5, 5))
    whole = cudcn.deform_conv2d(x, offset, weight, padding=1, mask=mask)
    with cudcn.workspace_bytes(4 * 25 * 9 * 2 * 8):  # four images per chunk
        chunked = cudcn.deform_conv2d(x, offset, weight, padding=1, mask=mask)
    np.testing.assert_allclose(chunked, whole, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(whole[7:9], oracle.deform_conv2d(x[7:9], offset[7:9], weight, padding=1, mask=mask[7:9]), rtol=1e-12)


def test_empty_batch_gives_empty_output():
    out = cudcn.deform_conv2d(np.zeros((0, 4, 6, 6)), np.zeros((0, 18, 4, 4)), np.ones((5, 4, 3, 3)), np.ones(5))
    assert out.shape == (0, 5, 4, 4)
    assert out.dtype == np.float64


def test_non_contiguous_inputs_and_inputs_untouched():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 6, 7, 8)).transpose(0, 1, 3, 2)[:, ::2]  # (2, 3, 8, 7), strided
    offset = np.asfortranarray(rng.standard_normal((2, 18, 6, 5)))
    weight = rng.standard_normal((4, 3, 3, 3))[:, :, ::-1]
    mask = rng.random((2, 9, 12, 5))[:, :, ::2]
    copies = [a.copy() for a in (x, offset, weight, mask)]
    got = cudcn.deform_conv2d(x, offset, weight, mask=mask)
    np.testing.assert_allclose(got, oracle.deform_conv2d(x, offset, weight, mask=mask), rtol=1e-12)
    for original, copy in zip((x, offset, weight, mask), copies):
        np.testing.assert_array_equal(original, copy)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_low_precision_returns_its_dtype_and_is_accurate(dtype):
    """Half types compute in float32: error at most twice float32-rounding of the inputs."""
    if dtype == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        dtype = ml_dtypes.bfloat16
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(5)
    args = [rng.standard_normal(s) for s in ((2, 8, 9, 9), (2, 18, 9, 9), (6, 8, 3, 3))]
    args[1] = args[1] * 2
    mask = rng.random((2, 9, 9, 9))
    low = [a.astype(dtype) for a in args] + [mask.astype(dtype)]
    got = cudcn.deform_conv2d(low[0], low[1], low[2], padding=1, mask=low[3])
    assert got.dtype == dtype
    # The exact result for the rounded inputs, rounded once to the dtype, is
    # what a perfect low-precision implementation returns.
    exact = oracle.deform_conv2d(*[a.astype(np.float64) for a in low[:3]], padding=1, mask=low[3].astype(np.float64))
    rounding = np.abs(exact.astype(dtype).astype(np.float64) - exact).max()
    error = np.abs(got.astype(np.float64) - exact).max()
    assert error <= 2 * rounding + 1e-6 * np.abs(exact).max()


@pytest.mark.parametrize("batch", [0, 2])
def test_no_output_channels_give_an_empty_output_and_zero_gradients(batch):
    """A weight (0, C_in/groups, kh, kw) is a valid, empty convolution: torch's
    conv2d accepts it too."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 4, 5, 5))
    offset = rng.standard_normal((batch, 18, 5, 5))
    mask = rng.random((batch, 9, 5, 5))
    weight, bias = np.ones((0, 2, 3, 3)), np.ones(0)
    out = cudcn.deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)
    assert out.shape == (batch, 0, 5, 5) and out.dtype == x.dtype
    grads = cudcn.deform_conv2d_backward(np.ones(out.shape), x, offset, weight, bias, padding=1, mask=mask)
    for got, arg in zip(grads, (x, offset, weight, bias, mask)):
        assert got.shape == arg.shape and not got.any()
