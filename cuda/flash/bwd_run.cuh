/*
 * flash/bwd_run.cuh - the backward's run functions, one per kernel family and
 * (element type, head dim), instantiated in cuda/inst/flash_bwd_hdim<D>_<dtype>.cu
 * and called by pf_cuda_flash_bwd (flash/bwd_launch.cu) once it has picked the
 * family and set up the workspace (flash/bwd_workspace.h). Each enqueues the
 * passes on the caller's stream, every launch checked:
 *
 *   flash_bwd_sm80_run  pass 1 (bwd_prep_kernel), the main kernel
 *                       (flash/bwd_sm80.cuh; twice for head dims > 128: dV, then
 *                       dK + dQ) in the variant the call needs (fast, softcap /
 *                       ALiBi / dropout / any scale, scalar loads for unaligned
 *                       tensors), then either pass 3 (bwd_convert_dq_kernel) or,
 *                       deterministic, the dQ kernel (flash/bwd_dq.cuh)
 *   flash_bwd_sm90_run  the vectorized pass 1, the Hopper main kernel
 *                       (flash/bwd_sm90.cuh), the vectorized pass 3 (head dims
 *                       64 / 128; other head dims have none)
 */
#ifndef PF_FLASH_BWD_RUN_CUH
#define PF_FLASH_BWD_RUN_CUH

#include <atomic>
#include <type_traits>

#include "common/cuda_util.cuh"
#include "flash/bwd_dq.cuh"
#include "flash/bwd_prep.cuh"
#include "flash/bwd_sm80.cuh"
#include "flash/bwd_sm90.cuh"
#include "flash/bwd_tiles.h"
#include "flash/params.h"
#include "flash/sequence.cuh"

namespace pf {
namespace cuda {

template <typename T, typename Cfg, bool Is_aligned, bool Has_extras, BwdGrads kGrads>
pf_status launch_bwd_main(const FlashParams &p, cudaStream_t stream, int device) {
    static std::atomic<uint64_t> done{0};
    const int blocks = (p.max_seqlen_k + Cfg::kBlockN - 1) / Cfg::kBlockN;
    dim3 grid(blocks > 0 ? blocks : 1, p.num_kv_heads, p.batch);
    return launch_with_smem(flash_bwd_kernel<T, Cfg, Is_aligned, Has_extras, kGrads>, grid, Cfg::kNThreads,
                            Cfg::kSmemBytes, stream, device, done, p);
}

template <typename T, typename Cfg, bool Is_aligned, bool Has_extras>
pf_status launch_bwd_dq(const FlashParams &p, cudaStream_t stream, int device) {
    static std::atomic<uint64_t> done{0};
    const int tiles = (p.max_seqlen_q + Cfg::kBlockM - 1) / Cfg::kBlockM;
    dim3 grid(tiles > 0 ? tiles : 1, p.num_heads, p.batch);
    constexpr int smem = (2 * Cfg::kBlockM + 4 * Cfg::kBlockN) * Cfg::kStride * 2;
    return launch_with_smem(flash_bwd_dq_kernel<T, Cfg, Is_aligned, Has_extras>, grid, Cfg::kNThreads, smem, stream,
                            device, done, p);
}

/* Pass 2: the main kernel (one or two launches), and the deterministic dQ kernel. */
template <typename T, int kHeadDim, bool Is_aligned, bool Has_extras>
pf_status bwd_main_and_dq(const FlashParams &p, cudaStream_t stream, int device) {
    using Tile = BwdTile<kHeadDim>;
    using Cfg = std::conditional_t<Has_extras, typename Tile::extras, typename Tile::type>;
    if constexpr (Tile::kSplit) {
        PF_TRY((launch_bwd_main<T, Cfg, Is_aligned, Has_extras, BwdGrads::kDvOnly>(p, stream, device)));
        PF_TRY((launch_bwd_main<T, Cfg, Is_aligned, Has_extras, BwdGrads::kDkDq>(p, stream, device)));
    } else {
        PF_TRY((launch_bwd_main<T, Cfg, Is_aligned, Has_extras, BwdGrads::kAll>(p, stream, device)));
    }
    if (p.deterministic) PF_TRY((launch_bwd_dq<T, typename Tile::dq, Is_aligned, Has_extras>(p, stream, device)));
    return PF_STATUS_OK;
}

/* Blocks of a grid-stride pass that would like `wanted` blocks: at most per_sm per SM, at
 * least one. */
inline int bwd_pass_blocks(int64_t wanted, int sms, int per_sm) {
    const int64_t cap = (int64_t)sms * per_sm;
    const int blocks = (int)(wanted < cap ? wanted : cap);
    return blocks > 0 ? blocks : 1;
}

template <typename T, int kHeadDim>
pf_status flash_bwd_sm80_run(const FlashParams &p, cudaStream_t stream, int device) {
    const int64_t rows = flat_rows(p);
    int sms = 0;
    PF_TRY(sm_count(device, &sms));
    const int64_t warps = rows * p.num_heads; /* pass 1: a warp per (row, head), 8 per block */
    bwd_prep_kernel<T><<<bwd_pass_blocks((warps + 7) / 8, sms, 8), 256, 0, stream>>>(p, rows, !p.deterministic);
    PF_CUDA_CHECK_LAUNCH("bwd_prep_kernel");

    const bool extras = p.score.has_extras() || p.drop_threshold != 0;
    if (!p.aligned)
        PF_TRY((bwd_main_and_dq<T, kHeadDim, false, true>(p, stream, device)));
    else if (extras)
        PF_TRY((bwd_main_and_dq<T, kHeadDim, true, true>(p, stream, device)));
    else
        PF_TRY((bwd_main_and_dq<T, kHeadDim, true, false>(p, stream, device)));

    if (!p.deterministic) {
        const int64_t n = rows * p.num_heads * p.head_dim; /* pass 3: a thread per element */
        bwd_convert_dq_kernel<T><<<bwd_pass_blocks((n + 255) / 256, sms, 16), 256, 0, stream>>>(p, rows);
        PF_CUDA_CHECK_LAUNCH("bwd_convert_dq_kernel");
    }
    return PF_STATUS_OK;
}

template <typename T, int kHeadDim>
pf_status flash_bwd_sm90_run(const FlashParams &p, cudaStream_t stream, int device) {
    if constexpr (bwd_sm90_has_tile(kHeadDim) && sizeof(T) == 2) {
        using Cfg = typename Bwd90Tile<kHeadDim>::type;
        const int64_t rows = flat_rows(p);
        int sms = 0;
        PF_TRY(sm_count(device, &sms));
        constexpr int kChunks = kHeadDim / 8; /* passes 1 and 3: a thread per 16-byte chunk of a (row, head) */
        const int blocks = bwd_pass_blocks((rows * p.num_heads * kChunks + 255) / 256, sms, 16);
        bwd_prep_sm90_kernel<T, kHeadDim><<<blocks, 256, 0, stream>>>(p, (int)rows);
        PF_CUDA_CHECK_LAUNCH("bwd_prep_sm90_kernel");

        static std::atomic<uint64_t> done{0};
        const int key_blocks = (p.max_seqlen_k + Cfg::kBlockN - 1) / Cfg::kBlockN;
        dim3 grid(key_blocks > 0 ? key_blocks : 1, p.num_kv_heads, p.batch);
        PF_TRY(launch_with_smem(flash_bwd_sm90_kernel<T, Cfg>, grid, Cfg::kNThreads, Cfg::kSmemBytes, stream, device,
                                done, p));

        bwd_convert_dq_sm90_kernel<T, kHeadDim><<<blocks, 256, 0, stream>>>(p, (int)rows);
        PF_CUDA_CHECK_LAUNCH("bwd_convert_dq_sm90_kernel");
        return PF_STATUS_OK;
    } else {
        PF_CHECK(0, PF_STATUS_NOT_SUPPORTED, "kernel: 'sm90' has no backward tile for head dim %d", kHeadDim);
    }
}

}  // namespace cuda
}  // namespace pf

#endif /* PF_FLASH_BWD_RUN_CUH */
