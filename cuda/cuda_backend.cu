/*
 * cuda_backend.cu - pf_cuda_backend, the CUDA backend's table (backend.h):
 * its operations (the launchers declared in pf_cuda.h), the limits of its
 * kernels, and its device services: what it was built for, what the driver
 * reports at run time (a machine with nvcc but no driver reports 0 devices),
 * device memory.
 */
#include <cuda_runtime.h>
#include <stdint.h>

#include "backend.h"
#include "pf_cuda.h"

#ifndef PF_CUDA_ARCHS_STR
#define PF_CUDA_ARCHS_STR ""
#endif

static int cuda_device_count(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError(); /* clear the sticky "no driver" error */
        return 0;
    }
    return n;
}

static int cuda_pointer_device(const void *ptr) {
    cudaPointerAttributes attr;
    if (cudaPointerGetAttributes(&attr, ptr) != cudaSuccess) {
        cudaGetLastError();
        return -1;
    }
    return attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged ? attr.device : -1;
}

static const char *cuda_archs(void) { return PF_CUDA_ARCHS_STR; }
static pf_status cuda_alloc(void **ptr, size_t bytes, int32_t device_id) {
    int prev = 0;
    if (cudaGetDevice(&prev) != cudaSuccess || cudaSetDevice(device_id) != cudaSuccess) {
        cudaGetLastError();
        return PF_STATUS_CUDA_ERROR;
    }
    cudaError_t err = cudaMalloc(ptr, bytes);
    cudaSetDevice(prev);
    if (err != cudaSuccess) {
        cudaGetLastError();
        *ptr = NULL;
        return PF_STATUS_CUDA_ERROR;
    }
    return PF_STATUS_OK;
}

static void cuda_free(void *ptr, int32_t device_id) {
    int prev = 0;
    cudaGetDevice(&prev);
    cudaSetDevice(device_id);
    cudaFree(ptr);
    cudaSetDevice(prev);
}

/* Limits of the kernels (the core checks them before a call runs): int32 row and
 * token indices (sequence lengths < 2^30 keep their products with small factors
 * in range), 16-bit grid dimensions for heads and batch, 32-bit grid x of the
 * row-per-warp kernels (4 rows per block), 6 leading dimensions in the merge's
 * addressing, no packed dropout mask, and no compressed (float8 / int8) KV caches
 * in paged_attn and write_kv_cache yet (copy_blocks and swap_blocks move their bytes). */
extern "C" const pf_backend pf_cuda_backend = {
    /* name */ "cuda",
    /* limits */ {(int64_t)1 << 30, 65535, 65535, 4 * ((int64_t)INT32_MAX - 1), PF_MAX_DIMS - 2, 0, 0},
    pf_cuda_flash_fwd,
    pf_cuda_flash_bwd,
    pf_cuda_dropout_mask,
    pf_cuda_paged_attn,
    pf_cuda_merge_attn_states,
    pf_cuda_write_kv_cache,
    pf_cuda_copy_blocks,
    pf_cuda_swap_blocks,
    cuda_device_count,
    cuda_archs,
    cuda_pointer_device,
    cuda_alloc,
    cuda_free,
};

/* The sm_90a (wgmma) kernels: compiled in when "90" is among the build's
 * archs, run on compute capability 9.x devices (the flash launchers' kernel
 * choice, cuda/flash/fwd_launch.cu and bwd_launch.cu; the kernel hint "sm80"
 * selects the mma.sync kernels there too). Cached per device. */
#include <string.h>

#include <atomic>

namespace pf {
namespace cuda {
bool sm90_available(int device) {
    static std::atomic<int> cache[64]; /* 0 unknown, 1 no, 2 yes */
    if (device < 0 || device >= 64) return false;
    int c = cache[device].load(std::memory_order_relaxed);
    if (c) return c == 2;
    const char *archs = PF_CUDA_ARCHS_STR;
    bool built = false;
    for (const char *s = archs; (s = strstr(s, "90")) != NULL; s += 2)
        if ((s == archs || s[-1] == ',') && (s[2] == '\0' || s[2] == ',' || s[2] == 'a')) built = true;
    int major = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
        cudaGetLastError();
        major = 0;
    }
    const bool yes = built && major == 9;
    cache[device].store(yes ? 2 : 1, std::memory_order_relaxed);
    return yes;
}
}  // namespace cuda
}  // namespace pf
