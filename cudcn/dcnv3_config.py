"""Constructor arguments of the DCNv3 and DCNv4 modules, checked once for
every framework (:mod:`cudcn.torch.dcnv3_modules`, :mod:`cudcn.paddle.dcnv3_layers`).

The modules are InternImage's ``DCNv3`` and FlashInternImage's ``DCNv4``:
Linear projections around the depthwise operator, offsets and mask
predicted from the input. Their constructors take the references' arguments
with the references' defaults; :func:`dcnv3_config` and :func:`dcnv4_config`
check them and derive what the parameter shapes need. What the references
only refuse when a forward fails (an even depthwise kernel, a kernel that
does not keep the image size) is said here, or at the forward, by name.

Notation: C = channels, G = group, D = group_channels = C / G,
P = kernel_size**2 - remove_center, K8 = G*3*P rounded up to a multiple of 8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from cudcn.dcnv3_geometry import _flag, _offset_scale, packed_channels
from cudcn.errors import ArgumentError, ArgumentTypeError
from cudcn.geometry import check_int, output_size

#: DCNv3's activation after its depthwise convolution and norm (act_layer).
ACTIVATIONS = ("ReLU", "SiLU", "GELU")
#: DCNv3's norm after its depthwise convolution (norm_layer): LayerNorm or BatchNorm.
NORMS = ("LN", "BN")


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ArgumentTypeError(f"{name} must be True or False, got {value!r}")


def _choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ArgumentError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


@dataclass(frozen=True)
class _ModuleConfig:
    """What DCNv3's and DCNv4's modules share. ``remove_center`` is 0 or 1,
    as the references store it."""

    channels: int
    kernel_size: int
    stride: int
    pad: int
    dilation: int
    group: int
    group_channels: int
    offset_scale: float
    dw_kernel_size: int | None
    center_feature_scale: bool
    remove_center: int

    @property
    def points(self) -> int:
        """P, the kernel points per group."""
        return self.kernel_size**2 - self.remove_center


@dataclass(frozen=True)
class DCNv3Config(_ModuleConfig):
    """A DCNv3 module's checked arguments (dw_kernel_size always set)."""

    act_layer: str
    norm_layer: str


@dataclass(frozen=True)
class DCNv4Config(_ModuleConfig):
    """A DCNv4 module's checked arguments; ``dw_kernel_size`` None means no offset_mask_dw."""

    output_bias: bool
    without_pointwise: bool

    @property
    def K(self) -> int:
        """G*P, the mask values of a pixel over all groups (the reference's ``self.K``)."""
        return self.group * self.points

    @property
    def offset_mask_channels(self) -> int:
        """K8: offset_mask's output size, G*3*P rounded up to a multiple of 8."""
        return packed_channels(self.group, self.points)


def _common(channels, kernel_size, stride, pad, dilation, group, offset_scale, remove_center, dw_kernel_size,
            center_feature_scale):
    channels = check_int(channels, "channels", 1)
    group = check_int(group, "group", 1)
    if channels % group:
        raise ArgumentError(f"channels = {channels} must be divisible by group = {group}")
    kernel_size = check_int(kernel_size, "kernel_size", 1)
    centre = int(_flag(remove_center, "remove_center"))
    if centre and kernel_size % 2 == 0:
        raise ArgumentError(
            f"remove_center needs an odd kernel_size (it drops the centre point), got {kernel_size}"
        )
    if dw_kernel_size is not None:
        dw_kernel_size = check_int(dw_kernel_size, "dw_kernel_size", 1)
        if dw_kernel_size % 2 == 0:
            raise ArgumentError(
                f"dw_kernel_size must be odd (the depthwise convolution pads by (k - 1) // 2 and "
                f"must keep the image size), got {dw_kernel_size}"
            )
    return dict(
        channels=channels, kernel_size=kernel_size, stride=check_int(stride, "stride", 1),
        pad=check_int(pad, "pad", 0), dilation=check_int(dilation, "dilation", 1), group=group,
        group_channels=channels // group, offset_scale=_offset_scale(offset_scale), remove_center=centre,
        dw_kernel_size=dw_kernel_size, center_feature_scale=_flag(center_feature_scale, "center_feature_scale"),
    )


def dcnv3_config(
    channels: Any = 64, kernel_size: Any = 3, dw_kernel_size: Any = None, stride: Any = 1, pad: Any = 1,
    dilation: Any = 1, group: Any = 4, offset_scale: Any = 1.0, act_layer: Any = "GELU",
    norm_layer: Any = "LN", center_feature_scale: Any = False, remove_center: Any = False,
) -> DCNv3Config:
    """InternImage's ``DCNv3`` constructor arguments (its order and defaults), checked.

    dw_kernel_size None means kernel_size. Any group_channels is fine (the
    reference warns when it is not a power of two, for its CUDA kernel's
    sake; cudcn does not).

    Raises:
        ArgumentError: a size out of range, channels not divisible by group,
            an even dw_kernel_size, remove_center with an even kernel_size,
            an unknown act_layer or norm_layer.
        ArgumentTypeError: center_feature_scale not a bool.
    """
    args = _common(channels, kernel_size, stride, pad, dilation, group, offset_scale, remove_center,
                   kernel_size if dw_kernel_size is None else dw_kernel_size, center_feature_scale)
    return DCNv3Config(**args, act_layer=_choice(act_layer, "act_layer", ACTIVATIONS),
                       norm_layer=_choice(norm_layer, "norm_layer", NORMS))


def dcnv4_config(
    channels: Any = 64, kernel_size: Any = 3, stride: Any = 1, pad: Any = 1, dilation: Any = 1,
    group: Any = 4, offset_scale: Any = 1.0, dw_kernel_size: Any = None, center_feature_scale: Any = False,
    remove_center: Any = False, output_bias: Any = True, without_pointwise: Any = False,
) -> DCNv4Config:
    """FlashInternImage's ``DCNv4`` constructor arguments (its order and defaults), checked.

    Unlike the reference, any kernel_size and any group_channels (the
    reference: 3x3 and group_channels a multiple of 16).
    """
    args = _common(channels, kernel_size, stride, pad, dilation, group, offset_scale, remove_center,
                   dw_kernel_size, center_feature_scale)
    return DCNv4Config(**args, output_bias=_flag(output_bias, "output_bias"),
                       without_pointwise=_flag(without_pointwise, "without_pointwise"))


def keep_attributes(layer: Any, config: _ModuleConfig) -> None:
    """The config on ``layer._config`` (what its forward reads), and the
    attributes the references keep, for code that reads them."""
    layer._config = config
    for name in ("offset_scale", "channels", "kernel_size", "dw_kernel_size", "stride", "dilation", "pad",
                 "group", "group_channels", "center_feature_scale", "remove_center"):
        setattr(layer, name, getattr(config, name))
    if isinstance(config, DCNv4Config):
        layer.without_pointwise = config.without_pointwise
        layer.K = config.K


def check_same_size(config: _ModuleConfig, height: int, width: int, module: str) -> None:
    """The module's offsets are predicted at the input's pixels, so the
    operator's output must be the input's size (stride 1, pad =
    dilation*(kernel_size - 1)/2 for every size): else a clear error."""
    args = (config.kernel_size, config.stride, config.pad, config.dilation)
    out = output_size(height, *args), output_size(width, *args)
    if out != (height, width):
        raise ArgumentError(
            f"{module} predicts its offsets at every input pixel, so its output must keep the input's "
            f"size (H, W) = ({height}, {width}); kernel_size {config.kernel_size}, stride {config.stride}, "
            f"pad {config.pad}, dilation {config.dilation} give {out} (use stride 1 and "
            f"pad = dilation*(kernel_size - 1)/2)"
        )


def check_input_shape(shape: tuple, channels: int, layout: str, name: str = "input") -> None:
    """A module's input: rank len(layout) and the module's channels last."""
    rank = layout.count(",") + 1
    if len(shape) != rank:
        raise ArgumentError(f"{name} must be a {rank}-D tensor {layout}, got shape {tuple(shape)}")
    if shape[-1] != channels:
        raise ArgumentError(f"{name}.shape[{rank - 1}] (C) must be channels = {channels}, got {shape[-1]}")


def token_grid(tokens: int, shape: Any, name: str = "input") -> tuple[int, int]:
    """DCNv4's (H, W) for L tokens: ``shape`` if given, else a square (as the reference assumes)."""
    if shape is not None:
        if len(shape) != 2:
            raise ArgumentError(f"shape must be (H, W), got {shape!r}")
        height, width = (check_int(v, f"shape[{i}]", 1) for i, v in enumerate(shape))
        if height * width != tokens:
            raise ArgumentError(
                f"shape (H, W) = ({height}, {width}) must have H*W = {name}.shape[1] (L) = {tokens}, "
                f"got {height * width}"
            )
        return height, width
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ArgumentError(
            f"{name}.shape[1] (L) = {tokens} is not a square number: pass shape=(H, W) for a "
            f"non-square image"
        )
    return side, side
