/*
 * flash_common.cuh - building blocks shared by the CUDA attention kernels
 * (flash forward/backward, and later paged attention / decoding):
 *
 *   host side   (PF_CUDA_CHECK / PF_CUDA_CHECK_LAUNCH come from cuda_util.cuh)
 *               pf::cuda::set_max_smem (cudaFuncSetAttribute once per kernel and
 *               device), pf::cuda::sm_count.
 *   device side the sm_80+ warp-level tensor-core path: mma.sync m16n8k16 with
 *               float32 accumulation for float16 / bfloat16, ldmatrix (plain and
 *               transposed), cp.async 16-byte copies with zero fill, packing of
 *               two floats into a 32-bit register of the input type, fast exp2,
 *               an accurate-enough tanh, quad reductions.
 *
 * Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"): with
 * lane = 4 * g + t (g = lane / 4 in 0..7, t = lane % 4):
 *   A (16x16, row major)  a[0] = (g, 2t..2t+1)   a[1] = (g+8, 2t..2t+1)
 *                         a[2] = (g, 8+2t..)     a[3] = (g+8, 8+2t..)
 *   B (16x8, "col")       b[0] = (k 2t..2t+1, n g)  b[1] = (k 8+2t.., n g)
 *   C (16x8, float)       c[0..1] = (g, 2t..2t+1)   c[2..3] = (g+8, 2t..2t+1)
 * so two horizontally adjacent C tiles, packed to 16 bits, are exactly the A
 * fragment of the next product (P V uses S's registers without a shuffle).
 *
 * Nothing here is specific to one kernel; a Hopper (wgmma/TMA) path can include
 * it for the host helpers and sit beside the sm_80 kernels.
 */
#ifndef PF_FLASH_COMMON_CUH
#define PF_FLASH_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <atomic>

#include "cuda_util.cuh"
#include "backend.h"
#include "pf_error.h"

namespace pf {
namespace cuda {

/* ------------------------------------------------------------------------ */
/* Host helpers                                                              */
/* ------------------------------------------------------------------------ */

constexpr int kMaxDevices = 64;

/* Set a kernel's dynamic shared-memory limit to smem_bytes, once per device (needed
 * above 48 KB, and at 48 KB or less too when the kernel also has static shared memory
 * and the two together pass 48 KB). `done` is a per-kernel-instance bitmask (a
 * function-local static). */
template <typename Kernel>
inline pf_status set_max_smem(Kernel kernel, int smem_bytes, int device, std::atomic<uint64_t> &done) {
    if (smem_bytes <= 0) return PF_STATUS_OK;
    uint64_t bit = device < kMaxDevices ? (1ull << device) : 0;
    if (bit && (done.load(std::memory_order_acquire) & bit)) return PF_STATUS_OK;
    PF_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
    if (bit) done.fetch_or(bit, std::memory_order_acq_rel);
    return PF_STATUS_OK;
}

/* Multiprocessor count of `device` (cached). */
inline pf_status sm_count(int device, int *count) {
    static std::atomic<int> cache[kMaxDevices];
    if (device >= 0 && device < kMaxDevices) {
        int c = cache[device].load(std::memory_order_relaxed);
        if (c > 0) {
            *count = c;
            return PF_STATUS_OK;
        }
    }
    int c = 0;
    PF_CUDA_CHECK(cudaDeviceGetAttribute(&c, cudaDevAttrMultiProcessorCount, device));
    if (device >= 0 && device < kMaxDevices) cache[device].store(c, std::memory_order_relaxed);
    *count = c;
    return PF_STATUS_OK;
}

/* ------------------------------------------------------------------------ */
/* Device helpers                                                            */
/* ------------------------------------------------------------------------ */

#define PF_DEV __device__ __forceinline__

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

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
        asm(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
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
        asm(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
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
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(addr));
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
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_size)
                 : "memory");
}

PF_DEV void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
PF_DEV void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

PF_DEV float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

PF_DEV float fast_log2(float x) {
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

PF_DEV float fast_rcp(float x) {
    float y;
    asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

/* tanh(x) = 1 - 2 / (exp(2x) + 1): absolute error ~1e-7 everywhere (the
 * tanh.approx instruction's 2^-11 relative error is too coarse for softcap). */
PF_DEV float tanh_abs_accurate(float x) {
    float e = fast_exp2(x * (2.0f * kLog2e));
    return 1.0f - 2.0f * fast_rcp(e + 1.0f);
}

PF_DEV float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
    return x;
}

PF_DEV float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    x += __shfl_xor_sync(0xffffffffu, x, 2);
    return x;
}

PF_DEV int imin(int a, int b) { return a < b ? a : b; }
PF_DEV int imax(int a, int b) { return a > b ? a : b; }

}  // namespace cuda
}  // namespace pf

#endif /* PF_FLASH_COMMON_CUH */
