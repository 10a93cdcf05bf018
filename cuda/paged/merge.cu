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
 *
 * pf_paged_merge_splits: the same merge over the num_splits partials of paged
 * attention's split-KV (flash decoding), o_part f32 [num_splits, total_q,
 * num_heads, head_dim] and lse_part f32 [num_splits, total_q, num_heads], into
 * out (q's layout) and lse.
 */
#include <stdlib.h>

#include "paged/paged.h"

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
    __shared__ float wsm[256]; /* the largest split count */
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

pf_status pf_paged_merge_splits(const pf_paged_args &a, const int32_t *qmap, pf_dtype dtype, cudaStream_t stream) {
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
    if (a.cu_seqlens_q) {
        c.qdiv = 1;
        c.s0 = a.o_st;
        c.s1 = 0;
    } else {
        c.qdiv = a.q_len;
        c.s0 = a.o_sb;
        c.s1 = a.o_st;
    }
    if (dtype == PF_DTYPE_F32) return pf_launch_combine<float>(c, stream);
    if (dtype == PF_DTYPE_F16) return pf_launch_combine<__half>(c, stream);
    return pf_launch_combine<__nv_bfloat16>(c, stream);
}
