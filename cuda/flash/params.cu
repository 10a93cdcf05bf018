/*
 * flash/params.cu - fill_flash_params: a validated pf_attn_params (the core
 * checked shapes, dtypes, strides and the backend's limits) -> FlashParams
 * (flash/params.h), shared by the forward and the backward launchers: int64
 * element strides per (batch, row, head) with the batch stride 0 for packed
 * varlen layouts, whether every tensor allows 16-byte vector access, the
 * softmax scale and its log2-domain products, the window with "wider than any
 * sequence" turned into "unbounded", and the dropout threshold.
 */
#include <math.h>
#include <string.h>

#include "attn/math.cuh"
#include "flash/params.h"
#include "pagedflash_philox.h"
#include "pf_error.h"

namespace pf {
namespace cuda {

static void strides3(const pf_tensor &t, bool varlen, int64_t *bs, int64_t *rs, int64_t *hs) {
    if (varlen) {
        *bs = 0;
        *rs = t.strides[0];
        *hs = t.strides[1];
    } else {
        *bs = t.strides[0];
        *rs = t.strides[1];
        *hs = t.strides[2];
    }
}

/* 16-byte vector access is valid: base aligned, every stride a multiple of 8 elements. */
static bool vec_ok(const pf_tensor &t, bool varlen) {
    if (!t.data) return true;
    if ((uintptr_t)t.data % 16) return false;
    const int nd = varlen ? 3 : 4;
    for (int i = 0; i < nd - 1; i++)
        if (t.strides[i] % 8 && t.shape[i] > 1) return false;
    return true;
}

pf_status fill_flash_params(const pf_attn_params *a, FlashParams *p, bool backward) {
    memset(p, 0, sizeof *p);
    const bool varlen = a->cu_seqlens_q.data != nullptr;
    p->varlen = varlen;
    const pf_tensor &q = a->q, &k = a->k;
    const int hd = varlen ? 2 : 3, hh = varlen ? 1 : 2;
    const int64_t batch = varlen ? a->cu_seqlens_q.shape[0] - 1 : q.shape[0];
    const int64_t sq = varlen ? q.shape[0] : q.shape[1];
    const int64_t sk = varlen ? k.shape[0] : k.shape[1];
    /* the core checked sq, sk < 2^30 and heads, batch <= 65535 (pf_cuda_backend.limits) */
    p->batch = (int)batch;
    p->num_heads = (int)q.shape[hh];
    p->num_kv_heads = (int)k.shape[hh];
    p->head_group = p->num_heads / p->num_kv_heads;
    p->head_dim = (int)q.shape[hd];
    p->seqlen_q = (int)sq;
    p->seqlen_k = (int)sk;
    p->total_q = varlen ? (int)sq : 0;
    p->total_k = varlen ? (int)sk : 0;
    if (varlen) {
        int64_t mq = a->max_seqlen_q < 1 ? 1 : (a->max_seqlen_q > sq ? sq : a->max_seqlen_q);
        int64_t mk = a->max_seqlen_k < 1 ? 1 : (a->max_seqlen_k > sk ? sk : a->max_seqlen_k);
        p->max_seqlen_q = sq > 0 ? (int)mq : 0;
        p->max_seqlen_k = sk > 0 ? (int)mk : 0;
        p->cu_seqlens_q = (const int32_t *)a->cu_seqlens_q.data;
        p->cu_seqlens_k = (const int32_t *)a->cu_seqlens_k.data;
    } else {
        p->max_seqlen_q = (int)sq;
        p->max_seqlen_k = (int)sk;
    }

    p->q = q.data;
    p->k = k.data;
    p->v = a->v.data;
    p->o = a->out.data;
    strides3(q, varlen, &p->q_batch_stride, &p->q_row_stride, &p->q_head_stride);
    strides3(k, varlen, &p->k_batch_stride, &p->k_row_stride, &p->k_head_stride);
    strides3(a->v, varlen, &p->v_batch_stride, &p->v_row_stride, &p->v_head_stride);
    strides3(a->out, varlen, &p->o_batch_stride, &p->o_row_stride, &p->o_head_stride);
    bool aligned = p->head_dim % 8 == 0 && vec_ok(q, varlen) && vec_ok(k, varlen) && vec_ok(a->v, varlen) &&
                   vec_ok(a->out, varlen);
    if (backward) {
        p->dout = a->dout.data;
        p->dq = a->dq.data;
        p->dk = a->dk.data;
        p->dv = a->dv.data;
        strides3(a->dout, varlen, &p->do_batch_stride, &p->do_row_stride, &p->do_head_stride);
        strides3(a->dq, varlen, &p->dq_batch_stride, &p->dq_row_stride, &p->dq_head_stride);
        strides3(a->dk, varlen, &p->dk_batch_stride, &p->dk_row_stride, &p->dk_head_stride);
        strides3(a->dv, varlen, &p->dv_batch_stride, &p->dv_row_stride, &p->dv_head_stride);
        aligned = aligned && vec_ok(a->dout, varlen) && vec_ok(a->dq, varlen) && vec_ok(a->dk, varlen) &&
                  vec_ok(a->dv, varlen);
    }
    p->aligned = aligned;

    if (a->lse.data) {
        p->lse = (float *)a->lse.data;
        if (varlen) {
            p->lse_batch_stride = 0;
            p->lse_head_stride = a->lse.strides[0];
            p->lse_row_stride = a->lse.strides[1];
        } else {
            p->lse_batch_stride = a->lse.strides[0];
            p->lse_head_stride = a->lse.strides[1];
            p->lse_row_stride = a->lse.strides[2];
        }
    }

    ScoreParams &sp = p->score;
    const float scale = a->softmax_scale; /* used as given (pagedflash.h) */
    sp.softmax_scale = scale;
    sp.scale_log2 = scale * kLog2e;
    if (a->softcap > 0.0f) {
        sp.softcap = a->softcap;
        sp.softcap_inv_scale = scale / a->softcap;
        sp.softcap_log2 = a->softcap * kLog2e;
    }
    if (a->alibi_slopes.data) {
        sp.alibi = (const float *)a->alibi_slopes.data;
        if (a->alibi_slopes.ndim == 1) {
            sp.alibi_batch_stride = 0;
            sp.alibi_head_stride = a->alibi_slopes.strides[0];
        } else {
            sp.alibi_batch_stride = a->alibi_slopes.strides[0];
            sp.alibi_head_stride = a->alibi_slopes.strides[1];
        }
    }
    p->causal = a->causal != 0;
    /* A window wider than any sequence is no window (keeps the kernels' int math small). */
    p->window_left = a->window_left >= 0 && a->window_left < sk ? a->window_left : -1;
    p->window_right = a->window_right >= 0 && a->window_right < sq ? a->window_right : -1;

    p->dropout_p = a->dropout_p;
    p->drop_threshold = pf_dropout_threshold(a->dropout_p);
    p->drop_scale = p->drop_threshold ? 1.0f / (1.0f - a->dropout_p) : 1.0f;
    p->seed = a->seed;
    p->offset = a->offset;
    p->deterministic = a->deterministic != 0;
    return PF_STATUS_OK;
}

}  // namespace cuda
}  // namespace pf
