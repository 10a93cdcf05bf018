"""Naive attention in NumPy float64: the yardstick every test compares against.

It materializes S = Q K^T, P = softmax(S) and O = P V, with exactly the masking
semantics of pagedflash (bottom-right causal alignment, sliding window, softcap,
ALiBi, dropout with a given keep mask, fully masked rows -> out 0, lse -inf).
Inputs may be NumPy arrays or torch tensors (any dtype); outputs are float64.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np


def to_f64(x: Any) -> np.ndarray:
    """Any array (NumPy, torch incl. bfloat16, pagedflash.Tensor) as a float64 NumPy copy."""
    if type(x).__module__.partition(".")[0] == "torch":
        import torch

        return x.detach().to(device="cpu", dtype=torch.float64).numpy()
    if not isinstance(x, np.ndarray) and hasattr(x, "__dlpack__"):
        try:
            x = np.from_dlpack(x)
        except (TypeError, BufferError, RuntimeError):
            pass
    a = np.asarray(x)
    if a.dtype.kind == "V" or a.dtype.name == "bfloat16":  # raw bfloat16 bits
        a = (a.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float64)


def mask_bounds(sq: int, sk: int, causal: bool, window: Sequence[int]):
    """Per query row i, the inclusive key range [lo_i, hi_i] it may attend to."""
    left, right = int(window[0]), int(window[1])
    i = np.arange(sq)
    diag = i + sk - sq
    lo = np.zeros(sq, dtype=np.int64)
    hi = np.full(sq, sk - 1, dtype=np.int64)
    if left >= 0:
        lo = np.maximum(lo, diag - left)
    if causal:
        right = 0
    if causal or right >= 0:
        hi = np.minimum(hi, diag + right)
    return lo, hi


def _attention_one(q, k, v, *, causal, scale, window, softcap, slopes, keep, dropout_p):
    """One sequence: q [sq, h, d], k/v [sk, hk, d]; slopes [h] or None; keep [h, sq, sk] or None."""
    sq, h, d = q.shape
    sk, hk, _ = k.shape
    rep = h // hk
    kk = np.repeat(k, rep, axis=1)
    vv = np.repeat(v, rep, axis=1)
    s = np.einsum("ihd,jhd->hij", q, kk) * scale
    if softcap > 0:
        s = softcap * np.tanh(s / softcap)
    if slopes is not None:
        dist = np.abs(np.arange(sq)[:, None] + sk - sq - np.arange(sk)[None, :])
        s = s - slopes[:, None, None] * dist[None]
    lo, hi = mask_bounds(sq, sk, causal, window)
    j = np.arange(sk)
    allowed = (j[None, :] >= lo[:, None]) & (j[None, :] <= hi[:, None])
    s = np.where(allowed[None], s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True) if sk else np.full((h, sq, 1), -np.inf)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.exp(s - m_safe)
        e = np.where(allowed[None], e, 0.0)
        l = e.sum(axis=-1, keepdims=True)
        p = np.where(l > 0, e / np.where(l > 0, l, 1.0), 0.0)
        lse = np.where(l[..., 0] > 0, np.log(np.where(l > 0, l, 1.0))[..., 0] + m_safe[..., 0], -np.inf)
    # NaN anywhere in a row's inputs propagates (np.where above would hide it)
    nan_rows = np.isnan(s).any(axis=-1)
    lse = np.where(nan_rows, np.nan, lse)
    p = np.where(nan_rows[..., None], np.nan, p)
    if keep is not None:
        p = p * keep / (1.0 - dropout_p)
    out = np.einsum("hij,jhd->ihd", p, vv)
    return out, lse, p


def attention(q: Any, k: Any, v: Any, *, causal: bool = False, softmax_scale: Optional[float] = None,
              window: Sequence[int] = (-1, -1), softcap: float = 0.0, alibi_slopes: Any = None,
              dropout_p: float = 0.0, dropout_mask: Any = None, return_lse: bool = False,
              return_probs: bool = False):
    """Naive attention in float64.

    q [batch, sq, h, d], k/v [batch, sk, hk, d]. dropout_mask: keep mask [batch, h, sq, sk]
    (1 kept), applied with scale 1 / (1 - dropout_p). Returns out [batch, sq, h, d]
    (float64), plus lse [batch, h, sq] and/or P [batch, h, sq, sk] when asked.
    """
    q, k, v = to_f64(q), to_f64(k), to_f64(v)
    b, sq, h, d = q.shape
    scale = 1.0 / np.sqrt(d) if softmax_scale is None else float(softmax_scale)
    slopes = None if alibi_slopes is None else to_f64(alibi_slopes)
    keep = None if dropout_mask is None else to_f64(dropout_mask)
    outs, lses, ps = [], [], []
    for bi in range(b):
        sl = None if slopes is None else (slopes if slopes.ndim == 1 else slopes[bi])
        o, l, p = _attention_one(q[bi], k[bi], v[bi], causal=causal, scale=scale, window=window,
                                 softcap=softcap, slopes=sl, keep=None if keep is None else keep[bi],
                                 dropout_p=dropout_p)
        outs.append(o)
        lses.append(l)
        ps.append(p)
    out = np.stack(outs) if b else np.zeros_like(q)
    res = [out]
    if return_lse:
        res.append(np.stack(lses) if b else np.zeros((0, h, sq)))
    if return_probs:
        res.append(np.stack(ps) if b else np.zeros((0, h, sq, k.shape[1])))
    return res[0] if len(res) == 1 else tuple(res)


def attention_varlen(q: Any, k: Any, v: Any, cu_seqlens_q: Any, cu_seqlens_k: Any, *,
                     causal: bool = False, softmax_scale: Optional[float] = None,
                     window: Sequence[int] = (-1, -1), softcap: float = 0.0, alibi_slopes: Any = None,
                     dropout_p: float = 0.0, dropout_masks: Any = None, return_lse: bool = False):
    """Naive attention over packed sequences: q [total_q, h, d], k/v [total_k, hk, d].

    dropout_masks: a list with one keep mask [h, sq_b, sk_b] per sequence.
    Returns out [total_q, h, d] and, with return_lse, lse [h, total_q].
    """
    q, k, v = to_f64(q), to_f64(k), to_f64(v)
    cq = np.asarray(to_f64(cu_seqlens_q)).astype(np.int64)
    ck = np.asarray(to_f64(cu_seqlens_k)).astype(np.int64)
    d = q.shape[-1]
    scale = 1.0 / np.sqrt(d) if softmax_scale is None else float(softmax_scale)
    slopes = None if alibi_slopes is None else to_f64(alibi_slopes)
    out = np.zeros(q.shape)
    lse = np.zeros((q.shape[1], q.shape[0]))
    for bi in range(len(cq) - 1):
        qs, ks = slice(cq[bi], cq[bi + 1]), slice(ck[bi], ck[bi + 1])
        sl = None if slopes is None else (slopes if slopes.ndim == 1 else slopes[bi])
        keep = None if dropout_masks is None else to_f64(dropout_masks[bi])
        o, l, _ = _attention_one(q[qs], k[ks], v[ks], causal=causal, scale=scale, window=window,
                                 softcap=softcap, slopes=sl, keep=keep, dropout_p=dropout_p)
        out[qs] = o
        lse[:, qs] = l
    return (out, lse) if return_lse else out


def gather_paged_kv(k_cache: Any, v_cache: Any, block_tables: Any, seq_lens: Any):
    """Each sequence's contiguous K/V from a paged cache: a list of (k [len, hk, d], v) in float64.

    k_cache/v_cache [num_blocks, block_size, hk, d]; token t of sequence b is
    k_cache[block_tables[b, t // block_size], t % block_size].
    """
    kc, vc = to_f64(k_cache), to_f64(v_cache)
    bt = np.asarray(to_f64(block_tables)).astype(np.int64)
    sl = np.asarray(to_f64(seq_lens)).astype(np.int64)
    bs = kc.shape[1]
    res = []
    for b in range(bt.shape[0]):
        t = np.arange(sl[b])
        blocks = bt[b, t // bs]
        res.append((kc[blocks, t % bs], vc[blocks, t % bs]))
    return res


def paged_attention(q: Any, k_cache: Any, v_cache: Any, block_tables: Any, seq_lens: Any, *,
                    cu_seqlens_q: Any = None, causal: bool = True, softmax_scale: Optional[float] = None,
                    window: Sequence[int] = (-1, -1), softcap: float = 0.0, alibi_slopes: Any = None,
                    return_lse: bool = False):
    """Naive paged attention in float64: gathers each sequence's K/V through its block
    table and runs the naive attention on the contiguous sequence.

    q [batch, h, d] (one query per sequence), [batch, q_len, h, d], or packed [total_q, h, d]
    with cu_seqlens_q [batch + 1]. The q_len queries of a sequence holding seq_len tokens are
    its last q_len tokens (bottom-right causal alignment). Returns out (q's layout, float64)
    and, with return_lse, lse [h, total_q].
    """
    q = to_f64(q)
    kv = gather_paged_kv(k_cache, v_cache, block_tables, seq_lens)
    batch = len(kv)
    d, h = q.shape[-1], q.shape[-2]
    scale = 1.0 / np.sqrt(d) if softmax_scale is None else float(softmax_scale)
    slopes = None if alibi_slopes is None else to_f64(alibi_slopes)
    if cu_seqlens_q is not None:
        cu = np.asarray(to_f64(cu_seqlens_q)).astype(np.int64)
        qp = q
    elif q.ndim == 4:
        cu = np.arange(batch + 1) * q.shape[1]
        qp = q.reshape(-1, h, d)
    else:
        cu = np.arange(batch + 1)
        qp = q
    out = np.zeros(qp.shape)
    lse = np.zeros((h, qp.shape[0]))
    for b in range(batch):
        qs = slice(cu[b], cu[b + 1])
        sl = None if slopes is None else (slopes if slopes.ndim == 1 else slopes[b])
        o, l, _ = _attention_one(qp[qs], kv[b][0], kv[b][1], causal=causal, scale=scale, window=window,
                                 softcap=softcap, slopes=sl, keep=None, dropout_p=0.0)
        out[qs] = o
        lse[:, qs] = l
    out = out.reshape(q.shape)
    return (out, lse) if return_lse else out
