"""python -m pagedflash [demo|info]

demo (the default): attention on a realistic shape on the best available device, in a
dtype that suits it (float16 on a GPU, float32 on the CPU), checked against the float64
reference; prints the error, the time and the build.
info: prints the build and device information.

Neither imports torch unless a GPU is visible to a CUDA build (it names the GPUs and
holds the demo's GPU tensors).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import pagedflash
from pagedflash import reference


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _gpu_names(count: int):
    """GPU names through torch when it is installed (pagedflash itself does not need it); no GPU,
    no torch import (2 s)."""
    if count <= 0:
        return []
    try:
        import torch

        return [torch.cuda.get_device_name(i) for i in range(min(count, torch.cuda.device_count()))]
    except Exception:  # torch absent or without CUDA: names are optional
        return []


def info() -> None:
    bi = pagedflash.build_info()
    print(f"pagedflash {bi['version']}")
    print(f"  CPU         : {_cpu_model()}")
    print(f"  CPU backend : built, {bi['num_threads']} threads ({bi['cpu_count']} cores)")
    if bi["cuda"]:
        print(
            f"  CUDA backend: built for sm_{bi['cuda_archs'].replace(',', ', sm_')}; "
            f"{bi['cuda_devices']} device(s) visible"
        )
        for i, name in enumerate(_gpu_names(bi["cuda_devices"])):
            print(f"  GPU {i}       : {name}")
    else:
        print(f"  CUDA backend: not built ({bi.get('cuda_note') or 'PAGEDFLASH_CUDA=1 builds it'})")
    print(f"  backends    : {', '.join(bi['backends'])}")


def _cuda_torch():
    """torch, when the CUDA backend is built and a GPU visible (else None, torch not imported)."""
    bi = pagedflash.build_info()
    if not (bi["cuda"] and bi["cuda_devices"] > 0):
        return None
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def demo(batch: int, seqlen: int, heads: int, kv_heads: int, head_dim: int, causal: bool, dtype: str) -> int:
    info()
    torch = _cuda_torch()
    device = "cuda" if torch is not None else "cpu"
    if dtype == "auto":  # what each device computes attention in: tensor cores, the CPU's float32 vectors
        dtype = "float16" if device == "cuda" else "float32"
    rng = np.random.default_rng(0)
    shape_q = (batch, seqlen, heads, head_dim)
    shape_kv = (batch, seqlen, kv_heads, head_dim)
    q, k, v = (rng.standard_normal(shape, dtype=np.float32).astype(dtype) for shape in (shape_q, shape_kv, shape_kv))
    if torch is not None:
        args = [torch.from_numpy(x).cuda() for x in (q, k, v)]
        run = lambda: pagedflash.flash_attn(*args, causal=causal)
        sync = torch.cuda.synchronize
    else:
        run = lambda: pagedflash.flash_attn(q, k, v, causal=causal)
        sync = lambda: None
    out = run()
    sync()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t0)
    out = np.asarray(out.float().cpu() if device == "cuda" else out, dtype=np.float64)
    ref = reference.attention(q, k, v, causal=causal)
    err = float(np.max(np.abs(out - ref)))
    if dtype == "float32":  # the tests' float32 rule: 1e-5 relative
        bound = 1e-5 * max(1.0, float(np.max(np.abs(ref))))
        rule = f"float32: at most {bound:.2e}"
    else:  # twice the naive algorithm's own float16 error
        naive16 = _naive_fp16_error(q, k, v, causal, ref)
        bound = 2 * naive16 + 1e-5
        rule = f"naive float16 attention: {naive16:.2e}"
    flops = 4 * batch * heads * seqlen * seqlen * head_dim * (0.5 if causal else 1.0)
    t = min(times)
    print(
        f"\nattention on {device}: batch {batch}, seqlen {seqlen}, heads {heads}/{kv_heads} (q/kv), "
        f"head_dim {head_dim}, causal {causal}, {dtype}"
    )
    print(f"  max |out - ref| = {err:.2e}   ({rule})")
    print(f"  time {t * 1e3:.2f} ms, {flops / t / 1e9:.1f} GFLOP/s")
    ok = err <= bound
    print("  check:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


def _naive_fp16_error(q, k, v, causal, ref) -> float:
    """Error of the naive algorithm in float16 (the yardstick in DESIGN.md): S, P and O are each
    rounded to float16 as a float16 implementation stores them (products accumulate in float32)."""
    b, s, h, d = q.shape
    rep = h // k.shape[2]
    f32 = np.float32
    qt = q.astype(f32).transpose(0, 2, 1, 3)
    kt = np.repeat(k, rep, axis=2).astype(f32).transpose(0, 2, 3, 1)
    vt = np.repeat(v, rep, axis=2).astype(f32).transpose(0, 2, 1, 3)
    sc = (np.matmul(qt, kt) * f32(1 / np.sqrt(d))).astype(np.float16).astype(f32)
    if causal:
        sc = np.where(np.tril(np.ones((s, s), bool))[None, None], sc, -np.inf)
    p = np.exp(sc - sc.max(-1, keepdims=True))
    p = (p / p.sum(-1, keepdims=True)).astype(np.float16).astype(f32)
    o = np.matmul(p, vt).astype(np.float16).transpose(0, 2, 1, 3)
    return float(np.max(np.abs(o.astype(np.float64) - ref)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pagedflash", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("command", nargs="?", default="demo", choices=["demo", "info"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--no-causal", action="store_true")
    ap.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float16", "float32"],
        help="auto: float16 on a GPU, float32 on the CPU",
    )
    a = ap.parse_args(argv)
    if a.command == "info":
        info()
        return 0
    return demo(a.batch, a.seqlen, a.heads, a.kv_heads, a.head_dim, not a.no_causal, a.dtype)


if __name__ == "__main__":
    sys.exit(main())
