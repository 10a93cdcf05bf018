"""Shared test helpers: fresh random inputs, NaN poisoning, and the DESIGN.md
tolerance rule against the float64 reference.

Rule: a float16/bfloat16 result passes when
    max|out - ref| <= 2 * max|naive_same_precision - ref| + 1e-5
(3x for gradients), where naive_same_precision is the naive algorithm run in the
input dtype (computed here with torch on the CPU, or NumPy for float16 without
torch); float32 passes at 1e-5 relative (max error / max |ref|).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

try:
    import torch
except ImportError:  # torch is optional for most tests
    torch = None

from pagedflash import reference

DTYPES = ["float32", "float16", "bfloat16"]


def has_cuda() -> bool:
    if torch is None or not torch.cuda.is_available():
        return False
    import pagedflash

    return pagedflash.build_info()["cuda_devices"] > 0


def pytest_collection_modifyitems(config, items):
    if has_cuda():
        return
    skip = pytest.mark.skip(reason="no CUDA device (or pagedflash built without CUDA)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng(request):
    """A generator seeded per test: different across tests, identical across runs (a failure
    reproduces). PAGEDFLASH_TEST_SEED=n draws another set of inputs everywhere."""
    import zlib

    base = int(os.environ.get("PAGEDFLASH_TEST_SEED", "0"))
    return np.random.default_rng([zlib.crc32(request.node.nodeid.encode()), base])


def randn(rng, shape, dtype, *, scale=1.0, device="cpu", lib=None):
    """Random normals in `dtype`: NumPy for float32/float16 on the CPU, torch for
    bfloat16, CUDA, or lib="torch"."""
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    if dtype == "bfloat16" or device != "cpu" or lib == "torch":
        if torch is None:
            pytest.skip("bfloat16 and CUDA tests need torch")
        return torch.from_numpy(x).to(device=device, dtype=getattr(torch, dtype))
    return x.astype(np.dtype(dtype))


def as_np64(x) -> np.ndarray:
    return reference.to_f64(x)


def poison_like(x):
    """An output buffer like x filled with NaN (so unwritten elements fail)."""
    if torch is not None and isinstance(x, torch.Tensor):
        return torch.full_like(x, float("nan"))
    out = np.empty_like(x)
    out.fill(np.nan)
    return out


def naive_attention_lowp(q, k, v, *, causal=False, softmax_scale=None, window=(-1, -1), softcap=0.0,
                         alibi_slopes=None):
    """The naive algorithm (S, P, O materialized) run in the input's own precision.

    q [b, sq, h, d], k/v [b, sk, hk, d], NumPy or torch CPU. Returns float64 NumPy.
    """
    if torch is not None:
        tq, tk, tv = (x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x)) for x in (q, k, v))
        tq, tk, tv = (t.detach().cpu() for t in (tq, tk, tv))
        dt = tq.dtype
        s, _, vv = reference.naive_scores_torch(tq, tk, tv, causal=causal, softmax_scale=softmax_scale, window=window,
                                                softcap=softcap, alibi_slopes=alibi_slopes)
        p = torch.softmax(s.float(), dim=-1).to(dt)  # softmax itself as torch does it in low precision
        p = torch.nan_to_num(p, nan=0.0)
        o = torch.einsum("bhij,bjhd->bihd", p, vv)
        return o.to(torch.float64).numpy()
    # NumPy float16 fallback
    qn, kn, vn = (np.asarray(x) for x in (q, k, v))
    return reference.attention(qn, kn, vn, causal=causal, softmax_scale=softmax_scale, window=window,
                               softcap=softcap, alibi_slopes=alibi_slopes)


def assert_close(out, ref, naive=None, *, dtype, factor=2.0, what="out"):
    """The DESIGN.md rule. out/ref/naive: arrays (any library); ref float64."""
    o = as_np64(out)
    r = np.asarray(ref, dtype=np.float64)
    assert o.shape == r.shape, f"{what}: shape {o.shape} != reference {r.shape}"
    assert not np.isnan(o).any(), f"{what}: NaN in output (unwritten element or NaN produced)"
    err = float(np.max(np.abs(o - r))) if o.size else 0.0
    if dtype == "float32":
        scale = float(np.max(np.abs(r))) if r.size else 0.0
        tol = 1e-5 * max(scale, 1.0)
    else:
        assert naive is not None, "low-precision comparison needs the naive same-precision result"
        nerr = float(np.max(np.abs(as_np64(naive) - r))) if r.size else 0.0
        tol = factor * nerr + 1e-5
    assert err <= tol, f"{what}: max error {err:.3e} > tolerance {tol:.3e} ({dtype})"
