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
 *
 * Per score: lo / hi / visible, and mask_fragment for an m16 slice of S in the
 * mma C-fragment layout. Per tile: key_range / key_tiles (the keys a block of
 * query rows sees: kernels that walk keys for a query tile), query_range /
 * query_tiles (the queries that see a block of keys: the backward's key-tile
 * kernels), tile_needs_mask (whether a tile crosses a bound at all, so that tiles
 * inside every row's range skip the per-score test).
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

    /* The same in tiles of n rows: tiles [*m_lo, *m_hi) (m_hi == m_lo: none sees the keys). */
    PF_DEV void query_tiles(int j0, int j_last, int off, int sq, int n, int *m_lo, int *m_hi) const {
        int i_begin, i_end;
        query_range(j0, j_last, off, sq, &i_begin, &i_end);
        *m_lo = i_begin / n;
        *m_hi = i_end > i_begin ? (i_end + n - 1) / n : *m_lo;
    }

    /* The keys [*j_begin, *j_end) that any of the query rows [i_first, i_last] (row i at
     * position i + off) sees (j_end <= j_begin: none), for kernels that walk queries: lo
     * of the first row, hi of the last, clamped to the sequence. */
    PF_DEV void key_range(int i_first, int i_last, int off, int *j_begin, int *j_end) const {
        *j_begin = has_lo ? imax(0, i_first + off - left) : 0;
        *j_end = has_hi ? imin(sk, i_last + off + right + 1) : sk;
    }

    /* The same in tiles of n keys: tiles [*n_lo, *n_hi) (n_hi == n_lo: nothing visible). */
    PF_DEV void key_tiles(int i_first, int i_last, int off, int n, int *n_lo, int *n_hi) const {
        int j_begin, j_end;
        key_range(i_first, i_last, off, &j_begin, &j_end);
        *n_lo = j_begin / n;
        *n_hi = j_end > j_begin ? (j_end + n - 1) / n : *n_lo;
    }

    /* Does key tile [j0, j0 + n) hold a key that one of the query rows [i_first, i_last]
     * must not see (hi of the first row, lo of the last) or a key past the sequence?
     * Tiles where it does not skip the per-score test. */
    PF_DEV bool tile_needs_mask(int j0, int n, int i_first, int i_last, int off) const {
        return j0 + n > sk || (has_hi && j0 + n - 1 > i_first + off + right) || (has_lo && j0 < i_last + off - left);
    }
};

/* The rule on one m16 slice of S held as mma.sync C fragments (attn/mma.cuh; the wgmma
 * accumulator of a warp has the same layout, attn/sm90.cuh): s[nt][e] is (query row
 * i0 + 8 * (e / 2), key j0 + 8 * nt + 2 * t + e % 2) with lane = 4 g + t, the row at
 * position row + off. Scores the row does not see become -inf. */
template <int kNT>
PF_DEV void mask_fragment(float (&s)[kNT][4], const MaskRule &m, int i0, int off, int j0, int t) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        const int i = i0 + 8 * hf;
        const int lo = m.lo(i + off);
        const int hi = m.hi(i + off);
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int j = j0 + nt * 8 + 2 * t + e;
                if (j < lo || j > hi) s[nt][2 * hf + e] = -INFINITY;
            }
    }
}

/* The rule of one call for a sequence of sk keys, read from a parameter struct with the
 * fields causal, window_left, window_right (-1 = unbounded). Kernels build it straight
 * from their __grid_constant__ params: built from values passed in (the overload below),
 * the compiler kept the two flags as bytes recomputed in the forward's tile loop (more
 * instructions there, measured in the SASS), not as predicates. */
template <typename Params>
PF_DEV MaskRule mask_rule(const Params &p, int sk) {
    MaskRule m;
    m.has_lo = p.window_left >= 0;
    m.has_hi = p.causal || p.window_right >= 0;
    m.left = p.window_left;
    m.right = p.causal ? 0 : p.window_right;
    m.sk = sk;
    return m;
}

/* The same from values. */
PF_DEV MaskRule mask_rule(bool causal, int window_left, int window_right, int sk) {
    struct {
        bool causal;
        int window_left, window_right;
    } w = {causal, window_left, window_right};
    return mask_rule(w, sk);
}

}  // namespace cuda
}  // namespace pf

#endif /* PF_ATTN_MASK_CUH */
