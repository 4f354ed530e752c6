/* test_speculative.c -- the verification rule of speculative.h on hand-computed cases,
 * and its output distribution against the target's by a large-sample frequency check. */
#include <math.h>
#include <stdint.h>

#include "rng.h"
#include "speculative.h"
#include "test_util.h"

static void logs(float *out, const double *p, int n) {
    for (int i = 0; i < n; i++) out[i] = p[i] > 0 ? (float)log(p[i]) : -INFINITY;
}

static void test_hand_cases(void) {
    const double p[3] = {0.5, 0.2, 0.3}, q[3] = {0.2, 0.6, 0.2};
    float lp[3], lq[3];
    logs(lp, p, 3);
    logs(lq, q, 3);
    lmd_error err;
    int32_t kept, token, x = 1;
    /* token 1: kept while coin < p/q = 1/3; the residual max(0, p - q) = (0.3, 0, 0.1) */
    double coins[2] = {0.33, 0.0};
    CHECK(lmd_speculative_verify(&x, 1, lq, lp, 3, coins, &kept, &token, &err) == LMD_OK && kept == 1 && token == -1);
    coins[0] = 0.34;
    coins[1] = 0.74;
    CHECK(lmd_speculative_verify(&x, 1, lq, lp, 3, coins, &kept, &token, &err) == LMD_OK && kept == 0 && token == 0);
    coins[1] = 0.76;
    CHECK(lmd_speculative_verify(&x, 1, lq, lp, 3, coins, &kept, &token, &err) == LMD_OK && kept == 0 && token == 2);
    /* p >= q: kept whatever the coin */
    x = 0;
    coins[0] = 0.9999999;
    CHECK(lmd_speculative_verify(&x, 1, lq, lp, 3, coins, &kept, &token, &err) == LMD_OK && kept == 1);
    /* no proposal: nothing to judge */
    CHECK(lmd_speculative_verify(NULL, 0, NULL, NULL, 3, NULL, &kept, &token, &err) == LMD_OK && kept == 0 &&
          token == -1);
    /* errors name the row and the value */
    x = 3;
    CHECK(lmd_speculative_verify(&x, 1, lq, lp, 3, coins, &kept, &token, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "draft_tokens[0] (=3) is outside [0, 3)");
    x = 1;
    float zero[3] = {0.0f, -INFINITY, -INFINITY};
    CHECK(lmd_speculative_verify(&x, 1, zero, lp, 3, coins, &kept, &token, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "probability 0");
    float unnormalized[3] = {0.0f, -5.0f, 0.0f}; /* p(1) < q(1): rejected */
    coins[0] = 0.5; /* the residual pass reads the whole rows */
    CHECK(lmd_speculative_verify(&x, 1, lq, unnormalized, 3, coins, &kept, &token, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "sum to 2.00674");
    float with_nan[3] = {lp[0], lp[1], NAN};
    CHECK(lmd_speculative_verify(&x, 1, lq, with_nan, 3, coins, &kept, &token, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "target_logprobs[0, 2] is NaN");
    coins[1] = 1.0;
    CHECK(lmd_speculative_verify(&x, 1, lq, lp, 3, coins, &kept, &token, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "coins[0, 1]");
}

/* 200k proposals x ~ q, verified: the first emitted token's frequencies match p within 5
 * standard errors (0.5% absolute at p ~ 0.3) */
static void test_output_follows_the_target(void) {
    const double p[4] = {0.1, 0.4, 0.3, 0.2}, q[4] = {0.4, 0.1, 0.25, 0.25};
    float lp[4], lq[4];
    logs(lp, p, 4);
    logs(lq, q, 4);
    const int N = 200000;
    int counts[4] = {0};
    lmd_error err;
    for (int n = 0; n < N; n++) {
        double u = lmd_rng_uniform(5, 0, (uint64_t)n, 1), cum = 0;
        int32_t x = 3;
        for (int32_t v = 0; v < 4; v++)
            if (u < (cum += q[v])) {
                x = v;
                break;
            }
        double coins[2] = {lmd_rng_uniform(5, 1, (uint64_t)n, 0), lmd_rng_uniform(5, 1, (uint64_t)n, 1)};
        int32_t kept, token;
        if (lmd_speculative_verify(&x, 1, lq, lp, 4, coins, &kept, &token, &err) != LMD_OK) {
            CHECK(0);
            return;
        }
        counts[kept ? x : token]++;
    }
    for (int v = 0; v < 4; v++) CHECK_CLOSE((double)counts[v] / N, p[v], 5 * sqrt(p[v] * (1 - p[v]) / N));
}

int main(void) {
    test_hand_cases();
    test_output_follows_the_target();
    return test_report("test_speculative");
}
