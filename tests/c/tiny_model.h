/* tiny_model.h -- small random Llama and GPT-2 models built in C for the tests.
 *
 *     tiny_spec spec = tiny_llama_spec();   // dim 32, 2 layers, 4 heads, 2 kv heads, ...
 *     tiny_model t;
 *     tiny_build(&t, &spec);                // random weights, owned by t
 *     lmd_model *m = tiny_init(&t, 16);     // max_batch 16; exits on failure
 *     ...
 *     lmd_model_free(m);
 *     tiny_free(&t);
 *
 * Weights are uniform with variance 1/fan_in so that activations stay of order 1;
 * norm weights are near 1, biases small. Matrices are stored in spec.dtype. */
#ifndef LMD_TINY_MODEL_H
#define LMD_TINY_MODEL_H

#include <stdio.h>
#include <stdlib.h>

#include "model.h"
#include "test_rand.h"

#define TINY_MAX_LAYERS 4
#define TINY_MAX_ALLOCS 256

typedef struct {
    lmd_arch arch;
    lmd_dtype dtype; /* storage of every matrix */
    int32_t vocab, dim, hidden, n_layers, n_heads, n_kv_heads, context;
    lmd_rope_layout layout;
    int qkv_bias; /* llama: q/k/v biases (Qwen2) */
    int tied;     /* output head shares the token embedding */
    uint64_t seed;
} tiny_spec;

typedef struct {
    tiny_spec spec;
    lmd_config config;
    lmd_weights weights;
    lmd_layer_weights layers[TINY_MAX_LAYERS];
    void *allocs[TINY_MAX_ALLOCS];
    int n_allocs;
    test_rng rng;
} tiny_model;

static inline tiny_spec tiny_llama_spec(void) {
    tiny_spec s = {LMD_ARCH_LLAMA, LMD_F32, 40, 32, 48, 2, 4, 2, 24, LMD_ROPE_ADJACENT, 0, 0, 1};
    return s;
}

static inline tiny_spec tiny_gpt2_spec(void) {
    tiny_spec s = {LMD_ARCH_GPT2, LMD_F32, 40, 32, 48, 2, 4, 4, 24, LMD_ROPE_ADJACENT, 0, 0, 2};
    return s;
}

static inline void *tiny_alloc(tiny_model *t, size_t bytes) {
    if (t->n_allocs == TINY_MAX_ALLOCS) {
        fprintf(stderr, "tiny_model: too many tensors\n");
        exit(1);
    }
    void *p = malloc(bytes > 0 ? bytes : 1);
    if (p == NULL) exit(1);
    t->allocs[t->n_allocs++] = p;
    return p;
}

/* (n,) floats uniform in [center - spread, center + spread) */
static inline const float *tiny_vector(tiny_model *t, int64_t n, float center, float spread) {
    float *v = tiny_alloc(t, (size_t)n * sizeof(float));
    test_fill(&t->rng, v, n, center - spread, center + spread);
    return v;
}

/* (rows, cols) in the spec's storage type, values of variance 1/cols times gain^2 */
static inline lmd_matrix tiny_matrix(tiny_model *t, int64_t rows, int64_t cols, float gain) {
    const float a = gain * sqrtf(3.0f / (float)cols);
    float *f = malloc((size_t)(rows * cols) * sizeof(float));
    if (f == NULL) exit(1);
    test_fill(&t->rng, f, rows * cols, -a, a);
    const lmd_dtype dtype = t->spec.dtype;
    void *data = tiny_alloc(t, (size_t)rows * lmd_row_bytes(dtype, cols));
    if (dtype == LMD_F32) {
        memcpy(data, f, (size_t)(rows * cols) * sizeof(float));
    } else if (dtype == LMD_BF16) {
        uint16_t *b = data;
        for (int64_t i = 0; i < rows * cols; i++) b[i] = lmd_f32_to_bf16(f[i]);
    } else {
        if (lmd_quantize_matrix_q8_0(data, f, rows, cols, NULL) != LMD_OK) abort(); /* finite, small weights */
    }
    free(f);
    lmd_matrix m = {data, dtype, rows, cols};
    return m;
}

static inline void tiny_build(tiny_model *t, const tiny_spec *spec) {
    memset(t, 0, sizeof *t);
    t->spec = *spec;
    t->rng.state = spec->seed;
    const int gpt2 = spec->arch == LMD_ARCH_GPT2;
    const int32_t hd = spec->dim / spec->n_heads, D = spec->dim, H = spec->hidden;
    const int32_t Q = spec->n_heads * hd, K = spec->n_kv_heads * hd;
    lmd_config c = {.arch = spec->arch, .vocab_size = spec->vocab, .dim = D, .hidden_dim = H,
                    .n_layers = spec->n_layers, .n_heads = spec->n_heads,
                    .n_kv_heads = spec->n_kv_heads, .head_dim = hd,
                    .context_length = spec->context, .norm_eps = 1e-5f, .rope_theta = 10000.0f,
                    .rope_layout = spec->layout};
    t->config = c;
    if (spec->n_layers > TINY_MAX_LAYERS) exit(1);
    lmd_weights *w = &t->weights;
    /* the embedding doubles as the output head when tied: keep its rows of order 1 */
    w->token_embedding = tiny_matrix(t, spec->vocab, D, spec->tied ? sqrtf((float)D) : 1.0f);
    if (gpt2) w->position_embedding = tiny_vector(t, (int64_t)spec->context * D, 0.0f, 0.5f);
    for (int32_t l = 0; l < spec->n_layers; l++) {
        lmd_layer_weights *lw = &t->layers[l];
        lw->attn_norm = tiny_vector(t, D, 1.0f, 0.2f);
        lw->ffn_norm = tiny_vector(t, D, 1.0f, 0.2f);
        lw->wq = tiny_matrix(t, Q, D, 1.0f);
        lw->wk = tiny_matrix(t, K, D, 1.0f);
        lw->wv = tiny_matrix(t, K, D, 1.0f);
        lw->wo = tiny_matrix(t, D, Q, 1.0f);
        lw->w_up = tiny_matrix(t, H, D, 1.0f);
        lw->w_down = tiny_matrix(t, D, H, 1.0f);
        if (gpt2) {
            lw->attn_norm_bias = tiny_vector(t, D, 0.0f, 0.2f);
            lw->ffn_norm_bias = tiny_vector(t, D, 0.0f, 0.2f);
            lw->bo = tiny_vector(t, D, 0.0f, 0.2f);
            lw->b_up = tiny_vector(t, H, 0.0f, 0.2f);
            lw->b_down = tiny_vector(t, D, 0.0f, 0.2f);
        } else {
            lw->w_gate = tiny_matrix(t, H, D, 1.0f);
        }
        if (gpt2 || spec->qkv_bias) {
            lw->bq = tiny_vector(t, Q, 0.0f, 0.2f);
            lw->bk = tiny_vector(t, K, 0.0f, 0.2f);
            lw->bv = tiny_vector(t, K, 0.0f, 0.2f);
        }
    }
    w->layers = t->layers;
    w->final_norm = tiny_vector(t, D, 1.0f, 0.2f);
    if (gpt2) w->final_norm_bias = tiny_vector(t, D, 0.0f, 0.2f);
    w->output = spec->tied ? w->token_embedding : tiny_matrix(t, spec->vocab, D, 2.0f);
}

static inline void tiny_free(tiny_model *t) {
    for (int i = 0; i < t->n_allocs; i++) free(t->allocs[i]);
    t->n_allocs = 0;
}

static inline lmd_model *tiny_init(tiny_model *t, int32_t max_batch) {
    lmd_model *m;
    lmd_error err;
    if (lmd_model_init(&m, &t->config, &t->weights, max_batch, &err) != LMD_OK) {
        fprintf(stderr, "tiny model init failed: %s\n", err.msg);
        exit(1);
    }
    return m;
}

/* The usual start of a test: the tiny model of spec built, and an engine for max_batch tokens. */
static inline lmd_model *tiny_open(tiny_model *t, const tiny_spec *spec, int32_t max_batch) {
    tiny_build(t, spec);
    return tiny_init(t, max_batch);
}

/* ...and its end: the engine and the model's arrays freed. */
static inline void tiny_close(tiny_model *t, lmd_model *m) {
    lmd_model_free(m);
    tiny_free(t);
}

/* A pool shaped for the model: block_size positions per block, n_blocks blocks. */
static inline lmd_kvpool *tiny_pool(const tiny_model *t, int32_t block_size, int32_t n_blocks) {
    lmd_kvpool *p;
    lmd_error err;
    if (lmd_kvpool_init(&p, t->config.n_layers, t->config.n_kv_heads * t->config.head_dim, t->config.head_dim,
                        block_size, n_blocks, LMD_KV_F32, &err) != LMD_OK) {
        fprintf(stderr, "tiny pool init failed: %s\n", err.msg);
        exit(1);
    }
    return p;
}

static inline lmd_kvseq *tiny_seq(lmd_kvpool *pool, int32_t max_len) {
    lmd_kvseq *s;
    lmd_error err;
    if (lmd_kvseq_init(&s, pool, max_len, &err) != LMD_OK) exit(1);
    return s;
}

/* Appends n tokens to one sequence; logits (n, vocab) of every token, or NULL. */
static inline lmd_status tiny_run(lmd_model *m, lmd_kvseq *s, const int32_t *tokens, int32_t n,
                                  float *logits, lmd_error *err) {
    int32_t *zeros = calloc((size_t)n, sizeof(int32_t)), *index = malloc((size_t)n * sizeof(int32_t));
    if (zeros == NULL || index == NULL) exit(1);
    for (int32_t i = 0; i < n; i++) index[i] = i;
    lmd_status st = lmd_model_forward(m, &s, 1, tokens, zeros, n, index, logits ? n : 0, logits, err);
    free(zeros);
    free(index);
    return st;
}

#endif
