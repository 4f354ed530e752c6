/*
 * rng.h -- counter-based random numbers keyed by (seed, stream, step).
 *
 * lmdecode never keeps a generator state: every random number is a pure
 * function of where it is used. The generator is Philox4x32-10 (Salmon et
 * al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011), with
 *
 *     key     = (seed & 0xffffffff, seed >> 32)
 *     counter = (step & 0xffffffff, step >> 32, stream & 0xffffffff, stream >> 32)
 *
 * The four 32-bit output words (x0, x1, x2, x3) give two doubles in [0, 1):
 *
 *     u0 = (((uint64)x0 << 32 | x1) >> 11) * 2^-53
 *     u1 = (((uint64)x2 << 32 | x3) >> 11) * 2^-53
 *
 * A sampler uses u0 as its coin. So the token drawn for a row depends only on
 * the row's logits, its seed, its stream and the step, never on the batch it
 * sits in, its position there or the number of threads.
 *
 *     double coin = lmd_rng_uniform(seed, 0, step, 0);
 */
#ifndef LMD_RNG_H
#define LMD_RNG_H

#include <stdint.h>

/* One Philox4x32-10 block: out[0..3] from counter[0..3] and key[0..1]. */
void lmd_philox4x32_10(const uint32_t counter[4], const uint32_t key[2], uint32_t out[4]);

/* The index-th (0 or 1) uniform double in [0, 1) of block (seed, stream, step). */
double lmd_rng_uniform(uint64_t seed, uint64_t stream, uint64_t step, int index);

#endif /* LMD_RNG_H */
