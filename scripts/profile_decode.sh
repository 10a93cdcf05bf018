#!/usr/bin/env bash
# profile_decode.sh <logdir> - Nsight Compute on the paged decode kernels: build (PAGEDFLASH_HEADDIMS,
# default 128), then, once per kernel in $KERNELS (paged_attn's kernel= values, e.g. "auto 8x8 1x4
# 1x8+registers"; default: auto), profile one pagedflash call per point in $POINTS (and cuDNN's, with
# SDPA=1) with $SECTIONS or $METRICS; a text report per kernel.
set -uo pipefail
LOG=${1:?usage: scripts/profile_decode.sh <logdir>}
mkdir -p "$LOG"
cd "$(dirname "$0")/.."
export PAGEDFLASH_CUDA=1 PAGEDFLASH_CUDA_ARCHS=${PAGEDFLASH_CUDA_ARCHS:-90} PAGEDFLASH_HEADDIMS=${PAGEDFLASH_HEADDIMS:-128}
export MAX_JOBS=${MAX_JOBS:-16} PYTHONPATH=$PWD/python
[[ ${SKIP_BUILD:-0} == 1 ]] || python3 setup.py -q build_ext --inplace > "$LOG/build.log" 2>&1 || { tail -30 "$LOG/build.log"; exit 1; }
POINTS=${POINTS:-"32x65536 128x1024"}
S=smsp__average_warps_issue_stalled
STALLS=$(for r in long_scoreboard short_scoreboard wait math_pipe_throttle mio_throttle lg_throttle barrier selected; do
  printf "%s_%s_per_issue_active.ratio," $S $r; done)
WHAT=${METRICS:+--metrics $METRICS}
WHAT=${WHAT:-${SECTIONS:-"--section SpeedOfLight --section MemoryWorkloadAnalysis --section SchedulerStats --metrics ${STALLS}smsp__inst_executed.sum,lts__t_requests_srcunit_tex_op_read.sum,lts__t_sectors_srcunit_tex_op_read.sum"}}
INC=""
for p in $POINTS; do INC="$INC --nvtx-include pf_b${p%x*}_c${p#*x}/"; [[ ${SDPA:-0} == 1 ]] && INC="$INC --nvtx-include sdpa_b${p%x*}_c${p#*x}/"; done
for k in ${KERNELS:-auto}; do
  name=${k//[^A-Za-z0-9_.-]/_}
  ncu --nvtx $INC --clock-control none $WHAT python3 benchmarks/profile_decode.py --points $POINTS --kernel "$k" \
    > "$LOG/ncu_$name.txt" 2> "$LOG/ncu_$name.err"
  echo "== kernel $k"
  grep -E "pf_paged|cudnn_gen|Duration|DRAM Throughput|L2 Cache Throughput|No Eligible|Warp Cycles Per Issued|stalled|inst_executed|lts__t_|max \|pagedflash" "$LOG/ncu_$name.txt" | head -60
done
