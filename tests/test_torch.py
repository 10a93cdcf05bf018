"""pagedflash.torch: custom operators, autograd, torch.compile and opcheck.

- `import pagedflash` never imports torch; `import pagedflash.torch` does.
- pagedflash.torch.flash_attn / flash_attn_varlen are differentiable: gradients match
  torch autograd through the naive attention in float64 (DESIGN.md rule, 3x for
  low-precision gradients).
- torch.library.opcheck passes on the four operators.
- torch.compile(fullgraph=True) on a module calling them runs without graph breaks and
  gives the eager gradients.
- The plain pagedflash.flash_attn warns (once) when a gradient would be dropped.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import pagedflash  # noqa: E402
import pagedflash.torch as pft  # noqa: E402
from conftest import assert_close, naive_grads  # noqa: E402
from pagedflash import reference  # noqa: E402


def test_import_pagedflash_does_not_import_torch():
    code = (
        "import sys, pagedflash; assert 'torch' not in sys.modules, 'pagedflash imported torch'; "
        "import pagedflash.torch; assert 'torch' in sys.modules; print('ok')"
    )
    # the same pagedflash this test process imported (installed or in-place build)
    pkg_parent = str(Path(pagedflash.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=pkg_parent)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


_GRAD_WARNING_SCRIPT = r"""
import warnings, torch, pagedflash, pagedflash.torch as pft
q, k, v = torch.randn(1, 5, 2, 8, requires_grad=True), torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8)
cu = torch.tensor([0, 5], dtype=torch.int32)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    pagedflash.flash_attn(q.detach(), k, v)                     # nothing requires grad
    with torch.no_grad():
        pagedflash.flash_attn(q, k, v)                          # no graph is being recorded
    pft.flash_attn(q, k, v, causal=True).sum().backward()       # the differentiable path
    assert q.grad is not None and not w, [str(x.message) for x in w]
    pagedflash.flash_attn_varlen(k[0], q[0], v[0], cu, cu, 5, 5)  # only k requires grad
    pagedflash.flash_attn(q, k, v)
    pagedflash.flash_attn(q, k, v, return_lse=True)
print(len(w), w[0].category.__name__, w[0].filename, "|", w[0].message)
"""


def test_plain_flash_attn_warns_once_when_a_gradient_is_dropped():
    """pagedflash.flash_attn / flash_attn_varlen on a tensor that requires grad, with grad mode on,
    warn (once per process: a fresh interpreter) that no gradient will flow, naming
    pagedflash.torch.flash_attn, at the caller's line; nothing is said for tensors that do not
    require grad, under no_grad, or on pagedflash.torch's own differentiable calls."""
    pkg_parent = str(Path(pagedflash.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=pkg_parent)
    r = subprocess.run([sys.executable, "-c", _GRAD_WARNING_SCRIPT], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    count, category, filename, _, message = r.stdout.strip().split(" ", 4)
    assert (count, category, filename) == ("1", "UserWarning", "<string>"), r.stdout
    assert "requires grad" in message and "pagedflash.torch.flash_attn" in message, message


def _inputs(gen, shapes, dtype):
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "opts", [dict(causal=True), dict(window=(5, 2), softcap=3.0)], ids=["causal", "window_softcap"]
)
def test_autograd_dense(dtype, opts):
    gen = torch.Generator().manual_seed(0)
    b, sq, sk, h, hk, d = 2, 19, 23, 6, 2, 24
    q, k, v = _inputs(gen, [(b, sq, h, d), (b, sk, hk, d), (b, sk, hk, d)], dtype)
    slopes = torch.rand(h, generator=gen)
    kw = dict(opts, alibi_slopes=slopes)
    out = pft.flash_attn(q, k, v, **kw)
    dout = torch.randn(out.shape, generator=gen).to(dtype)
    out.backward(dout)
    name = str(dtype).rpartition(".")[2]
    ref = naive_grads(dout, q, k, v, dtype="float64", **kw)
    naive = naive_grads(dout, q, k, v, dtype=name, **kw) if dtype != torch.float32 else [None] * 3
    for t, r, n in zip((q, k, v), ref, naive):
        assert t.grad.dtype == dtype and t.grad.shape == t.shape
        assert_close(t.grad, r, n, dtype=name, grad=True)


def test_autograd_varlen():
    gen = torch.Generator().manual_seed(1)
    lens_q, lens_k = [5, 0, 1, 40], [7, 3, 1, 40]
    cq = torch.tensor(np.concatenate([[0], np.cumsum(lens_q)]), dtype=torch.int32)
    ck = torch.tensor(np.concatenate([[0], np.cumsum(lens_k)]), dtype=torch.int32)
    h, hk, d = 4, 1, 16
    q, k, v = _inputs(gen, [(int(cq[-1]), h, d), (int(ck[-1]), hk, d), (int(ck[-1]), hk, d)], torch.float32)
    out, lse = pft.flash_attn_varlen(q, k, v, cq, ck, 40, 40, causal=True, return_lse=True)
    assert not lse.requires_grad and lse.shape == (h, int(cq[-1]))
    dout = torch.randn(out.shape, generator=gen)
    out.backward(dout)
    ref = reference.attention_varlen_backward(dout, q, k, v, cq, ck, causal=True)
    for t, r in zip((q, k, v), ref):
        assert_close(t.grad, r, dtype="float32", grad=True)


def test_autograd_dropout_uses_the_forward_seed():
    gen = torch.Generator().manual_seed(2)
    b, s, h, d = 1, 33, 2, 16
    q, k, v = _inputs(gen, [(b, s, h, d)] * 3, torch.float32)
    out = pft.flash_attn(q, k, v, dropout_p=0.3, seed=123)
    dout = torch.randn(out.shape, generator=gen)
    out.backward(dout)
    mask = pagedflash.dropout_mask(q.detach(), k.detach(), dropout_p=0.3, seed=123)
    assert_close(out, reference.attention(q, k, v, dropout_p=0.3, dropout_mask=mask), dtype="float32")
    ref = reference.attention_backward(dout, q, k, v, dropout_p=0.3, dropout_mask=mask)
    for t, r in zip((q, k, v), ref):
        assert_close(t.grad, r, dtype="float32", grad=True)
    # seed=None: a fresh seed from torch's generator per call; manual_seed reproduces it
    torch.manual_seed(5)
    a = pft.flash_attn(q, k, v, dropout_p=0.3)
    b_ = pft.flash_attn(q, k, v, dropout_p=0.3)
    torch.manual_seed(5)
    c = pft.flash_attn(q, k, v, dropout_p=0.3)
    assert not torch.equal(a, b_) and torch.equal(a, c)


def _dense_args(requires_grad, dropout):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 9, 4, 16, generator=gen)
    k = torch.randn(2, 11, 2, 16, generator=gen)
    v = torch.randn(2, 11, 2, 16, generator=gen)
    if requires_grad:
        q, k, v = (x.requires_grad_() for x in (q, k, v))
    seed = torch.tensor(99) if dropout else None
    return (q, k, v, None, True, -1, -1, 2.0, torch.rand(4, generator=gen), 0.2 if dropout else 0.0, seed, 0)


def _varlen_args(requires_grad):
    gen = torch.Generator().manual_seed(4)
    cq = torch.tensor([0, 3, 3, 10], dtype=torch.int32)
    ck = torch.tensor([0, 5, 6, 12], dtype=torch.int32)
    q = torch.randn(10, 4, 8, generator=gen)
    k = torch.randn(12, 2, 8, generator=gen)
    v = torch.randn(12, 2, 8, generator=gen)
    if requires_grad:
        q, k, v = (x.requires_grad_() for x in (q, k, v))
    return (q, k, v, cq, ck, 7, 5, None, False, 4, -1, 0.0, None, 0.1, torch.tensor(7), 0)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dropout", [False, True])
def test_opcheck_dense(requires_grad, dropout):
    args = _dense_args(requires_grad, dropout)
    torch.library.opcheck(torch.ops.pagedflash.flash_attn_fwd.default, args)
    q, k, v = (x.detach() for x in args[:3])
    out, lse = torch.ops.pagedflash.flash_attn_fwd(q, k, v, *args[3:])
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.pagedflash.flash_attn_bwd.default, (dout, q, k, v, out, lse) + args[3:])


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_varlen(requires_grad):
    args = _varlen_args(requires_grad)
    torch.library.opcheck(torch.ops.pagedflash.flash_attn_varlen_fwd.default, args)
    q, k, v = (x.detach() for x in args[:3])
    out, lse = torch.ops.pagedflash.flash_attn_varlen_fwd(q, k, v, *args[3:])
    torch.library.opcheck(
        torch.ops.pagedflash.flash_attn_varlen_bwd.default, (torch.randn_like(out), q, k, v, out, lse) + args[3:]
    )


class TinyAttention(torch.nn.Module):
    """A projection, pagedflash attention (dense or varlen) and an output projection."""

    def __init__(self, dim=32, heads=4, kv_heads=2, varlen=False, dropout_p=0.0):
        super().__init__()
        self.h, self.hk, self.d = heads, kv_heads, dim // heads
        self.qkv = torch.nn.Linear(dim, (heads + 2 * kv_heads) * self.d)
        self.out = torch.nn.Linear(dim, dim)
        self.varlen, self.dropout_p = varlen, dropout_p

    def forward(self, x, cu_seqlens=None, max_seqlen=0):
        qkv = self.qkv(x)
        q, k, v = qkv.split([self.h * self.d, self.hk * self.d, self.hk * self.d], dim=-1)
        if self.varlen:  # x: [total, dim]
            q, k, v = q.view(-1, self.h, self.d), k.view(-1, self.hk, self.d), v.view(-1, self.hk, self.d)
            o = pft.flash_attn_varlen(
                q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True, dropout_p=self.dropout_p
            )
        else:  # x: [b, s, dim]
            b, s, _ = x.shape
            q, k, v = q.view(b, s, self.h, self.d), k.view(b, s, self.hk, self.d), v.view(b, s, self.hk, self.d)
            o = pft.flash_attn(q, k, v, causal=True, softcap=5.0, dropout_p=self.dropout_p)
        return self.out(o.reshape(*x.shape[:-1], -1))


def _grads(mod, *args):
    mod.zero_grad()
    y = mod(*args)
    (y * y).sum().backward()
    return y.detach().clone(), [p.grad.clone() for p in mod.parameters()]


def test_torch_compile_fullgraph_inductor():
    """The default backend (inductor), fullgraph: no graph breaks; same results as eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    mod = TinyAttention()
    x = torch.randn(2, 13, 32)
    y_eager, g_eager = _grads(mod, x)
    compiled = torch.compile(mod, fullgraph=True)
    y_c, g_c = _grads(compiled, x)
    torch.testing.assert_close(y_c, y_eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_c, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_torch_compile_fullgraph_dropout_and_varlen(varlen):
    """fullgraph through AOTAutograd (aot_eager backend): the seed drawn inside the graph
    reaches the backward; dropout with the same torch seed matches eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    mod = TinyAttention(varlen=varlen, dropout_p=0.2)
    if varlen:
        args = (torch.randn(20, 32), torch.tensor([0, 7, 8, 20], dtype=torch.int32), 12)
    else:
        args = (torch.randn(2, 13, 32),)
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
    torch.manual_seed(1)
    y_eager, g_eager = _grads(mod, *args)
    torch.manual_seed(1)
    y_c, g_c = _grads(compiled, *args)
    torch.testing.assert_close(y_c, y_eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_c, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # no graph break: explain() sees exactly one graph
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(mod)(*args)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
