"""paddle adapter: ``cudcn.paddle.deform_conv2d`` and drop-in layers.

A drop-in for ``paddle.vision.ops.deform_conv2d`` and
``paddle.vision.ops.DeformConv2D``, plus the DCNv1/DCNv2 "pack" layers that
predict their own offsets and a CoordConv layer, mirroring :mod:`cudcn.torch`.
Importing this module imports paddle; ``import cudcn`` alone never does.

How a call runs (dygraph, paddle's default mode):

- Autograd goes through a ``paddle.autograd.PyLayer`` whose forward and
  backward call the core's :func:`cudcn.deform_conv2d` and
  :func:`cudcn.deform_conv2d_backward`.
- GPU tensors go to CuPy through DLPack without copies (beyond making inputs
  contiguous), on the tensor's device and paddle's current stream, and the
  CUDA backend runs there; results come back through DLPack. CuPy takes its
  memory (workspace and results) from paddle's allocator, as paddle tensors,
  so paddle sees and reuses it; CuPy's own memory pool is not used.
- CPU tensors go to NumPy through DLPack without copies and the NumPy backend
  runs. NumPy has no bfloat16: a CPU bfloat16 call is computed from float32
  copies and its results are rounded back to bfloat16.

Static graph (``paddle.jit.to_static``, ``paddle.jit.save``, or
``paddle.enable_static()``): the function checks the call as in dygraph and
then emits paddle's own ``deform_conv2d`` op into the graph, so a saved
model runs in ``paddle.jit.load`` and Paddle Inference without cudcn. The
results are paddle's op's: the same values (to rounding), but in that mode

- out_channels must be divisible by deformable_groups (paddle's op requires
  it; cudcn raises a ValueError naming both when the graph is built);
- the dtypes are those paddle's op has kernels for on the place (float32 and
  float64 on the CPU);
- a graph trained in static mode gets paddle's offset gradient at row or
  column -1 (0, see below);
- sizes the graph leaves unknown (-1, e.g. a batch or image size declared
  None in an InputSpec) are checked by paddle's op when the graph runs.

Differences from paddle's op: at a sampling point exactly on row or column
-1 the offset gradient is torchvision's one-sided slope towards row (column)
0, where paddle's op (like mmcv) returns 0; out_channels need not be
divisible by deformable_groups; float16 (and on GPU bfloat16) inputs run in their own
dtype; paddle's automatic mixed precision does not cast for this function, so
all floating arguments must share one dtype.

Errors name the arguments as paddle does (``x`` for the input): a malformed
call raises :class:`cudcn.ArgumentTypeError` (a TypeError: None or a wrong
type where a tensor or an int is required, e.g. ``groups=2.0``, as paddle's
op does) or :class:`cudcn.ArgumentError` (a ValueError: shapes, sizes,
stride/padding/dilation); both are also RuntimeErrors.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import paddle
from paddle.autograd import PyLayer
from paddle.nn.initializer import Constant, Normal

import cudcn
from cudcn.backends.cuda.engine import LEGACY_DEFAULT_STREAM, external_stream
from cudcn.errors import ArgumentError, ArgumentTypeError
from cudcn.geometry import FLOAT_DTYPES, Geometry, int_pair, validate

__all__ = [
    "CoordConv2D",
    "DeformConv2D",
    "DeformConv2DPack",
    "ModulatedDeformConv2DPack",
    "deform_conv2d",
]

IntOrPair = int | tuple[int, int] | list[int]

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

#: What a tensor is while paddle builds a static graph (PIR, and the legacy IR).
_STATIC_TENSOR_TYPES = (paddle.pir.Value, paddle.static.Variable)


# --------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------


def _count(value: Any, name: str, minimum: int) -> int:
    """An int argument such as groups, at least ``minimum``.

    Like paddle's own op, a bool, float or str is a TypeError (NumPy ints
    are ints).
    """
    shown = "None" if value is None else f"{type(value).__name__} {value!r}"
    if isinstance(value, (bool, np.bool_)):
        raise ArgumentTypeError(f"{name} must be an int, got {shown}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ArgumentTypeError(f"{name} must be an int, got {shown}") from None
    if value < minimum:
        raise ArgumentError(f"{name} must be >= {minimum}, got {value}")
    return value


def _is_tensor(t: Any) -> bool:
    """A paddle tensor, or a static-graph value while paddle builds a graph."""
    if paddle.in_dynamic_mode():
        return isinstance(t, paddle.Tensor)
    return isinstance(t, _STATIC_TENSOR_TYPES)


def _type_name(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def _dtype_name(t: paddle.Tensor) -> str:
    return str(t.dtype).removeprefix("paddle.")


_ZERO_BYTES = bytes(16)  # the buffer of every stand-in (all strides are 0)


def _stand_in(name: str, t: paddle.Tensor, shape: list[int]) -> np.ndarray:
    """A NumPy array with t's dtype, the given shape and no data, for the core's validation."""
    if t.dtype == paddle.bfloat16:  # NumPy has none; _check keeps mixes out.
        dtype = np.dtype(np.float32)
    else:
        try:
            dtype = np.dtype(_dtype_name(t))
        except TypeError:
            raise ArgumentTypeError(
                f"{name}.dtype must be one of {', '.join(FLOAT_DTYPES)}, got {_dtype_name(t)}"
            ) from None
    if any(size < 0 for size in shape):
        raise ArgumentError(f"{name}.shape must be known when the graph is built, got {shape}")
    return np.ndarray(tuple(shape), dtype, buffer=_ZERO_BYTES, strides=(0,) * len(shape))


def _output_size(
    sizes: list[int], kernel: list[int], stride: tuple[int, int], padding: tuple[int, int],
    dilation: tuple[int, int],
) -> list[int]:
    """(Ho, Wo) for input sizes (H, W): ``(H + 2*pad - dil*(k-1) - 1) // stride + 1`` each."""
    return [
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, k, s, p, d in zip(sizes, kernel, stride, padding, dilation)
    ]


def _static_shapes(
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
    out = _output_size(sizes, kernel, stride, padding, dilation)

    def resolved(shape: list[int], channels: int) -> list[int]:
        spatial = [o if own < 0 or size < 0 else own for own, o, size in zip(shape[2:], out, x[2:])]
        return [batch if shape[0] < 0 else shape[0], channels if shape[1] < 0 else shape[1], *spatial]

    result = dict(shapes)
    result["x"] = [batch, weight[1] * groups if x[1] < 0 else x[1], *sizes]
    result["offset"] = resolved(offset, 2 * deformable_groups * points)
    if mask is not None:
        result["mask"] = resolved(mask, deformable_groups * points)
    return result


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
    deformable_groups = _count(deformable_groups, "deformable_groups", 1)
    groups = _count(groups, "groups", 1)
    tensors = {"x": x, "offset": offset, "weight": weight, "bias": bias, "mask": mask}
    for name, t in tensors.items():
        if not (_is_tensor(t) or (t is None and name in ("bias", "mask"))):
            raise ArgumentTypeError(
                f"{name} must be a paddle.Tensor {LAYOUTS[name]}, got {_type_name(t)}"
            )
    given = {name: t for name, t in tensors.items() if t is not None}
    static = not paddle.in_dynamic_mode()
    if x is not None and not static:
        for name, t in given.items():
            if str(t.place) != str(x.place):
                raise ArgumentError(f"{name} is on {t.place} but x is on {x.place}; pass tensors on one place")
    # Stand-ins show bfloat16 as float32, so a bfloat16/float32 mix must be
    # caught here; every other mix the core reports.
    if x is not None and any(t.dtype == paddle.bfloat16 for t in given.values()):
        for name, t in given.items():
            if t.dtype != x.dtype:
                raise ArgumentTypeError(
                    f"{name}.dtype must equal x.dtype = {_dtype_name(x)}, got {_dtype_name(t)}"
                )
    shapes = {name: list(t.shape) for name, t in given.items()}
    if static:
        shapes = _static_shapes(shapes, stride, padding, dilation, deformable_groups, groups)
    stand_ins: dict[str, Any] = {name: _stand_in(name, t, shapes[name]) for name, t in given.items()}
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


@paddle.jit.not_to_static  # plain Python on static values: see deform_conv2d
def _check_layer_input(x: Any, layer: DeformConv2D | CoordConv2D, weight: paddle.Tensor) -> None:
    """x for a layer that hands it to a paddle convolution first (the packs, CoordConv2D).

    Checked here so that the error names x, not paddle's conv2d (which
    returns an empty output for an input smaller than the kernel). The dtype
    is left to paddle under automatic mixed precision, which casts for its
    convolutions.
    """
    if not _is_tensor(x):
        raise ArgumentTypeError(f"x must be a paddle.Tensor {LAYOUTS['x']}, got {_type_name(x)}")
    if len(x.shape) != 4:
        raise ArgumentError(
            f"x must be a 4-D tensor (N, C_in, H, W), got {len(x.shape)}-D with shape {list(x.shape)}"
        )
    if x.shape[1] not in (layer._in_channels, -1):
        raise ArgumentError(f"x.shape[1] (C_in) must be in_channels = {layer._in_channels}, got {x.shape[1]}")
    if x.dtype != weight.dtype and not paddle.amp.is_autocast_enabled():
        raise ArgumentTypeError(
            f"x.dtype must equal the layer's weight.dtype = {_dtype_name(weight)}, got {_dtype_name(x)}"
        )
    sizes = list(x.shape[2:])
    out = _output_size(sizes, layer._kernel_size, layer._stride, layer._padding, layer._dilation)
    if any(o < 1 and size >= 0 for o, size in zip(out, sizes)):
        raise ArgumentError(
            f"x.shape[2:] (H, W) = {tuple(sizes)} is too small: the output size (Ho, Wo) = "
            f"{tuple(out)} must be at least 1x1 (kernel {tuple(layer._kernel_size)}, stride "
            f"{tuple(layer._stride)}, padding {tuple(layer._padding)}, dilation {tuple(layer._dilation)})"
        )


# --------------------------------------------------------------------------
# Tensors to arrays and back
# --------------------------------------------------------------------------


def _to_array(t: paddle.Tensor | None) -> Any:
    """A contiguous tensor as a CuPy (GPU) or NumPy (CPU) array on the same memory."""
    if t is None:
        return None
    t = t.detach().contiguous()
    if t.place.is_gpu_place():
        import cupy

        try:
            return cupy.from_dlpack(t)
        except Exception as error:
            if t.dtype != paddle.bfloat16:
                raise
            raise ArgumentTypeError(
                "bfloat16 on CUDA needs CuPy 14 or newer with ml_dtypes "
                "(CuPy's bfloat16 type); this CuPy cannot import it through DLPack"
            ) from error
    if t.dtype == paddle.bfloat16:  # NumPy's DLPack has no bfloat16.
        t = t.astype("float32")
    return np.from_dlpack(t)


def _to_tensor(array: Any, dtype: Any) -> paddle.Tensor:
    """A backend result as a contiguous tensor of ``dtype`` (no copy when it is one)."""
    t = paddle.utils.dlpack.from_dlpack(array).contiguous()
    return t if t.dtype == dtype else t.astype(dtype)


# --------------------------------------------------------------------------
# GPU memory and streams
# --------------------------------------------------------------------------

#: Alignment of the blocks handed to CuPy, as cudaMalloc gives (the kernels'
#: vector loads need less; paddle's blocks are usually aligned already, and
#: the slack costs under this many bytes a block).
_ALIGNMENT = 256


def _paddle_memory(place: Any) -> tuple[Callable[[int, int], int], Callable[[int, int], None]]:
    """malloc(nbytes, device) and free(pointer, device) for CuPy, on paddle tensors.

    Each block is a uint8 paddle tensor on ``place``, kept alive until CuPy
    frees the block; paddle's allocator then takes it back (stream-ordered
    on paddle's current stream, the stream the block was used on).
    """
    blocks: dict[int, paddle.Tensor] = {}

    def malloc(nbytes: int, device: int) -> int:
        block = paddle.empty([nbytes + _ALIGNMENT - 1], dtype="uint8", device=place)
        pointer = -(-block.data_ptr() // _ALIGNMENT) * _ALIGNMENT
        blocks[pointer] = block
        return pointer

    def free(pointer: int, device: int) -> None:
        del blocks[pointer]

    return malloc, free


def _stream_pointer(stream: Any) -> int:
    """The raw handle of a paddle stream, with the legacy default stream as 1.

    paddle may show the legacy default stream as 0. CuPy reads a current
    stream of 0 as its own default stream and, under
    CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1, hands paddle the DLPack stream
    value 2 (per-thread default stream), which paddle rejects; 1 means the
    legacy default stream to both, and CUDA accepts it as a handle.
    """
    if hasattr(stream, "__cuda_stream__"):
        pointer = stream.__cuda_stream__()[1]
    else:
        pointer = stream.stream_base.cuda_stream
    return pointer or LEGACY_DEFAULT_STREAM


_cupy_stream = external_stream  # (cupy, raw handle, device id) -> CuPy stream


@contextlib.contextmanager
def _backend_context(t: paddle.Tensor) -> Iterator[None]:
    """Where a call on ``t`` runs: for GPU, CuPy on t's device, paddle's stream and memory.

    DLPack exchanges inside this context see one stream on both sides, so
    they add no synchronisation.
    """
    if not t.place.is_gpu_place():
        yield
        return
    import cupy

    device_id = t.place.gpu_device_id()
    stream = _cupy_stream(cupy, _stream_pointer(paddle.device.current_stream(f"gpu:{device_id}")), device_id)
    allocator = cupy.cuda.memory.PythonFunctionAllocator(*_paddle_memory(t.place)).malloc
    with cupy.cuda.Device(device_id), stream, cupy.cuda.using_allocator(allocator):
        yield


# --------------------------------------------------------------------------
# The op wrappers and the autograd layer
# --------------------------------------------------------------------------


def _forward(x, offset, weight, bias, mask, stride, padding, dilation) -> paddle.Tensor:
    """Output (N, C_out, Ho, Wo) from the core's forward."""
    with _backend_context(x):
        arrays = [_to_array(t) for t in (x, offset, weight, bias, mask)]
        out = cudcn.deform_conv2d(
            *arrays[:4], stride=stride, padding=padding, dilation=dilation,
            mask=arrays[4], names=NAMES,
        )
        return _to_tensor(out, x.dtype)


def _backward(grad_out, x, offset, weight, bias, mask, stride, padding, dilation) -> cudcn.Gradients:
    """Gradients (input, offset, weight, bias, mask) from the core's backward."""
    with _backend_context(x):
        arrays = [_to_array(t) for t in (grad_out, x, offset, weight, bias, mask)]
        grads = cudcn.deform_conv2d_backward(
            *arrays[:5], stride=stride, padding=padding, dilation=dilation,
            mask=arrays[5], names=NAMES,
        )
        return cudcn.Gradients(*(None if g is None else _to_tensor(g, x.dtype) for g in grads))


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
        grads = _backward(grad_out, x, offset, weight, bias, mask, *ctx.conv_args)
        present = [g for g, given in zip(grads, (True, True, True, ctx.has_bias, ctx.has_mask)) if given]
        return tuple(g if needed else None for g, needed in zip(present, ctx.needs_grad))


def _static_deform_conv2d(x, offset, weight, bias, mask, geom: Geometry) -> Any:
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
        return _static_deform_conv2d(x, offset, weight, bias, mask, geom)
    return _DeformConv2dFunction.apply(x, offset, weight, bias, mask, (stride, padding, dilation))


# --------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------


def _conv_arguments(
    in_channels: Any, out_channels: Any, kernel_size: Any, stride: Any, padding: Any,
    dilation: Any, groups: Any, min_out_channels: int = 0, in_name: str = "in_channels",
) -> tuple[int, int, list[int], list[int], list[int], list[int], int]:
    """A layer's convolution arguments, checked: (in, out, kernel, stride, padding, dilation, groups).

    ``in_name`` is what the convolution's input channel count is called in messages.
    """
    in_channels = _count(in_channels, in_name, 1)
    out_channels = _count(out_channels, "out_channels", min_out_channels)
    groups = _count(groups, "groups", 1)
    pairs = [
        list(int_pair(value, name, minimum))
        for value, name, minimum in (
            (kernel_size, "kernel_size", 1), (stride, "stride", 1),
            (padding, "padding", 0), (dilation, "dilation", 1),
        )
    ]
    if in_channels % groups:
        raise ArgumentError(f"{in_name} = {in_channels} must be divisible by groups = {groups}")
    if out_channels % groups:
        raise ArgumentError(f"out_channels = {out_channels} must be divisible by groups = {groups}")
    return (in_channels, out_channels, *pairs, groups)


def _param_attr(attr: Any, name: str) -> Any:
    """attr, if paddle can read it as a parameter attribute; else a clear error."""
    try:
        paddle.ParamAttr._to_attr(attr)
    except TypeError:
        raise ArgumentTypeError(
            f"{name} must be a paddle.ParamAttr, a name, an initializer, a bool or None, "
            f"got {type(attr).__name__}"
        ) from None
    return attr


class DeformConv2D(paddle.nn.Layer):
    """Deformable convolution layer; a drop-in for ``paddle.vision.ops.DeformConv2D``.

    Same constructor, parameters ``weight`` (C_out, C_in/groups, kh, kw) and
    ``bias`` (C_out,) (None with bias_attr=False), initialisation
    (weight Normal(0, sqrt(2 / (kh*kw*C_in))), bias zero) and state-dict keys.
    ``forward(x, offset, mask=None)`` takes the shapes of :func:`deform_conv2d`.
    The constructor checks its arguments (ints, sizes, divisibility by the
    groups) and raises cudcn.ArgumentTypeError / cudcn.ArgumentError naming them.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: IntOrPair = 0,
        dilation: IntOrPair = 1,
        deformable_groups: int = 1,
        groups: int = 1,
        weight_attr: Any = None,
        bias_attr: Any = None,
    ) -> None:
        super().__init__()
        if weight_attr is False:
            raise ArgumentError("weight_attr must not be False: the layer needs a weight")
        in_channels, out_channels, kernel, stride, padding, dilation, groups = _conv_arguments(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups
        )
        deformable_groups = _count(deformable_groups, "deformable_groups", 1)
        if in_channels % deformable_groups:
            raise ArgumentError(
                f"in_channels = {in_channels} must be divisible by "
                f"deformable_groups = {deformable_groups}"
            )
        # paddle's attribute names, for code that reads them.
        self._in_channels = in_channels
        self._out_channels = out_channels
        self._kernel_size = kernel
        self._stride = stride
        self._padding = padding
        self._dilation = dilation
        self._deformable_groups = deformable_groups
        self._groups = groups
        kh, kw = kernel
        self.weight = self.create_parameter(
            shape=[out_channels, in_channels // groups, kh, kw],
            attr=_param_attr(weight_attr, "weight_attr"),
            default_initializer=Normal(0.0, (2.0 / (kh * kw * in_channels)) ** 0.5),
        )
        self.bias = self.create_parameter(
            shape=[out_channels], attr=_param_attr(bias_attr, "bias_attr"), is_bias=True
        )

    def _conv(self, x, offset, mask):
        return deform_conv2d(
            x, offset, self.weight, self.bias, self._stride, self._padding,
            self._dilation, self._deformable_groups, self._groups, mask,
        )

    def forward(self, x: paddle.Tensor, offset: paddle.Tensor, mask: paddle.Tensor | None = None) -> paddle.Tensor:
        """x (N, C_in, H, W), offset (N, 2*G*kh*kw, Ho, Wo), mask (N, G*kh*kw, Ho, Wo)."""
        return self._conv(x, offset, mask)

    def extra_repr(self) -> str:
        return (
            f"{self._in_channels}, {self._out_channels}, kernel_size={self._kernel_size}, "
            f"stride={self._stride}, padding={self._padding}, dilation={self._dilation}, "
            f"deformable_groups={self._deformable_groups}, groups={self._groups}"
        )


class _Pack(DeformConv2D):
    """A deformable convolution whose offsets come from ``self.conv_offset``.

    ``conv_offset`` is a Conv2D with the layer's kernel size, stride, padding
    and dilation, initialised to zero; ``values_per_point`` is how many
    channels it predicts per kernel point and deformable group.
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
        deformable_groups: int = 1,
        groups: int = 1,
        weight_attr: Any = None,
        bias_attr: Any = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation,
            deformable_groups, groups, weight_attr, bias_attr,
        )
        kh, kw = self._kernel_size
        zero = paddle.ParamAttr(initializer=Constant(0.0))
        self.conv_offset = paddle.nn.Conv2D(
            self._in_channels,
            self.values_per_point * self._deformable_groups * kh * kw,
            kernel_size=self._kernel_size,
            stride=self._stride,
            padding=self._padding,
            dilation=self._dilation,
            weight_attr=zero,
            bias_attr=zero,
        )

    def _offsets(self, x: paddle.Tensor) -> paddle.Tensor:
        """conv_offset(x), once x is checked (paddle's conv2d would not name it)."""
        _check_layer_input(x, self, self.weight)
        return self.conv_offset(x)


class DeformConv2DPack(_Pack):
    """DCNv1 layer that predicts its own offsets (cudcn.torch.DeformConv2dPack for paddle).

    ``conv_offset`` maps x to offsets (N, 2*deformable_groups*kh*kw, Ho, Wo);
    it starts at zero, so the layer starts as a plain convolution.
    ``forward(x)``: (N, C_in, H, W) -> (N, C_out, Ho, Wo).
    """

    values_per_point = 2

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:  # type: ignore[override]
        return self._conv(x, self._offsets(x), None)


class ModulatedDeformConv2DPack(_Pack):
    """DCNv2 layer that predicts offsets and mask (cudcn.torch.ModulatedDeformConv2dPack for paddle).

    ``conv_offset`` maps x to 3*deformable_groups*kh*kw channels, split in
    three equal parts (o1, o2, m): offset = concat(o1, o2), mask = sigmoid(m).
    It starts at zero, so the layer starts as a plain convolution whose
    weighted sum is scaled by 0.5 (the bias is not scaled).
    ``forward(x)``: (N, C_in, H, W) -> (N, C_out, Ho, Wo).
    """

    values_per_point = 3

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:  # type: ignore[override]
        o1, o2, m = paddle.chunk(self._offsets(x), 3, axis=1)
        return self._conv(x, paddle.concat((o1, o2), axis=1), paddle.nn.functional.sigmoid(m))


def coordinate_channels(x: paddle.Tensor) -> paddle.Tensor:
    """The two CoordConv channels for x (N, C, H, W): (N, 2, H, W).

    Channel 0 is the column coordinate (varies along the width), channel 1 the
    row coordinate (varies along the height), each from -1 to 1 (a size-1
    axis gets -1), in x's dtype.
    """
    # A static graph may leave sizes unknown (-1): take them from the graph then.
    shape = x.shape if paddle.in_dynamic_mode() else paddle.shape(x)
    n, height, width = shape[0], shape[2], shape[3]
    columns = paddle.linspace(-1, 1, width, dtype="float32")
    rows = paddle.linspace(-1, 1, height, dtype="float32")
    grid = paddle.stack(
        (columns.reshape([1, width]).expand([height, width]),
         rows.reshape([height, 1]).expand([height, width]))
    )
    return grid.astype(x.dtype).unsqueeze(0).expand([n, 2, height, width])


class CoordConv2D(paddle.nn.Layer):
    """CoordConv: a convolution that also sees where it is (cudcn.torch.CoordConv2d for paddle).

    Appends the two channels of :func:`coordinate_channels` (column, then
    row coordinate, each in [-1, 1]) to x and applies ``self.conv``, a Conv2D
    with in_channels + 2 inputs (so in_channels + 2 must be divisible by
    groups). ``forward(x)``: (N, C_in, H, W) -> (N, C_out, Ho, Wo); like
    paddle's Conv2D it takes batched 4-D input only.
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
        weight_attr: Any = None,
        bias_attr: Any = None,
    ) -> None:
        super().__init__()
        if weight_attr is False:
            raise ArgumentError("weight_attr must not be False: the layer needs a weight")
        in_channels = _count(in_channels, "in_channels", 1)
        _, out_channels, kernel, stride, padding, dilation, groups = _conv_arguments(
            in_channels + 2, out_channels, kernel_size, stride, padding, dilation, groups,
            min_out_channels=1, in_name="in_channels + 2",  # paddle's Conv2D needs a filter
        )
        self._in_channels = in_channels
        self._kernel_size, self._stride, self._padding, self._dilation = kernel, stride, padding, dilation
        self.conv = paddle.nn.Conv2D(
            in_channels + 2, out_channels, kernel, stride, padding, dilation, groups,
            weight_attr=_param_attr(weight_attr, "weight_attr"),
            bias_attr=_param_attr(bias_attr, "bias_attr"),
        )

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        _check_layer_input(x, self, self.conv.weight)
        return self.conv(paddle.concat((x, coordinate_channels(x)), axis=1))
