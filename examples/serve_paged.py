"""Serve a tiny random-weight transformer through a paged KV cache, checked token by token.

A small decoder (RMSNorm, RoPE, grouped-query attention with 8 query heads over 2 KV heads
of dimension 32, SwiGLU MLP, random weights from a seeded generator, vocabulary 97) serves
a handful of requests of different prompt lengths with the serving pieces of pagedflash:

- ``BlockManager`` hands out KV-cache blocks (prefix caching on, a host pool for swaps);
- every step is ONE batched forward: the decode token of every running sequence plus
  prefill chunks of new or partly prefilled prompts, K/V stored with ``write_kv_cache``
  at ``bm.slot_mapping(...)``, attention by ``paged_attn`` over ``bm.block_tables(...)`` /
  ``bm.seq_lens(...)`` (``q [batch, h, d]`` for pure decode steps, packed ``q [total_q, h, d]``
  with ``cu_seqlens_q`` when prefill chunks join);
- prefix sharing: two requests start with the same system prompt; the second one's
  ``allocate`` reports the cached tokens and its prefill computes only the rest;
- chunked prefill: a prompt longer than the step's token budget is prefilled over several
  steps while the other sequences keep decoding;
- parallel sampling: one request is forked into n samples after its prompt; each sample
  draws its own tokens (seeded per sample), so they diverge and their shared, partly filled
  last block is copied on write (``append_slots_batch`` pairs -> one ``copy_blocks`` over
  every layer's caches, before the step writes its tokens);
- preemption: at a chosen step the parallel-sampling request is swapped out
  (``swap_out`` -> ``swap_blocks(device, host)`` for every layer's K and V), the others keep
  decoding and a new request is admitted, later it is swapped back in (``swap_in`` ->
  ``swap_blocks(host, device)``) into fresh device blocks and continues.

Unused device and host blocks are filled with NaN after every step, so a read of a stale
or never-written slot would show up in the logits.

``--kv-cache-dtype fp8 | fp8_e5m2 | int8`` serves from compressed caches instead of float32 ones:
float8 codes in raw uint8 caches read with ``kv_cache_dtype="fp8"`` (as vLLM stores them; per-tensor
scale 1), or int8 codes with a float32 scale per (token, KV head) that write_kv_cache computes and
copy_blocks / swap_blocks move with their blocks. The contiguous run then holds the same values
(pagedflash.reference.quantize_kv, dequantized) and follows the paged run's tokens; the accuracy
the compression costs is printed against a float32 cache, and the memory in bytes
(``BlockManager(bytes_per_block=pagedflash.kv_cache_bytes(...))``).

Every sequence is then generated again by the same model with plain contiguous per-request
KV caches (NumPy lists growing per token) and the float64 reference attention
(``pagedflash.reference.attention``), one request at a time, without any block manager.
The logits of every position that the paged run computed must match (max abs difference
<= 1e-4 in float32) and the generated tokens must be identical. Finally the script prints
the KV memory the paged cache used at its peak against contiguous pre-allocation of the
maximum length for every sequence. Exit status 0 when every check passes, 1 otherwise.

    python3 examples/serve_paged.py            # default size
    python3 examples/serve_paged.py --small    # a few seconds (the test)
    python3 examples/serve_paged.py --seed 3 --num-splits 2
    python3 examples/serve_paged.py --kv-cache-dtype int8    # fp8, fp8_e5m2, int8
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

import pagedflash as pf
from pagedflash import AllocStatus, BlockManager, reference
from pagedflash.reference import attention as reference_attention

TOL = 1e-4  # max |logits_paged - logits_contiguous|, float32 model
# A compressed cache stores rounded K/V; the paged run's batched float32 forward and the contiguous
# run differ in the last bits of K/V, which now and then puts a value on the other side of a
# rounding tie: one code step in one element, a few 1e-3 in the logits (largest seen 5e-3).
TOL_COMPRESSED = 2e-2


# ----------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    vocab: int = 97
    dim: int = 128
    layers: int = 4
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 32
    ffn: int = 256
    max_len: int = 256  # context length (RoPE table size; contiguous pre-allocation)
    rope_base: float = 10000.0


class TinyDecoder:
    """A random-weight decoder-only transformer in NumPy float32.

    ``forward(tokens [n], positions [n], attend)`` returns logits ``[n, vocab]``; the KV
    cache lives outside: ``attend(layer, q [n, h, d], k [n, hk, d], v [n, hk, d])`` stores
    k/v wherever its cache is and returns the attention output ``[n, h, d]`` of the n
    queries, each seeing its own sequence's tokens up to its position.
    """

    def __init__(self, cfg: ModelConfig, seed: int) -> None:
        self.cfg = cfg
        rng = np.random.default_rng([seed, 1234])
        c = cfg

        def mat(rows: int, cols: int, gain: float = 1.0) -> np.ndarray:
            return (rng.standard_normal((rows, cols)) * (gain / np.sqrt(rows))).astype(np.float32)

        def norm_w(n: int) -> np.ndarray:
            return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

        self.embed = rng.standard_normal((c.vocab, c.dim)).astype(np.float32)
        self.layers = []
        for _ in range(c.layers):
            self.layers.append(
                dict(
                    n1=norm_w(c.dim),
                    n2=norm_w(c.dim),
                    wq=mat(c.dim, c.heads * c.head_dim, 2.0),
                    wk=mat(c.dim, c.kv_heads * c.head_dim, 2.0),
                    wv=mat(c.dim, c.kv_heads * c.head_dim),
                    wo=mat(c.heads * c.head_dim, c.dim),
                    w1=mat(c.dim, c.ffn),
                    w3=mat(c.dim, c.ffn),
                    w2=mat(c.ffn, c.dim),
                )
            )
        self.norm = norm_w(c.dim)
        self.head = mat(c.dim, c.vocab)
        half = c.head_dim // 2
        inv_freq = c.rope_base ** (-np.arange(half, dtype=np.float64) / half)
        angles = np.arange(c.max_len, dtype=np.float64)[:, None] * inv_freq[None, :]
        self.cos = np.cos(angles).astype(np.float32)  # [max_len, head_dim / 2]
        self.sin = np.sin(angles).astype(np.float32)

    @staticmethod
    def _rmsnorm(x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(1e-6)) * w

    def _rope(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        half = self.cfg.head_dim // 2
        cos, sin = self.cos[positions][:, None, :], self.sin[positions][:, None, :]
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)

    def forward(
        self,
        tokens: np.ndarray,
        positions: np.ndarray,
        attend: Callable[[int, np.ndarray, np.ndarray, np.ndarray], np.ndarray],
    ) -> np.ndarray:
        c = self.cfg
        n = len(tokens)
        x = self.embed[tokens]
        for i, w in enumerate(self.layers):
            h = self._rmsnorm(x, w["n1"])
            q = self._rope((h @ w["wq"]).reshape(n, c.heads, c.head_dim), positions)
            k = self._rope((h @ w["wk"]).reshape(n, c.kv_heads, c.head_dim), positions)
            v = np.ascontiguousarray((h @ w["wv"]).reshape(n, c.kv_heads, c.head_dim))
            o = attend(i, q, k, v)
            x = x + o.reshape(n, c.heads * c.head_dim) @ w["wo"]
            h = self._rmsnorm(x, w["n2"])
            a = h @ w["w1"]
            x = x + ((a / (1.0 + np.exp(-a))) * (h @ w["w3"])) @ w["w2"]
        return self._rmsnorm(x, self.norm) @ self.head


def sample(logits: np.ndarray, rng: np.random.Generator, temperature: float) -> int:
    """One token from softmax(logits / temperature) by inverse CDF of one uniform draw."""
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    cdf = np.cumsum(p)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(cdf) - 1))


# -------------------------------------------------------------------------- workload
@dataclass
class Request:
    idx: int
    prompt: np.ndarray  # int32 token ids
    max_new: int
    n: int  # parallel samples
    arrival: int  # step
    note: str


@dataclass
class Seq:
    sid: int
    req: Request
    sample: int
    rng: np.random.Generator
    tokens: list[int]
    computed: int = 0  # tokens whose K/V are in the cache
    cached: int = 0  # prompt tokens served by the prefix cache
    logits: dict[int, np.ndarray] = field(default_factory=dict)  # position -> logits row

    @property
    def generated(self) -> int:
        return len(self.tokens) - len(self.req.prompt)


@dataclass
class Scenario:
    model: ModelConfig
    block_size: int
    num_blocks: int
    num_cpu_blocks: int
    token_budget: int  # query tokens per step (decodes + prefill chunks)
    requests: list[Request]
    preempt_req: int  # the request swapped out (all its samples) ...
    preempt_step: int  # ... at the first step >= this where it is decoding
    resume_after: int  # steps it stays swapped out


def make_scenario(small: bool, seed: int) -> Scenario:
    rng = np.random.default_rng([seed, 99])
    if small:
        model = ModelConfig(dim=64, layers=2, ffn=128, max_len=128)
        bs, nblocks, ncpu, budget = 8, 40, 16, 32
        sys_len, spec = (
            21,
            [  # (prompt, max_new, n, arrival, note)
                ("sys+6", 8, 1, 0, "system prompt + question A"),
                (13, 8, 3, 0, "parallel sampling, n=3"),
                (45, 5, 1, 1, "long prompt, chunked prefill"),
                ("sys+4", 6, 1, 2, "system prompt + question B"),
                (5, 6, 1, 5, "short prompt, arrives during the preemption"),
            ],
        )
        preempt_step, resume_after = 3, 3
    else:
        model = ModelConfig()
        bs, nblocks, ncpu, budget = 16, 48, 16, 64
        sys_len, spec = (
            37,
            [
                ("sys+12", 20, 1, 0, "system prompt + question A"),
                (29, 18, 3, 0, "parallel sampling, n=3"),
                (90, 12, 1, 1, "long prompt, chunked prefill"),
                ("sys+25", 16, 1, 3, "system prompt + question B"),
                (7, 24, 1, 7, "short prompt, arrives during the preemption"),
            ],
        )
        preempt_step, resume_after = 5, 6
    system = rng.integers(0, model.vocab, sys_len)
    reqs = []
    for i, (p, new, n, arrival, note) in enumerate(spec):
        if isinstance(p, str):
            tail = rng.integers(0, model.vocab, int(p.split("+")[1]))
            prompt = np.concatenate([system, tail])
        else:
            prompt = rng.integers(0, model.vocab, p)
        reqs.append(Request(i, prompt.astype(np.int32), new, n, arrival, note))
    return Scenario(
        model, bs, nblocks, ncpu, budget, reqs, preempt_req=1, preempt_step=preempt_step, resume_after=resume_after
    )


def _pairs(mapping: np.ndarray) -> str:
    return ", ".join(f"{a}->{b}" for a, b in np.asarray(mapping).tolist())


def sample_rng(seed: int, req: int, sample_idx: int) -> np.random.Generator:
    return np.random.default_rng([seed, req, sample_idx])


# ---------------------------------------------------------------------- KV caches
# --kv-cache-dtype: (cache dtype of pagedflash, NumPy storage, kv_cache_dtype argument, per-(token, head) scales)
KV_FORMATS = {
    "float32": ("float32", np.float32, "auto", False),
    "fp8": ("float8_e4m3fn", np.uint8, "fp8", False),  # raw bytes, as vLLM stores float8 caches
    "fp8_e5m2": ("float8_e5m2", np.uint8, "fp8_e5m2", False),
    "int8": ("int8", np.int8, "auto", True),  # int8 codes with a float32 scale per (token, KV head)
}


class KVCaches:
    """One K and one V cache per layer on the device and on the host (swap space), in one of
    KV_FORMATS, with per-(token, head) scales beside int8 caches. The float8 caches use per-tensor
    scale 1 (no calibration: vLLM's default). Stale data is made poisonous: NaN in float32, the
    NaN code in float8, NaN scales for int8."""

    def __init__(self, fmt: str, layers: int, num_blocks: int, num_cpu_blocks: int, bs: int, hk: int, d: int):
        self.dtype, self.storage, self.kv_cache_dtype, self.rows = KV_FORMATS[fmt]
        self.layers = layers

        def caches(n: int) -> list[np.ndarray]:
            return [np.zeros((n, bs, hk, d), self.storage) for _ in range(2 * layers)]  # k0, v0, k1, ...

        def scales(n: int) -> list:
            return [np.zeros((n, bs, hk), np.float32) if self.rows else None for _ in range(2 * layers)]

        self.dev, self.host = caches(num_blocks), caches(num_cpu_blocks)
        self.dev_scales, self.host_scales = scales(num_blocks), scales(num_cpu_blocks)
        self.bytes_per_block = pf.kv_cache_bytes(1, bs, hk, d, self.dtype, num_layers=layers, row_scales=self.rows)
        self.bytes_per_token = self.bytes_per_block // bs

    def poison(self, free_dev: np.ndarray, free_host: np.ndarray) -> None:
        for caches, scales, free in ((self.dev, self.dev_scales, free_dev), (self.host, self.host_scales, free_host)):
            for cache, scale in zip(caches, scales):
                if self.rows:
                    scale[free] = np.nan
                else:
                    cache[free] = np.nan if self.storage == np.float32 else 0x7F  # float8's NaN code

    def kwargs(self, i: int) -> dict:
        """The scale and format arguments of write_kv_cache / paged_attn for layer i."""
        kw: dict = {"kv_cache_dtype": self.kv_cache_dtype}
        if self.rows:
            kw.update(k_scale=self.dev_scales[2 * i], v_scale=self.dev_scales[2 * i + 1])
        return kw

    def layer(self, i: int) -> tuple:
        return self.dev[2 * i], self.dev[2 * i + 1]

    def copy(self, mapping: np.ndarray) -> None:
        """Copy-on-write: every layer's K and V (and scales) in one call."""
        ks, vs = self.dev[0::2], self.dev[1::2]
        if self.rows:
            pf.copy_blocks(ks, vs, mapping, k_scales=self.dev_scales[0::2], v_scales=self.dev_scales[1::2])
        else:
            pf.copy_blocks(ks, vs, mapping)

    def swap(self, to_host: bool, mapping: np.ndarray) -> None:
        src, dst = (self.dev, self.host) if to_host else (self.host, self.dev)
        src_s, dst_s = (self.dev_scales, self.host_scales) if to_host else (self.host_scales, self.dev_scales)
        for a, b, sa, sb in zip(src, dst, src_s, dst_s):
            if self.rows:
                pf.swap_blocks(a, b, mapping, src_scale=sa, dst_scale=sb)
            else:
                pf.swap_blocks(a, b, mapping)

    def stored(self, k: np.ndarray) -> np.ndarray:
        """What the cache holds for rows k: their dequantized quantization (write_kv_cache's, in
        NumPy: pagedflash.reference), for the contiguous reference run."""
        if self.dtype == "float32":
            return k
        return reference.dequantize_kv(*reference.quantize_kv(k, self.dtype), dtype=self.dtype)


# ------------------------------------------------------------------------ paged run
class PagedServer:
    """The serving loop: scheduler + BlockManager + paged KV caches (one pair per layer)."""

    def __init__(
        self,
        sc: Scenario,
        model: TinyDecoder,
        *,
        seed: int,
        temperature: float,
        num_splits: int,
        log: Callable[[str], None],
        kv: KVCaches,
    ) -> None:
        self.sc, self.model, self.seed, self.temperature = sc, model, seed, temperature
        self.num_splits, self.log, self.kv = num_splits, log, kv
        self.bm = BlockManager(
            sc.num_blocks,
            sc.block_size,
            num_cpu_blocks=sc.num_cpu_blocks,
            enable_prefix_caching=True,
            bytes_per_block=kv.bytes_per_block,
        )
        kv.poison(np.ones(sc.num_blocks, bool), np.ones(sc.num_cpu_blocks, bool))
        self.seqs: list[Seq] = []  # every sequence ever created
        self.stats = dict(
            steps=0,
            query_tokens=0,
            cow_copies=0,
            swap_out=0,
            swap_in=0,
            swap_out_blocks=0,
            swap_in_blocks=0,
            cached_tokens=0,
            peak_blocks=0,
            peak_bytes=0,
            decode_layout_steps=0,
            packed_layout_steps=0,
        )

    # ..................................................................... helpers
    def _new_seq(self, req: Request, sample_idx: int, tokens: list[int]) -> Seq:
        s = Seq(
            sid=100 * req.idx + sample_idx,
            req=req,
            sample=sample_idx,
            rng=sample_rng(self.seed, req.idx, sample_idx),
            tokens=list(tokens),
        )
        self.seqs.append(s)
        return s

    def _poison_unused(self) -> None:
        """NaN into every free device block and free host block (KVCaches.poison): stale data
        must never be read (evictable blocks keep their contents for prefix hits)."""
        self.kv.poison(self.bm.block_states()[1] == 0, self.bm.block_states(cpu=True)[1] == 0)

    # ........................................................................ run
    def run(self) -> None:
        sc, bm = self.sc, self.bm
        waiting = sorted(sc.requests, key=lambda r: r.arrival)
        running: list[Seq] = []  # decoding: every token but the last sampled one is in the cache
        prefilling: list[Seq] = []  # prompt partly in the cache
        swapped: list[Seq] = []
        resume_step: Optional[int] = None
        preempted = False
        step = 0
        while waiting or running or prefilling or swapped:
            if step > 10000:
                raise RuntimeError("the scheduler made no progress")
            events: list[str] = []
            # 1. swap in (at the start of the step, before anything is written)
            if swapped and step >= resume_step:
                ids = [s.sid for s in swapped]
                if bm.can_swap_in(ids) == AllocStatus.OK:
                    mapping = bm.swap_in(ids)
                    self.kv.swap(False, mapping)
                    self.stats["swap_in"] += 1
                    self.stats["swap_in_blocks"] += len(mapping)
                    events.append(
                        f"swap in req{swapped[0].req.idx} ({len(ids)} seqs; host->device " + _pairs(mapping) + ")"
                    )
                    running += swapped
                    swapped = []
            # 2. preemption (scripted): swap the whole sample group out
            group = [s for s in running if s.req.idx == sc.preempt_req]
            if (
                not preempted
                and step >= sc.preempt_step
                and group
                and not any(s.req.idx == sc.preempt_req for s in prefilling)
            ):
                ids = [s.sid for s in group]
                if bm.can_swap_out(ids):
                    mapping = bm.swap_out(ids)
                    self.kv.swap(True, mapping)
                    self.stats["swap_out"] += 1
                    self.stats["swap_out_blocks"] += len(mapping)
                    events.append(
                        f"preempt: swap out req{sc.preempt_req} ({len(ids)} seqs; device->host " + _pairs(mapping) + ")"
                    )
                    running = [s for s in running if s.req.idx != sc.preempt_req]
                    swapped, preempted, resume_step = group, True, step + sc.resume_after
            # 3. schedule: decodes, then prefill chunks, within the token budget
            items: list[tuple] = []  # (seq, number of query tokens)
            cow_pairs: list[np.ndarray] = []
            budget = sc.token_budget
            num_decode = len(running)
            if running:
                ids = np.array([s.sid for s in running], dtype=np.int64)
                last = np.array([s.tokens[-1] for s in running], dtype=np.int32)
                cow = bm.append_slots_batch(ids, 1, last)
                cow_pairs.append(cow)
                items += [(s, 1) for s in running]
                budget -= len(running)
            for s in prefilling:
                n = min(len(s.tokens) - s.computed, budget)
                if n <= 0:
                    continue
                cow_pairs.append(
                    np.asarray(
                        bm.append_slots(s.sid, n, s.tokens[s.computed : s.computed + n]), dtype=np.int64
                    ).reshape(-1, 2)
                )
                items.append((s, n))
                budget -= n
                events.append(f"prefill req{s.req.idx} [{s.computed}:{s.computed + n}]")
            while waiting and waiting[0].arrival <= step and budget > 0:
                # FCFS admission: a prompt that fits in what is left of the budget is
                # prefilled whole; one longer than the whole budget goes in chunks, starting
                # in a step where no other prompt is prefilled, its first chunk taking what
                # is left; any other prompt waits. (Prefix hits make a prompt cheaper, but
                # the hit count is known only once allocate() returns.) Each chunk is
                # allocated / appended when it is computed: the manager registers a full
                # block in the prefix cache on the premise that this step writes it.
                req = waiting[0]
                long_prompt = len(req.prompt) > sc.token_budget
                if len(req.prompt) > budget and (not long_prompt or prefilling):
                    break
                if bm.can_allocate(req.prompt) != AllocStatus.OK:
                    break
                waiting.pop(0)
                s = self._new_seq(req, 0, req.prompt.tolist())
                first = min(len(req.prompt), budget)
                s.cached = s.computed = bm.allocate(s.sid, req.prompt[:first])
                self.stats["cached_tokens"] += s.cached
                prefilling.append(s)
                items.append((s, first - s.cached))
                budget -= first - s.cached
                hit = f", prefix cache hit: {s.cached} tokens" if s.cached else ""
                events.append(
                    f"admit req{req.idx} ({req.note}; prompt {len(req.prompt)}{hit}) prefill [{s.cached}:{first}]"
                )
            if not items:
                if swapped:  # nothing else to do: swap back in early
                    resume_step = step
                step += 1
                continue
            # 4. copy-on-write for every layer in one call, before this step's writes
            cow = np.concatenate(cow_pairs) if cow_pairs else np.zeros((0, 2), np.int64)
            if len(cow):
                self.kv.copy(cow)
                self.stats["cow_copies"] += len(cow)
                events.append("copy-on-write " + _pairs(cow))
            # 5. one batched forward over the paged cache
            logits = self._forward(items)
            self.stats["steps"] += 1
            self.stats["query_tokens"] += sum(n for _, n in items)
            self.stats["peak_blocks"] = max(self.stats["peak_blocks"], bm.num_used_blocks)
            self.stats["peak_bytes"] = max(self.stats["peak_bytes"], bm.used_bytes)
            used = bm.num_used_blocks
            # 6. record logits, sample, fork, finish
            row = 0
            for s, n in items:
                for i in range(n):
                    s.logits[s.computed + i] = logits[row + i]
                row += n
                s.computed += n
                if s.computed < len(s.tokens):
                    continue  # more prompt chunks to come
                samples = [s]
                if s in prefilling:
                    prefilling.remove(s)
                    for j in range(1, s.req.n):  # parallel sampling: fork after the prompt
                        child = self._new_seq(s.req, j, s.tokens)
                        child.computed = s.computed
                        bm.fork(s.sid, child.sid)
                        samples.append(child)
                    if s.req.n > 1:
                        events.append(f"fork req{s.req.idx} into {s.req.n} samples")
                    running += samples
                for t in samples:
                    t.tokens.append(sample(logits[row - 1], t.rng, self.temperature))
                    if t.generated == t.req.max_new:
                        bm.free(t.sid)
                        running.remove(t)
                        events.append(f"finish seq {t.sid} (req{t.req.idx}, {t.generated} tokens)")
            bm.check()
            self._poison_unused()
            self.log(
                f"step {step:3d} | {len(items)} seqs, {sum(n for _, n in items):3d} query tokens "
                f"({num_decode} decode) | blocks used {used:3d}/{sc.num_blocks}" + "".join(f" | {e}" for e in events)
            )
            step += 1

    def _forward(self, items: list[tuple]) -> np.ndarray:
        bm = self.bm
        ids = np.array([s.sid for s, _ in items], dtype=np.int64)
        counts = np.array([n for _, n in items], dtype=np.int32)
        slots = bm.slot_mapping(ids, counts)  # where this step's K/V go
        tables = bm.block_tables(ids)
        lens = bm.seq_lens(ids)  # include this step's queries
        tokens = np.concatenate([np.asarray(s.tokens[s.computed : s.computed + n], np.int64) for s, n in items])
        positions = np.concatenate([np.arange(s.computed, s.computed + n) for s, n in items])
        if not np.array_equal(lens, [s.computed + n for s, n in items]):
            raise RuntimeError(f"seq_lens {lens.tolist()} disagree with the scheduler's counts")
        decode_only = bool(np.all(counts == 1))
        cu = None
        if decode_only:
            self.stats["decode_layout_steps"] += 1
        else:
            self.stats["packed_layout_steps"] += 1
            cu = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        kv = self.kv

        def attend(layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
            kc, vc = kv.layer(layer)
            pf.write_kv_cache(k, v, kc, vc, slots, **kv.kwargs(layer))  # first write (quantizing), then attend
            if decode_only:  # q [batch, h, d]: one query per sequence
                return pf.paged_attn(q, kc, vc, tables, lens, num_splits=self.num_splits, **kv.kwargs(layer))
            return pf.paged_attn(
                q, kc, vc, tables, lens, cu_seqlens_q=cu, num_splits=self.num_splits, **kv.kwargs(layer)
            )

        return self.model.forward(tokens, positions, attend)


# ------------------------------------------------------------------- reference run
def reference_generate(
    model: TinyDecoder,
    prompt: np.ndarray,
    max_new: int,
    rng: np.random.Generator,
    temperature: float,
    stored: Callable[[np.ndarray], np.ndarray],
    forced: Optional[list[int]] = None,
) -> tuple:
    """One sequence alone, with contiguous KV caches (lists growing per token) and the
    float64 naive attention; stored(k) is what a cache keeps of new rows k (themselves, or their
    dequantized quantization). forced: generate these tokens instead of sampling (teacher
    forcing). Returns (generated tokens, logits [positions, vocab])."""
    c = model.cfg
    k_cache: list[list[np.ndarray]] = [[] for _ in range(c.layers)]
    v_cache: list[list[np.ndarray]] = [[] for _ in range(c.layers)]

    def attend(layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        k_cache[layer].extend(stored(k))
        v_cache[layer].extend(stored(v))
        kk, vv = np.stack(k_cache[layer]), np.stack(v_cache[layer])
        return reference_attention(q[None], kk[None], vv[None], causal=True)[0].astype(np.float32)

    tokens = prompt.tolist()
    rows = [model.forward(np.asarray(tokens, np.int64), np.arange(len(tokens)), attend)]
    while True:
        drawn = sample(rows[-1][-1], rng, temperature)
        tokens.append(drawn if forced is None else forced[len(tokens) - len(prompt)])
        if len(tokens) - len(prompt) == max_new:
            break
        rows.append(model.forward(np.asarray(tokens[-1:], np.int64), np.array([len(tokens) - 1]), attend))
    return tokens[len(prompt) :], np.concatenate(rows)


# ---------------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--small", action="store_true", help="a small model and workload (a few seconds)")
    ap.add_argument("--seed", type=int, default=0, help="weights, prompts and sampling")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument(
        "--num-splits", type=int, default=0, help="paged_attn num_splits (0 automatic, n > 1 flash decoding)"
    )
    ap.add_argument(
        "--kv-cache-dtype",
        choices=list(KV_FORMATS),
        default="float32",
        help="the paged caches' format: float32, fp8 (float8_e4m3fn), fp8_e5m2, int8 (scale per token and KV head)",
    )
    ap.add_argument("--quiet", action="store_true", help="no per-step log")
    args = ap.parse_args(argv)

    sc = make_scenario(args.small, args.seed)
    c = sc.model
    model = TinyDecoder(c, args.seed)
    print(
        f"model: {c.layers} layers, dim {c.dim}, {c.heads} query heads / {c.kv_heads} KV heads x "
        f"{c.head_dim}, vocab {c.vocab}, context {c.max_len}; float32, seed {args.seed}"
    )
    print(
        f"cache: {sc.num_blocks} device blocks + {sc.num_cpu_blocks} host blocks of {sc.block_size} "
        f"tokens per layer; step budget {sc.token_budget} query tokens; prefix caching on"
    )
    print("requests:")
    for r in sc.requests:
        print(
            f"  req{r.idx}: prompt {len(r.prompt):3d}, {r.max_new:2d} new tokens, n={r.n}, "
            f"arrives at step {r.arrival} -- {r.note}"
        )

    kv = KVCaches(
        args.kv_cache_dtype, c.layers, sc.num_blocks, sc.num_cpu_blocks, sc.block_size, c.kv_heads, c.head_dim
    )
    server = PagedServer(
        sc,
        model,
        seed=args.seed,
        temperature=args.temperature,
        num_splits=args.num_splits,
        log=(lambda m: None) if args.quiet else print,
        kv=kv,
    )
    server.run()
    st, bm = server.stats, server.bm

    # ---- compare with contiguous per-request caches (holding what the paged cache holds: for a
    # compressed one the dequantized quantization of each row; the tokens are then teacher-forced,
    # so that a rounding flip cannot change what is compared), and a compressed run also with a
    # float32 cache: the accuracy its compression costs
    compressed = kv.dtype != "float32"
    tol = TOL_COMPRESSED if compressed else TOL
    failures: list[str] = []
    max_diff, compressed_diff, compared = 0.0, 0.0, 0
    for s in server.seqs:
        rng = sample_rng(args.seed, s.req.idx, s.sample)  # the same draws as the paged run
        paged_tokens = s.tokens[len(s.req.prompt) :]
        forced = paged_tokens if compressed else None
        ref_tokens, ref_logits = reference_generate(
            model, s.req.prompt, s.req.max_new, rng, args.temperature, kv.stored, forced
        )
        if paged_tokens != ref_tokens:
            failures.append(f"seq {s.sid}: tokens differ: paged {paged_tokens} vs contiguous {ref_tokens}")
        first = s.cached if s.sample == 0 else len(s.req.prompt)
        expect = set(range(first, len(s.req.prompt) + s.req.max_new - 1))
        if set(s.logits) != expect:
            failures.append(f"seq {s.sid}: computed positions {sorted(s.logits)} != {sorted(expect)}")
            continue
        pos = sorted(s.logits)
        paged = np.stack([s.logits[p] for p in pos])
        diff = float(np.max(np.abs(paged - ref_logits[pos])))
        if not diff <= tol:  # NaN fails too
            failures.append(f"seq {s.sid}: max |logits diff| = {diff:.3g} > {tol}")
        max_diff = max(max_diff, diff) if diff == diff else float("nan")
        compared += len(pos)
        if compressed:
            _, f32_logits = reference_generate(
                model, s.req.prompt, s.req.max_new, rng, args.temperature, lambda k: k, paged_tokens
            )
            compressed_diff = max(compressed_diff, float(np.max(np.abs(paged - f32_logits[pos]))))
    if len(server.seqs) != sum(r.n for r in sc.requests):
        failures.append(f"{len(server.seqs)} sequences served, expected {sum(r.n for r in sc.requests)}")
    if len(bm) != 0 or bm.num_used_blocks != 0:
        failures.append(f"blocks still in use after the run: {bm}")

    # ---- summary
    nseq = len(server.seqs)
    bytes_per_token = kv.bytes_per_token  # K and V of all layers, scales included
    paged_bytes = st["peak_bytes"]  # the BlockManager's used_bytes at its peak
    contiguous_bytes = nseq * c.max_len * bytes_per_token
    tight_len = max(len(r.prompt) + r.max_new for r in sc.requests)
    tight_bytes = nseq * tight_len * bytes_per_token
    f32_bytes = pf.kv_cache_bytes(1, sc.block_size, c.kv_heads, c.head_dim, "float32", num_layers=c.layers)
    kib = 1024.0
    print("summary:")
    print(
        f"  requests: {len(sc.requests)} ({nseq} sequences with samples), steps: {st['steps']} "
        f"({st['decode_layout_steps']} pure decode with q [batch, h, d], {st['packed_layout_steps']} "
        f"packed with cu_seqlens_q), query tokens computed: {st['query_tokens']}"
    )
    print(
        f"  prefix cache hits: {bm.prefix_cache_hits} of {bm.prefix_cache_queries} queried blocks "
        f"({st['cached_tokens']} prompt tokens not recomputed)"
    )
    print(f"  copy-on-write copies: {st['cow_copies']}")
    print(
        f"  swap out: {st['swap_out']} ({st['swap_out_blocks']} blocks), "
        f"swap in: {st['swap_in']} ({st['swap_in_blocks']} blocks)"
    )
    print(
        f"  logits: {compared} positions compared with contiguous per-request caches, "
        f"max |diff| = {max_diff:.2e} (tolerance {tol:g}); generated tokens "
        + (
            "teacher-forced"
            if compressed
            else "identical"
            if not any("tokens differ" in f for f in failures)
            else "DIFFER"
        )
    )
    if compressed:
        print(f"  {kv.dtype} cache against a float32 cache (same tokens): max |logits diff| = {compressed_diff:.2e}")
    print(
        f"  KV memory ({kv.dtype} cache, {bytes_per_token} bytes per token over all layers, K and V"
        + (", scales included" if kv.rows else "")
        + (f"; {f32_bytes / kv.bytes_per_block:.2f}x less than float32" if compressed else "")
        + f"): paged peak {st['peak_blocks']} blocks x "
        f"{kv.bytes_per_block} B = {paged_bytes} B ({paged_bytes / kib:.1f} KiB); contiguous pre-allocation "
        f"{nseq} seqs x {c.max_len} tokens = {contiguous_bytes / kib:.1f} KiB; "
        f"ratio {paged_bytes / contiguous_bytes:.3f} ({contiguous_bytes / paged_bytes:.1f}x less)"
    )
    print(
        f"             (even pre-allocating only the longest request, {tight_len} tokens: "
        f"{tight_bytes / kib:.1f} KiB, ratio {paged_bytes / tight_bytes:.3f})"
    )
    for f in failures:
        print("FAIL:", f)
    print(
        "FAILED"
        if failures
        else f"OK: every step's logits match the contiguous run holding the same {kv.dtype} values"
        if compressed
        else "OK: every step's logits and every token match the contiguous run"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
