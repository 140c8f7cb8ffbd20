"""References for multi-scale deformable attention, sharing nothing with cudcn.

- ``oracle_forward`` / ``oracle_backward``: the formula, Python loops over
  every (image, query, head, level, point, channel), float64;
- ``torch_grid_sample``: a pure-torch implementation on
  ``torch.nn.functional.grid_sample``, one call per level, for autograd;
- ``calls()``: hypothesis-drawn MSDA calls;
- ``transformers_detr()``: transformers' Deformable DETR modelling module,
  or the reason it cannot be imported here.

The formula: level l of image n, head m, channel d is the image
``value[n, s_l : s_l + H_l*W_l, m, d]`` seen as (H_l, W_l), padded with zeros
on every side; location (u, v) samples it at pixel (y, x) = (v*H_l - 0.5,
u*W_l - 0.5) by bilinear interpolation between the four pixels around it,
(floor(y) or floor(y) + 1, floor(x) or floor(x) + 1). The derivative in y
is the slope between rows floor(y) and floor(y) + 1: at an integer y, the
one-sided derivative towards y + 1. A non-finite location samples 0.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from types import ModuleType

import numpy as np
from hypothesis import strategies as st


def transformers_detr() -> tuple[ModuleType | None, str]:
    """(transformers' modeling_deformable_detr, "") or (None, why not).

    Any exception counts, not only ImportError: transformers imports
    torchvision, and a torchvision built for another torch raises
    RuntimeError ("operator torchvision::nms does not exist") on import.
    """
    try:
        return importlib.import_module("transformers.models.deformable_detr.modeling_deformable_detr"), ""
    except Exception as error:
        return None, f"transformers' Deformable DETR does not import here: {type(error).__name__}: {error}"


def _pixel(image: np.ndarray, row: int, col: int) -> float:
    height, width = image.shape
    return float(image[row, col]) if 0 <= row < height and 0 <= col < width else 0.0


def _cell(y: float, x: float):
    """(row, col, weight, d weight/dy, d weight/dx) of the four pixels around (y, x)."""
    r, c = math.floor(y), math.floor(x)
    fy, fx = y - r, x - c
    return (
        (r, c, (1 - fy) * (1 - fx), -(1 - fx), -(1 - fy)),
        (r, c + 1, (1 - fy) * fx, -fx, 1 - fy),
        (r + 1, c, fy * (1 - fx), 1 - fx, -fy),
        (r + 1, c + 1, fy * fx, fx, fy),
    )


def _terms(value, spatial_shapes, sampling_locations, attention_weights):
    """Every (n, q, m, l, p) with its level's images (H_l, W_l, D) and pixel (y, x)."""
    n_batch, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    start = 0
    level_start = []
    for height, width in spatial_shapes:
        level_start.append(start)
        start += height * width
    for n in range(n_batch):
        for q in range(queries):
            for m in range(heads):
                for l in range(levels):
                    height, width = (int(s) for s in spatial_shapes[l])
                    first = level_start[l]
                    images = value[n, first:first + height * width, m].reshape(height, width, channels)
                    for p in range(points):
                        u, v = (float(t) for t in sampling_locations[n, q, m, l, p])
                        y, x = v * height - 0.5, u * width - 0.5
                        yield (n, q, m, l, p), images, (first, width), y, x


def oracle_forward(value, spatial_shapes, sampling_locations, attention_weights) -> np.ndarray:
    """(N, Lq, M*D), float64."""
    value = np.asarray(value, np.float64)
    n_batch, _, heads, channels = value.shape
    queries = sampling_locations.shape[1]
    out = np.zeros((n_batch, queries, heads, channels))
    for (n, q, m, l, p), images, _, y, x in _terms(value, spatial_shapes, sampling_locations, attention_weights):
        if not (math.isfinite(y) and math.isfinite(x)):
            continue
        a = float(attention_weights[n, q, m, l, p])
        for d in range(channels):
            image = images[:, :, d]
            out[n, q, m, d] += a * sum(w * _pixel(image, r, c) for r, c, w, _, _ in _cell(y, x))
    return out.reshape(n_batch, queries, heads * channels)


def oracle_backward(grad_output, value, spatial_shapes, sampling_locations, attention_weights):
    """(grad_value, grad_sampling_locations, grad_attention_weights), float64."""
    value = np.asarray(value, np.float64)
    n_batch, _, heads, channels = value.shape
    queries = sampling_locations.shape[1]
    grad_output = np.asarray(grad_output, np.float64).reshape(n_batch, queries, heads, channels)
    grad_value = np.zeros_like(value)
    grad_locations = np.zeros(sampling_locations.shape)
    grad_weights = np.zeros(attention_weights.shape)
    for at, images, (first, width), y, x in _terms(value, spatial_shapes, sampling_locations, attention_weights):
        if not (math.isfinite(y) and math.isfinite(x)):
            continue
        n, q, m, l, p = at
        height = images.shape[0]
        a = float(attention_weights[at])
        for d in range(channels):
            go = grad_output[n, q, m, d]
            image = images[:, :, d]
            for r, c, w, w_dy, w_dx in _cell(y, x):
                pixel = _pixel(image, r, c)
                grad_weights[at] += go * w * pixel
                grad_locations[at][0] += go * a * w_dx * pixel * width  # x = u*W - 0.5
                grad_locations[at][1] += go * a * w_dy * pixel * height  # y = v*H - 0.5
                if 0 <= r < height and 0 <= c < width:
                    grad_value[n, first + r * width + c, m, d] += go * a * w
    return grad_value, grad_locations, grad_weights


def torch_grid_sample(value, spatial_shapes, sampling_locations, attention_weights):
    """The same sum on torch tensors through grid_sample (align_corners=False,
    zeros), one call per level, accumulated level by level. (N, Lq, M*D)."""
    import torch
    import torch.nn.functional as F

    n_batch, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    total = value.new_zeros((n_batch * heads, channels, queries))
    first = 0
    for level, (height, width) in enumerate(spatial_shapes):
        pixels = value[:, first:first + height * width]  # (N, H*W, M, D)
        first += height * width
        images = pixels.permute(0, 2, 3, 1).reshape(n_batch * heads, channels, height, width)
        # grid_sample's grid is in [-1, 1]: g = 2*u - 1 maps to pixel u*W - 0.5.
        grid = 2 * sampling_locations[:, :, :, level] - 1  # (N, Lq, M, P, 2)
        grid = grid.permute(0, 2, 1, 3, 4).reshape(n_batch * heads, queries, points, 2)
        samples = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        weights = attention_weights[:, :, :, level].permute(0, 2, 1, 3).reshape(n_batch * heads, 1, queries, points)
        total = total + (samples * weights).sum(-1)  # (N*M, D, Lq)
    return total.reshape(n_batch, heads * channels, queries).transpose(1, 2).contiguous()


def floats_as(dtype, args) -> list:
    """The floating arrays of ``args`` in another dtype (integer ones, such as
    spatial_shapes and level_start_index, stay)."""
    return [a.astype(dtype) if a.dtype.kind == "f" or a.dtype.name == "bfloat16" else a for a in args]


@dataclass
class MSDACall:
    value: np.ndarray
    spatial_shapes: np.ndarray
    level_start_index: np.ndarray
    sampling_locations: np.ndarray
    attention_weights: np.ndarray
    seed: int

    @property
    def args(self) -> tuple:
        return (self.value, self.spatial_shapes, self.level_start_index,
                self.sampling_locations, self.attention_weights)

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return [tuple(int(s) for s in pair) for pair in self.spatial_shapes]


@st.composite
def calls(draw, max_batch: int = 2, max_queries: int = 3, kinks: float = 0.0, sizes=None, min_batch: int = 0):
    """A drawn MSDA call in float64.

    Levels 1-3 of 1-5 rows and columns (or drawn from ``sizes``: powers of
    two put kinks exactly on integers), batch and queries from 0, heads 1-3,
    channels 1-5, points 1-3. A location's pixel is an integer in
    [-2, size + 1] plus a fraction in [0.1, 0.9] (away from kinks, up to
    1.5 pixels outside the level); with ``kinks`` > 0 that share of the
    coordinates is an integer in [-1, size] instead, on a kink.
    """
    side = st.integers(1, 5) if sizes is None else st.sampled_from(sizes)
    shapes = draw(st.lists(st.tuples(side, side), min_size=1, max_size=3))
    batch = draw(st.integers(min_batch, max_batch))
    queries = draw(st.integers(0, max_queries))
    heads, channels, points = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    levels = len(shapes)
    sizes_hw = np.array(shapes)
    pixels = int((sizes_hw[:, 0] * sizes_hw[:, 1]).sum())
    starts = np.concatenate([[0], np.cumsum(sizes_hw[:, 0] * sizes_hw[:, 1])[:-1]])

    # Pixel coordinates per (.., level, point, (x, y)), then normalised.
    extent = sizes_hw[:, ::-1].reshape(levels, 1, 2)  # (W, H)
    shape = (batch, queries, heads, levels, points, 2)
    pixel = rng.integers(-2, extent + 2, shape) + rng.uniform(0.1, 0.9, shape)
    on_kink = rng.random(shape) < kinks
    pixel = np.where(on_kink, rng.integers(-1, extent + 1, shape), pixel)
    locations = (pixel + 0.5) / extent
    return MSDACall(
        value=rng.standard_normal((batch, pixels, heads, channels)),
        spatial_shapes=sizes_hw.astype(np.int64),
        level_start_index=starts.astype(np.int64),
        sampling_locations=locations,
        attention_weights=rng.uniform(-1, 1, (batch, queries, heads, levels, points)),
        seed=seed,
    )
