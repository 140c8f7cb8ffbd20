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
  (an int or a pair as a list, in Python and in TorchScript);
- host time: :func:`signature` (a call's key for a cache of its checked
  geometry, :class:`cudcn.geometry.SignatureCache`), :func:`backend_geometry`
  (that geometry for the backend the tensors' device runs), and
  :func:`eager` (whether a call may skip ``torch.library``'s dispatch, whose
  Python path costs several times the rest of a small call, for an
  ``autograd.Function`` of its own).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Collection, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

import cudcn
from cudcn.backends.cuda.engine import external_stream
from cudcn.errors import ArgumentError, ArgumentTypeError
from cudcn.geometry import FLOAT_DTYPES, Geometry, pair_key

IntOrPair = int | tuple[int, int]


# --------------------------------------------------------------------------
# Checks and stand-ins
# --------------------------------------------------------------------------


_ZERO_BYTES = bytes(16)  # the buffer of every stand-in (all strides are 0)


def stand_in(name: str, t: Tensor) -> np.ndarray:
    """A NumPy array with t's shape and dtype and no data, for the core's validation.

    bfloat16 shows as the dtype the backend will see (:func:`to_array`):
    float32 on the CPU, ml_dtypes' bfloat16 for a CUDA tensor (float32 where
    ml_dtypes is missing; :func:`to_array` then says why CuPy cannot take it).
    :func:`check_tensors` keeps bfloat16 mixed with another dtype out.
    """
    if t.dtype == torch.bfloat16:
        dtype = np.dtype(np.float32)
        if t.is_cuda:
            try:
                import ml_dtypes

                dtype = np.dtype(ml_dtypes.bfloat16)
            except ImportError:
                pass
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


def signature(tensors: Sequence[Tensor | None], args: Sequence[Any]) -> tuple | None:
    """A call's key for a :class:`cudcn.geometry.SignatureCache` of its checks,
    or None when it has none (then it is checked in full).

    Made of what :func:`check_tensors` and the core's validation look at:
    each tensor's type, dtype, shape, device and layout, and the int
    arguments (:func:`cudcn.geometry.pair_key`: an int and its pair alike);
    never of contents.
    """
    key: list[Any] = []
    try:
        for t in tensors:
            if t is None:
                key.append(None)
            else:
                key += (type(t), t.dtype, t.shape, t.device, t.layout)
        key += map(pair_key, args)
    except Exception:  # nested tensors have no shape; an argument of another kind
        return None
    return tuple(key)  # unhashable with symbolic sizes (torch.compile): see SignatureCache.get


def backend_geometry(geom: Geometry, t: Tensor) -> Geometry:
    """``geom``, checked on NumPy stand-ins, for the backend that runs ``t``'s
    device: the CUDA backend (CuPy arrays) for a CUDA tensor."""
    if t.is_cuda and geom.kind != "cupy":
        return dataclasses.replace(geom, kind="cupy")
    return geom


#: Tensor types a call may take straight to an autograd.Function (subclasses,
#: fake and functional tensors go through the custom op).
_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def _c_flag(name: str) -> Any:
    # torch's private switches; where one is missing, the custom op always runs.
    return getattr(torch._C, name, lambda: True)


_torch_function_mode = _c_flag("_is_torch_function_mode_enabled")
_dispatch_modes = _c_flag("_len_torch_dispatch_stack")
_functorch_transforms = _c_flag("_are_functorch_transforms_active")
_tracing_state = _c_flag("_get_tracing_state")
_profiler_enabled = getattr(getattr(torch._C, "_autograd", None), "_profiler_enabled", lambda: True)


def eager(tensors: Sequence[Tensor | None]) -> bool:
    """Whether a call on these tensors may run as a plain ``autograd.Function``
    instead of its custom op: plain CPU or CUDA tensors (those of the
    first, the others on its device: :func:`check_tensors`), outside torch.compile and
    torch.export, TorchScript tracing, torch function and dispatch modes
    (fake tensors, FlopCounterMode, ...), functorch transforms (vmap, grad)
    and the profiler (which then shows the op by name). The op and the
    Function compute alike; the op's dispatch through ``torch.library`` costs
    tens of microseconds of Python per call.
    """
    for t in tensors:
        if t is not None and type(t) not in _PLAIN_TENSORS:
            return False
    if not (tensors[0].is_cpu or tensors[0].is_cuda):  # meta tensors: the op's fake implementation
        return False
    return not (torch.compiler.is_compiling() or _torch_function_mode() or _dispatch_modes()
                or _functorch_transforms() or _tracing_state() is not None or _profiler_enabled())


# --------------------------------------------------------------------------
# Tensors to arrays and back
# --------------------------------------------------------------------------


def to_array(t: Tensor | None) -> Any:
    """A contiguous tensor as a CuPy (CUDA) or NumPy (CPU) array on the same memory
    (None stays None). A CPU bfloat16 tensor becomes a float32 copy."""
    if t is None:
        return None
    if not t.is_cuda and t.dtype != torch.bfloat16:
        # numpy(force=True) detaches in C++: the same memory, at half the cost.
        array = t.numpy(force=True)
        return array if array.flags.c_contiguous else np.ascontiguousarray(array)
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
    return t.float().numpy()  # NumPy has no bfloat16


def same_memory(t: Tensor | None) -> bool:
    """Whether :func:`to_array` gives ``t``'s own memory (no copy)."""
    return t is None or (t.is_contiguous() and (t.is_cuda or t.dtype != torch.bfloat16))


def to_tensor(array: Any, dtype: torch.dtype) -> Tensor:
    """A backend result as a contiguous tensor of ``dtype`` (no copy when it is one)."""
    if type(array) is np.ndarray:
        t = torch.from_numpy(array)
        if t.dtype == dtype and array.flags.c_contiguous:
            return t
    else:
        t = torch.from_dlpack(array)
    if t.dtype != dtype:
        t = t.to(dtype)
    return t.contiguous()


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


#: One context that does nothing, for the CPU (a nullcontext can be reused).
_NO_CONTEXT = contextlib.nullcontext()

#: (device, torch stream handle) -> (CuPy stream, allocator): made once. A
#: handle names one CUDA stream for as long as it exists; the objects hold
#: no more than the handle.
_cuda_streams: dict[tuple[int, int], tuple[Any, Any]] = {}


def backend_context(t: Tensor) -> contextlib.AbstractContextManager:
    """Where a call on ``t`` runs: for CUDA, CuPy on t's device and torch's stream.

    DLPack exchanges inside this context see one stream on both sides, so
    they add no synchronisation.
    """
    if not t.is_cuda:
        return _NO_CONTEXT
    return _cuda_context(t)


@contextlib.contextmanager
def _cuda_context(t: Tensor) -> Iterator[None]:
    import cupy

    device_id = t.device.index
    handle = torch.cuda.current_stream(t.device).cuda_stream
    made = _cuda_streams.get((device_id, handle))
    if made is None:
        # 0, torch's default stream, made explicit
        made = _cuda_streams[device_id, handle] = (
            external_stream(cupy, handle, device_id), torch_allocator(handle)
        )
    cupy_stream, allocator = made
    with cupy.cuda.Device(device_id), cupy_stream, cupy.cuda.using_allocator(allocator):
        yield


# --------------------------------------------------------------------------
# cudcn's settings, from a forward to its backward
# --------------------------------------------------------------------------


_CUBLAS_MODULE = type(torch.backends.cuda.matmul)
_FP32_PRECISION = getattr(torch._C, "_get_fp32_precision_getter", None)


def torch_allows_tf32() -> bool:
    """Whether torch lets float32 matmuls on CUDA use TF32 (torch's global setting).

    torch.set_float32_matmul_precision("high" or "medium"),
    torch.backends.cuda.matmul.allow_tf32 = True and
    torch.backends.cuda.matmul.fp32_precision = "tf32" all show in
    fp32_precision; torch before it has only allow_tf32.
    """
    matmul = torch.backends.cuda.matmul
    if type(matmul) is _CUBLAS_MODULE and _FP32_PRECISION is not None:
        # What matmul.fp32_precision reads, without its Python __getattr__.
        return _FP32_PRECISION("cuda", "matmul") == "tf32"
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
    return _NO_CONTEXT


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


def backward_settings(
    deterministic: bool, tf32: bool, algorithm: str = "", workspace_bytes: int = 0
) -> contextlib.AbstractContextManager:
    """cudcn's settings for a backward op, from :func:`settings_at_forward`:

    - the deterministic path when the forward ran under cudcn's setting
      (``deterministic``) or while torch.use_deterministic_algorithms(True) is set;
    - TF32 as :func:`tf32_setting`;
    - the forward's algorithm and workspace budget ("" and 0: leave this
      thread's own).

    Only what differs from this thread's settings is entered (each costs a
    context variable's set and reset).
    """
    needed = []
    if (deterministic or torch.are_deterministic_algorithms_enabled()) and not cudcn.are_deterministic_algorithms_enabled():
        needed.append(cudcn.deterministic_algorithms(True))
    if not cudcn.is_tf32_enabled() and (tf32 or torch_allows_tf32()):
        needed.append(cudcn.tf32(True))
    if algorithm and algorithm != cudcn.get_algorithm():
        needed.append(cudcn.algorithm(algorithm))
    if workspace_bytes and workspace_bytes != cudcn.get_workspace_bytes():
        needed.append(cudcn.workspace_bytes(workspace_bytes))
    if not needed:
        return _NO_CONTEXT
    return needed[0] if len(needed) == 1 else _entered(needed)


@contextlib.contextmanager
def _entered(contexts: list[contextlib.AbstractContextManager]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
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
