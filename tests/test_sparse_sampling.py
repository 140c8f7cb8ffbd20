"""The NumPy backend's sampling matrix S, entry by entry, and its memory.

S (see cudcn/backends/numpy/sampling.py and dcn.py) has a row per (image, output pixel,
kernel point, offset group) and a column per (image, input pixel, offset
group), plus a last column for "outside the image". These tests build S
densely from the formula, with loops that share nothing with the backend,
and check the backend's S against it: four stored entries per row, values
bilinear weight times mask, rows of one image and offset group touching
only that image's and group's columns.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cudcn.backends.numpy import dcn as numpy_backend
from cudcn.backends.numpy import parallel
from cudcn.backends.numpy.sampling import compute_dtype
from cudcn.cli.bench import peak_traced_bytes
from cudcn.geometry import validate
from strategies import calls, offsets_on_kinks


def _geometry(call):
    return validate(input=call.input, offset=call.offset, weight=call.weight, mask=call.mask,
                    stride=call.stride, padding=call.padding, dilation=call.dilation)


def _dense_sampling_matrix(call) -> np.ndarray:
    """S without its "outside" column, from the formula, (n*L*K*G, n*H*W*G)."""
    n, c, height, width = call.input.shape
    kh, kw = call.kernel_size
    k_points = kh * kw
    groups = call.offset_groups
    _, _, out_h, out_w = call.offset.shape
    dense = np.zeros((n * out_h * out_w * k_points * groups, n * height * width * groups))
    row = 0
    for image in range(n):
        for h in range(out_h):
            for w in range(out_w):
                for k in range(k_points):
                    i, j = divmod(k, kw)
                    for g in range(groups):
                        at = g * 2 * k_points + 2 * k
                        dy, dx = call.offset[image, at, h, w], call.offset[image, at + 1, h, w]
                        y = h * call.stride[0] - call.padding[0] + i * call.dilation[0] + dy
                        x = w * call.stride[1] - call.padding[1] + j * call.dilation[1] + dx
                        m = 1.0 if call.mask is None else call.mask[image, g * k_points + k, h, w]
                        if -1 < y < height and -1 < x < width:  # also False for NaN
                            y0, x0 = math.floor(y), math.floor(x)
                            for r, col, weight in (
                                (y0, x0, (y0 + 1 - y) * (x0 + 1 - x)), (y0, x0 + 1, (y0 + 1 - y) * (x - x0)),
                                (y0 + 1, x0, (y - y0) * (x0 + 1 - x)), (y0 + 1, x0 + 1, (y - y0) * (x - x0)),
                            ):
                                if 0 <= r < height and 0 <= col < width:
                                    dense[row, ((image * height + r) * width + col) * groups + g] += weight * m
                        row += 1
    return dense


@given(calls(wild_offsets=True), st.booleans())
def test_sampling_matrix_matches_the_formula(call, on_kinks):
    if on_kinks:  # points exactly on rows and columns -1, 0, H - 1, H as well
        call.offset = offsets_on_kinks(call, np.random.default_rng(call.seed), 0.5)
    geom = _geometry(call)
    sampling = numpy_backend._sampling(geom, call.offset, call.mask, np.dtype(np.float64))
    S = sampling.matrix
    n, _, height, width = call.input.shape
    rows = n * geom.out_pixels * geom.kernel_points * geom.offset_groups
    outside = n * height * width * geom.offset_groups
    assert S.shape == (rows, outside + 1)

    # Exactly four stored entries per row, every one a valid column.
    np.testing.assert_array_equal(S.indptr, 4 * np.arange(rows + 1))
    assert ((S.indices >= 0) & (S.indices <= outside)).all()
    assert np.isfinite(S.data).all()

    # Values: bilinear weight times mask; nothing in the "outside" column.
    dense = S.toarray()
    np.testing.assert_array_equal(dense[:, -1], 0)
    np.testing.assert_allclose(dense[:, :-1], _dense_sampling_matrix(call), rtol=0, atol=1e-12)

    # Blocks: a row of image i and offset group g has its entries in columns
    # of image i and group g only (or in the "outside" column).
    corners = S.indices.reshape(rows, 4)
    row = np.arange(rows)[:, None]
    image_of_row = row // (geom.out_pixels * geom.kernel_points * geom.offset_groups)
    inside = corners != outside
    assert (corners % geom.offset_groups == row % geom.offset_groups)[inside].all()
    assert (corners // (height * width * geom.offset_groups) == image_of_row)[inside].all()


@pytest.mark.parametrize(("dtype", "values"), [("float16", "float32"), ("float32", "float32"), ("float64", "float64")])
def test_sampling_matrix_dtypes(dtype, values):
    """S's values are in the compute dtype (no float64 for float32 work); its
    indices are 32-bit while they fit."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 6, 6)).astype(dtype)
    offset = rng.standard_normal((2, 18, 6, 6)).astype(dtype)
    geom = validate(input=x, offset=offset, weight=np.ones((3, 4, 3, 3), dtype), padding=1)
    sampling = numpy_backend._sampling(geom, offset, None, compute_dtype(geom.dtype))
    assert sampling.matrix.data.dtype == values
    assert sampling.matrix.indices.dtype == np.int32 and sampling.matrix.indptr.dtype == np.int32
    assert numpy_backend._pixel_rows(geom, x, sampling.matrix.data.dtype).dtype == values


@pytest.mark.parametrize("offset_groups", [1, 2])
def test_peak_memory_is_a_small_multiple_of_the_column_buffer(monkeypatch, offset_groups):
    """Temporaries above the arguments: at most 2 column buffers in the
    forward and 3 in the backward (float32, 64 channels). In one thread, so
    that the peak does not depend on how the threads' parts overlap in time
    (they share the chunk's column buffer out: together they need about the
    same)."""
    monkeypatch.setattr(parallel, "cpu_count", lambda: 1)
    rng = np.random.default_rng(0)
    n, c, size, k = 4, 64, 16, 9
    x = rng.standard_normal((n, c, size, size), dtype=np.float32)
    offset = rng.standard_normal((n, 2 * offset_groups * k, size, size), dtype=np.float32) * 2
    mask = rng.random((n, offset_groups * k, size, size), dtype=np.float32)
    weight = rng.standard_normal((c, c, 3, 3), dtype=np.float32)
    grad_output = rng.standard_normal((n, c, size, size), dtype=np.float32)
    geom = validate(input=x, offset=offset, weight=weight, mask=mask, padding=1)
    column_buffer = n * size * size * k * c * 4
    forward = peak_traced_bytes(lambda: numpy_backend.forward(geom, x, offset, weight, None, mask))
    backward = peak_traced_bytes(lambda: numpy_backend.backward(geom, grad_output, x, offset, weight, mask))
    assert forward <= 2 * column_buffer, forward / column_buffer
    assert backward <= 3 * column_buffer, backward / column_buffer
