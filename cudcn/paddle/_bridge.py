"""What every paddle op of cudcn needs, whatever its operator family.

Checks of int and tensor arguments, data-less stand-ins for the core's
validation, tensors to arrays and back (DLPack), and where a call runs
(device, paddle's stream and memory).
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import paddle

from cudcn.backends.cuda.engine import LEGACY_DEFAULT_STREAM, external_stream
from cudcn.errors import ArgumentError, ArgumentTypeError
from cudcn.geometry import FLOAT_DTYPES

IntOrPair = int | tuple[int, int] | list[int]

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
    """A backend result as a tensor of ``dtype`` (no copy when it is one)."""
    t = paddle.utils.dlpack.from_dlpack(array)
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
