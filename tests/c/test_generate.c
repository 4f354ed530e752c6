/* test_generate.c -- the generator state machine: budgets, stop tokens, stop
 * strings and the coin convention, under the sanitizers. */
#include "generate.h"
#include "rng.h"
#include "test_util.h"

/* vocabulary of 4 tokens: "a", "b", "c", "</s>" (bytes "" for the stop token) */
static const uint8_t token_bytes[] = {'a', 'b', 'c'};
static const int64_t token_offsets[] = {0, 1, 2, 3, 3};

static lmd_sampler *new_sampler(void) {
    lmd_sampler *s;
    lmd_error err;
    if (lmd_sampler_init(&s, 4, &err) != LMD_OK) exit(1);
    return s;
}

/* logits that make `token` certain (others -inf) */
static void one_hot(float *row, int32_t token) {
    for (int v = 0; v < 4; v++) row[v] = v == token ? 0.0f : -INFINITY;
}

static void test_stop_string_and_lengths(void) {
    lmd_sampler *s = new_sampler();
    lmd_sampling_params p;
    lmd_sampling_params_default(&p);
    const int32_t prompts[3] = {0, 1, 2};
    const int64_t prompt_offsets[3] = {0, 2, 3}; /* "ab", "c" */
    const uint8_t stop[] = {'b', 'c', 'a'};
    const int64_t stop_offsets[2] = {0, 3};     /* "bca" */
    const int32_t stop_ids[1] = {3};
    lmd_generate_config c = {.n_seqs = 2, .vocab = 4, .max_new_tokens = 6, .min_new_tokens = 0,
                             .params = &p, .n_params = 1, .seed = 5, .prompts = prompts,
                             .prompt_offsets = prompt_offsets, .stop_ids = stop_ids,
                             .n_stop_ids = 1, .stop_strings = stop, .stop_offsets = stop_offsets,
                             .n_stop_strings = 1, .token_bytes = token_bytes,
                             .token_offsets = token_offsets, .n_top_logprobs = 2};
    lmd_generator *g;
    lmd_error err;
    CHECK(lmd_generator_init(&g, &c, &err) == LMD_OK);
    /* sequence 0 writes b, c, a (the stop string); sequence 1 writes a forever */
    const int32_t script0[3] = {1, 2, 0};
    float logits[8];
    int32_t ids[2], tokens[2];
    for (int step = 0; step < 6; step++) {
        int32_t running = lmd_generator_running(g, ids);
        CHECK(running == (step < 3 ? 2 : 1));
        for (int i = 0; i < running; i++) one_hot(logits + 4 * i, ids[i] == 0 ? script0[step] : 0);
        CHECK(lmd_generator_step(g, &s, 1, logits, tokens, &err) == LMD_OK);
    }
    CHECK(lmd_generator_running(g, NULL) == 0);
    CHECK(lmd_generator_finish_reason(g, 0) == LMD_FINISH_STOP);
    CHECK(lmd_generator_stop_offset(g, 0) == 0);
    CHECK(lmd_generator_generated(g, 0) == 3);
    CHECK(lmd_generator_finish_reason(g, 1) == LMD_FINISH_LENGTH);
    CHECK(lmd_generator_generated(g, 1) == 6);
    int32_t length;
    const int32_t *all = lmd_generator_tokens(g, 1, &length);
    CHECK(length == 7 && all[0] == 2 && all[1] == 0 && all[6] == 0);
    CHECK(lmd_generator_token_logprobs(g, 1)[0] == 0.0f); /* a certain token */
    CHECK(lmd_generator_top_ids(g, 1)[0] == 0);
    CHECK(lmd_generator_step(g, &s, 1, logits, tokens, &err) == LMD_ERR_INVALID_ARG);
    lmd_generator_free(g);
    lmd_sampler_free(s);
}

static void test_min_new_tokens_blocks_stop_ids(void) {
    lmd_sampler *s = new_sampler();
    lmd_sampling_params p;
    lmd_sampling_params_default(&p);
    const int32_t prompt[1] = {0};
    const int64_t offsets[2] = {0, 1};
    const int32_t stop_ids[1] = {3};
    lmd_generate_config c = {.n_seqs = 1, .vocab = 4, .max_new_tokens = 10, .min_new_tokens = 2,
                             .params = &p, .n_params = 1, .seed = 1, .prompts = prompt,
                             .prompt_offsets = offsets, .stop_ids = stop_ids, .n_stop_ids = 1};
    lmd_generator *g;
    lmd_error err;
    CHECK(lmd_generator_init(&g, &c, &err) == LMD_OK);
    float logits[4] = {-1.0f, -1.0f, -1.0f, 5.0f}; /* the stop token dominates */
    int32_t token;
    CHECK(lmd_generator_step(g, &s, 1, logits, &token, &err) == LMD_OK && token != 3);
    CHECK(lmd_generator_step(g, &s, 1, logits, &token, &err) == LMD_OK && token != 3);
    /* now it may stop; with a certain stop token it does */
    one_hot(logits, 3);
    CHECK(lmd_generator_step(g, &s, 1, logits, &token, &err) == LMD_OK && token == 3);
    CHECK(lmd_generator_finish_reason(g, 0) == LMD_FINISH_STOP);
    lmd_generator_free(g);

    /* only stop tokens allowed while they are blocked: a clear error, state unchanged */
    const int32_t only_stop[1] = {3};
    lmd_row_inputs constraint = {NULL, 0, 0, NULL, NULL, 0, only_stop, 1, NULL, 0};
    c.constraints = &constraint;
    CHECK(lmd_generator_init(&g, &c, &err) == LMD_OK);
    CHECK(lmd_generator_step(g, &s, 1, logits, &token, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "sequence 0");
    CHECK(lmd_generator_generated(g, 0) == 0);
    lmd_generator_free(g);
    lmd_generator_free(NULL);
    lmd_sampler_free(s);
}

static void test_bad_config(void) {
    lmd_sampling_params p;
    lmd_sampling_params_default(&p);
    const int32_t prompt[1] = {7};
    const int64_t offsets[2] = {0, 1};
    lmd_generate_config c = {.n_seqs = 1, .vocab = 4, .max_new_tokens = 3, .params = &p,
                             .n_params = 1, .prompts = prompt, .prompt_offsets = offsets};
    lmd_generator *g;
    lmd_error err;
    CHECK(lmd_generator_init(&g, &c, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "token 7");
    p.top_p = 2.0;
    CHECK(lmd_generator_init(&g, &c, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "top_p");
    p.top_p = 1.0;
    p.temperature = 1e-50; /* 0 in float32: the logits would be divided by 0 */
    CHECK(lmd_generator_init(&g, &c, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "temperature (=1e-50)");
}

/* A logit that the temperature takes past FLT_MAX stops the step with an error naming the
 * sequence, the temperature and the logit; nothing is appended. Before, the sampler returned
 * an id read from an empty candidate list. */
static void test_temperature_overflow_is_an_error(void) {
    lmd_sampler *s = new_sampler();
    lmd_sampling_params p;
    lmd_sampling_params_default(&p);
    p.temperature = 1e-37;
    p.top_p = 0.9;
    const int32_t prompts[2] = {0, 1};
    const int64_t offsets[3] = {0, 1, 2};
    lmd_generate_config c = {.n_seqs = 2, .vocab = 4, .max_new_tokens = 3, .params = &p, .n_params = 1,
                             .seed = 3, .prompts = prompts, .prompt_offsets = offsets};
    lmd_generator *g;
    lmd_error err;
    CHECK(lmd_generator_init(&g, &c, &err) == LMD_OK);
    float logits[8] = {1.0f, 2.0f, 0.5f, 0.0f, 10.0f, 50.0f, 5.0f, 0.0f};
    int32_t tokens[2] = {-7, -7};
    CHECK(lmd_generator_step(g, &s, 1, logits, tokens, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "sequence 1: temperature (=1e-37) takes the largest logit, logits[1] (=50), out of the float32");
    CHECK(tokens[0] == -7 && lmd_generator_generated(g, 0) == 0 && lmd_generator_generated(g, 1) == 0);
    logits[5] = 3.0f; /* in range: effectively greedy */
    CHECK(lmd_generator_step(g, &s, 1, logits, tokens, &err) == LMD_OK);
    CHECK(tokens[0] == 1 && tokens[1] == 0);
    lmd_generator_free(g);
    lmd_sampler_free(s);
}

/* Dynamic allowed lists: set_allowed restricts the next draws (greedy takes the best allowed
 * token), n_ids < 0 lifts the restriction, and mask_row puts -inf where the chain would,
 * with the stop token banned while short of min_new_tokens. */
static void test_set_allowed_and_mask_row(void) {
    lmd_sampler *s = new_sampler();
    lmd_sampling_params p;
    lmd_sampling_params_default(&p);
    p.temperature = 0.0;
    const int32_t prompt[1] = {0};
    const int64_t offsets[2] = {0, 1};
    const int32_t stop_ids[1] = {3};
    lmd_generate_config c = {.n_seqs = 1, .vocab = 4, .max_new_tokens = 5, .min_new_tokens = 2,
                             .params = &p, .n_params = 1, .seed = 1, .prompts = prompt,
                             .prompt_offsets = offsets, .stop_ids = stop_ids, .n_stop_ids = 1};
    lmd_generator *g;
    lmd_error err;
    CHECK(lmd_generator_init(&g, &c, &err) == LMD_OK);
    const int32_t only_two[1] = {2};
    CHECK(lmd_generator_set_allowed(g, 0, only_two, 1, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "without dynamic_allowed");
    lmd_generator_free(g);

    c.dynamic_allowed = 1;
    CHECK(lmd_generator_init(&g, &c, &err) == LMD_OK);
    float logits[4] = {3.0f, 2.0f, 1.0f, 0.5f}, row[4];
    const int32_t one_and_two[3] = {2, 1, 2}; /* a repeat is harmless */
    CHECK(lmd_generator_set_allowed(g, 0, one_and_two, 3, &err) == LMD_OK);
    memcpy(row, logits, sizeof row);
    lmd_generator_mask_row(g, 0, row);
    CHECK(row[0] == -INFINITY && row[1] == 2.0f && row[2] == 1.0f && row[3] == -INFINITY);
    int32_t token;
    CHECK(lmd_generator_step(g, &s, 1, logits, &token, &err) == LMD_OK && token == 1);
    CHECK(lmd_generator_step(g, &s, 1, logits, &token, &err) == LMD_OK && token == 1); /* still in force */
    CHECK(lmd_generator_set_allowed(g, 0, NULL, -1, &err) == LMD_OK);
    memcpy(row, logits, sizeof row);
    lmd_generator_mask_row(g, 0, row); /* 2 tokens generated: the stop token is free again */
    CHECK(memcmp(row, logits, sizeof row) == 0);
    CHECK(lmd_generator_step(g, &s, 1, logits, &token, &err) == LMD_OK && token == 0);
    const int32_t outside[1] = {4};
    CHECK(lmd_generator_set_allowed(g, 0, outside, 1, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "allowed token 4 is outside [0, 4)");
    CHECK(lmd_generator_set_allowed(g, 0, one_and_two, 5, &err) == LMD_ERR_INVALID_ARG);
    CHECK(lmd_generator_set_allowed(g, 1, NULL, -1, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "sequence 1 is not running");
    lmd_generator_free(g);

    /* before min_new_tokens, mask_row bans the stop token as the chain does */
    CHECK(lmd_generator_init(&g, &c, &err) == LMD_OK);
    memcpy(row, logits, sizeof row);
    lmd_generator_mask_row(g, 0, row);
    CHECK(row[0] == 3.0f && row[1] == 2.0f && row[2] == 1.0f && row[3] == -INFINITY);
    lmd_generator_free(g);
    lmd_sampler_free(s);
}

int main(void) {
    test_stop_string_and_lengths();
    test_min_new_tokens_blocks_stop_ids();
    test_bad_config();
    test_temperature_overflow_is_an_error();
    test_set_allowed_and_mask_row();
    return test_report("test_generate");
}
