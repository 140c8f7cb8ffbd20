"""The DCNv3 and DCNv4 modules: drop-ins for InternImage's ``DCNv3``
(ops_dcnv3/modules/dcnv3.py) and FlashInternImage's ``DCNv4``
(DCNv4/modules/dcnv4.py), on :func:`cudcn.torch.dcnv3` and
:func:`cudcn.torch.dcnv4`, so no compiled extension is needed.

Same constructor arguments and defaults, submodule and parameter names,
shapes and initialisation as the references, so their state dicts load with
``strict=True`` both ways; the same forward. What differs: DCNv4 takes any
kernel size and any group_channels (the reference: 3x3, group_channels a
multiple of 16), and both raise :class:`cudcn.ArgumentError` naming what is
wrong where the references assert or fail inside a reshape.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
from cudcn.torch.dcnv3 import dcnv3, dcnv4

#: The modules pass InternImage's im2col_step; cudcn ignores it (no batch rule).
_IM2COL_STEP = 256


class _ToChannelsLast(nn.Module):
    """(N, C, H, W) -> (N, H, W, C): a step of DCNv3's dw_conv (no parameters)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 2, 3, 1)


def _norm(name: str, channels: int) -> nn.Sequential:
    """InternImage's norm on an NCHW input with an NHWC output, as a Sequential
    whose indices give its state-dict keys: 'LN' -> [to channels-last,
    LayerNorm(eps 1e-6)] (keys 1.weight, 1.bias); 'BN' -> [BatchNorm2d, to
    channels-last] (keys 0.weight, 0.bias, 0.running_mean, ...)."""
    if name == "LN":
        return nn.Sequential(_ToChannelsLast(), nn.LayerNorm(channels, eps=1e-6))
    return nn.Sequential(nn.BatchNorm2d(channels), _ToChannelsLast())


def _activation(name: str) -> nn.Module:
    return {"ReLU": lambda: nn.ReLU(inplace=True), "SiLU": lambda: nn.SiLU(inplace=True), "GELU": nn.GELU}[name]()


class CenterFeatureScaleModule(nn.Module):
    """sigmoid(query @ weight.T + bias): the per-group gate that blends the
    DCN output with the projected input (no parameters of its own; the
    weight and bias are the owner's ``center_feature_scale_proj_*``)."""

    def forward(self, query: Tensor, center_feature_scale_proj_weight: Tensor,
                center_feature_scale_proj_bias: Tensor) -> Tensor:
        return F.linear(query, weight=center_feature_scale_proj_weight, bias=center_feature_scale_proj_bias).sigmoid()


def _blend(module: nn.Module, out: Tensor, projected: Tensor, query: Tensor) -> Tensor:
    """out*(1 - s) + projected*s with s the gate of ``query`` (N, H, W, G),
    each group's value repeated over its group_channels."""
    scale = module.center_feature_scale_module(
        query, module.center_feature_scale_proj_weight, module.center_feature_scale_proj_bias
    )
    # Explicit sizes, not repeat_interleave: its ONNX form reshapes with a -1,
    # which onnxruntime refuses for an empty batch.
    scale = scale.unsqueeze(-1).expand(*scale.shape, module.group_channels).reshape(*out.shape)
    return out * (1 - scale) + projected * scale


def _add_center_feature_scale(module: nn.Module, config: DCNv3Config | DCNv4Config) -> None:
    """The gate's parameters, zero (created after the reset, as the references do)."""
    module.center_feature_scale_proj_weight = nn.Parameter(
        torch.zeros((config.group, config.channels), dtype=torch.float))
    module.center_feature_scale_proj_bias = nn.Parameter(torch.zeros(config.group, dtype=torch.float))
    module.center_feature_scale_module = CenterFeatureScaleModule()


def _static(shape: Any) -> bool:
    """Every size a plain int (not symbolic under torch.export / compile)."""
    return all(isinstance(size, int) for size in shape)


class DCNv3(nn.Module):
    """InternImage's DCNv3 module: ``forward(input)`` (N, H, W, C) -> (N, H, W, C).

    Args (InternImage's, in its order, with its defaults):
        channels: C. kernel_size: the deformable kernel (square).
        dw_kernel_size: the depthwise convolution's kernel (odd; None: kernel_size).
        stride, pad, dilation: the operator's (the output must keep H, W:
            stride 1, pad = dilation*(kernel_size - 1)/2).
        group: G; group_channels D = C/G, any value.
        offset_scale: scales offsets and kernel grid (see :func:`cudcn.dcnv3`).
        act_layer: 'GELU', 'ReLU' or 'SiLU'. norm_layer: 'LN' or 'BN'.
        center_feature_scale: add the per-group gate that blends the output
            with the projected input. remove_center: drop the centre point
            (odd kernel_size).

    Submodules and parameters (state-dict keys): ``dw_conv`` = Sequential(
    Conv2d(C, C, dw_kernel_size, groups=C) [0], norm [1] (LN: 1.1.weight/bias;
    BN: 1.0.*), activation [2]); ``offset`` Linear(C, G*P*2); ``mask``
    Linear(C, G*P); ``input_proj``, ``output_proj`` Linear(C, C);
    ``center_feature_scale_proj_weight`` (G, C) and ``_bias`` (G,) when
    center_feature_scale. offset and mask start at zero (so the mask is 1/P
    after its softmax), the projections xavier-uniform with zero biases.

    Forward: x = input_proj(input); the offsets and mask come from
    dw_conv(input) (NCHW in, NHWC out); the mask is softmaxed over the P
    points of each group, cast to x's dtype; y = dcnv3(x, offset, mask);
    with center_feature_scale, s = sigmoid(linear(dw_conv features)) and
    y = y*(1 - s) + x*s; output_proj(y).
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
        keep_attributes(self, config)

        C, G, P, dwk = config.channels, config.group, config.points, config.dw_kernel_size
        self.dw_conv = nn.Sequential(
            nn.Conv2d(C, C, kernel_size=dwk, stride=1, padding=(dwk - 1) // 2, groups=C),
            _norm(config.norm_layer, C),
            _activation(config.act_layer),
        )
        self.offset = nn.Linear(C, G * P * 2)
        self.mask = nn.Linear(C, G * P)
        self.input_proj = nn.Linear(C, C)
        self.output_proj = nn.Linear(C, C)
        self._reset_parameters()
        if config.center_feature_scale:
            _add_center_feature_scale(self, config)

    def _reset_parameters(self) -> None:
        """InternImage's: offset and mask zero, projections xavier-uniform with zero biases."""
        for linear in (self.offset, self.mask):
            nn.init.constant_(linear.weight.data, 0.0)
            nn.init.constant_(linear.bias.data, 0.0)
        for linear in (self.input_proj, self.output_proj):
            nn.init.xavier_uniform_(linear.weight.data)
            nn.init.constant_(linear.bias.data, 0.0)

    def forward(self, input: Tensor) -> Tensor:
        """input (N, H, W, C) -> (N, H, W, C)."""
        config = self._config
        if _static(input.shape):
            check_input_shape(tuple(input.shape), config.channels, "(N, H, W, C)")
            check_same_size(config, input.shape[1], input.shape[2], "DCNv3")
        n, height, width, _ = input.shape
        x = self.input_proj(input)
        x_proj = x
        features = self.dw_conv(input.permute(0, 3, 1, 2))  # (N, H, W, C)
        offset = self.offset(features)
        mask = self.mask(features).reshape(n, height, width, config.group, config.points)
        mask = F.softmax(mask, -1).reshape(n, height, width, config.group * config.points).type(x.dtype)
        k, s, p, d = config.kernel_size, config.stride, config.pad, config.dilation
        x = dcnv3(x, offset, mask, k, k, s, s, p, p, d, d, config.group, config.group_channels,
                  config.offset_scale, _IM2COL_STEP, bool(config.remove_center))
        if config.center_feature_scale:
            x = _blend(self, x, x_proj, features)  # the gate reads the dw_conv features
        return self.output_proj(x)

    def extra_repr(self) -> str:
        c = self._config
        return (f"channels={c.channels}, kernel_size={c.kernel_size}, dw_kernel_size={c.dw_kernel_size}, "
                f"stride={c.stride}, pad={c.pad}, dilation={c.dilation}, group={c.group}, "
                f"offset_scale={c.offset_scale}, center_feature_scale={c.center_feature_scale}, "
                f"remove_center={c.remove_center}")


class DCNv4(nn.Module):
    """FlashInternImage's DCNv4 module: ``forward(input, shape=None)`` (N, L, C) -> (N, L, C).

    Args (DCNv4's, in its order, with its defaults; other keyword arguments
    are ignored, as the reference ignores them):
        channels, kernel_size, stride, pad, dilation, group, offset_scale:
            as :class:`DCNv3` (the output must keep H, W). Any kernel_size and
            any group_channels.
        dw_kernel_size: if given (odd), ``offset_mask_dw``, a depthwise
            Conv2d on the input before ``offset_mask`` (no norm, no activation).
        center_feature_scale, remove_center: as :class:`DCNv3`.
        output_bias: whether ``output_proj`` has a bias.
        without_pointwise: no ``value_proj`` and ``output_proj``.

    Parameters (state-dict keys): ``offset_mask_dw.weight`` (C, 1, k, k) and
    ``.bias`` when dw_kernel_size is given; ``offset_mask`` Linear(C, K8),
    K8 = G*3*P rounded up to a multiple of 8 (per group [2P offsets | P mask],
    then padding); ``value_proj`` Linear(C, C); ``output_proj`` Linear(C, C,
    bias=output_bias); ``center_feature_scale_proj_weight`` (G, C) and
    ``_bias`` (G,) when center_feature_scale. offset_mask starts at zero, so
    the output starts at zero (no softmax: the mask is used as predicted).

    Forward: input (N, L, C) with L = H*W tokens (``shape`` = (H, W); a
    square if None). x = value_proj(input); offset_mask =
    offset_mask(offset_mask_dw(input) or input); y = dcnv4(x, offset_mask);
    with center_feature_scale, s = sigmoid(linear(y)) (the gate reads the
    DCN output, unlike DCNv3's) and y = y*(1 - s) + x*s; output_proj(y).
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
        keep_attributes(self, config)

        C = config.channels
        if config.dw_kernel_size is not None:
            k = config.dw_kernel_size
            self.offset_mask_dw = nn.Conv2d(C, C, k, stride=1, padding=(k - 1) // 2, groups=C)
        self.offset_mask = nn.Linear(C, config.offset_mask_channels)
        if not config.without_pointwise:
            self.value_proj = nn.Linear(C, C)
            self.output_proj = nn.Linear(C, C, bias=config.output_bias)
        self._reset_parameters()
        if config.center_feature_scale:
            _add_center_feature_scale(self, config)

    def _reset_parameters(self) -> None:
        """DCNv4's: offset_mask zero, projections xavier-uniform with zero biases."""
        nn.init.constant_(self.offset_mask.weight.data, 0.0)
        nn.init.constant_(self.offset_mask.bias.data, 0.0)
        if not self.without_pointwise:
            for linear in (self.value_proj, self.output_proj):
                nn.init.xavier_uniform_(linear.weight.data)
                if linear.bias is not None:
                    nn.init.constant_(linear.bias.data, 0.0)

    def forward(self, input: Tensor, shape: tuple[int, int] | None = None) -> Tensor:
        """input (N, L, C), shape (H, W) with H*W = L (None: a square) -> (N, L, C)."""
        config = self._config
        if _static(input.shape):
            check_input_shape(tuple(input.shape), config.channels, "(N, L, C)")
        n, tokens, channels = input.shape
        if shape is None or _static(input.shape):
            height, width = token_grid(tokens, shape)
        else:
            height, width = shape  # sizes torch.export traces symbolically
        if _static((height, width)):
            check_same_size(config, height, width, "DCNv4")
        x = input if config.without_pointwise else self.value_proj(input)
        x = x.reshape(n, height, width, channels)
        if config.dw_kernel_size is not None:
            image = input.reshape(n, height, width, channels).permute(0, 3, 1, 2)
            predictor_input = self.offset_mask_dw(image).permute(0, 2, 3, 1).reshape(n, tokens, channels)
        else:
            predictor_input = input
        offset_mask = self.offset_mask(predictor_input).reshape(n, height, width, config.offset_mask_channels)
        x_proj = x
        k, s, p, d = config.kernel_size, config.stride, config.pad, config.dilation
        x = dcnv4(x, offset_mask, k, k, s, s, p, p, d, d, config.group, config.group_channels,
                  config.offset_scale, _IM2COL_STEP, bool(config.remove_center))
        if config.center_feature_scale:
            x = _blend(self, x, x_proj, x)  # the gate reads the DCN output
        x = x.reshape(n, tokens, channels)
        return x if config.without_pointwise else self.output_proj(x)

    def extra_repr(self) -> str:
        c = self._config
        return (f"channels={c.channels}, kernel_size={c.kernel_size}, stride={c.stride}, pad={c.pad}, "
                f"dilation={c.dilation}, group={c.group}, offset_scale={c.offset_scale}, "
                f"dw_kernel_size={c.dw_kernel_size}, center_feature_scale={c.center_feature_scale}, "
                f"remove_center={c.remove_center}, output_bias={c.output_bias}, "
                f"without_pointwise={c.without_pointwise}")
