#!/usr/bin/env python3
"""One pagedflash.paged_attn call and one SDPA call (cuDNN by default) per decode point, each
inside an NVTX range named after the point, for Nsight Compute:

    ncu --nvtx --nvtx-include "pf_b128_c1024/" ... python3 benchmarks/profile_decode.py --points 128x1024

Same data as bench_decode.py (paged cache with blocks scattered at random; contiguous K/V for SDPA).
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import pagedflash

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import make_point  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--points", nargs="+", default=["1x65536", "8x16384", "32x4096", "32x65536", "128x1024"])
ap.add_argument("--backend", default="CUDNN_ATTENTION")
ap.add_argument("--heads", type=int, default=32)
ap.add_argument("--kv-heads", type=int, default=8)
ap.add_argument("--dim", type=int, default=128)
ap.add_argument("--block-size", type=int, default=16)
a = ap.parse_args()
gen = torch.Generator(device="cuda").manual_seed(0)
for pt in a.points:
    batch, ctx = (int(x) for x in pt.split("x"))
    kc, vc, data = make_point(batch, ctx, a.heads, a.kv_heads, a.dim, a.block_size, torch.bfloat16, 1, gen)
    x = data[0]
    out = torch.empty_like(x["q"])
    torch.cuda.synchronize()
    with torch.cuda.nvtx.range(f"pf_b{batch}_c{ctx}"):
        pagedflash.paged_attn(x["q"], kc, vc, x["bt"], x["sl"], out=out)
    torch.cuda.synchronize()
    with sdpa_kernel([getattr(SDPBackend, a.backend)]):
        with torch.cuda.nvtx.range(f"sdpa_b{batch}_c{ctx}"):
            F.scaled_dot_product_attention(x["q"][:, :, None], x["k"], x["v"], enable_gqa=True)
    torch.cuda.synchronize()
    del kc, vc, data, x, out
    torch.cuda.empty_cache()
print("ok")
