"""``cudcn check``: every available backend against the NumPy backend.

The NumPy backend is first checked against the loop oracle (forward) and
against central finite differences (backward) on a tiny case; every other
backend that can run here is then compared with the NumPy backend, forward
and all five gradients, in float64 and float32. Prints a table; exits 1 on a
mismatch.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import cudcn
from cudcn import oracle

# case name -> (N, C_in, C_out, H, W, kh, kw, groups, offset_groups, stride, padding, dilation)
CASES = {
    "tiny": (2, 4, 6, 5, 6, 2, 3, 2, 2, (1, 2), (1, 1), (2, 1)),
    "small": (4, 16, 32, 24, 24, 3, 3, 1, 2, 1, 1, 1),
}
TOLERANCE = {"float64": 1e-10, "float32": 1e-4}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


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
    names = ("input", "offset", "weight", "bias", "mask")
    out = cudcn.deform_conv2d(**args)
    grad_output = rng.standard_normal(out.shape)
    grads = cudcn.deform_conv2d_backward(grad_output, **args)
    direction = {k: rng.standard_normal(args[k].shape) for k in names}
    step = 1e-6

    def loss(sign):
        moved = dict(args, **{k: args[k] + sign * step * direction[k] for k in names})
        return float(np.sum(grad_output * cudcn.deform_conv2d(**moved)))

    numeric = (loss(1) - loss(-1)) / (2 * step)
    analytic = sum(float(np.sum(getattr(grads, k) * direction[k])) for k in names)
    return abs(numeric - analytic) / max(abs(analytic), 1e-30)


def available_backends() -> dict:
    """Backends other than NumPy that can run here: kind -> array converter."""
    found = {}
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            found["cupy"] = cupy.asarray
    except Exception:  # no CuPy, no driver, no device: the backend is not available
        pass
    return found


def _timed(fn, sync=lambda: None):
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return result, (time.perf_counter() - start) * 1e3


def run(args: argparse.Namespace) -> int:
    rng = np.random.default_rng(args.seed)
    rows = []  # (backend, dtype, what, error, tolerance, ms)

    tiny = make_case("tiny", np.float64, rng)
    expected, _ = _timed(lambda: oracle.deform_conv2d(**tiny))
    got, ms = _timed(lambda: cudcn.deform_conv2d(**tiny))
    rows.append(("numpy", "float64", "forward vs oracle", relative_error(got, expected), 1e-12, ms))
    fd = _finite_difference_error(tiny, rng)
    rows.append(("numpy", "float64", "backward vs finite diff.", fd, 1e-6, float("nan")))

    for kind, convert in available_backends().items():
        sync = _synchronizer(kind)
        for dtype in ("float64", "float32"):
            case = make_case("small", np.dtype(dtype), rng)
            out = cudcn.deform_conv2d(**case)
            grad_output = rng.standard_normal(out.shape).astype(dtype)
            grads = cudcn.deform_conv2d_backward(grad_output, **case)
            moved = {k: convert(v) if isinstance(v, np.ndarray) else v for k, v in case.items()}
            dev_out, ms = _timed(lambda: cudcn.deform_conv2d(**moved), sync)
            rows.append((kind, dtype, "forward", relative_error(_host(dev_out), out), TOLERANCE[dtype], ms))
            dev_grads, ms = _timed(lambda: cudcn.deform_conv2d_backward(convert(grad_output), **moved), sync)
            for field in grads._fields:
                err = relative_error(_host(getattr(dev_grads, field)), getattr(grads, field))
                rows.append((kind, dtype, f"grad {field}", err, TOLERANCE[dtype], ms if field == "input" else float("nan")))

    print(f"{'backend':8} {'dtype':8} {'check':26} {'rel. error':>11} {'tolerance':>10} {'ms':>8}  result")
    failed = 0
    for kind, dtype, what, err, tol, ms in rows:
        ok = err <= tol
        failed += not ok
        ms_text = "" if ms != ms else f"{ms:8.2f}"
        print(f"{kind:8} {dtype:8} {what:26} {err:11.2e} {tol:10.0e} {ms_text:>8}  {'ok' if ok else 'FAIL'}")
    if "cupy" not in {r[0] for r in rows}:
        print("CUDA backend: not available here (no CuPy or no GPU); checked the NumPy backend only.")
    print(f"{len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0


def _host(array):
    return array.get() if hasattr(array, "get") else array


def _synchronizer(kind: str):
    if kind == "cupy":
        import cupy

        return lambda: cupy.cuda.get_current_stream().synchronize()
    return lambda: None
