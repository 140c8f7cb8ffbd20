"""The CUDA backend's cuBLAS products, run through the emulated cuBLAS (no GPU needed).

Every product of :mod:`cudcn.backends.cuda.gemms` is checked against a
float64 NumPy product, through the column-major arguments the backend hands
cuBLAS (tests/emulation/cublas.py reads them as cuBLAS would). Also: which
dtypes reach cuBLAS, that the forward writes the output in place with the
bias in the GEMM's epilogue, that TF32 reaches float32 GEMMs only while the
setting is on, and that the emulated cuBLAS itself rejects bad arguments.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import cudcn
from cudcn.backends.cuda import gemms, im2col_gemm
from cudcn.backends.cuda.engine import Gemm
from cudcn.geometry import validate
from emulation import cublas, harness
from emulation.cases import ml_dtypes

DTYPES = ["float16", "float32", "float64"] + (["bfloat16"] if ml_dtypes else [])
#: Relative error of one product in each operand dtype (operands exact in it).
TOLERANCE = {"float16": 2e-3, "bfloat16": 1.6e-2, "float32": 2e-6, "float64": 1e-13}


def _dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _wide(dtype: np.dtype) -> np.dtype:
    return np.dtype(np.float64 if dtype == np.float64 else np.float32)


def _engine() -> harness.EmulatedEngine:
    return harness.EmulatedEngine(library=None)  # GEMMs only: no kernel is launched


def _close(got, expected, dtype_name: str) -> None:
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    scale = max(float(np.abs(expected).max(initial=0.0)), 1.0)
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE[dtype_name] * scale)


shapes = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 7), st.integers(1, 9), st.integers(1, 5))


@given(shapes, st.sampled_from(DTYPES), st.booleans(), st.integers(0, 2**32 - 1))
def test_forward_product_writes_the_output_in_place(shape, dtype_name, bias, seed):
    """out[i, g] = (columns[g, i] @ W[g])^T (+ what out held), in the output's dtype, one GEMM
    per group or per image (fewer calls), written where the output lies."""
    groups, n, pixels, depth, per_group_out = shape
    dtype = _dtype(dtype_name)
    rng = np.random.default_rng(seed)
    columns = rng.standard_normal((groups, n * pixels, depth)).astype(dtype)
    matrix = rng.standard_normal((groups, depth, per_group_out)).astype(dtype)
    start = rng.standard_normal((n, groups, per_group_out, pixels)).astype(dtype)
    out = start.copy() if bias else np.full(start.shape, np.nan, dtype)  # beta = 0 never reads it
    engine = _engine()
    gemms.forward(engine, columns, matrix, out, beta=1.0 if bias else 0.0)

    wide = columns.astype(np.float64).reshape(groups, n, pixels, depth)
    expected = np.einsum("gild,gdo->igol", wide, matrix.astype(np.float64))
    if bias:
        expected += start.astype(np.float64)
    assert out.dtype == dtype
    _close(out, expected, dtype_name)
    assert len(engine.gemms) == min(groups, n)
    for call in engine.gemms:
        assert call.a is columns and call.b is matrix and call.c is out  # no copies, no temporaries
        assert call.c.dtype == dtype and not call.tf32


@given(st.integers(1, 3), st.integers(1, 12), st.integers(1, 9), st.integers(1, 5),
       st.sampled_from(DTYPES), st.integers(0, 2**32 - 1))
def test_column_gradients_product(groups, rows, depth, per_group_out, dtype_name, seed):
    dtype = _dtype(dtype_name)
    rng = np.random.default_rng(seed)
    grad_rows = rng.standard_normal((groups, rows, per_group_out)).astype(dtype)
    matrix = rng.standard_normal((groups, depth, per_group_out)).astype(dtype)
    out = np.full((groups, rows, depth), np.nan, dtype)
    engine = _engine()
    gemms.column_gradients(engine, grad_rows, matrix, out)
    expected = np.matmul(grad_rows.astype(np.float64), matrix.astype(np.float64).transpose(0, 2, 1))
    _close(out, expected, dtype_name)
    [call] = engine.gemms
    assert call.a is matrix and call.b is grad_rows and call.c is out


def test_half_products_are_summed_in_float32():
    """A float16 sum whose partial sums overflow float16 (65504) but whose
    result does not: cuBLAS sums in float32 and rounds once."""
    columns = np.full((1, 1, 4), 200.0, np.float16)
    matrix = np.array([[[200.0], [200.0], [-200.0], [-199.0]]], np.float16)
    out = np.full((1, 1, 1, 1), np.nan, np.float16)
    gemms.forward(_engine(), columns, matrix, out, beta=0.0)  # 40000 + 40000 - 40000 - 39800
    assert out[0, 0, 0, 0] == np.float16(200.0)


# ---------------------------------------------------------------------------
# The algorithm's GEMMs: dtypes, in-place output, bias epilogue, no copies.


def _call(dtype, n=3, c=4, o=6, groups=2, seed=0, bias=True):
    rng = np.random.default_rng(seed)
    args = dict(
        input=rng.standard_normal((n, c, 5, 4)).astype(dtype),
        offset=rng.uniform(-2, 2, (n, 18, 5, 4)).astype(dtype),
        weight=rng.standard_normal((o, c // groups, 3, 3)).astype(dtype),
        bias=rng.standard_normal(o).astype(dtype) if bias else None,
        mask=rng.uniform(0, 1, (n, 9, 5, 4)).astype(dtype),
    )
    return validate(**args, padding=1), args


class Watched(np.ndarray):
    """An array that records every astype call on it (and on its views and reductions)."""

    calls: list = []

    def astype(self, *args, **kwargs):
        Watched.calls.append((self.shape, args, kwargs))
        return super().astype(*args, **kwargs)


@pytest.fixture
def library():
    if harness.compiler() is None:
        pytest.skip("no C++ compiler for the kernel emulation")
    return harness.build()


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_every_gemm_runs_in_the_dtype_and_the_forward_writes_the_output(library, dtype_name):
    """Columns and GEMM operands keep the dtype (bfloat16 included); the
    forward GEMMs write straight into the output, adding to the bias written
    there (beta = 1), so no float32 copy of the output is ever made; the
    weight gradient adds into float32 (float64)."""
    dtype = _dtype(dtype_name)
    geom, args = _call(dtype)
    engine = harness.EmulatedEngine(library)
    out = im2col_gemm.forward(engine, geom, *(args[k] for k in ("input", "offset", "weight", "bias", "mask")))
    assert engine.gemms and all(np.shares_memory(call.c, out) and call.beta == 1.0 for call in engine.gemms)
    assert all(call.a.dtype == dtype and call.c.dtype == dtype for call in engine.gemms)

    engine = harness.EmulatedEngine(library)
    grad_output = np.ones(out.shape, dtype)
    im2col_gemm.backward(engine, geom, grad_output, *(args[k] for k in ("input", "offset", "weight", "mask")))
    weight_gradient, column_gradient = engine.gemms
    assert weight_gradient.a.dtype == dtype and weight_gradient.c.dtype == _wide(dtype)
    assert column_gradient.a.dtype == dtype and column_gradient.c.dtype == dtype


@pytest.mark.parametrize("bias", [True, False])
def test_backward_makes_no_astype_copy_of_grad_output(library, bias):
    geom, args = _call(np.float32, bias=bias)
    grad_output = np.random.default_rng(1).standard_normal((3, 6, 5, 4)).astype(np.float32).view(Watched)
    Watched.calls = []
    engine = harness.EmulatedEngine(library)
    grads = im2col_gemm.backward(engine, geom, grad_output, *(args[k] for k in ("input", "offset", "weight", "mask")))
    # (the bias gradient, O values summed from it, is cast back at the end)
    assert [shape for shape, _, _ in Watched.calls if np.prod(shape) > geom.out_channels] == []
    if bias:
        np.testing.assert_allclose(grads[3], np.asarray(grad_output).sum(axis=(0, 2, 3), dtype=np.float64),
                                   rtol=1e-5)


# ---------------------------------------------------------------------------
# TF32.


def test_round_to_tf32():
    one = np.float32(1)
    values = np.array([1 + 2.0**-11, 1 + 2.0**-12, -(1 + 3 * 2.0**-11), 3.0, np.inf, -np.inf], np.float32)
    got = cublas.round_to_tf32(values)
    np.testing.assert_array_equal(got, [1 + 2.0**-10, one, -(1 + 4 * 2.0**-11), 3.0, np.inf, -np.inf])
    assert np.isnan(cublas.round_to_tf32(np.array([np.nan], np.float32)))[0]
    big = np.float32(np.finfo(np.float32).max)
    assert np.isinf(cublas.round_to_tf32(np.array([big])))[0]  # rounds past the largest float32


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_tf32_reaches_float32_gemms_only_while_set(library, dtype_name):
    dtype = _dtype(dtype_name)
    geom, args = _call(dtype)
    names = ("input", "offset", "weight", "mask")
    for setting in (False, True):
        engine = harness.EmulatedEngine(library)
        with cudcn.tf32(setting):
            out = im2col_gemm.forward(engine, geom, *(args[k] for k in names[:3]), args["bias"], args["mask"])
            im2col_gemm.backward(engine, geom, np.ones(out.shape, dtype), *(args[k] for k in names))
        assert [call.tf32 for call in engine.gemms] == [setting and dtype == np.float32] * len(engine.gemms)


def test_tf32_changes_float32_results_by_its_precision(library):
    """float32 with TF32: the error against float64 grows from float32's
    ~1e-7 to TF32's ~1e-3 (operands rounded to 10 significand bits)."""
    geom, args = _call(np.float32, n=2, c=16, o=8, groups=1, seed=3)
    call = [args[k] for k in ("input", "offset", "weight", "bias", "mask")]
    exact = cudcn.deform_conv2d(*(a.astype(np.float64) for a in call[:4]), padding=1, mask=call[4].astype(np.float64))
    errors = {}
    for setting in (False, True):
        with cudcn.tf32(setting):
            out = im2col_gemm.forward(harness.EmulatedEngine(library), geom, *call)
        errors[setting] = float(np.abs(out - exact).max() / np.abs(exact).max())
    assert errors[False] < 1e-6
    assert 1e-5 < errors[True] < 2e-3


def test_tf32_setting_is_scoped_and_per_thread():
    import threading

    assert not cudcn.is_tf32_enabled()
    seen = []
    with cudcn.tf32():
        assert cudcn.is_tf32_enabled()
        thread = threading.Thread(target=lambda: seen.append(cudcn.is_tf32_enabled()))
        thread.start()
        thread.join()
        with cudcn.tf32(False):
            assert not cudcn.is_tf32_enabled()
    assert not cudcn.is_tf32_enabled() and seen == [False]
    with pytest.raises(TypeError, match="mode must be a bool, got 'yes'"):
        cudcn.use_tf32("yes")


# ---------------------------------------------------------------------------
# What cuBLAS rejects, rejected here too.


def _gemm(**change) -> Gemm:
    a = np.zeros(12, np.float32)
    fields = dict(trans_a=False, trans_b=False, m=3, n=2, k=4, a=a, lda=3, stride_a=12,
                  b=np.zeros(8, np.float32), ldb=4, stride_b=8, beta=0.0, c=np.zeros(6, np.float32),
                  ldc=3, stride_c=6, batch=1)
    fields.update(change)
    return Gemm(**fields)


def test_gemm_rejects_what_no_cublas_gemm_takes():
    with pytest.raises(TypeError, match="no cuBLAS GEMM takes A float16, B float16, C float64"):
        _gemm(a=np.zeros(12, np.float16), b=np.zeros(8, np.float16), c=np.zeros(6))
    with pytest.raises(TypeError, match="no cuBLAS GEMM takes A float32, B float16"):
        _gemm(b=np.zeros(8, np.float16))
    with pytest.raises(TypeError, match="TF32 applies to float32 GEMMs only, got A float16"):
        _gemm(a=np.zeros(12, np.float16), b=np.zeros(8, np.float16), tf32=True)
    with pytest.raises(ValueError, match="GEMM sizes must stay below 2\\^31"):
        _gemm(k=2**31)


@pytest.mark.parametrize("change, message", [
    (dict(lda=2), "leading dimension 2 < rows 3"),
    (dict(offset_a=1), "reaches past its array"),
    (dict(batch=2, stride_c=5, c=np.zeros(11, np.float32), stride_a=0, stride_b=0), "matrices of C overlap"),
])
def test_emulated_cublas_catches_bad_arguments(change, message):
    """The emulation is only trusted if a wrong leading dimension, offset or
    stride is caught."""
    with pytest.raises(AssertionError, match=message):
        cublas.gemm_strided_batched(_gemm(**change))


def test_tf32_is_part_of_the_auto_algorithm_key():
    """The "auto" algorithm measures again when TF32 changes (it changes the GEMMs' speed)."""
    from cudcn.backends.cuda import algorithms

    with cudcn.tf32():
        assert dict(algorithms._settings())["tf32"] is True
    assert dict(algorithms._settings())["tf32"] is False
