#!/usr/bin/env bash
# compare_builds.sh <logdir> [baseline-dir] - the speed of this tree against another commit, in one
# run on one GPU: builds both trees (in parallel, the head dims in PAGEDFLASH_HEADDIMS, default the
# grids' 64,128), then benchmarks/compare_builds.py times the prefill and decode grids with the
# builds taking turns round by round -> <logdir>/compare.md. The baseline is a plain copy of the
# other commit's files, e.g. `git archive cfed4da | tar -x -C .baseline` (ignored by git).
# ROUNDS (default 3), GRIDS (default prefill,decode), COMPARE_ARGS (e.g. --quick).
set -uo pipefail
LOG=${1:?usage: scripts/compare_builds.sh <logdir> [baseline-dir]}
BASE=${2:-.baseline}
mkdir -p "$LOG"
LOG=$(cd "$LOG" && pwd)
cd "$(dirname "$0")/.."
BASE=$(cd "$BASE" && pwd)
export PAGEDFLASH_CUDA=1 PAGEDFLASH_CUDA_ARCHS=${PAGEDFLASH_CUDA_ARCHS:-90} PAGEDFLASH_HEADDIMS=${PAGEDFLASH_HEADDIMS:-64,128}
export MAX_JOBS=${MAX_JOBS:-8} PYTHONUNBUFFERED=1
t0=$(date +%s)
( cd "$BASE" && python3 setup.py -q build_ext --inplace > "$LOG/build_base.log" 2>&1 ) & pb=$!
( python3 setup.py -q build_ext --inplace > "$LOG/build_new.log" 2>&1 ) & pn=$!
wait $pb || { echo "baseline build FAILED"; tail -20 "$LOG/build_base.log"; exit 1; }
wait $pn || { echo "build FAILED"; tail -20 "$LOG/build_new.log"; exit 1; }
echo "both builds: $(( $(date +%s) - t0 )) s"
python3 benchmarks/compare_builds.py --build "base=$BASE" --build "new=$PWD" --rounds "${ROUNDS:-3}" \
  --grid "${GRIDS:-prefill,decode}" --out "$LOG/compare.md" ${COMPARE_ARGS:-} 2> "$LOG/compare.err"
rc=$?
grep -E "Slowest|slower" "$LOG/compare.md" | head -20
exit $rc
