"""``cudcn.torch.deform_conv2d``: the custom ops, their fake implementations
and autograd, the eager autograd.Function, and the public function.

The pattern for an operator family: a forward op and a backward op
(``torch.library.custom_op``), each checking its tensors and running the
backend inside :func:`~cudcn.torch._bridge.backend_context`; fake
implementations that run the core's validation on stand-ins; autograd that
saves :func:`~cudcn.torch._bridge.settings_at_forward` for the backward op;
and a public function that applies autocast, checks the call as the user
wrote it and calls the forward op -- or, in plain eager calls
(:func:`~cudcn.torch._bridge.eager`), an ``autograd.Function`` that runs
the same forward and backward without ``torch.library``'s dispatch and
hands the forward's geometry to its backward.

One validation per call: :func:`_check` keeps each signature's geometry
(:func:`~cudcn.torch._bridge.signature`), so that the public function, the
op's implementation and its fake one check a signature once, and the
backends run that geometry without checking again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

import cudcn
from cudcn import backends
from cudcn.errors import double_backward_error
from cudcn.geometry import Geometry, SignatureCache, output_size, validate
from cudcn.torch._bridge import (
    ForwardSettings,
    IntOrPair,
    as_list,
    autocast,
    backend_context,
    backend_geometry,
    backward_settings,
    check_tensors,
    eager,
    is_static,
    script_list,
    settings_at_forward,
    signature,
    stand_ins,
    tf32_setting,
    to_array,
    to_tensor,
)

#: The tensors a call may leave out.
OPTIONAL = ("bias", "mask")

#: Geometries of the calls checked so far, by :func:`signature`.
_geometries = SignatureCache()


def _check(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    mask: Tensor | None,
    stride: Any,
    padding: Any,
    dilation: Any,
    grad_output: Tensor | None = None,
) -> Geometry:
    """The core's validation, on data-less NumPy stand-ins of the tensors,
    once per signature; the geometry is that of the backend the tensors'
    device runs (:func:`~cudcn.torch._bridge.backend_geometry`).

    Gives the core's error messages before any data moves, also while
    torch.compile traces with fake tensors. A backward's call (with
    ``grad_output``) has the forward's geometry.
    """
    key = signature((input, offset, weight, bias, mask, grad_output), (stride, padding, dilation))
    found = None if key is None else _geometries.get(key)
    if found is not None:
        return found
    tensors = {"input": input, "offset": offset, "weight": weight, "bias": bias, "mask": mask}
    if grad_output is not None:  # a backward's
        tensors["grad_output"] = grad_output
    geom = validate(**stand_ins(tensors, OPTIONAL), stride=stride, padding=padding, dilation=dilation)
    geom = backend_geometry(geom, input)
    if key is not None:
        _geometries.put(key, geom)
    return geom


def _run_forward(geom: Geometry, input: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None,
             mask: Tensor | None) -> Tensor:
    """Output (N, C_out, Ho, Wo): the backend's forward of a checked call."""
    with backend_context(input), tf32_setting(cudcn.is_tf32_enabled()):
        arrays = [to_array(t) for t in (input, offset, weight, bias, mask)]
        out = backends.load(geom.kind).forward(geom, *arrays)
        return to_tensor(out, input.dtype)


def _run_backward(geom: Geometry, settings: ForwardSettings, grad_output: Tensor, input: Tensor, offset: Tensor,
              weight: Tensor, mask: Tensor | None) -> tuple[Tensor | None, ...]:
    """Gradients (input, offset, weight, bias or None, mask or None): the
    backend's backward of a checked call, under the forward's settings."""
    with backend_context(input), backward_settings(*settings):
        arrays = [to_array(t) for t in (grad_output, input, offset, weight, mask)]
        grads = backends.load(geom.kind).backward(geom, *arrays)
        return tuple(None if g is None else to_tensor(g, input.dtype) for g in grads)


# --------------------------------------------------------------------------
# The custom ops
# --------------------------------------------------------------------------


@torch.library.custom_op("cudcn::deform_conv2d", mutates_args=())
def _deform_conv2d_op(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    mask: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> Tensor:
    """Output (N, C_out, Ho, Wo) from the backend's forward."""
    geom = _check(input, offset, weight, bias, mask, stride, padding, dilation)
    return _run_forward(geom, input, offset, weight, bias, mask)


@_deform_conv2d_op.register_fake
def _deform_conv2d_fake(input, offset, weight, bias, mask, stride, padding, dilation):
    if is_static(input, offset, weight, bias, mask):
        _check(input, offset, weight, bias, mask, stride, padding, dilation)
    out_h, out_w = (
        output_size(input.shape[2 + i], weight.shape[2 + i], stride[i], padding[i], dilation[i]) for i in range(2)
    )
    return input.new_empty((input.shape[0], weight.shape[0], out_h, out_w))


@torch.library.custom_op("cudcn::deform_conv2d_backward", mutates_args=())
def _deform_conv2d_backward_op(
    grad_output: Tensor,
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    mask: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    deterministic: bool,
    tf32: bool = False,
    algorithm: str = "",
    workspace_bytes: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (input, offset, weight, bias, mask) from the core's backward.

    The bias and mask gradients are empty tensors of shape (0,) when the call
    had no bias or no mask (a custom op cannot return None). ``deterministic``
    asks for the bitwise-repeatable path (as does
    torch.use_deterministic_algorithms(True)); ``tf32`` lets float32 GEMMs
    use TF32 (as does torch's float32 matmul precision); ``algorithm`` and
    ``workspace_bytes`` are cudcn's settings at the forward ("" and 0: this
    thread's own).
    """
    geom = _check(input, offset, weight, bias, mask, stride, padding, dilation, grad_output)
    settings = ForwardSettings(deterministic, tf32, algorithm, workspace_bytes)
    grads = _run_backward(geom, settings, grad_output, input, offset, weight, mask)
    return tuple(input.new_empty(0) if g is None else g for g in grads)


@_deform_conv2d_backward_op.register_fake
def _deform_conv2d_backward_fake(grad_output, input, offset, weight, bias, mask, stride, padding, dilation,
                                 deterministic, tf32=False, algorithm="", workspace_bytes=0):
    if is_static(grad_output, input, offset, weight, bias, mask):
        _check(input, offset, weight, bias, mask, stride, padding, dilation, grad_output)
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format),
        torch.empty_like(offset, memory_format=torch.contiguous_format),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        input.new_empty(0) if bias is None else torch.empty_like(bias),
        input.new_empty(0) if mask is None else torch.empty_like(mask, memory_format=torch.contiguous_format),
    )


# --------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------


def _setup_context(ctx, inputs, output) -> None:
    input, offset, weight, bias, mask, stride, padding, dilation = inputs
    ctx.save_for_backward(input, offset, weight, bias, mask)
    ctx.conv_args = (stride, padding, dilation)
    ctx.settings = settings_at_forward()  # here, in the caller's thread


def _backward(ctx, grad_output: Tensor):
    input, offset, weight, bias, mask = ctx.saved_tensors
    g_input, g_offset, g_weight, g_bias, g_mask = _deform_conv2d_backward_op(
        grad_output, input, offset, weight, bias, mask, *ctx.conv_args, *ctx.settings
    )
    return (
        g_input,
        g_offset,
        g_weight,
        None if bias is None else g_bias,
        None if mask is None else g_mask,
        None,
        None,
        None,
    )


torch.library.register_autograd("cudcn::deform_conv2d", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise double_backward_error("deformable convolution (cudcn.torch.deform_conv2d)")


# Gradients taken with create_graph=True are fine; differentiating them again
# reaches this, and says so, instead of torch's "no autograd formula".
torch.library.register_autograd("cudcn::deform_conv2d_backward", _no_double_backward)


class _DeformConv2dFunction(torch.autograd.Function):
    """Plain eager calls (:func:`~cudcn.torch._bridge.eager`): the op's
    forward and backward without ``torch.library``'s dispatch, the forward's
    geometry handed to the backward (no second validation)."""

    @staticmethod
    def forward(ctx, geom: Geometry, input, offset, weight, bias, mask):
        out = _run_forward(geom, input, offset, weight, bias, mask)
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(input, offset, weight, bias, mask)
            ctx.geom = geom
            ctx.settings = settings_at_forward()  # here, in the caller's thread
        return out

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        input, offset, weight, bias, mask = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: through the backward op, whose own backward
            # says that double backward is not supported.
            geom = ctx.geom
            conv_args = ([geom.stride_h, geom.stride_w], [geom.pad_h, geom.pad_w], [geom.dil_h, geom.dil_w])
            grads = _deform_conv2d_backward_op(grad_output, input, offset, weight, bias, mask, *conv_args,
                                               *ctx.settings)
            grads = [g if present else None for g, present in zip(grads, (True, True, True, bias is not None,
                                                                          mask is not None))]
        else:
            grads = _run_backward(ctx.geom, ctx.settings, grad_output, input, offset, weight, mask)
        return (None, *grads)


# --------------------------------------------------------------------------
# The public function
# --------------------------------------------------------------------------


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    mask: Tensor | None = None,
) -> Tensor:
    """Deformable convolution (DCNv1, or DCNv2 when a mask is given).

    ``torchvision.ops.deform_conv2d``'s signature and results. In offset group
    g, channel ``g*2*kh*kw + 2*k`` of ``offset`` is the row shift and the next
    one the column shift of kernel point ``k = i*kw + j``.

    Args:
        input: (N, C_in, H, W).
        offset: (N, 2*offset_groups*kh*kw, Ho, Wo).
        weight: (C_out, C_in/groups, kh, kw); groups = C_in / weight.shape[1].
        bias: (C_out,) or None.
        stride, padding, dilation: int or (rows, columns).
        mask: (N, offset_groups*kh*kw, Ho, Wo) modulation, or None for DCNv1.

    Returns:
        (N, C_out, Ho, Wo), ``Ho = (H + 2*pad_h - dil_h*(kh-1) - 1) // stride_h + 1``
        (likewise Wo), on the input's device, in its dtype (or the autocast dtype).

    Raises:
        cudcn.ArgumentTypeError, cudcn.ArgumentError: the core's message when
            an argument is wrong (TypeError / ValueError, and RuntimeError).

    With ``torch.use_deterministic_algorithms(True)`` the backward is bitwise
    repeatable on CUDA too (a sorted, atomic-free input gradient).

    CUDA tensors run on torch's current stream; CPU tensors run on the NumPy
    backend. All tensors must be on one device.

    TorchScript compiles this function (and the modules) to a call of the op
    ``torch.ops.cudcn.deform_conv2d``, whose implementation checks the
    arguments as here; a scripted call does not apply autocast.
    """
    if torch.jit.is_scripting():
        return torch.ops.cudcn.deform_conv2d(
            input, offset, weight, bias, mask,
            script_list(stride), script_list(padding), script_list(dilation),
        )
    if isinstance(input, Tensor):
        tensors = autocast(input.device.type, [input, offset, weight, bias, mask])
        input, offset, weight, bias, mask = tensors
    if not torch.compiler.is_compiling():
        # Report wrong arguments as the user wrote them (the op sees lists);
        # under torch.compile the fake implementation checks instead.
        geom = _check(input, offset, weight, bias, mask, stride, padding, dilation)
        if eager((input, offset, weight, bias, mask)):
            return _DeformConv2dFunction.apply(geom, input, offset, weight, bias, mask)
    return _deform_conv2d_op(
        input, offset, weight, bias, mask,
        as_list(stride), as_list(padding), as_list(dilation),
    )
