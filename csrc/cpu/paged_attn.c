/*
 * paged_attn.c - paged attention and flash decoding on the CPU.
 *
 * Layouts: see pf_paged_params in pagedflash.h. q/out are [batch, h, d]
 * (one query per sequence), [batch, q_len, h, d], or packed [total_q, h, d]
 * with cu_seqlens_q; caches are [num_blocks, block_size, hk, d]; token t of
 * sequence b lives at k_cache[block_tables[b, t / block_size], t % block_size].
 * lse is [h, total_q].
 *
 * Work items are (sequence b, KV head g, chunk of the heads sharing g, tile of
 * queries, split). One item stacks the queries of its tile for *all* query
 * heads of its group into one row block (row = head * nq + query), so every K/V
 * tile is read from the cache and converted once per group (GQA/MQA). It walks
 * the keys its rows can see in 64-token tiles with the FlashAttention online
 * softmax, using the CPU backend's shared tile routines (cpu_backend.h):
 * staging through the block table (pf_cpu_stage_kt when a tile lies in one
 * cache block, else block segments with pf_cpu_stage_rows and a transpose),
 * pf_cpu_score_tile, pf_cpu_transform_scores (softcap, ALiBi and the
 * causal/window mask with query i at position seq_len - q_len + i), the exp2
 * softmax and pf_cpu_pv_tile; the cache rows of the V tile and of the next K
 * tile are prefetched while a tile computes. Only tokens < seq_len are ever loaded, so stale
 * data (even NaN) in the unused slots of a partial block, or in blocks past the
 * sequence, never reaches a multiply.
 *
 * Compressed caches (float8, int8: pagedflash.h "Compressed KV caches"): where AVX2 / F16C
 * are compiled in, K and V are read in place, their codes converted in registers inside the
 * score and P V loops (kv_quant.h pf_quant_scores, pf_quant_pv: no staging, no transpose, a
 * quarter of float32's bytes; rows in groups of 8 and 4); elsewhere they are staged like a
 * float cache, each row's codes converted to float32 (K through rows and a transpose). Either
 * way x = code * scale is applied where it costs least: per-tensor factors (the scales,
 * e4m3fn's 256 of pf_code_unit) fold into the query (K) and the normalization of the output
 * (V), per-(token, head) scales multiply the score columns (K) and, after the softmax has
 * summed them, the probability columns (V): a few multiplies per tile row instead of one per
 * cache element. Up to float32 rounding this is attention over the dequantized cache.
 *
 * Flash decoding: with num_splits S > 1 each sequence's tiles are divided into
 * S contiguous chunks processed as separate items (parallelism when batch x
 * heads is small and sequences are long). Each writes a normalized partial
 * output and its lse to float32 scratch [total_q][h][S]; a second pass merges
 * them by log-sum-exp with pf_cpu_merge_partials (the routine behind
 * pf_merge_attn_states) and writes out and lse.
 */
#include <stdlib.h>

#include "attn_cpu.h"
#include "cpu_backend.h"
#include "kv_quant.h"

/* kBlockN must equal the 64-column tile of pf_cpu_score_tile / pf_cpu_transform_scores. */
enum { kBlockM = 64, kBlockN = 64, kMaxSplits = 256 };

typedef struct paged_ctx {
    const pf_paged_params *p;
    int64_t batch, num_heads, num_kv_heads, head_dim, dpad, block_size;
    int64_t rep;             /* query heads per KV head */
    int has_cu, q4;          /* packed layout; [batch, q_len, h, d] layout */
    int64_t q_len_dense;     /* queries per sequence without cu_seqlens_q */
    pf_rows q, out;          /* q/out rows: (b, query row, head) */
    pf_rows kc, vc;          /* cache rows: (block id, slot in block, kv head) */
    pf_dtype cdt;            /* the caches' dtype: q's, or compressed */
    pf_kv_scale ks, vs;      /* compressed caches: their scales (per-row ones used, per-tensor folded) */
    float v_mul;             /* compressed V: the per-tensor factor of the output (1 for float caches) */
    int64_t nh, n_hchunks;   /* heads per item, chunks of the group */
    int64_t nq, n_qtiles;    /* queries per item, query tiles per sequence (max) */
    int64_t splits;
    float q_scale, cap_log2;
    float *part_o;           /* [total_q][h][splits][d] when splits > 1 */
    float *part_lse;         /* [total_q][h][splits] */
    void **scratch;
} paged_ctx;

/* Sequence b: rows of q start at (b, qoff) in ctx->q, qlen queries, global query
 * index tok (for lse and partials), len tokens in the cache. */
static inline void seq_info(const paged_ctx *c, int64_t b, int64_t *qoff, int64_t *qlen, int64_t *tok, int64_t *len) {
    const pf_tensor *sl = &c->p->seq_lens;
    *len = ((const int32_t *)sl->data)[b * sl->strides[0]];
    if (c->has_cu) {
        const pf_tensor *cu = &c->p->cu_seqlens_q;
        const int32_t *cq = (const int32_t *)cu->data;
        *qoff = cq[b * cu->strides[0]];
        *qlen = cq[(b + 1) * cu->strides[0]] - *qoff;
        *tok = *qoff;
    } else if (c->q4) {
        *qoff = 0;
        *qlen = c->q_len_dense;
        *tok = b * c->q_len_dense;
    } else {
        *qoff = b;
        *qlen = 1;
        *tok = b;
    }
}

static inline int64_t block_id(const paged_ctx *c, int64_t b, int64_t t) {
    const pf_tensor *bt = &c->p->block_tables;
    return ((const int32_t *)bt->data)[b * bt->strides[0] + (t / c->block_size) * bt->strides[1]];
}

/* Tokens [j0, j0 + n) of sequence b, KV head hk, as rows dst[n][dpad] (zero padded
 * past d), one segment per cache block; compressed rows dequantized with `scale`. */
static void stage_rows_paged(const paged_ctx *c, const pf_rows *cache, int64_t b, int64_t hk, int64_t j0, int64_t n,
                             float *dst) {
    const int quant = pf_dtype_compressed(c->cdt);
    const int64_t d = c->head_dim, dpad = c->dpad;
    for (int64_t done = 0; done < n;) {
        int64_t t = j0 + done, off = t % c->block_size;
        int64_t seg = c->block_size - off < n - done ? c->block_size - off : n - done;
        const int64_t blk = block_id(c, b, t);
        if (!quant) {
            pf_cpu_stage_rows(cache, c->cdt, blk, off, hk, seg, d, dpad, dst + done * dpad);
        } else {
            for (int64_t j = 0; j < seg; j++) {
                float *row = dst + (done + j) * dpad;
                pf_load_row_codes(row, pf_row_ptr(cache, blk, off + j, hk), c->cdt, d);
                for (int64_t col = d; col < dpad; col++) row[col] = 0.0f;
            }
        }
        done += seg;
    }
}

/* The per-(token, head) scales of tokens [j0, j0 + n) of sequence b, KV head hk, into out[n]. */
static void gather_row_scales(const paged_ctx *c, const pf_kv_scale *scale, int64_t b, int64_t hk, int64_t j0,
                              int64_t n, float *out) {
    for (int64_t j = 0; j < n; j++) {
        const int64_t t = j0 + j;
        out[j] = *pf_kv_scale_ptr(scale, block_id(c, b, t), t % c->block_size, hk);
    }
}

/* The addresses of the cache rows of tokens [j0, j0 + n) of sequence b, KV head hk (compressed). */
static void rows_of_tile(const paged_ctx *c, const pf_rows *cache, int64_t b, int64_t hk, int64_t j0, int64_t n,
                         const uint8_t **rows) {
    for (int64_t j = 0; j < n; j++) {
        const int64_t t = j0 + j;
        rows[j] = (const uint8_t *)pf_row_ptr(cache, block_id(c, b, t), t % c->block_size, hk);
    }
}

/* s[r][j] *= f[j] for the tile's rows and its n columns. */
static void scale_columns(float *s, int64_t rows, int64_t n, const float *f) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < n; j++) s[r * kBlockN + j] *= f[j];
}

/* Ask for the cache rows of tokens [j0, j0 + n), KV head hk, ahead of their use. Rows
 * of one head are a few hundred bytes every num_kv_heads * head_dim elements, a pattern
 * the hardware prefetchers do not follow across pages: without this, decode is bound by
 * the latency of one row after another. */
static void prefetch_rows_paged(const paged_ctx *c, const pf_rows *cache, int64_t b, int64_t hk, int64_t j0,
                                int64_t n) {
    const int64_t row_bytes = c->head_dim * (int64_t)cache->esize;
    for (int64_t j = 0; j < n; j++) {
        int64_t t = j0 + j;
        const char *row = pf_row_ptr(cache, block_id(c, b, t), t % c->block_size, hk);
        for (int64_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(row + off, 0, 3);
    }
}

/* Tokens [j0, j0 + n) of K as kt[dpad][kBlockN], zero padded (columns >= n, rows >= d). */
static void stage_kt_paged(const paged_ctx *c, int64_t b, int64_t hk, int64_t j0, int64_t n, float *kt, float *kbuf,
                           float *rowbuf) {
    const int64_t d = c->head_dim, dpad = c->dpad;
    int64_t off = j0 % c->block_size;
    if (off + n <= c->block_size && !pf_dtype_compressed(c->cdt)) { /* the whole tile lies in one cache block */
        pf_cpu_stage_kt(&c->kc, c->cdt, block_id(c, b, j0), off, hk, n, d, dpad, kt, rowbuf);
        return;
    }
    stage_rows_paged(c, &c->kc, b, hk, j0, n, kbuf);
    for (int64_t col = 0; col < d; col++) {
        float *krow = kt + col * kBlockN;
        for (int64_t j = 0; j < n; j++) krow[j] = kbuf[j * dpad + col];
        for (int64_t j = n; j < kBlockN; j++) krow[j] = 0.0f;
    }
    for (int64_t col = d; col < dpad; col++)
        for (int64_t j = 0; j < kBlockN; j++) kt[col * kBlockN + j] = 0.0f;
}

static void paged_item(void *vctx, int64_t item, int tid) {
    const paged_ctx *c = (const paged_ctx *)vctx;
    const pf_paged_params *p = c->p;
    const int64_t d = c->head_dim, dpad = c->dpad, S = c->splits;
    const pf_dtype dt = p->q.dtype;

    int64_t rest = item;
    const int64_t sp = rest % S;
    rest /= S;
    const int64_t qt = rest % c->n_qtiles;
    rest /= c->n_qtiles;
    const int64_t hc = rest % c->n_hchunks;
    rest /= c->n_hchunks;
    const int64_t g = rest % c->num_kv_heads;
    const int64_t b = rest / c->num_kv_heads;

    int64_t qoff, qlen, tok, len;
    seq_info(c, b, &qoff, &qlen, &tok, &len);
    const int64_t i0 = qt * c->nq;
    if (i0 >= qlen) return;
    const int64_t nqr = qlen - i0 < c->nq ? qlen - i0 : c->nq;
    const int64_t h0 = g * c->rep + hc * c->nh;
    const int64_t nhr = c->rep - hc * c->nh < c->nh ? c->rep - hc * c->nh : c->nh;
    const int64_t rows = nhr * nqr, rows4 = (rows + 3) & ~(int64_t)3;

    /* tile rows: row = head * nqr + query */
    const pf_cpu_fwd_tiles tb = pf_cpu_fwd_tiles_of(c->scratch[tid], kBlockM, dpad);
    float *qf = tb.qf, *of = tb.of, *kt = tb.kt, *vt = tb.vt, *s = tb.s, *m = tb.m, *l = tb.l,
          *rowbuf = tb.rowbuf; /* vt holds K rows before the transpose */
    for (int64_t r = 0; r < rows4; r++)
        pf_cpu_fwd_start_row(&tb, r, r < rows ? pf_row_ptr(&c->q, b, qoff + i0 + r % nqr, h0 + r / nqr) : NULL, dt, d,
                             dpad, c->q_scale);

    /* this split's tokens: whole 64-token tiles, the sequence's tiles spread over S chunks */
    const int64_t tiles = (len + kBlockN - 1) / kBlockN;
    const int64_t per_split = (tiles + S - 1) / S;
    const int64_t ts = sp * per_split * kBlockN;
    const int64_t te = (sp + 1) * per_split * kBlockN < len ? (sp + 1) * per_split * kBlockN : len;

    /* the keys any row of this tile can see (bounds are monotone in the query index) */
    int64_t lo_first, hi_first, lo_last, hi_last;
    pf_mask_bounds(i0, qlen, len, p->causal, p->window_left, p->window_right, &lo_first, &hi_first);
    pf_mask_bounds(i0 + nqr - 1, qlen, len, p->causal, p->window_left, p->window_right, &lo_last, &hi_last);
    const int64_t jb = lo_first > ts ? lo_first : ts;
    const int64_t je = hi_last + 1 < te ? hi_last + 1 : te;

    pf_cpu_mask mk = pf_cpu_mask_make(qlen, len, p->causal, p->window_left, p->window_right, c->cap_log2, 0.0f);
    float slope_log2[kBlockM], colf[kBlockN];
#ifdef PF_KV_QUANT_AVX2
    const uint8_t *crow[kBlockN]; /* compressed decode: the cache rows of a tile */
#endif
    for (int64_t hh = 0; hh < nhr; hh++) slope_log2[hh] = pf_cpu_alibi_log2(&p->alibi_slopes, b, h0 + hh);

    for (int64_t j0 = jb < je ? ts + (jb - ts) / kBlockN * kBlockN : je; j0 < je; j0 += kBlockN) {
        const int64_t n = je - j0 < kBlockN ? je - j0 : kBlockN;
#ifdef PF_KV_QUANT_AVX2
        const int in_place = pf_dtype_compressed(c->cdt);
        if (in_place) { /* K read in place */
            rows_of_tile(c, &c->kc, b, g, j0, n, crow);
            prefetch_rows_paged(c, &c->vc, b, g, j0, n);
            pf_quant_scores(qf, dpad, rows, crow, n, d, c->cdt, s, kBlockN);
        } else
#endif
        {
            stage_kt_paged(c, b, g, j0, n, kt, vt, rowbuf);
            prefetch_rows_paged(c, &c->vc, b, g, j0, n);
            pf_cpu_score_tile(qf, dpad, kt, dpad, s, rows4);
        }
        if (c->ks.data) { /* per-(token, head) K scales: the score columns */
            gather_row_scales(c, &c->ks, b, g, j0, n, colf);
            scale_columns(s, rows, n, colf);
        }
        for (int64_t hh = 0; hh < nhr; hh++) {
            mk.alibi_log2 = slope_log2[hh];
            pf_cpu_transform_scores(s + hh * nqr * kBlockN, nqr, n, i0, j0, &mk);
        }
        if (!pf_cpu_softmax_tile(s, rows, rows4, m, l, of, dpad)) continue;
        if (c->vs.data) { /* per-(token, head) V scales: the probability columns (l has summed them) */
            gather_row_scales(c, &c->vs, b, g, j0, n, colf);
            scale_columns(s, rows, n, colf);
        }
        if (j0 + kBlockN < je) /* the next K tile, while this one's P V runs */
            prefetch_rows_paged(c, &c->kc, b, g, j0 + kBlockN,
                                je - j0 - kBlockN < kBlockN ? je - j0 - kBlockN : kBlockN);
#ifdef PF_KV_QUANT_AVX2
        if (in_place) { /* V read in place too */
            rows_of_tile(c, &c->vc, b, g, j0, n, crow);
            pf_quant_pv(s, kBlockN, rows, crow, n, d, dpad, c->cdt, of, dpad);
            continue;
        }
#endif
        stage_rows_paged(c, &c->vc, b, g, j0, n, vt);
        pf_cpu_pv_tile(s, kBlockN, vt, dpad, n, of, dpad, rows4, dpad);
    }

    /* normalize; store out + lse, or this split's partials */
    const pf_tensor *lt = &p->lse;
    for (int64_t r = 0; r < rows; r++) {
        const int64_t hh = r / nqr, ii = r % nqr, h = h0 + hh, i = i0 + ii;
        float *orow = of + r * dpad;
        float lse;
        if (m[r] == -__builtin_inff()) {
            for (int64_t col = 0; col < d; col++) orow[col] = 0.0f;
            lse = -__builtin_inff();
        } else {
            float inv = 1.0f / l[r] * c->v_mul;
            for (int64_t col = 0; col < d; col++) orow[col] *= inv;
            lse = (m[r] + log2f(l[r])) * PF_LN2;
        }
        if (S == 1) {
            pf_store_row_f32(pf_row_ptr(&c->out, b, qoff + i, h), orow, dt, d);
            if (pf_tensor_present(lt)) ((float *)lt->data)[h * lt->strides[0] + (tok + i) * lt->strides[1]] = lse;
        } else {
            int64_t pi = ((tok + i) * c->num_heads + h) * S + sp;
            c->part_lse[pi] = lse;
            memcpy(c->part_o + pi * d, orow, (size_t)d * sizeof(float));
        }
    }
}

/* Second pass of flash decoding: merge the S partials of every head of query `t`. */
static void merge_item(void *vctx, int64_t t, int tid) {
    (void)tid;
    const paged_ctx *c = (const paged_ctx *)vctx;
    const pf_paged_params *p = c->p;
    const int64_t d = c->head_dim, S = c->splits;
    int64_t b = 0, row = t; /* (b, row) of query t in the out view */
    if (c->q4) {
        b = t / c->q_len_dense;
        row = t % c->q_len_dense;
    }
    float buf[PF_MAX_HEAD_DIM];
    const pf_tensor *lt = &p->lse;
    for (int64_t h = 0; h < c->num_heads; h++) {
        int64_t pi = (t * c->num_heads + h) * S;
        float lse;
        pf_cpu_merge_partials(S, c->part_lse + pi, c->part_o + pi * d, d, d, buf, &lse);
        pf_store_row_f32(pf_row_ptr(&c->out, b, row, h), buf, p->q.dtype, d);
        if (pf_tensor_present(lt)) ((float *)lt->data)[h * lt->strides[0] + t * lt->strides[1]] = lse;
    }
}

/* Work items the automatic split count aims for: a fixed number, not the thread count, so
 * that the result is bitwise the same for any number of threads (the merge's order depends
 * on the split count). 64 keeps up to 32 threads busy twice over. */
#define PF_CPU_SPLIT_TARGET_ITEMS 64

/* Splits per sequence: explicit n capped by the tiles of the longest sequence;
 * 0 = enough items for PF_CPU_SPLIT_TARGET_ITEMS, each split at least 4 tiles (256 tokens)
 * so the merge stays cheap against the work it parallelizes. */
static int64_t choose_splits(const paged_ctx *c, int64_t requested) {
    int64_t max_len = 0, qtiles = 0;
    for (int64_t b = 0; b < c->batch; b++) {
        int64_t qoff, qlen, tok, len;
        seq_info(c, b, &qoff, &qlen, &tok, &len);
        if (len > max_len) max_len = len;
        qtiles += (qlen + c->nq - 1) / c->nq;
    }
    const int64_t max_tiles = (max_len + kBlockN - 1) / kBlockN;
    int64_t n;
    if (requested > 0) {
        n = requested < max_tiles ? requested : max_tiles;
    } else {
        const int64_t work = qtiles * c->num_kv_heads * c->n_hchunks;
        n = 1;
        if (work > 0 && work < PF_CPU_SPLIT_TARGET_ITEMS) {
            n = (PF_CPU_SPLIT_TARGET_ITEMS + work - 1) / work;
            if (n > max_tiles / 4) n = max_tiles / 4;
        }
    }
    if (n > kMaxSplits) n = kMaxSplits;
    return n < 1 ? 1 : n;
}

pf_status pf_cpu_paged_attn(const pf_paged_params *p) {
    paged_ctx c;
    memset(&c, 0, sizeof c);
    c.p = p;
    c.has_cu = pf_tensor_present(&p->cu_seqlens_q);
    c.q4 = p->q.ndim == 4;
    c.batch = p->block_tables.shape[0];
    c.num_heads = p->q.shape[p->q.ndim - 2];
    c.head_dim = p->q.shape[p->q.ndim - 1];
    c.num_kv_heads = p->k_cache.shape[2];
    c.block_size = p->k_cache.shape[1];
    c.rep = c.num_heads / c.num_kv_heads;
    c.q_len_dense = c.q4 ? p->q.shape[1] : 1;
    c.dpad = pf_cpu_dpad(c.head_dim);
    c.q = pf_rows_of(&p->q, !c.q4);
    c.out = pf_rows_of(&p->out, !c.q4);
    c.kc = pf_rows_of(&p->k_cache, 0);
    c.vc = pf_rows_of(&p->v_cache, 0);
    c.cdt = p->k_cache.dtype;
    c.ks = pf_kv_scale_of(&p->k_scale);
    c.vs = pf_kv_scale_of(&p->v_scale);
    if (c.rep >= kBlockM) {
        c.nh = kBlockM;
        c.nq = 1;
    } else {
        c.nh = c.rep;
        c.nq = kBlockM / c.rep;
    }
    c.n_hchunks = (c.rep + c.nh - 1) / c.nh;
    int64_t max_qlen = 0;
    for (int64_t b = 0; b < c.batch; b++) {
        int64_t qoff, qlen, tok, len;
        seq_info(&c, b, &qoff, &qlen, &tok, &len);
        if (qlen > max_qlen) max_qlen = qlen;
    }
    c.n_qtiles = (max_qlen + c.nq - 1) / c.nq;

    pf_cpu_score_scales(p->softmax_scale, p->softcap, &c.q_scale, &c.cap_log2);
    c.v_mul = 1.0f;
    if (pf_dtype_compressed(c.cdt)) { /* the per-tensor factors of x = code * scale (kv_quant.h) */
        const float unit = pf_code_unit(c.cdt);
        c.q_scale *= unit * (c.ks.data ? 1.0f : c.ks.value);
        c.v_mul = unit * (c.vs.data ? 1.0f : c.vs.value);
    }

    if (c.batch == 0 || c.n_qtiles == 0) return PF_STATUS_OK;
    c.splits = choose_splits(&c, p->num_splits);

    const int64_t total_q = c.has_cu || !c.q4 ? p->q.shape[0] : c.batch * c.q_len_dense;
    if (c.splits > 1) {
        size_t np = (size_t)total_q * (size_t)c.num_heads * (size_t)c.splits;
        c.part_lse = (float *)pf_aligned_alloc(np * sizeof(float));
        c.part_o = (float *)pf_aligned_alloc(np * (size_t)c.head_dim * sizeof(float));
        if (!c.part_lse || !c.part_o) {
            pf_aligned_free(c.part_lse);
            pf_aligned_free(c.part_o);
            PF_CHECK(0, PF_STATUS_OUT_OF_MEMORY,
                     "out of host memory for the partial results of %lld splits (num_splits)", (long long)c.splits);
        }
    }

    const int64_t items = c.batch * c.num_kv_heads * c.n_hchunks * c.n_qtiles * c.splits;
    const int nt = pf_resolve_threads(p->num_threads, items);
    pf_status st = pf_cpu_alloc_scratch(&c.scratch, nt, pf_cpu_fwd_tiles_bytes(kBlockM, c.dpad));
    if (st == PF_STATUS_OK) {
        st = pf_parallel_for(items, nt, paged_item, &c);
        pf_cpu_free_scratch(c.scratch, nt);
    }
    if (st == PF_STATUS_OK && c.splits > 1) st = pf_parallel_for(total_q, p->num_threads, merge_item, &c);
    pf_aligned_free(c.part_lse);
    pf_aligned_free(c.part_o);
    return st;
}
