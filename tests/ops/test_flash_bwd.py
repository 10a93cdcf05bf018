"""flash_attn_backward and flash_attn_varlen_backward on every backend.

Gradients are compared with reference.attention_backward (NumPy float64) and torch autograd
through the naive attention in float64 (the two must agree to 1e-9), under the rule of
tests/conftest.py with factor 3 (conftest.check_grads). dq/dk/dv are NaN-poisoned buffers.
Covered: dtypes, head dims 1..256, every GQA ratio (dk/dv summed over a group), causal, windows,
softcap, ALiBi, softmax_scale, dropout (the forward's mask regenerated from the seed), packed
varlen batches with empty sequences (their keys get exactly zero gradient), rows that see no
key, several key blocks and query tiles per block (CUDA tiles), long sequences, large inputs
without NaN, strided views, bitwise determinism, bad input. On CUDA with kernel "auto", "sm80"
and "sm90" where the wgmma backward takes the call (conftest.flash_kernels).
"""

from __future__ import annotations

import numpy as np
import pytest

import pagedflash
from conftest import (
    DTYPES,
    LOWP,
    alibi_slopes,
    as_np64,
    assert_close,
    cases,
    check_grads,
    check_grads_varlen,
    cpu_only,
    cu_seqlens,
    cuda_only,
    dropout_keep,
    flash_kernels,
    naive_attention_lowp,
    naive_grads,
    poison_like,
    refused,
    torch,
)
from pagedflash import reference

pytestmark = pytest.mark.skipif(torch is None, reason="gradient references need torch")


def run_bwd(backend, rng, dtype, shape, *, kernel="auto", seed=None, deterministic=False, scale=1.0, **opts):
    """Random q, k, v, dout; the forward, then the backward into NaN-poisoned dq, dk, dv with the
    same kernel hint. Returns (grads, (dout, q, k, v)), or None where the device refuses the hint
    (the backward's NotImplementedError asserted)."""
    b, sq, sk, h, hk, d = shape
    q = backend.randn(rng, (b, sq, h, d), dtype, scale=scale)
    k = backend.randn(rng, (b, sk, hk, d), dtype, scale=scale)
    v = backend.randn(rng, (b, sk, hk, d), dtype, scale=scale)
    dout = backend.randn(rng, (b, sq, h, d), dtype, scale=scale)
    fkernel = "auto" if backend.refuses(kernel) else kernel
    out, lse = pagedflash.flash_attn(q, k, v, return_lse=True, seed=seed, kernel=fkernel, **opts)
    if refused(
        backend,
        kernel,
        lambda: pagedflash.flash_attn_backward(dout, q, k, v, out, lse, seed=seed, kernel=kernel, **opts),
    ):
        return None
    bufs = poison_like(q), poison_like(k), poison_like(v)
    grads = pagedflash.flash_attn_backward(
        dout,
        q,
        k,
        v,
        out,
        lse,
        seed=seed,
        dq=bufs[0],
        dk=bufs[1],
        dv=bufs[2],
        deterministic=deterministic,
        kernel=kernel,
        **opts,
    )
    assert all(g is buf for g, buf in zip(grads, bufs))
    return grads, (dout, q, k, v)


def run_and_check(backend, rng, dtype, shape, *, kernel="auto", **opts):
    res = run_bwd(backend, rng, dtype, shape, kernel=kernel, **opts)
    if res is not None:
        grads, args = res
        check_grads(grads, *args, dtype, **opts)
    return res


# ---------------------------------------------------------------------------
# dense
# ---------------------------------------------------------------------------

GQA = [(4, 4), (4, 2), (4, 1), (6, 3), (6, 2)]
CONFIGS = [
    ("plain", dict(), None),
    ("causal", dict(causal=True), None),
    ("window", dict(window=(7, 3)), None),
    ("causal_window", dict(causal=True, window=(16, -1)), None),
    ("softcap", dict(softcap=5.0), None),
    ("softcap_causal_alibi", dict(causal=True, softcap=2.0), "head"),
    ("alibi_batch_window", dict(window=(20, 5)), "batch"),
    ("scale", dict(softmax_scale=0.3, causal=True), None),
]
SHAPES = [(2, 7, 13, 24), (1, 113, 203, 40), (2, 65, 64, 72), (1, 1, 17, 8), (2, 17, 5, 1), (1, 70, 70, 256)]


def _dense_shape(cfg, heads):
    return SHAPES[(cfg + 3 * heads[0] + heads[1]) % len(SHAPES)]


def _dense_rows(be):
    return [
        (dt, hh, i, kern)
        for dt in DTYPES
        for hh in GQA
        for i in range(len(CONFIGS))
        for kern in flash_kernels(
            be, dt, _dense_shape(i, hh)[3], backward=True, extras=CONFIGS[i][0].startswith(("softcap", "alibi"))
        )
    ]


@cases(
    "dtype,heads,cfg,kernel",
    cpu=_dense_rows("cpu"),
    cuda=_dense_rows("cuda"),
    ids=lambda dt, hh, i, kern: f"{CONFIGS[i][0]}-h{hh[0]}kv{hh[1]}-{dt}-{kern}",
)
def test_backward_dense(backend, rng, dtype, heads, cfg, kernel):
    name, opts, akind = CONFIGS[cfg]
    b, sq, sk, d = _dense_shape(cfg, heads)
    h, hk = heads
    kw = dict(opts, alibi_slopes=backend.put(alibi_slopes(rng, akind, b, h)))
    run_and_check(backend, rng, dtype, (b, sq, sk, h, hk, d), kernel=kernel, **kw)


@cases(
    "dtype,d,causal,hk,kernel",
    cpu=[("float32", 64, True, 1, "auto"), ("bfloat16", 96, False, 2, "auto"), ("float16", 128, True, 2, "auto")],
    cuda=[
        (dt, d, c, hk, kern)
        for dt in DTYPES
        for d in (64, 128, 96, 256)
        for c in (False, True)
        for hk in (1, 2)
        for kern in flash_kernels("cuda", dt, d, backward=True)
    ],
    ids=lambda dt, d, c, hk, kern: f"{dt}-d{d}-{'causal' if c else 'full'}-kv{hk}-{kern}",
)
def test_backward_head_dims(backend, rng, dtype, d, causal, hk, kernel):
    run_and_check(backend, rng, dtype, (2, 113, 150, 2, hk, d), kernel=kernel, causal=causal)


# Several key blocks and query tiles per block (the wgmma backward's tiles are 128 keys x 64 / 128
# queries; the sm_80 kernel's 128 x 64 / 128): boundaries inside and across tiles, GQA groups
# walked by one block, rows that see no key (sq > sk, causal), windows, head dims padded up to an
# instantiated one.
TILE_CASES = [
    (300, 517, False, (-1, -1), 2),
    (300, 517, True, (-1, -1), 1),
    (400, 200, True, (-1, -1), 2),
    (389, 389, False, (64, 17), 2),
]


@cases(
    "dtype,d,case,kernel",
    cpu=[("bfloat16", 48, i, "auto") for i in (2, 3)],
    cuda=[
        (dt, d, i, kern)
        for dt in LOWP
        for d in (64, 128, 48, 120)
        for i in range(len(TILE_CASES))
        for kern in flash_kernels("cuda", dt, d, backward=True)
    ],
    ids=lambda dt, d, i, kern: (
        "{}-d{}-{}x{}{}-kv{}-{}".format(
            dt, d, TILE_CASES[i][0], TILE_CASES[i][1], "-causal" if TILE_CASES[i][2] else "", TILE_CASES[i][4], kern
        )
        + ("-window" if TILE_CASES[i][3] != (-1, -1) else "")
    ),
)
def test_backward_tiles(backend, rng, dtype, d, case, kernel):
    sq, sk, causal, window, hk = TILE_CASES[case]
    run_and_check(backend, rng, dtype, (2, sq, sk, 4, hk, d), kernel=kernel, causal=causal, window=window)


@cases(
    "dtype,kernel",
    cpu=[(dt, "auto") for dt in ("float32", "bfloat16")],
    cuda=[(dt, kern) for dt in ("float32", "bfloat16") for kern in flash_kernels("cuda", dt, 40, backward=True)],
)
def test_backward_long_sequence(backend, rng, dtype, kernel):
    """seqlen 1023 (many 64-tiles, a partial last one), GQA 2:1, causal + window."""
    run_and_check(backend, rng, dtype, (1, 1023, 1023, 2, 1, 40), kernel=kernel, causal=True, window=(300, -1))


@cases(
    "dtype,kernel",
    cpu=[(dt, "auto") for dt in LOWP],
    cuda=[(dt, kern) for dt in LOWP for kern in flash_kernels("cuda", dt, 64, backward=True, extras=True)],
)
def test_backward_features(backend, rng, dtype, kernel):
    """Window, softcap, per-head ALiBi with causal, dropout: one shape, 4/2 heads, d = 64."""
    b, sq, sk, h, hk, d = 1, 90, 77, 4, 2, 64
    slopes = backend.put(alibi_slopes(rng, "head", b, h, 0.01, 0.3))
    for opts in (
        {"window": (20, 3)},
        {"softcap": 10.0},
        {"alibi_slopes": slopes, "causal": True},
        {"dropout_p": 0.2, "seed": 11},
    ):
        seed = opts.pop("seed", None)
        res = run_bwd(backend, rng, dtype, (b, sq, sk, h, hk, d), kernel=kernel, seed=seed, **opts)
        grads, (dout, q, k, v) = res
        mask = None
        if opts.get("dropout_p"):
            mask = pagedflash.dropout_mask(q, k, dropout_p=opts["dropout_p"], seed=seed)
        check_grads(grads, dout, q, k, v, dtype, dropout_mask=mask, **opts)


# ---------------------------------------------------------------------------
# dropout
# ---------------------------------------------------------------------------


@cases(
    "dtype,heads,masked,kernel",
    cpu=[(dt, hh, m, "auto") for dt in DTYPES for hh in ((4, 4), (4, 2), (6, 2)) for m in (False, True)],
    cuda=[
        (dt, hh, m, kern)
        for dt in DTYPES
        for hh in ((4, 4), (4, 2), (6, 2))
        for m in (False, True)
        for kern in flash_kernels("cuda", dt, 24, backward=True, dropout=True)
    ],
    ids=lambda dt, hh, m, kern: f"{dt}-h{hh[0]}kv{hh[1]}-{'masked' if m else 'plain'}-{kern}",
)
def test_backward_dropout(backend, rng, dtype, heads, masked, kernel):
    h, hk = heads
    p = 0.2
    seed = int(rng.integers(0, 2**63))
    kw = dict(dropout_p=p, offset=5)
    if masked:
        kw.update(causal=True, softcap=3.0, window=(30, -1))
    grads, (dout, q, k, v) = run_bwd(backend, rng, dtype, (2, 37, 70, h, hk, 24), seed=seed, kernel=kernel, **kw)
    mask = pagedflash.dropout_mask(q, k, dropout_p=p, seed=seed, offset=5)
    kw.pop("offset")
    check_grads(grads, dout, q, k, v, dtype, dropout_mask=mask, **kw)
    # the backward regenerates the forward's mask: another seed gives other gradients
    out, lse = pagedflash.flash_attn(q, k, v, return_lse=True, seed=seed, offset=5, kernel=kernel, **kw)
    other = pagedflash.flash_attn_backward(dout, q, k, v, out, lse, seed=seed + 1, offset=5, kernel=kernel, **kw)
    assert not np.array_equal(as_np64(other[2]), as_np64(grads[2]))


def test_backward_dropout_needs_seed(backend, rng):
    q = backend.randn(rng, (1, 4, 2, 8), "float32")
    out, lse = pagedflash.flash_attn(q, q, q, return_lse=True, dropout_p=0.1, seed=3)
    with pytest.raises(ValueError, match="seed"):
        pagedflash.flash_attn_backward(q, q, q, q, out, lse, dropout_p=0.1)


# ---------------------------------------------------------------------------
# varlen
# ---------------------------------------------------------------------------


def varlen_bwd(backend, rng, dtype, lq, lk, h, hk, d, *, kernel="auto", seed=None, **kw):
    """Packed batch on the backend; forward, then backward into NaN-poisoned buffers. Returns the
    gradients, (dout, q, k, v) and the host cu_seqlens."""
    cq, ck = cu_seqlens(lq), cu_seqlens(lk)
    q = backend.randn(rng, (int(cq[-1]), h, d), dtype)
    k, v = backend.randn(rng, (int(ck[-1]), hk, d), dtype), backend.randn(rng, (int(ck[-1]), hk, d), dtype)
    dout = backend.randn(rng, q.shape, dtype)
    dcq, dck = backend.put(cq), backend.put(ck)
    mq, mk = int(max(lq)), int(max(lk))
    fkernel = "auto" if backend.refuses(kernel) else kernel
    out, lse = pagedflash.flash_attn_varlen(q, k, v, dcq, dck, mq, mk, return_lse=True, seed=seed, kernel=fkernel, **kw)
    if refused(
        backend,
        kernel,
        lambda: pagedflash.flash_attn_varlen_backward(
            dout, q, k, v, out, lse, dcq, dck, mq, mk, seed=seed, kernel=kernel, **kw
        ),
    ):
        return None
    bufs = poison_like(q), poison_like(k), poison_like(v)
    grads = pagedflash.flash_attn_varlen_backward(
        dout, q, k, v, out, lse, dcq, dck, mq, mk, seed=seed, dq=bufs[0], dk=bufs[1], dv=bufs[2], kernel=kernel, **kw
    )
    assert all(g is buf for g, buf in zip(grads, bufs))
    return grads, (dout, q, k, v), cq, ck


VARLEN = [
    ("plain", dict()),
    ("causal", dict(causal=True)),
    ("window_softcap_alibi", dict(window=(9, 2), softcap=3.0)),
    ("causal_dropout", dict(causal=True, dropout_p=0.3)),
]


def _varlen_rows(be):
    return [
        (dt, hh, i, kern)
        for dt in DTYPES
        for hh in ((4, 2), (3, 3), (4, 1))
        for i in range(len(VARLEN))
        for kern in flash_kernels(be, dt, 24, backward=True)
    ]


@cases(
    "dtype,heads,cfg,kernel",
    cpu=_varlen_rows("cpu"),
    cuda=_varlen_rows("cuda"),
    ids=lambda dt, hh, i, kern: f"{VARLEN[i][0]}-h{hh[0]}kv{hh[1]}-{dt}-{kern}",
)
def test_backward_varlen(backend, rng, dtype, heads, cfg, kernel):
    """Five sequences of random lengths including 0 and 1 (keys too)."""
    name, opts = VARLEN[cfg]
    h, hk = heads
    d, batch = 24, 5
    lq = rng.integers(0, 80, batch)
    lq[:2] = (0, 1)
    rng.shuffle(lq)
    lk = lq.copy() if cfg % 2 else rng.integers(0, 90, batch)
    if not cfg % 2:
        lk[rng.integers(0, batch)] = 1
    kw = dict(opts)
    slopes = None
    if "alibi" in name:
        slopes = rng.uniform(0.05, 1.0, (batch, h)).astype(np.float32)
        kw["alibi_slopes"] = backend.put(slopes)
    seed = 77
    grads, (dout, q, k, v), cq, ck = varlen_bwd(backend, rng, dtype, lq, lk, h, hk, d, kernel=kernel, seed=seed, **kw)
    masks = None
    if kw.get("dropout_p"):
        full = as_np64(
            dropout_keep(
                q, k, dropout_p=kw["dropout_p"], seed=seed, cu_seqlens_q=backend.put(cq), cu_seqlens_k=backend.put(ck)
            )
        )
        masks = [full[i, :, : lq[i], : lk[i]] for i in range(batch)]
    check_grads_varlen(grads, dout, q, k, v, cq, ck, dtype, dropout_masks=masks, **kw)


@cases(
    "lens,d,causal,kernel",
    cpu=[("short", 64, True, "auto"), ("tiles", 64, True, "auto")],
    cuda=[("short", 64, True, kern) for kern in flash_kernels("cuda", "bfloat16", 64, backward=True)]
    + [
        ("tiles", d, c, kern)
        for d in (64, 128)
        for c in (False, True)
        for kern in flash_kernels("cuda", "bfloat16", d, backward=True)
    ],
    ids=lambda lens, d, c, kern: f"{lens}-d{d}-{'causal' if c else 'full'}-{kern}",
)
def test_backward_varlen_lengths(backend, rng, lens, d, causal, kernel):
    """bfloat16 packed batches: "short" (17, 64, 1 queries over 30, 64, 5 keys, MHA) and "tiles"
    (130, 1, 300, 0 queries over 257, 200, 300, 64 keys, GQA 2:1: several query tiles and key
    blocks per sequence, a sequence without queries)."""
    if lens == "short":
        lq, lk, h, hk = [17, 64, 1], [30, 64, 5], 2, 2
    else:
        lq, lk, h, hk = [130, 1, 300, 0], [257, 200, 300, 64], 4, 2
    res = varlen_bwd(backend, rng, "bfloat16", lq, lk, h, hk, d, kernel=kernel, causal=causal)
    if res is not None:
        grads, args, cq, ck = res
        check_grads_varlen(grads, *args, cq, ck, "bfloat16", causal=causal)


# ---------------------------------------------------------------------------
# edge cases
# ---------------------------------------------------------------------------


def test_backward_fully_masked_rows(backend, rng):
    """sq > sk causal: rows that see nothing get dq = 0; no NaN anywhere."""
    grads, (dout, q, k, v) = run_bwd(backend, rng, "float32", (1, 9, 4, 2, 1, 8), causal=True)
    assert np.all(as_np64(grads[0])[0, :5] == 0)
    check_grads(grads, dout, q, k, v, "float32", causal=True)


def test_backward_empty_query(backend, rng):
    """seqlen_q = 0: dk and dv are zeros (written), dq is empty."""
    q = backend.randn(rng, (2, 0, 2, 8), "float32")
    k, v = backend.randn(rng, (2, 5, 1, 8), "float32"), backend.randn(rng, (2, 5, 1, 8), "float32")
    out, lse = pagedflash.flash_attn(q, k, v, return_lse=True)
    dq, dk, dv = pagedflash.flash_attn_backward(q, q, k, v, out, lse, dk=poison_like(k), dv=poison_like(v))
    assert tuple(dq.shape) == tuple(q.shape) and np.all(as_np64(dk) == 0) and np.all(as_np64(dv) == 0)


@cases(
    "sq,dtype",
    cpu=[(sq, dt) for sq in (1, 2, 5, 17) for dt in DTYPES],
    cuda=[(sq, dt) for sq in (1, 2, 5, 17) for dt in DTYPES],
)
def test_backward_large_inputs_no_nan(backend, rng, sq, dtype):
    """Large scores on short sequences: no NaN in any gradient. q x5 makes the scores x5;
    q, k, v and dout all x5 makes them x25 (and the gradients large)."""
    h, hk, d = 4, 2, 32
    for causal in (False, True):
        for qs, ks in ((5.0, 1.0), (5.0, 5.0)):
            q = backend.randn(rng, (2, sq, h, d), dtype, scale=qs)
            k = backend.randn(rng, (2, sq, hk, d), dtype, scale=ks)
            v = backend.randn(rng, (2, sq, hk, d), dtype, scale=ks)
            dout = backend.randn(rng, q.shape, dtype, scale=ks)
            out, lse = pagedflash.flash_attn(q, k, v, causal=causal, return_lse=True)
            grads = pagedflash.flash_attn_backward(dout, q, k, v, out, lse, causal=causal)
            for g in grads:
                assert np.all(np.isfinite(as_np64(g)))
            if dtype == "float32":
                # dS = P (dP - D) cancels terms of size |dO| |V| sqrt(d) (D = rowsum(dO * O),
                # as in FlashAttention), so float32 leaves residue of 1e-7 of those terms even
                # where the exact gradient is 0 (sq = 1); the bound is 1e-5 relative to them.
                ref = reference.attention_backward(dout, q, k, v, causal=causal)
                a = [as_np64(x) for x in (dout, v, q, k)]
                dp_size = np.max(np.abs(a[0])) * np.max(np.abs(a[1])) * np.sqrt(d)
                grad_size = dp_size * max(np.max(np.abs(a[2])), np.max(np.abs(a[3]))) / np.sqrt(d)
                for g, r in zip(grads, ref):
                    tol = 1e-5 * max(1.0, np.max(np.abs(r)), grad_size)
                    assert np.max(np.abs(as_np64(g) - r)) <= tol


def test_backward_strided_inputs(backend, rng):
    """Views with non-contiguous batch/token/head strides give the same gradients as contiguous copies."""
    base = backend.randn(rng, (2, 33, 3, 4, 16), "float32")  # q, k, v interleaved: [b, s, 3, h, d]
    q, k, v = base[:, :, 0], base[:, :, 1, :2], base[:, :, 2, :2]
    dout = backend.randn(rng, q.shape, "float32")
    out, lse = pagedflash.flash_attn(q, k, v, causal=True, return_lse=True)
    g = pagedflash.flash_attn_backward(dout, q, k, v, out, lse, causal=True)
    contiguous = (lambda x: x.contiguous()) if backend.is_cuda else np.ascontiguousarray
    c = [contiguous(x) for x in (dout, q, k, v)]
    gc = pagedflash.flash_attn_backward(c[0], c[1], c[2], c[3], out, lse, causal=True)
    for a, b in zip(g, gc):
        assert np.array_equal(as_np64(a), as_np64(b))


@cases(
    "dtype,hk,kernel",
    cpu=[(dt, 2, "auto") for dt in ("float32", "bfloat16")],
    cuda=[
        ("bfloat16", hk, kern)
        for hk in (1, 4)
        for kern in flash_kernels("cuda", "bfloat16", 128, backward=True, deterministic=True)
    ],
)
def test_backward_deterministic(backend, rng, dtype, hk, kernel):
    """deterministic=True: bitwise-identical gradients over 20 runs (on the CPU cycling through 1,
    2 and 3 threads, with causal, softcap and dropout; on CUDA causal at d = 128, GQA 4:1 and MHA)."""
    if backend.is_cuda:
        shape, kw = (2, 500, 500, 4, hk, 128), dict(causal=True)
    else:
        shape, kw = (2, 150, 140, 4, hk, 40), dict(causal=True, softcap=4.0, dropout_p=0.1, seed=11)
    b, sq, sk, h, hk, d = shape
    q = backend.randn(rng, (b, sq, h, d), dtype)
    k, v = backend.randn(rng, (b, sk, hk, d), dtype), backend.randn(rng, (b, sk, hk, d), dtype)
    dout = backend.randn(rng, q.shape, dtype)
    out, lse = pagedflash.flash_attn(q, k, v, return_lse=True, kernel=kernel, **kw)
    saved = pagedflash._C.get_num_threads()  # as set: 0 = one per core
    try:
        first = None
        for run in range(20):
            pagedflash.set_num_threads([1, 2, 3][run % 3])
            g = pagedflash.flash_attn_backward(dout, q, k, v, out, lse, deterministic=True, kernel=kernel, **kw)
            g = [as_np64(x) for x in g]
            if first is None:
                first = g
            for a, b_ in zip(first, g):
                assert np.array_equal(a.view(np.uint64), b_.view(np.uint64))
    finally:
        pagedflash.set_num_threads(saved)


def test_backward_bad_input(backend, rng):
    q = backend.randn(rng, (2, 6, 4, 8), "float32")
    k, v = backend.randn(rng, (2, 6, 2, 8), "float32"), backend.randn(rng, (2, 6, 2, 8), "float32")
    out, lse = pagedflash.flash_attn(q, k, v, return_lse=True)
    half = (lambda x: x.to(torch.float16)) if backend.is_cuda else (lambda x: x.astype(np.float16))
    with pytest.raises(ValueError, match="lse"):
        pagedflash.flash_attn_backward(q, q, k, v, out, lse[:, :, :5])
    with pytest.raises(TypeError, match="lse"):
        pagedflash.flash_attn_backward(q, q, k, v, out, half(lse))
    with pytest.raises(ValueError, match="dout"):
        pagedflash.flash_attn_backward(q[:, :5], q, k, v, out, lse)
    with pytest.raises(TypeError, match="dout"):
        pagedflash.flash_attn_backward(half(q), q, k, v, out, lse)
    with pytest.raises(ValueError, match="out"):
        pagedflash.flash_attn_backward(q, q, k, v, out[:1], lse)
    dq, dk, dv = poison_like(q), poison_like(k), poison_like(v)
    with pytest.raises(ValueError, match="dk"):
        pagedflash.flash_attn_backward(q, q, k, v, out, lse, dq=dq, dk=poison_like(q), dv=dv)
    with pytest.raises(TypeError, match="dv"):
        pagedflash.flash_attn_backward(q, q, k, v, out, lse, dq=dq, dk=dk, dv=half(dv))
    assert all(np.all(np.isnan(as_np64(x))) for x in (dq, dk, dv))


@cuda_only
def test_backward_kernel_refusals(backend, rng):
    """NotImplementedError, nothing written: "sm80" / "sm90" for float32, "sm90" with
    deterministic=True (the wgmma backward accumulates dq with atomics), "sm90" at d = 96."""

    def refuse(dtype, d, kernel, **kw):
        q = backend.randn(rng, (1, 70, 2, d), dtype)
        k, v = backend.randn(rng, (1, 80, 2, d), dtype), backend.randn(rng, (1, 80, 2, d), dtype)
        out, lse = pagedflash.flash_attn(q, k, v, return_lse=True)
        dq, dk, dv = poison_like(q), poison_like(k), poison_like(v)
        with pytest.raises(NotImplementedError):
            pagedflash.flash_attn_backward(q, q, k, v, out, lse, dq=dq, dk=dk, dv=dv, kernel=kernel, **kw)
        assert all(torch.isnan(x).all() for x in (dq, dk, dv))

    refuse("float32", 64, "sm80")
    refuse("float32", 64, "sm90")
    refuse("bfloat16", 128, "sm90", deterministic=True)
    refuse("bfloat16", 96, "sm90")


@cpu_only
def test_backward_cpu_is_deterministic_anyway(backend, rng):
    """The CPU backward is always deterministic: deterministic=False gives the same bits."""
    q = backend.randn(rng, (1, 50, 2, 32), "float32")
    k, v = backend.randn(rng, (1, 60, 1, 32), "float32"), backend.randn(rng, (1, 60, 1, 32), "float32")
    dout = backend.randn(rng, q.shape, "float32")
    out, lse = pagedflash.flash_attn(q, k, v, return_lse=True)
    a = pagedflash.flash_attn_backward(dout, q, k, v, out, lse, deterministic=True)
    b = pagedflash.flash_attn_backward(dout, q, k, v, out, lse)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


@cases("d", cuda=[64, 128])
def test_kernels_agree(backend, rng, d):
    """The sm_80 kernels and the automatic choice (the wgmma kernels on Hopper) on the same inputs,
    forward and backward: each passes the rule, and the two differ by at most 4x the naive error
    (out: 4 max|naive - ref| + 1e-5; gradients likewise with the naive gradients' error)."""
    dtype = "bfloat16"
    q, k, v = (backend.randn(rng, s, dtype) for s in ((2, 300, 4, d), (2, 300, 2, d), (2, 300, 2, d)))
    dout = backend.randn(rng, q.shape, dtype)
    results = []
    for kernel in ("auto", "sm80"):
        out, lse = pagedflash.flash_attn(q, k, v, causal=True, return_lse=True, kernel=kernel)
        grads = pagedflash.flash_attn_backward(dout, q, k, v, out, lse, causal=True, kernel=kernel)
        check_grads(grads, dout, q, k, v, dtype, causal=True)
        results.append((out, grads))
    ref = reference.attention(q, k, v, causal=True)
    nerr = float(np.max(np.abs(naive_attention_lowp(q, k, v, causal=True) - ref)))
    (oa, ga), (ob, gb) = results
    assert_close(oa, ref, naive_attention_lowp(q, k, v, causal=True), dtype=dtype)
    assert float(np.max(np.abs(as_np64(oa) - as_np64(ob)))) <= 4 * nerr + 1e-5
    gref = reference.attention_backward(dout, q, k, v, causal=True)
    gnaive = naive_grads(dout, q, k, v, dtype=dtype, causal=True)
    for name, a, b, r, n in zip(("dq", "dk", "dv"), ga, gb, gref, gnaive):
        gerr = float(np.max(np.abs(n - r)))
        assert float(np.max(np.abs(as_np64(a) - as_np64(b)))) <= 4 * gerr + 1e-5, name
