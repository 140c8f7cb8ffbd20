"""docs/msda.md's torch example runs and gives what it says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]


def test_the_torch_example_runs():
    text = (ROOT / "docs" / "msda.md").read_text()
    section = text.split("## From torch, paddle and transformers", 1)[1]
    code = re.search(r"```python\n(.+?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "docs/msda.md example", "exec"), namespace)
    assert namespace["out"].shape == (2, 5, 8)
    assert namespace["value"].grad.shape == (2, 27, 2, 4)
    assert namespace["y"].shape == (5, 2, 16)
