/* decode.c -- the decoding loops over an lmdecode model (see decode.h).
 *
 * Glossary: n sequences of the generator, R of them still running, V the
 * vocabulary, B beams, L the model's context length. */
#include "decode.h"

#include <stdlib.h>
#include <string.h>

#include "contrastive.h"
#include "rng.h"
#include "speculative.h"

/* Prompts of a batch that begin alike (a system prompt, a chat template's preamble) share
 * the cache of their common beginning when it is at least this many tokens: it is computed
 * once, in a forward before the prompts' own tokens, and forked. */
#define SHARED_PREFIX_MIN 16

/* Which of a batch's distinct token lists share a beginning (find_shared_beginnings), each
 * array (n,) over the batch's lists. */
typedef struct {
    int32_t *ids;           /* where each list's cache goes (a sequence), -1 for one that takes no part */
    const int32_t **tokens; /* each list's tokens */
    int32_t *lengths;       /* and their number */
    int32_t *rep;           /* the list whose cache it forks (itself for a representative) */
    int32_t *shared;        /* first tokens its cache gets from the representative's, 0 if none */
} shared_beginnings;

// allocates the arrays for n lists; nonzero when out of memory (free anyway)
static int shared_beginnings_init(shared_beginnings *b, size_t n) {
    b->ids = malloc(n * sizeof *b->ids);
    b->tokens = malloc(n * sizeof *b->tokens);
    b->lengths = malloc(n * sizeof *b->lengths);
    b->rep = malloc(n * sizeof *b->rep);
    b->shared = malloc(n * sizeof *b->shared);
    return !b->ids || !b->tokens || !b->lengths || !b->rep || !b->shared;
}

static void shared_beginnings_free(shared_beginnings *b) {
    free(b->ids);
    free(b->tokens);
    free(b->lengths);
    free(b->rep);
    free(b->shared);
}

// list i of b: sequence k of gen (-1: no part)
static void take_generator_list(shared_beginnings *b, int32_t i, const lmd_generator *gen, int32_t k) {
    b->ids[i] = k;
    if (k >= 0) b->tokens[i] = lmd_generator_tokens(gen, k, &b->lengths[i]);
}

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
    lmd_kvseq **given;    /* (n,) lmd_decode_run_use_cache's caller-owned caches, or NULL */
    shared_beginnings begin; /* the prefill's leaders that begin alike */
    /* contrastive decoding (lmd_decode_run_set_amateur), NULL/0 otherwise: the amateur sees
     * every token the model sees, in caches of its own pool */
    lmd_model *amateur;
    lmd_kvpool *amateur_pool;
    double alpha, amateur_temperature;
    lmd_kvseq **amateur_seqs; /* (n,) as seqs */
    lmd_kvseq **amateur_batch; /* (n,) */
    float *amateur_logits;    /* (n, V); the generator's masks go on in place before scoring */
    float *scores;            /* (n, V) the contrastive scores the generator draws from */
    float *masked_logits;     /* (n, V) the model's logits with the generator's masks */
};

/* Lets go of sequence k's cache: frees it, unless the caller gave it (lmd_decode_run_use_cache). */
static void drop_cache(lmd_decode_run *run, int32_t k) {
    if (run->seqs[k] != run->given[k]) lmd_kvseq_free(run->seqs[k]);
    run->seqs[k] = NULL;
}

void lmd_decode_run_free(lmd_decode_run *run) {
    if (run == NULL) return;
    for (int32_t k = 0; run->seqs != NULL && run->given != NULL && k < run->n; k++) drop_cache(run, k);
    free(run->seqs);
    free(run->logits);
    free(run->ids);
    free(run->batch);
    free(run->tokens);
    free(run->token_seq);
    free(run->logit_index);
    free(run->leader);
    free(run->given);
    shared_beginnings_free(&run->begin);
    for (int32_t k = 0; run->amateur_seqs != NULL && k < run->n; k++) lmd_kvseq_free(run->amateur_seqs[k]);
    free(run->amateur_seqs);
    free(run->amateur_batch);
    free(run->amateur_logits);
    free(run->scores);
    free(run->masked_logits);
    free(run);
}

lmd_status lmd_decode_run_set_amateur(lmd_decode_run *run, lmd_model *amateur, lmd_kvpool *amateur_pool,
                                      double alpha, double amateur_temperature, lmd_error *err) {
    if (run->prefilled || run->amateur != NULL)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "the amateur must be set once, before the first step");
    for (int32_t k = 0; k < run->n; k++)
        if (run->given[k] != NULL)
            return lmd_fail(err, LMD_ERR_INVALID_ARG, "an amateur does not combine with a given cache");
    if (amateur == NULL || amateur_pool == NULL || amateur_pool == run->pool)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "the amateur needs a model and a pool of its own");
    if (amateur->config.vocab_size != run->vocab)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "the amateur's vocabulary has %d tokens but the model's %d",
                        amateur->config.vocab_size, run->vocab);
    lmd_status st = lmd_contrastive_check(alpha, amateur_temperature, err);
    if (st != LMD_OK) return st;
    const size_t N = (size_t)(uint32_t)run->n, V = (size_t)(uint32_t)run->vocab;
    run->amateur_seqs = calloc(N, sizeof *run->amateur_seqs);
    run->amateur_batch = malloc(N * sizeof *run->amateur_batch);
    run->amateur_logits = malloc(N * V * sizeof *run->amateur_logits);
    run->scores = malloc(N * V * sizeof *run->scores);
    run->masked_logits = malloc(N * V * sizeof *run->masked_logits);
    if (!run->amateur_seqs || !run->amateur_batch || !run->amateur_logits || !run->scores || !run->masked_logits)
        return lmd_fail(err, LMD_ERR_NOMEM, "out of memory for an amateur of %d sequences", run->n);
    run->amateur = amateur;
    run->amateur_pool = amateur_pool;
    run->alpha = alpha;
    run->amateur_temperature = amateur_temperature;
    return LMD_OK;
}

lmd_status lmd_decode_run_use_cache(lmd_decode_run *run, int32_t k, lmd_kvseq *cache, lmd_error *err) {
    if (run->prefilled)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "a cache must be given before the first step");
    if (run->amateur != NULL)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "a given cache does not combine with an amateur");
    if (k < 0 || k >= run->n)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "sequence %d is outside [0, %d)", k, run->n);
    if (cache == NULL || cache->pool != run->pool)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "the cache of sequence %d must belong to the run's pool", k);
    for (int32_t j = 0; j < run->n; j++)
        if (j != k && run->given[j] == cache)
            return lmd_fail(err, LMD_ERR_INVALID_ARG, "one cache is given to sequences %d and %d", j, k);
    const int32_t prompt_len = lmd_generator_prompt_length(run->gen, k);
    if (cache->len >= prompt_len)
        return lmd_fail(err, LMD_ERR_INVALID_ARG,
                        "the cache of sequence %d holds %d positions but its prompt has %d tokens: at least one "
                        "must be left to feed", k, cache->len, prompt_len);
    if (cache->max_len < run->model->config.context_length)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "the cache of sequence %d may hold %d positions, fewer than the "
                        "context length %d", k, cache->max_len, run->model->config.context_length);
    run->given[k] = cache;
    return LMD_OK;
}

/* A step that failed on logits a model computed (a NaN or +inf among them): the message
 * says whose they were, since the caller passed no logits of their own. */
static lmd_status from_model_logits(lmd_status st, const char *whose, lmd_error *err) {
    if (st == LMD_OK || err == NULL) return st;
    const lmd_error inner = *err;
    return lmd_fail(err, st, "%s logits: %.220s", whose, inner.msg);
}

/* the context length the run decodes within: the model's, or the shorter of two */
static int32_t run_context_length(const lmd_decode_run *run) {
    const int32_t L = run->model->config.context_length;
    return run->amateur != NULL && run->amateur->config.context_length < L ? run->amateur->config.context_length : L;
}

/* Every prompt of gen holds at least one token and fits model's context; *total receives
 * their token count. */
/* Running sequences among ids[0:n] whose tokens now fill the context length L end with their
 * last token (the cache holds all but the last, so none can follow): the step that made that
 * token says the sequence is over, as a stream's last chunk must. */
static void finish_at_context_length(lmd_generator *gen, const int32_t *ids, int32_t n, int32_t L) {
    for (int32_t i = 0; i < n; i++) {
        int32_t length;
        lmd_generator_tokens(gen, ids[i], &length);
        if (length >= L && lmd_generator_finish_reason(gen, ids[i]) == LMD_RUNNING)
            lmd_generator_finish(gen, ids[i], LMD_FINISH_LENGTH);
    }
}

static lmd_status check_prompts(const lmd_generator *gen, const lmd_model *model, int64_t *total, lmd_error *err) {
    *total = 0;
    for (int32_t k = 0; k < lmd_generator_n_seqs(gen); k++) {
        int32_t len = lmd_generator_prompt_length(gen, k);
        if (len < 1)
            return lmd_fail(err, LMD_ERR_INVALID_ARG,
                            "prompt %d is empty: a model needs at least one token (e.g. BOS)", k);
        if (len > model->config.context_length)
            return lmd_fail(err, LMD_ERR_CACHE_FULL,
                            "prompt %d has %d tokens but the model's context length is %d", k, len,
                            model->config.context_length);
        *total += len;
    }
    return LMD_OK;
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
    int64_t prompt_tokens;
    lmd_status st = check_prompts(gen, model, &prompt_tokens, err);
    if (st != LMD_OK) return st;
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
    run->given = calloc(N, sizeof *run->given);
    if (!run->seqs || !run->logits || !run->ids || !run->batch || !run->tokens ||
        !run->token_seq || !run->logit_index || !run->leader || !run->given ||
        shared_beginnings_init(&run->begin, N)) {
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

/* Frees the caches of sequences that have finished, returning their blocks to the pool (a
 * given cache stays the caller's). */
static void release_finished(lmd_decode_run *run) {
    for (int32_t k = 0; k < run->n; k++)
        if (run->seqs[k] != NULL && lmd_generator_finish_reason(run->gen, k) != LMD_RUNNING) {
            drop_cache(run, k);
            if (run->amateur_seqs != NULL) {
                lmd_kvseq_free(run->amateur_seqs[k]);
                run->amateur_seqs[k] = NULL;
            }
        }
}

// how many first tokens a and b share, at most limit
static int32_t common_length(const int32_t *a, const int32_t *b, int32_t limit) {
    int32_t same = 0;
    while (same < limit && a[same] == b[same]) same++;
    return same;
}

// for the n lists of b (none where ids[i] < 0): list i joins the first earlier list that
// joined none itself (its representative) with which it shares SHARED_PREFIX_MIN or more
// first tokens; the lists of a representative then share the beginning they all have, each
// keeping at least its last token (whose logits a step needs)
static void find_shared_beginnings(shared_beginnings *b, int32_t n) {
    for (int32_t i = 0; i < n; i++) {
        b->rep[i] = i, b->shared[i] = 0;
        if (b->ids[i] < 0) continue;
        for (int32_t r = 0; r < i; r++) {
            if (b->ids[r] < 0 || b->rep[r] != r) continue;
            const int32_t limit = (b->lengths[i] < b->lengths[r] ? b->lengths[i] : b->lengths[r]) - 1;
            const int32_t common = common_length(b->tokens[i], b->tokens[r], limit);
            if (common < SHARED_PREFIX_MIN) continue;
            b->rep[i] = r;
            b->shared[r] = b->shared[r] == 0 || common < b->shared[r] ? common : b->shared[r];
            break;
        }
    }
    for (int32_t i = 0; i < n; i++) b->shared[i] = b->shared[b->rep[i]];
}

// the caches (into seqs[ids[i]]) of the n lists that find_shared_beginnings grouped: a
// representative's starts empty and, when lists joined it, gets the beginning they share,
// every representative's in one forward without logits; a joined list's forks its
// representative's. batch (n,), tokens and token_seq (the beginnings' tokens) scratch.
static lmd_status caches_from_shared_beginnings(const shared_beginnings *b, int32_t n,
                                                lmd_model *model, lmd_kvpool *pool, lmd_kvseq **seqs,
                                                lmd_kvseq **batch, int32_t *tokens, int32_t *token_seq,
                                                lmd_error *err) {
    lmd_status st;
    int32_t nb = 0, n_tokens = 0;
    for (int32_t i = 0; i < n; i++) {
        const int32_t k = b->ids[i];
        if (k < 0 || b->rep[i] != i) continue;
        if ((st = lmd_kvseq_init(&seqs[k], pool, model->config.context_length, err))) return st;
        if (b->shared[i] == 0) continue;
        memcpy(tokens + n_tokens, b->tokens[i], (size_t)b->shared[i] * sizeof(int32_t));
        for (int32_t t = 0; t < b->shared[i]; t++) token_seq[n_tokens + t] = nb;
        n_tokens += b->shared[i];
        batch[nb++] = seqs[k];
    }
    if (nb > 0 && (st = lmd_model_forward(model, batch, nb, tokens, token_seq, n_tokens, NULL, 0, NULL, err)))
        return st;
    for (int32_t i = 0; i < n; i++)
        if (b->ids[i] >= 0 && b->rep[i] != i && (st = lmd_kvseq_fork(&seqs[b->ids[i]], seqs[b->ids[b->rep[i]]], err)))
            return st;
    return LMD_OK;
}

// the caches of the leaders (of the model and of an amateur): a leader that brought a cache
// keeps it; the others' start with the beginnings they share (caches_from_shared_beginnings)
static lmd_status leader_caches(lmd_decode_run *run, int32_t R, lmd_error *err) {
    lmd_status st;
    for (int32_t i = 0; i < R; i++) {
        const int32_t k = run->ids[i];
        take_generator_list(&run->begin, i, run->gen, run->leader[i] == i && run->given[k] == NULL ? k : -1);
        if (run->leader[i] == i && run->given[k] != NULL)
            run->seqs[k] = run->given[k]; /* its cached positions are not fed again */
    }
    find_shared_beginnings(&run->begin, R);
    if ((st = caches_from_shared_beginnings(&run->begin, R, run->model, run->pool, run->seqs, run->batch, run->tokens,
                                            run->token_seq, err)))
        return st;
    if (run->amateur != NULL)
        return caches_from_shared_beginnings(&run->begin, R, run->amateur, run->amateur_pool, run->amateur_seqs,
                                             run->amateur_batch, run->tokens, run->token_seq, err);
    return LMD_OK;
}

/* First step: one forward over every distinct prompt of the running
 * sequences (ids[0..R), ascending), after what their caches hold (a given cache's
 * positions, or a beginning they all share: leader_caches); a sequence whose prompt equals
 * the previous one's forks its cache. Row i of run->logits gets sequence ids[i]. */
static lmd_status prefill(lmd_decode_run *run, int32_t R, lmd_error *err) {
    lmd_status st;
    const int32_t V = run->vocab;
    int32_t n_leaders = 0, n_tokens = 0;
    /* caches left by an earlier call whose prefill failed (e.g. a full pool; a given cache
     * is as it was, lmd_model_forward having failed before writing) */
    for (int32_t k = 0; k < run->n; k++) {
        drop_cache(run, k);
        if (run->amateur_seqs != NULL) {
            lmd_kvseq_free(run->amateur_seqs[k]);
            run->amateur_seqs[k] = NULL;
        }
    }
    for (int32_t i = 0; i < R; i++) {
        const int32_t k = run->ids[i];
        run->leader[i] = i > 0 && run->given[k] == NULL && same_prompt(run->gen, k, run->ids[i - 1])
                             ? run->leader[i - 1]
                             : i;
    }
    if ((st = leader_caches(run, R, err))) return st;
    for (int32_t i = 0; i < R; i++) {
        int32_t k = run->ids[i];
        if (run->leader[i] != i) continue;
        if (run->amateur != NULL) run->amateur_batch[n_leaders] = run->amateur_seqs[k];
        const int32_t cached = run->seqs[k]->len, len = lmd_generator_prompt_length(run->gen, k) - cached;
        memcpy(run->tokens + n_tokens, lmd_generator_tokens(run->gen, k, NULL) + cached,
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
    float *amateur_rows = run->amateur_logits + (int64_t)(R - n_leaders) * V;
    if (run->amateur != NULL &&
        (st = lmd_model_forward(run->amateur, run->amateur_batch, n_leaders, run->tokens, run->token_seq, n_tokens,
                                run->logit_index, n_leaders, amateur_rows, err)))
        return st;
    int32_t row = 0;
    for (int32_t i = 0; i < R; i++) {
        int32_t k = run->ids[i];
        if (run->leader[i] != i &&
            (st = lmd_kvseq_fork(&run->seqs[k], run->seqs[run->ids[run->leader[i]]], err)))
            return st;
        if (run->amateur != NULL && run->leader[i] != i &&
            (st = lmd_kvseq_fork(&run->amateur_seqs[k], run->amateur_seqs[run->ids[run->leader[i]]], err)))
            return st;
        if (run->leader[i] == i) row++;
        memmove(run->logits + (int64_t)i * V, leader_rows + (int64_t)(row - 1) * V,
                (size_t)V * sizeof(float));
        if (run->amateur != NULL)
            memmove(run->amateur_logits + (int64_t)i * V, amateur_rows + (int64_t)(row - 1) * V,
                    (size_t)V * sizeof(float));
    }
    run->prefilled = 1;
    return LMD_OK;
}

lmd_status lmd_decode_run_steps(lmd_decode_run *run, lmd_sampler *const *samplers, int n_samplers,
                                int32_t max_steps, int32_t *last_ids, int32_t *last_tokens,
                                int32_t *n_last, lmd_stop_check stop, void *stop_ctx, lmd_error *err) {
    lmd_status st;
    const int32_t L = run_context_length(run);
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
                if (run->amateur != NULL) run->amateur_batch[i] = run->amateur_seqs[k];
            }
            if ((st = lmd_model_forward(run->model, run->batch, R, run->tokens, run->token_seq, R,
                                        run->logit_index, R, run->logits, err)))
                return st;
            if (run->amateur != NULL &&
                (st = lmd_model_forward(run->amateur, run->amateur_batch, R, run->tokens, run->token_seq, R,
                                        run->logit_index, R, run->amateur_logits, err))) {
                for (int32_t i = 0; i < R; i++) /* the model has seen the token: back, for a retry */
                    lmd_kvseq_truncate(run->batch[i], run->batch[i]->len - 1, NULL);
                return st;
            }
        }
        int32_t R = lmd_generator_running(run->gen, run->ids);
        if (run->amateur != NULL) {
            /* both models' rows get the generator's masks first (allowed, banned, stops before
             * min_new_tokens), so the plausibility cut is taken among the tokens that may come */
            for (int32_t i = 0; i < R; i++) {
                const int64_t row = (int64_t)i * run->vocab;
                memcpy(run->masked_logits + row, run->logits + row, (size_t)run->vocab * sizeof(float));
                lmd_generator_mask_row(run->gen, run->ids[i], run->masked_logits + row);
                lmd_generator_mask_row(run->gen, run->ids[i], run->amateur_logits + row);
                if ((st = lmd_contrastive_scores(run->masked_logits + row, run->amateur_logits + row, run->vocab,
                                                 run->alpha, run->amateur_temperature, run->scores + row, err)))
                    return st;
            }
            st = lmd_generator_step_scored(run->gen, samplers, n_samplers, run->scores, run->logits, run->tokens, err);
        } else {
            st = from_model_logits(lmd_generator_step(run->gen, samplers, n_samplers, run->logits, run->tokens, err),
                                   "the model's", err);
        }
        if (st != LMD_OK) return st;
        finish_at_context_length(run->gen, run->ids, R, L);
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
    return lmd_decode_beam_searches(model, pool, &bs, 1, &prompt, &prompt_len, peak_kv_blocks, NULL, NULL, stop,
                                    stop_ctx, err);
}

// the searches' widths (each beam's offset first (S + 1,): search s holds beams first[s] ..
// first[s+1]) once every search and prompt is valid
static lmd_status check_beam_searches(const lmd_model *model, lmd_beam_search *const *searches, int32_t S,
                                      const int32_t *const *prompts, const int32_t *prompt_lens, int32_t *first,
                                      lmd_error *err) {
    const int32_t L = model->config.context_length;
    first[0] = 0;
    for (int32_t s = 0; s < S; s++) {
        if (searches[s] == NULL || prompts[s] == NULL)
            return lmd_fail(err, LMD_ERR_INVALID_ARG, "beam search %d or its prompt is NULL", s);
        for (int32_t o = 0; o < s; o++)
            if (searches[o] == searches[s])
                return lmd_fail(err, LMD_ERR_INVALID_ARG, "beam searches %d and %d are one search", o, s);
        if (lmd_beam_search_vocab(searches[s]) != model->config.vocab_size)
            return lmd_fail(err, LMD_ERR_INVALID_ARG,
                            "beam search %d ranks %d tokens but the model's vocabulary has %d", s,
                            lmd_beam_search_vocab(searches[s]), model->config.vocab_size);
        if (prompt_lens[s] < 1)
            return lmd_fail(err, LMD_ERR_INVALID_ARG, "prompt %d is empty: a model needs at least one token", s);
        if ((int64_t)prompt_lens[s] + lmd_beam_search_max_new_tokens(searches[s]) > L)
            return lmd_fail(err, LMD_ERR_CACHE_FULL,
                            "prompt %d (%d tokens) + max_new_tokens (%d) exceed the context length %d", s,
                            prompt_lens[s], lmd_beam_search_max_new_tokens(searches[s]), L);
        if ((int64_t)first[s] + lmd_beam_search_width(searches[s]) > INT32_MAX / 2)
            return lmd_fail(err, LMD_ERR_INVALID_ARG, "the beam searches hold too many beams");
        first[s + 1] = first[s] + lmd_beam_search_width(searches[s]);
    }
    return LMD_OK;
}

lmd_status lmd_decode_beam_searches(lmd_model *model, lmd_kvpool *pool, lmd_beam_search *const *searches,
                                    int32_t n_searches, const int32_t *const *prompts, const int32_t *prompt_lens,
                                    int32_t *peak_kv_blocks, lmd_beam_hook before_step, void *hook_ctx,
                                    lmd_stop_check stop, void *stop_ctx, lmd_error *err) {
    const int32_t S = n_searches, V = model->config.vocab_size;
    if (peak_kv_blocks) *peak_kv_blocks = 0;
    if (S < 1) return lmd_fail(err, LMD_ERR_INVALID_ARG, "n_searches (=%d) must be >= 1", S);
    int32_t *first = malloc(((size_t)S + 1) * sizeof *first);
    if (first == NULL) return lmd_fail(err, LMD_ERR_NOMEM, "out of memory for %d beam searches", S);
    lmd_status st = check_beam_searches(model, searches, S, prompts, prompt_lens, first, err);
    if (st != LMD_OK) {
        free(first);
        return st;
    }
    int64_t prompt_tokens = 0;
    int32_t widest = 0;
    for (int32_t s = 0; s < S; s++) {
        prompt_tokens += prompt_lens[s];
        widest = first[s + 1] - first[s] > widest ? first[s + 1] - first[s] : widest;
    }
    if (prompt_tokens > INT32_MAX) {
        free(first);
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "the prompts hold more than 2^31 tokens");
    }
    /* T beams in all; row[s] the first of search s's logits rows in this step's forward, -1 once
     * it is done */
    const int32_t T = first[S];
    const size_t NT = (size_t)T, NS = (size_t)S, slots = (size_t)prompt_tokens > NT ? (size_t)prompt_tokens : NT;
    lmd_kvseq **beams = calloc(NT, sizeof *beams), **next = calloc(NT, sizeof *next);
    lmd_kvseq **batch = malloc(NT * sizeof *batch);
    float *logits = malloc(NT * (size_t)V * sizeof *logits);
    int32_t *parents = malloc((size_t)widest * sizeof *parents), *drawn = malloc(NT * sizeof *drawn);
    int32_t *tokens = malloc(slots * sizeof *tokens), *token_seq = malloc(slots * sizeof *token_seq);
    int32_t *logit_index = malloc(NT * sizeof *logit_index), *row = malloc(NS * sizeof *row);
    shared_beginnings begin;
    int32_t peak = 0, steps = 0;
    const int no_begin = shared_beginnings_init(&begin, NS);
    if (!beams || !next || !batch || !logits || !parents || !drawn || !tokens || !token_seq || !logit_index || !row ||
        no_begin) {
        st = lmd_fail(err, LMD_ERR_NOMEM, "out of memory for %d beam searches of %d beams in all", S, T);
        goto done;
    }
    /* prefill: prompts that begin alike start from the caches of the beginnings they share (as
     * a batch of lmd_decode_run's prompts does), then one forward feeds every prompt's rest; a
     * search's beams all start from its prompt's cache */
    for (int32_t s = 0; s < S; s++) begin.ids[s] = first[s], begin.tokens[s] = prompts[s], begin.lengths[s] = prompt_lens[s];
    find_shared_beginnings(&begin, S);
    if ((st = caches_from_shared_beginnings(&begin, S, model, pool, beams, batch, tokens, token_seq, err))) goto done;
    int32_t n_tokens = 0;
    for (int32_t s = 0; s < S; s++) {
        batch[s] = beams[first[s]];
        const int32_t cached = batch[s]->len, rest = prompt_lens[s] - cached;
        memcpy(tokens + n_tokens, prompts[s] + cached, (size_t)rest * sizeof(int32_t));
        for (int32_t t = 0; t < rest; t++) token_seq[n_tokens + t] = s;
        n_tokens += rest;
        logit_index[s] = n_tokens - 1;
    }
    if ((st = lmd_model_forward(model, batch, S, tokens, token_seq, n_tokens, logit_index, S, logits, err)))
        goto done;
    for (int32_t s = S - 1; s >= 0; s--) { /* prompt s's row to its first beam's (first[s] >= s) */
        memmove(logits + (int64_t)first[s] * V, logits + (int64_t)s * V, (size_t)V * sizeof(float));
        for (int32_t b = first[s] + 1; b < first[s + 1]; b++) {
            if ((st = lmd_kvseq_fork(&beams[b], beams[first[s]], err))) goto done;
            memcpy(logits + (int64_t)b * V, logits + (int64_t)first[s] * V, (size_t)V * sizeof(float));
        }
        row[s] = first[s];
    }
    peak = blocks_in_use(pool);
    for (;;) {
        int32_t n_live = 0; /* beams of the next forward, search after search */
        for (int32_t s = 0; s < S; s++) {
            if (row[s] < 0) continue;
            lmd_beam_search *bs = searches[s];
            if (before_step != NULL && (st = before_step(hook_ctx, s, bs, err))) goto done;
            st = lmd_beam_search_step(bs, logits + (int64_t)row[s] * V, parents, drawn + first[s], err);
            if ((st = from_model_logits(st, "the model's", err))) goto done;
            const int32_t B = first[s + 1] - first[s];
            lmd_kvseq **own = beams + first[s], **forked = next + first[s];
            if (lmd_beam_search_done(bs)) { /* its blocks go back to the pool */
                for (int32_t b = 0; b < B; b++) {
                    lmd_kvseq_free(own[b]);
                    own[b] = NULL;
                }
                row[s] = -1;
                continue;
            }
            /* new beam j continues old beam parents[j]: fork its block table, no key/value copy */
            for (int32_t j = 0; j < B; j++)
                if ((st = lmd_kvseq_fork(&forked[j], own[parents[j]], err))) goto done;
            row[s] = n_live;
            for (int32_t b = 0; b < B; b++) {
                lmd_kvseq_free(own[b]);
                own[b] = forked[b];
                forked[b] = NULL;
                batch[n_live] = own[b];
                tokens[n_live] = drawn[first[s] + b];
                token_seq[n_live] = logit_index[n_live] = n_live;
                n_live++;
            }
        }
        if (n_live == 0) break;
        if ((st = lmd_model_forward(model, batch, n_live, tokens, token_seq, n_live, logit_index, n_live, logits, err)))
            goto done;
        steps++;
        int32_t used = blocks_in_use(pool);
        peak = used > peak ? used : peak;
        if (stop != NULL && stop(stop_ctx)) {
            st = lmd_fail(err, LMD_ERR_STOPPED, "the beam search was stopped after %d steps", steps);
            goto done;
        }
    }
done:
    for (int32_t b = 0; beams != NULL && b < T; b++) lmd_kvseq_free(beams[b]);
    for (int32_t b = 0; next != NULL && b < T; b++) lmd_kvseq_free(next[b]);
    free(first);
    free(beams);
    free(next);
    free(batch);
    free(logits);
    free(parents);
    free(drawn);
    free(tokens);
    free(token_seq);
    free(logit_index);
    free(row);
    shared_beginnings_free(&begin);
    if (peak_kv_blocks) *peak_kv_blocks = peak;
    return st;
}

/* ------------------------------------------------------------------ */
/* speculative decoding                                                 */
/* ------------------------------------------------------------------ */

/* Glossary: K the most draft tokens a round proposes (n_draft), k_i the number sequence i
 * proposes this round, L_k the tokens sequence k holds (prompt + generated), t its
 * generated count at the round's start. Invariant between rounds: the target's cache
 * holds every token of a running sequence but its last (tokens[0:L-1]); the draft's
 * holds a prefix of that (tokens[0:draft_len]). */
struct lmd_speculative_run {
    lmd_model *target, *draft;         /* borrowed */
    lmd_kvpool *target_pool, *draft_pool;
    lmd_generator *gen;
    int32_t n, vocab, n_draft;
    lmd_kvseq **target_seqs, **draft_seqs; /* (n,) NULL before a sequence's first round or once finished */
    int64_t *proposed, *accepted;          /* (n,) draft tokens proposed and kept so far */
    /* one round's scratch */
    int32_t *ids;                          /* (n,) running sequences */
    int32_t *n_proposing;                  /* (n,) k_i */
    int32_t *drafts;                       /* (n, K) the proposed tokens */
    float *draft_logprobs;                 /* (n, K, V) the distributions they were drawn from */
    float *step_logits;                    /* (n, V) one draft step's raw logits */
    float *step_logprobs;                  /* (n, V) their processed log-probs */
    float *target_logits;                  /* (n (K + 1), V) the verification's raw logits */
    float *target_logprobs;                /* (n (K + 1), V) processed */
    lmd_row_inputs *inputs;                /* (n (K + 1),) */
    lmd_sampling_params *params;           /* (n (K + 1),) */
    double *coins;                         /* (n (K + 1),) the coins of one batch of draws */
    int32_t *drawn;                        /* (n (K + 1),) */
    lmd_kvseq **batch;                     /* (n,) */
    int32_t *tokens, *token_seq;           /* (all prompt tokens + n (K + 1),) one forward's tokens */
    int32_t *logit_index;                  /* (n (K + 1),) */
    int32_t *row_start;                    /* (n,) each running sequence's first verification row */
    int32_t *leader;                       /* (n,) the sequence whose new cache sequence k forks, or k */
    shared_beginnings begin;               /* the new caches' distinct lists that begin alike */
};

void lmd_speculative_run_free(lmd_speculative_run *run) {
    if (run == NULL) return;
    for (int32_t k = 0; k < run->n; k++) {
        if (run->target_seqs) lmd_kvseq_free(run->target_seqs[k]);
        if (run->draft_seqs) lmd_kvseq_free(run->draft_seqs[k]);
    }
    free(run->target_seqs);
    free(run->draft_seqs);
    free(run->proposed);
    free(run->accepted);
    free(run->ids);
    free(run->n_proposing);
    free(run->drafts);
    free(run->draft_logprobs);
    free(run->step_logits);
    free(run->step_logprobs);
    free(run->target_logits);
    free(run->target_logprobs);
    free(run->inputs);
    free(run->params);
    free(run->coins);
    free(run->drawn);
    free(run->batch);
    free(run->tokens);
    free(run->token_seq);
    free(run->logit_index);
    free(run->row_start);
    free(run->leader);
    shared_beginnings_free(&run->begin);
    free(run);
}

lmd_status lmd_speculative_run_init(lmd_speculative_run **out, lmd_model *target, lmd_kvpool *target_pool,
                                    lmd_model *draft, lmd_kvpool *draft_pool, lmd_generator *gen,
                                    int32_t n_draft, lmd_error *err) {
    *out = NULL;
    if (target == NULL || target_pool == NULL || draft == NULL || draft_pool == NULL || gen == NULL)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "models, pools and generator must not be NULL");
    if (target_pool == draft_pool)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "the target and the draft need pools of their own");
    if (n_draft < 1 || n_draft > 64)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "num_draft_tokens (=%d) must be in [1, 64]", n_draft);
    const int32_t n = lmd_generator_n_seqs(gen), V = lmd_generator_vocab(gen);
    if (V != target->config.vocab_size || V != draft->config.vocab_size)
        return lmd_fail(err, LMD_ERR_INVALID_ARG,
                        "the generator samples %d tokens but the target's vocabulary has %d and the draft's %d", V,
                        target->config.vocab_size, draft->config.vocab_size);
    int64_t prompt_tokens;
    lmd_status st = check_prompts(gen, target, &prompt_tokens, err);
    if (st != LMD_OK) return st;
    const int64_t rows = (int64_t)n * (n_draft + 1);
    if (prompt_tokens + rows > INT32_MAX || rows * V > ((int64_t)1 << 40))
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "%d sequences of %d draft tokens are too many", n, n_draft);
    lmd_speculative_run *run = calloc(1, sizeof *run);
    if (run == NULL) return lmd_fail(err, LMD_ERR_NOMEM, "out of memory for a speculative run");
    const size_t N = (size_t)(uint32_t)n, K = (size_t)(uint32_t)n_draft, R = (size_t)rows,
                 VV = (size_t)(uint32_t)V, slots = (size_t)(prompt_tokens + rows);
    run->target = target;
    run->draft = draft;
    run->target_pool = target_pool;
    run->draft_pool = draft_pool;
    run->gen = gen;
    run->n = n;
    run->vocab = V;
    run->n_draft = n_draft;
    run->target_seqs = calloc(N, sizeof *run->target_seqs);
    run->draft_seqs = calloc(N, sizeof *run->draft_seqs);
    run->proposed = calloc(N, sizeof *run->proposed);
    run->accepted = calloc(N, sizeof *run->accepted);
    run->ids = malloc(N * sizeof *run->ids);
    run->n_proposing = malloc(N * sizeof *run->n_proposing);
    run->drafts = malloc(N * K * sizeof *run->drafts);
    run->draft_logprobs = malloc(N * K * VV * sizeof *run->draft_logprobs);
    run->step_logits = malloc(N * VV * sizeof *run->step_logits);
    run->step_logprobs = malloc(N * VV * sizeof *run->step_logprobs);
    run->target_logits = malloc(R * VV * sizeof *run->target_logits);
    run->target_logprobs = malloc(R * VV * sizeof *run->target_logprobs);
    run->inputs = malloc(R * sizeof *run->inputs);
    run->params = malloc(R * sizeof *run->params);
    run->coins = malloc(R * sizeof *run->coins);
    run->drawn = malloc(R * sizeof *run->drawn);
    run->batch = malloc(N * sizeof *run->batch);
    run->tokens = malloc(slots * sizeof *run->tokens);
    run->token_seq = malloc(slots * sizeof *run->token_seq);
    run->logit_index = malloc(R * sizeof *run->logit_index);
    run->row_start = malloc(N * sizeof *run->row_start);
    run->leader = malloc(N * sizeof *run->leader);
    if (!run->target_seqs || !run->draft_seqs || !run->proposed || !run->accepted || !run->ids ||
        !run->n_proposing || !run->drafts || !run->draft_logprobs || !run->step_logits || !run->step_logprobs ||
        !run->target_logits || !run->target_logprobs || !run->inputs || !run->params || !run->coins ||
        !run->drawn || !run->batch || !run->tokens || !run->token_seq || !run->logit_index || !run->row_start ||
        !run->leader || shared_beginnings_init(&run->begin, N)) {
        lmd_speculative_run_free(run);
        return lmd_fail(err, LMD_ERR_NOMEM, "out of memory for %d sequences of %d draft tokens", n, n_draft);
    }
    *out = run;
    return LMD_OK;
}

void lmd_speculative_run_counts(const lmd_speculative_run *run, int32_t k, int64_t *proposed, int64_t *accepted) {
    *proposed = k >= 0 && k < run->n ? run->proposed[k] : 0;
    *accepted = k >= 0 && k < run->n ? run->accepted[k] : 0;
}

static void release_finished_pairs(lmd_speculative_run *run) {
    for (int32_t k = 0; k < run->n; k++)
        if (lmd_generator_finish_reason(run->gen, k) != LMD_RUNNING) {
            lmd_kvseq_free(run->target_seqs[k]);
            lmd_kvseq_free(run->draft_seqs[k]);
            run->target_seqs[k] = run->draft_seqs[k] = NULL;
        }
}

/* Gives every running sequence that needs a cache of one model and has none (in its first
 * round: the target's always, the draft's when it proposes) a cache holding all its tokens
 * but the last, which the round feeds. A sequence whose tokens equal the previous new
 * sequence's (n samples of one prompt) forks that cache, as lmd_decode_run's prefill does;
 * the distinct lists start from the beginnings they share (caches_from_shared_beginnings),
 * then one forward without logits covers the rest of them. */
static lmd_status prefill_new_caches(lmd_speculative_run *run, int32_t R, int draft, lmd_error *err) {
    lmd_status st;
    lmd_model *model = draft ? run->draft : run->target;
    lmd_kvpool *pool = draft ? run->draft_pool : run->target_pool;
    lmd_kvseq **seqs = draft ? run->draft_seqs : run->target_seqs;
    int32_t nb = 0, n_tokens = 0, previous = -1;
    for (int32_t i = 0; i < R; i++) { /* the leaders: distinct lists */
        const int32_t k = run->ids[i];
        run->leader[k] = -1;
        run->begin.ids[i] = -1; /* no part, unless a leader below */
        if (seqs[k] != NULL || (draft && run->n_proposing[i] == 0)) continue;
        int32_t length, previous_length;
        const int32_t *all = lmd_generator_tokens(run->gen, k, &length);
        if (previous >= 0) {
            const int32_t *other = lmd_generator_tokens(run->gen, previous, &previous_length);
            if (previous_length == length && memcmp(all, other, (size_t)length * sizeof(int32_t)) == 0) {
                run->leader[k] = run->leader[previous];
                previous = k;
                continue;
            }
        }
        run->leader[k] = previous = k;
        take_generator_list(&run->begin, i, run->gen, k);
    }
    find_shared_beginnings(&run->begin, R);
    if ((st = caches_from_shared_beginnings(&run->begin, R, model, pool, seqs, run->batch, run->tokens, run->token_seq,
                                            err)))
        return st;
    for (int32_t i = 0; i < R; i++) { /* what each leader's cache lacks, but the last token */
        const int32_t k = run->begin.ids[i];
        if (k < 0) continue;
        int32_t length;
        const int32_t *all = lmd_generator_tokens(run->gen, k, &length);
        if (length - 1 <= seqs[k]->len) continue;
        for (int32_t p = seqs[k]->len; p < length - 1; p++) {
            run->tokens[n_tokens] = all[p];
            run->token_seq[n_tokens++] = nb;
        }
        run->batch[nb++] = seqs[k];
    }
    if (nb > 0 && (st = lmd_model_forward(model, run->batch, nb, run->tokens, run->token_seq, n_tokens, NULL, 0,
                                          NULL, err)))
        return st;
    for (int32_t i = 0; i < R; i++) {
        const int32_t k = run->ids[i];
        if (run->leader[k] >= 0 && run->leader[k] != k && (st = lmd_kvseq_fork(&seqs[k], seqs[run->leader[k]], err)))
            return st;
    }
    return LMD_OK;
}

/* The draft proposes k_i tokens for each running sequence i: step j feeds what its cache
 * lacks (the tokens it has not seen, then its own proposals) and draws proposal j from its
 * processed distribution with the coin (seed, k, t + j, 1). */
static lmd_status draft_round(lmd_speculative_run *run, lmd_sampler *const *samplers, int n_samplers, int32_t R,
                              lmd_error *err) {
    lmd_status st;
    const int32_t V = run->vocab, K = run->n_draft;
    const uint64_t seed = lmd_generator_seed(run->gen);
    for (int32_t j = 0;; j++) {
        int32_t nb = 0, n_tokens = 0;
        for (int32_t i = 0; i < R; i++) {
            const int32_t k = run->ids[i];
            if (run->n_proposing[i] <= j) continue;
            int32_t length;
            const int32_t *all = lmd_generator_tokens(run->gen, k, &length);
            if (j == 0) {
                for (int32_t p = run->draft_seqs[k]->len; p < length; p++) {
                    run->tokens[n_tokens] = all[p];
                    run->token_seq[n_tokens++] = nb;
                }
            } else {
                run->tokens[n_tokens] = run->drafts[(int64_t)i * K + j - 1];
                run->token_seq[n_tokens++] = nb;
            }
            run->batch[nb] = run->draft_seqs[k];
            run->logit_index[nb] = n_tokens - 1;
            lmd_generator_row(run->gen, k, j, &run->inputs[nb], &run->params[nb]);
            run->coins[nb] = lmd_rng_uniform(seed, (uint64_t)k, (uint64_t)(lmd_generator_generated(run->gen, k) + j), 1);
            nb++;
        }
        if (nb == 0) return LMD_OK;
        if ((st = lmd_model_forward(run->draft, run->batch, nb, run->tokens, run->token_seq, n_tokens,
                                    run->logit_index, nb, run->step_logits, err)))
            return st;
        int32_t failed_row;
        lmd_error row_err;
        if ((st = lmd_sample_rows(samplers, n_samplers, run->params, nb, run->inputs, run->step_logits, V, nb, V,
                                  run->coins, run->step_logprobs, run->drawn, NULL, &failed_row, &row_err)))
            return lmd_fail(err, st, "the draft model's logits of sequence %d: %.200s", (int)failed_row, row_err.msg);
        for (int32_t i = 0, b = 0; i < R; i++) {
            if (run->n_proposing[i] <= j) continue;
            const int32_t token = run->drawn[b];
            run->drafts[(int64_t)i * K + j] = token;
            lmd_generator_propose(run->gen, run->ids[i], j, token);
            memcpy(run->draft_logprobs + ((int64_t)i * K + j) * V, run->step_logprobs + (int64_t)b * V,
                   (size_t)V * sizeof(float));
            b++;
        }
    }
}

lmd_status lmd_speculative_run_rounds(lmd_speculative_run *run, lmd_sampler *const *samplers, int n_samplers,
                                      int32_t max_rounds, int32_t *last_ids, int32_t *last_tokens, int32_t *n_last,
                                      lmd_stop_check stop, void *stop_ctx, lmd_error *err) {
    lmd_status st;
    const int32_t V = run->vocab, K = run->n_draft;
    const int32_t target_len = run->target->config.context_length, draft_len = run->draft->config.context_length;
    const uint64_t seed = lmd_generator_seed(run->gen);
    if (n_last) *n_last = 0;
    for (int32_t round = 0; round < max_rounds; round++) {
        /* a sequence whose tokens fill the target's context length ends there */
        for (int32_t k = 0; k < run->n; k++) {
            int32_t length;
            lmd_generator_tokens(run->gen, k, &length);
            if (length >= target_len) lmd_generator_finish(run->gen, k, LMD_FINISH_LENGTH);
        }
        release_finished_pairs(run);
        const int32_t R = lmd_generator_running(run->gen, run->ids);
        if (R == 0) break;
        /* k_i: at most K, one less than the slots left (the round adds k_i + 1 at most), and
         * within both context lengths */
        for (int32_t i = 0; i < R; i++) {
            const int32_t k = run->ids[i];
            int32_t length;
            lmd_generator_tokens(run->gen, k, &length);
            int32_t most = K;
            most = lmd_generator_room(run->gen, k) - 1 < most ? lmd_generator_room(run->gen, k) - 1 : most;
            most = target_len - length - 1 < most ? target_len - length - 1 : most;
            most = draft_len - length < most ? draft_len - length : most;
            run->n_proposing[i] = most > 0 ? most : 0;
        }
        if ((st = prefill_new_caches(run, R, 0, err)) || (st = prefill_new_caches(run, R, 1, err))) return st;
        for (int32_t i = 0; i < R; i++) {
            const int32_t k = run->ids[i];
            int32_t length;
            lmd_generator_tokens(run->gen, k, &length);
            /* after a round that failed part way (a full pool, say), a cache may hold proposals
             * that were never kept: back to the invariant */
            if (run->target_seqs[k]->len > length - 1 &&
                (st = lmd_kvseq_truncate(run->target_seqs[k], length - 1, err)))
                return st;
            if (run->draft_seqs[k] != NULL && run->draft_seqs[k]->len > length - 1 &&
                (st = lmd_kvseq_truncate(run->draft_seqs[k], length - 1, err)))
                return st;
        }
        if ((st = draft_round(run, samplers, n_samplers, R, err))) return st;

        /* verification: one target forward over every sequence's unseen tokens and proposals,
         * logits at its last token before the proposals and at each proposal */
        int32_t n_tokens = 0, n_rows = 0;
        for (int32_t i = 0; i < R; i++) {
            const int32_t k = run->ids[i], ki = run->n_proposing[i];
            int32_t length;
            const int32_t *all = lmd_generator_tokens(run->gen, k, &length);
            for (int32_t p = run->target_seqs[k]->len; p < length; p++) {
                run->tokens[n_tokens] = all[p];
                run->token_seq[n_tokens++] = i;
            }
            run->row_start[i] = n_rows;
            run->logit_index[n_rows] = n_tokens - 1;
            for (int32_t j = 0; j < ki; j++) {
                run->tokens[n_tokens] = run->drafts[(int64_t)i * K + j];
                run->token_seq[n_tokens++] = i;
                run->logit_index[n_rows + 1 + j] = n_tokens - 1;
            }
            /* row j is the target's distribution after j proposals; the last one's draw is the
             * bonus token, with generate's coin for that step */
            const int32_t t = lmd_generator_generated(run->gen, k);
            for (int32_t j = 0; j <= ki; j++) {
                lmd_generator_row(run->gen, k, j, &run->inputs[n_rows + j], &run->params[n_rows + j]);
                run->coins[n_rows + j] = j == ki ? lmd_rng_uniform(seed, (uint64_t)k, (uint64_t)(t + ki), 0) : -1.0;
            }
            run->batch[i] = run->target_seqs[k];
            n_rows += ki + 1;
        }
        if ((st = lmd_model_forward(run->target, run->batch, R, run->tokens, run->token_seq, n_tokens,
                                    run->logit_index, n_rows, run->target_logits, err)))
            return st;
        int32_t failed_row;
        lmd_error row_err;
        if ((st = lmd_sample_rows(samplers, n_samplers, run->params, n_rows, run->inputs, run->target_logits, V,
                                  n_rows, V, run->coins, run->target_logprobs, run->drawn, NULL, &failed_row,
                                  &row_err)))
            return lmd_fail(err, st, "the target model's logits, verification row %d: %.200s", (int)failed_row,
                            row_err.msg);

        int32_t n_out = 0;
        for (int32_t i = 0; i < R; i++) {
            const int32_t k = run->ids[i], ki = run->n_proposing[i], row = run->row_start[i];
            const int32_t t = lmd_generator_generated(run->gen, k);
            int32_t length;
            lmd_generator_tokens(run->gen, k, &length);
            double coins[2 * 64];
            for (int32_t j = 0; j < ki; j++) {
                const uint64_t stream = (uint64_t)k | LMD_SPECULATIVE_STREAM, step = (uint64_t)(t + j);
                coins[2 * j] = lmd_rng_uniform(seed, stream, step, 0);
                coins[2 * j + 1] = lmd_rng_uniform(seed, stream, step, 1);
            }
            int32_t kept, residual;
            if ((st = lmd_speculative_verify(run->drafts + (int64_t)i * K, ki, run->draft_logprobs + (int64_t)i * K * V,
                                             run->target_logprobs + (int64_t)row * V, V, coins, &kept, &residual, err)))
                return st;
            const int32_t next = kept < ki ? residual : run->drawn[row + ki];
            run->proposed[k] += ki;
            run->accepted[k] += kept;
            lmd_finish_reason state = LMD_RUNNING;
            for (int32_t j = 0; j <= kept && state == LMD_RUNNING; j++) {
                const int32_t token = j < kept ? run->drafts[(int64_t)i * K + j] : next;
                state = lmd_generator_append(run->gen, k, token, run->target_logits + (int64_t)(row + j) * V);
                if (last_ids != NULL && last_tokens != NULL) {
                    last_ids[n_out] = k;
                    last_tokens[n_out] = token;
                }
                n_out++;
            }
            finish_at_context_length(run->gen, &k, 1, target_len);
            state = lmd_generator_finish_reason(run->gen, k);
            if (state != LMD_RUNNING) continue; /* its caches go at the next round's start */
            /* keep what the kept tokens put in the caches: the target saw tokens[0:length) and
             * the proposals; the draft all but the last proposal */
            if ((st = lmd_kvseq_truncate(run->target_seqs[k], length + kept, err))) return st;
            if (ki > 0 && run->draft_seqs[k]->len > length + kept &&
                (st = lmd_kvseq_truncate(run->draft_seqs[k], length + kept, err)))
                return st;
        }
        if (n_last) *n_last = n_out;
        release_finished_pairs(run);
        if (stop != NULL && round + 1 < max_rounds && stop(stop_ctx))
            return lmd_fail(err, LMD_ERR_STOPPED, "decoding was stopped after %d rounds of this call", round + 1);
    }
    return LMD_OK;
}
