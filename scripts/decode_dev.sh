#!/usr/bin/env bash
# decode_dev.sh <logdir> - quick paged-decode iteration on a GPU machine: build the head
# dims in PAGEDFLASH_HEADDIMS (default 64,128), run the paged GPU tests, then the decode
# benchmark with the variants in DECODE_ARGS (e.g. --pf-env PAGEDFLASH_PAGED_MODE=1,2), then
# (with SANITIZE_K set) compute-sanitizer memcheck and racecheck over those paged tests.
set -uo pipefail
LOG=${1:?usage: scripts/decode_dev.sh <logdir>}
mkdir -p "$LOG"
cd "$(dirname "$0")/.."
export PAGEDFLASH_CUDA=1 PAGEDFLASH_CUDA_ARCHS=${PAGEDFLASH_CUDA_ARCHS:-90} PAGEDFLASH_HEADDIMS=${PAGEDFLASH_HEADDIMS:-64,128}
export MAX_JOBS=${MAX_JOBS:-16} PYTHONPATH=$PWD/python PYTHONUNBUFFERED=1
python3 setup.py -q build_ext --inplace > "$LOG/build.log" 2>&1 || { tail -30 "$LOG/build.log"; exit 1; }
python3 -m pytest tests/test_gpu_paged.py -m gpu -q -p no:cacheprovider --maxfail=5 ${TEST_ARGS:-} > "$LOG/tests.log" 2>&1
tail -25 "$LOG/tests.log"
python3 benchmarks/bench_decode.py --out "$LOG/decode.md" ${DECODE_ARGS:-} > "$LOG/decode.log" 2>&1
grep -v "^|" "$LOG/decode.log" | tail -25
# SANITIZE_K: a pytest -k expression over tests/test_gpu_paged.py for memcheck and racecheck
if [ -n "${SANITIZE_K:-}" ]; then
  for tool in memcheck racecheck; do
    timeout ${SANITIZE_TIMEOUT:-240} compute-sanitizer --tool $tool --error-exitcode 99 --print-limit 10 \
      python3 -m pytest tests/test_gpu_paged.py -m gpu -q -p no:cacheprovider -k "$SANITIZE_K" > "$LOG/sanitizer_$tool.log" 2>&1
    echo "$tool exit $?"; grep -E "ERROR SUMMARY|passed|failed" "$LOG/sanitizer_$tool.log" | tail -3
  done
fi
