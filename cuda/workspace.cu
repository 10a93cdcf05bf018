/*
 * workspace.cu - the per-device grow-only scratch buffer (see workspace.h for
 * the stream rule). Buffers live until the process exits.
 */
#include <mutex>

#include "flash_common.cuh"
#include "workspace.h"

namespace pf {
namespace cuda {

namespace {

struct DeviceWorkspace {
    std::mutex mu;
    void *ptr = nullptr;
    size_t size = 0;
    cudaEvent_t done = nullptr; /* recorded after the last call's kernels */
    bool pending = false;       /* `done` has been recorded at least once */
};

DeviceWorkspace g_ws[kMaxDevices];

}  // namespace

pf_status workspace_acquire(int device, size_t bytes, cudaStream_t stream, WorkspaceLease *lease) {
    PF_CHECK(device >= 0 && device < kMaxDevices, PF_STATUS_NOT_SUPPORTED,
             "device: CUDA device %d is beyond the %d the workspace cache supports", device, kMaxDevices);
    DeviceWorkspace &ws = g_ws[device];
    ws.mu.lock();
    lease->device = device;
    lease->held = true;
    lease->stream = stream;
    lease->ptr = nullptr;
    if (!ws.done) PF_CUDA_CHECK(cudaEventCreateWithFlags(&ws.done, cudaEventDisableTiming));
    if (ws.pending) PF_CUDA_CHECK(cudaStreamWaitEvent(stream, ws.done, 0));
    if (ws.size < bytes) {
        if (ws.ptr) {
            PF_CUDA_CHECK(cudaFreeAsync(ws.ptr, stream));
            ws.ptr = nullptr;
            ws.size = 0;
        }
        size_t want = bytes + bytes / 8;      /* some headroom against creeping growth */
        want = (want + 0xFFFFF) & ~(size_t)0xFFFFF; /* whole MiB */
        PF_CUDA_CHECK(cudaMallocAsync(&ws.ptr, want, stream));
        ws.size = want;
    }
    lease->ptr = ws.ptr;
    return PF_STATUS_OK;
}

pf_status WorkspaceLease::release(cudaStream_t stream) {
    if (!held) return PF_STATUS_OK;
    DeviceWorkspace &ws = g_ws[device];
    held = false;
    cudaError_t err = cudaEventRecord(ws.done, stream);
    if (err == cudaSuccess) ws.pending = true;
    ws.mu.unlock();
    PF_CUDA_CHECK(err);
    return PF_STATUS_OK;
}

WorkspaceLease::~WorkspaceLease() {
    if (held) {
        /* an error path left early: still order later users after whatever was queued */
        DeviceWorkspace &ws = g_ws[device];
        if (ws.done && cudaEventRecord(ws.done, stream) == cudaSuccess) ws.pending = true;
        held = false;
        ws.mu.unlock();
    }
}

}  // namespace cuda
}  // namespace pf
