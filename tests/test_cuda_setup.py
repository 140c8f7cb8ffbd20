"""What a CUDA install needs, checked without a GPU: the extras and CuPy's bfloat16.

- the ``cuda12``/``cuda13`` extras bring CuPy 14, the CUDA runtime headers
  CuPy looks up on every kernel compile, NVRTC and cuBLAS (as wheels, from
  the matching CUDA major), NumPy >= 2.1.2 and ml_dtypes (CuPy's bfloat16);
- :func:`cupy_bfloat16_problem` names what keeps CuPy from bfloat16.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cudcn.backends.cuda.engine import cupy_bfloat16_problem

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
