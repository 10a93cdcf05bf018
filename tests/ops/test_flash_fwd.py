"""flash_attn and flash_attn_varlen (the forward) on every backend, against the float64
reference under the rule of tests/conftest.py.

Covered: dtypes; head dims (CPU 1..256; CUDA the instantiated ones and dims padded up to them,
incl. ones that are not a multiple of 8); odd lengths (1, 7, 113, 203, 1023); every GQA ratio;
causal (bottom-right), windows, softcap, ALiBi (per head and per sequence), softmax_scale
(negative too); dropout (the mask the op dropout_mask reports); fully masked rows (out 0, lse
-inf); strided views in and out; packed varlen batches with lengths 0 and 1 and understated
max_seqlen_q; bitwise repeatability; bad input (forward and backward) raising before anything is
written. On CUDA every case runs with kernel="auto" and "sm80" (float16/bfloat16), and "sm90"
where the wgmma kernels take it (conftest.flash_kernels); CUDA-only: device-resident cu_seqlens
with bad values, streams, CuPy / JAX through DLPack, the kernels a hint refuses.
"""

from __future__ import annotations

import os

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
    check_lse,
    cpu_only,
    cu_seqlens,
    cuda_only,
    dropout_keep,
    flash_kernels,
    naive_attention_lowp,
    naive_attention_varlen_lowp,
    nan_buffer,
    poison_like,
    refused,
    torch,
)
from pagedflash import reference


def fwd(q, k, v, *, kernel="auto", **opts):
    """flash_attn into a NaN-poisoned out, with lse."""
    out = poison_like(q)
    res, lse = pagedflash.flash_attn(q, k, v, out=out, return_lse=True, kernel=kernel, **opts)
    assert res is out
    assert str(lse.dtype).endswith("float32") and tuple(lse.shape) == (q.shape[0], q.shape[2], q.shape[1])
    return out, lse


def inputs(backend, rng, dtype, shape):
    b, sq, sk, h, hk, d = shape
    return (
        backend.randn(rng, (b, sq, h, d), dtype),
        backend.randn(rng, (b, sk, hk, d), dtype),
        backend.randn(rng, (b, sk, hk, d), dtype),
    )


def check(q, k, v, out, lse, dtype, **opts):
    """out (and lse) against reference.attention under the rule."""
    ref, ref_lse = reference.attention(q, k, v, return_lse=True, **opts)
    naive = None if dtype == "float32" else naive_attention_lowp(q, k, v, **opts)
    assert_close(out, ref, naive, dtype=dtype)
    if lse is not None:
        check_lse(lse, ref_lse)


def run(backend, rng, dtype, shape, kernel="auto", **opts):
    """Build inputs, run the forward with `kernel`, check; None where the device refuses the hint."""
    q, k, v = inputs(backend, rng, dtype, shape)
    if refused(backend, kernel, lambda: pagedflash.flash_attn(q, k, v, kernel=kernel, **opts)):
        return None
    out, lse = fwd(q, k, v, kernel=kernel, **opts)
    check(q, k, v, out, lse, dtype, **opts)
    return q, k, v, out, lse


def _kid(dtype, *rest):
    return "-".join([dtype] + [str(x) for x in rest])


# ---------------------------------------------------------------------------
# head dims, lengths, GQA
# ---------------------------------------------------------------------------


def _head_dim_rows():
    cpu = [
        (dt, d, c, "auto", (2, 113, 203, 4, 2) if d % 16 else (2, 203, 113, 4, 2))
        for dt in DTYPES
        for d in (1, 8, 40, 64, 80, 128, 256)
        for c in (False, True)
    ]
    cuda = [
        (dt, d, c, kern, (2, 113, 203, 4, 2))
        for dt in DTYPES
        for d in (32, 64, 96, 128, 192, 256)
        for c in (False, True)
        for kern in flash_kernels("cuda", dt, d)
    ]
    # head dims between instantiations, zero-padded; 7 and 100 take the unaligned path
    cuda += [
        (dt, d, True, kern, (1, 77, 130, 3, 3))
        for dt in LOWP
        for d in (7, 40, 80, 100, 160, 200)
        for kern in flash_kernels("cuda", dt, d)
    ]
    return cpu, cuda


@cases(
    "dtype,d,causal,kernel,shape",
    cpu=_head_dim_rows()[0],
    cuda=_head_dim_rows()[1],
    ids=lambda dt, d, c, kern, s: f"{dt}-d{d}-{'causal' if c else 'full'}-{kern}",
)
def test_head_dims(backend, rng, dtype, d, causal, kernel, shape):
    run(backend, rng, dtype, shape[:5] + (d,), kernel, causal=causal)


CPU_LENGTHS = [
    (1, 1),
    (1, 7),
    (7, 1),
    (7, 113),
    (113, 7),
    (113, 203),
    (203, 113),
    (1, 1023),
    (1023, 1),
    (203, 1023),
    (1023, 203),
    (1023, 1023),
]
CUDA_LENGTHS = [(1, 1), (7, 7), (1, 203), (203, 1), (113, 203), (203, 113), (1023, 1023), (128, 64), (64, 128)]


@cases(
    "dtype,sq,sk,causal,kernel",
    cpu=[(dt, sq, sk, c, "auto") for dt in DTYPES for sq, sk in CPU_LENGTHS for c in (False, True)],
    cuda=[
        (dt, sq, sk, c, kern)
        for dt in LOWP
        for sq, sk in CUDA_LENGTHS
        for c in (False, True)
        for kern in flash_kernels("cuda", dt, 64)
    ],
    ids=lambda dt, sq, sk, c, kern: f"{dt}-{sq}x{sk}-{'causal' if c else 'full'}-{kern}",
)
def test_lengths(backend, rng, dtype, sq, sk, causal, kernel):
    """Odd lengths; causal with sq > sk has fully masked top rows (out 0, lse -inf)."""
    run(backend, rng, dtype, (1, sq, sk, 2, 1, 64), kernel, causal=causal)


@cases(
    "dtype,h,hk,causal,kernel,shape",
    cpu=[
        (dt, h, hk, c, "auto", (2, 7, 113, 80))
        for dt in DTYPES
        for h, hk in ((4, 4), (4, 2), (8, 1), (16, 2), (6, 3))
        for c in (False, True)
    ],
    cuda=[
        (dt, 6, hk, False, kern, (2, 64, 96, 64))
        for dt in DTYPES
        for hk in (1, 2, 3, 6)
        for kern in flash_kernels("cuda", dt, 64)
    ],
    ids=lambda dt, h, hk, c, kern, s: f"{dt}-h{h}kv{hk}-{'causal' if c else 'full'}-{kern}",
)
def test_gqa(backend, rng, dtype, h, hk, causal, kernel, shape):
    b, sq, sk, d = shape
    run(backend, rng, dtype, (b, sq, sk, h, hk, d), kernel, causal=causal)


# ---------------------------------------------------------------------------
# masking options
# ---------------------------------------------------------------------------

WINDOWS = [
    ((16, 0), False),
    ((0, 0), False),
    ((32, 8), False),
    ((-1, 5), False),
    ((7, -1), False),
    ((40, -1), True),
    ((1000, 1000), False),
]


@cases(
    "dtype,window,causal,kernel",
    cpu=[(dt, w, c, "auto") for dt in DTYPES for w, c in WINDOWS],
    cuda=[(dt, w, c, kern) for dt in DTYPES for w, c in WINDOWS for kern in flash_kernels("cuda", dt, 128)],
    ids=lambda dt, w, c, kern: f"{dt}-w{w[0]}_{w[1]}-{'causal' if c else 'full'}-{kern}",
)
def test_windows(backend, rng, dtype, window, causal, kernel):
    run(backend, rng, dtype, (2, 150, 211, 2, 2, 128), kernel, window=window, causal=causal)


# (name, options, alibi kind); shapes (batch, seqlen_q, seqlen_k, head_dim) cycle through FEATURE_SHAPES
FEATURES = [
    ("window", dict(window=(7, 3)), None),
    ("causal_window", dict(causal=True, window=(16, -1)), None),
    ("right_window", dict(window=(-1, 0)), None),
    ("softcap", dict(softcap=5.0), None),
    ("softcap_causal_alibi", dict(causal=True, softcap=2.0), "head"),
    ("alibi_batch_window", dict(window=(20, 5)), "batch"),
]
FEATURE_SHAPES = [(2, 7, 13, 24), (1, 113, 203, 40), (2, 65, 64, 72), (1, 1, 17, 8), (2, 17, 5, 1)]
FEATURE_HEADS = [(4, 4), (4, 2), (6, 2), (3, 1)]


def _feature_rows(be):
    return [
        (dt, hh, i, kern)
        for dt in DTYPES
        for hh in FEATURE_HEADS
        for i in range(len(FEATURES))
        for kern in flash_kernels(
            be,
            dt,
            FEATURE_SHAPES[(i + hh[0] + hh[1]) % len(FEATURE_SHAPES)][3],
            extras=FEATURES[i][0].startswith(("softcap", "alibi")),
        )
    ]


@cases(
    "dtype,heads,cfg,kernel",
    cpu=_feature_rows("cpu"),
    cuda=_feature_rows("cuda"),
    ids=lambda dt, hh, i, kern: f"{FEATURES[i][0]}-h{hh[0]}kv{hh[1]}-{dt}-{kern}",
)
def test_features(backend, rng, dtype, heads, cfg, kernel):
    name, opts, akind = FEATURES[cfg]
    b, sq, sk, d = FEATURE_SHAPES[(cfg + heads[0] + heads[1]) % len(FEATURE_SHAPES)]
    h, hk = heads
    slopes = alibi_slopes(rng, akind, b, h)
    q, k, v = inputs(backend, rng, dtype, (b, sq, sk, h, hk, d))
    kw = dict(opts, alibi_slopes=backend.put(slopes))
    if refused(backend, kernel, lambda: pagedflash.flash_attn(q, k, v, kernel=kernel, **kw)):
        return
    out, lse = fwd(q, k, v, kernel=kernel, **kw)
    check(q, k, v, out, lse, dtype, **kw)


@cases(
    "dtype,causal,kernel",
    cpu=[(dt, c, "auto") for dt in DTYPES for c in (False, True)],
    cuda=[(dt, c, kern) for dt in DTYPES for c in (False, True) for kern in flash_kernels("cuda", dt, 64, extras=True)],
)
def test_softcap_alibi(backend, rng, dtype, causal, kernel):
    q, k, v = inputs(backend, rng, dtype, (2, 97, 130, 4, 2, 64))
    slopes = backend.put(alibi_slopes(rng, "head", 2, 4, 0.01, 0.5))
    for opts in ({"softcap": 5.0}, {"alibi_slopes": slopes}, {"softcap": 20.0, "alibi_slopes": slopes}):
        if refused(backend, kernel, lambda opts=opts: pagedflash.flash_attn(q, k, v, kernel=kernel, **opts)):
            return
        out, lse = fwd(q, k, v, causal=causal, kernel=kernel, **opts)
        check(q, k, v, out, lse, dtype, causal=causal, **opts)


@cases("kernel", cpu=["auto"], cuda=flash_kernels("cuda", "bfloat16", 96, extras=True))
def test_alibi_per_batch_and_scale(backend, rng, kernel):
    """ALiBi slopes per (sequence, head), a custom and a negative softmax_scale."""
    q, k, v = inputs(backend, rng, "bfloat16", (2, 65, 65, 3, 1, 96))
    slopes = backend.put(alibi_slopes(rng, "batch", 2, 3, 0.01, 0.5))
    for scale in (0.3, -0.2):
        out, lse = fwd(q, k, v, alibi_slopes=slopes, softmax_scale=scale, causal=True, kernel=kernel)
        check(q, k, v, out, lse, "bfloat16", alibi_slopes=slopes, softmax_scale=scale, causal=True)


@cases(
    "dtype,kernel",
    cpu=[(dt, "auto") for dt in DTYPES],
    cuda=[(dt, kern) for dt in DTYPES for kern in flash_kernels("cuda", dt, 64)],
)
def test_softmax_scale(backend, rng, dtype, kernel):
    run(backend, rng, dtype, (1, 37, 53, 2, 2, 64), kernel, softmax_scale=0.3)


# (name, dtype, shape, options): rows that see no key get out = 0 exactly and lse = -inf, no NaN
MASKED_ROWS = [
    ("causal_sq_gt_sk", "float32", (1, 10, 4, 2, 2, 16), dict(causal=True)),
    ("causal_alibi", "float32", (1, 9, 4, 2, 2, 8), dict(causal=True, alibi=True)),
    ("window", "bfloat16", (1, 200, 40, 2, 2, 64), dict(window=(3, 0))),
]


@cases(
    "cfg,kernel",
    cpu=[(i, "auto") for i in range(len(MASKED_ROWS))],
    cuda=[
        (i, kern)
        for i, (_, dt, s, o) in enumerate(MASKED_ROWS)
        for kern in flash_kernels("cuda", dt, s[5], extras="alibi" in o)
    ],
    ids=lambda i, kern: f"{MASKED_ROWS[i][0]}-{kern}",
)
def test_fully_masked_rows(backend, rng, cfg, kernel):
    name, dtype, shape, opts = MASKED_ROWS[cfg]
    opts = dict(opts)
    if opts.pop("alibi", False):
        opts["alibi_slopes"] = backend.put(np.ones(shape[3], np.float32))
    q, k, v = inputs(backend, rng, dtype, shape)
    if refused(backend, kernel, lambda: pagedflash.flash_attn(q, k, v, kernel=kernel, **opts)):
        return
    out, lse = fwd(q, k, v, kernel=kernel, **opts)
    check(q, k, v, out, lse, dtype, **opts)
    ref_lse = reference.attention(q, k, v, return_lse=True, **opts)[1]
    masked = np.isneginf(ref_lse)  # [b, h, sq]
    assert masked.any()
    o = as_np64(out).transpose(0, 2, 1, 3)  # [b, h, sq, d]
    assert np.all(o[masked] == 0) and np.all(np.isfinite(o))
    assert np.all(np.isfinite(as_np64(lse)[~masked]))


def test_large_scores_no_overflow(backend, rng):
    q = backend.randn(rng, (1, 64, 2, 64), "float32", scale=30)
    k = backend.randn(rng, (1, 64, 2, 64), "float32", scale=30)
    v = backend.randn(rng, (1, 64, 2, 64), "float32")
    out = pagedflash.flash_attn(q, k, v)
    o = as_np64(out)
    assert np.isfinite(o).all()
    # scores ~1e3: float32 rounding of the scores alone moves P by ~1e-4 relative, so the
    # check here is against the float32-rounded scores' own error, not 1e-5
    err = np.max(np.abs(o - reference.attention(q, k, v)))
    assert err < 1e-3, err


# ---------------------------------------------------------------------------
# strided views, libraries, threads
# ---------------------------------------------------------------------------


@cases(
    "lib,dtype,kernel",
    cpu=[("numpy", "float32", "auto")] + [("torch", dt, "auto") for dt in DTYPES],
    cuda=[("torch", dt, kern) for dt in DTYPES for kern in flash_kernels("cuda", dt, 72)],
)
def test_strided_views(backend, rng, lib, dtype, kernel):
    """Views with permuted / gapped batch, token and head strides (last dimension contiguous) are
    read and written in place, not copied: q transposed from [b, h, s, d], k every other head, v
    every other token, out a transposed view of a NaN-poisoned buffer."""
    b, s, h, d = 2, 45, 4, 72
    tl = "torch" if lib == "torch" else None

    def heads_first(x):  # [b, h, s, d] -> a [b, s, h, d] view
        return x.transpose(0, 2, 1, 3) if lib == "numpy" else x.transpose(1, 2)

    q = heads_first(backend.randn(rng, (b, h, s, d), dtype, lib=tl))
    k = backend.randn(rng, (b, s, 2 * 2, d), dtype, lib=tl)[:, :, ::2]
    v = backend.randn(rng, (b, 2 * s, 2, d), dtype, lib=tl)[:, ::2]
    big = nan_buffer((b, h, s, d), q)
    out = heads_first(big)
    res = pagedflash.flash_attn(q, k, v, causal=True, out=out, kernel=kernel)
    assert res is out and type(res) is type(q)
    naive = None if dtype == "float32" else naive_attention_lowp(q, k, v, causal=True)
    assert_close(heads_first(big), reference.attention(q, k, v, causal=True), naive, dtype=dtype)


def test_strided_last_dim_is_copied_by_the_api(backend, rng):
    """A strided last dimension is copied by the caller's library, then computed."""
    q = backend.randn(rng, (1, 9, 2, 64), "float32")[..., ::2]
    k = backend.randn(rng, (1, 11, 2, 32), "float32")
    v = backend.randn(rng, (1, 11, 2, 32), "float32")
    out = pagedflash.flash_attn(q, k, v)
    assert_close(out, reference.attention(q, k, v), dtype="float32")


@cpu_only
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts_bitwise_identical(backend, rng, threads):
    q = backend.randn(rng, (2, 150, 4, 64), "float32")
    k = backend.randn(rng, (2, 170, 2, 64), "float32")
    v = backend.randn(rng, (2, 170, 2, 64), "float32")
    pagedflash.set_num_threads(1)
    try:
        one = pagedflash.flash_attn(q, k, v, causal=True)
        pagedflash.set_num_threads(threads)
        assert pagedflash.get_num_threads() == threads
        many = pagedflash.flash_attn(q, k, v, causal=True)
    finally:
        pagedflash.set_num_threads(0)
    assert np.array_equal(one, many)


@cpu_only
def test_gil_released_during_compute(backend, rng):
    """While a call computes, other Python threads keep running: the largest pause the
    main thread sees is far shorter than the call (it would span the call if the GIL
    were held)."""
    import threading
    import time

    q = backend.randn(rng, (1, 2048, 8, 64), "float32")
    t0 = time.perf_counter()
    pagedflash.flash_attn(q, q, q)
    single = time.perf_counter() - t0
    done = threading.Event()

    def work():
        pagedflash.flash_attn(q, q, q)
        done.set()

    t = threading.Thread(target=work)
    last = time.perf_counter()
    max_gap = 0.0
    t.start()
    while not done.is_set():
        now = time.perf_counter()
        max_gap = max(max_gap, now - last)
        last = now
    t.join()
    assert max_gap < 0.5 * single, f"main thread paused {max_gap:.3f}s during a {single:.3f}s call"


@cases(
    "dropout_p,kernel",
    cpu=[(p, "auto") for p in (0.0, 0.25)],
    cuda=[(p, kern) for p in (0.0, 0.25) for kern in flash_kernels("cuda", "bfloat16", 128, dropout=p > 0)],
)
def test_repeat_bitwise(backend, rng, dropout_p, kernel):
    """The same call gives the same bits every time (100 times on CUDA: races would show)."""
    q, k, v = inputs(backend, rng, "bfloat16", (2, 300, 300, 4, 2, 128) if backend.is_cuda else (1, 130, 150, 2, 1, 40))
    opts = dict(causal=True, dropout_p=dropout_p, seed=5, kernel=kernel)
    if refused(backend, kernel, lambda: pagedflash.flash_attn(q, k, v, **opts)):
        return
    first, first_lse = fwd(q, k, v, **opts)
    for _ in range(100 if backend.is_cuda else 3):
        out, lse = fwd(q, k, v, **opts)
        assert torch.equal(out.view(torch.int16), first.view(torch.int16))
        assert torch.equal(lse, first_lse)


# ---------------------------------------------------------------------------
# dropout (the mask itself: test_dropout_mask.py)
# ---------------------------------------------------------------------------


@cases(
    "dtype,heads,kernel",
    cpu=[(dt, hh, "auto") for dt in DTYPES for hh in ((4, 4), (4, 1), (6, 3))],
    cuda=[
        (dt, hh, kern)
        for dt in DTYPES
        for hh in ((4, 4), (4, 1), (6, 3))
        for kern in flash_kernels("cuda", dt, 24, extras=True, dropout=True)
    ],
    ids=lambda dt, hh, kern: f"{dt}-h{hh[0]}kv{hh[1]}-{kern}",
)
def test_dropout_with_masks(backend, rng, dtype, heads, kernel):
    """Dropout with causal, window and softcap: out = the reference with the mask dropout_mask
    reports for (seed, offset); the same seed gives the same bits, another offset another result."""
    h, hk = heads
    q, k, v = inputs(backend, rng, dtype, (2, 37, 70, h, hk, 24))
    kw = dict(causal=True, window=(40, -1), softcap=4.0, dropout_p=0.25)
    seed = int(rng.integers(0, 2**63))
    out, lse = fwd(q, k, v, seed=seed, offset=3, kernel=kernel, **kw)
    mask = pagedflash.dropout_mask(q, k, dropout_p=0.25, seed=seed, offset=3)
    assert tuple(mask.shape) == (2, h, 37, 70)
    check(q, k, v, out, lse, dtype, dropout_mask=mask, **kw)  # lse: the softmax before dropout
    again = pagedflash.flash_attn(q, k, v, seed=seed, offset=3, kernel=kernel, **kw)
    assert np.array_equal(as_np64(again), as_np64(out))
    other = pagedflash.flash_attn(q, k, v, seed=seed, offset=4, kernel=kernel, **kw)
    assert not np.array_equal(as_np64(other), as_np64(out))


@cases(
    "dtype,causal,kernel",
    cpu=[(dt, c, "auto") for dt in DTYPES for c in (False, True)],
    cuda=[
        (dt, c, kern) for dt in DTYPES for c in (False, True) for kern in flash_kernels("cuda", dt, 64, dropout=True)
    ],
)
def test_dropout(backend, rng, dtype, causal, kernel):
    """A 64-bit seed and an offset, MQA; on CUDA also the CPU backend's output for the same seed."""
    b, sq, sk, h, hk, d = 2, 70, 93, 3, 1, 64
    q, k, v = inputs(backend, rng, dtype, (b, sq, sk, h, hk, d))
    seed, offset, p = 0x1234_5678_9ABC_DEF1, 7, 0.17
    opts = dict(causal=causal, dropout_p=p, seed=seed, offset=offset)
    if refused(backend, kernel, lambda: pagedflash.flash_attn(q, k, v, kernel=kernel, **opts)):
        return
    out, lse = fwd(q, k, v, kernel=kernel, **opts)
    mask = pagedflash.dropout_mask(q, k, dropout_p=p, seed=seed, offset=offset)
    check(q, k, v, out, lse, dtype, causal=causal, dropout_p=p, dropout_mask=mask)
    if backend.is_cuda:
        cpu_out = pagedflash.flash_attn(q.cpu(), k.cpu(), v.cpu(), **opts)
        ref = reference.attention(q, k, v, causal=causal, dropout_p=p, dropout_mask=mask)
        naive = (
            None if dtype == "float32" else naive_attention_lowp(q, k, v, causal=causal, dropout_p=p, dropout_mask=mask)
        )
        assert_close(cpu_out, ref, naive, dtype=dtype, what="CPU backend out, same seed")


# ---------------------------------------------------------------------------
# varlen
# ---------------------------------------------------------------------------


def random_lengths(rng, batch, lo, hi, special=(0, 1)):
    lens = rng.integers(lo, hi + 1, batch)
    lens[: len(special)] = special[:batch]
    rng.shuffle(lens)
    return lens


VARLEN = [
    ("plain", dict(), None),
    ("causal", dict(causal=True), None),
    ("window_softcap", dict(window=(9, 2), softcap=3.0), None),
    ("causal_alibi", dict(causal=True), "batch"),
    ("dropout", dict(causal=True, dropout_p=0.3), None),
]
VARLEN_HEADS = [(4, 2), (3, 3), (4, 1)]


def varlen_fwd(q, k, v, cq, ck, max_q, max_k, *, kernel="auto", **kw):
    out = poison_like(q)
    res, lse = pagedflash.flash_attn_varlen(
        q, k, v, cq, ck, int(max_q), int(max_k), out=out, return_lse=True, kernel=kernel, **kw
    )
    assert res is out and tuple(lse.shape) == (q.shape[1], q.shape[0])
    return out, lse


def check_varlen(q, k, v, cq, ck, out, lse, dtype, *, dropout_masks=None, **kw):
    ref, ref_lse = reference.attention_varlen(q, k, v, cq, ck, dropout_masks=dropout_masks, return_lse=True, **kw)
    naive = (
        None if dtype == "float32" else naive_attention_varlen_lowp(q, k, v, cq, ck, dropout_masks=dropout_masks, **kw)
    )
    assert_close(out, ref, naive, dtype=dtype)
    check_lse(lse, ref_lse)


def _varlen_rows(be):
    return [
        (dt, hh, i, kern)
        for dt in DTYPES
        for hh in VARLEN_HEADS
        for i in range(len(VARLEN))
        for kern in flash_kernels(be, dt, 40)
    ]


@cases(
    "dtype,heads,cfg,kernel",
    cpu=_varlen_rows("cpu"),
    cuda=_varlen_rows("cuda"),
    ids=lambda dt, hh, i, kern: f"{VARLEN[i][0]}-h{hh[0]}kv{hh[1]}-{dt}-{kern}",
)
def test_varlen(backend, rng, dtype, heads, cfg, kernel):
    """Five packed sequences of random lengths including 0 and 1 (keys too), every option."""
    name, opts, akind = VARLEN[cfg]
    h, hk = heads
    d, batch = 40, 5
    lq = random_lengths(rng, batch, 0, 80)
    lk = lq.copy() if cfg % 2 else random_lengths(rng, batch, 0, 90, special=(1, 0))
    cq, ck = cu_seqlens(lq), cu_seqlens(lk)
    q = backend.randn(rng, (int(cq[-1]), h, d), dtype)
    k, v = backend.randn(rng, (int(ck[-1]), hk, d), dtype), backend.randn(rng, (int(ck[-1]), hk, d), dtype)
    slopes = alibi_slopes(rng, akind, batch, h)
    kw = dict(opts, alibi_slopes=backend.put(slopes))
    seed = 4242
    out, lse = varlen_fwd(q, k, v, backend.put(cq), backend.put(ck), lq.max(), lk.max(), seed=seed, kernel=kernel, **kw)
    masks = None
    if kw.get("dropout_p"):
        full = as_np64(
            dropout_keep(
                q, k, dropout_p=kw["dropout_p"], seed=seed, cu_seqlens_q=backend.put(cq), cu_seqlens_k=backend.put(ck)
            )
        )
        assert full.shape == (batch, h, lq.max(), lk.max())
        masks = [full[i, :, : lq[i], : lk[i]] for i in range(batch)]
        assert full.sum() == sum(m.sum() for m in masks)  # nothing outside the sequences
    check_varlen(q, k, v, cq, ck, out, lse, dtype, dropout_masks=masks, **kw)


@cases(
    "dtype,causal,kernel",
    cpu=[(dt, c, "auto") for dt in DTYPES for c in (False, True)],
    cuda=[
        (dt, c, kern) for dt in DTYPES for c in (False, True) for kern in flash_kernels("cuda", dt, 128, extras=True)
    ],
)
def test_varlen_understated_max_seqlen_q(backend, rng, dtype, causal, kernel):
    """Lengths 0, 1, 203 with ALiBi; an understated max_seqlen_q (1) is still computed in full."""
    lq, lk = [1, 113, 0, 64, 203, 7], [5, 113, 9, 200, 203, 1]
    h, hk, d = 4, 2, 128
    q = backend.randn(rng, (sum(lq), h, d), dtype)
    k, v = backend.randn(rng, (sum(lk), hk, d), dtype), backend.randn(rng, (sum(lk), hk, d), dtype)
    cq, ck = cu_seqlens(lq), cu_seqlens(lk)
    slopes = backend.put(alibi_slopes(rng, "head", 1, h, 0.01, 0.3))
    if refused(
        backend,
        kernel,
        lambda: pagedflash.flash_attn_varlen(q, k, v, backend.put(cq), backend.put(ck), 1, max(lk), kernel=kernel),
    ):
        return
    for max_q in (max(lq), 1):
        out, lse = varlen_fwd(
            q, k, v, backend.put(cq), backend.put(ck), max_q, max(lk), causal=causal, alibi_slopes=slopes, kernel=kernel
        )
        check_varlen(q, k, v, cq, ck, out, lse, dtype, causal=causal, alibi_slopes=slopes)


@cases(
    "d,kernel",
    cpu=[(d, "auto") for d in (64, 128)],
    cuda=[(d, kern) for d in (64, 128) for kern in flash_kernels("cuda", "bfloat16", d)],
)
def test_varlen_understated_max_seqlen_q_plain(backend, rng, d, kernel):
    """The kernels without score extras (on Hopper the wgmma fast path: 64-key tiles at d=64,
    128-key tiles at d=128) also loop over the query tiles beyond an understated max_seqlen_q,
    reusing their shared-memory buffers across tiles."""
    lq, lk, h = [300, 5, 129], [290, 700, 129], 2
    q = backend.randn(rng, (sum(lq), h, d), "bfloat16")
    k, v = backend.randn(rng, (sum(lk), h, d), "bfloat16"), backend.randn(rng, (sum(lk), h, d), "bfloat16")
    cq, ck = cu_seqlens(lq), cu_seqlens(lk)
    args = (q, k, v, backend.put(cq), backend.put(ck), 1, max(lk))
    if refused(backend, kernel, lambda: pagedflash.flash_attn_varlen(*args, kernel=kernel)):
        return
    for causal in (False, True):
        out, lse = varlen_fwd(*args, causal=causal, kernel=kernel)
        check_varlen(q, k, v, cq, ck, out, lse, "bfloat16", causal=causal)


@cases("kernel", cpu=["auto"], cuda=flash_kernels("cuda", "bfloat16", 64, dropout=True))
def test_varlen_dropout(backend, rng, kernel):
    """Varlen dropout keys the mask by (sequence, head, row within the sequence): the packed
    output is the reference with each sequence's own mask."""
    lq, lk, h, d, p, seed = [33, 50], [40, 50], 2, 64, 0.3, 99
    q = backend.randn(rng, (sum(lq), h, d), "bfloat16")
    k, v = backend.randn(rng, (sum(lk), h, d), "bfloat16"), backend.randn(rng, (sum(lk), h, d), "bfloat16")
    cq, ck = backend.put(cu_seqlens(lq)), backend.put(cu_seqlens(lk))
    if refused(
        backend,
        kernel,
        lambda: pagedflash.flash_attn_varlen(q, k, v, cq, ck, 50, 50, dropout_p=p, seed=seed, kernel=kernel),
    ):
        return
    out, lse = varlen_fwd(q, k, v, cq, ck, 50, 50, dropout_p=p, seed=seed, kernel=kernel)
    full = as_np64(dropout_keep(q, k, dropout_p=p, seed=seed, cu_seqlens_q=cq, cu_seqlens_k=ck))
    masks = [full[i, :, : lq[i], : lk[i]] for i in range(2)]
    check_varlen(q, k, v, cq, ck, out, lse, "bfloat16", dropout_p=p, dropout_masks=masks)


@cpu_only
def test_varlen_matches_dense_per_sequence(backend, rng):
    """A packed batch gives each sequence exactly what a dense call on it alone gives."""
    lq, lk = np.array([5, 0, 1, 33]), np.array([9, 4, 1, 33])
    cq, ck = cu_seqlens(lq), cu_seqlens(lk)
    q = backend.randn(rng, (int(cq[-1]), 4, 16), "float32")
    k, v = backend.randn(rng, (int(ck[-1]), 2, 16), "float32"), backend.randn(rng, (int(ck[-1]), 2, 16), "float32")
    kw = dict(causal=True, window=(6, -1), softcap=2.5)
    out = pagedflash.flash_attn_varlen(q, k, v, cq, ck, 33, 33, **kw)
    for i in range(len(lq)):
        qs, ks = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
        dense = pagedflash.flash_attn(q[qs][None], k[ks][None], v[ks][None], **kw)
        assert np.array_equal(out[qs], dense[0])


@cases("kernel", cuda=flash_kernels("cuda", "float16", 64))
def test_bad_device_cu_seqlens_stay_in_bounds(backend, rng, kernel):
    """cu_seqlens on the device cannot be validated on the host: the kernel clamps them. Such a
    call's values are unspecified, but it must not fault, must not write outside its output or
    into its inputs (out is a view into a guarded buffer whose guard rows, and q, k, v and the
    cu_seqlens, must come back unchanged), and must leave the device working (a valid call right
    after gives the reference result). compute-sanitizer (gpu_check.sh) checks the reads."""
    h, d, g = 2, 64, 64  # g guard rows before and after each output
    q = backend.randn(rng, (50, h, d), "float16")
    k, v = backend.randn(rng, (60, h, d), "float16"), backend.randn(rng, (60, h, d), "float16")
    ck = torch.tensor([0, 70, 10, 60], dtype=torch.int32, device="cuda")
    inputs_before = [x.clone() for x in (q, k, v, ck)]
    if refused(backend, kernel, lambda: pagedflash.flash_attn_varlen(q, k, v, ck, ck, 64, 64, kernel=kernel)):
        return
    for bad in ([0, 30, 20, 1000], [-5, 10, 70, 50], [0, 2**30, -(2**30), 50]):
        cq = torch.tensor(bad, dtype=torch.int32, device="cuda")
        out_big = torch.full((50 + 2 * g, h, d), 7.0, dtype=torch.float16, device="cuda")
        out = out_big[g : g + 50]
        pagedflash.flash_attn_varlen(q, k, v, cq, ck, 64, 64, causal=True, out=out, kernel=kernel)
        pagedflash.flash_attn_varlen(q, k, v, cq, ck, 64, 64, causal=True, return_lse=True, kernel=kernel)
        torch.cuda.synchronize()  # raises if a kernel faulted
        assert torch.all(out_big[:g] == 7.0) and torch.all(out_big[g + 50 :] == 7.0), "written outside out"
        assert torch.equal(cq, torch.tensor(bad, dtype=torch.int32, device="cuda")), "cu_seqlens_q was written"
        for before, now in zip(inputs_before, (q, k, v, ck)):
            assert torch.equal(before, now), "an input was written"
    # the device is still healthy: a valid call right after gives the reference result
    good = backend.put(cu_seqlens([20, 30, 0]))
    out, lse = varlen_fwd(q, k, v, good, backend.put(cu_seqlens([10, 40, 10])), 30, 40, causal=True, kernel=kernel)
    check_varlen(q, k, v, cu_seqlens([20, 30, 0]), cu_seqlens([10, 40, 10]), out, lse, "float16", causal=True)


# ---------------------------------------------------------------------------
# kernel hints
# ---------------------------------------------------------------------------


@cpu_only
def test_kernel_hints_cpu(backend, rng):
    """The CPU backend has one kernel: every valid flash hint gives the automatic result bit for
    bit (forward, varlen and backward)."""
    q, k, v = inputs(backend, rng, "float32", (1, 33, 40, 4, 2, 64))
    dout = backend.randn(rng, q.shape, "float32")
    base, lse = pagedflash.flash_attn(q, k, v, causal=True, return_lse=True)
    grads = pagedflash.flash_attn_backward(dout, q, k, v, base, lse, causal=True)
    cq = cu_seqlens([33])
    for kern in ("sm80", "sm90"):
        o, l = pagedflash.flash_attn(q, k, v, causal=True, return_lse=True, kernel=kern)
        assert np.array_equal(o, base) and np.array_equal(l, lse)
        ov = pagedflash.flash_attn_varlen(q[0], k[0, :33], v[0, :33], cq, cq, 33, 33, kernel=kern)
        assert np.array_equal(ov, pagedflash.flash_attn_varlen(q[0], k[0, :33], v[0, :33], cq, cq, 33, 33))
        g = pagedflash.flash_attn_backward(dout, q, k, v, base, lse, causal=True, kernel=kern)
        assert all(np.array_equal(a, b) for a, b in zip(g, grads))


def test_kernel_hint_names(backend, rng):
    """An unknown name, or a paged attention hint, is a ValueError on every backend; nothing written."""
    q, k, v = inputs(backend, rng, "bfloat16", (1, 8, 8, 2, 2, 64))
    out = poison_like(q)
    for bad, match in (
        ("bogus", "unknown kernel"),
        ("8x8", "not a kernel of flash_fwd"),
        ("simple", "not a kernel of flash_fwd"),
        ("sm90+registers", "kernel"),
    ):
        with pytest.raises(ValueError, match=match):
            pagedflash.flash_attn(q, k, v, out=out, kernel=bad)
    assert np.isnan(as_np64(out)).all()


@cuda_only
def test_kernel_refusals(backend, rng):
    """A hint that cannot take the call raises NotImplementedError and writes nothing: "sm80" /
    "sm90" for float32 (one CUDA-core kernel), "sm90" for a head dim without wgmma kernels, for an
    unaligned tensor, and off Hopper (the grids' "sm90" cases check that too)."""

    def refuse(q, k, v, kernel):
        out = poison_like(q)
        with pytest.raises(NotImplementedError):
            pagedflash.flash_attn(q, k, v, out=out, kernel=kernel)
        assert torch.isnan(out).all()

    q, k, v = inputs(backend, rng, "float32", (1, 40, 40, 2, 2, 64))
    refuse(q, k, v, "sm80")
    refuse(q, k, v, "sm90")
    q, k, v = inputs(backend, rng, "bfloat16", (1, 40, 40, 2, 2, 96))
    refuse(q, k, v, "sm90")
    # d = 64 views whose rows start 2 bytes past a 16-byte boundary: the sm_80 kernels' unaligned
    # path takes them, the wgmma kernels do not
    big = backend.randn(rng, (3, 1, 40, 2, 65), "bfloat16")
    q, k, v = big[0, ..., 1:], big[1, ..., 1:], big[2, ..., 1:]
    refuse(q, k, v, "sm90")
    out = pagedflash.flash_attn(q, k, v, kernel="sm80")
    check(q, k, v, out, None, "bfloat16")


# ---------------------------------------------------------------------------
# streams and frameworks (CUDA)
# ---------------------------------------------------------------------------


@cuda_only
def test_torch_current_stream(backend, rng):
    """flash_attn on torch CUDA tensors runs on torch's current stream: work queued before it
    on that (non-blocking) stream is seen, and the result is ordered before later work."""
    q, k, v = inputs(backend, rng, "bfloat16", (2, 256, 256, 4, 4, 128))
    q2 = backend.randn(rng, q.shape, "bfloat16")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.cuda._sleep(50_000_000)  # keep s busy so a kernel on another stream would race ahead
        q.copy_(q2)
        out, lse = pagedflash.flash_attn(q, k, v, causal=True, return_lse=True)
        out2 = out * 1  # ordered after the kernel on s
        lse2 = lse * 1
    s.synchronize()
    assert out.device == q.device and out.dtype == q.dtype and lse.dtype == torch.float32
    check(q2, k, v, out2, lse2, "bfloat16", causal=True)


@cuda_only
def test_torch_explicit_stream_argument(backend, rng):
    q, k, v = inputs(backend, rng, "float16", (1, 100, 100, 2, 2, 64))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    out = pagedflash.flash_attn(q, k, v, stream=s.cuda_stream)
    s.synchronize()
    check(q, k, v, out, None, "float16")


@cuda_only
def test_cupy_dlpack(backend, rng):
    cp = pytest.importorskip("cupy")
    qt, kt, vt = inputs(backend, rng, "float16", (2, 90, 120, 4, 2, 64))
    q, k, v = (cp.from_dlpack(x) for x in (qt, kt, vt))
    out = pagedflash.flash_attn(q, k, v, causal=True)
    assert isinstance(out, pagedflash.Tensor)
    o = cp.from_dlpack(out)
    assert o.shape == q.shape and o.dtype == q.dtype
    check(qt, kt, vt, torch.from_dlpack(o), None, "float16", causal=True)


@cuda_only
def test_cupy_current_stream(backend, rng):
    """CuPy inputs run on CuPy's current stream: work queued there before the call (a write
    of new values into q) is seen by the call, and the result is ready after that stream
    synchronizes, with no other synchronization."""
    cp = pytest.importorskip("cupy")
    qt, kt, vt = inputs(backend, rng, "float16", (2, 300, 310, 4, 2, 64))
    q0, k, v = (cp.from_dlpack(x) for x in (qt, kt, vt))
    torch.cuda.synchronize()
    with cp.cuda.Stream(non_blocking=True) as s:
        q = cp.empty_like(q0)
        q[...] = q0 * 2  # queued on s
        out = pagedflash.flash_attn(q, k, v, causal=True)
        s.synchronize()
    check(qt * 2, kt, vt, torch.from_dlpack(cp.from_dlpack(out)), None, "float16", causal=True)


@cuda_only
def test_jax_dlpack(backend, rng):
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    if not any(dev.platform == "gpu" for dev in jax.devices()):
        pytest.skip("JAX sees no GPU")
    qt, kt, vt = inputs(backend, rng, "bfloat16", (1, 64, 80, 2, 1, 128))
    q, k, v = (jnp.from_dlpack(x) for x in (qt, kt, vt))
    out, lse = pagedflash.flash_attn(q, k, v, return_lse=True)
    assert isinstance(out, pagedflash.Tensor)
    o = jnp.from_dlpack(out)
    assert o.shape == q.shape and o.dtype == q.dtype
    check(qt, kt, vt, torch.from_dlpack(o), torch.from_dlpack(jnp.from_dlpack(lse)), "bfloat16")


@cuda_only
def test_mixed_devices_and_head_ratio(backend, rng):
    q, k, v = inputs(backend, rng, "bfloat16", (1, 16, 16, 2, 2, 64))
    out = poison_like(q)
    with pytest.raises(ValueError, match="k"):
        pagedflash.flash_attn(q, k.cpu(), v, out=out)
    k3 = k[:, :, :1].expand(1, 16, 3, 64).contiguous()
    with pytest.raises(ValueError, match="num_heads"):
        pagedflash.flash_attn(q, k3, k3, out=out)
    assert torch.isnan(out).all()


# ---------------------------------------------------------------------------
# bad input (forward and backward): a clear exception naming the argument, nothing written
# ---------------------------------------------------------------------------


def _problem(backend, rng):
    """A small varlen problem (4 sequences, one empty) and a dense one, float32, on the backend."""
    c = cu_seqlens([3, 5, 0, 2])
    shapes = ((int(c[-1]), 4, 8), (int(c[-1]), 2, 8), (int(c[-1]), 2, 8), (2, 6, 4, 8), (2, 6, 2, 8), (2, 6, 2, 8))
    xs = [backend.randn(rng, s, "float32") for s in shapes]
    return c, tuple(xs[:3]), tuple(xs[3:])


def _call(backend, which, dense, varlen, c, store, **kw):
    """Run forward or backward, dense or varlen, on NaN-poisoned outputs kept in `store`."""
    cq = backend.put(kw.pop("cq", c))
    ck = backend.put(kw.pop("ck", c))
    kw = {n: backend.put(x) if isinstance(x, np.ndarray) else x for n, x in kw.items()}
    q, k, v = varlen if which.endswith("varlen") else dense
    if which.startswith("fwd"):
        store.append(poison_like(q))
        if which.endswith("varlen"):
            pagedflash.flash_attn_varlen(q, k, v, cq, ck, 5, 5, out=store[0], **kw)
        else:
            pagedflash.flash_attn(q, k, v, out=store[0], **kw)
    else:
        store.extend([poison_like(q), poison_like(k), poison_like(v)])
        o = q * 0.5
        if which.endswith("varlen"):
            lse = backend.put(np.zeros((q.shape[1], q.shape[0]), np.float32))
            pagedflash.flash_attn_backward(
                q, q, k, v, o, lse, cu_seqlens_q=cq, cu_seqlens_k=ck, dq=store[0], dk=store[1], dv=store[2], **kw
            )
        else:
            lse = backend.put(np.zeros((q.shape[0], q.shape[2], q.shape[1]), np.float32))
            pagedflash.flash_attn_backward(q, q, k, v, o, lse, dq=store[0], dk=store[1], dv=store[2], **kw)


BAD = [
    ("window_left", dict(window=(-2, 3)), ValueError, "window"),
    ("window_right", dict(window=(4, -5)), ValueError, "window"),
    ("window_pair", dict(window=(1, 2, 3)), ValueError, "window"),
    ("softcap_negative", dict(softcap=-1.0), ValueError, "softcap"),
    ("softcap_nan", dict(softcap=float("nan")), ValueError, "softcap"),
    ("dropout_negative", dict(dropout_p=-0.1, seed=1), ValueError, "dropout_p"),
    ("dropout_one", dict(dropout_p=1.0, seed=1), ValueError, "dropout_p"),
    ("dropout_big", dict(dropout_p=1.5, seed=1), ValueError, "dropout_p"),
    ("alibi_shape", dict(alibi_slopes=np.ones(3, np.float32)), ValueError, "alibi_slopes"),
    ("alibi_shape_2d", dict(alibi_slopes=np.ones((3, 4), np.float32)), ValueError, "alibi_slopes"),
    ("alibi_rank", dict(alibi_slopes=np.ones((1, 4, 1), np.float32)), ValueError, "alibi_slopes"),
    ("alibi_dtype", dict(alibi_slopes=np.ones(4, np.float64)), TypeError, "alibi_slopes"),
]
WHICH = ["fwd", "fwd_varlen", "bwd", "bwd_varlen"]


@cases(
    "which,case",
    cpu=[(w, i) for w in WHICH for i in range(len(BAD))],
    cuda=[(w, i) for w in WHICH for i in range(len(BAD))],
    ids=lambda w, i: f"{w}-{BAD[i][0]}",
)
def test_bad_options(backend, rng, which, case):
    name, kw, exc, arg = BAD[case]
    c, varlen, dense = _problem(backend, rng)
    copies = [as_np64(x) for x in varlen + dense]
    store = []
    with pytest.raises(exc, match=arg):
        _call(backend, which, dense, varlen, c, store, **dict(kw))
    for buf in store:
        assert np.all(np.isnan(as_np64(buf))), "a failed call wrote into an output"
    for a, b in zip(copies, varlen + dense):
        assert np.array_equal(a, as_np64(b))


# cu_seqlens values are checked on the host; device-resident ones only for shape and dtype (their
# values are clamped by the kernels: test_bad_device_cu_seqlens_stay_in_bounds)
CU_BAD = [
    ("not_monotone", dict(cq=np.array([0, 5, 3, 8, 10], np.int32)), "cu_seqlens_q"),
    ("wrong_total", dict(ck=np.array([0, 3, 8, 8, 9], np.int32)), "cu_seqlens_k"),
    ("not_starting_at_zero", dict(cq=np.array([1, 3, 8, 8, 10], np.int32)), "cu_seqlens_q"),
    ("wrong_length", dict(ck=np.array([0, 3, 8, 10], np.int32)), "cu_seqlens_k"),
    ("wrong_dtype", dict(cq=np.array([0, 3, 8, 8, 10], np.int64)), "cu_seqlens_q"),
]


@cases(
    "which,case",
    cpu=[(w, i) for w in ("fwd_varlen", "bwd_varlen") for i in range(len(CU_BAD))],
    cuda=[(w, i) for w in ("fwd_varlen", "bwd_varlen") for i in (3, 4)],
    ids=lambda w, i: f"{w}-{CU_BAD[i][0]}",
)
def test_bad_cu_seqlens(backend, rng, which, case):
    name, kw, arg = CU_BAD[case]
    c, varlen, dense = _problem(backend, rng)
    exc = TypeError if name == "wrong_dtype" else ValueError
    copies = [as_np64(x) for x in varlen]
    store = []
    with pytest.raises(exc, match=arg):
        _call(backend, which, dense, varlen, c, store, **dict(kw))
    for buf in store:
        assert np.all(np.isnan(as_np64(buf))), "a failed call wrote into an output"
    for a, b in zip(copies, varlen):
        assert np.array_equal(a, as_np64(b))


def test_bad_options_write_nothing(backend, rng):
    """The output buffers of a rejected call keep their poison."""
    c, varlen, dense = _problem(backend, rng)
    q, k, v = dense
    out = poison_like(q)
    with pytest.raises(ValueError, match="window"):
        pagedflash.flash_attn(q, k, v, window=(-3, 0), out=out)
    assert np.all(np.isnan(as_np64(out)))
    dq, dk, dv = poison_like(q), poison_like(k), poison_like(v)
    with pytest.raises(ValueError, match="dropout_p"):
        pagedflash.flash_attn_backward(
            q, q, k, v, q, backend.put(np.zeros((2, 4, 6), np.float32)), dropout_p=2.0, seed=0, dq=dq, dk=dk, dv=dv
        )
    assert all(np.all(np.isnan(as_np64(x))) for x in (dq, dk, dv))


def test_mismatched_cu_seqlens_pair(backend, rng):
    c, (q, k, v), _ = _problem(backend, rng)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        pagedflash.flash_attn_backward(
            q, q, k, v, q, backend.put(np.zeros((4, q.shape[0]), np.float32)), cu_seqlens_q=backend.put(c)
        )
    with pytest.raises(ValueError, match="mask|cu_seqlens"):
        pagedflash.dropout_mask(q, k, dropout_p=0.1, seed=1, cu_seqlens_q=backend.put(c))
