#!/usr/bin/env python3
"""CPU paged decode over compressed KV caches: float32, bfloat16, float8_e4m3fn, float8_e5m2 and int8
(per-tensor and per-(token, head) scales) caches holding the same tokens, one query per sequence.

Each point (batch x context) builds one float32 cache with blocks at random and the same values
stored in every format (pagedflash.reference.quantize_kv), checks each compressed format's output
against the float32 path run on its dequantized values (they compute the same thing: max relative
difference printed, must be <= 1e-5), then times every format in turns (benchmarks/common.py
cpu_time_in_turns: one call each per round, median over rounds) in one process on the same queries.
Prints us per call, ns per cached token (per sequence token: batch x context tokens, all KV heads),
the cache bytes read per call in GB/s, and each format's time relative to float32. Never asserts
on speed; writes the table (default benchmarks/results/kv_quant_cpu.md).

    python3 benchmarks/bench_kv_quant_cpu.py                  # Llama-like heads: h 32, hk 8, d 128
    python3 benchmarks/bench_kv_quant_cpu.py --quick --out /tmp/kvq.md
    python3 benchmarks/bench_kv_quant_cpu.py --q-len 16 --points 4x2048 \
        --out benchmarks/results/kv_quant_cpu_qlen16.md    # 16 queries per sequence (chunked prefill)
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
try:
    import ml_dtypes
except ImportError:
    ml_dtypes = None

FORMATS = [  # (column, cache dtype, scale kind)
    ("float32", "float32", None),
    ("bfloat16", "bfloat16", None),
    ("e4m3", "float8_e4m3fn", "tensor"),
    ("e5m2", "float8_e5m2", "tensor"),
    ("int8", "int8", "tensor"),
    ("int8 row", "int8", "row"),
]
FP8_MAX = {"float8_e4m3fn": 448.0, "float8_e5m2": 57344.0, "int8": 127.0}


def as_cache(codes, dtype):
    if dtype == "int8":
        return codes
    if ml_dtypes is not None:
        return codes.view(getattr(ml_dtypes, dtype))
    return torch.from_numpy(codes).view(getattr(torch, dtype))


def formats_available():
    out = []
    for col, dt, kind in FORMATS:
        if dt == "bfloat16" and torch is None:
            continue
        if dt.startswith("float8") and ml_dtypes is None and torch is None:
            continue
        out.append((col, dt, kind))
    return out


def point(rng, batch, ctx, h, hk, d, bs, formats, q_len=1):
    """(name, fn, bytes read per call) per format, correctness checked first."""
    nb = batch * ctx // bs
    k = rng.standard_normal((nb, bs, hk, d), dtype=np.float32)
    v = rng.standard_normal((nb, bs, hk, d), dtype=np.float32)
    bt = rng.permutation(nb).astype(np.int32).reshape(batch, ctx // bs)
    sl = np.full(batch, ctx, np.int32)
    q = rng.standard_normal((batch, h, d) if q_len == 1 else (batch, q_len, h, d), dtype=np.float32)
    cands = []
    for col, dt, kind in formats:
        if dt == "float32":
            cands.append((col, lambda: pagedflash.paged_attn(q, k, v, bt, sl), k.nbytes + v.nbytes))
            continue
        if dt == "bfloat16":
            tq, tk, tv = (torch.from_numpy(x).bfloat16() for x in (q, k, v))
            cands.append(
                (col, lambda tq=tq, tk=tk, tv=tv: pagedflash.paged_attn(tq, tk, tv, bt, sl), (k.nbytes + v.nbytes) // 2)
            )
            continue
        caches, scales = [], {}
        for name, x in (("k", k), ("v", v)):
            s = np.float32(np.abs(x).max() / FP8_MAX[dt]) if kind == "tensor" else None
            codes, used = reference.quantize_kv(x, dt, s)
            caches.append(as_cache(codes, dt))
            scales[f"{name}_scale"] = used
        kc, vc = caches
        got = pagedflash.paged_attn(q, kc, vc, bt, sl, **scales)
        dk = reference.dequantize_kv(kc, scales["k_scale"]).astype(np.float32)
        dv = reference.dequantize_kv(vc, scales["v_scale"]).astype(np.float32)
        want = pagedflash.paged_attn(q, dk, dv, bt, sl)
        err = float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))
        assert err <= 1e-5, f"{col}: {err:.2e} from the float32 path on the same values"
        nbytes = 2 * k.size + (2 * scales["k_scale"].nbytes if kind == "row" else 0)
        cands.append((col, lambda kc=kc, vc=vc, sc=scales: pagedflash.paged_attn(q, kc, vc, bt, sl, **sc), nbytes))
    return cands


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two points only")
    ap.add_argument("--points", default="1x4096,4x4096,16x2048,8x8192,32x1024", help="batch x context")
    ap.add_argument("--heads", default="32,8,128", help="num_heads, num_kv_heads, head_dim")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--q-len", type=int, default=1, help="queries per sequence (1: decode)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--min-time", type=float, default=1.0, help="and until each format ran this many seconds")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "kv_quant_cpu.md"))
    common.add_common_args(ap)
    a = ap.parse_args(argv)
    pts = ["1x4096", "8x2048"] if a.quick else common.parse_list(a.points)
    h, hk, d = (int(x) for x in a.heads.split(","))
    formats = formats_available()
    threads = pagedflash.get_num_threads()
    prov = common.provenance_line("cpu", a.commit)
    print(prov, flush=True)
    rng = np.random.default_rng(0)
    header = ["batch x context"] + [f"{c} us" for c, _, _ in formats] + [f"{c} vs f32" for c, _, _ in formats[1:]]
    rows, per_token = [], []
    for p in pts:
        batch, ctx = (int(x) for x in p.split("x"))
        cands = point(rng, batch, ctx, h, hk, d, a.block_size, formats, a.q_len)
        times = common.cpu_time_in_turns([fn for _, fn, _ in cands], repeats=a.repeats, min_time=a.min_time)
        med = [t.median for t in times]
        rows.append([p] + [f"{t * 1e6:.0f}" for t in med] + [f"{t / med[0]:.2f}" for t in med[1:]])
        per_token.append(
            [p] + [f"{t * 1e9 / (batch * ctx):.1f} / {nb / t / 1e9:.1f}" for t, (_, _, nb) in zip(med, cands)]
        )
        print("| " + " | ".join(rows[-1]) + " |", flush=True)
    text = (
        f"# CPU paged {'decode' if a.q_len == 1 else f'attention, {a.q_len} queries per sequence,'} over compressed "
        f"KV caches (h={h}, hk={hk}, d={d}, block_size={a.block_size})\n\n"
        f"{prov}\n\n"
        f"{threads} threads. {a.q_len} quer{'y' if a.q_len == 1 else 'ies'} per sequence (the last of its "
        "`context` tokens, causal), every sequence's tokens in blocks at random; q "
        "float32 (bfloat16 for the bfloat16 cache). Per-tensor scales (`e4m3`, `e5m2`, `int8`) and per-(token, "
        "head) scales (`int8 row`). Median us per call over rounds in which the formats take turns; `vs f32` = "
        "time / float32's time (< 1: faster).\n\n"
        + common.markdown_table(header, rows)
        + "\n\nns per cached token (batch x context) / GB/s of cache bytes read (scales included):\n\n"
        + common.markdown_table(["batch x context"] + [c for c, _, _ in formats], per_token)
        + "\n"
    )
    common.write_report(text, a.out)


if __name__ == "__main__":
    main()
