"""The README's commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

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


def test_readme_quotes_the_recorded_cpu_benchmark():
    """The tables of benchmarks/results/bench_cpu.md appear in README as recorded."""
    recorded = (ROOT / "benchmarks" / "results" / "bench_cpu.md").read_text()
    readme = (ROOT / "README.md").read_text()
    table_lines = [line for line in recorded.splitlines() if line.startswith("|")]
    assert table_lines
    missing = [line for line in table_lines if line not in readme.splitlines()]
    assert not missing, missing
