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

DCNv3 and DCNv4 share two, which take a validated
:class:`cudcn.dcnv3_geometry.DCNv3Geometry` first. The geometry says where
the offsets and the mask lie, so that one kernel serves both operators:
for output pixel q = (n*Ho + h)*Wo + w and group g, the P (x, y) offset
pairs start at element ``first + q*pixel_stride + g*group_stride`` of the
flat ``offset`` array (``geometry.offset_layout``) and the P mask values
likewise in ``mask`` (``geometry.mask_layout``):

- DCNv3: ``offset`` (N, Ho, Wo, G*P*2) and ``mask`` (N, Ho, Wo, G*P), two
  arrays; offset layout (0, G*2P, 2P), mask layout (0, G*P, P);
- DCNv4 (``geometry.packed``): ``offset`` and ``mask`` are the same array,
  offset_mask (N, Ho, Wo, K8); offset layout (0, K8, 3P), mask layout
  (2P, K8, 3P): each (pixel, group) reads one run of 3P values.

- ``dcnv3_forward(geometry, input, offset, mask) -> output`` (N, Ho, Wo, G*D),
  input (N, H, W, G*D)
- ``dcnv3_backward(geometry, grad_output, input, offset, mask)
  -> (grad_input, grad_offset, grad_mask)``, each shaped like its argument;
  when packed, grad_offset and grad_mask are one array shaped like
  offset_mask (the same object twice), zero in the entries past G*3P.

The arrays may be non-contiguous views; a backend makes what it needs
contiguous. The kernel grid and centre are ``geometry.kernel_grid`` and
``geometry.centre``; ``geometry.offset_scale`` is a Python float.

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
