"""Backends, chosen by the type of the arrays a caller passes.

A backend is a module with these functions. Deformable convolution's five
take a validated :class:`cudcn.geometry.Geometry` first and arrays of the
backend's kind after:

- ``forward(geometry, input, offset, weight, bias, mask) -> output``
- ``backward(geometry, grad_output, input, offset, weight, mask)
  -> (grad_input, grad_offset, grad_weight, grad_bias, grad_mask)``
  (grad_bias and grad_mask are None when the geometry has no bias or mask)
- ``im2col(geometry, input, offset, mask) -> columns``
- ``col2im(geometry, columns, offset, mask) -> grad_input``
- ``col2im_coord(geometry, columns, input, offset, mask)
  -> (grad_offset, grad_mask)``

``bias`` and ``mask`` may be None.

Multi-scale deformable attention's two take a validated
:class:`cudcn.msda_geometry.MSDAGeometry` first (the level sizes and starts
are in it, as Python ints: no spatial_shapes or level_start_index array
reaches a backend):

- ``ms_deform_attn_forward(geometry, value, sampling_locations,
  attention_weights) -> output`` (N, Lq, M*D)
- ``ms_deform_attn_backward(geometry, grad_output, value,
  sampling_locations, attention_weights)
  -> (grad_value, grad_sampling_locations, grad_attention_weights)``

Every result is in the arguments' dtype and array kind. A backend may lack
an operator family; :func:`function` then raises a clear error. To add a
backend, map its array kind to a module name in ``_MODULES`` and teach
:func:`array_kind` to recognise it.

Frameworks are never imported to find out whether an object belongs to them:
an array can only be a CuPy array if CuPy is already in ``sys.modules``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
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


#: Backend modules already imported, by array kind.
_loaded: dict[str, ModuleType] = {}


def load(kind: str) -> ModuleType:
    """The backend module for an array kind (imported on first use)."""
    module = _loaded.get(kind)
    if module is None:
        module = _loaded[kind] = importlib.import_module(_MODULES[kind])
    return module


def function(kind: str, name: str, argument: str) -> Callable[..., Any]:
    """A backend's function ``name``, or ArgumentTypeError naming the
    argument whose array kind chose a backend that does not have it yet."""
    found = getattr(load(kind), name, None)
    if found is None:
        raise ArgumentTypeError(
            f"{argument} is a {kind} array, and cudcn's {kind} backend has no "
            f"{name} yet; pass NumPy arrays (the NumPy backend has every operator)"
        )
    return found
