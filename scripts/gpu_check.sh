#!/usr/bin/env bash
# Build fastmlp for the local GPU, run the CUDA tests and the GPU benchmarks,
# and write logs, JSON and a markdown table to OUTDIR.
#
#   scripts/gpu_check.sh OUTDIR
#
# Meant for a lent GPU machine without internet (torch, ninja, pytest and
# pytest-benchmark preinstalled). Keeps going after a failing stage so the
# benchmarks still run; exits non-zero at the end if any stage failed.
# Budget: about 7.5 minutes on an H100 with 16 cores; the max-autotune
# baseline gets whatever time is left (FASTMLP_GPU_CHECK_BUDGET_S, default 450).
set -u -o pipefail

OUT=${1:?usage: scripts/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
BUDGET=${FASTMLP_GPU_CHECK_BUDGET_S:-450}
PYTEST_ARGS=${FASTMLP_PYTEST_ARGS:--q -rfE --maxfail=30}
START=$(date +%s)
FAILED=()

elapsed() { echo $(($(date +%s) - START)); }
log() { echo "[gpu_check $(elapsed)s] $*"; }
left() { echo $((BUDGET - $(elapsed))); }

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
CAP=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
if [ -z "$CAP" ]; then
  log "no CUDA device visible to torch"
  exit 2
fi
export TORCH_CUDA_ARCH_LIST="$CAP" MAX_JOBS=${MAX_JOBS:-16}
log "building for compute capability $CAP (MAX_JOBS=$MAX_JOBS)"
if ! $PY -m pip install --no-build-isolation --no-deps --no-index -v -e . >"$OUT/build.log" 2>&1; then
  # `python -m pytest` from the repository root imports the in-place build too.
  log "pip install failed; trying setup.py build_ext --inplace"
  if ! $PY setup.py build_ext --inplace >"$OUT/build_inplace.log" 2>&1; then
    FAILED+=(build)
    log "BUILD FAILED; tails of build.log and build_inplace.log:"
    tail -n 30 "$OUT/build.log"
    tail -n 40 "$OUT/build_inplace.log"
  fi
fi
# Register-usage lines, if the build printed any (-Xptxas -v is not on by default).
grep -E "ptxas info|spill" "$OUT/build.log" >"$OUT/ptxas.txt" 2>/dev/null || true
log "build stage done"

if [[ ! " ${FAILED[*]} " =~ " build " ]]; then
  log "tests"
  # shellcheck disable=SC2086
  T_TESTS=$(($(left) / 2)); [ "$T_TESTS" -gt 240 ] && T_TESTS=240
  timeout "$T_TESTS" $PY -m pytest $PYTEST_ARGS \
    tests/test_cuda.py tests/test_ops.py 2>&1 | tee "$OUT/tests.log" | tail -n 40
  rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && FAILED+=("tests(rc=$rc)")
  log "tests done (rc=$rc)"

  JSONL="$OUT/bench.jsonl"
  : >"$JSONL"
  log "benchmarks"
  T_BENCH=$(($(left) - 10)); [ "$T_BENCH" -gt 180 ] && T_BENCH=180; [ "$T_BENCH" -lt 30 ] && T_BENCH=30
  FASTMLP_BENCH_JSONL="$JSONL" timeout "$T_BENCH" $PY -m pytest -q -o addopts= -p no:cacheprovider \
    benchmarks/test_bench_gpu.py -k "not compiled" \
    --benchmark-json="$OUT/bench_main.json" --benchmark-columns=median,iqr,rounds \
    >"$OUT/bench_main.log" 2>&1
  rc=$?
  [ "$rc" -ne 0 ] && FAILED+=("bench(rc=$rc)") && tail -n 30 "$OUT/bench_main.log"
  log "benchmarks done (rc=$rc)"

  # The end-to-end epoch suite needs Fashion-MNIST on this machine (FASTMLP_DATA, or
  # the folder carried along); without it the stage is skipped, not failed.
  T=$(($(left) - 60)); [ "$T" -gt 150 ] && T=150
  if [ "$T" -gt 40 ] && $PY -c "from fastmlp import data; data.find_data_dir(download=False)" 2>/dev/null; then
    log "epoch suite (cuda) with ${T}s"
    FASTMLP_BENCH_ROUNDS=2 timeout "$T" $PY -m pytest -q -o addopts= -p no:cacheprovider \
      benchmarks/test_bench_epoch.py -k cuda --benchmark-json="$OUT/epoch.json" \
      >"$OUT/epoch.log" 2>&1
    rc=$?
    [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && FAILED+=("epoch(rc=$rc)")
    $PY benchmarks/report.py "$OUT/epoch.json" >"$OUT/epoch.md" 2>>"$OUT/epoch.log" || true
    log "epoch suite done (rc=$rc)"
  else
    log "epoch suite skipped (no data or no time)"
  fi

  T=$(left)
  if [ "$T" -gt 45 ]; then
    log "max-autotune baseline with ${T}s left"
    FASTMLP_BENCH_JSONL="$JSONL" timeout "$T" $PY -m pytest -q -o addopts= -p no:cacheprovider \
      benchmarks/test_bench_gpu.py -k "compiled" \
      --benchmark-json="$OUT/bench_compile.json" >"$OUT/bench_compile.log" 2>&1
    rc=$?
    # A timeout here only shortens the table; it is not a failure of fastmlp.
    [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && FAILED+=("bench-compile(rc=$rc)")
    log "max-autotune baseline done (rc=$rc)"
  else
    log "no time left for the max-autotune baseline"
  fi
fi

$PY scripts/gpu_report.py "$OUT/bench.jsonl" --tests-log "$OUT/tests.log" \
  --failed "${FAILED[*]:-}" >"$OUT/gpu_results.md" || FAILED+=(report)
log "total $(elapsed)s"
echo
cat "$OUT/gpu_results.md"
if [ "${#FAILED[@]}" -ne 0 ]; then
  echo "FAILED stages: ${FAILED[*]}"
  exit 1
fi
