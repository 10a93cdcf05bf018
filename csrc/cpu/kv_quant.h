/*
 * kv_quant.h - the CPU backend's compressed KV-cache elements (pagedflash.h "Compressed KV
 * caches"): float32 -> float8_e4m3fn / float8_e5m2 / int8 codes for write_kv_cache (round to
 * nearest even, saturating), codes -> float32 rows for paged attention (which applies the scales
 * itself), the micro-kernels that read codes in place (scores and P V, AVX2 / F16C), and
 * the scale of a cache row (per tensor, or per (token, KV head) stored beside it).
 *
 * With AVX2 / F16C, float8 decoding goes through float16, whose conversion to float32 is exact
 * (vcvtph2ps, 8 lanes): an e5m2 code is the high byte of the float16 with the same value, and an
 * e4m3fn code with its 7 magnitude bits placed 3 bits lower (exponent field 0EEEE, mantissa
 * MMM0000000) is the float16 of value / 256, subnormals included; e4m3fn's NaN (magnitude 0x7f)
 * gets the float16 NaN exponent. Elsewhere (and for a row's last codes) a constant table holds
 * the float32 bits of every code.
 */
#ifndef PF_KV_QUANT_H
#define PF_KV_QUANT_H

#include "cpu_common.h"

/* ---- encode ---- */

/* float32 -> float8 with `mant` mantissa bits and exponent bias `bias`: round to nearest even;
 * |x| at or beyond the largest finite value (code max_code) gives that value, inf included;
 * NaN gives nan_code. The sign is kept (-0 included). */
static inline uint8_t pf_f32_to_fp8(float x, int mant, int bias, uint32_t max_code, uint32_t nan_code) {
    uint32_t u;
    memcpy(&u, &x, 4);
    const uint32_t sign = (u >> 24) & 0x80u;
    uint32_t a = u & 0x7fffffffu, code;
    if (a > 0x7f800000u) return (uint8_t)(sign | nan_code);
    if (a < (uint32_t)(127 + 1 - bias) << 23) { /* below the smallest normal: multiples of 2^(1-bias-mant) */
        float f;
        memcpy(&f, &a, 4);
        code = (uint32_t)rintf(f * ldexpf(1.0f, bias - 1 + mant)); /* exact product; rint: to nearest even */
    } else { /* drop 23 - mant mantissa bits, to nearest even */
        const int shift = 23 - mant;
        a += ((1u << (shift - 1)) - 1u) + ((a >> shift) & 1u);
        code = (a >> shift) - ((uint32_t)(127 - bias) << mant);
    }
    return (uint8_t)(sign | (code < max_code ? code : max_code));
}

static inline uint8_t pf_f32_to_e4m3(float x) { return pf_f32_to_fp8(x, 3, 7, 0x7eu, 0x7fu); }
static inline uint8_t pf_f32_to_e5m2(float x) { return pf_f32_to_fp8(x, 2, 15, 0x7bu, 0x7fu); }

/* int8: round to nearest even, clamped to [-127, 127] (inf included; callers never pass NaN). */
static inline int8_t pf_f32_to_i8(float x) {
    float r = rintf(x);
    r = r < -127.0f ? -127.0f : r > 127.0f ? 127.0f : r;
    return (int8_t)r;
}

/* The largest |code| a dtype's row scale maps max|x| to (int8 per-(token, head) scales). */
#define PF_I8_MAX 127.0f

/* n float32 values x / scale as codes of `dtype` (one float32 division each). */
static inline void pf_store_row_quant(void *PF_RESTRICT dst, const float *PF_RESTRICT x, pf_dtype dtype, int64_t n,
                                      float scale) {
    uint8_t *d = (uint8_t *)dst;
    if (dtype == PF_DTYPE_I8)
        for (int64_t i = 0; i < n; i++) ((int8_t *)d)[i] = pf_f32_to_i8(x[i] / scale);
    else if (dtype == PF_DTYPE_F8E4M3)
        for (int64_t i = 0; i < n; i++) d[i] = pf_f32_to_e4m3(x[i] / scale);
    else
        for (int64_t i = 0; i < n; i++) d[i] = pf_f32_to_e5m2(x[i] / scale);
}

/* ---- decode ---- */

#if defined(__AVX2__) && defined(__F16C__) && !defined(__CUDACC__)
#define PF_KV_QUANT_AVX2 1
/* 16 float8 codes -> their float16 bits (e4m3fn: of value / 256; its NaN given the float16 NaN
 * exponent), 16 lanes at a time. e4m3fn from the sign-extended byte: shifted left by 7, the
 * magnitude lands in bits 7..13 and the sign's copies in 14 and 15, of which 14 is dropped. */
static inline __m256i pf_fp8x16_to_f16(const uint8_t *c, int e4m3) {
    const __m128i bytes = _mm_loadu_si128((const __m128i *)c);
    if (!e4m3) return _mm256_slli_epi16(_mm256_cvtepu8_epi16(bytes), 8);
    const __m256i w = _mm256_cvtepi8_epi16(bytes);
    const __m256i h = _mm256_and_si256(_mm256_slli_epi16(w, 7), _mm256_set1_epi16((short)0xbf80));
    /* NaN: magnitude 0x7f, i.e. w | 0xff80 all ones */
    const __m256i nan = _mm256_cmpeq_epi16(_mm256_or_si256(w, _mm256_set1_epi16((short)0xff80)), _mm256_set1_epi16(-1));
    return _mm256_or_si256(h, _mm256_and_si256(nan, _mm256_set1_epi16(0x7c00)));
}
#endif

/* The factor between a code's value and what pf_load_row_codes gives: 256 for float8_e4m3fn
 * (decoded as value / 256), 1 otherwise. Exact in float32. */
static inline float pf_code_unit(pf_dtype dtype) { return dtype == PF_DTYPE_F8E4M3 ? 256.0f : 1.0f; }

/* The float32 bits of every float8 code (e4m3fn: of value / 256), as constant expressions:
 * pf_fp8_f32_bits[0] e4m3fn, [1] e5m2 (common.c), the portable decoder. */
#define PF_E4M3_SUB(m)                    \
    ((m) == 0   ? 0u                      \
     : (m) == 1 ? 110u << 23              \
     : (m) == 2 ? 111u << 23              \
     : (m) == 3 ? (111u << 23 | 1u << 22) \
     : (m) == 4 ? 112u << 23              \
     : (m) == 5 ? (112u << 23 | 1u << 21) \
     : (m) == 6 ? (112u << 23 | 1u << 22) \
                : (112u << 23 | 3u << 21))
#define PF_E4M3_MAG(g) \
    ((g) == 0x7f ? 0x7fc00000u : ((g) >> 3) ? ((((g) >> 3) + 112u) << 23 | ((g) & 7u) << 20) : PF_E4M3_SUB((g) & 7))
#define PF_E4M3_BITS(c) ((((c) & 0x80u) << 24) | PF_E4M3_MAG((c) & 0x7fu))
#define PF_E5M2_SUB(m) ((m) == 0 ? 0u : (m) == 1 ? 111u << 23 : (m) == 2 ? 112u << 23 : (112u << 23 | 1u << 22))
#define PF_E5M2_MAG(g)                                                 \
    (((g) >> 2) == 31 ? (((g) & 3u) ? 0x7fc00000u : 0x7f800000u)       \
     : ((g) >> 2)     ? ((((g) >> 2) + 112u) << 23 | ((g) & 3u) << 21) \
                      : PF_E5M2_SUB((g) & 3u))
#define PF_E5M2_BITS(c) ((((c) & 0x80u) << 24) | PF_E5M2_MAG((c) & 0x7fu))
extern const uint32_t pf_fp8_f32_bits[2][256];

/* n codes of a compressed `dtype` as float32: code / pf_code_unit(dtype), exactly (the caller
 * applies unit * scale where it is cheapest). */
static inline void pf_load_row_codes(float *PF_RESTRICT dst, const void *PF_RESTRICT src, pf_dtype dtype, int64_t n) {
    const uint8_t *s = (const uint8_t *)src;
    int64_t i = 0;
    if (dtype == PF_DTYPE_I8) {
        const int8_t *q = (const int8_t *)src;
#ifdef PF_KV_QUANT_AVX2
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(dst + i,
                             _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + i)))));
#endif
        for (; i < n; i++) dst[i] = (float)q[i];
        return;
    }
    const int e4m3 = dtype == PF_DTYPE_F8E4M3;
#ifdef PF_KV_QUANT_AVX2
    for (; i + 16 <= n; i += 16) {
        const __m256i h = pf_fp8x16_to_f16(s + i, e4m3);
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm256_castsi256_si128(h)));
        _mm256_storeu_ps(dst + i + 8, _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)));
    }
#endif
    const uint32_t *bits = pf_fp8_f32_bits[e4m3 ? 0 : 1]; /* the rest (all of it without AVX2 / F16C) */
    for (; i < n; i++) memcpy(dst + i, bits + s[i], 4);
}

#ifdef PF_KV_QUANT_AVX2
/* 16 codes of `dtype` at c -> *lo, *hi (code / pf_code_unit, as pf_load_row_codes). */
static inline void pf_codes16(const uint8_t *c, pf_dtype dtype, __m256 *lo, __m256 *hi) {
    if (dtype == PF_DTYPE_I8) {
        const __m128i b = _mm_loadu_si128((const __m128i *)c);
        *lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
        *hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(b, b)));
        return;
    }
    const __m256i h = pf_fp8x16_to_f16(c, dtype == PF_DTYPE_F8E4M3);
    *lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
    *hi = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
}

static inline float pf_hsum8(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}

/* Scores of R query rows against n compressed key rows, without staging K: for each key row its
 * codes are converted 16 at a time in registers and multiplied into R accumulators.
 * s[r * lds + j] = sum_c qf[r * dpad + c] * code_j[c] / unit for j < n, 0 for n <= j < 64; qf is
 * zero in columns [d, dpad) (dpad a multiple of 16), so a partial last chunk reads zero codes. */
static inline __attribute__((always_inline)) void pf_quant_scores_r(const float *qf, int64_t dpad, const int R,
                                                                    const uint8_t *const *krow, int64_t n, int64_t d,
                                                                    pf_dtype dtype, float *s, int64_t lds) {
    const int64_t d16 = d / 16 * 16;
    for (int64_t j = 0; j < n; j++) {
        __m256 acc[8];
        for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
        const uint8_t *k = krow[j];
        for (int64_t c = 0; c < dpad; c += 16) {
            __m256 lo, hi;
            if (c < d16) {
                pf_codes16(k + c, dtype, &lo, &hi);
            } else { /* the last, partial chunk */
                float tmp[16] __attribute__((aligned(32))) = {0};
                pf_load_row_codes(tmp, k + c, dtype, d - c);
                lo = _mm256_load_ps(tmp);
                hi = _mm256_load_ps(tmp + 8);
            }
            for (int r = 0; r < R; r++) {
                acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(qf + r * dpad + c), lo, acc[r]);
                acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(qf + r * dpad + c + 8), hi, acc[r]);
            }
        }
        for (int r = 0; r < R; r++) s[r * lds + j] = pf_hsum8(acc[r]);
    }
    for (int r = 0; r < R; r++)
        for (int64_t j = n; j < 64; j++) s[r * lds + j] = 0.0f;
}

/* pf_quant_scores_r for any number of rows, in groups of up to 8 (s rows lds apart). */
static inline void pf_quant_scores(const float *qf, int64_t dpad, int64_t rows, const uint8_t *const *krow, int64_t n,
                                   int64_t d, pf_dtype dtype, float *s, int64_t lds) {
    for (int64_t r0 = 0; r0 < rows; r0 += 8) {
        const float *q = qf + r0 * dpad;
        float *sr = s + r0 * lds;
        switch (rows - r0 < 8 ? rows - r0 : 8) {
            case 1: pf_quant_scores_r(q, dpad, 1, krow, n, d, dtype, sr, lds); break;
            case 2: pf_quant_scores_r(q, dpad, 2, krow, n, d, dtype, sr, lds); break;
            case 3: pf_quant_scores_r(q, dpad, 3, krow, n, d, dtype, sr, lds); break;
            case 4: pf_quant_scores_r(q, dpad, 4, krow, n, d, dtype, sr, lds); break;
            case 5: pf_quant_scores_r(q, dpad, 5, krow, n, d, dtype, sr, lds); break;
            case 6: pf_quant_scores_r(q, dpad, 6, krow, n, d, dtype, sr, lds); break;
            case 7: pf_quant_scores_r(q, dpad, 7, krow, n, d, dtype, sr, lds); break;
            default: pf_quant_scores_r(q, dpad, 8, krow, n, d, dtype, sr, lds); break;
        }
    }
}

/* o[r * ldo + c] += sum_j p[r * ldp + j] * code_j[c] / unit for R <= 4 rows, c < dpad: the value
 * rows' codes converted in registers, 16 columns at a time (codes past d read as 0). */
static inline __attribute__((always_inline)) void pf_quant_pv_r(const float *p, int64_t ldp, const int R,
                                                                const uint8_t *const *vrow, int64_t n, int64_t d,
                                                                int64_t dpad, pf_dtype dtype, float *o, int64_t ldo) {
    const int64_t d16 = d / 16 * 16;
    for (int64_t c = 0; c < dpad; c += 16) {
        __m256 acc[4][2];
        for (int r = 0; r < R; r++) {
            acc[r][0] = _mm256_loadu_ps(o + r * ldo + c);
            acc[r][1] = _mm256_loadu_ps(o + r * ldo + c + 8);
        }
        for (int64_t j = 0; j < n; j++) {
            __m256 lo, hi;
            if (c < d16) {
                pf_codes16(vrow[j] + c, dtype, &lo, &hi);
            } else {
                float tmp[16] __attribute__((aligned(32))) = {0};
                pf_load_row_codes(tmp, vrow[j] + c, dtype, d - c);
                lo = _mm256_load_ps(tmp);
                hi = _mm256_load_ps(tmp + 8);
            }
            for (int r = 0; r < R; r++) {
                const __m256 pr = _mm256_broadcast_ss(p + r * ldp + j);
                acc[r][0] = _mm256_fmadd_ps(pr, lo, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(pr, hi, acc[r][1]);
            }
        }
        for (int r = 0; r < R; r++) {
            _mm256_storeu_ps(o + r * ldo + c, acc[r][0]);
            _mm256_storeu_ps(o + r * ldo + c + 8, acc[r][1]);
        }
    }
}

/* pf_quant_pv_r for any number of rows, in groups of up to 4. */
static inline void pf_quant_pv(const float *p, int64_t ldp, int64_t rows, const uint8_t *const *vrow, int64_t n,
                               int64_t d, int64_t dpad, pf_dtype dtype, float *o, int64_t ldo) {
    for (int64_t r0 = 0; r0 < rows; r0 += 4) {
        const float *pr = p + r0 * ldp;
        float *orow = o + r0 * ldo;
        switch (rows - r0 < 4 ? rows - r0 : 4) {
            case 1: pf_quant_pv_r(pr, ldp, 1, vrow, n, d, dpad, dtype, orow, ldo); break;
            case 2: pf_quant_pv_r(pr, ldp, 2, vrow, n, d, dpad, dtype, orow, ldo); break;
            case 3: pf_quant_pv_r(pr, ldp, 3, vrow, n, d, dpad, dtype, orow, ldo); break;
            default: pf_quant_pv_r(pr, ldp, 4, vrow, n, d, dpad, dtype, orow, ldo); break;
        }
    }
}
#endif

/* ---- scales ---- */

/* The scale of one cache (pagedflash.h): per tensor (data == NULL: `value`), or per (token, KV
 * head) scale[block, offset, head] at the element strides sb, so, sh. */
typedef struct pf_kv_scale {
    float *data;
    int64_t sb, so, sh;
    float value;
} pf_kv_scale;

/* The scale tensor `t` of a cache (validated): absent = 1, 0-d / [1] = its value, else per row. */
static inline pf_kv_scale pf_kv_scale_of(const pf_tensor *t) {
    pf_kv_scale s = {NULL, 0, 0, 0, 1.0f};
    if (!pf_tensor_present(t) || pf_tensor_numel(t) == 0) return s;
    if (t->ndim == 3) {
        s.data = (float *)t->data;
        s.sb = t->strides[0];
        s.so = t->strides[1];
        s.sh = t->strides[2];
    } else {
        s.value = *(const float *)t->data;
    }
    return s;
}

static inline float *pf_kv_scale_ptr(const pf_kv_scale *s, int64_t block, int64_t offset, int64_t head) {
    return s->data + block * s->sb + offset * s->so + head * s->sh;
}

/* The scale of row (block, offset, head). */
static inline float pf_kv_scale_at(const pf_kv_scale *s, int64_t block, int64_t offset, int64_t head) {
    return s->data ? *pf_kv_scale_ptr(s, block, offset, head) : s->value;
}

#endif /* PF_KV_QUANT_H */
