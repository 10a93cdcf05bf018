/*
 * flash/bwd_sm80.cuh - the FlashAttention-2 backward's main kernel for float16 /
 * bfloat16 on sm_80+ (mma.sync m16n8k16, float32 accumulation): pass 2 of the
 * backward (flash/bwd_run.cuh runs the passes; pass 1 and 3: flash/bwd_prep.cuh;
 * tiles: flash/bwd_tiles.h; the Hopper counterpart: flash/bwd_sm90.cuh).
 *
 * Layouts: FlashParams (flash/params.h); dq/dk/dv have q's/k's/v's layouts.
 * Workspace (flash/bwd_workspace.h): D = rowsum(dO * O) and lse2 = lse log2 e per
 * (head, flat row), and, unless deterministic, dq_accum f32 [rows][num_heads][kHeadDim].
 *
 * One block owns a K/V tile of kBlockN = 16 * kNWarps keys of one KV head (each
 * warp 16 keys) and loops over every query head of its group and every query tile
 * that sees the keys (attn/mask.cuh query_tiles; Q, dO, lse, D double-buffered by
 * cp.async). It works on transposed scores so that everything a warp multiplies
 * next stays in its registers:
 *   S^T  = K Q^T                 P^T = exp2(score(S^T) - lse log2 e)  (recomputed;
 *                                      attn/score.cuh, attn/softmax.cuh)
 *   dP^T = V dO^T                dS^T = P^T o (dP^T - D)            (o: elementwise)
 *   dV  += P^T dO                dK  += dS^T Q      (dK, dV in registers)
 *   dQ  += dS K: dS^T goes through shared memory (two buffers), the block splits the
 *   dQ tile among its warps (32-row warp tiles at d=64/128) and adds it to dq_accum
 *   with float32 atomics; for d = 64..128 step s's product runs after step s + 1's
 *   barrier, so a step has one block-wide barrier.
 * GQA: the group's query heads are summed in the block's registers, so dK/dV are
 * reduced per KV head with no atomics and no extra memory. Head dims > 128 run it
 * twice (BwdGrads::kDvOnly, then kDkDq) to fit the registers. Deterministic mode
 * computes dK/dV only here; flash/bwd_dq.cuh writes dQ.
 *
 * Dropout regenerates the forward's Philox mask (flash/dropout.cuh); softcap
 * multiplies dS by 1 - tanh^2; ALiBi has no gradient. Rows the forward masked
 * completely (lse = -inf) get P = 0. dK is scaled by softmax_scale at the end.
 */
#ifndef PF_FLASH_BWD_SM80_CUH
#define PF_FLASH_BWD_SM80_CUH

#include "attn/mask.cuh"
#include "attn/mma.cuh"
#include "attn/score.cuh"
#include "attn/softmax.cuh"
#include "flash/bwd_tiles.h"
#include "flash/bwd_workspace.h"
#include "flash/dropout.cuh"
#include "flash/params.h"
#include "flash/sequence.cuh"
#include "flash/tile_io.cuh"

namespace pf {
namespace cuda {

/* kGrads: which gradients this launch computes (flash/bwd_tiles.h) */
template <typename T, typename Cfg, bool Is_aligned, bool Has_extras, BwdGrads kGrads>
__global__ void __launch_bounds__(Cfg::kNThreads, Cfg::kMinBlocks)
    flash_bwd_kernel(const __grid_constant__ FlashParams p) {
    using Ops = TypeOps<T>;
    constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kHeadDim = Cfg::kHeadDim;
    constexpr int kStride = Cfg::kStride, kSStride = Cfg::kSStride, kNThreads = Cfg::kNThreads;
    constexpr int kNTm = Cfg::kNTm, kDT = Cfg::kDT, kStages = Cfg::kStages;
    constexpr bool kDoDV = kGrads != BwdGrads::kDkDq, kDoDK = kGrads != BwdGrads::kDvOnly;

    extern __shared__ __align__(16) unsigned char pf_smem[];
    T *sK = reinterpret_cast<T *>(pf_smem);
    T *sV = sK + Cfg::kKVElems;
    T *sQ0 = sV + Cfg::kKVElems;                   /* [kStages][kBlockM][kStride] */
    T *sdO0 = sQ0 + kStages * Cfg::kQElems;        /* [kStages][kBlockM][kStride] */
    T *sdS0 = sdO0 + kStages * Cfg::kQElems;       /* [kSBufs][kBlockN][kSStride] */
    float *sLse0 = reinterpret_cast<float *>(sdS0 + Cfg::kSBufs * Cfg::kSElems); /* [kStages][kBlockM] */
    float *sD0 = sLse0 + kStages * kBlockM;                      /* [kStages][kBlockM] */

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, t = lane % 4;
    const int hk = blockIdx.y, b = blockIdx.z;
    const SeqInfo si = seq_info(p, b);
    const int sq = si.sq, sk = si.sk, d = p.head_dim, G = p.head_group;
    const bool aligned = Is_aligned;
    const MaskRule mask = mask_rule(p, sk);
    const int off = sk - sq; /* query row i sits at key position i + off */
    const bool dq_atomic = kDoDK && !p.deterministic;
    const int64_t rows_total = flat_rows(p);
    const int64_t row_base = flat_row_base(p, b, si);

    const T *kb = static_cast<const T *>(p.k) + b * p.k_batch_stride + (int64_t)si.k_start * p.k_row_stride +
                  hk * p.k_head_stride;
    const T *vb = static_cast<const T *>(p.v) + b * p.v_batch_stride + (int64_t)si.k_start * p.v_row_stride +
                  hk * p.v_head_stride;

    /* per-lane ldmatrix addresses (bytes) */
    const uint32_t a_lane_off = (((lane & 7) + 8 * ((lane >> 3) & 1)) * kStride + 8 * (lane >> 4)) * 2;
    const uint32_t kA = smem_addr(sK) + warp * 16 * kStride * 2 + a_lane_off; /* K rows as A */
    const uint32_t vA = smem_addr(sV) + warp * 16 * kStride * 2 + a_lane_off; /* V rows as A */
    const uint32_t bN_off = (((lane & 7) + 8 * (lane >> 4)) * kStride + 8 * ((lane >> 3) & 1)) * 2;  /* B, rows = n */
    const uint32_t bT_off = (((lane & 7) + 8 * ((lane >> 3) & 1)) * kStride + 8 * (lane >> 4)) * 2; /* B^T, rows = k */
    constexpr int kDqRowWarps = Cfg::kDqRowWarps, kDqCols = Cfg::kDqCols, kDqRows = Cfg::kDqRows;
    constexpr int kDqMT = Cfg::kDqMT;
    const int dq_wr = warp % kDqRowWarps, dq_wc = warp / kDqRowWarps;
    const uint32_t dsA0 =
        smem_addr(sdS0) + (((lane & 7) + 8 * (lane >> 4)) * kSStride + dq_wr * kDqRows + 8 * ((lane >> 3) & 1)) * 2;
    const uint32_t kB =
        smem_addr(sK) + (((lane & 7) + 8 * ((lane >> 3) & 1)) * kStride + dq_wc * kDqCols + 8 * (lane >> 4)) * 2;

    for (int n_block = blockIdx.x; n_block * kBlockN < sk; n_block += gridDim.x) {
        const int j0 = n_block * kBlockN;
        const int keys_valid = imin(kBlockN, sk - j0);
        int m_lo, m_hi;
        /* the rule read again from the params here: not kept in registers across the step loop */
        mask_rule(p, sk).query_tiles(j0, j0 + keys_valid - 1, off, sq, kBlockM, &m_lo, &m_hi);
        const int nm = m_hi - m_lo;
        const int n_steps = G * nm;

        load_tile<kBlockN, kHeadDim, kStride, kNThreads>(sK, kb + (int64_t)j0 * p.k_row_stride, p.k_row_stride,
                                                         keys_valid, d, aligned, tid);
        load_tile<kBlockN, kHeadDim, kStride, kNThreads>(sV, vb + (int64_t)j0 * p.v_row_stride, p.v_row_stride,
                                                         keys_valid, d, aligned, tid);

        /* issue the loads of step s (query head h, tile starting at m0) into stage s % 2 */
        auto issue = [&](int s, int h, int m0) {
            const int st = s & 1;
            const int rows_valid = sq - m0;
            const T *qh = static_cast<const T *>(p.q) + b * p.q_batch_stride +
                          (int64_t)(si.q_start + m0) * p.q_row_stride + h * p.q_head_stride;
            const T *doh = static_cast<const T *>(p.dout) + b * p.do_batch_stride +
                           (int64_t)(si.q_start + m0) * p.do_row_stride + h * p.do_head_stride;
            load_tile<kBlockM, kHeadDim, kStride, kNThreads>(sQ0 + st * Cfg::kQElems, qh, p.q_row_stride, rows_valid, d,
                                                             aligned, tid);
            load_tile<kBlockM, kHeadDim, kStride, kNThreads>(sdO0 + st * Cfg::kQElems, doh, p.do_row_stride, rows_valid,
                                                             d, aligned, tid);
            /* kLse2: lse2 from pass 1; rows past the end read 0: their Q, dO and D are zero
             * too, so P = 1 there but P dO = 0 and dS = 0 */
            const float *lse0 = Cfg::kLse2
                                    ? p.dsum + bwd_lse2_offset(rows_total, p.num_heads) + h * rows_total + row_base + m0
                                    : p.lse + b * p.lse_batch_stride + h * p.lse_head_stride +
                                          (int64_t)(si.q_start + m0) * p.lse_row_stride;
            bwd_stage_rows<kBlockM>(sLse0 + st * kBlockM, sD0 + st * kBlockM, lse0, Cfg::kLse2 ? 1 : p.lse_row_stride,
                                    p.dsum + h * rows_total + row_base + m0, rows_valid, tid, kDoDK);
        };

        if (n_steps > 0) issue(0, hk * G, m_lo * kBlockM);
        cp_async_commit();
        int cur_h = hk * G, cur_m = m_lo; /* step s's head and query tile */

        float acc_dk[kDoDK ? kDT : 1][4], acc_dv[kDoDV ? kDT : 1][4];
#pragma unroll
        for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                if (kDoDK) acc_dk[dt][e] = 0.0f;
                if (kDoDV) acc_dv[dt][e] = 0.0f;
            }

        const int kj = j0 + warp * 16 + g; /* this thread's key rows: kj, kj + 8 */

        /* dQ[m0_ + kDqRows dq_wr .., kDqCols dq_wc ..] += dS K from dS^T buffer buf, by atomics */
        auto dq_product = [&](int buf, int h_, int m0_) {
            float acc_dq[kDqMT][kDqCols / 8][4];
#pragma unroll
            for (int mt = 0; mt < kDqMT; ++mt)
#pragma unroll
                for (int dt = 0; dt < kDqCols / 8; ++dt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc_dq[mt][dt][e] = 0.0f;
            const uint32_t dsA = dsA0 + buf * (Cfg::kSElems * 2);
#pragma unroll
            for (int kk = 0; kk < kBlockN / 16; ++kk) {
                uint32_t a[kDqMT][4];
#pragma unroll
                for (int mt = 0; mt < kDqMT; ++mt) ldmatrix_x4_trans(a[mt], dsA + (kk * 16 * kSStride + mt * 16) * 2);
#pragma unroll
                for (int dp = 0; dp < kDqCols / 16; ++dp) {
                    uint32_t bf[4];
                    ldmatrix_x4_trans(bf, kB + (kk * 16 * kStride + dp * 16) * 2);
#pragma unroll
                    for (int mt = 0; mt < kDqMT; ++mt) {
                        Ops::mma(acc_dq[mt][2 * dp], a[mt], bf[0], bf[1]);
                        Ops::mma(acc_dq[mt][2 * dp + 1], a[mt], bf[2], bf[3]);
                    }
                }
            }
#pragma unroll
            for (int mt = 0; mt < kDqMT; ++mt)
#pragma unroll
                for (int hf = 0; hf < 2; ++hf) {
                    const int r = m0_ + dq_wr * kDqRows + mt * 16 + g + 8 * hf;
                    if (r < sq) {
                        float *dst =
                            p.dq_accum + ((row_base + r) * p.num_heads + h_) * kHeadDim + dq_wc * kDqCols + 2 * t;
#pragma unroll
                        for (int dt = 0; dt < kDqCols / 8; ++dt)
                            atomic_add_float2(dst + dt * 8, acc_dq[mt][dt][2 * hf], acc_dq[mt][dt][2 * hf + 1]);
                    }
                }
        };
        int prev_h = 0, prev_m0 = 0; /* step s - 1's head and first query (deferred dQ) */

#pragma unroll 1
        for (int s = 0; s < n_steps; ++s) {
            const int st = s & 1;
            const int h = cur_h, m0 = cur_m * kBlockM;
            if (++cur_m == m_hi) {
                cur_m = m_lo;
                ++cur_h;
            }
            cp_async_wait<0>();
            __syncthreads(); /* step s landed; every warp is done with step s - 1 */
            if (s + 1 < n_steps) issue(s + 1, cur_h, cur_m * kBlockM);
            cp_async_commit();
            static_assert(kStages == 2, "the issue/consume order assumes double buffering");
            /* step s - 1's dQ: its dS^T is complete (barrier above); step s writes the other buffer */
            if (Cfg::kDeferDq && dq_atomic && s > 0) dq_product((s - 1) & 1, prev_h, prev_m0);

            const uint32_t qS = smem_addr(sQ0 + st * Cfg::kQElems);
            const uint32_t doS = smem_addr(sdO0 + st * Cfg::kQElems);
            const float *sLse = sLse0 + st * kBlockM;
            const float *sD = sD0 + st * kBlockM;
            const uint64_t bh = (uint64_t)b * p.num_heads + h;
            const float alibi_log2 = Has_extras ? p.score.alibi_log2(b, h) : 0.0f;

            /* S^T = K Q^T (16 keys x kBlockM queries per warp) */
            float sP[kNTm][4];
#pragma unroll
            for (int nt = 0; nt < kNTm; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) sP[nt][e] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < kHeadDim / 16; ++kk) {
                uint32_t a[4];
                ldmatrix_x4(a, kA + kk * 32);
#pragma unroll
                for (int np = 0; np < kNTm / 2; ++np) {
                    uint32_t bq[4];
                    ldmatrix_x4(bq, qS + bN_off + (np * 16 * kStride + kk * 16) * 2);
                    Ops::mma(sP[2 * np], a, bq[0], bq[1]);
                    Ops::mma(sP[2 * np + 1], a, bq[2], bq[3]);
                }
            }

            /* P^T = exp2(score - lse), masked; dtanh for softcap */
            const bool need_mask = mask.tile_needs_mask(j0, kBlockN, m0, m0 + kBlockM - 1, off);
            float dth[Has_extras ? kNTm : 1][4];
#pragma unroll
            for (int nt = 0; nt < kNTm; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int j = kj + 8 * (e / 2);
                    const int ci = nt * 8 + 2 * t + (e & 1);
                    const int i = m0 + ci;
                    float lse_v = sLse[ci];
                    /* rows past the end and rows the forward masked completely: P = 0 (kLse2: done in pass 1) */
                    if (!Cfg::kLse2) lse_v = lse_to_log2(lse_v, ci < sq - m0);
                    float dt_v;
                    const float x = score_to_log2<Has_extras>(p.score, sP[nt][e], alibi_log2, i + off - j, &dt_v);
                    if (Has_extras) dth[nt][e] = dt_v;
                    sP[nt][e] = fast_exp2(x - lse_v);
                }
            if (need_mask) { /* only tiles that cross a causal/window/length boundary */
#pragma unroll
                for (int nt = 0; nt < kNTm; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int j = kj + 8 * (e / 2);
                        const int i = m0 + nt * 8 + 2 * t + (e & 1);
                        const int lo = mask.lo(i + off), hi = mask.hi(i + off);
                        if (j < lo || j > hi) sP[nt][e] = 0.0f;
                    }
            }

            /* dP^T = V dO^T */
            float sdP[kDoDK ? kNTm : 1][4];
            if (kDoDK) {
#pragma unroll
                for (int nt = 0; nt < kNTm; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) sdP[nt][e] = 0.0f;
#pragma unroll
                for (int kk = 0; kk < kHeadDim / 16; ++kk) {
                    uint32_t a[4];
                    ldmatrix_x4(a, vA + kk * 32);
#pragma unroll
                    for (int np = 0; np < kNTm / 2; ++np) {
                        uint32_t bq[4];
                        ldmatrix_x4(bq, doS + bN_off + (np * 16 * kStride + kk * 16) * 2);
                        Ops::mma(sdP[2 * np], a, bq[0], bq[1]);
                        Ops::mma(sdP[2 * np + 1], a, bq[2], bq[3]);
                    }
                }
            }

            /* dropout: P_drop = P keep / (1 - p) feeds dV; dP is masked and scaled alike */
            bool keep_bits[Has_extras ? kNTm : 1][4];
            if (Has_extras && p.drop_threshold) {
#pragma unroll
                for (int nt = 0; nt < kNTm; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        keep_bits[nt][e] = dropout_keep(p, bh, m0 + nt * 8 + 2 * t + (e & 1), kj + 8 * (e / 2));
            }

            /* dV += P_drop^T dO */
            if (kDoDV) {
#pragma unroll
                for (int kk = 0; kk < kBlockM / 16; ++kk) {
                    float pv[2][4];
#pragma unroll
                    for (int x = 0; x < 2; ++x)
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            float v = sP[2 * kk + x][e];
                            if (Has_extras && p.drop_threshold) v = keep_bits[2 * kk + x][e] ? v * p.drop_scale : 0.0f;
                            pv[x][e] = v;
                        }
                    uint32_t a[4];
                    a[0] = Ops::pack(pv[0][0], pv[0][1]);
                    a[1] = Ops::pack(pv[0][2], pv[0][3]);
                    a[2] = Ops::pack(pv[1][0], pv[1][1]);
                    a[3] = Ops::pack(pv[1][2], pv[1][3]);
#pragma unroll
                    for (int dp = 0; dp < kDT / 2; ++dp) {
                        uint32_t bf[4];
                        ldmatrix_x4_trans(bf, doS + bT_off + (kk * 16 * kStride + dp * 16) * 2);
                        Ops::mma(acc_dv[2 * dp], a, bf[0], bf[1]);
                        Ops::mma(acc_dv[2 * dp + 1], a, bf[2], bf[3]);
                    }
                }
            }

            if (kDoDK) {
                /* dS^T = P^T o (dP^T - D) (o dtanh) */
#pragma unroll
                for (int nt = 0; nt < kNTm; ++nt) {
                    const float2 dd = *reinterpret_cast<const float2 *>(sD + nt * 8 + 2 * t);
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        float dpv = sdP[nt][e];
                        if (Has_extras && p.drop_threshold) dpv = keep_bits[nt][e] ? dpv * p.drop_scale : 0.0f;
                        float ds = sP[nt][e] * (dpv - ((e & 1) ? dd.y : dd.x));
                        if (Has_extras) ds *= dth[nt][e];
                        sP[nt][e] = ds;
                    }
                }
                /* dK += dS^T Q */
#pragma unroll
                for (int kk = 0; kk < kBlockM / 16; ++kk) {
                    uint32_t a[4];
                    a[0] = Ops::pack(sP[2 * kk][0], sP[2 * kk][1]);
                    a[1] = Ops::pack(sP[2 * kk][2], sP[2 * kk][3]);
                    a[2] = Ops::pack(sP[2 * kk + 1][0], sP[2 * kk + 1][1]);
                    a[3] = Ops::pack(sP[2 * kk + 1][2], sP[2 * kk + 1][3]);
                    if (dq_atomic) {
                        /* dS^T to shared memory for the dQ product (same rounding as used for dK) */
                        const int r = warp * 16 + g;
                        T *sdS = sdS0 + (Cfg::kDeferDq ? st : 0) * Cfg::kSElems;
                        *reinterpret_cast<uint32_t *>(sdS + r * kSStride + kk * 16 + 2 * t) = a[0];
                        *reinterpret_cast<uint32_t *>(sdS + (r + 8) * kSStride + kk * 16 + 2 * t) = a[1];
                        *reinterpret_cast<uint32_t *>(sdS + r * kSStride + kk * 16 + 8 + 2 * t) = a[2];
                        *reinterpret_cast<uint32_t *>(sdS + (r + 8) * kSStride + kk * 16 + 8 + 2 * t) = a[3];
                    }
#pragma unroll
                    for (int dp = 0; dp < kDT / 2; ++dp) {
                        uint32_t bf[4];
                        ldmatrix_x4_trans(bf, qS + bT_off + (kk * 16 * kStride + dp * 16) * 2);
                        Ops::mma(acc_dk[2 * dp], a, bf[0], bf[1]);
                        Ops::mma(acc_dk[2 * dp + 1], a, bf[2], bf[3]);
                    }
                }

                if (!Cfg::kDeferDq && dq_atomic) {
                    __syncthreads(); /* dS^T complete */
                    dq_product(0, h, m0);
                }
            }
            prev_h = h;
            prev_m0 = m0;
        }
        if (Cfg::kDeferDq && dq_atomic && n_steps > 0) {
            __syncthreads(); /* the last step's dS^T complete */
            dq_product((n_steps - 1) & 1, prev_h, prev_m0);
        }

        /* epilogue: dK * scale, dV, staged in sK / sV, then 16-byte stores */
        cp_async_wait<0>();
        __syncthreads(); /* every warp is done with sK, sV */
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int r = warp * 16 + g + 8 * hf;
#pragma unroll
            for (int dt = 0; dt < kDT; ++dt) {
                if (kDoDK)
                    *reinterpret_cast<uint32_t *>(sK + r * kStride + dt * 8 + 2 * t) = Ops::pack(
                        acc_dk[dt][2 * hf] * p.score.softmax_scale, acc_dk[dt][2 * hf + 1] * p.score.softmax_scale);
                if (kDoDV)
                    *reinterpret_cast<uint32_t *>(sV + r * kStride + dt * 8 + 2 * t) =
                        Ops::pack(acc_dv[dt][2 * hf], acc_dv[dt][2 * hf + 1]);
            }
        }
        __syncthreads();
        if (kDoDK) {
            T *dkb = static_cast<T *>(p.dk) + b * p.dk_batch_stride + (int64_t)(si.k_start + j0) * p.dk_row_stride +
                     hk * p.dk_head_stride;
            store_tile<kBlockN, kHeadDim, kStride, kNThreads>(dkb, p.dk_row_stride, sK, keys_valid, d, aligned, tid);
        }
        if (kDoDV) {
            T *dvb = static_cast<T *>(p.dv) + b * p.dv_batch_stride + (int64_t)(si.k_start + j0) * p.dv_row_stride +
                     hk * p.dv_head_stride;
            store_tile<kBlockN, kHeadDim, kStride, kNThreads>(dvb, p.dv_row_stride, sV, keys_valid, d, aligned, tid);
        }
        __syncthreads(); /* sK / sV are reloaded by the next key block (varlen) */
    }
}

}  // namespace cuda
}  // namespace pf

#endif /* PF_FLASH_BWD_SM80_CUH */
