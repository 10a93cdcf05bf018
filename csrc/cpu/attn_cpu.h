/*
 * attn_cpu.h - pieces shared by the CPU attention kernels (forward, backward,
 * paged): the resolved problem description, row addressing for dense and
 * packed layouts, per-row mask bounds, and the vectorized exp2.
 *
 * Scores are kept in the log2 domain: the kernels fold log2(e) into the scale
 * (or into the softcap factor and ALiBi slope) so the softmax needs exp2 only.
 */
#ifndef PF_ATTN_CPU_H
#define PF_ATTN_CPU_H

#include "cpu_common.h"

/* GCC/Clang vector of 16 floats: one zmm on AVX-512, split on narrower ISAs. */
typedef float pf_vf __attribute__((vector_size(64), aligned(64)));
#define PF_VW 16
/* The same vector type at 4-byte alignment, for loads straight from user tensors. */
typedef float pf_vfu __attribute__((vector_size(64), aligned(4)));

/* Where the rows of one tensor live: the token index is the absolute packed
 * index for varlen (batch stride 0) and the per-sequence index otherwise. */
typedef struct pf_rows {
    char *data;
    int64_t sb, st, sh; /* element strides: batch, token, head */
    size_t esize;
} pf_rows;

static inline char *pf_row_ptr(const pf_rows *r, int64_t b, int64_t tok, int64_t h) {
    return r->data + (b * r->sb + tok * r->st + h * r->sh) * (int64_t)r->esize;
}

/* The shape of one attention problem after validation. */
typedef struct pf_attn_shape {
    int64_t batch, seqlen_q, seqlen_k; /* seqlen_* are maxima for varlen */
    int64_t num_heads, num_kv_heads, head_dim;
    int varlen;
    const int32_t *cu_q, *cu_k; /* host pointers, varlen only */
} pf_attn_shape;

/* Fill `shape` from validated params (dense or varlen). */
void pf_attn_shape_from_params(const pf_attn_params *p, pf_attn_shape *shape);
/* Row view of a [b, s, h, d] (dense) or [t, h, d] (varlen) tensor. */
pf_rows pf_rows_of(const pf_tensor *t, int varlen);

/* Start token (absolute for varlen, 0 otherwise) and length of sequence b. */
static inline void pf_seq_bounds(const pf_attn_shape *s, int64_t b, int64_t *q0, int64_t *sq, int64_t *k0,
                                 int64_t *sk) {
    if (s->varlen) {
        *q0 = s->cu_q[b];
        *sq = s->cu_q[b + 1] - s->cu_q[b];
        *k0 = s->cu_k[b];
        *sk = s->cu_k[b + 1] - s->cu_k[b];
    } else {
        *q0 = 0;
        *sq = s->seqlen_q;
        *k0 = 0;
        *sk = s->seqlen_k;
    }
}

/* The lse entry of query row i of sequence b, head h: lse is f32 [batch, num_heads, seqlen_q]
 * (dense) or [num_heads, total_q] (varlen, where q0 is the sequence's first packed row). */
static inline float *pf_lse_ptr(const pf_tensor *lse, int varlen, int64_t b, int64_t h, int64_t q0, int64_t i) {
    float *base = (float *)lse->data;
    if (varlen) return base + h * lse->strides[0] + (q0 + i) * lse->strides[1];
    return base + b * lse->strides[0] + h * lse->strides[1] + i * lse->strides[2];
}

/* Inclusive key range [lo, hi] that query row i (of sq rows, sk keys) may see.
 * Empty when lo > hi. */
static inline void pf_mask_bounds(int64_t i, int64_t sq, int64_t sk, int causal, int64_t left, int64_t right,
                                  int64_t *lo, int64_t *hi) {
    int64_t diag = i + sk - sq;
    int64_t l = 0, h = sk - 1;
    if (left >= 0 && diag - left > l) l = diag - left;
    if (causal) right = 0;
    if ((causal || right >= 0) && diag + right < h) h = diag + right;
    *lo = l;
    *hi = h;
}

typedef int32_t pf_vi __attribute__((vector_size(64), aligned(64)));

/* mask ? a : b, lane by lane (mask lanes are 0 or -1, as comparisons give). */
static inline pf_vf pf_select(pf_vi mask, pf_vf a, pf_vf b) {
    pf_vi ia, ib;
    memcpy(&ia, &a, sizeof ia);
    memcpy(&ib, &b, sizeof ib);
    pf_vi r = (mask & ia) | (~mask & ib);
    pf_vf out;
    memcpy(&out, &r, sizeof out);
    return out;
}

static inline pf_vf pf_splat(float x) { return (pf_vf){0} + x; }

/* exp2 for a vector, accurate to a few ulp; inputs below -126 flush to about
 * 1e-38 (and -inf to exactly 0); NaN propagates. */
static inline pf_vf pf_exp2_v(pf_vf x) {
    pf_vf xc = pf_select(x < -126.0f, pf_splat(-126.0f), x); /* NaN compares false: kept */
    pf_vf fl = xc + 12582912.0f - 12582912.0f;                /* round to nearest */
    pf_vf f = xc - fl;                                        /* in [-0.5, 0.5] */
    pf_vf p = pf_splat(1.535336188319500e-4f);
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.0f;
    pf_vi n = __builtin_convertvector(fl, pf_vi);
    pf_vi bits = (n + 127) << 23;
    pf_vf scale;
    memcpy(&scale, &bits, sizeof scale);
    return pf_select(x == -__builtin_inff(), pf_splat(0.0f), p * scale);
}

static inline float pf_exp2_s(float x) {
    pf_vf v = (pf_vf){0} + x;
    return pf_exp2_v(v)[0];
}

#endif /* PF_ATTN_CPU_H */
