#!/usr/bin/env bash
# Everything the CUDA backend needs checked on a GPU, in one run:
#   environment, `cudcn compile` for this GPU (also warms the kernel cache),
#   the gpu / emulated / compile tests, `cudcn check`, compute-sanitizer
#   memcheck + racecheck, and the benchmark against torchvision.
# From a plain checkout (no install, no network needed):
#   PYTHONPATH=. bash tools/gpu_validation.sh
# Logs and the benchmark table go to ${OUT:-gpu-validation}/; a summary table
# (step, exit code, seconds, last log line) is printed last. Exits 1 if a step
# other than the sanitizer's "not installed" (exit 2) failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-gpu-validation}"
mkdir -p "$out"
export OUT="$out"
rows=()
failed=0

step() {
  local name=$1
  shift
  local start=$SECONDS
  "$@" >"$out/$name.log" 2>&1
  local code=$?
  rows+=("$name|$code|$((SECONDS - start))|$(grep -v '^\s*$' "$out/$name.log" | tail -1 | cut -c1-100)")
  if [[ $code -ne 0 && ! ($name == sanitizer && $code -eq 2) ]]; then failed=1; fi
  echo "== $name: exit $code ($((SECONDS - start)) s)"
}

step environment bash -c '
  nvidia-smi -L || true
  git log -1 --format="commit %H %s" 2>/dev/null || true
  python - <<PY
import platform, numpy
print("python", platform.python_version(), "numpy", numpy.__version__)
import cupy
print("cupy", cupy.__version__, "CUDA runtime", cupy.cuda.runtime.runtimeGetVersion(),
      "driver", cupy.cuda.runtime.driverGetVersion(), "devices", cupy.cuda.runtime.getDeviceCount())
for name in ("torch", "torchvision", "ml_dtypes", "hypothesis", "pytest"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "?"))
    except ImportError:
        print(name, "not installed")
PY'
arch="sm_$(python -c 'import cupy; print(cupy.cuda.Device().compute_capability)' 2>/dev/null || echo 80)"
step compile python -m cudcn compile --arch "$arch"
step tests python -m pytest -p no:cacheprovider -q -rs --junitxml "$out/pytest.xml" \
  tests/test_gpu.py tests/test_torch_gpu.py tests/test_gpu_compile.py tests/test_emulated.py \
  tests/test_emulator.py
step check python -m cudcn check
step sanitizer bash tools/gpu_sanitize.sh
step benchmark python benchmarks/bench_gpu.py --output "$out"

echo
cat "$out/bench_gpu.md" 2>/dev/null || echo "(no benchmark table)"
echo
printf '%-12s %5s %6s  %s\n' step exit sec "last line of log"
for row in "${rows[@]}"; do
  IFS='|' read -r name code secs last <<<"$row"
  printf '%-12s %5s %6s  %s\n' "$name" "$code" "$secs" "$last"
done
exit $failed
