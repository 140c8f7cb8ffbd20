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
- cudcn's algorithm (``cudcn.algorithm``) and workspace budget
  (``cudcn.workspace_bytes``) in force at the forward call hold for its
  backward too, for the same reason.
- Double backward is not supported.

Leaving Python: TorchScript compiles the function and the modules to calls of
the op; torch.export captures the op (a dynamic batch works); ONNX export
writes the standard ``DeformConv`` node, through
:func:`onnx_translation_table` (dynamo exporter) or the symbolic registered
at import (legacy exporter).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import cudcn
from cudcn.backends.cuda.engine import external_stream
from cudcn.errors import ArgumentError, ArgumentTypeError
from cudcn.geometry import FLOAT_DTYPES, Geometry, int_pair, validate

__all__ = [
    "CoordConv2d",
    "DeformConv2d",
    "DeformConv2dPack",
    "ModulatedDeformConv2dPack",
    "deform_conv2d",
    "onnx_translation_table",
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


#: The tensors a call cannot do without (bias and mask may be None).
_REQUIRED = ("input", "offset", "weight", "grad_output")


def _check_tensors(tensors: dict[str, Tensor | None]) -> dict[str, Tensor]:
    """The tensors that are given: dense Tensors on one device, no bfloat16
    mixed with another dtype; None only for bias and mask.

    CPU bfloat16 reaches the core as float32, which would hide such a mix from it.
    """
    for name, t in tensors.items():
        if t is None:
            if name in _REQUIRED:
                raise ArgumentTypeError(f"{name} must be a torch.Tensor, got None")
        elif not isinstance(t, Tensor):
            raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        elif t.is_nested:
            raise ArgumentTypeError(f"{name} must be a dense (torch.strided) tensor, got a nested tensor")
        elif t.layout != torch.strided:
            raise ArgumentTypeError(
                f"{name} must be a dense (torch.strided) tensor, got layout {t.layout}; "
                f"convert it with .to_dense()"
            )
    given = {name: t for name, t in tensors.items() if t is not None}
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
    tensors = {"input": input, "offset": offset, "weight": weight, "bias": bias, "mask": mask}
    if grad_output is not None:  # a backward's
        tensors["grad_output"] = grad_output
    given = _check_tensors(tensors)
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


@contextlib.contextmanager
def _forward_settings(algorithm: str, workspace_bytes: int) -> Iterator[None]:
    """cudcn's algorithm and workspace budget as they were at the forward
    ("" and 0: leave this thread's own), for a backward that autograd may run
    in another thread."""
    with contextlib.ExitStack() as stack:
        if algorithm:
            stack.enter_context(cudcn.algorithm(algorithm))
        if workspace_bytes:
            stack.enter_context(cudcn.workspace_bytes(workspace_bytes))
        yield


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
    _check_tensors({
        "input": input, "offset": offset, "weight": weight, "bias": bias,
        "mask": mask, "grad_output": grad_output,
    })
    with _backend_context(input), _determinism(deterministic), _tf32(tf32), \
            _forward_settings(algorithm, workspace_bytes):
        arrays = [_to_array(t) for t in (grad_output, input, offset, weight, bias, mask)]
        grads = cudcn.deform_conv2d_backward(
            *arrays[:5], stride=stride, padding=padding, dilation=dilation, mask=arrays[5]
        )
        return tuple(
            input.new_empty(0) if g is None else _to_tensor(g, input.dtype) for g in grads
        )


@_deform_conv2d_backward_op.register_fake
def _deform_conv2d_backward_fake(grad_output, input, offset, weight, bias, mask, stride, padding, dilation,
                                 deterministic, tf32=False, algorithm="", workspace_bytes=0):
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
    ctx.settings = (cudcn.get_algorithm(), cudcn.get_workspace_bytes())


def _backward(ctx, grad_output: Tensor):
    input, offset, weight, bias, mask = ctx.saved_tensors
    g_input, g_offset, g_weight, g_bias, g_mask = _deform_conv2d_backward_op(
        grad_output, input, offset, weight, bias, mask, *ctx.conv_args, ctx.deterministic, ctx.tf32,
        *ctx.settings,
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


def _script_list(value: IntOrPair) -> list[int]:
    """int or pair as [rows, columns]: :func:`_as_list` for TorchScript."""
    if isinstance(value, int):
        return [value, value]
    return [value[0], value[1]]


def _autocast(device_type: str, tensors: list[Tensor | None]) -> list[Tensor | None]:
    """Cast floating tensors to the autocast dtype when autocast is on for the device."""
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    # Like torch's own autocast, float64 is left alone.
    return [
        t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
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
            _script_list(stride), _script_list(padding), _script_list(dilation),
        )
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


def _int_argument(value: Any, name: str, minimum: int) -> int:
    """A layer's int argument (channels, groups) as an int >= ``minimum``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ArgumentTypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ArgumentError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_divisible(value: int, value_name: str, divisor: int, divisor_name: str) -> None:
    if value % divisor:
        raise ArgumentError(f"{value_name} = {value} must be divisible by {divisor_name} = {divisor}")


def _layer_arguments(
    in_channels: Any, out_channels: Any, kernel_size: Any, stride: Any, padding: Any,
    dilation: Any, groups: Any, bias: Any,
) -> tuple[int, int, tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int], int]:
    """A layer's constructor arguments, checked as a call's would be:
    (in_channels, out_channels, kernel_size, stride, padding, dilation, groups),
    sizes as pairs of ints. C_out may be 0, as a call's weight may."""
    in_channels = _int_argument(in_channels, "in_channels", 1)
    out_channels = _int_argument(out_channels, "out_channels", 0)
    groups = _int_argument(groups, "groups", 1)
    if not isinstance(bias, (bool, np.bool_)):
        raise ArgumentTypeError(f"bias must be True or False, got {bias!r}")
    return (
        in_channels,
        out_channels,
        int_pair(kernel_size, "kernel_size", 1),
        int_pair(stride, "stride", 1),
        int_pair(padding, "padding", 0),
        int_pair(dilation, "dilation", 1),
        groups,
    )


def _check_layer_input(input: Any, in_channels: int, unbatched: bool = False) -> None:
    """What a layer that runs its own convolution first needs of ``input``
    (the call's checks would come too late to name it)."""
    _check_tensors({"input": input})
    if not input.is_floating_point():
        raise ArgumentTypeError(
            f"input.dtype must be one of {', '.join(FLOAT_DTYPES)}, got {str(input.dtype).removeprefix('torch.')}"
        )
    if input.dim() not in ((3, 4) if unbatched else (4,)):
        expected = "3-D (C_in, H, W) or 4-D (N, C_in, H, W)" if unbatched else "4-D (N, C_in, H, W)"
        raise ArgumentError(f"input must be a {expected} tensor, got shape {tuple(input.shape)}")
    if input.shape[-3] != in_channels:
        raise ArgumentError(
            f"input.shape[{input.dim() - 3}] (C_in) must be in_channels = {in_channels}, got {input.shape[-3]}"
        )


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
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups = _layer_arguments(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias
        )
        _check_divisible(in_channels, "in_channels", groups, "groups")
        _check_divisible(out_channels, "out_channels", groups, "groups")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
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
    kernel point and offset group. ``offset_groups`` may also be given by
    mmcv's name, ``deform_groups`` (same position; one of the two).
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
        offset_groups: int | None = None,
        bias: bool = True,
        *,
        deform_groups: int | None = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias
        )
        # mmcv calls offset_groups deform_groups (same position): either name, not both.
        if offset_groups is not None and deform_groups is not None:
            raise ArgumentError(
                f"pass offset_groups or deform_groups (mmcv's name for it), not both; "
                f"got offset_groups = {offset_groups!r} and deform_groups = {deform_groups!r}"
            )
        name = "offset_groups" if deform_groups is None else "deform_groups"
        given = offset_groups if deform_groups is None else deform_groups
        offset_groups = _int_argument(1 if given is None else given, name, 1)
        _check_divisible(self.in_channels, "in_channels", offset_groups, name)
        self.offset_groups = offset_groups
        kh, kw = self.kernel_size
        self.conv_offset = nn.Conv2d(
            self.in_channels,
            self.values_per_point * offset_groups * kh * kw,
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=True,
        )
        self.reset_offset()

    @property
    def deform_groups(self) -> int:
        """mmcv's name for ``offset_groups``."""
        return self.offset_groups

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
        if not (torch.jit.is_scripting() or torch.jit.is_tracing()):
            _check_layer_input(input, self.in_channels)
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
        if not (torch.jit.is_scripting() or torch.jit.is_tracing()):
            _check_layer_input(input, self.in_channels)
        o1, o2, m = torch.chunk(self.conv_offset(input), 3, dim=1)
        return deform_conv2d(
            input, torch.cat((o1, o2), dim=1), self.weight, self.bias,
            stride=self.stride, padding=self.padding, dilation=self.dilation,
            mask=torch.sigmoid(m),
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Old mmcv and many DCNv2 repositories name the predictor conv_offset_mask
        # (same layout): load those keys as conv_offset's, as mmcv does. The
        # dict is load_state_dict's own copy, never the caller's.
        old_prefix = prefix + "conv_offset_mask."
        for key in [key for key in state_dict if key.startswith(old_prefix)]:
            new_key = prefix + "conv_offset." + key[len(old_prefix):]
            if new_key not in state_dict:
                state_dict[new_key] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def coordinate_channels(input: Tensor) -> Tensor:
    """The two CoordConv channels for input (N, C, H, W): (N, 2, H, W)
    (for an unbatched input (C, H, W): (2, H, W)).

    Channel 0 is the column coordinate (varies along the width), channel 1 the
    row coordinate (varies along the height), each from -1 to 1 (a size-1
    axis gets -1), in the input's dtype and device.
    """
    height, width = input.shape[-2], input.shape[-1]
    columns = torch.linspace(-1, 1, width, dtype=input.dtype, device=input.device)
    rows = torch.linspace(-1, 1, height, dtype=input.dtype, device=input.device)
    coordinates = torch.stack(
        (columns.view(1, width).expand(height, width), rows.view(height, 1).expand(height, width))
    )
    if input.dim() == 4:
        coordinates = coordinates.expand(input.shape[0], 2, height, width)
    return coordinates


class CoordConv2d(nn.Module):
    """CoordConv: a convolution that also sees where it is.

    Appends the two channels of :func:`coordinate_channels` (column, then
    row coordinate, each in [-1, 1]) to the input and applies ``self.conv``,
    an nn.Conv2d with in_channels + 2 inputs (so in_channels + 2 must be
    divisible by groups). ``forward(input)``: (N, C_in, H, W) -> (N, C_out, Ho, Wo),
    or unbatched (C_in, H, W) -> (C_out, Ho, Wo) as nn.Conv2d.
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
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups = _layer_arguments(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias
        )
        _check_divisible(in_channels + 2, "in_channels + 2", groups, "groups")
        _check_divisible(out_channels, "out_channels", groups, "groups")
        self.in_channels = in_channels
        self.conv = nn.Conv2d(
            in_channels + 2, out_channels, kernel_size, stride, padding, dilation, groups, bias
        )

    def forward(self, input: Tensor) -> Tensor:
        if not (torch.jit.is_scripting() or torch.jit.is_tracing()):
            _check_layer_input(input, self.in_channels, unbatched=True)
        return self.conv(torch.cat((input, coordinate_channels(input)), dim=-3))


# --------------------------------------------------------------------------
# ONNX export: the op as ONNX DeformConv
# --------------------------------------------------------------------------

#: The first ONNX opset with DeformConv.
ONNX_MIN_OPSET = 19


def _static_size(shape: Any, index: int, name: str) -> int:
    """shape[index] as an int, or an error saying that export needs it fixed."""
    size = None if shape is None else shape[index]
    if not isinstance(size, int):
        raise ArgumentError(
            f"{name} must be static to export to ONNX DeformConv (its group and "
            f"offset_group attributes come from it), got {size}"
        )
    return size


def _onnx_attributes(
    input_shape: Any, offset_shape: Any, weight_shape: Any,
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], opset: int | None,
) -> dict[str, Any]:
    """ONNX DeformConv's attributes for one call of the op, from its shapes
    (ints, or None / symbols where dynamic) and conv arguments.

    Raises ArgumentError for what DeformConv, as onnxruntime runs it, cannot
    express: an opset before 19, a dynamic channel or kernel size, a weight
    with 0 output channels, (H + 1) * W above 2**31 - 1.
    """
    if opset is not None and opset < ONNX_MIN_OPSET:
        raise ArgumentError(f"ONNX DeformConv needs opset_version >= {ONNX_MIN_OPSET}, got {opset}")
    in_channels = _static_size(input_shape, 1, "input.shape[1] (C_in)")
    offset_channels = _static_size(offset_shape, 1, "offset.shape[1]")
    out_channels, per_group, kernel_h, kernel_w = (
        _static_size(weight_shape, i, f"weight.shape[{i}]") for i in range(4)
    )
    if out_channels == 0:
        raise ArgumentError(
            "weight.shape[0] (C_out) must be >= 1 to export to ONNX DeformConv "
            "(onnxruntime rejects 0 output channels), got 0"
        )
    height, width = input_shape[2], input_shape[3]
    if isinstance(height, int) and isinstance(width, int) and (height + 1) * width > 2**31 - 1:
        raise ArgumentError(
            f"input (H, W) = ({height}, {width}) is too large for onnxruntime's DeformConv, "
            f"which needs (H + 1) * W <= 2**31 - 1"
        )
    return dict(
        strides=[int(v) for v in stride],
        pads=[int(padding[0]), int(padding[1]), int(padding[0]), int(padding[1])],
        dilations=[int(v) for v in dilation],
        group=in_channels // per_group,
        offset_group=offset_channels // (2 * kernel_h * kernel_w),
        kernel_shape=[kernel_h, kernel_w],
    )


def _deform_conv2d_onnx(input, offset, weight, bias, mask, stride, padding, dilation):
    """torch.onnx's dynamo exporter: ``cudcn::deform_conv2d`` as one DeformConv node
    (inputs X, W, offset, then B and mask when the call has them)."""
    import onnxscript
    from onnxscript import opset19 as op

    # The exporter records ops into a graph of its target opset.
    opset = getattr(getattr(onnxscript.evaluator.default(), "opset", None), "version", None)
    attributes = _onnx_attributes(input.shape, offset.shape, weight.shape, stride, padding, dilation, opset)
    return op.DeformConv(input, weight, offset, bias, mask, **attributes)


def onnx_translation_table() -> dict[Any, Any]:
    """cudcn's op as ONNX DeformConv (opset >= 19), for torch's dynamo exporter.

    ``torch.onnx.export(model, args, f, dynamo=True,
    custom_translation_table=cudcn.torch.onnx_translation_table())`` exports
    every call of :func:`deform_conv2d` (and so of the modules) as a standard
    ``DeformConv`` node. Needs onnxscript (torch's exporter needs it anyway).
    """
    return {torch.ops.cudcn.deform_conv2d.default: _deform_conv2d_onnx}


def _deform_conv2d_symbolic(g, input, offset, weight, bias, mask, stride, padding, dilation):
    """torch.onnx's legacy (TorchScript, dynamo=False) exporter: the same DeformConv node.

    stride, padding and dilation arrive as lists of ints (parse_args below).
    """
    # The traced node's shapes: ONNX shape inference can lose static channel
    # counts (a Concat under a dynamic batch) that the trace still knows.
    traced = g.original_node
    shapes = [traced.inputsAt(i).type().varyingSizes() for i in range(3)]  # input, offset, weight
    attributes = _onnx_attributes(*shapes, stride, padding, dilation, g.opset)
    inputs = [input, weight, offset]
    if not mask.node().mustBeNone():
        inputs += [bias, mask]  # an absent bias stays an empty input
    elif not bias.node().mustBeNone():
        inputs.append(bias)
    return g.op("DeformConv", *inputs, **{f"{key}_i": value for key, value in attributes.items()})


# The legacy exporter is deprecated; where a torch no longer has it, nothing to register.
if hasattr(torch.onnx, "register_custom_op_symbolic"):
    from torch.onnx.symbolic_helper import parse_args

    torch.onnx.register_custom_op_symbolic(
        "cudcn::deform_conv2d",
        parse_args("v", "v", "v", "v", "v", "is", "is", "is")(_deform_conv2d_symbolic),
        ONNX_MIN_OPSET,
    )
