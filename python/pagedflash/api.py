"""The functional API: plain functions with keyword-only options.

Each function hands its arguments, in order, to ``pagedflash._C``, which does the
whole call for NumPy arrays, torch tensors (through the DLPack C exchange API) and
``pagedflash.Tensor``: views the arrays without copying, allocates missing results
in the caller's library, takes its current stream, releases the GIL while the C core
computes. For other producers (CuPy, JAX, ...) the binding answers NotImplemented and
the general path here allocates with ``_frameworks`` and calls it again.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Sequence
from typing import Any, Optional

from . import _C
from ._frameworks import allocate, describe, library_of, prepare

_MAX_THREADS = 2**31 - 1  # an int32 in the C API (the CPU backend uses at most 256 threads)


def _check_threads(n) -> int:
    if isinstance(n, bool) or not hasattr(n, "__index__"):
        raise TypeError(f"num_threads: expected an int, got {type(n).__name__}")
    n = n.__index__()
    if not 0 <= n <= _MAX_THREADS:
        raise ValueError(f"num_threads: must be in [0, 2**31 - 1] (0 = one per core), got {n}")
    return n


def set_num_threads(n: int) -> None:
    """Threads used by the CPU backend; 0 (the default) means one per core.

    Raises TypeError for a non-integer, ValueError outside [0, 2**31 - 1]; the setting then
    stays as it was."""
    _C.set_num_threads(_check_threads(n))


def get_num_threads() -> int:
    """Threads the CPU backend will use for the next call."""
    return _C.get_num_threads() or _C.build_info()["cpu_count"]


try:  # read once, at import (the library reads no environment variable on a call)
    set_num_threads(int(os.environ.get("PAGEDFLASH_NUM_THREADS", "0") or 0))
except (TypeError, ValueError):
    pass


def flash_attn(
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
    seed: Optional[int] = None,
    offset: int = 0,
    return_lse: bool = False,
    out: Any = None,
    stream: Optional[int] = None,
    kernel: str = "auto",
):
    """Exact softmax attention, computed tile by tile (FlashAttention).

    q: [batch, seqlen_q, num_heads, head_dim]; k, v: [batch, seqlen_k, num_kv_heads, head_dim],
    num_heads % num_kv_heads == 0. float16, bfloat16 or float32; head_dim 1..256.

    causal masks are aligned bottom-right when seqlen_q != seqlen_k; window=(left, right)
    (-1 = unbounded); softcap > 0 caps scores with softcap * tanh(s / softcap);
    alibi_slopes float32 [num_heads] or [batch, num_heads]; dropout_p with an explicit
    seed (and offset) reproduces the same mask in flash_attn_backward.

    Returns out (q's shape and dtype), or (out, lse) with return_lse=True, lse float32
    [batch, num_heads, seqlen_q] in natural log. A fully masked row gives out = 0 and
    lse = -inf. Results come back in the caller's library (NumPy, torch, or a
    pagedflash.Tensor for other DLPack producers).

    kernel: "auto" (the default: the backend picks) or, for tests and benchmarks, "sm80" /
    "sm90" to force the CUDA mma.sync / wgmma kernels (NotImplementedError where the named
    kernel cannot take the call). The CPU backend has one kernel and ignores the hint.
    """
    return _attn_fwd(
        q, k, v, None, None, 0, 0, softmax_scale, causal, window, softcap, alibi_slopes, dropout_p, seed, offset,
        bool(return_lse), out, stream, kernel,
    )  # fmt: skip


def flash_attn_varlen(
    q: Any,
    k: Any,
    v: Any,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    window: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Any = None,
    dropout_p: float = 0.0,
    seed: Optional[int] = None,
    offset: int = 0,
    return_lse: bool = False,
    out: Any = None,
    stream: Optional[int] = None,
    kernel: str = "auto",
):
    """flash_attn over packed variable-length sequences.

    q: [total_q, num_heads, head_dim]; k, v: [total_k, num_kv_heads, head_dim];
    cu_seqlens_q/k: int32 [batch + 1], prefix sums of the lengths (0 first, total last).
    Sequence b's queries are rows cu_seqlens_q[b]:cu_seqlens_q[b+1] and attend only to its
    own keys. lse is float32 [num_heads, total_q]. Options as in flash_attn.
    """
    return _attn_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window, softcap,
        alibi_slopes, dropout_p, seed, offset, bool(return_lse), out, stream, kernel,
    )  # fmt: skip


def _lse_shape(qshape, varlen: bool):
    return (qshape[1], qshape[0]) if varlen else (qshape[0], qshape[2], qshape[1])


def _attn_fwd(
    q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, window, softcap, alibi, dropout_p, seed, offset, lse, out,
    stream, kernel,
):  # fmt: skip
    """The forward call of every caller. lse: False (out only), True ((out, lse), lse allocated)
    or an array to write ((out, lse))."""
    r = _C.flash_fwd(
        q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal, window, softcap, alibi, dropout_p, seed, offset,
        False, stream, kernel,
    )  # fmt: skip
    if r is not NotImplemented:
        return r
    # the general path: a library only the Python layer allocates for (_frameworks.py)
    lib = library_of(q)
    q, k, v = prepare(q), prepare(k), prepare(v)
    qshape, qdtype, _, _ = describe(q, "q")
    varlen = cu_q is not None or cu_k is not None
    if out is None:
        out = allocate(lib, qshape, qdtype, q, "q")
    if lse is True:
        # a wrong rank is reported by _C
        lse = lib.empty(_lse_shape(qshape, varlen), "float32", q) if len(qshape) == (3 if varlen else 4) else None
    return _C.flash_fwd(
        q, k, v, out, None if lse is False else lse, cu_q, cu_k, max_q, max_k, scale, causal, window, softcap, alibi,
        dropout_p, seed, offset, False, _stream(lib, q, stream), kernel,
    )  # fmt: skip


def _stream(lib, like, stream) -> int:
    """The stream of the general path: given, or the library's current one, or 0 (the legacy
    default stream); never None, so the binding takes it as given."""
    s = lib.stream(like, stream)
    return 0 if s is None else s


# ---------------------------------------------------------------------------
# Backward pass and the dropout mask (training)
# ---------------------------------------------------------------------------


def _varlen_args(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        missing = "cu_seqlens_k" if cu_seqlens_k is None else "cu_seqlens_q"
        raise ValueError(f"{missing}: required when the other cu_seqlens is given (packed varlen layout)")
    return _int(max_seqlen_q or 0, "max_seqlen_q"), _int(max_seqlen_k or 0, "max_seqlen_k")


def _int(x, name: str) -> int:
    """An int option as an int (through __index__); TypeError / ValueError naming it (never
    OverflowError: the binding range-checks it)."""
    try:
        return operator.index(x)
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {type(x).__name__}") from None


def flash_attn_backward(
    dout: Any,
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    *,
    cu_seqlens_q: Any = None,
    cu_seqlens_k: Any = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    window: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Any = None,
    dropout_p: float = 0.0,
    seed: Optional[int] = None,
    offset: int = 0,
    deterministic: bool = False,
    dq: Any = None,
    dk: Any = None,
    dv: Any = None,
    stream: Optional[int] = None,
    kernel: str = "auto",
):
    """Gradients of flash_attn (or flash_attn_varlen) with respect to q, k and v.

    dout, out: q's shape and dtype; out and lse are what the forward returned
    (flash_attn(..., return_lse=True)). Dense: q [batch, seqlen_q, num_heads, head_dim],
    k/v [batch, seqlen_k, num_kv_heads, head_dim], lse float32 [batch, num_heads, seqlen_q].
    Packed varlen (pass cu_seqlens_q and cu_seqlens_k, int32 [batch + 1], as to
    flash_attn_varlen): q [total_q, num_heads, head_dim], k/v [total_k, num_kv_heads,
    head_dim], lse [num_heads, total_q]. The masking options (causal, softmax_scale,
    window, softcap, alibi_slopes, dropout_p, seed, offset) must be the forward's; with
    dropout_p > 0 the seed is required (the forward's seed: the mask is regenerated from it).

    P is recomputed tile by tile from q, k and lse; the score matrix is never stored.
    For GQA/MQA, dk/dv sum over the query heads that share a KV head. The CPU backend
    is always deterministic (bitwise-identical gradients for any thread count), so
    `deterministic` is accepted and has no further effect there. kernel: as in flash_attn.

    Returns (dq, dk, dv) with the shapes and dtype of q, k, v (written into dq/dk/dv when
    given). Raises ValueError / TypeError for bad shapes, dtypes or options (naming the
    argument); nothing is written then.
    """
    max_q, max_k = _varlen_args(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return _attn_bwd(
        dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_q, max_k, softmax_scale, causal, window,
        softcap, alibi_slopes, dropout_p, seed, offset, deterministic, stream, kernel,
    )  # fmt: skip


def _attn_bwd(
    dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k, scale, causal, window, softcap, alibi, dropout_p,
    seed, offset, deterministic, stream, kernel,
):  # fmt: skip
    r = _C.flash_bwd(
        dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k, scale, causal, window, softcap, alibi,
        dropout_p, seed, offset, deterministic, stream, kernel,
    )  # fmt: skip
    if r is not NotImplemented:
        return r
    # the general path, as in _attn_fwd
    lib = library_of(q)
    dout, q, k, v, out, lse = (prepare(x) for x in (dout, q, k, v, out, lse))
    qshape, qdtype, _, _ = describe(q, "q")
    if dq is None:
        dq = allocate(lib, qshape, qdtype, q, "q")
    if dk is None:
        dk = allocate(lib, describe(k, "k")[0], qdtype, q, "q")
    if dv is None:
        dv = allocate(lib, describe(v, "v")[0], qdtype, q, "q")
    return _C.flash_bwd(
        dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k, scale, causal, window, softcap, alibi,
        dropout_p, seed, offset, deterministic, _stream(lib, q, stream), kernel,
    )  # fmt: skip


def flash_attn_varlen_backward(
    dout: Any,
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    max_seqlen_q: int,
    max_seqlen_k: int,
    **options,
):
    """flash_attn_backward for the packed layout, with flash_attn_varlen's positional order.

    Same as flash_attn_backward(dout, q, k, v, out, lse, cu_seqlens_q=..., cu_seqlens_k=...,
    max_seqlen_q=..., max_seqlen_k=..., **options); lse is [num_heads, total_q].
    """
    return flash_attn_backward(
        dout,
        q,
        k,
        v,
        out,
        lse,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        **options,
    )


def dropout_mask(
    q: Any,
    k: Any,
    *,
    dropout_p: float,
    seed: int,
    offset: int = 0,
    cu_seqlens_q: Any = None,
    cu_seqlens_k: Any = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
):
    """The keep mask that flash_attn applies for (dropout_p, seed, offset); for tests.

    Dense q [batch, seqlen_q, num_heads, d], k [batch, seqlen_k, num_kv_heads, d]: returns
    uint8 [batch, num_heads, seqlen_q, seqlen_k], 1 = kept (scaled by 1 / (1 - dropout_p)),
    0 = dropped. Varlen (cu_seqlens_q/k given): uint8 [batch, num_heads, Sq, Sk] with
    Sq = max(max_seqlen_q, longest query sequence) and Sk likewise; entry [b, h, i, j]
    is for query i and key j of sequence b, and positions past a sequence's lengths are 0.
    The mask does not include causal/window masking (those entries have P = 0 anyway).
    """
    max_q, max_k = _varlen_args(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    lib = library_of(q)
    q, k = prepare(q), prepare(k)
    qshape = describe(q, "q")[0]
    kshape = describe(k, "k")[0]
    shape = (0, 0, 0, 0)  # what the C core then rejects, with the message for what is wrong
    if cu_seqlens_q is not None:
        lq = _longest(cu_seqlens_q, qshape[0] if len(qshape) == 3 else -1)
        lk = _longest(cu_seqlens_k, kshape[0] if len(kshape) == 3 else -1)
        if lq is not None and lk is not None:
            # the mask is sized by max_seqlen_q/k: no sequence is longer than all packed tokens, so
            # a larger one is refused before a mask of its size is allocated
            for name, longest, total in (("max_seqlen_q", max_q, qshape[0]), ("max_seqlen_k", max_k, kshape[0])):
                if longest > total:
                    raise ValueError(f"{name}: {longest} exceeds the {total} packed tokens (no sequence is longer)")
            shape = (_len(cu_seqlens_q, "cu_seqlens_q") - 1, qshape[1], max(lq, max_q), max(lk, max_k))
    elif len(qshape) == 4 and len(kshape) == 4:
        shape = (qshape[0], qshape[2], qshape[1], kshape[1])
    mask = allocate(lib, shape, "uint8", q, "mask")
    _C.dropout_mask(
        q, k, mask, cu_seqlens_q, cu_seqlens_k, max_q, max_k, None, False, None, 0.0, None, dropout_p, seed, offset,
        False, None, "auto",
    )  # fmt: skip
    return mask


def _len(x, name: str) -> int:
    return int(describe(x, name)[0][0])


def _longest(cu, total: int) -> Optional[int]:
    """The longest sequence of cu_seqlens `cu` when it is well formed (1-d, 0 first, non-decreasing,
    `total` last), else None (the C core then says what is wrong before anything is allocated)."""
    import numpy as np

    try:
        c = np.asarray(_host_ints(cu)).astype(np.int64)
    except (TypeError, ValueError, AttributeError, RuntimeError, BufferError):  # also the reader's errors
        return None
    if c.ndim != 1 or c.size < 1 or c[0] != 0 or c[-1] != total or (c.size > 1 and np.any(np.diff(c) < 0)):
        return None
    return int(np.max(np.diff(c))) if c.size > 1 else 0


def _host_ints(x):
    """A host copy of a small integer array from any library (for shape computation)."""
    if type(x).__module__.partition(".")[0] == "torch":
        return x.detach().cpu().numpy()
    import numpy as np

    if isinstance(x, np.ndarray):
        return x
    # every field the producer reports checked before NumPy reads them; NumPy only for host integers
    _, dtype, device, _ = describe(x, "cu_seqlens")
    if device != "cpu" or dtype not in ("int32", "int64"):
        raise ValueError("cu_seqlens: not host integers")  # the C core reports what is wrong
    return np.from_dlpack(x)
