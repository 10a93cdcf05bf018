/*
 * flash/fwd_launch.cu - pf_cuda_flash_fwd, the CUDA forward's entry (pf_cuda.h):
 * FlashParams from the validated pf_attn_params (flash/params.cu), the kernel
 * family of the call (choose_fwd_family: the one place that picks sm_80, sm_90
 * or float32 kernels, from the kernel hint), then the family's run function for
 * the compiled head dim (flash/run.h; head dims between compiled ones run
 * zero-padded on the next larger one). Launches on params->stream; allocates
 * nothing, synchronizes nothing.
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/cuda_util.cuh"
#include "flash/fwd_tiles.h"
#include "flash/params.h"
#include "flash/run.h"
#include "inst/hdims.h"
#include "pf_cuda.h"
#include "pf_error.h"

namespace pf {
namespace cuda {

/* Why the wgmma forward cannot run this call, or NULL when it can. */
static const char *fwd_sm90_refusal(const FlashParams &p, int head_dim_compiled, int device) {
    if (!sm90_available(device))
        return "the wgmma kernels need a compute capability 9.x device and a build for sm_90 (PAGEDFLASH_CUDA_ARCHS)";
    if (!fwd_sm90_has_tile(head_dim_compiled))
        return "the wgmma kernels have head dims 64 and 128 (smaller head dims run padded to them)";
    if (!p.aligned)
        return "the wgmma kernels need 16-byte vector access to q, k, v and out (base addresses and strides "
               "multiples of 8 elements, head_dim a multiple of 8)";
    return nullptr;
}

/*
 * The forward's kernel family, from the kernel hint a->kernel (pagedflash.h):
 *   float32           the CUDA-core kernel (flash/fwd_f32.cu); any hint but "auto" is
 *                     PF_STATUS_NOT_SUPPORTED (float32 has one CUDA kernel)
 *   "sm80"            the mma.sync kernel (flash/fwd_sm80.cuh), on every sm_80+ GPU
 *   "sm90"            the wgmma kernel (flash/fwd_sm90.cuh), or PF_STATUS_NOT_SUPPORTED
 *                     naming why it cannot run the call (fwd_sm90_refusal)
 *   "auto"            the wgmma kernel where it can run the call and is the faster one,
 *                     else the mma.sync kernel. Faster: everywhere it runs but at head dim 64
 *                     with softcap or ALiBi and no dropout, where the sm_80 kernel was as fast
 *                     or faster (H200, bf16, 16k tokens, s=2k: softcap 196 vs 174 TFLOP/s,
 *                     ALiBi 269 vs 263; d=128 and dropout gain 1.06-1.39x on sm_90;
 *                     benchmarks/results/fwd_extras_h200.md, benchmarks/lab/07).
 */
static pf_status choose_fwd_family(const pf_attn_params *a, const FlashParams &p, int device, FlashFamily *family) {
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
    const char *sm90_refusal = fwd_sm90_refusal(p, hd, device);
    switch (a->kernel) {
        case PF_KERNEL_FLASH_SM80: *family = FlashFamily::kSm80; return PF_STATUS_OK;
        case PF_KERNEL_FLASH_SM90:
            PF_CHECK(!sm90_refusal, PF_STATUS_NOT_SUPPORTED,
                     "kernel: 'sm90' cannot run this forward (head_dim %d, device %d): %s", p.head_dim, device,
                     sm90_refusal);
            *family = FlashFamily::kSm90;
            return PF_STATUS_OK;
        case PF_KERNEL_AUTO: {
            const bool sm80_faster = hd == 64 && p.score.has_extras() && !p.drop_threshold;
            *family = !sm90_refusal && !sm80_faster ? FlashFamily::kSm90 : FlashFamily::kSm80;
            return PF_STATUS_OK;
        }
        default: break;
    }
    PF_CHECK(0, PF_STATUS_INVALID_VALUE, "kernel: %d is not a flash_fwd kernel; expected 'auto', 'sm80' or 'sm90'",
             (int)a->kernel);
}

template <typename T>
static pf_status run_fwd(FlashFamily family, const FlashParams &p, cudaStream_t stream, int device) {
#define PF_FWD_SM80(N) flash_fwd_sm80_run<T, N>(p, stream, device)
#define PF_FWD_SM90(N) flash_fwd_sm90_run<T, N>(p, stream, device)
    if (family == FlashFamily::kSm90)
        PF_HDIM_SWITCH(p.head_dim, PF_FWD_SM90);
    else
        PF_HDIM_SWITCH(p.head_dim, PF_FWD_SM80);
#undef PF_FWD_SM80
#undef PF_FWD_SM90
    PF_CHECK(0, PF_STATUS_NOT_SUPPORTED,
             "q: head_dim %d has no CUDA kernel in this build (PAGEDFLASH_HEADDIMS trimmed the set)", p.head_dim);
}

/* paged_attn's prefill path (flash/run.h) */
const char *flash_fwd_paged_refusal(const FlashParams &p, pf_dtype dtype, int device) {
    if (dtype != PF_DTYPE_F16 && dtype != PF_DTYPE_BF16) return "the wgmma kernels take float16 or bfloat16";
    const int hd = compiled_head_dim(p.head_dim);
    if (hd == 0) return "this build has no CUDA kernel for the head dim (PAGEDFLASH_HEADDIMS trimmed the set)";
    return fwd_sm90_refusal(p, hd, device);
}

pf_status flash_fwd_paged(const FlashParams &p, pf_dtype dtype, cudaStream_t stream, int device) {
    const char *why = flash_fwd_paged_refusal(p, dtype, device);
    PF_CHECK(!why && p.block_table, PF_STATUS_NOT_SUPPORTED, "kernel: 'sm90' cannot run this paged_attn: %s",
             why ? why : "no block table");
    if (p.batch == 0 || p.max_seqlen_q == 0) return PF_STATUS_OK;
    return dtype == PF_DTYPE_F16 ? run_fwd<__half>(FlashFamily::kSm90, p, stream, device)
                                 : run_fwd<__nv_bfloat16>(FlashFamily::kSm90, p, stream, device);
}

}  // namespace cuda
}  // namespace pf

extern "C" pf_status pf_cuda_flash_fwd(const pf_attn_params *a) {
    using namespace pf::cuda;
    FlashParams p;
    PF_TRY(fill_flash_params(a, &p, false));
    if (p.batch == 0 || p.max_seqlen_q == 0) return PF_STATUS_OK; /* no query rows */
    const int device = a->q.device_id;
    pf_cuda_device_guard guard;
    PF_TRY(guard.set(device));
    cudaStream_t stream = (cudaStream_t)a->stream;
    FlashFamily family;
    PF_TRY(choose_fwd_family(a, p, device, &family));
    switch (a->q.dtype) {
        case PF_DTYPE_F16: return run_fwd<__half>(family, p, stream, device);
        case PF_DTYPE_BF16: return run_fwd<__nv_bfloat16>(family, p, stream, device);
        case PF_DTYPE_F32: return flash_fwd_f32_run(p, stream, device);
        default: break;
    }
    PF_CHECK(0, PF_STATUS_INVALID_TYPE, "q: dtype %s is not supported on CUDA", pf_dtype_name(a->q.dtype));
}
