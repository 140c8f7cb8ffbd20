"""`import cudcn` pulls in no framework: not torch, not paddle, not CuPy; and
an adapter whose framework is missing says which extra to install."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FRAMEWORKS = ("torch", "paddle", "cupy", "cupy_backends", "ml_dtypes")


def _modules_after(code: str) -> set[str]:
    script = f"import sys\n{code}\nprint(' '.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT)
    return {name.split(".")[0] for name in result.stdout.split()}


def test_import_cudcn_imports_no_framework():
    loaded = _modules_after(
        "import cudcn, cudcn.ops, cudcn.geometry, cudcn.msda_geometry, cudcn.dcnv3_geometry, cudcn.backends,"
        " cudcn.backends.numpy, cudcn.cli"
    )
    assert "cudcn" in loaded and "numpy" in loaded
    # The NumPy backend's own dependencies wait until it first runs, too.
    assert not loaded & {*FRAMEWORKS, "scipy", "threadpoolctl"}, loaded & {*FRAMEWORKS, "scipy", "threadpoolctl"}


def test_numpy_call_imports_no_framework():
    code = (
        "import numpy as np, cudcn\n"
        "x = np.ones((1, 2, 4, 4)); off = np.zeros((1, 18, 4, 4)); w = np.ones((3, 2, 3, 3))\n"
        "cudcn.deform_conv2d_backward(np.ones((1, 3, 4, 4)), x, off, w, padding=1)\n"
        "v = np.ones((1, 5, 2, 3)); shapes = np.array([[2, 2], [1, 1]]); starts = np.array([0, 4])\n"
        "cudcn.ms_deform_attn_backward(np.ones((1, 4, 6)), v, shapes, starts, np.full((1, 4, 2, 2, 3, 2), 0.3),\n"
        "                              np.ones((1, 4, 2, 2, 3)))\n"
        "cudcn.dcnv4_backward(np.ones((1, 4, 4, 6)), np.ones((1, 4, 4, 6)), np.zeros((1, 4, 4, 56)),\n"
        "                     3, 3, 1, 1, 1, 1, 1, 1, 2, 3)"
    )
    assert not _modules_after(code) & set(FRAMEWORKS)


def test_subprocess_sees_this_checkout():
    # Guards the tests above against importing some other installed cudcn.
    result = subprocess.run(
        [sys.executable, "-c", "import cudcn; print(cudcn.__file__)"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )
    assert Path(result.stdout.strip()).resolve().parent == ROOT / "cudcn"


# Run before the import under test: the framework (and its submodules) cannot
# be found, as if it were not installed; nothing is uninstalled.
HIDE_FRAMEWORK = """
import importlib.abc, sys

class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == {framework!r} or name.startswith({framework!r} + "."):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, Hide())
"""

IMPORT_ADAPTER = """
import json
import cudcn  # cudcn alone still imports
try:
    import cudcn.{framework}
except ImportError as error:
    cause = error.__cause__
    print(json.dumps(dict(type=type(error).__name__, name=error.name, message=str(error),
                          cause_type=type(cause).__name__, cause_name=getattr(cause, "name", None),
                          loaded={framework!r} in sys.modules)))
"""


@pytest.mark.parametrize("framework, package", [("torch", "torch"), ("paddle", "paddlepaddle")])
def test_adapter_without_its_framework_names_the_extra(framework, package):
    script = (HIDE_FRAMEWORK + IMPORT_ADAPTER).format(framework=framework)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT)
    error = json.loads(result.stdout)
    assert error["type"] == "ModuleNotFoundError" and error["name"] == framework
    assert f'pip install "cudcn[{framework}]"' in error["message"], error["message"]
    assert error["message"].startswith(f"cudcn.{framework} needs {framework}")
    assert (error["cause_type"], error["cause_name"]) == ("ModuleNotFoundError", framework)  # chained
    assert not error["loaded"]
    # The extra the message names exists and brings the framework.
    try:
        import tomllib
    except ImportError:  # Python 3.10
        return
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(requirement.startswith(package) for requirement in extras[framework]), extras[framework]
