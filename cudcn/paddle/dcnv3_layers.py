"""The DCNv3 and DCNv4 layers: InternImage's ``DCNv3`` and FlashInternImage's
``DCNv4`` modules for paddle, on :func:`cudcn.paddle.dcnv3` and
:func:`cudcn.paddle.dcnv4` (dygraph only).

The constructors, sublayer and parameter names, initialisation and forwards
are those of :class:`cudcn.torch.DCNv3` and :class:`cudcn.torch.DCNv4`
(the references'), in paddle's terms:

- ``Linear`` weights are (in, out), paddle's layout: a torch state dict
  loads once every ``*.weight`` of a Linear (input_proj, output_proj,
  value_proj, offset, mask, offset_mask) is transposed;
- BatchNorm's statistics are ``_mean`` and ``_variance`` (torch's
  running_mean, running_var; paddle keeps no num_batches_tracked);
- the depthwise convolutions keep paddle's default initialisation
  (torch's differs); everything else starts as the references do (the
  offset and mask predictors zero, the projections xavier-uniform with zero
  biases, the gate zero);
- the input is ``x`` (paddle's name).

The operators run in dygraph only: while paddle builds a static graph
(``paddle.jit.to_static``, ``paddle.enable_static()``) a forward raises
:class:`cudcn.UnsupportedError`, as :func:`cudcn.paddle.dcnv3` does.
"""

from __future__ import annotations

from typing import Any

import paddle
import paddle.nn.functional as F
from paddle.nn.initializer import Constant, XavierUniform

from cudcn.dcnv3_config import (
    DCNv3Config,
    DCNv4Config,
    check_input_shape,
    check_same_size,
    dcnv3_config,
    dcnv4_config,
    keep_attributes,
    token_grid,
)
from cudcn.errors import ArgumentTypeError, UnsupportedError
from cudcn.paddle._bridge import is_tensor, type_name
from cudcn.paddle.dcnv3 import dcnv3, dcnv4

_IM2COL_STEP = 256  # InternImage's; ignored by cudcn


class _ToChannelsLast(paddle.nn.Layer):
    """(N, C, H, W) -> (N, H, W, C): a step of DCNv3's dw_conv (no parameters)."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return x.transpose([0, 2, 3, 1])


def _norm(name: str, channels: int) -> paddle.nn.Sequential:
    """As :func:`cudcn.torch.dcnv3_modules._norm`: 'LN' -> [to channels-last,
    LayerNorm(epsilon 1e-6)], 'BN' -> [BatchNorm2D, to channels-last]."""
    if name == "LN":
        return paddle.nn.Sequential(_ToChannelsLast(), paddle.nn.LayerNorm(channels, epsilon=1e-6))
    return paddle.nn.Sequential(paddle.nn.BatchNorm2D(channels), _ToChannelsLast())


def _activation(name: str) -> paddle.nn.Layer:
    return {"ReLU": paddle.nn.ReLU, "SiLU": paddle.nn.Silu, "GELU": paddle.nn.GELU}[name]()


def _linear(in_features: int, out_features: int, zero: bool = False, bias: bool = True) -> paddle.nn.Linear:
    """A Linear initialised as the references reset it: zero, or xavier-uniform with a zero bias."""
    weight = Constant(0.0) if zero else XavierUniform()
    return paddle.nn.Linear(in_features, out_features, weight_attr=paddle.ParamAttr(initializer=weight),
                            bias_attr=paddle.ParamAttr(initializer=Constant(0.0)) if bias else False)


def _keep(layer: paddle.nn.Layer, config: DCNv3Config | DCNv4Config) -> None:
    """The config and the references' attributes, and the gate's parameters (zero)."""
    keep_attributes(layer, config)
    if config.center_feature_scale:
        zero = Constant(0.0)
        layer.center_feature_scale_proj_weight = layer.create_parameter(
            [config.group, config.channels], default_initializer=zero)
        layer.center_feature_scale_proj_bias = layer.create_parameter(
            [config.group], default_initializer=zero)


def _blend(layer: paddle.nn.Layer, out: paddle.Tensor, projected: paddle.Tensor, query: paddle.Tensor) -> paddle.Tensor:
    """out*(1 - s) + projected*s, s = sigmoid(query @ weight.T + bias) per
    group (weight (G, C) as the reference's), repeated over its channels."""
    weight = layer.center_feature_scale_proj_weight.astype(query.dtype)
    scale = F.sigmoid(paddle.matmul(query, weight, transpose_y=True) + layer.center_feature_scale_proj_bias.astype(query.dtype))
    scale = scale.unsqueeze(-1).expand([*scale.shape, layer.group_channels]).reshape(out.shape)
    return out * (1 - scale) + projected * scale


def _check_tensor(x: Any, layout: str, layer: str) -> None:
    """x a dygraph tensor: in a static graph the operator has no op to emit."""
    if not paddle.in_dynamic_mode():
        raise UnsupportedError(
            f"cudcn.paddle.{layer} runs in dygraph only: paddle has no {layer} op to put into a static "
            f"graph (paddle.jit.to_static, paddle.enable_static())"
        )
    if not is_tensor(x):
        raise ArgumentTypeError(f"x must be a paddle.Tensor {layout}, got {type_name(x)}")


class DCNv3(paddle.nn.Layer):
    """InternImage's DCNv3 for paddle: ``forward(x)`` (N, H, W, C) -> (N, H, W, C).

    The arguments, sublayers and forward of :class:`cudcn.torch.DCNv3`
    (see there), with paddle's layouts (module docstring): ``dw_conv`` =
    Sequential(Conv2D [0], norm [1], activation [2]), ``offset``, ``mask``,
    ``input_proj``, ``output_proj`` (Linear), and with center_feature_scale
    ``center_feature_scale_proj_weight`` (G, C) and ``_bias`` (G,). Dygraph only.
    """

    def __init__(
        self,
        channels: int = 64,
        kernel_size: int = 3,
        dw_kernel_size: int | None = None,
        stride: int = 1,
        pad: int = 1,
        dilation: int = 1,
        group: int = 4,
        offset_scale: float = 1.0,
        act_layer: str = "GELU",
        norm_layer: str = "LN",
        center_feature_scale: bool = False,
        remove_center: bool = False,
    ) -> None:
        super().__init__()
        config = dcnv3_config(channels, kernel_size, dw_kernel_size, stride, pad, dilation, group, offset_scale,
                              act_layer, norm_layer, center_feature_scale, remove_center)
        _keep(self, config)
        C, G, P, dwk = config.channels, config.group, config.points, config.dw_kernel_size
        self.dw_conv = paddle.nn.Sequential(
            paddle.nn.Conv2D(C, C, dwk, stride=1, padding=(dwk - 1) // 2, groups=C),
            _norm(config.norm_layer, C),
            _activation(config.act_layer),
        )
        self.offset = _linear(C, G * P * 2, zero=True)
        self.mask = _linear(C, G * P, zero=True)
        self.input_proj = _linear(C, C)
        self.output_proj = _linear(C, C)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        """x (N, H, W, C) -> (N, H, W, C)."""
        config = self._config
        _check_tensor(x, "(N, H, W, C)", "DCNv3")
        check_input_shape(tuple(x.shape), config.channels, "(N, H, W, C)", "x")
        n, height, width, _ = x.shape
        check_same_size(config, height, width, "DCNv3")
        projected = self.input_proj(x)
        features = self.dw_conv(x.transpose([0, 3, 1, 2]))  # (N, H, W, C)
        offset = self.offset(features)
        mask = self.mask(features).reshape([n, height, width, config.group, config.points])
        mask = F.softmax(mask, -1).reshape([n, height, width, config.group * config.points]).astype(projected.dtype)
        k, s, p, d = config.kernel_size, config.stride, config.pad, config.dilation
        out = dcnv3(projected, offset, mask, k, k, s, s, p, p, d, d, config.group, config.group_channels,
                    config.offset_scale, _IM2COL_STEP, bool(config.remove_center))
        if config.center_feature_scale:
            out = _blend(self, out, projected, features)  # the gate reads the dw_conv features
        return self.output_proj(out)


class DCNv4(paddle.nn.Layer):
    """FlashInternImage's DCNv4 for paddle: ``forward(x, shape=None)`` (N, L, C) -> (N, L, C).

    The arguments, sublayers and forward of :class:`cudcn.torch.DCNv4`
    (see there; any kernel size, any group_channels), with paddle's
    layouts: ``offset_mask_dw`` (Conv2D, when dw_kernel_size is given),
    ``offset_mask`` Linear(C, K8), ``value_proj``, ``output_proj`` (unless
    without_pointwise; no output bias with output_bias=False), the gate's
    parameters with center_feature_scale. Dygraph only.
    """

    def __init__(
        self,
        channels: int = 64,
        kernel_size: int = 3,
        stride: int = 1,
        pad: int = 1,
        dilation: int = 1,
        group: int = 4,
        offset_scale: float = 1.0,
        dw_kernel_size: int | None = None,
        center_feature_scale: bool = False,
        remove_center: bool = False,
        output_bias: bool = True,
        without_pointwise: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        config = dcnv4_config(channels, kernel_size, stride, pad, dilation, group, offset_scale, dw_kernel_size,
                              center_feature_scale, remove_center, output_bias, without_pointwise)
        _keep(self, config)
        C = config.channels
        if config.dw_kernel_size is not None:
            k = config.dw_kernel_size
            self.offset_mask_dw = paddle.nn.Conv2D(C, C, k, stride=1, padding=(k - 1) // 2, groups=C)
        self.offset_mask = _linear(C, config.offset_mask_channels, zero=True)
        if not config.without_pointwise:
            self.value_proj = _linear(C, C)
            self.output_proj = _linear(C, C, bias=config.output_bias)

    def forward(self, x: paddle.Tensor, shape: tuple[int, int] | None = None) -> paddle.Tensor:
        """x (N, L, C), shape (H, W) with H*W = L (None: a square) -> (N, L, C)."""
        config = self._config
        _check_tensor(x, "(N, L, C)", "DCNv4")
        check_input_shape(tuple(x.shape), config.channels, "(N, L, C)", "x")
        n, tokens, channels = x.shape
        height, width = token_grid(tokens, shape, "x")
        check_same_size(config, height, width, "DCNv4")
        values = x if config.without_pointwise else self.value_proj(x)
        values = values.reshape([n, height, width, channels])
        predictor_input = x
        if config.dw_kernel_size is not None:
            image = x.reshape([n, height, width, channels]).transpose([0, 3, 1, 2])
            predictor_input = self.offset_mask_dw(image).transpose([0, 2, 3, 1]).reshape([n, tokens, channels])
        offset_mask = self.offset_mask(predictor_input).reshape([n, height, width, config.offset_mask_channels])
        k, s, p, d = config.kernel_size, config.stride, config.pad, config.dilation
        out = dcnv4(values, offset_mask, k, k, s, s, p, p, d, d, config.group, config.group_channels,
                    config.offset_scale, _IM2COL_STEP, bool(config.remove_center))
        if config.center_feature_scale:
            out = _blend(self, out, values, out)  # the gate reads the DCN output
        out = out.reshape([n, tokens, channels])
        return out if config.without_pointwise else self.output_proj(out)
