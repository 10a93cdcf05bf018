/*
 * cpu_backend.c - pf_cpu_backend: the CPU backend's table (backend.h). Every
 * operation is implemented; host memory (CPU and CUDA page-locked) is its device.
 * One kernel per operation: kernel hints are accepted and ignored.
 */
#include <stdlib.h>

#include "cpu_backend.h"

static int cpu_device_count(void) { return 1; }

static const char *cpu_archs(void) { return ""; }

static int cpu_pointer_device(const void *ptr) {
    (void)ptr;
    return -1;
}

static pf_status cpu_alloc(void **ptr, size_t bytes, int32_t device_id) {
    (void)device_id;
    *ptr = pf_aligned_alloc(bytes);
    PF_CHECK(*ptr != NULL, PF_STATUS_OUT_OF_MEMORY, "out of host memory: %zu bytes", bytes);
    return PF_STATUS_OK;
}

static void cpu_free(void *ptr, int32_t device_id) {
    (void)device_id;
    pf_aligned_free(ptr);
}

const pf_backend pf_cpu_backend = {
    .name = "cpu",
    .limits = {.dropout_mask_varlen = 1, .kv_quant = 1},
    .flash_fwd = pf_cpu_flash_fwd,
    .flash_bwd = pf_cpu_flash_bwd,
    .dropout_mask = pf_cpu_dropout_mask,
    .paged_attn = pf_cpu_paged_attn,
    .merge_attn_states = pf_cpu_merge_attn_states,
    .write_kv_cache = pf_cpu_write_kv_cache,
    .copy_blocks = pf_cpu_copy_blocks,
    .swap_blocks = pf_cpu_swap_blocks,
    .device_count = cpu_device_count,
    .archs = cpu_archs,
    .pointer_device = cpu_pointer_device,
    .alloc = cpu_alloc,
    .free = cpu_free,
};
