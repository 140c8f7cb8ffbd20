"""Backends, chosen by the type of the arrays a caller passes.

A backend is a module with five functions, all taking a validated
:class:`cudcn.geometry.Geometry` first and arrays of its own kind after:

- ``forward(geometry, input, offset, weight, bias, mask) -> output``
- ``backward(geometry, grad_output, input, offset, weight, mask)
  -> (grad_input, grad_offset, grad_weight, grad_bias, grad_mask)``
  (grad_bias and grad_mask are None when the geometry has no bias or mask)
- ``im2col(geometry, input, offset, mask) -> columns``
- ``col2im(geometry, columns, offset, mask) -> grad_input``
- ``col2im_coord(geometry, columns, input, offset, mask)
  -> (grad_offset, grad_mask)``

``bias`` and ``mask`` may be None. To add a backend, map its array kind to a
module name in ``_MODULES`` and teach :func:`array_kind` to recognise it.

Frameworks are never imported to find out whether an object belongs to them:
an array can only be a CuPy array if CuPy is already in ``sys.modules``.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any

import numpy as np

from cudcn.errors import ArgumentTypeError

_MODULES = {"numpy": "cudcn.backends.numpy", "cupy": "cudcn.backends.cuda"}


def array_kind(value: Any, name: str) -> str:
    """Return "numpy" or "cupy" for an array, or raise ArgumentTypeError naming it."""
    if isinstance(value, np.ndarray):
        return "numpy"
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(value, cupy.ndarray):
        return "cupy"
    kind = type(value)
    raise ArgumentTypeError(
        f"{name} must be a numpy.ndarray or cupy.ndarray, got "
        f"{kind.__module__}.{kind.__qualname__}"
    )


def load(kind: str) -> ModuleType:
    """The backend module for an array kind (imported on first use)."""
    return importlib.import_module(_MODULES[kind])
