/*
 * paged/launch.cu - pf_cuda_paged_attn: turns validated pf_paged_params
 * into kernel arguments, picks a kernel and a split count, and enqueues
 *   [plan]  packed layouts only: a one-CTA kernel that lists the (sequence,
 *           row tile) pairs from the device-resident cu_seqlens_q (the host
 *           never reads device memory, so nothing synchronizes);
 *   main    the tensor-core kernel of paged_attn.cuh (float16 / bfloat16, head
 *           dims 32, 64, 96, 128, 192, 256 as instantiated in cuda/inst/), or
 *           the simple kernel below (float32, other head dims, or unaligned
 *           views): one warp per (query, head, split), CUDA cores;
 *   combine with num_splits > 1: merges the split partials by log-sum-exp into
 *           out (and lse).
 * All on the caller's stream; the split partials and the plan live in the
 * cached per-stream workspace (workspace.cu); no allocation per call otherwise.
 *
 * Split count (num_splits = 0): the (sequence, KV-head group, row tile) work
 * items are spread over splits until the CTAs fill the GPU once
 * (multiprocessors x resident CTAs per multiprocessor), keeping >= 64 tokens per
 * split; capped at 256 splits and at one split per 64 tokens of the longest
 * possible sequence. An explicit num_splits is honoured up to those caps.
 * Measured on an H200, 32/8 heads, d=128, bf16 (times in us, num_splits swept):
 * one wave beat two at every point (batch 1 / 64k: 77 at 128 splits vs 84 at 256;
 * batch 128 / 4k: 499 at 1 split vs 511 at 2), and splits of 64 tokens won at
 * batch 1 / 4k (15.6 at 64 splits vs 28.5 at 16).
 *
 * Kernel mode: with >= 4 KV heads the CTA's warps own one KV head each and walk
 * the split's tiles together, so every token row is read across heads at once
 * (8 warps when num_kv_heads % 8 == 0); otherwise 4 warps share one KV head and
 * take every 4th tile ("token mode"). Head mode: 4.35 TB/s against token mode's
 * 3.30 at batch 128 / 64k on the same data. PAGEDFLASH_PAGED_MODE=0/1/2 forces
 * token / 4-warp head / 8-warp head mode, "HxW" any CTA shape of H KV heads x W warps
 * that paged_attn.cuh instantiates (read on every call; for tests and tuning). Where head
 * mode would split, pf_pick_shape may take token mode or 1 KV head x 8 warps instead
 * (the rule and its measurements are at the function).
 *
 * Combine: one warp per (query, head) row with all of the row's partials loaded at
 * once when there are <= 16 splits and head_dim % 4 == 0 (<= 128), else a CTA per row;
 * PAGEDFLASH_PAGED_COMBINE=1 forces the CTA kernel (tests and tuning).
 *
 * K/V path (head dims 64 and 128, both modes): whole-line cp.async copies into a
 * per-warp shared-memory ring of 3 slots of 16-token tiles (PAGEDFLASH_PAGED_RING=1,
 * the default), fragments read from there; 0 = straight into registers (the older
 * path, kept for other head dims), 2 = 6 slots of 8-token tiles. Measured on an
 * H200 (b = batch, contexts 4k-64k, 32/8 heads, bf16): in head mode the ring is
 * 1.5-3% faster than registers at every point with b >= 8 (b32/64k 1887 vs 1942 us,
 * b128/4k 476 vs 491) and within 1% at b = 1; 8-token slots are 1-2% slower than
 * 16-token ones. In token mode (forced on the same data) it is 1.3-1.4x faster
 * (b128/64k 7517 vs 10340 us, b32/4k 127 vs 172).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "inst/hdims.h"
#include "paged/kernel.cuh"

#define PF_PAGED_MAX_SPLITS 256
#define PF_PAGED_MIN_SPLIT_TOKENS 64
#define PF_PAGED_TARGET_WAVES 1

/* ------------------------------------------------------------------------ */
/* Plan (packed layout, tensor-core kernel): (sequence, row tile) pairs       */
/* ------------------------------------------------------------------------ */

#define PF_PLAN_THREADS 1024

__global__ void __launch_bounds__(PF_PLAN_THREADS)
    pf_paged_plan_kernel(const int32_t *cu, int64_t cu_s, int batch, int total_q, int group, int rows,
                         int bound, int32_t *plan) {
    __shared__ int warp_sum[PF_PLAN_THREADS / 32];
    __shared__ int carry_s;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    if (tid == 0) carry_s = 0;
    __syncthreads();
    for (int base = 0; base < batch; base += PF_PLAN_THREADS) {
        const int b = base + tid;
        int tiles = 0;
        if (b < batch) {
            int c0 = min(max(cu[(int64_t)b * cu_s], 0), total_q);
            int c1 = min(max(cu[(int64_t)(b + 1) * cu_s], c0), total_q);
            tiles = (int)(((int64_t)(c1 - c0) * group + rows - 1) / rows);
        }
        int incl = tiles;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            int v = __shfl_up_sync(0xffffffffu, incl, o);
            if (lane >= o) incl += v;
        }
        if (lane == 31) warp_sum[warp] = incl;
        __syncthreads();
        if (warp == 0) {
            int w = warp_sum[lane];
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                int v = __shfl_up_sync(0xffffffffu, w, o);
                if (lane >= o) w += v;
            }
            warp_sum[lane] = w; /* inclusive over warps */
        }
        __syncthreads();
        const int carry = carry_s;
        const int offset = carry + (warp > 0 ? warp_sum[warp - 1] : 0) + incl - tiles;
        for (int j = 0; j < tiles; j++) {
            const int e = offset + j;
            if (e >= bound || e < 0) break;
            plan[2 * e] = b;
            plan[2 * e + 1] = j;
        }
        __syncthreads();
        if (tid == 0) carry_s = carry + warp_sum[PF_PLAN_THREADS / 32 - 1];
        __syncthreads();
    }
    for (int e = min(max(carry_s, 0), bound) + tid; e < bound; e += PF_PLAN_THREADS) {
        plan[2 * e] = -1;
        plan[2 * e + 1] = -1;
    }
}

/* Packed layout, simple kernel: the sequence owning each query token (-1: none). */
__global__ void pf_paged_qmap_kernel(const int32_t *cu, int64_t cu_s, int batch, int total_q, int32_t *qmap) {
    const int lane = threadIdx.x & 31;
    for (int b = (blockIdx.x * blockDim.x + threadIdx.x) >> 5; b < batch; b += (gridDim.x * blockDim.x) >> 5) {
        int c0 = min(max(cu[(int64_t)b * cu_s], 0), total_q);
        int c1 = min(max(cu[(int64_t)(b + 1) * cu_s], c0), total_q);
        for (int t = c0 + lane; t < c1; t += 32) qmap[t] = b;
    }
}

/* ------------------------------------------------------------------------ */
/* The simple kernel: one warp per (query, head, split), any head dim <= 256  */
/* ------------------------------------------------------------------------ */

#define PF_SIMPLE_WARPS 4

template <typename T>
__global__ void __launch_bounds__(PF_SIMPLE_WARPS * 32)
    pf_paged_attn_simple_kernel(const pf_paged_args a, const int32_t *qmap) {
    const int lane = threadIdx.x & 31;
    int64_t item = (int64_t)blockIdx.x * PF_SIMPLE_WARPS + (threadIdx.x >> 5);
    const int split = (int)(item % a.num_splits);
    item /= a.num_splits;
    const int head = (int)(item % a.num_heads);
    const int64_t qidx64 = item / a.num_heads;
    if (qidx64 >= a.total_q) return;
    const int qidx = (int)qidx64;
    int b, i;
    if (a.cu_seqlens_q) {
        b = qmap[qidx];
        if (b < 0) return; /* a token no sequence owns (inconsistent cu_seqlens_q): left alone */
        i = qidx - pf_seq_info_of(a, b).tok0;
    } else {
        b = qidx / a.q_len;
        i = qidx % a.q_len;
    }
    const pf_seq_info si = pf_seq_info_of(a, b);
    const int kvh = head / a.group;
    const int p = si.seq_len - si.q_len + i;
    int lo, hi;
    pf_row_bounds(a, p, si.seq_len, lo, hi);
    lo = max(lo, 0);
    int s_lo, s_hi;
    pf_split_range(lo, max(hi + 1, lo), split, a.num_splits, 64, s_lo, s_hi);
    const float slope = a.alibi ? a.alibi[(int64_t)b * a.al_sb + (int64_t)head * a.al_sh] * PF_LOG2E_F : 0.f;

    const T *qp = reinterpret_cast<const T *>(a.q) + (int64_t)b * a.q_sb + (int64_t)(si.tok0 + i) * a.q_st +
                  (int64_t)head * a.q_sh;
    float qv[8], acc[8];
#pragma unroll
    for (int k = 0; k < 8; k++) {
        const int d = lane + 32 * k;
        qv[k] = d < a.head_dim ? pf_cu_to_float(qp[d]) : 0.f;
        acc[k] = 0.f;
    }
    const T *kb = reinterpret_cast<const T *>(a.k_cache) + (int64_t)kvh * a.k_sh;
    const T *vb = reinterpret_cast<const T *>(a.v_cache) + (int64_t)kvh * a.v_sh;
    float m_run = -INFINITY, l_run = 0.f;
    for (int t = s_lo; t < s_hi; t++) {
        const int id = pf_block_of(a, b, t);
        if (id < 0) continue; /* a bad block id: its tokens contribute nothing */
        const int off = pf_offset_in_block(a, t);
        const T *kr = kb + (int64_t)id * a.k_sblk + (int64_t)off * a.k_stok;
        const T *vr = vb + (int64_t)id * a.v_sblk + (int64_t)off * a.v_stok;
        float dot = 0.f, vv[8];
#pragma unroll
        for (int k = 0; k < 8; k++) {
            const int d = lane + 32 * k;
            const bool in = d < a.head_dim;
            dot += in ? qv[k] * pf_cu_to_float(kr[d]) : 0.f;
            vv[k] = in ? pf_cu_to_float(vr[d]) : 0.f;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        float x = a.cap_log2 != 0.f ? a.cap_log2 * pf_tanh(dot * a.qk_scale) : dot * a.qk_scale;
        x -= slope * (float)abs(p - t);
        const float m_new = fmaxf(m_run, x);
        const float alpha = exp2f(m_run - m_new);
        const float pr = exp2f(x - m_new);
        l_run = l_run * alpha + pr;
#pragma unroll
        for (int k = 0; k < 8; k++) acc[k] = acc[k] * alpha + pr * vv[k];
        m_run = m_new;
    }
    const float inv = l_run > 0.f ? 1.f / l_run : 0.f;
    const float lse = l_run > 0.f ? (m_run + __log2f(l_run)) * PF_LN2_F : -INFINITY;
    if (a.num_splits > 1) {
        float *dst = a.o_part + (((int64_t)split * a.total_q + qidx) * a.num_heads + head) * a.head_dim;
#pragma unroll
        for (int k = 0; k < 8; k++) {
            const int d = lane + 32 * k;
            if (d < a.head_dim) dst[d] = acc[k] * inv;
        }
        if (lane == 0) a.lse_part[((int64_t)split * a.total_q + qidx) * a.num_heads + head] = lse;
    } else {
        T *dst = reinterpret_cast<T *>(a.out) + (int64_t)b * a.o_sb + (int64_t)(si.tok0 + i) * a.o_st +
                 (int64_t)head * a.o_sh;
#pragma unroll
        for (int k = 0; k < 8; k++) {
            const int d = lane + 32 * k;
            if (d < a.head_dim) dst[d] = pf_cu_from_float<T>(acc[k] * inv);
        }
        if (lane == 0 && a.lse) a.lse[(int64_t)head * a.lse_sh + (int64_t)qidx * a.lse_st] = lse;
    }
}

/* ------------------------------------------------------------------------ */
/* Combine: out = sum_s exp(lse_s - lse) o_s, lse = logsumexp_s lse_s          */
/* ------------------------------------------------------------------------ */


struct pf_combine_args {
    const float *o_part, *lse_part;
    const int32_t *qmap;   /* packed + simple kernel: rows no sequence owns are skipped */
    void *out;
    float *lse;
    int num_splits, total_q, num_heads, head_dim;
    int qdiv;              /* qidx -> (qidx / qdiv, qidx % qdiv) */
    int64_t s0, s1, sh;    /* out strides for those two indices and the head */
    int64_t lse_sh, lse_st;
};

/* One CTA of 128 threads per (query, head) row. The weights exp(lse_s - lse) go to
 * shared memory; then the threads split the row's columns (float4 when head_dim
 * % 4 == 0) and the splits (groups of threads take every G-th split, several
 * loads in flight each), and the groups' sums meet in shared memory. */
#define PF_COMBINE_THREADS 128

template <typename T>
__global__ void __launch_bounds__(PF_COMBINE_THREADS) pf_paged_combine_kernel(const pf_combine_args c) {
    __shared__ float wsm[PF_PAGED_MAX_SPLITS];
    __shared__ float red[PF_COMBINE_THREADS / 32];
    __shared__ __align__(16) float part[PF_COMBINE_THREADS * 4];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int64_t item = blockIdx.x;
    const int qidx = (int)(item / c.num_heads), head = (int)(item % c.num_heads);
    if (c.qmap && c.qmap[qidx] < 0) return; /* uniform over the CTA */
    const int64_t row_stride = (int64_t)c.total_q * c.num_heads;
    const float *lp = c.lse_part + (int64_t)qidx * c.num_heads + head;

    /* max and sum over the splits' lse */
    float mx = -INFINITY;
    for (int s = tid; s < c.num_splits; s += PF_COMBINE_THREADS) mx = fmaxf(mx, lp[s * row_stride]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    if (lane == 0) red[warp] = mx;
    __syncthreads();
    mx = red[0];
#pragma unroll
    for (int w = 1; w < PF_COMBINE_THREADS / 32; w++) mx = fmaxf(mx, red[w]);
    __syncthreads();
    float sum = 0.f;
    for (int s = tid; s < c.num_splits; s += PF_COMBINE_THREADS) {
        const float l = lp[s * row_stride];
        sum += l == -INFINITY ? 0.f : __expf(l - mx);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (lane == 0) red[warp] = sum;
    __syncthreads();
    sum = 0.f;
#pragma unroll
    for (int w = 0; w < PF_COMBINE_THREADS / 32; w++) sum += red[w];
    const float lse = mx == -INFINITY ? -INFINITY : mx + __logf(sum);
    for (int s = tid; s < c.num_splits; s += PF_COMBINE_THREADS) {
        const float l = lp[s * row_stride];
        wsm[s] = l == -INFINITY ? 0.f : __expf(l - lse);
    }
    __syncthreads();

    const float *op = c.o_part + ((int64_t)qidx * c.num_heads + head) * c.head_dim;
    const int64_t split_stride = row_stride * c.head_dim;
    T *dst = reinterpret_cast<T *>(c.out) + (int64_t)(qidx / c.qdiv) * c.s0 + (int64_t)(qidx % c.qdiv) * c.s1 +
             (int64_t)head * c.sh;
    const bool empty = mx == -INFINITY;
    if (c.head_dim % 4 == 0 && c.head_dim <= 4 * PF_COMBINE_THREADS) {
        const int cols = c.head_dim / 4;
        const int groups = PF_COMBINE_THREADS / cols;
        const int grp = tid / cols, col = tid % cols;
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
        if (grp < groups) {
            int s = grp;
#pragma unroll 4
            for (; s < c.num_splits; s += groups) {
                const float w = wsm[s];
                const float4 v = reinterpret_cast<const float4 *>(op + s * split_stride)[col];
                acc.x += w * v.x;
                acc.y += w * v.y;
                acc.z += w * v.z;
                acc.w += w * v.w;
            }
            reinterpret_cast<float4 *>(part)[grp * cols + col] = acc;
        }
        __syncthreads();
        if (tid < cols) {
            float4 r = reinterpret_cast<const float4 *>(part)[tid];
            for (int gg = 1; gg < groups; gg++) {
                const float4 v = reinterpret_cast<const float4 *>(part)[gg * cols + tid];
                r.x += v.x;
                r.y += v.y;
                r.z += v.z;
                r.w += v.w;
            }
            if (empty) r = make_float4(0.f, 0.f, 0.f, 0.f);
            dst[4 * tid + 0] = pf_cu_from_float<T>(r.x);
            dst[4 * tid + 1] = pf_cu_from_float<T>(r.y);
            dst[4 * tid + 2] = pf_cu_from_float<T>(r.z);
            dst[4 * tid + 3] = pf_cu_from_float<T>(r.w);
        }
    } else {
        for (int d = tid; d < c.head_dim; d += PF_COMBINE_THREADS) {
            float acc = 0.f;
#pragma unroll 4
            for (int s = 0; s < c.num_splits; s++) acc += wsm[s] * op[s * split_stride + d];
            dst[d] = pf_cu_from_float<T>(empty ? 0.f : acc);
        }
    }
    if (tid == 0 && c.lse) c.lse[(int64_t)head * c.lse_sh + (int64_t)qidx * c.lse_st] = lse;
}

/* One warp per (query, head) row for up to kMaxSplits splits and head_dim % 4 == 0,
 * <= 128: lane s reads split s's lse while every lane already has its float4 column
 * of all the splits' partial rows in flight (the loads do not depend on the weights),
 * so the row costs one round trip to memory; shuffles give the maximum and the sum
 * and the weights come from lane s. The CTA kernel above takes the rest. */
#define PF_COMBINE_WARP_ROWS 4

template <typename T, int kMaxSplits>
__global__ void __launch_bounds__(PF_COMBINE_WARP_ROWS * 32, 1) pf_paged_combine_warp_kernel(const pf_combine_args c) {
    const int lane = threadIdx.x & 31;
    const int64_t rows = (int64_t)c.total_q * c.num_heads;
    const int64_t row = (int64_t)blockIdx.x * PF_COMBINE_WARP_ROWS + (threadIdx.x >> 5);
    if (row >= rows) return; /* uniform over the warp */
    const int qidx = (int)(row / c.num_heads), head = (int)(row % c.num_heads);
    if (c.qmap && c.qmap[qidx] < 0) return;
    const int n = c.num_splits, cols = c.head_dim / 4;
    const bool has_col = lane < cols;
    /* unconditional loads (split and column clamped into range; a clamped split gets
     * weight 0 and every partial is finite), all issued before the lse reduction */
    const float4 *op = reinterpret_cast<const float4 *>(c.o_part + row * c.head_dim) + min(lane, cols - 1);
    float4 v[kMaxSplits];
#pragma unroll
    for (int s = 0; s < kMaxSplits; s++) v[s] = op[(int64_t)min(s, n - 1) * rows * cols];
    const float l = lane < n ? c.lse_part[lane * rows + row] : -INFINITY;
    /* pin every loaded value here, so the compiler cannot sink the loads to their uses */
#pragma unroll
    for (int s = 0; s < kMaxSplits; s++)
        asm volatile("" : "+f"(v[s].x), "+f"(v[s].y), "+f"(v[s].z), "+f"(v[s].w));
    float mx = l;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    const float e = l == -INFINITY ? 0.f : __expf(l - mx);
    float sum = e;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    const bool empty = mx == -INFINITY;
    const float w = empty ? 0.f : e / sum;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int s = 0; s < kMaxSplits; s++) {
        const float ws = __shfl_sync(0xffffffffu, w, s); /* 0 for s >= n (lse -inf) */
        acc.x += ws * v[s].x;
        acc.y += ws * v[s].y;
        acc.z += ws * v[s].z;
        acc.w += ws * v[s].w;
    }
    if (has_col) {
        T *dst = reinterpret_cast<T *>(c.out) + (int64_t)(qidx / c.qdiv) * c.s0 + (int64_t)(qidx % c.qdiv) * c.s1 +
                 (int64_t)head * c.sh + 4 * lane;
        dst[0] = pf_cu_from_float<T>(acc.x);
        dst[1] = pf_cu_from_float<T>(acc.y);
        dst[2] = pf_cu_from_float<T>(acc.z);
        dst[3] = pf_cu_from_float<T>(acc.w);
    }
    if (lane == 0 && c.lse)
        c.lse[(int64_t)head * c.lse_sh + (int64_t)qidx * c.lse_st] = empty ? -INFINITY : mx + __logf(sum);
}

/* ------------------------------------------------------------------------ */
/* The launcher                                                               */
/* ------------------------------------------------------------------------ */

template <typename T>
static pf_status pf_launch_simple(const pf_paged_args &a, const int32_t *qmap, cudaStream_t stream) {
    const int64_t warps = (int64_t)a.total_q * a.num_heads * a.num_splits;
    const int64_t blocks = (warps + PF_SIMPLE_WARPS - 1) / PF_SIMPLE_WARPS;
    pf_paged_attn_simple_kernel<T><<<(unsigned)blocks, PF_SIMPLE_WARPS * 32, 0, stream>>>(a, qmap);
    PF_CUDA_CHECK_LAUNCH();
    return PF_STATUS_OK;
}

template <typename T>
static pf_status pf_launch_combine(const pf_combine_args &c, cudaStream_t stream) {
    const int64_t rows = (int64_t)c.total_q * c.num_heads;
    const char *e = getenv("PAGEDFLASH_PAGED_COMBINE");
    if (c.num_splits <= 16 && c.head_dim % 4 == 0 && c.head_dim <= 128 && !(e && atoi(e) == 1)) {
        const int64_t blocks = (rows + PF_COMBINE_WARP_ROWS - 1) / PF_COMBINE_WARP_ROWS;
        if (c.num_splits <= 4)
            pf_paged_combine_warp_kernel<T, 4><<<(unsigned)blocks, PF_COMBINE_WARP_ROWS * 32, 0, stream>>>(c);
        else
            pf_paged_combine_warp_kernel<T, 16><<<(unsigned)blocks, PF_COMBINE_WARP_ROWS * 32, 0, stream>>>(c);
        PF_CUDA_CHECK_LAUNCH();
        return PF_STATUS_OK;
    }
    pf_paged_combine_kernel<T><<<(unsigned)rows, PF_COMBINE_THREADS, 0, stream>>>(c);
    PF_CUDA_CHECK_LAUNCH();
    return PF_STATUS_OK;
}

static bool pf_aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

/* Work items of the tensor-core kernel for the CTA shape in a.kv_per_cta. */
static int64_t pf_paged_work(const pf_paged_args &a, bool has_cu) {
    const int64_t kv_groups = (a.num_kv_heads + a.kv_per_cta - 1) / a.kv_per_cta;
    return (int64_t)a.num_row_tiles * kv_groups * (has_cu ? 1 : a.batch);
}

/* At most one split per PF_PAGED_MIN_SPLIT_TOKENS tokens of the longest possible
 * sequence, and PF_PAGED_MAX_SPLITS. */
static int64_t pf_split_cap(const pf_paged_args &a) {
    const int64_t by_len = (int64_t)a.max_blocks * a.block_size / PF_PAGED_MIN_SPLIT_TOKENS;
    return by_len < 1 ? 1 : by_len < PF_PAGED_MAX_SPLITS ? by_len : PF_PAGED_MAX_SPLITS;
}

/* The automatic split count: enough CTAs to fill the GPU once, within pf_split_cap. */
static int64_t pf_auto_splits(const pf_paged_args &a, int64_t work, int sms, int occupancy) {
    const int64_t capacity = (int64_t)sms * (occupancy > 0 ? occupancy : 1) * PF_PAGED_TARGET_WAVES;
    const int64_t splits = work >= capacity ? 1 : capacity / work;
    const int64_t cap = pf_split_cap(a);
    return splits < cap ? splits : cap;
}

/* The CTA shape when head mode would split (automatic split count, decode-sized row
 * tiles, the ring's head dims 64 / 128): token mode (1 KV head x 4 warps, 2 CTAs per SM)
 * when it needs no split and head mode's splits would be short (<= 1024 tokens), so no
 * combine runs; 1 KV head x 8 warps when head mode would take more than 16 splits (it
 * cuts them 8x and the merge of a head's 8 warps happens in shared memory). Measured on
 * an H200, 32 / 8 heads, d = 128, bf16 (us, head mode -> chosen shape): b32/1k 40.9 -> 38.4,
 * b32/4k 132.5 -> 130.1, b1/16k 33.4 -> 26.4, b1/64k 80.9 -> 74.1; head mode stays where
 * it was fastest: b32/16k 486.8 (token mode 496.1), b8/16k 131.4 (1x8 140.8, token mode
 * 133.3), b1/4k 13.7 (1x8 13.6). On return a (kv_per_cta, warps, ring), *occupancy and
 * *work describe the chosen shape. */
static pf_status pf_pick_shape(pf_paged_args &a, pf_paged_fn fast, int rows, bool has_cu, int sms,
                               cudaStream_t stream, int *occupancy, int64_t *work) {
    if (a.kv_per_cta < 4 || a.ring != 1 || rows != 8 || (a.head_dim != 64 && a.head_dim != 128)) return PF_STATUS_OK;
    const int64_t s_head = pf_auto_splits(a, *work, sms, *occupancy);
    if (s_head <= 1) return PF_STATUS_OK;
    const pf_paged_args head = a;
    /* switches a to heads x warps when that shape exists and takes at most max_splits
     * splits; a stays head mode otherwise */
    auto take = [&](int heads, int warps, int64_t max_splits, bool *taken) -> pf_status {
        a.kv_per_cta = heads;
        a.warps = warps;
        int occ = 1;
        PF_TRY(fast(&a, rows, stream, 0, &occ)); /* may normalize the shape */
        const int64_t w = pf_paged_work(a, has_cu);
        *taken = a.kv_per_cta == heads && a.warps == warps && pf_auto_splits(a, w, sms, occ) <= max_splits;
        if (*taken) {
            *occupancy = occ;
            *work = w;
        } else {
            a = head;
        }
        return PF_STATUS_OK;
    };
    bool taken = false;
    if ((int64_t)a.max_blocks * a.block_size / s_head <= 1024) PF_TRY(take(1, 4, 1, &taken));
    if (!taken && s_head > 16) PF_TRY(take(1, 8, s_head - 1, &taken));
    return PF_STATUS_OK;
}

static size_t pf_round_up(size_t x, size_t to) { return (x + to - 1) / to * to; }

static pf_status pf_paged_enqueue(pf_paged_args &a, pf_paged_fn fast, int rows, int64_t splits, bool has_cu,
                                  size_t o_bytes, size_t l_bytes, char *wp, pf_dtype dtype, cudaStream_t stream);

extern "C" pf_status pf_cuda_paged_attn(const pf_paged_params *p) {
    pf_cuda_device_guard guard;
    PF_TRY(guard.set(p->q.device_id));
    cudaStream_t stream = (cudaStream_t)p->stream;

    const pf_tensor &q = p->q, &o = p->out, &kc = p->k_cache, &vc = p->v_cache;
    const bool has_cu = pf_tensor_present(&p->cu_seqlens_q) || p->cu_seqlens_q.ndim > 0;
    pf_paged_args a;
    memset(&a, 0, sizeof a);
    a.q = q.data;
    a.out = o.data;
    a.k_cache = kc.data;
    a.v_cache = vc.data;
    a.block_tables = (const int32_t *)p->block_tables.data;
    a.seq_lens = (const int32_t *)p->seq_lens.data;
    a.batch = (int)p->block_tables.shape[0];
    a.max_blocks = (int)p->block_tables.shape[1];
    a.bt_sb = p->block_tables.strides[0];
    a.bt_sj = p->block_tables.strides[1];
    a.sl_s = p->seq_lens.strides[0];
    const int hd = q.ndim - 1;
    a.head_dim = (int)q.shape[hd];
    a.num_heads = (int)q.shape[hd - 1];
    a.q_sh = q.strides[hd - 1];
    a.o_sh = o.strides[hd - 1];
    if (has_cu) {
        a.cu_seqlens_q = (const int32_t *)p->cu_seqlens_q.data;
        a.cu_s = p->cu_seqlens_q.strides[0];
        a.total_q = (int)q.shape[0];
        a.q_len = 0;
        a.q_sb = 0;
        a.q_st = q.strides[0];
        a.o_sb = 0;
        a.o_st = o.strides[0];
    } else if (q.ndim == 4) {
        a.q_len = (int)q.shape[1];
        a.total_q = a.batch * a.q_len;
        a.q_sb = q.strides[0];
        a.q_st = q.strides[1];
        a.o_sb = o.strides[0];
        a.o_st = o.strides[1];
    } else {
        a.q_len = 1;
        a.total_q = a.batch;
        a.q_sb = q.strides[0];
        a.q_st = 0;
        a.o_sb = o.strides[0];
        a.o_st = 0;
    }
    if (a.total_q == 0 || a.batch == 0) return PF_STATUS_OK;
    a.num_blocks = (int)kc.shape[0];
    a.block_size = (int)kc.shape[1];
    a.num_kv_heads = (int)kc.shape[2];
    a.group = a.num_heads / a.num_kv_heads;
    /* division by block_size as (umulhi(t, magic) + t) >> shift, exact for t < 2^31 */
    {
        unsigned l = 0;
        while ((1u << l) < (unsigned)a.block_size) l++;
        a.bs_shift = l;
        a.bs_magic = (unsigned)((((uint64_t)1 << 32) * (((uint64_t)1 << l) - (uint64_t)a.block_size)) /
                                    (uint64_t)a.block_size +
                                1);
        if (a.block_size == 1) a.bs_magic = 0;
    }
    a.k_sblk = kc.strides[0];
    a.k_stok = kc.strides[1];
    a.k_sh = kc.strides[2];
    a.v_sblk = vc.strides[0];
    a.v_stok = vc.strides[1];
    a.v_sh = vc.strides[2];
    if (pf_tensor_present(&p->alibi_slopes)) {
        a.alibi = (const float *)p->alibi_slopes.data;
        if (p->alibi_slopes.ndim == 2) {
            a.al_sb = p->alibi_slopes.strides[0];
            a.al_sh = p->alibi_slopes.strides[1];
        } else {
            a.al_sb = 0;
            a.al_sh = p->alibi_slopes.strides[0];
        }
    }
    if (pf_tensor_present(&p->lse)) {
        a.lse = (float *)p->lse.data;
        a.lse_sh = p->lse.strides[0];
        a.lse_st = p->lse.strides[1];
    }
    const float scale = p->softmax_scale != 0.f ? p->softmax_scale : 1.0f / sqrtf((float)a.head_dim);
    if (p->softcap > 0.f) {
        a.qk_scale = scale / p->softcap;
        a.cap_log2 = p->softcap * PF_LOG2E_F;
    } else {
        a.qk_scale = scale * PF_LOG2E_F;
        a.cap_log2 = 0.f;
    }
    a.causal = p->causal != 0;
    a.window_left = p->window_left;
    a.window_right = p->window_right;

    /* the tensor-core kernel needs 16-byte aligned rows */
    pf_paged_fn fast = pf_paged_entry(a.head_dim, q.dtype);
    if (fast) {
        const bool ok = pf_aligned16(a.q) && pf_aligned16(a.out) && pf_aligned16(a.k_cache) &&
                        pf_aligned16(a.v_cache) && a.q_sb % 8 == 0 && a.q_st % 8 == 0 && a.q_sh % 8 == 0 &&
                        a.o_sb % 8 == 0 && a.o_st % 8 == 0 && a.o_sh % 8 == 0 && a.k_sblk % 8 == 0 &&
                        a.k_stok % 8 == 0 && a.k_sh % 8 == 0 && a.v_sblk % 8 == 0 && a.v_stok % 8 == 0 &&
                        a.v_sh % 8 == 0;
        if (!ok) fast = NULL;
    }

    /* work items and the split count */
    int sms = 0;
    {
        int dev = 0;
        PF_CUDA_CHECK(cudaGetDevice(&dev));
        PF_TRY(pf::cuda::sm_count(dev, &sms));
    }
    int rows = 8, occupancy = 1;
    int64_t work;
    if (fast) {
        const int64_t rows_per_seq = has_cu ? 16 : (int64_t)a.q_len * a.group;
        rows = (rows_per_seq > 8 && a.head_dim <= 128) ? 16 : 8;
        if (has_cu)
            a.num_row_tiles = (int)(a.batch + ((int64_t)a.total_q * a.group + rows - 1) / rows);
        else
            a.num_row_tiles = (int)((rows_per_seq + rows - 1) / rows);
        /* head mode (each warp one KV head, the CTA reading 4 heads' rows of every token
         * together) unless there are fewer KV heads than warps */
        a.kv_per_cta = a.num_kv_heads % 8 == 0 ? 8 : a.num_kv_heads >= 4 ? 4 : 1;
        a.warps = a.kv_per_cta == 8 ? 8 : 4;
        const char *e = getenv("PAGEDFLASH_PAGED_MODE");
        {
            /* PAGEDFLASH_PAGED_MODE: 0 / 1 / 2 = token / 4-warp head / 8-warp head mode, or
             * "HxW": H KV heads per CTA of W warps (1x8, 2x8, 4x8: several warps per head) */
            int mh = -1, mw = -1;
            if (e && sscanf(e, "%dx%d", &mh, &mw) == 2) {
                a.kv_per_cta = mh;
                a.warps = mw;
            } else if (e) {
                const int override = atoi(e);
                if (override == 0) a.kv_per_cta = 1, a.warps = 4;
                if (override == 1) a.kv_per_cta = 4, a.warps = 4;
                if (override == 2) a.kv_per_cta = 8, a.warps = 8;
            }
            const char *r = getenv("PAGEDFLASH_PAGED_RING");
            a.ring = r ? atoi(r) : 1;
            if (a.ring < 0 || a.ring > 2) a.ring = 0;
        }
        PF_TRY(fast(&a, rows, stream, 0, &occupancy));
        work = pf_paged_work(a, has_cu);
        if (!e && p->num_splits <= 0)
            PF_TRY(pf_pick_shape(a, fast, rows, has_cu, sms, stream, &occupancy, &work));
    } else {
        static int simple_occ[3];
        const int di = q.dtype == PF_DTYPE_F32 ? 0 : q.dtype == PF_DTYPE_F16 ? 1 : 2;
        if (simple_occ[di] == 0) {
            int occ = 1;
            if (di == 0)
                PF_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                    &occ, pf_paged_attn_simple_kernel<float>, PF_SIMPLE_WARPS * 32, 0));
            else if (di == 1)
                PF_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                    &occ, pf_paged_attn_simple_kernel<__half>, PF_SIMPLE_WARPS * 32, 0));
            else
                PF_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                    &occ, pf_paged_attn_simple_kernel<__nv_bfloat16>, PF_SIMPLE_WARPS * 32, 0));
            simple_occ[di] = occ > 0 ? occ : 1;
        }
        occupancy = simple_occ[di];
        work = ((int64_t)a.total_q * a.num_heads + PF_SIMPLE_WARPS - 1) / PF_SIMPLE_WARPS;
    }
    int64_t splits;
    if (p->num_splits > 0) {
        const int64_t cap = pf_split_cap(a);
        splits = p->num_splits < cap ? p->num_splits : cap;
    } else {
        splits = pf_auto_splits(a, work, sms, occupancy);
    }
    a.num_splits = (int)splits;

    /* workspace: split partials, plan / query map */
    size_t o_bytes = 0, l_bytes = 0, plan_bytes = 0;
    if (splits > 1) {
        o_bytes = pf_round_up((size_t)splits * a.total_q * a.num_heads * a.head_dim * sizeof(float), 256);
        l_bytes = pf_round_up((size_t)splits * a.total_q * a.num_heads * sizeof(float), 256);
    }
    if (has_cu)
        plan_bytes = pf_round_up(fast ? (size_t)a.num_row_tiles * 2 * sizeof(int32_t)
                                      : (size_t)a.total_q * sizeof(int32_t),
                                 256);
    pf_cuda_scratch scratch;
    PF_TRY(pf_cuda_scratch_acquire(stream, o_bytes + l_bytes + plan_bytes, &scratch));
    pf_status st = pf_paged_enqueue(a, fast, rows, splits, has_cu, o_bytes, l_bytes, (char *)scratch.ptr, q.dtype,
                                    stream);
    pf_status st2 = pf_cuda_scratch_release(stream, &scratch);
    return st != PF_STATUS_OK ? st : st2;
}

/* Everything after the workspace is in hand: plan, main kernel, combine. */
static pf_status pf_paged_enqueue(pf_paged_args &a, pf_paged_fn fast, int rows, int64_t splits, bool has_cu,
                                  size_t o_bytes, size_t l_bytes, char *wp, pf_dtype dtype, cudaStream_t stream) {
    if (splits > 1) {
        a.o_part = (float *)wp;
        a.lse_part = (float *)(wp + o_bytes);
    }
    int32_t *qmap = NULL;
    if (has_cu) {
        int32_t *pl = (int32_t *)(wp + o_bytes + l_bytes);
        if (fast) {
            pf_paged_plan_kernel<<<1, PF_PLAN_THREADS, 0, stream>>>(a.cu_seqlens_q, a.cu_s, a.batch, a.total_q,
                                                                    a.group, rows, a.num_row_tiles, pl);
            PF_CUDA_CHECK_LAUNCH();
            a.plan = pl;
        } else {
            PF_CUDA_CHECK(cudaMemsetAsync(pl, 0xff, (size_t)a.total_q * sizeof(int32_t), stream));
            int blocks = (int)((a.batch + 7) / 8);
            if (blocks > 4096) blocks = 4096;
            pf_paged_qmap_kernel<<<blocks, 256, 0, stream>>>(a.cu_seqlens_q, a.cu_s, a.batch, a.total_q, pl);
            PF_CUDA_CHECK_LAUNCH();
            qmap = pl;
        }
    }

    if (fast) {
        PF_TRY(fast(&a, rows, stream, 1, NULL));
    } else if (dtype == PF_DTYPE_F32) {
        PF_TRY(pf_launch_simple<float>(a, qmap, stream));
    } else if (dtype == PF_DTYPE_F16) {
        PF_TRY(pf_launch_simple<__half>(a, qmap, stream));
    } else {
        PF_TRY(pf_launch_simple<__nv_bfloat16>(a, qmap, stream));
    }

    if (splits > 1) {
        pf_combine_args c;
        memset(&c, 0, sizeof c);
        c.o_part = a.o_part;
        c.lse_part = a.lse_part;
        c.qmap = qmap;
        c.out = a.out;
        c.lse = a.lse;
        c.lse_sh = a.lse_sh;
        c.lse_st = a.lse_st;
        c.num_splits = a.num_splits;
        c.total_q = a.total_q;
        c.num_heads = a.num_heads;
        c.head_dim = a.head_dim;
        c.sh = a.o_sh;
        if (has_cu) {
            c.qdiv = 1;
            c.s0 = a.o_st;
            c.s1 = 0;
        } else {
            c.qdiv = a.q_len;
            c.s0 = a.o_sb;
            c.s1 = a.o_st;
        }
        if (dtype == PF_DTYPE_F32)
            PF_TRY(pf_launch_combine<float>(c, stream));
        else if (dtype == PF_DTYPE_F16)
            PF_TRY(pf_launch_combine<__half>(c, stream));
        else
            PF_TRY(pf_launch_combine<__nv_bfloat16>(c, stream));
    }
    return PF_STATUS_OK;
}
