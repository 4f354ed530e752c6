/* test_sampling.c -- the sampling core against hand-computed cases and a
 * naive sort-based reference, in C, so that the sanitizer build exercises
 * every path (prefilters, bucketed cuts, the dense draw, parallel rows). */
#include <stdint.h>
#include <string.h>

#include "rng.h"
#include "sampling.h"
#include "test_util.h"

/* ---------------- Philox known answers (Random123 kat_vectors) ---------------- */

static void test_philox_known_answers(void) {
    static const uint32_t cases[3][10] = {
        {0, 0, 0, 0, 0, 0, 0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8},
        {0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff, 0x408f276d,
         0x41c83b0e, 0xa20bc7c6, 0x6d5451fd},
        {0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344, 0xa4093822, 0x299f31d0, 0xd16cfe09,
         0x94fdcceb, 0x5001e420, 0x24126ea1},
    };
    for (int c = 0; c < 3; c++) {
        uint32_t out[4];
        lmd_philox4x32_10(cases[c], cases[c] + 4, out);
        for (int j = 0; j < 4; j++) CHECK(out[j] == cases[c][6 + j]);
    }
    /* the documented uniform: ((x0 << 32 | x1) >> 11) * 2^-53 of counter 0, key 0 */
    double u = lmd_rng_uniform(0, 0, 0, 0);
    CHECK(u == (double)((((uint64_t)0x6627e8d5u << 32) | 0xe169c58du) >> 11) * 0x1.0p-53);
    for (uint64_t step = 0; step < 1000; step++) {
        double v = lmd_rng_uniform(42, 7, step, (int)(step & 1));
        CHECK(v >= 0.0 && v < 1.0);
    }
}

/* ---------------- helpers ---------------- */

static lmd_sampler *sampler(int32_t vocab) {
    lmd_sampler *s = NULL;
    lmd_error err;
    if (lmd_sampler_init(&s, vocab, &err) != LMD_OK) {
        fprintf(stderr, "sampler init failed: %s\n", err.msg);
        exit(1);
    }
    return s;
}

static void process(lmd_sampler *s, const lmd_sampling_params *p, const lmd_row_inputs *in,
                    const float *z, int32_t vocab, float *out) {
    lmd_error err;
    lmd_status st = lmd_sample_row(s, p, in, z, vocab, -1.0, out, NULL, NULL, &err);
    if (st != LMD_OK) fprintf(stderr, "unexpected error: %s\n", err.msg);
    CHECK(st == LMD_OK);
}

/* ---------------- the seeds' worked examples ---------------- */

static void test_seed_examples(void) {
    lmd_sampler *s = sampler(8);
    lmd_sampling_params p;
    float z[4] = {3.0f, 1.0f, 0.5f, 0.2f}, out[4];
    const double temps[3] = {1.0, 0.5, 2.0};
    const double expect[3][4] = {
        {0.782, 0.106, 0.064, 0.048}, {0.972, 0.018, 0.007, 0.004}, {0.526, 0.194, 0.151, 0.130}};
    for (int k = 0; k < 3; k++) {
        lmd_sampling_params_default(&p);
        p.temperature = temps[k];
        process(s, &p, NULL, z, 4, out);
        for (int i = 0; i < 4; i++) CHECK_CLOSE(exp(out[i]), expect[k][i], 5e-4);
    }
    /* nucleus at 0.9 of [0.782, 0.106, 0.064, 0.048]: {0, 1, 2} renormalized */
    lmd_sampling_params_default(&p);
    p.top_p = 0.9;
    process(s, &p, NULL, z, 4, out);
    CHECK_CLOSE(exp(out[0]), 0.821, 5e-4);
    CHECK_CLOSE(exp(out[1]), 0.111, 5e-4);
    CHECK_CLOSE(exp(out[2]), 0.067, 5e-4);
    CHECK(out[3] == -INFINITY);
    /* practice problem 2: p = [0.4, 0.3, 0.15, 0.10, 0.05] -> nucleus of size 4 */
    float q[5] = {logf(0.4f), logf(0.3f), logf(0.15f), logf(0.10f), logf(0.05f)}, outq[5];
    process(s, &p, NULL, q, 5, outq);
    for (int i = 0; i < 4; i++) CHECK(outq[i] > -INFINITY);
    CHECK(outq[4] == -INFINITY);
    lmd_sampler_free(s);
}

/* ---------------- processors on small hand cases ---------------- */

static void test_processors_by_hand(void) {
    lmd_sampler *s = sampler(16);
    lmd_sampling_params p;
    float out[6];
    /* top-k keeps every token tied with the k-th value */
    float ties[6] = {1.0f, 3.0f, 2.0f, 2.0f, 0.0f, 2.0f};
    lmd_sampling_params_default(&p);
    p.top_k = 2;
    process(s, &p, NULL, ties, 6, out);
    CHECK(out[0] == -INFINITY && out[4] == -INFINITY);
    CHECK(out[1] > -INFINITY && out[2] > -INFINITY && out[3] > -INFINITY && out[5] > -INFINITY);

    /* a cumulative-mass cut whose boundary bucket holds every token: all equal logits */
    {
        enum { FLAT = 1000 };
        lmd_sampler *big = sampler(FLAT);
        static float equal[FLAT], flat_out[FLAT];
        for (int i = 0; i < FLAT; i++) equal[i] = 0.25f;
        lmd_sampling_params_default(&p);
        p.top_p = 0.5; /* ties are kept together: all of them */
        process(big, &p, NULL, equal, FLAT, flat_out);
        for (int i = 0; i < FLAT; i++) CHECK_CLOSE(flat_out[i], -log((double)FLAT), 1e-5);
        lmd_sampling_params_default(&p);
        p.typical_p = 0.3;
        process(big, &p, NULL, equal, FLAT, flat_out);
        for (int i = 0; i < FLAT; i++) CHECK_CLOSE(flat_out[i], -log((double)FLAT), 1e-5);
        lmd_sampler_free(big);
    }

    /* greedy: lowest index among ties, one-hot log-probs */
    float twin[4] = {0.0f, 5.0f, 5.0f, 1.0f};
    int32_t token = -1;
    float lp = 1.0f;
    lmd_error err;
    lmd_sampling_params_default(&p);
    p.temperature = 0.0;
    CHECK(lmd_sample_row(s, &p, NULL, twin, 4, 0.5, out, &token, &lp, &err) == LMD_OK);
    CHECK(token == 1 && lp == 0.0f && out[1] == 0.0f && out[2] == -INFINITY);

    /* repetition penalty (CTRL), frequency/presence (vLLM) and masks */
    float z[6] = {2.0f, -2.0f, 1.0f, 0.5f, 0.0f, -1.0f};
    int32_t context[5] = {0, 1, 2, 2, 2}; /* prompt = {0, 1}, generated = {2, 2, 2} */
    lmd_row_inputs in = {context, 5, 2, NULL, NULL, 0, NULL, -1, NULL, 0};
    lmd_sampling_params_default(&p);
    p.repetition_penalty = 2.0;
    p.frequency_penalty = 0.5;
    p.presence_penalty = 0.25;
    process(s, &p, &in, z, 6, out);
    /* expected processed logits: 2/2, -2*2, 1/2 - 0.5*3 - 0.25, 0.5, 0, -1 */
    const double processed[6] = {1.0, -4.0, 0.5 - 1.5 - 0.25, 0.5, 0.0, -1.0};
    double norm = 0.0;
    for (int i = 0; i < 6; i++) norm += exp(processed[i]);
    for (int i = 0; i < 6; i++) CHECK_CLOSE(out[i], processed[i] - log(norm), 1e-6);

    int32_t allowed[3] = {1, 3, 5}, banned[1] = {3}, bias_ids[1] = {5};
    float bias_values[1] = {10.0f};
    lmd_row_inputs masks = {NULL, 0, 0, bias_ids, bias_values, 1, allowed, 3, banned, 1};
    lmd_sampling_params_default(&p);
    process(s, &p, &masks, z, 6, out);
    CHECK(out[0] == -INFINITY && out[2] == -INFINITY && out[3] == -INFINITY && out[4] == -INFINITY);
    norm = exp(-2.0) + exp(9.0);
    CHECK_CLOSE(out[1], -2.0 - log(norm), 1e-6);
    CHECK_CLOSE(out[5], 9.0 - log(norm), 1e-6);

    /* no-repeat 2-gram: after ... 3 4 ... 3, token 4 is banned */
    int32_t ngram_ctx[4] = {3, 4, 1, 3};
    lmd_row_inputs ngram = {ngram_ctx, 4, 4, NULL, NULL, 0, NULL, -1, NULL, 0};
    lmd_sampling_params_default(&p);
    p.no_repeat_ngram_size = 2;
    process(s, &p, &ngram, z, 6, out);
    CHECK(out[4] == -INFINITY);
    for (int i = 0; i < 6; i++)
        if (i != 4) CHECK(out[i] > -INFINITY);
    lmd_sampler_free(s);
}

/* ---------------- bad input ---------------- */

static void test_errors(void) {
    lmd_sampler *s = sampler(8);
    lmd_sampling_params p;
    lmd_error err;
    float z[4] = {0.0f, 1.0f, 2.0f, 3.0f}, out[4];
    int32_t token;
#define EXPECT_INVALID(assign, field)                                                         \
    do {                                                                                      \
        lmd_sampling_params_default(&p);                                                      \
        assign;                                                                               \
        CHECK(lmd_sample_row(s, &p, NULL, z, 4, 0.5, out, &token, NULL, &err) ==              \
              LMD_ERR_INVALID_ARG);                                                           \
        CHECK_MSG_CONTAINS(err, field);                                                       \
    } while (0)
    EXPECT_INVALID(p.temperature = -1.0, "temperature");
    EXPECT_INVALID(p.temperature = NAN, "temperature");
    EXPECT_INVALID(p.top_k = -1, "top_k");
    EXPECT_INVALID(p.top_p = 0.0, "top_p");
    EXPECT_INVALID(p.top_p = 1.5, "top_p");
    EXPECT_INVALID(p.min_p = -0.1, "min_p");
    EXPECT_INVALID(p.typical_p = 0.0, "typical_p");
    EXPECT_INVALID(p.epsilon = 1.0, "epsilon");
    EXPECT_INVALID(p.eta = -0.5, "eta");
    EXPECT_INVALID(p.repetition_penalty = 0.0, "repetition_penalty");
    EXPECT_INVALID(p.frequency_penalty = 3.0, "frequency_penalty");
    EXPECT_INVALID(p.presence_penalty = -2.5, "presence_penalty");
    EXPECT_INVALID(p.no_repeat_ngram_size = -1, "no_repeat_ngram_size");
    EXPECT_INVALID(p.min_tokens_to_keep = 0, "min_tokens_to_keep");
#undef EXPECT_INVALID

    lmd_sampling_params_default(&p);
    float with_nan[4] = {0.0f, NAN, 1.0f, 2.0f};
    CHECK(lmd_sample_row(s, &p, NULL, with_nan, 4, 0.5, out, &token, NULL, &err) ==
          LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "logits[1] is NaN");
    float with_inf[4] = {0.0f, 1.0f, INFINITY, 2.0f};
    CHECK(lmd_sample_row(s, &p, NULL, with_inf, 4, 0.5, out, &token, NULL, &err) ==
          LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "logits[2] is +inf");
    int32_t banned_all[4] = {0, 1, 2, 3};
    lmd_row_inputs in = {NULL, 0, 0, NULL, NULL, 0, NULL, -1, banned_all, 4};
    CHECK(lmd_sample_row(s, &p, &in, z, 4, 0.5, out, &token, NULL, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "no token is left");
    int32_t outside[1] = {4};
    lmd_row_inputs bad_ctx = {outside, 1, 0, NULL, NULL, 0, NULL, -1, NULL, 0};
    CHECK(lmd_sample_row(s, &p, &bad_ctx, z, 4, 0.5, out, &token, NULL, &err) ==
          LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "context[0] (=4)");
    CHECK(lmd_sample_row(s, &p, NULL, z, 9, 0.5, out, &token, NULL, &err) == LMD_ERR_INVALID_ARG);
    lmd_sampler_free(s);
}

/* ---------------- against a naive sort-based reference ---------------- */

typedef struct {
    double value;
    int32_t id;
} scored;

static int by_value_desc(const void *a, const void *b) {
    double x = ((const scored *)a)->value, y = ((const scored *)b)->value;
    return (x < y) - (x > y);
}

/* kept[i] = 1 for the tokens the reference keeps (top_k, then top_p, then min_p). */
static void naive_keep(const float *z, int32_t vocab, double t, int32_t top_k, double top_p,
                       double min_p, int *kept, scored *buf) {
    for (int32_t i = 0; i < vocab; i++) {
        buf[i].value = (double)(z[i] / (float)t);
        buf[i].id = i;
        kept[i] = 1;
    }
    qsort(buf, (size_t)vocab, sizeof *buf, by_value_desc);
    int32_t n = vocab;
    if (top_k > 0 && top_k < n) {
        double kth = buf[top_k - 1].value;
        while (n > 0 && buf[n - 1].value < kth) n--;
    }
    double total = 0.0;
    for (int32_t i = 0; i < n; i++) total += exp(buf[i].value - buf[0].value);
    if (top_p < 1.0) {
        /* keep while the mass of strictly better tokens is < top_p */
        int32_t m = 0;
        double above = 0.0;
        while (m < n) {
            int32_t group_end = m;
            double group = 0.0;
            while (group_end < n && buf[group_end].value == buf[m].value)
                group += exp(buf[group_end++].value - buf[0].value);
            if (above >= top_p * total) break;
            above += group;
            m = group_end;
        }
        n = m;
    }
    if (min_p > 0.0) {
        int32_t m = 0;
        while (m < n && exp(buf[m].value - buf[0].value) >= min_p) m++;
        n = m > 0 ? m : 1;
    }
    for (int32_t i = 0; i < vocab; i++) kept[i] = 0;
    for (int32_t i = 0; i < n; i++) kept[buf[i].id] = 1;
}

static uint64_t lcg_state = 12345;
static double uniform01(void) {
    lcg_state = lcg_state * 6364136223846793005ull + 1442695040888963407ull;
    return (double)(lcg_state >> 11) * 0x1.0p-53;
}

static void test_against_naive(void) {
    const int32_t vocab = 20000;
    lmd_sampler *s = sampler(vocab);
    float *z = malloc(sizeof(float) * vocab), *out = malloc(sizeof(float) * vocab);
    int *kept = malloc(sizeof(int) * vocab);
    scored *buf = malloc(sizeof(scored) * vocab);
    int mismatches = 0;
    for (int trial = 0; trial < 60; trial++) {
        int shape = trial % 3; /* 0: peaked (Zipf-like), 1: flat, 2: few distinct values (ties) */
        for (int32_t i = 0; i < vocab; i++) {
            if (shape == 0) z[i] = (float)(-1.3 * log(1.0 + uniform01() * vocab));
            else if (shape == 1) z[i] = (float)(uniform01() * 2.0);
            else z[i] = (float)(int)(uniform01() * 8.0);
        }
        if (trial % 5 == 0) z[trial] = -INFINITY;
        lmd_sampling_params p;
        lmd_sampling_params_default(&p);
        p.temperature = 0.5 + uniform01();
        int which = (trial / 3) % 4;
        if (which == 0 || which == 3) p.top_k = 1 + (int32_t)(uniform01() * 300);
        if (which == 1 || which == 3) p.top_p = 0.3 + 0.69 * uniform01();
        if (which == 2 || which == 3) p.min_p = 0.01 + 0.2 * uniform01();
        if (trial == 7) p.top_p = 0.9999999;
        process(s, &p, NULL, z, vocab, out);
        naive_keep(z, vocab, p.temperature, p.top_k, p.top_p, p.min_p, kept, buf);
        for (int32_t i = 0; i < vocab; i++)
            if ((out[i] > -INFINITY) != (kept[i] != 0)) mismatches++;
        /* log-probs of the kept set sum to 1 */
        double mass = 0.0;
        for (int32_t i = 0; i < vocab; i++) mass += exp((double)out[i]);
        CHECK_CLOSE(mass, 1.0, 1e-5);
    }
    CHECK(mismatches == 0);
    if (mismatches) fprintf(stderr, "%d kept-set mismatches\n", mismatches);
    free(z);
    free(out);
    free(kept);
    free(buf);
    lmd_sampler_free(s);
}

/* ---------------- draws: frequencies and determinism ---------------- */

static void test_draw_frequencies(void) {
    lmd_sampler *s = sampler(64);
    float z[5] = {2.0f, 1.5f, 1.0f, 0.5f, 0.0f}, logp[5];
    lmd_sampling_params p;
    lmd_sampling_params_default(&p);
    p.temperature = 0.8;
    process(s, &p, NULL, z, 5, logp);
    int counts[5] = {0};
    const int draws = 40000;
    lmd_error err;
    for (int d = 0; d < draws; d++) {
        int32_t token;
        CHECK(lmd_sample_row(s, &p, NULL, z, 5, lmd_rng_uniform(7, 0, (uint64_t)d, 0), NULL, &token,
                             NULL, &err) == LMD_OK);
        counts[token]++;
    }
    for (int i = 0; i < 5; i++) {
        double expect = draws * exp(logp[i]);
        CHECK(fabs(counts[i] - expect) < 5.0 * sqrt(expect)); /* 5 sigma */
    }
    lmd_sampler_free(s);
}

static void test_rows_parallel_equals_serial(void) {
    const int32_t rows = 24, vocab = 9000;
    lmd_sampler *pool[2] = {sampler(vocab), sampler(vocab)};
    float *z = malloc(sizeof(float) * rows * vocab);
    for (int64_t i = 0; i < (int64_t)rows * vocab; i++) z[i] = (float)(uniform01() * 6.0);
    lmd_sampling_params params[24];
    double coins[24];
    for (int r = 0; r < rows; r++) {
        lmd_sampling_params_default(&params[r]);
        params[r].top_p = 0.5 + 0.02 * r;
        params[r].top_k = r % 3 == 0 ? 40 : 0;
        coins[r] = lmd_rng_uniform((uint64_t)r * 977, 0, 3, 0);
    }
    int32_t serial[24], parallel[24];
    float serial_lp[24], parallel_lp[24];
    lmd_error err;
    int32_t failed;
    lmd_set_num_threads(1);
    CHECK(lmd_sample_rows(pool, 1, params, rows, NULL, z, vocab, rows, vocab, coins, NULL,
                          serial, serial_lp, &failed, &err) == LMD_OK);
    lmd_set_num_threads(2);
    CHECK(lmd_sample_rows(pool, 2, params, rows, NULL, z, vocab, rows, vocab, coins, NULL,
                          parallel, parallel_lp, &failed, &err) == LMD_OK);
    lmd_set_num_threads(0);
    for (int r = 0; r < rows; r++) CHECK(serial[r] == parallel[r] && serial_lp[r] == parallel_lp[r]);
    /* the failing row is reported: row 5 has a NaN */
    z[5 * vocab + 3] = NAN;
    CHECK(lmd_sample_rows(pool, 2, params, rows, NULL, z, vocab, rows, vocab, coins, NULL,
                          parallel, parallel_lp, &failed, &err) == LMD_ERR_INVALID_ARG);
    CHECK(failed == 5);
    CHECK_MSG_CONTAINS(err, "logits[3] is NaN");
    free(z);
    lmd_sampler_free(pool[0]);
    lmd_sampler_free(pool[1]);
}

/* lmd_target_logprobs holds, for each row, exactly the entry lmd_sample_row's logprobs
 * hold at the target (temperature 1, no processors), on 1 or 2 threads; its errors name
 * the lowest failing row and write nothing. */
static void test_target_logprobs(void) {
    const int32_t rows = 40, vocab = 3001; /* rows * vocab crosses the parallel threshold */
    lmd_sampler *s = sampler(vocab);
    float *z = malloc(sizeof(float) * rows * vocab), *row_lp = malloc(sizeof(float) * vocab);
    int32_t targets[40];
    float got[40], want[40];
    for (int64_t i = 0; i < (int64_t)rows * vocab; i++) z[i] = (float)(uniform01() * 30.0 - 10.0);
    for (int32_t i = 0; i < vocab; i += 3) z[7 * vocab + i] = -INFINITY; /* a masked row */
    lmd_sampling_params p;
    lmd_sampling_params_default(&p);
    lmd_error err;
    for (int r = 0; r < rows; r++) {
        targets[r] = r == 7 ? 3 : (int32_t)((r * 7919) % vocab); /* row 7 scores a masked token */
        CHECK(lmd_sample_row(s, &p, NULL, z + (int64_t)r * vocab, vocab, -1.0, row_lp, NULL, NULL, &err) == LMD_OK);
        want[r] = row_lp[targets[r]];
    }
    CHECK(want[7] == -INFINITY);
    int32_t failed = 0;
    /* row 0 scores its largest logit, row 1 one that ties with it (both count as greedy) */
    z[0 * vocab + 100] = 25.0f, targets[0] = 100;
    z[1 * vocab + 5] = z[1 * vocab + 900] = 25.0f, targets[1] = 900;
    for (int r = 0; r < 2; r++) {
        CHECK(lmd_sample_row(s, &p, NULL, z + (int64_t)r * vocab, vocab, -1.0, row_lp, NULL, NULL, &err) == LMD_OK);
        want[r] = row_lp[targets[r]];
    }
    for (int threads = 1; threads <= 2; threads++) {
        unsigned char is_max[40];
        lmd_set_num_threads(threads);
        CHECK(lmd_target_logprobs(z, vocab, rows, vocab, targets, got, is_max, &failed, &err) == LMD_OK);
        CHECK(failed == -1);
        CHECK(memcmp(got, want, sizeof got) == 0);
        for (int r = 0; r < rows; r++) { /* the reference: the target's logit against a scan of the row */
            float most = -INFINITY;
            for (int32_t i = 0; i < vocab; i++) most = z[(int64_t)r * vocab + i] > most ? z[(int64_t)r * vocab + i] : most;
            CHECK(is_max[r] == (z[(int64_t)r * vocab + targets[r]] == most));
        }
        CHECK(is_max[0] && is_max[1] && !is_max[2]);
    }
    lmd_set_num_threads(0);
    /* errors: the lowest failing row, and out untouched */
    float untouched[40];
    for (int r = 0; r < rows; r++) untouched[r] = got[r] = 123.0f;
    targets[9] = vocab;
    z[4 * vocab + 17] = INFINITY;
    CHECK(lmd_target_logprobs(z, vocab, rows, vocab, targets, got, NULL, &failed, &err) == LMD_ERR_INVALID_ARG);
    CHECK(failed == 4);
    CHECK_MSG_CONTAINS(err, "logits[17] is +inf");
    z[4 * vocab + 17] = 0.0f;
    CHECK(lmd_target_logprobs(z, vocab, rows, vocab, targets, got, NULL, &failed, &err) == LMD_ERR_INVALID_ARG);
    CHECK(failed == 9);
    CHECK_MSG_CONTAINS(err, "not a token id");
    targets[9] = 0;
    for (int32_t i = 0; i < vocab; i++) z[11 * vocab + i] = -INFINITY;
    CHECK(lmd_target_logprobs(z, vocab, rows, vocab, targets, got, NULL, &failed, &err) == LMD_ERR_INVALID_ARG);
    CHECK(failed == 11);
    CHECK_MSG_CONTAINS(err, "every logit is -inf");
    CHECK(memcmp(got, untouched, sizeof got) == 0);
    free(z);
    free(row_lp);
    lmd_sampler_free(s);
}

/* ---------------- the float32 range: temperature, bias and penalty overflows ---------------- */

/* Every path of the chain (no truncation, top-k, top-p, min-p, typical) either returns a token
 * in [0, V) with finite numbers or an error naming the argument at fault; the outputs are not
 * written on error. Before, a temperature of 1e-50 (0 in float32) or a logit / temperature past
 * FLT_MAX made NaN logits, an empty candidate list, and an id read from unwritten memory. */
static void test_float32_range(void) {
    lmd_sampler *s = sampler(64);
    lmd_sampling_params p;
    lmd_error err;
    float out[4];
    int32_t token;
    float lp;
    const float small[3] = {1.0f, 2.0f, 0.5f};

    /* temperatures that are not normal float32s: refused whatever the logits */
    const double not_float[3] = {1e-50, 1e-39, 1e39};
    const char *shown[3] = {"temperature (=1e-50)", "temperature (=1e-39)", "temperature (=1e+39)"};
    for (int i = 0; i < 3; i++) {
        lmd_sampling_params_default(&p);
        p.temperature = not_float[i];
        CHECK(lmd_sampling_params_validate(&p, &err) == LMD_ERR_INVALID_ARG);
        CHECK_MSG_CONTAINS(err, shown[i]);
        CHECK_MSG_CONTAINS(err, "must be 0 (greedy) or in [1.1754944e-38, 3.4028235e+38]");
        token = -7;
        CHECK(lmd_sample_row(s, &p, NULL, small, 3, 0.5, out, &token, &lp, &err) == LMD_ERR_INVALID_ARG);
        CHECK(token == -7);
    }
    lmd_sampling_params_default(&p);
    p.repetition_penalty = 1e-50;
    CHECK(lmd_sampling_params_validate(&p, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "repetition_penalty (=1e-50) must be in [1.1754944e-38");
    /* the bounds themselves are fine, and so is the printed FLT_MAX (which rounds to it) */
    const double edges[3] = {1.1754944e-38, 3.4028235e38, 0x1.fffffep127};
    for (int i = 0; i < 3; i++) {
        p.temperature = edges[i];
        p.repetition_penalty = edges[i];
        CHECK(lmd_sampling_params_validate(&p, &err) == LMD_OK);
    }

    /* a tiny but normal temperature: effectively greedy, every number finite */
    const struct {
        int32_t top_k;
        double top_p, min_p, typical_p;
    } paths[5] = {{0, 1.0, 0.0, 1.0}, {2, 1.0, 0.0, 1.0}, {0, 0.9, 0.0, 1.0}, {0, 1.0, 0.1, 1.0}, {0, 1.0, 0.0, 0.5}};
    for (int k = 0; k < 5; k++) {
        lmd_sampling_params_default(&p);
        p.top_k = paths[k].top_k, p.top_p = paths[k].top_p, p.min_p = paths[k].min_p;
        p.typical_p = paths[k].typical_p;
        p.temperature = 1e-37;
        CHECK(lmd_sample_row(s, &p, NULL, small, 3, 0.999, out, &token, &lp, &err) == LMD_OK);
        CHECK(token == 1 && lp == 0.0f && out[1] == 0.0f);
        CHECK(out[0] < -1e36f && out[2] < -1e36f); /* -1e37, -1.5e37, or -inf where truncated */

        /* the largest logit / temperature past FLT_MAX: an error naming both */
        const float high[4] = {1.0f, 50.0f, 5.0f, -INFINITY}, low[4] = {-60.0f, -50.0f, -55.0f, -INFINITY};
        token = -7;
        CHECK(lmd_sample_row(s, &p, NULL, high, 4, 0.5, out, &token, &lp, &err) == LMD_ERR_INVALID_ARG);
        CHECK_MSG_CONTAINS(err, "temperature (=1e-37) takes the largest logit, logits[1] (=50), out of the float32");
        CHECK(token == -7);
        CHECK(lmd_sample_row(s, &p, NULL, low, 4, 0.5, out, &token, &lp, &err) == LMD_ERR_INVALID_ARG);
        CHECK_MSG_CONTAINS(err, "temperature (=1e-37) takes the largest logit, logits[1] (=-50), out");
        /* the same after a bias: the value scaled is the biased one, and said so */
        const int32_t bias_id[1] = {1};
        const float bias_value[1] = {-1.0f};
        lmd_row_inputs biased = {NULL, 0, 0, bias_id, bias_value, 1, NULL, -1, NULL, 0};
        CHECK(lmd_sample_row(s, &p, &biased, low, 4, 0.5, out, &token, &lp, &err) == LMD_ERR_INVALID_ARG);
        CHECK_MSG_CONTAINS(err, "logits[1] (=-51 after bias and penalties)");
        /* a smaller logit taken below -FLT_MAX is -inf, as in float32 division: probability 0,
         * which it has anyway (it is 2^103 or more below the largest) */
        const float below[4] = {10.0f, -50.0f, 5.0f, 0.0f};
        CHECK(lmd_sample_row(s, &p, NULL, below, 4, 0.999, out, &token, &lp, &err) == LMD_OK);
        CHECK(token == 0 && lp == 0.0f && out[0] == 0.0f && out[1] == -INFINITY);
        /* a huge logit at temperature 0.5 */
        p.temperature = 0.5;
        const float huge[2] = {3e38f, 0.0f};
        CHECK(lmd_sample_row(s, &p, NULL, huge, 2, 0.5, out, &token, &lp, &err) == LMD_ERR_INVALID_ARG);
        CHECK_MSG_CONTAINS(err, "temperature (=0.5) takes the largest logit, logits[0] (=3e+38), out");
        /* the largest temperature: a uniform distribution over the unmasked tokens */
        p.temperature = 3e38;
        p.top_k = 0, p.min_p = 0.0, p.typical_p = 1.0;
        const float masked[4] = {1.0f, 2.0f, -INFINITY, 0.5f};
        CHECK(lmd_sample_row(s, &p, NULL, masked, 4, 0.5, out, &token, &lp, &err) == LMD_OK);
        CHECK(token >= 0 && token < 4 && token != 2 && out[2] == -INFINITY);
        CHECK_CLOSE(lp, -log(3.0), 1e-6);
    }

    /* processors that overflow are named, with the caller's logit */
    lmd_sampling_params_default(&p);
    const float big[3] = {1e10f, 0.0f, -1e10f};
    const int32_t first[1] = {0}, last[1] = {2};
    lmd_row_inputs ctx_first = {first, 1, 0, NULL, NULL, 0, NULL, -1, NULL, 0};
    lmd_row_inputs ctx_last = {last, 1, 0, NULL, NULL, 0, NULL, -1, NULL, 0};
    p.repetition_penalty = 1e-30;
    CHECK(lmd_sample_row(s, &p, &ctx_first, big, 3, 0.5, out, &token, &lp, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "repetition_penalty (=1e-30) takes logits[0] (=10000000000) to +inf");
    p.repetition_penalty = 1e30; /* -1e40 is -inf in float32 (and in transformers): a mask */
    CHECK(lmd_sample_row(s, &p, &ctx_last, big, 3, -1.0, out, &token, &lp, &err) == LMD_OK);
    CHECK(token == 0 && out[0] == 0.0f && out[2] == -INFINITY);
    lmd_sampling_params_default(&p);
    const float near_max[2] = {3e38f, 0.0f};
    const int32_t bias_ids[1] = {0};
    float bias_values[1] = {3e38f};
    lmd_row_inputs bias = {NULL, 0, 0, bias_ids, bias_values, 1, NULL, -1, NULL, 0};
    CHECK(lmd_sample_row(s, &p, &bias, near_max, 2, 0.5, out, &token, &lp, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "logit_bias for token 0 (=3e+38) takes logits[0] (=3e+38) to +inf");
    bias_values[0] = -INFINITY; /* a -inf bias masks: no error */
    CHECK(lmd_sample_row(s, &p, &bias, near_max, 2, 0.5, out, &token, &lp, &err) == LMD_OK && token == 1);
    /* a NaN in the caller's logits is still reported as such, with processors on */
    const float with_nan[3] = {0.0f, NAN, 1.0f};
    p.repetition_penalty = 1.5;
    CHECK(lmd_sample_row(s, &p, &ctx_first, with_nan, 3, 0.5, out, &token, &lp, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "logits[1] is NaN");

    /* per-row temperatures through lmd_sample_rows: the row that overflows is the one named */
    lmd_sampling_params rows[2];
    lmd_sampling_params_default(&rows[0]);
    lmd_sampling_params_default(&rows[1]);
    rows[1].temperature = 1e-37;
    const float two_rows[6] = {1.0f, 50.0f, 5.0f, 1.0f, 50.0f, 5.0f};
    const double coins[2] = {0.5, 0.5};
    int32_t tokens[2] = {-7, -7}, failed = -2;
    CHECK(lmd_sample_rows(&s, 1, rows, 2, NULL, two_rows, 3, 2, 3, coins, NULL, tokens, NULL, &failed, &err) ==
          LMD_ERR_INVALID_ARG);
    CHECK(failed == 1);
    CHECK_MSG_CONTAINS(err, "temperature (=1e-37) takes the largest logit, logits[1] (=50)");

    /* lmd_scaling_overflow names the largest logit (its first occurrence), in whole vectors
     * and in the tail */
    float row[37];
    for (int i = 0; i < 37; i++) row[i] = (float)(i % 5) - 2.0f;
    row[9] = -INFINITY;
    CHECK(lmd_scaling_overflow(row, 37, 1e-37f) == -1);
    row[20] = -1e3f; /* below -FLT_MAX when scaled, not the largest */
    CHECK(lmd_scaling_overflow(row, 37, 1e-37f) == -1);
    const int32_t at[3] = {5, 33, 36};
    for (int i = 0; i < 3; i++) {
        const float keep = row[at[i]];
        row[at[i]] = 1e3f;
        CHECK(lmd_scaling_overflow(row, 37, 1e-37f) == at[i]);
        CHECK(lmd_scaling_overflow(row, 37, 1.0f) == -1);
        row[at[i]] = keep;
    }
    lmd_sampler_free(s);
}

/* Messages print the value passed, not its 6-digit %g rounding ("top_p (=1) must be in (0, 1]"
 * was the message for 1.0000001). */
static void test_messages_print_the_value(void) {
    lmd_sampling_params p;
    lmd_error err;
    lmd_sampling_params_default(&p);
    p.top_p = 1.0000001;
    CHECK(lmd_sampling_params_validate(&p, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "top_p (=1.0000001) must be in (0, 1]");
    lmd_sampling_params_default(&p);
    p.min_p = 1.0 + 1e-9;
    CHECK(lmd_sampling_params_validate(&p, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "min_p (=1.000000001) must be in [0, 1]");
    lmd_sampling_params_default(&p);
    p.presence_penalty = -2.000001;
    CHECK(lmd_sampling_params_validate(&p, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "presence_penalty (=-2.000001) must be in [-2, 2]");
    char b[LMD_NUMBER_CHARS];
    CHECK(strcmp(lmd_format_double(b, 0.1), "0.1") == 0);
    CHECK(strcmp(lmd_format_double(b, 2.0), "2") == 0);
    CHECK(strcmp(lmd_format_double(b, 50.0), "50") == 0);
    CHECK(strcmp(lmd_format_double(b, 0.0001), "0.0001") == 0);
    CHECK(strcmp(lmd_format_double(b, 1e-5), "1e-05") == 0);
    CHECK(strcmp(lmd_format_double(b, 1e16), "1e+16") == 0);
    CHECK(strcmp(lmd_format_double(b, 1.0 / 3.0), "0.3333333333333333") == 0);
    CHECK(strcmp(lmd_format_double(b, -INFINITY), "-inf") == 0);
    CHECK(strcmp(lmd_format_float(b, 0.1f), "0.1") == 0);
    CHECK(strcmp(lmd_format_float(b, 1e15f), "1000000000000000") == 0); /* not 999999986991104 */
    CHECK(strcmp(lmd_format_float(b, 3e38f), "3e+38") == 0);
}

int main(void) {
    test_philox_known_answers();
    test_seed_examples();
    test_processors_by_hand();
    test_errors();
    test_against_naive();
    test_draw_frequencies();
    test_rows_parallel_equals_serial();
    test_target_logprobs();
    test_float32_range();
    test_messages_print_the_value();
    lmd_sampler_free(NULL);
    return test_report("test_sampling");
}
