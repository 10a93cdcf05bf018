/*
 * pf_cuda.h - the CUDA backend's operations: extern "C" launchers, the entries
 * of pf_cuda_backend (cuda_backend.cu), each called by the core after
 * validation, each returning a pf_status (PF_STATUS_CUDA_ERROR with the CUDA
 * message and call site on failure). Compiled only when PF_WITH_CUDA is set.
 */
#ifndef PF_CUDA_H
#define PF_CUDA_H

#include "pagedflash.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Launchers (params validated by the core). */
/* flash attention (cuda/flash/): the forward and backward pick their kernel family
 * (sm_80 mma.sync, sm_90 wgmma, float32) in fwd_launch.cu / bwd_launch.cu;
 * the dropout keep mask for tests in dropout_mask.cu */
pf_status pf_cuda_flash_fwd(const pf_attn_params *p);
pf_status pf_cuda_flash_bwd(const pf_attn_params *p);
pf_status pf_cuda_dropout_mask(const pf_attn_params *p, pf_tensor mask);
/* paged/launch.cu: the tensor-core or simple kernel as p->kernel (pf_kernel) says or, for
 * PF_KERNEL_AUTO, as the heuristics pick; PF_STATUS_NOT_SUPPORTED when a hinted kernel
 * cannot take the call (docs/cuda_paged.md) */
pf_status pf_cuda_paged_attn(const pf_paged_params *p);
/* paged/merge.cu (attn/merge.cuh: the log-sum-exp merge shared with paged attention's splits) */
pf_status pf_cuda_merge_attn_states(const pf_merge_params *p);
/* cache/cache_ops.cu */
pf_status pf_cuda_write_kv_cache(pf_tensor k, pf_tensor v, pf_tensor k_cache, pf_tensor v_cache, pf_tensor slot_mapping,
                                 pf_tensor k_scale, pf_tensor v_scale, void *stream);
pf_status pf_cuda_copy_blocks(const pf_tensor *caches, int32_t num_caches, pf_tensor block_mapping, void *stream);
pf_status pf_cuda_swap_blocks(pf_tensor src, pf_tensor dst, pf_tensor block_mapping, void *stream);

#ifdef __cplusplus
}
#endif

#endif /* PF_CUDA_H */
