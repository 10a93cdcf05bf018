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
    PF_DTYPE_F64 = 7,
    /* compressed KV caches only (see "Compressed KV caches" below) */
    PF_DTYPE_F8E4M3 = 8,           /* OCP FP8 E4M3 "fn": finite, max 448, NaN 0x7f/0xff ("float8_e4m3fn") */
    PF_DTYPE_F8E5M2 = 9,           /* OCP FP8 E5M2: max 57344, inf, NaN ("float8_e5m2") */
    PF_DTYPE_I8 = 10               /* signed 8-bit integer ("int8") */
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

/* 1 / sqrt(head_dim) in float32, the usual softmax_scale (pf_attn_params, pf_paged_params take
 * the scale as given: a zero scale is a zero scale, so fill it with this for the default). */
float pf_default_softmax_scale(int64_t head_dim);
const char *pf_dtype_name(pf_dtype dtype); /* "float16", ... */

/* ------------------------------------------------------------------------ */
/* Kernel hints                                                              */
/* ------------------------------------------------------------------------ */

/*
 * Which kernel runs is decided per call by the backend's heuristic
 * (PF_KERNEL_AUTO, the default and what users want). Tests and benchmarks steer
 * it with the `kernel` field of pf_attn_params / pf_paged_params: a hint names
 * one kernel (and, for paged attention, its CTA shape); the call fails with
 * PF_STATUS_NOT_SUPPORTED when that kernel cannot take it (a device, dtype,
 * head dim or layout it does not handle) instead of silently running another.
 * A hint of another operation is PF_STATUS_INVALID_VALUE. The CPU backend has
 * one kernel per operation and ignores every valid hint.
 *
 * Names (pf_kernel_parse / pf_kernel_name; the Python API takes them as
 * `kernel="..."`): "auto"; flash_fwd / flash_bwd: "sm80", "sm90"; paged_attn:
 * "sm90" (the prefill path: the wgmma flash forward reading K/V through the block
 * table, what "auto" runs for >= 128 queries per sequence on Hopper), "simple",
 * "1x4", "4x4", "8x8", "1x8", "2x8", "4x8" (split-KV tensor-core kernel: H KV
 * heads x W warps per CTA), each tensor-core shape optionally with "+registers".
 */
typedef enum pf_kernel {
    PF_KERNEL_AUTO = 0,
    /* flash_fwd, flash_bwd (CUDA, float16 / bfloat16) */
    PF_KERNEL_FLASH_SM80 = 1,       /* mma.sync kernels (every sm_80+ GPU, Hopper included) */
    PF_KERNEL_FLASH_SM90 = 2,       /* wgmma kernels (Hopper; aligned tensors, head dims 64 / 128);
                                       also paged_attn's prefill path (the wgmma forward over the cache) */
    /* paged_attn (CUDA) */
    PF_KERNEL_PAGED_SIMPLE = 16,    /* CUDA cores, one warp per (query, head, split); any dtype, head dim */
    PF_KERNEL_PAGED_1X4 = 17,       /* tensor cores, 1 KV head x 4 warps (token mode) */
    PF_KERNEL_PAGED_4X4 = 18,       /* 4 KV heads x 4 warps, a warp per head (head mode) */
    PF_KERNEL_PAGED_8X8 = 19,       /* 8 KV heads x 8 warps (head mode) */
    PF_KERNEL_PAGED_1X8 = 20,       /* 1 KV head x 8 warps sharing it */
    PF_KERNEL_PAGED_2X8 = 21,       /* 2 KV heads x 8 warps, 4 per head */
    PF_KERNEL_PAGED_4X8 = 22,       /* 4 KV heads x 8 warps, 2 per head */
    /* flag, or'ed into a tensor-core paged shape: K/V straight into registers
     * instead of through the per-warp shared-memory ring */
    PF_KERNEL_PAGED_REGISTERS = 256
} pf_kernel;

/* The hint called `name` ("auto", "sm80", "8x8+registers", ...) into *kernel.
 * PF_STATUS_INVALID_VALUE (message lists the names) for an unknown name. */
pf_status pf_kernel_parse(const char *name, int32_t *kernel);
/* The name of a hint, or NULL for a value that is no hint. */
const char *pf_kernel_name(int32_t kernel);

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

    float softmax_scale;           /* used as given (finite; 0 included): pf_default_softmax_scale */
    int32_t causal;
    int32_t window_left, window_right;
    float softcap;                 /* 0 = off */
    float dropout_p;
    uint64_t seed, offset;
    int32_t deterministic;         /* backward: bitwise-reproducible gradients */
    int32_t kernel;                /* pf_kernel hint: PF_KERNEL_AUTO, _FLASH_SM80 or _FLASH_SM90 */

    int32_t num_threads;           /* CPU backend; 0 = pf_cpu_count() */
    void *stream;                  /* CUDA backend: cudaStream_t */
} pf_attn_params;

/* Validate only (no compute). Returns the status pf_flash_fwd would. */
pf_status pf_flash_fwd_validate(const pf_attn_params *params);
pf_status pf_flash_fwd(const pf_attn_params *params);

pf_status pf_flash_bwd_validate(const pf_attn_params *params);
pf_status pf_flash_bwd(const pf_attn_params *params);

/*
 * The dropout mask as the forward applies it: keep[b, h, i, j] (1 kept, 0 dropped).
 * For tests. params gives q, k (v may be absent), dropout_p, seed, offset and, for
 * varlen, cu_seqlens_q/k; the masking options are ignored (masked entries have P = 0).
 *   dense:  mask u8 [batch, num_heads, seqlen_q, seqlen_k]
 *   varlen: mask u8 [batch, num_heads, Sq, Sk], Sq/Sk >= the longest query/key
 *           sequence; i, j are positions inside sequence b; entries past its
 *           lengths are written 0.
 * keep = philox4x32_10(counter = (j / 4, i, b * num_heads + h, offset),
 *                      key = (seed & 0xffffffff, seed >> 32))[j % 4] >= floor(p * 2^32)
 * (pagedflash_philox.h, beside this header); the CPU and CUDA backends agree bit for bit.
 *
 * pf_flash_bwd on the CPU is always deterministic (bitwise-identical gradients for
 * any thread count); `deterministic` matters only to backends that would otherwise
 * accumulate with atomics.
 */
pf_status pf_dropout_mask(const pf_attn_params *params, pf_tensor mask);

/* ------------------------------------------------------------------------ */
/* Compressed KV caches                                                      */
/* ------------------------------------------------------------------------ */

/*
 * k_cache / v_cache may hold float8 or int8 codes instead of float16 / bfloat16 / float32
 * values: half (or a quarter) of the bytes to store and to read per token. A cache element
 * stands for  x = code * scale  (code: the float8 value, or the int8 integer), with a float32
 * scale per cache (k_scale for k_cache, v_scale for v_cache):
 *
 *   cache dtype      per-tensor scale           per-(token, KV head) scale
 *   float8_e4m3fn    f32 [] or [1]; absent = 1  -
 *   float8_e5m2      f32 [] or [1]; absent = 1  -
 *   int8             f32 [] or [1]              f32 [num_blocks, block_size, num_kv_heads]
 *   f16, bf16, f32   - (a scale is a TypeError)
 *
 * An int8 cache needs a scale. A per-(token, head) scale is stored beside its cache and paged
 * the same way: scale[block, offset, head] belongs to the row cache[block, offset, head, :]
 * (move it with its blocks: pf_copy_blocks takes it as one more cache, pf_swap_blocks_scaled
 * swaps it with its cache). A per-tensor scale lives in host memory or on the cache's device;
 * a host-resident one must be finite and > 0 (checked).
 *
 * Writing (pf_write_kv_cache_scaled) quantizes k, v (any of f16, bf16, f32) in float32:
 *   float8:  code = fp8(x / scale), round to nearest even, saturating: |x / scale| beyond the
 *            largest finite value (448 e4m3fn, 57344 e5m2) gives +-that value
 *   int8:    code = clamp(rne(x / scale), -127, 127) (symmetric; -128 is never written)
 *   int8 with a per-(token, head) scale: the call computes and writes each row's scale,
 *            scale = max|x| / 127 over the row's head_dim values in float32 (1 where that is
 *            0: an all-zero row)
 * (x / scale is one float32 division.) k and v must be finite: a NaN or inf among the tokens
 * written is PF_STATUS_INVALID_VALUE naming the element, and nothing is written.
 * Reading (pf_paged_attn) computes attention over x = code * scale in float32, as for a float32
 * cache (q and out keep their own dtype); a backend may apply a scale wherever it is cheapest
 * (the CPU one: per-tensor scales to the query and the output, per-(token, head) ones to the
 * scores and probabilities), which differs from dequantizing each element first by float32
 * rounding only.
 *
 * The CPU backend implements every combination above; the CUDA backend refuses compressed
 * caches in pf_paged_attn and pf_write_kv_cache_scaled with PF_STATUS_NOT_SUPPORTED (it
 * copies and swaps their blocks: those move bytes).
 */

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
 * v_cache      [num_blocks, block_size, num_kv_heads, head_dim], q's device; q's dtype, or
 *              both float8_e4m3fn, float8_e5m2 or int8 (compressed, read as code * scale);
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
 * k_scale,
 * v_scale      the caches' scales (compressed caches only; "Compressed KV caches" above)
 * block_tables, seq_lens, cu_seqlens_q, alibi_slopes live on q's device; host-resident ones
 * are range-checked before anything runs (on CUDA the kernels bound-check instead).
 *
 * Causal alignment: query i of a sequence with q_len queries and seq_len tokens sits at
 * position p = seq_len - q_len + i. causal lets it see tokens 0..p; window (left, right)
 * keeps p - left <= j <= p + right (-1 = unbounded); causal = 0 and no window: all
 * seq_len tokens. softcap, ALiBi (s -= slope * |p - j|) and softmax_scale (used as given)
 * as in pf_attn_params. A query that sees no token gets out = 0 and lse = -inf.
 *
 * Flash decoding: num_splits = 1 processes each sequence's tokens in one pass; n > 1
 * splits them into n chunks (whole 64-token tiles, so at most ceil(seq_len / 64) are
 * non-empty) computed in parallel, each giving a partial out + lse, merged by
 * log-sum-exp; 0 = automatic from the work alone (never from num_threads: the CPU backend
 * splits when batch x kv heads x query tiles is below 64 items, the CUDA backend to fill
 * the GPU once), so a call's result is bitwise the same for any thread count. Results
 * agree across num_splits to float32 rounding.
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
    pf_tensor k_scale, v_scale;    /* compressed caches: f32 [] / [1], or [num_blocks, block_size, hk] (int8) */
    float softmax_scale;
    int32_t causal;
    int32_t window_left, window_right;
    float softcap;
    int32_t num_splits;
    int32_t kernel;                /* pf_kernel hint: PF_KERNEL_AUTO, PF_KERNEL_FLASH_SM90 or a PF_KERNEL_PAGED_* */
    int32_t num_threads;
    void *stream;
} pf_paged_params;

pf_status pf_paged_attn_validate(const pf_paged_params *params);
pf_status pf_paged_attn(const pf_paged_params *params);

/*
 * Merge two partial attention results over disjoint key sets:
 *   out_a, out_b, out  [..., num_heads, head_dim]: any leading shape (tokens = its product),
 *                      one float dtype for all three
 *   lse_a, lse_b       f32, natural log, each in either layout (any strides):
 *                      [num_heads, tokens] (pf_paged_attn's, packed pf_flash_fwd's), or for a
 *                      4-d out [batch, seqlen, num_heads, head_dim], [batch, num_heads, seqlen]
 *                      (dense pf_flash_fwd's)
 *   lse                f32, optional output, in either layout
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
 * k, v             [num_tokens, num_kv_heads, head_dim], the caches' dtype (f32, f16, bf16);
 *                  for compressed caches any of f32, f16, bf16 (k and v alike), finite
 * k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim], one shape and device;
 *                  f32, f16, bf16, or both float8_e4m3fn, float8_e5m2 or int8
 * slot_mapping     int64 [num_tokens] on the caches' device; token t goes to slot
 *                  slot_mapping[t] = block * block_size + offset; negative = skip.
 * k_scale, v_scale (pf_write_kv_cache_scaled) the caches' scales ("Compressed KV caches"):
 *                  absent for float caches; per-tensor ones are read, per-(token, head) ones
 *                  [num_blocks, block_size, num_kv_heads] are written with the rows (the
 *                  scale of each token written, computed from its values).
 * pf_write_kv_cache is pf_write_kv_cache_scaled with both scales absent (float caches, or
 * float8 caches with scale 1).
 * All slots are checked (< num_blocks * block_size) before anything is written (host
 * slot_mapping; on CUDA the kernel bound-checks). Two tokens mapped to one slot: one of
 * them wins, which one is unspecified.
 */
pf_status pf_write_kv_cache_validate(pf_tensor k, pf_tensor v, pf_tensor k_cache, pf_tensor v_cache,
                                     pf_tensor slot_mapping);
pf_status pf_write_kv_cache(pf_tensor k, pf_tensor v, pf_tensor k_cache, pf_tensor v_cache, pf_tensor slot_mapping,
                            void *stream);
pf_status pf_write_kv_cache_scaled_validate(pf_tensor k, pf_tensor v, pf_tensor k_cache, pf_tensor v_cache,
                                            pf_tensor slot_mapping, pf_tensor k_scale, pf_tensor v_scale);
pf_status pf_write_kv_cache_scaled(pf_tensor k, pf_tensor v, pf_tensor k_cache, pf_tensor v_cache,
                                   pf_tensor slot_mapping, pf_tensor k_scale, pf_tensor v_scale, void *stream);

/*
 * caches          num_caches tensors [num_blocks_c, ...] (a block is a slice along dim 0,
 *                 e.g. [num_blocks, block_size, num_kv_heads, head_dim]); pass every
 *                 layer's k and v caches together, and their per-(token, head) scales
 *                 [num_blocks, block_size, num_kv_heads] where they have some (a scale is a
 *                 cache like any other here). Any dtypes, one device.
 * block_mapping   int64 [n, 2] (src, dst) pairs, host-readable (or, for CUDA caches, on
 *                 their device); every id checked against every cache before any copy.
 * For each cache the pairs are applied in order (a later pair sees earlier copies).
 */
pf_status pf_copy_blocks_validate(const pf_tensor *caches, int32_t num_caches, pf_tensor block_mapping);
pf_status pf_copy_blocks(const pf_tensor *caches, int32_t num_caches, pf_tensor block_mapping, void *stream);

/*
 * src, dst        [num_blocks_src, ...] and [num_blocks_dst, ...]: same block shape and
 *                 dtype; any devices (host <-> host on the CPU backend; if either side is
 *                 CUDA the CUDA backend copies with cudaMemcpyAsync on `stream`)
 * block_mapping   int64 [n, 2] (src block, dst block), host-readable; ids checked against
 *                 src and dst before any copy. Pairs are applied in order.
 * pf_swap_blocks_scaled also moves the per-(token, head) scales of int8 caches:
 * src_scale       f32 [num_blocks_src, block_size, num_kv_heads] of src (int8, 4-d), on src's
 *                 side (host or src's device); dst_scale likewise for dst; both given or both
 *                 absent (then it is pf_swap_blocks). Per-tensor scales do not move: use the
 *                 same on both sides. Everything is checked before anything is copied.
 */
pf_status pf_swap_blocks_validate(pf_tensor src, pf_tensor dst, pf_tensor block_mapping);
pf_status pf_swap_blocks(pf_tensor src, pf_tensor dst, pf_tensor block_mapping, void *stream);
pf_status pf_swap_blocks_scaled_validate(pf_tensor src, pf_tensor dst, pf_tensor src_scale, pf_tensor dst_scale,
                                         pf_tensor block_mapping);
pf_status pf_swap_blocks_scaled(pf_tensor src, pf_tensor dst, pf_tensor src_scale, pf_tensor dst_scale,
                                pf_tensor block_mapping, void *stream);

/* ------------------------------------------------------------------------ */
/* Block pool (mechanism under the Python BlockManager)                     */
/* ------------------------------------------------------------------------ */

/*
 * A pool of KV-cache blocks with per-sequence block tables: free list, reference
 * counts, copy-on-write, fork, swapping to a host pool, and prefix caching (full
 * blocks identified by a hash chain, unreferenced cached blocks evicted least
 * recently used first). It is the mechanism under the Python BlockManager, which
 * adds the policy (watermark, admission, AllocStatus).
 *
 * Two pools of block ids: the device pool [0, num_blocks) and the host pool
 * [0, num_cpu_blocks) used for swapped-out sequences. A sequence is an int64 id
 * with a length in tokens and a block table: table[i] holds its tokens
 * [i * block_size, (i + 1) * block_size); slot = block * block_size + offset.
 * A device block is in exactly one of three states: free (on the free list),
 * in use (refcount > 0, referenced by that many sequence-table entries) or
 * evictable (refcount 0 but registered in the prefix cache; reusable, taken
 * after the free list is empty, least recently released first). "Free" counts
 * in pf_block_pool_stats and every capacity check include the evictable ones.
 *
 * Token ids (int32, >= 0; -1 = unknown) are recorded per block. With prefix
 * caching on they are required; a block is registered in the cache when it
 * becomes full: hash = H(parent block's hash, the block's token ids) (64-bit, a
 * hit is confirmed by comparing the parent hash and every token id).
 *
 * Every mutating call checks everything (ids, lengths, free blocks, memory)
 * before it changes anything: on failure the pool is exactly as it was.
 * A pool is not thread-safe: serialize calls on one pool (the Python binding
 * holds the GIL). Calls take microseconds and allocate only when a capacity grows.
 */
typedef struct pf_block_pool pf_block_pool_t;

typedef struct pf_block_pool_config {
    int32_t num_blocks;            /* device blocks, >= 1 */
    int32_t block_size;            /* tokens per block, >= 1 */
    int32_t num_cpu_blocks;        /* host blocks for swapping, >= 0 */
    int32_t enable_prefix_caching; /* 0 or 1 */
} pf_block_pool_config;

typedef struct pf_block_pool_stats {
    int32_t num_blocks, block_size, num_cpu_blocks;
    int32_t num_free_blocks;       /* allocatable now: on the free list + evictable */
    int32_t num_evictable_blocks;  /* cached, refcount 0 (included in num_free_blocks) */
    int32_t num_used_blocks;       /* refcount > 0; free + used == num_blocks */
    int32_t num_cached_blocks;     /* registered in the prefix cache (in use or evictable) */
    int32_t num_free_cpu_blocks;
    int32_t num_used_cpu_blocks;
    int32_t num_seqs;              /* live sequences, swapped ones included */
    int64_t prefix_cache_queries;  /* full prompt blocks eligible for a hit, over all allocations */
    int64_t prefix_cache_hits;     /* of those, found in the cache */
} pf_block_pool_stats;

/* Block states reported by pf_block_pool_block_states. */
#define PF_BLOCK_FREE 0
#define PF_BLOCK_USED 1
#define PF_BLOCK_EVICTABLE 2

/* Create a pool. *pool receives the handle (NULL on failure). */
pf_status pf_block_pool_init(pf_block_pool_t **pool, const pf_block_pool_config *config);
/* Release a pool and everything it holds; NULL is a no-op. */
void pf_block_pool_free(pf_block_pool_t *pool);

/* Counts and cumulative prefix-cache statistics. */
pf_status pf_block_pool_stats_get(const pf_block_pool_t *pool, pf_block_pool_stats *stats);

/*
 * Read-only prefix-cache lookup for a prompt of num_tokens token ids
 * (token_ids int32 [num_tokens], may be NULL when prefix caching is off):
 * *hit_blocks = leading full blocks allocate() would reuse, *hit_evictable = how
 * many of those are evictable now (reusing them takes them out of the free count).
 * At most (num_tokens - 1) / block_size blocks hit, so at least one prompt token
 * is always computed.
 */
pf_status pf_block_pool_prefix_lookup(const pf_block_pool_t *pool, const int32_t *token_ids, int64_t num_tokens,
                                      int32_t *hit_blocks, int32_t *hit_evictable);

/*
 * Create sequence seq_id holding num_tokens tokens (token_ids int32 [num_tokens];
 * NULL allowed only without prefix caching: tokens unknown). Leading full blocks
 * found in the prefix cache are shared; the rest come from the free list, then
 * by evicting cached blocks. *num_cached_tokens (may be NULL) receives the tokens
 * whose KV is already in the cache (a multiple of block_size).
 * Errors: seq_id already present, num_tokens < 0 (INVALID_VALUE); not enough
 * free blocks (OUT_OF_BLOCKS).
 */
pf_status pf_block_pool_allocate(pf_block_pool_t *pool, int64_t seq_id, const int32_t *token_ids, int64_t num_tokens,
                                 int64_t *num_cached_tokens);

/*
 * Append tokens to num_seqs running (not swapped) sequences, in order, as one
 * atomic step: either every sequence is extended or nothing changes.
 *   seq_ids         int64 [num_seqs], distinct
 *   num_new_tokens  int32 [num_seqs] (>= 0), or NULL: `uniform_new_tokens` each
 *   token_ids       int32 [sum of new tokens], the new tokens of each sequence
 *                   concatenated in order; NULL allowed only without prefix caching
 *   cow             int64 [num_seqs, 2] out: (src, dst) copy-on-write pairs; *num_cow
 *                   receives their count. When a sequence's last block is partly
 *                   filled and shared (refcount > 1), it gets a fresh block and
 *                   the caller must copy src -> dst (pf_copy_blocks) before
 *                   writing the new tokens.
 * Full blocks that result are registered in the prefix cache.
 * Errors: unknown, duplicate or swapped-out id (INVALID_VALUE); not enough
 * free blocks for all of them together (OUT_OF_BLOCKS).
 */
pf_status pf_block_pool_append(pf_block_pool_t *pool, const int64_t *seq_ids, int32_t num_seqs,
                               const int32_t *num_new_tokens, int32_t uniform_new_tokens, const int32_t *token_ids,
                               int64_t *cow, int32_t *num_cow);

/* New sequence child_id sharing every block of parent_id (refcounts + 1). The
 * next append to either copies a shared, partly filled last block. */
pf_status pf_block_pool_fork(pf_block_pool_t *pool, int64_t parent_id, int64_t child_id);

/* Drop a sequence (running or swapped). Its blocks lose one reference; device
 * blocks reaching 0 go to the evictable list if cached (last block first, so a
 * prefix outlives its continuations), else to the free list. */
pf_status pf_block_pool_release(pf_block_pool_t *pool, int64_t seq_id);

/*
 * Number of distinct blocks the sequences hold, i.e. the blocks a swap of them
 * needs on the other side. to_host = 1: the sequences must be running (swap out);
 * 0: they must be swapped out (swap in). Checks ids like the swap itself.
 * Changes nothing visible (the pool is non-const for its internal stamps).
 */
pf_status pf_block_pool_swap_count(pf_block_pool_t *pool, const int64_t *seq_ids, int32_t num_seqs, int32_t to_host,
                                   int32_t *num_blocks);

/*
 * Move sequences between the pools. Each distinct block they hold gets one block
 * on the other side (blocks shared among them stay shared); the old block loses
 * their references.
 *   mapping  int64 [max_pairs, 2] out: (src, dst) block pairs for pf_swap_blocks
 *            (device -> host for to_host = 1, host -> device for 0), in order of
 *            first use; *num_pairs receives the count.
 * Swapped-in full blocks are registered in the prefix cache again.
 * Errors: as pf_block_pool_swap_count; max_pairs too small (INVALID_VALUE);
 * not enough free blocks on the other side (OUT_OF_BLOCKS).
 */
pf_status pf_block_pool_swap(pf_block_pool_t *pool, const int64_t *seq_ids, int32_t num_seqs, int32_t to_host,
                             int64_t *mapping, int64_t max_pairs, int64_t *num_pairs);

/* A sequence's length, block count and whether it is swapped out (any out
 * pointer may be NULL). INVALID_VALUE for an unknown id. */
pf_status pf_block_pool_seq_info(const pf_block_pool_t *pool, int64_t seq_id, int64_t *num_tokens, int32_t *num_blocks,
                                 int32_t *swapped);

/* Copy a sequence's block table (device ids, or host ids if swapped) into
 * out int32 [capacity]; *num_blocks receives its length (capacity must hold it). */
pf_status pf_block_pool_block_table(const pf_block_pool_t *pool, int64_t seq_id, int32_t *out, int32_t capacity,
                                    int32_t *num_blocks);

/* The largest block count among running sequences seq_ids int64 [num_seqs]. */
pf_status pf_block_pool_max_blocks(const pf_block_pool_t *pool, const int64_t *seq_ids, int32_t num_seqs,
                                   int32_t *max_blocks);

/*
 * Padded block tables of running sequences, a gather of the persistent tables:
 *   seq_ids int64 [num_seqs]; out int32 [num_seqs, width] (row stride `width`)
 * Row i holds sequence i's table, then `pad` up to width. width must be at least
 * every sequence's block count.
 */
pf_status pf_block_pool_block_tables(const pf_block_pool_t *pool, const int64_t *seq_ids, int32_t num_seqs,
                                     int32_t *out, int32_t width, int32_t pad);

/* seq_lens int32 [num_seqs] of running sequences. */
pf_status pf_block_pool_seq_lens(const pf_block_pool_t *pool, const int64_t *seq_ids, int32_t num_seqs, int32_t *out);

/*
 * The slots of the last k tokens of each running sequence, in order (the tokens
 * being written this step): out int64 [capacity], *num_slots receives sum(k).
 *   num_new_tokens int32 [num_seqs] (0 <= k <= length), or NULL: `uniform_new_tokens`
 */
pf_status pf_block_pool_slot_mapping(const pf_block_pool_t *pool, const int64_t *seq_ids, int32_t num_seqs,
                                     const int32_t *num_new_tokens, int32_t uniform_new_tokens, int64_t *out,
                                     int64_t capacity, int64_t *num_slots);

/* A sequence's token ids as recorded (-1 where unknown): out int32 [capacity]. */
pf_status pf_block_pool_seq_tokens(const pf_block_pool_t *pool, int64_t seq_id, int32_t *out, int64_t capacity,
                                   int64_t *num_tokens);

/* Ids of the live sequences, in no particular order: out int64 [capacity]. */
pf_status pf_block_pool_seq_ids(const pf_block_pool_t *pool, int64_t *out, int32_t capacity, int32_t *num_seqs);

/*
 * Per-block inspection, for tests and debugging. on_host selects the pool.
 *   refcounts int32 [n], states int32 [n] (PF_BLOCK_*), hashes uint64 [n] (0 when
 *   the block has none) -- any may be NULL; n = num_blocks or num_cpu_blocks.
 */
pf_status pf_block_pool_block_states(const pf_block_pool_t *pool, int32_t on_host, int32_t *refcounts, int32_t *states,
                                     uint64_t *hashes);

/* The free list (next taken first) of a pool, and the evictable device blocks
 * (next evicted first): out int32 [capacity], *count receives the length. */
pf_status pf_block_pool_free_list(const pf_block_pool_t *pool, int32_t on_host, int32_t *out, int32_t capacity,
                                  int32_t *count);
pf_status pf_block_pool_evictable(const pf_block_pool_t *pool, int32_t *out, int32_t capacity, int32_t *count);

/* Drop every evictable block from the prefix cache (they become free);
 * *num_evicted (may be NULL) receives how many. */
pf_status pf_block_pool_reset_prefix_cache(pf_block_pool_t *pool, int32_t *num_evicted);

/* Verify every internal invariant (refcounts = table references, lists disjoint
 * and complete, hash index consistent). PF_STATUS_INTERNAL with a message if not. */
pf_status pf_block_pool_check(const pf_block_pool_t *pool);

#ifdef __cplusplus
}
#endif

#endif /* PAGEDFLASH_H */
