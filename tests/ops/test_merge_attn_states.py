"""merge_attn_states on every backend: the merge of two attention results over disjoint key sets
(out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b, lse = logaddexp(lse_a, lse_b)), against
float64 under the rule of tests/conftest.py; a side with lse -inf is never read; in place; lse in
either layout ([num_heads, tokens], or flash_attn's [batch, num_heads, seqlen] for out [batch,
seqlen, num_heads, head_dim]), mixed, as strided views."""

from __future__ import annotations

import numpy as np
import pytest

import pagedflash
from conftest import DTYPES, as_np64, assert_close, cases, check_lse, naive_attention_lowp, poison_like, randn, torch
from pagedflash import reference


def _to_heads_tokens(lse):
    """flash_attn's lse [b, h, s] -> [h, b * s] (contiguous, the caller's library)."""
    if torch is not None and isinstance(lse, torch.Tensor):
        return lse.permute(1, 0, 2).reshape(lse.shape[1], -1).contiguous()
    return np.ascontiguousarray(lse.transpose(1, 0, 2).reshape(lse.shape[1], -1))


def _to_batch_heads(lse_ht, b, s):
    """[h, b * s] -> flash_attn's [b, h, s] (NumPy float64, for references)."""
    lse_ht = np.asarray(lse_ht)
    return lse_ht.reshape(lse_ht.shape[0], b, s).transpose(1, 0, 2)


def merge_ref(oa, la, ob, lb):
    """The merge in float64: (out [..., h, d], lse [h, tokens]); empty sides (lse -inf) weigh 0."""
    a, b = as_np64(oa), as_np64(ob)
    la, lb = as_np64(la), as_np64(lb)
    shape = a.shape
    a, b = a.reshape(-1, *shape[-2:]), b.reshape(-1, *shape[-2:])
    lse = np.logaddexp(la, lb)
    m = np.where(np.isfinite(lse), lse, 0.0)
    wa = np.where(np.isneginf(la), 0.0, np.exp(la - m)).T[..., None]
    wb = np.where(np.isneginf(lb), 0.0, np.exp(lb - m)).T[..., None]
    out = np.where(wa > 0, wa * np.nan_to_num(a, nan=0.0, posinf=0.0), 0.0) + np.where(
        wb > 0, wb * np.nan_to_num(b, nan=0.0, posinf=0.0), 0.0
    )
    return out.reshape(shape), lse


def merge_naive_lowp(oa, la, ob, lb):
    """The naive merge in the outputs' dtype (torch, CPU): float32 weights from the float32 lse,
    rounded to the dtype, multiplied and added in the dtype; an empty side (weight 0) adds 0."""
    a, b = oa.detach().cpu(), ob.detach().cpu()
    la, lb = la.detach().cpu().double(), lb.detach().cpu().double()
    lse = torch.logaddexp(la, lb)
    m = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    wa = torch.where(torch.isneginf(la), 0.0, torch.exp(la - m)).float().T[..., None].to(a.dtype)
    wb = torch.where(torch.isneginf(lb), 0.0, torch.exp(lb - m)).float().T[..., None].to(a.dtype)
    shape = a.shape
    zero = torch.zeros((), dtype=a.dtype)
    out = torch.where(wa > 0, wa * a.reshape(-1, *shape[-2:]), zero) + torch.where(
        wb > 0, wb * b.reshape(-1, *shape[-2:]), zero
    )
    return out.reshape(shape).double().numpy()


def _two_key_chunks(backend, rng, dtype, b=2, sq=7, sk=203, h=6, hk=2, d=40, cut=113):
    """q, k, v and flash_attn's (out, lse) over keys [0, cut) and over [cut, sk)."""
    q = backend.randn(rng, (b, sq, h, d), dtype)
    k = backend.randn(rng, (b, sk, hk, d), dtype)
    v = backend.randn(rng, (b, sk, hk, d), dtype)
    a = pagedflash.flash_attn(q, k[:, :cut], v[:, :cut], return_lse=True)
    return q, k, v, a, pagedflash.flash_attn(q, k[:, cut:], v[:, cut:], return_lse=True)


@cases("dtype", cpu=DTYPES, cuda=DTYPES)
def test_merge_two_key_sets(backend, rng, dtype):
    """Attention over keys [0, 113) and [113, 203), merged: the attention over all keys."""
    q, k, v, (oa, la), (ob, lb) = _two_key_chunks(backend, rng, dtype)
    h = q.shape[2]
    out, lse = pagedflash.merge_attn_states(oa, _to_heads_tokens(la), ob, _to_heads_tokens(lb), out=poison_like(oa))
    assert type(out) is type(q) and tuple(out.shape) == tuple(q.shape)
    ref, ref_lse = reference.attention(q, k, v, return_lse=True)
    naive = naive_attention_lowp(q, k, v) if dtype != "float32" else None
    assert_close(out, ref, naive, dtype=dtype)
    check_lse(lse, ref_lse.transpose(1, 0, 2).reshape(h, -1))


@cases("dtype", cpu=["float32", "bfloat16"], cuda=["float32", "bfloat16"])
def test_merge_random_states(backend, rng, dtype):
    """Leading dims (3, 5) -> 15 tokens, lse spread x3, some sides empty (lse -inf, their out NaN:
    never read), some rows empty on both sides (out 0, lse -inf); in place (out = out_a, lse =
    lse_a) gives the same bits."""
    shape = (3, 5, 4, 72)
    oa, ob = randn(rng, shape, dtype, lib="torch"), randn(rng, shape, dtype, lib="torch")
    la = torch.from_numpy(rng.standard_normal((4, 15)).astype(np.float32) * 3)
    lb = torch.from_numpy(rng.standard_normal((4, 15)).astype(np.float32) * 3)
    la[0, :3] = -np.inf
    lb[1, 2:6] = -np.inf
    la[2, 7] = lb[2, 7] = -np.inf
    oa.view(15, 4, 72)[:3, 0] = float("nan")
    ob.view(15, 4, 72)[2:6, 1] = float("nan")
    if backend.name == "cpu" and dtype == "float32":  # NumPy in, NumPy out
        oa, ob, la, lb = (x.numpy() for x in (oa, ob, la, lb))
    args = [backend.put(x) for x in (oa, la, ob, lb)]
    out, lse = pagedflash.merge_attn_states(*args)
    ref, ref_lse = merge_ref(oa, la, ob, lb)
    naive = None if dtype == "float32" else merge_naive_lowp(*(torch.as_tensor(x) for x in (oa, la, ob, lb)))
    assert_close(out, ref, naive, dtype=dtype)
    check_lse(lse, ref_lse)
    oa2, la2 = backend.put(oa), backend.put(la)
    o3, l3 = pagedflash.merge_attn_states(oa2, la2, args[2], args[3], out=oa2, out_lse=la2)
    assert o3 is oa2 and l3 is la2
    assert np.array_equal(as_np64(oa2), as_np64(out)) and np.array_equal(as_np64(la2), as_np64(lse))


def test_merge_edge_cases(backend, rng):
    """Both sides empty -> out 0, lse -inf whatever they hold; one side empty -> exactly the other
    side (even where the empty side holds NaN / inf); float16 in place with leading dims [2, 3]."""
    t, h, d = 5, 3, 20
    oa = rng.standard_normal((t, h, d)).astype(np.float32)
    ob = rng.standard_normal((t, h, d)).astype(np.float32)
    la = rng.standard_normal((h, t)).astype(np.float32)
    lb = rng.standard_normal((h, t)).astype(np.float32)
    la[0, 0] = lb[0, 0] = -np.inf  # both empty -> 0, -inf
    oa[0, 0] = ob[0, 0] = np.nan  # ...whatever they hold
    la[1, 2] = -np.inf  # a empty -> exactly b
    oa[2, 1] = np.nan
    lb[2, 4] = -np.inf  # b empty -> exactly a
    ob[4, 2] = np.inf
    out, lse = pagedflash.merge_attn_states(*(backend.put(x) for x in (oa, la, ob, lb)))
    out, lse = as_np64(out), as_np64(lse)
    np.testing.assert_array_equal(out[0, 0], 0.0)
    assert lse[0, 0] == -np.inf
    np.testing.assert_array_equal(out[2, 1], ob[2, 1])
    assert lse[1, 2] == lb[1, 2]
    np.testing.assert_array_equal(out[4, 2], oa[4, 2])
    assert lse[2, 4] == la[2, 4]
    ref, ref_lse = merge_ref(oa, la, ob, lb)
    assert_close(out, ref, dtype="float32")
    check_lse(lse, ref_lse)
    # in place, leading dims [2, 3]
    oa2 = backend.put(rng.standard_normal((2, 3, h, d)).astype(np.float16))
    ob2 = backend.put(rng.standard_normal((2, 3, h, d)).astype(np.float16))
    la2 = backend.put(rng.standard_normal((h, 6)).astype(np.float32))
    lb2 = backend.put(rng.standard_normal((h, 6)).astype(np.float32))
    expect, expect_lse = pagedflash.merge_attn_states(oa2, la2, ob2, lb2)
    res, res_lse = pagedflash.merge_attn_states(oa2, la2, ob2, lb2, out=oa2, out_lse=la2)
    assert res is oa2 and res_lse is la2
    assert np.array_equal(as_np64(oa2), as_np64(expect)) and np.array_equal(as_np64(la2), as_np64(expect_lse))


@cases("dtype", cpu=DTYPES, cuda=DTYPES)
def test_merge_flash_attn_layout(backend, rng, dtype):
    """flash_attn's lse [b, h, s] goes in as flash_attn returns it: its results over keys [0, 113)
    and [113, 203), merged, are attention over all keys (float64 reference over the concatenated
    keys); the merged lse comes back in that layout, also into NaN out= / out_lse= buffers, and
    with the other side in the [h, tokens] layout (the result then takes lse_a's layout)."""
    q, k, v, (oa, la), (ob, lb) = _two_key_chunks(backend, rng, dtype)
    b, sq, h, _ = q.shape
    assert tuple(la.shape) == (b, h, sq)
    ref, ref_lse = reference.attention(q, k, v, return_lse=True)  # lse [b, h, s]
    ref_ht = ref_lse.transpose(1, 0, 2).reshape(h, -1)
    naive = naive_attention_lowp(q, k, v) if dtype != "float32" else None

    out, lse = pagedflash.merge_attn_states(oa, la, ob, lb)
    assert type(out) is type(q) and tuple(lse.shape) == (b, h, sq)
    assert_close(out, ref, naive, dtype=dtype)
    check_lse(lse, ref_lse)
    out_buf, lse_buf = poison_like(oa), poison_like(la)
    out, lse = pagedflash.merge_attn_states(oa, la, ob, lb, out=out_buf, out_lse=lse_buf)
    assert out is out_buf and lse is lse_buf
    assert_close(out, ref, naive, dtype=dtype)
    check_lse(lse, ref_lse)
    out, lse = pagedflash.merge_attn_states(oa, la, ob, _to_heads_tokens(lb))  # mixed: [b, h, s] first
    assert_close(out, ref, naive, dtype=dtype)
    check_lse(lse, ref_lse)
    out, lse = pagedflash.merge_attn_states(oa, _to_heads_tokens(la), ob, lb)  # mixed: [h, tokens] first
    assert_close(out, ref, naive, dtype=dtype)
    check_lse(lse, ref_ht)


@cases("dtype", cpu=["float32", "bfloat16"], cuda=["float32", "bfloat16"])
def test_merge_flash_layout_strided_views(backend, rng, dtype):
    """lse [b, h, s] as views with other strides (a permuted [h, b, s] buffer, every other column
    of a wider one), some sides empty (lse -inf, their out NaN: never read), a row empty on both
    sides (out 0, lse -inf); in place on the permuted view gives the same bits."""
    b, s, h, d = 3, 5, 4, 24
    oa, ob = randn(rng, (b, s, h, d), dtype, lib="torch"), randn(rng, (b, s, h, d), dtype, lib="torch")
    la = torch.from_numpy(rng.standard_normal((h, b, s)).astype(np.float32) * 3).permute(1, 0, 2)
    lb = torch.from_numpy(rng.standard_normal((b, h, 2 * s)).astype(np.float32) * 3)[:, :, ::2]
    la[0, 1, :2] = -np.inf
    oa[0, :2, 1] = float("nan")
    lb[1, 2, 3] = -np.inf
    ob[1, 3, 2] = float("nan")
    la[2, 0, 4] = lb[2, 0, 4] = -np.inf
    if backend.name == "cpu" and dtype == "float32":  # NumPy views with the same strides
        oa, ob, la, lb = (x.numpy() for x in (oa, ob, la, lb))
    args = [backend.put(x) for x in (oa, la, ob, lb)]
    out, lse = pagedflash.merge_attn_states(*args)
    la_ht, lb_ht = _to_heads_tokens(la), _to_heads_tokens(lb)
    ref, ref_lse = merge_ref(oa, la_ht, ob, lb_ht)
    naive = None if dtype == "float32" else merge_naive_lowp(*(torch.as_tensor(x) for x in (oa, la_ht, ob, lb_ht)))
    assert_close(out, ref, naive, dtype=dtype)
    check_lse(lse, _to_batch_heads(ref_lse, b, s))
    assert np.array_equal(as_np64(out)[2, 4, 0], np.zeros(d)) and as_np64(lse)[2, 0, 4] == -np.inf
    oa2, la2 = backend.put(oa), backend.put(la)  # la2 keeps la's strides (on the CPU it is la)
    o3, l3 = pagedflash.merge_attn_states(oa2, la2, args[2], args[3], out=oa2, out_lse=la2)
    assert o3 is oa2 and l3 is la2
    assert np.array_equal(as_np64(oa2), as_np64(out)) and np.array_equal(as_np64(la2), as_np64(lse))


def test_merge_bad_input(backend, rng):
    oa = backend.put(np.ones((4, 2, 8), np.float32))
    lse = backend.put(np.zeros((2, 4), np.float32))
    out = poison_like(oa)
    with pytest.raises(ValueError, match="lse_b"):
        pagedflash.merge_attn_states(oa, lse, oa, backend.put(np.zeros((4, 2), np.float32)), out=out)
    with pytest.raises(TypeError, match="out_b"):
        pagedflash.merge_attn_states(oa, lse, backend.put(np.ones((4, 2, 8), np.float16)), lse, out=out)
    with pytest.raises(TypeError, match="lse_a"):
        pagedflash.merge_attn_states(oa, backend.put(np.zeros((2, 4), np.float16)), oa, lse, out=out)
    with pytest.raises(ValueError, match="lse_a"):  # [batch, num_heads, seqlen] needs a 4-d out
        pagedflash.merge_attn_states(oa, backend.put(np.zeros((1, 2, 4), np.float32)), oa, lse, out=out)
    assert np.isnan(as_np64(out)).all()
    o4 = backend.put(np.ones((2, 3, 4, 8), np.float32))  # [batch 2, seqlen 3, heads 4, d 8]
    good = backend.put(np.zeros((2, 4, 3), np.float32))
    out4 = poison_like(o4)
    with pytest.raises(
        ValueError, match=r"lse_b: expected \[num_heads, tokens\] \[4, 6\] or \[batch, num_heads, seqlen\]"
    ):
        pagedflash.merge_attn_states(o4, good, o4, backend.put(np.zeros((2, 3, 4), np.float32)), out=out4)
    with pytest.raises(ValueError, match="lse"):  # out_lse in neither layout
        pagedflash.merge_attn_states(o4, good, o4, good, out=out4, out_lse=backend.put(np.zeros((4, 3, 2), np.float32)))
    assert np.isnan(as_np64(out4)).all()
