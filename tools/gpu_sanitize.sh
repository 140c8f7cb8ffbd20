#!/usr/bin/env bash
# compute-sanitizer memcheck and racecheck on a small CUDA-backend run
# (tools/sanitize_case.py). Run from the repository root with PYTHONPATH=.
# Exits 0 when both tools report no errors, 1 when one does, 2 when
# compute-sanitizer is not installed. Logs go to ${OUT:-.}/sanitizer-*.log.
set -uo pipefail
out_dir="${OUT:-.}"
sanitizer="$(command -v compute-sanitizer || true)"
for candidate in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
  if [[ -z "$sanitizer" && -n "$candidate" && -x "$candidate/bin/compute-sanitizer" ]]; then
    sanitizer="$candidate/bin/compute-sanitizer"
  fi
done
if [[ -z "$sanitizer" ]]; then
  echo "compute-sanitizer not found (PATH, CUDA_HOME, CUDA_PATH, /usr/local/cuda): not run"
  exit 2
fi
status=0
for tool in memcheck racecheck; do
  log="$out_dir/sanitizer-$tool.log"
  "$sanitizer" --tool "$tool" --error-exitcode 99 python tools/sanitize_case.py >"$log" 2>&1
  code=$?
  summary="$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -1)"
  echo "$tool: exit $code; ${summary:-no summary line} (log: $log)"
  [[ $code -eq 0 ]] || status=1
done
exit $status
