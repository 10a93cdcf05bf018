/*
 * attn/merge.cuh - the n-way log-sum-exp merge of partial attention results
 * computed over disjoint key sets, the one statement of its math for every
 * CUDA caller (paged attention's split-KV merge and pf_merge_attn_states, both
 * launched from paged/merge.cu):
 *
 *   lse = log sum_s exp(lse_s),  out = sum_s exp(lse_s - lse) out_s      (float32)
 *
 * A partial whose lse is -inf contributes nothing; all -inf gives out = 0 and
 * lse = -inf; a NaN lse gives NaN (out and lse).
 *
 * A row is one (query token, head); its partials are addressed by a Rows policy
 * (the two are in paged/merge.cu), which also converts to float and stores:
 *
 *   static constexpr bool kLseFirst;  false: every partial of the row is loaded before
 *                                     the lse are reduced (one round trip to memory;
 *                                     the partials must be finite, a -inf one is read
 *                                     and weighted 0); true: the lse come first and a
 *                                     -inf partial is never read (it may hold NaN)
 *   struct Row;                       the row's coordinates
 *   int64_t rows() const;             rows to merge
 *   Row locate(int64_t row) const;
 *   bool skip(const Row &) const;     a row left alone (unwritten)
 *   int splits() const;               partials per row
 *   int units<kVec>() const;          units of kVec elements per row
 *   float partial_lse(int s, const Row &) const;
 *   void load<kVec>(const Row &, int s, int unit, float (&v)[kVec]) const;
 *   void store<kVec>(const Row &, int unit, const float (&v)[kVec]) const;
 *   void store_lse(const Row &, float lse) const;
 *
 * Two kernels, one per row width:
 *   merge_warp_kernel  one warp per row, kMergeWarpRows rows per CTA, for up to 32
 *     partials (kSplits in registers): lane s holds partial s's lse, lane l the units
 *     l, l + 32, ... of every partial; shuffles give the maximum, the sum and the
 *     weights exp(lse_s - max) / sum (from lane s). With kLseFirst = false all the
 *     row's loads are issued before the lse reduction (the split-KV merge of <= 16
 *     splits, head_dim <= 128); with kLseFirst = true the row is walked in chunks of
 *     32 x kUnits units after the weights (any head_dim).
 *   merge_cta_kernel   kMergeCtaWarps warps per row for many partials or wide rows:
 *     warp w takes partials w, w + 8, ... in passes of kSplitsPerWarp (loads of a
 *     pass all in flight, as above), keeps an online (max, sum, unnormalized sum of
 *     weighted partials), and the warps meet in shared memory: out = sum_w
 *     exp(max_w - M) acc_w / L, L = sum_w exp(max_w - M) sum_w, M = max_w max_w.
 *
 * In place: out (lse) may be the memory of a partial's out (lse) with the same
 * strides. Every element is read before it is written -- by the lane that writes it
 * (warp kernel) or before the CTA barrier (CTA kernel) -- and a row's lse is written
 * after every read of the row (after the shuffles / the barrier that consume them).
 */
#ifndef PF_ATTN_MERGE_CUH
#define PF_ATTN_MERGE_CUH

#include "attn/math.cuh"

namespace pf {
namespace cuda {

constexpr int kMergeWarpRows = 4; /* rows (one per warp) per CTA of merge_warp_kernel */
constexpr int kMergeCtaWarps = 8; /* warps per row of merge_cta_kernel */

PF_DEV float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

PF_DEV float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

/* exp(lse - max) of one partial's lse, 0 for a -inf one (also when max is -inf). */
PF_DEV float merge_exp(float lse, float max) { return lse == -INFINITY ? 0.f : __expf(lse - max); }

/* A merge with nothing to merge: every lse -inf (a NaN lse makes the sum NaN, not 0). */
PF_DEV bool merge_empty(float sum) { return sum == 0.f; }

/* The merged lse from the maximum and the sum of exp(lse_s - max). */
PF_DEV float merge_lse(float max, float sum) { return merge_empty(sum) ? -INFINITY : max + __logf(sum); }

/* Keeps the compiler from sinking loads to their first use (so that they are all in flight
 * before the reduction that precedes that use). */
template <int kN>
PF_DEV void pin(float (&v)[kN]) {
#pragma unroll
    for (int i = 0; i < kN; i++) asm volatile("" : "+f"(v[i]));
}

template <class Rows, int kSplits, int kVec, int kUnits>
__global__ void __launch_bounds__(kMergeWarpRows * 32, 1) merge_warp_kernel(const Rows r) {
    static_assert(kSplits <= 32, "one partial's lse per lane");
    const int lane = threadIdx.x & 31;
    const int64_t rows = r.rows();
    const int64_t row = (int64_t)blockIdx.x * kMergeWarpRows + (threadIdx.x >> 5);
    if (row >= rows) return; /* uniform over the warp */
    const typename Rows::Row at = r.locate(row);
    if (r.skip(at)) return;
    const int n = r.splits(), units = r.template units<kVec>();

    if constexpr (!Rows::kLseFirst) {
        /* every partial's units in flight first (partial and unit clamped into range: a
         * clamped partial gets weight 0, a clamped unit is not stored) */
        float v[kSplits][kUnits][kVec];
#pragma unroll
        for (int s = 0; s < kSplits; s++)
#pragma unroll
            for (int u = 0; u < kUnits; u++) r.load(at, min(s, n - 1), min(lane + 32 * u, units - 1), v[s][u]);
        const float l = lane < n ? r.partial_lse(lane, at) : -INFINITY;
#pragma unroll
        for (int s = 0; s < kSplits; s++)
#pragma unroll
            for (int u = 0; u < kUnits; u++) pin(v[s][u]);
        const float mx = warp_max(l);
        const float e = merge_exp(l, mx);
        const float sum = warp_sum(e);
        const float w = merge_empty(sum) ? 0.f : e / sum;
        float acc[kUnits][kVec];
#pragma unroll
        for (int u = 0; u < kUnits; u++)
#pragma unroll
            for (int k = 0; k < kVec; k++) acc[u][k] = 0.f;
#pragma unroll
        for (int s = 0; s < kSplits; s++) {
            const float ws = __shfl_sync(0xffffffffu, w, s); /* 0 for s >= n (lse -inf) */
#pragma unroll
            for (int u = 0; u < kUnits; u++)
#pragma unroll
                for (int k = 0; k < kVec; k++) acc[u][k] += ws * v[s][u][k];
        }
#pragma unroll
        for (int u = 0; u < kUnits; u++)
            if (lane + 32 * u < units) r.store(at, lane + 32 * u, acc[u]);
        if (lane == 0) r.store_lse(at, merge_lse(mx, sum));
    } else {
        /* the weights first, then the row in chunks; a -inf partial is never loaded */
        const float l = lane < n ? r.partial_lse(lane, at) : -INFINITY;
        const float mx = warp_max(l);
        const float e = merge_exp(l, mx);
        const float sum = warp_sum(e);
        const float w = merge_empty(sum) ? 0.f : e / sum;
        for (int first = 0; first < units; first += 32 * kUnits) {
            float acc[kUnits][kVec];
#pragma unroll
            for (int u = 0; u < kUnits; u++)
#pragma unroll
                for (int k = 0; k < kVec; k++) acc[u][k] = 0.f;
#pragma unroll
            for (int s = 0; s < kSplits; s++) {
                const float ws = __shfl_sync(0xffffffffu, w, s);
                const bool live = __shfl_sync(0xffffffffu, l, s) != -INFINITY; /* false for s >= n */
#pragma unroll
                for (int u = 0; u < kUnits; u++) {
                    const int unit = first + lane + 32 * u;
                    if (live && unit < units) {
                        float v[kVec];
                        r.load(at, s, unit, v);
#pragma unroll
                        for (int k = 0; k < kVec; k++) acc[u][k] += ws * v[k];
                    }
                }
            }
#pragma unroll
            for (int u = 0; u < kUnits; u++)
                if (first + lane + 32 * u < units) r.store(at, first + lane + 32 * u, acc[u]);
        }
        if (lane == 0) r.store_lse(at, merge_lse(mx, sum));
    }
}

/* One row per CTA of kMergeCtaWarps warps; rows of at most 32 * kUnits units. */
template <class Rows, int kSplitsPerWarp, int kVec, int kUnits>
__global__ void __launch_bounds__(kMergeCtaWarps * 32, 1) merge_cta_kernel(const Rows r) {
    static_assert(kSplitsPerWarp <= 32, "one partial's lse per lane");
    constexpr int kWarps = kMergeCtaWarps;
    constexpr int kRowFloats = kUnits * 32 * kVec;
    __shared__ float sm_max[kWarps], sm_sum[kWarps];
    __shared__ __align__(16) float sm_acc[kWarps][kRowFloats];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const typename Rows::Row at = r.locate((int64_t)blockIdx.x);
    if (r.skip(at)) return; /* uniform over the CTA */
    const int n = r.splits(), units = r.template units<kVec>();

    /* this warp's partials: warp + kWarps * j, in passes of kSplitsPerWarp */
    float m_run = -INFINITY, l_run = 0.f, acc[kUnits][kVec];
#pragma unroll
    for (int u = 0; u < kUnits; u++)
#pragma unroll
        for (int k = 0; k < kVec; k++) acc[u][k] = 0.f;
    for (int first = warp; first < n; first += kWarps * kSplitsPerWarp) {
        const int s_lane = first + kWarps * lane;
        const float l = lane < kSplitsPerWarp && s_lane < n ? r.partial_lse(s_lane, at) : -INFINITY;
        float v[kSplitsPerWarp][kUnits][kVec];
#pragma unroll
        for (int j = 0; j < kSplitsPerWarp; j++) {
            const int s = first + kWarps * j;
            bool live = s < n;
            if constexpr (Rows::kLseFirst) live = __shfl_sync(0xffffffffu, l, j) != -INFINITY;
#pragma unroll
            for (int u = 0; u < kUnits; u++) {
                if (live) {
                    r.load(at, s, min(lane + 32 * u, units - 1), v[j][u]);
                } else {
#pragma unroll
                    for (int k = 0; k < kVec; k++) v[j][u][k] = 0.f;
                }
            }
        }
#pragma unroll
        for (int j = 0; j < kSplitsPerWarp; j++)
#pragma unroll
            for (int u = 0; u < kUnits; u++) pin(v[j][u]);
        const float m_new = fmaxf(m_run, warp_max(l));
        const float alpha = merge_exp(m_run, m_new);
        const float e = merge_exp(l, m_new);
        l_run = l_run * alpha + warp_sum(e);
#pragma unroll
        for (int u = 0; u < kUnits; u++)
#pragma unroll
            for (int k = 0; k < kVec; k++) acc[u][k] *= alpha;
#pragma unroll
        for (int j = 0; j < kSplitsPerWarp; j++) {
            const float ej = __shfl_sync(0xffffffffu, e, j);
#pragma unroll
            for (int u = 0; u < kUnits; u++)
#pragma unroll
                for (int k = 0; k < kVec; k++) acc[u][k] += ej * v[j][u][k];
        }
        m_run = m_new;
    }

    /* the warps meet in shared memory (every read of the row is behind this barrier) */
    if (lane == 0) {
        sm_max[warp] = m_run;
        sm_sum[warp] = l_run;
    }
#pragma unroll
    for (int u = 0; u < kUnits; u++)
#pragma unroll
        for (int k = 0; k < kVec; k++) sm_acc[warp][(lane + 32 * u) * kVec + k] = acc[u][k];
    __syncthreads();
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; w++) mx = fmaxf(mx, sm_max[w]);
    float scale[kWarps], sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; w++) {
        scale[w] = merge_exp(sm_max[w], mx);
        sum += scale[w] * sm_sum[w];
    }
    const float inv = merge_empty(sum) ? 0.f : 1.f / sum;
    for (int unit = threadIdx.x; unit < units; unit += kWarps * 32) {
        float o[kVec];
#pragma unroll
        for (int k = 0; k < kVec; k++) {
            float x = 0.f;
#pragma unroll
            for (int w = 0; w < kWarps; w++) x += scale[w] * sm_acc[w][unit * kVec + k];
            o[k] = x * inv;
        }
        r.store(at, unit, o);
    }
    if (threadIdx.x == 0) r.store_lse(at, merge_lse(mx, sum));
}

}  // namespace cuda
}  // namespace pf

#endif /* PF_ATTN_MERGE_CUH */
