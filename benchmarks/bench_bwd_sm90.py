#!/usr/bin/env python3
"""Backward only: pagedflash's kernels side by side -- by default its sm_90a (wgmma) backward
(kernel="sm90") and its sm_80 (mma.sync) backward (kernel="sm80") -- and torch SDPA's
FLASH_ATTENTION (FlashAttention-2) and CUDNN_ATTENTION backends, in one process, on
bench_attention.py's grid (bf16, 16k tokens per batch, hidden 2048). TFLOP/s with
FlashAttention's convention (backward = 2.5x forward, halved when causal); times from
benchmarks/common.py gpu_time (CUDA events, L2 flushed, median). Also prints the max
difference of dq/dk/dv between the first two kernels, and between the first and SDPA's
FlashAttention-2, checked before timing. Never asserts on speed.

    python3 benchmarks/bench_bwd_sm90.py [--seqlens 1024,8192] [--dims 128] [--out file.md]
    python3 benchmarks/bench_bwd_sm90.py --kernels auto,sm90,sm80
"""

from __future__ import annotations

import argparse
import sys

import torch

import common
import pagedflash
from bench_attention import TOKENS, sdpa_backward_fn


def max_diff(xs, ys):
    return max(float((a.float() - b.float()).abs().max()) for a, b in zip(xs, ys))


def backward_fn(dout, q, k, v, out, lse, causal, grads, kernel):
    kw = common.kernel_kwargs(kernel)
    dq, dk, dv = grads
    return lambda: pagedflash.flash_attn_backward(dout, q, k, v, out, lse, causal=causal, dq=dq, dk=dk, dv=dv, **kw)


def point(d, h, s, causal, args):
    b = max(1, args.tokens // s)
    g = torch.Generator(device="cuda").manual_seed(s * 7 + d)
    q, k, v, dout = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    fb = 2.5 * 4.0 * b * s * s * h * d / (2 if causal else 1)
    timing = {"warmup": args.warmup, "iters": args.iters}
    out, lse = pagedflash.flash_attn(q, k, v, causal=causal, return_lse=True)
    row = {"d": d, "h": h, "s": s, "b": b, "causal": causal}
    first = {}  # the gradients of the first two kernels (for diff) and of the first (for err_fa2)
    grads = tuple(torch.empty_like(x) for x in (q, k, v))
    for kern in args.kernels:
        try:
            gr = pagedflash.flash_attn_backward(dout, q, k, v, out, lse, causal=causal, **common.kernel_kwargs(kern))
        except NotImplementedError as e:
            print(f"  kernel {kern} does not take d={d} s={s} causal={causal}: {e}", file=sys.stderr)
            continue
        if len(first) < 2:
            first[kern] = gr
        row[kern] = common.gpu_time(backward_fn(dout, q, k, v, out, lse, causal, grads, kern), **timing).rate(fb) / 1e12
    k0, k1 = args.kernels[0], args.kernels[1] if len(args.kernels) > 1 else None
    if k0 in first and k1 in first:
        row["diff"] = max_diff(first[k0], first[k1])
    for be, short in (("FLASH_ATTENTION", "fa2"), ("CUDNN_ATTENTION", "cudnn")):
        try:
            back, leaves = sdpa_backward_fn(be, q, k, v, dout, causal)
            back()
            if short == "fa2" and k0 in first:
                row["err_fa2"] = max_diff(first[k0], [x.grad for x in leaves])
            row[short] = common.gpu_time(back, **timing).rate(fb) / 1e12
            del leaves, back
        except RuntimeError as e:
            print(f"  {be}: {str(e).splitlines()[0]}", file=sys.stderr)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", default="512,1024,2048,4096,8192,16384")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    ap.add_argument("--tokens", type=int, default=TOKENS, help="tokens per batch: batch = tokens / seqlen, at least 1")
    ap.add_argument(
        "--kernels",
        default="sm90,sm80",
        help="pagedflash backward kernels (auto, sm80, sm90), one column each; the first is compared "
        "with the second (ratio, diff) and with FlashAttention-2",
    )
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--out")
    common.add_common_args(ap)
    args = ap.parse_args(argv)
    args.kernels = common.parse_list(args.kernels)
    if not args.kernels:
        ap.error("--kernels: at least one kernel")
    common.require_cuda("bench_bwd_sm90.py")
    common.check_kernels("flash", args.kernels)
    k0 = args.kernels[0]
    k1 = args.kernels[1] if len(args.kernels) > 1 else None
    ratios = [f"{k0}/fa2"] + ([f"{k0}/{k1}"] if k1 else [])
    cols = ["d", "h", "s", "b", "causal", *args.kernels, "fa2", "cudnn", *ratios, "diff", "err_fa2"]
    prov = common.provenance_line("cuda", args.commit)
    print(prov, flush=True)
    rows = []
    for d in [int(x) for x in args.dims.split(",")]:
        h = 2048 // d
        for causal in {"both": [False, True], "yes": [True], "no": [False]}[args.causal]:
            for s in [int(x) for x in args.seqlens.split(",")]:
                r = point(d, h, s, causal, args)
                r[f"{k0}/fa2"] = f"{r[k0] / r['fa2']:.2f}x" if r.get(k0) and r.get("fa2") else "-"
                if k1:
                    r[f"{k0}/{k1}"] = f"{r[k0] / r[k1]:.2f}x" if r.get(k0) and r.get(k1) else "-"
                vals = [
                    (f"{r[c]:.1e}" if c in r else "-")
                    if c in ("diff", "err_fa2")
                    else (f"{r[c]:.1f}" if isinstance(r.get(c), float) else str(r.get(c, "-")))
                    for c in cols
                ]
                rows.append(vals)
                print("| " + " | ".join(vals) + " |", flush=True)
    head = (
        f"Backward, bfloat16, {args.tokens} tokens per batch, TFLOP/s\n\n"
        f"{prov}\n\n"
        f"Times: median of {args.iters} CUDA-event timings after {args.warmup} warm-ups, L2 flushed before each "
        f"(benchmarks/common.py gpu_time). {', '.join(args.kernels)} = pagedflash's backward with that kernel= "
        f"(sm90: sm_90a wgmma, sm80: sm_80 mma.sync); fa2 / cudnn = SDPA FLASH_ATTENTION / CUDNN_ATTENTION backward; "
        f"diff = max |{k0} - {k1 or k0}| over dq, dk, dv; err_fa2 = max |{k0} - fa2|\n"
    )
    common.write_report(head + "\n" + common.markdown_table(cols, rows) + "\n", args.out)


if __name__ == "__main__":
    main()
