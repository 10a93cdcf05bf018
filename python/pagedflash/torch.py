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

Serving (no autograd; docs/serving.md): :func:`paged_attn`, :func:`flash_attn_inference` (the
plain forward), :func:`merge_attn_states`, :func:`write_kv_cache` and :func:`copy_blocks` call
the plain functions in eager mode and, under torch.compile, the operators

    torch.ops.pagedflash.paged_attn(<paged inputs>, return_lse, kernel)             -> (out, lse)
    torch.ops.pagedflash.paged_attn_out(<paged inputs>, kernel, out!, lse!?)
    torch.ops.pagedflash.flash_attn_inference(<flash inputs>, return_lse, kernel)   -> (out, lse)
    torch.ops.pagedflash.flash_attn_inference_out(<flash inputs>, kernel, out!, lse!?)
    torch.ops.pagedflash.merge_attn_states(out_a, lse_a, out_b, lse_b)              -> (out, lse)
    torch.ops.pagedflash.merge_attn_states_out(out_a, lse_a, out_b, lse_b, out!, out_lse!)
    torch.ops.pagedflash.write_kv_cache(k, v, k_cache!, v_cache!, slot_mapping)
    torch.ops.pagedflash.copy_blocks(k_caches![], v_caches![], block_mapping)

(! = declared mutated; the inputs are spelled out in _FLASH_INPUTS and _PAGED_INPUTS; lse is
float32 [0] from a functional operator called without return_lse).

Dropout seeds: with ``dropout_p > 0`` and ``seed=None`` each call draws a fresh seed
from torch's default CPU generator (``torch.manual_seed`` makes a run reproducible,
and the draw is traced by ``torch.compile``); the forward saves it and the backward
regenerates exactly the same mask from it.

``lse`` (``return_lse=True``) is a non-differentiable output: no gradient flows
through it. Double backward is not supported.

Importing this module imports torch; ``import pagedflash`` alone never does.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from . import api as _api
from . import paged as _paged

__all__ = [
    "flash_attn",
    "flash_attn_varlen",
    "flash_attn_inference",
    "paged_attn",
    "merge_attn_states",
    "write_kv_cache",
    "copy_blocks",
]

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


# ---------------------------------------------------------------------------
# serving operators: no autograd; a functional form and an out= form (mutating) each
# ---------------------------------------------------------------------------
#
# A custom operator cannot return (an alias of) an argument, so each call with out= has its own
# operator that writes `out` (and `lse`) and returns nothing, declared with mutates_args: the
# functionalization of torch.compile then knows what is written. The caches of write_kv_cache
# and copy_blocks are declared the same way. The two attention calls share one registration
# (_attention_ops), from their inputs in torch's schema language and their plain call.

_FLASH_INPUTS = (
    "Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
    "float? softmax_scale, bool causal, int window_left, int window_right, float softcap, Tensor? alibi_slopes"
)
_PAGED_INPUTS = (
    "Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, Tensor? cu_seqlens_q, "
    "float? softmax_scale, bool causal, int window_left, int window_right, float softcap, Tensor? alibi_slopes, "
    "int num_splits"
)


def _flash_call(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, left, right, softcap, alibi, lse, out, kernel):
    """pagedflash.flash_attn(_varlen) without dropout; lse False, True or an array to write."""
    return _api._attn_fwd(
        q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, (left, right), softcap, alibi, 0.0, None, 0, lse, out, None,
        kernel,
    )  # fmt: skip


def _flash_lse_shape(q, k, v, cu_q, cu_k, *options) -> Tuple[int, ...]:
    """flash_attn's lse: [batch, num_heads, seqlen_q], packed [num_heads, total_q]."""
    return _api._lse_shape(tuple(q.shape), cu_q is not None or cu_k is not None)


def _paged_call(q, k_cache, v_cache, tables, lens, cu_q, scale, causal, left, right, softcap, alibi, splits, lse, out,
                kernel):  # fmt: skip
    """pagedflash.paged_attn; lse False, True or an array to write."""
    return _paged._paged_attn(
        q, k_cache, v_cache, tables, lens, cu_q, scale, causal, (left, right), softcap, alibi, splits, lse, out, None,
        kernel,
    )  # fmt: skip


def _paged_lse_shape(q, k_cache, v_cache, tables, lens, cu_q, *options) -> Tuple[int, ...]:
    """paged_attn's lse: [num_heads, total_q]."""
    return q.shape[-2], q.shape[0] * q.shape[1] if q.dim() == 4 and cu_q is None else q.shape[0]


def _lse_placeholder(like: torch.Tensor) -> torch.Tensor:
    """The lse of a functional attention operator called without return_lse: float32 [0]."""
    return torch.empty((0,), dtype=torch.float32, device=like.device)


def _attention_ops(name: str, inputs: str, call, lse_shape):
    """Registers pagedflash::<name>(<inputs>, bool return_lse, str kernel) -> (out, lse), with lse
    float32 [0] unless return_lse, and pagedflash::<name>_out(<inputs>, str kernel, Tensor(a!) out,
    Tensor(b!)? lse) -> (), which writes out and, when given, lse; each with its fake. call(*inputs,
    lse, out, kernel) is the plain call; lse_shape(*inputs) the shape of lse."""

    def functional(*args):
        *ins, return_lse, kernel = args
        r = call(*ins, return_lse, None, kernel)
        return r if return_lse else (r, _lse_placeholder(ins[0]))

    def fake(*args):
        *ins, return_lse, kernel = args
        q = ins[0]
        return _empty(q), q.new_empty(lse_shape(*ins), dtype=torch.float32) if return_lse else _lse_placeholder(q)

    def write(*args):
        *ins, kernel, out, lse = args
        call(*ins, False if lse is None else lse, out, kernel)

    op = torch.library.custom_op(
        f"pagedflash::{name}", functional, mutates_args=(),
        schema=f"({inputs}, bool return_lse, str kernel) -> (Tensor, Tensor)",
    )  # fmt: skip
    op.register_fake(fake)
    op_out = torch.library.custom_op(
        f"pagedflash::{name}_out", write, mutates_args=("out", "lse"),
        schema=f"({inputs}, str kernel, Tensor(a!) out, Tensor(b!)? lse) -> ()",
    )  # fmt: skip
    op_out.register_fake(lambda *args: None)
    return op, op_out


_FLASH_OPS = _attention_ops("flash_attn_inference", _FLASH_INPUTS, _flash_call, _flash_lse_shape)
_PAGED_OPS = _attention_ops("paged_attn", _PAGED_INPUTS, _paged_call, _paged_lse_shape)


def _compiled_attention(ops, lse_shape, inputs, return_lse, out, kernel):
    """An attention call under torch.compile: the functional operator, or with out= the _out one
    (lse allocated here when asked for). Returns out or (out, lse), as the plain call."""
    if out is None:
        o, lse = ops[0](*inputs, bool(return_lse), kernel)
        return (o, lse) if return_lse else o
    lse = inputs[0].new_empty(lse_shape(*inputs), dtype=torch.float32) if return_lse else None
    ops[1](*inputs, kernel, out, lse)
    return (out, lse) if return_lse else out


@torch.library.custom_op("pagedflash::merge_attn_states", mutates_args=())
def _merge_attn_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """pagedflash.merge_attn_states -> (out, lse), lse in lse_a's layout."""
    return _paged.merge_attn_states(out_a, lse_a, out_b, lse_b)


@_merge_attn_states.register_fake
def _(out_a, lse_a, out_b, lse_b):
    return _empty(out_a), _empty(lse_a)


@torch.library.custom_op("pagedflash::merge_attn_states_out", mutates_args=("out", "out_lse"))
def _merge_attn_states_out(
    out_a: torch.Tensor,
    lse_a: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
    out: torch.Tensor,
    out_lse: torch.Tensor,
) -> None:
    """merge_attn_states writing out and out_lse (which may be out_a / lse_a: in place)."""
    _paged.merge_attn_states(out_a, lse_a, out_b, lse_b, out=out, out_lse=out_lse)


@_merge_attn_states_out.register_fake
def _(*args):
    return None


@torch.library.custom_op("pagedflash::write_kv_cache", mutates_args=("k_cache", "v_cache"))
def _write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """pagedflash.write_kv_cache: the caches are written in place."""
    _paged.write_kv_cache(k, v, k_cache, v_cache, slot_mapping)


@_write_kv_cache.register_fake
def _(*args):
    return None


@torch.library.custom_op("pagedflash::copy_blocks", mutates_args=("k_caches", "v_caches"))
def _copy_blocks(k_caches: List[torch.Tensor], v_caches: List[torch.Tensor], block_mapping: torch.Tensor) -> None:
    """pagedflash.copy_blocks: every cache written in place."""
    _paged.copy_blocks(k_caches, v_caches, block_mapping)


@_copy_blocks.register_fake
def _(*args):
    return None


# ---------------------------------------------------------------------------
# serving wrappers: the plain functions in eager mode, the operators under torch.compile
# ---------------------------------------------------------------------------


def _scale(softmax_scale: Optional[float]) -> Optional[float]:
    return None if softmax_scale is None else float(softmax_scale)


def flash_attn_inference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    window: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    out: Optional[torch.Tensor] = None,
    kernel: str = "auto",
):
    """The plain flash forward (no autograd, no dropout), compiling without graph breaks.

    Dense q [batch, seqlen_q, num_heads, head_dim], k/v [batch, seqlen_k, num_kv_heads, head_dim]
    (lse [batch, num_heads, seqlen_q]), or packed with cu_seqlens_q/k as in
    pagedflash.flash_attn_varlen (lse [num_heads, total_q]). Options, out= and kernel= as in
    pagedflash.flash_attn. Returns out, or (out, lse). No gradient flows (the operator has no
    autograd formula: backward through it raises); pagedflash.torch.flash_attn is the
    differentiable one. Eager calls go straight to pagedflash.flash_attn; under torch.compile
    this is torch.ops.pagedflash.flash_attn_inference (flash_attn_inference_out with out=).
    """
    if not torch.compiler.is_compiling():
        max_q, max_k = _api._varlen_args(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        return _api._attn_fwd(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, softmax_scale, causal, window, softcap, alibi_slopes,
            0.0, None, 0, bool(return_lse), out, None, kernel,
        )  # fmt: skip
    left, right = _window(window)
    inputs = (q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), _scale(softmax_scale),
              bool(causal), left, right, float(softcap), alibi_slopes)  # fmt: skip
    return _compiled_attention(_FLASH_OPS, _flash_lse_shape, inputs, return_lse, out, kernel)


def paged_attn(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    window: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    num_splits: int = 0,
    return_lse: bool = False,
    out: Optional[torch.Tensor] = None,
    kernel: str = "auto",
):
    """pagedflash.paged_attn, compiling without graph breaks (torch.ops.pagedflash.paged_attn,
    paged_attn_out with out=). Shapes, options and results as there; no autograd."""
    if not torch.compiler.is_compiling():
        return _paged._paged_attn(
            q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, softmax_scale, causal, window, softcap,
            alibi_slopes, num_splits, bool(return_lse), out, None, kernel,
        )  # fmt: skip
    left, right = _window(window)
    inputs = (q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, _scale(softmax_scale), bool(causal), left,
              right, float(softcap), alibi_slopes, int(num_splits))  # fmt: skip
    return _compiled_attention(_PAGED_OPS, _paged_lse_shape, inputs, return_lse, out, kernel)


def merge_attn_states(
    out_a: torch.Tensor,
    lse_a: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
    *,
    out: Optional[torch.Tensor] = None,
    out_lse: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """pagedflash.merge_attn_states, compiling without graph breaks
    (torch.ops.pagedflash.merge_attn_states, merge_attn_states_out with out= / out_lse=).
    lse in either layout ([num_heads, tokens], or flash_attn's [batch, num_heads, seqlen]);
    returns (out, lse), lse in lse_a's layout."""
    if not torch.compiler.is_compiling():
        return _paged.merge_attn_states(out_a, lse_a, out_b, lse_b, out=out, out_lse=out_lse)
    if out is None and out_lse is None:
        return torch.ops.pagedflash.merge_attn_states(out_a, lse_a, out_b, lse_b)
    out = _empty(out_a) if out is None else out
    out_lse = _empty(lse_a) if out_lse is None else out_lse
    torch.ops.pagedflash.merge_attn_states_out(out_a, lse_a, out_b, lse_b, out, out_lse)
    return out, out_lse


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """pagedflash.write_kv_cache (the caches written in place), compiling without graph breaks
    (torch.ops.pagedflash.write_kv_cache, which declares k_cache and v_cache mutated)."""
    if not torch.compiler.is_compiling():
        _paged.write_kv_cache(k, v, k_cache, v_cache, slot_mapping)
    else:
        torch.ops.pagedflash.write_kv_cache(k, v, k_cache, v_cache, slot_mapping)


def copy_blocks(k_caches, v_caches, block_mapping) -> None:
    """pagedflash.copy_blocks (every layer's caches written in place), compiling without graph
    breaks (torch.ops.pagedflash.copy_blocks, which declares the caches mutated). k_caches,
    v_caches: lists of caches (or one cache each); block_mapping: int64 [n, 2] or a list of
    (src, dst) pairs."""
    if not torch.compiler.is_compiling():
        _paged.copy_blocks(k_caches, v_caches, block_mapping)
        return
    ks = list(k_caches) if isinstance(k_caches, (list, tuple)) else [k_caches]
    vs = list(v_caches) if isinstance(v_caches, (list, tuple)) else [v_caches]
    if not isinstance(block_mapping, torch.Tensor):
        block_mapping = torch.tensor(block_mapping, dtype=torch.int64).reshape(-1, 2)
    torch.ops.pagedflash.copy_blocks(ks, vs, block_mapping)
