/*
 * decode.h -- the decoding loops over an lmdecode model, entirely in C.
 *
 * The state machines of generate.h and search.h never call a model; these
 * loops drive them with lmd_model_forward, so that Python costs nothing per
 * token. Every sequence lives in a paged KV cache (kvcache.h): sequences that
 * share a prompt share its cache blocks, and beams fork their parents' block
 * tables instead of copying keys and values.
 *
 *     lmd_decode_run *run;
 *     lmd_decode_run_init(&run, model, pool, generator, &err);
 *     lmd_decode_run_steps(run, samplers, n_samplers, INT32_MAX, NULL, NULL, NULL, &err);
 *     lmd_decode_run_free(run);      // the generator holds the results
 *
 *     lmd_decode_beam_search(model, pool, beam_search, prompt, prompt_len, &err);
 *     lmd_decode_beam_searches(model, pool, searches, n, prompts, prompt_lens, ...);  // a batch
 *
 * Ownership: the model, pool, generator and beam search are borrowed; a run
 * owns the KV sequences it creates in the pool and frees them (and any
 * sequence that finishes early) so that their blocks return to the pool.
 */
#ifndef LMD_DECODE_H
#define LMD_DECODE_H

#include "generate.h"
#include "kvcache.h"
#include "model.h"
#include "sampling.h"
#include "search.h"

typedef struct lmd_decode_run lmd_decode_run;

lmd_status lmd_decode_run_init(lmd_decode_run **out, lmd_model *model, lmd_kvpool *pool,
                               lmd_generator *gen, lmd_error *err);
void lmd_decode_run_free(lmd_decode_run *run); /* safe on NULL */

/*
 * Contrastive decoding (contrastive.h): an amateur model (same vocabulary, a pool of its
 * own) sees every token the model sees, and each step draws from the contrastive scores of
 * the two instead of the model's logits (temperature 0: their argmax); the log-probs the
 * generator reports stay the model's. A sequence ends at the shorter context length. Set
 * once, before the first step.
 */
lmd_status lmd_decode_run_set_amateur(lmd_decode_run *run, lmd_model *amateur, lmd_kvpool *amateur_pool,
                                      double alpha, double amateur_temperature, lmd_error *err);

/*
 * Prompt caching across runs (llama.cpp's cache_prompt): sequence k decodes in `cache`, a
 * sequence of the run's pool that the caller owns and that already holds the keys and values
 * of the first cache->len tokens of k's prompt (fewer than the prompt has: the first step
 * feeds the rest). The run neither frees nor forks it away: when the run ends, `cache` holds
 * every token of k but the last, ready for a later run that continues the same text. The
 * caller keeps it alive until the run is freed and must not touch it meanwhile. Set before
 * the first step; not with an amateur.
 */
lmd_status lmd_decode_run_use_cache(lmd_decode_run *run, int32_t k, lmd_kvseq *cache, lmd_error *err);

/* Asked between the steps of a long loop: nonzero stops it (the caller's interrupt). */
typedef int (*lmd_stop_check)(void *ctx);

/*
 * Advances the generator by up to max_steps tokens per running sequence (the
 * first step prefills the prompts; sequences whose prompt equals the previous
 * sequence's share its cache). A sequence whose tokens (prompt + generated)
 * fill the model's context length finishes with LMD_FINISH_LENGTH. If last_ids/last_tokens are given
 * (capacity n_seqs), they receive the sequences and tokens of the last step,
 * *n_last their count (0 when nothing ran because every sequence had finished).
 * stop (if non-NULL) is called with stop_ctx between steps; when it returns nonzero
 * the call ends early with LMD_ERR_STOPPED, the steps so far kept (a later call goes on).
 */
lmd_status lmd_decode_run_steps(lmd_decode_run *run, lmd_sampler *const *samplers, int n_samplers,
                                int32_t max_steps, int32_t *last_ids, int32_t *last_tokens,
                                int32_t *n_last, lmd_stop_check stop, void *stop_ctx, lmd_error *err);

/*
 * Runs the beam search to its end on the model from prompt (prompt_len >= 1).
 * All beams advance in one batched forward per step. *peak_kv_blocks (if
 * non-NULL) receives the largest number of pool blocks the beams held at once.
 * stop (if non-NULL) is called with stop_ctx after every step; when it returns
 * nonzero the search ends unfinished with LMD_ERR_STOPPED.
 */
lmd_status lmd_decode_beam_search(lmd_model *model, lmd_kvpool *pool, lmd_beam_search *bs,
                                  const int32_t *prompt, int32_t prompt_len,
                                  int32_t *peak_kv_blocks, lmd_stop_check stop, void *stop_ctx,
                                  lmd_error *err);

/* Called before every step of beam search number `search` (of lmd_decode_beam_searches)
 * with the search, e.g. to set each running beam's allowed tokens
 * (lmd_beam_search_set_allowed); a status other than LMD_OK ends the searches with it. */
typedef lmd_status (*lmd_beam_hook)(void *ctx, int32_t search, lmd_beam_search *bs, lmd_error *err);

/*
 * n_searches beam searches at once, search s from prompts[s] (prompt_lens[s] >= 1 tokens;
 * distinct searches): the prompts are prefilled in one forward (after the beginnings that
 * prompts share, as lmd_decode_run's prefill does), then every step advances
 * all running searches' beams in one batched forward, and a search that is done lets its
 * beams' blocks go. Each search ends as it does alone, bit for bit. before_step (if
 * non-NULL) is called with hook_ctx before each step of each search; peak_kv_blocks and
 * stop as lmd_decode_beam_search's.
 */
lmd_status lmd_decode_beam_searches(lmd_model *model, lmd_kvpool *pool, lmd_beam_search *const *searches,
                                    int32_t n_searches, const int32_t *const *prompts, const int32_t *prompt_lens,
                                    int32_t *peak_kv_blocks, lmd_beam_hook before_step, void *hook_ctx,
                                    lmd_stop_check stop, void *stop_ctx, lmd_error *err);

/*
 * Speculative decoding: a draft model proposes up to n_draft tokens per sequence,
 * the target verifies them all in one forward pass, and speculative.h's rule keeps
 * a prefix and draws the next token, so every token is distributed as the target
 * (with the generator's sampling chain) alone would draw it; at temperature 0 the
 * output is the target's greedy output token for token. Sequence k at step t takes
 * its coins from (seed, k, t, 1) for the draft's draw, (seed, k | LMD_SPECULATIVE_STREAM,
 * t, 0 and 1) for the acceptance and residual draws, and (seed, k, t, 0) for the
 * target's own draw after all proposals were kept: so with no proposal the loop is
 * lmd_decode_run's, coin for coin. Both models share the generator's vocabulary; each
 * has a pool of its own. A round proposes fewer tokens where max_new_tokens or a
 * context length leaves less room. A sequence's first round prefills its prompt in both
 * models; sequences whose prompt equals the previous one's (n samples) fork that cache.
 *
 * lmd_speculative_run_rounds runs up to max_rounds rounds; last_ids/last_tokens
 * (capacity n_seqs * (n_draft + 1)) receive the (sequence, token) pairs the last round
 * appended, in order, *n_last their count. stop as in lmd_decode_run_steps.
 * lmd_speculative_run_counts gives sequence k's draft tokens proposed and kept so far.
 */
typedef struct lmd_speculative_run lmd_speculative_run;

lmd_status lmd_speculative_run_init(lmd_speculative_run **out, lmd_model *target, lmd_kvpool *target_pool,
                                    lmd_model *draft, lmd_kvpool *draft_pool, lmd_generator *gen,
                                    int32_t n_draft, lmd_error *err);
void lmd_speculative_run_free(lmd_speculative_run *run); /* safe on NULL */
lmd_status lmd_speculative_run_rounds(lmd_speculative_run *run, lmd_sampler *const *samplers, int n_samplers,
                                      int32_t max_rounds, int32_t *last_ids, int32_t *last_tokens, int32_t *n_last,
                                      lmd_stop_check stop, void *stop_ctx, lmd_error *err);
void lmd_speculative_run_counts(const lmd_speculative_run *run, int32_t k, int64_t *proposed, int64_t *accepted);

#endif /* LMD_DECODE_H */
