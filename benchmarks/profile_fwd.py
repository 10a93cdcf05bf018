#!/usr/bin/env python3
"""One pagedflash forward and one SDPA FlashAttention-2 forward (and backward with --bwd),
bfloat16, for a profiler: run under `ncu -k regex:flash -c N`.

    python3 benchmarks/profile_fwd.py --d 128 --s 8192 [--causal] [--bwd] [--kernel sm80]

Afterwards the two outputs (and gradients) are compared, max |diff| printed. Times nothing.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import common
import pagedflash


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--s", type=int, default=8192)
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per batch: batch = tokens / s, at least 1")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--bwd", action="store_true")
    ap.add_argument("--kernel", default="auto", help="pagedflash's kernel= (auto: no argument passed), sm80, sm90")
    common.add_common_args(ap)
    a = ap.parse_args(argv)
    common.require_cuda("profile_fwd.py")
    common.check_kernels("flash", [a.kernel])
    print(common.provenance_line("cuda", a.commit), flush=True)
    kw = common.kernel_kwargs(a.kernel)
    h = 2048 // a.d
    b = max(1, a.tokens // a.s)
    q, k, v, do = (torch.randn(b, a.s, h, a.d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    out, lse = pagedflash.flash_attn(q, k, v, causal=a.causal, return_lse=True, **kw)
    grads = pagedflash.flash_attn_backward(do, q, k, v, out, lse, causal=a.causal, **kw) if a.bwd else None
    qr, kr, vr = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        o = F.scaled_dot_product_attention(
            qr.transpose(1, 2), kr.transpose(1, 2), vr.transpose(1, 2), is_causal=a.causal
        )
    if a.bwd:
        o.backward(do.transpose(1, 2))
    torch.cuda.synchronize()
    print(f"max |out - SDPA| {float((out.float() - o.transpose(1, 2).float()).abs().max()):.2e}")
    if grads is not None:
        err = max(float((g.float() - r.grad.float()).abs().max()) for g, r in zip(grads, (qr, kr, vr)))
        print(f"max |grad - SDPA| {err:.2e}")
    print("ok")


if __name__ == "__main__":
    main()
