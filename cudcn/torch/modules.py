"""The nn.Modules: DeformConv2d (torchvision's), the pack layers that predict
their own offsets (mmcv's), and CoordConv."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cudcn.errors import ArgumentError, ArgumentTypeError
from cudcn.geometry import FLOAT_DTYPES, int_pair
from cudcn.torch._bridge import IntOrPair, check_tensors
from cudcn.torch.functional import deform_conv2d


# --------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------


def _int_argument(value: Any, name: str, minimum: int) -> int:
    """A layer's int argument (channels, groups) as an int >= ``minimum``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ArgumentTypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ArgumentError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_divisible(value: int, value_name: str, divisor: int, divisor_name: str) -> None:
    if value % divisor:
        raise ArgumentError(f"{value_name} = {value} must be divisible by {divisor_name} = {divisor}")


def _layer_arguments(
    in_channels: Any, out_channels: Any, kernel_size: Any, stride: Any, padding: Any,
    dilation: Any, groups: Any, bias: Any,
) -> tuple[int, int, tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int], int]:
    """A layer's constructor arguments, checked as a call's would be:
    (in_channels, out_channels, kernel_size, stride, padding, dilation, groups),
    sizes as pairs of ints. C_out may be 0, as a call's weight may."""
    in_channels = _int_argument(in_channels, "in_channels", 1)
    out_channels = _int_argument(out_channels, "out_channels", 0)
    groups = _int_argument(groups, "groups", 1)
    if not isinstance(bias, (bool, np.bool_)):
        raise ArgumentTypeError(f"bias must be True or False, got {bias!r}")
    return (
        in_channels,
        out_channels,
        int_pair(kernel_size, "kernel_size", 1),
        int_pair(stride, "stride", 1),
        int_pair(padding, "padding", 0),
        int_pair(dilation, "dilation", 1),
        groups,
    )


def _check_layer_input(input: Any, in_channels: int, unbatched: bool = False) -> None:
    """What a layer that runs its own convolution first needs of ``input``
    (the call's checks would come too late to name it)."""
    check_tensors({"input": input})
    if not input.is_floating_point():
        raise ArgumentTypeError(
            f"input.dtype must be one of {', '.join(FLOAT_DTYPES)}, got {str(input.dtype).removeprefix('torch.')}"
        )
    if input.dim() not in ((3, 4) if unbatched else (4,)):
        expected = "3-D (C_in, H, W) or 4-D (N, C_in, H, W)" if unbatched else "4-D (N, C_in, H, W)"
        raise ArgumentError(f"input must be a {expected} tensor, got shape {tuple(input.shape)}")
    if input.shape[-3] != in_channels:
        raise ArgumentError(
            f"input.shape[{input.dim() - 3}] (C_in) must be in_channels = {in_channels}, got {input.shape[-3]}"
        )


class DeformConv2d(nn.Module):
    """Deformable convolution layer; a drop-in for ``torchvision.ops.DeformConv2d``.

    Same constructor, parameters ``weight`` (C_out, C_in/groups, kh, kw) and
    ``bias`` (C_out,) (or None), initialisation and state-dict keys, so state
    dicts load both ways. ``forward(input, offset, mask=None)`` takes the
    shapes of :func:`deform_conv2d`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: IntOrPair = 0,
        dilation: IntOrPair = 1,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups = _layer_arguments(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias
        )
        _check_divisible(in_channels, "in_channels", groups, "groups")
        _check_divisible(out_channels, "out_channels", groups, "groups")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size)
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torchvision's initialisation (that of nn.Conv2d)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: Tensor, offset: Tensor, mask: Tensor | None = None) -> Tensor:
        """input (N, C_in, H, W), offset (N, 2*G*kh*kw, Ho, Wo), mask (N, G*kh*kw, Ho, Wo)."""
        return deform_conv2d(
            input, offset, self.weight, self.bias,
            stride=self.stride, padding=self.padding, dilation=self.dilation, mask=mask,
        )

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
            f", stride={self.stride}"
        )
        s += f", padding={self.padding}" if self.padding != (0, 0) else ""
        s += f", dilation={self.dilation}" if self.dilation != (1, 1) else ""
        s += f", groups={self.groups}" if self.groups != 1 else ""
        s += ", bias=False" if self.bias is None else ""
        return s


class _Pack(DeformConv2d):
    """A deformable convolution whose offsets come from ``self.conv_offset``.

    ``conv_offset`` is an nn.Conv2d with the layer's kernel size, stride,
    padding and dilation, so that it predicts one value per output pixel; it
    starts at zero. ``values_per_point`` is how many channels it predicts per
    kernel point and offset group. ``offset_groups`` may also be given by
    mmcv's name, ``deform_groups`` (same position; one of the two).
    """

    values_per_point = 0

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: IntOrPair = 0,
        dilation: IntOrPair = 1,
        groups: int = 1,
        offset_groups: int | None = None,
        bias: bool = True,
        *,
        deform_groups: int | None = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias
        )
        # mmcv calls offset_groups deform_groups (same position): either name, not both.
        if offset_groups is not None and deform_groups is not None:
            raise ArgumentError(
                f"pass offset_groups or deform_groups (mmcv's name for it), not both; "
                f"got offset_groups = {offset_groups!r} and deform_groups = {deform_groups!r}"
            )
        name = "offset_groups" if deform_groups is None else "deform_groups"
        given = offset_groups if deform_groups is None else deform_groups
        offset_groups = _int_argument(1 if given is None else given, name, 1)
        _check_divisible(self.in_channels, "in_channels", offset_groups, name)
        self.offset_groups = offset_groups
        kh, kw = self.kernel_size
        self.conv_offset = nn.Conv2d(
            self.in_channels,
            self.values_per_point * offset_groups * kh * kw,
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=True,
        )
        self.reset_offset()

    @property
    def deform_groups(self) -> int:
        """mmcv's name for ``offset_groups``."""
        return self.offset_groups

    def reset_offset(self) -> None:
        """Zero the offset predictor, so the layer starts as a plain convolution."""
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", offset_groups={self.offset_groups}" if self.offset_groups != 1 else "")


class DeformConv2dPack(_Pack):
    """DCNv1 layer that predicts its own offsets (mmcv's ``DeformConv2dPack``, "DCN").

    ``conv_offset`` maps the input to offsets (N, 2*offset_groups*kh*kw, Ho, Wo);
    it starts at zero, so the layer starts as a plain convolution with
    ``weight`` and ``bias``. State-dict keys: weight, bias, conv_offset.weight,
    conv_offset.bias (mmcv's; build with bias=False to load mmcv's DCN, which
    has no bias). ``forward(input)``: (N, C_in, H, W) -> (N, C_out, Ho, Wo).
    """

    values_per_point = 2

    def forward(self, input: Tensor) -> Tensor:  # type: ignore[override]
        if not (torch.jit.is_scripting() or torch.jit.is_tracing()):
            _check_layer_input(input, self.in_channels)
        offset = self.conv_offset(input)
        return deform_conv2d(
            input, offset, self.weight, self.bias,
            stride=self.stride, padding=self.padding, dilation=self.dilation,
        )


class ModulatedDeformConv2dPack(_Pack):
    """DCNv2 layer that predicts offsets and mask (mmcv's ``ModulatedDeformConv2dPack``, "DCNv2").

    ``conv_offset`` maps the input to 3*offset_groups*kh*kw channels, split
    in three equal parts (o1, o2, m): offset = cat(o1, o2) and
    mask = sigmoid(m). It starts at zero, so the layer starts as a plain
    convolution whose weighted sum is scaled by sigmoid(0) = 0.5 (the bias is
    not scaled). State-dict keys are mmcv's, as for :class:`DeformConv2dPack`.
    ``forward(input)``: (N, C_in, H, W) -> (N, C_out, Ho, Wo).
    """

    values_per_point = 3

    def forward(self, input: Tensor) -> Tensor:  # type: ignore[override]
        if not (torch.jit.is_scripting() or torch.jit.is_tracing()):
            _check_layer_input(input, self.in_channels)
        o1, o2, m = torch.chunk(self.conv_offset(input), 3, dim=1)
        return deform_conv2d(
            input, torch.cat((o1, o2), dim=1), self.weight, self.bias,
            stride=self.stride, padding=self.padding, dilation=self.dilation,
            mask=torch.sigmoid(m),
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Old mmcv and many DCNv2 repositories name the predictor conv_offset_mask
        # (same layout): load those keys as conv_offset's, as mmcv does. The
        # dict is load_state_dict's own copy, never the caller's.
        old_prefix = prefix + "conv_offset_mask."
        for key in [key for key in state_dict if key.startswith(old_prefix)]:
            new_key = prefix + "conv_offset." + key[len(old_prefix):]
            if new_key not in state_dict:
                state_dict[new_key] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def coordinate_channels(input: Tensor) -> Tensor:
    """The two CoordConv channels for input (N, C, H, W): (N, 2, H, W)
    (for an unbatched input (C, H, W): (2, H, W)).

    Channel 0 is the column coordinate (varies along the width), channel 1 the
    row coordinate (varies along the height), each from -1 to 1 (a size-1
    axis gets -1), in the input's dtype and device.
    """
    height, width = input.shape[-2], input.shape[-1]
    columns = torch.linspace(-1, 1, width, dtype=input.dtype, device=input.device)
    rows = torch.linspace(-1, 1, height, dtype=input.dtype, device=input.device)
    coordinates = torch.stack(
        (columns.view(1, width).expand(height, width), rows.view(height, 1).expand(height, width))
    )
    if input.dim() == 4:
        coordinates = coordinates.expand(input.shape[0], 2, height, width)
    return coordinates


class CoordConv2d(nn.Module):
    """CoordConv: a convolution that also sees where it is.

    Appends the two channels of :func:`coordinate_channels` (column, then
    row coordinate, each in [-1, 1]) to the input and applies ``self.conv``,
    an nn.Conv2d with in_channels + 2 inputs (so in_channels + 2 must be
    divisible by groups). ``forward(input)``: (N, C_in, H, W) -> (N, C_out, Ho, Wo),
    or unbatched (C_in, H, W) -> (C_out, Ho, Wo) as nn.Conv2d.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: IntOrPair = 0,
        dilation: IntOrPair = 1,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups = _layer_arguments(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias
        )
        _check_divisible(in_channels + 2, "in_channels + 2", groups, "groups")
        _check_divisible(out_channels, "out_channels", groups, "groups")
        self.in_channels = in_channels
        self.conv = nn.Conv2d(
            in_channels + 2, out_channels, kernel_size, stride, padding, dilation, groups, bias
        )

    def forward(self, input: Tensor) -> Tensor:
        if not (torch.jit.is_scripting() or torch.jit.is_tracing()):
            _check_layer_input(input, self.in_channels, unbatched=True)
        return self.conv(torch.cat((input, coordinate_channels(input)), dim=-3))
