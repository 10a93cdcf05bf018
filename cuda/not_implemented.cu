/*
 * not_implemented.cu - launchers the CUDA backend does not provide yet. Each
 * returns PF_STATUS_NOT_SUPPORTED (NotImplementedError in Python) with a
 * message; a launcher moves out of this file when its kernel lands.
 */
#include "pf_cuda.h"
#include "pf_internal.h"

#define PF_CUDA_TODO(what) \
    PF_CHECK(0, PF_STATUS_NOT_SUPPORTED, "%s is not implemented on CUDA yet", what)

extern "C" pf_status pf_cuda_flash_fwd(const pf_attn_params *) { PF_CUDA_TODO("flash_attn"); }
extern "C" pf_status pf_cuda_flash_bwd(const pf_attn_params *) { PF_CUDA_TODO("flash_attn_backward"); }
extern "C" pf_status pf_cuda_dropout_mask(const pf_attn_params *, pf_tensor) { PF_CUDA_TODO("dropout_mask"); }
