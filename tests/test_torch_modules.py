"""cudcn.torch modules: torchvision/mmcv compatibility, pack layers, CoordConv."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import cudcn.torch as ct  # noqa: E402

pytestmark = pytest.mark.torch


def torchvision_style_state_dict(out_channels, in_channels, kernel_size, groups=1, bias=True, seed=0):
    """What torchvision.ops.DeformConv2d(...).state_dict() holds: keys and shapes.

    torchvision's layer has ``weight`` (C_out, C_in/groups, kh, kw) and
    ``bias`` (C_out,) (absent with bias=False), and no buffers.
    """
    gen = torch.Generator().manual_seed(seed)
    state = OrderedDict(weight=torch.randn(out_channels, in_channels // groups, *kernel_size, generator=gen))
    if bias:
        state["bias"] = torch.randn(out_channels, generator=gen)
    return state


@pytest.mark.parametrize("bias", [True, False])
def test_deform_conv2d_state_dict_round_trips_with_torchvision(bias):
    state = torchvision_style_state_dict(6, 4, (3, 2), groups=2, bias=bias)
    layer = ct.DeformConv2d(4, 6, (3, 2), stride=2, padding=1, groups=2, bias=bias)
    layer.load_state_dict(state, strict=True)
    back = layer.state_dict()
    assert list(back) == list(state)
    for key in state:
        assert back[key].shape == state[key].shape and torch.equal(back[key], state[key])


def test_deform_conv2d_attributes_match_torchvision():
    layer = ct.DeformConv2d(4, 6, 3, stride=(2, 1), padding=1, dilation=2, groups=2, bias=False)
    assert (layer.in_channels, layer.out_channels, layer.groups) == (4, 6, 2)
    assert (layer.kernel_size, layer.stride, layer.padding, layer.dilation) == ((3, 3), (2, 1), (1, 1), (2, 2))
    assert layer.bias is None and [name for name, _ in layer.named_parameters()] == ["weight"]
    assert repr(layer) == "DeformConv2d(4, 6, kernel_size=(3, 3), stride=(2, 1), padding=(1, 1), dilation=(2, 2), groups=2, bias=False)"
    with pytest.raises(ValueError, match="in_channels = 5 must be divisible by groups = 2"):
        ct.DeformConv2d(5, 6, 3, groups=2)
    with pytest.raises(ValueError, match="out_channels = 5 must be divisible by groups = 2"):
        ct.DeformConv2d(4, 5, 3, groups=2)


def test_deform_conv2d_initialisation_is_torchvisions():
    """torchvision draws kaiming_uniform_(a=sqrt(5)) then uniform(+-1/sqrt(fan_in)),

    the same draws, in the same order, as nn.Conv2d: under one seed both
    layers get the same numbers.
    """
    torch.manual_seed(7)
    layer = ct.DeformConv2d(4, 6, (3, 2), groups=2)
    torch.manual_seed(7)
    conv = nn.Conv2d(4, 6, (3, 2), groups=2)
    assert torch.equal(layer.weight, conv.weight) and torch.equal(layer.bias, conv.bias)
    bound = 1 / math.sqrt(2 * 3 * 2)  # fan_in = C_in/groups * kh * kw
    assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound
    layer.reset_parameters()
    assert not torch.equal(layer.weight, conv.weight)


@pytest.mark.parametrize("bias", [True, False])
def test_zero_offset_is_the_plain_convolution(bias):
    torch.manual_seed(0)
    layer = ct.DeformConv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2, bias=bias).double()
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    expected = F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    offset = torch.zeros(2, 2 * 3 * 2, *expected.shape[2:], dtype=torch.float64)
    torch.testing.assert_close(layer(x, offset), expected)
    mask = torch.full((2, 3 * 2, *expected.shape[2:]), 0.25, dtype=torch.float64)
    shift = 0 if layer.bias is None else layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x, offset, mask), 0.25 * (expected - shift) + shift)


@pytest.mark.parametrize("cls, scale", [(ct.DeformConv2dPack, 1.0), (ct.ModulatedDeformConv2dPack, 0.5)])
@pytest.mark.parametrize("bias", [True, False])
def test_packs_start_as_the_plain_convolution(cls, scale, bias):
    """DCNv1 starts as the convolution; DCNv2 as the convolution times sigmoid(0), bias unscaled."""
    torch.manual_seed(0)
    layer = cls(4, 6, 3, stride=2, padding=1, dilation=1, groups=2, offset_groups=2, bias=bias).double()
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    plain = F.conv2d(x, layer.weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    shift = 0 if layer.bias is None else layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(out, scale * plain + shift)
    # The offset predictor starts at zero but learns: its gradient is not zero.
    out.square().sum().backward()
    assert layer.conv_offset.weight.grad.abs().sum() > 0 and layer.conv_offset.bias.grad.abs().sum() > 0


@pytest.mark.parametrize("cls, values", [(ct.DeformConv2dPack, 2), (ct.ModulatedDeformConv2dPack, 3)])
def test_packs_follow_mmcv_layout(cls, values):
    layer = cls(4, 6, (3, 2), stride=2, padding=1, dilation=(1, 2), offset_groups=2)
    assert list(layer.state_dict()) == ["weight", "bias", "conv_offset.weight", "conv_offset.bias"]
    conv = layer.conv_offset
    assert conv.weight.shape == (values * 2 * 3 * 2, 4, 3, 2)  # offset_groups * values * kh * kw
    assert (conv.kernel_size, conv.stride, conv.padding, conv.dilation) == ((3, 2), (2, 2), (1, 1), (1, 2))
    assert torch.count_nonzero(conv.weight) == 0 and torch.count_nonzero(conv.bias) == 0
    no_bias = cls(4, 6, 3, bias=False)
    assert list(no_bias.state_dict()) == ["weight", "conv_offset.weight", "conv_offset.bias"]
    with pytest.raises(ValueError, match="in_channels = 4 must be divisible by offset_groups = 3"):
        cls(4, 6, 3, offset_groups=3)


def test_modulated_pack_splits_offset_and_mask_like_mmcv():
    """conv_offset's output (o1, o2, m) gives offset = cat(o1, o2), mask = sigmoid(m)."""
    torch.manual_seed(0)
    layer = ct.ModulatedDeformConv2dPack(2, 3, 3, padding=1, offset_groups=2).double()
    nn.init.normal_(layer.conv_offset.weight, std=0.3)
    nn.init.normal_(layer.conv_offset.bias, std=0.3)
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64)
    o1, o2, m = torch.chunk(layer.conv_offset(x), 3, dim=1)
    expected = ct.deform_conv2d(
        x, torch.cat((o1, o2), 1), layer.weight, layer.bias, padding=1, mask=torch.sigmoid(m)
    )
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)

    v1 = ct.DeformConv2dPack(2, 3, 3, padding=1, offset_groups=2).double()
    v1.load_state_dict({k: v for k, v in layer.state_dict().items() if "offset" not in k}, strict=False)
    v1.conv_offset.weight.data.copy_(layer.conv_offset.weight[: 2 * 2 * 9])
    v1.conv_offset.bias.data.copy_(layer.conv_offset.bias[: 2 * 2 * 9])
    torch.testing.assert_close(
        v1(x), ct.deform_conv2d(x, torch.cat((o1, o2), 1), layer.weight, layer.bias, padding=1), rtol=0, atol=0
    )


def test_pack_state_dict_round_trip():
    torch.manual_seed(0)
    source = ct.ModulatedDeformConv2dPack(4, 6, 3, padding=1, offset_groups=2)
    nn.init.normal_(source.conv_offset.weight, std=0.1)
    target = ct.ModulatedDeformConv2dPack(4, 6, 3, padding=1, offset_groups=2)
    target.load_state_dict(source.state_dict(), strict=True)
    x = torch.randn(2, 4, 7, 7)
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


def test_coordinate_channels():
    x = torch.zeros(2, 3, 4, 5, dtype=torch.float64)
    coords = ct.coordinate_channels(x)
    assert coords.shape == (2, 2, 4, 5) and coords.dtype == torch.float64
    columns = torch.linspace(-1, 1, 5, dtype=torch.float64)
    rows = torch.linspace(-1, 1, 4, dtype=torch.float64)
    torch.testing.assert_close(coords[1, 0], columns.expand(4, 5))  # varies along the width
    torch.testing.assert_close(coords[1, 1], rows.view(4, 1).expand(4, 5))  # along the height
    for shape in [(1, 1, 1, 1), (1, 1, 1, 6), (1, 1, 6, 1)]:
        coords = ct.coordinate_channels(torch.zeros(shape))
        assert torch.isfinite(coords).all() and coords.abs().max() <= 1


def test_coord_conv2d_is_a_convolution_of_input_and_coordinates():
    torch.manual_seed(0)
    layer = ct.CoordConv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2, bias=True)
    assert layer.conv.weight.shape == (6, 3, 3, 3) and layer.conv.groups == 2
    x = torch.randn(2, 4, 7, 1)
    expected = layer.conv(torch.cat((x, ct.coordinate_channels(x)), 1))
    out = layer(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert torch.isfinite(out).all()
    assert list(layer.state_dict()) == ["conv.weight", "conv.bias"]


def test_pack_under_torch_compile_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = ct.ModulatedDeformConv2dPack(4, 6, 3, padding=1)
    nn.init.normal_(layer.conv_offset.weight, std=0.1)
    x = torch.randn(2, 4, 7, 7)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x))
    compiled(x).sum().backward()
    assert layer.weight.grad is not None and layer.conv_offset.weight.grad is not None


@pytest.mark.parametrize("cls", [ct.DeformConv2dPack, ct.ModulatedDeformConv2dPack])
def test_packs_take_mmcvs_deform_groups(cls):
    """mmcv's name for offset_groups, by keyword or in the same position."""
    by_name = cls(4, 6, 3, padding=1, deform_groups=2)
    positional = cls(4, 6, 3, 1, 1, 1, 1, 2)  # in, out, kernel, stride, padding, dilation, groups, deform_groups
    default = cls(4, 6, 3)
    for layer, groups in ((by_name, 2), (positional, 2), (cls(4, 6, 3, offset_groups=2), 2), (default, 1)):
        assert layer.offset_groups == layer.deform_groups == groups
        assert layer.conv_offset.out_channels == cls.values_per_point * groups * 9
    assert "offset_groups=2" in repr(by_name)


def old_mmcv_dcnv2_state_dict(layer):
    """``layer``'s state dict as old mmcv (and many DCNv2 repositories) saved
    it: the offset/mask predictor named conv_offset_mask."""
    return OrderedDict(
        (key.replace("conv_offset.", "conv_offset_mask."), value.clone()) for key, value in layer.state_dict().items()
    )


def test_modulated_pack_loads_conv_offset_mask_state_dicts():
    torch.manual_seed(0)
    source = ct.ModulatedDeformConv2dPack(4, 6, 3, padding=1, offset_groups=2)
    nn.init.normal_(source.conv_offset.weight, std=0.3)
    nn.init.normal_(source.conv_offset.bias, std=0.3)
    old = old_mmcv_dcnv2_state_dict(source)
    assert list(old) == ["weight", "bias", "conv_offset_mask.weight", "conv_offset_mask.bias"]
    saved = OrderedDict((key, value.clone()) for key, value in old.items())

    target = ct.ModulatedDeformConv2dPack(4, 6, 3, padding=1, offset_groups=2)
    target.load_state_dict(old, strict=True)
    x = torch.randn(2, 4, 7, 7)
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
    assert list(old) == list(saved) and all(torch.equal(old[k], saved[k]) for k in saved)  # the caller's dict untouched

    # Inside a model, under a prefix, as checkpoints hold it.
    model = nn.Sequential(nn.Identity(), ct.ModulatedDeformConv2dPack(4, 6, 3, padding=1, offset_groups=2))
    model.load_state_dict(OrderedDict((f"1.{key}", value) for key, value in old.items()), strict=True)
    torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)


def test_conv_offset_mask_with_the_wrong_shape_is_still_an_error():
    old = old_mmcv_dcnv2_state_dict(ct.ModulatedDeformConv2dPack(4, 6, 3, offset_groups=2))
    with pytest.raises(RuntimeError, match=r"size mismatch for conv_offset.weight"):
        ct.ModulatedDeformConv2dPack(4, 6, 3, offset_groups=1).load_state_dict(old)


def test_coord_conv2d_takes_unbatched_input_like_conv2d():
    torch.manual_seed(0)
    layer = ct.CoordConv2d(4, 6, 3, stride=2, padding=1, groups=2)
    x = torch.randn(4, 7, 5)
    out = layer(x)
    assert out.shape == (6, 4, 3) == nn.Conv2d(4, 6, 3, stride=2, padding=1)(x).shape
    torch.testing.assert_close(out, layer(x[None])[0], rtol=0, atol=0)
    torch.testing.assert_close(ct.coordinate_channels(x), ct.coordinate_channels(x[None])[0], rtol=0, atol=0)
