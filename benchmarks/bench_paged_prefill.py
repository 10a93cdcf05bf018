#!/usr/bin/env python3
"""Prefill over the paged cache: pagedflash.paged_attn with q_len = s against dense attention on
the same shapes, one process.

The prefill grid of bench_attention.py (bfloat16, hidden 2048: head dim 64 x 32 heads and
128 x 16 heads, 16k tokens per batch, seqlen 512..16k, causal and not). For each point and block
size, K and V are written into a paged cache whose blocks are scattered at random (a random
permutation of all blocks), the queries are every token of each sequence (chunked prefill of a
whole prompt: q_len = seq_len = s, dense layout [b, s, h, d]), and the columns are, in TFLOP/s
(FlashAttention's FLOP convention, as bench_attention.py):

    paged      pagedflash.paged_attn, kernel "sm90" (the prefill path)
    auto       pagedflash.paged_attn, kernel "auto" (the library's choice)
    splitkv    paged_attn on the split-KV tensor-core kernel that ran prefill before the
               prefill path: the best of its CTA shapes 8x8, 4x4, 1x4 (--no-splitkv skips it)
    dense      pagedflash.flash_attn on the contiguous K/V
    cudnn      SDPA CUDNN_ATTENTION on the contiguous K/V (the issue's yardstick)
    fa2        SDPA FLASH_ATTENTION
    paged/cudnn, paged/dense   the ratios

Before timing, paged_attn's output is checked against flash_attn's (max |diff|, err column).
Times: common.gpu_time (median of CUDA-event timings, L2 flushed before each call).

    python3 benchmarks/bench_paged_prefill.py --out benchmarks/results/paged_prefill_h100.md
    python3 benchmarks/bench_paged_prefill.py --quick --block-sizes 64
    python3 benchmarks/bench_paged_prefill.py --seqlens 4096 --q-lens 16,32,64,128 --group 4 --causal yes
        # chunks of a 4k prompt with GQA 4: where "auto" should switch kernels

With --q-lens (queries = the last q_len tokens of each sequence) or --group > 1 the SDPA columns
are left out (SDPA's causal mask is top-left, and it wants K/V per query head).
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
DIMS = [64, 128]  # hidden 2048: 32 and 16 heads
BLOCK_SIZES = [16, 64, 256]
SPLITKV_SHAPES = ("8x8", "4x4", "1x4")


def flops_fwd(b, n, s, h, d, causal):
    """n queries (the last of s tokens) per sequence: FlashAttention's convention at n = s (causal
    halves it), else the visible (query, key) pairs exactly."""
    if n == s or not causal:
        f = 4.0 * b * n * s * h * d
        return f / 2 if causal else f
    return 4.0 * b * h * d * (n * s - n * (n - 1) / 2)


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


def bench_point(d, s, n, causal, bs, args):
    h = 2048 // d
    b, hk = max(1, args.tokens // s), h // args.group
    g = torch.Generator(device="cuda").manual_seed(s * 7 + d + bs + n)
    q = torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(b, s, hk, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    per = (s + bs - 1) // bs
    perm = torch.randperm(b * per, device="cuda", generator=g)
    kc, vc = scatter_into_cache(k, bs, perm), scatter_into_cache(v, bs, perm)
    tables = perm.reshape(b, per).to(torch.int32)
    lens = torch.full((b,), s, device="cuda", dtype=torch.int32)
    out = torch.empty_like(q)
    ff = flops_fwd(b, n, s, h, d, causal)
    row = {"d": d, "s": s, "q_len": n, "b": b, "bs": bs, "causal": causal}
    timing = {"warmup": args.warmup, "iters": args.iters, "flush_l2_between": not args.no_l2_flush}

    def paged(kernel="auto"):
        kw = common.kernel_kwargs(kernel)
        return lambda: pagedflash.paged_attn(q, kc, vc, tables, lens, causal=causal, out=out, **kw)

    def rate(fn):
        return common.gpu_time(fn, **timing).rate(ff) / 1e12

    dense = pagedflash.flash_attn(q, k, v, causal=causal)
    row["err"] = float(
        (pagedflash.paged_attn(q, kc, vc, tables, lens, causal=causal).float() - dense.float()).abs().max()
    )
    del dense
    row["paged"] = rate(paged("sm90"))
    row["auto"] = rate(paged())
    if not args.no_splitkv:
        row["splitkv"] = max(rate(paged(kern)) for kern in SPLITKV_SHAPES)
    row["dense"] = rate(lambda: pagedflash.flash_attn(q, k, v, causal=causal, out=out))
    if n < s or hk < h:
        return row
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


RATIOS = {"paged/cudnn": "cudnn", "paged/dense": "dense", "paged/splitkv": "splitkv"}


def table(rows):
    cols = ["d", "s", "q_len", "b", "bs", "causal", "paged", "auto", "splitkv", "dense", "cudnn", "fa2", *RATIOS, "err"]
    lines = []
    for r in rows:
        cells = []
        for c in cols:
            if c in RATIOS:
                base = r.get(RATIOS[c])
                cells.append(f"{r['paged'] / base:.2f}x" if base else "-")
            elif c == "err":
                cells.append(f"{r[c]:.1e}")
            else:
                cells.append(common.fmt(r.get(c)))
        lines.append(cells)
    return common.markdown_table(cols, lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write the markdown report here")
    ap.add_argument("--quick", action="store_true", help="only s = 1k and 8k")
    ap.add_argument("--seqlens", help="comma-separated seqlens (default 512..16384)")
    ap.add_argument("--dims", help="comma-separated head dims (64, 128)")
    ap.add_argument("--block-sizes", default=",".join(map(str, BLOCK_SIZES)))
    ap.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    ap.add_argument("--tokens", type=int, default=TOKENS, help="tokens per batch: batch = tokens / seqlen")
    ap.add_argument("--q-lens", help="comma-separated queries per sequence (default: q_len = s); > s skipped")
    ap.add_argument("--group", type=int, default=1, help="query heads per KV head (GQA)")
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
    dims = [int(x) for x in common.parse_list(args.dims)] if args.dims else DIMS
    sizes = [int(x) for x in common.parse_list(args.block_sizes)]
    qlens = [int(x) for x in common.parse_list(args.q_lens)] if args.q_lens else None
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    prov = common.provenance_line("cuda", args.commit)
    print(prov, flush=True)
    rows = []
    for d in dims:
        for causal in causals:
            for s in seqlens:
                for bs in sizes:
                    for n in [x for x in qlens if x <= s] if qlens else [s]:
                        r = bench_point(d, s, n, causal, bs, args)
                        rows.append(r)
                        print(", ".join(f"{k}={common.fmt(v)}" for k, v in r.items()), flush=True)
    head = (
        f"Prefill over the paged cache (paged_attn, blocks scattered at random), bfloat16, {args.tokens} tokens "
        f"per batch, hidden 2048, query heads per KV head {args.group}, TFLOP/s\n\n{prov}\n\n"
        f"Times: median of {args.iters} CUDA-event timings after {args.warmup} warm-ups"
        f"{'' if args.no_l2_flush else ', L2 flushed before each'}. paged = paged_attn kernel 'sm90' (the "
        f"prefill path); auto = paged_attn (auto); splitkv = paged_attn on the split-KV kernel, best of "
        f"{', '.join(SPLITKV_SHAPES)}; dense = flash_attn; cudnn / fa2 = SDPA "
        f"CUDNN_ATTENTION / FLASH_ATTENTION on contiguous K/V (q_len = s, no GQA only); err = max |paged - dense|\n"
    )
    common.write_report(head + "\n" + table(rows) + "\n", args.out)


if __name__ == "__main__":
    main()
