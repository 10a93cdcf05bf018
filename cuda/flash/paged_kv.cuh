/*
 * flash/paged_kv.cuh - the forward's key / value tiles read through a block
 * table: paged_attn's prefill path (cuda/paged/launch.cu) runs the sm_90
 * forward kernel (flash/fwd_sm90.cuh, Is_paged) over the paged cache, and this
 * is all that differs from a dense call (FlashParams::block_table, flash/params.h).
 *
 * Addressing. Key j of sequence b is row j % block_size of block
 * block_table[b][j / block_size]; the division is a multiply-high
 * (FlashParams::bs_magic / bs_shift, exact for j < 2^31). A key tile of R rows is
 * copied by the same cp.async pattern as a dense tile (sm90::load_swizzled: C =
 * D / 8 threads per row, thread tid on rows tid / C + i * kRowStep), with one
 * block-table lookup per row instead of a stride. The lookups of the next tile
 * are fetched one tile ahead, spread over the lanes of each warp (a warp's
 * threads touch 32 / C rows per pass, kIts passes: lane l fetches the row of
 * pass l / (32 / C), offset l % (32 / C)), so a thread keeps one (block, row)
 * pair in registers and the copies of a tile never wait on a table load; each
 * thread takes its rows' pairs from the fetching lanes with shuffles.
 *
 * Bounds. A key past the sequence or in a block whose id lies outside
 * [0, num_blocks) is not read: its 16 bytes are zero-filled. Keys past the
 * sequence are masked by the ordinary length rule (attn/mask.cuh); keys of a bad
 * block are masked here (mask_bad_blocks), for sequences whose table holds a bad
 * id at all (paged_any_bad, once per sequence: the ids come from device memory
 * and are never trusted, the kernels agree with the split-KV kernel's rule in
 * cuda/paged/kernel.cuh: such keys contribute nothing).
 */
#ifndef PF_FLASH_PAGED_KV_CUH
#define PF_FLASH_PAGED_KV_CUH

#include "attn/math.cuh"
#include "attn/sm90.cuh"
#include "flash/params.h"

namespace pf {
namespace cuda {

/* Where a key lives: block id (-1: nothing to read) and row in the block. */
struct PagedSlot {
    int block, row;
};

/* Index into a table row of the block holding key j. */
PF_DEV int paged_block_index(const FlashParams &p, int j) {
    return (int)((__umulhi((unsigned)j, p.bs_magic) + (unsigned)j) >> p.bs_shift);
}

/* The slot of key j of a sequence of sk keys whose table row is `table`. */
PF_DEV PagedSlot paged_slot(const FlashParams &p, const int32_t *table, int j, int sk) {
    PagedSlot s = {-1, 0};
    if (j < sk) {
        const int i = paged_block_index(p, j);
        const int id = __ldg(table + i * p.bt_col_stride);
        s.block = (unsigned)id < (unsigned)p.num_blocks ? id : -1;
        s.row = j - i * p.block_size;
    }
    return s;
}

/* Does the table row hold a bad id among the blocks of keys [0, sk)? Block-wide (every
 * thread of the block calls it; the result is the same everywhere). */
template <int kThreads>
PF_DEV bool paged_any_bad(const FlashParams &p, const int32_t *table, int sk, int tid) {
    const int blocks = sk > 0 ? paged_block_index(p, sk - 1) + 1 : 0;
    bool bad = false;
    for (int i = tid; i < blocks; i += kThreads)
        bad |= (unsigned)__ldg(table + i * p.bt_col_stride) >= (unsigned)p.num_blocks;
    return __syncthreads_or(bad) != 0;
}

/* The copy pattern of an R x D tile by kThreads threads, and which row each lane fetches. */
template <int R, int D, int kThreads>
struct PagedTile {
    static constexpr int C = D / 8;                /* 16-byte chunks per row: threads per row */
    static constexpr int kRowStep = kThreads / C;  /* rows per pass of the block */
    static constexpr int kIts = R / kRowStep;      /* passes */
    static constexpr int kLaneRows = 32 / C;       /* rows a warp covers per pass */
    static_assert(kThreads % C == 0 && kRowStep % 8 == 0 && 32 % C == 0, "whole rows per warp and pass");
    static_assert(R % kRowStep == 0, "every thread makes every pass (the shuffles need the whole warp)");
    static_assert(kLaneRows * kIts <= 32, "one fetched row per lane");

    /* the tile row whose slot lane tid % 32 fetches, -1 when none */
    PF_DEV static int fetch_row(int tid) {
        const int lane = tid % 32, pass = lane / kLaneRows;
        return pass < kIts ? (tid / 32) * 32 / C + lane % kLaneRows + pass * kRowStep : -1;
    }
};

/* cp.async K and V of one key tile (rows of sequence-relative keys j0 ...) into the
 * swizzled tiles sK / sV; `mine` is the slot this lane fetched for the tile
 * (PagedTile::fetch_row). kb / vb: the caches at the KV head (block 0, row 0). */
template <int R, int D, int kThreads, typename T>
PF_DEV void load_paged_rows(uint32_t tile, const T *base, int64_t block_stride, int64_t row_stride, PagedSlot mine,
                            int d, int tid) {
    using Tile = PagedTile<R, D, kThreads>;
    const int r0 = tid / Tile::C, c = (tid % Tile::C) * 8, lane_row = (tid % 32) / Tile::C;
    const bool col_ok = c < d;
    uint32_t dst = tile + sm90::swz<R>(r0, c);
#pragma unroll
    for (int it = 0; it < Tile::kIts; ++it) {
        const int src = lane_row + it * Tile::kLaneRows;
        const int blk = __shfl_sync(0xffffffffu, mine.block, src);
        const int row = __shfl_sync(0xffffffffu, mine.row, src);
        const bool ok = col_ok && blk >= 0;
        cp_async_16(dst, ok ? base + blk * block_stride + row * row_stride + c : base, ok);
        dst += Tile::kRowStep * 128;
    }
}

template <int R, int D, int kThreads, typename T>
PF_DEV void load_paged_kv(uint32_t sK, uint32_t sV, const T *kb, const T *vb, const FlashParams &p, PagedSlot mine,
                          int d, int tid) {
    load_paged_rows<R, D, kThreads>(sK, kb, p.k_block_stride, p.k_row_stride, mine, d, tid);
    load_paged_rows<R, D, kThreads>(sV, vb, p.v_block_stride, p.v_row_stride, mine, d, tid);
}

/* Scores of keys in bad blocks -> -inf, on one m16 slice of S (the mma C-fragment layout of
 * attn/mask.cuh's mask_fragment: key j0 + 8 nt + 2 t + e). Only for sequences with a bad id. */
template <int kNT>
PF_DEV void mask_bad_blocks(float (&s)[kNT][4], const FlashParams &p, const int32_t *table, int j0, int t, int sk) {
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int j = j0 + nt * 8 + 2 * t + e;
            if (j < sk && paged_slot(p, table, j, sk).block < 0) s[nt][e] = s[nt][2 + e] = -INFINITY;
        }
}

}  // namespace cuda
}  // namespace pf

#endif /* PF_FLASH_PAGED_KV_CUH */
