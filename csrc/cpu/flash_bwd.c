/*
 * flash_bwd.c - FlashAttention backward pass on the CPU, and the dropout mask.
 *
 * Layouts: see pf_attn_params in pagedflash.h. dout, out, dq: q's layout;
 * dk, dv: k's layout; lse [b, h, sq] (dense) or [h, total_q] (varlen), natural log.
 *
 * Algorithm (Dao, FlashAttention-2, 2023), never storing the score matrix:
 *   0. Per query row: D = rowsum(dO * O) and lse2 = lse * log2(e) (+inf for a
 *      fully masked row, so that its P is exactly 0). Kept in two float32
 *      buffers of num_heads * total query rows.
 *   For every pair of a query tile (kBlockM rows) and a key tile (kBlockN keys)
 *   that the masks leave visible, recompute, exactly as the forward does,
 *      S  = transform(Qs K^T)        (log2 domain; Qs = q * q_scale)
 *      P  = exp2(S - lse2)
 *      dP = dO V^T
 *      Z  = keep / (1 - p) from Philox (dropout), 1 without dropout
 *      dS = P * (dP * Z - D) * g     (g = 1 - tanh^2 with softcap, else 1)
 *   which is dL/d(logit) times the softcap derivative. Then
 *      dV += (P * Z)^T dO,  dK += dS^T Qs,  dQ += dS K,
 *   and finally dk = dK * scale / q_scale (= ln 2, or softcap: exact whatever the scale),
 *   dq = dQ * scale (scale = softmax_scale).
 *   1. dK/dV pass: work items (batch, kv head, key tile). An item owns dK and dV
 *      of its key tile and walks every query head of its GQA group and every
 *      query tile, so GQA/MQA sums happen inside the item.
 *   2. dQ pass: work items (batch, head, query tile), each walking its visible
 *      key tiles (recomputing S and dP a second time).
 *   The products reuse the forward's micro-kernels (pf_cpu_score_tile for S and
 *   dP, pf_cpu_pv_tile for dQ) plus an A^T B kernel here (tn_tile) that reads P and
 *   dS untransposed for dV and dK.
 *   Every output element is written by exactly one item whose loops run in a
 *   fixed order, so the gradients are bitwise identical run after run and for
 *   any thread count (no atomics, no reduction across threads).
 *
 * Softcap: the forward folds 1 / softcap into Qs and softcap * log2(e) into the
 * tanh factor: S = softcap log2(e) tanh(Qs K^T) - ALiBi. The derivative of the
 * natural-log logit softcap tanh(u) with respect to u = scale q.k / softcap is
 * softcap (1 - tanh^2(u)), and du/d(q.k) = scale / softcap, hence g = 1 - tanh^2
 * and the same output factors as without softcap.
 *
 * Dropout mask (pf_cpu_dropout_mask): keep[b, h, i, j] as pagedflash_philox.h defines
 * it, with i, j local to the sequence (also for varlen).
 */
#include <stdlib.h>

#include "attn_cpu.h"
#include "cpu_backend.h"
#include "pagedflash_philox.h"

enum { kBlockM = PF_CPU_BLOCK_M, kBlockN = PF_CPU_BLOCK_N };

typedef struct bwd_ctx {
    const pf_attn_params *p;
    pf_attn_shape shape;
    pf_rows q, k, v, out, dout, dq, dk, dv;
    int64_t dpad;         /* head_dim rounded up to a multiple of 16 */
    int64_t n_mtiles;     /* query tiles per sequence (max over batch) */
    int64_t n_ntiles;     /* key tiles per sequence (max over batch) */
    int64_t group;        /* num_heads / num_kv_heads */
    int64_t rows_per_head;/* rows of the D / lse2 buffers per head (dense: per (b, h)) */
    float q_scale;        /* folded into Q: scale * log2e, or scale / softcap */
    float cap_log2;       /* softcap * log2e (0 when off) */
    float dq_scale;       /* dQ accumulator -> dq */
    float dk_scale;       /* dK accumulator -> dk */
    uint32_t drop_threshold;
    float drop_scale;
    float *dsum;          /* D per (head, query row) */
    float *lse2;          /* lse * log2e per (head, query row); +inf = fully masked */
    void **scratch;       /* one buffer per thread */
} bwd_ctx;

/* Index of row (b, h, local i) in the D / lse2 buffers. */
static inline int64_t row_base(const bwd_ctx *ctx, int64_t b, int64_t h, int64_t q0) {
    if (ctx->shape.varlen) return h * ctx->rows_per_head + q0;
    return (b * ctx->shape.num_heads + h) * ctx->rows_per_head;
}

/* Keys [j_begin, j_end) that some row of the query tile [i0, i0 + rows) may see;
 * empty when j_end <= j_begin. Causal and window bounds grow with i. */
static void tile_key_range(const pf_attn_params *p, int64_t i0, int64_t rows, int64_t sq, int64_t sk, int64_t *j_begin,
                           int64_t *j_end) {
    int64_t lo_first, hi_first, lo_last, hi_last;
    pf_mask_bounds(i0, sq, sk, p->causal, p->window_left, p->window_right, &lo_first, &hi_first);
    pf_mask_bounds(i0 + rows - 1, sq, sk, p->causal, p->window_left, p->window_right, &lo_last, &hi_last);
    *j_begin = lo_first < 0 ? 0 : lo_first;
    *j_end = hi_last + 1 < sk ? hi_last + 1 : sk;
}

static void fill_mask(const bwd_ctx *ctx, int64_t b, int64_t h, int64_t sq, int64_t sk, pf_cpu_mask *mk) {
    const pf_attn_params *p = ctx->p;
    /* cap_log2 0: the backward applies tanh itself (it needs 1 - tanh^2) */
    *mk = pf_cpu_mask_make(sq, sk, p->causal, p->window_left, p->window_right, 0.0f,
                           pf_cpu_alibi_log2(&p->alibi_slopes, b, h));
}

/* Load the query tile: qf = q * q_scale and dof = dout, rows [rows, rows4) zero,
 * columns [d, dpad) zero; lse2 / D of padding rows are +inf / 0 (so P = 0). */
static void load_query_tile(const bwd_ctx *ctx, int64_t b, int64_t h, int64_t q0, int64_t i0, int64_t rows,
                            int64_t rows4, float *qf, float *dof, float *lse2, float *dsum) {
    const int64_t d = ctx->shape.head_dim, dpad = ctx->dpad;
    const pf_dtype dt = ctx->p->q.dtype;
    const int64_t base = row_base(ctx, b, h, q0);
    for (int64_t r = 0; r < rows4; r++) {
        float *qr = qf + r * dpad, *dr = dof + r * dpad;
        if (r < rows) {
            pf_load_row_f32(qr, pf_row_ptr(&ctx->q, b, q0 + i0 + r, h), dt, d);
            for (int64_t c = 0; c < d; c++) qr[c] *= ctx->q_scale;
            pf_load_row_f32(dr, pf_row_ptr(&ctx->dout, b, q0 + i0 + r, h), dt, d);
            lse2[r] = ctx->lse2[base + i0 + r];
            dsum[r] = ctx->dsum[base + i0 + r];
        } else {
            for (int64_t c = 0; c < d; c++) qr[c] = dr[c] = 0.0f;
            lse2[r] = __builtin_inff();
            dsum[r] = 0.0f;
        }
        for (int64_t c = d; c < dpad; c++) qr[c] = dr[c] = 0.0f;
    }
}

/* One (query tile, key tile) pair. In: qf, dof [rows4][dpad]; kt, vt [dpad][kBlockN]
 * (K^T and V^T, zero padded past n keys). Out: s[r][j] = P * Z (what multiplied V in
 * the forward) and ds[r][j] = dL/dS (natural-log logit, softcap derivative applied),
 * both [rows4][kBlockN] and exactly 0 outside the visible set. g: scratch. */
static void pair_grads(const bwd_ctx *ctx, const float *qf, const float *dof, const float *lse2, const float *dsum,
                       int64_t rows, int64_t rows4, const float *kt, const float *vt, int64_t n, int64_t i0, int64_t j0,
                       const pf_cpu_mask *mk, uint64_t bh_id, float *s, float *ds, float *g) {
    const pf_attn_params *p = ctx->p;
    const int64_t dpad = ctx->dpad;
    pf_cpu_score_tile(qf, dpad, kt, dpad, s, rows4);
    const int cap = ctx->cap_log2 != 0.0f;
    if (cap) {
        /* the forward's transform computes cap_log2 * tanhf(x) first; do the same
         * here and keep the derivative, then let the shared transform do the rest */
        for (int64_t r = 0; r < rows4; r++) {
            float *srow = s + r * kBlockN, *grow = g + r * kBlockN;
            for (int64_t j = 0; j < kBlockN; j++) {
                if (r < rows && j < n) {
                    float t = tanhf(srow[j]);
                    srow[j] = ctx->cap_log2 * t;
                    grow[j] = 1.0f - t * t;
                } else {
                    grow[j] = 0.0f;
                }
            }
        }
    }
    pf_cpu_transform_scores(s, rows, n, i0, j0, mk);
    pf_cpu_score_tile(dof, dpad, vt, dpad, ds, rows4); /* dP = dO V^T */

    float z[kBlockN] __attribute__((aligned(64)));
    for (int64_t r = 0; r < rows4; r++) {
        pf_vf *sv = (pf_vf *)(s + r * kBlockN);
        pf_vf *dv = (pf_vf *)(ds + r * kBlockN);
        const pf_vf *gv = (const pf_vf *)(g + r * kBlockN);
        const pf_vf vl = pf_splat(lse2[r]), vd = pf_splat(dsum[r]);
        const int drop = ctx->drop_threshold != 0 && r < rows;
        if (drop) {
            for (int64_t j = 0; j < kBlockN; j += 4) {
                if (j >= n) {
                    z[j] = z[j + 1] = z[j + 2] = z[j + 3] = 0.0f;
                    continue;
                }
                pf_u32x4 bits = pf_dropout_bits4(p->seed, p->offset, bh_id, i0 + r, j0 + j);
                z[j] = bits.x >= ctx->drop_threshold ? ctx->drop_scale : 0.0f;
                z[j + 1] = bits.y >= ctx->drop_threshold ? ctx->drop_scale : 0.0f;
                z[j + 2] = bits.z >= ctx->drop_threshold ? ctx->drop_scale : 0.0f;
                z[j + 3] = bits.w >= ctx->drop_threshold ? ctx->drop_scale : 0.0f;
            }
        }
        for (int c = 0; c < kBlockN / PF_VW; c++) {
            pf_vf pv = pf_exp2_v(sv[c] - vl); /* 0 where masked or for padding rows */
            pf_vf dpv = dv[c];
            if (drop) {
                pf_vf zv = ((const pf_vf *)z)[c];
                dpv *= zv;
                sv[c] = pv * zv;
            } else {
                sv[c] = pv;
            }
            pf_vf dsv = pv * (dpv - vd);
            if (cap) dsv *= gv[c];
            dv[c] = dsv;
        }
    }
}

/* O[4 rows][NV*16 cols] += A^T[4 rows][0..n) . B[0..n)[NV*16 cols], with A stored
 * untransposed ([n][lda]: row jj of A^T is column jj of A, so the four A values of one
 * step are adjacent). Used for dV += P^T dO and dK += dS^T Q without a transpose. */
static inline __attribute__((always_inline)) void tn_micro(const float *a, int64_t lda, const float *b, int64_t ldb,
                                                           int64_t n, float *o, int64_t ldo, const int NV) {
    pf_vf acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < NV; c++) acc[r][c] = ((const pf_vf *)(o + r * ldo))[c];
    for (int64_t t = 0; t < n; t++) {
        const pf_vf *brow = (const pf_vf *)(b + t * ldb);
        const float *arow = a + t * lda;
        float a0 = arow[0], a1 = arow[1], a2 = arow[2], a3 = arow[3];
        for (int c = 0; c < NV; c++) {
            pf_vf bv = brow[c];
            acc[0][c] += a0 * bv;
            acc[1][c] += a1 * bv;
            acc[2][c] += a2 * bv;
            acc[3][c] += a3 * bv;
        }
    }
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < NV; c++) ((pf_vf *)(o + r * ldo))[c] = acc[r][c];
}

/* O[rows][dpad] += A^T B: A [n][lda] (rows <= lda columns used), B [n][ldb]; rows % 4 == 0. */
static void tn_tile(const float *a, int64_t lda, const float *b, int64_t ldb, int64_t n, float *o, int64_t ldo,
                    int64_t rows, int64_t dpad) {
    for (int64_t r = 0; r < rows; r += 4) {
        for (int64_t c0 = 0; c0 < dpad; c0 += 64) {
            int64_t nv = (dpad - c0) / PF_VW;
            if (nv > 4) nv = 4;
            float *orow = o + r * ldo + c0;
            switch (nv) {
                case 4: tn_micro(a + r, lda, b + c0, ldb, n, orow, ldo, 4); break;
                case 3: tn_micro(a + r, lda, b + c0, ldb, n, orow, ldo, 3); break;
                case 2: tn_micro(a + r, lda, b + c0, ldb, n, orow, ldo, 2); break;
                default: tn_micro(a + r, lda, b + c0, ldb, n, orow, ldo, 1); break;
            }
        }
    }
}

/* Scratch layout shared by both passes (floats). */
typedef struct bwd_scratch {
    float *qf, *dof, *acc0, *acc1, *kt, *vt; /* [kBlockM|kBlockN][dpad] or [dpad][kBlockN] */
    float *s, *ds, *g;                       /* [kBlockM][kBlockN] */
    float *lse2, *dsum;                      /* [kBlockM] */
    float *rowbuf;                           /* [dpad] */
} bwd_scratch;

static size_t bwd_scratch_bytes(int64_t dpad) {
    return sizeof(float) * (size_t)(6 * 64 * dpad + 3 * kBlockM * kBlockN + 2 * kBlockM + dpad + 64);
}

static bwd_scratch scratch_of(const bwd_ctx *ctx, int tid) {
    const int64_t dpad = ctx->dpad;
    bwd_scratch w;
    float *f = (float *)ctx->scratch[tid];
    /* clang-format off: the scratch layout, one buffer per line */
    w.qf = f;
    f += kBlockM * dpad;
    w.dof = f;
    f += kBlockM * dpad;
    w.acc0 = f;
    f += 64 * dpad;
    w.acc1 = f;
    f += 64 * dpad;
    w.kt = f;
    f += dpad * kBlockN;
    w.vt = f;
    f += dpad * kBlockN;
    w.s = f;
    f += kBlockM * kBlockN;
    w.ds = f;
    f += kBlockM * kBlockN;
    w.g = f;
    f += kBlockM * kBlockN;
    w.lse2 = f;
    f += kBlockM;
    w.dsum = f;
    f += kBlockM;
    /* clang-format on */
    w.rowbuf = f;
    return w;
}

/* Pass 0: D = rowsum(dO * O) and lse2 for the rows of one (b, h, query tile). */
static void rowstats_item(void *vctx, int64_t item, int tid) {
    bwd_ctx *ctx = (bwd_ctx *)vctx;
    const pf_attn_params *p = ctx->p;
    const pf_attn_shape *sh = &ctx->shape;
    const int64_t d = sh->head_dim;
    const pf_dtype dt = p->q.dtype;
    int64_t mt = item % ctx->n_mtiles, bh = item / ctx->n_mtiles;
    int64_t h = bh % sh->num_heads, b = bh / sh->num_heads;
    int64_t q0, sq, k0, sk;
    pf_seq_bounds(sh, b, &q0, &sq, &k0, &sk);
    int64_t i0 = mt * kBlockM;
    if (i0 >= sq) return;
    int64_t rows = sq - i0 < kBlockM ? sq - i0 : kBlockM;
    bwd_scratch w = scratch_of(ctx, tid);
    float *orow = w.qf, *drow = w.dof;
    const int64_t base = row_base(ctx, b, h, q0);
    for (int64_t r = 0; r < rows; r++) {
        int64_t i = i0 + r;
        pf_load_row_f32(orow, pf_row_ptr(&ctx->out, b, q0 + i, h), dt, d);
        pf_load_row_f32(drow, pf_row_ptr(&ctx->dout, b, q0 + i, h), dt, d);
        float acc = 0.0f;
        for (int64_t c = 0; c < d; c++) acc += orow[c] * drow[c];
        float lse = *pf_lse_ptr(&p->lse, sh->varlen, b, h, q0, i);
        ctx->dsum[base + i] = acc;
        ctx->lse2[base + i] = lse == -__builtin_inff() ? __builtin_inff() : lse * PF_LOG2E;
    }
}

/* Pass 1: dK, dV of one (b, kv head, key tile). */
static void kv_item(void *vctx, int64_t item, int tid) {
    bwd_ctx *ctx = (bwd_ctx *)vctx;
    const pf_attn_params *p = ctx->p;
    const pf_attn_shape *sh = &ctx->shape;
    const int64_t d = sh->head_dim, dpad = ctx->dpad;
    const pf_dtype dt = p->q.dtype;
    int64_t nt = item % ctx->n_ntiles, bhk = item / ctx->n_ntiles;
    int64_t hk = bhk % sh->num_kv_heads, b = bhk / sh->num_kv_heads;
    int64_t q0, sq, k0, sk;
    pf_seq_bounds(sh, b, &q0, &sq, &k0, &sk);
    int64_t j0 = nt * kBlockN;
    if (j0 >= sk) return;
    int64_t n = sk - j0 < kBlockN ? sk - j0 : kBlockN;
    int64_t n4 = (n + 3) & ~(int64_t)3;

    bwd_scratch w = scratch_of(ctx, tid);
    float *dk_acc = w.acc0, *dv_acc = w.acc1;
    pf_cpu_stage_kt(&ctx->k, dt, b, k0 + j0, hk, n, d, dpad, w.kt, w.rowbuf);
    pf_cpu_stage_kt(&ctx->v, dt, b, k0 + j0, hk, n, d, dpad, w.vt, w.rowbuf);
    memset(dk_acc, 0, sizeof(float) * (size_t)(kBlockN * dpad));
    memset(dv_acc, 0, sizeof(float) * (size_t)(kBlockN * dpad));

    for (int64_t h = hk * ctx->group; h < (hk + 1) * ctx->group; h++) {
        pf_cpu_mask mk;
        fill_mask(ctx, b, h, sq, sk, &mk);
        const uint64_t bh_id = (uint64_t)(b * sh->num_heads + h);
        for (int64_t i0 = 0; i0 < sq; i0 += kBlockM) {
            int64_t rows = sq - i0 < kBlockM ? sq - i0 : kBlockM;
            int64_t rows4 = (rows + 3) & ~(int64_t)3;
            int64_t jb, je;
            tile_key_range(p, i0, rows, sq, sk, &jb, &je);
            if (je <= jb || je <= j0 || jb >= j0 + n) continue; /* nothing visible here */
            load_query_tile(ctx, b, h, q0, i0, rows, rows4, w.qf, w.dof, w.lse2, w.dsum);
            pair_grads(ctx, w.qf, w.dof, w.lse2, w.dsum, rows, rows4, w.kt, w.vt, n, i0, j0, &mk, bh_id, w.s, w.ds,
                       w.g);
            tn_tile(w.s, kBlockN, w.dof, dpad, rows4, dv_acc, dpad, n4, dpad);  /* dV += (P Z)^T dO */
            tn_tile(w.ds, kBlockN, w.qf, dpad, rows4, dk_acc, dpad, n4, dpad);  /* dK += dS^T Qs */
        }
    }
    const pf_dtype odt = p->dk.dtype;
    for (int64_t j = 0; j < n; j++) {
        float *kr = dk_acc + j * dpad;
        for (int64_t c = 0; c < d; c++) kr[c] *= ctx->dk_scale;
        pf_store_row_f32(pf_row_ptr(&ctx->dk, b, k0 + j0 + j, hk), kr, odt, d);
        pf_store_row_f32(pf_row_ptr(&ctx->dv, b, k0 + j0 + j, hk), dv_acc + j * dpad, odt, d);
    }
}

/* Pass 2: dQ of one (b, head, query tile). */
static void q_item(void *vctx, int64_t item, int tid) {
    bwd_ctx *ctx = (bwd_ctx *)vctx;
    const pf_attn_params *p = ctx->p;
    const pf_attn_shape *sh = &ctx->shape;
    const int64_t d = sh->head_dim, dpad = ctx->dpad;
    const pf_dtype dt = p->q.dtype;
    int64_t mt = item % ctx->n_mtiles, bh = item / ctx->n_mtiles;
    int64_t h = bh % sh->num_heads, b = bh / sh->num_heads;
    int64_t hk = h / ctx->group;
    int64_t q0, sq, k0, sk;
    pf_seq_bounds(sh, b, &q0, &sq, &k0, &sk);
    int64_t i0 = mt * kBlockM;
    if (i0 >= sq) return;
    int64_t rows = sq - i0 < kBlockM ? sq - i0 : kBlockM;
    int64_t rows4 = (rows + 3) & ~(int64_t)3;

    bwd_scratch w = scratch_of(ctx, tid);
    float *dq_acc = w.acc0, *kr = w.acc1; /* kr: K rows [kBlockN][dpad] */
    load_query_tile(ctx, b, h, q0, i0, rows, rows4, w.qf, w.dof, w.lse2, w.dsum);
    memset(dq_acc, 0, sizeof(float) * (size_t)(kBlockM * dpad));
    pf_cpu_mask mk;
    fill_mask(ctx, b, h, sq, sk, &mk);
    const uint64_t bh_id = (uint64_t)(b * sh->num_heads + h);

    int64_t jb, je;
    tile_key_range(p, i0, rows, sq, sk, &jb, &je);
    if (je > jb) {
        for (int64_t j0 = (jb / kBlockN) * kBlockN; j0 < je; j0 += kBlockN) {
            int64_t n = sk - j0 < kBlockN ? sk - j0 : kBlockN;
            pf_cpu_stage_kt(&ctx->k, dt, b, k0 + j0, hk, n, d, dpad, w.kt, w.rowbuf);
            pf_cpu_stage_kt(&ctx->v, dt, b, k0 + j0, hk, n, d, dpad, w.vt, w.rowbuf);
            pf_cpu_stage_rows(&ctx->k, dt, b, k0 + j0, hk, n, d, dpad, kr);
            pair_grads(ctx, w.qf, w.dof, w.lse2, w.dsum, rows, rows4, w.kt, w.vt, n, i0, j0, &mk, bh_id, w.s, w.ds,
                       w.g);
            pf_cpu_pv_tile(w.ds, kBlockN, kr, dpad, n, dq_acc, dpad, rows4, dpad);
        }
    }
    for (int64_t r = 0; r < rows; r++) {
        float *qr = dq_acc + r * dpad;
        for (int64_t c = 0; c < d; c++) qr[c] *= ctx->dq_scale;
        pf_store_row_f32(pf_row_ptr(&ctx->dq, b, q0 + i0 + r, h), qr, p->dq.dtype, d);
    }
}

pf_status pf_cpu_flash_bwd(const pf_attn_params *p) {
    bwd_ctx ctx;
    memset(&ctx, 0, sizeof ctx);
    ctx.p = p;
    pf_attn_shape_from_params(p, &ctx.shape);
    const pf_attn_shape *sh = &ctx.shape;
    ctx.q = pf_rows_of(&p->q, sh->varlen);
    ctx.k = pf_rows_of(&p->k, sh->varlen);
    ctx.v = pf_rows_of(&p->v, sh->varlen);
    ctx.out = pf_rows_of(&p->out, sh->varlen);
    ctx.dout = pf_rows_of(&p->dout, sh->varlen);
    ctx.dq = pf_rows_of(&p->dq, sh->varlen);
    ctx.dk = pf_rows_of(&p->dk, sh->varlen);
    ctx.dv = pf_rows_of(&p->dv, sh->varlen);
    ctx.dpad = pf_cpu_dpad(sh->head_dim);
    ctx.n_mtiles = (sh->seqlen_q + kBlockM - 1) / kBlockM;
    ctx.n_ntiles = (sh->seqlen_k + kBlockN - 1) / kBlockN;
    ctx.group = sh->num_heads / sh->num_kv_heads;

    float scale = pf_cpu_score_scales(p->softmax_scale, p->softcap, &ctx.q_scale, &ctx.cap_log2);
    ctx.dq_scale = scale;
    /* scale / q_scale, written out: q_scale = scale log2(e) (or scale / softcap) underflows to 0
     * for a tiny scale, and the quotient would then be 0 / 0 or x / 0 (NaN in dk) */
    ctx.dk_scale = p->softcap > 0.0f ? p->softcap : PF_LN2;
    ctx.drop_threshold = pf_dropout_threshold(p->dropout_p);
    ctx.drop_scale = p->dropout_p > 0.0f ? 1.0f / (1.0f - p->dropout_p) : 1.0f;

    int64_t q_items = sh->batch * sh->num_heads * ctx.n_mtiles;
    int64_t kv_items = sh->batch * sh->num_kv_heads * ctx.n_ntiles;
    if (q_items == 0 && kv_items == 0) return PF_STATUS_OK;

    /* every allocation happens before anything is written */
    int64_t nrows = sh->varlen ? p->q.shape[0] : sh->batch * sh->seqlen_q;
    ctx.rows_per_head = sh->varlen ? p->q.shape[0] : sh->seqlen_q;
    size_t stat_bytes = sizeof(float) * (size_t)(nrows * sh->num_heads + 1);
    ctx.dsum = (float *)malloc(stat_bytes);
    ctx.lse2 = (float *)malloc(stat_bytes);
    if (!ctx.dsum || !ctx.lse2) {
        free(ctx.dsum);
        free(ctx.lse2);
        PF_CHECK(0, PF_STATUS_OUT_OF_MEMORY,
                 "out of host memory: %zu bytes for the backward's row "
                 "statistics",
                 2 * stat_bytes);
    }
    int nt = pf_resolve_threads(p->num_threads, q_items > kv_items ? q_items : kv_items);
    pf_status st = pf_cpu_alloc_scratch(&ctx.scratch, nt, bwd_scratch_bytes(ctx.dpad));
    if (st != PF_STATUS_OK) {
        free(ctx.dsum);
        free(ctx.lse2);
        return st;
    }
    if (q_items) st = pf_parallel_for(q_items, nt, rowstats_item, &ctx);
    if (st == PF_STATUS_OK && kv_items) st = pf_parallel_for(kv_items, nt, kv_item, &ctx);
    if (st == PF_STATUS_OK && q_items) st = pf_parallel_for(q_items, nt, q_item, &ctx);
    pf_cpu_free_scratch(ctx.scratch, nt);
    free(ctx.dsum);
    free(ctx.lse2);
    return st;
}

/* ---- dropout mask ---- */

typedef struct mask_ctx {
    const pf_attn_params *p;
    pf_attn_shape shape;
    pf_tensor mask;
    uint32_t threshold;
} mask_ctx;

static void mask_item(void *vctx, int64_t item, int tid) {
    (void)tid;
    mask_ctx *ctx = (mask_ctx *)vctx;
    const pf_attn_params *p = ctx->p;
    const pf_attn_shape *sh = &ctx->shape;
    const pf_tensor *m = &ctx->mask;
    int64_t h = item % sh->num_heads, b = item / sh->num_heads;
    int64_t q0, sq, k0, sk;
    pf_seq_bounds(sh, b, &q0, &sq, &k0, &sk);
    const uint64_t bh_id = (uint64_t)(b * sh->num_heads + h);
    uint8_t *base = (uint8_t *)m->data + b * m->strides[0] + h * m->strides[1];
    for (int64_t i = 0; i < m->shape[2]; i++) {
        uint8_t *row = base + i * m->strides[2];
        for (int64_t j0 = 0; j0 < m->shape[3]; j0 += 4) {
            uint32_t w[4] = {0, 0, 0, 0};
            int valid = i < sq && j0 < sk;
            if (valid) {
                pf_u32x4 bits = pf_dropout_bits4(p->seed, p->offset, bh_id, i, j0);
                w[0] = bits.x;
                w[1] = bits.y;
                w[2] = bits.z;
                w[3] = bits.w;
            }
            for (int t = 0; t < 4 && j0 + t < m->shape[3]; t++)
                row[(j0 + t) * m->strides[3]] = (uint8_t)(valid && j0 + t < sk && w[t] >= ctx->threshold);
        }
    }
}

pf_status pf_cpu_dropout_mask(const pf_attn_params *p, pf_tensor mask) {
    mask_ctx ctx;
    memset(&ctx, 0, sizeof ctx);
    ctx.p = p;
    pf_attn_shape_from_params(p, &ctx.shape);
    ctx.mask = mask;
    ctx.threshold = pf_dropout_threshold(p->dropout_p);
    int64_t items = ctx.shape.batch * ctx.shape.num_heads;
    if (items == 0 || mask.shape[2] == 0 || mask.shape[3] == 0) return PF_STATUS_OK;
    return pf_parallel_for(items, p->num_threads, mask_item, &ctx);
}
