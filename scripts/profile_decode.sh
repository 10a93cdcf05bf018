set -x
export PAGEDFLASH_CUDA=1 PAGEDFLASH_CUDA_ARCHS=90 PAGEDFLASH_HEADDIMS=128 MAX_JOBS=16 PYTHONPATH=$PWD/python
python3 setup.py -q build_ext --inplace > $OUT/build.log 2>&1 || { tail -30 $OUT/build.log; exit 1; }
M=gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__cycles_active.min,sm__cycles_active.max,sm__cycles_active.avg,launch__grid_size,launch__block_size,launch__registers_per_thread,launch__occupancy_limit_registers,launch__shared_mem_per_block_dynamic,launch__shared_mem_per_block_static,sm__warps_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum,l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum,lts__t_sectors_srcunit_tex_op_read.sum,sm__cycles_elapsed.max
INC=""; for p in 1x65536 8x16384 32x4096 32x65536 128x1024; do b=${p%x*}; c=${p#*x}; INC="$INC --nvtx-include pf_b${b}_c${c}/ --nvtx-include sdpa_b${b}_c${c}/"; done
ncu --nvtx $INC --clock-control none --metrics $M --csv python3 benchmarks/profile_decode.py > $OUT/ncu.csv 2> $OUT/ncu.err
tail -5 $OUT/ncu.err
python3 - <<'PY'
import csv, os, collections
rows = list(csv.reader(open(os.environ["OUT"] + "/ncu.csv")))
hdr = None
d = collections.OrderedDict()
for r in rows:
    if r and r[0] == "ID": hdr = r; continue
    if hdr is None or len(r) != len(hdr): continue
    x = dict(zip(hdr, r))
    key = (x["ID"], x["Kernel Name"][:60])
    d.setdefault(key, {})[x["Metric Name"]] = x["Metric Value"] + " " + x["Metric Unit"]
for k, v in d.items():
    print(k)
    for m, val in sorted(v.items()): print("   ", m, val)
PY
