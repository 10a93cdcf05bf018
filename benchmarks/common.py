"""The one timing harness of pagedflash's benchmarks, and the provenance line every table carries.

Modelled on llm.c's dev/cuda/common.h ``benchmark_kernel``: warm up, keep the L2 cache from carrying
data between repetitions, repeat, report the median. Every benchmark script imports it (they run as
``python3 benchmarks/<script>.py``, so ``import common`` finds this file; lab files add the folder to
``sys.path`` first). Times are seconds in a :class:`Timing`.

GPU (torch CUDA tensors; torch is imported only by these functions)
    gpu_time(fn, warmup=5, iters=30, flush_l2=True)
        CUDA events around each call, the L2 cache flushed before each call (outside the timed
        region), median and percentiles of the per-call times.
    capture(fns) -> Runner
        the calls (one per input set) captured in one CUDA graph, replayed as one unit; eager
        launches when capture fails. For calls of a few microseconds, where launch overhead and
        the host would otherwise be measured.
    time_in_turns(runners, rounds=7) -> [Timing]
        several candidates' runners timed in turns: every round times each once, so clock or
        thermal drift during the measurement affects all candidates alike.
    cold_l2_sets(bytes_per_set)
        how many input sets to rotate through so that a call never finds its data in L2
        ("cold L2" without a flush, for captured graphs).
CPU (time.perf_counter_ns)
    cpu_time(fn, warmup=1, repeats=5, min_time=0.0)
    cpu_time_in_turns(fns, ...) -> [Timing]    candidates alternate, one call each per round
    steps_in_turns(steppers, every=...)        stateful steps that time their own phases
Provenance
    provenance_line(device, commit) -> "Device: ...; date: ...; commit: ...; pagedflash ...; torch ...;
    numpy ...; python ..."; the commit is --commit, else $PAGEDFLASH_COMMIT, else the git commit
    of the imported pagedflash's source tree (with "-dirty" for uncommitted changes), else
    "unknown".
Output
    markdown_table(header, rows), fmt(x), write_report(text, path)
Kernel variants
    kernel_kwargs(name), check_kernels(op, names): the ``kernel=`` hint of the Python API.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

clock_ns = time.perf_counter_ns  # the one CPU clock

# -------------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class Timing:
    """Per-call times in seconds, in the order they were taken."""

    samples: tuple[float, ...]

    @classmethod
    def from_ns(cls, samples_ns: Iterable[int]) -> Timing:
        return cls(tuple(x * 1e-9 for x in samples_ns))

    def percentile(self, q: float) -> float:
        return float(np.percentile(np.asarray(self.samples, dtype=np.float64), q))

    @property
    def median(self) -> float:
        return self.percentile(50)

    @property
    def p10(self) -> float:
        return self.percentile(10)

    @property
    def p90(self) -> float:
        return self.percentile(90)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def ms(self) -> float:
        return self.median * 1e3

    @property
    def us(self) -> float:
        return self.median * 1e6

    def rate(self, amount: float) -> float:
        """amount / median time (FLOPs -> FLOP/s, bytes -> bytes/s)."""
        return amount / self.median


# -------------------------------------------------------------------------------------------------
# GPU timing


def _torch() -> Any:
    import torch

    return torch


def require_cuda(what: str = "this benchmark") -> None:
    """Exit with a message (status 1) where torch has no CUDA device."""
    try:
        import torch
    except ImportError:
        sys.exit(f"{what} needs torch with CUDA; torch is not installed")
    if not torch.cuda.is_available():
        sys.exit(f"{what} needs a CUDA GPU and torch built with CUDA (torch {torch.__version__} sees none)")


_flush_buffers: dict[int, Any] = {}


def flush_l2() -> None:
    """Evict the current device's L2 cache: write a buffer of twice its size (enqueued on the current
    stream, so it runs between the previous call and the next one, outside their events)."""
    torch = _torch()
    dev = torch.cuda.current_device()
    buf = _flush_buffers.get(dev)
    if buf is None:
        l2 = int(getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0) or 0) or 64 << 20
        buf = _flush_buffers[dev] = torch.empty(max(2 * l2, 32 << 20), dtype=torch.uint8, device=f"cuda:{dev}")
    buf.zero_()


def gpu_time(
    fn: Callable[[], object],
    *,
    warmup: int = 5,
    iters: int = 30,
    flush_l2_between: bool = True,
    min_time: float = 0.0,
    max_iters: int = 10_000,
) -> Timing:
    """Per-call GPU times of fn(): `warmup` untimed calls, then `iters` calls each between two CUDA
    events on the current stream, the L2 cache flushed before each (flush_l2_between). With
    min_time > 0, as many calls as fill min_time seconds (estimated from one timed call), at least
    `iters` and at most max_iters. fn may launch several kernels; all are in the timed region."""
    torch = _torch()
    for _ in range(warmup):
        fn()
    if min_time > 0:
        st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        st.record()
        fn()
        en.record()
        en.synchronize()
        one = max(st.elapsed_time(en) * 1e-3, 1e-7)
        iters = max(iters, min(max_iters, math.ceil(min_time / one)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends):
        if flush_l2_between:
            flush_l2()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return Timing(tuple(s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends)))


class Runner(NamedTuple):
    """run() performs `calls` calls (a CUDA graph replay, or eager launches); graph is False for the
    eager fallback."""

    run: Callable[[], object]
    calls: int
    graph: bool


def capture(fns: Sequence[Callable[[], object]]) -> Runner:
    """The calls fns (typically one per input set) captured in one CUDA graph. Each fn runs a few
    times on a side stream first (allocator and library warm-up, as torch.cuda.graphs requires);
    where capture fails the runner launches them eagerly, and says so on stderr. Exceptions the fns
    raise before capture (e.g. NotImplementedError for a kernel that cannot take the call)
    propagate."""
    torch = _torch()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in list(fns[:2]) * 2:
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for f in fns:
                f()
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - report and fall back to eager launches
        print(f"  (graph capture failed: {type(e).__name__}: {str(e)[:80]}; timing eagerly)", file=sys.stderr)
        torch.cuda.synchronize()

        def eager() -> None:
            for f in fns:
                f()

        return Runner(eager, len(fns), False)
    return Runner(g.replay, len(fns), True)


def time_in_turns(
    runners: Sequence[Runner],
    *,
    rounds: int = 7,
    warmup_s: float = 0.05,
    round_s: float = 2e-3,
    max_inner: int = 50,
) -> list[Timing]:
    """Seconds per call of each runner, the runners taking turns: every round times each of them
    once (repeating its run() to fill about round_s, at most max_inner times), so a clock or
    thermal drift during the measurement affects all candidates alike instead of whichever ran
    first. Warm-up: all runners in turn for warmup_s of wall time, not one call, because after
    the host-side setup of a point the GPU has idled and its clocks ramp up over milliseconds
    (one warm call left the first candidate timed up to 13% slow, e.g. paged decode at batch
    128 / 4k: 561 vs 497 us for the same kernel, H200). The samples are one per round."""
    torch = _torch()
    warm_until = time.perf_counter() + warmup_s
    while True:
        for r in runners:
            r.run()
        torch.cuda.synchronize()
        if time.perf_counter() >= warm_until:
            break
    st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    inners = []
    for r in runners:
        st.record()
        r.run()
        en.record()
        en.synchronize()
        one = max(st.elapsed_time(en) * 1e-3, 1e-6)
        inners.append(max(1, min(max_inner, int(round_s / one))))
    times: list[list[float]] = [[] for _ in runners]
    for _ in range(rounds):
        for k, r in enumerate(runners):
            st.record()
            for _ in range(inners[k]):
                r.run()
            en.record()
            en.synchronize()
            times[k].append(st.elapsed_time(en) * 1e-3 / (inners[k] * r.calls))
    return [Timing(tuple(t)) for t in times]


def time_graph(fns: Sequence[Callable[[], object]], *, rounds: int = 7) -> Timing:
    """Seconds per call of fns (one per input set), captured in one CUDA graph and replayed."""
    return time_in_turns([capture(fns)], rounds=rounds)[0]


L2_ROTATE_BYTES = 512 << 20  # > 10x the L2 of an H100 / H200 (50 / 60 MB)


def cold_l2_sets(bytes_per_set: int, rotate_bytes: int = L2_ROTATE_BYTES) -> int:
    """Input sets to rotate through so that, together, they exceed the L2 cache by a wide margin:
    every call then reads its inputs from memory (what a decode step inside a model sees)."""
    return max(1, math.ceil(rotate_bytes / max(1, bytes_per_set)))


# -------------------------------------------------------------------------------------------------
# CPU timing


def cpu_time_in_turns(
    fns: Sequence[Callable[[], object]],
    *,
    warmup: int = 1,
    repeats: int = 5,
    min_time: float = 0.0,
    max_repeats: int = 50,
) -> list[Timing]:
    """Wall time (perf_counter_ns) per call of each fn, the candidates alternating: every round
    calls each once. `warmup` untimed rounds first; then at least `repeats` rounds, more until each
    candidate has run for min_time seconds in total, at most max_repeats rounds."""
    for _ in range(warmup):
        for f in fns:
            f()
    samples: list[list[int]] = [[] for _ in fns]
    spent = [0] * len(fns)
    rounds = 0
    while rounds < max(1, repeats) or (min(spent) < min_time * 1e9 and rounds < max_repeats):
        for i, f in enumerate(fns):
            t0 = clock_ns()
            f()
            dt = clock_ns() - t0
            samples[i].append(dt)
            spent[i] += dt
        rounds += 1
    return [Timing.from_ns(s) for s in samples]


def cpu_time(fn: Callable[[], object], **kw: Any) -> Timing:
    """cpu_time_in_turns for one candidate."""
    return cpu_time_in_turns([fn], **kw)[0]


@dataclass
class Stepper:
    """A candidate of steps_in_turns: step() performs one step of a stateful workload and returns
    the nanoseconds of its phases, timed by itself with clock_ns(); reset() (untimed) runs before
    every `every`-th step."""

    name: str
    step: Callable[[], Mapping[str, int]]
    steps: int
    warmup: int
    reset: Optional[Callable[[], None]] = None


def steps_in_turns(steppers: Sequence[Stepper], *, every: int) -> list[list[Mapping[str, int]]]:
    """Each stepper's warmup + steps steps, the steppers taking turns in chunks of `every` steps
    (reset() at each chunk boundary but the first). Returns the timed steps' phase times per
    stepper (warm-up steps dropped)."""
    done = [0] * len(steppers)
    out: list[list[Mapping[str, int]]] = [[] for _ in steppers]
    while any(d < s.warmup + s.steps for d, s in zip(done, steppers)):
        for k, s in enumerate(steppers):
            total = s.warmup + s.steps
            for _ in range(every):
                i = done[k]
                if i >= total:
                    break
                if i and i % every == 0 and s.reset is not None:
                    s.reset()
                t = s.step()
                if i >= s.warmup:
                    out[k].append(t)
                done[k] = i + 1
    return out


# -------------------------------------------------------------------------------------------------
# provenance


def _git(args: Sequence[str], cwd: Path) -> Optional[str]:
    try:
        r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def git_commit(path: Path) -> Optional[str]:
    """Short commit of the git tree holding path, "-dirty" appended when tracked files differ from
    it; None outside a git tree (or without git)."""
    sha = _git(["rev-parse", "--short", "HEAD"], path)
    if not sha:
        return None
    dirty = _git(["status", "--porcelain", "--untracked-files=no"], path)
    return sha + ("-dirty" if dirty else "")


def _package_dir() -> Optional[Path]:
    mod = sys.modules.get("pagedflash")
    f = getattr(mod, "__file__", None)
    return Path(f).resolve().parent if f else None


def commit(explicit: Optional[str] = None) -> str:
    """The commit to record: `explicit` (--commit), else $PAGEDFLASH_COMMIT, else the git commit
    of the imported pagedflash's source tree (it may be another checkout than these benchmarks';
    then the benchmarks' own commit is added), else "unknown". On a machine that received a copy
    of the tree, set PAGEDFLASH_COMMIT: a copied .git may describe another commit."""
    if explicit:
        return explicit
    env = os.environ.get("PAGEDFLASH_COMMIT", "").strip()
    if env:
        return env
    mine = git_commit(HERE)
    pkg = _package_dir()
    theirs = git_commit(pkg) if pkg is not None else None
    if theirs and mine and theirs != mine:
        return f"{theirs} (benchmarks at {mine})"
    return theirs or mine or "unknown"


_ISA_FLAGS = (  # the SIMD extensions that matter to the CPU kernels (x86, then Arm)
    "avx2 fma f16c avx512f avx512bw avx512vl avx512_vnni avx512_bf16 avx512_fp16 amx_tile amx_bf16 "
    "asimd asimdhp sve sve2 bf16 i8mm"
).split()


def cpu_description() -> str:
    """CPU model, core count and the SIMD extensions that matter to the CPU kernels."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model") and not model:
                    model = val.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(val.split())
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    isa = " ".join(f for f in _ISA_FLAGS if f in flags)
    return f"{model}, {os.cpu_count()} cores" + (f" ({isa})" if isa else "")


def gpu_description() -> str:
    torch = _torch()
    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    return f"{p.name} ({p.multi_processor_count} SMs / {p.total_memory / 2**30:.0f} GiB)"


def _version(dist: str) -> Optional[str]:
    mod = sys.modules.get(dist)
    v = getattr(mod, "__version__", None)
    if v:
        return str(v)
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def provenance_line(device: str = "cpu", commit_arg: Optional[str] = None) -> str:
    """The line every results table carries: "Device: <GPU name (SMs, memory) | CPU model, cores
    (ISA)>; date: <UTC>; commit: <commit>; pagedflash <v>; torch <v> (CUDA <v>); numpy <v>; python
    <v>". device: "cuda" or "cpu"."""
    dev = gpu_description() if device == "cuda" else cpu_description()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"Device: {dev}", f"date: {date}", f"commit: {commit(commit_arg)}"]
    pf = _version("pagedflash")
    if pf:
        parts.append(f"pagedflash {pf}")
    tv = _version("torch")
    if tv:
        cuda = getattr(getattr(sys.modules.get("torch"), "version", None), "cuda", None)
        parts.append(f"torch {tv}" + (f" (CUDA {cuda})" if cuda and device == "cuda" else ""))
    parts.append(f"numpy {np.__version__}")
    parts.append(f"python {platform.python_version()}")
    return "; ".join(parts)


def add_common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--commit",
        default=None,
        help="commit to record in the table's header (default: $PAGEDFLASH_COMMIT, else git of the "
        "imported pagedflash's tree, else 'unknown')",
    )


# -------------------------------------------------------------------------------------------------
# kernel variants (the kernel= hint of the Python API)


def parse_list(text: str) -> list[str]:
    """'a,b, c' -> ['a', 'b', 'c'] without empty items or repeats, in order."""
    out: list[str] = []
    for x in text.split(","):
        x = x.strip()
        if x and x not in out:
            out.append(x)
    return out


def kernel_kwargs(name: str) -> dict[str, str]:
    """The keyword arguments that select kernel `name`: none at all for "auto" (so that the default
    invocation of a benchmark also runs against a build that predates the kernel= argument)."""
    return {} if name == "auto" else {"kernel": name}


def check_kernels(op: str, names: Sequence[str]) -> None:
    """Exit with a message unless this build's `op` ("flash" or "paged") accepts every kernel name:
    one tiny call on the CPU each (the CPU backend validates the hint, then ignores it), so a typo
    costs nothing on a GPU machine."""
    import pagedflash

    for name in names:
        if name == "auto":
            continue
        try:
            if op == "flash":
                x = np.ones((1, 1, 1, 8), np.float32)
                pagedflash.flash_attn(x, x, x, kernel=name)
            else:
                q = np.ones((1, 1, 8), np.float32)
                kc = np.ones((1, 16, 1, 8), np.float32)
                pagedflash.paged_attn(q, kc, kc, np.zeros((1, 1), np.int32), np.ones((1,), np.int32), kernel=name)
        except NotImplementedError:
            pass  # a name the build knows, not for this (CPU) call: fine, the GPU call decides
        except TypeError as e:
            sys.exit(f"kernel {name!r}: this pagedflash build takes no kernel= argument ({e})")
        except ValueError as e:
            sys.exit(f"kernel {name!r}: {e}")


# -------------------------------------------------------------------------------------------------
# output


def fmt(x: object, nd: int = 1) -> str:
    """A table cell: None -> '-', floats with nd decimals (nan stays 'nan'), anything else str()."""
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}" if x == x else "nan"
    return str(x)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]], align: Optional[str] = None) -> str:
    """A markdown table; cells through str() (format them first); align: one of 'l', 'r' per
    column (default: markdown's default alignment, '---')."""
    sep = [{"r": "---:", "l": ":---"}.get(a, "---") for a in align] if align else ["---"] * len(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(sep) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_report(text: str, path: Optional[str]) -> None:
    """Print the report and, with a path, write it there (creating the folder)."""
    print()
    print(text)
    if path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        print(f"written to {p}")
