"""torch adapter: ``cudcn.torch.deform_conv2d`` and drop-in modules.

A drop-in for ``torchvision.ops.deform_conv2d`` and ``torchvision.ops.DeformConv2d``,
plus the DCNv1/DCNv2 "pack" layers that predict their own offsets (mmcv's
conventions) and a CoordConv layer. Importing this module imports torch;
``import cudcn`` alone never does.

How a call runs:

- The function is the custom op ``cudcn::deform_conv2d`` (torch.library), with
  a fake implementation and an autograd formula, so ``torch.compile`` captures
  it whole and ``torch.library.opcheck`` passes. Its backward is the custom op
  ``cudcn::deform_conv2d_backward``.
- CUDA tensors go to CuPy through DLPack without copies (beyond making inputs
  contiguous), on the tensor's device and torch's current stream, and the CUDA
  backend runs there. CuPy allocates from torch's caching allocator during the
  call, so outputs and workspace are torch memory. Nothing waits on the host.
  Those outputs are owned through DLPack rather than by torch's allocator, so
  ``Tensor.record_stream`` does nothing on them: to use a result on another
  stream, synchronise the streams (or copy it into a tensor torch allocated).
- CPU tensors go to NumPy through DLPack without copies and the NumPy backend
  runs, so the adapter works, and is tested, without a GPU. NumPy has no
  bfloat16: a CPU bfloat16 call is computed from float32 copies made by torch
  and its results are rounded back to bfloat16.

Precision and determinism:

- float16 and bfloat16 run in their own dtype on CUDA (the CUDA backend
  accumulates in float32).
- Under ``torch.autocast`` the function casts every float16/bfloat16/float32
  argument to the autocast dtype of the input's device (as autocast does for
  convolutions; float64 is left alone), so an fp16/bf16 activation meets an
  fp32 weight without a dtype error; the result has the autocast dtype.
  (torchvision instead runs its op in float32 under autocast.)
- The CUDA input gradient adds with atomics by default, so it varies in the
  last bits from run to run. With ``torch.use_deterministic_algorithms(True)``
  (``warn_only`` or not), or with cudcn's own setting in force when the
  forward is called (``with cudcn.deterministic_algorithms(): y = layer(x)``),
  the backward runs under ``cudcn.deterministic_algorithms(True)``: the CUDA
  backend then takes its sorted, atomic-free input gradient, and every
  gradient is bitwise repeatable. cudcn's setting is read at the forward
  because autograd runs a CUDA backward in its own thread, where a
  ``with`` block around ``.backward()`` alone is not visible. The forward, the other gradients and the whole CPU path are
  deterministic anyway.
- float32 GEMMs on CUDA use TF32 (tensor cores, operands rounded to 10
  significand bits: about 1e-3 relative error) when torch allows TF32 for
  float32 matmuls (``torch.set_float32_matmul_precision("high")``,
  ``torch.backends.cuda.matmul.allow_tf32 = True``; read where the op runs)
  or cudcn's setting (``cudcn.tf32()``) is in force at the forward call.
  Off by default, as in torch.
- Double backward is not supported.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

import cudcn
from cudcn.backends.cuda.engine import external_stream
from cudcn.errors import ArgumentError, ArgumentTypeError
from cudcn.geometry import FLOAT_DTYPES, Geometry, validate

__all__ = [
    "CoordConv2d",
    "DeformConv2d",
    "DeformConv2dPack",
    "ModulatedDeformConv2dPack",
    "deform_conv2d",
]

IntOrPair = int | tuple[int, int]


# --------------------------------------------------------------------------
# Tensors to arrays and back
# --------------------------------------------------------------------------


_ZERO_BYTES = bytes(16)  # the buffer of every stand-in (all strides are 0)


def _stand_in(name: str, t: Tensor) -> np.ndarray:
    """A NumPy array with t's shape and dtype and no data, for the core's validation."""
    if t.dtype == torch.bfloat16:  # NumPy has none; _check_tensors keeps mixes out.
        dtype = np.dtype(np.float32)
    else:
        try:
            dtype = np.dtype(str(t.dtype).removeprefix("torch."))
        except TypeError:
            raise ArgumentTypeError(
                f"{name}.dtype must be one of {', '.join(FLOAT_DTYPES)}, got {t.dtype}"
            ) from None
    shape = tuple(t.shape)
    return np.ndarray(shape, dtype, buffer=_ZERO_BYTES, strides=(0,) * len(shape))


def _check_tensors(tensors: dict[str, Tensor | None]) -> dict[str, Tensor]:
    """The tensors that are given: Tensors on one device, no bfloat16 mixed with another dtype.

    CPU bfloat16 reaches the core as float32, which would hide such a mix from it.
    """
    given = {name: t for name, t in tensors.items() if t is not None}
    for name, t in given.items():
        if not isinstance(t, Tensor):
            raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    device, dtype = given["input"].device, given["input"].dtype
    for name, t in given.items():
        if t.device != device:
            raise ArgumentError(f"{name} is on {t.device} but input is on {device}; pass tensors on one device")
    if any(t.dtype == torch.bfloat16 for t in given.values()):
        for name, t in given.items():
            if t.dtype != dtype:
                raise ArgumentTypeError(
                    f"{name}.dtype must equal input.dtype = "
                    f"{str(dtype).removeprefix('torch.')}, "
                    f"got {str(t.dtype).removeprefix('torch.')}"
                )
    return given


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
    """The core's validation, on data-less NumPy stand-ins of the tensors.

    Gives the core's error messages before any data moves, also while
    torch.compile traces with fake tensors.
    """
    given = _check_tensors({
        "input": input, "offset": offset, "weight": weight, "bias": bias,
        "mask": mask, "grad_output": grad_output,
    })
    stand_ins = {name: _stand_in(name, t) for name, t in given.items()}
    return validate(**stand_ins, stride=stride, padding=padding, dilation=dilation)


def _is_static(*tensors: Tensor | None) -> bool:
    """True when no shape is symbolic (torch.compile with dynamic shapes)."""
    return all(
        isinstance(size, int) for t in tensors if t is not None for size in t.shape
    )


def _to_array(t: Tensor | None) -> Any:
    """A contiguous tensor as a CuPy (CUDA) or NumPy (CPU) array on the same memory."""
    if t is None:
        return None
    t = t.detach().contiguous()
    if t.is_cuda:
        import cupy

        try:
            return cupy.from_dlpack(t)
        except Exception as error:
            if t.dtype != torch.bfloat16:
                raise
            from cudcn.backends.cuda.engine import cupy_bfloat16_problem

            cause = cupy_bfloat16_problem() or f"CuPy could not import the tensor through DLPack: {error}"
            raise ArgumentTypeError(f"bfloat16 CUDA tensors need CuPy's bfloat16: {cause}") from error
    if t.dtype == torch.bfloat16:  # NumPy's DLPack has no bfloat16.
        t = t.float()
    return np.from_dlpack(t)


def _to_tensor(array: Any, dtype: torch.dtype) -> Tensor:
    """A backend result as a contiguous tensor of ``dtype`` (no copy when it is one)."""
    return torch.from_dlpack(array).to(dtype).contiguous()


def _torch_allocator(stream: int) -> Any:
    """A CuPy allocator that takes memory from torch's caching allocator, on ``stream``."""
    import cupy

    def malloc(nbytes: int, device: int) -> int:
        return torch.cuda.caching_allocator_alloc(max(nbytes, 1), device, stream)

    def free(pointer: int, device: int) -> None:
        torch.cuda.caching_allocator_delete(pointer)

    return cupy.cuda.memory.PythonFunctionAllocator(malloc, free).malloc


@contextlib.contextmanager
def _backend_context(t: Tensor) -> Iterator[None]:
    """Where a call on ``t`` runs: for CUDA, CuPy on t's device and torch's stream.

    DLPack exchanges inside this context see one stream on both sides, so
    they add no synchronisation.
    """
    if not t.is_cuda:
        yield
        return
    import cupy

    device_id = t.device.index
    stream = torch.cuda.current_stream(t.device)
    allocator = _torch_allocator(stream.cuda_stream)
    cupy_stream = external_stream(cupy, stream.cuda_stream, device_id)  # 0, torch's default stream, made explicit
    with cupy.cuda.Device(device_id), cupy_stream, cupy.cuda.using_allocator(allocator):
        yield


def _torch_allows_tf32() -> bool:
    """Whether torch lets float32 matmuls on CUDA use TF32 (torch's global setting).

    torch.set_float32_matmul_precision("high" or "medium"),
    torch.backends.cuda.matmul.allow_tf32 = True and
    torch.backends.cuda.matmul.fp32_precision = "tf32" all show in
    fp32_precision; torch before it has only allow_tf32.
    """
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:
        return bool(matmul.allow_tf32)
    return precision == "tf32"


def _tf32(requested: bool) -> contextlib.AbstractContextManager:
    """TF32 for a call's float32 GEMMs on CUDA: on when cudcn's setting was
    on at the forward (``requested``) or torch allows TF32 for float32
    matmuls (read where the op runs: torch's setting is global)."""
    if requested or _torch_allows_tf32():
        return cudcn.tf32(True)
    return contextlib.nullcontext()


def _determinism(requested: bool) -> contextlib.AbstractContextManager:
    """The deterministic path for a backward: on when the forward was called
    under cudcn's setting (``requested``) or while
    torch.use_deterministic_algorithms(True) is set."""
    if requested or torch.are_deterministic_algorithms_enabled():
        return cudcn.deterministic_algorithms(True)
    return contextlib.nullcontext()


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
    """Output (N, C_out, Ho, Wo) from the core's forward."""
    _check_tensors({"input": input, "offset": offset, "weight": weight, "bias": bias, "mask": mask})
    with _backend_context(input), _tf32(cudcn.is_tf32_enabled()):
        arrays = [_to_array(t) for t in (input, offset, weight, bias, mask)]
        out = cudcn.deform_conv2d(
            *arrays[:4], stride=stride, padding=padding, dilation=dilation, mask=arrays[4]
        )
        return _to_tensor(out, input.dtype)


@_deform_conv2d_op.register_fake
def _deform_conv2d_fake(input, offset, weight, bias, mask, stride, padding, dilation):
    if _is_static(input, offset, weight, bias, mask):
        _check(input, offset, weight, bias, mask, stride, padding, dilation)
    out_h = (input.shape[2] + 2 * padding[0] - dilation[0] * (weight.shape[2] - 1) - 1) // stride[0] + 1
    out_w = (input.shape[3] + 2 * padding[1] - dilation[1] * (weight.shape[3] - 1) - 1) // stride[1] + 1
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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (input, offset, weight, bias, mask) from the core's backward.

    The bias and mask gradients are empty tensors of shape (0,) when the call
    had no bias or no mask (a custom op cannot return None). ``deterministic``
    asks for the bitwise-repeatable path (as does
    torch.use_deterministic_algorithms(True)); ``tf32`` lets float32 GEMMs
    use TF32 (as does torch's float32 matmul precision).
    """
    _check_tensors({
        "input": input, "offset": offset, "weight": weight, "bias": bias,
        "mask": mask, "grad_output": grad_output,
    })
    with _backend_context(input), _determinism(deterministic), _tf32(tf32):
        arrays = [_to_array(t) for t in (grad_output, input, offset, weight, bias, mask)]
        grads = cudcn.deform_conv2d_backward(
            *arrays[:5], stride=stride, padding=padding, dilation=dilation, mask=arrays[5]
        )
        return tuple(
            input.new_empty(0) if g is None else _to_tensor(g, input.dtype) for g in grads
        )


@_deform_conv2d_backward_op.register_fake
def _deform_conv2d_backward_fake(grad_output, input, offset, weight, bias, mask, stride, padding, dilation,
                                 deterministic, tf32=False):
    if _is_static(grad_output, input, offset, weight, bias, mask):
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
    # Read here, in the caller's thread: autograd runs a CUDA backward in its
    # own device thread, where cudcn's per-thread setting is not visible.
    ctx.deterministic = cudcn.are_deterministic_algorithms_enabled()
    ctx.tf32 = cudcn.is_tf32_enabled()


def _backward(ctx, grad_output: Tensor):
    input, offset, weight, bias, mask = ctx.saved_tensors
    g_input, g_offset, g_weight, g_bias, g_mask = _deform_conv2d_backward_op(
        grad_output, input, offset, weight, bias, mask, *ctx.conv_args, ctx.deterministic, ctx.tf32
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


# --------------------------------------------------------------------------
# The public function
# --------------------------------------------------------------------------


def _as_list(value: Any) -> Any:
    """int or pair as [rows, columns] for the op; anything else as given."""
    if isinstance(value, (tuple, list)):
        return list(value)
    return [value, value]


def _autocast(device_type: str, tensors: list[Tensor | None]) -> list[Tensor | None]:
    """Cast floating tensors to the autocast dtype when autocast is on for the device."""
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    # Like torch's own autocast, float64 is left alone.
    return [
        t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in tensors
    ]


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
        TypeError, ValueError: the core's message when an argument is wrong.

    With ``torch.use_deterministic_algorithms(True)`` the backward is bitwise
    repeatable on CUDA too (a sorted, atomic-free input gradient).

    CUDA tensors run on torch's current stream; CPU tensors run on the NumPy
    backend. All tensors must be on one device.
    """
    if isinstance(input, Tensor):
        tensors = _autocast(input.device.type, [input, offset, weight, bias, mask])
        input, offset, weight, bias, mask = tensors
    if not torch.compiler.is_compiling():
        # Report wrong arguments as the user wrote them (the op sees lists);
        # under torch.compile the fake implementation checks instead.
        _check(input, offset, weight, bias, mask, stride, padding, dilation)
    return _deform_conv2d_op(
        input, offset, weight, bias, mask,
        _as_list(stride), _as_list(padding), _as_list(dilation),
    )


# --------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------


class DeformConv2d(nn.Module):
    """Deformable convolution layer; a drop-in for ``torchvision.ops.DeformConv2d``.

    Same constructor, parameters ``weight`` (C_out, C_in/groups, kh, kw) and
    ``bias`` (C_out,) (or None), initialisation and state-dict keys, so state
    dicts load both ways. ``forward(input, offset, mask=None)`` takes the
    shapes of :func:`deform_conv2d`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: IntOrPair = 0,
        dilation: IntOrPair = 1,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if in_channels % groups != 0:
            raise ArgumentError(f"in_channels = {in_channels} must be divisible by groups = {groups}")
        if out_channels % groups != 0:
            raise ArgumentError(f"out_channels = {out_channels} must be divisible by groups = {groups}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size)
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torchvision's initialisation (that of nn.Conv2d)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: Tensor, offset: Tensor, mask: Tensor | None = None) -> Tensor:
        """input (N, C_in, H, W), offset (N, 2*G*kh*kw, Ho, Wo), mask (N, G*kh*kw, Ho, Wo)."""
        return deform_conv2d(
            input, offset, self.weight, self.bias,
            stride=self.stride, padding=self.padding, dilation=self.dilation, mask=mask,
        )

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
            f", stride={self.stride}"
        )
        s += f", padding={self.padding}" if self.padding != (0, 0) else ""
        s += f", dilation={self.dilation}" if self.dilation != (1, 1) else ""
        s += f", groups={self.groups}" if self.groups != 1 else ""
        s += ", bias=False" if self.bias is None else ""
        return s


class _Pack(DeformConv2d):
    """A deformable convolution whose offsets come from ``self.conv_offset``.

    ``conv_offset`` is an nn.Conv2d with the layer's kernel size, stride,
    padding and dilation, so that it predicts one value per output pixel; it
    starts at zero. ``values_per_point`` is how many channels it predicts per
    kernel point and offset group.
    """

    values_per_point = 0

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: IntOrPair = 0,
        dilation: IntOrPair = 1,
        groups: int = 1,
        offset_groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias
        )
        if offset_groups < 1 or in_channels % offset_groups != 0:
            raise ArgumentError(
                f"in_channels = {in_channels} must be divisible by "
                f"offset_groups = {offset_groups}"
            )
        self.offset_groups = offset_groups
        kh, kw = self.kernel_size
        self.conv_offset = nn.Conv2d(
            in_channels,
            self.values_per_point * offset_groups * kh * kw,
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=True,
        )
        self.reset_offset()

    def reset_offset(self) -> None:
        """Zero the offset predictor, so the layer starts as a plain convolution."""
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", offset_groups={self.offset_groups}" if self.offset_groups != 1 else "")


class DeformConv2dPack(_Pack):
    """DCNv1 layer that predicts its own offsets (mmcv's ``DeformConv2dPack``, "DCN").

    ``conv_offset`` maps the input to offsets (N, 2*offset_groups*kh*kw, Ho, Wo);
    it starts at zero, so the layer starts as a plain convolution with
    ``weight`` and ``bias``. State-dict keys: weight, bias, conv_offset.weight,
    conv_offset.bias (mmcv's; build with bias=False to load mmcv's DCN, which
    has no bias). ``forward(input)``: (N, C_in, H, W) -> (N, C_out, Ho, Wo).
    """

    values_per_point = 2

    def forward(self, input: Tensor) -> Tensor:  # type: ignore[override]
        offset = self.conv_offset(input)
        return deform_conv2d(
            input, offset, self.weight, self.bias,
            stride=self.stride, padding=self.padding, dilation=self.dilation,
        )


class ModulatedDeformConv2dPack(_Pack):
    """DCNv2 layer that predicts offsets and mask (mmcv's ``ModulatedDeformConv2dPack``, "DCNv2").

    ``conv_offset`` maps the input to 3*offset_groups*kh*kw channels, split
    in three equal parts (o1, o2, m): offset = cat(o1, o2) and
    mask = sigmoid(m). It starts at zero, so the layer starts as a plain
    convolution whose weighted sum is scaled by sigmoid(0) = 0.5 (the bias is
    not scaled). State-dict keys are mmcv's, as for :class:`DeformConv2dPack`.
    ``forward(input)``: (N, C_in, H, W) -> (N, C_out, Ho, Wo).
    """

    values_per_point = 3

    def forward(self, input: Tensor) -> Tensor:  # type: ignore[override]
        o1, o2, m = torch.chunk(self.conv_offset(input), 3, dim=1)
        return deform_conv2d(
            input, torch.cat((o1, o2), dim=1), self.weight, self.bias,
            stride=self.stride, padding=self.padding, dilation=self.dilation,
            mask=torch.sigmoid(m),
        )


def coordinate_channels(input: Tensor) -> Tensor:
    """The two CoordConv channels for input (N, C, H, W): (N, 2, H, W).

    Channel 0 is the column coordinate (varies along the width), channel 1 the
    row coordinate (varies along the height), each from -1 to 1 (a size-1
    axis gets -1), in the input's dtype and device.
    """
    n, _, height, width = input.shape
    columns = torch.linspace(-1, 1, width, dtype=input.dtype, device=input.device)
    rows = torch.linspace(-1, 1, height, dtype=input.dtype, device=input.device)
    return torch.stack(
        (columns.view(1, width).expand(height, width), rows.view(height, 1).expand(height, width))
    ).expand(n, 2, height, width)


class CoordConv2d(nn.Module):
    """CoordConv: a convolution that also sees where it is.

    Appends the two channels of :func:`coordinate_channels` (column, then
    row coordinate, each in [-1, 1]) to the input and applies ``self.conv``,
    an nn.Conv2d with in_channels + 2 inputs (so in_channels + 2 must be
    divisible by groups). ``forward(input)``: (N, C_in, H, W) -> (N, C_out, Ho, Wo).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: IntOrPair = 0,
        dilation: IntOrPair = 1,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels + 2, out_channels, kernel_size, stride, padding, dilation, groups, bias
        )

    def forward(self, input: Tensor) -> Tensor:
        return self.conv(torch.cat((input, coordinate_channels(input)), dim=1))
