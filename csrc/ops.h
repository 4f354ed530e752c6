/*
 * ops.h -- the numeric kernels of the forward pass.
 *
 * Every kernel opens with its contract in shapes. Dimension letters:
 *   B  rows of a batch (tokens processed together)
 *   n  input features,  d  output features,  hs  head size
 *
 * Weight matrices (d, n) come in one of nine storage types. LMD_F32, LMD_BF16 and LMD_F16
 * are row-major and are what a model's files and arrays hold; the model packs them into
 * panels at init (model.h), which lmd_matmul's fast kernels multiply, as they do LMD_Q8_0,
 * LMD_Q4_0 and LMD_Q4_1:
 *   LMD_F32   float
 *   LMD_BF16  bfloat16 bits (the top 16 bits of an IEEE float), rounded to nearest even
 *   LMD_F16   IEEE half-precision bits
 *   LMD_Q8_0  llama.cpp's Q8_0 blocks (an fp16 scale d and 32 int8 values q; the weight
 *             is d * q), interleaved in groups of 16 rows (LMD_Q8_0_GROUP; the last
 *             group holds the rows left over) so that one vector serves 16 rows: a
 *             group of g rows stores, block column after block column, its g scales
 *             (2g bytes), then the blocks' values as 8 runs of 4 bytes per row,
 *             [run][row][4] (32g bytes). A matrix takes rows * n/32 * 34 bytes, as in
 *             llama.cpp's row-major layout; lmd_pack_q8_0 converts from that layout.
 *             Inputs meet q8_0 weights quantized to blocks of 32 int8 themselves (as in
 *             llama.cpp), in integer dot products: see lmd_dot_q8_0.
 *   LMD_Q4_0  llama.cpp's Q4_0 blocks (an fp16 scale d and 32 4-bit values q in [0, 15];
 *             the weight is d * (q - 8)), in q8_0's groups of 16 rows: a group of g rows
 *             stores, block column after block column, its g scales, then the values as 4
 *             runs of 4 bytes per row, [run][row][4] (16g bytes), byte j of run s holding
 *             value 4s+j in its low half and value 16+4s+j in its high half (the bytes of
 *             llama.cpp's block, 4 at a time). rows * n/32 * 18 bytes, as in llama.cpp.
 *   LMD_Q4_1  llama.cpp's Q4_1 blocks (fp16 scale d and minimum m, 32 4-bit values q; the
 *             weight is d * q + m), stored as Q4_0 with the g minimums after the g scales:
 *             rows * n/32 * 20 bytes. lmd_pack_q4 converts both from llama.cpp's layout;
 *             inputs meet them quantized as for q8_0 (see lmd_dot_q4).
 *   LMD_F32_PANELS  float, repacked (lmd_pack_f32_panels) into panels of LMD_VEC_LANES rows:
 *             (ceil(d / LANES), n, LANES), panel p holding rows p*LANES.. column by column
 *             (rows past d zero). Each output then sums in a lane of its own, with no lane
 *             reduction: the model packs its f32 matrices so (see model.h). An
 *             in-memory layout of one build (LANES is the build's vector width).
 *   LMD_BF16_PANELS  bf16 in the same panels, a pair of columns per 32-bit lane
 *             (lmd_pack_bf16_panels): (ceil(d / LANES), lmd_bf16_panel_pairs(n), LANES) uint32, lane j
 *             of pair k holding row p*LANES+j's columns 2k (low half) and 2k+1 (high half),
 *             zero past d and n: the operand layout of the bf16 dot-product instructions.
 *   LMD_F16_PANELS  halves in the f32 panels' layout (lmd_pack_f16_panels): (ceil(d / LANES),
 *             n, LANES) uint16. Widening is exact, so a product equals, bit for bit, the
 *             f32 panels' product of the widened weights.
 *
 * lmd_matmul reads each weight row once per call and multiplies it against all
 * B input rows, so batched decode and draft verification cost one pass over the
 * weights (a long prefill one per group of inputs: 64 for panels, as many as
 * fit 512 kB for q8_0). It parallelises over output features (and, in panels,
 * over slices of the batch); each output element is summed in a fixed order by
 * one thread, so results are identical for any thread count and batch: panels by
 * multiply-add chains over blocks of 64 columns, the block sums added in order (bf16
 * panels in AMX tiles, where lmd_bf16_uses_amx: one chain of tile multiplies per
 * output), q8_0 block after block (lmd_dot_q8_0). Row-major LMD_F32, LMD_BF16 and LMD_F16
 * matrices go through the naive twin (suffix _naive, double-precision sums), which the C
 * tests compare the fast kernels against.
 *
 *     lmd_pack_f32_panels(panels, weights, d, n);
 *     lmd_matrix w = {panels, LMD_F32_PANELS, d, n};
 *     lmd_matmul(out, x, &w, B);    // x (B, n) -> out (B, d)
 */
#ifndef LMD_OPS_H
#define LMD_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "lmdecode.h"

typedef enum {
    LMD_F32 = 0,
    LMD_BF16 = 1,
    LMD_Q8_0 = 2,
    LMD_F32_PANELS = 3,
    LMD_BF16_PANELS = 4,
    LMD_F16 = 5,
    LMD_F16_PANELS = 6,
    LMD_Q4_0 = 7,
    LMD_Q4_1 = 8
} lmd_dtype;

#define LMD_Q8_0_BLOCK 32      /* weights per Q8_0 (and Q4_0, Q4_1) block */
#define LMD_Q8_0_BLOCK_BYTES 34 /* fp16 scale + 32 int8 */
#define LMD_Q8_0_GROUP 16       /* rows interleaved together (q4 types too) */
#define LMD_Q4_0_BLOCK_BYTES 18 /* fp16 scale + 32 4-bit values */
#define LMD_Q4_1_BLOCK_BYTES 20 /* fp16 scale and minimum + 32 4-bit values */

/* A borrowed, row-major (rows, cols) weight matrix. */
typedef struct {
    const void *data;
    lmd_dtype dtype;
    int64_t rows;
    int64_t cols; /* a multiple of 32 for LMD_Q8_0, LMD_Q4_0 and LMD_Q4_1 */
} lmd_matrix;

/* Bytes one row of `cols` weights occupies in the given storage (for q8_0, on average). */
size_t lmd_row_bytes(lmd_dtype dtype, int64_t cols);
/* Name of a storage type ("f32", "bf16", "q8_0"). */
const char *lmd_dtype_name(lmd_dtype dtype);

/* Scalar conversions. */
float lmd_fp16_to_f32(uint16_t h);
uint16_t lmd_f32_to_fp16(float f); /* round to nearest even, overflow to inf */
float lmd_bf16_to_f32(uint16_t b);
uint16_t lmd_f32_to_bf16(float f); /* round to nearest even, NaN stays NaN */

// x (n,) -> llama.cpp's q8_0 blocks (n/32 * 34 bytes, row-major); n a multiple of 32.
// Scale amax/127 (fp16, NaN ignored), values round(x / scale) half away from zero, 0 where
// that is NaN (a NaN x, or an infinite one, whose block's scale is inf); all-zero blocks
// get scale 0.
void lmd_quantize_q8_0(uint8_t *out, const float *x, int64_t n);
// blocks (rows, cols/32 * 34) in llama.cpp's row-major layout -> out, the same bytes packed
// as LMD_Q8_0 (groups of 16 rows); cols a multiple of 32
void lmd_pack_q8_0(uint8_t *out, const uint8_t *blocks, int64_t rows, int64_t cols);
// x (rows, cols) -> out packed LMD_Q8_0: lmd_quantize_q8_0 of every row, then lmd_pack_q8_0.
// The values must be finite and every block's scale must be finite in fp16 (amax / 127 below
// 65520, the tie between f16's largest value 65504 and infinity: amax < 8321040): else
// LMD_ERR_INVALID_ARG naming the first such block's row and columns (or the row and column of
// its first non-finite value), out partly written.
lmd_status lmd_quantize_matrix_q8_0(uint8_t *out, const float *x, int64_t rows, int64_t cols, lmd_error *err);
// x (n,) -> how a q8_0 matmul sees it: per block of 32, scale (n/32,) = amax/127 (NaN if the
// block holds a NaN), q (n,) = x / scale rounded to nearest even in [-127, 127] (0 where
// x / scale is NaN), corr (n/32,) = -128 * sum of the block's q; n a multiple of 32
void lmd_quantize_input_q8(int8_t *q, float *scale, int32_t *corr, const float *x, int64_t n);
// One output of a q8_0 matmul, the arithmetic every kernel follows bit for bit:
// w_blocks (n/32 * 34) one weight row in llama.cpp's layout, x (n,) floats. Each block of
// x is quantized (scale amax/127 as a float, values rounded to nearest even, NaN kept
// in the scale), and acc = fma((float)(integer dot of the block), w_scale * x_scale, acc)
// runs block after block from 0.
float lmd_dot_q8_0(const uint8_t *w_blocks, const float *x, int64_t n);
// x (n,) -> llama.cpp's Q4_0 (dtype LMD_Q4_0) or Q4_1 (LMD_Q4_1) blocks, row-major, as
// llama.cpp's reference quantizer makes them: Q4_0 scale d = (the value of largest magnitude)
// / -8, q = min(15, trunc(x * id + 8.5)) with id = 1 / d; Q4_1 d = (max - min) / 15, m = min,
// q = min(15, trunc((x - min) * id + 0.5)); each product rounded to float before the offset
// is added, whatever the build's FP contraction (the bytes of gguf's quantizer near a code's
// boundary); scales rounded to fp16. Values must be finite (the loader checks): NaN or
// infinite ones get some code in [0, 15]. n a multiple of 32.
void lmd_quantize_q4(uint8_t *out, const float *x, int64_t n, lmd_dtype dtype);
// blocks (rows, cols/32 * 18 or 20) in llama.cpp's row-major layout -> out, the same bytes
// packed as dtype (LMD_Q4_0 or LMD_Q4_1); cols a multiple of 32
void lmd_pack_q4(uint8_t *out, const uint8_t *blocks, int64_t rows, int64_t cols, lmd_dtype dtype);
// x (rows, cols) -> out packed as dtype: lmd_quantize_q4 of every row, then lmd_pack_q4. The
// values must be finite and every block's scale d (q4_1: and minimum m) finite in fp16: d and
// m, computed in float as above, under 65520 in magnitude (q4_0: the value of largest
// magnitude under 524160 in magnitude): else LMD_ERR_INVALID_ARG naming the first such block
// as lmd_quantize_matrix_q8_0 does, out partly written.
lmd_status lmd_quantize_matrix_q4(uint8_t *out, const float *x, int64_t rows, int64_t cols, lmd_dtype dtype,
                                  lmd_error *err);
// One output of a q4_0 or q4_1 matmul, the arithmetic every kernel follows bit for bit:
// w_blocks (n/32 * 18 or 20) one weight row in llama.cpp's layout, x (n,) floats quantized
// per block as for q8_0 (lmd_quantize_input_q8: values xq, scale s). Block after block
// from acc = 0: Q4_0 acc = fma((float)(sum of (q - 8) * xq), d * s, acc); Q4_1
// acc = fma((float)(sum of q * xq), d * s, acc), then acc = fma((float)(sum of xq), m * s, acc).
float lmd_dot_q4(const uint8_t *w_blocks, const float *x, int64_t n, lmd_dtype dtype);
// bytes of a (rows, cols) matrix in LMD_F32_PANELS
size_t lmd_panels_bytes(int64_t rows, int64_t cols);
// w (rows, cols) f32 row-major -> out (lmd_panels_bytes(rows, cols) bytes) in LMD_F32_PANELS
void lmd_pack_f32_panels(float *out, const float *w, int64_t rows, int64_t cols);
// bytes of a (rows, cols) matrix in LMD_F16_PANELS
size_t lmd_f16_panels_bytes(int64_t rows, int64_t cols);
// w (rows, cols) f16 row-major -> out (lmd_f16_panels_bytes(rows, cols) bytes) in LMD_F16_PANELS
void lmd_pack_f16_panels(uint16_t *out, const uint16_t *w, int64_t rows, int64_t cols);
// bytes of a (rows, cols) matrix in LMD_BF16_PANELS
size_t lmd_bf16_panels_bytes(int64_t rows, int64_t cols);
// w (rows, cols) bf16 row-major -> out (lmd_bf16_panels_bytes(rows, cols) bytes) in LMD_BF16_PANELS
void lmd_pack_bf16_panels(void *out, const uint16_t *w, int64_t rows, int64_t cols);
// W row r (cols,) -> out (cols,) float
void lmd_matrix_row(float *out, const lmd_matrix *w, int64_t r);

// 1 if bf16 matrices are multiplied with bf16 dot-product instructions, which round the
// inputs x of LMD_BF16_PANELS matrices to bf16 first, else 0 (exact float inputs).
int lmd_bf16_rounds_inputs(void);
// 1 if bf16 matrices are multiplied with AMX tiles (ops.c), decided at the first call for the
// whole process: where the build and the CPU have AMX-BF16, Linux grants the tiles and
// LMDECODE_NO_AMX is unset (or "0"). Its sums differ from the vector unit's in the last bits.
int lmd_bf16_uses_amx(void);
// column pairs a row of LMD_BF16_PANELS holds: ceil(cols / 2) rounded up to a multiple of 16,
// AMX's tile depth (the pairs past the columns are zero)
int64_t lmd_bf16_panel_pairs(int64_t cols);

// W (d,n) @ x[b] (n,) -> out[b] (d,) for b < B; x (B,n), out (B,d). out must not alias x.
void lmd_matmul(float *out, const float *x, const lmd_matrix *w, int B);
/* Bytes of scratch lmd_matmul_scratch can use for B inputs of w (0: none): the inputs
 * quantized for q8_0, or rounded to bf16 for bf16 dot products. */
size_t lmd_matmul_scratch_bytes(const lmd_matrix *w, int B);
/* lmd_matmul with scratch of lmd_matmul_scratch_bytes(w, B), or NULL. With it, the inputs
 * are prepared once per call: without it they are prepared on the stack in chunks of
 * inputs, each of which reads the weights again. Results are identical either way.
 *     = lmd_matmul_prepare(scratch, x, w, B); lmd_matmul_prepared(out, x, w, B, scratch);
 * Matrices that read the same x (q, k and v; gate and up) can share one preparation:
 * lmd_matmul_prepared is valid for any matrix of the same dtype and cols as the w that
 * prepared the scratch, while x and the scratch stay unchanged. */
void lmd_matmul_scratch(float *out, const float *x, const lmd_matrix *w, int B, void *scratch);
// x (B, cols) -> scratch (lmd_matmul_scratch_bytes(w, B) bytes): the inputs as w's kernel reads them
void lmd_matmul_prepare(void *scratch, const float *x, const lmd_matrix *w, int B);
// W @ x -> out (B, rows) with x prepared in scratch (which may be NULL where the size is 0)
void lmd_matmul_prepared(float *out, const float *x, const lmd_matrix *w, int B, const void *scratch);
void lmd_matmul_naive(float *out, const float *x, const lmd_matrix *w, int B);

// out[b] = x[b] / sqrt(mean(x[b]^2) + eps) * weight, x (B,n), weight (n,); out may alias x.
void lmd_rmsnorm(float *out, const float *x, const float *weight, int B, int n, float eps);
void lmd_rmsnorm_naive(float *out, const float *x, const float *weight, int B, int n, float eps);

// out[b] = (x[b] - mean) / sqrt(var + eps) * weight + bias, x (B,n); out may alias x.
void lmd_layernorm(float *out, const float *x, const float *weight, const float *bias, int B, int n,
                   float eps);
void lmd_layernorm_naive(float *out, const float *x, const float *weight, const float *bias, int B,
                         int n, float eps);

/* Which pairs of a head's features RoPE rotates together. */
typedef enum {
    LMD_ROPE_ADJACENT = 0, /* (0,1), (2,3), ...: llama2.c, GGUF "normal" */
    LMD_ROPE_HALF = 1      /* (i, i + hs/2): Hugging Face rotate_half */
} lmd_rope_layout;

// Rotates x (n_heads, hs) in place for position pos; pair i turns by pos * inv_freq[i],
// inv_freq (hs/2,) = base^(-2i/hs).
void lmd_rope(float *x, int n_heads, int hs, int pos, const float *inv_freq, lmd_rope_layout layout);
// lmd_rope in two steps, for angles shared by many rotations (every layer's q and k of a token):
// cos_t, sin_t (half,) of the angles pos * inv_freq[i]; then x (n_heads, hs) rotated by them
void lmd_rope_angles(float *cos_t, float *sin_t, int pos, const float *inv_freq, int half);
void lmd_rope_rotate(float *x, int n_heads, int hs, const float *cos_t, const float *sin_t,
                     lmd_rope_layout layout);
void lmd_rope_naive(float *x, int n_heads, int hs, int pos, const float *inv_freq,
                    lmd_rope_layout layout);

// x (n,) -> softmax(x) in place; max subtracted first.
void lmd_softmax(float *x, int n);
// x (n,) -> e^(x - max x) in place; returns 1 / their sum, the factor that makes them
// softmax(x) (attention applies it once to its value sums instead of to every weight).
float lmd_softmax_unnormalized(float *x, int n);
// the same in base 2: x (n,) -> 2^(x - max x) in place, returning 1 / their sum (attention's
// scores carry the factor log2 e, which makes them the same weights)
float lmd_softmax2_unnormalized(float *x, int n);
void lmd_softmax_naive(float *x, int n);

// gate (n,) <- silu(gate) * up, silu(g) = g / (1 + e^-g).
void lmd_swiglu(float *gate, const float *up, int64_t n);
void lmd_swiglu_naive(float *gate, const float *up, int64_t n);

// x (n,) <- 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), GPT-2's "gelu_new".
void lmd_gelu_tanh(float *x, int64_t n);
void lmd_gelu_tanh_naive(float *x, int64_t n);

// x (n,) . y (n,) -> float, summed in a fixed order
float lmd_dot(const float *x, const float *y, int n);
// y (n,) += a * x (n,)
void lmd_axpy(float *y, float a, const float *x, int n);

#endif /* LMD_OPS_H */
