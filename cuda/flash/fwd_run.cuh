/*
 * flash/fwd_run.cuh - the forward's run functions, one per kernel family and
 * (element type, head dim), instantiated in cuda/inst/flash_fwd_hdim<D>_<dtype>.cu
 * and called by pf_cuda_flash_fwd (flash/fwd_launch.cu) once it has picked the
 * family. Each picks the variant of its kernel that the call needs and launches it
 * on the caller's stream (a grid of query tiles x heads x batch; dynamic shared
 * memory enabled once per kernel and device; the launch checked):
 *
 *   flash_fwd_sm80_run  flash/fwd_sm80.cuh with the head dim's FwdTile: the fast
 *                       kernel, + softcap / ALiBi / any scale (Has_extras),
 *                       + dropout, and the scalar-load one for unaligned tensors or
 *                       head dims not a multiple of 8
 *   flash_fwd_sm90_run  flash/fwd_sm90.cuh with the head dim's FwdSm90Tile: the fast
 *                       kernel, + extras, + dropout (aligned tensors only; head dims
 *                       64 / 128, other head dims have none); with
 *                       FlashParams::block_table the paged-K/V variant (+ extras) for
 *                       paged_attn's prefill path (flash/paged_kv.cuh)
 */
#ifndef PF_FLASH_FWD_RUN_CUH
#define PF_FLASH_FWD_RUN_CUH

#include <atomic>

#include "common/cuda_util.cuh"
#include "flash/fwd_sm80.cuh"
#include "flash/fwd_sm90.cuh"
#include "flash/fwd_tiles.h"
#include "flash/params.h"

namespace pf {
namespace cuda {

template <typename T, typename Cfg, bool Is_aligned, bool Has_extras, bool Has_dropout>
pf_status launch_fwd_sm80(const FlashParams &p, cudaStream_t stream, int device) {
    auto kernel = flash_fwd_kernel<T, Cfg, Is_aligned, Has_extras, Has_dropout>;
    constexpr int smem = Cfg::kSmemBytes;
    static std::atomic<uint64_t> attr_done{0};
    PF_TRY(set_max_smem(kernel, smem, device, attr_done));
    const int tiles = (p.max_seqlen_q + Cfg::kBlockM - 1) / Cfg::kBlockM;
    dim3 grid(tiles > 0 ? tiles : 1, p.num_heads, p.batch);
    kernel<<<grid, Cfg::kNThreads, smem, stream>>>(p);
    PF_CUDA_CHECK_LAUNCH("flash_fwd_kernel");
    return PF_STATUS_OK;
}

template <typename T, int kHeadDim>
pf_status flash_fwd_sm80_run(const FlashParams &p, cudaStream_t stream, int device) {
    using Cfg = typename FwdTile<kHeadDim>::type;
    if (!p.aligned) return launch_fwd_sm80<T, Cfg, false, true, true>(p, stream, device);
    if (p.drop_threshold) return launch_fwd_sm80<T, Cfg, true, true, true>(p, stream, device);
    if (p.score.has_extras()) return launch_fwd_sm80<T, Cfg, true, true, false>(p, stream, device);
    return launch_fwd_sm80<T, Cfg, true, false, false>(p, stream, device);
}

template <typename T, typename Cfg, bool Has_extras, bool Has_dropout, bool Is_paged = false>
pf_status launch_fwd_sm90(const FlashParams &p, cudaStream_t stream, int device) {
    static_assert(Cfg::kBlockM == kFwdSm90BlockM, "paged_attn plans its query tiles with kFwdSm90BlockM");
    auto kernel = flash_fwd_sm90_kernel<T, Cfg, Has_extras, Has_dropout, Is_paged>;
    constexpr int smem = Cfg::kSmemBytes;
    static std::atomic<uint64_t> attr_done{0};
    PF_TRY(set_max_smem(kernel, smem, device, attr_done));
    const int tiles = (p.max_seqlen_q + Cfg::kBlockM - 1) / Cfg::kBlockM;
    dim3 grid(tiles > 0 ? tiles : 1, p.num_heads, p.batch);
    if (Is_paged && p.plan) grid = dim3(p.num_plan_tiles, p.num_heads, 1); /* (sequence, tile) pairs */
    kernel<<<grid, Cfg::kNThreads, smem, stream>>>(p);
    PF_CUDA_CHECK_LAUNCH("flash_fwd_sm90_kernel");
    return PF_STATUS_OK;
}

template <typename T, int kHeadDim>
pf_status flash_fwd_sm90_run(const FlashParams &p, cudaStream_t stream, int device) {
    if constexpr (fwd_sm90_has_tile(kHeadDim)) {
        using Tile = FwdSm90Tile<kHeadDim>;
        if (p.block_table) { /* paged_attn's prefill path: never dropout */
            if (p.score.has_extras())
                return launch_fwd_sm90<T, typename Tile::extras, true, false, true>(p, stream, device);
            return launch_fwd_sm90<T, typename Tile::type, false, false, true>(p, stream, device);
        }
        if (p.drop_threshold) return launch_fwd_sm90<T, typename Tile::extras, true, true>(p, stream, device);
        if (p.score.has_extras()) return launch_fwd_sm90<T, typename Tile::extras, true, false>(p, stream, device);
        return launch_fwd_sm90<T, typename Tile::type, false, false>(p, stream, device);
    } else {
        PF_CHECK(0, PF_STATUS_NOT_SUPPORTED, "kernel: 'sm90' has no tile for head dim %d", kHeadDim);
    }
}

}  // namespace cuda
}  // namespace pf

#endif /* PF_FLASH_FWD_RUN_CUH */
