/*
 * validate_paged.c - the checks run before any backend touches a paged
 * attention call, a merge of attention states or a cache operation
 * (write_kv_cache, copy_blocks, swap_blocks). Layouts: see pagedflash.h.
 *
 * Every check runs before anything is written, so a failed call leaves out,
 * lse and every cache exactly as they were. Index tensors (block_tables,
 * seq_lens, cu_seqlens_q, slot_mapping, block_mapping) are range-checked here
 * when they are host-readable; tensors resident on a CUDA device cannot be
 * read from the host without a synchronizing copy, so for them the CUDA
 * kernels bound-check instead (cuda/paged/kernel.cuh, cuda/cache/cache_ops.cu): an id outside
 * the cache reads or writes nothing, never memory outside it.
 */
#include <stdio.h>
#include <string.h>

#include "validate.h"

/* The largest block_size paged attention accepts (the CUDA kernels size their
 * shared-memory staging by it). */
#define PF_PAGED_MAX_BLOCK_SIZE 256

/* ---- shared helpers ---- */

/* An integer index tensor: dtype, rank, device; last dimension contiguous. */
static pf_status check_index(const pf_tensor *t, const char *name, pf_dtype dtype, int ndim, const pf_tensor *ref,
                             const char *ref_name) {
    PF_TRY(pf_check_present(t, name));
    PF_TRY(pf_check_dtype(t, name, dtype));
    PF_TRY(pf_check_rank(t, name, ndim));
    PF_TRY(pf_check_last_contiguous(t, name));
    if (ref) PF_TRY(pf_check_same_device(t, name, ref, ref_name));
    return PF_STATUS_OK;
}

static inline int32_t at_i32(const pf_tensor *t, int64_t i) { return ((const int32_t *)t->data)[i * t->strides[0]]; }

static inline int32_t at_i32_2(const pf_tensor *t, int64_t i, int64_t j) {
    return ((const int32_t *)t->data)[i * t->strides[0] + j * t->strides[1]];
}

static inline int64_t at_i64_2(const pf_tensor *t, int64_t i, int64_t j) {
    return ((const int64_t *)t->data)[i * t->strides[0] + j * t->strides[1]];
}

/* ---- compressed caches (pagedflash.h "Compressed KV caches") ---- */

/* k_cache / v_cache of a call whose values are `ref`'s dtype (q for paged attention, k for a
 * write; NULL: any float dtype): that dtype, or a compressed dtype shared by both caches. */
static pf_status check_cache_pair(const pf_tensor *kc, const pf_tensor *vc, const pf_tensor *ref,
                                  const char *ref_name) {
    PF_TRY(pf_check_present(kc, "k_cache"));
    const pf_dtype dt = kc->dtype;
    PF_CHECK_TYPE(dt == PF_DTYPE_F32 || dt == PF_DTYPE_F16 || dt == PF_DTYPE_BF16 || pf_dtype_compressed(dt),
                  "k_cache: expected dtype float16, bfloat16, float32%s or a compressed cache's "
                  "(float8_e4m3fn, float8_e5m2, int8), got %s",
                  ref ? " (the dtype of q)" : "", pf_dtype_name(dt));
    if (!pf_dtype_compressed(dt) && ref) PF_TRY(pf_check_float_like(kc, "k_cache", ref, ref_name));
    PF_TRY(pf_check_last_contiguous(kc, "k_cache"));
    if (!pf_dtype_compressed(dt)) {
        PF_TRY(pf_check_float_like(vc, "v_cache", kc, "k_cache"));
        return PF_STATUS_OK;
    }
    if (ref) PF_TRY(pf_check_same_device(kc, "k_cache", ref, ref_name));
    PF_TRY(pf_check_present(vc, "v_cache"));
    PF_CHECK_TYPE(vc->dtype == kc->dtype, "v_cache: expected dtype %s (the dtype of k_cache), got %s",
                  pf_dtype_name(kc->dtype), pf_dtype_name(vc->dtype));
    PF_TRY(pf_check_last_contiguous(vc, "v_cache"));
    PF_TRY(pf_check_same_device(vc, "v_cache", kc, "k_cache"));
    return PF_STATUS_OK;
}

/* A compressed cache needs a backend that reads and writes them. */
static pf_status check_backend_kv_quant(const pf_backend *be, const pf_tensor *kc) {
    PF_CHECK(!pf_dtype_compressed(kc->dtype) || be->limits.kv_quant, PF_STATUS_NOT_SUPPORTED,
             "k_cache: %s caches are not supported by the %s backend yet (the CPU backend takes them; the "
             "%s backend copies and swaps their blocks)",
             pf_dtype_name(kc->dtype), be->name, be->name);
    return PF_STATUS_OK;
}

/* The scale `s` (named `name`) of cache `c` (named `cname`), once the cache is checked. *per_row
 * is set for a per-(token, head) scale [num_blocks, block_size, num_kv_heads]. */
static pf_status check_kv_scale(const pf_tensor *s, const char *name, const pf_tensor *c, const char *cname,
                                int *per_row) {
    char s1[128];
    *per_row = 0;
    const int given = pf_tensor_present(s) || s->ndim > 0;
    if (!pf_dtype_compressed(c->dtype)) {
        PF_CHECK_TYPE(!given,
                      "%s: %s is %s; scales go with float8_e4m3fn, float8_e5m2 and int8 caches only (pass "
                      "none)",
                      name, cname, pf_dtype_name(c->dtype));
        return PF_STATUS_OK;
    }
    PF_CHECK_VALUE(given || c->dtype != PF_DTYPE_I8,
                   "%s: missing; an int8 %s needs a float32 scale: per tensor ([] or [1]) or per (token, "
                   "head) [num_blocks, block_size, num_kv_heads]",
                   name, cname);
    if (!given) return PF_STATUS_OK; /* float8: scale 1 */
    PF_TRY(pf_check_present(s, name));
    PF_TRY(pf_check_dtype(s, name, PF_DTYPE_F32));
    if (s->ndim == 0 || (s->ndim == 1 && s->shape[0] == 1)) { /* per tensor */
        PF_CHECK_VALUE(pf_tensor_on_host(s) || (s->device == c->device && s->device_id == c->device_id),
                       "%s: expected host memory or the device of %s (cuda:%d), got cuda:%d", name, cname,
                       (int)c->device_id, (int)s->device_id);
        if (pf_tensor_on_host(s)) {
            const float v = *(const float *)s->data;
            PF_CHECK_VALUE(v > 0.0f && v < __builtin_inff(), "%s: the scale of %s must be finite and > 0, got %g", name,
                           cname, (double)v);
        }
        return PF_STATUS_OK;
    }
    PF_CHECK_VALUE(c->dtype == PF_DTYPE_I8,
                   "%s: per-(token, head) scales go with int8 caches; %s is %s, which takes one scale per "
                   "tensor ([] or [1]), got shape %s",
                   name, cname, pf_dtype_name(c->dtype), pf_shape_str(s, s1, sizeof s1));
    pf_tensor want = {0};
    want.ndim = 3;
    for (int i = 0; i < 3; i++) want.shape[i] = c->ndim > i ? c->shape[i] : 0;
    PF_CHECK_VALUE(c->ndim == 4, "%s: per-(token, head) scales need a 4-d %s", name, cname);
    PF_TRY(pf_check_same_shape(s, name, &want, "[num_blocks, block_size, num_kv_heads] of the cache"));
    PF_TRY(pf_check_last_contiguous(s, name));
    PF_TRY(pf_check_nonneg_strides(s, name));
    PF_TRY(pf_check_same_device(s, name, c, cname));
    *per_row = 1;
    return PF_STATUS_OK;
}

/* Whether element i of a float16 / bfloat16 / float32 tensor is NaN or inf; *what names it. */
static int nonfinite(const pf_tensor *t, int64_t off, const char **what) {
    uint32_t exp_mask, man, sign, u;
    if (t->dtype == PF_DTYPE_F32) {
        u = ((const uint32_t *)t->data)[off];
        exp_mask = 0x7f800000u;
        man = u & 0x007fffffu;
        sign = u >> 31;
    } else {
        u = ((const uint16_t *)t->data)[off];
        exp_mask = t->dtype == PF_DTYPE_F16 ? 0x7c00u : 0x7f80u;
        man = u & (~exp_mask & 0x7fffu);
        sign = u >> 15;
    }
    if ((u & exp_mask) != exp_mask) return 0;
    *what = man ? "nan" : sign ? "-inf" : "inf";
    return 1;
}

/* Every value of k ([num_tokens, hk, d]) that a host slot_mapping writes must be finite when the
 * cache is compressed (it has no inf, and int8 no NaN). */
static pf_status check_finite_rows(const pf_tensor *x, const char *name, const pf_tensor *slots, pf_dtype cache_dtype) {
    const int64_t *sm = (const int64_t *)slots->data;
    const char *what = "";
    for (int64_t t = 0; t < x->shape[0]; t++) {
        if (sm[t * slots->strides[0]] < 0) continue;
        for (int64_t h = 0; h < x->shape[1]; h++)
            for (int64_t c = 0; c < x->shape[2]; c++)
                PF_CHECK_VALUE(!nonfinite(x, t * x->strides[0] + h * x->strides[1] + c, &what),
                               "%s: %s[%lld, %lld, %lld] is %s; a compressed cache (%s) holds finite values "
                               "only (finite values beyond its range saturate)",
                               name, name, (long long)t, (long long)h, (long long)c, what, pf_dtype_name(cache_dtype));
    }
    return PF_STATUS_OK;
}

/* ---- paged attention ---- */

/* Range checks of the index tensors' values (all host-readable). */
static pf_status check_paged_indices_host(const pf_paged_params *p, int64_t batch, int has_cu, int64_t q_len_dense) {
    const pf_tensor *bt = &p->block_tables, *sl = &p->seq_lens, *cu = &p->cu_seqlens_q;
    const int64_t num_blocks = p->k_cache.shape[0], block_size = p->k_cache.shape[1];
    const int64_t max_blocks = bt->shape[1];
    const int64_t capacity = max_blocks * block_size;
    if (has_cu) {
        PF_CHECK_VALUE(at_i32(cu, 0) == 0, "cu_seqlens_q: expected cu_seqlens_q[0] == 0, got %d", (int)at_i32(cu, 0));
        for (int64_t b = 1; b <= batch; b++)
            PF_CHECK_VALUE(at_i32(cu, b) >= at_i32(cu, b - 1),
                           "cu_seqlens_q: must be non-decreasing, but cu_seqlens_q[%lld] = %d < "
                           "cu_seqlens_q[%lld] = %d",
                           (long long)b, (int)at_i32(cu, b), (long long)(b - 1), (int)at_i32(cu, b - 1));
        PF_CHECK_VALUE(at_i32(cu, batch) == p->q.shape[0],
                       "cu_seqlens_q: the last entry must equal the number of packed queries in q "
                       "(%lld), got cu_seqlens_q[%lld] = %d",
                       (long long)p->q.shape[0], (long long)batch, (int)at_i32(cu, batch));
    }
    for (int64_t b = 0; b < batch; b++) {
        int64_t len = at_i32(sl, b);
        int64_t q_len = has_cu ? (int64_t)at_i32(cu, b + 1) - at_i32(cu, b) : q_len_dense;
        PF_CHECK_VALUE(len >= 0, "seq_lens: seq_lens[%lld] = %lld is negative", (long long)b, (long long)len);
        PF_CHECK_VALUE(len <= capacity,
                       "seq_lens: seq_lens[%lld] = %lld exceeds the %lld tokens its block_tables "
                       "row covers (max_blocks_per_seq %lld x block_size %lld)",
                       (long long)b, (long long)len, (long long)capacity, (long long)max_blocks, (long long)block_size);
        PF_CHECK_VALUE(q_len <= len,
                       "seq_lens: seq_lens[%lld] = %lld is shorter than the sequence's %lld "
                       "queries (q_len <= seq_len: the queries' own keys must already be in the "
                       "cache)",
                       (long long)b, (long long)len, (long long)q_len);
        int64_t used = (len + block_size - 1) / block_size;
        for (int64_t j = 0; j < used; j++) {
            int64_t id = at_i32_2(bt, b, j);
            PF_CHECK_VALUE(id >= 0 && id < num_blocks,
                           "block_tables: block_tables[%lld, %lld] = %lld is out of range [0, %lld) "
                           "(num_blocks of k_cache); sequence %lld holds %lld tokens in %lld blocks",
                           (long long)b, (long long)j, (long long)id, (long long)num_blocks, (long long)b,
                           (long long)len, (long long)used);
        }
    }
    return PF_STATUS_OK;
}

pf_status pf_paged_attn_validate(const pf_paged_params *p) {
    char s1[128];
    PF_CHECK_VALUE(p != NULL, "params: NULL");
    const pf_tensor *q = &p->q, *kc = &p->k_cache, *vc = &p->v_cache;

    /* q */
    PF_TRY(pf_check_present(q, "q"));
    PF_TRY(pf_check_float_dtype(q, "q"));
    PF_TRY(pf_check_last_contiguous(q, "q"));
    int has_cu = pf_tensor_present(&p->cu_seqlens_q) || p->cu_seqlens_q.ndim > 0;
    PF_CHECK_VALUE(q->ndim == 3 || (q->ndim == 4 && !has_cu),
                   "q: expected [batch, num_heads, head_dim], [batch, q_len, num_heads, head_dim] "
                   "or, with cu_seqlens_q, [total_q, num_heads, head_dim]; got %d-d with shape %s",
                   (int)q->ndim, pf_shape_str(q, s1, sizeof s1));
    const int hd = q->ndim - 1, hh = q->ndim - 2;
    const int64_t d = q->shape[hd], h = q->shape[hh];
    PF_CHECK_VALUE(d >= 1 && d <= PF_MAX_HEAD_DIM, "q: head_dim must be in [1, %d], got %lld", PF_MAX_HEAD_DIM,
                   (long long)d);

    /* caches: q's dtype or compressed */
    PF_TRY(check_cache_pair(kc, vc, q, "q"));
    PF_TRY(pf_check_rank(kc, "k_cache", 4));
    PF_TRY(pf_check_same_shape(vc, "v_cache", kc, "k_cache"));
    PF_TRY(pf_check_dim(kc, "k_cache", 3, d, "head_dim, as in q"));
    const int64_t block_size = kc->shape[1], hk = kc->shape[2];
    PF_CHECK_VALUE(block_size >= 1 && block_size <= PF_PAGED_MAX_BLOCK_SIZE,
                   "k_cache: block_size (dimension 1) must be in [1, %d], got %lld", PF_PAGED_MAX_BLOCK_SIZE,
                   (long long)block_size);
    PF_CHECK_VALUE(hk >= 1, "k_cache: num_kv_heads (dimension 2) must be >= 1, got %lld", (long long)hk);
    PF_CHECK_VALUE(h >= 1 && h % hk == 0,
                   "q: num_heads (%lld) must be a positive multiple of num_kv_heads (%lld, from "
                   "k_cache)",
                   (long long)h, (long long)hk);

    /* block_tables, seq_lens, cu_seqlens_q */
    PF_TRY(check_index(&p->block_tables, "block_tables", PF_DTYPE_I32, 2, q, "q"));
    const int64_t batch = p->block_tables.shape[0];
    PF_TRY(check_index(&p->seq_lens, "seq_lens", PF_DTYPE_I32, 1, q, "q"));
    PF_CHECK_VALUE(p->seq_lens.shape[0] == batch,
                   "seq_lens: expected length %lld (batch, the rows of block_tables), got %lld", (long long)batch,
                   (long long)p->seq_lens.shape[0]);
    int64_t q_len_dense = 0, total_q;
    if (has_cu) {
        PF_TRY(check_index(&p->cu_seqlens_q, "cu_seqlens_q", PF_DTYPE_I32, 1, q, "q"));
        PF_CHECK_VALUE(p->cu_seqlens_q.shape[0] == batch + 1,
                       "cu_seqlens_q: expected length %lld (batch + 1, batch = the rows of "
                       "block_tables), got %lld",
                       (long long)(batch + 1), (long long)p->cu_seqlens_q.shape[0]);
        total_q = q->shape[0];
    } else {
        PF_CHECK_VALUE(q->shape[0] == batch,
                       "q: expected dimension 0 (batch) to be %lld (the rows of block_tables), got "
                       "%lld (shape %s)",
                       (long long)batch, (long long)q->shape[0], pf_shape_str(q, s1, sizeof s1));
        q_len_dense = q->ndim == 4 ? q->shape[1] : 1;
        total_q = batch * q_len_dense;
    }

    /* out, lse, alibi_slopes */
    PF_TRY(pf_check_float_like(&p->out, "out", q, "q"));
    PF_TRY(pf_check_same_shape(&p->out, "out", q, "q"));
    PF_TRY(pf_check_nonneg_strides(&p->out, "out"));
    if (pf_tensor_present(&p->lse) || p->lse.ndim > 0) {
        pf_tensor want = {0};
        want.ndim = 2;
        want.shape[0] = h;
        want.shape[1] = total_q;
        PF_TRY(pf_check_dtype(&p->lse, "lse", PF_DTYPE_F32));
        PF_TRY(pf_check_same_shape(&p->lse, "lse", &want, "[num_heads, total_q]"));
        PF_TRY(pf_check_same_device(&p->lse, "lse", q, "q"));
        PF_TRY(pf_check_nonneg_strides(&p->lse, "lse"));
    }
    PF_TRY(pf_check_alibi(&p->alibi_slopes, h, batch, q));

    /* scalar options */
    PF_TRY(pf_check_mask_options(p->window_left, p->window_right, p->softcap, p->softmax_scale));
    PF_CHECK_VALUE(p->num_splits >= 0, "num_splits: must be >= 0 (0 = automatic), got %d", (int)p->num_splits);
    const pf_backend *be;
    PF_TRY(pf_check_backend(q, "q", &be));
    PF_TRY(check_backend_kv_quant(be, kc));
    int per_row;
    PF_TRY(check_kv_scale(&p->k_scale, "k_scale", kc, "k_cache", &per_row));
    PF_TRY(check_kv_scale(&p->v_scale, "v_scale", vc, "v_cache", &per_row));
    PF_TRY(pf_check_kernel_hint(p->kernel, PF_HINT_PAGED, "paged_attn"));
    const pf_named_tensor outs[] = {{&p->out, "out"}, {&p->lse, "lse"}};
    const pf_named_tensor ins[] = {{q, "q"},
                                   {kc, "k_cache"},
                                   {vc, "v_cache"},
                                   {&p->block_tables, "block_tables"},
                                   {&p->seq_lens, "seq_lens"},
                                   {&p->cu_seqlens_q, "cu_seqlens_q"},
                                   {&p->alibi_slopes, "alibi_slopes"},
                                   {&p->k_scale, "k_scale"},
                                   {&p->v_scale, "v_scale"}};
    PF_TRY(pf_check_outputs_disjoint(outs, PF_COUNT(outs), ins, PF_COUNT(ins)));
    PF_TRY(pf_check_disjoint(&p->lse, "lse", &p->out, "out")); /* the two outputs */

    /* values of the index tensors */
    if (pf_tensor_on_host(&p->block_tables) && pf_tensor_on_host(&p->seq_lens) &&
        (!has_cu || pf_tensor_on_host(&p->cu_seqlens_q))) {
        PF_TRY(check_paged_indices_host(p, batch, has_cu, q_len_dense));
    } else {
        /* Device-resident block_tables / seq_lens / cu_seqlens_q are not read here (that
         * would need a synchronizing copy). The CUDA paged kernel treats a block id outside
         * [0, num_blocks) as contributing nothing, clamps seq_len to the table's capacity
         * and cu_seqlens_q to q, and never addresses memory outside k_cache / v_cache
         * (tests/ops/test_paged_attn.py::test_bad_block_ids_in_device_tables, sanitizer-clean). */
    }
    return PF_STATUS_OK;
}

/* ---- merge of attention states ---- */

/* The layouts an lse of merge_attn_states may have, for out [..., num_heads, head_dim]:
 * PF_MERGE_LSE_HEADS_TOKENS [num_heads, tokens] (tokens = the product of out's leading
 * dimensions: paged_attn's and flash_attn_varlen's lse), or, for a 4-d out [batch, seqlen,
 * num_heads, head_dim], PF_MERGE_LSE_BATCH_HEADS [batch, num_heads, seqlen] (flash_attn's). */
typedef enum pf_merge_lse_layout {
    PF_MERGE_LSE_NONE,
    PF_MERGE_LSE_HEADS_TOKENS,
    PF_MERGE_LSE_BATCH_HEADS
} pf_merge_lse_layout;

static pf_merge_lse_layout merge_lse_layout(const pf_tensor *l, const pf_tensor *out) {
    const int nd = out->ndim;
    int64_t tokens = 1;
    for (int i = 0; i < nd - 2; i++) tokens *= out->shape[i];
    if (l->ndim == 2 && l->shape[0] == out->shape[nd - 2] && l->shape[1] == tokens) return PF_MERGE_LSE_HEADS_TOKENS;
    if (nd == 4 && l->ndim == 3 && l->shape[0] == out->shape[0] && l->shape[1] == out->shape[2] &&
        l->shape[2] == out->shape[1])
        return PF_MERGE_LSE_BATCH_HEADS;
    return PF_MERGE_LSE_NONE;
}

pf_status pf_merge_attn_states_validate(const pf_merge_params *p) {
    char s1[128], s2[128], s3[128];
    PF_CHECK_VALUE(p != NULL, "params: NULL");
    const pf_tensor *a = &p->out_a;
    PF_TRY(pf_check_present(a, "out_a"));
    PF_TRY(pf_check_float_dtype(a, "out_a"));
    PF_TRY(pf_check_last_contiguous(a, "out_a"));
    PF_CHECK_VALUE(a->ndim >= 2, "out_a: expected [..., num_heads, head_dim] (>= 2-d), got shape %s",
                   pf_shape_str(a, s1, sizeof s1));
    PF_CHECK_VALUE(a->shape[a->ndim - 2] >= 1 && a->shape[a->ndim - 1] >= 1,
                   "out_a: num_heads and head_dim must be >= 1, got shape %s", pf_shape_str(a, s1, sizeof s1));
    PF_TRY(pf_check_float_like(&p->out_b, "out_b", a, "out_a"));
    PF_TRY(pf_check_same_shape(&p->out_b, "out_b", a, "out_a"));
    PF_TRY(pf_check_float_like(&p->out, "out", a, "out_a"));
    PF_TRY(pf_check_same_shape(&p->out, "out", a, "out_a"));
    PF_TRY(pf_check_nonneg_strides(&p->out, "out"));

    pf_tensor want = {0}; /* [num_heads, tokens], for the message and the row count */
    want.ndim = 2;
    want.shape[0] = a->shape[a->ndim - 2];
    want.shape[1] = 1;
    for (int i = 0; i < a->ndim - 2; i++) want.shape[1] *= a->shape[i];
    pf_tensor flash = {0}; /* [batch, num_heads, seqlen] where out_a is 4-d */
    if (a->ndim == 4) {
        flash.ndim = 3;
        flash.shape[0] = a->shape[0];
        flash.shape[1] = a->shape[2];
        flash.shape[2] = a->shape[1];
    }
    const char *names[3] = {"lse_a", "lse_b", "lse"};
    const pf_tensor *lses[3] = {&p->lse_a, &p->lse_b, &p->lse};
    for (int i = 0; i < 3; i++) {
        const pf_tensor *l = lses[i];
        if (i == 2 && !pf_tensor_present(l) && l->ndim == 0) break; /* lse output is optional */
        PF_TRY(pf_check_present(l, names[i]));
        PF_TRY(pf_check_dtype(l, names[i], PF_DTYPE_F32));
        if (a->ndim == 4)
            PF_CHECK_VALUE(merge_lse_layout(l, a) != PF_MERGE_LSE_NONE,
                           "%s: expected [num_heads, tokens] %s or [batch, num_heads, seqlen] %s for out_a [batch, "
                           "seqlen, num_heads, head_dim], got %s",
                           names[i], pf_shape_str(&want, s1, sizeof s1), pf_shape_str(&flash, s2, sizeof s2),
                           pf_shape_str(l, s3, sizeof s3));
        else
            PF_TRY(pf_check_same_shape(l, names[i], &want, "[num_heads, tokens]"));
        PF_TRY(pf_check_same_device(l, names[i], a, "out_a"));
        if (i == 2) PF_TRY(pf_check_nonneg_strides(l, names[i]));
    }
    /* in place: out may be out_a or out_b (lse: lse_a or lse_b) as the very same view; any
     * other sharing of memory between an output and an input is refused */
    const pf_named_tensor ins[] = {
        {&p->out_a, "out_a"}, {&p->lse_a, "lse_a"}, {&p->out_b, "out_b"}, {&p->lse_b, "lse_b"}};
    const pf_named_tensor outs[] = {{&p->out, "out"}, {&p->lse, "lse"}};
    for (int o = 0; o < PF_COUNT(outs); o++)
        for (int i = 0; i < PF_COUNT(ins); i++)
            if (!pf_tensor_same_view(outs[o].t, ins[i].t))
                PF_TRY(pf_check_disjoint(outs[o].t, outs[o].name, ins[i].t, ins[i].name));
    PF_TRY(pf_check_disjoint(&p->lse, "lse", &p->out, "out")); /* the two outputs */
    const pf_backend *be;
    PF_TRY(pf_check_backend(&p->out, "out", &be));
    PF_CHECK(!be->limits.max_merge_dims || a->ndim - 2 <= be->limits.max_merge_dims, PF_STATUS_NOT_SUPPORTED,
             "out_a: at most %d leading dimensions are supported on %s, got %d", (int)be->limits.max_merge_dims,
             be->name, (int)(a->ndim - 2));
    PF_CHECK(!be->limits.max_rows || want.shape[0] * want.shape[1] <= be->limits.max_rows, PF_STATUS_NOT_SUPPORTED,
             "out_a: too many rows (tokens x heads = %lld) for %s, at most %lld",
             (long long)(want.shape[0] * want.shape[1]), be->name, (long long)be->limits.max_rows);
    return PF_STATUS_OK;
}

/* lse as the backends take it (backend.h): [..., num_heads] over out's leading dimensions, for
 * either layout of a validated lse; an absent lse stays absent. */
void pf_merge_lse_view(const pf_tensor *lse, const pf_tensor *out, pf_tensor *view) {
    *view = *lse;
    if (!pf_tensor_present(lse) && lse->ndim == 0) return;
    const int nlead = out->ndim - 2;
    view->ndim = nlead + 1;
    for (int i = 0; i < nlead; i++) view->shape[i] = out->shape[i];
    view->shape[nlead] = out->shape[nlead];
    if (merge_lse_layout(lse, out) == PF_MERGE_LSE_BATCH_HEADS) { /* [b, h, s] -> [b, s, h] */
        view->strides[0] = lse->strides[0];
        view->strides[1] = lse->strides[2];
        view->strides[2] = lse->strides[1];
        return;
    }
    int64_t step = lse->strides[1]; /* [h, tokens] -> [lead..., h], tokens row-major over lead */
    view->strides[nlead] = lse->strides[0];
    for (int i = nlead - 1; i >= 0; i--) { /* the token strides of the lse's elements */
        view->strides[i] = step;
        if (i > 0) step *= out->shape[i];
    }
}

/* ---- cache operations ---- */

pf_status pf_write_kv_cache_validate(pf_tensor k, pf_tensor v, pf_tensor k_cache, pf_tensor v_cache,
                                     pf_tensor slot_mapping) {
    const pf_tensor none = {0};
    return pf_write_kv_cache_scaled_validate(k, v, k_cache, v_cache, slot_mapping, none, none);
}

pf_status pf_write_kv_cache_scaled_validate(pf_tensor k, pf_tensor v, pf_tensor k_cache, pf_tensor v_cache,
                                            pf_tensor slot_mapping, pf_tensor k_scale, pf_tensor v_scale) {
    const pf_tensor *kc = &k_cache;
    const int quant = pf_dtype_compressed(k_cache.dtype);
    PF_TRY(check_cache_pair(kc, &v_cache, NULL, NULL));
    PF_TRY(pf_check_rank(kc, "k_cache", 4));
    PF_TRY(pf_check_nonneg_strides(kc, "k_cache"));
    PF_TRY(pf_check_same_shape(&v_cache, "v_cache", kc, "k_cache"));
    PF_TRY(pf_check_nonneg_strides(&v_cache, "v_cache"));

    if (quant) { /* k, v: any float dtype, quantized on the way in */
        PF_TRY(pf_check_present(&k, "k"));
        PF_TRY(pf_check_float_dtype(&k, "k"));
        PF_TRY(pf_check_last_contiguous(&k, "k"));
        PF_TRY(pf_check_same_device(&k, "k", kc, "k_cache"));
    } else {
        PF_TRY(pf_check_float_like(&k, "k", kc, "k_cache"));
    }
    PF_TRY(pf_check_rank(&k, "k", 3));
    PF_TRY(pf_check_dim(&k, "k", 1, kc->shape[2], "num_kv_heads, as in k_cache"));
    PF_TRY(pf_check_dim(&k, "k", 2, kc->shape[3], "head_dim, as in k_cache"));
    PF_TRY(pf_check_float_like(&v, "v", &k, quant ? "k" : "k_cache"));
    PF_TRY(pf_check_same_shape(&v, "v", &k, "k"));

    PF_TRY(check_index(&slot_mapping, "slot_mapping", PF_DTYPE_I64, 1, kc, "k_cache"));
    PF_CHECK_VALUE(slot_mapping.shape[0] == k.shape[0],
                   "slot_mapping: expected length %lld (num_tokens, dimension 0 of k), got %lld", (long long)k.shape[0],
                   (long long)slot_mapping.shape[0]);

    const pf_backend *be;
    PF_TRY(pf_check_backend(kc, "k_cache", &be));
    PF_TRY(check_backend_kv_quant(be, kc));
    int k_rows, v_rows; /* per-(token, head) scales: written by the call */
    PF_TRY(check_kv_scale(&k_scale, "k_scale", kc, "k_cache", &k_rows));
    PF_TRY(check_kv_scale(&v_scale, "v_scale", &v_cache, "v_cache", &v_rows));
    const pf_tensor none = {0};
    const pf_named_tensor outs[] = {{kc, "k_cache"},
                                    {&v_cache, "v_cache"},
                                    {k_rows ? &k_scale : &none, "k_scale"},
                                    {v_rows ? &v_scale : &none, "v_scale"}};
    const pf_named_tensor ins[] = {{&k, "k"},
                                   {&v, "v"},
                                   {&slot_mapping, "slot_mapping"},
                                   {k_rows ? &none : &k_scale, "k_scale"},
                                   {v_rows ? &none : &v_scale, "v_scale"}};
    PF_TRY(pf_check_outputs_disjoint(outs, PF_COUNT(outs), ins, PF_COUNT(ins)));
    for (int i = 2; i < PF_COUNT(outs); i++) /* written scales against the other outputs (the caches may
                                                interleave: a combined [num_blocks, 2, ...] cache) */
        for (int j = 0; j < i; j++) PF_TRY(pf_check_disjoint(outs[i].t, outs[i].name, outs[j].t, outs[j].name));
    PF_CHECK(!be->limits.max_rows || k.shape[0] * kc->shape[2] <= be->limits.max_rows, PF_STATUS_NOT_SUPPORTED,
             "k: too many rows (tokens x kv heads = %lld) for %s, at most %lld", (long long)(k.shape[0] * kc->shape[2]),
             be->name, (long long)be->limits.max_rows);

    if (pf_tensor_on_host(&slot_mapping)) {
        const int64_t num_slots = kc->shape[0] * kc->shape[1];
        const int64_t *sm = (const int64_t *)slot_mapping.data;
        for (int64_t t = 0; t < slot_mapping.shape[0]; t++) {
            int64_t slot = sm[t * slot_mapping.strides[0]];
            PF_CHECK_VALUE(slot < num_slots,
                           "slot_mapping: slot_mapping[%lld] = %lld is out of range: the cache holds "
                           "%lld slots (num_blocks %lld x block_size %lld); negative = skip",
                           (long long)t, (long long)slot, (long long)num_slots, (long long)kc->shape[0],
                           (long long)kc->shape[1]);
        }
        if (quant && pf_tensor_on_host(&k) && pf_tensor_on_host(&v)) {
            PF_TRY(check_finite_rows(&k, "k", &slot_mapping, kc->dtype));
            PF_TRY(check_finite_rows(&v, "v", &slot_mapping, kc->dtype));
        }
    } else {
        /* A device-resident slot_mapping is bound-checked by the CUDA kernel: slots
         * >= num_blocks * block_size are skipped, never written. */
    }
    return PF_STATUS_OK;
}

/* block_mapping: int64 [n, 2]; when host-readable, ids within [0, src_blocks) and
 * [0, dst_blocks). Names the cache the bound comes from. */
static pf_status check_block_mapping(const pf_tensor *m, int64_t src_blocks, const char *src_name, int64_t dst_blocks,
                                     const char *dst_name) {
    char s1[128];
    PF_TRY(check_index(m, "block_mapping", PF_DTYPE_I64, 2, NULL, NULL));
    PF_CHECK_VALUE(m->shape[1] == 2, "block_mapping: expected shape [n, 2] ((src, dst) pairs), got %s",
                   pf_shape_str(m, s1, sizeof s1));
    if (!pf_tensor_on_host(m)) return PF_STATUS_OK;
    for (int64_t i = 0; i < m->shape[0]; i++) {
        int64_t src = at_i64_2(m, i, 0), dst = at_i64_2(m, i, 1);
        PF_CHECK_VALUE(src >= 0 && src < src_blocks,
                       "block_mapping: block_mapping[%lld, 0] = %lld (src) is out of range [0, "
                       "%lld) (num_blocks of %s)",
                       (long long)i, (long long)src, (long long)src_blocks, src_name);
        PF_CHECK_VALUE(dst >= 0 && dst < dst_blocks,
                       "block_mapping: block_mapping[%lld, 1] = %lld (dst) is out of range [0, "
                       "%lld) (num_blocks of %s)",
                       (long long)i, (long long)dst, (long long)dst_blocks, dst_name);
    }
    return PF_STATUS_OK;
}

/* A cache for copy/swap: rank >= 1, a known dtype, last dim contiguous, no negative strides. */
static pf_status check_cache(const pf_tensor *t, const char *name) {
    PF_TRY(pf_check_present(t, name));
    PF_CHECK_VALUE(t->ndim >= 1, "%s: expected [num_blocks, ...] (>= 1-d), got a scalar", name);
    PF_CHECK_TYPE(pf_dtype_size(t->dtype) > 0, "%s: invalid dtype", name);
    PF_TRY(pf_check_last_contiguous(t, name));
    PF_TRY(pf_check_nonneg_strides(t, name));
    return PF_STATUS_OK;
}

pf_status pf_copy_blocks_validate(const pf_tensor *caches, int32_t num_caches, pf_tensor block_mapping) {
    PF_CHECK_VALUE(num_caches >= 0, "caches: num_caches must be >= 0, got %d", (int)num_caches);
    PF_CHECK_VALUE(num_caches == 0 || caches != NULL, "caches: NULL with num_caches = %d", (int)num_caches);
    char name[32], fewest_name[32] = "caches";
    int64_t fewest = INT64_MAX;
    for (int32_t c = 0; c < num_caches; c++) {
        snprintf(name, sizeof name, "caches[%d]", (int)c);
        PF_TRY(check_cache(&caches[c], name));
        if (c > 0) PF_TRY(pf_check_same_device(&caches[c], name, &caches[0], "caches[0]"));
        if (caches[c].shape[0] < fewest) {
            fewest = caches[c].shape[0];
            memcpy(fewest_name, name, sizeof name);
        }
    }
    if (num_caches > 0 && caches[0].device == PF_DEVICE_CUDA) {
        PF_CHECK_VALUE(pf_tensor_on_host(&block_mapping) || block_mapping.device_id == caches[0].device_id,
                       "block_mapping: expected host memory or the caches' device cuda:%d, got "
                       "cuda:%d",
                       (int)caches[0].device_id, (int)block_mapping.device_id);
        /* A device-resident block_mapping is bound-checked by the CUDA kernel: a pair with
         * an id outside a cache is skipped for that cache. */
    } else {
        PF_CHECK_VALUE(pf_tensor_on_host(&block_mapping),
                       "block_mapping: expected host memory for host caches, got a CUDA tensor");
    }
    /* every id against the cache with the fewest blocks, i.e. against every cache */
    PF_TRY(check_block_mapping(&block_mapping, fewest, fewest_name, fewest, fewest_name));
    /* the caches are written in place (and may be views of one tensor); the mapping is read */
    for (int32_t c = 0; c < num_caches; c++) {
        snprintf(name, sizeof name, "caches[%d]", (int)c);
        PF_TRY(pf_check_disjoint(&caches[c], name, &block_mapping, "block_mapping"));
    }
    return PF_STATUS_OK;
}

pf_status pf_swap_blocks_validate(pf_tensor src, pf_tensor dst, pf_tensor block_mapping) {
    char s1[128], s2[128];
    PF_TRY(check_cache(&src, "src"));
    PF_TRY(check_cache(&dst, "dst"));
    PF_CHECK_TYPE(src.dtype == dst.dtype, "dst: expected dtype %s (the dtype of src), got %s", pf_dtype_name(src.dtype),
                  pf_dtype_name(dst.dtype));
    int same = src.ndim == dst.ndim;
    for (int i = 1; same && i < src.ndim; i++) same = src.shape[i] == dst.shape[i];
    PF_CHECK_VALUE(same,
                   "dst: expected the block shape of src (all dimensions but the first), src has "
                   "shape %s, dst %s",
                   pf_shape_str(&src, s1, sizeof s1), pf_shape_str(&dst, s2, sizeof s2));
    PF_CHECK_VALUE(pf_tensor_on_host(&block_mapping),
                   "block_mapping: expected host memory (the copies are issued from the host), "
                   "got a CUDA tensor");
    PF_TRY(check_block_mapping(&block_mapping, src.shape[0], "src", dst.shape[0], "dst"));
    const pf_named_tensor outs[] = {{&dst, "dst"}};
    const pf_named_tensor ins[] = {{&src, "src"}, {&block_mapping, "block_mapping"}};
    PF_TRY(pf_check_outputs_disjoint(outs, PF_COUNT(outs), ins, PF_COUNT(ins)));
    return PF_STATUS_OK;
}

pf_status pf_swap_blocks_scaled_validate(pf_tensor src, pf_tensor dst, pf_tensor src_scale, pf_tensor dst_scale,
                                         pf_tensor block_mapping) {
    PF_TRY(pf_swap_blocks_validate(src, dst, block_mapping));
    const int has_src = pf_tensor_present(&src_scale) || src_scale.ndim > 0;
    const int has_dst = pf_tensor_present(&dst_scale) || dst_scale.ndim > 0;
    PF_CHECK_VALUE(has_src == has_dst, "%s: missing; src_scale and dst_scale move together (both or neither)",
                   has_src ? "dst_scale" : "src_scale");
    if (!has_src) return PF_STATUS_OK;
    int per_row;
    PF_CHECK_TYPE(src.dtype == PF_DTYPE_I8,
                  "src_scale: per-(token, head) scales move with int8 caches, src is %s (per-tensor scales do "
                  "not move: use the same on both sides)",
                  pf_dtype_name(src.dtype));
    PF_TRY(check_kv_scale(&src_scale, "src_scale", &src, "src", &per_row));
    PF_CHECK_VALUE(per_row,
                   "src_scale: expected a per-(token, head) scale [num_blocks, block_size, num_kv_heads] "
                   "(per-tensor scales do not move: use the same on both sides)");
    PF_TRY(check_kv_scale(&dst_scale, "dst_scale", &dst, "dst", &per_row));
    PF_CHECK_VALUE(per_row,
                   "dst_scale: expected a per-(token, head) scale [num_blocks, block_size, num_kv_heads] "
                   "(per-tensor scales do not move: use the same on both sides)");
    PF_TRY(pf_swap_blocks_validate(src_scale, dst_scale, block_mapping));
    const pf_named_tensor outs[] = {{&dst, "dst"}, {&dst_scale, "dst_scale"}};
    const pf_named_tensor ins[] = {{&src, "src"}, {&src_scale, "src_scale"}};
    PF_TRY(pf_check_outputs_disjoint(outs, PF_COUNT(outs), ins, PF_COUNT(ins)));
    PF_TRY(pf_check_disjoint(&dst_scale, "dst_scale", &dst, "dst"));
    return PF_STATUS_OK;
}
