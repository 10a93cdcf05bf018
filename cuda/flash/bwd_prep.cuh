/*
 * flash/bwd_prep.cuh - passes 1 and 3 of the flash backward (float16 / bfloat16
 * and float32), around the main kernels (flash/bwd_sm80.cuh, flash/bwd_sm90.cuh,
 * flash/bwd_dq.cuh, flash/bwd_f32.cu); workspace layout: flash/bwd_workspace.h.
 *
 *   pass 1  D = rowsum(dO * O) and lse2 = lse log2 e (+inf on rows the forward
 *           masked completely, attn/softmax.cuh lse_to_log2) per (flat row, head);
 *           zeroes dq_accum when the main kernel adds dQ into it
 *   pass 3  dq = dq_accum * softmax_scale in the input dtype
 *
 * Two versions of each: the scalar ones (bwd_prep_kernel: a warp per (row, head);
 * bwd_convert_dq_kernel: a thread per element) for every call, and vectorized ones
 * for the Hopper path's calls (aligned, non-deterministic; a thread per 16-byte
 * chunk of 8 elements). All are grid-stride loops over flat rows
 * (flash/sequence.cuh).
 */
#ifndef PF_FLASH_BWD_PREP_CUH
#define PF_FLASH_BWD_PREP_CUH

#include "attn/math.cuh"
#include "attn/mma.cuh"
#include "attn/softmax.cuh"
#include "flash/bwd_workspace.h"
#include "flash/params.h"
#include "flash/sequence.cuh"

namespace pf {
namespace cuda {

template <typename T>
__global__ void __launch_bounds__(256)
    bwd_prep_kernel(const __grid_constant__ FlashParams p, int64_t rows, int zero_dq) {
    const int lane = threadIdx.x % 32;
    const int64_t warps = (int64_t)gridDim.x * (blockDim.x / 32);
    const int H = p.num_heads, d = p.head_dim, hd = p.head_dim_rounded;
    for (int64_t w = blockIdx.x * (int64_t)(blockDim.x / 32) + threadIdx.x / 32; w < rows * H; w += warps) {
        const int64_t r = w / H;
        const int h = (int)(w % H);
        int64_t b, i;
        flat_row_position(p, r, b, i);
        const T *o = static_cast<const T *>(p.o) + b * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
        const T *dout =
            static_cast<const T *>(p.dout) + b * p.do_batch_stride + i * p.do_row_stride + h * p.do_head_stride;
        float acc = 0.0f;
        for (int c = lane; c < d; c += 32) acc += TypeOps<T>::to_float(o[c]) * TypeOps<T>::to_float(dout[c]);
#pragma unroll
        for (int x = 16; x > 0; x >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, x);
        if (lane == 0) p.dsum[h * rows + r] = acc;
        if (lane == 1) { /* lse2 = lse log2(e) (+inf for rows the forward masked completely: P = 0) */
            const float l = p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + i * p.lse_row_stride];
            p.dsum[bwd_lse2_offset(rows, H) + h * rows + r] = lse_to_log2(l);
        }
        if (zero_dq) {
            float *dq = p.dq_accum + (r * H + h) * hd;
            for (int c = lane; c < hd; c += 32) dq[c] = 0.0f;
        }
    }
}

/* pass 3: dq = dq_accum * scale */
template <typename T>
__global__ void __launch_bounds__(256) bwd_convert_dq_kernel(const __grid_constant__ FlashParams p, int64_t rows) {
    const int H = p.num_heads, d = p.head_dim, hd = p.head_dim_rounded;
    const int64_t n = rows * H * d;
    for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < n;
         idx += (int64_t)gridDim.x * blockDim.x) {
        const int c = (int)(idx % d);
        const int64_t rh = idx / d;
        const int h = (int)(rh % H);
        const int64_t r = rh / H;
        int64_t b, i;
        flat_row_position(p, r, b, i);
        T *dq = static_cast<T *>(p.dq) + b * p.dq_batch_stride + i * p.dq_row_stride + h * p.dq_head_stride;
        dq[c] = TypeOps<T>::from_float(p.dq_accum[(r * H + h) * hd + c] * p.score.softmax_scale);
    }
}

/* Passes 1 and 3 of the Hopper path (aligned, non-deterministic; rows * heads
 * * d / 8 < 2^30): one thread per 16-byte chunk (8 elements) of a (row, head), so every access
 * of O, dO, dq_accum and dq is a 16-byte vector (1.6-3.9x faster than the scalar passes on
 * H200: 72-80 us vs 108-206 us for the pre-pass, 46 vs 184 us for the convert). Same results
 * as bwd_prep_kernel / bwd_convert_dq_kernel (D summed in another order). */
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(256) bwd_prep_sm90_kernel(const __grid_constant__ FlashParams p, int rows) {
    constexpr int C = kHeadDim / 8; /* chunks per (row, head): 8 or 16, a power of two */
    const int H = p.num_heads, d = p.head_dim;
    const int total = rows * H * C;
    const int64_t lse2_off = bwd_lse2_offset(rows, H);
    /* whole warps iterate together (the shuffles below): the bound is rounded up to 32 */
    const int bound = (total + 31) & ~31;
    for (int w = blockIdx.x * blockDim.x + threadIdx.x; w < bound; w += gridDim.x * blockDim.x) {
        const bool valid = w < total;
        /* head-major (h, r, c): the lse reads and D / lse2 writes of a warp are contiguous */
        const int c = w % C;
        const int hr = w / C;
        const int r = hr % rows, h = hr / rows;
        int b, i;
        flat_row_position(p, r, b, i);
        float acc = 0.0f;
        if (valid && c * 8 < d) {
            const uint4 o = *reinterpret_cast<const uint4 *>(static_cast<const T *>(p.o) + b * p.o_batch_stride +
                                                             (int64_t)i * p.o_row_stride + h * p.o_head_stride + c * 8);
            const uint4 g =
                *reinterpret_cast<const uint4 *>(static_cast<const T *>(p.dout) + b * p.do_batch_stride +
                                                 (int64_t)i * p.do_row_stride + h * p.do_head_stride + c * 8);
            const T *oe = reinterpret_cast<const T *>(&o);
            const T *ge = reinterpret_cast<const T *>(&g);
#pragma unroll
            for (int x = 0; x < 8; ++x) acc += TypeOps<T>::to_float(oe[x]) * TypeOps<T>::to_float(ge[x]);
        }
#pragma unroll
        for (int x = C / 2; x > 0; x >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, x, C);
        if (!valid) continue;
        if (c == 0) p.dsum[(int64_t)h * rows + r] = acc;
        if (c == 1) {
            const float l = p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + i * p.lse_row_stride];
            p.dsum[lse2_off + (int64_t)h * rows + r] = lse_to_log2(l);
        }
        float4 *dq = reinterpret_cast<float4 *>(p.dq_accum + ((int64_t)r * H + h) * kHeadDim + c * 8);
        dq[0] = make_float4(0.f, 0.f, 0.f, 0.f);
        dq[1] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(256) bwd_convert_dq_sm90_kernel(const __grid_constant__ FlashParams p, int rows) {
    constexpr int C = kHeadDim / 8;
    const int H = p.num_heads, d = p.head_dim;
    const int total = rows * H * C;
    for (int w = blockIdx.x * blockDim.x + threadIdx.x; w < total; w += gridDim.x * blockDim.x) {
        const int c = w % C;
        if (c * 8 >= d) continue;
        const int rh = w / C;
        const int h = rh % H, r = rh / H;
        int b, i;
        flat_row_position(p, r, b, i);
        const float4 *src = reinterpret_cast<const float4 *>(p.dq_accum + (int64_t)w * 8);
        const float4 x0 = src[0], x1 = src[1];
        const float sc = p.score.softmax_scale;
        uint4 v;
        v.x = TypeOps<T>::pack(x0.x * sc, x0.y * sc);
        v.y = TypeOps<T>::pack(x0.z * sc, x0.w * sc);
        v.z = TypeOps<T>::pack(x1.x * sc, x1.y * sc);
        v.w = TypeOps<T>::pack(x1.z * sc, x1.w * sc);
        *reinterpret_cast<uint4 *>(static_cast<T *>(p.dq) + b * p.dq_batch_stride + (int64_t)i * p.dq_row_stride +
                                   h * p.dq_head_stride + c * 8) = v;
    }
}

}  // namespace cuda
}  // namespace pf

#endif /* PF_FLASH_BWD_PREP_CUH */
