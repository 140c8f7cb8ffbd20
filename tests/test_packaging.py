"""What a release carries: a licence, type information, the version written
once, and an sdist holding every file README points to."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import cudcn

try:
    import tomllib
except ImportError:  # Python 3.10: the standard library reads TOML from 3.11 on
    tomllib = None

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    if tomllib is None:
        pytest.skip("reading pyproject.toml needs tomllib (Python 3.11 or newer)")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_version_is_written_once_in_the_package():
    project = _pyproject()
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["hatch"]["version"]["path"] == "cudcn/__init__.py"
    # hatch reads the first __version__ assignment: the one cudcn exports.
    text = (ROOT / "cudcn" / "__init__.py").read_text()
    assert re.findall(r'^__version__ = "([^"]+)"$', text, re.MULTILINE) == [cudcn.__version__]
    # No test or module writes the version again.
    literal = re.compile(rf"""["']{re.escape(cudcn.__version__)}["']""")
    repeats = [str(path.relative_to(ROOT)) for folder in ("cudcn", "tests", "benchmarks", "tools")
               for path in (ROOT / folder).rglob("*.py")
               if path != ROOT / "cudcn" / "__init__.py" and literal.search(path.read_text())]
    assert not repeats, repeats


def test_licence_and_type_marker():
    project = _pyproject()["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert project["authors"] == [{"name": "the cudcn developers"}]
    licence = (ROOT / "LICENSE").read_text()
    assert licence.startswith("MIT License\n") and "the cudcn developers" in licence.splitlines()[2]
    assert (ROOT / "cudcn" / "py.typed").is_file()
    assert "Typing :: Typed" in project["classifiers"]


def test_sdist_holds_what_readme_points_to():
    """Every relative link of README and every repository path it names in
    backticks lies under a path the sdist includes, and exists."""
    include = _pyproject()["tool"]["hatch"]["build"]["targets"]["sdist"]["include"]
    readme = (ROOT / "README.md").read_text()
    paths = {link.split("#")[0] for link in re.findall(r"\]\(([^)#:]+(?:#[^)]*)?)\)", readme)}
    paths |= set(re.findall(r"`((?:docs|tools|benchmarks|kernels|tests|cudcn)/[^`\s]*)`", readme))
    paths |= {"LICENSE", ".ci/run"}
    assert len(paths) > 10
    for path in sorted(paths):
        assert (ROOT / path).exists() or any(ROOT.glob(path)), path  # a path or a pattern such as kernels/*.cu
        assert any(path == top or path.startswith(top.rstrip("/") + "/") for top in include), path
