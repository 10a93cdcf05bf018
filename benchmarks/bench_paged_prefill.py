#!/usr/bin/env python3
"""Prefill over the paged cache: pagedflash.paged_attn with q_len = s against dense attention on
the same shapes, one process.

The prefill grid of bench_attention.py (bfloat16, hidden 2048: head dim 64 x 32 heads and
128 x 16 heads, 16k tokens per batch, seqlen 512..16k, causal and not). For each point and block
size, K and V are written into a paged cache whose blocks are scattered at random (a random
permutation of all blocks), the queries are every token of each sequence (chunked prefill of a
whole prompt: q_len = seq_len = s, dense layout [b, s, h, d]), and the columns are, in TFLOP/s
(FlashAttention's FLOP convention, as bench_attention.py):

    paged      pagedflash.paged_attn, kernel "auto" (the prefill path on Hopper)
    splitkv    paged_attn with kernel "8x8" (the split-KV tensor-core kernel that ran
               prefill before the prefill path; --no-splitkv skips it)
    dense      pagedflash.flash_attn on the contiguous K/V
    cudnn      SDPA CUDNN_ATTENTION on the contiguous K/V (the issue's yardstick)
    fa2        SDPA FLASH_ATTENTION
    paged/cudnn, paged/dense   the ratios

Before timing, paged_attn's output is checked against flash_attn's (max |diff|, err column).
Times: common.gpu_time (median of CUDA-event timings, L2 flushed before each call).

    python3 benchmarks/bench_paged_prefill.py --out benchmarks/results/paged_prefill_h100.md
    python3 benchmarks/bench_paged_prefill.py --quick --block-sizes 64
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import common
import pagedflash

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover - older torch
    SDPBackend = sdpa_kernel = None

TOKENS = 16384
SEQLENS = [512, 1024, 2048, 4096, 8192, 16384]
CONFIGS = [(64, 32), (128, 16)]
BLOCK_SIZES = [16, 64, 256]


def flops_fwd(b, s, h, d, causal):
    f = 4.0 * b * s * s * h * d
    return f / 2 if causal else f


def scatter_into_cache(x, bs, perm):
    """x [b, s, hk, d] -> a cache [num_blocks, bs, hk, d] holding sequence i's block j at
    perm[i * blocks_per_seq + j] (the rest of the last block zero)."""
    b, s, hk, d = x.shape
    per = (s + bs - 1) // bs
    padded = torch.zeros(b, per * bs, hk, d, device=x.device, dtype=x.dtype)
    padded[:, :s] = x
    cache = torch.empty(b * per, bs, hk, d, device=x.device, dtype=x.dtype)
    cache[perm] = padded.reshape(b * per, bs, hk, d)
    return cache


def bench_point(d, h, s, causal, bs, args):
    b = max(1, args.tokens // s)
    g = torch.Generator(device="cuda").manual_seed(s * 7 + d + bs)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    per = (s + bs - 1) // bs
    perm = torch.randperm(b * per, device="cuda", generator=g)
    kc, vc = scatter_into_cache(k, bs, perm), scatter_into_cache(v, bs, perm)
    tables = perm.reshape(b, per).to(torch.int32)
    lens = torch.full((b,), s, device="cuda", dtype=torch.int32)
    out = torch.empty_like(q)
    ff = flops_fwd(b, s, h, d, causal)
    row = {"d": d, "s": s, "b": b, "bs": bs, "causal": causal}
    timing = {"warmup": args.warmup, "iters": args.iters, "flush_l2_between": not args.no_l2_flush}

    dense = pagedflash.flash_attn(q, k, v, causal=causal)
    paged = pagedflash.paged_attn(q, kc, vc, tables, lens, causal=causal)
    row["err"] = float((paged.float() - dense.float()).abs().max())
    del dense, paged

    def rate(fn):
        return common.gpu_time(fn, **timing).rate(ff) / 1e12

    row["paged"] = rate(lambda: pagedflash.paged_attn(q, kc, vc, tables, lens, causal=causal, out=out))
    if not args.no_splitkv:
        row["splitkv"] = rate(
            lambda: pagedflash.paged_attn(q, kc, vc, tables, lens, causal=causal, out=out, kernel="8x8")
        )
    row["dense"] = rate(lambda: pagedflash.flash_attn(q, k, v, causal=causal, out=out))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    for name, be in (("cudnn", "CUDNN_ATTENTION"), ("fa2", "FLASH_ATTENTION")):

        def sdpa(be=be):
            with sdpa_kernel([getattr(SDPBackend, be)]):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

        try:
            row[name] = rate(sdpa)
        except RuntimeError as e:
            print(f"  {be} unavailable at d={d} s={s}: {str(e).splitlines()[0]}", file=sys.stderr)
    return row


def table(rows):
    cols = [
        "d",
        "s",
        "b",
        "bs",
        "causal",
        "paged",
        "splitkv",
        "dense",
        "cudnn",
        "fa2",
        "paged/cudnn",
        "paged/dense",
        "err",
    ]
    lines = []
    for r in rows:
        r = dict(r)
        r["paged/cudnn"] = r["paged"] / r["cudnn"] if r.get("cudnn") else None
        r["paged/dense"] = r["paged"] / r["dense"]
        lines.append(
            [
                f"{r[c]:.2f}x" if "/" in c and r.get(c) else f"{r[c]:.1e}" if c == "err" else common.fmt(r.get(c))
                for c in cols
            ]
        )
    return common.markdown_table(cols, lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write the markdown report here")
    ap.add_argument("--quick", action="store_true", help="only s = 1k and 8k")
    ap.add_argument("--seqlens", help="comma-separated seqlens (default 512..16384)")
    ap.add_argument("--dims", help="comma-separated head dims (64, 128)")
    ap.add_argument("--block-sizes", default=",".join(map(str, BLOCK_SIZES)))
    ap.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    ap.add_argument("--tokens", type=int, default=TOKENS)
    ap.add_argument("--no-splitkv", action="store_true", help="skip the split-KV kernel's column")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--no-l2-flush", action="store_true")
    common.add_common_args(ap)
    args = ap.parse_args(argv)
    common.require_cuda("bench_paged_prefill.py")
    if sdpa_kernel is None:
        sys.exit("needs torch.nn.attention.sdpa_kernel (torch >= 2.3)")
    seqlens = [int(x) for x in args.seqlens.split(",")] if args.seqlens else ([1024, 8192] if args.quick else SEQLENS)
    dims = [int(x) for x in args.dims.split(",")] if args.dims else [c[0] for c in CONFIGS]
    sizes = [int(x) for x in common.parse_list(args.block_sizes)]
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    prov = common.provenance_line("cuda", args.commit)
    print(prov, flush=True)
    rows = []
    for d, h in [(d, 2048 // d) for d in dims]:
        for causal in causals:
            for s in seqlens:
                for bs in sizes:
                    r = bench_point(d, h, s, causal, bs, args)
                    rows.append(r)
                    print(
                        ", ".join(f"{k}={common.fmt(v) if k != 'err' else f'{v:.1e}'}" for k, v in r.items()),
                        flush=True,
                    )
    head = (
        f"Prefill over the paged cache (paged_attn, q_len = s, blocks scattered at random), bfloat16, "
        f"{args.tokens} tokens per batch, TFLOP/s\n\n{prov}\n\n"
        f"Times: median of {args.iters} CUDA-event timings after {args.warmup} warm-ups"
        f"{'' if args.no_l2_flush else ', L2 flushed before each'}. paged = paged_attn (auto), splitkv = paged_attn "
        f"kernel '8x8', dense = flash_attn, cudnn / fa2 = SDPA CUDNN_ATTENTION / FLASH_ATTENTION on contiguous K/V; "
        f"err = max |paged - dense|\n"
    )
    common.write_report(head + "\n" + table(rows) + "\n", args.out)


if __name__ == "__main__":
    main()
