"""The process that runs the fuzz cases of tests/test_fuzz.py, and the parent's handle on it.

A case is a plain description (dicts, lists, numbers, strings: picklable, printable, built by
the hypothesis strategies of test_fuzz.py); this module turns it into real arguments -- views
of buffers it allocates, in NumPy, torch, pagedflash.Tensor, plain lists, hand-built DLPack
capsules or array interfaces (tests/producers.py), some of them lying about their fields --
calls the public function and judges the outcome:

  - the call returns, or raises ValueError, TypeError, NotImplementedError,
    pagedflash.OutOfBlocks or pagedflash.CudaError; any other exception is a failure;
  - a failed call changed nothing: every buffer behind every argument (inputs, outputs,
    caches) is bitwise what it was (NaN-aware: the bytes are compared); a successful call
    changed only the buffers behind its outputs; a given output of an attention call with
    finite inputs holds no NaN afterwards (outputs start as NaN: an unwritten element shows);
  - every DLPack capsule a hand-built producer exported was deleted exactly once;
  - BlockManager: a failed method leaves `snapshot()` (and any `out=` array) as it was,
    queries change nothing, and `check()` holds after every call.

Cases reach the worker over a pipe (`Worker.run(case)` in the parent): one persistent
process for all of them, so a segmentation fault or an abort kills the worker, not the test
run; the parent reports the case that killed it, with the signal and the end of its stderr,
and starts a new worker for the next case. `python tests/fuzz_worker.py --serve` is the
worker's entry point; `run_case(case)` runs one case in the current process (to reproduce a
failure under a debugger).
"""

from __future__ import annotations

import math
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

# ---------------------------------------------------------------------------
# the parent's side
# ---------------------------------------------------------------------------


def _send(f, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(struct.pack("<Q", len(data)) + data)
    f.flush()


def _read_exact(fd: int, n: int, deadline: float) -> bytes:
    chunks, got = [], 0
    while got < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            raise TimeoutError
        chunk = os.read(fd, n - got)
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


class Worker:
    """A persistent worker process (`--serve`), restarted after a crash or a hang."""

    def __init__(self, timeout: float = 60.0):
        self.timeout = timeout
        self.proc = None
        self.crashes = 0
        self.started = 0
        self._stderr = None

    def _start(self) -> None:
        env = dict(os.environ)
        # the worker imports the pagedflash this process imported (an installed package in CI, the
        # in-tree build in a checkout); the source tree's python/ only when none is imported yet
        pf = sys.modules.get("pagedflash")
        pf_file = getattr(pf, "__file__", None)
        python_dir = (
            os.path.dirname(os.path.dirname(os.path.abspath(pf_file)))
            if pf_file
            else os.path.join(os.path.dirname(HERE), "python")
        )
        env["PYTHONPATH"] = os.pathsep.join([python_dir, HERE] + [p for p in [env.get("PYTHONPATH")] if p])
        env.setdefault("PYTHONFAULTHANDLER", "1")
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "fuzz_worker.py"), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
        )
        self.started += 1

    def _stderr_tail(self, n: int = 3000) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        data = self._stderr.read()
        return data[-n:].decode("utf-8", "replace")

    def _kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            for f in (self.proc.stdin, self.proc.stdout):
                try:
                    f.close()
                except OSError:
                    pass
        self.proc = None

    def run(self, case) -> dict:
        """The verdict on one case: {"status": "ok" | "raised" | "fail" | "crash" | "hang", ...}."""
        if self.proc is None or self.proc.poll() is not None:
            self._kill()
            self._start()
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        deadline = time.monotonic() + self.timeout
        try:
            _send(self.proc.stdin, case)
            fd = self.proc.stdout.fileno()
            (n,) = struct.unpack("<Q", _read_exact(fd, 8, deadline))
            return pickle.loads(_read_exact(fd, n, deadline))
        except TimeoutError:
            tail = self._stderr_tail()
            self._kill()
            self.crashes += 1
            return {"status": "hang", "why": f"no answer within {self.timeout:.0f} s", "stderr": tail}
        except (EOFError, BrokenPipeError, OSError):
            self.proc.wait()
            rc = self.proc.returncode
            tail = self._stderr_tail()
            self._kill()
            self.crashes += 1
            sig = -rc if rc is not None and rc < 0 else None
            name = signal.Signals(sig).name if sig else f"exit status {rc}"
            return {"status": "crash", "why": f"the worker died ({name})", "stderr": tail}

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                _send(self.proc.stdin, None)
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self._kill()


# ---------------------------------------------------------------------------
# the worker's side: building arguments
# ---------------------------------------------------------------------------

NP_DTYPES = {
    "float32": np.float32,
    "float16": np.float16,
    "float64": np.float64,
    "int32": np.int32,
    "int64": np.int64,
    "uint8": np.uint8,
    "int8": np.int8,
    "bool": np.bool_,
    "complex64": np.complex64,
    "bfloat16": np.uint16,  # the bits (NumPy has no bfloat16 without ml_dtypes)
}
ITEMSIZE = {name: np.dtype(t).itemsize for name, t in NP_DTYPES.items()}
TYPESTR = {
    "float32": "<f4",
    "float16": "<f2",
    "float64": "<f8",
    "int32": "<i4",
    "int64": "<i8",
    "uint8": "|u1",
    "int8": "|i1",
    "bool": "|b1",
    "complex64": "<c8",
    "bfloat16": "<V2",
}
PF_EMPTY_DTYPES = ("float32", "float16", "bfloat16", "int32", "int64", "uint8", "float64")
FLOATS = ("float32", "float16", "bfloat16")


def contiguous_strides(shape):
    strides, s = [], 1
    for n in reversed(shape):
        strides.append(s)
        s *= max(int(n), 1)
    return tuple(reversed(strides))


def reach(shape, strides):
    """(lo, hi, numel): the element offsets of the first-to-last element below / above the start."""
    numel = int(np.prod(shape, dtype=object)) if len(shape) else 1
    lo = hi = 0
    if numel:
        for n, s in zip(shape, strides):
            r = s * (n - 1)
            if r < 0:
                lo += r
            else:
                hi += r
    return lo, hi, numel


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even


def _fill(typed: np.ndarray, dtype: str, kind: str, rng) -> None:
    typed = typed.reshape(-1)
    n = typed.size
    if not n:
        return
    if kind == "nan":
        if dtype == "bfloat16":
            typed[...] = 0x7FC0
        elif dtype in ("float32", "float16", "float64", "complex64"):
            typed[...] = np.nan
        else:
            typed[...] = 0xA5 if dtype in ("uint8", "int32", "int64") else 1
        return
    if dtype in ("float32", "float16", "float64"):
        typed[...] = rng.standard_normal(n).astype(typed.dtype)
    elif dtype == "bfloat16":
        typed[...] = _bf16_bits(rng.standard_normal(n))
    elif dtype == "complex64":
        typed[...] = (rng.standard_normal(n) + 1j * rng.standard_normal(n)).astype(np.complex64)
    elif dtype == "bool":
        typed[...] = rng.integers(0, 2, n).astype(bool)
    else:
        typed[...] = rng.integers(0, 8, n).astype(typed.dtype)


class Built:
    """The real arguments of one case and what is needed to judge it."""

    def __init__(self):
        self.buffers = []  # uint8 arrays: the memory behind every argument
        self.roles = []  # per buffer: "in" / "out" (any output view makes it "out")
        self.producers = []  # Crafted producers (deleters counted)
        self.out_views = []  # (numpy view of a given output, its dtype, buffer index)
        self.in_buffers = set()  # buffers read by inputs
        self.keep = []  # objects kept alive for the call


def _typed(buf: np.ndarray, dtype: str) -> np.ndarray:
    n = len(buf) // ITEMSIZE[dtype]
    return buf[: n * ITEMSIZE[dtype]].view(NP_DTYPES[dtype])


def _np_view(buf, spec, start):
    typed = _typed(buf, spec["dtype"])
    es = ITEMSIZE[spec["dtype"]]
    shape = tuple(spec["shape"])
    strides = spec.get("strides") or contiguous_strides(shape)
    base = typed[start:] if start <= len(typed) else typed[len(typed) :]
    return np.lib.stride_tricks.as_strided(base, shape, tuple(s * es for s in strides), writeable=True)


def _torch_dtype(name):
    import torch

    return getattr(torch, {"bool": "bool"}.get(name, name))


class Builder:
    def __init__(self, case, rng):
        self.case = case
        self.rng = rng
        self.b = Built()
        self.cache = {}  # id(spec) -> built object (the same spec object twice: the same argument)
        self._layout()

    def _specs(self, x):
        if isinstance(x, dict) and x.get("kind") == "tensor":
            yield x
        elif isinstance(x, dict):
            for v in x.values():
                yield from self._specs(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                yield from self._specs(v)

    def _layout(self):
        """Allocate every buffer large enough for its views; fill it."""
        case = self.case
        need = {}
        self.starts = {}
        for spec in self._specs(case):
            shape = tuple(spec["shape"])
            strides = spec.get("strides") or contiguous_strides(shape)
            lo, hi, numel = reach(shape, strides)
            start = spec.get("offset", 0) - lo
            es = ITEMSIZE[spec["dtype"]]
            end = (start + hi + 1) * es if numel else start * es
            self.starts[id(spec)] = start
            need[spec["buf"]] = max(need.get(spec["buf"], 0), end)
        for i, bspec in enumerate(case.get("bufs", [])):
            nbytes = ((need.get(i, 0) + 63) // 64 + 1) * 64
            buf = np.zeros(nbytes, np.uint8)
            _fill(_typed(buf, bspec["dtype"]), bspec["dtype"], bspec.get("fill", "randn"), self.rng)
            self.b.buffers.append(buf)
            self.b.roles.append("in")
        # explicit values (index tensors) are written through their views
        for spec in self._specs(case):
            if spec.get("values") is not None:
                view = _np_view(self.b.buffers[spec["buf"]], spec, self.starts[id(spec)])
                if view.size:
                    vals = np.resize(np.asarray(spec["values"], dtype=object), view.size)
                    if spec["dtype"] in ("int32", "int64", "uint8", "int8"):  # wrapped, as a C cast would
                        # ints of any size (np.isfinite refuses those beyond int64), finite floats
                        ints = [int(v) % 2**64 if isinstance(v, int) or math.isfinite(v) else 0 for v in vals]
                        arr = np.array(ints, dtype=np.uint64).astype(view.dtype)
                    else:
                        arr = vals.astype(np.float64).astype(view.dtype)
                    view[...] = arr.reshape(view.shape)
            if spec.get("role") == "out":
                self.b.roles[spec["buf"]] = "out"
            else:
                self.b.in_buffers.add(spec["buf"])

    # -- one argument --
    def value(self, x):
        if isinstance(x, dict) and x.get("kind") == "tensor":
            key = id(x)
            if key not in self.cache:
                self.cache[key] = self.tensor(x)
            return self.cache[key]
        if isinstance(x, dict) and x.get("kind") == "object":
            return self._object(x["what"])
        if isinstance(x, dict) and x.get("kind") == "tuple":
            return tuple(self.value(v) for v in x["items"])
        if isinstance(x, list):
            return [self.value(v) for v in x]
        if isinstance(x, dict) and x.get("kind") == "dict":
            return {k: self.value(v) for k, v in x["items"].items()}
        if isinstance(x, dict) and "kind" not in x:
            return {k: self.value(v) for k, v in x.items()}
        return x

    def _object(self, what):
        if what == "object":
            return object()
        if what == "np_scalar":
            return np.float32(1.5)
        if what == "np_0d":
            return np.array(1.5, np.float32)
        if what == "torch_0d":
            import torch

            return torch.tensor(1.5)
        if what == "ragged":
            return [[1.0], [2.0, 3.0]]
        if what == "generator":
            return (i for i in range(3))
        if what == "bytes":
            return b"\x00" * 16
        raise ValueError(what)

    def tensor(self, spec):
        import pagedflash
        from producers import Crafted, Interface

        b = self.b
        buf = b.buffers[spec["buf"]]
        start = self.starts[id(spec)]
        dtype, lib = spec["dtype"], spec["lib"]
        shape = tuple(spec["shape"])
        strides = tuple(spec.get("strides") or contiguous_strides(shape))
        es = ITEMSIZE[dtype]
        lie = spec.get("lie") or {}
        if lib == "torch" and min(strides, default=0) < 0:  # torch has no negative strides
            lib = "numpy" if dtype != "bfloat16" else "dlpack"
        if lib == "dlpack_nullstrides" and strides != contiguous_strides(shape):
            lib = "dlpack"  # NULL strides claim a compact layout: only the truth for a compact view
        view = _np_view(buf, spec, start)  # the truth, in NumPy (bfloat16 as its bits)
        if spec.get("role") == "out":
            b.out_views.append((view, dtype, spec["buf"]))
        if lib == "numpy":
            if spec.get("readonly"):
                view = view.view()
                view.flags.writeable = False
            return view
        if lib == "torch":
            import torch

            t = torch.from_numpy(_typed(buf, dtype).view(np.uint8))
            t = t.view(_torch_dtype(dtype)) if dtype != "uint8" else t
            t = torch.as_strided(t, shape, strides, start)
            if spec.get("grad") and dtype in FLOATS + ("float64",):
                t = t.detach().requires_grad_(True)
            return t
        if lib == "pf":
            t = pagedflash._C.empty(shape, dtype, "cpu", 0)
            host = np.asarray(t)
            mem = host.reshape(-1).view(np.uint8) if host.size else np.zeros(0, np.uint8)
            if host.size:
                bits = host.view(np.uint16) if dtype == "bfloat16" else host
                bits[...] = view
            b.buffers.append(mem)
            b.roles.append(spec.get("role", "in"))
            if spec.get("role") == "out":
                b.out_views[-1] = (np.asarray(t).view(np.uint16) if dtype == "bfloat16" else np.asarray(t), dtype, -1)
            return t
        if lib == "list":
            if dtype == "bfloat16":
                return (view.astype(np.uint32) << 16).view(np.float32).tolist()
            return view.tolist()
        address = buf.ctypes.data + start * es
        if lib in ("dlpack", "dlpack_legacy", "dlpack_offset", "dlpack_oldproto", "dlpack_nullstrides"):
            kw = dict(
                shape=shape,
                strides=None if lib == "dlpack_nullstrides" else strides,
                dtype=dtype,
                data=address,
                versioned=lib != "dlpack_legacy",
                legacy_protocol=lib == "dlpack_oldproto",
                readonly=bool(spec.get("readonly")),
                deleter=spec.get("deleter", "count"),
            )
            if lib == "dlpack_offset":
                kw["data"], kw["byte_offset"] = buf.ctypes.data, start * es
            c = Crafted(buf, **kw)
            self._lie_dlpack(c, lie, es)
            b.producers.append(c)
            return c
        if lib in ("iface", "cuda_iface"):
            iface = {
                "shape": shape,
                "typestr": TYPESTR[dtype],
                "data": (address, bool(spec.get("readonly"))),
                "strides": None if strides == contiguous_strides(shape) else tuple(s * es for s in strides),
                "version": 3,
            }
            self._lie_iface(iface, lie, es)
            if "not_dict" in lie:
                iface = list(iface.items())
            return Interface(iface, base=buf, cuda=lib == "cuda_iface")
        raise ValueError(f"unknown lib {lib}")

    @staticmethod
    def _lie_dlpack(c, lie, es):
        if "shape_null" in lie:
            c.shape = None
        if "ndim" in lie:
            c.ndim = lie["ndim"]
        if "neg_dim" in lie and c.shape:
            i, v = lie["neg_dim"]
            s = list(c.shape)
            s[i % len(s)] = v
            c.shape = tuple(s)
        if "data_null" in lie:
            c.data, c.byte_offset = 0, 0
        if "misalign" in lie:
            c.data += lie["misalign"]
        if "offset_overflow" in lie:
            c.byte_offset = 2**64 - lie["offset_overflow"]
        if "stride" in lie and c.shape:
            i, v = lie["stride"]
            s = list(c.strides or contiguous_strides(c.shape))
            s[i % len(s)] = v
            c.strides = tuple(s)
        if "dtype" in lie:
            c.dtype = tuple(lie["dtype"])
        if "device" in lie:
            c.device = tuple(lie["device"])
        if "major" in lie:
            c.major = lie["major"]

    @staticmethod
    def _lie_iface(iface, lie, es):
        if "data_null" in lie:
            iface["data"] = (0, iface["data"][1])
        if "data_bad" in lie:
            iface["data"] = lie["data_bad"]
        if "neg_dim" in lie and iface["shape"]:
            i, v = lie["neg_dim"]
            s = list(iface["shape"])
            s[i % len(s)] = v
            iface["shape"] = tuple(s)
        if "stride_bytes" in lie and iface["shape"]:
            i, v = lie["stride_bytes"]
            s = list(iface["strides"] or [x * es for x in contiguous_strides(iface["shape"])])
            s[i % len(s)] = v
            iface["strides"] = tuple(s)
        if "typestr" in lie:
            iface["typestr"] = lie["typestr"]
        if "mask" in lie:
            iface["mask"] = object()
        if "shape_bad" in lie:
            iface["shape"] = lie["shape_bad"]
        if "strides_bad" in lie:
            iface["strides"] = lie["strides_bad"]
        if "drop" in lie:
            iface.pop(lie["drop"], None)
        if "misalign" in lie:
            iface["data"] = (iface["data"][0] + lie["misalign"], iface["data"][1])


# ---------------------------------------------------------------------------
# the worker's side: running and judging one case
# ---------------------------------------------------------------------------


def _exc_ok(e, extra=()) -> bool:
    """A documented exception (module docstring): ValueError, TypeError, NotImplementedError,
    pagedflash.OutOfBlocks, pagedflash.CudaError (plus `extra`); OverflowError (an
    ArithmeticError), KeyError, IndexError, AttributeError, SystemError, a plain MemoryError or
    RuntimeError are not."""
    import pagedflash

    if isinstance(e, (pagedflash.OutOfBlocks, pagedflash.CudaError, NotImplementedError)):
        return True
    if isinstance(e, (MemoryError, RuntimeError)):
        return False
    return isinstance(e, (ValueError, TypeError) + tuple(extra))


def _describe_exc(e) -> str:
    return f"{type(e).__module__}.{type(e).__qualname__}: {e}"


ATTENTION = ("flash_attn", "flash_attn_varlen", "paged_attn", "merge_attn_states")


def _build_call(case, builder):
    """(function, args, kwargs) of an API case, every argument built."""
    import pagedflash

    args = [builder.value(a) for a in case.get("args", [])]
    kwargs = {k: builder.value(v) for k, v in case.get("kwargs", {}).items()}
    builder.b.keep.append((args, kwargs))
    return getattr(pagedflash, case["fn"]), args, kwargs


def _check_deleters(built, producers_stray_before) -> str:
    from producers import stray_deletes

    for p in built.producers:
        if p.deleter == "count" and p.deleted != p.exported:
            return f"a DLPack producer's deleter ran {p.deleted} times for {p.exported} exports: {p!r}"
    if stray_deletes[0] != producers_stray_before:
        return "a DLPack deleter ran for a capsule that was deleted already"
    return ""


def run_tensor_case(case, rng) -> dict:
    """pagedflash.Tensor: _C.empty with borderline shapes / dtypes / devices, then the methods."""
    import pagedflash

    extra = (BufferError,)
    try:
        t = pagedflash._C.empty(*case["empty_args"], **case.get("empty_kwargs", {}))
    except Exception as e:  # noqa: BLE001 - judged below
        # an allocation the host cannot hold (a valid shape of terabytes) is a MemoryError
        if _exc_ok(e) or type(e) is MemoryError:
            return {"status": "raised", "exc": type(e).__name__, "msg": str(e)}
        return {"status": "fail", "why": "_C.empty raised " + _describe_exc(e), "tb": traceback.format_exc()}
    if not isinstance(t, pagedflash.Tensor):
        return {"status": "fail", "why": f"_C.empty returned {type(t).__name__}"}
    shape = tuple(t.shape)
    numel = int(np.prod(shape, dtype=object)) if shape else 1
    itemsize = ITEMSIZE.get(t.dtype, 0)
    if numel * itemsize >= 2**63:
        return {"status": "fail", "why": f"_C.empty made a Tensor of {numel * itemsize} bytes, shape {shape}"}
    on_host = t.device == "cpu"
    host = None
    if on_host:
        host = np.asarray(t)
        if host.size:
            _fill(host.view(np.uint16) if t.dtype == "bfloat16" else host, t.dtype, "randn", rng)
        before = host.tobytes()
    for op in case.get("ops", []):
        name, kw = op[0], op[1] if len(op) > 1 else {}
        try:
            if name == "dlpack":
                cap = t.__dlpack__(**kw)
                if type(cap).__name__ != "PyCapsule":
                    return {"status": "fail", "why": f"__dlpack__ returned {type(cap).__name__}"}
                del cap
            elif name == "dlpack_device":
                d = t.__dlpack_device__()
                if d != ((1, 0) if on_host else (2, int(t.device.partition(":")[2]))):
                    return {"status": "fail", "why": f"__dlpack_device__ of a {t.device} tensor is {d}"}
            elif name in ("array_interface", "cuda_array_interface"):
                # the interface of the tensor's memory works, the other one is absent (AttributeError)
                if (name == "array_interface") == on_host:
                    iface = getattr(t, "__" + name + "__")
                    if tuple(iface["shape"]) != shape:
                        return {"status": "fail", "why": f"__{name}__ shape {iface['shape']} != {shape}"}
                elif hasattr(t, "__" + name + "__"):
                    return {"status": "fail", "why": f"__{name}__ of a {t.device} tensor"}
            elif name == "np_from_dlpack" and t.dtype != "bfloat16" and on_host:
                a = np.from_dlpack(t)
                if a.ctypes.data != t.data_ptr or a.shape != shape:
                    return {"status": "fail", "why": "np.from_dlpack(Tensor) copied or changed the shape"}
            elif name == "torch_from_dlpack":
                import torch

                x = torch.from_dlpack(t)
                if tuple(x.shape) != shape or (numel and x.data_ptr() != t.data_ptr):
                    return {"status": "fail", "why": "torch.from_dlpack(Tensor) copied or changed the shape"}
            elif name == "props":
                _ = (t.shape, t.strides, t.dtype, t.device, t.ndim, t.data_ptr, repr(t))
            elif name == "as_input":
                # the Tensor back into pagedflash: a cache copy onto itself is a no-op
                if len(shape) >= 1 and shape[0] >= 1 and t.dtype in PF_EMPTY_DTYPES:
                    pagedflash.copy_blocks([t], [], [[0, 0]])
        except Exception as e:  # noqa: BLE001
            if not _exc_ok(e, extra):
                return {"status": "fail", "why": f"Tensor op {name}{kw} raised " + _describe_exc(e)}
    if host is not None and host.tobytes() != before:
        return {"status": "fail", "why": "a Tensor's data changed through its methods"}
    return {"status": "ok"}


_BASELINE = {}


def _threads_probe():
    """A fixed small flash_attn + paged_attn problem; its bits (for the thread-count checks)."""
    import pagedflash

    r = np.random.default_rng(1234)
    q = r.standard_normal((2, 67, 4, 24)).astype(np.float32)
    k = r.standard_normal((2, 300, 2, 24)).astype(np.float32)
    kc = r.standard_normal((40, 16, 2, 24)).astype(np.float32)
    bt = r.permutation(40)[:32].reshape(2, 16).astype(np.int32)
    sl = np.array([250, 199], np.int32)
    a = pagedflash.flash_attn(q, k, k, causal=True)
    b = pagedflash.paged_attn(q[:, -1], kc, kc, bt, sl, num_splits=0)
    return a.tobytes() + b.tobytes()


def run_threads_case(case) -> dict:
    import pagedflash

    if "baseline" not in _BASELINE:
        _BASELINE["baseline"] = _threads_probe()
    before = pagedflash.get_num_threads()
    verdict = {"status": "ok"}
    try:
        pagedflash.set_num_threads(case["value"])
        ok = True
    except Exception as e:  # noqa: BLE001
        if not _exc_ok(e):
            return {"status": "fail", "why": "set_num_threads raised " + _describe_exc(e)}
        if pagedflash.get_num_threads() != before:
            return {"status": "fail", "why": "a failed set_num_threads changed the setting"}
        ok = False
        verdict = {"status": "raised", "exc": type(e).__name__, "msg": str(e)}
    try:
        got = _threads_probe()
    except Exception as e:  # noqa: BLE001
        return {"status": "fail", "why": "a call after set_num_threads raised " + _describe_exc(e)}
    finally:
        if ok and not 0 <= pagedflash.get_num_threads() <= 8:
            pagedflash.set_num_threads(0)  # keep the next cases quick
    if got != _BASELINE["baseline"]:
        return {"status": "fail", "why": f"results differ bitwise with {case['value']!r} threads"}
    return verdict


_BM_QUERIES = {
    "can_allocate",
    "num_cached_tokens",
    "can_swap_out",
    "can_swap_in",
    "seq_len",
    "seq_lens",
    "block_table",
    "block_tables",
    "slot_mapping",
    "token_ids",
    "is_swapped",
    "__contains__",
    "stats",
    "snapshot",
    "block_states",
    "seq_ids",
    "num_free_blocks",
    "usage",
    "check",
    "__len__",
}


def run_block_manager_case(case, builder) -> dict:
    import pagedflash

    try:
        bm = pagedflash.BlockManager(*builder.value(case["ctor"][0]), **builder.value(case["ctor"][1]))
    except Exception as e:  # noqa: BLE001
        if _exc_ok(e):
            return {"status": "raised", "exc": type(e).__name__, "msg": str(e)}
        return {"status": "fail", "why": "BlockManager(...) raised " + _describe_exc(e)}
    raised = 0
    for step, (method, args, kwargs) in enumerate(case["ops"]):
        args = builder.value(args)
        kwargs = builder.value(kwargs)
        outs = [a for a in list(args) + list(kwargs.values()) if isinstance(a, np.ndarray)]
        before_outs = [a.tobytes() for a in outs]
        before = bm.snapshot()
        where = f"step {step}: {method}(*{args!r}, **{kwargs!r})"
        try:
            attr = getattr(bm, method)  # a property is read here
            if callable(attr):
                attr(*args, **kwargs)
            failed = None
        except Exception as e:  # noqa: BLE001
            failed = e
        if failed is not None:
            if not _exc_ok(failed):
                return {"status": "fail", "why": f"{where} raised " + _describe_exc(failed)}
            raised += 1
        if (failed is not None or method in _BM_QUERIES) and bm.snapshot() != before:
            return {"status": "fail", "why": f"{where} {'failed' if failed else 'a query'} and changed the manager"}
        if failed is not None and [a.tobytes() for a in outs] != before_outs:
            return {"status": "fail", "why": f"{where} failed and wrote an out= array"}
        try:
            bm.check()
        except Exception as e:  # noqa: BLE001
            return {"status": "fail", "why": f"after {where}: check() raised " + _describe_exc(e)}
    return {"status": "ok", "raised_steps": raised}


def run_case(case) -> dict:
    """Run one case in this process; the verdict as a dict."""
    import pagedflash
    from producers import stray_deletes

    rng = np.random.default_rng(case.get("seed", 0))
    if case.get("threads") is not None:
        pagedflash.set_num_threads(case["threads"])
    fn = case["fn"]
    if fn == "Tensor":
        return run_tensor_case(case, rng)
    if fn == "set_num_threads":
        return run_threads_case(case)
    builder = Builder(case, rng)
    built = builder.b
    if fn == "BlockManager":
        return run_block_manager_case(case, builder)
    stray_before = stray_deletes[0]
    target, args, kwargs = _build_call(case, builder)
    snaps = [buf.tobytes() for buf in built.buffers]
    failed = False
    try:
        result = target(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        failed = True
        result = None
        if not _exc_ok(e):
            return {
                "status": "fail",
                "why": "raised " + _describe_exc(e),
                "tb": "".join(traceback.format_exception(type(e), e, e.__traceback__)),
            }
        verdict = {"status": "raised", "exc": type(e).__name__, "msg": str(e)}
        e.__traceback__ = None  # its frames would keep the call's imports (and capsules) alive
    else:
        verdict = {"status": "ok"}
    del args, kwargs, result
    built.keep.clear()
    builder.cache.clear()
    extra = {k: v for k, v in verdict.items() if k != "status"}
    why = _check_deleters(built, stray_before)
    if why:
        return {"status": "fail", "why": why, **extra}
    for i, buf in enumerate(built.buffers):
        if not failed and built.roles[i] == "out":
            continue
        if buf.tobytes() != snaps[i]:
            what = "a failed call" if failed else "a successful call"
            role = "an output's" if built.roles[i] == "out" else "an input's"
            return {"status": "fail", "why": f"{what} changed {role} buffer {i}", **extra}
    if not failed and case.get("finite") and fn in ATTENTION:
        overlaps = {bi for _, _, bi in built.out_views} & built.in_buffers
        for view, dtype, bi in built.out_views:
            if bi in overlaps or not view.size:
                continue
            vals = (view.astype(np.uint32) << 16).view(np.float32) if dtype == "bfloat16" else view
            if dtype in FLOATS and np.isnan(vals).any():
                return {"status": "fail", "why": "a given output holds NaN after a successful call (unwritten?)"}
    return verdict


def serve() -> None:
    """Read cases from stdin, answer verdicts on the original stdout (fd 1 then points to stderr,
    so nothing a library prints can corrupt the answers)."""
    out_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    out = os.fdopen(out_fd, "wb")
    inp = sys.stdin.buffer
    import pagedflash  # noqa: F401 - imported once, before the first case is timed

    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    while True:
        head = inp.read(8)
        if len(head) < 8:
            return
        (n,) = struct.unpack("<Q", head)
        case = pickle.loads(inp.read(n))
        if case is None:
            return
        try:
            verdict = run_case(case)
        except Exception as e:  # noqa: BLE001 - a bug of the harness or the case, reported as such
            verdict = {
                "status": "error",
                "why": "the worker could not run the case: " + _describe_exc(e),
                "tb": traceback.format_exc(),
            }
        _send(out, verdict)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        sys.exit("usage: fuzz_worker.py --serve (cases come from tests/test_fuzz.py)")
