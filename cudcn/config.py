"""Library-wide settings: the workspace budget for column buffers.

The column buffer of a chunk of images holds (n, Ho*Wo, kh*kw, C_in) values,
kh*kw times the input. Backends split the batch into chunks whose column
buffer stays under this budget (always at least one image per chunk).
The default can be set with the environment variable CUDCN_WORKSPACE_BYTES.
"""

from __future__ import annotations

import os

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


def images_per_chunk(bytes_per_image: int, batch: int) -> int:
    """How many images fit the budget at once (1 <= result <= max(batch, 1))."""
    fit = _workspace_bytes // max(bytes_per_image, 1)
    return max(1, min(fit, batch))
