"""A small CUDA-backend run for compute-sanitizer (tools/gpu_sanitize.sh).

Every dtype, with and without mask, with convolution and offset groups, the
building blocks, a chunked batch, a non-default stream, far-outside and NaN
offsets, the deterministic (sorted) backward, float32 with TF32, and each
algorithm forward and backward (im2col, and the fused kernels: shared memory,
barriers and tensor-core MMAs, for racecheck and synccheck); and multi-scale
deformable attention in each dtype, forward and backward, atomic and
deterministic (sorted), with NaN and far-outside locations (warp shuffles,
for synccheck); and DCNv3 and DCNv4 in each dtype, forward and backward,
atomic and deterministic, with the fused softmax, NaN and far offsets and
DCNv4's packed offset_mask (odd 3P: unaligned pairs). CuPy's
memory pool is switched off so that every array is its own allocation:
memcheck then sees any access past its end, and initcheck any read of
memory that nothing wrote since it was allocated.

``--quick``: one case (float16 with a mask: im2col and the fused kernels,
forward and backward), MSDA and DCNv3/DCNv4 in float16, for the quick GPU
validation.
"""

from __future__ import annotations

import argparse

import numpy as np

import cudcn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one case: float16 with a mask")
    options = parser.parse_args(argv)
    import cupy

    cupy.cuda.set_allocator(None)
    cudcn.set_workspace_bytes(20_000)  # several chunks
    runs = [("float64", False), ("float32", False), ("float32", True), ("float16", False)]  # (dtype, TF32)
    masks = (True, False)
    if options.quick:
        runs, masks = [("float16", False)], (True,)
    else:
        try:
            import ml_dtypes

            cupy.empty(1, ml_dtypes.bfloat16)
            runs.append((np.dtype(ml_dtypes.bfloat16), False))
        except Exception as error:  # no ml_dtypes, or CuPy without bfloat16 (NumPy < 2.1.2)
            print(f"bfloat16 left out: {error}")
    rng = np.random.default_rng(0)
    n, c, o, h, w, kh, kw, groups, offset_groups = 5, 6, 4, 7, 9, 3, 2, 2, 3
    ho, wo = h, (w + 2 - 1 * (kw - 1) - 1) // 2 + 1
    stream = cupy.cuda.Stream(non_blocking=True)
    for dtype, tf32 in runs:
        for with_mask in masks:
            offset = rng.uniform(-4, 4, (n, 2 * offset_groups * kh * kw, ho, wo))
            offset.flat[::7] = np.nan
            offset.flat[1::9] = 1e30
            args = dict(
                input=rng.standard_normal((n, c, h, w)),
                offset=offset,
                weight=rng.standard_normal((o, c // groups, kh, kw)),
                bias=rng.standard_normal(o),
                mask=rng.uniform(0, 1, (n, offset_groups * kh * kw, ho, wo)) if with_mask else None,
            )
            dev = {k: None if v is None else cupy.asarray(v.astype(dtype)) for k, v in args.items()}
            # Uploaded on the legacy stream, which the non-blocking stream does not wait for.
            cupy.cuda.Stream.null.synchronize()
            geometry = dict(stride=(1, 2), padding=(1, 1), dilation=(1, 1))
            with stream, cudcn.tf32(tf32):
                for algorithm in ("im2col", "fused"):
                    with cudcn.algorithm(algorithm):
                        out = cudcn.deform_conv2d(**dev, **geometry)
                        cudcn.deform_conv2d_backward(cupy.ones_like(out), **dev, **geometry)
                with cudcn.deterministic_algorithms():
                    cudcn.deform_conv2d_backward(cupy.ones_like(out), **dev, **geometry)
                columns = cudcn.deform_im2col(dev["input"], dev["offset"], (kh, kw), mask=dev["mask"], **geometry)
                cudcn.deform_col2im(columns, dev["offset"], (n, c, h, w), (kh, kw), mask=dev["mask"], **geometry)
                cudcn.deform_col2im_coord(columns, dev["input"], dev["offset"], (kh, kw), mask=dev["mask"], **geometry)
            stream.synchronize()
            print(f"{np.dtype(dtype).name:9} tf32={tf32!s:5} mask={with_mask!s:5} ok")
        if not tf32:
            ms_deform_attn(cupy, rng, dtype, stream)
            dcnv3(cupy, rng, dtype, stream)
    return 0


def ms_deform_attn(cupy, rng: np.random.Generator, dtype, stream) -> None:
    """MSDA forward and backward (atomic and sorted) on three levels, one of
    them 1 x 1, odd channels, locations outside [0, 1], NaN and huge ones."""
    shapes = np.array([[5, 7], [2, 3], [1, 1]])
    starts = np.array([0, 35, 41])
    n, queries, heads, channels, points = 2, 9, 3, 11, 2
    locations = rng.uniform(-0.3, 1.3, (n, queries, heads, len(shapes), points, 2))
    locations.flat[::7] = np.nan
    locations.flat[1::9] = 1e30
    value = cupy.asarray(rng.standard_normal((n, 42, heads, channels)).astype(dtype))
    with np.errstate(over="ignore"):  # 1e30 is infinite in float16
        locations = cupy.asarray(locations.astype(dtype))
    weights = cupy.asarray(rng.uniform(-1, 1, locations.shape[:-1]).astype(dtype))
    cupy.cuda.Stream.null.synchronize()
    with stream:
        out = cudcn.ms_deform_attn(value, shapes, starts, locations, weights)
        for deterministic in (False, True):
            with cudcn.deterministic_algorithms(deterministic):
                cudcn.ms_deform_attn_backward(cupy.ones_like(out), value, shapes, starts, locations, weights)
    stream.synchronize()
    print(f"{np.dtype(dtype).name:9} ms_deform_attn ok")


def dcnv3(cupy, rng: np.random.Generator, dtype, stream) -> None:
    """DCNv3 forward and backward (atomic and sorted, with and without the
    fused softmax) and DCNv4 on a 3x3 kernel with remove_center, 3 groups of 5
    channels (P = 8) and a 1x3 one (3P = 9: DCNv4's pairs unaligned), stride
    2, unequal pads, offsets outside the input, NaN and huge ones."""
    n, h, w, group, channels = 2, 7, 9, 3, 5
    for kernel_h, kernel_w, remove_center in ((3, 3, True), (1, 3, False)):
        points = kernel_h * kernel_w - remove_center
        out_h, out_w = (h + 2 - kernel_h) // 2 + 1, (w - kernel_w) // 2 + 1
        offset = rng.uniform(-4, 4, (n, out_h, out_w, group * points * 2))
        offset.flat[::7] = np.nan
        offset.flat[1::9] = 1e30
        scalars = (kernel_h, kernel_w, 2, 2, 1, 0, 1, 1, group, channels, 0.75, 256, remove_center)
        input = cupy.asarray(rng.standard_normal((n, h, w, group * channels)).astype(dtype))
        with np.errstate(over="ignore"):  # 1e30 is infinite in float16
            offset = cupy.asarray(offset.astype(dtype))
        mask = cupy.asarray(rng.uniform(-1, 1, (n, out_h, out_w, group * points)).astype(dtype))
        blocks = cupy.concatenate([offset.reshape(n, out_h, out_w, group, 2 * points),
                                   mask.reshape(n, out_h, out_w, group, points)], -1).reshape(n, out_h, out_w, -1)
        offset_mask = cupy.zeros((n, out_h, out_w, -(-blocks.shape[-1] // 8) * 8), dtype)
        offset_mask[..., :blocks.shape[-1]] = blocks
        cupy.cuda.Stream.null.synchronize()
        with stream:
            for softmax in (False, True):
                out = cudcn.dcnv3(input, offset, mask, *scalars, softmax=softmax)
                for deterministic in (False, True):
                    with cudcn.deterministic_algorithms(deterministic):
                        cudcn.dcnv3_backward(cupy.ones_like(out), input, offset, mask, *scalars, softmax=softmax)
            out = cudcn.dcnv4(input, offset_mask, *scalars)
            cudcn.dcnv4_backward(cupy.ones_like(out), input, offset_mask, *scalars)
        stream.synchronize()
    print(f"{np.dtype(dtype).name:9} dcnv3/dcnv4 ok")


if __name__ == "__main__":
    raise SystemExit(main())
