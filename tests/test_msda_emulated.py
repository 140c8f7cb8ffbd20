"""kernels/msda.cu on the CPU against the NumPy backend (no GPU needed).

The kernel source is compiled by g++ under the cooperative emulator
(tests/emulation) and run through the CUDA backend's own launchers
(cudcn/backends/cuda/msda.py) on NumPy arrays, in every dtype. Outputs are
allocated NaN-filled, grids are capped small so that every grid-stride loop
takes several steps, and drawn geometries include 1x1 and non-square levels,
L = 1, P = 1, odd D, N = 0, Lq = 0 and locations outside [0, 1] and exactly
on kinks. Further:

- arrays one element off alignment (the scalar path) give bitwise the
  results of aligned ones (the vector path), checked to take 16-byte loads;
- the deterministic value gradient is bitwise the same whatever the grid,
  and equals the atomic one to rounding;
- planted bugs (a wrong level start, x and y swapped, a missing -0.5, a
  dropped corner, a wrong shuffle lane, a reduction step short) are caught;
- memory budgets, counted by the emulator's accounting: forward loads within
  1.5x of the ideal sectors, value-gradient atomics at most 4 sectors per
  float32 warp request (the ideal for float64), location and weight loads at
  most one sector per (item, sample) and load site; planted regressions of
  each are flagged.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import cudcn
from cudcn.backends import numpy as numpy_backend
from cudcn.backends.cuda import kernels as cuda_kernels
from cudcn.backends.cuda import msda
from cudcn.msda_geometry import validate_msda
from emulation import harness, plants
from emulation import transactions as tx
from emulation.cases import assert_close, ml_dtypes
from msda_reference import calls

pytestmark = pytest.mark.emulated

DTYPES = ("float64", "float32", "float16", "bfloat16")
KERNELS = ("msda_forward", "msda_backward", "msda_value_keys", "sorted_gather", "accum_to_storage")
#: The kernel files these come from: the family's, and the shared sorted gather's.
SOURCES = ("msda.cu", "sorted_gather.cu")


def _names(dtypes=DTYPES, indexes=cuda_kernels.INDEX_TYPES) -> list[str]:
    return [cuda_kernels.name_expression(k, d, i) for d in dtypes for i in indexes for k in KERNELS]


def _compiler() -> None:
    if harness.compiler() is None:
        pytest.skip("no C++ compiler for the kernel emulation")


@functools.cache
def _library() -> harness.Library:
    return harness.build(_names(), [cuda_kernels.kernel_dir() / name for name in SOURCES])


@pytest.fixture(scope="module")
def library():
    _compiler()
    return _library()


def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        if ml_dtypes is None:
            pytest.skip("bfloat16 needs ml_dtypes")
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _arguments(value, shapes, locations, weights, dtype: np.dtype) -> dict:
    shapes = np.asarray(shapes, np.int64)
    starts = np.concatenate([[0], np.cumsum(shapes[:, 0] * shapes[:, 1])[:-1]]).astype(np.int64)
    return dict(value=value.astype(dtype), spatial_shapes=shapes, level_start_index=starts,
                sampling_locations=locations.astype(dtype), attention_weights=weights.astype(dtype))


def _fixed(dtype_name: str, batch: int, queries: int, heads: int, channels: int, shapes, points: int,
           seed: int = 0) -> dict:
    """A call with locations in (-0.2, 1.2), a tenth of the pixel coordinates
    exactly on a kink (an integer from -1 to the size)."""
    rng = np.random.default_rng(seed)
    shapes = np.asarray(shapes)
    levels = len(shapes)
    pixels = int((shapes[:, 0] * shapes[:, 1]).sum())
    size = (batch, queries, heads, levels, points, 2)
    locations = rng.uniform(-0.2, 1.2, size)
    extent = shapes[:, ::-1].reshape(levels, 1, 2)  # (W, H)
    kink = rng.random(size) < 0.1
    locations = np.where(kink, (rng.integers(-1, extent + 1, size) + 0.5) / extent, locations)
    return _arguments(rng.standard_normal((batch, pixels, heads, channels)), shapes, locations,
                      rng.uniform(-1, 1, size[:-1]), _dtype(dtype_name))


def _run(library, args: dict, grad_output, **engine_options):
    """(engine, output, gradients) of the CUDA backend's launchers on emulated kernels."""
    geom = validate_msda(**args)
    engine = harness.EmulatedEngine(library, **engine_options)
    arrays = (args["value"], args["sampling_locations"], args["attention_weights"])
    out = msda.forward(engine, geom, *arrays)
    grads = msda.backward(engine, geom, grad_output, *arrays)
    return engine, out, grads


def _expected(args: dict, grad_output):
    geom = validate_msda(**args)
    arrays = (args["value"], args["sampling_locations"], args["attention_weights"])
    return (numpy_backend.ms_deform_attn_forward(geom, *arrays),
            numpy_backend.ms_deform_attn_backward(geom, grad_output, *arrays))


def _grad_output(args: dict, seed: int = 1) -> np.ndarray:
    n, _, m, d = args["value"].shape
    queries = args["sampling_locations"].shape[1]
    return np.random.default_rng(seed).standard_normal((n, queries, m * d)).astype(args["value"].dtype)


def _check(got, expected, dtype_name: str) -> None:
    out, grads = got
    want_out, want_grads = expected
    assert_close(out, want_out, dtype_name)
    for name, g, e in zip(("value", "sampling_locations", "attention_weights"), grads, want_grads):
        assert g.shape == e.shape, name
        assert_close(g, e, dtype_name)


# ---------------------------------------------------------------------------
# Against the NumPy backend.


@given(calls(kinks=0.2), st.sampled_from(DTYPES), st.booleans())
def test_matches_numpy(library, call, dtype_name, wide):
    """Drawn geometries (1x1 and non-square levels, L and P from 1, odd D,
    N and Lq from 0, locations up to 1.5 pixels outside, a fifth on kinks),
    every dtype, 32- and 64-bit indexing: forward and every gradient."""
    args = _arguments(call.value, call.spatial_shapes, call.sampling_locations, call.attention_weights,
                      _dtype(dtype_name))
    grad_output = _grad_output(args, call.seed)
    engine, *got = _run(library, args, grad_output, wide=wide)
    _check(got, _expected(args, grad_output), dtype_name)
    if engine.launches:
        assert all(("long long" in name) == wide for name, _ in engine.launches)


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_far_outside_non_finite_and_edge_locations(library, dtype_name):
    """NaN, infinite and huge locations count 0; pixel coordinates exactly
    -1 and H (W), and just inside, follow the NumPy backend (values and the
    one-sided slope at -1)."""
    args = _fixed(dtype_name, 2, 5, 2, 9, [(4, 4), (1, 1)], 3, seed=5)
    locations = args["sampling_locations"].astype(np.float64)
    flat = locations.reshape(-1)
    flat[::7] = np.nan
    flat[1::11] = np.inf
    flat[2::13] = -1e30  # -inf in float16
    # Level 0 (4 x 4): u*4 - 0.5 = -1 at u = -1/8 and = 4 (W, H) at u = 9/8, exactly in every dtype.
    locations[0, :, :, 0, 0] = (-0.125, 0.5)
    locations[0, :, :, 0, 1] = (1.125, 0.5)
    locations[1, :, :, 0, 0] = (0.5, -0.125)
    with np.errstate(over="ignore"):
        args["sampling_locations"] = locations.astype(args["value"].dtype)
    grad_output = _grad_output(args)
    _, *got = _run(library, args, grad_output)
    expected = _expected(args, grad_output)
    _check(got, expected, dtype_name)
    assert np.count_nonzero(np.asarray(expected[1][1], np.float64)[1, :, :, 0, 0, 1]) > 0  # the slope at -1


@pytest.mark.parametrize("batch, queries", [(0, 3), (2, 0), (0, 0)])
def test_no_images_or_no_queries(library, batch, queries):
    args = _fixed("float32", batch, queries, 2, 5, [(2, 3)], 2)
    grad_output = _grad_output(args)
    engine, out, grads = _run(library, args, grad_output)
    assert out.shape == (batch, queries, 10) and grads[1].shape == args["sampling_locations"].shape
    assert grads[0].shape == args["value"].shape and not grads[0].any()
    assert engine.launches == []


def test_grids_are_capped_and_loops_stride(library):
    """More items than the capped grid has lanes: each loop takes several steps."""
    args = _fixed("float32", 2, 7, 3, 8, [(4, 5), (2, 2)], 2)
    grad_output = _grad_output(args)
    engine, *got = _run(library, args, grad_output, block=32, max_blocks=2)
    _check(got, _expected(args, grad_output), "float32")
    geom = validate_msda(**args)
    items = 2 * 7 * 3
    assert items * msda.forward_lanes(geom) > 64 and items * msda.backward_lanes(geom) > 64
    assert all(launch.grid[0] == 2 for _, launch in engine.launches)


# ---------------------------------------------------------------------------
# Lane groups of every width; the vector and the scalar path.

WIDE = {
    # name: (dtype, batch, queries, heads, channels, level shapes, points)
    "f32 D=32: 8 lanes a query, 4 a block": ("float32", 1, 3, 2, 32, [(3, 5), (2, 2)], 2),
    "f32 D=64: 16 lanes": ("float32", 1, 2, 2, 64, [(4, 3)], 3),
    "f32 D=33: the scalar path": ("float32", 2, 2, 1, 33, [(3, 3), (1, 2)], 2),
    "f64 D=70: 32 lanes, 2 blocks a lane": ("float64", 1, 2, 1, 70, [(2, 3)], 2),
    "f16 D=256: 32 lanes": ("float16", 1, 1, 2, 256, [(2, 2), (1, 1)], 2),
    "f16 D=12: the scalar path": ("float16", 2, 3, 2, 12, [(3, 2)], 3),
    "bf16 D=40: 8 lanes": ("bfloat16", 1, 3, 2, 40, [(2, 5), (3, 1)], 2),
    "f64 D=1": ("float64", 2, 5, 3, 1, [(2, 2), (3, 2)], 1),
    "f16 D=1": ("float16", 1, 4, 2, 1, [(1, 3)], 4),
}


def _value_load_widths(engine) -> set[int]:
    """Widths of the forward's value loads (the gather's, in sampling.cuh or dcn_common.cuh)."""
    launch = tx.launches_of(engine.stats, "msda_forward")
    return {s.width for s in launch.select("global", "load") if s.file != "msda.cu"}


@pytest.mark.parametrize("case", WIDE.values(), ids=WIDE.keys())
def test_aligned_and_misaligned_give_the_same_bits(library, case):
    """Against NumPy; arrays one element off alignment (scalar loads) give
    bitwise the output, location and weight gradients of aligned ones (16-byte
    vector loads where D is a multiple of the vector), and, with
    deterministic algorithms, the value gradient too; the grids differ."""
    dtype_name, *shape = case
    args = _fixed(dtype_name, *shape)
    grad_output = _grad_output(args)
    expected = _expected(args, grad_output)
    geom = validate_msda(**args)
    vector = geom.channels % (16 // geom.dtype.itemsize) == 0
    runs = []
    for misalign, block, max_blocks in ((False, 32, 3), (True, 64, 2)):
        engine, *got = _run(library, args, grad_output, misalign=misalign, block=block, max_blocks=max_blocks,
                            stats=True)
        _check(got, expected, dtype_name)
        assert (16 in _value_load_widths(engine)) == (vector and not misalign)
        with cudcn.deterministic_algorithms():
            _, _, sorted_grads = _run(library, args, grad_output, misalign=misalign, block=block,
                                      max_blocks=max_blocks)
        runs.append((got[0], *got[1][1:], sorted_grads[0]))
    for name, aligned, unaligned in zip(("output", "locations", "weights", "value (sorted)"), *runs):
        assert aligned.tobytes() == unaligned.tobytes(), name


# ---------------------------------------------------------------------------
# Deterministic algorithms: the sorted value gradient.


def _value_gradient_flags(engine) -> list[int]:
    """The value_gradient argument of each msda_backward launch."""
    return [int(args[-4]) for (name, _), args in zip(engine.launches, engine.arguments)
            if name.startswith("msda_backward")]


@given(calls(min_batch=1, kinks=0.2), st.sampled_from(DTYPES))
def test_deterministic_value_gradient(library, call, dtype_name):
    """Bitwise the same for three grids; the NumPy backend's; the atomic
    path's to rounding; no atomics are asked for."""
    args = _arguments(call.value, call.spatial_shapes, call.sampling_locations, call.attention_weights,
                      _dtype(dtype_name))
    grad_output = _grad_output(args, call.seed)
    runs = []
    with cudcn.deterministic_algorithms():
        for block, max_blocks in ((32, 3), (7, 1), (64, 8)):
            engine, _, grads = _run(library, args, grad_output, block=block, max_blocks=max_blocks)
            runs.append(grads)
            assert set(_value_gradient_flags(engine)) <= {0}
    _, expected = _expected(args, grad_output)
    _, _, atomic = _run(library, args, grad_output)
    for got, want, other in zip(runs[0], expected, atomic):
        assert_close(got, want, dtype_name)
        assert_close(got, other, dtype_name)
    for again in runs[1:]:
        for got, other in zip(runs[0], again):
            assert got.tobytes() == other.tobytes()


@pytest.mark.parametrize("workspace", [1, 5000, 2**30])
def test_deterministic_chunks_fit_the_workspace(library, workspace):
    """A small workspace budget sorts the corners in several chunks of
    (image, query) pairs (one per pair at the least); the result is the
    NumPy backend's either way."""
    args = _fixed("float32", 3, 4, 2, 6, [(3, 4), (2, 2)], 2)
    grad_output = _grad_output(args)
    geom = validate_msda(**args)
    with cudcn.deterministic_algorithms(), cudcn.workspace_bytes(workspace):
        chunks = msda.sorted_chunks(geom)
        engine, *got = _run(library, args, grad_output)
    _check(got, _expected(args, grad_output), "float32")
    keys = [name for name, _ in engine.launches if name.startswith("msda_value_keys")]
    assert len(keys) == len(chunks) and [c.start for c in chunks] == sorted({c.start for c in chunks})
    assert chunks[0].start == 0 and chunks[-1].stop == 12
    assert all(a.stop == b.start for a, b in zip(chunks, chunks[1:]))
    expected_chunks = {1: 12, 5000: 6, 2**30: 1}  # 5000: two pairs of 1792 bytes and their images' starts
    assert len(chunks) == expected_chunks[workspace]


# ---------------------------------------------------------------------------
# Planted bugs and regressions: changed copies of the kernel (or of the
# sampling core), each built into one library in a namespace of its own (one
# g++ run for all), each run through the launchers by its namespace.

#: name -> (file, text, replacement): bugs the comparison with NumPy must catch.
PLANTED_BUGS = {
    "a wrong level start": ("msda.cu", "start = static_cast<Index>(dcn_load(levels, 3 * l + 2));",
                            "start = static_cast<Index>(dcn_load(levels, 2));"),
    "x and y swapped": ("msda.cu", "return bilinear_taps<Acc, int>(mul_rn(y, Acc(height)) - Acc(0.5), "
                        "mul_rn(x, Acc(width)) - Acc(0.5),",
                        "return bilinear_taps<Acc, int>(mul_rn(x, Acc(height)) - Acc(0.5), "
                        "mul_rn(y, Acc(width)) - Acc(0.5),"),
    "a missing -0.5": ("msda.cu", "mul_rn(x, Acc(width)) - Acc(0.5),", "mul_rn(x, Acc(width)),"),
    "a dropped corner (gather)": ("sampling.cuh",
                                  "    for (int q = 0; q < 4; ++q) {\n      const Acc weight = scale * taps.weight[q];",
                                  "    for (int q = 0; q < 3; ++q) {\n      const Acc weight = scale * taps.weight[q];"),
    "a dropped corner (products)": ("msda.cu", "for (int q = 0; q < 4; ++q) s[q] += g * corners[q][0];",
                                    "for (int q = 0; q < 3; ++q) s[q] += g * corners[q][0];"),
    "a wrong broadcast lane": ("msda.cu", "const Acc a = __shfl_sync(0xffffffffu, own_a, group_first + j);",
                               "const Acc a = __shfl_sync(0xffffffffu, own_a, group_first + (j ^ 1));"),
    "a wrong butterfly lane": ("msda.cu", "dx += __shfl_xor_sync(0xffffffffu, dx, d);",
                               "dx += __shfl_xor_sync(0xffffffffu, dx, d ^ 1);"),
    "a reduction step short": ("msda.cu", "for (int d = group_lanes / 2; d > 0; d /= 2) {",
                               "for (int d = group_lanes / 2; d > 1; d /= 2) {"),
}

#: Memory regressions that keep the results: each lane adding a run of
#: consecutive channels of its own (the warp's atomics scatter), and the
#: backward reading its sample again at every channel step.
LANE_MAJOR_ATOMICS = (
    "msda.cu",
    "      for (int c = group_lane; c < channels; c += group_lanes) {\n        const Acc g = to_compute(dcn_load(grads, c));",
    "      const int run = (channels + group_lanes - 1) / group_lanes;\n"
    "      for (int c = group_lane * run; c < channels && c < (group_lane + 1) * run; ++c) {\n"
    "        const Acc g = to_compute(dcn_load(grads, c));",
)
SAMPLE_PER_CHANNEL = (
    "msda.cu",
    "          const Acc g = to_compute(dcn_load(grads, c));\n#pragma unroll\n"
    "          for (int q = 0; q < 4; ++q) s[q] += g * corners[q][0];",
    "          const Acc g = to_compute(dcn_load(grads, c));\n"
    "          Acc again_x, again_y, again_a;\n"
    "          msda_sample(locations, weights, item * samples + sample, pairs, again_x, again_y, again_a);\n"
    "#pragma unroll\n"
    "          for (int q = 0; q < 4; ++q) s[q] += g * corners[q][0] * Acc(again_a == a);",
)

PLANTS = {"as it is": None, **PLANTED_BUGS, "lane-major atomics": LANE_MAJOR_ATOMICS,
          "the sample read per channel": SAMPLE_PER_CHANNEL}


def _planted_names(namespace: str) -> list[str]:
    return [f"{namespace}::{name}" for name in _names(("float32",), ("int",))]


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict[str, plants.Planted]:
    """plant name -> its float32, 32-bit kernels (tests/emulation/plants.py)."""
    if harness.compiler() is None:
        pytest.skip("no C++ compiler for the kernel emulation")
    return plants.build(tmp_path_factory.mktemp("msda_plants"), SOURCES, PLANTS, _planted_names)


def _run_planted(planted, plant: str, args: dict, grad_output, **options):
    geom = validate_msda(**args)
    engine = plants.PlantedEngine(planted[plant], **options)
    arrays = (args["value"], args["sampling_locations"], args["attention_weights"])
    return engine, msda.forward(engine, geom, *arrays), msda.backward(engine, geom, grad_output, *arrays)


@pytest.mark.parametrize("plant", ["as it is", *PLANTED_BUGS])
def test_planted_bugs_are_caught(planted, plant):
    args = _fixed("float32", 2, 3, 2, 32, [(4, 6), (3, 2)], 3, seed=3)  # 8 lanes a query, 6 samples
    grad_output = _grad_output(args)
    _, *got = _run_planted(planted, plant, args, grad_output)
    expected = _expected(args, grad_output)
    if plant == "as it is":
        _check(got, expected, "float32")
    else:
        with pytest.raises(AssertionError, match="Not equal to tolerance"):
            _check(got, expected, "float32")


# ---------------------------------------------------------------------------
# Memory budgets, counted by the emulator (tests/emulation/transactions.py).


def _budget_case(dtype_name: str, channels: int = 32) -> dict:
    """One image, 8 queries, 2 heads, levels 6x8 and 3x4, 4 points."""
    return _fixed(dtype_name, 1, 8, 2, channels, [(6, 8), (3, 4)], 4, seed=2)


@functools.cache
def _measured(dtype_name: str, channels: int = 32) -> tuple[tx.LaunchStats, ...]:
    args = _budget_case(dtype_name, channels)
    engine, _, _ = _run(_library(), args, _grad_output(args), stats=True)
    return tuple(tx.merge(engine.stats))


@functools.cache
def _sample_lines() -> frozenset[int]:
    """The lines of msda_sample's loads in kernels/msda.cu: the (x, y) pair
    (one load, or two scalars) and the weight."""
    lines = (cuda_kernels.kernel_dir() / "msda.cu").read_text().splitlines()
    loads = ("reinterpret_cast<const ChannelVector<T, 2>*>(locations", "dcn_load(locations, 2 * at",
             "dcn_load(weights, at)")
    return frozenset(i for i, line in enumerate(lines, 1) if any(load in line for load in loads))


def _sample_sectors(launch: tx.LaunchStats, file: str = "msda.cu", offset: int = 0) -> dict[int, int]:
    """Sectors of each of msda_sample's loads (the (x, y) pair or its two
    scalars, the weight), whatever line called it, by line: in
    kernels/msda.cu or in a copy of it that starts `offset` lines into `file`."""
    lines = {line + offset for line in _sample_lines()}
    sectors: dict[int, int] = {}
    for s in launch.select("global", "load"):
        if s.file == file and s.line in lines:
            sectors[s.line] = sectors.get(s.line, 0) + s.sectors
    return sectors


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_forward_loads_are_near_ideal(library, dtype_name):
    launch = tx.launches_of(_measured(dtype_name), "msda_forward")
    assert tx.load_excess(launch) <= tx.LOAD_EXCESS, tx.table([launch])


@pytest.mark.parametrize("channels", [32, 64])
@pytest.mark.parametrize("dtype_name", DTYPES)
def test_value_gradient_atomics_are_coalesced(library, dtype_name, channels):
    """At most 4 sectors per warp request, counted per 4 bytes a lane adds
    (tx.atomic_sectors: float32 atomics, the accumulator of float16, bfloat16
    and float32, as they are; float64's at half their sectors), and exactly
    the ideal sectors."""
    launch = tx.launches_of(_measured(dtype_name, channels), "msda_backward")
    assert tx.atomic_sectors(launch) <= tx.ATOMIC_SECTORS, tx.table([launch])
    atomic = launch.total("global", "atomic")
    assert atomic.sectors == atomic.ideal_sectors, tx.table([launch])


@pytest.mark.parametrize("kernel", ["msda_forward", "msda_backward"])
@pytest.mark.parametrize("dtype_name", DTYPES)
def test_locations_and_weights_are_read_once(library, dtype_name, kernel):
    """Each (item, sample)'s location and weight cost at most one sector per
    load site: read by one lane and broadcast (forward), or by every lane of
    the group at one address (backward), never again per channel."""
    launch = tx.launches_of(_measured(dtype_name), kernel)
    geom = validate_msda(**_budget_case(dtype_name))
    items, samples = geom.batch * geom.queries * geom.heads, geom.levels * geom.points
    sectors = _sample_sectors(launch)
    assert len(sectors) == 2, tx.table([launch])  # the (x, y) pair and the weight
    assert max(sectors.values()) <= items * samples, tx.table([launch])


@pytest.mark.parametrize("plant", ["as it is", "lane-major atomics"])
def test_planted_lane_major_atomics_are_flagged(planted, plant):
    """The value-gradient pass with each lane adding a run of consecutive
    channels of its own: the same sums, and the warp's atomics scatter."""
    args = _budget_case("float32")
    grad_output = _grad_output(args)
    engine, *got = _run_planted(planted, plant, args, grad_output, stats=True)
    _check(got, _expected(args, grad_output), "float32")
    sectors = tx.atomic_sectors(tx.launches_of(engine.stats, "msda_backward"))
    assert (sectors > tx.ATOMIC_SECTORS) == (plant != "as it is"), sectors


@pytest.mark.parametrize("plant", ["as it is", "the sample read per channel"])
def test_planted_per_channel_sample_reads_are_flagged(planted, plant):
    """The backward reading its sample's location and weight again at every
    channel step: the same result, and more than one sector per (item, sample)."""
    args = _budget_case("float32")
    grad_output = _grad_output(args)
    engine, *got = _run_planted(planted, plant, args, grad_output, stats=True)
    _check(got, _expected(args, grad_output), "float32")
    geom = validate_msda(**args)
    launch = tx.launches_of(engine.stats, "msda_backward")
    items, samples = geom.batch * geom.queries * geom.heads, geom.levels * geom.points
    file, offset = planted[plant].file, planted[plant].offset
    worst = max(_sample_sectors(launch, file, offset).values())
    assert (worst > items * samples) == (plant != "as it is"), tx.table([launch])


def test_report_script_prints_the_msda_table_and_budgets(library, capsys):
    """tools/memory_report.py --operator msda: the kernels' sites and the budget lines, each within budget."""
    path = Path(__file__).resolve().parents[1] / "tools" / "memory_report.py"
    spec = importlib.util.spec_from_file_location("memory_report", path)
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    assert report.main(["--operator", "msda", "--dtype", "float32", "--channels", "32", "--kernel", "msda_"]) == 0
    out = capsys.readouterr().out
    assert "multi-scale deformable attention" in out and "not measured on a GPU" in out
    assert re.search(r"msda_forward<float, int>\s+load sectors / ideal\s+1\.\d\d \(budget 1\.5\)\s+ok", out), out
    assert re.search(r"msda_backward<float, float, int>\s+atomic sectors/request/4B\s+[0-4]\.\d\d \(budget 4\)\s+ok", out)
