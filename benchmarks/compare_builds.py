#!/usr/bin/env python3
"""Time two (or more) builds of pagedflash on the same grids, in the same run, on the same GPU.

A build is a folder whose `python/` holds a built `pagedflash` package (e.g. the working tree
and an older commit extracted beside it). One Python process cannot import two builds, so each
(round, build) runs in its own worker process; the builds take turns round by round
(old, new, new, old, old, new, ...), and every point's time is the median over the rounds of
each round's median. Only the public API that every build has is called (flash_attn,
flash_attn_backward, paged_attn with default options), so any two commits compare.

Grids (the project's):
  prefill  bench_attention.py's: bfloat16, 16k tokens per batch, (d, heads) in (64, 32) and
           (128, 16), seqlen 512..16k, causal and not; forward and backward, CUDA events with
           the L2 flushed before each call (common.gpu_time)
  decode   bench_decode.py's: one query per sequence, 32 query / 8 KV heads, d = 128, block
           size 16, blocks scattered at random, batch 1..128 x context 1k..64k; CUDA-graph
           replays over rotating input sets (cold L2; common.time_graph)

    python3 benchmarks/compare_builds.py --build old=.baseline --build new=. --rounds 3 \\
        --grid prefill,decode --out compare.md

Prints one table per grid: each build's time (and TFLOP/s or TB/s) and each build's speed
relative to the first build (> 1 = faster); never asserts on speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

TOKENS = 16384
SEQLENS = [512, 1024, 2048, 4096, 8192, 16384]
PREFILL_CONFIGS = [(64, 32), (128, 16)]  # (head dim, heads): hidden 2048
DECODE_BATCH = [1, 8, 32, 128]
DECODE_CTX = [1024, 4096, 16384, 65536]
DECODE_HEADS, DECODE_KV_HEADS, DECODE_DIM, DECODE_BLOCK = 32, 8, 128, 16
L2_ROTATE_BYTES = 512 << 20


# --------------------------------------------------------------------------- worker side


def _worker(grid: str, quick: bool, tiny: bool, seqlens: list, dims: list) -> dict:
    import torch

    import pagedflash
    from common import gpu_time, time_graph  # benchmarks/common.py: the one harness

    results = {}
    torch.manual_seed(0)
    if tiny:  # for a dry run of the script on the CPU (benchmarks/cpu_dryrun.py)
        global TOKENS, SEQLENS, DECODE_BATCH, DECODE_CTX
        TOKENS, SEQLENS, DECODE_BATCH, DECODE_CTX = 256, [64, 128], [1, 2], [64, 200]
    if grid == "prefill":
        seqlens = seqlens or (SEQLENS[1::4] if quick else SEQLENS)
        for d, h in PREFILL_CONFIGS:
            if dims and d not in dims:
                continue
            for s in seqlens:
                for causal in (False, True):
                    results.update(_prefill_point(torch, pagedflash, gpu_time, d, h, s, causal))
                    torch.cuda.empty_cache()
    elif grid == "decode":
        for batch in DECODE_BATCH[::2] if quick else DECODE_BATCH:
            for ctx in DECODE_CTX[1:3] if quick else DECODE_CTX:
                results[f"batch={batch} ctx={ctx}"] = _decode_point(torch, pagedflash, time_graph, batch, ctx)
                torch.cuda.empty_cache()
    else:
        raise SystemExit(f"unknown grid {grid}")
    return results


def _prefill_point(torch, pagedflash, gpu_time, d: int, h: int, s: int, causal: bool) -> dict:
    """Median forward and backward seconds of one point of the prefill grid."""
    b = TOKENS // s
    g = torch.Generator(device="cuda").manual_seed(s * 7 + d)
    q, k, v, dout = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    out, lse = pagedflash.flash_attn(q, k, v, causal=causal, return_lse=True)
    dq, dk, dv = (torch.empty_like(x) for x in (q, k, v))
    key = f"d={d} s={s} causal={causal}"
    fwd = gpu_time(lambda: pagedflash.flash_attn(q, k, v, causal=causal, out=out), warmup=5, iters=30)
    bwd = gpu_time(
        lambda: pagedflash.flash_attn_backward(dout, q, k, v, out, lse, causal=causal, dq=dq, dk=dk, dv=dv),
        warmup=5,
        iters=30,
    )
    return {key + " fwd": fwd.median, key + " bwd": bwd.median}  # the tensors go with this frame


def _decode_point(torch, pagedflash, time_graph, batch: int, ctx: int) -> float:
    """Median seconds per paged_attn call of one point of the decode grid (graph replays over
    rotating input sets, so that every call reads its K/V from memory)."""
    h, hk, d, bs = DECODE_HEADS, DECODE_KV_HEADS, DECODE_DIM, DECODE_BLOCK
    kv_bytes = batch * ctx * hk * d * 2 * 2
    sets = max(1, -(-L2_ROTATE_BYTES // kv_bytes))
    gen = torch.Generator(device="cuda").manual_seed(batch * 131 + ctx)
    blocks_per_seq = -(-ctx // bs)
    total = sets * batch * blocks_per_seq
    kc = torch.empty((total, bs, hk, d), dtype=torch.bfloat16, device="cuda")
    kc.normal_(generator=gen)
    vc = torch.empty_like(kc)
    vc.normal_(generator=gen)
    perm = torch.randperm(total, device="cuda", generator=gen).to(torch.int32).view(sets, batch, blocks_per_seq)

    def call(r: int):
        q = torch.randn((batch, h, d), dtype=torch.bfloat16, device="cuda", generator=gen)
        bt = perm[r].contiguous()
        sl = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        o = torch.empty_like(q)
        return lambda: pagedflash.paged_attn(q, kc, vc, bt, sl, out=o)

    return time_graph([call(r) for r in range(sets)]).median  # the cache goes with this frame


# --------------------------------------------------------------------------- orchestration


def _run_worker(root: Path, grid: str, quick: bool, dryrun: bool, extra: list) -> dict:
    here = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=f"{root / 'python'}{os.pathsep}{here}")
    cmd = [sys.executable] + ([str(here / "cpu_dryrun.py")] if dryrun else [])
    cmd += [str(Path(__file__).resolve()), "--worker", grid] + (["--quick"] if quick else [])
    cmd += (["--tiny"] if dryrun else []) + extra
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(root))
    if r.returncode != 0:
        raise RuntimeError(f"worker for {root} ({grid}) failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _value(grid: str, key: str, seconds: float) -> str:
    """TFLOP/s (prefill, FlashAttention's FLOP convention) or TB/s of K/V read (decode)."""
    kv = dict(part.split("=") for part in key.replace(" fwd", "").replace(" bwd", "").split())
    if grid == "prefill":
        d, s = int(kv["d"]), int(kv["s"])
        h = dict(PREFILL_CONFIGS)[d]
        flops = 4.0 * (TOKENS // s) * s * s * h * d / (2 if kv["causal"] == "True" else 1)
        if key.endswith("bwd"):
            flops *= 2.5
        return f"{flops / seconds / 1e12:.1f} TFLOP/s"
    batch, ctx = int(kv["batch"]), int(kv["ctx"])
    return f"{batch * ctx * DECODE_KV_HEADS * DECODE_DIM * 2 * 2 / seconds / 1e12:.2f} TB/s"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", action="append", default=[], help="name=folder (repeat; the first is the reference)")
    ap.add_argument("--grid", default="prefill,decode")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a few points of each grid")
    ap.add_argument("--out", default=None, help="write the markdown report here")
    ap.add_argument("--seqlens", default="", help="prefill: only these sequence lengths (e.g. 512,1024)")
    ap.add_argument("--dims", default="", help="prefill: only these head dims (64, 128)")
    ap.add_argument("--dryrun", action="store_true", help="tiny shapes, workers under cpu_dryrun.py (no GPU)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        ints = [[int(x) for x in a.split(",") if x] for a in (args.seqlens, args.dims)]
        print(json.dumps(_worker(args.worker, args.quick, args.tiny, *ints)))
        return 0
    builds = [(n, Path(p).resolve()) for n, p in (b.split("=", 1) for b in args.build)]
    if len(builds) < 2:
        ap.error("give at least two --build name=folder")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import provenance_line

    report = [
        f"# Builds compared\n\n{provenance_line('cpu' if args.dryrun else 'cuda')}\n",
        "Builds: "
        + ", ".join(f"{n} = {p}" for n, p in builds)
        + f"; {args.rounds} rounds, builds alternating (each round's order reversed from the last); "
        "per point the median over rounds of each round's median.\n",
    ]
    for grid in args.grid.split(","):
        times = {n: {} for n, _ in builds}
        for rnd in range(args.rounds):
            order = builds if rnd % 2 == 0 else builds[::-1]
            for name, root in order:
                print(f"[{grid}] round {rnd + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
                extra = ["--seqlens", args.seqlens, "--dims", args.dims]
                for key, t in _run_worker(root, grid, args.quick, args.dryrun, extra).items():
                    times[name].setdefault(key, []).append(t)
        ref = builds[0][0]
        head = ["point"] + [f"{n}" for n, _ in builds] + [f"{n} / {ref} speed" for n, _ in builds[1:]]
        lines = [f"\n## {grid}\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        worst = {}
        for key in times[ref]:
            med = {n: statistics.median(times[n][key]) for n, _ in builds}
            cells = [key] + [f"{med[n] * 1e6:.1f} us ({_value(grid, key, med[n])})" for n, _ in builds]
            for n, _ in builds[1:]:
                speed = med[ref] / med[n]
                worst[n] = min(worst.get(n, 9.9), speed)
                cells.append(f"{speed:.3f}x" + (" **slower > 2%**" if speed < 0.98 else ""))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines += [f"Slowest point of {n} relative to {ref}: {w:.3f}x" for n, w in worst.items()]
        print("\n".join(lines), flush=True)
        report += lines
    if args.out:
        Path(args.out).write_text("\n".join(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
