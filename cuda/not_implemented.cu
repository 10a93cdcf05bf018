/*
 * not_implemented.cu - launchers the CUDA backend does not provide yet. Each
 * returns PF_STATUS_NOT_SUPPORTED (NotImplementedError in Python) with a
 * message; a launcher moves out of this file when its kernel lands.
 */
#include "pf_cuda.h"
#include "pf_internal.h"

#define PF_CUDA_TODO(what) \
    PF_CHECK(0, PF_STATUS_NOT_SUPPORTED, "%s is not implemented on CUDA yet", what)

extern "C" pf_status pf_cuda_paged_attn(const pf_paged_params *) { PF_CUDA_TODO("paged_attn"); }
extern "C" pf_status pf_cuda_merge_attn_states(const pf_merge_params *) { PF_CUDA_TODO("merge_attn_states"); }
extern "C" pf_status pf_cuda_write_kv_cache(pf_tensor, pf_tensor, pf_tensor, pf_tensor, pf_tensor, void *) {
    PF_CUDA_TODO("write_kv_cache");
}
extern "C" pf_status pf_cuda_copy_blocks(const pf_tensor *, int32_t, pf_tensor, void *) {
    PF_CUDA_TODO("copy_blocks");
}
extern "C" pf_status pf_cuda_swap_blocks(pf_tensor, pf_tensor, pf_tensor, void *) { PF_CUDA_TODO("swap_blocks"); }
