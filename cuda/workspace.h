/*
 * workspace.h - the cached device scratch space of the CUDA kernels (the
 * backward's float32 dQ accumulator and dO.O row sums): one grow-only buffer
 * per device, so that no call allocates device memory once the buffer is large
 * enough.
 *
 * Stream rule. A call holds the device's buffer from acquire to release (a
 * mutex: only one host thread enqueues work on it at a time; the lock spans the
 * enqueueing of that call's kernels, never their execution). Acquire makes the
 * call's stream wait (cudaStreamWaitEvent, no host synchronization) for the
 * event recorded at the previous release, on whatever stream that call ran;
 * release records the event on this call's stream. So calls on different
 * streams never use the buffer at the same time, and calls on one stream run
 * back to back as usual. Growing frees the old buffer with cudaFreeAsync on the
 * acquiring stream (after that wait) and allocates with cudaMallocAsync there.
 */
#ifndef PF_WORKSPACE_H
#define PF_WORKSPACE_H

#include <cuda_runtime.h>
#include <stddef.h>

#include "pagedflash.h"

namespace pf {
namespace cuda {

struct WorkspaceLease {
    int device = -1;
    void *ptr = nullptr;
    bool held = false;
    cudaStream_t stream = nullptr; /* the acquiring call's stream */
    /* records the release event on `stream` and unlocks (safe to call twice) */
    pf_status release(cudaStream_t stream);
    ~WorkspaceLease();
};

/* Lock device `device`'s buffer for this call and make it at least `bytes`. */
pf_status workspace_acquire(int device, size_t bytes, cudaStream_t stream, WorkspaceLease *lease);

}  // namespace cuda
}  // namespace pf

#endif /* PF_WORKSPACE_H */
