/*
 * paged/plan.cu - the work lists of packed layouts (cu_seqlens_q), built on the
 * device from the device-resident cu_seqlens_q so that the host never reads
 * device memory and nothing synchronizes:
 *
 *   plan  int32 [num_row_tiles, 2]: (sequence, row tile) of each CTA row of the
 *         tensor-core kernel, tiles of rows_per_tile rows (query x head-in-group),
 *         sequences in order; (-1, -1) past the last tile. One CTA of 1024
 *         threads: a block-wide prefix sum of the tile counts, 1024 sequences at a
 *         time, then each thread writes its sequence's entries.
 *   qmap  int32 [total_q]: the sequence owning each query token, -1 where none
 *         does (cu_seqlens_q not non-decreasing); the simple kernel and the split
 *         merge use it. Filled with -1, then one warp per sequence writes its range.
 *
 * Each sequence's query range is clamped into [0, total_q] (as in the kernels).
 */
#include "paged/paged.h"

#define PF_PLAN_THREADS 1024

__global__ void __launch_bounds__(PF_PLAN_THREADS)
    pf_paged_plan_kernel(const int32_t *cu, int64_t cu_s, int batch, int total_q, int group, int rows, int bound,
                         int32_t *plan) {
    __shared__ int warp_sum[PF_PLAN_THREADS / 32];
    __shared__ int carry_s;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    if (tid == 0) carry_s = 0;
    __syncthreads();
    for (int base = 0; base < batch; base += PF_PLAN_THREADS) {
        const int b = base + tid;
        int tiles = 0;
        if (b < batch) {
            int c0 = min(max(cu[(int64_t)b * cu_s], 0), total_q);
            int c1 = min(max(cu[(int64_t)(b + 1) * cu_s], c0), total_q);
            tiles = (int)(((int64_t)(c1 - c0) * group + rows - 1) / rows);
        }
        int incl = tiles;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            int v = __shfl_up_sync(0xffffffffu, incl, o);
            if (lane >= o) incl += v;
        }
        if (lane == 31) warp_sum[warp] = incl;
        __syncthreads();
        if (warp == 0) {
            int w = warp_sum[lane];
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                int v = __shfl_up_sync(0xffffffffu, w, o);
                if (lane >= o) w += v;
            }
            warp_sum[lane] = w; /* inclusive over warps */
        }
        __syncthreads();
        const int carry = carry_s;
        const int offset = carry + (warp > 0 ? warp_sum[warp - 1] : 0) + incl - tiles;
        for (int j = 0; j < tiles; j++) {
            const int e = offset + j;
            if (e >= bound || e < 0) break;
            plan[2 * e] = b;
            plan[2 * e + 1] = j;
        }
        __syncthreads();
        if (tid == 0) carry_s = carry + warp_sum[PF_PLAN_THREADS / 32 - 1];
        __syncthreads();
    }
    for (int e = min(max(carry_s, 0), bound) + tid; e < bound; e += PF_PLAN_THREADS) {
        plan[2 * e] = -1;
        plan[2 * e + 1] = -1;
    }
}

/* Packed layout, simple kernel: the sequence owning each query token (-1: none). */
__global__ void pf_paged_qmap_kernel(const int32_t *cu, int64_t cu_s, int batch, int total_q, int32_t *qmap) {
    const int lane = threadIdx.x & 31;
    for (int b = (blockIdx.x * blockDim.x + threadIdx.x) >> 5; b < batch; b += (gridDim.x * blockDim.x) >> 5) {
        int c0 = min(max(cu[(int64_t)b * cu_s], 0), total_q);
        int c1 = min(max(cu[(int64_t)(b + 1) * cu_s], c0), total_q);
        for (int t = c0 + lane; t < c1; t += 32) qmap[t] = b;
    }
}

pf_status pf_paged_plan_enqueue(const pf_paged_args &a, int rows_per_tile, int32_t *plan, cudaStream_t stream) {
    pf_paged_plan_kernel<<<1, PF_PLAN_THREADS, 0, stream>>>(a.cu_seqlens_q, a.cu_s, a.batch, a.total_q, a.group,
                                                            rows_per_tile, a.num_row_tiles, plan);
    PF_CUDA_CHECK_LAUNCH();
    return PF_STATUS_OK;
}

pf_status pf_paged_qmap_enqueue(const pf_paged_args &a, int32_t *qmap, cudaStream_t stream) {
    PF_CUDA_CHECK(cudaMemsetAsync(qmap, 0xff, (size_t)a.total_q * sizeof(int32_t), stream));
    int blocks = (int)((a.batch + 7) / 8);
    if (blocks > 4096) blocks = 4096;
    pf_paged_qmap_kernel<<<blocks, 256, 0, stream>>>(a.cu_seqlens_q, a.cu_s, a.batch, a.total_q, qmap);
    PF_CUDA_CHECK_LAUNCH();
    return PF_STATUS_OK;
}
