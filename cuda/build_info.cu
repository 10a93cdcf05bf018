/*
 * build_info.cu - what the CUDA backend was built for, and what the driver
 * reports at run time. A machine with nvcc but no driver reports 0 devices.
 */
#include <cuda_runtime.h>

#include "pf_cuda.h"

#ifndef PF_CUDA_ARCHS_STR
#define PF_CUDA_ARCHS_STR ""
#endif

extern "C" int pf_cuda_runtime_device_count(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError(); /* clear the sticky "no driver" error */
        return 0;
    }
    return n;
}

extern "C" int pf_cuda_runtime_pointer_device(const void *ptr) {
    cudaPointerAttributes attr;
    if (cudaPointerGetAttributes(&attr, ptr) != cudaSuccess) {
        cudaGetLastError();
        return -1;
    }
    return attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged ? attr.device : -1;
}

extern "C" const char *pf_cuda_compiled_archs(void) { return PF_CUDA_ARCHS_STR; }


extern "C" pf_status pf_cuda_device_alloc(void **ptr, size_t bytes, int32_t device_id) {
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

extern "C" void pf_cuda_device_free(void *ptr, int32_t device_id) {
    int prev = 0;
    cudaGetDevice(&prev);
    cudaSetDevice(device_id);
    cudaFree(ptr);
    cudaSetDevice(prev);
}

/* The sm_90a (wgmma) kernels: compiled in when "90" is among the build's
 * archs, used on compute capability 9.x devices unless PAGEDFLASH_SM90=0
 * (which selects the sm_80 kernels everywhere, for comparisons; read on
 * every call, so one process can time both). The device part is cached. */
#include <stdlib.h>
#include <string.h>

#include <atomic>

namespace pf {
namespace cuda {
bool sm90_available(int device) {
    static std::atomic<int> cache[64]; /* 0 unknown, 1 no, 2 yes */
    if (device < 0 || device >= 64) return false;
    const char *env = getenv("PAGEDFLASH_SM90");
    if (env && env[0] == '0') return false;
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
