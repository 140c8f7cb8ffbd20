"""Library-wide settings: the workspace budget, deterministic algorithms and TF32.

The column buffer of a chunk of images holds (n, Ho*Wo, kh*kw, C_in) values,
kh*kw times the input. Backends split the batch into chunks whose column
buffer stays under this budget (always at least one image per chunk). Other
temporaries come on top: the NumPy backend peaks at about 4 column buffers in
the forward and 8 in the backward.
The default can be set with the environment variable CUDCN_WORKSPACE_BYTES.

Deterministic algorithms: the NumPy backend always gives bitwise-repeatable
results. The CUDA backend's fastest input gradient adds with atomics, whose
order varies from run to run; with deterministic algorithms on it takes a
sorted, atomic-free path instead. The setting is per thread (a context
variable); CUDCN_DETERMINISTIC=1 turns it on by default.

TF32: with it on, the CUDA backend's float32 GEMMs may round their operands to
TensorFloat-32 (10 explicit significand bits, float32's exponent range) and
run on tensor cores, summing in float32 (cuBLAS's
CUBLAS_COMPUTE_32F_FAST_TF32). A product then has a relative error of about
2^-11 per operand instead of float32's 2^-24, so a float32 output or gradient
is accurate to roughly 1e-3 relative, about as torch's own float32
convolutions and matmuls are with TF32 allowed. Off by default, per thread;
CUDCN_TF32=1 turns it on by default. It never affects float16, bfloat16,
float64 or the NumPy backend.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

DEFAULT_WORKSPACE_BYTES = 256 * 2**20

_workspace_bytes = int(os.environ.get("CUDCN_WORKSPACE_BYTES", DEFAULT_WORKSPACE_BYTES))


def get_workspace_bytes() -> int:
    """The column-buffer budget in bytes."""
    return _workspace_bytes


def set_workspace_bytes(nbytes: int) -> None:
    """Set the column-buffer budget in bytes (a positive int)."""
    global _workspace_bytes
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 1:
        raise ValueError(f"nbytes must be a positive int, got {nbytes!r}")
    _workspace_bytes = nbytes


@contextlib.contextmanager
def workspace_bytes(nbytes: int) -> Iterator[None]:
    """Within the block, the column-buffer budget is ``nbytes`` (restored after)."""
    before = get_workspace_bytes()
    set_workspace_bytes(nbytes)
    try:
        yield
    finally:
        set_workspace_bytes(before)


def images_per_chunk(bytes_per_image: int, batch: int) -> int:
    """How many images fit the budget at once (1 <= result <= max(batch, 1))."""
    fit = _workspace_bytes // max(bytes_per_image, 1)
    return max(1, min(fit, batch))


class _ThreadSetting:
    """A boolean setting per thread (a context variable) with an environment default."""

    def __init__(self, name: str, environment: str) -> None:
        self._value: contextvars.ContextVar[bool] = contextvars.ContextVar(
            name, default=os.environ.get(environment, "0") == "1"
        )

    def get(self) -> bool:
        return self._value.get()

    def set(self, mode: bool) -> None:
        _check_mode(mode)
        self._value.set(mode)

    @contextlib.contextmanager
    def scoped(self, mode: bool) -> Iterator[None]:
        _check_mode(mode)
        token = self._value.set(mode)
        try:
            yield
        finally:
            self._value.reset(token)


def _check_mode(mode: bool) -> None:
    if not isinstance(mode, bool):
        raise TypeError(f"mode must be a bool, got {mode!r}")


_deterministic = _ThreadSetting("cudcn_deterministic", "CUDCN_DETERMINISTIC")
_tf32 = _ThreadSetting("cudcn_tf32", "CUDCN_TF32")


def use_deterministic_algorithms(mode: bool) -> None:
    """Make every later call in this thread bitwise repeatable (or not)."""
    _deterministic.set(mode)


def are_deterministic_algorithms_enabled() -> bool:
    """Whether calls in this thread must be bitwise repeatable."""
    return _deterministic.get()


def deterministic_algorithms(mode: bool = True) -> contextlib.AbstractContextManager:
    """Within the block, calls are (or are not) bitwise repeatable."""
    return _deterministic.scoped(mode)


def use_tf32(mode: bool) -> None:
    """Let every later float32 GEMM on the GPU in this thread use TF32 (or not)."""
    _tf32.set(mode)


def is_tf32_enabled() -> bool:
    """Whether float32 GEMMs on the GPU in this thread may use TF32."""
    return _tf32.get()


def tf32(mode: bool = True) -> contextlib.AbstractContextManager:
    """Within the block, float32 GEMMs on the GPU may (or may not) use TF32."""
    return _tf32.scoped(mode)
