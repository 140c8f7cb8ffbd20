"""Public functions: validate once, then hand over to the array's backend.

Deformable convolution, shapes in the notation of :mod:`cudcn.geometry`:

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

Multi-scale deformable attention, shapes in the notation of
:mod:`cudcn.msda_geometry` (Deformable DETR's):

- value ``(N, S, M, D)``, S = sum of H_l*W_l
- spatial_shapes ``(L, 2)`` integer, (H_l, W_l) per level
- level_start_index ``(L,)`` integer, the cumulative sum of H_l*W_l from 0
- sampling_locations ``(N, Lq, M, L, P, 2)``, normalised (x, y)
- attention_weights ``(N, Lq, M, L, P)``
- output ``(N, Lq, M*D)``

DCNv3 and DCNv4, channels-last, in the notation of
:mod:`cudcn.dcnv3_geometry` (InternImage's; P = kh*kw - remove_center):

- input ``(N, H, W, G*D)``
- offset ``(N, Ho, Wo, G*P*2)``, (x, y) pairs, kernel points w-major
- mask ``(N, Ho, Wo, G*P)``
- offset_mask (DCNv4) ``(N, Ho, Wo, K8)``: per group 2P offsets then P mask
  values, groups back to back, K8 a multiple of 8 and >= G*3*P
- output ``(N, Ho, Wo, G*D)``
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from cudcn import backends
from cudcn.dcnv3_geometry import SCALARS, validate_dcnv3
from cudcn.geometry import validate
from cudcn.msda_geometry import validate_msda

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


class MSDeformAttnGradients(NamedTuple):
    """Gradients of multi-scale deformable attention, each shaped like its argument."""

    value: Any
    sampling_locations: Any
    attention_weights: Any


def ms_deform_attn(
    value: Any,
    spatial_shapes: Any,
    level_start_index: Any,
    sampling_locations: Any,
    attention_weights: Any,
    im2col_step: int = 64,
    *,
    names: Mapping[str, str] | None = None,
) -> Any:
    """Multi-scale deformable attention (Deformable DETR's MSDeformAttn core).

    The semantics are those of Deformable DETR's ``ms_deform_attn_core_pytorch``
    (``grid_sample`` with ``align_corners=False``, ``padding_mode="zeros"``):
    ``out[n, q, m*D + d]`` is the sum over levels l and points p of
    ``attention_weights[n, q, m, l, p]`` times level l of the value (head m,
    channel d) sampled bilinearly at pixel (x*W_l - 0.5, y*H_l - 0.5), where
    (x, y) = ``sampling_locations[n, q, m, l, p]``. No softmax is applied.

    Args:
        value: (N, S, M, D), S = sum of H_l*W_l.
        spatial_shapes: (L, 2) integer array of (H_l, W_l), read on the host.
        level_start_index: (L,) integer array, the first pixel of each level
            in S (checked: the cumulative sum of H_l*W_l from 0).
        sampling_locations: (N, Lq, M, L, P, 2), normalised (x, y); points
            may lie outside [0, 1].
        attention_weights: (N, Lq, M, L, P).
        im2col_step: accepted for compatibility with Deformable DETR and
            mmcv, and ignored (a positive int): any batch size works.
        names: how to call the arguments in error messages (for adapters).

    Returns:
        (N, Lq, M*D), of the value's array type and dtype (float16 and
        bfloat16 compute in float32).
    """
    geom = validate_msda(
        value=value, spatial_shapes=spatial_shapes, level_start_index=level_start_index,
        sampling_locations=sampling_locations, attention_weights=attention_weights,
        im2col_step=im2col_step, names=names,
    )
    run = backends.function(geom.kind, "ms_deform_attn_forward", (names or {}).get("value", "value"))
    return run(geom, value, sampling_locations, attention_weights)


def ms_deform_attn_backward(
    grad_output: Any,
    value: Any,
    spatial_shapes: Any,
    level_start_index: Any,
    sampling_locations: Any,
    attention_weights: Any,
    im2col_step: int = 64,
    *,
    names: Mapping[str, str] | None = None,
) -> MSDeformAttnGradients:
    """Gradients of :func:`ms_deform_attn` given grad_output (N, Lq, M*D).

    At an integer pixel coordinate (a kink of the bilinear sample) the
    location gradient is the one-sided derivative towards +1, as for
    :func:`deform_conv2d`; elsewhere all three gradients are those of
    ``grid_sample``'s backward.

    Returns:
        :class:`MSDeformAttnGradients` (value, sampling_locations,
        attention_weights), in the arguments' array type and dtype; the
        location gradient is in normalised units.
    """
    geom = validate_msda(
        value=value, spatial_shapes=spatial_shapes, level_start_index=level_start_index,
        sampling_locations=sampling_locations, attention_weights=attention_weights,
        grad_output=grad_output, im2col_step=im2col_step, names=names,
    )
    run = backends.function(geom.kind, "ms_deform_attn_backward", (names or {}).get("value", "value"))
    return MSDeformAttnGradients(*run(geom, grad_output, value, sampling_locations, attention_weights))


class DCNv3Gradients(NamedTuple):
    """Gradients of DCNv3, each shaped like its argument."""

    input: Any
    offset: Any
    mask: Any


class DCNv4Gradients(NamedTuple):
    """Gradients of DCNv4, each shaped like its argument; offset_mask's is
    zero in the entries past G*3*P, which the operator does not read."""

    input: Any
    offset_mask: Any


def _run_dcnv3(function: str, arrays: dict[str, Any], scalars: tuple, names: Mapping[str, str] | None,
               softmax: bool = False) -> Any:
    """Validate a DCNv3 (offset, mask) or DCNv4 (offset_mask) call, ``scalars``
    in DCNv3Function's order, and run the backend's ``function`` on it; DCNv4's
    offset_mask is both the offset and the mask array of the backend call."""
    geom = validate_dcnv3(**arrays, **dict(zip(SCALARS, scalars)), softmax=softmax, names=names)
    run = backends.function(geom.kind, function, (names or {}).get("input", "input"))
    if geom.packed:
        offset_mask = arrays.pop("offset_mask")
        arrays.update(offset=offset_mask, mask=offset_mask)
    return run(geom, *arrays.values())


def dcnv3(
    input: Any,
    offset: Any,
    mask: Any,
    kernel_h: int,
    kernel_w: int,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    group: int,
    group_channels: int,
    offset_scale: float = 1.0,
    im2col_step: int = 256,
    remove_center: bool = False,
    *,
    softmax: bool = False,
    names: Mapping[str, str] | None = None,
) -> Any:
    """DCNv3 (InternImage's operator): depthwise deformable sampling, summed over kernel points.

    The arguments are those of InternImage's ``DCNv3Function``, in its order.
    For output pixel (h, w), group g and kernel point p (kernel column i,
    row j; w-major: i outer, j inner; the centre left out with
    remove_center)::

        out[n, h, w, g*D + d] = sum_p mask[n, h, w, g*P + p] * bilinear(input[n, :, :, g*D + d], y, x)
        x = w*stride_w - pad_w + c_w + (i*dilation_w - c_w + offset[n, h, w, g*2P + 2p]) * offset_scale
        y = h*stride_h - pad_h + c_h + (j*dilation_h - c_h + offset[n, h, w, g*2P + 2p + 1]) * offset_scale

    with c_w = dilation_w*(kernel_w - 1)//2, c_h likewise. Bilinear with
    zeros outside the input (``grid_sample``'s ``padding_mode="zeros"``). The
    mask is applied as given: no softmax (that is the DCNv3 module's), unless
    ``softmax=True`` asks the operator to apply the module's softmax itself.
    ``dcnv3_core_pytorch`` pads H by pad_w and W by pad_h (a slip that only
    shows with unequal pads); cudcn pads as InternImage's CUDA op does, H by
    pad_h and W by pad_w.

    Args:
        input: (N, H, W, group*group_channels).
        offset: (N, Ho, Wo, group*P*2), (x, y) per point, P = kh*kw - remove_center.
        mask: (N, Ho, Wo, group*P).
        kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
            dilation_w: ints; any kernel size, rectangular and even included.
        group, group_channels: G and D, G*D = C (any D).
        offset_scale: scales the kernel grid and the offsets (a finite real).
        im2col_step: accepted for compatibility and ignored (a positive
            int): any batch size works.
        remove_center: drop the centre point of an odd square kernel.
        softmax: apply a softmax over the P points of each (pixel, group) to
            the mask first, ``mask_p -> exp(mask_p - max) / sum_q exp(mask_q - max)``
            in the compute dtype, as InternImage's DCNv3 module does before it
            calls the operator (keyword only; default False: the mask as
            given, the operator's own semantics). The result equals the
            operator on the softmaxed mask; fused, no softmaxed copy of the
            mask is made. DCNv4 has no softmax.
        names: how to call the arguments in error messages (for adapters).

    Returns:
        (N, Ho, Wo, group*group_channels), of the input's array type and
        dtype (float16 and bfloat16 compute in float32),
        ``Ho = (H + 2*pad_h - dilation_h*(kernel_h - 1) - 1) // stride_h + 1`` (Wo likewise).
    """
    scalars = (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
               group_channels, offset_scale, im2col_step, remove_center)
    return _run_dcnv3("dcnv3_forward", dict(input=input, offset=offset, mask=mask), scalars, names, softmax)


def dcnv3_backward(
    grad_output: Any,
    input: Any,
    offset: Any,
    mask: Any,
    kernel_h: int,
    kernel_w: int,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    group: int,
    group_channels: int,
    offset_scale: float = 1.0,
    im2col_step: int = 256,
    remove_center: bool = False,
    *,
    softmax: bool = False,
    names: Mapping[str, str] | None = None,
) -> DCNv3Gradients:
    """Gradients of :func:`dcnv3` given grad_output (N, Ho, Wo, G*D).

    At an integer sampling coordinate (a kink of the bilinear sample) the
    offset gradient is the one-sided derivative towards +1, as for
    :func:`deform_conv2d`, also at -1 (InternImage's CUDA op gives 0 there).
    With ``softmax=True`` (as in :func:`dcnv3`) the mask gradient is that of
    the mask as given, through the softmax's Jacobian
    (``s_p * (d_p - sum_q s_q d_q)``, s the softmaxed mask and d the
    gradient by it).

    Returns:
        :class:`DCNv3Gradients` (input, offset, mask), in the arguments'
        array type and dtype.
    """
    scalars = (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
               group_channels, offset_scale, im2col_step, remove_center)
    arrays = dict(grad_output=grad_output, input=input, offset=offset, mask=mask)
    return DCNv3Gradients(*_run_dcnv3("dcnv3_backward", arrays, scalars, names, softmax))


def dcnv4(
    input: Any,
    offset_mask: Any,
    kernel_h: int,
    kernel_w: int,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    group: int,
    group_channels: int,
    offset_scale: float = 1.0,
    im2col_step: int = 256,
    remove_center: bool = False,
    *,
    names: Mapping[str, str] | None = None,
) -> Any:
    """DCNv4 (FlashInternImage's operator): :func:`dcnv3` with the offsets and
    mask packed in one array, in the argument order of DCNv4's ``DCNv4Function``.

    ``offset_mask`` (N, Ho, Wo, K8) holds, for group g, the block
    ``offset_mask[..., g*3P : (g+1)*3P]``: the group's 2P offsets (x, y) as
    in :func:`dcnv3`, then its P mask values. The blocks are back to back;
    K8 is a multiple of 8 and at least G*3*P (DCNv4's module makes it
    G*3*P rounded up to a multiple of 8), and the entries past G*3*P are
    not read. No softmax. Any kernel size and any group_channels (DCNv4's
    own op takes P = 8 or 9 and group_channels a multiple of 8 only).

    Returns:
        (N, Ho, Wo, group*group_channels), as :func:`dcnv3`.
    """
    scalars = (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
               group_channels, offset_scale, im2col_step, remove_center)
    return _run_dcnv3("dcnv3_forward", dict(input=input, offset_mask=offset_mask), scalars, names)


def dcnv4_backward(
    grad_output: Any,
    input: Any,
    offset_mask: Any,
    kernel_h: int,
    kernel_w: int,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    group: int,
    group_channels: int,
    offset_scale: float = 1.0,
    im2col_step: int = 256,
    remove_center: bool = False,
    *,
    names: Mapping[str, str] | None = None,
) -> DCNv4Gradients:
    """Gradients of :func:`dcnv4` given grad_output (N, Ho, Wo, G*D).

    Returns:
        :class:`DCNv4Gradients` (input, offset_mask); offset_mask's gradient
        is packed as offset_mask, with zeros past G*3*P.
    """
    scalars = (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
               group_channels, offset_scale, im2col_step, remove_center)
    arrays = dict(grad_output=grad_output, input=input, offset_mask=offset_mask)
    grad_input, grad_offset_mask, _ = _run_dcnv3("dcnv3_backward", arrays, scalars, names)
    return DCNv4Gradients(grad_input, grad_offset_mask)
