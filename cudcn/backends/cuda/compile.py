"""Compile kernel instantiations through NVRTC, the way CuPy does at run time, with no GPU.

At run time ``cupy.RawModule`` assembles its NVRTC options itself (its
bundled CCCL and header directories, and the directory of the CUDA runtime
headers, which CuPy 14 looks up on every compile and fails without, even for
source that includes none), adds ``-ftz=true``, the architecture and
``--device-as-default-execution-space``, and compiles through its NVRTC
program class. This module does the same, with CuPy's own functions, except
that the architecture is given (CuPy asks the device for it): so a machine
where the kernels would not compile at run time, for want of headers or
anything else, fails here too. The ``cudcn compile`` command
(:mod:`cudcn.cli.compile`) prints what this returns.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from cudcn.backends.cuda import kernels


def nvrtc():
    """CuPy's thin NVRTC binding (loads libnvrtc; needs no device)."""
    from cupy_backends.cuda.libs import nvrtc

    return nvrtc


def runtime_options(arch: int) -> tuple[str, ...]:
    """NVRTC's options for cudcn's module on sm_<arch>, in CuPy 14's order.

    Raises RuntimeError where CuPy would at run time, e.g. "Failed to find
    CUDA headers" when no CUDA runtime headers can be found.
    """
    from cupy._core import core

    return (
        *core.assemble_cupy_compiler_options(kernels.MODULE_OPTIONS),
        "-ftz=true",  # added to every module (_compile_with_cache_cuda)
        f"-arch=sm_{arch}",
        "--device-as-default-execution-space",  # added to every NVRTC compile without jitify
    )


def compile_names(source: str, names: Sequence[str], options: tuple[str, ...], label: str = "cudcn.cu",
                  ptx: dict[str, str] | None = None) -> list[tuple[str, bool, str]]:
    """Compile the instantiations ``names`` of ``source`` with ``options``
    (see :func:`runtime_options`).

    Returns (name expression, ok, detail) per instantiation: the cubin size
    when it compiled, else CuPy's compile error with the NVRTC log. With
    ``ptx`` (a dict), the module's PTX is also stored there under "ptx" (to
    check which instructions the kernels use).
    """
    from cupy.cuda import compiler

    program = compiler._NVRTCProgram(source, label, name_expressions=list(names), method="cubin")
    try:
        cubin, mapping = program.compile(options)
    except compiler.CompileException as error:
        return [(name, False, str(error)) for name in names]
    if ptx is not None:
        text, _ = compiler._NVRTCProgram(source, label, name_expressions=list(names), method="ptx").compile(options)
        ptx["ptx"] = text.decode() if isinstance(text, bytes) else text
    return [(name, bool(mapping.get(name)), f"module {len(cubin)} bytes") for name in names]


def compile_dtype(source: str, dtype: str, options: tuple[str, ...]) -> list[tuple[str, bool, str]]:
    """Compile one dtype's instantiations (see :func:`compile_names`)."""
    return compile_names(source, kernels.name_expressions(dtype), options, f"cudcn_{dtype}.cu")


def device_count() -> int:
    """CUDA devices CuPy sees (0 without CuPy, driver or device)."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no driver or no device: nothing to warm
        return 0


def warm_cache(dtypes: Iterable[str]) -> list[tuple[str, bool, str]]:
    """Load every dtype's module on the current device (fills CuPy's kernel cache)."""
    rows = []
    for dtype in dtypes:
        module = kernels.module(dtype)
        for name in kernels.name_expressions(dtype):
            try:
                module.get_function(name)
                rows.append((name, True, "loaded"))
            except Exception as error:  # report every failure, not just the first
                rows.append((name, False, str(error)))
    return rows
