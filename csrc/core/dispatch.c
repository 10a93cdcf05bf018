/*
 * dispatch.c - the public entry points: validate (validate_*.c), then hand the
 * call to the backend of the tensors' device through its pf_backend table
 * (backend.h). A NULL entry is an operation that backend does not implement:
 * PF_STATUS_NOT_SUPPORTED naming both. Build information and device memory go
 * through the same tables.
 */
#include "validate.h"

const pf_backend *pf_backend_of(pf_device device) {
    switch (device) {
        case PF_DEVICE_CPU:
        case PF_DEVICE_CUDA_HOST: return &pf_cpu_backend;
        case PF_DEVICE_CUDA:
#ifdef PF_WITH_CUDA
            return &pf_cuda_backend;
#else
            return NULL;
#endif
    }
    return NULL;
}

/* The backend of `device` and its entry `slot`, or NOT_SUPPORTED naming the operation. */
#define PF_BACKEND_CALL(device, what, slot, ...)                                                            \
    do {                                                                                                    \
        const pf_backend *be_ = pf_backend_of(device);                                                      \
        PF_CHECK(be_ != NULL, PF_STATUS_NOT_SUPPORTED,                                                      \
                 "%s: this pagedflash was built without CUDA; tensors on a CUDA device need a build "       \
                 "with nvcc present (PAGEDFLASH_CUDA=1)",                                                   \
                 what);                                                                                     \
        PF_CHECK(be_->slot != NULL, PF_STATUS_NOT_SUPPORTED, "%s: not implemented by the %s backend", what, \
                 be_->name);                                                                                \
        return be_->slot(__VA_ARGS__);                                                                      \
    } while (0)

/* ---- build information and memory ---- */

int pf_has_cuda(void) { return pf_backend_of(PF_DEVICE_CUDA) != NULL; }

int pf_cuda_device_count(void) {
    const pf_backend *be = pf_backend_of(PF_DEVICE_CUDA);
    return be ? be->device_count() : 0;
}

int pf_cuda_pointer_device(const void *ptr) {
    const pf_backend *be = pf_backend_of(PF_DEVICE_CUDA);
    return be ? be->pointer_device(ptr) : -1;
}

const char *pf_cuda_archs(void) {
    const pf_backend *be = pf_backend_of(PF_DEVICE_CUDA);
    return be ? be->archs() : "";
}

void *pf_host_alloc(size_t bytes) {
    void *ptr = NULL;
    return pf_cpu_backend.alloc(&ptr, bytes, 0) == PF_STATUS_OK ? ptr : NULL;
}

pf_status pf_device_alloc(void **ptr, size_t bytes, int32_t device_id) {
    *ptr = NULL;
    PF_BACKEND_CALL(PF_DEVICE_CUDA, "device", alloc, ptr, bytes, device_id);
}

void pf_device_free(void *ptr, int32_t device_id) {
    const pf_backend *be = pf_backend_of(PF_DEVICE_CUDA);
    if (be) be->free(ptr, device_id);
}

/* ---- attention ---- */

pf_status pf_flash_fwd(const pf_attn_params *p) {
    PF_TRY(pf_flash_fwd_validate(p));
    PF_BACKEND_CALL(p->q.device, "flash_fwd", flash_fwd, p);
}

pf_status pf_flash_bwd(const pf_attn_params *p) {
    PF_TRY(pf_flash_bwd_validate(p));
    PF_BACKEND_CALL(p->q.device, "flash_bwd", flash_bwd, p);
}

/* validate_attn.c; internal (the mask is a testing aid, its check lives with the others) */
pf_status pf_dropout_mask_validate(const pf_attn_params *p, const pf_tensor *mask);

pf_status pf_dropout_mask(const pf_attn_params *p, pf_tensor mask) {
    PF_TRY(pf_dropout_mask_validate(p, &mask));
    PF_BACKEND_CALL(p->q.device, "dropout_mask", dropout_mask, p, mask);
}

/* ---- serving ---- */

pf_status pf_paged_attn(const pf_paged_params *p) {
    PF_TRY(pf_paged_attn_validate(p));
    PF_BACKEND_CALL(p->q.device, "paged_attn", paged_attn, p);
}

pf_status pf_merge_attn_states(const pf_merge_params *p) {
    PF_TRY(pf_merge_attn_states_validate(p));
    pf_merge_params b = *p; /* every lse as a [..., num_heads] view over out's leading dims (backend.h) */
    pf_merge_lse_view(&p->lse_a, &p->out, &b.lse_a);
    pf_merge_lse_view(&p->lse_b, &p->out, &b.lse_b);
    pf_merge_lse_view(&p->lse, &p->out, &b.lse);
    PF_BACKEND_CALL(p->out.device, "merge_attn_states", merge_attn_states, &b);
}

pf_status pf_write_kv_cache(pf_tensor k, pf_tensor v, pf_tensor k_cache, pf_tensor v_cache, pf_tensor slot_mapping,
                            void *stream) {
    const pf_tensor none = {0};
    return pf_write_kv_cache_scaled(k, v, k_cache, v_cache, slot_mapping, none, none, stream);
}

pf_status pf_write_kv_cache_scaled(pf_tensor k, pf_tensor v, pf_tensor k_cache, pf_tensor v_cache,
                                   pf_tensor slot_mapping, pf_tensor k_scale, pf_tensor v_scale, void *stream) {
    PF_TRY(pf_write_kv_cache_scaled_validate(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale));
    PF_BACKEND_CALL(k_cache.device, "write_kv_cache", write_kv_cache, k, v, k_cache, v_cache, slot_mapping, k_scale,
                    v_scale, stream);
}

pf_status pf_copy_blocks(const pf_tensor *caches, int32_t num_caches, pf_tensor block_mapping, void *stream) {
    PF_TRY(pf_copy_blocks_validate(caches, num_caches, block_mapping));
    pf_device device = num_caches > 0 ? caches[0].device : PF_DEVICE_CPU;
    PF_BACKEND_CALL(device, "copy_blocks", copy_blocks, caches, num_caches, block_mapping, stream);
}

/* Host <-> host runs on the CPU backend. If either side is on a CUDA device the
 * CUDA backend copies (cudaMemcpyAsync per block, host <-> device or device <->
 * device, on `stream`). */
static pf_status swap_blocks_run(pf_tensor src, pf_tensor dst, pf_tensor block_mapping, void *stream) {
    pf_device device = (src.device == PF_DEVICE_CUDA || dst.device == PF_DEVICE_CUDA) ? PF_DEVICE_CUDA : PF_DEVICE_CPU;
    PF_BACKEND_CALL(device, "swap_blocks", swap_blocks, src, dst, block_mapping, stream);
}

pf_status pf_swap_blocks(pf_tensor src, pf_tensor dst, pf_tensor block_mapping, void *stream) {
    PF_TRY(pf_swap_blocks_validate(src, dst, block_mapping));
    return swap_blocks_run(src, dst, block_mapping, stream);
}

/* The cache, then its per-(token, head) scales: both validated before either moves. */
pf_status pf_swap_blocks_scaled(pf_tensor src, pf_tensor dst, pf_tensor src_scale, pf_tensor dst_scale,
                                pf_tensor block_mapping, void *stream) {
    PF_TRY(pf_swap_blocks_scaled_validate(src, dst, src_scale, dst_scale, block_mapping));
    PF_TRY(swap_blocks_run(src, dst, block_mapping, stream));
    if (!pf_tensor_present(&src_scale) && src_scale.ndim == 0) return PF_STATUS_OK;
    return swap_blocks_run(src_scale, dst_scale, block_mapping, stream);
}
