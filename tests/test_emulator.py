"""The cooperative emulator itself (tests/emulation/emulate.h), on small kernels.

Each CUDA feature it emulates is checked against NumPy or against CUDA's
documented semantics, written out here a second time (shuffle lanes, vote
results, the PTX fragment layouts of the MMA wrappers); and each planted bug
-- a missing __syncthreads, a missing __syncwarp, a wrong shuffle lane, an
MMA fragment mapped wrongly, an ldmatrix row or transposition wrong, a
shared index off by one, an asynchronous copy read before its wait,
collectives and barriers used as CUDA forbids -- must be caught, by the emulator or by the
comparison it makes possible. The kernels are in
tests/emulation/cooperative_kernels.cu.

The tests of what kernels compute (not of what the emulator reports) also
run the same kernels on a GPU through CuPy when one is present (marked gpu):
there they check the emulator's semantics against the hardware.
"""

from __future__ import annotations

import numpy as np
import pytest

from cudcn.backends.cuda import kernels as cuda_kernels
from cudcn.backends.cuda.engine import Launch
from emulation import harness
from emulation.cases import ml_dtypes

pytestmark = pytest.mark.emulated


class GpuKernels:
    """The cooperative test kernels through cupy.RawModule, with Library's launch."""

    def __init__(self) -> None:
        import cupy

        self.cupy = cupy
        source = cuda_kernels.translation_unit([harness.COOPERATIVE_SOURCE], cuda_kernels.kernel_dir())
        self.module = cupy.RawModule(code=source, options=cuda_kernels.MODULE_OPTIONS,
                                     name_expressions=list(harness.COOPERATIVE_NAMES))
        self.capability = int(cupy.cuda.Device().compute_capability)

    def launch(self, name, launch, args) -> None:
        if "mma" in name and not name.endswith("<0>") and self.capability < 80:
            pytest.skip("bfloat16 and tf32 MMAs need sm_80")
        device = [self.cupy.asarray(a) if isinstance(a, np.ndarray) else a for a in args]
        function = self.module.get_function(name)
        function(launch.grid, launch.block, tuple(device), shared_mem=launch.shared_bytes)
        for host, copy in zip(args, device):
            if isinstance(host, np.ndarray):
                host[...] = copy.get()


def _emulator() -> harness.Library:
    if harness.compiler() is None:
        pytest.skip("no C++ compiler for the kernel emulation")
    return harness.build(harness.COOPERATIVE_NAMES, [harness.COOPERATIVE_SOURCE])


@pytest.fixture(scope="module")
def lib():
    """The emulator: for the tests of what it reports."""
    return _emulator()


@pytest.fixture(scope="module", params=["emulator", pytest.param("gpu", marks=pytest.mark.gpu)])
def target(request):
    """Where kernels run: the emulator, and a GPU when there is one."""
    return _emulator() if request.param == "emulator" else GpuKernels()


def run(lib, name, grid, block, *args, shared_bytes=0):
    lib.launch(name, Launch(grid, block, shared_bytes), list(args))


# ---------------------------------------------------------------------------
# Threads, blocks and shared memory.


@pytest.mark.parametrize("grid, block", [((2, 3, 2), (4, 3, 5)), ((3, 1, 1), (32, 2, 1)), ((1, 2, 1), (7, 1, 1))])
def test_grid_and_block_in_x_y_z(target, grid, block):
    threads = int(np.prod(block))
    out = np.full((int(np.prod(grid)) * threads, 8), -9, np.int32)
    run(target, "thread_coordinates", grid, block, out)
    bz, by, bx, tz, ty, tx = np.meshgrid(*(np.arange(d) for d in (*grid[::-1], *block[::-1])), indexing="ij")
    linear = (tz * block[1] + ty) * block[0] + tx
    expected = np.stack([bx, by, bz, tx, ty, tz, linear % 32, linear // 32], axis=-1).reshape(-1, 8)
    np.testing.assert_array_equal(out, expected)


def _reverse(values: np.ndarray, block: int) -> np.ndarray:
    padded = np.zeros(-(-values.size // block) * block, np.float32)
    padded[:values.size] = values
    return padded.reshape(-1, block)[:, ::-1].reshape(-1)[:values.size]


@pytest.mark.parametrize("dynamic, block", [(0, 128), (0, 64), (1, 96)])
def test_shared_memory_static_and_dynamic(target, dynamic, block):
    values = np.random.default_rng(1).standard_normal(300).astype(np.float32)
    out = np.full_like(values, np.nan)
    run(target, "block_reverse", (-(-values.size // block), 1, 1), (block, 1, 1), values, out, np.int32(values.size),
        np.int32(dynamic),
        np.int32(0), shared_bytes=4 * block * dynamic)
    np.testing.assert_array_equal(out, _reverse(values, block))


@pytest.mark.parametrize("dynamic", [0, 1])
def test_planted_missing_syncthreads_is_a_race(lib, dynamic):
    values = np.arange(256, dtype=np.float32)
    name = "sized" if dynamic else "fixed"
    with pytest.raises(harness.EmulationError,
                       match=rf"^block_reverse: shared-memory race on {name}\[64\] .*: thread \(64,0,0\) of block "
                             r"\(0,0,0\) writes it after thread \(63,0,0\) read it, with no barrier between"):
        run(lib, "block_reverse", (2, 1, 1), (128, 1, 1), values, np.empty_like(values), np.int32(256),
            np.int32(dynamic), np.int32(1), shared_bytes=512 * dynamic)


@pytest.mark.parametrize("dynamic", [0, 1])
def test_planted_shared_index_off_by_one(lib, dynamic):
    values = np.arange(256, dtype=np.float32)
    name = "sized" if dynamic else "fixed"
    with pytest.raises(harness.EmulationError, match=rf"indexes shared array {name} at 128, outside \[0, 128\)"):
        run(lib, "block_reverse", (2, 1, 1), (128, 1, 1), values, np.empty_like(values), np.int32(256),
            np.int32(dynamic), np.int32(2), shared_bytes=512 * dynamic)


def test_dynamic_shared_memory_is_sized_at_launch(lib):
    values = np.arange(64, dtype=np.float32)
    with pytest.raises(harness.EmulationError, match=r"indexes shared array sized at 63, outside \[0, 63\)"):
        run(lib, "block_reverse", (1, 1, 1), (64, 1, 1), values, np.empty_like(values), np.int32(64),
            np.int32(1), np.int32(0), shared_bytes=4 * 63)


def test_launch_limits_are_checked():
    with pytest.raises(ValueError, match="at most 1024 threads"):
        Launch((1, 1, 1), (64, 32, 1))
    with pytest.raises(ValueError, match="grid"):
        Launch((1, 70000, 1), (32, 1, 1))
    with pytest.raises(ValueError, match="shared_bytes"):
        Launch((1, 1, 1), (32, 1, 1), 300 * 1024)


# ---------------------------------------------------------------------------
# Warp collectives.


@pytest.mark.parametrize("dtype", ["float32", "float64", "int32"])
@pytest.mark.parametrize("use_xor", [0, 1])
def test_warp_shuffle_sum(target, dtype, use_xor):
    kernel = {"float32": "warp_sum<float>", "float64": "warp_sum<double>", "int32": "warp_sum<int>"}[dtype]
    values = np.random.default_rng(2).integers(-1000, 1000, 128).astype(dtype)  # exact in every dtype
    sums, lanes = np.full(4, -1, dtype), np.full(128, -1, dtype)
    run(target, kernel, (2, 1, 1), (64, 1, 1), values, sums, lanes, np.int32(use_xor), np.int32(0))
    np.testing.assert_array_equal(sums, values.reshape(4, 32).sum(axis=1))
    if use_xor:  # a butterfly leaves the sum in every lane
        np.testing.assert_array_equal(lanes, np.repeat(sums, 32))


@pytest.mark.parametrize("use_xor", [0, 1])
def test_planted_wrong_shuffle_lane_changes_the_result(target, use_xor):
    values = np.random.default_rng(3).integers(-1000, 1000, 64).astype(np.float32)
    sums, lanes = np.empty(2, np.float32), np.empty(64, np.float32)
    run(target, "warp_sum<float>", (1, 1, 1), (64, 1, 1), values, sums, lanes, np.int32(use_xor), np.int32(1))
    assert not np.array_equal(sums, values.reshape(2, 32).sum(axis=1))


def test_warp_synchronous_shared_memory_with_syncwarp(target):
    values = np.random.default_rng(4).integers(-100, 100, 256).astype(np.float32)
    sums = np.empty(8, np.float32)
    run(target, "warp_shared_sum", (2, 1, 1), (128, 1, 1), values, sums, np.int32(0))
    np.testing.assert_array_equal(sums, values.reshape(8, 32).sum(axis=1))


@pytest.mark.parametrize("bug", [1, 2], ids=["no __syncwarp", "__syncwarp of half the warp"])
def test_planted_missing_syncwarp_is_a_race(lib, bug):
    values = np.ones(128, np.float32)
    with pytest.raises(harness.EmulationError, match=r"^warp_shared_sum: shared-memory race on partial\[\d+\]"):
        run(lib, "warp_shared_sum", (1, 1, 1), (128, 1, 1), values, np.empty(4, np.float32), np.int32(bug))


def test_shuffle_and_vote_semantics(target):
    """Each result against CUDA's documented semantics, written out again."""
    v = np.array([3, 7, -2, 9, 12, 0, 5, 7, 1, 6, 18, 4, 2, 11, 15, 8,
                  13, 19, 10, 16, 14, 17, 20, 5, 6, 9, 12, 1, 3, 2, 4, 0], np.int32)
    out = np.full((32, 10), 12345, np.int32)
    run(target, "shuffle_probe", (1, 1, 1), (32, 1, 1), v, out)
    lane = np.arange(32)

    def segment_read(source, width):
        """Width-segmented shuffle: outside the own segment a lane keeps its value."""
        inside = (source // width == lane // width) & (source >= 0) & (source < 32)
        return np.where(inside, v[np.clip(source, 0, 31)], v)

    xor16 = lane ^ 16
    expected = np.stack([
        v[(lane * 7 + 3) & 31],
        v[(lane // 8) * 8 + (lane + 5) % 8],  # srcLane beyond width wraps inside the segment
        segment_read(lane - 3, 16),
        segment_read(lane + 5, 16),
        v[lane ^ 9],
        np.where(xor16 < lane, v[xor16], v),  # earlier segments may be read, later ones not
        np.full(32, np.uint32(sum(1 << i for i in range(32) if v[i] % 3 == 0)).view(np.int32)),
        # An odd lane reads an even one, outside its mask: undefined in CUDA,
        # all one bits under the emulator.
        np.where(lane % 2 == 0, v[lane ^ 2], -1),
        np.full(32, int((v >= 0).all())),
        np.where(lane < 16, int((v[:16] == 7).any()), int((v[16:] == 7).any())),
    ], axis=1)
    if isinstance(target, GpuKernels):
        out[1::2, 7] = -1
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("bug, block, message", [
    (1, 64, r"wait at different __syncthreads: thread \(\d+,0,0\) of block \(0,0,0\) at line \d+"),
    (2, 64, r"thread \(5,0,0\) of block \(0,0,0\) exited while 5 threads of its block wait at __syncthreads"),
    (3, 64, r"thread \(1,0,0\) of block \(0,0,0\) calls __shfl_sync with a mask that does not name its own lane 1"),
    (4, 64, r"lanes \d+ and \d+ of a warp of block \(0,0,0\) disagree: __shfl_sync with mask 0xffffffff "
            r"against __ballot_sync"),
    (5, 64, r"thread \(31,0,0\) of block \(0,0,0\) exited while lane 0 waits for it in __shfl_sync"),
    (6, 48, r"calls mma.m16n8k16.f16 naming lane 16, which does not exist \(the block has 48 threads\)"),
    (7, 64, r"uses a reference to tile\[\d+\] taken before a __syncthreads"),
    (8, 32, r"lane 0 passes A element 0 = 0x3f8ccccd, not a tf32 value"),
    (9, 64, r"deadlock in block \(0,0,0\): \(0,0,0\) in __shfl_sync with mask 0x00000003; "
            r"\(1,0,0\) in __shfl_sync with mask 0x00000006; \(2,0,0\) in __shfl_sync with mask 0x00000005;"),
])
def test_misuse_is_reported(lib, bug, block, message):
    with pytest.raises(harness.EmulationError, match=rf"^misuse: .*{message}"):
        run(lib, "misuse", (1, 1, 1), (block, 1, 1), np.empty(block, np.float32), np.int32(bug))


def test_misuse_kernel_runs_clean_without_a_bug(lib):
    out = np.empty(64, np.float32)
    run(lib, "misuse", (1, 1, 1), (64, 1, 1), out, np.int32(0))
    np.testing.assert_array_equal(out, np.arange(64))


# ---------------------------------------------------------------------------
# Tensor-core MMA: the PTX ISA's fragment layouts, written out a second time.
# groupID = lane >> 2, threadID_in_group = lane % 4.


def _a16(lane, i):
    group, tig = lane >> 2, lane % 4
    row = group if (0 <= i < 2 or 4 <= i < 6) else group + 8
    col = tig * 2 + (i & 1) + (8 if i >= 4 else 0)
    return row, col


def _b16(lane, i):
    group, tig = lane >> 2, lane % 4
    return tig * 2 + (i & 1) + (8 if i >= 2 else 0), group


def _a8_tf32(lane, i):
    group, tig = lane >> 2, lane % 4
    return (group if i in (0, 2) else group + 8), (tig if i in (0, 1) else tig + 4)


def _b8_tf32(lane, i):
    group, tig = lane >> 2, lane % 4
    return (tig if i == 0 else tig + 4), group


def _c(lane, i):
    group, tig = lane >> 2, lane % 4
    return (group if i < 2 else group + 8), tig * 2 + (i & 1)


def _tf32(values: np.ndarray) -> np.ndarray:
    """float32 rounded to tf32, to nearest with ties away (cvt.rna.tf32.f32)."""
    bits = values.astype(np.float32).view(np.uint32)
    return ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)


KINDS = {0: "float16", 1: "bfloat16", 2: "tf32"}


def _operands(kind: int, rng, *shape):
    """Random values exactly representable in the kind, as float64, and their storage."""
    values = rng.standard_normal(shape)
    if kind == 0:
        stored = values.astype(np.float16)
        return stored.astype(np.float64), stored.view(np.uint16)
    if kind == 1:
        if ml_dtypes is None:
            pytest.skip("bfloat16 needs ml_dtypes")
        stored = values.astype(ml_dtypes.bfloat16)
        return stored.astype(np.float64), stored.view(np.uint16)
    stored = _tf32(values)
    return stored.astype(np.float64), stored


def _registers(bits: np.ndarray, coord, elements: int) -> np.ndarray:
    """(32, registers) uint32: element i of a lane at coord(lane, i); 16-bit
    elements two to a register, the lower index in the low half."""
    values = np.array([[bits[coord(lane, i)] for i in range(elements)] for lane in range(32)])
    if values.dtype == np.uint16:
        pairs = values.astype(np.uint32).reshape(32, -1, 2)
        return pairs[:, :, 0] | (pairs[:, :, 1] << np.uint32(16))
    return values.view(np.uint32)


@pytest.mark.parametrize("kind", KINDS, ids=KINDS.values())
def test_mma_fragment_layouts(target, kind):
    rng = np.random.default_rng(10 + kind)
    depth = 8 if kind == 2 else 16
    a, a_bits = _operands(kind, rng, 16, depth)
    b, b_bits = _operands(kind, rng, depth, 8)
    c = rng.standard_normal((16, 8)).astype(np.float32)
    a_coord, b_coord = (_a8_tf32, _b8_tf32) if kind == 2 else (_a16, _b16)
    a_regs = _registers(a_bits, a_coord, 4 if kind == 2 else 8)
    b_regs = _registers(b_bits, b_coord, 2 if kind == 2 else 4)
    c_regs = np.array([[c[_c(lane, i)] for i in range(4)] for lane in range(32)], np.float32)
    d_regs = np.full((32, 4), np.nan, np.float32)
    run(target, f"mma_fragments<{kind}>", (1, 1, 1), (32, 1, 1), np.ascontiguousarray(a_regs),
        np.ascontiguousarray(b_regs), c_regs, d_regs)
    expected = a @ b + c
    got = np.zeros((16, 8))
    for lane in range(32):
        for i in range(4):
            got[_c(lane, i)] = d_regs[lane, i]
    # The emulator rounds exact sums once; tensor cores sum in float32.
    tol = 2e-5 if isinstance(target, GpuKernels) else 1e-6
    np.testing.assert_allclose(got, expected, rtol=tol, atol=tol * (np.abs(a) @ np.abs(b) + np.abs(c)).max())


def _matmul(lib, kind, bug, M=32, N=32, K=48):
    rng = np.random.default_rng(20 + kind)
    a, a_bits = _operands(kind, rng, M, K)
    b, b_bits = _operands(kind, rng, N, K)
    c = np.full((M, N), np.nan, np.float32)
    run(lib, f"mma_matmul<{kind}>", (N // 16, M // 16, 1), (32, 2, 1), np.ascontiguousarray(a_bits),
        np.ascontiguousarray(b_bits), c, np.int32(M), np.int32(N), np.int32(K), np.int32(bug))
    return c, a @ b.T


@pytest.mark.parametrize("kind", KINDS, ids=KINDS.values())
def test_tiled_mma_matmul(target, kind):
    got, expected = _matmul(target, kind, bug=0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("kind", [0, 1], ids=["float16", "bfloat16"])
def test_planted_wrong_mma_fragment_changes_the_result(target, kind):
    got, expected = _matmul(target, kind, bug=1)
    assert np.isfinite(got).all()
    assert not np.allclose(got, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("kind", KINDS, ids=KINDS.values())
def test_planted_missing_barrier_between_mma_steps_is_a_race(lib, kind):
    with pytest.raises(harness.EmulationError, match=r"^mma_matmul<\d>: shared-memory race on [ab]_tile\[\d+\]"):
        _matmul(lib, kind, bug=2)


# ---------------------------------------------------------------------------
# Storage conversions (to_storage of kernels/dcn_common.cuh): the host's, the
# device's (cvt.rn.f16.f32, and cvt.rn.bf16.f32 from sm_80) and sm_75's
# (bfloat16 rounded by integer operations) give the same bits.

#: float32 bit patterns at the edges of rounding to 16 bits.
EDGE_FLOATS = [
    0x00000000, 0x80000000,  # zeros
    # bfloat16: ties to even (down, up), and just beside one
    0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0xBF818000,
    # the largest finite float32; bfloat16's largest finite, its tie with infinity (to even: infinity)
    0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F7FFF, 0x7F7F8000, 0x7F7F8001,
    0x7F800000, 0xFF800000,  # infinities
    # NaNs: quiet, signalling, negative, payloads that rounding would carry into the exponent
    0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FFFFFFF, 0x7FBFFFFF, 0x7F80FFFF, 0xFFFFFFFF,
    # float32 subnormals (ties among them), the smallest normal
    0x00000001, 0x00008000, 0x00018000, 0x007FFFFF, 0x80008000, 0x00800000,
    # float16: ties 1 + 2^-11 and 1 + 3 * 2^-11; 65504 (largest finite), just below and at 65520
    # (the tie with infinity); subnormals 2^-24 and 2^-25 (a tie with zero) and just above it
    0x3F801000, 0x3F803000, 0x477FE000, 0x477FEFFF, 0x477FF000, 0x33800000, 0x33000000, 0x33000001,
]


def _edge_floats() -> np.ndarray:
    random = np.random.default_rng(3).integers(0, 2**32, 4096, dtype=np.uint64).astype(np.uint32)
    return np.concatenate([np.array(EDGE_FLOATS, np.uint32), random]).view(np.float32)


def _rounded_bits(values: np.ndarray, storage: str) -> np.ndarray:
    """What to_storage must give: NumPy's float16 and ml_dtypes' bfloat16
    (IEEE round to nearest even, subnormals kept, overflow to infinity), and
    every NaN the canonical 0x7fff, as the PTX conversions give it."""
    if storage == "dcn_bfloat16" and ml_dtypes is None:
        pytest.skip("bfloat16 needs ml_dtypes")
    with np.errstate(over="ignore", invalid="ignore"):
        bits = values.astype(np.float16 if storage == "dcn_half" else ml_dtypes.bfloat16).view(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FFF), bits)


@pytest.mark.parametrize("storage", ["dcn_half", "dcn_bfloat16"])
def test_storage_rounding_is_to_nearest_even_with_a_canonical_nan(target, storage):
    """On the emulator (the host's conversions) and on a GPU (the device's)."""
    values = _edge_floats()
    out = np.zeros(values.size, np.uint16)
    run(target, f"round_to_storage<{storage}>", (4, 1, 1), (128, 1, 1), values, out, np.int32(values.size))
    np.testing.assert_array_equal(out, _rounded_bits(values, storage))


@pytest.mark.gpu
@pytest.mark.parametrize("storage", ["dcn_half", "dcn_bfloat16"])
def test_sm75_storage_rounding_on_the_device(storage):
    """The kernel compiled for sm_75 (PTX, which the driver compiles for the
    device at hand): bfloat16 takes its software rounding there, and gives
    the bits the hardware conversion and the host give."""
    cupy = pytest.importorskip("cupy")
    from cupy.cuda import compiler

    from cudcn.backends.cuda import compile as compile_module

    name = f"round_to_storage<{storage}>"
    source = cuda_kernels.translation_unit([harness.COOPERATIVE_SOURCE], cuda_kernels.kernel_dir())
    program = compiler._NVRTCProgram(source, "rounding.cu", name_expressions=[name], method="ptx")
    ptx, lowered = program.compile(compile_module.runtime_options(75))
    ptx = ptx if isinstance(ptx, bytes) else ptx.encode()
    module = cupy.cuda.function.Module()
    module.load(ptx if ptx.endswith(b"\0") else ptx + b"\0")
    values = _edge_floats()
    out = cupy.zeros(values.size, cupy.uint16)
    module.get_function(lowered[name])((4,), (128,), (cupy.asarray(values), out, np.int32(values.size)))
    np.testing.assert_array_equal(out.get(), _rounded_bits(values, storage))

# ---------------------------------------------------------------------------
# ldmatrix: the PTX ISA's layout written out a second time. Lane 8m + i gives
# the address of row i of matrix m; lane l receives, of each matrix, the
# 16-bit elements (l / 4, 2(l % 4)) and (l / 4, 2(l % 4) + 1), or with .trans
# (2(l % 4), l / 4) and (2(l % 4) + 1, l / 4), the first in the low half.


def _ldmatrix_expected(words: np.ndarray, rows: np.ndarray, trans: bool) -> np.ndarray:
    elements = words.view(np.uint16).reshape(64, 8)  # little-endian: the low half is the even element
    out = np.zeros((32, 4), np.uint32)
    for lane in range(32):
        for m in range(4):
            matrix = elements[rows[8 * m:8 * m + 8]]
            r, c = (2 * (lane % 4), lane // 4) if trans else (lane // 4, 2 * (lane % 4))
            low, high = (matrix[r, c], matrix[r + 1, c]) if trans else (matrix[r, c], matrix[r, c + 1])
            out[lane, m] = np.uint32(low) | (np.uint32(high) << np.uint32(16))
    return out


def _ldmatrix(lib, trans: bool, bug: int, rows: np.ndarray, stats: bool = False):
    rng = np.random.default_rng(7)
    words = rng.integers(0, 2**32, 64 * 4, dtype=np.uint64).astype(np.uint32)
    out = np.zeros(32 * 4, np.uint32)
    launched = lib.launch(f"ldmatrix_probe<{int(trans)}>", Launch((1, 1, 1), (32, 1, 1)),
                          [words, rows.astype(np.int32), out, np.int32(bug)], **({"stats": True} if stats else {}))
    return out.reshape(32, 4), _ldmatrix_expected(words, rows, trans), launched


@pytest.mark.parametrize("trans", [False, True], ids=["plain", "trans"])
def test_ldmatrix_fragment_layout(target, trans):
    """Rows in any order (a permutation of 32 of the 64): each lane's four registers as the PTX ISA says."""
    rows = np.random.default_rng(3).permutation(64)[:32]
    got, expected, _ = _ldmatrix(target, trans, 0, rows)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("trans", [False, True], ids=["plain", "trans"])
@pytest.mark.parametrize("bug", [1, 2], ids=["a lane gives the next row", "transposed the other way"])
def test_planted_wrong_ldmatrix_row_or_transposition_changes_the_result(target, trans, bug):
    rows = np.random.default_rng(3).permutation(64)[:32]
    got, expected, _ = _ldmatrix(target, trans, bug, rows)
    assert (got != expected).any()


@pytest.mark.parametrize("stride, worst", [(1, 1), (2, 2), (8, 8)])
def test_ldmatrix_is_accounted_a_matrix_per_phase(lib, stride, worst):
    """Matrices of 8 consecutive 16-byte rows take a wavefront each; rows 32
    bytes apart fall two to a bank group, 128 bytes apart all eight."""
    rows = (np.arange(32) * stride) % 64
    if stride == 8:
        rows = (np.arange(32) % 8) * 8  # every matrix the same eight rows, 128 bytes apart
    got, expected, stats = _ldmatrix(lib, False, 0, rows, stats=True)
    np.testing.assert_array_equal(got, expected)
    load, = [s for s in stats.select("shared", "load") if s.file == "dcn_mma.cuh"]
    assert (load.requests, load.width, load.lanes, load.ideal_wavefronts) == (1, 16, 32, 4)
    assert (load.worst, load.wavefronts) == (worst, 4 * worst)


# ---------------------------------------------------------------------------
# cp.async: the copy lands at cp.async.wait_group; reading the destination
# before that, or another thread's bytes without a barrier, is caught.


def _async_copy(lib, bug: int, threads: int = 64):
    values = np.random.default_rng(5).integers(1, 2**32, 4 * threads, dtype=np.uint64).astype(np.uint32)
    out = np.zeros(4 * threads, np.uint32)
    run(lib, "async_copy", (1, 1, 1), (threads, 1, 1), values, out, np.int32(bug))
    expected = values.reshape(threads, 4).copy()
    expected[np.arange(threads) % 5 == 4] = 0  # zero-filled copies
    return out.reshape(threads, 4), np.roll(expected, -1, axis=0)


def test_async_copy_lands_at_the_wait(target):
    got, expected = _async_copy(target, 0)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("bug, message", [
    (1, r"shared-memory race on tile\[\d+\].* reads it while an asynchronous copy into it .* is pending"),
    (2, r"thread \(0,0,0\) of block \(0,0,0\) exited with asynchronous copies into shared memory never waited"),
    (3, r"shared-memory race on tile\[\d+\]"),
    (4, r"shared-memory race on tile\[\d+\].* while an asynchronous copy into it .* is pending"),
], ids=["read before the wait", "never waited", "no barrier after the wait", "the newer group not waited for"])
def test_planted_async_copy_bugs_are_caught(lib, bug, message):
    with pytest.raises(harness.EmulationError, match=r"^async_copy: " + message):
        _async_copy(lib, bug)
