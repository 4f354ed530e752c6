/* lmdecode.c -- error formatting, thread-count setting, allocation and build facts. */
#if defined(__linux__) && !defined(_DEFAULT_SOURCE)
#define _DEFAULT_SOURCE /* madvise() */
#endif
#include "lmdecode.h"

#include <math.h>
#include <stdlib.h>
#include "vec.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

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

/* The fewest significant digits (up to max_digits, which always suffice) that read back as x
 * (in float32 when single), written as Python's repr chooses: positional for decimal
 * exponents in [-4, 16), else scientific; no trailing ".0". */
static const char *format_shortest(char buf[LMD_NUMBER_CHARS], double x, int max_digits, int single) {
    if (!isfinite(x)) {
        snprintf(buf, LMD_NUMBER_CHARS, "%g", x);
        return buf;
    }
    int digits = 1;
    for (; digits < max_digits; digits++) {
        snprintf(buf, LMD_NUMBER_CHARS, "%.*e", digits - 1, x);
        if (single ? strtof(buf, NULL) == (float)x : strtod(buf, NULL) == x) break;
    }
    snprintf(buf, LMD_NUMBER_CHARS, "%.*e", digits - 1, x); /* [-]d[.ddd]e[+-]xx */
    const int exponent = atoi(strchr(buf, 'e') + 1);
    if (exponent < -4 || exponent >= 16) return buf;
    /* positional, from those digits (%f would print a float's exact binary value: 1e15f is
     * 999999986991104, which is not what was passed) */
    char mantissa[LMD_NUMBER_CHARS];
    int n = 0;
    for (const char *c = buf + (buf[0] == '-'); *c != 'e'; c++)
        if (*c != '.') mantissa[n++] = *c;
    char *out = buf + (buf[0] == '-');
    if (exponent < 0) {
        memmove(out + 1 - exponent, mantissa, (size_t)n);
        memset(out, '0', (size_t)(1 - exponent)); /* "0." and the zeros after the point */
        out[1] = '.';
        out[1 - exponent + n] = '\0';
    } else {
        for (int i = 0; i <= exponent || i < n; i++) {
            if (i == exponent + 1) *out++ = '.';
            *out++ = i < n ? mantissa[i] : '0';
        }
        *out = '\0';
    }
    return buf;
}

const char *lmd_format_double(char buf[LMD_NUMBER_CHARS], double x) { return format_shortest(buf, x, 17, 0); }

const char *lmd_format_float(char buf[LMD_NUMBER_CHARS], float x) { return format_shortest(buf, x, 9, 1); }

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

/* A decode streams every weight once per token, and with 4 kB pages the hardware
 * prefetchers stop at each page's end (and the TLB misses every 4 kB): the 110M Llama's f32
 * decode on one thread ran 7-14% faster (medians of 20 alternating rounds, Zen 4) from panels
 * in huge pages, bf16 ~4%, q8_0 2-4%. */
#define WEIGHT_PAGE ((size_t)2 << 20)

void *lmd_alloc_weights(size_t bytes) {
    const size_t rounded = (bytes + 63) / 64 * 64;
    if (rounded < WEIGHT_PAGE) return lmd_alloc_aligned(bytes); /* no whole huge page to ask for */
    void *block = aligned_alloc(WEIGHT_PAGE, (rounded + WEIGHT_PAGE - 1) / WEIGHT_PAGE * WEIGHT_PAGE);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    /* advice only: where the kernel has no huge page to give (or THP is off) nothing changes */
    if (block != NULL) (void)madvise(block, rounded / WEIGHT_PAGE * WEIGHT_PAGE, MADV_HUGEPAGE);
#endif
    return block;
}
