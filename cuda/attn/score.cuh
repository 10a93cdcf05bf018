/*
 * attn/score.cuh - the score transform of the CUDA attention kernels: a raw
 * product x = q . k becomes the log2-domain logit y that the softmax
 * exponentiates with exp2 (exp(z) = exp2(z log2 e), attn/math.cuh):
 *
 *   plain     y = x * softmax_scale * log2(e)
 *   softcap   y = softcap * log2(e) * tanh(x * softmax_scale / softcap)
 *   ALiBi     y -= slope * log2(e) * |pos - j|   (pos: the query's position on the
 *                                                 key axis, attn/mask.cuh)
 *
 * ScoreParams holds the per-call constants (the launcher precomputes the
 * products). The formula exists once (softcap_tanh, the one tanh of
 * attn/math.cuh) in two shapes:
 *   scores_to_log2  one m16 slice of S in the mma C-fragment layout (the
 *                   forward kernels, sm_80 and sm_90): softcap and ALiBi are
 *                   tested once per slice, and the ALiBi distance is one float
 *                   subtraction from the slice's first column (no int -> float
 *                   conversion per score, a quarter-rate instruction);
 *   score_to_log2   one score (the backward kernels and the float32 kernels),
 *                   which also returns the factor the softcap puts into the
 *                   gradient, 1 - tanh^2 (d y / d x = softmax_scale log2(e)
 *                   (1 - tanh^2); the backward applies softmax_scale at the end).
 * Both give the same values: distances below 2^24 are exact in float.
 *
 * A kernel without "extras" (has_extras() false: no softcap, no ALiBi, a
 * positive scale) skips all of this and folds the scale into its exp2
 * (exp2(x scale_log2 - m scale_log2)): max and scaling commute only for a
 * positive scale, so a zero, negative or NaN scale takes the extras path.
 */
#ifndef PF_ATTN_SCORE_CUH
#define PF_ATTN_SCORE_CUH

#include "attn/math.cuh"

namespace pf {
namespace cuda {

struct ScoreParams {
    float softmax_scale;
    float scale_log2;        /* softmax_scale * log2(e) */
    float softcap;           /* 0 = off */
    float softcap_inv_scale; /* softmax_scale / softcap */
    float softcap_log2;      /* softcap * log2(e) */
    const float *alibi;      /* slopes, f32 [num_heads] or [batch, num_heads]; NULL = off */
    int64_t alibi_batch_stride, alibi_head_stride;

    /* softcap, ALiBi, or a scale that cannot be folded into exp2 (see above) */
    __host__ __device__ bool has_extras() const { return softcap > 0.0f || alibi != nullptr || !(scale_log2 > 0.0f); }
    /* the ALiBi slope of (batch b, head h) times log2(e); 0 without ALiBi */
    PF_DEV float alibi_log2(int b, int h) const {
        return alibi ? alibi[b * alibi_batch_stride + h * alibi_head_stride] * kLog2e : 0.0f;
    }
};

/* tanh(x softmax_scale / softcap): the softcapped logit is softcap_log2 times this */
PF_DEV float softcap_tanh(const ScoreParams &sp, float x) { return tanh_abs_accurate(x * sp.softcap_inv_scale); }

/* One m16 slice of S as mma C fragments, s[nt][e] = (query row i0 + 8 * (e / 2), key
 * j0 + 8 * nt + 2 * t + e % 2), lane = 4 g + t, row i at position i + off: softcap or
 * plain scaling into the log2 domain, then ALiBi with slope alibi_log2. */
template <int kNT>
PF_DEV void scores_to_log2(float (&s)[kNT][4], const ScoreParams &sp, int i0, int j0, int t, int off,
                           float alibi_log2) {
    if (sp.softcap > 0.0f) {
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[nt][e] = sp.softcap_log2 * softcap_tanh(sp, s[nt][e]);
    } else {
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[nt][e] *= sp.scale_log2;
    }
    if (sp.alibi) {
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

/* One raw score x of a query at distance `dist` = pos - j from its key -> the log2-domain
 * logit; *dtanh = 1 - tanh^2 under softcap, else 1 (dS gets this factor). Without
 * Has_extras only the scaling (the kernel was picked for has_extras() == false). */
template <bool Has_extras>
PF_DEV float score_to_log2(const ScoreParams &sp, float x, float alibi_log2, int dist, float *dtanh) {
    if (!Has_extras) {
        *dtanh = 1.0f;
        return x * sp.scale_log2;
    }
    float y;
    if (sp.softcap > 0.0f) {
        const float th = softcap_tanh(sp, x);
        *dtanh = 1.0f - th * th;
        y = sp.softcap_log2 * th;
    } else {
        *dtanh = 1.0f;
        y = x * sp.scale_log2;
    }
    if (sp.alibi) y -= alibi_log2 * (float)abs(dist);
    return y;
}

}  // namespace cuda
}  // namespace pf

#endif /* PF_ATTN_SCORE_CUH */
