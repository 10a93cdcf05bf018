#!/usr/bin/env python3
"""Decode benchmark: pagedflash.paged_attn on a paged KV cache (blocks scattered at random)
against torch SDPA's backends on the same K/V stored contiguously.

One query per sequence, causal (a decode step sees every token), bfloat16 by default.
For every (batch, context) point:
  1. build the contiguous K/V [batch, kv_heads, ctx, d] and scatter it into a paged cache
     [num_blocks, block_size, kv_heads, d] through a random block table;
  2. check pagedflash (every kernel and split count timed) against SDPA (max |diff|);
  3. time each candidate (benchmarks/common.py): R input sets (R copies so that together they
     exceed the L2 cache: every call reads cold K/V) captured in one CUDA graph, replayed;
     time per call = replay time / R, median over rounds in which the candidates take turns.
TB/s counts the K/V bytes a call must read (batch * ctx * kv_heads * d * 2 tensors * 2 bytes),
the same count for every candidate. A backend that rejects grouped-query attention
(enable_gqa) runs on K/V expanded to num_heads (it then reads num_heads/kv_heads times the
bytes: its TB/s is still computed on the unexpanded count), when that fits in memory.
A device-to-device copy is timed once for the bandwidth ceiling (bytes read + written).

    python3 benchmarks/bench_decode.py --out benchmarks/results/decode_h200.md
    python3 benchmarks/bench_decode.py --pf-kernels auto,8x8,1x4 --batch 1,32 --ctx 16384
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.attention
import torch.nn.functional as F

import common
import pagedflash

BACKENDS = ["FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH"]


def sdpa_backend(name):
    from torch.nn.attention import SDPBackend

    return getattr(SDPBackend, name)


def bandwidth_ceilings(gib=4):
    """(device-to-device copy TB/s counting read + write, read-only TB/s of a sum) on `gib` GiB."""
    n = int(gib * (1 << 30))
    t_copy, t_sum = _ceiling_times(n)
    torch.cuda.empty_cache()
    return 2 * n / t_copy / 1e12, n / t_sum / 1e12


def _ceiling_times(n):
    a = torch.empty(n // 2, dtype=torch.bfloat16, device="cuda")
    a.normal_()
    b = torch.empty_like(a)
    t_copy = common.time_graph([lambda: b.copy_(a)], rounds=5).median
    t_sum = common.time_graph([lambda: a.sum(dtype=torch.float32)], rounds=5).median
    return t_copy, t_sum


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
        bt = perm[r * batch * blocks_per_seq : (r + 1) * batch * blocks_per_seq].view(batch, blocks_per_seq)
        for b in range(batch):
            blk = bt[b, t // bs].long()
            kc[blk, t % bs] = k[b].transpose(0, 1)
            vc[blk, t % bs] = v[b].transpose(0, 1)
        sl = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        data.append(dict(q=q, k=k, v=v, bt=bt.contiguous(), sl=sl))
    return kc, vc, data


def sdpa_call(x, ek=None, ev=None):
    """SDPA on one input set: on its K/V with enable_gqa, or on expanded K/V (ek, ev)."""
    if ek is not None:
        return lambda: F.scaled_dot_product_attention(x["q"][:, :, None], ek, ev)
    return lambda: F.scaled_dot_product_attention(x["q"][:, :, None], x["k"], x["v"], enable_gqa=True)


def pf_call(x, kc, vc, out, num_splits=0, kernel="auto"):
    kw = common.kernel_kwargs(kernel)
    if num_splits:
        kw["num_splits"] = num_splits
    return lambda: pagedflash.paged_attn(x["q"], kc, vc, x["bt"], x["sl"], out=out, **kw)


def bench_point(batch, ctx, args, gen, mem_budget):
    h, hk, d, bs = args.heads, args.kv_heads, args.dim, args.block_size
    dtype = getattr(torch, args.dtype)
    kv_bytes = batch * ctx * hk * d * 2 * dtype.itemsize
    sets = common.cold_l2_sets(kv_bytes, args.rotate_mib << 20)
    kc, vc, data = make_point(batch, ctx, h, hk, d, bs, dtype, sets, gen, args.placement)
    row = dict(batch=batch, ctx=ctx, mb=kv_bytes / 2**20, variants={}, diffs={})

    outs = [torch.empty_like(x["q"]) for x in data]
    # the candidates: pagedflash as is (no kernel= argument), then each --explore split count and
    # each --pf-kernels kernel
    cands = [("pf", 0, "auto")]
    cands += [(f"splits={ns}", ns, "auto") for ns in args.explore]
    cands += [(f"kernel={k}", 0, k) for k in args.pf_kernels if k != "auto"]

    # correctness against SDPA (math on float32 would be slow at scale: use flash/efficient)
    x = data[0]
    with torch.nn.attention.sdpa_kernel(
        [sdpa_backend("FLASH_ATTENTION"), sdpa_backend("EFFICIENT_ATTENTION"), sdpa_backend("MATH")]
    ):
        ref = sdpa_call(x)()[:, :, 0]
    runners, timed = [], []
    for name, ns, kern in cands:
        try:
            pf_call(x, kc, vc, outs[0], ns, kern)()
            row["diffs"][name] = float((outs[0].float() - ref.float()).abs().max())
            runners.append(common.capture([pf_call(data[r], kc, vc, outs[r], ns, kern) for r in range(sets)]))
            timed.append(name)
        except NotImplementedError as e:
            torch.cuda.synchronize()
            print(f"  {name} does not take b={batch} ctx={ctx}: {str(e).splitlines()[0][:100]}", file=sys.stderr)
    del ref
    if "pf" not in timed:
        sys.exit("pagedflash.paged_attn with the automatic kernel raised NotImplementedError")
    row["maxdiff"] = row["diffs"]["pf"]

    # the backends that take the K/V as they are (GQA through enable_gqa) are timed in turns with
    # pagedflash; backends that need expanded K/V afterwards
    direct = []
    for name in args.backends:
        if name in ("MATH", "EFFICIENT_ATTENTION"):
            continue
        try:
            with torch.nn.attention.sdpa_kernel([sdpa_backend(name)]):
                sdpa_call(data[0])()
                torch.cuda.synchronize()
                runners.append(common.capture([sdpa_call(data[r]) for r in range(sets)]))
            direct.append(name)
        except RuntimeError:
            torch.cuda.synchronize()
    # the backend's kernel choice happens at capture time, so replays need no sdpa_kernel context
    times = [t.median for t in common.time_in_turns(runners, rounds=args.rounds)]
    for name, t in zip(timed, times):
        if name == "pf":
            row["pf"] = t
        else:
            row["variants"][name] = t
    for name, t in zip(direct, times[len(timed) :]):
        row[name] = (t, "")

    for name in args.backends:
        if name in direct:
            continue
        res = None
        note = ""
        for expand in (False, True):
            if name == "MATH" and kv_bytes * (h // hk if expand else 1) > args.math_limit:
                note = "skipped (size)"
                break
            ek = ev = None
            if expand:
                if kv_bytes * (h // hk) * sets > mem_budget:
                    note = "GQA unsupported; expanded K/V too large"
                    break
                ek = [xx["k"].repeat_interleave(h // hk, dim=1) for xx in data]
                ev = [xx["v"].repeat_interleave(h // hk, dim=1) for xx in data]
            fns = [sdpa_call(data[r], ek[r], ev[r]) if expand else sdpa_call(data[r]) for r in range(sets)]
            try:
                with torch.nn.attention.sdpa_kernel([sdpa_backend(name)]):
                    fns[0]()
                    torch.cuda.synchronize()
                    res = common.time_graph(fns, rounds=args.rounds).median
                note = "expanded K/V" if expand else ""
                break
            except RuntimeError as e:
                torch.cuda.synchronize()
                note = f"error: {str(e).splitlines()[0][:60]}"
            finally:
                del fns, ek, ev
        row[name] = (res, note)
    del kc, vc, data, outs
    torch.cuda.empty_cache()
    return row


def fmt_us(t):
    return "-" if t is None else f"{t * 1e6:.1f}"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="1,8,32,128")
    ap.add_argument("--ctx", default="1024,4096,16384,65536")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument(
        "--placement",
        choices=["random", "sequential"],
        default="random",
        help="cache blocks scattered at random (the default) or in order",
    )
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--explore", default="", help="also time these num_splits values, e.g. 1,2,4,8")
    ap.add_argument(
        "--pf-kernels",
        default="",
        help="also time pagedflash with these kernel= values, e.g. auto,8x8,1x4 or 1x8+registers "
        "(simple, 1x4, 4x4, 8x8, 1x8, 2x8, 4x8, the shapes also +registers; auto is always timed): "
        "columns 'kernel=<name> us'",
    )
    ap.add_argument("--rounds", type=int, default=7, help="rounds of the candidates' turns (median over them)")
    ap.add_argument("--rotate-mib", type=int, default=512, help="input sets rotated per call exceed this many MiB")
    ap.add_argument("--ceiling-gib", type=float, default=4, help="GiB copied for the bandwidth ceiling (0: skip)")
    ap.add_argument("--math-limit", type=float, default=2 << 30, help="skip MATH above this many K/V bytes")
    ap.add_argument("--out", default=None, help="write the markdown report here")
    common.add_common_args(ap)
    args = ap.parse_args(argv)
    args.backends = common.parse_list(args.backends)
    unknown = [b for b in args.backends if b not in BACKENDS]
    if unknown:
        ap.error(f"--backends: unknown {unknown}; expected some of {BACKENDS}")
    args.explore = [int(x) for x in common.parse_list(args.explore)]
    args.pf_kernels = common.parse_list(args.pf_kernels)
    return args


def main(argv=None):
    args = parse_args(argv)
    common.require_cuda("bench_decode.py")
    common.check_kernels("paged", args.pf_kernels)
    gen = torch.Generator(device="cuda")
    gen.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    mem_budget = props.total_memory * 0.35
    prov = common.provenance_line("cuda", args.commit)
    print(prov, flush=True)
    bw = bw_read = None
    if args.ceiling_gib > 0:
        bw, bw_read = bandwidth_ceilings(args.ceiling_gib)
        print(
            f"device-to-device copy {bw:.2f} TB/s (read + write), read-only sum {bw_read:.2f} TB/s",
            flush=True,
        )
    rows = []
    for batch in [int(x) for x in args.batch.split(",")]:
        for ctx in [int(x) for x in args.ctx.split(",")]:
            r = bench_point(batch, ctx, args, gen, mem_budget)
            rows.append(r)
            kv = r["mb"] * 2**20
            best = min((r[n][0] for n in args.backends if r[n][0] is not None), default=None)
            line = (
                f"b={batch:4d} ctx={ctx:6d} pf {fmt_us(r['pf']):>8} us {kv / r['pf'] / 1e12:5.2f} TB/s  "
                + "  ".join(f"{n.split('_')[0][:5]} {fmt_us(r[n][0])}" for n in args.backends)
                + (f"  ratio {best / r['pf']:.2f}x" if best else "")
                + f"  maxdiff {r['maxdiff']:.2e}"
            )
            if r["variants"]:
                line += "  variants " + " ".join(
                    f"{k}:{v * 1e6:.1f} (diff {r['diffs'][k]:.1e})" for k, v in r["variants"].items()
                )
            print(line, flush=True)

    variants = [
        c
        for c in [f"splits={ns}" for ns in args.explore] + [f"kernel={k}" for k in args.pf_kernels]
        if any(c in r["variants"] for r in rows)
    ]
    head = (
        ["batch", "context", "K/V MB", "pagedflash us", "TB/s"]
        + [f"{n} us (TB/s)" for n in args.backends]
        + ["best SDPA / pagedflash"]
        + [f"{v} us" for v in variants]
    )
    lines = []
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
        cells += [fmt_us(r["variants"].get(v)) for v in variants]
        lines.append(cells)
    ceiling = (
        f"device-to-device copy {bw:.2f} TB/s (read + write), read-only (torch.sum) {bw_read:.2f} TB/s. "
        if bw is not None
        else ""
    )
    meta = (
        f"{props.name} ({props.multi_processor_count} SMs): {args.heads} query heads, {args.kv_heads} KV heads, "
        f"d={args.dim}, {args.dtype}, block size {args.block_size}, "
        f"{'blocks in order' if args.placement == 'sequential' else 'blocks scattered at random'}; {ceiling}"
        f"Times: CUDA-graph replays, cold L2 (input sets rotated over > {args.rotate_mib} MiB), median of "
        f"{args.rounds} rounds in which pagedflash and the SDPA backends that take GQA as is take turns "
        f"(benchmarks/common.py time_in_turns); maxdiff of pagedflash against SDPA checked before timing"
        + (f"; {', '.join(variants)}: pagedflash with that argument, timed in the same turns" if variants else "")
        + "."
    )
    table = common.markdown_table(head, lines)
    common.write_report(f"# Decode benchmark\n\n{prov}\n\n{meta}\n\n{table}\n", args.out)


if __name__ == "__main__":
    main()
