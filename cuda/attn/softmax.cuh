/*
 * attn/softmax.cuh - the online softmax of the CUDA attention kernels, in the
 * log2 domain (scores y from attn/score.cuh, P = exp2(y - m)):
 *
 *   online_softmax      one m16 slice of S (mma C fragments, the forward kernels
 *                       on sm_80 and sm_90): the new running row max m, the
 *                       factor alpha = exp2(m_old - m_new) for the output
 *                       accumulator, S -> P = exp2(S - m), and the running row sum
 *                       l = l alpha + sum P, kept per thread (the quad of lanes
 *                       sharing a row reduces it once, at the end);
 *   softmax_finish_row  the end of a row held by a quad: l, lse, 1 / l;
 *   finish_row          that end for a kernel that holds the whole l (float32);
 *   lse_to_log2         the backward's inverse: P = exp2(y - lse log2 e).
 *
 * A row that sees no key keeps m = -inf and l = 0: its output is 0 and its lse
 * -inf (lse_to_log2 turns that into +inf, so the backward recomputes P = 0).
 * `sc` scales scores inside the exp2 (kernels without score extras fold the
 * softmax scale in here; with extras the scores are already scaled and sc = 1).
 */
#ifndef PF_ATTN_SOFTMAX_CUH
#define PF_ATTN_SOFTMAX_CUH

#include "attn/math.cuh"

namespace pf {
namespace cuda {

/* One online-softmax step over an m16 slice s[kNT][4] (rows g and g + 8 of the slice,
 * attn/mma.cuh): row_max / row_sum are this thread's running max and partial sum of its
 * two rows, alpha receives exp2(m_old - m_new) per row. Returns whether any alpha != 1
 * (the caller may skip rescaling its output when no row of the warp got a new max). */
template <int kNT>
PF_DEV bool online_softmax(float (&s)[kNT][4], float (&row_max)[2], float (&row_sum)[2], float (&alpha)[2], float sc) {
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

/* The end of a finished row: its max row_max (times sc: the log2-domain max, attn/score.cuh)
 * and sum l -> *lse (natural log; -inf for a row that saw nothing, l == 0) and the factor of
 * its output, out_scale / l (0 for such a row). Has_out_scale: out_scale = 1 / (1 - p) under
 * dropout; without it the factor is 1 / l, a compile-time 1 so that the division is one
 * reciprocal. row_max * sc + log2 l is one fma. */
template <bool Has_out_scale>
PF_DEV float finish_row(float row_max, float sc, float l, float out_scale, float *lse) {
    *lse = l > 0.0f ? (row_max * sc + __log2f(l)) * kLn2 : -INFINITY;
    return l > 0.0f ? (Has_out_scale ? out_scale : 1.0f) / l : 0.0f;
}

/* finish_row for one row half of online_softmax: the quad's l first. */
template <bool Has_out_scale>
PF_DEV float softmax_finish_row(float row_max, float row_sum, float sc, float out_scale, float *lse) {
    return finish_row<Has_out_scale>(row_max, sc, quad_sum(row_sum), out_scale, lse);
}

/* The backward's exp2 offset of a row: lse log2(e), or +inf for a row the forward masked
 * completely (lse = -inf), so that P = exp2(y - offset) = 0 there. */
PF_DEV float lse_to_log2(float lse) { return lse == -INFINITY ? INFINITY : lse * kLog2e; }

/* The same for a row that may lie past the sequence (row_valid false: +inf too), as one
 * select: the lse is read either way, no branch around its load. */
PF_DEV float lse_to_log2(float lse, bool row_valid) {
    return (row_valid && lse != -INFINITY) ? lse * kLog2e : INFINITY;
}

}  // namespace cuda
}  // namespace pf

#endif /* PF_ATTN_SOFTMAX_CUH */
