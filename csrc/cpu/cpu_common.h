/*
 * cpu_common.h - what every file of the CPU backend shares: the core's error
 * macros and backend interface, float16 / bfloat16 <-> float32 conversion
 * (round to nearest even), row loads and stores in float32 (vectorized with
 * F16C / AVX-512 where the compiler targets them), 64-byte-aligned scratch, and
 * the parallel-for (parallel.c).
 */
#ifndef PF_CPU_COMMON_H
#define PF_CPU_COMMON_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "backend.h"
#include "pf_error.h"

#if (defined(__AVX512F__) || defined(__F16C__)) && !defined(__CUDACC__)
#include <immintrin.h>
#define PF_X86_F16C 1
#endif

#define PF_RESTRICT restrict

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
            while (!(man & 0x400u)) {
                man <<= 1;
                exp--;
            }
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
static inline void pf_load_row_f32(float *PF_RESTRICT dst, const void *PF_RESTRICT src, pf_dtype dtype, int64_t n) {
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
static inline void pf_store_row_f32(void *PF_RESTRICT dst, const float *PF_RESTRICT src, pf_dtype dtype, int64_t n) {
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
            _mm_storeu_si128((__m128i *)(d + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
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

/* 64-byte-aligned host memory; released with pf_aligned_free (free). NULL when out of memory. */
void *pf_aligned_alloc(size_t bytes);
void pf_aligned_free(void *p);

#endif /* PF_CPU_COMMON_H */
