"""CPU speed and memory: cudcn's NumPy backend against the CPU peers that are installed.

DCNv2 (with mask), 3x3, padding 1, float32, forward + backward (every
gradient), at three shapes:

    N8 C64->64 32x32,  N4 C128->128 64x64,  N2 C256->256 64x64

against the pure-torch ``grid_sample`` implementation of ``cudcn bench``,
``torchvision.ops.deform_conv2d`` and ``paddle.vision.ops.deform_conv2d`` on
the CPU, whichever are installed. All run in this process on the same
inputs, interleaved round by round (``cudcn.cli.bench.median_ms``, with a
pause before each timed call so that the previous library's idle threads
stop spinning first); the table gives medians. Each output is compared
with cudcn's in float64 first, so the timed computations are the same. Peak
memory is that of cudcn's NumPy backend as tracemalloc traces it (NumPy's
arrays), above the arguments, in units of the column buffer
(N*Ho*Wo*kh*kw*C_in values).

The floor: a plain ``torch.nn.functional.conv2d`` of the same shape, forward
+ backward with the gradients it has (input, weight, bias). A deformable
convolution does the same matrix products plus the sampling, so cudcn ÷
conv2d is how far cudcn is from that limit.

The BLAS kernels are the machine's own: OpenBLAS reads OPENBLAS_CORETYPE and
OPENBLAS_L2_SIZE when it loads (a machine may set them to hold OpenBLAS to an
older kernel, e.g. Haswell's AVX2 on an AVX-512 CPU), so where either is set
the script runs itself again in a child process without them, and only
there. The record names the kernel each BLAS library chose (threadpoolctl's
``architecture``: NumPy's and scipy's OpenBLAS) and torch's CPU capability
and oneDNN version.

    python benchmarks/bench_cpu.py [--repeat 9] [--shapes 1 2 3] [--out benchmarks/results]

Writes bench_cpu.md (the tables) and bench_cpu.json (the figures, date,
machine, CPU count, threads and versions) to --out, and prints the tables.
With no options it regenerates what README quotes (README's "Speed and
memory (CPU)" section holds bench_cpu.md's lines verbatim; a test checks).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

import cudcn
from cudcn.cli.arguments import int_range, is_installed
from cudcn.cli.bench import (SETTLE_S, Case, NotAvailable, Prepared, _torch_prepared, implementations,
                             make_arguments, median_ms, peak_traced_bytes)
from cudcn.cli.info import load_average, load_text, machine_record

#: (N, C_in = C_out, H = W)
SHAPES = ((8, 64, 32), (4, 128, 64), (2, 256, 64))

#: Implementations timed, by their name in ``cudcn.cli.bench.implementations``, all on the CPU, and the floor.
FLOOR = "torch conv2d (floor)"
TIMED = ("cudcn (numpy backend)", "pure torch (grid_sample)", "torchvision", "paddle", FLOOR)
OURS = TIMED[0]

#: Environment variables that hold OpenBLAS to a kernel or cache size other than the one it would choose.
OPENBLAS_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def environment_without_openblas_overrides(environ: dict[str, str]) -> dict[str, str] | None:
    """environ less OPENBLAS_VARIABLES, or None when none of them is set."""
    if not any(name in environ for name in OPENBLAS_VARIABLES):
        return None
    return {k: v for k, v in environ.items() if k not in OPENBLAS_VARIABLES}


def conv2d_floor(input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None):
    """The plain convolution of the same shape (offset and mask unused)."""
    import torch.nn.functional as F

    return F.conv2d(input, weight, bias, stride=stride, padding=padding, dilation=dilation)


def floor_prepared(case: Case, args: dict) -> Prepared:
    """conv2d_floor on torch CPU tensors; the backward gives the input, weight and bias gradients."""
    if not is_installed("torch"):
        raise NotAvailable("torch not installed")
    return _torch_prepared(conv2d_floor, case, args, "cpu")


def shape_label(case: Case) -> str:
    return f"N{case.batch} C{case.in_channels}→{case.out_channels} {case.size}×{case.size}"


def measure(case: Case, warmup: int, repeat: int) -> dict:
    """Median times of every available implementation (interleaved) and cudcn's peak memory."""
    args = make_arguments(case)
    reference = cudcn.deform_conv2d(**args, padding=case.padding)
    scale = float(np.abs(reference).max())
    ready, status, difference = {}, {}, {}
    found = [(name, prepare) for name, device, prepare in implementations(case, args)
             if device == "cpu" and name in TIMED]
    for name, prepare in found + [(FLOOR, lambda: floor_prepared(case, args))]:
        try:
            prepared = prepare()
            output = prepared.to_numpy(prepared.forward())
        except (NotAvailable, ImportError) as error:
            status[name] = f"not available: {error}"
            continue
        ready[name] = prepared
        status[name] = "ok"
        if name != FLOOR:  # the floor computes something else: nothing to compare
            difference[name] = float(np.abs(output - reference).max()) / scale
    names = list(ready)
    timed = [(ready[n].forward, ready[n].synchronize) for n in names]
    timed += [(ready[n].forward_backward, ready[n].synchronize) for n in names]
    medians = median_ms(timed, warmup, repeat, settle_s=SETTLE_S)
    forward, forward_backward = medians[:len(names)], medians[len(names):]

    arrays = {k: v.astype(case.dtype) for k, v in args.items()}
    grad_output = np.ones_like(reference, dtype=case.dtype)
    column_bytes = case.batch * case.size**2 * case.kernel**2 * case.in_channels * np.dtype(case.dtype).itemsize
    peak_forward = peak_traced_bytes(lambda: cudcn.deform_conv2d(**arrays, padding=case.padding))
    peak_backward = peak_traced_bytes(
        lambda: cudcn.deform_conv2d_backward(grad_output, **arrays, padding=case.padding))
    return {
        "shape": shape_label(case),
        "case": asdict(case) | {"padding": case.padding},
        "implementations": {
            n: {"status": status[n]}
            | ({"forward_ms": forward[names.index(n)], "forward_backward_ms": forward_backward[names.index(n)]}
               if n in ready else {})
            | ({"max_rel_diff": difference[n]} if n in difference else {})
            for n in status
        },
        "column_buffer_bytes": column_bytes,
        "peak_forward_bytes": peak_forward,
        "peak_backward_bytes": peak_backward,
    }


def _library_owner(path: str, fallback: str) -> str:
    """The package that shipped a shared library ("numpy" for .../numpy.libs/libscipy_openblas64_.so)."""
    for part in reversed(Path(path).parts[:-1]):
        for package in ("numpy", "scipy", "torch"):
            if part in (package, f"{package}.libs"):
                return package
    return fallback


def threads_and_kernels() -> tuple[dict, dict]:
    """({library: threads}, {library: kernel}): torch's threads, CPU capability
    and oneDNN version, and for each BLAS library loaded (scipy's is loaded
    here if it is not yet) its threads and the kernel it chose."""
    threads, kernels = {}, {}
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        threads["torch"] = torch.get_num_threads()
        onednn = re.search(r"MKL-DNN v([\d.]+)", torch.__config__.show())
        kernels["torch"] = torch.backends.cpu.get_cpu_capability() + (f", oneDNN {onednn.group(1)}" if onednn else "")
    try:
        import scipy.linalg  # noqa: F401 (loads scipy's BLAS, so that it is reported)
        from threadpoolctl import threadpool_info
    except ImportError:
        return threads, kernels
    for pool in threadpool_info():
        if pool["user_api"] == "blas":
            name = f"{_library_owner(pool['filepath'], pool['prefix'])} ({pool['internal_api']})"
            threads[name] = pool["num_threads"]
            kernels[name] = pool.get("architecture") or "unknown"
    return threads, kernels


def environment(warmup: int, repeat: int, load_at_start: list[float] | None) -> dict:
    """Date, machine, versions, the threads and kernels of torch and BLAS, the
    OpenBLAS variables as the measuring process saw them, the rounds, and the
    load average before the benchmark started."""
    threads, kernels = threads_and_kernels()
    record = machine_record(("numpy", "scipy", "torch", "torchvision", "paddlepaddle"))
    return record | {"threads": threads, "kernels": kernels,
                     "openblas_variables": {name: os.environ.get(name) for name in OPENBLAS_VARIABLES},
                     "warmup": warmup, "repeat": repeat, "load_average_at_start": load_at_start}


def kernels_text(env: dict) -> str:
    """"kernels: numpy (openblas) SkylakeX, ... with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset"."""
    if "kernels" not in env:
        return "kernels not recorded"
    held = {k: v for k, v in env["openblas_variables"].items() if v is not None}
    where = (", ".join(f"{k}={v}" for k, v in held.items()) if held
             else " and ".join(env["openblas_variables"]) + " unset")
    return "kernels: " + ", ".join(f"{k} {v}" for k, v in env["kernels"].items()) + f", with {where}"


def markdown(env: dict, results: list[dict]) -> str:
    """The two tables: times with ratios, and cudcn's peak memory."""
    present = [n for n in TIMED if any(r["implementations"].get(n, {}).get("status") == "ok" for r in results)]
    peers = [n for n in present if n != OURS]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    lines = [
        "# CPU benchmark: DCNv2 3x3, float32, forward + backward",
        "",
        f"{env['date']}, {env['machine']}, {env['cpu_count']} CPUs"
        + (f", {load_text(env['load_average_at_start'])} at the start" if "load_average_at_start" in env else "")
        + "; threads: "
        + ", ".join(f"{k} {v}" for k, v in env["threads"].items()) + f"; {kernels_text(env)}; {versions}.",
        f"Medians of {env['repeat']} interleaved rounds (after {env['warmup']} warm-up), "
        "forward + backward (forward alone in parentheses), in ms"
        + (f"; {FLOOR} is a plain convolution of the same shape (its input, weight and bias gradients), "
           "so cudcn / conv2d is the distance to that limit:" if FLOOR in present else ":"),
        "",
        "| shape | " + " | ".join(present) + " | " + " | ".join(f"cudcn / {p}" for p in peers) + " |",
        "|---" * (1 + len(present) + len(peers)) + "|",
    ]
    for r in results:
        impl = r["implementations"]
        cells = [f"{impl[n]['forward_backward_ms']:.0f} ({impl[n]['forward_ms']:.0f})"
                 if impl.get(n, {}).get("status") == "ok" else "-" for n in present]
        ours = impl[OURS]["forward_backward_ms"]
        ratios = [f"{ours / impl[p]['forward_backward_ms']:.2f}" if impl.get(p, {}).get("status") == "ok" else "-"
                  for p in peers]
        lines.append(f"| {r['shape']} | " + " | ".join(cells + ratios) + " |")
    lines += [
        "",
        "Peak memory of cudcn's NumPy backend (tracemalloc, above the arguments), in column buffers:",
        "",
        "| shape | column buffer | forward | backward |",
        "|---|---|---|---|",
    ]
    for r in results:
        column = r["column_buffer_bytes"]
        lines.append(f"| {r['shape']} | {column / 2**20:.0f} MiB | {r['peak_forward_bytes'] / column:.2f} "
                     f"| {r['peak_backward_bytes'] / column:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int_range(1, 100), default=9,
                        help="timed rounds, 1 to 100; medians are reported (default 9)")
    parser.add_argument("--warmup", type=int_range(0, 100), default=1, help="untimed rounds first, 0 to 100 (default 1)")
    parser.add_argument("--shapes", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3],
                        help="which of the three shapes (default all)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results",
                        help="folder for bench_cpu.md and bench_cpu.json (default benchmarks/results)")
    args = parser.parse_args()
    environ = environment_without_openblas_overrides(dict(os.environ))
    if environ is not None:  # OpenBLAS has read them already: measure in a process without them
        return subprocess.call([sys.executable, *sys.orig_argv[1:]], env=environ)

    load_at_start = load_average()
    results = []
    for index in args.shapes:
        n, c, size = SHAPES[index - 1]
        case = Case(n, c, c, size, 3, 1, True, "float32")
        results.append(measure(case, args.warmup, args.repeat))
        print(f"measured {results[-1]['shape']}", file=sys.stderr)
    env = environment(args.warmup, args.repeat, load_at_start)
    table = markdown(env, results)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_cpu.md").write_text(table)
    (args.out / "bench_cpu.json").write_text(json.dumps(env | {"results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
