"""The CUDA backend of the serving operations: paged attention / flash decoding
against the float64 reference (and against the CPU backend), merge_attn_states,
write_kv_cache, copy_blocks and swap_blocks.

Caches come from a random permutation of blocks with a partial last block per
sequence; every slot no sequence holds (and every unused block) is NaN, and the
unused tail of every block-table row holds garbage ids: none of it may reach the
output. Outputs are poisoned with NaN before each call. Every test needs a GPU
(marked `gpu`, skipped elsewhere by conftest.py).
"""
from __future__ import annotations

import numpy as np
import pytest

import pagedflash
from pagedflash import reference

from conftest import assert_close, randn, torch
from paged_common import gather, make_cache, make_q, naive_lowp_paged

pytestmark = pytest.mark.gpu

DEV = "cuda"


# ---------------------------------------------------------------------------
# helpers (inputs are built on the CPU with torch, then moved to the GPU)
# ---------------------------------------------------------------------------

def trandn(rng, shape, dtype):
    """Random normals as a torch CPU tensor of `dtype`."""
    return randn(rng, shape, dtype, lib="torch")


def build_cache(rng, lens, hk, d, bs, dtype):
    """make_cache with torch CPU tensors for every dtype (moved to the GPU by cuda())."""
    return make_cache(rng, lens, hk, d, bs, dtype, lib="torch")


def make_queries(rng, layout, qlens, h, d, dtype):
    return make_q(rng, layout, qlens, h, d, dtype, lib="torch")


def cuda(x, dtype=None):
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    return x.to(DEV, copy=True) if dtype is None else x.to(DEV, dtype, copy=True)


def paged_case(rng, *, dtype="bfloat16", lens=(113, 1, 203), qlens=None, h=8, hk=2, d=128, bs=16,
               layout="decode", num_splits=0, causal=True, window=(-1, -1), softcap=0.0, alibi=None,
               softmax_scale=None, check_cpu=False):
    """Run paged_attn on the GPU and check out and lse against the float64 reference."""
    qlens = qlens or [1] * len(lens)
    kc, vc, bt, sl = build_cache(rng, lens, hk, d, bs, dtype)
    q, cu_q, offs = make_queries(rng, layout, qlens, h, d, dtype)
    slopes = None
    if alibi == "heads":
        slopes = rng.uniform(0.01, 0.5, size=h).astype(np.float32)
    elif alibi == "batch":
        slopes = rng.uniform(0.01, 0.5, size=(len(lens), h)).astype(np.float32)
    opts = dict(causal=causal, window=window, softcap=softcap, softmax_scale=softmax_scale)
    qg = cuda(q)
    out = torch.full_like(qg, float("nan"))
    res, lse = pagedflash.paged_attn(qg, cuda(kc), cuda(vc), cuda(bt), cuda(sl),
                                     cu_seqlens_q=None if cu_q is None else cuda(cu_q),
                                     alibi_slopes=None if slopes is None else cuda(slopes),
                                     num_splits=num_splits, return_lse=True, out=out, **opts)
    assert res is out and res.device.type == DEV and lse.device.type == DEV
    torch.cuda.synchronize()
    ref, ref_lse = reference.paged_attention(q, kc, vc, bt, sl, cu_seqlens_q=cu_q, alibi_slopes=slopes,
                                             return_lse=True, **opts)
    naive = naive_lowp_paged(q, kc, vc, bt, sl, offs, bs, alibi_slopes=slopes, **opts) if dtype != "float32" else None
    assert_close(res.cpu(), ref, naive, dtype=dtype)
    lse_np = lse.cpu().numpy().astype(np.float64)
    assert lse_np.shape == ref_lse.shape
    fin = np.isfinite(ref_lse)
    assert np.array_equal(np.isfinite(lse_np), fin), "lse: -inf pattern differs from the reference"
    assert np.all(lse_np[~fin] == -np.inf)
    tol = 1e-5 if dtype == "float32" else 2e-3
    assert np.max(np.abs(lse_np[fin] - ref_lse[fin]), initial=0.0) <= tol * max(1.0, np.abs(ref_lse).max(initial=0))
    if check_cpu:
        cpu_out, cpu_lse = pagedflash.paged_attn(q, kc, vc, torch.from_numpy(bt), torch.from_numpy(sl),
                                                 cu_seqlens_q=None if cu_q is None else torch.from_numpy(cu_q),
                                                 alibi_slopes=None if slopes is None else torch.from_numpy(slopes),
                                                 num_splits=num_splits, return_lse=True, **opts)
        assert_close(cpu_out, ref, naive, dtype=dtype, what="CPU backend out")
        nerr = 0.0 if naive is None else float(np.max(np.abs(naive - ref)))
        diff = float((res.cpu().double() - cpu_out.double()).abs().max())
        assert diff <= 4 * nerr + 2e-5 * max(1.0, float(np.abs(ref).max())), f"GPU vs CPU differ by {diff:.3e}"
        cl = cpu_lse.numpy().astype(np.float64)
        assert np.array_equal(np.isfinite(cl), fin)
        assert np.max(np.abs(lse_np[fin] - cl[fin]), initial=0.0) <= 2 * tol * max(1.0, np.abs(ref_lse).max(initial=0))
    return res, lse


# ---------------------------------------------------------------------------
# paged attention
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("bs", [8, 16, 32, 64, 128, 256])
def test_block_sizes_decode(rng, bs):
    paged_case(rng, bs=bs, lens=(1, 113, 1023, 203), dtype="bfloat16")


@pytest.mark.parametrize("bs", [1, 3, 24])
def test_odd_block_sizes(rng, bs):
    paged_case(rng, bs=bs, lens=(7, 113, 50), dtype="float16")


@pytest.mark.parametrize("qlen", [1, 3, 17])
@pytest.mark.parametrize("layout", ["dense", "packed"])
@pytest.mark.parametrize("causal", [True, False])
def test_query_lengths(rng, qlen, layout, causal):
    lens = (qlen + 6, 203, 130)
    paged_case(rng, lens=lens, qlens=[qlen] * 3, layout=layout, causal=causal, bs=16, h=8, hk=2)


def test_packed_mixed_lengths(rng):
    # decode, chunked prefill, speculative verification and an empty query set in one batch
    paged_case(rng, lens=(40, 300, 5, 97, 64), qlens=[1, 37, 0, 5, 64], layout="packed", bs=32, h=12, hk=4)


@pytest.mark.parametrize("h,hk", [(8, 8), (8, 4), (8, 2), (8, 1), (12, 4), (32, 8), (24, 1), (6, 2)])
def test_gqa_ratios(rng, h, hk):
    paged_case(rng, h=h, hk=hk, lens=(77, 1, 300), bs=16)


@pytest.mark.parametrize("d", [32, 64, 96, 128, 192, 256, 40, 80, 7])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_head_dims(rng, d, dtype):
    paged_case(rng, d=d, dtype=dtype, lens=(129, 3), qlens=[2, 2], layout="dense", h=4, hk=2, bs=16)


@pytest.mark.parametrize("d", [64, 128, 33])
def test_float32(rng, d):
    paged_case(rng, d=d, dtype="float32", lens=(129, 64, 1), h=4, hk=1, bs=8)
    paged_case(rng, d=d, dtype="float32", lens=(50, 70), qlens=[3, 3], layout="dense", h=4, hk=2, bs=16,
               num_splits=3)


@pytest.mark.parametrize("combine", ["warp", "cta"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_splits_agree(rng, monkeypatch, dtype, combine):
    """num_splits 1, many and automatic give the reference result and agree closely; with
    the combine's warp-per-row kernel (<= 16 splits, head_dim <= 128) and its CTA-per-row
    kernel (forced by PAGEDFLASH_PAGED_COMBINE=1, and taken anyway above 16 splits)."""
    monkeypatch.setenv("PAGEDFLASH_PAGED_COMBINE", "1" if combine == "cta" else "0")
    lens = (1500, 700, 9)
    kc, vc, bt, sl = build_cache(rng, lens, 2, 128, 16, dtype)
    q = trandn(rng, (3, 8, 128), dtype)
    args = (cuda(q), cuda(kc), cuda(vc), cuda(bt), cuda(sl))
    outs = []
    for ns in (1, 2, 4, 5, 7, 16, 17, 64, 0):
        o, l = pagedflash.paged_attn(*args, num_splits=ns, return_lse=True)
        outs.append((o.float().cpu(), l.cpu()))
    ref = reference.paged_attention(q, kc, vc, bt, sl)
    naive = None if dtype == "float32" else naive_lowp_paged(q, kc, vc, bt, sl, np.arange(4), 16)
    for o, l in outs:
        assert_close(o, ref, naive, dtype=dtype)
        assert torch.allclose(l, outs[0][1], rtol=0, atol=1e-4)
        ulp = 2.0 ** -7 if dtype == "bfloat16" else 2.0 ** -10 if dtype == "float16" else 1e-5
        assert float((o - outs[0][0]).abs().max()) <= 2 * ulp * float(outs[0][0].abs().max())


def test_masks_softcap_alibi(rng):
    paged_case(rng, window=(50, -1), lens=(300, 20, 129), bs=16)
    paged_case(rng, window=(9, 4), causal=False, lens=(300, 20), qlens=[5, 5], layout="dense", bs=32)
    paged_case(rng, softcap=30.0, lens=(300, 20), softmax_scale=0.3, bs=16)
    paged_case(rng, alibi="heads", lens=(300, 20), qlens=[3, 3], layout="dense", bs=16)
    paged_case(rng, alibi="batch", lens=(300, 20), bs=64, num_splits=4)
    paged_case(rng, softcap=5.0, alibi="heads", window=(17, -1), lens=(257, 33, 2), qlens=[2, 17, 0],
               layout="packed", bs=8, dtype="float16", num_splits=3)


def test_against_cpu_backend(rng):
    paged_case(rng, lens=(300, 1, 77), bs=16, check_cpu=True)
    paged_case(rng, lens=(40, 129), qlens=[3, 17], layout="packed", bs=32, h=12, hk=3, check_cpu=True,
               num_splits=2)
    paged_case(rng, lens=(64, 70), qlens=[5, 5], layout="dense", d=80, dtype="float16", window=(20, 3),
               causal=False, check_cpu=True)


def test_long_context_auto_split(rng):
    """Batch 1, 8k tokens, 32/8 heads: the automatic split count path (flash decoding); head
    mode would take > 16 splits, so the launcher picks CTAs of 1 KV head x 8 warps."""
    paged_case(rng, lens=(8191,), h=32, hk=8, bs=16)
    paged_case(rng, lens=(8191,), h=32, hk=8, d=64, bs=16)


def test_auto_shape_token_mode(rng):
    """32 sequences of ~1k tokens, 32/8 heads: on a GPU with >= 128 SMs head mode would
    split each sequence 4 ways, so the launcher takes token mode (256 CTAs of 1 KV head x
    4 warps, no split) instead; whatever the GPU, the result is the reference's."""
    lens = tuple(int(x) for x in rng.integers(900, 1025, size=32))
    paged_case(rng, lens=lens, h=32, hk=8, bs=16)


# The head-mode kernel in both widths: PAGEDFLASH_PAGED_MODE 2 = eight warps (one per KV
# head), 1 = four (read on every call); 0 = token mode (what hk = 2 takes elsewhere);
# "HxW" = H KV heads per CTA of W warps, W / H warps sharing a head (1x8, 2x8, 4x8; the
# KV-head counts leave idle warps in the last group of 2x8 and 4x8).
# PAGEDFLASH_PAGED_RING 1 / 2 streams K/V through a shared-memory ring (3 x 16-token or
# 6 x 8-token slots per warp) instead of registers (head dims 64 and 128).
@pytest.mark.parametrize("mode,ring,hk", [("2", "0", 8), ("1", "0", 4), ("2", "1", 8), ("2", "2", 8), ("1", "1", 4),
                                          ("0", "0", 4), ("0", "1", 4), ("1x8", "1", 4), ("2x8", "1", 3),
                                          ("4x8", "1", 6)],
                         ids=["w8-regs", "w4-regs", "w8-ring3", "w8-ring6", "w4-ring3", "tok-regs", "tok-ring3",
                              "1x8-ring3", "2x8-ring3", "4x8-ring3"])
def test_head_mode_configs(rng, monkeypatch, mode, ring, hk):
    monkeypatch.setenv("PAGEDFLASH_PAGED_MODE", mode)
    monkeypatch.setenv("PAGEDFLASH_PAGED_RING", ring)
    # one long sequence split across many CTAs, short ones, a single token
    paged_case(rng, lens=(5000, 1, 37, 300), h=4 * hk, hk=hk, bs=16)
    # blocks smaller than a tile / not a multiple of it
    paged_case(rng, lens=(999, 64, 2), h=2 * hk, hk=hk, bs=8, window=(100, -1))
    paged_case(rng, lens=(700, 33), h=hk, hk=hk, bs=3, softcap=20.0, alibi="heads")
    # several queries per sequence (16-row tiles); packed with an empty query range
    paged_case(rng, lens=(400, 129), qlens=[5, 5], layout="dense", h=4 * hk, hk=hk, bs=32)
    paged_case(rng, lens=(250, 40, 900), qlens=[3, 0, 17], layout="packed", h=2 * hk, hk=hk, bs=64,
               causal=False, window=(30, 8))
    # two KV-head groups per sequence (the CTA's heads are not a whole token row), d = 64
    paged_case(rng, lens=(600, 90), h=4 * hk, hk=2 * hk, d=64, bs=16)
    # more sequences than the GPU has slots for CTAs (no split, several waves)
    lens = tuple(int(x) for x in rng.integers(1, 120, size=300))
    paged_case(rng, lens=lens, h=hk, hk=hk, bs=16)
    # empty sequences among long and short ones (rows with no token: out = 0, lse = -inf)
    paged_case(rng, lens=(0, 3000, 0, 7, 0), h=4 * hk, hk=hk, bs=16)
    paged_case(rng, lens=(0, 0), h=2 * hk, hk=hk, bs=16)


def test_split_kv_in_cuda_graph(rng):
    """Split-KV decoding (main kernel, workspace partials, combine) captured in a CUDA graph:
    replays after the query changes equal the eager call bit for bit."""
    kc, vc, bt, sl = build_cache(rng, (3000, 17, 900), 8, 128, 16, "bfloat16")
    q = cuda(trandn(rng, (3, 32, 128), "bfloat16"))
    args = [cuda(x) for x in (kc, vc, bt, sl)]
    out = torch.empty_like(q)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        pagedflash.paged_attn(q, *args, out=out)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        pagedflash.paged_attn(q, *args, out=out)
    for _ in range(3):
        q.copy_(cuda(trandn(rng, (3, 32, 128), "bfloat16")))
        out.fill_(float("nan"))
        g.replay()
        eager = pagedflash.paged_attn(q, *args)
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
    ref = reference.paged_attention(q.cpu(), kc, vc, bt, sl)
    assert_close(out.cpu(), ref, naive_lowp_paged(q.cpu(), kc, vc, bt, sl, np.arange(4), 16), dtype="bfloat16")


def test_no_visible_token_rows(rng):
    """Device seq_lens shorter than q_len (not checkable on the host): a query positioned
    before token 0 sees nothing -> out 0, lse -inf; never NaN."""
    kc, vc, bt, sl = build_cache(rng, (1, 40), 2, 64, 16, "bfloat16")
    q = trandn(rng, (2, 3, 4, 64), "bfloat16")
    for ns in (1, 2):
        out, lse = pagedflash.paged_attn(cuda(q), cuda(kc), cuda(vc), cuda(bt), cuda(sl), return_lse=True,
                                         num_splits=ns)
        out, lse = out.cpu(), lse.cpu()
        assert not torch.isnan(out).any()
        assert torch.all(out[0, :2] == 0) and torch.all(torch.isneginf(lse[:, 0:2]))
        ref = reference.paged_attention(q[0:1, 2:], kc, vc, bt[0:1], sl[0:1])
        assert np.allclose(out[0, 2:].double().numpy(), ref, atol=1e-2)


@pytest.mark.parametrize("hk", [2, 8])
def test_bad_block_ids_in_device_tables(rng, hk):
    """Ids outside [0, num_blocks) in a device-resident table are never dereferenced: the
    tokens of such a block contribute nothing (compute-sanitizer runs this test too).
    hk = 2: token mode; hk = 8: head mode (num_splits 0: the automatic split count)."""
    bs, d, h = 16, 128, 4 * hk
    lens = (100, 64, 37)
    kc, vc, bt, sl = build_cache(rng, lens, hk, d, bs, "bfloat16")
    nb = kc.shape[0]
    bad = bt.copy()
    bad[0, 1] = -3          # tokens 16..31 of sequence 0
    bad[1, 3] = nb + 1000   # tokens 48..63 of sequence 1
    bad[2, 0] = 2**31 - 1   # tokens 0..15 of sequence 2
    q = trandn(rng, (3, h, d), "bfloat16")
    sl_dev = sl.copy()
    sl_dev[2] = 10**6       # larger than the table row covers: clamped to its capacity
    for ns in (0, 1, 3):
        out = pagedflash.paged_attn(cuda(q), cuda(kc), cuda(vc), cuda(bad), cuda(sl_dev), num_splits=ns)
        torch.cuda.synchronize()
        out = out.float().cpu()
        assert not torch.isnan(out[:2]).any()
        # reference: the same attention without the bad blocks' tokens
        for b, drop in ((0, range(16, 32)), (1, range(48, 64))):
            keep = np.array([t for t in range(lens[b]) if t not in drop])
            k = gather(kc, bt[b], lens[b], bs)[torch.from_numpy(keep)]
            v = gather(vc, bt[b], lens[b], bs)[torch.from_numpy(keep)]
            ref = reference.attention(q[b][None, None], k[None], v[None])[0, 0]
            assert np.max(np.abs(out[b].double().numpy() - ref)) < 2e-2


def test_non_default_stream_and_determinism(rng):
    kc, vc, bt, sl = build_cache(rng, (3000, 17), 8, 128, 16, "bfloat16")
    q = trandn(rng, (2, 32, 128), "bfloat16")
    args = [cuda(x) for x in (q, kc, vc, bt, sl)]
    first = pagedflash.paged_attn(*args)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        outs = [pagedflash.paged_attn(*args) for _ in range(3)]
        explicit = torch.empty_like(args[0])
        pagedflash.paged_attn(*args, out=explicit, stream=s.cuda_stream)
    s.synchronize()
    for o in outs + [explicit]:
        assert torch.equal(o, first), "results differ between runs / streams"
    ref = reference.paged_attention(q, kc, vc, bt, sl)
    naive = naive_lowp_paged(q, kc, vc, bt, sl, np.arange(3), 16)
    assert_close(first.cpu(), ref, naive, dtype="bfloat16")


# ---------------------------------------------------------------------------
# merge_attn_states
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merge_attn_states(rng, dtype):
    shape = (3, 5, 4, 72)  # leading dims (3, 5) -> 15 tokens
    oa, ob = trandn(rng, shape, dtype), trandn(rng, shape, dtype)
    la = torch.from_numpy(rng.standard_normal((4, 15)).astype(np.float32) * 3)
    lb = torch.from_numpy(rng.standard_normal((4, 15)).astype(np.float32) * 3)
    la[0, :3] = -np.inf
    lb[1, 2:6] = -np.inf
    la[2, 7] = lb[2, 7] = -np.inf
    oa_g, ob_g = cuda(oa), cuda(ob)
    # a side with lse -inf is never read: poison it
    oa_g.view(15, 4, 72)[:3, 0] = float("nan")
    ob_g.view(15, 4, 72)[2:6, 1] = float("nan")
    out, lse = pagedflash.merge_attn_states(oa_g, cuda(la), ob_g, cuda(lb))
    ref_l = np.logaddexp(la.double().numpy(), lb.double().numpy())
    wa = np.where(np.isneginf(la.numpy()), 0, np.exp(la.double().numpy() - np.where(np.isfinite(ref_l), ref_l, 0)))
    wb = np.where(np.isneginf(lb.numpy()), 0, np.exp(lb.double().numpy() - np.where(np.isfinite(ref_l), ref_l, 0)))
    a64 = reference.to_f64(oa).reshape(15, 4, 72)
    b64 = reference.to_f64(ob).reshape(15, 4, 72)
    ref = (wa.T[:, :, None] * a64 + wb.T[:, :, None] * b64).reshape(shape)
    o = out.cpu().double().numpy()
    assert not np.isnan(o).any()
    tol = 1e-5 if dtype == "float32" else 2 ** -7
    assert np.max(np.abs(o - ref)) <= tol * max(1.0, np.abs(ref).max())
    lg = lse.cpu().double().numpy()
    assert np.array_equal(np.isneginf(lg), np.isneginf(ref_l))
    fin = np.isfinite(ref_l)
    assert np.max(np.abs(lg[fin] - ref_l[fin])) < 1e-5
    # in place: out = out_a, lse = lse_a (same inputs, same kernel: identical bits)
    oa2, la2 = cuda(oa), cuda(la)
    o3, l3 = pagedflash.merge_attn_states(oa2, la2, cuda(ob), cuda(lb), out=oa2, out_lse=la2)
    assert o3 is oa2 and l3 is la2
    assert torch.equal(oa2, out) and torch.equal(la2, lse)


# ---------------------------------------------------------------------------
# cache operations
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,d", [("bfloat16", 128), ("float16", 40), ("float32", 7), ("bfloat16", 7)])
def test_write_kv_cache(rng, dtype, d):
    nb, bs, hk, n = 9, 16, 3, 40
    kc, vc = trandn(rng, (nb, bs, hk, d), dtype), trandn(rng, (nb, bs, hk, d), dtype)
    k, v = trandn(rng, (n, hk, d), dtype), trandn(rng, (n, hk, d), dtype)
    slots = rng.choice(nb * bs, size=n, replace=False).astype(np.int64)
    slots[::7] = -1
    kg, vg = cuda(kc), cuda(vc)
    pagedflash.write_kv_cache(cuda(k), cuda(v), kg, vg, cuda(slots))
    ek, ev = kc.clone(), vc.clone()
    for t, s in enumerate(slots):
        if s >= 0:
            ek[s // bs, s % bs] = k[t]
            ev[s // bs, s % bs] = v[t]
    assert torch.equal(kg.cpu(), ek) and torch.equal(vg.cpu(), ev)
    # device slot_mapping out of range: skipped, nothing written outside the caches
    slots2 = slots.copy()
    slots2[1] = nb * bs + 5
    slots2[2] = 2**40
    kg, vg = cuda(kc), cuda(vc)
    pagedflash.write_kv_cache(cuda(k), cuda(v), kg, vg, cuda(slots2))
    ek, ev = kc.clone(), vc.clone()
    for t, s in enumerate(slots2):
        if 0 <= s < nb * bs:
            ek[s // bs, s % bs] = k[t]
            ev[s // bs, s % bs] = v[t]
    assert torch.equal(kg.cpu(), ek) and torch.equal(vg.cpu(), ev)


def test_write_kv_cache_strided(rng):
    """A combined [num_blocks, 2, bs, hk, d] cache viewed as k/v halves, k/v as strided views."""
    nb, bs, hk, d, n = 6, 8, 2, 64, 11
    kv = cuda(trandn(rng, (nb, 2, bs, hk, d), "bfloat16"))
    src = cuda(trandn(rng, (n, 2, hk, d), "bfloat16"))
    slots = torch.from_numpy(rng.choice(nb * bs, size=n, replace=False).astype(np.int64)).to(DEV)
    before = kv.clone()
    pagedflash.write_kv_cache(src[:, 0], src[:, 1], kv[:, 0], kv[:, 1], slots)
    exp = before.clone()
    for t, s in enumerate(slots.tolist()):
        exp[s // bs, 0, s % bs] = src[t, 0]
        exp[s // bs, 1, s % bs] = src[t, 1]
    assert torch.equal(kv, exp)


@pytest.mark.parametrize("device_mapping", [False, True])
def test_copy_blocks(rng, device_mapping):
    layers, nb, bs, hk, d = 3, 12, 16, 2, 64
    ks = [trandn(rng, (nb, bs, hk, d), "bfloat16") for _ in range(layers)]
    vs = [trandn(rng, (nb, bs, hk, d), "float16") for _ in range(layers)]
    pairs = np.array([[0, 5], [5, 7], [3, 3], [9, 0], [11, 2]], dtype=np.int64)  # 0->5 then 5->7: ordered
    kg, vg = [cuda(x) for x in ks], [cuda(x) for x in vs]
    mapping = cuda(pairs) if device_mapping else pairs
    pagedflash.copy_blocks(kg, vg, mapping)
    for host, dev in zip(ks + vs, kg + vg):
        exp = host.clone()
        for s, t in pairs:
            exp[t] = exp[s].clone()
        assert torch.equal(dev.cpu(), exp)


def test_copy_blocks_many_pairs_and_bad_device_ids(rng):
    nb = 300
    kc = trandn(rng, (nb, 8, 1, 32), "float32")
    pairs = np.stack([rng.permutation(nb)[:250], rng.permutation(nb)[:250]], axis=1).astype(np.int64)
    kg = cuda(kc)
    pagedflash.copy_blocks([kg], [], pairs)  # > one launch's worth of host pairs
    exp = kc.clone()
    for s, t in pairs:
        exp[t] = exp[s].clone()
    assert torch.equal(kg.cpu(), exp)
    bad = np.array([[1, 2], [-1, 3], [4, nb + 9], [5, 6]], dtype=np.int64)
    kg = cuda(kc)
    pagedflash.copy_blocks([kg], [], cuda(bad))
    exp = kc.clone()
    exp[2] = exp[1].clone()
    exp[6] = exp[5].clone()
    assert torch.equal(kg.cpu(), exp)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_swap_blocks_pinned(rng, dtype):
    nb_dev, nb_host, bs, hk, d = 10, 7, 16, 2, 128
    dev = cuda(trandn(rng, (nb_dev, bs, hk, d), dtype))
    host = trandn(rng, (nb_host, bs, hk, d), dtype).pin_memory()
    dev0, host0 = dev.clone(), host.clone()
    out_map = np.array([[2, 0], [3, 1], [4, 2], [9, 6]], dtype=np.int64)  # a run of 3 + 1
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        pagedflash.swap_blocks(dev, host, out_map)
    s.synchronize()
    exp = host0.clone()
    for a, b in out_map:
        exp[b] = dev0[a].cpu()
    assert torch.equal(host, exp)
    in_map = np.array([[0, 8], [6, 1]], dtype=np.int64)
    pagedflash.swap_blocks(host, dev, in_map)
    torch.cuda.synchronize()
    exp_dev = dev0.cpu().clone()
    for a, b in in_map:
        exp_dev[b] = exp[a]
    assert torch.equal(dev.cpu(), exp_dev)
    # pageable host memory works too (the copy is staged by the CUDA runtime)
    pageable = torch.zeros_like(host0)
    pagedflash.swap_blocks(dev, pageable, np.array([[8, 3]], dtype=np.int64))
    torch.cuda.synchronize()
    assert torch.equal(pageable[3], exp_dev[8])


def test_swap_blocks_strided_view(rng):
    """A k half of a combined [num_blocks, 2, bs, hk, d] cache: strided blocks, contiguous rows."""
    kv = cuda(trandn(rng, (5, 2, 8, 2, 32), "float16"))
    host = torch.zeros((4, 8, 2, 32), dtype=torch.float16).pin_memory()
    pagedflash.swap_blocks(kv[:, 0], host, np.array([[1, 0], [2, 1], [4, 3]], dtype=np.int64))
    torch.cuda.synchronize()
    assert torch.equal(host[0], kv[1, 0].cpu()) and torch.equal(host[1], kv[2, 0].cpu())
    assert torch.equal(host[3], kv[4, 0].cpu()) and torch.all(host[2] == 0)


@pytest.mark.parametrize("layout", ["decode", "packed"])
def test_cuda_graph_capture(rng, layout):
    """paged_attn captured in a CUDA graph (split partials in a graph-owned workspace):
    every replay recomputes with the current inputs, bit-identical to an eager call."""
    lens = (3000, 17, 900)
    kc, vc, bt, sl = build_cache(rng, lens, 2, 128, 16, "bfloat16")
    qlens = [1, 1, 1] if layout == "decode" else [2, 1, 5]
    q, cu_q, _ = make_queries(rng, layout, qlens, 8, 128, "bfloat16")
    qg, kg, vg, btg, slg = (cuda(x) for x in (q, kc, vc, bt, sl))
    cug = None if cu_q is None else cuda(cu_q)
    out = torch.empty_like(qg)
    lse = torch.empty((8, qg.shape[0]), dtype=torch.float32, device=DEV)

    def call():
        o, l = pagedflash.paged_attn(qg, kg, vg, btg, slg, cu_seqlens_q=cug, num_splits=5, return_lse=True, out=out)
        lse.copy_(l)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        call()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        call()
    for _ in range(3):
        qg.copy_(cuda(trandn(rng, tuple(q.shape), "bfloat16")))
        g.replay()
        torch.cuda.synchronize()
        eo, el = pagedflash.paged_attn(qg, kg, vg, btg, slg, cu_seqlens_q=cug, num_splits=5, return_lse=True)
        assert torch.equal(out, eo) and torch.equal(lse, el)
    ref = reference.paged_attention(qg.cpu(), kc, vc, bt, sl, cu_seqlens_q=cu_q)
    assert np.max(np.abs(out.cpu().double().numpy() - ref)) < 3e-2
