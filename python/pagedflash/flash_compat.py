"""FlashAttention 2.x entry points: flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache.

Same names, positional order, defaults and return conventions as ``flash_attn`` 2.6-2.8, so
``from pagedflash import flash_attn_func`` (or ``import pagedflash as flash_attn``) replaces the
import and nothing else. Each function maps onto pagedflash's own operations:

  flash_attn_func          torch: pagedflash.torch.flash_attn (autograd, torch.compile); other
                           libraries: pagedflash.flash_attn (no gradients)
  flash_attn_varlen_func   likewise with flash_attn_varlen; with block_table (k, v paged caches):
                           pagedflash.paged_attn, sequence b holding cu_seqlens_k[b+1] - cu_seqlens_k[b]
                           tokens, its queries the last of them (flash-attn's bottom-right alignment)
  flash_attn_with_kvcache  rotary (in the caller's library) on q and the new k, write_kv_cache of the
                           new k/v in place, then paged_attn. A dense cache [b_cache, seqlen_cache, hk, d]
                           is viewed, without a copy, as a paged one: block_size = the largest divisor of
                           seqlen_cache that is <= 256, sequence b owning the consecutive blocks of row
                           cache_batch_idx[b]

Differences from flash-attn (S_dmask is None, no cache_leftpad, ...): docs/flash_attn_compat.md.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

import numpy as np

from . import api
from ._frameworks import describe, is_torch
from .paged import paged_attn, write_kv_cache

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache"]

_MAX_BLOCK_SIZE = 256  # the largest block_size paged_attn takes (validate_paged.c)


# ---------------------------------------------------------------------------
# argument helpers
# ---------------------------------------------------------------------------


def _window_size(window_size: Sequence[int]) -> tuple[int, int]:
    """flash-attn's window_size (left, right) as pagedflash's window, checked under its own name."""
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise ValueError(f"window_size: expected a pair (left, right), -1 = unbounded; got {window_size!r}") from None
    try:
        pair = (operator.index(left), operator.index(right))
    except TypeError:
        raise TypeError(f"window_size: expected a pair of ints, got {window_size!r}") from None
    if min(pair) < -1:
        raise ValueError(f"window_size: each side must be >= -1 (-1 = unbounded), got {pair}")
    return pair


def _options(softmax_scale, causal, window_size, softcap, alibi_slopes) -> dict:
    """The masking options every pagedflash attention call takes, from flash-attn's arguments."""
    return dict(
        softmax_scale=softmax_scale,
        causal=bool(causal),
        window=_window_size(window_size),
        softcap=softcap,
        alibi_slopes=alibi_slopes,
    )


def _shape(x: Any, name: str, ndim: int) -> tuple:
    shape = tuple(describe(x, name)[0])
    if len(shape) != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {list(shape)}")
    return shape


def _torch_slopes(alibi_slopes: Any, q: Any) -> Any:
    """alibi_slopes for pagedflash.torch (which saves it for the backward): a torch tensor on q's
    device (NumPy slopes with torch q are accepted, as everywhere in pagedflash)."""
    if alibi_slopes is None or is_torch(alibi_slopes):
        return alibi_slopes
    import torch

    return torch.as_tensor(np.asarray(alibi_slopes), device=q.device)


def _needs_grad(*xs) -> bool:
    if not any(is_torch(x) for x in xs):
        return False
    import torch

    return torch.is_grad_enabled() and any(is_torch(x) and x.requires_grad for x in xs)


def _host(x: Any) -> Optional[np.ndarray]:
    """The values of a small index array when they live in host memory (NumPy, torch on the CPU),
    else None: device-resident values are not read (that would synchronize)."""
    if isinstance(x, np.ndarray):
        return x
    if is_torch(x):
        return x.detach().numpy() if x.device.type == "cpu" else None
    return None


def _index_array(x: Any, name: str, length: int, dtypes=("int32",)) -> Any:
    """x, checked to be an integer array [length] of one of `dtypes` (TypeError / ValueError naming it)."""
    shape, dtype, _, _ = describe(x, name)
    if dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {' or '.join(dtypes)}, got {dtype}")
    if tuple(shape) != (length,):
        raise ValueError(f"{name}: expected shape [{length}], got {list(shape)}")
    return x


# ---------------------------------------------------------------------------
# flash_attn_func, flash_attn_varlen_func
# ---------------------------------------------------------------------------


def flash_attn_func(
    q: Any,
    k: Any,
    v: Any,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Any = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """flash_attn.flash_attn_func on pagedflash: exact attention, flash-attn 2.x's call.

    q: [batch, seqlen_q, num_heads, head_dim]; k, v: [batch, seqlen_k, num_kv_heads, head_dim],
    num_heads % num_kv_heads == 0; float16, bfloat16 or float32; head_dim 1..256. causal is
    aligned bottom-right; window_size=(left, right), -1 = unbounded; softcap > 0 caps the scores;
    alibi_slopes float32 [num_heads] or [batch, num_heads] adds -slope * |i + seqlen_k - seqlen_q - j|.

    torch tensors go through pagedflash.torch.flash_attn: differentiable in q, k and v, with the
    backward's `deterministic` option (bitwise-reproducible dq on CUDA; the CPU backward is always
    deterministic). Other arrays (NumPy, CuPy, ...) get the forward only. With dropout_p > 0 the
    mask comes from pagedflash's generator (a fresh seed per call; torch's generator for torch).

    Returns out [batch, seqlen_q, num_heads, head_dim] (q's dtype), or with return_attn_probs
    (out, softmax_lse, S_dmask): softmax_lse float32 [batch, num_heads, seqlen_q] (natural log,
    -inf for a row that sees no key) and S_dmask None: pagedflash never forms the probability
    matrix (pagedflash.reference.attention(..., return_probs=True) computes it;
    pagedflash.dropout_mask gives a seed's dropout mask).
    """
    opts = _options(softmax_scale, causal, window_size, softcap, alibi_slopes)
    return _flash(q, k, v, (), dropout_p, deterministic, return_attn_probs, opts)


def flash_attn_varlen_func(
    q: Any,
    k: Any,
    v: Any,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Any = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: Any = None,
):
    """flash_attn.flash_attn_varlen_func on pagedflash: packed variable-length sequences.

    q: [total_q, num_heads, head_dim]; cu_seqlens_q / cu_seqlens_k: int32 [batch + 1], prefix sums
    of the lengths; max_seqlen_q / max_seqlen_k: the longest lengths. Without block_table, k and v
    are packed [total_k, num_kv_heads, head_dim] and the call is pagedflash.flash_attn_varlen
    (pagedflash.torch.flash_attn_varlen for torch: differentiable). Options as flash_attn_func.

    With block_table (flash-attn 2.6+'s paged varlen), k and v are paged caches [num_blocks,
    block_size, num_kv_heads, head_dim] (block_size 1..256), block_table int32 [batch,
    max_blocks_per_seq], and sequence b holds cu_seqlens_k[b+1] - cu_seqlens_k[b] tokens; its
    queries are its last tokens (bottom-right, as flash-attn), so each sequence needs at least as
    many keys as queries. This is pagedflash.paged_attn: forward only (NotImplementedError when
    a torch input requires grad, or for dropout_p > 0).

    Returns out [total_q, num_heads, head_dim], or with return_attn_probs (out, softmax_lse
    float32 [num_heads, total_q], None).
    """
    opts = _options(softmax_scale, causal, window_size, softcap, alibi_slopes)
    if block_table is not None:
        if dropout_p:
            raise NotImplementedError("dropout_p: the paged path (block_table given) has no dropout; pass 0.0")
        if _needs_grad(q, k, v):
            raise NotImplementedError(
                "block_table: the paged path has no backward; call it under torch.no_grad() or with tensors "
                "that do not require grad"
            )
        api._int(max_seqlen_q, "max_seqlen_q")
        api._int(max_seqlen_k, "max_seqlen_k")
        rows = _shape(block_table, "block_table", 2)[0]
        seq_lens = _seq_lens_from_cu(cu_seqlens_k, rows)
        r = paged_attn(q, k, v, block_table, seq_lens, cu_seqlens_q=cu_seqlens_q, return_lse=return_attn_probs, **opts)
        return (*r, None) if return_attn_probs else r
    varlen = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return _flash(q, k, v, varlen, dropout_p, deterministic, return_attn_probs, opts)


def _flash(q, k, v, varlen: tuple, dropout_p, deterministic, return_attn_probs, opts):
    """flash_attn (varlen empty) or flash_attn_varlen (varlen: its cu_seqlens and max_seqlen
    arguments): pagedflash.torch's differentiable wrappers for torch tensors, the functional API
    otherwise. Returns out, or (out, lse, None)."""
    f: Callable[..., Any]
    if is_torch(q):
        from . import torch as pft

        f = pft.flash_attn_varlen if varlen else pft.flash_attn
        opts = dict(opts, alibi_slopes=_torch_slopes(opts["alibi_slopes"], q), deterministic=deterministic)
    else:
        f = api.flash_attn_varlen if varlen else api.flash_attn
    r = f(q, k, v, *varlen, dropout_p=dropout_p, return_lse=return_attn_probs, **opts)
    return (*r, None) if return_attn_probs else r


def _seq_lens_from_cu(cu_seqlens_k: Any, batch: int) -> Any:
    """The tokens each sequence holds, cu_seqlens_k[1:] - cu_seqlens_k[:-1] (int32, in its library)."""
    _index_array(cu_seqlens_k, "cu_seqlens_k", batch + 1)
    values = _host(cu_seqlens_k)
    if values is not None and np.any(np.diff(values.astype(np.int64)) < 0):
        raise ValueError(f"cu_seqlens_k: must be non-decreasing, got {values.tolist()}")
    return cu_seqlens_k[1:] - cu_seqlens_k[:-1]


# ---------------------------------------------------------------------------
# flash_attn_with_kvcache
# ---------------------------------------------------------------------------


class _Lib:
    """The few array operations flash_attn_with_kvcache needs, in q's library (NumPy or torch) and on
    q's device: index arithmetic for the block table and slots, the rotary embedding, the lse layout."""

    def __init__(self, like: Any):
        self.is_torch = is_torch(like)
        if self.is_torch:
            import torch

            self.xp: Any = torch
            self.dev: dict = {"device": like.device}
        elif isinstance(like, np.ndarray):
            self.xp, self.dev = np, {}
        else:
            raise NotImplementedError(
                f"q: flash_attn_with_kvcache takes NumPy arrays or torch tensors, got {type(like).__name__} "
                "(pagedflash.write_kv_cache and pagedflash.paged_attn take any library)"
            )

    def own(self, x):
        """An index array or rotary table as an array of this library on q's device (the array itself
        when it already is one; a copy of a small array from another library, e.g. NumPy
        cache_seqlens with torch q)."""
        return self.xp.as_tensor(x, **self.dev) if self.is_torch else np.asarray(x)

    def arange(self, n: int):
        return self.xp.arange(n, dtype=self.xp.int64, **self.dev)

    def full(self, n: int, value: int):
        return self.xp.full((n,), value, dtype=self.xp.int32, **self.dev)

    def astype(self, x, dtype):
        return x.to(dtype) if self.is_torch else x.astype(dtype)

    def clip(self, x, lo: int, hi: int):
        return self.xp.clamp(x, lo, hi) if self.is_torch else np.clip(x, lo, hi)

    def cat(self, xs):
        return self.xp.cat(xs, -1) if self.is_torch else np.concatenate(xs, -1)

    def stack(self, xs):
        return self.xp.stack(xs, -1)

    def heads_first(self, lse, batch: int, seqlen: int):
        """paged_attn's lse [num_heads, batch * seqlen] as flash-attn's [batch, num_heads, seqlen]."""
        lse = lse.reshape(lse.shape[0], batch, seqlen)
        return lse.permute(1, 0, 2).contiguous() if self.is_torch else np.ascontiguousarray(lse.transpose(1, 0, 2))


def _dense_as_paged(cache: Any, name: str) -> tuple[Any, int]:
    """A dense cache [b_cache, seqlen_cache, hk, d] as a paged one [b_cache * n, block_size, hk, d]
    (a view, never a copy: it is written in place), block_size the largest divisor of seqlen_cache
    <= 256 (n = seqlen_cache / block_size). Row r's token t is block r * n + t // block_size."""
    b_cache, seqlen, hk, d = _shape(cache, name, 4)
    if seqlen < 1:
        raise ValueError(f"{name}: seqlen_cache (dimension 1) must be >= 1, got {seqlen}")
    if seqlen <= _MAX_BLOCK_SIZE:
        return cache, seqlen
    bs = max(x for x in range(1, _MAX_BLOCK_SIZE + 1) if seqlen % x == 0)
    shape = (b_cache * (seqlen // bs), bs, hk, d)
    strides = cache.stride() if is_torch(cache) else tuple(s // cache.itemsize for s in cache.strides)
    if b_cache > 1 and strides[0] != seqlen * strides[1]:
        raise ValueError(
            f"{name}: a dense cache with seqlen_cache > {_MAX_BLOCK_SIZE} is viewed as blocks of {bs} tokens, "
            f"which needs its batch and sequence dimensions contiguous (stride(0) == seqlen_cache * stride(1)); "
            f"got strides {list(strides)} for shape {[b_cache, seqlen, hk, d]}"
        )
    if is_torch(cache):
        return cache.view(shape), bs
    byte_strides = (bs * cache.strides[1],) + cache.strides[1:]
    return np.lib.stride_tricks.as_strided(cache, shape, byte_strides), bs


def _rotary(lib: _Lib, x: Any, cos: Any, sin: Any, pos: Any, interleaved: bool) -> Any:
    """x [b, s, heads, d] with its first rotary_dim = 2 * cos.shape[1] features rotated by the angles of
    rows pos [b, s] of cos / sin [seqlen_ro, rotary_dim / 2]; computed in float32, returned in x's
    dtype (a new array). interleaved: pairs (0, 1), (2, 3), ... (GPT-J); else (i, i + rotary_dim / 2)
    (GPT-NeoX)."""
    rd = 2 * cos.shape[1]
    f32 = lib.xp.float32
    c = lib.astype(cos, f32)[pos][:, :, None, :]  # [b, s, 1, rd / 2]
    s = lib.astype(sin, f32)[pos][:, :, None, :]
    xr = lib.astype(x[..., :rd], f32)
    x1, x2 = (xr[..., 0::2], xr[..., 1::2]) if interleaved else (xr[..., : rd // 2], xr[..., rd // 2 :])
    y1, y2 = x1 * c - x2 * s, x1 * s + x2 * c
    rot = lib.stack([y1, y2]).reshape(xr.shape) if interleaved else lib.cat([y1, y2])
    return lib.cat([lib.astype(rot, x.dtype), x[..., rd:]])


def _cache_seqlens(lib: _Lib, cache_seqlens: Any, batch: int, capacity: int, appending: bool) -> Any:
    """flash-attn's cache_seqlens (None: the whole cache; an int; an integer array [batch]) as int32
    [batch] in q's library."""
    if cache_seqlens is None:
        if appending:
            raise ValueError("cache_seqlens: required when k and v are given (where the new tokens go)")
        return lib.full(batch, capacity)
    if isinstance(cache_seqlens, (int, np.integer)) and not isinstance(cache_seqlens, bool):
        n = int(cache_seqlens)
        if not 0 <= n <= capacity:
            raise ValueError(f"cache_seqlens: must be in [0, {capacity}] (the tokens the cache holds), got {n}")
        return lib.full(batch, n)
    _index_array(cache_seqlens, "cache_seqlens", batch, ("int32", "int64"))
    values = _host(cache_seqlens)
    if values is not None and np.any(values < 0):
        raise ValueError(f"cache_seqlens: must be >= 0, got {values.tolist()}")
    return lib.astype(lib.own(cache_seqlens), lib.xp.int32)


def _check_tokens(seq_lens: Any, bt: Any, num_blocks: int, bs: int, seqlen_q: int, capacity: int, bt_name: str):
    """Where the lengths and the block table are in host memory: every sequence holds seqlen_q to
    capacity tokens, and the blocks holding them are in [0, num_blocks). paged_attn checks the same,
    but after the new tokens were written; here nothing has been written yet."""
    lens, table = _host(seq_lens), _host(bt)
    if lens is None or table is None:
        return
    for b, n in enumerate(lens.tolist()):
        if n > capacity:
            raise ValueError(
                f"cache_seqlens: sequence {b} would hold {n} tokens (cache_seqlens plus the new ones), more than "
                f"the {capacity} its cache holds"
            )
        if n < seqlen_q:
            raise ValueError(
                f"cache_seqlens: sequence {b} holds {n} tokens, fewer than its {seqlen_q} queries (the queries are "
                "the last seqlen_q tokens, so each sequence needs at least seqlen_q of them)"
            )
        used = table[b, : -(-n // bs)]
        if used.size and (used.min() < 0 or used.max() >= num_blocks):
            raise ValueError(
                f"{bt_name}: sequence {b}'s blocks {used.tolist()} are not all in [0, {num_blocks}), the cache's blocks"
            )


def flash_attn_with_kvcache(
    q: Any,
    k_cache: Any,
    v_cache: Any,
    k: Any = None,
    v: Any = None,
    rotary_cos: Any = None,
    rotary_sin: Any = None,
    cache_seqlens: Union[int, Any, None] = None,
    cache_batch_idx: Any = None,
    cache_leftpad: Any = None,
    block_table: Any = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: Any = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
):
    """flash_attn.flash_attn_with_kvcache on pagedflash: decoding and chunked prefill over a KV cache.

    q: [batch, seqlen_q, num_heads, head_dim] (NumPy or torch). k_cache, v_cache: dense
    [batch_cache, seqlen_cache, num_kv_heads, head_dim], row cache_batch_idx[b] (int32 [batch];
    default b) holding sequence b; or, with block_table (int32 [batch, max_blocks_per_seq]), paged
    [num_blocks, block_size, num_kv_heads, head_dim], block_size 1..256. cache_seqlens: an int or
    an int32 array [batch], the tokens each sequence holds (None: the whole cache row).

    k, v (optional, [batch, seqlen_new, num_kv_heads, head_dim]) are written IN PLACE into the
    caches at positions cache_seqlens[b] .. cache_seqlens[b] + seqlen_new - 1 (cache_seqlens is
    then required), and attention runs over cache_seqlens[b] + seqlen_new tokens. rotary_cos /
    rotary_sin ([seqlen_ro, rotary_dim / 2], seqlen_ro >= the cache's capacity; only with k and
    v) rotate the new keys at their positions and q at positions cache_seqlens[b] + i when causal
    or windowed, else all at cache_seqlens[b]; rotary_interleaved as flash-attn (True: pairs
    (0, 1), (2, 3), ...; False: (i, i + rotary_dim / 2)). The rotation is done in float32 by the
    caller's library on new arrays: q and k themselves are not modified.

    The queries are each sequence's last seqlen_q tokens (causal is bottom-right), so each
    sequence must hold at least seqlen_q tokens. softmax_scale, causal, window_size, softcap,
    alibi_slopes as flash_attn_func; num_splits: 0 automatic, 1 one pass, n split-KV chunks.
    No gradients (as flash-attn).

    Returns out [batch, seqlen_q, num_heads, head_dim], or with return_softmax_lse (out,
    softmax_lse float32 [batch, num_heads, seqlen_q]).

    Raises NotImplementedError for cache_leftpad and for arrays other than NumPy / torch;
    ValueError / TypeError naming the argument otherwise. Host-resident index arrays are checked
    before anything is written, so a rejected call leaves the caches as they were; device-resident
    ones are not read (out-of-range slots are skipped, as in write_kv_cache).
    """
    if cache_leftpad is not None:
        raise NotImplementedError(
            "cache_leftpad: not supported; every sequence's tokens start at position 0 of its cache row or blocks"
        )
    lib = _Lib(q)
    opts = _options(softmax_scale, causal, window_size, softcap, alibi_slopes)
    if lib.is_torch:  # no gradients through this call, as in flash-attn
        q, k, v = (None if x is None else x.detach() for x in (q, k, v))
    batch, seqlen_q, _, head_dim = _shape(q, "q", 4)
    cache_shape = _shape(k_cache, "k_cache", 4)
    if (k is None) != (v is None):
        raise ValueError(f"{'v' if v is None else 'k'}: k and v are given together (the new tokens' keys and values)")

    # the cache as a paged one: kc, vc [num_blocks, bs, hk, d], bt int32 [batch, capacity / bs]
    if block_table is not None:
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx: not used with block_table (the block table says where each sequence is)")
        rows, max_blocks = _shape(block_table, "block_table", 2)
        if rows != batch or max_blocks < 1:
            raise ValueError(
                f"block_table: expected [{batch}, max_blocks_per_seq >= 1] (batch from q), got {[rows, max_blocks]}"
            )
        kc, vc, bt, bt_name = k_cache, v_cache, lib.own(block_table), "block_table"
        bs = cache_shape[1]
        capacity = max_blocks * bs
    else:
        (kc, bs), (vc, _) = _dense_as_paged(k_cache, "k_cache"), _dense_as_paged(v_cache, "v_cache")
        capacity = cache_shape[1]
        if cache_batch_idx is None:
            if batch > cache_shape[0]:
                raise ValueError(f"k_cache: {cache_shape[0]} rows (batch_size_cache) for a batch of {batch}")
            rows_of_batch, bt_name = lib.arange(batch), "k_cache"
        else:
            idx = _index_array(cache_batch_idx, "cache_batch_idx", batch, ("int32", "int64"))
            rows_of_batch, bt_name = lib.astype(lib.own(idx), lib.xp.int64), "cache_batch_idx"
        per_row = capacity // bs
        bt = lib.astype(rows_of_batch[:, None] * per_row + lib.arange(per_row)[None, :], lib.xp.int32)

    lens = _cache_seqlens(lib, cache_seqlens, batch, capacity, k is not None)
    seqlen_new = 0 if k is None else _new_tokens(k, v, batch, cache_shape[2], head_dim)
    seq_lens = lens + seqlen_new
    _check_tokens(seq_lens, bt, describe(kc, "k_cache")[0][0], bs, seqlen_q, capacity, bt_name)

    if rotary_cos is not None or rotary_sin is not None:
        at_own_positions = opts["causal"] or opts["window"] != (-1, -1)
        q, k = _apply_rotary(lib, q, k, rotary_cos, rotary_sin, lens, capacity, rotary_interleaved, at_own_positions)
    if k is not None:
        # every shape and option paged_attn checks, checked on an empty batch before anything is written
        paged_attn(
            q[:0],
            kc,
            vc,
            bt[:0],
            seq_lens[:0],
            num_splits=num_splits,
            **dict(opts, alibi_slopes=_first_rows(alibi_slopes, batch)),
        )
        t = lens[:, None] + lib.arange(seqlen_new)[None, :]  # [batch, seqlen_new]: the new tokens' positions
        blocks = lib.astype(bt[lib.arange(batch)[:, None], lib.clip(t // bs, 0, capacity // bs - 1)], lib.xp.int64)
        slots = lib.xp.where((t >= 0) & (t < capacity), blocks * bs + t % bs, -1).reshape(-1)
        tokens = (batch * seqlen_new, cache_shape[2], head_dim)
        write_kv_cache(k.reshape(tokens), v.reshape(tokens), kc, vc, slots)
    r = paged_attn(q, kc, vc, bt, seq_lens, num_splits=num_splits, return_lse=return_softmax_lse, **opts)
    return (r[0], lib.heads_first(r[1], batch, seqlen_q)) if return_softmax_lse else r


def _new_tokens(k: Any, v: Any, batch: int, kv_heads: int, head_dim: int) -> int:
    """seqlen_new of the new k and v, after checking their shapes."""
    shape = _shape(k, "k", 4)
    if shape[0] != batch or shape[2:] != (kv_heads, head_dim):
        raise ValueError(f"k: expected [{batch}, seqlen_new, {kv_heads}, {head_dim}], got {list(shape)}")
    if tuple(describe(v, "v")[0]) != shape:
        raise ValueError(f"v: expected k's shape {list(shape)}, got {list(describe(v, 'v')[0])}")
    return shape[1]


def _first_rows(alibi_slopes: Any, batch: int) -> Any:
    """alibi_slopes for paged_attn's check on an empty batch: [num_heads] as is, [batch, num_heads]
    with no rows (after checking its batch dimension, which an empty batch cannot)."""
    if alibi_slopes is None or len(describe(alibi_slopes, "alibi_slopes")[0]) != 2:
        return alibi_slopes
    rows = describe(alibi_slopes, "alibi_slopes")[0][0]
    if rows != batch:
        raise ValueError(f"alibi_slopes: expected [num_heads] or [{batch}, num_heads] (batch from q), got {rows} rows")
    return alibi_slopes[:0]


def _apply_rotary(lib, q, k, cos, sin, lens, capacity, interleaved, at_own_positions):
    """(q, k) rotated as flash_attn_with_kvcache does (see its docstring), after checking cos and sin."""
    if cos is None or sin is None:
        raise ValueError(
            f"{'rotary_sin' if sin is None else 'rotary_cos'}: rotary_cos and rotary_sin are given together"
        )
    if k is None:
        raise ValueError("rotary_cos: rotary embedding needs the new k and v (it rotates the keys it appends)")
    shape = _shape(cos, "rotary_cos", 2)
    if _shape(sin, "rotary_sin", 2) != shape:
        raise ValueError(f"rotary_sin: expected rotary_cos's shape {list(shape)}, got {list(describe(sin)[0])}")
    head_dim = _shape(q, "q", 4)[3]
    if not 1 <= shape[1] <= head_dim // 2:
        raise ValueError(
            f"rotary_cos: dimension 1 (rotary_dim / 2) must be in [1, head_dim / 2 = {head_dim // 2}], got {shape[1]}"
        )
    if shape[0] < capacity:
        raise ValueError(f"rotary_cos: {shape[0]} positions (dimension 0), fewer than the {capacity} the cache holds")
    seqlen_q, seqlen_new = _shape(q, "q", 4)[1], _shape(k, "k", 4)[1]
    q_offsets = lib.arange(seqlen_q) if at_own_positions else lib.arange(seqlen_q) * 0
    pos_q = lib.clip(lens[:, None] + q_offsets[None, :], 0, shape[0] - 1)  # clipped: device values are not checked
    pos_k = lib.clip(lens[:, None] + lib.arange(seqlen_new)[None, :], 0, shape[0] - 1)
    cos, sin = lib.own(cos), lib.own(sin)
    return _rotary(lib, q, cos, sin, pos_q, interleaved), _rotary(lib, k, cos, sin, pos_k, interleaved)
