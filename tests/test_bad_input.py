"""Bad input: the documented exception, a message naming the argument, and `out`
left exactly as it was."""

import numpy as np
import pytest

import pagedflash
from conftest import randn, torch
from pagedflash import _C, reference


def qkv(rng, b=2, sq=5, sk=7, h=4, hk=2, d=16):
    """float32 q, k, v from the suite's case builder (tests/conftest.py)."""
    return (
        randn(rng, (b, sq, h, d), "float32"),
        randn(rng, (b, sk, hk, d), "float32"),
        randn(rng, (b, sk, hk, d), "float32"),
    )


def expect_error(exc, match, q, k, v, out=None, **kw):
    """Call flash_attn expecting `exc`; `out` (given or sentinel-filled) must be untouched."""
    if out is None:
        out = np.full(np.shape(q) if np.ndim(q) else (1,), 7.0, np.float32)
    before = np.array(out, copy=True)
    with pytest.raises(exc, match=match):
        pagedflash.flash_attn(q, k, v, out=out, **kw)
    assert np.array_equal(np.asarray(out), before, equal_nan=True), "out was modified by a failed call"


def test_wrong_rank(rng):
    q, k, v = qkv(rng)
    expect_error(ValueError, r"q: expected a 4-d tensor, got 3-d", q[0], k, v, out=np.zeros(q[0].shape, np.float32))
    expect_error(ValueError, r"k: expected a 4-d tensor, got 5-d", q, k[None], v)


def test_mismatched_batch_and_head_dim(rng):
    q, k, v = qkv(rng)
    expect_error(ValueError, r"k: expected dimension 0 \(batch", q, k[:1], v[:1])
    q2, k2, v2 = qkv(rng, d=32)
    expect_error(ValueError, r"k: expected dimension 3 \(head_dim", q, k2, v2)
    expect_error(ValueError, r"v: expected the shape of k", q, k, v[:, :3])


def test_head_ratio(rng):
    q, k, v = qkv(rng, h=5, hk=2)
    expect_error(ValueError, r"num_heads \(5\) must be a positive multiple of num_kv_heads \(2", q, k, v)


@pytest.mark.parametrize("d", [0, 257, 512])
def test_head_dim_range(rng, d):
    q, k, v = qkv(rng, d=d)
    expect_error(ValueError, rf"head_dim must be in \[1, 256\], got {d}", q, k, v)


def test_mixed_dtypes(rng):
    q, k, v = qkv(rng)
    expect_error(TypeError, r"k: expected dtype float32 \(the dtype of q\), got float16", q, k.astype(np.float16), v)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.float64])
def test_unsupported_dtype(rng, dtype):
    q, k, v = qkv(rng)
    qi = (q * 10).astype(dtype)
    expect_error(TypeError, r"q: .*expected dtype float16, bfloat16 or float32", qi, k.astype(dtype), v.astype(dtype))


def fwd(q, k, v, out, lse=None, stream=None):
    """_C.flash_fwd with the default options (the binding takes them all, positionally)."""
    return _C.flash_fwd(q, k, v, out, lse, None, None, 0, 0, None, False, (-1, -1), 0.0, None, 0.0, None, 0, False,
                        stream, "auto")  # fmt: skip


class ArrayInterface:
    """Only __array_interface__ (no NumPy type, no DLPack): the binding views it as it is."""

    def __init__(self, a):
        self.a = a
        self.__array_interface__ = a.__array_interface__


def test_non_contiguous_last_dim_to_C(rng):
    q, k, v = qkv(rng, d=32)
    out = np.full(q.shape, 7.0, np.float32)
    # NumPy and torch inputs are copied to a contiguous last dimension; other producers reach the core
    strided_q = ArrayInterface(np.ascontiguousarray(np.repeat(q, 2, -1))[..., ::2])
    with pytest.raises(ValueError, match=r"q: the last dimension must be contiguous \(stride 1\), got stride 2"):
        fwd(strided_q, k, v, out, stream=0)
    assert np.all(out == 7.0)
    with pytest.raises(ValueError, match=r"v: the last dimension must be contiguous"):
        fwd(q, k, ArrayInterface(np.repeat(v, 2, -1)[..., ::2]), out)
    assert np.all(out == 7.0)
    # ... and NumPy's are copied: the same values as contiguous inputs
    np.testing.assert_array_equal(fwd(q, k, np.repeat(v, 2, -1)[..., ::2], None), fwd(q, k, v, None))


def test_out_wrong_shape_dtype_readonly(rng):
    q, k, v = qkv(rng)
    expect_error(ValueError, r"out: expected the shape of q", q, k, v, out=np.full((2, 5, 4, 8), 7.0, np.float32))
    bad = np.full(q.shape, 7.0, np.float16)
    before = bad.copy()
    with pytest.raises(TypeError, match=r"out: expected dtype float32 \(the dtype of q\), got float16"):
        pagedflash.flash_attn(q, k, v, out=bad)
    assert np.array_equal(bad, before)
    ro = np.full(q.shape, 7.0, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"out: the array is read-only"):
        pagedflash.flash_attn(q, k, v, out=ro)
    assert np.all(ro == 7.0)


def test_lse_wrong_shape(rng):
    q, k, v = qkv(rng)
    out = np.full(q.shape, 7.0, np.float32)
    with pytest.raises(ValueError, match=r"lse: expected the shape of \[batch, num_heads, seqlen_q\]"):
        fwd(q, k, v, out, np.zeros((2, 4, 6), np.float32))
    assert np.all(out == 7.0)


@pytest.mark.parametrize("bad", [None, 3, "q", [[1.0, 2.0]], object()])
def test_not_an_array(rng, bad):
    q, k, v = qkv(rng)
    with pytest.raises(TypeError, match=r"expected an array"):
        fwd(bad, k, v, np.zeros(q.shape, np.float32), stream=0)
    with pytest.raises(TypeError, match=r"k: expected an array"):
        fwd(q, bad, v, np.zeros(q.shape, np.float32))


@pytest.mark.parametrize("shape_q,shape_k", [((0, 5, 4, 16), (0, 7, 2, 16)), ((2, 0, 4, 16), (2, 7, 2, 16))])
def test_empty_batch_or_queries(shape_q, shape_k):
    q = np.ones(shape_q, np.float32)
    k = np.ones(shape_k, np.float32)
    out, lse = pagedflash.flash_attn(q, k, k, return_lse=True)
    assert out.shape == shape_q and lse.shape == (shape_q[0], shape_q[2], shape_q[1])


def test_empty_keys(rng):
    """No keys at all: every row is fully masked -> out 0, lse -inf (a defined result)."""
    q = randn(rng, (2, 5, 4, 16), "float32")
    k = np.ones((2, 0, 2, 16), np.float32)
    out, lse = pagedflash.flash_attn(q, k, k, return_lse=True)
    assert np.all(out == 0) and np.all(lse == -np.inf)


def test_nan_inf_propagate(rng):
    q, k, v = qkv(rng, sq=9, sk=11)
    q[0, 3, 1, 5] = np.nan
    v[1, 4, 0, 2] = np.inf
    out = pagedflash.flash_attn(q, k, v)
    ref = reference.attention(q, k, v)
    assert np.isnan(out[0, 3, 1]).all(), "a NaN query makes its row NaN"
    assert np.array_equal(np.isnan(out), np.isnan(ref) | (np.isinf(ref) & np.isnan(out)))
    ok = np.isfinite(ref)
    np.testing.assert_allclose(out[ok], ref[ok], atol=1e-5)


def test_bad_options(rng):
    q, k, v = qkv(rng)
    expect_error(ValueError, r"window: left must be >= -1", q, k, v, window=(-2, 0))
    expect_error(ValueError, r"window: expected a pair", q, k, v, window=5)
    expect_error(ValueError, r"softcap: must be a finite number >= 0", q, k, v, softcap=-1.0)
    expect_error(ValueError, r"dropout_p: must be in \[0, 1\)", q, k, v, dropout_p=1.0)
    expect_error(ValueError, r"softmax_scale: must be finite", q, k, v, softmax_scale=float("nan"))
    expect_error(
        ValueError, r"alibi_slopes: expected shape \[4\] or \[2, 4\]", q, k, v, alibi_slopes=np.ones(3, np.float32)
    )


@pytest.mark.skipif(torch is None, reason="needs torch")
def test_cuda_tensor_without_cuda_backend_or_device():
    """A CUDA tensor never crashes a CPU-only setup: it is either computed (CUDA backend
    and device present) or refused with NotImplementedError / a torch error."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present; covered by the GPU tests")
    with pytest.raises((RuntimeError, AssertionError)):
        torch.empty(1, device="cuda")
