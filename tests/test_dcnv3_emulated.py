"""kernels/dcnv3.cu on the CPU against the NumPy backend (no GPU needed).

The kernel source is compiled by g++ under the cooperative emulator
(tests/emulation) and run through the CUDA backend's own launchers
(cudcn/backends/cuda/dcnv3.py) on NumPy arrays, in every dtype. Outputs are
allocated NaN-filled, grids are capped small so that every grid-stride loop
takes several steps, and drawn geometries include kernels 1 to 7 (rectangular
and even), group_channels 1, 3, 6, 16, 20 and 33, stride, dilation and
unequal padding, remove_center, offset_scale other than 1, batch 0, points
exactly on kinks and on -1, the fused softmax, and one lane or several per
item's points. Further:

- DCNv4's packed offset_mask with K8 beyond G*3P, NaN in its padding (never
  read; its gradient zero), 3P odd (the offsets' pairs then unaligned);
- NaN, infinite and huge offsets; non-finite points count 0;
- arrays one element off alignment (the scalar path) give bitwise the
  results of aligned ones (the vector path, checked to take 16-byte loads);
- the deterministic input gradient is bitwise the same whatever the grid,
  and equals the atomic one to rounding;
- planted bugs (x and y swapped, h-major points, offset_scale dropped from
  the offset gradient, the centre not removed, wrong shuffle lanes, a
  dropped corner, a reduction step short) are caught;
- memory budgets, counted by the emulator's accounting: forward loads within
  1.5x of the ideal sectors, input-gradient atomics at most 4 sectors per
  warp request per 4 bytes a lane adds (and exactly the ideal), offsets and
  mask at most one sector per (item, point) and load site; planted
  regressions of each are flagged.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import cudcn
from cudcn.backends import numpy as numpy_backend
from cudcn.backends.cuda import dcnv3
from cudcn.backends.cuda import kernels as cuda_kernels
from cudcn.dcnv3_geometry import SCALARS, validate_dcnv3
from dcnv3_reference import DCNv3Call, calls, fixed_call, pack
from emulation import harness, plants
from emulation import transactions as tx
from emulation.cases import assert_close, ml_dtypes

pytestmark = pytest.mark.emulated

DTYPES = ("float64", "float32", "float16", "bfloat16")
KERNELS = ("dcnv3_softmax_stats", "dcnv3_forward", "dcnv3_backward", "dcnv3_softmax_backward", "dcnv3_input_keys",
           "sorted_gather", "accum_to_storage")
#: The kernel files these come from: the family's, and the shared sorted gather's.
SOURCES = ("dcnv3.cu", "sorted_gather.cu")
FIELDS = ("input", "offset", "mask")


def _names(dtypes=DTYPES, indexes=cuda_kernels.INDEX_TYPES) -> list[str]:
    return [cuda_kernels.name_expression(k, d, i) for d in dtypes for i in indexes for k in KERNELS]


@functools.cache
def _library() -> harness.Library:
    return harness.build(_names(), [cuda_kernels.kernel_dir() / name for name in SOURCES])


@pytest.fixture(scope="module")
def library():
    if harness.compiler() is None:
        pytest.skip("no C++ compiler for the kernel emulation")
    return _library()


def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        if ml_dtypes is None:
            pytest.skip("bfloat16 needs ml_dtypes")
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _in_dtype(call: DCNv3Call, dtype: np.dtype) -> DCNv3Call:
    with np.errstate(over="ignore"):  # huge offsets are infinite in the half types
        return call.with_arrays(**{f: getattr(call, f).astype(dtype) for f in FIELDS})


def _grad_output(call: DCNv3Call) -> np.ndarray:
    rng = np.random.default_rng(call.seed + 1)
    return rng.standard_normal(call.out_shape).astype(call.input.dtype)


def _geometry(call: DCNv3Call, softmax: bool = False, offset_mask=None):
    arrays = dict(input=call.input, offset_mask=offset_mask) if offset_mask is not None else \
        dict(input=call.input, offset=call.offset, mask=call.mask)
    geom = validate_dcnv3(**arrays, **dict(zip(SCALARS, call.scalars)), softmax=softmax)
    offset, mask = (offset_mask, offset_mask) if offset_mask is not None else (call.offset, call.mask)
    return geom, (call.input, offset, mask)


def _run(library, call: DCNv3Call, grad_output, softmax: bool = False, offset_mask=None, **engine_options):
    """(engine, output, gradients) of the CUDA backend's launchers on emulated kernels."""
    geom, arrays = _geometry(call, softmax, offset_mask)
    engine = harness.EmulatedEngine(library, **engine_options)
    return engine, dcnv3.forward(engine, geom, *arrays), dcnv3.backward(engine, geom, grad_output, *arrays)


def _expected(call: DCNv3Call, grad_output, softmax: bool = False, offset_mask=None):
    geom, arrays = _geometry(call, softmax, offset_mask)
    return numpy_backend.dcnv3_forward(geom, *arrays), numpy_backend.dcnv3_backward(geom, grad_output, *arrays)


def _check(got, expected, dtype_name: str) -> None:
    out, grads = got
    want_out, want_grads = expected
    assert_close(out, want_out, dtype_name)
    for name, g, e in zip(FIELDS, grads, want_grads):
        assert g.shape == e.shape, name
        assert_close(g, e, dtype_name)


def _split(fill: bool):
    """Points split among lanes as the launcher chooses them (``fill``: toward
    an H100's worth of threads, which tiny calls never reach: every item
    gets its most point lanes), or not at all."""
    return mock.patch.object(dcnv3, "FILL_THREADS", dcnv3.FILL_THREADS if fill else 0)


def _fixed(dtype_name: str, **shape) -> DCNv3Call:
    """dcnv3_reference.fixed_call in a dtype."""
    return _in_dtype(fixed_call(**shape), _dtype(dtype_name))


# ---------------------------------------------------------------------------
# Against the NumPy backend.


@given(calls(max_out=3, kinks=0.2, channels=(1, 3, 6, 16, 20, 33), max_group=2), st.sampled_from(DTYPES),
       st.booleans(), st.booleans(), st.booleans())
def test_matches_numpy(library, call, dtype_name, wide, softmax, split):
    """Drawn geometries (kernels 1-7 each side, rectangular and even, stride,
    dilation, unequal pads, remove_center, offset_scale 0.5-2, batch 0-2,
    group_channels 1, 3, 6, 16, 20, 33, points up to 2 pixels outside and a
    fifth of the coordinates on kinks), every dtype, 32- and 64-bit indexing,
    the softmax fused or not, points split among lanes or not: forward and
    every gradient."""
    call = _in_dtype(call, _dtype(dtype_name))
    grad_output = _grad_output(call)
    with _split(split):
        engine, *got = _run(library, call, grad_output, softmax, wide=wide)
    _check(got, _expected(call, grad_output, softmax), dtype_name)
    if engine.launches:
        assert all(("long long" in name) == wide for name, _ in engine.launches)


@given(calls(max_out=3, kinks=0.2, channels=(1, 3, 6, 16), max_group=3), st.sampled_from(DTYPES),
       st.sampled_from([0, 8, 24]))
def test_dcnv4_packed_offset_mask(library, call, dtype_name, extra):
    """DCNv4: offset_mask (N, Ho, Wo, K8), K8 a multiple of 8 from G*3P up (and
    ``extra`` more), NaN in the padding: the NumPy backend's results, zeros
    in the gradient's padding, and bitwise the output and offset and mask
    gradients of DCNv3 on the unpacked arguments (the same sums)."""
    call = _in_dtype(call, _dtype(dtype_name))
    channels = -(-call.group * 3 * call.points // 8) * 8 + extra
    offset_mask = pack(call.offset, call.mask, call.group, channels, fill=np.nan)
    grad_output = _grad_output(call)
    _, out, (grad_input, grad_packed, same) = _run(library, call, grad_output, offset_mask=offset_mask)
    assert grad_packed is same and grad_packed.shape == offset_mask.shape
    expected_out, expected_grads = _expected(call, grad_output, offset_mask=offset_mask)
    assert_close(out, expected_out, dtype_name)
    assert_close(grad_input, expected_grads[0], dtype_name)
    assert_close(grad_packed, expected_grads[1], dtype_name)
    assert not grad_packed[..., call.group * 3 * call.points:].any()
    _, unpacked_out, unpacked = _run(library, call, grad_output)
    assert out.tobytes() == unpacked_out.tobytes()
    assert grad_packed.tobytes() == pack(unpacked[1], unpacked[2], call.group, channels).tobytes()


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("softmax", [False, True])
def test_non_finite_far_and_edge_offsets(library, dtype_name, softmax):
    """NaN, infinite and huge offsets count 0; points exactly on -1 and H (W)
    follow the NumPy backend (values, and the one-sided slope at -1)."""
    call = _fixed(dtype_name, seed=5)
    offset = call.offset.astype(np.float64)
    flat = offset.reshape(-1)
    flat[::7] = np.nan
    flat[1::11] = np.inf
    flat[2::13] = -1e30  # -inf in float16
    # Output pixel (0, 0), group 0 (reference point (0, 0); offsets halved by offset_scale 0.5):
    # point 4, the centre, on row -1; point 0 (grid (-1, -1)) on column W.
    offset[0, 0, 0, 8:10] = (0.0, -2.0)
    offset[0, 0, 0, 0:2] = (2 * call.input.shape[2] + 1.0, 1.0)
    call = _in_dtype(call.with_arrays(offset=offset), call.input.dtype)
    grad_output = _grad_output(call)
    _, *got = _run(library, call, grad_output, softmax)
    expected = _expected(call, grad_output, softmax)
    _check(got, expected, dtype_name)
    assert np.asarray(expected[1][1], np.float64)[0, 0, 0, 9] != 0  # the slope at row -1


def test_no_images(library):
    call = _fixed("float32", batch=0)
    grad_output = _grad_output(call)
    engine, out, grads = _run(library, call, grad_output)
    assert out.shape == call.out_shape and grads[1].shape == call.offset.shape and grads[2].shape == call.mask.shape
    assert grads[0].shape == call.input.shape and not grads[0].any()
    assert engine.launches == []


def test_grids_are_capped_and_loops_stride(library):
    """More items than the capped grid has lanes: each loop takes several steps."""
    call = _fixed("float32", batch=2, height=6, width=5, group=3, channels=8)
    grad_output = _grad_output(call)
    engine, *got = _run(library, call, grad_output, block=32, max_blocks=2)
    _check(got, _expected(call, grad_output), "float32")
    geom, _ = _geometry(call)
    for lanes in (dcnv3.forward_lanes(geom), dcnv3.backward_lanes(geom)):
        assert dcnv3.items(geom) * lanes[0] * lanes[1] > 64 * 4
    assert all(launch.grid[0] == 2 for _, launch in engine.launches)


def test_point_lanes_fill_the_gpu_where_the_items_do_not():
    """Points are split among lanes (powers of two, at most P and a warp with
    the channel lanes) only until the launch has FILL_THREADS threads."""
    def lanes(batch, size, group, channels, dtype=np.float16, kernel=3):
        arrays = dict(input=np.empty((batch, size, size, group * channels), dtype),
                      offset=np.empty((batch, size, size, group * kernel * kernel * 2), dtype),
                      mask=np.empty((batch, size, size, group * kernel * kernel), dtype))
        geom = validate_dcnv3(**arrays, kernel_h=kernel, kernel_w=kernel, stride_h=1, stride_w=1, pad_h=kernel // 2,
                              pad_w=kernel // 2, dilation_h=1, dilation_w=1, group=group, group_channels=channels)
        return dcnv3.forward_lanes(geom), dcnv3.backward_lanes(geom)

    # InternImage-T's stages at N = 2, float16: 25088 items of 2 forward lanes -> 4 point lanes (200704 threads).
    assert lanes(2, 56, 4, 16) == ((2, 4), (16, 1))
    assert lanes(2, 28, 8, 16) == ((2, 8), (16, 1))  # 12544 items of 16 backward lanes: enough
    assert lanes(2, 7, 32, 16) == ((2, 8), (16, 2))  # at most P = 9 -> 8
    assert lanes(2, 7, 32, 16, np.float32) == ((4, 8), (8, 4))
    assert lanes(64, 56, 4, 16) == ((2, 1), (16, 1))  # enough items
    assert lanes(1, 4, 1, 64, kernel=7) == ((8, 4), (16, 2))  # a warp at most
    assert lanes(1, 4, 1, 1, np.float64, kernel=1) == ((1, 1), (1, 1))  # P = 1


# ---------------------------------------------------------------------------
# Lane groups of every width; the vector and the scalar path.

WIDE = {
    # name: dtype and _fixed's keywords
    "f32 D=32: 8 lanes an item, 4 a point": ("float32", dict(channels=32)),
    "f32 D=16 G=4: InternImage's": ("float32", dict(group=4, channels=16)),
    "f32 D=33: the scalar path": ("float32", dict(channels=33, group=1)),
    "f64 D=70: 32 lanes, 2 blocks a lane": ("float64", dict(batch=1, group=1, channels=70, height=3, width=4)),
    "f16 D=256: 32 lanes": ("float16", dict(batch=1, group=1, channels=256, height=3, width=3)),
    "f16 D=12: the scalar path": ("float16", dict(channels=12, kernel_h=2, kernel_w=3)),
    "bf16 D=40: 8 lanes": ("bfloat16", dict(channels=40, remove_center=True)),
    "f64 D=1, 5x1 dilated": ("float64", dict(channels=1, height=7, kernel_h=5, kernel_w=1, dilation=2, pad=2)),
    "f16 D=1, 7x7": ("float16", dict(batch=1, channels=1, kernel_h=7, kernel_w=7, pad=3)),
}


def _input_load_widths(engine) -> set[int]:
    """Widths of the forward's input loads (the gather's, in sampling.cuh or dcn_common.cuh)."""
    launch = tx.launches_of(engine.stats, "dcnv3_forward")
    return {s.width for s in launch.select("global", "load") if s.file != "dcnv3.cu"}


@pytest.mark.parametrize("softmax", [False, True])
@pytest.mark.parametrize("case", WIDE.values(), ids=WIDE.keys())
def test_aligned_and_misaligned_give_the_same_bits(library, case, softmax):
    """Against NumPy; arrays one element off alignment (scalar loads) give
    bitwise the output, offset and mask gradients of aligned ones (16-byte
    vector loads where D is a multiple of the vector), and, with
    deterministic algorithms, the input gradient too; the grids differ."""
    dtype_name, shape = case
    call = _fixed(dtype_name, **shape)
    grad_output = _grad_output(call)
    expected = _expected(call, grad_output, softmax)
    geom, _ = _geometry(call)
    vector = geom.group_channels % (16 // geom.dtype.itemsize) == 0
    runs = []
    for misalign, block, max_blocks in ((False, 32, 3), (True, 64, 2)):
        engine, *got = _run(library, call, grad_output, softmax, misalign=misalign, block=block,
                            max_blocks=max_blocks, stats=True)
        _check(got, expected, dtype_name)
        assert (16 in _input_load_widths(engine)) == (vector and not misalign)
        with cudcn.deterministic_algorithms():
            _, _, sorted_grads = _run(library, call, grad_output, softmax, misalign=misalign, block=block,
                                      max_blocks=max_blocks)
        runs.append((got[0], *got[1][1:], sorted_grads[0]))
    for name, aligned, unaligned in zip(("output", "offset", "mask", "input (sorted)"), *runs):
        assert aligned.tobytes() == unaligned.tobytes(), name


# ---------------------------------------------------------------------------
# Deterministic algorithms: the sorted input gradient.


def _input_gradient_flags(engine) -> list[int]:
    """The input_gradient argument of each dcnv3_backward launch."""
    return [int(args[-5]) for (name, _), args in zip(engine.launches, engine.arguments)
            if name.startswith("dcnv3_backward")]


@given(calls(min_batch=1, max_out=3, kinks=0.2, channels=(1, 3, 16), max_group=2), st.sampled_from(DTYPES),
       st.booleans())
def test_deterministic_input_gradient(library, call, dtype_name, softmax):
    """Bitwise the same for three grids; the NumPy backend's; the atomic
    path's to rounding; no atomics are asked for."""
    call = _in_dtype(call, _dtype(dtype_name))
    grad_output = _grad_output(call)
    runs = []
    with cudcn.deterministic_algorithms():
        for block, max_blocks in ((32, 3), (7, 1), (64, 8)):
            engine, _, grads = _run(library, call, grad_output, softmax, block=block, max_blocks=max_blocks)
            runs.append(grads)
            assert set(_input_gradient_flags(engine)) <= {0}
    _, expected = _expected(call, grad_output, softmax)
    _, _, atomic = _run(library, call, grad_output, softmax)
    for got, want, other in zip(runs[0], expected, atomic):
        assert_close(got, want, dtype_name)
        assert_close(got, other, dtype_name)
    for again in runs[1:]:
        for got, other in zip(runs[0], again):
            assert got.tobytes() == other.tobytes()


@pytest.mark.parametrize("workspace, chunks", [(1, 60), (20000, 15), (2**30, 1)])  # 20000: 4 pairs of 4032 bytes
def test_deterministic_chunks_fit_the_workspace(library, workspace, chunks):
    """A small workspace budget sorts the corners in several chunks of
    (image, output pixel) pairs (one per pair at the least); the result is
    the NumPy backend's either way."""
    call = _fixed("float32", batch=2, height=5, width=6, group=2, channels=3)
    grad_output = _grad_output(call)
    geom, _ = _geometry(call)
    with cudcn.deterministic_algorithms(), cudcn.workspace_bytes(workspace):
        found = dcnv3.sorted_chunks(geom)
        engine, *got = _run(library, call, grad_output)
    _check(got, _expected(call, grad_output), "float32")
    keys = [name for name, _ in engine.launches if name.startswith("dcnv3_input_keys")]
    assert len(keys) == len(found) == chunks
    assert found[0].start == 0 and found[-1].stop == 60
    assert all(a.stop == b.start for a, b in zip(found, found[1:]))


# ---------------------------------------------------------------------------
# Planted bugs and regressions: changed copies of the kernel (or of the
# sampling core), each built into one library in a namespace of its own (one
# g++ run for all), each run through the launchers by its namespace.

#: name -> (file, text, replacement): bugs the comparison with NumPy must catch.
PLANTED_BUGS = {
    "x and y swapped": ("dcnv3.cu", "    dx = to_compute(xy.v[0]);\n    dy = to_compute(xy.v[1]);",
                        "    dx = to_compute(xy.v[1]);\n    dy = to_compute(xy.v[0]);"),
    "h-major points": ("dcnv3.cu", "const int i = k / s.kernel_h, j = k % s.kernel_h;",
                       "const int j = k / s.kernel_w, i = k % s.kernel_w;"),
    "offset_scale dropped from the gradient": ("dcnv3.cu",
                                               "const Acc gx = dx * m * offset_scale, gy = dy * m * offset_scale;",
                                               "const Acc gx = dx * m, gy = dy * m;"),
    "the centre not removed": ("dcnv3.cu", "const int k = p + (p >= s.centre);", "const int k = p;"),
    "a wrong butterfly lane (channels)": ("dcnv3.cu", "dx += __shfl_xor_sync(0xffffffffu, dx, d);",
                                          "dx += __shfl_xor_sync(0xffffffffu, dx, d ^ 1);"),
    "a wrong butterfly lane (points)": ("dcnv3.cu", "acc[v] += __shfl_xor_sync(0xffffffffu, acc[v], d);",
                                        "acc[v] += __shfl_xor_sync(0xffffffffu, acc[v], d ^ channel_lanes);"),
    "a reduction step short": ("dcnv3.cu", "for (int d = channel_lanes / 2; d > 0; d /= 2) {",
                               "for (int d = channel_lanes / 2; d > 1; d /= 2) {"),
    "a dropped corner (gather)": ("sampling.cuh",
                                  "    for (int q = 0; q < 4; ++q) {\n      const Acc weight = scale * taps.weight[q];",
                                  "    for (int q = 0; q < 3; ++q) {\n      const Acc weight = scale * taps.weight[q];"),
    "a dropped corner (products)": ("dcnv3.cu", "for (int q = 0; q < 4; ++q) {\n            const Acc v",
                                    "for (int q = 0; q < 3; ++q) {\n            const Acc v"),
    "the softmax's sum left out": ("dcnv3.cu", "soft * (Acc(dcn_load(scratch, masks + p)) - weighted)",
                                   "soft * Acc(dcn_load(scratch, masks + p))"),
    "the softmax's stats swapped": ("dcnv3.cu", "return dcnv3_exp(m - st.v[0]) / st.v[1];",
                                    "return dcnv3_exp(m - st.v[1]) / st.v[0];"),
}

#: Memory regressions that keep the results: each lane adding a run of
#: consecutive channels of its own (the warp's atomics scatter), and the
#: backward reading its point's offsets and mask again at every channel.
LANE_MAJOR_ATOMICS = (
    "dcnv3.cu",
    "      for (int c = lane.channel; c < s.channels; c += channel_lanes) {\n        const Acc g",
    "      const int run = (s.channels + channel_lanes - 1) / channel_lanes;\n"
    "      for (int c = lane.channel * run; c < s.channels && c < (lane.channel + 1) * run; ++c) {\n"
    "        const Acc g",
)
POINT_PER_CHANNEL = (
    "dcnv3.cu",
    "            products[q] += g * ((taps.valid >> q) & 1u ? v : Acc(0));",
    "            Acc again_y, again_x, again_m;\n"
    "            dcnv3_point(s, offset, mask, it, item, p, pairs, offset_scale, softmax, stats, again_y, again_x,\n"
    "                        again_m);\n"
    "            products[q] += g * ((taps.valid >> q) & 1u ? v : Acc(0)) * Acc(again_m == m);",
)

PLANTS = {"as it is": None, **PLANTED_BUGS, "lane-major atomics": LANE_MAJOR_ATOMICS,
          "the point read per channel": POINT_PER_CHANNEL}


def _planted_names(namespace: str) -> list[str]:
    return [f"{namespace}::{name}" for name in _names(("float32",), ("int",))]


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict[str, plants.Planted]:
    """plant name -> its float32, 32-bit kernels (tests/emulation/plants.py)."""
    if harness.compiler() is None:
        pytest.skip("no C++ compiler for the kernel emulation")
    return plants.build(tmp_path_factory.mktemp("dcnv3_plants"), SOURCES, PLANTS, _planted_names)


def _run_planted(planted, plant: str, call: DCNv3Call, grad_output, softmax: bool = False, **options):
    geom, arrays = _geometry(call, softmax)
    engine = plants.PlantedEngine(planted[plant], **options)
    return engine, dcnv3.forward(engine, geom, *arrays), dcnv3.backward(engine, geom, grad_output, *arrays)


@pytest.mark.parametrize("plant", ["as it is", *PLANTED_BUGS])
def test_planted_bugs_are_caught(planted, plant):
    """float32, 3x3 with the centre removed, offset_scale 0.5, D = 16 (4
    forward lanes a point, 8 backward), the points split among lanes, the
    softmax fused: each planted bug fails the comparison with NumPy."""
    call = _fixed("float32", batch=2, height=4, width=5, group=2, channels=16, remove_center=True, seed=3)
    grad_output = _grad_output(call)
    _, *got = _run_planted(planted, plant, call, grad_output, softmax=True)
    expected = _expected(call, grad_output, softmax=True)
    if plant == "as it is":
        _check(got, expected, "float32")
    else:
        with pytest.raises(AssertionError, match="Not equal to tolerance"):
            _check(got, expected, "float32")


# ---------------------------------------------------------------------------
# Memory budgets, counted by the emulator (tests/emulation/transactions.py).


def _budget_case(dtype_name: str, channels: int = 32) -> DCNv3Call:
    """One image of 6x8 pixels, 2 groups, 3x3 with padding 1: 96 items of 9 points."""
    return _fixed(dtype_name, batch=1, height=6, width=8, group=2, channels=channels, seed=2)


@functools.cache
def _measured(dtype_name: str, channels: int = 32, softmax: bool = False,
              direction: str = "both") -> tuple[tx.LaunchStats, ...]:
    """The accounted launches of a forward and a backward call, or of one of them."""
    call = _budget_case(dtype_name, channels)
    geom, arrays = _geometry(call, softmax)
    engine = harness.EmulatedEngine(_library(), stats=True)
    if direction in ("forward", "both"):
        dcnv3.forward(engine, geom, *arrays)
    if direction in ("backward", "both"):
        dcnv3.backward(engine, geom, _grad_output(call), *arrays)
    return tuple(tx.merge(engine.stats))


@functools.cache
def _point_lines() -> frozenset[int]:
    """The lines of kernels/dcnv3.cu that load offsets or mask values: the (x,
    y) pair (one load, or two scalars), the mask, the softmax's stats and its
    passes over an item's mask."""
    lines = (cuda_kernels.kernel_dir() / "dcnv3.cu").read_text().splitlines()
    loads = ("reinterpret_cast<const ChannelVector<T, 2>*>(offset", "dcn_load(offset, it.offsets",
             "dcn_load(mask, it.masks", "dcn_load(mask, masks", "reinterpret_cast<const ChannelVector<Acc, 2>*>(stats")
    return frozenset(i for i, line in enumerate(lines, 1) if any(load in line for load in loads))


def _point_sectors(launch: tx.LaunchStats, file: str = "dcnv3.cu", offset: int = 0) -> dict[str, int]:
    """Sectors of each offset and mask load site (a line, from the kernel line
    that called it), in kernels/dcnv3.cu or in a copy of it that starts
    `offset` lines into `file`."""
    lines = {line + offset for line in _point_lines()}
    sectors: dict[str, int] = {}
    for s in launch.select("global", "load"):
        if s.file == file and s.line in lines:
            sectors[s.site] = sectors.get(s.site, 0) + s.sectors
    return sectors


@pytest.mark.parametrize("channels", [16, 32])
@pytest.mark.parametrize("dtype_name", DTYPES)
def test_forward_loads_are_near_ideal(library, dtype_name, channels):
    launch = tx.launches_of(_measured(dtype_name, channels), "dcnv3_forward")
    assert tx.load_excess(launch) <= tx.LOAD_EXCESS, tx.table([launch])


@pytest.mark.parametrize("channels", [16, 32, 64])
@pytest.mark.parametrize("dtype_name", DTYPES)
def test_input_gradient_atomics_are_coalesced(library, dtype_name, channels):
    """At most 4 sectors per warp request, counted per 4 bytes a lane adds
    (tx.atomic_sectors: float32 atomics, the accumulator of float16, bfloat16
    and float32, as they are; float64's at half their sectors), and exactly
    the ideal sectors."""
    launch = tx.launches_of(_measured(dtype_name, channels), "dcnv3_backward")
    assert tx.atomic_sectors(launch) <= tx.ATOMIC_SECTORS, tx.table([launch])
    atomic = launch.total("global", "atomic")
    assert atomic.sectors == atomic.ideal_sectors, tx.table([launch])


@pytest.mark.parametrize("kernel, softmax, sites", [
    ("dcnv3_forward", False, 2), ("dcnv3_backward", False, 2),  # the (x, y) pair and the mask
    ("dcnv3_forward", True, 3), ("dcnv3_backward", True, 3),  # and the item's softmax stats
    ("dcnv3_softmax_stats", True, 3),  # the max's first value and loop, the sum's loop (one launch: forward's)
    ("dcnv3_softmax_backward", True, 4),  # the stats and the mask, in each of two loops
])
@pytest.mark.parametrize("dtype_name", DTYPES)
def test_offsets_and_mask_are_read_once(library, dtype_name, kernel, softmax, sites):
    """Each (item, point)'s offsets and mask value cost at most one sector per
    load site: read by every lane of the point at one address, never again
    per channel. The fused softmax's stats cost as much again, and its two
    small kernels read each item's mask once per pass."""
    direction = "forward" if kernel in ("dcnv3_forward", "dcnv3_softmax_stats") else "backward"
    launch = tx.launches_of(_measured(dtype_name, softmax=softmax, direction=direction), kernel)
    call = _budget_case(dtype_name)
    geom, _ = _geometry(call)
    sectors = _point_sectors(launch)
    assert len(sectors) == sites, tx.table([launch])
    assert max(sectors.values()) <= dcnv3.items(geom) * geom.points, tx.table([launch])


@pytest.mark.parametrize("plant", ["as it is", "lane-major atomics"])
def test_planted_lane_major_atomics_are_flagged(planted, plant):
    """The input-gradient pass with each lane adding a run of consecutive
    channels of its own: the same sums, and the warp's atomics scatter."""
    call = _budget_case("float32")
    grad_output = _grad_output(call)
    engine, *got = _run_planted(planted, plant, call, grad_output, stats=True)
    _check(got, _expected(call, grad_output), "float32")
    sectors = tx.atomic_sectors(tx.launches_of(engine.stats, "dcnv3_backward"))
    assert (sectors > tx.ATOMIC_SECTORS) == (plant != "as it is"), sectors


@pytest.mark.parametrize("plant", ["as it is", "the point read per channel"])
def test_planted_per_channel_point_reads_are_flagged(planted, plant):
    """The backward reading its point's offsets and mask again at every
    channel: the same result, and more than one sector per (item, point)."""
    call = _budget_case("float32")
    grad_output = _grad_output(call)
    engine, *got = _run_planted(planted, plant, call, grad_output, stats=True)
    _check(got, _expected(call, grad_output), "float32")
    geom, _ = _geometry(call)
    launch = tx.launches_of(engine.stats, "dcnv3_backward")
    file, offset = planted[plant].file, planted[plant].offset
    worst = max(_point_sectors(launch, file, offset).values())
    assert (worst > dcnv3.items(geom) * geom.points) == (plant != "as it is"), tx.table([launch])


def test_report_script_prints_the_dcnv3_table_and_budgets(library, capsys):
    """tools/memory_report.py --operator dcnv3: the kernels' sites and the budget lines, each within budget."""
    path = Path(__file__).resolve().parents[1] / "tools" / "memory_report.py"
    spec = importlib.util.spec_from_file_location("memory_report", path)
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    assert report.main(["--operator", "dcnv3", "--dtype", "float32", "--channels", "16", "--softmax",
                        "--kernel", "dcnv3_"]) == 0
    out = capsys.readouterr().out
    assert "DCNv3" in out and "softmax fused" in out and "not measured on a GPU" in out
    assert re.search(r"dcnv3_forward<float, int>\s+load sectors / ideal\s+1\.\d\d \(budget 1\.5\)\s+ok", out), out
    assert re.search(r"dcnv3_backward<float, float, int>\s+atomic sectors/request/4B\s+[0-4]\.\d\d \(budget 4\)\s+ok",
                     out), out
