/*
 * paged/kernel.cuh - the tensor-core paged attention / flash decoding kernel
 * (split-KV over a block-allocated KV cache), float16 and bfloat16, head dims
 * 32, 64, 96, 128, 192, 256. Instantiated per (head dim, dtype) through
 * paged/instantiate.cuh by the generated files cuda/inst/paged_attn_hdimNN_<dtype>.cu;
 * the launcher (paged/launch.cu) chooses the variant, the split count and the
 * workspace. Layouts of its arguments: paged/args.cuh.
 *
 * Work decomposition. A "row" is one (query i, query head of the GQA group)
 * pair, rows ordered query-major (r = i * group + head_in_group); a row tile
 * holds kRows (8 or 16) rows, so all the query heads sharing a KV head -- and
 * for q_len > 1 several queries -- are computed against every K/V row loaded
 * (the K/V bytes of a split are read from memory once per row tile). The
 * split's token range is cut into tiles of kTile = 8 * kNT tokens.
 *   head mode (>= 4 KV heads): a CTA of kWarps (4 or 8) warps = (sequence, row
 *     tile, split, group of kWarps KV heads); warp w owns one KV head and walks
 *     every tile of the split, so the CTA reads each token's rows of kWarps heads
 *     together (the cache interleaves heads within a token: longer contiguous
 *     runs for the memory system), and writes its rows straight from registers.
 *   token mode: a CTA of 4 warps = (sequence, KV head, row tile, split); the
 *     warps take every 4th tile, keep their own online-softmax state and are
 *     merged through shared memory at the end.
 *   mixed shapes (ring only): kHeads KV heads per CTA of kWarps = 8 warps (1x8, 2x8,
 *     4x8), kWarps / kHeads warps per head taking every (kWarps / kHeads)-th tile,
 *     merged like token mode (in the drained ring).
 * Per warp and tile, on the tensor cores:
 *   S = Q K^T   mma.m16n8k16 (f16/bf16 in, f32 accumulate). A = Q (rows padded
 *               to 16), B = K^T as 16-byte vectors per lane (from global memory
 *               or from the ring, below): lane
 *               (g = lane / 4, q = lane % 4) loads token g of each 8-token
 *               group, 16-byte chunks q + 4j of its row; the head dimension is
 *               permuted identically in Q and K (the dot product does not care),
 *               so every load is one 16-byte vector and no shuffles are needed.
 *   O^T += V^T P^T  mma.m16n8k8 tf32 (V converted exactly from f16/bf16, P
 *               rounded to tf32: 10 mantissa bits, finer than bf16). A = V^T:
 *               lane (g, q) loads tokens 2q, 2q+1 of each group, 16-byte chunks
 *               g + 8c; B = P^T is the S accumulator as it sits in registers
 *               (token 2q / 2q+1 -> k slot q / q+4). The output lands with each
 *               lane holding whole 8-element chunks of rows 2q, 2q+1.
 * Where the fragments come from (kRing):
 *   ring (kRing = 3 slots of 16-token tiles; head dims 64 and 128, the default): each warp owns
 *     a ring of kRing slots in shared memory, a slot holding one tile's K rows and
 *     V rows (swizzled, pf_ring_swz). The warp copies a tile in with cp.async,
 *     8 lanes per 128-byte line, so each copy instruction asks for whole lines
 *     (the fragment layout gives each token to 4 lanes, so direct register loads
 *     ask for half lines of K: 1.5x the L2 requests); kRing - 1 tiles are in
 *     flight while one is computed, waited for with cp.async.wait_group and a
 *     __syncwarp (no CTA barrier: the warps stay independent), and the fragments
 *     are read with conflict-free 16-byte shared loads. 1.5-3% faster in head
 *     mode at batch >= 8 and 1.3-1.4x in token mode on an H200.
 *   registers (kRing = 0; other head dims, or the hint "+registers"): the K/V of
 *     the next kDepth tiles are loaded straight into registers while the current
 *     one is computed (a tile's K registers refilled right after S, its V
 *     registers right after PV; kDepth = 2 where the registers allow, else 1).
 * Block-table entries are fetched ahead of the pointers that need them. Missing
 * tokens read a static zero row, so every load or copy is an unpredicated 16 bytes.
 *
 * Masking / bounds: query i of a sequence with q_len queries and seq_len tokens
 * sits at p = seq_len - q_len + i; causal keeps j <= p, window (l, r) keeps
 * p - l <= j <= p + r, always j < seq_len. softcap (s = cap * tanh(s / cap))
 * then ALiBi (s -= slope * |p - j|) are applied to the scaled score, in the
 * log2 domain. seq_len is clamped to [0, max_blocks * block_size]; a block id
 * outside [0, num_blocks) is never dereferenced: its tokens contribute nothing
 * (as if masked). Loads of tokens that are masked for every row, past seq_len
 * or in a bad block are skipped (registers zeroed), so stale data -- NaN
 * included -- in unused slots never reaches the output. A row that sees no
 * token gets out = 0 and lse = -inf.
 */
#ifndef PF_PAGED_KERNEL_CUH
#define PF_PAGED_KERNEL_CUH

#include "attn/mask.cuh"
#include "attn/mma.cuh"
#include "paged/args.cuh"

/* ---- small device helpers ---- */

/* 16 bytes through the read-only path, without L1 allocation (streamed once). */
__device__ __forceinline__ uint4 pf_ldg16(const void *p) {
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p));
    return r;
}

/* The row a missing token (past the split, or in a block with a bad id) reads:
 * zeros, so its V contributes exactly nothing and its K is masked anyway. */
static __device__ __align__(16) uint4 pf_paged_zeros[32];

/* 16 bytes from shared memory (volatile: stays after the cp.async wait that guards it). */
__device__ __forceinline__ uint4 pf_lds16(uint32_t addr) {
    uint4 r;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "r"(addr));
    return r;
}

/* Shared memory of one warp's ring: kRing slots, each a K tile then a V tile of 8 kNT
 * token rows (the kernel's layout; the launcher sizes the CTA's dynamic memory with it). */
template <int kD, typename T, int kNT, int kRing>
constexpr int pf_ring_warp_bytes() {
    return kRing * 2 * 8 * kNT * kD * (int)sizeof(T);
}

/* Swizzle of the shared-memory ring (XOR on the 16-byte chunk index of token u's row):
 * conflict-free for the whole-line copies in (8 lanes per 128-byte line), for the K
 * fragment reads (lanes 4g + q: token g, chunk q + 4j) and for the V fragment reads
 * (token 2q + e, chunk g + 8c), each 8-lane phase of a 16-byte access hitting 8
 * distinct bank groups. */
__device__ __forceinline__ int pf_ring_swz(int u) { return ((u & 1) << 2) ^ (((u >> 1) & 3) << 1); }

/* An opaque zero: keeps the compiler from folding unused MMA operand registers
 * (which would force it to rebuild operand quads with moves in the loop). */
__device__ __forceinline__ uint32_t pf_opaque_zero() {
    uint32_t z;
    asm volatile("mov.b32 %0, 0;" : "=r"(z));
    return z;
}

/* c += A (16x8 tf32) * B (8x8 tf32); a/b hold float bit patterns. */
__device__ __forceinline__ void pf_mma_1688_tf32(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                 uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pf_to_tf32(float x) {
    uint32_t r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
}

/* The two 16-bit values of a word as exact floats (low half first). */
template <typename T>
__device__ __forceinline__ void pf_unpack2(uint32_t w, float &lo, float &hi);
template <>
__device__ __forceinline__ void pf_unpack2<__nv_bfloat16>(uint32_t w, float &lo, float &hi) {
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xffff0000u);
}
template <>
__device__ __forceinline__ void pf_unpack2<__half>(uint32_t w, float &lo, float &hi) {
    __half2 h = *reinterpret_cast<__half2 *>(&w);
    float2 f = __half22float2(h);
    lo = f.x;
    hi = f.y;
}

/*
 * The tensor-core kernel. kD: head dim (multiple of 32, <= 256); T: __half or
 * __nv_bfloat16; kRows: rows per tile (8 or 16); kNT: 8-token groups per warp
 * iteration (1 or 2).
 */
template <int kD, typename T, int kRows, int kNT, int kHeads, int kWarps, int kRing>
__global__ void __launch_bounds__(kWarps * 32, 8 / kWarps) pf_paged_attn_kernel(const pf_paged_args a) {
    static_assert((kWarps == 4 || kWarps == 8) && kWarps % kHeads == 0, "warps per CTA");
    constexpr int kPerHead = kWarps / kHeads; /* warps sharing one KV head (1: head mode) */
    static_assert(kRing == 0 || (kD % 64 == 0 && kD <= 128), "ring: head dim 64/128");
    static_assert(kD % 32 == 0 && kD <= 256, "head dim");
    static_assert(kRows == 8 || kRows == 16, "rows per tile");
    constexpr int kKS = kD / 16;             /* k-steps of S = Q K^T */
    constexpr int kKJ = kD / 32;             /* 16-byte K chunks per lane per token */
    constexpr int kVC = (kD + 63) / 64;      /* 16-byte V chunks per lane per token */
    constexpr int kMT = 4 * kVC;             /* m-tiles (16 dims each, permuted) of O^T */
    constexpr int kChunks = kD / 8;          /* 16-byte chunks per row */
    constexpr int kRT = kRows / 8;           /* 8-row n-tiles of O^T */
    constexpr int kTile = 8 * kNT;           /* tokens per warp iteration */
    constexpr int kRound = kTile * 4;         /* split alignment: 4 tiles */
    /* warp w = slice * kHeads + hl owns KV head kHeads * c + hl and takes every
     * kPerHead-th tile of the split from tile `slice` on. Head mode (kPerHead = 1): each
     * warp walks every tile (so the CTA reads kWarps heads' rows of each token together:
     * with 8 KV heads and 8 warps, whole contiguous token rows of every block); token
     * mode (kHeads = 1) and the mixed shapes: kPerHead warps share a head. */
    constexpr int kStep = kTile * kPerHead;
    /* tiles in flight per warp: 2 where the registers allow (one KV head per warp, 8 rows,
     * head dim <= 128), else 1 */
    constexpr int kDepth = kRing ? kRing - 1 : (kPerHead == 1 && kRows == 8 && kD <= 128) ? 2 : 1;
    /* K/V buffers: kDepth register sets, or kRing shared-memory slots per warp
     * (each slot a K tile then a V tile of kTile token rows, swizzled) */
    constexpr int kSlots = kRing ? kRing : kDepth;
    constexpr int kRowB = kD * (int)sizeof(T), kTileB = kTile * kRowB, kSlotB = 2 * kTileB;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, qd = lane & 3;

    /* ---- which (sequence, kv head, row tile, split) ---- */
    int bid = blockIdx.x;
    const int split = bid % a.num_splits;
    bid /= a.num_splits;
    const int kv_groups = (a.num_kv_heads + kHeads - 1) / kHeads;
    const int hl = kPerHead == 1 ? warp : warp % kHeads, slice = kPerHead == 1 ? 0 : warp / kHeads;
    const int kv0 = (bid % kv_groups) * kHeads; /* the CTA's first KV head */
    const int kvh = kv0 + hl;
    bid /= kv_groups;
    /* a warp past the last KV head: gone in head mode (no barrier follows), idle but
     * present for the merge's barriers otherwise */
    const bool idle = kvh >= a.num_kv_heads;
    if (kPerHead == 1 && idle) return;
    int b, rt;
    if (a.plan) {
        b = a.plan[2 * bid];
        rt = a.plan[2 * bid + 1];
        if (b < 0) return;
    } else {
        rt = bid % a.num_row_tiles;
        b = bid / a.num_row_tiles;
    }
    const pf_seq_info si = pf_seq_info_of(a, b);
    const int rows_total = si.q_len * a.group;
    const int r0 = rt * kRows;
    if (r0 >= rows_total) return; /* uniform over the CTA */
    const int rows_here = min(kRows, rows_total - r0);

    /* token range of the tile's rows: bounds are monotone in the query index */
    const pf::cuda::MaskRule mask = pf::cuda::mask_rule(a.causal, a.window_left, a.window_right, si.seq_len);
    int kv_lo, kv_hi;
    {
        const int i_first = r0 / a.group, i_last = (r0 + rows_here - 1) / a.group;
        kv_lo = max(mask.lo(si.seq_len - si.q_len + i_first), 0);
        kv_hi = max(mask.hi(si.seq_len - si.q_len + i_last) + 1, kv_lo);
    }
    int s_lo, s_hi;
    pf_split_range(kv_lo, kv_hi, split, a.num_splits, kRound, s_lo, s_hi);

    /* ---- this lane's S rows (g, g + 8): bounds, ALiBi slope, Q fragments ---- */
    int row_lo[2], row_hi[2], row_pos[2];
    float row_slope[2];
    uint32_t qa[kKS][4];
#pragma unroll
    for (int ks = 0; ks < kKS; ks++) {
        qa[ks][0] = qa[ks][2] = 0u;
        qa[ks][1] = pf_opaque_zero();
        qa[ks][3] = pf_opaque_zero();
    }
#pragma unroll
    for (int h2 = 0; h2 < 2; h2++) {
        row_lo[h2] = 1;
        row_hi[h2] = 0; /* empty */
        row_pos[h2] = 0;
        row_slope[h2] = 0.f;
        const int rl = g + 8 * h2;
        if (rl >= kRows || rl >= rows_here || idle) continue;
        const int r = r0 + rl;
        const int i = r / a.group, head = kvh * a.group + r % a.group;
        const int p = si.seq_len - si.q_len + i;
        row_lo[h2] = max(mask.lo(p), 0); /* clamped as the token range is (tokens are >= 0 anyway) */
        row_hi[h2] = mask.hi(p);
        row_pos[h2] = p;
        if (a.alibi) row_slope[h2] = a.alibi[(int64_t)b * a.al_sb + (int64_t)head * a.al_sh] * pf::cuda::kLog2e;
        const T *qp = reinterpret_cast<const T *>(a.q) + (int64_t)b * a.q_sb + (int64_t)(si.tok0 + i) * a.q_st +
                      (int64_t)head * a.q_sh;
#pragma unroll
        for (int j = 0; j < kKJ; j++) {
            uint4 w = *reinterpret_cast<const uint4 *>(qp + (qd + 4 * j) * 8);
            qa[2 * j][h2] = w.x;
            qa[2 * j][2 + h2] = w.y;
            qa[2 * j + 1][h2] = w.z;
            qa[2 * j + 1][2 + h2] = w.w;
        }
    }

    /* ---- per-warp online softmax state ---- */
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
    float oacc[kRT][kMT][4];
#pragma unroll
    for (int n = 0; n < kRT; n++)
#pragma unroll
        for (int i = 0; i < kMT; i++) oacc[n][i][0] = oacc[n][i][1] = oacc[n][i][2] = oacc[n][i][3] = 0.f;

    const char *kbase = reinterpret_cast<const char *>(a.k_cache) + (int64_t)kvh * a.k_sh * (int64_t)sizeof(T);
    const char *vbase = reinterpret_cast<const char *>(a.v_cache) + (int64_t)kvh * a.v_sh * (int64_t)sizeof(T);
    const int64_t k_sblk_b = a.k_sblk * (int64_t)sizeof(T), k_stok_b = a.k_stok * (int64_t)sizeof(T);
    const int64_t v_sblk_b = a.v_sblk * (int64_t)sizeof(T), v_stok_b = a.v_stok * (int64_t)sizeof(T);

    uint4 kbuf[kRing ? 1 : kDepth][kNT][kKJ];
    uint4 vbuf[kRing ? 1 : kDepth][kNT][2][kVC];
    bool vok[kRing ? 1 : kDepth][kNT][2]; /* token 2q + e of group nt exists (in range, good block) */
    uint32_t present[kSlots];             /* ring: bit u = token u of the slot's tile exists */
#pragma unroll
    for (int i = 0; i < kSlots; i++) present[i] = 0u;
    extern __shared__ __align__(128) unsigned char pf_paged_ring[];
    const uint32_t ring0 =
        kRing ? pf::cuda::smem_addr(pf_paged_ring) + warp * pf_ring_warp_bytes<kD, T, kNT, kRing>() : 0u;
    const char *const zero = reinterpret_cast<const char *>(pf_paged_zeros);

    /* block id of token (t0 + lane % kTile) (the table load), -1 when none */
    auto fetch_id = [&](int t0) -> int {
        const int t = t0 + (lane % kTile);
        if (t >= s_hi) return -1;
        return pf_block_of(a, b, t);
    };
    /* that token's K and V row pointers; a missing token reads the zero row */
    auto make_ptrs = [&](int t0, int id, const char *&kp, const char *&vp) {
        kp = vp = zero;
        if (id >= 0) {
            const int64_t off = pf_offset_in_block(a, t0 + (lane % kTile));
            kp = kbase + (int64_t)id * k_sblk_b + off * k_stok_b;
            vp = vbase + (int64_t)id * v_sblk_b + off * v_stok_b;
        }
    };
    auto shfl_ptr = [&](const char *p, int src) -> const char * {
        const uint64_t u = reinterpret_cast<uint64_t>(p);
        const uint32_t lo = __shfl_sync(0xffffffffu, (uint32_t)u, src);
        const uint32_t hi = __shfl_sync(0xffffffffu, (uint32_t)(u >> 32), src);
        return reinterpret_cast<const char *>(((uint64_t)hi << 32) | lo);
    };
    auto issue_k = [&](uint4(&kb)[kNT][kKJ], const char *kp_l) {
#pragma unroll
        for (int nt = 0; nt < kNT; nt++) {
            const char *p = shfl_ptr(kp_l, nt * 8 + g);
#pragma unroll
            for (int j = 0; j < kKJ; j++) kb[nt][j] = pf_ldg16(p + (qd + 4 * j) * 16);
        }
    };
    auto issue_v = [&](uint4(&vb)[kNT][2][kVC], bool (&ok)[kNT][2], const char *vp_l) {
#pragma unroll
        for (int nt = 0; nt < kNT; nt++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const char *p = shfl_ptr(vp_l, nt * 8 + 2 * qd + e);
                ok[nt][e] = p != zero;
#pragma unroll
                for (int c = 0; c < kVC; c++) {
                    if (kD % 64 == 0 || g + 8 * c < kChunks)
                        vb[nt][e][c] = pf_ldg16(p + (g + 8 * c) * 16);
                    else
                        vb[nt][e][c] = make_uint4(0u, 0u, 0u, 0u);
                }
            }
    };

    /* ring: the tile's K and V rows into `slot`, whole 128-byte lines per 8 lanes
     * (lane copies chunk lane % 8 + 8h of token lane / 8 + 4i); returns the present mask */
    auto issue_ring = [&](int slot, const char *kp_l, const char *vp_l) -> uint32_t {
        const uint32_t dst = ring0 + slot * kSlotB;
#pragma unroll
        for (int i = 0; i < kTile / 4; i++) {
            const int u = (lane >> 3) + 4 * i;
            const char *kp = shfl_ptr(kp_l, u);
            const char *vp = shfl_ptr(vp_l, u);
#pragma unroll
            for (int h = 0; h < kD / 64; h++) {
                const int c = (lane & 7) + 8 * h;
                const uint32_t off = u * kRowB + ((c ^ pf_ring_swz(u)) << 4);
                pf::cuda::cp_async_16(dst + off, kp + c * 16, true);
                pf::cuda::cp_async_16(dst + kTileB + off, vp + c * 16, true);
            }
        }
        return __ballot_sync(0xffffffffu, kp_l != zero);
    };

    int t_cur = s_lo + slice * kTile;
    if (t_cur < s_hi && !idle) {
        /* prologue: tiles 0 .. kDepth-1 in flight; pointers of tile kDepth, id of kDepth+1 */
        const char *kp_n, *vp_n;
        int id_n = fetch_id(t_cur);
#pragma unroll
        for (int d = 0; d < kDepth; d++) {
            make_ptrs(t_cur + d * kStep, id_n, kp_n, vp_n);
            id_n = fetch_id(t_cur + (d + 1) * kStep);
            if constexpr (kRing != 0) {
                if (t_cur + d * kStep < s_hi) present[d] = issue_ring(d, kp_n, vp_n);
                pf::cuda::cp_async_commit();
            } else {
                issue_k(kbuf[d], kp_n);
                issue_v(vbuf[d], vok[d], vp_n);
            }
        }
        make_ptrs(t_cur + kDepth * kStep, id_n, kp_n, vp_n);
        id_n = fetch_id(t_cur + (kDepth + 1) * kStep);
        bool more = true;
        while (more) {
#pragma unroll
            for (int par = 0; par < kSlots; par++) {
                if (t_cur >= s_hi) {
                    more = false;
                    break;
                }
                const int t_next = t_cur + kDepth * kStep; /* the tile that refills this buffer */
                const int kb = kRing ? 0 : par;           /* register set (register pipeline) */

                if constexpr (kRing != 0) {
                    /* this tile's copies have landed (kDepth - 1 younger groups may be pending);
                     * refill the slot the previous tile used, then fetch the fragments */
                    pf::cuda::cp_async_wait<kDepth - 1>();
                    __syncwarp();
                    const int refill = (par + kDepth) % kSlots;
                    if (t_next < s_hi) present[refill] = issue_ring(refill, kp_n, vp_n);
                    pf::cuda::cp_async_commit();
                    make_ptrs(t_next + kStep, id_n, kp_n, vp_n);
                    id_n = fetch_id(t_next + 2 * kStep);
                    const uint32_t src = ring0 + par * kSlotB;
#pragma unroll
                    for (int nt = 0; nt < kNT; nt++) {
#pragma unroll
                        for (int j = 0; j < kKJ; j++)
                            kbuf[0][nt][j] =
                                pf_lds16(src + (nt * 8 + g) * kRowB + (((qd + 4 * j) ^ pf_ring_swz(g)) << 4));
#pragma unroll
                        for (int e = 0; e < 2; e++) {
                            const int u = 2 * qd + e;
                            vok[0][nt][e] = (present[par] >> (nt * 8 + u)) & 1u;
#pragma unroll
                            for (int c = 0; c < kVC; c++)
                                vbuf[0][nt][e][c] = pf_lds16(src + kTileB + (nt * 8 + u) * kRowB +
                                                             (((g + 8 * c) ^ pf_ring_swz(u)) << 4));
                        }
                    }
                }

                /* S = Q K^T */
                float s[kNT][4];
#pragma unroll
                for (int nt = 0; nt < kNT; nt++) {
                    s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
                    for (int j = 0; j < kKJ; j++) {
                        pf::cuda::TypeOps<T>::mma(s[nt], qa[2 * j], kbuf[kb][nt][j].x, kbuf[kb][nt][j].y);
                        pf::cuda::TypeOps<T>::mma(s[nt], qa[2 * j + 1], kbuf[kb][nt][j].z, kbuf[kb][nt][j].w);
                    }
                }
                if (!kRing && t_next < s_hi) issue_k(kbuf[kb], kp_n);

                /* scale, softcap, ALiBi, mask; row maxima */
                float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
                for (int nt = 0; nt < kNT; nt++)
#pragma unroll
                    for (int c = 0; c < 4; c++) {
                        const int h2 = c >> 1, e = c & 1;
                        const int t = t_cur + nt * 8 + 2 * qd + e;
                        float x = s[nt][c];
                        x = a.cap_log2 != 0.f ? a.cap_log2 * pf::cuda::tanh_abs_accurate(x * a.qk_scale)
                                              : x * a.qk_scale;
                        if (a.alibi) x -= row_slope[h2] * (float)abs(row_pos[h2] - t);
                        const bool ok = vok[kb][nt][e] && t >= row_lo[h2] && t <= row_hi[h2];
                        x = ok ? x : -INFINITY;
                        s[nt][c] = x;
                        mx[h2] = fmaxf(mx[h2], x);
                    }
                float alpha[2], m_use[2];
#pragma unroll
                for (int h2 = 0; h2 < 2; h2++) {
                    mx[h2] = fmaxf(mx[h2], __shfl_xor_sync(0xffffffffu, mx[h2], 1));
                    mx[h2] = fmaxf(mx[h2], __shfl_xor_sync(0xffffffffu, mx[h2], 2));
                    const float m_new = fmaxf(m_run[h2], mx[h2]);
                    m_use[h2] = m_new == -INFINITY ? 0.f : m_new;
                    alpha[h2] = exp2f(m_run[h2] - m_use[h2]);
                    m_run[h2] = m_new;
                }
                uint32_t pb[kNT][4];
                float lsum[2] = {0.f, 0.f};
#pragma unroll
                for (int nt = 0; nt < kNT; nt++)
#pragma unroll
                    for (int c = 0; c < 4; c++) {
                        const float pv = exp2f(s[nt][c] - m_use[c >> 1]);
                        lsum[c >> 1] += pv;
                        pb[nt][c] = pf_to_tf32(pv);
                    }
                l_run[0] = l_run[0] * alpha[0] + lsum[0];
                l_run[1] = l_run[1] * alpha[1] + lsum[1];

                /* rescale O^T rows (2q, 2q+1 of each 8-row n-tile) when a maximum moved */
                if (__any_sync(0xffffffffu, alpha[0] != 1.f || (kRT > 1 && alpha[1] != 1.f))) {
#pragma unroll
                    for (int n = 0; n < kRT; n++) {
                        const float a0 = __shfl_sync(0xffffffffu, alpha[n], 8 * qd);
                        const float a1 = __shfl_sync(0xffffffffu, alpha[n], 8 * qd + 4);
#pragma unroll
                        for (int i = 0; i < kMT; i++) {
                            oacc[n][i][0] *= a0;
                            oacc[n][i][1] *= a1;
                            oacc[n][i][2] *= a0;
                            oacc[n][i][3] *= a1;
                        }
                    }
                }

                /* O^T += V^T P^T */
#pragma unroll
                for (int nt = 0; nt < kNT; nt++)
#pragma unroll
                    for (int i = 0; i < kMT; i++) {
                        const int c = i >> 2, w = i & 3;
                        const uint32_t w0 = (&vbuf[kb][nt][0][c].x)[w], w1 = (&vbuf[kb][nt][1][c].x)[w];
                        float x00, x01, x10, x11;
                        pf_unpack2<T>(w0, x00, x01); /* token 2q:   elements 2i, 2i+1 */
                        pf_unpack2<T>(w1, x10, x11); /* token 2q+1 */
#pragma unroll
                        for (int n = 0; n < kRT; n++)
                            pf_mma_1688_tf32(oacc[n][i], __float_as_uint(x00), __float_as_uint(x01),
                                             __float_as_uint(x10), __float_as_uint(x11), pb[nt][2 * n],
                                             pb[nt][2 * n + 1]);
                    }
                if constexpr (kRing == 0) {
                    if (t_next < s_hi) issue_v(vbuf[kb], vok[kb], vp_n);
                    make_ptrs(t_next + kStep, id_n, kp_n, vp_n);
                    id_n = fetch_id(t_next + 2 * kStep);
                }
                t_cur += kStep;
            }
        }
    }
    if constexpr (kRing != 0) pf::cuda::cp_async_wait<0>(); /* only empty groups can be left */

#pragma unroll
    for (int h2 = 0; h2 < 2; h2++) {
        l_run[h2] += __shfl_xor_sync(0xffffffffu, l_run[h2], 1);
        l_run[h2] += __shfl_xor_sync(0xffffffffu, l_run[h2], 2);
    }
    const bool partial = a.num_splits > 1;

    if constexpr (kPerHead == 1) {
        /* this warp holds whole rows: normalize and write straight from registers */
#pragma unroll
        for (int n = 0; n < kRT; n++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int rr = n * 8 + 2 * qd + e;
                const float L = __shfl_sync(0xffffffffu, l_run[n], (2 * qd + e) * 4);
                const float M = __shfl_sync(0xffffffffu, m_run[n], (2 * qd + e) * 4);
                if (rr >= rows_here) continue;
                const int r = r0 + rr;
                const int i = r / a.group, head = kvh * a.group + r % a.group;
                const int qidx = si.qidx0 + i;
                const float inv = L > 0.f ? 1.f / L : 0.f;
                const float lse = L > 0.f ? (M + __log2f(L)) * pf::cuda::kLn2 : -INFINITY;
#pragma unroll
                for (int c = 0; c < kVC; c++) {
                    const int ch = g + 8 * c;
                    if (kD % 64 != 0 && ch >= kChunks) continue;
                    float v[8];
#pragma unroll
                    for (int w = 0; w < 4; w++) {
                        v[2 * w] = oacc[n][4 * c + w][e] * inv;
                        v[2 * w + 1] = oacc[n][4 * c + w][2 + e] * inv;
                    }
                    if (partial) {
                        float *dst =
                            a.o_part + (((int64_t)split * a.total_q + qidx) * a.num_heads + head) * a.head_dim + ch * 8;
                        reinterpret_cast<float4 *>(dst)[0] = make_float4(v[0], v[1], v[2], v[3]);
                        reinterpret_cast<float4 *>(dst)[1] = make_float4(v[4], v[5], v[6], v[7]);
                    } else {
                        T *dst = reinterpret_cast<T *>(a.out) + (int64_t)b * a.o_sb + (int64_t)(si.tok0 + i) * a.o_st +
                                 (int64_t)head * a.o_sh + ch * 8;
                        uint4 pk;
                        pk.x = pf::cuda::TypeOps<T>::pack(v[0], v[1]);
                        pk.y = pf::cuda::TypeOps<T>::pack(v[2], v[3]);
                        pk.z = pf::cuda::TypeOps<T>::pack(v[4], v[5]);
                        pk.w = pf::cuda::TypeOps<T>::pack(v[6], v[7]);
                        *reinterpret_cast<uint4 *>(dst) = pk;
                    }
                }
                if (g == 0) {
                    if (partial)
                        a.lse_part[((int64_t)split * a.total_q + qidx) * a.num_heads + head] = lse;
                    else if (a.lse)
                        a.lse[(int64_t)head * a.lse_sh + (int64_t)qidx * a.lse_st] = lse;
                }
            }
        return;
    }

    /* ---- kPerHead warps per head: merge them through shared memory, then write ---- */
    /* the ring (drained, every warp past its last fragment read) holds the merge */
    constexpr int kAccStride = kD + 4;
    float *const sm_m = reinterpret_cast<float *>(pf_paged_ring); /* [kWarps][kRows] */
    float *const sm_l = sm_m + kWarps * kRows;                    /* [kWarps][kRows] */
    float *const sm_M = sm_l + kWarps * kRows;                    /* [kHeads][kRows] */
    float *const sm_L = sm_M + kHeads * kRows;                    /* [kHeads][kRows] */
    float *const sm_acc = sm_L + kHeads * kRows;                  /* [kHeads][kRows][kAccStride] */
    if constexpr (kRing != 0) __syncthreads();

    if (qd == 0) {
        sm_m[warp * kRows + g] = m_run[0];
        sm_l[warp * kRows + g] = l_run[0];
        if (kRows == 16) {
            sm_m[warp * kRows + g + 8] = m_run[1];
            sm_l[warp * kRows + g + 8] = l_run[1];
        }
    }
    __syncthreads();
    if (threadIdx.x < kHeads * kRows) {
        const int h = threadIdx.x / kRows, r = threadIdx.x % kRows;
        float M = -INFINITY;
#pragma unroll
        for (int w = h; w < kWarps; w += kHeads) M = fmaxf(M, sm_m[w * kRows + r]);
        float L = 0.f;
#pragma unroll
        for (int w = h; w < kWarps; w += kHeads)
            if (sm_m[w * kRows + r] != -INFINITY) L += sm_l[w * kRows + r] * exp2f(sm_m[w * kRows + r] - M);
        sm_M[threadIdx.x] = M;
        sm_L[threadIdx.x] = L;
    }
    __syncthreads();
    float *const acc = sm_acc + hl * kRows * kAccStride;
#pragma unroll
    for (int sl = 0; sl < kPerHead; sl++) {
        if (slice == sl) {
#pragma unroll
            for (int n = 0; n < kRT; n++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int rr = n * 8 + 2 * qd + e;
                    const float mw = sm_m[warp * kRows + rr];
                    const float sc = mw == -INFINITY ? 0.f : exp2f(mw - sm_M[hl * kRows + rr]);
#pragma unroll
                    for (int i = 0; i < kMT; i++) {
                        const int c = i >> 2;
                        const int ch = g + 8 * c;
                        if (kD % 64 != 0 && ch >= kChunks) continue;
                        const int d0 = ch * 8 + 2 * (i & 3);
                        float v0 = oacc[n][i][e] * sc, v1 = oacc[n][i][2 + e] * sc;
                        if (sl == 0) {
                            acc[rr * kAccStride + d0] = v0;
                            acc[rr * kAccStride + d0 + 1] = v1;
                        } else {
                            acc[rr * kAccStride + d0] += v0;
                            acc[rr * kAccStride + d0 + 1] += v1;
                        }
                    }
                }
        }
        __syncthreads();
    }

    /* (head, row, 16-byte chunk) triples, spread over the CTA */
    for (int idx = threadIdx.x; idx < kHeads * rows_here * kChunks; idx += kWarps * 32) {
        const int h = idx / (rows_here * kChunks), rem = idx % (rows_here * kChunks);
        const int rr = rem / kChunks, ch = rem % kChunks;
        if (kv0 + h >= a.num_kv_heads) break; /* later heads are past the end too */
        const int r = r0 + rr;
        const int i = r / a.group, head = (kv0 + h) * a.group + r % a.group;
        const float L = sm_L[h * kRows + rr], M = sm_M[h * kRows + rr];
        const float inv = L > 0.f ? 1.f / L : 0.f;
        const float *src = &sm_acc[(h * kRows + rr) * kAccStride + ch * 8];
        float v[8];
#pragma unroll
        for (int k = 0; k < 8; k++) v[k] = src[k] * inv;
        const int qidx = si.qidx0 + i;
        const float lse = L > 0.f ? (M + __log2f(L)) * pf::cuda::kLn2 : -INFINITY;
        if (partial) {
            float *dst = a.o_part + (((int64_t)split * a.total_q + qidx) * a.num_heads + head) * a.head_dim + ch * 8;
            reinterpret_cast<float4 *>(dst)[0] = make_float4(v[0], v[1], v[2], v[3]);
            reinterpret_cast<float4 *>(dst)[1] = make_float4(v[4], v[5], v[6], v[7]);
            if (ch == 0) a.lse_part[((int64_t)split * a.total_q + qidx) * a.num_heads + head] = lse;
        } else {
            T *dst = reinterpret_cast<T *>(a.out) + (int64_t)b * a.o_sb + (int64_t)(si.tok0 + i) * a.o_st +
                     (int64_t)head * a.o_sh + ch * 8;
            uint4 pk;
            pk.x = pf::cuda::TypeOps<T>::pack(v[0], v[1]);
            pk.y = pf::cuda::TypeOps<T>::pack(v[2], v[3]);
            pk.z = pf::cuda::TypeOps<T>::pack(v[4], v[5]);
            pk.w = pf::cuda::TypeOps<T>::pack(v[6], v[7]);
            *reinterpret_cast<uint4 *>(dst) = pk;
            if (ch == 0 && a.lse) a.lse[(int64_t)head * a.lse_sh + (int64_t)qidx * a.lse_st] = lse;
        }
    }
}

/* Dynamic shared memory of a CTA: the warps' rings, or the merge of kPerHead > 1 warps
 * per head (which reuses the rings), whichever is larger. */
template <int kD, typename T, int kRows, int kNT, int kHeads, int kWarps, int kRing>
constexpr int pf_paged_smem_bytes() {
    constexpr int ring = kWarps * pf_ring_warp_bytes<kD, T, kNT, kRing>();
    constexpr int merge =
        kHeads == kWarps ? 0
                         : (int)sizeof(float) * (2 * kWarps * kRows + 2 * kHeads * kRows + kHeads * kRows * (kD + 4));
    return ring > merge ? ring : merge;
}

#endif /* PF_PAGED_KERNEL_CUH */
