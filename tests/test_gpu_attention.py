"""GPU flash attention (forward and backward) against the float64 reference.

Every test is marked `gpu` (skipped without a CUDA device or a CUDA build). Inputs are
fresh random normals on the GPU, outputs are poisoned with NaN before each call, and
results pass the DESIGN.md rule (conftest.assert_close): float16/bfloat16 within 2x the
naive same-precision error (+1e-5), float32 within 1e-5 relative.

Covered: dtypes, head dims (instantiated ones and dims padded up to them, incl. ones that
are not a multiple of 8), GQA/MQA ratios, odd lengths, causal (bottom-right), windows,
softcap, ALiBi, dropout (the Philox keep mask recomputed here in NumPy, and the CPU
backend's output with the same seed), varlen incl. clamped bad device cu_seqlens, lse,
fully masked rows, torch streams, CuPy and JAX through DLPack, bitwise repeatability,
and the backward (when pagedflash.flash_attn_backward exists).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import assert_close, naive_attention_lowp, randn

torch = pytest.importorskip("torch")

import pagedflash  # noqa: E402
from pagedflash import _C, reference  # noqa: E402

pytestmark = pytest.mark.gpu

LOWP = ["float16", "bfloat16"]
ALL_DTYPES = ["float16", "bfloat16", "float32"]
TRIMMED = bool(os.environ.get("PAGEDFLASH_HEADDIMS"))


def _stream():
    return torch.cuda.current_stream().cuda_stream


def fwd(q, k, v, *, cu_q=None, cu_k=None, max_q=0, max_k=0, causal=False, window=(-1, -1), softcap=0.0,
        alibi=None, dropout_p=0.0, seed=0, offset=0, softmax_scale=None, lse=True):
    """Call the binding directly with NaN-poisoned out and lse (so unwritten elements fail)."""
    out = torch.full_like(q, float("nan"))
    varlen = cu_q is not None
    lse_t = None
    if lse:
        shape = (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])
        lse_t = torch.full(shape, float("nan"), dtype=torch.float32, device=q.device)
    try:
        _C.flash_fwd(q, k, v, out, lse_t, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                     max_seqlen_k=max_k, softmax_scale=0.0 if softmax_scale is None else softmax_scale,
                     causal=causal, window_left=window[0], window_right=window[1], softcap=softcap,
                     alibi_slopes=alibi, dropout_p=dropout_p, seed=seed, offset=offset, stream=_stream())
    except NotImplementedError as e:
        if TRIMMED and "head_dim" in str(e):
            pytest.skip(f"head dim not compiled in this trimmed build: {e}")
        raise
    return out, lse_t


def make_qkv(rng, dtype, b, sq, sk, h, hk, d):
    q = randn(rng, (b, sq, h, d), dtype, device="cuda")
    k = randn(rng, (b, sk, hk, d), dtype, device="cuda")
    v = randn(rng, (b, sk, hk, d), dtype, device="cuda")
    return q, k, v


def check_fwd(q, k, v, out, lse, dtype, **opts):
    ref, ref_lse = reference.attention(q, k, v, return_lse=True, **opts)
    naive = None if dtype == "float32" else naive_attention_lowp(q.cpu(), k.cpu(), v.cpu(), **opts)
    assert_close(out, ref, naive, dtype=dtype)
    if lse is not None:
        check_lse(lse, ref_lse)


def check_lse(lse, ref_lse):
    got = lse.double().cpu().numpy()
    assert not np.isnan(got).any(), "lse: NaN (unwritten element)"
    inf = np.isneginf(ref_lse)
    assert np.array_equal(np.isneginf(got), inf), "lse: -inf exactly where a row sees no key"
    fin = ~inf
    if fin.any():
        err = np.max(np.abs(got[fin] - ref_lse[fin]) / np.maximum(1.0, np.abs(ref_lse[fin])))
        assert err <= 1e-4, f"lse: max relative error {err:.2e}"


# ---------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("d", [32, 64, 96, 128, 192, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_fwd_head_dims(rng, dtype, d, causal):
    q, k, v = make_qkv(rng, dtype, 2, 113, 203, 4, 2, d)
    out, lse = fwd(q, k, v, causal=causal)
    check_fwd(q, k, v, out, lse, dtype, causal=causal)


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("d", [7, 40, 80, 100, 160, 200])
def test_fwd_padded_head_dims(rng, dtype, d):
    """Head dims between instantiations (zero-padded); 7 and 100 take the unaligned path."""
    q, k, v = make_qkv(rng, dtype, 1, 77, 130, 3, 3, d)
    out, lse = fwd(q, k, v, causal=True)
    check_fwd(q, k, v, out, lse, dtype, causal=True)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("hk", [1, 2, 3, 6])
def test_fwd_gqa(rng, dtype, hk):
    q, k, v = make_qkv(rng, dtype, 2, 64, 96, 6, hk, 64)
    out, lse = fwd(q, k, v)
    check_fwd(q, k, v, out, lse, dtype)


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("sq,sk", [(1, 1), (7, 7), (1, 203), (203, 1), (113, 203), (203, 113), (1023, 1023),
                                   (128, 64), (64, 128)])
@pytest.mark.parametrize("causal", [False, True])
def test_fwd_lengths(rng, dtype, sq, sk, causal):
    """Odd lengths; causal with sq > sk has fully masked top rows (out 0, lse -inf)."""
    q, k, v = make_qkv(rng, dtype, 1, sq, sk, 2, 1, 64)
    out, lse = fwd(q, k, v, causal=causal)
    check_fwd(q, k, v, out, lse, dtype, causal=causal)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("window,causal", [((16, 0), False), ((0, 0), False), ((32, 8), False), ((-1, 5), False),
                                           ((7, -1), False), ((40, -1), True), ((1000, 1000), False)])
def test_fwd_window(rng, dtype, window, causal):
    q, k, v = make_qkv(rng, dtype, 2, 150, 211, 2, 2, 128)
    out, lse = fwd(q, k, v, window=window, causal=causal)
    check_fwd(q, k, v, out, lse, dtype, window=window, causal=causal)


def test_fwd_fully_masked_rows(rng):
    """A window that shows some rows no key at all: out = 0 and lse = -inf there, never NaN."""
    q, k, v = make_qkv(rng, "bfloat16", 1, 200, 40, 2, 2, 64)
    out, lse = fwd(q, k, v, window=(3, 0))
    check_fwd(q, k, v, out, lse, "bfloat16", window=(3, 0))
    ref_lse = reference.attention(q, k, v, window=(3, 0), return_lse=True)[1]
    assert np.isneginf(ref_lse).any()
    rows = torch.from_numpy(np.isneginf(ref_lse[0, 0]))
    assert (out[0, rows.to(out.device), 0] == 0).all()


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_fwd_softcap_alibi(rng, dtype, causal):
    q, k, v = make_qkv(rng, dtype, 2, 97, 130, 4, 2, 64)
    slopes = torch.from_numpy(rng.uniform(0.01, 0.5, size=(4,)).astype(np.float32)).cuda()
    for opts in ({"softcap": 5.0}, {"alibi_slopes": slopes}, {"softcap": 20.0, "alibi_slopes": slopes}):
        out, lse = fwd(q, k, v, causal=causal, softcap=opts.get("softcap", 0.0), alibi=opts.get("alibi_slopes"))
        check_fwd(q, k, v, out, lse, dtype, causal=causal, **opts)


def test_fwd_alibi_per_batch_and_scale(rng):
    q, k, v = make_qkv(rng, "bfloat16", 2, 65, 65, 3, 1, 96)
    slopes = torch.from_numpy(rng.uniform(0.01, 0.5, size=(2, 3)).astype(np.float32)).cuda()
    for scale in (0.3, -0.2):
        out, lse = fwd(q, k, v, alibi=slopes, softmax_scale=scale, causal=True)
        check_fwd(q, k, v, out, lse, "bfloat16", alibi_slopes=slopes, softmax_scale=scale, causal=True)


# ---------------------------------------------------------------------------
# dropout: the Philox contract of csrc/include/pagedflash_philox.h, recomputed in NumPy
# ---------------------------------------------------------------------------

_M32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(c, k0, k1):
    """c: 4 uint64 arrays holding 32-bit counters; returns 4 arrays of 32-bit words."""
    c0, c1, c2, c3 = (np.asarray(x, dtype=np.uint64) & _M32 for x in c)
    k0, k1 = np.uint64(k0), np.uint64(k1)
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c0
        p1 = np.uint64(0xCD9E8D57) * c2
        hi0, lo0 = p0 >> np.uint64(32), p0 & _M32
        hi1, lo1 = p1 >> np.uint64(32), p1 & _M32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + np.uint64(0x9E3779B9)) & _M32
        k1 = (k1 + np.uint64(0xBB67AE85)) & _M32
    return c0, c1, c2, c3


def dropout_keep(seed, offset, p, b, h, sq, sk, bh_base=0):
    """keep[b, h, i, j] per pagedflash_philox.h: counter (j/4, i, b*h + h, offset), key (seed lo, hi)."""
    t = float(np.float32(p)) * 4294967296.0
    thr = 0xFFFFFFFF if t >= 4294967295.0 else (0 if t <= 0 else int(t))
    bb, hh, ii, jj = np.meshgrid(np.arange(b), np.arange(h), np.arange(sq), np.arange(sk), indexing="ij")
    bh = bh_base + bb * h + hh
    words = philox4x32_10((jj >> 2, ii, bh, np.full_like(jj, offset)), seed & 0xFFFFFFFF, seed >> 32)
    w = np.choose(jj & 3, words)
    return (w >= thr).astype(np.float64)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_fwd_dropout(rng, dtype, causal):
    b, sq, sk, h, hk, d = 2, 70, 93, 3, 1, 64
    q, k, v = make_qkv(rng, dtype, b, sq, sk, h, hk, d)
    seed, offset, p = 0x1234_5678_9ABC_DEF1, 7, 0.17
    out, lse = fwd(q, k, v, causal=causal, dropout_p=p, seed=seed, offset=offset)
    keep = dropout_keep(seed, offset, p, b, h, sq, sk)
    ref, ref_lse = reference.attention(q, k, v, causal=causal, dropout_p=p, dropout_mask=keep, return_lse=True)
    if dtype == "float32":
        assert_close(out, ref, dtype=dtype)
    else:
        # naive same-precision error without dropout bounds the rounding; dropout only rescales kept terms
        naive = naive_attention_lowp(q.cpu(), k.cpu(), v.cpu(), causal=causal)
        plain = reference.attention(q, k, v, causal=causal)
        nerr = float(np.max(np.abs(naive - plain)))
        err = float(np.max(np.abs(out.double().cpu().numpy() - ref)))
        assert err <= 2 * nerr / (1 - p) + 1e-5, f"dropout out: {err:.3e} vs naive {nerr:.3e}"
    check_lse(lse, ref_lse)  # lse describes the undropped softmax

    # the CPU backend with the same seed draws the same mask: outputs agree within tolerance
    cpu = pagedflash.flash_attn(q.cpu(), k.cpu(), v.cpu(), causal=causal, dropout_p=p, seed=seed, offset=offset)
    diff = float((cpu.double() - out.double().cpu()).abs().max())
    assert diff <= (1e-5 if dtype == "float32" else 2e-2), f"GPU vs CPU dropout output differ by {diff:.3e}"


# ---------------------------------------------------------------------------
# varlen
# ---------------------------------------------------------------------------

def _cu(lens):
    return torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32, device="cuda")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_fwd_varlen(rng, dtype, causal):
    lq = [1, 113, 0, 64, 203, 7]
    lk = [5, 113, 9, 200, 203, 1]
    h, hk, d = 4, 2, 128
    q = randn(rng, (sum(lq), h, d), dtype, device="cuda")
    k = randn(rng, (sum(lk), hk, d), dtype, device="cuda")
    v = randn(rng, (sum(lk), hk, d), dtype, device="cuda")
    cq, ck = _cu(lq), _cu(lk)
    slopes = torch.from_numpy(rng.uniform(0.01, 0.3, size=(h,)).astype(np.float32)).cuda()
    for max_q in (max(lq), 1):  # an understated max_seqlen_q is still computed in full
        out, lse = fwd(q, k, v, cu_q=cq, cu_k=ck, max_q=max_q, max_k=max(lk), causal=causal, alibi=slopes)
        ref, ref_lse = reference.attention_varlen(q, k, v, cq.cpu(), ck.cpu(), causal=causal, alibi_slopes=slopes,
                                                  return_lse=True)
        if dtype == "float32":
            assert_close(out, ref, dtype=dtype)
        else:
            naive = np.zeros(ref.shape)
            for i in range(len(lq)):
                a, e = int(cq[i]), int(cq[i + 1])
                ka, ke = int(ck[i]), int(ck[i + 1])
                if e > a:
                    naive[a:e] = naive_attention_lowp(q[None, a:e].cpu(), k[None, ka:ke].cpu(), v[None, ka:ke].cpu(),
                                                      causal=causal, alibi_slopes=slopes)[0]
            assert_close(out, ref, naive, dtype=dtype)
        check_lse(lse, ref_lse)


@pytest.mark.parametrize("d", [64, 128])
def test_fwd_varlen_understated_max_q_plain(rng, d):
    """The kernels without score extras (the Hopper kernels' fast path: 64-key tiles at d=64,
    128-key tiles at d=128) also loop over the query tiles beyond an understated max_seqlen_q,
    reusing their shared-memory buffers across tiles."""
    lq, lk, h = [300, 5, 129], [290, 700, 129], 2
    q = randn(rng, (sum(lq), h, d), "bfloat16", device="cuda")
    k = randn(rng, (sum(lk), h, d), "bfloat16", device="cuda")
    v = randn(rng, (sum(lk), h, d), "bfloat16", device="cuda")
    cq, ck = _cu(lq), _cu(lk)
    for causal in (False, True):
        out, lse = fwd(q, k, v, cu_q=cq, cu_k=ck, max_q=1, max_k=max(lk), causal=causal)
        ref, ref_lse = reference.attention_varlen(q, k, v, cq.cpu(), ck.cpu(), causal=causal, return_lse=True)
        naive = np.zeros(ref.shape)
        for i in range(len(lq)):
            a, e, ka, ke = int(cq[i]), int(cq[i + 1]), int(ck[i]), int(ck[i + 1])
            naive[a:e] = naive_attention_lowp(q[None, a:e].cpu(), k[None, ka:ke].cpu(), v[None, ka:ke].cpu(),
                                              causal=causal)[0]
        assert_close(out, ref, naive, dtype="bfloat16")
        check_lse(lse, ref_lse)


def test_fwd_varlen_dropout_matches_dense(rng):
    """Varlen dropout keys the mask by (sequence, head, row within the sequence)."""
    lq, lk, h, d, p, seed = [33, 50], [40, 50], 2, 64, 0.3, 99
    q = randn(rng, (sum(lq), h, d), "bfloat16", device="cuda")
    k = randn(rng, (sum(lk), h, d), "bfloat16", device="cuda")
    v = randn(rng, (sum(lk), h, d), "bfloat16", device="cuda")
    out, _ = fwd(q, k, v, cu_q=_cu(lq), cu_k=_cu(lk), max_q=50, max_k=50, dropout_p=p, seed=seed)
    keeps = [dropout_keep(seed, 0, p, 1, h, lq[i], lk[i], bh_base=i * h)[0] for i in range(2)]
    ref = reference.attention_varlen(q, k, v, _cu(lq).cpu(), _cu(lk).cpu(), dropout_p=p, dropout_masks=keeps)
    err = float(np.max(np.abs(out.double().cpu().numpy() - ref)))
    assert err < 3e-2, f"varlen dropout: {err:.3e}"


def test_fwd_varlen_bad_device_offsets_stay_in_bounds(rng):
    """cu_seqlens on the device cannot be validated on the host: the kernel clamps them.
    The call must neither fault nor touch memory outside the tensors (compute-sanitizer
    checks the latter); the values of such a call are unspecified."""
    h, d = 2, 64
    q = randn(rng, (50, h, d), "float16", device="cuda")
    k = randn(rng, (60, h, d), "float16", device="cuda")
    v = randn(rng, (60, h, d), "float16", device="cuda")
    for bad in ([0, 30, 20, 1000], [-5, 10, 70, 50], [0, 2**30, -(2**30), 50]):
        cq = torch.tensor(bad, dtype=torch.int32, device="cuda")
        ck = torch.tensor([0, 70, 10, 60], dtype=torch.int32, device="cuda")
        fwd(q, k, v, cu_q=cq, cu_k=ck, max_q=64, max_k=64, causal=True)
    torch.cuda.synchronize()  # raises if the kernel faulted


# ---------------------------------------------------------------------------
# frameworks, streams, repeatability
# ---------------------------------------------------------------------------

def test_torch_api_current_stream(rng):
    """flash_attn on torch CUDA tensors runs on torch's current stream: work queued before it
    on that (non-blocking) stream is seen, and the result is ordered before later work."""
    q, k, v = make_qkv(rng, "bfloat16", 2, 256, 256, 4, 4, 128)
    q2 = randn(rng, q.shape, "bfloat16", device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.cuda._sleep(50_000_000)  # keep s busy so a kernel on another stream would race ahead
        q.copy_(q2)
        out, lse = pagedflash.flash_attn(q, k, v, causal=True, return_lse=True)
        out2 = out * 1  # ordered after the kernel on s
    s.synchronize()
    assert out.device == q.device and out.dtype == q.dtype and lse.dtype == torch.float32
    check_fwd(q2, k, v, out2, lse, "bfloat16", causal=True)


def test_torch_explicit_stream_argument(rng):
    q, k, v = make_qkv(rng, "float16", 1, 100, 100, 2, 2, 64)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    out = pagedflash.flash_attn(q, k, v, stream=s.cuda_stream)
    s.synchronize()
    check_fwd(q, k, v, out, None, "float16")


def test_cupy_dlpack(rng):
    cp = pytest.importorskip("cupy")
    qt, kt, vt = make_qkv(rng, "float16", 2, 90, 120, 4, 2, 64)
    q, k, v = (cp.from_dlpack(x) for x in (qt, kt, vt))
    out = pagedflash.flash_attn(q, k, v, causal=True)
    assert isinstance(out, pagedflash.Tensor)
    o = cp.from_dlpack(out)
    assert o.shape == q.shape and o.dtype == q.dtype
    check_fwd(qt, kt, vt, torch.from_dlpack(o), None, "float16", causal=True)


def test_cupy_current_stream(rng):
    """CuPy inputs run on CuPy's current stream: work queued there before the call (a write
    of new values into q) is seen by the call, and the result is ready after that stream
    synchronizes, with no other synchronization."""
    cp = pytest.importorskip("cupy")
    qt, kt, vt = make_qkv(rng, "float16", 2, 300, 310, 4, 2, 64)
    q0, k, v = (cp.from_dlpack(x) for x in (qt, kt, vt))
    torch.cuda.synchronize()
    with cp.cuda.Stream(non_blocking=True) as s:
        q = cp.empty_like(q0)
        q[...] = q0 * 2  # queued on s
        out = pagedflash.flash_attn(q, k, v, causal=True)
        s.synchronize()
    check_fwd(qt * 2, kt, vt, torch.from_dlpack(cp.from_dlpack(out)), None, "float16", causal=True)


def test_jax_dlpack(rng):
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    if not any(dev.platform == "gpu" for dev in jax.devices()):
        pytest.skip("JAX sees no GPU")
    qt, kt, vt = make_qkv(rng, "bfloat16", 1, 64, 80, 2, 1, 128)
    q, k, v = (jnp.from_dlpack(x) for x in (qt, kt, vt))
    out, lse = pagedflash.flash_attn(q, k, v, return_lse=True)
    assert isinstance(out, pagedflash.Tensor)
    o = jnp.from_dlpack(out)
    assert o.shape == q.shape and o.dtype == q.dtype
    check_fwd(qt, kt, vt, torch.from_dlpack(o), torch.from_dlpack(jnp.from_dlpack(lse)), "bfloat16")


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_fwd_repeat_bitwise(rng, dropout_p):
    q, k, v = make_qkv(rng, "bfloat16", 2, 300, 300, 4, 2, 128)
    first, first_lse = fwd(q, k, v, causal=True, dropout_p=dropout_p, seed=5)
    for _ in range(100):
        out, lse = fwd(q, k, v, causal=True, dropout_p=dropout_p, seed=5)
        assert torch.equal(out.view(torch.int16), first.view(torch.int16))
        assert torch.equal(lse, first_lse)


def test_fwd_errors_leave_inputs(rng):
    q, k, v = make_qkv(rng, "bfloat16", 1, 16, 16, 2, 2, 64)
    with pytest.raises(ValueError, match="k"):
        pagedflash.flash_attn(q, k.cpu(), v)
    k3 = k[:, :, :1].expand(1, 16, 3, 64).contiguous()
    with pytest.raises(ValueError, match="num_heads"):
        pagedflash.flash_attn(q, k3, k3)


# ---------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------

def _backward_or_skip():
    return pagedflash.flash_attn_backward


def torch_ref_grads(q, k, v, dout, *, causal=False, window=(-1, -1), softcap=0.0, alibi_slopes=None,
                    dropout_p=0.0, keep=None, softmax_scale=None, dtype=torch.float64):
    """Gradients of the naive attention in `dtype` on the CPU (float64 = the reference)."""
    qd, kd, vd = (x.detach().cpu().to(dtype).requires_grad_(True) for x in (q, k, v))
    s, _, vv = reference.naive_scores_torch(qd, kd, vd, causal=causal, softmax_scale=softmax_scale, window=window,
                                            softcap=softcap, alibi_slopes=alibi_slopes)
    p = torch.nan_to_num(torch.softmax(s.float() if dtype != torch.float64 else s, dim=-1), nan=0.0).to(dtype)
    if keep is not None:
        p = p * torch.from_numpy(keep).to(dtype) / (1 - dropout_p)
    o = torch.einsum("bhij,bjhd->bihd", p, vv)
    o.backward(dout.detach().cpu().to(dtype))
    return [x.grad.double().numpy() for x in (qd, kd, vd)]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("d", [64, 128, 96, 256])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hk", [1, 2])
def test_bwd(rng, dtype, d, causal, hk):
    bwd = _backward_or_skip()
    b, sq, sk, h = 2, 113, 150, 2
    q, k, v = make_qkv(rng, dtype, b, sq, sk, h, hk, d)
    dout = randn(rng, q.shape, dtype, device="cuda")
    out, lse = fwd(q, k, v, causal=causal)
    dq, dk, dv = (torch.full_like(x, float("nan")) for x in (q, k, v))
    bwd(dout, q, k, v, out, lse, causal=causal, dq=dq, dk=dk, dv=dv)
    refs = torch_ref_grads(q, k, v, dout, causal=causal)
    naive = None if dtype == "float32" else torch_ref_grads(q, k, v, dout, causal=causal,
                                                           dtype=getattr(torch, dtype))
    for name, got, i in (("dq", dq, 0), ("dk", dk, 1), ("dv", dv, 2)):
        assert_close(got, refs[i], None if naive is None else naive[i], dtype=dtype, factor=3.0, what=name)


@pytest.mark.parametrize("dtype", LOWP)
def test_bwd_features(rng, dtype):
    bwd = _backward_or_skip()
    b, sq, sk, h, hk, d = 1, 90, 77, 4, 2, 64
    q, k, v = make_qkv(rng, dtype, b, sq, sk, h, hk, d)
    dout = randn(rng, q.shape, dtype, device="cuda")
    slopes = torch.from_numpy(rng.uniform(0.01, 0.3, size=(h,)).astype(np.float32)).cuda()
    for opts in ({"window": (20, 3)}, {"softcap": 10.0}, {"alibi_slopes": slopes, "causal": True},
                 {"dropout_p": 0.2, "seed": 11}):
        seed = opts.pop("seed", 0)
        out, lse = fwd(q, k, v, causal=opts.get("causal", False), window=opts.get("window", (-1, -1)),
                       softcap=opts.get("softcap", 0.0), alibi=opts.get("alibi_slopes"),
                       dropout_p=opts.get("dropout_p", 0.0), seed=seed)
        dq, dk, dv = (torch.full_like(x, float("nan")) for x in (q, k, v))
        bwd(dout, q, k, v, out, lse, dq=dq, dk=dk, dv=dv, seed=seed, **opts)
        keep = None
        if opts.get("dropout_p"):
            keep = dropout_keep(seed, 0, opts["dropout_p"], b, h, sq, sk)
        refs = torch_ref_grads(q, k, v, dout, keep=keep, **opts)
        naive = torch_ref_grads(q, k, v, dout, keep=keep, dtype=getattr(torch, dtype), **opts)
        for name, got, i in (("dq", dq, 0), ("dk", dk, 1), ("dv", dv, 2)):
            assert_close(got, refs[i], naive[i], dtype=dtype, factor=3.0, what=f"{name} {opts}")


def check_varlen_grads(q, k, v, dout, grads, cq, ck, *, causal):
    """Each sequence's dq, dk, dv of a packed (varlen) backward against the float64 and the
    bfloat16 torch references on that sequence alone; a sequence without queries must get
    dk = dv = 0."""
    dq, dk, dv = grads
    for i in range(len(cq) - 1):
        a, e, ka, ke = int(cq[i]), int(cq[i + 1]), int(ck[i]), int(ck[i + 1])
        if e == a:
            assert torch.all(dk[ka:ke] == 0) and torch.all(dv[ka:ke] == 0), f"seq {i}: no queries, dk = dv = 0"
            continue
        sl = lambda x, s0, s1: x[None, s0:s1]  # noqa: E731
        refs = torch_ref_grads(sl(q, a, e), sl(k, ka, ke), sl(v, ka, ke), sl(dout, a, e), causal=causal)
        naive = torch_ref_grads(sl(q, a, e), sl(k, ka, ke), sl(v, ka, ke), sl(dout, a, e), causal=causal,
                                dtype=torch.bfloat16)
        for name, got, j, s0, s1 in (("dq", dq, 0, a, e), ("dk", dk, 1, ka, ke), ("dv", dv, 2, ka, ke)):
            assert_close(got[None, s0:s1], refs[j], naive[j], dtype="bfloat16", factor=3.0, what=f"{name} seq {i}")


def test_bwd_varlen(rng):
    bwd = _backward_or_skip()
    import inspect

    if "cu_seqlens_q" not in inspect.signature(bwd).parameters:
        pytest.skip("flash_attn_backward takes no cu_seqlens_q on this branch")
    lq, lk, h, d = [17, 64, 1], [30, 64, 5], 2, 64
    q = randn(rng, (sum(lq), h, d), "bfloat16", device="cuda")
    k = randn(rng, (sum(lk), h, d), "bfloat16", device="cuda")
    v = randn(rng, (sum(lk), h, d), "bfloat16", device="cuda")
    dout = randn(rng, q.shape, "bfloat16", device="cuda")
    cq, ck = _cu(lq), _cu(lk)
    out, lse = fwd(q, k, v, cu_q=cq, cu_k=ck, max_q=64, max_k=64, causal=True)
    dq, dk, dv = bwd(dout, q, k, v, out, lse, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=64, max_seqlen_k=64,
                     causal=True)
    check_varlen_grads(q, k, v, dout, (dq, dk, dv), cq, ck, causal=True)


@pytest.mark.parametrize("hk", [1, 4])
def test_bwd_deterministic_bitwise(rng, hk):
    bwd = _backward_or_skip()
    q, k, v = make_qkv(rng, "bfloat16", 2, 500, 500, 4, hk, 128)
    dout = randn(rng, q.shape, "bfloat16", device="cuda")
    out, lse = fwd(q, k, v, causal=True)
    first = bwd(dout, q, k, v, out, lse, causal=True, deterministic=True)
    for _ in range(20):
        again = bwd(dout, q, k, v, out, lse, causal=True, deterministic=True)
        for a, b in zip(first, again):
            assert torch.equal(a.view(torch.int16), b.view(torch.int16))


# Several key blocks and query tiles per block (the sm_90a backward's tiles are 128 keys x
# 64 / 128 queries; the sm_80 kernel's 128 x 64 / 128): boundaries inside and across tiles,
# GQA groups walked by one block, rows that see no key (sq > sk, causal), windows, head dims
# padded up to an instantiated one.
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("d", [64, 128, 48, 120])
@pytest.mark.parametrize("case", [(300, 517, False, (-1, -1), 2), (300, 517, True, (-1, -1), 1),
                                  (400, 200, True, (-1, -1), 2), (389, 389, False, (64, 17), 2)])
def test_bwd_tiles(rng, dtype, d, case):
    bwd = _backward_or_skip()
    sq, sk, causal, window, hk = case
    b, h = 2, 4
    q, k, v = make_qkv(rng, dtype, b, sq, sk, h, hk, d)
    dout = randn(rng, q.shape, dtype, device="cuda")
    out, lse = fwd(q, k, v, causal=causal, window=window)
    dq, dk, dv = (torch.full_like(x, float("nan")) for x in (q, k, v))
    bwd(dout, q, k, v, out, lse, causal=causal, window=window, dq=dq, dk=dk, dv=dv)
    refs = torch_ref_grads(q, k, v, dout, causal=causal, window=window)
    naive = torch_ref_grads(q, k, v, dout, causal=causal, window=window, dtype=getattr(torch, dtype))
    for name, got, i in (("dq", dq, 0), ("dk", dk, 1), ("dv", dv, 2)):
        assert_close(got, refs[i], naive[i], dtype=dtype, factor=3.0, what=f"{name} {case}")


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_bwd_varlen_tiles(rng, d, causal):
    bwd = _backward_or_skip()
    import inspect

    if "cu_seqlens_q" not in inspect.signature(bwd).parameters:
        pytest.skip("flash_attn_backward takes no cu_seqlens_q on this branch")
    lq, lk, h, hk = [130, 1, 300, 0], [257, 200, 300, 64], 4, 2
    q = randn(rng, (sum(lq), h, d), "bfloat16", device="cuda")
    k = randn(rng, (sum(lk), hk, d), "bfloat16", device="cuda")
    v = randn(rng, (sum(lk), hk, d), "bfloat16", device="cuda")
    dout = randn(rng, q.shape, "bfloat16", device="cuda")
    cq, ck = _cu(lq), _cu(lk)
    out, lse = fwd(q, k, v, cu_q=cq, cu_k=ck, max_q=max(lq), max_k=max(lk), causal=causal)
    dq, dk, dv = bwd(dout, q, k, v, out, lse, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=max(lq),
                     max_seqlen_k=max(lk), causal=causal)
    check_varlen_grads(q, k, v, dout, (dq, dk, dv), cq, ck, causal=causal)
