/*
 * attn/math.cuh - scalar device math shared by the CUDA attention kernels:
 * the log2-domain constants, fast exp2 / log2 / reciprocal, the one tanh that
 * softcap uses everywhere, quad (4-lane) reductions, int min / max.
 */
#ifndef PF_ATTN_MATH_CUH
#define PF_ATTN_MATH_CUH

#include <cuda_runtime.h>
#include <stdint.h>

#include "backend.h"

#define PF_DEV __device__ __forceinline__

namespace pf {
namespace cuda {

constexpr float kLog2e = PF_LOG2E;
constexpr float kLn2 = PF_LN2;

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

#endif /* PF_ATTN_MATH_CUH */
