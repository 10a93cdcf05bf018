/*
 * flash_hdims.h - which head dims have compiled float16/bfloat16 kernels.
 *
 * The instantiated dims are 32, 64, 96, 128, 192 and 256; any other head dim
 * runs on the next larger one, zero-padded. A quick build
 * (PAGEDFLASH_HEADDIMS=64,128) defines PF_HEADDIMS_TRIMMED and PF_HDIM<N> for
 * each kept dim, and only those cuda/inst/ files are compiled.
 */
#ifndef PF_FLASH_HDIMS_H
#define PF_FLASH_HDIMS_H

#ifndef PF_HEADDIMS_TRIMMED
#define PF_BUILD_HDIM32 1
#define PF_BUILD_HDIM64 1
#define PF_BUILD_HDIM96 1
#define PF_BUILD_HDIM128 1
#define PF_BUILD_HDIM192 1
#define PF_BUILD_HDIM256 1
#else
#ifdef PF_HDIM32
#define PF_BUILD_HDIM32 1
#endif
#ifdef PF_HDIM64
#define PF_BUILD_HDIM64 1
#endif
#ifdef PF_HDIM96
#define PF_BUILD_HDIM96 1
#endif
#ifdef PF_HDIM128
#define PF_BUILD_HDIM128 1
#endif
#ifdef PF_HDIM192
#define PF_BUILD_HDIM192 1
#endif
#ifdef PF_HDIM256
#define PF_BUILD_HDIM256 1
#endif
#endif

/* Apply `RUN(N)` (an expression returning pf_status) for the smallest compiled
 * head dim N >= d; falls through when none fits. */
#define PF_HDIM_CASE(N, d, RUN) \
    if ((d) <= (N)) return RUN(N);

#ifdef PF_BUILD_HDIM32
#define PF_HDIM_CASE32(d, RUN) PF_HDIM_CASE(32, d, RUN)
#else
#define PF_HDIM_CASE32(d, RUN)
#endif
#ifdef PF_BUILD_HDIM64
#define PF_HDIM_CASE64(d, RUN) PF_HDIM_CASE(64, d, RUN)
#else
#define PF_HDIM_CASE64(d, RUN)
#endif
#ifdef PF_BUILD_HDIM96
#define PF_HDIM_CASE96(d, RUN) PF_HDIM_CASE(96, d, RUN)
#else
#define PF_HDIM_CASE96(d, RUN)
#endif
#ifdef PF_BUILD_HDIM128
#define PF_HDIM_CASE128(d, RUN) PF_HDIM_CASE(128, d, RUN)
#else
#define PF_HDIM_CASE128(d, RUN)
#endif
#ifdef PF_BUILD_HDIM192
#define PF_HDIM_CASE192(d, RUN) PF_HDIM_CASE(192, d, RUN)
#else
#define PF_HDIM_CASE192(d, RUN)
#endif
#ifdef PF_BUILD_HDIM256
#define PF_HDIM_CASE256(d, RUN) PF_HDIM_CASE(256, d, RUN)
#else
#define PF_HDIM_CASE256(d, RUN)
#endif

#define PF_HDIM_SWITCH(d, RUN)   \
    do {                         \
        PF_HDIM_CASE32(d, RUN)   \
        PF_HDIM_CASE64(d, RUN)   \
        PF_HDIM_CASE96(d, RUN)   \
        PF_HDIM_CASE128(d, RUN)  \
        PF_HDIM_CASE192(d, RUN)  \
        PF_HDIM_CASE256(d, RUN)  \
    } while (0)

#endif /* PF_FLASH_HDIMS_H */
