#!/usr/bin/env bash
# compute-sanitizer on a small CUDA-backend run (tools/sanitize_case.py).
# Run from the repository root with PYTHONPATH=.; arguments go to
# tools/sanitize_case.py (--quick: one case).
#
# Tools (docs/gpu-validation.md says what each proves):
#   memcheck   out-of-bounds and misaligned device memory accesses, and
#              errors returned by CUDA calls;
#   initcheck  reads of device memory that nothing wrote;
#   racecheck, synccheck
#              shared-memory races and invalid barrier use: run when a kernel
#              source uses shared memory, barriers or warp synchronisation
#              (they inspect nothing else), or when SANITIZER_TOOLS names them.
# SANITIZER_TOOLS="memcheck initcheck ..." overrides the choice.
#
# compute-sanitizer is looked up on PATH, through cuda.pathfinder (which also
# finds the one in the nvidia-cuda-sanitizer-api wheel), then in CUDA_HOME,
# CUDA_PATH and /usr/local/cuda. Exits 0 when every tool reports no error,
# 1 when one does, 2 when compute-sanitizer is not found. Logs go to
# ${OUT:-.}/sanitizer-<tool>.log.
set -uo pipefail
out_dir="${OUT:-.}"
python="${PYTHON:-$(command -v python3 || command -v python)}"

sanitizer="$(command -v compute-sanitizer || true)"
if [[ -z "$sanitizer" ]]; then
  sanitizer="$("$python" -c 'from cuda.pathfinder import find_nvidia_binary_utility as f; print(f("compute-sanitizer") or "")' 2>/dev/null || true)"
fi
for candidate in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
  if [[ -z "$sanitizer" && -n "$candidate" && -x "$candidate/bin/compute-sanitizer" ]]; then
    sanitizer="$candidate/bin/compute-sanitizer"
  fi
done
if [[ -z "$sanitizer" ]]; then
  echo "compute-sanitizer not found (PATH, cuda.pathfinder, CUDA_HOME, CUDA_PATH, /usr/local/cuda): not run;" \
       "pip install nvidia-cuda-sanitizer-api (the CUDA major of the driver) provides it"
  exit 2
fi

tools="${SANITIZER_TOOLS:-}"
if [[ -z "$tools" ]]; then
  tools="memcheck initcheck"
  cooperative="$(grep -lE '__shared__|__syncthreads|__syncwarp|__shfl_|__ballot_sync|mma\.sync|ldmatrix' kernels/*.cu kernels/*.cuh 2>/dev/null | tr '\n' ' ')"
  if [[ -n "$cooperative" ]]; then
    tools="$tools racecheck synccheck"
    echo "shared memory, barriers or warp operations in: $cooperative-> racecheck and synccheck too"
  fi
fi
echo "compute-sanitizer: $sanitizer; tools: $tools"

status=0
for tool in $tools; do
  log="$out_dir/sanitizer-$tool.log"
  "$sanitizer" --tool "$tool" --error-exitcode 99 "$python" tools/sanitize_case.py "$@" >"$log" 2>&1
  code=$?
  summary="$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -1)"
  echo "$tool: exit $code; ${summary:-no summary line} (log: $log)"
  [[ $code -eq 0 ]] || status=1
done
exit $status
