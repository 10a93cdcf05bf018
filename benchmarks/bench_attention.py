#!/usr/bin/env python3
"""Prefill attention benchmark: pagedflash against torch SDPA's backends, one process.

FlashAttention's grid: hidden 2048 (head dim 64 with 32 heads, 128 with 16 heads),
16k tokens per batch (batch = 16384 / seqlen), seqlen 512..16k, causal and not,
bfloat16. For each point: a correctness check of pagedflash against SDPA's
FLASH_ATTENTION backend (max abs difference of out, and of dq/dk/dv when the
backward exists), then forward and backward times (median of CUDA-event timings
after warm-up) for pagedflash and for SDPA restricted to each backend in turn
(FLASH_ATTENTION = FlashAttention-2, CUDNN_ATTENTION, EFFICIENT_ATTENTION).

FLOPs follow FlashAttention's convention: forward 4 * b * s^2 * h * d (halved when
causal), backward 2.5x the forward. Prints one table, writes markdown with --out.
Never asserts on speed.

    python3 benchmarks/bench_attention.py --out benchmarks/results/prefill_h200.md
    python3 benchmarks/bench_attention.py --quick          # a few points
    python3 benchmarks/bench_attention.py --compare-sm80   # + pagedflash's sm_80 kernels on Hopper
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F

import pagedflash

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover - older torch
    SDPBackend = sdpa_kernel = None

TOKENS = 16384
SEQLENS = [512, 1024, 2048, 4096, 8192, 16384]
CONFIGS = [(64, 32), (128, 16)]  # (head dim, heads): hidden 2048
BACKENDS = ["FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"]


def cuda_time(fn, warmup: int, iters: int) -> float:
    """Median milliseconds of fn() over `iters` event-timed runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def sdpa_backward_fn(backend, q, k, v, dout, causal):
    """(run, leaves): `run()` is SDPA's backward, restricted to `backend`, of one forward on copies
    of q, k, v (layout [b, s, h, d]); leaves are those copies, whose .grad run() sets."""
    qg, kg, vg = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    with sdpa_kernel([getattr(SDPBackend, backend)]):
        o = F.scaled_dot_product_attention(qg.transpose(1, 2), kg.transpose(1, 2), vg.transpose(1, 2),
                                           is_causal=causal)
    gt = dout.transpose(1, 2)

    def run():
        qg.grad = kg.grad = vg.grad = None
        o.backward(gt, retain_graph=True)

    return run, (qg, kg, vg)


def emit(text, out):
    """Print the report and, with `out`, write it there (creating the folder)."""
    print()
    print(text)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text)


def backward_fn():
    return pagedflash.flash_attn_backward


def flops_fwd(b, s, h, d, causal):
    f = 4.0 * b * s * s * h * d
    return f / 2 if causal else f


def sdpa_fn(backend, q, k, v, causal):
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

    def run():
        with sdpa_kernel([getattr(SDPBackend, backend)]):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

    return run


def bench_point(d, h, s, causal, args, out_rows):
    b = TOKENS // s
    dt = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(s * 7 + d)
    q, k, v, dout = (torch.randn(b, s, h, d, device="cuda", dtype=dt, generator=g) for _ in range(4))
    ff = flops_fwd(b, s, h, d, causal)
    fb = 2.5 * ff
    bwd = None if args.no_pf_bwd else backward_fn()
    row = {"d": d, "h": h, "s": s, "b": b, "causal": causal}

    # ---- correctness first (against SDPA's FlashAttention-2 backend) ----
    out, lse = pagedflash.flash_attn(q, k, v, causal=causal, return_lse=True)
    qr, kr, vr = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    ref = None
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            ref = F.scaled_dot_product_attention(qr.transpose(1, 2), kr.transpose(1, 2), vr.transpose(1, 2),
                                                 is_causal=causal).transpose(1, 2)
        row["err_out"] = float((out.float() - ref.float()).abs().max())
    except RuntimeError as e:
        row["err_out"] = float("nan")
        print(f"  (SDPA flash unavailable: {e})", file=sys.stderr)
    if bwd is not None and ref is not None:
        ref.backward(dout)
        dq, dk, dv = bwd(dout, q, k, v, out, lse, causal=causal)
        row["err_grad"] = max(float((a.float() - r.grad.float()).abs().max()) for a, r in
                              ((dq, qr), (dk, kr), (dv, vr)))
    del qr, kr, vr, ref

    # ---- timing ----
    ms = cuda_time(lambda: pagedflash.flash_attn(q, k, v, causal=causal, out=out), args.warmup, args.iters)
    row["pf_fwd"] = ff / ms / 1e9
    if bwd is not None:
        dq, dk, dv = (torch.empty_like(x) for x in (q, k, v))
        ms = cuda_time(lambda: bwd(dout, q, k, v, out, lse, causal=causal, dq=dq, dk=dk, dv=dv), args.warmup,
                       args.iters)
        row["pf_bwd"] = fb / ms / 1e9
    if args.compare_sm80:  # the same call on the sm_80 (mma.sync) kernels, for the Hopper kernels' gain
        ms = cuda_time(lambda: pagedflash.flash_attn(q, k, v, causal=causal, out=out, kernel="sm80"), args.warmup,
                       args.iters)
        row["pf80_fwd"] = ff / ms / 1e9
        if bwd is not None:
            ms = cuda_time(lambda: bwd(dout, q, k, v, out, lse, causal=causal, dq=dq, dk=dk, dv=dv, kernel="sm80"),
                           args.warmup, args.iters)
            row["pf80_bwd"] = fb / ms / 1e9
    for be in args.backends.split(","):
        short = {"FLASH_ATTENTION": "fa2", "CUDNN_ATTENTION": "cudnn", "EFFICIENT_ATTENTION": "eff"}[be]
        try:
            fn = sdpa_fn(be, q, k, v, causal)
            ms = cuda_time(fn, args.warmup, args.iters)
            row[f"{short}_fwd"] = ff / ms / 1e9
            if not args.no_bwd:
                back, _ = sdpa_backward_fn(be, q, k, v, dout, causal)
                ms = cuda_time(back, args.warmup, args.iters)
                row[f"{short}_bwd"] = fb / ms / 1e9
                del back
        except RuntimeError as e:
            print(f"  {be} unavailable at d={d} s={s}: {str(e).splitlines()[0]}", file=sys.stderr)
    out_rows.append(row)
    return row


def fmt(x, nd=1):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}" if x == x else "nan"
    return str(x)


def table(rows):
    pf_cols = ["pf_fwd"]
    pb_cols = ["pf_bwd"]
    extra_f = ["pf80_fwd"] if any("pf80_fwd" in r for r in rows) else []
    extra_b = ["pf80_bwd"] if any("pf80_bwd" in r for r in rows) else []
    cols = ["d", "h", "s", "b", "causal"] + pf_cols + extra_f + ["fa2_fwd", "cudnn_fwd", "eff_fwd", "fwd_vs_fa2"] + \
        pb_cols + extra_b + ["fa2_bwd", "cudnn_bwd", "eff_bwd", "bwd_vs_fa2", "err_out", "err_grad"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        best_pf = max((r.get(c, 0.0) or 0.0) for c in pf_cols)
        r = dict(r)
        r["fwd_vs_fa2"] = best_pf / r["fa2_fwd"] if r.get("fa2_fwd") else None
        best_pb = max((r.get(c, 0.0) or 0.0) for c in pb_cols)
        r["bwd_vs_fa2"] = best_pb / r["fa2_bwd"] if best_pb and r.get("fa2_bwd") else None
        vals = []
        for c in cols:
            x = r.get(c)
            if c in ("fwd_vs_fa2", "bwd_vs_fa2"):
                vals.append(f"{x:.2f}x" if x else "-")
            elif c.startswith("err"):
                vals.append(f"{x:.1e}" if isinstance(x, float) else "-")
            else:
                vals.append(fmt(x))
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description="pagedflash vs torch SDPA, prefill (TFLOP/s)")
    ap.add_argument("--out", help="write the markdown table here")
    ap.add_argument("--quick", action="store_true", help="only s = 1k and 8k")
    ap.add_argument("--seqlens", help="comma-separated seqlens (default 512..16384)")
    ap.add_argument("--dims", help="comma-separated head dims (64, 128)")
    ap.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    ap.add_argument("--backends", default=",".join(BACKENDS), help="SDPA backends to time")
    ap.add_argument("--no-bwd", action="store_true", help="skip SDPA backward timings")
    ap.add_argument("--compare-sm80", action="store_true",
                    help="also time pagedflash's sm_80 kernels (kernel='sm80'): columns pf80_*")
    ap.add_argument("--no-pf-bwd", action="store_true", help="skip pagedflash's backward")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--commit", default=os.environ.get("PAGEDFLASH_COMMIT", ""))
    args = ap.parse_args()
    if not torch.cuda.is_available() or sdpa_kernel is None:
        sys.exit("needs torch with CUDA and torch.nn.attention.sdpa_kernel")
    seqlens = [int(x) for x in args.seqlens.split(",")] if args.seqlens else ([1024, 8192] if args.quick else SEQLENS)
    dims = [int(x) for x in args.dims.split(",")] if args.dims else [c[0] for c in CONFIGS]
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    rows = []
    for d, h in CONFIGS:
        if d not in dims:
            continue
        for causal in causals:
            for s in seqlens:
                r = bench_point(d, h, s, causal, args, rows)
                print(f"d={d} s={s} causal={causal}: " + ", ".join(
                    f"{k}={fmt(v)}" for k, v in r.items() if k not in ("d", "h", "s", "b", "causal")), flush=True)
    dev = torch.cuda.get_device_name()
    commit = args.commit
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        except OSError:
            commit = ""
    head = (f"Prefill attention, bfloat16, {TOKENS} tokens per batch, TFLOP/s (FlashAttention FLOP convention)\n\n"
            f"device: {dev}; date: {datetime.date.today().isoformat()}; commit: {commit or 'unknown'}; "
            f"torch {torch.__version__}; median of {args.iters} CUDA-event timings after {args.warmup} warm-ups\n\n"
            f"fa2 = SDPA FLASH_ATTENTION (FlashAttention-2), cudnn = SDPA CUDNN_ATTENTION, "
            f"eff = SDPA EFFICIENT_ATTENTION; pf80 = pagedflash on its sm_80 kernels (kernel='sm80'); "
            f"err_* = max |pagedflash - SDPA flash|\n")
    emit(head + "\n" + table(rows) + "\n", args.out)


if __name__ == "__main__":
    main()
