"""Every malformed call raises a clear error naming the argument."""

from __future__ import annotations

import re
import sys
import types

import numpy as np
import pytest

import cudcn


def good(**changes):
    """A valid call: N=2, C_in=4, C_out=6, 5x5 input, 3x3 kernel, padding 1, 2 offset groups."""
    rng = np.random.default_rng(0)
    kwargs = dict(
        input=rng.standard_normal((2, 4, 5, 5)),
        offset=rng.standard_normal((2, 36, 5, 5)),
        weight=rng.standard_normal((6, 2, 3, 3)),
        bias=rng.standard_normal(6),
        stride=1,
        padding=1,
        dilation=1,
        mask=rng.random((2, 18, 5, 5)),
    )
    kwargs.update(changes)
    return kwargs


def test_the_good_call_is_good():
    assert cudcn.deform_conv2d(**good()).shape == (2, 6, 5, 5)


SHAPE_ERRORS = [
    # (changes, message pattern)
    (dict(input=np.zeros((4, 5, 5))), "input must be a 4-D array (N, C_in, H, W), got 3-D with shape (4, 5, 5)"),
    (dict(offset=np.zeros((2, 36, 5))), "offset must be a 4-D array"),
    (dict(weight=np.zeros((6, 2, 3))), "weight must be a 4-D array (C_out, C_in/groups, kh, kw), got 3-D"),
    (dict(mask=np.zeros((2, 18, 5))), "mask must be a 4-D array"),
    (dict(bias=np.zeros((6, 1))), "bias.shape must be (C_out,) = (6,), got (6, 1)"),
    (dict(bias=np.zeros(5)), "bias.shape must be (C_out,) = (6,), got (5,)"),
    (dict(offset=np.zeros((3, 36, 5, 5))), "offset.shape[0] must be input.shape[0] (N) = 2, got 3"),
    (dict(mask=np.zeros((1, 18, 5, 5))), "mask.shape[0] must be input.shape[0] (N) = 2, got 1"),
    (dict(offset=np.zeros((2, 35, 5, 5))), "offset.shape[1] must be a positive multiple of 2*kh*kw = 18, got 35"),
    (dict(offset=np.zeros((2, 0, 5, 5))), "offset.shape[1] must be a positive multiple of 2*kh*kw = 18, got 0"),
    (dict(offset=np.zeros((2, 36, 4, 5))), "offset.shape[2:] must be the output size (Ho, Wo) = (5, 5), got (4, 5)"),
    (dict(mask=np.zeros((2, 18, 5, 6))), "mask.shape[2:] must be the output size (Ho, Wo) = (5, 5), got (5, 6)"),
    (dict(mask=np.zeros((2, 9, 5, 5))), "mask.shape[1] must be offset_groups*kh*kw = 18, got 9"),
    (dict(weight=np.zeros((6, 3, 3, 3))), "input.shape[1] = 4 must be a positive multiple of weight.shape[1] = 3 (C_in/groups)"),
    (dict(weight=np.zeros((5, 2, 3, 3))), "weight.shape[0] = 5 (C_out) must be divisible by groups = 2"),
    (dict(offset=np.zeros((2, 54, 5, 5)), mask=np.zeros((2, 27, 5, 5))), "input.shape[1] = 4 (C_in) must be divisible by offset_groups = 3"),
    (dict(weight=np.zeros((6, 2, 0, 3))), "kernel size must be at least 1x1, got 0x3"),
    (dict(input=np.zeros((2, 0, 5, 5)), weight=np.zeros((6, 0, 3, 3))), "input.shape[1] = 0 must be a positive multiple of weight.shape[1] = 0"),
    (dict(stride=0), "stride must be >= 1, got 0"),
    (dict(stride=(1, 0)), "stride must be >= 1, got (1, 0)"),
    (dict(dilation=(0, 1)), "dilation must be >= 1, got (0, 1)"),
    (dict(padding=-1), "padding must be >= 0, got -1"),
    (dict(padding=1.5), "padding must be an int or a pair of ints, got 1.5"),
    (dict(stride=(1, 2, 3)), "stride must be an int or a pair of ints, got (1, 2, 3)"),
    (dict(dilation="2"), "dilation must be an int or a pair of ints, got '2'"),
    (dict(stride=True), "stride must be an int or a pair of ints, got True"),
    (dict(padding=0, input=np.zeros((2, 4, 2, 2)), offset=np.zeros((2, 36, 1, 1)), mask=None),
     "output size (Ho, Wo) = (0, 0) must be at least 1x1"),
]


TOO_LARGE = [
    (dict(stride=2**62), "stride must be in [1, 2**31 - 1] (the kernels index in 32 bits), got 4611686018427387904"),
    (dict(dilation=(1, 2**64)), "dilation must be in [1, 2**31 - 1] (the kernels index in 32 bits), got (1, 18446744073709551616)"),
    (dict(padding=2**70), "padding must be in [0, 2**31 - 1] (the kernels index in 32 bits), got 1180591620717411303424"),
    (dict(padding=(2**30, 0)), "the padded input size (H + 2*pad_h, W + 2*pad_w) = (2147483653, 5) must stay below 2**31"),
]
SHAPE_ERRORS += TOO_LARGE


@pytest.mark.parametrize("changes, message", SHAPE_ERRORS, ids=[m[:40] for _, m in SHAPE_ERRORS])
def test_value_errors(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        cudcn.deform_conv2d(**good(**changes))


@pytest.mark.parametrize("changes, message", TOO_LARGE, ids=[m[:40] for _, m in TOO_LARGE])
def test_too_large_geometry_is_refused_in_the_backward_and_building_blocks(changes, message):
    kwargs = good(**changes)
    with pytest.raises(ValueError, match=re.escape(message)):
        cudcn.deform_conv2d_backward(np.zeros((2, 6, 5, 5)), **kwargs)
    geometry = {k: kwargs[k] for k in ("stride", "padding", "dilation")}
    with pytest.raises(ValueError, match=re.escape(message)):
        cudcn.deform_im2col(kwargs["input"], kwargs["offset"], 3, **geometry)


@pytest.mark.parametrize("error, changes", [
    (ValueError, dict(offset=np.zeros((2, 35, 5, 5)))),
    (TypeError, dict(input=np.zeros((2, 4, 5, 5), np.int64))),
    (TypeError, dict(weight=None)),
])
def test_errors_are_also_runtime_errors(error, changes):
    """Code written for torchvision catches RuntimeError; Python code catches
    ValueError/TypeError: both work."""
    with pytest.raises(RuntimeError):
        cudcn.deform_conv2d(**good(**changes))
    try:
        cudcn.deform_conv2d(**good(**changes))
    except error as caught:
        assert isinstance(caught, RuntimeError)
        assert isinstance(caught, (cudcn.ArgumentError, cudcn.ArgumentTypeError))
    else:
        pytest.fail("no error")


@pytest.mark.parametrize("name", ["input", "offset", "weight"])
def test_none_for_a_required_array_names_it(name):
    with pytest.raises(TypeError, match=rf"^{name} must be an array \(.*\), got None$"):
        cudcn.deform_conv2d(**good(**{name: None}))
    kwargs = good(**{name: None})
    with pytest.raises(TypeError, match=rf"^{name} must be an array \(.*\), got None$"):
        cudcn.deform_conv2d_backward(np.zeros((2, 6, 5, 5)), **kwargs)


def test_none_in_the_backward_and_building_blocks():
    kwargs = good()
    with pytest.raises(TypeError, match=re.escape("grad_output must be an array (N, C_out, Ho, Wo), got None")):
        cudcn.deform_conv2d_backward(None, **kwargs)
    x, offset = kwargs["input"], kwargs["offset"]
    with pytest.raises(TypeError, match="^input must be an array"):
        cudcn.deform_im2col(None, offset, 3, padding=1)
    with pytest.raises(TypeError, match="^offset must be an array"):
        cudcn.deform_im2col(x, None, 3, padding=1)
    with pytest.raises(TypeError, match=re.escape("columns must be an array (N, Ho*Wo, kh*kw, C_in), got None")):
        cudcn.deform_col2im(None, offset, (2, 4, 5, 5), 3, padding=1)
    with pytest.raises(TypeError, match="^columns must be an array"):
        cudcn.deform_col2im_coord(None, x, offset, 3, padding=1)
    with pytest.raises(TypeError, match="^input must be an array"):
        cudcn.deform_col2im_coord(np.zeros((2, 25, 9, 4)), None, offset, 3, padding=1)


TYPE_ERRORS = [
    (dict(input=np.zeros((2, 4, 5, 5), np.int64)), "input.dtype must be one of float16, bfloat16, float32, float64, got int64"),
    (dict(mask=np.zeros((2, 18, 5, 5), bool)), "mask.dtype must be one of float16, bfloat16, float32, float64, got bool"),
    (dict(weight=np.zeros((6, 2, 3, 3), np.complex128)), "weight.dtype must be one of"),
    (dict(offset=np.zeros((2, 36, 5, 5), np.float32)), "offset.dtype must equal input.dtype = float64, got float32"),
    (dict(input=[[[[0.0]]]]), "input must be a numpy.ndarray or cupy.ndarray, got builtins.list"),
    (dict(bias=(1.0,) * 6), "bias must be a numpy.ndarray or cupy.ndarray, got builtins.tuple"),
]


@pytest.mark.parametrize("changes, message", TYPE_ERRORS, ids=[m[:40] for _, m in TYPE_ERRORS])
def test_type_errors(changes, message):
    with pytest.raises(TypeError, match=re.escape(message)):
        cudcn.deform_conv2d(**good(**changes))


def test_numpy_mixed_with_cupy(monkeypatch):
    """Kinds are told apart through sys.modules; a stand-in module plays CuPy."""

    class StandInArray:
        ndim, shape, dtype = 4, (2, 36, 5, 5), np.dtype(np.float64)

    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(ndarray=StandInArray))
    with pytest.raises(TypeError, match=re.escape("offset is a cupy array but input is a numpy array; pass arrays of one kind")):
        cudcn.deform_conv2d(**good(offset=StandInArray()))


def test_grad_output_of_the_wrong_shape():
    kwargs = good()
    with pytest.raises(ValueError, match=re.escape("grad_output.shape must be (N, C_out, Ho, Wo) = (2, 6, 5, 5), got (2, 6, 5, 4)")):
        cudcn.deform_conv2d_backward(np.zeros((2, 6, 5, 4)), **kwargs)
    with pytest.raises(TypeError, match=re.escape("grad_output.dtype must equal input.dtype = float64, got float32")):
        cudcn.deform_conv2d_backward(np.zeros((2, 6, 5, 5), np.float32), **kwargs)


def test_building_block_errors():
    kwargs = good()
    with pytest.raises(ValueError, match=re.escape("kernel_size must be an int or a pair of ints, got None")):
        cudcn.deform_im2col(kwargs["input"], kwargs["offset"], None, padding=1)
    with pytest.raises(ValueError, match=re.escape("columns.shape must be (N, Ho*Wo, kh*kw, C_in) = (2, 25, 9, 4), got (2, 25, 9, 3)")):
        cudcn.deform_col2im(np.zeros((2, 25, 9, 3)), kwargs["offset"], (2, 4, 5, 5), 3, padding=1)
    with pytest.raises(ValueError, match=re.escape("input_shape must be 4 non-negative ints (N, C_in, H, W), got (2, 4, 5)")):
        cudcn.deform_col2im(np.zeros((2, 25, 9, 4)), kwargs["offset"], (2, 4, 5), 3, padding=1)


def test_adapter_names_appear_in_messages():
    with pytest.raises(ValueError, match=re.escape("x must be a 4-D array")):
        cudcn.deform_conv2d(**good(input=np.zeros((4, 5, 5))), names={"input": "x"})


def test_errors_leave_arguments_untouched():
    kwargs = good(offset=np.ones((2, 35, 5, 5)))
    copies = {k: v.copy() for k, v in kwargs.items() if isinstance(v, np.ndarray)}
    with pytest.raises(ValueError):
        cudcn.deform_conv2d(**kwargs)
    for key, copy in copies.items():
        np.testing.assert_array_equal(kwargs[key], copy)


def _stand_in(*shape):
    """An array of any shape that owns no memory (every stride 0)."""
    return np.ndarray(shape, np.float32, buffer=bytes(16), strides=(0,) * len(shape))


def test_images_of_2_to_the_31_pixels_are_refused():
    """The kernels index an image's pixels in 32 bits."""
    from cudcn.geometry import validate

    side = 46341  # side**2 = 2**31 + 4633
    with pytest.raises(ValueError, match=re.escape(
            "an image must have fewer than 2**31 pixels (the kernels index pixels in 32 bits): "
            "input H*W = 2147488281, output Ho*Wo = 2147488281")):
        validate(input=_stand_in(1, 1, side, side), offset=_stand_in(1, 2, side, side),
                 weight=_stand_in(1, 1, 1, 1))
    # One pixel fewer in a row is fine.
    geom = validate(input=_stand_in(1, 1, side, side - 1), offset=_stand_in(1, 2, side, side - 1),
                    weight=_stand_in(1, 1, 1, 1))
    assert geom.out_pixels == side * (side - 1) < 2**31


# ---------------------------------------------------------------------------
# A framework that is not installed


def test_import_framework_names_the_extra_for_a_missing_framework():
    from cudcn.errors import import_framework

    with pytest.raises(ModuleNotFoundError, match=re.escape(
            'cudcn.cudcn_absent_framework needs cudcn_absent_framework (the absent-framework package), '
            'which is not installed: pip install "cudcn[cudcn_absent_framework]"')) as raised:
        import_framework("cudcn_absent_framework", "absent-framework")
    assert raised.value.name == "cudcn_absent_framework"
    cause = raised.value.__cause__
    assert isinstance(cause, ModuleNotFoundError) and cause.name == "cudcn_absent_framework"


def test_import_framework_passes_on_a_frameworks_own_import_errors(tmp_path, monkeypatch):
    """A framework that is there but misses one of its own dependencies: import's error as it is."""
    from cudcn.errors import import_framework

    (tmp_path / "cudcn_broken_framework").mkdir()
    (tmp_path / "cudcn_broken_framework" / "__init__.py").write_text("import cudcn_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="^No module named 'cudcn_missing_dependency'$"):
        import_framework("cudcn_broken_framework", "broken-framework")
    (tmp_path / "cudcn_present_framework.py").write_text("VALUE = 7\n")
    assert import_framework("cudcn_present_framework", "present-framework").VALUE == 7
