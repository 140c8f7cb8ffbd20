"""What every torch op of cudcn needs, whatever its operator family.

An op of any family (deformable convolution, multi-scale deformable
attention, ...) is built from these pieces:

- checks and stand-ins: :func:`check_tensors` (dense tensors, one device,
  no bfloat16 mixed with another dtype) and :func:`stand_ins`, data-less
  NumPy arrays with the tensors' shapes and dtypes for the core's
  validation, also while torch.compile traces with fake tensors
  (:func:`is_static` says whether every size is known);
- data: :func:`to_array` (a tensor as a CuPy or NumPy array on the same
  memory, through DLPack) and :func:`to_tensor` (a result back);
- where the call runs: :func:`backend_context` (CuPy on the tensor's
  device and torch's current stream, memory from torch's caching
  allocator);
- cudcn's settings: :func:`tf32_setting` for a forward,
  :func:`settings_at_forward` in an autograd ``setup_context`` and
  :func:`backward_settings` around the backward op, which autograd may run
  in another thread;
- arguments: :func:`autocast`, :func:`as_list` and :func:`script_list`
  (an int or a pair as a list, in Python and in TorchScript).
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

import cudcn
from cudcn.backends.cuda.engine import external_stream
from cudcn.errors import ArgumentError, ArgumentTypeError
from cudcn.geometry import FLOAT_DTYPES

IntOrPair = int | tuple[int, int]


# --------------------------------------------------------------------------
# Checks and stand-ins
# --------------------------------------------------------------------------


_ZERO_BYTES = bytes(16)  # the buffer of every stand-in (all strides are 0)


def stand_in(name: str, t: Tensor) -> np.ndarray:
    """A NumPy array with t's shape and dtype and no data, for the core's validation.

    bfloat16 shows as float32 (NumPy has none): :func:`check_tensors` keeps
    bfloat16 mixed with another dtype out.
    """
    if t.dtype == torch.bfloat16:
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


def _dtype_name(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def check_tensors(
    tensors: dict[str, Tensor | None], optional: Collection[str] = (), integer: Collection[str] = ()
) -> dict[str, Tensor]:
    """The tensors that are given: dense Tensors on the first one's device, and
    no bfloat16 mixed with another dtype.

    Args:
        tensors: the call's tensors by argument name; the first (the input)
            is the one the others must agree with.
        optional: the names that may be None.
        integer: the names of integer tensors (shapes, indices), which keep
            their own dtype.

    A CPU bfloat16 tensor reaches the core as float32, which would hide such
    a mix from the core's own dtype checks.
    """
    for name, t in tensors.items():
        if t is None:
            if name not in optional:
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
    first_name, first = next(iter(given.items()))
    for name, t in given.items():
        if t.device != first.device:
            raise ArgumentError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; pass tensors on one device"
            )
    floating = {name: t for name, t in given.items() if name not in integer}
    if any(t.dtype == torch.bfloat16 for t in floating.values()):
        for name, t in floating.items():
            if t.dtype != first.dtype:
                raise ArgumentTypeError(
                    f"{name}.dtype must equal {first_name}.dtype = {_dtype_name(first)}, got {_dtype_name(t)}"
                )
    return given


def stand_ins(
    tensors: dict[str, Tensor | None], optional: Collection[str] = (), integer: Collection[str] = ()
) -> dict[str, np.ndarray]:
    """:func:`check_tensors`, then a :func:`stand_in` for each tensor given, by name.

    Hand them to the core's validation: its error messages come before any
    data moves, also while torch.compile traces with fake tensors.
    """
    given = check_tensors(tensors, optional, integer)
    return {name: stand_in(name, t) for name, t in given.items()}


def is_static(*tensors: Tensor | None) -> bool:
    """True when no shape is symbolic (torch.compile with dynamic shapes)."""
    return all(
        isinstance(size, int) for t in tensors if t is not None for size in t.shape
    )


# --------------------------------------------------------------------------
# Tensors to arrays and back
# --------------------------------------------------------------------------


def to_array(t: Tensor | None) -> Any:
    """A contiguous tensor as a CuPy (CUDA) or NumPy (CPU) array on the same memory
    (None stays None). A CPU bfloat16 tensor becomes a float32 copy."""
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


def to_tensor(array: Any, dtype: torch.dtype) -> Tensor:
    """A backend result as a contiguous tensor of ``dtype`` (no copy when it is one)."""
    return torch.from_dlpack(array).to(dtype).contiguous()


# --------------------------------------------------------------------------
# Where a call runs
# --------------------------------------------------------------------------


def torch_allocator(stream: int) -> Any:
    """A CuPy allocator that takes memory from torch's caching allocator, on ``stream``."""
    import cupy

    def malloc(nbytes: int, device: int) -> int:
        return torch.cuda.caching_allocator_alloc(max(nbytes, 1), device, stream)

    def free(pointer: int, device: int) -> None:
        torch.cuda.caching_allocator_delete(pointer)

    return cupy.cuda.memory.PythonFunctionAllocator(malloc, free).malloc


@contextlib.contextmanager
def backend_context(t: Tensor) -> Iterator[None]:
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
    allocator = torch_allocator(stream.cuda_stream)
    cupy_stream = external_stream(cupy, stream.cuda_stream, device_id)  # 0, torch's default stream, made explicit
    with cupy.cuda.Device(device_id), cupy_stream, cupy.cuda.using_allocator(allocator):
        yield


# --------------------------------------------------------------------------
# cudcn's settings, from a forward to its backward
# --------------------------------------------------------------------------


def torch_allows_tf32() -> bool:
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


def tf32_setting(requested: bool) -> contextlib.AbstractContextManager:
    """TF32 for a call's float32 GEMMs on CUDA: on when cudcn's setting was
    on at the forward (``requested``) or torch allows TF32 for float32
    matmuls (read where the op runs: torch's setting is global)."""
    if requested or torch_allows_tf32():
        return cudcn.tf32(True)
    return contextlib.nullcontext()


class ForwardSettings(NamedTuple):
    """cudcn's settings in force at a forward call, which hold for its backward.

    The fields are the backward op's last arguments, in this order.
    """

    deterministic: bool
    tf32: bool
    algorithm: str
    workspace_bytes: int


def settings_at_forward() -> ForwardSettings:
    """cudcn's settings in the calling thread, for an autograd ``setup_context``
    to save: autograd runs a CUDA backward in its own device thread, where
    cudcn's per-thread settings are not visible."""
    return ForwardSettings(
        cudcn.are_deterministic_algorithms_enabled(),
        cudcn.is_tf32_enabled(),
        cudcn.get_algorithm(),
        cudcn.get_workspace_bytes(),
    )


@contextlib.contextmanager
def backward_settings(
    deterministic: bool, tf32: bool, algorithm: str = "", workspace_bytes: int = 0
) -> Iterator[None]:
    """cudcn's settings for a backward op, from :func:`settings_at_forward`:

    - the deterministic path when the forward ran under cudcn's setting
      (``deterministic``) or while torch.use_deterministic_algorithms(True) is set;
    - TF32 as :func:`tf32_setting`;
    - the forward's algorithm and workspace budget ("" and 0: leave this
      thread's own).
    """
    with contextlib.ExitStack() as stack:
        if deterministic or torch.are_deterministic_algorithms_enabled():
            stack.enter_context(cudcn.deterministic_algorithms(True))
        stack.enter_context(tf32_setting(tf32))
        if algorithm:
            stack.enter_context(cudcn.algorithm(algorithm))
        if workspace_bytes:
            stack.enter_context(cudcn.workspace_bytes(workspace_bytes))
        yield


# --------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------


def autocast(device_type: str, tensors: list[Tensor | None]) -> list[Tensor | None]:
    """Cast floating tensors to the autocast dtype when autocast is on for the device."""
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    # Like torch's own autocast, float64 is left alone.
    return [
        t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in tensors
    ]


def as_list(value: Any) -> Any:
    """int or pair as [rows, columns] for an op; anything else as given."""
    if isinstance(value, (tuple, list)):
        return list(value)
    return [value, value]


def script_list(value: IntOrPair) -> list[int]:
    """int or pair as [rows, columns]: :func:`as_list` for TorchScript."""
    if isinstance(value, int):
        return [value, value]
    return [value[0], value[1]]
