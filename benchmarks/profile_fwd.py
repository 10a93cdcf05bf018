#!/usr/bin/env python3
"""One pagedflash forward and one SDPA FlashAttention-2 forward (and backward with --bwd),
bfloat16, for a profiler: run under `ncu -k regex:flash -c N`.

    python3 benchmarks/profile_fwd.py --d 128 --s 8192 [--causal] [--bwd]
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import pagedflash

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import backward_fn  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--d", type=int, default=128)
ap.add_argument("--s", type=int, default=8192)
ap.add_argument("--causal", action="store_true")
ap.add_argument("--bwd", action="store_true")
a = ap.parse_args()
h = 2048 // a.d
b = 16384 // a.s
q, k, v, do = (torch.randn(b, a.s, h, a.d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
out, lse = pagedflash.flash_attn(q, k, v, causal=a.causal, return_lse=True)
if a.bwd:
    backward_fn()(do, q, k, v, out, lse, causal=a.causal)
qr, kr, vr = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
    o = F.scaled_dot_product_attention(qr.transpose(1, 2), kr.transpose(1, 2), vr.transpose(1, 2), is_causal=a.causal)
if a.bwd:
    o.backward(do.transpose(1, 2))
torch.cuda.synchronize()
print("ok")
