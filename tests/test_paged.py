"""Paged attention (decode, multi-query, chunked prefill) and flash decoding on the CPU
against the float64 reference on the contiguous sequence, plus merge_attn_states.

Caches are built from a random permutation of blocks (shared prefix blocks repeat across
sequences), with partial last blocks, NaN in every unused slot and unused block, and
garbage in the unused tail of every block-table row: none of it may reach the output.
"""
from __future__ import annotations

import numpy as np
import pytest

import pagedflash
from pagedflash import reference

from conftest import DTYPES, assert_close, naive_attention_lowp, poison_like, randn, torch
from paged_common import gather, make_cache, make_q, naive_lowp_paged


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def run_and_check(rng, *, dtype, lens, qlens, h, hk, d, bs, layout, share=False, num_splits=0,
                  causal=True, window=(-1, -1), softcap=0.0, alibi=None, softmax_scale=None):
    kc, vc, bt, sl = make_cache(rng, lens, hk, d, bs, dtype, share=share)
    q, cu_q, cu = make_q(rng, layout, qlens, h, d, dtype)
    slopes = None
    if alibi == "heads":
        slopes = rng.uniform(0.01, 0.5, size=h).astype(np.float32)
    elif alibi == "batch":
        slopes = rng.uniform(0.01, 0.5, size=(len(lens), h)).astype(np.float32)
    opts = dict(causal=causal, window=window, softcap=softcap, softmax_scale=softmax_scale)
    out = poison_like(q)
    res, lse = pagedflash.paged_attn(q, kc, vc, bt, sl, cu_seqlens_q=cu_q, alibi_slopes=slopes,
                                     num_splits=num_splits, return_lse=True, out=out, **opts)
    assert res is out
    assert type(lse) is type(q)
    ref, ref_lse = reference.paged_attention(q, kc, vc, bt, sl, cu_seqlens_q=cu_q, alibi_slopes=slopes,
                                             return_lse=True, **opts)
    naive = None
    if dtype != "float32":
        naive = naive_lowp_paged(q, kc, vc, bt, sl, cu, bs, alibi_slopes=slopes, **opts)
    assert_close(out, ref, naive, dtype=dtype)
    check_lse(lse, ref_lse)
    return q, kc, vc, bt, sl, cu_q, slopes, out, lse


def check_lse(lse, ref_lse):
    got = reference.to_f64(lse)
    assert got.shape == ref_lse.shape
    assert not np.isnan(got).any(), "lse: NaN"
    assert np.array_equal(np.isneginf(got), np.isneginf(ref_lse)), "lse: -inf where the reference is not"
    fin = np.isfinite(ref_lse)
    err = np.max(np.abs(got[fin] - ref_lse[fin])) if fin.any() else 0.0
    assert err <= 1e-4 * max(1.0, float(np.max(np.abs(ref_lse[fin])) if fin.any() else 1.0)), f"lse error {err}"


# ---------------------------------------------------------------------------
# decode: one query per sequence, every block size, GQA ratio and dtype
# ---------------------------------------------------------------------------

GQA = [(4, 4), (6, 2), (8, 1), (6, 3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bs", [1, 8, 16, 32, 256])
def test_decode(rng, dtype, bs):
    for i, (h, hk) in enumerate(GQA):
        d = [40, 64, 96, 128][i]
        lens = [1, 7, 113, 203, 64, 17][: 3 + i]
        run_and_check(rng, dtype=dtype, lens=lens, qlens=[1] * len(lens), h=h, hk=hk, d=d, bs=bs,
                      layout="decode", share=(i % 2 == 0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_long(rng, dtype):
    # a few thousand tokens, once with automatic splits and once with many
    run_and_check(rng, dtype=dtype, lens=[3001, 1023], qlens=[1, 1], h=8, hk=2, d=80, bs=16,
                  layout="decode", share=True)
    run_and_check(rng, dtype=dtype, lens=[2047], qlens=[1], h=4, hk=1, d=64, bs=32, layout="decode",
                  num_splits=0)  # one item of work: splits chosen automatically
    run_and_check(rng, dtype=dtype, lens=[2047], qlens=[1], h=4, hk=1, d=64, bs=32, layout="decode",
                  num_splits=9)


def test_head_dims_and_many_heads(rng):
    # head_dim 1, odd, 256; a group of 80 query heads per KV head (> one 64-row tile)
    for d in (1, 13, 256):
        run_and_check(rng, dtype="float32", lens=[5, 70], qlens=[1, 1], h=2, hk=1, d=d, bs=16, layout="decode")
    run_and_check(rng, dtype="float32", lens=[33, 100], qlens=[3, 3], h=80, hk=1, d=16, bs=8, layout="dense")


# ---------------------------------------------------------------------------
# several queries per sequence: speculative verification, chunked prefill, mixed batches
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_len", [1, 3, 17])
def test_dense_q_len(rng, dtype, q_len):
    lens = [q_len, q_len + 6, 113, 203]
    for bs, (h, hk) in ((16, (4, 4)), (8, (6, 2)), (32, (8, 1))):
        run_and_check(rng, dtype=dtype, lens=lens, qlens=[q_len] * len(lens), h=h, hk=hk, d=72, bs=bs,
                      layout="dense", share=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_mixed(rng, dtype):
    # chunked prefill (a chunk of 150 in a longer sequence, a whole prompt), decode, spec-verify,
    # and a sequence with no queries this step
    lens = [300, 150, 1, 41, 20]
    qlens = [150, 150, 1, 5, 0]
    for bs in (1, 16, 256):
        run_and_check(rng, dtype=dtype, lens=lens, qlens=qlens, h=6, hk=2, d=48, bs=bs, layout="packed")


# ---------------------------------------------------------------------------
# masking options and lse
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts", [
    dict(window=(64, -1)),
    dict(window=(5, 2), causal=False),
    dict(window=(-1, 3), causal=False),
    dict(causal=False),
    dict(softcap=5.0),
    dict(alibi="heads"),
    dict(alibi="batch", window=(40, 0)),
    dict(softmax_scale=0.3, softcap=2.0, alibi="heads"),
], ids=["window", "window_bidir", "right_only", "noncausal", "softcap", "alibi", "alibi_batch_window",
        "scale_softcap_alibi"])
def test_options(rng, dtype, opts):
    lens, qlens = [130, 9, 257], [4, 9, 17]
    run_and_check(rng, dtype=dtype, lens=lens, qlens=qlens, h=4, hk=2, d=56, bs=16, layout="packed", **opts)
    run_and_check(rng, dtype=dtype, lens=[1, 77, 300], qlens=[1, 1, 1], h=4, hk=1, d=32, bs=8,
                  layout="decode", num_splits=3, **opts)


def test_window_zero_sees_own_token(rng):
    # window (0, 0): query i sees exactly token seq_len - q_len + i, so out is that token's v
    q, kc, vc, bt, sl, cu, _, out, lse = run_and_check(
        rng, dtype="float32", lens=[20, 40], qlens=[1, 1], h=2, hk=1, d=16, bs=8, layout="decode",
        window=(0, 0), causal=False)
    for b, n in enumerate(sl):
        v_last = gather(vc, bt[b], int(n), 8)[-1, 0]
        np.testing.assert_allclose(out[b, 0], v_last, rtol=1e-6)
        np.testing.assert_allclose(out[b, 1], v_last, rtol=1e-6)


def test_library_in_library_out(rng):
    kc, vc, bt, sl = make_cache(rng, [9, 30], 2, 32, 8, "float32")
    q = randn(rng, (2, 4, 32), "float32")
    out = pagedflash.paged_attn(q, kc, vc, bt, sl)
    assert isinstance(out, np.ndarray) and out.shape == q.shape and out.dtype == q.dtype
    if torch is not None:
        tout, tlse = pagedflash.paged_attn(torch.from_numpy(q), torch.from_numpy(kc), torch.from_numpy(vc),
                                           torch.from_numpy(bt), torch.from_numpy(sl), return_lse=True)
        assert isinstance(tout, torch.Tensor) and isinstance(tlse, torch.Tensor)
        assert tlse.dtype == torch.float32 and tuple(tlse.shape) == (4, 2)
        np.testing.assert_array_equal(tout.numpy(), out)


# ---------------------------------------------------------------------------
# flash decoding: any number of splits agrees with one split to rounding
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_splits_agree(rng, dtype):
    lens = [1500, 77, 640]
    kc, vc, bt, sl = make_cache(rng, lens, 2, 64, 16, dtype, share=True)
    q = randn(rng, (3, 8, 64), dtype)
    o1, l1 = pagedflash.paged_attn(q, kc, vc, bt, sl, num_splits=1, return_lse=True, out=poison_like(q))
    ref, ref_lse = reference.paged_attention(q, kc, vc, bt, sl, return_lse=True)
    a1 = reference.to_f64(o1)
    for n in (0, 2, 5, 24, 1000):
        out = poison_like(q)
        on, ln = pagedflash.paged_attn(q, kc, vc, bt, sl, num_splits=n, return_lse=True, out=out)
        an = reference.to_f64(on)
        assert not np.isnan(an).any()
        if dtype == "float32":
            tol = 2e-6 * np.max(np.abs(a1))
        else:  # the two float32 results may round to neighbouring values of the output dtype
            ulp = 2.0 ** -10 if dtype == "float16" else 2.0 ** -7
            tol = ulp * np.max(np.abs(a1))
        assert np.max(np.abs(an - a1)) <= tol, f"num_splits={n}"
        np.testing.assert_allclose(reference.to_f64(ln), reference.to_f64(l1), rtol=0, atol=2e-5)
        check_lse(ln, ref_lse)
    if dtype == "float32":
        assert_close(o1, ref, dtype=dtype)


def test_splits_multi_query(rng):
    # splits with chunked-prefill queries and a window: partials of empty splits must not leak
    lens, qlens = [900, 400], [37, 3]
    kc, vc, bt, sl = make_cache(rng, lens, 1, 24, 32, "float32")
    q, cu_q, _ = make_q(rng, "packed", qlens, 3, 24, "float32")
    for opts in (dict(), dict(window=(100, 0))):
        ref, ref_lse = reference.paged_attention(q, kc, vc, bt, sl, cu_seqlens_q=cu_q, return_lse=True, **opts)
        for n in (1, 4, 15):
            out, lse = pagedflash.paged_attn(q, kc, vc, bt, sl, cu_seqlens_q=cu_q, num_splits=n,
                                             return_lse=True, out=poison_like(q), **opts)
            assert_close(out, ref, dtype="float32")
            check_lse(lse, ref_lse)


def test_repeatable(rng):
    kc, vc, bt, sl = make_cache(rng, [700, 33], 2, 64, 16, "float16")
    q = randn(rng, (2, 3, 4, 64), "float16")
    first = pagedflash.paged_attn(q, kc, vc, bt, sl, num_splits=4)
    for _ in range(3):
        again = pagedflash.paged_attn(q, kc, vc, bt, sl, num_splits=4)
        assert first.tobytes() == again.tobytes()


# ---------------------------------------------------------------------------
# merge_attn_states
# ---------------------------------------------------------------------------

def _to_heads_tokens(lse):
    """flash_attn's lse [b, h, s] -> [h, b * s] (contiguous, the caller's library)."""
    if torch is not None and isinstance(lse, torch.Tensor):
        return lse.permute(1, 0, 2).reshape(lse.shape[1], -1).contiguous()
    return np.ascontiguousarray(lse.transpose(1, 0, 2).reshape(lse.shape[1], -1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_two_key_sets(rng, dtype):
    b, sq, sk, h, hk, d = 2, 7, 203, 6, 2, 40
    q = randn(rng, (b, sq, h, d), dtype)
    k = randn(rng, (b, sk, hk, d), dtype)
    v = randn(rng, (b, sk, hk, d), dtype)
    cut = 113
    oa, la = pagedflash.flash_attn(q, k[:, :cut], v[:, :cut], return_lse=True)
    ob, lb = pagedflash.flash_attn(q, k[:, cut:], v[:, cut:], return_lse=True)
    out, lse = pagedflash.merge_attn_states(oa, _to_heads_tokens(la), ob, _to_heads_tokens(lb),
                                            out=poison_like(oa))
    assert type(out) is type(q) and tuple(out.shape) == tuple(q.shape)
    ref, ref_lse = reference.attention(q, k, v, return_lse=True)
    naive = naive_attention_lowp(q, k, v) if dtype != "float32" else None
    # two roundings of the partial outputs to the dtype before the merge: 3x, as for gradients
    assert_close(out, ref, naive, dtype=dtype, factor=3.0)
    check_lse(lse, ref_lse.transpose(1, 0, 2).reshape(h, -1))


def test_merge_edge_cases(rng):
    t, h, d = 5, 3, 20
    oa = rng.standard_normal((t, h, d)).astype(np.float32)
    ob = rng.standard_normal((t, h, d)).astype(np.float32)
    la = rng.standard_normal((h, t)).astype(np.float32)
    lb = rng.standard_normal((h, t)).astype(np.float32)
    la[0, 0] = lb[0, 0] = -np.inf   # both empty -> 0, -inf
    oa[0, 0] = ob[0, 0] = np.nan    # ...whatever they hold
    la[1, 2] = -np.inf              # a empty -> exactly b
    oa[2, 1] = np.nan
    lb[2, 4] = -np.inf              # b empty -> exactly a
    ob[4, 2] = np.inf
    out, lse = pagedflash.merge_attn_states(oa, la, ob, lb)
    np.testing.assert_array_equal(out[0, 0], 0.0)
    assert lse[0, 0] == -np.inf
    np.testing.assert_array_equal(out[2, 1], ob[2, 1])
    assert lse[1, 2] == lb[1, 2]
    np.testing.assert_array_equal(out[4, 2], oa[4, 2])
    assert lse[2, 4] == la[2, 4]
    # the rest against float64
    m = np.maximum(la, lb).astype(np.float64)
    with np.errstate(invalid="ignore"):
        wa, wb = np.exp(la - m), np.exp(lb - m)
        ref_lse = m + np.log(wa + wb)
        ref = (wa.T[..., None] * np.nan_to_num(oa, posinf=0) + wb.T[..., None] * np.nan_to_num(ob, posinf=0)) / (wa + wb).T[..., None]
    mask = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[mask], ref_lse[mask], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out[mask.T], ref[mask.T], rtol=1e-5, atol=1e-6)
    # in place, leading dims [2, 3]
    oa2 = rng.standard_normal((2, 3, h, d)).astype(np.float16)
    ob2 = rng.standard_normal((2, 3, h, d)).astype(np.float16)
    la2 = rng.standard_normal((h, 6)).astype(np.float32)
    lb2 = rng.standard_normal((h, 6)).astype(np.float32)
    expect, expect_lse = pagedflash.merge_attn_states(oa2, la2, ob2, lb2)
    res, res_lse = pagedflash.merge_attn_states(oa2, la2, ob2, lb2, out=oa2, out_lse=la2)
    assert res is oa2 and res_lse is la2
    assert oa2.tobytes() == expect.tobytes() and la2.tobytes() == expect_lse.tobytes()


def test_merge_bad_input(rng):
    oa = np.ones((4, 2, 8), np.float32)
    lse = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match="lse_b"):
        pagedflash.merge_attn_states(oa, lse, oa, np.zeros((4, 2), np.float32))
    with pytest.raises(TypeError, match="out_b"):
        pagedflash.merge_attn_states(oa, lse, oa.astype(np.float16), lse)
    with pytest.raises(TypeError, match="lse_a"):
        pagedflash.merge_attn_states(oa, lse.astype(np.float16), oa, lse)


# ---------------------------------------------------------------------------
# bad input: clear errors naming the argument, nothing written
# ---------------------------------------------------------------------------

def _setup_small(rng):
    kc, vc, bt, sl = make_cache(rng, [20, 35], 2, 16, 8, "float32")
    q = randn(rng, (2, 4, 16), "float32")
    return q, kc, vc, bt, sl


def _expect_error(exc, match, q, kc, vc, bt, sl, **kw):
    out = poison_like(q)
    before = (kc.tobytes(), vc.tobytes(), out.tobytes(), bt.tobytes(), sl.tobytes())
    with pytest.raises(exc, match=match):
        pagedflash.paged_attn(q, kc, vc, bt, sl, out=out, **kw)
    assert (kc.tobytes(), vc.tobytes(), out.tobytes(), bt.tobytes(), sl.tobytes()) == before


def test_bad_block_ids(rng):
    q, kc, vc, bt, sl = _setup_small(rng)
    for bad in (kc.shape[0], -1, 2**31 - 1):
        b2 = bt.copy()
        b2[1, 4] = bad  # the 5th (last used) block of a 35-token sequence
        _expect_error(ValueError, r"block_tables.*\[1, 4\]", q, kc, vc, b2, sl)
    # unused entries may hold anything
    b3 = bt.copy()
    b3[0, 3:] = -7
    pagedflash.paged_attn(q, kc, vc, b3, sl)


def test_bad_lengths(rng):
    q, kc, vc, bt, sl = _setup_small(rng)
    cap = bt.shape[1] * kc.shape[1]
    _expect_error(ValueError, "seq_lens.*exceeds", q, kc, vc, bt, np.array([20, cap + 1], np.int32))
    _expect_error(ValueError, "seq_lens.*negative", q, kc, vc, bt, np.array([-1, 3], np.int32))
    _expect_error(ValueError, "seq_lens", q, kc, vc, bt, np.array([20], np.int32))
    q4 = randn(rng, (2, 3, 4, 16), "float32")
    _expect_error(ValueError, r"seq_lens.*shorter", q4, kc, vc, bt, np.array([2, 35], np.int32))
    q_bad = randn(rng, (3, 4, 16), "float32")
    _expect_error(ValueError, r"q: .*batch", q_bad, kc, vc, bt, sl)


def test_bad_dtypes_and_shapes(rng):
    q, kc, vc, bt, sl = _setup_small(rng)
    _expect_error(TypeError, "block_tables.*int32", q, kc, vc, bt.astype(np.int64), sl)
    _expect_error(TypeError, "seq_lens.*int32", q, kc, vc, bt, sl.astype(np.int64))
    _expect_error(TypeError, "k_cache", q, kc.astype(np.float16), vc, bt, sl)
    _expect_error(ValueError, "v_cache", q, kc, vc[:, :4].copy(), bt, sl)
    _expect_error(ValueError, "num_heads", randn(rng, (2, 3, 16), "float32"), kc, vc, bt, sl)
    _expect_error(ValueError, "head_dim", randn(rng, (2, 4, 8), "float32"), kc, vc, bt, sl)
    _expect_error(ValueError, "alibi_slopes", q, kc, vc, bt, sl, alibi_slopes=np.ones(3, np.float32))
    _expect_error(ValueError, "num_splits", q, kc, vc, bt, sl, num_splits=-1)
    _expect_error(ValueError, "window", q, kc, vc, bt, sl, window=(-2, 0))
    big = np.zeros((2, 257, 2, 16), np.float32)
    _expect_error(ValueError, "block_size", q, big, big, bt, sl)
    with pytest.raises(TypeError, match="out"):
        pagedflash.paged_attn(q, kc, vc, bt, sl, out=np.empty((2, 4, 16), np.float16))
    with pytest.raises(ValueError, match="out"):
        pagedflash.paged_attn(q, kc, vc, bt, sl, out=np.empty((2, 4, 15), np.float32))


def test_bad_cu_seqlens(rng):
    q, kc, vc, bt, sl = _setup_small(rng)
    qp = randn(rng, (6, 4, 16), "float32")
    for cu, match in (
        ([0, 2, 5], "last entry"),          # 5 != 6 packed queries
        ([0, 4, 2], "non-decreasing"),
        ([1, 2, 6], r"cu_seqlens_q\[0\]"),
        ([0, 6], "length"),                 # batch mismatch
    ):
        _expect_error(ValueError, f"cu_seqlens_q.*{match}|{match}.*cu_seqlens_q", qp, kc, vc, bt, sl,
                      cu_seqlens_q=np.array(cu, np.int32))
    _expect_error(TypeError, "cu_seqlens_q.*int32", qp, kc, vc, bt, sl,
                  cu_seqlens_q=np.array([0, 2, 6], np.int64))
    _expect_error(ValueError, "seq_lens.*shorter", qp, kc, vc, bt, np.array([20, 3], np.int32),
                  cu_seqlens_q=np.array([0, 2, 6], np.int32))
    _expect_error(ValueError, "q:", randn(rng, (2, 3, 4, 16), "float32"), kc, vc, bt, sl,
                  cu_seqlens_q=np.array([0, 3, 6], np.int32))


def test_empty_inputs(rng):
    kc = randn(rng, (0, 16, 2, 8), "float32")
    out, lse = pagedflash.paged_attn(np.zeros((0, 4, 8), np.float32), kc, kc, np.zeros((0, 3), np.int32),
                                     np.zeros(0, np.int32), return_lse=True)
    assert out.shape == (0, 4, 8) and lse.shape == (4, 0)
    out, lse = pagedflash.paged_attn(np.zeros((0, 4, 8), np.float32), kc, kc, np.zeros((2, 0), np.int32),
                                     np.zeros(2, np.int32), cu_seqlens_q=np.zeros(3, np.int32), return_lse=True)
    assert out.shape == (0, 4, 8) and lse.shape == (4, 0)
    with pytest.raises(ValueError, match="block_tables"):  # one token needs a block, and there are none
        pagedflash.paged_attn(np.ones((2, 4, 8), np.float32), kc, kc, np.zeros((2, 1), np.int32),
                              np.array([1, 0], np.int32))


def test_random_configurations(rng):
    # a sweep over combinations the parametrized tests do not pair up
    for _ in range(24):
        hk = int(rng.choice([1, 2, 3]))
        h = hk * int(rng.choice([1, 2, 3, 5, 8]))
        d = int(rng.choice([8, 20, 33, 64, 100]))
        bs = int(rng.choice([1, 3, 8, 16, 50, 64, 256]))
        batch = int(rng.integers(1, 5))
        lens = [int(x) for x in rng.integers(1, 400, size=batch)]
        qlens = [int(rng.integers(0 if i else 1, min(n, 40) + 1)) for i, n in enumerate(lens)]
        opts = {}
        if rng.random() < 0.3:
            opts["window"] = (int(rng.integers(-1, 50)), int(rng.integers(-1, 5)))
        if rng.random() < 0.3:
            opts["causal"] = False
        if rng.random() < 0.3:
            opts["softcap"] = float(rng.uniform(1, 10))
        if rng.random() < 0.3:
            opts["alibi"] = "heads" if rng.random() < 0.5 else "batch"
        run_and_check(rng, dtype="float32", lens=lens, qlens=qlens, h=h, hk=hk, d=d, bs=bs, layout="packed",
                      share=batch > 1 and rng.random() < 0.5, num_splits=int(rng.choice([0, 1, 3, 7])), **opts)
