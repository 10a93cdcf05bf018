/*
 * pf_internal.h - helpers shared by the core and the CPU backend: the error
 * macros, tensor-view accessors, float16/bfloat16 conversion and the parallel-for.
 * Not part of the public API.
 */
#ifndef PF_INTERNAL_H
#define PF_INTERNAL_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "pagedflash.h"

#if (defined(__AVX512F__) || defined(__F16C__)) && !defined(__CUDACC__)
#include <immintrin.h>
#define PF_X86_F16C 1
#endif

#ifdef __cplusplus
extern "C" {
#endif

#ifdef __cplusplus
#define PF_RESTRICT __restrict__
#else
#define PF_RESTRICT restrict
#endif

/* Record a message for the calling thread and return `status`. */
pf_status pf_set_error(pf_status status, const char *file, int line, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 4, 5)))
#endif
    ;

/* Return `status` with a message unless `cond` holds. */
#define PF_CHECK(cond, status, ...)                                         \
    do {                                                                    \
        if (!(cond)) return pf_set_error((status), __FILE__, __LINE__, __VA_ARGS__); \
    } while (0)

#define PF_CHECK_VALUE(cond, ...) PF_CHECK(cond, PF_STATUS_INVALID_VALUE, __VA_ARGS__)
#define PF_CHECK_TYPE(cond, ...) PF_CHECK(cond, PF_STATUS_INVALID_TYPE, __VA_ARGS__)

/* Propagate a failing status. */
#define PF_TRY(expr)                                   \
    do {                                               \
        pf_status pf_try_status_ = (expr);             \
        if (pf_try_status_ != PF_STATUS_OK) return pf_try_status_; \
    } while (0)

static inline int pf_tensor_present(const pf_tensor *t) { return t->data != NULL; }

static inline int64_t pf_tensor_numel(const pf_tensor *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

/* Render a shape as "[2, 3, 4]" into buf (for messages). */
const char *pf_shape_str(const pf_tensor *t, char *buf, size_t len);

/* Shape, dtype and device checks that produce the standard messages. */
pf_status pf_check_rank(const pf_tensor *t, const char *name, int ndim);
pf_status pf_check_dim(const pf_tensor *t, const char *name, int dim, int64_t expected,
                       const char *what);
pf_status pf_check_dtype(const pf_tensor *t, const char *name, pf_dtype expected);
pf_status pf_check_float_dtype(const pf_tensor *t, const char *name);
pf_status pf_check_last_contiguous(const pf_tensor *t, const char *name);
pf_status pf_check_same_device(const pf_tensor *t, const char *name, const pf_tensor *ref,
                               const char *ref_name);
/* A required argument: non-NULL data (an empty tensor may carry a placeholder). */
pf_status pf_check_present(const pf_tensor *t, const char *name);
/* Same rank and shape as `ref`. */
pf_status pf_check_same_shape(const pf_tensor *t, const char *name, const pf_tensor *ref,
                              const char *ref_name);
/* Present, float16/bfloat16/float32 with `ref`'s dtype and device, last dim contiguous. */
pf_status pf_check_float_like(const pf_tensor *t, const char *name, const pf_tensor *ref,
                              const char *ref_name);
/* window (left, right >= -1), softcap (finite, >= 0), softmax_scale (finite). */
pf_status pf_check_mask_options(int32_t window_left, int32_t window_right, float softcap,
                                float softmax_scale);
/* alibi_slopes, when given: f32 [num_heads] or [batch, num_heads] on q's device. */
pf_status pf_check_alibi(const pf_tensor *a, int64_t num_heads, int64_t batch, const pf_tensor *q);
/* The tensor is host-readable (CPU or page-locked host memory). */
int pf_tensor_on_host(const pf_tensor *t);
/* Strides must be non-negative (no aliasing trickery on outputs). */
pf_status pf_check_nonneg_strides(const pf_tensor *t, const char *name);

/* ---- float16 / bfloat16 <-> float32 (round to nearest even) ---- */

static inline float pf_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t pf_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float pf_f16_to_f32(uint16_t h) {
#if defined(__FLT16_MANT_DIG__) && !defined(__cplusplus)
    _Float16 x;
    memcpy(&x, &h, 2);
    return (float)x;
#else
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else { /* subnormal */
            exp = 127 - 15 + 1;
            while (!(man & 0x400u)) { man <<= 1; exp--; }
            man &= 0x3ffu;
            u = sign | (exp << 23) | (man << 13);
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (man << 13);
    } else {
        u = sign | ((exp - 15 + 127) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
#endif
}

static inline uint16_t pf_f32_to_f16(float f) {
#if defined(__FLT16_MANT_DIG__) && !defined(__cplusplus)
    _Float16 x = (_Float16)f;
    uint16_t h;
    memcpy(&h, &x, 2);
    return h;
#else
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t absu = u & 0x7fffffffu;
    if (absu > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);
    if (absu >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* overflow -> inf */
    if (absu < 0x38800000u) { /* subnormal or zero in f16 */
        float a;
        memcpy(&a, &absu, 4);
        return (uint16_t)(sign | (uint16_t)lrintf(a * 16777216.0f)); /* a / 2^-24 */
    }
    uint32_t r = absu + 0xfffu + ((absu >> 13) & 1u);
    return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
#endif
}

/* Load n elements of a row of `dtype` into float32. The loops are written so the
 * conversions are vectorized (vcvtph2ps through intrinsics for float16 -- GCC 12 turns a
 * plain _Float16 loop into scalar vcvtsh2ss, 10x slower -- and a shift for bfloat16). */
static inline void pf_load_row_f32(float *PF_RESTRICT dst, const void *PF_RESTRICT src, pf_dtype dtype,
                                   int64_t n) {
    if (dtype == PF_DTYPE_F32) {
        memcpy(dst, src, (size_t)n * 4);
    } else if (dtype == PF_DTYPE_F16) {
        const uint16_t *s = (const uint16_t *)src;
        int64_t i = 0;
#if defined(PF_X86_F16C) && defined(__AVX512F__)
        for (; i + 16 <= n; i += 16)
            _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + i))));
#elif defined(PF_X86_F16C)
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
#endif
        for (; i < n; i++) dst[i] = pf_f16_to_f32(s[i]);
    } else {
        const uint16_t *s = (const uint16_t *)src;
        uint32_t *d = (uint32_t *)dst;
        for (int64_t i = 0; i < n; i++) d[i] = (uint32_t)s[i] << 16;
    }
}

/* Store n float32 values as a row of `dtype` (round to nearest even). */
static inline void pf_store_row_f32(void *PF_RESTRICT dst, const float *PF_RESTRICT src, pf_dtype dtype,
                                    int64_t n) {
    if (dtype == PF_DTYPE_F32) {
        memcpy(dst, src, (size_t)n * 4);
    } else if (dtype == PF_DTYPE_F16) {
        uint16_t *d = (uint16_t *)dst;
        int64_t i = 0;
#if defined(PF_X86_F16C) && defined(__AVX512F__)
        for (; i + 16 <= n; i += 16)
            _mm256_storeu_si256((__m256i *)(d + i),
                                _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#elif defined(PF_X86_F16C)
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128((__m128i *)(d + i),
                             _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
        for (; i < n; i++) d[i] = pf_f32_to_f16(src[i]);
    } else {
        uint16_t *d = (uint16_t *)dst;
        for (int64_t i = 0; i < n; i++) d[i] = pf_f32_to_bf16(src[i]);
    }
}

/* ---- parallel-for over [0, n) on num_threads threads (pthreads) ---- */

typedef void (*pf_task_fn)(void *ctx, int64_t index, int thread_id);

/* Runs fn(ctx, i, tid) for every i in [0, n); items are handed out dynamically.
 * num_threads <= 0 means pf_cpu_count(). Returns PF_STATUS_OUT_OF_MEMORY if
 * threads cannot be created (the work then runs on the calling thread). */
pf_status pf_parallel_for(int64_t n, int num_threads, pf_task_fn fn, void *ctx);

/* Effective thread count for a request (<= 0 -> cores), capped by the work. */
int pf_resolve_threads(int requested, int64_t work_items);

/* Return the CUDA backend's call for CUDA tensors, the CPU backend's otherwise;
 * without a CUDA build, CUDA tensors give PF_STATUS_NOT_SUPPORTED. */
#ifdef PF_WITH_CUDA
#define PF_DISPATCH(device, cpu_call, cuda_call) \
    return (device) == PF_DEVICE_CUDA ? (cuda_call) : (cpu_call)
#else
#define PF_DISPATCH(device, cpu_call, cuda_call)                                              \
    do {                                                                                      \
        PF_CHECK((device) != PF_DEVICE_CUDA, PF_STATUS_NOT_SUPPORTED,                        \
                 "this pagedflash was built without CUDA; tensors on a CUDA device need a "   \
                 "build with nvcc present (PAGEDFLASH_CUDA=1)");                              \
        return (cpu_call);                                                                    \
    } while (0)
#endif

#ifdef __cplusplus
}
#endif

#endif /* PF_INTERNAL_H */
