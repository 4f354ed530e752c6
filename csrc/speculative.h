/*
 * speculative.h -- speculative sampling's verification rule.
 *
 * A small draft model proposes k tokens x_1..x_k, each drawn from its
 * distribution q_i at that position; the target model scores all of them in
 * one forward pass, giving its distributions p_1..p_{k+1}. The rule of
 * Leviathan et al. ("Fast inference from transformers via speculative
 * decoding", 2023) and Chen et al. ("Accelerating large language model
 * decoding with speculative sampling", 2023), which vLLM's rejection sampler
 * and transformers' assisted generation also follow:
 *
 *   for i = 1..k: accept x_i if coin_i < p_i(x_i) / q_i(x_i) (always when p >= q);
 *   at the first rejection, stop and draw the replacement from the residual
 *     norm(max(0, p_i - q_i));
 *   when all k are accepted, the caller draws a bonus token from p_{k+1}.
 *
 * Every token this emits is distributed exactly as if drawn from p alone. p and
 * q are the distributions the tokens are sampled from (after the sampling
 * chain: temperature, top-k, ...); with temperature 0 both are one-hot, so a
 * draft token is kept exactly when it is the target's argmax and the residual
 * is the target's argmax: the output is the target's greedy output.
 */
#ifndef LMD_SPECULATIVE_H
#define LMD_SPECULATIVE_H

#include "lmdecode.h"

/* Where the speculative loop takes its coins: sequence k's draft draws at step t use
 * lmd_rng_uniform(seed, k, t, 1) (the target's own draw there is index 0, as in
 * generate); its acceptance coin and residual draw at step t use the block of stream
 * k | LMD_SPECULATIVE_STREAM, indices 0 and 1. */
#define LMD_SPECULATIVE_STREAM (UINT64_C(1) << 63)

/*
 * The verification of k >= 0 draft tokens.
 *   draft_tokens     (k,) the proposed tokens
 *   draft_logprobs   (k, vocab) log q_i: the distributions they were drawn from
 *   target_logprobs  (k, vocab) log p_i at the same positions (a (k+1)-th row, if the
 *                    caller has one, is not read: the bonus draw is the caller's)
 *   coins            (k, 2) in [0, 1): position i's acceptance coin, then its residual coin
 * Rows hold log-probabilities: finite or -inf (a removed token), each row's
 * probabilities summing to 1 within 1e-3. *n_accepted receives the number of
 * leading draft tokens kept (0..k); when it is below k, *residual_token receives
 * the replacement drawn from norm(max(0, p - q)) at that position by inverse CDF in
 * id order (from p itself in the degenerate case where that residual is all zero),
 * otherwise -1. Errors: LMD_ERR_INVALID_ARG for NaN/+inf, an unnormalized row, a
 * draft token outside [0, vocab) or one its own q gives probability 0.
 */
lmd_status lmd_speculative_verify(const int32_t *draft_tokens, int32_t k, const float *draft_logprobs,
                                  const float *target_logprobs, int32_t vocab, const double *coins,
                                  int32_t *n_accepted, int32_t *residual_token, lmd_error *err);

#endif /* LMD_SPECULATIVE_H */
