/*
 * paged/simple.cu - the simple paged attention kernel: CUDA cores, one warp per
 * (query, head, split), any dtype (float32, float16, bfloat16) and any head dim
 * <= 256, any alignment. The launcher (paged/launch.cu) runs it where the
 * tensor-core kernel cannot (float32, a head dim without a tensor-core
 * instantiation, rows that are not 16-byte aligned) or when the hint says
 * "simple". Layouts and the split partials as in paged/args.cuh.
 *
 * Algorithm: lane l holds elements l, l + 32, ... of the query row; per token of
 * the split (whole 64-token pieces of the row's visible range), the warp reduces
 * q . k by shuffles, applies scale / softcap / ALiBi in the log2 domain and
 * updates an online softmax (running max, sum, and the lanes' accumulators).
 * A token in a block with a bad id contributes nothing. With one split the row
 * is normalized into out (and lse); with several, into the split's partial.
 */
#include "attn/mask.cuh"
#include "attn/math.cuh"
#include "attn/mma.cuh"
#include "paged/paged.h"

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
    const pf::cuda::MaskRule mask = pf::cuda::mask_rule(a.causal, a.window_left, a.window_right, si.seq_len);
    const int lo = max(mask.lo(p), 0), hi = mask.hi(p); /* the split ranges start at token 0 or later */
    int s_lo, s_hi;
    pf_split_range(lo, max(hi + 1, lo), split, a.num_splits, 64, s_lo, s_hi);
    const float slope = a.alibi ? a.alibi[(int64_t)b * a.al_sb + (int64_t)head * a.al_sh] * pf::cuda::kLog2e : 0.f;

    const T *qp = reinterpret_cast<const T *>(a.q) + (int64_t)b * a.q_sb + (int64_t)(si.tok0 + i) * a.q_st +
                  (int64_t)head * a.q_sh;
    float qv[8], acc[8];
#pragma unroll
    for (int k = 0; k < 8; k++) {
        const int d = lane + 32 * k;
        qv[k] = d < a.head_dim ? pf::cuda::TypeOps<T>::to_float(qp[d]) : 0.f;
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
            dot += in ? qv[k] * pf::cuda::TypeOps<T>::to_float(kr[d]) : 0.f;
            vv[k] = in ? pf::cuda::TypeOps<T>::to_float(vr[d]) : 0.f;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        float x = a.cap_log2 != 0.f ? a.cap_log2 * pf::cuda::tanh_abs_accurate(dot * a.qk_scale) : dot * a.qk_scale;
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
    const float lse = l_run > 0.f ? (m_run + __log2f(l_run)) * pf::cuda::kLn2 : -INFINITY;
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
            if (d < a.head_dim) dst[d] = pf::cuda::TypeOps<T>::from_float(acc[k] * inv);
        }
        if (lane == 0 && a.lse) a.lse[(int64_t)head * a.lse_sh + (int64_t)qidx * a.lse_st] = lse;
    }
}

template <typename T>
static pf_status pf_paged_simple_launch_as(const pf_paged_args &a, const int32_t *qmap, cudaStream_t stream) {
    const int64_t warps = (int64_t)a.total_q * a.num_heads * a.num_splits;
    const int64_t blocks = (warps + PF_SIMPLE_WARPS - 1) / PF_SIMPLE_WARPS;
    pf_paged_attn_simple_kernel<T><<<(unsigned)blocks, PF_SIMPLE_WARPS * 32, 0, stream>>>(a, qmap);
    PF_CUDA_CHECK_LAUNCH();
    return PF_STATUS_OK;
}

pf_status pf_paged_simple_launch(const pf_paged_args &a, const int32_t *qmap, pf_dtype dtype, cudaStream_t stream) {
    if (dtype == PF_DTYPE_F32) return pf_paged_simple_launch_as<float>(a, qmap, stream);
    if (dtype == PF_DTYPE_F16) return pf_paged_simple_launch_as<__half>(a, qmap, stream);
    return pf_paged_simple_launch_as<__nv_bfloat16>(a, qmap, stream);
}

int64_t pf_paged_simple_work(const pf_paged_args &a) {
    return ((int64_t)a.total_q * a.num_heads + PF_SIMPLE_WARPS - 1) / PF_SIMPLE_WARPS;
}

pf_status pf_paged_simple_occupancy(pf_dtype dtype, int *blocks_per_sm) {
    static int cached[3];
    const int di = dtype == PF_DTYPE_F32 ? 0 : dtype == PF_DTYPE_F16 ? 1 : 2;
    if (cached[di] == 0) {
        int occ = 1;
        if (di == 0)
            PF_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, pf_paged_attn_simple_kernel<float>,
                                                                        PF_SIMPLE_WARPS * 32, 0));
        else if (di == 1)
            PF_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, pf_paged_attn_simple_kernel<__half>,
                                                                        PF_SIMPLE_WARPS * 32, 0));
        else
            PF_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                &occ, pf_paged_attn_simple_kernel<__nv_bfloat16>, PF_SIMPLE_WARPS * 32, 0));
        cached[di] = occ > 0 ? occ : 1;
    }
    *blocks_per_sm = cached[di];
    return PF_STATUS_OK;
}
