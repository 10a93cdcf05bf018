/*
 * paged/merge.cu - pf_cuda_merge_attn_states: merge two partial attention
 * results computed over disjoint key sets.
 *
 *   out_a, out_b, out  [..., num_heads, head_dim], one float dtype (f32/f16/bf16),
 *                      any strides (last dimension contiguous); tokens = the
 *                      product of the leading dimensions
 *   lse_a, lse_b       f32 [num_heads, tokens], natural log
 *   lse                f32 [num_heads, tokens] (optional output)
 *
 * lse = logaddexp(lse_a, lse_b); out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b.
 * A side whose lse is -inf contributes nothing and its out is never read; both
 * -inf gives out = 0, lse = -inf; a NaN lse gives NaN. out / lse may be the very
 * memory of out_a / out_b / lse_a / lse_b (in-place merging): each element is
 * read before it is written by the same lane, and a (token, head)'s lse is
 * written only after its whole warp has read both inputs.
 *
 * One warp per (token, head), lanes striding over head_dim; float32 math.
 */
#include "common/cuda_util.cuh"

#define PF_MERGE_WARPS 4
#define PF_MERGE_MAX_LEAD (PF_MAX_DIMS - 2)

struct pf_merge_view {
    const void *data;
    int64_t lead_strides[PF_MERGE_MAX_LEAD];
    int64_t sh;
};

struct pf_merge_args {
    pf_merge_view a, b;
    void *out;
    int64_t out_lead_strides[PF_MERGE_MAX_LEAD];
    int64_t out_sh;
    int64_t lead_shape[PF_MERGE_MAX_LEAD];
    int n_lead;
    const float *lse_a, *lse_b;
    float *lse;
    int64_t la_sh, la_st, lb_sh, lb_st, l_sh, l_st;
    int64_t tokens;
    int num_heads, head_dim;
};

/* Element offset of token t under leading strides (row-major unravel of lead_shape). */
__device__ __forceinline__ int64_t pf_merge_offset(const pf_merge_args &m, const int64_t *strides, int64_t t) {
    int64_t off = 0;
    for (int k = m.n_lead - 1; k >= 0; k--) {
        const int64_t n = m.lead_shape[k];
        off += (t % n) * strides[k];
        t /= n;
    }
    return off;
}

template <typename T>
__global__ void __launch_bounds__(PF_MERGE_WARPS * 32) pf_merge_kernel(const pf_merge_args m) {
    const int lane = threadIdx.x & 31;
    const int64_t item = (int64_t)blockIdx.x * PF_MERGE_WARPS + (threadIdx.x >> 5);
    if (item >= m.tokens * m.num_heads) return;
    const int64_t t = item / m.num_heads;
    const int h = (int)(item % m.num_heads);
    const float la = m.lse_a[h * m.la_sh + t * m.la_st];
    const float lb = m.lse_b[h * m.lb_sh + t * m.lb_st];
    float wa = 0.f, wb = 0.f, lse;
    if (la != la || lb != lb) {
        lse = __int_as_float(0x7fc00000);
        wa = wb = lse;
    } else if (la == -INFINITY && lb == -INFINITY) {
        lse = -INFINITY;
    } else {
        const float mx = fmaxf(la, lb);
        const float ea = la == -INFINITY ? 0.f : expf(la - mx);
        const float eb = lb == -INFINITY ? 0.f : expf(lb - mx);
        lse = mx + logf(ea + eb);
        wa = la == -INFINITY ? 0.f : expf(la - lse);
        wb = lb == -INFINITY ? 0.f : expf(lb - lse);
    }
    const T *pa = reinterpret_cast<const T *>(m.a.data) + pf_merge_offset(m, m.a.lead_strides, t) + h * m.a.sh;
    const T *pb = reinterpret_cast<const T *>(m.b.data) + pf_merge_offset(m, m.b.lead_strides, t) + h * m.b.sh;
    T *po = reinterpret_cast<T *>(m.out) + pf_merge_offset(m, m.out_lead_strides, t) + h * m.out_sh;
    const bool use_a = la != -INFINITY, use_b = lb != -INFINITY;
    for (int d = lane; d < m.head_dim; d += 32) {
        float v = 0.f;
        if (use_a) v += wa * pf_cu_to_float(pa[d]);
        if (use_b) v += wb * pf_cu_to_float(pb[d]);
        po[d] = pf_cu_from_float<T>(v);
    }
    __syncwarp();
    if (lane == 0 && m.lse) m.lse[h * m.l_sh + t * m.l_st] = lse;
}

extern "C" pf_status pf_cuda_merge_attn_states(const pf_merge_params *p) {
    pf_cuda_device_guard guard;
    PF_TRY(guard.set(p->out.device_id));
    cudaStream_t stream = (cudaStream_t)p->stream;
    const pf_tensor &oa = p->out_a, &ob = p->out_b, &o = p->out;
    const int nd = oa.ndim;
    /* nd - 2 <= PF_MERGE_MAX_LEAD and rows within the launch's reach: checked by the core */
    pf_merge_args m;
    memset(&m, 0, sizeof m);
    m.n_lead = nd - 2;
    m.tokens = 1;
    for (int k = 0; k < m.n_lead; k++) {
        m.lead_shape[k] = oa.shape[k];
        m.tokens *= oa.shape[k];
        m.a.lead_strides[k] = oa.strides[k];
        m.b.lead_strides[k] = ob.strides[k];
        m.out_lead_strides[k] = o.strides[k];
    }
    m.num_heads = (int)oa.shape[nd - 2];
    m.head_dim = (int)oa.shape[nd - 1];
    m.a.data = oa.data;
    m.b.data = ob.data;
    m.out = o.data;
    m.a.sh = oa.strides[nd - 2];
    m.b.sh = ob.strides[nd - 2];
    m.out_sh = o.strides[nd - 2];
    m.lse_a = (const float *)p->lse_a.data;
    m.la_sh = p->lse_a.strides[0];
    m.la_st = p->lse_a.strides[1];
    m.lse_b = (const float *)p->lse_b.data;
    m.lb_sh = p->lse_b.strides[0];
    m.lb_st = p->lse_b.strides[1];
    if (pf_tensor_present(&p->lse)) {
        m.lse = (float *)p->lse.data;
        m.l_sh = p->lse.strides[0];
        m.l_st = p->lse.strides[1];
    }
    const int64_t rows = m.tokens * m.num_heads;
    if (rows == 0) return PF_STATUS_OK;
    const int64_t blocks = (rows + PF_MERGE_WARPS - 1) / PF_MERGE_WARPS;
    switch (o.dtype) {
        case PF_DTYPE_F32: pf_merge_kernel<float><<<(unsigned)blocks, PF_MERGE_WARPS * 32, 0, stream>>>(m); break;
        case PF_DTYPE_F16: pf_merge_kernel<__half><<<(unsigned)blocks, PF_MERGE_WARPS * 32, 0, stream>>>(m); break;
        case PF_DTYPE_BF16:
            pf_merge_kernel<__nv_bfloat16><<<(unsigned)blocks, PF_MERGE_WARPS * 32, 0, stream>>>(m);
            break;
        default:
            PF_CHECK(0, PF_STATUS_INVALID_TYPE, "out: unsupported dtype %s", pf_dtype_name(o.dtype));
    }
    PF_CUDA_CHECK_LAUNCH();
    return PF_STATUS_OK;
}
