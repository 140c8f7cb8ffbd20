"""``cudcn compile``: every kernel instantiation through NVRTC, with no GPU.

These tests need NVRTC (CuPy plus the NVRTC library), not a device; they are
skipped only where NVRTC cannot be loaded at all.
"""

from __future__ import annotations

import re

import pytest

from cudcn import cli
from cudcn.backends.cuda import kernels as cuda_kernels


def _nvrtc_available() -> bool:
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
        return True
    except Exception:  # no CuPy or no libnvrtc
        return False


needs_nvrtc = pytest.mark.skipif(not _nvrtc_available(), reason="NVRTC cannot be loaded")


@needs_nvrtc
def test_compile_prints_one_line_per_instantiation(capsys, monkeypatch):
    monkeypatch.setattr("cudcn.backends.cuda.compile.device_count", lambda: 0)
    assert cli.main(["compile", "--arch", "sm_80"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for dtype in cuda_kernels.TYPES:
        for name in cuda_kernels.name_expressions(dtype):
            kernel = name.split("<")[0]
            pattern = rf"^sm_80\s+{dtype}\s+{kernel}\s+{re.escape(name)}\s+ok\b"
            assert sum(bool(re.match(pattern, line)) for line in lines) == 1, name
    total = sum(len(cuda_kernels.name_expressions(d)) for d in cuda_kernels.TYPES)
    assert lines[-1] == f"{total} of {total} instantiations compiled"


@needs_nvrtc
def test_compile_fails_on_a_broken_kernel(capsys, monkeypatch):
    monkeypatch.setattr("cudcn.backends.cuda.compile.device_count", lambda: 0)
    broken = cuda_kernels.source() + "\n__global__ void broken() { undeclared_name = 1; }\n"
    monkeypatch.setattr(cuda_kernels, "source", lambda directory=None: broken)
    assert cli.main(["compile", "--arch", "sm_80", "--dtype", "float32"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "undeclared_name" in out


@needs_nvrtc
def test_compile_rejects_an_unknown_architecture(capsys, monkeypatch):
    monkeypatch.setattr("cudcn.backends.cuda.compile.device_count", lambda: 0)
    assert cli.main(["compile", "--arch", "sm_11", "--dtype", "float64"]) == 1
    assert "cannot target" in capsys.readouterr().out


def test_source_is_one_translation_unit():
    """The loader inlines the common header, so CuPy's cache key covers all of it."""
    text = cuda_kernels.source()
    assert not re.search(r"^\s*#\s*include", text, re.MULTILINE)
    assert text.count("struct ConvShape {") == 1
    for kernel in cuda_kernels.KERNELS:
        assert re.search(rf"__global__ void {kernel}\(", text), kernel


def test_every_kernel_file_opens_with_its_function_list():
    directory = cuda_kernels.kernel_dir()
    for name in cuda_kernels.SOURCES:
        text = (directory / name).read_text()
        header = text.split("#include", 1)[0]
        for kernel in re.findall(r"__global__ void (\w+)\(", text):
            assert kernel in header, f"{name}: {kernel} is missing from the opening comment"
