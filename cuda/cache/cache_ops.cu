/*
 * cache/cache_ops.cu - the KV-cache operations on CUDA (layouts in pagedflash.h):
 *
 * pf_cuda_write_kv_cache  k, v [num_tokens, num_kv_heads, head_dim] into
 *     k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim] at
 *     slot_mapping[t] (int64, device-resident). One warp per (token, head) row,
 *     16-byte vectors when every pointer and stride allows, else element by
 *     element. A negative slot is skipped; a slot >= num_blocks * block_size
 *     (possible only with a device-resident mapping, which the host cannot
 *     check) is skipped too: nothing outside the caches is ever written.
 *
 * pf_cuda_copy_blocks  every cache of every layer in one launch: blockIdx.y
 *     picks the cache, each thread owns one 16-byte (or smaller) unit of a
 *     block and walks the (src, dst) pairs in order, so a later pair sees what
 *     an earlier one wrote (the semantics of the CPU backend) without any
 *     global synchronization. A host block_mapping travels in the kernel's
 *     parameters (PF_COPY_PAIRS pairs per launch, launches in order); a
 *     device-resident one is read by the kernel, and a pair with an id outside
 *     a cache is skipped for that cache. A block (slice along dimension 0) must
 *     be contiguous or rows of a contiguous run with one row stride.
 *
 * pf_cuda_swap_blocks  cudaMemcpyAsync (cudaMemcpyDefault) per run of
 *     consecutive (src, dst) pairs, on the stream, between any of device
 *     memory, page-locked host memory (asynchronous) and pageable host memory
 *     (accepted, but the CUDA runtime stages such copies, so the call returns
 *     only once the host side has been read or written: pin host caches).
 */
#include <stdio.h>

#include "common/cuda_util.cuh"

/* ------------------------------------------------------------------------ */
/* write_kv_cache                                                             */
/* ------------------------------------------------------------------------ */

struct pf_write_args {
    const char *k, *v;
    char *kc, *vc;
    const int64_t *slots;
    int64_t slot_s;
    int64_t k_st, k_sh, v_st, v_sh;             /* bytes */
    int64_t kc_sb, kc_so, kc_sh, vc_sb, vc_so, vc_sh; /* bytes */
    int64_t num_tokens, num_slots;
    int num_kv_heads, block_size, row_bytes;
};

template <typename U>
__global__ void __launch_bounds__(128) pf_write_kv_kernel(const pf_write_args w) {
    const int lane = threadIdx.x & 31;
    const int64_t row = (int64_t)blockIdx.x * 4 + (threadIdx.x >> 5);
    if (row >= w.num_tokens * w.num_kv_heads) return;
    const int64_t t = row / w.num_kv_heads;
    const int h = (int)(row % w.num_kv_heads);
    const int64_t slot = w.slots[t * w.slot_s];
    if (slot < 0 || slot >= w.num_slots) return;
    const int64_t blk = slot / w.block_size, off = slot % w.block_size;
    const U *ks = reinterpret_cast<const U *>(w.k + t * w.k_st + h * w.k_sh);
    const U *vs = reinterpret_cast<const U *>(w.v + t * w.v_st + h * w.v_sh);
    U *kd = reinterpret_cast<U *>(w.kc + blk * w.kc_sb + off * w.kc_so + h * w.kc_sh);
    U *vd = reinterpret_cast<U *>(w.vc + blk * w.vc_sb + off * w.vc_so + h * w.vc_sh);
    const int units = w.row_bytes / (int)sizeof(U);
    for (int u = lane; u < units; u += 32) {
        kd[u] = ks[u];
        vd[u] = vs[u];
    }
}

/* The widest unit (16, 8, 4, 2 or 1 bytes) dividing every value. */
static int pf_unit_of(const int64_t *vals, int n) {
    int unit = 16;
    for (int i = 0; i < n; i++)
        while (unit > 1 && (vals[i] % unit) != 0) unit >>= 1;
    return unit;
}

extern "C" pf_status pf_cuda_write_kv_cache(pf_tensor k, pf_tensor v, pf_tensor k_cache, pf_tensor v_cache,
                                            pf_tensor slot_mapping, pf_tensor k_scale, pf_tensor v_scale,
                                            void *stream) {
    /* float caches only: compressed ones (which have scales) are refused by the core for this
     * backend (limits.kv_quant = 0), so the scales are absent here */
    (void)k_scale;
    (void)v_scale;
    pf_cuda_device_guard guard;
    PF_TRY(guard.set(k_cache.device_id));
    const int64_t es = (int64_t)pf_dtype_size(k_cache.dtype);
    pf_write_args w;
    memset(&w, 0, sizeof w);
    w.k = (const char *)k.data;
    w.v = (const char *)v.data;
    w.kc = (char *)k_cache.data;
    w.vc = (char *)v_cache.data;
    w.slots = (const int64_t *)slot_mapping.data;
    w.slot_s = slot_mapping.strides[0];
    w.k_st = k.strides[0] * es;
    w.k_sh = k.strides[1] * es;
    w.v_st = v.strides[0] * es;
    w.v_sh = v.strides[1] * es;
    w.kc_sb = k_cache.strides[0] * es;
    w.kc_so = k_cache.strides[1] * es;
    w.kc_sh = k_cache.strides[2] * es;
    w.vc_sb = v_cache.strides[0] * es;
    w.vc_so = v_cache.strides[1] * es;
    w.vc_sh = v_cache.strides[2] * es;
    w.num_tokens = k.shape[0];
    w.num_kv_heads = (int)k_cache.shape[2];
    w.block_size = (int)k_cache.shape[1];
    w.num_slots = k_cache.shape[0] * k_cache.shape[1];
    w.row_bytes = (int)(k_cache.shape[3] * es);
    const int64_t rows = w.num_tokens * w.num_kv_heads;
    if (rows == 0 || w.row_bytes == 0) return PF_STATUS_OK;
    const int64_t vals[] = {(int64_t)(uintptr_t)w.k,
                            (int64_t)(uintptr_t)w.v,
                            (int64_t)(uintptr_t)w.kc,
                            (int64_t)(uintptr_t)w.vc,
                            w.k_st,
                            w.k_sh,
                            w.v_st,
                            w.v_sh,
                            w.kc_sb,
                            w.kc_so,
                            w.kc_sh,
                            w.vc_sb,
                            w.vc_so,
                            w.vc_sh,
                            (int64_t)w.row_bytes};
    const int unit = pf_unit_of(vals, (int)(sizeof vals / sizeof vals[0]));
    const int64_t blocks = (rows + 3) / 4;
    /* blocks < 2^31: rows <= limits.max_rows, checked by the core */
    cudaStream_t s = (cudaStream_t)stream;
    switch (unit) {
        case 16: pf_write_kv_kernel<uint4><<<(unsigned)blocks, 128, 0, s>>>(w); break;
        case 8: pf_write_kv_kernel<uint2><<<(unsigned)blocks, 128, 0, s>>>(w); break;
        case 4: pf_write_kv_kernel<uint32_t><<<(unsigned)blocks, 128, 0, s>>>(w); break;
        case 2: pf_write_kv_kernel<uint16_t><<<(unsigned)blocks, 128, 0, s>>>(w); break;
        default: pf_write_kv_kernel<uint8_t><<<(unsigned)blocks, 128, 0, s>>>(w); break;
    }
    PF_CUDA_CHECK_LAUNCH();
    return PF_STATUS_OK;
}

/* ------------------------------------------------------------------------ */
/* Block geometry shared by copy_blocks and swap_blocks                       */
/* ------------------------------------------------------------------------ */

/* A block (slice along dimension 0) as `rows` runs of `row_bytes` contiguous
 * bytes, `row_stride` bytes apart. Fails for other shapes. */
struct pf_block_geom {
    int64_t block_stride; /* bytes between blocks */
    int64_t rows, row_bytes, row_stride;
};

static pf_status pf_block_geom_of(const pf_tensor &t, const char *name, pf_block_geom *g) {
    const int64_t es = (int64_t)pf_dtype_size(t.dtype);
    g->block_stride = t.strides[0] * es;
    /* collapse dims 1.. from the innermost outwards into at most two levels */
    int64_t run = es, run_elems_stride = 1; /* innermost contiguous run */
    int64_t rows = 1, row_stride = 0;
    int d = t.ndim - 1;
    int64_t expect = 1;
    for (; d >= 1; d--) {
        if (t.shape[d] == 1) continue;
        if (t.strides[d] != expect) break;
        expect *= t.shape[d];
    }
    run = expect * es;
    (void)run_elems_stride;
    /* remaining dims d..1 must form one more level with a uniform stride */
    int64_t outer_expect = -1;
    for (; d >= 1; d--) {
        if (t.shape[d] == 1) continue;
        if (outer_expect < 0) {
            rows = t.shape[d];
            row_stride = t.strides[d] * es;
            outer_expect = t.strides[d] * t.shape[d];
            continue;
        }
        PF_CHECK(t.strides[d] == outer_expect, PF_STATUS_NOT_SUPPORTED,
                 "%s: a block (a slice along dimension 0) must be contiguous or rows of a contiguous run with "
                 "one row stride on CUDA; dimension %d has stride %lld",
                 name, d, (long long)t.strides[d]);
        rows *= t.shape[d];
        outer_expect *= t.shape[d];
    }
    if (outer_expect < 0) row_stride = run;
    g->rows = rows;
    g->row_bytes = run;
    g->row_stride = row_stride;
    for (int i = 1; i < t.ndim; i++)
        if (t.shape[i] == 0) g->rows = 0;
    return PF_STATUS_OK;
}

/* ------------------------------------------------------------------------ */
/* copy_blocks                                                                */
/* ------------------------------------------------------------------------ */

#define PF_COPY_CACHES 48
#define PF_COPY_PAIRS 96

struct pf_copy_cache {
    char *data;
    int64_t block_stride, row_stride;
    int32_t rows, row_units, num_blocks, pad;
};

struct pf_copy_args {
    pf_copy_cache c[PF_COPY_CACHES];
    int64_t pairs[PF_COPY_PAIRS][2];       /* host mapping, this launch's chunk */
    const int64_t *dev_pairs;              /* device mapping, or NULL */
    int64_t dev_s0, dev_s1;
    int64_t num_pairs;
};

template <typename U>
__global__ void __launch_bounds__(256) pf_copy_blocks_kernel(const __grid_constant__ pf_copy_args a) {
    const pf_copy_cache &c = a.c[blockIdx.y];
    const int64_t units = (int64_t)c.rows * c.row_units;
    const int64_t u = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (u >= units) return;
    const int64_t row = u / c.row_units, col = u % c.row_units;
    const int64_t off = row * c.row_stride + col * (int64_t)sizeof(U);
    for (int64_t i = 0; i < a.num_pairs; i++) {
        int64_t src, dst;
        if (a.dev_pairs) {
            src = a.dev_pairs[i * a.dev_s0];
            dst = a.dev_pairs[i * a.dev_s0 + a.dev_s1];
            if (src < 0 || src >= c.num_blocks || dst < 0 || dst >= c.num_blocks) continue;
        } else {
            src = a.pairs[i][0];
            dst = a.pairs[i][1];
        }
        const U val = *reinterpret_cast<const U *>(c.data + src * c.block_stride + off);
        *reinterpret_cast<U *>(c.data + dst * c.block_stride + off) = val;
    }
}

template <typename U>
static pf_status pf_copy_launch(const pf_copy_args &a, int ncaches, int64_t max_units, cudaStream_t s) {
    const int64_t bx = (max_units + 255) / 256;
    if (bx == 0 || ncaches == 0) return PF_STATUS_OK;
    dim3 grid((unsigned)bx, (unsigned)ncaches);
    pf_copy_blocks_kernel<U><<<grid, 256, 0, s>>>(a);
    PF_CUDA_CHECK_LAUNCH();
    return PF_STATUS_OK;
}

extern "C" pf_status pf_cuda_copy_blocks(const pf_tensor *caches, int32_t num_caches, pf_tensor block_mapping,
                                         void *stream) {
    if (num_caches == 0 || block_mapping.shape[0] == 0) return PF_STATUS_OK;
    pf_cuda_device_guard guard;
    PF_TRY(guard.set(caches[0].device_id));
    cudaStream_t s = (cudaStream_t)stream;
    const bool dev_map = block_mapping.device == PF_DEVICE_CUDA;
    const int64_t n = block_mapping.shape[0];
    const int64_t *hm = (const int64_t *)block_mapping.data;

    /* geometry of every cache first (a failed call writes nothing) */
    static_assert(sizeof(pf_copy_args) < 4000, "kernel parameters must stay under 4 KB");
    for (int32_t c = 0; c < num_caches; c++) {
        pf_block_geom g;
        char name[32];
        snprintf(name, sizeof name, "caches[%d]", (int)c);
        PF_TRY(pf_block_geom_of(caches[c], name, &g));
        PF_CHECK(g.rows < INT32_MAX && g.row_bytes / 1 < INT32_MAX, PF_STATUS_NOT_SUPPORTED,
                 "%s: blocks too large for the CUDA copy kernel", name);
    }
    for (int32_t c0 = 0; c0 < num_caches; c0 += PF_COPY_CACHES) {
        const int nc = num_caches - c0 < PF_COPY_CACHES ? num_caches - c0 : PF_COPY_CACHES;
        pf_copy_args a;
        memset(&a, 0, sizeof a);
        int64_t vals[4 * PF_COPY_CACHES];
        int nv = 0;
        pf_block_geom geo[PF_COPY_CACHES];
        for (int i = 0; i < nc; i++) {
            const pf_tensor &t = caches[c0 + i];
            pf_block_geom_of(t, "caches", &geo[i]);
            vals[nv++] = (int64_t)(uintptr_t)t.data;
            vals[nv++] = geo[i].block_stride;
            vals[nv++] = geo[i].row_stride;
            vals[nv++] = geo[i].row_bytes;
        }
        const int unit = pf_unit_of(vals, nv);
        int64_t max_units = 0;
        for (int i = 0; i < nc; i++) {
            const pf_tensor &t = caches[c0 + i];
            a.c[i].data = (char *)t.data;
            a.c[i].block_stride = geo[i].block_stride;
            a.c[i].row_stride = geo[i].row_stride;
            a.c[i].rows = (int32_t)geo[i].rows;
            a.c[i].row_units = (int32_t)(geo[i].row_bytes / unit);
            a.c[i].num_blocks = (int32_t)(t.shape[0] < INT32_MAX ? t.shape[0] : INT32_MAX);
            const int64_t units = geo[i].rows * (geo[i].row_bytes / unit);
            if (units > max_units) max_units = units;
        }
        const int64_t chunk = dev_map ? n : PF_COPY_PAIRS;
        for (int64_t p0 = 0; p0 < n; p0 += chunk) {
            const int64_t np = n - p0 < chunk ? n - p0 : chunk;
            a.num_pairs = np;
            if (dev_map) {
                a.dev_pairs = hm;
                a.dev_s0 = block_mapping.strides[0];
                a.dev_s1 = block_mapping.strides[1];
            } else {
                for (int64_t i = 0; i < np; i++) {
                    a.pairs[i][0] = hm[(p0 + i) * block_mapping.strides[0]];
                    a.pairs[i][1] = hm[(p0 + i) * block_mapping.strides[0] + block_mapping.strides[1]];
                }
            }
            switch (unit) {
                case 16: PF_TRY(pf_copy_launch<uint4>(a, nc, max_units, s)); break;
                case 8: PF_TRY(pf_copy_launch<uint2>(a, nc, max_units, s)); break;
                case 4: PF_TRY(pf_copy_launch<uint32_t>(a, nc, max_units, s)); break;
                case 2: PF_TRY(pf_copy_launch<uint16_t>(a, nc, max_units, s)); break;
                default: PF_TRY(pf_copy_launch<uint8_t>(a, nc, max_units, s)); break;
            }
        }
    }
    return PF_STATUS_OK;
}

/* ------------------------------------------------------------------------ */
/* swap_blocks                                                                */
/* ------------------------------------------------------------------------ */

extern "C" pf_status pf_cuda_swap_blocks(pf_tensor src, pf_tensor dst, pf_tensor block_mapping, void *stream) {
    const int64_t n = block_mapping.shape[0];
    if (n == 0) return PF_STATUS_OK;
    pf_block_geom gs, gd;
    PF_TRY(pf_block_geom_of(src, "src", &gs));
    PF_TRY(pf_block_geom_of(dst, "dst", &gd));
    if (gs.rows == 0 || gs.row_bytes == 0) return PF_STATUS_OK;
    pf_cuda_device_guard guard;
    PF_TRY(guard.set(dst.device == PF_DEVICE_CUDA ? dst.device_id : src.device_id));
    cudaStream_t s = (cudaStream_t)stream;
    const int64_t *m = (const int64_t *)block_mapping.data;
    const int64_t s0 = block_mapping.strides[0], s1 = block_mapping.strides[1];
    /* a block is one contiguous span when it has a single row (or rows packed back to back) */
    const bool flat_s = gs.rows == 1 || gs.row_stride == gs.row_bytes;
    const bool flat_d = gd.rows == 1 || gd.row_stride == gd.row_bytes;
    const int64_t block_bytes = gs.rows * gs.row_bytes;
    /* one row geometry for both sides: a flat side takes the other's rows */
    if (flat_s && !flat_d) {
        gs.rows = gd.rows;
        gs.row_bytes = gd.row_bytes;
        gs.row_stride = gd.row_bytes;
    } else if (flat_d && !flat_s) {
        gd.rows = gs.rows;
        gd.row_bytes = gs.row_bytes;
        gd.row_stride = gs.row_bytes;
    }
    PF_CHECK(gs.rows == gd.rows && gs.row_bytes == gd.row_bytes, PF_STATUS_NOT_SUPPORTED,
             "dst: src and dst blocks are strided differently (%lld rows of %lld bytes vs %lld of %lld); "
             "the CUDA swap needs blocks that are contiguous or share one row layout",
             (long long)gs.rows, (long long)gs.row_bytes, (long long)gd.rows, (long long)gd.row_bytes);
    const char *sp = (const char *)src.data;
    char *dp = (char *)dst.data;
    for (int64_t i = 0; i < n;) {
        const int64_t bs = m[i * s0], bd = m[i * s0 + s1];
        if (flat_s && flat_d) {
            /* merge a run of consecutive pairs whose blocks are adjacent on both sides */
            int64_t run = 1;
            while (i + run < n && m[(i + run) * s0] == bs + run && m[(i + run) * s0 + s1] == bd + run &&
                   gs.block_stride == block_bytes && gd.block_stride == block_bytes)
                run++;
            PF_CUDA_CHECK(cudaMemcpyAsync(dp + bd * gd.block_stride, sp + bs * gs.block_stride,
                                          (size_t)(run * block_bytes), cudaMemcpyDefault, s));
            i += run;
        } else {
            PF_CUDA_CHECK(cudaMemcpy2DAsync(dp + bd * gd.block_stride, (size_t)gd.row_stride, sp + bs * gs.block_stride,
                                            (size_t)gs.row_stride, (size_t)gs.row_bytes, (size_t)gs.rows,
                                            cudaMemcpyDefault, s));
            i += 1;
        }
    }
    return PF_STATUS_OK;
}
