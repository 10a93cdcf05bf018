"""Per-call host time of pagedflash's Python entry points against what a user would call instead.

What a user of an eager model waits for is the host time of each call: a decode step of a
32-layer model calls attention 32 times, and at small batch the GPU finishes each kernel long
before Python has launched the next one. This measures it the way issue 13 states it: N tiny
calls back to back, then one synchronize; the time per call is the total over N. Candidates take
turns (every round times each once), the median round is reported.

GPU (torch CUDA tensors, --device cuda): pagedflash.flash_attn, paged_attn (decode),
write_kv_cache, merge_attn_states and the differentiable pagedflash.torch.flash_attn (forward +
backward) against SDPA's flash and cuDNN backends (forward; forward + backward), FlashInfer's
decode wrapper where installed, and an empty torch kernel (x.add_(1) on one element) as the floor.
Each is also captured in a CUDA graph and replayed: the kernel alone, without the host.

CPU (--device cpu): the same pagedflash calls on NumPy and on torch CPU tensors against np.add on
the same tiny arrays, and the core alone: benchmarks/overhead_core.c calls the C API
(pf_flash_fwd, pf_paged_attn, ...) on the same shapes in a loop, so "host overhead" = the Python
call minus the core's own time.

    python3 benchmarks/bench_overhead.py --device cuda --out benchmarks/results/overhead_h100.md
    python3 benchmarks/bench_overhead.py --device cpu
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

import common

ROOT = common.ROOT

# One decode token / one short prefill: the "tiny calls" of issue 13. On the GPU a model's shapes
# (the kernels take a few microseconds); on the CPU smaller ones, so that the core's own time does
# not drown the host time being measured (--cpu-shapes gpu uses the GPU's).
B, H, HK, D = 1, 8, 8, 64
SQ = 16  # prefill query (and key) length
CTX = 256  # decode context
BLOCK = 16
NUM_BLOCKS = 64
CPU_TINY = dict(H=2, HK=2, D=16, SQ=4, CTX=32)


def use_shapes(**kw: int) -> None:
    globals().update(kw)


def per_call(fns: list[Callable[[], object]], *, calls: int, rounds: int, sync: Callable[[], None]) -> list[float]:
    """Seconds per call of each fn: `calls` back-to-back calls then sync(), candidates in turns,
    median over rounds."""
    for f in fns:  # warm-up (allocator, first-call caches, lazy imports)
        for _ in range(min(calls, 200)):
            f()
        sync()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for i, f in enumerate(fns):
            sync()
            t0 = common.clock_ns()
            for _ in range(calls):
                f()
            sync()
            samples[i].append((common.clock_ns() - t0) * 1e-9 / calls)
    return [float(np.median(s)) for s in samples]


# -------------------------------------------------------------------------------------------------
# cases: name -> (pagedflash call, [alternatives]) built on one library's tensors


def _rand(lib: str, shape, dtype, device: str, rng) -> Any:
    x = rng.standard_normal(shape).astype(np.float32)
    if lib == "numpy":
        return x.astype(dtype)
    import torch

    return torch.from_numpy(x).to(device=device, dtype=getattr(torch, dtype))


def _ints(lib: str, values, device: str, dtype=np.int32) -> Any:
    a = np.asarray(values, dtype=dtype)
    if lib == "numpy":
        return a
    import torch

    return torch.from_numpy(a).to(device)


def build_cases(lib: str, device: str, dtype: str) -> dict[str, Callable[[], object]]:
    """The pagedflash calls of the table, on `lib` tensors ("numpy" or "torch") on `device`."""
    import pagedflash

    rng = np.random.default_rng(0)
    q = _rand(lib, (B, SQ, H, D), dtype, device, rng)
    k = _rand(lib, (B, SQ, HK, D), dtype, device, rng)
    v = _rand(lib, (B, SQ, HK, D), dtype, device, rng)
    out = _rand(lib, (B, SQ, H, D), dtype, device, rng)
    qd = _rand(lib, (B, H, D), dtype, device, rng)
    kc = _rand(lib, (NUM_BLOCKS, BLOCK, HK, D), dtype, device, rng)
    vc = _rand(lib, (NUM_BLOCKS, BLOCK, HK, D), dtype, device, rng)
    bt = _ints(lib, np.arange(CTX // BLOCK).reshape(1, -1), device)
    sl = _ints(lib, [CTX], device)
    kn = _rand(lib, (B, HK, D), dtype, device, rng)
    slots = _ints(lib, [CTX - 1], device, np.int64)
    oa = _rand(lib, (B, H, D), dtype, device, rng)
    ob = _rand(lib, (B, H, D), dtype, device, rng)
    la = _rand(lib, (H, B), "float32", device, rng)
    lb = _rand(lib, (H, B), "float32", device, rng)
    out_m = _rand(lib, (B, H, D), dtype, device, rng)
    lse_m = _rand(lib, (H, B), "float32", device, rng)
    return {
        f"flash_attn (prefill {SQ})": lambda: pagedflash.flash_attn(q, k, v, causal=True),
        "flash_attn, out= given": lambda: pagedflash.flash_attn(q, k, v, causal=True, out=out),
        f"paged_attn (decode {CTX})": lambda: pagedflash.paged_attn(qd, kc, vc, bt, sl),
        "write_kv_cache (1 token)": lambda: pagedflash.write_kv_cache(kn, kn, kc, vc, slots),
        "merge_attn_states": lambda: pagedflash.merge_attn_states(oa, la, ob, lb),
        "merge_attn_states, out= given": lambda: pagedflash.merge_attn_states(oa, la, ob, lb, out=out_m, out_lse=lse_m),
    }


# -------------------------------------------------------------------------------------------------
# GPU


def gpu_rows(dtype: str, calls: int, rounds: int) -> tuple[list[list[str]], list[str]]:
    common.require_cuda("bench_overhead --device cuda")
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import pagedflash.torch as pft

    tdt = getattr(torch, dtype)
    dev = "cuda"
    sync = torch.cuda.synchronize
    notes: list[str] = []
    ours = build_cases("torch", dev, dtype)

    # SDPA takes [batch, heads, seq, dim]
    qs = torch.randn(B, H, SQ, D, device=dev, dtype=tdt)
    ks = torch.randn(B, HK, SQ, D, device=dev, dtype=tdt)
    vs = torch.randn(B, HK, SQ, D, device=dev, dtype=tdt)
    qdec = torch.randn(B, H, 1, D, device=dev, dtype=tdt)
    kdec = torch.randn(B, HK, CTX, D, device=dev, dtype=tdt)
    vdec = torch.randn(B, HK, CTX, D, device=dev, dtype=tdt)
    one = torch.ones(1, device=dev)

    candidates: dict[str, Callable[[], object]] = dict(ours)
    candidates["empty torch kernel (x.add_(1))"] = lambda: one.add_(1)
    # SDPA's candidates, each with its backend pinned around its timed loop (entered once per loop,
    # as a model sets the backend once, not per call)
    pins: dict[str, Any] = {}

    def add_sdpa(name: str, backend: Any, call: Callable[[], object]) -> None:
        try:
            with sdpa_kernel(backend):
                call()
            sync()
        except RuntimeError as e:
            notes.append(f"{name}: not available here ({str(e).splitlines()[0][:80]})")
            return
        candidates[name], pins[name] = call, backend

    add_sdpa(
        "SDPA flash (prefill 16)",
        SDPBackend.FLASH_ATTENTION,
        lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True),
    )
    add_sdpa(
        "SDPA cuDNN (prefill 16)",
        SDPBackend.CUDNN_ATTENTION,
        lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True),
    )
    add_sdpa(
        "SDPA cuDNN (decode 256)", SDPBackend.CUDNN_ATTENTION, lambda: F.scaled_dot_product_attention(qdec, kdec, vdec)
    )
    add_sdpa(
        "SDPA flash (decode 256)", SDPBackend.FLASH_ATTENTION, lambda: F.scaled_dot_product_attention(qdec, kdec, vdec)
    )

    # autograd: forward + backward of one tiny causal attention
    qg = torch.randn(B, SQ, H, D, device=dev, dtype=tdt, requires_grad=True)
    kg = torch.randn(B, SQ, HK, D, device=dev, dtype=tdt, requires_grad=True)
    vg = torch.randn(B, SQ, HK, D, device=dev, dtype=tdt, requires_grad=True)
    qsg, ksg, vsg = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (qg, kg, vg))
    dout = torch.randn(B, SQ, H, D, device=dev, dtype=tdt)
    douts = dout.transpose(1, 2).contiguous()
    candidates["pagedflash.torch.flash_attn fwd+bwd"] = lambda: pft.flash_attn(qg, kg, vg, causal=True).backward(dout)
    add_sdpa(
        "SDPA flash fwd+bwd",
        SDPBackend.FLASH_ATTENTION,
        lambda: F.scaled_dot_product_attention(qsg, ksg, vsg, is_causal=True).backward(douts),
    )
    add_sdpa(
        "SDPA cuDNN fwd+bwd",
        SDPBackend.CUDNN_ATTENTION,
        lambda: F.scaled_dot_product_attention(qsg, ksg, vsg, is_causal=True).backward(douts),
    )

    fi = _flashinfer_decode(qd_shape=(B, H, D), dtype=tdt, notes=notes)
    if fi is not None:
        candidates["FlashInfer decode run (256)"] = fi

    names = list(candidates)

    def pinned(n: str) -> contextlib.AbstractContextManager:
        return sdpa_kernel(pins[n]) if n in pins else contextlib.nullcontext()

    eager = _per_call_pinned(
        [(candidates[n], lambda n=n: pinned(n)) for n in names], calls=calls, rounds=rounds, sync=sync
    )
    graph: dict[str, Optional[float]] = {}
    for n in names:
        if "fwd+bwd" in n:
            graph[n] = None  # autograd calls are not captured here
            continue

        def f(call=candidates[n], n=n):  # the pin around each captured call: host work, not in a replay
            with pinned(n):
                return call()

        try:
            graph[n] = common.time_graph([f] * 20, rounds=5).median
        except Exception as e:  # noqa: BLE001 - a candidate that cannot be captured shows '-'
            notes.append(f"{n}: graph capture failed ({type(e).__name__})")
            graph[n] = None
    ref = {
        "flash_attn (prefill 16)": "SDPA flash (prefill 16)",
        "flash_attn, out= given": "SDPA flash (prefill 16)",
        "paged_attn (decode 256)": "SDPA cuDNN (decode 256)",
        "write_kv_cache (1 token)": "SDPA flash (prefill 16)",
        "merge_attn_states": "SDPA flash (prefill 16)",
        "merge_attn_states, out= given": "SDPA flash (prefill 16)",
        "pagedflash.torch.flash_attn fwd+bwd": "SDPA flash fwd+bwd",
    }
    t = dict(zip(names, eager))
    rows: list[list[str]] = []
    for n in names:
        r = ref.get(n)
        ratio = f"{t[n] / t[r]:.2f}x {r}" if r in t else ""
        g = graph[n]
        rows.append([n, common.fmt(t[n] * 1e6), common.fmt(g * 1e6 if g else None), ratio])
    return rows, notes


def _per_call_pinned(fns, *, calls: int, rounds: int, sync) -> list[float]:
    """per_call of (fn, context factory) pairs, each fn's loop of `calls` calls inside a context
    from its factory (SDPA's backend pin: entered once per loop)."""

    def looped(f, ctx):
        def run():
            with ctx():
                for _ in range(calls):
                    f()

        return run

    per = per_call([looped(f, ctx) for f, ctx in fns], calls=1, rounds=rounds, sync=sync)
    return [x / calls for x in per]


def _flashinfer_decode(qd_shape, dtype, notes: list[str]) -> Optional[Callable[[], object]]:
    try:
        import flashinfer  # type: ignore[import-not-found]
        import torch
    except ImportError:
        notes.append("FlashInfer: not installed on this machine")
        return None
    try:
        ws = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
        nblk = CTX // BLOCK
        w.plan(
            torch.tensor([0, nblk], dtype=torch.int32, device="cuda"),
            torch.arange(nblk, dtype=torch.int32, device="cuda"),
            torch.tensor([BLOCK], dtype=torch.int32, device="cuda"),
            H,
            HK,
            D,
            BLOCK,
            q_data_type=dtype,
            kv_data_type=dtype,
        )
        q = torch.randn(*qd_shape, device="cuda", dtype=dtype)
        kv = torch.randn(NUM_BLOCKS, 2, BLOCK, HK, D, device="cuda", dtype=dtype)
        w.run(q, kv)
        return lambda: w.run(q, kv)
    except Exception as e:  # noqa: BLE001
        notes.append(f"FlashInfer: failed ({type(e).__name__}: {str(e)[:60]})")
        return None


# -------------------------------------------------------------------------------------------------
# CPU


def core_times(dtype: str, calls: int) -> dict[str, float]:
    """Seconds per call of the C core alone (benchmarks/overhead_core.c, the C sources compiled
    without Python), keyed like build_cases; {} without a C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return {}
    sources = sorted(str(p) for d in ("csrc/core", "csrc/cpu") for p in (ROOT / d).glob("*.c"))
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "overhead_core"
        cmd = [cc, "-std=c11", "-O2", "-pthread", "-march=native", "-Wno-psabi"]
        cmd += ["-I", str(ROOT / "csrc/include"), "-I", str(ROOT / "csrc/core"), "-I", str(ROOT / "csrc/cpu")]
        cmd += [str(ROOT / "benchmarks/overhead_core.c"), *sources, "-o", str(exe), "-lm"]
        subprocess.run(cmd, check=True)
        res = subprocess.run(
            [str(exe), dtype, str(calls), str(B), str(H), str(HK), str(D), str(SQ), str(CTX), str(BLOCK)],
            check=True,
            capture_output=True,
            text=True,
        )
    out: dict[str, float] = {}
    for line in res.stdout.splitlines():
        name, _, ns = line.rpartition(" ")
        out[name.strip()] = float(ns) * 1e-9
    return out


def cpu_rows(dtype: str, calls: int, rounds: int) -> tuple[list[list[str]], list[str]]:
    import pagedflash

    pagedflash.set_num_threads(1)  # tiny calls run on one thread; the core loop below does too
    notes = ["one thread (set_num_threads(1)); core = the C API called in a loop from C"]
    core = core_times(dtype, calls)
    a = np.ones((B, SQ, H, D), np.float32)
    b = np.ones((B, SQ, H, D), np.float32)
    c = np.empty_like(a)
    fns: dict[str, Callable[[], object]] = {"np.add(a, b, out=c) (same size as q)": lambda: np.add(a, b, out=c)}
    libs = ["numpy"]
    try:
        import torch  # noqa: F401

        libs.append("torch")
    except ImportError:
        notes.append("torch not installed: NumPy only")
    for lib in libs:
        for n, f in build_cases(lib, "cpu", dtype).items():
            fns[f"{n} [{lib}]"] = f
    names = list(fns)
    times = dict(zip(names, per_call([fns[n] for n in names], calls=calls, rounds=rounds, sync=lambda: None)))
    add = times[names[0]]
    rows = []
    for n in names:
        base = n.rsplit(" [", 1)[0]
        k = core.get(base)
        over = times[n] - k if k is not None else None
        bound = 2 * (add + k) if k is not None else None
        verdict = "" if bound is None else ("ok" if times[n] <= bound else "over")
        rows.append(
            [
                n,
                common.fmt(times[n] * 1e6, 2),
                common.fmt(k * 1e6 if k is not None else None, 2),
                common.fmt(over * 1e6 if over is not None else None, 2),
                common.fmt(bound * 1e6 if bound is not None else None, 2),
                verdict,
            ]
        )
    return rows, notes


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--dtype", default=None, help="float16 (cuda default) / float32 (cpu default)")
    ap.add_argument("--calls", type=int, default=2000, help="back-to-back calls per timed round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=None, help="also write the markdown report here")
    common.add_common_args(ap)
    ap.add_argument("--cpu-shapes", choices=("tiny", "gpu"), default="tiny", help="shapes of the CPU table")
    args = ap.parse_args(argv)
    if args.device == "cpu" and args.cpu_shapes == "tiny":
        use_shapes(**CPU_TINY)
    dtype = args.dtype or ("float16" if args.device == "cuda" else "float32")
    shapes = (
        f"batch {B}, {H} heads ({HK} KV heads), head_dim {D}, {dtype}; prefill: {SQ} queries and keys, "
        f"causal; decode: 1 query over {CTX} cached tokens in blocks of {BLOCK}"
    )
    if args.device == "cuda":
        rows, notes = gpu_rows(dtype, args.calls, args.rounds)
        header = ["call", "eager us/call", "CUDA graph us/call", "eager vs"]
        what = (
            f"{args.calls} eager calls back to back then one synchronize, per call, median of "
            f"{args.rounds} rounds (candidates in turns); CUDA graph: 20 calls captured, replayed"
        )
    else:
        rows, notes = cpu_rows(dtype, args.calls, args.rounds)
        header = ["call", "us/call", "core us/call", "host overhead us", "bound 2x(np.add + core)", ""]
        what = f"{args.calls} calls back to back, per call, median of {args.rounds} rounds (in turns)"
    text = "\n".join(
        [
            f"### Per-call host time ({args.device})",
            "",
            common.provenance_line(args.device, args.commit),
            "",
            f"Shapes: {shapes}. {what}.",
            "",
            common.markdown_table(header, rows),
            "",
            *[f"- {n}" for n in notes],
        ]
    )
    common.write_report(text, args.out)


if __name__ == "__main__":
    main()
