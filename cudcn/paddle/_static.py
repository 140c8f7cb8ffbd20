"""The static-graph path: shapes paddle leaves unknown while it builds a
graph, and paddle's own deform_conv2d op emitted into the graph."""

from __future__ import annotations

from typing import Any

import paddle

from cudcn.errors import ArgumentError
from cudcn.geometry import Geometry, int_pair, output_size


def static_shapes(
    shapes: dict[str, list[int]], stride: Any, padding: Any, dilation: Any,
    deformable_groups: int, groups: int,
) -> dict[str, list[int]]:
    """Shapes for the stand-ins of static-graph values, whose unknown sizes paddle shows as -1.

    Each unknown size becomes one the call implies, so that the core checks
    everything that is known: the batch that of any argument that knows it
    (else 1); a channel count the one the weight and the groups imply; an
    unknown input height (width) the smallest the kernel fits; an unknown
    output height (width) of offset and mask, or any of them when the
    input's is unknown, the output size of the input's. paddle's op checks
    the unknown sizes when the graph runs.
    """
    x, offset, weight, mask = (shapes.get(name) for name in ("x", "offset", "weight", "mask"))
    if x is None or offset is None or weight is None or any(
        len(s) != 4 for s in (x, offset, weight, mask) if s is not None
    ) or min(weight) < 0:
        return shapes  # the core names what is wrong
    kernel = weight[2:]
    points = kernel[0] * kernel[1]
    stride, padding, dilation = (
        int_pair(stride, "stride", 1), int_pair(padding, "padding", 0), int_pair(dilation, "dilation", 1)
    )
    batch = next((s[0] for s in (x, offset, mask) if s is not None and s[0] >= 0), 1)
    sizes = [
        size if size >= 0 else d * (k - 1) + 1 for size, k, d in zip(x[2:], kernel, dilation)
    ]
    out = [output_size(*axis) for axis in zip(sizes, kernel, stride, padding, dilation)]

    def resolved(shape: list[int], channels: int) -> list[int]:
        spatial = [o if own < 0 or size < 0 else own for own, o, size in zip(shape[2:], out, x[2:])]
        return [batch if shape[0] < 0 else shape[0], channels if shape[1] < 0 else shape[1], *spatial]

    result = dict(shapes)
    result["x"] = [batch, weight[1] * groups if x[1] < 0 else x[1], *sizes]
    result["offset"] = resolved(offset, 2 * deformable_groups * points)
    if mask is not None:
        result["mask"] = resolved(mask, deformable_groups * points)
    return result


def static_deform_conv2d(x, offset, weight, bias, mask, geom: Geometry) -> Any:
    """paddle's own deform_conv2d op, emitted into the static graph being built."""
    if geom.out_channels % geom.offset_groups:
        raise ArgumentError(
            f"weight.shape[0] = {geom.out_channels} (out_channels) must be divisible by "
            f"deformable_groups = {geom.offset_groups} in a static graph: there cudcn "
            f"emits paddle's own deform_conv2d op, which requires it"
        )
    return paddle.vision.ops.deform_conv2d(
        x, offset, weight, bias,
        stride=[geom.stride_h, geom.stride_w], padding=[geom.pad_h, geom.pad_w],
        dilation=[geom.dil_h, geom.dil_w], deformable_groups=geom.offset_groups,
        groups=geom.groups, mask=mask,
    )
