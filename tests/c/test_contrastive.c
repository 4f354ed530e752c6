/* test_contrastive.c -- contrastive decoding's scores on a hand-computed case. */
#include <math.h>

#include "contrastive.h"
#include "test_util.h"

int main(void) {
    /* expert (0.5, 0.3, 0.15, 0.05), amateur (0.6, 0.1, 0.2, 0.1), alpha 0.2: token 3 is
     * below 0.2 * 0.5; the others score log(5/6), log(3), log(3/4) */
    const double pe[4] = {0.5, 0.3, 0.15, 0.05}, pa[4] = {0.6, 0.1, 0.2, 0.1};
    float e[4], a[4], s[4];
    for (int i = 0; i < 4; i++) {
        e[i] = (float)log(pe[i]) + 2.0f; /* logits: any shift */
        a[i] = (float)log(pa[i]) - 1.0f;
    }
    lmd_error err;
    CHECK(lmd_contrastive_scores(e, a, 4, 0.2, 1.0, s, &err) == LMD_OK);
    CHECK_CLOSE(s[0], log(5.0 / 6.0), 1e-6);
    CHECK_CLOSE(s[1], log(3.0), 1e-6);
    CHECK_CLOSE(s[2], log(0.75), 1e-6);
    CHECK(s[3] == -INFINITY);
    /* amateur temperature 2: p_AMA ~ sqrt(pa), renormalized */
    CHECK(lmd_contrastive_scores(e, a, 4, 0.0, 2.0, s, &err) == LMD_OK);
    double z = 0;
    for (int i = 0; i < 4; i++) z += sqrt(pa[i]);
    for (int i = 0; i < 4; i++) CHECK_CLOSE(s[i], log(pe[i]) - log(sqrt(pa[i]) / z), 2e-6);
    /* errors */
    a[2] = NAN;
    CHECK(lmd_contrastive_scores(e, a, 4, 0.2, 1.0, s, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "amateur logits[2] is NaN");
    CHECK(lmd_contrastive_scores(e, e, 4, 1.5, 1.0, s, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "alpha (=1.5)");
    CHECK(lmd_contrastive_scores(e, e, 4, 0.1, 0.0, s, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "amateur_temperature (=0)");
    /* the amateur's logits are divided in float32: 1e-50 is 0 there, and 1e-37 takes a logit
     * of 50 past FLT_MAX (the scores were NaN) */
    CHECK(lmd_contrastive_scores(e, e, 4, 0.1, 1e-50, s, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "amateur_temperature (=1e-50) must be in [1.1754944e-38, 3.4028235e+38]");
    const float big[4] = {1.0f, 50.0f, 0.5f, -INFINITY};
    CHECK(lmd_contrastive_scores(e, big, 4, 0.1, 1e-37, s, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "amateur_temperature (=1e-37) takes the largest amateur logit, logits[1] (=50), out of");
    const float small[4] = {1.0f, 2.0f, 0.5f, -INFINITY};
    CHECK(lmd_contrastive_scores(e, small, 4, 0.0, 1e-37, s, &err) == LMD_OK);
    for (int i = 0; i < 4; i++) CHECK(!isnan(s[i]));
    return test_report("test_contrastive");
}
