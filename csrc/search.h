/*
 * search.h -- beam search as a state machine over rows of logits.
 *
 * The search never calls a model: each step takes the logits of the running
 * beams and says which beam every new running beam extends (its parent) and
 * with which token. A driver (the C loop over an lmdecode model, or Python
 * calling an external step function) runs the model between steps and
 * reorders or forks its KV cache by the parents. One implementation thus
 * serves every model.
 *
 * Semantics are those of Hugging Face transformers' beam search (v5
 * `_beam_search`), float32 arithmetic included:
 *   - scores are sums of log-softmax log-probabilities; a finished hypothesis
 *     is ranked by sum / L^length_penalty, L the number of generated tokens
 *     including the EOS;
 *   - each step keeps the top K = max(2, 1 + n_eos) * num_beams candidates
 *     over all beams; candidates among the first num_beams that end (EOS or
 *     the length limit) become finished hypotheses, the best num_beams
 *     unfinished candidates run on;
 *   - early_stopping true: stop once num_beams hypotheses are finished;
 *     false: stop when the best running beam, normalized by the current
 *     length, cannot beat the worst finished one; never: the same with the
 *     maximum length when length_penalty > 0;
 *   - logits processors act on each beam's log-probs after the log-softmax,
 *     without renormalizing, in the order of transformers' processor list:
 *     repetition penalty (over prompt + the beam's tokens), no-repeat n-grams,
 *     the EOS ban of min_new_tokens, then the allowed tokens of
 *     lmd_beam_search_set_allowed. The log-probs a hypothesis reports and sums
 *     are these processed ones.
 *
 *     lmd_beam_search *bs; lmd_error err;
 *     lmd_beam_search_init(&bs, &config, &err);
 *     while (!lmd_beam_search_done(bs)) {
 *         model_logits(running beams) -> logits (num_beams, vocab)
 *         lmd_beam_search_step(bs, logits, parents, tokens, &err);
 *         reorder caches: new beam j = old beam parents[j] + tokens[j]
 *     }
 *     lmd_beam_search_hypothesis(bs, 0, ...);   // the best
 *     lmd_beam_search_free(bs);
 */
#ifndef LMD_SEARCH_H
#define LMD_SEARCH_H

#include "lmdecode.h"

typedef enum {
    LMD_EARLY_STOP_HEURISTIC = 0, /* transformers' early_stopping=False */
    LMD_EARLY_STOP_TRUE = 1,      /* early_stopping=True */
    LMD_EARLY_STOP_NEVER = 2      /* early_stopping="never" */
} lmd_early_stopping;

typedef struct {
    int32_t num_beams;            /* >= 1 */
    int32_t vocab;                /* >= 1 */
    int32_t max_new_tokens;       /* >= 1 */
    int32_t num_return_sequences; /* in [1, num_beams] */
    double length_penalty;
    lmd_early_stopping early_stopping;
    const int32_t *eos_ids;       /* (n_eos,) copied at init */
    int32_t n_eos;
    int32_t dynamic_allowed;      /* nonzero: room for lmd_beam_search_set_allowed (4 num_beams vocab bytes) */
    /* logits processors, applied to each beam's log-probs in transformers' order (below) */
    double repetition_penalty;    /* > 0; 1 = off */
    int32_t no_repeat_ngram_size; /* >= 0; 0 = off */
    int32_t min_new_tokens;       /* >= 0: the EOS ids are banned until this many tokens exist */
    const int32_t *prompt;        /* (prompt_len,) copied at init: with each beam's tokens, the */
    int32_t prompt_len;           /* context the first two read (ids outside the vocab ignored) */
} lmd_beam_config;

typedef struct lmd_beam_search lmd_beam_search;

lmd_status lmd_beam_search_init(lmd_beam_search **out, const lmd_beam_config *config,
                                lmd_error *err);
void lmd_beam_search_free(lmd_beam_search *bs); /* safe on NULL */

int32_t lmd_beam_search_width(const lmd_beam_search *bs);
int32_t lmd_beam_search_vocab(const lmd_beam_search *bs);
int32_t lmd_beam_search_max_new_tokens(const lmd_beam_search *bs);

/* Non-zero once the search has ended (then step is an error). */
int lmd_beam_search_done(const lmd_beam_search *bs);
/* Tokens generated so far by every running beam. */
int32_t lmd_beam_search_length(const lmd_beam_search *bs);

/*
 * One step. logits: (num_beams, vocab) raw logits of the running beams (at the
 * first step all beams hold the prompt, so the rows may be equal). Writes
 * parents (num_beams,) and tokens (num_beams,): running beam j continues old
 * beam parents[j] with tokens[j]. Errors (state unchanged): NaN/+inf logits,
 * calling after done.
 */
lmd_status lmd_beam_search_step(lmd_beam_search *bs, const float *logits, int32_t *parents,
                                int32_t *tokens, lmd_error *err);

/* The tokens running beam `beam` has generated (lmd_beam_search_length of them). */
const int32_t *lmd_beam_search_tokens(const lmd_beam_search *bs, int32_t beam);

/*
 * Constrained beam search (transformers' prefix_allowed_tokens_fn): at the next step only,
 * running beam `beam` may continue with ids[0:n_ids] alone (in [0, vocab), at most vocab;
 * n_ids < 0: any token). As in transformers, the other tokens' log-probabilities become
 * -inf after the log-softmax, so the allowed ones keep their values (no renormalization);
 * should fewer than K continuations be allowed over all beams, -inf ones fill the list in
 * (beam, token) order. Every step clears the lists (the beams are reordered). Needs a
 * search made with dynamic_allowed.
 */
lmd_status lmd_beam_search_set_allowed(lmd_beam_search *bs, int32_t beam, const int32_t *ids, int32_t n_ids,
                                       lmd_error *err);

/* Number of finished hypotheses available, best first (<= num_return_sequences). */
int32_t lmd_beam_search_n_hypotheses(const lmd_beam_search *bs);

/*
 * Hypothesis rank (0 = best). tokens and token_logprobs get *length values
 * (capacity max_new_tokens); score is sum / length^length_penalty as ranked,
 * logprob the plain sum. Any output pointer may be NULL.
 */
lmd_status lmd_beam_search_hypothesis(const lmd_beam_search *bs, int32_t rank, int32_t *tokens,
                                      float *token_logprobs, int32_t *length, float *score,
                                      float *logprob, lmd_error *err);

#endif /* LMD_SEARCH_H */
