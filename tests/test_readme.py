"""The README's commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    run_section = text.split("## Run it", 1)[1]
    return re.findall(r"```bash\n(.+?)\n```", run_section)


def test_readme_has_exactly_two_commands_and_ci_runs_the_test_one():
    commands = readme_commands()
    assert len(commands) == 2, commands
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci_lines


def test_readme_quickstart_runs():
    text = (ROOT / "README.md").read_text()
    code = re.search(r"## Quickstart\n\n```python\n(.+?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README quickstart", "exec"), namespace)
    assert namespace["y"].shape == (2, 32, 32, 32)
    assert namespace["grads"].mask.shape == (2, 9, 32, 32)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated in favour of torch.export
def test_readme_deployment_snippets_run(tmp_path, monkeypatch):
    """The deployment section's snippets, in order, in one namespace (they write
    model.onnx and model.pt to the current directory: a temporary one here)."""
    import pytest

    torch = pytest.importorskip("torch")
    for module in ("onnx", "onnxruntime", "onnxscript"):
        pytest.importorskip(module)
    text = (ROOT / "README.md").read_text()
    section = text.split("## Deployment (torch)", 1)[1].split("\n## ", 1)[0]
    snippets = re.findall(r"```python\n(.+?)```", section, re.S)
    assert len(snippets) == 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for number, code in enumerate(snippets):
        exec(compile(code, f"README deployment snippet {number + 1}", "exec"), namespace)
    assert namespace["y"].shape == (5, 8, 16, 16)
    with torch.no_grad():
        expected = namespace["model"](namespace["x5"])
    torch.testing.assert_close(torch.from_numpy(namespace["y"]), expected, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "model.onnx").exists() and (tmp_path / "model.pt").exists()

