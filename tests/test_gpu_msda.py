"""Multi-scale deformable attention on a real GPU (marker ``gpu``; skipped without a device).

- CuPy arrays against the NumPy backend on the same values, forward and
  every gradient, in float64 (1e-10), float32 (1e-5), float16 (4e-3) and
  bfloat16 (3e-2, where CuPy holds it), relative to the largest value: fixed
  shapes and drawn geometries, atomic and deterministic value gradients;
- every device allocation starts as NaN bytes (test_gpu.py's fixture), so an
  element a kernel forgets fails;
- deterministic algorithms: the value gradient is bitwise the same run after
  run on a case where many samples share pixels, and equals the atomic one
  to rounding;
- no host synchronisation (behind a busy stream, the calls return at once),
  a non-default stream, non-finite and far locations;
- a value of 2^31 elements (the 64-bit index kernels), forward and
  backward, checked at pixel centres near its end against sums worked on the host.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cudcn
import test_gpu
from msda_reference import calls

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy")

poisoned_memory = test_gpu.poisoned_memory  # autouse: every allocation starts as NaN bytes
relative_error = test_gpu.relative_error

TOLERANCE = {"float64": 1e-10, "float32": 1e-5, "float16": 4e-3, "bfloat16": 3e-2}
DTYPES = tuple(TOLERANCE)
ARRAYS = ("value", "sampling_locations", "attention_weights")


_dtype = test_gpu.device_dtype


def _call(dtype_name: str, batch=2, queries=30, heads=4, channels=32, shapes=((12, 10), (6, 5), (3, 3), (1, 2)),
          points=4, seed=0) -> dict:
    """Arguments on the host: locations in (-0.2, 1.2), a tenth of the pixel
    coordinates on a kink (exact for levels of power-of-two sizes)."""
    rng = np.random.default_rng(seed)
    shapes = np.asarray(shapes, np.int64)
    levels = len(shapes)
    size = (batch, queries, heads, levels, points, 2)
    extent = shapes[:, ::-1].reshape(levels, 1, 2)  # (W, H)
    locations = rng.uniform(-0.2, 1.2, size)
    kink = rng.random(size) < 0.1
    locations = np.where(kink, (rng.integers(-1, extent + 1, size) + 0.5) / extent, locations)
    dtype = _dtype(dtype_name)
    return dict(
        value=rng.standard_normal((batch, int((shapes[:, 0] * shapes[:, 1]).sum()), heads, channels)).astype(dtype),
        spatial_shapes=shapes,
        level_start_index=np.concatenate([[0], np.cumsum(shapes[:, 0] * shapes[:, 1])[:-1]]).astype(np.int64),
        sampling_locations=locations.astype(dtype),
        attention_weights=rng.uniform(-1, 1, size[:-1]).astype(dtype),
    )


def _device(args: dict) -> dict:
    """The float arrays on the device; spatial_shapes and level_start_index stay on the host."""
    return {k: cupy.asarray(v) if k in ARRAYS else v for k, v in args.items()}


def _grad_output(args: dict, seed: int = 1) -> np.ndarray:
    n, _, m, d = args["value"].shape
    shape = (n, args["sampling_locations"].shape[1], m * d)
    return np.random.default_rng(seed).standard_normal(shape).astype(args["value"].dtype)


def _check(args: dict, dtype_name: str, deterministic: bool = False) -> None:
    """Forward and backward on the device against the NumPy backend on the same values."""
    tol = TOLERANCE[dtype_name]
    grad_output = _grad_output(args)
    expected = cudcn.ms_deform_attn(**args)
    expected_grads = cudcn.ms_deform_attn_backward(grad_output, **args)
    dev = _device(args)
    with cudcn.deterministic_algorithms(deterministic):
        got = cudcn.ms_deform_attn(**dev)
        grads = cudcn.ms_deform_attn_backward(cupy.asarray(grad_output), **dev)
    assert isinstance(got, cupy.ndarray) and got.dtype == expected.dtype and got.shape == expected.shape
    assert relative_error(got, expected) <= tol
    for name in ARRAYS:
        g, e = getattr(grads, name), getattr(expected_grads, name)
        assert g.dtype == e.dtype and g.shape == e.shape, name
        assert relative_error(g, e) <= tol, name


@pytest.mark.quick
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "sorted"])
@pytest.mark.parametrize("dtype_name", DTYPES)
def test_matches_numpy_in_every_dtype(dtype_name, deterministic):
    """Four levels (one 1x2), 4 heads, 32 channels, 4 points; odd D and D = 1 too."""
    _check(_call(dtype_name), dtype_name, deterministic)
    _check(_call(dtype_name, batch=3, queries=7, heads=2, channels=13, points=3, seed=1), dtype_name, deterministic)
    _check(_call(dtype_name, batch=1, queries=5, heads=3, channels=1, shapes=((4, 4),), points=1, seed=2),
           dtype_name, deterministic)


@pytest.mark.parametrize("dtype_name", DTYPES)
@given(call=calls(kinks=0.2), deterministic=st.booleans())
@settings(max_examples=30)
def test_drawn_geometries_match_numpy(dtype_name, call, deterministic):
    """1x1 and non-square levels, L and P from 1, odd D, N and Lq from 0,
    locations outside [0, 1] and on kinks."""
    dtype = _dtype(dtype_name)
    args = dict(zip(("value", "spatial_shapes", "level_start_index", *ARRAYS[1:]), call.args))
    args = {k: v.astype(dtype) if k in ARRAYS else v for k, v in args.items()}
    _check(args, dtype_name, deterministic)


def test_wide_channels_and_many_levels():
    """D = 256 (32 lanes a query in every dtype but float64's two blocks a
    lane) and eight levels, float32 and float16."""
    for dtype_name in ("float32", "float16"):
        shapes = tuple((h, w) for h, w in zip((9, 7, 5, 4, 3, 2, 1, 1), (8, 6, 5, 3, 3, 2, 2, 1)))
        _check(_call(dtype_name, batch=1, queries=9, heads=2, channels=256, shapes=shapes, points=2), dtype_name)


def test_non_finite_and_far_locations_count_zero():
    args = _call("float64", seed=3)
    flat = args["sampling_locations"].reshape(-1)
    flat[::5] = np.nan
    flat[1::7] = np.inf
    flat[2::11] = -1e300
    flat[3::13] = 2.0**40
    _check(args, "float64")
    _check(args, "float64", deterministic=True)


@pytest.mark.quick
@pytest.mark.parametrize("dtype_name", ["float64", "float32", "float16"])
def test_deterministic_value_gradient_is_bitwise_repeatable(dtype_name):
    """Many samples on a few pixels (so that atomics would collide): the same
    bits every run, whatever the workspace budget's chunking leaves alone,
    and the atomic path's values to rounding."""
    args = _call(dtype_name, batch=2, queries=200, heads=2, channels=32, shapes=((3, 4), (2, 2)), points=4, seed=4)
    dev = _device(args)
    grad_output = cupy.asarray(_grad_output(args))
    atomic = cudcn.ms_deform_attn_backward(grad_output, **dev)
    with cudcn.deterministic_algorithms():
        runs = [cudcn.ms_deform_attn_backward(grad_output, **dev) for _ in range(3)]
    for name in ARRAYS:
        first = cupy.asnumpy(getattr(runs[0], name))
        for run in runs[1:]:
            assert first.tobytes() == cupy.asnumpy(getattr(run, name)).tobytes(), name
        assert relative_error(getattr(atomic, name), first.astype(np.float64)) <= TOLERANCE[dtype_name], name
    expected = cudcn.ms_deform_attn_backward(_grad_output(args), **args)
    assert relative_error(runs[0].value, expected.value) <= TOLERANCE[dtype_name]


def test_runs_on_a_non_default_stream():
    args = _call("float32", seed=5)
    dev = _device(args)
    expected = cudcn.ms_deform_attn(**args)

    def call():
        out = cudcn.ms_deform_attn(**dev)
        return out, cudcn.ms_deform_attn_backward(cupy.ones_like(out), **dev)

    got, grads = test_gpu.on_a_non_blocking_stream(call)
    assert relative_error(got, expected) <= 1e-5
    expected_grads = cudcn.ms_deform_attn_backward(np.ones_like(expected), **args)
    for name in ARRAYS:
        assert relative_error(getattr(grads, name), getattr(expected_grads, name)) <= 1e-5, name


def test_no_host_synchronisation():
    """Forward, atomic and deterministic backward (the level table's upload,
    the sort and its searchsorted included) return to the host while the
    stream is still busy."""
    args = _call("float32", seed=6)
    dev = _device(args)

    def every_call():
        out = cudcn.ms_deform_attn(**dev)
        grads = cudcn.ms_deform_attn_backward(cupy.ones_like(out), **dev)
        with cudcn.deterministic_algorithms():
            sorted_grads = cudcn.ms_deform_attn_backward(cupy.ones_like(out), **dev)
        return out, grads, sorted_grads

    expected = every_call()  # compiles and loads every kernel first
    cupy.cuda.Device().synchronize()
    got = test_gpu.host_returns_early(every_call)
    assert relative_error(got[0], cupy.asnumpy(expected[0])) <= 1e-6
    for g, e in zip(got[1:], expected[1:]):
        for name in ARRAYS:
            assert relative_error(getattr(g, name), cupy.asnumpy(getattr(e, name))) <= 1e-5, name


def test_value_above_2_to_the_31_elements():
    """One image whose value has 2^31 float32 elements (a 4096 x 4096 level,
    4 heads of 32 channels): the 64-bit index kernels. Every sample sits
    exactly on a pixel centre near the end of the value (exact in float32:
    W is a power of two), so the output is a plain weighted sum of those
    pixels, the value gradient at them a sum of weight x grad_output, and the
    location gradient the one-sided slope towards the next column and row."""
    free, _ = cupy.cuda.runtime.memGetInfo()
    if free < 32 * 2**30:
        pytest.skip("needs 32 GiB of free GPU memory")
    side, heads, channels, queries, points = 4096, 4, 32, 16, 2
    assert side * side * heads * channels >= 2**31
    rng = np.random.default_rng(7)
    value = cupy.random.default_rng(7).standard_normal((1, side * side, heads, channels), dtype=cupy.float32)
    rows = rng.integers(side - 40, side - 1, (queries, heads, points))
    cols = rng.integers(side - 40, side - 1, (queries, heads, points))
    # Pixel (r, c) is at location ((c + 0.5) / W, (r + 0.5) / H).
    locations = np.stack([(cols + 0.5) / side, (rows + 0.5) / side], -1).reshape(1, queries, heads, 1, points, 2)
    weights = rng.uniform(0.5, 1.0, (1, queries, heads, 1, points))
    dev = dict(value=value, spatial_shapes=np.array([[side, side]]), level_start_index=np.array([0]),
               sampling_locations=cupy.asarray(locations, cupy.float32),
               attention_weights=cupy.asarray(weights, cupy.float32))
    out = cudcn.ms_deform_attn(**dev)
    grad_output = rng.standard_normal((1, queries, heads * channels)).astype(np.float32)
    grads = cudcn.ms_deform_attn_backward(cupy.asarray(grad_output), **dev)

    a = weights.astype(np.float32).astype(np.float64).reshape(queries, heads, points)
    g = grad_output.astype(np.float64).reshape(queries, heads, channels)
    got = cupy.asnumpy(out).astype(np.float64).reshape(queries, heads, channels)
    got_locations = cupy.asnumpy(grads.sampling_locations).astype(np.float64).reshape(queries, heads, points, 2)

    def pixel(r: int, c: int, m: int) -> np.ndarray:
        return cupy.asnumpy(value[0, r * side + c, m]).astype(np.float64)

    expected_value_grad: dict[tuple[int, int], np.ndarray] = {}
    for q in range(queries):
        for m in range(heads):
            expected = np.zeros(channels)
            for p in range(points):
                r, c = int(rows[q, m, p]), int(cols[q, m, p])
                here = pixel(r, c, m)
                expected += a[q, m, p] * here
                key = (r * side + c, m)
                expected_value_grad[key] = expected_value_grad.get(key, 0) + a[q, m, p] * g[q, m]
                slope = a[q, m, p] * side * np.array([g[q, m] @ (pixel(r, c + 1, m) - here),
                                                      g[q, m] @ (pixel(r + 1, c, m) - here)])
                np.testing.assert_allclose(got_locations[q, m, p], slope, rtol=1e-4, atol=1e-4 * np.abs(slope).max())
            np.testing.assert_allclose(got[q, m], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    for (at, m), expected in expected_value_grad.items():
        np.testing.assert_allclose(cupy.asnumpy(grads.value[0, at, m]).astype(np.float64), expected,
                                   rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    # Pixels no sample touches keep a zero gradient (the last pixel of the value included).
    assert not cupy.asnumpy(grads.value[0, -1]).any() and not cupy.asnumpy(grads.value[0, 0]).any()
