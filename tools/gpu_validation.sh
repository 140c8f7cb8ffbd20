#!/usr/bin/env bash
# Everything the CUDA backend needs checked on a GPU, in one call:
#   environment      GPU, driver, CUDA runtime, library versions, commit;
#   compile          `cudcn compile` for this GPU through CuPy's compile path (also warms its kernel cache);
#   gpu-tests        every test marked gpu: the CUDA backend against NumPy and torchvision (forward and all
#                    five gradients, tests/test_torchvision.py's cuda cases too), float16/bfloat16 error
#                    bounds, TF32, no host synchronisation, streams, deterministic backward, 64-bit indexing
#                    at real size (forward and backward);
#   precision        measured error of float32 (TF32 off/on), float16 and bfloat16 against float64, beside
#                    torchvision's (tools/precision_report.py);
#   check            `cudcn check`;
#   sanitizer        compute-sanitizer memcheck + initcheck (racecheck + synccheck once kernels use shared
#                    memory) on tools/sanitize_case.py;
#   benchmark        benchmarks/bench_gpu.py: the three shapes in float32 (TF32 off and on), float16 and
#                    bfloat16, forward, backward and peak memory against torchvision; the forward of each
#                    algorithm (im2col, fused, auto and its choice) beside torchvision and cuDNN's plain
#                    convolution of the same shape.
# From a plain checkout (no install, no network needed):
#   PYTHONPATH=. bash tools/gpu_validation.sh
# Settings (environment variables):
#   STEPS         the steps to run, in order (default: all of the above); e.g. a first call with
#                 STEPS="environment compile gpu-tests check" and a second with the rest, where one
#                 call may run only so long;
#   STEP_TIMEOUT  seconds each step may run before it is stopped and counted as failed (default 900);
#   PYTHON        the interpreter (default: python3, else python);
#   CUDCN_COMMIT  the commit tested, recorded where the copy has no .git (the benchmark reads it too).
# Logs go to ${OUT:-gpu-validation}/<step>.log (and the benchmark's bench_gpu.md/.json there). Printed
# last: the benchmark and precision tables, then a table of step / exit code / seconds / last log line.
# Exits 1 if a step failed (the sanitizer's "not found", exit 2, does not count; a timeout is exit 124).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
python="$PYTHON"
steps=" ${STEPS:-environment compile gpu-tests precision check sanitizer benchmark} "
out="${OUT:-gpu-validation}"
mkdir -p "$out"
export OUT="$out"
rows=()
failed=0

step() {
  local name=$1
  shift
  [[ $steps == *" $name "* ]] || return 0
  local start=$SECONDS
  timeout "${STEP_TIMEOUT:-900}" "$@" >"$out/$name.log" 2>&1
  local code=$?
  rows+=("$name|$code|$((SECONDS - start))|$(grep -v '^\s*$' "$out/$name.log" | tail -1 | cut -c1-110)")
  if [[ $code -ne 0 && ! ($name == sanitizer && $code -eq 2) ]]; then failed=1; fi
  echo "== $name: exit $code ($((SECONDS - start)) s)"
}

step environment bash -c '
  nvidia-smi || true
  git log -1 --format="commit %H %s" 2>/dev/null || echo "commit ${CUDCN_COMMIT:-unknown (no .git here; set CUDCN_COMMIT)}"
  "$PYTHON" - <<PY
import platform, numpy
print("python", platform.python_version(), "numpy", numpy.__version__)
import cupy
print("cupy", cupy.__version__, "CUDA runtime", cupy.cuda.runtime.runtimeGetVersion(),
      "driver", cupy.cuda.runtime.driverGetVersion(), "devices", cupy.cuda.runtime.getDeviceCount())
from cudcn.backends.cuda.engine import cupy_bfloat16_problem
print("CuPy bfloat16:", cupy_bfloat16_problem() or "available")
for name in ("torch", "torchvision", "ml_dtypes", "hypothesis", "pytest"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "?"))
    except ImportError:
        print(name, "not installed")
PY'
arch="sm_$("$python" -c 'import cupy; print(cupy.cuda.Device().compute_capability)' 2>/dev/null || echo 80)"
step compile "$python" -m cudcn compile --arch "$arch"
step gpu-tests "$python" -m pytest -p no:cacheprovider -q -rs -m gpu --junitxml "$out/pytest.xml" tests
step precision "$python" tools/precision_report.py
step check "$python" -m cudcn check
step sanitizer bash tools/gpu_sanitize.sh
step benchmark "$python" benchmarks/bench_gpu.py --output "$out"

echo
cat "$out/bench_gpu.md" 2>/dev/null || echo "(no benchmark table)"
echo
grep -E '^(\||max )' "$out/precision.log" 2>/dev/null || echo "(no precision table)"
echo
printf '%-12s %5s %6s  %s\n' step exit sec "last line of log"
for row in "${rows[@]}"; do
  IFS='|' read -r name code secs last <<<"$row"
  printf '%-12s %5s %6s  %s\n' "$name" "$code" "$secs" "$last"
done
exit $failed
