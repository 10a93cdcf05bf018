/*
 * common.c - CPU backend plumbing: problem shapes from params, row views,
 * aligned scratch buffers.
 */
#define _POSIX_C_SOURCE 200809L /* posix_memalign */
#include <stdlib.h>

#include "cpu_backend.h"
#include "kv_quant.h"

/* kv_quant.h: the float32 bits of every float8 code, computed by the compiler */
#define PF_X4(F, b) F((b)), F((b) + 1), F((b) + 2), F((b) + 3)
#define PF_X16(F, b) PF_X4(F, b), PF_X4(F, (b) + 4), PF_X4(F, (b) + 8), PF_X4(F, (b) + 12)
#define PF_X64(F, b) PF_X16(F, b), PF_X16(F, (b) + 16), PF_X16(F, (b) + 32), PF_X16(F, (b) + 48)
#define PF_X256(F) PF_X64(F, 0u), PF_X64(F, 64u), PF_X64(F, 128u), PF_X64(F, 192u)
const uint32_t pf_fp8_f32_bits[2][256] = {{PF_X256(PF_E4M3_BITS)}, {PF_X256(PF_E5M2_BITS)}};

void pf_attn_shape_from_params(const pf_attn_params *p, pf_attn_shape *s) {
    memset(s, 0, sizeof *s);
    s->varlen = pf_tensor_present(&p->cu_seqlens_q);
    if (s->varlen) {
        s->batch = p->cu_seqlens_q.shape[0] - 1;
        s->num_heads = p->q.shape[1];
        s->num_kv_heads = p->k.shape[1];
        s->head_dim = p->q.shape[2];
        s->cu_q = (const int32_t *)p->cu_seqlens_q.data;
        s->cu_k = (const int32_t *)p->cu_seqlens_k.data;
        /* the true maxima (max_seqlen_* are only hints on the CPU) */
        for (int64_t b = 0; b < s->batch; b++) {
            int64_t lq = s->cu_q[b + 1] - s->cu_q[b], lk = s->cu_k[b + 1] - s->cu_k[b];
            if (lq > s->seqlen_q) s->seqlen_q = lq;
            if (lk > s->seqlen_k) s->seqlen_k = lk;
        }
    } else {
        s->batch = p->q.shape[0];
        s->seqlen_q = p->q.shape[1];
        s->seqlen_k = p->k.shape[1];
        s->num_heads = p->q.shape[2];
        s->num_kv_heads = p->k.shape[2];
        s->head_dim = p->q.shape[3];
    }
}

pf_rows pf_rows_of(const pf_tensor *t, int varlen) {
    pf_rows r;
    r.data = (char *)t->data;
    r.esize = pf_dtype_size(t->dtype);
    if (varlen) {
        r.sb = 0;
        r.st = t->strides[0];
        r.sh = t->strides[1];
    } else {
        r.sb = t->strides[0];
        r.st = t->strides[1];
        r.sh = t->strides[2];
    }
    return r;
}

void *pf_aligned_alloc(size_t bytes) {
    void *p = NULL;
    if (posix_memalign(&p, 64, bytes ? (bytes + 63) / 64 * 64 : 64) != 0) return NULL;
    return p;
}

void pf_aligned_free(void *p) { free(p); }

pf_status pf_cpu_alloc_scratch(void ***bufs, int n, size_t bytes) {
    void **b = (void **)calloc((size_t)n, sizeof(void *));
    PF_CHECK(b != NULL, PF_STATUS_OUT_OF_MEMORY, "out of host memory for scratch pointers");
    for (int i = 0; i < n; i++) {
        b[i] = pf_aligned_alloc(bytes);
        if (!b[i]) {
            pf_cpu_free_scratch(b, n);
            PF_CHECK(0, PF_STATUS_OUT_OF_MEMORY, "out of host memory: %zu bytes of scratch per thread", bytes);
        }
    }
    *bufs = b;
    return PF_STATUS_OK;
}

void pf_cpu_free_scratch(void **bufs, int n) {
    if (!bufs) return;
    for (int i = 0; i < n; i++) pf_aligned_free(bufs[i]);
    free(bufs);
}

float pf_cpu_score_scales(float softmax_scale, float softcap, float *q_scale, float *cap_log2) {
    const float scale = softmax_scale;
    if (softcap > 0.0f) {
        *q_scale = scale / softcap;
        *cap_log2 = softcap * PF_LOG2E;
    } else {
        *q_scale = scale * PF_LOG2E;
        *cap_log2 = 0.0f;
    }
    return scale;
}

float pf_cpu_alibi_log2(const pf_tensor *slopes, int64_t b, int64_t h) {
    if (!pf_tensor_present(slopes)) return 0.0f;
    int64_t off = slopes->ndim == 2 ? b * slopes->strides[0] + h * slopes->strides[1] : h * slopes->strides[0];
    return ((const float *)slopes->data)[off] * PF_LOG2E;
}

pf_cpu_mask pf_cpu_mask_make(int64_t sq, int64_t sk, int causal, int64_t left, int64_t right, float cap_log2,
                             float alibi_log2) {
    pf_cpu_mask mk;
    memset(&mk, 0, sizeof mk);
    mk.sq = sq;
    mk.sk = sk;
    mk.causal = causal;
    mk.left = left;
    mk.right = right;
    mk.cap_log2 = cap_log2;
    mk.alibi_log2 = alibi_log2;
    return mk;
}

size_t pf_cpu_fwd_tiles_bytes(int64_t rows, int64_t dpad) {
    return sizeof(float) *
           (size_t)(2 * rows * dpad + 2 * dpad * PF_CPU_BLOCK_N + rows * PF_CPU_BLOCK_N + 2 * rows + dpad + 64);
}

pf_cpu_fwd_tiles pf_cpu_fwd_tiles_of(void *scratch, int64_t rows, int64_t dpad) {
    pf_cpu_fwd_tiles t;
    t.qf = (float *)scratch;
    t.of = t.qf + rows * dpad;
    t.kt = t.of + rows * dpad;
    t.vt = t.kt + dpad * PF_CPU_BLOCK_N;
    t.s = t.vt + PF_CPU_BLOCK_N * dpad;
    t.m = t.s + rows * PF_CPU_BLOCK_N;
    t.l = t.m + rows;
    t.rowbuf = t.l + rows;
    return t;
}

void pf_cpu_fwd_start_row(const pf_cpu_fwd_tiles *t, int64_t r, const void *src, pf_dtype dt, int64_t d, int64_t dpad,
                          float q_scale) {
    float *qr = t->qf + r * dpad;
    if (src) {
        pf_load_row_f32(qr, src, dt, d);
        for (int64_t c = 0; c < d; c++) qr[c] *= q_scale;
    } else {
        for (int64_t c = 0; c < d; c++) qr[c] = 0.0f;
    }
    for (int64_t c = d; c < dpad; c++) qr[c] = 0.0f;
    for (int64_t c = 0; c < dpad; c++) t->of[r * dpad + c] = 0.0f;
    t->m[r] = -__builtin_inff();
    t->l[r] = 0.0f;
}
