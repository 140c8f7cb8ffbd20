"""``cudcn compile``: compile every kernel instantiation through NVRTC.

Runs with no GPU: NVRTC is driven directly with an explicit architecture
(CuPy's usual compile path asks the device for its architecture). Prints one
line per instantiation and architecture, naming kernel and dtype, and exits 1
on any failure. Where CuPy sees a device, the command then loads every dtype's
module on it, which fills CuPy's on-disk kernel cache.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable

from cudcn import cuda_kernels

DEFAULT_ARCHS = ("sm_70", "sm_80", "sm_90")


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
        default=list(cuda_kernels.TYPES),
        choices=list(cuda_kernels.TYPES),
        help="dtypes to compile (default: all)",
    )


def _nvrtc():
    """CuPy's thin NVRTC binding (loads libnvrtc; needs no device)."""
    from cupy_backends.cuda.libs import nvrtc

    return nvrtc


def _arch_number(arch: str) -> int:
    text = arch.lower().removeprefix("sm_").removeprefix("compute_")
    if not text.isdigit():
        raise ValueError(f"--arch must look like sm_80, got {arch!r}")
    return int(text)


def compile_dtype(source: str, dtype: str, arch: int) -> list[tuple[str, bool, str]]:
    """Compile one dtype's instantiations for sm_<arch>.

    Returns (name expression, ok, detail) per instantiation: the lowered
    (mangled) name and the cubin size when it compiled, else the NVRTC log.
    """
    nvrtc = _nvrtc()
    names = cuda_kernels.name_expressions(dtype)
    program = nvrtc.createProgram(source, f"cudcn_{dtype}.cu", (), ())
    try:
        for name in names:
            nvrtc.addNameExpression(program, name)
        options = [f"--gpu-architecture=sm_{arch}", *cuda_kernels.NVRTC_OPTIONS]
        try:
            nvrtc.compileProgram(program, options)
        except nvrtc.NVRTCError:
            log = nvrtc.getProgramLog(program).strip()
            return [(name, False, log) for name in names]
        size = len(nvrtc.getCUBIN(program))
        for name in names:  # raises if an instantiation is missing from the module
            nvrtc.getLoweredName(program, name)
        return [(name, True, f"module {size} bytes") for name in names]
    finally:
        nvrtc.destroyProgram(program)


def _device_count() -> int:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no driver or no device: nothing to warm
        return 0


def _warm_cache(dtypes: Iterable[str]) -> list[tuple[str, bool, str]]:
    """Load every dtype's module on device 0 (fills CuPy's kernel cache)."""
    rows = []
    for dtype in dtypes:
        module = cuda_kernels.module(dtype)
        for name in cuda_kernels.name_expressions(dtype):
            try:
                module.get_function(name)
                rows.append((name, True, "loaded"))
            except Exception as error:  # report every failure, not just the first
                rows.append((name, False, str(error)))
    return rows


def run(args: argparse.Namespace) -> int:
    try:
        archs = [_arch_number(a) for a in args.arch]
    except ValueError as error:
        print(error)
        return 2
    try:
        nvrtc = _nvrtc()
        version = nvrtc.getVersion()
        supported = set(nvrtc.getSupportedArchs())
    except Exception as error:  # no CuPy or no libnvrtc: say so, fail
        print(f"NVRTC is not available: {error}")
        return 1
    print(f"NVRTC {version[0]}.{version[1]}; kernels from {cuda_kernels.kernel_dir()}")
    source = cuda_kernels.source()
    failed = total = 0
    for arch in archs:
        if arch not in supported:
            print(f"sm_{arch}  this NVRTC cannot target it (supported: {sorted(supported)})  FAIL")
            failed += 1
            total += 1
            continue
        for dtype in args.dtype:
            start = time.perf_counter()
            rows = compile_dtype(source, dtype, arch)
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
    if _device_count() > 0:
        for name, ok, detail in _warm_cache(args.dtype):
            total += 1
            failed += not ok
            print(f"device   {name:58} {'ok' if ok else 'FAIL'}  {detail}")
    print(f"{total - failed} of {total} instantiations compiled" + (", FAILED" if failed else ""))
    return 1 if failed else 0
