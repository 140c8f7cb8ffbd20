"""``cudcn.paddle.dcnv3`` and ``cudcn.paddle.dcnv4``: the autograd layers and
the public functions (dygraph).

The semantics are those of :func:`cudcn.dcnv3` and :func:`cudcn.dcnv4`
(InternImage's DCNv3 and FlashInternImage's DCNv4 operators), the argument
lists those of their ``DCNv3Function`` and ``DCNv4Function``. Autograd goes
through a ``paddle.autograd.PyLayer`` whose backward is a PyLayer of its
own, so that a double backward raises cudcn's error. paddle has no such op
to emit into a static graph: building one raises
:class:`cudcn.UnsupportedError`.
"""

from __future__ import annotations

from typing import Any

import paddle
from paddle.autograd import PyLayer

import cudcn
from cudcn.dcnv3_geometry import LAYOUTS, SCALARS, DCNv3Geometry, validate_dcnv3
from cudcn.errors import UnsupportedError, double_backward_error
from cudcn.paddle._bridge import backend_context, check_tensors, stand_in, to_array, to_tensor

#: The core's forward and backward of each operator, and its name in messages.
_FUNCTIONS = {
    "dcnv3": (cudcn.dcnv3, cudcn.dcnv3_backward, "DCNv3 (cudcn.paddle.dcnv3)"),
    "dcnv4": (cudcn.dcnv4, cudcn.dcnv4_backward, "DCNv4 (cudcn.paddle.dcnv4)"),
}


def _check(tensors: dict[str, Any], scalars: tuple) -> DCNv3Geometry:
    """The core's validation, on data-less NumPy stand-ins of the tensors."""
    given = check_tensors(tensors, LAYOUTS)
    stand_ins = {name: stand_in(name, t, list(t.shape)) for name, t in given.items()}
    return validate_dcnv3(**stand_ins, **dict(zip(SCALARS, scalars)))


def _run(function, tensors: list, scalars: tuple) -> Any:
    """The core's ``function`` on the tensors' arrays, where the tensors are."""
    with backend_context(tensors[0]):
        return function(*(to_array(t) for t in tensors), *scalars)


class _Backward(PyLayer):
    """The backward, as a layer of its own: differentiating its results
    (gradients taken with ``create_graph=True``) raises cudcn's error, where
    paddle would otherwise take them for constants, silently."""

    @staticmethod
    def forward(ctx, operator, scalars, grad_output, *tensors):
        ctx.operator = operator
        grads = _run(_FUNCTIONS[operator][1], [grad_output, *tensors], scalars)
        return tuple(to_tensor(g, tensors[0].dtype) for g in grads)

    @staticmethod
    def backward(ctx, *grads):
        raise double_backward_error(_FUNCTIONS[ctx.operator][2])


class _Function(PyLayer):
    """Autograd for :func:`dcnv3` (tensors input, offset, mask) and
    :func:`dcnv4` (input, offset_mask)."""

    @staticmethod
    def forward(ctx, operator, scalars, *tensors):
        ctx.operator, ctx.scalars = operator, scalars
        # paddle wants None, not a gradient, for an input that stops gradients.
        ctx.needs_grad = [not t.stop_gradient for t in tensors]
        ctx.save_for_backward(*tensors)
        return to_tensor(_run(_FUNCTIONS[operator][0], list(tensors), scalars), tensors[0].dtype)

    @staticmethod
    def backward(ctx, grad_output):
        grads = _Backward.apply(ctx.operator, ctx.scalars, grad_output, *ctx.saved_tensor())
        return tuple(g if needed else None for g, needed in zip(grads, ctx.needs_grad))


def _apply(operator: str, tensors: dict[str, Any], scalars: tuple) -> paddle.Tensor:
    if not paddle.in_dynamic_mode():
        raise UnsupportedError(
            f"cudcn.paddle.{operator} runs in dygraph only: paddle has no {operator} op to put "
            f"into a static graph (paddle.jit.to_static, paddle.enable_static())"
        )
    _check(tensors, scalars)
    return _Function.apply(operator, scalars, *tensors.values())


@paddle.jit.not_to_static
def dcnv3(
    input: paddle.Tensor,
    offset: paddle.Tensor,
    mask: paddle.Tensor,
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
) -> paddle.Tensor:
    """DCNv3 (InternImage's operator) on paddle tensors, with autograd.

    The arguments and results of :func:`cudcn.dcnv3` (InternImage's
    ``DCNv3Function`` in its order): input (N, H, W, group*group_channels),
    offset (N, Ho, Wo, group*P*2) with (x, y) pairs and kernel points
    w-major, mask (N, Ho, Wo, group*P) applied as given; output
    (N, Ho, Wo, group*group_channels) on the input's place, in its dtype.

    Raises:
        cudcn.ArgumentTypeError, cudcn.ArgumentError: the core's message when
            an argument is wrong (TypeError / ValueError, and RuntimeError).
        cudcn.UnsupportedError: while paddle builds a static graph.
    """
    scalars = (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
               group_channels, offset_scale, im2col_step, remove_center)
    return _apply("dcnv3", {"input": input, "offset": offset, "mask": mask}, scalars)


@paddle.jit.not_to_static
def dcnv4(
    input: paddle.Tensor,
    offset_mask: paddle.Tensor,
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
) -> paddle.Tensor:
    """DCNv4 (FlashInternImage's operator) on paddle tensors, with autograd.

    :func:`dcnv3` with the offsets and mask packed in offset_mask
    (N, Ho, Wo, K8), per group 2P offsets then P mask values, the groups
    back to back, K8 a multiple of 8 and at least group*3*P (the rest is not
    read; its gradient is zero); see :func:`cudcn.dcnv4`.
    """
    scalars = (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
               group_channels, offset_scale, im2col_step, remove_center)
    return _apply("dcnv4", {"input": input, "offset_mask": offset_mask}, scalars)
