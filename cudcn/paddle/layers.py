"""The layers: DeformConv2D (paddle's), the pack layers that predict their
own offsets, CoordConv, and MultiScaleDeformableAttention (mmcv's)."""

from __future__ import annotations

import math
from typing import Any

import paddle
from paddle.nn.initializer import Constant, Normal

from cudcn.errors import ArgumentError, ArgumentTypeError
from cudcn.geometry import int_pair, output_size
from cudcn.paddle._bridge import IntOrPair, dtype_name, int_argument, is_tensor, type_name
from cudcn.paddle.functional import LAYOUTS, deform_conv2d, ms_deform_attn


@paddle.jit.not_to_static  # plain Python on static values: see deform_conv2d
def _check_layer_input(x: Any, layer: DeformConv2D | CoordConv2D, weight: paddle.Tensor) -> None:
    """x for a layer that hands it to a paddle convolution first (the packs, CoordConv2D).

    Checked here so that the error names x, not paddle's conv2d (which
    returns an empty output for an input smaller than the kernel). The dtype
    is left to paddle under automatic mixed precision, which casts for its
    convolutions.
    """
    if not is_tensor(x):
        raise ArgumentTypeError(f"x must be a paddle.Tensor {LAYOUTS['x']}, got {type_name(x)}")
    if len(x.shape) != 4:
        raise ArgumentError(
            f"x must be a 4-D tensor (N, C_in, H, W), got {len(x.shape)}-D with shape {list(x.shape)}"
        )
    if x.shape[1] not in (layer._in_channels, -1):
        raise ArgumentError(f"x.shape[1] (C_in) must be in_channels = {layer._in_channels}, got {x.shape[1]}")
    if x.dtype != weight.dtype and not paddle.amp.is_autocast_enabled():
        raise ArgumentTypeError(
            f"x.dtype must equal the layer's weight.dtype = {dtype_name(weight)}, got {dtype_name(x)}"
        )
    sizes = list(x.shape[2:])
    out = [
        output_size(*axis)
        for axis in zip(sizes, layer._kernel_size, layer._stride, layer._padding, layer._dilation)
    ]
    if any(o < 1 and size >= 0 for o, size in zip(out, sizes)):
        raise ArgumentError(
            f"x.shape[2:] (H, W) = {tuple(sizes)} is too small: the output size (Ho, Wo) = "
            f"{tuple(out)} must be at least 1x1 (kernel {tuple(layer._kernel_size)}, stride "
            f"{tuple(layer._stride)}, padding {tuple(layer._padding)}, dilation {tuple(layer._dilation)})"
        )


# --------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------


def _conv_arguments(
    in_channels: Any, out_channels: Any, kernel_size: Any, stride: Any, padding: Any,
    dilation: Any, groups: Any, min_out_channels: int = 0, in_name: str = "in_channels",
) -> tuple[int, int, list[int], list[int], list[int], list[int], int]:
    """A layer's convolution arguments, checked: (in, out, kernel, stride, padding, dilation, groups).

    ``in_name`` is what the convolution's input channel count is called in messages.
    """
    in_channels = int_argument(in_channels, in_name, 1)
    out_channels = int_argument(out_channels, "out_channels", min_out_channels)
    groups = int_argument(groups, "groups", 1)
    pairs = [
        list(int_pair(value, name, minimum))
        for value, name, minimum in (
            (kernel_size, "kernel_size", 1), (stride, "stride", 1),
            (padding, "padding", 0), (dilation, "dilation", 1),
        )
    ]
    if in_channels % groups:
        raise ArgumentError(f"{in_name} = {in_channels} must be divisible by groups = {groups}")
    if out_channels % groups:
        raise ArgumentError(f"out_channels = {out_channels} must be divisible by groups = {groups}")
    return (in_channels, out_channels, *pairs, groups)


def _param_attr(attr: Any, name: str) -> Any:
    """attr, if paddle can read it as a parameter attribute; else a clear error."""
    try:
        paddle.ParamAttr._to_attr(attr)
    except TypeError:
        raise ArgumentTypeError(
            f"{name} must be a paddle.ParamAttr, a name, an initializer, a bool or None, "
            f"got {type(attr).__name__}"
        ) from None
    return attr


class DeformConv2D(paddle.nn.Layer):
    """Deformable convolution layer; a drop-in for ``paddle.vision.ops.DeformConv2D``.

    Same constructor, parameters ``weight`` (C_out, C_in/groups, kh, kw) and
    ``bias`` (C_out,) (None with bias_attr=False), initialisation
    (weight Normal(0, sqrt(2 / (kh*kw*C_in))), bias zero) and state-dict keys.
    ``forward(x, offset, mask=None)`` takes the shapes of :func:`deform_conv2d`.
    The constructor checks its arguments (ints, sizes, divisibility by the
    groups) and raises cudcn.ArgumentTypeError / cudcn.ArgumentError naming them.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: IntOrPair = 0,
        dilation: IntOrPair = 1,
        deformable_groups: int = 1,
        groups: int = 1,
        weight_attr: Any = None,
        bias_attr: Any = None,
    ) -> None:
        super().__init__()
        if weight_attr is False:
            raise ArgumentError("weight_attr must not be False: the layer needs a weight")
        in_channels, out_channels, kernel, stride, padding, dilation, groups = _conv_arguments(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups
        )
        deformable_groups = int_argument(deformable_groups, "deformable_groups", 1)
        if in_channels % deformable_groups:
            raise ArgumentError(
                f"in_channels = {in_channels} must be divisible by "
                f"deformable_groups = {deformable_groups}"
            )
        # paddle's attribute names, for code that reads them.
        self._in_channels = in_channels
        self._out_channels = out_channels
        self._kernel_size = kernel
        self._stride = stride
        self._padding = padding
        self._dilation = dilation
        self._deformable_groups = deformable_groups
        self._groups = groups
        kh, kw = kernel
        self.weight = self.create_parameter(
            shape=[out_channels, in_channels // groups, kh, kw],
            attr=_param_attr(weight_attr, "weight_attr"),
            default_initializer=Normal(0.0, (2.0 / (kh * kw * in_channels)) ** 0.5),
        )
        self.bias = self.create_parameter(
            shape=[out_channels], attr=_param_attr(bias_attr, "bias_attr"), is_bias=True
        )

    def _conv(self, x, offset, mask):
        return deform_conv2d(
            x, offset, self.weight, self.bias, self._stride, self._padding,
            self._dilation, self._deformable_groups, self._groups, mask,
        )

    def forward(self, x: paddle.Tensor, offset: paddle.Tensor, mask: paddle.Tensor | None = None) -> paddle.Tensor:
        """x (N, C_in, H, W), offset (N, 2*G*kh*kw, Ho, Wo), mask (N, G*kh*kw, Ho, Wo)."""
        return self._conv(x, offset, mask)

    def extra_repr(self) -> str:
        return (
            f"{self._in_channels}, {self._out_channels}, kernel_size={self._kernel_size}, "
            f"stride={self._stride}, padding={self._padding}, dilation={self._dilation}, "
            f"deformable_groups={self._deformable_groups}, groups={self._groups}"
        )


class _Pack(DeformConv2D):
    """A deformable convolution whose offsets come from ``self.conv_offset``.

    ``conv_offset`` is a Conv2D with the layer's kernel size, stride, padding
    and dilation, initialised to zero; ``values_per_point`` is how many
    channels it predicts per kernel point and deformable group.
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
        deformable_groups: int = 1,
        groups: int = 1,
        weight_attr: Any = None,
        bias_attr: Any = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation,
            deformable_groups, groups, weight_attr, bias_attr,
        )
        kh, kw = self._kernel_size
        zero = paddle.ParamAttr(initializer=Constant(0.0))
        self.conv_offset = paddle.nn.Conv2D(
            self._in_channels,
            self.values_per_point * self._deformable_groups * kh * kw,
            kernel_size=self._kernel_size,
            stride=self._stride,
            padding=self._padding,
            dilation=self._dilation,
            weight_attr=zero,
            bias_attr=zero,
        )

    def _offsets(self, x: paddle.Tensor) -> paddle.Tensor:
        """conv_offset(x), once x is checked (paddle's conv2d would not name it)."""
        _check_layer_input(x, self, self.weight)
        return self.conv_offset(x)


class DeformConv2DPack(_Pack):
    """DCNv1 layer that predicts its own offsets (cudcn.torch.DeformConv2dPack for paddle).

    ``conv_offset`` maps x to offsets (N, 2*deformable_groups*kh*kw, Ho, Wo);
    it starts at zero, so the layer starts as a plain convolution.
    ``forward(x)``: (N, C_in, H, W) -> (N, C_out, Ho, Wo).
    """

    values_per_point = 2

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:  # type: ignore[override]
        return self._conv(x, self._offsets(x), None)


class ModulatedDeformConv2DPack(_Pack):
    """DCNv2 layer that predicts offsets and mask (cudcn.torch.ModulatedDeformConv2dPack for paddle).

    ``conv_offset`` maps x to 3*deformable_groups*kh*kw channels, split in
    three equal parts (o1, o2, m): offset = concat(o1, o2), mask = sigmoid(m).
    It starts at zero, so the layer starts as a plain convolution whose
    weighted sum is scaled by 0.5 (the bias is not scaled).
    ``forward(x)``: (N, C_in, H, W) -> (N, C_out, Ho, Wo).
    """

    values_per_point = 3

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:  # type: ignore[override]
        o1, o2, m = paddle.chunk(self._offsets(x), 3, axis=1)
        return self._conv(x, paddle.concat((o1, o2), axis=1), paddle.nn.functional.sigmoid(m))


def coordinate_channels(x: paddle.Tensor) -> paddle.Tensor:
    """The two CoordConv channels for x (N, C, H, W): (N, 2, H, W).

    Channel 0 is the column coordinate (varies along the width), channel 1 the
    row coordinate (varies along the height), each from -1 to 1 (a size-1
    axis gets -1), in x's dtype.
    """
    # A static graph may leave sizes unknown (-1): take them from the graph then.
    shape = x.shape if paddle.in_dynamic_mode() else paddle.shape(x)
    n, height, width = shape[0], shape[2], shape[3]
    columns = paddle.linspace(-1, 1, width, dtype="float32")
    rows = paddle.linspace(-1, 1, height, dtype="float32")
    grid = paddle.stack(
        (columns.reshape([1, width]).expand([height, width]),
         rows.reshape([height, 1]).expand([height, width]))
    )
    return grid.astype(x.dtype).unsqueeze(0).expand([n, 2, height, width])


class CoordConv2D(paddle.nn.Layer):
    """CoordConv: a convolution that also sees where it is (cudcn.torch.CoordConv2d for paddle).

    Appends the two channels of :func:`coordinate_channels` (column, then
    row coordinate, each in [-1, 1]) to x and applies ``self.conv``, a Conv2D
    with in_channels + 2 inputs (so in_channels + 2 must be divisible by
    groups). ``forward(x)``: (N, C_in, H, W) -> (N, C_out, Ho, Wo); like
    paddle's Conv2D it takes batched 4-D input only.
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
        weight_attr: Any = None,
        bias_attr: Any = None,
    ) -> None:
        super().__init__()
        if weight_attr is False:
            raise ArgumentError("weight_attr must not be False: the layer needs a weight")
        in_channels = int_argument(in_channels, "in_channels", 1)
        _, out_channels, kernel, stride, padding, dilation, groups = _conv_arguments(
            in_channels + 2, out_channels, kernel_size, stride, padding, dilation, groups,
            min_out_channels=1, in_name="in_channels + 2",  # paddle's Conv2D needs a filter
        )
        self._in_channels = in_channels
        self._kernel_size, self._stride, self._padding, self._dilation = kernel, stride, padding, dilation
        self.conv = paddle.nn.Conv2D(
            in_channels + 2, out_channels, kernel, stride, padding, dilation, groups,
            weight_attr=_param_attr(weight_attr, "weight_attr"),
            bias_attr=_param_attr(bias_attr, "bias_attr"),
        )

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        _check_layer_input(x, self, self.conv.weight)
        return self.conv(paddle.concat((x, coordinate_channels(x)), axis=1))


class MultiScaleDeformableAttention(paddle.nn.Layer):
    """Multi-scale deformable attention with its projections
    (cudcn.torch.MultiScaleDeformableAttention, mmcv's module, for paddle).

    The same constructor arguments and defaults, sublayers (``dropout``,
    ``sampling_offsets``, ``attention_weights``, ``value_proj``,
    ``output_proj``: paddle ``Linear`` layers, whose weights are stored
    (in, out), the transpose of torch's), initialisation and forward, on
    :func:`cudcn.paddle.ms_deform_attn`. ``weight_attr`` and ``bias_attr``
    (paddle's convention) apply to the four projections when given, in
    place of the initialisation. Dygraph only, as the function.
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
        weight_attr: Any = None,
        bias_attr: Any = None,
    ) -> None:
        super().__init__()
        embed_dims = int_argument(embed_dims, "embed_dims", 1)
        num_heads = int_argument(num_heads, "num_heads", 1)
        value_dims = int(embed_dims * value_proj_ratio)
        for size, size_name in ((embed_dims, "embed_dims"), (value_dims, "int(embed_dims * value_proj_ratio)")):
            if size % num_heads:
                raise ArgumentError(f"{size_name} = {size} must be divisible by num_heads = {num_heads}")
        self.norm_cfg = norm_cfg
        self.init_cfg = init_cfg
        self.batch_first = batch_first
        self.im2col_step = int_argument(im2col_step, "im2col_step", 1)
        self.embed_dims = embed_dims
        self.num_levels = int_argument(num_levels, "num_levels", 1)
        self.num_heads = num_heads
        self.num_points = int_argument(num_points, "num_points", 1)
        samples = num_heads * self.num_levels * self.num_points
        weight_attr = _param_attr(weight_attr, "weight_attr")
        bias_attr = _param_attr(bias_attr, "bias_attr")
        self._custom_init = weight_attr is not None or bias_attr is not None
        self.dropout = paddle.nn.Dropout(dropout)
        self.sampling_offsets = paddle.nn.Linear(embed_dims, samples * 2, weight_attr, bias_attr)
        self.attention_weights = paddle.nn.Linear(embed_dims, samples, weight_attr, bias_attr)
        self.value_proj = paddle.nn.Linear(embed_dims, value_dims, weight_attr, bias_attr)
        self.output_proj = paddle.nn.Linear(value_dims, embed_dims, weight_attr, bias_attr)
        if not self._custom_init:
            self.init_weights()

    def init_weights(self) -> None:
        """mmcv's initialisation (see cudcn.torch.MultiScaleDeformableAttention.init_weights),
        in paddle's float32 ops."""
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        thetas = paddle.arange(heads, dtype="float32") * (2.0 * math.pi / heads)
        grid = paddle.stack([paddle.cos(thetas), paddle.sin(thetas)], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)).reshape([heads, 1, 1, 2]).tile([1, levels, points, 1])
        grid = grid * paddle.arange(1, points + 1, dtype="float32").reshape([1, 1, points, 1])
        zeros, xavier = Constant(0.0), paddle.nn.initializer.XavierUniform()
        with paddle.no_grad():
            zeros(self.sampling_offsets.weight)
            self.sampling_offsets.bias.set_value(grid.reshape([-1]).astype(self.sampling_offsets.bias.dtype))
            for parameter in (self.attention_weights.weight, self.attention_weights.bias,
                              self.value_proj.bias, self.output_proj.bias):
                zeros(parameter)
            xavier(self.value_proj.weight)
            xavier(self.output_proj.weight)

    def forward(
        self,
        query: paddle.Tensor,
        key: paddle.Tensor | None = None,
        value: paddle.Tensor | None = None,
        identity: paddle.Tensor | None = None,
        query_pos: paddle.Tensor | None = None,
        key_padding_mask: paddle.Tensor | None = None,
        reference_points: paddle.Tensor | None = None,
        spatial_shapes: Any = None,
        level_start_index: Any = None,
        **kwargs: Any,
    ) -> paddle.Tensor:
        """The forward of cudcn.torch.MultiScaleDeformableAttention (mmcv's):
        query (Lq, N, E) ((N, Lq, E) with batch_first), value (S, N, E),
        key_padding_mask (N, S) True at padding, reference_points
        (N, Lq, L, 2 or 4); returns ``dropout(output_proj(attention)) + identity``."""
        if value is None:
            value = query
        if identity is None:
            identity = query
        if query_pos is not None:
            query = query + query_pos
        if not self.batch_first:
            query, value = query.transpose([1, 0, 2]), value.transpose([1, 0, 2])
        batch, queries, _ = query.shape
        pixels = value.shape[1]
        value = self.value_proj(value)
        if key_padding_mask is not None:
            value = paddle.where(key_padding_mask.unsqueeze(-1), paddle.zeros_like(value), value)
        value = value.reshape([batch, pixels, self.num_heads, -1])
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        offsets = self.sampling_offsets(query).reshape([batch, queries, heads, levels, points, 2])
        weights = paddle.nn.functional.softmax(
            self.attention_weights(query).reshape([batch, queries, heads, levels * points]), -1
        ).reshape([batch, queries, heads, levels, points])
        locations = sampling_locations(reference_points, offsets, spatial_shapes)
        output = ms_deform_attn(value, spatial_shapes, level_start_index, locations.astype(value.dtype),
                                weights.astype(value.dtype), self.im2col_step)
        output = self.output_proj(output)
        if not self.batch_first:
            output = output.transpose([1, 0, 2])
        return self.dropout(output) + identity


def sampling_locations(reference_points: paddle.Tensor, offsets: paddle.Tensor, spatial_shapes: Any) -> paddle.Tensor:
    """Deformable DETR's sampling locations (N, Lq, M, L, P, 2) from reference
    points (N, Lq, L, 2 or 4) and offsets (N, Lq, M, L, P, 2), as
    cudcn.torch.sampling_locations."""
    if not is_tensor(reference_points) or len(reference_points.shape) != 4:
        got = list(reference_points.shape) if is_tensor(reference_points) else type_name(reference_points)
        raise ArgumentError(f"reference_points must be a 4-D tensor (N, Lq, L, 2 or 4), got {got}")
    corner = reference_points[:, :, None, :, None, :2]
    if reference_points.shape[-1] == 2:
        shapes = spatial_shapes.astype(offsets.dtype) if is_tensor(spatial_shapes) else paddle.to_tensor(
            spatial_shapes, dtype=offsets.dtype, place=offsets.place)
        normalizer = paddle.stack([shapes[:, 1], shapes[:, 0]], -1)
        return corner + offsets / normalizer[None, None, None, :, None, :]
    if reference_points.shape[-1] == 4:
        return corner + offsets / offsets.shape[4] * reference_points[:, :, None, :, None, 2:] * 0.5
    raise ArgumentError(
        f"Last dim of reference_points must be 2 or 4, but get {reference_points.shape[-1]} instead."
    )
