/*
 * vec.h -- portable SIMD through GCC/Clang vector extensions.
 *
 * LMD_VEC_BYTES follows the widest vector unit the compiler may use (64 with
 * AVX-512, 32 with AVX/AVX2, 16 otherwise: SSE2 on x86-64, NEON on arm64), so
 * the same source compiles to full-width instructions everywhere. Lane order
 * and reduction order are fixed by the source, which keeps every result
 * independent of thread count.
 *
 *     vf acc = vzero();
 *     for (i = 0; i + LMD_VEC_LANES <= n; i += LMD_VEC_LANES) acc += vload(x + i);
 */
#ifndef LMD_VEC_H
#define LMD_VEC_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX__) || defined(__F16C__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define LMD_VEC_BYTES 64
#elif defined(__AVX__)
#define LMD_VEC_BYTES 32
#else
#define LMD_VEC_BYTES 16
#endif
#define LMD_VEC_LANES (LMD_VEC_BYTES / 4) /* float lanes */

typedef float vf __attribute__((vector_size(LMD_VEC_BYTES)));
typedef int32_t vi __attribute__((vector_size(LMD_VEC_BYTES)));
typedef double vd __attribute__((vector_size(LMD_VEC_BYTES)));          /* LANES/2 doubles */
typedef float vf_half __attribute__((vector_size(LMD_VEC_BYTES / 2))); /* LANES/2 floats */

static inline vf vload(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }
/* the first m < LANES floats at p, the other lanes set to pad (loop tails in one vector) */
static inline vf vload_partial(const float *p, int64_t m, float pad) {
#if defined(__AVX512F__)
    /* a masked load: a variable-length memcpy is a library call, around which the
     * caller's vector registers were saved and restored */
    return (vf)_mm512_mask_loadu_ps(_mm512_set1_ps(pad), (__mmask16)((1u << m) - 1u), p);
#elif defined(__AVX__)
    /* VMASKMOVPS, which never touches the masked-off floats (nor faults on them). With a
     * memcpy here the row-major f32 matmul tiles' tails (since replaced by panels) were slower
     * than scalar code (64 x 172 against 511 inputs, AVX2: 182 us with a scalar tail, 235
     * with memcpy, 156 masked) */
    const __m256 in_range = _mm256_cmp_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_ps((float)m), _CMP_LT_OQ);
    return (vf)_mm256_blendv_ps(_mm256_set1_ps(pad), _mm256_maskload_ps(p, _mm256_castps_si256(in_range)), in_range);
#else
    vf v = (vf){0} + pad;
    memcpy(&v, p, (size_t)m * sizeof(float));
    return v;
#endif
}
static inline void vstore_partial(float *p, vf v, int64_t m) {
#if defined(__AVX512F__)
    _mm512_mask_storeu_ps(p, (__mmask16)((1u << m) - 1u), (__m512)v);
#elif defined(__AVX__)
    const __m256 in_range = _mm256_cmp_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_ps((float)m), _CMP_LT_OQ);
    _mm256_maskstore_ps(p, _mm256_castps_si256(in_range), (__m256)v);
#else
    memcpy(p, &v, (size_t)m * sizeof(float));
#endif
}
/* x in every lane: one broadcast instruction, a plain load when x is in memory. (vf){0} + x
 * costs a scalar add first, which the compiler must keep (0 + -0 is +0), and a register
 * shuffle: in the AVX2 f32 panels that was 12 extra operations per 12 multiply-adds. */
static inline vf vbroadcast(float x) {
#if defined(__AVX512F__)
    return (vf)_mm512_set1_ps(x);
#elif defined(__AVX__)
    return (vf)_mm256_set1_ps(x);
#else
    vf v;
    for (int i = 0; i < LMD_VEC_LANES; i++) v[i] = x;
    return v;
#endif
}

/* IEEE half (binary16 bits) -> float, exact */
static inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1fu;
    uint32_t mantissa = h & 0x3ffu;
    uint32_t bits;
    if (exponent == 0x1f) {
        bits = sign | 0x7f800000u | (mantissa << 13); /* inf or NaN */
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
        bits = sign;
    } else { /* subnormal: value = mantissa * 2^-24, exact in float */
        float f = (float)mantissa * 5.9604644775390625e-8f;
        memcpy(&bits, &f, sizeof bits);
        bits |= sign;
    }
    float out;
    memcpy(&out, &bits, sizeof out);
    return out;
#endif
}

/* LANES halves at p, widened (exactly): one VCVTPH2PS where the CPU has it */
static inline vf vload_f16(const uint16_t *p) {
#if defined(__AVX512F__)
    return (vf)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)p));
#elif defined(__F16C__) && LMD_VEC_BYTES == 32
    return (vf)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)p));
#else
    vf v;
    for (int j = 0; j < LMD_VEC_LANES; j++) v[j] = half_to_float(p[j]);
    return v;
#endif
}
/* the first m < LANES halves at p widened, the other lanes 0 */
static inline vf vload_partial_f16(const uint16_t *p, int64_t m) {
    uint16_t h[LMD_VEC_LANES] = {0};
    memcpy(h, p, (size_t)m * sizeof *h);
    return vload_f16(h);
}

/* Keeps a loaded vector in a register (an empty asm that claims to change it): without it
 * GCC folds the load into every instruction that uses the vector, as a memory operand,
 * and a vector used by several FMAs is loaded once per FMA. */
#if defined(__x86_64__) && defined(__GNUC__)
#define IN_REGISTER(v) __asm__("" : "+v"(v))
#else
#define IN_REGISTER(v) ((void)0)
#endif
/* mask lanes are all-ones or zero, as comparisons produce */
static inline vf vselect(vi mask, vf if_true, vf if_false) {
    return (vf)((mask & (vi)if_true) | (~mask & (vi)if_false));
}
/* a where a > b, else b (so b where either is NaN): the semantics of x86's MAXPS, which
 * has a 2-cycle latency where the compare-and-select took 6 in a running maximum */
static inline vf vmax(vf a, vf b) {
#if defined(__AVX512F__)
    return (vf)_mm512_max_ps((__m512)a, (__m512)b);
#elif defined(__AVX__)
    return (vf)_mm256_max_ps((__m256)a, (__m256)b);
#else
    return vselect(a > b, a, b);
#endif
}

/* True if any lane of a comparison mask is set. */
static inline int vany(vi mask) {
#if defined(__AVX512F__)
    __m512i m;
    memcpy(&m, &mask, sizeof m);
    return _mm512_test_epi32_mask(m, m) != 0;
#elif defined(__AVX__)
    __m256i m;
    memcpy(&m, &mask, sizeof m);
    return !_mm256_testz_si256(m, m);
#else
    int32_t any = 0;
    for (int j = 0; j < LMD_VEC_LANES; j++) any |= mask[j];
    return any != 0;
#endif
}

/* Sum of the lanes by a fixed pairwise tree (same order on every call): lane j
 * plus lane j + LANES/2, then j + LANES/4, ... Each level adds the two halves of
 * the vector, which compiles to one extract and one add. Shuffles, not memcpy of the
 * halves: taking the vector's address kept a caller's loop accumulator in memory. */
typedef float lmd_v8f_ __attribute__((vector_size(32)));
typedef float lmd_v4f_ __attribute__((vector_size(16)));
typedef float lmd_v2f_ __attribute__((vector_size(8)));
static inline float vhsum(vf v) {
#if LMD_VEC_BYTES == 64
    const lmd_v8f_ v8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                        __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    const lmd_v4f_ v4 = __builtin_shufflevector(v8, v8, 0, 1, 2, 3) + __builtin_shufflevector(v8, v8, 4, 5, 6, 7);
#elif LMD_VEC_BYTES == 32
    const lmd_v4f_ v4 = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
#else
    const lmd_v4f_ v4 = v;
#endif
    const lmd_v2f_ v2 = __builtin_shufflevector(v4, v4, 0, 1) + __builtin_shufflevector(v4, v4, 2, 3);
    return v2[0] + v2[1];
}

static inline float vhmax(vf v) {
#if defined(__AVX512F__)
    return _mm512_reduce_max_ps((__m512)v); /* a shuffle tree, not fifteen dependent steps */
#else
    float m = v[0];
    for (int j = 1; j < LMD_VEC_LANES; j++) m = v[j] > m ? v[j] : m;
    return m;
#endif
}

/* Adds the LANES floats of v, widened to double, into two double accumulators. */
static inline void vaccumulate_double(vd *acc_lo, vd *acc_hi, vf v) {
    vf_half lo, hi;
    memcpy(&lo, &v, sizeof lo);
    memcpy(&hi, (char *)&v + sizeof lo, sizeof hi);
    *acc_lo += __builtin_convertvector(lo, vd);
    *acc_hi += __builtin_convertvector(hi, vd);
}
static inline double vsum_double(vd lo, vd hi) {
    double s = 0.0;
    for (int j = 0; j < LMD_VEC_LANES / 2; j++) s += lo[j] + hi[j];
    return s;
}

/* The exponentials below share their ends: x clamped below at the least exponent whose power
 * of two is normal (NaN stays NaN), and p 2^n, exact, with the lanes below the clamp set to
 * 0. With AVX-512, a max for the clamp and VSCALEFPS, zero-masked, for the product. */
#if defined(__AVX512F__)
typedef __mmask16 lmd_in_range;
#else
typedef vi lmd_in_range;
#endif

// x with every lane below lo raised to lo; *in_range marks the lanes that were not below it
static inline vf clamp_below(vf x, float lo, lmd_in_range *in_range) {
#if defined(__AVX512F__)
    *in_range = _mm512_cmp_ps_mask((__m512)x, _mm512_set1_ps(lo), _CMP_NLT_UQ);
    return (vf)_mm512_max_ps(_mm512_set1_ps(lo), (__m512)x); /* NaN stays NaN */
#else
    *in_range = ~(x < lo);
    return vselect(*in_range, x, vbroadcast(lo));
#endif
}

// p 2^n (n whole, 2^n normal) in the lanes in range, 0 in the others
static inline vf scale_in_range(vf p, vf n, lmd_in_range in_range) {
#if defined(__AVX512F__)
    return (vf)_mm512_maskz_scalef_ps(in_range, (__m512)p, (__m512)n);
#else
    vi two_to_n = (__builtin_convertvector(n, vi) + 127) << 23;
    vf y = p * (vf)two_to_n;
    return (vf)(in_range & (vi)y);
#endif
}

/* e^x for x <= 0 (and x = -inf, which gives 0). Cody-Waite range reduction
 * to r in [-ln2/2, ln2/2] and a degree-6 Taylor polynomial: relative error
 * below 2e-7, exact 0 below -87 (where float e^x would be subnormal). */
static inline vf vexp_nonpositive(vf x) {
    lmd_in_range in_range;
    const vf xc = clamp_below(x, -87.0f, &in_range);
    vf n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(x / ln2) */
    vf r = xc - n * 0.693145751953125f;                              /* ln2 high part */
    r = r - n * 1.428606765330187045e-06f;                           /* ln2 low part */
    vf p = vbroadcast(1.0f / 720.0f);
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return scale_in_range(p, n, in_range);
}

/* 2^x for x <= 0, by vexp_nonpositive's method without its range reduction: x = n + r
 * exactly, n = round(x), |r| <= 1/2, and 2^r = 1 + r q(r), q of degree 5 fitted (weighted
 * least squares) for the least relative error on [-1/2, 1/2], 2e-9 before rounding and
 * 1.6 ulp (9.7e-8) evaluated in float; then 2^n exactly.
 * 0 below -126 (2^-126 = 1.2e-38), NaN stays NaN. Attention's softmax works in base 2 (its
 * queries carry the factor log2 e): three multiply-adds fewer than e^x. */
static inline vf vexp2_nonpositive(vf x) {
    lmd_in_range in_range;
    const vf xc = clamp_below(x, -126.0f, &in_range);
    vf n = (xc + 12582912.0f) - 12582912.0f; /* round to nearest */
    vf r = xc - n;                           /* exact */
    vf p = vbroadcast(1.5353360993027726e-4f);
    p = p * r + 1.3398875248440967e-3f;
    p = p * r + 9.618437368095915e-3f;
    p = p * r + 5.550332468780221e-2f;
    p = p * r + 0.2402264791346233f;
    p = p * r + 0.6931472028563587f;
    p = p * r + 1.0f;
    return scale_in_range(p, n, in_range);
}

/* Scalar twin of vexp_nonpositive, bit-identical lane for lane, for loop tails. */
static inline float exp_nonpositive(float x) {
    vf v = vexp_nonpositive(vbroadcast(x));
    return v[0];
}

#endif /* LMD_VEC_H */
