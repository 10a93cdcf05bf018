#!/usr/bin/env bash
# gpu_check.sh <logdir> - every GPU check of pagedflash in one go, on a machine with an
# NVIDIA GPU, nvcc, torch (CUDA), and optionally cupy/jax/compute-sanitizer:
#   build     PAGEDFLASH_CUDA=1 PAGEDFLASH_CUDA_ARCHS=90 in place, timed -> build.log
#   selftest  tests/cuda/sm90_selftest.cu (wgmma building blocks)       -> selftest.log
#   test      the GPU tests (pytest -m gpu: every op of tests/ops/ on CUDA, each flash
#             case with kernel "auto", "sm80" and, where it applies, "sm90"; every
#             paged CTA shape), then the whole suite (CPU tests too)   -> tests.log
#   sanitize  compute-sanitizer memcheck, racecheck, initcheck over a
#             reduced selection of the GPU tests (SANITIZE_SELECTION)   -> sanitizer_<tool>.log
#   bench     benchmarks/bench_attention.py (prefill grid) and
#             benchmarks/bench_decode.py (paged decode grid)            -> bench.md, decode.md, *.log
#             and, with matplotlib, benchmarks/plot_results.py          -> bench.png, decode.png
# Stages to run: STAGES="build test sanitize bench" (the default: all); TEST_SHARDS (1: one
# pytest process), TEST_TIMEOUT (seconds per shard), SANITIZE_SELECTION (a pytest -k expression),
# SANITIZE_TIMEOUT (seconds per tool), SANITIZE_PARALLEL (0: the tools one after another),
# BENCH_ARGS, DECODE_ARGS. Exit status: non-zero if any stage failed (every stage still runs).
set -uo pipefail
LOG=${1:?usage: scripts/gpu_check.sh <logdir>}
mkdir -p "$LOG"
LOG=$(cd "$LOG" && pwd)
cd "$(dirname "$0")/.."
STAGES=${STAGES:-"build selftest test sanitize bench"}
export PAGEDFLASH_CUDA=1 PAGEDFLASH_CUDA_ARCHS=${PAGEDFLASH_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-16}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD/python
PY=${PYTHON:-python3}
status=0
has() { [[ " $STAGES " == *" $1 "* ]]; }
step() { echo "== $1 ($(date +%T))"; }

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nvcc --version | tail -2;
  $PY -c 'import torch; print("torch", torch.__version__)'; } > "$LOG/device.txt" 2>&1

if has build; then
  step build
  t0=$(date +%s)
  $PY setup.py -q build_ext --inplace > "$LOG/build.log" 2>&1 || { echo "build FAILED"; tail -30 "$LOG/build.log"; exit 1; }
  echo "build took $(( $(date +%s) - t0 )) s (MAX_JOBS=$MAX_JOBS, archs $PAGEDFLASH_CUDA_ARCHS, head dims ${PAGEDFLASH_HEADDIMS:-all})" | tee -a "$LOG/build.log"
fi
$PY -c 'import pagedflash, json; print(json.dumps(pagedflash.build_info()))' | tee -a "$LOG/device.txt"

if has selftest; then
  step selftest
  { nvcc -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Icsrc/include -Icsrc/core -Icuda \
      tests/cuda/sm90_selftest.cu -o /tmp/pf_sm90_selftest && /tmp/pf_sm90_selftest; } > "$LOG/selftest.log" 2>&1 || status=1
  rm -f /tmp/pf_sm90_selftest
  tail -3 "$LOG/selftest.log"
fi

if has test; then
  step test
  # the sm_80 kernels run where the wgmma kernels would take a call through the tests' kernel="sm80" cases.
  # The GPU cases run in TEST_SHARDS parallel pytest processes (default 4: the references are computed on
  # the host's cores while the GPU runs the kernels), each with its own log; tests.log gets their tails.
  SHARDS=("tests/ops/test_flash_bwd.py -k test_backward_dense" "tests/ops/test_flash_bwd.py -k 'not test_backward_dense'"
          "tests/ops/test_flash_fwd.py" "tests/ops/test_paged_attn.py tests/ops/test_dropout_mask.py tests/ops/test_merge_attn_states.py tests/ops/test_write_kv_cache.py tests/ops/test_copy_blocks.py tests/ops/test_swap_blocks.py tests/test_*.py")
  [[ ${TEST_SHARDS:-4} == 1 ]] && SHARDS=("tests")
  pids=()
  for i in "${!SHARDS[@]}"; do
    eval "timeout ${TEST_TIMEOUT:-3600} $PY -m pytest ${SHARDS[$i]} -m gpu -q --maxfail=25 -p no:cacheprovider -rs --durations=5 ${TEST_ARGS:-}" \
      > "$LOG/tests_$i.log" 2>&1 & pids+=($!)
  done
  for i in "${!pids[@]}"; do wait "${pids[$i]}" || status=1; done
  for i in "${!SHARDS[@]}"; do { echo "== shard $i: ${SHARDS[$i]}"; tail -4 "$LOG/tests_$i.log"; } | tee -a "$LOG/tests.log"; done
  grep -h "^FAILED\|^ERROR" "$LOG"/tests_*.log | head -40
  [[ ${GPU_ONLY:-0} == 1 ]] || $PY -m pytest tests -q -m "not gpu" -p no:cacheprovider -x >> "$LOG/tests.log" 2>&1 || status=1
  tail -3 "$LOG/tests.log"
fi

if has sanitize; then
  # 40 GPU tests (ids: tests/ops/test_<op>.py::test_<name>[cuda-<case>-<kernel>]): forward head dims 128
  # and 32 (bfloat16) and the padded 100, device cu_seqlens out of bounds, varlen and dropout, the
  # backward at d = 64, device block ids out of range, the cache ops, paged query lengths; kernel
  # "auto" (sm90 on Hopper) and "sm80"
  SEL=${SANITIZE_SELECTION:-"test_flash_fwd and test_head_dims and (bfloat16-d128- or bfloat16-d32- or d100-) and (auto or sm80)
    or bad_device_cu_seqlens
    or test_varlen_understated_max_seqlen_q[cuda-bfloat16 and (auto or sm80)
    or test_dropout[cuda-float16 and (auto or sm80)
    or test_backward_head_dims[cuda-bfloat16-d64-causal-kv2 and (auto or sm80)
    or test_bad_block_ids_in_device_tables
    or test_device_slots_out_of_range_are_skipped or test_write_combined_kv_cache[cuda
    or test_copy_blocks_layers[cuda-bfloat16 or test_copy_blocks_mixed_dtypes or test_copy_blocks_many_pairs
    or test_query_lengths[cuda-q17-
    or test_splits_agree[cuda-bfloat16-256]"}
  SEL=$(printf '%s' "$SEL" | tr -s ' \n' '  ')  # one line
  # the three tools run at once (SANITIZE_PARALLEL=0: one after another)
  pids=()
  for tool in memcheck racecheck initcheck; do
    step "sanitize $tool"
    extra=""
    [[ $tool == memcheck ]] && extra="--leak-check no"
    timeout ${SANITIZE_TIMEOUT:-900} compute-sanitizer --tool $tool $extra --error-exitcode 99 --print-limit 20 \
      $PY -m pytest tests/ops -m gpu -q -x -p no:cacheprovider -k "$SEL" \
      > "$LOG/sanitizer_$tool.log" 2>&1 &
    pids+=($!)
    [[ ${SANITIZE_PARALLEL:-1} == 1 ]] || wait "${pids[-1]}"
  done
  i=0
  for tool in memcheck racecheck initcheck; do
    wait "${pids[$i]}"; rc=$?; i=$((i + 1))
    echo "$tool exit $rc"; grep -E "ERROR SUMMARY|passed|failed" "$LOG/sanitizer_$tool.log" | tail -3
    [[ $rc == 0 ]] || status=1
  done
fi

if has bench; then
  step bench
  export PAGEDFLASH_COMMIT=${PAGEDFLASH_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
  $PY benchmarks/bench_attention.py --out "$LOG/bench.md" ${BENCH_ARGS:-} > "$LOG/bench.log" 2>&1 || status=1
  tail -40 "$LOG/bench.log"
  $PY benchmarks/bench_decode.py --out "$LOG/decode.md" ${DECODE_ARGS:-} > "$LOG/decode.log" 2>&1 || status=1
  tail -25 "$LOG/decode.log"
  # PNG plots beside the tables, where matplotlib is installed (also runnable later, anywhere)
  $PY -c "import matplotlib" 2>/dev/null && $PY benchmarks/plot_results.py "$LOG/bench.md" "$LOG/decode.md"
fi
exit $status
