/*
 * dispatch.c - public entry points: validate, then hand the call to the CPU
 * backend (csrc/cpu/) or the CUDA backend (cuda/, when built) by the device
 * of the first tensor argument.
 */
#include "../cpu/cpu_backend.h"
#include "pf_internal.h"

#ifdef PF_WITH_CUDA
#include "pf_cuda.h"
#endif

int pf_has_cuda(void) {
#ifdef PF_WITH_CUDA
    return 1;
#else
    return 0;
#endif
}

int pf_cuda_device_count(void) {
#ifdef PF_WITH_CUDA
    return pf_cuda_runtime_device_count();
#else
    return 0;
#endif
}

int pf_cuda_pointer_device(const void *ptr) {
#ifdef PF_WITH_CUDA
    return pf_cuda_runtime_pointer_device(ptr);
#else
    (void)ptr;
    return -1;
#endif
}

const char *pf_cuda_archs(void) {
#ifdef PF_WITH_CUDA
    return pf_cuda_compiled_archs();
#else
    return "";
#endif
}

void *pf_host_alloc(size_t bytes) { return pf_aligned_alloc(bytes); }

pf_status pf_device_alloc(void **ptr, size_t bytes, int32_t device_id) {
    *ptr = NULL;
#ifdef PF_WITH_CUDA
    return pf_cuda_device_alloc(ptr, bytes, device_id);
#else
    (void)bytes;
    (void)device_id;
    PF_CHECK(0, PF_STATUS_NOT_SUPPORTED, "device: this pagedflash was built without CUDA");
#endif
}

void pf_device_free(void *ptr, int32_t device_id) {
#ifdef PF_WITH_CUDA
    pf_cuda_device_free(ptr, device_id);
#else
    (void)ptr;
    (void)device_id;
#endif
}

pf_status pf_flash_fwd(const pf_attn_params *p) {
    PF_TRY(pf_flash_fwd_validate(p));
    PF_DISPATCH(p->q.device, pf_cpu_flash_fwd(p), pf_cuda_flash_fwd(p));
}

pf_status pf_flash_bwd(const pf_attn_params *p) {
    PF_TRY(pf_flash_bwd_validate(p));
    PF_DISPATCH(p->q.device, pf_cpu_flash_bwd(p), pf_cuda_flash_bwd(p));
}

/* validate_attn.c; internal (the mask is a testing aid, its check lives with the others) */
pf_status pf_dropout_mask_validate(const pf_attn_params *p, const pf_tensor *mask);

pf_status pf_dropout_mask(const pf_attn_params *p, pf_tensor mask) {
    PF_TRY(pf_dropout_mask_validate(p, &mask));
    PF_DISPATCH(p->q.device, pf_cpu_dropout_mask(p, mask), pf_cuda_dropout_mask(p, mask));
}
