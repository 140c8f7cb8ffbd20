"""kernels/*.cu on the CPU against the NumPy backend (no GPU needed).

The kernel source is compiled by g++ under tests/emulation/emulate.h and run
through the CUDA backend's own code (the engine-generic launchers and algorithm of cudcn.backends.cuda) with
NumPy arrays. Outputs are allocated NaN-filled, grids are capped small so that
every grid-stride loop takes several steps, and offsets include far-outside,
infinite and NaN values and exact integers (sampling points on pixel and
image boundaries).
"""

from __future__ import annotations


import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import cudcn
from cudcn.backends.cuda import gemms, im2col_gemm, launchers
from cudcn.backends.cuda import kernels as cuda_kernels
from cudcn.backends.cuda.engine import Launch
from cudcn.backends import numpy as numpy_backend
from cudcn.geometry import validate
from emulation import harness
from emulation.cases import assert_close, cases, ml_dtypes

pytestmark = pytest.mark.emulated


@pytest.fixture(scope="session")
def library():
    if harness.compiler() is None:
        pytest.skip("no C++ compiler for the kernel emulation")
    return harness.build()


@pytest.fixture(scope="session")
def library_sm90():
    """The kernels on sm_90's code paths (col2im's vector atomics)."""
    if harness.compiler() is None:
        pytest.skip("no C++ compiler for the kernel emulation")
    return harness.build(arch=90)


@pytest.fixture
def engine(library):
    return harness.EmulatedEngine(library)


def _blocks(args: dict) -> tuple:
    geom = validate(**{k: v for k, v in args.items()})
    return geom, args["input"], args["offset"], args.get("mask")


@given(cases(with_weight=False))
def test_im2col(library, case):
    args, _ = case
    geom, x, offset, mask = _blocks(args)
    engine = harness.EmulatedEngine(library)
    got = im2col_gemm.im2col_public(engine, geom, x, offset, mask)
    assert_close(got, numpy_backend.im2col(geom, x, offset, mask), geom.dtype.name)


def _check_col2im(library, case):
    args, rng = case
    geom, x, offset, mask = _blocks(args)
    columns = rng.standard_normal(geom.columns_shape).astype(geom.dtype)
    engine = harness.EmulatedEngine(library)
    got = im2col_gemm.col2im_public(engine, geom, columns, offset, mask)
    assert_close(got, numpy_backend.col2im(geom, columns, offset, mask), geom.dtype.name)


@given(cases(with_weight=False))
def test_col2im(library, case):
    _check_col2im(library, case)


@given(cases(with_weight=False, dtypes=("float32", "float64", "float16", "bfloat16"), channel_factors=(4, 8, 1, 5)))
def test_col2im_on_sm90_paths(library_sm90, case):
    """col2im where float32 accumulators take sm_90's vector atomics (blocks
    of 4 channels where they fit the groups and the arrays are aligned --
    channels a multiple of 4 an offset group, mostly --, single channels
    elsewhere), every dtype."""
    _check_col2im(library_sm90, case)


@given(cases(with_weight=False))
def test_col2im_coord(library, case):
    args, rng = case
    geom, x, offset, mask = _blocks(args)
    columns = rng.standard_normal(geom.columns_shape).astype(geom.dtype)
    engine = harness.EmulatedEngine(library)
    got = im2col_gemm.col2im_coord_public(engine, geom, columns, x, offset, mask)
    expected = numpy_backend.col2im_coord(geom, columns, x, offset, mask)
    assert_close(got[0], expected[0], geom.dtype.name)
    if mask is None:
        assert got[1] is None and expected[1] is None
    else:
        assert_close(got[1], expected[1], geom.dtype.name)


@given(cases(), st.integers(1, 4000), st.booleans())
def test_forward_and_backward(library, case, workspace, wide):
    """The whole CUDA backend (chunks, grouped GEMMs, layouts) on emulated kernels."""
    args, rng = case
    with cudcn.workspace_bytes(workspace):  # a few images per chunk, or one
        _forward_and_backward(library, args, rng, wide)


def _forward_and_backward(library, args, rng, wide):
    geom = validate(**args)
    x, offset, weight, bias, mask = (args[k] for k in ("input", "offset", "weight", "bias", "mask"))
    engine = harness.EmulatedEngine(library, wide=wide)
    out = im2col_gemm.forward(engine, geom, x, offset, weight, bias, mask)
    assert_close(out, numpy_backend.forward(geom, x, offset, weight, bias, mask), geom.dtype.name)
    grad_output = rng.standard_normal(out.shape).astype(geom.dtype)
    got = im2col_gemm.backward(engine, geom, grad_output, x, offset, weight, mask)
    expected = numpy_backend.backward(geom, grad_output, x, offset, weight, mask)
    for name, g, e in zip(cudcn.Gradients._fields, got, expected):
        if e is None:
            assert g is None, name
        else:
            assert_close(g, e, geom.dtype.name)
    if geom.batch:
        assert all(("long long" in name) == wide for name, _ in engine.launches)


@given(cases(dtypes=("float16", "bfloat16")))
def test_half_types(library, case):
    """float16 and bfloat16: the storage conversions and float32 accumulation."""
    args, rng = case
    geom = validate(**args)
    x, offset, weight, bias, mask = (args[k] for k in ("input", "offset", "weight", "bias", "mask"))
    engine = harness.EmulatedEngine(library)
    block = validate(input=x, offset=offset, mask=mask, kernel_size=(geom.kernel_h, geom.kernel_w),
                     stride=args["stride"], padding=args["padding"], dilation=args["dilation"])
    assert_close(im2col_gemm.im2col_public(engine, block, x, offset, mask),
                 numpy_backend.im2col(block, x, offset, mask), geom.dtype.name)
    columns = rng.standard_normal(block.columns_shape).astype(geom.dtype)
    assert_close(im2col_gemm.col2im_public(engine, block, columns, offset, mask),
                 numpy_backend.col2im(block, columns, offset, mask), geom.dtype.name)
    got = im2col_gemm.col2im_coord_public(engine, block, columns, x, offset, mask)
    expected = numpy_backend.col2im_coord(block, columns, x, offset, mask)
    assert_close(got[0], expected[0], geom.dtype.name)
    out = im2col_gemm.forward(engine, geom, x, offset, weight, bias, mask)
    assert out.dtype == geom.dtype and np.isfinite(np.asarray(out, np.float64)).all()


# ---------------------------------------------------------------------------
# The sampling kernels' lane groups: fixed geometries where a point gets 16 or
# 32 lanes (drawn cases mostly give few channels), channel counts that are not
# multiples of 32, batch 33; aligned arrays (vector loads and stores where a
# lane's block of channels fits) and arrays one element off alignment (the
# scalar path), which must give bitwise the same results.

WIDE = {
    # name: (dtype, batch, channels, offset groups, groups, height, width, kernel)
    "f32 33 a point, 16 lanes": ("float32", 2, 66, 2, 1, 5, 4, 3),
    "f32 groups, 16 lanes, vectors": ("float32", 1, 64, 1, 2, 4, 5, 3),
    "f64 35 blocks, 32 lanes": ("float64", 2, 70, 1, 1, 4, 4, 2),
    "f16 68 a point, 16 lanes": ("float16", 1, 136, 2, 2, 3, 4, 3),
    "f16 32 lanes, vectors": ("float16", 1, 256, 1, 1, 3, 3, 2),
    "bf16 16 lanes, vectors": ("bfloat16", 2, 80, 1, 1, 3, 4, 3),
    "f32 batch 33": ("float32", 33, 3, 1, 1, 2, 3, 1),
    "f64 batch 33": ("float64", 33, 6, 2, 2, 2, 2, 2),
    "f16 batch 33": ("float16", 33, 20, 1, 1, 2, 3, 1),
    "bf16 batch 33": ("bfloat16", 33, 5, 1, 1, 3, 2, 2),
}


def _wide_case(dtype_name, batch, channels, offset_groups, groups, height, width, k):
    if dtype_name == "bfloat16" and ml_dtypes is None:
        pytest.skip("bfloat16 needs ml_dtypes")
    dtype = np.dtype(ml_dtypes.bfloat16) if dtype_name == "bfloat16" else np.dtype(dtype_name)
    rng = np.random.default_rng(channels * 100 + batch)
    out_h, out_w = height + 3 - k, width + 3 - k  # padding 1
    offset = rng.uniform(-2, 2, (batch, 2 * offset_groups * k * k, out_h, out_w))
    offset.reshape(-1)[::7] = np.nan
    offset.reshape(-1)[3::11] = -1.0  # exactly on row or column -1 (with padding 1: the top edge)
    arrays = {
        "input": rng.standard_normal((batch, channels, height, width)),
        "offset": offset,
        "mask": rng.uniform(-1, 1, (batch, offset_groups * k * k, out_h, out_w)),
    }
    arrays = {key: value.astype(dtype) for key, value in arrays.items()}
    geom = validate(**arrays, kernel_size=k, padding=1)
    assert launchers.lanes_per_point(geom) >= 16 or batch == 33
    columns = rng.standard_normal(geom.columns_shape).astype(dtype)
    return geom, arrays["input"], arrays["offset"], arrays["mask"], columns


@pytest.mark.parametrize("arch", harness.ARCHS, ids=[f"sm_{a}" if a else "portable" for a in harness.ARCHS])
@pytest.mark.parametrize("case", WIDE.values(), ids=WIDE.keys())
def test_sampling_kernels_with_wide_lane_groups(library, library_sm90, case, arch):
    """Against NumPy; aligned (one warp a block) and unaligned (two warps a
    block) runs give bitwise the same columns and offset and mask gradients
    (the input gradient adds with atomics, in an order that follows the grid);
    on the portable paths and on sm_90's (vector atomics where aligned)."""
    library = library_sm90 if arch else library
    geom, x, offset, mask, columns = _wide_case(*case)
    expected = (
        numpy_backend.im2col(geom, x, offset, mask),
        numpy_backend.col2im(geom, columns, offset, mask),
        *numpy_backend.col2im_coord(geom, columns, x, offset, mask),
    )
    runs = []
    for misalign, block, max_blocks in ((False, 32, 3), (True, 64, 2)):
        engine = harness.EmulatedEngine(library, block=block, max_blocks=max_blocks, misalign=misalign)
        runs.append((
            im2col_gemm.im2col_public(engine, geom, x, offset, mask),
            im2col_gemm.col2im_public(engine, geom, columns, offset, mask),
            *im2col_gemm.col2im_coord_public(engine, geom, columns, x, offset, mask),
        ))
        for got, want in zip(runs[-1], expected):
            assert_close(got, want, geom.dtype.name)
    for step, aligned, unaligned in zip(("im2col", "col2im", "offset", "mask"), *runs):
        if step != "col2im":
            assert aligned.tobytes() == unaligned.tobytes(), step


@pytest.mark.parametrize("planted", [
    None,
    ("grad_x += __shfl_xor_sync(0xffffffffu, grad_x, d);", "grad_x += __shfl_xor_sync(0xffffffffu, grad_x, d ^ 1);"),
    ("for (int d = group_lanes / 2; d > 0; d /= 2)", "for (int d = group_lanes / 2; d > 1; d /= 2)"),
], ids=["as it is", "wrong shuffle lane", "a reduction step short"])
def test_planted_bug_in_the_col2im_coord_reduction_is_caught(tmp_path, planted):
    """The comparisons above see a broken shuffle reduction in the real kernel
    (built from a changed copy of its source; unchanged, the copy passes)."""
    if harness.compiler() is None:
        pytest.skip("no C++ compiler for the kernel emulation")
    source = (cuda_kernels.kernel_dir() / "dcn_col2im_coord.cu").read_text()
    if planted is not None:
        assert planted[0] in source
        source = source.replace(*planted)
    (tmp_path / "dcn_col2im_coord.cu").write_text(source)
    names = [cuda_kernels.name_expression(k, "float32", "int") for k in ("deform_col2im_coord", "to_channels_last")]
    library = harness.build(names, [tmp_path / "dcn_col2im_coord.cu", cuda_kernels.kernel_dir() / "dcn_layout.cu"])
    geom, x, offset, mask, columns = _wide_case(*WIDE["f32 33 a point, 16 lanes"])
    got = im2col_gemm.col2im_coord_public(harness.EmulatedEngine(library), geom, columns, x, offset, mask)
    expected = numpy_backend.col2im_coord(geom, columns, x, offset, mask)
    if planted is None:
        assert_close(got[0], expected[0], geom.dtype.name)
    else:
        with pytest.raises(AssertionError, match="Not equal to tolerance"):
            assert_close(got[0], expected[0], geom.dtype.name)


def test_grid_stride_and_boundaries(engine):
    """A fixed case: every launch is bigger than the capped grid (the layout
    passes: 2 tiles of 32 pixels an image); points exactly on edges."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 6, 9, 4))
    offset = np.zeros((2, 2 * 2 * 9, 9, 4))
    offset[0, 0::2] = -1.0  # rows shifted by exactly one pixel: y = -1 on the top row
    offset[1, 1::2] = np.array([np.nan, np.inf, 4.0, -4.0])  # columns: NaN, inf, exactly W, -W
    weight = rng.standard_normal((3, 6, 3, 3))
    geom = validate(input=x, offset=offset, weight=weight, padding=1)
    out = im2col_gemm.forward(engine, geom, x, offset, weight, None, None)
    np.testing.assert_allclose(out, numpy_backend.forward(geom, x, offset, weight, None, None), rtol=1e-12, atol=1e-12)
    assert all(launch.grid[0] == engine.max_blocks for _, launch in engine.launches)


def test_unknown_instantiation_is_an_error(engine):
    with pytest.raises(KeyError, match="no instantiation"):
        engine.launch("deform_im2col", "float32", "short", Launch((1, 1, 1), (32, 1, 1)), [])


@given(st.integers(1, 3), st.integers(0, 9), st.integers(1, 5), st.integers(1, 6),
       st.sampled_from(["float16", "float32", "float64"]))
def test_transposed_product_adds_in_the_wide_type(library, batch, rows, p, q, dtype):
    """out += a^T b through the cuBLAS arguments the backend computes."""
    engine = harness.EmulatedEngine(library)
    rng = np.random.default_rng(rows * 100 + p * 10 + q)
    # Big enough that a float16 partial sum would overflow (65504) or round.
    a = (rng.standard_normal((batch, rows, p)) * 300).astype(dtype)
    b = (rng.standard_normal((batch, rows, q)) * 300).astype(dtype)
    wide = np.float64 if dtype == "float64" else np.float32
    start = rng.standard_normal((batch, p, q)).astype(wide)
    out = start.copy()
    gemms.add_transposed_product(engine, a, b, out)
    expected = start + np.matmul(a.astype(np.float64).transpose(0, 2, 1), b.astype(np.float64))
    assert out.dtype == wide
    scale = float(np.abs(a).max(initial=0)) * float(np.abs(b).max(initial=0)) * max(rows, 1) + 1.0
    tol = 1e-14 if dtype == "float64" else 1e-6
    np.testing.assert_allclose(out, expected, rtol=0, atol=tol * scale)
    assert len(engine.gemms) == (rows > 0)
    assert all(call.c is out and call.a is b and call.b is a for call in engine.gemms)  # no copies


# ---------------------------------------------------------------------------
# Deterministic algorithms: the sorted, atomic-free input gradient.


def _kernels(engine) -> set:
    return {name.split("<")[0] for name, _ in engine.launches}


@given(cases(with_weight=False, dtypes=("float32", "float64", "float16", "bfloat16")))
def test_col2im_deterministic(library, case):
    """Equals the NumPy backend; bitwise the same whatever the grid."""
    args, rng = case
    geom, x, offset, mask = _blocks(args)
    columns = rng.standard_normal(geom.columns_shape).astype(geom.dtype)
    runs = []
    for block, max_blocks in ((32, 3), (7, 1), (64, 8)):
        engine = harness.EmulatedEngine(library, block=block, max_blocks=max_blocks)
        with cudcn.deterministic_algorithms():
            runs.append(im2col_gemm.col2im_public(engine, geom, columns, offset, mask))
        if geom.batch:
            assert "deform_col2im" not in _kernels(engine) and "deform_col2im_gather" in _kernels(engine)
    assert_close(runs[0], numpy_backend.col2im(geom, columns, offset, mask), geom.dtype.name)
    for other in runs[1:]:
        assert runs[0].tobytes() == other.tobytes()


@given(cases(), st.integers(1, 4000))
def test_backward_deterministic(library, case, workspace):
    """The whole backward with deterministic algorithms on: no atomic kernel,
    NumPy's results, and two runs bitwise equal."""
    args, rng = case
    geom = validate(**args)
    x, offset, weight, mask = (args[k] for k in ("input", "offset", "weight", "mask"))
    grad_output = rng.standard_normal((geom.batch, geom.out_channels, geom.out_h, geom.out_w)).astype(geom.dtype)
    runs = []
    with cudcn.workspace_bytes(workspace), cudcn.deterministic_algorithms():
        for block in (32, 5):
            engine = harness.EmulatedEngine(library, block=block)
            runs.append(im2col_gemm.backward(engine, geom, grad_output, x, offset, weight, mask))
            assert "deform_col2im" not in _kernels(engine)
    expected = numpy_backend.backward(geom, grad_output, x, offset, weight, mask)
    for name, g, e, again in zip(cudcn.Gradients._fields, runs[0], expected, runs[1]):
        if e is None:
            assert g is None and again is None, name
        else:
            assert_close(g, e, geom.dtype.name)
            assert g.tobytes() == again.tobytes(), name


def test_deterministic_setting_picks_the_kernel(library):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 4, 5, 6))
    offset = rng.uniform(-2, 2, (2, 2 * 9, 5, 6))
    geom = validate(input=x, offset=offset, kernel_size=3, padding=1)
    columns = rng.standard_normal(geom.columns_shape)
    engines = {}
    for mode in (False, True):
        engines[mode] = harness.EmulatedEngine(library)
        with cudcn.deterministic_algorithms(mode):
            im2col_gemm.col2im_public(engines[mode], geom, columns, offset, None)
    assert "deform_col2im" in _kernels(engines[False]) and "deform_col2im_gather" not in _kernels(engines[False])
    assert {"deform_col2im_keys", "deform_col2im_gather"} <= _kernels(engines[True])
    assert "deform_col2im" not in _kernels(engines[True])


@pytest.mark.parametrize("batch", [0, 2])
def test_no_output_channels(library, batch):
    """An empty weight through the CUDA algorithm: empty output, zero gradients."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((batch, 4, 5, 5))
    offset = rng.standard_normal((batch, 18, 5, 5))
    mask = rng.random((batch, 9, 5, 5))
    weight, bias = np.ones((0, 2, 3, 3)), np.ones(0)
    geom = validate(input=x, offset=offset, weight=weight, bias=bias, mask=mask, padding=1)
    engine = harness.EmulatedEngine(library)
    out = im2col_gemm.forward(engine, geom, x, offset, weight, bias, mask)
    assert out.shape == (batch, 0, 5, 5)
    grads = im2col_gemm.backward(engine, geom, np.ones(out.shape), x, offset, weight, mask)
    for got, arg in zip(grads, (x, offset, weight, bias, mask)):
        assert got.shape == arg.shape and not got.any()
