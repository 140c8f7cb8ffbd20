"""The shared bilinear-sampling core (cudcn/backends/numpy/sampling.py) on its own.

The operator tests check the core through deformable convolution and
attention; these pin down what a new front-end relies on: several points
summed into one row, one image size per point (broadcast, as for levels), a
per-point weight, and gradients in pixel units, the one-sided ones at kinks.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cudcn.backends.numpy import sampling as core


def _images(rng, sizes, channels):
    """X for one image per size, each pixel a row, the zero row last; first columns."""
    firsts = np.cumsum([0] + [h * w for h, w in sizes])
    pixels = core.pixel_rows(int(firsts[-1]), channels, np.dtype(np.float64))
    pixels[:-1] = rng.standard_normal((int(firsts[-1]), channels))
    return pixels, firsts[:-1]


def _bilinear(image, y, x):
    """The formula: image (H, W, C) at (y, x), zero outside, 0 beyond the window."""
    height, width = image.shape[:2]
    if not (-1 < y < height and -1 < x < width):
        return np.zeros(image.shape[2])
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    total = np.zeros(image.shape[2])
    for r, c, w in ((y0, x0, (y0 + 1 - y) * (x0 + 1 - x)), (y0, x0 + 1, (y0 + 1 - y) * (x - x0)),
                    (y0 + 1, x0, (y - y0) * (x0 + 1 - x)), (y0 + 1, x0 + 1, (y - y0) * (x - x0))):
        if 0 <= r < height and 0 <= c < width:
            total += w * image[r, c]
    return total


@st.composite
def cases(draw):
    """Points (rows, per_row) reading one of 1-3 images of drawn sizes."""
    sizes = draw(st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=3))
    return dict(sizes=sizes, rows=draw(st.integers(0, 4)), per_row=draw(st.integers(1, 4)),
                channels=draw(st.integers(1, 5)), weighted=draw(st.booleans()),
                seed=draw(st.integers(0, 2**16)))


def _setup(case):
    rng = np.random.default_rng(case["seed"])
    pixels, firsts = _images(rng, case["sizes"], case["channels"])
    shape = (case["rows"], case["per_row"])
    image = rng.integers(0, len(case["sizes"]), shape)
    heights = np.array([h for h, _ in case["sizes"]])[image]
    widths = np.array([w for _, w in case["sizes"]])[image]
    # Integer part in [-2, size + 1], fraction away from the kinks.
    y = rng.integers(-2, heights + 2) + rng.uniform(0.1, 0.9, shape)
    x = rng.integers(-2, widths + 2) + rng.uniform(0.1, 0.9, shape)
    weight = rng.standard_normal(shape) if case["weighted"] else None
    return rng, pixels, firsts, image, heights, widths, y, x, weight


def _sample(setup, case, y=None, x=None, weight=None):
    _, pixels, firsts, image, heights, widths, y0, x0, w0 = setup
    return core.sample(y0 if y is None else y, x0 if x is None else x, heights, widths, firsts[image], 1,
                       len(pixels) - 1, w0 if weight is None else weight, case["per_row"])


@given(cases())
def test_rows_are_weighted_sums_of_samples(case):
    setup = _setup(case)
    _, pixels, firsts, image, heights, widths, y, x, weight = setup
    sampling = _sample(setup, case)
    assert sampling.matrix.shape == (case["rows"], len(pixels))
    expected = np.zeros((case["rows"], case["channels"]))
    for r in range(case["rows"]):
        for p in range(case["per_row"]):
            h, w, first = heights[r, p], widths[r, p], firsts[image[r, p]]
            img = pixels[first:first + h * w].reshape(h, w, -1)
            a = 1.0 if weight is None else weight[r, p]
            expected[r] += a * _bilinear(img, y[r, p], x[r, p])
    np.testing.assert_allclose(sampling.matrix @ pixels, expected, rtol=1e-12, atol=1e-12)


@given(cases())
def test_gradients_are_the_derivatives_of_the_rows(case):
    """<G, S·X>: Sᵀ·G is its gradient in X (an adjoint), location_gradients its
    derivatives in y, x and the weight (central differences, float64)."""
    setup = _setup(case)
    rng, pixels = setup[0], setup[1]
    y, x, weight = setup[6], setup[7], setup[8]
    grad = rng.standard_normal((case["rows"], case["channels"]))
    sampling = _sample(setup, case)
    other = rng.standard_normal(pixels.shape)
    other[-1] = 0
    assert np.vdot(sampling.matrix.T @ grad, other) == pytest.approx(np.vdot(grad, sampling.matrix @ other), abs=1e-10)

    s = core.corner_products(sampling, grad, pixels)
    grad_y, grad_x, grad_weight = core.location_gradients(sampling, s)
    assert (grad_weight is None) == (weight is None)

    def loss(**moved):
        return np.vdot(grad, _sample(setup, case, **moved).matrix @ pixels)

    eps = 1e-6
    flat = [("y", y, grad_y), ("x", x, grad_x)] + ([("weight", weight, grad_weight)] if weight is not None else [])
    for name, value, analytic in flat:
        for index in np.ndindex(value.shape):
            plus, minus = value.copy(), value.copy()
            plus[index] += eps
            minus[index] -= eps
            numeric = (loss(**{name: plus}) - loss(**{name: minus})) / (2 * eps)
            assert analytic.reshape(value.shape)[index] == pytest.approx(numeric, abs=1e-6), name


def test_kinks_take_the_slope_towards_plus_one():
    """An image 2x3; points on rows -1, 0, 1 (= H - 1), 2 (= H) and on column -1."""
    image = np.array([[1.0, 2.0, 4.0], [3.0, 5.0, 9.0]])
    pixels = core.pixel_rows(6, 1, np.dtype(np.float64))
    pixels[:-1, 0] = image.reshape(-1)
    y = np.array([-1.0, 0.0, 1.0, 2.0, 0.5])
    x = np.array([1.0, 1.0, 1.0, 1.0, -1.0])
    sampling = core.sample(y, x, 2, 3, 0, 1, 6)
    grad_y, grad_x, _ = core.location_gradients(sampling, core.corner_products(sampling, np.ones((5, 1)), pixels))
    np.testing.assert_array_equal((sampling.matrix @ pixels)[:, 0], [0.0, 2.0, 5.0, 0.0, 0.0])
    np.testing.assert_array_equal(grad_y, [2.0, 3.0, -5.0, 0.0, 0.0])  # towards row 0, ..., from row 1 to 2 (outside)
    np.testing.assert_array_equal(grad_x, [0.0, 2.0, 4.0, 0.0, 2.0])  # column -1: towards column 0


def test_non_finite_points_count_zero():
    pixels = core.pixel_rows(4, 2, np.dtype(np.float32))
    pixels[:-1] = 1
    y = np.array([np.nan, 0.5, np.inf, 0.5], np.float32)
    x = np.array([0.5, -np.inf, 0.5, 0.5], np.float32)
    sampling = core.sample(y, x, 2, 2, 0, 1, 4)
    assert sampling.matrix.data.dtype == np.float32
    np.testing.assert_array_equal(sampling.corners[:3], 4)
    np.testing.assert_array_equal((sampling.matrix @ pixels)[:, 0], [0, 0, 0, 1])
    np.testing.assert_array_equal(sampling.frac_y[:3], 0)
