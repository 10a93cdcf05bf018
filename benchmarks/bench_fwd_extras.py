#!/usr/bin/env python3
"""Forward with softcap / ALiBi / dropout: pagedflash's Hopper (sm_90) kernels against its
sm_80 kernels (kernel="sm90" / "sm80") in one process, to check which path these options should
take. bfloat16, 16k tokens per batch, hidden 2048 (d=64: 32 heads, d=128: 16 heads). SDPA has
no softcap or ALiBi fast path, so the plain call's FlashAttention-2 time (SDPA FLASH_ATTENTION)
is printed as a yardstick. Each variant's two outputs are compared (max |sm90 - sm80|) before
timing. TFLOP/s in FlashAttention's convention; never asserts on speed.

    python3 benchmarks/bench_fwd_extras.py [--seqlens 2048,8192] [--out FILE]
"""
from __future__ import annotations

import argparse
import datetime
import sys

import torch
import torch.nn.functional as F

import pagedflash
from bench_attention import TOKENS, cuda_time, emit, flops_fwd

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover - older torch
    SDPBackend = sdpa_kernel = None

VARIANTS = {
    "plain": {},
    "softcap": {"softcap": 30.0},
    "alibi": {"alibi": True},
    "dropout": {"dropout_p": 0.1, "seed": 7},
}


def run_variant(q, k, v, causal, opts, out, kernel):
    kw = dict(opts)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = torch.linspace(0.01, 0.5, q.shape[2], device="cuda", dtype=torch.float32)
    return lambda: pagedflash.flash_attn(q, k, v, causal=causal, out=out, kernel=kernel, **kw)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlens", default="2048,8192")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--commit", default="")
    ap.add_argument("--out")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    lines = ["| d | s | causal | variant | sm90 | sm80 | sm90/sm80 | fa2 (plain) | max diff |", "|" + "---|" * 9]
    for d, h in ((64, 32), (128, 16)):
        for s in (int(x) for x in args.seqlens.split(",")):
            for causal in (False, True):
                b = TOKENS // s
                g = torch.Generator(device="cuda").manual_seed(s + d)
                q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
                ff = flops_fwd(b, s, h, d, causal)
                fa2 = None
                if sdpa_kernel is not None:
                    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

                    def sdpa():
                        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

                    fa2 = ff / cuda_time(sdpa, args.warmup, args.iters) / 1e9
                for name, opts in VARIANTS.items():
                    o90, o80 = torch.empty_like(q), torch.empty_like(q)
                    f90 = run_variant(q, k, v, causal, opts, o90, "sm90")
                    f80 = run_variant(q, k, v, causal, opts, o80, "sm80")
                    f90()
                    f80()
                    diff = float((o90.float() - o80.float()).abs().max())
                    t90 = ff / cuda_time(f90, args.warmup, args.iters) / 1e9
                    t80 = ff / cuda_time(f80, args.warmup, args.iters) / 1e9
                    lines.append(f"| {d} | {s} | {causal} | {name} | {t90:.1f} | {t80:.1f} | {t90 / t80:.2f}x | "
                                 f"{fa2:.1f} | {diff:.1e} |" if fa2 else
                                 f"| {d} | {s} | {causal} | {name} | {t90:.1f} | {t80:.1f} | {t90 / t80:.2f}x | - | "
                                 f"{diff:.1e} |")
                    print(lines[-1], flush=True)
    head = (f"Forward variants, bfloat16, {TOKENS} tokens per batch, TFLOP/s; device: {torch.cuda.get_device_name()}; "
            f"date: {datetime.date.today().isoformat()}; commit: {args.commit or 'unknown'}; torch {torch.__version__}\n")
    emit(head + "\n" + "\n".join(lines) + "\n", args.out)

if __name__ == "__main__":
    main()
