/*
 * flash_fwd.c - FlashAttention forward pass on the CPU.
 *
 * Layouts: see pf_attn_params in pagedflash.h (dense [b, s, h, d] or packed
 * varlen [t, h, d]); lse is [b, h, sq] (dense) or [h, total_q] (varlen).
 *
 * Algorithm (Dao et al., FlashAttention, 2022): the work is split into items
 * (batch, head, tile of kBlockM query rows). Each item loads its query tile into
 * float32 (scaled so scores are in the log2 domain), then walks the key/value
 * sequence in tiles of kBlockN: S = Q K^T for the tile, masks and transforms
 * (softcap, ALiBi, causal/window), the online softmax (running row max m and
 * row sum l, rescaling the partial output by exp2(m_old - m_new)) and O += P V.
 * The full score matrix is never stored. Finally O /= l and lse = (m + log2 l) ln 2.
 *
 * The inner products are register-blocked micro-kernels on 16-float vectors:
 * S uses 4 query rows x 64 key columns (16 accumulators) over K^T staged
 * [d][kBlockN]; PV uses 4 rows x up to 64 output columns over V staged
 * [kBlockN][d]. Dropout (Philox, pagedflash_philox.h) scales kept probabilities by
 * 1 / (1 - p) after the row sum, so lse describes the undropped softmax.
 */
#include <stdlib.h>

#include "attn_cpu.h"
#include "cpu_backend.h"
#include "pagedflash_philox.h"

/* 128 x 64 tiles: 1.3x faster than 64 x 64 at d=64, s=2048, f32, 1 thread on this
 * 2-core AVX-512 machine (the K^T staging is shared by twice the rows). */
enum { kBlockM = 128, kBlockN = 64 };
_Static_assert(kBlockN == PF_CPU_BLOCK_N, "score rows are kBlockN floats wide in every CPU kernel (cpu_backend.h)");

typedef struct fwd_ctx {
    const pf_attn_params *p;
    pf_attn_shape shape;
    pf_rows q, k, v, out;
    int64_t dpad;      /* head_dim rounded up to a multiple of 16 */
    int64_t n_mtiles;  /* query tiles per sequence (max over batch) */
    float q_scale;     /* folded into Q: scale * log2e, or scale / softcap */
    float cap_log2;    /* softcap * log2e (0 when off) */
    void **scratch;    /* one buffer per thread */
    size_t scratch_bytes;
} fwd_ctx;

/* S[4 rows][64 cols] = Q[4 rows][:] . Kt[:][64 cols] over dpad. */
static inline void score_micro(const float *q, int64_t ldq, const float *kt, int64_t dpad, float *s, int64_t lds) {
    pf_vf a00 = {0}, a01 = {0}, a02 = {0}, a03 = {0};
    pf_vf a10 = {0}, a11 = {0}, a12 = {0}, a13 = {0};
    pf_vf a20 = {0}, a21 = {0}, a22 = {0}, a23 = {0};
    pf_vf a30 = {0}, a31 = {0}, a32 = {0}, a33 = {0};
    /* clang-format off: one line per register row */
    for (int64_t c = 0; c < dpad; c++) {
        const pf_vf *krow = (const pf_vf *)(kt + c * kBlockN);
        pf_vf k0 = krow[0], k1 = krow[1], k2 = krow[2], k3 = krow[3];
        float q0 = q[c], q1 = q[ldq + c], q2 = q[2 * ldq + c], q3 = q[3 * ldq + c];
        a00 += q0 * k0;
        a01 += q0 * k1;
        a02 += q0 * k2;
        a03 += q0 * k3;
        a10 += q1 * k0;
        a11 += q1 * k1;
        a12 += q1 * k2;
        a13 += q1 * k3;
        a20 += q2 * k0;
        a21 += q2 * k1;
        a22 += q2 * k2;
        a23 += q2 * k3;
        a30 += q3 * k0;
        a31 += q3 * k1;
        a32 += q3 * k2;
        a33 += q3 * k3;
    }
    pf_vf *s0 = (pf_vf *)s, *s1 = (pf_vf *)(s + lds), *s2 = (pf_vf *)(s + 2 * lds), *s3 = (pf_vf *)(s + 3 * lds);
    s0[0] = a00;
    s0[1] = a01;
    s0[2] = a02;
    s0[3] = a03;
    s1[0] = a10;
    s1[1] = a11;
    s1[2] = a12;
    s1[3] = a13;
    s2[0] = a20;
    s2[1] = a21;
    s2[2] = a22;
    s2[3] = a23;
    s3[0] = a30;
    s3[1] = a31;
    s3[2] = a32;
    s3[3] = a33;
    /* clang-format on */
}

/* O[4 rows][NV*16 cols] += P[4 rows][0..n) . V[0..n)[NV*16 cols]. */
static inline __attribute__((always_inline)) void pv_micro(const float *pm, int64_t ldp, const float *vt, int64_t ldv,
                                                           int64_t n, float *o, int64_t ldo, const int NV) {
    pf_vf acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < NV; c++) acc[r][c] = ((const pf_vf *)(o + r * ldo))[c];
    for (int64_t j = 0; j < n; j++) {
        const pf_vfu *vrow = (const pf_vfu *)(vt + j * ldv);
        float p0 = pm[j], p1 = pm[ldp + j], p2 = pm[2 * ldp + j], p3 = pm[3 * ldp + j];
        for (int c = 0; c < NV; c++) {
            pf_vf vv = vrow[c];
            acc[0][c] += p0 * vv;
            acc[1][c] += p1 * vv;
            acc[2][c] += p2 * vv;
            acc[3][c] += p3 * vv;
        }
    }
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < NV; c++) ((pf_vf *)(o + r * ldo))[c] = acc[r][c];
}

/* O[rows][dpad] += P[rows][n] V[n][dpad], in column blocks of up to 64. */
void pf_cpu_pv_tile(const float *pm, int64_t ldp, const float *vt, int64_t ldv, int64_t n, float *o, int64_t ldo,
                    int64_t rows, int64_t dpad) {
    for (int64_t r = 0; r < rows; r += 4) {
        for (int64_t c0 = 0; c0 < dpad; c0 += 64) {
            int64_t nv = (dpad - c0) / PF_VW;
            if (nv > 4) nv = 4;
            const float *pr = pm + r * ldp;
            float *orow = o + r * ldo + c0;
            switch (nv) {
                case 4: pv_micro(pr, ldp, vt + c0, ldv, n, orow, ldo, 4); break;
                case 3: pv_micro(pr, ldp, vt + c0, ldv, n, orow, ldo, 3); break;
                case 2: pv_micro(pr, ldp, vt + c0, ldv, n, orow, ldo, 2); break;
                default: pv_micro(pr, ldp, vt + c0, ldv, n, orow, ldo, 1); break;
            }
        }
    }
}

/* S[rows][kBlockN] = Q[rows][dpad] Kt[dpad][kBlockN]. */
void pf_cpu_score_tile(const float *q, int64_t ldq, const float *kt, int64_t dpad, float *s, int64_t rows) {
    for (int64_t r = 0; r < rows; r += 4) score_micro(q + r * ldq, ldq, kt, dpad, s + r * kBlockN, kBlockN);
}

/* Stage rows [j0, j0 + n) of K transposed into kt[dpad][kBlockN] (zero padded). */
void pf_cpu_stage_kt(const pf_rows *k, pf_dtype dt, int64_t b, int64_t tok0, int64_t h, int64_t n, int64_t d,
                     int64_t dpad, float *kt, float *rowbuf) {
    for (int64_t j = 0; j < kBlockN; j++) {
        if (j < n) {
            const void *src = pf_row_ptr(k, b, tok0 + j, h);
            const float *row = (const float *)src;
            if (dt != PF_DTYPE_F32) {
                pf_load_row_f32(rowbuf, src, dt, d);
                row = rowbuf;
            }
            for (int64_t c = 0; c < d; c++) kt[c * kBlockN + j] = row[c];
        } else {
            for (int64_t c = 0; c < d; c++) kt[c * kBlockN + j] = 0.0f;
        }
    }
    for (int64_t c = d; c < dpad; c++)
        for (int64_t j = 0; j < kBlockN; j++) kt[c * kBlockN + j] = 0.0f;
}

/* Stage rows [j0, j0 + n) of V (or any [n][d] rows) into vt[kBlockN][dpad]. */
void pf_cpu_stage_rows(const pf_rows *v, pf_dtype dt, int64_t b, int64_t tok0, int64_t h, int64_t n, int64_t d,
                       int64_t dpad, float *vt) {
    for (int64_t j = 0; j < n; j++) {
        float *dst = vt + j * dpad;
        const void *src = pf_row_ptr(v, b, tok0 + j, h);
        if (dt == PF_DTYPE_F32) {
            const float *row = (const float *)src;
            for (int64_t c = 0; c < d; c++) dst[c] = row[c];
        } else {
            pf_load_row_f32(dst, src, dt, d);
        }
        for (int64_t c = d; c < dpad; c++) dst[c] = 0.0f;
    }
}

void pf_cpu_transform_scores(float *s, int64_t rows, int64_t n, int64_t i0, int64_t j0, const pf_cpu_mask *mk) {
    /* lane offsets 0..15 as floats: key distances are small integers, exact in float */
    pf_vf lane;
    for (int c = 0; c < PF_VW; c++) lane[c] = (float)c;
    for (int64_t r = 0; r < rows; r++) {
        float *srow = s + r * kBlockN;
        int64_t i = i0 + r;
        if (mk->cap_log2 != 0.0f)
            for (int64_t j = 0; j < n; j++) srow[j] = mk->cap_log2 * tanhf(srow[j]);
        if (mk->alibi_log2 != 0.0f) {
            /* s -= slope * |i + sk - sq - j| */
            const float rel = (float)(i + mk->sk - mk->sq - j0);
            const pf_vf vs = pf_splat(mk->alibi_log2);
            for (int c = 0; c < kBlockN / PF_VW; c++) {
                pf_vf dist = pf_splat(rel) - (lane + (float)(c * PF_VW));
                dist = pf_select(dist < 0.0f, -dist, dist);
                ((pf_vf *)srow)[c] -= vs * dist;
            }
        }
        /* visible keys of this row, local to the tile: [a, e) */
        int64_t a = 0, e = 0;
        if (i < mk->sq) { /* else a padding row: nothing visible */
            int64_t lo, hi;
            pf_mask_bounds(i, mk->sq, mk->sk, mk->causal, mk->left, mk->right, &lo, &hi);
            a = lo - j0 > 0 ? lo - j0 : 0;
            e = hi - j0 + 1 < n ? hi - j0 + 1 : n;
            if (e < a) e = a;
        }
        for (int64_t j = 0; j < a && j < kBlockN; j++) srow[j] = -__builtin_inff();
        for (int64_t j = e > 0 ? e : 0; j < kBlockN; j++) srow[j] = -__builtin_inff();
    }
}

int64_t pf_cpu_softmax_tile(float *s, int64_t rows, int64_t rows4, float *m, float *l, float *of, int64_t dpad) {
    int64_t nvalid = 0;
    for (int64_t r = 0; r < rows; r++) {
        pf_vf *sv = (pf_vf *)(s + r * kBlockN);
        pf_vf vmax = pf_select(sv[0] > sv[1], sv[0], sv[1]);
        pf_vf vmax2 = pf_select(sv[2] > sv[3], sv[2], sv[3]);
        vmax = pf_select(vmax > vmax2, vmax, vmax2);
        pf_vi nan = (sv[0] != sv[0]) | (sv[1] != sv[1]) | (sv[2] != sv[2]) | (sv[3] != sv[3]);
        float mx = m[r];
        for (int c = 0; c < PF_VW; c++) mx = vmax[c] > mx ? vmax[c] : mx;
        int has_nan = 0;
        for (int c = 0; c < PF_VW; c++) has_nan |= nan[c];
        if (has_nan) mx = __builtin_nanf(""); /* NaN anywhere in the row propagates */
        if (mx == -__builtin_inff()) {        /* nothing visible yet in this row */
            sv[0] = sv[1] = sv[2] = sv[3] = pf_splat(0.0f);
            continue;
        }
        float alpha = pf_exp2_s(m[r] - mx);
        pf_vf vmx = pf_splat(mx);
        pf_vf e0 = pf_exp2_v(sv[0] - vmx), e1 = pf_exp2_v(sv[1] - vmx);
        pf_vf e2 = pf_exp2_v(sv[2] - vmx), e3 = pf_exp2_v(sv[3] - vmx);
        sv[0] = e0;
        sv[1] = e1;
        sv[2] = e2;
        sv[3] = e3;
        pf_vf vsum = (e0 + e1) + (e2 + e3);
        float sum = 0.0f;
        for (int c = 0; c < PF_VW; c++) sum += vsum[c];
        l[r] = l[r] * alpha + sum;
        m[r] = mx;
        if (alpha != 1.0f) {
            pf_vf va = pf_splat(alpha);
            pf_vf *orow = (pf_vf *)(of + r * dpad);
            for (int64_t c = 0; c < dpad / PF_VW; c++) orow[c] *= va;
        }
        nvalid++;
    }
    /* padding rows of the micro-kernels carry zeros */
    for (int64_t r = rows; r < rows4; r++)
        for (int64_t j = 0; j < kBlockN; j++) s[r * kBlockN + j] = 0.0f;
    return nvalid;
}

static void fwd_item(void *vctx, int64_t item, int tid) {
    fwd_ctx *ctx = (fwd_ctx *)vctx;
    const pf_attn_params *p = ctx->p;
    const pf_attn_shape *sh = &ctx->shape;
    const int64_t d = sh->head_dim, dpad = ctx->dpad;
    const pf_dtype dt = p->q.dtype;

    int64_t mt = item % ctx->n_mtiles;
    int64_t bh = item / ctx->n_mtiles;
    int64_t h = bh % sh->num_heads, b = bh / sh->num_heads;
    int64_t hk = h / (sh->num_heads / sh->num_kv_heads);

    int64_t q0, sq, k0, sk;
    pf_seq_bounds(sh, b, &q0, &sq, &k0, &sk);
    int64_t i0 = mt * kBlockM;
    if (i0 >= sq) return;
    int64_t rows = sq - i0 < kBlockM ? sq - i0 : kBlockM;
    int64_t rows4 = (rows + 3) & ~(int64_t)3;

    const pf_cpu_fwd_tiles tiles = pf_cpu_fwd_tiles_of(ctx->scratch[tid], kBlockM, dpad);
    float *qf = tiles.qf, *of = tiles.of, *kt = tiles.kt, *vt = tiles.vt, *s = tiles.s, *m = tiles.m, *l = tiles.l,
          *rowbuf = tiles.rowbuf;
    for (int64_t r = 0; r < rows4; r++)
        pf_cpu_fwd_start_row(&tiles, r, r < rows ? pf_row_ptr(&ctx->q, b, q0 + i0 + r, h) : NULL, dt, d, dpad,
                             ctx->q_scale);

    const pf_cpu_mask mk = pf_cpu_mask_make(sq, sk, p->causal, p->window_left, p->window_right, ctx->cap_log2,
                                            pf_cpu_alibi_log2(&p->alibi_slopes, b, h));

    /* The key range this tile can see at all. */
    int64_t lo_first, hi_first, lo_last, hi_last;
    pf_mask_bounds(i0, sq, sk, p->causal, p->window_left, p->window_right, &lo_first, &hi_first);
    pf_mask_bounds(i0 + rows - 1, sq, sk, p->causal, p->window_left, p->window_right, &lo_last, &hi_last);
    int64_t j_begin = lo_first < 0 ? 0 : lo_first;
    int64_t j_end = (hi_last + 1 < sk ? hi_last + 1 : sk);

    const uint32_t drop_threshold = pf_dropout_threshold(p->dropout_p);
    const float drop_scale = p->dropout_p > 0.0f ? 1.0f / (1.0f - p->dropout_p) : 1.0f;
    const uint64_t bh_id = (uint64_t)(b * sh->num_heads + h);

    for (int64_t j0 = (j_begin / kBlockN) * kBlockN; j0 < j_end; j0 += kBlockN) {
        int64_t n = sk - j0 < kBlockN ? sk - j0 : kBlockN;
        pf_cpu_stage_kt(&ctx->k, dt, b, k0 + j0, hk, n, d, dpad, kt, rowbuf);
        pf_cpu_score_tile(qf, dpad, kt, dpad, s, rows4);
        /* rows see ranges that grow with i: the tile needs no mask when the first row
         * reaches past its end and the last row starts before it */
        int full = n == kBlockN && hi_first >= j0 + kBlockN - 1 && lo_last <= j0;
        if (!full || mk.cap_log2 != 0.0f || mk.alibi_log2 != 0.0f) pf_cpu_transform_scores(s, rows, n, i0, j0, &mk);

        int64_t nvalid = pf_cpu_softmax_tile(s, rows, rows4, m, l, of, dpad);
        if (drop_threshold && nvalid) {
            for (int64_t r = 0; r < rows; r++) {
                float *srow = s + r * kBlockN;
                int64_t i = i0 + r;
                for (int64_t j = 0; j < n; j += 4) {
                    pf_u32x4 bits = pf_dropout_bits4(p->seed, p->offset, bh_id, i, j0 + j);
                    uint32_t w[4] = {bits.x, bits.y, bits.z, bits.w};
                    for (int t = 0; t < 4 && j + t < n; t++)
                        srow[j + t] = w[t] >= drop_threshold ? srow[j + t] * drop_scale : 0.0f;
                }
            }
        }
        if (!nvalid) continue;

        if (dt == PF_DTYPE_F32 && d == dpad) { /* V rows read in place */
            const float *v0 = (const float *)pf_row_ptr(&ctx->v, b, k0 + j0, hk);
            pf_cpu_pv_tile(s, kBlockN, v0, ctx->v.st, n, of, dpad, rows4, dpad);
        } else {
            pf_cpu_stage_rows(&ctx->v, dt, b, k0 + j0, hk, n, d, dpad, vt);
            pf_cpu_pv_tile(s, kBlockN, vt, dpad, n, of, dpad, rows4, dpad);
        }
    }

    /* normalize, store out and lse */
    for (int64_t r = 0; r < rows; r++) {
        float *orow = of + r * dpad;
        float lse;
        if (l[r] == 0.0f && m[r] == -__builtin_inff()) {
            for (int64_t c = 0; c < d; c++) orow[c] = 0.0f;
            lse = -__builtin_inff();
        } else {
            float inv = 1.0f / l[r];
            for (int64_t c = 0; c < d; c++) orow[c] *= inv;
            lse = (m[r] + log2f(l[r])) * PF_LN2;
        }
        pf_store_row_f32(pf_row_ptr(&ctx->out, b, q0 + i0 + r, h), orow, dt, d);
        if (pf_tensor_present(&p->lse)) *pf_lse_ptr(&p->lse, sh->varlen, b, h, q0, i0 + r) = lse;
    }
}

pf_status pf_cpu_flash_fwd(const pf_attn_params *p) {
    fwd_ctx ctx;
    memset(&ctx, 0, sizeof ctx);
    ctx.p = p;
    pf_attn_shape_from_params(p, &ctx.shape);
    const pf_attn_shape *sh = &ctx.shape;
    ctx.q = pf_rows_of(&p->q, sh->varlen);
    ctx.k = pf_rows_of(&p->k, sh->varlen);
    ctx.v = pf_rows_of(&p->v, sh->varlen);
    ctx.out = pf_rows_of(&p->out, sh->varlen);
    ctx.dpad = pf_cpu_dpad(sh->head_dim);
    ctx.n_mtiles = (sh->seqlen_q + kBlockM - 1) / kBlockM;

    pf_cpu_score_scales(p->softmax_scale, p->softcap, &ctx.q_scale, &ctx.cap_log2);

    int64_t items = sh->batch * sh->num_heads * ctx.n_mtiles;
    if (items == 0) return PF_STATUS_OK;
    int nt = pf_resolve_threads(p->num_threads, items);
    ctx.scratch_bytes = pf_cpu_fwd_tiles_bytes(kBlockM, ctx.dpad);
    pf_status st = pf_cpu_alloc_scratch(&ctx.scratch, nt, ctx.scratch_bytes);
    if (st != PF_STATUS_OK) return st;
    st = pf_parallel_for(items, nt, fwd_item, &ctx);
    pf_cpu_free_scratch(ctx.scratch, nt);
    return st;
}
