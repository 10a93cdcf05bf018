/*
 * flash/fwd_f32.cu - the forward for float32 inputs: a simple, exact-in-float32
 * kernel (CUDA cores, no tensor cores), its launch, and flash_fwd_f32_run (the
 * float32 family of pf_cuda_flash_fwd, flash/fwd_launch.cu). Same semantics as
 * the float16/bfloat16 kernels and the CPU backend, through the same
 * primitives: the mask rule (attn/mask.cuh), the score transform
 * (attn/score.cuh), the row epilogue (attn/softmax.cuh), dropout
 * (flash/dropout.cuh).
 *
 * Layouts: FlashParams (flash/params.h).
 *
 * A block of 8 warps owns 8 consecutive query rows of one (batch, head), one
 * row per warp. Keys go in chunks of 32 through shared memory (K and V
 * [32][kMaxD + 1], the +1 keeps lane-per-key reads conflict free): lane j
 * scores key j0 + j against its warp's query row, the warp takes max and sum
 * with shuffles (online softmax in the log2 domain), and lane c accumulates
 * output columns c, c + 32, ... over the chunk's 32 keys.
 */
#include <atomic>

#include "attn/mask.cuh"
#include "attn/math.cuh"
#include "attn/score.cuh"
#include "attn/softmax.cuh"
#include "common/cuda_util.cuh"
#include "flash/dropout.cuh"
#include "flash/params.h"
#include "flash/run.h"
#include "flash/sequence.cuh"

namespace pf {
namespace cuda {

namespace {

constexpr int kF32Warps = 8;
constexpr int kF32Keys = 32;

PF_DEV float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

PF_DEV float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

template <int kMaxD>
__global__ void __launch_bounds__(kF32Warps * 32) flash_fwd_f32_kernel(const __grid_constant__ FlashParams p) {
    constexpr int kPer = kMaxD / 32;
    constexpr int kKS = kMaxD + 1;
    extern __shared__ __align__(16) unsigned char pf_smem[];
    float *sK = reinterpret_cast<float *>(pf_smem);
    float *sV = sK + kF32Keys * kKS;
    float *sQ = sV + kF32Keys * kKS;

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int b = blockIdx.z, h = blockIdx.y;
    const SeqInfo si = seq_info(p, b);
    const int sq = si.sq, sk = si.sk, d = p.head_dim;
    const FwdBases<float> base = fwd_bases<float>(p, b, h, si);
    const float *qb = base.q, *kb = base.k, *vb = base.v;
    float *ob = base.o;
    float *lseb = base.lse;
    const MaskRule mask = mask_rule(p, sk);
    const int off = sk - sq; /* query row i sits at key position i + off */
    const float alibi_log2 = p.score.alibi_log2(b, h);
    const uint64_t bh = (uint64_t)b * p.num_heads + h;

    for (int tile = blockIdx.x; tile * kF32Warps < sq; tile += gridDim.x) {
        const int m0 = tile * kF32Warps;
        const int rows_valid = imin(kF32Warps, sq - m0);
        const int i = m0 + warp;
        const bool row_ok = warp < rows_valid;
        const int i_last = m0 + rows_valid - 1;
        int j_begin, j_end;
        mask.key_range(m0, i_last, off, &j_begin, &j_end);
        const int lo = mask.lo(i + off), hi = mask.hi(i + off);

        __syncthreads(); /* the previous tile is done with sQ */
        for (int c = lane; c < kMaxD; c += 32)
            sQ[warp * kMaxD + c] = (row_ok && c < d) ? qb[(int64_t)i * p.q_row_stride + c] : 0.0f;

        float m = -INFINITY, l = 0.0f, acc[kPer];
#pragma unroll
        for (int c = 0; c < kPer; ++c) acc[c] = 0.0f;

        for (int j0 = j_begin / kF32Keys * kF32Keys; j0 < j_end; j0 += kF32Keys) {
            __syncthreads(); /* every warp is done with the previous chunk */
            for (int idx = tid; idx < kF32Keys * kMaxD; idx += kF32Warps * 32) {
                const int r = idx / kMaxD, c = idx % kMaxD;
                const bool ok = j0 + r < sk && c < d;
                sK[r * kKS + c] = ok ? kb[(int64_t)(j0 + r) * p.k_row_stride + c] : 0.0f;
                sV[r * kKS + c] = ok ? vb[(int64_t)(j0 + r) * p.v_row_stride + c] : 0.0f;
            }
            __syncthreads();
            if (!row_ok) continue;
            const int j = j0 + lane;
            float s = 0.0f;
#pragma unroll 8
            for (int c = 0; c < kMaxD; ++c) s = fmaf(sQ[warp * kMaxD + c], sK[lane * kKS + c], s);
            float unused_dtanh;
            float x = score_to_log2<true>(p.score, s, alibi_log2, i + off - j, &unused_dtanh);
            if (j >= sk || j < lo || j > hi) x = -INFINITY;
            const float mx = fmaxf(m, warp_max(x));
            if (mx == -INFINITY) continue; /* nothing visible yet */
            const float alpha = exp2f(m - mx);
            float pr = exp2f(x - mx);
            l = l * alpha + warp_sum(pr);
            m = mx;
            if (p.drop_threshold) {
                if (!dropout_keep(p, bh, i, j)) pr = 0.0f;
            }
#pragma unroll
            for (int c = 0; c < kPer; ++c) acc[c] *= alpha;
#pragma unroll 4
            for (int jj = 0; jj < kF32Keys; ++jj) {
                const float pj = __shfl_sync(0xffffffffu, pr, jj);
#pragma unroll
                for (int c = 0; c < kPer; ++c) acc[c] = fmaf(pj, sV[jj * kKS + lane + 32 * c], acc[c]);
            }
        }
        if (!row_ok) continue;
        float lse;
        const float inv = finish_row<true>(m, 1.0f, l, p.drop_scale, &lse); /* m: already log2-domain */
#pragma unroll
        for (int c = 0; c < kPer; ++c) {
            const int col = lane + 32 * c;
            if (col < d) ob[(int64_t)i * p.o_row_stride + col] = acc[c] * inv;
        }
        if (lseb && lane == 0) lseb[(int64_t)i * p.lse_row_stride] = lse;
    }
}

template <int kMaxD>
pf_status launch_f32(const FlashParams &p, cudaStream_t stream, int device) {
    auto kernel = flash_fwd_f32_kernel<kMaxD>;
    constexpr int smem = (2 * kF32Keys * (kMaxD + 1) + kF32Warps * kMaxD) * 4;
    static std::atomic<uint64_t> attr_done{0};
    PF_TRY(set_max_smem(kernel, smem, device, attr_done));
    const int tiles = (p.max_seqlen_q + kF32Warps - 1) / kF32Warps;
    dim3 grid(tiles > 0 ? tiles : 1, p.num_heads, p.batch);
    kernel<<<grid, kF32Warps * 32, smem, stream>>>(p);
    PF_CUDA_CHECK_LAUNCH("flash_fwd_f32_kernel");
    return PF_STATUS_OK;
}

}  // namespace

pf_status flash_fwd_f32_run(const FlashParams &p, cudaStream_t stream, int device) {
    if (p.head_dim <= 64) return launch_f32<64>(p, stream, device);
    if (p.head_dim <= 128) return launch_f32<128>(p, stream, device);
    return launch_f32<256>(p, stream, device);
}

}  // namespace cuda
}  // namespace pf
