/*
 * cpu_backend.h - the CPU backend's operations (the entries of pf_cpu_backend,
 * cpu_backend.c; called by the core after validation) and the tile routines
 * its kernels share.
 */
#ifndef PF_CPU_BACKEND_H
#define PF_CPU_BACKEND_H

#include "attn_cpu.h"

/* ---- entry points: params already validated ---- */
pf_status pf_cpu_flash_fwd(const pf_attn_params *p);

/* ---- tiles shared by forward, backward and paged kernels (kBlockN = 64) ---- */

/* Per-row mask and score transform of one (sequence, head). */
typedef struct pf_cpu_mask {
    int64_t sq, sk;
    int causal;
    int64_t left, right;
    float cap_log2;   /* softcap * log2(e), 0 = off */
    float alibi_log2; /* slope * log2(e), 0 = off */
} pf_cpu_mask;

/* Scores of rows [i0, i0 + rows) against keys [j0, j0 + n): apply softcap,
 * ALiBi and the causal/window/length mask (-inf) in place on s[rows][64]. */
void pf_cpu_transform_scores(float *s, int64_t rows, int64_t n, int64_t i0, int64_t j0, const pf_cpu_mask *mk);
/* Online softmax over one score tile s[rows4][64] (log2 domain, masked entries -inf):
 * updates the running row max m and sum l, rescales the partial output of[rows][dpad]
 * by exp2(m_old - m_new), and leaves P = exp2(s - m) in s (zeros in rows that have
 * seen nothing yet and in the padding rows [rows, rows4)). NaN in a row propagates.
 * Returns the number of rows that have seen a key so far. */
int64_t pf_cpu_softmax_tile(float *s, int64_t rows, int64_t rows4, float *m, float *l, float *of, int64_t dpad);
void pf_cpu_score_tile(const float *q, int64_t ldq, const float *kt, int64_t dpad, float *s, int64_t rows);
void pf_cpu_pv_tile(const float *pm, int64_t ldp, const float *vt, int64_t ldv, int64_t n, float *o, int64_t ldo,
                    int64_t rows, int64_t dpad);
void pf_cpu_stage_kt(const pf_rows *k, pf_dtype dt, int64_t b, int64_t tok0, int64_t h, int64_t n, int64_t d,
                     int64_t dpad, float *kt, float *rowbuf);
void pf_cpu_stage_rows(const pf_rows *v, pf_dtype dt, int64_t b, int64_t tok0, int64_t h, int64_t n, int64_t d,
                       int64_t dpad, float *vt);

/* The log2-domain scaling every CPU kernel folds into Q: scores become (Q * q_scale) K^T,
 * then cap_log2 * tanh(.) with softcap (cap_log2 = 0 without). Returns the softmax
 * scale itself (softmax_scale, used as given). */
float pf_cpu_score_scales(float softmax_scale, float softcap, float *q_scale, float *cap_log2);

/* ALiBi slope of (batch b, head h) times log2(e) from f32 [h] or [batch, h]; 0 without ALiBi. */
float pf_cpu_alibi_log2(const pf_tensor *slopes, int64_t b, int64_t h);

/* A mask for queries [0, sq) against keys [0, sk) of one (sequence, head). */
pf_cpu_mask pf_cpu_mask_make(int64_t sq, int64_t sk, int causal, int64_t left, int64_t right, float cap_log2,
                             float alibi_log2);

/* Head dim rounded up to the micro-kernels' vector width (PF_VW floats). */
static inline int64_t pf_cpu_dpad(int64_t head_dim) { return (head_dim + PF_VW - 1) / PF_VW * PF_VW; }

/* Per-thread scratch of the forward-style tile loop (flash forward, paged attention) for
 * `rows` query rows: Q and the partial O [rows][dpad], K^T [dpad][64], V [64][dpad],
 * scores S [rows][64], running row max m and sum l [rows], a staging row [dpad]. */
typedef struct pf_cpu_fwd_tiles {
    float *qf, *of, *kt, *vt, *s, *m, *l, *rowbuf;
} pf_cpu_fwd_tiles;
size_t pf_cpu_fwd_tiles_bytes(int64_t rows, int64_t dpad);
pf_cpu_fwd_tiles pf_cpu_fwd_tiles_of(void *scratch, int64_t rows, int64_t dpad);
/* Start row r of a tile: qf[r] = src * q_scale (zeros when src is NULL: a padding row),
 * columns [d, dpad) zero; of[r] = 0, m[r] = -inf, l[r] = 0. */
void pf_cpu_fwd_start_row(const pf_cpu_fwd_tiles *t, int64_t r, const void *src, pf_dtype dt, int64_t d, int64_t dpad,
                          float q_scale);

/* One 64-byte-aligned scratch buffer per thread. */
pf_status pf_cpu_alloc_scratch(void ***bufs, int n, size_t bytes);
void pf_cpu_free_scratch(void **bufs, int n);

/* ---- serving operations (paged_attn.c, cache_ops.c): params already validated ---- */
pf_status pf_cpu_paged_attn(const pf_paged_params *p);
pf_status pf_cpu_merge_attn_states(const pf_merge_params *p);
/* `stream` is the table's signature; host work has none */
pf_status pf_cpu_write_kv_cache(pf_tensor k, pf_tensor v, pf_tensor k_cache, pf_tensor v_cache, pf_tensor slot_mapping,
                                pf_tensor k_scale, pf_tensor v_scale, void *stream);
pf_status pf_cpu_copy_blocks(const pf_tensor *caches, int32_t num_caches, pf_tensor block_mapping, void *stream);
pf_status pf_cpu_swap_blocks(pf_tensor src, pf_tensor dst, pf_tensor block_mapping, void *stream);

/* Merge n partial attention results of one (query, head) by log-sum-exp:
 * o_i = o + i * ldo ([d] floats), lse_i natural log. Writes out [d] and *lse_out.
 * Sides with lse_i = -inf are skipped (their o_i is never read); all -inf gives
 * out = 0, lse = -inf; a NaN lse gives NaN. out may alias o (the first row). */
void pf_cpu_merge_partials(int64_t n, const float *lse, const float *o, int64_t ldo, int64_t d, float *out,
                           float *lse_out);

/* ---- backward and dropout mask (flash_bwd.c); appended by the backward task ---- */

/* Tile sizes of the forward and the backward (the score micro-kernel writes rows
 * of PF_CPU_BLOCK_N floats; the backward recomputes scores with the same routines). */
#define PF_CPU_BLOCK_M 64 /* the backward's query tile; the forward uses 128 rows */
#define PF_CPU_BLOCK_N 64

/* dq, dk, dv from dout, q, k, v, out, lse (params validated). Deterministic:
 * every output element is accumulated by one work item in a fixed order. */
pf_status pf_cpu_flash_bwd(const pf_attn_params *p);
/* keep[b, h, i, j] of the forward's dropout into u8 `mask` (params validated). */
pf_status pf_cpu_dropout_mask(const pf_attn_params *p, pf_tensor mask);

#endif /* PF_CPU_BACKEND_H */
