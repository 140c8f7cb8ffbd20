"""The CUDA backend's workspace and launch grids, measured on the CPU by a dry run.

Each algorithm runs at the benchmark shapes (benchmarks/bench_gpu.py) under
an engine whose kernels and GEMMs do nothing (tests/emulation/dry_run.py),
while tracemalloc counts the bytes its arrays take beyond the call's result:
the workspace the call takes from the GPU's allocator. The fused forward's
and the fused backward's peaks must stay under 5% of im2col's, direction by
direction. im2col's kernel launches each fill at least 4 blocks per SM of
an H100.
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
FUSED_LIMIT = 0.05
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
def test_fused_forward_workspace_is_under_5_percent_of_im2col(shape, dtype):
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
    staging = fused.staging_images(geom) * image_bytes
    assert weight_bytes + staging <= fused_peak < weight_bytes + staging + SLACK
    assert fused_peak < FUSED_LIMIT * im2col_peak, (fused_peak, im2col_peak)


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
    step = fused.staging_images(geom)
    kernels = [(name, launch) for name, launch in engine.launches if name.startswith("deform_fused")]
    assert len(kernels) == -(-geom.batch // step)
    assert kernels[0][1].grid == launchers.fused_grid(geom, step) and kernels[0][1].block == (128, 1, 1)
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
    accumulator = 0 if dtype == "float32" else fused_backward.accumulator_images(geom) * 4 * arrays["input"][0].size
    expected = max(parts, weight_elements * np.dtype(dtype).itemsize + accumulator)
    assert expected <= fused_peak < expected + SLACK
    assert fused_peak < FUSED_LIMIT * im2col_peak, (fused_peak, im2col_peak)


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
