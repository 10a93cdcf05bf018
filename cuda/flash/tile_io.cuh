/*
 * flash/tile_io.cuh - moving tiles of the sm_80 flash kernels between global
 * and shared memory (cp.async, attn/mma.cuh), and the stores that need no
 * shared memory:
 *
 *   load_tile        rows of a global [rows, head_dim] tile -> shared memory
 *                    [R][kStride] (rows padded to kHeadDim + 8 elements: the
 *                    16-byte skew makes every ldmatrix and every cp.async row
 *                    phase bank-conflict free); rows and columns past the data
 *                    are zero-filled; 16-byte cp.async when every tensor is
 *                    aligned (FlashParams::aligned), element copies otherwise
 *   store_tile       the reverse, 16-byte stores of the valid part
 *   fwd_write_empty  the rows of a forward tile that sees no key: out = 0,
 *                    lse = -inf (sm_80 and sm_90 forward)
 *   bwd_stage_rows   a backward query tile's per-row lse and D into shared
 *                    memory with 4-byte cp.async (sm_80 and sm_90 backward)
 */
#ifndef PF_FLASH_TILE_IO_CUH
#define PF_FLASH_TILE_IO_CUH

#include "attn/mma.cuh"
#include "flash/params.h"

namespace pf {
namespace cuda {

/* rows [0, R) of a tile (row r at g + r * row_stride) -> smem [R][kStride];
 * rows >= rows_valid and columns >= d become zeros. Thread tid copies 16-byte
 * chunk tid % C of rows tid / C, tid / C + kRowStep, ... (C chunks per row), so
 * one running pointer per thread serves the whole tile. */
template <int R, int kHeadDim, int kStride, int kNThreads, typename T>
PF_DEV void load_tile(T *smem, const T *g, int64_t row_stride, int rows_valid, int d, bool aligned, int tid) {
    constexpr int C = kHeadDim / 8;
    constexpr int kRowStep = kNThreads / C;
    constexpr int kIters = (R + kRowStep - 1) / kRowStep;
    constexpr bool kExact = kNThreads % C == 0 && R % kRowStep == 0;
    static_assert(kRowStep >= 1, "a row's chunks fit in one pass of the block");
    if (!kExact && tid >= kRowStep * C) return;
    const int r0 = tid / C, c = tid % C;
    const bool col_ok = c * 8 < d;
    if (aligned) {
        const T *src = g + r0 * row_stride + c * 8;
        uint32_t dst = smem_addr(smem + r0 * kStride + c * 8);
        const int64_t step = kRowStep * row_stride;
#pragma unroll
        for (int it = 0; it < kIters; ++it) {
            const int r = r0 + it * kRowStep;
            if (kExact || r < R) {
                const bool ok = col_ok && r < rows_valid;
                cp_async_16(dst, ok ? src : g, ok);
            }
            src += step;
            dst += kRowStep * kStride * 2;
        }
    } else {
        const uint16_t *gs = reinterpret_cast<const uint16_t *>(g);
#pragma unroll 1
        for (int it = 0; it < kIters; ++it) {
            const int r = r0 + it * kRowStep;
            if (!kExact && r >= R) break;
            uint16_t e[8];
#pragma unroll
            for (int x = 0; x < 8; ++x) {
                const int col = c * 8 + x;
                e[x] = (r < rows_valid && col < d) ? gs[r * row_stride + col] : (uint16_t)0;
            }
            uint4 v;
            v.x = e[0] | ((uint32_t)e[1] << 16);
            v.y = e[2] | ((uint32_t)e[3] << 16);
            v.z = e[4] | ((uint32_t)e[5] << 16);
            v.w = e[6] | ((uint32_t)e[7] << 16);
            *reinterpret_cast<uint4 *>(smem + r * kStride + c * 8) = v;
        }
    }
}

/* smem [R][kStride] -> rows [0, rows_valid), columns [0, d) of a global tile. */
template <int R, int kHeadDim, int kStride, int kNThreads, typename T>
PF_DEV void store_tile(T *g, int64_t row_stride, const T *smem, int rows_valid, int d, bool aligned, int tid) {
    constexpr int C = kHeadDim / 8;
    constexpr int kIters = (R * C + kNThreads - 1) / kNThreads;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
        const int idx = tid + it * kNThreads;
        if ((R * C) % kNThreads != 0 && idx >= R * C) break;
        const int r = idx / C, c = idx % C;
        if (r >= rows_valid || c * 8 >= d) continue;
        const uint4 v = *reinterpret_cast<const uint4 *>(smem + r * kStride + c * 8);
        if (aligned) {
            *reinterpret_cast<uint4 *>(g + r * row_stride + c * 8) = v;
        } else {
            uint16_t *gs = reinterpret_cast<uint16_t *>(g) + r * row_stride;
            const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int x = 0; x < 8; ++x)
                if (c * 8 + x < d) gs[c * 8 + x] = (uint16_t)(w[x / 2] >> (16 * (x % 2)));
        }
    }
}

/* Rows of a tile that sees no key: out = 0, lse = -inf. */
template <int kHeadDim, int kNThreads, typename T>
PF_DEV void fwd_write_empty(const FlashParams &p, T *ob, float *lseb, int m0, int rows_valid, int d, int tid) {
    constexpr int C = kHeadDim / 8;
    for (int idx = tid; idx < rows_valid * C; idx += kNThreads) {
        const int r = idx / C, c = idx % C;
        uint16_t *gs = reinterpret_cast<uint16_t *>(ob + (int64_t)(m0 + r) * p.o_row_stride);
        for (int x = c * 8; x < c * 8 + 8 && x < d; ++x) gs[x] = 0;
    }
    if (lseb)
        for (int r = tid; r < rows_valid; r += kNThreads) lseb[(int64_t)(m0 + r) * p.lse_row_stride] = -INFINITY;
}

/* Stage a query tile's per-row lse (row r at lse0 + r * lse_stride) and, with with_d, its
 * D (row r at d0 + r) into shared memory with cp.async: threads [0, kBlockM) copy the lse,
 * threads [kBlockM, 2 kBlockM) the D. Rows past rows_valid land as zeros (row 0's address
 * is passed but not read). */
template <int kBlockM>
PF_DEV void bwd_stage_rows(float *sLse, float *sD, const float *lse0, int64_t lse_stride, const float *d0,
                           int rows_valid, int tid, bool with_d) {
    if (tid < kBlockM) {
        const bool ok = tid < rows_valid;
        cp_async_4(smem_addr(sLse + tid), lse0 + (ok ? tid : 0) * lse_stride, ok);
    } else if (with_d && tid < 2 * kBlockM) {
        const int r = tid - kBlockM;
        const bool ok = r < rows_valid;
        cp_async_4(smem_addr(sD + r), d0 + (ok ? r : 0), ok);
    }
}

}  // namespace cuda
}  // namespace pf

#endif /* PF_FLASH_TILE_IO_CUH */
