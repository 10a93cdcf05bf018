"""write_kv_cache on every backend: new tokens' keys and values into their slots, in place,
negative slots skipped, bit for bit; slots out of range (checked on the host, skipped by the
CUDA kernel when device-resident); strided views; and a serving loop (write the new tokens,
then paged_attn over them) against the contiguous computation."""

from __future__ import annotations

import numpy as np
import pytest

import pagedflash
from conftest import DTYPES, assert_close, cases, cu_seqlens, naive_attention_lowp, poison_like, torch
from pagedflash import reference


def raw(x):
    """Host values for exact comparisons (bfloat16 as its bits)."""
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return x.view(torch.int16).numpy() if x.dtype == torch.bfloat16 else x.numpy()
    return np.asarray(x)


def expected(cache, rows, slots, bs):
    """cache (raw host values) with rows[t] written to slot slots[t] (skipped when out of range)."""
    e = cache.copy()
    for t, s in enumerate(slots):
        if 0 <= s < e.shape[0] * bs:
            e[s // bs, s % bs] = rows[t]
    return e


@cases(
    "dtype,bs,d",
    cpu=[(dt, bs, 40) for dt in DTYPES for bs in (1, 16, 256)],
    cuda=[(dt, bs, 40) for dt in DTYPES for bs in (1, 16, 256)]
    + [("bfloat16", 16, 128), ("float16", 16, 40), ("float32", 16, 7), ("bfloat16", 16, 7)],
)
def test_write_then_read_back(backend, rng, dtype, bs, d):
    nb, hk, n = (9 if bs > 1 else 50), 3, 37
    kc, vc = backend.randn(rng, (nb, bs, hk, d), dtype), backend.randn(rng, (nb, bs, hk, d), dtype)
    k, v = backend.randn(rng, (n, hk, d), dtype), backend.randn(rng, (n, hk, d), dtype)
    slots = rng.choice(nb * bs, size=n, replace=False).astype(np.int64)
    slots[rng.random(n) < 0.3] = -1
    slots[::7] = -1
    slots[0] = -5  # any negative skips
    before_k, before_v = raw(kc).copy(), raw(vc).copy()
    assert pagedflash.write_kv_cache(k, v, kc, vc, backend.put(slots)) is None
    np.testing.assert_array_equal(raw(kc), expected(before_k, raw(k), slots, bs))
    np.testing.assert_array_equal(raw(vc), expected(before_v, raw(v), slots, bs))


@cases("dtype,d", cuda=[("bfloat16", 128), ("float16", 40), ("float32", 7), ("bfloat16", 7)])
def test_device_slots_out_of_range_are_skipped(backend, rng, dtype, d):
    """A device-resident slot_mapping cannot be checked on the host: slots >= num_blocks *
    block_size are skipped by the kernel, nothing is written outside the caches (the caches are
    views into guarded buffers), and the other tokens are written."""
    nb, bs, hk, n, g = 9, 16, 3, 40, 2
    kbig = backend.randn(rng, (nb + 2 * g, bs, hk, d), dtype)
    vbig = backend.randn(rng, (nb + 2 * g, bs, hk, d), dtype)
    kc, vc = kbig[g : g + nb], vbig[g : g + nb]
    k, v = backend.randn(rng, (n, hk, d), dtype), backend.randn(rng, (n, hk, d), dtype)
    slots = rng.choice(nb * bs, size=n, replace=False).astype(np.int64)
    slots[::7] = -1
    slots[1] = nb * bs + 5
    slots[2] = 2**40
    before_k, before_v = raw(kbig).copy(), raw(vbig).copy()
    pagedflash.write_kv_cache(k, v, kc, vc, backend.put(slots))
    torch.cuda.synchronize()
    for big, before, rows in ((kbig, before_k, raw(k)), (vbig, before_v, raw(v))):
        after = raw(big)
        np.testing.assert_array_equal(after[:g], before[:g])
        np.testing.assert_array_equal(after[g + nb :], before[g + nb :])
        np.testing.assert_array_equal(after[g : g + nb], expected(before[g : g + nb], rows, slots, bs))


def test_write_strided_inputs(backend, rng):
    """k / v as views with strided leading dims; the caches are written in place."""
    nb, bs, hk, d = 4, 8, 2, 16
    kc = backend.put(np.zeros((nb, bs, hk, d), np.float32))
    vc = backend.put(np.zeros((nb, bs, hk, d), np.float32))
    kv = backend.randn(rng, (5, 2, hk, d), "float32")
    k, v = kv[:, 0], kv[:, 1]
    slots = np.array([3, 31, 8, -1, 0], np.int64)
    pagedflash.write_kv_cache(k, v, kc, vc, backend.put(slots))
    zeros = np.zeros((nb, bs, hk, d), np.float32)
    np.testing.assert_array_equal(raw(kc), expected(zeros, raw(k), slots, bs))
    np.testing.assert_array_equal(raw(vc), expected(zeros, raw(v), slots, bs))
    assert np.count_nonzero(raw(kc).reshape(-1, hk * d).any(axis=1)) == 4


def test_write_combined_kv_cache(backend, rng):
    """A combined [num_blocks, 2, bs, hk, d] cache viewed as its k and v halves (strided blocks,
    contiguous rows), k / v as strided views of one [n, 2, hk, d] array."""
    nb, bs, hk, d, n = 6, 8, 2, 64, 11
    kv = backend.randn(rng, (nb, 2, bs, hk, d), "bfloat16")
    src = backend.randn(rng, (n, 2, hk, d), "bfloat16")
    slots = rng.choice(nb * bs, size=n, replace=False).astype(np.int64)
    before = raw(kv).copy()
    pagedflash.write_kv_cache(src[:, 0], src[:, 1], kv[:, 0], kv[:, 1], backend.put(slots))
    exp = before.copy()
    s = raw(src)
    for t, slot in enumerate(slots):
        exp[slot // bs, 0, slot % bs] = s[t, 0]
        exp[slot // bs, 1, slot % bs] = s[t, 1]
    np.testing.assert_array_equal(raw(kv), exp)


@cases("case", cpu=range(7), cuda=range(1, 7))
def test_write_bad_input(backend, rng, case):
    """A clear error and untouched caches. Slot values are checked on the host (a device-resident
    slot_mapping: test_device_slots_out_of_range_are_skipped)."""
    nb, bs, hk, d = 4, 8, 2, 16
    kc, vc = backend.randn(rng, (nb, bs, hk, d), "float32"), backend.randn(rng, (nb, bs, hk, d), "float32")
    k = backend.randn(rng, (3, hk, d), "float32")
    sm = backend.put(np.array([0, 1, 2], np.int64))
    half = (lambda x: x.half()) if backend.is_cuda else (lambda x: x.astype(np.float16))
    exc, match, args = [
        (ValueError, r"slot_mapping\[2\]", (k, k, kc, vc, backend.put(np.array([0, 5, nb * bs], np.int64)))),
        (TypeError, "slot_mapping.*int64", (k, k, kc, vc, backend.put(np.array([0, 1, 2], np.int32)))),
        (ValueError, "slot_mapping.*length", (k, k, kc, vc, backend.put(np.array([0, 1], np.int64)))),
        (TypeError, "k:.*dtype", (half(k), k, kc, vc, sm)),
        (ValueError, "v_cache", (k, k, kc, vc[:, :4], sm)),
        (ValueError, "k:.*num_kv_heads", (k[:, :1], k[:, :1], kc, vc, sm)),
        (ValueError, "k_cache.*contiguous", (k, k, kc[..., ::2], vc, sm)),
    ][case]
    before = (raw(kc).copy(), raw(vc).copy())
    with pytest.raises(exc, match=match):
        pagedflash.write_kv_cache(*args)
    assert np.array_equal(raw(kc), before[0]) and np.array_equal(raw(vc), before[1])


@cases("dtype", cpu=DTYPES, cuda=DTYPES)
def test_serving_loop(backend, rng, dtype):
    """Prefill in chunks, then decode; every step writes the new tokens into a NaN-poisoned
    paged cache (an unwritten slot would poison the result) and attends with their queries."""
    h, hk, d, bs, nb = 4, 2, 32, 16, 40
    kc = poison_like(backend.randn(rng, (nb, bs, hk, d), dtype))
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
    ks = [backend.randn(rng, (n, hk, d), dtype) for n in total]
    vs = [backend.randn(rng, (n, hk, d), dtype) for n in total]
    qs = [backend.randn(rng, (n, h, d), dtype) for n in total]
    torchy = torch is not None and isinstance(kc, torch.Tensor)
    cat = torch.cat if torchy else np.concatenate

    def slots(b, lo, hi):
        t = np.arange(lo, hi)
        return tables[b, t // bs].astype(np.int64) * bs + t % bs

    def step(ranges):
        """Write tokens [lo, hi) of every sequence, then attend with those queries."""
        k_new = cat([ks[b][lo:hi] for b, (lo, hi) in enumerate(ranges)])
        v_new = cat([vs[b][lo:hi] for b, (lo, hi) in enumerate(ranges)])
        sm = np.concatenate([slots(b, lo, hi) for b, (lo, hi) in enumerate(ranges)])
        pagedflash.write_kv_cache(k_new, v_new, kc, vc, backend.put(sm))
        q = cat([qs[b][lo:hi] for b, (lo, hi) in enumerate(ranges)])
        cu = cu_seqlens([hi - lo for lo, hi in ranges])
        sl = np.array([hi for _, hi in ranges], np.int32)
        out = pagedflash.paged_attn(
            q, kc, vc, backend.put(tables), backend.put(sl), cu_seqlens_q=backend.put(cu), out=poison_like(q)
        )
        for b, (lo, hi) in enumerate(ranges):
            mine = slice(int(cu[b]), int(cu[b + 1]))
            args = (qs[b][None, lo:hi], ks[b][None, :hi], vs[b][None, :hi])
            ref = reference.attention(*args, causal=True)[0]
            naive = None if dtype == "float32" else naive_attention_lowp(*args, causal=True)[0]
            assert_close(out[mine], ref, naive, dtype=dtype)

    step([(0, 30), (0, 17)])  # prefill chunk 1 / whole prompt
    step([(30, 45), (17, 18)])  # prefill chunk 2 / first decode
    for s in range(1, steps):
        step([(45 + s - 1, 45 + s), (17 + s, 18 + s)])
