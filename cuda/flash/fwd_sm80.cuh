/*
 * flash/fwd_sm80.cuh - the FlashAttention-2 forward kernel for float16 /
 * bfloat16 on sm_80+ (mma.sync m16n8k16 with float32 accumulation; runs on
 * Hopper too). Tiles: flash/fwd_tiles.h; launch: flash/fwd_run.cuh.
 *
 * Layouts: FlashParams (flash/params.h): q [b, sq, h, d], k/v [b, sk, hk, d]
 * (or packed varlen), out like q, lse f32 [b, h, sq] or [h, total_q].
 *
 * One thread block owns one query tile of kBlockM rows of one (batch, head);
 * grid = (query tiles, heads, batch). Its kNWarps warps split the tile's rows,
 * kMT m16 slices each. Per block:
 *   1. cp.async the Q tile and the last K tile it can see into shared memory
 *      (flash/tile_io.cuh: rows padded to kHeadDim + 8 elements).
 *   2. Walk the visible key tiles from last to first (the masked tiles of a
 *      causal row come first, the rest need no mask). Per tile:
 *        wait K(n), barrier, issue cp.async V(n)          -- overlaps S = Q K^T
 *        S = Q K^T   (ldmatrix Q and K, mma.sync)
 *        softcap / ALiBi / log2 scaling (Has_extras: attn/score.cuh), the
 *        causal / window / length mask (attn/mask.cuh) on tiles that cross a bound
 *        wait V(n), barrier, issue cp.async K(n-1)        -- overlaps softmax and P V
 *        online softmax in the log2 domain with exp2 (attn/softmax.cuh): running
 *        row max m, row sum l kept per thread (the quad reduces l only at the
 *        end), O *= exp2(m_old - m_new), skipped when no row max of the warp
 *        moved (kLazyRescale)
 *        dropout (flash/dropout.cuh: the CPU's exact Philox keep mask)
 *        O += P V    (P stays in registers: the C fragment of S is the A fragment
 *                     of P; V through ldmatrix.trans)
 *   3. O /= l (times 1/(1-p) with dropout), lse = (m + log2 l) ln 2, O staged
 *      through shared memory for 16-byte coalesced stores.
 * A row that sees no key keeps m = -inf, l = 0: out = 0, lse = -inf.
 *
 * Head dims that are not a multiple of 8 or unaligned tensors take a scalar
 * load/store path (Is_aligned false); head dims below kHeadDim are zero-padded.
 * Packed varlen bounds come from device memory and are clamped
 * (flash/sequence.cuh): bad cu_seqlens never read or write out of bounds.
 */
#ifndef PF_FLASH_FWD_SM80_CUH
#define PF_FLASH_FWD_SM80_CUH

#include "attn/mask.cuh"
#include "attn/mma.cuh"
#include "attn/score.cuh"
#include "attn/softmax.cuh"
#include "flash/dropout.cuh"
#include "flash/params.h"
#include "flash/sequence.cuh"
#include "flash/tile_io.cuh"

namespace pf {
namespace cuda {

template <typename T, typename Cfg, bool Is_aligned, bool Has_extras, bool Has_dropout>
__global__ void __launch_bounds__(Cfg::kNThreads, Cfg::kMinBlocks)
    flash_fwd_kernel(const __grid_constant__ FlashParams p) {
    using Ops = TypeOps<T>;
    constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kHeadDim = Cfg::kHeadDim;
    constexpr int kStride = Cfg::kStride, kNThreads = Cfg::kNThreads;
    constexpr int kMT = Cfg::kMT, kNT = Cfg::kNT, kDT = Cfg::kDT;

    extern __shared__ __align__(16) unsigned char pf_smem[];
    T *sQ = reinterpret_cast<T *>(pf_smem);
    T *sK = sQ + kBlockM * kStride;
    T *sV = sK + kBlockN * kStride;

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, t = lane % 4;
    const int b = blockIdx.z, h = blockIdx.y;
    const SeqInfo si = seq_info(p, b);
    const int sq = si.sq, sk = si.sk, d = p.head_dim;
    const bool aligned = Is_aligned; /* the host picks the kernel by p.aligned */

    const FwdBases<T> base = fwd_bases<T>(p, b, h, si);
    const T *qb = base.q, *kb = base.k, *vb = base.v;
    T *ob = base.o;
    float *lseb = base.lse;

    const MaskRule mask = mask_rule(p, sk);
    const int off = sk - sq; /* query row i sits at key position i + off */

    const float alibi_log2 = Has_extras ? p.score.alibi_log2(b, h) : 0.0f;
    const float sc = Has_extras ? 1.0f : p.score.scale_log2; /* scale applied inside exp2 */
    const uint64_t bh = (uint64_t)b * p.num_heads + h;

    /* per-lane ldmatrix addresses (bytes) */
    const int wrow = warp * Cfg::kRowsPerWarp;
    const uint32_t q_lane =
        smem_addr(sQ) + ((wrow + (lane & 7) + 8 * ((lane >> 3) & 1)) * kStride + 8 * (lane >> 4)) * 2;
    const uint32_t k_lane = smem_addr(sK) + (((lane & 7) + 8 * (lane >> 4)) * kStride + 8 * ((lane >> 3) & 1)) * 2;
    const uint32_t v_lane = smem_addr(sV) + (((lane & 7) + 8 * ((lane >> 3) & 1)) * kStride + 8 * (lane >> 4)) * 2;

    const int n_mtiles = (sq + kBlockM - 1) / kBlockM;
    /* causal: the longest tiles (the last rows) start first */
    int tile = p.causal ? (int)(gridDim.x - 1 - blockIdx.x) : (int)blockIdx.x;
    for (; tile < n_mtiles; tile += gridDim.x) {
        const int m0 = tile * kBlockM;
        const int rows_valid = imin(kBlockM, sq - m0);
        const int i_last = m0 + rows_valid - 1;
        int n_lo, n_hi;
        mask.key_tiles(m0, i_last, off, kBlockN, &n_lo, &n_hi);

        if (n_hi <= n_lo) { /* nothing visible: out = 0, lse = -inf */
            fwd_write_empty<kHeadDim, kNThreads>(p, ob, lseb, m0, rows_valid, d, tid);
            continue;
        }

        load_tile<kBlockM, kHeadDim, kStride, kNThreads>(sQ, qb + (int64_t)m0 * p.q_row_stride, p.q_row_stride,
                                                         rows_valid, d, aligned, tid);
        {
            const int j0 = (n_hi - 1) * kBlockN;
            load_tile<kBlockN, kHeadDim, kStride, kNThreads>(sK, kb + (int64_t)j0 * p.k_row_stride, p.k_row_stride,
                                                             sk - j0, d, aligned, tid);
        }
        cp_async_commit();

        float acc[kMT][kDT][4];
        float row_max[kMT][2], row_sum[kMT][2];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
            for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[mt][dt][e] = 0.0f;
            row_max[mt][0] = row_max[mt][1] = -INFINITY;
            row_sum[mt][0] = row_sum[mt][1] = 0.0f;
        }

#pragma unroll 1
        for (int n = n_hi - 1; n >= n_lo; --n) {
            const int j0 = n * kBlockN;
            cp_async_wait<0>();
            __syncthreads(); /* K(n) (and Q) landed; every warp is done with V(n+1) */
            load_tile<kBlockN, kHeadDim, kStride, kNThreads>(sV, vb + (int64_t)j0 * p.v_row_stride, p.v_row_stride,
                                                             sk - j0, d, aligned, tid);
            cp_async_commit();

            /* S = Q K^T */
            float s[kMT][kNT][4];
#pragma unroll
            for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
                for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < kHeadDim / 16; ++kk) {
                uint32_t a[kMT][4];
#pragma unroll
                for (int mt = 0; mt < kMT; ++mt) ldmatrix_x4(a[mt], q_lane + (mt * 16 * kStride + kk * 16) * 2);
#pragma unroll
                for (int np = 0; np < kNT / 2; ++np) {
                    uint32_t bf[4];
                    ldmatrix_x4(bf, k_lane + (np * 16 * kStride + kk * 16) * 2);
#pragma unroll
                    for (int mt = 0; mt < kMT; ++mt) {
                        Ops::mma(s[mt][2 * np], a[mt], bf[0], bf[1]);
                        Ops::mma(s[mt][2 * np + 1], a[mt], bf[2], bf[3]);
                    }
                }
            }

            /* score transforms into the log2 domain (softcap, ALiBi) */
            if (Has_extras) {
#pragma unroll
                for (int mt = 0; mt < kMT; ++mt)
                    scores_to_log2(s[mt], p.score, m0 + wrow + mt * 16 + g, j0, t, off, alibi_log2);
            }

            /* causal / window / key-length mask, only on tiles that cross a boundary */
            if (mask.tile_needs_mask(j0, kBlockN, m0, i_last, off)) {
#pragma unroll
                for (int mt = 0; mt < kMT; ++mt) mask_fragment(s[mt], mask, m0 + wrow + mt * 16 + g, off, j0, t);
            }

            cp_async_wait<0>();
            __syncthreads(); /* V(n) landed; every warp is done with K(n) */
            if (n > n_lo) {
                const int jn = (n - 1) * kBlockN;
                load_tile<kBlockN, kHeadDim, kStride, kNThreads>(sK, kb + (int64_t)jn * p.k_row_stride, p.k_row_stride,
                                                                 sk - jn, d, aligned, tid);
                cp_async_commit();
            }

            /* online softmax (log2 domain) */
            float alpha[kMT][2];
            bool rescale = false;
#pragma unroll
            for (int mt = 0; mt < kMT; ++mt) rescale |= online_softmax(s[mt], row_max[mt], row_sum[mt], alpha[mt], sc);
            /* O *= exp2(m_old - m_new); skipped when no row of the warp got a new max
             * (most tiles after the first few on long rows) */
            if (!Cfg::kLazyRescale || __any_sync(0xffffffffu, rescale)) {
#pragma unroll
                for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
                    for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
                        for (int e = 0; e < 4; ++e) acc[mt][dt][e] *= alpha[mt][e / 2];
            }

            if (Has_dropout && p.drop_threshold) {
#pragma unroll
                for (int mt = 0; mt < kMT; ++mt) dropout_fragment(s[mt], p, bh, m0 + wrow + mt * 16 + g, j0, t);
            }

            /* O += P V */
#pragma unroll
            for (int kk = 0; kk < kBlockN / 16; ++kk) {
                uint32_t a[kMT][4];
#pragma unroll
                for (int mt = 0; mt < kMT; ++mt) {
                    a[mt][0] = Ops::pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                    a[mt][1] = Ops::pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                    a[mt][2] = Ops::pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                    a[mt][3] = Ops::pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
                }
#pragma unroll
                for (int dp = 0; dp < kDT / 2; ++dp) {
                    uint32_t bf[4];
                    ldmatrix_x4_trans(bf, v_lane + (kk * 16 * kStride + dp * 16) * 2);
#pragma unroll
                    for (int mt = 0; mt < kMT; ++mt) {
                        Ops::mma(acc[mt][2 * dp], a[mt], bf[0], bf[1]);
                        Ops::mma(acc[mt][2 * dp + 1], a[mt], bf[2], bf[3]);
                    }
                }
            }
        }

        /* epilogue: normalize, lse, stage O in this warp's rows of sQ, store */
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                float lse;
                const float inv =
                    softmax_finish_row<Has_dropout>(row_max[mt][hf], row_sum[mt][hf], sc, p.drop_scale, &lse);
                const int r = wrow + mt * 16 + g + 8 * hf;
                if (lseb && t == 0 && r < rows_valid) lseb[(int64_t)(m0 + r) * p.lse_row_stride] = lse;
#pragma unroll
                for (int dt = 0; dt < kDT; ++dt)
                    *reinterpret_cast<uint32_t *>(sQ + r * kStride + dt * 8 + 2 * t) =
                        Ops::pack(acc[mt][dt][2 * hf] * inv, acc[mt][dt][2 * hf + 1] * inv);
            }
        __syncthreads();
        store_tile<kBlockM, kHeadDim, kStride, kNThreads>(ob + (int64_t)m0 * p.o_row_stride, p.o_row_stride, sQ,
                                                          rows_valid, d, aligned, tid);
        __syncthreads(); /* sQ is reused by the next tile of this block (varlen) */
    }
}

}  // namespace cuda
}  // namespace pf

#endif /* PF_FLASH_FWD_SM80_CUH */
