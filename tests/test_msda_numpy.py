"""Multi-scale deformable attention on the NumPy backend, against the loop
oracle (tests/msda_reference.py), finite differences and one-sided
differences at the kinks, float64; float16/bfloat16 bounds are in
test_msda_torch.py (the plain implementation they compare with is torch's)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import cudcn
from cudcn.backends.numpy import msda, parallel
from cudcn.msda_geometry import validate_msda
from msda_reference import calls, floats_as, oracle_backward, oracle_forward

FIELDS = ("value", "sampling_locations", "attention_weights")
ARGUMENTS = ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")


def _check_against_oracle(call, rtol=1e-12):
    out = cudcn.ms_deform_attn(*call.args)
    assert out.shape == (call.value.shape[0], call.sampling_locations.shape[1],
                         call.value.shape[2] * call.value.shape[3])
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, oracle_forward(call.value, call.shapes, call.sampling_locations,
                                                   call.attention_weights), rtol=rtol, atol=rtol)
    grad_output = np.random.default_rng(call.seed).standard_normal(out.shape)
    grads = cudcn.ms_deform_attn_backward(grad_output, *call.args)
    expected = oracle_backward(grad_output, call.value, call.shapes, call.sampling_locations, call.attention_weights)
    for name, e in zip(FIELDS, expected):
        got = getattr(grads, name)
        assert got.shape == getattr(call, name).shape and got.dtype == np.float64, name
        np.testing.assert_allclose(got, e, rtol=rtol, atol=rtol, err_msg=name)


@given(calls())
def test_matches_the_oracle(call):
    """Drawn geometries: 1x1 and non-square levels, L = 1 to 3, P = 1 to 3,
    odd D, N = 0 to 2, Lq = 0 to 3, locations up to 1.5 pixels outside."""
    _check_against_oracle(call)


@given(calls(max_batch=1, max_queries=2, kinks=0.5, sizes=(1, 2, 4)))
def test_matches_the_oracle_on_kinks(call):
    """Half the coordinates exactly on pixel rows and columns -1 .. size
    (sizes powers of two, so that u*W - 0.5 lands on them exactly)."""
    _check_against_oracle(call)


def test_locations_far_outside_and_not_finite_count_zero():
    rng = np.random.default_rng(0)
    value = rng.standard_normal((1, 6, 1, 2))
    shapes, starts = np.array([[2, 3]]), np.array([0])
    locations = np.array([-5.0, 7.0, np.nan, np.inf, -np.inf, 0.5]).reshape(1, 6, 1, 1, 1, 1) * np.ones(2)
    locations[0, 5, 0, 0, 0] = [0.5, 0.5]
    weights = np.ones((1, 6, 1, 1, 1))
    out = cudcn.ms_deform_attn(value, shapes, starts, locations, weights)
    np.testing.assert_array_equal(out[0, :5], 0)
    # (0.5, 0.5) is pixel (0.5, 1): halfway between rows 0 and 1 of column 1.
    np.testing.assert_allclose(out[0, 5], (value[0, 1, 0] + value[0, 4, 0]) / 2, rtol=1e-15)
    grads = cudcn.ms_deform_attn_backward(np.ones_like(out), value, shapes, starts, locations, weights)
    for g in grads:
        assert np.isfinite(g).all()
    np.testing.assert_array_equal(grads.sampling_locations[0, :5], 0)


@given(calls(min_batch=1, max_queries=2))
def test_gradients_are_central_differences(call):
    """Away from the kinks, every gradient element equals the central
    difference of <grad_output, out> (float64)."""
    rng = np.random.default_rng(call.seed)
    out = cudcn.ms_deform_attn(*call.args)
    grad_output = rng.standard_normal(out.shape)
    grads = cudcn.ms_deform_attn_backward(grad_output, *call.args)
    args = dict(zip(ARGUMENTS, call.args))
    eps = 1e-6
    for name in FIELDS:
        flat = args[name].reshape(-1)
        numeric = np.empty(flat.size)
        for index in range(flat.size):
            moved = {}
            for sign in (1, -1):
                changed = flat.copy()
                changed[index] += sign * eps
                moved[sign] = np.vdot(grad_output, cudcn.ms_deform_attn(**dict(args, **{name: changed.reshape(args[name].shape)})))
            numeric[index] = (moved[1] - moved[-1]) / (2 * eps)
        scale = max(1.0, np.abs(numeric).max(initial=0.0))
        np.testing.assert_allclose(getattr(grads, name).reshape(-1), numeric, rtol=0, atol=1e-6 * scale, err_msg=name)


@given(calls(min_batch=1, max_batch=1, max_queries=2, kinks=0.6, sizes=(1, 2, 4)))
def test_location_gradient_is_the_one_sided_difference_towards_plus_one(call):
    """On the kinks -1, 0, .., size - 1, size (and between them), the
    location gradient equals (f(u + eps) - f(u)) / eps element by element:
    the slope towards +1, as for deformable convolution."""
    rng = np.random.default_rng(call.seed)
    out = cudcn.ms_deform_attn(*call.args)
    grad_output = rng.standard_normal(out.shape)
    grads = cudcn.ms_deform_attn_backward(grad_output, *call.args)
    loss = np.vdot(grad_output, out)
    locations = call.sampling_locations
    flat = locations.reshape(-1)
    eps = 2.0**-30  # exact in the locations and in u*W for W a power of two
    numeric = np.empty(flat.size)
    for index in range(flat.size):
        moved = flat.copy()
        moved[index] += eps
        args = list(call.args)
        args[3] = moved.reshape(locations.shape)
        numeric[index] = (np.vdot(grad_output, cudcn.ms_deform_attn(*args)) - loss) / eps
    scale = max(1.0, np.abs(numeric).max(initial=0.0))
    np.testing.assert_allclose(grads.sampling_locations.reshape(-1), numeric, rtol=0, atol=1e-6 * scale)


def test_row_minus_one_has_the_slope_towards_row_zero():
    """A 2x2 level; location (u, v) = (0.25, -0.25) is pixel (y, x) = (-1, 0)
    exactly: value 0, slope towards row 0 (grid_sample's and torchvision's
    rule), times H = 2 in normalised units."""
    value = np.array([1.0, 2.0, 3.0, 5.0]).reshape(1, 4, 1, 1)
    shapes, starts = np.array([[2, 2]]), np.array([0])
    locations = np.array([0.25, -0.25]).reshape(1, 1, 1, 1, 1, 2)  # (x, y) = pixel (0, -1)
    weights = np.full((1, 1, 1, 1, 1), 0.5)
    out = cudcn.ms_deform_attn(value, shapes, starts, locations, weights)
    assert out[0, 0, 0] == 0
    grads = cudcn.ms_deform_attn_backward(np.ones_like(out), value, shapes, starts, locations, weights)
    assert grads.sampling_locations[0, 0, 0, 0, 0, 1] == 0.5 * 1.0 * 2  # a * pixel (0, 0) * H
    assert grads.sampling_locations[0, 0, 0, 0, 0, 0] == 0  # along row -1 the value stays 0
    assert grads.attention_weights[0, 0, 0, 0, 0] == 0
    np.testing.assert_array_equal(grads.value, 0)


def test_equals_a_plain_weighted_sum_at_pixel_centres():
    """Locations at pixel centres sample the pixels themselves: the output is
    a plain weighted sum of value rows (an exact identity)."""
    rng = np.random.default_rng(3)
    shapes = np.array([[3, 4], [2, 2]])
    starts = np.array([0, 12])
    value = rng.standard_normal((2, 16, 2, 3))
    rows = [rng.integers(0, 3, (2, 5, 2, 2)), rng.integers(0, 2, (2, 5, 2, 2))]
    cols = [rng.integers(0, 4, (2, 5, 2, 2)), rng.integers(0, 2, (2, 5, 2, 2))]
    locations = np.empty((2, 5, 2, 2, 2, 2))
    expected = np.zeros((2, 5, 2, 3))
    weights = rng.standard_normal((2, 5, 2, 2, 2))
    for level, (height, width) in enumerate(shapes):
        locations[:, :, :, level, :, 0] = (cols[level] + 0.5) / width
        locations[:, :, :, level, :, 1] = (rows[level] + 0.5) / height
        pixel = starts[level] + rows[level] * width + cols[level]  # (N, Lq, M, P)
        for n, q, m, p in np.ndindex(pixel.shape):
            expected[n, q, m] += weights[n, q, m, level, p] * value[n, pixel[n, q, m, p], m]
    out = cudcn.ms_deform_attn(value, shapes, starts, locations, weights)
    np.testing.assert_allclose(out, expected.reshape(2, 5, 6), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_types_compute_in_float32_and_return_theirs(dtype):
    """float16/bfloat16: exactly the float32 computation on the same values, rounded once."""
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    rng = np.random.default_rng(1)
    shapes, starts = np.array([[4, 5], [2, 3]], np.int32), np.array([0, 20], np.int32)
    value = rng.standard_normal((2, 26, 2, 4)).astype(dtype)
    locations = rng.uniform(-0.1, 1.1, (2, 7, 2, 2, 3, 2)).astype(dtype)
    weights = rng.random((2, 7, 2, 2, 3)).astype(dtype)
    grad_output = rng.standard_normal((2, 7, 8)).astype(dtype)
    args = (value, shapes, starts, locations, weights)
    single = floats_as(np.float32, args)
    out = cudcn.ms_deform_attn(*args)
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, cudcn.ms_deform_attn(*single).astype(dtype))
    grads = cudcn.ms_deform_attn_backward(grad_output, *args)
    expected = cudcn.ms_deform_attn_backward(grad_output.astype(np.float32), *single)
    for name in FIELDS:
        assert getattr(grads, name).dtype == np.dtype(dtype)
        np.testing.assert_array_equal(getattr(grads, name), getattr(expected, name).astype(dtype))


def test_float32_is_float64_to_single_precision():
    rng = np.random.default_rng(2)
    shapes, starts = np.array([[4, 5], [2, 3]]), np.array([0, 20])
    args = floats_as(np.float32, (rng.standard_normal((2, 26, 2, 4)), shapes, starts,
                                   rng.uniform(-0.1, 1.1, (2, 7, 2, 2, 3, 2)), rng.random((2, 7, 2, 2, 3))))
    grad_output = rng.standard_normal((2, 7, 8)).astype(np.float32)
    out = cudcn.ms_deform_attn(*args)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, cudcn.ms_deform_attn(*floats_as(np.float64, args)), rtol=1e-5, atol=1e-5)
    grads = cudcn.ms_deform_attn_backward(grad_output, *args)
    exact = cudcn.ms_deform_attn_backward(*floats_as(np.float64, [grad_output, *args]))
    for name in FIELDS:
        assert getattr(grads, name).dtype == np.float32
        np.testing.assert_allclose(getattr(grads, name), getattr(exact, name), rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("cpus", [2, 3])
def test_results_do_not_depend_on_parts_and_chunks(monkeypatch, cpus):
    """Parts and chunks that split an image's queries, or span images, give
    the same results (the value gradient adds the parts in a fixed order)."""
    rng = np.random.default_rng(5)
    shapes, starts = np.array([[5, 6], [3, 3]]), np.array([0, 30])
    args = (rng.standard_normal((3, 39, 2, 3)), shapes, starts,
            rng.uniform(-0.1, 1.1, (3, 7, 2, 2, 2, 2)), rng.standard_normal((3, 7, 2, 2, 2)))
    grad_output = rng.standard_normal((3, 7, 6))
    monkeypatch.setattr(parallel, "cpu_count", lambda: 1)
    out = cudcn.ms_deform_attn(*args)
    grads = cudcn.ms_deform_attn_backward(grad_output, *args)
    monkeypatch.setattr(parallel, "cpu_count", lambda: cpus)
    monkeypatch.setattr(msda, "_MIN_PART_POINTS", 1)
    with cudcn.workspace_bytes(5 * 2 * 2 * 2 * msda._BYTES_PER_POINT):  # chunks of 5 (image, query) pairs
        assert len(msda._chunks(validate_msda(**dict(zip(ARGUMENTS, args))))) == 5
        np.testing.assert_allclose(cudcn.ms_deform_attn(*args), out, rtol=1e-14, atol=1e-14)
        split = cudcn.ms_deform_attn_backward(grad_output, *args)
    for name in FIELDS:
        np.testing.assert_allclose(getattr(split, name), getattr(grads, name), rtol=1e-13, atol=1e-13)


@given(calls(min_batch=1), st.booleans())
def test_inputs_are_not_modified(call, non_contiguous):
    args = list(call.args)
    if non_contiguous:  # the same values through strided views
        args = [np.asfortranarray(a) if a.ndim > 1 else a for a in args]
    before = [a.copy() for a in args]
    out = cudcn.ms_deform_attn(*args)
    cudcn.ms_deform_attn_backward(np.ones_like(out), *args)
    for a, b in zip(args, before):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(out, cudcn.ms_deform_attn(*call.args))
