/* test_model.c -- the forward pass on tiny random Llama and GPT-2 models:
 * against a double-precision forward written here from the definitions, and
 * the cache properties the decoding loops rely on, all bit for bit:
 * incremental decoding equals one prefill, a batch of sequences equals each
 * alone, truncate-and-redecode equals never having decoded, chunking by
 * max_batch changes nothing. Failing calls leave every sequence as it was. */
#include <stdint.h>

#include "model.h"
#include "test_util.h"
#include "tiny_model.h"

/* Model variants: both rope layouts, q/k/v biases, a tied head, every storage type. */
static tiny_spec variant(int i) {
    tiny_spec s = i < 3 ? tiny_llama_spec() : tiny_gpt2_spec();
    switch (i) {
    case 0: break; /* llama f32, adjacent pairs, untied */
    case 1: s.dtype = LMD_BF16, s.layout = LMD_ROPE_HALF, s.qkv_bias = 1, s.tied = 1, s.seed = 3; break;
    case 2: s.dtype = LMD_Q8_0, s.hidden = 64, s.seed = 4; break; /* q8_0 needs cols % 32 == 0 */
    case 3: break; /* gpt2 f32 */
    case 4: s.dtype = LMD_BF16, s.tied = 1, s.seed = 5; break;
    }
    return s;
}
#define N_VARIANTS 5

static const char *variant_name(int i) {
    static const char *names[N_VARIANTS] = {"llama f32", "llama bf16 half-rope qkv-bias tied",
                                            "llama q8_0", "gpt2 f32", "gpt2 bf16 tied"};
    return names[i];
}

static void random_tokens(test_rng *r, int32_t *tokens, int n, int32_t vocab) {
    for (int i = 0; i < n; i++) tokens[i] = test_rand_below(r, vocab);
}

/* ------------------------------------------------------------------ */
/* reference forward in double precision                                */
/* ------------------------------------------------------------------ */

// x (n,) -> out (n,) as a q8_0 matmul sees it: in blocks of 32, scale amax/127 (float) times
// round(x / scale) to nearest even (ops.h, lmd_dot_q8_0)
static void ref_q8_0_inputs(double *out, const double *x, int64_t n) {
    for (int64_t b = 0; b < n; b += 32) {
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf((float)x[b + j]));
        const float scale = amax / 127.0f, inv = scale > 0.0f ? 1.0f / scale : 0.0f;
        for (int j = 0; j < 32; j++) out[b + j] = (double)scale * nearbyintf((float)x[b + j] * inv);
    }
}

// W (rows, cols) @ x (cols,) -> out (rows,), weights read through lmd_matrix_row
static void ref_matvec(double *out, const lmd_matrix *w, const double *x, const float *bias) {
    float *row = malloc((size_t)w->cols * sizeof(float));
    double *xs = malloc((size_t)w->cols * sizeof(double));
    if (w->dtype == LMD_Q8_0) ref_q8_0_inputs(xs, x, w->cols);
    else memcpy(xs, x, (size_t)w->cols * sizeof(double));
    for (int64_t i = 0; i < w->rows; i++) {
        lmd_matrix_row(row, w, i);
        double s = bias ? bias[i] : 0.0;
        for (int64_t k = 0; k < w->cols; k++) s += (double)row[k] * xs[k];
        out[i] = s;
    }
    free(row), free(xs);
}

static void ref_norm(const lmd_config *c, double *out, const double *x, const float *w, const float *b) {
    const int n = c->dim;
    if (c->arch == LMD_ARCH_GPT2) {
        double mean = 0.0, var = 0.0;
        for (int k = 0; k < n; k++) mean += x[k];
        mean /= n;
        for (int k = 0; k < n; k++) var += (x[k] - mean) * (x[k] - mean);
        var /= n;
        for (int k = 0; k < n; k++) out[k] = (x[k] - mean) / sqrt(var + c->norm_eps) * w[k] + b[k];
    } else {
        double ss = 0.0;
        for (int k = 0; k < n; k++) ss += x[k] * x[k];
        for (int k = 0; k < n; k++) out[k] = x[k] / sqrt(ss / n + c->norm_eps) * w[k];
    }
}

static void ref_rope(double *x, int n_heads, int hs, int pos, double theta, lmd_rope_layout layout) {
    for (int h = 0; h < n_heads; h++)
        for (int i = 0; i < hs / 2; i++) {
            double angle = pos * pow(theta, -2.0 * i / hs);
            int a = layout == LMD_ROPE_ADJACENT ? 2 * i : i;
            int b = layout == LMD_ROPE_ADJACENT ? 2 * i + 1 : i + hs / 2;
            double x0 = x[h * hs + a], x1 = x[h * hs + b];
            x[h * hs + a] = x0 * cos(angle) - x1 * sin(angle);
            x[h * hs + b] = x0 * sin(angle) + x1 * cos(angle);
        }
}

// tokens (T,) of one sequence from position 0 -> logits (T, V), no cache, all in double
static void reference_forward(const tiny_model *t, const int32_t *tokens, int T, double *logits) {
    const lmd_config *c = &t->config;
    const lmd_weights *w = &t->weights;
    const int D = c->dim, hs = c->head_dim, Q = c->n_heads * hs, K = c->n_kv_heads * hs;
    const int H = c->hidden_dim, V = c->vocab_size, group = c->n_heads / c->n_kv_heads;
    const int gpt2 = c->arch == LMD_ARCH_GPT2;
    double *x = malloc((size_t)T * D * sizeof(double)), *xb = malloc((size_t)D * sizeof(double));
    double *q = malloc((size_t)T * Q * sizeof(double)), *k = malloc((size_t)T * K * sizeof(double));
    double *v = malloc((size_t)T * K * sizeof(double)), *att = malloc((size_t)Q * sizeof(double));
    double *delta = malloc((size_t)D * sizeof(double)), *scores = malloc((size_t)T * sizeof(double));
    double *up = malloc((size_t)H * sizeof(double)), *gate = malloc((size_t)H * sizeof(double));
    float *row = malloc((size_t)D * sizeof(float));
    for (int p = 0; p < T; p++) {
        lmd_matrix_row(row, &w->token_embedding, tokens[p]);
        for (int j = 0; j < D; j++) x[p * D + j] = row[j] + (gpt2 ? w->position_embedding[p * D + j] : 0.0);
    }
    for (int l = 0; l < c->n_layers; l++) {
        const lmd_layer_weights *lw = &w->layers[l];
        for (int p = 0; p < T; p++) {
            ref_norm(c, xb, x + p * D, lw->attn_norm, lw->attn_norm_bias);
            ref_matvec(q + p * Q, &lw->wq, xb, lw->bq);
            ref_matvec(k + p * K, &lw->wk, xb, lw->bk);
            ref_matvec(v + p * K, &lw->wv, xb, lw->bv);
            if (!gpt2) {
                ref_rope(q + p * Q, c->n_heads, hs, p, c->rope_theta, c->rope_layout);
                ref_rope(k + p * K, c->n_kv_heads, hs, p, c->rope_theta, c->rope_layout);
            }
        }
        /* causal attention, then both sublayers, token by token (x[p] only needs k, v <= p) */
        for (int p = 0; p < T; p++) {
            for (int h = 0; h < c->n_heads; h++) {
                const int kv = (h / group) * hs;
                double max = -INFINITY, sum = 0.0;
                for (int s = 0; s <= p; s++) {
                    double dot = 0.0;
                    for (int j = 0; j < hs; j++) dot += q[p * Q + h * hs + j] * k[s * K + kv + j];
                    scores[s] = dot / sqrt((double)hs);
                    max = scores[s] > max ? scores[s] : max;
                }
                for (int s = 0; s <= p; s++) sum += scores[s] = exp(scores[s] - max);
                for (int j = 0; j < hs; j++) {
                    double o = 0.0;
                    for (int s = 0; s <= p; s++) o += scores[s] / sum * v[s * K + kv + j];
                    att[h * hs + j] = o;
                }
            }
            ref_matvec(delta, &lw->wo, att, lw->bo);
            for (int j = 0; j < D; j++) x[p * D + j] += delta[j];
            ref_norm(c, xb, x + p * D, lw->ffn_norm, lw->ffn_norm_bias);
            ref_matvec(up, &lw->w_up, xb, lw->b_up);
            if (gpt2) {
                for (int j = 0; j < H; j++) {
                    double u = up[j];
                    up[j] = 0.5 * u * (1.0 + tanh(sqrt(2.0 / 3.14159265358979323846) * (u + 0.044715 * u * u * u)));
                }
            } else {
                ref_matvec(gate, &lw->w_gate, xb, NULL);
                for (int j = 0; j < H; j++) up[j] *= gate[j] / (1.0 + exp(-gate[j]));
            }
            ref_matvec(delta, &lw->w_down, up, lw->b_down);
            for (int j = 0; j < D; j++) x[p * D + j] += delta[j];
        }
    }
    for (int p = 0; p < T; p++) {
        ref_norm(c, xb, x + p * D, w->final_norm, w->final_norm_bias);
        ref_matvec(logits + (int64_t)p * V, &w->output, xb, NULL);
    }
    free(x), free(xb), free(q), free(k), free(v), free(att), free(delta), free(scores);
    free(up), free(gate), free(row);
}

/* ------------------------------------------------------------------ */
/* against the reference; incremental == prefill                        */
/* ------------------------------------------------------------------ */

static int same_floats(const float *a, const float *b, int64_t n) {
    return memcmp(a, b, (size_t)n * sizeof(float)) == 0;
}

static void test_forward_against_reference_and_incremental(void) {
    enum { T = 20 };
    test_rng r = {101};
    for (int vi = 0; vi < N_VARIANTS; vi++) {
        tiny_spec spec = variant(vi);
        tiny_model t;
        lmd_model *m = tiny_open(&t, &spec, 32);
        const int V = t.config.vocab_size;
        lmd_kvpool *pool = tiny_pool(&t, 4, 32);
        int32_t tokens[T];
        random_tokens(&r, tokens, T, V);
        float *full = malloc((size_t)T * V * sizeof(float)), *inc = malloc((size_t)T * V * sizeof(float));
        float *mixed = malloc((size_t)T * V * sizeof(float));
        double *ref = malloc((size_t)T * V * sizeof(double));
        lmd_error err;

        /* one prefill of the whole sequence */
        lmd_kvseq *s = tiny_seq(pool, t.config.context_length);
        CHECK(tiny_run(m, s, tokens, T, full, &err) == LMD_OK);
        CHECK(s->len == T);
        lmd_kvseq_free(s);

        /* against the double-precision forward */
        reference_forward(&t, tokens, T, ref);
        double max_diff = 0.0, max_abs = 0.0;
        for (int i = 0; i < T * V; i++) {
            max_diff = fmax(max_diff, fabs(full[i] - ref[i]));
            max_abs = fmax(max_abs, fabs(ref[i]));
        }
        printf("  %-36s max |logit| %.2f, max |engine - reference| %.2e\n", variant_name(vi), max_abs,
               max_diff);
        /* bf16 dot-product instructions round the activations to bf16 (8 significant bits) */
        int rounds = spec.dtype == LMD_BF16 && lmd_bf16_rounds_inputs();
        CHECK(max_diff <= (rounds ? 5e-3 * max_abs : 1e-4));
        CHECK(max_abs > 0.5); /* the logits are not degenerate */

        /* token by token with the cache: bit-identical */
        s = tiny_seq(pool, t.config.context_length);
        for (int p = 0; p < T; p++) CHECK(tiny_run(m, s, tokens + p, 1, inc + p * V, &err) == LMD_OK);
        CHECK(s->len == T);
        lmd_kvseq_free(s);
        CHECK(same_floats(full, inc, (int64_t)T * V));

        /* uneven pieces, some crossing block boundaries */
        s = tiny_seq(pool, t.config.context_length);
        const int pieces[5] = {7, 1, 5, 2, 5};
        for (int i = 0, p = 0; i < 5; p += pieces[i++])
            CHECK(tiny_run(m, s, tokens + p, pieces[i], mixed + p * V, &err) == LMD_OK);
        lmd_kvseq_free(s);
        CHECK(same_floats(full, mixed, (int64_t)T * V));
        CHECK(pool->n_free == pool->n_blocks);

        free(full), free(inc), free(mixed), free(ref);
        lmd_kvpool_free(pool);
        tiny_close(&t, m);
    }
}

/* ------------------------------------------------------------------ */
/* several sequences in one forward; chunking                           */
/* ------------------------------------------------------------------ */

/* Logits of `n_new` tokens appended after `prefix` on a fresh sequence, alone. */
static void alone(lmd_model *m, lmd_kvpool *pool, const int32_t *prefix, int n_prefix,
                  const int32_t *new_tokens, int n_new, float *out) {
    int32_t *all = malloc((size_t)(n_prefix + n_new) * sizeof(int32_t));
    memcpy(all, prefix, (size_t)n_prefix * sizeof(int32_t));
    memcpy(all + n_prefix, new_tokens, (size_t)n_new * sizeof(int32_t));
    const int V = m->config.vocab_size;
    float *logits = malloc((size_t)(n_prefix + n_new) * V * sizeof(float));
    lmd_kvseq *s = tiny_seq(pool, m->config.context_length);
    lmd_error err;
    CHECK(tiny_run(m, s, all, n_prefix + n_new, logits, &err) == LMD_OK);
    memcpy(out, logits + (int64_t)n_prefix * V, (size_t)n_new * V * sizeof(float));
    lmd_kvseq_free(s);
    free(logits), free(all);
}

static void test_batch_of_sequences_and_chunks(void) {
    test_rng r = {202};
    for (int vi = 0; vi < N_VARIANTS; vi += 3) { /* llama f32 and gpt2 f32 */
        tiny_spec spec = variant(vi);
        tiny_model t;
        tiny_build(&t, &spec);
        lmd_model *big = tiny_init(&t, 64), *small = tiny_init(&t, 3);
        const int V = t.config.vocab_size;
        lmd_kvpool *pool = tiny_pool(&t, 4, 64);
        lmd_error err;
        /* three sequences with cached prefixes of 3, 0 and 5 tokens */
        const int n_prefix[3] = {3, 0, 5};
        int32_t prefix[3][8];
        lmd_kvseq *seqs[2][3];
        for (int k = 0; k < 3; k++) {
            random_tokens(&r, prefix[k], n_prefix[k], V);
            for (int which = 0; which < 2; which++) {
                seqs[which][k] = tiny_seq(pool, t.config.context_length);
                if (n_prefix[k] > 0)
                    CHECK(tiny_run(which ? small : big, seqs[which][k], prefix[k], n_prefix[k], NULL, &err) == LMD_OK);
            }
        }
        /* one call: 11 tokens interleaved over the three sequences */
        enum { N = 11 };
        const int32_t token_seq[N] = {2, 0, 0, 1, 2, 0, 1, 1, 2, 0, 2};
        int32_t tokens[N];
        random_tokens(&r, tokens, N, V);
        int32_t every[N];
        for (int i = 0; i < N; i++) every[i] = i;
        float *batch = malloc((size_t)N * V * sizeof(float));
        CHECK(lmd_model_forward(big, seqs[0], 3, tokens, token_seq, N, every, N, batch, &err) == LMD_OK);
        for (int k = 0; k < 3; k++) {
            int32_t mine[N], rows[N], n = 0;
            for (int i = 0; i < N; i++)
                if (token_seq[i] == k) rows[n] = i, mine[n++] = tokens[i];
            CHECK(seqs[0][k]->len == n_prefix[k] + n);
            float *ref = malloc((size_t)n * V * sizeof(float));
            alone(big, pool, prefix[k], n_prefix[k], mine, n, ref);
            for (int j = 0; j < n; j++) CHECK(same_floats(batch + (int64_t)rows[j] * V, ref + j * V, V));
            free(ref);
        }
        /* the same call through max_batch 3 (four chunks), logits requested out of order, twice
         * and across chunks: every row equals the unchunked one */
        const int32_t picks[8] = {10, 0, 5, 5, 3, 9, 1, 2};
        float *picked = malloc((size_t)8 * V * sizeof(float));
        CHECK(lmd_model_forward(small, seqs[1], 3, tokens, token_seq, N, picks, 8, picked, &err) == LMD_OK);
        for (int j = 0; j < 8; j++) CHECK(same_floats(picked + j * V, batch + (int64_t)picks[j] * V, V));
        for (int k = 0; k < 3; k++) CHECK(seqs[1][k]->len == seqs[0][k]->len);
        /* and the caches they left behind agree: one more token each, no logits requested for
         * one of them, n_logits 0 for the other */
        const int32_t next[3] = {1, 2, 3}, order[3] = {0, 1, 2};
        float one[2][3 * 64];
        CHECK(lmd_model_forward(big, seqs[0], 3, next, order, 3, order, 3, one[0], &err) == LMD_OK);
        CHECK(lmd_model_forward(small, seqs[1], 3, next, order, 3, order, 3, one[1], &err) == LMD_OK);
        CHECK(same_floats(one[0], one[1], 3 * V));
        CHECK(lmd_model_forward(small, seqs[1], 3, next, order, 3, NULL, 0, NULL, &err) == LMD_OK);
        for (int k = 0; k < 3; k++) CHECK(seqs[1][k]->len == seqs[0][k]->len + 1);
        for (int which = 0; which < 2; which++)
            for (int k = 0; k < 3; k++) lmd_kvseq_free(seqs[which][k]);
        CHECK(pool->n_free == pool->n_blocks);
        free(batch), free(picked);
        lmd_kvpool_free(pool);
        lmd_model_free(big);
        lmd_model_free(small);
        tiny_free(&t);
    }
}

/* ------------------------------------------------------------------ */
/* truncate, fork                                                       */
/* ------------------------------------------------------------------ */

static void test_truncate_and_fork(void) {
    test_rng r = {303};
    for (int vi = 0; vi < N_VARIANTS; vi += 3) {
        tiny_spec spec = variant(vi);
        tiny_model t;
        lmd_model *m = tiny_open(&t, &spec, 16);
        const int V = t.config.vocab_size;
        lmd_kvpool *pool = tiny_pool(&t, 4, 32);
        lmd_error err;
        int32_t a[10], b[6];
        random_tokens(&r, a, 10, V);
        random_tokens(&r, b, 6, V);
        float got[6 * 64], want[6 * 64];
        /* decode 10, keep 5 (mid-block), decode 6 others == decode a[0:5] + b from scratch */
        lmd_kvseq *s = tiny_seq(pool, t.config.context_length);
        CHECK(tiny_run(m, s, a, 10, NULL, &err) == LMD_OK);
        CHECK(lmd_kvseq_truncate(s, 5, &err) == LMD_OK);
        CHECK(tiny_run(m, s, b, 6, got, &err) == LMD_OK);
        alone(m, pool, a, 5, b, 6, want);
        CHECK(same_floats(got, want, 6 * V));
        /* back to nothing, then the whole of a again */
        CHECK(lmd_kvseq_truncate(s, 0, &err) == LMD_OK);
        CHECK(tiny_run(m, s, a, 6, got, &err) == LMD_OK);
        alone(m, pool, a, 0, a, 6, want);
        CHECK(same_floats(got, want, 6 * V));
        lmd_kvseq_free(s);

        /* a shared prefix of 6 (a partly filled shared block), then two continuations */
        lmd_kvseq *p = tiny_seq(pool, t.config.context_length), *q;
        CHECK(tiny_run(m, p, a, 6, NULL, &err) == LMD_OK);
        CHECK(lmd_kvseq_fork(&q, p, &err) == LMD_OK);
        CHECK(tiny_run(m, q, b, 4, got, &err) == LMD_OK); /* q copies the shared block */
        alone(m, pool, a, 6, b, 4, want);
        CHECK(same_floats(got, want, 4 * V));
        CHECK(tiny_run(m, p, a + 6, 3, got, &err) == LMD_OK); /* p's cache is untouched by q */
        alone(m, pool, a, 6, a + 6, 3, want);
        CHECK(same_floats(got, want, 3 * V));
        /* both in one call, after truncating q into the shared block again */
        CHECK(lmd_kvseq_truncate(q, 2, &err) == LMD_OK);
        lmd_kvseq *both[2] = {p, q};
        const int32_t toks[3] = {b[5], b[4], a[9]}, which[3] = {1, 1, 0}, idx[3] = {0, 1, 2};
        float three[3 * 64];
        CHECK(lmd_model_forward(m, both, 2, toks, which, 3, idx, 3, three, &err) == LMD_OK);
        alone(m, pool, a, 2, toks, 2, want);
        CHECK(same_floats(three, want, 2 * V));
        alone(m, pool, a, 9, a + 9, 1, want);
        CHECK(same_floats(three + 2 * V, want, V));
        lmd_kvseq_free(p);
        lmd_kvseq_free(q);
        CHECK(pool->n_free == pool->n_blocks);
        lmd_kvpool_free(pool);
        tiny_close(&t, m);
    }
}

/* Forks that all write into the partly filled block they share: every writer but the last
 * copies it, so a pool with one block fewer than the writers suffices, and the call must not
 * be refused for want of the block nobody takes. A holder outside the call keeps it shared. */
static void test_forks_writing_one_shared_block(void) {
    test_rng r = {505};
    tiny_spec spec = tiny_llama_spec();
    tiny_model t;
    lmd_model *m = tiny_open(&t, &spec, 8);
    const int V = t.config.vocab_size;
    lmd_kvpool *ref_pool = tiny_pool(&t, 4, 16);
    lmd_error err;
    int32_t prefix[6], next[3], filler[4] = {1, 2, 3, 4};
    random_tokens(&r, prefix, 6, V);
    random_tokens(&r, next, 3, V);
    const int32_t order[3] = {0, 1, 2};
    float logits[3 * 64], want[64];
    for (int n_writers = 2; n_writers <= 3; n_writers++) {
        /* blocks: 2 for the prefix, 1 for the filler, n_writers - 1 copies */
        lmd_kvpool *pool = tiny_pool(&t, 4, 3 + n_writers - 1);
        lmd_kvseq *seqs[4] = {tiny_seq(pool, 24), NULL, NULL, NULL};
        CHECK(tiny_run(m, seqs[0], prefix, 6, NULL, &err) == LMD_OK);
        for (int k = 1; k <= n_writers; k++) CHECK(lmd_kvseq_fork(&seqs[k], seqs[0], &err) == LMD_OK);
        lmd_kvseq *f = tiny_seq(pool, 24);
        CHECK(tiny_run(m, f, filler, 4, NULL, &err) == LMD_OK);
        CHECK(pool->n_free == n_writers - 1);
        /* seqs[n_writers] also holds the block and stays out of the call: one copy too many */
        CHECK(lmd_model_forward(m, seqs, n_writers, next, order, n_writers, order, n_writers, logits,
                                &err) == LMD_ERR_CACHE_FULL);
        CHECK(pool->n_free == n_writers - 1);
        for (int k = 0; k <= n_writers; k++) CHECK(seqs[k]->len == 6);
        lmd_kvseq_free(seqs[n_writers]);
        /* now the writers are all its holders */
        lmd_status st = lmd_model_forward(m, seqs, n_writers, next, order, n_writers, order, n_writers,
                                          logits, &err);
        if (st != LMD_OK) fprintf(stderr, "%d writers: %s\n", n_writers, err.msg);
        CHECK(st == LMD_OK);
        CHECK(pool->n_free == 0);
        for (int k = 0; k < n_writers; k++) {
            CHECK(seqs[k]->len == 7);
            alone(m, ref_pool, prefix, 6, next + k, 1, want);
            CHECK(same_floats(logits + k * V, want, V));
        }
        for (int k = 0; k < n_writers; k++) lmd_kvseq_free(seqs[k]);
        lmd_kvseq_free(f);
        CHECK(pool->n_free == pool->n_blocks);
        lmd_kvpool_free(pool);
    }
    lmd_kvpool_free(ref_pool);
    tiny_close(&t, m);
}

/* A wider model, so that the matmuls and the attention of a prefill take their parallel
 * paths: logits are bit-identical with 1 and 2 threads, and equal to decoding token by token
 * (whose small steps stay serial). */
static void test_threads_do_not_change_results(void) {
    enum { T = 64 };
    test_rng r = {606};
    tiny_spec spec = tiny_llama_spec();
    spec.dim = 256, spec.hidden = 256, spec.vocab = 64, spec.context = T;
    tiny_model t;
    lmd_model *m = tiny_open(&t, &spec, T);
    const int V = t.config.vocab_size;
    lmd_kvpool *pool = tiny_pool(&t, 16, 16);
    lmd_error err;
    int32_t tokens[T];
    random_tokens(&r, tokens, T, V);
    float *logits[3];
    for (int run = 0; run < 3; run++) {
        logits[run] = malloc((size_t)T * V * sizeof(float));
        lmd_set_num_threads(run == 0 ? 1 : 2);
        lmd_kvseq *s = tiny_seq(pool, T);
        if (run < 2) {
            CHECK(tiny_run(m, s, tokens, T, logits[run], &err) == LMD_OK);
        } else {
            for (int p = 0; p < T; p++) CHECK(tiny_run(m, s, tokens + p, 1, logits[run] + p * V, &err) == LMD_OK);
        }
        lmd_kvseq_free(s);
    }
    lmd_set_num_threads(0);
    CHECK(same_floats(logits[0], logits[1], (int64_t)T * V));
    CHECK(same_floats(logits[0], logits[2], (int64_t)T * V));
    for (int run = 0; run < 3; run++) free(logits[run]);
    lmd_kvpool_free(pool);
    tiny_close(&t, m);
}

/* Two threads split attention's work by tokens where a model has few kv heads, cutting where
 * the positions attended to reach half: one decoding token after a long cache holds all of
 * it, and the other part is empty. Such a part touches nothing: token_seq[2] below, past
 * the call's two tokens, names a NULL sequence (reading it crashed, or read another
 * call's sequence through a stale index), and the logits equal each sequence's alone. */
static void test_an_empty_token_part_reads_nothing(void) {
    enum { LONG = 460, T = 480 };
    test_rng r = {707};
    tiny_spec spec = tiny_llama_spec();
    spec.dim = 256, spec.hidden = 64, spec.n_heads = 4, spec.n_kv_heads = 1, spec.context = T, spec.vocab = 64;
    tiny_model t;
    lmd_model *m = tiny_open(&t, &spec, T);
    const int V = t.config.vocab_size;
    lmd_kvpool *pool = tiny_pool(&t, 16, 2 * (T / 16 + 1));
    lmd_error err;
    int32_t prefix[LONG + 1];
    random_tokens(&r, prefix, LONG + 1, V);
    lmd_kvseq *seqs[3] = {tiny_seq(pool, T), tiny_seq(pool, T), NULL};
    CHECK(tiny_run(m, seqs[0], prefix, 1, NULL, &err) == LMD_OK);    /* 1 cached position */
    CHECK(tiny_run(m, seqs[1], prefix, LONG, NULL, &err) == LMD_OK); /* LONG cached positions */
    const int32_t next[2] = {prefix[1], prefix[LONG]}, token_seq[3] = {0, 1, 2}, rows[2] = {0, 1};
    float *logits = malloc((size_t)2 * V * sizeof(float)), *ref = malloc((size_t)V * sizeof(float));
    lmd_set_num_threads(2);
    CHECK(lmd_model_forward(m, seqs, 2, next, token_seq, 2, rows, 2, logits, &err) == LMD_OK);
    lmd_set_num_threads(0);
    alone(m, pool, prefix, 1, next, 1, ref);
    CHECK(same_floats(logits, ref, V));
    alone(m, pool, prefix, LONG, next + 1, 1, ref);
    CHECK(same_floats(logits + V, ref, V));
    lmd_kvseq_free(seqs[0]), lmd_kvseq_free(seqs[1]);
    free(logits), free(ref);
    lmd_kvpool_free(pool);
    tiny_close(&t, m);
}

/* ------------------------------------------------------------------ */
/* errors                                                               */
/* ------------------------------------------------------------------ */

typedef struct {
    int32_t len[3], n_free, blocks[3][8];
} seq_state;

static seq_state state_of(lmd_kvseq *const *seqs, int n) {
    seq_state st;
    memset(&st, 0, sizeof st);
    for (int k = 0; k < n; k++) {
        st.len[k] = seqs[k]->len;
        memcpy(st.blocks[k], seqs[k]->blocks, 6 * sizeof(int32_t)); /* context 24 / block 4 */
    }
    st.n_free = seqs[0]->pool->n_free;
    return st;
}

#define EXPECT_FAIL(call, status, text)                                               \
    do {                                                                              \
        seq_state before_ = state_of(seqs, 2);                                        \
        lmd_status st_ = (call);                                                      \
        CHECK(st_ == (status));                                                       \
        if (st_ != LMD_OK) CHECK_MSG_CONTAINS(err, text);                             \
        seq_state after_ = state_of(seqs, 2);                                         \
        CHECK(memcmp(&before_, &after_, sizeof before_) == 0);                        \
    } while (0)

static void test_forward_errors(void) {
    test_rng r = {404};
    tiny_spec spec = tiny_llama_spec();
    tiny_model t;
    lmd_model *m = tiny_open(&t, &spec, 8);
    const int V = t.config.vocab_size;
    lmd_kvpool *pool = tiny_pool(&t, 4, 16);
    lmd_error err;
    int32_t pa[5], pb[2];
    random_tokens(&r, pa, 5, V);
    random_tokens(&r, pb, 2, V);
    lmd_kvseq *seqs[3] = {tiny_seq(pool, 24), tiny_seq(pool, 24), NULL};
    CHECK(tiny_run(m, seqs[0], pa, 5, NULL, &err) == LMD_OK);
    CHECK(tiny_run(m, seqs[1], pb, 2, NULL, &err) == LMD_OK);
    float logits[4 * 64];
    const int32_t idx[4] = {0, 1, 2, 3}, ts[4] = {0, 1, 0, 1};
    int32_t good[4] = {1, 2, 3, 4};

    /* a token outside the vocabulary, last in the call: nothing appended before it either */
    int32_t bad[4] = {1, 2, 3, V};
    EXPECT_FAIL(lmd_model_forward(m, seqs, 2, bad, ts, 4, idx, 4, logits, &err), LMD_ERR_INVALID_ARG,
                "token id 40 at index 3");
    bad[3] = 4, bad[1] = -1;
    EXPECT_FAIL(lmd_model_forward(m, seqs, 2, bad, ts, 4, idx, 4, logits, &err), LMD_ERR_INVALID_ARG,
                "token id -1");
    CHECK_MSG_CONTAINS(err, "vocabulary");
    /* a token naming a sequence that is not in the call */
    const int32_t bad_seq[4] = {0, 1, 2, 1};
    EXPECT_FAIL(lmd_model_forward(m, seqs, 2, good, bad_seq, 4, idx, 4, logits, &err),
                LMD_ERR_INVALID_ARG, "sequence index 2");
    /* a logit index outside the call's tokens */
    const int32_t bad_idx[2] = {0, 4};
    EXPECT_FAIL(lmd_model_forward(m, seqs, 2, good, ts, 4, bad_idx, 2, logits, &err),
                LMD_ERR_INVALID_ARG, "logit index 1 (=4)");
    const int32_t neg_idx[1] = {-1};
    EXPECT_FAIL(lmd_model_forward(m, seqs, 2, good, ts, 4, neg_idx, 1, logits, &err),
                LMD_ERR_INVALID_ARG, "logit index 0 (=-1)");
    /* one sequence twice in the call */
    lmd_kvseq *twice[3] = {seqs[0], seqs[1], seqs[0]};
    const int32_t ts3[4] = {0, 1, 2, 1};
    EXPECT_FAIL(lmd_model_forward(m, twice, 3, good, ts3, 4, idx, 4, logits, &err), LMD_ERR_INVALID_ARG,
                "sequence 2 appears twice");
    /* a NULL sequence, no tokens, a negative logit count */
    lmd_kvseq *with_null[2] = {seqs[0], NULL};
    EXPECT_FAIL(lmd_model_forward(m, with_null, 2, good, ts, 4, idx, 4, logits, &err),
                LMD_ERR_INVALID_ARG, "sequence 1 is NULL");
    EXPECT_FAIL(lmd_model_forward(m, seqs, 2, good, ts, 0, idx, 0, logits, &err), LMD_ERR_INVALID_ARG,
                "n_tokens (=0)");
    EXPECT_FAIL(lmd_model_forward(m, seqs, 2, good, ts, 4, idx, -1, logits, &err), LMD_ERR_INVALID_ARG,
                "n_logits (=-1)");
    /* the context length: sequence 0 holds 5, 20 more exceed 24; then sequence 1 (2 + 23) */
    int32_t many[24], many_seq[24], many_idx[1] = {19}, zeros[24] = {0};
    random_tokens(&r, many, 24, V);
    EXPECT_FAIL(lmd_model_forward(m, seqs, 2, many, zeros, 20, many_idx, 1, logits, &err),
                LMD_ERR_CACHE_FULL, "sequence 0 holds 5 positions; 20 more exceed the context length 24");
    for (int i = 0; i < 24; i++) many_seq[i] = i == 0 ? 0 : 1;
    EXPECT_FAIL(lmd_model_forward(m, seqs, 2, many, many_seq, 24, many_idx, 1, logits, &err),
                LMD_ERR_CACHE_FULL, "sequence 1 holds 2 positions; 23 more exceed the context length 24");
    /* a sequence's own max_len below the model's context length is its limit */
    lmd_kvseq *shortseq = tiny_seq(pool, 6);
    lmd_kvseq *pair[2] = {shortseq, seqs[1]};
    EXPECT_FAIL(lmd_model_forward(m, pair, 2, many, zeros, 7, many_idx, 0, logits, &err),
                LMD_ERR_CACHE_FULL, "context length 6");
    CHECK(shortseq->len == 0);
    lmd_kvseq_free(shortseq);
    /* the pool: 16 blocks of 4; sequences 0 and 1 hold 3, two others take 10 */
    int32_t filler[20];
    random_tokens(&r, filler, 20, V);
    lmd_kvseq *hog[2] = {tiny_seq(pool, 100), tiny_seq(pool, 100)};
    for (int i = 0; i < 2; i++) CHECK(tiny_run(m, hog[i], filler, 20, NULL, &err) == LMD_OK);
    CHECK(pool->n_free == 3);
    /* each part of this call would fit (sequence 0: 5 -> 9, one block; sequence 1: 2 -> 5,
     * one; a new sequence: 5 positions, two), but together they need 4 */
    lmd_kvseq *three[3] = {seqs[0], seqs[1], tiny_seq(pool, 24)};
    int32_t cross[12];
    const int32_t cross_seq[12] = {0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2};
    random_tokens(&r, cross, 12, V);
    EXPECT_FAIL(lmd_model_forward(m, three, 3, cross, cross_seq, 12, idx, 0, NULL, &err),
                LMD_ERR_CACHE_FULL, "3 free blocks of 4 positions but this call needs 4");
    CHECK(three[2]->len == 0 && pool->n_free == 3);
    lmd_kvseq_free(three[2]);
    lmd_kvseq_free(hog[0]);
    lmd_kvseq_free(hog[1]);
    /* a pool shaped for another model */
    lmd_kvpool *other;
    CHECK(lmd_kvpool_init(&other, 2, 8, 8, 4, 4, LMD_KV_F32, &err) == LMD_OK);
    lmd_kvseq *foreign = tiny_seq(other, 24);
    EXPECT_FAIL(lmd_model_forward(m, &foreign, 1, good, zeros, 1, idx, 1, logits, &err),
                LMD_ERR_INVALID_ARG, "cache pool");
    /* two pools in one call */
    lmd_kvseq *mixed[2] = {seqs[0], foreign};
    EXPECT_FAIL(lmd_model_forward(m, mixed, 2, good, ts, 4, idx, 4, logits, &err), LMD_ERR_INVALID_ARG,
                "another cache pool");
    lmd_kvseq_free(foreign);
    lmd_kvpool_free(other);
    /* the model's kv features in heads of another size (its values would be read out of place) */
    const int32_t model_kv = m->config.n_kv_heads * m->config.head_dim;
    CHECK(m->config.n_kv_heads > 1);
    lmd_kvpool *regrouped;
    CHECK(lmd_kvpool_init(&regrouped, m->config.n_layers, model_kv, model_kv, 4, 8, LMD_KV_F32, &err) == LMD_OK);
    lmd_kvseq *in_regrouped = tiny_seq(regrouped, 24);
    EXPECT_FAIL(lmd_model_forward(m, &in_regrouped, 1, good, zeros, 1, idx, 1, logits, &err), LMD_ERR_INVALID_ARG,
                "in heads of");
    lmd_kvseq_free(in_regrouped);
    lmd_kvpool_free(regrouped);

    /* after all that, the sequences continue exactly as if nothing had been tried */
    CHECK(lmd_model_forward(m, seqs, 2, good, ts, 4, idx, 4, logits, &err) == LMD_OK);
    float want[2 * 64];
    const int32_t g0[2] = {good[0], good[2]}, g1[2] = {good[1], good[3]};
    alone(m, pool, pa, 5, g0, 2, want);
    CHECK(same_floats(logits, want, V) && same_floats(logits + 2 * V, want + V, V));
    alone(m, pool, pb, 2, g1, 2, want);
    CHECK(same_floats(logits + V, want, V) && same_floats(logits + 3 * V, want + V, V));
    lmd_kvseq_free(seqs[0]);
    lmd_kvseq_free(seqs[1]);
    CHECK(pool->n_free == pool->n_blocks);
    lmd_kvpool_free(pool);
    tiny_close(&t, m);
}

static void test_init_errors(void) {
    for (int arch = 0; arch < 2; arch++) {
        tiny_spec spec = arch ? tiny_gpt2_spec() : tiny_llama_spec();
        tiny_model t;
        tiny_build(&t, &spec);
        lmd_model *m = (lmd_model *)&m;
        lmd_error err;
        lmd_layer_weights layers[TINY_MAX_LAYERS];
        lmd_config c = t.config;
        lmd_weights w = t.weights;
        memcpy(layers, t.layers, sizeof layers);
        w.layers = layers;
#define EXPECT_INIT(status, text)                                    \
    do {                                                             \
        m = (lmd_model *)&m;                                         \
        CHECK(lmd_model_init(&m, &c, &w, 8, &err) == (status));      \
        CHECK(m == NULL);                                            \
        CHECK_MSG_CONTAINS(err, text);                               \
        c = t.config, w = t.weights, w.layers = layers;              \
        memcpy(layers, t.layers, sizeof layers);                     \
    } while (0)
        layers[1].wk.rows = 15;
        EXPECT_INIT(LMD_ERR_FORMAT, "layers[1].wk: shape (15, 32)");
        layers[0].w_down.dtype = LMD_Q8_0; /* 48 columns */
        EXPECT_INIT(LMD_ERR_FORMAT, "layers[0].w_down: q8_0 needs a multiple of 32 columns");
        w.final_norm = NULL;
        EXPECT_INIT(LMD_ERR_INVALID_ARG, "final_norm: missing");
        w.output.data = NULL;
        EXPECT_INIT(LMD_ERR_INVALID_ARG, "output: missing");
        c.n_kv_heads = 3;
        EXPECT_INIT(LMD_ERR_INVALID_ARG, "n_kv_heads (=3)");
        c.vocab_size = 0;
        EXPECT_INIT(LMD_ERR_INVALID_ARG, "vocab_size (=0)");
        c.norm_eps = NAN;
        EXPECT_INIT(LMD_ERR_INVALID_ARG, "norm_eps");
        c.norm_eps = INFINITY; /* every norm would be zero, silently */
        EXPECT_INIT(LMD_ERR_INVALID_ARG, "norm_eps (=inf) must be finite and >= 0");
        if (!arch) {
            c.rope_theta = INFINITY; /* a float64 base beyond float32's range */
            EXPECT_INIT(LMD_ERR_INVALID_ARG, "rope_theta (=inf) must be finite and > 0");
        }
        if (arch) {
            w.position_embedding = NULL;
            EXPECT_INIT(LMD_ERR_INVALID_ARG, "position_embedding: missing");
            layers[1].ffn_norm_bias = NULL;
            EXPECT_INIT(LMD_ERR_INVALID_ARG, "layers[1].ffn_norm_bias: missing");
        } else {
            c.head_dim = 7, c.n_heads = 1, c.n_kv_heads = 1;
            EXPECT_INIT(LMD_ERR_INVALID_ARG, "head_dim (=7) must be even");
            layers[1].w_gate.data = NULL;
            EXPECT_INIT(LMD_ERR_INVALID_ARG, "layers[1].w_gate: missing");
        }
#undef EXPECT_INIT
        m = (lmd_model *)&m;
        CHECK(lmd_model_init(&m, &c, &w, 0, &err) == LMD_ERR_INVALID_ARG && m == NULL);
        CHECK_MSG_CONTAINS(err, "max_batch (=0)");
        CHECK(lmd_model_init(&m, &c, &w, 1, &err) == LMD_OK && m != NULL);
        lmd_model_free(m);
        lmd_model_free(NULL);
        tiny_free(&t);
    }
}

/* ------------------------------------------------------------------ */
/* attention scores sized by the positions, not the context length      */
/* ------------------------------------------------------------------ */

/* A model starts with scores for 1024 positions (of a context of 2600 here) and grows them
 * when a call attends to more: to twice as many, then to the context length. Each call's
 * logits equal one prefill's bit for bit, for query tiles (heads of 8) and the other
 * attention (heads of 12), and the caches are exactly as long as asked. */
static void test_scores_grow_with_the_positions(void) {
    enum { T = 2600 };
    test_rng r = {707};
    for (int hd = 8; hd <= 12; hd += 4) {
        tiny_spec spec = tiny_llama_spec();
        spec.dim = 4 * hd, spec.n_layers = 1, spec.context = T, spec.seed = 9;
        tiny_model t;
        tiny_build(&t, &spec);
        lmd_model *whole = tiny_init(&t, 64), *grown = tiny_init(&t, 64);
        const int64_t first = grown->scores_stride, lanes = first - 1024;
        CHECK(lanes >= 1 && lanes <= 16);
        const int V = t.config.vocab_size;
        lmd_kvpool *pool = tiny_pool(&t, 16, 2 * T / 16 + 2);
        int32_t *tokens = malloc(T * sizeof(int32_t));
        float *want = malloc((size_t)T * V * sizeof(float)), *got = malloc((size_t)T * V * sizeof(float));
        random_tokens(&r, tokens, T, V);
        lmd_error err;
        lmd_kvseq *s = tiny_seq(pool, T);
        CHECK(tiny_run(whole, s, tokens, T, want, &err) == LMD_OK);
        CHECK(whole->scores_stride == T + lanes); /* grown at once to what the call needed */
        lmd_kvseq_free(s);
        s = tiny_seq(pool, T);
        const int pieces[4] = {1000, 1, 600, 999};
        const int64_t strides[4] = {first, first, 2048 + lanes, T + lanes};
        for (int i = 0, p = 0; i < 4; p += pieces[i++]) {
            CHECK(tiny_run(grown, s, tokens + p, pieces[i], got + (int64_t)p * V, &err) == LMD_OK);
            CHECK(grown->scores_stride == strides[i]);
            CHECK(s->len == p + pieces[i]);
        }
        CHECK(same_floats(want, got, (int64_t)T * V));
        lmd_kvseq_free(s);
        free(tokens), free(want), free(got);
        lmd_kvpool_free(pool);
        lmd_model_free(whole);
        tiny_close(&t, grown);
    }
}

int main(void) {
    test_forward_against_reference_and_incremental();
    test_batch_of_sequences_and_chunks();
    test_truncate_and_fork();
    test_forks_writing_one_shared_block();
    test_threads_do_not_change_results();
    test_an_empty_token_part_reads_nothing();
    test_forward_errors();
    test_init_errors();
    test_scores_grow_with_the_positions();
    return test_report("test_model");
}
