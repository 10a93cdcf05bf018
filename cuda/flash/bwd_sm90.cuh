/*
 * flash/bwd_sm90.cuh - the Hopper (sm_90a, wgmma) main kernel of the backward:
 * the same contract as flash_bwd_kernel (flash/bwd_sm80.cuh: pass 2, dK/dV
 * written, dQ added to dq_accum by float32 atomics) for the calls the launcher
 * gives it (flash/bwd_launch.cu: compute capability 9.x, head dims 64 / 128,
 * 16-bit types, aligned tensors, no softcap / ALiBi / dropout, non-deterministic).
 * It reads pass 1's workspace (flash/bwd_workspace.h: D and lse2 = lse log2 e,
 * +inf on fully masked rows); tiles: flash/bwd_tiles.h; the passes around it:
 * flash/bwd_run.cuh.
 *
 * A block (2 warpgroups, 256 threads, 1 block per SM) owns kBlockN = 128 keys
 * of one KV head, 64 per warpgroup, and walks every query head of the group and
 * every query tile of kBlockM rows that sees the keys (attn/mask.cuh). Shared
 * memory holds K, V, two stages of Q / dO / lse2 / D (cp.async, zero fill) and
 * two dS^T buffers, all as 128-byte swizzled tiles (attn/sm90.cuh). Per step and
 * warpgroup:
 *   S^T  = K_wg Q^T,  dP^T = V_wg dO^T      wgmma SS, both K-major, N = kBlockM
 *   P^T  = exp2(S^T scale log2e - lse2)     per column (query) lse2, masks
 *   dV  += P^T dO                           wgmma RS (A = P^T in registers,
 *   dS^T = P^T o (dP^T - D)                  B = dO MN-major, N = d)
 *   dK  += dS^T Q                           wgmma RS (B = Q MN-major)
 *   dS^T -> shared memory (swizzled, the dQ product's A operand, MN-major)
 * and step s's dQ = dS K runs after step s + 1's barrier (one block-wide barrier
 * per step): wgmma SS with A = dS MN-major (transposed) and B = K MN-major, the
 * two warpgroups splitting the head dim (kBlockM = 64) or the query rows
 * (kBlockM = 128), then red.global.add.v2.f32 into dq_accum. GQA: the group's
 * query heads are summed in the registers like the sm_80 kernel.
 */
#ifndef PF_FLASH_BWD_SM90_CUH
#define PF_FLASH_BWD_SM90_CUH

#include "attn/mask.cuh"
#include "attn/mma.cuh"
#include "attn/sm90.cuh"
#include "flash/bwd_tiles.h"
#include "flash/bwd_workspace.h"
#include "flash/params.h"
#include "flash/sequence.cuh"
#include "flash/tile_io.cuh"

namespace pf {
namespace cuda {

template <typename T, typename Cfg>
__global__ void __launch_bounds__(256, 1) flash_bwd_sm90_kernel(const __grid_constant__ FlashParams p) {
#ifdef PF_SM90_DEVICE
    using Ops = TypeOps<T>;
    using namespace sm90;
    constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kHeadDim = Cfg::kHeadDim;
    constexpr int kNS = kBlockM / 2;   /* S^T / dP^T accumulators per thread (m64 n kBlockM) */
    constexpr int kND = kHeadDim / 2;  /* dK / dV accumulators per thread (m64 n d) */
    constexpr int kKS = kBlockM / 16;  /* k16 steps of dV / dK (over the queries) */
    constexpr int kDqN = Cfg::kDqN;

    extern __shared__ __align__(16) unsigned char pf_smem[];
    unsigned char *base = pf_smem + ((1024u - (smem_addr(pf_smem) & 1023u)) & 1023u);
    const uint32_t sb = smem_addr(base);
    const uint32_t sK = sb + Cfg::kOffK, sV = sb + Cfg::kOffV;
    float *sLse0 = reinterpret_cast<float *>(base + Cfg::kOffLse);
    float *sD0 = reinterpret_cast<float *>(base + Cfg::kOffD);

    const int tid = threadIdx.x, wg = tid / 128, warp = (tid % 128) / 32, lane = tid % 32;
    const int g = lane / 4, t = lane % 4;
    const int hk = blockIdx.y, b = blockIdx.z;
    const SeqInfo si = seq_info(p, b);
    const int sq = si.sq, sk = si.sk, d = p.head_dim, G = p.head_group;
    const MaskRule mask = mask_rule(p, sk);
    const int off = sk - sq; /* query row i sits at key position i + off */
    const int64_t rows_total = flat_rows(p);
    const int64_t row_base = flat_row_base(p, b, si);
    const float scale_log2 = p.score.scale_log2;

    const T *kb = static_cast<const T *>(p.k) + b * p.k_batch_stride + (int64_t)si.k_start * p.k_row_stride +
                  hk * p.k_head_stride;
    const T *vb = static_cast<const T *>(p.v) + b * p.v_batch_stride + (int64_t)si.k_start * p.v_row_stride +
                  hk * p.v_head_stride;

    for (int n_block = blockIdx.x; n_block * kBlockN < sk; n_block += gridDim.x) {
        const int j0 = n_block * kBlockN;
        const int keys_valid = imin(kBlockN, sk - j0);
        int m_lo, m_hi;
        /* the rule read again from the params here: not kept in registers across the step loop */
        mask_rule(p, sk).query_tiles(j0, j0 + keys_valid - 1, off, sq, kBlockM, &m_lo, &m_hi);
        const int nm = m_hi - m_lo;
        const int n_steps = G * nm;

        load_swizzled<kBlockN, kHeadDim, 256, T>(sK, kb + (int64_t)j0 * p.k_row_stride, p.k_row_stride, keys_valid, d,
                                                 tid);
        load_swizzled<kBlockN, kHeadDim, 256, T>(sV, vb + (int64_t)j0 * p.v_row_stride, p.v_row_stride, keys_valid, d,
                                                 tid);

        /* loads of step s (query head h, first query m0) into stage s % 2 */
        auto issue = [&](int s, int h, int m0) {
            const int st = s & 1;
            const int rows_valid = sq - m0;
            const T *qh = static_cast<const T *>(p.q) + b * p.q_batch_stride +
                          (int64_t)(si.q_start + m0) * p.q_row_stride + h * p.q_head_stride;
            const T *doh = static_cast<const T *>(p.dout) + b * p.do_batch_stride +
                           (int64_t)(si.q_start + m0) * p.do_row_stride + h * p.do_head_stride;
            load_swizzled<kBlockM, kHeadDim, 256, T>(sb + Cfg::kOffQ + st * Cfg::kQBytes, qh, p.q_row_stride,
                                                     rows_valid, d, tid);
            load_swizzled<kBlockM, kHeadDim, 256, T>(sb + Cfg::kOffdO + st * Cfg::kQBytes, doh, p.do_row_stride,
                                                     rows_valid, d, tid);
            /* lse2 (rows past the end read 0: their Q, dO and D are zero too, so P = 1 there but
             * P dO = 0 and dS = 0) and D */
            bwd_stage_rows<kBlockM>(sLse0 + st * kBlockM, sD0 + st * kBlockM,
                                    p.dsum + bwd_lse2_offset(rows_total, p.num_heads) + h * rows_total + row_base + m0,
                                    1, p.dsum + h * rows_total + row_base + m0, rows_valid, tid, true);
        };

        if (n_steps > 0) issue(0, hk * G, m_lo * kBlockM);
        cp_async_commit();
        int cur_h = hk * G, cur_m = m_lo;

        float acc_dk[kND], acc_dv[kND];
#pragma unroll
        for (int i = 0; i < kND; ++i) acc_dk[i] = acc_dv[i] = 0.0f;

        const int kj = j0 + 64 * wg + 16 * warp + g; /* this thread's keys: kj, kj + 8 */

        /* dQ[m0_ ..] += dS K from dS^T buffer buf, by atomics */
        auto dq_product = [&](int buf, int h_, int m0_) {
            float acc[kDqN / 2];
            const uint32_t sS = sb + Cfg::kOffS + buf * Cfg::kSBytes;
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < kBlockN / 16; ++kk)
                WgmmaSS<kDqN, T, 1, 1>::run(acc, desc_mnmajor<kBlockN>(sS, Cfg::kDqSplitRows ? 64 * wg : 0, kk),
                                            desc_mnmajor<kBlockN>(sK, Cfg::kDqSplitRows ? 0 : 64 * wg, kk),
                                            kk > 0 ? 1 : 0);
            wgmma_commit();
            wgmma_wait<0>();
            fence_regs(acc);
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                const int r = (Cfg::kDqSplitRows ? 64 * wg : 0) + 16 * warp + g + 8 * hf;
                if (m0_ + r < sq) {
                    float *dst = p.dq_accum + ((row_base + m0_ + r) * p.num_heads + h_) * kHeadDim +
                                 (Cfg::kDqSplitRows ? 0 : 64 * wg) + 2 * t;
#pragma unroll
                    for (int j = 0; j < kDqN / 8; ++j)
                        atomic_add_float2(dst + 8 * j, acc[4 * j + 2 * hf], acc[4 * j + 2 * hf + 1]);
                }
            }
        };
        int prev_h = 0, prev_m0 = 0;

#pragma unroll 1
        for (int s = 0; s < n_steps; ++s) {
            const int st = s & 1;
            const int h = cur_h, m0 = cur_m * kBlockM;
            if (++cur_m == m_hi) {
                cur_m = m_lo;
                ++cur_h;
            }
            cp_async_wait<0>();
            fence_proxy_async();
            __syncthreads(); /* step s landed; both warpgroups are done with step s - 1 and wrote its dS^T */
            if (s + 1 < n_steps) issue(s + 1, cur_h, cur_m * kBlockM);
            cp_async_commit();
            if (s > 0) dq_product((s - 1) & 1, prev_h, prev_m0);

            const uint32_t qS = sb + Cfg::kOffQ + st * Cfg::kQBytes;
            const uint32_t doS = sb + Cfg::kOffdO + st * Cfg::kQBytes;
            const float *sLse = sLse0 + st * kBlockM;
            const float *sD = sD0 + st * kBlockM;

            /* S^T = K_wg Q^T, dP^T = V_wg dO^T (two commit groups: the exp starts after S^T) */
            float accS[kNS], accP[kNS];
            wgmma_fence();
            gemm_ss_kmajor<kBlockM, kHeadDim / 16, kBlockN, kBlockM, T>(accS, sK, 64 * wg, qS, 0, false);
            wgmma_commit();
            gemm_ss_kmajor<kBlockM, kHeadDim / 16, kBlockN, kBlockM, T>(accP, sV, 64 * wg, doS, 0, false);
            wgmma_commit();
            wgmma_wait<1>();
            fence_regs(accS);

            /* P^T = exp2(S^T scale log2e - lse2): accS[4j + 2hf + e] is (key kj + 8hf, query m0 + 8j + 2t + e) */
#pragma unroll
            for (int j = 0; j < kBlockM / 8; ++j) {
                const float2 l = *reinterpret_cast<const float2 *>(sLse + 8 * j + 2 * t);
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    accS[4 * j + e] = fast_exp2(fmaf(accS[4 * j + e], scale_log2, -((e & 1) ? l.y : l.x)));
            }
            const bool need_mask = mask.tile_needs_mask(j0, kBlockN, m0, m0 + kBlockM - 1, off);
            if (need_mask) {
#pragma unroll
                for (int j = 0; j < kBlockM / 8; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int jk = kj + 8 * (e / 2);
                        const int i = m0 + 8 * j + 2 * t + (e & 1);
                        const int lo = mask.lo(i + off), hi = mask.hi(i + off);
                        if (jk < lo || jk > hi) accS[4 * j + e] = 0.0f;
                    }
            }

            /* dV += P^T dO */
            uint32_t aP[kKS][4];
#pragma unroll
            for (int kk = 0; kk < kKS; ++kk)
#pragma unroll
                for (int x = 0; x < 4; ++x) aP[kk][x] = Ops::pack(accS[8 * kk + 2 * x], accS[8 * kk + 2 * x + 1]);
            wgmma_wait<0>();
            fence_regs(accP);
            wgmma_fence();
            gemm_rs_mnmajor<kHeadDim, kKS, kBlockM, T>(acc_dv, aP, doS, 0, true);
            wgmma_commit();

            /* dS^T = P^T o (dP^T - D) */
#pragma unroll
            for (int j = 0; j < kBlockM / 8; ++j) {
                const float2 dd = *reinterpret_cast<const float2 *>(sD + 8 * j + 2 * t);
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    accP[4 * j + e] = accS[4 * j + e] * (accP[4 * j + e] - ((e & 1) ? dd.y : dd.x));
            }
            uint32_t aS[kKS][4];
#pragma unroll
            for (int kk = 0; kk < kKS; ++kk)
#pragma unroll
                for (int x = 0; x < 4; ++x) aS[kk][x] = Ops::pack(accP[8 * kk + 2 * x], accP[8 * kk + 2 * x + 1]);

            /* dK += dS^T Q */
            wgmma_fence();
            gemm_rs_mnmajor<kHeadDim, kKS, kBlockM, T>(acc_dk, aS, qS, 0, true);
            wgmma_commit();

            /* dS^T (same rounding as for dK) to buffer st: rows = keys, columns = queries */
            {
                unsigned char *sS = base + Cfg::kOffS + st * Cfg::kSBytes;
                const int r = 64 * wg + 16 * warp + g;
#pragma unroll
                for (int kk = 0; kk < kKS; ++kk) {
                    /* aS[kk][x]: row r + 8 (x & 1), columns 16kk + 8 (x >> 1) + 2t */
#pragma unroll
                    for (int x = 0; x < 4; ++x)
                        *reinterpret_cast<uint32_t *>(sS + swz<kBlockN>(r + 8 * (x & 1), 16 * kk + 8 * (x >> 1)) +
                                                      4 * t) = aS[kk][x];
                }
            }
            fence_proxy_async();
            wgmma_wait<0>();
            fence_regs(acc_dv);
            fence_regs(acc_dk);
            prev_h = h;
            prev_m0 = m0;
        }
        if (n_steps > 0) {
            __syncthreads(); /* the last step's dS^T complete */
            dq_product((n_steps - 1) & 1, prev_h, prev_m0);
        }

        /* epilogue: dK * scale and dV (16-bit) into sK / sV (swizzled), then 16-byte stores */
        cp_async_wait<0>();
        __syncthreads(); /* every warpgroup is done with sK, sV */
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int r = 64 * wg + 16 * warp + g + 8 * hf;
#pragma unroll
            for (int j = 0; j < kHeadDim / 8; ++j) {
                const uint32_t o = swz<kBlockN>(r, 8 * j) + 4 * t;
                *reinterpret_cast<uint32_t *>(base + Cfg::kOffK + o) = Ops::pack(
                    acc_dk[4 * j + 2 * hf] * p.score.softmax_scale, acc_dk[4 * j + 2 * hf + 1] * p.score.softmax_scale);
                *reinterpret_cast<uint32_t *>(base + Cfg::kOffV + o) =
                    Ops::pack(acc_dv[4 * j + 2 * hf], acc_dv[4 * j + 2 * hf + 1]);
            }
        }
        __syncthreads();
        {
            T *dkb = static_cast<T *>(p.dk) + b * p.dk_batch_stride + (int64_t)(si.k_start + j0) * p.dk_row_stride +
                     hk * p.dk_head_stride;
            T *dvb = static_cast<T *>(p.dv) + b * p.dv_batch_stride + (int64_t)(si.k_start + j0) * p.dv_row_stride +
                     hk * p.dv_head_stride;
            constexpr int C = kHeadDim / 8;
#pragma unroll
            for (int it = 0; it < kBlockN * C / 256; ++it) {
                const int idx = tid + it * 256;
                const int r = idx / C, c = (idx % C) * 8;
                if (r < keys_valid && c < d) {
                    const uint32_t o = swz<kBlockN>(r, c);
                    *reinterpret_cast<uint4 *>(dkb + r * p.dk_row_stride + c) =
                        *reinterpret_cast<const uint4 *>(base + Cfg::kOffK + o);
                    *reinterpret_cast<uint4 *>(dvb + r * p.dv_row_stride + c) =
                        *reinterpret_cast<const uint4 *>(base + Cfg::kOffV + o);
                }
            }
        }
        __syncthreads(); /* sK / sV are reloaded by the next key block (varlen) */
    }
#endif
}

}  // namespace cuda
}  // namespace pf

#endif /* PF_FLASH_BWD_SM90_CUH */
