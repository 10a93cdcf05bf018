/*
 * attn/mma.cuh - the sm_80+ warp-level tensor-core path every CUDA attention
 * kernel builds on: mma.sync m16n8k16 with float32 accumulation for float16 /
 * bfloat16 (TypeOps<T>: the product, packing two floats into a 32-bit register
 * of T, element conversion), ldmatrix (plain and transposed), cp.async 16-byte
 * copies with zero fill, shared-memory addresses.
 *
 * Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"): with
 * lane = 4 * g + t (g = lane / 4 in 0..7, t = lane % 4):
 *   A (16x16, row major)  a[0] = (g, 2t..2t+1)   a[1] = (g+8, 2t..2t+1)
 *                         a[2] = (g, 8+2t..)     a[3] = (g+8, 8+2t..)
 *   B (16x8, "col")       b[0] = (k 2t..2t+1, n g)  b[1] = (k 8+2t.., n g)
 *   C (16x8, float)       c[0..1] = (g, 2t..2t+1)   c[2..3] = (g+8, 2t..2t+1)
 * so two horizontally adjacent C tiles, packed to 16 bits, are exactly the A
 * fragment of the next product (P V uses S's registers without a shuffle).
 * The Hopper (wgmma) counterparts are in attn/sm90.cuh.
 */
#ifndef PF_ATTN_MMA_CUH
#define PF_ATTN_MMA_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "attn/math.cuh"

namespace pf {
namespace cuda {

template <typename T>
struct TypeOps;

template <>
struct TypeOps<__half> {
    static PF_DEV uint32_t pack(float lo, float hi) {
        __half2 h = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<uint32_t *>(&h);
    }
    static PF_DEV float to_float(__half x) { return __half2float(x); }
    static PF_DEV __half from_float(float x) { return __float2half_rn(x); }
    /* C += A B, m16n8k16, float16 inputs, float32 accumulators */
    static PF_DEV void mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

template <>
struct TypeOps<__nv_bfloat16> {
    static PF_DEV uint32_t pack(float lo, float hi) {
        __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<uint32_t *>(&h);
    }
    static PF_DEV float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
    static PF_DEV __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
    static PF_DEV void mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

/* float32: only the conversions (the float32 kernels use CUDA cores) */
template <>
struct TypeOps<float> {
    static PF_DEV float to_float(float x) { return x; }
    static PF_DEV float from_float(float x) { return x; }
};

PF_DEV uint32_t smem_addr(const void *p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

/* Four 8x8 b16 matrices; lane l gives the row address of matrix l / 8, row l % 8. */
PF_DEV void ldmatrix_x4(uint32_t r[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

PF_DEV void ldmatrix_x4_trans(uint32_t r[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

PF_DEV void ldmatrix_x2(uint32_t r[2], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}

PF_DEV void ldmatrix_x2_trans(uint32_t r[2], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(addr));
}

/* 16-byte global -> shared copy; pred false writes 16 zero bytes (src unread,
 * but it must still be a valid address: pass the tensor base). */
PF_DEV void cp_async_16(uint32_t dst, const void *src, bool pred) {
    int src_size = pred ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_size) : "memory");
}

/* 4-byte global -> shared copy (cp.async.ca); pred false writes 4 zero bytes (src unread,
 * but it must still be a valid address). */
PF_DEV void cp_async_4(uint32_t dst, const void *src, bool pred) {
    int src_size = pred ? 4 : 0;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(src_size) : "memory");
}

PF_DEV void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
PF_DEV void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

/* dst[0] += v0, dst[1] += v1 in float32 global memory, as one vector reduction on sm_90
 * (red.global.add.v2.f32), two atomicAdd before it. */
PF_DEV void atomic_add_float2(float *dst, float v0, float v1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(dst), "f"(v0), "f"(v1) : "memory");
#else
    atomicAdd(dst, v0);
    atomicAdd(dst + 1, v1);
#endif
}

}  // namespace cuda
}  // namespace pf

#endif /* PF_ATTN_MMA_CUH */
