/*
 * search.c -- beam search state machine (see search.h).
 *
 * Glossary: B = num_beams, V = vocab, K = candidates kept per step,
 * T = max_new_tokens, t = tokens generated so far.
 *
 * Float32 arithmetic where transformers uses it (scores, log-probs, the
 * length normalization), so that rankings agree with it to the last bit in
 * all but exact ties. The -1e9 penalties of transformers are reproduced too:
 * they decide which hypotheses may finish, and a running beam that had to
 * take a finished candidate keeps the penalized score, as in transformers.
 */
#include "search.h"
#include "sampling.h"
#include "vec.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define PENALTY (-1.0e9f)

/* The state one step leaves: running beams and finished slots, each best first. */
typedef struct {
    float *run_score;        /* (B,) accumulated log-prob (possibly penalized) */
    int32_t *run_tokens;     /* (B, T) */
    float *run_lps;          /* (B, T) log-prob of each token when it was chosen */
    float *fin_score;        /* (B,) normalized score, PENALTY-ish when empty */
    float *fin_sum;          /* (B,) plain sum of log-probs */
    int32_t *fin_len;        /* (B,) */
    unsigned char *fin_done; /* (B,) */
    int32_t *fin_tokens;     /* (B, T) */
    float *fin_lps;          /* (B, T) */
} beam_set;

// 0 once every array of a set of B beams of T tokens is allocated (the finished slots
// zeroed), else -1; beam_set_free frees a partial set
static int beam_set_alloc(beam_set *s, size_t B, size_t T) {
    s->run_score = malloc(B * sizeof(float));
    s->run_tokens = malloc(B * T * sizeof(int32_t));
    s->run_lps = malloc(B * T * sizeof(float));
    s->fin_score = malloc(B * sizeof(float));
    s->fin_sum = malloc(B * sizeof(float));
    s->fin_len = calloc(B, sizeof(int32_t));
    s->fin_done = calloc(B, 1);
    s->fin_tokens = calloc(B * T, sizeof(int32_t));
    s->fin_lps = calloc(B * T, sizeof(float));
    return s->run_score && s->run_tokens && s->run_lps && s->fin_score && s->fin_sum && s->fin_len &&
                   s->fin_done && s->fin_tokens && s->fin_lps
               ? 0
               : -1;
}

static void beam_set_free(beam_set *s) {
    free(s->run_score);
    free(s->run_tokens);
    free(s->run_lps);
    free(s->fin_score);
    free(s->fin_sum);
    free(s->fin_len);
    free(s->fin_done);
    free(s->fin_tokens);
    free(s->fin_lps);
}

struct lmd_beam_search {
    lmd_beam_config config;
    int32_t *eos;            /* (n_eos,) */
    int32_t n_candidates;    /* K */
    int32_t generated;       /* t */
    int done;
    int improvement_possible; /* transformers' is_early_stop_heuristic_unsatisfied */

    beam_set now;            /* this step's running beams and finished slots */
    /* the next step's, built here, then swapped in, so that no step reads what it has
     * overwritten */
    beam_set next;

    /* per-step scratch */
    float *cand_score;       /* (K,) accumulated score, descending */
    float *cand_lp;          /* (K,) the new token's log-prob */
    int32_t *cand_beam;      /* (K,) */
    int32_t *cand_token;     /* (K,) */
    unsigned char *cand_hits; /* (K,) ends here: EOS or length limit */
    int32_t *order;          /* (B + K,) merge order */
    float *merge_score;      /* (B + K,) */
    float *row_max;          /* (B,) each beam's max logit */
    float *row_log_total;    /* (B,) log sum exp(logits - max): log_softmax = logit - max - this */
    int32_t *allowed;        /* (B, V) lmd_beam_search_set_allowed's lists, ascending, or NULL */
    int32_t *n_allowed;      /* (B,) their lengths, -1: any token */
    int32_t *context;        /* (prompt_len + T,) the prompt, then the beam being processed's tokens */
    float *processed;        /* (V,) a beam's processed log-probs, or NULL without processors */
    uint32_t *seen;          /* (V,) lmd_penalize_repetitions' marks, or NULL without the penalty */
    uint32_t epoch;          /* the marks' current generation */
};

void lmd_beam_search_free(lmd_beam_search *bs) {
    if (bs == NULL) return;
    free(bs->eos);
    beam_set_free(&bs->now);
    beam_set_free(&bs->next);
    free(bs->cand_score);
    free(bs->cand_lp);
    free(bs->cand_beam);
    free(bs->cand_token);
    free(bs->cand_hits);
    free(bs->order);
    free(bs->merge_score);
    free(bs->row_max);
    free(bs->row_log_total);
    free(bs->allowed);
    free(bs->n_allowed);
    free(bs->context);
    free(bs->processed);
    free(bs->seen);
    free(bs);
}

lmd_status lmd_beam_search_init(lmd_beam_search **out, const lmd_beam_config *c, lmd_error *err) {
    *out = NULL;
    if (c->num_beams < 1)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "beam_width (=%d) must be >= 1", (int)c->num_beams);
    if (c->vocab < 1)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "vocab (=%d) must be >= 1", (int)c->vocab);
    if (c->max_new_tokens < 1)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "max_new_tokens (=%d) must be >= 1",
                        (int)c->max_new_tokens);
    if (c->num_return_sequences < 1 || c->num_return_sequences > c->num_beams)
        return lmd_fail(err, LMD_ERR_INVALID_ARG,
                        "num_return_sequences (=%d) must be in [1, beam_width (=%d)]",
                        (int)c->num_return_sequences, (int)c->num_beams);
    if (!isfinite(c->length_penalty))
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "length_penalty (=%g) must be finite",
                        c->length_penalty);
    if (c->early_stopping < LMD_EARLY_STOP_HEURISTIC || c->early_stopping > LMD_EARLY_STOP_NEVER)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "early_stopping mode (=%d) is unknown",
                        (int)c->early_stopping);
    if (c->n_eos < 0 || (c->n_eos > 0 && c->eos_ids == NULL))
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "eos ids are missing");
    for (int32_t i = 0; i < c->n_eos; i++)
        if (c->eos_ids[i] < 0 || c->eos_ids[i] >= c->vocab)
            return lmd_fail(err, LMD_ERR_INVALID_ARG, "eos_token_id (=%d) is not in [0, %d)",
                            (int)c->eos_ids[i], (int)c->vocab);
    if (!(c->repetition_penalty > 0.0 && isfinite(c->repetition_penalty)))
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "repetition_penalty (=%g) must be a finite number > 0",
                        c->repetition_penalty);
    /* applied in float32: 1e-50 would be 0 there, and a log-prob of 0 divided by it NaN */
    if (lmd_check_float32_factor("repetition_penalty", c->repetition_penalty, err) != LMD_OK)
        return LMD_ERR_INVALID_ARG;
    if (c->no_repeat_ngram_size < 0)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "no_repeat_ngram_size (=%d) must be >= 0",
                        (int)c->no_repeat_ngram_size);
    if (c->min_new_tokens < 0)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "min_new_tokens (=%d) must be >= 0", (int)c->min_new_tokens);
    if (c->prompt_len < 0 || (c->prompt_len > 0 && c->prompt == NULL))
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "the prompt is missing");
    int64_t keep = (int64_t)(c->n_eos + 1 > 2 ? c->n_eos + 1 : 2) * c->num_beams;
    if (keep > (int64_t)c->num_beams * c->vocab)
        return lmd_fail(err, LMD_ERR_INVALID_ARG,
                        "beam search keeps %lld candidates a step but beam_width * vocab is %lld",
                        (long long)keep, (long long)c->num_beams * c->vocab);

    lmd_beam_search *bs = calloc(1, sizeof *bs);
    if (bs == NULL) return lmd_fail(err, LMD_ERR_NOMEM, "out of memory for beam search");
    bs->config = *c;
    bs->n_candidates = (int32_t)keep;
    const size_t B = (size_t)c->num_beams, T = (size_t)c->max_new_tokens, K = (size_t)keep;
    bs->eos = malloc((c->n_eos > 0 ? (size_t)c->n_eos : 1) * sizeof *bs->eos);
    bs->cand_score = malloc(K * sizeof(float));
    bs->cand_lp = malloc(K * sizeof(float));
    bs->cand_beam = malloc(K * sizeof(int32_t));
    bs->cand_token = malloc(K * sizeof(int32_t));
    bs->cand_hits = malloc(K);
    bs->order = malloc((B + K) * sizeof(int32_t));
    bs->merge_score = malloc((B + K) * sizeof(float));
    bs->row_max = malloc(B * sizeof(float));
    bs->row_log_total = malloc(B * sizeof(float));
    bs->n_allowed = malloc(B * sizeof(int32_t));
    if (c->dynamic_allowed) bs->allowed = malloc(B * (size_t)c->vocab * sizeof(int32_t));
    const int reads_context = c->repetition_penalty != 1.0 || c->no_repeat_ngram_size > 0;
    const int processes = reads_context || (c->min_new_tokens > 0 && c->n_eos > 0);
    if (reads_context) bs->context = malloc(((size_t)c->prompt_len + T) * sizeof(int32_t));
    if (processes) bs->processed = malloc((size_t)c->vocab * sizeof(float));
    if (c->repetition_penalty != 1.0) bs->seen = calloc((size_t)c->vocab, sizeof(uint32_t));
    const int sets_failed = beam_set_alloc(&bs->now, B, T) | beam_set_alloc(&bs->next, B, T);
    if (sets_failed || !bs->eos || !bs->cand_score || !bs->cand_lp || !bs->cand_beam || !bs->cand_token ||
        !bs->cand_hits || !bs->order || !bs->merge_score || !bs->row_max || !bs->row_log_total ||
        !bs->n_allowed || (c->dynamic_allowed && !bs->allowed) ||
        (reads_context && !bs->context) || (processes && !bs->processed) ||
        (c->repetition_penalty != 1.0 && !bs->seen)) {
        lmd_beam_search_free(bs);
        return lmd_fail(err, LMD_ERR_NOMEM, "out of memory for beam search of width %d",
                        (int)c->num_beams);
    }
    if (c->n_eos > 0) memcpy(bs->eos, c->eos_ids, (size_t)c->n_eos * sizeof *bs->eos);
    bs->config.eos_ids = bs->eos;
    if (bs->context != NULL && c->prompt_len > 0)
        memcpy(bs->context, c->prompt, (size_t)c->prompt_len * sizeof *bs->context);
    bs->config.prompt = bs->context; /* the caller's prompt is not kept */
    /* Only the first beam starts live, so that the identical prompts of the
     * other beams do not yield duplicate candidates (as transformers). */
    for (size_t b = 0; b < B; b++) {
        bs->now.run_score[b] = b == 0 ? 0.0f : PENALTY;
        bs->now.fin_score[b] = PENALTY;
        bs->now.fin_sum[b] = 0.0f;
        bs->n_allowed[b] = -1;
    }
    bs->improvement_possible = 1;
    *out = bs;
    return LMD_OK;
}

int lmd_beam_search_done(const lmd_beam_search *bs) { return bs->done; }
int32_t lmd_beam_search_width(const lmd_beam_search *bs) { return bs->config.num_beams; }
int32_t lmd_beam_search_vocab(const lmd_beam_search *bs) { return bs->config.vocab; }
int32_t lmd_beam_search_max_new_tokens(const lmd_beam_search *bs) {
    return bs->config.max_new_tokens;
}
int32_t lmd_beam_search_length(const lmd_beam_search *bs) { return bs->generated; }

const int32_t *lmd_beam_search_tokens(const lmd_beam_search *bs, int32_t beam) {
    return bs->now.run_tokens + (int64_t)beam * bs->config.max_new_tokens;
}

static int ascending_ids(const void *a, const void *b) {
    const int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

lmd_status lmd_beam_search_set_allowed(lmd_beam_search *bs, int32_t beam, const int32_t *ids, int32_t n_ids,
                                       lmd_error *err) {
    const int32_t V = bs->config.vocab;
    if (bs->allowed == NULL)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "the beam search was made without dynamic_allowed");
    if (beam < 0 || beam >= bs->config.num_beams)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "beam (=%d) must be in [0, %d)", (int)beam, (int)bs->config.num_beams);
    if (n_ids > V || (n_ids > 0 && ids == NULL))
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "%d allowed tokens for a vocabulary of %d", (int)n_ids, (int)V);
    for (int32_t i = 0; i < n_ids; i++)
        if (ids[i] < 0 || ids[i] >= V)
            return lmd_fail(err, LMD_ERR_INVALID_ARG, "allowed token %d is outside [0, %d)", (int)ids[i], (int)V);
    int32_t *list = bs->allowed + (int64_t)beam * V, n = 0;
    if (n_ids > 0) memcpy(list, ids, (size_t)n_ids * sizeof *list);
    /* ascending and distinct: offered in token order, ties break as in the full scan (a list
     * already ascending, as most are, skips the sort: qsort of 16k ids took 0.3 ms) */
    int ascending = 1;
    for (int32_t i = 1; i < n_ids && ascending; i++) ascending = list[i - 1] < list[i];
    if (!ascending) {
        qsort(list, (size_t)n_ids, sizeof *list, ascending_ids);
        for (int32_t i = 0; i < n_ids; i++)
            if (n == 0 || list[i] != list[n - 1]) list[n++] = list[i];
    } else {
        n = n_ids;
    }
    bs->n_allowed[beam] = n_ids < 0 ? -1 : n;
    return LMD_OK;
}

static int is_eos(const lmd_beam_search *bs, int32_t token) {
    for (int32_t i = 0; i < bs->config.n_eos; i++)
        if (bs->eos[i] == token) return 1;
    return 0;
}

/* Inserts (score, beam, token, lp) into the descending top-K list of n
 * entries; a later entry displaces an equal one never (lower index first). */
static void offer_candidate(lmd_beam_search *bs, int32_t *n, float score, int32_t beam,
                            int32_t token, float lp) {
    const int32_t K = bs->n_candidates;
    int32_t pos = *n < K ? *n : K - 1;
    if (*n == K && !(score > bs->cand_score[K - 1])) return;
    while (pos > 0 && score > bs->cand_score[pos - 1]) {
        bs->cand_score[pos] = bs->cand_score[pos - 1];
        bs->cand_beam[pos] = bs->cand_beam[pos - 1];
        bs->cand_token[pos] = bs->cand_token[pos - 1];
        bs->cand_lp[pos] = bs->cand_lp[pos - 1];
        pos--;
    }
    bs->cand_score[pos] = score;
    bs->cand_beam[pos] = beam;
    bs->cand_token[pos] = token;
    bs->cand_lp[pos] = lp;
    if (*n < K) (*n)++;
}

/* Stable order of n scores, descending, into idx (insertion sort: n <= B + K is small). */
static void argsort_descending(const float *score, int32_t n, int32_t *idx) {
    for (int32_t i = 0; i < n; i++) {
        int32_t j = i;
        while (j > 0 && score[i] > score[idx[j - 1]]) {
            idx[j] = idx[j - 1];
            j--;
        }
        idx[j] = i;
    }
}

/* Whether step t runs the processors: the context ones at every step, the EOS ban before
 * min_new_tokens */
static int processes_at(const lmd_beam_search *bs, int32_t t) {
    return bs->context != NULL || (bs->processed != NULL && t < bs->config.min_new_tokens);
}

/* Beam b's processed log-probs at step t into bs->processed (V,): log_softmax of its row
 * (row - max - log_total, the values the scan below computes), then the processors in
 * transformers' order, on log-probs and without renormalizing (search.h). */
static void process_beam(lmd_beam_search *bs, int32_t b, const float *row, float max, float log_total, int32_t t) {
    const lmd_beam_config *c = &bs->config;
    const int32_t V = c->vocab;
    float *lp = bs->processed;
    for (int32_t v = 0; v < V; v++) lp[v] = (row[v] - max) - log_total;
    if (bs->context != NULL) { /* prompt + the beam's tokens */
        const int32_t len = c->prompt_len + t;
        memcpy(bs->context + c->prompt_len, lmd_beam_search_tokens(bs, b), (size_t)t * sizeof *bs->context);
        if (c->repetition_penalty != 1.0) {
            if (++bs->epoch == 0) { /* the marks' counter wrapped: clear them */
                memset(bs->seen, 0, (size_t)V * sizeof *bs->seen);
                bs->epoch = 1;
            }
            /* log-probs are <= 0: the penalty never makes +inf, the one overflow it reports */
            (void)lmd_penalize_repetitions(lp, V, bs->context, len, (float)c->repetition_penalty, bs->seen,
                                           bs->epoch);
        }
        if (c->no_repeat_ngram_size > 0) lmd_ban_repeated_ngrams(lp, V, bs->context, len, c->no_repeat_ngram_size);
    }
    if (t < c->min_new_tokens)
        for (int32_t i = 0; i < c->n_eos; i++) lp[bs->eos[i]] = -INFINITY;
}

lmd_status lmd_beam_search_step(lmd_beam_search *bs, const float *logits, int32_t *parents,
                                int32_t *tokens, lmd_error *err) {
    const lmd_beam_config *c = &bs->config;
    const int32_t B = c->num_beams, V = c->vocab, T = c->max_new_tokens, K = bs->n_candidates;
    const int32_t t = bs->generated;
    if (bs->done) return lmd_fail(err, LMD_ERR_INVALID_ARG, "the beam search has already ended");
    float *maxes = bs->row_max, *log_totals = bs->row_log_total;
    for (int32_t b = 0; b < B; b++) {
        int32_t bad;
        maxes[b] = lmd_row_log_normalizer(logits + (int64_t)b * V, V, 1.0f, &log_totals[b], &bad);
        if (bad >= 0)
            return lmd_fail(err, LMD_ERR_INVALID_ARG, "logits of beam %d, token %d is %s", (int)b, (int)bad,
                            isnan(logits[(int64_t)b * V + bad]) ? "NaN" : "+inf");
    }
    for (int32_t b = 0; b < B; b++)
        if (maxes[b] == -INFINITY)
            return lmd_fail(err, LMD_ERR_INVALID_ARG, "every logit of beam %d is -inf", (int)b);

    /* 1. the K best (beam, token) continuations by accumulated log-prob: each token's score
     *    lp + run_score with lp its log-softmax (generate()'s log-prob); a vector of scores is
     *    compared with the K-th best so far first, and only tokens that may enter are offered */
    int32_t n = 0;
    const int processes = processes_at(bs, t);
    for (int32_t b = 0; b < B; b++) {
        const float *row = logits + (int64_t)b * V;
        float max = maxes[b], log_sum = log_totals[b];
        const float run = bs->now.run_score[b];
        if (processes) { /* the scan reads the processed log-probs: (lp - 0) - 0 is lp, bit for bit */
            process_beam(bs, b, row, max, log_sum, t);
            row = bs->processed, max = 0.0f, log_sum = 0.0f;
        }
        if (bs->n_allowed[b] >= 0) { /* constrained: the allowed tokens alone, in token order */
            const int32_t *list = bs->allowed + (int64_t)b * V;
            for (int32_t i = 0; i < bs->n_allowed[b]; i++) {
                const float lp = (row[list[i]] - max) - log_sum;
                offer_candidate(bs, &n, lp + run, b, list[i], lp);
            }
            continue;
        }
        int32_t v = 0;
        for (; v + LMD_VEC_LANES <= V; v += LMD_VEC_LANES) {
            const vf score = ((vload(row + v) - max) - log_sum) + run; /* as below, lane by lane */
            const float floor = n < K ? -INFINITY : bs->cand_score[K - 1];
            if (n == K && !vany(score > floor)) continue;
            for (int j = 0; j < LMD_VEC_LANES; j++) {
                const float lp = (row[v + j] - max) - log_sum;
                offer_candidate(bs, &n, lp + run, b, v + j, lp);
            }
        }
        for (; v < V; v++) {
            const float lp = (row[v] - max) - log_sum; /* log_softmax, as torch computes it */
            offer_candidate(bs, &n, lp + run, b, v, lp);
        }
    }
    /* too few allowed continuations: -inf ones fill the list, in (beam, token) order */
    for (int32_t b = 0; b < B && n < K; b++)
        for (int32_t v = 0, i = 0; v < V && n < K; v++) {
            const int32_t *list = bs->allowed ? bs->allowed + (int64_t)b * V : NULL;
            const int32_t n_list = bs->n_allowed[b];
            if (n_list < 0) break; /* an unconstrained beam offered all its tokens */
            while (i < n_list && list[i] < v) i++;
            if (i < n_list && list[i] == v) continue;
            offer_candidate(bs, &n, -INFINITY, b, v, -INFINITY);
        }
    for (int32_t b = 0; b < B; b++) bs->n_allowed[b] = -1; /* the beams are reordered below */
    int all_hit = 1;
    for (int32_t k = 0; k < K; k++) {
        bs->cand_hits[k] = (unsigned char)(is_eos(bs, bs->cand_token[k]) || t + 1 >= T);
        all_hit &= bs->cand_hits[k];
    }

    /* 2. the B best candidates that did not end run on (penalized ones fill in if needed) */
    for (int32_t k = 0; k < K; k++)
        bs->merge_score[k] = bs->cand_score[k] + (bs->cand_hits[k] ? PENALTY : 0.0f);
    argsort_descending(bs->merge_score, K, bs->order);
    for (int32_t j = 0; j < B; j++) {
        int32_t k = bs->order[j];
        int32_t parent = bs->cand_beam[k];
        int32_t *dst_tokens = bs->next.run_tokens + (int64_t)j * T;
        float *dst_lps = bs->next.run_lps + (int64_t)j * T;
        memcpy(dst_tokens, bs->now.run_tokens + (int64_t)parent * T, (size_t)t * sizeof(int32_t));
        memcpy(dst_lps, bs->now.run_lps + (int64_t)parent * T, (size_t)t * sizeof(float));
        dst_tokens[t] = bs->cand_token[k];
        dst_lps[t] = bs->cand_lp[k];
        bs->next.run_score[j] = bs->merge_score[k];
        parents[j] = parent;
        tokens[j] = bs->cand_token[k];
    }

    /* 3. finished hypotheses: candidates among the first B that ended compete
     *    with the finished slots, ranked by sum / (t + 1)^length_penalty */
    int all_finished = 1;
    for (int32_t b = 0; b < B; b++) all_finished &= bs->now.fin_done[b];
    const float normalizer = (float)pow((double)(t + 1), c->length_penalty);
    for (int32_t b = 0; b < B; b++) bs->merge_score[b] = bs->now.fin_score[b];
    for (int32_t k = 0; k < K; k++) {
        float score = bs->cand_score[k] / normalizer;
        if (all_finished && c->early_stopping == LMD_EARLY_STOP_TRUE) score += PENALTY;
        if (!bs->improvement_possible) score += PENALTY;
        if (!(bs->cand_hits[k] && k < B)) score += PENALTY;
        bs->merge_score[B + k] = score;
    }
    argsort_descending(bs->merge_score, B + K, bs->order);
    for (int32_t j = 0; j < B; j++) {
        int32_t m = bs->order[j];
        int32_t *dst_tokens = bs->next.fin_tokens + (int64_t)j * T;
        float *dst_lps = bs->next.fin_lps + (int64_t)j * T;
        bs->next.fin_score[j] = bs->merge_score[m];
        if (m < B) { /* an existing slot moves */
            bs->next.fin_sum[j] = bs->now.fin_sum[m];
            bs->next.fin_len[j] = bs->now.fin_len[m];
            bs->next.fin_done[j] = bs->now.fin_done[m];
            memcpy(dst_tokens, bs->now.fin_tokens + (int64_t)m * T, (size_t)T * sizeof(int32_t));
            memcpy(dst_lps, bs->now.fin_lps + (int64_t)m * T, (size_t)T * sizeof(float));
        } else { /* a candidate: its parent's history plus the new token */
            int32_t k = m - B, parent = bs->cand_beam[k];
            bs->next.fin_sum[j] = bs->cand_score[k];
            bs->next.fin_len[j] = t + 1;
            bs->next.fin_done[j] = (unsigned char)(bs->cand_hits[k] && k < B);
            memcpy(dst_tokens, bs->now.run_tokens + (int64_t)parent * T, (size_t)t * sizeof(int32_t));
            memcpy(dst_lps, bs->now.run_lps + (int64_t)parent * T, (size_t)t * sizeof(float));
            dst_tokens[t] = bs->cand_token[k];
            dst_lps[t] = bs->cand_lp[k];
        }
    }
    const beam_set done_step = bs->now;
    bs->now = bs->next, bs->next = done_step;
    bs->generated = t + 1;

    /* 4. can a running beam still beat the worst finished one? */
    int32_t best_length = bs->generated;
    if (c->early_stopping == LMD_EARLY_STOP_NEVER && c->length_penalty > 0.0) best_length = T;
    const float best_possible = bs->now.run_score[0] / (float)pow((double)best_length, c->length_penalty);
    float worst_slot = bs->now.fin_score[0];
    for (int32_t b = 1; b < B; b++) worst_slot = bs->now.fin_score[b] < worst_slot ? bs->now.fin_score[b] : worst_slot;
    int can_improve = 0;
    all_finished = 1;
    for (int32_t b = 0; b < B; b++) {
        float worst = bs->now.fin_done[b] ? worst_slot : PENALTY;
        can_improve |= best_possible > worst;
        all_finished &= bs->now.fin_done[b];
    }
    bs->improvement_possible &= can_improve;
    bs->done = !bs->improvement_possible ||
               (all_finished && c->early_stopping == LMD_EARLY_STOP_TRUE) || all_hit;
    return LMD_OK;
}

int32_t lmd_beam_search_n_hypotheses(const lmd_beam_search *bs) {
    int32_t n = 0;
    while (n < bs->config.num_return_sequences && bs->now.fin_done[n]) n++;
    return n;
}

lmd_status lmd_beam_search_hypothesis(const lmd_beam_search *bs, int32_t rank, int32_t *tokens,
                                      float *token_logprobs, int32_t *length, float *score,
                                      float *logprob, lmd_error *err) {
    int32_t available = lmd_beam_search_n_hypotheses(bs);
    if (rank < 0 || rank >= available)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "hypothesis rank (=%d) must be in [0, %d)",
                        (int)rank, (int)available);
    const int64_t T = bs->config.max_new_tokens;
    int32_t len = bs->now.fin_len[rank];
    if (tokens) memcpy(tokens, bs->now.fin_tokens + rank * T, (size_t)len * sizeof(int32_t));
    if (token_logprobs) memcpy(token_logprobs, bs->now.fin_lps + rank * T, (size_t)len * sizeof(float));
    if (length) *length = len;
    if (score) *score = bs->now.fin_score[rank];
    if (logprob) *logprob = bs->now.fin_sum[rank];
    return LMD_OK;
}
