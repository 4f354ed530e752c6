/* contrastive.c -- contrastive decoding's scores (see contrastive.h).
 *
 * Both log-softmaxes are the sampling module's (lmd_row_log_normalizer), so the
 * amateur's at temperature t is the distribution lmd_sample_row would give it. */
#include "contrastive.h"

#include <math.h>

#include "sampling.h"

lmd_status lmd_contrastive_check(double alpha, double amateur_temperature, lmd_error *err) {
    char v[LMD_NUMBER_CHARS];
    if (!(alpha >= 0.0 && alpha <= 1.0))
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "alpha (=%s) must be in [0, 1]", lmd_format_double(v, alpha));
    if (!(amateur_temperature > 0.0 && amateur_temperature < INFINITY))
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "amateur_temperature (=%s) must be > 0",
                        lmd_format_double(v, amateur_temperature));
    /* the amateur's logits are divided by it in float32, as sampling's by a temperature */
    return lmd_check_float32_factor("amateur_temperature", amateur_temperature, err);
}

lmd_status lmd_contrastive_scores(const float *expert_logits, const float *amateur_logits, int32_t vocab,
                                  double alpha, double amateur_temperature, float *scores, lmd_error *err) {
    if (vocab < 1 || expert_logits == NULL || amateur_logits == NULL || scores == NULL)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "contrastive_scores: bad arguments (vocab=%d)", (int)vocab);
    lmd_status st = lmd_contrastive_check(alpha, amateur_temperature, err);
    if (st != LMD_OK) return st;
    float expert_total, amateur_total;
    int32_t bad;
    const float expert_max = lmd_row_log_normalizer(expert_logits, vocab, 1.0f, &expert_total, &bad);
    if (bad >= 0)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "expert logits[%d] is %s; logits must be finite or -inf", (int)bad,
                        isnan(expert_logits[bad]) ? "NaN" : "+inf");
    const float t = (float)amateur_temperature;
    const float amateur_ms = lmd_row_log_normalizer(amateur_logits, vocab, t, &amateur_total, &bad);
    if (bad >= 0)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "amateur logits[%d] is %s; logits must be finite or -inf", (int)bad,
                        isnan(amateur_logits[bad]) ? "NaN" : "+inf");
    const int32_t over = isfinite(amateur_ms) ? -1 : lmd_scaling_overflow(amateur_logits, vocab, t);
    if (over >= 0) { /* as lmd_sample_row refuses the temperature */
        char tv[LMD_NUMBER_CHARS], zv[LMD_NUMBER_CHARS];
        return lmd_fail(err, LMD_ERR_INVALID_ARG,
                        "amateur_temperature (=%s) takes the largest amateur logit, logits[%d] (=%s), out of "
                        "the float32 range",
                        lmd_format_double(tv, amateur_temperature), (int)over,
                        lmd_format_float(zv, amateur_logits[over]));
    }
    if (expert_max == -INFINITY || amateur_ms == -INFINITY)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "every %s logit is -inf", expert_max == -INFINITY ? "expert" : "amateur");
    /* p_EXP(x) >= alpha * p_max  <=>  z(x) - max >= log(alpha) */
    const float cut = alpha > 0.0 ? (float)log(alpha) : -INFINITY;
    int32_t n_infinite = 0;
    for (int32_t v = 0; v < vocab; v++) {
        const float expert_lp = expert_logits[v] - expert_max;
        if (expert_lp == -INFINITY || expert_lp < cut) {
            scores[v] = -INFINITY;
            continue;
        }
        const float amateur_lp = (amateur_logits[v] / t - amateur_ms) - amateur_total;
        scores[v] = (expert_lp - expert_total) - amateur_lp;
        n_infinite += scores[v] == INFINITY;
    }
    if (n_infinite > 0) {
        /* plausible tokens the amateur gives probability 0 score +inf: they outrank every
         * other token by an infinite margin, whatever the temperature, so they alone stay,
         * ranked by the expert's log-probability (finite scores keep the sampling arithmetic
         * after this sound) */
        for (int32_t v = 0; v < vocab; v++)
            scores[v] = scores[v] == INFINITY ? (expert_logits[v] - expert_max) - expert_total : -INFINITY;
    }
    return LMD_OK;
}
