/* test_search.c -- the beam search state machine on the seeds' worked
 * example and on bad input, under the sanitizers. */
#include "search.h"
#include "test_util.h"

static void fill_log(float *row, const double *p, int n) {
    for (int i = 0; i < n; i++) row[i] = (float)log(p[i]);
}

/* vocabulary {A, B, C, <eos>}, b = 2 (the seeds' example) */
static void test_seeds_example(void) {
    const int32_t eos = 3;
    lmd_beam_config c = {2, 4, 2, 2, 0.0, LMD_EARLY_STOP_HEURISTIC, &eos, 1, 0, 1.0, 0, 0, NULL, 0};
    lmd_beam_search *bs;
    lmd_error err;
    CHECK(lmd_beam_search_init(&bs, &c, &err) == LMD_OK);
    float logits[8];
    int32_t parents[2], tokens[2];
    const double step1[4] = {0.5, 0.3, 0.1, 0.1};
    fill_log(logits, step1, 4);
    fill_log(logits + 4, step1, 4);
    CHECK(lmd_beam_search_step(bs, logits, parents, tokens, &err) == LMD_OK);
    CHECK(parents[0] == 0 && tokens[0] == 0 && parents[1] == 0 && tokens[1] == 1);
    const double after_a[4] = {0.6, 0.2, 0.1, 0.1}, after_b[4] = {0.15, 0.15, 0.4, 0.3};
    fill_log(logits, after_a, 4);
    fill_log(logits + 4, after_b, 4);
    CHECK(lmd_beam_search_step(bs, logits, parents, tokens, &err) == LMD_OK);
    CHECK(lmd_beam_search_done(bs));
    CHECK(lmd_beam_search_n_hypotheses(bs) == 2);
    int32_t seq[2], len;
    float score, sum, lps[2];
    CHECK(lmd_beam_search_hypothesis(bs, 0, seq, lps, &len, &score, &sum, &err) == LMD_OK);
    CHECK(len == 2 && seq[0] == 0 && seq[1] == 0);
    CHECK_CLOSE(score, log(0.5) + log(0.6), 1e-6);
    CHECK(lmd_beam_search_hypothesis(bs, 1, seq, lps, &len, &score, &sum, &err) == LMD_OK);
    CHECK(len == 2 && seq[0] == 1 && seq[1] == 2);
    CHECK_CLOSE(score, log(0.3) + log(0.4), 1e-6);
    /* stepping after the end is an error that changes nothing */
    CHECK(lmd_beam_search_step(bs, logits, parents, tokens, &err) == LMD_ERR_INVALID_ARG);
    CHECK(lmd_beam_search_hypothesis(bs, 2, seq, lps, &len, &score, &sum, &err) ==
          LMD_ERR_INVALID_ARG);
    lmd_beam_search_free(bs);
}

static void test_bad_config_and_logits(void) {
    lmd_beam_search *bs = NULL;
    lmd_error err;
    const int32_t eos = 9;
    lmd_beam_config c = {2, 4, 3, 3, 1.0, LMD_EARLY_STOP_HEURISTIC, NULL, 0, 0, 1.0, 0, 0, NULL, 0};
    CHECK(lmd_beam_search_init(&bs, &c, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "num_return_sequences");
    c.num_return_sequences = 1;
    c.eos_ids = &eos;
    c.n_eos = 1;
    CHECK(lmd_beam_search_init(&bs, &c, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "eos_token_id (=9)");
    c.n_eos = 0;
    c.vocab = 1; /* 2 beams keep 4 candidates, but only 2 exist */
    CHECK(lmd_beam_search_init(&bs, &c, &err) == LMD_ERR_INVALID_ARG);
    c.vocab = 4;
    CHECK(lmd_beam_search_init(&bs, &c, &err) == LMD_OK);
    float logits[8] = {0, 1, 2, 3, 0, 1, NAN, 3};
    int32_t parents[2], tokens[2];
    CHECK(lmd_beam_search_step(bs, logits, parents, tokens, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "beam 1, token 2 is NaN");
    CHECK(lmd_beam_search_length(bs) == 0);
    lmd_beam_search_free(bs);
    lmd_beam_search_free(NULL);
}

/* The seeds' example constrained: the first beam may take only C (and keeps its log-prob,
 * no renormalization), the other only <eos>; the two allowed continuations are too few for
 * the 4 kept a step, so -inf ones fill in. The lists hold for one step. */
static void test_allowed_lists(void) {
    const int32_t eos = 3, only_c = 2, only_eos = 3, outside = 4;
    lmd_beam_config c = {2, 4, 3, 2, 0.0, LMD_EARLY_STOP_HEURISTIC, &eos, 1, 0, 1.0, 0, 0, NULL, 0};
    lmd_beam_search *bs;
    lmd_error err;
    CHECK(lmd_beam_search_init(&bs, &c, &err) == LMD_OK);
    CHECK(lmd_beam_search_set_allowed(bs, 0, &only_c, 1, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "without dynamic_allowed");
    lmd_beam_search_free(bs);
    c.dynamic_allowed = 1;
    CHECK(lmd_beam_search_init(&bs, &c, &err) == LMD_OK);
    CHECK(lmd_beam_search_set_allowed(bs, 0, &outside, 1, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "allowed token 4 is outside [0, 4)");
    CHECK(lmd_beam_search_set_allowed(bs, 2, NULL, -1, &err) == LMD_ERR_INVALID_ARG);
    float logits[8];
    int32_t parents[2], tokens[2];
    const double step1[4] = {0.5, 0.3, 0.1, 0.1};
    fill_log(logits, step1, 4);
    fill_log(logits + 4, step1, 4);
    const int32_t c_repeated[3] = {2, 2, 2}; /* one continuation, not three */
    CHECK(lmd_beam_search_set_allowed(bs, 0, c_repeated, 3, &err) == LMD_OK);
    CHECK(lmd_beam_search_set_allowed(bs, 1, &only_eos, 1, &err) == LMD_OK);
    CHECK(lmd_beam_search_step(bs, logits, parents, tokens, &err) == LMD_OK);
    /* C runs on first; the second beam's <eos> (penalized twice: the beam started penalized,
     * as in transformers, and it ends) still outranks the -inf fillers */
    CHECK(parents[0] == 0 && tokens[0] == 2);
    CHECK(parents[1] == 1 && tokens[1] == 3);
    CHECK(lmd_beam_search_tokens(bs, 0)[0] == 2 && lmd_beam_search_length(bs) == 1);
    /* the lists are gone: the next step ranks every token (A after C is the best) */
    CHECK(lmd_beam_search_step(bs, logits, parents, tokens, &err) == LMD_OK);
    CHECK(parents[0] == 0 && tokens[0] == 0);
    const int32_t *beam0 = lmd_beam_search_tokens(bs, 0);
    CHECK(beam0[0] == 2 && beam0[1] == 0);
    CHECK(lmd_beam_search_step(bs, logits, parents, tokens, &err) == LMD_OK && lmd_beam_search_done(bs));
    int32_t seq[3], len;
    float lps[3];
    CHECK(lmd_beam_search_hypothesis(bs, 0, seq, lps, &len, NULL, NULL, &err) == LMD_OK);
    CHECK(len == 3 && seq[0] == 2);
    CHECK_CLOSE(lps[0], log(0.1), 1e-6); /* C's own log-prob, not renormalized over {C} */
    lmd_beam_search_free(bs);
}

/* width 1 (greedy over the processed log-probs) on fixed logits (0, 3, 2), lp = log_softmax:
 * n-grams of 2 after the prompt (1, 1) give 2, 1, 0 (each step bans what would repeat a bigram);
 * a repetition penalty of 2 doubles the prompt token 1's log-prob, one of 5 lets 2 win; the
 * EOS ban of min_new_tokens, and an out-of-vocabulary prompt id, which the processors skip */
static void test_processors(void) {
    const float row[3] = {0.0f, 3.0f, 2.0f};
    const double log_total = log(1.0 + exp(3.0) + exp(2.0));
    const int32_t prompt[3] = {1, 1, 7}, eos = 1;
    lmd_beam_search *bs;
    lmd_error err;
    int32_t parent, token, seq[3], len;
    float lps[3];
    lmd_beam_config c = {1, 3, 3, 1, 1.0, LMD_EARLY_STOP_HEURISTIC, NULL, 0, 0, 1.0, 2, 0, prompt, 2};
    CHECK(lmd_beam_search_init(&bs, &c, &err) == LMD_OK);
    const int32_t want[3] = {2, 1, 0};
    for (int t = 0; t < 3; t++) {
        CHECK(lmd_beam_search_step(bs, row, &parent, &token, &err) == LMD_OK);
        CHECK(parent == 0 && token == want[t]);
    }
    CHECK(lmd_beam_search_hypothesis(bs, 0, seq, lps, &len, NULL, NULL, &err) == LMD_OK);
    CHECK(len == 3);
    for (int t = 0; t < 3; t++) CHECK_CLOSE(lps[t], row[want[t]] - log_total, 1e-6);
    lmd_beam_search_free(bs);
    for (int i = 0; i < 2; i++) { /* penalty 2, then 5, over the prompt (1, 1, 7): 7 is skipped */
        c = (lmd_beam_config){1, 3, 1, 1, 1.0, LMD_EARLY_STOP_HEURISTIC, NULL, 0, 0, i ? 5.0 : 2.0, 0, 0, prompt, 3};
        CHECK(lmd_beam_search_init(&bs, &c, &err) == LMD_OK);
        CHECK(lmd_beam_search_step(bs, row, &parent, &token, &err) == LMD_OK);
        CHECK(lmd_beam_search_hypothesis(bs, 0, seq, lps, &len, NULL, NULL, &err) == LMD_OK);
        CHECK(token == (i ? 2 : 1) && len == 1);
        CHECK_CLOSE(lps[0], i ? row[2] - log_total : 2.0 * (row[1] - log_total), 1e-6);
        lmd_beam_search_free(bs);
    }
    /* EOS (token 1, the best) banned before 2 tokens: 2 first, then EOS ends it */
    c = (lmd_beam_config){1, 3, 3, 1, 1.0, LMD_EARLY_STOP_HEURISTIC, &eos, 1, 0, 1.0, 0, 2, NULL, 0};
    CHECK(lmd_beam_search_init(&bs, &c, &err) == LMD_OK);
    for (int t = 0; t < 3 && !lmd_beam_search_done(bs); t++) {
        CHECK(lmd_beam_search_step(bs, row, &parent, &token, &err) == LMD_OK);
        CHECK(token == (t < 2 ? 2 : 1));
    }
    CHECK(lmd_beam_search_hypothesis(bs, 0, seq, lps, &len, NULL, NULL, &err) == LMD_OK);
    CHECK(len == 3 && seq[0] == 2 && seq[1] == 2 && seq[2] == 1);
    lmd_beam_search_free(bs);
    c.repetition_penalty = 0.0; /* bad values */
    CHECK(lmd_beam_search_init(&bs, &c, &err) == LMD_ERR_INVALID_ARG && bs == NULL);
    c.repetition_penalty = 1e-50; /* 0 in float32, where a log-prob of 0 divided by it is NaN */
    CHECK(lmd_beam_search_init(&bs, &c, &err) == LMD_ERR_INVALID_ARG && bs == NULL);
    CHECK_MSG_CONTAINS(err, "repetition_penalty (=1e-50) must be in [1.1754944e-38");
    c.repetition_penalty = 1.0, c.no_repeat_ngram_size = -1;
    CHECK(lmd_beam_search_init(&bs, &c, &err) == LMD_ERR_INVALID_ARG);
    c.no_repeat_ngram_size = 0, c.prompt_len = 2; /* with no prompt */
    CHECK(lmd_beam_search_init(&bs, &c, &err) == LMD_ERR_INVALID_ARG);
}

int main(void) {
    test_seeds_example();
    test_bad_config_and_logits();
    test_allowed_lists();
    test_processors();
    return test_report("test_search");
}
