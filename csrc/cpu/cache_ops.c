/*
 * cache_ops.c - KV-cache operations and the merge of attention states on the
 * CPU (params validated by csrc/core/validate_paged.c).
 *
 *   write_kv_cache   k, v [num_tokens, hk, d] -> k_cache, v_cache
 *                    [num_blocks, block_size, hk, d] at slot_mapping[t]
 *                    (= block * block_size + offset; negative = skip); rows are
 *                    copied as they are, or quantized into a compressed cache
 *                    (kv_quant.h), int8 rows with their per-(token, head) scale
 *   copy_blocks      for every cache (all layers' k and v), block dst := block
 *                    src for each (src, dst) pair of block_mapping [n, 2], in order
 *   swap_blocks      the same between two caches (host <-> host here)
 *   merge            out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b,
 *                    lse = logaddexp(lse_a, lse_b); the log-sum-exp merge is
 *                    pf_cpu_merge_partials, shared with flash decoding. out_*
 *                    [..., h, d]; every lse arrives as a view [..., h] over the
 *                    same leading dimensions (the core's pf_merge_lse_view).
 *
 * A "block" is a slice along dimension 0. Blocks whose trailing dimensions are
 * C-contiguous move with one memmove; others row by row (the last dimension is
 * always contiguous).
 */
#include <stdlib.h>

#include "attn_cpu.h"
#include "cpu_backend.h"
#include "kv_quant.h"

/* ---- log-sum-exp merge ---- */

enum { kMergeStackWeights = 256 }; /* >= the most splits paged attention uses */

void pf_cpu_merge_partials(int64_t n, const float *lse, const float *o, int64_t ldo, int64_t d, float *out,
                           float *lse_out) {
    float mx = -__builtin_inff();
    for (int64_t i = 0; i < n; i++) {
        if (lse[i] != lse[i]) { /* NaN propagates */
            for (int64_t c = 0; c < d; c++) out[c] = lse[i];
            *lse_out = lse[i];
            return;
        }
        if (lse[i] > mx) mx = lse[i];
    }
    if (mx == -__builtin_inff()) { /* no side saw a key */
        for (int64_t c = 0; c < d; c++) out[c] = 0.0f;
        *lse_out = -__builtin_inff();
        return;
    }
    /* weights relative to the largest lse; sides at -inf are skipped, never multiplied */
    float w[kMergeStackWeights];
    float *wt = n <= kMergeStackWeights ? w : NULL;
    float sum = 0.0f;
    if (wt) {
        for (int64_t i = 0; i < n; i++) {
            wt[i] = lse[i] == -__builtin_inff() ? 0.0f : expf(lse[i] - mx);
            sum += wt[i];
        }
        float inv = 1.0f / sum;
        for (int64_t c = 0; c < d; c++) {
            float acc = 0.0f;
            for (int64_t i = 0; i < n; i++)
                if (wt[i] != 0.0f) acc += wt[i] * o[i * ldo + c];
            out[c] = acc * inv;
        }
    } else { /* many sides: weights recomputed per element */
        for (int64_t i = 0; i < n; i++)
            if (lse[i] != -__builtin_inff()) sum += expf(lse[i] - mx);
        float inv = 1.0f / sum;
        for (int64_t c = 0; c < d; c++) {
            float acc = 0.0f;
            for (int64_t i = 0; i < n; i++)
                if (lse[i] != -__builtin_inff()) acc += expf(lse[i] - mx) * o[i * ldo + c];
            out[c] = acc * inv;
        }
    }
    *lse_out = mx + logf(sum);
}

typedef struct merge_ctx {
    const pf_merge_params *p;
    int64_t tokens, heads, d;
    int nlead;                    /* leading dimensions of out (tokens = their product) */
    void **scratch;               /* per thread: float [3][d] */
} merge_ctx;

/* Element offset of (token t, head h) in a [..., heads, d] tensor, or in an lse view
 * [..., heads] (backend.h: the core hands every lse over in that form). */
static int64_t lead_offset(const pf_tensor *t, int nlead, int64_t tok, int64_t h) {
    int64_t off = h * t->strides[nlead];
    for (int i = nlead - 1; i >= 0; i--) {
        off += (tok % t->shape[i]) * t->strides[i];
        tok /= t->shape[i];
    }
    return off;
}

static void merge_token(void *vctx, int64_t tok, int tid) {
    const merge_ctx *c = (const merge_ctx *)vctx;
    const pf_merge_params *p = c->p;
    const pf_dtype dt = p->out.dtype;
    const size_t es = pf_dtype_size(dt);
    float *ab = (float *)c->scratch[tid]; /* [2][d]: out_a, out_b rows */
    float *res = ab + 2 * c->d;
    for (int64_t h = 0; h < c->heads; h++) {
        float lse2[2];
        lse2[0] = ((const float *)p->lse_a.data)[lead_offset(&p->lse_a, c->nlead, tok, h)];
        lse2[1] = ((const float *)p->lse_b.data)[lead_offset(&p->lse_b, c->nlead, tok, h)];
        /* load only the sides that count: a side at -inf may hold anything (NaN) */
        if (lse2[0] != -__builtin_inff())
            pf_load_row_f32(ab, (const char *)p->out_a.data + lead_offset(&p->out_a, c->nlead, tok, h) * (int64_t)es,
                            dt, c->d);
        if (lse2[1] != -__builtin_inff())
            pf_load_row_f32(ab + c->d,
                            (const char *)p->out_b.data + lead_offset(&p->out_b, c->nlead, tok, h) * (int64_t)es, dt,
                            c->d);
        float lse;
        pf_cpu_merge_partials(2, lse2, ab, c->d, c->d, res, &lse);
        pf_store_row_f32((char *)p->out.data + lead_offset(&p->out, c->nlead, tok, h) * (int64_t)es, res, dt, c->d);
        if (pf_tensor_present(&p->lse)) ((float *)p->lse.data)[lead_offset(&p->lse, c->nlead, tok, h)] = lse;
    }
}

pf_status pf_cpu_merge_attn_states(const pf_merge_params *p) {
    merge_ctx c;
    memset(&c, 0, sizeof c);
    c.p = p;
    c.nlead = p->out.ndim - 2;
    c.heads = p->out.shape[c.nlead];
    c.d = p->out.shape[c.nlead + 1];
    c.tokens = 1;
    for (int i = 0; i < c.nlead; i++) c.tokens *= p->out.shape[i];
    if (c.tokens == 0) return PF_STATUS_OK;
    /* ~64 KiB of rows per item keeps thread start-up negligible */
    int nt = pf_resolve_threads(p->num_threads, c.tokens * c.heads * c.d / 16384 + 1);
    pf_status st = pf_cpu_alloc_scratch(&c.scratch, nt, sizeof(float) * (size_t)(3 * c.d + 16));
    if (st != PF_STATUS_OK) return st;
    st = pf_parallel_for(c.tokens, nt, merge_token, &c);
    pf_cpu_free_scratch(c.scratch, nt);
    return st;
}

/* ---- block copies ---- */

/* Rows (last-dimension runs) per block and whether a block is one contiguous run. */
static int block_contiguous(const pf_tensor *t) {
    int64_t expect = 1;
    for (int i = t->ndim - 1; i >= 1; i--) {
        if (t->shape[i] != 1 && t->strides[i] != expect) return 0;
        expect *= t->shape[i];
    }
    return 1;
}

/* dst[dblk] := src[sblk]; same block shape and dtype. */
static void copy_block(const pf_tensor *src, int64_t sblk, const pf_tensor *dst, int64_t dblk) {
    const size_t es = pf_dtype_size(src->dtype);
    const char *s = (const char *)src->data + sblk * src->strides[0] * (int64_t)es;
    char *d = (char *)dst->data + dblk * dst->strides[0] * (int64_t)es;
    if (s == d) return;
    const int nd = src->ndim;
    if (nd == 1) {
        memmove(d, s, es);
        return;
    }
    int64_t row_elems = src->shape[nd - 1];
    if (block_contiguous(src) && block_contiguous(dst)) {
        int64_t n = 1;
        for (int i = 1; i < nd; i++) n *= src->shape[i];
        memmove(d, s, (size_t)n * es);
        return;
    }
    int64_t rows = 1;
    for (int i = 1; i < nd - 1; i++) rows *= src->shape[i];
    for (int64_t r = 0; r < rows; r++) {
        int64_t so = 0, doff = 0, rest = r;
        for (int i = nd - 2; i >= 1; i--) {
            int64_t idx = rest % src->shape[i];
            rest /= src->shape[i];
            so += idx * src->strides[i];
            doff += idx * dst->strides[i];
        }
        memmove(d + doff * (int64_t)es, s + so * (int64_t)es, (size_t)row_elems * es);
    }
}

static inline int64_t mapping_at(const pf_tensor *m, int64_t i, int64_t j) {
    return ((const int64_t *)m->data)[i * m->strides[0] + j * m->strides[1]];
}

typedef struct copy_ctx {
    const pf_tensor *caches;
    pf_tensor mapping;
} copy_ctx;

static void copy_one_cache(void *vctx, int64_t c, int tid) {
    (void)tid;
    const copy_ctx *x = (const copy_ctx *)vctx;
    const pf_tensor *t = &x->caches[c];
    for (int64_t i = 0; i < x->mapping.shape[0]; i++)
        copy_block(t, mapping_at(&x->mapping, i, 0), t, mapping_at(&x->mapping, i, 1));
}

pf_status pf_cpu_copy_blocks(const pf_tensor *caches, int32_t num_caches, pf_tensor block_mapping, void *stream) {
    (void)stream;
    if (num_caches == 0 || block_mapping.shape[0] == 0) return PF_STATUS_OK;
    copy_ctx x = {caches, block_mapping};
    /* one cache per item: the pairs of one cache stay in order */
    return pf_parallel_for(num_caches, 0, copy_one_cache, &x);
}

pf_status pf_cpu_swap_blocks(pf_tensor src, pf_tensor dst, pf_tensor block_mapping, void *stream) {
    (void)stream;
    for (int64_t i = 0; i < block_mapping.shape[0]; i++)
        copy_block(&src, mapping_at(&block_mapping, i, 0), &dst, mapping_at(&block_mapping, i, 1));
    return PF_STATUS_OK;
}

/* ---- write_kv_cache ---- */

typedef struct write_ctx {
    pf_tensor k, v, kc, vc, slots;
    pf_kv_scale ks, vs; /* compressed caches */
    int64_t per_item;   /* tokens per item */
} write_ctx;

enum { kQuantChunk = 256 }; /* float32 values a compressed row is converted in */

/* Row x (d values of a float dtype) into cache row `dst` of compressed `cdt`: with a per-(token,
 * head) scale, the row's scale max|x| / 127 (1 where that is 0: an all-zero row) is computed and
 * stored first.
 * x is finite (validated). */
static void write_row_quant(char *dst, const char *x, pf_dtype xdt, pf_dtype cdt, int64_t d, float *row_scale,
                            float scale) {
    float buf[kQuantChunk];
    const size_t xes = pf_dtype_size(xdt);
    if (row_scale) {
        float amax = 0.0f;
        for (int64_t c0 = 0; c0 < d; c0 += kQuantChunk) {
            const int64_t m = d - c0 < kQuantChunk ? d - c0 : kQuantChunk;
            pf_load_row_f32(buf, x + c0 * (int64_t)xes, xdt, m);
            for (int64_t i = 0; i < m; i++) amax = fabsf(buf[i]) > amax ? fabsf(buf[i]) : amax;
        }
        scale = amax / PF_I8_MAX;
        if (scale == 0.0f) scale = 1.0f; /* an all-zero row (or one that small) */
        *row_scale = scale;
    }
    for (int64_t c0 = 0; c0 < d; c0 += kQuantChunk) {
        const int64_t m = d - c0 < kQuantChunk ? d - c0 : kQuantChunk;
        pf_load_row_f32(buf, x + c0 * (int64_t)xes, xdt, m);
        pf_store_row_quant(dst + c0, buf, cdt, m, scale);
    }
}

static void write_tokens(void *vctx, int64_t item, int tid) {
    (void)tid;
    const write_ctx *w = (const write_ctx *)vctx;
    const pf_dtype cdt = w->kc.dtype, xdt = w->k.dtype;
    const int quant = pf_dtype_compressed(cdt);
    const size_t es = pf_dtype_size(cdt), xes = pf_dtype_size(xdt);
    const int64_t bs = w->kc.shape[1], hk = w->kc.shape[2], d = w->kc.shape[3];
    const int64_t t_end = (item + 1) * w->per_item < w->k.shape[0] ? (item + 1) * w->per_item : w->k.shape[0];
    const int64_t *sm = (const int64_t *)w->slots.data;
    for (int64_t t = item * w->per_item; t < t_end; t++) {
        int64_t slot = sm[t * w->slots.strides[0]];
        if (slot < 0) continue;
        int64_t blk = slot / bs, off = slot % bs;
        for (int64_t h = 0; h < hk; h++) {
            char *kd = (char *)w->kc.data +
                       (blk * w->kc.strides[0] + off * w->kc.strides[1] + h * w->kc.strides[2]) * (int64_t)es;
            char *vd = (char *)w->vc.data +
                       (blk * w->vc.strides[0] + off * w->vc.strides[1] + h * w->vc.strides[2]) * (int64_t)es;
            const char *ks = (const char *)w->k.data + (t * w->k.strides[0] + h * w->k.strides[1]) * (int64_t)xes;
            const char *vs = (const char *)w->v.data + (t * w->v.strides[0] + h * w->v.strides[1]) * (int64_t)xes;
            if (!quant) {
                memcpy(kd, ks, (size_t)d * es);
                memcpy(vd, vs, (size_t)d * es);
                continue;
            }
            write_row_quant(kd, ks, xdt, cdt, d, w->ks.data ? pf_kv_scale_ptr(&w->ks, blk, off, h) : NULL, w->ks.value);
            write_row_quant(vd, vs, xdt, cdt, d, w->vs.data ? pf_kv_scale_ptr(&w->vs, blk, off, h) : NULL, w->vs.value);
        }
    }
}

pf_status pf_cpu_write_kv_cache(pf_tensor k, pf_tensor v, pf_tensor k_cache, pf_tensor v_cache, pf_tensor slot_mapping,
                                pf_tensor k_scale, pf_tensor v_scale, void *stream) {
    (void)stream;
    write_ctx w = {k, v, k_cache, v_cache, slot_mapping, pf_kv_scale_of(&k_scale), pf_kv_scale_of(&v_scale), 0};
    const int64_t tokens = k.shape[0];
    if (tokens == 0) return PF_STATUS_OK;
    /* items of ~256 KiB of k + v rows: small writes (decode) stay on this thread */
    const int64_t bytes_per_token = 2 * k.shape[1] * k.shape[2] * (int64_t)pf_dtype_size(k.dtype);
    w.per_item = (int64_t)(256 * 1024) / (bytes_per_token > 0 ? bytes_per_token : 1);
    if (w.per_item < 1) w.per_item = 1;
    const int64_t items = (tokens + w.per_item - 1) / w.per_item;
    return pf_parallel_for(items, 0, write_tokens, &w);
}
