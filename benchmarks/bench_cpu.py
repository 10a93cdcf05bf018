#!/usr/bin/env python3
"""CPU forward throughput: pagedflash vs torch SDPA (CPU) vs the naive NumPy reference.

GFLOP/s use FlashAttention's count: 4 * b * h * sq * sk * d (halved for causal).
Each point: correctness checked first (pagedflash against the float64 reference up to
s = 1024, torch SDPA against pagedflash everywhere), then the candidates timed in turns
(benchmarks/common.py cpu_time_in_turns: one call of each per round, warm-up round first,
median over at least --repeats rounds and until each has run --min-time seconds), all in
the same process on the same inputs (float32: the dtype torch's CPU SDPA runs fastest).
Prints one table and writes it (default: benchmarks/results/cpu_forward.md) with the
machine, date and commit. Never asserts on speed.

    python3 benchmarks/bench_cpu.py                   # the issue's grid
    python3 benchmarks/bench_cpu.py --quick --out /tmp/cpu.md   # s=512,2048 only
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import common
import pagedflash
from pagedflash import reference

try:
    import torch
except ImportError:
    torch = None


def naive_numpy(q, k, v, causal):
    """Naive attention in NumPy float32 (materializes S): the 'write it yourself' baseline."""
    b, s, h, d = q.shape
    qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    sc = np.matmul(qt, kt.transpose(0, 1, 3, 2)) * np.float32(1 / np.sqrt(d))
    if causal:
        sc = np.where(np.tril(np.ones((s, s), bool)), sc, np.float32(-np.inf))
    sc -= sc.max(-1, keepdims=True)
    p = np.exp(sc)
    p /= p.sum(-1, keepdims=True)
    return np.matmul(p, vt).transpose(0, 2, 1, 3)


def candidates(q, k, v, causal, s):
    """(name, fn) of every library timed at this point, correctness checked first."""
    out = pagedflash.flash_attn(q, k, v, causal=causal)
    if s <= 1024:
        ref = reference.attention(q, k, v, causal=causal)
        err = float(np.max(np.abs(out - ref)))
        assert err < 1e-4, f"pagedflash wrong at s={s}: {err}"
    cands = [("pagedflash", lambda: pagedflash.flash_attn(q, k, v, causal=causal))]
    if torch is not None:
        tq, tk, tv = (torch.from_numpy(x).transpose(1, 2) for x in (q, k, v))
        sdpa = torch.nn.functional.scaled_dot_product_attention
        ts = sdpa(tq, tk, tv, is_causal=causal).transpose(1, 2).numpy()
        assert np.max(np.abs(ts - out)) < 1e-3, "torch SDPA and pagedflash disagree"
        cands.append(("torch_sdpa", lambda: sdpa(tq, tk, tv, is_causal=causal)))
    if s <= 2048:
        cands.append(("naive_numpy", lambda: naive_numpy(q, k, v, causal)))
    return cands


def fmt_row(r):
    def f(k):
        return f"{r[k]:.1f}" if k in r else "-"

    ratio = f"{r['pagedflash'] / r['torch_sdpa']:.2f}x" if "torch_sdpa" in r else "-"
    return [str(r["d"]), str(r["causal"]), str(r["s"]), f("pagedflash"), f("torch_sdpa"), f("naive_numpy"), ratio]


HEADER = ["d", "causal", "seqlen", "pagedflash", "torch SDPA", "naive NumPy", "ratio"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="s = 512 and 2048 only")
    ap.add_argument("--seqlens", default="512,1024,2048,4096")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--repeats", type=int, default=5, help="at least this many rounds (3 at s >= 4096)")
    ap.add_argument("--min-time", type=float, default=0.3, help="and until each candidate ran this many seconds")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_forward.md"))
    common.add_common_args(ap)
    a = ap.parse_args(argv)
    seqlens = [512, 2048] if a.quick else [int(s) for s in a.seqlens.split(",")]
    threads = pagedflash.get_num_threads()
    if torch is not None:
        torch.set_num_threads(threads)
    prov = common.provenance_line("cpu", a.commit)
    print(prov, flush=True)
    rows = []
    rng = np.random.default_rng(0)
    b, h = 1, 8
    for d in [int(x) for x in a.dims.split(",")]:
        for causal in (False, True):
            for s in seqlens:
                q, k, v = (rng.standard_normal((b, s, h, d), dtype=np.float32) for _ in range(3))
                flops = 4 * b * h * s * s * d * (0.5 if causal else 1.0)
                cands = candidates(q, k, v, causal, s)
                reps = min(a.repeats, 3) if s >= 4096 else a.repeats
                times = common.cpu_time_in_turns([fn for _, fn in cands], repeats=reps, min_time=a.min_time)
                row = {"d": d, "causal": causal, "s": s}
                row.update({name: t.rate(flops) / 1e9 for (name, _), t in zip(cands, times)})
                rows.append(row)
                print("| " + " | ".join(fmt_row(row)) + " |", flush=True)

    text = (
        f"# CPU forward, float32, b={b}, h={h}\n\n"
        f"{prov}\n\n"
        f"{threads} pagedflash threads (torch SDPA set to the same). GFLOP/s (FlashAttention FLOP count; causal "
        "counts half), median over rounds in which the three take turns (benchmarks/common.py "
        "cpu_time_in_turns). ratio = pagedflash / torch SDPA.\n\n"
        + common.markdown_table(HEADER, map(fmt_row, rows))
        + "\n"
    )
    common.write_report(text, a.out)


if __name__ == "__main__":
    main()
