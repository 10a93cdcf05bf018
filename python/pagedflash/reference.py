"""Naive attention in NumPy float64: the yardstick every test compares against.

It materializes S = Q K^T, P = softmax(S) and O = P V, with exactly the masking
semantics of pagedflash (bottom-right causal alignment, sliding window, softcap,
ALiBi, dropout with a given keep mask, fully masked rows -> out 0, lse -inf).
Inputs may be NumPy arrays or torch tensors (any dtype); outputs are float64.

Compressed KV caches (docs/serving.md "Compressed KV caches"): ``quantize_kv`` is
write_kv_cache's quantization in NumPy, bit for bit; ``dequantize_kv`` gives a cache's
values ``code * scale`` in float64 (exact); ``paged_attention`` takes k_scale / v_scale.
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


# ---------------------------------------------------------------------------
# Compressed KV caches
# ---------------------------------------------------------------------------

# name: (mantissa bits, exponent bias, largest finite code); int8 is symmetric [-127, 127]
_FP8 = {"float8_e4m3fn": (3, 7, 0x7E), "float8_e5m2": (2, 15, 0x7B)}
KV_CACHE_DTYPES = ("float8_e4m3fn", "float8_e5m2", "int8")
_ALIASES = {"fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}
INT8_MAX = 127


def kv_cache_dtype_name(dtype: Any) -> str:
    """The name of a KV-cache dtype: a str (vLLM's "fp8", "fp8_e4m3", "fp8_e5m2" included), a
    NumPy / ml_dtypes dtype or a torch dtype -> "float8_e4m3fn", "float8_e5m2", "int8",
    "float16", ... (unchanged for other names)."""
    if isinstance(dtype, str) or type(dtype).__module__.partition(".")[0] == "torch":
        name = str(dtype)
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = str(dtype)
    name = name.rpartition(".")[2]  # torch.float8_e4m3fn
    return _ALIASES.get(name, name)


def fp8_values(dtype: Any) -> np.ndarray:
    """float64 [256]: the value of every code (byte) of a float8 dtype (NaN codes NaN, e5m2's
    0x7c / 0xfc +-inf)."""
    mant, bias, _ = _FP8[kv_cache_dtype_name(dtype)]
    c = np.arange(256)
    e = (c & 0x7F) >> mant
    m = c & ((1 << mant) - 1)
    mag = np.where(e == 0, m * 2.0 ** (1 - bias - mant), (1 + m / 2.0**mant) * 2.0 ** (e - bias))
    if mant == 3:  # e4m3fn: no infinities, magnitude 0x7f is NaN
        mag = np.where((c & 0x7F) == 0x7F, np.nan, mag)
    else:  # e5m2: IEEE-like
        mag = np.where(e == 31, np.where(m == 0, np.inf, np.nan), mag)
    return np.where(c & 0x80, -mag, mag)


def _codes(x: Any, dtype: Optional[str]) -> tuple:
    """(codes as NumPy: uint8 bytes for float8, int8 for int8; dtype name) of a cache in any
    library: torch float8 / int8, ml_dtypes float8, NumPy int8, raw uint8 with `dtype`."""
    name = None if dtype in (None, "auto") else kv_cache_dtype_name(dtype)
    if type(x).__module__.partition(".")[0] == "torch":
        import torch

        x = x.detach().cpu()
        own = kv_cache_dtype_name(x.dtype)
        x = x.view(torch.uint8).numpy() if own.startswith("float8") else x.numpy()
    else:
        if not isinstance(x, np.ndarray) and hasattr(x, "__dlpack__"):
            x = np.from_dlpack(x)
        x = np.asarray(x)
        own = kv_cache_dtype_name(x.dtype)
        if own.startswith("float8"):
            x = x.view(np.uint8)
    if own in KV_CACHE_DTYPES:
        if name is not None and name != own:
            raise TypeError(f"a {own} cache read as {name}")
        name = own
    elif own not in ("uint8", "int8") or name is None:
        raise TypeError(f"expected a float8 or int8 cache (or raw bytes with its dtype), got {own}")
    return (x.view(np.int8) if name == "int8" else x.view(np.uint8)), name


def dequantize_kv(cache: Any, scale: Any = None, *, dtype: Any = None) -> np.ndarray:
    """A compressed cache's values ``code * scale`` in float64 (exact: a code has at most 8
    significant bits, a float32 scale 24).

    cache: float8_e4m3fn / float8_e5m2 / int8 codes in any library (ml_dtypes or torch float8,
    NumPy or torch int8), or raw bytes (uint8) with ``dtype`` naming the codes. scale: None (1),
    a number or float32 ``[]`` / ``[1]`` (per tensor), or ``cache.shape[:-1]`` (per row: per
    (token, KV head) for a ``[num_blocks, block_size, num_kv_heads, head_dim]`` cache).
    """
    codes, name = _codes(cache, dtype)
    vals = codes.astype(np.float64) if name == "int8" else fp8_values(name)[codes]
    if scale is None:
        return vals
    s = to_f64(scale)
    if s.size == 1:
        return vals * float(s.reshape(-1)[0])
    return vals * s[..., None]


def quantize_kv(x: Any, dtype: Any, scale: Any = None) -> tuple:
    """write_kv_cache's quantization in NumPy, bit for bit: (codes, scale).

    x [..., d] in any float dtype and library (converted to float32 exactly); dtype: a
    compressed cache dtype (kv_cache_dtype_name's names). scale: None (float8: 1; int8: per
    row, ``max|x| / 127`` in float32 over the last axis, 1 where that is 0), a number or
    float32 ``[]`` / ``[1]`` (per tensor), or ``x.shape[:-1]`` float32 (per row, given).
    Codes: ``y = float32(x / scale)`` rounded to nearest even; float8 saturates to its largest
    finite value (|y| beyond it, inf included), int8 clamps to [-127, 127]. Returns the codes as
    uint8 bytes (float8; view them as ml_dtypes / torch float8) or int8, and the float32 scale
    used (``[]`` per tensor or ``x.shape[:-1]``).
    """
    name = kv_cache_dtype_name(dtype)
    if name not in KV_CACHE_DTYPES:
        raise TypeError(f"dtype: expected one of {', '.join(KV_CACHE_DTYPES)}, got {name}")
    x32 = to_f64(x).astype(np.float32)  # float16 / bfloat16 / float32 values are exact in float32
    if scale is None and name == "int8":
        amax = np.max(np.abs(x32), axis=-1) if x32.shape[-1] else np.zeros(x32.shape[:-1], np.float32)
        s = (amax / np.float32(INT8_MAX)).astype(np.float32)
        s = np.where(s == 0, np.float32(1), s).astype(np.float32)
    else:
        s = np.asarray(1.0 if scale is None else to_f64(scale), dtype=np.float32)
        if s.size == 1:
            s = s.reshape(())
    with np.errstate(over="ignore"):  # beyond float32: inf, which saturates below
        y = x32 / (s if s.ndim == 0 else s[..., None])  # one float32 division per element
    if name == "int8":
        return np.clip(np.rint(y), -INT8_MAX, INT8_MAX).astype(np.int8), s
    mant, bias, max_code = _FP8[name]
    vals = fp8_values(name)
    a = np.abs(y).astype(np.float64)
    e = np.frexp(np.where(np.isfinite(a) & (a > 0), a, 1.0))[1] - 1  # floor(log2 |y|), exactly
    quantum = 2.0 ** (np.maximum(e, 1 - bias) - mant)  # the spacing of the codes around |y|
    r = np.where(np.isfinite(a), np.rint(a / np.where(np.isfinite(a), quantum, 1.0)) * quantum, np.inf)
    mag = np.searchsorted(vals[: max_code + 1], np.minimum(r, vals[max_code]))  # exact: r is a code's value
    mag = np.where(np.isnan(y), 0x7F, mag)
    return (mag | np.where(np.signbit(y), 0x80, 0)).astype(np.uint8), s


def _is_compressed(cache: Any) -> bool:
    dt = cache.dtype if hasattr(cache, "dtype") else np.asarray(cache).dtype
    return kv_cache_dtype_name(dt) in KV_CACHE_DTYPES


def _cache_f64(cache: Any) -> np.ndarray:
    """A cache's values in float64: float caches as they are, compressed ones' codes (scale 1)."""
    return dequantize_kv(cache) if _is_compressed(cache) else to_f64(cache)


def gather_paged_kv(k_cache: Any, v_cache: Any, block_tables: Any, seq_lens: Any):
    """Each sequence's contiguous K/V from a paged cache: a list of (k [len, hk, d], v) in float64.

    k_cache/v_cache [num_blocks, block_size, hk, d]; token t of sequence b is
    k_cache[block_tables[b, t // block_size], t % block_size].
    """
    kc, vc = _cache_f64(k_cache), _cache_f64(v_cache)
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
    k_scale: Any = None,
    v_scale: Any = None,
    kv_cache_dtype: str = "auto",
):
    """Naive paged attention in float64: gathers each sequence's K/V through its block
    table and runs the naive attention on the contiguous sequence.

    q [batch, h, d] (one query per sequence), [batch, q_len, h, d], or packed [total_q, h, d]
    with cu_seqlens_q [batch + 1]. The q_len queries of a sequence holding seq_len tokens are
    its last q_len tokens (bottom-right causal alignment). Compressed caches are read as
    dequantize_kv(cache, scale) (kv_cache_dtype names the codes of raw uint8 caches). Returns
    out (q's layout, float64) and, with return_lse, lse [h, total_q].
    """
    q = to_f64(q)
    if k_scale is not None or v_scale is not None or kv_cache_dtype != "auto" or _is_compressed(k_cache):
        k_cache = dequantize_kv(k_cache, k_scale, dtype=kv_cache_dtype)
        v_cache = dequantize_kv(v_cache, v_scale, dtype=kv_cache_dtype)
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
