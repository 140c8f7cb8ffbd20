"""paddle adapter: ``cudcn.paddle.deform_conv2d`` and drop-in layers.

A drop-in for ``paddle.vision.ops.deform_conv2d`` and
``paddle.vision.ops.DeformConv2D``, plus the DCNv1/DCNv2 "pack" layers that
predict their own offsets and a CoordConv layer, mirroring :mod:`cudcn.torch`.
Importing this module imports paddle; ``import cudcn`` alone never does.

How a call runs:

- Autograd goes through a ``paddle.autograd.PyLayer`` whose forward and
  backward call the core's :func:`cudcn.deform_conv2d` and
  :func:`cudcn.deform_conv2d_backward`.
- GPU tensors go to CuPy through DLPack without copies (beyond making inputs
  contiguous), on the tensor's device and paddle's current stream, and the
  CUDA backend runs there; results come back through DLPack.
- CPU tensors go to NumPy through DLPack without copies and the NumPy backend
  runs. NumPy has no bfloat16: a CPU bfloat16 call is computed from float32
  copies and its results are rounded back to bfloat16.

Differences from paddle's op: at a sampling point exactly on row or column
-1 the offset gradient is torchvision's one-sided slope towards row (column)
0, where paddle's op (like mmcv) returns 0; out_channels need not be
divisible by deformable_groups; float16 (and on GPU bfloat16) inputs run in their own
dtype; paddle's automatic mixed precision does not cast for this function, so
all floating arguments must share one dtype. Errors name the arguments as
paddle does (``x`` for the input).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import paddle
from paddle.autograd import PyLayer
from paddle.nn.initializer import Constant, Normal

import cudcn
from cudcn.errors import ArgumentError, ArgumentTypeError
from cudcn.geometry import FLOAT_DTYPES, Geometry, validate

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


# --------------------------------------------------------------------------
# Tensors to arrays and back
# --------------------------------------------------------------------------

_ZERO_BYTES = bytes(16)  # the buffer of every stand-in (all strides are 0)


def _dtype_name(t: paddle.Tensor) -> str:
    return str(t.dtype).removeprefix("paddle.")


def _stand_in(name: str, t: paddle.Tensor) -> np.ndarray:
    """A NumPy array with t's shape and dtype and no data, for the core's validation."""
    if t.dtype == paddle.bfloat16:  # NumPy has none; _check keeps mixes out.
        dtype = np.dtype(np.float32)
    else:
        try:
            dtype = np.dtype(_dtype_name(t))
        except TypeError:
            raise ArgumentTypeError(
                f"{name}.dtype must be one of {', '.join(FLOAT_DTYPES)}, got {_dtype_name(t)}"
            ) from None
    shape = tuple(t.shape)
    return np.ndarray(shape, dtype, buffer=_ZERO_BYTES, strides=(0,) * len(shape))


def _check(
    x: paddle.Tensor,
    offset: paddle.Tensor,
    weight: paddle.Tensor,
    bias: paddle.Tensor | None,
    mask: paddle.Tensor | None,
    stride: Any,
    padding: Any,
    dilation: Any,
) -> Geometry:
    """The core's validation, on data-less NumPy stand-ins, with paddle's names."""
    tensors = {"x": x, "offset": offset, "weight": weight, "bias": bias, "mask": mask}
    given = {name: t for name, t in tensors.items() if t is not None}
    for name, t in given.items():
        if not isinstance(t, paddle.Tensor):
            raise ArgumentTypeError(f"{name} must be a paddle.Tensor, got {type(t).__name__}")
    for name, t in given.items():
        if str(t.place) != str(x.place):
            raise ArgumentError(f"{name} is on {t.place} but x is on {x.place}; pass tensors on one place")
    # Stand-ins show bfloat16 as float32, so a bfloat16/float32 mix must be
    # caught here; every other mix the core reports.
    if any(t.dtype == paddle.bfloat16 for t in given.values()):
        for name, t in given.items():
            if t.dtype != x.dtype:
                raise ArgumentTypeError(
                    f"{name}.dtype must equal x.dtype = {_dtype_name(x)}, got {_dtype_name(t)}"
                )
    stand_ins = {name: _stand_in(name, t) for name, t in given.items()}
    stand_ins["input"] = stand_ins.pop("x")
    return validate(
        **stand_ins, stride=stride, padding=padding, dilation=dilation, names=NAMES
    )


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
    """A backend result as a tensor of ``dtype`` (no copy when it is one)."""
    t = paddle.utils.dlpack.from_dlpack(array)
    return t if t.dtype == dtype else t.astype(dtype)


@contextlib.contextmanager
def _backend_context(t: paddle.Tensor) -> Iterator[None]:
    """Where a call on ``t`` runs: for GPU, CuPy on t's device and paddle's stream.

    DLPack exchanges inside this context see one stream on both sides, so
    they add no synchronisation.
    """
    if not t.place.is_gpu_place():
        yield
        return
    import cupy

    device_id = t.place.gpu_device_id()
    stream = paddle.device.current_stream(f"gpu:{device_id}")
    with cupy.cuda.Device(device_id):
        # Made inside the device context so that it belongs to t's device.
        # CuPy >= 14 takes any object with __cuda_stream__ and deprecates ExternalStream.
        if hasattr(cupy.cuda.Stream, "from_external") and hasattr(stream, "__cuda_stream__"):
            cupy_stream = cupy.cuda.Stream.from_external(stream)
        else:
            cupy_stream = cupy.cuda.ExternalStream(stream.stream_base.cuda_stream, device_id)
        with cupy_stream:
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


# --------------------------------------------------------------------------
# The public function
# --------------------------------------------------------------------------


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

    Args:
        x: (N, C_in, H, W).
        offset: (N, 2*deformable_groups*kh*kw, Ho, Wo).
        weight: (C_out, C_in/groups, kh, kw).
        bias: (C_out,) or None.
        stride, padding, dilation: int or (rows, columns).
        deformable_groups: offset groups; must agree with offset.shape[1].
            C_in must be divisible by it (C_out need not be).
        groups: convolution groups; must agree with C_in / weight.shape[1].
        mask: (N, deformable_groups*kh*kw, Ho, Wo) modulation, or None for DCNv1.
        name: unused; paddle's signature has it.

    Returns:
        (N, C_out, Ho, Wo), ``Ho = (H + 2*pad_h - dil_h*(kh-1) - 1) // stride_h + 1``
        (likewise Wo), on x's place, in x's dtype.

    Raises:
        TypeError, ValueError: the core's message when an argument is wrong,
            naming paddle's arguments; ValueError when deformable_groups or
            groups disagree with the shapes.
    """
    geom = _check(x, offset, weight, bias, mask, stride, padding, dilation)
    if deformable_groups != geom.offset_groups:
        expected = 2 * deformable_groups * geom.kernel_points
        raise ArgumentError(
            f"offset.shape[1] must be 2*deformable_groups*kh*kw = {expected} "
            f"(deformable_groups = {deformable_groups}, kernel "
            f"{geom.kernel_h}x{geom.kernel_w}), got {offset.shape[1]}"
        )
    if groups != geom.groups:
        raise ArgumentError(
            f"weight.shape[1] must be x.shape[1] / groups = {geom.in_channels} / "
            f"{groups} (groups = {groups}), got {weight.shape[1]}"
        )
    return _DeformConv2dFunction.apply(x, offset, weight, bias, mask, (stride, padding, dilation))


# --------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------


def _pair(value: IntOrPair) -> list[int]:
    return list(value) if isinstance(value, (tuple, list)) else [value, value]


class DeformConv2D(paddle.nn.Layer):
    """Deformable convolution layer; a drop-in for ``paddle.vision.ops.DeformConv2D``.

    Same constructor, parameters ``weight`` (C_out, C_in/groups, kh, kw) and
    ``bias`` (C_out,) (None with bias_attr=False), initialisation
    (weight Normal(0, sqrt(2 / (kh*kw*C_in))), bias zero) and state-dict keys.
    ``forward(x, offset, mask=None)`` takes the shapes of :func:`deform_conv2d`.
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
        if in_channels % groups != 0:
            raise ArgumentError(f"in_channels = {in_channels} must be divisible by groups = {groups}")
        if out_channels % groups != 0:
            raise ArgumentError(f"out_channels = {out_channels} must be divisible by groups = {groups}")
        # paddle's attribute names, for code that reads them.
        self._in_channels = in_channels
        self._out_channels = out_channels
        self._kernel_size = _pair(kernel_size)
        self._stride = _pair(stride)
        self._padding = _pair(padding)
        self._dilation = _pair(dilation)
        self._deformable_groups = deformable_groups
        self._groups = groups
        kh, kw = self._kernel_size
        self.weight = self.create_parameter(
            shape=[out_channels, in_channels // groups, kh, kw],
            attr=weight_attr,
            default_initializer=Normal(0.0, (2.0 / (kh * kw * in_channels)) ** 0.5),
        )
        self.bias = self.create_parameter(shape=[out_channels], attr=bias_attr, is_bias=True)

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
        if deformable_groups < 1 or in_channels % deformable_groups != 0:
            raise ArgumentError(
                f"in_channels = {in_channels} must be divisible by "
                f"deformable_groups = {deformable_groups}"
            )
        kh, kw = self._kernel_size
        zero = paddle.ParamAttr(initializer=Constant(0.0))
        self.conv_offset = paddle.nn.Conv2D(
            in_channels,
            self.values_per_point * deformable_groups * kh * kw,
            kernel_size=self._kernel_size,
            stride=self._stride,
            padding=self._padding,
            dilation=self._dilation,
            weight_attr=zero,
            bias_attr=zero,
        )


class DeformConv2DPack(_Pack):
    """DCNv1 layer that predicts its own offsets (cudcn.torch.DeformConv2dPack for paddle).

    ``conv_offset`` maps x to offsets (N, 2*deformable_groups*kh*kw, Ho, Wo);
    it starts at zero, so the layer starts as a plain convolution.
    ``forward(x)``: (N, C_in, H, W) -> (N, C_out, Ho, Wo).
    """

    values_per_point = 2

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:  # type: ignore[override]
        return self._conv(x, self.conv_offset(x), None)


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
        o1, o2, m = paddle.chunk(self.conv_offset(x), 3, axis=1)
        return self._conv(x, paddle.concat((o1, o2), axis=1), paddle.nn.functional.sigmoid(m))


def coordinate_channels(x: paddle.Tensor) -> paddle.Tensor:
    """The two CoordConv channels for x (N, C, H, W): (N, 2, H, W).

    Channel 0 is the column coordinate (varies along the width), channel 1 the
    row coordinate (varies along the height), each from -1 to 1 (a size-1
    axis gets -1), in x's dtype.
    """
    n, _, height, width = x.shape
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
    with in_channels + 2 inputs. ``forward(x)``: (N, C_in, H, W) -> (N, C_out, Ho, Wo).
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
        self.conv = paddle.nn.Conv2D(
            in_channels + 2, out_channels, kernel_size, stride, padding, dilation, groups,
            weight_attr=weight_attr, bias_attr=bias_attr,
        )

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.conv(paddle.concat((x, coordinate_channels(x)), axis=1))
