/*
 * flash_bwd.cuh - FlashAttention-2 backward for float16 / bfloat16 on sm_80+
 * (mma.sync m16n8k16, float32 accumulation).
 *
 * Layouts: FlashParams (flash_params.h); dq/dk/dv have q's/k's/v's layouts.
 * Workspace (workspace.h): dsum f32 [num_heads][rows] (D = rowsum(dO * O)), then
 * lse2 f32 [num_heads][rows] (lse log2 e, +inf on fully masked rows; at
 * bwd_lse2_offset) and, unless deterministic, dq_accum f32
 * [rows][num_heads][kHeadDim], where rows =
 * batch * seqlen_q (dense) or total_q (varlen) and a row is b * seqlen_q + i or
 * cu_seqlens_q[b] + i.
 *
 * Passes, all on the caller's stream:
 *   1. bwd_prep_kernel: D = rowsum(dO * O) and lse2 per (row, head); zeroes dq_accum.
 *   2. flash_bwd_kernel: one block owns a K/V tile of kBlockN = 16 * kNWarps keys
 *      of one KV head (each warp 16 keys) and loops over every query head of its
 *      group and every query tile that sees the keys (Q, dO, lse, D double-buffered
 *      by cp.async). It works on transposed scores so that everything a warp
 *      multiplies next stays in its registers:
 *        S^T  = K Q^T                 P^T = exp2(S^T log2e - lse log2e)  (recomputed)
 *        dP^T = V dO^T                dS^T = P^T o (dP^T - D)            (o: elementwise)
 *        dV  += P^T dO                dK  += dS^T Q      (dK, dV in registers)
 *        dQ  += dS K: dS^T goes through shared memory (two buffers), the block
 *        splits the dQ tile among its warps (32-row warp tiles at d=64/128) and
 *        adds it to dq_accum with float32 atomics; for d = 64..128 step s's product
 *        runs after step s + 1's barrier, so a step has one block-wide barrier.
 *      GQA: the group's query heads are summed in the block's registers, so dK/dV
 *      are reduced per KV head with no atomics and no extra memory.
 *      Head dims > 128 run it twice (dV only, then dK + dQ) to fit the registers.
 *   3. bwd_convert_dq_kernel: dq = dq_accum * softmax_scale in the input dtype.
 * Deterministic mode skips the atomics: pass 2 computes dK/dV only and
 * flash_bwd_dq_kernel, which owns a query tile and walks the key tiles
 * (recomputing S and dP), writes dQ directly. Both are then bitwise
 * reproducible.
 *
 * On Hopper (sm90_available) flash_bwd_run hands aligned, non-deterministic float16 /
 * bfloat16 calls at head dims 64 / 128 without softcap, ALiBi or dropout to
 * flash_bwd_sm90.cuh (wgmma main kernel, vectorized passes 1 and 3).
 *
 * Dropout regenerates the forward's Philox mask (pagedflash_philox.h); softcap
 * multiplies dS by 1 - tanh^2; ALiBi has no gradient. Rows the forward masked
 * completely (lse = -inf) get P = 0. dK and dQ are scaled by softmax_scale at
 * the end.
 */
#ifndef PF_FLASH_BWD_CUH
#define PF_FLASH_BWD_CUH

#include <cstdio>
#include <cstdlib>
#include <type_traits>

#include "attn/mask.cuh"
#include "attn/mma.cuh"
#include "common/cuda_util.cuh"
#include "flash_fwd.cuh"
#include "flash_params.h"
#include "pagedflash_philox.h"

namespace pf {
namespace cuda {

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

PF_DEV void cp_async_4(uint32_t dst, const void *src, bool pred) {
    int src_size = pred ? 4 : 0;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(src_size) : "memory");
}

/* Stage a query tile's per-row lse (row r at lse0 + r * lse_stride) and, with with_d, its
 * D (row r at d0 + r) into shared memory with cp.async: threads [0, kBlockM) copy the lse,
 * threads [kBlockM, 2 kBlockM) the D. Rows past rows_valid land as zeros (row 0's address
 * is passed but not read). */
template <int kBlockM>
PF_DEV void bwd_stage_rows(float *sLse, float *sD, const float *lse0, int64_t lse_stride, const float *d0,
                           int rows_valid, int tid, bool with_d) {
    if (tid < kBlockM) {
        const bool ok = tid < rows_valid;
        cp_async_4(smem_addr(sLse + tid), lse0 + (ok ? tid : 0) * lse_stride, ok);
    } else if (with_d && tid < 2 * kBlockM) {
        const int r = tid - kBlockM;
        const bool ok = r < rows_valid;
        cp_async_4(smem_addr(sD + r), d0 + (ok ? r : 0), ok);
    }
}

/* dst[0..1] += v0, v1 (float32, global) */
PF_DEV void atomic_add2(float *dst, float v0, float v1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(dst), "f"(v0), "f"(v1) : "memory");
#else
    atomicAdd(dst, v0);
    atomicAdd(dst + 1, v1);
#endif
}

/* Visible query range [i_begin, i_end) for keys [j0, j_last]. */
PF_DEV void bwd_query_range(const FlashParams &p, int sq, int sk, int j0, int j_last, int *i_begin, int *i_end) {
    const int off = sk - sq;
    const bool has_lo = p.window_left >= 0;
    const bool has_hi = p.causal || p.window_right >= 0;
    const int right = p.causal ? 0 : p.window_right;
    *i_begin = has_hi ? imax(0, j0 - off - right) : 0;
    *i_end = has_lo ? imin(sq, j_last + p.window_left - off + 1) : sq;
}

/* The query tiles [*m_lo, *m_hi) of kBlockM rows that see keys [j0, j0 + keys_valid). */
PF_DEV void bwd_query_tiles(const FlashParams &p, int sq, int sk, int j0, int keys_valid, int kBlockM, int *m_lo,
                            int *m_hi) {
    int i_begin, i_end;
    bwd_query_range(p, sq, sk, j0, j0 + keys_valid - 1, &i_begin, &i_end);
    *m_lo = i_begin / kBlockM;
    *m_hi = i_end > i_begin ? (i_end + kBlockM - 1) / kBlockM : *m_lo;
}

/* ------------------------------------------------------------------------ */
/* pass 1: D = rowsum(dO * O), lse2 = lse log2(e), dq_accum = 0               */
/* ------------------------------------------------------------------------ */

/* Workspace offset (floats) of lse2 [num_heads][rows], after D (256-byte aligned). */
__host__ __device__ inline int64_t bwd_lse2_offset(int64_t rows, int num_heads) {
    return (rows * num_heads + 63) & ~(int64_t)63;
}

/* Flat query row r (the rows of every sequence one after another) -> sequence b and row i
 * in it; varlen layouts address their packed rows directly (b = 0, i = r). */
template <typename I>
PF_DEV void bwd_row_position(const FlashParams &p, I r, I &b, I &i) {
    b = 0;
    i = r;
    if (!p.varlen) {
        b = r / p.seqlen_q;
        i = r - b * p.seqlen_q;
    }
}

template <typename T>
__global__ void __launch_bounds__(256) bwd_prep_kernel(const __grid_constant__ FlashParams p, int64_t rows,
                                                       int zero_dq) {
    const int lane = threadIdx.x % 32;
    const int64_t warps = (int64_t)gridDim.x * (blockDim.x / 32);
    const int H = p.num_heads, d = p.head_dim, hd = p.head_dim_rounded;
    for (int64_t w = blockIdx.x * (int64_t)(blockDim.x / 32) + threadIdx.x / 32; w < rows * H; w += warps) {
        const int64_t r = w / H;
        const int h = (int)(w % H);
        int64_t b, i;
        bwd_row_position(p, r, b, i);
        const T *o = static_cast<const T *>(p.o) + b * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
        const T *dout = static_cast<const T *>(p.dout) + b * p.do_batch_stride + i * p.do_row_stride +
                        h * p.do_head_stride;
        float acc = 0.0f;
        for (int c = lane; c < d; c += 32) acc += TypeOps<T>::to_float(o[c]) * TypeOps<T>::to_float(dout[c]);
#pragma unroll
        for (int x = 16; x > 0; x >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, x);
        if (lane == 0) p.dsum[h * rows + r] = acc;
        if (lane == 1) { /* lse2 = lse log2(e) (+inf for rows the forward masked completely: P = 0) */
            const float l = p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + i * p.lse_row_stride];
            p.dsum[bwd_lse2_offset(rows, H) + h * rows + r] = l == -INFINITY ? INFINITY : l * kLog2e;
        }
        if (zero_dq) {
            float *dq = p.dq_accum + (r * H + h) * hd;
            for (int c = lane; c < hd; c += 32) dq[c] = 0.0f;
        }
    }
}

/* pass 3: dq = dq_accum * scale */
template <typename T>
__global__ void __launch_bounds__(256) bwd_convert_dq_kernel(const __grid_constant__ FlashParams p, int64_t rows) {
    const int H = p.num_heads, d = p.head_dim, hd = p.head_dim_rounded;
    const int64_t n = rows * H * d;
    for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < n; idx += (int64_t)gridDim.x * blockDim.x) {
        const int c = (int)(idx % d);
        const int64_t rh = idx / d;
        const int h = (int)(rh % H);
        const int64_t r = rh / H;
        int64_t b, i;
        bwd_row_position(p, r, b, i);
        T *dq = static_cast<T *>(p.dq) + b * p.dq_batch_stride + i * p.dq_row_stride + h * p.dq_head_stride;
        dq[c] = TypeOps<T>::from_float(p.dq_accum[(r * H + h) * hd + c] * p.softmax_scale);
    }
}

/* ------------------------------------------------------------------------ */
/* score transform shared by the backward kernels                             */
/* ------------------------------------------------------------------------ */

/* x (raw q.k) -> log2-domain score; *dtanh = d(score)/d(raw) / softmax_scale */
template <bool Has_extras>
PF_DEV float bwd_score(const FlashParams &p, float x, float alibi_log2, int dist, float *dtanh) {
    if (!Has_extras) {
        *dtanh = 1.0f;
        return x * p.scale_log2;
    }
    float y;
    if (p.softcap > 0.0f) {
        const float th = tanh_abs_accurate(x * p.softcap_inv_scale);
        *dtanh = 1.0f - th * th;
        y = p.softcap_log2 * th;
    } else {
        *dtanh = 1.0f;
        y = x * p.scale_log2;
    }
    if (p.alibi) y -= alibi_log2 * (float)abs(dist);
    return y;
}

PF_DEV bool dropout_keep(const FlashParams &p, uint64_t bh, int i, int j) {
    const pf_u32x4 r = pf_dropout_bits4(p.seed, p.offset, bh, i, j & ~3);
    const uint32_t w = (j & 2) ? ((j & 1) ? r.w : r.z) : ((j & 1) ? r.y : r.x);
    return w >= p.drop_threshold;
}

/* ------------------------------------------------------------------------ */
/* pass 2: dK, dV (and dQ by atomics)                                         */
/* ------------------------------------------------------------------------ */

/* kMode: 0 = dK + dV (+ dQ), 1 = dV only, 2 = dK (+ dQ) only */
template <typename T, typename Cfg, bool Is_aligned, bool Has_extras, int kMode>
__global__ void __launch_bounds__(Cfg::kNThreads, Cfg::kMinBlocks)
    flash_bwd_kernel(const __grid_constant__ FlashParams p) {
    using Ops = TypeOps<T>;
    constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kHeadDim = Cfg::kHeadDim;
    constexpr int kStride = Cfg::kStride, kSStride = Cfg::kSStride, kNThreads = Cfg::kNThreads;
    constexpr int kNTm = Cfg::kNTm, kDT = Cfg::kDT, kStages = Cfg::kStages;
    constexpr bool kDoDV = kMode != 2, kDoDK = kMode != 1;

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
    const int off = sk - sq;
    const bool has_lo = p.window_left >= 0;
    const bool has_hi = p.causal || p.window_right >= 0;
    const int left = p.window_left, right = p.causal ? 0 : p.window_right;
    const bool dq_atomic = kDoDK && !p.deterministic;
    const int64_t rows_total = p.varlen ? p.total_q : (int64_t)p.batch * p.seqlen_q;
    const int64_t row_base = p.varlen ? si.q_start : (int64_t)b * p.seqlen_q;

    const T *kb = static_cast<const T *>(p.k) + b * p.k_batch_stride + (int64_t)si.k_start * p.k_row_stride +
                  hk * p.k_head_stride;
    const T *vb = static_cast<const T *>(p.v) + b * p.v_batch_stride + (int64_t)si.k_start * p.v_row_stride +
                  hk * p.v_head_stride;

    /* per-lane ldmatrix addresses (bytes) */
    const uint32_t a_lane_off = (((lane & 7) + 8 * ((lane >> 3) & 1)) * kStride + 8 * (lane >> 4)) * 2;
    const uint32_t kA = smem_addr(sK) + warp * 16 * kStride * 2 + a_lane_off; /* K rows as A */
    const uint32_t vA = smem_addr(sV) + warp * 16 * kStride * 2 + a_lane_off; /* V rows as A */
    const uint32_t bN_off = (((lane & 7) + 8 * (lane >> 4)) * kStride + 8 * ((lane >> 3) & 1)) * 2;  /* B, rows = n */
    const uint32_t bT_off = (((lane & 7) + 8 * ((lane >> 3) & 1)) * kStride + 8 * (lane >> 4)) * 2;  /* B^T, rows = k */
    constexpr int kDqRowWarps = Cfg::kDqRowWarps, kDqCols = Cfg::kDqCols, kDqRows = Cfg::kDqRows;
    constexpr int kDqMT = Cfg::kDqMT;
    const int dq_wr = warp % kDqRowWarps, dq_wc = warp / kDqRowWarps;
    const uint32_t dsA0 = smem_addr(sdS0) +
        (((lane & 7) + 8 * (lane >> 4)) * kSStride + dq_wr * kDqRows + 8 * ((lane >> 3) & 1)) * 2;
    const uint32_t kB = smem_addr(sK) + (((lane & 7) + 8 * ((lane >> 3) & 1)) * kStride + dq_wc * kDqCols +
                                         8 * (lane >> 4)) * 2;

    for (int n_block = blockIdx.x; n_block * kBlockN < sk; n_block += gridDim.x) {
        const int j0 = n_block * kBlockN;
        const int keys_valid = imin(kBlockN, sk - j0);
        int m_lo, m_hi;
        bwd_query_tiles(p, sq, sk, j0, keys_valid, kBlockM, &m_lo, &m_hi);
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
            load_tile<kBlockM, kHeadDim, kStride, kNThreads>(sQ0 + st * Cfg::kQElems, qh, p.q_row_stride, rows_valid,
                                                             d, aligned, tid);
            load_tile<kBlockM, kHeadDim, kStride, kNThreads>(sdO0 + st * Cfg::kQElems, doh, p.do_row_stride,
                                                             rows_valid, d, aligned, tid);
            /* kLse2: lse2 from pass 1; rows past the end read 0: their Q, dO and D are zero
             * too, so P = 1 there but P dO = 0 and dS = 0 */
            const float *lse0 = Cfg::kLse2 ? p.dsum + bwd_lse2_offset(rows_total, p.num_heads) + h * rows_total +
                                                 row_base + m0
                                           : p.lse + b * p.lse_batch_stride + h * p.lse_head_stride +
                                                 (int64_t)(si.q_start + m0) * p.lse_row_stride;
            bwd_stage_rows<kBlockM>(sLse0 + st * kBlockM, sD0 + st * kBlockM, lse0,
                                    Cfg::kLse2 ? 1 : p.lse_row_stride, p.dsum + h * rows_total + row_base + m0,
                                    rows_valid, tid, kDoDK);
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
                        float *dst = p.dq_accum + ((row_base + r) * p.num_heads + h_) * kHeadDim + dq_wc * kDqCols +
                                     2 * t;
#pragma unroll
                        for (int dt = 0; dt < kDqCols / 8; ++dt)
                            atomic_add2(dst + dt * 8, acc_dq[mt][dt][2 * hf], acc_dq[mt][dt][2 * hf + 1]);
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
            float alibi_log2 = 0.0f;
            if (Has_extras && p.alibi) alibi_log2 = p.alibi[b * p.alibi_batch_stride + h * p.alibi_head_stride] * kLog2e;

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
            const bool need_mask = keys_valid < kBlockN || (has_hi && m0 + off + right < j0 + kBlockN - 1) ||
                                   (has_lo && m0 + kBlockM - 1 + off - left > j0);
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
                    if (!Cfg::kLse2) lse_v = (ci < sq - m0 && lse_v != -INFINITY) ? lse_v * kLog2e : INFINITY;
                    float dt_v;
                    const float x = bwd_score<Has_extras>(p, sP[nt][e], alibi_log2, i + off - j, &dt_v);
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
                        const int lo = has_lo ? i + off - left : 0;
                        const int hi = has_hi ? imin(sk - 1, i + off + right) : sk - 1;
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
                    *reinterpret_cast<uint32_t *>(sK + r * kStride + dt * 8 + 2 * t) =
                        Ops::pack(acc_dk[dt][2 * hf] * p.softmax_scale, acc_dk[dt][2 * hf + 1] * p.softmax_scale);
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

/* ------------------------------------------------------------------------ */
/* deterministic dQ: a block owns a query tile and walks the key tiles        */
/* ------------------------------------------------------------------------ */

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
    const int off = sk - sq;
    const bool has_lo = p.window_left >= 0;
    const bool has_hi = p.causal || p.window_right >= 0;
    const int left = p.window_left, right = p.causal ? 0 : p.window_right;
    const int64_t rows_total = p.varlen ? p.total_q : (int64_t)p.batch * p.seqlen_q;
    const int64_t row_base = p.varlen ? si.q_start : (int64_t)b * p.seqlen_q;
    const uint64_t bh = (uint64_t)b * p.num_heads + h;
    float alibi_log2 = 0.0f;
    if (Has_extras && p.alibi) alibi_log2 = p.alibi[b * p.alibi_batch_stride + h * p.alibi_head_stride] * kLog2e;

    const T *qb = static_cast<const T *>(p.q) + b * p.q_batch_stride + (int64_t)si.q_start * p.q_row_stride +
                  h * p.q_head_stride;
    const T *dob = static_cast<const T *>(p.dout) + b * p.do_batch_stride + (int64_t)si.q_start * p.do_row_stride +
                   h * p.do_head_stride;
    const T *kb = static_cast<const T *>(p.k) + b * p.k_batch_stride + (int64_t)si.k_start * p.k_row_stride +
                  hk * p.k_head_stride;
    const T *vb = static_cast<const T *>(p.v) + b * p.v_batch_stride + (int64_t)si.k_start * p.v_row_stride +
                  hk * p.v_head_stride;
    T *dqb = static_cast<T *>(p.dq) + b * p.dq_batch_stride + (int64_t)si.q_start * p.dq_row_stride +
             h * p.dq_head_stride;

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
        const int j_begin = has_lo ? imax(0, m0 + off - left) : 0;
        const int j_end = has_hi ? imin(sk, i_last + off + right + 1) : sk;
        const int n_lo = j_begin / kBlockN;
        const int n_hi = j_end > j_begin ? (j_end + kBlockN - 1) / kBlockN : n_lo;

        load_tile<kBlockM, kHeadDim, kStride, kNThreads>(sQ, qb + (int64_t)m0 * p.q_row_stride, p.q_row_stride,
                                                         rows_valid, d, aligned, tid);
        load_tile<kBlockM, kHeadDim, kStride, kNThreads>(sdO, dob + (int64_t)m0 * p.do_row_stride, p.do_row_stride,
                                                         rows_valid, d, aligned, tid);
        auto issue = [&](int n) {
            const int jj = n * kBlockN, st = (n - n_lo) & 1;
            load_tile<kBlockN, kHeadDim, kStride, kNThreads>(sK + st * kBlockN * kStride,
                                                             kb + (int64_t)jj * p.k_row_stride, p.k_row_stride,
                                                             sk - jj, d, aligned, tid);
            load_tile<kBlockN, kHeadDim, kStride, kNThreads>(sV + st * kBlockN * kStride,
                                                             vb + (int64_t)jj * p.v_row_stride, p.v_row_stride,
                                                             sk - jj, d, aligned, tid);
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
                    l = l == -INFINITY ? INFINITY : l * kLog2e;
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
            const bool need_mask = j0 + kBlockN > sk || (has_hi && j0 + kBlockN - 1 > m0 + off + right) ||
                                   (has_lo && j0 < i_last + off - left);
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
                        const float x = bwd_score<Has_extras>(p, s[mt][nt][e], alibi_log2, i + off - j, &dth);
                        float pr = fast_exp2(x - lse_r[mt][hf]);
                        if (need_mask) { /* uniform per tile; hoisted by the compiler */
                            const int lo = has_lo ? i + off - left : 0;
                            const int hi = has_hi ? imin(sk - 1, i + off + right) : sk - 1;
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
                    *reinterpret_cast<uint32_t *>(sQ + r * kStride + dt * 8 + 2 * t) =
                        Ops::pack(acc[mt][dt][2 * hf] * p.softmax_scale, acc[mt][dt][2 * hf + 1] * p.softmax_scale);
            }
        __syncthreads();
        store_tile<kBlockM, kHeadDim, kStride, kNThreads>(dqb + (int64_t)m0 * p.dq_row_stride, p.dq_row_stride, sQ,
                                                          rows_valid, d, aligned, tid);
        __syncthreads();
    }
}

/* ------------------------------------------------------------------------ */
/* host side                                                                  */
/* ------------------------------------------------------------------------ */

template <typename Kernel>
pf_status launch_smem_kernel(Kernel kernel, dim3 grid, int threads, int smem, cudaStream_t stream, int device,
                             std::atomic<uint64_t> &attr_done, const FlashParams &p, const char *what) {
    PF_TRY(set_max_smem(kernel, smem, device, attr_done));
    kernel<<<grid, threads, smem, stream>>>(p);
    PF_CUDA_CHECK_LAUNCH(what);
    return PF_STATUS_OK;
}

template <typename T, typename Cfg, bool Is_aligned, bool Has_extras, int kMode>
pf_status launch_bwd_main(const FlashParams &p, cudaStream_t stream, int device) {
    static std::atomic<uint64_t> done{0};
    const int blocks = (p.max_seqlen_k + Cfg::kBlockN - 1) / Cfg::kBlockN;
    dim3 grid(blocks > 0 ? blocks : 1, p.num_kv_heads, p.batch);
    return launch_smem_kernel(flash_bwd_kernel<T, Cfg, Is_aligned, Has_extras, kMode>, grid, Cfg::kNThreads,
                              Cfg::kSmemBytes, stream, device, done, p, "flash_bwd_kernel");
}

template <typename T, typename Cfg, bool Is_aligned, bool Has_extras>
pf_status launch_bwd_dq(const FlashParams &p, cudaStream_t stream, int device) {
    static std::atomic<uint64_t> done{0};
    const int tiles = (p.max_seqlen_q + Cfg::kBlockM - 1) / Cfg::kBlockM;
    dim3 grid(tiles > 0 ? tiles : 1, p.num_heads, p.batch);
    constexpr int smem = (2 * Cfg::kBlockM + 4 * Cfg::kBlockN) * Cfg::kStride * 2;
    return launch_smem_kernel(flash_bwd_dq_kernel<T, Cfg, Is_aligned, Has_extras>, grid, Cfg::kNThreads, smem,
                              stream, device, done, p, "flash_bwd_dq_kernel");
}

}  // namespace cuda
}  // namespace pf

#include "flash_bwd_sm90.cuh" /* the Hopper main kernel (uses the helpers above) */

namespace pf {
namespace cuda {

/* Tiles per head dim: BwdConfig<d, queries per step, warps (16 keys each), stages,
 * min blocks, dQ rows per warp, deferred dQ, lse2>, and the deterministic dQ kernel's
 * FwdConfig<d, query rows, keys per tile, warps>.
 * d <= 128: 128 keys, 8 warps, 1 block/SM; d = 192: 64 x 128 split in two passes (dV,
 * then dK + dQ), 224 KB of shared memory; d = 256: 32 queries x 64 keys, 4 warps,
 * split. Not tuned beyond d=64/128.
 * First tuning run (benchmarks/results/tune_h200.md, s=8k non-causal, TFLOP/s):
 * d=128: 64x8 239, 32x8 225, 64x4 210, 32x4 214; d=64: 64x8 214, 32x8 187, 64x4 221,
 * 32x4 191, 128x8 235.
 * Backward tuning on H200 (bf16, 16k tokens, same-run A/B through the PF_TUNE hook,
 * TFLOP/s at s=16k non-causal; benchmarks/results/prefill_h200.md has the full grid):
 *  - deferred dQ (kDeferDq: one barrier per step instead of two, 2 dS^T buffers):
 *    d=128 244.5 -> 257.4 (+5%); with 32-row dQ warp tiles (kDqRows=32: 32 instead
 *    of 40 LDSM.x4 per dQ product and warp) 263.1 (+7.6%); 32-row tiles alone +2.5%.
 *  - d=64: 128 queries per step 219.3 -> 239.6 (+9%), + deferred dQ 246-247 (+12%);
 *    16- and 32-row dQ tiles tie there (247.1 / 246.0).
 *  - lse2 (pass 1 writes lse log2 e with +inf on masked rows; kLse2): d=128 +2% at
 *    s >= 4k (263.2 -> 268.8), d=64 -2..3% at s=1k (192.2 -> 188.6), so d=64 keeps lse.
 *  Rejected:
 *  - red.global.add.v4 for dQ (lane pairs swap halves): d=128 265.3 -> 247.9, d=64
 *    247.9 -> 242.6 (the shuffles and 16-36 B of new spills cost more than half the
 *    reductions save).
 *  - 3 Q/dO/lse/D stages (cp.async, 207-215 KB smem): d=128 268.4 -> 257.6 (-4%),
 *    d=64 +0.6..1.5% except -1% at 16k causal: not worth the shared memory.
 *  - FlashAttention-2's warp layout (a separate kernel: S^T/dP^T on 32x32 warp tiles,
 *    P^T and dS^T through shared memory, dK/dV split 4 keys x 2 columns, dQ 2 x 4;
 *    144 instead of 176 LDSM.x4 per 320 HMMA per warp at d=128, no spills): d=128
 *    244.3 vs 265.1, d=64 198.0 vs 247.8. Nsight Compute (d=128, s=4k): shared-memory
 *    wavefronts 673M vs 799M, but an extra barrier per step, 39% vs 42% tensor-pipe
 *    activity; shared-memory traffic is not what limits this kernel.
 *  What limits it now (Nsight Compute, d=128 s=4k, this kernel vs FA2's): same
 *  occupancy (2 warps per scheduler, 255 registers), 7% more instructions, and more
 *  short-scoreboard (LDSM/MUFU -> use: 177K vs 127K) and long-scoreboard (85K vs 44K)
 *  stall cycles; tensor pipe 42% vs 50% active. */
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

template <typename T, int kHeadDim, bool Is_aligned, bool Has_extras>
pf_status bwd_main_and_dq(const FlashParams &p, cudaStream_t stream, int device) {
    using Tile = BwdTile<kHeadDim>;
    using Cfg = std::conditional_t<Has_extras, typename Tile::extras, typename Tile::type>;
    if constexpr (Tile::kSplit) {
        PF_TRY((launch_bwd_main<T, Cfg, Is_aligned, Has_extras, 1>(p, stream, device)));
        PF_TRY((launch_bwd_main<T, Cfg, Is_aligned, Has_extras, 2>(p, stream, device)));
    } else {
        PF_TRY((launch_bwd_main<T, Cfg, Is_aligned, Has_extras, 0>(p, stream, device)));
    }
    if (p.deterministic) PF_TRY((launch_bwd_dq<T, typename Tile::dq, Is_aligned, Has_extras>(p, stream, device)));
    return PF_STATUS_OK;
}

#ifdef PF_TUNE
/* Tuning builds: PAGEDFLASH_BWD_TILE=MxW runs BwdConfig<d, M, W> (fast path, d 64/128). */
template <typename T, int kHeadDim>
pf_status bwd_tune(const FlashParams &p, cudaStream_t stream, int device, bool *handled) {
    *handled = false;
    if constexpr (kHeadDim == 64 || kHeadDim == 128) {
        const char *env = getenv("PAGEDFLASH_BWD_TILE");
        int m = 0, w = 0, r = 16, df = 0; /* MxW[xRxD]: queries, warps, dQ rows per warp, deferred dQ */
        if (!env || sscanf(env, "%dx%dx%dx%d", &m, &w, &r, &df) < 2 || !p.aligned || p.deterministic ||
            p.softcap > 0.0f || p.alibi || p.drop_threshold || !(p.scale_log2 > 0.0f))
            return PF_STATUS_OK;
        *handled = true;
#define PF_BWD_TUNE_CASE(M, W, R, D)                                                                     \
    if (m == M && w == W && r == R && df == D)                                                        \
        return launch_bwd_main<T, BwdConfig<kHeadDim, M, W, 2, 1, R, D>, true, false, 0>(p, stream, device);
        PF_BWD_TUNE_CASE(64, 8, 16, 0)
        PF_BWD_TUNE_CASE(64, 8, 32, 0)
        PF_BWD_TUNE_CASE(64, 8, 16, 1)
        PF_BWD_TUNE_CASE(64, 8, 32, 1)
        if constexpr (kHeadDim == 64) {
            PF_BWD_TUNE_CASE(128, 8, 16, 0)
            PF_BWD_TUNE_CASE(128, 8, 32, 0)
            PF_BWD_TUNE_CASE(128, 8, 16, 1)
            PF_BWD_TUNE_CASE(128, 8, 32, 1)
        }
#undef PF_BWD_TUNE_CASE
        *handled = false;
    }
    return PF_STATUS_OK;
}
#endif

template <typename T, int kHeadDim>
pf_status flash_bwd_run(const FlashParams &params, cudaStream_t stream, int device) {
    FlashParams p = params;
    p.head_dim_rounded = kHeadDim;
    const int64_t rows = p.varlen ? (int64_t)p.total_q : (int64_t)p.batch * p.seqlen_q;
    /* D and lse2, each [num_heads][rows] rounded up to 256 bytes */
    const size_t dsum_bytes = 2 * (size_t)bwd_lse2_offset(rows, p.num_heads) * 4;
    const size_t dq_bytes = p.deterministic ? 0 : (size_t)rows * p.num_heads * kHeadDim * 4;
    pf_cuda_scratch scratch; /* cached per (device, stream): cuda_util.cuh */
    PF_TRY(pf_cuda_scratch_acquire(stream, dsum_bytes + dq_bytes, &scratch));
    p.dsum = static_cast<float *>(scratch.ptr);
    p.dq_accum = p.deterministic ? nullptr : reinterpret_cast<float *>(static_cast<char *>(scratch.ptr) + dsum_bytes);

    int sms = 0;
    PF_TRY(sm_count(device, &sms));
    const bool extras = p.softcap > 0.0f || p.alibi != nullptr || p.drop_threshold != 0 || !(p.scale_log2 > 0.0f);
    if constexpr (bwd_sm90_has_tile<T, kHeadDim>()) { /* the sm_90a kernels: flash_bwd_sm90.cuh */
        const bool use_sm90 = p.aligned && !extras && !p.deterministic &&
                              rows * p.num_heads * (kHeadDim / 8) < INT32_MAX / 2 && sm90_available(device);
        if (use_sm90) {
            PF_TRY((flash_bwd_sm90_passes<T, kHeadDim>(p, rows, sms, stream, device)));
            return pf_cuda_scratch_release(stream, &scratch);
        }
    }
    const int64_t warps = rows * p.num_heads;
    const int prep_blocks = (int)((warps + 7) / 8 < (int64_t)sms * 8 ? (warps + 7) / 8 : (int64_t)sms * 8);
    bwd_prep_kernel<T><<<prep_blocks > 0 ? prep_blocks : 1, 256, 0, stream>>>(p, rows, !p.deterministic);
    PF_CUDA_CHECK_LAUNCH("bwd_prep_kernel");

#ifdef PF_TUNE
    bool handled = false;
    PF_TRY((bwd_tune<T, kHeadDim>(p, stream, device, &handled)));
    if (handled) {
    } else
#endif
    if (!p.aligned)
        PF_TRY((bwd_main_and_dq<T, kHeadDim, false, true>(p, stream, device)));
    else if (extras)
        PF_TRY((bwd_main_and_dq<T, kHeadDim, true, true>(p, stream, device)));
    else
        PF_TRY((bwd_main_and_dq<T, kHeadDim, true, false>(p, stream, device)));

    if (!p.deterministic) {
        const int64_t n = rows * p.num_heads * p.head_dim;
        const int blocks = (int)((n + 255) / 256 < (int64_t)sms * 16 ? (n + 255) / 256 : (int64_t)sms * 16);
        bwd_convert_dq_kernel<T><<<blocks > 0 ? blocks : 1, 256, 0, stream>>>(p, rows);
        PF_CUDA_CHECK_LAUNCH("bwd_convert_dq_kernel");
    }
    return pf_cuda_scratch_release(stream, &scratch);
}

}  // namespace cuda
}  // namespace pf

#endif /* PF_FLASH_BWD_CUH */
