/*
 * backend.h - the interface between the C core and a backend.
 *
 * A backend is one constant table of function pointers (pf_backend): an entry
 * per operation, NULL where the backend does not implement it (the core then
 * raises PF_STATUS_NOT_SUPPORTED naming the operation), its device services
 * and the limits its kernels have. csrc/cpu exports pf_cpu_backend and, when
 * built, cuda/ exports pf_cuda_backend; the core finds the backend of a call
 * with pf_backend_of(device) and includes no backend header.
 *
 * Every operation is called after the core validated its parameters (all of
 * validation lives in csrc/core/validate_*.c, against the backend's limits
 * below): a backend entry only computes, on params->stream for CUDA, and
 * returns PF_STATUS_OK, or a status with pf_set_error's message (pf_error.h)
 * for a failure that only running can find (a CUDA error, host memory, a
 * kernel hint the call cannot take).
 *
 * A backend includes the public header, pf_error.h and this file, nothing
 * else of the core. Adding an operation: a slot here, its entry point in
 * pagedflash.h and csrc/core, and the backends that implement it
 * (docs/architecture.md has the whole list).
 */
#ifndef PF_BACKEND_H
#define PF_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "pagedflash.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Constants of the math every backend shares (scores are kept in the log2
 * domain: exp(x) = exp2(x log2 e)). */
#define PF_LOG2E 1.4426950408889634f
#define PF_LN2 0.6931471805599453f

/* What a backend's kernels can address; the core rejects larger problems with
 * PF_STATUS_NOT_SUPPORTED before the backend runs. 0 = no limit. */
typedef struct pf_backend_limits {
    int64_t max_seqlen;       /* flash: sequence lengths and packed totals, exclusive bound */
    int64_t max_heads;        /* flash: num_heads */
    int64_t max_batch;        /* flash: batch */
    int64_t max_rows;         /* merge / cache ops: rows (tokens x heads) of one launch */
    int32_t max_merge_dims;   /* merge_attn_states: leading dimensions of out */
    int32_t dropout_mask_varlen; /* 1 when pf_dropout_mask takes packed layouts */
    int32_t kv_quant;         /* 1 when paged_attn and write_kv_cache take compressed (float8, int8) caches */
} pf_backend_limits;

/* A compressed KV-cache dtype (pagedflash.h "Compressed KV caches"): float8_e4m3fn, float8_e5m2, int8. */
static inline int pf_dtype_compressed(pf_dtype dtype) {
    return dtype == PF_DTYPE_F8E4M3 || dtype == PF_DTYPE_F8E5M2 || dtype == PF_DTYPE_I8;
}

typedef struct pf_backend {
    const char *name; /* "cpu", "cuda": in messages */
    pf_backend_limits limits;

    /* operations (params validated) */
    pf_status (*flash_fwd)(const pf_attn_params *p);
    pf_status (*flash_bwd)(const pf_attn_params *p);
    pf_status (*dropout_mask)(const pf_attn_params *p, pf_tensor mask);
    pf_status (*paged_attn)(const pf_paged_params *p);
    /* lse_a, lse_b and lse (when present) come as views [..., num_heads] over out's leading
     * dimensions, whichever layout the caller passed (pf_merge_attn_states rewrites them) */
    pf_status (*merge_attn_states)(const pf_merge_params *p);
    /* k_scale / v_scale: absent for float caches (the only caches a backend without
     * limits.kv_quant is given) */
    pf_status (*write_kv_cache)(pf_tensor k, pf_tensor v, pf_tensor k_cache, pf_tensor v_cache, pf_tensor slot_mapping,
                                pf_tensor k_scale, pf_tensor v_scale, void *stream);
    pf_status (*copy_blocks)(const pf_tensor *caches, int32_t num_caches, pf_tensor block_mapping, void *stream);
    pf_status (*swap_blocks)(pf_tensor src, pf_tensor dst, pf_tensor block_mapping, void *stream);

    /* device services */
    int (*device_count)(void);                   /* devices present now */
    const char *(*archs)(void);                  /* what the kernels were compiled for ("90", "") */
    int (*pointer_device)(const void *ptr);      /* the device holding ptr, or -1 */
    pf_status (*alloc)(void **ptr, size_t bytes, int32_t device_id);
    void (*free)(void *ptr, int32_t device_id);
} pf_backend;

extern const pf_backend pf_cpu_backend; /* csrc/cpu/cpu_backend.c */
#ifdef PF_WITH_CUDA
extern const pf_backend pf_cuda_backend; /* cuda/cuda_backend.cu */
#endif

/* The backend that runs work on `device` (CUDA host memory is the CPU's), or
 * NULL when this build has none for it. */
const pf_backend *pf_backend_of(pf_device device);

#ifdef __cplusplus
}
#endif

#endif /* PF_BACKEND_H */
