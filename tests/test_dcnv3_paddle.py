"""cudcn.paddle.dcnv3 and cudcn.paddle.dcnv4 on CPU tensors: the PyLayers
give the core's results and gradients exactly (the core is checked against
the loop oracle and pure torch in test_dcnv3_numpy.py and
test_dcnv3_torch_reference.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given

paddle = pytest.importorskip("paddle")

import cudcn  # noqa: E402
import cudcn.paddle as cpd  # noqa: E402
from dcnv3_reference import SCALARS, DCNv3Call, calls, pack  # noqa: E402

pytestmark = pytest.mark.paddle

FIELDS = ("input", "offset", "mask")


def make_call(batch=2, dtype=np.float64) -> DCNv3Call:
    """3x3 kernel without its centre, stride (2, 1), pads (1, 2), G=2, D=5, 7x6 input, offset_scale 1.5."""
    rng = np.random.default_rng(3)
    out_h, out_w = (7 + 2 - 3) // 2 + 1, 6 + 4 - 2
    return DCNv3Call(
        input=rng.standard_normal((batch, 7, 6, 10)).astype(dtype),
        offset=rng.uniform(-2, 2, (batch, out_h, out_w, 2 * 8 * 2)).astype(dtype),
        mask=rng.random((batch, out_h, out_w, 2 * 8)).astype(dtype),
        kernel_h=3, kernel_w=3, stride_h=2, pad_h=1, pad_w=2, group=2, group_channels=5, offset_scale=1.5,
        remove_center=True, seed=3)


def leaves(call: DCNv3Call, packed=False, dtype=None):
    arrays = [call.input, pack(call.offset, call.mask, call.group)] if packed else [getattr(call, f) for f in FIELDS]
    tensors = [paddle.to_tensor(a) if dtype is None else paddle.to_tensor(a).astype(dtype) for a in arrays]
    for t in tensors:
        t.stop_gradient = False
    return tensors


def run(call: DCNv3Call, tensors, packed=False):
    return (cpd.dcnv4 if packed else cpd.dcnv3)(*tensors, *call.scalars)


@pytest.mark.parametrize("packed", [False, True], ids=["dcnv3", "dcnv4"])
@given(call=calls(min_batch=1, max_kernel=4))
def test_drawn_calls_equal_core_forward_and_backward(packed, call):
    tensors = leaves(call, packed)
    out = run(call, tensors, packed)
    grad_output = np.random.default_rng(call.seed).standard_normal(call.out_shape)
    out.backward(paddle.to_tensor(grad_output))
    np.testing.assert_array_equal(out.numpy(), cudcn.dcnv3(*call.args))
    arrays = [t.numpy() for t in tensors]
    backward = cudcn.dcnv4_backward if packed else cudcn.dcnv3_backward
    for t, expected in zip(tensors, backward(grad_output, *arrays, *call.scalars)):
        np.testing.assert_array_equal(t.grad.numpy(), expected)


def test_stop_gradient_inputs_get_no_gradient():
    call = make_call()
    x, offset, mask = leaves(call)
    x.stop_gradient = mask.stop_gradient = True
    run(call, [x, offset, mask]).sum().backward()
    assert x.grad is None and mask.grad is None and offset.grad.shape == offset.shape


@pytest.mark.parametrize("packed", [False, True], ids=["dcnv3", "dcnv4"])
def test_double_backward_says_it_is_not_supported(packed):
    call = make_call()
    tensors = leaves(call, packed)
    plain = paddle.grad(run(call, tensors, packed).sum(), tensors)
    grads = paddle.grad(run(call, tensors, packed).sum(), tensors, create_graph=True)
    for g, expected in zip(grads, plain):
        assert not g.stop_gradient
        np.testing.assert_array_equal(g.numpy(), expected.numpy())
    # paddle hands an error raised in a backward on as an OSError carrying its text.
    with pytest.raises((OSError, cudcn.UnsupportedError),
                       match="UnsupportedError: double backward of cudcn's DCNv[34] .* is not supported"):
        (grads[1] ** 2).sum().backward()


def test_empty_batch():
    call = make_call(batch=0)
    for packed in (False, True):
        tensors = leaves(call, packed)
        out = run(call, tensors, packed)
        assert tuple(out.shape) == (0, 4, 8, 10)
        out.sum().backward()
        assert [t.grad.shape for t in tensors] == [t.shape for t in tensors]


def test_non_contiguous_inputs_and_inputs_untouched():
    call = make_call()
    expected = cudcn.dcnv3(*call.args)
    x = paddle.to_tensor(call.input.transpose(0, 2, 1, 3)).transpose([0, 2, 1, 3])
    assert not x.is_contiguous()
    before = x.numpy().copy()
    out = cpd.dcnv3(x, paddle.to_tensor(call.offset), paddle.to_tensor(call.mask), *call.scalars)
    np.testing.assert_array_equal(out.numpy(), expected)
    np.testing.assert_array_equal(x.numpy(), before)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_on_cpu(dtype):
    """The NumPy backend computes in float32 and rounds once, both ways."""
    call = make_call(dtype=np.float32)
    for packed in (False, True):
        tensors = leaves(call, packed, dtype)
        out = run(call, tensors, packed)
        assert out.dtype == getattr(paddle, dtype)
        single = [t.detach().astype("float32") for t in tensors]
        np.testing.assert_array_equal(out.astype("float32").numpy(),
                                      run(call, single, packed).astype(dtype).astype("float32").numpy())
        out.astype("float32").sum().backward()
        for t in tensors:
            assert t.grad.dtype == getattr(paddle, dtype)
            assert np.isfinite(t.grad.astype("float32").numpy()).all()


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(offset=lambda t: t[..., :-1]), ValueError,
         r"offset.shape must be \(N, Ho, Wo, group\*P\*2\) = \(2, 4, 8, 32\) \(P = kh\*kw - remove_center = 8\)"),
        (dict(mask=lambda t: t.astype("float32")), TypeError, r"mask.dtype must equal input.dtype = float64, got float32"),
        (dict(mask=lambda t: t.astype("bfloat16")), TypeError, r"mask.dtype must equal input.dtype = float64, got bfloat16"),
        (dict(offset=lambda t: t.numpy()), TypeError, r"offset must be a paddle.Tensor \(N, Ho, Wo, group\*P\*2\), got ndarray"),
        (dict(input=lambda t: t.astype("int64")), TypeError, r"input.dtype must be one of float16, bfloat16, float32, float64"),
        (dict(group=lambda v: 5), ValueError, r"input.shape\[3\] \(C\) must be group\*group_channels = 5\*5 = 25, got 10"),
        (dict(kernel_w=lambda v: 2), ValueError, r"remove_center needs a square kernel of odd size"),
    ],
)
def test_wrong_arguments_get_the_core_message(change, error, match):
    call = make_call()
    x, offset, mask = leaves(call)
    args = dict(input=x, offset=offset, mask=mask, **dict(zip(SCALARS, call.scalars)))
    (name, edit), = change.items()
    args[name] = edit(args[name])
    with pytest.raises(error, match=match):
        cpd.dcnv3(**args)


def test_dcnv4_wrong_packing_gets_the_core_message():
    call = make_call()
    x, offset_mask = leaves(call, packed=True)
    with pytest.raises(ValueError, match=r"offset_mask.shape\[3\] \(K8\) must be a multiple of 8 and at least"):
        cpd.dcnv4(x, offset_mask[..., :-1], *call.scalars)


def test_static_graph_is_refused_with_a_clear_error():
    call = make_call()
    paddle.enable_static()
    try:
        program = paddle.static.Program()
        with paddle.static.program_guard(program):
            x = paddle.static.data("x", call.input.shape, "float64")
            offset = paddle.static.data("offset", call.offset.shape, "float64")
            mask = paddle.static.data("mask", call.mask.shape, "float64")
            with pytest.raises(cudcn.UnsupportedError, match=r"cudcn.paddle.dcnv3 runs in dygraph only"):
                cpd.dcnv3(x, offset, mask, *call.scalars)
    finally:
        paddle.disable_static()
