/*
 * flash/run.h - the run functions of the flash kernel families, what the
 * launchers (flash/fwd_launch.cu, flash/bwd_launch.cu) call once they have
 * picked a family for the call:
 *
 *   sm80  mma.sync kernels, float16 / bfloat16, every head dim, any alignment
 *   sm90  wgmma kernels (Hopper, sm_90a), float16 / bfloat16, head dims 64 / 128,
 *         16-byte aligned tensors (backward: no softcap / ALiBi / dropout, not
 *         deterministic)
 *   f32   CUDA-core kernels for float32 inputs
 *
 * The sm80 / sm90 templates exist per (element type, compiled head dim): their
 * bodies are in flash/fwd_run.cuh and flash/bwd_run.cuh, instantiated in
 * cuda/inst/ (cuda/generate.py); the launcher picks kHeadDim with
 * PF_HDIM_SWITCH (inst/hdims.h), head dims between compiled ones run zero-padded.
 * A run function only launches: the launcher chose it, and for the backward set up
 * the workspace (FlashParams::dsum, dq_accum, head_dim_rounded).
 */
#ifndef PF_FLASH_RUN_H
#define PF_FLASH_RUN_H

#include <cuda_runtime.h>

#include "flash/params.h"
#include "inst/hdims.h"

namespace pf {
namespace cuda {

/* The kernel family that runs a call (the launchers' choice). */
enum class FlashFamily { kSm80, kSm90, kF32 };

/* The compiled head dim that head dim d runs on (the smallest >= d), 0 when none. */
inline int compiled_head_dim(int d) {
#define PF_HDIM_ITSELF(N) N
    PF_HDIM_SWITCH(d, PF_HDIM_ITSELF);
#undef PF_HDIM_ITSELF
    return 0;
}

template <typename T, int kHeadDim>
pf_status flash_fwd_sm80_run(const FlashParams &p, cudaStream_t stream, int device);
template <typename T, int kHeadDim>
pf_status flash_fwd_sm90_run(const FlashParams &p, cudaStream_t stream, int device);
pf_status flash_fwd_f32_run(const FlashParams &p, cudaStream_t stream, int device);

/* paged_attn's prefill path (cuda/paged/launch.cu): the sm_90 forward over paged K/V
 * (p.block_table set, flash/paged_kv.cuh). The refusal says why it cannot take the call
 * (NULL: it can): dtype, head dim, device or alignment, as for kernel="sm90". */
const char *flash_fwd_paged_refusal(const FlashParams &p, pf_dtype dtype, int device);
pf_status flash_fwd_paged(const FlashParams &p, pf_dtype dtype, cudaStream_t stream, int device);

template <typename T, int kHeadDim>
pf_status flash_bwd_sm80_run(const FlashParams &p, cudaStream_t stream, int device);
template <typename T, int kHeadDim>
pf_status flash_bwd_sm90_run(const FlashParams &p, cudaStream_t stream, int device);
pf_status flash_bwd_f32_run(const FlashParams &p, cudaStream_t stream, int device);

}  // namespace cuda
}  // namespace pf

#endif /* PF_FLASH_RUN_H */
