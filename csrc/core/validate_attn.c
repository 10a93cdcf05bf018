/*
 * validate_attn.c - the one place attention params are checked before any
 * backend runs (forward, backward, dropout mask): shapes, dtypes, devices,
 * options, the kernel hint, and the limits of the backend that will run the
 * call. Every failure names the argument, what was expected and what was given.
 */
#include "validate.h"

/* cu_seqlens: int32 [batch + 1], 0 = first, non-decreasing, last = total. */
static pf_status check_cu_seqlens(const pf_tensor *cu, const char *name, int64_t batch1, int64_t total,
                                  const pf_tensor *q) {
    PF_TRY(pf_check_dtype(cu, name, PF_DTYPE_I32));
    PF_TRY(pf_check_rank(cu, name, 1));
    PF_CHECK_VALUE(cu->shape[0] == batch1, "%s: expected length %lld (batch + 1), got %lld", name, (long long)batch1,
                   (long long)cu->shape[0]);
    PF_TRY(pf_check_same_device(cu, name, q, "q"));
    if (!pf_tensor_on_host(cu)) return PF_STATUS_OK; /* device values are checked by the kernel */
    PF_CHECK_VALUE(cu->strides[0] == 1 || cu->shape[0] <= 1, "%s: must be contiguous", name);
    const int32_t *c = (const int32_t *)cu->data;
    PF_CHECK_VALUE(c[0] == 0, "%s: expected %s[0] == 0, got %d", name, name, (int)c[0]);
    for (int64_t i = 1; i < batch1; i++)
        PF_CHECK_VALUE(c[i] >= c[i - 1], "%s: must be non-decreasing, but %s[%lld] = %d < %s[%lld] = %d", name, name,
                       (long long)i, (int)c[i], name, (long long)(i - 1), (int)c[i - 1]);
    PF_CHECK_VALUE(c[batch1 - 1] == total, "%s: the last entry must equal the number of packed tokens %lld, got %d",
                   name, (long long)total, (int)c[batch1 - 1]);
    return PF_STATUS_OK;
}

static pf_status validate_common(const pf_attn_params *p, int backward) {
    const pf_tensor *q = &p->q, *k = &p->k, *v = &p->v;
    PF_CHECK_VALUE(q->ndim >= 1, "q: expected a 4-d (or packed 3-d) tensor, got a scalar");
    PF_TRY(pf_check_float_dtype(q, "q"));
    PF_TRY(pf_check_last_contiguous(q, "q"));
    PF_TRY(pf_check_float_like(k, "k", q, "q"));
    PF_TRY(pf_check_float_like(v, "v", q, "q"));
    PF_CHECK_VALUE(
        q->device != PF_DEVICE_CUDA || !pf_tensor_present(&p->alibi_slopes) || p->alibi_slopes.device == PF_DEVICE_CUDA,
        "alibi_slopes: expected the device of q");

    int varlen = pf_tensor_present(&p->cu_seqlens_q) || pf_tensor_present(&p->cu_seqlens_k) || p->cu_seqlens_q.ndim > 0;
    int rank = varlen ? 3 : 4;
    PF_TRY(pf_check_rank(q, "q", rank));
    PF_TRY(pf_check_rank(k, "k", rank));
    PF_TRY(pf_check_rank(v, "v", rank));
    PF_TRY(pf_check_same_shape(v, "v", k, "k"));
    int hd = rank - 1, hh = rank - 2;
    int64_t d = q->shape[hd];
    PF_CHECK_VALUE(d >= 1 && d <= PF_MAX_HEAD_DIM, "q: head_dim must be in [1, %d], got %lld", PF_MAX_HEAD_DIM,
                   (long long)d);
    PF_TRY(pf_check_dim(k, "k", hd, d, "head_dim, as in q"));
    int64_t h = q->shape[hh], hk = k->shape[hh];
    PF_CHECK_VALUE(hk >= 1, "k: num_kv_heads must be >= 1, got %lld", (long long)hk);
    PF_CHECK_VALUE(h >= 1 && h % hk == 0,
                   "q: num_heads (%lld) must be a positive multiple of num_kv_heads (%lld, from k)", (long long)h,
                   (long long)hk);
    int64_t batch;
    if (varlen) {
        PF_CHECK_VALUE(pf_tensor_present(&p->cu_seqlens_q) || p->cu_seqlens_q.ndim > 0,
                       "cu_seqlens_q: required with cu_seqlens_k");
        PF_CHECK_VALUE(pf_tensor_present(&p->cu_seqlens_k) || p->cu_seqlens_k.ndim > 0,
                       "cu_seqlens_k: required with cu_seqlens_q");
        /* given but not 1-d (a 0-d array, say): the rank is what is wrong */
        PF_TRY(pf_check_rank(&p->cu_seqlens_q, "cu_seqlens_q", 1));
        PF_TRY(pf_check_rank(&p->cu_seqlens_k, "cu_seqlens_k", 1));
        batch = p->cu_seqlens_q.shape[0] - 1;
        PF_CHECK_VALUE(batch >= 0, "cu_seqlens_q: expected length batch + 1 >= 1, got 0");
        PF_TRY(check_cu_seqlens(&p->cu_seqlens_q, "cu_seqlens_q", batch + 1, q->shape[0], q));
        PF_TRY(check_cu_seqlens(&p->cu_seqlens_k, "cu_seqlens_k", batch + 1, k->shape[0], q));
        PF_CHECK_VALUE(p->max_seqlen_q >= 0 && p->max_seqlen_k >= 0,
                       "max_seqlen_q/max_seqlen_k: must be >= 0, got %lld and %lld", (long long)p->max_seqlen_q,
                       (long long)p->max_seqlen_k);
    } else {
        batch = q->shape[0];
        PF_TRY(pf_check_dim(k, "k", 0, batch, "batch, as in q"));
    }

    /* masking options */
    PF_TRY(pf_check_mask_options(p->window_left, p->window_right, p->softcap, p->softmax_scale));
    PF_CHECK_VALUE(p->dropout_p >= 0.0f && p->dropout_p < 1.0f, "dropout_p: must be in [0, 1), got %g",
                   (double)p->dropout_p);
    PF_TRY(pf_check_alibi(&p->alibi_slopes, h, batch, q));

    /* the backend of q's device: its limits, and the kernel hint */
    const pf_backend *be;
    PF_TRY(pf_check_backend(q, "q", &be));
    const pf_backend_limits *lim = &be->limits;
    const int64_t sq = q->shape[0 + !varlen], sk = k->shape[0 + !varlen];
    PF_CHECK(!lim->max_seqlen || (sq < lim->max_seqlen && sk < lim->max_seqlen), PF_STATUS_NOT_SUPPORTED,
             "q/k: sequence lengths (or packed totals) must be < %lld on %s, got %lld and %lld",
             (long long)lim->max_seqlen, be->name, (long long)sq, (long long)sk);
    PF_CHECK(!lim->max_heads || h <= lim->max_heads, PF_STATUS_NOT_SUPPORTED,
             "q: num_heads must be <= %lld on %s, got %lld", (long long)lim->max_heads, be->name, (long long)h);
    PF_CHECK(!lim->max_batch || batch <= lim->max_batch, PF_STATUS_NOT_SUPPORTED,
             "q: batch must be <= %lld on %s, got %lld", (long long)lim->max_batch, be->name, (long long)batch);
    PF_TRY(pf_check_kernel_hint(p->kernel, PF_HINT_FLASH, backward ? "flash_bwd" : "flash_fwd"));

    /* lse */
    const pf_tensor *lse = &p->lse;
    if (pf_tensor_present(lse) || backward || lse->ndim > 0) {
        pf_tensor want = {0};
        if (varlen) {
            want.ndim = 2;
            want.shape[0] = h;
            want.shape[1] = q->shape[0];
        } else {
            want.ndim = 3;
            want.shape[0] = batch;
            want.shape[1] = h;
            want.shape[2] = q->shape[1];
        }
        PF_TRY(pf_check_dtype(lse, "lse", PF_DTYPE_F32));
        PF_TRY(
            pf_check_same_shape(lse, "lse", &want, varlen ? "[num_heads, total_q]" : "[batch, num_heads, seqlen_q]"));
        PF_TRY(pf_check_same_device(lse, "lse", q, "q"));
        if (!backward) PF_TRY(pf_check_nonneg_strides(lse, "lse")); /* an output of the forward */
    }
    return PF_STATUS_OK;
}

/* An output: q's dtype, the shape of `ref`, last dim contiguous, no negative strides. */
static pf_status check_output(const pf_tensor *t, const char *name, const pf_tensor *ref, const char *ref_name,
                              const pf_tensor *q) {
    PF_TRY(pf_check_float_like(t, name, q, "q"));
    PF_TRY(pf_check_same_shape(t, name, ref, ref_name));
    PF_TRY(pf_check_nonneg_strides(t, name));
    return PF_STATUS_OK;
}

/* An input of q's dtype and device with the shape of `ref` (any strides). */
static pf_status check_input(const pf_tensor *t, const char *name, const pf_tensor *ref, const char *ref_name,
                             const pf_tensor *q) {
    PF_TRY(pf_check_float_like(t, name, q, "q"));
    PF_TRY(pf_check_same_shape(t, name, ref, ref_name));
    return PF_STATUS_OK;
}

pf_status pf_flash_fwd_validate(const pf_attn_params *p) {
    PF_CHECK_VALUE(p != NULL, "params: NULL");
    PF_TRY(validate_common(p, 0));
    PF_TRY(check_output(&p->out, "out", &p->q, "q", &p->q));
    const pf_named_tensor outs[] = {{&p->out, "out"}, {&p->lse, "lse"}};
    const pf_named_tensor ins[] = {{&p->q, "q"},
                                   {&p->k, "k"},
                                   {&p->v, "v"},
                                   {&p->alibi_slopes, "alibi_slopes"},
                                   {&p->cu_seqlens_q, "cu_seqlens_q"},
                                   {&p->cu_seqlens_k, "cu_seqlens_k"}};
    PF_TRY(pf_check_outputs_disjoint(outs, PF_COUNT(outs), ins, PF_COUNT(ins)));
    PF_TRY(pf_check_disjoint(&p->lse, "lse", &p->out, "out")); /* the two outputs, written concurrently */
    return PF_STATUS_OK;
}

pf_status pf_flash_bwd_validate(const pf_attn_params *p) {
    PF_CHECK_VALUE(p != NULL, "params: NULL");
    PF_CHECK_VALUE(pf_tensor_present(&p->lse) || p->lse.ndim > 0,
                   "lse: required by the backward (the forward's log-sum-exp, return_lse=True)");
    PF_CHECK_VALUE(pf_tensor_present(&p->dout) || p->dout.ndim > 0, "dout: missing");
    PF_CHECK_VALUE(pf_tensor_present(&p->out) || p->out.ndim > 0,
                   "out: required by the backward (the forward's output)");
    PF_CHECK_VALUE(pf_tensor_present(&p->dq) || p->dq.ndim > 0, "dq: missing");
    PF_CHECK_VALUE(pf_tensor_present(&p->dk) || p->dk.ndim > 0, "dk: missing");
    PF_CHECK_VALUE(pf_tensor_present(&p->dv) || p->dv.ndim > 0, "dv: missing");
    PF_TRY(validate_common(p, 1));
    PF_TRY(check_input(&p->out, "out", &p->q, "q", &p->q));
    PF_TRY(check_input(&p->dout, "dout", &p->q, "q", &p->q));
    PF_TRY(check_output(&p->dq, "dq", &p->q, "q", &p->q));
    PF_TRY(check_output(&p->dk, "dk", &p->k, "k", &p->q));
    PF_TRY(check_output(&p->dv, "dv", &p->v, "v", &p->q));
    /* dq, dk, dv may share memory with each other (views of one packed gradient), not with an input */
    const pf_named_tensor outs[] = {{&p->dq, "dq"}, {&p->dk, "dk"}, {&p->dv, "dv"}};
    const pf_named_tensor ins[] = {{&p->dout, "dout"},
                                   {&p->q, "q"},
                                   {&p->k, "k"},
                                   {&p->v, "v"},
                                   {&p->out, "out"},
                                   {&p->lse, "lse"},
                                   {&p->alibi_slopes, "alibi_slopes"},
                                   {&p->cu_seqlens_q, "cu_seqlens_q"},
                                   {&p->cu_seqlens_k, "cu_seqlens_k"}};
    PF_TRY(pf_check_outputs_disjoint(outs, PF_COUNT(outs), ins, PF_COUNT(ins)));
    return PF_STATUS_OK;
}

/*
 * The dropout mask: q and k describe the problem (v may be absent); mask is u8
 * [batch, num_heads, Sq, Sk] with Sq = seqlen_q, Sk = seqlen_k (dense) or, for
 * varlen, Sq >= every sequence's query length and Sk >= every key length.
 */
pf_status pf_dropout_mask_validate(const pf_attn_params *p, const pf_tensor *mask) {
    PF_CHECK_VALUE(p != NULL && mask != NULL, "params: NULL");
    pf_attn_params tmp = *p;
    if (!pf_tensor_present(&tmp.v) && tmp.v.ndim == 0) tmp.v = tmp.k;
    PF_TRY(validate_common(&tmp, 0));
    PF_TRY(pf_check_dtype(mask, "mask", PF_DTYPE_U8));
    PF_TRY(pf_check_rank(mask, "mask", 4));
    PF_TRY(pf_check_same_device(mask, "mask", &p->q, "q"));
    PF_TRY(pf_check_nonneg_strides(mask, "mask"));
    const pf_named_tensor outs[] = {{mask, "mask"}};
    const pf_named_tensor ins[] = {
        {&p->q, "q"}, {&p->k, "k"}, {&p->cu_seqlens_q, "cu_seqlens_q"}, {&p->cu_seqlens_k, "cu_seqlens_k"}};
    PF_TRY(pf_check_outputs_disjoint(outs, PF_COUNT(outs), ins, PF_COUNT(ins)));
    char sbuf[128];
    int varlen = pf_tensor_present(&p->cu_seqlens_q);
    const pf_backend *be;
    PF_TRY(pf_check_backend(&p->q, "q", &be));
    PF_CHECK(!varlen || be->limits.dropout_mask_varlen, PF_STATUS_NOT_SUPPORTED,
             "cu_seqlens_q: the dropout mask of packed (varlen) layouts is not implemented on %s; compute "
             "it on the CPU (it is the same mask)",
             be->name);
    int64_t batch, h = p->q.shape[varlen ? 1 : 2], sq = 0, sk = 0;
    if (varlen) {
        batch = p->cu_seqlens_q.shape[0] - 1;
        if (pf_tensor_on_host(&p->cu_seqlens_q)) {
            const int32_t *cq = (const int32_t *)p->cu_seqlens_q.data;
            const int32_t *ck = (const int32_t *)p->cu_seqlens_k.data;
            for (int64_t b = 0; b < batch; b++) {
                if (cq[b + 1] - cq[b] > sq) sq = cq[b + 1] - cq[b];
                if (ck[b + 1] - ck[b] > sk) sk = ck[b + 1] - ck[b];
            }
        }
        PF_CHECK_VALUE(mask->shape[0] == batch && mask->shape[1] == h && mask->shape[2] >= sq && mask->shape[3] >= sk,
                       "mask: expected shape [%lld, %lld, >= %lld, >= %lld] (batch, num_heads, "
                       "longest query and key sequence), got %s",
                       (long long)batch, (long long)h, (long long)sq, (long long)sk,
                       pf_shape_str(mask, sbuf, sizeof sbuf));
    } else {
        batch = p->q.shape[0];
        sq = p->q.shape[1];
        sk = p->k.shape[1];
        PF_CHECK_VALUE(mask->shape[0] == batch && mask->shape[1] == h && mask->shape[2] == sq && mask->shape[3] == sk,
                       "mask: expected shape [%lld, %lld, %lld, %lld] (batch, num_heads, seqlen_q, "
                       "seqlen_k), got %s",
                       (long long)batch, (long long)h, (long long)sq, (long long)sk,
                       pf_shape_str(mask, sbuf, sizeof sbuf));
    }
    return PF_STATUS_OK;
}
