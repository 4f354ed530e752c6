/* lmdecode.c -- error formatting, thread-count setting and build facts. */
#include "lmdecode.h"

#include <stdlib.h>
#include "vec.h"

#include <stdarg.h>
#include <stdio.h>

#ifdef _OPENMP
#include <omp.h>
#endif

lmd_status lmd_fail(lmd_error *err, lmd_status status, const char *fmt, ...) {
    if (err != NULL) {
        va_list args;
        va_start(args, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, args);
        va_end(args);
    }
    return status;
}

/* 0 means "not set": use the OpenMP default. Read once per parallel region;
 * a plain int is enough because a torn read cannot happen on an aligned int
 * and a stale value only changes speed, never results. */
static int requested_threads = 0;

int lmd_get_num_threads(void) {
#ifdef _OPENMP
    return requested_threads > 0 ? requested_threads : omp_get_max_threads();
#else
    return 1;
#endif
}

void lmd_set_num_threads(int n) { requested_threads = n > 0 ? n : 0; }

int lmd_built_with_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

const char *lmd_vector_extensions(void) {
    return ""
#if defined(__AVX512F__)
           "avx512f "
#endif
#if defined(__AVX512BW__)
           "avx512bw "
#endif
#if defined(__AVX512BF16__)
           "avx512bf16 "
#endif
#if defined(__AVX512VNNI__)
           "avx512vnni "
#endif
#if defined(__AVX2__)
           "avx2 "
#endif
#if defined(__FMA__)
           "fma "
#endif
#if defined(__F16C__)
           "f16c "
#endif
#if defined(__SSE4_2__)
           "sse4.2 "
#endif
#if defined(__ARM_NEON)
           "neon "
#endif
        ;
}

int lmd_vector_bytes(void) { return LMD_VEC_BYTES; }

void *lmd_alloc_aligned(size_t bytes) {
    size_t rounded = (bytes + 63) / 64 * 64; /* aligned_alloc wants a multiple of the alignment */
    return aligned_alloc(64, rounded ? rounded : 64);
}
