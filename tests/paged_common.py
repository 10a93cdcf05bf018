"""Builders shared by the paged-attention tests of both backends (test_paged.py on the
CPU, test_gpu_paged.py on CUDA): paged caches with NaN in every unused slot and garbage
in unused block-table entries, queries in the three layouts, the gather of a sequence's
tokens, and the naive low-precision algorithm per sequence."""
from __future__ import annotations

import numpy as np

from conftest import naive_attention_lowp, randn, torch


def make_cache(rng, lens, hk, d, bs, dtype, *, share=False, spare=3, pad_value=None, lib=None):
    """Paged K/V caches holding sequences of the given lengths.

    Returns k_cache, v_cache [num_blocks, bs, hk, d] (dtype), block_tables int32
    [batch, max_blocks] and seq_lens int32 [batch]. Blocks come from a random permutation;
    with share, sequence 1 reuses sequence 0's full blocks as its prefix. Unused slots of
    partial blocks and unused blocks hold NaN; unused table entries hold pad_value (default:
    a mix of -1 and ids far out of range). lib="torch": torch tensors for every dtype.
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
    kc = randn(rng, (num_blocks, bs, hk, d), dtype, lib=lib)
    vc = randn(rng, (num_blocks, bs, hk, d), dtype, lib=lib)
    # stale NaN wherever no sequence holds a token
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
    return kc, vc, bt, np.asarray(lens, dtype=np.int32)


def gather(cache, row, length, bs):
    """Sequence's tokens [length, hk, d] from a cache, in the cache's own dtype and library."""
    t = np.arange(length)
    blocks, offs = row[t // bs].astype(np.int64), t % bs
    if torch is not None and isinstance(cache, torch.Tensor):
        return cache[torch.from_numpy(blocks), torch.from_numpy(offs)]
    return cache[blocks, offs]


def make_q(rng, layout, qlens, h, d, dtype, lib=None):
    """q in a layout: 'decode' [batch, h, d], 'dense' [batch, q_len, h, d], 'packed' [total, h, d]
    with cu_seqlens_q. Returns q, cu_seqlens_q (or None), cu (int64 offsets of every layout)."""
    batch = len(qlens)
    if layout == "decode":
        assert all(x == 1 for x in qlens)
        return randn(rng, (batch, h, d), dtype, lib=lib), None, np.arange(batch + 1)
    if layout == "dense":
        assert len(set(qlens)) == 1
        return randn(rng, (batch, qlens[0], h, d), dtype, lib=lib), None, np.arange(batch + 1) * qlens[0]
    cu = np.concatenate([[0], np.cumsum(qlens)]).astype(np.int32)
    return randn(rng, (int(cu[-1]), h, d), dtype, lib=lib), cu, cu.astype(np.int64)


def naive_lowp_paged(q, kc, vc, bt, lens, cu, bs, *, alibi_slopes=None, **opts):
    """naive_attention_lowp per sequence on the gathered contiguous K/V, in q's layout."""
    d, h = q.shape[-1], q.shape[-2]
    flat = q.reshape(-1, h, d)
    out = np.zeros((flat.shape[0], h, d))
    for b, n in enumerate(lens):
        qs = slice(int(cu[b]), int(cu[b + 1]))
        if qs.stop == qs.start:
            continue
        k = gather(kc, bt[b], int(n), bs)[None]
        v = gather(vc, bt[b], int(n), bs)[None]
        sl = None
        if alibi_slopes is not None:
            sl = alibi_slopes if alibi_slopes.ndim == 1 else alibi_slopes[b:b + 1]
        out[qs] = naive_attention_lowp(flat[qs][None], k, v, alibi_slopes=sl, **opts)[0]
    return out.reshape(tuple(q.shape))
