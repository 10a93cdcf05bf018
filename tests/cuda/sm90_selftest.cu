// sm90_selftest.cu - checks the building blocks of cuda/attn/sm90.cuh on a Hopper GPU
// against a float64 host product: the swizzled tile loader, K-major and MN-major
// descriptors, wgmma with A in shared memory and in registers, transposed A.
// Built and run by scripts/gpu_check.sh (stage "selftest"):
//   nvcc -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Icsrc/include -Icsrc/core -Icuda \
//        tests/cuda/sm90_selftest.cu -o sm90_selftest && ./sm90_selftest
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "attn/sm90.cuh"

using namespace pf::cuda;
using T = __nv_bfloat16;

constexpr int M = 64, K = 128;

// out0[M][N] = A[M][K] B[N][K]^T        (SS, both K-major)
// out1[M][N] = A[M][K] V[K][N]          (RS, V MN-major)
// out2[M][N] = At[K][M]^T V[K][N]       (SS, A MN-major (transposed), V MN-major)
template <int N>
__global__ void selftest(const T *a, const T *b, const T *v, const T *at, float *out0, float *out1, float *out2,
                         int swap) {
#ifdef PF_SM90_DEVICE
    extern __shared__ __align__(1024) unsigned char smem[];
    const uint32_t base = (smem_addr(smem) + 1023) & ~1023u;
    const uint32_t sA = base, sB = sA + M * K * 2, sV = sB + N * K * 2, sAt = sV + K * N * 2;
    const int tid = threadIdx.x;
    sm90::load_swizzled<M, K, 128>(sA, a, K, M, K, tid);
    sm90::load_swizzled<N, K, 128>(sB, b, K, N, K, tid);
    sm90::load_swizzled<K, N, 128>(sV, v, N, K, N, tid);
    sm90::load_swizzled<K, M, 128>(sAt, at, M, K, M, tid);
    cp_async_commit();
    cp_async_wait<0>();
    sm90::fence_proxy_async();
    __syncthreads();

    const int warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    float d[N / 2];
    for (int i = 0; i < N / 2; ++i) d[i] = 0.f;
    auto store = [&](float *out) {
        for (int j = 0; j < N / 8; ++j)
            for (int h = 0; h < 2; ++h)
                for (int e = 0; e < 2; ++e) out[(16 * warp + g + 8 * h) * N + 8 * j + 2 * t + e] = d[4 * j + 2 * h + e];
    };

    sm90::wgmma_fence();
    sm90::gemm_ss_kmajor<N, K / 16, M, N, T>(d, sA, 0, sB, 0, false);
    sm90::wgmma_commit();
    sm90::wgmma_wait<0>();
    sm90::fence_regs(d);
    store(out0);

    // A fragments from global (row-major A), the mma.sync m16n8k16 A layout
    uint32_t af[K / 16][4];
    for (int kk = 0; kk < K / 16; ++kk)
        for (int r = 0; r < 4; ++r) {
            const int row = 16 * warp + g + 8 * (r & 1), col = 16 * kk + 8 * (r >> 1) + 2 * t;
            __nv_bfloat162 p;
            p.x = a[row * K + col];
            p.y = a[row * K + col + 1];
            af[kk][r] = *reinterpret_cast<uint32_t *>(&p);
        }
    sm90::wgmma_fence();
    if (!swap) {
        sm90::gemm_rs_mnmajor<N, K / 16, K, T>(d, af, sV, 0, false);
    } else {
        for (int kk = 0; kk < K / 16; ++kk)
            sm90::WgmmaRS<N, T, 1>::run(d, af[kk], sm90::make_desc(sV + kk * 2048, 1024, K * 128), kk > 0);
    }
    sm90::wgmma_commit();
    sm90::wgmma_wait<0>();
    sm90::fence_regs(d);
    store(out1);

    sm90::wgmma_fence();
    for (int kk = 0; kk < K / 16; ++kk) {
        const uint64_t da = swap ? sm90::make_desc(sAt + kk * 2048, 1024, K * 128) : sm90::desc_mnmajor<K>(sAt, 0, kk);
        const uint64_t db = swap ? sm90::make_desc(sV + kk * 2048, 1024, K * 128) : sm90::desc_mnmajor<K>(sV, 0, kk);
        sm90::WgmmaSS<N, T, 1, 1>::run(d, da, db, kk > 0);
    }
    sm90::wgmma_commit();
    sm90::wgmma_wait<0>();
    sm90::fence_regs(d);
    store(out2);
#endif
}

static float bf(T x) { return __bfloat162float(x); }

template <int N>
static int run(int swap) {
    std::vector<T> a(M * K), b(N * K), v(K * N), at(K * M);
    srand(1234 + N);
    auto rnd = [] { return (float)rand() / RAND_MAX * 2.f - 1.f; };
    for (auto &x : a) x = __float2bfloat16(rnd());
    for (auto &x : b) x = __float2bfloat16(rnd());
    for (auto &x : v) x = __float2bfloat16(rnd());
    for (int i = 0; i < M; ++i)
        for (int k = 0; k < K; ++k) at[k * M + i] = a[i * K + k];
    T *da, *db, *dv, *dat;
    float *o[3];
    cudaMalloc(&da, a.size() * 2);
    cudaMalloc(&db, b.size() * 2);
    cudaMalloc(&dv, v.size() * 2);
    cudaMalloc(&dat, at.size() * 2);
    for (auto &p : o) cudaMalloc(&p, M * N * 4), cudaMemset(p, 0xff, M * N * 4);
    cudaMemcpy(da, a.data(), a.size() * 2, cudaMemcpyHostToDevice);
    cudaMemcpy(db, b.data(), b.size() * 2, cudaMemcpyHostToDevice);
    cudaMemcpy(dv, v.data(), v.size() * 2, cudaMemcpyHostToDevice);
    cudaMemcpy(dat, at.data(), at.size() * 2, cudaMemcpyHostToDevice);
    const int smem = (M * K + N * K + K * N + K * M) * 2 + 1024;
    cudaFuncSetAttribute(selftest<N>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    selftest<N><<<1, 128, smem>>>(da, db, dv, dat, o[0], o[1], o[2], swap);
    cudaError_t err = cudaDeviceSynchronize();
    if (err != cudaSuccess) {
        printf("N=%d swap=%d: CUDA error %s\n", N, swap, cudaGetErrorString(err));
        return 1;
    }
    std::vector<float> h(M * N);
    int fails = 0;
    const char *names[3] = {"SS K-major (Q K^T)", "RS MN-major B (P V)", "SS MN-major A and B (dS K)"};
    for (int which = 0; which < 3; ++which) {
        cudaMemcpy(h.data(), o[which], M * N * 4, cudaMemcpyDeviceToHost);
        double worst = 0;
        for (int i = 0; i < M; ++i)
            for (int j = 0; j < N; ++j) {
                double ref = 0;
                for (int k = 0; k < K; ++k)
                    ref += (double)bf(a[i * K + k]) * (which == 0 ? bf(b[j * K + k]) : bf(v[k * N + j]));
                double e = std::fabs(ref - h[i * N + j]);
                if (!(e <= worst)) worst = std::isnan(e) ? INFINITY : e;
            }
        const bool ok = worst < 1e-3;
        printf("N=%3d swap=%d %-28s max|err| %.3g %s\n", N, swap, names[which], worst, ok ? "ok" : "FAIL");
        fails += !ok;
    }
    cudaFree(da), cudaFree(db), cudaFree(dv), cudaFree(dat);
    for (auto &p : o) cudaFree(p);
    return fails;
}

int main() {
    int fails = run<64>(0) + run<128>(0);
    if (fails) {
        printf("-- trying LBO/SBO swapped for the MN-major operands\n");
        run<128>(1);
    }
    printf(fails ? "sm90 selftest FAILED\n" : "sm90 selftest passed\n");
    return fails ? 1 : 0;
}
