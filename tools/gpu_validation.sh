#!/usr/bin/env bash
# Everything the CUDA backend needs checked on a GPU, in one call:
#   environment      GPU, driver, CUDA runtime, library versions, commit;
#   compile          `cudcn compile` for this GPU's architecture through CuPy's compile path (also warms its
#                    kernel cache);
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
#                    convolution of the same shape; the performance model's prediction beside each
#                    measurement where benchmarks/gpu_model.py exists.
# Quick mode (QUICK=1), for a GPU lent for a few minutes: one call of at most 6 minutes, a cold machine
# included, the whole run held to DEADLINE seconds (default 330):
#   environment, compile (this architecture only), gpu-tests (only the tests marked quick: forward and
#   backward against NumPy in every dtype on fixed shapes, torchvision, determinism; the slowest listed),
#   benchmark (--quick: the first shape, each precision once, the model beside it), sanitizer (memcheck
#   on one case: tools/sanitize_case.py --quick). The rest (every gpu test, precision, check, the other
#   sanitizer tools and cases, all shapes) is the full mode, a second call.
# From a plain checkout (no install, no network needed):
#   PYTHONPATH=. bash tools/gpu_validation.sh               # full
#   PYTHONPATH=. QUICK=1 bash tools/gpu_validation.sh       # quick
# Settings (environment variables):
#   QUICK         1 for the quick mode (MODE=quick says the same);
#   STEPS         the steps to run, in order (default: all of the mode's); e.g. a first call with
#                 STEPS="environment compile gpu-tests check" and a second with the rest, where one
#                 call may run only so long;
#   STEP_TIMEOUT  seconds each step may run before it is stopped and counted as failed (default 900;
#                 quick mode: each step its own, 20 + 80 + 110 + 75 + 45 s);
#   DEADLINE      seconds the whole run may take (default: none; quick mode 330): a step gets at most
#                 what is left, and a step with nothing left is not run and counts as failed;
#   DRY_RUN       1: print each step's timeout and command instead of running it (no GPU needed);
#   PYTHON        the interpreter (default: python3, else python);
#   CUDCN_COMMIT  the commit tested, recorded where the copy has no .git (the benchmark reads it too).
# Without a CUDA device visible to CuPy it says so and stops after the environment step (exit 1).
# Logs go to ${OUT:-gpu-validation}/<step>.log (and the benchmark's bench_gpu.md/.json there). Printed
# last: the benchmark and precision tables, then a table of step / exit code / seconds / last log line.
# Exits 1 if a step failed (the sanitizer's "not found", exit 2, does not count; a timeout is exit 124).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
python="$PYTHON"
mode=full
if [[ "${QUICK:-0}" != 0 || "${MODE:-full}" == quick ]]; then mode=quick; fi
if [[ $mode == quick ]]; then
  all_steps="environment compile gpu-tests benchmark sanitizer"
  declare -A limit=([environment]=20 [compile]=80 [gpu-tests]=110 [benchmark]=75 [sanitizer]=45)
  deadline="${DEADLINE:-330}"
else
  all_steps="environment compile gpu-tests precision check sanitizer benchmark"
  declare -A limit=()
  deadline="${DEADLINE:-}"
fi
steps=" ${STEPS:-$all_steps} "
out="${OUT:-gpu-validation}"
mkdir -p "$out"
export OUT="$out"
rows=()
failed=0
echo "mode: $mode; steps:${steps% }${deadline:+; deadline $deadline s}"

step() {
  local name=$1
  shift
  [[ $steps == *" $name "* ]] || return 0
  local seconds="${STEP_TIMEOUT:-${limit[$name]:-900}}"
  if [[ -n $deadline ]]; then
    local left=$((deadline - SECONDS))
    if ((left <= 0)); then
      rows+=("$name|-|0|not run: the deadline of $deadline s has passed")
      failed=1
      echo "== $name: not run (deadline)"
      return 0
    fi
    ((seconds > left)) && seconds=$left
  fi
  if [[ "${DRY_RUN:-0}" != 0 ]]; then
    echo "step $name timeout $seconds: $*"
    return 0
  fi
  local start=$SECONDS
  timeout "$seconds" "$@" >"$out/$name.log" 2>&1
  local code=$?
  rows+=("$name|$code|$((SECONDS - start))|$(grep -v '^\s*$' "$out/$name.log" | tail -1 | cut -c1-110)")
  if [[ $code -ne 0 && ! ($name == sanitizer && $code -eq 2) ]]; then failed=1; fi
  echo "== $name: exit $code ($((SECONDS - start)) s)"
}

summary() {
  echo
  printf '%-12s %5s %6s  %s\n' step exit sec "last line of log"
  for row in "${rows[@]}"; do
    IFS='|' read -r name code secs last <<<"$row"
    printf '%-12s %5s %6s  %s\n' "$name" "$code" "$secs" "$last"
  done
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

if [[ "${DRY_RUN:-0}" != 0 ]]; then
  arch="sm_<this GPU>"
else
  capability="$(timeout 60 "$python" -c 'import cupy
assert cupy.cuda.runtime.getDeviceCount() > 0
print(cupy.cuda.Device().compute_capability)' 2>"$out/device.log")"
  if [[ ! $capability =~ ^[0-9]+$ ]]; then
    echo "no CUDA device visible to CuPy: nothing to validate ($(tail -1 "$out/device.log" | cut -c1-150))"
    rows+=("device|1|0|no CUDA device visible to CuPy (see $out/device.log)")
    summary
    exit 1
  fi
  arch="sm_$capability"
fi

step compile "$python" -m cudcn compile --arch "$arch"
if [[ $mode == quick ]]; then
  step gpu-tests "$python" -m pytest -p no:cacheprovider -q -rs -m "gpu and quick" --durations=15 \
    --junitxml "$out/pytest.xml" tests
  step benchmark "$python" benchmarks/bench_gpu.py --quick --output "$out"
  step sanitizer env SANITIZER_TOOLS="${SANITIZER_TOOLS:-memcheck}" bash tools/gpu_sanitize.sh --quick
else
  step gpu-tests "$python" -m pytest -p no:cacheprovider -q -rs -m gpu --junitxml "$out/pytest.xml" tests
  step precision "$python" tools/precision_report.py
  step check "$python" -m cudcn check
  step sanitizer bash tools/gpu_sanitize.sh
  step benchmark "$python" benchmarks/bench_gpu.py --output "$out"
fi
[[ "${DRY_RUN:-0}" != 0 ]] && exit 0

echo
cat "$out/bench_gpu.md" 2>/dev/null || echo "(no benchmark table)"
if [[ $mode == full ]]; then
  echo
  grep -E '^(\||max )' "$out/precision.log" 2>/dev/null || echo "(no precision table)"
fi
summary
exit $failed
