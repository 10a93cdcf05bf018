"""dropout_mask on every backend: the keep mask of pagedflash_philox.h (recomputed here in
NumPy), its statistics and keys, and that the forward applies exactly it. The forward and
backward with dropout against the reference: test_flash_fwd.py, test_flash_bwd.py."""

from __future__ import annotations

import numpy as np
import pytest

import pagedflash
from conftest import as_np64, cases, cu_seqlens
from pagedflash import reference

_M32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(c, k0, k1):
    """c: 4 uint64 arrays holding 32-bit counters; returns 4 arrays of 32-bit words."""
    c0, c1, c2, c3 = (np.asarray(x, dtype=np.uint64) & _M32 for x in c)
    k0, k1 = np.uint64(k0), np.uint64(k1)
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c0
        p1 = np.uint64(0xCD9E8D57) * c2
        hi0, lo0 = p0 >> np.uint64(32), p0 & _M32
        hi1, lo1 = p1 >> np.uint64(32), p1 & _M32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + np.uint64(0x9E3779B9)) & _M32
        k1 = (k1 + np.uint64(0xBB67AE85)) & _M32
    return c0, c1, c2, c3


def philox_keep(seed, offset, p, b, h, sq, sk, bh_base=0):
    """keep[b, h, i, j] per pagedflash_philox.h: counter (j / 4, i, bh_base + b * h + h, offset),
    key (seed lo, seed hi), word j % 4 kept iff >= p * 2^32 (p as float32)."""
    t = float(np.float32(p)) * 4294967296.0
    thr = 0xFFFFFFFF if t >= 4294967295.0 else (0 if t <= 0 else int(t))
    bb, hh, ii, jj = np.meshgrid(np.arange(b), np.arange(h), np.arange(sq), np.arange(sk), indexing="ij")
    bh = bh_base + bb * h + hh
    words = philox4x32_10((jj >> 2, ii, bh, np.full_like(jj, offset)), seed & 0xFFFFFFFF, seed >> 32)
    w = np.choose(jj & 3, words)
    return (w >= thr).astype(np.uint8)


@cases(
    "p,seed,offset",
    cpu=[(0.17, 0x1234_5678_9ABC_DEF1, 7), (0.5, 3, 0)],
    cuda=[(0.17, 0x1234_5678_9ABC_DEF1, 7), (0.5, 3, 0)],
    ids=lambda p, s, o: f"p{p}-o{o}",
)
def test_mask_is_the_philox_contract(backend, rng, p, seed, offset):
    """Dense: mask[b, h, i, j] of a 64-bit seed and an offset, bit for bit; on CUDA also equal to
    the CPU backend's mask (the two backends' dropout agree)."""
    b, sq, sk, h, hk, d = 2, 70, 93, 3, 1, 64
    q = backend.randn(rng, (b, sq, h, d), "float16")
    k = backend.randn(rng, (b, sk, hk, d), "float16")
    mask = pagedflash.dropout_mask(q, k, dropout_p=p, seed=seed, offset=offset)
    assert type(mask) is type(q) and str(mask.dtype).endswith("uint8")
    m = as_np64(mask).astype(np.uint8)
    np.testing.assert_array_equal(m, philox_keep(seed, offset, p, b, h, sq, sk))
    if backend.is_cuda:
        cpu = pagedflash.dropout_mask(q.cpu(), k.cpu(), dropout_p=p, seed=seed, offset=offset)
        np.testing.assert_array_equal(m, cpu.numpy())


def test_varlen_mask(backend, rng):
    """Packed layout: sequence i's heads are counters i * num_heads + h, rows and columns are
    positions within the sequence; positions past a sequence's lengths are 0. The CUDA backend
    has no packed dropout mask (its limits say so): NotImplementedError."""
    lq, lk, h, d, p, seed = [33, 50, 0], [40, 50, 7], 2, 64, 0.3, 99
    q = backend.randn(rng, (sum(lq), h, d), "bfloat16")
    k = backend.randn(rng, (sum(lk), h, d), "bfloat16")
    cq, ck = backend.put(cu_seqlens(lq)), backend.put(cu_seqlens(lk))
    if backend.is_cuda:
        with pytest.raises(NotImplementedError):
            pagedflash.dropout_mask(q, k, dropout_p=p, seed=seed, cu_seqlens_q=cq, cu_seqlens_k=ck)
        return
    full = as_np64(
        pagedflash.dropout_mask(q, k, dropout_p=p, seed=seed, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=60)
    )
    assert full.shape == (3, h, 60, 50)
    for i in range(3):
        keep = philox_keep(seed, 0, p, 1, h, lq[i], lk[i], bh_base=i * h)[0]
        np.testing.assert_array_equal(full[i, :, : lq[i], : lk[i]], keep)
        assert not full[i, :, lq[i] :].any() and not full[i, :, :, lk[i] :].any()


def test_mask_fraction_and_keys(backend, rng):
    q = backend.randn(rng, (2, 300, 3, 8), "float32")
    k = backend.randn(rng, (2, 257, 1, 8), "float32")
    for p in (0.1, 0.5, 0.9):
        m = as_np64(pagedflash.dropout_mask(q, k, dropout_p=p, seed=1234))
        assert set(np.unique(m)) <= {0, 1}
        dropped = 1.0 - m.mean()
        # binomial: 6 standard deviations
        assert abs(dropped - p) < 6 * np.sqrt(p * (1 - p) / m.size), (p, dropped)
    m1 = as_np64(pagedflash.dropout_mask(q, k, dropout_p=0.3, seed=7))
    assert np.array_equal(m1, as_np64(pagedflash.dropout_mask(q, k, dropout_p=0.3, seed=7)))
    assert not np.array_equal(m1, as_np64(pagedflash.dropout_mask(q, k, dropout_p=0.3, seed=8)))
    assert not np.array_equal(m1, as_np64(pagedflash.dropout_mask(q, k, dropout_p=0.3, seed=7, offset=1)))
    # heads and batches draw independent masks
    assert not np.array_equal(m1[0, 0], m1[0, 1]) and not np.array_equal(m1[0, 0], m1[1, 0])
    # dropout_p = 0 keeps everything
    assert as_np64(pagedflash.dropout_mask(q, k, dropout_p=0.0, seed=7)).all()
    # the mask does not depend on the dtype (same keys, same bits)
    half = (lambda x: x.half()) if backend.is_cuda else (lambda x: x.astype(np.float16))
    assert np.array_equal(m1, as_np64(pagedflash.dropout_mask(half(q), half(k), dropout_p=0.3, seed=7)))


def test_dropout_realized_in_output(backend, rng):
    """Columns dropped by the mask contribute nothing: with V = one-hot keys, out = P * keep / (1 - p)."""
    sq, sk, p = 50, 64, 0.4
    q = backend.randn(rng, (1, sq, 1, 64), "float32")
    k = backend.randn(rng, (1, sk, 1, 64), "float32")
    v = backend.put(np.eye(sk, 64, dtype=np.float32)[None, :, None, :])
    out = as_np64(pagedflash.flash_attn(q, k, v, dropout_p=p, seed=99))
    mask = as_np64(pagedflash.dropout_mask(q, k, dropout_p=p, seed=99))
    _, probs = reference.attention(q, k, v, return_probs=True)
    expect = probs[0, 0] * mask[0, 0] / (1 - p)
    assert np.allclose(out[0, :, 0, :], expect, rtol=1e-5, atol=1e-6)
    assert np.all(out[0, :, 0, :][mask[0, 0] == 0] == 0)
    assert abs((1 - mask.mean()) - p) < 0.05
