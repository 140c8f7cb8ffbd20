"""Validation of a DCNv3 or DCNv4 call, and its geometry.

Every DCNv3/DCNv4 entry point calls :func:`validate_dcnv3` exactly once. It
checks array kinds, dtypes, shapes and the scalar arguments, and returns a
:class:`DCNv3Geometry`: a small immutable record that the backends trust
without checking again. DCNv3 and DCNv4 share it: they differ only in where
the offsets and the mask lie (two arrays, or one packed array), which the
geometry describes as strides (:attr:`DCNv3Geometry.offset_layout`,
:attr:`DCNv3Geometry.mask_layout`).

Notation (that of InternImage; everything channels-last):

=========  ============================================================
N          batch size
H, W       input height and width
G          groups (``group``)
D          channels per group (``group_channels``); C = G*D
kh, kw     kernel height and width
P          kernel points, kh*kw - remove_center
Ho, Wo     output height and width: (H + 2*pad_h - dil_h*(kh-1) - 1) // stride_h + 1
K8         DCNv4's packed offset_mask width: a multiple of 8, >= G*3*P
=========  ============================================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from cudcn.errors import ArgumentError, ArgumentTypeError
from cudcn.geometry import (
    MAX_EXTENT,
    check_float_arrays,
    check_im2col_step,
    check_int,
    check_ndim,
    check_shape,
    output_size,
)

_ABSENT: Any = object()

#: Each argument's layout, for error messages.
LAYOUTS = {
    "input": "(N, H, W, group*group_channels)",
    "offset": "(N, Ho, Wo, group*P*2)",
    "mask": "(N, Ho, Wo, group*P)",
    "offset_mask": "(N, Ho, Wo, K8)",
    "grad_output": "(N, Ho, Wo, group*group_channels)",
}


#: The scalar arguments of DCNv3Function and DCNv4Function, in their order.
SCALARS = ("kernel_h", "kernel_w", "stride_h", "stride_w", "pad_h", "pad_w", "dilation_h", "dilation_w",
           "group", "group_channels", "offset_scale", "im2col_step", "remove_center")


class Layout(NamedTuple):
    """Where the values of output pixel q = (n*Ho + h)*Wo + w, group g sit in
    an offset or mask array, counted in elements of the flat, C-contiguous
    array: from ``base = first + q*pixel_stride + g*group_stride``, point p's
    (x, y) offset at base + 2p, base + 2p + 1, its mask value at base + p."""

    first: int
    pixel_stride: int
    group_stride: int


@dataclass(frozen=True)
class DCNv3Geometry:
    """Everything a backend needs to know about one DCNv3/DCNv4 call, already checked."""

    kind: str  # "numpy" or "cupy": which backend runs the call
    dtype: np.dtype
    batch: int  # N
    height: int  # H
    width: int  # W
    group: int  # G
    group_channels: int  # D
    kernel_h: int
    kernel_w: int
    stride_h: int
    stride_w: int
    pad_h: int
    pad_w: int
    dil_h: int
    dil_w: int
    out_h: int  # Ho
    out_w: int  # Wo
    offset_scale: float
    remove_center: bool
    offset_mask_channels: int  # K8 for DCNv4 (offset and mask packed in one array); 0 for DCNv3
    softmax: bool = False  # DCNv3 only: the mask goes through a softmax over the P points of each (pixel, group)

    @property
    def channels(self) -> int:
        """C = G*D."""
        return self.group * self.group_channels

    @property
    def points(self) -> int:
        """P = kh*kw - remove_center."""
        return self.kernel_h * self.kernel_w - int(self.remove_center)

    @property
    def packed(self) -> bool:
        """True for DCNv4: offsets and mask in one array (N, Ho, Wo, K8)."""
        return self.offset_mask_channels > 0

    @property
    def kernel_grid(self) -> tuple[tuple[int, int], ...]:
        """(i, j) of each kernel point p, in order: i the kernel column
        (0..kw-1, outer), j the row (0..kh-1, inner), w-major; the centre
        (kw//2, kh//2) is left out when remove_center."""
        return tuple(
            (i, j) for i in range(self.kernel_w) for j in range(self.kernel_h)
            if not (self.remove_center and (i, j) == (self.kernel_w // 2, self.kernel_h // 2))
        )

    @property
    def centre(self) -> tuple[int, int]:
        """(c_h, c_w) = (dil_h*(kh-1)//2, dil_w*(kw-1)//2): the reference
        point's place in the kernel window, which offset_scale does not scale."""
        return self.dil_h * (self.kernel_h - 1) // 2, self.dil_w * (self.kernel_w - 1) // 2

    @property
    def offset_layout(self) -> Layout:
        """The P (x, y) pairs of pixel q, group g: 2*P values from
        ``first + q*pixel_stride + g*group_stride``."""
        P = self.points
        if self.packed:
            return Layout(0, self.offset_mask_channels, 3 * P)
        return Layout(0, self.group * 2 * P, 2 * P)

    @property
    def mask_layout(self) -> Layout:
        """The P mask values of pixel q, group g."""
        P = self.points
        if self.packed:
            return Layout(2 * P, self.offset_mask_channels, 3 * P)
        return Layout(0, self.group * P, P)

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        """(N, Ho, Wo, G*D)."""
        return (self.batch, self.out_h, self.out_w, self.channels)


def packed_channels(group: int, points: int) -> int:
    """The smallest K8 for ``group`` groups of ``points`` points: G*3*P
    rounded up to a multiple of 8 (what DCNv4's module produces)."""
    return -(-3 * group * points // 8) * 8


def _offset_scale(value: Any) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ArgumentError(f"offset_scale must be a real number, got {value!r}")
    if not math.isfinite(value):
        raise ArgumentError(f"offset_scale must be finite, got {value!r}")
    return float(value)


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
        return bool(value)
    raise ArgumentError(f"{name} must be a bool (or 0 or 1), got {value!r}")


def validate_dcnv3(
    *,
    input: Any = _ABSENT,
    offset: Any = _ABSENT,
    mask: Any = _ABSENT,
    offset_mask: Any = _ABSENT,
    grad_output: Any = _ABSENT,
    kernel_h: Any,
    kernel_w: Any,
    stride_h: Any,
    stride_w: Any,
    pad_h: Any,
    pad_w: Any,
    dilation_h: Any,
    dilation_w: Any,
    group: Any,
    group_channels: Any,
    offset_scale: Any = 1.0,
    im2col_step: Any = 256,
    remove_center: Any = False,
    softmax: Any = False,
    names: Mapping[str, str] | None = None,
) -> DCNv3Geometry:
    """Check one DCNv3 call (``offset`` and ``mask``) or DCNv4 call
    (``offset_mask``) and describe it.

    ``input`` is required, and either ``offset`` and ``mask`` or
    ``offset_mask``; ``grad_output`` is checked when given. ``softmax``
    (DCNv3 only) asks for the mask's softmax over the P points of each
    (pixel, group) before use. ``names``
    renames arguments in error messages, as for
    :func:`cudcn.geometry.validate`.

    Raises:
        ArgumentTypeError (a TypeError): an array is None or not an array of
            a supported kind; the arrays differ in kind, device or dtype, or
            are not floating.
        ArgumentError (a ValueError): a rank, a size or a scalar argument is
            wrong (for example remove_center with an even or non-square
            kernel, or group*group_channels other than the input's channels).
        Both are RuntimeErrors too.
    """
    names = dict(names or {})

    def nm(key: str) -> str:
        return names.get(key, key)

    packed = offset_mask is not _ABSENT
    keys = ("input", "offset_mask") if packed else ("input", "offset", "mask")
    given = {"input": input, "offset": offset, "mask": mask, "offset_mask": offset_mask}
    arrays = {key: given[key] for key in keys}
    if grad_output is not _ABSENT:
        arrays["grad_output"] = grad_output
    for key, array in arrays.items():
        if array is None or array is _ABSENT:
            raise ArgumentTypeError(f"{nm(key)} must be an array {LAYOUTS[key]}, got None")
    kind, dtype = check_float_arrays(arrays, nm)

    kernel = check_int(kernel_h, "kernel_h", 1), check_int(kernel_w, "kernel_w", 1)
    stride = check_int(stride_h, "stride_h", 1), check_int(stride_w, "stride_w", 1)
    pad = check_int(pad_h, "pad_h", 0), check_int(pad_w, "pad_w", 0)
    dilation = check_int(dilation_h, "dilation_h", 1), check_int(dilation_w, "dilation_w", 1)
    groups = check_int(group, "group", 1)
    per_group = check_int(group_channels, "group_channels", 1)
    scale = _offset_scale(offset_scale)
    check_im2col_step(im2col_step)
    centre_removed = _flag(remove_center, "remove_center")
    soft = _flag(softmax, "softmax")
    if soft and packed:
        raise ArgumentError("softmax applies to DCNv3's separate mask; DCNv4 (offset_mask) has none")
    if centre_removed and (kernel[0] != kernel[1] or kernel[0] % 2 == 0):
        raise ArgumentError(
            f"remove_center needs a square kernel of odd size (it drops the centre point), "
            f"got kernel_h x kernel_w = {kernel[0]}x{kernel[1]}"
        )
    points = kernel[0] * kernel[1] - int(centre_removed)

    check_ndim(input, nm("input"), 4, LAYOUTS["input"])
    batch, height, width, channels = map(int, input.shape)
    if channels != groups * per_group:
        raise ArgumentError(
            f"{nm('input')}.shape[3] (C) must be group*group_channels = {groups}*{per_group} = "
            f"{groups * per_group}, got {channels}"
        )
    if height < 1 or width < 1:
        raise ArgumentError(f"{nm('input')} must have at least one pixel, got (H, W) = ({height}, {width})")
    if max(height + 2 * pad[0], width + 2 * pad[1]) > MAX_EXTENT or height * width > MAX_EXTENT:
        raise ArgumentError(
            f"the padded input (H + 2*pad_h, W + 2*pad_w) = ({height + 2 * pad[0]}, {width + 2 * pad[1]}) "
            f"and H*W = {height * width} must stay below 2**31 (the kernels index in 32 bits)"
        )
    out_h, out_w = (output_size(size, kernel[a], stride[a], pad[a], dilation[a])
                    for a, size in enumerate((height, width)))
    if out_h < 1 or out_w < 1:
        raise ArgumentError(
            f"output size (Ho, Wo) = ({out_h}, {out_w}) must be at least 1x1; "
            f"input (H, W) = ({height}, {width}), kernel ({kernel[0]}, {kernel[1]}), "
            f"stride ({stride[0]}, {stride[1]}), pad ({pad[0]}, {pad[1]}), "
            f"dilation ({dilation[0]}, {dilation[1]})"
        )
    if out_h * out_w > MAX_EXTENT:
        raise ArgumentError(f"output Ho*Wo = {out_h * out_w} must stay below 2**31 (the kernels index in 32 bits)")

    pixels = (batch, out_h, out_w)
    note = f" (P = kh*kw - remove_center = {points})"
    if packed:
        name = nm("offset_mask")
        check_ndim(offset_mask, name, 4, LAYOUTS["offset_mask"])
        if tuple(offset_mask.shape[:3]) != pixels:
            raise ArgumentError(
                f"{name}.shape[:3] must be (N, Ho, Wo) = {pixels}, got {tuple(offset_mask.shape[:3])}"
            )
        width8, needed = int(offset_mask.shape[3]), 3 * groups * points
        if width8 % 8 or width8 < needed:
            raise ArgumentError(
                f"{name}.shape[3] (K8) must be a multiple of 8 and at least group*3*P = "
                f"{groups}*3*{points} = {needed} (smallest: {packed_channels(groups, points)}), got {width8}"
            )
    else:
        width8 = 0
        for key, per_point in (("offset", 2), ("mask", 1)):
            check_ndim(given[key], nm(key), 4, LAYOUTS[key])
            expected = pixels + (groups * points * per_point,)
            check_shape(nm(key), given[key].shape, expected, LAYOUTS[key], note)
    if grad_output is not _ABSENT:
        check_ndim(grad_output, nm("grad_output"), 4, LAYOUTS["grad_output"])
        check_shape(nm("grad_output"), grad_output.shape, pixels + (channels,), LAYOUTS["grad_output"])

    return DCNv3Geometry(
        kind=kind, dtype=dtype, batch=batch, height=height, width=width, group=groups,
        group_channels=per_group, kernel_h=kernel[0], kernel_w=kernel[1], stride_h=stride[0],
        stride_w=stride[1], pad_h=pad[0], pad_w=pad[1], dil_h=dilation[0], dil_w=dilation[1],
        out_h=out_h, out_w=out_w, offset_scale=scale, remove_center=centre_removed,
        offset_mask_channels=width8, softmax=soft,
    )
