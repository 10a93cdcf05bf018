/*
 * cuda_util.cuh - small helpers shared by the CUDA launchers (C++ only, never
 * seen by the C core):
 *
 *   PF_CUDA_CHECK(expr)     run a CUDA runtime call; on failure clear the
 *                           (non-sticky) error, record "expr: message (name)"
 *                           plus file:line through pf_set_error, and return
 *                           PF_STATUS_CUDA_ERROR from the enclosing function.
 *   PF_CUDA_CHECK_LAUNCH()  the same for the launch that just happened
 *                           (cudaGetLastError after <<<...>>>).
 *   pf_cuda_device_guard    makes a device current for a scope and restores the
 *                           caller's device on exit (checked on entry).
 *   pf_cuda_scratch_acquire / _release: a cached, grow-only scratch buffer
 *                           per (device, stream), graph-capture aware -- see
 *                           workspace.cu.
 *   pf_cuda_sm_count()      multiprocessor count of a device, cached.
 *   pf_cu_load / pf_cu_store / pf_cu_to_float: float16 / bfloat16 / float32
 *                           element conversion in device code.
 */
#ifndef PF_CUDA_UTIL_CUH
#define PF_CUDA_UTIL_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "pf_cuda.h"
#include "backend.h"
#include "pf_error.h"

#define PF_CUDA_CHECK(expr)                                                                     \
    do {                                                                                        \
        cudaError_t pf_cuda_err_ = (expr);                                                      \
        if (pf_cuda_err_ != cudaSuccess) {                                                      \
            (void)cudaGetLastError();                                                           \
            return pf_set_error(PF_STATUS_CUDA_ERROR, __FILE__, __LINE__, "%s: %s (%s)", #expr, \
                                cudaGetErrorString(pf_cuda_err_), cudaGetErrorName(pf_cuda_err_)); \
        }                                                                                       \
    } while (0)

/* PF_CUDA_CHECK_LAUNCH() or PF_CUDA_CHECK_LAUNCH("kernel"): the launch error, if any. */
#define PF_CUDA_CHECK_LAUNCH(...) PF_CUDA_CHECK(cudaGetLastError())

/* Makes `device` current for the guard's lifetime (a no-op when it already is).
 * Use: pf_cuda_device_guard g; PF_TRY(g.set(device)); */
struct pf_cuda_device_guard {
    int prev = -1;
    bool switched = false;
    pf_status set(int device) {
        PF_CUDA_CHECK(cudaGetDevice(&prev));
        if (prev != device) {
            PF_CUDA_CHECK(cudaSetDevice(device));
            switched = true;
        }
        return PF_STATUS_OK;
    }
    ~pf_cuda_device_guard() {
        if (switched) cudaSetDevice(prev);
    }
};

/*
 * Scratch space of at least `bytes` bytes for work enqueued on `stream` of the
 * current device, held from pf_cuda_scratch_acquire to pf_cuda_scratch_release
 * (call release after enqueuing the work that uses it, also on error paths).
 *
 * Outside graph capture: one cached buffer per (device, stream), grown (never
 * shrunk) with cudaMallocAsync / cudaFreeAsync on that stream, so growing never
 * synchronizes and never frees memory that earlier work on the stream still
 * reads; release does nothing. While `stream` is being captured into a CUDA
 * graph: a graph-owned allocation (cudaMallocAsync in the capture) freed by
 * release (cudaFreeAsync in the capture), so the graph can be replayed any
 * number of times and never refers to the cached buffers. Thread-safe.
 * bytes == 0 gives NULL.
 */
struct pf_cuda_scratch {
    void *ptr = nullptr;
    bool graph_owned = false;
};
pf_status pf_cuda_scratch_acquire(cudaStream_t stream, size_t bytes, pf_cuda_scratch *scratch);
pf_status pf_cuda_scratch_release(cudaStream_t stream, pf_cuda_scratch *scratch);

/* Multiprocessor count of the current device (cached per device). */
pf_status pf_cuda_sm_count(int *count);

/* ---- element conversion ---- */

__device__ __forceinline__ float pf_cu_to_float(float x) { return x; }
__device__ __forceinline__ float pf_cu_to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float pf_cu_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T pf_cu_from_float(float x);
template <>
__device__ __forceinline__ float pf_cu_from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half pf_cu_from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 pf_cu_from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

#endif /* PF_CUDA_UTIL_CUH */
