"""``cudcn compile``: compile every kernel instantiation through NVRTC.

Runs with no GPU, through CuPy's own compile path and options
(:mod:`cudcn.backends.cuda.compile`), so it fails where the kernels would
not compile at run time (no CUDA headers, say). Prints the options and one
line per instantiation and architecture, naming kernel and dtype, and exits
1 on any failure. Where CuPy sees a device, the command then loads every dtype's
module on it, which fills CuPy's on-disk kernel cache.
"""

from __future__ import annotations

import argparse
import time

from cudcn.backends.cuda import compile as nvrtc_compile
from cudcn.backends.cuda import kernels

DEFAULT_ARCHS = ("sm_75", "sm_80", "sm_90")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--arch",
        nargs="+",
        default=list(DEFAULT_ARCHS),
        metavar="SM",
        help=f"target architectures, e.g. sm_80 (default: {' '.join(DEFAULT_ARCHS)})",
    )
    parser.add_argument(
        "--dtype",
        nargs="+",
        default=list(kernels.TYPES),
        choices=list(kernels.TYPES),
        help="dtypes to compile (default: all)",
    )


def _arch_number(arch: str) -> int:
    text = arch.lower().removeprefix("sm_").removeprefix("compute_")
    if not text.isdigit():
        raise ValueError(f"--arch must look like sm_80, got {arch!r}")
    return int(text)


def run(args: argparse.Namespace) -> int:
    try:
        archs = [_arch_number(a) for a in args.arch]
    except ValueError as error:
        print(error)
        return 2
    try:
        nvrtc = nvrtc_compile.nvrtc()
        version = nvrtc.getVersion()
        supported = set(nvrtc.getSupportedArchs())
    except Exception as error:  # no CuPy or no libnvrtc: say so, fail
        print(f"NVRTC is not available: {error}")
        return 1
    print(f"NVRTC {version[0]}.{version[1]}; kernels from {kernels.kernel_dir()}")
    source = kernels.source()
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
        print(f"sm_{arch}  NVRTC options: {' '.join(options)}")
        for dtype in args.dtype:
            start = time.perf_counter()
            rows = nvrtc_compile.compile_dtype(source, dtype, options)
            seconds = time.perf_counter() - start
            for name, ok, detail in rows:
                total += 1
                failed += not ok
                kernel = name.split("<", 1)[0]
                status = "ok" if ok else "FAIL"
                print(f"sm_{arch:<4} {dtype:9} {kernel:20} {name:58} {status}  {detail if ok else ''}")
            if not rows[0][1]:
                print(f"NVRTC log (sm_{arch}, {dtype}):\n{rows[0][2]}")
            print(f"sm_{arch:<4} {dtype:9} compiled in {seconds:.1f} s")
    if nvrtc_compile.device_count() > 0:
        for name, ok, detail in nvrtc_compile.warm_cache(args.dtype):
            total += 1
            failed += not ok
            print(f"device   {name:58} {'ok' if ok else 'FAIL'}  {detail}")
    print(f"{total - failed} of {total} instantiations compiled" + (", FAILED" if failed else ""))
    return 1 if failed else 0
