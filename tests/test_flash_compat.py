"""The FlashAttention 2.x entry points (pagedflash.flash_compat): flash_attn_func,
flash_attn_varlen_func (packed, and paged with block_table) and flash_attn_with_kvcache (dense and
paged caches, new tokens appended in place, rotary, cache_batch_idx), against the float64 reference
under the rule of tests/conftest.py; gradients through torch autograd against float64 autograd.

The calls have no out= (flash-attn's Python API has none), so nothing is poisoned there; the paged
caches hold stale NaN in every slot no sequence owns (make_paged_cache) and the kvcache tests check
every element of the caches after the call: the new tokens where they belong, nothing else changed.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import pagedflash
from conftest import (
    DTYPES,
    ULP,
    alibi_slopes,
    as_np64,
    assert_close,
    cases,
    check_grads,
    check_grads_varlen,
    check_lse,
    cpu_only,
    cu_seqlens,
    make_paged_cache,
    naive_attention_lowp,
    naive_attention_varlen_lowp,
    naive_lowp_paged,
    randn,
    torch,
)
from pagedflash import reference

# ---------------------------------------------------------------------------
# signatures: flash-attn 2.6-2.8's parameter names, order and defaults
# ---------------------------------------------------------------------------

_MASK = [("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)), ("softcap", 0.0)]
_TRAIN = [("dropout_p", 0.0)] + _MASK + [("alibi_slopes", None), ("deterministic", False), ("return_attn_probs", False)]
SIGNATURES = {
    "flash_attn_func": ["q", "k", "v"] + _TRAIN,
    "flash_attn_varlen_func": ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"]
    + _TRAIN
    + [("block_table", None)],
    "flash_attn_with_kvcache": ["q", "k_cache", "v_cache", ("k", None), ("v", None), ("rotary_cos", None)]
    + [("rotary_sin", None), ("cache_seqlens", None), ("cache_batch_idx", None), ("cache_leftpad", None)]
    + [("block_table", None)]
    + _MASK
    + [("rotary_interleaved", True), ("alibi_slopes", None), ("num_splits", 0), ("return_softmax_lse", False)],
}


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_signature(name):
    """Positional order, names and defaults are flash-attn's, so `import pagedflash as flash_attn` works."""
    assert name in pagedflash.__all__
    params = list(inspect.signature(getattr(pagedflash, name)).parameters.values())
    want = [(p, inspect.Parameter.empty) if isinstance(p, str) else p for p in SIGNATURES[name]]
    assert [(p.name, p.default) for p in params] == want
    assert all(p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)


# ---------------------------------------------------------------------------
# flash_attn_func
# ---------------------------------------------------------------------------

# (b, sq, sk, h, hk, d, options): causal / not, every GQA ratio, windows, softcap, ALiBi, odd sizes
FUNC_CASES = [
    (2, 7, 113, 4, 4, 40, dict(causal=True)),
    (1, 33, 17, 6, 2, 24, dict()),  # seqlen_q > seqlen_k, not causal
    (2, 17, 33, 6, 3, 64, dict(causal=True, window_size=(5, 0))),
    (1, 20, 20, 8, 1, 16, dict(window_size=(3, 2))),
    (2, 9, 31, 4, 2, 32, dict(causal=True, softcap=5.0, softmax_scale=0.3)),
    (2, 9, 31, 4, 2, 32, dict(alibi="heads")),
    (2, 12, 40, 4, 1, 48, dict(causal=True, alibi="batch", window_size=(10, -1))),
]


def _slopes(rng, opts, batch, h):
    """opts with alibi="heads"/"batch" replaced by float32 slopes ([h] / [batch, h])."""
    opts = dict(opts)
    slopes = alibi_slopes(rng, opts.pop("alibi", None), batch, h)
    return opts, slopes


def every_dtype(table, label=str):
    """Parametrize ("backend", "dtype", "case") over every dtype and every row of `table` on each
    backend present; the id names the dtype and label(row index)."""
    rows = [(dt, i) for dt in DTYPES for i in range(len(table))]
    return cases("dtype,case", cpu=rows, cuda=rows, ids=lambda dt, i: f"{dt}-{label(i)}")


def _ref_opts(opts):
    """flash-attn's option names as pagedflash.reference's (window_size -> window)."""
    o = dict(opts)
    if "window_size" in o:
        o["window"] = o.pop("window_size")
    return o


@every_dtype(FUNC_CASES)
def test_flash_attn_func(backend, rng, dtype, case):
    b, sq, sk, h, hk, d, opts = FUNC_CASES[case]
    opts, slopes = _slopes(rng, opts, b, h)
    q = backend.randn(rng, (b, sq, h, d), dtype)
    k, v = backend.randn(rng, (b, sk, hk, d), dtype), backend.randn(rng, (b, sk, hk, d), dtype)
    a = backend.put(slopes)
    out = pagedflash.flash_attn_func(q, k, v, alibi_slopes=a, **opts)
    out2, lse, s_dmask = pagedflash.flash_attn_func(q, k, v, alibi_slopes=a, return_attn_probs=True, **opts)
    assert type(out) is type(q) and out.dtype == q.dtype and tuple(out.shape) == (b, sq, h, d)
    assert s_dmask is None and tuple(lse.shape) == (b, h, sq) and type(lse) is type(q)
    ref, ref_lse = reference.attention(q, k, v, alibi_slopes=slopes, return_lse=True, **_ref_opts(opts))
    naive = None if dtype == "float32" else naive_attention_lowp(q, k, v, alibi_slopes=slopes, **_ref_opts(opts))
    assert_close(out, ref, naive, dtype=dtype)
    assert np.array_equal(as_np64(out), as_np64(out2))
    check_lse(lse, ref_lse)


@cases("dtype", cpu=["float32", "bfloat16"], cuda=["float32", "bfloat16", "float16"])
def test_flash_attn_func_grad(backend, rng, dtype):
    """torch tensors that require grad get gradients through pagedflash.torch's autograd path."""
    for b, sq, sk, h, hk, d, opts in (FUNC_CASES[0], FUNC_CASES[2], FUNC_CASES[4], FUNC_CASES[6]):
        opts, slopes = _slopes(rng, opts, b, h)
        q, k, v = (
            backend.randn(rng, shape, dtype, lib="torch").requires_grad_()
            for shape in ((b, sq, h, d), (b, sk, hk, d), (b, sk, hk, d))
        )
        a = None if slopes is None else backend.put(torch.from_numpy(slopes))
        out = pagedflash.flash_attn_func(q, k, v, alibi_slopes=a, deterministic=True, **opts)
        dout = backend.randn(rng, out.shape, dtype, lib="torch")
        out.backward(dout)
        check_grads((q.grad, k.grad, v.grad), dout, q, k, v, dtype, alibi_slopes=slopes, **_ref_opts(opts))


@cpu_only
def test_flash_attn_func_dropout_and_determinism(backend, rng):
    """dropout_p > 0 draws its mask from torch's generator (same seed, same result; gradients
    flow); deterministic=True and False give the same gradients bit for bit on the CPU."""
    q, k, v = (randn(rng, (2, 19, 4, 16), "float32", lib="torch").requires_grad_() for _ in range(3))
    torch.manual_seed(5)
    a = pagedflash.flash_attn_func(q, k, v, dropout_p=0.3, causal=True)
    torch.manual_seed(5)
    b = pagedflash.flash_attn_func(q, k, v, dropout_p=0.3, causal=True)
    assert torch.equal(a, b) and not torch.equal(a, pagedflash.flash_attn_func(q, k, v, causal=True))
    a.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
    grads = []
    for det in (False, True):
        q.grad = k.grad = v.grad = None
        pagedflash.flash_attn_func(q, k, v, causal=True, deterministic=det).sum().backward()
        grads.append([x.grad.clone() for x in (q, k, v)])
    assert all(torch.equal(x, y) for x, y in zip(*grads))
    out = pagedflash.flash_attn_func(q.detach().numpy(), k.detach().numpy(), v.detach().numpy(), dropout_p=0.3)
    assert isinstance(out, np.ndarray) and np.isfinite(out).all()


# ---------------------------------------------------------------------------
# flash_attn_varlen_func
# ---------------------------------------------------------------------------

VARLEN_CASES = [
    ([7, 0, 33, 1], [20, 5, 33, 1], 4, 2, 40, dict(causal=True)),
    ([7, 3, 33], [20, 5, 17], 6, 3, 24, dict()),
    ([12, 30], [40, 30], 4, 1, 32, dict(causal=True, window_size=(6, 0), softcap=3.0)),
    ([12, 30], [40, 30], 4, 4, 16, dict(alibi="batch", window_size=(4, 4))),
]


@every_dtype(VARLEN_CASES)
def test_flash_attn_varlen_func(backend, rng, dtype, case):
    lq, lk, h, hk, d, opts = VARLEN_CASES[case]
    opts, slopes = _slopes(rng, opts, len(lq), h)
    cq, ck = cu_seqlens(lq), cu_seqlens(lk)
    q = backend.randn(rng, (int(cq[-1]), h, d), dtype)
    k, v = (backend.randn(rng, (int(ck[-1]), hk, d), dtype) for _ in range(2))
    out, lse, s_dmask = pagedflash.flash_attn_varlen_func(
        q, k, v, backend.put(cq), backend.put(ck), max(lq), max(lk), alibi_slopes=backend.put(slopes),
        return_attn_probs=True, **opts,
    )  # fmt: skip
    assert s_dmask is None and tuple(lse.shape) == (h, int(cq[-1])) and type(out) is type(q)
    ro = _ref_opts(opts)
    ref, ref_lse = reference.attention_varlen(q, k, v, cq, ck, alibi_slopes=slopes, return_lse=True, **ro)
    naive = None if dtype == "float32" else naive_attention_varlen_lowp(q, k, v, cq, ck, alibi_slopes=slopes, **ro)
    assert_close(out, ref, naive, dtype=dtype)
    check_lse(lse, ref_lse)


@cases("dtype", cpu=["float32", "bfloat16"], cuda=["bfloat16"])
def test_flash_attn_varlen_func_grad(backend, rng, dtype):
    for lq, lk, h, hk, d, opts in VARLEN_CASES[:3]:
        opts, slopes = _slopes(rng, opts, len(lq), h)
        cq, ck = cu_seqlens(lq), cu_seqlens(lk)
        q = backend.randn(rng, (int(cq[-1]), h, d), dtype, lib="torch").requires_grad_()
        k, v = (backend.randn(rng, (int(ck[-1]), hk, d), dtype, lib="torch").requires_grad_() for _ in range(2))
        tcq, tck = (backend.put(torch.from_numpy(c)) for c in (cq, ck))
        out = pagedflash.flash_attn_varlen_func(q, k, v, tcq, tck, max(lq), max(lk), **opts)
        dout = backend.randn(rng, out.shape, dtype, lib="torch")
        out.backward(dout)
        check_grads_varlen((q.grad, k.grad, v.grad), dout, q, k, v, cq, ck, dtype, **_ref_opts(opts))


PAGED_VARLEN = [
    # (key lengths, query lengths, h, hk, d, block size, options)
    ([40, 7, 130], [3, 7, 17], 4, 2, 32, 16, dict(causal=True)),
    ([40, 7, 130], [1, 1, 1], 6, 1, 24, 8, dict()),
    ([50, 300], [50, 5], 4, 4, 16, 32, dict(causal=True, window_size=(20, 0), softcap=4.0)),
    ([50, 90], [9, 0], 4, 2, 40, 7, dict(causal=True, alibi="heads")),
]


@every_dtype(PAGED_VARLEN)
def test_flash_attn_varlen_func_paged(backend, rng, dtype, case):
    """block_table: k, v are paged caches; sequence b holds cu_seqlens_k[b+1] - cu_seqlens_k[b]
    tokens and its queries are the last of them (bottom-right, as flash-attn)."""
    lk, lq, h, hk, d, bs, opts = PAGED_VARLEN[case]
    opts, slopes = _slopes(rng, opts, len(lk), h)
    cache = make_paged_cache(backend, rng, lk, hk, d, bs, dtype, share=True)
    cq, ck = cu_seqlens(lq), cu_seqlens(lk)
    q_host = randn(rng, (int(cq[-1]), h, d), dtype, lib="torch" if backend.is_cuda else None)
    q = backend.put(q_host)
    out, lse, s_dmask = pagedflash.flash_attn_varlen_func(
        q, cache.k, cache.v, backend.put(cq), backend.put(ck), max(lq), max(lk), alibi_slopes=backend.put(slopes),
        return_attn_probs=True, block_table=cache.block_tables, **opts,
    )  # fmt: skip
    assert s_dmask is None and tuple(lse.shape) == (h, int(cq[-1]))
    ro = _ref_opts(opts)
    ref, ref_lse = reference.paged_attention(
        q_host,
        *cache.host,
        cu_seqlens_q=cq,
        alibi_slopes=slopes,
        return_lse=True,
        **dict(ro, causal=ro.get("causal", False)),
    )
    naive = None
    if dtype != "float32":
        naive = naive_lowp_paged(
            q_host, cache, cq.astype(np.int64), alibi_slopes=slopes, **dict(ro, causal=ro.get("causal", False))
        )
    assert_close(out, ref, naive, dtype=dtype)
    check_lse(lse, ref_lse)


@cpu_only
def test_flash_attn_varlen_func_paged_refusals(backend, rng):
    cache = make_paged_cache(backend, rng, [9, 20], 2, 16, 8, "float32")
    cq, ck = cu_seqlens([2, 3]), cu_seqlens([9, 20])
    q = randn(rng, (5, 4, 16), "float32")
    with pytest.raises(NotImplementedError, match="dropout_p"):
        pagedflash.flash_attn_varlen_func(
            q, cache.k, cache.v, cq, ck, 3, 20, dropout_p=0.1, block_table=cache.block_tables
        )
    tq = torch.from_numpy(q).requires_grad_()
    tk, tv = torch.from_numpy(cache.k), torch.from_numpy(cache.v)
    with pytest.raises(NotImplementedError, match="block_table: the paged path has no backward"):
        pagedflash.flash_attn_varlen_func(tq, tk, tv, cq, ck, 3, 20, block_table=cache.block_tables)
    with torch.no_grad():  # the same call without grad runs
        pagedflash.flash_attn_varlen_func(tq, tk, tv, cq, ck, 3, 20, block_table=cache.block_tables)
    with pytest.raises(ValueError, match="cu_seqlens_k: must be non-decreasing"):
        pagedflash.flash_attn_varlen_func(
            q, cache.k, cache.v, cq, ck[::-1].copy(), 3, 20, block_table=cache.block_tables
        )
    with pytest.raises(TypeError, match="cu_seqlens_k"):
        pagedflash.flash_attn_varlen_func(
            q, cache.k, cache.v, cq, ck.astype(np.int64), 3, 20, block_table=cache.block_tables
        )
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        pagedflash.flash_attn_varlen_func(q, cache.k, cache.v, cq, ck[:2], 3, 20, block_table=cache.block_tables)
    with pytest.raises(ValueError, match="seq_lens"):  # fewer keys than queries
        pagedflash.flash_attn_varlen_func(
            q, cache.k, cache.v, cq, cu_seqlens([9, 2]), 3, 20, block_table=cache.block_tables
        )


# ---------------------------------------------------------------------------
# flash_attn_with_kvcache
# ---------------------------------------------------------------------------


def rotary_tables(seqlen_ro, rotary_dim, dtype, lib):
    """cos, sin [seqlen_ro, rotary_dim / 2] of the usual RoPE angles, in `dtype` (and `lib`)."""
    inv_freq = 10000.0 ** (-np.arange(0, rotary_dim, 2) / rotary_dim)
    ang = np.arange(seqlen_ro)[:, None] * inv_freq[None, :]
    return _in(np.cos(ang), dtype, lib), _in(np.sin(ang), dtype, lib)


def _in(x64, dtype, lib):
    """float64 values as `dtype` in NumPy (float32 / float16) or torch (bfloat16, or lib="torch")."""
    if dtype == "bfloat16" or lib == "torch":
        return torch.from_numpy(np.asarray(x64)).to(getattr(torch, dtype))
    return np.asarray(x64).astype(dtype)


def rotate64(x, cos, sin, pos, interleaved):
    """The rotary embedding in float64, written with complex numbers: x [b, s, heads, d], cos/sin
    [seqlen_ro, rd / 2], pos [b, s]. interleaved: feature pairs (2i, 2i+1); else (i, i + rd / 2)."""
    x, c, s = as_np64(x), as_np64(cos), as_np64(sin)
    half = c.shape[1]
    rot = (c + 1j * s)[pos][:, :, None, :]
    y = x.copy()
    if interleaved:
        z = (x[..., 0 : 2 * half : 2] + 1j * x[..., 1 : 2 * half : 2]) * rot
        y[..., 0 : 2 * half : 2], y[..., 1 : 2 * half : 2] = z.real, z.imag
    else:
        z = (x[..., :half] + 1j * x[..., half : 2 * half]) * rot
        y[..., :half], y[..., half : 2 * half] = z.real, z.imag
    return y


def rotate_as_rounded(x, cos, sin, pos, interleaved, dtype):
    """The rotated x the attention sees: the float32 products of the op (x * cos - y * sin,
    x * sin + y * cos, each operation rounded to float32), then rounded once to the dtype, as
    float64. Checked against rotate64; the reference attention takes it so that its q is the
    kernel's q (lse is held to the float32 rule)."""
    x32, c, s = (as_np64(t).astype(np.float32) for t in (x, cos, sin))
    half = c.shape[1]
    c, s = c[pos][:, :, None, :], s[pos][:, :, None, :]
    if interleaved:
        a, b = x32[..., 0 : 2 * half : 2], x32[..., 1 : 2 * half : 2]
    else:
        a, b = x32[..., :half], x32[..., half : 2 * half]
    y1, y2 = a * c - b * s, a * s + b * c
    y = x32.copy()
    if interleaved:
        y[..., 0 : 2 * half : 2], y[..., 1 : 2 * half : 2] = y1, y2
    else:
        y[..., :half], y[..., half : 2 * half] = y1, y2
    exact = rotate64(x, cos, sin, pos, interleaved)
    assert np.max(np.abs(y - exact)) <= 1e-5 * max(1.0, np.max(np.abs(exact)))
    return as_np64(_in(y.astype(np.float64), dtype, None))


class KV:
    """A kvcache scenario: the caches (dense or paged) and where each sequence's tokens live."""

    def __init__(self, backend, rng, *, dtype, layout, lens, s_new, hk, d, seqlen_cache=0, bs=16, rows=None):
        self.layout, self.lens, self.s_new = layout, np.asarray(lens), s_new
        total = [n + s_new for n in lens]
        lib = "torch" if backend.is_cuda else None
        if layout == "dense":
            b_cache = len(lens) if rows is None else int(max(rows)) + 2
            self.rows = np.arange(len(lens)) if rows is None else np.asarray(rows)
            kc = randn(rng, (b_cache, seqlen_cache, hk, d), dtype, lib=lib)
            vc = randn(rng, (b_cache, seqlen_cache, hk, d), dtype, lib=lib)
            self.k, self.v = backend.put(kc), backend.put(vc)
            self.block_table = None
            self.capacity = seqlen_cache
        else:
            cache = make_paged_cache(backend, rng, total, hk, d, bs, dtype, share=True)
            self.k, self.v, self.block_table = cache.k, cache.v, cache.block_tables
            self.bt, self.bs = cache.host[2], bs
            self.capacity = self.bt.shape[1] * bs

    def where(self, b, t):
        """(index into dimension 0, index into dimension 1) of sequence b's token t."""
        if self.layout == "dense":
            return self.rows[b], t
        return self.bt[b, t // self.bs], t % self.bs

    def tokens(self, cache64, b, n):
        """Sequence b's first n tokens [n, hk, d] from a float64 copy of a cache."""
        return np.stack([cache64[self.where(b, t)] for t in range(n)]) if n else cache64[:0, 0]


def run_kvcache(
    backend, rng, *, dtype="float32", layout="dense", lens=(5, 40, 17), s_new=0, sq=1, h=4, hk=2, d=32,
    seqlen_cache=300, bs=16, rows=None, rotary=None, rd=None, seqlens_as="array", causal=False, **opts,
):  # fmt: skip
    """Run flash_attn_with_kvcache on a scenario and check the caches afterwards (the new tokens,
    rotated when asked, where they belong; every other element unchanged) and out / lse against
    the float64 reference over each sequence's tokens (the queries its last sq)."""
    opts, slopes = _slopes(rng, opts, len(lens), h)
    kv = KV(
        backend,
        rng,
        dtype=dtype,
        layout=layout,
        lens=lens,
        s_new=s_new,
        hk=hk,
        d=d,
        seqlen_cache=seqlen_cache,
        bs=bs,
        rows=rows,
    )
    lib = "torch" if backend.is_cuda else None
    b = len(lens)
    q = backend.randn(rng, (b, sq, h, d), dtype)
    k_new = v_new = None
    if s_new:
        k_new, v_new = backend.randn(rng, (b, s_new, hk, d), dtype), backend.randn(rng, (b, s_new, hk, d), dtype)
    kw = dict(causal=causal, alibi_slopes=backend.put(slopes), **opts)
    if seqlens_as == "array":
        kw["cache_seqlens"] = backend.put(np.asarray(lens, dtype=np.int32))
    elif seqlens_as == "int":
        kw["cache_seqlens"] = int(lens[0])
    if rows is not None:
        kw["cache_batch_idx"] = backend.put(np.asarray(rows, dtype=np.int32))
    if kv.block_table is not None:
        kw["block_table"] = kv.block_table
    cos = sin = None
    if rotary:
        cos, sin = (backend.put(t) for t in rotary_tables(kv.capacity + 3, rd, dtype, lib))
        kw.update(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=rotary == "interleaved")
    before = [as_np64(c) for c in (kv.k, kv.v)]
    q_before = as_np64(q)
    out, lse = pagedflash.flash_attn_with_kvcache(q, kv.k, kv.v, k_new, v_new, return_softmax_lse=True, **kw)
    assert type(out) is type(q) and out.dtype == q.dtype and tuple(out.shape) == (b, sq, h, d)
    assert tuple(lse.shape) == (b, h, sq)
    assert np.array_equal(as_np64(q), q_before), "q was modified"
    after = [as_np64(c) for c in (kv.k, kv.v)]

    # the caches: the new tokens at positions lens[b] + j, everything else as it was
    lens_arr = np.asarray(lens)
    new_k = as_np64(k_new) if s_new else None
    if rotary and s_new:
        new_k = rotate64(k_new, cos, sin, lens_arr[:, None] + np.arange(s_new)[None, :], rotary == "interleaved")
    for c, (old, now, new) in enumerate(zip(before, after, (new_k, as_np64(v_new) if s_new else None))):
        expect = old.copy()
        for bi in range(b):
            for j in range(s_new):
                expect[kv.where(bi, lens[bi] + j)] = new[bi, j]
        if rotary and c == 0:  # rotated keys: rounded to the dtype once
            tol = ULP[dtype] * np.maximum(1.0, np.abs(np.nan_to_num(expect)))
            assert np.array_equal(np.isnan(now), np.isnan(expect))
            assert np.all(np.abs(np.nan_to_num(now - expect)) <= tol), "k_cache: rotated keys"
        else:
            assert np.array_equal(now, expect, equal_nan=True), f"{'kv'[c]}_cache: not the expected append"

    # attention over each sequence's tokens, the queries its last sq
    q_ref = q_before
    if rotary:
        at_own = causal or opts.get("window_size", (-1, -1)) != (-1, -1)
        pos = lens_arr[:, None] + (np.arange(sq)[None, :] if at_own else np.zeros((1, sq), np.int64))
        q_ref = rotate_as_rounded(q, cos, sin, pos, rotary == "interleaved", dtype)
    ro = {n: x for n, x in _ref_opts(opts).items() if n != "num_splits"}
    ro["causal"] = causal
    refs, ref_lses, naives = [], [], []
    for bi in range(b):
        n = lens[bi] + s_new
        kk, vv = (kv.tokens(c, bi, n)[None] for c in after)
        sl = None if slopes is None else (slopes if slopes.ndim == 1 else slopes[bi])
        r, rl = reference.attention(q_ref[bi : bi + 1], kk, vv, alibi_slopes=sl, return_lse=True, **ro)
        refs.append(r[0])
        ref_lses.append(rl[0])
        if dtype != "float32":
            ql, kl, vl = (_in(x, dtype, lib) for x in (q_ref[bi : bi + 1], kk, vv))
            naives.append(naive_attention_lowp(ql, kl, vl, alibi_slopes=sl, **ro)[0])
    assert_close(out, np.stack(refs), np.stack(naives) if naives else None, dtype=dtype)
    check_lse(lse, np.stack(ref_lses))
    return kv


# (layout, seqlen_cache or block size, lens, s_new, sq, options)
KV_CASES = [
    ("dense", 300, (5, 40, 250), 0, 1, dict()),  # seqlen_cache > 256: blocks of 150 tokens
    ("dense", 300, (5, 40, 250), 3, 3, dict(causal=True)),
    ("dense", 64, (1, 60), 4, 1, dict(h=6, hk=3)),  # seqlen_cache <= 256: one block per row
    ("dense", 61, (0, 30), 2, 2, dict(causal=True, window_size=(4, 0), h=8, hk=1)),  # an empty cache row
    ("dense", 300, (299,), 1, 1, dict(seqlens_as="int", softcap=3.0)),  # fills the row
    ("dense", 40, (40, 40), 0, 5, dict(seqlens_as="none", causal=True, alibi="batch")),  # the whole cache
    ("paged", 16, (7, 100, 33), 0, 1, dict()),
    ("paged", 16, (7, 100, 33), 5, 5, dict(causal=True, alibi="heads")),
    ("paged", 7, (0, 20), 1, 1, dict(window_size=(6, -1), h=4, hk=4)),
    ("paged", 32, (70, 1), 9, 4, dict(causal=True, softcap=2.0, softmax_scale=0.2, num_splits=3)),
]


@every_dtype(KV_CASES, label=lambda i: f"{KV_CASES[i][0]}{i}")
def test_kvcache(backend, rng, dtype, case):
    layout, size, lens, s_new, sq, opts = KV_CASES[case]
    size_kw = dict(seqlen_cache=size) if layout == "dense" else dict(bs=size)
    run_kvcache(backend, rng, dtype=dtype, layout=layout, lens=lens, s_new=s_new, sq=sq, **size_kw, **opts)


@cases(
    "dtype,layout,interleaved,causal",
    cpu=[
        (dt, lay, il, c) for dt in DTYPES for lay in ("dense", "paged") for il in (True, False) for c in (True, False)
    ],
    cuda=[
        (dt, lay, il, c)
        for dt in ("float32", "bfloat16")
        for lay in ("dense", "paged")
        for il in (True, False)
        for c in (True, False)
    ],
    ids=lambda dt, lay, il, c: f"{dt}-{lay}-{'interleaved' if il else 'neox'}-{'causal' if c else 'full'}",
)
def test_kvcache_rotary(backend, rng, dtype, layout, interleaved, causal):
    """rotary_cos / rotary_sin rotate the appended keys at their positions and q at
    cache_seqlens + i (causal) or cache_seqlens (not causal); rotary_dim < head_dim leaves the rest."""
    run_kvcache(
        backend, rng, dtype=dtype, layout=layout, lens=(3, 30), s_new=2, sq=2, h=4, hk=2, d=24, seqlen_cache=48,
        bs=8, rotary="interleaved" if interleaved else "neox", rd=16, causal=causal,
    )  # fmt: skip


def test_kvcache_rotary_window(backend, rng):
    """A window without causal also puts q at its own positions (flash-attn's 'local')."""
    run_kvcache(
        backend, rng, lens=(6, 12), s_new=3, sq=3, d=16, seqlen_cache=20, rotary="neox", rd=16, window_size=(2, 1)
    )


@cases("dtype", cpu=DTYPES, cuda=DTYPES)
def test_kvcache_batch_idx(backend, rng, dtype):
    """cache_batch_idx: sequence b lives in row cache_batch_idx[b] of a dense cache; the other rows
    are left alone (run_kvcache checks every element)."""
    run_kvcache(
        backend, rng, dtype=dtype, lens=(4, 17, 0), rows=(3, 0, 5), s_new=2, sq=2, seqlen_cache=270, causal=True
    )
    run_kvcache(backend, rng, dtype=dtype, lens=(9, 1), rows=(1, 0), s_new=1, sq=1, seqlen_cache=30)


@cpu_only
def test_kvcache_torch_cpu(backend, rng):
    """torch CPU tensors (float32) with torch index arrays, and NumPy cache_seqlens with torch q."""
    q = randn(rng, (2, 1, 4, 16), "float32", lib="torch")
    kc, vc = (randn(rng, (2, 50, 2, 16), "float32", lib="torch") for _ in range(2))
    kn, vn = (randn(rng, (2, 1, 2, 16), "float32", lib="torch") for _ in range(2))
    lens = torch.tensor([10, 3], dtype=torch.int32)
    out, lse = pagedflash.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=lens, return_softmax_lse=True)
    assert isinstance(out, torch.Tensor) and isinstance(lse, torch.Tensor) and lse.is_contiguous()
    assert torch.equal(kc[0, 10], kn[0, 0]) and torch.equal(vc[1, 3], vn[1, 0])
    again = pagedflash.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=np.array([11, 4], np.int32))
    assert torch.equal(out, again)  # the appended tokens are in the cache now
    for bi, n in enumerate((11, 4)):
        ref = reference.attention(q[bi : bi + 1], kc[bi : bi + 1, :n], vc[bi : bi + 1, :n])
        assert_close(out[bi : bi + 1], ref, dtype="float32")


# ---------------------------------------------------------------------------
# bad input: a clear exception naming the argument, the caches untouched
# ---------------------------------------------------------------------------


def _kv_problem(rng):
    q = randn(rng, (2, 1, 4, 16), "float32")
    kc, vc = (randn(rng, (3, 40, 2, 16), "float32") for _ in range(2))
    kn, vn = (randn(rng, (2, 2, 2, 16), "float32") for _ in range(2))
    return q, kc, vc, kn, vn


KV_BAD = [
    ("leftpad", dict(cache_leftpad=np.zeros(2, np.int32)), NotImplementedError, "cache_leftpad"),
    ("k_without_v", dict(v=None), ValueError, "v:"),
    ("no_seqlens", dict(cache_seqlens=None), ValueError, "cache_seqlens: required"),
    ("seqlens_dtype", dict(cache_seqlens=np.array([1, 2], np.float32)), TypeError, "cache_seqlens"),
    ("seqlens_shape", dict(cache_seqlens=np.array([1, 2, 3], np.int32)), ValueError, "cache_seqlens"),
    ("seqlens_negative", dict(cache_seqlens=np.array([1, -2], np.int32)), ValueError, "cache_seqlens"),
    ("overflow", dict(cache_seqlens=np.array([39, 2], np.int32)), ValueError, "more than the 40"),
    ("int_overflow", dict(cache_seqlens=41), ValueError, "cache_seqlens"),
    ("fewer_tokens_than_queries", dict(k=None, v=None, cache_seqlens=0), ValueError, "fewer than its 1 queries"),
    ("batch_idx_range", dict(cache_batch_idx=np.array([0, 3], np.int32)), ValueError, "cache_batch_idx"),
    ("batch_idx_dtype", dict(cache_batch_idx=np.array([0, 1], np.float32)), TypeError, "cache_batch_idx"),
    (
        "batch_idx_with_table",
        dict(block_table=np.zeros((2, 1), np.int32), cache_batch_idx=np.zeros(2, np.int32)),
        ValueError,
        "cache_batch_idx",
    ),
    ("table_rows", dict(block_table=np.zeros((3, 1), np.int32)), ValueError, "block_table"),
    ("window_size", dict(window_size=(-2, 0)), ValueError, "window_size"),
    ("window_size_pair", dict(window_size=(1, 2, 3)), ValueError, "window_size"),
    ("softcap", dict(softcap=-1.0), ValueError, "softcap"),
    ("alibi_rows", dict(alibi_slopes=np.ones((3, 4), np.float32)), ValueError, "alibi_slopes"),
    ("alibi_dtype", dict(alibi_slopes=np.ones(4, np.float64)), TypeError, "alibi_slopes"),
    ("num_splits", dict(num_splits=-1), ValueError, "num_splits"),
    ("k_shape", dict(k="wide"), ValueError, "k:"),
    ("q_rank", dict(q="3d"), ValueError, "q:"),
    ("q_dtype", dict(q="float16"), TypeError, "k_cache"),
    (
        "rotary_without_k",
        dict(k=None, v=None, rotary_cos=np.ones((40, 4), np.float32), rotary_sin=np.ones((40, 4), np.float32)),
        ValueError,
        "rotary_cos",
    ),
    ("rotary_sin_missing", dict(rotary_cos=np.ones((40, 4), np.float32)), ValueError, "rotary_sin"),
    (
        "rotary_short",
        dict(rotary_cos=np.ones((39, 4), np.float32), rotary_sin=np.ones((39, 4), np.float32)),
        ValueError,
        "rotary_cos",
    ),
    (
        "rotary_wide",
        dict(rotary_cos=np.ones((40, 9), np.float32), rotary_sin=np.ones((40, 9), np.float32)),
        ValueError,
        "rotary_cos",
    ),
]


@pytest.mark.parametrize("case", range(len(KV_BAD)), ids=[c[0] for c in KV_BAD])
def test_kvcache_bad_input(rng, case):
    name, kw, exc, match = KV_BAD[case]
    q, kc, vc, kn, vn = _kv_problem(rng)
    args = dict(k=kn, v=vn, cache_seqlens=np.array([3, 7], np.int32))
    args.update(kw)
    if isinstance(args.get("q"), str):
        q = q[:, 0] if args["q"] == "3d" else q.astype(np.float16)
    args.pop("q", None)
    if isinstance(args.get("k"), str):
        args["k"] = randn(rng, (2, 2, 4, 16), "float32")
    copies = kc.copy(), vc.copy()
    with pytest.raises(exc, match=match):
        pagedflash.flash_attn_with_kvcache(q, kc, vc, **args)
    assert np.array_equal(kc, copies[0]) and np.array_equal(vc, copies[1]), "a rejected call changed the cache"


def test_kvcache_bad_block_ids(rng):
    """A block table naming blocks outside the cache is refused before anything is written."""
    q = randn(rng, (2, 1, 4, 16), "float32")
    kc, vc = (randn(rng, (4, 8, 2, 16), "float32") for _ in range(2))
    kn, vn = (randn(rng, (2, 1, 2, 16), "float32") for _ in range(2))
    copies = kc.copy(), vc.copy()
    for bad in ([[0, 1], [2, 4]], [[0, 1], [-1, 3]]):
        with pytest.raises(ValueError, match="block_table"):
            pagedflash.flash_attn_with_kvcache(
                q, kc, vc, kn, vn, cache_seqlens=np.array([3, 12], np.int32), block_table=np.array(bad, np.int32)
            )
    assert np.array_equal(kc, copies[0]) and np.array_equal(vc, copies[1])


def test_other_libraries_and_window_size(rng):
    q = randn(rng, (1, 4, 2, 8), "float32")
    other = pagedflash._C.empty((1, 4, 2, 8), "float32", "cpu", 0)  # a pagedflash.Tensor
    with pytest.raises(NotImplementedError, match="q: flash_attn_with_kvcache takes NumPy arrays or torch tensors"):
        pagedflash.flash_attn_with_kvcache(other, q, q)
    with pytest.raises(TypeError, match="window_size"):
        pagedflash.flash_attn_func(q, q, q, window_size=(1.5, 0))
    with pytest.raises(ValueError, match="window_size"):
        pagedflash.flash_attn_func(q, q, q, window_size=5)


def test_dense_cache_not_viewable(rng):
    """A dense cache longer than 256 tokens whose batch and sequence dimensions are not contiguous
    cannot be viewed as blocks: ValueError naming it (a cache of <= 256 tokens takes any strides)."""
    q = randn(rng, (2, 1, 4, 16), "float32")
    big = randn(rng, (2, 600, 2, 16), "float32")
    with pytest.raises(ValueError, match="k_cache: a dense cache"):
        pagedflash.flash_attn_with_kvcache(q, big[:, :300], big[:, 300:], cache_seqlens=5)
    kc, vc = big[:, :200], big[:, 300:500]  # strided rows, <= 256 tokens: one block per row
    out = pagedflash.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=np.array([5, 200], np.int32))
    for bi, n in enumerate((5, 200)):
        assert_close(
            out[bi : bi + 1],
            reference.attention(q[bi : bi + 1], kc[bi : bi + 1, :n], vc[bi : bi + 1, :n]),
            dtype="float32",
        )
