/*
 * flash/bwd_tiles.h - the tiles of the flash backward kernels: their compile-time
 * geometry (BwdConfig for the sm_80 main kernel, Bwd90Config for the Hopper one;
 * the deterministic dQ kernel uses the forward's FwdConfig), which gradients a
 * pass computes (BwdGrads: head dims > 128 split the main kernel in two passes to
 * fit the registers), and the tile each head dim uses, with the measurements
 * behind each choice. The experiments (candidates, numbers, rejected variants) are
 * in benchmarks/lab/04-08; what is here is what won.
 */
#ifndef PF_FLASH_BWD_TILES_H
#define PF_FLASH_BWD_TILES_H

#include "flash/fwd_tiles.h"

namespace pf {
namespace cuda {

/* What one launch of the sm_80 main kernel computes. */
enum class BwdGrads {
    kAll = 0,    /* dK, dV and (unless deterministic) dQ */
    kDvOnly = 1, /* first pass of a split head dim */
    kDkDq = 2,   /* second pass: dK and (unless deterministic) dQ */
};

template <int kHeadDim_, int kBlockM_, int kNWarps_, int kStages_ = 2, int kMinBlocks_ = 1, int kDqRows_ = 16,
          bool kDeferDq_ = false, bool kLse2_ = false>
struct BwdConfig {
    static constexpr int kHeadDim = kHeadDim_;
    static constexpr int kBlockM = kBlockM_;    /* queries per step */
    static constexpr int kNWarps = kNWarps_;
    static constexpr int kNThreads = kNWarps * 32;
    static constexpr int kBlockN = 16 * kNWarps; /* keys per block: 16 per warp */
    static constexpr int kStages = kStages_;    /* Q/dO buffers */
    static constexpr int kMinBlocks = kMinBlocks_;
    static constexpr int kStride = kHeadDim + 8;
    static constexpr int kSStride = kBlockM + 8; /* dS^T rows */
    static constexpr int kNTm = kBlockM / 8;
    static constexpr int kDT = kHeadDim / 8;
    /* dQ += dS K: the kBlockM x kHeadDim tile is split into kDqRows x kDqCols warp
     * tiles (kDqRows 32 loads each K fragment once per two 16-row m-tiles). */
    static constexpr int kDqRows = kDqRows_;
    static constexpr int kDqMT = kDqRows / 16;
    static constexpr int kDqRowWarps = kBlockM / kDqRows;
    static constexpr int kDqColWarps = kNWarps / kDqRowWarps;
    static constexpr int kDqCols = kHeadDim / kDqColWarps;
    /* kDeferDq: step s's dQ product runs after step s + 1's first barrier, from a
     * second dS^T buffer, so a step has one block-wide barrier instead of two. */
    static constexpr bool kDeferDq = kDeferDq_;
    static constexpr int kSBufs = kDeferDq ? 2 : 1;
    /* kLse2: read lse2 (pass 1: lse log2 e, +inf on masked rows) instead of lse, so the
     * exp needs no per-element scale / -inf / row-bound select */
    static constexpr bool kLse2 = kLse2_;
    static_assert(kDqRows % 16 == 0 && kBlockM % kDqRows == 0 && kNWarps % kDqRowWarps == 0,
                  "dQ tile splits among warps");
    static_assert(kDqCols % 16 == 0 && kDqCols * kDqColWarps == kHeadDim, "dQ column groups of 16");
    /* shared memory, in elements of T then floats */
    static constexpr int kKVElems = kBlockN * kStride;
    static constexpr int kQElems = kBlockM * kStride;
    static constexpr int kSElems = kBlockN * kSStride;
    static constexpr int kSmemBytes =
        (2 * kKVElems + 2 * kStages * kQElems + kSBufs * kSElems) * 2 + 2 * kStages * kBlockM * 4;
};

/* Tiles per head dim: BwdConfig<d, queries per step, warps (16 keys each), stages,
 * min blocks, dQ rows per warp, deferred dQ, lse2>, and the deterministic dQ kernel's
 * FwdConfig<d, query rows, keys per tile, warps>.
 * d <= 128: 128 keys, 8 warps, 1 block/SM; d = 192: 64 x 128 split in two passes (dV,
 * then dK + dQ), 224 KB of shared memory; d = 256: 32 queries x 64 keys, 4 warps,
 * split. Not tuned beyond d=64/128.
 * First tuning run (benchmarks/results/tune_h200.md, s=8k non-causal, TFLOP/s):
 * d=128: 64x8 239, 32x8 225, 64x4 210, 32x4 214; d=64: 64x8 214, 32x8 187, 64x4 221,
 * 32x4 191, 128x8 235.
 * Backward tuning on H200 (bf16, 16k tokens, same-run A/B of tile candidates,
 * benchmarks/lab/05; TFLOP/s at s=16k non-causal; benchmarks/results/prefill_h200.md has
 * the full grid):
 *  - deferred dQ (kDeferDq: one barrier per step instead of two, 2 dS^T buffers):
 *    d=128 244.5 -> 257.4 (+5%); with 32-row dQ warp tiles (kDqRows=32: 32 instead
 *    of 40 LDSM.x4 per dQ product and warp) 263.1 (+7.6%); 32-row tiles alone +2.5%.
 *  - d=64: 128 queries per step 219.3 -> 239.6 (+9%), + deferred dQ 246-247 (+12%);
 *    16- and 32-row dQ tiles tie there (247.1 / 246.0).
 *  - lse2 (pass 1 writes lse log2 e with +inf on masked rows; kLse2): d=128 +2% at
 *    s >= 4k (263.2 -> 268.8), d=64 -2..3% at s=1k (192.2 -> 188.6), so d=64 keeps lse.
 * Rejected (benchmarks/lab/06): red.global.add.v4 for dQ, 3 Q/dO stages,
 * FlashAttention-2's warp layout; and what limits this kernel now (Nsight Compute). */
template <int kHeadDim>
struct BwdTile;
template <>
struct BwdTile<32> {
    using type = BwdConfig<32, 64, 8>;
    using extras = type;
    using dq = FwdConfig<32, 64, 64, 4>;
    static constexpr bool kSplit = false;
};
template <>
struct BwdTile<64> {
    using type = BwdConfig<64, 128, 8, 2, 1, 32, true>;
    using extras = BwdConfig<64, 64, 8, 2, 1, 32, true>; /* 128 rows spill 1.5 KB with extras */
    using dq = FwdConfig<64, 64, 64, 4>;
    static constexpr bool kSplit = false;
};
template <>
struct BwdTile<96> {
    using type = BwdConfig<96, 64, 8, 2, 1, 16, true>;
    using extras = type;
    using dq = FwdConfig<96, 64, 64, 4>;
    static constexpr bool kSplit = false;
};
template <>
struct BwdTile<128> {
    using type = BwdConfig<128, 64, 8, 2, 1, 32, true, true>;
    using extras = type;
    using dq = FwdConfig<128, 64, 64, 4>;
    static constexpr bool kSplit = false;
};
template <>
struct BwdTile<192> {
    using type = BwdConfig<192, 64, 8>;
    using extras = type;
    using dq = FwdConfig<192, 64, 32, 4>;
    static constexpr bool kSplit = true;
};
template <>
struct BwdTile<256> {
    using type = BwdConfig<256, 32, 4>;
    using extras = type;
    using dq = FwdConfig<256, 64, 32, 4>;
    static constexpr bool kSplit = true;
};

/* The head dims with a Hopper tile (a head dim padded to one of them runs there too). */
constexpr bool bwd_sm90_has_tile(int head_dim) { return head_dim == 64 || head_dim == 128; }

/*
 * Hopper main kernel (flash/bwd_sm90.cuh), a block of 2 warpgroups owning kBlockN = 128
 * keys. d = 128: 64 queries per step (S^T 32 + dP^T 32 + dK 64 + dV 64 accumulators per
 * thread); d = 64: 128 queries per step (S^T 64 + dP^T 64 + dK 32 + dV 32; the dQ
 * product then splits rows, each warpgroup N = 64). Both: 255 registers, 60-72 bytes of
 * spills (2-8 local loads per step), 162 KB of shared memory, 1 block per SM, no "wgmma
 * serialized" warnings, 40 HGMMA in the SASS.
 * Measured on H200 (benchmarks/results/bwd_sm90_h200.md, bf16, 16k tokens, s = 512..16k):
 * 1.01-1.26x FlashAttention-2 (SDPA FLASH_ATTENTION; thinnest at s = 512 causal),
 * 1.30-1.57x the sm_80 kernel, 0.6-0.8x cuDNN. Rejected variants: benchmarks/lab/08.
 */
template <int kHeadDim_, int kBlockM_>
struct Bwd90Config {
    static constexpr int kHeadDim = kHeadDim_;
    static constexpr int kBlockM = kBlockM_; /* queries per step */
    static constexpr int kBlockN = 128;      /* keys per block, 64 per warpgroup */
    static constexpr int kNThreads = 256;
    /* dQ = dS K (M = kBlockM queries, K = 128 keys): with 128 queries each warpgroup takes
     * 64 rows and the whole head dim; with 64 queries each takes half the head dim. */
    static constexpr bool kDqSplitRows = kBlockM == 128;
    static constexpr int kDqN = kDqSplitRows ? kHeadDim : kHeadDim / 2;
    static_assert(kBlockM == 64 || kBlockM == 128, "64 or 128 queries per step");
    static_assert(kDqN % 64 == 0, "dQ column split on 64-column panels");
    static constexpr int kKBytes = kBlockN * kHeadDim * 2;
    static constexpr int kQBytes = kBlockM * kHeadDim * 2;
    static constexpr int kSBytes = kBlockN * kBlockM * 2;
    static constexpr int kOffK = 0;
    static constexpr int kOffV = kKBytes;
    static constexpr int kOffQ = 2 * kKBytes;           /* [2 stages] */
    static constexpr int kOffdO = kOffQ + 2 * kQBytes;  /* [2 stages] */
    static constexpr int kOffS = kOffdO + 2 * kQBytes;  /* [2 buffers] dS^T, 128 keys x kBlockM */
    static constexpr int kOffLse = kOffS + 2 * kSBytes; /* f32 [2][kBlockM] */
    static constexpr int kOffD = kOffLse + 2 * kBlockM * 4;
    static constexpr int kSmemBytes = kOffD + 2 * kBlockM * 4 + 1024; /* + 1024: base alignment */
};

template <int kHeadDim>
struct Bwd90Tile;
template <>
struct Bwd90Tile<64> {
    using type = Bwd90Config<64, 128>;
};
template <>
struct Bwd90Tile<128> {
    using type = Bwd90Config<128, 64>;
};

}  // namespace cuda
}  // namespace pf

#endif /* PF_FLASH_BWD_TILES_H */
