"""pagedflash.torch's serving operators under torch.compile and torch.library.opcheck.

- torch.library.opcheck passes on every serving operator: flash_attn_inference(_out), paged_attn(_out),
  merge_attn_states(_out), write_kv_cache, copy_blocks (schema and declared mutations, fake
  implementations, AOT dispatch).
- A serving step (cache write, paged attention with and without out=, flash forward over two key
  chunks merged in flash_attn's lse layout, in place, copy-on-write block copy) compiles with
  fullgraph=True into one graph, and gives the eager results bit for bit, caches included; those
  results match the float64 reference.
- Under inductor the caches are written in place: the compiled code holds no copy of them.
"""

from __future__ import annotations

import re

import pytest

torch = pytest.importorskip("torch")

import pagedflash.torch as pft  # noqa: E402
from conftest import assert_close, check_lse  # noqa: E402
from pagedflash import reference  # noqa: E402

NB, BS, HK, H, D = 8, 4, 2, 4, 16
SLOTS = (20, 19)  # the step's token of each sequence (its last): block 5 offset 0, block 4 offset 3


def _gen(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda *shape: torch.randn(*shape, generator=g)


def _cache(r):
    return r(NB, BS, HK, D), r(NB, BS, HK, D)


def _opcheck_cases():
    r = _gen(3)
    q, k, v = r(2, 5, H, D), r(2, 7, HK, D), r(2, 7, HK, D)
    qp, kp = r(9, H, D), r(11, HK, D)
    cq, ck = torch.tensor([0, 4, 9], dtype=torch.int32), torch.tensor([0, 6, 11], dtype=torch.int32)
    opts = (None, True, -1, -1, 0.0, None)
    kc, vc = _cache(r)
    bt = torch.tensor([[3, 1, 5], [0, 2, 7]], dtype=torch.int32)
    sl = torch.tensor([9, 6], dtype=torch.int32)
    qd, q4 = r(2, H, D), r(2, 3, H, D)
    paged = (kc, vc, bt, sl)
    popts = (None, True, 2, -1, 1.5, torch.rand(H, generator=torch.Generator().manual_seed(0)), 0)
    oa, ob, la, lb = r(2, 5, H, D), r(2, 5, H, D), r(2, H, 5), r(H, 10)
    ops = torch.ops.pagedflash
    return {
        "flash": (ops.flash_attn_inference, (q, k, v, None, None, 0, 0, *opts, False, "auto")),
        "flash-lse": (ops.flash_attn_inference, (q, k, v, None, None, 0, 0, *opts, True, "auto")),
        "flash-varlen-lse": (ops.flash_attn_inference, (qp, kp, kp, cq, ck, 5, 6, *opts, True, "auto")),
        "flash-out": (ops.flash_attn_inference_out, (q, k, v, None, None, 0, 0, *opts, "auto", r(2, 5, H, D), None)),
        "flash-out-lse": (
            ops.flash_attn_inference_out,
            (q, k, v, None, None, 0, 0, *opts, "auto", r(2, 5, H, D), r(2, H, 5)),
        ),
        "paged-decode": (ops.paged_attn, (qd, *paged, None, *popts, False, "auto")),
        "paged-q4-lse": (ops.paged_attn, (q4, *paged, None, *popts, True, "auto")),
        "paged-out-lse": (ops.paged_attn_out, (q4, *paged, None, *popts, "auto", r(2, 3, H, D), r(H, 6))),
        "merge": (ops.merge_attn_states, (oa, la, ob, lb)),
        "merge-out": (ops.merge_attn_states_out, (oa, la, ob, lb, r(2, 5, H, D), r(2, H, 5))),
        "write_kv_cache": (
            ops.write_kv_cache,
            (r(3, HK, D), r(3, HK, D), kc.clone(), vc.clone(), torch.tensor([5, -1, 30])),
        ),
        "copy_blocks": (
            ops.copy_blocks,
            ([kc.clone(), kc.clone()], [vc.clone(), vc.clone()], torch.tensor([[1, 4], [2, 6]])),
        ),
    }


_OPCHECK = _opcheck_cases()


@pytest.mark.parametrize("case", list(_OPCHECK))
def test_opcheck(case):
    op, args = _OPCHECK[case]
    torch.library.opcheck(op.default, args)


def _step(q, k_new, v_new, kc, vc, slots, bt, sl, qp, kp, vp, mapping, out_buf, paged_buf):
    """One serving step over every operator: write this step's K/V, paged attention (returned and
    into out=), flash attention of a prompt over two key chunks merged (flash_attn's lse layout;
    again in place) and into out=, then a copy-on-write block copy."""
    pft.write_kv_cache(k_new, v_new, kc, vc, slots)
    out, lse = pft.paged_attn(q, kc, vc, bt, sl, return_lse=True)
    pft.paged_attn(q, kc, vc, bt, sl, out=paged_buf, num_splits=2)
    oa, la = pft.flash_attn_inference(qp, kp[:, :4], vp[:, :4], return_lse=True)
    ob, lb = pft.flash_attn_inference(qp, kp[:, 4:], vp[:, 4:], return_lse=True)
    merged, merged_lse = pft.merge_attn_states(oa, la, ob, lb)
    pft.merge_attn_states(oa, la, ob, lb, out=oa, out_lse=la)
    pft.flash_attn_inference(qp, kp, vp, causal=True, out=out_buf)
    pft.copy_blocks([kc], [vc], mapping)
    return out * 2, lse, merged, merged_lse, oa, la


def _step_inputs():
    r = _gen(1)
    kc, vc = _cache(r)
    return dict(
        q=r(2, H, D),
        k_new=r(2, HK, D),
        v_new=r(2, HK, D),
        kc=kc,
        vc=vc,
        slots=torch.tensor(SLOTS),
        bt=torch.tensor([[3, 2, 5], [0, 1, 4]], dtype=torch.int32),
        sl=torch.tensor([9, 12], dtype=torch.int32),
        qp=r(1, 5, H, D),
        kp=r(1, 9, HK, D),
        vp=r(1, 9, HK, D),
        mapping=torch.tensor([[2, 6]]),
        out_buf=torch.full((1, 5, H, D), float("nan")),
        paged_buf=torch.full((2, H, D), float("nan")),
    )


def test_compile_serving_step_matches_eager():
    """fullgraph=True through AOTAutograd (aot_eager): one graph, no break; every result and every
    cache and out= buffer bitwise the eager one; the results against the float64 reference."""
    eager_in = _step_inputs()
    eager = _step(**eager_in)
    torch._dynamo.reset()
    comp_in = _step_inputs()
    compiled = torch.compile(_step, fullgraph=True, backend="aot_eager")(**comp_in)
    for name, a, b in zip(("out", "lse", "merged", "merged_lse", "merged in place", "lse in place"), eager, compiled):
        assert torch.equal(a, b), name
    for name in eager_in:
        assert torch.equal(eager_in[name], comp_in[name]), name
    explanation = torch._dynamo.explain(_step)(**_step_inputs())
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0

    x, ref_in = comp_in, _step_inputs()
    kc, vc = ref_in["kc"], ref_in["vc"]  # this step's tokens in their slots
    for t, slot in enumerate(SLOTS):
        kc[slot // BS, slot % BS], vc[slot // BS, slot % BS] = ref_in["k_new"][t], ref_in["v_new"][t]
    # paged attention read the written caches (before the block copy): float64 reference
    p_ref, p_lse = reference.paged_attention(x["q"], kc, vc, x["bt"], x["sl"], causal=True, return_lse=True)
    assert_close(compiled[0] / 2, p_ref, dtype="float32")
    check_lse(compiled[1], p_lse)
    assert_close(x["paged_buf"], p_ref, dtype="float32")
    kc[6], vc[6] = kc[2], vc[2]  # then block 2 copied to block 6
    assert torch.equal(x["kc"], kc) and torch.equal(x["vc"], vc)
    # two key chunks merged in flash_attn's layout: attention over all 9 keys
    f_ref, f_lse = reference.attention(x["qp"], x["kp"], x["vp"], return_lse=True)
    for out, lse in (compiled[2:4], compiled[4:6]):
        assert tuple(lse.shape) == (1, H, 5)
        assert_close(out, f_ref, dtype="float32")
        check_lse(lse, f_lse)
    assert_close(x["out_buf"], reference.attention(x["qp"], x["kp"], x["vp"], causal=True), dtype="float32")


def _cache_step(q, k_new, v_new, kc, vc, slots, bt, sl, mapping):
    pft.write_kv_cache(k_new, v_new, kc, vc, slots)
    out = pft.paged_attn(q, kc, vc, bt, sl)
    pft.copy_blocks(kc, vc, mapping)
    return out


def test_compile_inductor_writes_caches_in_place():
    """The default backend: the mutations declared on write_kv_cache and copy_blocks let inductor
    call them on the caches themselves: the generated code allocates no cache-sized buffer and
    copies nothing back; results and caches equal eager."""
    from torch._inductor.utils import run_and_get_code

    names = ("q", "k_new", "v_new", "kc", "vc", "slots", "bt", "sl", "mapping")
    eager_in = {n: _step_inputs()[n] for n in names}
    eager = _cache_step(**eager_in)
    torch._dynamo.reset()
    comp_in = {n: _step_inputs()[n] for n in names}
    compiled, code = run_and_get_code(torch.compile(_cache_step, fullgraph=True), **comp_in)
    assert torch.equal(eager, compiled)
    for n in names:
        assert torch.equal(eager_in[n], comp_in[n]), n
    code = "\n".join(code)
    assert "pagedflash.write_kv_cache.default" in code and "pagedflash.copy_blocks.default" in code
    cache_shape = re.escape(str(tuple(comp_in["kc"].shape)))
    assert not re.search(rf"empty_strided\w*\({cache_shape}", code), "a cache-sized buffer is allocated"
    assert "clone" not in code and not re.search(r"\bcopy_\(|aten\.copy_", code), "the caches are copied"
