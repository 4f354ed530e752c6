/* speculative.c -- speculative sampling's verification rule (see speculative.h).
 *
 * Glossary: k draft tokens, V the vocabulary, p the target's distribution, q the
 * draft's. Probabilities are exp of the float log-probabilities, in double. */
#include "speculative.h"

#include <math.h>

/* How far a row's probabilities may sum from 1 (float log-probs of a 256k vocabulary
 * sum to 1 within ~1e-5). */
#define NORMALIZATION_SLACK 1e-3

static int bad_logprob(float x) { return isnan(x) || x == INFINITY; }

/* The residual norm(max(0, p - q)) of one position, drawn by inverse CDF in id order;
 * the rows are checked as they are read. */
static lmd_status draw_residual(const float *p_row, const float *q_row, int32_t vocab, double coin,
                                int32_t position, int32_t *token, lmd_error *err) {
    double p_sum = 0.0, q_sum = 0.0, total = 0.0;
    for (int32_t v = 0; v < vocab; v++) {
        if (bad_logprob(p_row[v]) || bad_logprob(q_row[v]))
            return lmd_fail(err, LMD_ERR_INVALID_ARG, "%s_logprobs[%d, %d] is %s; log-probabilities must be finite or -inf",
                            bad_logprob(p_row[v]) ? "target" : "draft", (int)position, (int)v,
                            isnan(bad_logprob(p_row[v]) ? p_row[v] : q_row[v]) ? "NaN" : "+inf");
        const double p = exp((double)p_row[v]), q = exp((double)q_row[v]);
        p_sum += p;
        q_sum += q;
        total += p > q ? p - q : 0.0;
    }
    if (fabs(p_sum - 1.0) > NORMALIZATION_SLACK || fabs(q_sum - 1.0) > NORMALIZATION_SLACK)
        return lmd_fail(err, LMD_ERR_INVALID_ARG,
                        "%s_logprobs[%d] is not a log-probability row: its probabilities sum to %.6g",
                        fabs(p_sum - 1.0) > NORMALIZATION_SLACK ? "target" : "draft", (int)position,
                        fabs(p_sum - 1.0) > NORMALIZATION_SLACK ? p_sum : q_sum);
    /* p == q up to rounding everywhere: a rejection there is rounding's, so draw from p */
    const int from_p = !(total > 0.0);
    const double target = coin * (from_p ? p_sum : total);
    double cum = 0.0;
    int32_t last = -1;
    for (int32_t v = 0; v < vocab; v++) {
        const double p = exp((double)p_row[v]), q = exp((double)q_row[v]);
        const double r = from_p ? p : (p > q ? p - q : 0.0);
        if (!(r > 0.0)) continue;
        last = v;
        cum += r;
        if (cum > target) break;
    }
    *token = last; /* the last token with mass when rounding leaves cum <= target */
    return LMD_OK;
}

lmd_status lmd_speculative_verify(const int32_t *draft_tokens, int32_t k, const float *draft_logprobs,
                                  const float *target_logprobs, int32_t vocab, const double *coins,
                                  int32_t *n_accepted, int32_t *residual_token, lmd_error *err) {
    if (k < 0 || vocab < 1 || (k > 0 && (!draft_tokens || !draft_logprobs || !target_logprobs || !coins)) ||
        !n_accepted || !residual_token)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "speculative_verify: bad arguments (k=%d, vocab=%d)", (int)k,
                        (int)vocab);
    for (int32_t i = 0; i < k; i++) {
        const int32_t x = draft_tokens[i];
        if (x < 0 || x >= vocab)
            return lmd_fail(err, LMD_ERR_INVALID_ARG, "draft_tokens[%d] (=%d) is outside [0, %d)", (int)i, (int)x,
                            (int)vocab);
        for (int j = 0; j < 2; j++)
            if (!(coins[2 * i + j] >= 0.0 && coins[2 * i + j] < 1.0))
                return lmd_fail(err, LMD_ERR_INVALID_ARG, "coins[%d, %d] (=%g) must be in [0, 1)", (int)i, j,
                                coins[2 * i + j]);
        const float lq = draft_logprobs[(int64_t)i * vocab + x], lp = target_logprobs[(int64_t)i * vocab + x];
        if (bad_logprob(lq) || bad_logprob(lp))
            return lmd_fail(err, LMD_ERR_INVALID_ARG, "%s_logprobs[%d, %d] is %s; log-probabilities must be finite or -inf",
                            bad_logprob(lp) ? "target" : "draft", (int)i, (int)x,
                            isnan(bad_logprob(lp) ? lp : lq) ? "NaN" : "+inf");
        if (lq == -INFINITY)
            return lmd_fail(err, LMD_ERR_INVALID_ARG,
                            "draft_tokens[%d] (=%d) has probability 0 under draft_logprobs[%d]: it cannot have been drawn from it",
                            (int)i, (int)x, (int)i);
        /* coin < p / q, without dividing: always true when p >= q, as coin < 1 */
        if (!(coins[2 * i] * exp((double)lq) < exp((double)lp))) {
            int32_t token = -1;
            lmd_status st = draw_residual(target_logprobs + (int64_t)i * vocab, draft_logprobs + (int64_t)i * vocab,
                                          vocab, coins[2 * i + 1], i, &token, err);
            if (st != LMD_OK) return st;
            *n_accepted = i;
            *residual_token = token;
            return LMD_OK;
        }
    }
    *n_accepted = k;
    *residual_token = -1;
    return LMD_OK;
}
