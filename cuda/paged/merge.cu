/*
 * paged/merge.cu - the two callers of the log-sum-exp merge (attn/merge.cuh):
 *
 * pf_paged_merge_splits  paged attention's split-KV merge (flash decoding): the
 *     num_splits partials of every (query token, head) row,
 *       o_part   f32 [num_splits, total_q, num_heads, head_dim]   normalized
 *       lse_part f32 [num_splits, total_q, num_heads]             natural log
 *     into out (q's layout and dtype) and lse f32 [num_heads, total_q]. Rows of a
 *     query token that no sequence owns (qmap < 0) are left alone. The partials are
 *     always finite (the main kernel writes 0 / -inf for an empty split), so every
 *     one is loaded before the lse reduction.
 *
 * pf_cuda_merge_attn_states  two states over disjoint key sets:
 *       out_a, out_b, out  [..., num_heads, head_dim], one float dtype (f32/f16/bf16),
 *                          any strides (last dimension contiguous); tokens = the
 *                          product of the leading dimensions
 *       lse_a, lse_b       f32, natural log, and lse (optional output): views
 *                          [..., num_heads] over out's leading dimensions (the core
 *                          rewrites the caller's [num_heads, tokens] or [batch,
 *                          num_heads, seqlen] into that form: backend.h)
 *     A side whose lse is -inf is never read (its out may hold NaN). out / lse may be
 *     the very memory of out_a / out_b / lse_a / lse_b with the same strides (in-place
 *     merging): attn/merge.cuh says why that is safe.
 *
 * Which kernel (rows of head_dim elements, n partials per row):
 *   split-KV, head_dim % 4 == 0 and <= 128, n <= 16: merge_warp_kernel, a warp per row,
 *     every partial's float4 in flight at once, for <= 4 or <= 16 partials (3.5 us
 *     against 5.3 us for the CTA-per-row kernel this replaced, Nsight Compute, H200;
 *     1.1-1.7 us faster end to end at every split point; benchmarks/lab/11);
 *   split-KV otherwise (17..256 splits: batch-1 decode with long contexts; head_dim
 *     > 128; head_dim % 4 != 0): merge_cta_kernel, 8 warps per row, each warp up to 4,
 *     16 or 32 partials in flight (float4 units) or 4 (scalar units), one barrier;
 *   merge_attn_states: merge_warp_kernel over the two states, float4-wide units
 *     (4 elements of T) where head_dim % 4 == 0 and every pointer and stride allows,
 *     single elements otherwise; rows of any length, in chunks.
 */
#include "attn/merge.cuh"
#include "attn/mma.cuh"
#include "paged/paged.h"

using pf::cuda::kMergeCtaWarps;
using pf::cuda::kMergeWarpRows;
using pf::cuda::TypeOps;

/* ------------------------------------------------------------------------ */
/* Launch helpers                                                             */
/* ------------------------------------------------------------------------ */

template <class Rows, int kSplits, int kVec, int kUnits>
static pf_status pf_merge_launch_warps(const Rows &r, int64_t rows, cudaStream_t stream) {
    const int64_t blocks = (rows + kMergeWarpRows - 1) / kMergeWarpRows;
    pf::cuda::merge_warp_kernel<Rows, kSplits, kVec, kUnits><<<(unsigned)blocks, kMergeWarpRows * 32, 0, stream>>>(r);
    PF_CUDA_CHECK_LAUNCH();
    return PF_STATUS_OK;
}

template <class Rows, int kSplitsPerWarp, int kVec, int kUnits>
static pf_status pf_merge_launch_ctas(const Rows &r, int64_t rows, cudaStream_t stream) {
    pf::cuda::merge_cta_kernel<Rows, kSplitsPerWarp, kVec, kUnits>
        <<<(unsigned)rows, kMergeCtaWarps * 32, 0, stream>>>(r);
    PF_CUDA_CHECK_LAUNCH();
    return PF_STATUS_OK;
}

/* ------------------------------------------------------------------------ */
/* Split-KV partials                                                          */
/* ------------------------------------------------------------------------ */

/* The partials of paged attention's splits; row = query token * num_heads + head. */
template <typename T>
struct pf_split_partials {
    static constexpr bool kLseFirst = false; /* partials are finite: load them all first */
    const float *o_part;   /* [num_splits, total_q, num_heads, head_dim] */
    const float *lse_part; /* [num_splits, total_q, num_heads] */
    const int32_t *qmap;   /* [total_q] owning sequence (-1: none), or NULL: every token is owned */
    T *out;                /* out row of (query token t, head h):                     */
    float *lse;            /*   out + (t / queries_per_seq) * out_seq_stride          */
    int num_splits, total_q, num_heads, head_dim; /* + (t % queries_per_seq) * out_query_stride */
    int queries_per_seq;   /*   + h * out_head_stride; dense: q_len, packed: 1 (the token stride */
    int64_t out_seq_stride, out_query_stride, out_head_stride; /* as out_seq_stride) */
    int64_t lse_head_stride, lse_query_stride;                 /* lse [num_heads, total_q] */

    struct Row {
        int64_t row;
        int query, head;
    };
    PF_DEV int64_t rows() const { return (int64_t)total_q * num_heads; }
    PF_DEV Row locate(int64_t row) const { return {row, (int)(row / num_heads), (int)(row % num_heads)}; }
    PF_DEV bool skip(const Row &at) const { return qmap && qmap[at.query] < 0; }
    PF_DEV int splits() const { return num_splits; }
    template <int kUnitVec>
    PF_DEV int units() const {
        return head_dim / kUnitVec;
    }
    PF_DEV float partial_lse(int s, const Row &at) const { return lse_part[s * rows() + at.row]; }

    PF_DEV void load(const Row &at, int s, int unit, float (&v)[4]) const {
        const int cols = head_dim / 4;
        const float4 x =
            (reinterpret_cast<const float4 *>(o_part + at.row * head_dim) + unit)[(int64_t)s * rows() * cols];
        v[0] = x.x;
        v[1] = x.y;
        v[2] = x.z;
        v[3] = x.w;
    }
    PF_DEV void load(const Row &at, int s, int unit, float (&v)[1]) const {
        v[0] = o_part[((int64_t)s * rows() + at.row) * head_dim + unit];
    }
    template <int kVec>
    PF_DEV void store(const Row &at, int unit, const float (&v)[kVec]) const {
        T *dst = out + (int64_t)(at.query / queries_per_seq) * out_seq_stride +
                 (int64_t)(at.query % queries_per_seq) * out_query_stride + (int64_t)at.head * out_head_stride +
                 kVec * unit;
#pragma unroll
        for (int k = 0; k < kVec; k++) dst[k] = TypeOps<T>::from_float(v[k]);
    }
    PF_DEV void store_lse(const Row &at, float value) const {
        if (lse) lse[(int64_t)at.head * lse_head_stride + (int64_t)at.query * lse_query_stride] = value;
    }
};

template <typename T>
static pf_status pf_paged_merge_splits_as(const pf_paged_args &a, const int32_t *qmap, cudaStream_t stream) {
    pf_split_partials<T> r;
    r.o_part = a.o_part;
    r.lse_part = a.lse_part;
    r.qmap = qmap;
    r.out = reinterpret_cast<T *>(a.out);
    r.lse = a.lse;
    r.num_splits = a.num_splits;
    r.total_q = a.total_q;
    r.num_heads = a.num_heads;
    r.head_dim = a.head_dim;
    if (a.cu_seqlens_q) {
        r.queries_per_seq = 1;
        r.out_seq_stride = a.o_st;
        r.out_query_stride = 0;
    } else {
        r.queries_per_seq = a.q_len;
        r.out_seq_stride = a.o_sb;
        r.out_query_stride = a.o_st;
    }
    r.out_head_stride = a.o_sh;
    r.lse_head_stride = a.lse_sh;
    r.lse_query_stride = a.lse_st;

    const int n = a.num_splits, d = a.head_dim; /* d <= 256, n <= 256 */
    const int64_t rows = (int64_t)a.total_q * a.num_heads;
    using R = pf_split_partials<T>;
    if (d % 4 != 0) return pf_merge_launch_ctas<R, 4, 1, 8>(r, rows, stream);
    if (d > 128)
        return n <= 16 ? pf_merge_launch_ctas<R, 2, 4, 2>(r, rows, stream)
                       : pf_merge_launch_ctas<R, 16, 4, 2>(r, rows, stream);
    if (n <= 4) return pf_merge_launch_warps<R, 4, 4, 1>(r, rows, stream);
    if (n <= 16) return pf_merge_launch_warps<R, 16, 4, 1>(r, rows, stream);
    if (n <= 32) return pf_merge_launch_ctas<R, 4, 4, 1>(r, rows, stream);
    if (n <= 128) return pf_merge_launch_ctas<R, 16, 4, 1>(r, rows, stream);
    return pf_merge_launch_ctas<R, 32, 4, 1>(r, rows, stream);
}

pf_status pf_paged_merge_splits(const pf_paged_args &a, const int32_t *qmap, pf_dtype dtype, cudaStream_t stream) {
    if (dtype == PF_DTYPE_F32) return pf_paged_merge_splits_as<float>(a, qmap, stream);
    if (dtype == PF_DTYPE_F16) return pf_paged_merge_splits_as<__half>(a, qmap, stream);
    return pf_paged_merge_splits_as<__nv_bfloat16>(a, qmap, stream);
}

/* ------------------------------------------------------------------------ */
/* merge_attn_states                                                          */
/* ------------------------------------------------------------------------ */

#define PF_MERGE_MAX_LEAD (PF_MAX_DIMS - 2)

/* kVec elements of T as one load / store (8 or 16 bytes for kVec = 4). */
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) pf_merge_vec {
    T x[kVec];
};

/* The two states; row = token * num_heads + head, token = the row-major index of the
 * leading dimensions. */
template <typename T, int kVec>
struct pf_state_pair {
    static constexpr bool kLseFirst = true; /* a -inf side is never read */
    const T *out_a, *out_b;
    T *out;
    const float *lse_a, *lse_b; /* [..., num_heads] over out's leading dimensions */
    float *lse;                 /* the same, or NULL */
    int64_t lead_shape[PF_MERGE_MAX_LEAD];
    int64_t a_lead_strides[PF_MERGE_MAX_LEAD], b_lead_strides[PF_MERGE_MAX_LEAD], out_lead_strides[PF_MERGE_MAX_LEAD];
    int64_t lse_a_lead_strides[PF_MERGE_MAX_LEAD], lse_b_lead_strides[PF_MERGE_MAX_LEAD];
    int64_t lse_lead_strides[PF_MERGE_MAX_LEAD];
    int64_t a_head_stride, b_head_stride, out_head_stride;
    int64_t lse_a_head_stride, lse_b_head_stride, lse_head_stride;
    int64_t tokens;
    int n_lead, num_heads, head_dim;

    struct Row {
        const T *a, *b;            /* the row in out_a, out_b */
        T *out;                    /* in out */
        const float *lse_a, *lse_b; /* its lse elements */
        float *lse;                /* in lse (NULL: none) */
    };
    PF_DEV int64_t rows() const { return tokens * num_heads; }
    PF_DEV Row locate(int64_t row) const {
        const int64_t head = row % num_heads;
        int64_t off_a = 0, off_b = 0, off_out = 0, off_la = 0, off_lb = 0, off_l = 0, t = row / num_heads;
        for (int k = n_lead - 1; k >= 0; k--) {
            const int64_t i = t % lead_shape[k];
            t /= lead_shape[k];
            off_a += i * a_lead_strides[k];
            off_b += i * b_lead_strides[k];
            off_out += i * out_lead_strides[k];
            off_la += i * lse_a_lead_strides[k];
            off_lb += i * lse_b_lead_strides[k];
            off_l += i * lse_lead_strides[k];
        }
        Row at;
        at.a = out_a + off_a + head * a_head_stride;
        at.b = out_b + off_b + head * b_head_stride;
        at.out = out + off_out + head * out_head_stride;
        at.lse_a = lse_a + off_la + head * lse_a_head_stride;
        at.lse_b = lse_b + off_lb + head * lse_b_head_stride;
        at.lse = lse ? lse + off_l + head * lse_head_stride : nullptr;
        return at;
    }
    PF_DEV bool skip(const Row &) const { return false; }
    PF_DEV int splits() const { return 2; }
    template <int kUnitVec>
    PF_DEV int units() const {
        return head_dim / kUnitVec;
    }
    PF_DEV float partial_lse(int s, const Row &at) const { return s == 0 ? *at.lse_a : *at.lse_b; }
    PF_DEV void load(const Row &at, int s, int unit, float (&v)[kVec]) const {
        const pf_merge_vec<T, kVec> x =
            *reinterpret_cast<const pf_merge_vec<T, kVec> *>((s == 0 ? at.a : at.b) + kVec * unit);
#pragma unroll
        for (int k = 0; k < kVec; k++) v[k] = TypeOps<T>::to_float(x.x[k]);
    }
    PF_DEV void store(const Row &at, int unit, const float (&v)[kVec]) const {
        pf_merge_vec<T, kVec> x;
#pragma unroll
        for (int k = 0; k < kVec; k++) x.x[k] = TypeOps<T>::from_float(v[k]);
        *reinterpret_cast<pf_merge_vec<T, kVec> *>(at.out + kVec * unit) = x;
    }
    PF_DEV void store_lse(const Row &at, float value) const {
        if (at.lse) *at.lse = value;
    }
};

/* Fills the policy of either width from the params (dimensions checked by the core). */
template <typename P>
static void pf_state_pair_fill(const pf_merge_params *p, P &m) {
    const pf_tensor &oa = p->out_a, &ob = p->out_b, &o = p->out;
    const int nd = oa.ndim;
    memset(&m, 0, sizeof m);
    m.n_lead = nd - 2; /* <= PF_MERGE_MAX_LEAD: limits.max_merge_dims */
    m.tokens = 1;
    for (int k = 0; k < m.n_lead; k++) {
        m.lead_shape[k] = oa.shape[k];
        m.tokens *= oa.shape[k];
        m.a_lead_strides[k] = oa.strides[k];
        m.b_lead_strides[k] = ob.strides[k];
        m.out_lead_strides[k] = o.strides[k];
        m.lse_a_lead_strides[k] = p->lse_a.strides[k];
        m.lse_b_lead_strides[k] = p->lse_b.strides[k];
        if (pf_tensor_present(&p->lse)) m.lse_lead_strides[k] = p->lse.strides[k];
    }
    m.num_heads = (int)oa.shape[nd - 2];
    m.head_dim = (int)oa.shape[nd - 1];
    m.out_a = (decltype(m.out_a))oa.data;
    m.out_b = (decltype(m.out_b))ob.data;
    m.out = (decltype(m.out))o.data;
    m.a_head_stride = oa.strides[nd - 2];
    m.b_head_stride = ob.strides[nd - 2];
    m.out_head_stride = o.strides[nd - 2];
    m.lse_a = (const float *)p->lse_a.data;
    m.lse_a_head_stride = p->lse_a.strides[nd - 2];
    m.lse_b = (const float *)p->lse_b.data;
    m.lse_b_head_stride = p->lse_b.strides[nd - 2];
    if (pf_tensor_present(&p->lse)) {
        m.lse = (float *)p->lse.data;
        m.lse_head_stride = p->lse.strides[nd - 2];
    }
}

/* Whether every row of out_a, out_b and out is made of aligned 4-element units. */
static bool pf_state_pair_vectorizable(const pf_merge_params *p) {
    const pf_tensor *ts[3] = {&p->out_a, &p->out_b, &p->out};
    const int nd = p->out_a.ndim;
    const size_t bytes = 4 * pf_dtype_size(p->out.dtype);
    if (p->out_a.shape[nd - 1] % 4 != 0) return false;
    for (const pf_tensor *t : ts) {
        if ((uintptr_t)t->data % bytes != 0) return false;
        for (int k = 0; k < nd - 1; k++)
            if (t->strides[k] % 4 != 0) return false;
    }
    return true;
}

template <typename T>
static pf_status pf_merge_states_as(const pf_merge_params *p, int64_t rows, cudaStream_t stream) {
    if (pf_state_pair_vectorizable(p)) {
        pf_state_pair<T, 4> m;
        pf_state_pair_fill(p, m);
        return pf_merge_launch_warps<pf_state_pair<T, 4>, 2, 4, 1>(m, rows, stream);
    }
    pf_state_pair<T, 1> m;
    pf_state_pair_fill(p, m);
    return pf_merge_launch_warps<pf_state_pair<T, 1>, 2, 1, 4>(m, rows, stream);
}

extern "C" pf_status pf_cuda_merge_attn_states(const pf_merge_params *p) {
    pf_cuda_device_guard guard;
    PF_TRY(guard.set(p->out.device_id));
    cudaStream_t stream = (cudaStream_t)p->stream;
    const pf_tensor &oa = p->out_a;
    int64_t rows = oa.shape[oa.ndim - 2]; /* rows within the launch's reach: checked by the core */
    for (int k = 0; k < oa.ndim - 2; k++) rows *= oa.shape[k];
    if (rows == 0) return PF_STATUS_OK;
    switch (p->out.dtype) {
        case PF_DTYPE_F32: return pf_merge_states_as<float>(p, rows, stream);
        case PF_DTYPE_F16: return pf_merge_states_as<__half>(p, rows, stream);
        case PF_DTYPE_BF16: return pf_merge_states_as<__nv_bfloat16>(p, rows, stream);
        default: PF_CHECK(0, PF_STATUS_INVALID_TYPE, "out: unsupported dtype %s", pf_dtype_name(p->out.dtype));
    }
    return PF_STATUS_OK;
}
