#!/usr/bin/env python3
"""Run a GPU benchmark script on a machine without a GPU, to catch a broken script before a GPU
session pays for it. torch.cuda is faked (events read the host clock, graph capture runs the
calls once and replays nothing, streams and NVTX ranges do nothing) and every tensor asked for
on "cuda" is made on the CPU, so pagedflash runs its CPU backend and SDPA its CPU kernels
(CUDNN / EFFICIENT report "no viable backend", which exercises the scripts' fallbacks). Every
code path of the script runs; the numbers mean nothing.

    PYTHONPATH=python python3 benchmarks/cpu_dryrun.py benchmarks/bench_decode.py \\
        --batch 1,2 --ctx 64,200 --heads 4 --kv-heads 2 --dim 64 --rotate-mib 1 --ceiling-gib 0.01 \\
        --pf-kernels 8x8,1x4 --rounds 2
    PYTHONPATH=python python3 benchmarks/cpu_dryrun.py --refuse sm90 benchmarks/bench_attention.py \\
        --tokens 256 --seqlens 64,128 --dims 64 --iters 2 --warmup 1 --kernels auto,sm80,sm90

Options (before the script): --refuse K1,K2 makes pagedflash raise NotImplementedError for those
kernel= values (as a GPU that cannot run them would); --graph-fail makes CUDA-graph capture
fail (the eager fallback); --no-kernel-arg rejects any kernel= argument with TypeError (a build
from before it). Use small shapes: the CPU is slow, and --tokens / --rotate-mib / --ceiling-gib
exist for this.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import runpy
import sys
import time
import types

import torch
from torch.overrides import TorchFunctionMode


def _cpu(device):
    return "cpu" if device is not None and "cuda" in str(device) else device


class CpuForCuda(TorchFunctionMode):
    """device="cuda..." -> "cpu" in every torch function call (factories, .to, ...)."""

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _cpu(kwargs["device"])
        if getattr(func, "__name__", "") == "to" and len(args) > 1 and isinstance(args[1], str):
            args = (args[0], _cpu(args[1]), *args[2:])
        return func(*args, **kwargs)


class _Event:
    def __init__(self, enable_timing=False, **kw):
        self.t = 0.0

    def record(self, stream=None):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3


class _Stream:
    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass


class _Graph:
    def replay(self):
        pass


def fake_cuda(graph_fail: bool) -> None:
    real_generator = torch.Generator
    props = types.SimpleNamespace(
        name="FakeGPU (CPU dry run)", multi_processor_count=132, total_memory=80 << 30, L2_cache_size=50 << 20
    )
    current = _Stream()

    @contextlib.contextmanager
    def graph(g, **kw):
        if graph_fail:
            raise RuntimeError("capture failed (cpu_dryrun --graph-fail)")
        yield

    c = torch.cuda
    c.is_available = lambda: True
    c.device_count = lambda: 1
    c.get_device_properties = lambda device=None: props
    c.get_device_name = lambda device=None: props.name
    c.current_device = lambda: 0
    c.synchronize = lambda device=None: None
    c.Event = _Event
    c.Stream = lambda *a, **kw: _Stream()
    c.stream = lambda s: contextlib.nullcontext()
    c.current_stream = lambda device=None: current
    c.CUDAGraph = _Graph
    c.graph = graph
    c.empty_cache = lambda: None
    c.nvtx = types.SimpleNamespace(range=lambda name: contextlib.nullcontext())
    torch.Generator = lambda device="cpu": real_generator()
    torch.version.cuda = "dry run"


def wrap_pagedflash(refuse: list[str], no_kernel_arg: bool) -> None:
    import pagedflash

    def wrap(fn):
        @functools.wraps(fn)
        def call(*a, **kw):
            if no_kernel_arg and "kernel" in kw:
                raise TypeError(f"{fn.__name__}() got an unexpected keyword argument 'kernel'")
            if kw.get("kernel") in refuse:
                raise NotImplementedError(f"kernel {kw['kernel']} cannot take this call (cpu_dryrun --refuse)")
            return fn(*a, **kw)

        return call

    for name in ("flash_attn", "flash_attn_varlen", "flash_attn_backward", "paged_attn"):
        setattr(pagedflash, name, wrap(getattr(pagedflash, name)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--refuse", default="", help="kernel= values that raise NotImplementedError")
    ap.add_argument("--graph-fail", action="store_true", help="CUDA-graph capture fails")
    ap.add_argument("--no-kernel-arg", action="store_true", help="kernel= raises TypeError (an older build)")
    ap.add_argument("script")
    ap.add_argument("args", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    fake_cuda(a.graph_fail)
    wrap_pagedflash([k for k in a.refuse.split(",") if k], a.no_kernel_arg)
    sys.argv = [a.script, *a.args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(a.script)))
    with CpuForCuda():
        runpy.run_path(a.script, run_name="__main__")


if __name__ == "__main__":
    main()
