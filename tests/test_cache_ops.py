"""KV-cache operations on the CPU: write_kv_cache, copy_blocks, swap_blocks; and an
end-to-end serving step (write the new tokens, then paged attention) against the
contiguous computation. Bad input raises an error naming the argument and leaves
every cache byte-for-byte as it was.
"""
from __future__ import annotations

import numpy as np
import pytest

import pagedflash
from pagedflash import reference

from conftest import DTYPES, assert_close, naive_attention_lowp, poison_like, randn, torch


def _np(x):
    """Raw values for exact comparisons (bfloat16 as its bits)."""
    if torch is not None and isinstance(x, torch.Tensor):
        return x.view(torch.int16).numpy() if x.dtype == torch.bfloat16 else x.numpy()
    return np.asarray(x)


# ---------------------------------------------------------------------------
# write_kv_cache
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bs", [1, 16, 256])
def test_write_then_read_back(rng, dtype, bs):
    nb, hk, d = 9 if bs > 1 else 50, 3, 40
    n = 37
    kc = randn(rng, (nb, bs, hk, d), dtype)
    vc = randn(rng, (nb, bs, hk, d), dtype)
    k = randn(rng, (n, hk, d), dtype)
    v = randn(rng, (n, hk, d), dtype)
    slots = rng.choice(nb * bs, size=n, replace=False).astype(np.int64)
    skip = rng.random(n) < 0.3
    slots[skip] = -1
    slots[0] = -5  # any negative skips
    skip[0] = True
    before_k, before_v = _np(kc).copy(), _np(vc).copy()
    assert pagedflash.write_kv_cache(k, v, kc, vc, slots) is None
    after_k, after_v = _np(kc), _np(vc)
    expect_k, expect_v = before_k.copy(), before_v.copy()
    live = ~skip
    expect_k[slots[live] // bs, slots[live] % bs] = _np(k)[live]
    expect_v[slots[live] // bs, slots[live] % bs] = _np(v)[live]
    np.testing.assert_array_equal(after_k, expect_k)
    np.testing.assert_array_equal(after_v, expect_v)


def test_write_strided_inputs(rng):
    # k/v as views with strided leading dims; the caches are written in place
    nb, bs, hk, d = 4, 8, 2, 16
    kc = np.zeros((nb, bs, hk, d), np.float32)
    vc = np.zeros((nb, bs, hk, d), np.float32)
    kv = rng.standard_normal((5, 2, hk, d)).astype(np.float32)
    k, v = kv[:, 0], kv[:, 1]
    slots = np.array([3, 31, 8, -1, 0], np.int64)
    pagedflash.write_kv_cache(k, v, kc, vc, slots)
    for t, s in enumerate(slots):
        if s >= 0:
            np.testing.assert_array_equal(kc[s // bs, s % bs], k[t])
            np.testing.assert_array_equal(vc[s // bs, s % bs], v[t])
    assert np.count_nonzero(kc.reshape(-1, hk * d).any(axis=1)) == 4


def test_write_bad_input(rng):
    nb, bs, hk, d = 4, 8, 2, 16
    kc = rng.standard_normal((nb, bs, hk, d)).astype(np.float32)
    vc = rng.standard_normal((nb, bs, hk, d)).astype(np.float32)
    k = rng.standard_normal((3, hk, d)).astype(np.float32)
    before = (kc.tobytes(), vc.tobytes())
    cases = [
        (ValueError, r"slot_mapping\[2\]", (k, k, kc, vc, np.array([0, 5, nb * bs], np.int64))),
        (TypeError, "slot_mapping.*int64", (k, k, kc, vc, np.array([0, 1, 2], np.int32))),
        (ValueError, "slot_mapping.*length", (k, k, kc, vc, np.array([0, 1], np.int64))),
        (TypeError, "k:.*dtype", (k.astype(np.float16), k, kc, vc, np.array([0, 1, 2], np.int64))),
        (ValueError, "v_cache", (k, k, kc, vc[:, :4].copy(), np.array([0, 1, 2], np.int64))),
        (ValueError, "k:.*num_kv_heads", (k[:, :1].copy(), k[:, :1].copy(), kc, vc, np.array([0, 1, 2], np.int64))),
        (ValueError, "k_cache.*contiguous", (k, k, kc[..., ::2], vc, np.array([0, 1, 2], np.int64))),
    ]
    for exc, match, args in cases:
        with pytest.raises(exc, match=match):
            pagedflash.write_kv_cache(*args)
        assert (kc.tobytes(), vc.tobytes()) == before, match


# ---------------------------------------------------------------------------
# copy_blocks
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_copy_blocks_layers(rng, dtype):
    layers, nb, bs, hk, d = 3, 10, 16, 2, 24
    ks = [randn(rng, (nb, bs, hk, d), dtype) for _ in range(layers)]
    vs = [randn(rng, (nb, bs, hk, d), dtype) for _ in range(layers)]
    # in order: 1 -> 4, then 4 -> 7 (sees the copy), 2 -> 2 (no-op), 9 -> 0
    mapping = np.array([[1, 4], [4, 7], [2, 2], [9, 0]], np.int64)
    expect = []
    for c in ks + vs:
        e = _np(c).copy()
        for s, t in mapping:
            e[t] = e[s]
        expect.append(e)
    pagedflash.copy_blocks(ks, vs, mapping)
    for c, e in zip(ks + vs, expect):
        np.testing.assert_array_equal(_np(c), e)
    # a list of pairs works too
    pagedflash.copy_blocks(ks, vs, [(0, 3)])
    for c in ks + vs:
        np.testing.assert_array_equal(_np(c)[3], _np(c)[0])


def test_copy_blocks_many_caches_and_layouts(rng):
    # more caches than one import batch holds; a non-contiguous (block-strided) cache view
    nb, bs, hk, d = 6, 4, 2, 8
    caches = [rng.standard_normal((nb, bs, hk, d)).astype(np.float32) for _ in range(70)]
    big = rng.standard_normal((nb, bs, hk + 1, d)).astype(np.float32)
    view = big[:, :, 1:]  # blocks are not contiguous
    head0 = big[:, :, 0].copy()
    expect = [c.copy() for c in caches] + [view.copy()]
    for e in expect:
        e[5] = e[2]
    pagedflash.copy_blocks(caches[:35], caches[35:] + [view], np.array([[2, 5]], np.int64))
    for c, e in zip(caches + [view], expect):
        np.testing.assert_array_equal(c, e)
    np.testing.assert_array_equal(big[:, :, 0], head0)  # the rows between the view's rows: untouched


def test_copy_blocks_bad_input(rng):
    ks = [rng.standard_normal((8, 4, 2, 8)).astype(np.float32) for _ in range(2)]
    vs = [rng.standard_normal((8, 4, 2, 8)).astype(np.float32), rng.standard_normal((5, 4, 2, 8)).astype(np.float32)]
    before = [c.tobytes() for c in ks + vs]
    for exc, match, mapping in (
        (ValueError, r"block_mapping\[1, 1\].*caches\[3\]", np.array([[0, 1], [2, 6]], np.int64)),  # 6 >= 5 blocks of v layer 1
        (ValueError, r"block_mapping\[0, 0\]", np.array([[-1, 1]], np.int64)),
        (TypeError, "block_mapping.*int64", np.array([[0, 1]], np.int32)),
        (ValueError, r"block_mapping.*\[n, 2\]", np.array([[0, 1, 2]], np.int64)),
    ):
        with pytest.raises(exc, match=match):
            pagedflash.copy_blocks(ks, vs, mapping)
        assert [c.tobytes() for c in ks + vs] == before, match


# ---------------------------------------------------------------------------
# swap_blocks
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_swap_blocks(rng, dtype):
    gpu_like = randn(rng, (12, 16, 2, 32), dtype)  # stands in for the device cache
    host = randn(rng, (5, 16, 2, 32), dtype)
    out_map = np.array([[3, 0], [11, 4], [7, 2]], np.int64)  # swap out: device -> host
    e = _np(host).copy()
    for s, t in out_map:
        e[t] = _np(gpu_like)[s]
    pagedflash.swap_blocks(gpu_like, host, out_map)
    np.testing.assert_array_equal(_np(host), e)
    in_map = np.array([[0, 9], [4, 1]], np.int64)  # swap in: host -> device
    e = _np(gpu_like).copy()
    for s, t in in_map:
        e[t] = _np(host)[s]
    pagedflash.swap_blocks(host, gpu_like, in_map)
    np.testing.assert_array_equal(_np(gpu_like), e)


def test_swap_blocks_bad_input(rng):
    src = rng.standard_normal((6, 4, 2, 8)).astype(np.float32)
    dst = rng.standard_normal((3, 4, 2, 8)).astype(np.float32)
    before = (src.tobytes(), dst.tobytes())
    for exc, match, args in (
        (ValueError, r"block_mapping\[1, 1\].*dst", (src, dst, np.array([[0, 0], [1, 3]], np.int64))),
        (ValueError, r"block_mapping\[0, 0\].*src", (src, dst, np.array([[6, 0]], np.int64))),
        (TypeError, "dst.*dtype", (src, dst.astype(np.float16), np.array([[0, 0]], np.int64))),
        (ValueError, "dst.*block shape", (src, dst[:, :2].copy(), np.array([[0, 0]], np.int64))),
    ):
        with pytest.raises(exc, match=match):
            pagedflash.swap_blocks(*args)
        assert (src.tobytes(), dst.tobytes()) == before, match


# ---------------------------------------------------------------------------
# a serving loop: prefill in chunks, then decode, each step writing then attending
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_serving_loop(rng, dtype):
    h, hk, d, bs, nb = 4, 2, 32, 16, 40
    kc = poison_like(randn(rng, (nb, bs, hk, d), dtype))  # an unwritten slot would poison the result
    vc = poison_like(kc)
    prompts = [45, 17]
    steps = 3
    total = [p + steps for p in prompts]
    free = list(rng.permutation(nb))
    tables = np.full((2, 8), -1, np.int32)
    for b, n in enumerate(total):
        for j in range((n + bs - 1) // bs):
            tables[b, j] = free.pop()
    # the full sequences, contiguous
    ks = [randn(rng, (n, hk, d), dtype) for n in total]
    vs = [randn(rng, (n, hk, d), dtype) for n in total]
    qs = [randn(rng, (n, h, d), dtype) for n in total]
    cat = (lambda xs: torch.cat(xs)) if dtype == "bfloat16" else (lambda xs: np.concatenate(xs))

    def slots(b, lo, hi):
        t = np.arange(lo, hi)
        return tables[b, t // bs].astype(np.int64) * bs + t % bs

    def step(ranges):
        """Write tokens [lo, hi) of every sequence, then attend with those queries."""
        k_new = cat([ks[b][lo:hi] for b, (lo, hi) in enumerate(ranges)])
        v_new = cat([vs[b][lo:hi] for b, (lo, hi) in enumerate(ranges)])
        sm = np.concatenate([slots(b, lo, hi) for b, (lo, hi) in enumerate(ranges)])
        pagedflash.write_kv_cache(k_new, v_new, kc, vc, sm)
        q = cat([qs[b][lo:hi] for b, (lo, hi) in enumerate(ranges)])
        cu = np.concatenate([[0], np.cumsum([hi - lo for lo, hi in ranges])]).astype(np.int32)
        sl = np.array([hi for _, hi in ranges], np.int32)
        out = pagedflash.paged_attn(q, kc, vc, tables, sl, cu_seqlens_q=cu, out=poison_like(q))
        for b, (lo, hi) in enumerate(ranges):
            mine = slice(int(cu[b]), int(cu[b + 1]))
            ref = reference.attention(qs[b][None, lo:hi], ks[b][None, :hi], vs[b][None, :hi], causal=True)[0]
            naive = None
            if dtype != "float32":
                naive = naive_attention_lowp(qs[b][None, lo:hi], ks[b][None, :hi], vs[b][None, :hi], causal=True)[0]
            assert_close(out[mine], ref, naive, dtype=dtype)

    step([(0, 30), (0, 17)])                       # prefill chunk 1 / whole prompt
    step([(30, 45), (17, 18)])                     # prefill chunk 2 / first decode
    for s in range(1, steps):
        step([(45 + s - 1, 45 + s), (17 + s, 18 + s)])
