"""Compressed KV caches (float8_e4m3fn, float8_e5m2, int8 with per-tensor or per-(token, KV head)
scales; docs/serving.md "Compressed KV caches") through every serving operation:

- write_kv_cache quantizes bit for bit as pagedflash.reference.quantize_kv (round to nearest
  even, saturating; int8 row scales max|x| / 127), from float32, float16 and bfloat16 inputs;
- paged_attn reads code * scale: against the float64 reference on the dequantized cache under the
  rule of tests/conftest.py (float32 q: 1e-5 relative, the CPU backend computes in float32 after
  dequantizing; float16 / bfloat16 q: twice the naive same-precision error), with GQA, windows,
  softcap, ALiBi, several queries per sequence, splits and lse; every code decodes exactly;
- copy_blocks / swap_blocks move per-(token, head) scales with their blocks;
- bad input raises, naming the argument, with every cache and scale untouched;
- accuracy against the unquantized cache, per dtype (error statistics printed: `pytest -s`), and a
  long-context retrieval (a key planted among 32k distractors) that every compressed cache passes
  as bfloat16 does.

Caches come from conftest.make_paged_cache (random block permutation, partial last blocks, garbage
block-table padding), quantized; slots no sequence holds get NaN codes (float8) or NaN row scales
(int8), so a stale read poisons the result. NumPy float8 caches need ml_dtypes (skipped without);
torch float8 caches need torch. The CUDA backend refuses compressed caches in paged_attn and
write_kv_cache (NotImplementedError) and copies / swaps their blocks.
"""

from __future__ import annotations

import numpy as np
import pytest

import pagedflash
from conftest import (
    KV_MAX,
    Backend,
    as_kv_cache,
    as_np64,
    assert_close,
    cases,
    check_lse,
    cpu_only,
    cuda_only,
    kv_tensor_scale,
    make_paged_cache,
    poison_like,
    quantize_kv_cache,
    randn,
    torch,
)
from pagedflash import reference

from .test_paged_attn import run_paged

FP8 = ("float8_e4m3fn", "float8_e5m2")
# (cache dtype, scale kind): "none" = absent (float8: 1), "tensor" = one float32, "row" = per (token, head)
KINDS = [
    ("float8_e4m3fn", "tensor"),
    ("float8_e4m3fn", "none"),
    ("float8_e5m2", "tensor"),
    ("int8", "tensor"),
    ("int8", "row"),
]
CPU = Backend("cpu")


def kid(dt, kind):
    return f"{dt.replace('float8_', '')}-{kind}"


# ---------------------------------------------------------------------------
# compressed caches (built by conftest.make_paged_cache with kv=)
# ---------------------------------------------------------------------------


def raw(x):
    """A cache's bytes (float8 as uint8) or any array as NumPy, for exact comparisons."""
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return x.view(torch.uint8).numpy() if x.element_size() == 1 and x.is_floating_point() else x.numpy()
    x = np.asarray(x)
    return x.view(np.uint8) if x.dtype.name.startswith("float8") else x


def quant_cache(rng, lens, hk, d, bs, dtype, kind, *, lib="numpy", share=False):
    """A compressed paged cache on the CPU: conftest.PagedCache with its scales and values."""
    return make_paged_cache(CPU, rng, lens, hk, d, bs, "float32", share=share, kv=(dtype, kind), lib=lib)


def run_quant(rng, dtype, kind, *, q_dtype="float32", d=40, **kw):
    """test_paged_attn.run_paged over a compressed cache (out and lse against the float64 reference
    on its dequantized values; float16 / bfloat16 q against the naive run in q's dtype on them)."""
    return run_paged(CPU, rng, dtype=q_dtype, d=d, kv=(dtype, kind), **kw)


# ---------------------------------------------------------------------------
# paged_attn over compressed caches
# ---------------------------------------------------------------------------


@cases("dtype,kind", cpu=KINDS, ids=kid)
def test_decode_gqa(backend, rng, dtype, kind):
    """Decode over every GQA ratio, head dims that are not powers of two, partial blocks, shared
    prefixes, block sizes 1..64."""
    for h, hk, d, bs, share in ((4, 4, 40, 16, True), (6, 2, 64, 1, False), (8, 1, 96, 7, True), (6, 3, 33, 64, False)):
        run_quant(rng, dtype, kind, lens=(1, 7, 113, 203), h=h, hk=hk, d=d, bs=bs, share=share)


OPTIONS = [
    dict(window=(64, -1)),
    dict(window=(5, 2), causal=False),
    dict(softcap=5.0),
    dict(alibi="heads"),
    dict(alibi="batch", window=(40, 0), softmax_scale=0.3, softcap=2.0),
]


@cases("dtype,kind", cpu=KINDS, ids=kid)
def test_options_and_query_layouts(backend, rng, dtype, kind):
    """Masks, softcap, ALiBi, with several queries per sequence (packed chunked prefill with an
    empty query range, dense q_len) and flash-decoding splits."""
    for i, o in enumerate(OPTIONS):
        if i % 2 == 0:
            run_quant(rng, dtype, kind, lens=[130, 9, 257, 4], qlens=[4, 9, 17, 0], layout="packed", h=4, **o)
        else:
            run_quant(rng, dtype, kind, lens=[77, 300], qlens=[3, 3], layout="dense", h=4, hk=1, bs=8, **o)
        run_quant(rng, dtype, kind, lens=[1, 77, 300], h=4, hk=1, d=32, bs=8, num_splits=3, **o)


@cases("q_dtype,dtype,kind", cpu=[("bfloat16", dt, k) for dt, k in KINDS] + [("float16", "int8", "row")])
def test_low_precision_queries(backend, rng, q_dtype, dtype, kind):
    """float16 / bfloat16 q (out in q's dtype) over compressed caches; bfloat16 through torch
    (torch float8 / int8 caches and scales)."""
    run_quant(rng, dtype, kind, q_dtype=q_dtype, lens=(300, 20, 129), qlens=[5, 5, 5], layout="dense", alibi="heads")
    run_quant(rng, dtype, kind, q_dtype=q_dtype, lens=(1, 700), num_splits=4, window=(100, -1))


@cases("dtype,kind", cpu=[("float8_e4m3fn", "tensor"), ("int8", "row")], ids=kid)
def test_splits_agree(backend, rng, dtype, kind):
    """Every split count gives the reference result and agrees with one split to float32 rounding."""
    cache = quant_cache(rng, (1500, 700, 77, 9), 2, 64, 16, dtype, kind, share=True)
    q = randn(rng, (4, 8, 64), "float32")
    ref, ref_lse = reference.paged_attention(q, *cache, return_lse=True, **cache.scales)
    one = None
    for n in (1, 2, 7, 24, 0):
        out, lse = pagedflash.paged_attn(q, *cache, num_splits=n, return_lse=True, out=poison_like(q), **cache.scales)
        assert_close(out, ref, dtype="float32", what=f"out, num_splits={n}")
        check_lse(lse, ref_lse, what=f"lse, num_splits={n}")
        one = out.copy() if one is None else one
        assert np.max(np.abs(out - one)) <= 2e-5 * np.max(np.abs(one))


@cases("dtype,d", cpu=[(dt, d) for dt in ("float8_e4m3fn", "float8_e5m2", "int8") for d in (256, 15)])
def test_every_code_decodes(backend, rng, dtype, d):
    """Each code reads as float32(code * scale), exactly: every code (float8: every finite one,
    e5m2's infinities left out; int8: -128..127) laid over the rows of one-token sequences, each
    seen alone (window (0, 0)), so out is the v rows bit for bit. d = 256 converts 16 codes at a
    time, d = 15 goes through the portable per-code path."""
    vals = np.arange(256, dtype=np.uint8)
    if dtype in FP8:
        vals = np.where(np.isfinite(reference.fp8_values(dtype)), vals, 0).astype(np.uint8)
    nb = -(-256 // d)
    codes = np.zeros(nb * d, np.uint8)
    codes[:256] = vals
    codes = codes.reshape(nb, 1, 1, d)
    if dtype == "int8":
        codes = codes.view(np.int8)
    v = as_kv_cache(codes, dtype, "numpy")
    k = as_kv_cache(np.zeros_like(codes), dtype, "numpy")
    scale = np.float32(0.3711)
    q = randn(rng, (nb, 1, d), "float32")
    bt, sl = np.arange(nb, dtype=np.int32)[:, None], np.ones(nb, np.int32)
    out = pagedflash.paged_attn(q, k, v, bt, sl, window=(0, 0), causal=False, k_scale=scale, v_scale=scale)
    want = (reference.dequantize_kv(codes, dtype=dtype).astype(np.float32) * scale).reshape(nb, 1, d)
    np.testing.assert_array_equal(out, want)


def test_kv_cache_dtype_raw_bytes(backend, rng):
    """vLLM-style caches: raw uint8 bytes read as float8 with kv_cache_dtype ("fp8" = "fp8_e4m3",
    "fp8_e5m2"), int8 ones with "int8": the same result as typed caches; writing through the same
    names fills the bytes write_kv_cache writes into typed caches."""
    for name, dtype in (("fp8", "float8_e4m3fn"), ("fp8_e4m3", "float8_e4m3fn"), ("fp8_e5m2", "float8_e5m2")):
        cache = quant_cache(rng, (50, 9), 2, 32, 8, dtype, "tensor", lib="torch" if torch is not None else "numpy")
        kb, vb = raw(cache.k), raw(cache.v)
        q = randn(rng, (2, 4, 32), "float32")
        bt, sl = cache.block_tables, cache.seq_lens
        got = pagedflash.paged_attn(q, kb, vb, bt, sl, kv_cache_dtype=name, **cache.scales)
        np.testing.assert_array_equal(got, pagedflash.paged_attn(q, *cache, **cache.scales))
        k, v = randn(rng, (3, 2, 32), "float32"), randn(rng, (3, 2, 32), "float32")
        slots = np.array([0, 5, 17], np.int64)
        pagedflash.write_kv_cache(k, v, kb, vb, slots, kv_cache_dtype=name, **cache.scales)
        codes, _ = reference.quantize_kv(k, dtype, cache.scales["k_scale"])
        np.testing.assert_array_equal(kb.reshape(-1, 2, 32)[slots], codes)
    cache = quant_cache(rng, (50, 9), 2, 32, 8, "int8", "row")
    q = randn(rng, (2, 4, 32), "float32")
    got = pagedflash.paged_attn(
        q, cache.k.view(np.uint8), cache.v, cache.block_tables, cache.seq_lens, kv_cache_dtype="int8", **cache.scales
    )
    np.testing.assert_array_equal(got, pagedflash.paged_attn(q, *cache, **cache.scales))


@pytest.mark.skipif(torch is None, reason="needs torch")
@pytest.mark.parametrize("dtype", FP8)
@pytest.mark.parametrize("stream", [None, 0])
def test_torch_float8_through_dlpack(rng, dtype, stream):
    """torch float8 caches, viewed through torch's DLPack C exchange API (stream None) and through
    __dlpack__ (a named stream: code 10 / 12 float8 DLPack tensors), written and read."""
    tdt = getattr(torch, dtype)
    kc, vc = torch.zeros((4, 8, 2, 16), dtype=tdt), torch.zeros((4, 8, 2, 16), dtype=tdt)
    k, v = randn(rng, (5, 2, 16), "float32", lib="torch"), randn(rng, (5, 2, 16), "float32", lib="torch")
    slots = torch.tensor([0, 3, 9, 17, 31])
    pagedflash.write_kv_cache(k, v, kc, vc, slots, k_scale=torch.tensor(0.5), v_scale=0.25, stream=stream)
    # torch's own conversion rounds to nearest even like write_kv_cache (in range: no saturation here)
    np.testing.assert_array_equal(raw(kc).reshape(-1, 2, 16)[slots.numpy()], raw((k / 0.5).to(tdt)))
    np.testing.assert_array_equal(raw(vc).reshape(-1, 2, 16)[slots.numpy()], raw((v / 0.25).to(tdt)))
    q = randn(rng, (1, 4, 16), "float32", lib="torch")
    bt, sl = torch.tensor([[0, 1, 2, 3]], dtype=torch.int32), torch.tensor([32], dtype=torch.int32)
    kc[1:3] = torch.randn(2, 8, 2, 16).to(tdt)  # the rest of the 32 tokens
    out = pagedflash.paged_attn(q, kc, vc, bt, sl, k_scale=0.5, v_scale=0.25, stream=stream)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    ref = reference.paged_attention(q, kc.double() * 0.5, vc.double() * 0.25, bt, sl)
    assert_close(out, ref, dtype="float32")


# ---------------------------------------------------------------------------
# write_kv_cache: quantization bit for bit
# ---------------------------------------------------------------------------


@cases(
    "dtype,kind,x_dtype",
    cpu=[(dt, k, x) for dt, k in KINDS for x in ("float32", "bfloat16")] + [("int8", "row", "float16")],
)
def test_write_quantizes_exactly(backend, rng, dtype, kind, x_dtype):
    """Codes (and int8 row scales) bit for bit as reference.quantize_kv, from any input dtype;
    negative slots skipped, untouched slots keep their bytes and scales; an all-zero row gets
    scale 1; values beyond the format saturate."""
    nb, bs, hk, d, n = 7, 8, 3, 40, 29
    lib = "torch" if x_dtype == "bfloat16" else "numpy"
    gain = np.exp(rng.uniform(-3, 3, (n, hk, 1))).astype(np.float32)  # rows of very different sizes
    k = (randn(rng, (n, hk, d), "float32") * gain).astype(np.float32)
    v = randn(rng, (n, hk, d), "float32") * np.float32(0.1)
    k[1, 0] = 0.0  # an all-zero row
    k[2, 1, :3] = [1e30, -1e30, 3e38]  # far beyond any scale: saturate
    if x_dtype == "bfloat16":  # the values the kernel sees
        k, v = (reference.to_f64(torch.from_numpy(x).bfloat16()).astype(np.float32) for x in (k, v))
    elif x_dtype == "float16":
        k, v = np.clip(k, -6e4, 6e4).astype(np.float16), v.astype(np.float16)
    xk, xv = (torch.from_numpy(x).bfloat16() if lib == "torch" else x for x in (k, v))
    kc = as_kv_cache(
        rng.integers(0, 256, (nb, bs, hk, d)).astype(np.uint8).view(np.int8 if dtype == "int8" else np.uint8),
        dtype,
        lib,
    )
    vc = as_kv_cache(
        rng.integers(0, 256, (nb, bs, hk, d)).astype(np.uint8).view(np.int8 if dtype == "int8" else np.uint8),
        dtype,
        lib,
    )
    if dtype in FP8:  # no stale NaN codes: the comparisons below are exact on every byte
        kc, vc = as_kv_cache(raw(kc) & 0x3F, dtype, lib), as_kv_cache(raw(vc) & 0x3F, dtype, lib)
    scales = {}
    if kind == "tensor":  # calibrated without the row that saturates
        scales = dict(
            k_scale=kv_tensor_scale(np.delete(np.asarray(k, np.float32), 2, axis=0), dtype), v_scale=np.float32(0.01)
        )
    elif kind == "row":
        scales = dict(
            k_scale=np.full((nb, bs, hk), np.nan, np.float32), v_scale=np.full((nb, bs, hk), -7.0, np.float32)
        )
    slots = rng.choice(nb * bs, size=n, replace=False).astype(np.int64)
    slots[[4, 11]] = -1
    before = {name: raw(x).copy() for name, x in dict(kc=kc, vc=vc, **scales).items()}
    pagedflash.write_kv_cache(xk, xv, kc, vc, slots, **scales)
    w = slots >= 0
    blk, off = slots[w] // bs, slots[w] % bs
    for name, cache, x in (("k", kc, k), ("v", vc, v)):
        s_in = scales.get(f"{name}_scale") if kind == "tensor" else None
        codes, s = reference.quantize_kv(x[w], dtype, s_in)
        exp = before[f"{name}c"].copy()
        exp[blk, off] = codes.view(exp.dtype)
        np.testing.assert_array_equal(raw(cache), exp, err_msg=f"{name}_cache")
        if kind == "row":
            exp_s = before[f"{name}_scale"].copy()
            exp_s[blk, off] = s
            np.testing.assert_array_equal(scales[f"{name}_scale"], exp_s, err_msg=f"{name}_scale")
    if kind == "row" and w[1]:
        i = int(np.flatnonzero(np.flatnonzero(w) == 1)[0])
        assert scales["k_scale"][blk[i], off[i], 0] == 1.0 and not raw(kc)[blk[i], off[i], 0].any()
    if w[2] and kind != "row":  # saturated: +-127 or +-the largest float8 (a row scale fits the row)
        i = int(np.flatnonzero(np.flatnonzero(w) == 2)[0])
        got = reference.dequantize_kv(raw(kc)[blk[i], off[i], 1, :3], dtype=dtype)
        top = 127 if dtype == "int8" else KV_MAX[dtype]
        np.testing.assert_array_equal(got, [top, -top, top])


def test_write_rounds_to_nearest_even(backend, rng):
    """Ties between two codes go to the even one (float8: the even mantissa, int8: the even
    integer); a value just past the tie rounds away."""
    for dtype, ties, want in (
        ("float8_e4m3fn", [1.0625, 1.1875, -1.0625, 2.0**-10, 3 * 2.0**-10], [1.0, 1.25, -1.0, 0.0, 2.0**-8]),
        ("float8_e5m2", [1.125, 1.375, 2.0**-17, 3 * 2.0**-17], [1.0, 1.5, 0.0, 2.0**-15]),
        ("int8", [0.5, 1.5, 2.5, -2.5, 126.5, 0.5000001], [0, 2, 2, -2, 126, 1]),
    ):
        x = np.zeros((1, 1, 8), np.float32)
        x[0, 0, : len(ties)] = ties
        kc = as_kv_cache(np.zeros((1, 1, 1, 8), np.int8 if dtype == "int8" else np.uint8), dtype, "numpy")
        vc = as_kv_cache(np.zeros((1, 1, 1, 8), np.int8 if dtype == "int8" else np.uint8), dtype, "numpy")
        pagedflash.write_kv_cache(x, x, kc, vc, np.array([0], np.int64), k_scale=1.0, v_scale=1.0)
        got = reference.dequantize_kv(kc, dtype=dtype)[0, 0, 0, : len(ties)]
        np.testing.assert_array_equal(got, want, err_msg=dtype)


@cases("dtype,kind", cpu=[("float8_e4m3fn", "tensor"), ("int8", "row"), ("int8", "tensor")], ids=kid)
def test_serving_loop(backend, rng, dtype, kind):
    """Prefill in chunks then decode into a compressed cache: each step writes the new tokens
    (quantizing) and attends with their queries; the result is attention over the quantized
    sequence (reference.quantize_kv of every token), computed contiguously in float64."""
    h, hk, d, bs, nb = 4, 2, 32, 16, 12
    kc = as_kv_cache(
        np.full((nb, bs, hk, d), 0x7F, np.uint8).view(np.int8 if dtype == "int8" else np.uint8), dtype, "numpy"
    )
    vc = as_kv_cache(raw(kc).copy(), dtype, "numpy")
    total = [70, 20]
    ks = [randn(rng, (n, hk, d), "float32", scale=2.0) for n in total]
    vs = [randn(rng, (n, hk, d), "float32") for n in total]
    qs = [randn(rng, (n, h, d), "float32") for n in total]
    if kind == "row":
        scales = dict(
            k_scale=np.full((nb, bs, hk), np.nan, np.float32), v_scale=np.full((nb, bs, hk), np.nan, np.float32)
        )
        fixed = dict(k=None, v=None)
    else:
        fixed = dict(k=kv_tensor_scale(np.concatenate(ks), dtype), v=kv_tensor_scale(np.concatenate(vs), dtype))
        scales = dict(k_scale=fixed["k"], v_scale=fixed["v"])
    tables = rng.permutation(nb)[:10].astype(np.int32).reshape(2, 5)

    def slots(b, lo, hi):
        t = np.arange(lo, hi)
        return tables[b, t // bs].astype(np.int64) * bs + t % bs

    for ranges in ([(0, 40), (0, 19)], [(40, 69), (19, 20)], [(69, 70), (20, 20)]):
        pagedflash.write_kv_cache(
            np.concatenate([ks[b][lo:hi] for b, (lo, hi) in enumerate(ranges)]),
            np.concatenate([vs[b][lo:hi] for b, (lo, hi) in enumerate(ranges)]),
            kc,
            vc,
            np.concatenate([slots(b, lo, hi) for b, (lo, hi) in enumerate(ranges)]),
            **scales,
        )
        q = np.concatenate([qs[b][lo:hi] for b, (lo, hi) in enumerate(ranges)])
        cu = np.cumsum([0] + [hi - lo for lo, hi in ranges]).astype(np.int32)
        sl = np.array([hi for _, hi in ranges], np.int32)
        out = pagedflash.paged_attn(q, kc, vc, tables, sl, cu_seqlens_q=cu, out=poison_like(q), **scales)
        for b, (lo, hi) in enumerate(ranges):
            if hi == lo:
                continue
            deq = [
                reference.dequantize_kv(*reference.quantize_kv(x[b][:hi], dtype, fixed[n]), dtype=dtype)
                for n, x in (("k", ks), ("v", vs))
            ]
            ref = reference.attention(qs[b][None, lo:hi], deq[0][None], deq[1][None], causal=True)[0]
            assert_close(out[cu[b] : cu[b + 1]], ref, dtype="float32")


# ---------------------------------------------------------------------------
# copy_blocks and swap_blocks move scales with their blocks
# ---------------------------------------------------------------------------


def test_copy_blocks_with_scales(backend, rng):
    """Every layer's int8 caches and their row scales, float8 caches (per-tensor scales do not
    move), in one call, bit for bit, pairs in order."""
    nb, bs, hk, d = 9, 4, 2, 8
    ks = [as_kv_cache(rng.integers(-127, 128, (nb, bs, hk, d)).astype(np.int8), "int8", "numpy") for _ in range(2)]
    vs = [as_kv_cache(rng.integers(-127, 128, (nb, bs, hk, d)).astype(np.int8), "int8", "numpy") for _ in range(2)]
    kss = [rng.random((nb, bs, hk)).astype(np.float32) for _ in range(2)]
    vss = [rng.random((nb, bs, hk)).astype(np.float32) for _ in range(2)]
    pairs = np.array([[1, 4], [4, 7], [8, 0]], np.int64)

    def expected(x):
        e = raw(x).copy()
        for s, t in pairs:
            e[t] = e[s]
        return e

    everything = ks + vs + kss + vss
    want = [expected(x) for x in everything]
    pagedflash.copy_blocks(ks, vs, pairs, k_scales=kss, v_scales=vss)
    for x, e in zip(everything, want):
        np.testing.assert_array_equal(raw(x), e)
    f8 = [
        as_kv_cache(rng.integers(0, 0x7E, (nb, bs, hk, d)).astype(np.uint8), "float8_e4m3fn", "numpy") for _ in range(2)
    ]
    want = [expected(x) for x in f8]
    pagedflash.copy_blocks(f8[:1], f8[1:], pairs)
    for x, e in zip(f8, want):
        np.testing.assert_array_equal(raw(x), e)
    # bad scales: nothing copied
    before = [raw(x).copy() for x in everything]
    for exc, match, kw in (
        (ValueError, r"k_scales: expected one scale per cache \(2\), got 1", dict(k_scales=kss[:1])),
        (
            ValueError,
            r"v_scales\[1\]: expected shape \[num_blocks, block_size, num_kv_heads\]",
            dict(v_scales=[vss[0], vss[1][:, :2]]),
        ),
        (TypeError, r"k_scales\[0\]: expected dtype float32", dict(k_scales=[kss[0].astype(np.float16), kss[1]])),
    ):
        with pytest.raises(exc, match=match):
            pagedflash.copy_blocks(ks, vs, np.array([[0, 1]], np.int64), **kw)
        assert all(np.array_equal(raw(x), b) for x, b in zip(everything, before))


def test_swap_blocks_with_scales(backend, rng):
    """An int8 cache and its row scales out to a host cache and back; float8 caches swap as bytes;
    mismatched or missing scales raise with dst untouched."""
    dev = as_kv_cache(rng.integers(-127, 128, (10, 4, 2, 8)).astype(np.int8), "int8", "numpy")
    dev_s = rng.random((10, 4, 2)).astype(np.float32)
    host = np.zeros((5, 4, 2, 8), np.int8)
    host_s = np.full((5, 4, 2), np.nan, np.float32)
    out_map = np.array([[2, 0], [3, 1], [9, 4]], np.int64)
    pagedflash.swap_blocks(dev, host, out_map, src_scale=dev_s, dst_scale=host_s)
    for a, b in out_map:
        np.testing.assert_array_equal(host[b], dev[a])
        np.testing.assert_array_equal(host_s[b], dev_s[a])
    assert np.isnan(host_s[[2, 3]]).all()
    pagedflash.swap_blocks(host, dev, [(0, 7), (4, 8)], src_scale=host_s, dst_scale=dev_s)
    np.testing.assert_array_equal(dev[7], dev[2])
    np.testing.assert_array_equal(dev_s[8], dev_s[9])
    f8 = as_kv_cache(rng.integers(0, 0x7E, (6, 4, 2, 8)).astype(np.uint8), "float8_e5m2", "numpy")
    f8_host = as_kv_cache(np.zeros((3, 4, 2, 8), np.uint8), "float8_e5m2", "numpy")
    pagedflash.swap_blocks(f8, f8_host, [(5, 2)])
    np.testing.assert_array_equal(raw(f8_host)[2], raw(f8)[5])

    before = (raw(host).copy(), host_s.copy(), raw(f8_host).copy())
    for exc, match, args, kw in (
        (ValueError, r"dst_scale: missing", (dev, host, [(0, 0)]), dict(src_scale=dev_s)),
        (
            ValueError,
            r"dst_scale: expected the shape of \[num_blocks",
            (dev, host, [(0, 0)]),
            dict(src_scale=dev_s, dst_scale=host_s[:, :2]),
        ),
        (
            TypeError,
            r"dst_scale: expected dtype float32",
            (dev, host, [(0, 0)]),
            dict(src_scale=dev_s, dst_scale=host_s.astype(np.float64)),
        ),
        (ValueError, r"block_mapping\[0, 1\] = 5", (dev, host, [(0, 5)]), dict(src_scale=dev_s, dst_scale=host_s)),
        (
            TypeError,
            r"src_scale: per-\(token, head\) scales move with int8 caches, src is float8_e5m2",
            (f8, f8_host, [(0, 0)]),
            dict(src_scale=np.ones((6, 4, 2), np.float32), dst_scale=np.ones((3, 4, 2), np.float32)),
        ),
        (
            ValueError,
            r"src_scale: expected a per-\(token, head\) scale",
            (dev, host, [(0, 0)]),
            dict(src_scale=np.array(1, np.float32), dst_scale=1.0),
        ),
    ):
        with pytest.raises(exc, match=match):
            pagedflash.swap_blocks(*args, **kw)
        assert np.array_equal(raw(host), before[0]) and np.array_equal(host_s, before[1], equal_nan=True)
        assert np.array_equal(raw(f8_host), before[2])


# ---------------------------------------------------------------------------
# bad input: clear errors, nothing written
# ---------------------------------------------------------------------------


def _bad_cases(rng):
    """(exception, message regex, write_kv_cache and paged_attn keyword changes) over a valid
    int8 call with row scales (k_scale/v_scale) and a float8 one (f8)."""
    nb, bs, hk, d = 4, 8, 2, 16
    i8 = lambda: np.zeros((nb, bs, hk, d), np.int8)  # noqa: E731
    rows = lambda: np.ones((nb, bs, hk), np.float32)  # noqa: E731
    f32 = np.zeros((nb, bs, hk, d), np.float32)
    return (
        [
            (
                TypeError,
                r"k_scale: k_cache is float32; scales go with float8_e4m3fn, float8_e5m2 and int8",
                dict(kc=f32, vc=f32.copy(), k_scale=np.float32(1), v_scale=None),
            ),
            (
                TypeError,
                r"k_scale: k_cache is float32",
                dict(kc=f32, vc=f32.copy(), k_scale=rows()),
            ),  # "int8 scales" on a float cache
            (ValueError, r"k_scale: missing; an int8 k_cache needs a float32 scale", dict(k_scale=None)),
            (
                ValueError,
                r"v_scale: expected the shape of \[num_blocks, block_size, num_kv_heads\] of the cache "
                r"\[4, 8, 2\], got \[4, 8, 1\]",
                dict(v_scale=rows()[..., :1]),
            ),
            (TypeError, r"k_scale: expected dtype float32, got float16", dict(k_scale=rows().astype(np.float16))),
            (ValueError, r"k_scale: the scale of k_cache must be finite and > 0, got 0", dict(k_scale=np.float32(0))),
            (
                ValueError,
                r"v_scale: the scale of v_cache must be finite and > 0, got -1",
                dict(v_scale=np.array([-1.0], np.float32)),
            ),
            (
                ValueError,
                r"k_scale: the scale of k_cache must be finite and > 0, got (nan|inf)",
                dict(k_scale=np.float32(np.inf)),
            ),
            (
                ValueError,
                r"k_scale: per-\(token, head\) scales go with int8 caches; k_cache is float8_e4m3fn",
                dict(f8=True, k_scale=rows()),
            ),
            (
                ValueError,
                r"k: k\[1, 0, 3\] is nan; a compressed cache \(int8\) holds finite values only",
                dict(nan_at=(1, 0, 3)),
            ),
            (
                ValueError,
                r"v: v\[2, 1, 0\] is -inf; a compressed cache \(float8_e4m3fn\) holds finite values",
                dict(f8=True, v_inf_at=(2, 1, 0)),
            ),
            (TypeError, r"v_cache: expected dtype int8 \(the dtype of k_cache\), got float8_e4m3fn", dict(vc="f8")),
            (
                TypeError,
                r"k_cache: kv_cache_dtype 'fp8' needs a float8_e4m3fn cache \(or raw bytes: uint8 or int8\), "
                r"got float32",
                dict(kc=f32, vc=f32.copy(), k_scale=None, v_scale=None, kv_cache_dtype="fp8"),
            ),
            (ValueError, r"kv_cache_dtype: unknown 'fp4'", dict(kv_cache_dtype="fp4")),
            (ValueError, r"k_scale: overlaps k_cache", dict(k_scale="alias")),
            (ValueError, r"v_scale: overlaps k_scale", dict(v_scale="same")),
        ],
        i8,
        rows,
    )


@pytest.mark.parametrize("case", range(16))
def test_bad_input(rng, case):
    """Each bad call raises, naming the argument; the caches and scales are exactly as before.
    write_kv_cache first, then paged_attn where the case applies to reading."""
    cases_, i8, rows = _bad_cases(rng)
    exc, match, ch = cases_[case]
    ml = pytest.importorskip("ml_dtypes") if ch.get("f8") or isinstance(ch.get("vc"), str) else None
    kc, vc = ch.get("kc", i8()), i8()
    kc[...] = 5
    if ch.get("f8"):
        kc = np.full(kc.shape, 0x38, np.uint8).view(ml.float8_e4m3fn)  # 1.0
        vc = kc.copy()
    if "vc" in ch:
        vc = ch["vc"] if not isinstance(ch["vc"], str) else np.zeros(kc.shape, np.uint8).view(ml.float8_e4m3fn)
    k_scale = ch.get("k_scale", None if ch.get("f8") else rows())
    v_scale = ch.get("v_scale", None if ch.get("f8") else rows())
    if isinstance(k_scale, str):  # a "scale" that is a view of the cache's own bytes
        k_scale = kc.reshape(-1).view(np.float32)[: 4 * 8 * 2].reshape(4, 8, 2)
    if isinstance(v_scale, str):
        v_scale = k_scale
    k = randn(rng, (3, 2, 16), "float32")
    v = randn(rng, (3, 2, 16), "float32")
    if "nan_at" in ch:
        k[ch["nan_at"]] = np.nan
    if "v_inf_at" in ch:
        v[ch["v_inf_at"]] = -np.inf
    slots = np.array([0, 9, 30], np.int64)
    kw = dict(k_scale=k_scale, v_scale=v_scale, kv_cache_dtype=ch.get("kv_cache_dtype", "auto"))
    keep = [x for x in (kc, vc, k_scale, v_scale) if isinstance(x, np.ndarray)]
    before = [raw(x).copy() for x in keep]
    with pytest.raises(exc, match=match):
        pagedflash.write_kv_cache(k, v, kc, vc, slots, **kw)
    assert all(np.array_equal(raw(x), b, equal_nan=True) for x, b in zip(keep, before))
    if "nan_at" in ch or "v_inf_at" in ch or isinstance(ch.get("k_scale"), str) or isinstance(ch.get("v_scale"), str):
        return  # write-only concerns (read scales may alias each other)
    q = randn(rng, (2, 4, 16), "float32")
    out = np.full(q.shape, np.nan, np.float32)
    with pytest.raises(exc, match=match):
        pagedflash.paged_attn(
            q, kc, vc, np.array([[0, 1], [2, 3]], np.int32), np.array([9, 16], np.int32), out=out, **kw
        )
    assert np.isnan(out).all()


def test_scales_from_any_library(backend, rng):
    """Per-tensor scales as Python numbers, NumPy 0-d / [1] and torch 0-d arrays; row scales as
    torch arrays: all read the same."""
    cache = quant_cache(rng, (40, 9), 2, 16, 8, "int8", "tensor")
    q = randn(rng, (2, 4, 16), "float32")
    want = pagedflash.paged_attn(q, *cache, **cache.scales)
    kscale, vscale = float(cache.scales["k_scale"]), float(cache.scales["v_scale"])
    variants = [dict(k_scale=kscale, v_scale=vscale), dict(k_scale=np.array([kscale], np.float32), v_scale=vscale)]
    if torch is not None:
        variants.append(dict(k_scale=torch.tensor(kscale), v_scale=torch.tensor([vscale])))
    for kw in variants:
        np.testing.assert_array_equal(pagedflash.paged_attn(q, *cache, **kw), want)


# ---------------------------------------------------------------------------
# accuracy against the unquantized cache; long-context retrieval
# ---------------------------------------------------------------------------

# bounds on the relative RMS error against the unquantized float32 cache, about 1.5x what this case
# measures (docs/serving.md has the numbers; the test prints them): the rounding error of one
# element, which attention's weighted average keeps (2^-4 / sqrt(3) for e4m3's 3 mantissa bits)
ACCURACY_BOUND = {
    ("float8_e4m3fn", "tensor"): 0.06,
    ("float8_e4m3fn", "none"): 0.06,
    ("float8_e5m2", "tensor"): 0.11,
    ("int8", "tensor"): 0.03,
    ("int8", "row"): 0.015,
    ("bfloat16", "-"): 0.006,
}


@cpu_only
def test_accuracy_against_unquantized(backend, rng, capsys):
    """Decode and prefill over one random cache stored unquantized (float32), as bfloat16 and in
    every compressed format: error statistics of out against float64 attention over the float32
    cache, per dtype (max and mean |error| relative to max|ref|, and the relative RMS)."""
    lens, hk, h, d, bs = [1024, 333, 2048, 77], 2, 8, 128, 16
    base = make_paged_cache(CPU, rng, lens, hk, d, bs, "float32")
    kc, vc, bt, sl = base.host
    q = randn(rng, (len(lens), 4, h, d), "float32")
    ref = reference.paged_attention(q, kc, vc, bt, sl)
    lines = []
    for dtype, kind in list(KINDS) + [("bfloat16", "-")]:
        if dtype == "bfloat16":
            if torch is None:
                continue
            tk, tv = (torch.from_numpy(x).bfloat16() for x in (kc, vc))
            out = pagedflash.paged_attn(torch.from_numpy(q).bfloat16(), tk, tv, bt, sl)
        else:
            kcodes, ks = quantize_kv_cache(rng, kc, dtype, kind)
            vcodes, vs = quantize_kv_cache(rng, vc, dtype, kind)
            k, v = as_kv_cache(kcodes, dtype, "numpy"), as_kv_cache(vcodes, dtype, "numpy")
            out = pagedflash.paged_attn(q, k, v, bt, sl, k_scale=ks, v_scale=vs)
        err = as_np64(out) - ref
        top = float(np.max(np.abs(ref)))
        mx, mean = float(np.max(np.abs(err))) / top, float(np.mean(np.abs(err))) / top
        rms = float(np.sqrt(np.mean(err**2) / np.mean(ref**2)))
        lines.append(f"{dtype:14s} {kind:6s} max {mx:.2e}  mean {mean:.2e}  rel-rms {rms:.2e}")
        assert rms <= ACCURACY_BOUND[(dtype, kind)], lines[-1]
    with capsys.disabled():
        print("\nKV-cache accuracy against float32 (decode + 4 queries, d=128, 4 sequences of 77..2048 tokens):")
        print("\n".join(lines))


@cases("dtype,kind", cpu=[(dt, k) for dt, k in KINDS] + [("bfloat16", "-")], ids=kid)
def test_long_context_retrieval(backend, rng, dtype, kind):
    """Three keys planted among 32768 distractors (at the start, the middle and near the end of a
    32771-token sequence written through write_kv_cache); query i is aligned with key i. Each query
    puts >= 90% of its attention on its key (measured with paged_attn's own lse) and its output is
    the planted value to 10%; out and lse also match the float64 reference on the dequantized
    cache. Float32 accumulation keeps this exact at any context length; bfloat16 caches pass it
    the same way."""
    n_dist, _h, d, bs = 32768, 1, 16, 256
    n = n_dist + 3
    pos = np.array([5, n // 2, n - 7])
    keys = randn(rng, (n, 1, d), "float32")
    vals = randn(rng, (n, 1, d), "float32")
    qv = randn(rng, (3, d), "float32")
    qv *= np.float32(5.0) / np.linalg.norm(qv, axis=1, keepdims=True)  # |q| = 5
    # planted score 3 |q|^2 / sqrt(d) = 18.75; distractors ~ N(0, 1.25^2): e^18.75 >> 32768 e^0.78
    keys[pos, 0] = 3.0 * qv
    vals[pos, 0] = 3.0 * np.sign(randn(rng, (3, d), "float32"))
    nb = (n + bs - 1) // bs
    table = rng.permutation(nb).astype(np.int32)[None]
    slots = table[0][np.arange(n) // bs].astype(np.int64) * bs + np.arange(n) % bs
    if dtype == "bfloat16":
        if torch is None:
            pytest.skip("needs torch")
        kc, vc = torch.zeros((nb, bs, 1, d), dtype=torch.bfloat16), torch.zeros((nb, bs, 1, d), dtype=torch.bfloat16)
        pagedflash.write_kv_cache(torch.from_numpy(keys).bfloat16(), torch.from_numpy(vals).bfloat16(), kc, vc, slots)
        scales = {}
        deq_k, deq_v = as_np64(kc), as_np64(vc)
    else:
        kc = as_kv_cache(np.zeros((nb, bs, 1, d), np.int8 if dtype == "int8" else np.uint8), dtype, "numpy")
        vc = as_kv_cache(raw(kc).copy(), dtype, "numpy")
        if kind == "row":
            scales = dict(k_scale=np.zeros((nb, bs, 1), np.float32), v_scale=np.zeros((nb, bs, 1), np.float32))
        elif kind == "tensor":
            scales = dict(k_scale=kv_tensor_scale(keys, dtype), v_scale=kv_tensor_scale(vals, dtype))
        else:
            scales = {}
        pagedflash.write_kv_cache(keys, vals, kc, vc, slots, **scales)
        deq_k = reference.dequantize_kv(kc, scales.get("k_scale"), dtype=dtype)
        deq_v = reference.dequantize_kv(vc, scales.get("v_scale"), dtype=dtype)
    q = qv.reshape(1, 3, 1, d)
    if dtype == "bfloat16":  # a bfloat16 cache takes bfloat16 queries
        q = torch.from_numpy(q).bfloat16()
    seq_lens = np.array([n], np.int32)
    out, lse = pagedflash.paged_attn(q, kc, vc, table, seq_lens, causal=False, return_lse=True, **scales)
    out, lse = as_np64(out)[0, :, 0], as_np64(lse)[0]
    ref, ref_lse = reference.paged_attention(q, deq_k, deq_v, table, seq_lens, causal=False, return_lse=True)
    if dtype != "bfloat16":  # (out in bfloat16: the retrieval checks below stand for it)
        assert_close(out, ref[0, :, 0], dtype="float32")
    check_lse(lse, ref_lse[0])
    k_seq = deq_k[table[0][np.arange(n) // bs], np.arange(n) % bs, 0]
    scores = (as_np64(q)[0, :, 0] @ k_seq.T) / np.sqrt(d)  # [3, n]
    weight = np.exp(scores[np.arange(3), pos] - lse)  # the attention on each planted key
    assert np.all(np.argmax(scores, axis=1) == pos), "the planted key scores highest"
    assert np.all(weight >= 0.9), f"attention on the planted keys {weight}"
    v_seq = deq_v[table[0][np.arange(n) // bs], np.arange(n) % bs, 0]
    rel = np.linalg.norm(out - v_seq[pos], axis=1) / np.linalg.norm(v_seq[pos], axis=1)
    assert np.all(rel <= 0.1), f"output vs planted value: {rel}"


# ---------------------------------------------------------------------------
# CUDA: compressed caches are refused in paged_attn and write_kv_cache, moved by copy / swap
# ---------------------------------------------------------------------------


@cuda_only
def test_cuda_refuses_compressed_caches(backend, rng):
    kc = torch.zeros((4, 8, 2, 16), dtype=torch.float8_e4m3fn, device="cuda")
    vc = torch.zeros_like(kc)
    k = torch.randn(3, 2, 16, device="cuda")
    with pytest.raises(
        NotImplementedError, match=r"k_cache: float8_e4m3fn caches are not supported by the cuda backend"
    ):
        pagedflash.write_kv_cache(k, k, kc, vc, torch.tensor([0, 1, 2], device="cuda"))
    q = torch.randn(1, 4, 16, device="cuda")
    bt, sl = torch.tensor([[0]], dtype=torch.int32, device="cuda"), torch.tensor([3], dtype=torch.int32, device="cuda")
    with pytest.raises(NotImplementedError, match=r"k_cache: float8_e4m3fn caches are not supported"):
        pagedflash.paged_attn(q, kc, vc, bt, sl)
    i8 = torch.randint(-127, 128, (6, 8, 2, 16), dtype=torch.int8, device="cuda")
    s = torch.rand(6, 8, 2, device="cuda")
    want, want_s = i8[2].clone(), s[2].clone()
    pagedflash.copy_blocks([i8], [], np.array([[2, 5]], np.int64), k_scales=[s])
    host = torch.zeros(2, 8, 2, 16, dtype=torch.int8).pin_memory()
    host_s = torch.zeros(2, 8, 2).pin_memory()
    pagedflash.swap_blocks(i8, host, [(5, 1)], src_scale=s, dst_scale=host_s)
    torch.cuda.synchronize()
    assert torch.equal(i8[5], want) and torch.equal(s[5], want_s)
    assert torch.equal(host[1], want.cpu()) and torch.equal(host_s[1], want_s.cpu())
