/* contrastive.c -- contrastive decoding's scores (see contrastive.h).
 *
 * Both log-softmaxes are taken as (z - max) - log(sum exp(z - max)), the form the
 * sampling module uses, in float with double sums. */
#include "contrastive.h"

#include <math.h>

static int bad_logit(float x) { return isnan(x) || x == INFINITY; }

// max of z (vocab,) and log sum exp(z / t - max / t) (with t the temperature); -1 in
// *bad_index unless some entry is NaN or +inf
static float log_normalizer(const float *z, int32_t vocab, float t, float *log_total, int32_t *bad_index) {
    float max = -INFINITY;
    *bad_index = -1;
    for (int32_t v = 0; v < vocab; v++) {
        if (bad_logit(z[v])) {
            *bad_index = v;
            return 0.0f;
        }
        max = z[v] > max ? z[v] : max;
    }
    double total = 0.0;
    for (int32_t v = 0; v < vocab; v++) total += exp((double)(z[v] / t - max / t));
    *log_total = (float)log(total);
    return max;
}

lmd_status lmd_contrastive_scores(const float *expert_logits, const float *amateur_logits, int32_t vocab,
                                  double alpha, double amateur_temperature, float *scores, lmd_error *err) {
    if (vocab < 1 || expert_logits == NULL || amateur_logits == NULL || scores == NULL)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "contrastive_scores: bad arguments (vocab=%d)", (int)vocab);
    if (!(alpha >= 0.0 && alpha <= 1.0))
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "alpha (=%g) must be in [0, 1]", alpha);
    if (!(amateur_temperature > 0.0 && amateur_temperature < INFINITY))
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "amateur_temperature (=%g) must be > 0", amateur_temperature);
    float expert_total, amateur_total;
    int32_t bad;
    const float expert_max = log_normalizer(expert_logits, vocab, 1.0f, &expert_total, &bad);
    if (bad >= 0)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "expert logits[%d] is %s; logits must be finite or -inf", (int)bad,
                        isnan(expert_logits[bad]) ? "NaN" : "+inf");
    const float t = (float)amateur_temperature;
    const float amateur_max = log_normalizer(amateur_logits, vocab, t, &amateur_total, &bad);
    if (bad >= 0)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "amateur logits[%d] is %s; logits must be finite or -inf", (int)bad,
                        isnan(amateur_logits[bad]) ? "NaN" : "+inf");
    if (expert_max == -INFINITY || amateur_max == -INFINITY)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "every %s logit is -inf", expert_max == -INFINITY ? "expert" : "amateur");
    /* p_EXP(x) >= alpha * p_max  <=>  z(x) - max >= log(alpha) */
    const float cut = alpha > 0.0 ? (float)log(alpha) : -INFINITY;
    for (int32_t v = 0; v < vocab; v++) {
        const float expert_lp = expert_logits[v] - expert_max;
        if (expert_lp == -INFINITY || expert_lp < cut) {
            scores[v] = -INFINITY;
            continue;
        }
        const float amateur_lp = (amateur_logits[v] / t - amateur_max / t) - amateur_total;
        /* an amateur probability of 0 makes the score +inf: the largest finite float keeps
         * the token first without breaking the arithmetic after it */
        const float score = (expert_lp - expert_total) - amateur_lp;
        scores[v] = score < INFINITY ? score : 3.4028235e38f;
    }
    return LMD_OK;
}
