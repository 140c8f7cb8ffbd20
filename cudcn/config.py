"""Library-wide settings: the workspace budget, deterministic algorithms, TF32 and the CUDA algorithm.

The column buffer of a chunk of images holds (n, Ho*Wo, kh*kw, C_in) values,
kh*kw times the input. Backends split the batch into chunks whose column
buffer stays under this budget (always at least one image per chunk). Other
temporaries come on top: the NumPy backend peaks at under 2 column buffers in
the forward and under 3 in the backward with 64 or more channels per offset
group (its sampling matrix costs about 50 bytes per column-buffer row, so it
weighs more when a row holds few channels). Multi-scale deformable
attention splits its queries into chunks whose sampling matrix (about 100
bytes per sampling point) stays under the same budget.
The process-wide default can be set with the environment variable
CUDCN_WORKSPACE_BYTES (a byte count, or a size such as 256MB or 1GiB); a
temporary budget (:func:`workspace_bytes`) holds in one thread only.

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
convolutions and matmuls are with TF32 allowed. Off by default, per thread
like the deterministic setting; CUDCN_TF32=1 turns it on by default. It
never affects float16, bfloat16, float64 or the NumPy backend.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

from cudcn.errors import ArgumentError, ArgumentTypeError

DEFAULT_WORKSPACE_BYTES = 256 * 2**20

#: Unit suffixes of CUDCN_WORKSPACE_BYTES: decimal (kB, MB, ...) and binary (KiB, MiB, ...).
_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in a size such as ``268435456``, ``256MB``, ``256 MiB`` or ``1.5GiB``.

    A plain number is a whole count of bytes; with a unit it may have a
    fraction. Raises ValueError (naming no source) when ``text`` is not a
    positive size.
    """
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(text)
    number, unit = match.group(1), match.group(2).lower()
    if not unit:
        if "." in number:
            raise ValueError(text)
        nbytes = int(number)
    elif unit in _UNITS:
        nbytes = int(float(number) * _UNITS[unit])
    else:
        raise ValueError(text)
    if nbytes < 1:
        raise ValueError(text)
    return nbytes


class _Setting:
    """A process-wide value with per-thread temporary overrides.

    The process-wide value comes from :meth:`set`, else from an environment
    variable, parsed at the first read (so that a malformed value is an error
    at first use, never at import), else from a default. :meth:`temporarily`
    overrides it in the calling thread only (a context variable).
    """

    def __init__(self, name: str, variable: str, default: Any, from_text: Callable[[str], Any],
                 check: Callable[[Any], Any]) -> None:
        self.variable, self.default = variable, default
        self.from_text, self.check = from_text, check
        self.value: Any = None  # the process-wide value; None until first read
        self.temporary: contextvars.ContextVar[Any] = contextvars.ContextVar(name, default=None)

    def get(self) -> Any:
        temporary = self.temporary.get()
        if temporary is not None:
            return temporary
        if self.value is None:
            text = os.environ.get(self.variable)
            self.value = self.default if text is None else self.from_text(text)
        return self.value

    def set(self, value: Any) -> None:
        self.value = self.check(value)

    @contextlib.contextmanager
    def temporarily(self, value: Any) -> Iterator[None]:
        token = self.temporary.set(self.check(value))
        try:
            yield
        finally:
            self.temporary.reset(token)


def _workspace_from_text(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError:
        raise ArgumentError(
            f"CUDCN_WORKSPACE_BYTES must be a positive size in bytes such as 268435456, "
            f"256MB or 1GiB, got {text!r}"
        ) from None


def _check_nbytes(nbytes: object) -> int:
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 1:
        raise ArgumentError(f"nbytes must be a positive int, got {nbytes!r}")
    return nbytes


_workspace = _Setting(
    "cudcn_workspace_bytes", "CUDCN_WORKSPACE_BYTES", DEFAULT_WORKSPACE_BYTES,
    _workspace_from_text, _check_nbytes,
)


def get_workspace_bytes() -> int:
    """The column-buffer budget in bytes in this thread.

    A temporary budget of :func:`workspace_bytes` in force in this thread,
    else the process-wide one (:func:`set_workspace_bytes`, else
    CUDCN_WORKSPACE_BYTES, else 256 MiB).
    """
    return _workspace.get()


def set_workspace_bytes(nbytes: int) -> None:
    """Set the process-wide column-buffer budget in bytes (a positive int)."""
    _workspace.set(nbytes)


def workspace_bytes(nbytes: int) -> contextlib.AbstractContextManager[None]:
    """Within the block, in this thread only, the column-buffer budget is ``nbytes``."""
    return _workspace.temporarily(nbytes)


def images_per_chunk(bytes_per_image: int, batch: int) -> int:
    """How many images fit the budget at once (1 <= result <= max(batch, 1))."""
    fit = get_workspace_bytes() // max(bytes_per_image, 1)
    return max(1, min(fit, batch))


class _ThreadFlag:
    """A boolean setting per thread (a context variable), default from an environment variable."""

    def __init__(self, name: str, variable: str) -> None:
        self.value: contextvars.ContextVar[bool] = contextvars.ContextVar(
            name, default=os.environ.get(variable, "0") == "1"
        )

    def set(self, mode: bool) -> None:
        self.value.set(_check_mode(mode))

    @contextlib.contextmanager
    def temporarily(self, mode: bool) -> Iterator[None]:
        token = self.value.set(_check_mode(mode))
        try:
            yield
        finally:
            self.value.reset(token)


def _check_mode(mode: object) -> bool:
    if not isinstance(mode, bool):
        raise ArgumentTypeError(f"mode must be a bool, got {mode!r}")
    return mode


_deterministic = _ThreadFlag("cudcn_deterministic", "CUDCN_DETERMINISTIC")
_tf32 = _ThreadFlag("cudcn_tf32", "CUDCN_TF32")


def use_deterministic_algorithms(mode: bool) -> None:
    """Make every later call in this thread bitwise repeatable (or not)."""
    _deterministic.set(mode)


def are_deterministic_algorithms_enabled() -> bool:
    """Whether calls in this thread must be bitwise repeatable."""
    return _deterministic.value.get()


def deterministic_algorithms(mode: bool = True) -> contextlib.AbstractContextManager[None]:
    """Within the block, calls are (or are not) bitwise repeatable."""
    return _deterministic.temporarily(mode)


def use_tf32(mode: bool) -> None:
    """Let every later float32 GEMM on the GPU in this thread use TF32 (or not)."""
    _tf32.set(mode)


def is_tf32_enabled() -> bool:
    """Whether float32 GEMMs on the GPU in this thread may use TF32."""
    return _tf32.value.get()


def tf32(mode: bool = True) -> contextlib.AbstractContextManager[None]:
    """Within the block, float32 GEMMs on the GPU may (or may not) use TF32."""
    return _tf32.temporarily(mode)


#: The CUDA backend's algorithms: "im2col" (im2col + GEMM with a column
#: buffer, the reference), "fused" (column-free kernels where they apply, else
#: im2col) and "auto" (times the algorithms that apply once per shape and
#: keeps the faster; :mod:`cudcn.backends.cuda.algorithms`).
ALGORITHMS = ("auto", "fused", "im2col")

def _check_algorithm(name: object, source: str = "name") -> str:
    if name not in ALGORITHMS:
        raise ArgumentError(f"{source} must be one of {', '.join(map(repr, ALGORITHMS))}, got {name!r}")
    return name  # type: ignore[return-value]


_algorithm = _Setting(
    "cudcn_algorithm", "CUDCN_ALGORITHM", "auto",
    lambda text: _check_algorithm(text, "CUDCN_ALGORITHM"), _check_algorithm,
)


def get_algorithm() -> str:
    """The CUDA backend's algorithm in this thread: "auto", "fused" or "im2col".

    A temporary choice of :func:`algorithm` in force in this thread, else the
    process-wide one (:func:`set_algorithm`, else CUDCN_ALGORITHM, else "auto").
    """
    return _algorithm.get()


def set_algorithm(name: str) -> None:
    """Set the process-wide CUDA algorithm: "auto", "fused" or "im2col"."""
    _algorithm.set(name)


def algorithm(name: str) -> contextlib.AbstractContextManager[None]:
    """Within the block, in this thread only, the CUDA backend uses ``name``."""
    return _algorithm.temporarily(name)
