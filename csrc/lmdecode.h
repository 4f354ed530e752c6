/*
 * lmdecode.h -- umbrella header of the lmdecode C core.
 *
 * The core is pure C11: it never includes Python.h, never prints and never
 * exits. Every fallible function returns an lmd_status and, when it is not
 * LMD_OK, writes a one-line human-readable reason into an lmd_error that the
 * caller owns. On any non-OK return the function's outputs and the objects it
 * was given are left as they were (unless the function's header says
 * otherwise).
 *
 *     lmd_error err;
 *     lmd_status st = lmd_something(..., &err);
 *     if (st != LMD_OK) fprintf(stderr, "%s\n", err.msg);
 */
#ifndef LMDECODE_H
#define LMDECODE_H

#include <stddef.h>
#include <stdint.h>

#define LMD_VERSION_MAJOR 0
#define LMD_VERSION_MINOR 1
#define LMD_VERSION_PATCH 0
#define LMD_VERSION_STRING "0.1.0"

typedef enum {
    LMD_OK = 0,
    LMD_ERR_NOMEM,        /* an allocation failed */
    LMD_ERR_INVALID_ARG,  /* an argument is outside its documented domain */
    LMD_ERR_FORMAT,       /* a model file is corrupt, truncated or inconsistent */
    LMD_ERR_CACHE_FULL,   /* the KV cache has no room for the requested positions */
    LMD_ERR_UNSUPPORTED,  /* a valid input that this build does not handle */
    LMD_ERR_IO,           /* the operating system refused a file operation */
    LMD_ERR_STOPPED,      /* the caller's stop check asked a long loop to stop */
    LMD_ERR_INTERNAL      /* an invariant of the core failed (a bug): reported, not read past */
} lmd_status;

typedef struct {
    char msg[256];
} lmd_error;

/* Formats a message into err (if err is non-NULL) and returns status. */
lmd_status lmd_fail(lmd_error *err, lmd_status status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* Room for one number formatted by lmd_format_double or lmd_format_float. */
#define LMD_NUMBER_CHARS 32

/* x in the fewest significant digits that read back as x, laid out as Python's repr does but
 * without a trailing ".0" ("1.0000001", "1e-50", "2", "50"), into buf; returns buf. Messages
 * print values with it: %g rounds to 6 digits, so that "top_p (=1) must be in (0, 1]" was the
 * message for top_p = 1.0000001. */
const char *lmd_format_double(char buf[LMD_NUMBER_CHARS], double x);
/* The same for a float32 value (at most 9 digits). */
const char *lmd_format_float(char buf[LMD_NUMBER_CHARS], float x);

/* malloc for vectors the kernels stream through: the start is aligned to a cache line
 * (64 bytes), so full-width loads never straddle two lines. Release with free(). */
void *lmd_alloc_aligned(size_t bytes);

/* malloc for a model's weights, read once per decoded token from end to end: the start is
 * aligned to 2 MB and, on Linux, the kernel is asked to back the block with transparent
 * huge pages (madvise; the last partial 2 MB keeps small pages, so the resident memory is
 * the bytes written). Release with free(). */
void *lmd_alloc_weights(size_t bytes);

/* Number of threads the core's parallel loops use (1 without OpenMP). */
int lmd_get_num_threads(void);
/* Sets it; n < 1 restores the default (OMP_NUM_THREADS or the core count). */
void lmd_set_num_threads(int n);

/* Build facts for lmdecode.build_info(). */
int lmd_built_with_openmp(void);
/* Space-separated vector extensions the compiler was allowed to use, e.g. "avx2 fma avx512f". */
const char *lmd_vector_extensions(void);
/* Width in bytes of the vectors the core's kernels use (see vec.h). */
int lmd_vector_bytes(void);

#endif /* LMDECODE_H */
