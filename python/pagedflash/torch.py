"""pagedflash.torch: differentiable pagedflash attention for PyTorch.

The C forward and backward are registered as PyTorch custom operators with
``torch.library.custom_op``, each with a fake (meta) implementation, and joined
with ``register_autograd``, so they work under autograd, ``torch.compile``
(``fullgraph=True``: no graph breaks) and ``torch.library.opcheck``:

    torch.ops.pagedflash.flash_attn_fwd(q, k, v, <options>)                      -> (out, lse)
    torch.ops.pagedflash.flash_attn_bwd(dout, q, k, v, out, lse, <options>)      -> (dq, dk, dv)
    torch.ops.pagedflash.flash_attn_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                               max_seqlen_q, max_seqlen_k, <options>)
    torch.ops.pagedflash.flash_attn_varlen_bwd(dout, q, k, v, out, lse, cu_seqlens_q,
                                               cu_seqlens_k, max_seqlen_q, max_seqlen_k, <options>)

    <options> = softmax_scale (None = 1/sqrt(head_dim)), causal, window_left, window_right,
                softcap, alibi_slopes, dropout_p, seed (int64 scalar tensor or None), offset,
                deterministic=False (used by the backward: bitwise-reproducible dq on CUDA)

Use the wrappers :func:`flash_attn` and :func:`flash_attn_varlen`.

Dropout seeds: with ``dropout_p > 0`` and ``seed=None`` each call draws a fresh seed
from torch's default CPU generator (``torch.manual_seed`` makes a run reproducible,
and the draw is traced by ``torch.compile``); the forward saves it and the backward
regenerates exactly the same mask from it.

``lse`` (``return_lse=True``) is a non-differentiable output: no gradient flows
through it. Double backward is not supported.

Importing this module imports torch; ``import pagedflash`` alone never does.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from . import api as _api

__all__ = ["flash_attn", "flash_attn_varlen"]

_U64 = 0xFFFFFFFFFFFFFFFF


# ---------------------------------------------------------------------------
# helpers shared by the operator implementations
# ---------------------------------------------------------------------------


def _empty(x: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor with x's shape, dtype and device (what the kernels return)."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _seed_int(seed: Optional[torch.Tensor]) -> int:
    return 0 if seed is None else int(seed.item()) & _U64


def _check_seed(dropout_p: float, seed: Optional[torch.Tensor]) -> None:
    if dropout_p > 0.0 and seed is None:
        raise ValueError("seed: required with dropout_p > 0 (an int64 scalar tensor)")


# ---------------------------------------------------------------------------
# dense operators
# ---------------------------------------------------------------------------


@torch.library.custom_op("pagedflash::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: Optional[float],
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    alibi_slopes: Optional[torch.Tensor],
    dropout_p: float,
    seed: Optional[torch.Tensor],
    offset: int,
    deterministic: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """q [b, sq, h, d], k/v [b, sk, hk, d] -> (out [b, sq, h, d], lse float32 [b, h, sq]).
    deterministic is not used here: it is saved for the backward."""
    _check_seed(dropout_p, seed)
    return _api._attn_fwd(
        q, k, v, None, None, 0, 0, softmax_scale, causal, (window_left, window_right), softcap, alibi_slopes,
        dropout_p, _seed_int(seed), offset, True, None, None, "auto",
    )  # fmt: skip


@_flash_attn_fwd.register_fake
def _(
    q, k, v, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, dropout_p, seed, offset,
    deterministic=False,
):  # fmt: skip
    return _empty(q), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


@torch.library.custom_op("pagedflash::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    softmax_scale: Optional[float],
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    alibi_slopes: Optional[torch.Tensor],
    dropout_p: float,
    seed: Optional[torch.Tensor],
    offset: int,
    deterministic: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of flash_attn_fwd, given its out and lse."""
    _check_seed(dropout_p, seed)
    return _api._attn_bwd(
        dout, q, k, v, out, lse, None, None, None, None, None, 0, 0, softmax_scale, causal,
        (window_left, window_right), softcap, alibi_slopes, dropout_p, _seed_int(seed), offset, deterministic, None,
        "auto",
    )  # fmt: skip


@_flash_attn_bwd.register_fake
def _(
    dout,
    q,
    k,
    v,
    out,
    lse,
    softmax_scale,
    causal,
    window_left,
    window_right,
    softcap,
    alibi_slopes,
    dropout_p,
    seed,
    offset,
    deterministic=False,
):
    return _empty(q), _empty(k), _empty(v)


def _deterministic(inputs, n: int) -> bool:
    """The trailing deterministic option of an operator's inputs (n: the count without it), which the
    setup contexts keep in ctx.deterministic for the backward."""
    return bool(inputs[n]) if len(inputs) > n else False


def _fwd_setup_context(ctx, inputs, output):
    (q, k, v, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, dropout_p, seed, offset) = (
        inputs[:12]
    )
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, alibi_slopes, seed)
    ctx.options = (softmax_scale, causal, window_left, window_right, softcap, dropout_p, offset)
    ctx.deterministic = _deterministic(inputs, 12)
    ctx.mark_non_differentiable(lse)


def _fwd_backward(ctx, dout, dlse):
    q, k, v, out, lse, alibi_slopes, seed = ctx.saved_tensors
    softmax_scale, causal, window_left, window_right, softcap, dropout_p, offset = ctx.options
    dq, dk, dv = _flash_attn_bwd(
        dout,
        q,
        k,
        v,
        out,
        lse,
        softmax_scale,
        causal,
        window_left,
        window_right,
        softcap,
        alibi_slopes,
        dropout_p,
        seed,
        offset,
        ctx.deterministic,
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


_flash_attn_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


# ---------------------------------------------------------------------------
# packed variable-length operators
# ---------------------------------------------------------------------------


@torch.library.custom_op("pagedflash::flash_attn_varlen_fwd", mutates_args=())
def _flash_attn_varlen_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: Optional[float],
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    alibi_slopes: Optional[torch.Tensor],
    dropout_p: float,
    seed: Optional[torch.Tensor],
    offset: int,
    deterministic: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """q [total_q, h, d], k/v [total_k, hk, d] -> (out [total_q, h, d], lse float32 [h, total_q]).
    deterministic is not used here: it is saved for the backward."""
    _check_seed(dropout_p, seed)
    return _api._attn_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
        (window_left, window_right), softcap, alibi_slopes, dropout_p, _seed_int(seed), offset, True, None, None,
        "auto",
    )  # fmt: skip


@_flash_attn_varlen_fwd.register_fake
def _(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    softmax_scale,
    causal,
    window_left,
    window_right,
    softcap,
    alibi_slopes,
    dropout_p,
    seed,
    offset,
    deterministic=False,
):
    return _empty(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("pagedflash::flash_attn_varlen_bwd", mutates_args=())
def _flash_attn_varlen_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: Optional[float],
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    alibi_slopes: Optional[torch.Tensor],
    dropout_p: float,
    seed: Optional[torch.Tensor],
    offset: int,
    deterministic: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of flash_attn_varlen_fwd, given its out and lse."""
    _check_seed(dropout_p, seed)
    return _api._attn_bwd(
        dout, q, k, v, out, lse, None, None, None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        softmax_scale, causal, (window_left, window_right), softcap, alibi_slopes, dropout_p, _seed_int(seed), offset,
        deterministic, None, "auto",
    )  # fmt: skip


@_flash_attn_varlen_bwd.register_fake
def _(
    dout,
    q,
    k,
    v,
    out,
    lse,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    softmax_scale,
    causal,
    window_left,
    window_right,
    softcap,
    alibi_slopes,
    dropout_p,
    seed,
    offset,
    deterministic=False,
):
    return _empty(q), _empty(k), _empty(v)


def _varlen_setup_context(ctx, inputs, output):
    (
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale,
        causal,
        window_left,
        window_right,
        softcap,
        alibi_slopes,
        dropout_p,
        seed,
        offset,
    ) = inputs[:16]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, seed)
    ctx.options = (
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale,
        causal,
        window_left,
        window_right,
        softcap,
        dropout_p,
        offset,
    )
    ctx.deterministic = _deterministic(inputs, 16)
    ctx.mark_non_differentiable(lse)


def _varlen_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, seed = ctx.saved_tensors
    (max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right, softcap, dropout_p, offset) = (
        ctx.options
    )
    dq, dk, dv = _flash_attn_varlen_bwd(
        dout,
        q,
        k,
        v,
        out,
        lse,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale,
        causal,
        window_left,
        window_right,
        softcap,
        alibi_slopes,
        dropout_p,
        seed,
        offset,
        ctx.deterministic,
    )
    return (dq, dk, dv) + (None,) * 14


_flash_attn_varlen_fwd.register_autograd(_varlen_backward, setup_context=_varlen_setup_context)


# ---------------------------------------------------------------------------
# differentiable wrappers
# ---------------------------------------------------------------------------


def _seed_tensor(dropout_p: float, seed: Optional[int]) -> Optional[torch.Tensor]:
    if not dropout_p > 0.0:
        return None
    if seed is None:
        # a fresh draw from torch's default generator, traced by torch.compile
        return torch.randint(0, 2**62, (), dtype=torch.int64)
    if isinstance(seed, torch.Tensor):
        return seed.reshape(()).to(device="cpu", dtype=torch.int64)
    s = int(seed) & _U64
    return torch.tensor(s - (1 << 64) if s >= 1 << 63 else s, dtype=torch.int64)


def _window(window: Sequence[int]) -> Tuple[int, int]:
    if len(window) != 2:
        raise ValueError(f"window: expected a pair (left, right) of ints, got {window!r}")
    return int(window[0]), int(window[1])


class _FlashAttn(torch.autograd.Function):
    """The eager path of flash_attn / flash_attn_varlen: the same C calls as the custom operators,
    without the dispatcher's per-call cost (custom_op's Python dispatch and its autograd
    wrapper cost tens of microseconds per call). torch.compile traces the custom operators
    instead (flash_attn below picks)."""

    @staticmethod
    def forward(
        ctx, q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, window, softcap, alibi, dropout_p, seed, offset,
        deterministic,
    ):  # fmt: skip
        out, lse = _api._attn_fwd(
            q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, window, softcap, alibi, dropout_p, seed, offset, True,
            None, None, "auto",
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, alibi)
        ctx.options = (max_q, max_k, scale, causal, window, softcap, dropout_p, seed, offset, deterministic)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, cu_q, cu_k, alibi = ctx.saved_tensors
        max_q, max_k, scale, causal, window, softcap, dropout_p, seed, offset, deterministic = ctx.options
        dq, dk, dv = _api._attn_bwd(
            dout, q, k, v, out, lse, None, None, None, cu_q, cu_k, max_q, max_k, scale, causal, window, softcap, alibi,
            dropout_p, seed, offset, deterministic, None, "auto",
        )  # fmt: skip
        return (dq, dk, dv) + (None,) * 13


def _eager_seed(dropout_p: float, seed) -> int:
    """The dropout seed of an eager call as an int: drawn from torch's generator when None."""
    if not dropout_p > 0.0:
        return 0
    t = _seed_tensor(dropout_p, seed)
    return int(t.item()) & _U64 if t is not None else 0


def flash_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    window: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    seed=None,
    offset: int = 0,
    return_lse: bool = False,
    deterministic: bool = False,
):
    """Differentiable flash attention (pagedflash.flash_attn semantics) on torch tensors.

    q [batch, seqlen_q, num_heads, head_dim]; k, v [batch, seqlen_k, num_kv_heads, head_dim].
    Options as in pagedflash.flash_attn. seed: an int, an int64 scalar tensor, or None
    (with dropout_p > 0: a fresh draw from torch's generator per call). Returns out, or
    (out, lse) with return_lse=True (lse float32 [batch, num_heads, seqlen_q], not
    differentiable). Gradients reach q, k and v. Works under torch.compile(fullgraph=True).
    deterministic: the backward's option (pagedflash.flash_attn_backward): bitwise-reproducible
    dq on CUDA; the CPU backward is always deterministic.
    """
    if not torch.compiler.is_compiling():
        out, lse = _FlashAttn.apply(
            q, k, v, None, None, 0, 0, softmax_scale, causal, window, softcap, alibi_slopes, dropout_p,
            _eager_seed(dropout_p, seed), offset, bool(deterministic),
        )  # fmt: skip
        return (out, lse) if return_lse else out
    left, right = _window(window)
    out, lse = torch.ops.pagedflash.flash_attn_fwd(
        q,
        k,
        v,
        None if softmax_scale is None else float(softmax_scale),
        bool(causal),
        left,
        right,
        float(softcap),
        alibi_slopes,
        float(dropout_p),
        _seed_tensor(dropout_p, seed),
        int(offset),
        bool(deterministic),
    )
    return (out, lse) if return_lse else out


def flash_attn_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    window: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    seed=None,
    offset: int = 0,
    return_lse: bool = False,
    deterministic: bool = False,
):
    """Differentiable flash attention over packed variable-length sequences.

    q [total_q, num_heads, head_dim]; k, v [total_k, num_kv_heads, head_dim];
    cu_seqlens_q/k int32 [batch + 1] (on q's device). Returns out, or (out, lse) with
    lse float32 [num_heads, total_q]. Otherwise as flash_attn.
    """
    if not torch.compiler.is_compiling():
        out, lse = _FlashAttn.apply(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window, softcap,
            alibi_slopes, dropout_p, _eager_seed(dropout_p, seed), offset, bool(deterministic),
        )  # fmt: skip
        return (out, lse) if return_lse else out
    left, right = _window(window)
    out, lse = torch.ops.pagedflash.flash_attn_varlen_fwd(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        int(max_seqlen_q),
        int(max_seqlen_k),
        None if softmax_scale is None else float(softmax_scale),
        bool(causal),
        left,
        right,
        float(softcap),
        alibi_slopes,
        float(dropout_p),
        _seed_tensor(dropout_p, seed),
        int(offset),
        bool(deterministic),
    )
    return (out, lse) if return_lse else out
