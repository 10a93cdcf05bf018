/*
 * paged/instantiate.cuh - the entry points of one (head dim, dtype) instantiation
 * of the tensor-core paged kernel (paged/kernel.cuh), included by the generated
 * files cuda/inst/paged_attn_hdim<D>_<dtype>.cu (PF_PAGED_INSTANTIATE) and
 * declared, weak, in cuda/inst/hdims.h:
 *
 *   pf_paged_attn_hdim<D>_<dtype>_occupancy(variant, *ctas_per_sm)
 *       resident CTAs per multiprocessor of that variant (cached per device), the
 *       number the launcher's split count is made from;
 *   pf_paged_attn_hdim<D>_<dtype>_launch(args, variant, stream)
 *       enqueues the kernel: one CTA per (sequence or plan entry, row tile, group
 *       of kv_heads_per_cta KV heads, split).
 *
 * A variant (paged/args.cuh) becomes template arguments here: rows_per_tile ->
 * kRows, the H x W CTA shape -> kHeads, kWarps, the K/V path -> kRing (0 for
 * registers, 3 slots for the ring) and the tile width kNT (16-token tiles up to
 * head dim 128, 8-token ones above). Exactly the variants pf_paged_shape_exists
 * admits are instantiated; the launcher asks for no other (PF_STATUS_NOT_SUPPORTED
 * here if it did).
 */
#ifndef PF_PAGED_INSTANTIATE_CUH
#define PF_PAGED_INSTANTIATE_CUH

#include "paged/kernel.cuh"

/* One kernel instantiation: its dynamic shared memory, occupancy and launch. */
template <int kD, typename T, int kRows, int kHeads, int kWarps, pf_paged_kv_path kPath>
struct pf_paged_instance {
    static constexpr int kRing = kPath == PF_PAGED_KV_RING ? 3 : 0; /* ring slots per warp */
    static constexpr int kNT = kD <= 128 ? 2 : 1;                   /* 8-token groups per tile */
    static constexpr int kSmem = pf_paged_smem_bytes<kD, T, kRows, kNT, kHeads, kWarps, kRing>();
    static_assert(pf_paged_shape_exists(kD, kHeads, kWarps, kPath), "a variant pf_paged_shape_exists refuses");

    static pf_status prepare(int *device) {
        static std::atomic<uint64_t> attr_done{0};
        PF_CUDA_CHECK(cudaGetDevice(device));
        return pf::cuda::set_max_smem(pf_paged_attn_kernel<kD, T, kRows, kNT, kHeads, kWarps, kRing>, kSmem, *device,
                                      attr_done);
    }

    static pf_status occupancy(int *ctas_per_sm) {
        int dev = 0;
        PF_TRY(prepare(&dev));
        static int cached[pf::cuda::kMaxDevices];
        if (dev < pf::cuda::kMaxDevices && cached[dev] > 0) {
            *ctas_per_sm = cached[dev];
            return PF_STATUS_OK;
        }
        PF_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
            ctas_per_sm, pf_paged_attn_kernel<kD, T, kRows, kNT, kHeads, kWarps, kRing>, kWarps * 32, kSmem));
        if (dev < pf::cuda::kMaxDevices) cached[dev] = *ctas_per_sm;
        return PF_STATUS_OK;
    }

    static pf_status launch(const pf_paged_args &a, cudaStream_t stream) {
        int dev = 0;
        PF_TRY(prepare(&dev));
        const int64_t grid = pf_paged_work_items(a, kHeads) * a.num_splits;
        if (grid == 0) return PF_STATUS_OK;
        pf_paged_attn_kernel<kD, T, kRows, kNT, kHeads, kWarps, kRing>
            <<<(unsigned)grid, kWarps * 32, kSmem, stream>>>(a);
        PF_CUDA_CHECK_LAUNCH();
        return PF_STATUS_OK;
    }
};

/* F::template run<Instance>(args...) for the instance of variant v. */
template <int kD, typename T, int kRows, int kHeads, int kWarps, typename F, typename... Args>
pf_status pf_paged_with_path(const pf_paged_variant &v, Args &&...args) {
    if constexpr (pf_paged_shape_exists(kD, kHeads, kWarps, PF_PAGED_KV_RING))
        if (v.kv_path == PF_PAGED_KV_RING)
            return F::template run<pf_paged_instance<kD, T, kRows, kHeads, kWarps, PF_PAGED_KV_RING>>(args...);
    if constexpr (pf_paged_shape_exists(kD, kHeads, kWarps, PF_PAGED_KV_REGISTERS))
        if (v.kv_path == PF_PAGED_KV_REGISTERS)
            return F::template run<pf_paged_instance<kD, T, kRows, kHeads, kWarps, PF_PAGED_KV_REGISTERS>>(args...);
    return pf_set_error(PF_STATUS_NOT_SUPPORTED, __FILE__, __LINE__,
                        "paged kernel %dx%d with the %s K/V path is not instantiated for head dim %d", kHeads, kWarps,
                        v.kv_path == PF_PAGED_KV_RING ? "ring" : "register", kD);
}

template <int kD, typename T, int kRows, typename F, typename... Args>
pf_status pf_paged_with_shape(const pf_paged_variant &v, Args &&...args) {
    const int h = v.kv_heads_per_cta, w = v.warps;
    if (h == 8 && w == 8) return pf_paged_with_path<kD, T, kRows, 8, 8, F>(v, args...);
    if (h == 4 && w == 4) return pf_paged_with_path<kD, T, kRows, 4, 4, F>(v, args...);
    if (h == 1 && w == 4) return pf_paged_with_path<kD, T, kRows, 1, 4, F>(v, args...);
    if constexpr (pf_paged_has_ring(kD)) {
        if (h == 1 && w == 8) return pf_paged_with_path<kD, T, kRows, 1, 8, F>(v, args...);
        if (h == 2 && w == 8) return pf_paged_with_path<kD, T, kRows, 2, 8, F>(v, args...);
        if (h == 4 && w == 8) return pf_paged_with_path<kD, T, kRows, 4, 8, F>(v, args...);
    }
    return pf_set_error(PF_STATUS_NOT_SUPPORTED, __FILE__, __LINE__,
                        "paged kernel shape %dx%d is not instantiated for head dim %d", h, w, kD);
}

/* Calls F::template run<pf_paged_instance<...>>(args...) for variant v of (kD, T). */
template <int kD, typename T, typename F, typename... Args>
pf_status pf_paged_with_variant(const pf_paged_variant &v, Args &&...args) {
    if (v.rows_per_tile == 16 && kD <= 128) return pf_paged_with_shape<kD, T, (kD <= 128 ? 16 : 8), F>(v, args...);
    return pf_paged_with_shape<kD, T, 8, F>(v, args...);
}

struct pf_paged_occupancy_op {
    template <typename Instance>
    static pf_status run(int *ctas_per_sm) {
        return Instance::occupancy(ctas_per_sm);
    }
};

struct pf_paged_launch_op {
    template <typename Instance>
    static pf_status run(const pf_paged_args &a, cudaStream_t stream) {
        return Instance::launch(a, stream);
    }
};

/* The entry points each instantiation file defines (extern "C", weak-referenced by the launcher). */
#define PF_PAGED_INSTANTIATE(D, T, NAME)                                                                            \
    extern "C" pf_status pf_paged_attn_hdim##D##_##NAME##_occupancy(const pf_paged_variant *v, int *ctas_per_sm) {  \
        return pf_paged_with_variant<D, T, pf_paged_occupancy_op>(*v, ctas_per_sm);                                 \
    }                                                                                                               \
    extern "C" pf_status pf_paged_attn_hdim##D##_##NAME##_launch(const pf_paged_args *a, const pf_paged_variant *v, \
                                                                 cudaStream_t s) {                                  \
        return pf_paged_with_variant<D, T, pf_paged_launch_op>(*v, *a, s);                                          \
    }

#endif /* PF_PAGED_INSTANTIATE_CUH */
