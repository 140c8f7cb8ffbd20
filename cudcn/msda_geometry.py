"""Validation of a multi-scale deformable attention call, and its geometry.

Every MSDA entry point calls :func:`validate_msda` exactly once. It checks
array kinds, dtypes, shapes, the levels and ``im2col_step``, and returns an
:class:`MSDAGeometry`: a small immutable record that the backends trust
without checking again. The level sizes are read from ``spatial_shapes``
once, here (on the host: a CuPy array is copied back), and travel as Python
ints.

Notation (that of Deformable DETR):

=========  ============================================================
N          batch size
S          pixels of all levels together, sum over l of H_l * W_l
M          attention heads
D          channels per head
Lq         queries
L          levels; level l is H_l x W_l pixels, starting at pixel s_l
P          sampling points per query, head and level
=========  ============================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from cudcn.backends import array_kind
from cudcn.errors import ArgumentError, ArgumentTypeError
from cudcn.geometry import check_dim, check_float_arrays, check_im2col_step, check_ndim

_ABSENT: Any = object()

#: Each argument's layout, for error messages.
LAYOUTS = {
    "value": "(N, S, M, D)",
    "spatial_shapes": "(L, 2) of (H_l, W_l)",
    "level_start_index": "(L,)",
    "sampling_locations": "(N, Lq, M, L, P, 2)",
    "attention_weights": "(N, Lq, M, L, P)",
    "grad_output": "(N, Lq, M*D)",
}


@dataclass(frozen=True)
class MSDAGeometry:
    """Everything a backend needs to know about one MSDA call, already checked."""

    kind: str  # "numpy" or "cupy": which backend runs the call
    dtype: np.dtype
    batch: int  # N
    pixels: int  # S
    heads: int  # M
    channels: int  # D, per head
    queries: int  # Lq
    points: int  # P
    shapes: tuple[tuple[int, int], ...]  # (H_l, W_l) per level
    starts: tuple[int, ...]  # s_l: the first pixel of level l, sum of H_j * W_j over j < l

    @property
    def levels(self) -> int:
        """L."""
        return len(self.shapes)

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """(N, Lq, M*D)."""
        return (self.batch, self.queries, self.heads * self.channels)


def _host_integers(array: Any, name: str, ndim: int) -> np.ndarray:
    """An integer array (NumPy, or CuPy copied to the host) with ``ndim`` dimensions."""
    if array is None or array is _ABSENT:
        raise ArgumentTypeError(f"{name} must be an integer array {LAYOUTS[name]}, got None")
    kind = array_kind(array, name)
    if array.dtype.kind not in "iu":
        raise ArgumentTypeError(f"{name}.dtype must be an integer dtype, got {array.dtype.name}")
    check_ndim(array, name, ndim, LAYOUTS[name])
    return array.get() if kind == "cupy" else np.asarray(array)


def _levels(spatial_shapes: Any, level_start_index: Any, nm) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...]]:
    """The level sizes and starts, read once, checked against each other."""
    shapes = _host_integers(spatial_shapes, nm("spatial_shapes"), 2)
    if shapes.shape[0] < 1 or shapes.shape[1] != 2:
        raise ArgumentError(
            f"{nm('spatial_shapes')}.shape must be (L, 2) with L >= 1 levels, got {tuple(shapes.shape)}"
        )
    pairs = tuple((int(h), int(w)) for h, w in shapes.tolist())
    if min(min(pair) for pair in pairs) < 1:
        raise ArgumentError(
            f"{nm('spatial_shapes')} must hold positive (H_l, W_l), got {[list(p) for p in pairs]}"
        )
    starts = tuple(int(s) for s in np.cumsum([0] + [h * w for h, w in pairs[:-1]]))

    index = _host_integers(level_start_index, nm("level_start_index"), 1)
    check_dim(f"{nm('level_start_index')}.shape[0]", index.shape[0], len(pairs), "L, the levels of spatial_shapes")
    if tuple(int(s) for s in index.tolist()) != starts:
        raise ArgumentError(
            f"{nm('level_start_index')} must be the first pixel of each level, the cumulative "
            f"sum of H_l*W_l = {list(starts)}, got {index.tolist()}"
        )
    return pairs, starts


def validate_msda(
    *,
    value: Any = _ABSENT,
    spatial_shapes: Any = _ABSENT,
    level_start_index: Any = _ABSENT,
    sampling_locations: Any = _ABSENT,
    attention_weights: Any = _ABSENT,
    grad_output: Any = _ABSENT,
    im2col_step: Any = 64,
    names: Mapping[str, str] | None = None,
) -> MSDAGeometry:
    """Check one multi-scale deformable attention call and describe it.

    ``value``, ``spatial_shapes``, ``level_start_index``,
    ``sampling_locations`` and ``attention_weights`` are required;
    ``grad_output`` is checked when given. ``names`` renames arguments in
    error messages, as for :func:`cudcn.geometry.validate`.

    Raises:
        ArgumentTypeError (a TypeError): an argument is None or not an array
            of a supported kind; value, sampling_locations, attention_weights
            and grad_output differ in kind, device or dtype, or are not
            floating; spatial_shapes or level_start_index is not integer.
        ArgumentError (a ValueError): a rank, a size, the levels or
            im2col_step is wrong.
        Both are RuntimeErrors too.
    """
    names = dict(names or {})

    def nm(key: str) -> str:
        return names.get(key, key)

    arrays = {
        "value": value,
        "sampling_locations": sampling_locations,
        "attention_weights": attention_weights,
    }
    for key, array in arrays.items():
        if array is None or array is _ABSENT:
            raise ArgumentTypeError(f"{nm(key)} must be an array {LAYOUTS[key]}, got None")
    if grad_output is None:
        raise ArgumentTypeError(f"{nm('grad_output')} must be an array {LAYOUTS['grad_output']}, got None")
    if grad_output is not _ABSENT:
        arrays["grad_output"] = grad_output
    kind, dtype = check_float_arrays(arrays, nm)
    check_im2col_step(im2col_step)
    shapes, starts = _levels(spatial_shapes, level_start_index, nm)
    levels = len(shapes)

    check_ndim(value, nm("value"), 4, LAYOUTS["value"])
    batch, pixels, heads, channels = map(int, value.shape)
    check_dim(f"{nm('value')}.shape[1]", pixels, sum(h * w for h, w in shapes),
              f"S, the pixels of all levels (sum of H_l*W_l of {nm('spatial_shapes')})")
    for axis, size, meaning in ((2, heads, "M, the heads"), (3, channels, "D, the channels per head")):
        if size < 1:
            raise ArgumentError(f"{nm('value')}.shape[{axis}] ({meaning}) must be >= 1, got {size}")

    locations = nm("sampling_locations")
    check_ndim(sampling_locations, locations, 6, LAYOUTS["sampling_locations"])
    queries, points = int(sampling_locations.shape[1]), int(sampling_locations.shape[4])
    for axis, expected, meaning in (
        (0, batch, f"{nm('value')}.shape[0] (N)"),
        (2, heads, f"{nm('value')}.shape[2] (M)"),
        (3, levels, f"the levels of {nm('spatial_shapes')} (L)"),
        (5, 2, "2, the (x, y) of a location"),
    ):
        check_dim(f"{locations}.shape[{axis}]", sampling_locations.shape[axis], expected, meaning)
    if points < 1:
        raise ArgumentError(f"{locations}.shape[4] (P, the points) must be >= 1, got {points}")

    check_ndim(attention_weights, nm("attention_weights"), 5, LAYOUTS["attention_weights"])
    expected = (batch, queries, heads, levels, points)
    if tuple(attention_weights.shape) != expected:
        raise ArgumentError(
            f"{nm('attention_weights')}.shape must be (N, Lq, M, L, P) = {expected} "
            f"(as {locations}), got {tuple(attention_weights.shape)}"
        )
    if grad_output is not _ABSENT:
        check_ndim(grad_output, nm("grad_output"), 3, LAYOUTS["grad_output"])
        expected = (batch, queries, heads * channels)
        if tuple(grad_output.shape) != expected:
            raise ArgumentError(
                f"{nm('grad_output')}.shape must be (N, Lq, M*D) = {expected}, "
                f"got {tuple(grad_output.shape)}"
            )

    return MSDAGeometry(
        kind=kind, dtype=dtype, batch=batch, pixels=pixels, heads=heads, channels=channels,
        queries=queries, points=points, shapes=shapes, starts=starts,
    )
