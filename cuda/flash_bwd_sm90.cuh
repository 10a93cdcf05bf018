/*
 * flash_bwd_sm90.cuh - the Hopper (sm_90a, wgmma) main kernel of the backward:
 * the same contract as flash_bwd_kernel (flash_bwd.cuh: pass 2, dK/dV written,
 * dQ added to dq_accum by float32 atomics), used by flash_bwd_run on compute
 * capability 9.x for head dims 64 / 128, 16-bit types, aligned tensors, no
 * softcap / ALiBi / dropout, non-deterministic mode; everything else keeps the
 * sm_80 kernel. Included by flash_bwd.cuh (uses its pass-1 workspace: D and
 * lse2 = lse log2 e, +inf on fully masked rows).
 *
 * A block (2 warpgroups, 256 threads, 1 block per SM) owns kBlockN = 128 keys
 * of one KV head, 64 per warpgroup, and walks every query head of the group and
 * every query tile of kBlockM rows that sees the keys. Shared memory holds K, V,
 * two stages of Q / dO / lse2 / D (cp.async, zero fill) and two dS^T buffers,
 * all as 128-byte swizzled tiles (sm90.cuh). Per step and warpgroup:
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
 * query heads are summed in the registers like the sm_80 kernel. Passes 1 and 3 are
 * vectorized versions of flash_bwd.cuh's (same workspace layout).
 *
 * Tiles: d = 128: 64 queries per step (S^T 32 + dP^T 32 + dK 64 + dV 64 accumulators per
 * thread); d = 64: 128 queries per step (S^T 64 + dP^T 64 + dK 32 + dV 32; the dQ product
 * then splits rows, each warpgroup N = 64). Both: 255 registers, 60-72 bytes of spills
 * (2-8 local loads per step), 162 KB of shared memory, 1 block per SM, no "wgmma
 * serialized" warnings, 40 HGMMA in the SASS.
 * Measured on H200 (benchmarks/results/bwd_sm90_h200.md, bf16, 16k tokens, s = 512..16k):
 * 1.01-1.26x FlashAttention-2 (SDPA FLASH_ATTENTION; thinnest at s = 512 causal),
 * 1.30-1.57x the sm_80 kernel, 0.6-0.8x cuDNN.
 * Tried and not kept (same-run A/B, H200, bf16 16k tokens): a persistent variant (one
 * block per SM taking tiles from an atomic counter, K / V double-buffered and the next
 * tile's K / V / Q / dO loaded during the last step, dK / dV stored from the registers):
 * d = 64 +5..7% at s >= 2k non-causal but -6% at s = 512 causal; d = 128 -4..-13% (also
 * with the prefetch off, so the loss is in the step loop, not in the scheduling);
 * cudaMemsetAsync for dq_accum instead of zeroing it in pass 1: no difference.
 */
#ifndef PF_FLASH_BWD_SM90_CUH
#define PF_FLASH_BWD_SM90_CUH

#include "attn/sm90.cuh"

namespace pf {
namespace cuda {

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
    const int off = sk - sq;
    const bool has_lo = p.window_left >= 0;
    const bool has_hi = p.causal || p.window_right >= 0;
    const int left = p.window_left, right = p.causal ? 0 : p.window_right;
    const int64_t rows_total = p.varlen ? p.total_q : (int64_t)p.batch * p.seqlen_q;
    const int64_t row_base = p.varlen ? si.q_start : (int64_t)b * p.seqlen_q;
    const float scale_log2 = p.scale_log2;

    const T *kb = static_cast<const T *>(p.k) + b * p.k_batch_stride + (int64_t)si.k_start * p.k_row_stride +
                  hk * p.k_head_stride;
    const T *vb = static_cast<const T *>(p.v) + b * p.v_batch_stride + (int64_t)si.k_start * p.v_row_stride +
                  hk * p.v_head_stride;

    for (int n_block = blockIdx.x; n_block * kBlockN < sk; n_block += gridDim.x) {
        const int j0 = n_block * kBlockN;
        const int keys_valid = imin(kBlockN, sk - j0);
        int m_lo, m_hi;
        bwd_query_tiles(p, sq, sk, j0, keys_valid, kBlockM, &m_lo, &m_hi);
        const int nm = m_hi - m_lo;
        const int n_steps = G * nm;

        load_swizzled<kBlockN, kHeadDim, 256, T>(sK, kb + (int64_t)j0 * p.k_row_stride, p.k_row_stride, keys_valid,
                                                 d, tid);
        load_swizzled<kBlockN, kHeadDim, 256, T>(sV, vb + (int64_t)j0 * p.v_row_stride, p.v_row_stride, keys_valid,
                                                 d, tid);

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
                        atomic_add2(dst + 8 * j, acc[4 * j + 2 * hf], acc[4 * j + 2 * hf + 1]);
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
            const bool need_mask = keys_valid < kBlockN || (has_hi && m0 + off + right < j0 + kBlockN - 1) ||
                                   (has_lo && m0 + kBlockM - 1 + off - left > j0);
            if (need_mask) {
#pragma unroll
                for (int j = 0; j < kBlockM / 8; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int jk = kj + 8 * (e / 2);
                        const int i = m0 + 8 * j + 2 * t + (e & 1);
                        const int lo = has_lo ? i + off - left : 0;
                        const int hi = has_hi ? imin(sk - 1, i + off + right) : sk - 1;
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
                for (int e = 0; e < 4; ++e) accP[4 * j + e] = accS[4 * j + e] * (accP[4 * j + e] - ((e & 1) ? dd.y : dd.x));
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
                *reinterpret_cast<uint32_t *>(base + Cfg::kOffK + o) =
                    Ops::pack(acc_dk[4 * j + 2 * hf] * p.softmax_scale, acc_dk[4 * j + 2 * hf + 1] * p.softmax_scale);
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

/* Passes 1 and 3 for the calls this kernel takes (aligned, non-deterministic; rows * heads
 * * d / 8 < 2^31): one thread per 16-byte chunk (8 elements) of a (row, head), so every access
 * of O, dO, dq_accum and dq is a 16-byte vector (1.6-3.9x faster than the scalar passes on
 * H200: 72-80 us vs 108-206 us for the pre-pass, 46 vs 184 us for the convert). Same results
 * as bwd_prep_kernel / bwd_convert_dq_kernel (D summed in another order). */
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(256) bwd_prep_sm90_kernel(const __grid_constant__ FlashParams p, int rows) {
    constexpr int C = kHeadDim / 8; /* chunks per (row, head): 8 or 16, a power of two */
    const int H = p.num_heads, d = p.head_dim;
    const int total = rows * H * C;
    const int64_t lse2_off = bwd_lse2_offset(rows, H);
    /* whole warps iterate together (the shuffles below): the bound is rounded up to 32 */
    const int bound = (total + 31) & ~31;
    for (int w = blockIdx.x * blockDim.x + threadIdx.x; w < bound; w += gridDim.x * blockDim.x) {
        const bool valid = w < total;
        /* head-major (h, r, c): the lse reads and D / lse2 writes of a warp are contiguous */
        const int c = w % C;
        const int hr = w / C;
        const int r = hr % rows, h = hr / rows;
        int b, i;
        bwd_row_position(p, r, b, i);
        float acc = 0.0f;
        if (valid && c * 8 < d) {
            const uint4 o = *reinterpret_cast<const uint4 *>(static_cast<const T *>(p.o) + b * p.o_batch_stride +
                                                             (int64_t)i * p.o_row_stride + h * p.o_head_stride + c * 8);
            const uint4 g = *reinterpret_cast<const uint4 *>(static_cast<const T *>(p.dout) + b * p.do_batch_stride +
                                                             (int64_t)i * p.do_row_stride + h * p.do_head_stride +
                                                             c * 8);
            const T *oe = reinterpret_cast<const T *>(&o);
            const T *ge = reinterpret_cast<const T *>(&g);
#pragma unroll
            for (int x = 0; x < 8; ++x) acc += TypeOps<T>::to_float(oe[x]) * TypeOps<T>::to_float(ge[x]);
        }
#pragma unroll
        for (int x = C / 2; x > 0; x >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, x, C);
        if (!valid) continue;
        if (c == 0) p.dsum[(int64_t)h * rows + r] = acc;
        if (c == 1) {
            const float l = p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + i * p.lse_row_stride];
            p.dsum[lse2_off + (int64_t)h * rows + r] = l == -INFINITY ? INFINITY : l * kLog2e;
        }
        float4 *dq = reinterpret_cast<float4 *>(p.dq_accum + ((int64_t)r * H + h) * kHeadDim + c * 8);
        dq[0] = make_float4(0.f, 0.f, 0.f, 0.f);
        dq[1] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(256) bwd_convert_dq_sm90_kernel(const __grid_constant__ FlashParams p, int rows) {
    constexpr int C = kHeadDim / 8;
    const int H = p.num_heads, d = p.head_dim;
    const int total = rows * H * C;
    for (int w = blockIdx.x * blockDim.x + threadIdx.x; w < total; w += gridDim.x * blockDim.x) {
        const int c = w % C;
        if (c * 8 >= d) continue;
        const int rh = w / C;
        const int h = rh % H, r = rh / H;
        int b, i;
        bwd_row_position(p, r, b, i);
        const float4 *src = reinterpret_cast<const float4 *>(p.dq_accum + (int64_t)w * 8);
        const float4 x0 = src[0], x1 = src[1];
        const float sc = p.softmax_scale;
        uint4 v;
        v.x = TypeOps<T>::pack(x0.x * sc, x0.y * sc);
        v.y = TypeOps<T>::pack(x0.z * sc, x0.w * sc);
        v.z = TypeOps<T>::pack(x1.x * sc, x1.y * sc);
        v.w = TypeOps<T>::pack(x1.z * sc, x1.w * sc);
        *reinterpret_cast<uint4 *>(static_cast<T *>(p.dq) + b * p.dq_batch_stride + (int64_t)i * p.dq_row_stride +
                                   h * p.dq_head_stride + c * 8) = v;
    }
}

template <typename T, int kHeadDim>
pf_status launch_bwd_sm90(const FlashParams &p, cudaStream_t stream, int device) {
    using Cfg = typename Bwd90Tile<kHeadDim>::type;
    static std::atomic<uint64_t> done{0};
    const int blocks = (p.max_seqlen_k + Cfg::kBlockN - 1) / Cfg::kBlockN;
    dim3 grid(blocks > 0 ? blocks : 1, p.num_kv_heads, p.batch);
    return launch_smem_kernel(flash_bwd_sm90_kernel<T, Cfg>, grid, Cfg::kNThreads, Cfg::kSmemBytes, stream, device,
                              done, p, "flash_bwd_sm90_kernel");
}

/* Passes 1-3 on the sm_90a path (workspace set up by flash_bwd_run). */
template <typename T, int kHeadDim>
pf_status flash_bwd_sm90_passes(const FlashParams &p, int64_t rows, int sms, cudaStream_t stream, int device) {
    constexpr int C = kHeadDim / 8;
    const int64_t chunks = rows * p.num_heads * C;
    const int blocks = (int)((chunks + 255) / 256 < (int64_t)sms * 16 ? (chunks + 255) / 256 : (int64_t)sms * 16);
    bwd_prep_sm90_kernel<T, kHeadDim><<<blocks > 0 ? blocks : 1, 256, 0, stream>>>(p, (int)rows);
    PF_CUDA_CHECK_LAUNCH("bwd_prep_sm90_kernel");
    PF_TRY((launch_bwd_sm90<T, kHeadDim>(p, stream, device)));
    bwd_convert_dq_sm90_kernel<T, kHeadDim><<<blocks > 0 ? blocks : 1, 256, 0, stream>>>(p, (int)rows);
    PF_CUDA_CHECK_LAUNCH("bwd_convert_dq_sm90_kernel");
    return PF_STATUS_OK;
}

/* Does the sm_90a main kernel take this call? (the caller checked sm90_available) */
template <typename T, int kHeadDim>
constexpr bool bwd_sm90_has_tile() {
    return (kHeadDim == 64 || kHeadDim == 128) && sizeof(T) == 2;
}

}  // namespace cuda
}  // namespace pf

#endif /* PF_FLASH_BWD_SM90_CUH */
