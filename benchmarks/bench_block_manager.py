"""Benchmark: one decode step of the BlockManager on the CPU.

A scheduler step for S running sequences of ~T tokens (block size B):
  1. append one token to every sequence        (append_slots_batch / append_slots)
  2. build the padded block-table array        (block_tables -> int32 [S, max_blocks])
  3. build the slot mapping of the new tokens  (slot_mapping  -> int64 [S])
(plus seq_lens, which paged_attn also needs, reported separately).

Compared in the same run against a minimal pure-Python block manager in the style of
vLLM v0 (free list, refcounts, per-sequence Python lists; tables padded into a NumPy
array every step). Correctness first: both managers run the same operations from the
same state and must produce identical block tables and slot mappings.

Every 128 steps (untimed) all sequences are freed and re-allocated at ~T tokens, so the
lengths stay near T and 1 in B appends takes a new block, as in steady-state decoding.
The managers take turns, 128 steps each (benchmarks/common.py steps_in_turns), so a
drift of the machine during the run affects them alike.

    PYTHONPATH=python python3 benchmarks/bench_block_manager.py [--seqs 256 --tokens 4096 ...]

Writes benchmarks/results/block_manager_cpu.md. Never asserts on speed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

import common

try:
    from pagedflash import BlockManager
except ImportError:  # run from a checkout without PYTHONPATH: the in-place build under python/
    sys.path.append(str(Path(__file__).resolve().parent.parent / "python"))
    from pagedflash import BlockManager

ROOT = common.ROOT
clock_ns = common.clock_ns  # the harness's clock (time.perf_counter_ns)
RESET_EVERY = 128


class PyBlockManager:
    """Minimal pure-Python block manager (the vLLM v0 design, reduced to what a decode
    step needs): a LIFO free list, a refcount list, a Python list of block ids per
    sequence, copy-on-write of a shared last block, padded tables rebuilt each step."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.free_list = list(range(num_blocks - 1, -1, -1))  # pop() takes block 0 first
        self.refs = [0] * num_blocks
        self.tables: dict = {}
        self.lens: dict = {}

    def _take(self) -> int:
        if not self.free_list:
            raise MemoryError("out of blocks")
        b = self.free_list.pop()
        self.refs[b] = 1
        return b

    def allocate(self, seq_id: int, num_tokens: int) -> None:
        n = -(-num_tokens // self.block_size)
        if n > len(self.free_list):
            raise MemoryError("out of blocks")
        self.tables[seq_id] = [self._take() for _ in range(n)]
        self.lens[seq_id] = num_tokens

    def append_slots(self, seq_id: int):
        table = self.tables[seq_id]
        n = self.lens[seq_id]
        cow = None
        if n % self.block_size == 0:
            table.append(self._take())
        elif self.refs[table[-1]] > 1:
            b = self._take()
            self.refs[table[-1]] -= 1
            cow = (table[-1], b)
            table[-1] = b
        self.lens[seq_id] = n + 1
        return cow

    def free(self, seq_id: int) -> None:
        for b in reversed(self.tables.pop(seq_id)):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.free_list.append(b)
        del self.lens[seq_id]

    def block_tables(self, seq_ids) -> np.ndarray:
        rows = [self.tables[s] for s in seq_ids]
        width = max(map(len, rows)) if rows else 0
        return np.array([r + [0] * (width - len(r)) for r in rows], dtype=np.int32).reshape(len(rows), width)

    def slot_mapping(self, seq_ids) -> np.ndarray:
        bs = self.block_size
        out = []
        for s in seq_ids:
            p = self.lens[s] - 1
            out.append(self.tables[s][p // bs] * bs + p % bs)
        return np.array(out, dtype=np.int64)

    def seq_lens(self, seq_ids) -> np.ndarray:
        return np.array([self.lens[s] for s in seq_ids], dtype=np.int32)


class PyNumpyBlockManager(PyBlockManager):
    """The same design with the tables in one persistent NumPy int32 array
    [max_seqs, max_blocks] and lengths in an int64 array, so block tables are a gather
    (fancy indexing) and the slot mapping is vectorized; appends stay a Python loop."""

    def __init__(self, num_blocks: int, block_size: int, max_seqs: int, max_blocks: int) -> None:
        super().__init__(num_blocks, block_size)
        self.table_arr = np.zeros((max_seqs, max_blocks), dtype=np.int32)
        self.nblocks = np.zeros(max_seqs, dtype=np.int64)
        self.len_arr = np.zeros(max_seqs, dtype=np.int64)

    def allocate(self, seq_id: int, num_tokens: int) -> None:
        super().allocate(seq_id, num_tokens)
        t = self.tables[seq_id]
        self.table_arr[seq_id, : len(t)] = t
        self.nblocks[seq_id] = len(t)
        self.len_arr[seq_id] = num_tokens

    def append_slots(self, seq_id: int):
        cow = super().append_slots(seq_id)
        t = self.tables[seq_id]
        self.table_arr[seq_id, len(t) - 1] = t[-1]
        self.nblocks[seq_id] = len(t)
        self.len_arr[seq_id] += 1
        return cow

    def block_tables(self, seq_ids) -> np.ndarray:
        ids = np.asarray(seq_ids)
        width = int(self.nblocks[ids].max()) if len(ids) else 0
        out = self.table_arr[ids, :width]
        out[np.arange(width)[None, :] >= self.nblocks[ids][:, None]] = 0
        return out

    def slot_mapping(self, seq_ids) -> np.ndarray:
        ids = np.asarray(seq_ids)
        pos = self.len_arr[ids] - 1
        bs = self.block_size
        return self.table_arr[ids, pos // bs].astype(np.int64) * bs + pos % bs

    def seq_lens(self, seq_ids) -> np.ndarray:
        return self.len_arr[np.asarray(seq_ids)].astype(np.int32)


def prompt_lengths(rng, seqs, tokens):
    return (tokens - rng.integers(0, 64, size=seqs)).tolist()


def make_variants(args):
    """Each variant: (name, setup(lengths) -> state, step(state) -> dict of op times (ns))."""
    S, B = args.seqs, args.block_size
    num_blocks = S * (-(-(args.tokens + RESET_EVERY + 16) // B)) + 64
    rng = np.random.default_rng(0)

    def pf_setup(caching):
        def setup(lengths):
            bm = BlockManager(num_blocks, B, enable_prefix_caching=caching, watermark=0.0)
            for i, n in enumerate(lengths):
                bm.allocate(i, rng.integers(0, 32000, size=n, dtype=np.int32) if caching else n)
            return bm

        return setup

    ids = np.arange(S, dtype=np.int64)
    new_tokens = np.arange(S, dtype=np.int32)

    def pf_batched(caching, out_arrays):
        bt_out = None

        def step(bm):
            nonlocal bt_out
            t0 = clock_ns()
            bm.append_slots_batch(ids, 1, new_tokens if caching else None)
            t1 = clock_ns()
            if out_arrays:
                width = -(-(args.tokens + RESET_EVERY + 16) // B)  # fixed, >= any table
                if bt_out is None:
                    bt_out = np.empty((S, width), dtype=np.int32)
                bm.block_tables(ids, out=bt_out)
            else:
                bm.block_tables(ids)
            t2 = clock_ns()
            bm.slot_mapping(ids, 1)
            t3 = clock_ns()
            bm.seq_lens(ids)
            t4 = clock_ns()
            return {"append": t1 - t0, "block_tables": t2 - t1, "slot_mapping": t3 - t2, "seq_lens": t4 - t3}

        return step

    id_list = list(range(S))

    def pf_loop(bm):
        t0 = clock_ns()
        for s in id_list:
            bm.append_slots(s)
        t1 = clock_ns()
        bm.block_tables(id_list)
        t2 = clock_ns()
        bm.slot_mapping(id_list, 1)
        t3 = clock_ns()
        bm.seq_lens(id_list)
        t4 = clock_ns()
        return {"append": t1 - t0, "block_tables": t2 - t1, "slot_mapping": t3 - t2, "seq_lens": t4 - t3}

    def py_setup(lengths):
        bm = PyBlockManager(num_blocks, B)
        for i, n in enumerate(lengths):
            bm.allocate(i, n)
        return bm

    def pynp_setup(lengths):
        bm = PyNumpyBlockManager(num_blocks, B, S, -(-(args.tokens + RESET_EVERY + 16) // B))
        for i, n in enumerate(lengths):
            bm.allocate(i, n)
        return bm

    def py_step(bm):
        t0 = clock_ns()
        for s in id_list:
            bm.append_slots(s)
        t1 = clock_ns()
        bm.block_tables(id_list)
        t2 = clock_ns()
        bm.slot_mapping(id_list)
        t3 = clock_ns()
        bm.seq_lens(id_list)
        t4 = clock_ns()
        return {"append": t1 - t0, "block_tables": t2 - t1, "slot_mapping": t3 - t2, "seq_lens": t4 - t3}

    def pf_reset(bm, lengths, caching):
        for s in range(S):
            bm.free(s)
        bm.reset_prefix_cache()
        for i, n in enumerate(lengths):
            bm.allocate(i, rng.integers(0, 32000, size=n, dtype=np.int32) if caching else n)

    def py_reset(bm, lengths):
        for s in range(S):
            bm.free(s)
        for i, n in enumerate(lengths):
            bm.allocate(i, n)

    return [
        (
            "pagedflash, batched (int64 ids)",
            pf_setup(False),
            pf_batched(False, False),
            lambda bm, L: pf_reset(bm, L, False),
            args.steps,
        ),
        (
            "pagedflash, batched, out= arrays",
            pf_setup(False),
            pf_batched(False, True),
            lambda bm, L: pf_reset(bm, L, False),
            args.steps,
        ),
        (
            "pagedflash, batched, prefix caching + token ids",
            pf_setup(True),
            pf_batched(True, False),
            lambda bm, L: pf_reset(bm, L, True),
            args.steps,
        ),
        (
            "pagedflash, per-sequence append_slots loop",
            pf_setup(False),
            pf_loop,
            lambda bm, L: pf_reset(bm, L, False),
            args.steps,
        ),
        ("Python + NumPy persistent table", pynp_setup, py_step, py_reset, args.baseline_steps),
        ("pure-Python baseline (vLLM v0 style)", py_setup, py_step, py_reset, args.baseline_steps),
    ]


def check_correctness(args):
    """Same operations on both managers, identical tables, slots and lengths."""
    S, B = args.seqs, args.block_size
    num_blocks = S * (-(-(args.tokens + 64) // B)) + 64
    lengths = prompt_lengths(np.random.default_rng(1), S, args.tokens)
    a, b = BlockManager(num_blocks, B), PyBlockManager(num_blocks, B)
    npm = PyNumpyBlockManager(num_blocks, B, S, -(-(args.tokens + 64) // B))
    for i, n in enumerate(lengths):
        a.allocate(i, n)
        b.allocate(i, n)
        npm.allocate(i, n)
    ids = list(range(S))
    for step in range(40):
        ca = a.append_slots_batch(ids)
        cb = [x for x in (b.append_slots(s) for s in ids) if x]
        cc = [x for x in (npm.append_slots(s) for s in ids) if x]
        assert ca.tolist() == [list(x) for x in cb] == [list(x) for x in cc]
        for m in (b, npm):
            assert np.array_equal(a.block_tables(ids), m.block_tables(ids)), step
            assert np.array_equal(a.slot_mapping(ids, 1), m.slot_mapping(ids)), step
            assert np.array_equal(a.seq_lens(ids), m.seq_lens(ids)), step
    # fork + copy-on-write agree too
    a.fork(0, S)
    b.tables[S] = list(b.tables[0])
    b.lens[S] = b.lens[0]
    for blk in b.tables[0]:
        b.refs[blk] += 1
    ca = a.append_slots_batch([0, S])
    cb = [c for c in (b.append_slots(s) for s in (0, S)) if c]
    assert ca.tolist() == [list(c) for c in cb]
    assert np.array_equal(a.block_tables([0, S]), b.block_tables([0, S]))
    a.check()


def stepper(name, setup, step, reset, steps, args):
    """A common.Stepper for one manager: its own state, built from the same prompt lengths (the
    same generator seed) as every other manager's."""
    rng = np.random.default_rng(2)
    bm = setup(prompt_lengths(rng, args.seqs, args.tokens))
    return common.Stepper(
        name,
        lambda: step(bm),
        steps,
        warmup=max(steps // 10, 20),
        reset=lambda: reset(bm, prompt_lengths(rng, args.seqs, args.tokens)),
    )


def summarize(name, steps):
    """Median / p10 / p90 of a manager's step times (append + block tables + slot mapping), the
    same with seq_lens, and each phase's median, in microseconds."""
    core = common.Timing.from_ns(t["append"] + t["block_tables"] + t["slot_mapping"] for t in steps)
    with_lens = common.Timing.from_ns(
        t["append"] + t["block_tables"] + t["slot_mapping"] + t["seq_lens"] for t in steps
    )
    ops = {k: common.Timing.from_ns(t[k] for t in steps).us for k in ("append", "block_tables", "slot_mapping")}
    return {
        "name": name,
        "steps": len(steps),
        "p10": core.p10 * 1e6,
        "median": core.us,
        "p90": core.p90 * 1e6,
        "median_with_lens": with_lens.us,
        "ops": ops,
    }


def render(results):
    base = results[-1]["median"]
    header = [
        "manager",
        "step median (us)",
        "p10",
        "p90",
        "vs baseline",
        "append",
        "block_tables",
        "slot_mapping",
        "+ seq_lens: step median",
    ]
    rows = []
    for r in results:
        o = r["ops"]
        rows.append(
            [
                r["name"],
                f"{r['median']:.1f}",
                f"{r['p10']:.1f}",
                f"{r['p90']:.1f}",
                f"{base / r['median']:.1f}x",
                f"{o['append']:.1f}",
                f"{o['block_tables']:.1f}",
                f"{o['slot_mapping']:.1f}",
                f"{r['median_with_lens']:.1f}",
            ]
        )
    return common.markdown_table(header, rows, align="-" + "r" * 8)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3000, help="timed steps per pagedflash variant")
    ap.add_argument("--baseline-steps", type=int, default=300, help="timed steps for the baselines")
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "block_manager_cpu.md"))
    ap.add_argument("--no-write", action="store_true")
    common.add_common_args(ap)
    args = ap.parse_args(argv)

    check_correctness(args)
    prov = common.provenance_line("cpu", args.commit)
    print(prov, flush=True)
    variants = make_variants(args)
    steppers = [stepper(name, setup, step, reset, steps, args) for name, setup, step, reset, steps in variants]
    measured = common.steps_in_turns(steppers, every=RESET_EVERY)
    results = [summarize(s.name, m) for s, m in zip(steppers, measured)]
    table = render(results)
    header = (
        f"# BlockManager decode step on the CPU\n\n"
        f"{prov}\n\n"
        f"- workload: {args.seqs} running sequences of ~{args.tokens} tokens "
        f"({args.tokens - 63}..{args.tokens}, re-allocated every {RESET_EVERY} steps), "
        f"block size {args.block_size}, so block tables are "
        f"[{args.seqs}, ~{-(-args.tokens // args.block_size)}] int32\n"
        f"- step = append one token to every sequence + padded block-table array + slot "
        f"mapping; times in microseconds (perf_counter_ns), median / p10 / p90 over "
        f"{args.steps} steps ({args.baseline_steps} for the baselines) after warm-up; the managers "
        f"take turns, {RESET_EVERY} steps each (benchmarks/common.py steps_in_turns); per-op "
        f"columns are per-op medians\n"
        f"- correctness checked first: identical tables, slots, lengths and copy-on-write "
        f"pairs from both managers\n"
        f"- command: `PYTHONPATH=python python3 benchmarks/bench_block_manager.py "
        f"--seqs {args.seqs} --tokens {args.tokens} --block-size {args.block_size}`\n\n"
    )
    text = header + table + "\n"
    common.write_report(text, None if args.no_write else args.output)


if __name__ == "__main__":
    main()
