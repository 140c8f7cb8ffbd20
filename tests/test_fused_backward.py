"""The fused backward (kernels/dcn_fused_backward.cu) on the CPU against the NumPy backend.

The kernels run, through the fused algorithm's own backward
(cudcn.backends.cuda.fused), under the cooperative emulator (tests/emulation/emulate.h):
every thread of a block is a fiber, barriers and warp collectives
rendezvous, the MMA wrappers follow the PTX fragment layouts, shared memory
is bounds-checked and watched by the race detector, every array sits
between guard bytes and every output starts as NaN. The launchers of
cudcn/backends/cuda/fused_backward.py run as on a GPU, with a block cap of
a few blocks, so that every block strides over several work units. float32
runs both ways: TF32 MMAs (TF32 on) and float32 FMAs (off).
"""

from __future__ import annotations

import types

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import cudcn
from cudcn.backends import numpy as numpy_backend
from cudcn.backends.cuda import fused, fused_backward
from cudcn.backends.cuda import kernels as cuda_kernels
from cudcn.geometry import validate
from emulation import harness
from emulation.cases import assert_close, cases, ml_dtypes

pytestmark = pytest.mark.emulated

DTYPES = ("float16", "bfloat16", "float32")
#: float32 with TF32 on: operands keep 10 significand bits.
TF32_TOLERANCE = 5e-3
FUSED_KERNELS = {"fused_backward_data", "fused_backward_weight", "fused_weight_split_sum", "from_channels_last"}


@pytest.fixture(scope="session")
def library():
    if harness.compiler() is None:
        pytest.skip("no C++ compiler for the kernel emulation")
    return harness.build()


def _kernels(engine) -> set:
    return {name.split("<")[0] for name, _ in engine.launches}


def _check(library, args: dict, rng: np.random.Generator, tf32: bool = True, **engine_options):
    """The fused algorithm's backward on emulated kernels against the NumPy
    backend; returns (gradients, engine)."""
    geom = validate(**args)
    grad_output = rng.standard_normal((geom.batch, geom.out_channels, geom.out_h, geom.out_w)).astype(geom.dtype)
    engine = harness.EmulatedEngine(library, **engine_options)
    arrays = (grad_output, args["input"], args["offset"], args["weight"], args.get("mask"))
    with cudcn.tf32(tf32):
        assert fused.applies(engine, geom, "backward") is None
        grads = fused.backward(engine, geom, *arrays)
    expected = numpy_backend.backward(geom, *arrays)
    tolerance = TF32_TOLERANCE if geom.dtype == np.float32 and tf32 else None
    for name, got, want in zip(cudcn.Gradients._fields, grads, expected):
        if want is None:
            assert got is None, name
        else:
            assert_close(got, want, geom.dtype.name, tolerance)
    assert _kernels(engine) <= FUSED_KERNELS  # no column buffer, no GEMM
    assert not engine.gemms
    if geom.batch and geom.dtype == np.float32:
        assert all(("FusedTF32" if tf32 else "FusedFMA") in name
                   for name, _ in engine.launches if name.startswith("fused_backward"))
    return grads, engine


@given(cases(dtypes=DTYPES), st.booleans())
def test_matches_numpy(library, case, tf32):
    """Drawn geometries (batch 0 to 3, groups and offset groups that split the
    channels independently, rectangular kernels, stride/padding/dilation,
    mask and bias on or off, integer, NaN, infinite and huge offsets)."""
    args, rng = case
    _check(library, args, rng, tf32=tf32)


def _fixed_case(dtype_name, batch, channels, out_channels, offset_groups, groups, size, kernel,
                stride=1, padding=1, dilation=1, with_mask=True, seed=0):
    """Arguments of one call: offsets with exact integers, points exactly on
    row or column -1, NaN and huge values."""
    if dtype_name == "bfloat16" and ml_dtypes is None:
        pytest.skip("bfloat16 needs ml_dtypes")
    dtype = np.dtype(ml_dtypes.bfloat16) if dtype_name == "bfloat16" else np.dtype(dtype_name)
    rng = np.random.default_rng(seed)
    (height, width), (kh, kw) = size, kernel
    stride, padding, dilation = (v if isinstance(v, tuple) else (v, v) for v in (stride, padding, dilation))
    out_h = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    offset = rng.uniform(-2, 2, (batch, 2 * offset_groups * kh * kw, out_h, out_w))
    flat = offset.reshape(-1)
    flat[::5] = np.round(flat[::5])  # on pixel rows and columns
    flat[3::11] = -1.0  # on row or column -1 (with padding 1: the top or left edge)
    flat[::13] = np.nan
    flat[7::17] = 1e30
    args = {
        "input": rng.standard_normal((batch, channels, height, width)),
        "offset": offset,
        "weight": rng.standard_normal((out_channels, channels // groups, kh, kw)),
        "bias": rng.standard_normal(out_channels),
        "mask": rng.uniform(-1, 1, (batch, offset_groups * kh * kw, out_h, out_w)) if with_mask else None,
    }
    with np.errstate(over="ignore"):  # 1e30 is infinite in float16
        args = {k: None if v is None else v.astype(dtype) for k, v in args.items()}
    return dict(args, stride=stride, padding=padding, dilation=dilation), rng


# name: (dtype, batch, channels, out channels, offset groups, groups, (H, W), (kh, kw), extra)
FIXED = {
    "f16 slices of 64+6, output chunks of 32+8, a partial pixel tile": (
        "float16", 3, 70, 40, 1, 1, (6, 7), (3, 3), {}),
    "f32 tf32 slices split by group and offset-group boundaries": (
        "float32", 2, 66, 36, 3, 2, (5, 6), (2, 3), {}),
    "f32 fma slices split by group and offset-group boundaries": (
        "float32", 2, 66, 36, 3, 2, (5, 6), (2, 3), {"tf32": False}),
    "bf16 batch 33, no mask": ("bfloat16", 33, 4, 2, 2, 2, (3, 3), (1, 2), {"with_mask": False}),
    "f16 130 output channels: three output tiles": ("float16", 1, 8, 130, 1, 1, (4, 4), (1, 1), {}),
    "f32 fma 130 channels: three slices": ("float32", 1, 130, 5, 1, 1, (3, 4), (2, 2), {"tf32": False}),
    "f32 exactly one pixel tile (64)": ("float32", 1, 5, 3, 1, 1, (8, 8), (3, 3), {}),
    "f16 65 pixels: a tile and one pixel": ("float16", 1, 3, 4, 1, 1, (5, 13), (3, 3), {}),
    "bf16 stride 2, dilation 2, no padding": (
        "bfloat16", 2, 6, 5, 2, 1, (9, 8), (2, 3), {"stride": (2, 1), "padding": 0, "dilation": (1, 2)}),
}


@pytest.mark.parametrize("case", FIXED.values(), ids=FIXED.keys())
def test_fixed_geometries(library, case):
    dtype, batch, channels, out_channels, offset_groups, groups, size, kernel, extra = case
    tf32 = extra.pop("tf32", True)
    args, rng = _fixed_case(dtype, batch, channels, out_channels, offset_groups, groups, size, kernel, **extra)
    _check(library, args, rng, tf32=tf32)


def test_offset_mask_and_weight_gradients_do_not_depend_on_the_grid(library, monkeypatch):
    """Blocks stride over the work units: 1, 3 or 7 blocks give bitwise the
    same offset, mask and weight gradients (also with pixel splits); only the
    input gradient, added with atomics, may round differently."""
    # Several splits on a tiny case.
    monkeypatch.setattr(fused_backward, "PIXELS_PER_SPLIT", 16)
    monkeypatch.setattr(fused_backward, "WORKSPACE_SHARE", 1)
    args, rng = _fixed_case("float16", 3, 70, 40, 2, 2, (5, 6), (2, 2))
    geom = validate(**args)
    assert fused_backward.weight_splits(geom) > 1
    runs = []
    for max_blocks in (1, 3, 7):
        grads, engine = _check(library, args, np.random.default_rng(5), max_blocks=max_blocks)
        assert "fused_weight_split_sum" in _kernels(engine)
        runs.append(grads)
    for other in runs[1:]:
        for name in ("offset", "weight", "mask"):
            index = cudcn.Gradients._fields.index(name)
            assert runs[0][index].tobytes() == other[index].tobytes(), name


def test_half_types_accumulate_a_few_images_at_a_time(library):
    """float16: the float32 accumulator of the input gradient holds one image
    under a tiny workspace budget, so the data kernel runs once per image."""
    args, rng = _fixed_case("float16", 3, 6, 4, 1, 2, (4, 5), (3, 3))
    with cudcn.workspace_bytes(1):
        assert [part.stop - part.start for part in fused_backward.data_chunks(validate(**args))] == [1, 1, 1]
        _, engine = _check(library, args, rng)
    data = [arguments for (name, _), arguments in zip(engine.launches, engine.arguments)
            if name.startswith("fused_backward_data")]
    assert len(data) == 3 and all(a[0].shape[0] == 1 for a in data)


def test_64_bit_indexing(library):
    args, rng = _fixed_case("float32", 2, 5, 3, 1, 1, (4, 4), (3, 3))
    _, engine = _check(library, args, rng, wide=True)
    assert all("long long" in name for name, _ in engine.launches)


@pytest.mark.parametrize("batch, out_channels", [(0, 3), (2, 0), (0, 0)])
def test_empty_batch_and_no_output_channels(library, batch, out_channels):
    """Nothing to sum: zero gradients of the right shapes (three slices of channels)."""
    args, rng = _fixed_case("float16", batch, 70, out_channels, 1, 1, (4, 4), (3, 3))
    args["offset"] = np.zeros_like(args["offset"])  # finite inputs: 0 x input stays 0
    grads, engine = _check(library, args, rng)
    for got, name in zip(grads, cudcn.Gradients._fields):
        want = args[name]
        assert got.shape == want.shape and not np.asarray(got, np.float64).any(), name
    if batch == 0:
        assert not engine.launches


# ---------------------------------------------------------------------------
# Where it applies, its workspace, and its tile sizes.


def _geometry(dtype="float16", batch=2, channels=4, out_channels=6, size=(5, 5), offset_groups=1):
    x = np.zeros((batch, channels, *size), dtype)
    offset = np.zeros((batch, 2 * 9 * offset_groups, *size), dtype)
    return validate(input=x, offset=offset, weight=np.zeros((out_channels, channels, 3, 3), dtype), padding=1)


def test_where_it_applies():
    """float16 (sm_75), bfloat16 (sm_80), float32 (TF32 MMAs or FMAs); not
    float64, not with deterministic algorithms on."""
    def applies(dtype, capability=90):
        return fused.applies(types.SimpleNamespace(capability=capability), _geometry(dtype), "backward")

    assert applies("float16") is None and applies("float16", 75) is None and applies("bfloat16") is None
    assert applies("float32") is None
    assert "float64" in applies("float64")
    assert "compute capability 8.0" in applies("bfloat16", 75)
    assert "compute capability 7.5" in applies("float16", 70)
    with cudcn.deterministic_algorithms():
        assert "deterministic" in applies("float16")
    engine = types.SimpleNamespace(capability=90)
    assert not fused.tensor_cores(engine, _geometry("float32"))
    with cudcn.tf32():
        assert fused.tensor_cores(engine, _geometry("float32"))
        assert not fused.tensor_cores(types.SimpleNamespace(capability=75), _geometry("float32"))


@pytest.mark.parametrize("shape", [(16, 256, 256, 64, 1), (8, 64, 64, 128, 1), (32, 128, 128, 32, 4)])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_workspace_pieces_stay_small_at_the_benchmark_shapes(shape, dtype):
    """Each piece (split parts, accumulator) under 1/WORKSPACE_SHARE (16) of one im2col chunk's
    column buffer; splits and chunks as the kernels' sizes suggest."""
    batch, channels, out_channels, size, offset_groups = shape
    geom = _geometry(dtype, batch, channels, out_channels, (size, size), offset_groups)
    column_chunk = fused_backward.workspace_limit(geom) * fused_backward.WORKSPACE_SHARE
    weight_bytes = 4 * out_channels * channels * 9
    splits = fused_backward.weight_splits(geom)
    assert 1 <= splits <= fused_backward.MAX_SPLITS
    assert splits == 1 or splits * weight_bytes <= column_chunk // fused_backward.WORKSPACE_SHARE
    images = max(part.stop - part.start for part in fused_backward.data_chunks(geom))
    if dtype == "float16":  # (float32 adds to its result: no accumulator, one launch)
        assert images == 1 or images * 4 * channels * size * size <= column_chunk // fused_backward.WORKSPACE_SHARE


@given(st.integers(1, 6), st.integers(1, 6))
def test_segments_per_group_counts_the_offset_groups_a_group_overlaps(groups, offset_groups):
    channels = groups * offset_groups * 2
    geom = validate(input=np.zeros((1, channels, 3, 3)), offset=np.zeros((1, 2 * offset_groups, 3, 3)),
                    weight=np.zeros((groups, channels // groups, 1, 1)))
    per_group, per_offset_group = channels // groups, channels // offset_groups
    overlaps = [len({c // per_offset_group for c in range(r * per_group, (r + 1) * per_group)})
                for r in range(groups)]
    assert fused_backward._segments_per_group(geom) == max(overlaps)


# ---------------------------------------------------------------------------
# Planted bugs: each changes one line of the real kernel source (built from a
# changed copy), and the checks above must see it; unchanged, the copy passes.

PLANTED = {
    "a missing barrier before the column-gradient products": (
        "          if constexpr (kVector) dcn_cp_async_wait<0>();\n          __syncthreads();\n",
        "          if constexpr (kVector) dcn_cp_async_wait<0>();\n", "shared-memory race on tiles"),
    "weights multiplied before their copies land (no cp.async.wait_group)": (
        "          if constexpr (kVector) dcn_cp_async_wait<0>();\n", "", "shared-memory race on tiles"),
    "one buffer for two chunks of output channels": (
        "          stage ^= 1;\n          if (!more) break;\n", "          if (!more) break;\n",
        "shared-memory race on tiles"),
    "column gradients stored without their skew": (
        "tiles[pixel * DataLayout::kColumnStride + column_skew(pixel) + channel]",
        "tiles[pixel * DataLayout::kColumnStride + channel]", "Not equal to tolerance"),
    "one thread's offset sums left out": (
        "for (int j = 1; j < PARTS; ++j) {", "for (int j = 1; j < 1; ++j) {", "Not equal to tolerance"),
    "no slopes on row and column -1": (
        "/*for_slope=*/true", "/*for_slope=*/false", "Not equal to tolerance"),
    "an offset group's channels in the next convolution group left out": (
        "last_group = ((g + 1) * Cog - 1) / Cg;", "last_group = g * Cog / Cg;", "Not equal to tolerance"),
    "columns of the weight gradient without the mask": (
        "samples[e] = r < count ? sum * tap[e].mask : 0.0f;", "samples[e] = r < count ? sum : 0.0f;",
        "Not equal to tolerance"),
    "a missing barrier between the taps and the samples": (
        "        input_planes[t] = Index(n) * s.channels * plane_size;\n      }\n      __syncthreads();\n",
        "        input_planes[t] = Index(n) * s.channels * plane_size;\n      }\n",
        "shared-memory race on (taps|output_rows|input_planes)"),
}


@pytest.mark.parametrize("planted", [None, *PLANTED.values()], ids=["as it is", *PLANTED])
def test_planted_bugs_are_caught(tmp_path, planted):
    if harness.compiler() is None:
        pytest.skip("no C++ compiler for the kernel emulation")
    kernels = cuda_kernels.kernel_dir()
    source = (kernels / "dcn_fused_backward.cu").read_text()
    if planted is not None:
        assert source.count(planted[0]) == 1, planted[0]
        source = source.replace(planted[0], planted[1])
    (tmp_path / "dcn_fused_backward.cu").write_text(source)
    names = [cuda_kernels.name_expression(k, "float16", "int")
             for k in ("fused_backward_data", "fused_backward_weight", "fused_weight_split_sum", "from_channels_last")]
    library = harness.build(names, [tmp_path / "dcn_fused_backward.cu", kernels / "dcn_layout.cu"])
    # Slices cut by group and offset-group boundaries, two chunks of output
    # channels (48 a group: whole 16-byte chunks, copied by cp.async), points
    # on row and column -1.
    args, rng = _fixed_case("float16", 2, 66, 96, 3, 2, (5, 6), (2, 3))
    if planted is None:
        _check(library, args, rng)
    else:
        with pytest.raises(AssertionError, match=planted[2]):
            _check(library, args, rng)
