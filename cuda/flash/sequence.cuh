/*
 * flash/sequence.cuh - where the rows of one sequence live, for every flash
 * kernel: the query / key range of sequence b (dense: the whole batch entry;
 * packed varlen: cu_seqlens, read from device memory and clamped to the packed
 * tensors' extents so that bad offsets never reach outside them), the base
 * pointers of one (sequence, query head) in the forward, and the flat query-row
 * numbering of the backward's workspace (flash/bwd_workspace.h): the rows of
 * every sequence one after another, row b * seqlen_q + i (dense) or the packed
 * row cu_seqlens_q[b] + i (varlen). With paged K/V (FlashParams::block_table) the
 * keys of sequence b are its seq_lens[b] first cache rows (flash/paged_kv.cuh).
 */
#ifndef PF_FLASH_SEQUENCE_CUH
#define PF_FLASH_SEQUENCE_CUH

#include "attn/math.cuh"
#include "flash/params.h"

namespace pf {
namespace cuda {

struct SeqInfo {
    int q_start, sq, k_start, sk; /* first packed row (0 when dense) and length, queries and keys */
};

PF_DEV SeqInfo seq_info(const FlashParams &p, int b) {
    SeqInfo s;
    if (p.varlen) {
        /* device-resident offsets: clamp so that any values stay in bounds */
        const int a = imin(imax(__ldg(p.cu_seqlens_q + b), 0), p.total_q);
        const int e = imin(imax(__ldg(p.cu_seqlens_q + b + 1), a), p.total_q);
        s.q_start = a;
        s.sq = e - a;
    } else {
        s.q_start = 0;
        s.sq = p.seqlen_q;
    }
    if (p.block_table) {
        /* paged K/V: the sequence's first seq_len keys, at most its table row's capacity */
        s.k_start = 0;
        s.sk = imin(imax(__ldg(p.seq_lens + b * p.seq_lens_stride), 0), p.max_blocks * p.block_size);
    } else if (p.varlen) {
        const int a = imin(imax(__ldg(p.cu_seqlens_k + b), 0), p.total_k);
        const int e = imin(imax(__ldg(p.cu_seqlens_k + b + 1), a), p.total_k);
        s.k_start = a;
        s.sk = e - a;
    } else {
        s.k_start = 0;
        s.sk = p.seqlen_k;
    }
    return s;
}

/* Base pointers of one (batch b, query head h) of a forward call: q / out / lse
 * at the sequence's first query row, k / v at its first key row of KV head
 * h / head_group; lse NULL when not wanted. */
template <typename T>
struct FwdBases {
    const T *q, *k, *v;
    T *o;
    float *lse;
};

template <typename T>
PF_DEV FwdBases<T> fwd_bases(const FlashParams &p, int b, int h, const SeqInfo &si) {
    const int hk = h / p.head_group;
    FwdBases<T> r;
    r.q =
        static_cast<const T *>(p.q) + b * p.q_batch_stride + (int64_t)si.q_start * p.q_row_stride + h * p.q_head_stride;
    r.k = static_cast<const T *>(p.k) + b * p.k_batch_stride + (int64_t)si.k_start * p.k_row_stride +
          hk * p.k_head_stride;
    r.v = static_cast<const T *>(p.v) + b * p.v_batch_stride + (int64_t)si.k_start * p.v_row_stride +
          hk * p.v_head_stride;
    r.o = static_cast<T *>(p.o) + b * p.o_batch_stride + (int64_t)si.q_start * p.o_row_stride + h * p.o_head_stride;
    r.lse = p.lse ? p.lse + b * p.lse_batch_stride + h * p.lse_head_stride + (int64_t)si.q_start * p.lse_row_stride
                  : nullptr;
    return r;
}

/* Query rows of the whole call in the backward's flat numbering. */
__host__ __device__ inline int64_t flat_rows(const FlashParams &p) {
    return p.varlen ? (int64_t)p.total_q : (int64_t)p.batch * p.seqlen_q;
}

/* The flat row of sequence b's first query. */
PF_DEV int64_t flat_row_base(const FlashParams &p, int b, const SeqInfo &si) {
    return p.varlen ? si.q_start : (int64_t)b * p.seqlen_q;
}

/* Flat query row r -> sequence b and row i in it; varlen layouts address their packed rows
 * directly (b = 0, i = r). */
template <typename I>
PF_DEV void flat_row_position(const FlashParams &p, I r, I &b, I &i) {
    b = 0;
    i = r;
    if (!p.varlen) {
        b = r / p.seqlen_q;
        i = r - b * p.seqlen_q;
    }
}

}  // namespace cuda
}  // namespace pf

#endif /* PF_FLASH_SEQUENCE_CUH */
