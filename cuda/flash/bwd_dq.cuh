/*
 * flash/bwd_dq.cuh - the backward's deterministic dQ kernel (float16 / bfloat16,
 * mma.sync): with `deterministic`, the main kernel (flash/bwd_sm80.cuh) computes
 * dK / dV only and this kernel writes dQ directly, with no atomics, so the
 * gradients are bitwise reproducible. Tile: BwdTile<d>::dq (flash/bwd_tiles.h, a
 * forward FwdConfig); launch: flash/bwd_run.cuh.
 *
 * One block owns a query tile of kBlockM rows of one (batch, query head) and walks
 * the key tiles it sees (attn/mask.cuh key_tiles; K and V double-buffered by
 * cp.async), recomputing per tile
 *   S = Q K^T, dP = dO V^T          (one pass over the head dim, both products)
 *   P = exp2(score(S) - lse log2 e) (attn/score.cuh, attn/softmax.cuh; masked)
 *   dS = P o (dP - D)               (o dtanh under softcap; dropout's mask on dP)
 *   dQ += dS K                      (dS packed from the registers, K via ldmatrix.trans)
 * and stores dQ * softmax_scale through shared memory. lse and D of its rows are
 * read once into registers (D from pass 1's workspace, flash/bwd_workspace.h).
 */
#ifndef PF_FLASH_BWD_DQ_CUH
#define PF_FLASH_BWD_DQ_CUH

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

template <typename T, typename Cfg, bool Is_aligned, bool Has_extras>
__global__ void __launch_bounds__(Cfg::kNThreads) flash_bwd_dq_kernel(const __grid_constant__ FlashParams p) {
    using Ops = TypeOps<T>;
    constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kHeadDim = Cfg::kHeadDim;
    constexpr int kStride = Cfg::kStride, kNThreads = Cfg::kNThreads;
    constexpr int kMT = Cfg::kMT, kNT = Cfg::kNT, kDT = Cfg::kDT;

    extern __shared__ __align__(16) unsigned char pf_smem[];
    T *sQ = reinterpret_cast<T *>(pf_smem);
    T *sdO = sQ + kBlockM * kStride;
    T *sK = sdO + kBlockM * kStride;  /* [2][kBlockN][kStride] */
    T *sV = sK + 2 * kBlockN * kStride;

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, t = lane % 4;
    const int b = blockIdx.z, h = blockIdx.y, hk = h / p.head_group;
    const SeqInfo si = seq_info(p, b);
    const int sq = si.sq, sk = si.sk, d = p.head_dim;
    const bool aligned = Is_aligned;
    const MaskRule mask = mask_rule(p, sk);
    const int off = sk - sq; /* query row i sits at key position i + off */
    const int64_t rows_total = flat_rows(p);
    const int64_t row_base = flat_row_base(p, b, si);
    const uint64_t bh = (uint64_t)b * p.num_heads + h;
    const float alibi_log2 = Has_extras ? p.score.alibi_log2(b, h) : 0.0f;

    const T *qb =
        static_cast<const T *>(p.q) + b * p.q_batch_stride + (int64_t)si.q_start * p.q_row_stride + h * p.q_head_stride;
    const T *dob = static_cast<const T *>(p.dout) + b * p.do_batch_stride + (int64_t)si.q_start * p.do_row_stride +
                   h * p.do_head_stride;
    const T *kb = static_cast<const T *>(p.k) + b * p.k_batch_stride + (int64_t)si.k_start * p.k_row_stride +
                  hk * p.k_head_stride;
    const T *vb = static_cast<const T *>(p.v) + b * p.v_batch_stride + (int64_t)si.k_start * p.v_row_stride +
                  hk * p.v_head_stride;
    T *dqb =
        static_cast<T *>(p.dq) + b * p.dq_batch_stride + (int64_t)si.q_start * p.dq_row_stride + h * p.dq_head_stride;

    const int wrow = warp * Cfg::kRowsPerWarp;
    const uint32_t a_off = (((lane & 7) + 8 * ((lane >> 3) & 1)) * kStride + 8 * (lane >> 4)) * 2;
    const uint32_t q_lane = smem_addr(sQ) + wrow * kStride * 2 + a_off;
    const uint32_t do_lane = smem_addr(sdO) + wrow * kStride * 2 + a_off;
    const uint32_t bN_off = (((lane & 7) + 8 * (lane >> 4)) * kStride + 8 * ((lane >> 3) & 1)) * 2;
    const uint32_t bT_off = (((lane & 7) + 8 * ((lane >> 3) & 1)) * kStride + 8 * (lane >> 4)) * 2;

    for (int tile = blockIdx.x; tile * kBlockM < sq; tile += gridDim.x) {
        const int m0 = tile * kBlockM;
        const int rows_valid = imin(kBlockM, sq - m0);
        const int i_last = m0 + rows_valid - 1;
        int n_lo, n_hi;
        mask.key_tiles(m0, i_last, off, kBlockN, &n_lo, &n_hi);

        load_tile<kBlockM, kHeadDim, kStride, kNThreads>(sQ, qb + (int64_t)m0 * p.q_row_stride, p.q_row_stride,
                                                         rows_valid, d, aligned, tid);
        load_tile<kBlockM, kHeadDim, kStride, kNThreads>(sdO, dob + (int64_t)m0 * p.do_row_stride, p.do_row_stride,
                                                         rows_valid, d, aligned, tid);
        auto issue = [&](int n) {
            const int jj = n * kBlockN, st = (n - n_lo) & 1;
            load_tile<kBlockN, kHeadDim, kStride, kNThreads>(sK + st * kBlockN * kStride,
                                                             kb + (int64_t)jj * p.k_row_stride, p.k_row_stride, sk - jj,
                                                             d, aligned, tid);
            load_tile<kBlockN, kHeadDim, kStride, kNThreads>(sV + st * kBlockN * kStride,
                                                             vb + (int64_t)jj * p.v_row_stride, p.v_row_stride, sk - jj,
                                                             d, aligned, tid);
        };
        if (n_hi > n_lo) issue(n_lo);
        cp_async_commit();

        /* per-row lse (log2) and D */
        float lse_r[kMT][2], d_r[kMT][2];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                const int i = m0 + wrow + mt * 16 + g + 8 * hf;
                float l = INFINITY, dv = 0.0f;
                if (i < sq) {
                    l = p.lse[b * p.lse_batch_stride + h * p.lse_head_stride +
                              (int64_t)(si.q_start + i) * p.lse_row_stride];
                    l = lse_to_log2(l);
                    dv = p.dsum[h * rows_total + row_base + i];
                }
                lse_r[mt][hf] = l;
                d_r[mt][hf] = dv;
            }

        float acc[kMT][kDT][4];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
            for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[mt][dt][e] = 0.0f;

#pragma unroll 1
        for (int n = n_lo; n < n_hi; ++n) {
            const int j0 = n * kBlockN, st = (n - n_lo) & 1;
            cp_async_wait<0>();
            __syncthreads();
            if (n + 1 < n_hi) issue(n + 1);
            cp_async_commit();
            const uint32_t kS = smem_addr(sK + st * kBlockN * kStride);
            const uint32_t vS = smem_addr(sV + st * kBlockN * kStride);

            float s[kMT][kNT][4], dpv[kMT][kNT][4];
#pragma unroll
            for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
                for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) s[mt][nt][e] = dpv[mt][nt][e] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < kHeadDim / 16; ++kk) {
                uint32_t aq[kMT][4], ad[kMT][4];
#pragma unroll
                for (int mt = 0; mt < kMT; ++mt) {
                    ldmatrix_x4(aq[mt], q_lane + (mt * 16 * kStride + kk * 16) * 2);
                    ldmatrix_x4(ad[mt], do_lane + (mt * 16 * kStride + kk * 16) * 2);
                }
#pragma unroll
                for (int np = 0; np < kNT / 2; ++np) {
                    uint32_t bk[4], bv[4];
                    ldmatrix_x4(bk, kS + bN_off + (np * 16 * kStride + kk * 16) * 2);
                    ldmatrix_x4(bv, vS + bN_off + (np * 16 * kStride + kk * 16) * 2);
#pragma unroll
                    for (int mt = 0; mt < kMT; ++mt) {
                        Ops::mma(s[mt][2 * np], aq[mt], bk[0], bk[1]);
                        Ops::mma(s[mt][2 * np + 1], aq[mt], bk[2], bk[3]);
                        Ops::mma(dpv[mt][2 * np], ad[mt], bv[0], bv[1]);
                        Ops::mma(dpv[mt][2 * np + 1], ad[mt], bv[2], bv[3]);
                    }
                }
            }
            const bool need_mask = mask.tile_needs_mask(j0, kBlockN, m0, i_last, off);
#pragma unroll
            for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
                for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int hf = e / 2;
                        const int i = m0 + wrow + mt * 16 + g + 8 * hf;
                        const int j = j0 + nt * 8 + 2 * t + (e & 1);
                        float dth;
                        const float x = score_to_log2<Has_extras>(p.score, s[mt][nt][e], alibi_log2, i + off - j, &dth);
                        float pr = fast_exp2(x - lse_r[mt][hf]);
                        if (need_mask) { /* uniform per tile; hoisted by the compiler */
                            const int lo = mask.lo(i + off), hi = mask.hi(i + off);
                            pr = (j < lo || j > hi) ? 0.0f : pr;
                        }
                        float dp = dpv[mt][nt][e];
                        if (Has_extras && p.drop_threshold) dp = dropout_keep(p, bh, i, j) ? dp * p.drop_scale : 0.0f;
                        float ds = pr * (dp - d_r[mt][hf]);
                        if (Has_extras) ds *= dth;
                        s[mt][nt][e] = ds;
                    }
            /* dQ += dS K */
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
                    ldmatrix_x4_trans(bf, kS + bT_off + (kk * 16 * kStride + dp * 16) * 2);
#pragma unroll
                    for (int mt = 0; mt < kMT; ++mt) {
                        Ops::mma(acc[mt][2 * dp], a[mt], bf[0], bf[1]);
                        Ops::mma(acc[mt][2 * dp + 1], a[mt], bf[2], bf[3]);
                    }
                }
            }
        }
        cp_async_wait<0>();
        __syncthreads(); /* done with sQ */
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                const int r = wrow + mt * 16 + g + 8 * hf;
#pragma unroll
                for (int dt = 0; dt < kDT; ++dt)
                    *reinterpret_cast<uint32_t *>(sQ + r * kStride + dt * 8 + 2 * t) = Ops::pack(
                        acc[mt][dt][2 * hf] * p.score.softmax_scale, acc[mt][dt][2 * hf + 1] * p.score.softmax_scale);
            }
        __syncthreads();
        store_tile<kBlockM, kHeadDim, kStride, kNThreads>(dqb + (int64_t)m0 * p.dq_row_stride, p.dq_row_stride, sQ,
                                                          rows_valid, d, aligned, tid);
        __syncthreads();
    }
}

}  // namespace cuda
}  // namespace pf

#endif /* PF_FLASH_BWD_DQ_CUH */
