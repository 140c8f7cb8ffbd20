"""The im2col path's atomics and layout passes on a GPU (marker ``gpu``; skipped without a device).

What the emulator can count but only a device can run:

- deform_col2im's vector atomics (red.global.add.v4.f32, sm_90 on) and its
  scalar ones, against the NumPy backend in every dtype: channel counts
  whose blocks of 4 fit an offset group (the vector path on sm_90) and
  counts whose blocks do not (single channels);
- the tiled layout passes, bit for bit against NumPy's transpose: whole
  and partial tiles, a single channel or pixel (the plain copy), and the
  round trip through from_channels_last's float32 accumulator;
- layout_copies with every view the im2col path copies through (tiled
  transposes, the weight's runs, a broadcast, a conversion, a zero fill)
  in one launch each way, bit for bit against NumPy.

Every allocation starts as NaN bytes, so an element a kernel forgets fails.
"""

from __future__ import annotations

import numpy as np
import pytest

import cudcn
from cudcn.backends import numpy as numpy_backend
from cudcn.backends.cuda import launchers
from cudcn.backends.cuda.engine import CupyEngine
from cudcn.geometry import validate
from emulation.cases import assert_close, ml_dtypes
from test_gpu import device_dtype as _dtype
from test_gpu import poisoned_memory  # noqa: F401 (autouse: every allocation starts as NaN bytes)

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy")

DTYPES = ["float64", "float32", "float16"] + (["bfloat16"] if ml_dtypes else [])




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


@pytest.mark.parametrize("dtype", DTYPES)
def test_layout_copies_match_numpy_bit_for_bit(dtype):
    """The im2col path's layout_copies launches on a device: the input
    channels-last, grad_output as GEMM rows and the weight matrix with a
    zeroed accumulator; the accumulator, the weight gradient and a bias
    gradient back, rounded to the dtype; a bias broadcast. Two groups and a
    2 x 3 kernel, so that tiles are partial and cross images."""
    dtype = _dtype(dtype)
    rng = np.random.default_rng(7)
    accum_dtype = np.float64 if dtype == np.float64 else np.float32
    n, channels, out_channels = 3, 40, 36
    x = rng.standard_normal((n, channels, 9, 7)).astype(dtype)
    weight = rng.standard_normal((out_channels, channels // 2, 2, 3)).astype(dtype)
    geom = validate(input=x, offset=np.zeros((n, 12, 8, 5), dtype), weight=weight)
    grad_output = rng.standard_normal((n, out_channels, 8, 5)).astype(dtype)
    engine = CupyEngine()
    pixels = cupy.empty((n, 63, channels), dtype)
    rows = cupy.empty((2, n * 40, out_channels // 2), dtype)
    matrix = cupy.empty((2, 6 * channels // 2, out_channels // 2), dtype)
    zeroed = cupy.full((n, 63, channels), np.nan, accum_dtype)
    launchers.layout_copies(engine, geom, [
        (cupy.asarray(x), launchers.channels_last_view(geom, n), pixels),
        (cupy.asarray(grad_output), launchers.rows_view(geom, n), rows),
        (cupy.asarray(weight), launchers.weight_matrix_view(geom), matrix),
    ], zero=zeroed)
    from cudcn.backends.layout import weight_matrix

    assert cupy.asnumpy(pixels).tobytes() == np.ascontiguousarray(x.reshape(n, channels, 63).transpose(0, 2, 1)).tobytes()
    expected_rows = grad_output.reshape(n, 2, out_channels // 2, 40).transpose(1, 0, 3, 2)
    assert cupy.asnumpy(rows).tobytes() == np.ascontiguousarray(expected_rows).tobytes()
    assert cupy.asnumpy(matrix).tobytes() == np.ascontiguousarray(weight_matrix(geom, weight, dtype)).tobytes()
    assert not cupy.asnumpy(zeroed).any()

    accum = rng.standard_normal((n, 63, channels)).astype(accum_dtype)
    matrix_t = rng.standard_normal((2, out_channels // 2, 6 * channels // 2)).astype(accum_dtype)
    bias_sum = rng.standard_normal(out_channels).astype(accum_dtype)
    grad_input = cupy.empty(x.shape, dtype)
    grad_weight = cupy.empty(weight.shape, dtype)
    grad_bias = cupy.empty(out_channels, dtype)
    launchers.layout_copies(engine, geom, [
        (cupy.asarray(accum), launchers.from_channels_last_view(geom, n), grad_input),
        (cupy.asarray(matrix_t), launchers.weight_from_matrix_view(geom), grad_weight),
        (cupy.asarray(bias_sum), launchers.flat_view(out_channels), grad_bias),
    ], from_accumulator=True)
    assert cupy.asnumpy(grad_input).tobytes() == accum.transpose(0, 2, 1).reshape(x.shape).astype(dtype).tobytes()
    expected_weight = matrix_t.reshape(2, out_channels // 2, 6, channels // 2).transpose(0, 1, 3, 2)
    assert cupy.asnumpy(grad_weight).tobytes() == expected_weight.reshape(weight.shape).astype(dtype).tobytes()
    assert cupy.asnumpy(grad_bias).tobytes() == bias_sum.astype(dtype).tobytes()

    out = cupy.empty((n, out_channels, 8, 5), dtype)
    bias = rng.standard_normal(out_channels).astype(dtype)
    launchers.layout_copies(engine, geom, [(cupy.asarray(bias), launchers.bias_view(geom, n), out)])
    assert cupy.asnumpy(out).tobytes() == np.ascontiguousarray(
        np.broadcast_to(bias.reshape(1, -1, 1, 1), out.shape)).tobytes()
