#!/usr/bin/env bash
# The whole GPU check in one call: the GPU-only tests, then `python -m benchmarks.run` on CUDA.
#
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]      # default: $OUT, else /tmp/gpu_check
#   bash benchmarks/gpu_check.sh --quick [DIR]       # CPU dry run of the script's own logic (no numbers)
#
# CHECK_SECONDS (default 540) is the whole call's time: the benchmarks get what the tests left, less
# 20 s to render the report of whatever parts finished. BENCH_PARTS (e.g. accuracy,gpu_sync,overhead)
# measures those parts first and in that order, keeping the others from the last run on the same card.
#
# Writes to RESULTS_DIR: gpu_check.log (this script's steps), pytest_gpu.log, benchmarks.log and
# results_gpu.tar.gz (benchmarks/results/gpu and docs/benchmarks.md with its GPU section filled in).
# Uses the python3 on PATH with torch and lightning installed; lightning_nograd from this checkout.
set -uo pipefail
cd "$(dirname "$0")/.."
quick=""
if [[ "${1:-}" == "--quick" ]]; then quick="--quick"; shift; fi
dir="${1:-${OUT:-/tmp/gpu_check}}"
mkdir -p "$dir"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg WANDB_MODE=offline
# deterministic cuBLAS, for the overhead benchmark's bit-identity check
export CUBLAS_WORKSPACE_CONFIG=:4096:8
exec > >(tee "$dir/gpu_check.log") 2>&1
log() { echo "[$(date +%T)] $*"; }

log "device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo none)"
python3 -c "import torch, lightning, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'lightning', lightning.__version__, 'cuda', torch.cuda.is_available())"

if [[ -n "${SKIP_TESTS:-}" ]]; then
    log "GPU-only tests skipped (SKIP_TESTS)"; tests_rc=0
else
log "GPU-only tests"
# GPU_TESTS narrows the selection (a rerun of the tests that failed)
python3 -m pytest -q -rs -p no:randomly ${GPU_TESTS:-tests/test_gpu.py tests/test_savings_monitor.py::test_cuda_peak_memory_and_savings} \
    > "$dir/pytest_gpu.log" 2>&1
tests_rc=$?
tail -n 15 "$dir/pytest_gpu.log"
log "tests exit code $tests_rc"
fi

log "benchmarks ${quick:-(full)}"
bench_out="benchmarks/results/gpu"
[[ -n "$quick" ]] && bench_out="$dir/bench_quick"
left=$(( ${CHECK_SECONDS:-540} - SECONDS - 20 ))
log "benchmarks get ${BENCH_TIMEOUT:-$left} s${BENCH_PARTS:+, parts $BENCH_PARTS}"
timeout "${BENCH_TIMEOUT:-$left}" python3 -m benchmarks.run $quick ${BENCH_PARTS:+--parts "$BENCH_PARTS"} \
    --out "$bench_out" > "$dir/benchmarks.log" 2>&1
bench_rc=$?
if [[ $bench_rc -eq 124 && -z "$quick" && -f "$bench_out/results.json" ]]; then
    log "stopped at the time limit: the report and docs page from the parts that finished"
    python3 -m benchmarks.run --report-only --out "$bench_out" >> "$dir/benchmarks.log" 2>&1
fi
tail -n 60 "$dir/benchmarks.log"
log "benchmarks exit code $bench_rc"

tar czf "$dir/results_gpu.tar.gz" "$bench_out" docs/benchmarks.md 2>/dev/null
log "done: tests $tests_rc, benchmarks $bench_rc; results in $dir"
exit $(( tests_rc != 0 || bench_rc != 0 ))
