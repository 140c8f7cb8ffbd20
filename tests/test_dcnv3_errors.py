"""Every malformed DCNv3/DCNv4 call raises a clear error naming the argument."""

from __future__ import annotations

import re
import sys
import types

import numpy as np
import pytest

import cudcn
from cudcn.dcnv3_geometry import SCALARS, packed_channels, validate_dcnv3

#: A valid call's scalars: 3x3, stride 1, pad 1, dilation 1, G=3, D=5 (C=15), offset_scale 1.
GOOD_SCALARS = dict(kernel_h=3, kernel_w=3, stride_h=1, stride_w=1, pad_h=1, pad_w=1, dilation_h=1,
                    dilation_w=1, group=3, group_channels=5, offset_scale=1.0, im2col_step=256, remove_center=False)


def good(**changes):
    """A valid DCNv3 call: N=2, 6x7 input, 15 channels, output 6x7, P=9."""
    rng = np.random.default_rng(0)
    kwargs = dict(input=rng.standard_normal((2, 6, 7, 15)), offset=rng.standard_normal((2, 6, 7, 54)),
                  mask=rng.random((2, 6, 7, 27)), **GOOD_SCALARS)
    kwargs.update(changes)
    return kwargs


def good4(**changes):
    """The same call as DCNv4: offset_mask (2, 6, 7, 88) (G*3P = 81, padded to 88)."""
    kwargs = good()
    kwargs.pop("offset"), kwargs.pop("mask")
    kwargs["offset_mask"] = np.random.default_rng(1).standard_normal((2, 6, 7, 88))
    kwargs.update(changes)
    return kwargs


def test_the_good_calls_are_good():
    assert cudcn.dcnv3(**good()).shape == (2, 6, 7, 15)
    assert cudcn.dcnv4(**good4()).shape == (2, 6, 7, 15)
    geom = validate_dcnv3(**good())
    assert (geom.points, geom.out_h, geom.out_w, geom.channels, geom.packed) == (9, 6, 7, 15, False)
    assert validate_dcnv3(**good4()).offset_mask_channels == 88
    assert packed_channels(3, 9) == 88 and packed_channels(8, 9) == 216 and packed_channels(4, 8) == 96
    assert tuple(GOOD_SCALARS) == SCALARS


def test_positional_arguments_in_dcnv3_functions_order():
    kwargs = good()
    args = [kwargs[k] for k in ("input", "offset", "mask", *SCALARS)]
    np.testing.assert_array_equal(cudcn.dcnv3(*args), cudcn.dcnv3(**kwargs))
    np.testing.assert_array_equal(cudcn.dcnv3(*args[:-3]), cudcn.dcnv3(**kwargs))  # the defaults


SCALAR_ERRORS = [
    (dict(kernel_h=0), "kernel_h must be >= 1, got 0"),
    (dict(kernel_w=2.0), "kernel_w must be an int, got 2.0"),
    (dict(stride_h=0), "stride_h must be >= 1, got 0"),
    (dict(stride_w=True), "stride_w must be an int, got True"),
    (dict(pad_h=-1), "pad_h must be >= 0, got -1"),
    (dict(pad_w="1"), "pad_w must be an int, got '1'"),
    (dict(dilation_h=0), "dilation_h must be >= 1, got 0"),
    (dict(dilation_w=2**31), "dilation_w must be < 2**31 (the kernels index in 32 bits), got 2147483648"),
    (dict(group=0), "group must be >= 1, got 0"),
    (dict(group_channels=None), "group_channels must be an int, got None"),
    (dict(offset_scale="1"), "offset_scale must be a real number, got '1'"),
    (dict(offset_scale=True), "offset_scale must be a real number, got True"),
    (dict(offset_scale=float("nan")), "offset_scale must be finite, got nan"),
    (dict(remove_center=2), "remove_center must be a bool (or 0 or 1), got 2"),
    (dict(remove_center=None), "remove_center must be a bool (or 0 or 1), got None"),
    (dict(im2col_step=0), "im2col_step must be a positive int, got 0"),
    (dict(im2col_step=1.5), "im2col_step must be a positive int, got 1.5"),
]

SHAPE_ERRORS = [
    (dict(input=np.zeros((2, 6, 7))), "input must be a 4-D array (N, H, W, group*group_channels), got 3-D with shape (2, 6, 7)"),
    (dict(input=np.zeros((2, 6, 7, 16))), "input.shape[3] (C) must be group*group_channels = 3*5 = 15, got 16"),
    (dict(group=4), "input.shape[3] (C) must be group*group_channels = 4*5 = 20, got 15"),
    (dict(input=np.zeros((2, 0, 7, 15))), "input must have at least one pixel, got (H, W) = (0, 7)"),
    (dict(input=np.zeros((2, 1, 7, 15)), pad_h=0), "output size (Ho, Wo) = (-1, 7) must be at least 1x1; input (H, W) = (1, 7), kernel (3, 3)"),
    (dict(kernel_w=9, pad_w=0), "output size (Ho, Wo) = (6, -1) must be at least 1x1"),
    (dict(offset=np.zeros((2, 6, 7, 53))),
     "offset.shape must be (N, Ho, Wo, group*P*2) = (2, 6, 7, 54) (P = kh*kw - remove_center = 9), got (2, 6, 7, 53)"),
    (dict(offset=np.zeros((2, 6, 6, 54))),
     "offset.shape must be (N, Ho, Wo, group*P*2) = (2, 6, 7, 54) (P = kh*kw - remove_center = 9), got (2, 6, 6, 54)"),
    (dict(offset=np.zeros((1, 6, 7, 54))), "offset.shape must be (N, Ho, Wo, group*P*2) = (2, 6, 7, 54)"),
    (dict(offset=np.zeros((2, 6, 7, 27, 2))), "offset must be a 4-D array (N, Ho, Wo, group*P*2), got 5-D"),
    (dict(mask=np.zeros((2, 6, 7, 24))),
     "mask.shape must be (N, Ho, Wo, group*P) = (2, 6, 7, 27) (P = kh*kw - remove_center = 9), got (2, 6, 7, 24)"),
    (dict(remove_center=True), "offset.shape must be (N, Ho, Wo, group*P*2) = (2, 6, 7, 48) (P = kh*kw - remove_center = 8)"),
    (dict(remove_center=True, offset=np.zeros((2, 6, 7, 48))),
     "mask.shape must be (N, Ho, Wo, group*P) = (2, 6, 7, 24) (P = kh*kw - remove_center = 8), got (2, 6, 7, 27)"),
    (dict(stride_h=2), "offset.shape must be (N, Ho, Wo, group*P*2) = (2, 3, 7, 54)"),
    (dict(mask=np.zeros((2, 6, 7))), "mask must be a 4-D array (N, Ho, Wo, group*P), got 3-D"),
]

REMOVE_CENTER_ERRORS = [
    (dict(kernel_h=3, kernel_w=2), "remove_center needs a square kernel of odd size (it drops the centre point), got kernel_h x kernel_w = 3x2"),
    (dict(kernel_h=2, kernel_w=2), "remove_center needs a square kernel of odd size (it drops the centre point), got kernel_h x kernel_w = 2x2"),
    (dict(kernel_h=4, kernel_w=4), "got kernel_h x kernel_w = 4x4"),
]

VALUE_ERRORS = SCALAR_ERRORS + SHAPE_ERRORS + [(dict(c, remove_center=True), m) for c, m in REMOVE_CENTER_ERRORS]


@pytest.mark.parametrize("changes, message", VALUE_ERRORS, ids=[m[:60] for _, m in VALUE_ERRORS])
def test_value_errors(changes, message):
    with pytest.raises(cudcn.ArgumentError, match=re.escape(message)):
        cudcn.dcnv3(**good(**changes))
    with pytest.raises(cudcn.ArgumentError, match=re.escape(message)):
        cudcn.dcnv3_backward(np.zeros((2, 6, 7, 15)), **good(**changes))


PACKED_ERRORS = SCALAR_ERRORS + [
    (dict(offset_mask=np.zeros((2, 6, 7, 80))),
     "offset_mask.shape[3] (K8) must be a multiple of 8 and at least group*3*P = 3*3*9 = 81 (smallest: 88), got 80"),
    (dict(offset_mask=np.zeros((2, 6, 7, 81))),
     "offset_mask.shape[3] (K8) must be a multiple of 8 and at least group*3*P = 3*3*9 = 81 (smallest: 88), got 81"),
    (dict(offset_mask=np.zeros((2, 6, 7, 90))), "offset_mask.shape[3] (K8) must be a multiple of 8"),
    (dict(offset_mask=np.zeros((2, 6, 7, 64)), remove_center=True), "at least group*3*P = 3*3*8 = 72 (smallest: 72), got 64"),
    (dict(offset_mask=np.zeros((2, 5, 7, 88))), "offset_mask.shape[:3] must be (N, Ho, Wo) = (2, 6, 7), got (2, 5, 7)"),
    (dict(offset_mask=np.zeros((2, 6, 7, 11, 8))), "offset_mask must be a 4-D array (N, Ho, Wo, K8), got 5-D"),
    (dict(input=np.zeros((2, 6, 7, 16))), "input.shape[3] (C) must be group*group_channels = 3*5 = 15, got 16"),
    (dict(kernel_h=2, remove_center=True), "remove_center needs a square kernel of odd size"),
]


@pytest.mark.parametrize("changes, message", PACKED_ERRORS, ids=[m[:60] for _, m in PACKED_ERRORS])
def test_dcnv4_value_errors(changes, message):
    with pytest.raises(cudcn.ArgumentError, match=re.escape(message)):
        cudcn.dcnv4(**good4(**changes))
    with pytest.raises(cudcn.ArgumentError, match=re.escape(message)):
        cudcn.dcnv4_backward(np.zeros((2, 6, 7, 15)), **good4(**changes))


def test_softmax_is_a_flag_of_dcnv3_alone():
    for value in ("yes", 2, None):
        with pytest.raises(cudcn.ArgumentError, match=re.escape(f"softmax must be a bool (or 0 or 1), got {value!r}")):
            cudcn.dcnv3(**good(), softmax=value)
        with pytest.raises(cudcn.ArgumentError, match=re.escape(f"softmax must be a bool (or 0 or 1), got {value!r}")):
            cudcn.dcnv3_backward(np.zeros((2, 6, 7, 15)), **good(), softmax=value)
    with pytest.raises(cudcn.ArgumentError, match="softmax applies to DCNv3's separate mask; DCNv4 .offset_mask. has none"):
        validate_dcnv3(**good4(), softmax=True)
    assert validate_dcnv3(**good(), softmax=1).softmax and not validate_dcnv3(**good()).softmax


@pytest.mark.parametrize("channels", [72, 80, 88, 96, 128])
def test_any_multiple_of_8_from_g_3p_up_is_a_valid_k8(channels):
    """remove_center: P = 8, G*3P = 72; every multiple of 8 from 72 up works."""
    assert cudcn.dcnv4(**good4(offset_mask=np.ones((2, 6, 7, channels)), remove_center=True)).shape == (2, 6, 7, 15)


TYPE_ERRORS = [
    (dict(input=np.zeros((2, 6, 7, 15), np.int64)), "input.dtype must be one of float16, bfloat16, float32, float64, got int64"),
    (dict(offset=np.zeros((2, 6, 7, 54), np.float32)), "offset.dtype must equal input.dtype = float64, got float32"),
    (dict(mask=np.zeros((2, 6, 7, 27), np.float16)), "mask.dtype must equal input.dtype = float64, got float16"),
    (dict(input=[[[[0.0]]]]), "input must be a numpy.ndarray or cupy.ndarray, got builtins.list"),
    (dict(input=None), "input must be an array (N, H, W, group*group_channels), got None"),
    (dict(offset=None), "offset must be an array (N, Ho, Wo, group*P*2), got None"),
    (dict(mask=None), "mask must be an array (N, Ho, Wo, group*P), got None"),
]


@pytest.mark.parametrize("changes, message", TYPE_ERRORS, ids=[m[:50] for _, m in TYPE_ERRORS])
def test_type_errors(changes, message):
    with pytest.raises(cudcn.ArgumentTypeError, match=re.escape(message)):
        cudcn.dcnv3(**good(**changes))


def test_dcnv4_type_errors():
    with pytest.raises(cudcn.ArgumentTypeError, match=re.escape("offset_mask must be an array (N, Ho, Wo, K8), got None")):
        cudcn.dcnv4(**good4(offset_mask=None))
    with pytest.raises(cudcn.ArgumentTypeError, match=re.escape("offset_mask.dtype must equal input.dtype = float64, got float32")):
        cudcn.dcnv4(**good4(offset_mask=np.zeros((2, 6, 7, 88), np.float32)))


def test_grad_output_errors():
    with pytest.raises(cudcn.ArgumentError, match=re.escape(
            "grad_output.shape must be (N, Ho, Wo, group*group_channels) = (2, 6, 7, 15), got (2, 6, 7, 14)")):
        cudcn.dcnv3_backward(np.zeros((2, 6, 7, 14)), **good())
    with pytest.raises(cudcn.ArgumentError, match=re.escape("grad_output must be a 4-D array")):
        cudcn.dcnv4_backward(np.zeros((2, 6, 7 * 15)), **good4())
    with pytest.raises(cudcn.ArgumentTypeError, match=re.escape("grad_output.dtype must equal input.dtype = float64, got float32")):
        cudcn.dcnv3_backward(np.zeros((2, 6, 7, 15), np.float32), **good())
    with pytest.raises(cudcn.ArgumentTypeError, match=re.escape("grad_output must be an array (N, Ho, Wo, group*group_channels), got None")):
        cudcn.dcnv4_backward(None, **good4())


@pytest.mark.parametrize("step", [1, 3, 64, np.int64(5)])
def test_im2col_step_is_ignored(step):
    """No batch-divisibility rule: N = 2 with any step (InternImage's op requires N % step == 0)."""
    np.testing.assert_array_equal(cudcn.dcnv3(**good(im2col_step=step)), cudcn.dcnv3(**good()))


@pytest.mark.parametrize("kernel", [(1, 1), (2, 2), (4, 3), (1, 7), (6, 5), (7, 7)])
def test_any_kernel_size_and_group_channels(kernel):
    """Any kernel, even and rectangular, and group_channels neither a power of
    two nor a multiple of 16 (DCNv4's own op takes only P = 8 or 9 and D % 8 == 0)."""
    kh, kw = kernel
    rng = np.random.default_rng(0)
    P = kh * kw
    args = dict(GOOD_SCALARS, kernel_h=kh, kernel_w=kw, pad_h=kh // 2, pad_w=kw // 2, group=2, group_channels=7)
    out_h, out_w = 8 + 2 * (kh // 2) - kh + 1, 9 + 2 * (kw // 2) - kw + 1
    out = cudcn.dcnv3(rng.standard_normal((1, 8, 9, 14)), rng.standard_normal((1, out_h, out_w, 2 * P * 2)),
                      rng.random((1, out_h, out_w, 2 * P)), **args)
    assert out.shape == (1, out_h, out_w, 14) and np.isfinite(out).all()


def test_batch_zero():
    kwargs = good(input=np.zeros((0, 6, 7, 15)), offset=np.zeros((0, 6, 7, 54)), mask=np.zeros((0, 6, 7, 27)))
    assert cudcn.dcnv3(**kwargs).shape == (0, 6, 7, 15)
    grads = cudcn.dcnv3_backward(np.zeros((0, 6, 7, 15)), **kwargs)
    assert [g.shape for g in grads] == [(0, 6, 7, 15), (0, 6, 7, 54), (0, 6, 7, 27)]
    packed = good4(input=np.zeros((0, 6, 7, 15)), offset_mask=np.zeros((0, 6, 7, 88)))
    assert cudcn.dcnv4(**packed).shape == (0, 6, 7, 15)
    assert [g.shape for g in cudcn.dcnv4_backward(np.zeros((0, 6, 7, 15)), **packed)] == [(0, 6, 7, 15), (0, 6, 7, 88)]


def test_adapter_names_appear_in_messages():
    with pytest.raises(cudcn.ArgumentError, match=re.escape("x.shape[3] (C) must be group*group_channels")):
        cudcn.dcnv3(**good(input=np.zeros((2, 6, 7, 16))), names={"input": "x"})


def test_errors_are_also_runtime_errors():
    with pytest.raises(RuntimeError):
        cudcn.dcnv3(**good(group=4))
    with pytest.raises(RuntimeError):
        cudcn.dcnv3(**good(mask=np.zeros((2, 6, 7, 27), np.float32)))


class _StandInCupyArray:
    """Plays a CuPy array: shape, ndim, dtype and device."""

    device = types.SimpleNamespace(id=0)

    def __init__(self, array: np.ndarray) -> None:
        self.shape, self.ndim, self.dtype = array.shape, array.ndim, array.dtype


def test_cupy_arrays_reach_the_cuda_backend(monkeypatch):
    """CuPy arrays go to the CUDA backend's dcnv3_forward and dcnv3_backward,
    validated once (the geometry says "cupy"); DCNv4's offset_mask is both
    the offset and the mask argument, and softmax reaches the geometry."""
    import cudcn.backends.cuda as cuda_backend

    calls = []
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(ndarray=_StandInCupyArray))
    monkeypatch.setattr(cuda_backend, "dcnv3_forward", lambda geom, *arrays: calls.append(("forward", geom, arrays)))
    monkeypatch.setattr(cuda_backend, "dcnv3_backward",
                        lambda geom, *arrays: calls.append(("backward", geom, arrays)) or (None, None, None))
    on_device = {k: _StandInCupyArray(v) if isinstance(v, np.ndarray) else v for k, v in good().items()}
    cudcn.dcnv3(**on_device, softmax=True)
    packed = {k: _StandInCupyArray(v) if isinstance(v, np.ndarray) else v for k, v in good4().items()}
    cudcn.dcnv4_backward(_StandInCupyArray(np.zeros((2, 6, 7, 15))), **packed)
    (direction, geom, arrays), (direction4, geom4, arrays4) = calls
    assert (direction, geom.kind, geom.softmax, geom.packed) == ("forward", "cupy", True, False)
    assert arrays == (on_device["input"], on_device["offset"], on_device["mask"])
    assert (direction4, geom4.kind, geom4.softmax, geom4.packed) == ("backward", "cupy", False, True)
    assert arrays4[1] is packed["input"] and arrays4[2] is arrays4[3] is packed["offset_mask"]


def test_numpy_mixed_with_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(ndarray=_StandInCupyArray))
    kwargs = good()
    with pytest.raises(cudcn.ArgumentTypeError, match=re.escape(
            "offset is a cupy array but input is a numpy array; pass arrays of one kind")):
        cudcn.dcnv3(**dict(kwargs, offset=_StandInCupyArray(kwargs["offset"])))


def test_errors_leave_arguments_untouched():
    kwargs = good(mask=np.ones((2, 6, 7, 24)))
    copies = {k: v.copy() for k, v in kwargs.items() if isinstance(v, np.ndarray)}
    with pytest.raises(ValueError):
        cudcn.dcnv3(**kwargs)
    for key, copy in copies.items():
        np.testing.assert_array_equal(kwargs[key], copy)
