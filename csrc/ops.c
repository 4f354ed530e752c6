/* ops.c -- kernels of the forward pass (contracts in ops.h). */
#include "ops.h"

#include "lmdecode.h"
#include "vec.h"

#include <math.h>
#include <string.h>

#if defined(__AVX512F__) || defined(__AVX2__) || defined(__FMA__) || defined(__F16C__)
#include <immintrin.h>
#endif

/* ------------------------------------------------------------------ */
/* scalar conversions                                                   */
/* ------------------------------------------------------------------ */

/* Inlined into the kernels: an out-of-line call per Q8_0 block would spill every
 * vector accumulator around it. */
static inline float fp16_to_f32(uint16_t h) {
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

float lmd_fp16_to_f32(uint16_t h) { return fp16_to_f32(h); }

uint16_t lmd_f32_to_fp16(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t abs_bits = x & 0x7fffffffu;
    if (abs_bits > 0x7f800000u) return sign | 0x7e00u; /* NaN */
    if (abs_bits >= 0x477ff000u) return sign | 0x7c00u; /* rounds to >= 65520: inf */
    if (abs_bits < 0x38800000u) {                       /* below 2^-14: fp16 subnormal or zero */
        float a;
        memcpy(&a, &abs_bits, sizeof a);
        /* a / 2^-24, rounded to nearest even by the float addition */
        float scaled = a * 16777216.0f;
        float rounded = (scaled + 8388608.0f) - 8388608.0f;
        return sign | (uint16_t)rounded;
    }
    uint32_t mantissa_round = abs_bits + 0xfffu + ((abs_bits >> 13) & 1u);
    return sign | (uint16_t)((mantissa_round - 0x38000000u) >> 13);
}

float lmd_bf16_to_f32(uint16_t b) {
    uint32_t bits = (uint32_t)b << 16;
    float out;
    memcpy(&out, &bits, sizeof out);
    return out;
}

uint16_t lmd_f32_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u); /* quiet NaN */
    x += 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}

size_t lmd_row_bytes(lmd_dtype dtype, int64_t cols) {
    switch (dtype) {
    case LMD_F32: return (size_t)cols * 4;
    case LMD_BF16: return (size_t)cols * 2;
    case LMD_Q8_0: return (size_t)(cols / LMD_Q8_0_BLOCK) * LMD_Q8_0_BLOCK_BYTES;
    }
    return 0;
}

const char *lmd_dtype_name(lmd_dtype dtype) {
    switch (dtype) {
    case LMD_F32: return "f32";
    case LMD_BF16: return "bf16";
    case LMD_Q8_0: return "q8_0";
    }
    return "?";
}

void lmd_quantize_q8_0(uint8_t *out, const float *x, int64_t n) {
    for (int64_t b = 0; b < n / LMD_Q8_0_BLOCK; b++) {
        const float *xb = x + b * LMD_Q8_0_BLOCK;
        uint8_t *ob = out + b * LMD_Q8_0_BLOCK_BYTES;
        float amax = 0.0f;
        for (int j = 0; j < LMD_Q8_0_BLOCK; j++) amax = fmaxf(amax, fabsf(xb[j]));
        float scale = amax / 127.0f;
        float inv = scale != 0.0f ? 1.0f / scale : 0.0f;
        if (!isfinite(inv)) inv = 0.0f; /* amax below ~4e-37: the fp16 scale is 0 anyway */
        uint16_t scale_bits = lmd_f32_to_fp16(scale);
        memcpy(ob, &scale_bits, 2);
        for (int j = 0; j < LMD_Q8_0_BLOCK; j++) {
            float q = isnan(xb[j]) ? 0.0f : roundf(xb[j] * inv);
            q = fminf(127.0f, fmaxf(-127.0f, q));
            ob[2 + j] = (uint8_t)(int8_t)q;
        }
    }
}

void lmd_matrix_row(float *out, const lmd_matrix *w, int64_t r) {
    const uint8_t *row = (const uint8_t *)w->data + (size_t)r * lmd_row_bytes(w->dtype, w->cols);
    switch (w->dtype) {
    case LMD_F32: memcpy(out, row, (size_t)w->cols * 4); break;
    case LMD_BF16:
        for (int64_t k = 0; k < w->cols; k++) {
            uint16_t b;
            memcpy(&b, row + 2 * k, 2);
            out[k] = lmd_bf16_to_f32(b);
        }
        break;
    case LMD_Q8_0:
        for (int64_t b = 0; b < w->cols / LMD_Q8_0_BLOCK; b++) {
            const uint8_t *blk = row + b * LMD_Q8_0_BLOCK_BYTES;
            uint16_t scale_bits;
            memcpy(&scale_bits, blk, 2);
            float scale = fp16_to_f32(scale_bits);
            for (int j = 0; j < LMD_Q8_0_BLOCK; j++)
                out[b * LMD_Q8_0_BLOCK + j] = scale * (float)(int8_t)blk[2 + j];
        }
        break;
    }
}

/* ------------------------------------------------------------------ */
/* vector helpers private to the kernels                                */
/* ------------------------------------------------------------------ */

typedef uint16_t vu16 __attribute__((vector_size(LMD_VEC_LANES * 2)));
typedef uint32_t vu32 __attribute__((vector_size(LMD_VEC_BYTES)));
typedef int8_t vi8 __attribute__((vector_size(LMD_VEC_LANES)));

/* a * b + c with one rounding where the ISA has FMA (ISO C mode does not contract). */
static inline vf vzero_f(void) { return (vf){0}; }

static inline vf vfma(vf a, vf b, vf c) {
#if defined(__AVX512F__) && LMD_VEC_BYTES == 64
    return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__) && LMD_VEC_BYTES == 32
    return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    return a * b + c;
#endif
}

static inline float vsum(vf v) { return vhsum(v); }

/* LANES bfloat16 values -> floats (exact) */
static inline vf vload_bf16(const uint8_t *p) {
    vu16 h;
    memcpy(&h, p, sizeof h);
    vu32 w = __builtin_convertvector(h, vu32) << 16;
    return (vf)w;
}

/* LANES int8 values -> floats (exact). GCC scalarizes a vector-extension
 * conversion from int8 lanes, so the sign extension uses the ISA's instruction. */
static inline vf vload_i8(const uint8_t *p) {
#if defined(__AVX512F__) && LMD_VEC_BYTES == 64
    __m512i wide = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(const void *)p));
    return (vf)_mm512_cvtepi32_ps(wide);
#elif defined(__AVX2__) && LMD_VEC_BYTES == 32
    __m256i wide = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(const void *)p));
    return (vf)_mm256_cvtepi32_ps(wide);
#else
    vf out;
    for (int j = 0; j < LMD_VEC_LANES; j++) out[j] = (float)(int8_t)p[j];
    return out;
#endif
}

float lmd_dot(const float *x, const float *y, int n) {
    vf acc = vzero_f();
    int k = 0;
    for (; k + LMD_VEC_LANES <= n; k += LMD_VEC_LANES) acc = vfma(vload(x + k), vload(y + k), acc);
    float s = vsum(acc);
    for (; k < n; k++) s += x[k] * y[k];
    return s;
}

void lmd_axpy(float *y, float a, const float *x, int n) {
    vf av = vbroadcast(a);
    int k = 0;
    for (; k + LMD_VEC_LANES <= n; k += LMD_VEC_LANES) vstore(y + k, vfma(av, vload(x + k), vload(y + k)));
    for (; k < n; k++) y[k] += a * x[k];
}

/* ------------------------------------------------------------------ */
/* matmul                                                               */
/* ------------------------------------------------------------------ */

/* A tile is nr weight rows x nc batch rows of outputs, each with its own vector
 * accumulator held in a register: every step over k loads nr weight vectors and
 * nc input vectors for nr * nc FMAs. The tile kernels are always inlined with
 * constant nr and nc (see row_block below), so the accumulators never spill.
 * Every accumulator sums its own (row, batch row) pair over k in the same
 * order whatever the tile shape, batch size or thread count, so a batch row's
 * result is bit-identical alone or inside any batch. */
#define MAX_TILE_R 8
#define MAX_TILE_C 6
#define ROW_BLOCK 8 /* weight rows per parallel work item */

/* Bytes of L1 a tile's working set may take (L1d is 32-48 KB on current x86 cores). */
#define L1_BUDGET (40 * 1024)

#define ALWAYS_INLINE inline __attribute__((always_inline))

/* Weight rows are streamed from memory once per call: each tile prefetches the
 * same offsets of the rows one row block (ROW_BLOCK rows) further on, which the
 * next work item will read (rows of a few hundred bytes are too short for the
 * hardware prefetchers to learn). Returns that distance in weights, or 0 (the
 * tile's own data, harmless) when the next block would run past the matrix. */
#define PREFETCH_AHEAD(r0, nr, d, n) ((r0) + (nr) + ROW_BLOCK <= (d) ? (int64_t)ROW_BLOCK * (n) : 0)

/* Keeps a loaded input vector in a register. Left alone, GCC folds the load into every
 * FMA that uses it as a memory operand, so a 4 x 6 tile issued 24 input loads per step
 * instead of 6 and became load-bound (+14% for 256-token batches, 1.6 x faster for 4
 * tokens through 2048 columns with the empty asm). */
#if defined(__x86_64__) && defined(__GNUC__)
#define IN_REGISTER(v) __asm__("" : "+v"(v))
#else
#define IN_REGISTER(v) ((void)0)
#endif

#if defined(__AVX512F__) && LMD_VEC_BYTES == 64
#define LMD_SUM4 1
/* vsum of four vectors at once, by the same tree: lane j + lane j+8, then + j+4, + j+2,
 * + j+1. Whole-register shuffles serve all four, so a 4 x 6 tile's 24 totals take 6
 * of these instead of 24 separate reductions. */
static inline __m128 sum4(vf a_, vf b_, vf c_, vf d_) {
    const __m512 a = (__m512)a_, b = (__m512)b_, c = (__m512)c_, d = (__m512)d_;
    /* 128-bit quarters: ab = (a0+a2, a1+a3, b0+b2, b1+b3), cd likewise */
    const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
    /* quarter i holds input i's four-lane partial: (a0+a2)+(a1+a3), ... */
    const __m512 q = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
    const __m512 pairs = _mm512_add_ps(q, _mm512_permute_ps(q, 0x4E));          /* lanes j + j+2 */
    const __m512 totals = _mm512_add_ps(pairs, _mm512_permute_ps(pairs, 0xB1)); /* lanes j + j+1 */
    const __m512i lanes_0_4_8_12 = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_castps512_ps128(_mm512_permutexvar_ps(lanes_0_4_8_12, totals));
}

// out[(c0 + c) * d + r0 + r] = lane total of acc[r][c] for r < nr (a multiple of 4), c < nc:
// four rows of one input side by side in the output
static ALWAYS_INLINE void store_totals4(float *out, vf acc[MAX_TILE_R][MAX_TILE_C], int64_t d, int64_t r0, int nr,
                                        int c0, int nc) {
    for (int r = 0; r < nr; r += 4)
        for (int c = 0; c < nc; c++)
            _mm_storeu_ps(out + (int64_t)(c0 + c) * d + r0 + r,
                          sum4(acc[r][c], acc[r + 1][c], acc[r + 2][c], acc[r + 3][c]));
}
#else
#define LMD_SUM4 0
#endif

// rows r0..r0+nr of W (d,n) f32, w_rows (nr,n) pointing at row r0, against batch rows
// c0..c0+nc of x (B,n) -> out (B,d); prefetches prefetch_bytes beyond each row read
static ALWAYS_INLINE void tile_f32_rows(float *out, const float *x, const float *w_rows,
                                        int64_t prefetch_bytes, int64_t n, int64_t d, int64_t r0, int nr,
                                        int c0, int nc) {
    vf acc[MAX_TILE_R][MAX_TILE_C];
    /* One pointer per row and per input, stepped together: with the prefetch distance as
     * a byte offset from the row pointers, 4 x 6 tiles need no more integer registers than
     * x86-64 has (the compiler spilled the vector inputs to the stack otherwise). */
    const float *wp[MAX_TILE_R], *xp[MAX_TILE_C];
    for (int r = 0; r < nr; r++) {
        wp[r] = w_rows + r * n;
        for (int c = 0; c < nc; c++) acc[r][c] = vzero_f();
    }
    for (int c = 0; c < nc; c++) xp[c] = x + (int64_t)(c0 + c) * n;
    const int64_t nv = n - n % LMD_VEC_LANES;
    for (int64_t k = 0; k < nv; k += LMD_VEC_LANES) {
        vf wv[MAX_TILE_R];
        for (int r = 0; r < nr; r++) {
            if (prefetch_bytes != 0) __builtin_prefetch((const char *)wp[r] + prefetch_bytes);
            wv[r] = vload(wp[r]);
            wp[r] += LMD_VEC_LANES;
        }
        for (int c = 0; c < nc; c++) {
            vf xv = vload(xp[c]);
            IN_REGISTER(xv);
            xp[c] += LMD_VEC_LANES;
            for (int r = 0; r < nr; r++) acc[r][c] = vfma(wv[r], xv, acc[r][c]);
        }
    }
#if LMD_SUM4
    if (nr % 4 == 0 && nv == n) {
        store_totals4(out, acc, d, r0, nr, c0, nc);
        return;
    }
#endif
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < nc; c++) {
            float s = vsum(acc[r][c]);
            const float *wr = w_rows + r * n;
            const float *xc = x + (int64_t)(c0 + c) * n;
            for (int64_t k = nv; k < n; k++) s += wr[k] * xc[k];
            out[(int64_t)(c0 + c) * d + r0 + r] = s;
        }
}

static ALWAYS_INLINE void tile_f32(float *out, const float *x, const uint16_t *xb, const uint8_t *w, int64_t n,
                                   int64_t d, int64_t r0, int nr, int c0, int nc) {
    (void)xb;
    tile_f32_rows(out, x, (const float *)(const void *)w + r0 * n,
                  (int64_t)sizeof(float) * PREFETCH_AHEAD(r0, nr, d, n), n, d, r0, nr, c0, nc);
}

// s + sum of bf16 row wr (n,) times float xc (n,) over k in [from, n): the inputs a
// vector step did not cover
static inline float bf16_tail_sum(float s, const uint8_t *wr, const float *xc, int64_t from, int64_t n) {
    for (int64_t k = from; k < n; k++) {
        uint16_t b;
        memcpy(&b, wr + 2 * k, 2);
        s += lmd_bf16_to_f32(b) * xc[k];
    }
    return s;
}

#if defined(__AVX512BF16__) && LMD_VEC_BYTES == 64
#define LMD_BF16_DOT 1
/* bf16 weights with the CPU's bf16 dot products (VDPBF16PS): the inputs are rounded to
 * bf16 (nearest even), 32 at a time, and each instruction adds 32 products into 16
 * float lanes, twice the multiply-adds of a float FMA. llama.cpp multiplies bf16
 * weights the same way. The last n % 32 inputs stay float. */
// x (32,) floats -> 32 bf16 (nearest even), as the dot products take them: the one rounding
// both the tiles and round_inputs_bf16 use, so pre-rounded inputs are the same bits
static inline __m512bh round_bf16x32(const float *x) {
    return _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + 16), _mm512_loadu_ps(x));
}

// the k steps of a bf16 tile into acc; inputs from xb (B, n32) already rounded, or rounded here
static ALWAYS_INLINE void bf16_steps(__m512 acc[MAX_TILE_R][MAX_TILE_C], const float *x, const uint16_t *xb,
                                     const uint8_t *w, int64_t n, int64_t n32, int64_t r0, int nr, int c0, int nc,
                                     int64_t prefetch_ahead, const int rounded) {
    for (int64_t k = 0; k < n32; k += 32) {
        __m512bh xv[MAX_TILE_C];
        for (int c = 0; c < nc; c++) {
            if (rounded) {
                xv[c] = (__m512bh)_mm512_loadu_si512((const void *)(xb + (int64_t)(c0 + c) * n32 + k));
            } else {
                xv[c] = round_bf16x32(x + (int64_t)(c0 + c) * n + k);
            }
        }
        for (int r = 0; r < nr; r++) {
            const uint8_t *wr = w + ((r0 + r) * n + k) * 2;
            __builtin_prefetch(wr + prefetch_ahead);
            __m512bh wv = (__m512bh)_mm512_loadu_si512((const void *)wr);
            for (int c = 0; c < nc; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], wv, xv[c]);
        }
    }
}

static ALWAYS_INLINE void tile_bf16(float *out, const float *x, const uint16_t *xb, const uint8_t *w, int64_t n,
                                    int64_t d, int64_t r0, int nr, int c0, int nc) {
    __m512 acc[MAX_TILE_R][MAX_TILE_C];
    const int64_t prefetch_ahead = 2 * PREFETCH_AHEAD(r0, nr, d, n);
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < nc; c++) acc[r][c] = _mm512_setzero_ps();
    const int64_t n32 = n - n % 32;
    if (xb != NULL) bf16_steps(acc, x, xb, w, n, n32, r0, nr, c0, nc, prefetch_ahead, 1);
    else bf16_steps(acc, x, xb, w, n, n32, r0, nr, c0, nc, prefetch_ahead, 0);
    /* __m512 and vf are the same 16 floats (the loop above compiles best on __m512) */
    vf (*const totals)[MAX_TILE_C] = (vf (*)[MAX_TILE_C])(void *)acc;
    if (n32 == n && nr % 4 == 0) {
        store_totals4(out, totals, d, r0, nr, c0, nc);
        return;
    }
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < nc; c++)
            out[(int64_t)(c0 + c) * d + r0 + r] =
                bf16_tail_sum(vsum(totals[r][c]), w + (r0 + r) * n * 2, x + (int64_t)(c0 + c) * n, n32, n);
}
#else
#define LMD_BF16_DOT 0
static ALWAYS_INLINE void tile_bf16(float *out, const float *x, const uint16_t *xb, const uint8_t *w, int64_t n,
                                    int64_t d, int64_t r0, int nr, int c0, int nc) {
    (void)xb;
    vf acc[MAX_TILE_R][MAX_TILE_C];
    const int64_t prefetch_ahead = 2 * PREFETCH_AHEAD(r0, nr, d, n);
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < nc; c++) acc[r][c] = vzero_f();
    int64_t nv = n - n % LMD_VEC_LANES;
    for (int64_t k = 0; k < nv; k += LMD_VEC_LANES) {
        vf xv[MAX_TILE_C];
        for (int c = 0; c < nc; c++) xv[c] = vload(x + (int64_t)(c0 + c) * n + k);
        for (int r = 0; r < nr; r++) {
            if (k % 32 == 0) __builtin_prefetch(w + ((r0 + r) * n + k) * 2 + prefetch_ahead);
            vf wv = vload_bf16(w + ((r0 + r) * n + k) * 2);
            for (int c = 0; c < nc; c++) acc[r][c] = vfma(wv, xv[c], acc[r][c]);
        }
    }
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < nc; c++) {
            out[(int64_t)(c0 + c) * d + r0 + r] =
                bf16_tail_sum(vsum(acc[r][c]), w + (r0 + r) * n * 2, x + (int64_t)(c0 + c) * n, nv, n);
        }
}
#endif

int lmd_bf16_rounds_inputs(void) { return LMD_BF16_DOT; }

#if LMD_BF16_DOT
// x (B, n) -> xb (B, n - n % 32): each input rounded to bf16 once, as tile_bf16 rounds it
static void round_inputs_bf16(uint16_t *xb, const float *x, int B, int64_t n) {
    const int64_t n32 = n - n % 32;
    for (int b = 0; b < B; b++)
        for (int64_t k = 0; k < n32; k += 32)
            _mm512_storeu_si512((void *)(xb + (int64_t)b * n32 + k), (__m512i)round_bf16x32(x + (int64_t)b * n + k));
}
#endif

/* Q8_0: each block's 32 weights are scaled to floats once and then used against
 * all nc batch rows, so the work per weight byte stays small. Pointers are
 * stepped as in tile_f32_rows. */
static ALWAYS_INLINE void tile_q8_0(float *out, const float *x, const uint16_t *xb, const uint8_t *w, int64_t n,
                                    int64_t d, int64_t r0, int nr, int c0, int nc) {
    (void)xb;
    vf acc[MAX_TILE_R][MAX_TILE_C];
    const int64_t prefetch_bytes = PREFETCH_AHEAD(r0, nr, d, n) / LMD_Q8_0_BLOCK * LMD_Q8_0_BLOCK_BYTES;
    const int64_t n_blocks = n / LMD_Q8_0_BLOCK;
    const size_t row_bytes = (size_t)n_blocks * LMD_Q8_0_BLOCK_BYTES;
    const uint8_t *wp[MAX_TILE_R];
    const float *xp[MAX_TILE_C];
    for (int r = 0; r < nr; r++) {
        wp[r] = w + (size_t)(r0 + r) * row_bytes;
        for (int c = 0; c < nc; c++) acc[r][c] = vzero_f();
    }
    for (int c = 0; c < nc; c++) xp[c] = x + (int64_t)(c0 + c) * n;
    for (int64_t b = 0; b < n_blocks; b++) {
        float scale[MAX_TILE_R];
        for (int r = 0; r < nr; r++) {
            __builtin_prefetch(wp[r] + prefetch_bytes);
            uint16_t scale_bits;
            memcpy(&scale_bits, wp[r], 2);
            scale[r] = fp16_to_f32(scale_bits);
        }
        for (int j = 0; j < LMD_Q8_0_BLOCK; j += LMD_VEC_LANES) {
            vf wv[MAX_TILE_R];
            for (int r = 0; r < nr; r++) wv[r] = vload_i8(wp[r] + 2 + j) * scale[r];
            for (int c = 0; c < nc; c++) {
                vf xv = vload(xp[c] + j);
                IN_REGISTER(xv);
                for (int r = 0; r < nr; r++) acc[r][c] = vfma(wv[r], xv, acc[r][c]);
            }
        }
        for (int r = 0; r < nr; r++) wp[r] += LMD_Q8_0_BLOCK_BYTES;
        for (int c = 0; c < nc; c++) xp[c] += LMD_Q8_0_BLOCK;
    }
#if LMD_SUM4
    if (nr % 4 == 0) {
        store_totals4(out, acc, d, r0, nr, c0, nc);
        return;
    }
#endif
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < nc; c++) out[(int64_t)(c0 + c) * d + r0 + r] = vsum(acc[r][c]);
}

/* One parallel work item: weight rows r0 .. r0+nr (nr <= ROW_BLOCK) against every batch
 * row, in chunks of up to MAX_TILE_C batch rows. The rows stay in L1/L2 across chunks.
 * Tile shapes: 8 x 1 and 8 x 2 (decode of one or two sequences: eight independent
 * accumulator chains hide the FMA latency), 4 x 3 to 4 x 6 (prefill, batches: 24
 * accumulators and 10 loads per 24 FMAs in AVX-512's 32 registers). */
#define TILE_ANY_C(tile, r0, nr, c0, nc)                                                            \
    switch (nc) {                                                                                   \
    case 1: tile(out, x, xb, w, n, d, r0, nr, c0, 1); break;                                        \
    case 2: tile(out, x, xb, w, n, d, r0, nr, c0, 2); break;                                        \
    case 3: tile(out, x, xb, w, n, d, r0, nr, c0, 3); break;                                        \
    case 4: tile(out, x, xb, w, n, d, r0, nr, c0, 4); break;                                        \
    case 5: tile(out, x, xb, w, n, d, r0, nr, c0, 5); break;                                        \
    default: tile(out, x, xb, w, n, d, r0, nr, c0, 6); break;                                       \
    }

#define DEFINE_ROW_BLOCK(name, tile)                                                                \
    static void name(float *out, const float *x, const uint16_t *xb, const uint8_t *w, int64_t n,   \
                     int64_t d, int64_t r0, int nr, int B, int by_halves) {                         \
        if (nr == ROW_BLOCK && B <= 2) { /* decode: eight rows at once */                           \
            if (B == 1) tile(out, x, xb, w, n, d, r0, 8, 0, 1);                                     \
            else tile(out, x, xb, w, n, d, r0, 8, 0, 2);                                            \
        } else if (nr == ROW_BLOCK) {                                                               \
            /* two 4-row halves x the batch's slices of MAX_TILE_C rows; by_halves picks the   */   \
            /* order (half-major keeps four rows in L1 while all slices pass)                 */    \
            const int n_slices = (B + MAX_TILE_C - 1) / MAX_TILE_C;                                 \
            for (int i = 0; i < 2 * n_slices; i++) {                                                \
                int half = by_halves ? i / n_slices : i % 2;                                        \
                int c0 = (by_halves ? i % n_slices : i / 2) * MAX_TILE_C;                           \
                int nc = B - c0 < MAX_TILE_C ? B - c0 : MAX_TILE_C;                                 \
                TILE_ANY_C(tile, r0 + 4 * half, 4, c0, nc)                                          \
            }                                                                                       \
        } else {                                                                                    \
            for (int r = 0; r < nr; r++)                                                            \
                for (int c0 = 0; c0 < B; c0 += MAX_TILE_C) {                                        \
                    int nc = B - c0 < MAX_TILE_C ? B - c0 : MAX_TILE_C;                             \
                    TILE_ANY_C(tile, r0 + r, 1, c0, nc)                                             \
                }                                                                                   \
        }                                                                                           \
    }

DEFINE_ROW_BLOCK(row_block_f32_tiles, tile_f32)
DEFINE_ROW_BLOCK(row_block_bf16, tile_bf16)
DEFINE_ROW_BLOCK(row_block_q8_0, tile_q8_0)

/* f32 batches through staged rows: four weight rows at a time are copied into a
 * cache-line-aligned buffer on the stack, which then meets the whole batch there, in L1.
 * Rows off cache lines (NumPy's arrays sit 16 bytes off; safetensors and GGUF data
 * anywhere) cost every vector load two lines: -12% at 256 inputs, and 2 x slower at 3
 * and 4 (a beam step), so those are staged from 3 inputs on; aligned rows from
 * STAGED_MIN_BATCH on, below which the copy costs more than it saves. Longer rows stay
 * on the tiles. Same arithmetic either way. */
#define STAGED_MIN_BATCH 8
#define STAGED_MIN_BATCH_UNALIGNED 3
#define STAGED_MAX_COLS 4096

/* q8_0 batches of Q8_0_STAGED_MIN_BATCH inputs or more, with rows short enough that four
 * of them as floats and a slice of inputs fit L1, go through the same stack buffer: four
 * rows dequantized once (the very products the q8_0 tile forms in registers, for every
 * slice of inputs) then the f32 tile. 768 columns: 1.55 -> 1.37 ms for 256 inputs; with
 * 2048 columns the floats overflow L1 and it was 1.35 x slower, so those stay on the q8_0
 * tile. Same arithmetic either way. */
#define Q8_0_STAGED_MIN_BATCH 32

// rows (4, n) of q8_0 -> out (4, n) floats, the products the q8_0 tile forms in registers
static void dequantize_q8_0_rows(float *out, const uint8_t *w, size_t row_bytes, int64_t n, int64_t prefetch_bytes) {
    for (int r = 0; r < 4; r++) {
        const uint8_t *row = w + (size_t)r * row_bytes;
        for (int64_t b = 0; b < n / LMD_Q8_0_BLOCK; b++) {
            const uint8_t *block = row + b * LMD_Q8_0_BLOCK_BYTES;
            __builtin_prefetch(block + prefetch_bytes);
            uint16_t scale_bits;
            memcpy(&scale_bits, block, 2);
            const float scale = fp16_to_f32(scale_bits);
            for (int j = 0; j < LMD_Q8_0_BLOCK; j += LMD_VEC_LANES)
                vstore(out + r * n + b * LMD_Q8_0_BLOCK + j, vload_i8(block + 2 + j) * scale);
        }
    }
}

// rows (4, n) of f32 -> out (4, n), an aligned copy
static void copy_f32_rows(float *out, const uint8_t *w, size_t row_bytes, int64_t n, int64_t prefetch_bytes) {
    for (int r = 0; r < 4; r++) {
        const uint8_t *row = w + (size_t)r * row_bytes;
        for (size_t k = 0; k < row_bytes; k += 64) __builtin_prefetch(row + k + prefetch_bytes);
        memcpy(out + r * n, row, (size_t)n * sizeof(float));
    }
}

// rows r0..r0+8 of W (d,n) in `dtype` against the whole batch: each half of the block is
// staged as floats (copied or dequantized) and passes every slice of inputs through the
// f32 tile, out of L1
static void row_block_staged(float *out, const float *x, const uint8_t *w, lmd_dtype dtype, int64_t n, int64_t d,
                             int64_t r0, int B) {
    float staged[4 * STAGED_MAX_COLS] __attribute__((aligned(64)));
    const size_t row_bytes = lmd_row_bytes(dtype, n);
    /* staging streams the rows: prefetch the next row block's as it goes */
    const int64_t prefetch_bytes = (int64_t)row_bytes * ROW_BLOCK * (r0 + 2 * ROW_BLOCK <= d);
    for (int half = 0; half < 2; half++) {
        const uint8_t *rows = w + (size_t)(r0 + 4 * half) * row_bytes;
        if (dtype == LMD_Q8_0) dequantize_q8_0_rows(staged, rows, row_bytes, n, prefetch_bytes);
        else copy_f32_rows(staged, rows, row_bytes, n, prefetch_bytes);
        for (int c0 = 0; c0 < B; c0 += MAX_TILE_C) {
            const int nc = B - c0 < MAX_TILE_C ? B - c0 : MAX_TILE_C;
#define TILE_STAGED(nc_) tile_f32_rows(out, x, staged, 0, n, d, r0 + 4 * half, 4, c0, nc_)
            switch (nc) {
            case 1: TILE_STAGED(1); break;
            case 2: TILE_STAGED(2); break;
            case 3: TILE_STAGED(3); break;
            case 4: TILE_STAGED(4); break;
            case 5: TILE_STAGED(5); break;
            default: TILE_STAGED(6); break;
            }
#undef TILE_STAGED
        }
    }
}

static void row_block_q8_0_staged(float *out, const float *x, const uint16_t *xb, const uint8_t *w, int64_t n,
                                  int64_t d, int64_t r0, int nr, int B, int by_halves) {
    const size_t slice_bytes = (size_t)MAX_TILE_C * n * sizeof(float), rows_bytes = 4 * (size_t)n * sizeof(float);
    if (nr != ROW_BLOCK || B < Q8_0_STAGED_MIN_BATCH || rows_bytes + slice_bytes > L1_BUDGET)
        row_block_q8_0(out, x, xb, w, n, d, r0, nr, B, by_halves);
    else
        row_block_staged(out, x, w, LMD_Q8_0, n, d, r0, B);
}

static void row_block_f32(float *out, const float *x, const uint16_t *xb, const uint8_t *w, int64_t n, int64_t d,
                          int64_t r0, int nr, int B, int by_halves) {
    const size_t row_bytes = (size_t)n * sizeof(float);
    const int aligned = (uintptr_t)(w + (size_t)r0 * row_bytes) % 64 == 0 && row_bytes % 64 == 0;
    if (nr != ROW_BLOCK || B < (aligned ? STAGED_MIN_BATCH : STAGED_MIN_BATCH_UNALIGNED) || n > STAGED_MAX_COLS)
        row_block_f32_tiles(out, x, xb, w, n, d, r0, nr, B, by_halves);
    else
        row_block_staged(out, x, w, LMD_F32, n, d, r0, B);
}

/* Parallel regions cost a few microseconds; below this many multiply-adds one thread is faster. */
#define MATMUL_PARALLEL_MIN_WORK 200000

/* Bytes of a batch's inputs the weight rows pass in one group (L2 is 0.5-2 MB per core). */
#ifndef L2_INPUT_BUDGET
#define L2_INPUT_BUDGET (512 * 1024)
#endif

void lmd_matmul_scratch(float *out, const float *x, const lmd_matrix *w, int B, uint16_t *x_bf16) {
    const int64_t d = w->rows, n = w->cols;
    const int64_t n_row_blocks = (d + ROW_BLOCK - 1) / ROW_BLOCK;
    void (*row_block)(float *, const float *, const uint16_t *, const uint8_t *, int64_t, int64_t, int64_t, int,
                      int, int) =
        w->dtype == LMD_F32 ? row_block_f32 : w->dtype == LMD_BF16 ? row_block_bf16 : row_block_q8_0_staged;
    const uint8_t *data = (const uint8_t *)w->data;
    /* bf16 dot products read the inputs rounded to bf16: rounded once here, not again by
     * every block of weight rows (1.5 x faster for a 256-token batch) */
    const uint16_t *xb = NULL;
#if LMD_BF16_DOT
    if (w->dtype == LMD_BF16 && x_bf16 != NULL && n >= 32) {
        round_inputs_bf16(x_bf16, x, B, n);
        xb = x_bf16;
    }
#else
    (void)x_bf16;
#endif
    /* A batch passes a row block's eight weight rows MAX_TILE_C inputs at a time. When the
     * eight rows and one slice of inputs overflow L1 but four rows and the slice fit, each
     * half of the block meets the whole batch in turn instead (f32 rows of 768: +19%). */
    const size_t row_bytes = lmd_row_bytes(w->dtype, n), slice_bytes = (size_t)MAX_TILE_C * n * sizeof(float);
    const int by_halves = 4 * row_bytes + slice_bytes <= L1_BUDGET && 8 * row_bytes + slice_bytes > L1_BUDGET;
    /* Every block of weight rows passes the whole batch of inputs, so the inputs should
     * stay in L2: a batch larger than L2_INPUT_BUDGET is taken in groups of inputs, each
     * group meeting all the weights (which are then read once per group). */
    const int64_t per_input = n * (int64_t)sizeof(float);
    int group = (int)(L2_INPUT_BUDGET / (per_input > 0 ? per_input : 1)) / MAX_TILE_C * MAX_TILE_C;
    if (group < STAGED_MIN_BATCH) group = STAGED_MIN_BATCH;
    if (group > B) group = B;
#define ROW_BLOCKS_OF_GROUP(t_loop_pragma)                                                          \
    for (int g0 = 0; g0 < B; g0 += group) {                                                        \
        const int nb = B - g0 < group ? B - g0 : group;                                             \
        float *g_out = out + (int64_t)g0 * d;                                                       \
        const float *g_x = x + (int64_t)g0 * n;                                                     \
        const uint16_t *g_xb = xb ? xb + (int64_t)g0 * (n - n % 32) : NULL;                         \
        t_loop_pragma                                                                               \
        for (int64_t t = 0; t < n_row_blocks; t++) {                                                \
            const int64_t r0 = t * ROW_BLOCK;                                                       \
            row_block(g_out, g_x, g_xb, data, n, d, r0, d - r0 < ROW_BLOCK ? (int)(d - r0) : ROW_BLOCK, \
                      nb, by_halves);                                                               \
        }                                                                                           \
    }
#ifdef _OPENMP
    /* Entering an OpenMP region costs microseconds (and libgomp allocates a team) even
     * for one thread, so small products never enter one. */
    if ((int64_t)B * d * n >= MATMUL_PARALLEL_MIN_WORK && lmd_get_num_threads() > 1) {
#pragma omp parallel num_threads(lmd_get_num_threads())
        ROW_BLOCKS_OF_GROUP(_Pragma("omp for schedule(static)"))
        return;
    }
#endif
    ROW_BLOCKS_OF_GROUP()
#undef ROW_BLOCKS_OF_GROUP
}

void lmd_matmul(float *out, const float *x, const lmd_matrix *w, int B) {
    lmd_matmul_scratch(out, x, w, B, NULL);
}

void lmd_matmul_naive(float *out, const float *x, const lmd_matrix *w, int B) {
    const int64_t d = w->rows, n = w->cols;
    float row[n > 0 ? n : 1];
    for (int64_t i = 0; i < d; i++) {
        lmd_matrix_row(row, w, i);
        for (int b = 0; b < B; b++) {
            double s = 0.0;
            const int64_t rounded = w->dtype == LMD_BF16 && lmd_bf16_rounds_inputs() ? n - n % 32 : 0;
            for (int64_t k = 0; k < n; k++) {
                float xk = x[(int64_t)b * n + k];
                if (k < rounded) xk = lmd_bf16_to_f32(lmd_f32_to_bf16(xk)); /* as the fast kernel does */
                s += (double)row[k] * xk;
            }
            out[(int64_t)b * d + i] = (float)s;
        }
    }
}

/* ------------------------------------------------------------------ */
/* norms                                                                */
/* ------------------------------------------------------------------ */

static float sum_of_squares(const float *x, int n) { return lmd_dot(x, x, n); }

void lmd_rmsnorm(float *out, const float *x, const float *weight, int B, int n, float eps) {
    for (int b = 0; b < B; b++) {
        const float *xb = x + (int64_t)b * n;
        float *ob = out + (int64_t)b * n;
        float inv = 1.0f / sqrtf(sum_of_squares(xb, n) / (float)n + eps);
        for (int k = 0; k < n; k++) ob[k] = weight[k] * (xb[k] * inv);
    }
}

void lmd_rmsnorm_naive(float *out, const float *x, const float *weight, int B, int n, float eps) {
    for (int b = 0; b < B; b++) {
        double ss = 0.0;
        for (int k = 0; k < n; k++) ss += (double)x[b * n + k] * x[b * n + k];
        double inv = 1.0 / sqrt(ss / n + eps);
        for (int k = 0; k < n; k++) out[b * n + k] = (float)(weight[k] * (x[b * n + k] * inv));
    }
}

void lmd_layernorm(float *out, const float *x, const float *weight, const float *bias, int B, int n,
                   float eps) {
    for (int b = 0; b < B; b++) {
        const float *xb = x + (int64_t)b * n;
        float *ob = out + (int64_t)b * n;
        vf acc = vzero_f();
        int k = 0;
        for (; k + LMD_VEC_LANES <= n; k += LMD_VEC_LANES) acc += vload(xb + k);
        float sum = vsum(acc);
        for (; k < n; k++) sum += xb[k];
        float mean = sum / (float)n;
        vf vmean = vbroadcast(mean);
        acc = vzero_f();
        for (k = 0; k + LMD_VEC_LANES <= n; k += LMD_VEC_LANES) {
            vf c = vload(xb + k) - vmean;
            acc = vfma(c, c, acc);
        }
        float var = vsum(acc);
        for (; k < n; k++) var += (xb[k] - mean) * (xb[k] - mean);
        var /= (float)n;
        float inv = 1.0f / sqrtf(var + eps);
        for (k = 0; k < n; k++) ob[k] = (xb[k] - mean) * inv * weight[k] + bias[k];
    }
}

void lmd_layernorm_naive(float *out, const float *x, const float *weight, const float *bias, int B,
                         int n, float eps) {
    for (int b = 0; b < B; b++) {
        double mean = 0.0, var = 0.0;
        for (int k = 0; k < n; k++) mean += x[b * n + k];
        mean /= n;
        for (int k = 0; k < n; k++) var += (x[b * n + k] - mean) * (x[b * n + k] - mean);
        var /= n;
        double inv = 1.0 / sqrt(var + eps);
        for (int k = 0; k < n; k++)
            out[b * n + k] = (float)((x[b * n + k] - mean) * inv * weight[k] + bias[k]);
    }
}

/* ------------------------------------------------------------------ */
/* rotary embeddings                                                    */
/* ------------------------------------------------------------------ */

/* The angle is computed in float, as pos * inv_freq, like the reference
 * implementations, so positions far into the context agree with them. */
void lmd_rope(float *x, int n_heads, int hs, int pos, const float *inv_freq, lmd_rope_layout layout) {
    int half = hs / 2;
    float cos_t[half > 0 ? half : 1], sin_t[half > 0 ? half : 1];
    for (int i = 0; i < half; i++) {
        float angle = (float)pos * inv_freq[i];
        cos_t[i] = cosf(angle);
        sin_t[i] = sinf(angle);
    }
    for (int h = 0; h < n_heads; h++) {
        float *xh = x + (int64_t)h * hs;
        for (int i = 0; i < half; i++) {
            int a = layout == LMD_ROPE_ADJACENT ? 2 * i : i;
            int b = layout == LMD_ROPE_ADJACENT ? 2 * i + 1 : i + half;
            float x0 = xh[a], x1 = xh[b];
            xh[a] = x0 * cos_t[i] - x1 * sin_t[i];
            xh[b] = x0 * sin_t[i] + x1 * cos_t[i];
        }
    }
}

void lmd_rope_naive(float *x, int n_heads, int hs, int pos, const float *inv_freq,
                    lmd_rope_layout layout) {
    for (int h = 0; h < n_heads; h++)
        for (int i = 0; i < hs / 2; i++) {
            float angle = (float)pos * inv_freq[i];
            int a = layout == LMD_ROPE_ADJACENT ? 2 * i : i;
            int b = layout == LMD_ROPE_ADJACENT ? 2 * i + 1 : i + hs / 2;
            double x0 = x[h * hs + a], x1 = x[h * hs + b];
            x[h * hs + a] = (float)(x0 * cos(angle) - x1 * sin(angle));
            x[h * hs + b] = (float)(x0 * sin(angle) + x1 * cos(angle));
        }
}

/* ------------------------------------------------------------------ */
/* softmax and activations                                              */
/* ------------------------------------------------------------------ */

void lmd_softmax(float *x, int n) {
    /* the maximum is exact in any order, so it runs lane-parallel */
    vf lanes_max = vbroadcast(-INFINITY);
    int j = 0;
    for (; j + LMD_VEC_LANES <= n; j += LMD_VEC_LANES) lanes_max = vmax(lanes_max, vload(x + j));
    float max = vhmax(lanes_max);
    for (; j < n; j++) max = x[j] > max ? x[j] : max;
    vf vmax_b = vbroadcast(max);
    vf acc = vzero_f();
    int k = 0;
    for (; k + LMD_VEC_LANES <= n; k += LMD_VEC_LANES) {
        vf e = vexp_nonpositive(vload(x + k) - vmax_b);
        vstore(x + k, e);
        acc += e;
    }
    float sum = vsum(acc);
    if (k < n) { /* the last n % LANES in one vector, padded with -inf (e^-inf = 0); added in order */
        const vf e = vexp_nonpositive(vload_partial(x + k, n - k, -INFINITY) - vmax_b);
        for (int j = 0; k < n; k++, j++) {
            x[k] = e[j];
            sum += e[j];
        }
    }
    float inv = 1.0f / sum;
    for (k = 0; k < n; k++) x[k] *= inv;
}

void lmd_softmax_naive(float *x, int n) {
    double max = -INFINITY, sum = 0.0;
    for (int k = 0; k < n; k++) max = x[k] > max ? x[k] : max;
    for (int k = 0; k < n; k++) sum += exp(x[k] - max);
    for (int k = 0; k < n; k++) x[k] = (float)(exp(x[k] - max) / sum);
}

/* silu(g) up = g sigmoid(g) up, with e^-|g| <= 1 on either side (g e^g / (1 + e^g) for
 * g < 0) so the vector exp serves both */
static inline vf vswiglu(vf g, vf up) {
    const vi negative = g < 0.0f;
    const vf t = vexp_nonpositive(vselect(negative, g, -g));
    return g * vselect(negative, t, vbroadcast(1.0f)) / (1.0f + t) * up;
}

void lmd_swiglu(float *gate, const float *up, int64_t n) {
    int64_t k = 0;
    for (; k + LMD_VEC_LANES <= n; k += LMD_VEC_LANES) vstore(gate + k, vswiglu(vload(gate + k), vload(up + k)));
    if (k < n) { /* the rest in one zero-padded vector, the same function lane for lane */
        vstore_partial(gate + k, vswiglu(vload_partial(gate + k, n - k, 0.0f), vload_partial(up + k, n - k, 0.0f)),
                       n - k);
    }
}

void lmd_swiglu_naive(float *gate, const float *up, int64_t n) {
    for (int64_t k = 0; k < n; k++) {
        double g = gate[k];
        gate[k] = (float)(g / (1.0 + exp(-g)) * up[k]);
    }
}

#define GELU_SQRT_2_OVER_PI 0.7978845608028654f

/* 0.5 x (1 + tanh(u)) = x sigmoid(2u) = x / (1 + e^-2u), evaluated with e^-2|u| <= 1 on
 * either side (x e^2u / (1 + e^2u) for u < 0): vectorized, and without the cancellation
 * of 1 + tanh(u) at x << 0, where the tanh form loses relative accuracy. */
static inline vf vgelu_tanh(vf v) {
    const vf u = GELU_SQRT_2_OVER_PI * (v + 0.044715f * v * v * v);
    const vi negative = u < 0.0f;
    const vf t = vexp_nonpositive(vselect(negative, u + u, -(u + u)));
    return v * vselect(negative, t, vbroadcast(1.0f)) / (1.0f + t);
}

void lmd_gelu_tanh(float *x, int64_t n) {
    int64_t k = 0;
    for (; k + LMD_VEC_LANES <= n; k += LMD_VEC_LANES) vstore(x + k, vgelu_tanh(vload(x + k)));
    if (k < n) { /* the rest in one zero-padded vector, the same function lane for lane */
        vstore_partial(x + k, vgelu_tanh(vload_partial(x + k, n - k, 0.0f)), n - k);
    }
}

void lmd_gelu_tanh_naive(float *x, int64_t n) {
    for (int64_t k = 0; k < n; k++) {
        double v = x[k];
        x[k] = (float)(0.5 * v * (1.0 + tanh(0.7978845608028654 * (v + 0.044715 * v * v * v))));
    }
}
