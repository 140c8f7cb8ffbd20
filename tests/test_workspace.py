"""The CUDA backend's workspace and launch grids, measured on the CPU by a dry run.

Each algorithm runs at the benchmark shapes (benchmarks/bench_gpu.py) under
an engine whose kernels and GEMMs do nothing (tests/emulation/dry_run.py),
while tracemalloc counts the bytes its arrays take beyond the call's result:
the workspace the call takes from the GPU's allocator. The fused backward's
peak must stay under 5% of im2col's, the fused forward's under 6%: its
chunks take as many images as a launch of FUSED_TARGET_BLOCKS blocks needs,
which at N32 C128 32x32 G4 is 17 images of staging, 5.7% of im2col's
workspace there (the other shapes stay under 4%). Every kernel launch of
either algorithm fills at least 4 blocks per SM of an H100 where the
workspace budget allows.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import cudcn
from cudcn.backends import layout
from cudcn.backends.cuda import fused, fused_backward, im2col_gemm, launchers
from cudcn.config import images_per_chunk
from cudcn.geometry import validate
from emulation.dry_run import DryRunEngine, peak_workspace

ROOT = Path(__file__).resolve().parents[1]
FORWARD_LIMIT = 0.06
BACKWARD_LIMIT = 0.05
#: What a call's small Python objects may add to its arrays.
SLACK = 2**20


def _benchmark_shapes() -> dict:
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "bench_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.SHAPES


SHAPES = _benchmark_shapes()


def _largest_chunk(geom, dtype) -> int:
    """Images of im2col's largest chunk: as few chunks as the budget allows
    (images_per_chunk at most each), their sizes balanced."""
    column_bytes = geom.out_pixels * geom.kernel_points * geom.in_channels * np.dtype(dtype).itemsize
    count = -(-geom.batch // images_per_chunk(column_bytes, geom.batch))
    parts = layout.chunks(geom, np.dtype(dtype))
    assert len(parts) == count and sum(p.stop - p.start for p in parts) == geom.batch
    sizes = [p.stop - p.start for p in parts]
    assert max(sizes) - min(sizes) <= 1
    return max(sizes)


def _untouched_arrays(shape, dtype):
    """The benchmark's arguments as NumPy arrays whose memory is never touched."""
    n, c, o, h, w, k, g = shape
    return dict(
        input=np.empty((n, c, h, w), dtype), offset=np.empty((n, 2 * g * k * k, h, w), dtype),
        mask=np.empty((n, g * k * k, h, w), dtype), weight=np.empty((o, c, k, k), dtype), bias=np.empty(o, dtype),
    )


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_fused_forward_workspace_is_under_6_percent_of_im2col(shape, dtype):
    arrays = _untouched_arrays(shape, dtype)
    geom = validate(**arrays, padding=1)
    args = [arrays[k] for k in ("input", "offset", "weight", "bias", "mask")]
    im2col_engine, fused_engine = DryRunEngine(), DryRunEngine()
    im2col_peak, out = peak_workspace(lambda: im2col_gemm.forward(im2col_engine, geom, *args))
    del out
    fused_peak, out = peak_workspace(lambda: fused.forward(fused_engine, geom, *args))
    assert out.shape == (geom.batch, geom.out_channels, geom.out_h, geom.out_w)
    assert fused.applies(fused_engine, geom, "forward") is None
    assert {name.split("<")[0] for name, _ in fused_engine.launches} == {"to_channels_last", "deform_fused_forward"}
    # The measurement sees what each algorithm allocates: im2col a chunk's
    # column buffer, its channels-last input and the weight matrix, one chunk
    # at a time; fused its weight and one staging buffer.
    column_bytes = geom.out_pixels * geom.kernel_points * geom.in_channels * np.dtype(dtype).itemsize
    image_bytes, weight_bytes = arrays["input"][0].nbytes, arrays["weight"].nbytes
    chunk = _largest_chunk(geom, dtype)
    one_chunk = chunk * (column_bytes + image_bytes) + weight_bytes
    assert one_chunk <= im2col_peak < one_chunk + SLACK
    most = max(part.stop - part.start for part in fused.staging_chunks(geom))
    staging = most * image_bytes
    assert weight_bytes + staging <= fused_peak < weight_bytes + staging + SLACK
    assert fused_peak < FORWARD_LIMIT * im2col_peak, (fused_peak, im2col_peak)


def test_peak_workspace_counts_lifetimes():
    """Arrays freed before the next is made do not add up; the result is not counted."""
    def call():
        for _ in range(3):
            temporary = np.empty(10**6, np.float64)  # 8 MB each, one at a time
            del temporary
        kept = np.empty(2 * 10**6, np.float32)  # 8 MB alive beside the result
        result = np.empty(10**6, np.float32)
        del kept
        return result

    peak, result = peak_workspace(call)
    assert 8 * 10**6 <= peak < 8 * 10**6 + 10**5 and result.nbytes == 4 * 10**6


def test_fused_launches_one_kernel_per_staging_chunk():
    arrays = _untouched_arrays(SHAPES["N16 C256->256 64x64 3x3"], "float32")
    geom = validate(**arrays, padding=1)
    engine = DryRunEngine()
    fused.forward(engine, geom, *(arrays[k] for k in ("input", "offset", "weight", "bias", "mask")))
    parts = fused.staging_chunks(geom)
    kernels = [(name, launch) for name, launch in engine.launches if name.startswith("deform_fused")]
    assert len(kernels) == len(parts) and sum(part.stop - part.start for part in parts) == geom.batch
    for (_, launch), part in zip(kernels, parts):
        assert launch.grid == launchers.fused_grid(geom, part.stop - part.start) and launch.block == (128, 1, 1)
    # float32 without TF32 multiplies by FMAs; the 32-bit index suffices.
    assert kernels[0][0] == "deform_fused_forward<float, FusedFMA, int>"


@pytest.mark.parametrize("dtype, tf32", [("float32", False), ("float32", True), ("float16", False)])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_fused_backward_workspace_is_under_5_percent_of_im2col(shape, dtype, tf32):
    arrays = _untouched_arrays(shape, dtype)
    geom = validate(**arrays, padding=1)
    grad_output = np.empty((geom.batch, geom.out_channels, geom.out_h, geom.out_w), dtype)
    args = [grad_output, *(arrays[k] for k in ("input", "offset", "weight", "mask"))]
    im2col_engine, fused_engine = DryRunEngine(), DryRunEngine()
    with cudcn.tf32(tf32):
        im2col_peak, grads = peak_workspace(lambda: im2col_gemm.backward(im2col_engine, geom, *args))
        del grads
        fused_peak, grads = peak_workspace(lambda: fused.backward(fused_engine, geom, *args))
        assert fused.applies(fused_engine, geom, "backward") is None
    assert [g.shape for g in grads] == [arrays[k].shape for k in ("input", "offset", "weight", "bias", "mask")]
    kernels = {name.split("<")[0] for name, _ in fused_engine.launches}
    assert {"fused_backward_weight", "fused_backward_data"} <= kernels and not fused_engine.gemms
    # im2col holds one chunk's column buffer at a time (not two).
    column_bytes = geom.out_pixels * geom.kernel_points * geom.in_channels * np.dtype(dtype).itemsize
    chunk_columns = _largest_chunk(geom, dtype) * column_bytes
    assert chunk_columns <= im2col_peak < 2 * chunk_columns
    # Fused: the weight gradient's split parts, then the weight matrix and
    # (half types) a few images' float32 input-gradient accumulator.
    weight_elements = arrays["weight"].size
    splits = fused_backward.weight_splits(geom)
    parts = 4 * splits * weight_elements if splits > 1 else 0
    images = max(part.stop - part.start for part in fused_backward.data_chunks(geom))
    accumulator = 0 if dtype == "float32" else images * 4 * arrays["input"][0].size
    expected = max(parts, weight_elements * np.dtype(dtype).itemsize + accumulator)
    assert expected <= fused_peak < expected + SLACK
    assert fused_peak < BACKWARD_LIMIT * im2col_peak, (fused_peak, im2col_peak)


def _blocks(launch) -> int:
    x, y, z = launch.grid
    return x * y * z


#: SMs of an H100 SXM; a launch should give each at least 4 blocks.
H100_SMS = 132


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_im2col_launches_fill_an_h100(shape, dtype):
    """Forward and backward: every kernel launch of the im2col path (the
    layout copies, im2col, col2im, col2im_coord) at least 4 x 132 blocks, chunks
    balanced under the default workspace budget (float64 at N32 C128 32x32
    took 28 and 4 images, the second chunk's layout passes 512 tiles)."""
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    arrays = _untouched_arrays(shape, dtype)
    geom = validate(**arrays, padding=1)
    grad_output = np.empty((geom.batch, geom.out_channels, geom.out_h, geom.out_w), dtype)
    engine = DryRunEngine()
    im2col_gemm.forward(engine, geom, *(arrays[k] for k in ("input", "offset", "weight", "bias", "mask")))
    im2col_gemm.backward(engine, geom, grad_output, *(arrays[k] for k in ("input", "offset", "weight", "mask")))
    kernels = {name.split("<")[0] for name, _ in engine.launches}
    assert kernels == {"layout_copies", "deform_im2col", "deform_col2im", "deform_col2im_coord"}
    small = [(name, launch.grid) for name, launch in engine.launches if launch.grid[0] < 4 * H100_SMS]
    assert not small, small


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_fused_launches_fill_the_gpu_at_the_benchmark_shapes(shape, dtype):
    """Every column-free launch has FUSED_TARGET_BLOCKS (4 x 132) blocks or
    more -- or, for the forward's balanced chunks, nearly (32 images in two
    chunks of 16 where 17 would reach the target: 512 blocks) -- unless the
    workspace budget is what stops it: the forward's chunk at its most
    images (1/TARGET_SHARE of the budget), the weight gradient's splits at
    what their float32 parts may take. Chunks differ by one image at most."""
    arrays = _untouched_arrays(shape, dtype)
    geom = validate(**arrays, padding=1)
    grad_output = np.empty((geom.batch, geom.out_channels, geom.out_h, geom.out_w), dtype)
    engine = DryRunEngine()
    fused.forward(engine, geom, *(arrays[k] for k in ("input", "offset", "weight", "bias", "mask")))
    fused.backward(engine, geom, grad_output, *(arrays[k] for k in ("input", "offset", "weight", "mask")))
    target = launchers.FUSED_TARGET_BLOCKS
    per_image = arrays["input"][0].nbytes
    most_images = cudcn.get_workspace_bytes() // fused.TARGET_SHARE // per_image
    forward = [la for name, la in engine.launches if name.startswith("deform_fused")]
    sizes = [part.stop - part.start for part in fused.staging_chunks(geom)]
    assert max(sizes) - min(sizes) <= 1 and len(forward) == len(sizes)
    for launch, images in zip(forward, sizes):
        assert _blocks(launch) >= 0.95 * target or images + 1 > most_images, (launch, images, most_images)
    weight, = [la for name, la in engine.launches if name.startswith("fused_backward_weight")]
    weight_bytes = 4 * arrays["weight"].size
    splits = fused_backward.weight_splits(geom)
    assert _blocks(weight) >= target or (splits + 1) * weight_bytes > fused_backward.workspace_limit(geom)
    data = [la for name, la in engine.launches if name.startswith("fused_backward_data")]
    assert data and all(_blocks(launch) >= target for launch in data)


@pytest.mark.parametrize("budget", [2**23, 2**24, 2**26])
def test_msda_deterministic_value_gradient_fits_the_workspace_budget(budget):
    """Multi-scale deformable attention's sorted value gradient at the
    Deformable-DETR encoder's levels (100x150 ... 13x19, 8 heads of 32
    channels, 4 levels x 4 points, 2 images of 2000 queries), float32: its
    keys, weights, sort and segment starts stay under the budget, chunk by
    chunk (the float32 value gradient is the result; a chunk needs at least
    the segment starts of two images, 5 MB here); the atomic path takes no
    workspace but the level table."""
    from cudcn.backends.cuda import msda
    from cudcn.msda_geometry import validate_msda

    shapes = np.array([[100, 150], [50, 75], [25, 38], [13, 19]])
    starts = np.concatenate([[0], np.cumsum(shapes[:, 0] * shapes[:, 1])[:-1]])
    pixels, (n, queries, heads, channels) = int((shapes[:, 0] * shapes[:, 1]).sum()), (2, 2000, 8, 32)
    arrays = dict(value=np.empty((n, pixels, heads, channels), np.float32),
                  sampling_locations=np.empty((n, queries, heads, 4, 4, 2), np.float32),
                  attention_weights=np.empty((n, queries, heads, 4, 4), np.float32))
    geom = validate_msda(**arrays, spatial_shapes=shapes, level_start_index=starts)
    grad_output = np.empty(geom.output_shape, np.float32)
    args = [grad_output, *arrays.values()]
    with cudcn.workspace_bytes(budget):
        with cudcn.deterministic_algorithms():
            engine = DryRunEngine()
            peak, grads = peak_workspace(lambda: msda.backward(engine, geom, *args))
            chunks = msda.sorted_chunks(geom)
        atomic_peak, grads = peak_workspace(lambda: msda.backward(DryRunEngine(), geom, *args))
    assert len(chunks) > 1 or budget == 2**26
    keys = [name for name, _ in engine.launches if name.startswith("msda_value_keys")]
    assert len(keys) == len(chunks)
    assert peak <= budget, (peak, budget)
    assert atomic_peak < SLACK


#: InternImage-T's four stages at batch 2 (benchmarks/bench_dcnv3_cpu.py): (size, channels, groups), 3x3, D = 16.
DCNV3_STAGES = ((56, 64, 4), (28, 128, 8), (14, 256, 16), (7, 512, 32))


def _dcnv3_call(stage, dtype):
    from cudcn.dcnv3_geometry import validate_dcnv3

    size, channels, group = stage
    arrays = dict(input=np.empty((2, size, size, channels), dtype), offset=np.empty((2, size, size, group * 18), dtype),
                  mask=np.empty((2, size, size, group * 9), dtype))
    geom = validate_dcnv3(**arrays, kernel_h=3, kernel_w=3, stride_h=1, stride_w=1, pad_h=1, pad_w=1, dilation_h=1,
                          dilation_w=1, group=group, group_channels=channels // group)
    return geom, list(arrays.values())


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
@pytest.mark.parametrize("stage", DCNV3_STAGES, ids=[f"{s}x{s} C{c} G{g}" for s, c, g in DCNV3_STAGES])
def test_dcnv3_launches_fill_an_h100_where_the_items_allow(stage, dtype):
    """Forward and backward at InternImage-T's stages: the sampling kernels'
    grids reach 4 x 132 blocks, or every lane the call can use (each item's
    points split among as many lanes as a warp and P allow) is launched."""
    from cudcn.backends.cuda import dcnv3

    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    geom, arrays = _dcnv3_call(stage, dtype)
    engine = DryRunEngine()
    out = dcnv3.forward(engine, geom, *arrays)
    dcnv3.backward(engine, geom, out, *arrays)
    most_points = 1 << (geom.points.bit_length() - 1)  # the largest power of two <= P
    launched = {}
    for name, launch in engine.launches:
        kernel = name.split("<")[0]
        if kernel in ("dcnv3_forward", "dcnv3_backward"):
            channel_lanes, _ = (dcnv3.forward_lanes if kernel == "dcnv3_forward" else dcnv3.backward_lanes)(geom)
            most = dcnv3.items(geom) * channel_lanes * min(most_points, 32 // channel_lanes)
            assert launch.grid[0] >= min(4 * H100_SMS, -(-most // launch.block[0])), (name, launch.grid, most)
            launched[kernel] = launch.grid[0]
    assert set(launched) == {"dcnv3_forward", "dcnv3_backward"}


@pytest.mark.parametrize("budget", [2**23, 2**24, 2**27])
def test_dcnv3_deterministic_input_gradient_fits_the_workspace_budget(budget):
    """DCNv3's sorted input gradient at InternImage-T's first stage (2 x 56 x 56,
    4 groups of 16 channels, 3x3), float32: its keys, weights, sort and
    segment starts stay under the budget, chunk by chunk (the float32 input
    gradient is the result); the atomic path takes no workspace."""
    from cudcn.backends.cuda import dcnv3

    geom, arrays = _dcnv3_call(DCNV3_STAGES[0], np.float32)
    grad_output = np.empty(geom.output_shape, np.float32)
    with cudcn.workspace_bytes(budget):
        with cudcn.deterministic_algorithms():
            engine = DryRunEngine()
            peak, _ = peak_workspace(lambda: dcnv3.backward(engine, geom, grad_output, *arrays))
            chunks = dcnv3.sorted_chunks(geom)
        atomic_peak, _ = peak_workspace(lambda: dcnv3.backward(DryRunEngine(), geom, grad_output, *arrays))
    assert len(chunks) > 1 or budget == 2**27
    keys = [name for name, _ in engine.launches if name.startswith("dcnv3_input_keys")]
    assert len(keys) == len(chunks)
    assert peak <= budget, (peak, budget)
    assert atomic_peak < SLACK
