/* test_rand.h -- a seeded random source for the C tests (splitmix64), so that
 * every test draws the same numbers on every machine. */
#ifndef LMD_TEST_RAND_H
#define LMD_TEST_RAND_H

#include <stdint.h>

typedef struct {
    uint64_t state;
} test_rng;

static inline uint64_t test_rand_u64(test_rng *r) {
    uint64_t z = (r->state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* uniform in [lo, hi) */
static inline float test_uniform(test_rng *r, float lo, float hi) {
    double u = (double)(test_rand_u64(r) >> 11) * 0x1.0p-53;
    return (float)(lo + (hi - lo) * u);
}

/* uniform integer in [0, n) */
static inline int32_t test_rand_below(test_rng *r, int32_t n) {
    return (int32_t)(test_rand_u64(r) % (uint64_t)n);
}

static inline void test_fill(test_rng *r, float *x, int64_t n, float lo, float hi) {
    for (int64_t i = 0; i < n; i++) x[i] = test_uniform(r, lo, hi);
}

#endif
