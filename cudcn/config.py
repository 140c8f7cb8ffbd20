"""Library-wide settings: the workspace budget and deterministic algorithms.

The column buffer of a chunk of images holds (n, Ho*Wo, kh*kw, C_in) values,
kh*kw times the input. Backends split the batch into chunks whose column
buffer stays under this budget (always at least one image per chunk). Other
temporaries come on top: the NumPy backend peaks at about 4 column buffers in
the forward and 8 in the backward.
The process-wide default can be set with the environment variable
CUDCN_WORKSPACE_BYTES (a byte count, or a size such as 256MB or 1GiB); a
temporary budget (:func:`workspace_bytes`) holds in one thread only.

Deterministic algorithms: the NumPy backend always gives bitwise-repeatable
results. The CUDA backend's fastest input gradient adds with atomics, whose
order varies from run to run; with deterministic algorithms on it takes a
sorted, atomic-free path instead. The setting is per thread (a context
variable); CUDCN_DETERMINISTIC=1 turns it on by default.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
from collections.abc import Iterator

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


def _default_from_environment() -> int:
    text = os.environ.get("CUDCN_WORKSPACE_BYTES")
    if text is None:
        return DEFAULT_WORKSPACE_BYTES
    try:
        return parse_size(text)
    except ValueError:
        raise ArgumentError(
            f"CUDCN_WORKSPACE_BYTES must be a positive size in bytes such as 268435456, "
            f"256MB or 1GiB, got {text!r}"
        ) from None


# The process-wide budget (None until first read: CUDCN_WORKSPACE_BYTES is
# parsed then, so a bad value is an error at first use, never at import), and
# a per-thread temporary budget set by :func:`workspace_bytes`.
_default_workspace: int | None = None
_temporary_workspace: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "cudcn_workspace_bytes", default=None
)


def _check_nbytes(nbytes: object) -> int:
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 1:
        raise ArgumentError(f"nbytes must be a positive int, got {nbytes!r}")
    return nbytes


def get_workspace_bytes() -> int:
    """The column-buffer budget in bytes in this thread.

    A temporary budget of :func:`workspace_bytes` in force in this thread,
    else the process-wide one (:func:`set_workspace_bytes`, else
    CUDCN_WORKSPACE_BYTES, else 256 MiB).
    """
    global _default_workspace
    temporary = _temporary_workspace.get()
    if temporary is not None:
        return temporary
    if _default_workspace is None:
        _default_workspace = _default_from_environment()
    return _default_workspace


def set_workspace_bytes(nbytes: int) -> None:
    """Set the process-wide column-buffer budget in bytes (a positive int)."""
    global _default_workspace
    _default_workspace = _check_nbytes(nbytes)


@contextlib.contextmanager
def workspace_bytes(nbytes: int) -> Iterator[None]:
    """Within the block, in this thread only, the column-buffer budget is ``nbytes``."""
    token = _temporary_workspace.set(_check_nbytes(nbytes))
    try:
        yield
    finally:
        _temporary_workspace.reset(token)


def images_per_chunk(bytes_per_image: int, batch: int) -> int:
    """How many images fit the budget at once (1 <= result <= max(batch, 1))."""
    fit = get_workspace_bytes() // max(bytes_per_image, 1)
    return max(1, min(fit, batch))


_deterministic: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "cudcn_deterministic", default=os.environ.get("CUDCN_DETERMINISTIC", "0") == "1"
)


def use_deterministic_algorithms(mode: bool) -> None:
    """Make every later call in this thread bitwise repeatable (or not)."""
    if not isinstance(mode, bool):
        raise ArgumentTypeError(f"mode must be a bool, got {mode!r}")
    _deterministic.set(mode)


def are_deterministic_algorithms_enabled() -> bool:
    """Whether calls in this thread must be bitwise repeatable."""
    return _deterministic.get()


@contextlib.contextmanager
def deterministic_algorithms(mode: bool = True) -> Iterator[None]:
    """Within the block, calls are (or are not) bitwise repeatable."""
    if not isinstance(mode, bool):
        raise ArgumentTypeError(f"mode must be a bool, got {mode!r}")
    token = _deterministic.set(mode)
    try:
        yield
    finally:
        _deterministic.reset(token)
