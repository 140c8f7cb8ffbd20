"""Library-wide settings: the workspace budget and deterministic algorithms.

The column buffer of a chunk of images holds (n, Ho*Wo, kh*kw, C_in) values,
kh*kw times the input. Backends split the batch into chunks whose column
buffer stays under this budget (always at least one image per chunk). Other
temporaries come on top: the NumPy backend peaks at under 2 column buffers in
the forward and under 3 in the backward with 64 or more channels per offset
group (its sampling matrix costs about 50 bytes per column-buffer row, so it
weighs more when a row holds few channels).
The default can be set with the environment variable CUDCN_WORKSPACE_BYTES.

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


_deterministic: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "cudcn_deterministic", default=os.environ.get("CUDCN_DETERMINISTIC", "0") == "1"
)


def use_deterministic_algorithms(mode: bool) -> None:
    """Make every later call in this thread bitwise repeatable (or not)."""
    if not isinstance(mode, bool):
        raise TypeError(f"mode must be a bool, got {mode!r}")
    _deterministic.set(mode)


def are_deterministic_algorithms_enabled() -> bool:
    """Whether calls in this thread must be bitwise repeatable."""
    return _deterministic.get()


@contextlib.contextmanager
def deterministic_algorithms(mode: bool = True) -> Iterator[None]:
    """Within the block, calls are (or are not) bitwise repeatable."""
    if not isinstance(mode, bool):
        raise TypeError(f"mode must be a bool, got {mode!r}")
    token = _deterministic.set(mode)
    try:
        yield
    finally:
        _deterministic.reset(token)
