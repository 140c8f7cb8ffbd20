"""``cudcn info`` runs anywhere, and the command line imports no framework
until a subcommand runs."""

from __future__ import annotations

import subprocess
import sys

from cudcn import cli


def test_info_reports_versions_backends_and_cache(capsys):
    assert cli.main(["info"]) == 0
    printed = capsys.readouterr().out
    for expected in ("cudcn 0.1.0", "numpy", "GPUs", "backends", "kernel cache:",
                     "CUDA algorithm setting: auto (algorithms: im2col, fused;"):
        assert expected in printed


def test_building_the_command_line_imports_no_framework():
    code = (
        "import sys, argparse\n"
        "from cudcn import cli\n"
        "for name, (module, _) in cli.COMMANDS.items():\n"
        "    __import__(module)\n"
        "heavy = {'torch', 'cupy', 'paddle', 'sklearn', 'matplotlib', 'scipy', 'tqdm'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
