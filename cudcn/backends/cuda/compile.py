"""Compile kernel instantiations through NVRTC, with no GPU.

NVRTC is driven directly with an explicit architecture (CuPy's usual compile
path asks the device for its architecture), with the options CuPy compiles
with at run time (:data:`cudcn.backends.cuda.kernels.NVRTC_OPTIONS`). The
``cudcn compile`` command (:mod:`cudcn.cli.compile`) prints what this returns.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from cudcn.backends.cuda import kernels


def nvrtc():
    """CuPy's thin NVRTC binding (loads libnvrtc; needs no device)."""
    from cupy_backends.cuda.libs import nvrtc

    return nvrtc


def compile_names(source: str, names: Sequence[str], arch: int, label: str = "cudcn.cu",
                  ptx: dict[str, str] | None = None) -> list[tuple[str, bool, str]]:
    """Compile the instantiations ``names`` of ``source`` for sm_<arch>.

    Returns (name expression, ok, detail) per instantiation: the cubin size
    when it compiled, else the NVRTC log. With ``ptx`` (a dict), also stores
    the module's PTX there under "ptx" (to check which instructions were used).
    """
    lib = nvrtc()
    program = lib.createProgram(source, label, (), ())
    try:
        for name in names:
            lib.addNameExpression(program, name)
        options = [f"--gpu-architecture=sm_{arch}", *kernels.NVRTC_OPTIONS]
        try:
            lib.compileProgram(program, options)
        except lib.NVRTCError:
            log = lib.getProgramLog(program).strip()
            return [(name, False, log) for name in names]
        size = len(lib.getCUBIN(program))
        if ptx is not None:
            text = lib.getPTX(program)
            ptx["ptx"] = text.decode() if isinstance(text, bytes) else text
        for name in names:  # raises if an instantiation is missing from the module
            lib.getLoweredName(program, name)
        return [(name, True, f"module {size} bytes") for name in names]
    finally:
        lib.destroyProgram(program)


def compile_dtype(source: str, dtype: str, arch: int) -> list[tuple[str, bool, str]]:
    """Compile one dtype's instantiations for sm_<arch> (see :func:`compile_names`)."""
    return compile_names(source, kernels.name_expressions(dtype), arch, f"cudcn_{dtype}.cu")


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
