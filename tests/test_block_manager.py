"""BlockManager: unit tests for every method and error, and hypothesis stateful tests
that run random serving sequences against a simulated KV cache.

The simulated cache is a dict block -> list of token ids. A serving loop writes a
token's K/V at its slot, applies copy-on-write pairs with copy_blocks and swap
mappings with swap_blocks; the simulation does exactly that with token ids, so a
sequence reading its block table back must see exactly its own tokens.
"""

from __future__ import annotations

import numpy as np
import pytest

import pagedflash
from pagedflash import AllocStatus, BlockManager, OutOfBlocks

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test  # noqa: E402


def tokens(n, start=0):
    return [(start + 7 * i) % 1000 for i in range(n)]


def refs_from_tables(bm, cpu=False):
    """Reference count of each block implied by the sequences' tables."""
    snap = bm.snapshot()
    n = bm.num_cpu_blocks if cpu else bm.num_blocks
    counts = [0] * n
    for _, swapped, table, _ in snap["seqs"].values():
        if swapped == cpu:
            for b in table:
                counts[b] += 1
    return counts


# --------------------------------------------------------------------------- exports


def test_exports():
    assert pagedflash.BlockManager is BlockManager
    assert pagedflash.AllocStatus is AllocStatus
    assert "BlockManager" in pagedflash.__all__ and "AllocStatus" in pagedflash.__all__
    assert issubclass(OutOfBlocks, MemoryError)
    assert OutOfBlocks is pagedflash._C.OutOfBlocks


# --------------------------------------------------------------------------- construction


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        (dict(num_blocks=0, block_size=16), ValueError, "num_blocks"),
        (dict(num_blocks=-3, block_size=16), ValueError, "num_blocks"),
        (dict(num_blocks=8, block_size=0), ValueError, "block_size"),
        (dict(num_blocks=8, block_size=16, num_cpu_blocks=-1), ValueError, "num_cpu_blocks"),
        (dict(num_blocks=8, block_size=16, watermark=1.0), ValueError, "watermark"),
        (dict(num_blocks=8, block_size=16, watermark=-0.1), ValueError, "watermark"),
        (dict(num_blocks=8.0, block_size=16), TypeError, "num_blocks"),
        (dict(num_blocks=8, block_size=True), TypeError, "block_size"),
        (dict(num_blocks=2**31, block_size=16), ValueError, "num_blocks"),
        (dict(num_blocks=8, block_size=16, bytes_per_block=-1), ValueError, "bytes_per_block"),
        (dict(num_blocks=8, block_size=16, bytes_per_block=2.0), TypeError, "bytes_per_block"),
    ],
)
def test_constructor_errors(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        BlockManager(**kwargs)


def test_constructor_keyword_only_and_properties():
    with pytest.raises(TypeError):
        BlockManager(8, 16, 4)  # num_cpu_blocks is keyword-only
    bm = BlockManager(200, 16, num_cpu_blocks=7, watermark=0.05, enable_prefix_caching=True)
    assert (bm.num_blocks, bm.block_size, bm.num_cpu_blocks) == (200, 16, 7)
    assert bm.watermark == 0.05 and bm.watermark_blocks == 10 and bm.enable_prefix_caching
    assert bm.num_free_blocks == 200 and bm.num_free_cpu_blocks == 7 and bm.usage == 0.0
    assert bm.num_seqs == 0 and len(bm) == 0 and bm.seq_ids == []
    assert bm.prefix_cache_hits == 0 and bm.prefix_cache_queries == 0 and bm.prefix_cache_hit_rate == 0.0
    assert "BlockManager(num_blocks=200" in repr(bm)
    assert bm.bytes_per_block == 0 and bm.used_bytes == 0 and "bytes" not in repr(bm)
    bm.check()


def test_memory_in_bytes():
    """bytes_per_block from pagedflash.kv_cache_bytes: the counts in bytes follow the block counts,
    for float and compressed caches (int8 with its per-(token, head) float32 scales)."""
    from pagedflash import kv_cache_bytes

    # 32 layers, 8 KV heads x 128, block 16: K and V
    assert kv_cache_bytes(1, 16, 8, 128, "bfloat16", num_layers=32) == 2 * 32 * 16 * 8 * 128 * 2
    assert kv_cache_bytes(1, 16, 8, 128, "fp8", num_layers=32) == 2 * 32 * 16 * 8 * 128
    assert kv_cache_bytes(1, 16, 8, 128, "float8_e5m2", num_layers=32) == 2 * 32 * 16 * 8 * 128
    assert kv_cache_bytes(10, 16, 8, 128, "int8", row_scales=True) == 10 * 2 * 16 * 8 * (128 + 4)
    assert kv_cache_bytes(3, 4, 2, 8, np.float32) == 3 * 2 * 4 * 2 * 8 * 4
    with pytest.raises(TypeError, match="dtype"):
        kv_cache_bytes(1, 16, 8, 128, "float64")
    with pytest.raises(ValueError, match="row_scales"):
        kv_cache_bytes(1, 16, 8, 128, "bfloat16", row_scales=True)
    per_block = kv_cache_bytes(1, 16, 8, 128, "int8", num_layers=2, row_scales=True)
    bm = BlockManager(100, 16, bytes_per_block=per_block)
    bm.allocate(1, 40)  # 3 blocks
    assert (bm.bytes_per_block, bm.used_bytes, bm.free_bytes, bm.total_bytes) == (
        per_block,
        3 * per_block,
        97 * per_block,
        100 * per_block,
    )
    assert f"{3 * per_block} of {100 * per_block} bytes used" in repr(bm)


# --------------------------------------------------------------------------- allocate


@pytest.mark.parametrize("n", [1, 7, 16, 17, 113, 203])
def test_allocate_tables_slots_lens(n):
    bs = 16
    bm = BlockManager(64, bs)
    cached = bm.allocate(5, tokens(n))
    assert cached == 0
    nb = -(-n // bs)
    table = bm.block_table(5)
    assert table.dtype == np.int32 and table.shape == (nb,)
    assert len(set(table.tolist())) == nb
    assert bm.seq_len(5) == n and 5 in bm and 6 not in bm and not bm.is_swapped(5)
    assert bm.num_free_blocks == 64 - nb and bm.num_used_blocks == nb
    assert bm.usage == pytest.approx(nb / 64)
    slots = bm.slot_mapping(5, n)
    assert slots.dtype == np.int64
    expect = [table[t // bs] * bs + t % bs for t in range(n)]
    assert slots.tolist() == expect
    assert bm.slot_mapping([5], 1).tolist() == expect[-1:]
    assert bm.slot_mapping([5], 0).tolist() == []
    assert bm.token_ids(5) == tokens(n)
    assert bm.seq_lens([5]).tolist() == [n] and bm.seq_lens([5]).dtype == np.int32
    bm.check()


def test_allocate_by_length_and_empty():
    bm = BlockManager(8, 4)
    assert bm.allocate(1, 6) == 0  # a length: tokens unknown
    assert bm.token_ids(1) == [-1] * 6
    assert bm.allocate(2, []) == 0
    assert bm.seq_len(2) == 0 and bm.block_table(2).tolist() == []
    assert bm.block_tables([1, 2]).tolist() == [bm.block_table(1).tolist(), [0, 0]]
    assert bm.append_slots(2, 1) == []
    assert bm.seq_len(2) == 1 and len(bm.block_table(2)) == 1
    bm.check()


def test_allocate_errors_leave_state():
    bm = BlockManager(4, 4)
    bm.allocate(1, tokens(5))
    before = bm.snapshot()
    with pytest.raises(ValueError, match="seq_id 1 is already allocated"):
        bm.allocate(1, tokens(2))
    with pytest.raises(OutOfBlocks, match="needs 3 new blocks"):
        bm.allocate(2, tokens(9))
    with pytest.raises(ValueError, match="token ids must be >= 0"):
        bm.allocate(3, [1, -2])
    with pytest.raises(ValueError, match=r"\[0, 2\^31\)"):
        bm.allocate(3, -1)
    with pytest.raises(TypeError, match="token_ids"):
        bm.allocate(3, ["a"])
    with pytest.raises(TypeError, match="seq_id"):
        bm.allocate("x", [1])
    assert bm.snapshot() == before
    bm.allocate(2, tokens(8))  # exactly the 2 free blocks
    assert bm.num_free_blocks == 0
    bm.check()


def test_seq_ids_int64_range_and_numpy():
    bm = BlockManager(16, 4)
    for sid in (2**62, -5, 0, np.int64(9)):
        bm.allocate(sid, tokens(3))
    assert bm.seq_ids == sorted([2**62, -5, 0, 9])
    ids = np.array([2**62, -5], dtype=np.int64)
    assert bm.block_tables(ids).shape == (2, 1)
    assert bm.seq_lens(np.array([0, 9], dtype=np.int32)).tolist() == [3, 3]
    with pytest.raises(ValueError, match="seq_id.*does not fit in int64"):
        bm.allocate(2**64, [1])  # an int out of range is a ValueError (DESIGN.md's table)
    with pytest.raises(TypeError, match="seq_id"):
        bm.allocate("1", [1])
    with pytest.raises(TypeError, match="integers"):
        bm.block_tables(np.array([1.0]))
    with pytest.raises(ValueError, match="1-d"):
        bm.block_tables(np.zeros((1, 1), dtype=np.int64))


# --------------------------------------------------------------------------- admission


def test_can_allocate_watermark():
    bm = BlockManager(100, 10, watermark=0.1)  # keeps 10 blocks free
    assert bm.watermark_blocks == 10
    assert bm.can_allocate(900) == AllocStatus.OK  # 90 blocks, 10 left
    assert bm.can_allocate(901) == AllocStatus.NEVER  # 91 > 100 - 10
    assert bm.can_allocate(tokens(900)) == AllocStatus.OK
    assert bm.can_allocate(0) == AllocStatus.OK
    bm.allocate(1, 500)
    assert bm.can_allocate(400) == AllocStatus.OK
    assert bm.can_allocate(401) == AllocStatus.LATER
    bm.allocate(2, 401)  # the watermark is admission policy; allocate itself may dip into it
    assert bm.num_free_blocks == 9
    with pytest.raises(TypeError, match="AllocStatus.OK"):
        bool(bm.can_allocate(1))
    with pytest.raises(ValueError, match="num_tokens"):
        bm.can_allocate(-1)


def test_can_allocate_counts_prefix_hits():
    bm = BlockManager(10, 4, watermark=0.0, enable_prefix_caching=True)
    prompt = tokens(17)  # 5 blocks; up to 4 can hit
    bm.allocate(1, prompt)
    assert bm.num_free_blocks == 5
    other = tokens(17, start=3)
    assert bm.can_allocate(other) == AllocStatus.OK
    assert bm.can_allocate(tokens(21, start=3)) == AllocStatus.LATER  # 6 new blocks
    # the same prompt only needs its last block (4 hit, in use)
    assert bm.can_allocate(prompt + tokens(16, start=5)) == AllocStatus.OK  # 9 blocks, 4 hit -> 5 new
    assert bm.can_allocate(11 * 4) == AllocStatus.NEVER


# --------------------------------------------------------------------------- append


def test_append_slots_growth_and_slots():
    bs = 4
    bm = BlockManager(10, bs)
    bm.allocate(1, tokens(3))
    t0 = bm.block_table(1).tolist()
    assert bm.append_slots(1) == []  # fills block 0
    assert bm.block_table(1).tolist() == t0
    assert bm.append_slots(1, 1, [42]) == []  # needs a new block
    t1 = bm.block_table(1).tolist()
    assert len(t1) == 2 and t1[0] == t0[0]
    assert bm.slot_mapping(1, 1).tolist() == [t1[1] * bs]
    assert bm.append_slots(1, 6, list(range(6))) == []
    assert bm.seq_len(1) == 11 and len(bm.block_table(1)) == 3
    assert bm.token_ids(1)[:3] == tokens(3) and bm.token_ids(1)[3] == -1
    assert bm.token_ids(1)[4:] == [42] + list(range(6))
    assert bm.append_slots(1, 0) == []
    assert bm.seq_len(1) == 11
    bm.check()


def test_append_slots_errors_leave_state():
    bm = BlockManager(3, 4, num_cpu_blocks=4)
    bm.allocate(1, tokens(8))
    bm.allocate(2, tokens(1))
    before = bm.snapshot()
    with pytest.raises(ValueError, match="unknown seq_id 77"):
        bm.append_slots(77)
    with pytest.raises(ValueError, match="num_new_tokens = 2 token ids, got 1"):
        bm.append_slots(1, 2, [5])
    with pytest.raises(ValueError, match="num_new_tokens"):
        bm.append_slots(1, -1)
    with pytest.raises(ValueError, match="token ids must be >= 0"):
        bm.append_slots(1, 1, [-3])
    with pytest.raises(OutOfBlocks, match="need 2 new blocks, only 0 free"):
        bm.append_slots(1, 5)
    assert bm.snapshot() == before
    bm.swap_out(2)
    before = bm.snapshot()
    with pytest.raises(ValueError, match="seq_id 2 is swapped out"):
        bm.append_slots(2)
    assert bm.snapshot() == before


def test_prefix_caching_requires_tokens():
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    with pytest.raises(ValueError, match="token_ids are required"):
        bm.allocate(1, 5)
    bm.allocate(1, tokens(5))
    before = bm.snapshot()
    with pytest.raises(ValueError, match="token_ids are required"):
        bm.append_slots(1)
    with pytest.raises(ValueError, match="token_ids are required"):
        bm.append_slots_batch([1])
    assert bm.snapshot() == before
    bm.append_slots(1, 1, [3])


# --------------------------------------------------------------------------- fork / copy-on-write


def test_fork_copy_on_write():
    bs = 4
    bm = BlockManager(10, bs)
    bm.allocate(1, tokens(6))  # blocks: full, partial (2 tokens)
    t = bm.block_table(1).tolist()
    bm.fork(1, 2)
    assert bm.block_table(2).tolist() == t
    refs = bm.block_states()[0]
    assert refs[t[0]] == 2 and refs[t[1]] == 2
    assert bm.num_used_blocks == 2
    cow = bm.append_slots(1, 1, [100])
    assert len(cow) == 1 and cow[0][0] == t[1]
    dst = cow[0][1]
    assert bm.block_table(1).tolist() == [t[0], dst]
    assert bm.block_table(2).tolist() == t  # the child keeps the original
    assert bm.token_ids(1) == tokens(6) + [100]
    assert bm.token_ids(2) == tokens(6)
    assert bm.slot_mapping(1, 1).tolist() == [dst * bs + 2]
    refs = bm.block_states()[0]
    assert refs[t[0]] == 2 and refs[t[1]] == 1 and refs[dst] == 1
    assert bm.append_slots(2, 1, [200]) == []  # now the child is the only owner
    assert bm.block_table(2).tolist() == t
    assert bm.token_ids(2) == tokens(6) + [200]
    assert refs_from_tables(bm) == bm.block_states()[0].tolist()
    bm.check()


def test_fork_full_last_block_needs_no_copy():
    bm = BlockManager(10, 4)
    bm.allocate(1, tokens(8))
    bm.fork(1, 2)
    assert bm.append_slots(1) == [] and bm.append_slots(2) == []
    assert bm.block_table(1)[:2].tolist() == bm.block_table(2)[:2].tolist()
    assert bm.block_table(1)[2] != bm.block_table(2)[2]
    bm.check()


def test_fork_errors():
    bm = BlockManager(10, 4, num_cpu_blocks=4)
    bm.allocate(1, tokens(5))
    bm.allocate(3, tokens(2))
    before = bm.snapshot()
    with pytest.raises(ValueError, match="unknown parent seq_id 9"):
        bm.fork(9, 10)
    with pytest.raises(ValueError, match="child seq_id 3 is already allocated"):
        bm.fork(1, 3)
    with pytest.raises(ValueError, match="child seq_id 1 is already allocated"):
        bm.fork(1, 1)
    assert bm.snapshot() == before
    bm.swap_out(3)
    with pytest.raises(ValueError, match="parent seq_id 3 is swapped out"):
        bm.fork(3, 4)


def test_batch_append_exact_copy_on_write_count():
    # parent and two children share a partly filled block; appending all three in one
    # batch copies it twice (the last one to append owns the original): 2 blocks needed
    bs = 4
    bm = BlockManager(4, bs)
    bm.allocate(1, tokens(6))
    bm.fork(1, 2)
    bm.fork(1, 3)
    assert bm.num_free_blocks == 2
    shared = bm.block_table(1)[1]
    cow = bm.append_slots_batch([1, 2, 3], 1, [7, 8, 9])
    assert cow.dtype == np.int64 and cow.shape == (2, 2)
    assert cow[:, 0].tolist() == [shared, shared]
    assert bm.block_table(3)[1] == shared
    assert {bm.block_table(1)[1], bm.block_table(2)[1]} == set(cow[:, 1].tolist())
    assert [bm.token_ids(s)[-1] for s in (1, 2, 3)] == [7, 8, 9]
    assert bm.num_free_blocks == 0
    bm.check()


def test_batch_append_atomic_errors():
    bs = 4
    bm = BlockManager(5, bs, num_cpu_blocks=2)
    bm.allocate(1, tokens(6))
    bm.fork(1, 2)  # shares a partial block: a batch append simulates a refcount drop
    bm.allocate(3, tokens(4))
    bm.allocate(4, tokens(1))
    bm.swap_out(4)
    before = bm.snapshot()
    for ids, k, toks, exc, msg in [
        ([1, 2, 99], 1, None, ValueError, "unknown seq_id 99"),
        ([1, 2, 1], 1, None, ValueError, "seq_id 1 appears twice"),
        ([1, 2, 4], 1, None, ValueError, "seq_id 4 is swapped out"),
        ([1, 2, 3], [1, 1], None, ValueError, "one count per sequence"),
        ([1, 2, 3], [1, -1, 1], None, ValueError, "num_new_tokens"),
        ([1, 2, 3], 1, [1, 2], ValueError, "expected 3 token ids"),
        ([1, 2, 3], 4, None, OutOfBlocks, "need 4 new blocks, only 2 free"),
    ]:
        with pytest.raises(exc, match=msg):
            bm.append_slots_batch(ids, k, toks)
        assert bm.snapshot() == before, (ids, k)
    cow = bm.append_slots_batch(np.array([1, 2, 3]), np.array([1, 0, 2], dtype=np.int32), [5, 6, 7])
    assert cow.shape == (1, 2)
    assert bm.token_ids(1)[-1] == 5 and bm.token_ids(3)[-2:] == [6, 7]
    assert bm.seq_lens([1, 2, 3]).tolist() == [7, 6, 6]
    slots = bm.slot_mapping([1, 2, 3], [1, 0, 2])
    assert len(slots) == 3
    bm.check()


# --------------------------------------------------------------------------- free


def test_free_and_double_free():
    bm = BlockManager(6, 4)
    bm.allocate(1, tokens(9))
    bm.fork(1, 2)
    bm.free(1)
    assert bm.num_free_blocks == 3  # the child still holds them
    bm.free(2)
    assert bm.num_free_blocks == 6 and bm.num_seqs == 0
    before = bm.snapshot()
    with pytest.raises(ValueError, match="unknown seq_id 2"):
        bm.free(2)
    with pytest.raises(ValueError, match="unknown seq_id 12345"):
        bm.free(12345)
    assert bm.snapshot() == before
    bm.allocate(1, tokens(4))  # ids can be reused after free
    bm.check()


def test_unknown_ids_everywhere():
    bm = BlockManager(6, 4, num_cpu_blocks=2)
    bm.allocate(1, tokens(3))
    before = bm.snapshot()
    calls = [
        lambda: bm.seq_len(8),
        lambda: bm.block_table(8),
        lambda: bm.block_tables([1, 8]),
        lambda: bm.slot_mapping([8]),
        lambda: bm.seq_lens([8]),
        lambda: bm.is_swapped(8),
        lambda: bm.token_ids(8),
        lambda: bm.swap_out([8]),
        lambda: bm.swap_in([8]),
        lambda: bm.can_swap_out([8]),
        lambda: bm.can_swap_in([8]),
        lambda: bm.append_slots_batch([8]),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="seq_id 8"):
            call()
    assert bm.snapshot() == before


# --------------------------------------------------------------------------- tables


def test_block_tables_padding_and_out():
    bs = 4
    bm = BlockManager(20, bs)
    lens = {1: 9, 2: 1, 3: 16}
    for s, n in lens.items():
        bm.allocate(s, tokens(n))
    ids = [3, 1, 2]
    bt = bm.block_tables(ids)
    assert bt.dtype == np.int32 and bt.shape == (3, 4) and bt.flags.c_contiguous
    for row, s in zip(bt, ids):
        nb = len(bm.block_table(s))
        assert row[:nb].tolist() == bm.block_table(s).tolist()
        assert (row[nb:] == 0).all()
    bt = bm.block_tables(ids, max_blocks=6, pad=-1)
    assert bt.shape == (3, 6) and bt[1, 3:].tolist() == [-1, -1, -1]
    out = np.full((3, 5), 77, dtype=np.int32)
    res = bm.block_tables(ids, out=out)
    assert res is out and out[2, 1:].tolist() == [0, 0, 0, 0]
    assert bm.block_tables([]).shape == (0, 0)
    with pytest.raises(ValueError, match="max_blocks 3 is less than the 4 blocks of seq_id 3"):
        bm.block_tables(ids, max_blocks=3)
    with pytest.raises(TypeError, match="int32"):
        bm.block_tables(ids, out=np.zeros((3, 5), dtype=np.int64))
    with pytest.raises(ValueError, match="out"):
        bm.block_tables(ids, out=np.zeros((2, 5), dtype=np.int32))
    with pytest.raises(ValueError, match="5 columns"):
        bm.block_tables(ids, max_blocks=5, out=np.zeros((3, 4), dtype=np.int32))
    # out untouched on error
    out = np.full((3, 5), 77, dtype=np.int32)
    with pytest.raises(ValueError):
        bm.block_tables([3, 1, 99], out=out)
    assert (out == 77).all()


def test_slot_mapping_errors_and_out():
    bm = BlockManager(10, 4, num_cpu_blocks=3)
    bm.allocate(1, tokens(5))
    bm.allocate(2, tokens(3))
    with pytest.raises(ValueError, match=r"seq_id 2 must be in \[0, 3\], got 4"):
        bm.slot_mapping([1, 2], 4)
    with pytest.raises(ValueError, match="num_new_tokens"):
        bm.slot_mapping([1, 2], -1)
    out = np.full(10, -9, dtype=np.int64)
    res = bm.slot_mapping([1, 2], [2, 3], out=out)
    assert res is out and (out[5:] == -9).all()
    assert out[:5].tolist() == bm.slot_mapping([1, 2], [2, 3]).tolist()
    with pytest.raises(ValueError, match="out holds 2 slots, 5 needed"):
        bm.slot_mapping([1, 2], [2, 3], out=np.zeros(2, dtype=np.int64))
    bm.swap_out(2)
    with pytest.raises(ValueError, match="seq_id 2 is swapped out"):
        bm.slot_mapping([2])
    with pytest.raises(ValueError, match="seq_id 2 is swapped out"):
        bm.block_table(2)
    with pytest.raises(ValueError, match="seq_id 2 is swapped out"):
        bm.seq_lens([2])


# --------------------------------------------------------------------------- swapping


def test_swap_without_cpu_blocks():
    bm = BlockManager(6, 4)  # num_cpu_blocks = 0
    bm.allocate(1, tokens(5))
    before = bm.snapshot()
    assert bm.can_swap_out(1) is False
    with pytest.raises(OutOfBlocks, match="need 2 CPU blocks, only 0 free"):
        bm.swap_out([1])
    assert bm.snapshot() == before
    assert bm.can_swap_out([]) is True
    assert bm.swap_out([]).shape == (0, 2)


def test_swap_round_trip_keeps_sharing_and_tokens():
    bs = 4
    bm = BlockManager(8, bs, num_cpu_blocks=6)
    bm.allocate(1, tokens(10))  # 3 blocks
    bm.fork(1, 2)
    bm.append_slots(2, 1, [55])  # child copies the partial block
    bm.allocate(3, tokens(3))
    t1, t2 = bm.block_table(1).tolist(), bm.block_table(2).tolist()
    assert bm.can_swap_out([1, 2])
    m = bm.swap_out([1, 2])
    assert m.dtype == np.int64 and m.shape == (4, 2)  # 4 distinct blocks
    assert m[:, 0].tolist() == [t1[0], t1[1], t1[2], t2[2]]
    assert bm.is_swapped(1) and bm.is_swapped(2) and not bm.is_swapped(3)
    assert bm.num_free_cpu_blocks == 2 and bm.num_free_blocks == 7
    host_refs = bm.block_states(cpu=True)[0]
    assert host_refs[m[0, 1]] == 2 and host_refs[m[3, 1]] == 1
    assert refs_from_tables(bm, cpu=True) == host_refs.tolist()
    assert bm.token_ids(2) == tokens(10) + [55]
    before = bm.snapshot()
    with pytest.raises(ValueError, match="seq_id 1 is already swapped out"):
        bm.swap_out([1])
    with pytest.raises(ValueError, match="seq_id 3 is not swapped out"):
        bm.swap_in([3])
    with pytest.raises(ValueError, match="seq_id 1 appears twice"):
        bm.swap_in([1, 1])
    assert bm.snapshot() == before
    assert bm.can_swap_in([1, 2]) == AllocStatus.OK
    back = bm.swap_in([2, 1])
    assert back.shape == (4, 2)
    assert set(back[:, 0].tolist()) == set(m[:, 1].tolist())
    assert bm.num_free_cpu_blocks == 6
    assert bm.token_ids(1) == tokens(10) and bm.token_ids(2) == tokens(10) + [55]
    b1, b2 = bm.block_table(1).tolist(), bm.block_table(2).tolist()
    assert b1[:2] == b2[:2] and b1[2] != b2[2]
    assert refs_from_tables(bm) == bm.block_states()[0].tolist()
    bm.check()


def test_swap_out_of_a_block_shared_with_a_running_sequence():
    bm = BlockManager(8, 4, num_cpu_blocks=4)
    bm.allocate(1, tokens(8))
    bm.fork(1, 2)
    m = bm.swap_out(2)
    assert m.shape == (2, 2)
    assert bm.block_states()[0][bm.block_table(1)].tolist() == [1, 1]
    bm.free(2)  # freeing a swapped sequence returns host blocks
    assert bm.num_free_cpu_blocks == 4 and bm.num_free_blocks == 6
    bm.check()


def test_swap_in_statuses_and_out_of_blocks():
    bm = BlockManager(10, 4, num_cpu_blocks=10, watermark=0.2)  # watermark 2 blocks
    bm.allocate(1, tokens(32))  # 8 blocks
    bm.swap_out(1)
    bm.allocate(2, tokens(8))  # 2 blocks used, 8 free
    assert bm.can_swap_in(1) == AllocStatus.LATER  # 8 - 8 < 2
    bm.free(2)
    assert bm.can_swap_in(1) == AllocStatus.OK
    bm.allocate(3, tokens(12))
    before = bm.snapshot()
    with pytest.raises(OutOfBlocks, match="need 8 device blocks, only 7 free"):
        bm.swap_in(1)
    assert bm.snapshot() == before
    bm2 = BlockManager(10, 4, num_cpu_blocks=10, watermark=0.2)
    bm2.allocate(1, tokens(40))
    bm2.swap_out(1)
    assert bm2.can_swap_in(1) == AllocStatus.NEVER  # 10 > 10 - 2
    with pytest.raises(TypeError):
        bool(bm2.can_swap_in(1))


# --------------------------------------------------------------------------- prefix caching


def test_prefix_cache_hits_share_blocks():
    bs = 4
    bm = BlockManager(20, bs, enable_prefix_caching=True)
    p1 = tokens(14)  # 3 full blocks + 2 tokens
    assert bm.allocate(1, p1) == 0
    assert bm.prefix_cache_queries == 3 and bm.prefix_cache_hits == 0
    p2 = p1[:8] + [999] * 5  # shares 2 full blocks
    assert bm.allocate(2, p2) == 8
    assert bm.block_table(2)[:2].tolist() == bm.block_table(1)[:2].tolist()
    assert bm.block_table(2)[2] != bm.block_table(1)[2]
    assert bm.prefix_cache_queries == 6 and bm.prefix_cache_hits == 2
    assert bm.prefix_cache_hit_rate == pytest.approx(2 / 6)
    assert bm.slot_mapping(2, 13 - 8).tolist()[0] == bm.block_table(2)[2] * bs
    refs = bm.block_states()[0]
    assert refs[bm.block_table(1)[0]] == 2
    # a prompt exactly covering cached blocks still computes its last block
    assert bm.allocate(3, p1[:12]) == 8
    # chained: the same block content after a different prefix is not a hit
    assert bm.allocate(4, [999] * 4 + p1[4:8] + [1]) == 0
    # an append that fills a block registers it
    bm.append_slots(1, 2, [3, 4])
    p5 = bm.token_ids(1) + [8]
    assert bm.allocate(5, p5) == 16
    assert bm.num_cached_blocks >= 4
    bm.check()


def test_prefix_cache_eviction_is_lru_deepest_first():
    bs = 2
    bm = BlockManager(6, bs, enable_prefix_caching=True)
    a = [1, 2, 3, 4, 5, 6, 7]  # 3 full blocks (all eligible) + 1
    bm.allocate(1, a)
    ta = bm.block_table(1).tolist()
    bm.free(1)
    # released last block first: evictable order = deepest full block first
    assert list(bm.snapshot()["evictable"]) == [ta[2], ta[1], ta[0]]
    assert bm.num_evictable_blocks == 3 and bm.num_free_blocks == 6 and bm.num_used_blocks == 0
    assert bm.num_cached_blocks == 3
    states = bm.block_states()[1]
    assert [states[b] for b in ta[:3]] == [2, 2, 2]
    # needing 4 blocks: the 3 free ones (incl. a's partial block), then evict ta[2]
    bm.allocate(2, [9] * 8)
    t2 = bm.block_table(2).tolist()
    assert ta[2] in t2
    assert list(bm.snapshot()["evictable"]) == [ta[1], ta[0]]
    bm.free(2)
    assert list(bm.snapshot()["evictable"]) == [ta[1], ta[0]] + t2[::-1]
    assert bm.allocate(3, a) == 4  # blocks 0 and 1 still cached
    assert bm.block_table(3)[:2].tolist() == ta[:2]
    # its 2 new blocks evicted the least recently released: seq 2's deepest
    assert bm.block_table(3)[2:].tolist() == [t2[3], t2[2]]
    assert list(bm.snapshot()["evictable"]) == [t2[1], t2[0]]
    bm.free(3)
    # recency: a hit block goes to the back when released again
    assert bm.allocate(4, [9, 9, 0]) == 2
    bm.free(4)
    order = list(bm.snapshot()["evictable"])
    assert order[0] == t2[1] and order[-1] == t2[0]
    assert bm.reset_prefix_cache() == len(order)
    assert bm.num_evictable_blocks == 0 and bm.num_cached_blocks == 0 and bm.num_free_blocks == 6
    assert bm.allocate(5, a) == 0
    bm.check()


def test_stats_named_fields_match_properties():
    bm = BlockManager(12, 4, num_cpu_blocks=5, enable_prefix_caching=True)
    bm.allocate(1, tokens(9))
    bm.allocate(2, tokens(9))  # 2 blocks hit
    bm.allocate(3, tokens(4, start=1))
    bm.swap_out(3)
    bm.free(1)
    s = bm.stats()
    assert isinstance(s, pagedflash.BlockStats)
    assert (s.num_blocks, s.block_size, s.num_cpu_blocks) == (12, 4, 5)
    assert s.num_free_blocks == bm.num_free_blocks and s.num_evictable_blocks == bm.num_evictable_blocks
    assert s.num_used_blocks == bm.num_used_blocks and s.num_cached_blocks == bm.num_cached_blocks
    assert s.num_free_cpu_blocks == bm.num_free_cpu_blocks and s.num_used_cpu_blocks == 1
    assert s.num_seqs == 2 and s.prefix_cache_queries == bm.prefix_cache_queries
    assert s.prefix_cache_hits == bm.prefix_cache_hits
    assert s.num_free_blocks + s.num_used_blocks == 12
    # the fields, in order, are the struct's (one list in csrc/py/bind_block_pool.c)
    assert tuple(s) == tuple(
        getattr(s, f)
        for f in (
            "num_blocks",
            "block_size",
            "num_cpu_blocks",
            "num_free_blocks",
            "num_evictable_blocks",
            "num_used_blocks",
            "num_cached_blocks",
            "num_free_cpu_blocks",
            "num_used_cpu_blocks",
            "num_seqs",
            "prefix_cache_queries",
            "prefix_cache_hits",
        )
    )
    # used: seq 2's 2 hit blocks + its own last block; evictable: seq 3's full block, cached
    # on the device after its swap-out; seq 1's private partial block went to the free list
    assert (s.num_used_blocks, s.num_evictable_blocks, s.num_cached_blocks) == (3, 1, 3)
    assert (s.prefix_cache_queries, s.prefix_cache_hits) == (4, 2)
    assert bm.seq_ids == [2, 3] and len(bm) == 2 and bm.is_swapped(3)


def test_prefix_cache_disabled_never_hits():
    bm = BlockManager(20, 4)
    bm.allocate(1, tokens(13))
    assert bm.allocate(2, tokens(13)) == 0
    assert bm.prefix_cache_queries == 0 and bm.num_cached_blocks == 0
    bm.free(1)
    assert bm.num_evictable_blocks == 0


def test_swap_in_reregisters_cached_blocks():
    bm = BlockManager(8, 2, num_cpu_blocks=8, enable_prefix_caching=True)
    p = [1, 2, 3, 4, 5]
    bm.allocate(1, p)
    bm.swap_out(1)
    bm.reset_prefix_cache()  # the device copies are gone
    assert bm.num_cached_blocks == 0
    bm.swap_in(1)
    assert bm.num_cached_blocks == 2
    assert bm.allocate(2, p) == 4
    assert bm.block_table(2)[:2].tolist() == bm.block_table(1)[:2].tolist()
    bm.check()


# --------------------------------------------------------------------------- stateful


VOCAB = st.integers(0, 3)
PREFIXES = [[], [1, 2, 3, 0], [1, 2, 3, 0, 2, 2, 1, 1], [1, 2, 3, 0, 3, 3, 3, 3, 0], [2, 2, 2, 2, 2, 2, 2, 2, 2, 2]]


class BlockManagerMachine(RuleBasedStateMachine):
    """Random serving traffic; the KV cache is simulated with token ids."""

    CACHING = True
    WATERMARK = 0.0
    BS = 4
    NUM_BLOCKS = 24
    NUM_CPU = 12

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(
            self.NUM_BLOCKS,
            self.BS,
            num_cpu_blocks=self.NUM_CPU,
            watermark=self.WATERMARK,
            enable_prefix_caching=self.CACHING,
        )
        self.seqs = {}  # id -> (tokens list, swapped)
        self.dev = {}  # device block -> list of token ids (None = never written)
        self.host = {}
        self.next_id = 0

    # ---- the "serving loop" side: KV writes, copy_blocks, swap_blocks
    def _write(self, sid, new_tokens):
        if not new_tokens:
            return
        refs = self.bm.block_states()[0]
        slots = self.bm.slot_mapping(sid, len(new_tokens))
        for tok, slot in zip(new_tokens, slots.tolist()):
            b, off = divmod(slot, self.BS)
            assert refs[b] == 1, f"write into block {b} shared by {refs[b]} sequences"
            self.dev.setdefault(b, [None] * self.BS)[off] = tok

    def _copy(self, mapping, src, dst):
        for s, d in np.asarray(mapping).reshape(-1, 2).tolist():
            dst[d] = list(src.get(s, [None] * self.BS))

    def _running(self):
        return sorted(s for s, (_, sw) in self.seqs.items() if not sw)

    def _swapped(self):
        return sorted(s for s, (_, sw) in self.seqs.items() if sw)

    def _new_id(self):
        self.next_id += 1
        return self.next_id * 3 - 1000  # negative and positive ids

    # ---- rules
    @rule(prefix=st.sampled_from(PREFIXES), suffix=st.lists(VOCAB, max_size=9))
    def allocate(self, prefix, suffix):
        prompt = prefix + suffix
        sid = self._new_id()
        status = self.bm.can_allocate(prompt)
        before = self.bm.snapshot()
        try:
            cached = self.bm.allocate(sid, prompt)
        except OutOfBlocks:
            assert status != AllocStatus.OK
            assert self.bm.snapshot() == before
            return
        if self.WATERMARK == 0.0:
            assert status == AllocStatus.OK
        assert cached % self.BS == 0 and (cached < len(prompt) or cached == 0)
        if not self.CACHING:
            assert cached == 0
        self.seqs[sid] = (list(prompt), False)
        self._write(sid, prompt[cached:])

    @precondition(lambda self: self._running())
    @rule(data=st.data(), k=st.integers(0, 6))
    def append(self, data, k):
        sid = data.draw(st.sampled_from(self._running()))
        new = data.draw(st.lists(VOCAB, min_size=k, max_size=k))
        before = self.bm.snapshot()
        try:
            cow = self.bm.append_slots(sid, k, new)
        except OutOfBlocks:
            assert self.bm.snapshot() == before
            return
        assert len(cow) <= 1
        self._copy(cow, self.dev, self.dev)
        self.seqs[sid][0].extend(new)
        self._write(sid, new)

    @precondition(lambda self: self._running())
    @rule(data=st.data())
    def append_batch(self, data):
        running = self._running()
        ids = data.draw(st.lists(st.sampled_from(running), unique=True, min_size=1))
        ks = data.draw(st.lists(st.integers(0, 3), min_size=len(ids), max_size=len(ids)))
        news = [data.draw(st.lists(VOCAB, min_size=k, max_size=k)) for k in ks]
        flat = [t for n in news for t in n]
        before = self.bm.snapshot()
        try:
            cow = self.bm.append_slots_batch(np.array(ids, dtype=np.int64), ks, flat)
        except OutOfBlocks:
            assert self.bm.snapshot() == before
            return
        assert cow.shape[1] == 2 and cow.shape[0] <= len(ids)
        self._copy(cow, self.dev, self.dev)
        for sid, new in zip(ids, news):
            self.seqs[sid][0].extend(new)
        slots = self.bm.slot_mapping(ids, ks)
        assert len(slots) == len(flat)
        for sid, new in zip(ids, news):
            self._write(sid, new)

    @precondition(lambda self: self._running())
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self._running()))
        child = self._new_id()
        self.bm.fork(parent, child)
        self.seqs[child] = (list(self.seqs[parent][0]), False)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free(self, data):
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        self.bm.free(sid)
        del self.seqs[sid]
        before = self.bm.snapshot()
        with pytest.raises(ValueError, match=f"seq_id {sid}"):
            self.bm.free(sid)
        assert self.bm.snapshot() == before

    @precondition(lambda self: self._running())
    @rule(data=st.data())
    def swap_out(self, data):
        ids = data.draw(st.lists(st.sampled_from(self._running()), unique=True, min_size=1, max_size=3))
        ok = self.bm.can_swap_out(ids)
        before = self.bm.snapshot()
        try:
            m = self.bm.swap_out(ids)
        except OutOfBlocks:
            assert not ok
            assert self.bm.snapshot() == before
            return
        assert ok
        self._copy(m, self.dev, self.host)
        for sid in ids:
            self.seqs[sid] = (self.seqs[sid][0], True)

    @precondition(lambda self: self._swapped())
    @rule(data=st.data())
    def swap_in(self, data):
        ids = data.draw(st.lists(st.sampled_from(self._swapped()), unique=True, min_size=1, max_size=3))
        status = self.bm.can_swap_in(ids)
        before = self.bm.snapshot()
        try:
            m = self.bm.swap_in(ids)
        except OutOfBlocks:
            assert status != AllocStatus.OK
            assert self.bm.snapshot() == before
            return
        if self.WATERMARK == 0.0:
            assert status == AllocStatus.OK
        self._copy(m, self.host, self.dev)
        for sid in ids:
            self.seqs[sid] = (self.seqs[sid][0], False)

    @rule()
    def bad_ids_change_nothing(self):
        before = self.bm.snapshot()
        ghost = 10**9
        for call in (
            lambda: self.bm.append_slots(ghost, 1, [0]),
            lambda: self.bm.fork(ghost, ghost + 1),
            lambda: self.bm.free(ghost),
            lambda: self.bm.swap_out([ghost]),
        ):
            with pytest.raises(ValueError, match=str(ghost)):
                call()
        if self._swapped():
            with pytest.raises(ValueError, match="swapped out"):
                self.bm.append_slots(self._swapped()[0], 1, [0])
        assert self.bm.snapshot() == before

    @rule()
    def reset_prefix_cache(self):
        evictable = self.bm.num_evictable_blocks
        assert self.bm.reset_prefix_cache() == evictable
        assert self.bm.num_evictable_blocks == 0

    # ---- invariants
    @invariant()
    def consistent(self):
        bm = self.bm
        bm.check()
        snap = bm.snapshot()
        assert set(snap["seqs"]) == set(self.seqs)
        assert bm.num_seqs == len(self.seqs)
        dev_refs, dev_states, dev_hashes = (np.array(a) for a in snap["device"])
        host_refs, host_states, _ = (np.array(a) for a in snap["host"])
        # refcounts equal the references from sequence tables (the cache holds none)
        assert refs_from_tables(bm) == dev_refs.tolist()
        assert refs_from_tables(bm, cpu=True) == host_refs.tolist()
        # partition: free, evictable, used -- disjoint and complete
        free, evict = set(snap["free"]), set(snap["evictable"])
        used = set(np.flatnonzero(dev_refs > 0).tolist())
        assert len(free) == len(snap["free"]) and len(evict) == len(snap["evictable"])
        assert not (free & evict) and not (free & used) and not (evict & used)
        assert len(free) + len(evict) + len(used) == self.NUM_BLOCKS
        assert (dev_states[list(evict)] == 2).all() and (dev_hashes[list(evict)] != 0).all()
        assert (dev_states[list(free)] == 0).all()
        if not self.CACHING:
            assert not evict and bm.num_cached_blocks == 0
        hfree = set(snap["free_cpu"])
        assert hfree.isdisjoint(np.flatnonzero(host_refs > 0).tolist())
        assert len(hfree) + int((host_refs > 0).sum()) == self.NUM_CPU
        assert bm.num_free_blocks == len(free) + len(evict)
        assert bm.num_used_blocks == len(used) and bm.num_evictable_blocks == len(evict)
        assert bm.num_free_cpu_blocks == len(hfree)
        # every sequence reads back exactly its own tokens from the simulated caches
        for sid, (toks, swapped) in self.seqs.items():
            n, sw, table, recorded = snap["seqs"][sid]
            assert sw == swapped and n == len(toks) and list(recorded) == toks
            assert len(table) == -(-n // self.BS)
            cache = self.host if swapped else self.dev
            got = [cache[table[t // self.BS]][t % self.BS] for t in range(n)]
            assert got == toks, (sid, got, toks)
        running = self._running()
        if running:
            bt = bm.block_tables(running, pad=-1)
            lens = bm.seq_lens(running)
            for row, sid, n in zip(bt, running, lens):
                assert n == len(self.seqs[sid][0])
                nb = -(-int(n) // self.BS)
                assert row[:nb].tolist() == list(snap["seqs"][sid][2]) and (row[nb:] == -1).all()


STATEFUL = settings(
    max_examples=150,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


class MachineNoCaching(BlockManagerMachine):
    CACHING = False


class MachineWatermark(BlockManagerMachine):
    WATERMARK = 0.1
    NUM_BLOCKS = 20
    NUM_CPU = 6


def test_stateful_prefix_caching():
    run_state_machine_as_test(BlockManagerMachine, settings=STATEFUL)


def test_stateful_no_caching():
    run_state_machine_as_test(MachineNoCaching, settings=STATEFUL)


def test_stateful_watermark():
    run_state_machine_as_test(MachineWatermark, settings=STATEFUL)


def test_num_cached_tokens_predicts_allocate():
    bm = BlockManager(64, 4, enable_prefix_caching=True)
    system = list(range(100, 113))  # 13 tokens: 3 full blocks
    assert bm.num_cached_tokens(system + [1, 2]) == 0
    assert bm.allocate(0, system + [1, 2]) == 0
    queries = bm.prefix_cache_queries
    for prompt in (system + [7, 8, 9], system[:12], system[:8] + [5], [9] * 20):
        predicted = bm.num_cached_tokens(prompt)
        assert bm.prefix_cache_queries == queries, "num_cached_tokens must not count as a query"
        sid = len(bm) + 1
        assert bm.allocate(sid, prompt) == predicted
        assert predicted % 4 == 0 and predicted < len(prompt)
        bm.free(sid)
        queries = bm.prefix_cache_queries
    assert BlockManager(8, 4).num_cached_tokens([1, 2, 3, 4, 5]) == 0
