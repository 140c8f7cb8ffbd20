"""The nn.Modules: DeformConv2d (torchvision's), the pack layers that predict
their own offsets (mmcv's), CoordConv, and MultiScaleDeformableAttention
(mmcv's)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cudcn.errors import ArgumentError, ArgumentTypeError
from cudcn.geometry import FLOAT_DTYPES, int_pair
from cudcn.torch._bridge import IntOrPair, check_tensors
from cudcn.torch.functional import deform_conv2d, ms_deform_attn


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


class MultiScaleDeformableAttention(nn.Module):
    """Multi-scale deformable attention with its projections; a drop-in for
    mmcv's ``mmcv.ops.MultiScaleDeformableAttention`` (mmcv 2.x), on
    :func:`ms_deform_attn` on every device.

    mmcv's constructor arguments and defaults, submodules (``dropout``,
    ``sampling_offsets``, ``attention_weights``, ``value_proj``,
    ``output_proj``, created in that order), state-dict keys and shapes
    (with E = embed_dims, M = num_heads, L = num_levels, P = num_points,
    V = int(E * value_proj_ratio)):

    =============================  =====================
    ``sampling_offsets.weight``    (M*L*P*2, E), bias (M*L*P*2,)
    ``attention_weights.weight``   (M*L*P, E), bias (M*L*P,)
    ``value_proj.weight``          (V, E), bias (V,)
    ``output_proj.weight``         (E, V), bias (E,)
    =============================  =====================

    so an mmcv state dict loads with ``strict=True``; mmcv's
    :meth:`init_weights`; mmcv's forward. ``norm_cfg`` and ``init_cfg`` are
    stored and unused, as in mmcv. Unlike mmcv, a CPU call runs cudcn's op
    (mmcv falls back to its pure-torch function there) and every batch size
    works whatever im2col_step (stored, passed on, ignored).
    """

    def __init__(
        self,
        embed_dims: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        im2col_step: int = 64,
        dropout: float = 0.1,
        batch_first: bool = False,
        norm_cfg: Any = None,
        init_cfg: Any = None,
        value_proj_ratio: float = 1.0,
    ) -> None:
        super().__init__()
        embed_dims = _int_argument(embed_dims, "embed_dims", 1)
        num_heads = _int_argument(num_heads, "num_heads", 1)
        _check_divisible(embed_dims, "embed_dims", num_heads, "num_heads")
        value_dims = int(embed_dims * value_proj_ratio)
        _check_divisible(value_dims, "int(embed_dims * value_proj_ratio)", num_heads, "num_heads")
        self.norm_cfg = norm_cfg
        self.init_cfg = init_cfg
        self.batch_first = batch_first
        self.im2col_step = _int_argument(im2col_step, "im2col_step", 1)
        self.embed_dims = embed_dims
        self.num_levels = _int_argument(num_levels, "num_levels", 1)
        self.num_heads = num_heads
        self.num_points = _int_argument(num_points, "num_points", 1)
        samples = num_heads * self.num_levels * self.num_points
        self.dropout = nn.Dropout(dropout)
        self.sampling_offsets = nn.Linear(embed_dims, samples * 2)
        self.attention_weights = nn.Linear(embed_dims, samples)
        self.value_proj = nn.Linear(embed_dims, value_dims)
        self.output_proj = nn.Linear(value_dims, embed_dims)
        self.init_weights()

    def init_weights(self) -> None:
        """mmcv's initialisation (Deformable DETR's): zero offset weights and
        biases set so that head m's points start on the ray at angle
        2*pi*m/M, point p at (p + 1) times the square's edge, on every level
        (computed in float32); zero attention weights and bias; Xavier-uniform
        projections with zero biases."""
        nn.init.zeros_(self.sampling_offsets.weight)
        device = self.sampling_offsets.bias.device
        thetas = torch.arange(self.num_heads, dtype=torch.float32, device=device) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.num_heads, 1, 1, 2)
        grid = grid.repeat(1, self.num_levels, self.num_points, 1)
        for point in range(self.num_points):
            grid[:, :, point, :] *= point + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for projection in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(projection.weight, gain=1)
            nn.init.zeros_(projection.bias)

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        identity: Tensor | None = None,
        query_pos: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        reference_points: Tensor | None = None,
        spatial_shapes: Tensor | Sequence[tuple[int, int]] | None = None,
        level_start_index: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """mmcv's forward.

        Args:
            query: (Lq, N, E), or (N, Lq, E) with batch_first.
            key: unused (mmcv's signature has it).
            value: (S, N, E), or (N, S, E) with batch_first; None: the query.
            identity: added to the result; None: the query (before query_pos).
            query_pos: added to the query, or None.
            key_padding_mask: (N, S) bool, True where value is padding, or None.
            reference_points: (N, Lq, L, 2) normalised (x, y), offsets then in
                pixels of each level; or (N, Lq, L, 4) boxes (cx, cy, w, h),
                offsets then in half box sizes divided by P.
            spatial_shapes, level_start_index: as :func:`ms_deform_attn`.
            kwargs: ignored, as in mmcv; ``residual`` is mmcv's deprecated
                name of ``identity``.

        Returns:
            ``dropout(output_proj(attention)) + identity``, shaped as the query.
        """
        if "residual" in kwargs:
            warnings.warn("'residual' is deprecated, please use 'identity' instead", DeprecationWarning, stacklevel=2)
            residual = kwargs.pop("residual")
            identity = residual if identity is None else identity
        if value is None:
            value = query
        if identity is None:
            identity = query
        if query_pos is not None:
            query = query + query_pos
        if not self.batch_first:
            query, value = query.permute(1, 0, 2), value.permute(1, 0, 2)
        batch, queries, _ = query.shape
        pixels = value.shape[1]
        value = self.value_proj(value)
        if key_padding_mask is not None:
            value = value.masked_fill(key_padding_mask[..., None], 0.0)
        value = value.view(batch, pixels, self.num_heads, -1)
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        offsets = self.sampling_offsets(query).view(batch, queries, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, queries, heads, levels * points).softmax(-1)
        weights = weights.view(batch, queries, heads, levels, points)
        locations = sampling_locations(reference_points, offsets, spatial_shapes)
        # mmcv's op takes locations and weights in the value's dtype.
        output = ms_deform_attn(value, spatial_shapes, level_start_index, locations.to(value.dtype),
                                weights.to(value.dtype), self.im2col_step)
        output = self.output_proj(output)
        if not self.batch_first:
            output = output.permute(1, 0, 2)
        return self.dropout(output) + identity


def sampling_locations(reference_points: Tensor, offsets: Tensor,
                       spatial_shapes: Tensor | Sequence[tuple[int, int]]) -> Tensor:
    """Deformable DETR's sampling locations (N, Lq, M, L, P, 2) from
    reference points and predicted offsets (N, Lq, M, L, P, 2).

    reference_points (N, Lq, L, 2), normalised (x, y): the offsets are in
    pixels of each level (divided by (W_l, H_l)). reference_points
    (N, Lq, L, 4), boxes (cx, cy, w, h): the offsets are in half box sizes,
    divided by P.
    """
    if not isinstance(reference_points, Tensor) or reference_points.dim() != 4:
        got = type(reference_points).__name__ if not isinstance(reference_points, Tensor) else tuple(reference_points.shape)
        raise ArgumentError(f"reference_points must be a 4-D tensor (N, Lq, L, 2 or 4), got {got}")
    corner = reference_points[:, :, None, :, None, :2]
    if reference_points.shape[-1] == 2:
        if isinstance(spatial_shapes, Tensor):
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
        else:
            normalizer = offsets.new_tensor([[width, height] for height, width in spatial_shapes])
        return corner + offsets / normalizer[None, None, None, :, None, :]
    if reference_points.shape[-1] == 4:
        return corner + offsets / offsets.shape[4] * reference_points[:, :, None, :, None, 2:] * 0.5
    raise ArgumentError(
        f"Last dim of reference_points must be 2 or 4, but get {reference_points.shape[-1]} instead."
    )
