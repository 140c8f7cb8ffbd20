"""The GPU validation's tools, checked without a GPU.

- tools/gpu_sanitize.sh, with a stand-in compute-sanitizer: memcheck and
  initcheck; racecheck and synccheck too once a kernel source uses shared
  memory, barriers or warp operations; it fails when a tool reports an error,
  and says so when there is no compute-sanitizer; its arguments reach
  tools/sanitize_case.py;
- benchmarks/bench_gpu.py's tables: the ratios cudcn / torchvision, the
  performance model beside the measurements (or "no model");
- tools/precision_report.py, on the NumPy backend;
- tools/gpu_validation.sh: the steps STEPS picks, each under its time
  limit; the quick mode's steps (a subset of the full mode's, within 330 s
  in all), its deadline, and a clean, fast failure without a GPU;
- the quick mode's tests (marker ``quick``) are GPU tests.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_SANITIZER = """#!/usr/bin/env bash
# Records its tool (and its command line), prints a summary, fails for the tool named in FAKE_FAILING.
tool="$2"
echo "$tool" >> "$OUT/calls.txt"
echo "$@" >> "$OUT/command_lines.txt"
echo "========= ERROR SUMMARY: 0 errors"
[[ "$tool" == "${FAKE_FAILING:-none}" ]] && exit 99
exit 0
"""


def _run(tmp_path: Path, sanitizer: bool = True, arguments: tuple[str, ...] = (),
         **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    tree = tmp_path / "tree"
    if not tree.exists():
        shutil.copytree(ROOT / "kernels", tree / "kernels")
        (tree / "tools").mkdir()
        shutil.copy(ROOT / "tools" / "gpu_sanitize.sh", tree / "tools")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "compute-sanitizer"
    if sanitizer:
        fake.write_text(FAKE_SANITIZER)
        fake.chmod(0o755)
    elif fake.exists():
        fake.unlink()
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "calls.txt").unlink(missing_ok=True)
    (out / "command_lines.txt").unlink(missing_ok=True)
    empty = tmp_path / "empty"
    empty.mkdir(exist_ok=True)
    environment = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OUT": str(out), "PYTHON": sys.executable,
        "CUDA_HOME": str(empty), "CUDA_PATH": str(empty), **env,
    }
    result = subprocess.run(["bash", "tools/gpu_sanitize.sh", *arguments], cwd=tree, env=environment,
                            capture_output=True, text=True, timeout=120)
    calls = (out / "calls.txt").read_text().split() if (out / "calls.txt").exists() else []
    return result, calls


def test_memcheck_and_initcheck_for_kernels_without_shared_memory(tmp_path):
    (tmp_path / "tree" / "kernels").mkdir(parents=True)
    (tmp_path / "tree" / "kernels" / "dcn_plain.cu").write_text("__global__ void k(float* x) { x[0] = 1; }\n")
    (tmp_path / "tree" / "tools").mkdir()
    shutil.copy(ROOT / "tools" / "gpu_sanitize.sh", tmp_path / "tree" / "tools")
    result, calls = _run(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert calls == ["memcheck", "initcheck"]


def test_todays_kernels_get_racecheck_and_synccheck(tmp_path):
    """deform_col2im_coord reduces by warp shuffles (and dcn_mma.cuh holds the MMA wrappers)."""
    result, calls = _run(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert calls == ["memcheck", "initcheck", "racecheck", "synccheck"]
    assert "dcn_col2im_coord.cu" in result.stdout and "dcn_mma.cuh" in result.stdout


def test_racecheck_and_synccheck_once_a_kernel_uses_shared_memory(tmp_path):
    _run(tmp_path)
    (tmp_path / "tree" / "kernels" / "dcn_tile.cuh").write_text("__shared__ float tile[32];\n")
    result, calls = _run(tmp_path)
    assert result.returncode == 0
    assert calls == ["memcheck", "initcheck", "racecheck", "synccheck"]
    assert "dcn_tile.cuh" in result.stdout


def test_a_tool_that_reports_an_error_fails_the_script(tmp_path):
    result, calls = _run(tmp_path, FAKE_FAILING="initcheck")
    assert result.returncode == 1 and calls[:2] == ["memcheck", "initcheck"]
    assert "initcheck: exit 99" in result.stdout


def test_arguments_reach_the_sanitized_case(tmp_path):
    """The quick validation's `gpu_sanitize.sh --quick` runs `sanitize_case.py --quick` under each tool."""
    result, calls = _run(tmp_path, arguments=("--quick",), SANITIZER_TOOLS="memcheck")
    assert result.returncode == 0 and calls == ["memcheck"]
    lines = (tmp_path / "out" / "command_lines.txt").read_text().splitlines()
    assert len(lines) == 1 and lines[0].endswith("tools/sanitize_case.py --quick")


def test_no_compute_sanitizer_is_said(tmp_path):
    if Path("/usr/local/cuda/bin/compute-sanitizer").exists() or shutil.which("compute-sanitizer"):
        pytest.skip("this machine has a compute-sanitizer")
    result, calls = _run(tmp_path, sanitizer=False)
    assert result.returncode == 2 and calls == []
    assert "compute-sanitizer not found" in result.stdout


def test_benchmark_table_gives_the_ratios_to_torchvision():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "bench_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    record = dict(gpu="G", driver=1, cuda_runtime=2, cupy="14", torch="2", cudcn="0.1", commit="abc", date="today")
    ours = dict(forward_ms=1.0, backward_ms=3.0, forward_peak_mb=100.0, backward_peak_mb=300.0)
    theirs = dict(forward_ms=2.0, backward_ms=6.0, forward_peak_mb=50.0, backward_peak_mb=600.0)
    rows = [dict(shape="S", dtype="float32 tf32", gflop=10.0, cudcn=ours, torchvision=theirs, forward_rel_diff=1e-4),
            dict(shape="S", dtype="bfloat16", gflop=10.0, cudcn=ours, torchvision=None, forward_rel_diff=None)]
    lines = bench.render(rows, record).splitlines()
    cells = [c.strip() for c in lines[-2].split("|")[1:-1]]
    assert cells[:2] == ["S", "float32 tf32"] and cells[-4:] == ["0.50", "0.50", "0.50", "1.0e-04"]
    assert [c.strip() for c in lines[-1].split("|")[1:-1]][-4:] == ["-", "-", "-", "-"]


def test_algorithm_table_gives_fused_over_torchvision_and_cudnn():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "bench_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ours = dict(im2col_forward_ms=3.0, fused_forward_ms=1.0, auto_forward_ms=1.1, auto_chose="fused",
                im2col_forward_peak_mb=280.0, fused_forward_peak_mb=6.0)
    rows = [dict(shape="S", dtype="float16", cudcn=ours, torchvision=dict(forward_ms=4.0),
                 cudnn=dict(forward_ms=0.8, forward_peak_mb=1.0)),
            dict(shape="S", dtype="bfloat16", cudcn=ours, torchvision=None, cudnn=None)]
    lines = bench.render_algorithms(rows).splitlines()
    cells = [c.strip() for c in lines[-2].split("|")[1:-1]]
    assert cells == ["S", "float16", "3.000", "1.000", "1.100 (fused)", "4.000", "0.800", "0.25", "1.25",
                     "280", "6", "1"]
    assert [c.strip() for c in lines[-1].split("|")[1:-1]][5:9] == ["-", "-", "-", "-"]


def test_backward_algorithm_table_gives_fused_over_torchvision():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "bench_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ours = dict(im2col_backward_ms=9.0, fused_backward_ms=2.0, auto_backward_ms=2.2, auto_backward_chose="fused",
                fused_forward_ms=1.0, im2col_backward_peak_mb=350.0, fused_backward_peak_mb=8.0,
                fused_forward_peak_mb=6.0)
    rows = [dict(shape="S", dtype="float16", cudcn=ours,
                 torchvision=dict(forward_ms=4.0, backward_ms=8.0, forward_peak_mb=100.0, backward_peak_mb=400.0)),
            dict(shape="S", dtype="bfloat16", cudcn=ours, torchvision=None)]
    lines = bench.render_backward_algorithms(rows).splitlines()
    cells = [c.strip() for c in lines[-2].split("|")[1:-1]]
    assert cells == ["S", "float16", "9.000", "2.000", "2.200 (fused)", "8.000", "0.25", "0.25",
                     "350", "8", "400", "0.02"]
    assert [c.strip() for c in lines[-1].split("|")[1:-1]][5:8] == ["-", "-", "-"]


def test_precision_report_runs_on_the_cpu(capsys):
    """The report's logic, on the NumPy backend (float16/bfloat16 compute in float32 there)."""
    spec = importlib.util.spec_from_file_location("precision_report", ROOT / "tools" / "precision_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    assert report.main(["--cpu"]) == 0
    rows = {line.split("|")[1].strip(): [float(c) for c in line.split("|")[2:-1]]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| float") or line.startswith("| bf")}
    assert max(rows["float32"]) < 1e-5 and max(rows["float16"]) < 2e-3
    assert set(rows) <= {"float32", "float32 tf32", "float16", "bfloat16"} and len(rows) >= 3


def test_validation_script_runs_the_chosen_steps_with_a_time_limit(tmp_path):
    """STEPS picks the steps (two calls can split the work where one call may
    run only so long); a step past STEP_TIMEOUT is stopped and counted failed;
    the summary table comes last."""
    tree = tmp_path / "tree"
    (tree / "tools").mkdir(parents=True)
    shutil.copy(ROOT / "tools" / "gpu_validation.sh", tree / "tools")
    fake_python = tmp_path / "python"
    # A stand-in interpreter: it reports compute capability 9.0, `-m cudcn check` passes at once, the
    # benchmark sleeps.
    fake_python.write_text('#!/usr/bin/env bash\n[[ "$*" == *compute_capability* ]] && { echo 90; exit 0; }\n'
                           '[[ "$*" == *bench_gpu* ]] && sleep 30\necho "ran $*"\n')
    fake_python.chmod(0o755)
    environment = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=str(fake_python),
                       STEPS="check benchmark", STEP_TIMEOUT="2")
    result = subprocess.run(["bash", "tools/gpu_validation.sh"], cwd=tree, env=environment,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1  # the benchmark timed out
    summary = result.stdout.splitlines()[-3:]
    assert summary[0].split() == ["step", "exit", "sec", "last", "line", "of", "log"]
    assert summary[1].split()[:2] == ["check", "0"] and summary[1].endswith("ran -m cudcn check")
    assert summary[2].split()[:2] == ["benchmark", "124"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.log")) == ["benchmark.log", "check.log", "device.log"]


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "bench_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_the_model_is_printed_beside_the_measurements(tmp_path):
    """benchmarks/gpu_model.py's predict(shape, precision) -> {"<library>.<measurement>": ms}, each
    beside its measurement; "no model" without the file; a failing model does not stop the benchmark."""
    bench = _bench_module()
    shape = next(iter(bench.SHAPES))
    rows = [dict(shape=shape, dtype="float16", cudcn=dict(forward_ms=1.0, fused_forward_ms=3.0),
                 torchvision=dict(forward_ms=2.0), cudnn=None)]
    assert bench.load_model(tmp_path / "gpu_model.py") is None
    assert bench.predict(None, rows[0]) == {}
    assert "no model (benchmarks/gpu_model.py not present)" in bench.render_model(rows, False)
    (tmp_path / "gpu_model.py").write_text(
        "def predict(shape, precision):\n"
        "    assert len(shape) == 7 and precision == 'float16'\n"
        "    return {'cudcn.forward_ms': 0.5, 'torchvision.forward_ms': 4.0, 'cudnn.forward_ms': 0.25}\n")
    model = bench.load_model(tmp_path / "gpu_model.py")
    rows[0]["model"] = bench.predict(model, rows[0])
    lines = bench.render_model(rows, True).splitlines()
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in lines[-3:]]
    assert cells[0] == [shape, "float16", "cudcn.forward_ms", "0.500", "1.000", "2.00"]
    assert cells[1] == [shape, "float16", "torchvision.forward_ms", "4.000", "2.000", "0.50"]
    assert cells[2] == [shape, "float16", "cudnn.forward_ms", "0.250", "-", "-"]
    (tmp_path / "gpu_model.py").write_text("def predict(shape, precision):\n    raise KeyError(precision)\n")
    rows[0]["model"] = bench.predict(bench.load_model(tmp_path / "gpu_model.py"), rows[0])
    assert "model failed: KeyError: 'float16'" in bench.render_model(rows, True)


def _validation_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    (tree / "tools").mkdir(parents=True)
    shutil.copy(ROOT / "tools" / "gpu_validation.sh", tree / "tools")
    return tree


def _dry_run(tmp_path: Path, **env: str) -> dict[str, tuple[int, str]]:
    """step -> (timeout, command) as DRY_RUN=1 prints them."""
    tree = _validation_tree(tmp_path)
    environment = dict(os.environ, OUT=str(tmp_path / "out"), DRY_RUN="1", **env)
    result = subprocess.run(["bash", "tools/gpu_validation.sh"], cwd=tree, env=environment,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    steps = {}
    for line in result.stdout.splitlines():
        if line.startswith("step "):
            name, _, seconds, command = line.split(" ", 4)[1:]
            steps[name] = (int(seconds.rstrip(":")), command)
    return steps


def test_quick_mode_is_a_subset_of_the_full_mode_within_its_deadline(tmp_path):
    full = _dry_run(tmp_path / "full")
    quick = _dry_run(tmp_path / "quick", QUICK="1")
    assert list(full) == ["environment", "compile", "gpu-tests", "precision", "check", "sanitizer", "benchmark"]
    assert list(quick) == ["environment", "compile", "gpu-tests", "benchmark", "sanitizer"]
    assert set(quick) < set(full)
    assert all(seconds == 900 for seconds, _ in full.values())
    assert sum(seconds for seconds, _ in quick.values()) <= 330  # 5.5 minutes for the whole run
    assert quick["compile"][1].endswith("-m cudcn compile --arch sm_<this GPU>")  # this architecture only
    assert '-m gpu and quick' in quick["gpu-tests"][1] and "--durations" in quick["gpu-tests"][1]
    assert "-m gpu --junitxml" in full["gpu-tests"][1]
    assert quick["benchmark"][1].endswith(f"benchmarks/bench_gpu.py --quick --output {tmp_path / 'quick' / 'out'}")
    assert quick["sanitizer"][1] == "env SANITIZER_TOOLS=memcheck bash tools/gpu_sanitize.sh --quick"
    # MODE=quick says the same; STEP_TIMEOUT sets every step's limit; STEPS picks among the mode's steps.
    mode = _dry_run(tmp_path / "mode", MODE="quick")
    assert {k: v[0] for k, v in mode.items()} == {k: v[0] for k, v in quick.items()}
    picked = _dry_run(tmp_path / "picked", QUICK="1", STEP_TIMEOUT="50", STEPS="compile benchmark")
    assert {name: seconds for name, (seconds, _) in picked.items()} == {"compile": 50, "benchmark": 50}


def test_quick_mode_holds_its_deadline(tmp_path):
    """A step gets at most what is left of DEADLINE; a step with nothing left is not run and fails the run."""
    tree = _validation_tree(tmp_path)
    fake_python = tmp_path / "python"
    fake_python.write_text('#!/usr/bin/env bash\n[[ "$*" == *compute_capability* ]] && { echo 90; exit 0; }\n'
                           'sleep 30\n')
    fake_python.chmod(0o755)
    environment = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=str(fake_python), QUICK="1",
                       DEADLINE="3", STEPS="compile gpu-tests")
    start = time.monotonic()
    result = subprocess.run(["bash", "tools/gpu_validation.sh"], cwd=tree, env=environment,
                            capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 20
    assert result.returncode == 1
    summary = result.stdout.splitlines()[-2:]
    assert summary[0].split()[:2] == ["compile", "124"]
    assert summary[1].split()[:2] == ["gpu-tests", "-"] and "deadline of 3 s has passed" in summary[1]


def test_without_a_gpu_the_validation_stops_at_once(tmp_path):
    """No device visible to CuPy (as on this machine, or a CuPy that cannot load): a clear line, exit 1,
    no step after the environment."""
    tree = _validation_tree(tmp_path)
    fake_python = tmp_path / "python"  # CuPy that finds no device
    fake_python.write_text('#!/usr/bin/env bash\necho "AssertionError: no device" >&2\nexit 1\n')
    fake_python.chmod(0o755)
    environment = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=str(fake_python), QUICK="1",
                       STEPS="compile gpu-tests benchmark")
    start = time.monotonic()
    result = subprocess.run(["bash", "tools/gpu_validation.sh"], cwd=tree, env=environment,
                            capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 10
    assert result.returncode == 1
    assert "no CUDA device visible to CuPy: nothing to validate (AssertionError: no device)" in result.stdout
    assert result.stdout.splitlines()[-1].split()[:2] == ["device", "1"]
    assert [p.name for p in (tmp_path / "out").glob("*.log")] == ["device.log"]


@pytest.mark.parametrize("script", ["gpu_validation.sh", "gpu_sanitize.sh"])
def test_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(ROOT / "tools" / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _marked(path: Path, marker: str) -> tuple[bool, list[str]]:
    """(whether the module's pytestmark names pytest.mark.gpu, the test functions decorated with marker)."""
    tree = ast.parse(path.read_text())
    module_gpu = any(isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in node.targets)
                     and "gpu" in ast.unparse(node.value) for node in tree.body)
    names = [node.name for node in tree.body if isinstance(node, ast.FunctionDef)
             and any(ast.unparse(d).startswith(f"pytest.mark.{marker}") for d in node.decorator_list)]
    return module_gpu, names


def test_the_quick_tests_are_gpu_tests_of_parity_torchvision_and_determinism():
    """Every test marked quick is a gpu test; they cover the im2col path, the fused forward and the fused
    backward against NumPy (or its rounded-operand reference) and torchvision, multi-scale deformable
    attention and DCNv3/DCNv4 against NumPy in every dtype, and determinism."""
    quick = {}
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        module_gpu, names = _marked(path, "quick")
        if names:
            assert module_gpu or set(names) <= set(_marked(path, "gpu")[1]), (path.name, names)
            quick[path.name] = names
    assert set(quick) == {"test_gpu.py", "test_gpu_fused.py", "test_gpu_fused_backward.py", "test_gpu_msda.py",
                          "test_gpu_dcnv3.py"}
    for path, names in quick.items():
        assert any("torchvision" in name for name in names) or path in ("test_gpu_msda.py", "test_gpu_dcnv3.py")
    for path in ("test_gpu_msda.py", "test_gpu_dcnv3.py"):
        assert any("every_dtype" in name for name in quick[path])
        assert any("repeatable" in name for name in quick[path])
    everything = [name for names in quick.values() for name in names]
    assert any("repeatable" in name for name in everything)
    assert any("half_precision" in name for name in everything)  # float16 and bfloat16 against float64
