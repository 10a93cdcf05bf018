"""Forward features of flash_attn / flash_attn_varlen on the CPU backend: sliding
window (with and without causal), softcap, ALiBi (per head and per batch x head),
dropout (Philox mask, realized drop fraction, reproducibility), packed varlen batches
with random lengths including 0 and 1, every GQA ratio, every dtype; and the
exceptions raised for bad values of each of these arguments.

Everything is compared with pagedflash.reference (float64) under the DESIGN.md rule
(tests/conftest.py: assert_close).
"""
from __future__ import annotations

import numpy as np
import pytest

import pagedflash
from pagedflash import reference

from conftest import DTYPES, as_np64, assert_close, naive_attention_lowp, poison_like, randn

torch = pytest.importorskip("torch")

# (num_heads, num_kv_heads): MHA, GQA 2 and 3, MQA
GQA = [(4, 4), (4, 2), (6, 2), (3, 1)]

# masking configurations: (name, options, alibi kind)
CONFIGS = [
    ("window", dict(window=(7, 3)), None),
    ("causal_window", dict(causal=True, window=(16, -1)), None),
    ("right_window", dict(window=(-1, 0)), None),
    ("softcap", dict(softcap=5.0), None),
    ("softcap_causal_alibi", dict(causal=True, softcap=2.0), "head"),
    ("alibi_batch_window", dict(window=(20, 5)), "batch"),
]

# (batch, seqlen_q, seqlen_k, head_dim): odd lengths, non power-of-two head dims
SHAPES = [(2, 7, 13, 24), (1, 113, 203, 40), (2, 65, 64, 72), (1, 1, 17, 8), (2, 17, 5, 1)]


def alibi(rng, kind, batch, h):
    if kind is None:
        return None
    shape = (h,) if kind == "head" else (batch, h)
    return rng.uniform(0.05, 1.0, shape).astype(np.float32)


def lowp_naive(q, k, v, *, dropout_p=0.0, dropout_mask=None, **kw):
    """The naive algorithm in the input's precision (with dropout when asked)."""
    if dropout_mask is None:
        return naive_attention_lowp(q, k, v, **kw)
    tq, tk, tv = (x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x)) for x in (q, k, v))
    out = reference.attention_torch(tq, tk, tv, dropout_p=dropout_p,
                                    dropout_mask=torch.from_numpy(np.asarray(dropout_mask)), **kw)
    return out.to(torch.float64).numpy()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", GQA, ids=lambda hh: f"h{hh[0]}kv{hh[1]}")
@pytest.mark.parametrize("cfg", range(len(CONFIGS)), ids=[c[0] for c in CONFIGS])
def test_forward_features(rng, dtype, heads, cfg):
    name, opts, akind = CONFIGS[cfg]
    b, sq, sk, d = SHAPES[(cfg + heads[0] + heads[1]) % len(SHAPES)]
    h, hk = heads
    q, k, v = randn(rng, (b, sq, h, d), dtype), randn(rng, (b, sk, hk, d), dtype), randn(rng, (b, sk, hk, d), dtype)
    kw = dict(opts, alibi_slopes=alibi(rng, akind, b, h))
    out = poison_like(q)
    res, lse = pagedflash.flash_attn(q, k, v, out=out, return_lse=True, **kw)
    assert res is out
    ref, ref_lse = reference.attention(q, k, v, return_lse=True, **kw)
    naive = None if dtype == "float32" else lowp_naive(q, k, v, **kw)
    assert_close(out, ref, naive, dtype=dtype)
    # lse: float32 accumulation whatever the dtype; -inf exactly where a row sees nothing
    lse = as_np64(lse)
    fin = np.isfinite(ref_lse)
    assert np.array_equal(np.isfinite(lse), fin) and np.all(lse[~fin] == -np.inf)
    assert np.max(np.abs(lse[fin] - ref_lse[fin]), initial=0.0) <= 1e-4 * max(1.0, np.max(np.abs(ref_lse[fin]), initial=0.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(4, 4), (4, 1), (6, 3)], ids=lambda hh: f"h{hh[0]}kv{hh[1]}")
def test_forward_dropout_matches_reference_with_mask(rng, dtype, heads):
    h, hk = heads
    b, sq, sk, d = 2, 37, 70, 24
    q, k, v = randn(rng, (b, sq, h, d), dtype), randn(rng, (b, sk, hk, d), dtype), randn(rng, (b, sk, hk, d), dtype)
    kw = dict(causal=True, window=(40, -1), softcap=4.0, dropout_p=0.25)
    seed = int(rng.integers(0, 2**63))
    out = pagedflash.flash_attn(q, k, v, seed=seed, offset=3, out=poison_like(q), **kw)
    mask = pagedflash.dropout_mask(q, k, dropout_p=0.25, seed=seed, offset=3)
    assert as_np64(mask).shape == (b, h, sq, sk)
    ref = reference.attention(q, k, v, dropout_mask=mask, **kw)
    naive = None if dtype == "float32" else lowp_naive(q, k, v, dropout_mask=as_np64(mask), **kw)
    assert_close(out, ref, naive, dtype=dtype)
    # same seed, same result, bit for bit; another seed or offset, another result
    again = pagedflash.flash_attn(q, k, v, seed=seed, offset=3, **kw)
    assert np.array_equal(as_np64(again), as_np64(out))
    other = pagedflash.flash_attn(q, k, v, seed=seed, offset=4, **kw)
    assert not np.array_equal(as_np64(other), as_np64(out))


def test_dropout_mask_fraction_and_keys(rng):
    q = randn(rng, (2, 300, 3, 8), "float32")
    k = randn(rng, (2, 257, 1, 8), "float32")
    for p in (0.1, 0.5, 0.9):
        m = pagedflash.dropout_mask(q, k, dropout_p=p, seed=1234)
        assert m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1}
        n = m.size
        dropped = 1.0 - m.mean()
        # binomial: 6 standard deviations
        assert abs(dropped - p) < 6 * np.sqrt(p * (1 - p) / n), (p, dropped)
    m1 = pagedflash.dropout_mask(q, k, dropout_p=0.3, seed=7)
    assert np.array_equal(m1, pagedflash.dropout_mask(q, k, dropout_p=0.3, seed=7))
    assert not np.array_equal(m1, pagedflash.dropout_mask(q, k, dropout_p=0.3, seed=8))
    assert not np.array_equal(m1, pagedflash.dropout_mask(q, k, dropout_p=0.3, seed=7, offset=1))
    # heads and batches draw independent masks
    assert not np.array_equal(m1[0, 0], m1[0, 1]) and not np.array_equal(m1[0, 0], m1[1, 0])
    # dropout_p = 0 keeps everything
    assert pagedflash.dropout_mask(q, k, dropout_p=0.0, seed=7).all()
    # the mask does not depend on the dtype (same keys, same bits)
    m16 = pagedflash.dropout_mask(q.astype(np.float16), k.astype(np.float16), dropout_p=0.3, seed=7)
    assert np.array_equal(m1, m16)


def test_dropout_realized_in_output(rng):
    """Columns dropped by the mask contribute nothing: with V = one-hot keys, out = P*keep/(1-p)."""
    sq, sk, p = 50, 64, 0.4
    q = randn(rng, (1, sq, 1, 64), "float32")
    k = randn(rng, (1, sk, 1, 64), "float32")
    v = np.eye(sk, 64, dtype=np.float32)[None, :, None, :]
    out = pagedflash.flash_attn(q, k, v, dropout_p=p, seed=99)
    mask = pagedflash.dropout_mask(q, k, dropout_p=p, seed=99)
    _, probs = reference.attention(q, k, v, return_probs=True)
    expect = probs[0, 0] * mask[0, 0] / (1 - p)
    assert np.allclose(out[0, :, 0, :], expect, rtol=1e-5, atol=1e-6)
    assert np.all(out[0, :, 0, :][mask[0, 0] == 0] == 0)
    assert abs((1 - mask.mean()) - p) < 0.05


def random_lengths(rng, batch, lo, hi, special=(0, 1)):
    lens = rng.integers(lo, hi + 1, batch)
    lens[: len(special)] = special[: batch]
    rng.shuffle(lens)
    return lens


def cu(lens):
    return np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)


VARLEN_CONFIGS = [
    ("plain", dict(), None),
    ("causal", dict(causal=True), None),
    ("window_softcap", dict(window=(9, 2), softcap=3.0), None),
    ("causal_alibi", dict(causal=True), "batch"),
    ("dropout", dict(causal=True, dropout_p=0.3), None),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(4, 2), (3, 3), (4, 1)], ids=lambda hh: f"h{hh[0]}kv{hh[1]}")
@pytest.mark.parametrize("cfg", range(len(VARLEN_CONFIGS)), ids=[c[0] for c in VARLEN_CONFIGS])
def test_varlen_forward(rng, dtype, heads, cfg):
    name, opts, akind = VARLEN_CONFIGS[cfg]
    h, hk = heads
    d = 40
    batch = 5
    lq = random_lengths(rng, batch, 0, 80)
    lk = lq.copy() if cfg % 2 else random_lengths(rng, batch, 0, 90, special=(1, 0))
    cq, ck = cu(lq), cu(lk)
    q = randn(rng, (int(cq[-1]), h, d), dtype)
    k, v = randn(rng, (int(ck[-1]), hk, d), dtype), randn(rng, (int(ck[-1]), hk, d), dtype)
    kw = dict(opts, alibi_slopes=alibi(rng, akind, batch, h))
    seed = 4242
    out = poison_like(q)
    _, lse = pagedflash.flash_attn_varlen(q, k, v, cq, ck, int(lq.max()), int(lk.max()), out=out,
                                          return_lse=True, seed=seed, **kw)
    masks = None
    if kw.get("dropout_p"):
        full = pagedflash.dropout_mask(q, k, dropout_p=kw["dropout_p"], seed=seed, cu_seqlens_q=cq, cu_seqlens_k=ck)
        full = as_np64(full)
        assert full.shape == (batch, h, lq.max(), lk.max())
        masks = [full[i, :, : lq[i], : lk[i]] for i in range(batch)]
        assert full.sum() == sum(m.sum() for m in masks)  # nothing outside the sequences
    ref, ref_lse = reference.attention_varlen(q, k, v, cq, ck, dropout_masks=masks, return_lse=True, **kw)
    naive = None
    if dtype != "float32":
        # the naive algorithm per sequence, in the input precision
        naive = np.zeros(ref.shape)
        for i in range(batch):
            qs, ks = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
            sl = None if kw["alibi_slopes"] is None else kw["alibi_slopes"][i]
            o = lowp_naive(q[qs][None], k[ks][None], v[ks][None],
                           dropout_mask=None if masks is None else masks[i][None],
                           **dict(kw, alibi_slopes=sl))
            naive[qs] = o[0]
    assert_close(out, ref, naive, dtype=dtype)
    lse = as_np64(lse)
    fin = np.isfinite(ref_lse)
    assert np.array_equal(np.isfinite(lse), fin)
    assert np.max(np.abs(lse[fin] - ref_lse[fin]), initial=0.0) <= 1e-4 * max(1.0, np.max(np.abs(ref_lse[fin]), initial=0.0))


def test_varlen_matches_dense_per_sequence(rng):
    """A packed batch gives each sequence exactly what a dense call on it alone gives."""
    lq, lk = np.array([5, 0, 1, 33]), np.array([9, 4, 1, 33])
    cq, ck = cu(lq), cu(lk)
    q = randn(rng, (int(cq[-1]), 4, 16), "float32")
    k, v = randn(rng, (int(ck[-1]), 2, 16), "float32"), randn(rng, (int(ck[-1]), 2, 16), "float32")
    kw = dict(causal=True, window=(6, -1), softcap=2.5)
    out = pagedflash.flash_attn_varlen(q, k, v, cq, ck, 33, 33, **kw)
    for i in range(len(lq)):
        qs, ks = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
        dense = pagedflash.flash_attn(q[qs][None], k[ks][None], v[ks][None], **kw)
        assert np.array_equal(out[qs], dense[0])


def test_fully_masked_rows_are_zero(rng):
    """sq > sk with causal: the first sq - sk rows see no key (out 0, lse -inf, no NaN)."""
    q = randn(rng, (1, 9, 2, 8), "float32")
    k, v = randn(rng, (1, 4, 2, 8), "float32"), randn(rng, (1, 4, 2, 8), "float32")
    out, lse = pagedflash.flash_attn(q, k, v, causal=True, alibi_slopes=np.ones(2, np.float32), return_lse=True)
    assert np.all(out[0, :5] == 0) and np.all(lse[0, :, :5] == -np.inf)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(lse[0, :, 5:]))


# ---------------------------------------------------------------------------
# bad input: a clear exception naming the argument, nothing written
# ---------------------------------------------------------------------------


def _problem(rng):
    lens = np.array([3, 5, 0, 2])
    c = cu(lens)
    qv = randn(rng, (int(c[-1]), 4, 8), "float32")
    kv = randn(rng, (int(c[-1]), 2, 8), "float32")
    vv = randn(rng, (int(c[-1]), 2, 8), "float32")
    qd = randn(rng, (2, 6, 4, 8), "float32")
    kd = randn(rng, (2, 6, 2, 8), "float32")
    vd = randn(rng, (2, 6, 2, 8), "float32")
    return c, (qv, kv, vv), (qd, kd, vd)


def _call(which, dense, varlen, c, store, **kw):
    """Run forward or backward, dense or varlen, on NaN-poisoned outputs kept in `store`."""
    cq = kw.pop("cq", c)
    ck = kw.pop("ck", c)
    q, k, v = varlen if which.endswith("varlen") else dense
    if which.startswith("fwd"):
        store.append(poison_like(q))
        if which.endswith("varlen"):
            pagedflash.flash_attn_varlen(q, k, v, cq, ck, 5, 5, out=store[0], **kw)
        else:
            pagedflash.flash_attn(q, k, v, out=store[0], **kw)
    else:
        store.extend([poison_like(q), poison_like(k), poison_like(v)])
        o = np.zeros_like(q)
        if which.endswith("varlen"):
            lse = np.zeros((q.shape[1], q.shape[0]), np.float32)
            pagedflash.flash_attn_backward(q, q, k, v, o, lse, cu_seqlens_q=cq, cu_seqlens_k=ck,
                                           dq=store[0], dk=store[1], dv=store[2], **kw)
        else:
            lse = np.zeros((q.shape[0], q.shape[2], q.shape[1]), np.float32)
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


@pytest.mark.parametrize("which", ["fwd", "fwd_varlen", "bwd", "bwd_varlen"])
@pytest.mark.parametrize("case", range(len(BAD)), ids=[b[0] for b in BAD])
def test_bad_options(rng, which, case):
    name, kw, exc, arg = BAD[case]
    c, varlen, dense = _problem(rng)
    copies = [x.copy() for x in varlen + dense]
    store = []
    with pytest.raises(exc, match=arg):
        _call(which, dense, varlen, c, store, **dict(kw))
    for buf in store:
        assert np.all(np.isnan(buf)), "a failed call wrote into an output"
    for a, b in zip(copies, varlen + dense):
        assert np.array_equal(a, b)


CU_BAD = [
    ("not_monotone", dict(cq=np.array([0, 5, 3, 8, 10], np.int32)), "cu_seqlens_q"),
    ("wrong_total", dict(ck=np.array([0, 3, 8, 8, 9], np.int32)), "cu_seqlens_k"),
    ("not_starting_at_zero", dict(cq=np.array([1, 3, 8, 8, 10], np.int32)), "cu_seqlens_q"),
    ("wrong_length", dict(ck=np.array([0, 3, 8, 10], np.int32)), "cu_seqlens_k"),
    ("wrong_dtype", dict(cq=np.array([0, 3, 8, 8, 10], np.int64)), "cu_seqlens_q"),
]


@pytest.mark.parametrize("which", ["fwd_varlen", "bwd_varlen"])
@pytest.mark.parametrize("case", range(len(CU_BAD)), ids=[b[0] for b in CU_BAD])
def test_bad_cu_seqlens(rng, which, case):
    name, kw, arg = CU_BAD[case]
    c, varlen, dense = _problem(rng)
    exc = TypeError if name == "wrong_dtype" else ValueError
    copies = [x.copy() for x in varlen]
    store = []
    with pytest.raises(exc, match=arg):
        _call(which, dense, varlen, c, store, **dict(kw))
    for buf in store:
        assert np.all(np.isnan(buf)), "a failed call wrote into an output"
    for a, b in zip(copies, varlen):
        assert np.array_equal(a, b)


def test_bad_options_write_nothing(rng):
    """The output buffers of a rejected call keep their poison."""
    c, varlen, dense = _problem(rng)
    q, k, v = dense
    out = poison_like(q)
    with pytest.raises(ValueError, match="window"):
        pagedflash.flash_attn(q, k, v, window=(-3, 0), out=out)
    assert np.all(np.isnan(out))
    dq, dk, dv = poison_like(q), poison_like(k), poison_like(v)
    with pytest.raises(ValueError, match="dropout_p"):
        pagedflash.flash_attn_backward(q, q, k, v, q, np.zeros((2, 4, 6), np.float32), dropout_p=2.0,
                                       seed=0, dq=dq, dk=dk, dv=dv)
    assert all(np.all(np.isnan(x)) for x in (dq, dk, dv))


def test_mismatched_cu_seqlens_pair(rng):
    c, (q, k, v), _ = _problem(rng)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        pagedflash.flash_attn_backward(q, q, k, v, q, np.zeros((4, q.shape[0]), np.float32), cu_seqlens_q=c)
    with pytest.raises(ValueError, match="mask|cu_seqlens"):
        pagedflash.dropout_mask(q, k, dropout_p=0.1, seed=1, cu_seqlens_q=c)
