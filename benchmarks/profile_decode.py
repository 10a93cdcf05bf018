#!/usr/bin/env python3
"""One pagedflash.paged_attn call and one SDPA call (cuDNN by default) per decode point, each
inside an NVTX range named after the point, for Nsight Compute:

    ncu --nvtx --nvtx-include "pf_b128_c1024/" ... python3 benchmarks/profile_decode.py --points 128x1024
    python3 benchmarks/profile_decode.py --points 32x65536 --kernel 1x8     # a forced CTA shape

Same data as bench_decode.py (paged cache with blocks scattered at random; contiguous K/V for
SDPA). After the ranges, the two outputs are compared (max |diff|, printed). Times nothing:
scripts/profile_decode.sh runs it under ncu, once per kernel.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import common
import pagedflash
from bench_decode import make_point


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", nargs="+", default=["1x65536", "8x16384", "32x4096", "32x65536", "128x1024"])
    ap.add_argument("--backend", default="CUDNN_ATTENTION")
    ap.add_argument("--kernel", default="auto", help="pagedflash's kernel= (auto: no argument passed)")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    common.add_common_args(ap)
    a = ap.parse_args(argv)
    common.require_cuda("profile_decode.py")
    common.check_kernels("paged", [a.kernel])
    print(common.provenance_line("cuda", a.commit), flush=True)
    kw = common.kernel_kwargs(a.kernel)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for pt in a.points:
        batch, ctx = (int(x) for x in pt.split("x"))
        kc, vc, data = make_point(batch, ctx, a.heads, a.kv_heads, a.dim, a.block_size, torch.bfloat16, 1, gen)
        x = data[0]
        out = torch.empty_like(x["q"])
        torch.cuda.synchronize()
        with torch.cuda.nvtx.range(f"pf_b{batch}_c{ctx}"):
            pagedflash.paged_attn(x["q"], kc, vc, x["bt"], x["sl"], out=out, **kw)
        torch.cuda.synchronize()
        try:
            with sdpa_kernel([getattr(SDPBackend, a.backend)]):
                with torch.cuda.nvtx.range(f"sdpa_b{batch}_c{ctx}"):
                    ref = F.scaled_dot_product_attention(x["q"][:, :, None], x["k"], x["v"], enable_gqa=True)
            torch.cuda.synchronize()
            diff = float((out.float() - ref[:, :, 0].float()).abs().max())
            print(f"b={batch} ctx={ctx} kernel={a.kernel}: max |pagedflash - SDPA| {diff:.2e}")
        except RuntimeError as e:
            torch.cuda.synchronize()
            ref = None
            print(f"b={batch} ctx={ctx}: SDPA {a.backend} unavailable ({str(e).splitlines()[0][:80]})")
        del kc, vc, data, x, out, ref
        torch.cuda.empty_cache()
    print("ok")


if __name__ == "__main__":
    main()
