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
 *                           workspace.cu; pf_cuda_scratch_lease holds one for a
 *                           scope and releases it on every path.
 *   pf::cuda::sm_count      multiprocessor count of a device, cached.
 *   pf::cuda::set_max_smem  a kernel's dynamic shared-memory limit, set once per device;
 *                           launch_with_smem sets it and launches.
 *   pf::cuda::sm90_available  whether a device runs this build's sm_90a kernels.
 * Element conversion in device code is TypeOps<T> (attn/mma.cuh).
 */
#ifndef PF_CUDA_UTIL_CUH
#define PF_CUDA_UTIL_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <atomic>

#include "backend.h"
#include "pf_cuda.h"
#include "pf_error.h"

#define PF_CUDA_CHECK(expr)                                                                        \
    do {                                                                                           \
        cudaError_t pf_cuda_err_ = (expr);                                                         \
        if (pf_cuda_err_ != cudaSuccess) {                                                         \
            (void)cudaGetLastError();                                                              \
            return pf_set_error(PF_STATUS_CUDA_ERROR, __FILE__, __LINE__, "%s: %s (%s)", #expr,    \
                                cudaGetErrorString(pf_cuda_err_), cudaGetErrorName(pf_cuda_err_)); \
        }                                                                                          \
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

/* Scratch space held for a scope, released on every way out of it. Use:
 *   pf_cuda_scratch_lease scratch(stream);
 *   PF_TRY(scratch.acquire(bytes));
 *   ... PF_TRY(enqueue work using scratch.ptr()) ...
 *   return scratch.release();
 * The success path returns release()'s status; an early return (a failing PF_TRY)
 * leaves the release to the destructor, which frees a graph-owned allocation without
 * recording an error, so the error being returned keeps its message and a capture
 * still frees every allocation it made (pf_cuda_scratch_release's rule, above). */
class pf_cuda_scratch_lease {
  public:
    explicit pf_cuda_scratch_lease(cudaStream_t stream) : stream_(stream) {}
    pf_cuda_scratch_lease(const pf_cuda_scratch_lease &) = delete;
    pf_cuda_scratch_lease &operator=(const pf_cuda_scratch_lease &) = delete;
    pf_status acquire(size_t bytes) { return pf_cuda_scratch_acquire(stream_, bytes, &scratch_); }
    void *ptr() const { return scratch_.ptr; }
    pf_status release() { return pf_cuda_scratch_release(stream_, &scratch_); }
    ~pf_cuda_scratch_lease() {
        if (scratch_.graph_owned && scratch_.ptr) { /* not released: an error path */
            cudaFreeAsync(scratch_.ptr, stream_);
            (void)cudaGetLastError();
        }
    }

  private:
    cudaStream_t stream_;
    pf_cuda_scratch scratch_;
};

namespace pf {
namespace cuda {

constexpr int kMaxDevices = 64;

/* Set a kernel's dynamic shared-memory limit to smem_bytes, once per device (needed
 * above 48 KB, and at 48 KB or less too when the kernel also has static shared memory
 * and the two together pass 48 KB). `done` is a per-kernel-instance bitmask (a
 * function-local static). */
template <typename Kernel>
inline pf_status set_max_smem(Kernel kernel, int smem_bytes, int device, std::atomic<uint64_t> &done) {
    if (smem_bytes <= 0) return PF_STATUS_OK;
    uint64_t bit = device < kMaxDevices ? (1ull << device) : 0;
    if (bit && (done.load(std::memory_order_acquire) & bit)) return PF_STATUS_OK;
    PF_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
    if (bit) done.fetch_or(bit, std::memory_order_acq_rel);
    return PF_STATUS_OK;
}

/* Launch kernel<<<grid, threads, smem_bytes, stream>>>(args...) with its dynamic
 * shared-memory limit set first (set_max_smem), and check the launch. */
template <typename Kernel, typename... Args>
inline pf_status launch_with_smem(Kernel kernel, dim3 grid, int threads, int smem_bytes, cudaStream_t stream,
                                  int device, std::atomic<uint64_t> &done, const Args &...args) {
    PF_TRY(set_max_smem(kernel, smem_bytes, device, done));
    kernel<<<grid, threads, smem_bytes, stream>>>(args...);
    PF_CUDA_CHECK_LAUNCH();
    return PF_STATUS_OK;
}

/* Multiprocessor count of `device` (cached). */
inline pf_status sm_count(int device, int *count) {
    static std::atomic<int> cache[kMaxDevices];
    if (device >= 0 && device < kMaxDevices) {
        int c = cache[device].load(std::memory_order_relaxed);
        if (c > 0) {
            *count = c;
            return PF_STATUS_OK;
        }
    }
    int c = 0;
    PF_CUDA_CHECK(cudaDeviceGetAttribute(&c, cudaDevAttrMultiProcessorCount, device));
    if (device >= 0 && device < kMaxDevices) cache[device].store(c, std::memory_order_relaxed);
    *count = c;
    return PF_STATUS_OK;
}

/* Does `device` run the sm_90a kernels of this build? (compute capability 9.0 and
 * sm_90 in PAGEDFLASH_CUDA_ARCHS; cached per device; cuda_backend.cu) */
bool sm90_available(int device);

}  // namespace cuda
}  // namespace pf

#endif /* PF_CUDA_UTIL_CUH */
