/* ops.c -- kernels of the forward pass (contracts in ops.h). */
#if defined(__linux__) && !defined(_DEFAULT_SOURCE)
#define _DEFAULT_SOURCE /* syscall(), to ask Linux for the AMX tiles */
#endif
#include "ops.h"

#include "lmdecode.h"
#include "vec.h"

#include <float.h>
#include <math.h>
#include <string.h>

#if defined(__AVX512F__) || defined(__AVX2__) || defined(__FMA__) || defined(__F16C__)
#include <immintrin.h>
#endif

/* ------------------------------------------------------------------ */
/* scalar conversions                                                   */
/* ------------------------------------------------------------------ */

/* The kernels call vec.h's half_to_float, inlined: an out-of-line call per Q8_0 block would
 * spill every vector accumulator around it. */
float lmd_fp16_to_f32(uint16_t h) { return half_to_float(h); }

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
    case LMD_F32:
    case LMD_F32_PANELS: return (size_t)cols * 4;
    case LMD_BF16:
    case LMD_BF16_PANELS:
    case LMD_F16:
    case LMD_F16_PANELS: return (size_t)cols * 2;
    case LMD_Q8_0: return (size_t)(cols / LMD_Q8_0_BLOCK) * LMD_Q8_0_BLOCK_BYTES;
    case LMD_Q4_0: return (size_t)(cols / LMD_Q8_0_BLOCK) * LMD_Q4_0_BLOCK_BYTES;
    case LMD_Q4_1: return (size_t)(cols / LMD_Q8_0_BLOCK) * LMD_Q4_1_BLOCK_BYTES;
    }
    return 0;
}

const char *lmd_dtype_name(lmd_dtype dtype) {
    switch (dtype) {
    case LMD_F32: return "f32";
    case LMD_F32_PANELS: return "f32 panels";
    case LMD_BF16: return "bf16";
    case LMD_BF16_PANELS: return "bf16 panels";
    case LMD_F16: return "f16";
    case LMD_F16_PANELS: return "f16 panels";
    case LMD_Q8_0: return "q8_0";
    case LMD_Q4_0: return "q4_0";
    case LMD_Q4_1: return "q4_1";
    }
    return "?";
}

// What a block quantizer found that its storage cannot hold (the block is written anyway, as
// llama.cpp writes it: see block_error for the message).
enum { BLOCK_OK = 0, BLOCK_NON_FINITE, BLOCK_SCALE_OVERFLOW, BLOCK_MIN_OVERFLOW };

// whether an fp16 value is infinite (or NaN): a finite float that rounded beyond 65504
static int fp16_overflows(uint16_t h) { return (h & 0x7c00u) == 0x7c00u; }

// x (32,) -> one llama.cpp Q8_0 block (34 bytes): fp16 scale amax/127 (NaN values ignored),
// then 32 int8 values round(x / scale), half away from zero, in [-127, 127] (0 where
// x / scale is NaN: a NaN x, or an infinite one, its block's scale being inf).
// In vectors (roundf and fmaxf were calls into libm, a model's weights are quantized at
// load): round is trunc plus one away from zero where the fraction is a half or more,
// exact since |x / scale| <= 127. Returns BLOCK_NON_FINITE for a NaN or infinite value,
// BLOCK_SCALE_OVERFLOW for a scale that is infinite in fp16 (amax >= 127 * 65520), else 0.
static int quantize_block_q8_0(uint8_t *block, const float *x) {
    const vi abs_bits = (vi){0} + 0x7fffffff;
    vf most = vbroadcast(0.0f);
    vi non_finite = (vi){0};
    for (int c = 0; c < LMD_Q8_0_BLOCK; c += LMD_VEC_LANES) {
        const vf a = (vf)((vi)vload(x + c) & abs_bits);
        most = vselect(a > most, a, most); /* false for NaN: ignored, as fmaxf ignores it */
        non_finite |= (a != a) | (a > FLT_MAX);
    }
    int problem = BLOCK_OK;
    for (int j = 0; j < LMD_VEC_LANES; j++) problem |= non_finite[j] != 0;
    const float amax = vhmax(most);
    float scale = amax / 127.0f;
    float inv = scale != 0.0f ? 1.0f / scale : 0.0f;
    if (!isfinite(inv)) inv = 0.0f; /* amax below ~4e-37: the fp16 scale is 0 anyway */
    uint16_t scale_bits = lmd_f32_to_fp16(scale);
    if (!problem && fp16_overflows(scale_bits)) problem = BLOCK_SCALE_OVERFLOW;
    memcpy(block, &scale_bits, 2);
    for (int c = 0; c < LMD_Q8_0_BLOCK; c += LMD_VEC_LANES) {
        const vf v = vload(x + c) * inv;
        const vi nan = v != v;
        const vf safe = vselect(nan, vbroadcast(0.0f), v);
        vf r = __builtin_convertvector(__builtin_convertvector(safe, vi), vf); /* trunc */
        const vf away = vselect(safe < 0.0f, vbroadcast(-1.0f), vbroadcast(1.0f));
        const vf diff = safe - r;
        r += vselect((vf)((vi)diff & abs_bits) >= 0.5f, away, vbroadcast(0.0f));
        r = vselect(r > 127.0f, vbroadcast(127.0f), vselect(r < -127.0f, vbroadcast(-127.0f), r));
        const vi q = __builtin_convertvector(r, vi);
        for (int j = 0; j < LMD_VEC_LANES; j++) block[2 + c + j] = (uint8_t)(int8_t)q[j];
    }
    return problem;
}

void lmd_quantize_q8_0(uint8_t *out, const float *x, int64_t n) {
    for (int64_t b = 0; b < n / LMD_Q8_0_BLOCK; b++)
        quantize_block_q8_0(out + b * LMD_Q8_0_BLOCK_BYTES, x + b * LMD_Q8_0_BLOCK);
}

/* Where row r's block b of a packed (rows, n_blocks * 32) q8_0 matrix lives: its fp16 scale
 * at byte *scale, its 32 values as 8 runs of 4 bytes, run s at *quants + s * *run_stride. */
static void q8_0_locate(int64_t rows, int64_t n_blocks, int64_t r, int64_t b, size_t *scale, size_t *quants,
                        size_t *run_stride) {
    const int64_t group = r / LMD_Q8_0_GROUP, i = r % LMD_Q8_0_GROUP;
    const int64_t left = rows - group * LMD_Q8_0_GROUP;
    const int64_t group_rows = left < LMD_Q8_0_GROUP ? left : LMD_Q8_0_GROUP;
    const size_t block = ((size_t)group * LMD_Q8_0_GROUP * n_blocks + (size_t)b * group_rows) * LMD_Q8_0_BLOCK_BYTES;
    *scale = block + 2 * (size_t)i;
    *quants = block + 2 * (size_t)group_rows + 4 * (size_t)i;
    *run_stride = 4 * (size_t)group_rows;
}

// one llama.cpp block (34 bytes) -> row r's block b of the packed matrix
static void place_block_q8_0(uint8_t *packed, int64_t rows, int64_t n_blocks, int64_t r, int64_t b,
                             const uint8_t *block) {
    size_t scale, quants, run_stride;
    q8_0_locate(rows, n_blocks, r, b, &scale, &quants, &run_stride);
    memcpy(packed + scale, block, 2);
    for (int s = 0; s < 8; s++) memcpy(packed + quants + s * run_stride, block + 2 + 4 * s, 4);
}

void lmd_pack_q8_0(uint8_t *out, const uint8_t *blocks, int64_t rows, int64_t cols) {
    const int64_t n_blocks = cols / LMD_Q8_0_BLOCK;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t b = 0; b < n_blocks; b++)
            place_block_q8_0(out, rows, n_blocks, r, b, blocks + (r * n_blocks + b) * LMD_Q8_0_BLOCK_BYTES);
}

// The error of row r's block b (values x) that a block quantizer of dtype reported (problem):
// the first non-finite value, or the scale (minimum) that fp16 cannot hold and how it came about.
static lmd_status block_error(lmd_error *err, lmd_dtype dtype, int problem, const float *x, int64_t r, int64_t b) {
    const char *name = lmd_dtype_name(dtype);
    const long long row = (long long)r, first = (long long)b * LMD_Q8_0_BLOCK, last = first + LMD_Q8_0_BLOCK - 1;
    if (problem == BLOCK_NON_FINITE) {
        int j = 0;
        while (j < LMD_Q8_0_BLOCK - 1 && fabsf(x[j]) <= FLT_MAX) j++;
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "non-finite values cannot be stored as %s (row %lld, column %lld: %s)",
                        name, row, first + j, isnan(x[j]) ? "nan" : x[j] > 0.0f ? "inf" : "-inf");
    }
    float low = x[0], high = x[0], widest = fabsf(x[0]), signed_widest = x[0];
    for (int j = 1; j < LMD_Q8_0_BLOCK; j++) {
        if (fabsf(x[j]) > widest) widest = fabsf(x[j]), signed_widest = x[j];
        low = x[j] < low ? x[j] : low;
        high = x[j] > high ? x[j] : high;
    }
    char v[3][LMD_NUMBER_CHARS];
    if (problem == BLOCK_MIN_OVERFLOW)
        return lmd_fail(err, LMD_ERR_INVALID_ARG,
                        "values too large for %s's fp16 block minimums (row %lld, columns %lld to %lld: minimum %s, "
                        "which fp16 rounds to infinity: its largest finite value is 65504)",
                        name, row, first, last, lmd_format_float(v[0], low));
    if (dtype == LMD_Q8_0)
        return lmd_fail(err, LMD_ERR_INVALID_ARG,
                        "values too large for q8_0's fp16 block scales (row %lld, columns %lld to %lld: scale %s = "
                        "largest magnitude %s / 127, which fp16 rounds to infinity: its largest finite value is 65504)",
                        row, first, last, lmd_format_float(v[0], widest / 127.0f), lmd_format_float(v[1], widest));
    if (dtype == LMD_Q4_0)
        return lmd_fail(err, LMD_ERR_INVALID_ARG,
                        "values too large for q4_0's fp16 block scales (row %lld, columns %lld to %lld: scale %s = "
                        "the value of largest magnitude %s / -8, which fp16 rounds to infinity: its largest finite value is 65504)",
                        row, first, last, lmd_format_float(v[0], signed_widest / -8.0f),
                        lmd_format_float(v[1], signed_widest));
    return lmd_fail(err, LMD_ERR_INVALID_ARG,
                    "values too large for q4_1's fp16 block scales (row %lld, columns %lld to %lld: scale %s = "
                    "(max %s - min %s) / 15, which fp16 rounds to infinity: its largest finite value is 65504)",
                    row, first, last, lmd_format_float(v[0], (high - low) / 15.0f), lmd_format_float(v[1], high),
                    lmd_format_float(v[2], low));
}

lmd_status lmd_quantize_matrix_q8_0(uint8_t *out, const float *x, int64_t rows, int64_t cols, lmd_error *err) {
    const int64_t n_blocks = cols / LMD_Q8_0_BLOCK;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t b = 0; b < n_blocks; b++) {
            uint8_t block[LMD_Q8_0_BLOCK_BYTES];
            const float *xb = x + r * cols + b * LMD_Q8_0_BLOCK;
            const int problem = quantize_block_q8_0(block, xb);
            if (problem) return block_error(err, LMD_Q8_0, problem, xb, r, b);
            place_block_q8_0(out, rows, n_blocks, r, b, block);
        }
    return LMD_OK;
}

/* q4_0 and q4_1 (ops.h): llama.cpp's blocks, the bytes of a block's values copied 4 at a
 * time into runs of a group of 16 rows, as q8_0's are. */

// bytes of a row's block: its fp16 scale (and minimum, q4_1), then 16 bytes of values
static size_t q4_block_bytes(lmd_dtype dtype) {
    return dtype == LMD_Q4_1 ? LMD_Q4_1_BLOCK_BYTES : LMD_Q4_0_BLOCK_BYTES;
}

// x (32,) -> one llama.cpp Q4_0 or Q4_1 block. The codes are computed as llama.cpp's
// reference quantizer (and gguf's NumPy copy of it) computes them: x * id (Q4_1: (x - min) * id)
// rounded to float, then the offset added. Near a code's boundary the code depends on that
// rounding (3.0 and 2.8125 in a Q4_0 block: d = -0.375, 2.8125 * id = -7.5 once rounded, code
// 1; fused into one FMA with the + 8.5, code 0), and -ffp-contract=fast (setup.py,
// tests/c/Makefile: the kernels rely on it) lets the compiler fuse them, even across
// statements. So the products go through a volatile object, which the compiler must store and
// read back as the abstract machine does (C11 5.1.2.3): the product is a float in memory
// before anything is added to it, whatever the contraction flag. A vector of products at a
// time: one store and one load per LMD_VEC_LANES weights, at load time only.
// Returns BLOCK_NON_FINITE for a NaN or infinite value, BLOCK_SCALE_OVERFLOW (BLOCK_MIN_OVERFLOW)
// for a scale (a minimum) that is infinite in fp16, else 0.
static int quantize_block_q4(uint8_t *block, const float *x, lmd_dtype dtype) {
    float low = INFINITY, high = -INFINITY, widest = 0.0f, signed_widest = 0.0f;
    int problem = BLOCK_OK;
    for (int j = 0; j < LMD_Q8_0_BLOCK; j++) {
        if (fabsf(x[j]) > widest) widest = fabsf(x[j]), signed_widest = x[j];
        low = x[j] < low ? x[j] : low;
        high = x[j] > high ? x[j] : high;
        if (!(fabsf(x[j]) <= FLT_MAX)) problem = BLOCK_NON_FINITE;
    }
    const int with_min = dtype == LMD_Q4_1;
    const float d = with_min ? (high - low) / 15.0f : signed_widest / -8.0f;
    const float inv = d != 0.0f ? 1.0f / d : 0.0f, from = with_min ? low : 0.0f, offset = with_min ? 0.5f : 8.5f;
    const uint16_t d_bits = lmd_f32_to_fp16(d), m_bits = lmd_f32_to_fp16(low);
    if (!problem && fp16_overflows(d_bits)) problem = BLOCK_SCALE_OVERFLOW;
    if (!problem && with_min && fp16_overflows(m_bits)) problem = BLOCK_MIN_OVERFLOW;
    memcpy(block, &d_bits, 2);
    if (with_min) memcpy(block + 2, &m_bits, 2);
    uint8_t codes[LMD_Q8_0_BLOCK];
    for (int c = 0; c < LMD_Q8_0_BLOCK; c += LMD_VEC_LANES) {
        volatile vf product = (vload(x + c) - vbroadcast(from)) * vbroadcast(inv);
        const vf scaled = product + vbroadcast(offset);
        // truncated (as llama.cpp's (int8_t) cast does for the values its quantizer meets),
        // clamped to [0, 15] first, so that NaN (0) or huge values convert without UB
        const vf clamped = vselect(scaled >= 0.0f, vselect(scaled <= 15.0f, scaled, vbroadcast(15.0f)), vbroadcast(0.0f));
        const vi q = __builtin_convertvector(clamped, vi);
        for (int j = 0; j < LMD_VEC_LANES; j++) codes[c + j] = (uint8_t)q[j];
    }
    uint8_t *values = block + (with_min ? 4 : 2);
    for (int j = 0; j < 16; j++) values[j] = (uint8_t)(codes[j] | codes[16 + j] << 4);
    return problem;
}

void lmd_quantize_q4(uint8_t *out, const float *x, int64_t n, lmd_dtype dtype) {
    for (int64_t b = 0; b < n / LMD_Q8_0_BLOCK; b++)
        quantize_block_q4(out + b * q4_block_bytes(dtype), x + b * LMD_Q8_0_BLOCK, dtype);
}

/* Where row r's block b of a packed (rows, n_blocks * 32) q4 matrix lives: its fp16 scale at
 * byte *scale (the minimum, q4_1, 2 * group_rows bytes further), its values as 4 runs of 4
 * bytes, run s at *quants + s * *run_stride. */
static void q4_locate(int64_t rows, int64_t n_blocks, int64_t r, int64_t b, lmd_dtype dtype, size_t *scale,
                      size_t *quants, size_t *run_stride) {
    const int64_t group = r / LMD_Q8_0_GROUP, i = r % LMD_Q8_0_GROUP;
    const int64_t left = rows - group * LMD_Q8_0_GROUP;
    const int64_t group_rows = left < LMD_Q8_0_GROUP ? left : LMD_Q8_0_GROUP;
    const size_t block_bytes = q4_block_bytes(dtype), header = block_bytes - 16;
    const size_t block = ((size_t)group * LMD_Q8_0_GROUP * n_blocks + (size_t)b * group_rows) * block_bytes;
    *scale = block + 2 * (size_t)i;
    *quants = block + header * (size_t)group_rows + 4 * (size_t)i;
    *run_stride = 4 * (size_t)group_rows;
}

// one llama.cpp block -> row r's block b of the packed matrix
static void place_block_q4(uint8_t *packed, int64_t rows, int64_t n_blocks, int64_t r, int64_t b, lmd_dtype dtype,
                           const uint8_t *block) {
    size_t scale, quants, run_stride;
    q4_locate(rows, n_blocks, r, b, dtype, &scale, &quants, &run_stride);
    const int64_t group_rows = (int64_t)run_stride / 4;
    const size_t header = q4_block_bytes(dtype) - 16;
    memcpy(packed + scale, block, 2);
    if (dtype == LMD_Q4_1) memcpy(packed + scale + 2 * (size_t)group_rows, block + 2, 2);
    for (int s = 0; s < 4; s++) memcpy(packed + quants + s * run_stride, block + header + 4 * s, 4);
}

void lmd_pack_q4(uint8_t *out, const uint8_t *blocks, int64_t rows, int64_t cols, lmd_dtype dtype) {
    const int64_t n_blocks = cols / LMD_Q8_0_BLOCK;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t b = 0; b < n_blocks; b++)
            place_block_q4(out, rows, n_blocks, r, b, dtype, blocks + (r * n_blocks + b) * (int64_t)q4_block_bytes(dtype));
}

lmd_status lmd_quantize_matrix_q4(uint8_t *out, const float *x, int64_t rows, int64_t cols, lmd_dtype dtype,
                                  lmd_error *err) {
    const int64_t n_blocks = cols / LMD_Q8_0_BLOCK;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t b = 0; b < n_blocks; b++) {
            uint8_t block[LMD_Q4_1_BLOCK_BYTES];
            const float *xb = x + r * cols + b * LMD_Q8_0_BLOCK;
            const int problem = quantize_block_q4(block, xb, dtype);
            if (problem) return block_error(err, dtype, problem, xb, r, b);
            place_block_q4(out, rows, n_blocks, r, b, dtype, block);
        }
    return LMD_OK;
}

// row r of a packed q4 matrix -> out (cols,): d * (q - 8), or d * q + m
static void q4_row(float *out, const lmd_matrix *w, int64_t r) {
    const uint8_t *data = (const uint8_t *)w->data;
    const int64_t n_blocks = w->cols / LMD_Q8_0_BLOCK;
    for (int64_t b = 0; b < n_blocks; b++) {
        size_t scale_at, quants, run_stride;
        q4_locate(w->rows, n_blocks, r, b, w->dtype, &scale_at, &quants, &run_stride);
        uint16_t d_bits, m_bits = 0;
        memcpy(&d_bits, data + scale_at, 2);
        if (w->dtype == LMD_Q4_1) memcpy(&m_bits, data + scale_at + run_stride / 2, 2);
        const float d = half_to_float(d_bits), m = half_to_float(m_bits);
        const int offset = w->dtype == LMD_Q4_1 ? 0 : 8;
        for (int j = 0; j < 32; j++) {
            const uint8_t byte = data[quants + (j % 16 / 4) * run_stride + j % 4];
            /* d * q rounded, then + m rounded, as llama.cpp and gguf dequantize: through memory,
             * so that -ffp-contract=fast cannot fuse the two into one rounding */
            volatile float product = d * (float)((j < 16 ? byte & 15 : byte >> 4) - offset);
            out[b * LMD_Q8_0_BLOCK + j] = w->dtype == LMD_Q4_1 ? product + m : product;
        }
    }
}

// row r of a row-major (rows, cols) matrix of 16-bit values -> out (cols,) floats, each widened
static void widen_row16(float *out, const uint8_t *data, int64_t r, int64_t cols, float (*widen)(uint16_t)) {
    for (int64_t k = 0; k < cols; k++) {
        uint16_t bits;
        memcpy(&bits, data + ((size_t)r * cols + k) * 2, 2);
        out[k] = widen(bits);
    }
}

void lmd_matrix_row(float *out, const lmd_matrix *w, int64_t r) {
    const uint8_t *data = (const uint8_t *)w->data;
    switch (w->dtype) {
    case LMD_F32: memcpy(out, data + (size_t)r * w->cols * 4, (size_t)w->cols * 4); break;
    case LMD_F32_PANELS: {
        const float *panel = (const float *)w->data + r / LMD_VEC_LANES * w->cols * LMD_VEC_LANES;
        for (int64_t k = 0; k < w->cols; k++) out[k] = panel[k * LMD_VEC_LANES + r % LMD_VEC_LANES];
        break;
    }
    case LMD_F16: widen_row16(out, data, r, w->cols, lmd_fp16_to_f32); break;
    case LMD_F16_PANELS: {
        const uint16_t *panel = (const uint16_t *)w->data + r / LMD_VEC_LANES * w->cols * LMD_VEC_LANES;
        for (int64_t k = 0; k < w->cols; k++) out[k] = half_to_float(panel[k * LMD_VEC_LANES + r % LMD_VEC_LANES]);
        break;
    }
    case LMD_BF16_PANELS: {
        const int64_t pairs = lmd_bf16_panel_pairs(w->cols);
        const uint32_t *panel = (const uint32_t *)w->data + r / LMD_VEC_LANES * pairs * LMD_VEC_LANES;
        for (int64_t k = 0; k < w->cols; k++)
            out[k] = lmd_bf16_to_f32((uint16_t)(panel[k / 2 * LMD_VEC_LANES + r % LMD_VEC_LANES] >> (16 * (k % 2))));
        break;
    }
    case LMD_BF16: widen_row16(out, data, r, w->cols, lmd_bf16_to_f32); break;
    case LMD_Q8_0:
        for (int64_t b = 0; b < w->cols / LMD_Q8_0_BLOCK; b++) {
            size_t scale_at, quants, run_stride;
            q8_0_locate(w->rows, w->cols / LMD_Q8_0_BLOCK, r, b, &scale_at, &quants, &run_stride);
            uint16_t scale_bits;
            memcpy(&scale_bits, data + scale_at, 2);
            const float scale = half_to_float(scale_bits);
            for (int j = 0; j < LMD_Q8_0_BLOCK; j++)
                out[b * LMD_Q8_0_BLOCK + j] = scale * (float)(int8_t)data[quants + (j / 4) * run_stride + j % 4];
        }
        break;
    case LMD_Q4_0:
    case LMD_Q4_1: q4_row(out, w, r); break;
    }
}

/* ------------------------------------------------------------------ */
/* q8_0 inputs                                                          */
/* ------------------------------------------------------------------ */

/* A q8_0 matmul quantizes its inputs too, in blocks of 32 as llama.cpp does (its Q8_0
 * weights meet Q8_0 activations), and multiplies in integers: each block's 32 products
 * sum exactly in int32, and only then meet the two scales in float. The activation scale
 * stays a float (llama.cpp rounds it to fp16); values round to nearest even. */

// xb (32,) -> q (32,) int8 in [-127, 127], *scale with xb ~ scale * q, and *corr = -128 *
// (sum of q), which the VNNI kernel starts from. A block holding NaN gets scale NaN and
// one holding inf scale inf, so they reach the output.
static inline void quantize_block_input_q8(int8_t *q, float *scale, int32_t *corr, const float *xb) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    /* the scalar loop below, 16 lanes at a time: max is exact in any order, the
     * product and the rounding (nearest even, as nearbyintf) are per lane */
    const __m512 lo = _mm512_loadu_ps(xb), hi = _mm512_loadu_ps(xb + 16);
    const int nan = (_mm512_cmp_ps_mask(lo, lo, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(hi, hi, _CMP_UNORD_Q)) != 0;
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
#elif defined(__AVX2__)
    /* the same, 8 lanes at a time */
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    __m256 xv[4], most = _mm256_setzero_ps(), unordered = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        xv[i] = _mm256_loadu_ps(xb + 8 * i);
        most = _mm256_max_ps(most, _mm256_andnot_ps(sign_bit, xv[i]));
        unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(xv[i], xv[i], _CMP_UNORD_Q));
    }
    const int nan = _mm256_movemask_ps(unordered) != 0;
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(most), _mm256_extractf128_ps(most, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1)));
#else
    float amax = 0.0f;
    int nan = 0;
    for (int j = 0; j < LMD_Q8_0_BLOCK; j++) {
        const float a = fabsf(xb[j]);
        amax = a > amax ? a : amax;
        nan |= isnan(a);
    }
#endif
    const float s = nan ? NAN : amax / 127.0f;
    float inv = s != 0.0f && isfinite(s) ? 1.0f / s : 0.0f;
    if (!isfinite(inv)) inv = 0.0f; /* amax below ~1e-36 */
#if defined(__AVX512F__) && defined(__AVX512BW__)
    const __m512 vinv = _mm512_set1_ps(inv), limit = _mm512_set1_ps(127.0f);
    __m512i sum = _mm512_setzero_si512();
    for (int half = 0; half < 2; half++) {
        __m512 v = _mm512_roundscale_ps(_mm512_mul_ps(half ? hi : lo, vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), v); /* NaN -> 0 */
        v = _mm512_min_ps(_mm512_max_ps(v, _mm512_sub_ps(_mm512_setzero_ps(), limit)), limit);
        const __m512i v32 = _mm512_cvtps_epi32(v);
        sum = _mm512_add_epi32(sum, v32);
        _mm_storeu_si128((__m128i *)(void *)(q + 16 * half), _mm512_cvtepi32_epi8(v32));
    }
    const int32_t total = _mm512_reduce_add_epi32(sum);
#elif defined(__AVX2__)
    const __m256 vinv = _mm256_set1_ps(inv), limit = _mm256_set1_ps(127.0f), low = _mm256_set1_ps(-127.0f);
    __m256i v32[4], sum = _mm256_setzero_si256();
    for (int i = 0; i < 4; i++) {
        __m256 v = _mm256_round_ps(_mm256_mul_ps(xv[i], vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm256_and_ps(v, _mm256_cmp_ps(v, v, _CMP_ORD_Q)); /* NaN -> 0 */
        v = _mm256_min_ps(_mm256_max_ps(v, low), limit);
        v32[i] = _mm256_cvtps_epi32(v);
        sum = _mm256_add_epi32(sum, v32[i]);
    }
    /* 32 int32 -> 32 int8 in order: the packs interleave 128-bit lanes, the permute undoes it */
    const __m256i v16 = _mm256_packs_epi32(v32[0], v32[1]), w16 = _mm256_packs_epi32(v32[2], v32[3]);
    const __m256i v8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(v16, w16), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)(void *)q, v8);
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    const int32_t total = _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1)));
#else
    int32_t total = 0;
    for (int j = 0; j < LMD_Q8_0_BLOCK; j++) {
        float v = nearbyintf(xb[j] * inv);
        v = v >= -127.0f ? (v <= 127.0f ? v : 127.0f) : (v < -127.0f ? -127.0f : 0.0f); /* NaN -> 0 */
        q[j] = (int8_t)v;
        total += (int8_t)v;
    }
#endif
    *scale = s;
    *corr = -128 * total;
}

void lmd_quantize_input_q8(int8_t *q, float *scale, int32_t *corr, const float *x, int64_t n) {
    for (int64_t b = 0; b < n / LMD_Q8_0_BLOCK; b++)
        quantize_block_input_q8(q + b * LMD_Q8_0_BLOCK, scale + b, corr + b, x + b * LMD_Q8_0_BLOCK);
}

float lmd_dot_q8_0(const uint8_t *w_blocks, const float *x, int64_t n) {
    const int64_t n_blocks = n / LMD_Q8_0_BLOCK;
    float acc = 0.0f;
    for (int64_t b = 0; b < n_blocks; b++) {
        int8_t q[LMD_Q8_0_BLOCK];
        float scale;
        int32_t corr;
        lmd_quantize_input_q8(q, &scale, &corr, x + b * LMD_Q8_0_BLOCK, LMD_Q8_0_BLOCK);
        const uint8_t *block = w_blocks + b * LMD_Q8_0_BLOCK_BYTES;
        /* read as int8 directly: GCC 12 vectorizes (int8_t) of a uint8_t load times int8 as
         * VPDPBUSD, which takes that operand as unsigned (wrong for negative weights) */
        const int8_t *values = (const int8_t *)(const void *)(block + 2);
        int32_t dot = 0;
        for (int j = 0; j < LMD_Q8_0_BLOCK; j++) dot += (int32_t)values[j] * q[j];
        uint16_t scale_bits;
        memcpy(&scale_bits, block, 2);
        acc = fmaf((float)dot, half_to_float(scale_bits) * scale, acc);
    }
    return acc;
}

float lmd_dot_q4(const uint8_t *w_blocks, const float *x, int64_t n, lmd_dtype dtype) {
    const int with_min = dtype == LMD_Q4_1;
    const size_t block_bytes = q4_block_bytes(dtype);
    float acc = 0.0f;
    for (int64_t b = 0; b < n / LMD_Q8_0_BLOCK; b++) {
        int8_t q[LMD_Q8_0_BLOCK];
        float scale;
        int32_t corr;
        lmd_quantize_input_q8(q, &scale, &corr, x + b * LMD_Q8_0_BLOCK, LMD_Q8_0_BLOCK);
        const uint8_t *block = w_blocks + b * (int64_t)block_bytes, *values = block + block_bytes - 16;
        int32_t dot = 0, sum = 0;
        for (int j = 0; j < 16; j++) {
            dot += (int32_t)(values[j] & 15) * q[j] + (int32_t)(values[j] >> 4) * q[16 + j];
            sum += q[j] + q[16 + j];
        }
        uint16_t d_bits, m_bits = 0;
        memcpy(&d_bits, block, 2);
        if (with_min) memcpy(&m_bits, block + 2, 2);
        if (!with_min) dot -= 8 * sum;
        acc = fmaf((float)dot, half_to_float(d_bits) * scale, acc);
        if (with_min) acc = fmaf((float)sum, half_to_float(m_bits) * scale, acc);
    }
    return acc;
}

/* ------------------------------------------------------------------ */
/* vector helpers private to the kernels                                */
/* ------------------------------------------------------------------ */

typedef uint32_t vu32 __attribute__((vector_size(LMD_VEC_BYTES)));

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

float lmd_dot(const float *x, const float *y, int n) {
    vf acc = vzero_f();
    int k = 0;
    for (; k + LMD_VEC_LANES <= n; k += LMD_VEC_LANES) acc = vfma(vload(x + k), vload(y + k), acc);
    /* the last n % LANES in one zero-padded step, into the same lanes */
    if (k < n) acc = vfma(vload_partial(x + k, n - k, 0.0f), vload_partial(y + k, n - k, 0.0f), acc);
    return vsum(acc);
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

/* The kernels multiply packed weights: f32, bf16 and f16 matrices in panels, q8_0 in groups of
 * rows (ops.h). Each output sums its products in one fixed order whatever the tile shape,
 * batch size or thread count, so a batch row's result is bit-identical alone or inside any
 * batch. The tile kernels are always inlined with constant shapes, so that their
 * accumulators stay in registers. Row-major f32, bf16 and f16 matrices are what the model
 * packs at init; lmd_matmul takes them through lmd_matmul_naive. */
#define ALWAYS_INLINE inline __attribute__((always_inline))

/* IN_REGISTER (vec.h) keeps each loaded input vector in a register: left alone, GCC
 * folded the load into every FMA that uses it as a memory operand, so a 4 x 6 tile issued
 * 24 input loads per step instead of 6 and became load-bound (+14% for 256-token batches,
 * 1.6 x faster for 4 tokens through 2048 columns with it). The tiles pin their weight
 * vectors too when several inputs share them (measured on the row-major tiles the panels
 * replaced: an 8 x 2 tile loaded each weight vector twice, and four inputs, a beam step,
 * took 17.3 ms instead of 15.2 for 393 MB of rows). */

#if defined(__AVX512BF16__) && LMD_VEC_BYTES == 64
#define LMD_BF16_DOT 1
/* bf16 weights with the CPU's bf16 dot products (VDPBF16PS): the inputs are rounded to
 * bf16 (nearest even), and each instruction adds 32 products into 16 float lanes, twice
 * the multiply-adds of a float FMA. llama.cpp multiplies bf16 weights the same way. */
// x (32,) floats -> 32 bf16 (nearest even), as the dot products take them
static inline __m512bh round_bf16x32(const float *x) {
    return _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + 16), _mm512_loadu_ps(x));
}
#else
#define LMD_BF16_DOT 0
#endif

int lmd_bf16_rounds_inputs(void) { return LMD_BF16_DOT; }

/* AMX (Intel's tile unit, Sapphire Rapids and later): TDPBF16PS multiplies a 16 x 32 tile of
 * bf16 inputs by a 32 x 16 tile of bf16 weights into 16 x 16 float sums, 256 x the
 * multiply-adds of one VDPBF16PS. Its weight operand is 16 rows of 16 column pairs of 16
 * output features, exactly 16 pairs of a bf16 panel (1 kB), so the panels serve it as they
 * are, their pairs padded with zeros to a multiple of 16 (BF16_PANEL_PAIRS_MULTIPLE). Linux
 * hands the tiles to a process that asks for them (arch_prctl ARCH_REQ_XCOMP_PERM): asked
 * once; where it says no, or LMDECODE_NO_AMX is set in the environment, the bf16 dot
 * products run on the vector unit as without AMX.
 * TDPBF16PS adds its 32 products in an order of its own (not the VDPBF16PS chain's: the two
 * differ in the last bits), so a process uses one or the other for every bf16 product,
 * whatever the batch: the result of an output never depends on the batch or the thread.
 * Each output is one chain of tile multiplies over all its pairs (no blocks of 64 columns).
 * Measured against the VDPBF16PS panels through 170 MB of 2048 x 768 bf16 matrices on one
 * thread of a Xeon (2026-12-02): the same speed for one input (both read the memory as fast
 * as it goes), 4 inputs 1.26 x, 16 2.7 x, 64 4.6 x, 512 6.8 x (677 against 100 GFLOP/s); the
 * 110M Llama's 512-token bf16 prefill 4.8 x faster (2,449 against 515 tok/s). */
#if LMD_BF16_DOT && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define LMD_BF16_AMX 1
#define AMX_K_PAIRS BF16_PANEL_PAIRS_MULTIPLE /* column pairs per tile multiply (16) */
/* Inputs per work item in AMX tiles for a matrix of AMX_WIDE_SLICE_GROUPS groups of 64 rows
 * or more (PANEL_SLICE for fewer, so that small matrices still split across threads): an
 * item reads its 64 rows of weights once per slice, and in slices of 64 inputs a 512-token
 * prefill read every matrix 8 times from L3. 170 MB of 2048 x 768 matrices against 512
 * inputs, one thread: 750 -> 840 GFLOP/s; two threads 1,460 -> 1,620 (128 inputs 1,100 ->
 * 1,260-1,310); the 110M
 * Llama's 512-token bf16 prefill, three alternating runs: one thread 2,434-2,647 -> 2,808-
 * 2,971 tok/s, two 4,543-4,726 -> 4,662-4,835. The slices change which thread makes an
 * output, never its arithmetic. */
#define AMX_WIDE_SLICE 256
#define AMX_WIDE_SLICE_GROUPS 8
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

/* 0: not decided yet, 1: AMX, 2: the vector unit. Deciding twice at once is harmless (the
 * request is idempotent and both threads find the same answer). */
static int amx_state = 0;

static int decide_amx(void) {
    const char *off = getenv("LMDECODE_NO_AMX");
    if (off != NULL && off[0] != '\0' && off[0] != '0') return 2;
    enum { ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18 };
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : 2;
}

int lmd_bf16_uses_amx(void) {
    int state = __atomic_load_n(&amx_state, __ATOMIC_ACQUIRE);
    if (state == 0) {
        state = decide_amx();
        __atomic_store_n(&amx_state, state, __ATOMIC_RELEASE);
    }
    return state == 1;
}
#else
#define LMD_BF16_AMX 0
int lmd_bf16_uses_amx(void) { return 0; }
#endif

/* q8_0 matrices (ops.h: groups of 16 rows, each block's values in runs of 4 bytes per row)
 * against inputs quantized per block (lmd_quantize_input_q8). One lane per weight row: a run
 * of 16 rows x 4 bytes meets 4 input bytes broadcast, and the block's 8 runs sum the
 * block's exact integer dot products of 16 rows, which then meet the scales in float:
 *     acc[row] = fma((float)dot(block), w_scale[row] * x_scale, acc[row])
 * block after block, the one order every path (and lmd_dot_q8_0) keeps, so a row's result
 * never depends on the batch, the tile or the thread count. */
#define Q8_0_GROUP_BYTES_PER_BLOCK (LMD_Q8_0_GROUP * LMD_Q8_0_BLOCK_BYTES) /* 544 */
/* Groups of rows read side by side, a chunk: a decode streams each weight once from
 * memory, and a core keeps more misses in flight over four interleaved streams than over
 * one or two (a Zen 3's AVX2 tile read 12.6 GB/s from one, 17.7 from four). On a Zen 4,
 * chunks of 4 groups against 2, 110M Llama decode, medians of 5-6 fresh processes with
 * builds alternating: q8_0 one thread 128 -> 144 tok/s, two threads 195 -> 218; q4_0 one
 * thread 214 -> 267, q4_1 199 -> 255; 512-token prefill unchanged. */
#define Q8_0_CHUNK_GROUPS 4
#define Q8_0_TILE_C 6 /* inputs per tile (the AVX-512 tile: of 2 groups at most, see chunk_quantized) */

/* Where a batch's quantized inputs sit in the scratch, block-major so that a tile's inputs
 * are one pointer apart by constants: values (n/32, B, 32), then scales and corrections
 * (n/32, B) each; stride = B, the inputs per block column. */
typedef struct {
    const int8_t *q;
    const float *scale;
    const int32_t *corr;
    int64_t stride;
} q8_inputs;

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__) && LMD_VEC_BYTES == 64
#define LMD_Q8_0_VNNI 1
// a VNNI tile's accumulators zeroed and its ng groups' weight pointers, group_bytes apart
static ALWAYS_INLINE void start_tile(__m512 acc[][Q8_0_TILE_C], const uint8_t **wp, const uint8_t *wg,
                                     size_t group_bytes, int ng, int nc) {
    for (int g = 0; g < ng; g++) {
        wp[g] = wg + g * group_bytes;
        for (int c = 0; c < nc; c++) acc[g][c] = _mm512_setzero_ps();
    }
}

// a VNNI tile's sums -> out (B, d): group g's rows r0 + 16 g .., group_rows of them, of inputs c0..
static ALWAYS_INLINE void store_tile(float *out, __m512 acc[][Q8_0_TILE_C], int ng, int group_rows, int c0, int nc,
                                     int64_t d, int64_t r0) {
    const __mmask16 rows = (__mmask16)((1u << group_rows) - 1u);
    for (int g = 0; g < ng; g++)
        for (int c = 0; c < nc; c++) {
            float *o = out + (int64_t)(c0 + c) * d + r0 + g * LMD_Q8_0_GROUP;
            if (group_rows == LMD_Q8_0_GROUP) _mm512_storeu_ps(o, acc[g][c]);
            else _mm512_mask_storeu_ps(o, rows, acc[g][c]);
        }
}

/* VPDPBUSD multiplies unsigned by signed bytes: the weights are read with their sign bit
 * flipped (w + 128, unsigned) against the signed inputs, and each dot product starts from
 * corr = -128 * sum(q) to take the 128 * sum(q) back out, exactly. */
// ng groups of group_rows rows (full groups of 16, or one last group of fewer), starting at
// packed group data wg and output feature r0, against inputs c0..c0+nc -> out (B, d)
static ALWAYS_INLINE void tile_q8_0(float *out, q8_inputs x, const uint8_t *wg, int64_t n, int64_t d, int64_t r0,
                                    int ng, int group_rows, int c0, int nc, int64_t prefetch_bytes) {
    const int64_t n_blocks = n / LMD_Q8_0_BLOCK;
    const size_t group_bytes = (size_t)n_blocks * Q8_0_GROUP_BYTES_PER_BLOCK;
    const size_t block_bytes = (size_t)group_rows * LMD_Q8_0_BLOCK_BYTES, run_bytes = 4 * (size_t)group_rows;
    const __mmask16 rows = (__mmask16)((1u << group_rows) - 1u);
    const int full = group_rows == LMD_Q8_0_GROUP;
    const __m512i sign_bits = _mm512_set1_epi8((char)0x80);
    __m512 acc[Q8_0_CHUNK_GROUPS][Q8_0_TILE_C];
    const uint8_t *wp[Q8_0_CHUNK_GROUPS];
    start_tile(acc, wp, wg, group_bytes, ng, nc);
    /* block b of input c0 + c: values at xp + 32 c, scale and correction at [c] */
    const int8_t *xp = x.q + (int64_t)c0 * LMD_Q8_0_BLOCK;
    const float *x_scale = x.scale + c0;
    const int32_t *x_corr = x.corr + c0;
    for (int64_t b = 0; b < n_blocks; b++) {
        __m512i dot[Q8_0_CHUNK_GROUPS][Q8_0_TILE_C];
        for (int c = 0; c < nc; c++) {
            const __m512i corr = _mm512_set1_epi32(x_corr[c]);
            for (int g = 0; g < ng; g++) dot[g][c] = corr;
        }
        for (int s = 0; s < 8; s++) {
            __m512i wv[Q8_0_CHUNK_GROUPS];
            for (int g = 0; g < ng; g++) {
                const uint8_t *run = wp[g] + 2 * group_rows + s * run_bytes;
                __builtin_prefetch(run + prefetch_bytes, 0, 2); /* into L2 (see chunk_quantized) */
                wv[g] = _mm512_xor_si512(full ? _mm512_loadu_si512((const void *)run)
                                              : _mm512_maskz_loadu_epi32(rows, (const void *)run),
                                         sign_bits);
            }
            for (int c = 0; c < nc; c++) {
                int32_t four;
                memcpy(&four, xp + LMD_Q8_0_BLOCK * c + 4 * s, 4);
                const __m512i xv = _mm512_set1_epi32(four);
                for (int g = 0; g < ng; g++) dot[g][c] = _mm512_dpbusd_epi32(dot[g][c], wv[g], xv);
            }
        }
        for (int g = 0; g < ng; g++) {
            const __m512 w_scale = _mm512_cvtph_ps(full ? _mm256_loadu_si256((const __m256i *)(const void *)wp[g])
                                                        : _mm256_maskz_loadu_epi16(rows, (const void *)wp[g]));
            for (int c = 0; c < nc; c++) {
                const __m512 scale = _mm512_mul_ps(w_scale, _mm512_set1_ps(x_scale[c]));
                acc[g][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[g][c]), scale, acc[g][c]);
            }
            wp[g] += block_bytes;
        }
        xp += x.stride * LMD_Q8_0_BLOCK;
        x_scale += x.stride;
        x_corr += x.stride;
    }
    store_tile(out, acc, ng, group_rows, c0, nc, d, r0);
}
#else
#define LMD_Q8_0_VNNI 0
#endif

// ng groups of group_rows rows against inputs c0..c0+nc: the products and order of the
// VNNI tile in portable C (CPUs without AVX2, and the short last group of rows with AVX2)
static ALWAYS_INLINE void tile_q8_0_portable(float *out, q8_inputs x, const uint8_t *wg, int64_t n, int64_t d,
                                             int64_t r0, int ng, int group_rows, int c0, int nc) {
    const int64_t n_blocks = n / LMD_Q8_0_BLOCK;
    const size_t group_bytes = (size_t)n_blocks * Q8_0_GROUP_BYTES_PER_BLOCK;
    for (int g = 0; g < ng; g++)
        for (int c = c0; c < c0 + nc; c++) {
            float acc[LMD_Q8_0_GROUP] = {0};
            for (int64_t b = 0; b < n_blocks; b++) {
                const uint8_t *block = wg + g * group_bytes + (size_t)b * group_rows * LMD_Q8_0_BLOCK_BYTES;
                const int8_t *runs = (const int8_t *)(const void *)(block + 2 * group_rows);
                int32_t dot[LMD_Q8_0_GROUP] = {0};
                for (int s = 0; s < 8; s++)
                    for (int i = 0; i < group_rows; i++)
                        for (int j = 0; j < 4; j++)
                            dot[i] += (int32_t)runs[(s * group_rows + i) * 4 + j] *
                                      x.q[(b * x.stride + c) * LMD_Q8_0_BLOCK + 4 * s + j];
                const float x_scale = x.scale[b * x.stride + c];
                for (int i = 0; i < group_rows; i++) {
                    uint16_t scale_bits;
                    memcpy(&scale_bits, block + 2 * i, 2);
                    acc[i] = fmaf((float)dot[i], half_to_float(scale_bits) * x_scale, acc[i]);
                }
            }
            for (int i = 0; i < group_rows; i++) out[(int64_t)c * d + r0 + g * LMD_Q8_0_GROUP + i] = acc[i];
        }
}

/* q4_0 and q4_1 matrices (ops.h) against the inputs quantized as for q8_0. A run of a
 * group's 16 rows x 4 bytes holds two runs of values, the low and the high halves, which
 * meet 4 input bytes each in q8_0's unsigned-by-signed products (4-bit values are unsigned
 * already). Per block and row, from the exact integer dot products, as lmd_dot_q4:
 *     q4_0  acc = fma((float)(dot + corr / 16), d * x_scale, acc)   (corr / 16 = -8 * sum(xq))
 *     q4_1  acc = fma((float)dot, d * x_scale, acc), then acc = fma((float)sum(xq), m * x_scale, acc)
 * block after block. */

// bytes of a group's block column before its runs of values, per row: the fp16 scale, and
// the minimum for q4_1
#define Q4_HEADER(with_min) ((with_min) ? 4 : 2)
#define Q4_BLOCK_BYTES(with_min) ((with_min) ? LMD_Q4_1_BLOCK_BYTES : LMD_Q4_0_BLOCK_BYTES)

// ng groups of group_rows rows against inputs c0..c0+nc in portable C: the products and order
// of the vector tiles (CPUs without AVX2, and the short last group of rows)
static ALWAYS_INLINE void tile_q4_portable(float *out, q8_inputs x, const uint8_t *wg, int64_t n, int64_t d,
                                           int64_t r0, int ng, int group_rows, int c0, int nc, const int with_min) {
    const int64_t n_blocks = n / LMD_Q8_0_BLOCK;
    const size_t block_bytes = Q4_BLOCK_BYTES(with_min), group_bytes = (size_t)n_blocks * LMD_Q8_0_GROUP * block_bytes;
    for (int g = 0; g < ng; g++)
        for (int c = c0; c < c0 + nc; c++) {
            float acc[LMD_Q8_0_GROUP] = {0};
            for (int64_t b = 0; b < n_blocks; b++) {
                const uint8_t *block = wg + g * group_bytes + (size_t)b * group_rows * block_bytes;
                const uint8_t *runs = block + Q4_HEADER(with_min) * group_rows;
                const int8_t *xq = x.q + (b * x.stride + c) * LMD_Q8_0_BLOCK;
                const int32_t corr = x.corr[b * x.stride + c];
                int32_t dot[LMD_Q8_0_GROUP] = {0};
                for (int s = 0; s < 4; s++)
                    for (int i = 0; i < group_rows; i++)
                        for (int j = 0; j < 4; j++) {
                            const uint8_t byte = runs[(s * group_rows + i) * 4 + j];
                            dot[i] += (int32_t)(byte & 15) * xq[4 * s + j] + (int32_t)(byte >> 4) * xq[16 + 4 * s + j];
                        }
                const float x_scale = x.scale[b * x.stride + c];
                for (int i = 0; i < group_rows; i++) {
                    uint16_t d_bits, m_bits;
                    memcpy(&d_bits, block + 2 * i, 2);
                    acc[i] = fmaf((float)(with_min ? dot[i] : dot[i] + corr / 16), half_to_float(d_bits) * x_scale, acc[i]);
                    if (with_min) {
                        memcpy(&m_bits, block + 2 * group_rows + 2 * i, 2);
                        acc[i] = fmaf((float)(-corr / 128), half_to_float(m_bits) * x_scale, acc[i]);
                    }
                }
            }
            for (int i = 0; i < group_rows; i++) out[(int64_t)c * d + r0 + g * LMD_Q8_0_GROUP + i] = acc[i];
        }
}

#if LMD_Q8_0_VNNI
// q8_0's VNNI tile for q4 values: ng groups of group_rows rows from wg, inputs c0..c0+nc
static ALWAYS_INLINE void tile_q4(float *out, q8_inputs x, const uint8_t *wg, int64_t n, int64_t d, int64_t r0,
                                  int ng, int group_rows, int c0, int nc, int64_t prefetch_bytes, const int with_min) {
    const int64_t n_blocks = n / LMD_Q8_0_BLOCK;
    const size_t group_bytes = (size_t)n_blocks * LMD_Q8_0_GROUP * Q4_BLOCK_BYTES(with_min);
    const size_t block_bytes = (size_t)group_rows * Q4_BLOCK_BYTES(with_min), run_bytes = 4 * (size_t)group_rows;
    const size_t header = (size_t)group_rows * Q4_HEADER(with_min);
    const __mmask16 rows = (__mmask16)((1u << group_rows) - 1u);
    const int full = group_rows == LMD_Q8_0_GROUP;
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    __m512 acc[Q8_0_CHUNK_GROUPS][Q8_0_TILE_C];
    const uint8_t *wp[Q8_0_CHUNK_GROUPS];
    start_tile(acc, wp, wg, group_bytes, ng, nc);
    const int8_t *xp = x.q + (int64_t)c0 * LMD_Q8_0_BLOCK;
    const float *x_scale = x.scale + c0;
    const int32_t *x_corr = x.corr + c0;
    for (int64_t b = 0; b < n_blocks; b++) {
        __m512i dot[Q8_0_CHUNK_GROUPS][Q8_0_TILE_C];
        for (int c = 0; c < nc; c++) {
            const __m512i start = _mm512_set1_epi32(with_min ? 0 : x_corr[c] / 16);
            for (int g = 0; g < ng; g++) dot[g][c] = start;
        }
        for (int s = 0; s < 4; s++) {
            __m512i lo[Q8_0_CHUNK_GROUPS], hi[Q8_0_CHUNK_GROUPS];
            for (int g = 0; g < ng; g++) {
                const uint8_t *run = wp[g] + header + s * run_bytes;
                __builtin_prefetch(run + prefetch_bytes, 0, 2); /* into L2 (see chunk_quantized) */
                const __m512i v = full ? _mm512_loadu_si512((const void *)run) : _mm512_maskz_loadu_epi32(rows, (const void *)run);
                lo[g] = _mm512_and_si512(v, low4);
                hi[g] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
            }
            for (int c = 0; c < nc; c++) {
                int32_t four_lo, four_hi;
                memcpy(&four_lo, xp + LMD_Q8_0_BLOCK * c + 4 * s, 4);
                memcpy(&four_hi, xp + LMD_Q8_0_BLOCK * c + 16 + 4 * s, 4);
                const __m512i xl = _mm512_set1_epi32(four_lo), xh = _mm512_set1_epi32(four_hi);
                for (int g = 0; g < ng; g++)
                    dot[g][c] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(dot[g][c], lo[g], xl), hi[g], xh);
            }
        }
        for (int g = 0; g < ng; g++) {
            const __m512 w_scale = _mm512_cvtph_ps(full ? _mm256_loadu_si256((const __m256i *)(const void *)wp[g])
                                                        : _mm256_maskz_loadu_epi16(rows, (const void *)wp[g]));
            __m512 w_min = _mm512_setzero_ps();
            if (with_min) {
                const void *mins = wp[g] + 2 * group_rows;
                w_min = _mm512_cvtph_ps(full ? _mm256_loadu_si256((const __m256i *)mins) : _mm256_maskz_loadu_epi16(rows, mins));
            }
            for (int c = 0; c < nc; c++) {
                const __m512 xs = _mm512_set1_ps(x_scale[c]);
                acc[g][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[g][c]), _mm512_mul_ps(w_scale, xs), acc[g][c]);
                if (with_min)
                    acc[g][c] = _mm512_fmadd_ps(_mm512_set1_ps((float)(-x_corr[c] / 128)), _mm512_mul_ps(w_min, xs),
                                                acc[g][c]);
            }
            wp[g] += block_bytes;
        }
        xp += x.stride * LMD_Q8_0_BLOCK;
        x_scale += x.stride;
        x_corr += x.stride;
    }
    store_tile(out, acc, ng, group_rows, c0, nc, d, r0);
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LMD_QUANTIZED_AVX2 1
/* AVX2 (and AVX-VNNI) tiles of all three quantized types: a group's 16 rows as two halves of
 * 8 int32 lanes. A block column of a group stores its 16 fp16 scales (q4_1: then its 16
 * minimums), then runs of 16 rows x 4 bytes: half h's 8 scales at +16 h, its part of run s
 * at header + 64 s + 32 h. Each 4-byte run sums exactly, by VPDPBUSD where the CPU has
 * AVX-VNNI, else by VPMADDUBSW and VPMADDWD: unsigned bytes by signed ones, so q8_0 takes
 * |w| against the input with w's sign (VPSIGNB; pairs of at most 2 * 128 * 127, no
 * saturation), and q4's 4-bit values are unsigned already (pairs of at most 2 * 15 * 127).
 *
 * A decode reads each weight once, from memory, and a Zen 3 core streams 12.6 GB/s from
 * one sequential read but 17.7 GB/s from four interleaved ones (more misses in flight): a
 * tile therefore takes its ng groups (up to 4), both halves of each, side by side, the 8
 * integer sums of one input (q8_0 decode 1.4-1.6 x faster than a half at a time). More
 * inputs take turns within a block column, whose weights stay in L1. The first turn
 * prefetches as the AVX-512 tiles do (see chunk_quantized): the 110M Llama's decode in this
 * build on one Zen 4 thread q8_0 126 -> 142 tok/s, q4_0 158 -> 200 (medians of 5 fresh
 * processes, faster in 5 of 5 each). */
#define QUANTIZED_AVX2_SUMS 8
static ALWAYS_INLINE void tile_quantized_avx2(float *out, q8_inputs x, const uint8_t *wg, int64_t n, int64_t d,
                                              int64_t r0, int ng, int c0, int nc, int64_t prefetch_bytes,
                                              const lmd_dtype dtype) {
    const int q4 = dtype != LMD_Q8_0, with_min = dtype == LMD_Q4_1;
    const int64_t n_blocks = n / LMD_Q8_0_BLOCK;
    const size_t block_bytes = LMD_Q8_0_GROUP * (q4 ? Q4_BLOCK_BYTES(with_min) : LMD_Q8_0_BLOCK_BYTES);
    const size_t header = LMD_Q8_0_GROUP * (q4 ? Q4_HEADER(with_min) : 2), group_bytes = (size_t)n_blocks * block_bytes;
    const int runs = q4 ? 4 : 8, per_turn = QUANTIZED_AVX2_SUMS / (2 * ng); /* inputs summed together */
#if !defined(__AVXVNNI__)
    const __m256i ones16 = _mm256_set1_epi16(1);
#endif
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    __m256 acc[Q8_0_CHUNK_GROUPS][2][Q8_0_TILE_C];
    const uint8_t *wp[Q8_0_CHUNK_GROUPS];
    for (int g = 0; g < ng; g++) {
        wp[g] = wg + g * group_bytes;
        for (int h = 0; h < 2; h++)
            for (int c = 0; c < nc; c++) acc[g][h][c] = _mm256_setzero_ps();
    }
    /* block b of input c0 + c: values at xp + 32 c, scale and correction at [c] */
    const int8_t *xp = x.q + (int64_t)c0 * LMD_Q8_0_BLOCK;
    const float *x_scale = x.scale + c0;
    const int32_t *x_corr = x.corr + c0;
    for (int64_t b = 0; b < n_blocks; b++) {
        for (int t = 0; t < nc; t += per_turn) {
            const int m = nc - t < per_turn ? nc - t : per_turn;
            __m256i dot[Q8_0_CHUNK_GROUPS][2][QUANTIZED_AVX2_SUMS / 2];
            for (int c = 0; c < m; c++) {
                /* q4_0's values are stored + 8: its sums start from -8 * sum(xq) */
                const __m256i start = _mm256_set1_epi32(q4 && !with_min ? x_corr[t + c] / 16 : 0);
                for (int g = 0; g < ng; g++)
                    for (int h = 0; h < 2; h++) dot[g][h][c] = start;
            }
            for (int s = 0; s < runs; s++) {
                __m256i xv[QUANTIZED_AVX2_SUMS / 2], xv_high[QUANTIZED_AVX2_SUMS / 2];
                for (int c = 0; c < m; c++) {
                    int32_t four;
                    memcpy(&four, xp + LMD_Q8_0_BLOCK * (t + c) + 4 * s, 4);
                    xv[c] = _mm256_set1_epi32(four);
                    if (q4) { /* the high halves hold values 16 + 4 s .. */
                        memcpy(&four, xp + LMD_Q8_0_BLOCK * (t + c) + 16 + 4 * s, 4);
                        xv_high[c] = _mm256_set1_epi32(four);
                    }
                }
                for (int g = 0; g < ng; g++)
                    for (int h = 0; h < 2; h++) {
                        if (prefetch_bytes && t == 0 && h == 0) /* into L2 (see chunk_quantized) */
                            __builtin_prefetch(wp[g] + header + 64 * s + prefetch_bytes, 0, 2);
                        const __m256i w =
                            _mm256_loadu_si256((const __m256i *)(const void *)(wp[g] + header + 64 * s + 32 * h));
                        const __m256i w_low = q4 ? _mm256_and_si256(w, low4) : _mm256_abs_epi8(w);
                        const __m256i w_high = _mm256_and_si256(_mm256_srli_epi16(w, 4), low4);
                        for (int c = 0; c < m; c++) {
                            const __m256i x_low = q4 ? xv[c] : _mm256_sign_epi8(xv[c], w);
#if defined(__AVXVNNI__)
                            dot[g][h][c] = _mm256_dpbusd_avx_epi32(dot[g][h][c], w_low, x_low);
                            if (q4) dot[g][h][c] = _mm256_dpbusd_avx_epi32(dot[g][h][c], w_high, xv_high[c]);
#else
                            dot[g][h][c] = _mm256_add_epi32(dot[g][h][c],
                                                            _mm256_madd_epi16(_mm256_maddubs_epi16(w_low, x_low), ones16));
                            if (q4)
                                dot[g][h][c] = _mm256_add_epi32(
                                    dot[g][h][c], _mm256_madd_epi16(_mm256_maddubs_epi16(w_high, xv_high[c]), ones16));
#endif
                        }
                    }
            }
            for (int g = 0; g < ng; g++)
                for (int h = 0; h < 2; h++) {
                    const __m256 w_scale = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(wp[g] + 16 * h)));
                    const __m256 w_min =
                        with_min ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(wp[g] + 32 + 16 * h)))
                                 : _mm256_setzero_ps();
                    for (int c = 0; c < m; c++) {
                        const __m256 xs = _mm256_set1_ps(x_scale[t + c]);
                        __m256 *a = &acc[g][h][t + c];
                        *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[g][h][c]), _mm256_mul_ps(w_scale, xs), *a);
                        if (with_min) /* + m * sum(xq) = -corr / 128 */
                            *a = _mm256_fmadd_ps(_mm256_set1_ps((float)(-x_corr[t + c] / 128)), _mm256_mul_ps(w_min, xs), *a);
                    }
                }
        }
        for (int g = 0; g < ng; g++) wp[g] += block_bytes;
        xp += x.stride * LMD_Q8_0_BLOCK;
        x_scale += x.stride;
        x_corr += x.stride;
    }
    for (int g = 0; g < ng; g++)
        for (int h = 0; h < 2; h++)
            for (int c = 0; c < nc; c++)
                _mm256_storeu_ps(out + (int64_t)(c0 + c) * d + r0 + g * LMD_Q8_0_GROUP + 8 * h, acc[g][h][c]);
}
#else
#define LMD_QUANTIZED_AVX2 0
#endif

// the tile of a quantized storage type (a constant): q8_0, q4_0 or q4_1
static ALWAYS_INLINE void tile_quantized(float *out, q8_inputs x, const uint8_t *wg, int64_t n, int64_t d, int64_t r0,
                                         int ng, int group_rows, int c0, int nc, int64_t prefetch_bytes,
                                         const lmd_dtype dtype) {
#if LMD_Q8_0_VNNI
    if (dtype == LMD_Q8_0) tile_q8_0(out, x, wg, n, d, r0, ng, group_rows, c0, nc, prefetch_bytes);
    else tile_q4(out, x, wg, n, d, r0, ng, group_rows, c0, nc, prefetch_bytes, dtype == LMD_Q4_1);
#else
#if LMD_QUANTIZED_AVX2
    if (group_rows == LMD_Q8_0_GROUP) { /* the short last group of rows runs in portable C */
        tile_quantized_avx2(out, x, wg, n, d, r0, ng, c0, nc, prefetch_bytes, dtype);
        return;
    }
#else
    (void)prefetch_bytes;
#endif
    if (dtype == LMD_Q8_0) tile_q8_0_portable(out, x, wg, n, d, r0, ng, group_rows, c0, nc);
    else tile_q4_portable(out, x, wg, n, d, r0, ng, group_rows, c0, nc, dtype == LMD_Q4_1);
#endif
}

// full groups ng of rows from wg, output feature r0, against inputs c0 .. c0 + nc - 1
#define TILE_ANY_C(wg, r0, ng, c0, nc)                                                              \
    switch (nc) {                                                                                   \
    case 1: tile_quantized(out, x, wg, n, d, r0, ng, LMD_Q8_0_GROUP, c0, 1, prefetch_bytes, dtype); break; \
    case 2: tile_quantized(out, x, wg, n, d, r0, ng, LMD_Q8_0_GROUP, c0, 2, prefetch_bytes, dtype); break; \
    case 3: tile_quantized(out, x, wg, n, d, r0, ng, LMD_Q8_0_GROUP, c0, 3, prefetch_bytes, dtype); break; \
    case 4: tile_quantized(out, x, wg, n, d, r0, ng, LMD_Q8_0_GROUP, c0, 4, prefetch_bytes, dtype); break; \
    case 5: tile_quantized(out, x, wg, n, d, r0, ng, LMD_Q8_0_GROUP, c0, 5, prefetch_bytes, dtype); break; \
    default: tile_quantized(out, x, wg, n, d, r0, ng, LMD_Q8_0_GROUP, c0, 6, prefetch_bytes, dtype); break; \
    }
// the same for a chunk's first ng full groups and one or two inputs
#define TILE_1_OR_2_C(ng, c0, nc)                                                                   \
    if ((nc) == 1) tile_quantized(out, x, wg, n, d, r0, ng, LMD_Q8_0_GROUP, c0, 1, prefetch_bytes, dtype); \
    else tile_quantized(out, x, wg, n, d, r0, ng, LMD_Q8_0_GROUP, c0, 2, prefetch_bytes, dtype);

// bytes of one block column of a group of 16 rows in a quantized storage type
static size_t group_block_bytes(lmd_dtype dtype) {
    return LMD_Q8_0_GROUP * (dtype == LMD_Q8_0 ? LMD_Q8_0_BLOCK_BYTES : q4_block_bytes(dtype));
}

// groups g0 .. g0 + ng - 1 (ng <= Q8_0_CHUNK_GROUPS) of W (d, n) in a quantized type (a
// constant) against the B inputs x -> out (B, d); prefetch_bytes ahead, the next such chunk
// of the weights (0: none)
static ALWAYS_INLINE void chunk_quantized(float *out, q8_inputs x, const uint8_t *w, int64_t n, int64_t d, int64_t g0,
                                          int ng, int B, int64_t prefetch_ahead, const lmd_dtype dtype) {
    const size_t group_bytes = (size_t)(n / LMD_Q8_0_BLOCK) * group_block_bytes(dtype);
    const int64_t r0 = g0 * LMD_Q8_0_GROUP;
    const uint8_t *wg = w + g0 * group_bytes;
    const int64_t rows = d - r0 < ng * LMD_Q8_0_GROUP ? d - r0 : ng * LMD_Q8_0_GROUP;
    const int full_groups = (int)(rows / LMD_Q8_0_GROUP), tail_rows = (int)(rows % LMD_Q8_0_GROUP);
#if LMD_Q8_0_VNNI
    /* AVX-512's 32 registers hold a tile of 4 groups x 2 inputs (8 integer sums, 8 float
     * accumulators, 4 weight vectors) or of 2 groups x 6 inputs, not 4 x 6: one or two
     * inputs (decoding) meet all the chunk's groups at once, more inputs take 6 at a time
     * over each pair of groups (passes after the first find the chunk in L2). 3-4 inputs ran
     * as fast either way (as 4 x 2 tiles twice, 2 x 4 tiles over the pairs); a 512-token
     * prefill too. */
    const int tile_c = B <= 2 ? 2 : Q8_0_TILE_C;
#else
    const int tile_c = Q8_0_TILE_C;
#endif
    for (int c0 = 0; c0 < B; c0 += tile_c) {
        const int nc = B - c0 < tile_c ? B - c0 : tile_c;
        /* the first pass over the chunk's weights fetches the next chunk's (the rows are a
         * contiguous stream; the later passes find this chunk's in cache), into L2 rather
         * than L1: a chunk is 52-140 kB of the 110M Llama's weights, more than a 32 kB L1
         * holds beside the chunk being read. Prefetching into L1 (prefetcht0), as this did
         * first, decoded 12-24% slower on a Zen 4 (q8_0 one thread 118 -> 134 tok/s, two
         * threads 159 -> 197, q4_0 175 -> 195; medians of 6 fresh processes each, builds
         * alternating); twice as far ahead gained nothing more, half as far lost 6%. */
        const int64_t prefetch_bytes = c0 == 0 ? prefetch_ahead : 0;
#if LMD_Q8_0_VNNI
        if (nc > 2) {
            for (int gp = 0; gp < full_groups; gp += 2) {
                const uint8_t *wg_pair = wg + gp * group_bytes;
                const int64_t r0_pair = r0 + gp * LMD_Q8_0_GROUP;
                if (full_groups - gp >= 2) TILE_ANY_C(wg_pair, r0_pair, 2, c0, nc)
                else TILE_ANY_C(wg_pair, r0_pair, 1, c0, nc)
            }
        } else {
            switch (full_groups) {
            case 0: break;
            case 1: TILE_1_OR_2_C(1, c0, nc) break;
            case 2: TILE_1_OR_2_C(2, c0, nc) break;
            case 3: TILE_1_OR_2_C(3, c0, nc) break;
            default: TILE_1_OR_2_C(4, c0, nc) break;
            }
        }
#else
        switch (full_groups) {
        case 0: break;
        case 1: TILE_ANY_C(wg, r0, 1, c0, nc) break;
        case 2: TILE_ANY_C(wg, r0, 2, c0, nc) break;
        case 3: TILE_ANY_C(wg, r0, 3, c0, nc) break;
        default: TILE_ANY_C(wg, r0, 4, c0, nc) break;
        }
#endif
        if (tail_rows > 0) {
            const uint8_t *tail = wg + full_groups * group_bytes;
            const int64_t tail_r0 = r0 + full_groups * LMD_Q8_0_GROUP;
            for (int c = c0; c < c0 + nc; c++) tile_quantized(out, x, tail, n, d, tail_r0, 1, tail_rows, c, 1, 0, dtype);
        }
    }
}

// one thread's share of W's groups, g_begin .. g_end - 1, chunk by chunk of Q8_0_CHUNK_GROUPS
static ALWAYS_INLINE void slice_quantized(float *out, q8_inputs x, const uint8_t *w, int64_t n, int64_t d,
                                          int64_t g_begin, int64_t g_end, int B, const lmd_dtype dtype) {
    const int64_t chunk_bytes = Q8_0_CHUNK_GROUPS * (int64_t)((size_t)(n / LMD_Q8_0_BLOCK) * group_block_bytes(dtype));
    for (int64_t g = g_begin; g < g_end; g += Q8_0_CHUNK_GROUPS) {
        const int ng = g_end - g < Q8_0_CHUNK_GROUPS ? (int)(g_end - g) : Q8_0_CHUNK_GROUPS;
        const int next_full = g + ng + Q8_0_CHUNK_GROUPS <= g_end;
        chunk_quantized(out, x, w, n, d, g, ng, B, next_full ? chunk_bytes : 0, dtype);
    }
}

static void slice_q8_0(float *out, q8_inputs x, const uint8_t *w, int64_t n, int64_t d, int64_t g_begin,
                       int64_t g_end, int B) {
    slice_quantized(out, x, w, n, d, g_begin, g_end, B, LMD_Q8_0);
}
static void slice_q4_0(float *out, q8_inputs x, const uint8_t *w, int64_t n, int64_t d, int64_t g_begin,
                       int64_t g_end, int B) {
    slice_quantized(out, x, w, n, d, g_begin, g_end, B, LMD_Q4_0);
}
static void slice_q4_1(float *out, q8_inputs x, const uint8_t *w, int64_t n, int64_t d, int64_t g_begin,
                       int64_t g_end, int B) {
    slice_quantized(out, x, w, n, d, g_begin, g_end, B, LMD_Q4_1);
}

// where B quantized inputs of n features sit in scratch (lmd_matmul_scratch_bytes)
static q8_inputs q8_inputs_in(const void *scratch, int B, int64_t n) {
    const int8_t *q = (const int8_t *)scratch;
    const float *scale = (const float *)(const void *)(q + (int64_t)B * n);
    return (q8_inputs){q, scale, (const int32_t *)(const void *)(scale + (int64_t)B * (n / LMD_Q8_0_BLOCK)), B};
}

// x (B, n) -> the quantized inputs in scratch, laid out as q8_inputs_in reads them
static void quantize_inputs_q8(void *scratch, const float *x, int B, int64_t n) {
    const int64_t n_blocks = n / LMD_Q8_0_BLOCK;
    int8_t *q = (int8_t *)scratch;
    float *scale = (float *)(void *)(q + (int64_t)B * n);
    int32_t *corr = (int32_t *)(void *)(scale + (int64_t)B * n_blocks);
    for (int64_t k = 0; k < n_blocks; k++)
        for (int b = 0; b < B; b++)
            quantize_block_input_q8(q + (k * B + b) * LMD_Q8_0_BLOCK, scale + k * B + b, corr + k * B + b,
                                    x + (int64_t)b * n + k * LMD_Q8_0_BLOCK);
}

/* Parallel regions cost a few microseconds; below this many multiply-adds one thread is faster. */
#define MATMUL_PARALLEL_MIN_WORK 200000

/* Bytes of a batch's inputs the weight rows pass in one group (L2 is 0.5-2 MB per core). */
#ifndef L2_INPUT_BUDGET
#define L2_INPUT_BUDGET (512 * 1024)
#endif


/* LOOPS(pragma) -- a product's loops, whose work-item loop follows `pragma` -- run by a
 * team of threads splitting the work items statically when the product is worth it,
 * else on the calling thread */
#ifdef _OPENMP
/* Whether a product of B x d x n multiply-adds is worth a parallel region. Entering one
 * costs microseconds (and libgomp allocates a team) even for one thread. */
static int parallel_worth(int B, int64_t d, int64_t n) {
    return (int64_t)B * d * n >= MATMUL_PARALLEL_MIN_WORK && lmd_get_num_threads() > 1;
}
#define IN_PARALLEL_IF_WORTH(B, d, n, LOOPS)                                                        \
    do {                                                                                           \
        if (parallel_worth(B, d, n)) {                                                             \
            _Pragma("omp parallel num_threads(lmd_get_num_threads())")                             \
            LOOPS(_Pragma("omp for schedule(static)"))                                             \
        } else {                                                                                   \
            LOOPS()                                                                                \
        }                                                                                          \
    } while (0)
#else
#define IN_PARALLEL_IF_WORTH(B, d, n, LOOPS) LOOPS()
#endif

// W (d, n) q8_0, q4_0 or q4_1 @ the B inputs quantized in scratch -> out (B, d)
static void matmul_quantized(float *out, const lmd_matrix *w, int B, const void *scratch) {
    const int64_t d = w->rows, n = w->cols, n_blocks = n / LMD_Q8_0_BLOCK;
    const q8_inputs xq = q8_inputs_in(scratch, B, n);
    void (*const slice_of)(float *, q8_inputs, const uint8_t *, int64_t, int64_t, int64_t, int64_t, int) =
        w->dtype == LMD_Q8_0 ? slice_q8_0 : w->dtype == LMD_Q4_0 ? slice_q4_0 : slice_q4_1;
    const int64_t n_groups = (d + LMD_Q8_0_GROUP - 1) / LMD_Q8_0_GROUP;
    /* one slice of the groups per thread, as even as groups allow (chunks of 4 groups as
     * work items would leave a thread idle for a quarter of a 576-row matrix) */
#ifdef _OPENMP
    const int n_slices = parallel_worth(B, d, n) ? lmd_get_num_threads() : 1;
#else
    const int n_slices = 1;
#endif
    const uint8_t *data = (const uint8_t *)w->data;
    /* inputs in groups that stay in L2 while all the weights pass them (as for f32 below) */
    int pass_inputs = (int)(L2_INPUT_BUDGET / (n + 8 * n_blocks)) / Q8_0_TILE_C * Q8_0_TILE_C;
    if (pass_inputs < Q8_0_TILE_C) pass_inputs = Q8_0_TILE_C;
    if (pass_inputs > B) pass_inputs = B;
#define SLICES_OF_PASS(slice_loop_pragma)                                                           \
    for (int i0 = 0; i0 < B; i0 += pass_inputs) {                                                   \
        const q8_inputs gx = {xq.q + (int64_t)i0 * LMD_Q8_0_BLOCK, xq.scale + i0, xq.corr + i0,     \
                              xq.stride};                                                           \
        slice_loop_pragma                                                                           \
        for (int slice = 0; slice < n_slices; slice++)                                              \
            slice_of(out + (int64_t)i0 * d, gx, data, n, d, n_groups * slice / n_slices,            \
                     n_groups * (slice + 1) / n_slices, B - i0 < pass_inputs ? B - i0 : pass_inputs); \
    }
    IN_PARALLEL_IF_WORTH(B, d, n, SLICES_OF_PASS);
#undef SLICES_OF_PASS
}

/* ------------------------------------------------------------------ */
/* f32 panels                                                           */
/* ------------------------------------------------------------------ */

/* LMD_F32_PANELS (ops.h): LMD_VEC_LANES weight rows side by side, one vector per column, so
 * that each output is one lane of an accumulator and never needs the lane reduction of the
 * row-major kernels. A matrix of a few dozen columns spends as much on those reductions as on
 * its multiply-adds (a 64-column row is four FMAs, a four-row total ~15 shuffles and adds);
 * in panels each input feature is broadcast once and meets every panel's column vector.
 * Every output sums its products in column order, whatever the tile, the batch or the thread
 * count, in blocks of PANEL_K_BLOCK columns: one FMA chain from 0 per block, the block sums
 * added in order (out = block 0, out += block 1, ...). One chain over all 2048 columns of a
 * feed-forward row had let rounding errors grow with the length (an AVX2 build's logits
 * drifted measurably further from a float64 reference); the blocks cost one load and add
 * per 64 multiply-adds. */
#define PANEL_LANES LMD_VEC_LANES
#define PANEL_TILE_P 4 /* panels x inputs: 24 accumulators in AVX-512's 32 registers */
#define PANEL_TILE_C 6
/* With 16 registers (AVX2) a tile of 4 panels takes at most 2 inputs: more run as tiles of 2
 * inputs (and 1) over the same 4 panels and block of columns, the later ones from L1. Split
 * by panels instead, each tile read 2 weight streams where 4 keep more misses in flight (4
 * inputs 1.1-1.5 x slower). Decoding keeps 4 chains in flight: with 2, bf16 panels (two
 * dependent multiply-adds per column pair) waited on the FMA latency. */
#define PANEL_TILE_SPLIT(np_, nc_) (LMD_VEC_BYTES < 64 && (np_) > 2 && (nc_) > 2)
#define PANEL_SLICE 64 /* inputs per parallel work item */
#define PANEL_K_BLOCK 64 /* columns per FMA chain */
/* a panel's columns of column_bytes in one 64-byte cache line (blocks start at a line) */
#define COLUMNS_PER_LINE(column_bytes) ((column_bytes) >= 64 ? 1 : 64 / (column_bytes))

size_t lmd_panels_bytes(int64_t rows, int64_t cols) {
    return (size_t)((rows + PANEL_LANES - 1) / PANEL_LANES) * (size_t)cols * PANEL_LANES * sizeof(float);
}

// lmd_pack_<name>_panels: w (rows, cols) row-major elements of type T -> out in panels of
// PANEL_LANES rows, column by column, zero past the last row (typed loops: a model's load
// packs all its weights, 440 MB of f32 in 0.11 s on one thread; through memcpy of the
// element size it took twice that)
#ifdef _OPENMP
#define PACK_IN_PARALLEL                                                                            \
    _Pragma("omp parallel for schedule(static) num_threads(lmd_get_num_threads()) if (rows * cols >= (1 << 20))")
#else
#define PACK_IN_PARALLEL
#endif
#define DEFINE_PACK_PANELS(name, T)                                                                 \
    void lmd_pack_##name##_panels(T *out, const T *w, int64_t rows, int64_t cols) {                \
        const int64_t n_panels = (rows + PANEL_LANES - 1) / PANEL_LANES;                            \
        PACK_IN_PARALLEL                                                                            \
        for (int64_t p = 0; p < n_panels; p++)                                                      \
            for (int64_t k = 0; k < cols; k++)                                                      \
                for (int64_t j = 0; j < PANEL_LANES; j++) {                                         \
                    const int64_t r = p * PANEL_LANES + j;                                          \
                    out[(p * cols + k) * PANEL_LANES + j] = r < rows ? w[r * cols + k] : (T)0;      \
                }                                                                                   \
    }
DEFINE_PACK_PANELS(f32, float)
DEFINE_PACK_PANELS(f16, uint16_t)
#undef DEFINE_PACK_PANELS
#undef PACK_IN_PARALLEL

size_t lmd_f16_panels_bytes(int64_t rows, int64_t cols) { return lmd_panels_bytes(rows, cols) / 2; }

/* LMD_F16_PANELS (packed above): halves where the f32 panels hold floats, widened by one
 * VCVTPH2PS per column vector (F16C / AVX-512; portable builds convert lane by lane). Half
 * the bytes of f32 for a decode that streams its weights, and the very same sums. */

// one block's sums acc[p][c] of panels p0..p0+np and inputs c0..c0+nc into out (B, d): stored
// by the first block, added by the next (the rows past d dropped)
static ALWAYS_INLINE void store_block_sums(float *out, vf acc[PANEL_TILE_P][PANEL_TILE_C], int64_t d, int64_t p0,
                                           int np, int c0, int nc, int first) {
    for (int p = 0; p < np; p++) {
        const int64_t row = (p0 + p) * PANEL_LANES, m = d - row;
        for (int c = 0; c < nc; c++) {
            float *o = out + (int64_t)(c0 + c) * d + row;
            if (m >= PANEL_LANES) vstore(o, first ? acc[p][c] : vload(o) + acc[p][c]);
            else vstore_partial(o, first ? acc[p][c] : vload_partial(o, m, 0.0f) + acc[p][c], m);
        }
    }
}

// columns k0..k_end of panels p0..p0+np of W (panels, n, LANES), floats or (f16, a constant)
// halves, against inputs c0..c0+nc of x (B, n): one FMA chain per output over the block,
// stored into out (B, d) by the first block (k0 == 0) and added to it by the next; halves
// fetch the weights prefetch_bytes further on into L2 as they go (0: not)
static ALWAYS_INLINE void tile_panels(float *out, const float *x, const void *panels, int64_t n, int64_t d,
                                      int64_t p0, int np, int c0, int nc, int64_t k0, int64_t k_end,
                                      int64_t prefetch_bytes, const int f16) {
    vf acc[PANEL_TILE_P][PANEL_TILE_C];
    const float *wp[PANEL_TILE_P], *xp[PANEL_TILE_C];
    const uint16_t *hp[PANEL_TILE_P];
    for (int p = 0; p < np; p++) {
        const int64_t at = ((p0 + p) * n + k0) * PANEL_LANES;
        if (f16) hp[p] = (const uint16_t *)panels + at;
        else wp[p] = (const float *)panels + at;
        for (int c = 0; c < nc; c++) acc[p][c] = vzero_f();
    }
    for (int c = 0; c < nc; c++) xp[c] = x + (int64_t)(c0 + c) * n + k0;
    for (int64_t k = k0; k < k_end; k++) {
        vf wv[PANEL_TILE_P];
        for (int p = 0; p < np; p++) {
            if (f16) {
                if (prefetch_bytes && (k - k0) % COLUMNS_PER_LINE(PANEL_LANES * 2) == 0)
                    __builtin_prefetch((const char *)hp[p] + prefetch_bytes, 0, 2);
                wv[p] = vload_f16(hp[p]);
                hp[p] += PANEL_LANES;
            } else {
                wv[p] = vload(wp[p]);
                wp[p] += PANEL_LANES;
            }
            if (nc > 1) IN_REGISTER(wv[p]);
        }
        for (int c = 0; c < nc; c++) {
            vf xv = vbroadcast(*xp[c]++);
            IN_REGISTER(xv);
            for (int p = 0; p < np; p++) acc[p][c] = vfma(wv[p], xv, acc[p][c]);
        }
    }
    store_block_sums(out, acc, d, p0, np, c0, nc, k0 == 0);
}


/* ------------------------------------------------------------------ */
/* bf16 panels                                                          */
/* ------------------------------------------------------------------ */

/* LMD_BF16_PANELS (ops.h): bf16 weights in the panels' layout, a column pair per 32-bit lane
 * (row r's columns 2k and 2k+1 in the low and high halves), which is the operand layout of
 * the CPU's bf16 dot products: one VDPBF16PS multiplies 16 rows by a broadcast input pair.
 * Against the row-major bf16 kernel (a lane reduction per output, eight row streams at
 * once), measured on one thread through the 170 MB of bf16 layer matrices of a 12-layer
 * dim-768 Llama: one input (decoding) 31 -> 35.5 GB/s, four 1.05-1.1 x, 64 and 256 inputs
 * (prefill) 1.35 and 1.55 x. Each output sums its products in column order in blocks of
 * PANEL_K_BLOCK columns (PANEL_K_BLOCK / 2 pairs), the block sums added in order, as the f32
 * panels do: the result of an output never depends on the tile, the batch or the thread.
 * With the dot products the inputs are rounded to bf16 once per call, in pairs (the last
 * pair of an odd row has a zero high half); without them (AVX2, portable builds) each
 * weight pair is widened to two float vectors and meets the exact float inputs in two
 * FMAs, column 2k first. */
#define BF16_PAIRS(n) (((n) + 1) / 2)

/* Rows of pairs padded to a multiple of 16, AMX's tile depth, in every build: one layout
 * everywhere, and the padding costs nothing where the columns are a multiple of 32. */
#define BF16_PANEL_PAIRS_MULTIPLE 16

int64_t lmd_bf16_panel_pairs(int64_t cols) {
    return (BF16_PAIRS(cols) + BF16_PANEL_PAIRS_MULTIPLE - 1) / BF16_PANEL_PAIRS_MULTIPLE * BF16_PANEL_PAIRS_MULTIPLE;
}

size_t lmd_bf16_panels_bytes(int64_t rows, int64_t cols) {
    return (size_t)((rows + PANEL_LANES - 1) / PANEL_LANES) * (size_t)lmd_bf16_panel_pairs(cols) * PANEL_LANES *
           sizeof(uint32_t);
}

void lmd_pack_bf16_panels(void *out, const uint16_t *w, int64_t rows, int64_t cols) {
    const int64_t n_panels = (rows + PANEL_LANES - 1) / PANEL_LANES, pairs = lmd_bf16_panel_pairs(cols);
    uint32_t *o = (uint32_t *)out;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(lmd_get_num_threads()) if (rows * cols >= (1 << 20))
#endif
    for (int64_t p = 0; p < n_panels; p++)
        for (int64_t k = 0; k < pairs; k++)
            for (int64_t j = 0; j < PANEL_LANES; j++) {
                const int64_t r = p * PANEL_LANES + j;
                const uint32_t lo = r < rows && 2 * k < cols ? w[r * cols + 2 * k] : 0;
                const uint32_t hi = r < rows && 2 * k + 1 < cols ? w[r * cols + 2 * k + 1] : 0;
                o[(p * pairs + k) * PANEL_LANES + j] = lo | hi << 16;
            }
}

#if LMD_BF16_DOT
// x (B, n) floats -> xb (B, lmd_bf16_panel_pairs(n)) column pairs rounded to bf16 (nearest
// even, as round_bf16x32), zero past the last column
static void round_input_pairs_bf16(uint32_t *xb, const float *x, int B, int64_t n) {
    const int64_t pairs = lmd_bf16_panel_pairs(n);
    for (int b = 0; b < B; b++) {
        memset(xb + (int64_t)b * pairs + BF16_PAIRS(n), 0, (size_t)(pairs - BF16_PAIRS(n)) * sizeof(uint32_t));
        for (int64_t k = 0; k < n; k += 32) {
            const int64_t m = n - k < 32 ? n - k : 32;
            const float *xr = x + (int64_t)b * n + k;
            if (m == 32) {
                _mm512_storeu_si512((void *)(xb + (int64_t)b * pairs + k / 2), (__m512i)round_bf16x32(xr));
            } else { /* masked: no float past the row is read, and the padding is +0 */
                const __m512 lo = _mm512_maskz_loadu_ps((__mmask16)((1u << (m < 16 ? m : 16)) - 1), xr);
                const __m512 hi = _mm512_maskz_loadu_ps((__mmask16)(m > 16 ? (1u << (m - 16)) - 1 : 0), xr + 16);
                _mm512_mask_storeu_epi32(xb + (int64_t)b * pairs + k / 2, (__mmask16)((1u << ((m + 1) / 2)) - 1),
                                         (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
            }
        }
    }
}
#endif

// pairs k0..k_end of panels p0..p0+np of W (panels, ceil(n/2), LANES) uint32 against inputs
// c0..c0+nc: with dot products xb (B, ceil(n/2)) rounded pairs, else x (B, n) floats; one
// chain per output over the block, stored into out (B, d) by the first block and added by
// the next (as tile_panels)
static ALWAYS_INLINE void tile_bf16_panels(float *out, const float *x, const uint32_t *xb, const uint32_t *panels,
                                           int64_t n, int64_t d, int64_t p0, int np, int c0, int nc, int64_t k0,
                                           int64_t k_end, int64_t prefetch_bytes) {
    const int64_t pairs = lmd_bf16_panel_pairs(n); /* the stride of panels and rounded inputs */
    vf acc[PANEL_TILE_P][PANEL_TILE_C];
    const uint32_t *wp[PANEL_TILE_P];
    for (int p = 0; p < np; p++) {
        wp[p] = panels + ((p0 + p) * pairs + k0) * PANEL_LANES;
        for (int c = 0; c < nc; c++) acc[p][c] = vzero_f();
    }
#if LMD_BF16_DOT
    (void)x;
    const uint32_t *xp[PANEL_TILE_C];
    for (int c = 0; c < nc; c++) xp[c] = xb + (int64_t)(c0 + c) * pairs + k0;
    for (int64_t k = k0; k < k_end; k++) {
        __m512bh wv[PANEL_TILE_P];
        for (int p = 0; p < np; p++) {
            if (prefetch_bytes) __builtin_prefetch((const char *)wp[p] + prefetch_bytes, 0, 2);
            wv[p] = (__m512bh)_mm512_loadu_si512((const void *)wp[p]);
            if (nc > 1) IN_REGISTER(wv[p]);
            wp[p] += PANEL_LANES;
        }
        for (int c = 0; c < nc; c++) {
            __m512bh xv = (__m512bh)_mm512_set1_epi32((int)*xp[c]++);
            IN_REGISTER(xv);
            for (int p = 0; p < np; p++) acc[p][c] = (vf)_mm512_dpbf16_ps((__m512)acc[p][c], wv[p], xv);
        }
    }
#else
    (void)xb;
    const float *xp[PANEL_TILE_C];
    for (int c = 0; c < nc; c++) xp[c] = x + (int64_t)(c0 + c) * n + 2 * k0;
    /* the pairs whose two columns exist, then an odd row's last column alone */
    const int64_t k_whole = k_end < n / 2 ? k_end : n / 2;
    for (int64_t k = k0; k < k_whole; k++) {
        /* the inputs' pairs first, then panel by panel: a panel's two widened vectors live
         * only through its own multiply-adds (all four panels' at once spilled on AVX2) */
        vf x0[PANEL_TILE_C], x1[PANEL_TILE_C];
        for (int c = 0; c < nc; c++) {
            x0[c] = vbroadcast(xp[c][0]), x1[c] = vbroadcast(xp[c][1]);
            xp[c] += 2;
        }
        for (int p = 0; p < np; p++) {
            if (prefetch_bytes && (k - k0) % COLUMNS_PER_LINE(PANEL_LANES * 4) == 0)
                __builtin_prefetch((const char *)wp[p] + prefetch_bytes, 0, 2);
            vu32 pair;
            memcpy(&pair, wp[p], sizeof pair);
            const vu32 lo = pair << 16, hi = pair & 0xffff0000u;
            vf even, odd;
            memcpy(&even, &lo, sizeof lo);
            memcpy(&odd, &hi, sizeof hi);
            wp[p] += PANEL_LANES;
            for (int c = 0; c < nc; c++) acc[p][c] = vfma(odd, x1[c], vfma(even, x0[c], acc[p][c]));
        }
    }
    if (k_whole < k_end) /* n odd: column n - 1 */
        for (int p = 0; p < np; p++) {
            vu32 pair;
            memcpy(&pair, wp[p], sizeof pair);
            const vu32 lo = pair << 16;
            vf even;
            memcpy(&even, &lo, sizeof lo);
            for (int c = 0; c < nc; c++) acc[p][c] = vfma(even, vbroadcast(xp[c][0]), acc[p][c]);
        }
#endif
    store_block_sums(out, acc, d, p0, np, c0, nc, k0 == 0);
}

// one work item of any kind of panels (kind, a constant: PANELS_F32, PANELS_BF16 or
// PANELS_F16): panels p0..p0+np (np <= PANEL_TILE_P) against inputs c_begin..c_end; blocks of
// PANEL_K_BLOCK columns
enum { PANELS_F32, PANELS_BF16, PANELS_F16 };
static ALWAYS_INLINE void item_any_panels(float *out, const float *x, const uint32_t *xb, const void *panels,
                                          int64_t n, int64_t d, int64_t p0, int np, int c_begin, int c_end,
                                          const int kind) {
    const int bf16 = kind == PANELS_BF16;
    const int64_t steps = bf16 ? BF16_PAIRS(n) : n, block = bf16 ? PANEL_K_BLOCK / 2 : PANEL_K_BLOCK;
    /* Halves and bf16 pairs: the tiles over the first inputs, which read the item's
     * weights from memory (later ones find them in cache), fetch the next item's into L2
     * as they go, one line at a time: PANEL_TILE_P panels further on (a thread's items
     * follow one another). 110M Llama on one Zen 4 thread, medians of 4-6 fresh processes,
     * builds alternating: decode f16 81.7 -> 89.1 tok/s, bf16 86.6 -> 89.5 (faster in 5 of 6
     * pairs each); a forward of 4 tokens (beams) f16 256 -> 343, bf16 304 -> 355; the AVX2
     * build's decode f16 69.9 -> 85.3, bf16 68.6 -> 87.7 (5 of 5); 512-token prefill
     * unchanged. Where each weight costs more instructions than a float's one
     * multiply-add, fewer of its loads fit in the out-of-order window to overlap their
     * misses; the f32 panels, with the fewest, decoded 8% slower with the same prefetch
     * (51.8 -> 47.7 tok/s, slower in 6 of 6), and have none. */
    const int64_t n_panels = (d + PANEL_LANES - 1) / PANEL_LANES;
    const int64_t prefetch_bytes = kind != PANELS_F32 && p0 + PANEL_TILE_P < n_panels
                                       ? PANEL_TILE_P * steps * PANEL_LANES * (kind == PANELS_F16 ? 2 : 4)
                                       : 0;
#define PANEL_TILE_AT(c_, np_, nc_)                                                                 \
    do {                                                                                           \
        const int64_t ahead = (c_) == c_begin ? prefetch_bytes : 0;                                \
        if (bf16)                                                                                  \
            tile_bf16_panels(out, x, xb, (const uint32_t *)panels, n, d, p0, np_, c_, nc_, k0, k_end, \
                             ahead);                                                               \
        else                                                                                       \
            tile_panels(out, x, panels, n, d, p0, np_, c_, nc_, k0, k_end, ahead, kind == PANELS_F16); \
    } while (0)
#define PANEL_TILE(np_, nc_)                                                                        \
    do {                                                                                           \
        if (PANEL_TILE_SPLIT(np_, nc_)) {                                                          \
            for (int c_split = c0; c_split < c0 + (nc_) - 1; c_split += 2)                        \
                PANEL_TILE_AT(c_split, np_, 2);                                                    \
            if ((nc_) % 2) PANEL_TILE_AT(c0 + (nc_) - 1, np_, 1);                                  \
        } else {                                                                                   \
            PANEL_TILE_AT(c0, np_, nc_);                                                           \
        }                                                                                          \
    } while (0)
#define PANEL_TILE_ANY_C(np_)                                                                       \
    switch (nc) {                                                                                   \
    case 1: PANEL_TILE(np_, 1); break;                                                              \
    case 2: PANEL_TILE(np_, 2); break;                                                              \
    case 3: PANEL_TILE(np_, 3); break;                                                              \
    case 4: PANEL_TILE(np_, 4); break;                                                              \
    case 5: PANEL_TILE(np_, 5); break;                                                              \
    default: PANEL_TILE(np_, 6); break;                                                             \
    }
    for (int c0 = c_begin; c0 < c_end; c0 += PANEL_TILE_C) {
        const int nc = c_end - c0 < PANEL_TILE_C ? c_end - c0 : PANEL_TILE_C;
        for (int64_t k0 = 0; k0 < steps; k0 += block) {
            const int64_t k_end = steps - k0 < block ? steps : k0 + block;
            switch (np) {
            case 1: PANEL_TILE_ANY_C(1) break;
            case 2: PANEL_TILE_ANY_C(2) break;
            case 3: PANEL_TILE_ANY_C(3) break;
            default: PANEL_TILE_ANY_C(4) break;
            }
        }
    }
#undef PANEL_TILE_ANY_C
#undef PANEL_TILE
#undef PANEL_TILE_AT
}

static void item_panels(float *out, const float *x, const uint32_t *xb, const void *panels, int64_t n, int64_t d,
                        int64_t p0, int np, int c_begin, int c_end) {
    item_any_panels(out, x, xb, panels, n, d, p0, np, c_begin, c_end, PANELS_F32);
}
static void item_bf16_panels(float *out, const float *x, const uint32_t *xb, const void *panels, int64_t n,
                             int64_t d, int64_t p0, int np, int c_begin, int c_end) {
    item_any_panels(out, x, xb, panels, n, d, p0, np, c_begin, c_end, PANELS_BF16);
}
static void item_f16_panels(float *out, const float *x, const uint32_t *xb, const void *panels, int64_t n,
                            int64_t d, int64_t p0, int np, int c_begin, int c_end) {
    item_any_panels(out, x, xb, panels, n, d, p0, np, c_begin, c_end, PANELS_F16);
}

#if LMD_BF16_AMX
/* The tiles: sums C(g, q) of input group g (16 inputs) and panel q (16 output features),
 * inputs A(g) (16 inputs x 16 pairs), weights W(q) (16 pairs x 16 features). The tile
 * intrinsics paste their tile numbers into the assembly text: the macros expand to literals. */
#define AMX_C(g, q) AMX_C_##g##q
#define AMX_C_00 0
#define AMX_C_01 1
#define AMX_C_10 2
#define AMX_C_11 3
#define AMX_A(g) AMX_A_##g
#define AMX_A_0 4
#define AMX_A_1 5
#define AMX_W(q) AMX_W_##q
#define AMX_W_0 6
#define AMX_W_1 7

/* The tile shapes for a group of rows0 inputs and one of rows1 (0: none) beside it, loaded
 * only where the thread's current shapes differ: reading them (STTILECFG) takes ~5 ns,
 * loading (LDTILECFG) ~50, and a decode step of a small model is many small products. So the
 * tiles are never released after a product either (the thread's tile state then rides along
 * on its context switches); another library in the thread (oneDNN in torch) that loads shapes
 * of its own, or releases the tiles, is seen by the comparison. stories260K bf16 decode on one
 * thread: 42,000 tok/s with a load and a release per product, 52,000 so (56,000 with
 * VDPBF16PS, whose tiny products need no setup at all). */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} amx_tile_config;

static void amx_configure(int rows0, int rows1) {
    amx_tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    const int group_tiles[2][3] = {{AMX_C(0, 0), AMX_C(0, 1), AMX_A(0)}, {AMX_C(1, 0), AMX_C(1, 1), AMX_A(1)}};
    for (int g = 0; g < 2; g++)
        for (int t = 0; t < 3; t++) {
            cfg.rows[group_tiles[g][t]] = (uint8_t)(g == 0 ? rows0 : rows1 > 0 ? rows1 : 1);
            cfg.bytes_per_row[group_tiles[g][t]] = 64; /* 16 floats, or 16 pairs */
        }
    cfg.rows[AMX_W(0)] = cfg.rows[AMX_W(1)] = AMX_K_PAIRS;
    cfg.bytes_per_row[AMX_W(0)] = cfg.bytes_per_row[AMX_W(1)] = 16 * sizeof(uint32_t);
    amx_tile_config current;
    _tile_storeconfig(&current);
    if (memcmp(&current, &cfg, sizeof cfg) != 0) _tile_loadconfig(&cfg);
}

// C[g][q] (rows x 16 floats) -> out rows c.. (B, d), features row.. of which m < 16 exist
#define AMX_STORE(g, q, c, row, m)                                                                 \
    do {                                                                                           \
        float *o_ = out + (int64_t)(c) * d + (row);                                                \
        if ((m) >= 16) {                                                                           \
            _tile_stored(AMX_C(g, q), o_, d * (int64_t)sizeof(float));                             \
        } else {                                                                                   \
            _tile_stored(AMX_C(g, q), partial, 16 * sizeof(float));                                 \
            for (int r_ = 0; r_ < rows_##g; r_++) memcpy(o_ + (int64_t)r_ * d, partial + 16 * r_, (size_t)(m) * sizeof(float)); \
        }                                                                                          \
    } while (0)

// one pass over all pairs for inputs c0.. (rows_0 of them, and rows_1 more when two_groups)
// and panels p, p + 1 (when two_panels) of W (panels, pairs, 16): whole-row sums, stored
static ALWAYS_INLINE void amx_pass(float *out, const uint32_t *xb, const uint32_t *panels, int64_t pairs, int64_t d,
                                   int64_t p, int c0, int rows_0, int rows_1, const int two_groups,
                                   const int two_panels) {
    const uint32_t *x0 = xb + (int64_t)c0 * pairs, *x1 = x0 + 16 * pairs;
    const uint32_t *w0 = panels + p * pairs * 16, *w1 = w0 + pairs * 16;
    const int64_t x_stride = pairs * (int64_t)sizeof(uint32_t);
    float partial[16 * 16];
    _tile_zero(AMX_C(0, 0));
    if (two_panels) _tile_zero(AMX_C(0, 1));
    if (two_groups) _tile_zero(AMX_C(1, 0));
    if (two_groups && two_panels) _tile_zero(AMX_C(1, 1));
    for (int64_t k = 0; k < pairs; k += AMX_K_PAIRS) {
        _tile_loadd(AMX_A(0), x0 + k, x_stride);
        _tile_loadd(AMX_W(0), w0 + k * 16, 16 * sizeof(uint32_t));
        _tile_dpbf16ps(AMX_C(0, 0), AMX_A(0), AMX_W(0));
        if (two_panels) {
            _tile_loadd(AMX_W(1), w1 + k * 16, 16 * sizeof(uint32_t));
            _tile_dpbf16ps(AMX_C(0, 1), AMX_A(0), AMX_W(1));
        }
        if (two_groups) {
            _tile_loadd(AMX_A(1), x1 + k, x_stride);
            _tile_dpbf16ps(AMX_C(1, 0), AMX_A(1), AMX_W(0));
            if (two_panels) _tile_dpbf16ps(AMX_C(1, 1), AMX_A(1), AMX_W(1));
        }
    }
    const int64_t row = p * 16, m0 = d - row, m1 = d - row - 16;
    AMX_STORE(0, 0, c0, row, m0);
    if (two_panels) AMX_STORE(0, 1, c0, row + 16, m1);
    if (two_groups) {
        AMX_STORE(1, 0, c0 + 16, row, m0);
        if (two_panels) AMX_STORE(1, 1, c0 + 16, row + 16, m1);
    }
}

// panels p0..p0+np of W (panels, lmd_bf16_panel_pairs(n), 16) bf16 against inputs
// c_begin..c_end of xb (B, lmd_bf16_panel_pairs(n)) rounded pairs -> out (B, d): each output
// one chain of tile multiplies over all pairs, in 32 x 32 blocks of inputs x features
static void item_bf16_amx(float *out, const float *x, const uint32_t *xb, const void *panels, int64_t n, int64_t d,
                          int64_t p0, int np, int c_begin, int c_end) {
    (void)x;
    const int64_t pairs = lmd_bf16_panel_pairs(n);
    for (int c0 = c_begin; c0 < c_end; c0 += 32) {
        const int rows_0 = c_end - c0 < 16 ? c_end - c0 : 16;
        const int rows_1 = c_end - c0 - 16 <= 0 ? 0 : c_end - c0 - 16 < 16 ? c_end - c0 - 16 : 16;
        amx_configure(rows_0, rows_1);
        for (int q = 0; q < np; q += 2) {
            const int64_t p = p0 + q;
            if (rows_1 > 0 && q + 1 < np) amx_pass(out, xb, panels, pairs, d, p, c0, rows_0, rows_1, 1, 1);
            else if (rows_1 > 0) amx_pass(out, xb, panels, pairs, d, p, c0, rows_0, rows_1, 1, 0);
            else if (q + 1 < np) amx_pass(out, xb, panels, pairs, d, p, c0, rows_0, rows_1, 0, 1);
            else amx_pass(out, xb, panels, pairs, d, p, c0, rows_0, rows_1, 0, 0);
        }
    }
}
#undef AMX_STORE
#endif

// W (d, n) in panels (f32, bf16 or f16) @ x (B, n) -> out (B, d); xb the rounded input pairs of
// bf16 panels with dot products. Work items: PANEL_TILE_P panels x a slice of
// PANEL_SLICE inputs (AMX_WIDE_SLICE for large matrices in AMX tiles), so that a prefill
// splits across threads even when the matrix has few
// rows (stories260K's 32-row k and v are two panels). Slice-major: a thread's static share
// is a run of whole input rows, as in the per-token steps around the product (model.c), so
// its inputs and outputs stay in its own cache (group-major: a 511-token stories260K
// scoring pass 6% slower on two threads)
static void matmul_panels(float *out, const float *x, const uint32_t *xb, const lmd_matrix *w, int B) {
    const int64_t d = w->rows, n = w->cols, n_panels = (d + PANEL_LANES - 1) / PANEL_LANES;
    const int64_t n_groups = (n_panels + PANEL_TILE_P - 1) / PANEL_TILE_P;
    void (*item)(float *, const float *, const uint32_t *, const void *, int64_t, int64_t, int64_t, int, int, int) =
        w->dtype == LMD_BF16_PANELS ? item_bf16_panels : w->dtype == LMD_F16_PANELS ? item_f16_panels : item_panels;
    int slice = PANEL_SLICE;
#if LMD_BF16_AMX
    if (w->dtype == LMD_BF16_PANELS && lmd_bf16_uses_amx()) {
        item = item_bf16_amx;
        if (n_groups >= AMX_WIDE_SLICE_GROUPS) slice = AMX_WIDE_SLICE;
    }
#endif
    const int64_t n_slices = (B + slice - 1) / slice;
#define PANEL_ITEMS(item_loop_pragma)                                                               \
    item_loop_pragma                                                                                \
    for (int64_t it = 0; it < n_groups * n_slices; it++) {                                          \
        const int64_t p0 = it % n_groups * PANEL_TILE_P;                                            \
        const int c_begin = (int)(it / n_groups * slice);                                           \
        const int np = n_panels - p0 < PANEL_TILE_P ? (int)(n_panels - p0) : PANEL_TILE_P;         \
        const int c_end = B - c_begin < slice ? B : c_begin + slice;                                \
        item(out, x, xb, w->data, n, d, p0, np, c_begin, c_end);                                    \
    }
    IN_PARALLEL_IF_WORTH(B, d, n, PANEL_ITEMS);
#undef PANEL_ITEMS
}

/* Bytes of stack lmd_matmul gives a q8_0 product's quantized inputs (or bf16 panels' rounded
 * ones) when the caller passes no scratch; larger batches go through in chunks (each reading
 * the weights again). */
#define STACK_SCRATCH (64 * 1024)

// whether a storage type multiplies inputs quantized to blocks of int8 (q8_0, q4_0, q4_1)
static int quantized_inputs(lmd_dtype dtype) { return dtype == LMD_Q8_0 || dtype == LMD_Q4_0 || dtype == LMD_Q4_1; }

size_t lmd_matmul_scratch_bytes(const lmd_matrix *w, int B) {
    const int64_t n = w->cols;
    if (quantized_inputs(w->dtype)) return (size_t)B * (size_t)(n + 8 * (n / LMD_Q8_0_BLOCK));
#if LMD_BF16_DOT
    if (w->dtype == LMD_BF16_PANELS) return (size_t)B * (size_t)lmd_bf16_panel_pairs(n) * sizeof(uint32_t);
#endif
    return 0;
}

void lmd_matmul_prepare(void *scratch, const float *x, const lmd_matrix *w, int B) {
    if (quantized_inputs(w->dtype)) quantize_inputs_q8(scratch, x, B, w->cols);
#if LMD_BF16_DOT
    /* bf16 dot products read the inputs rounded to bf16: rounded once per call, not by every
     * tile (on the row-major tiles the panels replaced: 1.5 x faster for a 256-token batch) */
    if (w->dtype == LMD_BF16_PANELS) round_input_pairs_bf16((uint32_t *)scratch, x, B, w->cols);
#endif
}

void lmd_matmul_scratch(float *out, const float *x, const lmd_matrix *w, int B, void *scratch) {
    if (scratch != NULL) {
        lmd_matmul_prepare(scratch, x, w, B);
        lmd_matmul_prepared(out, x, w, B, scratch);
        return;
    }
    const size_t per_input = lmd_matmul_scratch_bytes(w, 1);
    if (per_input > 0) { /* prepared on the stack, a chunk of inputs at a time */
        const int chunk = per_input >= STACK_SCRATCH ? 1
                          : (int)(STACK_SCRATCH / per_input) < B ? (int)(STACK_SCRATCH / per_input)
                                                                 : B;
        _Alignas(64) unsigned char stack_scratch[chunk > 0 ? (size_t)chunk * per_input : 1];
        for (int b0 = 0; b0 < B; b0 += chunk) {
            const int nb = B - b0 < chunk ? B - b0 : chunk;
            lmd_matmul_prepare(stack_scratch, x + (int64_t)b0 * w->cols, w, nb);
            lmd_matmul_prepared(out + (int64_t)b0 * w->rows, x + (int64_t)b0 * w->cols, w, nb, stack_scratch);
        }
        return;
    }
    lmd_matmul_prepared(out, x, w, B, NULL);
}

void lmd_matmul_prepared(float *out, const float *x, const lmd_matrix *w, int B, const void *scratch) {
    if (quantized_inputs(w->dtype)) {
        matmul_quantized(out, w, B, scratch);
        return;
    }
    if (w->dtype == LMD_F32_PANELS || w->dtype == LMD_BF16_PANELS || w->dtype == LMD_F16_PANELS) {
        matmul_panels(out, x, (const uint32_t *)scratch, w, B);
        return;
    }
    lmd_matmul_naive(out, x, w, B); /* row-major f32, bf16 or f16: the model packs these (see above) */
}

void lmd_matmul(float *out, const float *x, const lmd_matrix *w, int B) {
    lmd_matmul_scratch(out, x, w, B, NULL);
}

void lmd_matmul_naive(float *out, const float *x, const lmd_matrix *w, int B) {
    const int64_t d = w->rows, n = w->cols;
    float row[n > 0 ? n : 1], xk_used[n > 0 ? n : 1];
    for (int64_t i = 0; i < d; i++) {
        lmd_matrix_row(row, w, i);
        for (int b = 0; b < B; b++) {
            const float *xr = x + (int64_t)b * n;
            const int64_t rounded = w->dtype == LMD_BF16_PANELS && lmd_bf16_rounds_inputs() ? n : 0;
            for (int64_t k = 0; k < n; k++) /* bf16 inputs as the fast kernel rounds them */
                xk_used[k] = k < rounded ? lmd_bf16_to_f32(lmd_f32_to_bf16(xr[k])) : xr[k];
            if (quantized_inputs(w->dtype)) { /* q8_0 and q4 inputs as quantized: scale * q */
                for (int64_t blk = 0; blk < n / LMD_Q8_0_BLOCK; blk++) {
                    int8_t q[LMD_Q8_0_BLOCK];
                    float scale;
                    int32_t corr;
                    lmd_quantize_input_q8(q, &scale, &corr, xr + blk * LMD_Q8_0_BLOCK, LMD_Q8_0_BLOCK);
                    for (int j = 0; j < LMD_Q8_0_BLOCK; j++) xk_used[blk * LMD_Q8_0_BLOCK + j] = scale * q[j];
                }
            }
            double s = 0.0;
            for (int64_t k = 0; k < n; k++) s += (double)row[k] * xk_used[k];
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
void lmd_rope_angles(float *cos_t, float *sin_t, int pos, const float *inv_freq, int half) {
    for (int i = 0; i < half; i++) {
        float angle = (float)pos * inv_freq[i];
        cos_t[i] = cosf(angle);
        sin_t[i] = sinf(angle);
    }
}

void lmd_rope_rotate(float *x, int n_heads, int hs, const float *cos_t, const float *sin_t,
                     lmd_rope_layout layout) {
    const int half = hs / 2;
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

void lmd_rope(float *x, int n_heads, int hs, int pos, const float *inv_freq, lmd_rope_layout layout) {
    int half = hs / 2;
    float cos_t[half > 0 ? half : 1], sin_t[half > 0 ? half : 1];
    lmd_rope_angles(cos_t, sin_t, pos, inv_freq, half);
    lmd_rope_rotate(x, n_heads, hs, cos_t, sin_t, layout);
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

// lmd_softmax_unnormalized, or its base-2 form with base2
static inline float softmax_unnormalized(float *x, int n, const int base2) {
    /* the maximum is exact in any order, so it runs lane-parallel */
    vf lanes_max = vbroadcast(-INFINITY);
    int j = 0;
    for (; j + LMD_VEC_LANES <= n; j += LMD_VEC_LANES) lanes_max = vmax(lanes_max, vload(x + j));
    if (j < n) lanes_max = vmax(lanes_max, vload_partial(x + j, n - j, -INFINITY));
    const vf vmax_b = vbroadcast(vhmax(lanes_max));
    vf acc = vzero_f();
    int k = 0;
    for (; k + LMD_VEC_LANES <= n; k += LMD_VEC_LANES) {
        const vf y = vload(x + k) - vmax_b, e = base2 ? vexp2_nonpositive(y) : vexp_nonpositive(y);
        vstore(x + k, e);
        acc += e;
    }
    if (k < n) { /* the last n % LANES in one vector padded with -inf (e^-inf = 0), same lanes */
        const vf y = vload_partial(x + k, n - k, -INFINITY) - vmax_b;
        const vf e = base2 ? vexp2_nonpositive(y) : vexp_nonpositive(y);
        vstore_partial(x + k, e, n - k);
        acc += e;
    }
    return 1.0f / vsum(acc);
}

float lmd_softmax_unnormalized(float *x, int n) { return softmax_unnormalized(x, n, 0); }
float lmd_softmax2_unnormalized(float *x, int n) { return softmax_unnormalized(x, n, 1); }

void lmd_softmax(float *x, int n) {
    const vf inv = vbroadcast(lmd_softmax_unnormalized(x, n));
    int k = 0;
    for (; k + LMD_VEC_LANES <= n; k += LMD_VEC_LANES) vstore(x + k, vload(x + k) * inv);
    if (k < n) vstore_partial(x + k, vload_partial(x + k, n - k, 0.0f) * inv, n - k);
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
