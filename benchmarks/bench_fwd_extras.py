#!/usr/bin/env python3
"""Forward with softcap / ALiBi / dropout: pagedflash's kernels side by side -- by default its
Hopper (kernel="sm90") and sm_80 (kernel="sm80") kernels -- in one process, to check which
path these options should take. bfloat16, 16k tokens per batch, hidden 2048 (d=64: 32 heads,
d=128: 16 heads). SDPA has no softcap or ALiBi fast path, so the plain call's
FlashAttention-2 time (SDPA FLASH_ATTENTION) is printed as a yardstick. Each variant's
outputs are compared (max |first - second kernel|) before timing. Times from
benchmarks/common.py gpu_time (CUDA events, L2 flushed, median); TFLOP/s in FlashAttention's
convention; never asserts on speed.

    python3 benchmarks/bench_fwd_extras.py [--seqlens 2048,8192] [--out FILE]
    python3 benchmarks/bench_fwd_extras.py --kernels auto,sm90      # what the library picks
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import common
import pagedflash
from bench_attention import TOKENS, flops_fwd

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
    kw.update(common.kernel_kwargs(kernel))
    return lambda: pagedflash.flash_attn(q, k, v, causal=causal, out=out, **kw)


def sdpa_flash(q, k, v, causal):
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

    def run():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", default="2048,8192")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--tokens", type=int, default=TOKENS, help="tokens per batch: batch = tokens / seqlen, at least 1")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"some of {','.join(VARIANTS)}")
    ap.add_argument(
        "--kernels",
        default="sm90,sm80",
        help="pagedflash kernels (auto, sm80, sm90), one column each; the first two are compared (ratio, max diff)",
    )
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out")
    common.add_common_args(ap)
    args = ap.parse_args(argv)
    kernels = common.parse_list(args.kernels)
    variants = common.parse_list(args.variants)
    if not kernels:
        ap.error("--kernels: at least one kernel")
    if any(x not in VARIANTS for x in variants):
        ap.error(f"--variants: expected some of {','.join(VARIANTS)}")
    common.require_cuda("bench_fwd_extras.py")
    common.check_kernels("flash", kernels)
    k0, k1 = kernels[0], (kernels[1] if len(kernels) > 1 else None)
    cols = ["d", "s", "causal", "variant", *kernels] + ([f"{k0}/{k1}"] if k1 else []) + ["fa2 (plain)", "max diff"]
    timing = {"warmup": args.warmup, "iters": args.iters}
    prov = common.provenance_line("cuda", args.commit)
    print(prov, flush=True)
    rows = []
    for d in [int(x) for x in args.dims.split(",")]:
        h = 2048 // d
        for s in (int(x) for x in args.seqlens.split(",")):
            for causal in (False, True):
                b = max(1, args.tokens // s)
                g = torch.Generator(device="cuda").manual_seed(s + d)
                q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
                ff = flops_fwd(b, s, h, d, causal)
                fa2 = None
                if sdpa_kernel is not None:
                    try:
                        fa2 = common.gpu_time(sdpa_flash(q, k, v, causal), **timing).rate(ff) / 1e12
                    except RuntimeError as e:
                        print(f"  SDPA FLASH_ATTENTION: {str(e).splitlines()[0]}", file=sys.stderr)
                for name in variants:
                    opts = VARIANTS[name]
                    outs, rates = {}, {}
                    for kern in kernels:
                        o = torch.empty_like(q)
                        fn = run_variant(q, k, v, causal, opts, o, kern)
                        try:
                            fn()  # correctness first: the outputs are compared below, before any timing
                        except NotImplementedError as e:
                            print(f"  kernel {kern} does not take {name} d={d} s={s}: {e}", file=sys.stderr)
                            continue
                        outs[kern] = (o, fn)
                    diff = None
                    if k0 in outs and k1 in outs:
                        diff = float((outs[k0][0].float() - outs[k1][0].float()).abs().max())
                    for kern, (_, fn) in outs.items():
                        rates[kern] = common.gpu_time(fn, **timing).rate(ff) / 1e12
                    cells = [str(d), str(s), str(causal), name] + [common.fmt(rates.get(x)) for x in kernels]
                    if k1:
                        cells.append(f"{rates[k0] / rates[k1]:.2f}x" if k0 in rates and k1 in rates else "-")
                    cells += [common.fmt(fa2), f"{diff:.1e}" if diff is not None else "-"]
                    rows.append(cells)
                    print("| " + " | ".join(cells) + " |", flush=True)
                del q, k, v
    head = (
        f"Forward variants, bfloat16, {args.tokens} tokens per batch, TFLOP/s\n\n"
        f"{prov}\n\n"
        f"Times: median of {args.iters} CUDA-event timings after {args.warmup} warm-ups, L2 flushed before each "
        f"(benchmarks/common.py gpu_time). {', '.join(kernels)} = pagedflash with that kernel= (sm90: Hopper wgmma, "
        f"sm80: mma.sync); softcap 30, ALiBi slopes 0.01..0.5, dropout p = 0.1; fa2 (plain) = SDPA FLASH_ATTENTION "
        f"without the option; max diff = max |{k0} - {k1 or k0}|\n"
    )
    common.write_report(head + "\n" + common.markdown_table(cols, rows) + "\n", args.out)


if __name__ == "__main__":
    main()
