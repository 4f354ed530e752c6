/* decode.c -- the decoding loops over an lmdecode model (see decode.h).
 *
 * Glossary: n sequences of the generator, R of them still running, V the
 * vocabulary, B beams, L the model's context length. */
#include "decode.h"

#include <stdlib.h>
#include <string.h>

struct lmd_decode_run {
    lmd_model *model;     /* borrowed */
    lmd_kvpool *pool;     /* borrowed */
    lmd_generator *gen;   /* borrowed */
    int32_t n, vocab;
    int prefilled;
    lmd_kvseq **seqs;     /* (n,) the cache of each sequence, NULL before prefill or once finished */
    float *logits;        /* (n, V) */
    int32_t *ids;         /* (n,) running sequences */
    lmd_kvseq **batch;    /* (n,) caches of one forward call */
    int32_t *tokens;      /* (max(n, prompt tokens),) tokens of one forward call */
    int32_t *token_seq;   /* same size: index into batch of each token */
    int32_t *logit_index; /* (n,) */
    int32_t *leader;      /* (n,) the sequence whose prefilled cache k shares (k for a leader) */
};

void lmd_decode_run_free(lmd_decode_run *run) {
    if (run == NULL) return;
    for (int32_t k = 0; run->seqs != NULL && k < run->n; k++) lmd_kvseq_free(run->seqs[k]);
    free(run->seqs);
    free(run->logits);
    free(run->ids);
    free(run->batch);
    free(run->tokens);
    free(run->token_seq);
    free(run->logit_index);
    free(run->leader);
    free(run);
}

lmd_status lmd_decode_run_init(lmd_decode_run **out, lmd_model *model, lmd_kvpool *pool,
                               lmd_generator *gen, lmd_error *err) {
    *out = NULL;
    if (model == NULL || pool == NULL || gen == NULL)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "model, pool and generator must not be NULL");
    const int32_t n = lmd_generator_n_seqs(gen), V = lmd_generator_vocab(gen);
    if (V != model->config.vocab_size)
        return lmd_fail(err, LMD_ERR_INVALID_ARG,
                        "the generator samples %d tokens but the model's vocabulary has %d", V,
                        model->config.vocab_size);
    int64_t prompt_tokens = 0;
    for (int32_t k = 0; k < n; k++) {
        int32_t len = lmd_generator_prompt_length(gen, k);
        if (len < 1)
            return lmd_fail(err, LMD_ERR_INVALID_ARG,
                            "prompt %d is empty: a model needs at least one token (e.g. BOS)", k);
        if (len > model->config.context_length)
            return lmd_fail(err, LMD_ERR_CACHE_FULL,
                            "prompt %d has %d tokens but the model's context length is %d", k, len,
                            model->config.context_length);
        prompt_tokens += len;
    }
    if (prompt_tokens > INT32_MAX)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "the prompts hold more than 2^31 tokens");
    lmd_decode_run *run = calloc(1, sizeof *run);
    if (run == NULL) return lmd_fail(err, LMD_ERR_NOMEM, "out of memory for a decoding run");
    const size_t N = (size_t)(uint32_t)n;
    size_t token_slots = prompt_tokens > n ? (size_t)prompt_tokens : N;
    run->model = model;
    run->pool = pool;
    run->gen = gen;
    run->n = n;
    run->vocab = V;
    run->seqs = calloc(N, sizeof *run->seqs);
    run->logits = malloc(N * (size_t)V * sizeof *run->logits);
    run->ids = malloc(N * sizeof *run->ids);
    run->batch = malloc(N * sizeof *run->batch);
    run->tokens = malloc(token_slots * sizeof *run->tokens);
    run->token_seq = malloc(token_slots * sizeof *run->token_seq);
    run->logit_index = malloc(N * sizeof *run->logit_index);
    run->leader = malloc(N * sizeof *run->leader);
    if (!run->seqs || !run->logits || !run->ids || !run->batch || !run->tokens ||
        !run->token_seq || !run->logit_index || !run->leader) {
        lmd_decode_run_free(run);
        return lmd_fail(err, LMD_ERR_NOMEM, "out of memory for %d sequences", n);
    }
    *out = run;
    return LMD_OK;
}

static int same_prompt(const lmd_generator *g, int32_t a, int32_t b) {
    int32_t len_a = lmd_generator_prompt_length(g, a), len_b = lmd_generator_prompt_length(g, b);
    return len_a == len_b && memcmp(lmd_generator_tokens(g, a, NULL), lmd_generator_tokens(g, b, NULL),
                                    (size_t)len_a * sizeof(int32_t)) == 0;
}

/* Frees the caches of sequences that have finished, returning their blocks to the pool. */
static void release_finished(lmd_decode_run *run) {
    for (int32_t k = 0; k < run->n; k++)
        if (run->seqs[k] != NULL && lmd_generator_finish_reason(run->gen, k) != LMD_RUNNING) {
            lmd_kvseq_free(run->seqs[k]);
            run->seqs[k] = NULL;
        }
}

/* First step: one forward over every distinct prompt of the running
 * sequences (ids[0..R), ascending); a sequence whose prompt equals the
 * previous one's forks its cache. Row i of run->logits gets sequence ids[i]. */
static lmd_status prefill(lmd_decode_run *run, int32_t R, lmd_error *err) {
    lmd_status st;
    const int32_t V = run->vocab, L = run->model->config.context_length;
    int32_t n_leaders = 0, n_tokens = 0;
    /* caches left by an earlier call whose prefill failed (e.g. a full pool) */
    for (int32_t k = 0; k < run->n; k++) {
        lmd_kvseq_free(run->seqs[k]);
        run->seqs[k] = NULL;
    }
    for (int32_t i = 0; i < R; i++) {
        int32_t k = run->ids[i];
        if (i > 0 && same_prompt(run->gen, k, run->ids[i - 1])) {
            run->leader[i] = run->leader[i - 1];
            continue;
        }
        run->leader[i] = i;
        if ((st = lmd_kvseq_init(&run->seqs[k], run->pool, L, err))) return st;
        int32_t len = lmd_generator_prompt_length(run->gen, k);
        memcpy(run->tokens + n_tokens, lmd_generator_tokens(run->gen, k, NULL),
               (size_t)len * sizeof(int32_t));
        for (int32_t t = 0; t < len; t++) run->token_seq[n_tokens + t] = n_leaders;
        n_tokens += len;
        run->batch[n_leaders] = run->seqs[k];
        run->logit_index[n_leaders] = n_tokens - 1;
        n_leaders++;
    }
    /* the leaders' rows land in the last n_leaders rows, then spread to every sequence
     * (row i never overtakes the leader rows it still has to read) */
    float *leader_rows = run->logits + (int64_t)(R - n_leaders) * V;
    if ((st = lmd_model_forward(run->model, run->batch, n_leaders, run->tokens, run->token_seq,
                                n_tokens, run->logit_index, n_leaders, leader_rows, err)))
        return st;
    int32_t row = 0;
    for (int32_t i = 0; i < R; i++) {
        int32_t k = run->ids[i];
        if (run->leader[i] != i &&
            (st = lmd_kvseq_fork(&run->seqs[k], run->seqs[run->ids[run->leader[i]]], err)))
            return st;
        if (run->leader[i] == i) row++;
        memmove(run->logits + (int64_t)i * V, leader_rows + (int64_t)(row - 1) * V,
                (size_t)V * sizeof(float));
    }
    run->prefilled = 1;
    return LMD_OK;
}

lmd_status lmd_decode_run_steps(lmd_decode_run *run, lmd_sampler *const *samplers, int n_samplers,
                                int32_t max_steps, int32_t *last_ids, int32_t *last_tokens,
                                int32_t *n_last, lmd_stop_check stop, void *stop_ctx, lmd_error *err) {
    lmd_status st;
    const int32_t L = run->model->config.context_length;
    if (n_last) *n_last = 0;
    for (int32_t step = 0; step < max_steps; step++) {
        if (lmd_generator_running(run->gen, NULL) == 0) break;
        if (!run->prefilled) {
            /* a prompt that already fills the context length leaves no room */
            for (int32_t k = 0; k < run->n; k++)
                if (lmd_generator_prompt_length(run->gen, k) >= L)
                    lmd_generator_finish(run->gen, k, LMD_FINISH_LENGTH);
            int32_t R = lmd_generator_running(run->gen, run->ids);
            if (R == 0) break;
            if ((st = prefill(run, R, err))) return st;
        } else {
            /* feed each running sequence the token it drew last; a sequence whose tokens
             * fill the context length (the cache holds all but the last) ends there */
            for (int32_t k = 0; k < run->n; k++)
                if (run->seqs[k] != NULL && run->seqs[k]->len + 1 >= L)
                    lmd_generator_finish(run->gen, k, LMD_FINISH_LENGTH);
            release_finished(run);
            int32_t R = lmd_generator_running(run->gen, run->ids);
            if (R == 0) break;
            for (int32_t i = 0; i < R; i++) {
                int32_t k = run->ids[i], length;
                const int32_t *all = lmd_generator_tokens(run->gen, k, &length);
                run->tokens[i] = all[length - 1];
                run->token_seq[i] = i;
                run->logit_index[i] = i;
                run->batch[i] = run->seqs[k];
            }
            if ((st = lmd_model_forward(run->model, run->batch, R, run->tokens, run->token_seq, R,
                                        run->logit_index, R, run->logits, err)))
                return st;
        }
        int32_t R = lmd_generator_running(run->gen, run->ids);
        if ((st = lmd_generator_step(run->gen, samplers, n_samplers, run->logits, run->tokens, err)))
            return st;
        if (last_ids != NULL && last_tokens != NULL) {
            memcpy(last_ids, run->ids, (size_t)R * sizeof(int32_t));
            memcpy(last_tokens, run->tokens, (size_t)R * sizeof(int32_t));
        }
        if (n_last) *n_last = R;
        release_finished(run);
        if (stop != NULL && step + 1 < max_steps && stop(stop_ctx))
            return lmd_fail(err, LMD_ERR_STOPPED, "decoding was stopped after %d steps of this call", step + 1);
    }
    return LMD_OK;
}

/* ------------------------------------------------------------------ */
/* beam search                                                          */
/* ------------------------------------------------------------------ */

static int32_t blocks_in_use(const lmd_kvpool *pool) { return pool->n_blocks - pool->n_free; }

lmd_status lmd_decode_beam_search(lmd_model *model, lmd_kvpool *pool, lmd_beam_search *bs,
                                  const int32_t *prompt, int32_t prompt_len,
                                  int32_t *peak_kv_blocks, lmd_stop_check stop, void *stop_ctx,
                                  lmd_error *err) {
    const int32_t B = lmd_beam_search_width(bs), V = lmd_beam_search_vocab(bs);
    const int32_t L = model->config.context_length;
    if (V != model->config.vocab_size)
        return lmd_fail(err, LMD_ERR_INVALID_ARG,
                        "the beam search ranks %d tokens but the model's vocabulary has %d", V,
                        model->config.vocab_size);
    if (prompt_len < 1)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "the prompt is empty: a model needs at least one token");
    if ((int64_t)prompt_len + lmd_beam_search_max_new_tokens(bs) > L)
        return lmd_fail(err, LMD_ERR_CACHE_FULL,
                        "prompt (%d tokens) + max_new_tokens (%d) exceed the context length %d",
                        prompt_len, lmd_beam_search_max_new_tokens(bs), L);
    const size_t NB = (size_t)(uint32_t)B;
    lmd_kvseq **beams = calloc(NB, sizeof *beams), **next = calloc(NB, sizeof *next);
    float *logits = malloc(NB * (size_t)V * sizeof *logits);
    int32_t *parents = malloc(NB * sizeof *parents), *tokens = malloc(NB * sizeof *tokens);
    int32_t *index = malloc(((size_t)prompt_len > NB ? (size_t)prompt_len : NB) * sizeof *index);
    int32_t *zeros = calloc((size_t)prompt_len, sizeof *zeros);
    lmd_status st = LMD_OK;
    int32_t peak = 0;
    if (!beams || !next || !logits || !parents || !tokens || !index || !zeros) {
        st = lmd_fail(err, LMD_ERR_NOMEM, "out of memory for a beam search of width %d", B);
        goto done;
    }
    /* prefill once; every beam starts from the same cache */
    if ((st = lmd_kvseq_init(&beams[0], pool, L, err))) goto done;
    int32_t last = prompt_len - 1;
    if ((st = lmd_model_forward(model, beams, 1, prompt, zeros, prompt_len, &last, 1, logits, err)))
        goto done;
    for (int32_t b = 1; b < B; b++) {
        if ((st = lmd_kvseq_fork(&beams[b], beams[0], err))) goto done;
        memcpy(logits + (int64_t)b * V, logits, (size_t)V * sizeof(float));
    }
    peak = blocks_in_use(pool);
    for (;;) {
        if ((st = lmd_beam_search_step(bs, logits, parents, tokens, err))) goto done;
        if (lmd_beam_search_done(bs)) break;
        /* new beam j continues old beam parents[j]: fork its block table, no key/value copy */
        for (int32_t j = 0; j < B; j++)
            if ((st = lmd_kvseq_fork(&next[j], beams[parents[j]], err))) goto done;
        for (int32_t b = 0; b < B; b++) {
            lmd_kvseq_free(beams[b]);
            beams[b] = next[b];
            next[b] = NULL;
            index[b] = b;
        }
        if ((st = lmd_model_forward(model, beams, B, tokens, index, B, index, B, logits, err)))
            goto done;
        int32_t used = blocks_in_use(pool);
        peak = used > peak ? used : peak;
        if (stop != NULL && stop(stop_ctx)) {
            st = lmd_fail(err, LMD_ERR_STOPPED, "the beam search was stopped at %d new tokens",
                          lmd_beam_search_length(bs));
            goto done;
        }
    }
done:
    for (int32_t b = 0; beams != NULL && b < B; b++) lmd_kvseq_free(beams[b]);
    for (int32_t b = 0; next != NULL && b < B; b++) lmd_kvseq_free(next[b]);
    free(beams);
    free(next);
    free(logits);
    free(parents);
    free(tokens);
    free(index);
    free(zeros);
    if (peak_kv_blocks) *peak_kv_blocks = peak;
    return st;
}
