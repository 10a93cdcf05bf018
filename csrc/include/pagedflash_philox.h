/*
 * pagedflash_philox.h - Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy
 * as 1, 2, 3", SC'11), the counter-based generator behind attention dropout.
 *
 * The keep decision for element (b, h, i, j) of a dropout mask is a pure
 * function of (seed, offset, b, h, i, j), so the backward pass regenerates the
 * forward's mask without storing it, and the CPU and CUDA backends agree bit
 * for bit:
 *   key     = (seed_lo, seed_hi)
 *   counter = (j / 4, i, b * num_heads + h, offset)
 *   r       = philox(counter, key)[j % 4]
 *   keep    = r >= threshold,  threshold = floor(p * 2^32) (saturating)
 * Part of the public contract of pf_dropout_mask (pagedflash.h): with it a caller
 * can regenerate any dropout mask. Header-only; usable from C and CUDA device code.
 */
#ifndef PF_PHILOX_H
#define PF_PHILOX_H

#include <stdint.h>

#if defined(__CUDACC__)
#define PF_PHILOX_FN __host__ __device__ __forceinline__
#else
#define PF_PHILOX_FN static inline
#endif

typedef struct pf_u32x4 {
    uint32_t x, y, z, w;
} pf_u32x4;

PF_PHILOX_FN pf_u32x4 pf_philox4x32_10(pf_u32x4 c, uint32_t k0, uint32_t k1) {
    const uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
    const uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
    for (int round = 0; round < 10; round++) {
        uint64_t p0 = (uint64_t)M0 * c.x;
        uint64_t p1 = (uint64_t)M1 * c.z;
        uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0;
        uint32_t hi1 = (uint32_t)(p1 >> 32), lo1 = (uint32_t)p1;
        pf_u32x4 n;
        n.x = hi1 ^ c.y ^ k0;
        n.y = lo1;
        n.z = hi0 ^ c.w ^ k1;
        n.w = lo0;
        c = n;
        k0 += W0;
        k1 += W1;
    }
    return c;
}

/* Drop threshold for probability p in [0, 1): keep iff r >= threshold. */
PF_PHILOX_FN uint32_t pf_dropout_threshold(float p) {
    double t = (double)p * 4294967296.0;
    if (t >= 4294967295.0) return 0xffffffffu;
    if (t <= 0.0) return 0u;
    return (uint32_t)t;
}

/* Four consecutive random words for columns j0..j0+3 (j0 % 4 == 0) of row i. */
PF_PHILOX_FN pf_u32x4 pf_dropout_bits4(uint64_t seed, uint64_t offset, uint64_t bh, int64_t i, int64_t j0) {
    pf_u32x4 c;
    c.x = (uint32_t)(j0 >> 2);
    c.y = (uint32_t)i;
    c.z = (uint32_t)bh;
    c.w = (uint32_t)offset;
    return pf_philox4x32_10(c, (uint32_t)seed, (uint32_t)(seed >> 32));
}

#endif /* PF_PHILOX_H */
