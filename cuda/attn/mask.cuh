/*
 * attn/mask.cuh - which keys a query sees: the one statement of the causal /
 * sliding-window / length rule for every CUDA kernel (flash forward and
 * backward on sm_80 and sm_90, float32, paged attention).
 *
 * A query sits at position `pos` among the sequence's sk keys: pos = i + sk - sq
 * for query row i of sq (flash attention: causal aligned bottom-right), pos =
 * seq_len - q_len + i for paged attention (the queries are the sequence's last
 * tokens). It sees key j when
 *   0 <= j < sk,  and  j <= pos (causal),  and  pos - left <= j <= pos + right
 * for a window (left, right), -1 = unbounded on that side (pagedflash.h).
 * MaskRule holds that rule for one call with the causal / window choice folded
 * into two flags, so a kernel evaluates it with one compare per side. All int32:
 * lengths are < 2^30 (pf_cuda_backend.limits).
 */
#ifndef PF_ATTN_MASK_CUH
#define PF_ATTN_MASK_CUH

#include "attn/math.cuh"

namespace pf {
namespace cuda {

struct MaskRule {
    int left, right; /* window sides; right = 0 under causal */
    int sk;          /* keys of the sequence */
    bool has_lo;     /* a window's left side bounds j from below */
    bool has_hi;     /* causal or a window's right side bounds j from above */

    /* lowest key position `pos` may see (may be < 0: no lower bound inside the sequence) */
    PF_DEV int lo(int pos) const { return has_lo ? pos - left : 0; }
    /* highest key position `pos` may see (may be < lo: sees nothing) */
    PF_DEV int hi(int pos) const { return has_hi ? imin(sk - 1, pos + right) : sk - 1; }
    PF_DEV bool visible(int pos, int j) const { return j >= lo(pos) && j <= hi(pos); }

    /* The query rows [*i_begin, *i_end) of sq rows (row i at position i + off) that see
     * any key of [j0, j_last]: the inverse of lo / hi, for kernels that walk keys. */
    PF_DEV void query_range(int j0, int j_last, int off, int sq, int *i_begin, int *i_end) const {
        *i_begin = has_hi ? imax(0, j0 - off - right) : 0;
        *i_end = has_lo ? imin(sq, j_last + left - off + 1) : sq;
    }
};

/* The rule of one call for a sequence of sk keys. window_left / window_right: -1 = unbounded. */
PF_DEV MaskRule mask_rule(bool causal, int window_left, int window_right, int sk) {
    MaskRule m;
    m.has_lo = window_left >= 0;
    m.has_hi = causal || window_right >= 0;
    m.left = window_left;
    m.right = causal ? 0 : window_right;
    m.sk = sk;
    return m;
}

}  // namespace cuda
}  // namespace pf

#endif /* PF_ATTN_MASK_CUH */
