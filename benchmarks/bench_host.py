"""Host time: what a call costs beyond the computation, through each door of cudcn.

DCNv2 (mask and bias), 3x3, padding 1, at two shapes: N1 C4->4 6x6 (where
the host time is all there is) and N8 C64->64 32x32 (a layer that computes
in tens of microseconds on a GPU).

(a) The torch door (``cudcn.torch.deform_conv2d`` and the ``DeformConv2d``
    module on CPU tensors that require gradients): one forward, and one
    forward + backward (``y.backward(grad)``), with the NumPy backend's
    ``forward``/``backward`` replaced by functions that return ready results,
    so that the time is the door's alone (its checks, DLPack, autograd).
    Beside it: a do-nothing ``torch.autograd.Function`` with the same tensors
    (what any Python autograd op costs); and at the small shape, as a
    cross-check, the door with the real backend minus the backend alone, and
    torchvision's CPU op whole.
(b) The NumPy door (``cudcn.deform_conv2d``, ``cudcn.deform_conv2d_backward``)
    with the same stand-in backend.
(c) The CUDA backend's host side, without a GPU: validation, then the real
    ``cudcn.backends.cuda.algorithms.run`` with the dry-run engine of the
    test suite (tests/emulation/dry_run.py: kernels and GEMMs recorded, not
    run; CuPy's own device work -- copies, memsets, reductions -- recorded
    too), per algorithm and dtype, with the stream operations of each
    direction counted. On a GPU each operation also costs CuPy's launch
    overhead (about 5-10 us, unmeasured here), and CuPy's allocations cost
    more than NumPy's.

Each figure is the median CPU time of this process per call, over samples
of ten calls (after a warm-up), with the 10th-90th percentile range of the
samples; the median wall time is recorded too. The machine may be shared:
CPU time leaves out the time spent waiting for a core, and the load average
at the start and at the end is recorded with the results. torch runs one
thread.

    python benchmarks/bench_host.py [--calls 2000] [--out benchmarks/results]

Writes bench_host.md and bench_host.json to --out and prints the tables.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the dry-run engine (tests/emulation/dry_run.py)
sys.path.insert(0, str(ROOT))

import cudcn  # noqa: E402
from cudcn import backends  # noqa: E402
from cudcn.cli.arguments import positive_int  # noqa: E402
from cudcn.cli.info import load_average, load_text, machine_record  # noqa: E402

#: name -> (N, C_in, C_out, H = W); 3x3 kernel, padding 1, one offset group, mask and bias.
SHAPES = {"N1 C4 6×6": (1, 4, 4, 6), "N8 C64 32×32": (8, 64, 64, 32)}
PADDING = 1
#: The shape at which the door is also timed with the real backend (at the
#: larger one the backend's own spread is far wider than the door's time).
CROSS_CHECK = "N1 C4 6×6"


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------


def per_call_us(functions: dict[str, Callable[[], Any]], calls: int, rounds: int = 10,
                warmup: int = 20, batch: int = 10) -> dict[str, dict[str, float]]:
    """Each function's time per call in us: the median and the 10th/90th
    percentile over samples of ``batch`` calls, in this process's CPU time
    (what the call costs the host; on a shared machine the wall time also
    counts waiting for a core), and the median wall time beside it.

    The samples are interleaved in ``rounds`` blocks (each block takes
    calls/rounds calls of every function in turn), so that a change of
    load falls on all.
    """
    for fn in functions.values():
        for _ in range(warmup):
            fn()
    cpu: dict[str, list[float]] = {name: [] for name in functions}
    wall: dict[str, list[float]] = {name: [] for name in functions}
    samples = max(calls // (rounds * batch), 1)
    for _ in range(rounds):
        for name, fn in functions.items():
            for _ in range(samples):
                start, start_cpu = time.perf_counter(), time.process_time()
                for _ in range(batch):
                    fn()
                cpu[name].append((time.process_time() - start_cpu) / batch)
                wall[name].append((time.perf_counter() - start) / batch)
    return {name: _summary(cpu[name], wall[name]) for name in functions}


def _summary(cpu: list[float], wall: list[float]) -> dict[str, float]:
    us = np.asarray(cpu) * 1e6
    return {"median": float(np.median(us)), "p10": float(np.percentile(us, 10)),
            "p90": float(np.percentile(us, 90)), "wall_median": float(np.median(wall) * 1e6),
            "samples": len(us)}


def _arguments(shape: tuple[int, int, int, int], dtype: str = "float32", seed: int = 0) -> dict[str, np.ndarray]:
    n, c, o, size = shape
    rng = np.random.default_rng(seed)
    return {
        "input": rng.standard_normal((n, c, size, size)).astype(dtype),
        "offset": (rng.uniform(-2, 2, (n, 18, size, size)) + 0.25).astype(dtype),
        "weight": (rng.standard_normal((o, c, 3, 3)) / np.sqrt(9 * c)).astype(dtype),
        "bias": rng.standard_normal(o).astype(dtype),
        "mask": rng.uniform(0, 1, (n, 9, size, size)).astype(dtype),
    }


def _results(shape: tuple[int, int, int, int]) -> tuple[dict, Any, np.ndarray, np.ndarray, tuple]:
    """(arguments, geometry, output, grad_output, gradients) of one call, computed by the NumPy backend."""
    arrays = _arguments(shape)
    numpy_backend = backends.load("numpy")
    geom = cudcn.geometry.validate(**arrays, padding=PADDING)
    output = numpy_backend.forward(geom, *(arrays[k] for k in ("input", "offset", "weight", "bias", "mask")))
    grad_output = np.ones_like(output)
    gradients = numpy_backend.backward(geom, grad_output, *(arrays[k] for k in ("input", "offset", "weight", "mask")))
    # Contiguous, as the CUDA backend returns them: the NumPy backend's weight
    # gradient is a transposed view, whose copy is data work, not host time.
    gradients = tuple(None if g is None else np.ascontiguousarray(g) for g in gradients)
    return arrays, geom, output, grad_output, gradients


@contextlib.contextmanager
def ready_backend(outputs: Any, gradients: Any) -> Iterator[None]:
    """The NumPy backend's forward and backward replaced by functions that
    return ready results (what the door hands on is then all that is timed)."""
    module = backends.load("numpy")
    saved = module.forward, module.backward
    module.forward = lambda geom, *arrays: outputs
    module.backward = lambda geom, *arrays: gradients
    try:
        yield
    finally:
        module.forward, module.backward = saved


# --------------------------------------------------------------------------
# (a) the torch door, (b) the NumPy door
# --------------------------------------------------------------------------


def torch_door(shape: tuple[int, int, int, int], calls: int, cross_check: bool) -> dict[str, Any]:
    import torch

    import cudcn.torch

    arrays, geom, output, grad_output, gradients = _results(shape)
    numpy_backend = backends.load("numpy")
    leaves = {k: torch.from_numpy(v.copy()).requires_grad_(True) for k, v in arrays.items()}
    grad = torch.from_numpy(grad_output)
    layer = cudcn.torch.DeformConv2d(shape[1], shape[2], 3, padding=PADDING)
    with torch.no_grad():
        layer.weight.copy_(leaves["weight"])
        layer.bias.copy_(leaves["bias"])
    x, offset, mask = leaves["input"], leaves["offset"], leaves["mask"]

    def function():
        return cudcn.torch.deform_conv2d(x, offset, leaves["weight"], leaves["bias"], padding=PADDING, mask=mask)

    def module():
        return layer(x, offset, mask)

    def backward(call):
        def run():
            for t in (*leaves.values(), layer.weight, layer.bias):
                t.grad = None  # no accumulation: that would be work, not host time
            call().backward(grad)
        return run

    out_tensor = torch.from_numpy(output)
    grad_tensors = [torch.from_numpy(g) for g in gradients]

    class Nothing(torch.autograd.Function):
        """The floor: a Python autograd op that does no work."""

        @staticmethod
        def forward(ctx, *tensors):
            ctx.save_for_backward(*tensors)
            return out_tensor.view_as(out_tensor)

        @staticmethod
        def backward(ctx, grad_out):
            # New tensor objects, as a backend's results are: autograd then
            # keeps them as the gradients instead of copying them.
            return tuple(g.view_as(g) for g in grad_tensors)

    def nothing():
        return Nothing.apply(x, offset, leaves["weight"], leaves["bias"], mask)

    result: dict[str, Any] = {}
    with ready_backend(output, gradients):
        result["door"] = per_call_us({
            "function forward": function, "module forward": module,
            "function forward+backward": backward(function), "module forward+backward": backward(module),
            "autograd.Function floor forward": nothing, "autograd.Function floor forward+backward": backward(nothing),
        }, calls)
    if not cross_check:
        return result
    # Cross-check: the door with the real backend, minus the backend alone.
    numpy_args = [arrays[k] for k in ("input", "offset", "weight", "bias", "mask")]
    timed = {
        "function forward": function, "function forward+backward": backward(function),
        "backend forward": lambda: numpy_backend.forward(geom, *numpy_args),
        "backend backward": lambda: numpy_backend.backward(
            geom, grad_output, *(arrays[k] for k in ("input", "offset", "weight", "mask"))),
    }
    try:
        import torchvision.ops

        weight, bias = leaves["weight"], leaves["bias"]

        def torchvision_forward():
            return torchvision.ops.deform_conv2d(x, offset, weight, bias, padding=PADDING, mask=mask)

        torchvision_forward()  # its compiled op may be missing, or built for another torch
        timed["torchvision forward"] = torchvision_forward
        timed["torchvision forward+backward"] = backward(torchvision_forward)
    except Exception as error:
        print(f"torchvision left out: {type(error).__name__}: {error}", file=sys.stderr)
    result["with backend"] = per_call_us(timed, calls // 2, warmup=5, batch=1)
    return result


def numpy_door(shape: tuple[int, int, int, int], calls: int) -> dict[str, Any]:
    arrays, _, output, grad_output, gradients = _results(shape)
    with ready_backend(output, gradients):
        return per_call_us({
            "forward": lambda: cudcn.deform_conv2d(**arrays, padding=PADDING),
            "backward": lambda: cudcn.deform_conv2d_backward(grad_output, **arrays, padding=PADDING),
        }, calls)


# --------------------------------------------------------------------------
# (c) the CUDA backend's host side, dry run
# --------------------------------------------------------------------------


def cuda_host(shape: tuple[int, int, int, int], dtype: str, algorithm: str, calls: int) -> dict[str, Any]:
    """Validation and algorithms.run on the dry-run engine: times and operations per direction."""
    from cudcn.backends.cuda import algorithms
    from cudcn.geometry import validate
    from emulation.dry_run import DryRunEngine

    n, c, o, size = shape
    arrays = {k: np.empty(v.shape, dtype) for k, v in _arguments(shape).items()}  # never touched
    grad_output = np.empty((n, o, size, size), dtype)
    engine = DryRunEngine()
    adopted = {k: engine.adopt(v) for k, v in arrays.items()}
    grad_adopted = engine.adopt(grad_output)
    forward_args = [adopted[k] for k in ("input", "offset", "weight", "bias", "mask")]
    backward_args = [grad_adopted, *(adopted[k] for k in ("input", "offset", "weight", "mask"))]
    result: dict[str, Any] = {}
    with cudcn.algorithm(algorithm):
        geom = validate(**arrays, padding=PADDING)
        for direction, args in (("forward", forward_args), ("backward", backward_args)):
            engine.clear()
            algorithms.run(direction, engine, geom, *args)
            ops = engine.operations()
            result[f"{direction} operations"] = dict(ops)
            result[f"{direction} launches"] = sum(ops.values())
            result[f"{direction} kernels"] = [name.split("<")[0] for name, _ in engine.launches]
            result[f"{direction} allocations"] = engine.xp.allocations

        def run(direction, args):
            def call():
                algorithms.run(direction, engine, geom, *args)
                engine.clear()
            return call

        result["times"] = per_call_us({
            "validate forward": lambda: validate(**arrays, padding=PADDING),
            "validate backward": lambda: validate(**arrays, grad_output=grad_output, padding=PADDING),
            "run forward": run("forward", forward_args),
            "run backward": run("backward", backward_args),
        }, calls)
    times = result["times"]
    result["forward us"] = times["validate forward"]["median"] + times["run forward"]["median"]
    result["backward us"] = times["validate backward"]["median"] + times["run backward"]["median"]
    return result


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def _cell(stats: dict[str, float]) -> str:
    return f"{stats['median']:.1f} ({stats['p10']:.0f}–{stats['p90']:.0f})"


def markdown(record: dict) -> str:
    env = record["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    lines = [
        "# Host time per call",
        "",
        f"{env['date']}, {env['machine']}, {env['cpu_count']} CPUs, {load_text(env['load_at_start'])} at the "
        f"start, {load_text(env['load_at_end'])} at the end; {versions}.",
        "Median CPU time per call in µs, 10th–90th percentile of samples of 10 calls in parentheses; DCNv2 3x3, "
        "padding 1, mask and bias, float32 unless named.",
        "",
        "## (a) torch door on CPU tensors, beyond the backend's work",
        "",
        "The backend replaced by ready results; the floor is a do-nothing `torch.autograd.Function` with the same "
        "tensors.",
        "",
        "| shape | function fwd | function fwd+bwd | module fwd | module fwd+bwd | floor fwd | floor fwd+bwd |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in record["torch"].items():
        d = r["door"]
        lines.append(f"| {name} | " + " | ".join(_cell(d[k]) for k in (
            "function forward", "function forward+backward", "module forward", "module forward+backward",
            "autograd.Function floor forward", "autograd.Function floor forward+backward")) + " |")
    lines += [
        "",
        "Cross-check with the real NumPy backend: the door whole, the backend alone, and torchvision's CPU op whole:",
        "",
        "| shape | door fwd | backend fwd | door − backend fwd | door fwd+bwd | backend fwd+bwd "
        "| door − backend fwd+bwd | torchvision fwd | torchvision fwd+bwd |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in record["torch"].items():
        if "with backend" not in r:
            continue
        w = r["with backend"]
        forward = w["function forward"]["median"] - w["backend forward"]["median"]
        both = w["function forward+backward"]["median"] - w["backend forward"]["median"] - w["backend backward"]["median"]
        tv = [_cell(w[k]) if k in w else "-" for k in ("torchvision forward", "torchvision forward+backward")]
        backend_both = w["backend forward"]["median"] + w["backend backward"]["median"]
        lines.append(f"| {name} | {_cell(w['function forward'])} | {_cell(w['backend forward'])} | {forward:.0f} | "
                     f"{_cell(w['function forward+backward'])} | {backend_both:.1f} | {both:.0f} | " + " | ".join(tv)
                     + " |")
    lines += [
        "",
        "## (b) NumPy door (`cudcn.deform_conv2d`, `cudcn.deform_conv2d_backward`), beyond the backend's work",
        "",
        "| shape | forward | backward |",
        "|---|---|---|",
    ]
    for name, r in record["numpy"].items():
        lines.append(f"| {name} | {_cell(r['forward'])} | {_cell(r['backward'])} |")
    lines += [
        "",
        "## (c) CUDA backend's host side, dry run (no GPU; kernels, GEMMs and CuPy's device work recorded, not run)",
        "",
        "Validation + `algorithms.run`; stream operations per direction (kernels + GEMMs + CuPy copies, memsets, "
        "reductions). On a GPU each operation adds CuPy's launch overhead (unmeasured here).",
        "",
        "| shape | dtype | algorithm | forward µs | forward ops | backward µs | backward ops |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in record["cuda"]:
        t = r["times"]
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {r['algorithm']} | {r['forward us']:.1f} "
            f"(validate {t['validate forward']['median']:.1f}) | {r['forward launches']} | {r['backward us']:.1f} "
            f"(validate {t['validate backward']['median']:.1f}) | {r['backward launches']} |")
    lines += ["", "Operations per direction:", ""]
    for r in record["cuda"]:
        for direction in ("forward", "backward"):
            ops = ", ".join(f"{k} {v}" for k, v in r[f"{direction} operations"].items() if v)
            lines.append(f"- {r['shape']} {r['dtype']} {r['algorithm']} {direction}: {ops}; kernels "
                         f"{', '.join(r[f'{direction} kernels'])}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=positive_int, default=2000,
                        help="timed calls of each function (fewer where a real backend runs; default 2000)")
    parser.add_argument("--shapes", type=int, nargs="+", default=[1, 2], choices=[1, 2],
                        help="which shapes: 1 = N1 C4 6x6, 2 = N8 C64 32x32 (default both)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results",
                        help="folder for bench_host.md and bench_host.json (default benchmarks/results)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # host time is one thread's; others only add noise on a shared machine
    load_at_start = load_average()
    record: dict[str, Any] = {"torch": {}, "numpy": {}, "cuda": []}
    for name, shape in [list(SHAPES.items())[i - 1] for i in args.shapes]:
        print(f"measuring {name}", file=sys.stderr)
        record["torch"][name] = torch_door(shape, args.calls, cross_check=name == CROSS_CHECK)
        record["numpy"][name] = numpy_door(shape, args.calls)
        for dtype in ("float32", "float16"):
            for algorithm in ("im2col", "fused"):
                record["cuda"].append({"shape": name, "dtype": dtype, "algorithm": algorithm}
                                      | cuda_host(shape, dtype, algorithm, args.calls))

    record["environment"] = machine_record(("numpy", "torch", "torchvision")) | {
        "load_at_start": load_at_start, "load_at_end": load_average(), "calls": args.calls,
        "torch_threads": torch.get_num_threads(),
    }
    table = markdown(record)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_host.md").write_text(table)
    (args.out / "bench_host.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
