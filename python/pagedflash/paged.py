"""Serving operations: paged attention (with flash decoding), the merge of
partial attention states, and the KV-cache operations.

The KV cache of one layer is a pair ``k_cache``, ``v_cache`` of shape
``[num_blocks, block_size, num_kv_heads, head_dim]``; a sequence's token ``t``
lives in block ``block_tables[b, t // block_size]`` at offset ``t % block_size``.
See docs/serving.md for the layouts and semantics.

Each call hands its arguments to ``pagedflash._C``, which allocates outputs in the
caller's library (NumPy in, NumPy out; torch in, torch out; other DLPack producers get
``pagedflash.Tensor``) and views everything without copying (api.py says how). Caches are written in
place and never copied: a cache whose last dimension is strided is rejected.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from . import _C, api
from ._frameworks import allocate, describe, is_torch, library_of


def _in_place(x: Any) -> Any:
    """A view of an array written in place (a cache): never copied."""
    return x.detach() if is_torch(x) else x


def _stream_of(x: Any, stream: Optional[int]) -> Optional[int]:
    """`stream`, or where it is None and x's library is one _C cannot ask (CuPy, torch without
    the DLPack C exchange API), that library's current stream; None lets _C ask torch."""
    if stream is None and not isinstance(x, np.ndarray) and not _C.has_exchange_api(x):
        return library_of(x).stream(x, None)
    return stream


def _index(x: Any) -> Any:
    """Index arguments given as Python lists become NumPy int64 arrays (block_mapping)."""
    if isinstance(x, (list, tuple)):
        try:
            return np.asarray(x, dtype=np.int64).reshape(-1, 2)
        except OverflowError:
            raise ValueError("block_mapping: a block id does not fit in int64") from None
        except (TypeError, ValueError) as e:
            raise type(e)(f"block_mapping: expected (src, dst) pairs of ints ({e})") from None
    return library_of(x).prepare(x)


def paged_attn(
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
    num_splits: int = 0,
    return_lse: bool = False,
    out: Any = None,
    stream: Optional[int] = None,
    kernel: str = "auto",
):
    """Attention of each sequence's queries over the tokens it holds in a paged KV cache.

    q: ``[batch, num_heads, head_dim]`` (one query per sequence: decode),
    ``[batch, q_len, num_heads, head_dim]`` (q_len queries per sequence), or packed
    ``[total_q, num_heads, head_dim]`` with ``cu_seqlens_q`` int32 ``[batch + 1]``
    (sequence b owns queries ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``; chunked prefill,
    speculative verification, mixed batches).
    k_cache, v_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``, q's dtype
    (float16, bfloat16, float32); block_size 1..256; head_dim 1..256;
    num_heads % num_kv_heads == 0.
    block_tables: int32 ``[batch, max_blocks_per_seq]``; seq_lens: int32 ``[batch]``, the
    tokens each sequence holds, its queries included (write them with
    :func:`write_kv_cache` first): ``q_len <= seq_len <= max_blocks_per_seq * block_size``.

    The queries are the sequence's last q_len tokens: query i sits at position
    ``seq_len - q_len + i`` and with ``causal`` sees tokens ``0..`` that position.
    window=(left, right) (-1 = unbounded), softcap, alibi_slopes (float32 ``[num_heads]``
    or ``[batch, num_heads]``) and softmax_scale (default ``1/sqrt(head_dim)``) act as in
    :func:`pagedflash.flash_attn`. num_splits: 0 = automatic, 1 = one pass per sequence,
    n = flash decoding with n key chunks merged by log-sum-exp.

    Returns out (q's shape and dtype) or, with return_lse, ``(out, lse)``: lse float32
    ``[num_heads, total_q]`` (natural log; total_q = batch, batch * q_len, or the packed
    count). A query that sees no token gets out = 0 and lse = -inf.

    kernel: "auto" (the default: the launcher's heuristic) or, for tests and benchmarks, a
    CUDA kernel: "sm90" (the prefill path: the wgmma flash forward reading K/V through the
    block table; "auto" takes it on Hopper for >= 128 queries per sequence), "simple" (CUDA
    cores) or a split-KV tensor-core CTA shape of H KV heads x W warps, "1x4", "4x4", "8x8",
    "1x8", "2x8", "4x8", optionally "+registers" (K/V loaded straight into registers instead
    of through the shared-memory ring). NotImplementedError where the
    named kernel cannot take the call; the CPU backend ignores the hint.

    Raises ValueError (shapes, lengths, block ids out of range, cu_seqlens_q inconsistent
    with q), TypeError (dtypes, e.g. block_tables not int32), NotImplementedError (a device
    this build lacks).
    """
    return _paged_attn(
        q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, softmax_scale, causal, window, softcap,
        alibi_slopes, num_splits, bool(return_lse), out, stream, kernel,
    )  # fmt: skip


def _paged_attn(
    q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, softmax_scale, causal, window, softcap, alibi_slopes,
    num_splits, lse, out, stream, kernel,
):  # fmt: skip
    """paged_attn's call (also pagedflash.torch's). lse: False (out only), True ((out, lse), lse
    allocated) or an array to write ((out, lse))."""
    r = _C.paged_attn(
        q, k_cache, v_cache, block_tables, seq_lens, out, lse, cu_seqlens_q, softmax_scale, causal, window, softcap,
        alibi_slopes, num_splits, stream, kernel,
    )  # fmt: skip
    if r is not NotImplemented:
        return r
    # the general path: a library only the Python layer allocates for (_frameworks.py)
    lib = library_of(q)
    q = lib.prepare(q)
    k_cache, v_cache = library_of(k_cache).prepare(k_cache), library_of(v_cache).prepare(v_cache)
    block_tables, seq_lens = library_of(block_tables).prepare(block_tables), library_of(seq_lens).prepare(seq_lens)
    qshape, qdtype, _, _ = describe(q, "q")
    if out is None:
        out = allocate(lib, qshape, qdtype, q, "q")
    if lse is True:
        lse = None
        if len(qshape) >= 3:  # a wrong rank is reported by _C
            total_q = qshape[0] * qshape[1] if len(qshape) == 4 and cu_seqlens_q is None else qshape[0]
            lse = lib.empty((qshape[-2], total_q), "float32", q)
    return _C.paged_attn(
        q, k_cache, v_cache, block_tables, seq_lens, out, None if lse is False else lse, cu_seqlens_q, softmax_scale,
        causal, window, softcap, alibi_slopes, num_splits, api._stream(lib, q, stream), kernel,
    )  # fmt: skip


def merge_attn_states(
    out_a: Any,
    lse_a: Any,
    out_b: Any,
    lse_b: Any,
    *,
    out: Any = None,
    out_lse: Any = None,
    stream: Optional[int] = None,
) -> tuple[Any, Any]:
    """Merge two attention results over disjoint key sets of the same queries.

    out_a, out_b: ``[..., num_heads, head_dim]`` (any leading shape, ``tokens`` = its
    product), one float dtype; lse_a, lse_b: float32 natural log, each either
    ``[num_heads, tokens]`` (as paged_attn / flash_attn_varlen return it) or, for
    ``out_a [batch, seqlen, num_heads, head_dim]``, ``[batch, num_heads, seqlen]`` (as
    flash_attn returns it). Neither is copied.

    Returns ``(out, lse)``: ``lse = logaddexp(lse_a, lse_b)`` and
    ``out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b``, i.e. attention over
    the union of the keys; lse comes in lse_a's layout. A side with lse -inf contributes
    nothing; both -inf gives out 0, lse -inf. out / out_lse may be given (in either
    layout; they may be out_a / lse_a: in place).

    Raises ValueError (shapes) or TypeError (dtypes).
    """
    r = _C.merge_attn_states(out_a, lse_a, out_b, lse_b, out, out_lse, stream)
    if r is not NotImplemented:
        return r
    lib = library_of(out_a)
    out_a, out_b = lib.prepare(out_a), library_of(out_b).prepare(out_b)
    shape, dtype, _, _ = describe(out_a, "out_a")
    if out is None:
        out = allocate(lib, shape, dtype, out_a, "out_a")
    if out_lse is None:  # in lse_a's layout, as the binding allocates it
        if len(shape) == 4 and len(describe(lse_a, "lse_a")[0]) == 3:
            lse_shape: tuple = (shape[0], shape[2], shape[1])
        else:
            tokens = int(np.prod(shape[:-2], dtype=np.int64)) if len(shape) >= 2 else 0
            lse_shape = (shape[-2] if len(shape) >= 2 else 0, tokens)
        out_lse = lib.empty(lse_shape, "float32", out_a)
    return _C.merge_attn_states(out_a, lse_a, out_b, lse_b, out, out_lse, api._stream(lib, out_a, stream))


def write_kv_cache(
    k: Any, v: Any, k_cache: Any, v_cache: Any, slot_mapping: Any, *, stream: Optional[int] = None
) -> None:
    """Write new tokens' keys and values into the paged cache, in place.

    k, v: ``[num_tokens, num_kv_heads, head_dim]``, the caches' dtype;
    k_cache, v_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``;
    slot_mapping: int64 ``[num_tokens]``, token t goes to slot
    ``slot_mapping[t] = block * block_size + offset``; a negative slot skips the token.

    Every slot is checked before anything is written. Raises ValueError (shapes, a slot
    >= num_blocks * block_size, a cache with a strided last dimension) or TypeError
    (dtypes, e.g. slot_mapping not int64); the caches are then untouched.
    """
    if _C.write_kv_cache(k, v, k_cache, v_cache, slot_mapping, stream) is NotImplemented:
        lib = library_of(k_cache)
        k, v = library_of(k).prepare(k), library_of(v).prepare(v)
        slot_mapping = library_of(slot_mapping).prepare(slot_mapping)
        _C.write_kv_cache(k, v, _in_place(k_cache), _in_place(v_cache), slot_mapping, api._stream(lib, k_cache, stream))


def copy_blocks(
    k_caches: Sequence[Any], v_caches: Sequence[Any], block_mapping: Any, *, stream: Optional[int] = None
) -> None:
    """Copy whole blocks within every layer's caches (copy-on-write), in place.

    k_caches, v_caches: sequences of caches (one per layer), each
    ``[num_blocks, block_size, num_kv_heads, head_dim]`` (a single array is accepted too);
    block_mapping: int64 ``[n, 2]`` of (src, dst) block ids (or a list of pairs). For every
    cache, block dst becomes a copy of block src, pair by pair in order.

    Every id is checked against every cache before any copy. Raises ValueError (an id out
    of range, shapes) or TypeError (block_mapping not int64); the caches are then untouched.
    """
    ks = list(k_caches) if isinstance(k_caches, (list, tuple)) else [k_caches]
    vs = list(v_caches) if isinstance(v_caches, (list, tuple)) else [v_caches]
    caches = ks + vs
    stream = _stream_of(caches[0], stream) if caches else stream
    _C.copy_blocks(caches, _index(block_mapping), stream=stream)


def swap_blocks(src_cache: Any, dst_cache: Any, block_mapping: Any, *, stream: Optional[int] = None) -> None:
    """Copy whole blocks from one cache to another (swap out to / in from host memory).

    src_cache ``[num_src_blocks, ...]`` and dst_cache ``[num_dst_blocks, ...]`` share the
    block shape and dtype and may live on different devices (host <-> host on the CPU
    backend; a CUDA side is copied by the CUDA backend). block_mapping: int64 ``[n, 2]``
    (src block, dst block) in host memory (or a list of pairs).

    Every id is checked before any copy. Raises ValueError or TypeError; dst is then
    untouched.
    """
    if stream is None:
        stream = _stream_of(dst_cache if describe(dst_cache, "dst")[2] == "cuda" else src_cache, None)
    src_cache = library_of(src_cache).prepare(src_cache)
    _C.swap_blocks(src_cache, dst_cache, _index(block_mapping), stream=stream)
