/*
 * dispatch_paged.c - public entry points of the serving operations: paged
 * attention, merge of attention states, and the KV-cache operations
 * (write_kv_cache, copy_blocks, swap_blocks). Each validates (validate_paged.c)
 * and then hands the call to the CPU backend (csrc/cpu/) or to the CUDA
 * backend (cuda/, when built) by the device of the tensors it writes.
 */
#include "../cpu/cpu_backend.h"
#include "pf_internal.h"

#ifdef PF_WITH_CUDA
#include "pf_cuda.h"
#endif

pf_status pf_paged_attn(const pf_paged_params *p) {
    PF_TRY(pf_paged_attn_validate(p));
    PF_DISPATCH(p->q.device, pf_cpu_paged_attn(p), pf_cuda_paged_attn(p));
}

pf_status pf_merge_attn_states(const pf_merge_params *p) {
    PF_TRY(pf_merge_attn_states_validate(p));
    PF_DISPATCH(p->out.device, pf_cpu_merge_attn_states(p), pf_cuda_merge_attn_states(p));
}

pf_status pf_write_kv_cache(pf_tensor k, pf_tensor v, pf_tensor k_cache, pf_tensor v_cache,
                            pf_tensor slot_mapping, void *stream) {
    PF_TRY(pf_write_kv_cache_validate(k, v, k_cache, v_cache, slot_mapping));
    PF_DISPATCH(k_cache.device, pf_cpu_write_kv_cache(k, v, k_cache, v_cache, slot_mapping),
                pf_cuda_write_kv_cache(k, v, k_cache, v_cache, slot_mapping, stream));
}

pf_status pf_copy_blocks(const pf_tensor *caches, int32_t num_caches, pf_tensor block_mapping,
                         void *stream) {
    PF_TRY(pf_copy_blocks_validate(caches, num_caches, block_mapping));
    pf_device device = num_caches > 0 ? caches[0].device : PF_DEVICE_CPU;
    PF_DISPATCH(device, pf_cpu_copy_blocks(caches, num_caches, block_mapping),
                pf_cuda_copy_blocks(caches, num_caches, block_mapping, stream));
}

/* Host <-> host runs on the CPU backend. If either side is on a CUDA device the
 * CUDA backend copies (cudaMemcpyAsync per block, host <-> device or device <->
 * device, on `stream`). */
pf_status pf_swap_blocks(pf_tensor src, pf_tensor dst, pf_tensor block_mapping, void *stream) {
    PF_TRY(pf_swap_blocks_validate(src, dst, block_mapping));
    pf_device device =
        (src.device == PF_DEVICE_CUDA || dst.device == PF_DEVICE_CUDA) ? PF_DEVICE_CUDA : PF_DEVICE_CPU;
    PF_DISPATCH(device, pf_cpu_swap_blocks(src, dst, block_mapping),
                pf_cuda_swap_blocks(src, dst, block_mapping, stream));
}
