/*
 * test_c_api.c - the C API on its own, without Python: pf_flash_fwd on float32
 * inputs against a naive double-precision attention written here, with GQA and
 * causal masking, plus the error path (status, message naming the argument,
 * output untouched), and a compressed cache: pf_write_kv_cache_scaled into int8
 * codes with per-(token, head) scales, pf_paged_attn over them against the naive
 * attention on code * scale. Built and run by tests/test_c_api.py; exits non-zero on failure.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pagedflash.h"

static int failures = 0;

#define EXPECT(cond, ...)                                        \
    do {                                                         \
        if (!(cond)) {                                           \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
            fprintf(stderr, __VA_ARGS__);                        \
            fprintf(stderr, "\n");                               \
            failures++;                                          \
        }                                                        \
    } while (0)

static pf_tensor view4(float *data, int64_t a, int64_t b, int64_t c, int64_t d) {
    pf_tensor t;
    memset(&t, 0, sizeof t);
    t.data = data;
    t.dtype = PF_DTYPE_F32;
    t.device = PF_DEVICE_CPU;
    t.ndim = 4;
    t.shape[0] = a;
    t.shape[1] = b;
    t.shape[2] = c;
    t.shape[3] = d;
    t.strides[3] = 1;
    t.strides[2] = d;
    t.strides[1] = c * d;
    t.strides[0] = b * c * d;
    return t;
}

static double uniform(unsigned *state) {
    *state = *state * 1664525u + 1013904223u;
    return ((*state >> 8) / 16777216.0) * 2.0 - 1.0;
}

/* naive attention in double: one (batch, head, query row) at a time */
static void naive(const float *q, const float *k, const float *v, double *out, double *lse, int B, int SQ, int SK,
                  int H, int HK, int D, int causal) {
    double scale = 1.0 / sqrt((double)D);
    double *s = malloc(sizeof(double) * (size_t)SK);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int i = 0; i < SQ; i++) {
                int hk = h / (H / HK);
                double m = -INFINITY;
                for (int j = 0; j < SK; j++) {
                    double acc = 0;
                    for (int c = 0; c < D; c++)
                        acc += (double)q[((b * SQ + i) * H + h) * D + c] * k[((b * SK + j) * HK + hk) * D + c];
                    s[j] = (causal && j > i + SK - SQ) ? -INFINITY : acc * scale;
                    if (s[j] > m) m = s[j];
                }
                double l = 0;
                for (int j = 0; j < SK; j++) l += (s[j] == -INFINITY) ? 0 : exp(s[j] - m);
                for (int c = 0; c < D; c++) {
                    double o = 0;
                    for (int j = 0; j < SK; j++)
                        if (s[j] != -INFINITY) o += exp(s[j] - m) / l * v[((b * SK + j) * HK + hk) * D + c];
                    out[((b * SQ + i) * H + h) * D + c] = l > 0 ? o : 0.0;
                }
                lse[(b * H + h) * SQ + i] = l > 0 ? m + log(l) : -INFINITY;
            }
    free(s);
}

static void check_attention(int B, int SQ, int SK, int H, int HK, int D, int causal) {
    unsigned seed = 1234u + (unsigned)(SQ * 31 + SK);
    size_t nq = (size_t)B * SQ * H * D, nk = (size_t)B * SK * HK * D;
    float *q = malloc(nq * 4), *k = malloc(nk * 4), *v = malloc(nk * 4), *o = malloc(nq * 4);
    float *lse = malloc((size_t)B * H * SQ * 4);
    double *ro = malloc(nq * 8), *rl = malloc((size_t)B * H * SQ * 8);
    for (size_t i = 0; i < nq; i++) q[i] = (float)uniform(&seed);
    for (size_t i = 0; i < nk; i++) k[i] = (float)uniform(&seed);
    for (size_t i = 0; i < nk; i++) v[i] = (float)uniform(&seed);
    for (size_t i = 0; i < nq; i++) o[i] = NAN;

    pf_attn_params p;
    memset(&p, 0, sizeof p);
    p.q = view4(q, B, SQ, H, D);
    p.k = view4(k, B, SK, HK, D);
    p.v = view4(v, B, SK, HK, D);
    p.out = view4(o, B, SQ, H, D);
    p.lse = view4(lse, B, H, SQ, 1);
    p.lse.ndim = 3;
    p.lse.strides[0] = (int64_t)H * SQ;
    p.lse.strides[1] = SQ;
    p.lse.strides[2] = 1;
    p.softmax_scale = pf_default_softmax_scale(D); /* the scale is taken as given */
    p.causal = causal;
    p.window_left = p.window_right = -1;
    pf_status st = pf_flash_fwd(&p);
    EXPECT(st == PF_STATUS_OK, "pf_flash_fwd returned %s: %s", pf_status_string(st), pf_last_error());

    naive(q, k, v, ro, rl, B, SQ, SK, H, HK, D, causal);
    double err = 0, lerr = 0;
    for (size_t i = 0; i < nq; i++) {
        double e = fabs((double)o[i] - ro[i]);
        if (!(e <= err)) err = e; /* NaN-sticky */
    }
    for (int i = 0; i < B * H * SQ; i++) {
        if (isinf(rl[i])) {
            EXPECT(isinf(lse[i]) && lse[i] < 0, "lse[%d] should be -inf", i);
            continue;
        }
        double e = fabs((double)lse[i] - rl[i]);
        if (!(e <= lerr)) lerr = e;
    }
    EXPECT(err <= 1e-5, "B=%d SQ=%d SK=%d H=%d HK=%d D=%d causal=%d: max |out - ref| = %g", B, SQ, SK, H, HK, D, causal,
           err);
    EXPECT(lerr <= 1e-5, "lse error %g", lerr);
    free(q);
    free(k);
    free(v);
    free(o);
    free(lse);
    free(ro);
    free(rl);
}

static void check_errors(void) {
    float q[2 * 3 * 4 * 8], k[2 * 5 * 3 * 8], o[2 * 3 * 4 * 8];
    for (size_t i = 0; i < sizeof o / 4; i++) o[i] = 7.0f;
    for (size_t i = 0; i < sizeof q / 4; i++) q[i] = 0.5f;
    for (size_t i = 0; i < sizeof k / 4; i++) k[i] = 0.25f;
    pf_attn_params p;
    memset(&p, 0, sizeof p);
    p.q = view4(q, 2, 3, 4, 8);
    p.k = view4(k, 2, 5, 3, 8); /* 4 heads over 3 kv heads: invalid */
    p.v = p.k;
    p.out = view4(o, 2, 3, 4, 8);
    p.window_left = p.window_right = -1;
    pf_status st = pf_flash_fwd(&p);
    EXPECT(st == PF_STATUS_INVALID_VALUE, "expected PF_STATUS_INVALID_VALUE, got %s", pf_status_string(st));
    EXPECT(strstr(pf_last_error(), "num_kv_heads") != NULL, "message should name num_kv_heads: %s", pf_last_error());
    for (size_t i = 0; i < sizeof o / 4; i++) EXPECT(o[i] == 7.0f, "out modified at %zu", i);
    p.k.dtype = PF_DTYPE_F16;
    st = pf_flash_fwd(&p);
    EXPECT(st == PF_STATUS_INVALID_TYPE, "expected PF_STATUS_INVALID_TYPE, got %s", pf_status_string(st));
    EXPECT(strcmp(pf_status_string(PF_STATUS_OK), "PF_STATUS_OK") == 0, "status string");
}

/* One sequence of SK tokens written into an int8 paged cache (blocks of 8, in reverse order) with
 * row scales, decoded by H query heads over HK KV heads. */
static void check_int8_cache(void) {
    enum { SK = 37, H = 4, HK = 2, D = 24, BS = 8, NB = 5 };
    static float k[SK * HK * D], v[SK * HK * D], q[H * D], o[H * D], kd[SK * HK * D], vd[SK * HK * D];
    static int8_t kc[NB * BS * HK * D], vc[NB * BS * HK * D];
    static float ks[NB * BS * HK], vs[NB * BS * HK];
    static int64_t slots[SK];
    int32_t table[NB], len = SK;
    unsigned seed = 99u;
    for (int i = 0; i < SK * HK * D; i++) k[i] = (float)uniform(&seed) * 3.0f, v[i] = (float)uniform(&seed);
    for (int i = 0; i < H * D; i++) q[i] = (float)uniform(&seed), o[i] = NAN;
    for (int b = 0; b < NB; b++) table[b] = NB - 1 - b;
    for (int t = 0; t < SK; t++) slots[t] = (int64_t)table[t / BS] * BS + t % BS;
    pf_tensor tk = view4(k, 1, SK, HK, D), tv = view4(v, 1, SK, HK, D);
    tk.ndim = tv.ndim = 3; /* [SK, HK, D] */
    for (int i = 0; i < 3; i++)
        tk.shape[i] = tv.shape[i] = tk.shape[i + 1], tk.strides[i] = tv.strides[i] = tk.strides[i + 1];
    pf_tensor tkc = view4((float *)kc, NB, BS, HK, D), tvc = view4((float *)vc, NB, BS, HK, D);
    tkc.dtype = tvc.dtype = PF_DTYPE_I8;
    pf_tensor tks = view4(ks, 1, NB, BS, HK), tvs = view4(vs, 1, NB, BS, HK);
    tks.ndim = tvs.ndim = 3;
    for (int i = 0; i < 3; i++)
        tks.shape[i] = tvs.shape[i] = tks.shape[i + 1], tks.strides[i] = tvs.strides[i] = tks.strides[i + 1];
    pf_tensor tslots = {slots, PF_DTYPE_I64, PF_DEVICE_CPU, 0, 1, {SK}, {1}};
    pf_tensor none;
    memset(&none, 0, sizeof none);
    pf_status st = pf_write_kv_cache_scaled(tk, tv, tkc, tvc, tslots, none, tvs, NULL);
    EXPECT(st == PF_STATUS_INVALID_VALUE && strstr(pf_last_error(), "k_scale: missing") != NULL,
           "an int8 cache without k_scale: %s", pf_last_error());
    st = pf_write_kv_cache_scaled(tk, tv, tkc, tvc, tslots, tks, tvs, NULL);
    EXPECT(st == PF_STATUS_OK, "pf_write_kv_cache_scaled: %s", pf_last_error());
    for (int t = 0; t < SK; t++)
        for (int h = 0; h < HK; h++) {
            const int64_t row = slots[t] * HK + h;
            for (int c = 0; c < D; c++) {
                kd[(t * HK + h) * D + c] = kc[row * D + c] * ks[row];
                vd[(t * HK + h) * D + c] = vc[row * D + c] * vs[row];
                EXPECT(fabsf(kd[(t * HK + h) * D + c] - k[(t * HK + h) * D + c]) <= 0.5f * ks[row] * 1.0001f,
                       "k[%d, %d, %d] quantized beyond half a step", t, h, c);
            }
        }
    pf_paged_params p;
    memset(&p, 0, sizeof p);
    p.q = view4(q, 1, 1, H, D);
    p.q.ndim = 3; /* [batch, H, D] */
    for (int i = 0; i < 3; i++) p.q.shape[i] = p.q.shape[i + 1], p.q.strides[i] = p.q.strides[i + 1];
    p.out = p.q;
    p.out.data = o;
    p.k_cache = tkc;
    p.v_cache = tvc;
    p.k_scale = tks;
    p.v_scale = tvs;
    p.block_tables = (pf_tensor){table, PF_DTYPE_I32, PF_DEVICE_CPU, 0, 2, {1, NB}, {NB, 1}};
    p.seq_lens = (pf_tensor){&len, PF_DTYPE_I32, PF_DEVICE_CPU, 0, 1, {1}, {1}};
    p.softmax_scale = pf_default_softmax_scale(D);
    p.causal = 1;
    p.window_left = p.window_right = -1;
    st = pf_paged_attn(&p);
    EXPECT(st == PF_STATUS_OK, "pf_paged_attn over an int8 cache: %s", pf_last_error());
    double ref[H * D], lse[H];
    naive(q, kd, vd, ref, lse, 1, 1, SK, H, HK, D, 1);
    for (int i = 0; i < H * D; i++) EXPECT(fabs(o[i] - ref[i]) <= 1e-5, "out[%d] = %g, expected %g", i, o[i], ref[i]);
}

int main(void) {
    check_attention(1, 1, 1, 1, 1, 1, 0);
    check_attention(2, 7, 113, 4, 2, 40, 1);
    check_attention(1, 130, 70, 8, 1, 64, 1);
    check_attention(2, 65, 65, 2, 2, 96, 0);
    check_errors();
    check_int8_cache();
    printf("pagedflash C API: %d checks failed; has_cuda=%d cpu_count=%d\n", failures, pf_has_cuda(), pf_cpu_count());
    return failures ? 1 : 0;
}
