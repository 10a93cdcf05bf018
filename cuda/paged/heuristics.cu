/*
 * paged/heuristics.cu - the automatic choices of paged attention on CUDA, each
 * with the measurement behind it (the launcher, paged/launch.cu, calls them in
 * pf_paged_choose): the row tile, the CTA shape of the tensor-core kernel
 * (pf_paged_default_shape, then pf_pick_shape where head mode would split) and
 * the split count (pf_paged_auto_splits within pf_paged_split_cap).
 *
 * Split count (num_splits = 0): the (sequence, KV-head group, row tile) work
 * items are spread over splits until the CTAs fill the GPU once
 * (multiprocessors x resident CTAs per multiprocessor), keeping >= 64 tokens per
 * split; capped at 256 splits and at one split per 64 tokens of the longest
 * possible sequence. An explicit num_splits is honoured up to those caps.
 * Measured on an H200, 32/8 heads, d=128, bf16 (times in us, num_splits swept):
 * one wave beat two at every point (batch 1 / 64k: 77 at 128 splits vs 84 at 256;
 * batch 128 / 4k: 499 at 1 split vs 511 at 2), and splits of 64 tokens won at
 * batch 1 / 4k (15.6 at 64 splits vs 28.5 at 16).
 */
#include "paged/paged.h"

#define PF_PAGED_MAX_SPLITS 256
#define PF_PAGED_MIN_SPLIT_TOKENS 64

int pf_paged_rows_per_tile(const pf_paged_args &a) {
    const int64_t rows_per_seq = a.cu_seqlens_q ? 16 : (int64_t)a.q_len * a.group;
    return (rows_per_seq > 8 && a.head_dim <= 128) ? 16 : 8;
}

/* Kernel mode: with >= 4 KV heads the CTA's warps own one KV head each and walk
 * the split's tiles together, so every token row is read across heads at once
 * (8 warps when num_kv_heads % 8 == 0); otherwise 4 warps share one KV head and
 * take every 4th tile ("token mode"). Head mode: 4.35 TB/s against token mode's
 * 3.30 at batch 128 / 64k on the same data. */
void pf_paged_default_shape(int num_kv_heads, pf_paged_variant *v) {
    v->kv_heads_per_cta = num_kv_heads % 8 == 0 ? 8 : num_kv_heads >= 4 ? 4 : 1;
    v->warps = v->kv_heads_per_cta == 8 ? 8 : 4;
}

int64_t pf_paged_split_cap(const pf_paged_args &a) {
    const int64_t by_len = (int64_t)a.max_blocks * a.block_size / PF_PAGED_MIN_SPLIT_TOKENS;
    return by_len < 1 ? 1 : by_len < PF_PAGED_MAX_SPLITS ? by_len : PF_PAGED_MAX_SPLITS;
}

int64_t pf_paged_auto_splits(const pf_paged_args &a, int64_t work, int sms, int occupancy) {
    const int64_t capacity = (int64_t)sms * (occupancy > 0 ? occupancy : 1);
    const int64_t splits = work >= capacity ? 1 : capacity / work;
    const int64_t cap = pf_paged_split_cap(a);
    return splits < cap ? splits : cap;
}

/* The CTA shape when head mode would split (automatic split count, decode-sized row
 * tiles, the ring's head dims 64 / 128): token mode (1 KV head x 4 warps, 2 CTAs per SM)
 * when it needs no split and head mode's splits would be short (<= 1024 tokens), so no
 * combine runs; 1 KV head x 8 warps when head mode would take more than 16 splits (it
 * cuts them 8x and the merge of a head's 8 warps happens in shared memory). Measured on
 * an H200, 32 / 8 heads, d = 128, bf16 (us, head mode -> chosen shape): b32/1k 40.9 -> 38.4,
 * b32/4k 132.5 -> 130.1, b1/16k 33.4 -> 26.4, b1/64k 80.9 -> 74.1; head mode stays where
 * it was fastest: b32/16k 486.8 (token mode 496.1), b8/16k 131.4 (1x8 140.8, token mode
 * 133.3), b1/4k 13.7 (1x8 13.6). On return *v (kv_heads_per_cta, warps), *occupancy and
 * *work describe the chosen shape. */
pf_status pf_pick_shape(const pf_paged_args &a, pf_paged_entry_fns entry, int sms, pf_paged_variant *v, int *occupancy,
                        int64_t *work) {
    if (v->kv_heads_per_cta < 4 || v->kv_path != PF_PAGED_KV_RING || v->rows_per_tile != 8 ||
        !pf_paged_has_ring(a.head_dim))
        return PF_STATUS_OK;
    const int64_t s_head = pf_paged_auto_splits(a, *work, sms, *occupancy);
    if (s_head <= 1) return PF_STATUS_OK;
    /* switches *v to heads x warps when that shape takes at most max_splits splits; *v
     * stays head mode otherwise */
    auto take = [&](int heads, int warps, int64_t max_splits, bool *taken) -> pf_status {
        pf_paged_variant candidate = *v;
        candidate.kv_heads_per_cta = heads;
        candidate.warps = warps;
        *taken = false;
        if (!pf_paged_shape_exists(a.head_dim, heads, warps, candidate.kv_path)) return PF_STATUS_OK;
        int occ = 1;
        PF_TRY(entry.occupancy(&candidate, &occ));
        const int64_t w = pf_paged_work_items(a, heads);
        if (pf_paged_auto_splits(a, w, sms, occ) <= max_splits) {
            *taken = true;
            *v = candidate;
            *occupancy = occ;
            *work = w;
        }
        return PF_STATUS_OK;
    };
    bool taken = false;
    if ((int64_t)a.max_blocks * a.block_size / s_head <= 1024) PF_TRY(take(1, 4, 1, &taken));
    if (!taken && s_head > 16) PF_TRY(take(1, 8, s_head - 1, &taken));
    return PF_STATUS_OK;
}
