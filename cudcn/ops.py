"""Public functions: validate once, then hand over to the array's backend.

Shapes (notation of :mod:`cudcn.geometry`):

- input ``(N, C_in, H, W)``
- offset ``(N, 2*G*kh*kw, Ho, Wo)``; in offset group g, channel
  ``g*2*kh*kw + 2*k`` is the row shift and the next the column shift of
  kernel point ``k = i*kw + j``
- mask ``(N, G*kh*kw, Ho, Wo)``, optional (None: DCNv1)
- weight ``(C_out, C_in/groups, kh, kw)``; bias ``(C_out,)``, optional
- output ``(N, C_out, Ho, Wo)`` with
  ``Ho = (H + 2*pad_h - dil_h*(kh-1) - 1) // stride_h + 1`` (likewise Wo)
- columns ``(N, Ho*Wo, kh*kw, C_in)``: ``columns[n, h*Wo + w, i*kw + j, c]``
  is input channel c sampled for output pixel (h, w) at kernel point (i, j),
  times the mask.

stride, padding and dilation are an int or a pair (rows, columns).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from cudcn import backends
from cudcn.geometry import validate

IntOrPair = int | tuple[int, int]


class Gradients(NamedTuple):
    """Gradients of a deformable convolution, each shaped like its argument."""

    input: Any
    offset: Any
    weight: Any
    bias: Any  # None when the call had no bias
    mask: Any  # None when the call had no mask


def deform_conv2d(
    input: Any,
    offset: Any,
    weight: Any,
    bias: Any | None = None,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    mask: Any | None = None,
    *,
    names: Mapping[str, str] | None = None,
) -> Any:
    """Deformable convolution (DCNv1, or DCNv2 when a mask is given).

    The semantics are those of ``torchvision.ops.deform_conv2d``.

    Args:
        input: (N, C_in, H, W).
        offset: (N, 2*G*kh*kw, Ho, Wo), (row, column) shift per kernel point.
        weight: (C_out, C_in/groups, kh, kw).
        bias: (C_out,) or None.
        stride, padding, dilation: int or (rows, columns).
        mask: (N, G*kh*kw, Ho, Wo) modulation, or None for DCNv1.
        names: how to call the arguments in error messages (for adapters).

    Returns:
        (N, C_out, Ho, Wo), of the input's array type and dtype.
    """
    geom = validate(
        input=input, offset=offset, weight=weight, bias=bias, mask=mask,
        stride=stride, padding=padding, dilation=dilation, names=names,
    )
    return backends.load(geom.kind).forward(geom, input, offset, weight, bias, mask)


#: The name the design gives the entry point; the same function.
deform_conv = deform_conv2d


def deform_conv2d_backward(
    grad_output: Any,
    input: Any,
    offset: Any,
    weight: Any,
    bias: Any | None = None,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    mask: Any | None = None,
    *,
    names: Mapping[str, str] | None = None,
) -> Gradients:
    """Gradients of :func:`deform_conv2d` given grad_output (N, C_out, Ho, Wo).

    Returns:
        :class:`Gradients` (input, offset, weight, bias, mask); bias and mask
        are None when not given.
    """
    geom = validate(
        input=input, offset=offset, weight=weight, bias=bias, mask=mask,
        grad_output=grad_output, stride=stride, padding=padding,
        dilation=dilation, names=names,
    )
    grads = backends.load(geom.kind).backward(geom, grad_output, input, offset, weight, mask)
    return Gradients(*grads)


def deform_im2col(
    input: Any,
    offset: Any,
    kernel_size: IntOrPair,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    mask: Any | None = None,
) -> Any:
    """Sample the column buffer (N, Ho*Wo, kh*kw, C_in) from input (N, C_in, H, W).

    ``columns[n, h*Wo + w, i*kw + j, c]`` is ``mask * bilinear(input[n, c], y, x)``
    at the sampling point of output pixel (h, w) and kernel point (i, j).
    """
    geom = validate(
        input=input, offset=offset, mask=mask, kernel_size=kernel_size,
        stride=stride, padding=padding, dilation=dilation,
    )
    return backends.load(geom.kind).im2col(geom, input, offset, mask)


def deform_col2im(
    columns: Any,
    offset: Any,
    input_shape: tuple[int, int, int, int],
    kernel_size: IntOrPair,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    mask: Any | None = None,
) -> Any:
    """Input gradient (N, C_in, H, W) from column gradients (N, Ho*Wo, kh*kw, C_in).

    The adjoint of :func:`deform_im2col` in its input:
    ``<deform_col2im(G), X> == <G, deform_im2col(X)>``.
    """
    geom = validate(
        columns=columns, offset=offset, mask=mask, input_shape=input_shape,
        kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation,
    )
    return backends.load(geom.kind).col2im(geom, columns, offset, mask)


def deform_col2im_coord(
    columns: Any,
    input: Any,
    offset: Any,
    kernel_size: IntOrPair,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    mask: Any | None = None,
) -> tuple[Any, Any]:
    """Offset and mask gradients from column gradients (N, Ho*Wo, kh*kw, C_in).

    Returns:
        (grad_offset (N, 2*G*kh*kw, Ho, Wo), grad_mask (N, G*kh*kw, Ho, Wo)),
        grad_mask None when no mask is given: the gradients of
        ``<columns, deform_im2col(input, offset, mask=mask)>``.
    """
    geom = validate(
        columns=columns, input=input, offset=offset, mask=mask,
        kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation,
    )
    return backends.load(geom.kind).col2im_coord(geom, columns, input, offset, mask)
