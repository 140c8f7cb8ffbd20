"""DCNv3 and DCNv4 on the NumPy backend, float64: against the loop oracle
(tests/dcnv3_reference.py), the exact identities DCNv4 = DCNv3 on the packed
arguments and DCNv3 = depthwise deform_conv2d, central differences away from
kinks and one-sided differences on them. float16/bfloat16 bounds against a
plain computation are in test_dcnv3_torch_reference.py."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import cudcn
from cudcn.backends.numpy import dcnv3 as backend
from cudcn.backends.numpy import parallel
from cudcn.dcnv3_geometry import validate_dcnv3
from dcnv3_reference import (
    SCALARS,
    DCNv3Call,
    calls,
    from_deform_conv2d_gradients,
    oracle_backward,
    oracle_forward,
    pack,
    place_points,
    softmax_mask,
    softmax_mask_gradient,
    to_deform_conv2d,
)

FIELDS = ("input", "offset", "mask")


def _grad_output(call: DCNv3Call) -> np.ndarray:
    return np.random.default_rng(call.seed + 1).standard_normal(call.out_shape)


def _check_against_oracle(call: DCNv3Call, tol=1e-12):
    out = cudcn.dcnv3(*call.args)
    assert out.shape == call.out_shape and out.dtype == np.float64
    np.testing.assert_allclose(out, oracle_forward(call), rtol=tol, atol=tol)
    grad_output = _grad_output(call)
    grads = cudcn.dcnv3_backward(grad_output, *call.args)
    for name, expected in zip(FIELDS, oracle_backward(call, grad_output)):
        got = getattr(grads, name)
        assert got.shape == getattr(call, name).shape and got.dtype == np.float64, name
        np.testing.assert_allclose(got, expected, rtol=tol, atol=tol, err_msg=name)


@given(calls())
def test_matches_the_oracle(call):
    """Kernels 1-7 (rectangular, even), stride 1-3, unequal pads, dilation,
    remove_center, group_channels 1-5, batch 0-2, offset_scale != 1, points
    up to 2 pixels outside the input."""
    _check_against_oracle(call)


@given(calls(max_batch=1, max_kernel=4, kinks=0.5, scales=(1.0, 0.5, 2.0)))
def test_matches_the_oracle_on_kinks(call):
    """Half the coordinates exactly on integer rows and columns -1 .. size."""
    _check_against_oracle(call)


def _dcnv4_args(call: DCNv3Call, offset_mask: np.ndarray) -> tuple:
    return (call.input, offset_mask, *call.scalars)


@given(calls(), st.sampled_from([0, 8, 24]))
def test_dcnv4_on_the_packed_arguments_equals_dcnv3(call, extra):
    """offset_mask = per group [2P offsets | P mask], groups back to back, then
    padding to a multiple of 8 (and ``extra`` more): the padding is never
    read (it holds NaN here), and its gradient is zero."""
    channels = -(-call.group * 3 * call.points // 8) * 8 + extra
    offset_mask = pack(call.offset, call.mask, call.group, channels, fill=np.nan)
    out = cudcn.dcnv4(*_dcnv4_args(call, offset_mask))
    np.testing.assert_array_equal(out, cudcn.dcnv3(*call.args))
    grad_output = _grad_output(call)
    grads = cudcn.dcnv4_backward(grad_output, *_dcnv4_args(call, offset_mask))
    expected = cudcn.dcnv3_backward(grad_output, *call.args)
    np.testing.assert_array_equal(grads.input, expected.input)
    assert grads.offset_mask.shape == offset_mask.shape
    np.testing.assert_array_equal(
        grads.offset_mask, pack(expected.offset, expected.mask, call.group, channels, fill=0.0))


@given(calls(scales=(1.0,)))
def test_dcnv3_equals_depthwise_deform_conv2d(call):
    """offset_scale 1: DCNv3 is deform_conv2d with an all-ones depthwise weight
    (groups = channels), offset_groups = group, the w-major (x, y) offsets
    reordered to h-major (y, x) taps (a removed centre: offset 0, mask 0),
    NHWC <-> NCHW. Forward and every gradient."""
    kwargs = to_deform_conv2d(call)
    out = cudcn.dcnv3(*call.args)
    np.testing.assert_allclose(out, cudcn.deform_conv2d(**kwargs).transpose(0, 2, 3, 1), rtol=1e-13, atol=1e-13)
    grad_output = _grad_output(call)
    grads = cudcn.dcnv3_backward(grad_output, *call.args)
    expected = from_deform_conv2d_gradients(
        call, cudcn.deform_conv2d_backward(np.ascontiguousarray(grad_output.transpose(0, 3, 1, 2)), **kwargs))
    for name, e in zip(FIELDS, expected):
        np.testing.assert_allclose(getattr(grads, name), e, rtol=1e-13, atol=1e-13, err_msg=name)


def _loss_gradients_numeric(call: DCNv3Call, grad_output, name: str, step) -> np.ndarray:
    """d<grad_output, out>/d(argument) element by element; ``step(f, value)``
    gives the difference quotient of f at value."""
    value = getattr(call, name)
    flat = value.reshape(-1)
    numeric = np.empty(flat.size)
    for index in range(flat.size):
        def loss(v, index=index):
            moved = flat.copy()
            moved[index] = v
            return np.vdot(grad_output, cudcn.dcnv3(*call.with_arrays(**{name: moved.reshape(value.shape)}).args))
        numeric[index] = step(loss, flat[index])
    return numeric


@given(calls(min_batch=1, max_batch=1, max_kernel=3, max_channels=3, max_out=2))
def test_gradients_are_central_differences(call):
    """Away from the kinks, every gradient element equals the central
    difference of <grad_output, out> (float64)."""
    grad_output = _grad_output(call)
    grads = cudcn.dcnv3_backward(grad_output, *call.args)
    eps = 1e-6
    for name in FIELDS:
        numeric = _loss_gradients_numeric(call, grad_output, name, lambda f, v: (f(v + eps) - f(v - eps)) / (2 * eps))
        scale = max(1.0, np.abs(numeric).max(initial=0.0))
        np.testing.assert_allclose(getattr(grads, name).reshape(-1), numeric, rtol=0, atol=1e-6 * scale, err_msg=name)


@given(calls(min_batch=1, max_batch=1, max_kernel=3, max_channels=3, max_out=2, kinks=0.6, scales=(1.0, 0.5, 2.0)))
def test_offset_gradient_is_the_one_sided_difference_towards_plus_one(call):
    """On the kinks -1, 0, .., size (and between them) the offset gradient
    equals (f(o + eps) - f(o)) / eps: the slope towards +1, as for
    deformable convolution (InternImage's CUDA op gives 0 at exactly -1)."""
    grad_output = _grad_output(call)
    grads = cudcn.dcnv3_backward(grad_output, *call.args)
    eps = 2.0**-30  # exact in the offsets and, times a power-of-two offset_scale, in the points
    numeric = _loss_gradients_numeric(call, grad_output, "offset", lambda f, v: (f(v + eps) - f(v)) / eps)
    scale = max(1.0, np.abs(numeric).max(initial=0.0))
    np.testing.assert_allclose(grads.offset.reshape(-1), numeric, rtol=0, atol=1e-6 * scale)


@given(calls(kinks=0.2))
def test_softmax_is_the_operator_on_the_softmaxed_mask(call):
    """softmax=True: the output and the input and offset gradients are those
    of the operator on softmax(mask) over each group's P points; the mask
    gradient is that one's through the softmax's Jacobian."""
    soft = call.with_arrays(mask=softmax_mask(call.mask, call.group))
    out = cudcn.dcnv3(*call.args, softmax=True)
    np.testing.assert_allclose(out, cudcn.dcnv3(*soft.args), rtol=1e-13, atol=1e-13)
    grad_output = _grad_output(call)
    grads = cudcn.dcnv3_backward(grad_output, *call.args, softmax=True)
    expected = cudcn.dcnv3_backward(grad_output, *soft.args)
    for name in ("input", "offset"):
        np.testing.assert_allclose(getattr(grads, name), getattr(expected, name), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(grads.mask, softmax_mask_gradient(soft.mask, expected.mask, call.group),
                               rtol=1e-13, atol=1e-13)


@given(calls(min_batch=1, max_batch=1, max_kernel=3, max_channels=3, max_out=2))
def test_softmax_mask_gradient_is_central_differences(call):
    """The mask gradient with softmax=True is the derivative by the mask as
    given: central differences of <grad_output, out>."""
    grad_output = _grad_output(call)
    grads = cudcn.dcnv3_backward(grad_output, *call.args, softmax=True)
    flat = call.mask.reshape(-1)
    eps = 1e-6

    def loss(index: int, v: float) -> float:
        moved = flat.copy()
        moved[index] = v
        return np.vdot(grad_output, cudcn.dcnv3(*call.with_arrays(mask=moved.reshape(call.mask.shape)).args,
                                                softmax=True))

    numeric = np.array([(loss(i, flat[i] + eps) - loss(i, flat[i] - eps)) / (2 * eps) for i in range(flat.size)])
    scale = max(1.0, np.abs(numeric).max(initial=0.0))
    np.testing.assert_allclose(grads.mask.reshape(-1), numeric, rtol=0, atol=1e-6 * scale)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_softmax_runs_in_the_compute_dtype(dtype):
    """float32 and the half types: the softmax in float32, a large mask
    (exp would overflow without the max subtracted) included."""
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    call = _fixed_call()
    call = call.with_arrays(mask=call.mask * 200)  # up to 200: exp(200) overflows float32
    low = call.with_arrays(**{f: getattr(call, f).astype(dtype) for f in FIELDS})
    exact = call.with_arrays(**{f: getattr(low, f).astype(np.float64) for f in FIELDS})
    out = cudcn.dcnv3(*low.args, softmax=True)
    assert out.dtype == np.dtype(dtype) and np.isfinite(out.astype(np.float64)).all()
    tol = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(out.astype(np.float64), cudcn.dcnv3(*exact.args, softmax=True), rtol=tol, atol=tol)


def _one_point(x: float, y: float, offset_scale: float = 1.0) -> DCNv3Call:
    """1x1 kernel, stride 2, one group of one channel, input 2x2 [[1, 2], [3, 5]],
    one output pixel whose point lies at (y, x), mask 0.5."""
    call = DCNv3Call(input=np.array([1.0, 2.0, 3.0, 5.0]).reshape(1, 2, 2, 1), offset=np.zeros((1, 1, 1, 2)),
                     mask=np.full((1, 1, 1, 1), 0.5), kernel_h=1, kernel_w=1, stride_h=2, stride_w=2,
                     offset_scale=offset_scale)
    call.offset = place_points(call, np.full((1, 1, 1, 1, 1), x), np.full((1, 1, 1, 1, 1), y))
    return call


def test_row_minus_one_has_the_slope_towards_row_zero():
    """Point (y, x) = (-1, 0): value 0, offset gradient in y the slope towards
    row 0 (mask * pixel (0, 0) * offset_scale), in x zero."""
    call = _one_point(0.0, -1.0, offset_scale=2.0)
    out = cudcn.dcnv3(*call.args)
    assert out[0, 0, 0, 0] == 0
    grads = cudcn.dcnv3_backward(np.ones_like(out), *call.args)
    assert grads.offset[0, 0, 0, 1] == 0.5 * 1.0 * 2.0
    assert grads.offset[0, 0, 0, 0] == 0
    assert grads.mask[0, 0, 0, 0] == 0
    np.testing.assert_array_equal(grads.input, 0)


def test_points_far_outside_and_not_finite_count_zero():
    for x, y in [(-5.0, 0.5), (0.5, 2.0), (np.nan, 0.0), (0.0, np.inf), (-np.inf, 0.0), (1e30, -1e30)]:
        call = _one_point(x, y)
        out = cudcn.dcnv3(*call.args)
        assert out[0, 0, 0, 0] == 0, (x, y)
        for g in cudcn.dcnv3_backward(np.ones_like(out), *call.args):
            np.testing.assert_array_equal(g, 0, err_msg=str((x, y)))
    # Halfway between rows 0 and 1 of column 1: (2 + 5) / 2, times the mask.
    call = _one_point(1.0, 0.5)
    assert cudcn.dcnv3(*call.args)[0, 0, 0, 0] == 0.5 * 3.5


def test_offset_scale_scales_the_kernel_grid_not_the_reference_point():
    """Zero offsets, 3x3 kernel, offset_scale 2 on a 5x5 input, stride 1, pad
    0: output pixel (0, 0) (reference point (1, 1)) samples pixels (1 + 2*dy,
    1 + 2*dx) for dy, dx in -1..1; those outside count 0."""
    image = np.arange(25.0).reshape(1, 5, 5, 1)
    call = DCNv3Call(input=image, offset=np.zeros((1, 3, 3, 18)), mask=np.ones((1, 3, 3, 9)),
                     kernel_h=3, kernel_w=3, offset_scale=2.0)
    out = cudcn.dcnv3(*call.args)
    inside = [image[0, 1 + 2 * dy, 1 + 2 * dx, 0] for dy in (-1, 0, 1) for dx in (-1, 0, 1)
              if 0 <= 1 + 2 * dy < 5 and 0 <= 1 + 2 * dx < 5]
    assert out[0, 0, 0, 0] == sum(inside)


def test_kernel_points_are_w_major_with_x_first():
    """A 2x3 kernel (kh=2, kw=3), one point's mask 1 and the rest 0: point
    p = i*kh + j is kernel column i, row j; its first offset moves it in x."""
    image = np.random.default_rng(0).standard_normal((1, 4, 5, 1))
    for p in range(6):
        i, j = divmod(p, 2)
        mask = np.zeros((1, 3, 3, 6))
        mask[..., p] = 1
        offset = np.zeros((1, 3, 3, 12))
        offset[..., 2 * p] = 1.0  # one column to the right
        out = cudcn.dcnv3(image, offset, mask, 2, 3, 1, 1, 0, 0, 1, 1, 1, 1)
        np.testing.assert_array_equal(out[0, :, :2, 0], image[0, j:j + 3, i + 1:i + 3, 0])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_types_compute_in_float32_and_return_theirs(dtype):
    """float16/bfloat16: exactly the float32 computation on the same values, rounded once."""
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    call = _fixed_call()
    half = call.with_arrays(**{f: getattr(call, f).astype(dtype) for f in FIELDS})
    single = call.with_arrays(**{f: getattr(half, f).astype(np.float32) for f in FIELDS})
    grad_output = _grad_output(call).astype(dtype)
    out = cudcn.dcnv3(*half.args)
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, cudcn.dcnv3(*single.args).astype(dtype))
    grads = cudcn.dcnv3_backward(grad_output, *half.args)
    expected = cudcn.dcnv3_backward(grad_output.astype(np.float32), *single.args)
    for name in FIELDS:
        assert getattr(grads, name).dtype == np.dtype(dtype)
        np.testing.assert_array_equal(getattr(grads, name), getattr(expected, name).astype(dtype))


def _fixed_call(batch: int = 2) -> DCNv3Call:
    """A mid-sized call: 3x3, stride 1, pad 1, G=3, D=5, 7x6 input, offset_scale 0.7."""
    rng = np.random.default_rng(7)
    return DCNv3Call(
        input=rng.standard_normal((batch, 7, 6, 15)), offset=rng.uniform(-2, 2, (batch, 7, 6, 54)),
        mask=rng.random((batch, 7, 6, 27)), kernel_h=3, kernel_w=3, pad_h=1, pad_w=1, group=3,
        group_channels=5, offset_scale=0.7, seed=7)


def test_float32_is_float64_to_single_precision():
    call = _fixed_call()
    single = call.with_arrays(**{f: getattr(call, f).astype(np.float32) for f in FIELDS})
    grad_output = _grad_output(call)
    out = cudcn.dcnv3(*single.args)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, cudcn.dcnv3(*call.args), rtol=1e-5, atol=1e-5)
    grads = cudcn.dcnv3_backward(grad_output.astype(np.float32), *single.args)
    exact = cudcn.dcnv3_backward(grad_output, *call.args)
    for name in FIELDS:
        assert getattr(grads, name).dtype == np.float32
        np.testing.assert_allclose(getattr(grads, name), getattr(exact, name), rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("cpus", [2, 3])
def test_results_do_not_depend_on_parts_and_chunks(monkeypatch, cpus):
    """Parts and chunks that split an image's pixels, or span images, give the
    same results (the input gradient adds the parts in a fixed order)."""
    call = _fixed_call(batch=3)
    grad_output = _grad_output(call)
    monkeypatch.setattr(parallel, "cpu_count", lambda: 1)
    out = cudcn.dcnv3(*call.args)
    grads = cudcn.dcnv3_backward(grad_output, *call.args)
    monkeypatch.setattr(parallel, "cpu_count", lambda: cpus)
    monkeypatch.setattr(backend, "_MIN_PART_POINTS", 1)
    with cudcn.workspace_bytes(10 * 3 * 9 * backend._BYTES_PER_POINT):  # chunks of 10 output pixels
        geom = validate_dcnv3(input=call.input, offset=call.offset, mask=call.mask,
                              **dict(zip(SCALARS, call.scalars)))
        assert len(backend._chunks(geom)) == 13
        np.testing.assert_allclose(cudcn.dcnv3(*call.args), out, rtol=1e-14, atol=1e-14)
        split = cudcn.dcnv3_backward(grad_output, *call.args)
    for name in FIELDS:
        np.testing.assert_allclose(getattr(split, name), getattr(grads, name), rtol=1e-13, atol=1e-13)


def test_the_packed_arguments_are_read_through_views():
    """DCNv4's offsets and mask are views of offset_mask, and its gradient's
    are views of the one packed gradient: nothing is unpacked by copying."""
    call = _fixed_call()
    offset_mask = pack(call.offset, call.mask, call.group)
    geom = validate_dcnv3(input=call.input, offset_mask=offset_mask, **dict(zip(SCALARS, call.scalars)))
    offsets, masks = backend._offsets_and_mask(geom, offset_mask, offset_mask)
    assert np.shares_memory(offsets, offset_mask) and np.shares_memory(masks, offset_mask)
    assert offsets.shape == (2 * 7 * 6, 3, 9, 2) and masks.shape == (2 * 7 * 6, 3, 9)
    assert offsets[5, 2, 4, 1] == offset_mask.reshape(-1, 88)[5, 2 * 27 + 2 * 4 + 1]
    assert masks[5, 2, 4] == offset_mask.reshape(-1, 88)[5, 2 * 27 + 18 + 4]


@given(calls(min_batch=1), st.booleans())
def test_inputs_are_not_modified(call, non_contiguous):
    arrays = {f: getattr(call, f) for f in FIELDS}
    if non_contiguous:  # the same values through strided views
        arrays = {f: np.asfortranarray(a) for f, a in arrays.items()}
    call = call.with_arrays(**arrays)
    before = {f: a.copy() for f, a in arrays.items()}
    out = cudcn.dcnv3(*call.args)
    cudcn.dcnv3_backward(np.ones_like(out), *call.args)
    offset_mask = pack(call.offset, call.mask, call.group)
    packed_before = offset_mask.copy()
    cudcn.dcnv4_backward(np.ones_like(out), call.input, offset_mask, *call.scalars)
    for f, a in arrays.items():
        np.testing.assert_array_equal(a, before[f])
    np.testing.assert_array_equal(offset_mask, packed_before)
    np.testing.assert_array_equal(out, cudcn.dcnv3(*call.with_arrays(**before).args))
