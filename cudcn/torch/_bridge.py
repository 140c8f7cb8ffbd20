"""What every torch op of cudcn needs, whatever its operator family.

Tensors to arrays and back (DLPack), data-less stand-ins for the core's
validation, where a call runs (device, stream, allocator) and cudcn's
settings as a forward saw them, for its backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

import cudcn
from cudcn.backends.cuda.engine import external_stream
from cudcn.errors import ArgumentError, ArgumentTypeError
from cudcn.geometry import FLOAT_DTYPES

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
