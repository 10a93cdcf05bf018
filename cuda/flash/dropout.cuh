/*
 * flash/dropout.cuh - the dropout keep test of the flash kernels: entry (i, j) of
 * query head h in sequence b is kept iff
 *   philox4x32_10(counter = (j / 4, i, b * num_heads + h, offset), key = seed)[j % 4]
 *     >= drop_threshold
 * (pagedflash_philox.h: the CPU backend's exact mask, so the backward regenerates
 * the forward's mask and tests can compare with pf_dropout_mask). One Philox draw
 * gives the words of 4 adjacent columns.
 *
 *   dropout_fragment  one m16 slice of P in the mma C-fragment layout (forward,
 *                     sm_80 and sm_90): dropped entries become 0; lanes t and t ^ 1
 *                     hold the two halves of one 4-column group, so each lane draws
 *                     one group per n8 tile and row
 *   dropout_keep      one entry (backward, float32 kernels)
 */
#ifndef PF_FLASH_DROPOUT_CUH
#define PF_FLASH_DROPOUT_CUH

#include "attn/math.cuh"
#include "flash/params.h"
#include "pagedflash_philox.h"

namespace pf {
namespace cuda {

/* s[nt][e] = (row i0 + 8 * (e / 2), column j0 + 8 * nt + 2 * t + e % 2); bh = b * num_heads + h */
template <int kNT>
PF_DEV void dropout_fragment(float (&s)[kNT][4], const FlashParams &p, uint64_t bh, int i0, int j0, int t) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        const int i = i0 + 8 * hf;
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
            const int jg = j0 + nt * 8 + 4 * (t >> 1);
            const pf_u32x4 r = pf_dropout_bits4(p.seed, p.offset, bh, i, jg);
            const uint32_t w0 = (t & 1) ? r.z : r.x, w1 = (t & 1) ? r.w : r.y;
            if (w0 < p.drop_threshold) s[nt][2 * hf] = 0.0f;
            if (w1 < p.drop_threshold) s[nt][2 * hf + 1] = 0.0f;
        }
    }
}

PF_DEV bool dropout_keep(const FlashParams &p, uint64_t bh, int i, int j) {
    const pf_u32x4 r = pf_dropout_bits4(p.seed, p.offset, bh, i, j & ~3);
    const uint32_t w = (j & 2) ? ((j & 1) ? r.w : r.z) : ((j & 1) ? r.y : r.x);
    return w >= p.drop_threshold;
}

}  // namespace cuda
}  // namespace pf

#endif /* PF_FLASH_DROPOUT_CUH */
