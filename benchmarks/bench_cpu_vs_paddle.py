"""CPU speed: cudcn's NumPy backend vs paddle.vision.ops.deform_conv2d.

DCNv2 (with mask) forward + backward at N=8, C_in=C_out=64, 32x32, 3x3,
padding 1, float32, both in this process on the same inputs. Prints the
median times and the ratio.

    python benchmarks/bench_cpu_vs_paddle.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np

import cudcn


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()

    import paddle

    paddle.set_device("cpu")
    n, c, s = args.batch, args.channels, args.size
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c, s, s)).astype(np.float32)
    weight = (rng.standard_normal((c, c, 3, 3)) * 0.05).astype(np.float32)
    bias = rng.standard_normal(c).astype(np.float32)
    offset = (rng.standard_normal((n, 18, s, s)) * 2).astype(np.float32)
    mask = rng.random((n, 9, s, s)).astype(np.float32)
    grad_output = rng.standard_normal((n, c, s, s)).astype(np.float32)

    ours_fwd = median_ms(lambda: cudcn.deform_conv2d(x, offset, weight, bias, padding=1, mask=mask), args.repeats)
    ours_bwd = median_ms(
        lambda: cudcn.deform_conv2d_backward(grad_output, x, offset, weight, bias, padding=1, mask=mask), args.repeats
    )

    tensors = [paddle.to_tensor(a, stop_gradient=False) for a in (x, offset, weight, bias, mask)]
    paddle_grad = paddle.to_tensor(grad_output)

    def paddle_forward():
        return paddle.vision.ops.deform_conv2d(*tensors[:4], padding=1, mask=tensors[4])

    def paddle_backward():
        # paddle has no separate backward call: time forward + backward, subtract forward.
        out = paddle_forward()
        out.backward(paddle_grad)
        for t in tensors:
            t.clear_gradient()

    theirs_fwd = median_ms(lambda: paddle_forward().numpy(), args.repeats)
    theirs_both = median_ms(paddle_backward, args.repeats)
    theirs_bwd = theirs_both - theirs_fwd

    # Same results, so the times compare the same computation.
    out = cudcn.deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)
    err = np.abs(out - paddle_forward().numpy()).max() / np.abs(out).max()

    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, numpy {np.__version__}, paddle {paddle.__version__}")
    print(f"shape: N={n}, C_in=C_out={c}, {s}x{s}, 3x3, padding 1, float32, with mask; median of {args.repeats}")
    print(f"forward max relative difference vs paddle: {err:.1e}")
    print(f"{'':10} {'forward ms':>11} {'backward ms':>12} {'total ms':>9}")
    print(f"{'cudcn':10} {ours_fwd:11.1f} {ours_bwd:12.1f} {ours_fwd + ours_bwd:9.1f}")
    print(f"{'paddle':10} {theirs_fwd:11.1f} {theirs_bwd:12.1f} {theirs_fwd + theirs_bwd:9.1f}")
    print(f"speed-up (paddle / cudcn, forward + backward): {(theirs_fwd + theirs_bwd) / (ours_fwd + ours_bwd):.2f}x")


if __name__ == "__main__":
    main()
