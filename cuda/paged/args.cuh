/*
 * paged/args.cuh - what the paged attention kernels share: their argument
 * struct (filled by paged/launch.cu from validated pf_paged_params), the
 * tensor-core kernel's compile-time variant as a run-time value (which CTA
 * shape, row tile and K/V path an instantiation runs, and which exist), and
 * the per-sequence lookups both kernels make (query range, clamped length,
 * block id and offset of a token, a split's token range).
 *
 * Layouts (element strides, last dimension contiguous):
 *   q, out    rows addressed as base + b * q_sb + tok * q_st + head * q_sh (o_* for
 *             out), where tok = query index i (dense layouts) or cu_seqlens_q[b] + i
 *             (packed layouts: q_sb = 0)
 *   k_cache,
 *   v_cache   [num_blocks, block_size, num_kv_heads, head_dim]
 *   block_tables int32 [batch, max_blocks]; seq_lens int32 [batch]
 *   o_part    f32 [num_splits, total_q, num_heads, head_dim]  (split partials,
 *   lse_part  f32 [num_splits, total_q, num_heads]             normalized, natural-log lse)
 *   lse       f32 [num_heads, total_q] (optional output)
 *
 * Rows: a "row" is one (query i, query head of the GQA group) pair, ordered
 * query-major within a sequence (r = i * group + head_in_group); the
 * tensor-core kernel computes kRows of them (a row tile) against every K/V row
 * it loads. Sequence b's tokens are its first seq_len slots, token t in block
 * block_tables[b][t / block_size] at offset t % block_size.
 */
#ifndef PF_PAGED_ARGS_CUH
#define PF_PAGED_ARGS_CUH

#include "common/cuda_util.cuh"

struct pf_paged_args {
    const void *q;            /* rows of head_dim elements, see strides below */
    void *out;                /* q's layout and dtype */
    const void *k_cache;      /* [num_blocks, block_size, num_kv_heads, head_dim] */
    const void *v_cache;      /* same shape */
    const int32_t *block_tables; /* [batch, max_blocks] */
    const int32_t *seq_lens;  /* [batch] */
    const int32_t *cu_seqlens_q; /* [batch + 1] or NULL (dense layouts) */
    const float *alibi;       /* [num_heads] or [batch, num_heads], or NULL */
    float *lse;               /* [num_heads, total_q] or NULL (written when num_splits == 1) */
    float *o_part;            /* [num_splits, total_q, num_heads, head_dim] when num_splits > 1 */
    float *lse_part;          /* [num_splits, total_q, num_heads] when num_splits > 1 */
    const int32_t *plan;      /* packed layout: [num_row_tiles, 2] (sequence, row tile); -1 = none */

    int64_t q_sb, q_st, q_sh; /* element strides of q: sequence, token, head */
    int64_t o_sb, o_st, o_sh; /* of out */
    int64_t k_sblk, k_stok, k_sh;
    int64_t v_sblk, v_stok, v_sh;
    int64_t bt_sb, bt_sj;     /* block_tables */
    int64_t sl_s, cu_s;       /* seq_lens, cu_seqlens_q */
    int64_t al_sb, al_sh;     /* alibi_slopes (al_sb = 0 for [num_heads]) */
    int64_t lse_sh, lse_st;   /* lse */

    int batch, q_len, total_q;  /* q_len: dense layouts (0 with cu_seqlens_q) */
    int num_heads, num_kv_heads, group, head_dim;
    int block_size;
    unsigned bs_magic, bs_shift; /* t / block_size = (umulhi(t, magic) + t) >> shift */
    int num_blocks, max_blocks;
    int num_splits;
    int causal, window_left, window_right;
    float qk_scale;           /* softmax_scale * log2(e), or softmax_scale / softcap with softcap */
    float cap_log2;           /* softcap * log2(e); 0 = no softcap */
    int num_row_tiles;        /* row tiles per sequence (dense) or plan entries (packed); last, so
                                 that every field above sits at the offset (mod 16) it had when the
                                 main loop's SASS was measured: ptxas pairs adjacent parameters into
                                 64-bit loads, and a shift changes its schedule (and a register) */
};

/* The K/V path of the tensor-core kernel (its kRing template argument). */
enum pf_paged_kv_path {
    PF_PAGED_KV_REGISTERS = 0, /* K/V of the next tiles loaded straight into registers (kRing = 0) */
    PF_PAGED_KV_RING = 1       /* a per-warp shared-memory ring of 3 slots of 16-token tiles (kRing = 3) */
};

/* Which instantiation of the tensor-core kernel runs (its template arguments as values).
 * A CTA holds kv_heads_per_cta KV heads and `warps` warps; warps / kv_heads_per_cta of them
 * share one KV head and take every (warps / kv_heads_per_cta)-th tile of the split:
 *   8x8, 4x4  head mode: one KV head per warp, the CTA reads whole token rows of its heads;
 *   1x4       token mode: 4 warps share one KV head, merged through shared memory;
 *   1x8, 2x8, 4x8  the mixed shapes: 8, 4 or 2 warps per head (ring only). */
struct pf_paged_variant {
    int rows_per_tile;        /* rows (query x head-in-group) per CTA: 8 or 16 (16 only for head dims <= 128) */
    int kv_heads_per_cta;     /* H of the H x W CTA shape: 1, 2, 4 or 8 */
    int warps;                /* W: 4 or 8 */
    pf_paged_kv_path kv_path;
};

/* Head dims whose kernels have the shared-memory ring (their rows are whole 128-byte
 * lines per 8 lanes): 64 and 128. Every other head dim loads K/V into registers. */
__host__ __device__ constexpr bool pf_paged_has_ring(int head_dim) { return head_dim == 64 || head_dim == 128; }

/* The CTA shapes the tensor-core kernel is instantiated for at a head dim, with a K/V
 * path: head mode 8x8 / 4x4 and token mode 1x4 with either path (the ring where the head
 * dim has it); the mixed shapes 1x8, 2x8, 4x8 only with the ring. The one statement of
 * what exists: paged/instantiate.cuh instantiates exactly this, the launcher refuses the
 * rest. */
__host__ __device__ constexpr bool pf_paged_shape_exists(int head_dim, int heads, int warps, pf_paged_kv_path path) {
    const bool ring_ok = path == PF_PAGED_KV_REGISTERS || pf_paged_has_ring(head_dim);
    const bool plain = (heads == 8 && warps == 8) || (heads == 4 && warps == 4) || (heads == 1 && warps == 4);
    const bool mixed = warps == 8 && (heads == 1 || heads == 2 || heads == 4);
    return ring_ok && (plain || (mixed && path == PF_PAGED_KV_RING));
}

/* CTAs of the tensor-core kernel per split: (sequence, row tile) pairs -- a's plan entries
 * for packed layouts -- times the groups of kv_heads_per_cta KV heads. */
static inline int64_t pf_paged_work_items(const pf_paged_args &a, int kv_heads_per_cta) {
    const int64_t kv_groups = (a.num_kv_heads + kv_heads_per_cta - 1) / kv_heads_per_cta;
    return (int64_t)a.num_row_tiles * kv_groups * (a.plan || a.cu_seqlens_q ? 1 : a.batch);
}

/* Sequence-level facts shared by the kernels. */
struct pf_seq_info {
    int seq_len;   /* clamped to [0, max_blocks * block_size] */
    int q_len;     /* this sequence's queries (>= 0) */
    int tok0;      /* first query's token index (packed) or 0 */
    int qidx0;     /* first query's index in [0, total_q) */
};

__device__ __forceinline__ pf_seq_info pf_seq_info_of(const pf_paged_args &a, int b) {
    pf_seq_info s;
    int len = a.seq_lens[(int64_t)b * a.sl_s];
    int cap = a.max_blocks * a.block_size;
    s.seq_len = min(max(len, 0), cap);
    if (a.cu_seqlens_q) {
        int c0 = a.cu_seqlens_q[(int64_t)b * a.cu_s];
        int c1 = a.cu_seqlens_q[(int64_t)(b + 1) * a.cu_s];
        c0 = min(max(c0, 0), a.total_q);
        c1 = min(max(c1, c0), a.total_q);
        s.q_len = c1 - c0;
        s.tok0 = c0;
        s.qidx0 = c0;
    } else {
        s.q_len = a.q_len;
        s.tok0 = 0;
        s.qidx0 = b * a.q_len;
    }
    return s;
}

/* t / block_size for 0 <= t < 2^31 by multiply-high (bs_magic, bs_shift set by the launcher). */
__device__ __forceinline__ int pf_block_index(const pf_paged_args &a, int t) {
    return (int)((__umulhi((unsigned)t, a.bs_magic) + (unsigned)t) >> a.bs_shift);
}

/* Block id of token t of sequence b, or -1 when the table entry is out of range. */
__device__ __forceinline__ int pf_block_of(const pf_paged_args &a, int b, int t) {
    const int j = pf_block_index(a, t);
    const int id = __ldg(a.block_tables + (int64_t)b * a.bt_sb + (int64_t)j * a.bt_sj);
    return (unsigned)id < (unsigned)a.num_blocks ? id : -1;
}

__device__ __forceinline__ int pf_offset_in_block(const pf_paged_args &a, int t) {
    return t - pf_block_index(a, t) * a.block_size;
}

/* Token range [s_lo, s_hi) of `split` within [kv_lo, kv_hi), cut in whole `align`-token pieces. */
__device__ __forceinline__ void pf_split_range(int kv_lo, int kv_hi, int split, int num_splits, int align, int &s_lo,
                                               int &s_hi) {
    int len = max(kv_hi - kv_lo, 0);
    int per = (len + num_splits - 1) / num_splits;
    per = (per + align - 1) / align * align;
    s_lo = kv_lo + min(split * per, len);
    s_hi = min(kv_hi, s_lo + per);
    if (s_hi < s_lo) s_hi = s_lo;
}

#endif /* PF_PAGED_ARGS_CUH */
