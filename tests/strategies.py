"""Hypothesis strategies for deformable-convolution calls.

``calls()`` draws a whole call: a geometry (batch 0 included, channels,
groups, offset groups, rectangular kernels, stride/padding/dilation pairs,
mask and bias present or not) and arrays filled from a seeded NumPy
generator. Offsets are an integer in [-3, 3] plus a fraction in [0.1, 0.9],
so sample points sit away from the integer kinks where bilinear
interpolation is not differentiable.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from hypothesis import strategies as st


@dataclass
class Call:
    input: np.ndarray
    offset: np.ndarray
    weight: np.ndarray
    bias: np.ndarray | None
    mask: np.ndarray | None
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    offset_groups: int
    seed: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def kwargs(self) -> dict:
        """Keyword arguments of cudcn.deform_conv2d."""
        return dict(
            input=self.input, offset=self.offset, weight=self.weight, bias=self.bias,
            stride=self.stride, padding=self.padding, dilation=self.dilation, mask=self.mask,
        )

    @property
    def kernel_size(self) -> tuple[int, int]:
        return tuple(self.weight.shape[2:])


def output_size(size, kernel, stride, padding, dilation) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def offsets_off_kinks(rng: np.random.Generator, shape, spread: int = 3) -> np.ndarray:
    """Offsets whose fractional part stays in [0.1, 0.9]."""
    whole = rng.integers(-spread, spread + 1, shape)
    return whole + rng.uniform(0.1, 0.9, shape) * rng.choice([-1.0, 1.0], shape)


@st.composite
def calls(
    draw,
    dtype=np.float64,
    max_batch: int = 2,
    max_size: int = 7,
    with_mask=None,
    with_bias=None,
    min_batch: int = 0,
    out_divisible_by_offset_groups: bool = False,
    wild_offsets: bool = False,
) -> Call:
    """A random valid call. ``wild_offsets`` also draws far, huge and non-finite offsets."""
    batch = draw(st.integers(min_batch, max_batch))
    groups = draw(st.integers(1, 2))
    offset_groups = draw(st.integers(1, 2))
    per_group = draw(st.integers(1, 2)) * (offset_groups if groups == 1 else 1)
    in_channels = groups * per_group * (offset_groups if groups > 1 else 1)
    out_per_group = draw(st.integers(1, 3))
    out_channels = groups * out_per_group
    if out_divisible_by_offset_groups:
        out_channels *= offset_groups
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    min_h = max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0])
    min_w = max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1])
    height = draw(st.integers(min_h, max(min_h, max_size)))
    width = draw(st.integers(min_w, max(min_w, max_size)))
    out_h = output_size(height, kh, stride[0], padding[0], dilation[0])
    out_w = output_size(width, kw, stride[1], padding[1], dilation[1])
    has_mask = draw(st.booleans()) if with_mask is None else with_mask
    has_bias = draw(st.booleans()) if with_bias is None else with_bias
    seed = draw(st.integers(0, 2**32 - 1))

    rng = np.random.default_rng(seed)
    offset_shape = (batch, 2 * offset_groups * kh * kw, out_h, out_w)
    offset = offsets_off_kinks(rng, offset_shape)
    if wild_offsets:
        wild = rng.random(offset_shape) < 0.2
        offset[wild] = rng.choice([np.nan, np.inf, -np.inf, 1e30, -1e30, 40.0, -40.0], wild.sum())
    call = Call(
        input=rng.standard_normal((batch, in_channels, height, width)),
        offset=offset,
        weight=rng.standard_normal((out_channels, in_channels // groups, kh, kw)),
        bias=rng.standard_normal(out_channels) if has_bias else None,
        mask=rng.uniform(0.1, 1.0, (batch, offset_groups * kh * kw, out_h, out_w)) if has_mask else None,
        stride=stride, padding=padding, dilation=dilation,
        groups=groups, offset_groups=offset_groups, seed=seed,
    )
    for name in ("input", "offset", "weight", "bias", "mask"):
        value = getattr(call, name)
        if value is not None:
            setattr(call, name, value.astype(dtype))
    return call


def edge_positions(size: int) -> list[int]:
    """-1, 0, an interior row, size - 1 and size (some coincide for tiny sizes)."""
    return sorted({-1, 0, size // 2, size - 1, size})


def offsets_on_kinks(call, rng: np.random.Generator, fraction: float = 1.0) -> np.ndarray:
    """Offsets that put (a fraction of) the sampling points exactly on the edge
    positions of :func:`edge_positions`, rows and columns drawn independently."""
    n, channels, out_h, out_w = call.offset.shape
    kh, kw = call.kernel_size
    height, width = call.input.shape[2:]
    offset = call.offset.copy()
    rows = np.arange(out_h)[:, None] * call.stride[0] - call.padding[0]
    cols = np.arange(out_w)[None, :] * call.stride[1] - call.padding[1]
    for ch in range(channels):
        k = (ch // 2) % (kh * kw)
        i, j = divmod(k, kw)
        if ch % 2 == 0:
            base, targets = rows + i * call.dilation[0], edge_positions(height)
        else:
            base, targets = cols + j * call.dilation[1], edge_positions(width)
        target = rng.choice(targets, (n, out_h, out_w))
        chosen = rng.random((n, out_h, out_w)) < fraction
        offset[:, ch] = np.where(chosen, target - base, offset[:, ch])
    return offset.astype(call.offset.dtype)
