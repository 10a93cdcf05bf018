/*
 * kv_quant.h - the CPU backend's compressed KV-cache elements (pagedflash.h "Compressed KV
 * caches"): float32 -> float8_e4m3fn / float8_e5m2 / int8 codes for write_kv_cache (round to
 * nearest even, saturating), codes -> float32 rows times a scale for paged attention, and the
 * scale of a cache row (per tensor, or per (token, KV head) stored beside the cache).
 *
 * Decoding goes through float16, whose conversion to float32 is exact and vectorized
 * (pf_load_row_f32: F16C): an e5m2 code is the high byte of the float16 with the same value,
 * and an e4m3fn code with its 7 magnitude bits placed 3 bits lower (exponent field 0EEEE,
 * mantissa MMM0000000) is the float16 of value / 256, subnormals included; e4m3fn's NaN
 * (magnitude 0x7f) is put back afterwards.
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
    } else {                                                        /* drop 23 - mant mantissa bits, to nearest even */
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

/* n codes of a compressed `dtype` as float32 code * scale (one float32 product each). */
static inline void pf_load_row_quant(float *PF_RESTRICT dst, const void *PF_RESTRICT src, pf_dtype dtype, int64_t n,
                                     float scale) {
    const uint8_t *s = (const uint8_t *)src;
    if (dtype == PF_DTYPE_I8) {
        const int8_t *q = (const int8_t *)src;
        for (int64_t i = 0; i < n; i++) dst[i] = (float)q[i] * scale;
        return;
    }
    enum { kChunk = 64 };
    uint16_t h[kChunk];
    const int e4m3 = dtype == PF_DTYPE_F8E4M3;
    /* e4m3fn decodes to value / 256: the factor goes into the scale (a power of two: exact unless
     * the scale is within 2^8 of float32's limits, where the product would round anyway) */
    const float mul = e4m3 ? scale * 256.0f : scale;
    for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
        const int64_t m = n - i0 < kChunk ? n - i0 : kChunk;
        const uint8_t *c = s + i0;
        float *o = dst + i0;
        if (e4m3)
            for (int64_t i = 0; i < m; i++) h[i] = (uint16_t)(((c[i] & 0x80u) << 8) | ((c[i] & 0x7fu) << 7));
        else
            for (int64_t i = 0; i < m; i++) h[i] = (uint16_t)(c[i] << 8);
        pf_load_row_f32(o, h, PF_DTYPE_F16, m);
        for (int64_t i = 0; i < m; i++) o[i] *= mul;
        if (e4m3)
            for (int64_t i = 0; i < m; i++) o[i] = (c[i] & 0x7fu) == 0x7fu ? __builtin_nanf("") : o[i];
    }
}

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
