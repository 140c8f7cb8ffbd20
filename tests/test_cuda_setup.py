"""What a CUDA install needs, checked without a GPU: the extras and CuPy's bfloat16.

- the ``cuda12``/``cuda13`` extras bring CuPy 14, the CUDA runtime headers
  CuPy looks up on every kernel compile, NVRTC and cuBLAS (as wheels, from
  the matching CUDA major), NumPy >= 2.1.2 and ml_dtypes (CuPy's bfloat16);
- :func:`cupy_bfloat16_problem` names what keeps CuPy from bfloat16;
- :func:`external_stream`, the CuPy stream both adapters run on: a
  framework's default stream (handle 0) reaches CuPy as cudaStreamLegacy (1),
  never as 0 (CuPy's "no stream", its per-thread stream under
  CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1, which torch's and paddle's DLPack
  export reject), on the given device; with a fake and with CuPy's real
  ``Stream.from_external`` (which needs no GPU).
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cudcn.backends.cuda.engine import cupy_bfloat16_problem, external_stream

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("major", ["12", "13"])
def test_cuda_extras_bring_what_cupy_needs(major):
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    requirements = extras[f"cuda{major}"]
    assert f"cupy-cuda{major}x>=14" in requirements
    toolkit = next(r for r in requirements if r.startswith("cuda-toolkit["))
    parts = set(re.match(r"cuda-toolkit\[([a-z,]+)\]", toolkit).group(1).split(","))
    assert {"cudart", "nvrtc", "cublas"} <= parts and toolkit.endswith(f"=={major}.*")
    assert "numpy>=2.1.2" in requirements
    assert any(r.startswith("ml_dtypes") for r in requirements)


@pytest.fixture
def environment(monkeypatch):
    """A CuPy 14 with ml_dtypes and NumPy 2.4 (fakes), to be spoilt one at a time."""
    monkeypatch.setitem(sys.modules, "cupy", SimpleNamespace(__version__="14.2.0"))
    monkeypatch.setattr(np, "__version__", "2.4.0")
    find_spec = importlib.util.find_spec
    missing = set()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name in missing else find_spec(name))
    return missing


def test_bfloat16_available(environment):
    if importlib.util.find_spec("ml_dtypes") is None:
        pytest.skip("ml_dtypes is not installed")
    assert cupy_bfloat16_problem() is None


@pytest.mark.parametrize("spoil, message", [
    (lambda mp, missing: mp.setattr(np, "__version__", "2.1.1"), "NumPy >= 2.1.2, this is NumPy 2.1.1"),
    (lambda mp, missing: missing.add("ml_dtypes"), "ml_dtypes is not installed"),
    (lambda mp, missing: mp.setitem(sys.modules, "cupy", SimpleNamespace(__version__="13.6.0")),
     "CuPy 13.6.0 has no bfloat16; it needs CuPy 14 or newer"),
    (lambda mp, missing: mp.setitem(sys.modules, "cupy", None), "CuPy cannot be imported"),
])
def test_bfloat16_problem_names_the_cause(environment, monkeypatch, spoil, message):
    spoil(monkeypatch, environment)
    assert message in cupy_bfloat16_problem()


class FakeCupyStream:
    @classmethod
    def from_external(cls, obj):
        stream = cls()
        stream.protocol = obj.__cuda_stream__()
        stream.device_id = -1  # as CuPy leaves it
        return stream


@pytest.mark.parametrize("handle, expected", [(0, 1), (0x7F00DEAD, 0x7F00DEAD)])
def test_external_stream_makes_the_default_stream_explicit(handle, expected):
    fake_cupy = SimpleNamespace(cuda=SimpleNamespace(Stream=FakeCupyStream))
    stream = external_stream(fake_cupy, handle, 3)
    assert stream.protocol == (0, expected) and stream.device_id == 3

    def external(ptr, device_id):
        return ("external", ptr, device_id)

    older_cupy = SimpleNamespace(cuda=SimpleNamespace(Stream=object, ExternalStream=external))
    assert external_stream(older_cupy, handle, 3) == ("external", expected, 3)


def test_external_stream_through_cupys_own_from_external():
    cupy = pytest.importorskip("cupy")
    stream = external_stream(cupy, 0, 0)
    assert stream.ptr == 1 and stream.device_id == 0  # cudaStreamLegacy, on device 0
    stream = external_stream(cupy, 12345, 2)
    assert stream.ptr == 12345 and stream.device_id == 2
