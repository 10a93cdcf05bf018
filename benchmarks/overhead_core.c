/*
 * overhead_core.c - the C core's own time per call for benchmarks/bench_overhead.py: the
 * same tiny calls as the Python table (flash_attn, paged_attn, write_kv_cache,
 * merge_attn_states), made through the C API in a loop, one thread, no Python. Prints
 * "<name> <ns per call>" lines named like bench_overhead.build_cases.
 *
 *   overhead_core <float32|float16|bfloat16> <calls> <B> <H> <HK> <D> <SQ> <CTX> <BLOCK>
 */
#define _POSIX_C_SOURCE 199309L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "pagedflash.h"

static pf_dtype dtype;

static pf_tensor make(int ndim, const int64_t *shape, pf_dtype dt) {
    pf_tensor t;
    memset(&t, 0, sizeof t);
    t.dtype = dt;
    t.device = PF_DEVICE_CPU;
    t.ndim = ndim;
    int64_t n = 1;
    for (int i = ndim - 1; i >= 0; i--) {
        t.shape[i] = shape[i];
        t.strides[i] = n;
        n *= shape[i];
    }
    size_t bytes = (size_t)n * pf_dtype_size(dt);
    unsigned char *p = malloc(bytes ? bytes : 1);
    unsigned s = 12345u;
    for (size_t i = 0; i < bytes; i++) { /* small finite values in any float format */
        s = s * 1664525u + 1013904223u;
        p[i] = (i % 2) ? 0x3c : (unsigned char)(s >> 24);
    }
    if (dt == PF_DTYPE_F32)
        for (int64_t i = 0; i < n; i++) ((float *)p)[i] = (float)((s = s * 1664525u + 1013904223u) >> 8) / 16777216.f;
    t.data = p;
    return t;
}

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

#define TIME(name, call)                                                            \
    do {                                                                            \
        for (int i_ = 0; i_ < 100; i_++) (void)(call);                              \
        double best_ = 1e30;                                                        \
        for (int r_ = 0; r_ < 7; r_++) {                                            \
            double t0_ = now_ns();                                                  \
            for (int i_ = 0; i_ < calls; i_++) {                                    \
                if ((call) != PF_STATUS_OK) {                                       \
                    fprintf(stderr, "%s failed: %s\n", name, pf_last_error());      \
                    exit(1);                                                        \
                }                                                                   \
            }                                                                       \
            double dt_ = (now_ns() - t0_) / calls;                                  \
            if (dt_ < best_) best_ = dt_;                                           \
        }                                                                           \
        printf("%s %.1f\n", name, best_);                                           \
    } while (0)

int main(int argc, char **argv) {
    if (argc != 10) {
        fprintf(stderr, "usage: %s dtype calls B H HK D SQ CTX BLOCK\n", argv[0]);
        return 2;
    }
    dtype = !strcmp(argv[1], "float16") ? PF_DTYPE_F16 : !strcmp(argv[1], "bfloat16") ? PF_DTYPE_BF16 : PF_DTYPE_F32;
    const int calls = atoi(argv[2]);
    const int64_t B = atoll(argv[3]), H = atoll(argv[4]), HK = atoll(argv[5]), D = atoll(argv[6]);
    const int64_t SQ = atoll(argv[7]), CTX = atoll(argv[8]), BLOCK = atoll(argv[9]);
    const int64_t NB = 64;

    pf_attn_params a;
    memset(&a, 0, sizeof a);
    a.q = make(4, (int64_t[]){B, SQ, H, D}, dtype);
    a.k = make(4, (int64_t[]){B, SQ, HK, D}, dtype);
    a.v = make(4, (int64_t[]){B, SQ, HK, D}, dtype);
    a.out = make(4, (int64_t[]){B, SQ, H, D}, dtype);
    a.softmax_scale = pf_default_softmax_scale(D);
    a.causal = 1;
    a.window_left = a.window_right = -1;
    a.num_threads = 1;
    char name[64];
    snprintf(name, sizeof name, "flash_attn (prefill %lld)", (long long)SQ);
    TIME(name, pf_flash_fwd(&a));
    TIME("flash_attn, out= given", pf_flash_fwd(&a));

    pf_paged_params p;
    memset(&p, 0, sizeof p);
    p.q = make(3, (int64_t[]){B, H, D}, dtype);
    p.k_cache = make(4, (int64_t[]){NB, BLOCK, HK, D}, dtype);
    p.v_cache = make(4, (int64_t[]){NB, BLOCK, HK, D}, dtype);
    p.block_tables = make(2, (int64_t[]){B, CTX / BLOCK}, PF_DTYPE_I32);
    for (int64_t i = 0; i < B * (CTX / BLOCK); i++) ((int32_t *)p.block_tables.data)[i] = (int32_t)(i % NB);
    p.seq_lens = make(1, (int64_t[]){B}, PF_DTYPE_I32);
    for (int64_t i = 0; i < B; i++) ((int32_t *)p.seq_lens.data)[i] = (int32_t)CTX;
    p.out = make(3, (int64_t[]){B, H, D}, dtype);
    p.softmax_scale = pf_default_softmax_scale(D);
    p.window_left = p.window_right = -1;
    p.num_threads = 1;
    snprintf(name, sizeof name, "paged_attn (decode %lld)", (long long)CTX);
    TIME(name, pf_paged_attn(&p));

    pf_tensor kn = make(3, (int64_t[]){B, HK, D}, dtype);
    pf_tensor slots = make(1, (int64_t[]){B}, PF_DTYPE_I64);
    for (int64_t i = 0; i < B; i++) ((int64_t *)slots.data)[i] = CTX - 1 - i;
    TIME("write_kv_cache (1 token)", pf_write_kv_cache(kn, kn, p.k_cache, p.v_cache, slots, NULL));

    pf_merge_params m;
    memset(&m, 0, sizeof m);
    m.out_a = make(3, (int64_t[]){B, H, D}, dtype);
    m.out_b = make(3, (int64_t[]){B, H, D}, dtype);
    m.lse_a = make(2, (int64_t[]){H, B}, PF_DTYPE_F32);
    m.lse_b = make(2, (int64_t[]){H, B}, PF_DTYPE_F32);
    m.out = make(3, (int64_t[]){B, H, D}, dtype);
    m.lse = make(2, (int64_t[]){H, B}, PF_DTYPE_F32);
    m.num_threads = 1;
    TIME("merge_attn_states", pf_merge_attn_states(&m));
    TIME("merge_attn_states, out= given", pf_merge_attn_states(&m));
    return 0;
}
