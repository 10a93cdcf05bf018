/*
 * pagedflash.h - the public C API of pagedflash.
 *
 * Exact softmax attention for training and serving: FlashAttention forward and
 * backward, flash decoding (split-KV) and paged attention over a block-allocated
 * KV cache, plus the cache operations and the block pool under the BlockManager.
 *
 * Conventions
 *   - Every entry point returns a pf_status. On failure the calling thread's
 *     last-error message (pf_last_error()) names the argument, what was expected
 *     and what was given. Nothing here exits, aborts or prints.
 *   - Tensors are described by pf_tensor views: a data pointer, dtype, device,
 *     rank, shape and int64 *element* strides. The last dimension of every
 *     tensor must be contiguous (stride 1) unless that dimension has size <= 1.
 *   - Arithmetic accumulates in float32 whatever the input dtype.
 *   - CUDA entry points run on params->stream (a cudaStream_t, NULL = legacy
 *     default stream) and never synchronize the device.
 *   - A failed call writes nothing: all checks run before any backend does.
 *
 * Only C standard headers are included; this file is valid C99 and C++.
 */
#ifndef PAGEDFLASH_H
#define PAGEDFLASH_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PF_VERSION_MAJOR 0
#define PF_VERSION_MINOR 1
#define PF_VERSION_PATCH 0

#define PF_MAX_DIMS 8
#define PF_MAX_HEAD_DIM 256

/* ------------------------------------------------------------------------ */
/* Status codes and errors (enums are append-only)                          */
/* ------------------------------------------------------------------------ */

typedef enum pf_status {
    PF_STATUS_OK = 0,
    PF_STATUS_INVALID_VALUE = 1,   /* rank, shape, stride, length, range -> ValueError          */
    PF_STATUS_INVALID_TYPE = 2,    /* unsupported or mixed dtype          -> TypeError           */
    PF_STATUS_NOT_SUPPORTED = 3,   /* valid, but not built / not on this device -> NotImplementedError */
    PF_STATUS_OUT_OF_BLOCKS = 4,   /* block pool exhausted                -> pagedflash.OutOfBlocks */
    PF_STATUS_CUDA_ERROR = 5,      /* a CUDA call failed                  -> pagedflash.CudaError */
    PF_STATUS_OUT_OF_MEMORY = 6,   /* host allocation failed              -> MemoryError          */
    PF_STATUS_INTERNAL = 7         /* a bug in pagedflash                 -> RuntimeError         */
} pf_status;

/* A static string naming the status ("PF_STATUS_INVALID_VALUE"). */
const char *pf_status_string(pf_status status);

/* The message recorded by the last failing call on this thread ("" if none). */
const char *pf_last_error(void);
void pf_clear_error(void);

/* ------------------------------------------------------------------------ */
/* Tensors                                                                   */
/* ------------------------------------------------------------------------ */

typedef enum pf_dtype {
    PF_DTYPE_INVALID = 0,
    PF_DTYPE_F32 = 1,
    PF_DTYPE_F16 = 2,
    PF_DTYPE_BF16 = 3,
    PF_DTYPE_I32 = 4,
    PF_DTYPE_I64 = 5,
    PF_DTYPE_U8 = 6,
    PF_DTYPE_F64 = 7
} pf_dtype;

typedef enum pf_device {
    PF_DEVICE_CPU = 1,
    PF_DEVICE_CUDA = 2,
    PF_DEVICE_CUDA_HOST = 3        /* page-locked host memory, readable by the CPU backend */
} pf_device;

typedef struct pf_tensor {
    void *data;                    /* first element (byte offsets already applied); NULL = absent */
    pf_dtype dtype;
    pf_device device;
    int32_t device_id;
    int32_t ndim;
    int64_t shape[PF_MAX_DIMS];
    int64_t strides[PF_MAX_DIMS];  /* in elements */
} pf_tensor;

size_t pf_dtype_size(pf_dtype dtype);      /* 0 for PF_DTYPE_INVALID */
const char *pf_dtype_name(pf_dtype dtype); /* "float16", ... */

/* ------------------------------------------------------------------------ */
/* Build information                                                         */
/* ------------------------------------------------------------------------ */

/* 1 when the CUDA backend was compiled in. */
int pf_has_cuda(void);
/* Number of CUDA devices the driver reports (0 when absent or not built). */
int pf_cuda_device_count(void);
/* Comma-separated compute capabilities compiled ("90" or ""). */
const char *pf_cuda_archs(void);
/* The CUDA device holding `ptr`, or -1 (host memory, unknown, or not built). */
int pf_cuda_pointer_device(const void *ptr);
/* Number of logical CPU cores; the default thread count of the CPU backend. */
int pf_cpu_count(void);

/* ------------------------------------------------------------------------ */
/* Memory for results the caller's library does not allocate                 */
/* ------------------------------------------------------------------------ */

/* 64-byte-aligned host memory; release with free(). NULL when out of memory. */
void *pf_host_alloc(size_t bytes);
/* Device memory on CUDA device `device_id` (PF_STATUS_NOT_SUPPORTED without CUDA). */
pf_status pf_device_alloc(void **ptr, size_t bytes, int32_t device_id);
void pf_device_free(void *ptr, int32_t device_id);

/* ------------------------------------------------------------------------ */
/* Attention (forward and backward)                                          */
/* ------------------------------------------------------------------------ */

/*
 * One params struct for flash_fwd and flash_bwd.
 *
 * Dense layout (cu_seqlens_q.data == NULL):
 *   q      [batch, seqlen_q, num_heads,    head_dim]   f32 | f16 | bf16
 *   k, v   [batch, seqlen_k, num_kv_heads, head_dim]   same dtype as q
 *   out    [batch, seqlen_q, num_heads,    head_dim]   same dtype as q
 *   lse    [batch, num_heads, seqlen_q]                f32, natural log; optional in fwd
 * Packed variable-length layout (cu_seqlens_q.data != NULL):
 *   q, out [total_q, num_heads, head_dim]; k, v [total_k, num_kv_heads, head_dim]
 *   cu_seqlens_q, cu_seqlens_k  int32 [batch + 1], non-decreasing from 0 to total
 *   lse    [num_heads, total_q]
 *   max_seqlen_q/k bound every sequence's length (informational on the CPU).
 *
 * num_heads % num_kv_heads == 0 (MHA, GQA, MQA): query head h reads KV head
 * h / (num_heads / num_kv_heads). 1 <= head_dim <= 256.
 *
 * Masks, with i a query row and j a key column of one sequence (sq, sk lengths):
 *   causal: j <= i + sk - sq (aligned bottom-right)
 *   window (left, right), -1 unbounded: i + sk - sq - left <= j <= i + sk - sq + right
 *   softcap > 0: s = softcap * tanh(s / softcap), applied to the scaled score
 *   alibi_slopes f32 [num_heads] or [batch, num_heads]: s -= slope * |i + sk - sq - j|
 *   dropout_p in [0, 1): P is dropped with a counter-based generator keyed by
 *     (seed, offset, batch, head, i, j) and kept entries scaled by 1 / (1 - p).
 * A fully masked row gives out = 0 and lse = -inf.
 *
 * Backward (pf_flash_bwd) additionally reads dout (q's shape and dtype) and the
 * forward's out and lse, and writes dq, dk, dv (shapes and dtype of q, k, v).
 */
typedef struct pf_attn_params {
    pf_tensor q, k, v;
    pf_tensor out;
    pf_tensor lse;
    pf_tensor cu_seqlens_q, cu_seqlens_k;
    int64_t max_seqlen_q, max_seqlen_k;
    pf_tensor alibi_slopes;
    /* backward only */
    pf_tensor dout, dq, dk, dv;

    float softmax_scale;           /* 0 = 1 / sqrt(head_dim) */
    int32_t causal;
    int32_t window_left, window_right;
    float softcap;                 /* 0 = off */
    float dropout_p;
    uint64_t seed, offset;
    int32_t deterministic;         /* backward: bitwise-reproducible gradients */

    int32_t num_threads;           /* CPU backend; 0 = pf_cpu_count() */
    void *stream;                  /* CUDA backend: cudaStream_t */
} pf_attn_params;

/* Validate only (no compute). Returns the status pf_flash_fwd would. */
pf_status pf_flash_fwd_validate(const pf_attn_params *params);
pf_status pf_flash_fwd(const pf_attn_params *params);

pf_status pf_flash_bwd_validate(const pf_attn_params *params);
pf_status pf_flash_bwd(const pf_attn_params *params);

/*
 * The dropout mask as the forward applies it: keep[b, h, i, j] (1 kept, 0 dropped)
 * for the dense layout, u8 [batch, num_heads, seqlen_q, seqlen_k]. For tests.
 */
pf_status pf_dropout_mask(const pf_attn_params *params, pf_tensor mask);

/* ------------------------------------------------------------------------ */
/* Paged attention and flash decoding                                        */
/* ------------------------------------------------------------------------ */

/*
 * Paged attention: each sequence's queries attend to the tokens it holds in a
 * block-allocated KV cache, read through its row of block_tables. One call
 * serves decode (1 query per sequence), speculative verification (k queries)
 * and chunked prefill (a chunk of queries), mixed freely with cu_seqlens_q.
 *
 * Query layouts (q and out have the same layout; out has q's dtype):
 *   [batch, num_heads, head_dim]         cu_seqlens_q absent: one query per
 *                                        sequence (decode); total_q = batch
 *   [batch, q_len, num_heads, head_dim]  cu_seqlens_q absent: q_len queries for
 *                                        every sequence; total_q = batch * q_len,
 *                                        query i of sequence b is token b * q_len + i
 *   [total_q, num_heads, head_dim]       with cu_seqlens_q int32 [batch + 1]
 *                                        (0 first, non-decreasing, total_q last):
 *                                        sequence b owns tokens cu[b] .. cu[b+1] - 1
 *                                        (a sequence may have 0 queries)
 * k_cache,
 * v_cache      [num_blocks, block_size, num_kv_heads, head_dim], q's dtype and device;
 *              1 <= block_size <= 256; 1 <= head_dim <= 256;
 *              num_heads % num_kv_heads == 0 (query head h reads KV head h / (num_heads / num_kv_heads))
 * block_tables int32 [batch, max_blocks_per_seq]; token t of sequence b lives in block
 *              block_tables[b, t / block_size] at offset t % block_size. Only the first
 *              ceil(seq_len / block_size) entries of a row are read (and checked to lie in
 *              [0, num_blocks)); the rest may hold anything (padding). Ids may repeat
 *              across sequences (shared prefixes).
 * seq_lens     int32 [batch]; tokens held per sequence, the queries' own tokens included
 *              (write_kv_cache runs first): q_len <= seq_len <= max_blocks_per_seq * block_size.
 *              Slots past seq_len in the last block are never read (stale data, even NaN,
 *              cannot reach the output).
 * out          q's shape and dtype
 * lse          f32 [num_heads, total_q] (optional), natural log, for every layout (the
 *              layout pf_merge_attn_states takes)
 * alibi_slopes f32 [num_heads] or [batch, num_heads] (optional)
 * block_tables, seq_lens, cu_seqlens_q, alibi_slopes live on q's device; host-resident ones
 * are range-checked before anything runs (on CUDA the kernels bound-check instead).
 *
 * Causal alignment: query i of a sequence with q_len queries and seq_len tokens sits at
 * position p = seq_len - q_len + i. causal lets it see tokens 0..p; window (left, right)
 * keeps p - left <= j <= p + right (-1 = unbounded); causal = 0 and no window: all
 * seq_len tokens. softcap, ALiBi (s -= slope * |p - j|) and softmax_scale (0 = 1/sqrt(d))
 * as in pf_attn_params. A query that sees no token gets out = 0 and lse = -inf.
 *
 * Flash decoding: num_splits = 1 processes each sequence's tokens in one pass; n > 1
 * splits them into n chunks (whole 64-token tiles, so at most ceil(seq_len / 64) are
 * non-empty) computed in parallel, each giving a partial out + lse, merged by
 * log-sum-exp; 0 = automatic from the work and num_threads (splits only when
 * batch x kv heads x query tiles leaves threads idle). Results agree across num_splits
 * to float32 rounding.
 * num_threads: CPU backend thread count, 0 = pf_cpu_count().
 */
typedef struct pf_paged_params {
    pf_tensor q;
    pf_tensor k_cache, v_cache;
    pf_tensor block_tables;
    pf_tensor seq_lens;
    pf_tensor cu_seqlens_q;
    pf_tensor out;
    pf_tensor lse;
    pf_tensor alibi_slopes;
    float softmax_scale;
    int32_t causal;
    int32_t window_left, window_right;
    float softcap;
    int32_t num_splits;
    int32_t num_threads;
    void *stream;
} pf_paged_params;

pf_status pf_paged_attn_validate(const pf_paged_params *params);
pf_status pf_paged_attn(const pf_paged_params *params);

/*
 * Merge two partial attention results over disjoint key sets:
 *   out_a, out_b, out  [..., num_heads, head_dim]: any leading shape (tokens = its product),
 *                      one float dtype for all three
 *   lse_a, lse_b       f32 [num_heads, tokens], natural log
 *   lse                f32 [num_heads, tokens], optional output
 * lse = logaddexp(lse_a, lse_b), out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b.
 * A side whose lse is -inf contributes nothing (its out is never read, so it may hold
 * anything); both -inf gives out = 0, lse = -inf. NaN in an lse propagates.
 * out (and lse) may be the very same memory as out_a or out_b (lse_a or lse_b), with the
 * same strides: in-place merging is supported; other overlaps are not.
 */
typedef struct pf_merge_params {
    pf_tensor out_a, lse_a, out_b, lse_b, out, lse;
    int32_t num_threads;
    void *stream;
} pf_merge_params;

pf_status pf_merge_attn_states_validate(const pf_merge_params *params);
pf_status pf_merge_attn_states(const pf_merge_params *params);

/* ------------------------------------------------------------------------ */
/* Cache operations                                                          */
/* ------------------------------------------------------------------------ */

/*
 * k, v             [num_tokens, num_kv_heads, head_dim], the caches' dtype (f32, f16, bf16)
 * k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim], one shape and device
 * slot_mapping     int64 [num_tokens] on the caches' device; token t goes to slot
 *                  slot_mapping[t] = block * block_size + offset; negative = skip.
 * All slots are checked (< num_blocks * block_size) before anything is written (host
 * slot_mapping; on CUDA the kernel bound-checks). Two tokens mapped to one slot: one of
 * them wins, which one is unspecified.
 */
pf_status pf_write_kv_cache_validate(pf_tensor k, pf_tensor v, pf_tensor k_cache,
                                     pf_tensor v_cache, pf_tensor slot_mapping);
pf_status pf_write_kv_cache(pf_tensor k, pf_tensor v, pf_tensor k_cache, pf_tensor v_cache,
                            pf_tensor slot_mapping, void *stream);

/*
 * caches          num_caches tensors [num_blocks_c, ...] (a block is a slice along dim 0,
 *                 e.g. [num_blocks, block_size, num_kv_heads, head_dim]); pass every
 *                 layer's k and v caches together. Any dtypes, one device.
 * block_mapping   int64 [n, 2] (src, dst) pairs, host-readable (or, for CUDA caches, on
 *                 their device); every id checked against every cache before any copy.
 * For each cache the pairs are applied in order (a later pair sees earlier copies).
 */
pf_status pf_copy_blocks_validate(const pf_tensor *caches, int32_t num_caches,
                                  pf_tensor block_mapping);
pf_status pf_copy_blocks(const pf_tensor *caches, int32_t num_caches, pf_tensor block_mapping,
                         void *stream);

/*
 * src, dst        [num_blocks_src, ...] and [num_blocks_dst, ...]: same block shape and
 *                 dtype; any devices (host <-> host on the CPU backend; if either side is
 *                 CUDA the CUDA backend copies with cudaMemcpyAsync on `stream`)
 * block_mapping   int64 [n, 2] (src block, dst block), host-readable; ids checked against
 *                 src and dst before any copy. Pairs are applied in order.
 */
pf_status pf_swap_blocks_validate(pf_tensor src, pf_tensor dst, pf_tensor block_mapping);
pf_status pf_swap_blocks(pf_tensor src, pf_tensor dst, pf_tensor block_mapping, void *stream);

/* ------------------------------------------------------------------------ */
/* Block pool (mechanism under the Python BlockManager)                     */
/* ------------------------------------------------------------------------ */

typedef struct pf_block_pool pf_block_pool_t;

#ifdef __cplusplus
}
#endif

#endif /* PAGEDFLASH_H */
