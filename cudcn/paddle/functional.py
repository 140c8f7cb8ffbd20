"""``cudcn.paddle.deform_conv2d`` and ``cudcn.paddle.ms_deform_attn``: the
autograd layers and the public functions."""

from __future__ import annotations

from typing import Any

import numpy as np
import paddle
from paddle.autograd import PyLayer

import cudcn
from cudcn.errors import ArgumentError, UnsupportedError, double_backward_error
from cudcn.geometry import Geometry, validate
from cudcn.msda_geometry import LAYOUTS as MSDA_LAYOUTS
from cudcn.msda_geometry import MSDAGeometry, validate_msda
from cudcn.paddle._bridge import (
    IntOrPair,
    backend_context,
    check_tensors,
    int_argument,
    stand_in,
    to_array,
    to_tensor,
)
from cudcn.paddle._static import static_deform_conv2d, static_shapes

#: How the core's argument names read in paddle's signature.
NAMES = {"input": "x"}

#: The shape of each tensor argument, for error messages.
LAYOUTS = {
    "x": "(N, C_in, H, W)",
    "offset": "(N, 2*deformable_groups*kh*kw, Ho, Wo)",
    "weight": "(C_out, C_in/groups, kh, kw)",
    "bias": "(C_out,)",
    "mask": "(N, deformable_groups*kh*kw, Ho, Wo)",
}

#: The tensors a call may leave out.
OPTIONAL = ("bias", "mask")


def _check(
    x: paddle.Tensor,
    offset: paddle.Tensor,
    weight: paddle.Tensor,
    bias: paddle.Tensor | None,
    mask: paddle.Tensor | None,
    stride: Any,
    padding: Any,
    dilation: Any,
    deformable_groups: Any,
    groups: Any,
) -> Geometry:
    """The core's validation, on data-less NumPy stand-ins, with paddle's names and arguments."""
    deformable_groups = int_argument(deformable_groups, "deformable_groups", 1)
    groups = int_argument(groups, "groups", 1)
    tensors = {"x": x, "offset": offset, "weight": weight, "bias": bias, "mask": mask}
    given = check_tensors(tensors, LAYOUTS, OPTIONAL)
    shapes = {name: list(t.shape) for name, t in given.items()}
    if not paddle.in_dynamic_mode():
        shapes = static_shapes(shapes, stride, padding, dilation, deformable_groups, groups)
    stand_ins: dict[str, Any] = {name: stand_in(name, t, shapes[name]) for name, t in given.items()}
    stand_ins["input"] = stand_ins.pop("x")
    geom = validate(
        **stand_ins, stride=stride, padding=padding, dilation=dilation, names=NAMES
    )
    if deformable_groups != geom.offset_groups:
        raise ArgumentError(
            f"offset.shape[1] must be 2*deformable_groups*kh*kw = "
            f"{2 * deformable_groups * geom.kernel_points} (deformable_groups = "
            f"{deformable_groups}, kernel {geom.kernel_h}x{geom.kernel_w}), got {offset.shape[1]}"
        )
    if groups != geom.groups:
        raise ArgumentError(
            f"weight.shape[1] must be x.shape[1] / groups = {geom.in_channels} / "
            f"{groups} (groups = {groups}), got {weight.shape[1]}"
        )
    return geom


# --------------------------------------------------------------------------
# The op wrappers and the autograd layer
# --------------------------------------------------------------------------


def _forward(x, offset, weight, bias, mask, stride, padding, dilation) -> paddle.Tensor:
    """Output (N, C_out, Ho, Wo) from the core's forward."""
    with backend_context(x):
        arrays = [to_array(t) for t in (x, offset, weight, bias, mask)]
        out = cudcn.deform_conv2d(
            *arrays[:4], stride=stride, padding=padding, dilation=dilation,
            mask=arrays[4], names=NAMES,
        )
        return to_tensor(out, x.dtype)


def _backward(grad_out, x, offset, weight, bias, mask, stride, padding, dilation) -> cudcn.Gradients:
    """Gradients (input, offset, weight, bias, mask) from the core's backward."""
    with backend_context(x):
        arrays = [to_array(t) for t in (grad_out, x, offset, weight, bias, mask)]
        grads = cudcn.deform_conv2d_backward(
            *arrays[:5], stride=stride, padding=padding, dilation=dilation,
            mask=arrays[5], names=NAMES,
        )
        return cudcn.Gradients(*(None if g is None else to_tensor(g, x.dtype) for g in grads))


class _DeformConv2dBackward(PyLayer):
    """The backward, as a layer of its own: its gradients, taken with
    ``create_graph=True``, then lead back here when they are differentiated
    again, and that raises cudcn's error. (Were they plain results, paddle
    would take them for constants and give no second derivative, silently.)"""

    @staticmethod
    def forward(ctx, grad_out, x, offset, weight, bias, mask, conv_args):
        return tuple(_backward(grad_out, x, offset, weight, bias, mask, *conv_args))

    @staticmethod
    def backward(ctx, *grads):
        raise double_backward_error("deformable convolution (cudcn.paddle.deform_conv2d)")


class _DeformConv2dFunction(PyLayer):
    """Autograd for :func:`deform_conv2d`; bias and mask may be None."""

    @staticmethod
    def forward(ctx, x, offset, weight, bias, mask, conv_args):
        ctx.conv_args = conv_args
        ctx.has_bias, ctx.has_mask = bias is not None, mask is not None
        tensors = [t for t in (x, offset, weight, bias, mask) if t is not None]
        # paddle wants None, not a gradient, for an input that stops gradients.
        ctx.needs_grad = [not t.stop_gradient for t in tensors]
        ctx.save_for_backward(*tensors)
        return _forward(x, offset, weight, bias, mask, *conv_args)

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensor())
        x, offset, weight = saved[:3]
        bias = saved.pop(3) if ctx.has_bias else None
        mask = saved[3] if ctx.has_mask else None
        grads = _DeformConv2dBackward.apply(grad_out, x, offset, weight, bias, mask, ctx.conv_args)
        present = [g for g, given in zip(grads, (True, True, True, ctx.has_bias, ctx.has_mask)) if given]
        return tuple(g if needed else None for g, needed in zip(present, ctx.needs_grad))


# --------------------------------------------------------------------------
# The public function
# --------------------------------------------------------------------------


# Not rewritten by paddle.jit.to_static: the checks run as plain Python while
# the graph is built, and the function then emits paddle's op.
@paddle.jit.not_to_static
def deform_conv2d(
    x: paddle.Tensor,
    offset: paddle.Tensor,
    weight: paddle.Tensor,
    bias: paddle.Tensor | None = None,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    deformable_groups: int = 1,
    groups: int = 1,
    mask: paddle.Tensor | None = None,
    name: str | None = None,
) -> paddle.Tensor:
    """Deformable convolution (DCNv1, or DCNv2 when a mask is given).

    ``paddle.vision.ops.deform_conv2d``'s signature and results. In
    deformable group g, channel ``g*2*kh*kw + 2*k`` of ``offset`` is the row
    shift and the next one the column shift of kernel point ``k = i*kw + j``.
    While paddle builds a static graph this emits paddle's own op (see the
    module's docstring).

    Args:
        x: (N, C_in, H, W).
        offset: (N, 2*deformable_groups*kh*kw, Ho, Wo).
        weight: (C_out, C_in/groups, kh, kw).
        bias: (C_out,) or None.
        stride, padding, dilation: int or (rows, columns).
        deformable_groups: offset groups, an int; must agree with
            offset.shape[1]. C_in must be divisible by it (C_out need not be,
            except in a static graph).
        groups: convolution groups, an int; must agree with C_in / weight.shape[1].
        mask: (N, deformable_groups*kh*kw, Ho, Wo) modulation, or None for DCNv1.
        name: unused; paddle's signature has it.

    Returns:
        (N, C_out, Ho, Wo), ``Ho = (H + 2*pad_h - dil_h*(kh-1) - 1) // stride_h + 1``
        (likewise Wo), on x's place, in x's dtype.

    Raises:
        cudcn.ArgumentTypeError (a TypeError): a tensor is None or not a
            tensor, a dtype is wrong, or groups/deformable_groups is not an int.
        cudcn.ArgumentError (a ValueError): a shape or size is wrong, or
            deformable_groups or groups disagree with the shapes.
        Both are RuntimeErrors too.
    """
    geom = _check(x, offset, weight, bias, mask, stride, padding, dilation, deformable_groups, groups)
    if not paddle.in_dynamic_mode():
        return static_deform_conv2d(x, offset, weight, bias, mask, geom)
    return _DeformConv2dFunction.apply(x, offset, weight, bias, mask, (stride, padding, dilation))


# ==========================================================================
# Multi-scale deformable attention
# ==========================================================================

def _host_levels(spatial_shapes: Any, level_start_index: Any) -> tuple[Any, Any]:
    """The level arguments on the host: a tensor read into a NumPy array (for
    a GPU tensor, a copy that waits for the GPU), ints as a NumPy array
    (level_start_index None: implied by the shapes)."""
    def host(t: Any) -> Any:
        if isinstance(t, paddle.Tensor):
            return to_array(t.cpu())
        return t if t is None else np.asarray(t)

    shapes = host(spatial_shapes)
    if level_start_index is None and isinstance(shapes, np.ndarray) and shapes.ndim == 2 and shapes.dtype.kind in "iu":
        sizes = shapes[:, 0].astype(np.int64) * shapes[:, 1]
        return shapes, np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    return shapes, host(level_start_index)


def _check_msda(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step,
                grad_output=None) -> MSDAGeometry:
    """The core's validation, on stand-ins of the floating tensors and the levels on the host."""
    tensors = {"value": value, "sampling_locations": sampling_locations, "attention_weights": attention_weights}
    if grad_output is not None:
        tensors["grad_output"] = grad_output
    given = check_tensors(tensors, MSDA_LAYOUTS)
    return validate_msda(
        **{name: stand_in(name, t, list(t.shape)) for name, t in given.items()},
        spatial_shapes=spatial_shapes, level_start_index=level_start_index, im2col_step=im2col_step,
    )


def _msda_arrays(geom: MSDAGeometry) -> tuple[np.ndarray, np.ndarray]:
    """spatial_shapes and level_start_index for the core, from a checked call."""
    return np.array(geom.shapes, dtype=np.int64).reshape(-1, 2), np.array(geom.starts, dtype=np.int64)


class _MSDeformAttnBackward(PyLayer):
    """The backward as a layer of its own, so that differentiating its
    gradients raises cudcn's error (see _DeformConv2dBackward)."""

    @staticmethod
    def forward(ctx, grad_out, value, sampling_locations, attention_weights, geom):
        with backend_context(value):
            grads = cudcn.ms_deform_attn_backward(
                to_array(grad_out), to_array(value), *_msda_arrays(geom),
                to_array(sampling_locations), to_array(attention_weights),
            )
            return tuple(to_tensor(g, value.dtype) for g in grads)

    @staticmethod
    def backward(ctx, *grads):
        raise double_backward_error("multi-scale deformable attention (cudcn.paddle.ms_deform_attn)")


class _MSDeformAttnFunction(PyLayer):
    """Autograd for :func:`ms_deform_attn`: gradients for value,
    sampling_locations and attention_weights."""

    @staticmethod
    def forward(ctx, value, sampling_locations, attention_weights, geom):
        ctx.geom = geom
        tensors = (value, sampling_locations, attention_weights)
        ctx.needs_grad = [not t.stop_gradient for t in tensors]
        ctx.save_for_backward(*tensors)
        with backend_context(value):
            out = cudcn.ms_deform_attn(
                to_array(value), *_msda_arrays(geom), to_array(sampling_locations), to_array(attention_weights)
            )
            return to_tensor(out, value.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        value, sampling_locations, attention_weights = ctx.saved_tensor()
        grads = _MSDeformAttnBackward.apply(grad_out, value, sampling_locations, attention_weights, ctx.geom)
        return tuple(g if needed else None for g, needed in zip(grads, ctx.needs_grad))


@paddle.jit.not_to_static
def ms_deform_attn(
    value: paddle.Tensor,
    spatial_shapes: Any,
    level_start_index: Any,
    sampling_locations: paddle.Tensor,
    attention_weights: paddle.Tensor,
    im2col_step: int = 64,
    name: str | None = None,
) -> paddle.Tensor:
    """Multi-scale deformable attention (Deformable DETR's MSDeformAttn core).

    :func:`cudcn.torch.ms_deform_attn` for paddle: the same arguments (in
    Deformable DETR's order), semantics and gradients.

    Args:
        value: (N, S, M, D), S = sum of H_l*W_l.
        spatial_shapes: the (H_l, W_l) of the L levels: an integer tensor
            (L, 2), read on the host once per call (for a GPU tensor, a copy
            that waits for the GPU), or a sequence of pairs of ints.
        level_start_index: (L,) integer tensor or ints, the first pixel of
            each level (checked), or None (implied by the shapes).
        sampling_locations: (N, Lq, M, L, P, 2), normalised (x, y).
        attention_weights: (N, Lq, M, L, P), applied as given.
        im2col_step: accepted and ignored (a positive int).
        name: unused; paddle's signatures have it.

    Returns:
        (N, Lq, M*D) on value's place, in its dtype. value,
        sampling_locations and attention_weights share one dtype (paddle's
        automatic mixed precision does not cast for this function).

    Gradients flow to value, sampling_locations and attention_weights.
    Dygraph only: in a static graph (``paddle.jit.to_static``) it raises
    cudcn.UnsupportedError.
    """
    if not paddle.in_dynamic_mode():
        raise UnsupportedError(
            "cudcn.paddle.ms_deform_attn runs in dygraph mode only; a static graph "
            "(paddle.jit.to_static, paddle.enable_static()) has no MSDA op to emit"
        )
    geom = _check_msda(value, *_host_levels(spatial_shapes, level_start_index), sampling_locations,
                       attention_weights, im2col_step)
    return _MSDeformAttnFunction.apply(value, sampling_locations, attention_weights, geom)
