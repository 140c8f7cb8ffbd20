"""Memory transactions of the kernels, counted by the emulator and held to budgets.

The emulator's memory accounting (tests/emulation/emulate.h, read through
tests/emulation/transactions.py) groups each access site's executions into
warp requests and counts the 32-byte sectors of global memory and the
wavefronts of shared memory they take. It is trusted as the emulator is:

- the counter on a small cooperative kernel (memory_pattern in
  tests/emulation/cooperative_kernels.cu) against counts worked out by hand;
- planted regressions, each a changed copy of a real kernel that still
  computes the right result, each flagged by the budget it breaks:
  channels read lane-major (lanes striding by several vectors), a shared
  row stride of 65 words, atomics of a lane's own consecutive channels.

The budgets, at a representative small geometry (64 input and 64 output
channels, one offset group, 8 x 8 pixels, 3 x 3 kernel; every dtype and
operand policy): col2im's float32 atomics at most 4 sectors per warp
request; the sampling kernels' loads within 1.5x of the ideal sectors; the
fused kernels' shared stores at most 2-way conflicts and their fragment
loads conflict-free. A kernel that breaks one today is marked xfail(strict)
with what was measured, so that a fix shows up as an unexpected pass.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

import cudcn
from cudcn.backends import numpy as numpy_backend
from cudcn.backends.cuda import fused, im2col_gemm
from cudcn.backends.cuda import kernels as cuda_kernels
from cudcn.backends.cuda.engine import Launch
from cudcn.geometry import validate
from emulation import harness
from emulation import transactions as tx
from emulation.cases import assert_close, ml_dtypes

pytestmark = pytest.mark.emulated


def _compiler() -> None:
    if harness.compiler() is None:
        pytest.skip("no C++ compiler for the kernel emulation")


@pytest.fixture(scope="module")
def cooperative():
    _compiler()
    return harness.build(harness.COOPERATIVE_NAMES, [harness.COOPERATIVE_SOURCE])


@functools.cache
def _library() -> harness.Library:
    return harness.build()


@pytest.fixture(scope="module")
def library():
    _compiler()
    return _library()


def _arguments(dtype_name: str, channels: int = 64, out_channels: int = 64, size: int = 8, seed: int = 0) -> dict:
    """One image, 3 x 3 kernel, padding 1, one offset group, mask and bias;
    offsets in (-2, 2), so that corners fall inside and outside the image."""
    if dtype_name == "bfloat16" and ml_dtypes is None:
        pytest.skip("bfloat16 needs ml_dtypes")
    dtype = np.dtype(ml_dtypes.bfloat16) if dtype_name == "bfloat16" else np.dtype(dtype_name)
    rng = np.random.default_rng(seed)
    arrays = {
        "input": rng.standard_normal((1, channels, size, size)),
        "offset": rng.uniform(-2, 2, (1, 18, size, size)),
        "weight": rng.standard_normal((out_channels, channels, 3, 3)),
        "bias": rng.standard_normal(out_channels),
        "mask": rng.uniform(0, 1, (1, 9, size, size)),
    }
    return dict({k: v.astype(dtype) for k, v in arrays.items()}, padding=1)


@functools.cache
def _measured(dtype: str, algorithm: str, tf32: bool = True) -> tuple[tx.LaunchStats, ...]:
    """Every launch of a forward and a backward call, merged per kernel."""
    args = _arguments(dtype)
    stats = [*tx.account_call(_library(), "forward", args, algorithm, tf32),
             *tx.account_call(_library(), "backward", args, algorithm, tf32)]
    return tuple(tx.merge(stats))


def _xfail(measured: str):
    return pytest.mark.xfail(strict=True, reason=f"measured {measured}")


# ---------------------------------------------------------------------------
# The counter, by hand.

# (V floats per lane, global stride, shared stride, per-lane atomics) ->
# (load sectors, load ideal, atomic sectors over 4 requests, shared wavefronts, worst phase)
HAND_COUNTED = {
    "4 B coalesced": ((1, 1, 1, 0), (4, 4, 16, 1, 1)),
    "4 B stride 2": ((1, 2, 2, 0), (8, 4, 16, 2, 2)),
    "4 B broadcast": ((1, 0, 0, 0), (1, 1, 16, 1, 1)),
    "4 B shared stride 32": ((1, 1, 32, 0), (4, 4, 16, 32, 32)),
    "4 B atomics of a lane's own 4 floats": ((1, 1, 1, 1), (4, 4, 64, 1, 1)),
    # 8 bytes: two half-warp phases of one wavefront each when conflict-free.
    "8 B coalesced": ((2, 1, 1, 0), (8, 8, 16, 2, 1)),
    "8 B stride 2": ((2, 2, 2, 0), (16, 8, 16, 4, 2)),
    "8 B shared stride 32": ((2, 1, 32, 0), (8, 8, 16, 32, 16)),
    # 16 bytes: four quarter-warp phases.
    "16 B coalesced": ((4, 1, 1, 0), (16, 16, 16, 4, 1)),
    "16 B stride 2": ((4, 2, 2, 0), (32, 16, 16, 8, 2)),
    "16 B broadcast": ((4, 0, 0, 0), (1, 1, 16, 4, 1)),
    "16 B shared stride 32": ((4, 1, 32, 0), (16, 16, 16, 32, 8)),
}


@pytest.mark.parametrize("case", HAND_COUNTED)
def test_counts_worked_out_by_hand(cooperative, case):
    """memory_pattern<V>: one warp, each access once (atomics four times);
    lane l at vector l * stride. 32 lanes x 4 bytes fill 4 sectors, at a
    stride of 2 they touch 8; shared words l * stride fall in bank
    (l * stride) % 32 (stride 32: every lane in bank 0); a broadcast is one
    sector and one wavefront."""
    (vector, stride, shared_stride, per_lane), expected = HAND_COUNTED[case]
    values = np.arange(32 * 32 * 4, dtype=np.float32)
    out = np.zeros((32 * 32 + 32) * vector, np.float32)
    sums = np.zeros(128, np.float32)
    stats = cooperative.launch(f"memory_pattern<{vector}>", Launch((1, 1, 1), (32, 1, 1)),
                               [values, out, sums, np.int32(stride), np.int32(shared_stride), np.int32(per_lane)],
                               stats=True)
    load, = stats.select("global", "load")
    store = min(stats.select("global", "store"), key=lambda s: s.line)  # out[l * stride], not the read-back
    atomic, = stats.select("global", "atomic")
    shared_store, = stats.select("shared", "store")
    shared_load, = stats.select("shared", "load")
    assert (load.requests, load.width, load.lanes, load.bytes) == (1, 4 * vector, 32, 4 * vector * (32 if stride else 1))
    assert (load.sectors, load.ideal_sectors) == expected[:2]
    assert (store.sectors, store.ideal_sectors) == expected[:2]
    assert (atomic.requests, atomic.sectors) == (4, expected[2])
    assert (shared_load.wavefronts, shared_load.worst) == expected[3:]
    phases = {1: 1, 2: 2, 4: 4}[vector]  # a warp, half-warps, quarter-warps
    assert shared_load.ideal_wavefronts == shared_store.ideal_wavefronts == phases
    # The store goes to distinct elements (stride 1 where the load broadcasts).
    assert (shared_store.wavefronts, shared_store.worst) == ((phases, 1) if shared_stride == 0 else expected[3:])
    # What moved: out[l * stride] = in[l * stride], and back from shared memory.
    lanes = np.arange(32) * stride
    moved = out.reshape(-1, vector)
    np.testing.assert_array_equal(moved[lanes], values.reshape(-1, vector)[lanes])
    np.testing.assert_array_equal(moved[32 * 32:], values.reshape(-1, vector)[lanes])
    assert sums.sum() == 128


def test_accounting_is_opt_in_and_changes_no_result(library):
    """Without stats a launch returns None; with them the kernel computes the same bytes."""
    args = _arguments("float16")
    geom = validate(**args)
    outputs = []
    for stats in (False, True):
        engine = harness.EmulatedEngine(library, stats=stats)
        outputs.append(im2col_gemm.im2col_public(engine, geom, args["input"], args["offset"], args["mask"]))
        assert len(engine.stats) == (len(engine.launches) if stats else 0)
    assert outputs[0].tobytes() == outputs[1].tobytes()
    values = np.zeros(8, np.float32)
    assert library.launch("to_channels_last<float, int>", Launch((1, 1, 1), (32, 1, 1)),
                          [values, np.int32(8), np.int32(2), np.int32(4), values.copy()]) is None


def test_a_whole_call_is_accounted_and_merged(library):
    """The engine accounts every launch of an algorithm call; merging sums
    them per kernel; the layout passes write whole sectors."""
    args = _arguments("float32")
    geom = validate(**args)
    engine = harness.EmulatedEngine(library, stats=True)
    with cudcn.algorithm("im2col"):
        for _ in range(2):
            im2col_gemm.forward(engine, geom, *(args[k] for k in ("input", "offset", "weight", "bias", "mask")))
    assert [s.kernel for s in engine.stats] == [name for name, _ in engine.launches]
    merged = tx.merge(engine.stats)
    assert len(merged) == len(engine.launches) // 2
    for once, twice in zip(engine.stats, merged):
        assert [2 * s.requests for s in once.sites] == [s.requests for s in twice.sites]
    layout = tx.launches_of(merged, "layout_copies")  # the input channels-last, the weight matrix, the bias
    store = layout.total("global", "store")
    assert store.sectors == store.ideal_sectors <= 4 * store.requests  # at most 32 lanes x 4 bytes
    assert "deform_im2col<float, float, int>" in tx.table(merged)


def test_report_script_prints_the_table_and_the_budgets(library, capsys):
    """tools/memory_report.py at its default geometry (this file's): the
    col2im sites and its budget lines, with the values counted here."""
    path = Path(__file__).resolve().parents[1] / "tools" / "memory_report.py"
    spec = importlib.util.spec_from_file_location("memory_report", path)
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    assert report.main(["--dtype", "float32", "--algorithm", "im2col", "--kernel", "deform_col2im<"]) == 0
    out = capsys.readouterr().out
    launch = tx.launches_of(_measured("float32", "im2col"), "deform_col2im")
    atomic, = launch.select("global", "atomic")
    assert re.search(rf"{re.escape(atomic.site)}\s+gmem atomic\s+4\s+{atomic.requests}\s", out), out
    sectors = tx.atomic_sectors(launch)
    verdict = "ok" if sectors <= tx.ATOMIC_SECTORS else "OVER BUDGET"
    assert re.search(rf"atomic sectors/request\s+{sectors:.2f} \(budget 4\)\s+{verdict}", out), out
    assert "deform_col2im_coord" not in out and "counted by the emulator, not measured" in out


# ---------------------------------------------------------------------------
# Budgets.

# col2im's atomics: a lane owns V consecutive channels, so one warp request
# touches a sector per one or two lanes.
COL2IM_ATOMICS = {
    "float32": "12.9 sectors per request (16 at most): a lane owns 4 consecutive channels",
    "float16": "22.7 sectors per request (32 at most): a lane owns 8 consecutive channels",
    "bfloat16": "22.6 sectors per request (32 at most): a lane owns 8 consecutive channels",
}


@pytest.mark.parametrize("dtype", [pytest.param(d, marks=_xfail(m)) for d, m in COL2IM_ATOMICS.items()])
def test_col2im_atomics_are_coalesced(library, dtype):
    """float32 atomics (the accumulator of every dtype but float64) at most 4 sectors per warp request."""
    launch = tx.launches_of(_measured(dtype, "im2col"), "deform_col2im")
    assert tx.atomic_sectors(launch) <= tx.ATOMIC_SECTORS, tx.table([launch])


# col2im reads each point's column block once (im2col and col2im_coord read
# four corners besides), so there its offsets and mask weigh most: 16-bit
# types give a point 8 lanes, and a warp's 4 points read 4 sectors apart
# (offsets are (batch, 2*K, Ho, Wo), the points of a warp consecutive kernel points).
SAMPLING_LOADS = {
    ("float16", "deform_col2im"): "1.51x the ideal sectors: offset and mask loads 3.4-4 sectors per request, ideal 1",
    ("bfloat16", "deform_col2im"): "1.51x the ideal sectors: offset and mask loads 3.4-4 sectors per request, ideal 1",
}


@pytest.mark.parametrize("dtype, kernel", [
    pytest.param(d, k, marks=_xfail(SAMPLING_LOADS[d, k])) if (d, k) in SAMPLING_LOADS else (d, k)
    for d in ("float32", "float16", "bfloat16", "float64")
    for k in ("deform_im2col", "deform_col2im", "deform_col2im_coord")
])
def test_sampling_loads_are_near_ideal(library, dtype, kernel):
    """All global loads of a sampling kernel: sectors within 1.5x of the ideal
    (the offsets and mask, read a point per lane group, are a small part)."""
    launch = tx.launches_of(_measured(dtype, "im2col"), kernel)
    assert tx.load_excess(launch) <= tx.LOAD_EXCESS, tx.table([launch])


FUSED = ["deform_fused_forward", "fused_backward_data", "fused_backward_weight"]
POLICIES = {"f16": ("float16", True), "bf16": ("bfloat16", True), "tf32": ("float32", True), "fma": ("float32", False)}
# Tile stores: rows of 20 (16-bit) or 36 (32-bit) words, a thread's half row
# of 16 channels word by word: four rows of a warp share each bank. The
# backward's column gradients (a row of 65 words per pixel) likewise.
STORE_CONFLICTS = {
    "deform_fused_forward": "4-way A- and B-tile stores (dcn_fused_forward.cu gather_a_row, load_b_row)",
    "fused_backward_data": "4-way A- and B-tile stores and column-gradient stores (stride 65)",
}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("kernel", [pytest.param(k, marks=_xfail(STORE_CONFLICTS[k])) if k in STORE_CONFLICTS else k
                                    for k in FUSED])
def test_fused_tile_stores_conflict_at_most_2_way(library, kernel, policy):
    dtype, tf32 = POLICIES[policy]
    launch = tx.launches_of(_measured(dtype, "fused", tf32), kernel)
    assert tx.store_conflict(launch) <= tx.STORE_CONFLICT, tx.table([launch])


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("kernel", FUSED)
def test_fused_fragment_loads_are_conflict_free(library, kernel, policy):
    dtype, tf32 = POLICIES[policy]
    launch = tx.launches_of(_measured(dtype, "fused", tf32), kernel)
    assert tx.fragment_conflict(launch) == tx.FRAGMENT_CONFLICT, tx.table([launch])


# ---------------------------------------------------------------------------
# Planted regressions: each copy still computes the right result, and the
# budget it breaks flags it.

#: The sampling kernels' channel walk: lanes interleaved over vectors of V channels.
INTERLEAVED = "    for (int c = lane % group_lanes * V; c < point_channels; c += group_lanes * V) {\n"
#: Planted: each lane walks a run of consecutive vectors of its own (lane-major).
LANE_MAJOR = (
    "    const int run = (point_channels + group_lanes * V - 1) / (group_lanes * V) * V;\n"
    "    for (int c = lane % group_lanes * run; c < point_channels && c < (lane % group_lanes + 1) * run;\n"
    "         c += V) {\n"
)


def _planted_library(tmp_path, source: str, edits: list[tuple[str, str]], names: list[str]) -> harness.Library:
    """A changed copy of kernels/<source> (each edit's text found exactly once), built with names."""
    _compiler()
    text = (cuda_kernels.kernel_dir() / source).read_text()
    for old, new in edits:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    (tmp_path / source).write_text(text)
    sources = [tmp_path / source, cuda_kernels.kernel_dir() / "dcn_layout.cu"]
    return harness.build(names, sources)


def _sampling_names(kernel: str, dtype: str) -> list[str]:
    return [cuda_kernels.name_expression(k, dtype, "int") for k in (kernel, "to_channels_last", "from_channels_last")]


@pytest.mark.parametrize("planted", [False, True], ids=["as it is", "channels read lane-major"])
def test_planted_scattered_channel_loads_are_flagged(tmp_path, planted):
    """im2col with 256 channels in float32 (a lane per 4-channel vector,
    each lane two vectors): read lane-major, a warp's lanes stride by 32
    bytes and each vector load touches twice its sectors."""
    edits = [(INTERLEAVED, LANE_MAJOR)] if planted else []
    library = _planted_library(tmp_path, "dcn_im2col.cu", edits, _sampling_names("deform_im2col", "float32"))
    args = _arguments("float32", channels=256, size=6)
    geom = validate(**args)
    engine = harness.EmulatedEngine(library, stats=True)
    columns = im2col_gemm.im2col_public(engine, geom, args["input"], args["offset"], args["mask"])
    assert_close(columns, numpy_backend.im2col(geom, args["input"], args["offset"], args["mask"]), "float32")
    excess = tx.load_excess(tx.launches_of(engine.stats, "deform_im2col"))
    assert (excess > tx.LOAD_EXCESS) == planted, excess


def test_planted_stride_65_shared_store_is_flagged(tmp_path):
    """The fused forward's output tile with rows of 65 words instead of 68:
    a warp's accumulator stores (8 pixels x 4 channel pairs) fall up to 4 in
    a bank; as it is they are conflict-free. The output is the same bytes."""
    names = [cuda_kernels.name_expression(k, "float16", "int") for k in ("deform_fused_forward", "to_channels_last")]
    args = _arguments("float16", channels=32, out_channels=32, size=6)
    geom = validate(**args)
    worst, outputs = {}, {}
    for planted, words in ((False, 4), (True, 1)):
        edits = [("static constexpr int kOutRowWords = FusedTile::kPixels + 4;",
                  f"static constexpr int kOutRowWords = FusedTile::kPixels + {words};")]
        library = _planted_library(tmp_path, "dcn_fused_forward.cu", edits, names)
        engine = harness.EmulatedEngine(library, stats=True)
        outputs[planted] = fused.forward(engine, geom, *(args[k] for k in ("input", "offset", "weight", "bias", "mask")))
        launch = tx.launches_of(engine.stats, "deform_fused_forward")
        epilogue = [s for s in launch.select("shared", "store") if s.file == "dcn_fused_forward.cu"]
        worst[planted] = max(s.worst for s in epilogue)
    assert outputs[False].tobytes() == outputs[True].tobytes()
    assert worst == {False: 1, True: 4}
    assert worst[True] > tx.STORE_CONFLICT


@pytest.mark.parametrize("planted", [False, True], ids=["a channel per lane", "a lane's own consecutive channels"])
def test_planted_per_lane_vector_atomics_are_flagged(tmp_path, planted):
    """col2im as it is breaks the atomic budget (test_col2im_atomics_are_coalesced);
    a copy that moves one channel per lane block (V = 1, lanes interleaved
    over channels) stands in for a coalesced one and meets it. Planted on
    that copy: each lane adds a run of consecutive channels of its own, as
    a per-lane vector would, and the warp's atomics scatter again."""
    edits = [("constexpr int V = ChannelsPerLane<T, TCol>::value;", "constexpr int V = 1;")]
    if planted:
        edits.append((INTERLEAVED, LANE_MAJOR))
    library = _planted_library(tmp_path, "dcn_col2im.cu", edits, _sampling_names("deform_col2im", "float32"))
    args = _arguments("float32", size=6)
    geom = validate(**args)
    columns = np.random.default_rng(1).standard_normal(geom.columns_shape).astype(np.float32)
    engine = harness.EmulatedEngine(library, stats=True)
    grad = im2col_gemm.col2im_public(engine, geom, columns, args["offset"], args["mask"])
    assert_close(grad, numpy_backend.col2im(geom, columns, args["offset"], args["mask"]), "float32")
    sectors = tx.atomic_sectors(tx.launches_of(engine.stats, "deform_col2im"))
    assert (sectors > tx.ATOMIC_SECTORS) == planted, sectors
