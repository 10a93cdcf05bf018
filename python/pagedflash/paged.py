"""Serving operations: paged attention (with flash decoding), the merge of
partial attention states, and the KV-cache operations.

The KV cache of one layer is a pair ``k_cache``, ``v_cache`` of shape
``[num_blocks, block_size, num_kv_heads, head_dim]``; a sequence's token ``t``
lives in block ``block_tables[b, t // block_size]`` at offset ``t % block_size``.
See docs/serving.md for the layouts and semantics.

Compressed caches (float8_e4m3fn, float8_e5m2, int8 codes with float32 scales ``k_scale`` /
``v_scale``; docs/serving.md "Compressed KV caches") are quantized by :func:`write_kv_cache` and
dequantized by :func:`paged_attn`; :func:`copy_blocks` and :func:`swap_blocks` move per-(token,
head) scales with their blocks.

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
from .reference import KV_CACHE_DTYPES, kv_cache_dtype_name

_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1, "int8": 1}


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


def _scale(x: Any) -> Any:
    """A scale argument: None, an array, or a Python number (a float32 per-tensor scale)."""
    if x is None or isinstance(x, bool):
        return x
    if isinstance(x, (float, int, np.floating, np.integer)):
        return np.asarray(x, dtype=np.float32)
    return x


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
    k_scale: Any = None,
    v_scale: Any = None,
    kv_cache_dtype: str = "auto",
):
    """Attention of each sequence's queries over the tokens it holds in a paged KV cache.

    q: ``[batch, num_heads, head_dim]`` (one query per sequence: decode),
    ``[batch, q_len, num_heads, head_dim]`` (q_len queries per sequence), or packed
    ``[total_q, num_heads, head_dim]`` with ``cu_seqlens_q`` int32 ``[batch + 1]``
    (sequence b owns queries ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``; chunked prefill,
    speculative verification, mixed batches).
    k_cache, v_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``, q's dtype
    (float16, bfloat16, float32) or compressed: float8_e4m3fn, float8_e5m2 or int8 codes,
    read as ``code * scale`` in float32 (k_scale, v_scale: float32 per-tensor ``[]`` / ``[1]``
    or a Python number, absent = 1 for float8; int8 also per (token, KV head)
    ``[num_blocks, block_size, num_kv_heads]``; see docs/serving.md). kv_cache_dtype: "auto"
    (the caches' dtype), or vLLM's names "fp8" / "fp8_e4m3", "fp8_e5m2", "int8" to read raw
    uint8 / int8 caches as those codes. block_size 1..256; head_dim 1..256;
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
    with q, a scale of the wrong shape or value), TypeError (dtypes, e.g. block_tables not
    int32, a scale for a float cache), NotImplementedError (a device this build lacks; a
    compressed cache on CUDA, which does not read them yet).
    """
    return _paged_attn(
        q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, softmax_scale, causal, window, softcap,
        alibi_slopes, num_splits, bool(return_lse), out, stream, kernel, _scale(k_scale), _scale(v_scale),
        kv_cache_dtype,
    )  # fmt: skip


def _paged_attn(
    q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, softmax_scale, causal, window, softcap, alibi_slopes,
    num_splits, lse, out, stream, kernel, k_scale=None, v_scale=None, kv_cache_dtype="auto",
):  # fmt: skip
    """paged_attn's call (also pagedflash.torch's). lse: False (out only), True ((out, lse), lse
    allocated) or an array to write ((out, lse)); k_scale / v_scale already through _scale."""
    r = _C.paged_attn(
        q, k_cache, v_cache, block_tables, seq_lens, out, lse, cu_seqlens_q, softmax_scale, causal, window, softcap,
        alibi_slopes, num_splits, stream, kernel, k_scale, v_scale, kv_cache_dtype,
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
        causal, window, softcap, alibi_slopes, num_splits, api._stream(lib, q, stream), kernel, k_scale, v_scale,
        kv_cache_dtype,
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
    k: Any,
    v: Any,
    k_cache: Any,
    v_cache: Any,
    slot_mapping: Any,
    *,
    k_scale: Any = None,
    v_scale: Any = None,
    kv_cache_dtype: str = "auto",
    stream: Optional[int] = None,
) -> None:
    """Write new tokens' keys and values into the paged cache, in place.

    k, v: ``[num_tokens, num_kv_heads, head_dim]``, the caches' dtype (any of float16,
    bfloat16, float32 for a compressed cache);
    k_cache, v_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``;
    slot_mapping: int64 ``[num_tokens]``, token t goes to slot
    ``slot_mapping[t] = block * block_size + offset``; a negative slot skips the token.

    Compressed caches (float8_e4m3fn, float8_e5m2, int8; kv_cache_dtype as in
    :func:`paged_attn`) are written quantized: ``code = x / scale`` rounded to nearest even,
    saturating (float8: to +-448 / +-57344; int8: to [-127, 127]). k_scale / v_scale:
    float32 per-tensor scales (``[]``, ``[1]`` or a Python number; absent = 1 for float8) are
    read; int8 per-(token, head) scales ``[num_blocks, block_size, num_kv_heads]`` are written,
    each token's row getting ``max|x| / 127`` (1 for an all-zero row). k and v must be finite.

    Every slot (and value, for a compressed cache) is checked before anything is written.
    Raises ValueError (shapes, a slot >= num_blocks * block_size, a cache with a strided last
    dimension, a NaN/inf value or a bad scale for a compressed cache) or TypeError (dtypes,
    e.g. slot_mapping not int64, a scale for a float cache); the caches are then untouched.
    """
    k_scale, v_scale = _scale(k_scale), _scale(v_scale)
    args = (k_scale, v_scale, kv_cache_dtype)
    if _C.write_kv_cache(k, v, k_cache, v_cache, slot_mapping, stream, *args) is NotImplemented:
        lib = library_of(k_cache)
        k, v = library_of(k).prepare(k), library_of(v).prepare(v)
        slot_mapping = library_of(slot_mapping).prepare(slot_mapping)
        stream = api._stream(lib, k_cache, stream)
        _C.write_kv_cache(k, v, _in_place(k_cache), _in_place(v_cache), slot_mapping, stream, *args)


def _as_list(x: Any) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _check_scales(scales: list, caches: list, name: str) -> None:
    """Per-(token, head) scales for copy_blocks: one float32 [num_blocks, block_size, num_kv_heads]
    per cache (checked here, before the one C call that copies everything)."""
    if len(scales) != len(caches):
        raise ValueError(f"{name}: expected one scale per cache ({len(caches)}), got {len(scales)}")
    for i, (s, c) in enumerate(zip(scales, caches)):
        shape, dtype, _, _ = describe(s, f"{name}[{i}]")
        cshape = describe(c, "cache")[0]
        if dtype != "float32":
            raise TypeError(f"{name}[{i}]: expected dtype float32, got {dtype}")
        if tuple(shape) != tuple(cshape[:3]) or len(cshape) != 4:
            raise ValueError(
                f"{name}[{i}]: expected shape [num_blocks, block_size, num_kv_heads] = {list(cshape[:3])} "
                f"(its cache's), got {list(shape)}"
            )


def copy_blocks(
    k_caches: Sequence[Any],
    v_caches: Sequence[Any],
    block_mapping: Any,
    *,
    k_scales: Optional[Sequence[Any]] = None,
    v_scales: Optional[Sequence[Any]] = None,
    stream: Optional[int] = None,
) -> None:
    """Copy whole blocks within every layer's caches (copy-on-write), in place.

    k_caches, v_caches: sequences of caches (one per layer), each
    ``[num_blocks, block_size, num_kv_heads, head_dim]`` (a single array is accepted too);
    block_mapping: int64 ``[n, 2]`` of (src, dst) block ids (or a list of pairs). For every
    cache, block dst becomes a copy of block src, pair by pair in order. k_scales, v_scales:
    the per-(token, head) scales ``[num_blocks, block_size, num_kv_heads]`` of int8 caches, one
    per cache, copied with their blocks (per-tensor scales need no copy).

    Every id is checked against every cache before any copy. Raises ValueError (an id out
    of range, shapes) or TypeError (block_mapping not int64); the caches are then untouched.
    """
    ks, vs = _as_list(k_caches), _as_list(v_caches)
    caches = ks + vs
    for scales, cs, name in ((k_scales, ks, "k_scales"), (v_scales, vs, "v_scales")):
        if scales is not None:
            scales = _as_list(scales)
            _check_scales(scales, cs, name)
            caches += scales
    stream = _stream_of(caches[0], stream) if caches else stream
    _C.copy_blocks(caches, _index(block_mapping), stream=stream)


def swap_blocks(
    src_cache: Any,
    dst_cache: Any,
    block_mapping: Any,
    *,
    src_scale: Any = None,
    dst_scale: Any = None,
    stream: Optional[int] = None,
) -> None:
    """Copy whole blocks from one cache to another (swap out to / in from host memory).

    src_cache ``[num_src_blocks, ...]`` and dst_cache ``[num_dst_blocks, ...]`` share the
    block shape and dtype and may live on different devices (host <-> host on the CPU
    backend; a CUDA side is copied by the CUDA backend). block_mapping: int64 ``[n, 2]``
    (src block, dst block) in host memory (or a list of pairs). src_scale, dst_scale: the
    per-(token, head) scales ``[num_blocks, block_size, num_kv_heads]`` of int8 caches, on
    their cache's side, moved with the blocks (both or neither; per-tensor scales do not move:
    use the same on both sides).

    Everything is checked before any copy. Raises ValueError or TypeError; dst (and
    dst_scale) are then untouched.
    """
    if stream is None:
        stream = _stream_of(dst_cache if describe(dst_cache, "dst")[2] == "cuda" else src_cache, None)
    src_cache = library_of(src_cache).prepare(src_cache)
    src_scale, dst_scale = _scale(src_scale), _scale(dst_scale)
    _C.swap_blocks(src_cache, dst_cache, _index(block_mapping), src_scale=src_scale, dst_scale=dst_scale, stream=stream)


def kv_cache_bytes(
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: Any,
    *,
    num_layers: int = 1,
    row_scales: bool = False,
) -> int:
    """Bytes of ``num_blocks`` blocks of K and V caches ``[num_blocks, block_size, num_kv_heads,
    head_dim]`` in ``dtype`` over ``num_layers`` layers, with per-(token, head) float32 scales
    ``[num_blocks, block_size, num_kv_heads]`` beside each cache when ``row_scales`` (int8).
    Per-tensor scales (8 bytes a layer) are not counted. dtype: float32, float16, bfloat16,
    float8_e4m3fn, float8_e5m2, int8 (a name, vLLM's "fp8" / "fp8_e4m3" / "fp8_e5m2", or a NumPy /
    ml_dtypes / torch dtype). ``kv_cache_bytes(1, ...)`` is the ``bytes_per_block`` of a
    :class:`pagedflash.BlockManager`.
    """
    name = kv_cache_dtype_name(dtype)
    if name not in _ITEMSIZE:
        raise TypeError(f"dtype: expected one of {', '.join(_ITEMSIZE)}, got {name}")
    if row_scales and name not in KV_CACHE_DTYPES:
        raise ValueError(f"row_scales: per-(token, head) scales go with compressed caches, not {name}")
    per_row = head_dim * _ITEMSIZE[name] + (4 if row_scales else 0)
    return 2 * num_layers * num_blocks * block_size * num_kv_heads * per_row
