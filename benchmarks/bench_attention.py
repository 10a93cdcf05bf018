#!/usr/bin/env python3
"""Prefill attention benchmark: pagedflash against torch SDPA's backends, one process.

FlashAttention's grid: hidden 2048 (head dim 64 with 32 heads, 128 with 16 heads),
16k tokens per batch (batch = 16384 / seqlen), seqlen 512..16k, causal and not,
bfloat16. For each point: a correctness check of pagedflash against SDPA's
FLASH_ATTENTION backend (max abs difference of out, and of dq/dk/dv when the
backward runs), then forward and backward times (benchmarks/common.py gpu_time:
median of CUDA-event timings after warm-up, L2 flushed before each call) for
pagedflash -- each kernel of --kernels -- and for SDPA restricted to each backend
in turn (FLASH_ATTENTION = FlashAttention-2, CUDNN_ATTENTION, EFFICIENT_ATTENTION).

FLOPs follow FlashAttention's convention: forward 4 * b * s^2 * h * d (halved when
causal), backward 2.5x the forward. Prints one table, writes markdown with --out.
Never asserts on speed.

    python3 benchmarks/bench_attention.py --out benchmarks/results/prefill_h200.md
    python3 benchmarks/bench_attention.py --quick                  # s = 1k and 8k
    python3 benchmarks/bench_attention.py --kernels auto,sm80       # + the sm_80 kernels: pf80_* columns
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
CONFIGS = [(64, 32), (128, 16)]  # (head dim, heads): hidden 2048
BACKENDS = ["FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"]
SHORT = {"FLASH_ATTENTION": "fa2", "CUDNN_ATTENTION": "cudnn", "EFFICIENT_ATTENTION": "eff"}
PREFIX = {"auto": "pf", "sm80": "pf80", "sm90": "pf90"}  # column prefix of each pagedflash kernel


def flops_fwd(b, s, h, d, causal):
    f = 4.0 * b * s * s * h * d
    return f / 2 if causal else f


def sdpa_fn(backend, q, k, v, causal):
    """SDPA's forward restricted to `backend`, on q, k, v in pagedflash's layout [b, s, h, d]."""
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

    def run():
        with sdpa_kernel([getattr(SDPBackend, backend)]):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

    return run


def sdpa_backward_fn(backend, q, k, v, dout, causal):
    """(run, leaves): `run()` is SDPA's backward, restricted to `backend`, of one forward on copies
    of q, k, v (layout [b, s, h, d]); leaves are those copies, whose .grad run() sets."""
    qg, kg, vg = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    with sdpa_kernel([getattr(SDPBackend, backend)]):
        o = F.scaled_dot_product_attention(qg.transpose(1, 2), kg.transpose(1, 2), vg.transpose(1, 2), is_causal=causal)
    gt = dout.transpose(1, 2)

    def run():
        qg.grad = kg.grad = vg.grad = None
        o.backward(gt, retain_graph=True)

    return run, (qg, kg, vg)


def pf_forward(q, k, v, causal, out, kernel, **extra):
    kw = common.kernel_kwargs(kernel)
    return lambda: pagedflash.flash_attn(q, k, v, causal=causal, out=out, **kw, **extra)


def pf_backward(dout, q, k, v, out, lse, causal, grads, kernel):
    kw = common.kernel_kwargs(kernel)
    dq, dk, dv = grads
    return lambda: pagedflash.flash_attn_backward(dout, q, k, v, out, lse, causal=causal, dq=dq, dk=dk, dv=dv, **kw)


def max_diff(a, b):
    return float((a.float() - b.float()).abs().max())


def bench_point(d, h, s, causal, args):
    b = max(1, args.tokens // s)
    dt = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(s * 7 + d)
    q, k, v, dout = (torch.randn(b, s, h, d, device="cuda", dtype=dt, generator=g) for _ in range(4))
    ff = flops_fwd(b, s, h, d, causal)
    fb = 2.5 * ff
    row = {"d": d, "h": h, "s": s, "b": b, "causal": causal}
    timing = {"warmup": args.warmup, "iters": args.iters, "flush_l2_between": not args.no_l2_flush}

    # ---- correctness first: every pagedflash kernel against SDPA's FlashAttention-2 backend ----
    qr, kr, vr = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    ref = None
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            ref = F.scaled_dot_product_attention(
                qr.transpose(1, 2), kr.transpose(1, 2), vr.transpose(1, 2), is_causal=causal
            ).transpose(1, 2)
        if not args.no_pf_bwd:
            ref.backward(dout)
    except RuntimeError as e:
        print(f"  (SDPA flash unavailable: {str(e).splitlines()[0]})", file=sys.stderr)
        ref = None
    kernels = []  # the kernels that take this call
    out = lse = None
    for kern in args.kernels:
        kw = common.kernel_kwargs(kern)
        try:
            o, l_ = pagedflash.flash_attn(q, k, v, causal=causal, return_lse=True, **kw)
        except NotImplementedError as e:
            print(f"  kernel {kern} does not take d={d} s={s} causal={causal}: {e}", file=sys.stderr)
            continue
        kernels.append(kern)
        if out is None:
            out, lse = o, l_
        if ref is not None:
            row["err_out"] = max(row.get("err_out", 0.0), max_diff(o, ref.detach()))
        if not args.no_pf_bwd and ref is not None:
            try:
                grads = pagedflash.flash_attn_backward(dout, q, k, v, o, l_, causal=causal, **kw)
            except NotImplementedError as e:
                print(f"  kernel {kern} has no backward for d={d} s={s} causal={causal}: {e}", file=sys.stderr)
                continue
            err = max(max_diff(a, r.grad) for a, r in zip(grads, (qr, kr, vr)))
            row["err_grad"] = max(row.get("err_grad", 0.0), err)
        del o, l_
    if ref is None:
        row["err_out"] = float("nan")
    del qr, kr, vr, ref

    # ---- timing ----
    if out is not None:
        grads = tuple(torch.empty_like(x) for x in (q, k, v))
        for kern in kernels:
            p = PREFIX.get(kern, f"pf_{kern}")
            row[f"{p}_fwd"] = common.gpu_time(pf_forward(q, k, v, causal, out, kern), **timing).rate(ff) / 1e12
            if not args.no_pf_bwd:
                try:
                    t = common.gpu_time(pf_backward(dout, q, k, v, out, lse, causal, grads, kern), **timing)
                    row[f"{p}_bwd"] = t.rate(fb) / 1e12
                except NotImplementedError:
                    pass
        del grads
    for be in args.backends:
        short = SHORT[be]
        try:
            row[f"{short}_fwd"] = common.gpu_time(sdpa_fn(be, q, k, v, causal), **timing).rate(ff) / 1e12
            if not args.no_bwd:
                back, _ = sdpa_backward_fn(be, q, k, v, dout, causal)
                row[f"{short}_bwd"] = common.gpu_time(back, **timing).rate(fb) / 1e12
                del back
        except RuntimeError as e:
            print(f"  {be} unavailable at d={d} s={s}: {str(e).splitlines()[0]}", file=sys.stderr)
    return row


def table(rows, kernels):
    pf_f = [f"{PREFIX.get(k, f'pf_{k}')}_fwd" for k in kernels]
    pf_b = [f"{PREFIX.get(k, f'pf_{k}')}_bwd" for k in kernels]
    cols = (
        ["d", "h", "s", "b", "causal"]
        + pf_f
        + ["fa2_fwd", "cudnn_fwd", "eff_fwd", "fwd_vs_fa2"]
        + pf_b
        + ["fa2_bwd", "cudnn_bwd", "eff_bwd", "bwd_vs_fa2", "err_out", "err_grad"]
    )
    lines = []
    for r in rows:
        r = dict(r)
        # the library's own choice (the first kernel: auto by default) against FlashAttention-2
        r["fwd_vs_fa2"] = r[pf_f[0]] / r["fa2_fwd"] if r.get(pf_f[0]) and r.get("fa2_fwd") else None
        r["bwd_vs_fa2"] = r[pf_b[0]] / r["fa2_bwd"] if r.get(pf_b[0]) and r.get("fa2_bwd") else None
        vals = []
        for c in cols:
            x = r.get(c)
            if c in ("fwd_vs_fa2", "bwd_vs_fa2"):
                vals.append(f"{x:.2f}x" if x else "-")
            elif c.startswith("err"):
                vals.append(f"{x:.1e}" if isinstance(x, float) else "-")
            else:
                vals.append(common.fmt(x))
        lines.append(vals)
    return common.markdown_table(cols, lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write the markdown report here")
    ap.add_argument("--quick", action="store_true", help="only s = 1k and 8k")
    ap.add_argument("--seqlens", help="comma-separated seqlens (default 512..16384)")
    ap.add_argument("--dims", help="comma-separated head dims (64, 128)")
    ap.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    ap.add_argument("--tokens", type=int, default=TOKENS, help="tokens per batch: batch = tokens / seqlen, at least 1")
    ap.add_argument(
        "--kernels",
        default="auto",
        help="pagedflash kernels to time, the first one against SDPA: auto (the library's choice; "
        "columns pf_*), sm80 (pf80_*: the mma.sync kernels, also on Hopper), sm90 (pf90_*: wgmma). "
        "E.g. auto,sm80. A kernel that cannot take a point (NotImplementedError) leaves '-'",
    )
    ap.add_argument("--compare-sm80", action="store_true", help="same as adding sm80 to --kernels")
    ap.add_argument("--backends", default=",".join(BACKENDS), help="SDPA backends to time")
    ap.add_argument("--no-bwd", action="store_true", help="skip SDPA backward timings")
    ap.add_argument("--no-pf-bwd", action="store_true", help="skip pagedflash's backward")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--no-l2-flush", action="store_true", help="do not flush the L2 cache before each timed call")
    common.add_common_args(ap)
    args = ap.parse_args(argv)
    args.kernels = common.parse_list(args.kernels) or ["auto"]
    if args.compare_sm80 and "sm80" not in args.kernels:
        args.kernels.append("sm80")
    args.backends = common.parse_list(args.backends)
    unknown = [b for b in args.backends if b not in SHORT]
    if unknown:
        ap.error(f"--backends: unknown {unknown}; expected some of {BACKENDS}")
    return args


def main(argv=None):
    args = parse_args(argv)
    common.require_cuda("bench_attention.py")
    if sdpa_kernel is None:
        sys.exit("needs torch.nn.attention.sdpa_kernel (torch >= 2.3)")
    common.check_kernels("flash", args.kernels)
    seqlens = [int(x) for x in args.seqlens.split(",")] if args.seqlens else ([1024, 8192] if args.quick else SEQLENS)
    dims = [int(x) for x in args.dims.split(",")] if args.dims else [c[0] for c in CONFIGS]
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    configs = [(d, h) for d, h in CONFIGS if d in dims] + [(d, 2048 // d) for d in dims if d not in dict(CONFIGS)]
    prov = common.provenance_line("cuda", args.commit)
    print(prov, flush=True)
    rows = []
    for d, h in configs:
        for causal in causals:
            for s in seqlens:
                r = bench_point(d, h, s, causal, args)
                rows.append(r)
                print(
                    f"d={d} s={s} causal={causal}: "
                    + ", ".join(
                        f"{k}={v:.1e}" if k.startswith("err") else f"{k}={common.fmt(v)}"
                        for k, v in r.items()
                        if k not in ("d", "h", "s", "b", "causal")
                    ),
                    flush=True,
                )
    names = ", ".join(f"{PREFIX.get(k, 'pf_' + k)} = kernel {k}" for k in args.kernels)
    head = (
        f"Prefill attention, bfloat16, {args.tokens} tokens per batch, TFLOP/s (FlashAttention FLOP convention)\n\n"
        f"{prov}\n\n"
        f"Times: median of {args.iters} CUDA-event timings after {args.warmup} warm-ups"
        f"{'' if args.no_l2_flush else ', L2 flushed before each'} (benchmarks/common.py gpu_time). "
        f"pagedflash: {names}; fa2 = SDPA FLASH_ATTENTION (FlashAttention-2), cudnn = SDPA CUDNN_ATTENTION, "
        f"eff = SDPA EFFICIENT_ATTENTION; *_vs_fa2 = {PREFIX.get(args.kernels[0], 'pf_' + args.kernels[0])} / fa2; "
        f"err_* = max |pagedflash - SDPA flash| over the kernels timed\n"
    )
    common.write_report(head + "\n" + table(rows, args.kernels) + "\n", args.out)


if __name__ == "__main__":
    main()
