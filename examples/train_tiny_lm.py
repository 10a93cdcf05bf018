"""Train a tiny causal transformer with pagedflash attention, side by side with SDPA.

A small decoder-only language model (a few layers, grouped-query attention) learns a
synthetic copy task on the CPU: each sequence is a random block of `--period` tokens
repeated to fill the context, so everything after the first block can be predicted by
attending `period` positions back (an induction/copy head). The first block is random,
so the best achievable loss is about ln(vocab) * (period - 1) / seq_len.

Two copies of the model start from the same initialization and see the same batches:
one computes attention with pagedflash.torch.flash_attn, the other with PyTorch's
scaled_dot_product_attention. The script prints both loss curves; they agree to within
float32 noise, and the loss falls.

    python examples/train_tiny_lm.py            # 300 steps
    python examples/train_tiny_lm.py --steps 30 # quick check
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import pagedflash
import pagedflash.torch as pft


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads (num_heads % num_kv_heads == 0)."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, backend: str):
        super().__init__()
        self.h, self.hk, self.d = num_heads, num_kv_heads, dim // num_heads
        self.q = nn.Linear(dim, num_heads * self.d, bias=False)
        self.kv = nn.Linear(dim, 2 * num_kv_heads * self.d, bias=False)
        self.o = nn.Linear(num_heads * self.d, dim, bias=False)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.h, self.d)
        k, v = self.kv(x).view(b, t, 2, self.hk, self.d).unbind(2)
        if self.backend == "pagedflash":
            o = pft.flash_attn(q, k, v, causal=True)  # [b, t, h, d] layout, GQA native
        else:
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
            ).transpose(1, 2)
        return self.o(o.reshape(b, t, self.h * self.d))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, backend: str):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, num_kv_heads, backend)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.n1(x))
        return x + self.mlp(self.n2(x))


class TinyLM(nn.Module):
    def __init__(
        self, vocab: int, seq_len: int, dim: int, layers: int, num_heads: int, num_kv_heads: int, backend: str
    ):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList(Block(dim, num_heads, num_kv_heads, backend) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def set_backend(self, backend: str) -> None:
        for blk in self.blocks:
            blk.attn.backend = backend

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))


def copy_batch(gen: torch.Generator, batch: int, seq_len: int, period: int, vocab: int) -> torch.Tensor:
    """[batch, seq_len + 1] tokens: a random block of `period` tokens, repeated."""
    block = torch.randint(0, vocab, (batch, period), generator=gen)
    reps = (seq_len + 1 + period - 1) // period
    return block.repeat(1, reps)[:, : seq_len + 1]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--period", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--print-every", type=int, default=10)
    ap.add_argument(
        "--bf16",
        action="store_true",
        help="run forward and backward under torch.autocast(bfloat16): attention sees bf16 q/k/v",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch and pagedflash (a model this small gains nothing from more)",
    )
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    pagedflash.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model_pf = TinyLM(args.vocab, args.seq_len, args.dim, args.layers, args.heads, args.kv_heads, "pagedflash")
    model_ref = copy.deepcopy(model_pf)  # identical initialization
    model_ref.set_backend("sdpa")
    opt_pf = torch.optim.AdamW(model_pf.parameters(), lr=args.lr, weight_decay=0.0)
    opt_ref = torch.optim.AdamW(model_ref.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 1)

    floor = math.log(args.vocab) * (args.period - 1) / args.seq_len  # targets 1..period-1 are random
    print(
        f"tiny LM: {args.layers} layers, dim {args.dim}, {args.heads} query / {args.kv_heads} kv heads, "
        f"seq {args.seq_len}, copy period {args.period}, vocab {args.vocab}; "
        f"initial loss ~{math.log(args.vocab):.3f}, best possible ~{floor:.3f}"
    )
    print(f"{'step':>5} {'pagedflash':>11} {'sdpa':>11} {'|diff|':>10}")
    curve_pf, curve_ref = [], []
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        data = copy_batch(gen, args.batch, args.seq_len, args.period, args.vocab)
        x, y = data[:, :-1], data[:, 1:]
        losses = []
        for model, opt in ((model_pf, opt_pf), (model_ref, opt_ref)):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                logits = model(x)
            loss = F.cross_entropy(logits.float().reshape(-1, args.vocab), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curve_pf.append(losses[0])
        curve_ref.append(losses[1])
        if step % args.print_every == 0 or step == 1 or step == args.steps:
            print(f"{step:5d} {losses[0]:11.5f} {losses[1]:11.5f} {abs(losses[0] - losses[1]):10.2e}", flush=True)
    max_diff = max(abs(a - b) for a, b in zip(curve_pf, curve_ref))
    print(
        f"done in {time.perf_counter() - t0:.1f} s; max |loss_pagedflash - loss_sdpa| over the run: "
        f"{max_diff:.2e}; loss {curve_pf[0]:.3f} -> {curve_pf[-1]:.3f}"
    )
    return {"pagedflash": curve_pf, "sdpa": curve_ref, "max_diff": max_diff}


if __name__ == "__main__":
    main()
