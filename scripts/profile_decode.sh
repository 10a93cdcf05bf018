#!/usr/bin/env bash
# profile_decode.sh <logdir> - Nsight Compute on the paged decode kernels: build (PAGEDFLASH_HEADDIMS,
# default 128), then for each PAGEDFLASH_PAGED_BALANCE value in $MODES profile one pagedflash call per
# point in $POINTS (and cuDNN's, with SDPA=1) with the sections in $SECTIONS; a text report per mode.
set -uo pipefail
LOG=${1:?usage: scripts/profile_decode.sh <logdir>}
mkdir -p "$LOG"
cd "$(dirname "$0")/.."
export PAGEDFLASH_CUDA=1 PAGEDFLASH_CUDA_ARCHS=${PAGEDFLASH_CUDA_ARCHS:-90} PAGEDFLASH_HEADDIMS=${PAGEDFLASH_HEADDIMS:-128}
export MAX_JOBS=${MAX_JOBS:-16} PYTHONPATH=$PWD/python
[[ ${SKIP_BUILD:-0} == 1 ]] || python3 setup.py -q build_ext --inplace > "$LOG/build.log" 2>&1 || { tail -30 "$LOG/build.log"; exit 1; }
POINTS=${POINTS:-"32x65536 128x1024"}
SECTIONS=${SECTIONS:-"--section LaunchStats --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis --section SpeedOfLight"}
INC=""
for p in $POINTS; do INC="$INC --nvtx-include pf_b${p%x*}_c${p#*x}/"; [[ ${SDPA:-0} == 1 ]] && INC="$INC --nvtx-include sdpa_b${p%x*}_c${p#*x}/"; done
for m in ${MODES:-0 1}; do
  PAGEDFLASH_PAGED_BALANCE=$m ncu --nvtx $INC --clock-control none $SECTIONS \
    python3 benchmarks/profile_decode.py --points $POINTS > "$LOG/ncu_balance$m.txt" 2> "$LOG/ncu_balance$m.err"
  echo "== PAGEDFLASH_PAGED_BALANCE=$m"
  grep -E "pf_paged|cudnn|Duration|DRAM Throughput|Executed Ipc A|Issue Slots Busy|No Eligible|Warp Cycles Per Issued|Stall|Registers Per|Grid Size|Block Size|Memory Throughput|Eligible Warps" "$LOG/ncu_balance$m.txt" | head -80
done
