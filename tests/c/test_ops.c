/* test_ops.c -- every fast kernel of ops.h against its _naive twin, the scalar
 * conversions and Q8_0 quantization on hand cases, and the invariant the
 * engine's determinism rests on: a matmul row does not depend on the batch
 * around it or on the thread count.
 *
 * Tolerances are the standard floating-point error bounds, in units of
 * u = 2^-24 (float's unit roundoff) times a scale that the kernel's own
 * arithmetic justifies (for a dot product of n terms, n u sum |w_k x_k|).
 * The worst ratio seen is printed for each kernel, as llm.c prints max diffs. */
#include <float.h>
#include <stdint.h>

#include "lmdecode.h"
#include "ops.h"
#include "test_rand.h"
#include "test_util.h"

#define U (FLT_EPSILON / 2) /* unit roundoff of float */

/* Checks |got - want| <= bound and tracks the worst got-want / bound. */
typedef struct {
    const char *name;
    double worst; /* max |got - want| / bound */
    long n_checked;
} err_meter;

static void meter_check(err_meter *m, double got, double want, double bound, const char *file, int line) {
    double diff = fabs(got - want);
    if (!(diff <= bound)) {
        fprintf(stderr, "%s:%d: %s: got %.9g, want %.9g, |diff| %.3g > bound %.3g\n", file, line,
                m->name, got, want, diff, bound);
        test_failures++;
    }
    if (bound > 0 && diff / bound > m->worst) m->worst = diff / bound;
    m->n_checked++;
}
#define METER(m, got, want, bound) meter_check(&(m), (got), (want), (bound), __FILE__, __LINE__)

static void meter_report(const err_meter *m) {
    printf("  %-22s %7ld values, worst |diff| / bound = %.3f\n", m->name, m->n_checked, m->worst);
}

static float bits_to_f32(uint32_t b) {
    float f;
    memcpy(&f, &b, sizeof f);
    return f;
}

static uint32_t f32_to_bits(float f) {
    uint32_t b;
    memcpy(&b, &f, sizeof b);
    return b;
}

/* ------------------------------------------------------------------ */
/* fp16 / bf16 conversions                                              */
/* ------------------------------------------------------------------ */

static void test_fp16_hand_cases(void) {
    static const struct {
        float f;
        uint16_t h;
    } exact[] = {
        {0.0f, 0x0000},          {1.0f, 0x3c00},           {-2.0f, 0xc000},
        {0.5f, 0x3800},          {65504.0f, 0x7bff},       {-65504.0f, 0xfbff},
        {0x1p-14f, 0x0400},      /* smallest normal */
        {0x1p-24f, 0x0001},      /* smallest subnormal */
        {0x3ffp-24f, 0x03ff},    /* largest subnormal */
        {-0x3p-24f, 0x8003},     {0x1.004p0f, 0x3c01},     {INFINITY, 0x7c00},
        {-INFINITY, 0xfc00},
    };
    for (size_t i = 0; i < sizeof exact / sizeof exact[0]; i++) {
        CHECK(lmd_f32_to_fp16(exact[i].f) == exact[i].h);
        CHECK(f32_to_bits(lmd_fp16_to_f32(exact[i].h)) == f32_to_bits(exact[i].f));
    }
    CHECK(lmd_f32_to_fp16(-0.0f) == 0x8000);
    CHECK(f32_to_bits(lmd_fp16_to_f32(0x8000)) == 0x80000000u);

    /* round to nearest, ties to even */
    CHECK(lmd_f32_to_fp16(0x1.002p0f) == 0x3c00);          /* 1 + 2^-11: tie, 1 is even */
    CHECK(lmd_f32_to_fp16(0x1.006p0f) == 0x3c02);          /* 1 + 3*2^-11: tie, up to even */
    CHECK(lmd_f32_to_fp16(0x1.002002p0f) == 0x3c01);       /* just above the tie */
    CHECK(lmd_f32_to_fp16(0x1.001ffep0f) == 0x3c00);       /* just below it */
    CHECK(lmd_f32_to_fp16(2047.5f) == 0x6800);             /* tie that carries into the exponent */
    CHECK(lmd_f32_to_fp16(65519.0f) == 0x7bff);            /* below the overflow tie */
    CHECK(lmd_f32_to_fp16(65520.0f) == 0x7c00);            /* the tie: 65504 is odd, so inf */
    CHECK(lmd_f32_to_fp16(1e10f) == 0x7c00);
    CHECK(lmd_f32_to_fp16(-FLT_MAX) == 0xfc00);
    /* subnormal range */
    CHECK(lmd_f32_to_fp16(0x1p-25f) == 0x0000);            /* tie between 0 and 2^-24: 0 */
    CHECK(lmd_f32_to_fp16(0x1.000002p-25f) == 0x0001);     /* above the tie */
    CHECK(lmd_f32_to_fp16(0x3p-25f) == 0x0002);            /* 1.5 * 2^-24: tie, up to even */
    CHECK(lmd_f32_to_fp16(0x5p-25f) == 0x0002);            /* 2.5 * 2^-24: tie, down to even */
    CHECK(lmd_f32_to_fp16(0x7ffp-25f) == 0x0400);          /* 1023.5 * 2^-24: up to the smallest normal */
    CHECK(lmd_f32_to_fp16(0x1p-26f) == 0x0000);
    CHECK(lmd_f32_to_fp16(-0x1p-30f) == 0x8000);           /* underflow keeps the sign */
    CHECK(lmd_f32_to_fp16(FLT_TRUE_MIN) == 0x0000);        /* a float subnormal */
    /* NaN stays NaN (either sign, quiet or signalling) */
    const uint32_t nans[4] = {0x7fc00000u, 0xffc00000u, 0x7f800001u, 0x7fbfffffu};
    for (int i = 0; i < 4; i++) {
        uint16_t h = lmd_f32_to_fp16(bits_to_f32(nans[i]));
        CHECK((h & 0x7c00u) == 0x7c00u && (h & 0x03ffu) != 0);
    }
    CHECK(isnan(lmd_fp16_to_f32(0x7e00)));
    CHECK(isnan(lmd_fp16_to_f32(0xfc01)));
}

static void test_fp16_round_trip_and_nearest(void) {
    /* every fp16 value converts to float and back unchanged */
    for (uint32_t h = 0; h < 0x10000u; h++) {
        float f = lmd_fp16_to_f32((uint16_t)h);
        if ((h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0) {
            CHECK(isnan(f));
            continue;
        }
        if (lmd_f32_to_fp16(f) != h) {
            fprintf(stderr, "fp16 0x%04x -> %.9g -> 0x%04x\n", h, f, lmd_f32_to_fp16(f));
            test_failures++;
        }
    }
    /* random floats in fp16's range go to a nearest fp16, ties to the even one */
    test_rng r = {11};
    for (int i = 0; i < 200000; i++) {
        float mag = ldexpf(test_uniform(&r, 1.0f, 2.0f), (int)test_rand_below(&r, 44) - 27);
        float f = (test_rand_u64(&r) & 1) ? -mag : mag;
        if (fabsf(f) >= 65520.0f) continue;
        uint16_t h = lmd_f32_to_fp16(f);
        double got = lmd_fp16_to_f32(h);
        uint16_t mag_h = h & 0x7fffu, sign = h & 0x8000u;
        double below = mag_h > 0 ? fabs((double)lmd_fp16_to_f32((uint16_t)(mag_h - 1))) : 0.0;
        double above = fabs((double)lmd_fp16_to_f32((uint16_t)(mag_h + 1)));
        double a = fabs((double)f), err = fabs(fabs(got) - a);
        int ok = (sign != 0) == (f < 0.0f) && err <= fabs(a - below) && err <= fabs(above - a);
        if (ok && (err == fabs(a - below) || err == fabs(above - a))) ok = (mag_h & 1u) == 0; /* tie */
        if (!ok) {
            fprintf(stderr, "fp16 of %.9g is 0x%04x (%.9g), not the nearest\n", f, h, got);
            test_failures++;
            break;
        }
    }
}

static void test_bf16(void) {
    CHECK(lmd_f32_to_bf16(1.0f) == 0x3f80);
    CHECK(lmd_f32_to_bf16(-2.0f) == 0xc000);
    CHECK(lmd_f32_to_bf16(0x1.01p0f) == 0x3f80);     /* 1 + 2^-8: tie, 1 is even */
    CHECK(lmd_f32_to_bf16(0x1.03p0f) == 0x3f82);     /* 1 + 3*2^-8: tie, up to even */
    CHECK(lmd_f32_to_bf16(0x1.010002p0f) == 0x3f81);  /* just above the tie */
    CHECK(lmd_f32_to_bf16(0x1.00fffep0f) == 0x3f80); /* just below it */
    CHECK(lmd_f32_to_bf16(FLT_MAX) == 0x7f80);       /* rounds up to inf */
    CHECK(lmd_f32_to_bf16(0x1.fep127f) == 0x7f7f);   /* largest finite bf16 */
    CHECK(lmd_f32_to_bf16(INFINITY) == 0x7f80);
    CHECK(lmd_f32_to_bf16(-INFINITY) == 0xff80);
    CHECK(lmd_f32_to_bf16(-0.0f) == 0x8000);
    /* float subnormals: bf16 has the same exponent range, so they round to bf16 subnormals */
    CHECK(lmd_f32_to_bf16(bits_to_f32(0x00010000u)) == 0x0001);
    CHECK(lmd_f32_to_bf16(bits_to_f32(0x00008000u)) == 0x0000); /* tie: 0 is even */
    CHECK(lmd_f32_to_bf16(bits_to_f32(0x00018000u)) == 0x0002); /* tie: up to even */
    CHECK(lmd_f32_to_bf16(bits_to_f32(0x00008001u)) == 0x0001);
    CHECK(lmd_f32_to_bf16(bits_to_f32(0x007fffffu)) == 0x0080); /* carries into the smallest normal */
    /* NaN stays NaN, also those whose payload lies only in the low 16 bits */
    const uint32_t nans[4] = {0x7fc00000u, 0xffc00000u, 0x7f800001u, 0xff80ffffu};
    for (int i = 0; i < 4; i++) CHECK(isnan(lmd_bf16_to_f32(lmd_f32_to_bf16(bits_to_f32(nans[i])))));
    for (uint32_t b = 0; b < 0x10000u; b++) {
        float f = lmd_bf16_to_f32((uint16_t)b);
        CHECK(f32_to_bits(f) == b << 16); /* exact widening */
        if (!isnan(f) && lmd_f32_to_bf16(f) != b) {
            fprintf(stderr, "bf16 0x%04x -> %.9g -> 0x%04x\n", b, f, lmd_f32_to_bf16(f));
            test_failures++;
        }
    }
    /* random floats go to a nearest bf16, ties to even */
    test_rng r = {12};
    for (int i = 0; i < 200000; i++) {
        uint32_t bits = (uint32_t)test_rand_u64(&r);
        float f = bits_to_f32(bits);
        if (!isfinite(f) || fabsf(f) >= 0x1.fefffep127f) continue;
        uint16_t b = lmd_f32_to_bf16(f);
        double got = lmd_bf16_to_f32(b), a = fabs((double)f);
        uint16_t mag = b & 0x7fffu;
        double below = mag > 0 ? (double)lmd_bf16_to_f32((uint16_t)(mag - 1)) : 0.0;
        double above = lmd_bf16_to_f32((uint16_t)(mag + 1));
        double err = fabs(fabs(got) - a);
        int ok = ((b & 0x8000u) != 0) == ((bits & 0x80000000u) != 0) && err <= a - below &&
                 err <= above - a;
        if (ok && (err == a - below || err == above - a)) ok = (mag & 1u) == 0;
        if (!ok) {
            fprintf(stderr, "bf16 of %a is 0x%04x (%a), not the nearest\n", f, b, got);
            test_failures++;
            break;
        }
    }
}

/* ------------------------------------------------------------------ */
/* Q8_0 quantization                                                    */
/* ------------------------------------------------------------------ */

static float q8_scale(const uint8_t *block) {
    uint16_t h;
    memcpy(&h, block, 2);
    return lmd_fp16_to_f32(h);
}

static void test_q8_0_hand_cases(void) {
    CHECK(LMD_Q8_0_BLOCK == 32 && LMD_Q8_0_BLOCK_BYTES == 34);
    CHECK(lmd_row_bytes(LMD_F32, 5) == 20 && lmd_row_bytes(LMD_BF16, 5) == 10);
    CHECK(lmd_row_bytes(LMD_Q8_0, 64) == 68);
    CHECK(strcmp(lmd_dtype_name(LMD_Q8_0), "q8_0") == 0 && strcmp(lmd_dtype_name(LMD_BF16), "bf16") == 0);

    float x[96];
    uint8_t q[3 * 34];
    /* block 0 all zero; block 1: amax 127 at a negative entry, so the scale is exactly 1;
     * block 2: all equal */
    memset(x, 0, sizeof x);
    const float b1[8] = {-127.0f, 0.4f, 0.6f, -1.7f, 100.2f, 3.0f, -0.3f, 126.6f};
    memcpy(x + 32, b1, sizeof b1);
    for (int j = 64; j < 96; j++) x[j] = 0.25f;
    memset(q, 0xab, sizeof q);
    lmd_quantize_q8_0(q, x, 96);
    /* a zero block gets scale 0 and zero quants */
    CHECK(q[0] == 0 && q[1] == 0);
    for (int j = 0; j < 32; j++) CHECK(q[2 + j] == 0);
    /* block 1 */
    CHECK(q8_scale(q + 34) == 1.0f);
    const int8_t want1[8] = {-127, 0, 1, -2, 100, 3, 0, 127};
    for (int j = 0; j < 8; j++) CHECK((int8_t)q[34 + 2 + j] == want1[j]);
    for (int j = 8; j < 32; j++) CHECK(q[34 + 2 + j] == 0);
    /* block 2: every weight is amax, so every quant is 127 and the scale is fp16(0.25/127) */
    CHECK(q8_scale(q + 68) == lmd_fp16_to_f32(lmd_f32_to_fp16(0.25f / 127.0f)));
    for (int j = 0; j < 32; j++) CHECK((int8_t)q[68 + 2 + j] == 127);

    /* random blocks: max |q| is 127 exactly, and every weight comes back within half a step
     * (plus the fp16 rounding of the scale, at most 2^-11 relative, times 127) */
    test_rng r = {21};
    enum { N = 32 * 64 };
    static float y[N], back[N];
    static uint8_t qb[N / 32 * 34];
    for (int i = 0; i < N; i++) y[i] = test_uniform(&r, -1.0f, 1.0f) * ldexpf(1.0f, (i / 32) % 9 - 4);
    lmd_quantize_q8_0(qb, y, N);
    lmd_matrix m = {qb, LMD_Q8_0, 1, N};
    lmd_matrix_row(back, &m, 0);
    for (int b = 0; b < N / 32; b++) {
        const uint8_t *blk = qb + b * 34;
        float amax = 0.0f;
        int qmax = 0;
        for (int j = 0; j < 32; j++) {
            amax = fmaxf(amax, fabsf(y[b * 32 + j]));
            int v = abs((int)(int8_t)blk[2 + j]);
            qmax = v > qmax ? v : qmax;
        }
        CHECK(qmax == 127);
        double exact_scale = amax / 127.0, stored = q8_scale(blk);
        CHECK(fabs(stored - exact_scale) <= exact_scale * 0x1p-11);
        for (int j = 0; j < 32; j++) {
            double bound = exact_scale * 0.5 * (1 + 1e-6) + 127 * fabs(stored - exact_scale);
            CHECK(fabs((double)back[b * 32 + j] - y[b * 32 + j]) <= bound);
            CHECK(back[b * 32 + j] == (float)stored * (float)(int8_t)blk[2 + j]);
        }
    }
}

/* lmd_quantize_q8_0 (vectorized) against llama.cpp's reference quantizer written out here
 * with fmaxf and roundf: blocks of every magnitude, values at exact halves of a step (ties
 * go away from zero), zero blocks, and blocks holding NaN or inf. */
static void test_quantize_q8_0_against_reference(void) {
    enum { NB = 96, N = NB * 32 };
    static float x[N];
    static uint8_t got[NB * 34];
    test_rng r = {29};
    for (int b = 0; b < NB; b++)
        for (int j = 0; j < 32; j++) {
            float v = test_uniform(&r, -1.0f, 1.0f) * ldexpf(1.0f, (b % 13) * 6 - 40);
            if (b % 4 == 1) v = (float)((j * 5) % 61 - 30) + 0.5f; /* halves of various sizes */
            if (b % 4 == 2) v = j == 0 ? 127.0f : (float)(j - 16) + 0.5f; /* scale 1: exact ties */
            if (b == 3) v = 0.0f;
            x[b * 32 + j] = v;
        }
    x[7 * 32 + 4] = NAN;
    x[11 * 32 + 8] = INFINITY;
    x[15 * 32 + 31] = -INFINITY;
    lmd_quantize_q8_0(got, x, N);
    int mismatches = 0;
    for (int b = 0; b < NB; b++) {
        const float *xb = x + b * 32;
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(xb[j]));
        const float scale = amax / 127.0f;
        float inv = scale != 0.0f ? 1.0f / scale : 0.0f;
        if (!isfinite(inv)) inv = 0.0f;
        const uint16_t want_scale = lmd_f32_to_fp16(scale);
        mismatches += memcmp(got + b * 34, &want_scale, 2) != 0;
        for (int j = 0; j < 32; j++) {
            /* x * inv is NaN for a NaN x, and for an infinite one (its block's scale is inf, inv 0) */
            float q = isnan(xb[j] * inv) ? 0.0f : roundf(xb[j] * inv);
            q = fminf(127.0f, fmaxf(-127.0f, q));
            if ((int8_t)got[b * 34 + 2 + j] != (int8_t)q) {
                fprintf(stderr, "  block %d value %d: %g * %g -> %d, want %d\n", b, j, (double)xb[j], (double)inv,
                        (int8_t)got[b * 34 + 2 + j], (int)q);
                mismatches++;
            }
        }
    }
    if (mismatches) {
        fprintf(stderr, "lmd_quantize_q8_0: %d bytes differ from the reference quantizer\n", mismatches);
        test_failures++;
    }
    /* ties by hand: scale 1, so -14.5 -> -15 and 0.5 -> 1, away from zero */
    CHECK((int8_t)got[2 * 34 + 2 + 1] == -15 && (int8_t)got[2 * 34 + 2 + 16] == 1);
}

/* The packed layout on a hand case: 19 rows (a group of 16 and a short group of 3) of two
 * blocks. Bytes land where ops.h puts them, lmd_matrix_row reads every row back as its own
 * blocks dequantize, and lmd_quantize_matrix_q8_0 equals quantizing rows, then packing. */
static void test_q8_0_packing(void) {
    enum { ROWS = 19, COLS = 64, NB = 2, BYTES = ROWS * NB * 34 };
    static uint8_t blocks[BYTES], packed[BYTES], again[BYTES];
    for (int r = 0; r < ROWS; r++)
        for (int b = 0; b < NB; b++) {
            uint8_t *block = blocks + (r * NB + b) * 34;
            const uint16_t scale = lmd_f32_to_fp16((float)(r + 1) / (float)(b + 2));
            memcpy(block, &scale, 2);
            for (int j = 0; j < 32; j++) block[2 + j] = (uint8_t)(r * 7 + b * 3 + j * 5);
        }
    lmd_pack_q8_0(packed, blocks, ROWS, COLS);
    /* row 5 (group 0, 16 rows), block 1: the group's block 1 starts at 16 * 34 bytes */
    CHECK(memcmp(packed + 16 * 34 + 2 * 5, blocks + (5 * NB + 1) * 34, 2) == 0);
    for (int j = 0; j < 32; j++) CHECK(packed[16 * 34 + 32 + (j / 4) * 64 + 5 * 4 + j % 4] == blocks[(5 * NB + 1) * 34 + 2 + j]);
    /* row 17 (group 1, 3 rows, its second), block 1: group 1 starts at 16 rows x 2 blocks x 34 */
    const int g1 = 16 * NB * 34 + 3 * 34;
    CHECK(memcmp(packed + g1 + 2 * 1, blocks + (17 * NB + 1) * 34, 2) == 0);
    for (int j = 0; j < 32; j++) CHECK(packed[g1 + 6 + (j / 4) * 12 + 1 * 4 + j % 4] == blocks[(17 * NB + 1) * 34 + 2 + j]);
    const lmd_matrix m = {packed, LMD_Q8_0, ROWS, COLS};
    float row[COLS];
    for (int r = 0; r < ROWS; r++) {
        lmd_matrix_row(row, &m, r);
        for (int k = 0; k < COLS; k++) {
            const uint8_t *block = blocks + (r * NB + k / 32) * 34;
            CHECK(row[k] == q8_scale(block) * (float)(int8_t)block[2 + k % 32]);
        }
    }
    test_rng rng = {23};
    static float x[ROWS * COLS];
    test_fill(&rng, x, ROWS * COLS, -3.0f, 3.0f);
    for (int r = 0; r < ROWS; r++) lmd_quantize_q8_0(blocks + r * NB * 34, x + r * COLS, COLS);
    lmd_pack_q8_0(packed, blocks, ROWS, COLS);
    CHECK(lmd_quantize_matrix_q8_0(again, x, ROWS, COLS, NULL) == LMD_OK);
    CHECK(memcmp(packed, again, BYTES) == 0);
}

/* lmd_quantize_input_q8 (vectorized per instruction set) against its definition written
 * out here in scalar C: blocks of every magnitude from 2^-40 to 2^40, exact halves (ties go
 * to even), values at the clamp, zero blocks, and blocks holding NaN or inf. */
static void test_quantize_input_q8(void) {
    enum { NB = 64, N = NB * 32 };
    static float x[N];
    static int8_t q[N];
    static float scale[NB];
    static int32_t corr[NB];
    test_rng r = {27};
    for (int b = 0; b < NB; b++)
        for (int j = 0; j < 32; j++) {
            float v = test_uniform(&r, -1.0f, 1.0f) * ldexpf(1.0f, (b % 9) * 10 - 40);
            if (b % 5 == 1) v = (float)((j * 7) % 33 - 16) + 0.5f; /* halves, amax 16.5 */
            if (b % 5 == 2 && j == 0) v = 127.0f;                  /* scale 1: every half a tie */
            if (b % 5 == 2 && j > 0) v = (float)(j - 16) + 0.5f;
            if (b == 3) v = 0.0f;
            x[b * 32 + j] = v;
        }
    x[7 * 32 + 5] = NAN;
    x[8 * 32 + 9] = INFINITY;
    x[9 * 32 + 30] = -INFINITY;
    lmd_quantize_input_q8(q, scale, corr, x, N);
    for (int b = 0; b < NB; b++) {
        const float *xb = x + b * 32;
        float amax = 0.0f;
        int nan = 0;
        for (int j = 0; j < 32; j++) {
            nan |= isnan(xb[j]);
            if (fabsf(xb[j]) > amax) amax = fabsf(xb[j]);
        }
        const float want_scale = nan ? NAN : amax / 127.0f;
        const float inv = want_scale != 0.0f && isfinite(want_scale) ? 1.0f / want_scale : 0.0f;
        CHECK(memcmp(&scale[b], &want_scale, sizeof want_scale) == 0 || (isnan(scale[b]) && isnan(want_scale)));
        int32_t sum = 0;
        for (int j = 0; j < 32; j++) {
            const float t = isfinite(inv) ? xb[j] * inv : 0.0f;
            float want = isnan(t) ? 0.0f : nearbyintf(t);
            want = want > 127.0f ? 127.0f : want < -127.0f ? -127.0f : want;
            if (q[b * 32 + j] != (int8_t)want) {
                fprintf(stderr, "quantize_input_q8: block %d value %d (%g) -> %d, want %d\n", b, j, (double)xb[j],
                        q[b * 32 + j], (int)want);
                test_failures++;
            }
            sum += (int8_t)want;
        }
        CHECK(corr[b] == -128 * sum);
    }
    /* ties to even, by hand: scale 1, so x itself is rounded */
    CHECK(q[2 * 32 + 0] == 127 && q[2 * 32 + 1] == -14 && q[2 * 32 + 2] == -14 && q[2 * 32 + 3] == -12);
    CHECK(isnan(scale[7]) && isinf(scale[8]) && isinf(scale[9]) && scale[3] == 0.0f && corr[3] == 0);
}

/* lmd_dot_q8_0 on hand cases. Integer inputs whose block maximum is 127 quantize exactly
 * (scale 1), so the result is the exact integer dot product times the weight scales;
 * halves round to even; a NaN or inf input makes the result NaN; zero inputs give 0. */
static void test_dot_q8_0_hand_cases(void) {
    uint8_t w[2 * 34];
    const uint16_t half = lmd_f32_to_fp16(0.5f), two = lmd_f32_to_fp16(2.0f);
    memcpy(w, &half, 2);
    memcpy(w + 34, &two, 2);
    float x[64];
    double want = 0.0;
    for (int j = 0; j < 32; j++) {
        w[2 + j] = (uint8_t)(int8_t)(j - 16);
        w[36 + j] = (uint8_t)(int8_t)(j % 3 - 1);
        x[j] = j == 0 ? 127.0f : (float)(j - 10);
        x[32 + j] = j == 31 ? -127.0f : (float)(3 * j - 40);
        want += 0.5 * (j - 16) * x[j] + 2.0 * (j % 3 - 1) * x[32 + j];
    }
    CHECK(lmd_dot_q8_0(w, x, 64) == (float)want);
    /* 127, 2.5, 3.5, -2.5 -> 127, 2, 4, -2 against weights of 1 (scale 1) */
    uint8_t ones[34];
    const uint16_t one = lmd_f32_to_fp16(1.0f);
    memcpy(ones, &one, 2);
    memset(ones + 2, 0, 32);
    float y[32] = {127.0f, 2.5f, 3.5f, -2.5f};
    for (int j = 0; j < 4; j++) ones[2 + j] = 1;
    CHECK(lmd_dot_q8_0(ones, y, 32) == 131.0f);
    memset(y, 0, sizeof y);
    CHECK(lmd_dot_q8_0(ones, y, 32) == 0.0f);
    y[7] = NAN;
    CHECK(isnan(lmd_dot_q8_0(ones, y, 32)));
    y[7] = INFINITY;
    CHECK(isnan(lmd_dot_q8_0(ones, y, 32)));
}

/* ------------------------------------------------------------------ */
/* matmul                                                               */
/* ------------------------------------------------------------------ */

/* Random (rows, cols) weights in dtype; *w_out gets the matrix, the returned buffer owns its bytes. */
static void *make_matrix(lmd_matrix *w_out, test_rng *r, lmd_dtype dtype, int64_t rows, int64_t cols) {
    float *f = malloc((size_t)(rows * cols) * sizeof(float));
    test_fill(r, f, rows * cols, -1.0f, 1.0f);
    void *data = f;
    if (dtype == LMD_BF16) {
        uint16_t *b = malloc((size_t)(rows * cols) * sizeof(uint16_t));
        for (int64_t i = 0; i < rows * cols; i++) b[i] = lmd_f32_to_bf16(f[i]);
        free(f);
        data = b;
    } else if (dtype == LMD_Q8_0) {
        uint8_t *q = malloc((size_t)rows * lmd_row_bytes(LMD_Q8_0, cols));
        CHECK(lmd_quantize_matrix_q8_0(q, f, rows, cols, NULL) == LMD_OK);
        free(f);
        data = q;
    } else if (dtype == LMD_Q4_0 || dtype == LMD_Q4_1) {
        uint8_t *q = malloc((size_t)rows * lmd_row_bytes(dtype, cols));
        CHECK(lmd_quantize_matrix_q4(q, f, rows, cols, dtype, NULL) == LMD_OK);
        free(f);
        data = q;
    } else if (dtype == LMD_F32_PANELS) {
        float *panels = malloc(lmd_panels_bytes(rows, cols));
        lmd_pack_f32_panels(panels, f, rows, cols);
        free(f);
        data = panels;
    } else if (dtype == LMD_F16_PANELS) {
        uint16_t *h = malloc((size_t)(rows * cols) * sizeof(uint16_t));
        for (int64_t i = 0; i < rows * cols; i++) h[i] = lmd_f32_to_fp16(f[i]);
        uint16_t *panels = malloc(lmd_f16_panels_bytes(rows, cols));
        lmd_pack_f16_panels(panels, h, rows, cols);
        free(f), free(h);
        data = panels;
    } else if (dtype == LMD_BF16_PANELS) {
        uint16_t *b = malloc((size_t)(rows * cols) * sizeof(uint16_t));
        for (int64_t i = 0; i < rows * cols; i++) b[i] = lmd_f32_to_bf16(f[i]);
        void *panels = malloc(lmd_bf16_panels_bytes(rows, cols));
        lmd_pack_bf16_panels(panels, b, rows, cols);
        free(f), free(b);
        data = panels;
    }
    *w_out = (lmd_matrix){data, dtype, rows, cols};
    return data;
}

static void test_matmul_against_naive(void) {
    static const int64_t rows_f[] = {1, 3, 5, 6, 13};
    static const int64_t cols_f[] = {1, 3, 7, 17, 33, 101}; /* none a multiple of 4 */
    static const int64_t cols_q[] = {32, 96, 160};
    const lmd_dtype dtypes[6] = {LMD_Q8_0, LMD_Q4_0, LMD_Q4_1, LMD_F32_PANELS, LMD_BF16_PANELS, LMD_F16_PANELS};
    test_rng r = {31};
    for (int di = 0; di < 6; di++) {
        err_meter m = {NULL, 0, 0};
        char name[32];
        snprintf(name, sizeof name, "matmul %s", lmd_dtype_name(dtypes[di]));
        m.name = name;
        const int blocks = dtypes[di] == LMD_Q8_0 || dtypes[di] == LMD_Q4_0 || dtypes[di] == LMD_Q4_1;
        const int64_t *cols = blocks ? cols_q : cols_f;
        int n_cols = blocks ? 3 : 6;
        for (int ri = 0; ri < 5; ri++)
            for (int ci = 0; ci < n_cols; ci++) {
                const int64_t d = rows_f[ri], n = cols[ci];
                lmd_matrix w;
                void *data = make_matrix(&w, &r, dtypes[di], d, n);
                float *wf = malloc((size_t)(d * n) * sizeof(float));
                for (int64_t i = 0; i < d; i++) lmd_matrix_row(wf + i * n, &w, i);
                for (int B = 1; B <= 9; B++) {
                    float *x = malloc((size_t)(B * n) * sizeof(float));
                    float *x_copy = malloc((size_t)(B * n) * sizeof(float));
                    float *fast = malloc((size_t)(B * d) * sizeof(float));
                    float *naive = malloc((size_t)(B * d) * sizeof(float));
                    test_fill(&r, x, B * n, -2.0f, 2.0f);
                    memcpy(x_copy, x, (size_t)(B * n) * sizeof(float));
                    lmd_matmul(fast, x, &w, B);
                    lmd_matmul_naive(naive, x, &w, B);
                    CHECK(memcmp(x, x_copy, (size_t)(B * n) * sizeof(float)) == 0);
                    for (int b = 0; b < B; b++)
                        for (int64_t i = 0; i < d; i++) {
                            double abs_sum = 0.0;
                            for (int64_t k = 0; k < n; k++) abs_sum += fabs((double)wf[i * n + k] * x[b * n + k]);
                            double want = naive[b * d + i];
                            /* n roundings in the fast sum + 1 for rounding the naive one */
                            METER(m, fast[b * d + i], want, (n + 1) * U * abs_sum + 1e-30);
                        }
                    free(x);
                    free(x_copy);
                    free(fast);
                    free(naive);
                }
                free(wf);
                free(data);
            }
        meter_report(&m);
    }
}

/* Row b of a batch is bit-identical to the same row computed alone (B = 1), at every
 * position of a batch of 7, and with 1 or 2 threads. The sizes put d * n * B above the
 * kernel's threshold for going parallel. */
static void test_matmul_batch_and_thread_invariance(void) {
    const lmd_dtype dtypes[6] = {LMD_Q8_0, LMD_Q4_0, LMD_Q4_1, LMD_F32_PANELS, LMD_BF16_PANELS, LMD_F16_PANELS};
    /* 4 panels + 3 rows, 4 groups of 16 rows + 3 */
    const int64_t cols[6] = {1024, 1024, 1024, 1003, 1003, 1003}, rows = 67;
    const int B = 7;
    test_rng r = {41};
    printf("  openmp %s, %d threads by default, vectors of %d bytes, bf16 products %s\n",
           lmd_built_with_openmp() ? "on" : "off", lmd_get_num_threads(), lmd_vector_bytes(),
           lmd_bf16_uses_amx() ? "in AMX tiles" : lmd_bf16_rounds_inputs() ? "by VDPBF16PS" : "widened to f32");
    for (int di = 0; di < 6; di++) {
        const int64_t n = cols[di], d = rows;
        lmd_matrix w;
        void *data = make_matrix(&w, &r, dtypes[di], d, n);
        float *x = malloc((size_t)(B * n) * sizeof(float));
        float *batch[2], *alone = malloc((size_t)d * sizeof(float));
        test_fill(&r, x, B * n, -1.0f, 1.0f);
        for (int threads = 1; threads <= 2; threads++) {
            lmd_set_num_threads(threads);
            CHECK(lmd_get_num_threads() == (lmd_built_with_openmp() ? threads : 1));
            batch[threads - 1] = malloc((size_t)(B * d) * sizeof(float));
            lmd_matmul(batch[threads - 1], x, &w, B);
        }
        CHECK(memcmp(batch[0], batch[1], (size_t)(B * d) * sizeof(float)) == 0);
        for (int threads = 1; threads <= 2; threads++) {
            lmd_set_num_threads(threads);
            for (int b = 0; b < B; b++) {
                lmd_matmul(alone, x + b * n, &w, 1);
                if (memcmp(alone, batch[0] + b * d, (size_t)d * sizeof(float)) != 0) {
                    fprintf(stderr, "matmul %s: row %d of a batch of %d differs from B=1 (%d threads)\n",
                            lmd_dtype_name(dtypes[di]), b, B, threads);
                    test_failures++;
                }
            }
            /* every batch size from 2 to 9, the row in every position */
            for (int bs = 2; bs <= 9; bs++) {
                float *xs = malloc((size_t)(bs * n) * sizeof(float));
                float *out = malloc((size_t)(bs * d) * sizeof(float));
                test_fill(&r, xs, bs * n, -1.0f, 1.0f);
                int pos = (bs * 5 + threads) % bs;
                memcpy(xs + pos * n, x, (size_t)n * sizeof(float));
                lmd_matmul(out, xs, &w, bs);
                CHECK(memcmp(out + pos * d, batch[0], (size_t)d * sizeof(float)) == 0);
                free(xs);
                free(out);
            }
        }
        lmd_set_num_threads(0);
        free(batch[0]);
        free(batch[1]);
        free(alone);
        free(x);
        free(data);
    }
    /* lmd_set_num_threads(0) restores the default */
    CHECK(lmd_get_num_threads() >= 1);
}

/* Every output of a q8_0 matmul is bit-identical to lmd_dot_q8_0 of its row in llama.cpp's
 * layout: the same blocks, the same FMAs, whichever tile, group of rows or work item
 * produced it. Rows: three groups of 16 and 5 left over, and seven and 5 (chunks of 4
 * groups, whole and short, the last with a short group; two threads' slices of 2 and 2, 4 and
 * 4 groups; with AVX-512, batches of 1-2 meet a chunk's groups in one tile, larger ones
 * pairs of groups, then the remaining 1-2 inputs again all groups);
 * columns: one block, a multiple of 16 blocks, and long rows. */
static void test_matmul_q8_0_equals_dot(void) {
    const int64_t cols_q[5] = {32, 768, 1024, 4096, 4128};
    const lmd_dtype dtypes[3] = {LMD_Q8_0, LMD_Q4_0, LMD_Q4_1};
    /* 70 inputs of 4096 overflow the inputs' L2 budget: groups of 30, 30 and 10 */
    const int batches[4] = {1, 2, 7, 70};
    test_rng r = {43};
    for (int di = 0; di < 3; di++)
        for (int ci = 0; ci < 8; ci++) { /* 117 rows with the first three column counts */
            const lmd_dtype dtype = dtypes[di];
            const int64_t n = cols_q[ci % 5], d = ci < 5 ? 53 : 117;
            float *wf = malloc((size_t)(d * n) * sizeof(float));
            test_fill(&r, wf, d * n, -1.0f, 1.0f);
            const size_t row_bytes = lmd_row_bytes(dtype, n);
            /* rows quantized in llama.cpp's layout, then packed */
            uint8_t *blocks = malloc((size_t)d * row_bytes), *packed = malloc((size_t)d * row_bytes);
            for (int64_t i = 0; i < d; i++) {
                if (dtype == LMD_Q8_0) lmd_quantize_q8_0(blocks + i * row_bytes, wf + i * n, n);
                else lmd_quantize_q4(blocks + i * row_bytes, wf + i * n, n, dtype);
            }
            if (dtype == LMD_Q8_0) lmd_pack_q8_0(packed, blocks, d, n);
            else lmd_pack_q4(packed, blocks, d, n, dtype);
            const lmd_matrix w = {packed, dtype, d, n};
            for (int bi = 0; bi < 4; bi++)
                for (int threads = 1; threads <= 2; threads++) {
                    const int B = batches[bi];
                    lmd_set_num_threads(threads);
                    float *x = malloc((size_t)(B * n) * sizeof(float));
                    float *out = malloc((size_t)(B * d) * sizeof(float));
                    test_fill(&r, x, B * n, -1.0f, 1.0f);
                    lmd_matmul(out, x, &w, B);
                    int mismatches = 0;
                    for (int64_t i = 0; i < d; i++)
                        for (int b = 0; b < B; b++) {
                            const float want = dtype == LMD_Q8_0 ? lmd_dot_q8_0(blocks + i * row_bytes, x + b * n, n)
                                                                 : lmd_dot_q4(blocks + i * row_bytes, x + b * n, n, dtype);
                            mismatches += memcmp(&want, out + b * d + i, sizeof want) != 0;
                        }
                    if (mismatches) {
                        fprintf(stderr, "matmul %s d=%lld n=%lld B=%d threads=%d: %d outputs differ from its dot\n",
                                lmd_dtype_name(dtype), (long long)d, (long long)n, B, threads, mismatches);
                        test_failures++;
                    }
                    free(x);
                    free(out);
                }
            lmd_set_num_threads(0);
            free(wf), free(blocks), free(packed);
        }
}

/* q4_0 and q4_1 blocks by hand and by llama.cpp's formulas, the packed layout, and rows read
 * back. A Q4_0 block of 0, 1, ..., 31 (minus 16): the value of largest magnitude is -16, so
 * d = 2, and x -> min(15, trunc(x / 2 + 8.5)); a Q4_1 block: d = 31 / 15, m = -16. Over
 * random rows, every code is what the formulas give and dequantizes (d * (q - 8), d * q + m)
 * within half a step of the value; 19 rows pack as q8_0's do (a group of 16 and one of 3),
 * lmd_matrix_row reads each row back, and lmd_quantize_matrix_q4 equals quantizing rows,
 * then packing. */
static void test_q4_blocks_and_packing(void) {
    CHECK(lmd_row_bytes(LMD_Q4_0, 64) == 36 && lmd_row_bytes(LMD_Q4_1, 64) == 40);
    CHECK(strcmp(lmd_dtype_name(LMD_Q4_0), "q4_0") == 0 && strcmp(lmd_dtype_name(LMD_Q4_1), "q4_1") == 0);
    float x[32];
    for (int j = 0; j < 32; j++) x[j] = (float)j - 16.0f;
    uint8_t b0[18], b1[20];
    lmd_quantize_q4(b0, x, 32, LMD_Q4_0);
    lmd_quantize_q4(b1, x, 32, LMD_Q4_1);
    uint16_t bits;
    memcpy(&bits, b0, 2);
    CHECK(lmd_fp16_to_f32(bits) == 2.0f);
    for (int j = 0; j < 16; j++) {
        const int lo = (int)((x[j] / 2.0f) + 8.5f), hi = (int)((x[16 + j] / 2.0f) + 8.5f);
        CHECK((b0[2 + j] & 15) == (lo < 15 ? lo : 15) && (b0[2 + j] >> 4) == (hi < 15 ? hi : 15));
    }
    memcpy(&bits, b1 + 2, 2);
    CHECK(lmd_fp16_to_f32(bits) == -16.0f);
    memcpy(&bits, b1, 2);
    CHECK(lmd_fp16_to_f32(bits) == lmd_fp16_to_f32(lmd_f32_to_fp16(31.0f / 15.0f)));
    CHECK((b1[4] & 15) == 0 && (b1[4 + 15] >> 4) == 15); /* the minimum and the maximum */
    /* x * id is rounded to float before + 8.5, as llama.cpp's reference rounds it: 3 and
     * 2.8125 give d = -0.375 and 2.8125 * id = -7.5000001 exactly, -7.5 rounded, so code 1
     * (fused into one FMA with the + 8.5 it was 0.9999999: code 0) */
    memset(x, 0, sizeof x);
    x[0] = 3.0f, x[1] = 2.8125f;
    lmd_quantize_q4(b0, x, 32, LMD_Q4_0);
    memcpy(&bits, b0, 2);
    CHECK(lmd_fp16_to_f32(bits) == -0.375f);
    CHECK((b0[2] & 15) == 0 && (b0[3] & 15) == 1 && (b0[4] & 15) == 8);
    /* Q4_1: min 0, max 3, d = 0.2, id = 5; 0.7f * 5 = 3.49999994 exactly, 3.5 rounded, so
     * 3.5 + 0.5 gives code 4 (fused: 3.99999994, code 3) */
    x[0] = 0.0f, x[1] = 3.0f, x[2] = 0.7f;
    lmd_quantize_q4(b1, x, 32, LMD_Q4_1);
    CHECK((b1[4] & 15) == 0 && (b1[5] & 15) == 15 && (b1[6] & 15) == 4);

    enum { ROWS = 19, COLS = 64, NB = 2 };
    test_rng rng = {29};
    static float w[ROWS * COLS];
    test_fill(&rng, w, ROWS * COLS, -3.0f, 2.0f);
    for (int di = 0; di < 2; di++) {
        const lmd_dtype dtype = di ? LMD_Q4_1 : LMD_Q4_0;
        const int bb = di ? 20 : 18, header = di ? 4 : 2;
        static uint8_t blocks[ROWS * NB * 20], packed[ROWS * NB * 20], again[ROWS * NB * 20];
        for (int r = 0; r < ROWS; r++) lmd_quantize_q4(blocks + r * NB * bb, w + r * COLS, COLS, dtype);
        lmd_pack_q4(packed, blocks, ROWS, COLS, dtype);
        CHECK(lmd_quantize_matrix_q4(again, w, ROWS, COLS, dtype, NULL) == LMD_OK);
        CHECK(memcmp(packed, again, (size_t)(ROWS * NB * bb)) == 0);
        /* row 17 (group 1, 3 rows, its second), block 1: group 1 starts at 16 rows x 2 blocks */
        const int g1 = 16 * NB * bb + 3 * bb;
        const uint8_t *block = blocks + (17 * NB + 1) * bb;
        CHECK(memcmp(packed + g1 + 2 * 1, block, 2) == 0);
        if (di) CHECK(memcmp(packed + g1 + 6 + 2 * 1, block + 2, 2) == 0);
        for (int j = 0; j < 16; j++) CHECK(packed[g1 + 3 * header + (j / 4) * 12 + 1 * 4 + j % 4] == block[header + j]);
        const lmd_matrix m = {packed, dtype, ROWS, COLS};
        float row[COLS];
        for (int r = 0; r < ROWS; r++) {
            lmd_matrix_row(row, &m, r);
            for (int k = 0; k < COLS; k++) {
                const uint8_t *bk = blocks + (r * NB + k / 32) * bb;
                uint16_t d_bits, m_bits = 0;
                memcpy(&d_bits, bk, 2);
                if (di) memcpy(&m_bits, bk + 2, 2);
                const float d = lmd_fp16_to_f32(d_bits), mn = lmd_fp16_to_f32(m_bits);
                const int j = k % 32, q = j < 16 ? bk[header + j] & 15 : bk[header + j - 16] >> 4;
                volatile float product = d * (float)(q - (di ? 0 : 8)); /* rounded, then + m rounded */
                CHECK(row[k] == (di ? product + mn : product));
                /* within half a step (plus the fp16 rounding of d and m) of the value */
                CHECK(fabsf(row[k] - w[r * COLS + k]) <= 0.5f * fabsf(d) + 0.01f);
            }
        }
    }
}

/* lmd_quantize_matrix_q8_0 and lmd_quantize_matrix_q4 refuse what their blocks cannot hold,
 * at the exact threshold: a scale (q4_1: or minimum) that fp16 rounds to infinity (65520, the
 * tie between its largest value 65504 and infinity, rounds up; one float below it rounds to
 * 65504) and non-finite values, naming the row and columns; the row quantizers still write
 * llama.cpp's bytes (an infinite scale) for them. */
static void test_quantize_matrix_limits(void) {
    enum { ROWS = 3, COLS = 64 };
    static float x[ROWS * COLS];
    static uint8_t out[ROWS * 2 * 34];
    uint8_t block[34];
    uint16_t bits;
    lmd_error err;
    /* the value of largest magnitude that makes the scale 65520: q8_0 amax / 127, q4_0 / -8,
     * q4_1 (max - 0) / 15; at row 2, column 40 (block 1), everything else 0 */
    const struct { lmd_dtype dtype; float big; } cases[] = {
        {LMD_Q8_0, 127.0f * 65520.0f}, {LMD_Q4_0, 8.0f * 65520.0f}, {LMD_Q4_1, 15.0f * 65520.0f}};
    for (int c = 0; c < 3; c++) {
        const lmd_dtype dtype = cases[c].dtype;
        for (int sign = -1; sign <= 1; sign += 2) {
            if (dtype == LMD_Q4_1 && sign < 0) continue; /* its minimum would overflow first: below */
            memset(x, 0, sizeof x);
            for (int below = 0; below < 2; below++) {
                const float v = (float)sign * cases[c].big;
                x[2 * COLS + 40] = below ? nextafterf(v, 0.0f) : v;
                memset(&err, 0, sizeof err);
                const lmd_status st = dtype == LMD_Q8_0 ? lmd_quantize_matrix_q8_0(out, x, ROWS, COLS, &err)
                                                        : lmd_quantize_matrix_q4(out, x, ROWS, COLS, dtype, &err);
                if (dtype == LMD_Q8_0) lmd_quantize_q8_0(block, x + 2 * COLS + 32, 32);
                else lmd_quantize_q4(block, x + 2 * COLS + 32, 32, dtype);
                memcpy(&bits, block, 2);
                if (below) {
                    CHECK(st == LMD_OK);
                    CHECK((bits & 0x7fff) == 0x7bff); /* 65504 */
                } else {
                    CHECK(st == LMD_ERR_INVALID_ARG);
                    CHECK_MSG_CONTAINS(err, lmd_dtype_name(dtype));
                    CHECK_MSG_CONTAINS(err, "fp16 block scales (row 2, columns 32 to 63: scale ");
                    CHECK((bits & 0x7fff) == 0x7c00); /* the row quantizer writes llama.cpp's inf */
                }
            }
        }
    }
    /* q4_1's minimum: a block of -65520 (scale 0) is refused, one of the float above it is not */
    for (int below = 0; below < 2; below++) {
        memset(x, 0, sizeof x);
        for (int j = 0; j < 32; j++) x[COLS + j] = below ? nextafterf(-65520.0f, 0.0f) : -65520.0f;
        memset(&err, 0, sizeof err);
        const lmd_status st = lmd_quantize_matrix_q4(out, x, ROWS, COLS, LMD_Q4_1, &err);
        CHECK(st == (below ? LMD_OK : LMD_ERR_INVALID_ARG));
        if (!below) CHECK_MSG_CONTAINS(err, "q4_1's fp16 block minimums (row 1, columns 0 to 31: minimum -65520,");
    }
    /* non-finite values, named by row and column, in every type */
    const lmd_dtype all[] = {LMD_Q8_0, LMD_Q4_0, LMD_Q4_1};
    for (int c = 0; c < 3; c++) {
        memset(x, 0, sizeof x);
        x[1 * COLS + 7] = NAN;
        x[2 * COLS + 50] = INFINITY; /* later: the first one is named */
        memset(&err, 0, sizeof err);
        const lmd_status st = all[c] == LMD_Q8_0 ? lmd_quantize_matrix_q8_0(out, x, ROWS, COLS, &err)
                                                 : lmd_quantize_matrix_q4(out, x, ROWS, COLS, all[c], &err);
        CHECK(st == LMD_ERR_INVALID_ARG);
        CHECK_MSG_CONTAINS(err, "non-finite values cannot be stored as ");
        CHECK_MSG_CONTAINS(err, lmd_dtype_name(all[c]));
        CHECK_MSG_CONTAINS(err, "(row 1, column 7: nan)");
        x[1 * COLS + 7] = 0.0f;
        x[2 * COLS + 50] = -INFINITY;
        CHECK((all[c] == LMD_Q8_0 ? lmd_quantize_matrix_q8_0(out, x, ROWS, COLS, &err)
                                  : lmd_quantize_matrix_q4(out, x, ROWS, COLS, all[c], &err)) == LMD_ERR_INVALID_ARG);
        CHECK_MSG_CONTAINS(err, "(row 2, column 50: -inf)");
    }
}

/* Panels: lmd_pack_f32_panels, lmd_pack_bf16_panels and lmd_pack_f16_panels keep every row
 * (lmd_matrix_row gives it back), and every output of a matmul in panels is, bit for bit,
 * the multiply-add chain of its row and input over each block of 64 columns from 0, the
 * block sums added in order, whichever tile shape, slice of inputs or thread produced it:
 *   f32 and f16 panels, and bf16 ones without bf16 dot products: an FMA per column
 *   (a * b + c, rounded twice, in a build without FMA), halves and bf16 widened exactly;
 *   bf16 with dot products (VDPBF16PS): the inputs rounded to bf16, and per column pair
 *   acc += w[2k+1] x[2k+1], then acc += w[2k] x[2k], each product exact (8-bit
 *   significands) and each sum rounded, as the instruction is specified.
 * bf16 with AMX tiles (lmd_bf16_uses_amx) sums in an order of its own, so there every output
 * must equal, bit for bit, the same row and input multiplied alone (one input, one thread),
 * and lie within the float rounding of n sums of the exact sum of its products.
 * Rows: one, part of a panel, whole panels, and several tiles of them with a ragged last;
 * columns: one, odd (a last pair of one column), less than a block, one, two and a part;
 * inputs: one (decode) to three slices of 64. */
static float panel_chain(const float *w, const float *x, int64_t n, int bf16_dot) {
    float total = 0.0f;
    for (int64_t k0 = 0; k0 < n; k0 += 64) {
        float acc = 0.0f;
        for (int64_t k = k0; k < n && k < k0 + 64; k++) {
            if (bf16_dot) {
                const float xe = lmd_bf16_to_f32(lmd_f32_to_bf16(x[k]));
                const float xo = k + 1 < n ? lmd_bf16_to_f32(lmd_f32_to_bf16(x[k + 1])) : 0.0f;
                const float wo = k + 1 < n ? w[k + 1] : 0.0f;
                volatile float odd = acc + wo * xo; /* rounded: no contraction into one FMA */
                acc = odd + w[k] * xe;
                k++;
                continue;
            }
#if defined(__FMA__) || defined(__AVX512F__)
            acc = fmaf(w[k], x[k], acc);
#else
            acc = w[k] * x[k] + acc;
#endif
        }
        total = k0 == 0 ? acc : total + acc;
    }
    return total;
}

/* Matrices of many rows against batches of hundreds of inputs, where the work items may take
 * wider slices of inputs (AMX's bf16 products: 256 from 8 groups of 64 rows on): every output
 * equals, bit for bit, the same input multiplied alone, on one thread and on two. 531 rows
 * (9 groups and a short panel), 300 inputs (a wide slice and a short one). */
static void test_matmul_wide_batches(void) {
    const lmd_dtype dtypes[3] = {LMD_BF16_PANELS, LMD_F32_PANELS, LMD_F16_PANELS};
    const int64_t d = 531, n = 90;
    const int B = 300;
    test_rng r = {59};
    for (int di = 0; di < 3; di++) {
        lmd_matrix w;
        void *data = make_matrix(&w, &r, dtypes[di], d, n);
        float *x = malloc((size_t)(B * n) * sizeof(float)), *out = malloc((size_t)(B * d) * sizeof(float));
        float *alone = malloc((size_t)(B * d) * sizeof(float));
        test_fill(&r, x, B * n, -1.0f, 1.0f);
        lmd_set_num_threads(1);
        for (int b = 0; b < B; b++) lmd_matmul(alone + (int64_t)b * d, x + (int64_t)b * n, &w, 1);
        for (int threads = 1; threads <= 2; threads++) {
            lmd_set_num_threads(threads);
            lmd_matmul(out, x, &w, B);
            if (memcmp(out, alone, (size_t)(B * d) * sizeof(float)) != 0) {
                fprintf(stderr, "matmul %s: a batch of %d differs from its inputs alone (%d threads)\n",
                        lmd_dtype_name(w.dtype), B, threads);
                test_failures++;
            }
        }
        lmd_set_num_threads(0);
        free(x), free(out), free(alone), free(data);
    }
}

static void test_matmul_panels(void) {
    const int64_t rows[5] = {1, 13, 32, 67, 300}, cols[6] = {1, 7, 64, 128, 172, 201};
    const int batches[6] = {1, 2, 6, 7, 64, 130};
    test_rng r = {53};
    for (int kind = 0; kind <= 2; kind++) /* f32, bf16, f16 */
        for (int ri = 0; ri < 5; ri++)
            for (int ci = 0; ci < 6; ci++) {
                const int64_t d = rows[ri], n = cols[ci], lanes = lmd_vector_bytes() / 4;
                float *wf = malloc((size_t)(d * n) * sizeof(float)), *row = malloc((size_t)n * sizeof(float));
                uint16_t *wb = malloc((size_t)(d * n) * sizeof(uint16_t));
                test_fill(&r, wf, d * n, -1.0f, 1.0f);
                const int bf16 = kind == 1;
                void *panels;
                if (kind == 2) {
                    for (int64_t i = 0; i < d * n; i++) wf[i] = lmd_fp16_to_f32(wb[i] = lmd_f32_to_fp16(wf[i]));
                    panels = malloc(lmd_f16_panels_bytes(d, n));
                    lmd_pack_f16_panels(panels, wb, d, n);
                    CHECK(lmd_f16_panels_bytes(d, n) == (size_t)((d + lanes - 1) / lanes * n * lanes) * 2);
                } else if (bf16) {
                    for (int64_t i = 0; i < d * n; i++) wf[i] = lmd_bf16_to_f32(wb[i] = lmd_f32_to_bf16(wf[i]));
                    panels = malloc(lmd_bf16_panels_bytes(d, n));
                    lmd_pack_bf16_panels(panels, wb, d, n);
                    const int64_t pairs = lmd_bf16_panel_pairs(n);
                    CHECK(pairs >= (n + 1) / 2 && pairs < (n + 1) / 2 + 16);
                    CHECK(lmd_bf16_panels_bytes(d, n) == (size_t)((d + lanes - 1) / lanes * pairs * lanes) * 4);
                } else {
                    panels = malloc(lmd_panels_bytes(d, n));
                    lmd_pack_f32_panels(panels, wf, d, n);
                    CHECK(lmd_panels_bytes(d, n) == (size_t)((d + lanes - 1) / lanes * n * lanes) * sizeof(float));
                }
                const lmd_matrix w = {panels, kind == 2 ? LMD_F16_PANELS : bf16 ? LMD_BF16_PANELS : LMD_F32_PANELS, d, n};
                const int dot = bf16 && lmd_bf16_rounds_inputs(), amx = bf16 && lmd_bf16_uses_amx();
                for (int64_t i = 0; i < d; i++) {
                    lmd_matrix_row(row, &w, i);
                    CHECK(memcmp(row, wf + i * n, (size_t)n * sizeof(float)) == 0);
                }
                for (int bi = 0; bi < 6; bi++)
                    for (int threads = 1; threads <= 2; threads++) {
                        const int B = batches[bi];
                        lmd_set_num_threads(threads);
                        float *x = malloc((size_t)(B * n) * sizeof(float)), *out = malloc((size_t)(B * d) * sizeof(float));
                        test_fill(&r, x, B * n, -1.0f, 1.0f);
                        lmd_matmul(out, x, &w, B);
                        int mismatches = 0;
                        float *alone = malloc((size_t)d * sizeof(float));
                        for (int b = 0; b < B; b++) {
                            if (amx) {
                                lmd_set_num_threads(1);
                                lmd_matmul(alone, x + b * n, &w, 1);
                                lmd_set_num_threads(threads);
                            }
                            for (int64_t i = 0; i < d; i++) {
                                if (!amx) {
                                    const float want = panel_chain(wf + i * n, x + b * n, n, dot);
                                    mismatches += memcmp(&want, out + b * d + i, sizeof want) != 0;
                                    continue;
                                }
                                double exact = 0.0, magnitude = 0.0;
                                for (int64_t k = 0; k < n; k++) {
                                    const double product = (double)wf[i * n + k] * lmd_bf16_to_f32(lmd_f32_to_bf16(x[b * n + k]));
                                    exact += product, magnitude += fabs(product);
                                }
                                mismatches += memcmp(&alone[i], out + b * d + i, sizeof(float)) != 0 ||
                                              fabs(out[b * d + i] - exact) > (double)n * 0x1p-24 * magnitude;
                            }
                        }
                        free(alone);
                        if (mismatches) {
                            fprintf(stderr, "matmul %s d=%lld n=%lld B=%d threads=%d: %d outputs differ from %s\n",
                                    lmd_dtype_name(w.dtype), (long long)d, (long long)n, B, threads, mismatches,
                                    amx ? "the same input alone, or stray from the exact sum" : "the chain");
                            test_failures++;
                        }
                        free(x), free(out);
                    }
                lmd_set_num_threads(0);
                free(wf), free(wb), free(row), free(panels);
            }
}

/* lmd_matmul_scratch (inputs rounded to bf16, or quantized for q8_0, once per call) gives
 * the very bits of lmd_matmul (rounding in every tile; quantizing on the stack in chunks),
 * for every dtype, batch and thread count, and leaves x alone. */
static void test_matmul_scratch_is_identical(void) {
    const lmd_dtype dtypes[6] = {LMD_Q8_0, LMD_Q4_0, LMD_Q4_1, LMD_F32_PANELS, LMD_BF16_PANELS, LMD_F16_PANELS};
    const int64_t cols_f[5] = {31, 64, 100, 768, 4096}, cols_q[5] = {32, 64, 96, 768, 4096};
    /* 70 x 4096 inputs pass in three groups; without scratch, q8_0 quantizes them on the
     * stack 12 at a time */
    const int batches[5] = {1, 3, 7, 20, 70};
    const int64_t d = 13;
    test_rng r = {47};
    for (int di = 0; di < 6; di++)
        for (int ci = 0; ci < 5; ci++) {
            const int blocks = dtypes[di] == LMD_Q8_0 || dtypes[di] == LMD_Q4_0 || dtypes[di] == LMD_Q4_1;
            const int64_t n = blocks ? cols_q[ci] : cols_f[ci];
            lmd_matrix w;
            void *data = make_matrix(&w, &r, dtypes[di], d, n);
            for (int bi = 0; bi < 5; bi++)
                for (int threads = 1; threads <= 2; threads++) {
                    const int B = batches[bi];
                    lmd_set_num_threads(threads);
                    float *x = malloc((size_t)(B * n) * sizeof(float));
                    float *x_copy = malloc((size_t)(B * n) * sizeof(float));
                    float *plain = malloc((size_t)(B * d) * sizeof(float));
                    float *with = malloc((size_t)(B * d) * sizeof(float));
                    void *scratch = malloc(lmd_matmul_scratch_bytes(&w, B) + 1);
                    test_fill(&r, x, B * n, -3.0f, 3.0f);
                    memcpy(x_copy, x, (size_t)(B * n) * sizeof(float));
                    lmd_matmul(plain, x, &w, B);
                    lmd_matmul_scratch(with, x, &w, B, scratch);
                    CHECK(memcmp(x, x_copy, (size_t)(B * n) * sizeof(float)) == 0);
                    if (memcmp(plain, with, (size_t)(B * d) * sizeof(float)) != 0) {
                        fprintf(stderr, "matmul %s n=%lld B=%d threads=%d: scratch changes the result\n",
                                lmd_dtype_name(dtypes[di]), (long long)n, B, threads);
                        test_failures++;
                    }
                    free(x);
                    free(x_copy);
                    free(plain);
                    free(with);
                    free(scratch);
                }
            free(data);
        }
    lmd_set_num_threads(0);
}

static void test_dot_axpy(void) {
    test_rng r = {51};
    err_meter md = {"dot", 0, 0}, ma = {"axpy", 0, 0};
    for (int n = 0; n <= 70; n += (n < 20 ? 1 : 7)) {
        float x[70], y[70], y2[70];
        test_fill(&r, x, n, -1.0f, 1.0f);
        test_fill(&r, y, n, -1.0f, 1.0f);
        double want = 0.0, abs_sum = 0.0;
        for (int k = 0; k < n; k++) {
            want += (double)x[k] * y[k];
            abs_sum += fabs((double)x[k] * y[k]);
        }
        METER(md, lmd_dot(x, y, n), want, n * U * abs_sum + 1e-30);
        memcpy(y2, y, sizeof y2);
        float a = test_uniform(&r, -2.0f, 2.0f);
        lmd_axpy(y2, a, x, n);
        for (int k = 0; k < n; k++) {
            double e = (double)y[k] + (double)a * x[k];
            METER(ma, y2[k], e, 2 * U * (fabs(y[k]) + fabs(a * x[k])));
        }
    }
    meter_report(&md);
    meter_report(&ma);
}

/* ------------------------------------------------------------------ */
/* norms, rope, softmax, activations                                    */
/* ------------------------------------------------------------------ */

static const int sizes[] = {1, 2, 3, 5, 8, 15, 17, 31, 33, 64, 100, 257};
#define N_SIZES ((int)(sizeof sizes / sizeof sizes[0]))

static void test_norms(void) {
    test_rng r = {61};
    err_meter mr = {"rmsnorm", 0, 0}, ml = {"layernorm", 0, 0};
    for (int si = 0; si < N_SIZES; si++) {
        const int n = sizes[si], B = 3;
        float *x = malloc((size_t)(B * n) * sizeof(float)), *x0 = malloc((size_t)(B * n) * sizeof(float));
        float *fast = malloc((size_t)(B * n) * sizeof(float)), *naive = malloc((size_t)(B * n) * sizeof(float));
        float *w = malloc((size_t)n * sizeof(float)), *bias = malloc((size_t)n * sizeof(float));
        test_fill(&r, x, B * n, -3.0f, 3.0f);
        for (int k = 0; k < n; k++) x[n + k] += 5.0f; /* row 1 has a large mean */
        test_fill(&r, w, n, 0.5f, 1.5f);
        test_fill(&r, bias, n, -0.5f, 0.5f);
        memcpy(x0, x, (size_t)(B * n) * sizeof(float));
        const float eps = 1e-5f;

        lmd_rmsnorm(fast, x, w, B, n, eps);
        lmd_rmsnorm_naive(naive, x, w, B, n, eps);
        CHECK(memcmp(x, x0, (size_t)(B * n) * sizeof(float)) == 0);
        /* sum of squares (n roundings), mean, eps, sqrt, division, two products */
        for (int i = 0; i < B * n; i++) METER(mr, fast[i], naive[i], (n / 2.0 + 6) * U * fabs(naive[i]) + 1e-30);
        lmd_rmsnorm(x, x, w, B, n, eps); /* out may alias x */
        CHECK(memcmp(x, fast, (size_t)(B * n) * sizeof(float)) == 0);

        memcpy(x, x0, (size_t)(B * n) * sizeof(float));
        lmd_layernorm(fast, x, w, bias, B, n, eps);
        lmd_layernorm_naive(naive, x, w, bias, B, n, eps);
        CHECK(memcmp(x, x0, (size_t)(B * n) * sizeof(float)) == 0);
        for (int b = 0; b < B; b++) {
            double mean = 0.0, mean_abs = 0.0, var = 0.0;
            for (int k = 0; k < n; k++) mean += x[b * n + k], mean_abs += fabs(x[b * n + k]);
            mean /= n;
            mean_abs /= n;
            for (int k = 0; k < n; k++) var += (x[b * n + k] - mean) * (x[b * n + k] - mean);
            double inv = 1.0 / sqrt(var / n + eps);
            for (int k = 0; k < n; k++) {
                /* the float mean is off by up to (n + 1) u mean|x|, which shifts every centred
                 * value; the variance and the scaling add a relative (n/2 + 6) u */
                double centred = (n + 1) * U * mean_abs + (n / 2.0 + 6) * U * fabs(x[b * n + k] - mean);
                double bound = centred * inv * w[k] + 2 * U * (fabs(naive[b * n + k]) + fabs(bias[k]));
                METER(ml, fast[b * n + k], naive[b * n + k], bound + 1e-30);
            }
        }
        lmd_layernorm(x, x, w, bias, B, n, eps);
        CHECK(memcmp(x, fast, (size_t)(B * n) * sizeof(float)) == 0);
        free(x);
        free(x0);
        free(fast);
        free(naive);
        free(w);
        free(bias);
    }
    meter_report(&mr);
    meter_report(&ml);
}

static void test_rope(void) {
    test_rng r = {71};
    err_meter m = {"rope", 0, 0};
    const int head_sizes[4] = {2, 6, 8, 64}, positions[6] = {0, 1, 2, 17, 1000, 8191};
    const int n_heads = 3;
    for (int hi = 0; hi < 4; hi++) {
        const int hs = head_sizes[hi], n = n_heads * hs;
        float inv_freq[32], x[3 * 64], fast[3 * 64], naive[3 * 64];
        for (int i = 0; i < hs / 2; i++) inv_freq[i] = (float)pow(10000.0, -2.0 * i / hs);
        for (int layout = 0; layout < 2; layout++)
            for (int pi = 0; pi < 6; pi++) {
                test_fill(&r, x, n, -2.0f, 2.0f);
                memcpy(fast, x, sizeof x);
                memcpy(naive, x, sizeof x);
                lmd_rope(fast, n_heads, hs, positions[pi], inv_freq, (lmd_rope_layout)layout);
                lmd_rope_naive(naive, n_heads, hs, positions[pi], inv_freq, (lmd_rope_layout)layout);
                if (positions[pi] == 0) CHECK(memcmp(fast, x, (size_t)n * sizeof(float)) == 0);
                for (int h = 0; h < n_heads; h++)
                    for (int i = 0; i < hs / 2; i++) {
                        int a = layout == LMD_ROPE_ADJACENT ? 2 * i : i;
                        int b = layout == LMD_ROPE_ADJACENT ? 2 * i + 1 : i + hs / 2;
                        float *xh = x + h * hs;
                        /* cosf/sinf within an ulp, two products and a sum */
                        double bound = 5 * U * (fabs(xh[a]) + fabs(xh[b]));
                        METER(m, fast[h * hs + a], naive[h * hs + a], bound);
                        METER(m, fast[h * hs + b], naive[h * hs + b], bound);
                        /* a rotation keeps the pair's length */
                        double before = hypot(xh[a], xh[b]);
                        CHECK_CLOSE(hypot(fast[h * hs + a], fast[h * hs + b]), before, 8 * U * before);
                    }
            }
        /* the two layouts are the same rotation of differently ordered features:
         * adjacent on (x0, x1, x2, x3, ...) = half on (x0, x2, ..., x1, x3, ...) */
        float adj[3 * 64], half[3 * 64];
        test_fill(&r, adj, n, -2.0f, 2.0f);
        for (int h = 0; h < n_heads; h++)
            for (int i = 0; i < hs / 2; i++) {
                half[h * hs + i] = adj[h * hs + 2 * i];
                half[h * hs + i + hs / 2] = adj[h * hs + 2 * i + 1];
            }
        lmd_rope(adj, n_heads, hs, 37, inv_freq, LMD_ROPE_ADJACENT);
        lmd_rope(half, n_heads, hs, 37, inv_freq, LMD_ROPE_HALF);
        for (int h = 0; h < n_heads; h++)
            for (int i = 0; i < hs / 2; i++) {
                CHECK(half[h * hs + i] == adj[h * hs + 2 * i]);
                CHECK(half[h * hs + i + hs / 2] == adj[h * hs + 2 * i + 1]);
            }
    }
    meter_report(&m);
}

// x (n,) <- -inf but at every third entry and the last: masked scores, one at least finite
static void mask_scores(float *x, int n) {
    for (int k = 0; k < n; k++)
        if (k % 3 != 1 && k != n - 1) x[k] = -INFINITY;
}

static void test_softmax(void) {
    test_rng r = {81};
    err_meter m = {"softmax", 0, 0};
    for (int si = 0; si < N_SIZES; si++)
        for (int variant = 0; variant < 4; variant++) {
            const int n = sizes[si];
            float *x = malloc((size_t)n * sizeof(float)), *fast = malloc((size_t)n * sizeof(float));
            float *naive = malloc((size_t)n * sizeof(float));
            float spread = variant == 2 ? 200.0f : 8.0f, offset = variant == 3 ? 1000.0f : 0.0f;
            test_fill(&r, x, n, offset - spread, offset + spread);
            if (variant == 1) mask_scores(x, n);
            memcpy(fast, x, (size_t)n * sizeof(float));
            memcpy(naive, x, (size_t)n * sizeof(float));
            /* the unnormalized form (attention's): e^(x - max), the largest exactly 1, and
             * the factor that lmd_softmax applies */
            float *exps = malloc((size_t)n * sizeof(float)), largest = 0.0f;
            memcpy(exps, x, (size_t)n * sizeof(float));
            const float inv_sum = lmd_softmax_unnormalized(exps, n);
            lmd_softmax(fast, n);
            lmd_softmax_naive(naive, n);
            for (int k = 0; k < n; k++) {
                CHECK(exps[k] * inv_sum == fast[k]);
                largest = exps[k] > largest ? exps[k] : largest;
            }
            CHECK(largest == 1.0f);
            free(exps);
            double sum = 0.0;
            for (int k = 0; k < n; k++) {
                if (x[k] == -INFINITY) CHECK(fast[k] == 0.0f);
                /* exp within 2e-7 relative, a float sum of n terms, one division, one product;
                 * exp is flushed to 0 below -87, where e^x < 1.7e-38 */
                METER(m, fast[k], naive[k], (4e-7 / U + n + 4) * U * naive[k] + 1.7e-38);
                sum += fast[k];
            }
            CHECK_CLOSE(sum, 1.0, (n + 8) * U);
            free(x);
            free(fast);
            free(naive);
        }
    meter_report(&m);
    /* hand cases: one finite entry among -inf gets exactly 1; equal entries exactly 1/n */
    float one[5] = {-INFINITY, -INFINITY, 3.5f, -INFINITY, -INFINITY};
    lmd_softmax(one, 5);
    CHECK(one[0] == 0.0f && one[1] == 0.0f && one[2] == 1.0f && one[3] == 0.0f && one[4] == 0.0f);
    float equal[20];
    for (int k = 0; k < 20; k++) equal[k] = -7.25f;
    lmd_softmax(equal, 20);
    for (int k = 0; k < 20; k++) CHECK(equal[k] == 0.05f);
    float two[2] = {0.0f, (float)log(3.0)}; /* 1/4, 3/4 */
    lmd_softmax(two, 2);
    CHECK_CLOSE(two[0], 0.25, 1e-7);
    CHECK_CLOSE(two[1], 0.75, 1e-7);
}

/* lmd_softmax2_unnormalized, attention's base-2 softmax: 2^(x - max) within 2e-7 relative of
 * a double reference for the float x - max (0 below 2^-126 = 1.2e-38), the largest exactly
 * 1, -inf exactly 0, NaN kept; whole numbers below the maximum give exact powers of two
 * (r = 0), and the sum's reciprocal is returned. */
static void test_softmax2(void) {
    test_rng r = {83};
    err_meter m = {"softmax2", 0, 0};
    for (int si = 0; si < N_SIZES; si++)
        for (int variant = 0; variant < 3; variant++) {
            const int n = sizes[si];
            float *x = malloc((size_t)n * sizeof(float)), *e = malloc((size_t)n * sizeof(float));
            const float spread = variant == 2 ? 300.0f : 12.0f;
            test_fill(&r, x, n, -spread, spread);
            if (variant == 1) mask_scores(x, n);
            memcpy(e, x, (size_t)n * sizeof(float));
            const float inv_sum = lmd_softmax2_unnormalized(e, n);
            double max = -INFINITY, sum = 0.0, largest = 0.0;
            for (int k = 0; k < n; k++) max = x[k] > max ? x[k] : max;
            for (int k = 0; k < n; k++) {
                const double want = exp2((double)(x[k] - (float)max)); /* of the float difference */
                if (x[k] == -INFINITY) CHECK(e[k] == 0.0f);
                METER(m, e[k], want, 2e-7 * want + 1.2e-38);
                largest = e[k] > largest ? e[k] : largest;
                sum += e[k];
            }
            CHECK(largest == 1.0);
            CHECK_CLOSE(1.0 / inv_sum, sum, (n + 2) * U * sum);
            free(x), free(e);
        }
    meter_report(&m);
    float whole[6] = {0.0f, -1.0f, -3.0f, -20.0f, -126.0f, -127.0f};
    lmd_softmax2_unnormalized(whole, 6);
    CHECK(whole[0] == 1.0f && whole[1] == 0.5f && whole[2] == 0.125f && whole[3] == ldexpf(1.0f, -20));
    CHECK(whole[4] == ldexpf(1.0f, -126) && whole[5] == 0.0f);
    float with_nan[3] = {0.0f, NAN, -2.0f};
    lmd_softmax2_unnormalized(with_nan, 3);
    CHECK(isnan(with_nan[1]));
}

static void test_activations(void) {
    test_rng r = {91};
    err_meter ms = {"swiglu", 0, 0}, mg = {"gelu_tanh", 0, 0};
    enum { N = 4099 };
    static float g[N], up[N], fast[N], naive[N], x0[N];
    test_fill(&r, g, N, -12.0f, 12.0f);
    test_fill(&r, up, N, -3.0f, 3.0f);
    g[0] = 0.0f, g[1] = -0.0f, g[2] = -100.0f, g[3] = 100.0f, g[4] = 1e-30f, g[5] = -90.0f;
    memcpy(x0, up, sizeof x0);
    memcpy(fast, g, sizeof fast);
    memcpy(naive, g, sizeof naive);
    lmd_swiglu(fast, up, N);
    lmd_swiglu_naive(naive, up, N);
    CHECK(memcmp(up, x0, sizeof x0) == 0);
    /* the vector exp within 2e-7 (3.4 u) relative, then +, /, and two products: 8 u
     * relative; a tiny absolute slack where silu(g) itself underflows (g << 0) */
    for (int k = 0; k < N; k++) METER(ms, fast[k], naive[k], 8 * U * fabs(naive[k]) + 1e-36);
    CHECK(fast[0] == 0.0f && fast[3] == 100.0f * up[3]);

    test_fill(&r, g, N, -8.0f, 8.0f);
    g[0] = 0.0f, g[1] = -20.0f, g[2] = 20.0f, g[3] = 1e-20f, g[4] = -1e-20f;
    memcpy(fast, g, sizeof fast);
    memcpy(naive, g, sizeof naive);
    lmd_gelu_tanh(fast, N);
    lmd_gelu_tanh_naive(naive, N);
    /* 1 + tanh cancels for x << 0, so the bound is relative to |x|: tanhf is off by about
     * an ulp plus the propagated error of its argument (< 2 u absolute), 1 + t adds u */
    for (int k = 0; k < N; k++) METER(mg, fast[k], naive[k], 3 * U * fabs(g[k]) + 1e-37);
    CHECK(fast[0] == 0.0f && fast[2] == 20.0f && fast[3] == 0.5f * g[3]);
    meter_report(&ms);
    meter_report(&mg);
}

int main(void) {
    test_fp16_hand_cases();
    test_fp16_round_trip_and_nearest();
    test_bf16();
    test_q8_0_hand_cases();
    test_quantize_q8_0_against_reference();
    test_q8_0_packing();
    test_dot_q8_0_hand_cases();
    test_quantize_input_q8();
    test_matmul_against_naive();
    test_matmul_batch_and_thread_invariance();
    test_q4_blocks_and_packing();
    test_quantize_matrix_limits();
    test_matmul_q8_0_equals_dot();
    test_matmul_panels();
    test_matmul_wide_batches();
    test_matmul_scratch_is_identical();
    test_dot_axpy();
    test_norms();
    test_rope();
    test_softmax();
    test_softmax2();
    test_activations();
    return test_report("test_ops");
}
