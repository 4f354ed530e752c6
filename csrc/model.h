/*
 * model.h -- decoder-only transformers: config, weights, forward pass.
 *
 * Two families share one forward pass:
 *   LMD_ARCH_LLAMA  RMSNorm, rotary embeddings (either pair layout, any base), SwiGLU,
 *                   grouped/multi-query attention, optional q/k/v biases (Qwen2),
 *                   tied or untied output head
 *   LMD_ARCH_GPT2   LayerNorm with bias, learned positions, GELU (tanh), biases everywhere
 *
 * Weight matrices are copied, the rest borrowed: lmd_model_init copies every
 * matrix into one block it owns (f32, bf16 and f16 repacked into panels, ops.h:
 * LMD_F32_PANELS and its kin; quantized types as they are), and the caller may drop
 * those sources once init returns (a tied token embedding then reads the head's
 * copy). The other tensors (embeddings, norms, biases) are borrowed: the caller keeps
 * them alive (an mmap or arrays) until lmd_model_free. Scratch memory for max_batch tokens is
 * allocated once at init; longer batches are processed in chunks. The one exception is
 * attention's scores, which grow with the positions a call attends to (up to the context
 * length): a forward call that needs more than any before replaces that buffer, before it
 * touches any sequence (it may then fail with LMD_ERR_NOMEM, the caches unchanged).
 *
 * One lmd_model_forward call takes a batch of tokens belonging to one or more
 * sequences (each an lmd_kvseq of one pool) and appends them after what each
 * sequence already holds: a prompt prefill is n tokens of one sequence, a
 * batched decode step one token of each of several sequences, a speculative
 * verification the k draft tokens of one sequence. Each weight matrix is read
 * once per chunk. The logits of the requested tokens are written out.
 *
 *     lmd_model *m; lmd_error err;
 *     lmd_model_init(&m, &config, &weights, 256, &err);
 *     int32_t tokens[3] = {1, 403, 407}, which[3] = {0, 0, 0}, last = 2;
 *     lmd_model_forward(m, &seq, 1, tokens, which, 3, &last, 1, logits, &err);  // logits (1, vocab)
 *     lmd_model_free(m);
 *
 * A model is scratch for one call at a time (the binding holds a lock).
 */
#ifndef LMD_MODEL_H
#define LMD_MODEL_H

#include "kvcache.h"
#include "lmdecode.h"
#include "ops.h"

#include <stdint.h>

typedef enum { LMD_ARCH_LLAMA = 0, LMD_ARCH_GPT2 = 1 } lmd_arch;

/* Hyperparameters only. */
typedef struct {
    lmd_arch arch;
    int32_t vocab_size;
    int32_t dim;            /* residual stream width */
    int32_t hidden_dim;     /* feed-forward width */
    int32_t n_layers;
    int32_t n_heads;        /* query heads */
    int32_t n_kv_heads;     /* key/value heads; n_heads is a multiple of it */
    int32_t head_dim;       /* features per head (usually dim / n_heads) */
    int32_t context_length; /* positions a sequence may hold */
    float norm_eps;
    float rope_theta;            /* llama: RoPE base */
    lmd_rope_layout rope_layout; /* llama: which features RoPE pairs */
} lmd_config;

/* Per-layer weights. q_dim = n_heads * head_dim, kv_dim = n_kv_heads * head_dim. */
typedef struct {
    const float *attn_norm;      /* (dim,) */
    const float *attn_norm_bias; /* (dim,) gpt2 */
    lmd_matrix wq;               /* (q_dim, dim) */
    lmd_matrix wk;               /* (kv_dim, dim) */
    lmd_matrix wv;               /* (kv_dim, dim) */
    lmd_matrix wo;               /* (dim, q_dim) */
    const float *bq;             /* (q_dim,) optional */
    const float *bk;             /* (kv_dim,) optional */
    const float *bv;             /* (kv_dim,) optional */
    const float *bo;             /* (dim,) optional */
    const float *ffn_norm;       /* (dim,) */
    const float *ffn_norm_bias;  /* (dim,) gpt2 */
    lmd_matrix w_gate;           /* (hidden_dim, dim) llama */
    lmd_matrix w_up;             /* (hidden_dim, dim) */
    lmd_matrix w_down;           /* (dim, hidden_dim) */
    const float *b_up;           /* (hidden_dim,) optional */
    const float *b_down;         /* (dim,) optional */
} lmd_layer_weights;

/* A layer's weight matrices, listed once: index i in [0, LMD_LAYER_MATRICES) names
 * lmd_layer_matrix_names[i] (the binding's tensor "layers.<l>.<name>"). The gate comes last
 * so that a GPT-2 layer's matrices are the first lmd_layer_matrix_count(config) = 6; a
 * Llama layer has all 7. */
#define LMD_LAYER_MATRICES 7
extern const char *const lmd_layer_matrix_names[LMD_LAYER_MATRICES];
lmd_matrix *lmd_layer_matrix(lmd_layer_weights *lw, int i);
int lmd_layer_matrix_count(const lmd_config *config);

typedef struct {
    lmd_matrix token_embedding;      /* (vocab_size, dim) */
    const float *position_embedding; /* (context_length, dim) gpt2 */
    lmd_layer_weights *layers;       /* (n_layers,) */
    const float *final_norm;         /* (dim,) */
    const float *final_norm_bias;    /* (dim,) gpt2 */
    lmd_matrix output;               /* (vocab_size, dim); may be the token embedding */
    /* (head_dim / 2,) llama, optional: rotary frequency i is base^(-2i/head_dim) divided by
     * factor i (Llama 3's long-context RoPE scaling, linear scaling; GGUF's rope_freqs) */
    const float *rope_freq_factors;
} lmd_weights;

typedef struct lmd_model {
    lmd_config config;
    lmd_weights weights; /* .layers points at layer_storage */
    lmd_layer_weights *layer_storage;
    int32_t max_batch;
    /* run state, B = max_batch */
    float *x;        /* (B, dim) residual stream */
    float *xb;       /* (B, dim) normalised input of a sublayer */
    float *xb2;      /* (B, dim) sublayer output */
    float *q;        /* (B, q_dim) */
    float *k;        /* (B, kv_dim) */
    float *v;        /* (B, kv_dim) */
    float *att_out;  /* (B, q_dim) */
    float *hb;       /* (B, hidden_dim) */
    float *hb2;      /* (B, hidden_dim) */
    float *scores;   /* (scores_units, scores_rows, scores_stride): each attention work unit's weights */
    int scores_units; /* the most work units attention cuts a chunk into */
    int scores_rows; /* 6 queries, or a query tile's vector lanes for heads of 8 or 16 features */
    int64_t scores_stride; /* positions the buffer holds + vector lanes; grown as calls need
                              more positions, up to the context length (model.c ensure_scores) */
    float *inv_freq; /* (head_dim / 2,) RoPE frequencies */
    float q_scale;   /* log2(e) / sqrt(head_dim): attention's scale and base-2 softmax, on the queries */
    float *rope_cos; /* (B, head_dim / 2) cos of each token's rotary angles */
    float *rope_sin; /* (B, head_dim / 2) their sin */
    int32_t *pos;    /* (B,) position of each token of the chunk */
    void *matmul_scratch; /* a matmul's inputs quantized (q8_0) or rounded (bf16); NULL if none needs it */
    void *matrix_copies;  /* one block (lmd_alloc_weights) holding the model's own copy of every weight
                             matrix: f32, bf16 and f16 in panels, quantized types as given */
    size_t matrix_copy_bytes; /* the block's bytes */
    size_t panel_bytes;   /* the bytes of the f32, bf16 and f16 matrices' panels among them */
} lmd_model;

/* Validates shapes against the config (messages name the tensor) and allocates the run state. */
lmd_status lmd_model_init(lmd_model **out, const lmd_config *config, const lmd_weights *weights,
                          int32_t max_batch, lmd_error *err);
/* Safe on NULL and on a half-built model. */
void lmd_model_free(lmd_model *model);

/*
 * tokens (n_tokens,) in [0, vocab); token_seq (n_tokens,) in [0, n_seqs) names each token's
 * sequence in seqs (n_seqs distinct sequences of one pool). A sequence's tokens are appended
 * in the order they appear. logit_index (n_logits,) in [0, n_tokens) picks the tokens whose
 * logits go to logits (n_logits, vocab). On failure (bad argument, context length or pool
 * exceeded) no sequence changes.
 */
lmd_status lmd_model_forward(lmd_model *model, lmd_kvseq *const *seqs, int32_t n_seqs,
                             const int32_t *tokens, const int32_t *token_seq, int32_t n_tokens,
                             const int32_t *logit_index, int32_t n_logits, float *logits,
                             lmd_error *err);

#endif /* LMD_MODEL_H */
