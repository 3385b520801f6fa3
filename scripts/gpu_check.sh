#!/usr/bin/env bash
# The first-GPU validation in one call: build fastmlp for the local GPU, run
# the correctness tests of every CUDA engine, print the validated-engine
# entries the run earned (scripts/gpu_engine_table.py), then the op
# benchmarks, the epoch suite and, with what time is left, the torch.compile
# max-autotune baseline. Logs, JSON and markdown go to OUTDIR.
#
#   scripts/gpu_check.sh OUTDIR
#
# Meant for a lent GPU machine without internet (torch, ninja, pytest and
# pytest-benchmark preinstalled; the torch there may be older than CI's).
# Keeps going after a failing stage so the benchmarks still run; exits
# non-zero at the end if any stage failed. Budget: about 7.5 minutes on an
# H100/H200 with 16 cores (FASTMLP_GPU_CHECK_BUDGET_S, default 450).
#
# Promoting an engine afterwards: copy the printed entries into
# validated_engines() in csrc/cuda/engine_rule.cpp, and the measured table into
# docs/benchmarks.md ("GPU") and docs/cuda.md ("Supported GPUs and engines").
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
export TORCH_CUDA_ARCH_LIST="$CAP" MAX_JOBS=${MAX_JOBS:-16} FASTMLP_CUDA=1
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
log "build stage done"

if [[ ! " ${FAILED[*]} " =~ " build " ]]; then
  log "tests"
  # shellcheck disable=SC2086
  T_TESTS=$(($(left) / 2)); [ "$T_TESTS" -gt 240 ] && T_TESTS=240
  : >"$OUT/test_results.jsonl"
  # Every engine is forced in turn by the tests themselves; the per-test
  # outcomes (engine, precision) decide which engines this run validates.
  FASTMLP_TEST_RESULTS="$OUT/test_results.jsonl" timeout "$T_TESTS" $PY -m pytest $PYTEST_ARGS \
    tests/test_ops_*_cuda.py tests/test_engines.py tests/test_ops_linear_relu.py 2>&1 | tee "$OUT/tests.log" | tail -n 40
  TESTS_RC=${PIPESTATUS[0]}
  [ "$TESTS_RC" -ne 0 ] && FAILED+=("tests(rc=$TESTS_RC)")
  log "tests done (rc=$TESTS_RC)"
  $PY -m fastmlp.engines >"$OUT/engine_report.txt" 2>&1 || true

  log "benchmarks"
  T_BENCH=$(($(left) - 10)); [ "$T_BENCH" -gt 180 ] && T_BENCH=180; [ "$T_BENCH" -lt 30 ] && T_BENCH=30
  timeout "$T_BENCH" $PY -m pytest -q -o addopts= -p no:cacheprovider \
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
    timeout "$T" $PY -m pytest -q -o addopts= -p no:cacheprovider \
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

$PY benchmarks/report.py "$OUT/bench_main.json" "$OUT/bench_compile.json" \
  --tests-log "$OUT/tests.log" --failed "${FAILED[*]:-}" >"$OUT/gpu_results.md" || FAILED+=(report)
if [ -s "$OUT/test_results.jsonl" ]; then
  $PY scripts/gpu_engine_table.py --tests "$OUT/test_results.jsonl" --bench "$OUT/bench_main.json" \
    --tests-rc "${TESTS_RC:-2}" >"$OUT/validated_engines.txt" 2>&1 || FAILED+=(engine-table)
fi
log "total $(elapsed)s"
echo
cat "$OUT/gpu_results.md"
echo
cat "$OUT/engine_report.txt" "$OUT/validated_engines.txt" 2>/dev/null
if [ "${#FAILED[@]}" -ne 0 ]; then
  echo "FAILED stages: ${FAILED[*]}"
  exit 1
fi
