/*
 * flash_fwd.cuh - FlashAttention-2 forward for float16 / bfloat16 on sm_80+
 * (mma.sync m16n8k16 with float32 accumulation; runs on Hopper too).
 *
 * Layouts: FlashParams (flash_params.h): q [b, sq, h, d], k/v [b, sk, hk, d]
 * (or packed varlen), out like q, lse f32 [b, h, sq] or [h, total_q].
 *
 * One thread block owns one query tile of kBlockM rows of one (batch, head);
 * grid = (query tiles, heads, batch). Its kNWarps warps split the tile's rows,
 * kMT m16 slices each. Per block:
 *   1. cp.async the Q tile and the last K tile it can see into shared memory
 *      (rows padded to kHeadDim + 8 elements: the 16-byte skew makes every
 *      ldmatrix and every cp.async row phase bank-conflict free).
 *   2. Walk the visible key tiles from last to first (the masked tiles of a
 *      causal row come first, the rest need no mask). Per tile:
 *        wait K(n), barrier, issue cp.async V(n)          -- overlaps S = Q K^T
 *        S = Q K^T   (ldmatrix Q and K, mma.sync)
 *        softcap / ALiBi / log2 scaling (Has_extras), causal/window/length mask
 *        wait V(n), barrier, issue cp.async K(n-1)        -- overlaps softmax and P V
 *        online softmax in the log2 domain with exp2: running row max m, row sum
 *        l kept per thread (the quad reduces l only at the end), O *= exp2(m_old - m_new)
 *        dropout (Philox, pagedflash_philox.h: the CPU's exact keep mask)
 *        O += P V    (P stays in registers: the C fragment of S is the A fragment
 *                     of P; V through ldmatrix.trans)
 *   3. O /= l (times 1/(1-p) with dropout), lse = (m + log2 l) ln 2, O staged
 *      through shared memory for 16-byte coalesced stores.
 * A row that sees no key keeps m = -inf, l = 0: out = 0, lse = -inf.
 *
 * Head dims that are not a multiple of 8 or unaligned tensors take a scalar
 * load/store path (p.aligned == 0); head dims below kHeadDim are zero-padded.
 * Packed varlen bounds come from device memory, so they are clamped to the
 * packed tensors' extents: bad cu_seqlens never read or write out of bounds.
 */
#ifndef PF_FLASH_FWD_CUH
#define PF_FLASH_FWD_CUH

#include <cstdio>
#include <cstdlib>

#include "attn/mask.cuh"
#include "attn/mma.cuh"
#include "common/cuda_util.cuh"
#include "flash_params.h"
#include "pagedflash_philox.h"

#ifndef PF_QK_UNROLL
#define PF_QK_UNROLL _Pragma("unroll")
#endif

namespace pf {
namespace cuda {

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

/* ---- global <-> shared tiles ------------------------------------------ */

/* rows [0, R) of a tile (row r at g + r * row_stride) -> smem [R][kStride];
 * rows >= rows_valid and columns >= d become zeros. Thread tid copies 16-byte
 * chunk tid % C of rows tid / C, tid / C + kRowStep, ... (C chunks per row), so
 * one running pointer per thread serves the whole tile. */
template <int R, int kHeadDim, int kStride, int kNThreads, typename T>
PF_DEV void load_tile(T *smem, const T *g, int64_t row_stride, int rows_valid, int d, bool aligned,
                      int tid) {
    constexpr int C = kHeadDim / 8;
    constexpr int kRowStep = kNThreads / C;
    constexpr int kIters = (R + kRowStep - 1) / kRowStep;
    constexpr bool kExact = kNThreads % C == 0 && R % kRowStep == 0;
    static_assert(kRowStep >= 1, "a row's chunks fit in one pass of the block");
    if (!kExact && tid >= kRowStep * C) return;
    const int r0 = tid / C, c = tid % C;
    const bool col_ok = c * 8 < d;
    if (aligned) {
        const T *src = g + r0 * row_stride + c * 8;
        uint32_t dst = smem_addr(smem + r0 * kStride + c * 8);
        const int64_t step = kRowStep * row_stride;
#pragma unroll
        for (int it = 0; it < kIters; ++it) {
            const int r = r0 + it * kRowStep;
            if (kExact || r < R) {
                const bool ok = col_ok && r < rows_valid;
                cp_async_16(dst, ok ? src : g, ok);
            }
            src += step;
            dst += kRowStep * kStride * 2;
        }
    } else {
        const uint16_t *gs = reinterpret_cast<const uint16_t *>(g);
#pragma unroll 1
        for (int it = 0; it < kIters; ++it) {
            const int r = r0 + it * kRowStep;
            if (!kExact && r >= R) break;
            uint16_t e[8];
#pragma unroll
            for (int x = 0; x < 8; ++x) {
                const int col = c * 8 + x;
                e[x] = (r < rows_valid && col < d) ? gs[r * row_stride + col] : (uint16_t)0;
            }
            uint4 v;
            v.x = e[0] | ((uint32_t)e[1] << 16);
            v.y = e[2] | ((uint32_t)e[3] << 16);
            v.z = e[4] | ((uint32_t)e[5] << 16);
            v.w = e[6] | ((uint32_t)e[7] << 16);
            *reinterpret_cast<uint4 *>(smem + r * kStride + c * 8) = v;
        }
    }
}

/* smem [R][kStride] -> rows [0, rows_valid), columns [0, d) of a global tile. */
template <int R, int kHeadDim, int kStride, int kNThreads, typename T>
PF_DEV void store_tile(T *g, int64_t row_stride, const T *smem, int rows_valid, int d, bool aligned,
                       int tid) {
    constexpr int C = kHeadDim / 8;
    constexpr int kIters = (R * C + kNThreads - 1) / kNThreads;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
        const int idx = tid + it * kNThreads;
        if ((R * C) % kNThreads != 0 && idx >= R * C) break;
        const int r = idx / C, c = idx % C;
        if (r >= rows_valid || c * 8 >= d) continue;
        const uint4 v = *reinterpret_cast<const uint4 *>(smem + r * kStride + c * 8);
        if (aligned) {
            *reinterpret_cast<uint4 *>(g + r * row_stride + c * 8) = v;
        } else {
            uint16_t *gs = reinterpret_cast<uint16_t *>(g) + r * row_stride;
            const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int x = 0; x < 8; ++x)
                if (c * 8 + x < d) gs[c * 8 + x] = (uint16_t)(w[x / 2] >> (16 * (x % 2)));
        }
    }
}

/* ---- sequence geometry --------------------------------------------------- */

struct SeqInfo {
    int q_start, sq, k_start, sk;
};

PF_DEV SeqInfo seq_info(const FlashParams &p, int b) {
    SeqInfo s;
    if (p.varlen) {
        /* device-resident offsets: clamp so that any values stay in bounds */
        int a = imin(imax(__ldg(p.cu_seqlens_q + b), 0), p.total_q);
        int e = imin(imax(__ldg(p.cu_seqlens_q + b + 1), a), p.total_q);
        s.q_start = a;
        s.sq = e - a;
        a = imin(imax(__ldg(p.cu_seqlens_k + b), 0), p.total_k);
        e = imin(imax(__ldg(p.cu_seqlens_k + b + 1), a), p.total_k);
        s.k_start = a;
        s.sk = e - a;
    } else {
        s.q_start = 0;
        s.sq = p.seqlen_q;
        s.k_start = 0;
        s.sk = p.seqlen_k;
    }
    return s;
}

/* Base pointers of one (batch b, query head h) of a forward call: q / out / lse
 * at the sequence's first query row, k / v at its first key row of KV head
 * h / head_group; lse NULL when not wanted. */
template <typename T>
struct FwdBases {
    const T *q, *k, *v;
    T *o;
    float *lse;
};

template <typename T>
PF_DEV FwdBases<T> fwd_bases(const FlashParams &p, int b, int h, const SeqInfo &si) {
    const int hk = h / p.head_group;
    FwdBases<T> r;
    r.q = static_cast<const T *>(p.q) + b * p.q_batch_stride + (int64_t)si.q_start * p.q_row_stride +
          h * p.q_head_stride;
    r.k = static_cast<const T *>(p.k) + b * p.k_batch_stride + (int64_t)si.k_start * p.k_row_stride +
          hk * p.k_head_stride;
    r.v = static_cast<const T *>(p.v) + b * p.v_batch_stride + (int64_t)si.k_start * p.v_row_stride +
          hk * p.v_head_stride;
    r.o = static_cast<T *>(p.o) + b * p.o_batch_stride + (int64_t)si.q_start * p.o_row_stride + h * p.o_head_stride;
    r.lse = p.lse ? p.lse + b * p.lse_batch_stride + h * p.lse_head_stride + (int64_t)si.q_start * p.lse_row_stride
                  : nullptr;
    return r;
}

/* ALiBi slope of (b, h) times log2(e), 0 without ALiBi. */
PF_DEV float fwd_alibi_log2(const FlashParams &p, int b, int h) {
    return p.alibi ? p.alibi[b * p.alibi_batch_stride + h * p.alibi_head_stride] * kLog2e : 0.0f;
}

/* ---- per-slice score processing (shared with the sm_90 kernel) ----------
 * Each works on one m16 slice of S held as mma C fragments, s[nt][e] =
 * (row i0 + 8 * (e / 2), key j0 + 8 * nt + 2 * t + e % 2), lane = 4 g + t. */

/* softcap or plain scaling into the log2 domain, then ALiBi. The conditions are
 * uniform, so each is tested once per slice, and the ALiBi distance |i + off - j|
 * is one float subtraction from the slice's first column (no int -> float
 * conversion per score: those run at a quarter of the FMA rate; exact for
 * distances below 2^24). */
template <int kNT>
PF_DEV void fwd_score_extras(float (&s)[kNT][4], const FlashParams &p, int i0, int j0, int t, int off,
                             float alibi_log2) {
    if (p.softcap > 0.0f) {
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[nt][e] = p.softcap_log2 * tanh_abs_accurate(s[nt][e] * p.softcap_inv_scale);
    } else {
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[nt][e] *= p.scale_log2;
    }
    if (p.alibi) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const float d0 = (float)(i0 + 8 * hf + off - j0 - 2 * t); /* distance to column 0 of the slice */
#pragma unroll
            for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) s[nt][2 * hf + e] -= alibi_log2 * fabsf(d0 - (float)(nt * 8 + e));
        }
    }
}

/* Mask geometry of one call: row i sees keys [i + off - left, i + off + right] within [0, sk). */
struct FwdMask {
    int off, left, right, sk;
    bool has_lo, has_hi;
    /* does key tile [j0, j0 + n) need masking for rows [m0, i_last]? */
    PF_DEV bool needed(int j0, int n, int m0, int i_last) const {
        return j0 + n > sk || (has_hi && j0 + n - 1 > m0 + off + right) || (has_lo && j0 < i_last + off - left);
    }
    /* the key tiles [*n_lo, *n_hi) of n keys that rows [m0, i_last] see (empty: n_hi == n_lo) */
    PF_DEV void key_tiles(int m0, int i_last, int n, int *n_lo, int *n_hi) const {
        const int j_begin = has_lo ? imax(0, m0 + off - left) : 0;
        const int j_end = has_hi ? imin(sk, i_last + off + right + 1) : sk;
        *n_lo = j_begin / n;
        *n_hi = j_end > j_begin ? (j_end + n - 1) / n : *n_lo;
    }
    template <int kNT>
    PF_DEV void apply(float (&s)[kNT][4], int i0, int j0, int t) const {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int i = i0 + 8 * hf;
            const int lo = has_lo ? i + off - left : 0;
            const int hi = has_hi ? imin(sk - 1, i + off + right) : sk - 1;
#pragma unroll
            for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int j = j0 + nt * 8 + 2 * t + e;
                    if (j < lo || j > hi) s[nt][2 * hf + e] = -INFINITY;
                }
        }
    }
};

PF_DEV FwdMask fwd_mask(const FlashParams &p, int sq, int sk) {
    FwdMask m;
    m.off = sk - sq;
    m.has_lo = p.window_left >= 0;
    m.has_hi = p.causal || p.window_right >= 0;
    m.left = p.window_left;
    m.right = p.causal ? 0 : p.window_right;
    m.sk = sk;
    return m;
}

/* Online softmax step in the log2 domain (scores times sc): new row max,
 * alpha = exp2(m_old - m_new), s -> exp2(s sc - m_new), row_sum = row_sum *
 * alpha + the slice's sum (per thread; the quad reduces l only at the end).
 * Returns whether any alpha != 1. */
template <int kNT>
PF_DEV bool fwd_softmax(float (&s)[kNT][4], float (&row_max)[2], float (&row_sum)[2], float (&alpha)[2], float sc) {
    bool rescale = false;
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        /* row max as a tree (short dependency chains) */
        float v[kNT];
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) v[nt] = fmaxf(s[nt][2 * hf], s[nt][2 * hf + 1]);
#pragma unroll
        for (int w = 1; w < kNT; w *= 2)
#pragma unroll
            for (int nt = 0; nt + w < kNT; nt += 2 * w) v[nt] = fmaxf(v[nt], v[nt + w]);
        const float mx = quad_max(fmaxf(row_max[hf], v[0]));
        const float m_sc = mx == -INFINITY ? 0.0f : mx * sc;
        alpha[hf] = fast_exp2(row_max[hf] * sc - m_sc);
        rescale |= alpha[hf] != 1.0f;
        row_max[hf] = mx;
        float sum = row_sum[hf] * alpha[hf];
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const float pr = fast_exp2(fmaf(s[nt][2 * hf + e], sc, -m_sc));
                s[nt][2 * hf + e] = pr;
                sum += pr;
            }
        row_sum[hf] = sum;
    }
    return rescale;
}

/* dropout: keep (i, j) iff philox(j / 4, i, b * h + h, offset; seed)[j % 4] >= threshold */
template <int kNT>
PF_DEV void fwd_dropout(float (&s)[kNT][4], const FlashParams &p, uint64_t bh, int i0, int j0, int t) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        const int i = i0 + 8 * hf;
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
            const int jg = j0 + nt * 8 + 4 * (t >> 1);
            const pf_u32x4 r = pf_dropout_bits4(p.seed, p.offset, bh, i, jg);
            const uint32_t w0 = (t & 1) ? r.z : r.x, w1 = (t & 1) ? r.w : r.y;
            if (w0 < p.drop_threshold) s[nt][2 * hf] = 0.0f;
            if (w1 < p.drop_threshold) s[nt][2 * hf + 1] = 0.0f;
        }
    }
}

/* Epilogue of one row half: the quad's l, the output factor, and lse (natural log). */
template <bool Has_dropout>
PF_DEV float fwd_finish_row(const FlashParams &p, float row_max, float row_sum, float sc, float *lse) {
    const float l = quad_sum(row_sum);
    *lse = l > 0.0f ? (row_max * sc + __log2f(l)) * kLn2 : -INFINITY;
    return l > 0.0f ? (Has_dropout ? p.drop_scale : 1.0f) / l : 0.0f;
}

/* Rows of a tile that sees no key: out = 0, lse = -inf. */
template <int kHeadDim, int kNThreads, typename T>
PF_DEV void fwd_write_empty(const FlashParams &p, T *ob, float *lseb, int m0, int rows_valid, int d, int tid) {
    constexpr int C = kHeadDim / 8;
    for (int idx = tid; idx < rows_valid * C; idx += kNThreads) {
        const int r = idx / C, c = idx % C;
        uint16_t *gs = reinterpret_cast<uint16_t *>(ob + (int64_t)(m0 + r) * p.o_row_stride);
        for (int x = c * 8; x < c * 8 + 8 && x < d; ++x) gs[x] = 0;
    }
    if (lseb)
        for (int r = tid; r < rows_valid; r += kNThreads) lseb[(int64_t)(m0 + r) * p.lse_row_stride] = -INFINITY;
}

/* ---- the kernel ------------------------------------------------------------ */

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

    const FwdMask mask = fwd_mask(p, sq, sk);
    const int off = mask.off;

    const float alibi_log2 = Has_extras ? fwd_alibi_log2(p, b, h) : 0.0f;
    const float sc = Has_extras ? 1.0f : p.scale_log2; /* scale applied inside exp2 */
    const uint64_t bh = (uint64_t)b * p.num_heads + h;

    /* per-lane ldmatrix addresses (bytes) */
    const int wrow = warp * Cfg::kRowsPerWarp;
    const uint32_t q_lane = smem_addr(sQ) +
        ((wrow + (lane & 7) + 8 * ((lane >> 3) & 1)) * kStride + 8 * (lane >> 4)) * 2;
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
        mask.key_tiles(m0, i_last, kBlockN, &n_lo, &n_hi);

        if (n_hi <= n_lo) { /* nothing visible: out = 0, lse = -inf */
            fwd_write_empty<kHeadDim, kNThreads>(p, ob, lseb, m0, rows_valid, d, tid);
            continue;
        }

        load_tile<kBlockM, kHeadDim, kStride, kNThreads>(sQ, qb + (int64_t)m0 * p.q_row_stride, p.q_row_stride,
                                                         rows_valid, d, aligned, tid);
        {
            const int j0 = (n_hi - 1) * kBlockN;
            load_tile<kBlockN, kHeadDim, kStride, kNThreads>(sK, kb + (int64_t)j0 * p.k_row_stride,
                                                             p.k_row_stride, sk - j0, d, aligned, tid);
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
            PF_QK_UNROLL
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
                    fwd_score_extras(s[mt], p, m0 + wrow + mt * 16 + g, j0, t, off, alibi_log2);
            }

            /* causal / window / key-length mask, only on tiles that cross a boundary */
            if (mask.needed(j0, kBlockN, m0, i_last)) {
#pragma unroll
                for (int mt = 0; mt < kMT; ++mt) mask.apply(s[mt], m0 + wrow + mt * 16 + g, j0, t);
            }

            cp_async_wait<0>();
            __syncthreads(); /* V(n) landed; every warp is done with K(n) */
            if (n > n_lo) {
                const int jn = (n - 1) * kBlockN;
                load_tile<kBlockN, kHeadDim, kStride, kNThreads>(sK, kb + (int64_t)jn * p.k_row_stride,
                                                                 p.k_row_stride, sk - jn, d, aligned, tid);
                cp_async_commit();
            }

            /* online softmax (log2 domain) */
            float alpha[kMT][2];
            bool rescale = false;
#pragma unroll
            for (int mt = 0; mt < kMT; ++mt) rescale |= fwd_softmax(s[mt], row_max[mt], row_sum[mt], alpha[mt], sc);
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
                for (int mt = 0; mt < kMT; ++mt) fwd_dropout(s[mt], p, bh, m0 + wrow + mt * 16 + g, j0, t);
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
                const float inv = fwd_finish_row<Has_dropout>(p, row_max[mt][hf], row_sum[mt][hf], sc, &lse);
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

template <typename T, typename Cfg, bool Is_aligned, bool Has_extras, bool Has_dropout>
pf_status launch_fwd(const FlashParams &p, cudaStream_t stream, int device, int max_rows) {
    auto kernel = flash_fwd_kernel<T, Cfg, Is_aligned, Has_extras, Has_dropout>;
    constexpr int smem = Cfg::kSmemBytes;
    static std::atomic<uint64_t> attr_done{0};
    PF_TRY(set_max_smem(kernel, smem, device, attr_done));
    const int tiles = (max_rows + Cfg::kBlockM - 1) / Cfg::kBlockM;
    dim3 grid(tiles > 0 ? tiles : 1, p.num_heads, p.batch);
    kernel<<<grid, Cfg::kNThreads, smem, stream>>>(p);
    PF_CUDA_CHECK_LAUNCH("flash_fwd_kernel");
    return PF_STATUS_OK;
}

/*
 * Tile per head dim (kBlockM x kBlockN, warps). Registers: O takes
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
struct FwdTile<32> { using type = FwdConfig<32, 128, 64, 4, 1, false>; };
template <>
struct FwdTile<64> { using type = FwdConfig<64, 128, 64, 4, 1, false>; };
template <>
struct FwdTile<96> { using type = FwdConfig<96, 128, 64, 4>; };
template <>
struct FwdTile<128> { using type = FwdConfig<128, 128, 64, 4>; };
template <>
struct FwdTile<192> { using type = FwdConfig<192, 128, 64, 8>; };
template <>
struct FwdTile<256> { using type = FwdConfig<256, 64, 64, 4>; };

template <typename T, typename Cfg>
pf_status launch_fwd_cfg(const FlashParams &p, cudaStream_t stream, int device, int max_rows) {
    /* Four kernels: the fast path, softcap/ALiBi/any scale, + dropout, and the
     * slow generic one for unaligned tensors or head dims not a multiple of 8. */
    if (!p.aligned) return launch_fwd<T, Cfg, false, true, true>(p, stream, device, max_rows);
    if (p.drop_threshold) return launch_fwd<T, Cfg, true, true, true>(p, stream, device, max_rows);
    const bool extras = p.softcap > 0.0f || p.alibi != nullptr || !(p.scale_log2 > 0.0f);
    if (extras) return launch_fwd<T, Cfg, true, true, false>(p, stream, device, max_rows);
    return launch_fwd<T, Cfg, true, false, false>(p, stream, device, max_rows);
}

#ifdef PF_TUNE
/* Tuning builds (-DPF_TUNE): PAGEDFLASH_FWD_TILE=MxNxW[xMinBlocks] picks one of these
 * candidates (fast-path kernel only, head dims 64 and 128) at run time, so
 * one device run can time them all. */
template <typename T, int kHeadDim>
pf_status launch_fwd_tune(const FlashParams &p, cudaStream_t stream, int device, int max_rows, bool *handled) {
    *handled = false;
    if constexpr (kHeadDim == 64 || kHeadDim == 128) {
        const char *env = getenv("PAGEDFLASH_FWD_TILE");
        int m = 0, n = 0, w = 0, b = 1, lazy = 1;
        if (!env || sscanf(env, "%dx%dx%dx%dx%d", &m, &n, &w, &b, &lazy) < 3) return PF_STATUS_OK;
        if (!p.aligned || p.drop_threshold || p.softcap > 0.0f || p.alibi || !(p.scale_log2 > 0.0f))
            return PF_STATUS_OK;
        *handled = true;
#define PF_TUNE_CASE(M, N, W, B) \
    if (m == M && n == N && w == W && b == B && lazy) \
        return launch_fwd<T, FwdConfig<kHeadDim, M, N, W, B>, true, false, false>(p, stream, device, max_rows);
        if (m == 128 && n == 64 && w == 4 && b == 1 && !lazy)
            return launch_fwd<T, FwdConfig<kHeadDim, 128, 64, 4, 1, false>, true, false, false>(p, stream, device,
                                                                                               max_rows);
        PF_TUNE_CASE(128, 64, 4, 1)
        PF_TUNE_CASE(64, 64, 4, 2)
        PF_TUNE_CASE(64, 64, 4, 3)
        PF_TUNE_CASE(128, 64, 8, 1)
        PF_TUNE_CASE(128, 64, 8, 2)
        PF_TUNE_CASE(128, 128, 8, 2)
        PF_TUNE_CASE(128, 32, 4, 1)
        if constexpr (kHeadDim == 64) { PF_TUNE_CASE(128, 128, 4, 1) }
#undef PF_TUNE_CASE
        *handled = false;
    }
    return PF_STATUS_OK;
}
#endif

/* flash_fwd_sm90.cuh: the Hopper kernel, tried first (sets *launched when it took the call). */
template <typename T, int kHeadDim>
pf_status flash_fwd_sm90_run(const FlashParams &p, cudaStream_t stream, int device, bool *launched);

template <typename T, int kHeadDim>
pf_status flash_fwd_run(const FlashParams &p, cudaStream_t stream, int device) {
    const int max_rows = p.max_seqlen_q;
    bool launched = false;
    const pf_status st90 = flash_fwd_sm90_run<T, kHeadDim>(p, stream, device, &launched);
    if (launched || st90 != PF_STATUS_OK) return st90;
#ifdef PF_TUNE
    bool handled = false;
    pf_status st = launch_fwd_tune<T, kHeadDim>(p, stream, device, max_rows, &handled);
    if (handled) return st;
#endif
    return launch_fwd_cfg<T, typename FwdTile<kHeadDim>::type>(p, stream, device, max_rows);
}

}  // namespace cuda
}  // namespace pf

#endif /* PF_FLASH_FWD_CUH */
