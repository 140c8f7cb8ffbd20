"""The bilinear-sampling core that every operator family shares.

Every deformable operator in cudcn samples images bilinearly at points it
computes: deformable convolution at the kernel grid plus offsets, multi-scale
deformable attention at normalised locations scaled to each level. Whatever
computes the points, the sampling itself is linear in the images, and so it
is a sparse matrix S. This module builds S from the points and provides the
pieces every gradient is made of; the front-ends (:mod:`.dcn`, :mod:`.msda`)
only say where the points are and how their rows and columns are laid out.

Notation
--------
- A *point* p is one sampling location (y_p, x_p) in pixel coordinates of its
  image (row y, column x; pixel (r, c) has its centre at y = r, x = c), with
  a weight a_p (a mask or an attention weight; 1 when there is none).
- X is the images' pixels as a 2-D array: a row per pixel (of every image a
  matrix reads), holding that pixel's channels; one row, ``outside``, is
  zero. A point reads the image of height H_p and width W_p whose pixel
  (r, c) is row ``first_column_p + (r*W_p + c)*column_step`` of X.
- S has a row per *output row* and a column per row of X. An output row sums
  ``points_per_row`` consecutive points (1 for deformable convolution, where
  each point is a row of the column buffer; levels x points for attention,
  where the output is a weighted sum of samples).

The matrix
----------
Each point has four entries in its row of S, its four corners in the order
(y0, x0), (y0, x0+1), (y0+1, x0), (y0+1, x0+1) with y0 = floor(y),
x0 = floor(x), fy = y - y0, fx = x - x0. An entry's value is the bilinear
weight times a_p::

    (1-fy)(1-fx) a,   (1-fy) fx a,   fy (1-fx) a,   fy fx a

- A corner outside its image counts 0: its entry points at the ``outside``
  column with value 0.
- A point with y <= -1, y >= H, x <= -1 or x >= W counts 0 as a whole, and so
  does a non-finite one: every entry points at ``outside`` with value 0, and
  its fractions are 0. A point exactly on row -1 (or column -1) has value 0
  but keeps its corners, for the derivatives below.
- A row holds 4 * points_per_row entries (CSR, indptr in steps of
  4 * points_per_row); entries of one row may share a column (scipy sums
  them in products). S·X is then every output row's weighted sum of samples.

Gradients
---------
For a loss with gradient G with respect to S·X (a row per output row):

- the gradient with respect to X is Sᵀ·G (the transpose is a CSC view of the
  same arrays);
- with the corner products ``s[c, p] = <G[row of p], X[corner c of p]>``
  (:func:`corner_products`: a ``take`` of the corner rows of the 2-D X)::

      top    = (1 - fx) * s[0] + fx * s[1]   # row y0, interpolated in x
      bottom = (1 - fx) * s[2] + fx * s[3]   # row y0 + 1
      left   = (1 - fy) * s[0] + fy * s[2]   # column x0, interpolated in y
      right  = (1 - fy) * s[1] + fy * s[3]   # column x0 + 1
      d/dy = a * (bottom - top),   d/dx = a * (right - left)
      d/da = (1 - fy) * top + fy * bottom

  (:func:`location_gradients`), in pixel units; a front-end applies its own
  chain rule (for example x = u*W - 0.5 gives d/du = W * d/dx).

At an integer y (a kink) these are the one-sided derivatives towards y + 1:
rows y and y + 1 are the corners. A corner outside the image reads the zero
row, so this holds at the border too: at y = -1 the top row is outside,
fy = 0, the value is 0 and d/dy is the bottom row's, the slope towards row 0
(torchvision's and ``grid_sample``'s rule; paddle and mmcv return 0 there).

Everything runs in one compute dtype (:func:`compute_dtype`): S's values, X,
the products and the fractions.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

#: Corner c of a point, as (row, column) steps from (y0, x0).
CORNERS = ((0, 0), (0, 1), (1, 0), (1, 1))

#: Bytes of corner rows gathered at once for the corner products: enough to
#: amortise the loop, few enough to be read back from the last-level cache.
_GATHER_BYTES = 2**22


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """float64 stays float64; float16, bfloat16 and float32 compute in float32."""
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


class Sampling(NamedTuple):
    """Bilinear sampling at P points, summed into P / points_per_row output rows."""

    matrix: Any  # S: scipy.sparse.csr_array (rows, columns), 4 * points_per_row entries per row
    frac_y: np.ndarray  # (P,) y - floor(y); 0 for a point that counts 0
    frac_x: np.ndarray  # (P,) x - floor(x)
    weight: np.ndarray | None  # (P,) a, or None (a = 1)
    points_per_row: int

    @property
    def corners(self) -> np.ndarray:
        """(P, 4) column of S (row of X) of each corner of each point."""
        return self.matrix.indices.reshape(-1, 4)


def pixel_rows(count: int, width: int, dtype: np.dtype) -> np.ndarray:
    """An uninitialised X (count + 1, width) whose last row (``outside`` = count) is zero."""
    pixels = np.empty((count + 1, width), dtype)
    pixels[-1] = 0
    return pixels


def sample(
    y: np.ndarray,
    x: np.ndarray,
    height: Any,
    width: Any,
    first_column: Any,
    column_step: int,
    outside: int,
    weight: np.ndarray | None = None,
    points_per_row: int = 1,
) -> Sampling:
    """S for the points (y, x), with the fractions.

    Args:
        y, x: pixel coordinates of the points, any shape (P points in C
            order), in the compute dtype. Not modified.
        height, width: each point's image size: ints, or integer arrays
            broadcastable to y's shape (for example one per level).
        first_column: column of S of pixel (0, 0) of each point's image: an
            int or an integer array broadcastable to y's shape.
        column_step: columns between horizontally adjacent pixels.
        outside: the zero column; S has outside + 1 columns.
        weight: a per point (y's shape or (P,)), or None.
        points_per_row: consecutive points summed into one row of S; must
            divide P.
    """
    from scipy import sparse  # only when the NumPy backend runs: `import cudcn` stays NumPy-only

    dtype = y.dtype
    points = y.size
    index_dtype = np.dtype(np.int32 if max(outside, 4 * points) < 2**31 else np.int64)

    def per_point(v, shift=0):  # an int, or a flat array of P
        if not isinstance(v, np.ndarray) or v.size == 1:
            return int(np.asarray(v).reshape(-1)[0]) + shift
        return np.add(np.broadcast_to(v, y.shape), shift, dtype=index_dtype).reshape(-1)

    # first_column is only ever needed relative to the outside column.
    height, width, first_column = per_point(height), per_point(width), per_point(first_column, -outside)
    y, x = y.reshape(-1), x.reshape(-1)
    if weight is not None:
        weight = np.ascontiguousarray(weight, dtype).reshape(-1)
    index = np.empty((points, 4), index_dtype)
    values = np.empty((points, 4), dtype)
    frac_y, frac_x = np.empty(points, dtype), np.empty(points, dtype)
    # A block at a time, so that its temporaries stay in cache.
    for start in range(0, points, _BLOCK_POINTS):
        part = slice(start, start + _BLOCK_POINTS)
        _sample_block(
            y[part], x[part], *(v[part] if isinstance(v, np.ndarray) else v for v in (height, width, first_column)),
            column_step, outside, None if weight is None else weight[part],
            index[part], values[part], frac_y[part], frac_x[part])

    step = 4 * points_per_row
    matrix = sparse.csr_array(
        (values.reshape(-1), index.reshape(-1), np.arange(0, 4 * points + 1, step, dtype=index_dtype)),
        shape=(points // points_per_row, outside + 1),
    )
    return Sampling(matrix, frac_y, frac_x, weight, points_per_row)


#: Points whose entries of S are computed at once: the block's temporaries
#: (a dozen arrays of _BLOCK_POINTS values) stay in the L2 cache.
_BLOCK_POINTS = 2**16

#: Coordinates are clamped to [-2, _FAR] before they are floored: beyond
#: either end a point reads no pixel of any image, and every integer up to
#: _FAR is exact in float32, so the floor converts to an int without overflow.
_FAR = 2**24


def _sample_block(y, x, height, width, first_relative, column_step, outside, weight, index, values, frac_y, frac_x):
    """:func:`sample` for B points (flat arrays): their entries (index,
    values: (B, 4)) and fractions (B,) into the arrays given.
    first_relative is first_column - outside."""
    dtype = values.dtype
    y0, rows_in = _axis(y, height, frac_y, index.dtype)
    x0, columns_in = _axis(x, width, frac_x, index.dtype)

    # Bilinear weights of the two rows, with "inside" and the weight folded
    # in, and of the two columns: a corner's value is a row's times a column's.
    weight_y = [np.subtract(1, frac_y, dtype=dtype), frac_y * rows_in[1]]
    weight_y[0] *= rows_in[0]
    weight_x = [np.subtract(1, frac_x, dtype=dtype), frac_x * columns_in[1]]
    weight_x[0] *= columns_in[0]
    if weight is not None:
        for w in weight_y:
            w *= weight

    # Corner (a, b) is column first + ((y0 + a)*width + x0 + b)*column_step
    # when row y0 + a and column x0 + b are inside, else ``outside``: as
    # outside + inside * (that column - outside), so that no test branches.
    row_step = width * column_step
    row_columns = np.multiply(y0, row_step, out=y0)
    row_columns += first_relative
    row_columns = row_columns, row_columns + row_step
    column_offsets = x0 if column_step == 1 else np.multiply(x0, column_step, out=x0)
    column_offsets = column_offsets, column_offsets + column_step
    relative = np.empty_like(x0)
    for c, (a, b) in enumerate(CORNERS):
        np.add(row_columns[a], column_offsets[b], out=relative)
        relative *= rows_in[a] & columns_in[b]
        np.add(relative, outside, out=index[:, c])
        np.multiply(weight_y[a], weight_x[b], out=values[:, c])

    # A point that counts 0 has no corner inside; its fractions are set to 0.
    reach = (rows_in[0] | rows_in[1]) & (columns_in[0] | columns_in[1])
    frac_y *= reach
    frac_x *= reach


def _axis(t: np.ndarray, size: Any, frac: np.ndarray, index_dtype: np.dtype):
    """Floor and "inside" of the two neighbours along one axis; the fraction into ``frac``.

    t: coordinates; size: the image's extent along the axis (an int or an
    array like t). Returns t0 = floor(t) and whether pixels t0 and t0 + 1
    lie in [0, size), and writes t - t0 into frac: a non-finite t, or one
    below -1 or at or past size, has neither inside.
    """
    t = np.fmax(t, -2)  # NaN -> -2 too
    np.minimum(t, _FAR, out=t)
    t0 = np.floor(t)
    np.subtract(t, t0, out=frac)
    t0 = t0.astype(index_dtype)
    # As unsigned, -1 and -2 are past every size: one comparison per neighbour.
    unsigned = np.uint32 if index_dtype == np.int32 else np.uint64
    t0_unsigned = t0.view(unsigned)
    if isinstance(size, np.ndarray):
        size = size.view(unsigned)
    return t0, (t0_unsigned < size, t0_unsigned + 1 < size)


def corner_products(sampling: Sampling, grad_rows: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """s (4, P): s[c, p] = <G[row of p], X[corner c of p]>.

    grad_rows: G, (rows of S, channels); pixels: X, (columns of S, channels).
    The corner rows of X are gathered (``take`` on the 2-D X) for a block of
    rows at a time, about _GATHER_BYTES, so that they are read back from
    cache; a block is also at most an eighth of the rows, so that for small
    calls the gathered rows (4 * points_per_row per row of G) never take more
    than points_per_row / 2 times G's memory.
    """
    rows, width = grad_rows.shape
    per_row = sampling.points_per_row
    dtype = grad_rows.dtype
    corners = sampling.matrix.indices.reshape(rows, 4 * per_row)
    block = max(1, min(_GATHER_BYTES // (4 * per_row * width * dtype.itemsize), rows // 8))
    gathered = np.empty((min(block, rows), 4 * per_row, width), dtype)
    # A stack of (4 * per_row, C)·(C, 1) products per block (BLAS): 15-30%
    # faster than the same sums by einsum. One point per row: the products
    # go straight to s (4, rows); several: to (rows, 4 * per_row), seen as s
    # afterwards.
    s = np.empty((4, rows), dtype) if per_row == 1 else np.empty((rows, 4 * per_row), dtype)
    for start in range(0, rows, block):
        part = slice(start, start + block)
        corner_rows = gathered[:len(grad_rows[part])]
        # Every index is valid; mode="clip" spares the copy NumPy makes of `out` otherwise.
        pixels.take(corners[part], axis=0, out=corner_rows, mode="clip")  # (block, 4 * per_row, C)
        out = s[:, part].T if per_row == 1 else s[part]
        np.matmul(corner_rows, grad_rows[part, :, None], out=out[:, :, None])
    return s if per_row == 1 else s.reshape(-1, 4).T


def location_gradients(sampling: Sampling, s: np.ndarray):
    """(d/dy, d/dx, d/da) per point, each (P,), from the corner products s
    (4, P); d/da is None when the sampling has no weight. Pixel units."""
    fy, fx = sampling.frac_y, sampling.frac_x

    def between(a, b, f):  # a + f * (b - a), into a new array
        out = np.subtract(b, a)
        out *= f
        out += a
        return out

    top, bottom = between(s[0], s[1], fx), between(s[2], s[3], fx)  # rows y0 and y0 + 1, interpolated in x
    left, right = between(s[0], s[2], fy), between(s[1], s[3], fy)  # columns x0 and x0 + 1, interpolated in y
    grad_y = np.subtract(bottom, top)
    grad_x = np.subtract(right, left, out=right)
    if sampling.weight is None:
        return grad_y, grad_x, None
    grad_weight = np.multiply(grad_y, fy)  # top + fy * (bottom - top)
    grad_weight += top
    grad_y *= sampling.weight
    grad_x *= sampling.weight
    return grad_y, grad_x, grad_weight
