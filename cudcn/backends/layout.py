"""The column layout and GEMM plumbing that every backend shares.

Columns are (n, Ho*Wo, kh*kw, C_in) (see :mod:`cudcn.backends.numpy.dcn`).
A deformable convolution is then one batched matrix product per convolution
group, between the columns seen as (groups, n*Ho*Wo, kh*kw*C_in/groups) and
the weight seen as (groups, kh*kw*C_in/groups, C_out/groups). These helpers
convert between those views and split a batch into chunks that fit the
workspace budget. They work on NumPy and CuPy arrays alike.
"""

from __future__ import annotations

import numpy as np

from cudcn.config import images_per_chunk
from cudcn.geometry import Geometry


def weight_matrix(geom: Geometry, weight: np.ndarray, dtype) -> np.ndarray:
    """Weight (O, C/groups, kh, kw) as (groups, K*C/groups, O/groups).

    Row k*(C/groups) + c matches the column layout (.., K, C) of one group.
    """
    O, Cg = weight.shape[:2]
    K = geom.kernel_points
    # Explicit sizes, no -1: a weight with no output channels has size 0.
    w = weight.astype(dtype, copy=False).reshape(geom.groups, O // geom.groups, Cg, K)
    return w.transpose(0, 3, 2, 1).reshape(geom.groups, K * Cg, O // geom.groups)


def weight_from_matrix(geom: Geometry, matrix: np.ndarray) -> np.ndarray:
    """Inverse of :func:`weight_matrix`."""
    groups, _, Og = matrix.shape
    Cg = geom.in_channels // geom.groups
    w = matrix.reshape(groups, geom.kernel_points, Cg, Og).transpose(0, 3, 2, 1)
    return w.reshape(groups * Og, Cg, geom.kernel_h, geom.kernel_w)


def grouped_columns(geom: Geometry, columns: np.ndarray) -> np.ndarray:
    """Columns (n, L, K, C) as (groups, n*L, K*C/groups) for the GEMM."""
    n, L, K, C = columns.shape
    g = geom.groups
    return columns.reshape(n * L, K, g, C // g).transpose(2, 0, 1, 3).reshape(g, n * L, K * C // g)


def ungrouped_columns(geom: Geometry, grouped: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`grouped_columns`."""
    g = geom.groups
    K, C = geom.kernel_points, geom.in_channels
    cols = grouped.reshape(g, n * geom.out_pixels, K, C // g).transpose(1, 2, 0, 3)
    return cols.reshape(n, geom.out_pixels, K, C)


def chunks(geom: Geometry, dtype: np.dtype, extra_bytes_per_image: int = 0):
    """Slices of the batch whose column buffer (plus any other workspace a
    backend counts, per image) fits the workspace budget: as few as fit, of
    sizes that differ by one image at most (16 images where 7 fit: 5, 5, 6,
    not 7, 7, 2), so that no chunk leaves a GPU's launches small."""
    per_image = geom.out_pixels * geom.kernel_points * geom.in_channels * dtype.itemsize + extra_bytes_per_image
    fit = images_per_chunk(per_image, geom.batch)
    count = -(-geom.batch // fit)
    bounds = [geom.batch * i // count for i in range(count + 1)] if geom.batch else [0, 0]
    return [slice(start, stop) for start, stop in zip(bounds, bounds[1:]) if stop > start]
