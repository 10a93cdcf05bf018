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
