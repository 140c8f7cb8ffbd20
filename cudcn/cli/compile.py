"""``cudcn compile``: compile every kernel instantiation through NVRTC.

Runs with no GPU, through CuPy's own compile path and options
(:mod:`cudcn.backends.cuda.compile`), so it fails where the kernels would
not compile at run time (no CUDA headers, say). Prints a line per
architecture and dtype (``-v``: the NVRTC options and a line per
instantiation, naming kernel and dtype; ``-q``: only failures and the total)
and exits 1 on any failure, with the failing instantiations and NVRTC's log.
Where CuPy sees a device, the command then loads every dtype's module on it,
which fills CuPy's on-disk kernel cache.

With ``--resources`` it compiles the same way (default architectures sm_80
and sm_90) and prints instead, per instantiation and architecture, what
ptxas reports (registers, spill stores and loads, stack frame, static shared
memory), the launches' block size and dynamic shared memory, and the
theoretical blocks per SM and occupancy on an A100 (sm_80) and an H100
(sm_90), with the budgets each row breaks
(:mod:`cudcn.backends.cuda.resources`). It is a flag of ``compile`` rather
than a command of its own because it is the same compile -- same options,
architectures, dtypes and failures -- read for its resources.
"""

from __future__ import annotations

import argparse
import time

from cudcn.backends.cuda import compile as nvrtc_compile
from cudcn.backends.cuda import kernels
from cudcn.cli.arguments import require

DEFAULT_ARCHS = ("sm_75", "sm_80", "sm_90")
#: Architectures of the resource report by default: those of the GPUs it knows (A100, H100).
RESOURCE_ARCHS = ("sm_80", "sm_90")


def architecture(text: str) -> int:
    """argparse type: "sm_80" (or "compute_80", "80") -> 80; two or three digits."""
    number = text.lower().removeprefix("sm_").removeprefix("compute_")
    if not (number.isdigit() and 2 <= len(number) <= 3):
        raise argparse.ArgumentTypeError(f"expected an architecture such as sm_80, got {text!r}")
    return int(number)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--arch",
        type=architecture,
        nargs="+",
        metavar="SM",
        help=f"target architectures, e.g. sm_80 (default: {' '.join(DEFAULT_ARCHS)}; "
             f"with --resources {' '.join(RESOURCE_ARCHS)})",
    )
    parser.add_argument(
        "--resources",
        action="store_true",
        help="print registers, spills and shared memory of every instantiation (ptxas), and the blocks per "
             "SM and theoretical occupancy of its launches on an A100 (sm_80) and an H100 (sm_90)",
    )
    parser.add_argument(
        "--dtype",
        nargs="+",
        default=list(kernels.TYPES),
        choices=list(kernels.TYPES),
        help="dtypes to compile (default: all)",
    )
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument("-v", "--verbose", action="store_true",
                          help="print the NVRTC options and a line per instantiation")
    loudness.add_argument("-q", "--quiet", action="store_true", help="print only failures and the total")


def run(args: argparse.Namespace) -> int:
    chosen = args.arch or [architecture(a) for a in (RESOURCE_ARCHS if args.resources else DEFAULT_ARCHS)]
    archs = list(dict.fromkeys(chosen))
    require({"cupy": "CuPy"}, "cudcn compile",
            'install the CUDA extra that matches your driver: pip install "cudcn[cuda12]" or "cudcn[cuda13]"')
    try:
        nvrtc = nvrtc_compile.nvrtc()
        version = nvrtc.getVersion()
        supported = set(nvrtc.getSupportedArchs())
    except Exception as error:  # CuPy without libnvrtc: say so, fail
        print(f"NVRTC is not available: {error} (the CUDA extras bring it: "
              'pip install "cudcn[cuda12]" or "cudcn[cuda13]")')
        return 1

    def say(text: str, *, detail: bool = False, ok: bool = True) -> None:
        """Failures always; summary lines unless --quiet; detail lines with --verbose only."""
        if not ok or args.verbose or (not detail and not args.quiet):
            print(text)

    def say_rows(rows: list[tuple[str, bool, str]], prefix: str) -> int:
        """A detail line per (name, ok, detail) row; returns how many failed."""
        for name, ok, detail in rows:
            say(f"{prefix} {name:79} {'ok' if ok else 'FAIL'}  {detail if ok else ''}", detail=True, ok=ok)
        return sum(not ok for _, ok, _ in rows)

    say(f"NVRTC {version[0]}.{version[1]}; kernels from {kernels.kernel_dir()}")
    source = kernels.source()
    if args.resources:
        unsupported = [f"sm_{a}" for a in archs if a not in supported]
        if unsupported:
            print(f"{' '.join(unsupported)}: this NVRTC cannot target it (supported: {sorted(supported)})  FAIL")
            return 1
        return _resources(source, archs, args.dtype, quiet=args.quiet)
    failed = total = 0
    for arch in archs:
        if arch not in supported:
            print(f"sm_{arch}  this NVRTC cannot target it (supported: {sorted(supported)})  FAIL")
            failed += 1
            total += 1
            continue
        try:
            options = nvrtc_compile.runtime_options(arch)
        except RuntimeError as error:  # what CuPy would raise at run time, e.g. no CUDA headers
            print(f"sm_{arch}  CuPy cannot compile here: {error}  FAIL")
            return 1
        say(f"sm_{arch}  NVRTC options: {' '.join(options)}", detail=True)
        for dtype in args.dtype:
            start = time.perf_counter()
            rows = nvrtc_compile.compile_dtype(source, dtype, options)
            seconds = time.perf_counter() - start
            kernel = {name: name.split("<", 1)[0] for name, _, _ in rows}
            dtype_failed = say_rows([(f"{kernel[name]:20} {name}", ok, detail) for name, ok, detail in rows],
                                    f"sm_{arch:<4} {dtype:9}")
            total += len(rows)
            failed += dtype_failed
            if dtype_failed:
                print(f"NVRTC log (sm_{arch}, {dtype}):\n{rows[0][2]}")
            say(f"sm_{arch:<4} {dtype:9} {len(rows) - dtype_failed} of {len(rows)} instantiations compiled "
                f"in {seconds:.1f} s" + (", FAILED" if dtype_failed else ""))
    if nvrtc_compile.device_count() > 0:
        loaded = nvrtc_compile.warm_cache(args.dtype)
        load_failed = say_rows(loaded, "device  ")
        total += len(loaded)
        failed += load_failed
        say(f"device   {len(loaded) - load_failed} of {len(loaded)} instantiations loaded (kernel cache filled)")
    print(f"{total - failed} of {total} instantiations compiled" + (", FAILED" if failed else ""))
    return 1 if failed else 0


def _resources(source: str, archs: list[int], dtypes: list[str], quiet: bool) -> int:
    """Print the resource report (a Markdown table; ``quiet``: only the rows
    that break a budget) and a summary line; 1 if a compile failed."""
    from cupy.cuda import compiler

    from cudcn.backends.cuda import resources

    rows = []
    for arch in archs:
        for dtype in dtypes:
            try:
                rows += resources.rows_for(source, dtype, arch)
            except (compiler.CompileException, RuntimeError) as error:
                print(f"sm_{arch} {dtype}: compile failed  FAIL\n{error}")
                return 1
    broken = [row for row in rows if resources.budget_problems(row)]
    print(resources.table(broken if quiet else rows))
    gpus = ", ".join(f"sm_{a} = {resources.GPUS[a].name}" for a in archs if a in resources.GPUS)
    print(f"{len(rows)} instantiations ({gpus or 'no GPU model for these architectures'}); "
          f"budgets (no spills or stack frame; on sm_{resources.BUDGET_ARCH} occupancy >= "
          f"{resources.FUSED_FLOOR:.0%} fused, >= {resources.OTHER_FLOOR:.0%} others): "
          f"{len(broken)} broken")
    return 0
