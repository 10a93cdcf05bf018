"""Every GPU operation captured in a CUDA graph and replayed with new inputs in the same buffers.

A serving loop captures its decode step once and replays it every token; a training step can be
captured the same way. What that needs from pagedflash: results allocated on the capturing
stream from torch's graph pool, work enqueued on the current (capturing) stream, no host
synchronization and no allocation outside the graph during a call, scratch that belongs to the
graph. Each test captures a step, then replays it several times after writing fresh random
inputs into the captured buffers (and NaN into the outputs) and compares every replay bit for
bit with the eager call on the same inputs -- which the op tests compare with the float64
reference.
"""

import numpy as np
import pytest

import pagedflash
from conftest import cuda_only, make_paged_cache, torch

pytestmark = pytest.mark.gpu


def capture(step):
    """step() captured in a CUDA graph after a warm-up on a side stream (torch's rule); returns
    (graph, what the captured step returned: static outputs)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = step()
    return g, outs


def refill(rng, *bufs):
    """Fresh standard normals into each floating buffer, in place (same storage)."""
    for b in bufs:
        b.copy_(torch.from_numpy(rng.standard_normal(tuple(b.shape)).astype(np.float32)).to(b.device, b.dtype))


def as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def replay_matches_eager(rng, step, inputs, *, replays=3):
    """Capture step(), then `replays` times: new inputs, NaN outputs, replay, compare bitwise with
    an eager step() on the same inputs."""
    g, static = capture(step)
    static = as_tuple(static)
    for _ in range(replays):
        refill(rng, *inputs)
        for o in static:
            if o.is_floating_point():
                o.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        eager = as_tuple(step())
        torch.cuda.synchronize()
        assert len(eager) == len(static)
        for a, b in zip(static, eager):
            assert not torch.isnan(a).all(), "the replay wrote nothing"
            assert torch.equal(a, b), "a replay differs from the eager call on the same inputs"
    return static


@cuda_only
@pytest.mark.parametrize("kernel", ["auto", "sm80"])
def test_prefill_step(backend, rng, kernel):
    """flash_attn (causal, GQA, lse) with results allocated inside the capture."""
    q = torch.empty((2, 200, 8, 128), device="cuda", dtype=torch.bfloat16)
    k = torch.empty((2, 300, 2, 128), device="cuda", dtype=torch.bfloat16)
    v = torch.empty_like(k)
    refill(rng, q, k, v)

    def step():
        return pagedflash.flash_attn(q, k, v, causal=True, return_lse=True, kernel=kernel)

    replay_matches_eager(rng, step, (q, k, v))


@cuda_only
def test_varlen_prefill_and_backward_step(backend, rng):
    """flash_attn_varlen forward + flash_attn_backward (deterministic: the dQ scratch path) in one
    graph, as a training step would capture them."""
    lens_q, lens_k = [37, 128, 5], [37, 200, 64]
    cq = torch.tensor(np.concatenate([[0], np.cumsum(lens_q)]), dtype=torch.int32, device="cuda")
    ck = torch.tensor(np.concatenate([[0], np.cumsum(lens_k)]), dtype=torch.int32, device="cuda")
    q = torch.empty((sum(lens_q), 4, 64), device="cuda", dtype=torch.float16)
    k = torch.empty((sum(lens_k), 4, 64), device="cuda", dtype=torch.float16)
    v = torch.empty_like(k)
    dout = torch.empty_like(q)
    refill(rng, q, k, v, dout)
    opts = dict(causal=True, softcap=30.0)

    def step():
        out, lse = pagedflash.flash_attn_varlen(q, k, v, cq, ck, 128, 200, return_lse=True, **opts)
        grads = pagedflash.flash_attn_backward(
            dout, q, k, v, out, lse, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=128, max_seqlen_k=200,
            deterministic=True, **opts,
        )  # fmt: skip
        return (out, lse, *grads)

    replay_matches_eager(rng, step, (q, k, v, dout))


@cuda_only
@pytest.mark.parametrize("num_splits", [0, 1, 4])
def test_decode_step(backend, rng, num_splits):
    """A serving decode step: write the new token's K/V into the paged cache, attend over it
    (flash decoding's partials and merge included), merge with a second partial result."""
    cache = make_paged_cache(backend, rng, (700, 33, 1200), 2, 128, 16, "bfloat16")
    seq_lens = cache.seq_lens
    kc, vc, bt = cache.k, cache.v, cache.block_tables
    q = torch.empty((3, 16, 128), device="cuda", dtype=torch.bfloat16)
    knew = torch.empty((3, 2, 128), device="cuda", dtype=torch.bfloat16)
    vnew = torch.empty_like(knew)
    other = torch.empty_like(q)
    other_lse = torch.empty((16, 3), device="cuda", dtype=torch.float32)
    refill(rng, q, knew, vnew, other, other_lse)
    # the new token is each sequence's last one
    bt_host, lens_host = bt.cpu().numpy(), seq_lens.cpu().numpy()
    slots = torch.tensor(
        [int(bt_host[b, (n - 1) // 16]) * 16 + (n - 1) % 16 for b, n in enumerate(lens_host)],
        dtype=torch.int64,
        device="cuda",
    )

    def step():
        pagedflash.write_kv_cache(knew, vnew, kc, vc, slots)
        out, lse = pagedflash.paged_attn(q, kc, vc, bt, seq_lens, num_splits=num_splits, return_lse=True)
        merged, merged_lse = pagedflash.merge_attn_states(out, lse, other, other_lse)
        return out, lse, merged, merged_lse

    replay_matches_eager(rng, step, (q, knew, vnew, other, other_lse))


@cuda_only
def test_chunked_prefill_step(backend, rng):
    """paged_attn over packed query chunks (cu_seqlens_q): chunked prefill and speculative
    verification in one batch, tensor-core kernels."""
    cache = make_paged_cache(backend, rng, (300, 90, 513), 2, 64, 16, "float16")
    qlens = [17, 1, 64]
    cu = torch.tensor(np.concatenate([[0], np.cumsum(qlens)]), dtype=torch.int32, device="cuda")
    q = torch.empty((sum(qlens), 8, 64), device="cuda", dtype=torch.float16)
    refill(rng, q)

    def step():
        return pagedflash.paged_attn(q, *cache, cu_seqlens_q=cu, return_lse=True)

    replay_matches_eager(rng, step, (q,))


@cuda_only
def test_cache_block_ops(backend, rng):
    """copy_blocks (copy-on-write) and swap_blocks between device caches: the copies a replay
    makes follow the caches' contents at replay time."""
    kc = torch.empty((12, 16, 2, 64), device="cuda", dtype=torch.float16)
    vc = torch.empty_like(kc)
    dst = torch.empty_like(kc)
    refill(rng, kc, vc)
    mapping = np.array([[0, 5], [3, 7], [11, 2]], dtype=np.int64)  # host mapping (the documented form)

    def step():
        pagedflash.copy_blocks([kc], [vc], mapping)
        pagedflash.swap_blocks(kc, dst, mapping)
        return kc.clone(), vc.clone(), dst.clone()

    # the outputs are the caches' state after the step; the inputs are the caches themselves
    g, static = capture(step)
    for _ in range(3):
        refill(rng, kc, vc, dst)
        before = (kc.clone(), vc.clone(), dst.clone())
        g.replay()
        torch.cuda.synchronize()
        for src, d in mapping:
            assert torch.equal(static[0][d], before[0][src]) and torch.equal(static[1][d], before[1][src])
            assert torch.equal(static[2][d], before[0][src])
        untouched = [i for i in range(12) if i not in mapping[:, 1]]
        assert torch.equal(static[0][untouched], before[0][untouched])


@cuda_only
def test_dropout_mask_and_seeded_forward(backend, rng):
    """dropout with an explicit seed: the captured forward and dropout_mask replay the same mask
    as the eager calls."""
    q = torch.empty((1, 64, 2, 64), device="cuda", dtype=torch.float16)
    k = torch.empty((1, 80, 2, 64), device="cuda", dtype=torch.float16)
    v = torch.empty_like(k)
    refill(rng, q, k, v)

    def step():
        out = pagedflash.flash_attn(q, k, v, dropout_p=0.2, seed=1234, offset=7)
        mask = pagedflash.dropout_mask(q, k, dropout_p=0.2, seed=1234, offset=7)
        return out, mask

    replay_matches_eager(rng, step, (q, k, v))
