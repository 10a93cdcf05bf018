/*
 * flash/dropout_mask.cu - pf_cuda_dropout_mask: the keep mask the forward applies
 * (flash/dropout.cuh), materialized for tests: mask u8 [batch, num_heads,
 * seqlen_q, seqlen_k] (dense layout), keep[b, h, i, j] = philox(j / 4, i,
 * b * num_heads + h, offset; seed)[j % 4] >= threshold (pagedflash_philox.h, the
 * CPU's exact contract). One thread per group of 4 columns, one Philox draw each;
 * runs on params->stream.
 */
#include "common/cuda_util.cuh"
#include "pagedflash_philox.h"
#include "pf_cuda.h"

namespace {

struct MaskParams {
    uint8_t *mask;
    int64_t sb, sh, si; /* element strides of b, h, i (j is contiguous) */
    int64_t heads, sq, sk, groups_per_row, total;
    uint64_t seed, offset;
    uint32_t threshold;
};

__global__ void dropout_mask_kernel(const __grid_constant__ MaskParams p) {
    for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < p.total;
         idx += (int64_t)gridDim.x * blockDim.x) {
        const int64_t grp = idx % p.groups_per_row;
        const int64_t row = idx / p.groups_per_row; /* (b * heads + h) * sq + i */
        const int64_t i = row % p.sq, bh = row / p.sq;
        const int64_t b = bh / p.heads, h = bh % p.heads;
        const pf_u32x4 r = pf_dropout_bits4(p.seed, p.offset, (uint64_t)bh, i, grp * 4);
        const uint32_t w[4] = {r.x, r.y, r.z, r.w};
        uint8_t *dst = p.mask + b * p.sb + h * p.sh + i * p.si + grp * 4;
#pragma unroll
        for (int x = 0; x < 4; ++x)
            if (grp * 4 + x < p.sk) dst[x] = w[x] >= p.threshold ? 1 : 0;
    }
}

}  // namespace

extern "C" pf_status pf_cuda_dropout_mask(const pf_attn_params *a, pf_tensor mask) {
    /* packed layouts are refused by the core (limits.dropout_mask_varlen = 0) */
    MaskParams p;
    p.mask = (uint8_t *)mask.data;
    p.sb = mask.strides[0];
    p.sh = mask.strides[1];
    p.si = mask.strides[2];
    p.heads = a->q.shape[2];
    p.sq = a->q.shape[1];
    p.sk = a->k.shape[1];
    p.groups_per_row = (p.sk + 3) / 4;
    p.total = a->q.shape[0] * p.heads * p.sq * p.groups_per_row;
    p.seed = a->seed;
    p.offset = a->offset;
    p.threshold = pf_dropout_threshold(a->dropout_p);
    if (p.total == 0) return PF_STATUS_OK;
    pf_cuda_device_guard guard;
    PF_TRY(guard.set(a->q.device_id));
    int sms = 0;
    PF_TRY(pf::cuda::sm_count(a->q.device_id, &sms));
    int64_t blocks = (p.total + 255) / 256;
    if (blocks > (int64_t)sms * 16) blocks = (int64_t)sms * 16;
    dropout_mask_kernel<<<(unsigned)blocks, 256, 0, (cudaStream_t)a->stream>>>(p);
    PF_CUDA_CHECK_LAUNCH("dropout_mask_kernel");
    return PF_STATUS_OK;
}
