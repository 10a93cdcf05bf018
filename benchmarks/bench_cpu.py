"""CPU forward throughput: pagedflash vs torch SDPA (CPU) vs the naive NumPy reference.

GFLOP/s use FlashAttention's count: 4 * b * h * sq * sk * d (halved for causal).
Each point: correctness checked first, then the median of several timed runs after a
warm-up, all libraries in the same process on the same inputs (float32: the dtype
torch's CPU SDPA runs fastest; bf16 optionally). Prints one table and writes it to
benchmarks/results/ with the machine, date and commit. Never asserts on speed.

    python benchmarks/bench_cpu.py                   # the issue's grid
    python benchmarks/bench_cpu.py --quick           # s=512,2048 only
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

import pagedflash
from pagedflash import reference

try:
    import torch
except ImportError:
    torch = None


def timeit(fn, repeats, min_time=0.3):
    fn()  # warm-up
    times = []
    t_start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - t_start < min_time and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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


def commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seqlens", default="512,1024,2048,4096")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_forward.md"))
    a = ap.parse_args()
    seqlens = [512, 2048] if a.quick else [int(s) for s in a.seqlens.split(",")]
    threads = pagedflash.get_num_threads()
    if torch is not None:
        torch.set_num_threads(threads)
    rows = []
    rng = np.random.default_rng(0)
    b, h = 1, 8
    for d in (64, 128):
        for causal in (False, True):
            for s in seqlens:
                q, k, v = (rng.standard_normal((b, s, h, d), dtype=np.float32) for _ in range(3))
                flops = 4 * b * h * s * s * d * (0.5 if causal else 1.0)
                out = pagedflash.flash_attn(q, k, v, causal=causal)
                if s <= 1024:
                    ref = reference.attention(q, k, v, causal=causal)
                    err = float(np.max(np.abs(out - ref)))
                    assert err < 1e-4, f"pagedflash wrong at s={s} d={d}: {err}"
                reps = 3 if s >= 4096 else 5
                t_pf = timeit(lambda: pagedflash.flash_attn(q, k, v, causal=causal), reps)
                row = {"d": d, "causal": causal, "s": s, "pagedflash": flops / t_pf / 1e9}
                if torch is not None:
                    tq, tk, tv = (torch.from_numpy(x).transpose(1, 2) for x in (q, k, v))
                    sdpa = torch.nn.functional.scaled_dot_product_attention
                    ts = sdpa(tq, tk, tv, is_causal=causal).transpose(1, 2).numpy()
                    assert np.max(np.abs(ts - out)) < 1e-3, "torch SDPA and pagedflash disagree"
                    t_t = timeit(lambda: sdpa(tq, tk, tv, is_causal=causal), reps)
                    row["torch_sdpa"] = flops / t_t / 1e9
                if s <= 2048:
                    t_n = timeit(lambda: naive_numpy(q, k, v, causal), 3 if s >= 2048 else 5)
                    row["naive_numpy"] = flops / t_n / 1e9
                rows.append(row)
                print(fmt_row(row), flush=True)

    header = (f"# CPU forward, float32, b={b}, h={h}\n\n"
              f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"{threads} threads; torch {torch.__version__ if torch else 'absent'}; "
              f"date {datetime.date.today()}; commit {commit()}\n\n"
              "GFLOP/s (FlashAttention FLOP count; causal counts half). ratio = pagedflash / torch SDPA.\n\n"
              "| d | causal | seqlen | pagedflash | torch SDPA | naive NumPy | ratio |\n"
              "|---|---|---|---|---|---|---|\n")
    table = header + "\n".join(fmt_row(r) for r in rows) + "\n"
    print("\n" + table)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(table)


def fmt_row(r):
    f = lambda k: f"{r[k]:.1f}" if k in r else "-"
    ratio = f"{r['pagedflash'] / r['torch_sdpa']:.2f}x" if "torch_sdpa" in r else "-"
    return f"| {r['d']} | {r['causal']} | {r['s']} | {f('pagedflash')} | {f('torch_sdpa')} | {f('naive_numpy')} | {ratio} |"


if __name__ == "__main__":
    main()
