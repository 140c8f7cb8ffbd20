"""``cudcn.torch.dcnv3`` and ``cudcn.torch.dcnv4``: the custom ops, their
fake implementations and autograd, and the public functions.

The pattern of :mod:`cudcn.torch.functional`, for InternImage's DCNv3 and
FlashInternImage's DCNv4 operators (the semantics: :func:`cudcn.dcnv3`):

- ops ``cudcn::dcnv3(input, offset, mask, <scalars>)`` and
  ``cudcn::dcnv4(input, offset_mask, <scalars>)``, where <scalars> are
  DCNv3Function's kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
  dilation_h, dilation_w, group, group_channels (ints), offset_scale (a
  float), im2col_step (an int) and remove_center (a bool), in that order;
- their backward ops ``cudcn::dcnv3_backward`` and ``cudcn::dcnv4_backward``
  (grad_output first, cudcn's settings at the forward last), which refuse a
  double backward;
- fake implementations that run the core's validation on stand-ins when
  every size is known, so torch.compile (fullgraph) and torch.export (a
  dynamic batch included) capture the ops whole.

The modules (InternImage's ``DCNv3`` and DCNv4's ``DCNv4``) are built on
:func:`dcnv3` and :func:`dcnv4`; the ops' argument lists are
DCNv3Function's and DCNv4Function's, so an exporter can map them one to one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

import cudcn
from cudcn.dcnv3_geometry import SCALARS, DCNv3Geometry, validate_dcnv3
from cudcn.errors import double_backward_error
from cudcn.geometry import output_size
from cudcn.torch._bridge import (
    autocast,
    backend_context,
    backward_settings,
    check_tensors,
    is_static,
    settings_at_forward,
    stand_ins,
    to_array,
    to_tensor,
)


def _as_op_arguments(geom: DCNv3Geometry, scalars: tuple) -> tuple:
    """The checked scalars as the ops' schema types (ints, a float, a bool):
    NumPy ints, an int offset_scale or remove_center 0/1 are fine to pass."""
    ints = [int(v) for v in scalars[:10]]
    return (*ints, geom.offset_scale, int(scalars[11]), geom.remove_center)


def _check(tensors: dict[str, Tensor], scalars: tuple) -> DCNv3Geometry:
    """The core's validation on data-less NumPy stand-ins of the tensors
    (DCNv3: input, offset, mask; DCNv4: input, offset_mask; grad_output
    when a backward's), before any data moves, also under torch.compile."""
    return validate_dcnv3(**stand_ins(tensors), **dict(zip(SCALARS, scalars)))


def _run(function, tensors: dict[str, Tensor], scalars: tuple) -> Any:
    """The core's ``function`` on the tensors' arrays, where the tensors are."""
    check_tensors(tensors)
    first = tensors["input"]
    with backend_context(first):
        return function(*(to_array(t) for t in tensors.values()), *scalars)


def _fake_output(input: Tensor, offset: Tensor, scalars: tuple) -> Tensor:
    """(N, Ho, Wo, C) for the fake implementations (sizes may be symbolic)."""
    kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w = scalars[:8]
    out_h = output_size(input.shape[1], kernel_h, stride_h, pad_h, dilation_h)
    out_w = output_size(input.shape[2], kernel_w, stride_w, pad_w, dilation_w)
    return input.new_empty((input.shape[0], out_h, out_w, input.shape[3]))


def _contiguous_like(t: Tensor) -> Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------
# The custom ops
# --------------------------------------------------------------------------


@torch.library.custom_op("cudcn::dcnv3", mutates_args=())
def _dcnv3_op(
    input: Tensor, offset: Tensor, mask: Tensor, kernel_h: int, kernel_w: int, stride_h: int, stride_w: int,
    pad_h: int, pad_w: int, dilation_h: int, dilation_w: int, group: int, group_channels: int,
    offset_scale: float, im2col_step: int, remove_center: bool,
) -> Tensor:
    """Output (N, Ho, Wo, G*D) from the core's :func:`cudcn.dcnv3`."""
    scalars = (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
               group_channels, offset_scale, im2col_step, remove_center)
    out = _run(cudcn.dcnv3, {"input": input, "offset": offset, "mask": mask}, scalars)
    return to_tensor(out, input.dtype)


@_dcnv3_op.register_fake
def _dcnv3_fake(input, offset, mask, *scalars):
    if is_static(input, offset, mask):
        _check({"input": input, "offset": offset, "mask": mask}, scalars)
    return _fake_output(input, offset, scalars)


@torch.library.custom_op("cudcn::dcnv3_backward", mutates_args=())
def _dcnv3_backward_op(
    grad_output: Tensor, input: Tensor, offset: Tensor, mask: Tensor, kernel_h: int, kernel_w: int,
    stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int, dilation_w: int, group: int,
    group_channels: int, offset_scale: float, im2col_step: int, remove_center: bool,
    deterministic: bool, tf32: bool = False, algorithm: str = "", workspace_bytes: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (input, offset, mask) from the core's :func:`cudcn.dcnv3_backward`,
    under cudcn's settings at the forward (:func:`~cudcn.torch._bridge.backward_settings`)."""
    scalars = (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
               group_channels, offset_scale, im2col_step, remove_center)
    tensors = {"grad_output": grad_output, "input": input, "offset": offset, "mask": mask}
    with backward_settings(deterministic, tf32, algorithm, workspace_bytes):
        grads = _run(cudcn.dcnv3_backward, tensors, scalars)
    return tuple(to_tensor(g, input.dtype) for g in grads)


@_dcnv3_backward_op.register_fake
def _dcnv3_backward_fake(grad_output, input, offset, mask, *scalars_and_settings):
    scalars = scalars_and_settings[:len(SCALARS)]
    if is_static(grad_output, input, offset, mask):
        _check({"grad_output": grad_output, "input": input, "offset": offset, "mask": mask}, scalars)
    return _contiguous_like(input), _contiguous_like(offset), _contiguous_like(mask)


@torch.library.custom_op("cudcn::dcnv4", mutates_args=())
def _dcnv4_op(
    input: Tensor, offset_mask: Tensor, kernel_h: int, kernel_w: int, stride_h: int, stride_w: int,
    pad_h: int, pad_w: int, dilation_h: int, dilation_w: int, group: int, group_channels: int,
    offset_scale: float, im2col_step: int, remove_center: bool,
) -> Tensor:
    """Output (N, Ho, Wo, G*D) from the core's :func:`cudcn.dcnv4`."""
    scalars = (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
               group_channels, offset_scale, im2col_step, remove_center)
    out = _run(cudcn.dcnv4, {"input": input, "offset_mask": offset_mask}, scalars)
    return to_tensor(out, input.dtype)


@_dcnv4_op.register_fake
def _dcnv4_fake(input, offset_mask, *scalars):
    if is_static(input, offset_mask):
        _check({"input": input, "offset_mask": offset_mask}, scalars)
    return _fake_output(input, offset_mask, scalars)


@torch.library.custom_op("cudcn::dcnv4_backward", mutates_args=())
def _dcnv4_backward_op(
    grad_output: Tensor, input: Tensor, offset_mask: Tensor, kernel_h: int, kernel_w: int, stride_h: int,
    stride_w: int, pad_h: int, pad_w: int, dilation_h: int, dilation_w: int, group: int, group_channels: int,
    offset_scale: float, im2col_step: int, remove_center: bool,
    deterministic: bool, tf32: bool = False, algorithm: str = "", workspace_bytes: int = 0,
) -> tuple[Tensor, Tensor]:
    """Gradients (input, offset_mask) from the core's :func:`cudcn.dcnv4_backward`;
    offset_mask's is zero past G*3*P."""
    scalars = (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
               group_channels, offset_scale, im2col_step, remove_center)
    tensors = {"grad_output": grad_output, "input": input, "offset_mask": offset_mask}
    with backward_settings(deterministic, tf32, algorithm, workspace_bytes):
        grads = _run(cudcn.dcnv4_backward, tensors, scalars)
    return tuple(to_tensor(g, input.dtype) for g in grads)


@_dcnv4_backward_op.register_fake
def _dcnv4_backward_fake(grad_output, input, offset_mask, *scalars_and_settings):
    scalars = scalars_and_settings[:len(SCALARS)]
    if is_static(grad_output, input, offset_mask):
        _check({"grad_output": grad_output, "input": input, "offset_mask": offset_mask}, scalars)
    return _contiguous_like(input), _contiguous_like(offset_mask)


# --------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------


def _setup_context(ctx, inputs, output) -> None:
    """DCNv3's (input, offset, mask) or DCNv4's (input, offset_mask), then the scalars."""
    tensors = len(inputs) - len(SCALARS)
    ctx.save_for_backward(*inputs[:tensors])
    ctx.scalars = inputs[tensors:]
    ctx.settings = settings_at_forward()  # here, in the caller's thread


def _dcnv3_backward(ctx, grad_output: Tensor):
    grads = _dcnv3_backward_op(grad_output, *ctx.saved_tensors, *ctx.scalars, *ctx.settings)
    return (*grads, *(None,) * len(SCALARS))


def _dcnv4_backward(ctx, grad_output: Tensor):
    grads = _dcnv4_backward_op(grad_output, *ctx.saved_tensors, *ctx.scalars, *ctx.settings)
    return (*grads, *(None,) * len(SCALARS))


torch.library.register_autograd("cudcn::dcnv3", _dcnv3_backward, setup_context=_setup_context)
torch.library.register_autograd("cudcn::dcnv4", _dcnv4_backward, setup_context=_setup_context)


def _no_dcnv3_double_backward(ctx, *grads):
    raise double_backward_error("DCNv3 (cudcn.torch.dcnv3)")


def _no_dcnv4_double_backward(ctx, *grads):
    raise double_backward_error("DCNv4 (cudcn.torch.dcnv4)")


# Gradients taken with create_graph=True are fine; differentiating them
# again reaches these, and says so, instead of torch's "no autograd formula".
torch.library.register_autograd("cudcn::dcnv3_backward", _no_dcnv3_double_backward)
torch.library.register_autograd("cudcn::dcnv4_backward", _no_dcnv4_double_backward)


# --------------------------------------------------------------------------
# The public functions
# --------------------------------------------------------------------------


def dcnv3(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
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
) -> Tensor:
    """DCNv3 (InternImage's operator) on torch tensors, with autograd.

    InternImage's ``DCNv3Function.apply`` arguments in its order, and its CUDA
    op's results (see :func:`cudcn.dcnv3` for the formula): channels-last,
    kernel points w-major, offsets (x, y), the mask applied as given (the
    DCNv3 module's softmax is the module's).

    Args:
        input: (N, H, W, group*group_channels).
        offset: (N, Ho, Wo, group*P*2), P = kernel_h*kernel_w - remove_center.
        mask: (N, Ho, Wo, group*P).
        kernel_h .. remove_center: as :func:`cudcn.dcnv3` (any kernel size,
            any group_channels; im2col_step is accepted and ignored).

    Returns:
        (N, Ho, Wo, group*group_channels) on the input's device, in its dtype
        (or the autocast dtype: under ``torch.autocast`` float16/bfloat16/
        float32 tensors are cast to it, float64 is left alone).

    Raises:
        cudcn.ArgumentTypeError, cudcn.ArgumentError: the core's message when
            an argument is wrong (TypeError / ValueError, and RuntimeError).

    CUDA tensors run on torch's current stream (once the CUDA backend has
    DCNv3 kernels); CPU tensors run on the NumPy backend. Double backward is
    not supported (:class:`cudcn.UnsupportedError`).
    """
    scalars = (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
               group_channels, offset_scale, im2col_step, remove_center)
    if isinstance(input, Tensor):
        input, offset, mask = autocast(input.device.type, [input, offset, mask])
    if not torch.compiler.is_compiling():
        # Report wrong arguments as the user wrote them; under torch.compile
        # the fake implementation checks instead.
        scalars = _as_op_arguments(_check({"input": input, "offset": offset, "mask": mask}, scalars), scalars)
    return _dcnv3_op(input, offset, mask, *scalars)


def dcnv4(
    input: Tensor,
    offset_mask: Tensor,
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
) -> Tensor:
    """DCNv4 (FlashInternImage's operator) on torch tensors, with autograd.

    DCNv4's ``DCNv4Function.apply`` arguments in its order: :func:`dcnv3`
    with the offsets and mask packed in ``offset_mask`` (N, Ho, Wo, K8), per
    group 2P offsets (x, y) then P mask values, the groups back to back, K8
    a multiple of 8 and at least group*3*P; the entries past group*3*P are
    not read, and their gradient is zero. No softmax. Any kernel size and
    any group_channels, float16, bfloat16 (forward and backward), float32
    and float64.

    Returns:
        (N, Ho, Wo, group*group_channels), as :func:`dcnv3`.
    """
    scalars = (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
               group_channels, offset_scale, im2col_step, remove_center)
    if isinstance(input, Tensor):
        input, offset_mask = autocast(input.device.type, [input, offset_mask])
    if not torch.compiler.is_compiling():
        scalars = _as_op_arguments(_check({"input": input, "offset_mask": offset_mask}, scalars), scalars)
    return _dcnv4_op(input, offset_mask, *scalars)
