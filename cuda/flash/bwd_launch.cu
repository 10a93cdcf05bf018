/*
 * flash/bwd_launch.cu - pf_cuda_flash_bwd, the CUDA backward's entry (pf_cuda.h):
 * FlashParams from the validated pf_attn_params (flash/params.cu, with the
 * backward tensors), the kernel family of the call (choose_bwd_family: the one
 * place that picks sm_80, sm_90 or float32 kernels, from the kernel hint), the
 * workspace (D, lse2 and dq_accum from the cached scratch pool,
 * flash/bwd_workspace.h; held by a pf_cuda_scratch_lease, so it is released on
 * every path, as a CUDA graph capture needs), then the family's run function for
 * the compiled head dim (flash/run.h). Everything runs on params->stream; nothing
 * synchronizes.
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/cuda_util.cuh"
#include "flash/bwd_tiles.h"
#include "flash/bwd_workspace.h"
#include "flash/params.h"
#include "flash/run.h"
#include "flash/sequence.cuh"
#include "inst/hdims.h"
#include "pf_cuda.h"
#include "pf_error.h"

namespace pf {
namespace cuda {

/* Why the wgmma backward cannot run this call, or NULL when it can. */
static const char *bwd_sm90_refusal(const FlashParams &p, int head_dim_compiled, int device) {
    if (!sm90_available(device))
        return "the wgmma kernels need a compute capability 9.x device and a build for sm_90 (PAGEDFLASH_CUDA_ARCHS)";
    if (!bwd_sm90_has_tile(head_dim_compiled))
        return "the wgmma kernels have head dims 64 and 128 (smaller head dims run padded to them)";
    if (!p.aligned)
        return "the wgmma kernels need 16-byte vector access to q, k, v, out, dout, dq, dk and dv (base addresses "
               "and strides multiples of 8 elements, head_dim a multiple of 8)";
    if (p.score.has_extras() || p.drop_threshold != 0)
        return "the wgmma backward has no softcap, ALiBi, dropout or non-positive softmax_scale";
    if (p.deterministic) return "the wgmma backward adds dQ with atomics; deterministic gradients run on 'sm80'";
    if (flat_rows(p) * p.num_heads * (head_dim_compiled / 8) >= INT32_MAX / 2)
        return "its vectorized passes index the (query row, head, 8 columns) chunks in int32: 2^30 at most";
    return nullptr;
}

/*
 * The backward's kernel family, from the kernel hint a->kernel (pagedflash.h):
 *   float32           the CUDA-core kernels (flash/bwd_f32.cu); any hint but "auto" is
 *                     PF_STATUS_NOT_SUPPORTED (float32 has one CUDA kernel)
 *   "sm80"            the mma.sync kernels (flash/bwd_sm80.cuh, flash/bwd_dq.cuh), on every
 *                     sm_80+ GPU, every option, deterministic or not
 *   "sm90"            the wgmma main kernel with its vectorized passes (flash/bwd_sm90.cuh),
 *                     or PF_STATUS_NOT_SUPPORTED naming why it cannot run the call
 *                     (bwd_sm90_refusal)
 *   "auto"            the wgmma kernel wherever it can run the call -- 1.30-1.57x the sm_80
 *                     backward there (H200, benchmarks/results/bwd_sm90_h200.md) -- else the
 *                     mma.sync kernels.
 */
static pf_status choose_bwd_family(const pf_attn_params *a, const FlashParams &p, int device, FlashFamily *family) {
    const char *hint = pf_kernel_name(a->kernel);
    if (a->q.dtype == PF_DTYPE_F32) {
        PF_CHECK(a->kernel == PF_KERNEL_AUTO, PF_STATUS_NOT_SUPPORTED,
                 "kernel: '%s' runs float16/bfloat16; float32 has one CUDA kernel (kernel='auto')", hint ? hint : "?");
        *family = FlashFamily::kF32;
        return PF_STATUS_OK;
    }
    const int hd = compiled_head_dim(p.head_dim);
    PF_CHECK(hd > 0, PF_STATUS_NOT_SUPPORTED,
             "q: head_dim %d has no CUDA kernel in this build (PAGEDFLASH_HEADDIMS trimmed the set)", p.head_dim);
    const char *sm90_refusal = bwd_sm90_refusal(p, hd, device);
    switch (a->kernel) {
        case PF_KERNEL_FLASH_SM80: *family = FlashFamily::kSm80; return PF_STATUS_OK;
        case PF_KERNEL_FLASH_SM90:
            PF_CHECK(!sm90_refusal, PF_STATUS_NOT_SUPPORTED,
                     "kernel: 'sm90' cannot run this backward (head_dim %d, device %d): %s", p.head_dim, device,
                     sm90_refusal);
            *family = FlashFamily::kSm90;
            return PF_STATUS_OK;
        case PF_KERNEL_AUTO: *family = sm90_refusal ? FlashFamily::kSm80 : FlashFamily::kSm90; return PF_STATUS_OK;
        default: break;
    }
    PF_CHECK(0, PF_STATUS_INVALID_VALUE, "kernel: %d is not a flash_bwd kernel; expected 'auto', 'sm80' or 'sm90'",
             (int)a->kernel);
}

template <typename T>
static pf_status run_bwd(FlashFamily family, const FlashParams &p, cudaStream_t stream, int device) {
#define PF_BWD_SM80(N) flash_bwd_sm80_run<T, N>(p, stream, device)
#define PF_BWD_SM90(N) flash_bwd_sm90_run<T, N>(p, stream, device)
    if (family == FlashFamily::kSm90)
        PF_HDIM_SWITCH(p.head_dim, PF_BWD_SM90);
    else
        PF_HDIM_SWITCH(p.head_dim, PF_BWD_SM80);
#undef PF_BWD_SM80
#undef PF_BWD_SM90
    PF_CHECK(0, PF_STATUS_NOT_SUPPORTED,
             "q: head_dim %d has no CUDA kernel in this build (PAGEDFLASH_HEADDIMS trimmed the set)", p.head_dim);
}

static pf_status run_bwd_family(FlashFamily family, pf_dtype dtype, const FlashParams &p, cudaStream_t stream,
                                int device) {
    switch (dtype) {
        case PF_DTYPE_F16: return run_bwd<__half>(family, p, stream, device);
        case PF_DTYPE_BF16: return run_bwd<__nv_bfloat16>(family, p, stream, device);
        case PF_DTYPE_F32: return flash_bwd_f32_run(p, stream, device);
        default: break;
    }
    PF_CHECK(0, PF_STATUS_INVALID_TYPE, "q: dtype %s is not supported on CUDA", pf_dtype_name(dtype));
}

}  // namespace cuda
}  // namespace pf

extern "C" pf_status pf_cuda_flash_bwd(const pf_attn_params *a) {
    using namespace pf::cuda;
    FlashParams p;
    PF_TRY(fill_flash_params(a, &p, true));
    if (p.batch == 0 || p.num_heads == 0) return PF_STATUS_OK;
    if (p.max_seqlen_q == 0 && p.max_seqlen_k == 0) return PF_STATUS_OK;
    const int device = a->q.device_id;
    pf_cuda_device_guard guard;
    PF_TRY(guard.set(device));
    cudaStream_t stream = (cudaStream_t)a->stream;
    FlashFamily family;
    PF_TRY(choose_bwd_family(a, p, device, &family));

    /* workspace: D and lse2 for every family; dq_accum where the main kernel adds dQ
     * with atomics (not deterministic, not float32) */
    const int64_t rows = flat_rows(p);
    p.head_dim_rounded = family == FlashFamily::kF32 ? p.head_dim : compiled_head_dim(p.head_dim);
    const size_t dsum_bytes = bwd_dsum_bytes(rows, p.num_heads);
    const bool dq_atomic = family != FlashFamily::kF32 && !p.deterministic;
    const size_t dq_bytes = dq_atomic ? bwd_dq_accum_bytes(rows, p.num_heads, p.head_dim_rounded) : 0;
    pf_cuda_scratch_lease scratch(stream);
    PF_TRY(scratch.acquire(dsum_bytes + dq_bytes));
    p.dsum = static_cast<float *>(scratch.ptr());
    p.dq_accum = dq_atomic ? reinterpret_cast<float *>(static_cast<char *>(scratch.ptr()) + dsum_bytes) : nullptr;

    PF_TRY(run_bwd_family(family, a->q.dtype, p, stream, device));
    return scratch.release();
}
