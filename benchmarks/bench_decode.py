#!/usr/bin/env python3
"""Decode benchmark: pagedflash.paged_attn on a paged KV cache (blocks scattered at random)
against torch SDPA's backends on the same K/V stored contiguously.

One query per sequence, causal (a decode step sees every token), bfloat16 by default.
For every (batch, context) point:
  1. build the contiguous K/V [batch, kv_heads, ctx, d] and scatter it into a paged cache
     [num_blocks, block_size, kv_heads, d] through a random block table;
  2. check pagedflash against SDPA (max |diff|);
  3. time each candidate: R input sets (R copies so that together they exceed the L2 cache:
     every call reads cold K/V) captured in one CUDA graph, replayed; time per call =
     replay time / R, median of several replays.
TB/s counts the K/V bytes a call must read (batch * ctx * kv_heads * d * 2 tensors * 2 bytes),
the same count for every candidate. A backend that rejects grouped-query attention
(enable_gqa) runs on K/V expanded to num_heads (it then reads num_heads/kv_heads times the
bytes: its TB/s is still computed on the unexpanded count), when that fits in memory.
A device-to-device copy is timed once for the bandwidth ceiling (bytes read + written).

  python benchmarks/bench_decode.py --out benchmarks/results/decode_h200.md
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import time
import subprocess
import sys
from unittest import mock

import torch
import torch.nn.attention
import torch.nn.functional as F

import pagedflash

BACKENDS = ["FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH"]
L2_ROTATE_BYTES = 512 << 20


def sdpa_backend(name):
    from torch.nn.attention import SDPBackend
    return getattr(SDPBackend, name)


def make_runner(fns):
    """A zero-arg callable replaying fns (one per input set) captured in one CUDA graph
    (eager launches if capture fails), and len(fns)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns[:2] * 2:
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = None
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for f in fns:
                f()
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - report and fall back
        print(f"  (graph capture failed: {type(e).__name__}: {str(e)[:80]}; timing eagerly)", file=sys.stderr)
        g = None
        torch.cuda.synchronize()
    return (g.replay if g is not None else (lambda: [f() for f in fns])), len(fns)


def time_runners(runners, rounds=7):
    """Median seconds per call of each (run, n) runner. The runners take turns: every round
    times each of them once (~2 ms of replays), so a clock or thermal drift during the
    measurement affects all candidates alike instead of whichever happened to run first."""
    # warm up for ~50 ms of GPU time, not one call: after the host-side setup of a point the GPU
    # has idled and its clocks ramp up over milliseconds (one warm call left the first candidate
    # timed up to 13% slow, e.g. batch 128 / 4k: 561 vs 497 us for the same kernel)
    warm_until = time.perf_counter() + 0.05
    while time.perf_counter() < warm_until:
        for run, _ in runners:
            run()
        torch.cuda.synchronize()
    st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    inners = []
    for run, _ in runners:
        st.record()
        run()
        en.record()
        en.synchronize()
        one = max(st.elapsed_time(en) * 1e-3, 1e-6)
        inners.append(max(1, min(50, int(2e-3 / one))))
    times = [[] for _ in runners]
    for _ in range(rounds):
        for k, (run, n) in enumerate(runners):
            st.record()
            for _ in range(inners[k]):
                run()
            en.record()
            en.synchronize()
            times[k].append(st.elapsed_time(en) * 1e-3 / (inners[k] * n))
    return [statistics.median(t) for t in times]


def time_graph(fns, reps=7):
    """Median seconds per call of fns (one per input set), replayed from a CUDA graph."""
    return time_runners([make_runner(fns)], rounds=reps)[0]


def bandwidth_ceilings():
    """(device-to-device copy TB/s counting read + write, read-only TB/s of a sum) on 4 GiB."""
    n = 4 << 30
    a = torch.empty(n // 2, dtype=torch.bfloat16, device="cuda")
    a.normal_()
    b = torch.empty_like(a)
    t_copy = time_graph([lambda: b.copy_(a)], reps=5)
    t_sum = time_graph([lambda: a.sum(dtype=torch.float32)], reps=5)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n / t_copy / 1e12, n / t_sum / 1e12


def make_point(batch, ctx, h, hk, d, bs, dtype, sets, gen, placement="random"):
    """Contiguous q/k/v and the paged cache holding the same K/V, for `sets` input sets;
    the blocks of the cache scattered at random, or in order (placement="sequential")."""
    blocks_per_seq = (ctx + bs - 1) // bs
    total_blocks = sets * batch * blocks_per_seq
    kc = torch.empty((total_blocks, bs, hk, d), dtype=dtype, device="cuda")
    vc = torch.empty_like(kc)
    if placement == "sequential":
        perm = torch.arange(total_blocks, device="cuda", dtype=torch.int32)
    else:
        perm = torch.randperm(total_blocks, device="cuda", generator=gen).to(torch.int32)
    data = []
    t = torch.arange(ctx, device="cuda")
    for r in range(sets):
        q = torch.randn((batch, h, d), dtype=dtype, device="cuda", generator=gen)
        k = torch.randn((batch, hk, ctx, d), dtype=dtype, device="cuda", generator=gen)
        v = torch.randn((batch, hk, ctx, d), dtype=dtype, device="cuda", generator=gen)
        bt = perm[r * batch * blocks_per_seq:(r + 1) * batch * blocks_per_seq].view(batch, blocks_per_seq)
        for b in range(batch):
            blk = bt[b, t // bs].long()
            kc[blk, t % bs] = k[b].transpose(0, 1)
            vc[blk, t % bs] = v[b].transpose(0, 1)
        sl = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        data.append(dict(q=q, k=k, v=v, bt=bt.contiguous(), sl=sl))
    return kc, vc, data


def bench_point(batch, ctx, args, gen, mem_budget):
    h, hk, d, bs = args.heads, args.kv_heads, args.dim, args.block_size
    dtype = getattr(torch, args.dtype)
    kv_bytes = batch * ctx * hk * d * 2 * dtype.itemsize
    sets = max(1, math.ceil(L2_ROTATE_BYTES / kv_bytes))
    kc, vc, data = make_point(batch, ctx, h, hk, d, bs, dtype, sets, gen, args.placement)
    row = dict(batch=batch, ctx=ctx, mb=kv_bytes / 2**20)

    outs = [torch.empty_like(x["q"]) for x in data]
    def pf_fn(r, ns=0, kernel="auto"):
        x = data[r]
        return lambda: pagedflash.paged_attn(x["q"], kc, vc, x["bt"], x["sl"], out=outs[r], num_splits=ns,
                                             kernel=kernel)

    # correctness against SDPA (math on float32 would be slow at scale: use flash/efficient)
    x = data[0]
    pagedflash.paged_attn(x["q"], kc, vc, x["bt"], x["sl"], out=outs[0])
    with torch.nn.attention.sdpa_kernel([sdpa_backend("FLASH_ATTENTION"), sdpa_backend("EFFICIENT_ATTENTION"),
                                         sdpa_backend("MATH")]):
        ref = F.scaled_dot_product_attention(x["q"][:, :, None], x["k"], x["v"], enable_gqa=True)[:, :, 0]
    row["maxdiff"] = float((outs[0].float() - ref.float()).abs().max())

    # pagedflash (and its variants) and the backends that take the K/V as they are (GQA through
    # enable_gqa) are timed together, in turns; backends that need expanded K/V afterwards
    cands = [("pf", None, 0, "auto")]
    cands += [(f"splits={ns}", None, ns, "auto") for ns in args.explore]
    cands += [(f"kernel={k}", None, 0, k) for k in args.pf_kernel]
    cands += [("+".join(f"{k}={v}" for k, v in env), env, 0, "auto") for env in args.pf_env]
    runners = []
    for _, env, ns, kernel in cands:
        with mock.patch.dict(os.environ, dict(env or [])):
            runners.append(make_runner([pf_fn(r, ns, kernel) for r in range(sets)]))
    direct = []
    for name in args.backends:
        if name in ("MATH", "EFFICIENT_ATTENTION"):
            continue
        try:
            with torch.nn.attention.sdpa_kernel([sdpa_backend(name)]):
                F.scaled_dot_product_attention(data[0]["q"][:, :, None], data[0]["k"], data[0]["v"], enable_gqa=True)
                torch.cuda.synchronize()
                fns = [(lambda xx=data[r]: F.scaled_dot_product_attention(xx["q"][:, :, None], xx["k"], xx["v"],
                                                                          enable_gqa=True)) for r in range(sets)]
                runners.append(make_runner(fns))
            direct.append(name)
        except RuntimeError:
            torch.cuda.synchronize()
    # the backend's kernel choice happens at capture time, so replays need no sdpa_kernel context
    times = time_runners(runners)
    row["pf"] = times[0]
    row["explore"] = {c[0]: t for c, t in zip(cands[1:], times[1:len(cands)])}
    for name, t in zip(direct, times[len(cands):]):
        row[name] = (t, "")

    for name in args.backends:
        if name in direct:
            continue
        res = None
        note = ""
        for expand in (False, True):
            if expand:
                if kv_bytes * (h // hk) * sets > mem_budget:
                    note = "GQA unsupported; expanded K/V too large"
                    break
                ek = [xx["k"].repeat_interleave(h // hk, dim=1) for xx in data]
                ev = [xx["v"].repeat_interleave(h // hk, dim=1) for xx in data]
            def fn(r, expand=expand):
                xx = data[r]
                if expand:
                    return lambda: F.scaled_dot_product_attention(xx["q"][:, :, None], ek[r], ev[r])
                return lambda: F.scaled_dot_product_attention(xx["q"][:, :, None], xx["k"], xx["v"], enable_gqa=True)
            if name == "MATH" and kv_bytes * (h // hk if expand else 1) > args.math_limit:
                note = "skipped (size)"
                break
            try:
                with torch.nn.attention.sdpa_kernel([sdpa_backend(name)]):
                    fn(0)()
                    torch.cuda.synchronize()
                    res = time_graph([fn(r) for r in range(sets)])
                note = "expanded K/V" if expand else ""
                break
            except RuntimeError as e:
                torch.cuda.synchronize()
                note = f"error: {str(e).splitlines()[0][:60]}"
                if not expand:
                    continue
            finally:
                if expand:
                    del ek, ev
        row[name] = (res, note)
    del kc, vc, data, outs
    torch.cuda.empty_cache()
    return row


def fmt_us(t):
    return "-" if t is None else f"{t * 1e6:.1f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="1,8,32,128")
    ap.add_argument("--ctx", default="1024,4096,16384,65536")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--placement", choices=["random", "sequential"], default="random",
                    help="cache blocks scattered at random (the default) or in order")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--explore", default="", help="also time these num_splits values, e.g. 1,2,4,8")
    ap.add_argument("--pf-kernel", default="",
                    help="also time pagedflash with these kernel hints, e.g. 8x8,1x4,8x8+registers,simple")
    ap.add_argument("--pf-env", action="append", default=[],
                    help="also time pagedflash with VAR set to each value, e.g. PAGEDFLASH_SM90=0,1, "
                         "or with several variables set at once, A=1+B=0 (repeatable; the graph is captured with "
                         "them set; the paged kernel choice is --pf-kernel's, not an environment variable's)")
    ap.add_argument("--math-limit", type=float, default=2 << 30, help="skip MATH above this many K/V bytes")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument("--commit", default=None, help="commit to record (default: git rev-parse HEAD)")
    args = ap.parse_args()
    args.backends = [b for b in args.backends.split(",") if b]
    args.explore = [int(x) for x in args.explore.split(",") if x]
    args.pf_kernel = [k for k in args.pf_kernel.split(",") if k]
    variants = []
    for e in args.pf_env:
        if "+" in e:
            variants.append([tuple(x.split("=", 1)) for x in e.split("+")])
        else:
            var, vals = e.split("=", 1)
            variants += [[(var, v)] for v in vals.split(",")]
    args.pf_env = variants
    gen = torch.Generator(device="cuda")
    gen.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    mem_budget = props.total_memory * 0.35
    bw, bw_read = bandwidth_ceilings()
    print(f"device {props.name}, {props.multi_processor_count} SMs; device-to-device copy {bw:.2f} TB/s "
          f"(read + write), read-only sum {bw_read:.2f} TB/s", flush=True)
    rows = []
    for batch in [int(x) for x in args.batch.split(",")]:
        for ctx in [int(x) for x in args.ctx.split(",")]:
            r = bench_point(batch, ctx, args, gen, mem_budget)
            rows.append(r)
            kv = r["mb"] * 2**20
            best = min((r[n][0] for n in args.backends if r[n][0] is not None), default=None)
            line = (f"b={batch:4d} ctx={ctx:6d} pf {fmt_us(r['pf']):>8} us {kv / r['pf'] / 1e12:5.2f} TB/s  "
                    + "  ".join(f"{n.split('_')[0][:5]} {fmt_us(r[n][0])}" for n in args.backends)
                    + (f"  ratio {best / r['pf']:.2f}x" if best else "") + f"  maxdiff {r['maxdiff']:.2e}")
            if r["explore"]:
                line += "  variants " + " ".join(f"{k}:{v * 1e6:.1f}" for k, v in r["explore"].items())
            print(line, flush=True)

    head = ["batch", "context", "K/V MB", "pagedflash us", "TB/s"] + [f"{n} us (TB/s)" for n in args.backends] + \
           ["best SDPA / pagedflash"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        kv = r["mb"] * 2**20
        cells = [str(r["batch"]), str(r["ctx"]), f"{r['mb']:.0f}", fmt_us(r["pf"]), f"{kv / r['pf'] / 1e12:.2f}"]
        best = None
        for n in args.backends:
            t, note = r[n]
            if t is None:
                cells.append(note or "-")
            else:
                cells.append(f"{fmt_us(t)} ({kv / t / 1e12:.2f})" + (f" {note}" if note else ""))
                best = t if best is None else min(best, t)
        cells.append(f"{best / r['pf']:.2f}x" if best else "-")
        lines.append("| " + " | ".join(cells) + " |")
    commit = args.commit or ""
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip()
        except OSError:
            commit = ""
    meta = (f"Device: {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
            f"date {datetime.date.today()}, commit {commit or 'unknown'}; {args.heads} query heads, "
            f"{args.kv_heads} KV heads, d={args.dim}, {args.dtype}, block size {args.block_size}, "
            f"{'blocks in order' if args.placement == 'sequential' else 'blocks scattered at random'}; device-to-device copy {bw:.2f} TB/s (read + write), read-only (torch.sum) {bw_read:.2f} TB/s. "
            f"Times: CUDA-graph replays, cold L2 (rotating input sets), median.")
    table = "\n".join(lines)
    print(meta)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# Decode benchmark\n\n{meta}\n\n{table}\n")


if __name__ == "__main__":
    main()
