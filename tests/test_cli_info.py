"""``cudcn info`` runs anywhere, reports malformed settings instead of
crashing, keeps the frameworks' import warnings out of its table; the command
line imports no framework until a subcommand runs."""

from __future__ import annotations

import subprocess
import sys
import warnings

import cudcn
from cudcn import cli
from cudcn.cli import info


def test_info_reports_versions_settings_backends_and_cache(capsys):
    assert cli.main(["info"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"cudcn {cudcn.__version__} (from ")
    for expected in ("\nsettings\n", "\npackages\n", "GPUs", "\nbackends\n", "kernel cache:",
                     "  CUDA algorithm     auto (algorithms: im2col, fused;",
                     "  workspace budget   256 MiB for column buffers (268435456 bytes)",
                     "  deterministic      off (CUDCN_DETERMINISTIC not set)"):
        assert expected in printed, expected


def test_info_reports_malformed_settings_in_the_environment(capsys, monkeypatch):
    monkeypatch.setattr(cudcn.config._workspace, "value", None)  # read the variable afresh
    monkeypatch.setattr(cudcn.config._algorithm, "value", None)
    monkeypatch.setenv("CUDCN_WORKSPACE_BYTES", "lots")
    monkeypatch.setenv("CUDCN_ALGORITHM", "fastest")
    monkeypatch.setenv("CUDCN_TF32", "yes")
    assert cli.main(["info"]) == 0
    printed = capsys.readouterr().out
    assert "workspace budget   error: CUDCN_WORKSPACE_BYTES must be a positive size" in printed
    assert "got 'lots'" in printed
    assert "CUDA algorithm     error: CUDCN_ALGORITHM must be one of 'auto', 'fused', 'im2col', got 'fastest'" in printed
    assert "TF32               off (CUDCN_TF32='yes', which is not 1: off)" in printed


def test_import_warnings_are_listed_after_the_report(capsys, monkeypatch):
    """A framework that warns while it is imported (as paddle does about
    ccache) gets its warning printed after the report, not inside it."""
    real_gather = info.gather

    def warning_gather():
        warnings.warn("No ccache found (a framework's import warning)", UserWarning)
        return real_gather()

    monkeypatch.setattr(info, "gather", warning_gather)
    assert cli.main(["info"]) == 0
    captured = capsys.readouterr()
    assert "ccache" not in captured.err
    report, _, after = captured.out.partition("\nwarnings raised while importing the packages above")
    assert "ccache" not in report and "UserWarning: No ccache found (a framework's import warning)" in after


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
