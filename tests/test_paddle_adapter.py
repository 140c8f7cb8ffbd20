"""cudcn.paddle against paddle's own CPU op and layers.

paddle.vision.ops.deform_conv2d runs forward and backward on the CPU, so the
adapter's results and every gradient are compared with it directly.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given

paddle = pytest.importorskip("paddle")

import cudcn  # noqa: E402
import cudcn.paddle as cpd  # noqa: E402
from strategies import calls  # noqa: E402

pytestmark = pytest.mark.paddle

NAMES = ("x", "offset", "weight", "bias", "mask")

# (N, C_in, H, W, C_out, groups, deformable_groups, (kh, kw), stride, padding, dilation);
# C_out divisible by deformable_groups, as paddle's op requires.
GEOMETRIES = [
    (2, 4, 7, 6, 6, 2, 2, (3, 3), 1, 0, 1),
    (1, 3, 6, 8, 3, 1, 3, (2, 3), (2, 1), (1, 2), (1, 2)),
    (3, 2, 5, 5, 4, 2, 1, (1, 1), 1, 0, 1),
    (2, 6, 9, 7, 6, 3, 2, (3, 2), 2, 1, (2, 1)),
]


def _pair(v):
    return v if isinstance(v, tuple) else (v, v)


def make_arrays(geometry, with_mask=True, with_bias=True, seed=0):
    """Random float64 arrays (x, offset, weight, bias, mask) and conv kwargs."""
    n, c, h, w, o, groups, dgroups, (kh, kw), stride, padding, dilation = geometry
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    out_h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    rng = np.random.default_rng(seed)
    k = kh * kw
    arrays = (
        rng.uniform(-1, 1, (n, c, h, w)),
        rng.uniform(-2.5, 2.5, (n, 2 * dgroups * k, out_h, out_w)),  # reaches past borders
        rng.uniform(-1, 1, (o, c // groups, kh, kw)),
        rng.uniform(-1, 1, (o,)) if with_bias else None,
        rng.uniform(0, 1, (n, dgroups * k, out_h, out_w)) if with_mask else None,
    )
    conv = dict(stride=stride, padding=padding, dilation=dilation, deformable_groups=dgroups, groups=groups)
    return arrays, conv


def to_leaves(arrays, dtype):
    return [None if a is None else paddle.to_tensor(a.astype(dtype), stop_gradient=False) for a in arrays]


def run(fn, leaves, conv, grad_out):
    """Output and gradients (None where an argument is None) of one call."""
    x, offset, weight, bias, mask = leaves
    out = fn(x, offset, weight, bias, mask=mask, **conv)
    (out * grad_out).sum().backward()
    return out.numpy(), [None if t is None else t.grad.numpy() for t in leaves]


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("with_mask,with_bias", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_forward_and_gradients_equal_paddle(geometry, with_mask, with_bias, dtype):
    arrays, conv = make_arrays(geometry, with_mask, with_bias)
    ours_leaves, theirs_leaves = to_leaves(arrays, dtype), to_leaves(arrays, dtype)
    out_shape = cpd.deform_conv2d(*ours_leaves[:4], mask=ours_leaves[4], **conv).shape
    grad_out = paddle.to_tensor(np.random.default_rng(1).uniform(-1, 1, out_shape).astype(dtype))
    out, grads = run(cpd.deform_conv2d, ours_leaves, conv, grad_out)
    expected, expected_grads = run(paddle.vision.ops.deform_conv2d, theirs_leaves, conv, grad_out)

    assert out.dtype == np.dtype(dtype)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == "float64" else dict(rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out, expected, **tol)
    for name, g, e in zip(NAMES, grads, expected_grads):
        if e is None:
            assert g is None
        else:
            assert g.dtype == np.dtype(dtype)
            np.testing.assert_allclose(g, e, **tol, err_msg=f"gradient of {name}")


@given(calls(min_batch=1, out_divisible_by_offset_groups=True))
def test_drawn_calls_equal_paddle(call):
    conv = dict(
        stride=call.stride, padding=call.padding, dilation=call.dilation,
        deformable_groups=call.offset_groups, groups=call.groups,
    )
    arrays = (call.input, call.offset, call.weight, call.bias, call.mask)
    ours, theirs = to_leaves(arrays, "float64"), to_leaves(arrays, "float64")
    grad_out = paddle.to_tensor(np.random.default_rng(call.seed).standard_normal(
        cpd.deform_conv2d(*ours[:4], mask=ours[4], **conv).shape))
    out, grads = run(cpd.deform_conv2d, ours, conv, grad_out)
    expected, expected_grads = run(paddle.vision.ops.deform_conv2d, theirs, conv, grad_out)
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-10)
    for name, g, e in zip(NAMES, grads, expected_grads):
        if e is not None:
            np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-10, err_msg=f"gradient of {name}")


def test_out_channels_need_not_divide_by_deformable_groups():
    geometry = (2, 4, 7, 6, 5, 1, 2, (3, 3), 1, 1, 1)  # C_out = 5, deformable_groups = 2
    arrays, conv = make_arrays(geometry)
    x, offset, weight, bias, mask = (paddle.to_tensor(a) for a in arrays)
    out = cpd.deform_conv2d(x, offset, weight, bias, mask=mask, **conv)
    expected = cudcn.deform_conv2d(*arrays[:4], stride=1, padding=1, dilation=1, mask=arrays[4])
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="output channels should be divided by deformable groups"):
        paddle.vision.ops.deform_conv2d(x, offset, weight, bias, mask=mask, **conv)


def test_stop_gradient_inputs_get_no_gradient():
    arrays, conv = make_arrays(GEOMETRIES[0])
    x, offset, weight, bias, mask = to_leaves(arrays, "float64")
    x.stop_gradient = True
    mask.stop_gradient = True
    cpd.deform_conv2d(x, offset, weight, bias, mask=mask, **conv).sum().backward()
    assert x.grad is None and mask.grad is None
    assert offset.grad.shape == offset.shape and weight.grad.shape == weight.shape and bias.grad.shape == bias.shape


@pytest.mark.parametrize("differentiate", ["backward", "grad"])
def test_double_backward_says_it_is_not_supported(differentiate):
    arrays, conv = make_arrays(GEOMETRIES[0])
    leaves = to_leaves(arrays, "float64")
    x, offset, weight, bias, mask = leaves
    plain = paddle.grad(cpd.deform_conv2d(x, offset, weight, bias, mask=mask, **conv).sum(), leaves)
    # Gradients taken with create_graph=True are the plain ones...
    grads = paddle.grad(cpd.deform_conv2d(x, offset, weight, bias, mask=mask, **conv).sum(), leaves, create_graph=True)
    for g, expected in zip(grads, plain):
        assert not g.stop_gradient
        np.testing.assert_array_equal(g.numpy(), expected.numpy())
    # ...and differentiating them again is refused with cudcn's error (without
    # it paddle took them for constants: no error and no second derivative).
    # paddle 3.3 hands an error raised in a backward on as an OSError with the
    # error's type and message in its text.
    second = (grads[1] ** 2).sum()
    with pytest.raises((OSError, cudcn.UnsupportedError),
                       match="UnsupportedError: double backward of cudcn's deformable convolution .* is not supported"):
        if differentiate == "backward":
            second.backward()
        else:
            paddle.grad(second, [weight])
    assert all(leaf.grad is None for leaf in leaves)


def test_empty_batch():
    arrays, conv = make_arrays((0, *GEOMETRIES[0][1:]))
    leaves = to_leaves(arrays, "float64")
    out = cpd.deform_conv2d(*leaves[:4], mask=leaves[4], **conv)
    assert tuple(out.shape) == (0, 6, 5, 4)
    out.sum().backward()
    for t in leaves:
        assert t.grad.shape == t.shape
    assert not np.any(leaves[2].grad.numpy())


def test_non_contiguous_inputs_and_inputs_untouched():
    arrays, conv = make_arrays(GEOMETRIES[0])
    x, offset, weight, bias, mask = (paddle.to_tensor(a) for a in arrays)
    expected = cpd.deform_conv2d(x, offset, weight, bias, mask=mask, **conv).numpy()

    wide = paddle.concat((offset, paddle.zeros_like(offset)), axis=1)
    sliced_offset = wide[:, : offset.shape[1]]
    transposed_x = paddle.to_tensor(arrays[0].transpose(0, 1, 3, 2)).transpose([0, 1, 3, 2])
    assert not (sliced_offset.is_contiguous() or transposed_x.is_contiguous())
    before = [t.numpy().copy() for t in (transposed_x, sliced_offset)]
    out = cpd.deform_conv2d(transposed_x, sliced_offset, weight, bias, mask=mask, **conv)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=0)
    for t, b in zip((transposed_x, sliced_offset), before):
        np.testing.assert_array_equal(t.numpy(), b)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_on_cpu(dtype):
    """The NumPy backend computes in float32 and rounds the result once."""
    arrays, conv = make_arrays(GEOMETRIES[0])
    leaves = [paddle.to_tensor(a.astype("float32")).astype(dtype) for a in arrays]
    for t in leaves:
        t.stop_gradient = False
    out = cpd.deform_conv2d(*leaves[:4], mask=leaves[4], **conv)
    assert out.dtype == getattr(paddle, dtype)
    reference = cpd.deform_conv2d(*(t.astype("float32") for t in leaves[:4]), mask=leaves[4].astype("float32"), **conv)
    np.testing.assert_array_equal(out.astype("float32").numpy(), reference.astype(dtype).astype("float32").numpy())
    out.astype("float32").sum().backward()
    for t in leaves:
        assert t.grad.dtype == getattr(paddle, dtype)
        assert np.isfinite(t.grad.astype("float32").numpy()).all()


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(offset=lambda t: t[:, :-1]), ValueError, r"offset.shape\[1\] must be a positive multiple of 2\*kh\*kw = 18, got 35"),
        (dict(x=lambda t: t[:, :3]), ValueError, r"x.shape\[1\] = 3 must be a positive multiple of weight.shape\[1\] = 2"),
        (dict(offset=lambda t: t[:1]), ValueError, r"offset.shape\[0\] must be x.shape\[0\] \(N\) = 2, got 1"),
        (dict(mask=lambda t: t[:, :-1]), ValueError, r"mask.shape\[1\] must be offset_groups\*kh\*kw = 18, got 17"),
        (dict(weight=lambda t: t.astype("float32")), TypeError, r"weight.dtype must equal x.dtype = float64, got float32"),
        (dict(weight=lambda t: t.astype("bfloat16")), TypeError, r"weight.dtype must equal x.dtype = float64, got bfloat16"),
        (dict(x=lambda t: t.astype("int64")), TypeError, r"x.dtype must be one of float16, bfloat16, float32, float64, got int64"),
        (dict(bias=lambda t: t.numpy()), TypeError, r"bias must be a paddle.Tensor \(C_out,\), got ndarray"),
        (dict(deformable_groups=lambda v: 1), ValueError, r"offset.shape\[1\] must be 2\*deformable_groups\*kh\*kw = 18 \(deformable_groups = 1, kernel 3x3\), got 36"),
        (dict(groups=lambda v: 1), ValueError, r"weight.shape\[1\] must be x.shape\[1\] / groups = 4 / 1 \(groups = 1\), got 2"),
        (dict(stride=lambda v: 0), ValueError, r"stride must be >= 1, got 0"),
        (dict(padding=lambda v: [1, 2, 3]), ValueError, r"padding must be an int or a pair of ints, got \[1, 2, 3\]"),
    ],
)
def test_wrong_arguments_are_named_as_in_paddle(change, error, match):
    arrays, conv = make_arrays(GEOMETRIES[0])
    args = dict(zip(NAMES, (paddle.to_tensor(a) for a in arrays)), **conv)
    (name, edit), = change.items()
    args[name] = edit(args[name])
    with pytest.raises(error, match=match):
        cpd.deform_conv2d(**args)


# ----------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------


def test_deform_conv2d_layer_matches_paddles_layer_both_ways():
    kwargs = dict(stride=(2, 1), padding=1, dilation=(1, 2), deformable_groups=2, groups=2)
    paddle.seed(3)
    theirs = paddle.vision.ops.DeformConv2D(4, 6, (3, 2), **kwargs)
    paddle.seed(3)
    ours = cpd.DeformConv2D(4, 6, (3, 2), **kwargs)
    # Same initialisation draws: weight Normal(0, sqrt(2/(kh*kw*C_in))), bias zero.
    for key in ("weight", "bias"):
        np.testing.assert_array_equal(ours.state_dict()[key].numpy(), theirs.state_dict()[key].numpy())
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight", "bias"]

    theirs.bias.set_value(np.random.default_rng(0).uniform(-1, 1, 6).astype("float32"))
    ours.set_state_dict(theirs.state_dict())
    arrays, _ = make_arrays((2, 4, 7, 9, 6, 2, 2, (3, 2), (2, 1), 1, (1, 2)))
    x, offset, _, _, mask = (paddle.to_tensor(a.astype("float32")) for a in arrays)
    np.testing.assert_allclose(ours(x, offset, mask).numpy(), theirs(x, offset, mask).numpy(), rtol=1e-5, atol=1e-5)

    fresh = paddle.vision.ops.DeformConv2D(4, 6, (3, 2), **kwargs)
    fresh.set_state_dict(ours.state_dict())
    np.testing.assert_allclose(fresh(x, offset).numpy(), ours(x, offset).numpy(), rtol=1e-5, atol=1e-5)


def test_deform_conv2d_layer_without_bias():
    layer = cpd.DeformConv2D(4, 6, 3, bias_attr=False)
    assert layer.bias is None and list(layer.state_dict()) == ["weight"]
    with pytest.raises(ValueError, match="in_channels = 5 must be divisible by groups = 2"):
        cpd.DeformConv2D(5, 6, 3, groups=2)


@pytest.mark.parametrize("cls, scale, values", [(cpd.DeformConv2DPack, 1.0, 2), (cpd.ModulatedDeformConv2DPack, 0.5, 3)])
def test_packs_start_as_the_plain_convolution(cls, scale, values):
    paddle.seed(0)
    layer = cls(4, 6, 3, stride=2, padding=1, deformable_groups=2, groups=2)
    layer.bias.set_value(np.random.default_rng(0).uniform(-1, 1, 6).astype("float32"))
    assert list(layer.state_dict()) == ["weight", "bias", "conv_offset.weight", "conv_offset.bias"]
    assert tuple(layer.conv_offset.weight.shape) == (values * 2 * 9, 4, 3, 3)
    x = paddle.to_tensor(np.random.default_rng(1).uniform(-1, 1, (2, 4, 9, 8)).astype("float32"), stop_gradient=False)
    out = layer(x)
    plain = paddle.nn.functional.conv2d(x, layer.weight, None, stride=2, padding=1, groups=2)
    expected = scale * plain + layer.bias.reshape([1, -1, 1, 1])
    np.testing.assert_allclose(out.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    assert np.abs(layer.conv_offset.weight.grad.numpy()).sum() > 0


def test_modulated_pack_splits_offset_and_mask():
    paddle.seed(0)
    layer = cpd.ModulatedDeformConv2DPack(2, 3, 3, padding=1, deformable_groups=2)
    rng = np.random.default_rng(0)
    layer.conv_offset.weight.set_value(rng.normal(0, 0.3, layer.conv_offset.weight.shape).astype("float32"))
    x = paddle.to_tensor(rng.uniform(-1, 1, (1, 2, 5, 6)).astype("float32"))
    o1, o2, m = paddle.chunk(layer.conv_offset(x), 3, axis=1)
    expected = cpd.deform_conv2d(
        x, paddle.concat((o1, o2), axis=1), layer.weight, layer.bias, padding=1,
        deformable_groups=2, mask=paddle.nn.functional.sigmoid(m),
    )
    np.testing.assert_array_equal(layer(x).numpy(), expected.numpy())


def test_coordinate_channels_and_coord_conv():
    x = paddle.zeros([2, 3, 4, 5], dtype="float64")
    coords = cpd.coordinate_channels(x).numpy()
    assert coords.shape == (2, 2, 4, 5) and coords.dtype == np.float64
    np.testing.assert_allclose(coords[1, 0], np.broadcast_to(np.linspace(-1, 1, 5), (4, 5)))
    np.testing.assert_allclose(coords[1, 1], np.broadcast_to(np.linspace(-1, 1, 4)[:, None], (4, 5)))
    for shape in ([1, 1, 1, 1], [1, 1, 1, 6], [1, 1, 6, 1]):
        c = cpd.coordinate_channels(paddle.zeros(shape)).numpy()
        assert np.isfinite(c).all() and np.abs(c).max() <= 1

    layer = cpd.CoordConv2D(4, 6, 3, stride=2, padding=1, groups=2)
    assert tuple(layer.conv.weight.shape) == (6, 3, 3, 3)
    x = paddle.to_tensor(np.random.default_rng(0).uniform(-1, 1, (2, 4, 7, 1)).astype("float32"))
    expected = layer.conv(paddle.concat((x, cpd.coordinate_channels(x)), axis=1))
    np.testing.assert_array_equal(layer(x).numpy(), expected.numpy())
    assert list(layer.state_dict()) == ["conv.weight", "conv.bias"]


def test_import_cudcn_paddle_imports_no_other_framework():
    code = (
        "import sys, cudcn.paddle; "
        "loaded = [m for m in ('torch', 'cupy') if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


@pytest.mark.gpu
def test_gpu_tensors_match_paddles_gpu_op():
    if not paddle.is_compiled_with_cuda():
        pytest.skip("paddle without CUDA")
    arrays, conv = make_arrays(GEOMETRIES[0])
    with paddle.device.stream_guard(paddle.device.Stream()):  # a non-default stream
        for dtype, tol in (("float64", 1e-10), ("float32", 1e-4)):
            ours = [paddle.to_tensor(a.astype(dtype), place=paddle.CUDAPlace(0), stop_gradient=False) for a in arrays]
            theirs = [paddle.to_tensor(a.astype(dtype), place=paddle.CUDAPlace(0), stop_gradient=False) for a in arrays]
            out, grads = run(cpd.deform_conv2d, ours, conv, 1)
            expected, expected_grads = run(paddle.vision.ops.deform_conv2d, theirs, conv, 1)
            assert ours[0].place.is_gpu_place()
            np.testing.assert_allclose(out, expected, rtol=tol, atol=tol)
            for name, g, e in zip(NAMES, grads, expected_grads):
                np.testing.assert_allclose(g, e, rtol=tol, atol=tol, err_msg=name)
