"""CPU forward pass against the float64 reference (DESIGN.md tolerance rule)."""
import numpy as np
import pytest

import pagedflash
from pagedflash import reference

from conftest import DTYPES, assert_close, naive_attention_lowp, poison_like, randn, torch


def run_and_check(rng, dtype, b, sq, sk, h, hk, d, *, causal, **kw):
    q = randn(rng, (b, sq, h, d), dtype)
    k = randn(rng, (b, sk, hk, d), dtype)
    v = randn(rng, (b, sk, hk, d), dtype)
    out = poison_like(q)
    res, lse = pagedflash.flash_attn(q, k, v, causal=causal, out=out, return_lse=True, **kw)
    assert res is out
    ref, ref_lse = reference.attention(q, k, v, causal=causal, return_lse=True, **kw)
    naive = None if dtype == "float32" else naive_attention_lowp(q, k, v, causal=causal, **kw)
    assert_close(out, ref, naive, dtype=dtype)
    lse = np.asarray(lse)
    assert lse.dtype == np.float32 and lse.shape == (b, h, sq)
    finite = np.isfinite(ref_lse)
    assert np.array_equal(np.isfinite(lse), finite), "lse: -inf exactly where rows are fully masked"
    assert np.all(lse[~finite] == -np.inf)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 8, 40, 64, 80, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_head_dims(rng, dtype, d, causal):
    sq, sk = (113, 203) if d % 16 else (203, 113)
    run_and_check(rng, dtype, 2, sq, sk, 4, 2, d, causal=causal)


LENGTHS = [(1, 1), (1, 7), (7, 1), (7, 113), (113, 7), (113, 203), (203, 113), (1, 1023), (1023, 1),
           (203, 1023), (1023, 203), (1023, 1023)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sq,sk", LENGTHS)
@pytest.mark.parametrize("causal", [False, True])
def test_lengths(rng, dtype, sq, sk, causal):
    run_and_check(rng, dtype, 1, sq, sk, 2, 1, 64, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h,hk", [(4, 4), (4, 2), (8, 1), (16, 2), (6, 3)])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa(rng, dtype, h, hk, causal):
    run_and_check(rng, dtype, 2, 7, 113, h, hk, 80, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_scale(rng, dtype):
    run_and_check(rng, dtype, 1, 37, 53, 2, 2, 64, causal=False, softmax_scale=0.3)


def test_strided_inputs_numpy(rng):
    """Non-contiguous (but last-dim contiguous) views are read in place, not copied."""
    b, s, h, d = 2, 57, 4, 48
    base = rng.standard_normal((b, h, s, d)).astype(np.float32)
    q = base.transpose(0, 2, 1, 3)  # [b, s, h, d] view with permuted strides
    kbig = rng.standard_normal((b, s, 2 * h, d)).astype(np.float32)
    k = kbig[:, :, ::2]  # every other head
    v = rng.standard_normal((b, 2 * s, h, d)).astype(np.float32)[:, ::2]
    out = np.full((b, s, h, d), np.nan, np.float32)
    pagedflash.flash_attn(q, k, v, out=out)
    assert_close(out, reference.attention(q, k, v), dtype="float32")


def test_strided_output(rng):
    b, s, h, d = 1, 33, 2, 32
    q, k, v = (rng.standard_normal((b, s, h, d)).astype(np.float32) for _ in range(3))
    big = np.full((b, h, s, d), np.nan, np.float32)
    out = big.transpose(0, 2, 1, 3)
    pagedflash.flash_attn(q, k, v, out=out)
    assert_close(out, reference.attention(q, k, v), dtype="float32")


def test_strided_last_dim_is_copied_by_the_api(rng):
    """A strided last dimension is copied by the caller's library (NumPy), then computed."""
    q = rng.standard_normal((1, 9, 2, 64)).astype(np.float32)[..., ::2]
    k = rng.standard_normal((1, 11, 2, 32)).astype(np.float32)
    v = rng.standard_normal((1, 11, 2, 32)).astype(np.float32)
    out = pagedflash.flash_attn(q, k, v)
    assert_close(out, reference.attention(q, k, v), dtype="float32")


@pytest.mark.skipif(torch is None, reason="needs torch")
@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_torch(rng, dtype):
    b, s, h, d = 2, 45, 4, 72
    q = randn(rng, (b, h, s, d), dtype, lib="torch").transpose(1, 2)
    k = randn(rng, (b, h, s, d), dtype, lib="torch").transpose(1, 2)[:, :, :2]
    v = randn(rng, (b, s, 2, d), dtype, lib="torch")
    out = pagedflash.flash_attn(q, k, v, causal=True)
    assert isinstance(out, torch.Tensor) and out.dtype == q.dtype
    naive = None if dtype == "float32" else naive_attention_lowp(q, k, v, causal=True)
    assert_close(out, reference.attention(q, k, v, causal=True), naive, dtype=dtype)


def test_fully_masked_rows(rng):
    """Causal with seqlen_q > seqlen_k: the first sq - sk rows see nothing -> out 0, lse -inf."""
    q = rng.standard_normal((1, 10, 2, 16)).astype(np.float32)
    k = rng.standard_normal((1, 4, 2, 16)).astype(np.float32)
    v = rng.standard_normal((1, 4, 2, 16)).astype(np.float32)
    out, lse = pagedflash.flash_attn(q, k, v, causal=True, return_lse=True)
    assert np.all(out[:, :6] == 0) and np.all(lse[:, :, :6] == -np.inf)
    assert not np.isnan(out).any()
    assert_close(out, reference.attention(q, k, v, causal=True), dtype="float32")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts_bitwise_identical(rng, threads):
    q = rng.standard_normal((2, 150, 4, 64)).astype(np.float32)
    k = rng.standard_normal((2, 170, 2, 64)).astype(np.float32)
    v = rng.standard_normal((2, 170, 2, 64)).astype(np.float32)
    pagedflash.set_num_threads(1)
    try:
        one = pagedflash.flash_attn(q, k, v, causal=True)
        pagedflash.set_num_threads(threads)
        assert pagedflash.get_num_threads() == threads
        many = pagedflash.flash_attn(q, k, v, causal=True)
    finally:
        pagedflash.set_num_threads(0)
    assert np.array_equal(one, many)


def test_large_scores_no_overflow(rng):
    q = (rng.standard_normal((1, 64, 2, 64)) * 30).astype(np.float32)
    k = (rng.standard_normal((1, 64, 2, 64)) * 30).astype(np.float32)
    v = rng.standard_normal((1, 64, 2, 64)).astype(np.float32)
    out = pagedflash.flash_attn(q, k, v)
    assert np.isfinite(out).all()
    # scores ~1e3: float32 rounding of the scores alone moves P by ~1e-4 relative, so the
    # check here is against the float32-rounded scores' own error, not 1e-5
    err = np.max(np.abs(out - reference.attention(q, k, v)))
    assert err < 1e-3, err


def test_gil_released_during_compute(rng):
    """While a call computes, other Python threads keep running: the largest pause the
    main thread sees is far shorter than the call (it would span the call if the GIL
    were held)."""
    import threading
    import time

    q = rng.standard_normal((1, 2048, 8, 64)).astype(np.float32)
    t0 = time.perf_counter()
    pagedflash.flash_attn(q, q, q)
    single = time.perf_counter() - t0
    done = threading.Event()

    def work():
        pagedflash.flash_attn(q, q, q)
        done.set()

    t = threading.Thread(target=work)
    last = time.perf_counter()
    max_gap = 0.0
    t.start()
    while not done.is_set():
        now = time.perf_counter()
        max_gap = max(max_gap, now - last)
        last = now
    t.join()
    assert max_gap < 0.5 * single, f"main thread paused {max_gap:.3f}s during a {single:.3f}s call"
