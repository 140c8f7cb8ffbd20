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
  row stride of 65 words, atomics of a lane's own consecutive channels
  (scalar, and sm_90's vectors), layout tiles loaded down their columns,
  layout tiles without padding, layout copies without tiles, the fused
  forward's two threads of a pixel reading 16-byte chunks a sector apart.

The budgets, at a representative small geometry (64 input and 64 output
channels, one offset group, 8 x 8 pixels, 3 x 3 kernel; every dtype and
operand policy; the sampling kernels on the portable paths and on sm_90's,
``harness.build(arch=...)``): col2im's atomics at most 4 sectors per warp
request and 4 bytes a lane adds; the sampling kernels' loads within 1.5x of
the ideal sectors; the layout passes' global accesses at the ideal sectors
(but the weight gradient's 2-byte stores, within 1.5x) and their shared
memory conflict-free; the fused kernels' shared stores at most 2-way
conflicts, their fragment loads (ldmatrix) conflict-free, and the fused
forward's 16-byte gathers whole sectors. A kernel that breaks one today is
marked xfail(strict) with what was measured, so that a fix shows up as an
unexpected pass.
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
from cudcn.backends.cuda import fused, im2col_gemm, launchers
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
def _library(arch: int = 0) -> harness.Library:
    return harness.build(arch=arch)


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
def _measured(dtype: str, algorithm: str, tf32: bool = True, arch: int = 0) -> tuple[tx.LaunchStats, ...]:
    """Every launch of a forward and a backward call, merged per kernel, on
    the code paths of ``arch`` (harness.ARCHS)."""
    args = _arguments(dtype)
    stats = [*tx.account_call(_library(arch), "forward", args, algorithm, tf32),
             *tx.account_call(_library(arch), "backward", args, algorithm, tf32)]
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
    assert re.search(rf"atomic sectors/request/4B\s+{sectors:.2f} \(budget 4\)\s+{verdict}", out), out
    assert "deform_col2im_coord" not in out and "counted by the emulator, not measured" in out


# ---------------------------------------------------------------------------
# Budgets.

# col2im's atomics: lanes interleaved over a point's channels (blocks of 4
# floats by one vector red on sm_90, single channels elsewhere), so that a
# warp request adds to consecutive addresses. Before, a lane owned V
# consecutive channels and one request touched a sector per one or two
# lanes: 12.9 sectors per float32 request, 22.7 (float16) and 22.6
# (bfloat16) per float32-accumulator request, 16 per float64 one (8 ideal).
ARCHS = pytest.mark.parametrize("arch", harness.ARCHS, ids=[f"sm_{a}" if a else "portable" for a in harness.ARCHS])


@ARCHS
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_col2im_atomics_are_coalesced(dtype, arch):
    """At most 4 sectors per warp request and 4 bytes a lane adds (float32:
    32 lanes x 4 bytes in 4 sectors; float64 8 sectors; sm_90's 16-byte
    vectors 16), i.e. each request in the fewest sectors its bytes fill;
    the vector red where it applies (float32 accumulators on sm_90)."""
    _compiler()
    launch = tx.launches_of(_measured(dtype, "im2col", arch=arch), "deform_col2im")
    assert tx.atomic_sectors(launch) <= tx.ATOMIC_SECTORS, tx.table([launch])
    widths = {s.width for s in launch.select("global", "atomic")}
    assert widths == ({8} if dtype == "float64" else {16} if arch >= 90 else {4}), tx.table([launch])


# col2im reads each point's column block once (im2col and col2im_coord read
# four corners besides), so there its offsets and mask weigh most: they are
# read a point per lane group, and a warp's points are consecutive kernel
# points, 2*Ho*Wo apart. Before the atomics were coalesced, 16-bit types gave
# a point 8 lanes, 4 points a warp: 4 sectors a request, 1.51x the ideal
# over all loads; with 16 lanes a point (blocks of the float32 accumulator)
# it is 2.
@ARCHS
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
@pytest.mark.parametrize("kernel", ["deform_im2col", "deform_col2im", "deform_col2im_coord"])
def test_sampling_loads_are_near_ideal(kernel, dtype, arch):
    """All global loads of a sampling kernel: sectors within 1.5x of the ideal
    (the offsets and mask, read a point per lane group, are a small part)."""
    _compiler()
    launch = tx.launches_of(_measured(dtype, "im2col", arch=arch), kernel)
    assert tx.load_excess(launch) <= tx.LOAD_EXCESS, tx.table([launch])


def _layout_launches(library: harness.Library, kernel: str, args: dict) -> list[tx.LaunchStats]:
    """The accounted launches of one layout kernel on the arrays of ``args``
    (checked against NumPy): to_channels_last and from_channels_last as
    the column-free algorithm and the public im2col and col2im run them;
    layout_copies with the activations' copies as the im2col path launches
    them (the input channels-last with grad_output as GEMM rows and the
    zeroed accumulator; the accumulator back to the input gradient)."""
    geom = validate(**args)
    engine = harness.EmulatedEngine(library, stats=True)
    n, channels, pixels = geom.batch, geom.in_channels, geom.height * geom.width
    x = args["input"]
    transposed = np.ascontiguousarray(x.reshape(n, channels, pixels).transpose(0, 2, 1))
    accum_dtype = np.float64 if x.dtype == np.float64 else np.float32
    accum = np.random.default_rng(1).standard_normal((n, pixels, channels)).astype(accum_dtype)
    back = accum.transpose(0, 2, 1).reshape(x.shape).astype(x.dtype)
    if kernel == "to_channels_last":
        assert launchers.channels_last(engine, geom, x).tobytes() == transposed.tobytes()
    elif kernel == "from_channels_last":
        out = np.full(x.shape, np.nan, x.dtype)
        engine.launch("from_channels_last", geom.dtype_name, "int",
                      launchers.layout_launch(engine, kernel, n, channels, pixels),
                      [accum, np.int32(accum.size), np.int32(channels), np.int32(pixels), out])
        assert out.tobytes() == back.tobytes()
    else:
        grad_output = np.random.default_rng(2).standard_normal(
            (n, geom.out_channels, geom.out_h, geom.out_w)).astype(x.dtype)
        pixels_out = np.full((n, pixels, channels), np.nan, x.dtype)
        rows = np.full((1, n * geom.out_pixels, geom.out_channels), np.nan, x.dtype)
        zeroed = np.full((n, pixels, channels), np.nan, accum_dtype)
        launchers.layout_copies(engine, geom, [(x, launchers.channels_last_view(geom, n), pixels_out),
                                               (grad_output, launchers.rows_view(geom, n), rows)], zero=zeroed)
        grad_input = np.full(x.shape, np.nan, x.dtype)
        launchers.layout_copies(engine, geom, [(accum, launchers.from_channels_last_view(geom, n), grad_input)],
                                from_accumulator=True)
        assert pixels_out.tobytes() == transposed.tobytes() and grad_input.tobytes() == back.tobytes()
        assert rows.tobytes() == np.ascontiguousarray(
            grad_output.reshape(n, geom.out_channels, -1).transpose(0, 2, 1)).tobytes()
        assert not zeroed.any()
    return [launch for launch in tx.merge(engine.stats) if launch.kernel.split("<")[0] == kernel]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
@pytest.mark.parametrize("kernel", ["to_channels_last", "from_channels_last", "layout_copies"])
def test_layout_passes_are_coalesced_and_conflict_free(library, kernel, dtype):
    """The layout passes move tiles through shared memory: at 64 channels of
    8 x 8 pixels (whole tiles) global loads and stores take the fewest
    sectors their bytes fill; at 40 channels of 6 x 6 (partial tiles, rows
    of 36 that start mid-sector) within 1.5x of that; shared memory without
    bank conflicts in both. Element by element, a transpose read in the
    destination's order touched a sector per lane (8-16x the ideal).
    layout_copies takes its transposes (the activations': the input,
    grad_output, the input gradient) through the same tiles, and the zero
    fill beside them in the same launch."""
    for channels, size, excess in ((64, 8, 1.0), (40, 6, tx.LOAD_EXCESS)):
        args = _arguments(dtype, channels=channels, size=size)
        launches = _layout_launches(library, kernel, args)
        assert len(launches) == (2 if kernel == "layout_copies" and dtype in ("float16", "bfloat16") else 1)
        for launch in launches:
            for op in ("load", "store"):
                total = launch.total("global", op)
                assert total.sectors <= excess * total.ideal_sectors, tx.table([launch])
                assert launch.total("shared", op).worst == 1, tx.table([launch])


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_layout_copies_of_a_call_are_near_ideal(dtype):
    """Every layout_copies launch of an im2col forward and backward at 64
    channels of 8 x 8, the weight's and the bias's copies besides the
    activations' (the weight matrix, the bias broadcast, the weight and
    bias gradients): loads at the ideal sectors, shared memory
    conflict-free, stores at the ideal but for one site: the weight
    gradient rounded to a 2-byte type, whose 3 x 3 kernel points (18 bytes)
    a warp request writes per channel, within 1.5x."""
    _compiler()
    launches = [launch for launch in _measured(dtype, "im2col") if launch.kernel.startswith("layout_copies<")]
    assert len(launches) == (2 if dtype in ("float16", "bfloat16") else 1)
    over = []
    for launch in launches:
        assert launch.total("global", "load").sectors == launch.total("global", "load").ideal_sectors, \
            tx.table([launch])
        assert launch.total("shared").worst == 1, tx.table([launch])
        for site in launch.select("global", "store"):
            assert site.sectors <= tx.LOAD_EXCESS * site.ideal_sectors, tx.table([launch])
            if site.sectors > site.ideal_sectors:
                over.append((launch.kernel.split(", ")[0], site.width))
    assert over == ([] if dtype in ("float32", "float64") else [("layout_copies<float", 2)]), over


FUSED = ["deform_fused_forward", "fused_backward_data", "fused_backward_weight"]
POLICIES = {"f16": ("float16", True), "bf16": ("bfloat16", True), "tf32": ("float32", True), "fma": ("float32", False)}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("kernel", FUSED)
def test_fused_tile_stores_conflict_at_most_2_way(library, kernel, policy):
    """Swizzled 16-byte tile stores, the staged corners, the skewed column
    gradients, the weight gradient's word (pair) stores: every shared store."""
    dtype, tf32 = POLICIES[policy]
    launch = tx.launches_of(_measured(dtype, "fused", tf32), kernel)
    assert tx.store_conflict(launch) <= tx.STORE_CONFLICT, tx.table([launch])


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("kernel", FUSED)
def test_fused_fragment_loads_are_conflict_free(library, kernel, policy):
    """ldmatrix (a matrix a phase) for the tensor-core policies, scalar word loads for FMA."""
    dtype, tf32 = POLICIES[policy]
    launch = tx.launches_of(_measured(dtype, "fused", tf32), kernel)
    assert tx.fragment_conflict(launch) == tx.FRAGMENT_CONFLICT, tx.table([launch])
    loads = [s for s in launch.select("shared", "load") if s.file in tx.FRAGMENT_FILES]
    assert {s.width for s in loads} == ({4} if policy == "fma" else {16}), tx.table([launch])


@pytest.mark.parametrize("policy", POLICIES)
def test_fused_forward_gathers_fill_whole_sectors(library, policy):
    """The forward's 16-byte loads (corner chunks and weights, by cp.async):
    the two threads of a row read neighbouring chunks in each request, so
    the sectors are the ideal ones."""
    dtype, tf32 = POLICIES[policy]
    launch = tx.launches_of(_measured(dtype, "fused", tf32), "deform_fused_forward")
    gathers = [s for s in launch.select("global", "load") if s.width == 16]
    assert gathers and all(s.sectors == s.ideal_sectors for s in gathers), tx.table([launch])


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


def _planted_library(tmp_path, source: str, edits: list[tuple[str, str]], names: list[str],
                     arch: int = 0) -> harness.Library:
    """A changed copy of kernels/<source> (each edit's text found exactly once), built with names."""
    _compiler()
    text = (cuda_kernels.kernel_dir() / source).read_text()
    for old, new in edits:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    (tmp_path / source).write_text(text)
    layout = [] if source == "dcn_layout.cu" else [cuda_kernels.kernel_dir() / "dcn_layout.cu"]
    return harness.build(names, [tmp_path / source, *layout], arch=arch)


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


#: col2im's channel walk: lanes interleaved over blocks of `block` channels.
COL2IM_INTERLEAVED = "    for (int c = lane % group_lanes * block; c < point_channels; c += group_lanes * block) {\n"


@ARCHS
@pytest.mark.parametrize("planted", [False, True], ids=["as it is", "a lane's own consecutive channels"])
def test_planted_per_lane_vector_atomics_are_flagged(tmp_path, planted, arch):
    """col2im at 256 float32 channels (32 lanes a point) meets the atomic
    budget. Planted: each lane adds a run of consecutive channels of its own
    (8: two vectors of 4 on sm_90, eight scalars elsewhere), as the kernel
    did before its lanes were interleaved, and the warp's atomics scatter
    again. The gradient is right either way."""
    edits = [(COL2IM_INTERLEAVED, LANE_MAJOR.replace("V", "block"))] if planted else []
    library = _planted_library(tmp_path, "dcn_col2im.cu", edits, _sampling_names("deform_col2im", "float32"), arch)
    args = _arguments("float32", channels=256, size=4)
    geom = validate(**args)
    columns = np.random.default_rng(1).standard_normal(geom.columns_shape).astype(np.float32)
    engine = harness.EmulatedEngine(library, stats=True)
    grad = im2col_gemm.col2im_public(engine, geom, columns, args["offset"], args["mask"])
    assert_close(grad, numpy_backend.col2im(geom, columns, args["offset"], args["mask"]), "float32")
    sectors = tx.atomic_sectors(tx.launches_of(engine.stats, "deform_col2im"))
    assert (sectors > tx.ATOMIC_SECTORS) == planted, sectors


#: The layout passes' tile loads: lane j reads element j of a tile row.
TILE_ROW_LOAD = (
    "  const int mine = c0 + lane, mine_carry = mine / copy.size_c;\n"
    "  const Index source =\n"
    "      a * copy.from_a + (b0 + mine_carry) * copy.from_b + Index(mine - mine_carry * copy.size_c) * copy.from_c;\n"
    "  for (int r = warp; r < kLayoutTile; r += warps)\n"
    "    if (first + lane < run && d0 + r < copy.size_d)\n"
    "      tile[r * kRow + lane] = dcn_load(src, source + Index(d0 + r) * copy.from_d);\n"
)
#: Planted: lane j reads element j of a tile column (the source's strided axis).
TILE_COLUMN_LOAD = (
    "  for (int r = warp; r < kLayoutTile; r += warps) {\n"
    "    const int position = c0 + r, carry = position / copy.size_c;\n"
    "    const Index source = a * copy.from_a + (b0 + carry) * copy.from_b +\n"
    "                         Index(position - carry * copy.size_c) * copy.from_c;\n"
    "    if (first + r < run && d0 + lane < copy.size_d)\n"
    "      tile[lane * kRow + r] = dcn_load(src, source + Index(d0 + lane) * copy.from_d);\n"
    "  }\n"
)
#: Planted: tile rows of 32 elements, no padding.
UNPADDED = ("static constexpr int value = kLayoutTile + (sizeof(TTile) == 2 ? 2 : 1);",
            "static constexpr int value = kLayoutTile;")
#: Planted: every copy walked element by element in the destination's order
#: (as layout_copies did before its transposes took tiles).
UNTILED = ("  if (copy.tiled) {\n    copy_tile(", "  if (false) {\n    copy_tile(")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("planted", [None, "column loads", "unpadded rows", "element by element"])
@pytest.mark.parametrize("kernel", ["to_channels_last", "layout_copies"])
def test_planted_layout_regressions_are_flagged(tmp_path, kernel, planted, dtype):
    """The input channels-last at 64 channels of 8 x 8, by to_channels_last
    and by layout_copies: as it is, whole sectors and no bank conflicts;
    tiles loaded down their columns, or no tiles at all, its loads take a
    sector per lane; rows of 32 without padding, reading a tile column puts
    its lanes in one bank (16 for 2-byte elements, two to a word). The
    channels-last input is right in every case."""
    edits = {None: [], "column loads": [(TILE_ROW_LOAD, TILE_COLUMN_LOAD)], "unpadded rows": [UNPADDED],
             "element by element": [UNTILED]}[planted]
    library = _planted_library(tmp_path, "dcn_layout.cu", edits, [cuda_kernels.name_expression(kernel, dtype, "int")])
    args = _arguments(dtype, channels=64, size=8)
    geom = validate(**args)
    engine = harness.EmulatedEngine(library, stats=True)
    if kernel == "to_channels_last":
        pixels = launchers.channels_last(engine, geom, args["input"])
    else:
        pixels = np.full((1, 64, 64), np.nan, args["input"].dtype)
        launchers.layout_copies(engine, geom, [(args["input"], launchers.channels_last_view(geom, 1), pixels)])
    assert pixels.tobytes() == np.ascontiguousarray(args["input"].reshape(1, 64, 64).transpose(0, 2, 1)).tobytes()
    launch = tx.launches_of(engine.stats, kernel)
    excess = tx.load_excess(launch)
    conflict = max((site.worst for site in launch.select("shared", "load")), default=1)  # none without tiles
    assert (excess > tx.LOAD_EXCESS, conflict > 1) == (planted in ("column loads", "element by element"),
                                                      planted == "unpadded rows"), tx.table([launch])
    if planted == "unpadded rows":
        assert conflict == (32 if dtype == "float32" else 16)


@pytest.mark.parametrize("planted", [False, True], ids=["as it is", "a pixel's chunks a sector apart"])
def test_planted_half_sector_gathers_are_flagged(tmp_path, planted):
    """The fused forward with a thread's chunks 2p and 2p + 1 of its row
    (instead of p and p + 2): the two threads of a pixel then read 16 bytes
    32 bytes apart in each request, each half of a sector. The same output."""
    edits = []
    if planted:
        edits = [("      const int c = part + 2 * j, first = c * V;", "      const int c = 2 * part + j, first = c * V;"),
                 ("      fused_store_chunk(a_tile, row, part + 2 * j, pack_chunk<Op>(values));",
                  "      fused_store_chunk(a_tile, row, 2 * part + j, pack_chunk<Op>(values));")]
    names = [cuda_kernels.name_expression(k, "float16", "int") for k in ("deform_fused_forward", "to_channels_last")]
    library = _planted_library(tmp_path, "dcn_fused_forward.cu", edits, names)
    args = _arguments("float16", channels=32, out_channels=16, size=6)
    geom = validate(**args)
    engine = harness.EmulatedEngine(library, stats=True)
    out = fused.forward(engine, geom, *(args[k] for k in ("input", "offset", "weight", "bias", "mask")))
    reference = numpy_backend.forward(geom, *(args[k] for k in ("input", "offset", "weight", "bias", "mask")))
    assert_close(out, reference, "float16")
    gathers = [s for s in tx.launches_of(engine.stats, "deform_fused_forward").select("global", "load") if s.width == 16]
    excess = sum(s.sectors for s in gathers) / sum(s.ideal_sectors for s in gathers)
    assert (excess > 1.5) == planted, excess
