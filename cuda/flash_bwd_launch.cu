/*
 * flash_bwd_launch.cu - pf_cuda_flash_bwd: FlashParams from a validated
 * pf_attn_params (fill_flash_params with the backward tensors), then the
 * kernels by dtype and head dim (flash_bwd.cuh, instantiated per head dim in
 * cuda/inst/; float32 in flash_bwd_f32.cu).
 *
 * Device memory: only the cached scratch pool (cuda_util.cuh); nothing synchronizes;
 * every launch is checked; everything runs on params->stream.
 */
#include "attn/mask.cuh"
#include "attn/mma.cuh"
#include "common/cuda_util.cuh"
#include "inst/hdims.h"
#include "flash_params.h"
#include "pf_cuda.h"

namespace pf {
namespace cuda {

template <typename T>
static pf_status bwd_dispatch(const FlashParams &p, cudaStream_t stream, int device) {
#define PF_BWD_RUN(N) flash_bwd_run<T, N>(p, stream, device)
    PF_HDIM_SWITCH(p.head_dim, PF_BWD_RUN);
#undef PF_BWD_RUN
    PF_CHECK(0, PF_STATUS_NOT_SUPPORTED,
             "q: head_dim %d has no CUDA kernel in this build (PAGEDFLASH_HEADDIMS trimmed the set)", p.head_dim);
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
    switch (a->q.dtype) {
        case PF_DTYPE_F16: return bwd_dispatch<__half>(p, stream, device);
        case PF_DTYPE_BF16: return bwd_dispatch<__nv_bfloat16>(p, stream, device);
        case PF_DTYPE_F32: return flash_bwd_run_f32(p, stream, device);
        default: break;
    }
    PF_CHECK(0, PF_STATUS_INVALID_TYPE, "q: dtype %s is not supported on CUDA", pf_dtype_name(a->q.dtype));
}
