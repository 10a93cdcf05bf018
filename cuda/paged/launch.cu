/*
 * paged/launch.cu - pf_cuda_paged_attn, the CUDA backend's paged attention:
 *
 *   1. pf_paged_fill_args: the kernels' arguments (paged/args.cuh) from the
 *      validated pf_paged_params (layouts, strides, scale, masking);
 *   2. pf_paged_choose: the one place that decides what runs -- the prefill path
 *      (the sm_90 flash forward reading K/V through the block table,
 *      flash/paged_kv.cuh), the split-KV tensor-core kernel (paged/kernel.cuh, one
 *      instantiation per head dim and dtype in cuda/inst/) or the simple one
 *      (paged/simple.cu); the tensor-core kernel's
 *      CTA shape, row tile and K/V path; the split count -- from the kernel hint
 *      (params.kernel) and, under PF_KERNEL_AUTO, the heuristics of
 *      paged/heuristics.cu;
 *   3. pf_paged_enqueue: on the caller's stream, [plan] the packed layouts' work
 *      list (paged/plan.cu), main the chosen kernel, [merge] with num_splits > 1
 *      the log-sum-exp merge of the split partials into out and lse
 *      (paged/merge.cu).
 * The split partials and the work list live in the cached per-stream workspace
 * (common/workspace.cu); nothing else is allocated and nothing synchronizes.
 *
 * The kernel hint (pagedflash.h, pf_kernel; names as in pf_kernel_name):
 *   auto (PF_KERNEL_AUTO)  the prefill path for prefill-sized calls
 *                          (pf_paged_prefill_size: >= 128 queries per sequence, no
 *                          explicit split count) where it can take them (Hopper,
 *                          float16 / bfloat16, head dims running on the 64 / 128
 *                          wgmma tiles, 16-byte rows); otherwise
 *                          the tensor-core kernel where the dtype (float16 /
 *                          bfloat16), the head dim (an instantiated one) and the
 *                          alignment (16-byte rows) allow, else the simple kernel;
 *                          the CTA shape by KV-head count, then pf_pick_shape where
 *                          head mode would split (num_splits = 0 only); the ring K/V
 *                          path at head dims 64 / 128, registers elsewhere.
 *   "simple"               the simple kernel, whatever the dtype, head dim or layout.
 *   "1x4" ... "4x8"        the tensor-core kernel with that CTA shape (H KV heads x W
 *                          warps) and the K/V path auto would take; with num_splits = 0
 *                          the split count follows that shape. PF_STATUS_NOT_SUPPORTED,
 *                          naming `kernel` and the reason, where the tensor-core kernel
 *                          cannot take the call (dtype, head dim, alignment) or the shape
 *                          is not instantiated (1x8, 2x8 and 4x8 exist only with the
 *                          ring: head dims 64 and 128). Never another kernel instead.
 *   "<shape>+registers"    the same with the register K/V path instead of the ring;
 *                          NOT_SUPPORTED for 1x8, 2x8 and 4x8 (ring only).
 *   "sm90"                 the prefill path, any query count; NOT_SUPPORTED, naming
 *                          the reason, where it cannot take the call. num_splits is
 *                          ignored there (the flash forward does not split keys).
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "flash/fwd_tiles.h"
#include "flash/run.h"
#include "paged/paged.h"

static pf_status pf_paged_fill_args(const pf_paged_params *p, pf_paged_args &a) {
    const pf_tensor &q = p->q, &o = p->out, &kc = p->k_cache, &vc = p->v_cache;
    const bool has_cu = pf_tensor_present(&p->cu_seqlens_q) || p->cu_seqlens_q.ndim > 0;
    memset(&a, 0, sizeof a);
    a.q = q.data;
    a.out = o.data;
    a.k_cache = kc.data;
    a.v_cache = vc.data;
    a.block_tables = (const int32_t *)p->block_tables.data;
    a.seq_lens = (const int32_t *)p->seq_lens.data;
    a.batch = (int)p->block_tables.shape[0];
    a.max_blocks = (int)p->block_tables.shape[1];
    a.bt_sb = p->block_tables.strides[0];
    a.bt_sj = p->block_tables.strides[1];
    a.sl_s = p->seq_lens.strides[0];
    const int hd = q.ndim - 1;
    a.head_dim = (int)q.shape[hd];
    a.num_heads = (int)q.shape[hd - 1];
    a.q_sh = q.strides[hd - 1];
    a.o_sh = o.strides[hd - 1];
    if (has_cu) {
        a.cu_seqlens_q = (const int32_t *)p->cu_seqlens_q.data;
        a.cu_s = p->cu_seqlens_q.strides[0];
        a.total_q = (int)q.shape[0];
        a.q_len = 0;
        a.q_sb = 0;
        a.q_st = q.strides[0];
        a.o_sb = 0;
        a.o_st = o.strides[0];
    } else if (q.ndim == 4) {
        a.q_len = (int)q.shape[1];
        a.total_q = a.batch * a.q_len;
        a.q_sb = q.strides[0];
        a.q_st = q.strides[1];
        a.o_sb = o.strides[0];
        a.o_st = o.strides[1];
    } else {
        a.q_len = 1;
        a.total_q = a.batch;
        a.q_sb = q.strides[0];
        a.q_st = 0;
        a.o_sb = o.strides[0];
        a.o_st = 0;
    }
    a.num_blocks = (int)kc.shape[0];
    a.block_size = (int)kc.shape[1];
    a.num_kv_heads = (int)kc.shape[2];
    a.group = a.num_heads / a.num_kv_heads;
    /* division by block_size as (umulhi(t, magic) + t) >> shift, exact for t < 2^31 */
    {
        unsigned l = 0;
        while ((1u << l) < (unsigned)a.block_size) l++;
        a.bs_shift = l;
        a.bs_magic =
            (unsigned)((((uint64_t)1 << 32) * (((uint64_t)1 << l) - (uint64_t)a.block_size)) / (uint64_t)a.block_size +
                       1);
        if (a.block_size == 1) a.bs_magic = 0;
    }
    a.k_sblk = kc.strides[0];
    a.k_stok = kc.strides[1];
    a.k_sh = kc.strides[2];
    a.v_sblk = vc.strides[0];
    a.v_stok = vc.strides[1];
    a.v_sh = vc.strides[2];
    if (pf_tensor_present(&p->alibi_slopes)) {
        a.alibi = (const float *)p->alibi_slopes.data;
        if (p->alibi_slopes.ndim == 2) {
            a.al_sb = p->alibi_slopes.strides[0];
            a.al_sh = p->alibi_slopes.strides[1];
        } else {
            a.al_sb = 0;
            a.al_sh = p->alibi_slopes.strides[0];
        }
    }
    if (pf_tensor_present(&p->lse)) {
        a.lse = (float *)p->lse.data;
        a.lse_sh = p->lse.strides[0];
        a.lse_st = p->lse.strides[1];
    }
    const float scale = p->softmax_scale; /* used as given (pagedflash.h) */
    if (p->softcap > 0.f) {
        a.qk_scale = scale / p->softcap;
        a.cap_log2 = p->softcap * PF_LOG2E;
    } else {
        a.qk_scale = scale * PF_LOG2E;
        a.cap_log2 = 0.f;
    }
    a.causal = p->causal != 0;
    a.window_left = p->window_left;
    a.window_right = p->window_right;
    return PF_STATUS_OK;
}

/* Why the tensor-core kernels (which read and write 16-byte vectors) cannot take q, out,
 * k_cache or v_cache -- "<need> 16-byte aligned rows (...), which <tensor> does not have", into
 * buf -- or NULL when every row is 16-byte aligned (data pointer, strides multiples of 8). */
static const char *pf_paged_misaligned(const pf_paged_args &a, const char *need, char *buf, size_t len) {
    auto aligned = [](const void *ptr, int64_t s0, int64_t s1, int64_t s2) {
        return ((uintptr_t)ptr & 15u) == 0 && s0 % 8 == 0 && s1 % 8 == 0 && s2 % 8 == 0;
    };
    const char *bad = !aligned(a.q, a.q_sb, a.q_st, a.q_sh)             ? "q"
                      : !aligned(a.out, a.o_sb, a.o_st, a.o_sh)         ? "out"
                      : !aligned(a.k_cache, a.k_sblk, a.k_stok, a.k_sh) ? "k_cache"
                      : !aligned(a.v_cache, a.v_sblk, a.v_stok, a.v_sh) ? "v_cache"
                                                                        : NULL;
    if (!bad) return NULL;
    snprintf(buf, len,
             "%s 16-byte aligned rows (a 16-byte aligned data pointer, strides that are multiples of 8 elements), "
             "which %s does not have",
             need, bad);
    return buf;
}

/* Why the tensor-core kernel cannot take this call (into buf), or NULL when it can: it
 * needs float16 / bfloat16, an instantiation for the head dim and 16-byte aligned rows. */
static const char *pf_paged_tensor_core_obstacle(const pf_paged_args &a, pf_dtype dtype, pf_paged_entry_fns entry,
                                                 char *buf, size_t len) {
    if (dtype != PF_DTYPE_F16 && dtype != PF_DTYPE_BF16) {
        snprintf(buf, len, "takes float16 or bfloat16, not %s", pf_dtype_name(dtype));
        return buf;
    }
    if (!entry.occupancy || !entry.launch) {
        char dims[64] = "";
        size_t n = 0;
        for (int d = 32; d <= 256 && n < sizeof dims; d += 32)
            if (pf_paged_entry(d, dtype).launch)
                n += (size_t)snprintf(dims + n, sizeof dims - n, "%s%d", n ? ", " : "", d);
        snprintf(buf, len, "has no instantiation for head_dim %d in this build (head dims %s)", a.head_dim,
                 n ? dims : "none");
        return buf;
    }
    return pf_paged_misaligned(a, "needs", buf, len);
}

/* What runs (pf_paged_choose). */
struct pf_paged_choice {
    bool prefill;              /* the sm_90 flash forward over the paged cache (nothing below applies) */
    pf::cuda::FlashParams prefill_params; /* its parameters (the plan is added by the enqueue) */
    bool tensor_cores;         /* the tensor-core kernel, else the simple one */
    pf_paged_entry_fns entry;  /* the tensor-core kernel's (head dim, dtype) instantiation */
    pf_paged_variant variant;  /* its row tile, CTA shape and K/V path */
    int occupancy;             /* resident CTAs (simple: 4-warp blocks) per multiprocessor */
    int64_t work;              /* CTAs (blocks) per split */
    int num_splits;
};

/* The CTA shape a paged hint names (0 x 0 for "simple"). */
static void pf_paged_hint_shape(int32_t shape_hint, int *heads, int *warps) {
    *heads = *warps = 0;
    switch (shape_hint) {
        case PF_KERNEL_PAGED_1X4: *heads = 1, *warps = 4; break;
        case PF_KERNEL_PAGED_4X4: *heads = 4, *warps = 4; break;
        case PF_KERNEL_PAGED_8X8: *heads = 8, *warps = 8; break;
        case PF_KERNEL_PAGED_1X8: *heads = 1, *warps = 8; break;
        case PF_KERNEL_PAGED_2X8: *heads = 2, *warps = 8; break;
        case PF_KERNEL_PAGED_4X8: *heads = 4, *warps = 8; break;
        default: break;
    }
}

/* The flash forward's parameters for this call (flash/params.h, paged K/V): q / out / lse
 * as a dense [batch, q_len] or packed (cu_seqlens_q) query layout, the caches through the
 * block table. The plan (packed layouts) is set by pf_paged_enqueue. */
static void pf_paged_prefill_params(const pf_paged_params *pp, const pf_paged_args &a, pf::cuda::FlashParams &p) {
    memset(&p, 0, sizeof p);
    p.q = a.q;
    p.o = a.out;
    p.k = a.k_cache;
    p.v = a.v_cache;
    p.batch = a.batch;
    p.num_heads = a.num_heads;
    p.num_kv_heads = a.num_kv_heads;
    p.head_group = a.group;
    p.head_dim = a.head_dim;
    p.varlen = a.cu_seqlens_q != NULL;
    p.cu_seqlens_q = a.cu_seqlens_q;
    p.total_q = a.total_q;
    p.seqlen_q = p.varlen ? a.total_q : a.q_len;
    p.max_seqlen_q = p.seqlen_q; /* the grid of dense layouts; packed ones walk the plan */
    const int64_t cap = (int64_t)a.max_blocks * a.block_size;
    p.seqlen_k = p.max_seqlen_k = (int)cap;
    /* rows: q_st / o_st between query tokens, the batch stride 0 for packed layouts */
    p.q_batch_stride = a.q_sb, p.q_row_stride = a.q_st, p.q_head_stride = a.q_sh;
    p.o_batch_stride = a.o_sb, p.o_row_stride = a.o_st, p.o_head_stride = a.o_sh;
    p.k_row_stride = a.k_stok, p.k_head_stride = a.k_sh, p.k_block_stride = a.k_sblk;
    p.v_row_stride = a.v_stok, p.v_head_stride = a.v_sh, p.v_block_stride = a.v_sblk;
    if (a.lse) { /* [num_heads, total_q]: query i of sequence b is column b * q_len + i (dense) */
        p.lse = a.lse;
        p.lse_head_stride = a.lse_sh;
        p.lse_row_stride = a.lse_st;
        p.lse_batch_stride = p.varlen ? 0 : (int64_t)a.q_len * a.lse_st;
    }
    p.block_table = a.block_tables;
    p.seq_lens = a.seq_lens;
    p.bt_batch_stride = a.bt_sb;
    p.bt_col_stride = a.bt_sj;
    p.seq_lens_stride = a.sl_s;
    p.block_size = a.block_size;
    p.num_blocks = a.num_blocks;
    p.max_blocks = a.max_blocks;
    p.bs_magic = a.bs_magic;
    p.bs_shift = a.bs_shift;
    /* 16-byte vectors: the head dim here, the rows of q / out / caches in pf_paged_prefill_obstacle */
    p.aligned = a.head_dim % 8 == 0;

    pf::cuda::ScoreParams &sp = p.score;
    sp.softmax_scale = pp->softmax_scale;
    sp.scale_log2 = pp->softmax_scale * PF_LOG2E;
    if (pp->softcap > 0.f) {
        sp.softcap = pp->softcap;
        sp.softcap_inv_scale = pp->softmax_scale / pp->softcap;
        sp.softcap_log2 = pp->softcap * PF_LOG2E;
    }
    sp.alibi = a.alibi;
    sp.alibi_batch_stride = a.al_sb;
    sp.alibi_head_stride = a.al_sh;
    p.causal = a.causal;
    /* a window wider than any sequence is no window (keeps the mask's int math small) */
    p.window_left = a.window_left >= 0 && a.window_left < cap ? a.window_left : -1;
    p.window_right = a.window_right >= 0 && a.window_right < cap ? a.window_right : -1;
    p.drop_scale = 1.0f;
}

/* Why the prefill path cannot take this call (into buf), or NULL when it can: the flash
 * forward's own refusal (device, dtype, head dim, alignment) and what only paged calls
 * have (a strided cu_seqlens_q). */
static const char *pf_paged_prefill_obstacle(const pf_paged_args &a, const pf::cuda::FlashParams &fp, pf_dtype dtype,
                                             int device, char *buf, size_t len) {
    if (!fp.aligned) return "the wgmma kernels need head_dim a multiple of 8";
    const char *why = pf::cuda::flash_fwd_paged_refusal(fp, dtype, device);
    if (why) return why;
    if (a.cu_seqlens_q && a.cu_s != 1) return "the flash kernels need a contiguous cu_seqlens_q";
    if (a.num_heads > 65535 || (!a.cu_seqlens_q && a.batch > 65535))
        return "its grid holds at most 65535 query heads and (dense queries) 65535 sequences";
    return pf_paged_misaligned(a, "the wgmma kernels need", buf, len);
}

/*
 * Whether "auto" runs a call on the prefill path: queries enough per sequence to fill
 * the flash forward's 128-row tiles (q_len, or for packed layouts total_q / batch, at
 * least PF_PAGED_PREFILL_MIN_QUERIES) and no explicit split count (num_splits > 1 asks
 * for the split-KV kernel). Fewer queries keep the split-KV kernel, which packs the
 * query heads of a GQA group into its rows. Measured (H100, bf16, d = 128, 4 sequences of
 * 4096 tokens, 32 query heads over 8 KV heads, causal, block size 16; TFLOP/s prefill
 * path / split-KV kernel's best shape): q_len 32: 41.6 / 84.6, 64: 82.6 / 100.8, 128:
 * 162.3 / 111.9; at q_len = s = 1k..8k the prefill path runs 2.3-2.95x the split-KV kernel
 * (benchmarks/results/paged_prefill_h100.md).
 */
#define PF_PAGED_PREFILL_MIN_QUERIES 128
static bool pf_paged_prefill_size(const pf_paged_params *p, const pf_paged_args &a) {
    if (p->num_splits > 1) return false;
    if (a.cu_seqlens_q) return a.total_q >= (int64_t)PF_PAGED_PREFILL_MIN_QUERIES * a.batch;
    return a.q_len >= PF_PAGED_PREFILL_MIN_QUERIES;
}

/* Decides what runs: the kernel, its variant and the split count (also into
 * a.num_row_tiles and a.num_splits). The hint was validated by the core: AUTO, SIMPLE,
 * or a shape, optionally | PF_KERNEL_PAGED_REGISTERS. */
static pf_status pf_paged_choose(const pf_paged_params *p, pf_paged_args &a, pf_paged_choice *c) {
    const int32_t hint = p->kernel;
    const int32_t shape_hint = hint & ~PF_KERNEL_PAGED_REGISTERS;
    const bool registers = (hint & PF_KERNEL_PAGED_REGISTERS) != 0;
    const pf_dtype dtype = p->q.dtype;
    const char *name = pf_kernel_name(hint);
    int dev = 0, sms = 0;
    PF_CUDA_CHECK(cudaGetDevice(&dev));
    PF_TRY(pf::cuda::sm_count(dev, &sms));

    /* prefill: the flash forward over the paged cache ("sm90", or "auto" at prefill sizes) */
    c->prefill = false;
    if (hint == PF_KERNEL_FLASH_SM90 || (hint == PF_KERNEL_AUTO && pf_paged_prefill_size(p, a))) {
        pf::cuda::FlashParams &fp = c->prefill_params;
        pf_paged_prefill_params(p, a, fp);
        char why[256];
        const char *obstacle = pf_paged_prefill_obstacle(a, fp, dtype, dev, why, sizeof why);
        PF_CHECK(hint != PF_KERNEL_FLASH_SM90 || !obstacle, PF_STATUS_NOT_SUPPORTED,
                 "kernel: 'sm90' (the flash forward over the paged cache) cannot take this call: %s", obstacle);
        if (!obstacle) {
            c->prefill = true;
            c->num_splits = a.num_splits = 1;
            a.num_row_tiles =
                a.cu_seqlens_q ? a.batch + (a.total_q + pf::cuda::kFwdSm90BlockM - 1) / pf::cuda::kFwdSm90BlockM : 0;
            return PF_STATUS_OK;
        }
    }

    /* the kernel */
    c->entry = pf_paged_entry(a.head_dim, dtype);
    char why[192];
    const char *obstacle = pf_paged_tensor_core_obstacle(a, dtype, c->entry, why, sizeof why);
    c->tensor_cores = hint == PF_KERNEL_AUTO ? obstacle == NULL : shape_hint != PF_KERNEL_PAGED_SIMPLE;
    if (!c->tensor_cores) {
        PF_TRY(pf_paged_simple_occupancy(dtype, &c->occupancy));
        c->work = pf_paged_simple_work(a);
    } else {
        PF_CHECK(obstacle == NULL, PF_STATUS_NOT_SUPPORTED,
                 "kernel: '%s' is a tensor-core kernel, which %s ('simple' and 'auto' take this call)", name, obstacle);
        /* its variant: row tile, CTA shape, K/V path */
        pf_paged_variant &v = c->variant;
        v.rows_per_tile = pf_paged_rows_per_tile(a);
        if (a.cu_seqlens_q)
            a.num_row_tiles = (int)(a.batch + ((int64_t)a.total_q * a.group + v.rows_per_tile - 1) / v.rows_per_tile);
        else
            a.num_row_tiles = (int)(((int64_t)a.q_len * a.group + v.rows_per_tile - 1) / v.rows_per_tile);
        if (hint == PF_KERNEL_AUTO)
            pf_paged_default_shape(a.num_kv_heads, &v);
        else
            pf_paged_hint_shape(shape_hint, &v.kv_heads_per_cta, &v.warps);
        v.kv_path = !registers && pf_paged_has_ring(a.head_dim) ? PF_PAGED_KV_RING : PF_PAGED_KV_REGISTERS;
        /* only a hint can name a variant that is not instantiated: the mixed shapes */
        PF_CHECK(!registers || pf_paged_shape_exists(a.head_dim, v.kv_heads_per_cta, v.warps, v.kv_path),
                 PF_STATUS_NOT_SUPPORTED,
                 "kernel: '%s': the CTA shapes 1x8, 2x8 and 4x8 exist only with the shared-memory ring, not with "
                 "the register K/V path",
                 name);
        PF_CHECK(pf_paged_shape_exists(a.head_dim, v.kv_heads_per_cta, v.warps, v.kv_path), PF_STATUS_NOT_SUPPORTED,
                 "kernel: '%s': the CTA shapes 1x8, 2x8 and 4x8 exist only with the shared-memory ring, which "
                 "head dims 64 and 128 have, not head_dim %d",
                 name, a.head_dim);
        PF_TRY(c->entry.occupancy(&v, &c->occupancy));
        c->work = pf_paged_work_items(a, v.kv_heads_per_cta);
        if (hint == PF_KERNEL_AUTO && p->num_splits <= 0)
            PF_TRY(pf_pick_shape(a, c->entry, sms, &v, &c->occupancy, &c->work));
    }

    /* the split count */
    int64_t splits;
    if (p->num_splits > 0) {
        const int64_t cap = pf_paged_split_cap(a);
        splits = p->num_splits < cap ? p->num_splits : cap;
    } else {
        splits = pf_paged_auto_splits(a, c->work, sms, c->occupancy);
    }
    c->num_splits = (int)splits;
    a.num_splits = c->num_splits;
    return PF_STATUS_OK;
}

static size_t pf_round_up(size_t x, size_t to) { return (x + to - 1) / to * to; }

/* The prefill path: [plan of (sequence, 128-query tile) pairs] then the flash forward. */
static pf_status pf_paged_enqueue_prefill(const pf_paged_params *p, const pf_paged_args &a, const pf_paged_choice &c,
                                          int32_t *plan, cudaStream_t stream) {
    pf::cuda::FlashParams fp = c.prefill_params;
    if (a.cu_seqlens_q) {
        pf_paged_args rows = a; /* one row per query: the flash kernel walks heads in its grid */
        rows.group = 1;
        PF_TRY(pf_paged_plan_enqueue(rows, pf::cuda::kFwdSm90BlockM, plan, stream));
        fp.plan = plan;
        fp.num_plan_tiles = a.num_row_tiles;
    }
    return pf::cuda::flash_fwd_paged(fp, p->q.dtype, stream, p->q.device_id);
}

/* Everything after the workspace is in hand: plan / query map, main kernel, merge. */
static pf_status pf_paged_enqueue(pf_paged_args &a, const pf_paged_choice &c, size_t o_bytes, size_t l_bytes,
                                  char *workspace, pf_dtype dtype, cudaStream_t stream) {
    if (c.num_splits > 1) {
        a.o_part = (float *)workspace;
        a.lse_part = (float *)(workspace + o_bytes);
    }
    int32_t *qmap = NULL;
    if (a.cu_seqlens_q) {
        int32_t *list = (int32_t *)(workspace + o_bytes + l_bytes);
        if (c.tensor_cores) {
            PF_TRY(pf_paged_plan_enqueue(a, c.variant.rows_per_tile, list, stream));
            a.plan = list;
        } else {
            PF_TRY(pf_paged_qmap_enqueue(a, list, stream));
            qmap = list;
        }
    }
    if (c.tensor_cores)
        PF_TRY(c.entry.launch(&a, &c.variant, stream));
    else
        PF_TRY(pf_paged_simple_launch(a, qmap, dtype, stream));
    if (c.num_splits > 1) PF_TRY(pf_paged_merge_splits(a, qmap, dtype, stream));
    return PF_STATUS_OK;
}

extern "C" pf_status pf_cuda_paged_attn(const pf_paged_params *p) {
    pf_cuda_device_guard guard;
    PF_TRY(guard.set(p->q.device_id));
    cudaStream_t stream = (cudaStream_t)p->stream;
    pf_paged_args a;
    PF_TRY(pf_paged_fill_args(p, a));
    if (a.total_q == 0 || a.batch == 0) return PF_STATUS_OK;
    pf_paged_choice c;
    PF_TRY(pf_paged_choose(p, a, &c));

    /* workspace: split partials, plan / query map */
    size_t o_bytes = 0, l_bytes = 0, list_bytes = 0;
    if (c.num_splits > 1) {
        o_bytes = pf_round_up((size_t)c.num_splits * a.total_q * a.num_heads * a.head_dim * sizeof(float), 256);
        l_bytes = pf_round_up((size_t)c.num_splits * a.total_q * a.num_heads * sizeof(float), 256);
    }
    if (a.cu_seqlens_q)
        list_bytes = pf_round_up(c.tensor_cores || c.prefill ? (size_t)a.num_row_tiles * 2 * sizeof(int32_t)
                                                             : (size_t)a.total_q * sizeof(int32_t),
                                 256);
    pf_cuda_scratch scratch;
    PF_TRY(pf_cuda_scratch_acquire(stream, o_bytes + l_bytes + list_bytes, &scratch));
    pf_status st = c.prefill ? pf_paged_enqueue_prefill(p, a, c, (int32_t *)scratch.ptr, stream)
                             : pf_paged_enqueue(a, c, o_bytes, l_bytes, (char *)scratch.ptr, p->q.dtype, stream);
    pf_status st2 = pf_cuda_scratch_release(stream, &scratch);
    return st != PF_STATUS_OK ? st : st2;
}
