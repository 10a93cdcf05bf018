"""Fuzz test of the public API: invalid and borderline calls of every public function.

Hypothesis strategies draw a valid call of one function (small random shapes, every dtype,
GQA ratio, layout and option), then 0-3 faults: a dimension changed (0 included) or made
negative, a rank changed, another dtype (float64, integers, bool, complex), another library
per argument (NumPy, torch, pagedflash.Tensor, plain lists, hand-built DLPack capsules and
array interfaces: tests/producers.py), a producer lying about a field (NULL shape or data,
ndim out of range, misaligned data, byte_offset or strides that overflow, unknown dtype code
or device, DLPack version), something that is not an array, an output overlapping an input,
a read-only output, ids out of range, huge or non-finite integers and floats for the options.
BlockManager gets random method sequences, set_num_threads random values, pagedflash.Tensor
random shapes and DLPack requests.

Each case runs in one persistent worker process (tests/fuzz_worker.py), which judges it: the
call succeeds or raises ValueError, TypeError, NotImplementedError, pagedflash.OutOfBlocks or
pagedflash.CudaError; a failed call leaves every buffer behind every argument bitwise as it
was; DLPack deleters run once per export; a crash or hang of the worker is a failure that
names the case (the worker is restarted for the next one).

CI runs PAGEDFLASH_FUZZ_EXAMPLES (default 1000) cases in all, split over the functions;
`pytest tests/test_fuzz.py --fuzz-examples N` runs N. A long run that does not stop at the
first failure and prints a summary (docs/robustness.md has the last one):

    python tests/test_fuzz.py --examples 100000 [--seed S] [--only paged_attn,copy_blocks]
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import sys
import time

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
if __name__ == "__main__":  # the long run: the in-tree build
    sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "python"))

import pagedflash  # noqa: E402
from fuzz_worker import FLOATS, PF_EMPTY_DTYPES, Worker, contiguous_strides  # noqa: E402

CUDA = pagedflash.build_info()["cuda_devices"] > 0

DEFAULT_EXAMPLES = 1000

WEIRD_INTS = [2**31, 2**31 - 1, -(2**31) - 1, 2**63, 2**63 - 1, 2**64, -(2**63), -(2**63) - 1, -1, -2, 2**2000]
WEIRD_FLOATS = [float("nan"), float("inf"), float("-inf"), 1e300, -1e300, -0.0, 5e-324, 3.5, -(2**2000)]
WEIRD_TYPES = [None, "1", [1], {"kind": "object", "what": "object"}, True, b"x", {"kind": "tuple", "items": []}]
WEIRD = WEIRD_INTS + WEIRD_FLOATS + WEIRD_TYPES
BM_WEIRD_COUNTS = [2**31, 2**63, 2**64, -1, 0, -(2**63) - 1, 2**2000, 1.5, "4", None, True, float("nan")]
ALL_DTYPES = FLOATS + ("float64", "int32", "int64", "uint8", "int8", "bool", "complex64")
NOT_ARRAYS = [
    None,
    3,
    "q",
    1.5,
    [[1.0, 2.0]],
    {"kind": "object", "what": "object"},
    {"kind": "object", "what": "np_scalar"},
    {"kind": "object", "what": "np_0d"},
    {"kind": "object", "what": "torch_0d"},
    {"kind": "object", "what": "ragged"},
    {"kind": "object", "what": "generator"},
    {"kind": "object", "what": "bytes"},
    {"kind": "dict", "items": {"a": 1}},
]
# argument libraries, weighted: NumPy and torch most, every other producer now and then
LIBS = (
    ["numpy"] * 7
    + ["torch"] * 4
    + [
        "pf",
        "dlpack",
        "dlpack_legacy",
        "dlpack_offset",
        "dlpack_oldproto",
        "dlpack_nullstrides",
        "iface",
        "list",
    ]
)
if not CUDA:  # a host pointer claimed to be CUDA memory is only refused where CUDA is absent
    LIBS.append("cuda_iface")
LAYOUTS = ["c"] * 7 + ["pad", "perm", "neg", "zero", "last"]
FLASH_KERNELS = ["auto"] * 5 + ["sm80", "sm90", "8x8", "bogus"]
PAGED_KERNELS = ["auto"] * 5 + ["simple", "1x4", "8x8+registers", "4x8", "sm80", "nope"]


class Gen:
    """Draws one case of a function: its arguments as specs (tests/fuzz_worker.py builds them)."""

    def __init__(self, draw, fn):
        self.draw = draw
        self.fn = fn
        self.bufs: list = []
        self.specs: list = []
        self.args: list = []
        self.kwargs: dict = {}
        self.finite = True
        self.faulted: list = []

    # -- draws --
    def int(self, lo, hi):
        return self.draw(st.integers(lo, hi))

    def choice(self, seq):
        return self.draw(st.sampled_from(seq))

    def flag(self, p=0.5):
        return self.draw(st.floats(0, 1)) < p

    def float_dtype(self):
        return self.choice(["float32", "float32", "float16", "bfloat16"])

    def head_dim(self):
        return self.choice([1, 2, 3, 5, 8, 8, 16, 16, 24, 32, 40, 64, 128, 256, 0, 257])

    # -- tensors --
    def tensor(self, shape, dtype, role="in", values=None):
        shape = [int(x) for x in shape]
        lib = self.choice(LIBS)
        if lib == "numpy" and dtype == "bfloat16":
            lib = "torch"
        if lib == "pf" and dtype not in PF_EMPTY_DTYPES:
            lib = "numpy"
        if lib in ("iface", "cuda_iface") and dtype == "bfloat16":
            lib = "dlpack"  # an array interface has no bfloat16 typestr (a lie draws that case)
        spec = {
            "kind": "tensor",
            "shape": shape,
            "dtype": dtype,
            "role": role,
            "lib": lib,
            "buf": len(self.bufs),
            "offset": self.choice([0, 0, 0, 1, 3]),
            "strides": None,
        }
        fill = "nan" if role == "out" and dtype in FLOATS else "randn"
        self.bufs.append({"dtype": dtype, "fill": fill})
        if values is not None:
            spec["values"] = [int(v) if not isinstance(v, float) else v for v in values]
        if lib != "pf":
            self._layout(spec, self.choice(LAYOUTS))
        if lib.startswith("dlpack") and self.flag(0.15):
            spec["deleter"] = self.choice(["clear", "null"])
        if lib == "torch" and dtype in FLOATS and self.flag(0.2):
            spec["grad"] = True
        self.specs.append(spec)
        return spec

    def index(self, values, dtype, shape=None):
        return self.tensor(shape if shape is not None else (len(values),), dtype, values=values)

    def alias(self, spec, role):
        """Another argument viewing exactly spec's memory (an in-place output)."""
        a = dict(spec, shape=list(spec["shape"]), strides=spec["strides"] and list(spec["strides"]))
        a["role"] = role
        a.pop("values", None)
        self.specs.append(a)
        return a

    def _layout(self, spec, layout):
        shape = spec["shape"]
        nd = len(shape)
        if layout == "c" or nd == 0:
            return
        st_ = list(contiguous_strides(shape))
        if layout == "pad":
            padded = shape[:-1] + [shape[-1] + self.int(1, 3)]
            st_ = list(contiguous_strides(padded))
        elif layout == "perm" and nd >= 3:
            order = list(self.draw(st.permutations(range(nd - 1)))) + [nd - 1]
            perm_shape = [shape[i] for i in order]
            ps = contiguous_strides(perm_shape)
            for pos, i in enumerate(order):
                st_[i] = ps[pos]
        elif layout in ("neg", "zero") and nd >= 2:
            i = self.int(0, nd - 2)
            st_[i] = -st_[i] if layout == "neg" else 0
            if layout == "neg" and spec["lib"] in ("torch", "pf"):
                spec["lib"] = "numpy" if spec["dtype"] != "bfloat16" else "dlpack"
        elif layout == "last" and shape[-1] > 1:
            st_ = list(contiguous_strides(shape[:-1] + [2 * shape[-1]]))
            st_[-1] = 2
        else:
            return
        spec["strides"] = st_

    # -- options --
    def opt(self, name, values, p=0.5):
        """kwargs[name] = one of values, with probability p (else the default)."""
        if self.flag(p):
            self.kwargs[name] = self.choice(values)

    def attn_options(self, b, h, dtype, *, paged=False, backward=False):
        self.opt("causal", [False, True])
        self.opt("softmax_scale", [None, 0.0, 0.5, -0.3, 1e-30, 2.0])
        self.opt("window", [(-1, -1), (0, 0), (2, -1), (-1, 3), (1, 1), [3, 0]])
        self.opt("softcap", [0.0, 0.5, 30.0])
        if self.flag(0.3):
            self.kwargs["alibi_slopes"] = self.tensor(self.choice([(h,), (b, h)]), "float32")
        if not backward:
            self.opt("return_lse", [False, True])
        self.opt("stream", [None, None, 0, 1])
        self.opt("kernel", PAGED_KERNELS if paged else FLASH_KERNELS, p=0.3)
        if not paged:
            self.opt("dropout_p", [0.0, 0.1, 0.5], p=0.3)
            self.opt("seed", [None, 0, 7, 2**64 - 1], p=0.3)
            self.opt("offset", [0, 5, 2**40])

    # -- faults --
    def where(self, spec):
        """Replace every occurrence of spec in args/kwargs (recursively) by what replace(spec) gives."""

        def walk(x, fn):
            if x is spec:
                return fn(x)
            if isinstance(x, list):
                return [walk(v, fn) for v in x]
            if isinstance(x, tuple):
                return tuple(walk(v, fn) for v in x)
            return x

        return walk

    def replace(self, spec, new):
        walk = self.where(spec)
        self.args = walk(self.args, lambda _: new)
        self.kwargs = {k: walk(v, lambda _: new) for k, v in self.kwargs.items()}

    def faults(self):
        n = self.choice([0, 0, 1, 1, 1, 1, 2, 2, 3])
        for _ in range(n):
            kind = self.choice(
                ["shape", "shape", "rank", "dtype", "lie", "lie", "lie", "notarray", "overlap", "overlap"]
                + ["readonly", "ids", "ids", "option", "option", "drop", "kwarg"]
            )
            getattr(self, "f_" + kind)()
            self.faulted.append(kind)
        if n:
            self.finite = False

    def _pick(self, pred=lambda s: True):
        cands = [s for s in self.specs if pred(s)]
        return self.choice(cands) if cands else None

    def f_shape(self):
        s = self._pick(lambda s: len(s["shape"]) > 0)
        if s is not None:
            i = self.int(0, len(s["shape"]) - 1)
            n = s["shape"][i]
            s["shape"][i] = self.choice([0, 1, n + 1, max(n - 1, 0), self.int(0, 9)])
            if s.get("strides"):
                s["strides"] = None

    def f_rank(self):
        s = self._pick()
        if s is None:
            return
        op = self.choice(["append", "drop", "prepend", "scalar"])
        if op == "append":
            s["shape"].append(self.choice([1, 2]))
        elif op == "prepend":
            s["shape"].insert(0, self.choice([1, 2]))
        elif op == "drop" and s["shape"]:
            s["shape"].pop(self.int(0, len(s["shape"]) - 1))
        else:
            s["shape"] = []
        s["strides"] = None

    def f_dtype(self):
        s = self._pick()
        if s is None:
            return
        s["dtype"] = self.choice([d for d in ALL_DTYPES if d != s["dtype"]])
        if s["lib"] == "numpy" and s["dtype"] == "bfloat16":
            s["lib"] = "torch" if not s.get("strides") or min(s["strides"]) >= 0 else "dlpack"
        if s["lib"] == "pf" and s["dtype"] not in PF_EMPTY_DTYPES:
            s["lib"] = "numpy"
        if s["lib"] == "torch" and s.get("strides") and min(s["strides"]) < 0:
            s["lib"] = "dlpack"
        s.pop("grad", None)
        self.bufs[s["buf"]] = {"dtype": s["dtype"], "fill": self.bufs[s["buf"]]["fill"]}

    def f_lie(self):
        s = self._pick()
        if s is None:
            return
        es = {"float64": 8, "int64": 8, "complex64": 8, "float32": 4, "int32": 4}.get(s["dtype"], 2)
        es = 1 if s["dtype"] in ("uint8", "int8", "bool") else es
        nd = len(s["shape"])
        big = [i for i, n in enumerate(s["shape"]) if n > 1]
        if self.flag(0.6):
            s["lib"] = self.choice(["dlpack", "dlpack_legacy"])
            kinds = ["shape_null", "ndim", "neg_dim", "data_null", "misalign", "offset_overflow", "stride", "dtype"]
            kinds += ["device", "major"]
            kind = self.choice(kinds)
            if kind == "shape_null":
                lie = {"shape_null": True}
            elif kind == "ndim":
                lie = {"ndim": self.choice([-1, 9, 64, -(2**31), 2**31 - 1])}
            elif kind == "neg_dim":
                lie = {"neg_dim": (self.int(0, 7), self.choice([-1, -2, -(2**31), -(2**63)]))}
            elif kind == "data_null":
                lie = {"data_null": True}
            elif kind == "misalign":
                lie = {"misalign": self.int(1, es - 1)} if es > 1 else {"data_null": True}
            elif kind == "offset_overflow":
                lie = {"offset_overflow": self.choice([1, 8, 2**20])}
            elif kind == "stride":
                if not big:
                    return
                extremes = [2**63 - 1, -(2**63), -(2**63) + 1] + ([2**62, -(2**62)] if es >= 2 else [])
                lie = {"stride": (self.choice(big), self.choice(extremes))}
            elif kind == "dtype":
                codes = [(6, 8, 1), (5, 64, 1), (0, 8, 1), (2, 32, 2), (0, 16, 1), (7, 16, 1), (2, 8, 1), (1, 16, 1)]
                lie = {"dtype": self.choice(codes)}
            elif kind == "device":
                if CUDA:
                    return
                lie = {"device": self.choice([(2, 0), (7, 0), (13, 0), (4, 0), (2, 5)])}
            else:
                if s["lib"] == "dlpack_legacy":
                    s["lib"] = "dlpack"
                lie = {"major": self.choice([0, 2, 255])}
        else:
            s["lib"] = "iface"
            kind = self.choice(
                ["data_null", "neg_dim", "stride_bytes", "typestr", "mask", "shape_bad", "strides_bad", "drop"]
                + ["misalign", "data_bad", "not_dict"]
            )
            if kind == "data_null":
                lie = {"data_null": True}
            elif kind == "neg_dim":
                lie = {"neg_dim": (self.int(0, 7), self.choice([-1, -3, -(2**40)]))}
            elif kind == "stride_bytes":
                if not big:
                    return
                odd = [1] if es > 1 else []
                lie = {"stride_bytes": (self.choice(big), self.choice(odd + [2**63, -(2**63) - 8, 2**64]))}
            elif kind == "typestr":
                lie = {"typestr": self.choice([">f4", "|b1", "<c8", "<i2", "abc", "<V2", "", 5])}
            elif kind == "mask":
                lie = {"mask": True}
            elif kind == "shape_bad":
                lie = {"shape_bad": self.choice([("a",), [2, 3], (1.5,), 5, None, tuple(range(9)), (2**64,)])}
            elif kind == "strides_bad":
                lie = {"strides_bad": self.choice([(1,), "x", tuple([1.5] * max(nd, 1))])}
            elif kind == "drop":
                lie = {"drop": self.choice(["shape", "typestr", "data"])}
            elif kind == "misalign":
                lie = {"misalign": self.int(1, es - 1)} if es > 1 else {"data_null": True}
            elif kind == "data_bad":
                lie = {"data_bad": self.choice([("x", False), (5,), 7, (2**64 + 5, False), (2**70, False)])}
            else:
                lie = {"not_dict": True}
        s["lie"] = lie
        s.pop("deleter", None)

    def f_notarray(self):
        s = self._pick()
        if s is not None:
            self.replace(s, self.choice(NOT_ARRAYS))

    def f_overlap(self):
        outs = [s for s in self.specs if s["role"] == "out"]
        ins = [s for s in self.specs if s["role"] == "in"]
        if not outs or not ins:
            return
        o = self.choice(outs)
        same = [i for i in ins if i["shape"] == o["shape"] and i["dtype"] == o["dtype"]]
        if same and self.flag(0.7):
            i = self.choice(same)
            o["buf"], o["strides"], o["offset"] = i["buf"], i.get("strides"), i["offset"] + self.choice([0, 0, 1, 2])
        else:
            i = self.choice(ins)
            o["buf"], o["offset"] = i["buf"], self.choice([0, 1, 5])

    def f_readonly(self):
        o = self._pick(lambda s: s["role"] == "out")
        if o is not None:
            o["readonly"] = True
            if o["lib"] not in ("numpy", "dlpack", "dlpack_offset", "dlpack_nullstrides", "iface"):
                o["lib"] = "numpy" if o["dtype"] != "bfloat16" else "dlpack"

    def f_ids(self):
        s = self._pick(lambda s: s.get("values"))
        if s is None:
            return
        i = self.int(0, len(s["values"]) - 1)
        v = s["values"][i]
        bad = [-1, -2, -(2**31), 2**31 - 1, v + 1, 2 * v + 7, 10**6]
        if s["dtype"] == "int64":
            bad += [2**62, -(2**63), 2**63 - 1]
        s["values"][i] = self.choice(bad)

    def f_option(self):
        keys = [k for k, v in self.kwargs.items() if not (isinstance(v, dict) and v.get("kind") == "tensor")]
        key = self.choice(keys + ["__new__"]) if keys else "__new__"
        if key == "__new__":
            key = self.choice(OPTION_NAMES.get(self.fn, ["stream"]))
        self.kwargs[key] = self.choice(WEIRD)

    def f_drop(self):
        if self.args:
            i = self.int(0, len(self.args) - 1)
            self.args[i] = None
        elif self.kwargs:
            self.kwargs[self.choice(sorted(self.kwargs))] = None

    def f_kwarg(self):
        if self.flag():
            self.kwargs[self.choice(["bogus", "outt", "q"])] = 1
        elif self.args:
            self.args.append(self.choice([None, 1, "x"]))

    def case(self):
        return {
            "fn": self.fn,
            "args": self.args,
            "kwargs": self.kwargs,
            "bufs": self.bufs,
            "seed": self.int(0, 2**32 - 1),
            "threads": self.choice([None, None, None, 1, 2, 3, 7]),
            "finite": self.finite,
            "faults": self.faulted,
        }


OPTION_NAMES = {
    "flash_attn": ["causal", "softmax_scale", "window", "softcap", "dropout_p", "seed", "offset", "return_lse"]
    + ["stream", "kernel"],
    "paged_attn": ["causal", "softmax_scale", "window", "softcap", "num_splits", "return_lse", "stream", "kernel"],
    "flash_attn_backward": ["max_seqlen_q", "max_seqlen_k", "causal", "softmax_scale", "window", "softcap"]
    + ["dropout_p", "seed", "offset", "deterministic", "stream", "kernel"],
    "dropout_mask": ["dropout_p", "seed", "offset", "max_seqlen_q", "max_seqlen_k"],
    "merge_attn_states": ["stream"],
    "write_kv_cache": ["stream"],
    "copy_blocks": ["stream"],
    "swap_blocks": ["stream"],
}
OPTION_NAMES["flash_attn_varlen"] = OPTION_NAMES["flash_attn"]
OPTION_NAMES["flash_attn_varlen_backward"] = OPTION_NAMES["flash_attn_backward"]


def cu(lens):
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return out


# ---------------------------------------------------------------------------
# one valid call per function (then Gen.faults)
# ---------------------------------------------------------------------------


def _heads(g):
    hk = g.choice([1, 1, 2, 3])
    return hk * g.choice([1, 1, 2, 3, 4]), hk


def gen_flash_attn(g):
    dt, (h, hk), d = g.float_dtype(), _heads(g), g.head_dim()
    b, sq, sk = g.choice([1, 1, 2, 3, 0]), g.choice([1, 2, 3, 5, 7, 9, 0]), g.choice([1, 2, 4, 7, 9, 0])
    q = g.tensor((b, sq, h, d), dt)
    g.args = [q, g.tensor((b, sk, hk, d), dt), g.tensor((b, sk, hk, d), dt)]
    g.attn_options(b, h, dt)
    if g.flag(0.5):
        g.kwargs["out"] = g.tensor((b, sq, h, d), dt, role="out")


def gen_flash_attn_varlen(g):
    dt, (h, hk), d = g.float_dtype(), _heads(g), g.head_dim()
    n = g.choice([1, 2, 3, 0])
    lq = [g.int(0, 6) for _ in range(n)]
    lk = [g.int(0, 6) for _ in range(n)]
    cq, ck = cu(lq), cu(lk)
    q = g.tensor((cq[-1], h, d), dt)
    g.args = [q, g.tensor((ck[-1], hk, d), dt), g.tensor((ck[-1], hk, d), dt)]
    g.args += [g.index(cq, "int32"), g.index(ck, "int32")]
    g.args += [max(lq, default=0) + g.choice([0, 0, 3]), max(lk, default=0) + g.choice([0, 0, 2])]
    g.attn_options(n, h, dt)
    if g.flag(0.5):
        g.kwargs["out"] = g.tensor((cq[-1], h, d), dt, role="out")


def gen_backward(g, varlen_positional):
    dt, (h, hk), d = g.float_dtype(), _heads(g), g.head_dim()
    varlen = varlen_positional or g.flag(0.3)
    if varlen:
        n = g.choice([1, 2, 3, 0])
        lq = [g.int(0, 5) for _ in range(n)]
        lk = [g.int(0, 5) for _ in range(n)]
        cq, ck = cu(lq), cu(lk)
        qs, ks, ls = (cq[-1], h, d), (ck[-1], hk, d), (h, cq[-1])
    else:
        n, sq, sk = g.choice([1, 1, 2, 0]), g.choice([1, 3, 5, 0]), g.choice([1, 4, 6, 0])
        qs, ks, ls = (n, sq, h, d), (n, sk, hk, d), (n, h, sq)
    dout, q = g.tensor(qs, dt), g.tensor(qs, dt)
    k, v = g.tensor(ks, dt), g.tensor(ks, dt)
    out, lse = g.tensor(qs, dt), g.tensor(ls, "float32")
    g.args = [dout, q, k, v, out, lse]
    if varlen:
        cuq, cuk = g.index(cq, "int32"), g.index(ck, "int32")
        mq, mk = max(lq, default=0), max(lk, default=0)
        if varlen_positional:
            g.args += [cuq, cuk, mq, mk]
        else:
            g.kwargs.update(cu_seqlens_q=cuq, cu_seqlens_k=cuk, max_seqlen_q=mq, max_seqlen_k=mk)
    g.attn_options(n, h, dt, backward=True)
    if float(g.kwargs.get("dropout_p", 0.0)) > 0 and g.kwargs.get("seed") is None and g.flag(0.8):
        g.kwargs["seed"] = 11
    g.opt("deterministic", [False, True])
    for name, shape in (("dq", qs), ("dk", ks), ("dv", ks)):
        if g.flag(0.4):
            g.kwargs[name] = g.tensor(shape, dt, role="out")


def gen_flash_attn_backward(g):
    gen_backward(g, False)


def gen_flash_attn_varlen_backward(g):
    gen_backward(g, True)


def gen_dropout_mask(g):
    dt, (h, hk), d = g.float_dtype(), _heads(g), g.head_dim()
    if g.flag(0.3):
        n = g.choice([1, 2, 0])
        lq, lk = [g.int(0, 5) for _ in range(n)], [g.int(0, 5) for _ in range(n)]
        cq, ck = cu(lq), cu(lk)
        g.args = [g.tensor((cq[-1], h, d), dt), g.tensor((ck[-1], hk, d), dt)]
        g.kwargs.update(cu_seqlens_q=g.index(cq, "int32"), cu_seqlens_k=g.index(ck, "int32"))
        g.opt("max_seqlen_q", [0, max(lq, default=0), 9])
        g.opt("max_seqlen_k", [0, max(lk, default=0), 9])
    else:
        b, sq, sk = g.choice([1, 2, 0]), g.choice([1, 3, 6, 0]), g.choice([1, 5, 8, 0])
        g.args = [g.tensor((b, sq, h, d), dt), g.tensor((b, sk, hk, d), dt)]
    g.kwargs["dropout_p"] = g.choice([0.0, 0.1, 0.5, 0.9])
    g.kwargs["seed"] = g.choice([0, 1, 2**64 - 1, 12345])
    g.opt("offset", [0, 3, 2**40])


def gen_paged_attn(g):
    dt, (h, hk), d = g.float_dtype(), _heads(g), g.head_dim()
    n = g.choice([1, 1, 2, 3, 0])
    bs = g.choice([1, 2, 3, 4, 5, 16])
    layout = g.choice(["decode", "dense", "packed"])
    if layout == "decode":
        qlens = [1] * n
    elif layout == "dense":
        qlens = [g.int(1, 3)] * n
    else:
        qlens = [g.int(0, 3) for _ in range(n)]
    lens = [ql + g.int(0, 10) for ql in qlens]
    need = [(x + bs - 1) // bs for x in lens]
    width = max(need, default=0) + g.choice([0, 1, 2])
    nb = sum(need) + g.choice([0, 1, 3])
    perm = list(g.draw(st.permutations(range(nb)))) if nb else []
    pad = g.choice([-1, 0, 10**6, -(2**31)])
    table, nxt = [], 0
    for x in need:
        row = perm[nxt : nxt + x] + [pad] * (width - x)
        nxt += x
        table += row
    if layout == "decode":
        q = g.tensor((n, h, d), dt)
    elif layout == "dense":
        q = g.tensor((n, qlens[0] if n else 1, h, d), dt)
    else:
        q = g.tensor((sum(qlens), h, d), dt)
    kc, vc = g.tensor((nb, bs, hk, d), dt), g.tensor((nb, bs, hk, d), dt)
    bt = g.index(table, "int32", shape=(n, width))
    g.args = [q, kc, vc, bt, g.index(lens, "int32")]
    if layout == "packed":
        g.kwargs["cu_seqlens_q"] = g.index(cu(qlens), "int32")
    g.attn_options(n, h, dt, paged=True)
    g.opt("num_splits", [0, 0, 1, 2, 3, 7])
    if g.flag(0.5):
        g.kwargs["out"] = g.tensor(q["shape"], dt, role="out")


def gen_merge_attn_states(g):
    dt = g.float_dtype()
    lead = g.choice([[], [3], [2, 2], [0], [1, 5], [2, 1, 3]])
    h, d = g.choice([1, 2, 4]), g.choice([1, 3, 8, 16])
    tokens = math.prod(lead)
    shape = lead + [h, d]

    def lse_shape():  # [h, tokens], or for out [b, s, h, d] flash_attn's [b, h, s] too
        return (lead[0], h, lead[1]) if len(lead) == 2 and g.flag(0.5) else (h, tokens)

    def lse():
        if g.flag(0.3):
            vals = [g.choice([0.5, -1.0, float("-inf"), 3.0]) for _ in range(max(h * tokens, 1))]
            return g.tensor(lse_shape(), "float32", values=vals)
        return g.tensor(lse_shape(), "float32")

    oa, la, ob, lb = g.tensor(shape, dt), lse(), g.tensor(shape, dt), lse()
    g.args = [oa, la, ob, lb]
    which = g.choice(["none", "new", "a", "b"])
    if which == "new":
        g.kwargs["out"] = g.tensor(shape, dt, role="out")
    elif which in ("a", "b"):
        g.kwargs["out"] = g.alias(oa if which == "a" else ob, "out")
    which = g.choice(["none", "new", "a", "b"])
    if which == "new":
        g.kwargs["out_lse"] = g.tensor(lse_shape(), "float32", role="out")
    elif which in ("a", "b"):
        g.kwargs["out_lse"] = g.alias(la if which == "a" else lb, "out")
    g.opt("stream", [None, 0])


def _cache_shape(g):
    return [g.choice([1, 2, 4, 6]), g.choice([1, 2, 3, 4]), g.choice([1, 2]), g.choice([1, 4, 8])]


def gen_write_kv_cache(g):
    dt = g.float_dtype()
    nb, bs, hk, d = _cache_shape(g)
    n = g.choice([0, 1, 2, 3, 6])
    slots = [g.int(-1, nb * bs - 1) for _ in range(n)]
    g.args = [g.tensor((n, hk, d), dt), g.tensor((n, hk, d), dt)]
    g.args += [g.tensor((nb, bs, hk, d), dt, role="out"), g.tensor((nb, bs, hk, d), dt, role="out")]
    g.args.append(g.index(slots, "int64"))
    g.opt("stream", [None, 0])


def _pairs(g, n_src, n_dst):
    n = g.choice([0, 1, 2, 3, 5])
    return [v for _ in range(n) for v in (g.int(0, max(n_src - 1, 0)), g.int(0, max(n_dst - 1, 0)))], n


def gen_copy_blocks(g):
    dt = g.choice(["float32", "float16", "bfloat16", "uint8"])
    shape = _cache_shape(g)
    layers = g.choice([1, 1, 2, 3, 0])

    def cache():
        s = list(shape)
        if g.flag(0.15):
            s = _cache_shape(g)
        return g.tensor(s, dt, role="out")

    ks = [cache() for _ in range(layers)]
    vs = [cache() for _ in range(layers)]
    nb = min([s["shape"][0] for s in ks + vs], default=1)
    flat, n = _pairs(g, nb, nb)
    mapping = g.index(flat, "int64", shape=(n, 2))
    form = g.choice(["list", "list", "tuple", "single"])
    if form == "tuple":
        g.args = [{"kind": "tuple", "items": ks}, {"kind": "tuple", "items": vs}, mapping]
    elif form == "single" and layers:
        g.args = [ks[0], vs[0], mapping]
    else:
        g.args = [ks, vs, mapping]
    g.opt("stream", [None, 0])


def gen_swap_blocks(g):
    dt = g.choice(["float32", "float16", "bfloat16", "uint8", "int32"])
    block = [g.choice([1, 2, 3]) for _ in range(g.choice([0, 1, 2, 3]))]
    ns, nd = g.choice([1, 2, 4, 0]), g.choice([1, 3, 5, 0])
    flat, n = _pairs(g, ns, nd)
    g.args = [g.tensor([ns] + block, dt), g.tensor([nd] + block, dt, role="out"), g.index(flat, "int64", shape=(n, 2))]
    g.opt("stream", [None, 0])


# ---------------------------------------------------------------------------
# BlockManager, set_num_threads, pagedflash.Tensor
# ---------------------------------------------------------------------------


def gen_block_manager(g):
    def maybe_weird(valid, p=0.1):
        return g.choice(WEIRD) if g.flag(p) else g.choice(valid)

    def count_arg(valid):
        # no huge valid counts: a pool of 2**31 - 1 blocks is tens of GiB (MemoryError, or the
        # OOM killer where memory is overcommitted), not a validation question
        return g.choice(BM_WEIRD_COUNTS) if g.flag(0.1) else g.choice(valid)

    ctor = [count_arg([1, 2, 4, 8, 16]), count_arg([1, 2, 4, 16])]
    ckw = {}
    if g.flag(0.5):
        ckw["num_cpu_blocks"] = count_arg([0, 4, 8])
    if g.flag(0.3):
        ckw["watermark"] = maybe_weird([0.0, 0.01, 0.5], 0.1)
    if g.flag(0.5):
        ckw["enable_prefix_caching"] = g.choice([False, True])
    ops = []

    def sid():
        return maybe_weird([0, 1, 2, 3, 0, 1], 0.08)

    def sids():
        if g.flag(0.1):
            return g.choice(WEIRD)
        ids = [sid() for _ in range(g.choice([0, 1, 2, 3]))]
        if g.flag(0.2) and all(type(i) is int and -(2**63) <= i < 2**63 for i in ids):
            return g.index(ids, "int64")
        return ids

    def tokens():
        if g.flag(0.2):
            return maybe_weird([0, 1, 5, 9, 20], 0.2)
        toks = [maybe_weird([0, 1, 2, 3], 0.03) for _ in range(g.choice([0, 1, 3, 4, 8, 17]))]
        if g.flag(0.15) and all(type(t) is int and -(2**31) <= t < 2**31 for t in toks):
            return g.index(toks, g.choice(["int32", "int64"]))
        return toks

    def count():
        return maybe_weird([0, 1, 1, 2, 5], 0.1)

    def out(n, dtype, cols=None):
        shape = (max(n, 0),) if cols is None else (max(n, 0), cols)
        if g.flag(0.3):
            shape = tuple(x + g.choice([0, 1, -1 if x else 0]) for x in shape)
            dtype = g.choice([dtype, "int32", "int64", "float32"])
        spec = g.tensor(shape, dtype, role="out")
        spec["lib"] = "numpy"
        spec["strides"] = None
        if g.flag(0.1):
            spec["readonly"] = True
        return spec

    for _ in range(g.int(1, 14)):
        m = g.choice(
            ["allocate"] * 4
            + ["append_slots"] * 3
            + ["append_slots_batch", "fork", "free", "free", "can_allocate", "num_cached_tokens", "can_swap_out"]
            + ["swap_out", "can_swap_in", "swap_in", "seq_len", "seq_lens", "block_table", "block_tables"]
            + ["slot_mapping", "token_ids", "is_swapped", "reset_prefix_cache", "__contains__", "stats"]
            + ["block_states", "usage", "seq_ids", "__len__"]
        )
        args: list = []
        kw: dict = {}
        if m == "allocate":
            args = [sid(), tokens()]
        elif m == "append_slots":
            args = [sid()]
            if g.flag(0.7):
                args.append(count())
            if g.flag(0.5):
                args.append(tokens())
        elif m == "append_slots_batch":
            args = [sids(), count() if g.flag(0.7) else [count() for _ in range(g.choice([0, 1, 2]))]]
            if g.flag(0.5):
                args.append(tokens())
        elif m == "fork":
            args = [sid(), sid()]
        elif m in ("free", "seq_len", "block_table", "token_ids", "is_swapped", "__contains__"):
            args = [sid()]
        elif m in ("can_allocate", "num_cached_tokens"):
            args = [tokens()]
        elif m in ("can_swap_out", "swap_out", "can_swap_in", "swap_in"):
            args = [sid() if g.flag(0.3) else sids()]
        elif m == "seq_lens":
            args = [sids()]
            if g.flag(0.3):
                kw["out"] = out(g.choice([0, 1, 2]), "int32")
        elif m == "block_tables":
            args = [sids()]
            if g.flag(0.4):
                kw["max_blocks"] = count_arg([None, 0, 1, 4, 9])  # no valid huge widths (GiB tables)
            if g.flag(0.3):
                kw["pad"] = maybe_weird([0, -1, 3], 0.2)
            if g.flag(0.3):
                kw["out"] = out(g.choice([0, 1, 2]), "int32", g.choice([0, 1, 4, 9]))
        elif m == "slot_mapping":
            args = [sid() if g.flag(0.3) else sids(), count()]
            if g.flag(0.3):
                kw["out"] = out(g.choice([0, 1, 3, 8]), "int64")
        elif m == "block_states":
            kw["cpu"] = g.choice([False, True])
        ops.append((m, args, kw))
    g.args = []
    return {"fn": "BlockManager", "ctor": [ctor, {"kind": "dict", "items": ckw}], "ops": ops, "bufs": g.bufs}


def gen_set_num_threads(g):
    return {"fn": "set_num_threads", "value": g.choice([0, 1, 2, 3, 7, 16, 300, 2**31 - 1] + WEIRD)}


def gen_tensor(g):
    if g.flag(0.8):
        shape = [g.choice([0, 1, 2, 3, 5]) for _ in range(g.choice([0, 1, 2, 3, 4]))]
    else:
        shape = g.choice(
            [
                [-1],
                [2**62, 2**62],
                [2**61, 8],
                [2**40, 2**30],
                [2**63],
                [2**64],
                [2, -3],
                list(range(1, 10)),
                ["a"],
                [1.5],
                None,
                "abc",
                5,
                [2**31, 2**31, 4],
            ]
        )
    dtype = g.choice(list(PF_EMPTY_DTYPES) * 3 + ["bool", "complex64", "float8", "", 5, None])
    args = [shape, dtype]
    kwargs = {}
    if g.flag(0.2):
        kwargs["device"] = g.choice(["cpu", "cpu", "cuda", "tpu", 5])
    if g.flag(0.15):
        kwargs["device_id"] = g.choice([0, 1, -1, 2**31, 2**63, "0"])
    ops = []
    for _ in range(g.int(0, 6)):
        op = g.choice(
            ["dlpack"] * 4
            + ["dlpack_device", "array_interface", "cuda_array_interface", "np_from_dlpack", "torch_from_dlpack"]
            + ["props", "as_input"]
        )
        kw = {}
        if op == "dlpack":
            if g.flag(0.4):
                kw["stream"] = g.choice([None, 0, 1, -1, 2**70, "x"])
            if g.flag(0.5):
                kw["max_version"] = g.choice([None, (1, 0), (0, 9), (2, 0), (2**64, 0), "x", (), (1,), (None, 0)])
            if g.flag(0.4):
                kw["dl_device"] = g.choice([None, (1, 0), (2, 0), "cpu", (1,), (1, 2**40), ("a", 0)])
            if g.flag(0.3):
                kw["copy"] = g.choice([None, False, True, 1])
        ops.append((op, kw))
    return {"fn": "Tensor", "empty_args": args, "empty_kwargs": kwargs, "ops": ops}


GENERATORS = {
    "flash_attn": gen_flash_attn,
    "flash_attn_varlen": gen_flash_attn_varlen,
    "flash_attn_backward": gen_flash_attn_backward,
    "flash_attn_varlen_backward": gen_flash_attn_varlen_backward,
    "dropout_mask": gen_dropout_mask,
    "paged_attn": gen_paged_attn,
    "merge_attn_states": gen_merge_attn_states,
    "write_kv_cache": gen_write_kv_cache,
    "copy_blocks": gen_copy_blocks,
    "swap_blocks": gen_swap_blocks,
    "BlockManager": gen_block_manager,
    "set_num_threads": gen_set_num_threads,
    "Tensor": gen_tensor,
}
# shares of the examples (the attention calls have the most arguments to get wrong)
WEIGHTS = {
    "flash_attn": 3,
    "flash_attn_varlen": 2,
    "flash_attn_backward": 2,
    "flash_attn_varlen_backward": 1,
    "dropout_mask": 1,
    "paged_attn": 3,
    "merge_attn_states": 1.5,
    "write_kv_cache": 1,
    "copy_blocks": 1.5,
    "swap_blocks": 1,
    "BlockManager": 2,
    "set_num_threads": 0.5,
    "Tensor": 1,
}


@st.composite
def cases(draw, fn):
    g = Gen(draw, fn)
    special = GENERATORS[fn](g)
    if special is not None:
        special["seed"] = g.int(0, 2**32 - 1)
        return special
    g.faults()
    return g.case()


def examples_for(fn: str, total: int) -> int:
    return max(3, round(total * WEIGHTS[fn] / sum(WEIGHTS.values())))


def describe_failure(case, verdict) -> str:
    lines = [f"{verdict['status']}: {verdict.get('why', '')}"]
    if verdict.get("exc"):
        lines.append(f"(the call raised {verdict['exc']}: {verdict.get('msg', '')})")
    if verdict.get("tb"):
        lines.append(verdict["tb"])
    if verdict.get("stderr"):
        lines.append("worker stderr (end):\n" + verdict["stderr"])
    lines.append(f"case: {case!r}")
    lines.append(
        'reproduce in-process: python -c \'import sys; sys.path[:0] = ["tests", "python"]; '
        "import fuzz_worker; print(fuzz_worker.run_case(<case>))'"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# pytest
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


def _total(config) -> int:
    opt = config.getoption("--fuzz-examples", default=None)
    if opt:
        return int(opt)
    return int(os.environ.get("PAGEDFLASH_FUZZ_EXAMPLES", DEFAULT_EXAMPLES))


@pytest.mark.parametrize("fn", list(GENERATORS))
def test_fuzz(fn, worker, request):
    """Random invalid and borderline calls of `fn`: documented exceptions only, nothing written
    by a failed call, no crash (module docstring)."""

    @settings(
        max_examples=examples_for(fn, _total(request.config)),
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(cases(fn))
    def check(case):
        verdict = worker.run(case)
        assert verdict["status"] in ("ok", "raised"), describe_failure(case, verdict)

    check()


# ---------------------------------------------------------------------------
# the long run: python tests/test_fuzz.py --examples 100000
# ---------------------------------------------------------------------------


def _recorder(fn, n, worker, stats, excs, failures):
    """A hypothesis test that runs n cases of fn and records every verdict (never fails)."""

    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(cases(fn))
    def record(case):
        verdict = worker.run(case)
        stats[(fn, verdict["status"])] += 1
        if verdict["status"] == "raised":
            excs[(fn, verdict["exc"])] += 1
        elif verdict["status"] != "ok":
            key = (fn, verdict["status"], verdict.get("why", "").split("\n")[0][:160])
            case0, verdict0, count = failures.get(key, (case, verdict, 0))
            failures[key] = (case0, verdict0, count + 1)

    return record


def long_run(total: int, only, seed, show: int) -> int:
    worker = Worker()
    stats: dict = collections.Counter()
    excs: dict = collections.Counter()
    failures: dict = {}
    t0 = time.time()
    fns = only or list(GENERATORS)
    weights = sum(WEIGHTS[f] for f in fns)
    try:
        for fn in fns:
            n = max(3, round(total * WEIGHTS[fn] / weights))
            t1 = time.time()

            record = _recorder(fn, n, worker, stats, excs, failures)
            if seed is not None:
                record = hypothesis_seed(seed)(record)
            record()
            done = sum(v for (f, _), v in stats.items() if f == fn)
            print(f"{fn:28s} {done:7d} cases  {time.time() - t1:7.1f} s", flush=True)
    finally:
        worker.close()
    elapsed = time.time() - t0
    ran = sum(stats.values())
    print(f"\n{ran} cases in {elapsed:.0f} s ({ran / max(elapsed, 1e-9):.0f}/s), worker started {worker.started} times")
    for status in ("ok", "raised", "fail", "crash", "hang", "error"):
        print(f"  {status:7s} {sum(v for (_, s), v in stats.items() if s == status)}")
    print("exceptions raised (documented types):")
    for (fn, exc), v in sorted(excs.items()):
        print(f"  {fn:28s} {exc:22s} {v}")
    if failures:
        print(f"\n{len(failures)} distinct failures:")
        for (fn, status, why), (case, verdict, count) in list(failures.items())[:show]:
            print(f"\n== {fn}: {status} x{count}: {why}")
            print(describe_failure(case, verdict)[:4000])
    else:
        print("\nno failures")
    return 1 if failures else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=10000, help="cases in all, split over the functions")
    ap.add_argument("--only", default="", help="comma-separated functions (default: all)")
    ap.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random)")
    ap.add_argument("--show", type=int, default=20, help="distinct failures to print")
    a = ap.parse_args(argv)
    only = [f for f in a.only.split(",") if f]
    for f in only:
        if f not in GENERATORS:
            ap.error(f"unknown function {f!r}; one of {', '.join(GENERATORS)}")
    return long_run(a.examples, only, a.seed, a.show)


if __name__ == "__main__":
    sys.exit(main())
