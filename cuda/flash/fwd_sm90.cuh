/*
 * flash/fwd_sm90.cuh - the forward kernel on Hopper (sm_90a): wgmma tensor
 * cores, for float16 / bfloat16, head dims 64 and 128, 16-byte aligned tensors
 * (the launcher's kernel choice: flash/fwd_launch.cu; tiles: flash/fwd_tiles.h;
 * launch: flash/fwd_run.cuh). Same semantics, masks, extras, dropout, varlen,
 * GQA, lse as the sm_80 kernel, through the same primitives (attn/score.cuh,
 * attn/mask.cuh, attn/softmax.cuh, flash/dropout.cuh): the wgmma accumulator
 * of a warp has the mma.sync C-fragment layout (attn/sm90.cuh).
 *
 * One thread block = kNWG warpgroups (2: 256 threads) = one query tile of
 * 64 * kNWG rows of one (batch, head); warpgroup w owns rows [64w, 64w + 64),
 * its warp v rows 16v..16v+15 of those. Shared memory, all in the swizzled tile
 * layout of attn/sm90.cuh: Q [kBlockM][D], and three K/V buffers of kBlockN keys
 * (d=128, 128 keys: 32 + 3 x 64 KB = 224 KB, one block per SM; d=64, 64 keys:
 * 64 KB, two blocks per SM).
 *
 * Key tiles are walked from last to first (as on sm_80: the masked tiles of a
 * causal row come first). Tile n lives in buffer (n_hi - 1 - n) % 3; its
 * cp.async copies are issued two tiles ahead, at the top of the iteration that
 * frees the buffer, so one block-wide barrier per tile suffices. Per
 * iteration, with P(n) already in registers:
 *   barrier (K/V(n - 1) landed; everyone is done with buffer n + 1)
 *   issue the copies of K/V(n - 2)
 *   issue S = Q K(n - 1)^T and O += P(n) V(n)   (wgmma, asynchronous, in order)
 *   wait for S; scale / mask / online softmax of S while P V runs
 *   wait for P V; O *= exp2(m_old - m_new); P(n - 1) = S packed to 16 bits
 * O is first written by the first P V with scale-d 0 and the last tile's P V is
 * peeled out of the loop, so no accumulator is touched by ordinary instructions
 * inside a wgmma stage (ptxas would serialize every wgmma otherwise).
 * Epilogue: O / l staged through this warpgroup's rows of the Q tile and
 * stored with 16-byte vectors; lse as on sm_80.
 */
#ifndef PF_FLASH_FWD_SM90_CUH
#define PF_FLASH_FWD_SM90_CUH

#include "attn/mask.cuh"
#include "attn/mma.cuh"
#include "attn/score.cuh"
#include "attn/sm90.cuh"
#include "attn/softmax.cuh"
#include "flash/dropout.cuh"
#include "flash/paged_kv.cuh"
#include "flash/params.h"
#include "flash/sequence.cuh"
#include "flash/tile_io.cuh"

namespace pf {
namespace cuda {

/* swizzled smem [R rows] -> rows [row0, row0 + rows) of a global tile, columns [0, d) */
template <int R, int kHeadDim, int kThreads, typename T>
PF_DEV void store_swizzled(T *g, int64_t row_stride, const unsigned char *tile, int row0, int rows, int rows_valid,
                           int d, int tid) {
    constexpr int C = kHeadDim / 8;
    for (int idx = tid; idx < rows * C; idx += kThreads) {
        const int r = row0 + idx / C, c = (idx % C) * 8;
        if (r >= rows_valid || c >= d) continue;
        *reinterpret_cast<uint4 *>(g + r * row_stride + c) =
            *reinterpret_cast<const uint4 *>(tile + sm90::swz<R>(r, c));
    }
}

template <typename T, typename Cfg, bool Has_extras, bool Has_dropout, bool Is_paged>
__global__ void __launch_bounds__(Cfg::kNThreads, Cfg::kMinBlocks)
    flash_fwd_sm90_kernel(const __grid_constant__ FlashParams p) {
#ifdef PF_SM90_DEVICE
    using Ops = TypeOps<T>;
    constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kHeadDim = Cfg::kHeadDim;
    constexpr int kNThreads = Cfg::kNThreads, kNT = Cfg::kNT, kDT = Cfg::kDT;
    constexpr int kKSteps = kBlockN / 16;

    extern __shared__ __align__(128) unsigned char pf_smem90[]; /* aligned to 1024 below */
    const uint32_t raw = smem_addr(pf_smem90);
    const uint32_t sQ = (raw + 1023) & ~1023u;
    unsigned char *gQ = pf_smem90 + (sQ - raw); /* generic pointer to the Q tile */
    auto sK = [&](int buf) { return sQ + Cfg::kQBytes + buf * 2 * Cfg::kKVBytes; };
    auto sV = [&](int buf) { return sQ + Cfg::kQBytes + buf * 2 * Cfg::kKVBytes + Cfg::kKVBytes; };

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, wg = warp / 4;
    const int g = lane / 4, t = lane % 4;
    const int h = blockIdx.y;
    int b = blockIdx.z;
    int tile = p.causal ? (int)(gridDim.x - 1 - blockIdx.x) : (int)blockIdx.x;
    if (Is_paged && p.plan) { /* packed queries over a paged cache: one (sequence, query tile) per block */
        b = p.plan[2 * tile];
        tile = p.plan[2 * tile + 1];
        if (b < 0) return;
    }
    const SeqInfo si = seq_info(p, b);
    const int sq = si.sq, sk = si.sk, d = p.head_dim;

    const FwdBases<T> base = fwd_bases<T>(p, b, h, si);
    const T *qb = base.q, *kb = base.k, *vb = base.v;
    T *ob = base.o;
    float *lseb = base.lse;

    const MaskRule mask = mask_rule(p, sk);
    const int off = sk - sq; /* query row i sits at key position i + off */
    const float alibi_log2 = Has_extras ? p.score.alibi_log2(b, h) : 0.0f;
    const float sc = Has_extras ? 1.0f : p.score.scale_log2; /* scale applied inside exp2 */
    const uint64_t bh = (uint64_t)b * p.num_heads + h;
    const int wrow = 16 * warp; /* this warp's first row in the tile */

    /* paged K/V: this sequence's table row, whether it holds a bad id, the tile row whose
     * block this lane looks up (flash/paged_kv.cuh) */
    using PTile = PagedTile<kBlockN, kHeadDim, kNThreads>;
    const int32_t *table = Is_paged ? p.block_table + b * p.bt_batch_stride : nullptr;
    const bool bad_ids = Is_paged && paged_any_bad<kNThreads>(p, table, sk, tid);
    const int fetch_row = Is_paged ? PTile::fetch_row(tid) : -1;

    const int n_mtiles = (sq + kBlockM - 1) / kBlockM;
    const int tile_step = Is_paged && p.plan ? n_mtiles : (int)gridDim.x;
    for (; tile < n_mtiles; tile += tile_step) {
        const int m0 = tile * kBlockM;
        const int rows_valid = imin(kBlockM, sq - m0);
        const int i_last = m0 + rows_valid - 1;
        int n_lo, n_hi;
        mask.key_tiles(m0, i_last, off, kBlockN, &n_lo, &n_hi);
        if (n_hi <= n_lo) {
            fwd_write_empty<kHeadDim, kNThreads>(p, ob, lseb, m0, rows_valid, d, tid);
            continue;
        }

        auto buf_of = [&](int n) { return (n_hi - 1 - n) % Cfg::kStages; }; /* K/V ring slot of key tile n */
        PagedSlot next = {-1, 0}; /* paged: this lane's slot in the next key tile to load */
        auto fetch_slot = [&](int n) {
            if (Is_paged)
                next =
                    n >= n_lo && fetch_row >= 0 ? paged_slot(p, table, n * kBlockN + fetch_row, sk) : PagedSlot{-1, 0};
        };
        auto load_kv = [&](int n) {
            if (Is_paged) {
                load_paged_kv<kBlockN, kHeadDim, kNThreads>(sK(buf_of(n)), sV(buf_of(n)), kb, vb, p, next, d, tid);
                return;
            }
            const int j0 = n * kBlockN;
            sm90::load_swizzled<kBlockN, kHeadDim, kNThreads>(sK(buf_of(n)), kb + (int64_t)j0 * p.k_row_stride,
                                                              p.k_row_stride, sk - j0, d, tid);
            sm90::load_swizzled<kBlockN, kHeadDim, kNThreads>(sV(buf_of(n)), vb + (int64_t)j0 * p.v_row_stride,
                                                              p.v_row_stride, sk - j0, d, tid);
        };
        float s[kNT][4]; /* S of one key tile, then its P (as floats) */
        float (&s_flat)[kBlockN / 2] = reinterpret_cast<float (&)[kBlockN / 2]>(s);
        float o[kDT][4]; /* written first by the first P V (scale-d 0): never defined outside wgmma */
        float (&o_flat)[kHeadDim / 2] = reinterpret_cast<float (&)[kHeadDim / 2]>(o);
        uint32_t pa[kKSteps][4]; /* P of the tile whose P V is next, as the wgmma A operand */

        /* S of key tile n: scale / mask / online softmax; returns whether O needs the rescale */
        float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f}, alpha[2];
        auto softmax_tile = [&](int n) {
            const int j0 = n * kBlockN;
            if (Has_extras) scores_to_log2(s, p.score, m0 + wrow + g, j0, t, off, alibi_log2);
            if (mask.tile_needs_mask(j0, kBlockN, m0, i_last, off)) mask_fragment(s, mask, m0 + wrow + g, off, j0, t);
            if (Is_paged && bad_ids) mask_bad_blocks(s, p, table, j0, t, sk);
            const bool rescale = online_softmax(s, row_max, row_sum, alpha, sc);
            if (Has_dropout && p.drop_threshold) dropout_fragment(s, p, bh, m0 + wrow + g, j0, t);
            return rescale;
        };
        auto pack_p = [&]() {
#pragma unroll
            for (int kk = 0; kk < kKSteps; ++kk) {
                pa[kk][0] = Ops::pack(s[2 * kk][0], s[2 * kk][1]);
                pa[kk][1] = Ops::pack(s[2 * kk][2], s[2 * kk][3]);
                pa[kk][2] = Ops::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
                pa[kk][3] = Ops::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
            }
        };
        auto issue_s = [&](int n) {
            sm90::gemm_ss_kmajor<kBlockN, kHeadDim / 16, kBlockM, kBlockN, T>(s_flat, sQ, 64 * wg, sK(buf_of(n)), 0,
                                                                              false);
            sm90::wgmma_commit();
        };
        auto issue_pv = [&](int n) {
            sm90::gemm_rs_mnmajor<kHeadDim, kKSteps, kBlockN, T>(o_flat, pa, sV(buf_of(n)), 0, n != n_hi - 1);
            sm90::wgmma_commit();
        };
        auto rescale_o = [&](bool rescale) {
            if (rescale) {
#pragma unroll
                for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) o[dt][e] *= alpha[e / 2];
            }
        };
        auto before_wgmma = [&]() {
            sm90::fence_regs(pa);
            sm90::fence_regs(o_flat);
            sm90::wgmma_fence();
        };

        /* prologue: Q and the first key tiles in flight */
        sm90::load_swizzled<kBlockM, kHeadDim, kNThreads>(sQ, qb + (int64_t)m0 * p.q_row_stride, p.q_row_stride,
                                                          rows_valid, d, tid);
        fetch_slot(n_hi - 1);
        load_kv(n_hi - 1);
        cp_async_commit();
        if (n_hi - 2 >= n_lo) {
            fetch_slot(n_hi - 2);
            load_kv(n_hi - 2);
        }
        cp_async_commit();
        fetch_slot(n_hi - 3); /* paged: consumed by the loop's first load */

        cp_async_wait<1>();
        sm90::fence_proxy_async();
        __syncthreads();
        sm90::wgmma_fence();
        issue_s(n_hi - 1);
        sm90::wgmma_wait<0>();
        sm90::fence_regs(s_flat);
        softmax_tile(n_hi - 1);
        pack_p();
#pragma unroll 1
        for (int n = n_hi - 1; n > n_lo; --n) {
            cp_async_wait<0>();
            sm90::fence_proxy_async();
            __syncthreads(); /* K/V(n - 1) landed; buffer of n + 1 is free */
            if (n - 2 >= n_lo) {
                load_kv(n - 2);
                cp_async_commit();
                fetch_slot(n - 3);
            }
            before_wgmma();
            issue_s(n - 1);
            issue_pv(n);
            sm90::wgmma_wait<1>();
            sm90::fence_regs(s_flat);
            const bool rescale = softmax_tile(n - 1);
            sm90::wgmma_wait<0>();
            sm90::fence_regs(o_flat);
            rescale_o(rescale);
            pack_p();
        }
        /* the last tile's P V (its V landed with its K, before its S) */
        before_wgmma();
        issue_pv(n_lo);
        sm90::wgmma_wait<0>();
        sm90::fence_regs(o_flat);

        /* epilogue: O / l into this warpgroup's rows of the Q tile, then 16-byte stores */
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            float lse;
            const float inv = softmax_finish_row<Has_dropout>(row_max[hf], row_sum[hf], sc, p.drop_scale, &lse);
            const int r = wrow + g + 8 * hf;
            if (lseb && t == 0 && r < rows_valid) lseb[(int64_t)(m0 + r) * p.lse_row_stride] = lse;
#pragma unroll
            for (int dt = 0; dt < kDT; ++dt)
                *reinterpret_cast<uint32_t *>(gQ + sm90::swz<kBlockM>(r, dt * 8) + 4 * t) =
                    Ops::pack(o[dt][2 * hf] * inv, o[dt][2 * hf + 1] * inv);
        }
        asm volatile("bar.sync %0, 128;\n" ::"r"(1 + wg) : "memory"); /* this warpgroup's rows are staged */
        store_swizzled<kBlockM, kHeadDim, 128>(ob + (int64_t)m0 * p.o_row_stride, p.o_row_stride, gQ, 64 * wg, 64,
                                               rows_valid, d, tid % 128);
        __syncthreads(); /* the next tile of this block reuses Q and the K/V buffers */
    }
#endif
}

}  // namespace cuda
}  // namespace pf

#endif /* PF_FLASH_FWD_SM90_CUH */
