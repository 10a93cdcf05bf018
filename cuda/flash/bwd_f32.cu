/*
 * flash/bwd_f32.cu - the backward for float32 inputs: simple float32 kernels
 * (CUDA cores), their launch, and flash_bwd_f32_run (the float32 family of
 * pf_cuda_flash_bwd, flash/bwd_launch.cu). Same semantics as the float16 /
 * bfloat16 kernels and the CPU backend, through the same primitives: the mask
 * rule (attn/mask.cuh), the score transform and its softcap derivative
 * (attn/score.cuh), lse_to_log2 (attn/softmax.cuh), dropout (flash/dropout.cuh).
 *
 * Layouts: FlashParams (flash/params.h). Workspace (flash/bwd_workspace.h): D
 * f32 [num_heads][rows] from pass 1 (bwd_prep_kernel<float>, flash/bwd_prep.cuh).
 *
 *   flash_bwd_dq_f32_kernel    one warp per query row (8 per block), keys in
 *                              chunks of 32 through shared memory; lane j takes
 *                              key j0 + j: s = q.k, dp = dO.v, P = exp2(score -
 *                              lse), dS = P (dp - D); lane c accumulates dQ
 *                              columns c, c + 32, ...
 *   flash_bwd_dkdv_f32_kernel  one warp per key row (8 per block) of a KV head,
 *                              over every query head of its group and query
 *                              chunks of 32: dV += P_drop dO, dK += dS Q.
 * Both write their outputs once, so the float32 backward is deterministic.
 */
#include <atomic>

#include "attn/mask.cuh"
#include "attn/math.cuh"
#include "attn/score.cuh"
#include "attn/softmax.cuh"
#include "common/cuda_util.cuh"
#include "flash/bwd_prep.cuh"
#include "flash/dropout.cuh"
#include "flash/params.h"
#include "flash/run.h"
#include "flash/sequence.cuh"

namespace pf {
namespace cuda {

namespace {

constexpr int kW = 8;   /* warps (rows) per block */
constexpr int kC = 32;  /* chunk */

template <int kMaxD>
__global__ void __launch_bounds__(kW * 32) flash_bwd_dq_f32_kernel(const __grid_constant__ FlashParams p) {
    constexpr int kPer = kMaxD / 32, kKS = kMaxD + 1;
    extern __shared__ __align__(16) unsigned char pf_smem[];
    float *sK = reinterpret_cast<float *>(pf_smem);
    float *sV = sK + kC * kKS;
    float *sQ = sV + kC * kKS;   /* [kW][kMaxD] */
    float *sdO = sQ + kW * kMaxD; /* [kW][kMaxD] */
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int b = blockIdx.z, h = blockIdx.y, hk = h / p.head_group;
    const SeqInfo si = seq_info(p, b);
    const int sq = si.sq, sk = si.sk, d = p.head_dim, off = sk - sq;
    const MaskRule mask = mask_rule(p, sk);
    const int64_t rows_total = flat_rows(p);
    const int64_t row_base = flat_row_base(p, b, si);
    const float alibi_log2 = p.score.alibi_log2(b, h);
    const uint64_t bh = (uint64_t)b * p.num_heads + h;
    const float *qb = static_cast<const float *>(p.q) + b * p.q_batch_stride + (int64_t)si.q_start * p.q_row_stride +
                      h * p.q_head_stride;
    const float *dob = static_cast<const float *>(p.dout) + b * p.do_batch_stride +
                       (int64_t)si.q_start * p.do_row_stride + h * p.do_head_stride;
    const float *kb = static_cast<const float *>(p.k) + b * p.k_batch_stride + (int64_t)si.k_start * p.k_row_stride +
                      hk * p.k_head_stride;
    const float *vb = static_cast<const float *>(p.v) + b * p.v_batch_stride + (int64_t)si.k_start * p.v_row_stride +
                      hk * p.v_head_stride;
    float *dqb = static_cast<float *>(p.dq) + b * p.dq_batch_stride + (int64_t)si.q_start * p.dq_row_stride +
                 h * p.dq_head_stride;

    for (int tile = blockIdx.x; tile * kW < sq; tile += gridDim.x) {
        const int m0 = tile * kW, rows_valid = imin(kW, sq - m0), i = m0 + warp;
        const bool row_ok = warp < rows_valid;
        const int i_last = m0 + rows_valid - 1;
        int j_begin, j_end;
        mask.key_range(m0, i_last, off, &j_begin, &j_end);
        const int lo = mask.lo(i + off), hi = mask.hi(i + off);
        __syncthreads();
        for (int c = lane; c < kMaxD; c += 32) {
            const bool ok = row_ok && c < d;
            sQ[warp * kMaxD + c] = ok ? qb[(int64_t)i * p.q_row_stride + c] : 0.0f;
            sdO[warp * kMaxD + c] = ok ? dob[(int64_t)i * p.do_row_stride + c] : 0.0f;
        }
        float lse = INFINITY, drow = 0.0f;
        if (row_ok) {
            lse = p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + (int64_t)(si.q_start + i) * p.lse_row_stride];
            lse = lse_to_log2(lse);
            drow = p.dsum[h * rows_total + row_base + i];
        }
        float acc[kPer];
#pragma unroll
        for (int c = 0; c < kPer; ++c) acc[c] = 0.0f;
        for (int j0 = j_begin / kC * kC; j0 < j_end; j0 += kC) {
            __syncthreads();
            for (int idx = tid; idx < kC * kMaxD; idx += kW * 32) {
                const int r = idx / kMaxD, c = idx % kMaxD;
                const bool ok = j0 + r < sk && c < d;
                sK[r * kKS + c] = ok ? kb[(int64_t)(j0 + r) * p.k_row_stride + c] : 0.0f;
                sV[r * kKS + c] = ok ? vb[(int64_t)(j0 + r) * p.v_row_stride + c] : 0.0f;
            }
            __syncthreads();
            if (!row_ok) continue;
            const int j = j0 + lane;
            float s = 0.0f, dp = 0.0f;
#pragma unroll 8
            for (int c = 0; c < kMaxD; ++c) {
                s = fmaf(sQ[warp * kMaxD + c], sK[lane * kKS + c], s);
                dp = fmaf(sdO[warp * kMaxD + c], sV[lane * kKS + c], dp);
            }
            float dth;
            const float x = score_to_log2<true>(p.score, s, alibi_log2, i + off - j, &dth);
            const float pr = (j < sk && j >= lo && j <= hi) ? exp2f(x - lse) : 0.0f;
            if (p.drop_threshold) dp = dropout_keep(p, bh, i, j) ? dp * p.drop_scale : 0.0f;
            const float ds = pr * (dp - drow) * dth;
#pragma unroll 4
            for (int jj = 0; jj < kC; ++jj) {
                const float dsj = __shfl_sync(0xffffffffu, ds, jj);
#pragma unroll
                for (int c = 0; c < kPer; ++c) acc[c] = fmaf(dsj, sK[jj * kKS + lane + 32 * c], acc[c]);
            }
        }
        if (!row_ok) continue;
#pragma unroll
        for (int c = 0; c < kPer; ++c)
            if (lane + 32 * c < d) dqb[(int64_t)i * p.dq_row_stride + lane + 32 * c] = acc[c] * p.score.softmax_scale;
    }
}

template <int kMaxD>
__global__ void __launch_bounds__(kW * 32) flash_bwd_dkdv_f32_kernel(const __grid_constant__ FlashParams p) {
    constexpr int kPer = kMaxD / 32, kKS = kMaxD + 1;
    extern __shared__ __align__(16) unsigned char pf_smem[];
    float *sQ = reinterpret_cast<float *>(pf_smem); /* [kC][kKS] */
    float *sdO = sQ + kC * kKS;
    float *sKr = sdO + kC * kKS;  /* [kW][kMaxD] */
    float *sVr = sKr + kW * kMaxD;
    float *sLse = sVr + kW * kMaxD; /* [kC] */
    float *sDs = sLse + kC;         /* [kC] */
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int b = blockIdx.z, hk = blockIdx.y;
    const SeqInfo si = seq_info(p, b);
    const int sq = si.sq, sk = si.sk, d = p.head_dim, off = sk - sq;
    const MaskRule mask = mask_rule(p, sk);
    const int64_t rows_total = flat_rows(p);
    const int64_t row_base = flat_row_base(p, b, si);
    const float *kb = static_cast<const float *>(p.k) + b * p.k_batch_stride + (int64_t)si.k_start * p.k_row_stride +
                      hk * p.k_head_stride;
    const float *vb = static_cast<const float *>(p.v) + b * p.v_batch_stride + (int64_t)si.k_start * p.v_row_stride +
                      hk * p.v_head_stride;
    float *dkb = static_cast<float *>(p.dk) + b * p.dk_batch_stride + (int64_t)si.k_start * p.dk_row_stride +
                 hk * p.dk_head_stride;
    float *dvb = static_cast<float *>(p.dv) + b * p.dv_batch_stride + (int64_t)si.k_start * p.dv_row_stride +
                 hk * p.dv_head_stride;

    for (int tile = blockIdx.x; tile * kW < sk; tile += gridDim.x) {
        const int j0 = tile * kW, keys_valid = imin(kW, sk - j0), j = j0 + warp;
        const bool key_ok = warp < keys_valid;
        int i_begin, i_end;
        mask.query_range(j0, j0 + keys_valid - 1, off, sq, &i_begin, &i_end);
        __syncthreads();
        for (int c = lane; c < kMaxD; c += 32) {
            const bool ok = key_ok && c < d;
            sKr[warp * kMaxD + c] = ok ? kb[(int64_t)j * p.k_row_stride + c] : 0.0f;
            sVr[warp * kMaxD + c] = ok ? vb[(int64_t)j * p.v_row_stride + c] : 0.0f;
        }
        float dk[kPer], dv[kPer];
#pragma unroll
        for (int c = 0; c < kPer; ++c) dk[c] = dv[c] = 0.0f;
        for (int h = hk * p.head_group; h < (hk + 1) * p.head_group; ++h) {
            const float *qb = static_cast<const float *>(p.q) + b * p.q_batch_stride +
                              (int64_t)si.q_start * p.q_row_stride + h * p.q_head_stride;
            const float *dob = static_cast<const float *>(p.dout) + b * p.do_batch_stride +
                               (int64_t)si.q_start * p.do_row_stride + h * p.do_head_stride;
            const float alibi_log2 = p.score.alibi_log2(b, h);
            const uint64_t bh = (uint64_t)b * p.num_heads + h;
            for (int i0 = i_begin / kC * kC; i0 < i_end; i0 += kC) {
                __syncthreads();
                for (int idx = tid; idx < kC * kMaxD; idx += kW * 32) {
                    const int r = idx / kMaxD, c = idx % kMaxD;
                    const bool ok = i0 + r < sq && c < d;
                    sQ[r * kKS + c] = ok ? qb[(int64_t)(i0 + r) * p.q_row_stride + c] : 0.0f;
                    sdO[r * kKS + c] = ok ? dob[(int64_t)(i0 + r) * p.do_row_stride + c] : 0.0f;
                }
                if (tid < kC) {
                    const int i = i0 + tid;
                    float l = INFINITY, dd = 0.0f;
                    if (i < sq) {
                        l = p.lse[b * p.lse_batch_stride + h * p.lse_head_stride +
                                  (int64_t)(si.q_start + i) * p.lse_row_stride];
                        l = lse_to_log2(l);
                        dd = p.dsum[h * rows_total + row_base + i];
                    }
                    sLse[tid] = l;
                    sDs[tid] = dd;
                }
                __syncthreads();
                if (!key_ok) continue;
                const int i = i0 + lane;
                float s = 0.0f, dp = 0.0f;
#pragma unroll 8
                for (int c = 0; c < kMaxD; ++c) {
                    s = fmaf(sQ[lane * kKS + c], sKr[warp * kMaxD + c], s);
                    dp = fmaf(sdO[lane * kKS + c], sVr[warp * kMaxD + c], dp);
                }
                const int lo = mask.lo(i + off), hi = mask.hi(i + off);
                float dth;
                const float x = score_to_log2<true>(p.score, s, alibi_log2, i + off - j, &dth);
                const float pr = (i < sq && j >= lo && j <= hi) ? exp2f(x - sLse[lane]) : 0.0f;
                float pd = pr;
                if (p.drop_threshold) {
                    const bool keep = dropout_keep(p, bh, i, j);
                    pd = keep ? pr * p.drop_scale : 0.0f;
                    dp = keep ? dp * p.drop_scale : 0.0f;
                }
                const float ds = pr * (dp - sDs[lane]) * dth;
#pragma unroll 4
                for (int ii = 0; ii < kC; ++ii) {
                    const float pdi = __shfl_sync(0xffffffffu, pd, ii);
                    const float dsi = __shfl_sync(0xffffffffu, ds, ii);
#pragma unroll
                    for (int c = 0; c < kPer; ++c) {
                        dv[c] = fmaf(pdi, sdO[ii * kKS + lane + 32 * c], dv[c]);
                        dk[c] = fmaf(dsi, sQ[ii * kKS + lane + 32 * c], dk[c]);
                    }
                }
            }
        }
        if (!key_ok) continue;
#pragma unroll
        for (int c = 0; c < kPer; ++c) {
            const int col = lane + 32 * c;
            if (col < d) {
                dkb[(int64_t)j * p.dk_row_stride + col] = dk[c] * p.score.softmax_scale;
                dvb[(int64_t)j * p.dv_row_stride + col] = dv[c];
            }
        }
    }
}

template <int kMaxD>
pf_status launch_bwd_f32(const FlashParams &p, cudaStream_t stream, int device) {
    static std::atomic<uint64_t> done_dq{0}, done_kv{0};
    constexpr int smem_dq = (2 * kC * (kMaxD + 1) + 2 * kW * kMaxD) * 4;
    constexpr int smem_kv = (2 * kC * (kMaxD + 1) + 2 * kW * kMaxD + 2 * kC) * 4;
    const int qt = (p.max_seqlen_q + kW - 1) / kW, kt = (p.max_seqlen_k + kW - 1) / kW;
    PF_TRY(launch_with_smem(flash_bwd_dq_f32_kernel<kMaxD>, dim3(qt > 0 ? qt : 1, p.num_heads, p.batch), kW * 32,
                            smem_dq, stream, device, done_dq, p));
    PF_TRY(launch_with_smem(flash_bwd_dkdv_f32_kernel<kMaxD>, dim3(kt > 0 ? kt : 1, p.num_kv_heads, p.batch), kW * 32,
                            smem_kv, stream, device, done_kv, p));
    return PF_STATUS_OK;
}

}  // namespace

/* Pass 1 (D; the workspace comes from pf_cuda_flash_bwd), then dQ and dK / dV. */
pf_status flash_bwd_f32_run(const FlashParams &p, cudaStream_t stream, int device) {
    const int64_t rows = flat_rows(p);
    int sms = 0;
    PF_TRY(sm_count(device, &sms));
    const int64_t warps = rows * p.num_heads;
    const int blocks = (int)((warps + 7) / 8 < (int64_t)sms * 8 ? (warps + 7) / 8 : (int64_t)sms * 8);
    bwd_prep_kernel<float><<<(blocks > 0 ? blocks : 1), 256, 0, stream>>>(p, rows, 0);
    PF_CUDA_CHECK_LAUNCH("bwd_prep_kernel");
    if (p.head_dim <= 64) return launch_bwd_f32<64>(p, stream, device);
    if (p.head_dim <= 128) return launch_bwd_f32<128>(p, stream, device);
    return launch_bwd_f32<256>(p, stream, device);
}

}  // namespace cuda
}  // namespace pf
