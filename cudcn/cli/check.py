"""``cudcn check``: every available backend and adapter against the NumPy backend.

The NumPy backend is first checked against the loop oracle (forward) and
against central finite differences (backward) on a tiny case. Then every
other way of computing the same call that can run here -- the CUDA backend
on CuPy arrays, the torch adapter (``cudcn.torch``) and the paddle adapter
(``cudcn.paddle``) on each device their framework has -- is compared with
the NumPy backend on two cases (a tiny one with groups, offset groups and
uneven stride, padding and dilation, and a small one), in float64 and
float32: the output and all five gradients, the adapters' through their
framework's autograd. Prints a table, says why each target that cannot run
here is missing, and exits 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import importlib
import time
from typing import Any, Callable

import numpy as np

import cudcn
from cudcn import oracle
from cudcn.cli.arguments import collected_warnings, is_installed, print_warnings, seed_int

# case name -> (N, C_in, C_out, H, W, kh, kw, groups, offset_groups, stride, padding, dilation)
CASES = {
    "tiny": (2, 4, 6, 5, 6, 2, 3, 2, 2, (1, 2), (1, 1), (2, 1)),
    "small": (4, 16, 32, 24, 24, 3, 3, 1, 2, 1, 1, 1),
}
TOLERANCE = {"float64": 1e-10, "float32": 1e-4}
#: The arrays of a call, in the order of cudcn.Gradients.
ARRAYS = ("input", "offset", "weight", "bias", "mask")

#: A target runs a case: (case, grad_output) -> (output, {array: gradient}, forward ms, backward ms).
Runner = Callable[[dict, np.ndarray], tuple[np.ndarray, dict[str, np.ndarray], float, float]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=seed_int, default=0, help="random seed, 0 to 2**32 - 1 (default 0)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="print only failed checks, the targets not checked and the total")


def make_case(name: str, dtype, rng: np.random.Generator) -> dict:
    """Random arguments for a case; offsets are kept off integer kinks."""
    n, c, o, h, w, kh, kw, groups, og, stride, padding, dilation = CASES[name]
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    offset = rng.integers(-3, 3, (n, 2 * og * kh * kw, ho, wo)) + rng.uniform(0.1, 0.9, (n, 2 * og * kh * kw, ho, wo))
    args = dict(
        input=rng.standard_normal((n, c, h, w)),
        offset=offset,
        weight=rng.standard_normal((o, c // groups, kh, kw)),
        bias=rng.standard_normal(o),
        mask=rng.uniform(0.0, 1.0, (n, og * kh * kw, ho, wo)),
    )
    args = {k: v.astype(dtype) for k, v in args.items()}
    args.update(stride=stride, padding=padding, dilation=dilation)
    return args


def relative_error(got, expected) -> float:
    got = np.asarray(got, np.float64)
    expected = np.asarray(expected, np.float64)
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-30)
    return float(np.abs(got - expected).max(initial=0.0)) / scale


def _finite_difference_error(args: dict, rng: np.random.Generator) -> float:
    """Directional derivative of <grad_output, out> vs the backward, all inputs at once."""
    out = cudcn.deform_conv2d(**args)
    grad_output = rng.standard_normal(out.shape)
    grads = cudcn.deform_conv2d_backward(grad_output, **args)
    direction = {k: rng.standard_normal(args[k].shape) for k in ARRAYS}
    step = 1e-6

    def loss(sign):
        moved = dict(args, **{k: args[k] + sign * step * direction[k] for k in ARRAYS})
        return float(np.sum(grad_output * cudcn.deform_conv2d(**moved)))

    numeric = (loss(1) - loss(-1)) / (2 * step)
    analytic = sum(float(np.sum(getattr(grads, k) * direction[k])) for k in ARRAYS)
    return abs(numeric - analytic) / max(abs(analytic), 1e-30)


def _timed(fn, sync=lambda: None):
    """fn's result and its wall time in ms, from a synchronised start to a synchronised end."""
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return result, (time.perf_counter() - start) * 1e3


def _geometry(case: dict) -> dict:
    return {k: case[k] for k in ("stride", "padding", "dilation")}


# ----------------------------------------------------------------------------
# What can be checked here


def _cupy_runner(cupy: Any) -> Runner:
    sync = cupy.cuda.get_current_stream().synchronize

    def run(case, grad_output):
        arrays = {k: cupy.asarray(case[k]) for k in ARRAYS}
        out, forward_ms = _timed(lambda: cudcn.deform_conv2d(**arrays, **_geometry(case)), sync)
        grads, backward_ms = _timed(
            lambda: cudcn.deform_conv2d_backward(cupy.asarray(grad_output), **arrays, **_geometry(case)), sync)
        return out.get(), {k: getattr(grads, k).get() for k in ARRAYS}, forward_ms, backward_ms

    return run


def _torch_runner(device: str) -> Runner:
    import torch

    import cudcn.torch as adapter

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run(case, grad_output):
        t = {k: torch.tensor(case[k], device=device, requires_grad=True) for k in ARRAYS}
        out, forward_ms = _timed(lambda: adapter.deform_conv2d(
            t["input"], t["offset"], t["weight"], t["bias"], mask=t["mask"], **_geometry(case)), sync)
        _, backward_ms = _timed(lambda: out.backward(torch.tensor(grad_output, device=device)), sync)
        return (out.detach().cpu().numpy(), {k: t[k].grad.cpu().numpy() for k in ARRAYS},
                forward_ms, backward_ms)

    return run


def _paddle_runner(place: str) -> Runner:
    import paddle

    import cudcn.paddle as adapter

    def sync():
        if place != "cpu":
            paddle.device.synchronize()

    def run(case, grad_output):
        t = {k: paddle.to_tensor(case[k], place=place, stop_gradient=False) for k in ARRAYS}
        kh, kw = case["weight"].shape[2:]
        groups = case["input"].shape[1] // case["weight"].shape[1]
        offset_groups = case["offset"].shape[1] // (2 * kh * kw)
        out, forward_ms = _timed(lambda: adapter.deform_conv2d(
            t["input"], t["offset"], t["weight"], t["bias"], deformable_groups=offset_groups, groups=groups,
            mask=t["mask"], **_geometry(case)), sync)
        _, backward_ms = _timed(lambda: out.backward(paddle.to_tensor(grad_output, place=place)), sync)
        return out.numpy(), {k: t[k].grad.numpy() for k in ARRAYS}, forward_ms, backward_ms

    return run


def targets() -> tuple[dict[str, Runner], dict[str, str]]:
    """What can be compared with the NumPy backend here (name -> runner) and
    what cannot (name -> why)."""
    found: dict[str, Runner] = {}
    missing: dict[str, str] = {}
    if not is_installed("cupy"):
        missing["cuda (cupy)"] = "CuPy not installed"
    else:
        try:
            import cupy

            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as error:  # a broken CuPy, no driver or no device
            count, reason = 0, f"CuPy cannot reach a CUDA device ({type(error).__name__}: {error})"
        else:
            reason = "CuPy sees no CUDA device"
        if count > 0:
            found["cuda (cupy)"] = _cupy_runner(cupy)
        else:
            missing["cuda (cupy)"] = reason

    adapters = (  # framework, runner, its name for a GPU, whether it has one
        ("torch", _torch_runner, "cuda", lambda torch: torch.cuda.is_available()),
        ("paddle", _paddle_runner, "gpu",
         lambda paddle: paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0),
    )
    for framework, runner, gpu, has_gpu in adapters:
        try:
            module = importlib.import_module(framework)
        except ImportError:
            missing[f"{framework} adapter"] = f"{framework} not installed"
            continue
        try:
            found[f"{framework} cpu"] = runner("cpu")
            if has_gpu(module):
                found[f"{framework} {gpu}"] = runner(gpu)
            else:
                missing[f"{framework} {gpu}"] = f"{framework} sees no CUDA device"
        except Exception as error:  # cudcn's adapter fails to import with this version of the framework
            missing[f"{framework} adapter"] = f"cudcn.{framework} cannot be imported ({type(error).__name__}: {error})"
    return found, missing


# ----------------------------------------------------------------------------
# The command


def run(args: argparse.Namespace) -> int:
    rng = np.random.default_rng(args.seed)
    with collected_warnings() as caught:
        found, missing = targets()
        warm_up = make_case("tiny", np.float32, rng)
        for runner in found.values():  # first calls pay for imports and registrations: keep them out of the ms
            try:
                runner(warm_up, np.ones_like(cudcn.deform_conv2d(**warm_up)))
            except Exception:  # reported by the checks below
                pass
    rows = []  # (target, dtype, case, check, error, tolerance, ms)

    tiny = make_case("tiny", np.float64, rng)
    expected, _ = _timed(lambda: oracle.deform_conv2d(**tiny))
    got, ms = _timed(lambda: cudcn.deform_conv2d(**tiny))
    rows.append(("numpy", "float64", "tiny", "forward vs oracle", relative_error(got, expected), 1e-12, ms))
    fd = _finite_difference_error(tiny, rng)
    rows.append(("numpy", "float64", "tiny", "backward vs finite diff.", fd, 1e-6, float("nan")))

    for case_name in CASES:
        for dtype in ("float64", "float32"):
            case = make_case(case_name, np.dtype(dtype), rng)
            out = cudcn.deform_conv2d(**case)
            grad_output = rng.standard_normal(out.shape).astype(dtype)
            grads = cudcn.deform_conv2d_backward(grad_output, **case)
            for target, runner in found.items():
                try:
                    got_out, got_grads, forward_ms, backward_ms = runner(case, grad_output)
                except Exception as error:  # a target that fails is a failed check, not a crash
                    rows.append((target, dtype, case_name, f"raised {type(error).__name__}: {error}",
                                 float("inf"), TOLERANCE[dtype], float("nan")))
                    continue
                rows.append((target, dtype, case_name, "forward", relative_error(got_out, out),
                             TOLERANCE[dtype], forward_ms))
                for k in ARRAYS:
                    rows.append((target, dtype, case_name, f"grad {k}", relative_error(got_grads[k], getattr(grads, k)),
                                 TOLERANCE[dtype], backward_ms if k == "input" else float("nan")))

    order = ["numpy", *found]
    rows.sort(key=lambda row: order.index(row[0]))  # grouped by target, stable within
    failed = [row for row in rows if not row[4] <= row[5]]
    if not args.quiet:
        print("The NumPy backend against the loop oracle and finite differences, every other target against "
              "the NumPy backend\n(rel. error: largest |difference| / largest |expected value|; ms: the forward, "
              "and on the grad input row the whole backward)")
    if rows and not (args.quiet and not failed):
        print(f"{'target':12} {'dtype':8} {'case':6} {'check':26} {'rel. error':>11} {'tolerance':>10} {'ms':>8}  result")
    for row in failed if args.quiet else rows:
        target, dtype, case_name, what, err, tol, ms = row
        ms_text = "" if ms != ms else f"{ms:8.2f}"
        print(f"{target:12} {dtype:8} {case_name:6} {what:26} {err:11.2e} {tol:10.0e} {ms_text:>8}  "
              f"{'FAIL' if row in failed else 'ok'}")
    for target, reason in missing.items():
        print(f"{target}: not checked: {reason}")
    if not args.quiet:
        print_warnings(caught, "importing the frameworks")
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0
