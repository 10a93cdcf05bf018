"""The one case builder and the one tolerance rule of the test suite.

Layout: tests/ops/test_<op>.py test one operation each, through the public API, over every
backend present: the `backend` fixture is "cpu" always and "cuda" where a CUDA device and a
CUDA build are present (those cases are marked `gpu`: `pytest -m gpu` selects them, and they
are skipped cleanly elsewhere). A test that runs the same case on both takes the fixture; one
whose grid differs per backend (small CPU shapes, kernel hints on CUDA) takes its cases from
`cases(...)`; GPU-only concerns use `cuda_only`, CPU-only ones (thread counts, host-side
validation of index values) `cpu_only`.

Inputs (`Backend.randn`, `make_paged_cache`, `make_paged_q`): fresh random normals (never zeros)
in the dtype, on the backend's device, in the library the backend is used from: NumPy for CPU
float32/float16, torch for bfloat16 and for CUDA. The `rng` fixture seeds them per test id
(PAGEDFLASH_TEST_SEED=n draws another set). Outputs are poisoned: tests pass out= / dq= ...
buffers filled with NaN, and every array the library allocates itself for a result (out, lse,
gradients, a dropout mask) starts as NaN (0xA5 for integers) in the tests under tests/ops
(`nan_outputs`), so an element a kernel never writes fails the comparison.

The rule (DESIGN.md "Testing numbers against a reference"; README "Testing rule"), against
pagedflash.reference in float64 (torch autograd in float64 for gradients):
  - out, gradients: a float16/bfloat16 result passes when
        max|x - ref| <= 2 * max|naive_same_precision - ref| + 1e-5     (3x for gradients)
    where naive_same_precision is the naive algorithm run in the input dtype:
    pagedflash.reference.attention_torch on the CPU (S = Q K^T, the softmax written out, O = P V,
    every operation in the dtype), gradients by torch autograd through it in the dtype (float64
    autograd through it is the gradient reference); float32 passes at 1e-5 relative
    (max|x - ref| <= 1e-5 * max(1, max|ref|)). No NaN anywhere.
  - lse (and merged lse): -inf exactly where the reference is -inf (a row that sees no key),
    never NaN, and elsewhere max|lse - ref| <= 1e-5 * max(1, max|ref|): the float32 rule
    whatever the input dtype. Why: lse is float32 computed from the dtype inputs with float32
    arithmetic only (products of float16/bfloat16 inputs are exact in float32, scores are
    accumulated, the row maximum and sum kept and the log taken in float32, split partials
    merged in float32); no rounding to float16/bfloat16 enters it, so the naive-precision
    allowance does not apply. Its error is the score's float32 accumulation error plus the
    exp2/log2 approximations (~2^-22 on CUDA): a few 1e-6 for |lse| ~ 10. Measured on the CPU
    cases: at most 4.8e-7 relative (608 checks, median 1e-7). The former GPU tests allowed
    1e-4 per element relative (flash) and 2e-3 relative (paged, float16/bfloat16).
"""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest

try:
    import torch
except ImportError:  # torch is optional for most tests
    torch = None
else:
    # The references and naive baselines the tests compute with torch are small: one thread runs
    # them faster than several that contend with the library's own threads (measured on the 2-core
    # CI machine: autograd of a [1, 113, 4, 40] naive attention 0.02 s instead of 0.36 s).
    torch.set_num_threads(1)

import pagedflash
from pagedflash import reference

DTYPES = ["float32", "float16", "bfloat16"]
LOWP = ["float16", "bfloat16"]

# rule constants (see the module docstring)
FLOAT32_RTOL = 1e-5
LOWP_FACTOR = 2.0
GRAD_FACTOR = 3.0
LOWP_ATOL = 1e-5
LSE_RTOL = 1e-5

# one unit in the last place (of values in [1, 2)) per dtype; float32 uses the rule's tolerance
ULP = {"float32": FLOAT32_RTOL, "float16": 2.0**-10, "bfloat16": 2.0**-7}


# ---------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------

_CUDA = None


def has_cuda() -> bool:
    """A CUDA device that torch sees and a pagedflash build with the CUDA backend."""
    global _CUDA
    if _CUDA is None:
        _CUDA = bool(torch is not None and torch.cuda.is_available() and pagedflash.build_info()["cuda_devices"] > 0)
    return _CUDA


def pytest_addoption(parser):
    parser.addoption(
        "--fuzz-examples",
        type=int,
        default=None,
        help="cases tests/test_fuzz.py runs in all (default: PAGEDFLASH_FUZZ_EXAMPLES, else 1000)",
    )


def pytest_collection_modifyitems(config, items):
    if has_cuda():
        return
    skip = pytest.mark.skip(reason="no CUDA device (or pagedflash built without CUDA)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A build with trimmed CUDA head dims (PAGEDFLASH_HEADDIMS=64,128: quick builds) says so in
    its NotImplementedError ("head_dim ... has no CUDA kernel in this build"): such a case is
    reported as skipped, naming the head dim. A full build never raises it, so nothing is hidden
    there; every other NotImplementedError fails the test."""
    outcome = yield
    report = outcome.get_result()
    if (
        report.when == "call"
        and report.failed
        and call.excinfo is not None
        and call.excinfo.errisinstance(NotImplementedError)
        and "has no CUDA kernel in this build" in str(call.excinfo.value)
    ):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {call.excinfo.value}")


class Backend:
    """Where a test's tensors live. name: "cpu" or "cuda"."""

    def __init__(self, name: str):
        self.name = name
        self.device = name
        self.is_cuda = name == "cuda"

    def __repr__(self):
        return f"Backend({self.name!r})"

    def randn(self, rng, shape, dtype, *, scale=1.0, lib=None):
        """Fresh random normals in `dtype` on this backend (NumPy for CPU float32/float16 unless
        lib="torch"; torch for bfloat16 and CUDA)."""
        return randn(rng, shape, dtype, scale=scale, device=self.device, lib=lib)

    def put(self, x):
        """A host array (NumPy or torch CPU) on this backend: itself on the CPU, a torch CUDA
        copy on CUDA (index arrays included: device-resident, as a serving loop keeps them)."""
        if x is None or not self.is_cuda:
            return x
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(x))
        return x.to("cuda", copy=True)

    def host(self, x):
        """A backend array as a host array in the same library (torch CUDA -> torch CPU)."""
        if torch is not None and isinstance(x, torch.Tensor) and x.device.type != "cpu":
            return x.cpu()
        return x

    def sync(self):
        if self.is_cuda:
            torch.cuda.synchronize()

    @property
    def has_sm90(self) -> bool:
        """The wgmma kernels can run here: a compute capability 9.x device and sm_90 built."""
        if not self.is_cuda:
            return False
        archs = [a.strip() for a in pagedflash.build_info().get("cuda_archs", "").split(",")]
        return any(a.startswith("90") for a in archs) and torch.cuda.get_device_capability()[0] == 9

    def refuses(self, kernel: str) -> bool:
        """Whether a kernel hint from the test grids cannot run on this device: only "sm90"
        where the wgmma kernels are absent. Tests then assert NotImplementedError."""
        return self.is_cuda and kernel == "sm90" and not self.has_sm90


_BACKENDS = {}


def _backend(name: str) -> Backend:
    if name == "cuda" and not has_cuda():
        pytest.skip("no CUDA device (or pagedflash built without CUDA)")
    if name not in _BACKENDS:
        _BACKENDS[name] = Backend(name)
    return _BACKENDS[name]


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def backend(request) -> Backend:
    """Every backend present: "cpu", and "cuda" (marked gpu) where there is a CUDA device."""
    return _backend(request.param)


def _id(x) -> str:
    if isinstance(x, bool):
        return "T" if x else "F"
    if isinstance(x, float):
        return f"{x:g}"
    if isinstance(x, (tuple, list)):
        return "x".join(_id(e) for e in x)
    return str(x)


def cases(argnames: str = "", *, cpu=(), cuda=(), ids=None):
    """parametrize("backend, <argnames>") with one grid of rows per backend: `cpu` rows run on
    the CPU backend, `cuda` rows (marked gpu) on CUDA. A row is a tuple of the argnames' values
    (or a single value); ids(*row) names it (default: the values joined by "-"). The test id
    is "<backend>-<row id>"."""
    names = [n.strip() for n in argnames.split(",") if n.strip()]
    params = []
    for be, rows in (("cpu", cpu), ("cuda", cuda)):
        for row in rows:
            row = tuple(row) if isinstance(row, (tuple, list)) and len(names) != 1 else (row,)
            if not names:
                row = ()
            assert len(row) == len(names), (argnames, row)
            rid = ids(*row) if ids else "-".join(_id(x) for x in row)
            params.append(
                pytest.param(be, *row, id=f"{be}-{rid}" if rid else be, marks=[pytest.mark.gpu] if be == "cuda" else [])
            )
    return pytest.mark.parametrize(",".join(["backend"] + names), params, indirect=["backend"])


def refused(backend, kernel, call) -> bool:
    """Where this device cannot run `kernel` (Backend.refuses), assert that call() raises
    NotImplementedError and return True (the case ends there); else False."""
    if not backend.refuses(kernel):
        return False
    with pytest.raises(NotImplementedError):
        call()
    return True


cpu_only = cases(cpu=[()])  # host-side concerns: thread counts, validation of index values
cuda_only = cases(cuda=[()])  # GPU-only concerns: streams, graphs, device-resident indices


def flash_kernels(
    backend: str, dtype: str, d: int, *, extras=False, dropout=False, backward=False, deterministic=False
):
    """Kernel hints a flash_attn / flash_attn_backward case runs with on `backend`.

    CPU: "auto" (one kernel, every valid hint ignored: test_flash_fwd.py::test_kernel_hints).
    CUDA float32: "auto" (one CUDA-core kernel; "sm80"/"sm90" are refused). CUDA float16 /
    bfloat16: "auto" (sm90 on Hopper) and "sm80", plus "sm90" where the wgmma kernels must take
    the call: head dims 64 and 128, any mask; forward: dropout too, and softcap / ALiBi / a
    negative scale (`extras`) at d = 128 only; backward: no extras, no dropout, not
    deterministic. Off Hopper (or without sm_90 built) an "sm90" case asserts NotImplementedError.
    """
    if backend == "cpu" or dtype == "float32":
        return ["auto"]
    ks = ["auto", "sm80"]
    if d in (64, 128) and not deterministic:
        if backward:
            ok = not extras and not dropout
        else:
            ok = not extras or d == 128
        if ok:
            ks.append("sm90")
    return ks


# The paged kernels the CTA-shape tests force on CUDA, each with the KV-head count it runs at
# (2x8 with 3 and 4x8 with 6 KV heads leave idle warps in a CTA's last group): H KV heads x W
# warps, K/V through the shared-memory ring unless "+registers"; "simple" = CUDA cores.
# (The former PAGEDFLASH_PAGED_MODE / _RING settings: 8x8 = mode 2, 4x4 = mode 1, 1x4 = mode 0,
# "+registers" = ring 0.)
PAGED_KERNELS = [
    ("8x8+registers", 8),
    ("4x4+registers", 4),
    ("8x8", 8),
    ("4x4", 4),
    ("1x4+registers", 4),
    ("1x4", 4),
    ("1x8", 4),
    ("2x8", 3),
    ("4x8", 6),
    ("simple", 4),
]
# tensor-core paged kernels exist for these head dims (float16 / bfloat16); 1x8, 2x8, 4x8 for 64, 128
PAGED_TC_HEAD_DIMS = (32, 64, 96, 128, 192, 256)


# ---------------------------------------------------------------------------
# inputs and outputs
# ---------------------------------------------------------------------------


@pytest.fixture
def rng(request):
    """A generator seeded per test: different across tests, identical across runs (a failure
    reproduces). PAGEDFLASH_TEST_SEED=n draws another set of inputs everywhere."""
    base = int(os.environ.get("PAGEDFLASH_TEST_SEED", "0"))
    return np.random.default_rng([zlib.crc32(request.node.nodeid.encode()), base])


def randn(rng, shape, dtype, *, scale=1.0, device="cpu", lib=None):
    """Random normals in `dtype`: NumPy for float32/float16 on the CPU, torch for bfloat16,
    CUDA, or lib="torch"."""
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    if dtype == "bfloat16" or device != "cpu" or lib == "torch":
        if torch is None:
            pytest.skip("bfloat16 and CUDA tests need torch")
        return torch.from_numpy(x).to(device=device, dtype=getattr(torch, dtype))
    return x.astype(np.dtype(dtype))


def as_np64(x) -> np.ndarray:
    """Any array (NumPy, torch on any device, pagedflash.Tensor) as float64 NumPy."""
    return reference.to_f64(x)


def poison_like(x):
    """An output buffer like x (same library, device, dtype, shape) filled with NaN."""
    if torch is not None and isinstance(x, torch.Tensor):
        return torch.full_like(x, float("nan"))
    out = np.empty_like(x)
    out.fill(np.nan)
    return out


def nan_buffer(shape, like, dtype=None):
    """A NaN-filled buffer of `shape` in like's library and device (dtype: like's, or a name)."""
    if torch is not None and isinstance(like, torch.Tensor):
        dt = like.dtype if dtype is None else getattr(torch, dtype)
        return torch.full(tuple(shape), float("nan"), dtype=dt, device=like.device)
    return np.full(shape, np.nan, dtype=like.dtype if dtype is None else np.dtype(dtype))


def _poisoned(x):
    if torch is not None and isinstance(x, torch.Tensor):
        return x.fill_(float("nan") if x.is_floating_point() else 0xA5)
    x.fill(np.nan if x.dtype.kind in "fV" else 0xA5)
    return x


@pytest.fixture
def nan_outputs(monkeypatch):
    """Every result array the library allocates (out, lse, dq/dk/dv, a dropout mask) starts as
    NaN (0xA5 in integer arrays), not as whatever the allocator hands back: on the C call path
    (NumPy and torch, allocated in csrc/py/library.c) through _C._set_result_hook, on the Python
    general path (other libraries) by patching its allocators."""
    from pagedflash import _C
    from pagedflash import _frameworks as fw

    def hook(x):
        _poisoned(x)
        # the fill runs on torch's current stream; a call given another stream (stream=...) must
        # not race ahead of it
        if torch is not None and isinstance(x, torch.Tensor) and x.is_cuda:
            if not torch.cuda.is_current_stream_capturing():
                torch.cuda.current_stream(x.device).synchronize()

    for cls in (fw._Numpy, fw._Torch):
        real = cls.empty
        monkeypatch.setattr(
            cls, "empty", staticmethod(lambda shape, dtype, like, _real=real: _poisoned(_real(shape, dtype, like)))
        )
    # The fill of a CUDA result runs on torch's current stream, like the library's kernels; a
    # call given another stream explicitly (stream=...) must not race ahead of it.
    real_stream = fw._Torch.stream

    def stream(like, stream, _real=real_stream):
        if stream is not None and like.device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
            torch.cuda.current_stream(like.device).synchronize()
        return _real(like, stream)

    monkeypatch.setattr(fw._Torch, "stream", staticmethod(stream))
    _C._set_result_hook(hook)
    yield
    _C._set_result_hook(None)


@pytest.fixture(autouse=True)
def _ops_outputs_are_poisoned(request):
    if request.node.path.parent.name == "ops":
        request.getfixturevalue("nan_outputs")


def cu_seqlens(lens) -> np.ndarray:
    """int32 prefix sums [0, l0, l0 + l1, ...] (cu_seqlens of a packed batch)."""
    return np.concatenate([[0], np.cumsum(np.asarray(lens, dtype=np.int64))]).astype(np.int32)


def dropout_keep(
    q, k, *, dropout_p, seed, offset=0, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0
):
    """The keep mask pagedflash.dropout_mask reports for (dropout_p, seed, offset), on q's backend;
    for a packed batch on CUDA (which has no packed dropout mask) the CPU backend's, from host
    copies: both follow pagedflash_philox.h (tests/ops/test_dropout_mask.py checks that)."""
    kw = dict(dropout_p=dropout_p, seed=seed, offset=offset)
    if cu_seqlens_q is None:
        return pagedflash.dropout_mask(q, k, **kw)

    def host(x):
        return x.cpu() if torch is not None and isinstance(x, torch.Tensor) else x

    return pagedflash.dropout_mask(
        host(q),
        host(k),
        cu_seqlens_q=host(cu_seqlens_q),
        cu_seqlens_k=host(cu_seqlens_k),
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        **kw,
    )


def alibi_slopes(rng, kind, batch, h, lo=0.05, hi=1.0):
    """None, per-head ("head": [h]) or per-sequence ("batch": [batch, h]) float32 slopes."""
    if kind is None:
        return None
    shape = (h,) if kind in ("head", "heads") else (batch, h)
    return rng.uniform(lo, hi, shape).astype(np.float32)


# ---------------------------------------------------------------------------
# the naive algorithm in the input precision
# ---------------------------------------------------------------------------


def _torch_cpu(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    return torch.from_numpy(np.ascontiguousarray(x))


def _naive_torch(q, k, v, **opts):
    """The naive algorithm in q's torch dtype: reference.attention_torch (S = Q K^T, the softmax
    written out, dropout keep / (1 - p), O = P V, every operation in the dtype). Differentiable;
    fully masked rows give 0 and zero gradients."""
    return reference.attention_torch(q, k, v, **opts)


def naive_attention_lowp(q, k, v, **opts):
    """The naive algorithm run in the input's own precision (on the CPU), as float64 NumPy.

    q [b, sq, h, d], k/v [b, sk, hk, d] (NumPy, torch on any device); options as
    reference.attention, incl. dropout_p with a keep mask dropout_mask [b, h, sq, sk]."""
    if torch is None:  # NumPy float16 fallback: the float64 algorithm on the rounded inputs
        return reference.attention(q, k, v, **opts)
    tq, tk, tv = (_torch_cpu(x) for x in (q, k, v))
    return _naive_torch(tq, tk, tv, **opts).to(torch.float64).numpy()


def naive_attention_varlen_lowp(q, k, v, cq, ck, *, alibi_slopes=None, dropout_masks=None, **opts):
    """naive_attention_lowp per sequence of a packed batch: q [total_q, h, d], k/v [total_k, hk, d];
    alibi_slopes [h] or [batch, h]; dropout_masks one keep mask [h, sq_b, sk_b] per sequence."""
    cq, ck = (np.asarray(as_np64(c)).astype(np.int64) for c in (cq, ck))
    out = np.zeros(tuple(q.shape))
    for i in range(len(cq) - 1):
        qs, ks = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
        if qs.stop == qs.start:
            continue
        sl = None if alibi_slopes is None else (alibi_slopes if np.ndim(alibi_slopes) == 1 else alibi_slopes[i])
        mask = None if dropout_masks is None else np.asarray(dropout_masks[i])[None]
        out[qs] = naive_attention_lowp(
            q[qs][None], k[ks][None], v[ks][None], alibi_slopes=sl, dropout_mask=mask, **opts
        )[0]
    return out


def naive_grads(dout, q, k, v, *, dtype, **opts):
    """(dq, dk, dv) as float64 NumPy: torch autograd through the naive algorithm run in `dtype`
    ("float64": the autograd reference; "float16"/"bfloat16": the naive same-precision
    gradients of the rule). Options as naive_attention_lowp."""
    tdt = getattr(torch, dtype)
    tq, tk, tv = (_torch_cpu(x).to(tdt).requires_grad_() for x in (q, k, v))
    _naive_torch(tq, tk, tv, **opts).backward(_torch_cpu(dout).to(tdt))
    return tuple(t.grad.to(torch.float64).numpy() for t in (tq, tk, tv))


# ---------------------------------------------------------------------------
# the rule
# ---------------------------------------------------------------------------


def assert_close(out, ref, naive=None, *, dtype, grad=False, what="out"):
    """The DESIGN.md rule for out and gradients (module docstring). out: any array; ref: float64
    reference; naive: the naive same-precision result (float16/bfloat16 only)."""
    o = as_np64(out)
    r = np.asarray(ref, dtype=np.float64)
    assert o.shape == r.shape, f"{what}: shape {o.shape} != reference {r.shape}"
    assert not np.isnan(o).any(), f"{what}: NaN (an unwritten element, or NaN produced)"
    err = float(np.max(np.abs(o - r))) if o.size else 0.0
    if dtype == "float32":
        tol = FLOAT32_RTOL * max(float(np.max(np.abs(r))) if r.size else 0.0, 1.0)
    else:
        assert naive is not None, "a float16/bfloat16 comparison needs the naive same-precision result"
        nerr = float(np.max(np.abs(as_np64(naive) - r))) if r.size else 0.0
        tol = (GRAD_FACTOR if grad else LOWP_FACTOR) * nerr + LOWP_ATOL
    assert err <= tol, f"{what}: max error {err:.3e} > tolerance {tol:.3e} ({dtype})"


def check_lse(lse, ref_lse, what="lse"):
    """The lse rule (module docstring): -inf exactly where the reference is, no NaN, and the
    float32 rule elsewhere, whatever the input dtype."""
    got = as_np64(lse)
    ref = np.asarray(ref_lse, dtype=np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != reference {ref.shape}"
    assert not np.isnan(got).any(), f"{what}: NaN (an unwritten element, or NaN produced)"
    inf = np.isneginf(ref)
    assert np.array_equal(np.isneginf(got), inf), f"{what}: -inf exactly where a row sees no key"
    fin = ~inf
    if fin.any():
        assert np.isfinite(got[fin]).all(), f"{what}: not finite where the reference is"
        err = float(np.max(np.abs(got[fin] - ref[fin])))
        tol = LSE_RTOL * max(1.0, float(np.max(np.abs(ref[fin]))))
        assert err <= tol, f"{what}: max error {err:.3e} > tolerance {tol:.3e}"


def check_grads(grads, dout, q, k, v, dtype, *, dropout_mask=None, **opts):
    """(dq, dk, dv) against reference.attention_backward and torch autograd in float64 (which
    must agree to 1e-9), under the rule with factor 3. Dense layout."""
    ref_np = reference.attention_backward(dout, q, k, v, dropout_mask=dropout_mask, **opts)
    ref_ag = naive_grads(dout, q, k, v, dtype="float64", dropout_mask=dropout_mask, **opts)
    naive = (
        (None,) * 3
        if dtype == "float32"
        else naive_grads(dout, q, k, v, dtype=dtype, dropout_mask=dropout_mask, **opts)
    )
    for name, g, rn, ra, nv in zip(("dq", "dk", "dv"), grads, ref_np, ref_ag, naive):
        assert np.max(np.abs(rn - ra), initial=0.0) <= 1e-9 * max(1.0, np.max(np.abs(rn), initial=0.0))
        assert_close(g, rn, nv, dtype=dtype, grad=True, what=name)


def check_grads_varlen(grads, dout, q, k, v, cq, ck, dtype, *, alibi_slopes=None, dropout_masks=None, **opts):
    """check_grads for the packed layout: the NumPy reference on the whole batch, autograd
    (float64 and the dtype) per sequence; a key no query sees gets exactly zero gradient."""
    refs = reference.attention_varlen_backward(
        dout, q, k, v, cq, ck, alibi_slopes=alibi_slopes, dropout_masks=dropout_masks, **opts
    )
    cq, ck = (np.asarray(as_np64(c)).astype(np.int64) for c in (cq, ck))
    ag = [np.zeros(r.shape) for r in refs]
    naive = [np.zeros(r.shape) for r in refs]
    for i in range(len(cq) - 1):
        qs, ks = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
        sub = dict(opts)
        if alibi_slopes is not None:
            sub["alibi_slopes"] = alibi_slopes if np.ndim(alibi_slopes) == 1 else alibi_slopes[i]
        if dropout_masks is not None:
            sub["dropout_mask"] = np.asarray(dropout_masks[i])[None]
        args = (dout[qs][None], q[qs][None], k[ks][None], v[ks][None])
        for dst, dt in ((ag, "float64"), (naive, dtype if dtype != "float32" else None)):
            if dt is None:
                continue
            g = naive_grads(*args, dtype=dt, **sub)
            dst[0][qs], dst[1][ks], dst[2][ks] = g[0][0], g[1][0], g[2][0]
    for name, g, r, a, nv in zip(("dq", "dk", "dv"), grads, refs, ag, naive):
        assert np.max(np.abs(r - a), initial=0.0) <= 1e-9 * max(1.0, np.max(np.abs(r), initial=0.0))
        assert_close(g, r, None if dtype == "float32" else nv, dtype=dtype, grad=True, what=name)
    for i in np.flatnonzero(np.diff(cq) == 0):
        ks = slice(ck[i], ck[i + 1])
        assert np.all(as_np64(grads[1])[ks] == 0) and np.all(as_np64(grads[2])[ks] == 0), (
            f"sequence {i} has no queries: dk = dv = 0"
        )


# ---------------------------------------------------------------------------
# paged caches
# ---------------------------------------------------------------------------


class PagedCache:
    """A paged K/V cache on a backend: k, v [num_blocks, bs, hk, d], block_tables int32
    [batch, max_blocks], seq_lens int32 [batch] (iterate to unpack these four) and `host`:
    the same four on the host (caches in the host library, index arrays as NumPy). A compressed
    cache (make_paged_cache's kv=) also has `scales`, its k_scale / v_scale keywords (host NumPy
    float32; empty for float caches), and `values`: what its elements stand for, in float64."""

    def __init__(self, backend, kc, vc, bt, sl, bs, scales=None, values=None):
        self.host = (kc, vc, bt, sl)
        self.bs = bs
        self.k, self.v = backend.put(kc), backend.put(vc)
        self.block_tables, self.seq_lens = backend.put(bt), backend.put(sl)
        self.scales = scales or {}
        self.values = values

    def __iter__(self):
        return iter((self.k, self.v, self.block_tables, self.seq_lens))

    def values_like(self, q):
        """(k, v) for the naive same-precision baseline of queries q: the host caches, or a
        compressed cache's values in q's dtype and library."""
        if self.values is None:
            return self.host[0], self.host[1]
        if torch is not None and isinstance(q, torch.Tensor):
            return tuple(torch.from_numpy(x.astype(np.float32)).to(q.dtype) for x in self.values)
        return tuple(x.astype(q.dtype) for x in self.values)


# compressed KV caches (docs/serving.md): the largest magnitude of each format
KV_MAX = {"float8_e4m3fn": 448.0, "float8_e5m2": 57344.0, "int8": 127.0}


def as_kv_cache(codes, dtype, lib):
    """reference.quantize_kv's codes (uint8 bytes for float8, int8) as a `dtype` cache in `lib`
    ("numpy": ml_dtypes float8 / NumPy int8, skipped without ml_dtypes; "torch")."""
    codes = np.ascontiguousarray(codes)
    if lib == "torch":
        if torch is None:
            pytest.skip("needs torch")
        t = torch.from_numpy(codes)
        return t.view(getattr(torch, dtype)) if dtype.startswith("float8") else t
    if dtype.startswith("float8"):
        ml = pytest.importorskip("ml_dtypes")
        return codes.view(getattr(ml, dtype))
    return codes


def kv_tensor_scale(x, dtype):
    """A per-tensor scale as vLLM calibrates one: max|x| / the format's largest value (x 1.3)."""
    return np.float32(1.3 * float(np.nanmax(np.abs(x))) / KV_MAX[dtype])


def quantize_kv_cache(rng, x, dtype, kind):
    """(codes, scale) of a float32 cache x [..., d] in a compressed `dtype` with a scale of `kind`
    ("none": absent, float8 only; "tensor"; "row": per (token, head), int8 only). Rows holding NaN
    (slots no sequence holds) come out poisoned: NaN codes for float8, NaN row scales for int8 (a
    per-tensor int8 cache cannot hold NaN: any code)."""
    stale = np.isnan(x).any(axis=-1)
    x = np.where(np.isnan(x), rng.standard_normal(x.shape), x).astype(np.float32)
    codes, s = reference.quantize_kv(x, dtype, kv_tensor_scale(x, dtype) if kind == "tensor" else None)
    if dtype.startswith("float8"):
        codes[stale] = 0x7F | (rng.integers(0, 2, codes[stale].shape) << 7).astype(np.uint8)
    elif kind == "row":
        s = s.copy()
        s[stale] = np.nan
    return codes, (None if kind == "none" else s)


def make_paged_cache(backend, rng, lens, hk, d, bs, dtype, *, share=False, spare=3, pad_value=None, kv=None, lib=None):
    """Paged K/V caches holding sequences of the given lengths, on `backend` (a Backend).

    Blocks come from a random permutation; each sequence's last block is partial unless its
    length is a multiple of bs; with share, sequence 1 reuses sequence 0's full blocks as its
    prefix. Every slot no sequence holds (partial blocks' tails, the `spare` unused blocks)
    holds stale NaN, and unused block-table entries hold garbage (pad_value, default a mix of -1
    and ids far out of range): none of it may reach an output. kv=(cache dtype, scale kind):
    the caches compressed (quantize_kv_cache of keys x 3 and values x 0.5; stale slots poisoned)
    for queries of `dtype`, in `lib` (default: torch for bfloat16 and CUDA, else NumPy).
    Returns a PagedCache.
    """
    lens = [int(x) for x in lens]
    need = [(n + bs - 1) // bs for n in lens]
    shared = min(lens[0] // bs, need[1]) if share and len(lens) > 1 else 0
    num_blocks = sum(need) - shared + spare
    perm = rng.permutation(num_blocks)
    max_blocks = max(need + [1]) + 2
    bt = np.empty((len(lens), max_blocks), dtype=np.int32)
    bt[:] = -1 if pad_value is None else pad_value
    if pad_value is None:
        bt[:, -1] = 10**6
    nxt = 0
    for b, n in enumerate(need):
        for j in range(n):
            if b == 1 and j < shared:
                bt[b, j] = bt[0, j]
            else:
                bt[b, j] = perm[nxt]
                nxt += 1
    lib = lib or ("torch" if backend.is_cuda or (kv and dtype == "bfloat16") else None)
    values_dtype = "float32" if kv else dtype
    kc = randn(rng, (num_blocks, bs, hk, d), values_dtype, lib=None if kv else lib)
    vc = randn(rng, (num_blocks, bs, hk, d), values_dtype, lib=None if kv else lib)
    used = np.zeros((num_blocks, bs), dtype=bool)
    for b, n in enumerate(lens):
        t = np.arange(n)
        used[bt[b, t // bs], t % bs] = True
    blk, slot = np.nonzero(~used)
    if len(blk):
        if torch is not None and isinstance(kc, torch.Tensor):
            blk, slot = torch.from_numpy(blk), torch.from_numpy(slot)
        kc[blk, slot] = float("nan")
        vc[blk, slot] = float("nan")
    sl = np.asarray(lens, dtype=np.int32)
    if not kv:
        return PagedCache(backend, kc, vc, bt, sl, bs)
    kv_dtype, kind = kv
    kcodes, ks = quantize_kv_cache(rng, kc * np.float32(3.0), kv_dtype, kind)
    vcodes, vs = quantize_kv_cache(rng, vc * np.float32(0.5), kv_dtype, kind)
    scales = {} if ks is None else {"k_scale": ks, "v_scale": vs}
    values = tuple(reference.dequantize_kv(c, s, dtype=kv_dtype) for c, s in ((kcodes, ks), (vcodes, vs)))
    kq, vq = (as_kv_cache(c, kv_dtype, lib or "numpy") for c in (kcodes, vcodes))
    return PagedCache(backend, kq, vq, bt, sl, bs, scales=scales, values=values)


def gather(cache, row, length, bs):
    """A sequence's tokens [length, hk, d] from a host cache, in its own dtype and library."""
    t = np.arange(length)
    blocks, offs = np.asarray(row)[t // bs].astype(np.int64), t % bs
    if torch is not None and isinstance(cache, torch.Tensor):
        return cache[torch.from_numpy(blocks), torch.from_numpy(offs)]
    return cache[blocks, offs]


def make_paged_q(backend, rng, layout, qlens, h, d, dtype):
    """Queries in a layout on `backend`: 'decode' [batch, h, d], 'dense' [batch, q_len, h, d],
    'packed' [total, h, d] with cu_seqlens_q. Returns (q, cu_seqlens_q or None, q_host,
    cu_host or None, offsets): offsets int64 [batch + 1], every layout's row ranges."""
    batch = len(qlens)
    lib = "torch" if backend.is_cuda else None
    if layout == "decode":
        assert all(x == 1 for x in qlens)
        q, cu, offs = randn(rng, (batch, h, d), dtype, lib=lib), None, np.arange(batch + 1)
    elif layout == "dense":
        assert len(set(qlens)) == 1
        q, cu, offs = randn(rng, (batch, qlens[0], h, d), dtype, lib=lib), None, np.arange(batch + 1) * qlens[0]
    else:
        cu = cu_seqlens(qlens)
        q, offs = randn(rng, (int(cu[-1]), h, d), dtype, lib=lib), cu.astype(np.int64)
    return backend.put(q), backend.put(cu), q, cu, offs


def naive_lowp_paged(q, cache, offs, *, alibi_slopes=None, **opts):
    """naive_attention_lowp per sequence on the gathered contiguous K/V (host copies), in q's
    layout. q: host queries; cache: a PagedCache; offs: make_paged_q's offsets."""
    kc, vc = cache.values_like(q)
    bt, lens = cache.host[2], cache.host[3]
    d, h = q.shape[-1], q.shape[-2]
    flat = q.reshape(-1, h, d)
    out = np.zeros((flat.shape[0], h, d))
    for b, n in enumerate(lens):
        qs = slice(int(offs[b]), int(offs[b + 1]))
        if qs.stop == qs.start:
            continue
        k = gather(kc, bt[b], int(n), cache.bs)[None]
        v = gather(vc, bt[b], int(n), cache.bs)[None]
        sl = None
        if alibi_slopes is not None:
            sl = alibi_slopes if alibi_slopes.ndim == 1 else alibi_slopes[b : b + 1]
        out[qs] = naive_attention_lowp(flat[qs][None], k, v, alibi_slopes=sl, **opts)[0]
    return out.reshape(tuple(q.shape))
