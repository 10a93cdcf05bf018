/*
 * flash/bwd_workspace.h - the layout of the backward's float32 workspace (from
 * the scratch pool, common/cuda_util.cuh; sized and set up by pf_cuda_flash_bwd,
 * flash/bwd_launch.cu), with rows = the call's query rows in the flat numbering
 * of flash/sequence.cuh (batch * seqlen_q, or total_q for packed batches):
 *
 *   dsum      D = rowsum(dO * O)     f32 [num_heads][rows]           (pass 1)
 *   dsum + bwd_lse2_offset(rows, num_heads):
 *             lse2 = lse log2 e, +inf on rows the forward masked completely
 *                                    f32 [num_heads][rows]           (pass 1)
 *   dq_accum  dQ / softmax_scale     f32 [rows][num_heads][head_dim_rounded]
 *             zeroed by pass 1, summed by pass 2 with atomics, converted by pass 3;
 *             absent in deterministic mode and for float32 (their dQ kernels write
 *             dq directly)
 */
#ifndef PF_FLASH_BWD_WORKSPACE_H
#define PF_FLASH_BWD_WORKSPACE_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime.h>

namespace pf {
namespace cuda {

/* Offset (floats) of lse2 from dsum: D's size rounded up to 256 bytes. */
__host__ __device__ inline int64_t bwd_lse2_offset(int64_t rows, int num_heads) {
    return (rows * num_heads + 63) & ~(int64_t)63;
}

/* Bytes of D and lse2 together. */
inline size_t bwd_dsum_bytes(int64_t rows, int num_heads) { return 2 * (size_t)bwd_lse2_offset(rows, num_heads) * 4; }

/* Bytes of dq_accum. */
inline size_t bwd_dq_accum_bytes(int64_t rows, int num_heads, int head_dim_rounded) {
    return (size_t)rows * num_heads * head_dim_rounded * 4;
}

}  // namespace cuda
}  // namespace pf

#endif /* PF_FLASH_BWD_WORKSPACE_H */
