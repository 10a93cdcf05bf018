/*
 * flash/params.h - FlashParams, the kernel-side description of one flash
 * attention call (forward or backward): pointers, int64 element strides, the
 * lengths as int32 (the core checked them against pf_cuda_backend.limits), and
 * the per-call constants the kernels need precomputed. fill_flash_params
 * (flash/params.cu) builds it from a validated pf_attn_params; the launchers
 * (flash/fwd_launch.cu, flash/bwd_launch.cu) pass it by value to every kernel
 * (__grid_constant__).
 *
 * Addressing: element (b, token, head, c) of q lives at
 *   q + b * q_batch_stride + token * q_row_stride + head * q_head_stride + c
 * For packed variable-length batches the batch stride is 0 and `token` is the
 * absolute packed index cu_seqlens[b] + i. lse: b * lse_batch_stride +
 * head * lse_head_stride + token * lse_row_stride (same rule).
 */
#ifndef PF_FLASH_PARAMS_H
#define PF_FLASH_PARAMS_H

#include <cuda_runtime.h>
#include <stdint.h>

#include "attn/score.cuh"
#include "pagedflash.h"

namespace pf {
namespace cuda {

struct FlashParams {
    /* forward inputs / outputs */
    const void *q, *k, *v;  /* [b, sq, h, d] / [b, sk, hk, d] (or packed [t, h(k), d]) */
    void *o;                /* q's layout */
    float *lse;             /* [b, h, sq] or [h, total_q]; NULL = not wanted (fwd) */
    /* backward */
    const void *dout;       /* q's layout */
    void *dq, *dk, *dv;     /* q's / k's / v's layouts */
    float *dq_accum;        /* workspace (flash/bwd_workspace.h): f32 [rows][h][head_dim_rounded] */
    float *dsum;            /* workspace: f32 D = rowsum(dO * O) [h][rows], then lse2 */

    int64_t q_batch_stride, q_row_stride, q_head_stride;
    int64_t k_batch_stride, k_row_stride, k_head_stride;
    int64_t v_batch_stride, v_row_stride, v_head_stride;
    int64_t o_batch_stride, o_row_stride, o_head_stride;
    int64_t do_batch_stride, do_row_stride, do_head_stride;
    int64_t dq_batch_stride, dq_row_stride, dq_head_stride;
    int64_t dk_batch_stride, dk_row_stride, dk_head_stride;
    int64_t dv_batch_stride, dv_row_stride, dv_head_stride;
    int64_t lse_batch_stride, lse_head_stride, lse_row_stride;

    const int32_t *cu_seqlens_q, *cu_seqlens_k; /* device, varlen only (clamped in-kernel) */
    int batch, num_heads, num_kv_heads, head_group; /* head_group = num_heads / num_kv_heads */
    int head_dim;
    int seqlen_q, seqlen_k;  /* dense lengths; for varlen the packed totals */
    int max_seqlen_q;        /* grid rows: seqlen_q, or varlen's max_seqlen_q clamped to [1, total_q]
                                (a too-small hint is still safe: blocks loop over the extra tiles) */
    int max_seqlen_k;
    int total_q, total_k;    /* rows of the packed tensors (bounds for clamping) */
    int varlen;

    ScoreParams score;       /* softmax scale, softcap, ALiBi (attn/score.cuh) */
    int causal;
    int window_left, window_right; /* -1 = unbounded; causal forces right = 0 */

    float dropout_p;         /* the probability; the kernels use the two below */
    uint32_t drop_threshold; /* keep iff philox word >= threshold; 0 = off */
    float drop_scale;        /* 1 / (1 - p) */
    uint64_t seed, offset;

    int aligned;             /* 16-byte vector access is valid for every tensor */
    int deterministic;
    int head_dim_rounded;    /* backward: the compiled head dim, dq_accum's row length */

    /* Paged K/V: the forward of paged_attn's prefill path (paged/launch.cu; sm_90 kernel
     * only). block_table NULL: k / v are dense or packed as above. Otherwise k / v are the
     * caches [num_blocks, block_size, num_kv_heads, head_dim] (k_row_stride / v_row_stride:
     * between the rows of a block; k_head_stride / v_head_stride: between KV heads; batch
     * strides 0) and key j of sequence b is row j % block_size of block
     * block_table[b][j / block_size]; an id outside [0, num_blocks) is never read and its
     * keys are masked (flash/paged_kv.cuh). Appended last: the fields above keep the
     * offsets the dense kernels' SASS was measured with. */
    const int32_t *block_table;  /* [batch, max_blocks] */
    const int32_t *seq_lens;     /* [batch]: keys per sequence, clamped to [0, max_blocks * block_size] */
    const int32_t *plan;         /* packed queries (varlen): [num_plan_tiles, 2] (sequence, query tile),
                                    (-1, -1) past the last (paged/plan.cu); the grid walks it */
    int64_t bt_batch_stride, bt_col_stride, seq_lens_stride;
    int64_t k_block_stride, v_block_stride;
    int block_size, num_blocks, max_blocks, num_plan_tiles;
    unsigned bs_magic, bs_shift; /* j / block_size = (umulhi(j, bs_magic) + j) >> bs_shift */
};

/* Fill p from validated params (flash/params.cu); backward adds dout/dq/dk/dv. */
pf_status fill_flash_params(const pf_attn_params *a, FlashParams *p, bool backward);

}  // namespace cuda
}  // namespace pf

#endif /* PF_FLASH_PARAMS_H */
