"""paged_attn on every backend: decode, several queries per sequence (dense q_len > 1), packed
chunked prefill / mixed batches, flash decoding splits, every masking option, against the
float64 reference on each sequence's contiguous tokens (rule: tests/conftest.py).

Caches come from conftest.make_paged_cache: a random permutation of blocks (shared prefix blocks
repeat across sequences), partial last blocks, stale NaN in every slot no sequence holds, garbage
in the unused tail of every block-table row: none of it may reach an output. Outputs are
NaN-poisoned. On CUDA the general cases run with kernel="auto"; test_kernel_configs forces every
CTA shape (and the CUDA-core kernel) through a battery of scenarios (a 5000-token sequence split
over many CTAs, blocks of 3 and 8 tokens, windows, softcap, ALiBi, several queries per sequence,
packed empty query ranges, two KV-head groups per sequence, 300 sequences, empty sequences).
CUDA-only: device-resident bad block ids and seq_lens, CUDA graphs (split partials in the
scratch pool), streams, the launcher's shape and split heuristics, the hints it refuses.
"""

from __future__ import annotations

import numpy as np
import pytest

import pagedflash
from conftest import (
    DTYPES,
    PAGED_KERNELS,
    ULP,
    Backend,
    alibi_slopes,
    as_np64,
    assert_close,
    cases,
    check_lse,
    cpu_only,
    cuda_only,
    gather,
    make_paged_cache,
    make_paged_q,
    naive_attention_lowp,
    naive_lowp_paged,
    poison_like,
    randn,
    torch,
)
from pagedflash import reference


class Run:
    """What run_paged built and computed."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def run_paged(
    backend,
    rng,
    *,
    dtype="bfloat16",
    lens=(113, 1, 203),
    qlens=None,
    h=8,
    hk=2,
    d=128,
    bs=16,
    layout="decode",
    share=False,
    num_splits=0,
    causal=True,
    window=(-1, -1),
    softcap=0.0,
    alibi=None,
    softmax_scale=None,
    kernel="auto",
    kv=None,
):
    """Build a paged cache and queries on the backend, run paged_attn into a NaN-poisoned out and
    check out and lse against the float64 reference (and the naive same-precision result).
    kv=(cache dtype, scale kind): a compressed cache (conftest.make_paged_cache) read by queries
    of `dtype`, against the reference on its dequantized values (tests/ops/test_kv_quant.py)."""
    qlens = list(qlens or [1] * len(lens))
    cache = make_paged_cache(backend, rng, lens, hk, d, bs, dtype, share=share, kv=kv)
    q, cu_q, q_host, cu_host, offs = make_paged_q(backend, rng, layout, qlens, h, d, dtype)
    slopes = alibi_slopes(rng, alibi, len(lens), h, 0.01, 0.5)
    opts = dict(causal=causal, window=window, softcap=softcap, softmax_scale=softmax_scale)
    out = poison_like(q)
    res, lse = pagedflash.paged_attn(
        q,
        *cache,
        cu_seqlens_q=cu_q,
        alibi_slopes=backend.put(slopes),
        num_splits=num_splits,
        return_lse=True,
        out=out,
        kernel=kernel,
        **cache.scales,
        **opts,
    )
    assert res is out and type(lse) is type(q)
    ref, ref_lse = reference.paged_attention(
        q_host, *cache.host, cu_seqlens_q=cu_host, alibi_slopes=slopes, return_lse=True, **cache.scales, **opts
    )
    naive = None if dtype == "float32" else naive_lowp_paged(q_host, cache, offs, alibi_slopes=slopes, **opts)
    assert_close(out, ref, naive, dtype=dtype)
    check_lse(lse, ref_lse)
    return Run(
        q=q,
        q_host=q_host,
        cache=cache,
        cu_q=cu_q,
        cu_host=cu_host,
        offs=offs,
        slopes=slopes,
        opts=opts,
        out=out,
        lse=lse,
        ref=ref,
        ref_lse=ref_lse,
        naive=naive,
    )


# ---------------------------------------------------------------------------
# decode: one query per sequence
# ---------------------------------------------------------------------------


def _decode_scenario(name, dtype):
    """(lens, h, hk, d, share) runs of a decode scenario."""
    if name == "gqa_mix":  # every GQA ratio, head dims 40..128, lengths 1..203, shared prefixes
        return [
            ([1, 7, 113, 203, 64, 17][: 3 + i], h, hk, [40, 64, 96, 128][i], i % 2 == 0)
            for i, (h, hk) in enumerate([(4, 4), (6, 2), (8, 1), (6, 3)])
        ]
    if name == "long":
        return [((1, 113, 1023, 203), 8, 2, 128, False)]
    return [((7, 113, 50), 8, 2, 128, False)]  # "odd": block sizes that are not powers of two


@cases(
    "dtype,bs,scenario",
    cpu=[(dt, bs, "gqa_mix") for dt in DTYPES for bs in (1, 8, 16, 32, 256)],
    cuda=[(dt, bs, "gqa_mix") for dt in DTYPES for bs in (1, 8, 16, 32, 256)]
    + [("bfloat16", bs, "long") for bs in (8, 16, 32, 64, 128, 256)]
    + [("float16", bs, "odd") for bs in (1, 3, 24)],
    ids=lambda dt, bs, sc: f"{sc}-{dt}-bs{bs}",
)
def test_decode(backend, rng, dtype, bs, scenario):
    for lens, h, hk, d, share in _decode_scenario(scenario, dtype):
        run_paged(backend, rng, dtype=dtype, lens=lens, h=h, hk=hk, d=d, bs=bs, share=share)


@cases("dtype", cpu=DTYPES, cuda=DTYPES)
def test_decode_long(backend, rng, dtype):
    """A few thousand tokens, with automatic splits and with many."""
    run_paged(backend, rng, dtype=dtype, lens=[3001, 1023], h=8, hk=2, d=80, bs=16, share=True)
    run_paged(backend, rng, dtype=dtype, lens=[2047], h=4, hk=1, d=64, bs=32, num_splits=0)  # one work item
    run_paged(backend, rng, dtype=dtype, lens=[2047], h=4, hk=1, d=64, bs=32, num_splits=9)


def test_head_dims_and_many_heads(backend, rng):
    """head_dim 1, odd, 256; a group of 80 query heads per KV head (> one 64-row tile)."""
    for d in (1, 13, 256):
        run_paged(backend, rng, dtype="float32", lens=[5, 70], h=2, hk=1, d=d)
    run_paged(backend, rng, dtype="float32", lens=[33, 100], qlens=[3, 3], h=80, hk=1, d=16, bs=8, layout="dense")


@cases(
    "d,dtype",
    cpu=[(d, "bfloat16") for d in (32, 64, 96, 128, 192, 256, 40, 80, 7)],
    cuda=[(d, dt) for d in (32, 64, 96, 128, 192, 256, 40, 80, 7) for dt in ("bfloat16", "float16")],
)
def test_head_dims(backend, rng, d, dtype):
    """The tensor-core head dims and ones between them (the CUDA-core kernel on CUDA)."""
    run_paged(backend, rng, d=d, dtype=dtype, lens=(129, 3), qlens=[2, 2], layout="dense", h=4, hk=2)


@cases("d", cpu=[64, 128, 33], cuda=[64, 128, 33])
def test_float32(backend, rng, d):
    run_paged(backend, rng, d=d, dtype="float32", lens=(129, 64, 1), h=4, hk=1, bs=8)
    run_paged(backend, rng, d=d, dtype="float32", lens=(50, 70), qlens=[3, 3], layout="dense", h=4, hk=2, num_splits=3)


@cases(
    "h,hk",
    cpu=[(8, 8), (8, 1), (32, 8), (6, 2)],
    cuda=[(8, 8), (8, 4), (8, 2), (8, 1), (12, 4), (32, 8), (24, 1), (6, 2)],
)
def test_gqa_ratios(backend, rng, h, hk):
    run_paged(backend, rng, h=h, hk=hk, lens=(77, 1, 300))


# ---------------------------------------------------------------------------
# several queries per sequence: speculative verification, chunked prefill, mixed batches
# ---------------------------------------------------------------------------


@cases(
    "dtype,q_len",
    cpu=[(dt, n) for dt in DTYPES for n in (1, 3, 17)],
    cuda=[(dt, n) for dt in DTYPES for n in (1, 3, 17)],
)
def test_dense_q_len(backend, rng, dtype, q_len):
    """q [batch, q_len, h, d]: the queries are each sequence's last q_len tokens."""
    lens = [q_len, q_len + 6, 113, 203]
    for bs, (h, hk) in ((16, (4, 4)), (8, (6, 2)), (32, (8, 1))):
        run_paged(
            backend,
            rng,
            dtype=dtype,
            lens=lens,
            qlens=[q_len] * len(lens),
            h=h,
            hk=hk,
            d=72,
            bs=bs,
            layout="dense",
            share=True,
        )


@cases(
    "qlen,layout,causal",
    cpu=[(17, lay, c) for lay in ("dense", "packed") for c in (True, False)],
    cuda=[(n, lay, c) for n in (1, 3, 17) for lay in ("dense", "packed") for c in (True, False)],
    ids=lambda n, lay, c: f"q{n}-{lay}-{'causal' if c else 'full'}-bfloat16",
)
def test_query_lengths(backend, rng, qlen, layout, causal):
    run_paged(backend, rng, lens=(qlen + 6, 203, 130), qlens=[qlen] * 3, layout=layout, causal=causal)


@cases("dtype", cpu=DTYPES, cuda=DTYPES)
def test_packed_mixed(backend, rng, dtype):
    """Chunked prefill (a chunk of 150 in a longer sequence, a whole prompt), decode,
    speculative verification and a sequence with no queries this step."""
    for bs in (1, 16, 256):
        run_paged(
            backend,
            rng,
            dtype=dtype,
            lens=[300, 150, 1, 41, 20],
            qlens=[150, 150, 1, 5, 0],
            h=6,
            hk=2,
            d=48,
            bs=bs,
            layout="packed",
        )


def test_packed_mixed_lengths(backend, rng):
    """Decode, chunked prefill, speculative verification and an empty query set in one batch."""
    run_paged(backend, rng, lens=(40, 300, 5, 97, 64), qlens=[1, 37, 0, 5, 64], layout="packed", bs=32, h=12, hk=4)


# ---------------------------------------------------------------------------
# masking options, lse, libraries
# ---------------------------------------------------------------------------

OPTIONS = [
    ("window", dict(window=(64, -1))),
    ("window_bidir", dict(window=(5, 2), causal=False)),
    ("right_only", dict(window=(-1, 3), causal=False)),
    ("noncausal", dict(causal=False)),
    ("softcap", dict(softcap=5.0)),
    ("alibi", dict(alibi="heads")),
    ("alibi_batch_window", dict(alibi="batch", window=(40, 0))),
    ("scale_softcap_alibi", dict(softmax_scale=0.3, softcap=2.0, alibi="heads")),
]


@cases(
    "dtype,opt",
    cpu=[(dt, i) for dt in DTYPES for i in range(len(OPTIONS))],
    cuda=[(dt, i) for dt in DTYPES for i in range(len(OPTIONS))],
    ids=lambda dt, i: f"{OPTIONS[i][0]}-{dt}",
)
def test_options(backend, rng, dtype, opt):
    opts = OPTIONS[opt][1]
    run_paged(
        backend, rng, dtype=dtype, lens=[130, 9, 257], qlens=[4, 9, 17], h=4, hk=2, d=56, bs=16, layout="packed", **opts
    )
    run_paged(backend, rng, dtype=dtype, lens=[1, 77, 300], h=4, hk=1, d=32, bs=8, num_splits=3, **opts)


def test_masks_softcap_alibi(backend, rng):
    run_paged(backend, rng, window=(50, -1), lens=(300, 20, 129))
    run_paged(backend, rng, window=(9, 4), causal=False, lens=(300, 20), qlens=[5, 5], layout="dense", bs=32)
    run_paged(backend, rng, softcap=30.0, lens=(300, 20), softmax_scale=0.3)
    run_paged(backend, rng, alibi="heads", lens=(300, 20), qlens=[3, 3], layout="dense")
    run_paged(backend, rng, alibi="batch", lens=(300, 20), bs=64, num_splits=4)
    run_paged(
        backend,
        rng,
        softcap=5.0,
        alibi="heads",
        window=(17, -1),
        lens=(257, 33, 2),
        qlens=[2, 17, 0],
        layout="packed",
        bs=8,
        dtype="float16",
        num_splits=3,
    )


def test_window_zero_sees_own_token(backend, rng):
    """window (0, 0): query i sees exactly token seq_len - q_len + i, so out is that token's v."""
    r = run_paged(backend, rng, dtype="float32", lens=[20, 40], h=2, hk=1, d=16, bs=8, window=(0, 0), causal=False)
    vc, bt, sl = r.cache.host[1], r.cache.host[2], r.cache.host[3]
    out = as_np64(r.out)
    for b, n in enumerate(sl):
        v_last = as_np64(gather(vc, bt[b], int(n), 8)[-1, 0])
        np.testing.assert_allclose(out[b, 0], v_last, rtol=1e-6)
        np.testing.assert_allclose(out[b, 1], v_last, rtol=1e-6)


def test_library_in_library_out(backend, rng):
    """NumPy in, NumPy out; torch in, torch out (on the input's device); lse float32 [h, total_q]."""
    cache = make_paged_cache(backend, rng, [9, 30], 2, 32, 8, "float32")
    q = backend.randn(rng, (2, 4, 32), "float32")
    out = pagedflash.paged_attn(q, *cache)
    assert type(out) is type(q) and tuple(out.shape) == tuple(q.shape) and out.dtype == q.dtype
    if torch is not None and not backend.is_cuda:
        tq, tk, tv, tb, ts = (torch.from_numpy(x) for x in (q, *cache))
        tout, tlse = pagedflash.paged_attn(tq, tk, tv, tb, ts, return_lse=True)
        assert isinstance(tout, torch.Tensor) and isinstance(tlse, torch.Tensor)
        assert tlse.dtype == torch.float32 and tuple(tlse.shape) == (4, 2)
        np.testing.assert_array_equal(tout.numpy(), out)
    if backend.is_cuda:
        o, lse = pagedflash.paged_attn(q, *cache, return_lse=True)
        assert o.device == q.device and lse.device == q.device and lse.dtype == torch.float32
        assert tuple(lse.shape) == (4, 2)


# ---------------------------------------------------------------------------
# flash decoding: any number of splits agrees with one split
# ---------------------------------------------------------------------------

# split counts <= 4, 5..16 and > 16 (the merge of the partials is configured by the count),
# more than the tokens allow (capped), and 0 = automatic
SPLITS = (1, 2, 4, 5, 7, 16, 17, 24, 64, 1000, 0)


@cases(
    "dtype,d", cpu=[(dt, 64) for dt in DTYPES] + [("float32", 256)], cuda=[(dt, d) for dt in DTYPES for d in (128, 256)]
)
def test_splits_agree(backend, rng, dtype, d):
    """Every split count gives the reference result, and agrees with one split to 2 units in the
    last place of the dtype (float32: 2e-5) relative to max|out|; head dims <= 128 and > 128."""
    cache = make_paged_cache(backend, rng, (1500, 700, 77, 9), 2, d, 16, dtype, share=True)
    q = backend.randn(rng, (4, 8, d), dtype)
    ref, ref_lse = reference.paged_attention(q, *cache.host, return_lse=True)
    naive = None if dtype == "float32" else naive_lowp_paged(backend.host(q), cache, np.arange(5))
    one = None
    for n in SPLITS:
        out, lse = pagedflash.paged_attn(q, *cache, num_splits=n, return_lse=True, out=poison_like(q))
        assert_close(out, ref, naive, dtype=dtype, what=f"out, num_splits={n}")
        check_lse(lse, ref_lse, what=f"lse, num_splits={n}")
        if one is None:
            one = as_np64(out)
        diff = float(np.max(np.abs(as_np64(out) - one)))
        assert diff <= 2 * ULP[dtype] * float(np.max(np.abs(one))), f"num_splits={n} vs 1: {diff:.3e}"


def test_splits_multi_query(backend, rng):
    """Splits with chunked-prefill queries and a window: partials of empty splits must not leak."""
    for opts in (dict(), dict(window=(100, 0))):
        for n in (1, 4, 15):
            run_paged(
                backend,
                rng,
                dtype="float32",
                lens=[900, 400],
                qlens=[37, 3],
                h=3,
                hk=1,
                d=24,
                bs=32,
                layout="packed",
                num_splits=n,
                **opts,
            )


def test_repeatable(backend, rng):
    cache = make_paged_cache(backend, rng, [700, 33], 2, 64, 16, "float16")
    q = backend.randn(rng, (2, 3, 4, 64), "float16")
    first = as_np64(pagedflash.paged_attn(q, *cache, num_splits=4))
    for _ in range(3):
        assert np.array_equal(as_np64(pagedflash.paged_attn(q, *cache, num_splits=4)), first)


@cases("dtype", cpu=["float32"], cuda=["float32", "bfloat16"])
def test_random_configurations(backend, rng, dtype):
    """A sweep over combinations the parametrized tests do not pair up."""
    for _ in range(24):
        hk = int(rng.choice([1, 2, 3]))
        h = hk * int(rng.choice([1, 2, 3, 5, 8]))
        d = int(rng.choice([8, 20, 33, 64, 100]))
        bs = int(rng.choice([1, 3, 8, 16, 50, 64, 256]))
        batch = int(rng.integers(1, 5))
        lens = [int(x) for x in rng.integers(1, 400, size=batch)]
        qlens = [int(rng.integers(0 if i else 1, min(n, 40) + 1)) for i, n in enumerate(lens)]
        opts = {}
        if rng.random() < 0.3:
            opts["window"] = (int(rng.integers(-1, 50)), int(rng.integers(-1, 5)))
        if rng.random() < 0.3:
            opts["causal"] = False
        if rng.random() < 0.3:
            opts["softcap"] = float(rng.uniform(1, 10))
        if rng.random() < 0.3:
            opts["alibi"] = "heads" if rng.random() < 0.5 else "batch"
        run_paged(
            backend,
            rng,
            dtype=dtype,
            lens=lens,
            qlens=qlens,
            h=h,
            hk=hk,
            d=d,
            bs=bs,
            layout="packed",
            share=batch > 1 and rng.random() < 0.5,
            num_splits=int(rng.choice([0, 1, 3, 7])),
            **opts,
        )


# ---------------------------------------------------------------------------
# kernels (CUDA): every CTA shape and the CUDA-core kernel, forced
# ---------------------------------------------------------------------------


@cases("kernel,hk", cuda=PAGED_KERNELS)
def test_kernel_configs(backend, rng, kernel, hk):
    """bfloat16, d = 128 unless noted."""
    # one long sequence split across many CTAs, short ones, a single token
    run_paged(backend, rng, lens=(5000, 1, 37, 300), h=4 * hk, hk=hk, kernel=kernel)
    # blocks smaller than a tile / not a multiple of it
    run_paged(backend, rng, lens=(999, 64, 2), h=2 * hk, hk=hk, bs=8, window=(100, -1), kernel=kernel)
    run_paged(backend, rng, lens=(700, 33), h=hk, hk=hk, bs=3, softcap=20.0, alibi="heads", kernel=kernel)
    # several queries per sequence (16-row tiles); packed with an empty query range
    run_paged(backend, rng, lens=(400, 129), qlens=[5, 5], layout="dense", h=4 * hk, hk=hk, bs=32, kernel=kernel)
    run_paged(
        backend,
        rng,
        lens=(250, 40, 900),
        qlens=[3, 0, 17],
        layout="packed",
        h=2 * hk,
        hk=hk,
        bs=64,
        causal=False,
        window=(30, 8),
        kernel=kernel,
    )
    # two KV-head groups per sequence (the CTA's heads are not a whole token row), d = 64
    run_paged(backend, rng, lens=(600, 90), h=4 * hk, hk=2 * hk, d=64, kernel=kernel)
    # more sequences than the GPU has slots for CTAs (no split, several waves)
    lens = tuple(int(x) for x in rng.integers(1, 120, size=300))
    run_paged(backend, rng, lens=lens, h=hk, hk=hk, kernel=kernel)
    # empty sequences among long and short ones (rows with no token: out = 0, lse = -inf)
    run_paged(backend, rng, lens=(0, 3000, 0, 7, 0), h=4 * hk, hk=hk, kernel=kernel)
    run_paged(backend, rng, lens=(0, 0), h=2 * hk, hk=hk, kernel=kernel)


@cpu_only
def test_kernel_hints_cpu(backend, rng):
    """The CPU backend has one kernel: every valid paged hint gives the automatic result bit for bit."""
    cache = make_paged_cache(backend, rng, [70, 5], 2, 64, 16, "float16")
    q = backend.randn(rng, (2, 3, 4, 64), "float16")
    base, lse = pagedflash.paged_attn(q, *cache, num_splits=2, return_lse=True)
    for name in (
        ["simple", "sm90"] + [k for k, _ in PAGED_KERNELS] + ["1x8+registers", "2x8+registers", "4x8+registers"]
    ):
        o, l = pagedflash.paged_attn(q, *cache, num_splits=2, return_lse=True, kernel=name)
        assert np.array_equal(o, base) and np.array_equal(l, lse), name


def test_kernel_hint_names(backend, rng):
    """An unknown name, or a flash attention hint, is a ValueError on every backend; nothing written."""
    cache = make_paged_cache(backend, rng, [20, 5], 2, 64, 16, "bfloat16")
    q = backend.randn(rng, (2, 4, 64), "bfloat16")
    out = poison_like(q)
    for bad, match in (
        ("bogus", "unknown kernel"),
        ("sm80", "not a kernel of paged_attn"),
        ("8x4", "unknown kernel"),
        ("simple+registers", "kernel"),
    ):
        with pytest.raises(ValueError, match=match):
            pagedflash.paged_attn(q, *cache, out=out, kernel=bad)
    assert np.isnan(as_np64(out)).all()


@cuda_only
def test_kernel_refusals(backend, rng):
    """A hint whose kernel cannot take the call raises NotImplementedError and writes nothing:
    tensor-core shapes for float32, for head dims without tensor-core kernels, for unaligned
    queries; the mixed shapes 1x8 / 2x8 / 4x8 outside head dims 64 and 128 and with
    "+registers". The CUDA-core kernel ("simple") takes each of these calls."""

    def refuse(q, cache, kernel):
        out = poison_like(q)
        with pytest.raises(NotImplementedError):
            pagedflash.paged_attn(q, *cache, out=out, kernel=kernel)
        assert torch.isnan(out).all()

    def accept(q, cache):
        out = pagedflash.paged_attn(q, *cache, kernel="simple")
        ref = reference.paged_attention(q, *cache.host)
        naive = None if q.dtype == torch.float32 else naive_lowp_paged(q.cpu(), cache, np.arange(q.shape[0] + 1))
        assert_close(out, ref, naive, dtype=str(q.dtype).rpartition(".")[2])

    for dtype, d, kernels in (
        ("float32", 128, ("1x4", "4x4", "8x8+registers", "1x8")),
        ("bfloat16", 40, ("1x4", "4x4", "8x8", "1x4+registers")),
        ("bfloat16", 96, ("1x8", "2x8", "4x8")),
        ("float16", 128, ("1x8+registers", "2x8+registers", "4x8+registers")),
    ):
        cache = make_paged_cache(backend, rng, [70, 5], 8, d, 16, dtype)
        q = backend.randn(rng, (2, 8, d), dtype)
        for kernel in kernels:
            refuse(q, cache, kernel)
        accept(q, cache)
    # queries whose rows start 2 bytes past a 16-byte boundary
    cache = make_paged_cache(backend, rng, [70, 5], 4, 64, 16, "bfloat16")
    q = backend.randn(rng, (2, 4, 65), "bfloat16")[..., 1:]
    for kernel in ("1x4", "4x4", "1x8"):
        refuse(q, cache, kernel)
    accept(q, cache)


# ---------------------------------------------------------------------------
# the prefill path (CUDA, Hopper): the wgmma flash forward reading K/V through the block table
# ---------------------------------------------------------------------------

# (name, run_paged arguments): prompts and chunks at every masking option, both query layouts,
# the extras kernel (softcap / ALiBi), GQA / MQA, long contexts, many sequences (the packed plan)
PREFILL_SCENARIOS = [
    ("dense_causal", dict(lens=(300, 517, 1000), qlens=[300] * 3, layout="dense", h=8, hk=2)),
    ("dense_full_mqa", dict(lens=(129, 64, 700), qlens=[64] * 3, layout="dense", h=6, hk=1, causal=False)),
    ("packed_chunks", dict(lens=(300, 150, 1, 41, 20, 900), qlens=[150, 150, 1, 5, 0, 257], layout="packed")),
    ("window", dict(lens=(400, 1000), qlens=[400, 333], layout="packed", window=(64, -1), h=4, hk=4)),
    ("window_bidir", dict(lens=(300, 257), qlens=[200, 200], layout="dense", window=(17, 5), causal=False)),
    ("softcap_alibi", dict(lens=(700, 129), qlens=[129, 129], layout="dense", softcap=5.0, alibi="heads")),
    ("alibi_batch_scale", dict(lens=(500, 77), qlens=[250, 77], layout="packed", alibi="batch", softmax_scale=0.3)),
    ("long", dict(lens=(5000,), qlens=[1000], layout="packed", h=4, hk=1)),
    (
        "many",
        dict(lens=tuple(range(40, 1500, 97)), qlens=[n // 4 for n in range(40, 1500, 97)], layout="packed", h=4, hk=2),
    ),
    ("empty_sequences", dict(lens=(0, 300, 0, 64), qlens=[0, 300, 0, 64], layout="packed")),
]


@cases(
    "dtype,d,bs,scenario",
    cuda=[("bfloat16", 128, bs, i) for bs in (16, 64, 256) for i in range(len(PREFILL_SCENARIOS))]
    + [("float16", d, bs, i) for d in (64, 40) for bs in (1, 3, 32) for i in (0, 2, 5)]
    + [("float16", 128, 24, i) for i in (1, 3, 6, 9)],
    ids=lambda dt, d, bs, i: f"{PREFILL_SCENARIOS[i][0]}-{dt}-d{d}-bs{bs}",
)
def test_prefill_kernel(backend, rng, dtype, d, bs, scenario):
    """kernel="sm90": every scenario on the flash forward over the paged cache, against the
    float64 reference (out and lse); block sizes below, equal to and above the 64 / 128-key
    tiles, and ones that do not divide them; head dim 40 runs on the 64 tile."""
    kw = dict(PREFILL_SCENARIOS[scenario][1])
    if backend.refuses("sm90"):
        with pytest.raises(NotImplementedError, match="sm90"):
            run_paged(backend, rng, dtype=dtype, d=d, bs=bs, kernel="sm90", **kw)
        return
    run_paged(backend, rng, dtype=dtype, d=d, bs=bs, kernel="sm90", **kw)


@cuda_only
def test_prefill_routing(backend, rng):
    """ "auto" runs calls with >= 128 queries per sequence (and no explicit split count) on the
    prefill path where it can: bit for bit the "sm90" result; fewer queries, or num_splits > 1,
    keep the split-KV kernel (the "sm90" result differs in rounding somewhere)."""
    if not backend.has_sm90:
        pytest.skip("the prefill path needs Hopper and an sm_90 build")
    cache = make_paged_cache(backend, rng, (700, 300), 2, 128, 16, "bfloat16")
    for q_len, splits, prefill in ((128, 0, True), (128, 1, True), (200, 0, True), (127, 0, False), (128, 3, False)):
        q = backend.randn(rng, (2, q_len, 8, 128), "bfloat16")
        auto = pagedflash.paged_attn(q, *cache, num_splits=splits)
        flash = pagedflash.paged_attn(q, *cache, kernel="sm90")
        assert torch.equal(auto, flash) == prefill, (q_len, splits)
    # packed: total_q / batch decides
    for qlens, prefill in (([200, 56], True), ([200, 55], False)):
        cu = torch.tensor(np.concatenate([[0], np.cumsum(qlens)]), dtype=torch.int32, device="cuda")
        q = backend.randn(rng, (sum(qlens), 8, 128), "bfloat16")
        auto = pagedflash.paged_attn(q, *cache, cu_seqlens_q=cu)
        flash = pagedflash.paged_attn(q, *cache, cu_seqlens_q=cu, kernel="sm90")
        assert torch.equal(auto, flash) == prefill, qlens


@cuda_only
def test_prefill_refusals(backend, rng):
    """kernel="sm90" refuses, naming the reason and writing nothing: float32, a head dim whose
    kernel has no wgmma tile (192), unaligned queries; off Hopper every call."""
    cases_ = [("float32", 128, 128), ("bfloat16", 192, 192), ("bfloat16", 64, 65)]
    for dtype, d, dq in cases_:
        cache = make_paged_cache(backend, rng, [70, 5], 2, d, 16, dtype)
        q = backend.randn(rng, (2, 3, 4, dq), dtype)[..., dq - d :]
        out = poison_like(q)
        with pytest.raises(NotImplementedError, match="sm90"):
            pagedflash.paged_attn(q, *cache, out=out, kernel="sm90")
        assert torch.isnan(out).all()
        pagedflash.paged_attn(q, *cache, out=out)  # "auto" takes it elsewhere
        assert not torch.isnan(out).any()


# ---------------------------------------------------------------------------
# the launcher's heuristics (CUDA)
# ---------------------------------------------------------------------------


@cuda_only
def test_long_context_auto_split(backend, rng):
    """Batch 1, 8k tokens, 32/8 heads: the automatic split count (flash decoding); head mode would
    take > 16 splits, so the launcher picks CTAs of 1 KV head x 8 warps."""
    run_paged(backend, rng, lens=(8191,), h=32, hk=8)
    run_paged(backend, rng, lens=(8191,), h=32, hk=8, d=64)


@cuda_only
def test_auto_shape_token_mode(backend, rng):
    """32 sequences of ~1k tokens, 32/8 heads: on a GPU with >= 128 SMs head mode would split each
    sequence 4 ways, so the launcher takes token mode (256 CTAs of 1 KV head x 4 warps, no split)
    instead; whatever the GPU, the result is the reference's."""
    lens = tuple(int(x) for x in rng.integers(900, 1025, size=32))
    run_paged(backend, rng, lens=lens, h=32, hk=8)


@cuda_only
def test_against_cpu_backend(backend, rng):
    """The CUDA result and the CPU backend's on the same (host) inputs both pass the rule and
    differ by at most 4x the naive error (+ 2e-5 relative)."""
    cpu = Backend("cpu")
    for kw in (
        dict(lens=(300, 1, 77)),
        dict(lens=(40, 129), qlens=[3, 17], layout="packed", bs=32, h=12, hk=3, num_splits=2),
        dict(lens=(64, 70), qlens=[5, 5], layout="dense", d=80, dtype="float16", window=(20, 3), causal=False),
    ):
        r = run_paged(backend, rng, **kw)
        kc, vc, bt, sl = r.cache.host
        slopes = r.slopes
        cpu_out, cpu_lse = pagedflash.paged_attn(
            cpu.put(r.q_host),
            kc,
            vc,
            bt,
            sl,
            cu_seqlens_q=r.cu_host,
            alibi_slopes=slopes,
            num_splits=kw.get("num_splits", 0),
            return_lse=True,
            **r.opts,
        )
        dtype = kw.get("dtype", "bfloat16")
        assert_close(cpu_out, r.ref, r.naive, dtype=dtype, what="CPU backend out")
        check_lse(cpu_lse, r.ref_lse, what="CPU backend lse")
        nerr = 0.0 if r.naive is None else float(np.max(np.abs(r.naive - r.ref)))
        diff = float(np.max(np.abs(as_np64(r.out) - as_np64(cpu_out))))
        assert diff <= 4 * nerr + 2e-5 * max(1.0, float(np.abs(r.ref).max())), f"CUDA vs CPU differ by {diff:.3e}"


# ---------------------------------------------------------------------------
# device-resident indices (CUDA): bound-checked by the kernels, never trusted
# ---------------------------------------------------------------------------


@cases("hk", cuda=[2, 8])
def test_bad_block_ids_in_device_tables(backend, rng, hk):
    """Ids outside [0, num_blocks) in a device-resident table are never dereferenced: the tokens of
    such a block contribute nothing (compute-sanitizer runs this test too). hk = 2: token mode;
    hk = 8: head mode; num_splits 0 (automatic), 1, 3; on Hopper also the prefill path ("sm90").
    A seq_len larger than the table row covers is clamped to its capacity."""
    bs, d, h = 16, 128, 4 * hk
    lens = (100, 64, 37)
    cache = make_paged_cache(backend, rng, lens, hk, d, bs, "bfloat16")
    kc, vc, bt, sl = cache.host
    nb = kc.shape[0]
    bad = bt.copy()
    bad[0, 1] = -3  # tokens 16..31 of sequence 0
    bad[1, 3] = nb + 1000  # tokens 48..63 of sequence 1
    bad[2, 0] = 2**31 - 1  # tokens 0..15 of sequence 2
    sl_dev = sl.copy()
    sl_dev[2] = 10**6
    q = backend.randn(rng, (3, h, d), "bfloat16")
    runs = [(ns, "auto") for ns in (0, 1, 3)] + ([(0, "sm90")] if backend.has_sm90 else [])
    for ns, kernel in runs:
        out = pagedflash.paged_attn(
            q, cache.k, cache.v, backend.put(bad), backend.put(sl_dev), num_splits=ns, kernel=kernel
        )
        torch.cuda.synchronize()
        assert not torch.isnan(out[:2]).any()
        # the reference: the same attention without the bad blocks' tokens
        for b, drop in ((0, range(16, 32)), (1, range(48, 64))):
            keep = torch.from_numpy(np.array([t for t in range(lens[b]) if t not in drop]))
            k = gather(kc, bt[b], lens[b], bs)[keep][None]
            v = gather(vc, bt[b], lens[b], bs)[keep][None]
            qb = q[b].cpu()[None, None]
            assert_close(
                out[b],
                reference.attention(qb, k, v)[0, 0],
                naive_attention_lowp(qb, k, v)[0, 0],
                dtype="bfloat16",
                what=f"sequence {b}, num_splits={ns}, kernel={kernel}",
            )


@cuda_only
def test_no_visible_token_rows(backend, rng):
    """Device seq_lens shorter than q_len (not checkable on the host): a query positioned before
    token 0 sees nothing -> out 0, lse -inf; never NaN. Sequence 0 holds one token for three
    queries: the first two see nothing, the last sees that token."""
    cache = make_paged_cache(backend, rng, (1, 40), 2, 64, 16, "bfloat16")
    q = backend.randn(rng, (2, 3, 4, 64), "bfloat16")
    ref, ref_lse = reference.paged_attention(q, *cache.host, return_lse=True)  # bottom-right alignment
    qlow = q.cpu()
    naive = np.concatenate(
        [
            naive_attention_lowp(
                qlow[b : b + 1], *(gather(c, cache.host[2][b], n, 16)[None] for c in cache.host[:2]), causal=True
            )
            for b, n in enumerate((1, 40))
        ]
    )
    runs = [(1, "auto"), (2, "auto")] + ([(1, "sm90")] if backend.has_sm90 else [])
    for ns, kernel in runs:
        out, lse = pagedflash.paged_attn(q, *cache, return_lse=True, num_splits=ns, kernel=kernel)
        assert torch.all(out[0, :2] == 0) and torch.all(torch.isneginf(lse[:, 0:2]))
        assert_close(out, ref, naive, dtype="bfloat16", what=f"out, num_splits={ns}, kernel={kernel}")
        check_lse(lse, ref_lse)


# ---------------------------------------------------------------------------
# graphs and streams (CUDA)
# ---------------------------------------------------------------------------


def _capture(call):
    """Warm up call() on a side stream, then capture it in a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        call()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        call()
    return g


@cuda_only
def test_split_kv_in_cuda_graph(backend, rng):
    """Split-KV decoding (main kernel, partials in the scratch pool, merge) captured in a CUDA
    graph: replays after the query changes equal the eager call bit for bit."""
    cache = make_paged_cache(backend, rng, (3000, 17, 900), 8, 128, 16, "bfloat16")
    q = backend.randn(rng, (3, 32, 128), "bfloat16")
    out = torch.empty_like(q)
    g = _capture(lambda: pagedflash.paged_attn(q, *cache, out=out))
    for _ in range(3):
        q.copy_(backend.randn(rng, (3, 32, 128), "bfloat16"))
        out.fill_(float("nan"))
        g.replay()
        eager = pagedflash.paged_attn(q, *cache)
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
    ref = reference.paged_attention(q, *cache.host)
    assert_close(out, ref, naive_lowp_paged(q.cpu(), cache, np.arange(4)), dtype="bfloat16")


@cases("layout", cuda=["decode", "packed"])
def test_cuda_graph_capture(backend, rng, layout):
    """paged_attn with 5 splits (partials in the graph's scratch) and lse captured in a CUDA graph:
    every replay recomputes with the current inputs, bit-identical to an eager call."""
    cache = make_paged_cache(backend, rng, (3000, 17, 900), 2, 128, 16, "bfloat16")
    qlens = [1, 1, 1] if layout == "decode" else [2, 1, 5]
    q, cu_q, _, cu_host, offs = make_paged_q(backend, rng, layout, qlens, 8, 128, "bfloat16")
    out = torch.full_like(q, float("nan"))
    lse = torch.full((8, q.shape[0]), float("nan"), dtype=torch.float32, device="cuda")

    def call():
        _, l = pagedflash.paged_attn(q, *cache, cu_seqlens_q=cu_q, num_splits=5, return_lse=True, out=out)
        lse.copy_(l)

    g = _capture(call)
    for _ in range(3):
        q.copy_(backend.randn(rng, tuple(q.shape), "bfloat16"))
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        eo, el = pagedflash.paged_attn(q, *cache, cu_seqlens_q=cu_q, num_splits=5, return_lse=True)
        assert torch.equal(out, eo) and torch.equal(lse, el)
    ref, ref_lse = reference.paged_attention(q, *cache.host, cu_seqlens_q=cu_host, return_lse=True)
    assert_close(out, ref, naive_lowp_paged(q.cpu(), cache, offs), dtype="bfloat16")
    check_lse(lse, ref_lse)


@cuda_only
def test_non_default_stream_and_determinism(backend, rng):
    cache = make_paged_cache(backend, rng, (3000, 17), 8, 128, 16, "bfloat16")
    q = backend.randn(rng, (2, 32, 128), "bfloat16")
    first = pagedflash.paged_attn(q, *cache)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        outs = [pagedflash.paged_attn(q, *cache) for _ in range(3)]
        explicit = torch.empty_like(q)
        pagedflash.paged_attn(q, *cache, out=explicit, stream=s.cuda_stream)
    s.synchronize()
    for o in outs + [explicit]:
        assert torch.equal(o, first), "results differ between runs / streams"
    ref = reference.paged_attention(q, *cache.host)
    assert_close(first, ref, naive_lowp_paged(q.cpu(), cache, np.arange(3)), dtype="bfloat16")


# ---------------------------------------------------------------------------
# bad input: clear errors naming the argument, nothing written
# ---------------------------------------------------------------------------


def _small(backend, rng):
    cache = make_paged_cache(backend, rng, [20, 35], 2, 16, 8, "float32")
    q = backend.randn(rng, (2, 4, 16), "float32")
    return q, cache


def _expect_error(backend, exc, match, q, kc, vc, bt, sl, **kw):
    """paged_attn raises exc (message matching) and leaves out, caches and index arrays as they were."""
    kw = {n: backend.put(x) if isinstance(x, np.ndarray) else x for n, x in kw.items()}
    kc, vc, bt, sl = (backend.put(x) if isinstance(x, np.ndarray) and backend.is_cuda else x for x in (kc, vc, bt, sl))
    out = poison_like(q)
    before = [as_np64(x) for x in (kc, vc, out, bt, sl)]
    with pytest.raises(exc, match=match):
        pagedflash.paged_attn(q, kc, vc, bt, sl, out=out, **kw)
    for a, x in zip(before, (kc, vc, out, bt, sl)):
        assert np.array_equal(a, as_np64(x), equal_nan=True)


@cpu_only
def test_bad_block_ids(backend, rng):
    """Host-resident tables are checked before anything runs (device-resident ones:
    test_bad_block_ids_in_device_tables)."""
    q, (kc, vc, bt, sl) = _small(backend, rng)
    for bad in (kc.shape[0], -1, 2**31 - 1):
        b2 = bt.copy()
        b2[1, 4] = bad  # the 5th (last used) block of a 35-token sequence
        _expect_error(backend, ValueError, r"block_tables.*\[1, 4\]", q, kc, vc, b2, sl)
    # unused entries may hold anything
    b3 = bt.copy()
    b3[0, 3:] = -7
    pagedflash.paged_attn(q, kc, vc, b3, sl)


@cpu_only
def test_bad_lengths(backend, rng):
    """seq_lens values are checked on the host (device-resident ones are clamped by the kernel)."""
    q, (kc, vc, bt, sl) = _small(backend, rng)
    cap = bt.shape[1] * kc.shape[1]
    _expect_error(backend, ValueError, "seq_lens.*exceeds", q, kc, vc, bt, np.array([20, cap + 1], np.int32))
    _expect_error(backend, ValueError, "seq_lens.*negative", q, kc, vc, bt, np.array([-1, 3], np.int32))
    q4 = backend.randn(rng, (2, 3, 4, 16), "float32")
    _expect_error(backend, ValueError, r"seq_lens.*shorter", q4, kc, vc, bt, np.array([2, 35], np.int32))


def test_bad_dtypes_and_shapes(backend, rng):
    q, cache = _small(backend, rng)
    kc, vc, bt, sl = cache
    hbt, hsl = cache.host[2:]
    _expect_error(backend, TypeError, "block_tables.*int32", q, kc, vc, hbt.astype(np.int64), sl)
    _expect_error(backend, TypeError, "seq_lens.*int32", q, kc, vc, bt, hsl.astype(np.int64))
    _expect_error(backend, TypeError, "k_cache", q, backend.randn(rng, tuple(kc.shape), "float16"), vc, bt, sl)
    _expect_error(backend, ValueError, "v_cache", q, kc, vc[:, :4], bt, sl)
    _expect_error(backend, ValueError, "seq_lens", q, kc, vc, bt, np.array([20], np.int32))
    _expect_error(backend, ValueError, r"q: .*batch", backend.randn(rng, (3, 4, 16), "float32"), kc, vc, bt, sl)
    _expect_error(backend, ValueError, "num_heads", backend.randn(rng, (2, 3, 16), "float32"), kc, vc, bt, sl)
    _expect_error(backend, ValueError, "head_dim", backend.randn(rng, (2, 4, 8), "float32"), kc, vc, bt, sl)
    _expect_error(backend, ValueError, "alibi_slopes", q, kc, vc, bt, sl, alibi_slopes=np.ones(3, np.float32))
    _expect_error(backend, ValueError, "num_splits", q, kc, vc, bt, sl, num_splits=-1)
    _expect_error(backend, ValueError, "window", q, kc, vc, bt, sl, window=(-2, 0))
    big = np.zeros((2, 257, 2, 16), np.float32)
    _expect_error(backend, ValueError, "block_size", q, big, big, bt, sl)
    half = np.empty((2, 4, 16), np.float16)
    with pytest.raises(TypeError, match="out"):
        pagedflash.paged_attn(q, kc, vc, bt, sl, out=backend.put(half))
    with pytest.raises(ValueError, match="out"):
        pagedflash.paged_attn(q, kc, vc, bt, sl, out=backend.put(np.empty((2, 4, 15), np.float32)))


@cases("case", cpu=range(7), cuda=[4, 6])
def test_bad_cu_seqlens(backend, rng, case):
    """cu_seqlens_q values are checked on the host; a device-resident one only for dtype and shape."""
    q, cache = _small(backend, rng)
    kc, vc, bt, sl = cache
    qp = backend.randn(rng, (6, 4, 16), "float32")
    bad = [
        (ValueError, "cu_seqlens_q.*last entry", qp, sl, [0, 2, 5], np.int32),  # 5 != 6 packed queries
        (ValueError, "cu_seqlens_q.*non-decreasing", qp, sl, [0, 4, 2], np.int32),
        (ValueError, r"cu_seqlens_q\[0\]", qp, sl, [1, 2, 6], np.int32),
        (ValueError, "cu_seqlens_q.*length", qp, sl, [0, 6], np.int32),  # batch mismatch
        (TypeError, "cu_seqlens_q.*int32", qp, sl, [0, 2, 6], np.int64),
        (ValueError, "seq_lens.*shorter", qp, np.array([20, 3], np.int32), [0, 2, 6], np.int32),
        (ValueError, "q:", backend.randn(rng, (2, 3, 4, 16), "float32"), sl, [0, 3, 6], np.int32),
    ][case]
    exc, match, qq, lens, cu, dt = bad
    _expect_error(backend, exc, match, qq, kc, vc, bt, lens, cu_seqlens_q=np.array(cu, dt))


@cpu_only
def test_empty_inputs(backend, rng):
    kc = randn(rng, (0, 16, 2, 8), "float32")
    out, lse = pagedflash.paged_attn(
        np.zeros((0, 4, 8), np.float32), kc, kc, np.zeros((0, 3), np.int32), np.zeros(0, np.int32), return_lse=True
    )
    assert out.shape == (0, 4, 8) and lse.shape == (4, 0)
    out, lse = pagedflash.paged_attn(
        np.zeros((0, 4, 8), np.float32),
        kc,
        kc,
        np.zeros((2, 0), np.int32),
        np.zeros(2, np.int32),
        cu_seqlens_q=np.zeros(3, np.int32),
        return_lse=True,
    )
    assert out.shape == (0, 4, 8) and lse.shape == (4, 0)
    with pytest.raises(ValueError, match="block_tables"):  # one token needs a block, and there are none
        pagedflash.paged_attn(
            np.ones((2, 4, 8), np.float32), kc, kc, np.zeros((2, 1), np.int32), np.array([1, 0], np.int32)
        )
