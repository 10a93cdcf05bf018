/*
 * flash/fwd_tiles.h - the tiles of the flash forward kernels: their compile-time
 * geometry (FwdConfig for the sm_80 kernel, FwdSm90Config for the Hopper one) and
 * the tile each head dim uses, with the measurements behind each choice. The
 * experiments that chose them (tuning builds, candidates, numbers) are in
 * benchmarks/lab/01-03; what is here is what won.
 */
#ifndef PF_FLASH_FWD_TILES_H
#define PF_FLASH_FWD_TILES_H

namespace pf {
namespace cuda {

/* sm_80 forward (flash/fwd_sm80.cuh): kBlockM query rows x kBlockN keys per tile,
 * kNWarps warps splitting the rows (kMT m16 slices each); also the tile of the
 * backward's deterministic dQ kernel (flash/bwd_dq.cuh). */
template <int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, int kMinBlocks_ = 1, bool kLazyRescale_ = true>
struct FwdConfig {
    static constexpr int kMinBlocks = kMinBlocks_; /* __launch_bounds__ occupancy hint */
    static constexpr bool kLazyRescale = kLazyRescale_; /* skip O *= 1 when no row max moved */
    static constexpr int kHeadDim = kHeadDim_;
    static constexpr int kBlockM = kBlockM_;
    static constexpr int kBlockN = kBlockN_;
    static constexpr int kNWarps = kNWarps_;
    static constexpr int kNThreads = kNWarps * 32;
    static constexpr int kStride = kHeadDim + 8;  /* smem row, elements */
    static constexpr int kRowsPerWarp = kBlockM / kNWarps;
    static constexpr int kMT = kRowsPerWarp / 16; /* m16 slices per warp */
    static constexpr int kNT = kBlockN / 8;       /* n8 tiles of S */
    static constexpr int kDT = kHeadDim / 8;      /* n8 tiles of O */
    static constexpr int kSmemBytes = (kBlockM + 2 * kBlockN) * kStride * 2;
    static_assert(kRowsPerWarp % 16 == 0, "each warp owns whole m16 slices");
    static_assert(kHeadDim % 16 == 0 && kBlockN % 16 == 0, "tiles are multiples of 16");
};

/*
 * sm_80 tile per head dim (kBlockM x kBlockN, warps). Registers: O takes
 * kMT * kHeadDim / 2 floats and S kMT * kBlockN / 2 per thread; keep the sum
 * under ~200 so that the 255-register cap does not spill.
 * Measured (H200, bf16, 16k tokens, benchmarks/results/fwd_tiles_h200.md):
 *   d=64:  128x64x4 304 TFLOP/s at s=8k; 128x128x4 298 (-2%), 64x64x4 at 3
 *          blocks/SM 254 (-16%), 128x64x8 at 2 blocks/SM 274 (-10%).
 *   d=128: 128x64x4 326 at s=8k; 128x64x8 (2/SM, 128 regs, spills) 298 (-9%),
 *          64x64x4 (3/SM) 285 (-12%), 128x32x4 272 (-17%); the same order at s=1k
 *          and causal.
 *   Lazy rescale (skip O *= alpha when no row max of the warp moved): d=128
 *          +1..3.5% (337.7 vs 326.3 at s=8k), d=64 -1..5% (296.0 vs 298.4 at s=8k,
 *          247.6 vs 259.8 at s=2k causal): on for d >= 96, off for d <= 64
 *          (benchmarks/results/tune_h200.md).
 *   d=32/96: the d=64/128 shape (not measured separately).
 *   d=192: 8 warps of 16 rows (O = 96 regs) so that 128 rows fit; d=256: 64x64,
 *          4 warps (O = 128 regs), 96 KB of shared memory (not measured yet).
 */
template <int kHeadDim>
struct FwdTile;
template <>
struct FwdTile<32> {
    using type = FwdConfig<32, 128, 64, 4, 1, false>;
};
template <>
struct FwdTile<64> {
    using type = FwdConfig<64, 128, 64, 4, 1, false>;
};
template <>
struct FwdTile<96> {
    using type = FwdConfig<96, 128, 64, 4>;
};
template <>
struct FwdTile<128> {
    using type = FwdConfig<128, 128, 64, 4>;
};
template <>
struct FwdTile<192> {
    using type = FwdConfig<192, 128, 64, 8>;
};
template <>
struct FwdTile<256> {
    using type = FwdConfig<256, 64, 64, 4>;
};

/* Hopper forward (flash/fwd_sm90.cuh): kNWG warpgroups of 64 query rows, kBlockN keys
 * per tile, three K/V stages in 128-byte-swizzled shared memory. */
template <int kHeadDim_, int kBlockN_, int kNWG_ = 2, int kMinBlocks_ = 1>
struct FwdSm90Config {
    static constexpr int kHeadDim = kHeadDim_;
    static constexpr int kNWG = kNWG_; /* warpgroups, 64 query rows each */
    static constexpr int kMinBlocks = kMinBlocks_;
    static constexpr int kBlockM = 64 * kNWG;
    static constexpr int kBlockN = kBlockN_;
    static constexpr int kNThreads = 128 * kNWG;
    static constexpr int kNT = kBlockN / 8; /* n8 column tiles of S */
    static constexpr int kDT = kHeadDim / 8; /* of O */
    static constexpr int kQBytes = kBlockM * kHeadDim * 2;
    static constexpr int kKVBytes = kBlockN * kHeadDim * 2;
    static constexpr int kStages = 3;
    static constexpr int kSmemBytes = kQBytes + kStages * 2 * kKVBytes + 1024; /* + alignment slack */
    static_assert(kHeadDim % 64 == 0 && kBlockN % 16 == 0, "swizzled tiles are 64 columns wide");
};

/* Query rows per block of every Hopper forward tile (paged_attn's prefill path plans its
 * packed query tiles with it before the head dim's kernel is picked). */
constexpr int kFwdSm90BlockM = 128;

/* The head dims with a Hopper tile (a head dim padded to one of them runs there too). */
constexpr bool fwd_sm90_has_tile(int head_dim) { return head_dim == 64 || head_dim == 128; }

/*
 * Hopper tiles (H200, bf16, 16k tokens, TFLOP/s at s = 1k / 8k non-causal, 512 / 8k
 * causal; benchmarks/results/fwd90_tiles_h200.md):
 *   d=64:  64 keys, 2 warpgroups, 2 blocks per SM (128 registers, 36 bytes of
 *          spills outside the loop): 360 / 385, 209 / 363 -- against
 *          128 keys 1 block/SM 281 / 310, 161 / 299; 3 warpgroups with 128 keys
 *          274 / 340, 139 / 307; 3 warpgroups with 64 keys 247 / 307, 137 / 280;
 *          an S(n - 2)-ahead pipeline with two S accumulators +1%.
 *   d=128: 128 keys, 2 warpgroups, 1 block per SM (236 registers): 394 / 435,
 *          287 / 419 -- against 64 keys 364 / 408, 276 / 385.
 *   The softcap / ALiBi / dropout kernels (`extras`) use 128 keys, 1 block per SM
 *   (they spill 100-300 bytes at 2 blocks per SM).
 */
template <int kHeadDim>
struct FwdSm90Tile;
template <>
struct FwdSm90Tile<64> {
    using type = FwdSm90Config<64, 64, 2, 2>;
    using extras = FwdSm90Config<64, 128>;
};
template <>
struct FwdSm90Tile<128> {
    using type = FwdSm90Config<128, 128>;
    using extras = FwdSm90Config<128, 128>;
};

}  // namespace cuda
}  // namespace pf

#endif /* PF_FLASH_FWD_TILES_H */
