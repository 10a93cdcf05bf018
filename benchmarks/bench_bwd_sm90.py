#!/usr/bin/env python3
"""Backward only: pagedflash's sm_90a kernel vs its sm_80 kernel (kernel="sm90" / "sm80") vs
torch SDPA's FLASH_ATTENTION (FlashAttention-2) and CUDNN_ATTENTION backends, in one
process, on bench_attention.py's grid (bf16, 16k tokens per batch, hidden 2048). TFLOP/s with
FlashAttention's convention (backward = 2.5x forward, halved when causal). Also prints the
max |sm90 - sm80| of dq/dk/dv. Never asserts on speed.

    python3 benchmarks/bench_bwd_sm90.py [--seqlens 1024,8192] [--dims 128] [--out file.md]
"""
from __future__ import annotations

import argparse
import datetime

import torch

import pagedflash
from bench_attention import TOKENS, cuda_time, emit, sdpa_backward_fn

def point(d, h, s, causal, args):
    b = TOKENS // s
    g = torch.Generator(device="cuda").manual_seed(s * 7 + d)
    q, k, v, dout = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    fb = 2.5 * 4.0 * b * s * s * h * d / (2 if causal else 1)
    out, lse = pagedflash.flash_attn(q, k, v, causal=causal, return_lse=True)
    bwd = pagedflash.flash_attn_backward
    row = {"d": d, "h": h, "s": s, "b": b, "causal": causal}
    grads = {}
    for name in ("sm90", "sm80"):
        grads[name] = bwd(dout, q, k, v, out, lse, causal=causal, kernel=name)
        dq, dk, dv = (torch.empty_like(x) for x in (q, k, v))
        ms = cuda_time(lambda: bwd(dout, q, k, v, out, lse, causal=causal, dq=dq, dk=dk, dv=dv, kernel=name),
                       args.warmup, args.iters)
        row[name] = fb / ms / 1e9
    row["diff"] = max(float((a.float() - c.float()).abs().max()) for a, c in zip(grads["sm90"], grads["sm80"]))
    for be, short in (("FLASH_ATTENTION", "fa2"), ("CUDNN_ATTENTION", "cudnn")):
        try:
            back, (qg, kg, vg) = sdpa_backward_fn(be, q, k, v, dout, causal)
            row[short] = fb / cuda_time(back, args.warmup, args.iters) / 1e9
            if short == "fa2":
                row["err_fa2"] = max(float((a.float() - r.grad.float()).abs().max())
                                     for a, r in zip(grads["sm90"], (qg, kg, vg)))
            del qg, kg, vg, back
        except RuntimeError as e:
            print(f"  {be}: {str(e).splitlines()[0]}")
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlens", default="512,1024,2048,4096,8192,16384")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--out")
    args = ap.parse_args()
    cols = ["d", "h", "s", "b", "causal", "sm90", "sm80", "fa2", "cudnn", "sm90/fa2", "sm90/sm80", "diff", "err_fa2"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for d in [int(x) for x in args.dims.split(",")]:
        h = 2048 // d
        for causal in {"both": [False, True], "yes": [True], "no": [False]}[args.causal]:
            for s in [int(x) for x in args.seqlens.split(",")]:
                r = point(d, h, s, causal, args)
                r["sm90/fa2"] = f"{r['sm90'] / r['fa2']:.2f}x" if r.get("fa2") else "-"
                r["sm90/sm80"] = f"{r['sm90'] / r['sm80']:.2f}x"
                vals = [f"{r[c]:.1f}" if isinstance(r.get(c), float) and c not in ("diff", "err_fa2") else
                        (f"{r[c]:.1e}" if c in ("diff", "err_fa2") and c in r else str(r.get(c, "-"))) for c in cols]
                lines.append("| " + " | ".join(vals) + " |")
                print(lines[-1], flush=True)
    head = (f"Backward, bfloat16, {TOKENS} tokens per batch, TFLOP/s; device: {torch.cuda.get_device_name()}; "
            f"date: {datetime.date.today().isoformat()}; torch {torch.__version__}; median of {args.iters} "
            f"CUDA-event timings after {args.warmup} warm-ups\n\nsm90 / sm80 = pagedflash's sm_90a / sm_80 backward "
            f"(kernel='sm90' / 'sm80'); fa2 / cudnn = SDPA FLASH_ATTENTION / CUDNN_ATTENTION backward; diff = max |sm90 - "
            f"sm80| over dq, dk, dv; err_fa2 = max |sm90 - fa2|\n")
    emit(head + "\n" + "\n".join(lines) + "\n", args.out)

if __name__ == "__main__":
    main()
