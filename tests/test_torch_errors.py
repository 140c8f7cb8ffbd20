"""Every malformed call through the torch door gets a clear error naming the argument.

The door: cudcn.torch.deform_conv2d, DeformConv2d, DeformConv2dPack,
ModulatedDeformConv2dPack and CoordConv2d, constructors and forwards. Each
error is a ValueError or TypeError and also a RuntimeError (torchvision's
errors are RuntimeErrors), so both kinds of ``except`` catch it: every case
is checked with both.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import cudcn.torch as ct  # noqa: E402

pytestmark = pytest.mark.torch

LAYERS = [ct.DeformConv2d, ct.DeformConv2dPack, ct.ModulatedDeformConv2dPack, ct.CoordConv2d]
PACKS = [ct.DeformConv2dPack, ct.ModulatedDeformConv2dPack]


def assert_clear_error(call, error, message):
    """``call()`` raises ``error`` (ValueError or TypeError) with ``message``,
    and ``except RuntimeError`` catches it too."""
    for caught in (error, RuntimeError):
        try:
            call()
        except caught as raised:
            assert re.search(re.escape(message), str(raised)), (str(raised), message)
        else:
            pytest.fail(f"no {caught.__name__} raised; expected {message!r}")


# (constructor changes, error, message), for every layer
CONSTRUCTOR_ERRORS = [
    (dict(in_channels=0), ValueError, "in_channels must be >= 1, got 0"),
    (dict(in_channels=-1), ValueError, "in_channels must be >= 1, got -1"),
    (dict(in_channels=True), TypeError, "in_channels must be an int, got bool True"),
    (dict(in_channels=4.0), TypeError, "in_channels must be an int, got float 4.0"),
    (dict(in_channels="4"), TypeError, "in_channels must be an int, got str '4'"),
    (dict(in_channels=None), TypeError, "in_channels must be an int, got NoneType None"),
    (dict(out_channels=-1), ValueError, "out_channels must be >= 0, got -1"),
    (dict(out_channels=np.bool_(True)), TypeError, "out_channels must be an int, got bool np.True_"),
    (dict(out_channels=6.0), TypeError, "out_channels must be an int, got float 6.0"),
    (dict(kernel_size=0), ValueError, "kernel_size must be >= 1, got 0"),
    (dict(kernel_size=(3, 0)), ValueError, "kernel_size must be >= 1, got (3, 0)"),
    (dict(kernel_size=-1), ValueError, "kernel_size must be >= 1, got -1"),
    (dict(kernel_size=1.5), ValueError, "kernel_size must be an int or a pair of ints, got 1.5"),
    (dict(kernel_size="3"), ValueError, "kernel_size must be an int or a pair of ints, got '3'"),
    (dict(kernel_size=None), ValueError, "kernel_size must be an int or a pair of ints, got None"),
    (dict(kernel_size=(3, 3, 3)), ValueError, "kernel_size must be an int or a pair of ints, got (3, 3, 3)"),
    (dict(kernel_size=True), ValueError, "kernel_size must be an int or a pair of ints, got True"),
    (dict(stride=0), ValueError, "stride must be >= 1, got 0"),
    (dict(stride=(1, -1)), ValueError, "stride must be >= 1, got (1, -1)"),
    (dict(stride="1"), ValueError, "stride must be an int or a pair of ints, got '1'"),
    (dict(stride=None), ValueError, "stride must be an int or a pair of ints, got None"),
    (dict(stride=2**40), ValueError, "stride must be in [1, 2**31 - 1] (the kernels index in 32 bits), got 1099511627776"),
    (dict(padding=-1), ValueError, "padding must be >= 0, got -1"),
    (dict(padding=(1, -1)), ValueError, "padding must be >= 0, got (1, -1)"),
    (dict(padding="1"), ValueError, "padding must be an int or a pair of ints, got '1'"),
    (dict(padding=1.5), ValueError, "padding must be an int or a pair of ints, got 1.5"),
    (dict(dilation=0), ValueError, "dilation must be >= 1, got 0"),
    (dict(dilation=1.5), ValueError, "dilation must be an int or a pair of ints, got 1.5"),
    (dict(groups=0), ValueError, "groups must be >= 1, got 0"),
    (dict(groups=-1), ValueError, "groups must be >= 1, got -1"),
    (dict(groups=True), TypeError, "groups must be an int, got bool True"),
    (dict(groups=2.0), TypeError, "groups must be an int, got float 2.0"),
    (dict(groups="2"), TypeError, "groups must be an int, got str '2'"),
    (dict(groups=None), TypeError, "groups must be an int, got NoneType None"),
    (dict(groups=4), ValueError, "must be divisible by groups = 4"),
    (dict(bias="yes"), TypeError, "bias must be True or False, got 'yes'"),
    (dict(bias=None), TypeError, "bias must be True or False, got None"),
    (dict(bias=1), TypeError, "bias must be True or False, got 1"),
]


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("changes, error, message", CONSTRUCTOR_ERRORS, ids=[m for _, _, m in CONSTRUCTOR_ERRORS])
def test_constructor_errors(cls, changes, error, message):
    arguments = {**dict(in_channels=4, out_channels=6, kernel_size=3), **changes}
    assert_clear_error(lambda: cls(**arguments), error, message)


def test_groups_that_do_not_divide_are_named_per_layer():
    assert_clear_error(lambda: ct.DeformConv2d(5, 6, 3, groups=2), ValueError, "in_channels = 5 must be divisible by groups = 2")
    assert_clear_error(lambda: ct.DeformConv2dPack(4, 5, 3, groups=2), ValueError, "out_channels = 5 must be divisible by groups = 2")
    # CoordConv's convolution sees the two coordinate channels too.
    assert_clear_error(lambda: ct.CoordConv2d(4, 6, 3, groups=4), ValueError, "in_channels + 2 = 6 must be divisible by groups = 4")
    assert ct.CoordConv2d(4, 6, 3, groups=3).conv.groups == 3


PACK_ERRORS = [
    (dict(offset_groups=0), ValueError, "offset_groups must be >= 1, got 0"),
    (dict(offset_groups=3), ValueError, "in_channels = 4 must be divisible by offset_groups = 3"),
    (dict(offset_groups=True), TypeError, "offset_groups must be an int, got bool True"),
    (dict(offset_groups=2.0), TypeError, "offset_groups must be an int, got float 2.0"),
    (dict(deform_groups=0), ValueError, "deform_groups must be >= 1, got 0"),
    (dict(deform_groups=3), ValueError, "in_channels = 4 must be divisible by deform_groups = 3"),
    (dict(deform_groups="2"), TypeError, "deform_groups must be an int, got str '2'"),
    (dict(offset_groups=2, deform_groups=2), ValueError,
     "pass offset_groups or deform_groups (mmcv's name for it), not both; got offset_groups = 2 and deform_groups = 2"),
]


@pytest.mark.parametrize("cls", PACKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("changes, error, message", PACK_ERRORS, ids=[m[:50] for _, _, m in PACK_ERRORS])
def test_pack_offset_groups_errors(cls, changes, error, message):
    assert_clear_error(lambda: cls(4, 6, 3, **changes), error, message)


# -- forwards -----------------------------------------------------------------


def function_arguments():
    gen = torch.Generator().manual_seed(0)
    return dict(
        input=torch.randn(2, 4, 5, 5, generator=gen),
        offset=torch.randn(2, 18, 5, 5, generator=gen),
        weight=torch.randn(6, 4, 3, 3, generator=gen),
        bias=torch.randn(6, generator=gen),
        mask=torch.rand(2, 9, 5, 5, generator=gen),
        padding=1,
    )


def sparse(layout):
    def convert(t):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sparse CSR is "beta"
            return t.to_sparse(layout=layout) if t.dim() >= 2 else t.to_sparse()
    return convert


SPARSE_LAYOUTS = [torch.sparse_coo, torch.sparse_csr]


@pytest.mark.parametrize("name", ["input", "offset", "weight"])
def test_function_none_for_a_required_tensor(name):
    arguments = {**function_arguments(), name: None}
    assert_clear_error(lambda: ct.deform_conv2d(**arguments), TypeError, f"{name} must be a torch.Tensor, got None")


@pytest.mark.parametrize("layout", SPARSE_LAYOUTS, ids=str)
@pytest.mark.parametrize("name", ["input", "offset", "weight", "bias", "mask"])
def test_function_sparse_tensors(name, layout):
    arguments = function_arguments()
    arguments[name] = sparse(layout)(arguments[name])
    expected_layout = arguments[name].layout
    assert_clear_error(
        lambda: ct.deform_conv2d(**arguments), TypeError,
        f"{name} must be a dense (torch.strided) tensor, got layout {expected_layout}; convert it with .to_dense()",
    )


def test_function_nested_tensor():
    arguments = function_arguments()
    arguments["input"] = torch.nested.nested_tensor(list(arguments["input"]), layout=torch.jagged)
    assert_clear_error(lambda: ct.deform_conv2d(**arguments), TypeError, "input must be a dense (torch.strided) tensor, got a nested tensor")


@pytest.mark.parametrize("name, value, kind", [("bias", [1.0] * 6, "list"), ("mask", 3, "int"), ("offset", np.zeros((2, 18, 5, 5)), "ndarray")])
@pytest.mark.parametrize("autocast", [False, True])
def test_function_non_tensors(name, value, kind, autocast):
    """Also under autocast, which casts the tensor arguments first."""
    arguments = {**function_arguments(), name: value}

    def call():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            ct.deform_conv2d(**arguments)

    assert_clear_error(call, TypeError, f"{name} must be a torch.Tensor, got {kind}")


def test_function_shape_errors_catch_both_ways():
    arguments = function_arguments()
    arguments["offset"] = arguments["offset"][:, :-1]
    assert_clear_error(lambda: ct.deform_conv2d(**arguments), ValueError, "offset.shape[1] must be a positive multiple of 2*kh*kw = 18, got 17")


def test_deform_conv2d_forward_errors():
    layer = ct.DeformConv2d(4, 6, 3, padding=1)
    a = function_arguments()
    x, offset, mask = a["input"], a["offset"], a["mask"]
    assert_clear_error(lambda: layer(None, offset), TypeError, "input must be a torch.Tensor, got None")
    assert_clear_error(lambda: layer(x, None), TypeError, "offset must be a torch.Tensor, got None")
    assert_clear_error(lambda: layer(x, offset, 3), TypeError, "mask must be a torch.Tensor, got int")
    assert_clear_error(lambda: layer(x.to_sparse(), offset), TypeError, "input must be a dense (torch.strided) tensor, got layout torch.sparse_coo")
    assert_clear_error(lambda: layer(x, offset, mask.to_sparse()), TypeError, "mask must be a dense (torch.strided) tensor, got layout torch.sparse_coo")
    assert_clear_error(lambda: layer(x[:, :3], offset), ValueError, "input.shape[1] = 3 must be a positive multiple of weight.shape[1] = 4")
    assert_clear_error(lambda: layer(x, offset, mask[:, :8]), ValueError, "mask.shape[1] must be offset_groups*kh*kw = 9, got 8")


@pytest.mark.parametrize("cls", [*PACKS, ct.CoordConv2d], ids=lambda c: c.__name__)
def test_self_predicting_layer_forward_errors(cls):
    """The packs and CoordConv run a convolution of their own first: they
    check the input before it, instead of leaving torch's conv2d to fail."""
    layer = cls(4, 6, 3, padding=1)
    x = function_arguments()["input"]
    shape = "3-D (C_in, H, W) or 4-D (N, C_in, H, W)" if cls is ct.CoordConv2d else "4-D (N, C_in, H, W)"
    assert_clear_error(lambda: layer(None), TypeError, "input must be a torch.Tensor, got None")
    assert_clear_error(lambda: layer(x.numpy()), TypeError, "input must be a torch.Tensor, got ndarray")
    for layout in SPARSE_LAYOUTS:
        assert_clear_error(lambda: layer(sparse(layout)(x)), TypeError, f"input must be a dense (torch.strided) tensor, got layout {layout}")
    assert_clear_error(lambda: layer(x.long()), TypeError, "input.dtype must be one of float16, bfloat16, float32, float64, got int64")
    assert_clear_error(lambda: layer(x[0, 0]), ValueError, f"input must be a {shape} tensor, got shape (5, 5)")
    assert_clear_error(lambda: layer(x[None]), ValueError, f"input must be a {shape} tensor, got shape (1, 2, 4, 5, 5)")
    assert_clear_error(lambda: layer(x[:, :3]), ValueError, "input.shape[1] (C_in) must be in_channels = 4, got 3")
    if cls is ct.CoordConv2d:
        assert_clear_error(lambda: layer(x[0, :3]), ValueError, "input.shape[0] (C_in) must be in_channels = 4, got 3")
    else:
        assert_clear_error(lambda: layer(x[0]), ValueError, f"input must be a {shape} tensor, got shape (4, 5, 5)")
