"""BlockManager: the KV-cache block allocator of a serving loop.

Policy lives here (admission with a watermark, AllocStatus, swap decisions, argument
handling); the mechanism -- free list, reference counts, copy-on-write, per-sequence
block tables kept as persistent int32 arrays, prefix-cache hashing and LRU eviction,
host swap pool -- is the C block pool (``csrc/core/block_pool.c``) behind
``pagedflash._C.BlockPool``. See docs/block_manager.md.

Terms
    block       ``block_size`` consecutive tokens of one sequence's KV cache.
    block table a sequence's list of block ids: entry i holds tokens
                ``[i * block_size, (i + 1) * block_size)``.
    slot        ``block * block_size + offset``: where one token's K/V is written
                (the ``slot_mapping`` of ``write_kv_cache``).

A serving step with this class::

    bm = BlockManager(num_blocks, block_size, num_cpu_blocks=..., enable_prefix_caching=True)
    if bm.can_allocate(prompt) == AllocStatus.OK:
        cached = bm.allocate(seq_id, prompt)          # tokens [cached:] still to compute
    cow = bm.append_slots_batch(running, 1, new_tokens)  # int64 [k, 2]: copy_blocks(...) first
    slots = bm.slot_mapping(running, 1)                # write_kv_cache(k, v, ..., slots)
    tables = bm.block_tables(running)                  # paged_attn(..., tables, bm.seq_lens(running))
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np

from . import _C
from ._C import BlockStats

__all__ = ["AllocStatus", "BlockManager"]

IntSeq = Union[Sequence[int], np.ndarray]


class AllocStatus(enum.Enum):
    """Answer of :meth:`BlockManager.can_allocate` and :meth:`BlockManager.can_swap_in`.

    OK: fits now, with the watermark kept free. LATER: fits once blocks are freed.
    NEVER: larger than the pool minus the watermark; it will never fit.

    Compare with ``AllocStatus.OK``; using a status as a bool raises TypeError (every
    member would be truthy, which hides the bug ``if bm.can_allocate(n):``).
    """

    OK = "ok"
    LATER = "later"
    NEVER = "never"

    def __bool__(self) -> bool:
        raise TypeError("AllocStatus has no truth value; compare it with AllocStatus.OK")


def _ids(seq_ids: Union[int, IntSeq]) -> IntSeq:
    if isinstance(seq_ids, (int, np.integer)):
        return [int(seq_ids)]
    return seq_ids


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected >= {minimum}, got {value}")
    if value > 2**31 - 1:
        raise ValueError(f"{name}: expected < 2**31, got {value}")
    return int(value)


class BlockManager:
    """Allocates KV-cache blocks to sequences.

    Args:
        num_blocks: device blocks in the KV cache (``k_cache.shape[0]``), >= 1.
        block_size: tokens per block (``k_cache.shape[1]``), >= 1.
        num_cpu_blocks: host blocks for swapped-out sequences (0 = no swapping).
        watermark: fraction of ``num_blocks`` that :meth:`can_allocate` and
            :meth:`can_swap_in` keep free for running sequences to grow into;
            ``watermark_blocks = int(watermark * num_blocks)``. In [0, 1).
        enable_prefix_caching: share full prompt blocks between sequences with the
            same prefix; then token ids are required wherever tokens are added.
        bytes_per_block: bytes one block takes in the caches it indexes (every layer's K
            and V, per-(token, head) scales included: :func:`pagedflash.kv_cache_bytes`),
            for the memory counts in bytes (``used_bytes``, ...); 0 = not given.

    Sequence ids are Python ints in int64 range. Errors: unknown, repeated or
    wrongly placed ids and bad arguments raise ``ValueError`` (naming the id);
    running out of blocks raises :class:`pagedflash.OutOfBlocks` (a MemoryError).
    Every failed call leaves the manager exactly as it was. Not thread-safe.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        num_cpu_blocks: int = 0,
        watermark: float = 0.01,
        enable_prefix_caching: bool = False,
        bytes_per_block: int = 0,
    ) -> None:
        num_blocks = _check_int(num_blocks, "num_blocks", 1)
        if isinstance(bytes_per_block, bool) or not isinstance(bytes_per_block, (int, np.integer)):
            raise TypeError(f"bytes_per_block: expected an int, got {type(bytes_per_block).__name__}")
        if bytes_per_block < 0:
            raise ValueError(f"bytes_per_block: expected >= 0, got {bytes_per_block}")
        block_size = _check_int(block_size, "block_size", 1)
        num_cpu_blocks = _check_int(num_cpu_blocks, "num_cpu_blocks", 0)
        try:
            watermark = float(watermark)
        except OverflowError:  # an int beyond float's range
            raise ValueError(f"watermark: expected a fraction in [0, 1), got {watermark}") from None
        except (TypeError, ValueError) as e:
            raise type(e)(f"watermark: expected a fraction in [0, 1), got {watermark!r}") from None
        if not 0.0 <= watermark < 1.0:
            raise ValueError(f"watermark: expected a fraction in [0, 1), got {watermark}")
        self._num_blocks = num_blocks
        self._block_size = block_size
        self._num_cpu_blocks = num_cpu_blocks
        self._watermark = watermark
        self._watermark_blocks = int(watermark * num_blocks)
        self._prefix_caching = bool(enable_prefix_caching)
        self._bytes_per_block = int(bytes_per_block)
        self._pool = _C.BlockPool(num_blocks, block_size, num_cpu_blocks, self._prefix_caching)

    # ------------------------------------------------------------------ config
    @property
    def num_blocks(self) -> int:
        """Device blocks in the pool."""
        return self._num_blocks

    @property
    def block_size(self) -> int:
        """Tokens per block."""
        return self._block_size

    @property
    def num_cpu_blocks(self) -> int:
        """Host (swap) blocks in the pool."""
        return self._num_cpu_blocks

    @property
    def watermark(self) -> float:
        return self._watermark

    @property
    def watermark_blocks(self) -> int:
        """Blocks that admission keeps free: ``int(watermark * num_blocks)``."""
        return self._watermark_blocks

    @property
    def enable_prefix_caching(self) -> bool:
        return self._prefix_caching

    @property
    def bytes_per_block(self) -> int:
        """Bytes of cache per block, as given (0 = not given: the byte counts are then 0)."""
        return self._bytes_per_block

    # ------------------------------------------------------------------ counts
    @property
    def used_bytes(self) -> int:
        """Cache bytes of the device blocks in use: ``num_used_blocks * bytes_per_block``."""
        return self.num_used_blocks * self._bytes_per_block

    @property
    def free_bytes(self) -> int:
        """Cache bytes of the allocatable device blocks (evictable ones included)."""
        return self.num_free_blocks * self._bytes_per_block

    @property
    def total_bytes(self) -> int:
        """Cache bytes of the whole device pool: ``num_blocks * bytes_per_block``."""
        return self._num_blocks * self._bytes_per_block

    @property
    def num_free_blocks(self) -> int:
        """Device blocks allocatable now: free ones plus evictable cached ones."""
        return self._pool.num_free_blocks()

    @property
    def num_evictable_blocks(self) -> int:
        """Cached blocks no sequence references (kept for prefix hits, reusable;
        included in :attr:`num_free_blocks`)."""
        return self._pool.stats().num_evictable_blocks

    @property
    def num_used_blocks(self) -> int:
        """Device blocks referenced by at least one sequence."""
        return self._pool.stats().num_used_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Device blocks registered in the prefix cache (in use or evictable)."""
        return self._pool.stats().num_cached_blocks

    @property
    def num_free_cpu_blocks(self) -> int:
        """Host blocks free for swapping out."""
        return self._pool.stats().num_free_cpu_blocks

    @property
    def usage(self) -> float:
        """Fraction of device blocks referenced by sequences (evictable cached
        blocks count as free), in [0, 1]."""
        return self._pool.stats().num_used_blocks / self._num_blocks

    @property
    def num_seqs(self) -> int:
        """Live sequences, swapped-out ones included."""
        return self._pool.stats().num_seqs

    @property
    def prefix_cache_queries(self) -> int:
        """Full prompt blocks eligible for a prefix hit, summed over allocations."""
        return self._pool.stats().prefix_cache_queries

    @property
    def prefix_cache_hits(self) -> int:
        """Of :attr:`prefix_cache_queries`, the blocks found in the cache."""
        return self._pool.stats().prefix_cache_hits

    @property
    def prefix_cache_hit_rate(self) -> float:
        """``prefix_cache_hits / prefix_cache_queries`` (0.0 before any query)."""
        s = self._pool.stats()
        return s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0

    def stats(self) -> BlockStats:
        """All counters at once, as a :class:`pagedflash.BlockStats` (a named tuple: fields
        num_blocks, block_size, num_cpu_blocks, num_free_blocks, num_evictable_blocks,
        num_used_blocks, num_cached_blocks, num_free_cpu_blocks, num_used_cpu_blocks,
        num_seqs, prefix_cache_queries, prefix_cache_hits; the field list lives in one
        place, csrc/py/bind_block_pool.c), read by name: ``bm.stats().num_free_blocks``.
        ``num_free_blocks + num_used_blocks == num_blocks``."""
        return self._pool.stats()

    # -------------------------------------------------------------- admission
    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self._block_size)

    def can_allocate(self, prompt: Union[int, IntSeq]) -> AllocStatus:
        """Whether :meth:`allocate` of a prompt fits while keeping the watermark free.

        Args:
            prompt: the prompt's token ids, or just its length (then prefix hits
                are not counted).
        Returns:
            NEVER if its blocks exceed ``num_blocks - watermark_blocks``; OK if after
            allocating (prefix hits reuse blocks) at least ``watermark_blocks`` stay
            free; LATER otherwise.
        """
        if isinstance(prompt, (int, np.integer)):
            n, hits, hits_evictable = _check_int(prompt, "num_tokens", 0), 0, 0
        else:
            n = len(prompt)
            hits, hits_evictable = self._pool.prefix_lookup(prompt) if self._prefix_caching else (0, 0)
        need = self._blocks_for(n)
        if need > self._num_blocks - self._watermark_blocks:
            return AllocStatus.NEVER
        takes = need - hits + hits_evictable
        if self._pool.num_free_blocks() - takes >= self._watermark_blocks:
            return AllocStatus.OK
        return AllocStatus.LATER

    def num_cached_tokens(self, token_ids: IntSeq) -> int:
        """How many leading tokens of a prompt :meth:`allocate` would find cached now.

        Lets a scheduler size the first prefill chunk before admitting the prompt.
        Returns a multiple of block_size, less than ``len(token_ids)`` (at least one
        prompt token is always computed); 0 without prefix caching. Changes nothing
        (hit counters included).
        """
        if not self._prefix_caching or isinstance(token_ids, (int, np.integer)):
            return 0
        n = len(token_ids)
        if n == 0:
            return 0
        hits, _ = self._pool.prefix_lookup(token_ids)
        return min(hits, (n - 1) // self._block_size) * self._block_size

    def allocate(self, seq_id: int, token_ids: Union[IntSeq, int]) -> int:
        """Create sequence ``seq_id`` holding a prompt.

        Args:
            seq_id: a new id.
            token_ids: the prompt's token ids (ints >= 0, list or integer array), or
                just a length when prefix caching is off.
        Returns:
            the number of leading prompt tokens whose KV is already cached (full
            blocks shared from the prefix cache; a multiple of block_size, always
            less than the prompt length); compute and write tokens from there on
            (``slot_mapping(seq_id, len(prompt) - cached)``).
        Raises:
            ValueError: seq_id already present, bad token ids.
            OutOfBlocks: not enough free blocks (the watermark is not applied here).
        """
        if isinstance(token_ids, np.integer):
            token_ids = int(token_ids)
        return self._pool.allocate(seq_id, token_ids)

    def append_slots(
        self, seq_id: int, num_new_tokens: int = 1, token_ids: Optional[IntSeq] = None
    ) -> list[tuple[int, int]]:
        """Make room for ``num_new_tokens`` more tokens of a running sequence.

        Args:
            token_ids: the new tokens (``num_new_tokens`` of them); required with
                prefix caching (full blocks are hashed from them), optional otherwise.
        Returns:
            copy-on-write pairs ``[(src, dst)]`` (at most one): the sequence's partly
            filled last block was shared (after :meth:`fork`), so it now owns a fresh
            block ``dst``; copy block ``src`` to ``dst`` in every layer
            (``copy_blocks``) before writing the new tokens.
        Raises:
            ValueError: unknown or swapped-out seq_id, bad arguments.
            OutOfBlocks: not enough free blocks (nothing changes).
        """
        return self._pool.append(seq_id, num_new_tokens, token_ids)

    def append_slots_batch(
        self, seq_ids: IntSeq, num_new_tokens: Union[int, IntSeq] = 1, token_ids: Optional[IntSeq] = None
    ) -> np.ndarray:
        """:meth:`append_slots` for many sequences at once, atomically (all or none).

        Args:
            seq_ids: distinct running sequence ids (list or int64 array: fastest).
            num_new_tokens: one count for all, or one per sequence.
            token_ids: every sequence's new tokens concatenated in order.
        Returns:
            int64 ``[k, 2]`` copy-on-write pairs for ``copy_blocks`` (usually k = 0).
        Raises:
            ValueError, OutOfBlocks: as :meth:`append_slots`; nothing changes.
        """
        return self._pool.append_batch(seq_ids, num_new_tokens, token_ids)

    def fork(self, parent_id: int, child_id: int) -> None:
        """Create ``child_id`` sharing every block of running ``parent_id``
        (reference counted; a shared, partly filled last block is copied on the
        next append of either). Raises ValueError for an unknown or swapped-out
        parent or an existing child."""
        self._pool.fork(parent_id, child_id)

    def free(self, seq_id: int) -> None:
        """Drop a sequence (running or swapped out) and its references to blocks.
        Cached blocks nobody references become evictable (kept for prefix hits);
        others become free. Raises ValueError for an unknown (or already freed) id."""
        self._pool.release(seq_id)

    # --------------------------------------------------------------- swapping
    def can_swap_out(self, seq_ids: Union[int, IntSeq]) -> bool:
        """Whether the host pool has a block for each distinct block of these
        running sequences. Raises ValueError for unknown/swapped/repeated ids."""
        return self._pool.swap_count(_ids(seq_ids), True) <= self.num_free_cpu_blocks

    def swap_out(self, seq_ids: Union[int, IntSeq]) -> np.ndarray:
        """Move running sequences to the host pool.

        Blocks shared among the given sequences stay shared on the host; blocks
        also held by other sequences stay on the device for them.
        Returns:
            int64 ``[n, 2]`` (device block, host block) pairs for
            ``swap_blocks(device_cache, host_cache, mapping)``, in every layer,
            before the device blocks are reused (i.e. before this step's writes).
        Raises:
            ValueError: unknown, repeated or already swapped-out ids.
            OutOfBlocks: not enough free host blocks (nothing changes).
        """
        return self._pool.swap(_ids(seq_ids), True)

    def can_swap_in(self, seq_ids: Union[int, IntSeq]) -> AllocStatus:
        """Whether swapped-out sequences fit back on the device with the watermark
        kept free (NEVER / LATER / OK as :meth:`can_allocate`)."""
        need = self._pool.swap_count(_ids(seq_ids), False)
        if need > self._num_blocks - self._watermark_blocks:
            return AllocStatus.NEVER
        if self._pool.num_free_blocks() - need >= self._watermark_blocks:
            return AllocStatus.OK
        return AllocStatus.LATER

    def swap_in(self, seq_ids: Union[int, IntSeq]) -> np.ndarray:
        """Move swapped-out sequences back to fresh device blocks.

        Returns:
            int64 ``[n, 2]`` (host block, device block) pairs for
            ``swap_blocks(host_cache, device_cache, mapping)``.
        Raises:
            ValueError: unknown, repeated or running ids.
            OutOfBlocks: not enough free device blocks (nothing changes).
        """
        return self._pool.swap(_ids(seq_ids), False)

    # ---------------------------------------------------------------- queries
    def __contains__(self, seq_id: int) -> bool:
        try:
            self._pool.seq_len(seq_id)
        except ValueError:
            return False
        return True

    def __len__(self) -> int:
        return self.num_seqs

    @property
    def seq_ids(self) -> list[int]:
        """Live sequence ids (running and swapped out), sorted."""
        return sorted(self._pool.seq_ids())

    def is_swapped(self, seq_id: int) -> bool:
        """Whether the sequence is swapped out. ValueError for an unknown id."""
        return self._pool.seq_info(seq_id)[2]

    def seq_len(self, seq_id: int) -> int:
        """Tokens the sequence holds. ValueError for an unknown id."""
        return self._pool.seq_len(seq_id)

    def seq_lens(self, seq_ids: IntSeq, *, out: Optional[np.ndarray] = None) -> np.ndarray:
        """int32 ``[n]`` token counts of running sequences (paged_attn's seq_lens)."""
        return self._pool.seq_lens(seq_ids, out)

    def block_table(self, seq_id: int) -> np.ndarray:
        """int32 ``[ceil(seq_len / block_size)]``: a copy of a running sequence's
        block table. ValueError for an unknown or swapped-out id."""
        if self._pool.seq_info(seq_id)[2]:
            raise ValueError(f"block_table: seq_id {seq_id} is swapped out")
        return self._pool.block_table(seq_id)

    def block_tables(
        self, seq_ids: IntSeq, *, max_blocks: Optional[int] = None, pad: int = 0, out: Optional[np.ndarray] = None
    ) -> np.ndarray:
        """Padded block tables of running sequences, for paged_attn.

        Args:
            seq_ids: running sequence ids (an int64 array avoids a conversion).
            max_blocks: columns; default the longest table (fixed sizes suit CUDA
                graphs). Must hold every table.
            pad: value after each table's end; 0 by default, a valid block id, so a
                consumer that reads past ``seq_lens`` still stays inside the cache
                (paged_attn reads only the entries covering seq_lens).
            out: int32 C-contiguous ``[len(seq_ids), max_blocks]`` array to fill
                instead of allocating.
        Returns:
            int32 ``[len(seq_ids), max_blocks]``; row i is sequence i's table.
        """
        width = -1 if max_blocks is None else _check_int(max_blocks, "max_blocks", 0)
        return self._pool.block_tables(seq_ids, width, pad, out)

    def slot_mapping(
        self, seq_ids: Union[int, IntSeq], num_new_tokens: Union[int, IntSeq] = 1, *, out: Optional[np.ndarray] = None
    ) -> np.ndarray:
        """Slots of the last ``num_new_tokens`` tokens of each running sequence, in
        order: where this step writes K/V (``write_kv_cache``).

        Args:
            num_new_tokens: one count for all, or one per sequence (0 <= k <= seq_len);
                after ``allocate`` use ``len(prompt) - cached``, after
                ``append_slots(n)`` use n.
            out: int64 array with at least sum(k) entries to fill (the rest untouched).
        Returns:
            int64 ``[sum(k)]`` (or ``out``), slot = block * block_size + offset.
        """
        return self._pool.slot_mapping(_ids(seq_ids), num_new_tokens, out)

    def token_ids(self, seq_id: int) -> list[int]:
        """The sequence's token ids as recorded (-1 where they were not given)."""
        return self._pool.seq_tokens(seq_id).tolist()

    def reset_prefix_cache(self) -> int:
        """Evict every unreferenced cached block; returns how many were evicted."""
        return self._pool.reset_prefix_cache()

    # ------------------------------------------------------------ inspection
    def check(self) -> None:
        """Verify the pool's internal invariants (refcounts equal table
        references, free/evictable/used partition, cache index); RuntimeError if
        one is broken. O(num_blocks): for tests and debugging."""
        self._pool.check()

    def block_states(self, *, cpu: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-block (refcounts int32, states int32, hashes uint64) of the device
        (or host) pool; states: 0 free, 1 used, 2 evictable; hash 0 = none."""
        return self._pool.block_states(cpu)

    def snapshot(self) -> dict:
        """Everything observable, as plain Python values, for comparisons:
        counters, each sequence's (length, swapped, table, tokens), per-block
        refcounts/states/hashes of both pools, free lists (next taken first)
        and the evictable order (next evicted first)."""
        seqs = {}
        for sid in self._pool.seq_ids():
            n, _, swapped = self._pool.seq_info(sid)
            seqs[sid] = (
                n,
                swapped,
                tuple(self._pool.block_table(sid).tolist()),
                tuple(self._pool.seq_tokens(sid).tolist()),
            )
        dev = self._pool.block_states(False)
        host = self._pool.block_states(True)
        return {
            "stats": self._pool.stats(),
            "seqs": seqs,
            "device": tuple(tuple(a.tolist()) for a in dev),
            "host": tuple(tuple(a.tolist()) for a in host),
            "free": tuple(self._pool.free_list(False).tolist()),
            "free_cpu": tuple(self._pool.free_list(True).tolist()),
            "evictable": tuple(self._pool.evictable().tolist()),
        }

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"BlockManager(num_blocks={self._num_blocks}, block_size={self._block_size}, "
            f"num_cpu_blocks={self._num_cpu_blocks}, watermark={self._watermark}, "
            f"enable_prefix_caching={self._prefix_caching}; seqs={s.num_seqs}, "
            f"free={s.num_free_blocks} (evictable {s.num_evictable_blocks}), "
            f"free_cpu={s.num_free_cpu_blocks}"
            + (
                f"; {s.num_used_blocks * self._bytes_per_block} of {self.total_bytes} bytes used"
                if self._bytes_per_block
                else ""
            )
            + ")"
        )
