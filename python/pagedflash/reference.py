"""Naive attention in NumPy float64: the yardstick every test compares against.

It materializes S = Q K^T, P = softmax(S) and O = P V, with exactly the masking
semantics of pagedflash (bottom-right causal alignment, sliding window, softcap,
ALiBi, dropout with a given keep mask, fully masked rows -> out 0, lse -inf).
Inputs may be NumPy arrays or torch tensors (any dtype); outputs are float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

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


def _probabilities(q, kk, *, causal, scale, window, softcap, slopes):
    """Softmax probabilities of one sequence, with every masking option.

    q [sq, h, d], kk [sk, h, d] (KV heads already repeated for GQA). Returns P [h, sq, sk]
    (0 where masked; rows that see nothing are all 0), lse [h, sq] (-inf for such rows) and
    tanh(u / softcap) for the softcap gradient (None without softcap).
    """
    sq, h, _ = q.shape
    sk = kk.shape[0]
    s = np.einsum("ihd,jhd->hij", q, kk) * scale
    t = None
    if softcap > 0:
        t = np.tanh(s / softcap)
        s = softcap * t
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
        e = np.where(allowed[None], np.exp(s - m_safe), 0.0)
        l = e.sum(axis=-1, keepdims=True)
        p = np.where(l > 0, e / np.where(l > 0, l, 1.0), 0.0)
        lse = np.where(l[..., 0] > 0, np.log(np.where(l > 0, l, 1.0))[..., 0] + m_safe[..., 0], -np.inf)
    # NaN anywhere in a row's inputs propagates (np.where above would hide it)
    nan_rows = np.asarray(np.isnan(s).any(axis=-1))  # an array for the type checker: any() may return a scalar
    lse = np.where(nan_rows, np.nan, lse)
    p = np.where(nan_rows[..., None], np.nan, p)
    return p, lse, t


def _attention_one(q, k, v, *, causal, scale, window, softcap, slopes, keep, dropout_p):
    """One sequence: q [sq, h, d], k/v [sk, hk, d]; slopes [h] or None; keep [h, sq, sk] or None."""
    rep = q.shape[1] // k.shape[1]
    kk = np.repeat(k, rep, axis=1)
    vv = np.repeat(v, rep, axis=1)
    p, lse, _ = _probabilities(q, kk, causal=causal, scale=scale, window=window, softcap=softcap, slopes=slopes)
    if keep is not None:
        p = p * keep / (1.0 - dropout_p)
    out = np.einsum("hij,jhd->ihd", p, vv)
    return out, lse, p


def attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    window: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Any = None,
    dropout_p: float = 0.0,
    dropout_mask: Any = None,
    return_lse: bool = False,
    return_probs: bool = False,
):
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
        o, l, p = _attention_one(
            q[bi],
            k[bi],
            v[bi],
            causal=causal,
            scale=scale,
            window=window,
            softcap=softcap,
            slopes=sl,
            keep=None if keep is None else keep[bi],
            dropout_p=dropout_p,
        )
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


def attention_varlen(
    q: Any,
    k: Any,
    v: Any,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    *,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    window: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Any = None,
    dropout_p: float = 0.0,
    dropout_masks: Any = None,
    return_lse: bool = False,
):
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
        o, l, _ = _attention_one(
            q[qs],
            k[ks],
            v[ks],
            causal=causal,
            scale=scale,
            window=window,
            softcap=softcap,
            slopes=sl,
            keep=keep,
            dropout_p=dropout_p,
        )
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


def paged_attention(
    q: Any,
    k_cache: Any,
    v_cache: Any,
    block_tables: Any,
    seq_lens: Any,
    *,
    cu_seqlens_q: Any = None,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    window: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Any = None,
    return_lse: bool = False,
):
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
        o, l, _ = _attention_one(
            qp[qs],
            kv[b][0],
            kv[b][1],
            causal=causal,
            scale=scale,
            window=window,
            softcap=softcap,
            slopes=sl,
            keep=None,
            dropout_p=0.0,
        )
        out[qs] = o
        lse[:, qs] = l
    out = out.reshape(q.shape)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------
# Gradients (appended for the backward pass; see docs/training.md)
# ---------------------------------------------------------------------------


def _attention_backward_one(do, q, k, v, *, causal, scale, window, softcap, slopes, keep, dropout_p):
    """One sequence: do/q [sq, h, d], k/v [sk, hk, d]. Returns dq, dk, dv (float64)."""
    sq, h, d = q.shape
    sk, hk, _ = k.shape
    rep = h // hk
    kk = np.repeat(k, rep, axis=1)
    vv = np.repeat(v, rep, axis=1)
    p, _, t = _probabilities(q, kk, causal=causal, scale=scale, window=window, softcap=softcap, slopes=slopes)
    z = np.ones_like(p) if keep is None else keep / (1.0 - dropout_p)
    dv_h = np.einsum("hij,ihd->jhd", p * z, do)  # dV = (P Z)^T dO
    dp = np.einsum("ihd,jhd->hij", do, vv) * z  # dP through the dropout
    dsum = np.sum(p * dp, axis=-1, keepdims=True)  # D = rowsum(dO * O)
    ds = p * (dp - dsum)  # softmax backward
    if t is not None:
        ds = ds * (1.0 - t * t)  # softcap: d(c tanh(u/c))/du
    dq = np.einsum("hij,jhd->ihd", ds, kk) * scale
    dk_h = np.einsum("hij,ihd->jhd", ds, q) * scale
    dk = dk_h.reshape(sk, hk, rep, d).sum(axis=2)  # GQA: sum the group's heads
    dv = dv_h.reshape(sk, hk, rep, d).sum(axis=2)
    return dq, dk, dv


def attention_backward(
    dout: Any,
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    window: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Any = None,
    dropout_p: float = 0.0,
    dropout_mask: Any = None,
):
    """Gradients of `attention` in float64: returns (dq, dk, dv).

    dout/q [batch, sq, h, d], k/v [batch, sk, hk, d]; options as in `attention`
    (dropout_mask: keep mask [batch, h, sq, sk]). For GQA, dk/dv are summed over the
    query heads sharing a KV head. Rows with no visible key contribute nothing.
    """
    do, q, k, v = to_f64(dout), to_f64(q), to_f64(k), to_f64(v)
    b, sq, h, d = q.shape
    scale = 1.0 / np.sqrt(d) if softmax_scale is None else float(softmax_scale)
    slopes = None if alibi_slopes is None else to_f64(alibi_slopes)
    keep = None if dropout_mask is None else to_f64(dropout_mask)
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    for bi in range(b):
        sl = None if slopes is None else (slopes if slopes.ndim == 1 else slopes[bi])
        dq[bi], dk[bi], dv[bi] = _attention_backward_one(
            do[bi],
            q[bi],
            k[bi],
            v[bi],
            causal=causal,
            scale=scale,
            window=window,
            softcap=softcap,
            slopes=sl,
            keep=None if keep is None else keep[bi],
            dropout_p=dropout_p,
        )
    return dq, dk, dv


def attention_varlen_backward(
    dout: Any,
    q: Any,
    k: Any,
    v: Any,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    *,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    window: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Any = None,
    dropout_p: float = 0.0,
    dropout_masks: Any = None,
):
    """Gradients of `attention_varlen` in float64: (dq [total_q, h, d], dk, dv [total_k, hk, d]).

    dropout_masks: one keep mask [h, sq_b, sk_b] per sequence (as for attention_varlen).
    """
    do, q, k, v = to_f64(dout), to_f64(q), to_f64(k), to_f64(v)
    cq = np.asarray(to_f64(cu_seqlens_q)).astype(np.int64)
    ck = np.asarray(to_f64(cu_seqlens_k)).astype(np.int64)
    d = q.shape[-1]
    scale = 1.0 / np.sqrt(d) if softmax_scale is None else float(softmax_scale)
    slopes = None if alibi_slopes is None else to_f64(alibi_slopes)
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    for bi in range(len(cq) - 1):
        qs, ks = slice(cq[bi], cq[bi + 1]), slice(ck[bi], ck[bi + 1])
        sl = None if slopes is None else (slopes if slopes.ndim == 1 else slopes[bi])
        keep = None if dropout_masks is None else to_f64(dropout_masks[bi])
        dq[qs], dk[ks], dv[ks] = _attention_backward_one(
            do[qs],
            q[qs],
            k[ks],
            v[ks],
            causal=causal,
            scale=scale,
            window=window,
            softcap=softcap,
            slopes=sl,
            keep=keep,
            dropout_p=dropout_p,
        )
    return dq, dk, dv


def naive_scores_torch(
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    window: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Any = None,
):
    """The front of the naive algorithm in torch, in q's dtype and on q's device: (s, allowed, vv)
    with s [batch, h, sq, sk] the scaled scores after softcap and ALiBi, masked entries -inf;
    allowed the [sq, sk] bool mask; vv = v repeated over the GQA groups [batch, sk, h, d].
    Shared by attention_torch and the tests' low-precision baselines. Imports torch."""
    import torch

    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    dt = q.dtype
    scale = 1.0 / d**0.5 if softmax_scale is None else float(softmax_scale)
    kk = k.repeat_interleave(h // hk, dim=2)
    vv = v.repeat_interleave(h // hk, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, kk) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        sl = torch.as_tensor(to_f64(alibi_slopes)).to(device=q.device, dtype=dt)
        sl = sl.view(1, h, 1, 1) if sl.dim() == 1 else sl.view(b, h, 1, 1)
        dist = (
            (torch.arange(sq, device=q.device)[:, None] + sk - sq - torch.arange(sk, device=q.device)[None, :])
            .abs()
            .to(dt)
        )
        s = s - sl * dist
    lo, hi = mask_bounds(sq, sk, causal, window)
    j = np.arange(sk)
    allowed = torch.from_numpy((j[None, :] >= lo[:, None]) & (j[None, :] <= hi[:, None])).to(q.device)
    return s.masked_fill(~allowed, float("-inf")), allowed, vv


def attention_torch(
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    window: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Any = None,
    dropout_p: float = 0.0,
    dropout_mask: Any = None,
):
    """The naive algorithm in torch, differentiable, computed in q's dtype (CPU or CUDA).

    q [batch, sq, h, d], k/v [batch, sk, hk, d] torch tensors; dropout_mask: keep mask
    [batch, h, sq, sk]. With float64 inputs this is the autograd gradient reference; with
    float16/bfloat16 inputs it is the "naive same precision" baseline of the tolerance
    rule. Softmax is written out (max-subtracted, masked entries exactly 0) so fully
    masked rows give out 0 and zero gradients instead of NaN. Imports torch.
    """
    import torch

    b, sq, h, sk = q.shape[0], q.shape[1], q.shape[2], k.shape[1]
    dt = q.dtype
    s, allowed, vv = naive_scores_torch(
        q, k, v, causal=causal, softmax_scale=softmax_scale, window=window, softcap=softcap, alibi_slopes=alibi_slopes
    )
    m = s.detach().amax(dim=-1, keepdim=True) if sk else s.new_zeros((b, h, sq, 1))
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m).masked_fill(~allowed, 0.0)
    l = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(l > 0, l, torch.ones_like(l))
    if dropout_mask is not None:
        keep = torch.as_tensor(dropout_mask).to(device=q.device, dtype=dt)
        p = p * keep / (1.0 - dropout_p)
    return torch.einsum("bhij,bjhd->bihd", p, vv)
