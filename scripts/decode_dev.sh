#!/usr/bin/env bash
# decode_dev.sh <logdir> - quick paged-decode iteration on a GPU machine: build the head
# dims in PAGEDFLASH_HEADDIMS (default 64,128), run the paged GPU tests, then the decode
# benchmark with the variants in DECODE_ARGS (e.g. --pf-kernels 8x8,1x4,8x8+registers), then
# (with SANITIZE_K set) gpu_check.sh's compute-sanitizer stage over the tests it selects.
set -uo pipefail
LOG=${1:?usage: scripts/decode_dev.sh <logdir>}
mkdir -p "$LOG"
cd "$(dirname "$0")/.."
export PAGEDFLASH_CUDA=1 PAGEDFLASH_CUDA_ARCHS=${PAGEDFLASH_CUDA_ARCHS:-90} PAGEDFLASH_HEADDIMS=${PAGEDFLASH_HEADDIMS:-64,128}
export MAX_JOBS=${MAX_JOBS:-16} PYTHONPATH=$PWD/python PYTHONUNBUFFERED=1
python3 setup.py -q build_ext --inplace > "$LOG/build.log" 2>&1 || { tail -30 "$LOG/build.log"; exit 1; }
python3 -m pytest tests/ops/test_paged_attn.py -m gpu -q -p no:cacheprovider --maxfail=5 ${TEST_ARGS:-} > "$LOG/tests.log" 2>&1
tail -25 "$LOG/tests.log"
python3 benchmarks/bench_decode.py --out "$LOG/decode.md" ${DECODE_ARGS:-} > "$LOG/decode.log" 2>&1
grep -v "^|" "$LOG/decode.log" | tail -25
# SANITIZE_K: a pytest -k expression for gpu_check.sh's sanitizer stage (memcheck, racecheck, initcheck)
if [ -n "${SANITIZE_K:-}" ]; then
  STAGES=sanitize SANITIZE_SELECTION="$SANITIZE_K" bash scripts/gpu_check.sh "$LOG"
fi
