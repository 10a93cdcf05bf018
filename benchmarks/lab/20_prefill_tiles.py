#!/usr/bin/env python3
"""20 - prefill tile candidates of the flash kernels, timed through a tuning build's hooks

Result: kept the tiles in the library (sm_80 forward 128x64, 4 warps, lazy O rescale for
d > 64 only; sm_80 backward 64 queries x 8 warps at d=128, 128 x 8 with deferred dQ at d=64;
sm_90a forward 64 keys x 2 warpgroups x 2 blocks/SM at d=64, 128 keys x 2 warpgroups at
d=128); every other candidate below was slower.

What it was: bench_attention.py --tiles / --tile-env / --bwd-tiles until issue 12. A build with
-DPF_TUNE reads a tile from the environment on every call, so one GPU session times all the
candidates in one process against SDPA FLASH_ATTENTION (FlashAttention-2). The library itself
reads no environment variable, so this runs against a tuning build of a commit whose kernels
still have the hooks (cuda/flash_fwd.cuh launch_fwd_tune, PAGEDFLASH_FWD_TILE=MxNxW[xB[xL]];
cuda/flash_bwd.cuh bwd_tune, PAGEDFLASH_BWD_TILE=MxW[xR[xD]]; both present at d90541e):

    PAGEDFLASH_NVCC_FLAGS=-DPF_TUNE PAGEDFLASH_HEADDIMS=64,128 PAGEDFLASH_CUDA=1 python3 setup.py -q build_ext --inplace
    PYTHONPATH=python python3 benchmarks/lab/20_prefill_tiles.py --fwd-tiles 128x64x4,64x64x4x3 --bwd-tiles 64x8,32x8

The Hopper forward had its own hook, PAGEDFLASH_FWD90_CFG (6599d59..90d0dd9): --fwd-env
PAGEDFLASH_FWD90_CFG on a build of that range.

Measured (H200, bf16, 16k tokens per batch, TFLOP/s; the tables are in benchmarks/results/):
- sm_80 forward tile (fwd_tiles_h200.md, commit 765a99c): 128x64x4 won at every point; d=128
  s=8k 325.8 against 297.5 (128x64x8, 2/SM), 285.3 (64x64x4, 3/SM), 272.2 (128x32x4), 241.1
  (128x128x8, 2/SM); d=64 s=8k 304.4 against 297.8 (128x128x4).
- lazy O rescale (tune_h200.md, commit c9cdc25): off for d <= 64 (d=64 s=2k 297.1 vs 284.0,
  s=8k causal 289.6 vs 280.4), on for d=128 (326.4 vs 321.0 at s=2k).
- sm_80 backward tile (tune_h200.md; notes above BwdTile in cuda/flash_bwd.cuh): d=128 s=8k
  64x8 239, 32x8 225, 64x4 210, 32x4 214; d=64 128 queries per step 235 against 214 (64x8),
  with deferred dQ 246-247; 32-row dQ warp tiles +2.5% at d=128.
- sm_90a forward tile (fwd90_tiles_h200.md, commits b7700aa, eeb3d41): d=64 64x0x2x2 385.3 at
  s=8k against 339.9 (128x0x3x1); d=128 128x0x2x1 435.2 against 407.5 (64x0x2x1); the deeper S
  pipeline gained 1% and was dropped.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import common  # noqa: E402
import pagedflash  # noqa: E402
from bench_attention import SEQLENS, TOKENS, flops_fwd, sdpa_fn  # noqa: E402


def with_env(var, value, fn):
    """fn() with var=value in the environment (the tuning hooks read it on every call)."""

    def run():
        os.environ[var] = value
        try:
            return fn()
        finally:
            os.environ.pop(var, None)

    return run


def max_diff(xs, ys):
    return max(float((a.float() - b.float()).abs().max()) for a, b in zip(xs, ys))


def point(d, h, s, causal, fwd, bwd, args):
    """One row: the forward candidates, FA2's forward, the backward candidates and the default
    backward, each candidate's result compared with FA2 / the default first."""
    timing = {"warmup": args.warmup, "iters": args.iters}
    b = max(1, args.tokens // s)
    g = torch.Generator(device="cuda").manual_seed(s * 7 + d)
    q, k, v, do = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    ff = flops_fwd(b, s, h, d, causal)
    cells, errs = [str(d), str(s), str(causal)], []
    out, lse = pagedflash.flash_attn(q, k, v, causal=causal, return_lse=True)
    if fwd:
        ref = sdpa_fn("FLASH_ATTENTION", q, k, v, causal)().transpose(1, 2)
        o = torch.empty_like(q)
        for t in fwd:
            fn = with_env(args.fwd_env, t, lambda: pagedflash.flash_attn(q, k, v, causal=causal, out=o))
            fn()
            errs.append(f"fwd@{t} {max_diff([o], [ref]):.1e}")
            cells.append(common.fmt(common.gpu_time(fn, **timing).rate(ff) / 1e12))
        cells.append(common.fmt(common.gpu_time(sdpa_fn("FLASH_ATTENTION", q, k, v, causal), **timing).rate(ff) / 1e12))
    if bwd:
        ref_grads = pagedflash.flash_attn_backward(do, q, k, v, out, lse, causal=causal)
        dq, dk, dv = (torch.empty_like(x) for x in (q, k, v))

        def run():
            return pagedflash.flash_attn_backward(do, q, k, v, out, lse, causal=causal, dq=dq, dk=dk, dv=dv)

        for t in [*bwd, None]:
            fn = run if t is None else with_env("PAGEDFLASH_BWD_TILE", t, run)
            fn()
            if t is not None:
                errs.append(f"bwd@{t} {max_diff((dq, dk, dv), ref_grads):.1e}")
            cells.append(common.fmt(common.gpu_time(fn, **timing).rate(2.5 * ff) / 1e12))
    print(f"  d={d} s={s} causal={causal}: max |candidate - FA2 (fwd) / default (bwd)|: {', '.join(errs)}")
    return cells


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fwd-tiles", default="", help="forward candidates, e.g. 128x64x4,64x64x4x3,128x64x4x1x0")
    ap.add_argument("--fwd-env", default="PAGEDFLASH_FWD_TILE", help="the variable --fwd-tiles sets")
    ap.add_argument("--bwd-tiles", default="", help="backward candidates, e.g. 64x8,32x8,64x8x32x1")
    ap.add_argument("--seqlens", default="2048,8192", help=f"comma-separated (the full grid: {SEQLENS})")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    ap.add_argument("--tokens", type=int, default=TOKENS)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--out")
    common.add_common_args(ap)
    args = ap.parse_args(argv)
    fwd, bwd = common.parse_list(args.fwd_tiles), common.parse_list(args.bwd_tiles)
    if not fwd and not bwd:
        ap.error("give --fwd-tiles and/or --bwd-tiles")
    common.require_cuda("lab/20_prefill_tiles.py")
    prov = common.provenance_line("cuda", args.commit)
    print(prov, flush=True)
    cols = ["d", "s", "causal"] + [f"fwd@{t}" for t in fwd] + (["fa2_fwd"] if fwd else [])
    cols += [f"bwd@{t}" for t in bwd] + (["bwd (no tile set)"] if bwd else [])
    rows = []
    for d in [int(x) for x in args.dims.split(",")]:
        for causal in {"both": [False, True], "yes": [True], "no": [False]}[args.causal]:
            for s in [int(x) for x in args.seqlens.split(",")]:
                rows.append(point(d, 2048 // d, s, causal, fwd, bwd, args))
                print("| " + " | ".join(rows[-1]) + " |", flush=True)
    text = (
        f"Lab 20, prefill tile candidates (tuning build), bfloat16, {args.tokens} tokens per batch, TFLOP/s\n\n"
        f"{prov}\n\nfwd@T: {args.fwd_env}=T; bwd@T: PAGEDFLASH_BWD_TILE=T; fa2 = SDPA FLASH_ATTENTION; median of "
        f"{args.iters} CUDA-event timings after {args.warmup} warm-ups, L2 flushed before each\n\n"
        + common.markdown_table(cols, rows)
        + "\n"
    )
    common.write_report(text, args.out)


if __name__ == "__main__":
    main()
