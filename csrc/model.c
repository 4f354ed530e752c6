/* model.c -- forward pass of decoder-only transformers (contract in model.h).
 *
 * Dimension letters: B tokens of a chunk, D dim, Q q_dim, K kv_dim, H hidden_dim, V vocab. */
#include "model.h"
#include "vec.h"

#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *const lmd_layer_matrix_names[LMD_LAYER_MATRICES] = {"wq", "wk", "wv", "wo", "w_up", "w_down", "w_gate"};
static const size_t layer_matrix_offsets[LMD_LAYER_MATRICES] = {
    offsetof(lmd_layer_weights, wq),   offsetof(lmd_layer_weights, wk),     offsetof(lmd_layer_weights, wv),
    offsetof(lmd_layer_weights, wo),   offsetof(lmd_layer_weights, w_up),   offsetof(lmd_layer_weights, w_down),
    offsetof(lmd_layer_weights, w_gate)};

lmd_matrix *lmd_layer_matrix(lmd_layer_weights *lw, int i) {
    return (lmd_matrix *)((char *)lw + layer_matrix_offsets[i]);
}

int lmd_layer_matrix_count(const lmd_config *config) {
    return config->arch == LMD_ARCH_GPT2 ? LMD_LAYER_MATRICES - 1 : LMD_LAYER_MATRICES; /* no gate */
}

/* queries whose attention is computed together: a prefill's neighbouring tokens, the heads
 * of a GQA group (model.h's scores hold their weights) */
#define SCORE_QUERIES 6
/* attention's work units: one per kv head; with fewer kv heads than two per thread, the
 * chunk's tokens, then the kv heads' query heads, are cut into parts, aiming at two units
 * per thread and at most about this many units in all, so that the threads still share
 * the work evenly */
#define ATTENTION_MAX_UNITS 16
static int most_attention_units(const lmd_config *c);
/* query tiles (attend_query_tile): a prefill's heads of 8 or 16 features, one query per
 * vector lane */
#define TILE_QUERIES LMD_VEC_LANES
#define TILE_VALUE_SETS 8 /* value_sums' accumulator sets for a head of one vector */
#define TILE_MAX_HEAD 16
/* vectors of 8 lanes or more: each set of positions then meets one or two softmax partials */
static int query_tiles_apply(int hs, int f16) {
    return LMD_VEC_LANES >= TILE_VALUE_SETS && !f16 && (hs == 8 || hs == TILE_MAX_HEAD);
}

/* ------------------------------------------------------------------ */
/* validation                                                           */
/* ------------------------------------------------------------------ */

static lmd_status check_matrix(const lmd_matrix *w, const char *layer_prefix, const char *name,
                               int64_t rows, int64_t cols, lmd_error *err) {
    if (w->data == NULL)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "%s%s: missing", layer_prefix, name);
    const int blocks = w->dtype == LMD_Q8_0 || w->dtype == LMD_Q4_0 || w->dtype == LMD_Q4_1;
    if (w->dtype != LMD_F32 && w->dtype != LMD_BF16 && w->dtype != LMD_F16 && !blocks &&
        w->dtype != LMD_F32_PANELS && w->dtype != LMD_BF16_PANELS && w->dtype != LMD_F16_PANELS)
        return lmd_fail(err, LMD_ERR_UNSUPPORTED, "%s%s: unknown storage type %d", layer_prefix, name,
                        (int)w->dtype);
    if (w->rows != rows || w->cols != cols)
        return lmd_fail(err, LMD_ERR_FORMAT, "%s%s: shape (%lld, %lld) but the config needs (%lld, %lld)",
                        layer_prefix, name, (long long)w->rows, (long long)w->cols, (long long)rows,
                        (long long)cols);
    if (blocks && cols % LMD_Q8_0_BLOCK != 0)
        return lmd_fail(err, LMD_ERR_FORMAT, "%s%s: %s needs a multiple of 32 columns, not %lld", layer_prefix,
                        name, lmd_dtype_name(w->dtype), (long long)cols);
    return LMD_OK;
}

static lmd_status check_vector(const float *v, int required, const char *layer_prefix, const char *name,
                               lmd_error *err) {
    if (required && v == NULL) return lmd_fail(err, LMD_ERR_INVALID_ARG, "%s%s: missing", layer_prefix, name);
    return LMD_OK;
}

static lmd_status check_config(const lmd_config *c, lmd_error *err) {
    if (c->arch != LMD_ARCH_LLAMA && c->arch != LMD_ARCH_GPT2)
        return lmd_fail(err, LMD_ERR_UNSUPPORTED, "arch (=%d) is not llama (0) or gpt2 (1)", (int)c->arch);
#define POSITIVE(field)                                                                                \
    if (c->field < 1) return lmd_fail(err, LMD_ERR_INVALID_ARG, #field " (=%d) must be >= 1", c->field)
    POSITIVE(vocab_size);
    POSITIVE(dim);
    POSITIVE(hidden_dim);
    POSITIVE(n_layers);
    POSITIVE(n_heads);
    POSITIVE(n_kv_heads);
    POSITIVE(head_dim);
    POSITIVE(context_length);
#undef POSITIVE
    if (c->n_heads % c->n_kv_heads != 0)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "n_heads (=%d) must be a multiple of n_kv_heads (=%d)",
                        c->n_heads, c->n_kv_heads);
    if (c->arch == LMD_ARCH_LLAMA && c->head_dim % 2 != 0)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "head_dim (=%d) must be even for rotary embeddings",
                        c->head_dim);
    /* an infinite epsilon or base makes every norm or rotary angle garbage without an error */
    if (!(c->norm_eps >= 0.0f) || isinf(c->norm_eps))
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "norm_eps (=%g) must be finite and >= 0", c->norm_eps);
    if (c->arch == LMD_ARCH_LLAMA && (!(c->rope_theta > 0.0f) || isinf(c->rope_theta)))
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "rope_theta (=%g) must be finite and > 0", c->rope_theta);
    if (c->rope_layout != LMD_ROPE_ADJACENT && c->rope_layout != LMD_ROPE_HALF)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "rope_layout (=%d) must be 0 or 1", (int)c->rope_layout);
    return LMD_OK;
}

static lmd_status check_weights(const lmd_config *c, const lmd_weights *w, lmd_error *err) {
    const int64_t D = c->dim, Q = (int64_t)c->n_heads * c->head_dim,
                  K = (int64_t)c->n_kv_heads * c->head_dim, H = c->hidden_dim, V = c->vocab_size;
    const int gpt2 = c->arch == LMD_ARCH_GPT2;
    lmd_status st;
#define TRY(call)                                                                                      \
    if ((st = (call)) != LMD_OK) return st
    TRY(check_matrix(&w->token_embedding, "", "token_embedding", V, D, err));
    TRY(check_matrix(&w->output, "", "output", V, D, err));
    TRY(check_vector(w->final_norm, 1, "", "final_norm", err));
    if (gpt2) {
        TRY(check_vector(w->final_norm_bias, 1, "", "final_norm_bias", err));
        TRY(check_vector(w->position_embedding, 1, "", "position_embedding", err));
    }
    if (w->rope_freq_factors != NULL) {
        if (gpt2) return lmd_fail(err, LMD_ERR_INVALID_ARG, "rope_freq_factors: gpt2 has no rotary embeddings");
        for (int32_t i = 0; i < c->head_dim / 2; i++)
            if (!(w->rope_freq_factors[i] > 0.0f && isfinite(w->rope_freq_factors[i])))
                return lmd_fail(err, LMD_ERR_INVALID_ARG, "rope_freq_factors[%d] (=%g) must be finite and > 0", i,
                                (double)w->rope_freq_factors[i]);
    }
    if (w->layers == NULL) return lmd_fail(err, LMD_ERR_INVALID_ARG, "layers: missing");
    for (int32_t l = 0; l < c->n_layers; l++) {
        const lmd_layer_weights *lw = &w->layers[l];
        char prefix[32];
        snprintf(prefix, sizeof prefix, "layers[%d].", l);
        TRY(check_vector(lw->attn_norm, 1, prefix, "attn_norm", err));
        TRY(check_vector(lw->ffn_norm, 1, prefix, "ffn_norm", err));
        /* (rows, cols) of each matrix, in lmd_layer_matrix_names' order */
        const int32_t shapes[LMD_LAYER_MATRICES][2] = {{Q, D}, {K, D}, {K, D}, {D, Q}, {H, D}, {D, H}, {H, D}};
        for (int i = 0; i < lmd_layer_matrix_count(c); i++)
            TRY(check_matrix(lmd_layer_matrix(&w->layers[l], i), prefix, lmd_layer_matrix_names[i],
                             shapes[i][0], shapes[i][1], err));
        if (gpt2) {
            TRY(check_vector(lw->attn_norm_bias, 1, prefix, "attn_norm_bias", err));
            TRY(check_vector(lw->ffn_norm_bias, 1, prefix, "ffn_norm_bias", err));
        }
    }
#undef TRY
    return LMD_OK;
}

/* ------------------------------------------------------------------ */
/* init / free                                                          */
/* ------------------------------------------------------------------ */

/* Positions the scores buffer holds at init (the whole context when it is shorter). Sized by
 * the context length, the buffer took units x rows x context x 4 bytes up front: 50 MB for
 * Llama 3.1 8B's 128k positions, whatever the calls, and a corrupt context length (a config
 * may say 2^31 - 1) failed the load with an out-of-memory error naming no field. */
#define INITIAL_SCORE_POSITIONS 1024

// makes the scores buffer hold at least `positions` positions (<= the context length): twice
// what it held, or positions if more, at most the context length, so that a long decode
// replaces it a logarithmic number of times. Called at init and by lmd_model_forward before
// it touches any sequence; the scores are scratch, so nothing is copied. On failure the old
// buffer stays.
static lmd_status ensure_scores(lmd_model *m, int64_t positions, lmd_error *err) {
    if (positions + LMD_VEC_LANES <= m->scores_stride) return LMD_OK;
    const int64_t held = m->scores_stride > 0 ? m->scores_stride - LMD_VEC_LANES : 0;
    int64_t want = 2 * held > positions ? 2 * held : positions;
    if (want > m->config.context_length) want = m->config.context_length;
    if (want < positions) want = positions;
    const int64_t stride = want + LMD_VEC_LANES; /* head_scores writes whole vectors */
    const size_t per_position = (size_t)m->scores_units * (size_t)m->scores_rows * sizeof(float);
    float *scores = (size_t)stride <= SIZE_MAX / per_position ? lmd_alloc_aligned((size_t)stride * per_position) : NULL;
    if (scores == NULL)
        return lmd_fail(err, LMD_ERR_NOMEM,
                        "out of memory allocating attention scores for %lld positions (%d work units x %d queries; "
                        "context length %d)",
                        (long long)want, m->scores_units, m->scores_rows, m->config.context_length);
    free(m->scores);
    m->scores = scores;
    m->scores_stride = stride;
    return LMD_OK;
}

void lmd_model_free(lmd_model *m) {
    if (m == NULL) return;
    free(m->layer_storage);
    free(m->x);
    free(m->xb);
    free(m->xb2);
    free(m->q);
    free(m->k);
    free(m->v);
    free(m->att_out);
    free(m->hb);
    free(m->hb2);
    free(m->scores);
    free(m->inv_freq);
    free(m->rope_cos);
    free(m->rope_sin);
    free(m->pos);
    free(m->matmul_scratch);
    free(m->matrix_copies);
    free(m);
}

// bytes of scratch the widest matmul of a B-token chunk can use (lmd_matmul_scratch_bytes)
static size_t matmul_scratch_bytes(const lmd_config *config, const lmd_weights *w, int B) {
    size_t most = lmd_matmul_scratch_bytes(&w->output, B);
    for (int32_t l = 0; l < config->n_layers; l++) {
        for (int i = 0; i < lmd_layer_matrix_count(config); i++) {
            const size_t bytes = lmd_matmul_scratch_bytes(lmd_layer_matrix(&w->layers[l], i), B);
            most = bytes > most ? bytes : most;
        }
    }
    return most;
}

/* The model multiplies its own copy of every weight matrix, all of them in one block of
 * memory that the kernel is asked to back with huge pages (lmd_alloc_weights): a decode
 * streams them all once per token. f32, bf16 and f16 matrices are repacked into panels
 * (ops.h LMD_F32_PANELS, LMD_BF16_PANELS, LMD_F16_PANELS; bf16: see ops.c): each output then
 * sums in a lane of its own, with no lane reduction. Small matrices gain the most (a row of
 * 64 columns spent as long on adding up its lanes as on its four multiply-adds: a 511-token
 * stories260K pass 4.1 -> 3.5 ms, one thread), and large ones stream their panels faster
 * than rows against few inputs (f32, 2048 x 768 out of cache, one thread: 1.11 x against one
 * input, 1.11-1.18 x against two to four, parity against 8 to 256). q8_0, q4_0 and q4_1
 * matrices arrive in their kernels' layout and are copied as they are. The binding then
 * stops holding the source arrays, and a memory-mapped file's pages are released
 * (model.py), so the weights are still held once. A tied token embedding looks its rows up
 * in the head's copy. */

// the model's weight matrices: (n_layers * LMD_LAYER_MATRICES + 1,) at most, pointers into
// m->weights (the output head first); returns how many
static int weight_matrices(lmd_model *m, lmd_matrix **out) {
    int n = 0;
    out[n++] = &m->weights.output;
    for (int32_t l = 0; l < m->config.n_layers; l++)
        for (int i = 0; i < lmd_layer_matrix_count(&m->config); i++) out[n++] = lmd_layer_matrix(&m->layer_storage[l], i);
    return n;
}

// bytes of the model's own copy of matrix w: in panels for f32, bf16 and f16, as given for
// the quantized types (already in their kernels' layout)
static size_t copy_bytes(const lmd_matrix *w) {
    switch (w->dtype) {
    case LMD_F32: return lmd_panels_bytes(w->rows, w->cols);
    case LMD_BF16: return lmd_bf16_panels_bytes(w->rows, w->cols);
    case LMD_F16: return lmd_f16_panels_bytes(w->rows, w->cols);
    case LMD_Q8_0: case LMD_Q4_0: case LMD_Q4_1: return lmd_row_bytes(w->dtype, w->cols) * (size_t)w->rows;
    default: return 0;
    }
}

#define COPY_ALIGN 64 /* each matrix's copy starts on a cache line */

// replaces every weight matrix of the model (and a token embedding tied to the head) by a copy
// in one block the model owns (m->matrix_copies): f32, bf16 and f16 repacked into panels,
// q8_0, q4_0 and q4_1 as they are
static lmd_status copy_matrices(lmd_model *m, lmd_error *err) {
    const size_t slots = (size_t)m->config.n_layers * LMD_LAYER_MATRICES + 1;
    lmd_matrix **matrices = malloc(slots * sizeof *matrices);
    if (matrices == NULL) return lmd_fail(err, LMD_ERR_NOMEM, "out of memory copying the weights");
    const int n = weight_matrices(m, matrices);
    const int tied = m->weights.token_embedding.data == m->weights.output.data &&
                     m->weights.token_embedding.dtype == m->weights.output.dtype;
    size_t total = 0;
    for (int i = 0; i < n; i++) total += (copy_bytes(matrices[i]) + COPY_ALIGN - 1) / COPY_ALIGN * COPY_ALIGN;
    m->matrix_copies = lmd_alloc_weights(total);
    if (m->matrix_copies == NULL) {
        free(matrices);
        return lmd_fail(err, LMD_ERR_NOMEM, "out of memory copying the weights (%zu bytes)", total);
    }
    m->matrix_copy_bytes = total;
    char *next = (char *)m->matrix_copies;
    for (int i = 0; i < n; i++) {
        lmd_matrix *w = matrices[i];
        const size_t bytes = copy_bytes(w);
        if (bytes == 0) continue;
        void *copy = next;
        next += (bytes + COPY_ALIGN - 1) / COPY_ALIGN * COPY_ALIGN;
        if (w->dtype == LMD_F32 || w->dtype == LMD_BF16 || w->dtype == LMD_F16) m->panel_bytes += bytes;
        if (w->dtype == LMD_F32) {
            lmd_pack_f32_panels(copy, (const float *)w->data, w->rows, w->cols);
            w->dtype = LMD_F32_PANELS;
        } else if (w->dtype == LMD_F16) {
            lmd_pack_f16_panels(copy, (const uint16_t *)w->data, w->rows, w->cols);
            w->dtype = LMD_F16_PANELS;
        } else if (w->dtype == LMD_BF16) {
            lmd_pack_bf16_panels(copy, (const uint16_t *)w->data, w->rows, w->cols);
            w->dtype = LMD_BF16_PANELS;
        } else {
            memcpy(copy, w->data, bytes);
        }
        w->data = copy;
    }
    if (tied && m->weights.output.data != m->weights.token_embedding.data)
        m->weights.token_embedding = m->weights.output; /* its rows looked up in the head's copy */
    free(matrices);
    return LMD_OK;
}

lmd_status lmd_model_init(lmd_model **out, const lmd_config *config, const lmd_weights *weights,
                          int32_t max_batch, lmd_error *err) {
    *out = NULL;
    lmd_status st = check_config(config, err);
    if (st != LMD_OK) return st;
    st = check_weights(config, weights, err);
    if (st != LMD_OK) return st;
    if (max_batch < 1 || max_batch > 65536)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "max_batch (=%d) must be in [1, 65536]", max_batch);

    lmd_model *m = calloc(1, sizeof *m);
    if (m == NULL) return lmd_fail(err, LMD_ERR_NOMEM, "out of memory allocating a model");
    m->config = *config;
    m->weights = *weights;
    m->max_batch = max_batch;
    const size_t B = (size_t)max_batch, D = config->dim, Q = (size_t)config->n_heads * config->head_dim,
                 K = (size_t)config->n_kv_heads * config->head_dim, H = config->hidden_dim;
    m->layer_storage = malloc((size_t)config->n_layers * sizeof(lmd_layer_weights));
    m->x = lmd_alloc_aligned(B * D * sizeof(float));
    m->xb = lmd_alloc_aligned(B * D * sizeof(float));
    m->xb2 = lmd_alloc_aligned(B * D * sizeof(float));
    m->q = lmd_alloc_aligned(B * Q * sizeof(float));
    m->k = lmd_alloc_aligned(B * K * sizeof(float));
    m->v = lmd_alloc_aligned(B * K * sizeof(float));
    m->att_out = lmd_alloc_aligned(B * Q * sizeof(float));
    m->hb = lmd_alloc_aligned(B * H * sizeof(float));
    m->hb2 = lmd_alloc_aligned(B * H * sizeof(float));
    m->scores_units = most_attention_units(config); /* each has its scores */
    m->scores_rows = query_tiles_apply(config->head_dim, 0) && TILE_QUERIES > SCORE_QUERIES ? TILE_QUERIES
                                                                                            : SCORE_QUERIES;
    m->inv_freq = malloc(((size_t)config->head_dim / 2 + 1) * sizeof(float));
    m->rope_cos = malloc((B * (size_t)(config->head_dim / 2) + 1) * sizeof(float));
    m->rope_sin = malloc((B * (size_t)(config->head_dim / 2) + 1) * sizeof(float));
    m->pos = malloc(B * sizeof(int32_t));
    if (!m->layer_storage || !m->x || !m->xb || !m->xb2 || !m->q || !m->k || !m->v || !m->att_out ||
        !m->hb || !m->hb2 || !m->inv_freq || !m->rope_cos || !m->rope_sin || !m->pos) {
        lmd_model_free(m);
        return lmd_fail(err, LMD_ERR_NOMEM, "out of memory allocating the run state for %d tokens",
                        max_batch);
    }
    st = ensure_scores(m, config->context_length < INITIAL_SCORE_POSITIONS ? config->context_length
                                                                            : INITIAL_SCORE_POSITIONS, err);
    if (st != LMD_OK) {
        lmd_model_free(m);
        return st;
    }
    memcpy(m->layer_storage, weights->layers, (size_t)config->n_layers * sizeof(lmd_layer_weights));
    m->weights.layers = m->layer_storage;
    st = copy_matrices(m, err);
    if (st != LMD_OK) {
        lmd_model_free(m);
        return st;
    }
    const size_t scratch_bytes = matmul_scratch_bytes(config, &m->weights, max_batch); /* of the packed matrices */
    if (scratch_bytes > 0) {
        m->matmul_scratch = lmd_alloc_aligned(scratch_bytes);
        if (m->matmul_scratch == NULL) {
            lmd_model_free(m);
            return lmd_fail(err, LMD_ERR_NOMEM, "out of memory allocating the run state for %d tokens", max_batch);
        }
    }
    /* inv_freq[i] = base^(-2i/hs) / factor i, computed in double then rounded, as the references
     * do in float */
    for (int32_t i = 0; i < config->head_dim / 2; i++) {
        const double factor = weights->rope_freq_factors != NULL ? weights->rope_freq_factors[i] : 1.0;
        m->inv_freq[i] = (float)(1.0 / pow((double)config->rope_theta, (2.0 * i) / config->head_dim) / factor);
    }
    m->q_scale = (float)(1.4426950408889634 / sqrt((double)config->head_dim));
    *out = m;
    return LMD_OK;
}

/* ------------------------------------------------------------------ */
/* forward                                                              */
/* ------------------------------------------------------------------ */

// W @ x for the chunk's B rows, with the model's scratch for the prepared inputs
static void matmul(lmd_model *m, float *out, const float *x, const lmd_matrix *w, int B) {
    lmd_matmul_scratch(out, x, w, B, m->matmul_scratch);
}

// W @ x right after matmul(m, ..., x, prev, B) on the same x: the inputs prepared (quantized,
// rounded) for prev serve w too when the two take them alike (same storage and width)
static void matmul_same_x(lmd_model *m, float *out, const float *x, const lmd_matrix *w, int B,
                          const lmd_matrix *prev) {
    if (m->matmul_scratch != NULL && w->dtype == prev->dtype && w->cols == prev->cols)
        lmd_matmul_prepared(out, x, w, B, m->matmul_scratch);
    else
        matmul(m, out, x, w, B);
}

/* Chunks of this many tokens or more take their per-token steps (norms, rotary, cache
 * writes, activations, residuals) across the threads: serial, they were ~8% of a 512-token
 * stories260K prefill. */
#define TOKENS_PARALLEL_MIN 64

// x (n,) += bias (n,), if the model has that bias
static void add_bias(float *x, const float *bias, int64_t n) {
    if (bias == NULL) return;
    for (int64_t k = 0; k < n; k++) x[k] += bias[k];
}

static void add_residual(float *x, const float *delta, int64_t n) {
    for (int64_t k = 0; k < n; k++) x[k] += delta[k];
}

static void norm(const lmd_model *m, float *out, const float *x, const float *w, const float *b, int B) {
    if (m->config.arch == LMD_ARCH_GPT2) lmd_layernorm(out, x, w, b, B, m->config.dim, m->config.norm_eps);
    else lmd_rmsnorm(out, x, w, B, m->config.dim, m->config.norm_eps);
}

/* Attention, inlined per head size: heads are short (8 to 256 features), too short for a
 * call per position. Every sum has one order, fixed by the source, so a result never
 * depends on the thread, the batch or which neighbouring queries were computed with it. */
typedef float v8f __attribute__((vector_size(32)));
typedef float v16f __attribute__((vector_size(64)));
/* macros, not functions: a function returning a 32-byte vector would change the ABI on
 * builds without AVX */
#define LOAD8(dst, p) memcpy(&(dst), (p), sizeof(dst))
#define LOAD16(dst, p) memcpy(&(dst), (p), sizeof(dst))
/* the same from f16 values, widened: one VCVTPH2PS where the CPU has it */
static inline void load_halves(void *dst, const uint16_t *p, int n) {
    float f[16];
    for (int i = 0; i < n; i++) f[i] = half_to_float(p[i]);
    memcpy(dst, f, (size_t)n * sizeof(float));
}
#if defined(__AVX512F__)
#define LOAD16_F16(dst, p) ((dst) = (v16f)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)(p))))
#else
#define LOAD16_F16(dst, p) load_halves(&(dst), (p), 16)
#endif
#if defined(__F16C__)
#define LOAD8_F16(dst, p) ((dst) = (v8f)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(p))))
#else
#define LOAD8_F16(dst, p) load_halves(&(dst), (p), 8)
#endif
/* IN_REGISTER for vectors of 16 and 8 floats, where the ISA has registers that wide */
#if LMD_VEC_BYTES >= 64
#define KEEP16(v) IN_REGISTER(v)
#else
#define KEEP16(v) ((void)0)
#endif
#if LMD_VEC_BYTES >= 32
#define KEEP8(v) IN_REGISTER(v)
#else
#define KEEP8(v) ((void)0)
#endif

/* Scores. The cache keeps a block's keys feature-major (kvcache.h): feature d of
 * LMD_VEC_LANES consecutive positions is one vector load. The score of query q and the key
 * k_t at position t is
 *     s_t = q[0] k_t[0] + q[1] k_t[1] + ... + q[hs-1] k_t[hs-1],
 * the query already scaled by log2(e) / sqrt(hs) (step_qkv), so that the softmax weights
 * e^(q.k / sqrt(hs) - max) are 2^(s_t - max) (lmd_softmax2_unnormalized), summed feature
 * after feature in one chain (a multiply-add per feature), each position in
 * its own lane: no horizontal sums, and a score is the same whatever else shares its
 * vectors. A call computes nq queries (sharing every key load) against nk runs of
 * positions (sharing every query value), nq * nk independent chains. */

/* consecutive positions of one cache block, at most LMD_VEC_LANES, all of them written: the
 * head's keys of the first (feature d at + d * block_size), the first's position and how
 * many. A run shorter than a vector is loaded with its other lanes zero, never reading past
 * what the cache holds; the scores of those lanes land in the slots of the next positions,
 * which the next run overwrites, or past the query's last position, where nothing reads
 * them. */
typedef struct {
    const void *k; /* float, or f16 bits (kv_load) */
    int32_t t, len;
} key_run;

/* Keys and values as the cache stores them (kvcache.h): float, or f16 widened exactly as it
 * is loaded. f16 is a constant in the inlined attention, so each storage type has its own
 * loops; a score or value sum reads the same floats from either, rounded once. */
#define KV_ELEM_BYTES(f16) ((f16) ? sizeof(uint16_t) : sizeof(float))
static inline __attribute__((always_inline)) vf kv_load(const void *p, const int f16) {
    return f16 ? vload_f16((const uint16_t *)p) : vload((const float *)p);
}
static inline __attribute__((always_inline)) vf kv_load_partial(const void *p, int64_t m, const int f16) {
    return f16 ? vload_partial_f16((const uint16_t *)p, m) : vload_partial((const float *)p, m, 0.0f);
}

/* runs per call with several queries, and with one (decoding), so that a call keeps 8-16
 * chains in flight within the ISA's registers */
#define SCORE_RUNS (LMD_VEC_BYTES >= 64 ? 4 : 2)
#define SCORE_RUNS_ONE_QUERY 8

// scores[i][runs[r].t + j] = the score of q[i] (hs,) and position runs[r].t + j, for the nq
// queries i, nk runs r and j < LMD_VEC_LANES; runs of LMD_VEC_LANES positions, the last one
// shorter if partial
static inline __attribute__((always_inline)) void score_runs(float *const *scores, const float *const *q,
                                                             const int nq, const key_run *runs, const int nk,
                                                             const int partial, int32_t block_size, int hs,
                                                             const int f16) {
    vf acc[SCORE_QUERIES][SCORE_RUNS_ONE_QUERY];
    for (int i = 0; i < nq; i++)
        for (int r = 0; r < nk; r++) acc[i][r] = (vf){0};
    const int32_t last_len = runs[nk - 1].len;
    const int64_t feature_bytes = (int64_t)block_size * KV_ELEM_BYTES(f16);
    int64_t offset = 0; /* feature d's keys: d * feature_bytes */
    for (int d = 0; d < hs; d++, offset += feature_bytes) {
        vf k[SCORE_RUNS_ONE_QUERY];
        for (int r = 0; r < nk; r++) {
            const char *kr = (const char *)runs[r].k + offset;
            k[r] = partial && r == nk - 1 ? kv_load_partial(kr, last_len, f16) : kv_load(kr, f16);
            if (nq > 1) IN_REGISTER(k[r]); /* one load for the queries */
        }
        for (int i = 0; i < nq; i++) {
            const float qd = q[i][d];
            for (int r = 0; r < nk; r++) acc[i][r] += qd * k[r];
        }
    }
    /* runs in order: a short run's extra lanes are overwritten by the next run's */
    for (int r = 0; r < nk; r++)
        for (int i = 0; i < nq; i++) vstore(scores[i] + runs[r].t, acc[i][r]);
}

// score_runs with nq, nk, partial and f16 as constants (nq in [1, SCORE_QUERIES]; nk 1, 2, 4
// or 8)
static void score_runs_dispatch(float *const *scores, const float *const *q, int nq, const key_run *runs, int nk,
                                int partial, int32_t block_size, int hs, int f16) {
#define SCORE_CASE(NQ, NK)                                                                         \
    case (NQ) * 16 + (NK):                                                                         \
        if (f16) {                                                                                 \
            if (partial) score_runs(scores, q, NQ, runs, NK, 1, block_size, hs, 1);                \
            else score_runs(scores, q, NQ, runs, NK, 0, block_size, hs, 1);                        \
        } else {                                                                                   \
            if (partial) score_runs(scores, q, NQ, runs, NK, 1, block_size, hs, 0);                \
            else score_runs(scores, q, NQ, runs, NK, 0, block_size, hs, 0);                        \
        }                                                                                          \
        return;
    switch (nq * 16 + nk) {
        SCORE_CASE(1, 8) SCORE_CASE(1, 4) SCORE_CASE(1, 2) SCORE_CASE(1, 1)
#if LMD_VEC_BYTES >= 64
        SCORE_CASE(2, 4) SCORE_CASE(3, 4) SCORE_CASE(4, 4) SCORE_CASE(5, 4) SCORE_CASE(6, 4)
#endif
        SCORE_CASE(2, 2) SCORE_CASE(3, 2) SCORE_CASE(4, 2) SCORE_CASE(5, 2) SCORE_CASE(6, 2)
        SCORE_CASE(2, 1) SCORE_CASE(3, 1) SCORE_CASE(4, 1) SCORE_CASE(5, 1) SCORE_CASE(6, 1)
    default: score_runs(scores, q, nq, runs, nk, partial, block_size, hs, f16); /* not reached */
    }
#undef SCORE_CASE
}

// the n runs pending, in order, in calls of most, then 4, 2, 1; the last may be short
static void score_pending_runs(float *const *scores, const float *const *q, int nq, const key_run *runs, int n,
                               int most, int32_t block_size, int hs, int f16) {
    for (int done = 0, size = most; n > done; size /= 2)
        if (n - done >= size) {
            const int partial = done + size == n && runs[n - 1].len < LMD_VEC_LANES;
            score_runs_dispatch(scores, q, nq, runs + done, size, partial, block_size, hs, f16);
            done += size;
        }
}

// scores[i][t] for nq queries of the same sequence (q (nq,) pointers to (hs,)) and every
// position t < n_pos of the head's keys (kv features kv_offset..) in layer l of seq;
// scores rows hold n_pos + LMD_VEC_LANES floats
static void head_scores(float *const *scores, const float *const *q, int nq, const lmd_kvseq *seq, int32_t l,
                        int kv_offset, int32_t n_pos, int hs) {
    const int32_t block_size = seq->pool->block_size;
    const int f16 = seq->pool->dtype == LMD_KV_F16;
    const size_t elem_bytes = seq->pool->elem_bytes;
    const int64_t feature_bytes = (int64_t)block_size * (int64_t)elem_bytes;
    const int most = nq == 1 ? SCORE_RUNS_ONE_QUERY : SCORE_RUNS;
    key_run runs[SCORE_RUNS_ONE_QUERY];
    int n = 0;
    for (int32_t t = 0; t < n_pos;) {
        const int32_t column = t % block_size;
        int32_t len = block_size - column < LMD_VEC_LANES ? block_size - column : LMD_VEC_LANES;
        len = n_pos - t < len ? n_pos - t : len;
        const key_run run = {(const char *)lmd_kvseq_key(seq, l, t, kv_offset), t, len};
        t += len;
        if (f16) /* the run's keys, feature after feature, requested before they are scored: a
                  * 12-layer f16 decode after 2040 positions 7.1 -> 6.8 ms (f32 keys and value
                  * prefetches: no gain) */
            for (int d = 0; d < hs; d++) __builtin_prefetch((const char *)run.k + d * feature_bytes);
        runs[n++] = run;
        if (n == most || len < LMD_VEC_LANES) { /* a short run ends a call: its extra lanes go after */
            score_pending_runs(scores, q, nq, runs, n, most, block_size, hs, f16);
            n = 0;
        }
    }
    score_pending_runs(scores, q, nq, runs, n, most, block_size, hs, f16);
}

/* independent FMA chains the value sums keep going: an FMA's 4-cycle latency times the
 * two FMAs a core issues per cycle */
#define VALUE_CHAINS 8

/* queries whose value sums share their loads: their VALUE_CHAINS accumulators each, the
 * values and the weights fit the ISA's registers */
#define VALUE_QUERIES (LMD_VEC_BYTES >= 64 ? 3 : 2)

// sets of accumulators that give a head of nv vectors VALUE_CHAINS chains (a power of two)
#define VALUE_SETS(nv) ((nv) >= 8 ? 1 : (nv) >= 4 ? 2 : (nv) >= 2 ? 4 : 8)

/* The value sums of a head: out (hs,) = sum over positions t < n_pos of p[t] * v_t (hs,),
 * v_t the head's values at position t of the cached sequence (in each block, the head's
 * block_size consecutive rows of hs elements: kvcache.h), summed in registers, widened first
 * from an f16 cache. Position t goes to
 * accumulator set t % sets so that a small head still keeps VALUE_CHAINS FMAs in flight
 * (one chain per vector was latency-bound: a head of 8 features waited 4 cycles per
 * position); each set adds its positions in order, and the sets are added pairwise at the
 * end, set s with set s + sets/2, halving. The order depends on the head size only: not on
 * the block size, the batch or the thread, nor on whether two queries share the loads.
 *
 * VALUE_RANGE adds positions [t_begin, t_end) into the accumulators of queries q0 .. q0+nqr
 * (constants, so that the accumulators stay in registers). */
#define VALUE_RANGE(vec_t, elem_t, LOAD, KEEP, lanes, q0, nqr, t_begin, t_end)                      \
    for (int32_t t0 = (t_begin); t0 < (t_end);) {                                                  \
        const elem_t *v = (const elem_t *)lmd_kvseq_value(seq, l, t0, kv_offset);                  \
        const int32_t block_end = (t0 / block_size + 1) * block_size;                              \
        const int32_t nt = ((t_end) < block_end ? (t_end) : block_end) - t0;                       \
        int32_t t = 0;                                                                             \
        if (t0 % sets == 0) /* position t0 + t is in set t % sets */                               \
            for (; t + sets <= nt; t += sets)                                                      \
                for (int s = 0; s < sets; s++)                                                     \
                    for (int i = 0; i < nv; i++) {                                                 \
                        vec_t x;                                                                   \
                        LOAD(x, v + (int64_t)(t + s) * hs + (lanes) * i);                          \
                        if ((nqr) > 1) KEEP(x); /* one load for the queries */                     \
                        for (int qi = (q0); qi < (q0) + (nqr); qi++)                                \
                            acc[qi][s * nv + i] += p[qi][t0 + t + s] * x;                          \
                    }                                                                              \
        for (; t < nt; t++) /* the rest, or every position of oddly placed runs */                 \
            for (int s = 0; s < sets; s++)                                                         \
                if ((t0 + t) % sets == s)                                                          \
                    for (int i = 0; i < nv; i++) {                                                 \
                        vec_t x;                                                                   \
                        LOAD(x, v + (int64_t)t * hs + (lanes) * i);                                \
                        for (int qi = (q0); qi < (q0) + (nqr); qi++)                                \
                            acc[qi][s * nv + i] += p[qi][t0 + t] * x;                              \
                    }                                                                              \
        t0 += nt;                                                                                  \
    }

/* nq queries (1 to VALUE_QUERIES) of the same sequence, n_pos non-decreasing: the positions
 * all of them see are loaded once for all, then the positions only the later ones see */
#define VALUE_SUMS(vec_t, elem_t, LOAD, KEEP, lanes)                                               \
    do {                                                                                           \
        const int nv = hs / (lanes), sets = VALUE_SETS(hs / (lanes));                              \
        vec_t acc[VALUE_QUERIES][VALUE_CHAINS];                                                    \
        for (int qi = 0; qi < nq; qi++)                                                            \
            for (int j = 0; j < sets * nv; j++) acc[qi][j] = (vec_t){0};                           \
        VALUE_RANGE(vec_t, elem_t, LOAD, KEEP, lanes, 0, nq, 0, n_pos[0])                          \
        if (nq >= 2) VALUE_RANGE(vec_t, elem_t, LOAD, KEEP, lanes, 1, nq - 1, n_pos[0], n_pos[1])  \
        if (nq >= 3) VALUE_RANGE(vec_t, elem_t, LOAD, KEEP, lanes, 2, nq - 2, n_pos[1], n_pos[2])  \
        for (int qi = 0; qi < nq; qi++) {                                                          \
            for (int width = sets; width > 1; width /= 2)                                          \
                for (int s = 0; s < width / 2; s++)                                                \
                    for (int i = 0; i < nv; i++) acc[qi][s * nv + i] += acc[qi][(s + width / 2) * nv + i]; \
            for (int i = 0; i < nv; i++) {                                                         \
                const vec_t total = acc[qi][i] * scale[qi];                                        \
                memcpy(out[qi] + (lanes) * i, &total, sizeof total);                               \
            }                                                                                      \
        }                                                                                          \
    } while (0)

// out[i] (hs,) = scale[i] * the value sums of nq queries (1 to VALUE_QUERIES, n_pos
// non-decreasing) of seq with weights p[i] (n_pos[i],)
static inline __attribute__((always_inline)) void value_sums(float *const *out, const float *const *p,
                                                             const float *scale, const int32_t *n_pos, const int nq,
                                                             const lmd_kvseq *seq, int32_t l, int kv_offset,
                                                             int32_t block_size, const int hs,
                                                             const int f16) {
    if (hs == 8 || hs == 16 || hs == 32 || hs == 64 || hs == 128) { /* unrolled register versions */
        /* 16-float vectors where they are one register. With 8-float registers a 16-float
         * accumulator is two, and a head of 64 took twice the registers there are (spilled: the
         * AVX2 prefill of a 110M Llama spent a quarter of its time here), so heads of 32 and
         * 64 take 8-float vectors there. A head of 16 keeps 16-float ones, whose eight sets the
         * query tiles' arithmetic follows (TILE_VALUE_SETS), and so does a head of 128, whose
         * 16 8-float vectors would exceed the VALUE_CHAINS accumulators. */
        if (hs == 16 || hs == 128 || (LMD_VEC_BYTES >= 64 && hs % 16 == 0)) {
            if (f16) VALUE_SUMS(v16f, uint16_t, LOAD16_F16, KEEP16, 16);
            else VALUE_SUMS(v16f, float, LOAD16, KEEP16, 16);
        } else {
            if (f16) VALUE_SUMS(v8f, uint16_t, LOAD8_F16, KEEP8, 8);
            else VALUE_SUMS(v8f, float, LOAD8, KEEP8, 8);
        }
        return;
    }
    /* other head sizes: the positions in order, one chain */
    for (int qi = 0; qi < nq; qi++) {
        memset(out[qi], 0, (size_t)hs * sizeof(float));
        for (int32_t t0 = 0; t0 < n_pos[qi]; t0 += block_size) {
            const int32_t nt = n_pos[qi] - t0 < block_size ? n_pos[qi] - t0 : block_size;
            if (f16) {
                const uint16_t *v = (const uint16_t *)lmd_kvseq_value(seq, l, t0, kv_offset);
                for (int32_t t = 0; t < nt; t++)
                    for (int i = 0; i < hs; i++)
                        out[qi][i] += p[qi][t0 + t] * half_to_float(v[(int64_t)t * hs + i]);
            } else {
                const float *v = (const float *)lmd_kvseq_value(seq, l, t0, kv_offset);
                for (int32_t t = 0; t < nt; t++) lmd_axpy(out[qi], p[qi][t0 + t], v + (int64_t)t * hs, hs);
            }
        }
        for (int i = 0; i < hs; i++) out[qi][i] *= scale[qi];
    }
}

/* Below this many multiply-adds the attention of a chunk runs on one thread. */
#define ATTENTION_PARALLEL_MIN_WORK 100000

// how a B-token chunk's attention is cut into work units, kv head by kv head: tokens
// (cut at equal attended positions) and, when there are still too few units (a decode of
// one token, few kv heads), the kv head's query heads
typedef struct {
    int token_parts, head_parts; /* units = n_kv_heads * token_parts * head_parts */
} attention_split;

static attention_split split_attention(const lmd_config *c, int B, int threads) {
    attention_split split = {1, 1};
    const int target = 2 * threads < ATTENTION_MAX_UNITS ? 2 * threads : ATTENTION_MAX_UNITS;
    if (threads < 2 || c->n_kv_heads >= target) return split;
    const int per_kv = (target + c->n_kv_heads - 1) / c->n_kv_heads, group = c->n_heads / c->n_kv_heads;
    split.token_parts = per_kv < B ? per_kv : B;
    const int more = (per_kv + split.token_parts - 1) / split.token_parts;
    split.head_parts = more < group ? more : group;
    return split;
}

// the most units split_attention gives this config (it depends on B and threads up to
// ATTENTION_MAX_UNITS only)
static int most_attention_units(const lmd_config *c) {
    int most = 1;
    for (int threads = 1; threads <= ATTENTION_MAX_UNITS; threads++)
        for (int B = 1; B <= ATTENTION_MAX_UNITS; B++) {
            const attention_split split = split_attention(c, B, threads);
            const int units = c->n_kv_heads * split.token_parts * split.head_parts;
            most = units > most ? units : most;
        }
    return most;
}

// nt (<= SCORE_QUERIES / nh) consecutive tokens b.. of the chunk, all of one sequence, in
// query heads h0 .. h0+nh of one kv group, q (B,Q) at positions pos[b..] -> att_out (B,Q),
// scores (SCORE_QUERIES, scores_stride) the unit's buffer. The nt * nh queries (token
// after token, the heads within) share every key load of their scores and, by three, every
// value load; each query's arithmetic is exactly what it is alone.
static inline __attribute__((always_inline)) void attend_queries(lmd_model *m, const lmd_kvseq *seq, int b,
                                                                 int nt, int h0, int nh, int32_t l,
                                                                 float *scores_buffer, const int hs, const int f16) {
    const lmd_config *c = &m->config;
    const int group = c->n_heads / c->n_kv_heads;
    const int64_t Q = (int64_t)c->n_heads * hs;
    const int32_t block_size = seq->pool->block_size;
    const int kv_offset = (h0 / group) * hs;
    /* zeroed: GCC cannot see that the loops below stop at nq */
    const float *q[SCORE_QUERIES] = {0};
    float *scores[SCORE_QUERIES] = {0}, *out[SCORE_QUERIES] = {0};
    int32_t n_pos[SCORE_QUERIES], most = 0;
    const int nq = nt * nh;
    for (int i = 0; i < nq; i++) {
        const int64_t row = (int64_t)(b + i / nh) * Q + (int64_t)(h0 + i % nh) * hs;
        q[i] = m->q + row;
        out[i] = m->att_out + row;
        scores[i] = scores_buffer + (size_t)i * m->scores_stride;
        n_pos[i] = m->pos[b + i / nh] + 1; /* non-decreasing, as value_sums requires */
        most = n_pos[i] > most ? n_pos[i] : most;
    }
    head_scores(scores, q, nq, seq, l, kv_offset, most, hs);
    /* softmax without its division: the value sums take 1 / sum once */
    float inv_sum[SCORE_QUERIES];
    for (int i = 0; i < nq; i++) inv_sum[i] = lmd_softmax2_unnormalized(scores[i], n_pos[i]);
    for (int i = 0; i < nq; i += VALUE_QUERIES) {
        const float *const *p = (const float *const *)scores + i;
        switch (nq - i) { /* constants, for the accumulators to stay in registers */
        case 1: value_sums(out + i, p, inv_sum + i, n_pos + i, 1, seq, l, kv_offset, block_size, hs, f16); break;
        case 2: value_sums(out + i, p, inv_sum + i, n_pos + i, 2, seq, l, kv_offset, block_size, hs, f16); break;
        default:
            value_sums(out + i, p, inv_sum + i, n_pos + i, VALUE_QUERIES, seq, l, kv_offset, block_size, hs, f16);
        }
    }
}

/* Query tiles, for heads of 8 or 16 features (stories260K's are 8) in a prefill.
 * attend_queries keeps positions in the lanes; with heads this small its value sums are
 * half-width (8 features) and each query's softmax, ~16 vectors, too short to hide its
 * latencies. A tile holds up to LMD_VEC_LANES consecutive tokens of one sequence in one
 * query head, one query per lane: every step is a full vector across the queries, and a key
 * or value feature is one broadcast. Each query's arithmetic is attend_queries', in its order:
 *   scores   per position, one multiply-add chain over the features from 0 (of the scaled
 *            queries);
 *   softmax  the maximum (exact in any order), 2^(s - max), and the sum adding position t
 *            into partial t % LANES in order of t, the partials then by vhsum's tree
 *            (lmd_softmax2_unnormalized's lanes);
 *   values   position t into set t % 8 in order of t (VALUE_SETS of a one-vector head),
 *            the sets added pairwise as value_sums does, then * (1 / sum).
 * Positions after a query's own (the tile's later tokens) score -inf, whose exponential is
 * an exact 0 (a positive sum plus 0 is unchanged), and are masked out of its value sums (a
 * 0 weight times a value that overflowed to inf would be NaN). So a prefill stays
 * bit-identical to token-by-token decoding. A 511-token stories260K pass (one thread):
 * 5.5-6.0 -> 4.2-4.4 ms; a model with 16-feature heads 10.9 -> 10.5 ms. */

// how many of the chunk's tokens b.. (at most TILE_QUERIES, before b_end) belong to b's
// sequence at consecutive positions
static int tile_tokens_from(const lmd_model *m, const int32_t *token_seq, int b, int b_end) {
    int n = 1;
    while (n < TILE_QUERIES && b + n < b_end && token_seq[b + n] == token_seq[b] && m->pos[b + n] == m->pos[b] + n)
        n++;
    return n;
}

// the scores of a tile's queries (qt[d][i]: feature d of query i) and one position's key (feature
// d at k + d * stride), one multiply-add chain over the features, as score_runs sums them
static inline __attribute__((always_inline)) vf tile_score(const float *k, int64_t stride, const vf *qt,
                                                           const int hs) {
    vf acc = (vf){0};
    for (int d = 0; d < hs; d++) acc += k[(int64_t)d * stride] * qt[d];
    return acc;
}

// adds one position's exponentials p into the softmax partial `into` of a set of positions;
// with 16 lanes the set's positions alternate between two partials, so the two swap (count
// says how many times)
static inline __attribute__((always_inline)) void add_to_partial(vf *into, vf *other, int32_t *count, vf p) {
    *into += p;
    if (TILE_QUERIES != TILE_VALUE_SETS) {
        const vf next = *other;
        *other = *into, *into = next, ++*count;
    }
}

// the attention of the nq (<= TILE_QUERIES) tokens b.. (positions p0, p0 + 1, ...) of seq
// (f32) in query head h: q (B,Q) -> att_out (B,Q); buffer (TILE_QUERIES, scores_stride)
// floats, the unit's scores. Lanes from nq on hold zero queries, over the positions that
// exist, and are dropped.
static inline __attribute__((always_inline)) void attend_query_tile(lmd_model *m, const lmd_kvseq *seq, int b,
                                                                    int nq, int h, int32_t l, float *buffer,
                                                                    const int hs) {
    const lmd_config *c = &m->config;
    const int64_t Q = (int64_t)c->n_heads * hs;
    const int32_t block_size = seq->pool->block_size;
    const int kv_offset = (h / (c->n_heads / c->n_kv_heads)) * hs;
    const int32_t p0 = m->pos[b], n_all = p0 + nq;
    float *weights = buffer; /* (n_all <= scores_stride, TILE_QUERIES): position t's scores */
    vi lane;
    for (int i = 0; i < TILE_QUERIES; i++) lane[i] = i;
    vf qt[TILE_MAX_HEAD]; /* qt[d][i]: feature d of query i */
    for (int d = 0; d < hs; d++)
        for (int i = 0; i < TILE_QUERIES; i++)
            qt[d][i] = i < nq ? m->q[(int64_t)(b + i) * Q + (int64_t)h * hs + d] : 0.0f;

    /* scores and their maximum: the positions every query sees block by block (keys
     * feature-major: feature d of the block's column j at k + d * block_size + j), then the
     * tile's own, -inf for the queries before them */
    vf most = vbroadcast(-INFINITY);
    for (int32_t t0 = 0; t0 <= p0;) {
        const int32_t column = t0 % block_size;
        const int32_t nt = block_size - column < p0 + 1 - t0 ? block_size - column : p0 + 1 - t0;
        const float *k = (const float *)lmd_kvseq_key(seq, l, t0, kv_offset);
        for (int32_t j = 0; j < nt; j++) {
            const vf s = tile_score(k + j, block_size, qt, hs);
            vstore(weights + (int64_t)(t0 + j) * TILE_QUERIES, s);
            most = vmax(most, s);
        }
        t0 += nt;
    }
    for (int32_t t = p0 + 1; t < n_all; t++) {
        const float *k = (const float *)lmd_kvseq_key(seq, l, t, kv_offset);
        const vf s = vselect(lane < t - p0, vbroadcast(-INFINITY), tile_score(k, block_size, qt, hs));
        vstore(weights + (int64_t)t * TILE_QUERIES, s);
        most = vmax(most, s);
    }

    /* exponentials, their sums and the value sums, set by set (a set's positions are every
     * eighth, so set s adds into the softmax partials s and s + 8 alone, each in order of t):
     * the positions every query sees (t <= p0) block by block (a block's values of the kv
     * head are rows of hs floats), then the tile's own, which the queries before them do not
     * see */
    /* room for the two partials of every set whatever the lanes: with fewer than 8 lanes the
     * tiles are never used (query_tiles_apply), but the compiler sees the writes */
    vf partial[2 * TILE_VALUE_SETS > TILE_QUERIES ? 2 * TILE_VALUE_SETS : TILE_QUERIES],
        sets[TILE_VALUE_SETS][TILE_MAX_HEAD];
    for (int j = 0; j < TILE_QUERIES; j++) partial[j] = (vf){0};
    for (int set = 0; set < TILE_VALUE_SETS; set++) {
        /* the set's positions alternate between the partials set and set + 8 with 16 lanes:
         * `into` is the current position's, `other` the next's (one partial with 8 lanes) */
        vf acc[TILE_MAX_HEAD], into = (vf){0}, other = (vf){0};
        int32_t count = 0;
        for (int d = 0; d < hs; d++) acc[d] = (vf){0};
        for (int32_t t0 = 0; t0 <= p0;) {
            const int32_t column = t0 % block_size;
            const int32_t nt = block_size - column < p0 + 1 - t0 ? block_size - column : p0 + 1 - t0;
            const float *v = (const float *)lmd_kvseq_value(seq, l, t0, kv_offset);
            for (int32_t j = (set - t0 % TILE_VALUE_SETS + TILE_VALUE_SETS) % TILE_VALUE_SETS; j < nt;
                 j += TILE_VALUE_SETS) {
                const vf p = vexp2_nonpositive(vload(weights + (int64_t)(t0 + j) * TILE_QUERIES) - most);
                add_to_partial(&into, &other, &count, p);
                const float *vt = v + (int64_t)j * hs;
                for (int d = 0; d < hs; d++) acc[d] += vt[d] * p;
            }
            t0 += nt;
        }
        for (int32_t t = p0 + 1 + (set - (p0 + 1) % TILE_VALUE_SETS + TILE_VALUE_SETS) % TILE_VALUE_SETS; t < n_all;
             t += TILE_VALUE_SETS) {
            const vf p = vexp2_nonpositive(vload(weights + (int64_t)t * TILE_QUERIES) - most); /* 0 where masked */
            add_to_partial(&into, &other, &count, p);
            const float *vt = (const float *)lmd_kvseq_value(seq, l, t, kv_offset);
            const vi seen = lane >= t - p0;
            for (int d = 0; d < hs; d++) acc[d] = vselect(seen, acc[d] + vt[d] * p, acc[d]);
        }
        for (int d = 0; d < hs; d++) sets[set][d] = acc[d];
        if (TILE_QUERIES == TILE_VALUE_SETS) {
            partial[set] = into;
        } else {
            partial[set] = count % 2 == 0 ? into : other;
            partial[set + TILE_VALUE_SETS] = count % 2 == 0 ? other : into;
        }
    }
    for (int width = TILE_QUERIES; width > 1; width /= 2)
        for (int j = 0; j < width / 2; j++) partial[j] += partial[j + width / 2];
    const vf inv_sum = vbroadcast(1.0f) / partial[0];
    for (int width = TILE_VALUE_SETS; width > 1; width /= 2)
        for (int set = 0; set < width / 2; set++)
            for (int d = 0; d < hs; d++) sets[set][d] += sets[set + width / 2][d];
    for (int d = 0; d < hs; d++) {
        const vf total = sets[0][d] * inv_sum;
        for (int i = 0; i < nq; i++) m->att_out[(int64_t)(b + i) * Q + (int64_t)h * hs + d] = total[i];
    }
}

// one work unit: query heads [h_begin, h_end) of one kv group for the chunk's tokens
// [b_begin, b_end), in tiles of up to SCORE_QUERIES queries: neighbouring tokens of one
// sequence times the group's heads (GQA's heads share their keys and values; so do a
// prefill's tokens); heads of 8 or 16 features by query tiles wherever consecutive tokens
// of one sequence fill at least half of one. Inlined per usual head size (see attend_unit)
// so the value sums' loops have constant trip counts.
static inline __attribute__((always_inline)) void attend_unit_sized(lmd_model *m, lmd_kvseq *const *seqs,
                                                                    const int32_t *token_seq, int b_begin,
                                                                    int b_end, int32_t l, int h_begin, int h_end,
                                                                    float *scores_buffer, const int hs,
                                                                    const int f16) {
    const int heads = h_end - h_begin;
    const int tile_heads = heads < SCORE_QUERIES ? heads : SCORE_QUERIES;
    const int tile_tokens = SCORE_QUERIES / tile_heads;
    for (int b = b_begin; b < b_end;) {
        if (query_tiles_apply(hs, f16)) {
            /* tiles at least half full: a decode's lone token keeps to attend_queries */
            const int nq = tile_tokens_from(m, token_seq, b, b_end);
            if (2 * nq >= TILE_QUERIES) {
                for (int h = h_begin; h < h_end; h++)
                    attend_query_tile(m, seqs[token_seq[b]], b, nq, h, l, scores_buffer, hs);
                b += nq;
                continue;
            }
        }
        int nt = 1;
        while (nt < tile_tokens && b + nt < b_end && token_seq[b + nt] == token_seq[b]) nt++;
        for (int h0 = h_begin; h0 < h_end; h0 += tile_heads) {
            const int nh = h_end - h0 < tile_heads ? h_end - h0 : tile_heads;
            attend_queries(m, seqs[token_seq[b]], b, nt, h0, nh, l, scores_buffer, hs, f16);
        }
        b += nt;
    }
}

// attend_unit_sized for the model's head size, the usual ones as constants
static inline __attribute__((always_inline)) void attend_unit_typed(lmd_model *m, lmd_kvseq *const *seqs,
                                                                    const int32_t *token_seq, int b_begin,
                                                                    int b_end, int32_t l, int h_begin, int h_end,
                                                                    float *scores_buffer, const int f16) {
#define ATTEND_UNIT(hs) attend_unit_sized(m, seqs, token_seq, b_begin, b_end, l, h_begin, h_end, scores_buffer, hs, f16)
    switch (m->config.head_dim) {
    case 8: ATTEND_UNIT(8); break;
    case 16: ATTEND_UNIT(16); break;
    case 32: ATTEND_UNIT(32); break;
    case 64: ATTEND_UNIT(64); break;
    case 128: ATTEND_UNIT(128); break;
    default: ATTEND_UNIT(m->config.head_dim);
    }
#undef ATTEND_UNIT
}

/* one function per storage type (one with both grew past what GCC tracks for debug
 * information) */
static void attend_unit_f32(lmd_model *m, lmd_kvseq *const *seqs, const int32_t *token_seq, int b_begin, int b_end,
                            int32_t l, int h_begin, int h_end, float *scores_buffer) {
    attend_unit_typed(m, seqs, token_seq, b_begin, b_end, l, h_begin, h_end, scores_buffer, 0);
}
static void attend_unit_f16(lmd_model *m, lmd_kvseq *const *seqs, const int32_t *token_seq, int b_begin, int b_end,
                            int32_t l, int h_begin, int h_end, float *scores_buffer) {
    attend_unit_typed(m, seqs, token_seq, b_begin, b_end, l, h_begin, h_end, scores_buffer, 1);
}

static void attend_unit(lmd_model *m, lmd_kvseq *const *seqs, const int32_t *token_seq, int b_begin, int b_end,
                        int32_t l, int h_begin, int h_end, float *scores_buffer) {
    /* a token part can be empty (attention() cuts where the work reaches p / tp, and one long
     * sequence can hold all of it): then token_seq[b_begin] lies past the chunk's tokens */
    if (b_begin >= b_end) return;
    /* one pool for the call (lmd_model_forward checks), so one storage type */
    if (seqs[token_seq[b_begin]]->pool->dtype == LMD_KV_F16)
        attend_unit_f16(m, seqs, token_seq, b_begin, b_end, l, h_begin, h_end, scores_buffer);
    else
        attend_unit_f32(m, seqs, token_seq, b_begin, b_end, l, h_begin, h_end, scores_buffer);
}

// every query head of the chunk's B tokens; the units (kv head, part of its query heads,
// part of the tokens) are independent, so they split across threads
static void attention(lmd_model *m, lmd_kvseq *const *seqs, const int32_t *token_seq, int B, int32_t l) {
    const lmd_config *c = &m->config;
    const int threads = lmd_get_num_threads(), group = c->n_heads / c->n_kv_heads;
    int64_t work = 0, seen = 0;
    for (int b = 0; b < B; b++) work += m->pos[b] + 1;
    const int parallel = work * c->head_dim * c->n_heads >= ATTENTION_PARALLEL_MIN_WORK && threads > 1;
    const attention_split split = split_attention(c, B, parallel ? threads : 1);
    const int tp = split.token_parts, hp = split.head_parts, units = c->n_kv_heads * tp * hp;
    /* token part p: tokens [bound[p], bound[p+1]), cut where the positions attended to (a
     * token at position t attends to t + 1) reach p / tp of the chunk's: a prefill's later
     * tokens see more */
    int bound[ATTENTION_MAX_UNITS + 1];
    bound[0] = 0;
    for (int b = 0, p = 1; b < B; b++) {
        seen += m->pos[b] + 1;
        while (p < tp && seen * tp >= work * p) bound[p++] = b + 1;
    }
    bound[tp] = B;
    /* unit u: kv head u / (tp hp), then head part, then token part */
#define ATTEND_UNIT_U(u)                                                                           \
    do {                                                                                           \
        const int g = (u) / (tp * hp), head_part = (u) / tp % hp, token_part = (u) % tp;           \
        attend_unit(m, seqs, token_seq, bound[token_part], bound[token_part + 1], l,               \
                    g * group + group * head_part / hp, g * group + group * (head_part + 1) / hp,  \
                    m->scores + (size_t)(u) * m->scores_rows * m->scores_stride);                   \
    } while (0)
#ifdef _OPENMP
    if (parallel) {
#pragma omp parallel for schedule(static, 1) num_threads(threads)
        for (int u = 0; u < units; u++) ATTEND_UNIT_U(u);
        return;
    }
#endif
    for (int u = 0; u < units; u++) ATTEND_UNIT_U(u);
#undef ATTEND_UNIT_U
}

/* The per-token steps between a layer's matrix products (biases, rotary, cache writes,
 * activations, residuals, norms), one token b at a time. */
typedef struct {
    lmd_model *m;
    lmd_kvseq *const *seqs;
    const int32_t *token_seq;
    int32_t l;
} layer_step;

// q, k, v of token b: biases, rotary, then k and v into the cache
static void step_qkv(const layer_step *s, int b) {
    lmd_model *m = s->m;
    const lmd_config *c = &m->config;
    const lmd_layer_weights *lw = &m->weights.layers[s->l];
    const int64_t Q = (int64_t)c->n_heads * c->head_dim, K = (int64_t)c->n_kv_heads * c->head_dim;
    const int half = c->head_dim / 2;
    add_bias(m->q + b * Q, lw->bq, Q);
    add_bias(m->k + b * K, lw->bk, K);
    add_bias(m->v + b * K, lw->bv, K);
    if (c->arch != LMD_ARCH_GPT2) {
        const float *cos_t = m->rope_cos + (int64_t)b * half, *sin_t = m->rope_sin + (int64_t)b * half;
        lmd_rope_rotate(m->q + b * Q, c->n_heads, c->head_dim, cos_t, sin_t, c->rope_layout);
        lmd_rope_rotate(m->k + b * K, c->n_kv_heads, c->head_dim, cos_t, sin_t, c->rope_layout);
    }
    /* the queries take attention's 1 / sqrt(hs) and log2(e) (base-2 softmax) here, once,
     * rather than every score */
    for (int64_t j = 0; j < Q; j++) m->q[b * Q + j] *= m->q_scale;
    const lmd_kvseq *seq = s->seqs[s->token_seq[b]];
    const int32_t block_size = seq->pool->block_size;
    const int32_t head_size = seq->pool->head_size;
    /* each kv head's key features are block_size elements apart, its value features consecutive */
    for (int32_t h = 0; h < K; h += head_size) {
        const float *k = m->k + b * K + h, *v = m->v + b * K + h;
        if (seq->pool->dtype == LMD_KV_F16) { /* rounded to nearest even */
            uint16_t *key = lmd_kvseq_key(seq, s->l, m->pos[b], h), *value = lmd_kvseq_value(seq, s->l, m->pos[b], h);
            for (int32_t j = 0; j < head_size; j++) {
                key[(int64_t)j * block_size] = lmd_f32_to_fp16(k[j]);
                value[j] = lmd_f32_to_fp16(v[j]);
            }
        } else {
            float *key = lmd_kvseq_key(seq, s->l, m->pos[b], h);
            for (int32_t j = 0; j < head_size; j++) key[(int64_t)j * block_size] = k[j];
            memcpy(lmd_kvseq_value(seq, s->l, m->pos[b], h), v, (size_t)head_size * sizeof(float));
        }
    }
}

// x += xb2 + bias (none if NULL) for token b, then xb = norm(x) by norm_w, norm_b (skipped
// if norm_w is NULL): a sublayer's output joining the residual stream, and the next norm
static void residual_and_norm(lmd_model *m, int b, const float *bias, const float *norm_w, const float *norm_b) {
    const int64_t D = m->config.dim;
    add_bias(m->xb2 + b * D, bias, D);
    add_residual(m->x + b * D, m->xb2 + b * D, D);
    if (norm_w != NULL) norm(m, m->xb + b * D, m->x + b * D, norm_w, norm_b, 1);
}

// the attention output (wo @ attention, in xb2) into x, then the feed-forward norm
static void step_attention_out(const layer_step *s, int b) {
    const lmd_layer_weights *lw = &s->m->weights.layers[s->l];
    residual_and_norm(s->m, b, lw->bo, lw->ffn_norm, lw->ffn_norm_bias);
}

// the feed-forward activation of token b: gelu(up) in hb2 (GPT-2), silu(gate) * up in hb
static void step_activation(const layer_step *s, int b) {
    lmd_model *m = s->m;
    const lmd_layer_weights *lw = &m->weights.layers[s->l];
    const int64_t H = m->config.hidden_dim;
    add_bias(m->hb2 + b * H, lw->b_up, H);
    if (m->config.arch == LMD_ARCH_GPT2) lmd_gelu_tanh(m->hb2 + b * H, H);
    else lmd_swiglu(m->hb + b * H, m->hb2 + b * H, H);
}

// the feed-forward output (in xb2) into x, then the next layer's attention norm
static void step_ffn_out(const layer_step *s, int b) {
    const lmd_weights *w = &s->m->weights;
    const lmd_layer_weights *next = s->l + 1 < s->m->config.n_layers ? &w->layers[s->l + 1] : NULL;
    residual_and_norm(s->m, b, w->layers[s->l].b_down, next ? next->attn_norm : NULL, next ? next->attn_norm_bias : NULL);
}

// step(s, b) for the chunk's B tokens, across the threads from TOKENS_PARALLEL_MIN tokens on
// (a branch, not an OpenMP if clause: a serialized parallel region still cost ~0.4 us, seven
// microseconds of a 30 us stories260K decode step)
static void for_each_token(void (*step)(const layer_step *, int), const layer_step *s, int B) {
#ifdef _OPENMP
    const int threads = lmd_get_num_threads();
    if (threads > 1 && B >= TOKENS_PARALLEL_MIN) {
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int b = 0; b < B; b++) step(s, b);
        return;
    }
#endif
    for (int b = 0; b < B; b++) step(s, b);
}

// tokens of one chunk -> residual stream x (B,D) after every layer; K/V written to the cache
static void run_layers(lmd_model *m, lmd_kvseq *const *seqs, const int32_t *tokens,
                       const int32_t *token_seq, int B) {
    const lmd_config *c = &m->config;
    const lmd_weights *w = &m->weights;
    const int64_t D = c->dim;
    const int gpt2 = c->arch == LMD_ARCH_GPT2;

    const int half = c->head_dim / 2;
    for (int b = 0; b < B; b++) {
        lmd_matrix_row(m->x + b * D, &w->token_embedding, tokens[b]);
        if (gpt2)
            add_residual(m->x + b * D, w->position_embedding + (int64_t)m->pos[b] * D, D);
        else /* each token's rotary angles, once for all layers */
            lmd_rope_angles(m->rope_cos + (int64_t)b * half, m->rope_sin + (int64_t)b * half, m->pos[b],
                            m->inv_freq, half);
    }
    norm(m, m->xb, m->x, w->layers[0].attn_norm, w->layers[0].attn_norm_bias, B);
    for (int32_t l = 0; l < c->n_layers; l++) {
        const lmd_layer_weights *lw = &w->layers[l];
        const layer_step step = {m, seqs, token_seq, l};
        // attention sublayer: x += wo @ attention(norm(x)), norm(x) in xb already
        matmul(m, m->q, m->xb, &lw->wq, B);
        matmul_same_x(m, m->k, m->xb, &lw->wk, B, &lw->wq);
        matmul_same_x(m, m->v, m->xb, &lw->wv, B, &lw->wk);
        for_each_token(step_qkv, &step, B);
        attention(m, seqs, token_seq, B, l);
        matmul(m, m->xb2, m->att_out, &lw->wo, B);
        for_each_token(step_attention_out, &step, B);
        // feed-forward sublayer: x += down(act(up(norm(x)))), norm(x) in xb already
        matmul(m, m->hb2, m->xb, &lw->w_up, B);
        if (!gpt2) matmul_same_x(m, m->hb, m->xb, &lw->w_gate, B, &lw->w_up);
        for_each_token(step_activation, &step, B);
        matmul(m, m->xb2, gpt2 ? m->hb2 : m->hb, &lw->w_down, B);
        for_each_token(step_ffn_out, &step, B);
    }
}

lmd_status lmd_model_forward(lmd_model *m, lmd_kvseq *const *seqs, int32_t n_seqs,
                             const int32_t *tokens, const int32_t *token_seq, int32_t n_tokens,
                             const int32_t *logit_index, int32_t n_logits, float *logits,
                             lmd_error *err) {
    const lmd_config *c = &m->config;
    /* --- validate everything before touching any sequence --- */
    if (n_seqs < 1) return lmd_fail(err, LMD_ERR_INVALID_ARG, "n_seqs (=%d) must be >= 1", n_seqs);
    if (n_tokens < 1) return lmd_fail(err, LMD_ERR_INVALID_ARG, "n_tokens (=%d) must be >= 1", n_tokens);
    if (n_logits < 0) return lmd_fail(err, LMD_ERR_INVALID_ARG, "n_logits (=%d) must be >= 0", n_logits);
    const lmd_kvpool *pool = seqs[0] ? seqs[0]->pool : NULL;
    for (int32_t s = 0; s < n_seqs; s++) {
        if (seqs[s] == NULL) return lmd_fail(err, LMD_ERR_INVALID_ARG, "sequence %d is NULL", s);
        if (seqs[s]->pool != pool)
            return lmd_fail(err, LMD_ERR_INVALID_ARG, "sequence %d belongs to another cache pool", s);
        seqs[s]->pending = -1;
    }
    if (pool->n_layers != c->n_layers || pool->kv_dim != c->n_kv_heads * c->head_dim ||
        pool->head_size != c->head_dim)
        return lmd_fail(err, LMD_ERR_INVALID_ARG,
                        "the cache pool holds %d layers of %d features in heads of %d but the model has %d of %d "
                        "in heads of %d",
                        pool->n_layers, pool->kv_dim, pool->head_size, c->n_layers, c->n_kv_heads * c->head_dim,
                        c->head_dim);
    for (int32_t s = 0; s < n_seqs; s++) {
        if (seqs[s]->pending != -1)
            return lmd_fail(err, LMD_ERR_INVALID_ARG, "sequence %d appears twice in one call", s);
        seqs[s]->pending = 0;
    }
    for (int32_t t = 0; t < n_tokens; t++) {
        if (tokens[t] < 0 || tokens[t] >= c->vocab_size)
            return lmd_fail(err, LMD_ERR_INVALID_ARG, "token id %d at index %d is outside the vocabulary [0, %d)",
                            tokens[t], t, c->vocab_size);
        if (token_seq[t] < 0 || token_seq[t] >= n_seqs)
            return lmd_fail(err, LMD_ERR_INVALID_ARG, "sequence index %d of token %d is outside [0, %d)",
                            token_seq[t], t, n_seqs);
        seqs[token_seq[t]]->pending++;
    }
    for (int32_t i = 0; i < n_logits; i++)
        if (logit_index[i] < 0 || logit_index[i] >= n_tokens)
            return lmd_fail(err, LMD_ERR_INVALID_ARG, "logit index %d (=%d) is outside [0, %d)", i,
                            logit_index[i], n_tokens);
    int64_t blocks_needed = 0;
    for (int32_t s = 0; s < n_seqs; s++) {
        const lmd_kvseq *seq = seqs[s];
        int32_t limit = seq->max_len < c->context_length ? seq->max_len : c->context_length;
        if ((int64_t)seq->len + seq->pending > limit)
            return lmd_fail(err, LMD_ERR_CACHE_FULL,
                            "sequence %d holds %d positions; %d more exceed the context length %d", s,
                            seq->len, seq->pending, limit);
        blocks_needed += lmd_kvseq_blocks_needed(seq, seq->pending);
        /* Writers of a shared, partly filled block copy it in turn; when they are all its
         * holders, the last finds it private by then and copies nothing. */
        const int32_t bs = pool->block_size;
        if (seq->pending > 0 && seq->len % bs != 0 && pool->refcount[seq->blocks[seq->len / bs]] > 1) {
            const int32_t block = seq->blocks[seq->len / bs];
            int32_t writers = 1;
            for (int32_t o = 0; o < s; o++)
                writers += seqs[o]->pending > 0 && seqs[o]->len % bs != 0 &&
                           seqs[o]->blocks[seqs[o]->len / bs] == block;
            if (writers == pool->refcount[block]) blocks_needed--;
        }
    }
    if (blocks_needed > pool->n_free)
        return lmd_fail(err, LMD_ERR_CACHE_FULL,
                        "the KV cache pool has %d free blocks of %d positions but this call needs %lld",
                        pool->n_free, pool->block_size, (long long)blocks_needed);
    int64_t longest = 0; /* positions the longest sequence attends to by the end of the call */
    for (int32_t s = 0; s < n_seqs; s++)
        if ((int64_t)seqs[s]->len + seqs[s]->pending > longest) longest = (int64_t)seqs[s]->len + seqs[s]->pending;
    lmd_status grown = ensure_scores(m, longest, err);
    if (grown != LMD_OK) return grown;

    /* --- from here on nothing fails --- */
    for (int32_t s = 0; s < n_seqs; s++) {
        lmd_status st = lmd_kvseq_reserve(seqs[s], seqs[s]->pending, err);
        if (st != LMD_OK) return st; /* unreachable: checked above */
        seqs[s]->pending = 0;
    }
    const int64_t D = c->dim, V = c->vocab_size;
    for (int32_t c0 = 0; c0 < n_tokens; c0 += m->max_batch) {
        int B = n_tokens - c0 < m->max_batch ? n_tokens - c0 : m->max_batch;
        for (int b = 0; b < B; b++) {
            lmd_kvseq *seq = seqs[token_seq[c0 + b]];
            m->pos[b] = seq->len + seq->pending++;
        }
        run_layers(m, seqs, tokens + c0, token_seq + c0, B);

        /* logits: runs of consecutive requests that fall in this chunk share one pass over the head */
        for (int32_t i = 0; i < n_logits;) {
            if (logit_index[i] < c0 || logit_index[i] >= c0 + B) {
                i++;
                continue;
            }
            int32_t run = 0;
            while (i + run < n_logits && run < B && logit_index[i + run] >= c0 && logit_index[i + run] < c0 + B) {
                memcpy(m->xb + run * D, m->x + (int64_t)(logit_index[i + run] - c0) * D, (size_t)D * sizeof(float));
                run++;
            }
            norm(m, m->xb, m->xb, m->weights.final_norm, m->weights.final_norm_bias, run);
            matmul(m, logits + (int64_t)i * V, m->xb, &m->weights.output, run);
            i += run;
        }
    }
    for (int32_t s = 0; s < n_seqs; s++) {
        seqs[s]->len += seqs[s]->pending;
        seqs[s]->pending = 0;
    }
    return LMD_OK;
}
