/*
 * paged/paged.h - what the files of cuda/paged/ give each other (host side, C++):
 *
 *   plan.cu        the packed layouts' work lists: (sequence, row tile) pairs for
 *                  the tensor-core kernel, the owning sequence of each query token
 *                  for the simple kernel and the split merge
 *   simple.cu      the simple CUDA-core kernel: its occupancy, work and launch
 *   heuristics.cu  the automatic choices: row tile, CTA shape (pf_pick_shape),
 *                  split count
 *   merge.cu       the log-sum-exp merge of the split partials (and of
 *                  pf_merge_attn_states)
 *   launch.cu      pf_cuda_paged_attn, which uses all of the above
 *
 * The kernels' arguments and variants are in paged/args.cuh; the tensor-core
 * kernel's entry points (one pair per head dim and dtype) in inst/hdims.h.
 */
#ifndef PF_PAGED_PAGED_H
#define PF_PAGED_PAGED_H

#include "inst/hdims.h"
#include "paged/args.cuh"

/* ---- plan.cu ---- */

/* Packed layout, tensor-core kernel: a.num_row_tiles entries (sequence, row tile) of
 * rows_per_tile rows into plan [num_row_tiles, 2] (-1, -1 past the last tile), from the
 * device-resident cu_seqlens_q. One CTA; nothing synchronizes with the host. */
pf_status pf_paged_plan_enqueue(const pf_paged_args &a, int rows_per_tile, int32_t *plan, cudaStream_t stream);

/* Packed layout: qmap [total_q] = the sequence owning each query token, -1 for a token
 * that no sequence owns (cu_seqlens_q not non-decreasing). */
pf_status pf_paged_qmap_enqueue(const pf_paged_args &a, int32_t *qmap, cudaStream_t stream);

/* ---- simple.cu ---- */

/* Resident 4-warp blocks per multiprocessor of the simple kernel for q's dtype. */
pf_status pf_paged_simple_occupancy(pf_dtype dtype, int *blocks_per_sm);
/* Its blocks per split: one warp per (query, head). */
int64_t pf_paged_simple_work(const pf_paged_args &a);
/* Enqueue it (qmap: packed layouts, else NULL). */
pf_status pf_paged_simple_launch(const pf_paged_args &a, const int32_t *qmap, pf_dtype dtype, cudaStream_t stream);

/* ---- heuristics.cu ---- */

/* Rows per tile of the tensor-core kernel: 16 where a sequence has more than 8 rows
 * (q_len x group; always for packed layouts) and the head dim is <= 128, else 8. */
int pf_paged_rows_per_tile(const pf_paged_args &a);
/* The CTA shape by KV-head count: head mode 8x8 or 4x4, token mode 1x4. */
void pf_paged_default_shape(int num_kv_heads, pf_paged_variant *v);
/* At most one split per 64 tokens of the longest possible sequence, and 256. */
int64_t pf_paged_split_cap(const pf_paged_args &a);
/* The automatic split count: enough CTAs to fill the GPU once, within pf_paged_split_cap. */
int64_t pf_paged_auto_splits(const pf_paged_args &a, int64_t work, int sms, int occupancy);
/* Where head mode would split: token mode or 1 KV head x 8 warps instead (the rule and its
 * measurements are at the definition). Updates *v, *occupancy and *work. */
pf_status pf_pick_shape(const pf_paged_args &a, pf_paged_entry_fns entry, int sms, pf_paged_variant *v, int *occupancy,
                        int64_t *work);

/* ---- merge.cu ---- */

/* out (and lse) of every row from the a.num_splits partials in a.o_part / a.lse_part;
 * rows whose query token no sequence owns (qmap < 0) are left alone. */
pf_status pf_paged_merge_splits(const pf_paged_args &a, const int32_t *qmap, pf_dtype dtype, cudaStream_t stream);

#endif /* PF_PAGED_PAGED_H */
