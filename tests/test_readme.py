"""README's commands are the ones CI runs, and every Python block of README
and docs/ runs on its own.

Each ```python block runs alone, in a fresh namespace, in a temporary
working directory. A block that imports an optional package which is not
installed is skipped, naming it; a block that imports CuPy is a GPU test. A
block that is not meant to run says so in the line before it:
``<!-- not run: the reason -->``.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import textwrap
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: Packages a block may need that an install can lack (the extras'); any
#: other missing module is an error in the block.
OPTIONAL = ("torch", "torchvision", "paddle", "onnx", "onnxruntime", "onnxscript", "cupy", "sklearn",
            "matplotlib", "tqdm")
#: A fenced Python block, at the margin or indented (in a list item), with
#: an optional "not run" comment on the line before.
BLOCK = re.compile(r"(?:<!-- not run: (?P<reason>[^>]*?) -->\n)?^(?P<indent>[ \t]*)```python\n(?P<code>.*?)^(?P=indent)```",
                   re.S | re.M)


def readme_commands() -> list[str]:
    """The bash commands of README's "## Run it" section: the demo's, then the tests'."""
    run_section = README.split("\n## Run it", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", run_section)


def ci_commands() -> list[str]:
    """The command lines of .ci/run, comments, blank lines and shell settings left out."""
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return [line for line in lines if line.strip() and not line.startswith(("#", "set ", "cd "))]


def test_ci_runs_readmes_test_command_first_then_the_anchors():
    demo, tests = readme_commands()
    commands = ci_commands()
    assert commands[0] == tests, "the first thing .ci/run does must be README's test command, verbatim"
    # README's test command needs the CPU stack only, with the demo's torch.
    assert "torchvision" not in tests and "cuda" not in tests
    assert re.search(r"torch==[\d.]+", demo).group() == re.search(r"torch==[\d.]+", tests).group()
    # Then what README says CI adds: the anchors, the NVRTC compile, the suite again.
    ci = (ROOT / ".ci" / "run").read_text().split(tests, 1)[1]
    run_section = " ".join(README.split("\n## Run it", 1)[1].split("\n## ", 1)[0].split())
    for in_ci, in_readme in (("torch==2.14.1", "torch 2.14.1"), ("torchvision==0.29.1", "torchvision 0.29.1"),
                             ("python -m cudcn compile --arch sm_75 sm_80 sm_90",
                              "`python -m cudcn compile --arch sm_75 sm_80 sm_90`")):
        assert in_ci in ci and in_readme in run_section, in_ci
    extras = re.search(r"^EXTRAS=(\S+)$", ci, re.M).group(1).split(",")
    for extra in ("onnx", "demo", "cuda13"):
        assert extra in extras and f"`{extra}`" in run_section, extra
    assert commands[-1].startswith("python -m pytest")


def _blocks() -> list:
    params = []
    for path in DOCUMENTS:
        for number, match in enumerate(BLOCK.finditer(path.read_text()), start=1):
            name = f"{path.relative_to(ROOT)}#block{number}"  # no comma: paddle parses tracebacks
            code = textwrap.dedent(match.group("code"))
            marks = [pytest.mark.gpu] if "cupy" in _imported(code) else []
            params.append(pytest.param(name, code, match.group("reason"), id=name, marks=marks))
    return params


def _imported(code: str) -> set[str]:
    """Top-level names of the modules a block imports (cudcn.torch counts as torch)."""
    names = set()
    for node in ast.walk(ast.parse(code)):
        modules = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
        for module in modules:
            parts = module.split(".")
            names.add(parts[1] if parts[0] == "cudcn" and len(parts) > 1 else parts[0])
    return names


def test_every_document_has_runnable_blocks():
    params = _blocks()
    assert sum(p.values[0].startswith("README.md") for p in params) >= 4  # one per door at least
    assert any(p.values[0].startswith("docs/deployment.md") for p in params)


@pytest.mark.parametrize("name, code, reason", _blocks())
def test_block_runs_on_its_own(name, code, reason, tmp_path, monkeypatch):
    if reason is not None:
        assert reason.strip(), f"{name}: say why it is not run"
        pytest.skip(f"not run: {reason}")
    last = ast.parse(code).body[-1]
    assert not (isinstance(last, ast.Expr) and not isinstance(last.value, ast.Call)), (
        f"{name} ends in a bare expression, which shows nothing when run as a script: print it")
    missing = sorted(m for m in _imported(code) if m in OPTIONAL and importlib.util.find_spec(m) is None)
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    monkeypatch.chdir(tmp_path)  # blocks may write files (model.onnx, model.pt)
    namespace: dict = {"__name__": "__main__"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
            warnings.simplefilter("ignore", DeprecationWarning)
            exec(compile(code, name, "exec"), namespace)
    except ModuleNotFoundError as error:  # a package the block uses without importing it (onnxscript)
        if (error.name or "").split(".")[0] not in OPTIONAL:
            raise
        pytest.skip(f"needs {error.name}")


def test_readme_quickstart_computes_what_it_says():
    section = README.split("\n### NumPy and CuPy", 1)[1]
    code = BLOCK.search(section).group("code")
    namespace: dict = {}
    exec(compile(code, "README quickstart", "exec"), namespace)
    assert namespace["y"].shape == (2, 32, 32, 32)
    assert namespace["grads"].mask.shape == (2, 9, 32, 32)


def test_not_run_marker_is_honoured(tmp_path):
    text = "<!-- not run: needs a cluster -->\n```python\nraise SystemExit\n```\n```python\nx = 1\n```\n"
    found = [(m.group("reason"), m.group("code")) for m in BLOCK.finditer(text)]
    assert found == [("needs a cluster", "raise SystemExit\n"), (None, "x = 1\n")]
