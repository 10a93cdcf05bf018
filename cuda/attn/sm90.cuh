/*
 * attn/sm90.cuh - Hopper (sm_90a) building blocks for the wgmma kernels: the
 * 128-byte-swizzled shared-memory tile layout, its matrix descriptors, the
 * wgmma.mma_async wrappers (generated: attn/sm90_wgmma.inc), the warpgroup fences,
 * and a cp.async tile loader writing that layout.
 *
 * Compiled for every arch; the device code is only meaningful where
 * PF_SM90_DEVICE is defined (the sm_90a pass: __CUDA_ARCH_FEAT_SM90_ALL).
 * Kernels using it wrap their body in #ifdef PF_SM90_DEVICE and the host picks
 * them only on a compute capability 9.0 device (sm90_available()).
 *
 * Tile layout ("swizzled tile", R rows x D columns of a 16-bit type, R % 8 == 0,
 * D % 64 == 0, base 1024-byte aligned): D / 64 panels one after the other;
 * panel p holds columns [64p, 64p + 64) of all R rows, 128 bytes per row, and
 * the 16-byte chunk c (columns 8c..8c+7 of the panel) of row r sits at chunk
 * position c ^ (r % 8). This is the hardware's 128-byte swizzle
 * (address bits [4,7) ^= bits [7,10)), so every cp.async row phase and every
 * wgmma read is free of bank conflicts.
 *
 * Matrix descriptors (PTX ISA, "Matrix Descriptor Format"): start address,
 * leading byte offset (LBO) and stride byte offset (SBO) in 16-byte units,
 * swizzle mode 1 (128 B) in bits 62-63.
 *   K-major operand (the reduction dim runs along the columns; Q and K in
 *   S = Q K^T): one wgmma k16 step reads 32 bytes of each row, so a step kk
 *   starts at panel kk / 4, byte 32 * (kk % 4); SBO = 1024 (the next 8 rows),
 *   LBO unused.
 *   MN-major operand (the reduction dim runs along the rows; V in O = P V):
 *   a k16 step is 16 rows (2048 bytes further); SBO = 1024 (the next 8 rows
 *   of the reduction dim), LBO = R * 128 (the next 64-column panel).
 *
 * wgmma accumulator layout for m64nN (float32, N / 2 per thread): warp w of the
 * warpgroup owns rows 16w..16w+15 and d[4j + 2h + e] = (row 16w + g + 8h,
 * column 8j + 2t + e) with lane = 4g + t, exactly the mma.sync m16n8 C fragment
 * repeated over N / 8 column tiles; an A operand in registers (m64k16) is the
 * mma.sync m16n8k16 A fragment of the warp's 16 rows. So two adjacent column
 * tiles of S, packed to 16 bits, are the A operand of P V (as on sm_80).
 */
#ifndef PF_SM90_CUH
#define PF_SM90_CUH

#include "attn/mma.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define PF_SM90_DEVICE 1
#endif

namespace pf {
namespace cuda {
namespace sm90 {

/* Byte offset of (row r, column c) in a swizzled tile of R rows; c % 8 == 0. */
template <int R>
PF_DEV uint32_t swz(int r, int c) {
    return (uint32_t)((c >> 6) * (R * 128) + r * 128 + ((((c >> 3) & 7) ^ (r & 7)) << 4));
}

PF_DEV uint64_t make_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)((lbo & 0x3FFFF) >> 4) << 16) |
           ((uint64_t)((sbo & 0x3FFFF) >> 4) << 32) | ((uint64_t)1 << 62);
}

/* k16 step kk of a K-major operand: rows [row0, row0 + extent) of a swizzled
 * tile of R rows at shared address `tile` (row0 % 8 == 0). */
template <int R>
PF_DEV uint64_t desc_kmajor(uint32_t tile, int row0, int kk) {
    return make_desc(tile + (kk >> 2) * (R * 128) + row0 * 128 + (kk & 3) * 32, 16, 1024);
}

/* k16 step kk of an MN-major operand (reduction along rows): rows
 * [16kk, 16kk + 16), columns [col0, col0 + N) with col0 % 64 == 0. */
template <int R>
PF_DEV uint64_t desc_mnmajor(uint32_t tile, int col0, int kk) {
    return make_desc(tile + (col0 >> 6) * (R * 128) + kk * 2048, R * 128, 1024);
}

template <int N, typename T, int kTransA, int kTransB>
struct WgmmaSS;
template <int N, typename T, int kTransB>
struct WgmmaRS;
#include "attn/sm90_wgmma.inc"

PF_DEV void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
PF_DEV void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
PF_DEV void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
/* Generic-proxy shared-memory writes (cp.async, st.shared) made visible to the
 * async proxy (wgmma operand reads): each writer, before the barrier. */
PF_DEV void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

/* Pin accumulator registers at this point of the program (after a wait, before
 * they are read; after they are written, before a wgmma reads them). */
template <int N>
PF_DEV void fence_regs(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
template <int N, int M>
PF_DEV void fence_regs(uint32_t (&d)[N][M]) {
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
        for (int j = 0; j < M; ++j) asm volatile("" : "+r"(d[i][j])::"memory");
}

/* D (+)= A B^T over K = 16 * kSteps, both operands K-major swizzled tiles:
 * A rows [a_row0, +64) of an RA-row tile, B rows [b_row0, +N) of an RB-row tile. */
template <int N, int kSteps, int RA, int RB, typename T>
PF_DEV void gemm_ss_kmajor(float (&d)[N / 2], uint32_t a_tile, int a_row0, uint32_t b_tile, int b_row0,
                           bool accumulate) {
#pragma unroll
    for (int kk = 0; kk < kSteps; ++kk)
        WgmmaSS<N, T, 0, 0>::run(d, desc_kmajor<RA>(a_tile, a_row0, kk), desc_kmajor<RB>(b_tile, b_row0, kk),
                                 (accumulate || kk > 0) ? 1 : 0);
}

/* D (+)= A B over K = 16 * kSteps: A in registers (a[kk] = the k16 step's
 * fragment), B an MN-major swizzled tile of RB rows, columns [b_col0, +N). */
template <int N, int kSteps, int RB, typename T>
PF_DEV void gemm_rs_mnmajor(float (&d)[N / 2], const uint32_t (&a)[kSteps][4], uint32_t b_tile, int b_col0,
                            bool accumulate) {
#pragma unroll
    for (int kk = 0; kk < kSteps; ++kk)
        WgmmaRS<N, T, 1>::run(d, a[kk], desc_mnmajor<RB>(b_tile, b_col0, kk), (accumulate || kk > 0) ? 1 : 0);
}

/* Rows [0, R) of a global tile (row r at g + r * row_stride, 16-byte aligned
 * rows) -> swizzled tile; rows >= rows_valid and columns >= d are zero-filled.
 * kThreads threads, thread `tid` among them: it copies chunk tid % C of rows
 * tid / C + k * kRowStep, whose swizzle is the same for every k (kRowStep is a
 * multiple of 8), so one running source pointer and one destination offset
 * serve the whole tile. */
template <int R, int D, int kThreads, typename T>
PF_DEV void load_swizzled(uint32_t tile, const T *g, int64_t row_stride, int rows_valid, int d, int tid) {
    constexpr int C = D / 8; /* 16-byte chunks per row */
    constexpr int kRowStep = kThreads / C;
    static_assert(kThreads % C == 0 && kRowStep % 8 == 0, "whole rows per pass, fixed swizzle");
    const int r0 = tid / C, c = (tid % C) * 8;
    const bool col_ok = c < d;
    const T *src = g + r0 * row_stride + c;
    uint32_t dst = tile + swz<R>(r0, c);
#pragma unroll
    for (int it = 0; it < (R + kRowStep - 1) / kRowStep; ++it) {
        if (R % kRowStep != 0 && r0 + it * kRowStep >= R) break;
        const bool ok = col_ok && r0 + it * kRowStep < rows_valid;
        cp_async_16(dst, ok ? (const void *)src : (const void *)g, ok);
        src += kRowStep * row_stride;
        dst += kRowStep * 128;
    }
}

}  // namespace sm90

}  // namespace cuda
}  // namespace pf

#endif /* PF_SM90_CUH */
