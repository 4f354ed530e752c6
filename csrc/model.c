/* model.c -- forward pass of decoder-only transformers (contract in model.h).
 *
 * Dimension letters: B tokens of a chunk, D dim, Q q_dim, K kv_dim, H hidden_dim, V vocab. */
#include "model.h"
#include "vec.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------ */
/* validation                                                           */
/* ------------------------------------------------------------------ */

static lmd_status check_matrix(const lmd_matrix *w, const char *layer_prefix, const char *name,
                               int64_t rows, int64_t cols, lmd_error *err) {
    if (w->data == NULL)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "%s%s: missing", layer_prefix, name);
    if (w->dtype != LMD_F32 && w->dtype != LMD_BF16 && w->dtype != LMD_Q8_0)
        return lmd_fail(err, LMD_ERR_UNSUPPORTED, "%s%s: unknown storage type %d", layer_prefix, name,
                        (int)w->dtype);
    if (w->rows != rows || w->cols != cols)
        return lmd_fail(err, LMD_ERR_FORMAT, "%s%s: shape (%lld, %lld) but the config needs (%lld, %lld)",
                        layer_prefix, name, (long long)w->rows, (long long)w->cols, (long long)rows,
                        (long long)cols);
    if (w->dtype == LMD_Q8_0 && cols % LMD_Q8_0_BLOCK != 0)
        return lmd_fail(err, LMD_ERR_FORMAT, "%s%s: q8_0 needs a multiple of 32 columns, not %lld",
                        layer_prefix, name, (long long)cols);
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
    if (!(c->norm_eps >= 0.0f)) return lmd_fail(err, LMD_ERR_INVALID_ARG, "norm_eps (=%g) must be >= 0", c->norm_eps);
    if (c->arch == LMD_ARCH_LLAMA && !(c->rope_theta > 0.0f))
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "rope_theta (=%g) must be > 0", c->rope_theta);
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
    if (w->layers == NULL) return lmd_fail(err, LMD_ERR_INVALID_ARG, "layers: missing");
    for (int32_t l = 0; l < c->n_layers; l++) {
        const lmd_layer_weights *lw = &w->layers[l];
        char prefix[32];
        snprintf(prefix, sizeof prefix, "layers[%d].", l);
        TRY(check_vector(lw->attn_norm, 1, prefix, "attn_norm", err));
        TRY(check_vector(lw->ffn_norm, 1, prefix, "ffn_norm", err));
        TRY(check_matrix(&lw->wq, prefix, "wq", Q, D, err));
        TRY(check_matrix(&lw->wk, prefix, "wk", K, D, err));
        TRY(check_matrix(&lw->wv, prefix, "wv", K, D, err));
        TRY(check_matrix(&lw->wo, prefix, "wo", D, Q, err));
        TRY(check_matrix(&lw->w_up, prefix, "w_up", H, D, err));
        TRY(check_matrix(&lw->w_down, prefix, "w_down", D, H, err));
        if (gpt2) {
            TRY(check_vector(lw->attn_norm_bias, 1, prefix, "attn_norm_bias", err));
            TRY(check_vector(lw->ffn_norm_bias, 1, prefix, "ffn_norm_bias", err));
        } else {
            TRY(check_matrix(&lw->w_gate, prefix, "w_gate", H, D, err));
        }
    }
#undef TRY
    return LMD_OK;
}

/* ------------------------------------------------------------------ */
/* init / free                                                          */
/* ------------------------------------------------------------------ */

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
    free(m);
}

// bytes of scratch the widest matmul of a B-token chunk can use (lmd_matmul_scratch_bytes)
static size_t matmul_scratch_bytes(const lmd_config *config, const lmd_weights *w, int B) {
    size_t most = lmd_matmul_scratch_bytes(&w->output, B);
    for (int32_t l = 0; l < config->n_layers; l++) {
        const lmd_layer_weights *lw = &w->layers[l];
        const lmd_matrix *matrices[] = {&lw->wq, &lw->wk, &lw->wv, &lw->wo, &lw->w_up, &lw->w_down, &lw->w_gate};
        const int n_matrices = config->arch == LMD_ARCH_LLAMA ? 7 : 6; /* GPT-2 has no gate */
        for (int i = 0; i < n_matrices; i++) {
            const size_t bytes = lmd_matmul_scratch_bytes(matrices[i], B);
            most = bytes > most ? bytes : most;
        }
    }
    return most;
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
    m->scores = lmd_alloc_aligned((size_t)config->n_heads * 2 * config->context_length * sizeof(float));
    m->inv_freq = malloc(((size_t)config->head_dim / 2 + 1) * sizeof(float));
    m->rope_cos = malloc((B * (size_t)(config->head_dim / 2) + 1) * sizeof(float));
    m->rope_sin = malloc((B * (size_t)(config->head_dim / 2) + 1) * sizeof(float));
    m->pos = malloc(B * sizeof(int32_t));
    const size_t scratch_bytes = matmul_scratch_bytes(config, weights, max_batch);
    if (scratch_bytes > 0) {
        m->matmul_scratch = lmd_alloc_aligned(scratch_bytes);
        if (m->matmul_scratch == NULL) {
            lmd_model_free(m);
            return lmd_fail(err, LMD_ERR_NOMEM, "out of memory allocating the run state for %d tokens", max_batch);
        }
    }
    if (!m->layer_storage || !m->x || !m->xb || !m->xb2 || !m->q || !m->k || !m->v || !m->att_out ||
        !m->hb || !m->hb2 || !m->scores || !m->inv_freq || !m->rope_cos || !m->rope_sin || !m->pos) {
        lmd_model_free(m);
        return lmd_fail(err, LMD_ERR_NOMEM, "out of memory allocating the run state for %d tokens",
                        max_batch);
    }
    memcpy(m->layer_storage, weights->layers, (size_t)config->n_layers * sizeof(lmd_layer_weights));
    m->weights.layers = m->layer_storage;
    /* inv_freq[i] = base^(-2i/hs), computed in double then rounded, as the references do in float */
    for (int32_t i = 0; i < config->head_dim / 2; i++)
        m->inv_freq[i] = (float)(1.0 / pow((double)config->rope_theta, (2.0 * i) / config->head_dim));
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

static void add_bias(float *x, const float *bias, int B, int64_t n) {
    if (bias == NULL) return;
    for (int b = 0; b < B; b++)
        for (int64_t k = 0; k < n; k++) x[b * n + k] += bias[k];
}

static void add_residual(float *x, const float *delta, int64_t n) {
    for (int64_t k = 0; k < n; k++) x[k] += delta[k];
}

static void norm(const lmd_model *m, float *out, const float *x, const float *w, const float *b, int B) {
    if (m->config.arch == LMD_ARCH_GPT2) lmd_layernorm(out, x, w, b, B, m->config.dim, m->config.norm_eps);
    else lmd_rmsnorm(out, x, w, B, m->config.dim, m->config.norm_eps);
}

/* Head-sized dot products and value sums, inlined: heads are short (8 to 256
 * features), too short for a call per position and for ops.c's widest vectors.
 * Lanes of 8 floats summed in a fixed order, so results never depend on threads. */
typedef float v8f __attribute__((vector_size(32)));

/* a macro, not a function returning a 32-byte vector would change
 * the ABI on builds without AVX */
#define LOAD8(dst, p) memcpy(&(dst), (p), sizeof(dst))
typedef float v16f __attribute__((vector_size(64)));
#define LOAD16(dst, p) memcpy(&(dst), (p), sizeof(dst))
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

/* The sum of a head's products: 8 lanes, lane j summing features i = j (mod 8) in order
 * (two interleaved accumulators then added), then the lanes in pairs:
 * ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)), then features past the last 8.
 * head_dot and head_dots8 both follow it, so a score never depends on which ran. */

// the 8 lanes' pairwise total of a (8,) (macros, not functions: see LOAD8)
#define LANES_SUM(a) ((((a)[0] + (a)[1]) + ((a)[2] + (a)[3])) + (((a)[4] + (a)[5]) + ((a)[6] + (a)[7])))

// q (hs,) . k (hs,)
static inline float head_dot(const float *q, const float *k, int hs) {
    v8f acc0 = {0}, acc1 = {0};
    int i = 0;
    v8f a0, b0, a1, b1;
    for (; i + 16 <= hs; i += 16) {
        LOAD8(a0, q + i);
        LOAD8(b0, k + i);
        LOAD8(a1, q + i + 8);
        LOAD8(b1, k + i + 8);
        acc0 += a0 * b0;
        acc1 += a1 * b1;
    }
    for (; i + 8 <= hs; i += 8) {
        LOAD8(a0, q + i);
        LOAD8(b0, k + i);
        acc0 += a0 * b0;
    }
    const v8f lanes = acc0 + acc1;
    float s = LANES_SUM(lanes);
    for (; i < hs; i++) s += q[i] * k[i];
    return s;
}

// pairwise sums of neighbouring lanes: (x0+x1, x2+x3, y0+y1, y2+y3, x4+x5, x6+x7, y4+y5, y6+y7)
#define PAIR_SUMS(x, y)                                                                            \
    (__builtin_shufflevector(x, y, 0, 2, 8, 10, 4, 6, 12, 14) +                                    \
     __builtin_shufflevector(x, y, 1, 3, 9, 11, 5, 7, 13, 15))
// PAIR_SUMS of the low 8 lanes of x and y in the low 8, of their high 8 lanes in the high 8
#define PAIR_SUMS16(x, y)                                                                          \
    (__builtin_shufflevector(x, y, 0, 2, 16, 18, 4, 6, 20, 22, 8, 10, 24, 26, 12, 14, 28, 30) +    \
     __builtin_shufflevector(x, y, 1, 3, 17, 19, 5, 7, 21, 23, 9, 11, 25, 27, 13, 15, 29, 31))

// out[i][j] = scale * q[i] (hs,) . k[j * stride] (hs,) for nq queries i (1 or 2) and 8 keys j,
// each exactly as head_dot sums it: the keys' lane totals are formed together (three rounds
// of PAIR_SUMS and one add replace eight separate reductions), each key is loaded once for
// all the queries and each query once for all eight keys
static inline __attribute__((always_inline)) void head_dots8(float *const *out, const float *const *q, const int nq,
                                                             const float *k, int64_t stride, const int hs,
                                                             float scale) {
    /* 16 features at a time: lanes 0-7 are head_dot's acc0, lanes 8-15 its acc1 */
    v16f acc16[2][8];
    for (int i = 0; i < nq; i++)
        for (int j = 0; j < 8; j++) acc16[i][j] = (v16f){0};
    int f = 0;
    if (nq == 1 && hs % 16 == 0 && hs / 16 <= 8) {
        /* one query (decoding): key after key, the query's vectors held in registers, so
         * one key pointer is live at a time (eight, one per key, made GCC shuffle offsets
         * between vector and integer registers: decode attention over 2000 positions was
         * ~35% slower); each key's products still add up feature step after feature step.
         * Two queries keep the loop below, which measured faster for them. */
        v16f q16[8];
        for (int v = 0; v < hs / 16; v++) LOAD16(q16[v], q[0] + 16 * v);
        for (int j = 0; j < 8; j++) {
            const float *kj = k + j * stride;
            for (int v = 0; v < hs / 16; v++) {
                v16f k16;
                LOAD16(k16, kj + 16 * v);
                acc16[0][j] += q16[v] * k16;
            }
        }
        f = hs;
    }
    for (; f + 16 <= hs; f += 16) {
        v16f q16[2];
        for (int i = 0; i < nq; i++) LOAD16(q16[i], q[i] + f);
        for (int j = 0; j < 8; j++) {
            v16f k16;
            LOAD16(k16, k + j * stride + f);
            if (nq > 1) KEEP16(k16); /* one load for the queries */
            for (int i = 0; i < nq; i++) acc16[i][j] += q16[i] * k16;
        }
    }
    v8f acc0[2][8], acc1[2][8];
    for (int i = 0; i < nq; i++)
        for (int j = 0; j < 8; j++) {
            acc0[i][j] = __builtin_shufflevector(acc16[i][j], acc16[i][j], 0, 1, 2, 3, 4, 5, 6, 7);
            acc1[i][j] = __builtin_shufflevector(acc16[i][j], acc16[i][j], 8, 9, 10, 11, 12, 13, 14, 15);
        }
    for (; f + 8 <= hs; f += 8) {
        v8f q0[2];
        for (int i = 0; i < nq; i++) LOAD8(q0[i], q[i] + f);
        for (int j = 0; j < 8; j++) {
            v8f k0;
            LOAD8(k0, k + j * stride + f);
            if (nq > 1) KEEP8(k0);
            for (int i = 0; i < nq; i++) acc0[i][j] += q0[i] * k0;
        }
    }
    for (int i = 0; i < nq; i++) {
#if LMD_VEC_BYTES >= 64
        /* the same sums two keys to a 16-lane register, halving the shuffles and adds:
         * A[p] = [a(2p) | a(2p+1)] with a(j) = acc0 + acc1 of key j; PAIR_SUMS16 of [a|b] and
         * [c|d] is [PAIR_SUMS(a, c) | PAIR_SUMS(b, d)], so after three rounds the low half
         * holds keys 0, 2, 4, 6 as quad0 above holds keys 0-3, the high half keys 1, 3, 5, 7 */
        v16f A[4];
        for (int p = 0; p < 4; p++)
            A[p] = __builtin_shufflevector(acc0[i][2 * p], acc0[i][2 * p + 1], 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
                                           13, 14, 15) +
                   __builtin_shufflevector(acc1[i][2 * p], acc1[i][2 * p + 1], 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
                                           13, 14, 15);
        const v16f quads = PAIR_SUMS16(PAIR_SUMS16(A[0], A[1]), PAIR_SUMS16(A[2], A[3]));
        /* lanes 0-3: (l0+l1)+(l2+l3) of keys 0, 2, 4, 6, lanes 4-7 their (l4+l5)+(l6+l7); 8-15 the odd keys */
        const v16f t = quads + __builtin_shufflevector(quads, quads, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
        v8f s = __builtin_shufflevector(t, t, 0, 8, 1, 9, 2, 10, 3, 11);
#else
        v8f a[8];
        for (int j = 0; j < 8; j++) a[j] = acc0[i][j] + acc1[i][j];
        /* lane j of quad0 is key j's (l0+l1)+(l2+l3) for j < 4, lane 4 + j its (l4+l5)+(l6+l7) */
        const v8f pair01 = PAIR_SUMS(a[0], a[1]), pair23 = PAIR_SUMS(a[2], a[3]);
        const v8f pair45 = PAIR_SUMS(a[4], a[5]), pair67 = PAIR_SUMS(a[6], a[7]);
        const v8f quad0 = PAIR_SUMS(pair01, pair23), quad1 = PAIR_SUMS(pair45, pair67);
        v8f s = __builtin_shufflevector(quad0, quad1, 0, 1, 2, 3, 8, 9, 10, 11) +
                __builtin_shufflevector(quad0, quad1, 4, 5, 6, 7, 12, 13, 14, 15);
#endif
        for (int g = f; g < hs; g++)
            for (int j = 0; j < 8; j++) s[j] += q[i][g] * k[j * stride + g];
        for (int j = 0; j < 8; j++) out[i][j] = s[j] * scale;
    }
}

// scores[i][t] = scale * q[i] (hs,) . k_t for nq queries (1 or 2) and the positions t in
// [t_begin, t_end) of the head's keys (features kv_offset..) in layer l of seq
static inline __attribute__((always_inline)) void head_scores(float *const *scores, const float *const *q,
                                                              const int nq, const lmd_kvseq *seq, int32_t l,
                                                              int kv_offset, int32_t t_begin, int32_t t_end,
                                                              int32_t block_size, int32_t kv_dim, const int hs,
                                                              float scale) {
    for (int32_t t0 = t_begin; t0 < t_end;) {
        /* positions of one cache block are consecutive rows of kv_dim floats */
        const float *k = lmd_kvseq_k(seq, l, t0) + kv_offset;
        const int32_t block_end = (t0 / block_size + 1) * block_size;
        const int32_t nt = (t_end < block_end ? t_end : block_end) - t0;
        int32_t t = 0;
        for (; t + 8 <= nt; t += 8) {
            float *out[2];
            for (int i = 0; i < nq; i++) out[i] = scores[i] + t0 + t;
            head_dots8(out, q, nq, k + (int64_t)t * kv_dim, kv_dim, hs, scale);
        }
        for (; t < nt; t++)
            for (int i = 0; i < nq; i++) scores[i][t0 + t] = head_dot(q[i], k + (int64_t)t * kv_dim, hs) * scale;
        t0 += nt;
    }
}

/* independent FMA chains the value sums keep going: an FMA's 4-cycle latency times the
 * two FMAs a core issues per cycle */
#define VALUE_CHAINS 8

// sets of accumulators that give a head of nv vectors VALUE_CHAINS chains (a power of two)
#define VALUE_SETS(nv) ((nv) >= 8 ? 1 : (nv) >= 4 ? 2 : (nv) >= 2 ? 4 : 8)

/* The value sums of a head: out (hs,) = sum over positions t < n_pos of p[t] * v_t (hs,),
 * v_t the head's values at position t of the cached sequence (blocks of block_size rows of
 * stride floats, the head's features at kv_offset), summed in registers. Position t goes to
 * accumulator set t % sets so that a small head still keeps VALUE_CHAINS FMAs in flight
 * (one chain per vector was latency-bound: a head of 8 features waited 4 cycles per
 * position); each set adds its positions in order, and the sets are added pairwise at the
 * end, set s with set s + sets/2, halving. The order depends on the head size only: not on
 * the block size, the batch or the thread, nor on whether two queries share the loads.
 *
 * VALUE_RANGE adds positions [t_begin, t_end) into the accumulators of queries q0 .. q0+nqr
 * (constants, so that the accumulators stay in registers). */
#define VALUE_RANGE(vec_t, LOAD, KEEP, lanes, q0, nqr, t_begin, t_end)                              \
    for (int32_t t0 = (t_begin); t0 < (t_end);) {                                                  \
        const float *v = lmd_kvseq_v(seq, l, t0) + kv_offset;                                      \
        const int32_t block_end = (t0 / block_size + 1) * block_size;                              \
        const int32_t nt = ((t_end) < block_end ? (t_end) : block_end) - t0;                       \
        int32_t t = 0;                                                                             \
        if (t0 % sets == 0) /* position t0 + t is in set t % sets */                               \
            for (; t + sets <= nt; t += sets)                                                      \
                for (int s = 0; s < sets; s++)                                                     \
                    for (int i = 0; i < nv; i++) {                                                 \
                        vec_t x;                                                                   \
                        LOAD(x, v + (int64_t)(t + s) * stride + (lanes) * i);                      \
                        if ((nqr) > 1) KEEP(x); /* one load for the queries */                     \
                        for (int qi = (q0); qi < (q0) + (nqr); qi++)                                \
                            acc[qi][s * nv + i] += p[qi][t0 + t + s] * x;                          \
                    }                                                                              \
        for (; t < nt; t++) /* the rest, or every position of oddly placed runs */                 \
            for (int s = 0; s < sets; s++)                                                         \
                if ((t0 + t) % sets == s)                                                          \
                    for (int i = 0; i < nv; i++) {                                                 \
                        vec_t x;                                                                   \
                        LOAD(x, v + (int64_t)t * stride + (lanes) * i);                            \
                        for (int qi = (q0); qi < (q0) + (nqr); qi++)                                \
                            acc[qi][s * nv + i] += p[qi][t0 + t] * x;                              \
                    }                                                                              \
        t0 += nt;                                                                                  \
    }

/* nq queries (1 or 2) of the same sequence: the positions all of them see are loaded once
 * for all, then each query's own last positions */
#define VALUE_SUMS(vec_t, LOAD, KEEP, lanes)                                                       \
    do {                                                                                           \
        const int nv = hs / (lanes), sets = VALUE_SETS(hs / (lanes));                              \
        vec_t acc[2][VALUE_CHAINS * 2];                                                            \
        for (int qi = 0; qi < nq; qi++)                                                            \
            for (int j = 0; j < sets * nv; j++) acc[qi][j] = (vec_t){0};                           \
        const int32_t shared = nq == 2 && n_pos[1] < n_pos[0] ? n_pos[1] : n_pos[0];               \
        VALUE_RANGE(vec_t, LOAD, KEEP, lanes, 0, nq, 0, shared)                                    \
        VALUE_RANGE(vec_t, LOAD, KEEP, lanes, 0, 1, shared, n_pos[0])                              \
        if (nq == 2) VALUE_RANGE(vec_t, LOAD, KEEP, lanes, 1, 1, shared, n_pos[1])                 \
        for (int qi = 0; qi < nq; qi++) {                                                          \
            for (int width = sets; width > 1; width /= 2)                                          \
                for (int s = 0; s < width / 2; s++)                                                \
                    for (int i = 0; i < nv; i++) acc[qi][s * nv + i] += acc[qi][(s + width / 2) * nv + i]; \
            for (int i = 0; i < nv; i++) memcpy(out[qi] + (lanes) * i, &acc[qi][i], sizeof acc[qi][i]); \
        }                                                                                          \
    } while (0)

// out[i] (hs,) = the value sums of nq queries (1 or 2) of seq with weights p[i] (n_pos[i],)
static inline __attribute__((always_inline)) void value_sums(float *const *out, const float *const *p,
                                                             const int32_t *n_pos, const int nq,
                                                             const lmd_kvseq *seq, int32_t l, int kv_offset,
                                                             int32_t block_size, int32_t stride, const int hs) {
    if (hs == 8 || hs == 16 || hs == 32 || hs == 64 || hs == 128) { /* unrolled register versions */
        if (hs % 16 == 0) VALUE_SUMS(v16f, LOAD16, KEEP16, 16);
        else VALUE_SUMS(v8f, LOAD8, KEEP8, 8);
        return;
    }
    /* other head sizes: the positions in order, one chain */
    for (int qi = 0; qi < nq; qi++) {
        memset(out[qi], 0, (size_t)hs * sizeof(float));
        for (int32_t t0 = 0; t0 < n_pos[qi]; t0 += block_size) {
            const float *v = lmd_kvseq_v(seq, l, t0) + kv_offset;
            const int32_t nt = n_pos[qi] - t0 < block_size ? n_pos[qi] - t0 : block_size;
            for (int32_t t = 0; t < nt; t++) lmd_axpy(out[qi], p[qi][t0 + t], v + (int64_t)t * stride, hs);
        }
    }
}

/* Below this many multiply-adds the attention of a chunk runs on one thread. */
#define ATTENTION_PARALLEL_MIN_WORK 100000

// query head h of nq (1 or 2) consecutive tokens b.. of the chunk, all of one sequence, q
// (B,Q) at positions pos[b..] -> att_out (B,Q), the head's hs features. Two queries share
// every key and value load of the positions both see (a prefill's neighbouring tokens see
// all but one of the same positions), which halves the cache traffic; each query's
// arithmetic is exactly what it is alone.
static inline __attribute__((always_inline)) void attend_queries(lmd_model *m, const lmd_kvseq *seq, int b,
                                                                 const int nq, int32_t l, int h, const int hs) {
    const lmd_config *c = &m->config;
    const int group = c->n_heads / c->n_kv_heads;
    const int64_t Q = (int64_t)c->n_heads * hs;
    const float scale = 1.0f / sqrtf((float)hs);
    const int32_t block_size = seq->pool->block_size, kv_dim = seq->pool->kv_dim;
    const int kv_offset = (h / group) * hs;
    const float *q[2];
    float *scores[2], *out[2];
    int32_t n_pos[2];
    for (int i = 0; i < nq; i++) {
        q[i] = m->q + (int64_t)(b + i) * Q + (int64_t)h * hs;
        scores[i] = m->scores + ((size_t)h * 2 + i) * c->context_length;
        out[i] = m->att_out + (int64_t)(b + i) * Q + (int64_t)h * hs;
        n_pos[i] = m->pos[b + i] + 1;
    }
    const int32_t shared = nq == 2 && n_pos[1] < n_pos[0] ? n_pos[1] : n_pos[0];
    head_scores(scores, q, nq, seq, l, kv_offset, 0, shared, block_size, kv_dim, hs, scale);
    head_scores(scores, q, 1, seq, l, kv_offset, shared, n_pos[0], block_size, kv_dim, hs, scale);
    if (nq == 2) head_scores(scores + 1, q + 1, 1, seq, l, kv_offset, shared, n_pos[1], block_size, kv_dim, hs, scale);
    for (int i = 0; i < nq; i++) lmd_softmax(scores[i], n_pos[i]);
    value_sums(out, (const float *const *)scores, n_pos, nq, seq, l, kv_offset, block_size, kv_dim, hs);
}

// query head h of the chunk's tokens against the keys/values of layer l in the cache,
// neighbouring tokens of one sequence two at a time. Inlined per usual head size (see
// attend_head) so the per-key loops have constant trip counts.
static inline __attribute__((always_inline)) void attend_head_sized(lmd_model *m, lmd_kvseq *const *seqs,
                                                                    const int32_t *token_seq, int B, int32_t l,
                                                                    int h, const int hs) {
    for (int b = 0; b < B;) {
        const lmd_kvseq *seq = seqs[token_seq[b]];
        if (b + 1 < B && token_seq[b + 1] == token_seq[b]) {
            attend_queries(m, seq, b, 2, l, h, hs);
            b += 2;
        } else {
            attend_queries(m, seq, b, 1, l, h, hs);
            b += 1;
        }
    }
}

static void attend_head(lmd_model *m, lmd_kvseq *const *seqs, const int32_t *token_seq, int B, int32_t l, int h) {
    switch (m->config.head_dim) {
    case 8: attend_head_sized(m, seqs, token_seq, B, l, h, 8); break;
    case 16: attend_head_sized(m, seqs, token_seq, B, l, h, 16); break;
    case 32: attend_head_sized(m, seqs, token_seq, B, l, h, 32); break;
    case 64: attend_head_sized(m, seqs, token_seq, B, l, h, 64); break;
    case 128: attend_head_sized(m, seqs, token_seq, B, l, h, 128); break;
    default: attend_head_sized(m, seqs, token_seq, B, l, h, m->config.head_dim);
    }
}

// every query head; heads are independent, so they split across threads
static void attention(lmd_model *m, lmd_kvseq *const *seqs, const int32_t *token_seq, int B, int32_t l) {
    const lmd_config *c = &m->config;
#ifdef _OPENMP
    int64_t work = 0;
    for (int b = 0; b < B; b++) work += (int64_t)(m->pos[b] + 1) * c->head_dim * c->n_heads;
    if (work >= ATTENTION_PARALLEL_MIN_WORK && lmd_get_num_threads() > 1) {
#pragma omp parallel for schedule(static) num_threads(lmd_get_num_threads())
        for (int h = 0; h < c->n_heads; h++) attend_head(m, seqs, token_seq, B, l, h);
        return;
    }
#endif
    for (int h = 0; h < c->n_heads; h++) attend_head(m, seqs, token_seq, B, l, h);
}

// tokens of one chunk -> residual stream x (B,D) after every layer; K/V written to the cache
static void run_layers(lmd_model *m, lmd_kvseq *const *seqs, const int32_t *tokens,
                       const int32_t *token_seq, int B) {
    const lmd_config *c = &m->config;
    const lmd_weights *w = &m->weights;
    const int64_t D = c->dim, Q = (int64_t)c->n_heads * c->head_dim,
                  K = (int64_t)c->n_kv_heads * c->head_dim, H = c->hidden_dim;
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
    for (int32_t l = 0; l < c->n_layers; l++) {
        const lmd_layer_weights *lw = &w->layers[l];
        // attention sublayer: x += wo @ attention(norm(x))
        norm(m, m->xb, m->x, lw->attn_norm, lw->attn_norm_bias, B);
        matmul(m, m->q, m->xb, &lw->wq, B);
        matmul_same_x(m, m->k, m->xb, &lw->wk, B, &lw->wq);
        matmul_same_x(m, m->v, m->xb, &lw->wv, B, &lw->wk);
        add_bias(m->q, lw->bq, B, Q);
        add_bias(m->k, lw->bk, B, K);
        add_bias(m->v, lw->bv, B, K);
        for (int b = 0; b < B; b++) {
            if (!gpt2) {
                const float *cos_t = m->rope_cos + (int64_t)b * half, *sin_t = m->rope_sin + (int64_t)b * half;
                lmd_rope_rotate(m->q + b * Q, c->n_heads, c->head_dim, cos_t, sin_t, c->rope_layout);
                lmd_rope_rotate(m->k + b * K, c->n_kv_heads, c->head_dim, cos_t, sin_t, c->rope_layout);
            }
            const lmd_kvseq *seq = seqs[token_seq[b]];
            memcpy(lmd_kvseq_k(seq, l, m->pos[b]), m->k + b * K, (size_t)K * sizeof(float));
            memcpy(lmd_kvseq_v(seq, l, m->pos[b]), m->v + b * K, (size_t)K * sizeof(float));
        }
        attention(m, seqs, token_seq, B, l);
        matmul(m, m->xb2, m->att_out, &lw->wo, B);
        add_bias(m->xb2, lw->bo, B, D);
        add_residual(m->x, m->xb2, B * D);

        // feed-forward sublayer: x += down(act(up(norm(x))))
        norm(m, m->xb, m->x, lw->ffn_norm, lw->ffn_norm_bias, B);
        matmul(m, m->hb2, m->xb, &lw->w_up, B);
        add_bias(m->hb2, lw->b_up, B, H);
        if (gpt2) {
            lmd_gelu_tanh(m->hb2, B * H);
            matmul(m, m->xb2, m->hb2, &lw->w_down, B);
        } else {
            matmul_same_x(m, m->hb, m->xb, &lw->w_gate, B, &lw->w_up);
            lmd_swiglu(m->hb, m->hb2, B * H);
            matmul(m, m->xb2, m->hb, &lw->w_down, B);
        }
        add_bias(m->xb2, lw->b_down, B, D);
        add_residual(m->x, m->xb2, B * D);
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
    if (pool->n_layers != c->n_layers || pool->kv_dim != c->n_kv_heads * c->head_dim)
        return lmd_fail(err, LMD_ERR_INVALID_ARG,
                        "the cache pool holds %d layers of %d features but the model has %d of %d",
                        pool->n_layers, pool->kv_dim, c->n_layers, c->n_kv_heads * c->head_dim);
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
