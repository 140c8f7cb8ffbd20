"""How long README's demo command takes from scratch: a new venv, the install, the demo.

    python benchmarks/fresh_demo.py [--out docs/demo]

Exports the committed checkout (``git archive HEAD``: uncommitted changes are
left out) into a temporary folder, makes a venv there with the Python running
this script, and runs the demo command of README's "## Run it" section in it,
as written, with the venv's python and pip's cache off (as on a fresh
machine): the install and the demo are timed separately. Writes
fresh_demo.json (the times, the command, date, machine, CPU count, the load
averages before and after, the versions of Python, pip and the torch that
was installed) and fresh_demo.md
(the line README quotes) to --out, and prints the line. Where pip finds its
packages decides the install time: it is recorded as measured, not
corrected for the network.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cudcn.cli.info import load_average, load_text, machine_record  # noqa: E402


def readme_demo_command(readme: str) -> str:
    """The first command of README's "## Run it" section (the demo's)."""
    run_section = readme.split("## Run it", 1)[1]
    return re.findall(r"```bash\n(.+?)\n```", run_section)[0]


def markdown(record: dict) -> str:
    """fresh_demo.md: the line README quotes."""
    return (
        "# README's demo command from a fresh venv\n\n"
        f"README's demo command in a new venv with pip's cache off: {record['total_seconds']:.0f} s in all, "
        f"{record['install_seconds']:.0f} s to install and {record['demo_seconds']:.0f} s for the demo; "
        f"{record['date']}, {record['machine']}, {record['cpu_count']} CPUs, "
        f"{load_text(record['load_average_before'])} before; python {record['python']}, {record['pip']}, torch {record['torch_installed']} "
        "installed.\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "demo",
                        help="folder for fresh_demo.json and fresh_demo.md (default docs/demo)")
    args = parser.parse_args()

    command = readme_demo_command((ROOT / "README.md").read_text())
    steps = command.split(" && ")
    assert len(steps) == 2 and all(step.startswith("python ") for step in steps), steps
    with tempfile.TemporaryDirectory() as folder:
        checkout = Path(folder) / "cudcn"
        checkout.mkdir()
        archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x"], input=archive, cwd=checkout, check=True)
        venv = Path(folder) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        python = str(venv / "bin" / "python")
        environment = dict(os.environ, PIP_NO_CACHE_DIR="1", PYTHONPATH="")
        pip = subprocess.run([python, "-m", "pip", "--version"], capture_output=True, text=True,
                             check=True).stdout.split(" from ")[0]

        load_before = load_average()
        seconds = []
        for step in steps:
            start = time.perf_counter()
            subprocess.run(python + step.removeprefix("python"), shell=True, cwd=checkout, env=environment,
                           check=True, stdout=subprocess.DEVNULL)
            seconds.append(time.perf_counter() - start)
            print(f"{seconds[-1]:.0f} s: {step}", file=sys.stderr)
        load_after = load_average()
        torch_version = subprocess.run(
            [python, "-c", "import importlib.metadata as m; print(m.version('torch'))"],
            capture_output=True, text=True, check=True).stdout.strip()

    record = machine_record(()) | {
        "command": command,
        "pip": pip,
        "torch_installed": torch_version,
        "install_seconds": round(seconds[0], 1),
        "demo_seconds": round(seconds[1], 1),
        "total_seconds": round(sum(seconds), 1),
        "load_average_before": load_before,
        "load_average_after": load_after,
    }
    del record["versions"]  # the venv's own versions are in the demo's results, not this process's
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fresh_demo.json").write_text(json.dumps(record, indent=1) + "\n")
    text = markdown(record)
    (args.out / "fresh_demo.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
