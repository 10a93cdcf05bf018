/*
 * workspace.cu - the cached scratch space of the CUDA backend (declared in
 * common/cuda_util.cuh).
 *
 * Workspace: one buffer per (device, stream). A request that fits returns the
 * cached buffer; a larger one replaces it: the old buffer is released with
 * cudaFreeAsync and the new one taken with cudaMallocAsync, both on the
 * requesting stream, so the release is ordered after every kernel already
 * enqueued there that reads it, and nothing synchronizes. Sizes grow to the next
 * power of two (>= 1 MiB) so a slowly growing workload reallocates rarely.
 * Buffers live until the process exits (the driver reclaims them). During
 * stream capture no cached buffer is touched: the scratch space becomes a
 * graph memory node (allocated and freed inside the graph), so graphs stay
 * replayable and independent of later eager calls.
 *
 * Sharing rule: work on one stream runs in order, so consecutive calls on a
 * stream may reuse its buffer freely; different streams never share one. A
 * stream destroyed and re-created with the same handle value inherits the old
 * buffer, which is safe once the old stream's work has finished (destroying a
 * stream with pending work that still uses the buffer, then reusing its handle
 * at once, is not supported).
 */
#include <mutex>
#include <unordered_map>

#include "common/cuda_util.cuh"

namespace {

struct pf_ws_key {
    int device;
    cudaStream_t stream;
    bool operator==(const pf_ws_key &o) const { return device == o.device && stream == o.stream; }
};

struct pf_ws_hash {
    size_t operator()(const pf_ws_key &k) const {
        return std::hash<const void *>()((const void *)k.stream) ^ ((size_t)k.device * 0x9e3779b97f4a7c15ull);
    }
};

struct pf_ws_entry {
    void *ptr = nullptr;
    size_t bytes = 0;
};

std::mutex pf_ws_mutex;
std::unordered_map<pf_ws_key, pf_ws_entry, pf_ws_hash> *pf_ws_map = nullptr; /* never destroyed */

}  // namespace

pf_status pf_cuda_scratch_acquire(cudaStream_t stream, size_t bytes, pf_cuda_scratch *scratch) {
    scratch->ptr = nullptr;
    scratch->graph_owned = false;
    if (bytes == 0) return PF_STATUS_OK;
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    PF_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    if (capture == cudaStreamCaptureStatusActive) {
        /* a graph memory node: allocated and freed by every replay of the graph */
        PF_CUDA_CHECK(cudaMallocAsync(&scratch->ptr, bytes, stream));
        scratch->graph_owned = true;
        return PF_STATUS_OK;
    }
    int device = 0;
    PF_CUDA_CHECK(cudaGetDevice(&device));
    std::lock_guard<std::mutex> lock(pf_ws_mutex);
    if (!pf_ws_map) pf_ws_map = new std::unordered_map<pf_ws_key, pf_ws_entry, pf_ws_hash>();
    pf_ws_entry &e = (*pf_ws_map)[pf_ws_key{device, stream}];
    if (e.bytes < bytes) {
        size_t want = (size_t)1 << 20;
        while (want < bytes) want <<= 1;
        if (e.ptr) {
            PF_CUDA_CHECK(cudaFreeAsync(e.ptr, stream));
            e.ptr = nullptr;
            e.bytes = 0;
        }
        PF_CUDA_CHECK(cudaMallocAsync(&e.ptr, want, stream));
        e.bytes = want;
    }
    scratch->ptr = e.ptr;
    return PF_STATUS_OK;
}

pf_status pf_cuda_scratch_release(cudaStream_t stream, pf_cuda_scratch *scratch) {
    if (scratch->graph_owned && scratch->ptr) {
        void *p = scratch->ptr;
        scratch->ptr = nullptr;
        scratch->graph_owned = false;
        PF_CUDA_CHECK(cudaFreeAsync(p, stream));
    }
    return PF_STATUS_OK;
}
