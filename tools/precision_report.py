"""Measured error of every precision, against float64, beside torchvision's.

One DCNv2 call (N=4, C=64->64, 24x24, 3x3, two offset groups, bias), its
output and all five gradients, in float32 (TF32 off and on), float16 and
bfloat16, each from the same rounded inputs as the float64 reference:
max |got - float64| / max |float64|. torchvision, where it runs the dtype on
the same device, gets the same treatment (float32 with TF32 through
torch.set_float32_matmul_precision). Prints a table.

    PYTHONPATH=. python tools/precision_report.py          # CuPy on the GPU
    PYTHONPATH=. python tools/precision_report.py --cpu    # NumPy backend, no torchvision (a dry run)

The GPU tests bound these errors (tests/test_gpu.py, tests/test_torch_gpu.py);
this prints the numbers.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import cudcn

NAMES = ("output", "input", "offset", "weight", "bias", "mask")
#: precision -> (dtype name, TF32)
PRECISIONS = {"float32": ("float32", False), "float32 tf32": ("float32", True),
              "float16": ("float16", False), "bfloat16": ("bfloat16", False)}


def make_case(rng: np.random.Generator, n=4, c=64, o=64, h=24, w=24, offset_groups=2) -> dict:
    return dict(
        input=rng.standard_normal((n, c, h, w)),
        offset=rng.uniform(-3, 3, (n, 2 * offset_groups * 9, h, w)),
        weight=rng.standard_normal((o, c, 3, 3)) / np.sqrt(9 * c),
        bias=rng.standard_normal(o),
        mask=rng.uniform(0, 1, (n, offset_groups * 9, h, w)),
    )


def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _errors(results: list, reference: list) -> list[float]:
    out = []
    for got, expected in zip(results, reference):
        got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
        out.append(float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-30)))
    return out


def cudcn_results(case: dict, grad_output: np.ndarray, to_device, to_host) -> list:
    dev = {k: to_device(v) for k, v in case.items()}
    out = cudcn.deform_conv2d(**dev, padding=1)
    grads = cudcn.deform_conv2d_backward(to_device(grad_output), **dev, padding=1)
    return [to_host(out)] + [to_host(g) for g in grads]


def torchvision_results(torch, ops, case: dict, grad_output: np.ndarray) -> list:
    leaves = {k: torch.from_numpy(np.ascontiguousarray(v)).cuda().requires_grad_() for k, v in case.items()}
    out = ops.deform_conv2d(leaves["input"], leaves["offset"], leaves["weight"], leaves["bias"], padding=1,
                            mask=leaves["mask"])
    out.backward(torch.from_numpy(grad_output).cuda())
    host = [out.detach()] + [leaves[k].grad for k in ("input", "offset", "weight", "bias", "mask")]
    return [t.float().cpu().numpy() for t in host]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="NumPy backend only (no GPU needed)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    base = make_case(rng)
    grad64 = rng.standard_normal((4, 64, 24, 24))
    torch = ops = None
    if args.cpu:
        to_device, to_host = (lambda a: a), (lambda a: np.asarray(a, np.float64))
    else:
        import cupy

        to_device, to_host = cupy.asarray, (lambda a: cupy.asnumpy(a).astype(np.float64))
        try:
            import torch
            import torchvision.ops as ops
        except ImportError:
            torch = ops = None

    rows = []
    for precision, (dtype_name, tf32) in PRECISIONS.items():
        try:
            dtype = _dtype(dtype_name)
        except ImportError:
            print(f"{precision}: left out (no ml_dtypes)")
            continue
        case = {k: v.astype(dtype) for k, v in base.items()}
        grad_output = grad64.astype(dtype)
        exact = {k: v.astype(np.float64) for k, v in case.items()}
        reference = cudcn_results(exact, grad_output.astype(np.float64), to_device, to_host)
        with cudcn.tf32(tf32):
            ours = _errors(cudcn_results(case, grad_output, to_device, to_host), reference)
        theirs = None
        if torch is not None and dtype_name != "bfloat16":
            before = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision("high" if tf32 else "highest")
            try:
                theirs = _errors(torchvision_results(torch, ops, case, grad_output), reference)
            finally:
                torch.set_float32_matmul_precision(before)
        rows.append((precision, ours, theirs))

    print("max |x - float64| / max |float64|, same rounded inputs; cudcn (torchvision)")
    print(f"| precision | {' | '.join(NAMES)} |")
    print(f"|---|{'---:|' * len(NAMES)}")
    for precision, ours, theirs in rows:
        cells = [f"{e:.1e}" + ("" if theirs is None else f" ({t:.1e})") for e, t in zip(ours, theirs or ours)]
        print(f"| {precision} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
