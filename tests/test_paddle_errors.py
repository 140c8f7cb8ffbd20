"""Every malformed call through the paddle door gets a clear error naming the argument.

The function (paddle's signature and names: ``x`` for the input), the four
layers' constructors and their forwards. Each error is a TypeError or
ValueError, as Python code expects, and also a RuntimeError, as code written
for torchvision expects: both kinds of ``except`` catch it.
"""

from __future__ import annotations

import numpy as np
import pytest

paddle = pytest.importorskip("paddle")

import cudcn  # noqa: E402
import cudcn.paddle as cpd  # noqa: E402

pytestmark = pytest.mark.paddle

LAYERS = [cpd.DeformConv2D, cpd.DeformConv2DPack, cpd.ModulatedDeformConv2DPack, cpd.CoordConv2D]
PACKS = [cpd.DeformConv2DPack, cpd.ModulatedDeformConv2DPack]


def assert_raises(error: type, match: str, call) -> None:
    """call() raises ``error`` (TypeError or ValueError) matching ``match``, also caught as RuntimeError."""
    with pytest.raises(error, match=match) as caught:
        call()
    assert isinstance(caught.value, RuntimeError)
    expected = cudcn.ArgumentTypeError if error is TypeError else cudcn.ArgumentError
    assert isinstance(caught.value, expected), type(caught.value)


def call_arguments(**change):
    """Valid keyword arguments of cpd.deform_conv2d (float32, groups 2, deformable_groups 2), changed."""
    rng = np.random.default_rng(0)
    args = dict(
        x=paddle.to_tensor(rng.standard_normal((2, 4, 7, 6)).astype("float32")),
        offset=paddle.to_tensor(rng.standard_normal((2, 36, 5, 4)).astype("float32")),
        weight=paddle.to_tensor(rng.standard_normal((6, 2, 3, 3)).astype("float32")),
        bias=paddle.to_tensor(rng.standard_normal(6).astype("float32")),
        mask=paddle.to_tensor(rng.random((2, 18, 5, 4)).astype("float32")),
        deformable_groups=2,
        groups=2,
    )
    args.update(change)
    return args


def test_the_valid_call_runs():
    assert tuple(cpd.deform_conv2d(**call_arguments()).shape) == (2, 6, 5, 4)


@pytest.mark.parametrize(
    "name, layout",
    [("x", r"\(N, C_in, H, W\)"), ("offset", r"\(N, 2\*deformable_groups\*kh\*kw, Ho, Wo\)"),
     ("weight", r"\(C_out, C_in/groups, kh, kw\)")],
)
def test_none_for_a_required_tensor_is_named(name, layout):
    assert_raises(
        TypeError, rf"^{name} must be a paddle.Tensor {layout}, got None$",
        lambda: cpd.deform_conv2d(**call_arguments(**{name: None})),
    )


@pytest.mark.parametrize("name", ["groups", "deformable_groups"])
@pytest.mark.parametrize(
    "value, shown", [(True, "bool True"), (2.0, "float 2.0"), ("2", "str '2'"), (None, "None")]
)
def test_groups_must_be_ints_as_in_paddles_op(name, value, shown):
    """paddle's op raises TypeError for these too; True and 2.0 used to pass."""
    assert_raises(
        TypeError, rf"^{name} must be an int, got {shown}$",
        lambda: cpd.deform_conv2d(**call_arguments(**{name: value})),
    )
    with pytest.raises(TypeError, match="must be int"):
        paddle.vision.ops.deform_conv2d(**call_arguments(**{name: value}))


@pytest.mark.parametrize("name", ["groups", "deformable_groups"])
def test_groups_below_one_and_numpy_ints(name):
    assert_raises(ValueError, rf"^{name} must be >= 1, got 0$", lambda: cpd.deform_conv2d(**call_arguments(**{name: 0})))
    out = cpd.deform_conv2d(**call_arguments(**{name: np.int64(2)}))
    np.testing.assert_array_equal(out.numpy(), cpd.deform_conv2d(**call_arguments()).numpy())


def test_function_errors_caught_as_runtime_error_and_as_value_or_type_error():
    """The same bad call caught by torchvision-style and by Python-style code."""
    bad_calls = [
        call_arguments(x=None),
        call_arguments(groups=2.0),
        call_arguments(offset=call_arguments()["offset"][:, :35]),
        call_arguments(stride=0),
    ]
    for kwargs in bad_calls:
        try:
            cpd.deform_conv2d(**kwargs)
        except RuntimeError as error:
            caught_as_runtime_error = error
        try:
            cpd.deform_conv2d(**kwargs)
        except (ValueError, TypeError) as error:
            caught_as_python_error = error
        assert str(caught_as_runtime_error) == str(caught_as_python_error)


# ----------------------------------------------------------------------------
# Constructors
# ----------------------------------------------------------------------------

# (keyword changes to the valid (4, 6, 3) layer, error, message); each applies to every layer.
BAD_CONSTRUCTIONS = [
    (dict(kernel_size=0), ValueError, r"kernel_size must be >= 1, got 0"),
    (dict(kernel_size=(3, 0)), ValueError, r"kernel_size must be >= 1, got \(3, 0\)"),
    (dict(kernel_size=None), ValueError, r"kernel_size must be an int or a pair of ints, got None"),
    (dict(kernel_size=3.0), ValueError, r"kernel_size must be an int or a pair of ints, got 3.0"),
    (dict(in_channels=0), ValueError, r"in_channels must be >= 1, got 0"),
    (dict(in_channels=4.0), TypeError, r"in_channels must be an int, got float 4.0"),
    (dict(in_channels=None), TypeError, r"in_channels must be an int, got None$"),
    (dict(out_channels=-6), ValueError, r"out_channels must be >= \d, got -6"),
    (dict(out_channels="6"), TypeError, r"out_channels must be an int, got str '6'"),
    (dict(groups=True), TypeError, r"groups must be an int, got bool True"),
    (dict(groups=2.0), TypeError, r"groups must be an int, got float 2.0"),
    (dict(groups="2"), TypeError, r"groups must be an int, got str '2'"),
    (dict(groups=0), ValueError, r"groups must be >= 1, got 0"),
    (dict(out_channels=7, groups=2), ValueError, r"out_channels = 7 must be divisible by groups = 2"),
    (dict(stride=0), ValueError, r"stride must be >= 1, got 0"),
    (dict(stride="1"), ValueError, r"stride must be an int or a pair of ints, got '1'"),
    (dict(padding=-1), ValueError, r"padding must be >= 0, got -1"),
    (dict(padding="same"), ValueError, r"padding must be an int or a pair of ints, got 'same'"),
    (dict(dilation=(1, 0)), ValueError, r"dilation must be >= 1, got \(1, 0\)"),
    (dict(weight_attr=False), ValueError, r"weight_attr must not be False: the layer needs a weight"),
    (dict(bias_attr=5), TypeError, r"bias_attr must be a paddle.ParamAttr, a name, an initializer, a bool or None, got int"),
    (dict(weight_attr=[1.0]), TypeError, r"weight_attr must be a paddle.ParamAttr"),
]

DEFORMABLE_GROUPS_CONSTRUCTIONS = [
    (dict(deformable_groups=True), TypeError, r"deformable_groups must be an int, got bool True"),
    (dict(deformable_groups=2.0), TypeError, r"deformable_groups must be an int, got float 2.0"),
    (dict(deformable_groups="2"), TypeError, r"deformable_groups must be an int, got str '2'"),
    (dict(deformable_groups=0), ValueError, r"deformable_groups must be >= 1, got 0"),
    (dict(deformable_groups=3), ValueError, r"in_channels = 4 must be divisible by deformable_groups = 3"),
]


def build(cls, **change):
    kwargs = dict(in_channels=4, out_channels=6, kernel_size=3, padding=1)
    kwargs.update(change)
    return cls(**kwargs)


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("change, error, match", BAD_CONSTRUCTIONS)
def test_bad_constructor_arguments_are_named(cls, change, error, match):
    assert_raises(error, match, lambda: build(cls, **change))


@pytest.mark.parametrize("cls", LAYERS[:3], ids=lambda c: c.__name__)
@pytest.mark.parametrize("change, error, match", DEFORMABLE_GROUPS_CONSTRUCTIONS)
def test_bad_deformable_groups_are_named(cls, change, error, match):
    assert_raises(error, match, lambda: build(cls, **change))


def test_coord_conv_constructor_specifics():
    """Its convolution sees in_channels + 2 channels and needs an output channel."""
    assert_raises(ValueError, r"^in_channels \+ 2 = 6 must be divisible by groups = 4$", lambda: build(cpd.CoordConv2D, groups=4, out_channels=8))
    assert_raises(ValueError, r"^out_channels must be >= 1, got 0$", lambda: build(cpd.CoordConv2D, out_channels=0))
    assert tuple(build(cpd.CoordConv2D, groups=3).conv.weight.shape) == (6, 2, 3, 3)


def test_numpy_ints_and_lists_are_accepted_by_constructors():
    layer = cpd.DeformConv2D(np.int64(4), np.int32(6), [3, 2], stride=np.int64(1), deformable_groups=np.int64(2))
    assert layer._kernel_size == [3, 2] and layer._deformable_groups == 2
    assert type(layer._deformable_groups) is int and type(layer._in_channels) is int
    assert tuple(layer.weight.shape) == (6, 4, 3, 2)
    assert tuple(cpd.DeformConv2D(4, 0, 3).weight.shape) == (0, 4, 3, 3)  # 0 output channels: valid


# ----------------------------------------------------------------------------
# Forwards
# ----------------------------------------------------------------------------


def layer_and_call(cls, **x_change):
    """A (4 -> 6, 3x3, padding 1) layer and a call of it on x (2, 4, 7, 6) float32, changed."""
    layer = build(cls)
    x = paddle.to_tensor(np.random.default_rng(0).standard_normal((2, 4, 7, 6)).astype("float32"))
    x = x_change.get("x", x)
    if cls is cpd.DeformConv2D:
        offset = x_change.get("offset", paddle.zeros([2, 18, 7, 6]))
        return lambda: layer(x, offset)
    return lambda: layer(x)


BAD_INPUTS = [
    (dict(x=None), TypeError, r"^x must be a paddle.Tensor \(N, C_in, H, W\), got None$"),
    (dict(x=np.zeros((2, 4, 7, 6), "float32")), TypeError, r"^x must be a paddle.Tensor \(N, C_in, H, W\), got ndarray$"),
    (dict(x=paddle.zeros([4, 7, 6])), ValueError, r"^x must be a 4-D (array|tensor) \(N, C_in, H, W\), got 3-D with shape"),
    (dict(x=paddle.zeros([2, 3, 7, 6])), ValueError, r"^x.shape\[1\]"),
    (dict(x=paddle.zeros([2, 4, 7, 6], "float64")), TypeError, r"dtype must equal"),
    (dict(x=paddle.zeros([2, 4, 7, 6], "int32")), TypeError, r"int32"),
]


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("change, error, match", BAD_INPUTS)
def test_bad_forward_inputs_are_named(cls, change, error, match):
    assert_raises(error, match, layer_and_call(cls, **change))


@pytest.mark.parametrize("cls", LAYERS[1:], ids=lambda c: c.__name__)
def test_input_smaller_than_the_kernel_is_an_error_before_paddles_conv(cls):
    """paddle's conv2d would return an empty output (and print MKL errors) or fail on H = 0."""
    layer = cls(4, 6, 3)
    for shape, out in (([1, 4, 2, 2], r"\(0, 0\)"), ([1, 4, 0, 5], r"\(-2, 3\)")):
        assert_raises(
            ValueError,
            rf"^x.shape\[2:\] \(H, W\) = \({shape[2]}, {shape[3]}\) is too small: the output size \(Ho, Wo\) = {out}",
            lambda: layer(paddle.zeros(shape)),
        )


def test_deform_conv2d_layer_forward_names_offset_and_mask():
    layer = build(cpd.DeformConv2D, deformable_groups=2)
    x = paddle.zeros([2, 4, 7, 6])
    assert_raises(TypeError, r"^offset must be a paddle.Tensor .*, got None$", lambda: layer(x, None))
    assert_raises(ValueError, r"^offset.shape\[1\] must be 2\*deformable_groups\*kh\*kw = 36", lambda: layer(x, paddle.zeros([2, 18, 7, 6])))
    assert_raises(TypeError, r"^mask must be a paddle.Tensor .*, got list$", lambda: layer(x, paddle.zeros([2, 36, 7, 6]), [1]))


@pytest.mark.parametrize("cls", PACKS + [cpd.CoordConv2D], ids=lambda c: c.__name__)
def test_layer_errors_caught_as_runtime_error_and_as_value_or_type_error(cls):
    for change in (dict(x=None), dict(x=paddle.zeros([4, 7, 6]))):
        call = layer_and_call(cls, **change)
        with pytest.raises(RuntimeError):
            call()
        with pytest.raises((ValueError, TypeError)):
            call()
