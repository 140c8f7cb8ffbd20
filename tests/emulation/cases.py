"""Shared by the emulated and the GPU tests: drawn cases, the comparison, a rounded reference.

:func:`cases` draws one call's arguments (geometry, seeded arrays, dtype):
batch 0 to 3, convolution and offset groups that split the channels
independently, 1 to 66 channels (so that the sampling kernels give a point
one lane or several), rectangular kernels, stride/padding/dilation pairs, mask and
bias present or not, offsets that include exact integers (points on pixel
rows and on the -1 / H edges) and, half of the time, NaN, infinite and huge
values.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import strategies as st

from cudcn.backends import layout, numpy as numpy_backend
from emulation.cublas import round_to_tf32

try:
    import ml_dtypes  # bfloat16 for NumPy (optional: only bfloat16 cases need it)
except ImportError:
    ml_dtypes = None

TOLERANCE = {"float64": 1e-12, "float32": 1e-5, "float16": 4e-3, "bfloat16": 3e-2}
SPECIAL_OFFSETS = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30, 3e9, -3e9, 1e4, -1e4])


def _size(n: int, pad: int, dil: int, k: int, stride: int) -> int:
    return (n + 2 * pad - dil * (k - 1) - 1) // stride + 1


@st.composite
def cases(draw, with_weight: bool = True, dtypes=("float32", "float64"), channel_factors=(1, 2, 5, 11)):
    """Arguments of one call: geometry, arrays (seeded) and the dtype; the
    channels a multiple, one of ``channel_factors``, of what the groups need."""
    name = draw(st.sampled_from([d for d in dtypes if d != "bfloat16" or ml_dtypes is not None]))
    dtype = np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)
    offset_groups = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.sampled_from([1, 2])) if with_weight else 1
    base = offset_groups * groups // math.gcd(offset_groups, groups)
    # Also channel counts that give a point several lanes, none a multiple of 32.
    channels = base * draw(st.sampled_from(channel_factors))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    sh, sw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    height = draw(st.integers(max(1, dh * (kh - 1) + 1 - 2 * ph), 7))
    width = draw(st.integers(max(1, dw * (kw - 1) + 1 - 2 * pw), 7))
    batch = draw(st.integers(0, 3))
    out_h, out_w = _size(height, ph, dh, kh, sh), _size(width, pw, dw, kw, sw)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    offset = rng.uniform(-3, 3, (batch, 2 * offset_groups * kh * kw, out_h, out_w))
    # Exact integers put points on pixel rows/columns and on the -1 / H edges.
    integer = rng.random(offset.shape) < 0.2
    offset[integer] = rng.integers(-height - 1, height + 1, integer.sum())
    if draw(st.booleans()):
        special = rng.random(offset.shape) < 0.2
        offset[special] = rng.choice(SPECIAL_OFFSETS, special.sum())

    args = {
        "input": rng.standard_normal((batch, channels, height, width)),
        "offset": offset,
        "mask": rng.uniform(-1, 1, (batch, offset_groups * kh * kw, out_h, out_w)) if draw(st.booleans()) else None,
    }
    if with_weight:
        out_channels = groups * draw(st.integers(1, 2))
        args["weight"] = rng.standard_normal((out_channels, channels // groups, kh, kw))
        args["bias"] = rng.standard_normal(out_channels) if draw(st.booleans()) else None
    else:
        args["kernel_size"] = (kh, kw)
    args = {k: (v.astype(dtype) if isinstance(v, np.ndarray) else v) for k, v in args.items()}
    args.update(stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw))
    return args, rng


def assert_close(got, expected, dtype_name: str, tol: float | None = None) -> None:
    """Same dtype and shape; close relative to the largest expected value
    (TOLERANCE of the dtype unless ``tol`` is given); no NaN allowed."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    got64, expected64 = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    assert np.isfinite(expected64).all()
    tol = TOLERANCE[dtype_name] if tol is None else tol
    scale = max(float(np.abs(expected64).max(initial=0.0)), 1.0)
    np.testing.assert_allclose(got64, expected64, rtol=tol, atol=tol * scale, equal_nan=False)


def rounded_operands_forward(geom, args: dict, tf32: bool) -> np.ndarray:
    """The forward from the NumPy backend's columns and the weight, each rounded
    as the fused kernel's operands (to the dtype, or float32 then TF32),
    multiplied and summed in float64, the bias added, rounded once: what a
    tensor-core product of those operands computes, up to summation order."""
    x, offset, weight, bias, mask = (args[k] for k in ("input", "offset", "weight", "bias", "mask"))
    columns = numpy_backend.im2col(geom, x, offset, mask)  # (N, L, K, C) in the dtype
    matrix = layout.weight_matrix(geom, weight, weight.dtype)
    if tf32:
        columns, matrix = round_to_tf32(columns), round_to_tf32(matrix)
    columns, matrix = columns.astype(np.float64), matrix.astype(np.float64)
    y = np.matmul(layout.grouped_columns(geom, columns), matrix)  # (groups, N*L, O/groups)
    y = y.transpose(1, 0, 2).reshape(geom.batch, geom.out_h, geom.out_w, geom.out_channels).transpose(0, 3, 1, 2)
    if bias is not None:
        y = y + bias.astype(np.float64).reshape(1, -1, 1, 1)
    return y.astype(geom.dtype)
