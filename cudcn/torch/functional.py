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

import numpy as np
import torch
from torch import Tensor

import cudcn
from cudcn import backends
from cudcn.errors import ArgumentError, ArgumentTypeError, double_backward_error
from cudcn.geometry import Geometry, SignatureCache, check_ndim, output_size, validate
from cudcn.msda_geometry import LAYOUTS as MSDA_LAYOUTS
from cudcn.msda_geometry import MSDAGeometry, validate_msda
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
    same_memory,
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
             mask: Tensor | None, arrays: list | None = None) -> Tensor:
    """Output (N, C_out, Ho, Wo): the backend's forward of a checked call.
    ``arrays``, a list, receives the arrays the backend was handed."""
    with backend_context(input), tf32_setting(cudcn.is_tf32_enabled()):
        handed = [to_array(t) for t in (input, offset, weight, bias, mask)]
        out = backends.load(geom.kind).forward(geom, *handed)
        if arrays is not None:
            arrays += handed
        return to_tensor(out, input.dtype)


def _run_backward(geom: Geometry, settings: ForwardSettings, grad_output: Tensor, input: Tensor, offset: Tensor,
              weight: Tensor, mask: Tensor | None, arrays: Sequence[Any] | None = None) -> tuple[Tensor | None, ...]:
    """Gradients (input, offset, weight, bias or None, mask or None): the
    backend's backward of a checked call, under the forward's settings.
    ``arrays``: (input, offset, weight, mask) as arrays already, else made
    from the tensors."""
    with backend_context(input), backward_settings(*settings):
        if arrays is None:
            arrays = [to_array(t) for t in (input, offset, weight, mask)]
        grads = backends.load(geom.kind).backward(geom, to_array(grad_output), *arrays)
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
        arrays: list = []
        out = _run_forward(geom, input, offset, weight, bias, mask, arrays)
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(input, offset, weight, bias, mask)
            ctx.geom = geom
            ctx.settings = settings_at_forward()  # here, in the caller's thread
            # The forward's arrays, where they are the tensors' own memory
            # (no copy is held): the backward need not convert them again.
            # saved_tensors still guards against in-place changes.
            tensors = (input, offset, weight, mask)
            ctx.arrays = arrays[:3] + arrays[4:] if all(map(same_memory, tensors)) else None
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
            grads = _run_backward(ctx.geom, ctx.settings, grad_output, input, offset, weight, mask, ctx.arrays)
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



# ==========================================================================
# Multi-scale deformable attention
# ==========================================================================

#: The level tensors: an MSDA op goes without them when the level sizes come as ints.
LEVEL_TENSORS = ("spatial_shapes", "level_start_index")

#: The rank of each floating tensor of an MSDA call.
_MSDA_RANKS = {"value": 4, "sampling_locations": 6, "attention_weights": 5, "grad_output": 3}


def _check_msda_tensors(
    value: Tensor, spatial_shapes: Tensor | None, level_start_index: Tensor | None,
    sampling_locations: Tensor, attention_weights: Tensor, grad_output: Tensor | None = None,
) -> None:
    """Dense tensors: the floating ones on value's device; the level tensors
    (when given) on that device or on the CPU, which is read without waiting
    for the GPU."""
    floating = {"value": value, "sampling_locations": sampling_locations, "attention_weights": attention_weights}
    if grad_output is not None:  # a backward's
        floating["grad_output"] = grad_output
    check_tensors(floating)
    for name, t in zip(LEVEL_TENSORS, (spatial_shapes, level_start_index)):
        if t is None:
            continue
        check_tensors({name: t}, integer=(name,))
        if t.device != value.device and t.device.type != "cpu":
            raise ArgumentError(
                f"{name} is on {t.device} but value is on {value.device}; pass it on value's device or on the CPU"
            )


def _level_arrays(level_shapes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """spatial_shapes (L, 2) and level_start_index (L,) as NumPy arrays, from
    the level sizes [H_0, W_0, H_1, W_1, ...]."""
    if len(level_shapes) % 2:
        raise ArgumentError(f"level_shapes must be [H_0, W_0, H_1, W_1, ...], got {list(level_shapes)}")
    shapes = np.array(level_shapes, dtype=np.int64).reshape(-1, 2)
    return shapes, np.concatenate([[0], np.cumsum(shapes[:, 0] * shapes[:, 1])[:-1]]).astype(np.int64)


def _core_levels(spatial_shapes: Tensor | None, level_start_index: Tensor | None,
                 level_shapes: Sequence[int] | None) -> tuple[Any, Any]:
    """The level arguments for the core: made from ``level_shapes`` when an op
    has them (the level tensors are then not read), else the level tensors
    as arrays, which the core reads on the host."""
    if level_shapes is not None:
        return _level_arrays(level_shapes)
    return to_array(spatial_shapes), to_array(level_start_index)


def _check_msda(
    value: Tensor, spatial_shapes: np.ndarray, level_start_index: Any, sampling_locations: Tensor,
    attention_weights: Tensor, im2col_step: Any, grad_output: Tensor | None = None,
) -> MSDAGeometry:
    """The core's validation, on data-less stand-ins of the floating tensors
    and the level sizes as host arrays."""
    floating = {"value": value, "sampling_locations": sampling_locations, "attention_weights": attention_weights}
    if grad_output is not None:
        floating["grad_output"] = grad_output
    return validate_msda(
        **stand_ins(floating), spatial_shapes=spatial_shapes, level_start_index=level_start_index,
        im2col_step=im2col_step,
    )


def _static_levels(level_shapes: Sequence[Any] | None) -> bool:
    """Whether the level sizes are known ints (not torch.compile's symbols)."""
    return level_shapes is not None and all(isinstance(size, int) for size in level_shapes)


@torch.library.custom_op("cudcn::ms_deform_attn", mutates_args=())
def _ms_deform_attn_op(
    value: Tensor,
    spatial_shapes: Tensor | None,
    level_start_index: Tensor | None,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    im2col_step: int,
    level_shapes: Sequence[int] | None,
) -> Tensor:
    """Output (N, Lq, M*D) from the core's forward.

    The level sizes are ``level_shapes`` = [H_0, W_0, H_1, ...] when given
    (the level tensors are then not read and may be None), else read from
    the level tensors on the host (for CUDA tensors, a synchronisation).
    """
    _check_msda_tensors(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    with backend_context(value):
        shapes, starts = _core_levels(spatial_shapes, level_start_index, level_shapes)
        out = cudcn.ms_deform_attn(
            to_array(value), shapes, starts, to_array(sampling_locations), to_array(attention_weights), im2col_step
        )
        return to_tensor(out, value.dtype)


def _check_msda_fake(value, sampling_locations, attention_weights, im2col_step, level_shapes, grad_output=None):
    """What a fake implementation can check: everything when the sizes and
    levels are known, else the ranks."""
    if _static_levels(level_shapes) and is_static(value, sampling_locations, attention_weights, grad_output):
        _check_msda(value, *_level_arrays(level_shapes), sampling_locations, attention_weights, im2col_step,
                    grad_output)
        return
    for name, t in (("value", value), ("sampling_locations", sampling_locations),
                    ("attention_weights", attention_weights), ("grad_output", grad_output)):
        if t is not None:
            check_ndim(t, name, _MSDA_RANKS[name], MSDA_LAYOUTS[name])


@_ms_deform_attn_op.register_fake
def _ms_deform_attn_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                         im2col_step, level_shapes):
    _check_msda_fake(value, sampling_locations, attention_weights, im2col_step, level_shapes)
    batch, _, heads, channels = value.shape
    return value.new_empty((batch, sampling_locations.shape[1], heads * channels))


@torch.library.custom_op("cudcn::ms_deform_attn_backward", mutates_args=())
def _ms_deform_attn_backward_op(
    grad_output: Tensor,
    value: Tensor,
    spatial_shapes: Tensor | None,
    level_start_index: Tensor | None,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    im2col_step: int,
    level_shapes: Sequence[int] | None,
    deterministic: bool,
    tf32: bool = False,
    algorithm: str = "",
    workspace_bytes: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (value, sampling_locations, attention_weights) from the core's backward.

    The levels as for the forward op; ``deterministic``, ``tf32``,
    ``algorithm`` and ``workspace_bytes`` are cudcn's settings at the
    forward, as for deformable convolution's backward op.
    """
    _check_msda_tensors(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output)
    with backend_context(value), backward_settings(deterministic, tf32, algorithm, workspace_bytes):
        shapes, starts = _core_levels(spatial_shapes, level_start_index, level_shapes)
        grads = cudcn.ms_deform_attn_backward(
            to_array(grad_output), to_array(value), shapes, starts, to_array(sampling_locations),
            to_array(attention_weights), im2col_step,
        )
        return tuple(to_tensor(g, value.dtype) for g in grads)


@_ms_deform_attn_backward_op.register_fake
def _ms_deform_attn_backward_fake(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                                  attention_weights, im2col_step, level_shapes, deterministic, tf32=False,
                                  algorithm="", workspace_bytes=0):
    _check_msda_fake(value, sampling_locations, attention_weights, im2col_step, level_shapes, grad_output)
    return tuple(
        torch.empty_like(t, memory_format=torch.contiguous_format)
        for t in (value, sampling_locations, attention_weights)
    )


def _msda_setup_context(ctx, inputs, output) -> None:
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step, level_shapes = inputs
    ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    ctx.level_args = (im2col_step, level_shapes)
    ctx.settings = settings_at_forward()  # here, in the caller's thread


def _msda_backward(ctx, grad_output: Tensor):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    g_value, g_locations, g_weights = _ms_deform_attn_backward_op(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
        *ctx.level_args, *ctx.settings,
    )
    return g_value, None, None, g_locations, g_weights, None, None


torch.library.register_autograd("cudcn::ms_deform_attn", _msda_backward, setup_context=_msda_setup_context)


def _msda_no_double_backward(ctx, *grads):
    raise double_backward_error("multi-scale deformable attention (cudcn.torch.ms_deform_attn)")


torch.library.register_autograd("cudcn::ms_deform_attn_backward", _msda_no_double_backward)


def _flat_level_shapes(spatial_shapes: Any) -> list[Any]:
    """Level sizes given as (H_l, W_l) pairs of ints (torch.SymInts while
    torch.compile traces) as [H_0, W_0, H_1, W_1, ...]."""
    expected = "an integer tensor (L, 2) or a sequence of (H_l, W_l) pairs of ints"
    try:
        pairs = [tuple(pair) for pair in spatial_shapes]
    except TypeError:
        raise ArgumentTypeError(f"spatial_shapes must be {expected}, got {type(spatial_shapes).__name__}") from None
    flat: list[Any] = []
    for pair in pairs:
        if len(pair) != 2:
            raise ArgumentError(f"spatial_shapes must be {expected}, got an entry {pair!r}")
        for size in pair:
            if isinstance(size, (bool, np.bool_)) or not isinstance(size, (int, np.integer, torch.SymInt)):
                raise ArgumentTypeError(
                    f"spatial_shapes must be {expected}, got an entry of {type(size).__name__} {size!r}"
                )
            flat.append(size if isinstance(size, torch.SymInt) else int(size))
    return flat


def _host_integers(t: Tensor | None) -> np.ndarray | None:
    """A level tensor as a NumPy array (for a CUDA tensor, a copy that waits for the GPU)."""
    return None if t is None else to_array(t.detach().cpu())


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor | Sequence[tuple[int, int]],
    level_start_index: Tensor | Sequence[int] | None,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    im2col_step: int = 64,
) -> Tensor:
    """Multi-scale deformable attention (Deformable DETR's MSDeformAttn core).

    The argument order and results of Deformable DETR's and mmcv's
    ``MultiScaleDeformableAttnFunction.apply`` (and of
    ``ms_deform_attn_core_pytorch``): ``out[n, q, m*D + d]`` is the sum over
    levels l and points p of ``attention_weights[n, q, m, l, p]`` times level
    l of ``value`` (head m, channel d) sampled bilinearly at pixel
    (x*W_l - 0.5, y*H_l - 0.5), zeros outside, where (x, y) =
    ``sampling_locations[n, q, m, l, p]``; no softmax is applied.

    Args:
        value: (N, S, M, D), S = sum of H_l*W_l.
        spatial_shapes: the (H_l, W_l) of the L levels, as an integer tensor
            (L, 2) or as a sequence of L pairs of Python ints (transformers'
            ``spatial_shapes_list``). A tensor is read on the host once: for
            a CUDA tensor that is a device-to-host copy that waits for the
            GPU (a synchronisation, as in mmcv's and Deformable DETR's
            CUDA ops' callers); Python ints (or a CPU tensor) cost nothing.
            Under torch.compile / torch.export a tensor is read where the op
            runs, once by the forward and once by the backward.
        level_start_index: (L,), the first pixel of each level (the
            cumulative sum of H_l*W_l from 0), checked: an integer tensor
            (read with spatial_shapes, on its device or the CPU) or a
            sequence of ints. With spatial_shapes as Python ints it may be
            None, and a tensor is not read (it is implied by the shapes, as
            in transformers' own implementation).
        sampling_locations: (N, Lq, M, L, P, 2), normalised (x, y); points
            may lie outside [0, 1].
        attention_weights: (N, Lq, M, L, P).
        im2col_step: accepted for compatibility and ignored (a positive
            int): any batch size works.

    Returns:
        (N, Lq, M*D), on value's device, in its dtype (or the autocast dtype).

    Gradients flow to value, sampling_locations and attention_weights (the
    integer arguments get none); at an integer pixel coordinate the location
    gradient is the one-sided derivative towards +1 (see docs/msda.md).
    value, sampling_locations and attention_weights share one floating
    dtype: float16, bfloat16, float32 or float64. Under ``torch.autocast``
    all three are cast to the autocast dtype of value's device (float64 is
    left alone), as for :func:`deform_conv2d` and as mmcv casts the
    locations and weights to the value's dtype; the op then runs in that
    dtype. In float16/bfloat16 the locations carry 11/8 significant bits:
    run MSDA outside autocast in float32 where sub-pixel precision on large
    levels matters. With ``torch.use_deterministic_algorithms(True)`` (or
    cudcn's setting at the forward) the backward takes the deterministic
    path. Double backward raises :class:`cudcn.UnsupportedError`.

    Raises:
        cudcn.ArgumentTypeError, cudcn.ArgumentError: the core's message
            naming the argument (TypeError / ValueError, and RuntimeError).
    """
    level_shapes = None
    if isinstance(spatial_shapes, Tensor):
        if level_start_index is not None and not isinstance(level_start_index, Tensor):
            level_start_index = torch.as_tensor(level_start_index, device=spatial_shapes.device)
    else:
        level_shapes = _flat_level_shapes(spatial_shapes)
        spatial_shapes = None
    if isinstance(value, Tensor):
        value, sampling_locations, attention_weights = autocast(
            value.device.type, [value, sampling_locations, attention_weights]
        )
    if not torch.compiler.is_compiling():
        # Check the call as the user wrote it; read level tensors on the host
        # here, once for the forward and its backward. (Under torch.compile
        # the op reads them where it runs, and its fake implementation checks.)
        if level_shapes is None:
            _check_msda_tensors(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
            if spatial_shapes.device.type != "meta":
                geom = _check_msda(value, _host_integers(spatial_shapes), _host_integers(level_start_index),
                                   sampling_locations, attention_weights, im2col_step)
                level_shapes = [size for pair in geom.shapes for size in pair]
        elif _static_levels(level_shapes):
            shapes, starts = _level_arrays(level_shapes)
            if level_start_index is not None and not isinstance(level_start_index, Tensor):
                starts = np.asarray(level_start_index)  # given as ints: checked (a tensor is not read)
            _check_msda(value, shapes, starts, sampling_locations, attention_weights, im2col_step)
    if level_shapes is not None:
        spatial_shapes = level_start_index = None
    return _ms_deform_attn_op(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step, level_shapes
    )


def hf_ms_deform_attn_forward(
    self: Any,
    value: Tensor,
    value_spatial_shapes: Tensor,
    value_spatial_shapes_list: Sequence[tuple[int, int]],
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    im2col_step: int,
) -> Tensor:
    """cudcn in HF transformers' ``MultiScaleDeformableAttention.forward``'s place.

    The exact signature of that forward (Deformable DETR and the models
    that copy its class: RT-DETR, Grounding DINO, ...), so that one line
    makes every such layer run cudcn::

        import transformers.models.deformable_detr.modeling_deformable_detr as detr
        detr.MultiScaleDeformableAttention.forward = cudcn.torch.hf_ms_deform_attn_forward

    Patch the class, not an instance: transformers re-applies its hub
    kernels (``kernels.kernelize``) in ``from_pretrained`` and at every
    ``model.train()`` / ``model.eval()`` of a model with ``use_kernels``,
    and that replaces or deletes a forward set on an instance, while a
    class patch stays (the CPU fallback restores the class's forward). On
    CUDA, where transformers maps this layer to its hub kernel, load with
    ``from_pretrained(..., use_kernels=False)`` (or set
    ``USE_HUB_KERNELS=NO``), or the hub kernel shadows the patch.

    Like transformers' own forward it reads the sizes from
    ``value_spatial_shapes_list`` (Python ints: no synchronisation, and
    static for torch.compile and export) and neither
    ``value_spatial_shapes`` nor ``level_start_index``; ``im2col_step`` is
    ignored. Returns (N, Lq, M*D).
    """
    return ms_deform_attn(value, value_spatial_shapes_list, level_start_index, sampling_locations,
                          attention_weights, im2col_step)
