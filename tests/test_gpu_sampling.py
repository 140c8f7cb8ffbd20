"""The im2col path's atomics and layout passes on a GPU (marker ``gpu``; skipped without a device).

What the emulator can count but only a device can run:

- deform_col2im's vector atomics (red.global.add.v4.f32, sm_90 on) and its
  scalar ones, against the NumPy backend in every dtype: channel counts
  whose blocks of 4 fit an offset group (the vector path on sm_90) and
  counts whose blocks do not (single channels);
- the tiled layout passes, bit for bit against NumPy's transpose: whole
  and partial tiles, a single channel or pixel (the plain copy), and the
  round trip through from_channels_last's float32 accumulator.

Every allocation starts as NaN bytes, so an element a kernel forgets fails.
"""

from __future__ import annotations

import numpy as np
import pytest

import cudcn
from cudcn.backends import numpy as numpy_backend
from cudcn.backends.cuda import launchers
from cudcn.backends.cuda.engine import CupyEngine, cupy_bfloat16_problem
from cudcn.geometry import validate
from emulation.cases import assert_close, ml_dtypes
from test_gpu import poisoned_memory  # noqa: F401 (autouse: every allocation starts as NaN bytes)

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy")

DTYPES = ["float64", "float32", "float16"] + (["bfloat16"] if ml_dtypes else [])


def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        problem = cupy_bfloat16_problem()
        if problem:
            pytest.skip(f"CuPy has no bfloat16 here: {problem}")
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels, offset_groups", [(64, 1), (24, 2), (6, 2)],
                         ids=["64 channels", "12 an offset group", "3 an offset group"])
def test_col2im_atomics_match_numpy(dtype, channels, offset_groups):
    """Against NumPy, rounded once to the dtype: on sm_90 float32
    accumulators add blocks of 4 channels by one vector red where 64 and 12
    channels an offset group allow it, single channels at 3."""
    dtype = _dtype(dtype)
    rng = np.random.default_rng(channels)
    k = 3
    offset = rng.uniform(-2, 2, (2, 2 * offset_groups * k * k, 9, 7))
    mask = rng.uniform(0, 1, (2, offset_groups * k * k, 9, 7))
    shape = (2, channels, 9, 7)
    geom = validate(input=np.empty(shape, dtype), offset=offset.astype(dtype), mask=mask.astype(dtype),
                    kernel_size=k, padding=1)
    columns = rng.standard_normal(geom.columns_shape).astype(dtype)
    offset, mask = offset.astype(dtype), mask.astype(dtype)
    got = cudcn.deform_col2im(cupy.asarray(columns), cupy.asarray(offset), shape, k, padding=1,
                              mask=cupy.asarray(mask))
    # float32 accumulators: the sum's rounding is the dtype's, once, as NumPy's.
    expected = numpy_backend.col2im(geom, columns, offset, mask)
    assert_close(cupy.asnumpy(got), expected, dtype.name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels, height, width", [(64, 8, 8), (40, 6, 6), (3, 5, 7), (1, 9, 9), (70, 1, 1)],
                         ids=["whole tiles", "partial tiles", "3 channels", "one channel", "one pixel"])
def test_layout_passes_match_numpy_bit_for_bit(dtype, channels, height, width):
    """to_channels_last is NumPy's transpose, bit for bit; from_channels_last
    of a float32 (float64) accumulator is the transpose rounded to the
    dtype, as NumPy rounds it."""
    dtype = _dtype(dtype)
    rng = np.random.default_rng(channels + height)
    x = rng.standard_normal((3, channels, height, width)).astype(dtype)
    geom = validate(input=x, offset=np.zeros((3, 18, height, width), dtype), kernel_size=3, padding=1)
    engine = CupyEngine()
    pixels = launchers.channels_last(engine, geom, cupy.asarray(x))
    expected = np.ascontiguousarray(x.reshape(3, channels, -1).transpose(0, 2, 1))
    assert cupy.asnumpy(pixels).tobytes() == expected.tobytes()

    accum_dtype = np.float64 if dtype == np.float64 else np.float32
    accum = rng.standard_normal((3, height * width, channels)).astype(accum_dtype)
    out = cupy.empty((3, channels, height, width), dtype)
    index, itype = launchers.index_type(engine, accum.size)
    engine.launch("from_channels_last", dtype.name, index,
                  launchers.layout_launch(engine, "from_channels_last", 3, channels, height * width),
                  [cupy.asarray(accum), itype(accum.size), np.int32(channels), np.int32(height * width), out])
    rounded = accum.transpose(0, 2, 1).reshape(3, channels, height, width).astype(dtype)
    assert cupy.asnumpy(out).tobytes() == rounded.tobytes()
