"""The command line as a new user meets it: ``--version``, and one clear line
instead of a traceback for every mistake on the command line and for every
missing optional package (naming the extra to install), found before any
long work starts."""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cudcn
from cudcn import cli
from cudcn.cli import bench
from cudcn.cli.arguments import is_installed

ROOT = Path(__file__).resolve().parents[1]


def _argument_error(capsys, argv: list[str]) -> str:
    """What the parser prints for a bad command line (it exits with status 2):
    one line, then one pointing to the command's help, and no usage."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    message, pointer = captured.err.splitlines()
    command = message.split(": error: ")[0]
    assert pointer == f"see {command} --help"
    return message


def test_version_is_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"cudcn {cudcn.__version__}\n"


CPUS = os.cpu_count()


@pytest.mark.parametrize("argv, message", [
    (["demo", "--device", "gpu"], "cudcn demo: error: argument --device: invalid choice: 'gpu' (choose from auto, cpu, cuda)"),
    (["demo", "--epochs", "0"], "cudcn demo: error: argument --epochs: expected an integer from 1 to 100, got 0"),
    (["demo", "--epochs", "1000"], "cudcn demo: error: argument --epochs: expected an integer from 1 to 100, got 1000"),
    (["demo", "--seeds", "two"], "cudcn demo: error: argument --seeds: expected an integer from 1 to 20, got 'two'"),
    (["demo", "--seeds", "21"], "cudcn demo: error: argument --seeds: expected an integer from 1 to 20, got 21"),
    (["demo", "--limit", "0"], "cudcn demo: error: argument --limit: expected an integer from 1 to 1258, got 0"),
    (["demo", "--limit", "5000"], "cudcn demo: error: argument --limit: expected an integer from 1 to 1258, got 5000"),
    (["demo", "--threads", "0"], f"cudcn demo: error: argument --threads: expected an integer from 1 to {CPUS}, got 0"),
    (["demo", "--threads", str(CPUS + 1)],
     f"cudcn demo: error: argument --threads: expected an integer from 1 to {CPUS}, got {CPUS + 1}"),
    (["demo", "--data-seed", "-1"],
     "cudcn demo: error: argument --data-seed: expected an integer from 0 to 4294967295, got -1"),
    (["demo", "--models", "plain,resnet"], "cudcn demo: error: argument --models: expected a comma-separated "
     "subset of plain,dcnv1,dcnv2,coordconv, got 'plain,resnet' (resnet unknown)"),
    (["bench", "--batch", "0"], "cudcn bench: error: argument --batch: expected an integer from 1 to 256, got 0"),
    (["bench", "--batch", "257"], "cudcn bench: error: argument --batch: expected an integer from 1 to 256, got 257"),
    (["bench", "--in-channels", "4096"],
     "cudcn bench: error: argument --in-channels: expected an integer from 1 to 1024, got 4096"),
    (["bench", "--out-channels", "0"],
     "cudcn bench: error: argument --out-channels: expected an integer from 1 to 1024, got 0"),
    (["bench", "--size", "-3"], "cudcn bench: error: argument --size: expected an integer from 1 to 512, got -3"),
    (["bench", "--kernel", "99"], "cudcn bench: error: argument --kernel: expected an integer from 1 to 9, got 99"),
    (["bench", "--offset-groups", "0"],
     "cudcn bench: error: argument --offset-groups: expected an integer from 1 to 1024, got 0"),
    (["bench", "--repeat", "0"], "cudcn bench: error: argument --repeat: expected an integer from 1 to 100, got 0"),
    (["bench", "--repeat", "1e3"], "cudcn bench: error: argument --repeat: expected an integer from 1 to 100, got '1e3'"),
    (["bench", "--warmup", "-1"], "cudcn bench: error: argument --warmup: expected an integer from 0 to 100, got -1"),
    (["bench", "--dtype", "float16"], "cudcn bench: error: argument --dtype: invalid choice: 'float16' "
     "(choose from float32, float64)"),
    (["check", "--seed", "-1"], "cudcn check: error: argument --seed: expected an integer from 0 to 4294967295, got -1"),
    (["check", "--seed", str(2**32)],
     f"cudcn check: error: argument --seed: expected an integer from 0 to 4294967295, got {2**32}"),
    (["compile", "--dtype", "int8"], "cudcn compile: error: argument --dtype: invalid choice: 'int8' "
     "(choose from float16, bfloat16, float32, float64)"),
    (["compile", "--arch", "sm_8x"],
     "cudcn compile: error: argument --arch: expected an architecture such as sm_80, got 'sm_8x'"),
    (["compile", "--arch", "sm_1000"],
     "cudcn compile: error: argument --arch: expected an architecture such as sm_80, got 'sm_1000'"),
    (["compile", "-v", "-q"], "cudcn compile: error: argument -q/--quiet: not allowed with argument -v/--verbose"),
    # Unknown options are named, by the parser of the command they were given to.
    (["--bogus"], "cudcn: error: unrecognized arguments: --bogus"),
    (["check", "--bogus"], "cudcn check: error: unrecognized arguments: --bogus"),
    (["bench", "--size", "8", "extra"], "cudcn bench: error: unrecognized arguments: extra"),
    (["info", "-x"], "cudcn info: error: unrecognized arguments: -x"),
    ([], "cudcn: error: a command is required: one of check, info, bench, demo, compile"),
    (["train"],
     "cudcn: error: argument COMMAND: invalid choice: 'train' (choose from check, info, bench, demo, compile)"),
])
def test_bad_arguments_get_one_line_naming_the_argument(capsys, argv, message):
    # Python versions differ in whether argparse quotes the choices.
    assert _argument_error(capsys, argv).replace("'", "") == message.replace("'", "")


def test_every_numeric_option_is_bounded():
    """No subcommand takes a number without bounds: a typo must not start minutes of work."""
    sub = cli.Parser(prog="cudcn").add_subparsers()
    checked = 0
    for name, (module_name, _) in cli.COMMANDS.items():
        command = sub.add_parser(name)
        importlib.import_module(module_name).add_arguments(command)
        for action in command._actions:
            if action.type is None or action.type is Path or action.choices:
                continue
            prefix = "sm_" if action.dest == "arch" else ""
            for text in ("-1", str(2**64)):
                with pytest.raises(argparse.ArgumentTypeError):
                    action.type(prefix + text)
            checked += 1
    assert checked == 16  # bench 8, demo 6 (--models too), check 1, compile 1: a new option gets looked at


def _command_error(capsys, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.err.strip()


@pytest.fixture
def no_benchmark(monkeypatch):
    """Fail loudly if the benchmark starts: these errors must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the benchmark ran before the request was checked")

    monkeypatch.setattr(bench, "benchmark", refuse)


def test_bench_plot_without_matplotlib_fails_before_the_benchmark(capsys, monkeypatch, no_benchmark, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert _command_error(capsys, ["bench", "--plot", str(tmp_path / "b.png")]) == (
        'cudcn bench: error: --plot needs matplotlib, which is not installed: pip install matplotlib '
        '(or an extra that brings it: pip install "cudcn[demo]")')


def test_bench_rejects_offset_groups_that_do_not_divide_the_channels(capsys, no_benchmark):
    assert _command_error(capsys, ["bench", "--in-channels", "32", "--offset-groups", "3"]) == (
        "cudcn bench: error: --offset-groups must divide --in-channels = 32, got 3")


def test_bench_output_paths_are_checked_before_the_benchmark(capsys, no_benchmark, tmp_path):
    assert _command_error(capsys, ["bench", "--csv", str(tmp_path)]) == (
        f"cudcn bench: error: --csv expects a file name, got the folder {str(tmp_path)!r}")
    missing = tmp_path / "results" / "cpu"
    assert _command_error(capsys, ["bench", "--csv", str(missing / "b.csv")]) == (
        f"cudcn bench: error: --csv: the folder {str(missing)!r} does not exist")
    assert not (tmp_path / "results").exists()  # refused, not created
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert _command_error(capsys, ["bench", "--json", str(blocker / "b.json")]) == (
        f"cudcn bench: error: --json: the folder {str(blocker)!r} does not exist")


def test_bench_refuses_a_case_too_large_to_finish_soon(capsys, no_benchmark):
    assert _command_error(capsys, ["bench", "--batch", "64", "--size", "256", "--kernel", "5"]) == (
        "cudcn bench: error: the case's column buffer (batch x size^2 x kernel^2 x in-channels) would hold "
        "3,355,443,200 values; cudcn bench takes up to 134,217,728: use a smaller --batch, --size, --kernel "
        "or --in-channels")


def test_bench_without_torch_says_not_installed(capsys, monkeypatch):
    def no_torch():
        raise ImportError("No module named 'torch'")

    monkeypatch.setattr(bench, "_torch_device_list", no_torch)
    rows = bench.benchmark(bench.Case(1, 2, 2, 4, 3, 1, True, "float32"), warmup=0, repeat=1)
    torch_rows = [r for r in rows if r["implementation"] in ("cudcn (torch adapter)", "torchvision",
                                                             "pure torch (grid_sample)")]
    assert len(torch_rows) == 3 and all(r["status"] == "not available: torch not installed" for r in torch_rows)
    assert not any("CUDA device for torch" in r["status"] or "sees no CUDA" in r["status"] for r in rows)


def test_bench_peer_that_cannot_run_the_case_is_not_available_rather_than_failed(monkeypatch):
    monkeypatch.setattr(bench, "is_installed", lambda module: True)  # refused before paddle is imported
    case = bench.Case(1, 4, 3, 4, 3, 2, True, "float32")  # 3 output channels, 2 offset groups
    with pytest.raises(bench.NotAvailable, match="paddle's op needs out_channels divisible by the offset groups"):
        bench._paddle_prepared(case, bench.make_arguments(case))


def test_bench_even_kernel_runs(capsys):
    """'Same' padding with an even kernel gives one more output row and column."""
    case = bench.Case(1, 2, 2, 5, 2, 1, True, "float32")
    assert case.out_size == 6
    rows = bench.benchmark(case, warmup=0, repeat=1)
    assert rows[0]["implementation"] == "cudcn (numpy backend)" and rows[0]["status"] == "ok"


def test_compile_without_cupy_names_the_extra(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    assert _command_error(capsys, ["compile"]) == (
        'cudcn compile: error: cudcn compile needs CuPy, which is not installed: install the CUDA extra that '
        'matches your driver: pip install "cudcn[cuda12]" or "cudcn[cuda13]"')


def test_demo_without_its_packages_names_the_extra(capsys, monkeypatch, tmp_path):
    from cudcn.cli.demo import NEEDS

    monkeypatch.setitem(sys.modules, "sklearn", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "tqdm", None)
    missing = ", ".join(package for module, package in NEEDS.items() if not is_installed(module))
    assert "scikit-learn" in missing and "tqdm" in missing
    assert _command_error(capsys, ["demo", "--out", str(tmp_path)]) == (
        f'cudcn demo: error: cudcn demo needs {missing}, which are not installed: '
        'install the demo extra: pip install "cudcn[demo]"')


def test_demo_checks_its_output_folder_first(capsys, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    blocker = tmp_path / "results"
    blocker.write_text("")
    assert _command_error(capsys, ["demo", "--out", str(blocker)]) == (
        f"cudcn demo: error: --out expects a folder, got the file {str(blocker)!r}")


def test_demo_on_cuda_without_cuda(capsys, monkeypatch, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _command_error(capsys, ["demo", "--device", "cuda", "--out", str(tmp_path)]) == (
        f"cudcn demo: error: --device cuda: torch {torch.__version__} sees no CUDA device; use --device cpu")


def test_interrupt_ends_with_one_line_and_status_130(capsys, monkeypatch):
    from cudcn.cli import check

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(check, "run", interrupted)
    assert cli.main(["check"]) == 130
    assert capsys.readouterr().err == "cudcn check: interrupted\n"


def test_python_dash_m_runs_the_command_line():
    result = subprocess.run([sys.executable, "-m", "cudcn", "--version"], capture_output=True, text=True,
                            cwd=ROOT, check=True)
    assert result.stdout == f"cudcn {cudcn.__version__}\n"
