/* test_util.h -- tiny assertion helpers for the C tests (no framework). */
#ifndef LMD_TEST_UTIL_H
#define LMD_TEST_UTIL_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int test_failures = 0;

#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (!(cond)) {                                                               \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
            test_failures++;                                                         \
        }                                                                            \
    } while (0)

#define CHECK_CLOSE(a, b, tol)                                                                  \
    do {                                                                                        \
        double a_ = (a), b_ = (b);                                                              \
        if (!(fabs(a_ - b_) <= (tol))) {                                                        \
            fprintf(stderr, "%s:%d: %s = %.9g, expected %.9g (tol %g)\n", __FILE__, __LINE__, \
                    #a, a_, b_, (double)(tol));                                                 \
            test_failures++;                                                                    \
        }                                                                                       \
    } while (0)

#define CHECK_MSG_CONTAINS(err, text)                                                            \
    do {                                                                                         \
        if (strstr((err).msg, (text)) == NULL) {                                                 \
            fprintf(stderr, "%s:%d: message \"%s\" lacks \"%s\"\n", __FILE__, __LINE__, (err).msg, \
                    (text));                                                                     \
            test_failures++;                                                                     \
        }                                                                                        \
    } while (0)

static int test_report(const char *name) {
    if (test_failures) {
        fprintf(stderr, "%s: %d failure(s)\n", name, test_failures);
        return 1;
    }
    printf("%s: ok\n", name);
    return 0;
}

#endif
