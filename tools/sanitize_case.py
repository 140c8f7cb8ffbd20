"""A small CUDA-backend run for compute-sanitizer (tools/gpu_sanitize.sh).

Every dtype, with and without mask, with convolution and offset groups, the
building blocks, a chunked batch, a non-default stream, and far-outside and
NaN offsets. CuPy's memory pool is switched off so that every array is its
own allocation and memcheck sees any access past its end.
"""

from __future__ import annotations

import numpy as np

import cudcn


def main() -> int:
    import cupy

    cupy.cuda.set_allocator(None)
    cudcn.set_workspace_bytes(20_000)  # several chunks
    dtypes = ["float64", "float32", "float16"]
    try:
        import ml_dtypes

        dtypes.append(np.dtype(ml_dtypes.bfloat16))
    except ImportError:
        pass
    rng = np.random.default_rng(0)
    n, c, o, h, w, kh, kw, groups, offset_groups = 5, 6, 4, 7, 9, 3, 2, 2, 3
    ho, wo = h, (w + 2 - 1 * (kw - 1) - 1) // 2 + 1
    stream = cupy.cuda.Stream(non_blocking=True)
    for dtype in dtypes:
        for with_mask in (True, False):
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
            geometry = dict(stride=(1, 2), padding=(1, 1), dilation=(1, 1))
            with stream:
                out = cudcn.deform_conv2d(**dev, **geometry)
                cudcn.deform_conv2d_backward(cupy.ones_like(out), **dev, **geometry)
                columns = cudcn.deform_im2col(dev["input"], dev["offset"], (kh, kw), mask=dev["mask"], **geometry)
                cudcn.deform_col2im(columns, dev["offset"], (n, c, h, w), (kh, kw), mask=dev["mask"], **geometry)
                cudcn.deform_col2im_coord(columns, dev["input"], dev["offset"], (kh, kw), mask=dev["mask"], **geometry)
            stream.synchronize()
            print(f"{np.dtype(dtype).name:9} mask={with_mask!s:5} ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
