"""What every paddle op of cudcn needs, whatever its operator family.

An op of any family (deformable convolution, multi-scale deformable
attention, ...) is built from these pieces:

- checks and stand-ins: :func:`int_argument`, :func:`check_tensors`
  (paddle tensors, or static-graph values while paddle builds a graph, on
  one place, no bfloat16 mixed with another dtype) and :func:`stand_in`, a
  data-less NumPy array with a tensor's dtype and shape for the core's
  validation;
- data: :func:`to_array` (a tensor as a CuPy or NumPy array on the same
  memory, through DLPack) and :func:`to_tensor` (a result back);
- where the call runs: :func:`backend_context` (CuPy on the tensor's
  device, paddle's current stream, memory from paddle's allocator).
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Collection, Iterator
from typing import Any

import numpy as np
import paddle

from cudcn.backends.cuda.engine import LEGACY_DEFAULT_STREAM, external_stream
from cudcn.errors import ArgumentError, ArgumentTypeError
from cudcn.geometry import FLOAT_DTYPES

IntOrPair = int | tuple[int, int] | list[int]

#: What a tensor is while paddle builds a static graph (PIR, and the legacy IR).
STATIC_TENSOR_TYPES = (paddle.pir.Value, paddle.static.Variable)


# --------------------------------------------------------------------------
# Checks and stand-ins
# --------------------------------------------------------------------------


def int_argument(value: Any, name: str, minimum: int) -> int:
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


def is_tensor(t: Any) -> bool:
    """A paddle tensor, or a static-graph value while paddle builds a graph."""
    if paddle.in_dynamic_mode():
        return isinstance(t, paddle.Tensor)
    return isinstance(t, STATIC_TENSOR_TYPES)


def type_name(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def dtype_name(t: paddle.Tensor) -> str:
    return str(t.dtype).removeprefix("paddle.")


def check_tensors(
    tensors: dict[str, Any], layouts: dict[str, str], optional: Collection[str] = (),
    integer: Collection[str] = (),
) -> dict[str, Any]:
    """The tensors that are given: paddle tensors (static-graph values while
    paddle builds a graph), in dygraph on the first one's place, and no
    bfloat16 mixed with another dtype.

    Args:
        tensors: the call's tensors by argument name (paddle's names); the
            first is the one the others must agree with.
        layouts: the shape of each, for the message when one is not a tensor.
        optional: the names that may be None.
        integer: the names of integer tensors (shapes, indices), which keep
            their own dtype.

    Stand-ins show bfloat16 as float32, so a bfloat16/float32 mix must be
    caught here; every other mix the core reports.
    """
    for name, t in tensors.items():
        if not (is_tensor(t) or (t is None and name in optional)):
            raise ArgumentTypeError(f"{name} must be a paddle.Tensor {layouts[name]}, got {type_name(t)}")
    given = {name: t for name, t in tensors.items() if t is not None}
    first_name, first = next(iter(given.items()))
    if paddle.in_dynamic_mode():
        for name, t in given.items():
            if str(t.place) != str(first.place):
                raise ArgumentError(
                    f"{name} is on {t.place} but {first_name} is on {first.place}; pass tensors on one place"
                )
    floating = {name: t for name, t in given.items() if name not in integer}
    if any(t.dtype == paddle.bfloat16 for t in floating.values()):
        for name, t in floating.items():
            if t.dtype != first.dtype:
                raise ArgumentTypeError(
                    f"{name}.dtype must equal {first_name}.dtype = {dtype_name(first)}, got {dtype_name(t)}"
                )
    return given


_ZERO_BYTES = bytes(16)  # the buffer of every stand-in (all strides are 0)


def stand_in(name: str, t: paddle.Tensor, shape: list[int]) -> np.ndarray:
    """A NumPy array with t's dtype, the given shape and no data, for the core's validation.

    bfloat16 shows as float32 (NumPy has none): :func:`check_tensors` keeps
    bfloat16 mixed with another dtype out.
    """
    if t.dtype == paddle.bfloat16:
        dtype = np.dtype(np.float32)
    else:
        try:
            dtype = np.dtype(dtype_name(t))
        except TypeError:
            raise ArgumentTypeError(
                f"{name}.dtype must be one of {', '.join(FLOAT_DTYPES)}, got {dtype_name(t)}"
            ) from None
    if any(size < 0 for size in shape):
        raise ArgumentError(f"{name}.shape must be known when the graph is built, got {shape}")
    return np.ndarray(tuple(shape), dtype, buffer=_ZERO_BYTES, strides=(0,) * len(shape))


# --------------------------------------------------------------------------
# Tensors to arrays and back
# --------------------------------------------------------------------------


def to_array(t: paddle.Tensor | None) -> Any:
    """A contiguous tensor as a CuPy (GPU) or NumPy (CPU) array on the same memory
    (None stays None). A CPU bfloat16 tensor becomes a float32 copy."""
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


def to_tensor(array: Any, dtype: Any) -> paddle.Tensor:
    """A backend result as a contiguous tensor of ``dtype`` (no copy when it is one).

    Contiguous: paddle.DataParallel leaves strided gradients out of its
    all-reduce, silently (the NumPy backend's weight gradient is a
    transposed view).
    """
    t = paddle.utils.dlpack.from_dlpack(array).contiguous()
    return t if t.dtype == dtype else t.astype(dtype)


# --------------------------------------------------------------------------
# GPU memory and streams
# --------------------------------------------------------------------------

#: Alignment of the blocks handed to CuPy, as cudaMalloc gives (the kernels'
#: vector loads need less; paddle's blocks are usually aligned already, and
#: the slack costs under this many bytes a block).
_ALIGNMENT = 256


def paddle_memory(place: Any) -> tuple[Callable[[int, int], int], Callable[[int, int], None]]:
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


def stream_pointer(stream: Any) -> int:
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


@contextlib.contextmanager
def backend_context(t: paddle.Tensor) -> Iterator[None]:
    """Where a call on ``t`` runs: for GPU, CuPy on t's device, paddle's stream and memory.

    DLPack exchanges inside this context see one stream on both sides, so
    they add no synchronisation.
    """
    if not t.place.is_gpu_place():
        yield
        return
    import cupy

    device_id = t.place.gpu_device_id()
    stream = external_stream(cupy, stream_pointer(paddle.device.current_stream(f"gpu:{device_id}")), device_id)
    allocator = cupy.cuda.memory.PythonFunctionAllocator(*paddle_memory(t.place)).malloc
    with cupy.cuda.Device(device_id), stream, cupy.cuda.using_allocator(allocator):
        yield
