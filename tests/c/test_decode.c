/* test_decode.c -- the decoding loops of decode.h over a tiny random Llama,
 * against step-by-step references built from lmd_model_forward alone: greedy
 * generation is the argmax chain, sampled sequences sharing a prompt draw
 * what each would draw alone (same coins, same logits), the context length
 * ends a sequence, beam search of width 1 is greedy, and every pool block
 * comes back. */
#include <stdint.h>

#include "decode.h"
#include "rng.h"
#include "test_util.h"
#include "tiny_model.h"

#define MAX_LEN 32

static int32_t argmax(const float *z, int n) {
    int32_t best = 0;
    for (int i = 1; i < n; i++)
        if (z[i] > z[best]) best = i;
    return best;
}

static double log_softmax_at(const float *z, int n, int32_t token) {
    double max = z[argmax(z, n)], sum = 0.0;
    for (int i = 0; i < n; i++) sum += exp((double)z[i] - max);
    return (double)z[token] - max - log(sum);
}

/*
 * The generation loop written out with one sequence and lmd_model_forward: prefill the
 * prompt, then pick a token from the last logits and feed it, up to n_new tokens or until
 * the tokens fill the context length. params NULL: argmax; otherwise lmd_sample_row with
 * the coin of (seed, stream, step) as generate.h documents. Returns the number generated;
 * logprobs (n_new,) or NULL receives each token's log-softmax under the raw logits.
 */
static int reference_generate(lmd_model *m, lmd_kvpool *pool, const int32_t *prompt, int n_prompt,
                              int n_new, const lmd_sampling_params *params, uint64_t seed,
                              uint64_t stream, int32_t *out, double *logprobs) {
    const int V = m->config.vocab_size, L = m->config.context_length;
    int32_t context[MAX_LEN];
    memcpy(context, prompt, (size_t)n_prompt * sizeof(int32_t));
    float *logits = malloc((size_t)n_prompt * V * sizeof(float));
    lmd_kvseq *s = tiny_seq(pool, L);
    lmd_sampler *sampler;
    lmd_error err;
    if (lmd_sampler_init(&sampler, V, &err) != LMD_OK) exit(1);
    CHECK(tiny_run(m, s, prompt, n_prompt, logits, &err) == LMD_OK);
    const float *last = logits + (int64_t)(n_prompt - 1) * V;
    int t = 0;
    while (t < n_new && n_prompt + t < L) {
        int32_t token = argmax(last, V);
        if (params != NULL) {
            lmd_row_inputs in = {context, n_prompt + t, n_prompt, NULL, NULL, 0, NULL, -1, NULL, 0};
            double coin = lmd_rng_uniform(seed, stream, (uint64_t)t, 0);
            CHECK(lmd_sample_row(sampler, params, &in, last, V, coin, NULL, &token, NULL, &err) == LMD_OK);
        }
        if (logprobs) logprobs[t] = log_softmax_at(last, V, token);
        out[t] = context[n_prompt + t] = token;
        t++;
        if (t < n_new && n_prompt + t < L) { /* the last token is never fed */
            CHECK(tiny_run(m, s, &token, 1, logits, &err) == LMD_OK);
            last = logits;
        }
    }
    lmd_kvseq_free(s);
    lmd_sampler_free(sampler);
    free(logits);
    return t;
}

typedef struct {
    int32_t prompts[4 * MAX_LEN];
    int64_t offsets[5];
    int32_t n;
} prompt_set;

static void add_prompt(prompt_set *p, const int32_t *tokens, int len) {
    if (p->n == 0) p->offsets[0] = 0;
    memcpy(p->prompts + p->offsets[p->n], tokens, (size_t)len * sizeof(int32_t));
    p->offsets[p->n + 1] = p->offsets[p->n] + len;
    p->n++;
}

static lmd_generator *new_generator(const prompt_set *p, int32_t vocab, int32_t max_new,
                                    const lmd_sampling_params *params, uint64_t seed,
                                    const int32_t *stop_ids, int32_t n_stop) {
    lmd_generate_config c = {.n_seqs = p->n, .vocab = vocab, .max_new_tokens = max_new,
                             .params = params, .n_params = 1, .seed = seed, .prompts = p->prompts,
                             .prompt_offsets = p->offsets, .stop_ids = stop_ids, .n_stop_ids = n_stop,
                             .n_top_logprobs = 0};
    lmd_generator *g;
    lmd_error err;
    if (lmd_generator_init(&g, &c, &err) != LMD_OK) {
        fprintf(stderr, "generator init failed: %s\n", err.msg);
        exit(1);
    }
    return g;
}

// the identity chain at temperature 0: argmax
static lmd_sampling_params greedy_params(void) {
    lmd_sampling_params p;
    lmd_sampling_params_default(&p);
    p.temperature = 0.0;
    return p;
}

static int pool_full(const lmd_kvpool *p) { return p->n_free == p->n_blocks; }

/* ------------------------------------------------------------------ */

// an lmd_stop_check: counts its calls in *ctx, asks to stop at the third
static int stop_at_third_call(void *ctx) {
    int *calls = ctx;
    return ++*calls == 3;
}

static void test_greedy_equals_argmax_chain(void) {
    test_rng r = {7};
    tiny_spec spec = tiny_llama_spec();
    tiny_model t;
    lmd_model *m = tiny_open(&t, &spec, 16);
    const int V = t.config.vocab_size;
    lmd_kvpool *pool = tiny_pool(&t, 4, 32);
    lmd_sampler *sampler;
    lmd_error err;
    CHECK(lmd_sampler_init(&sampler, V, &err) == LMD_OK);
    const lmd_sampling_params greedy = greedy_params();
    int32_t prompt[5], want[10];
    double want_lp[10];
    for (int i = 0; i < 5; i++) prompt[i] = test_rand_below(&r, V);
    CHECK(reference_generate(m, pool, prompt, 5, 10, NULL, 0, 0, want, want_lp) == 10);

    /* all at once */
    prompt_set ps = {{0}, {0}, 0};
    add_prompt(&ps, prompt, 5);
    lmd_generator *g = new_generator(&ps, V, 10, &greedy, 0, NULL, 0);
    lmd_decode_run *run;
    CHECK(lmd_decode_run_init(&run, m, pool, g, &err) == LMD_OK);
    int32_t last_ids[1], last_tokens[1], n_last = -1;
    CHECK(lmd_decode_run_steps(run, &sampler, 1, INT32_MAX, last_ids, last_tokens, &n_last, NULL, NULL, &err) == LMD_OK);
    int32_t len;
    const int32_t *all = lmd_generator_tokens(g, 0, &len);
    CHECK(len == 15 && memcmp(all, prompt, sizeof prompt) == 0);
    CHECK(memcmp(all + 5, want, sizeof want) == 0);
    CHECK(lmd_generator_finish_reason(g, 0) == LMD_FINISH_LENGTH);
    CHECK(n_last == 1 && last_ids[0] == 0 && last_tokens[0] == want[9]);
    const float *lps = lmd_generator_token_logprobs(g, 0);
    for (int i = 0; i < 10; i++) CHECK_CLOSE(lps[i], want_lp[i], 1e-5);
    CHECK(pool_full(pool)); /* a finished sequence's blocks are back before run_free */
    /* nothing left to do: no step runs */
    CHECK(lmd_decode_run_steps(run, &sampler, 1, INT32_MAX, last_ids, last_tokens, &n_last, NULL, NULL, &err) == LMD_OK);
    CHECK(n_last == 0);
    lmd_decode_run_free(run);
    lmd_generator_free(g);

    /* one step per call reports each token as it comes */
    g = new_generator(&ps, V, 10, &greedy, 0, NULL, 0);
    CHECK(lmd_decode_run_init(&run, m, pool, g, &err) == LMD_OK);
    for (int step = 0; step < 10; step++) {
        CHECK(lmd_decode_run_steps(run, &sampler, 1, 1, last_ids, last_tokens, &n_last, NULL, NULL, &err) == LMD_OK);
        CHECK(n_last == 1 && last_ids[0] == 0 && last_tokens[0] == want[step]);
        CHECK(lmd_generator_generated(g, 0) == step + 1);
        if (step < 9) CHECK(!pool_full(pool));
    }
    CHECK(lmd_generator_running(g, NULL) == 0 && pool_full(pool));
    lmd_decode_run_free(run);
    lmd_generator_free(g);

    /* a stop check that asks to stop at its third call ends the call after three steps; the
     * next call goes on to the same tokens */
    g = new_generator(&ps, V, 10, &greedy, 0, NULL, 0);
    CHECK(lmd_decode_run_init(&run, m, pool, g, &err) == LMD_OK);
    int calls = 0;
    CHECK(lmd_decode_run_steps(run, &sampler, 1, INT32_MAX, last_ids, last_tokens, &n_last, stop_at_third_call,
                               &calls, &err) == LMD_ERR_STOPPED);
    CHECK(calls == 3 && lmd_generator_generated(g, 0) == 3 && n_last == 1 && last_tokens[0] == want[2]);
    CHECK(strstr(err.msg, "stopped after 3 steps") != NULL);
    CHECK(lmd_decode_run_steps(run, &sampler, 1, INT32_MAX, NULL, NULL, NULL, NULL, NULL, &err) == LMD_OK);
    all = lmd_generator_tokens(g, 0, &len);
    CHECK(len == 15 && memcmp(all + 5, want, sizeof want) == 0 && pool_full(pool));
    lmd_decode_run_free(run);
    lmd_generator_free(g);
    lmd_decode_run_free(NULL);

    lmd_sampler_free(sampler);
    lmd_kvpool_free(pool);
    tiny_close(&t, m);
}

/* Four sequences, three of them with one prompt (the first two adjacent, so they share its
 * cache), sampled at temperature 0.8 with top-k, with a stop token: each draws exactly what
 * it draws alone with its own stream of coins, and stops where it would alone. */
static void test_shared_prompts_equal_each_alone(void) {
    test_rng r = {8};
    tiny_spec spec = tiny_llama_spec();
    tiny_model t;
    lmd_model *m = tiny_open(&t, &spec, 16);
    const int V = t.config.vocab_size;
    lmd_kvpool *pool = tiny_pool(&t, 4, 64);
    lmd_sampler *samplers[2];
    lmd_error err;
    for (int i = 0; i < 2; i++) CHECK(lmd_sampler_init(&samplers[i], V, &err) == LMD_OK);
    lmd_sampling_params params;
    lmd_sampling_params_default(&params);
    params.temperature = 0.8;
    params.top_k = 10;
    const uint64_t seed = 77;
    enum { NEW = 8 };
    int32_t p[6], q[4];
    for (int i = 0; i < 6; i++) p[i] = test_rand_below(&r, V);
    for (int i = 0; i < 4; i++) q[i] = test_rand_below(&r, V);
    prompt_set ps = {{0}, {0}, 0};
    add_prompt(&ps, p, 6);
    add_prompt(&ps, p, 6);
    add_prompt(&ps, q, 4);
    add_prompt(&ps, p, 6);

    /* each alone, without stop tokens */
    int32_t alone[4][NEW];
    for (int k = 0; k < 4; k++) {
        const int32_t *prompt = ps.prompts + ps.offsets[k];
        int n = (int)(ps.offsets[k + 1] - ps.offsets[k]);
        CHECK(reference_generate(m, pool, prompt, n, NEW, &params, seed, (uint64_t)k, alone[k], NULL) == NEW);
    }
    /* the shared prompts still give different samples: the coins differ by stream */
    CHECK(memcmp(alone[0], alone[1], sizeof alone[0]) != 0);
    /* a stop token that sequence 2 draws third: it (and any other that draws it) stops there */
    const int32_t stop = alone[2][2];
    int expect_len[4];
    for (int k = 0; k < 4; k++) {
        expect_len[k] = NEW;
        for (int i = 0; i < NEW; i++)
            if (alone[k][i] == stop) {
                expect_len[k] = i + 1;
                break;
            }
    }
    CHECK(expect_len[2] <= 3);

    lmd_generator *g = new_generator(&ps, V, NEW, &params, seed, &stop, 1);
    lmd_decode_run *run;
    CHECK(lmd_decode_run_init(&run, m, pool, g, &err) == LMD_OK);
    int32_t ids[4], toks[4], n_last;
    CHECK(lmd_decode_run_steps(run, samplers, 2, 1, ids, toks, &n_last, NULL, NULL, &err) == LMD_OK);
    CHECK(n_last == 4);
    for (int k = 0; k < 4; k++) CHECK(ids[k] == k && toks[k] == alone[k][0]);
    /* the prefill ran once per distinct adjacent prompt: sequences 0 and 3 hold 6 positions
     * (2 blocks of 4) each, sequence 2 holds 4 (1 block), sequence 1 shares sequence 0's */
    CHECK(pool->n_blocks - pool->n_free == 5);
    CHECK(lmd_decode_run_steps(run, samplers, 2, INT32_MAX, NULL, NULL, NULL, NULL, NULL, &err) == LMD_OK);
    for (int k = 0; k < 4; k++) {
        int32_t len;
        const int32_t *all = lmd_generator_tokens(g, k, &len);
        int n_prompt = lmd_generator_prompt_length(g, k);
        CHECK(len == n_prompt + expect_len[k]);
        CHECK(memcmp(all + n_prompt, alone[k], (size_t)expect_len[k] * sizeof(int32_t)) == 0);
        CHECK(lmd_generator_finish_reason(g, k) ==
              (alone[k][expect_len[k] - 1] == stop ? LMD_FINISH_STOP : LMD_FINISH_LENGTH));
    }
    CHECK(pool_full(pool));
    lmd_decode_run_free(run);
    lmd_generator_free(g);

    /* greedy: the three sequences with prompt p agree, and run_free returns the blocks of
     * sequences stopped halfway */
    const lmd_sampling_params greedy = greedy_params();
    g = new_generator(&ps, V, NEW, &greedy, seed, NULL, 0);
    CHECK(lmd_decode_run_init(&run, m, pool, g, &err) == LMD_OK);
    CHECK(lmd_decode_run_steps(run, samplers, 2, 3, NULL, NULL, NULL, NULL, NULL, &err) == LMD_OK);
    CHECK(!pool_full(pool));
    CHECK(lmd_decode_run_steps(run, samplers, 2, INT32_MAX, NULL, NULL, NULL, NULL, NULL, &err) == LMD_OK);
    int32_t want[NEW];
    CHECK(reference_generate(m, pool, p, 6, NEW, NULL, 0, 0, want, NULL) == NEW);
    for (int k = 0; k < 4; k += (k == 1 ? 2 : 1)) /* 0, 1, 3 */
        CHECK(memcmp(lmd_generator_tokens(g, k, NULL) + 6, want, sizeof want) == 0);
    lmd_decode_run_free(run);
    lmd_generator_free(g);
    g = new_generator(&ps, V, NEW, &greedy, seed, NULL, 0);
    CHECK(lmd_decode_run_init(&run, m, pool, g, &err) == LMD_OK);
    CHECK(lmd_decode_run_steps(run, samplers, 2, 2, NULL, NULL, NULL, NULL, NULL, &err) == LMD_OK);
    CHECK(!pool_full(pool));
    lmd_decode_run_free(run); /* unfinished: the run still frees its sequences */
    CHECK(pool_full(pool));
    lmd_generator_free(g);

    for (int i = 0; i < 2; i++) lmd_sampler_free(samplers[i]);
    lmd_kvpool_free(pool);
    tiny_close(&t, m);
}

enum { SHARED_NEW = 4 };

// decodes the prompts of ps (SHARED_NEW new tokens each, sampled with params): after the
// first step the pool holds `blocks` blocks, and every sequence draws what it draws alone
static void check_prefill_blocks_and_output(lmd_model *m, lmd_kvpool *pool, const prompt_set *ps,
                                            const lmd_sampling_params *params, lmd_sampler *const *samplers,
                                            int n_samplers, int32_t blocks) {
    const int V = m->config.vocab_size;
    lmd_error err;
    int32_t alone[4][SHARED_NEW];
    for (int k = 0; k < ps->n; k++) {
        const int32_t *prompt = ps->prompts + ps->offsets[k];
        int n = (int)(ps->offsets[k + 1] - ps->offsets[k]);
        CHECK(reference_generate(m, pool, prompt, n, SHARED_NEW, params, 5, (uint64_t)k, alone[k], NULL) == SHARED_NEW);
    }
    lmd_generator *g = new_generator(ps, V, SHARED_NEW, params, 5, NULL, 0);
    lmd_decode_run *run;
    CHECK(lmd_decode_run_init(&run, m, pool, g, &err) == LMD_OK);
    CHECK(lmd_decode_run_steps(run, samplers, n_samplers, 1, NULL, NULL, NULL, NULL, NULL, &err) == LMD_OK);
    CHECK(pool->n_blocks - pool->n_free == blocks);
    CHECK(lmd_decode_run_steps(run, samplers, n_samplers, INT32_MAX, NULL, NULL, NULL, NULL, NULL, &err) == LMD_OK);
    for (int k = 0; k < ps->n; k++) {
        const int n_prompt = lmd_generator_prompt_length(g, k);
        CHECK(memcmp(lmd_generator_tokens(g, k, NULL) + n_prompt, alone[k], sizeof alone[k]) == 0);
    }
    lmd_decode_run_free(run);
    lmd_generator_free(g);
    CHECK(pool_full(pool));
}

/* Prompts that begin with the same 16 tokens (SHARED_PREFIX_MIN) share the cache of that
 * beginning: after the first step the pool holds its 4 blocks once plus one block of each
 * prompt's own positions, and every sequence draws what it draws alone. With 15 tokens in
 * common with the others, prompt d is left out of the group and fills blocks of its own,
 * while the three others still share their 16. */
static void test_prompts_with_a_common_beginning_share_its_cache(void) {
    test_rng r = {9};
    tiny_spec spec = tiny_llama_spec();
    tiny_model t;
    lmd_model *m = tiny_open(&t, &spec, 32);
    const int V = t.config.vocab_size;
    lmd_kvpool *pool = tiny_pool(&t, 4, 64);
    lmd_sampler *samplers[2];
    lmd_error err;
    for (int i = 0; i < 2; i++) CHECK(lmd_sampler_init(&samplers[i], V, &err) == LMD_OK);
    lmd_sampling_params params;
    lmd_sampling_params_default(&params);
    params.temperature = 0.9;
    enum { SHARED = 16 };
    for (int common = SHARED; common >= SHARED - 1; common--) {
        int32_t a[SHARED + 2], b[SHARED + 1], d[SHARED + 1];
        for (int i = 0; i < SHARED + 2; i++) a[i] = test_rand_below(&r, V);
        memcpy(b, a, sizeof b);
        memcpy(d, a, sizeof d);
        b[SHARED] = (a[SHARED] + 1) % V;             /* a and b part at token 16 */
        d[common] = (a[common] + 2) % V;             /* d parts from them at token `common` */
        prompt_set ps = {{0}, {0}, 0};
        add_prompt(&ps, a, SHARED + 2);
        add_prompt(&ps, b, SHARED + 1);
        add_prompt(&ps, d, SHARED + 1);
        add_prompt(&ps, a, SHARED + 2); /* a again, not next to the first: a leader of its own */
        /* shared: 4 blocks of the 16 common positions + one block each of positions 16-17;
         * not shared: 5 blocks (17 or 18 positions) */
        check_prefill_blocks_and_output(m, pool, &ps, &params, samplers, 2, common == SHARED ? 4 + 4 : 4 + 3 + 5);
    }
    for (int i = 0; i < 2; i++) lmd_sampler_free(samplers[i]);
    lmd_kvpool_free(pool);
    tiny_close(&t, m);
}

// prompts a1, b1, a2, b2 (of 18, 22, 17 and 21 tokens): the a's share their first 16
// tokens, the b's their first 20 (other tokens than the a's), every other pair none
static void add_two_groups(prompt_set *ps, int32_t V) {
    int32_t a1[18], a2[17], b1[22], b2[21];
    for (int i = 0; i < 22; i++) b1[i] = (5 * i + 11) % V;
    for (int i = 0; i < 18; i++) a1[i] = (b1[i] + 1 + i % 3) % V;
    memcpy(a2, a1, sizeof a2);
    a2[16] = (a1[16] + 1) % V;
    memcpy(b2, b1, sizeof b2);
    b2[20] = (b1[20] + 1) % V;
    add_prompt(ps, a1, 18);
    add_prompt(ps, b1, 22);
    add_prompt(ps, a2, 17);
    add_prompt(ps, b2, 21);
}

/* Prompts in two groups, each beginning alike within the group and not across (two system
 * prompts in one batch): each group's beginning is computed once. After the first step the
 * a's hold their 16 common positions in 4 blocks of 4 once and one block each of their
 * own; the b's their 20 in 5 blocks once and one each: 13 blocks (22 without sharing).
 * Every sequence draws what it draws alone. */
static void test_prompts_share_beginnings_by_group(void) {
    tiny_spec spec = tiny_llama_spec();
    spec.context = MAX_LEN; /* room for 22-token prompts and their new tokens */
    tiny_model t;
    lmd_model *m = tiny_open(&t, &spec, 32);
    const int V = t.config.vocab_size;
    lmd_kvpool *pool = tiny_pool(&t, 4, 64);
    lmd_sampler *sampler;
    lmd_error err;
    CHECK(lmd_sampler_init(&sampler, V, &err) == LMD_OK);
    lmd_sampling_params params;
    lmd_sampling_params_default(&params);
    params.temperature = 0.9;
    prompt_set ps = {{0}, {0}, 0};
    add_two_groups(&ps, V);
    check_prefill_blocks_and_output(m, pool, &ps, &params, &sampler, 1, 4 + 2 + 5 + 2);
    lmd_sampler_free(sampler);
    lmd_kvpool_free(pool);
    tiny_close(&t, m);
}

/* A context length of 12: prompts of 5, 9 and 12 tokens end with LMD_FINISH_LENGTH once
 * prompt + generated reaches 12, with the tokens greedy decoding gives until then. */
static void test_context_length_ends_sequences(void) {
    test_rng r = {9};
    tiny_spec spec = tiny_llama_spec();
    spec.context = 12;
    tiny_model t;
    lmd_model *m = tiny_open(&t, &spec, 16);
    const int V = t.config.vocab_size, L = 12;
    lmd_kvpool *pool = tiny_pool(&t, 4, 32);
    lmd_sampler *sampler;
    lmd_error err;
    CHECK(lmd_sampler_init(&sampler, V, &err) == LMD_OK);
    const lmd_sampling_params greedy = greedy_params();
    const int lens[3] = {5, 9, 12};
    int32_t prompts[3][13];
    prompt_set ps = {{0}, {0}, 0};
    for (int k = 0; k < 3; k++) {
        for (int i = 0; i < lens[k]; i++) prompts[k][i] = test_rand_below(&r, V);
        add_prompt(&ps, prompts[k], lens[k]);
    }
    lmd_generator *g = new_generator(&ps, V, 100, &greedy, 0, NULL, 0);
    lmd_decode_run *run;
    CHECK(lmd_decode_run_init(&run, m, pool, g, &err) == LMD_OK);
    CHECK(lmd_decode_run_steps(run, &sampler, 1, INT32_MAX, NULL, NULL, NULL, NULL, NULL, &err) == LMD_OK);
    for (int k = 0; k < 3; k++) {
        int32_t len, want[MAX_LEN];
        const int32_t *all = lmd_generator_tokens(g, k, &len);
        CHECK(len == L);
        CHECK(lmd_generator_generated(g, k) == L - lens[k]);
        CHECK(lmd_generator_finish_reason(g, k) == LMD_FINISH_LENGTH);
        int n = lens[k] < L ? reference_generate(m, pool, prompts[k], lens[k], 100, NULL, 0, 0, want, NULL) : 0;
        CHECK(n == L - lens[k]);
        CHECK(memcmp(all + lens[k], want, (size_t)n * sizeof(int32_t)) == 0);
    }
    CHECK(pool_full(pool));
    lmd_decode_run_free(run);
    lmd_generator_free(g);

    /* a prompt longer than the context length is refused up front */
    int32_t long_prompt[13] = {0};
    prompt_set too_long = {{0}, {0}, 0};
    add_prompt(&too_long, long_prompt, 13);
    g = new_generator(&too_long, V, 4, &greedy, 0, NULL, 0);
    run = (lmd_decode_run *)&run;
    CHECK(lmd_decode_run_init(&run, m, pool, g, &err) == LMD_ERR_CACHE_FULL && run == NULL);
    CHECK_MSG_CONTAINS(err, "prompt 0 has 13 tokens but the model's context length is 12");
    lmd_generator_free(g);
    /* a generator over another vocabulary */
    g = new_generator(&ps, V + 1, 4, &greedy, 0, NULL, 0);
    CHECK(lmd_decode_run_init(&run, m, pool, g, &err) == LMD_ERR_INVALID_ARG && run == NULL);
    CHECK_MSG_CONTAINS(err, "vocabulary");
    lmd_generator_free(g);

    lmd_sampler_free(sampler);
    lmd_kvpool_free(pool);
    tiny_close(&t, m);
}

/* A pool too small for the prompts: the run fails with the forward's error; once another
 * sequence gives its block back, calling it again completes the run as if nothing had
 * failed, and freeing it returns every block (the sanitizer build checks for leaks). */
static void test_pool_too_small_then_retry(void) {
    tiny_spec spec = tiny_llama_spec();
    tiny_model t;
    lmd_model *m = tiny_open(&t, &spec, 16);
    const int V = t.config.vocab_size;
    lmd_kvpool *pool = tiny_pool(&t, 4, 4), *ref_pool = tiny_pool(&t, 4, 16);
    lmd_sampler *sampler;
    lmd_error err;
    CHECK(lmd_sampler_init(&sampler, V, &err) == LMD_OK);
    const lmd_sampling_params greedy = greedy_params();
    int32_t prompt[6] = {1, 2, 3, 4, 5, 6};
    prompt_set ps = {{0}, {0}, 0};
    add_prompt(&ps, prompt, 6);     /* 2 blocks */
    add_prompt(&ps, prompt + 1, 5); /* 2 blocks */
    lmd_generator *g = new_generator(&ps, V, 2, &greedy, 0, NULL, 0);
    lmd_decode_run *run;
    CHECK(lmd_decode_run_init(&run, m, pool, g, &err) == LMD_OK);
    lmd_kvseq *other = tiny_seq(pool, 24);
    CHECK(tiny_run(m, other, prompt, 1, NULL, &err) == LMD_OK); /* holds 1 of the 4 blocks */
    CHECK(lmd_decode_run_steps(run, &sampler, 1, INT32_MAX, NULL, NULL, NULL, NULL, NULL, &err) == LMD_ERR_CACHE_FULL);
    CHECK_MSG_CONTAINS(err, "3 free blocks");
    CHECK(lmd_generator_generated(g, 0) == 0 && lmd_generator_generated(g, 1) == 0);
    CHECK(pool->n_free == 3);
    lmd_kvseq_free(other);
    CHECK(lmd_decode_run_steps(run, &sampler, 1, INT32_MAX, NULL, NULL, NULL, NULL, NULL, &err) == LMD_OK);
    for (int k = 0; k < 2; k++) {
        int32_t want[2];
        int n_prompt = k == 0 ? 6 : 5;
        CHECK(reference_generate(m, ref_pool, prompt + k, n_prompt, 2, NULL, 0, 0, want, NULL) == 2);
        CHECK(lmd_generator_generated(g, k) == 2);
        CHECK(memcmp(lmd_generator_tokens(g, k, NULL) + n_prompt, want, sizeof want) == 0);
    }
    lmd_decode_run_free(run);
    CHECK(pool_full(pool));
    lmd_generator_free(g);
    lmd_sampler_free(sampler);
    lmd_kvpool_free(pool);
    lmd_kvpool_free(ref_pool);
    tiny_close(&t, m);
}

static void test_beam_search(void) {
    test_rng r = {10};
    tiny_spec spec = tiny_llama_spec();
    tiny_model t;
    lmd_model *m = tiny_open(&t, &spec, 16);
    const int V = t.config.vocab_size;
    lmd_kvpool *pool = tiny_pool(&t, 4, 64);
    lmd_error err;
    enum { NEW = 8 };
    int32_t prompt[6], want[NEW];
    double want_lp[NEW], want_sum = 0.0;
    for (int i = 0; i < 6; i++) prompt[i] = test_rand_below(&r, V);
    CHECK(reference_generate(m, pool, prompt, 6, NEW, NULL, 0, 0, want, want_lp) == NEW);
    for (int i = 0; i < NEW; i++) want_sum += want_lp[i];

    /* width 1 is greedy */
    lmd_beam_config c = {1, V, NEW, 1, 1.0, LMD_EARLY_STOP_HEURISTIC, NULL, 0, 0, 1.0, 0, 0, NULL, 0};
    lmd_beam_search *bs;
    CHECK(lmd_beam_search_init(&bs, &c, &err) == LMD_OK);
    int32_t peak = -1;
    CHECK(lmd_decode_beam_search(m, pool, bs, prompt, 6, &peak, NULL, NULL, &err) == LMD_OK);
    CHECK(lmd_beam_search_done(bs) && lmd_beam_search_n_hypotheses(bs) == 1);
    int32_t tokens[NEW], len;
    float lps[NEW], score, sum;
    CHECK(lmd_beam_search_hypothesis(bs, 0, tokens, lps, &len, &score, &sum, &err) == LMD_OK);
    CHECK(len == NEW && memcmp(tokens, want, sizeof want) == 0);
    for (int i = 0; i < NEW; i++) CHECK_CLOSE(lps[i], want_lp[i], 1e-5);
    CHECK_CLOSE(sum, want_sum, 1e-4);
    CHECK_CLOSE(score, want_sum / NEW, 1e-4); /* length_penalty 1 */
    CHECK(peak == (6 + NEW - 1 + 3) / 4); /* the prompt + every token but the last, blocks of 4 */
    CHECK(pool_full(pool));
    lmd_beam_search_free(bs);

    /* a stop check that asks to stop at its third call: the search ends there, unfinished,
     * with its sequences released to the pool */
    int calls = 0;
    CHECK(lmd_beam_search_init(&bs, &c, &err) == LMD_OK);
    CHECK(lmd_decode_beam_search(m, pool, bs, prompt, 6, NULL, stop_at_third_call, &calls, &err) ==
          LMD_ERR_STOPPED);
    CHECK(calls == 3 && !lmd_beam_search_done(bs) && lmd_beam_search_length(bs) == 3);
    CHECK(strstr(err.msg, "stopped after 3 steps") != NULL);
    CHECK(pool_full(pool));
    lmd_beam_search_free(bs);

    /* width 3, two hypotheses: each one's log-probs are the model's own along its tokens */
    lmd_beam_config c3 = {3, V, NEW, 2, 1.0, LMD_EARLY_STOP_HEURISTIC, NULL, 0, 0, 1.0, 0, 0, NULL, 0};
    CHECK(lmd_beam_search_init(&bs, &c3, &err) == LMD_OK);
    CHECK(lmd_decode_beam_search(m, pool, bs, prompt, 6, &peak, NULL, NULL, &err) == LMD_OK);
    CHECK(pool_full(pool));
    CHECK(lmd_beam_search_n_hypotheses(bs) == 2);
    int32_t hyp[2][NEW];
    float prev_score = INFINITY;
    for (int h = 0; h < 2; h++) {
        CHECK(lmd_beam_search_hypothesis(bs, h, hyp[h], lps, &len, &score, &sum, &err) == LMD_OK);
        CHECK(len == NEW && score <= prev_score);
        prev_score = score;
        int32_t all[6 + NEW];
        memcpy(all, prompt, sizeof prompt);
        memcpy(all + 6, hyp[h], sizeof hyp[h]);
        float *logits = malloc((size_t)(6 + NEW) * V * sizeof(float));
        lmd_kvseq *s = tiny_seq(pool, t.config.context_length);
        CHECK(tiny_run(m, s, all, 6 + NEW, logits, &err) == LMD_OK);
        double total = 0.0;
        for (int i = 0; i < NEW; i++) {
            double lp = log_softmax_at(logits + (int64_t)(5 + i) * V, V, hyp[h][i]);
            CHECK_CLOSE(lps[i], lp, 1e-5);
            total += lp;
        }
        CHECK_CLOSE(sum, total, 1e-4);
        lmd_kvseq_free(s);
        free(logits);
    }
    CHECK(memcmp(hyp[0], hyp[1], sizeof hyp[0]) != 0);
    /* forked beams share the prompt's blocks: the peak stays below three separate caches */
    CHECK(peak < 3 * 4);
    lmd_beam_search_free(bs);

    /* errors, with the pool untouched */
    CHECK(lmd_beam_search_init(&bs, &c, &err) == LMD_OK);
    CHECK(lmd_decode_beam_search(m, pool, bs, prompt, 0, NULL, NULL, NULL, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "prompt 0 is empty");
    int32_t long_prompt[20] = {0};
    CHECK(lmd_decode_beam_search(m, pool, bs, long_prompt, 20, NULL, NULL, NULL, &err) == LMD_ERR_CACHE_FULL);
    CHECK_MSG_CONTAINS(err, "exceed the context length 24");
    CHECK(pool_full(pool) && lmd_beam_search_length(bs) == 0);
    lmd_beam_search_free(bs);
    lmd_beam_config other = {1, V + 2, NEW, 1, 1.0, LMD_EARLY_STOP_HEURISTIC, NULL, 0, 0, 1.0, 0, 0, NULL, 0};
    CHECK(lmd_beam_search_init(&bs, &other, &err) == LMD_OK);
    CHECK(lmd_decode_beam_search(m, pool, bs, prompt, 6, NULL, NULL, NULL, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "vocabulary");
    lmd_beam_search_free(bs);
    /* a pool too small for the beams: the error comes back and every block with it */
    lmd_kvpool *tiny_p = tiny_pool(&t, 4, 3);
    CHECK(lmd_beam_search_init(&bs, &c3, &err) == LMD_OK);
    CHECK(lmd_decode_beam_search(m, tiny_p, bs, prompt, 6, NULL, NULL, NULL, &err) == LMD_ERR_CACHE_FULL);
    CHECK(pool_full(tiny_p));
    lmd_beam_search_free(bs);
    lmd_kvpool_free(tiny_p);

    lmd_kvpool_free(pool);
    tiny_close(&t, m);
}

/* a beam hook that counts each search's steps (ctx: int32_t[4], the last the search whose
 * call fails with LMD_ERR_STOPPED, -1 for none) */
static lmd_status count_search_steps(void *ctx, int32_t search, lmd_beam_search *bs, lmd_error *err) {
    int32_t *steps = ctx;
    (void)bs;
    if (search == steps[3] && steps[search] == 2) return lmd_fail(err, LMD_ERR_STOPPED, "hook stops search %d", search);
    steps[search]++;
    return LMD_OK;
}

// the finished hypotheses of got are those of want, bit for bit: tokens, log-probabilities,
// score and sum (at most 8 tokens each)
static void check_same_hypotheses(const lmd_beam_search *want, const lmd_beam_search *got) {
    lmd_error err;
    const int32_t n = lmd_beam_search_n_hypotheses(want);
    CHECK(n == lmd_beam_search_n_hypotheses(got) && n >= 1);
    for (int32_t h = 0; h < n; h++) {
        int32_t want_tokens[8], got_tokens[8], want_len, got_len;
        float want_lps[8], got_lps[8], want_score, got_score, want_sum, got_sum;
        CHECK(lmd_beam_search_hypothesis(want, h, want_tokens, want_lps, &want_len, &want_score, &want_sum, &err) ==
              LMD_OK);
        CHECK(lmd_beam_search_hypothesis(got, h, got_tokens, got_lps, &got_len, &got_score, &got_sum, &err) == LMD_OK);
        CHECK(want_len == got_len && memcmp(want_tokens, got_tokens, (size_t)got_len * sizeof(int32_t)) == 0);
        CHECK(memcmp(want_lps, got_lps, (size_t)got_len * sizeof(float)) == 0);
        CHECK(memcmp(&want_score, &got_score, sizeof(float)) == 0 && memcmp(&want_sum, &got_sum, sizeof(float)) == 0);
    }
}

// prompts a (18 tokens) and b (17) that share their first 16 tokens (SHARED_PREFIX_MIN)
static void common_beginning_pair(int32_t a[18], int32_t b[17], int32_t V) {
    for (int i = 0; i < 18; i++) a[i] = (7 * i + 3) % V;
    memcpy(b, a, 17 * sizeof(int32_t));
    b[16] = (a[16] + 1) % V;
}

/* Three beam searches run together (different prompt lengths, widths, budgets and
 * early-stopping rules, so that they end at different steps) give each search's hypotheses
 * of it alone, bit for bit, and every block back to the pool; the hook sees each search's
 * steps. One search given twice, no searches, and a hook that fails are errors. */
static void test_beam_searches_together_equal_each_alone(void) {
    test_rng r = {12};
    tiny_spec spec = tiny_llama_spec();
    tiny_model t;
    lmd_model *m = tiny_open(&t, &spec, 16);
    const int V = t.config.vocab_size;
    lmd_kvpool *pool = tiny_pool(&t, 4, 128);
    lmd_error err;
    enum { S = 3, MOST = 8 };
    int32_t p0[6], p1[9], p2[4];
    for (int i = 0; i < 9; i++) p1[i] = test_rand_below(&r, V);
    for (int i = 0; i < 6; i++) p0[i] = test_rand_below(&r, V);
    for (int i = 0; i < 4; i++) p2[i] = test_rand_below(&r, V);
    const int32_t *prompts[S] = {p0, p1, p2}, lens[S] = {6, 9, 4};
    int32_t greedy[MOST];
    CHECK(reference_generate(m, pool, p1, 9, MOST, NULL, 0, 0, greedy, NULL) == MOST);
    const int32_t eos[1] = {greedy[2]}; /* a token the searches meet early */
    const lmd_beam_config configs[S] = {
        {3, V, MOST, 2, 1.0, LMD_EARLY_STOP_HEURISTIC, eos, 1, 0, 1.0, 0, 0, NULL, 0},
        {2, V, 5, 2, 0.6, LMD_EARLY_STOP_TRUE, eos, 1, 0, 1.0, 0, 0, NULL, 0},
        {4, V, MOST, 3, 2.0, LMD_EARLY_STOP_NEVER, eos, 1, 0, 1.0, 0, 0, NULL, 0},
    };
    lmd_beam_search *alone[S], *together[S];
    for (int s = 0; s < S; s++) {
        CHECK(lmd_beam_search_init(&alone[s], &configs[s], &err) == LMD_OK);
        CHECK(lmd_beam_search_init(&together[s], &configs[s], &err) == LMD_OK);
        CHECK(lmd_decode_beam_search(m, pool, alone[s], prompts[s], lens[s], NULL, NULL, NULL, &err) == LMD_OK);
    }
    int32_t steps[4] = {0, 0, 0, -1}, peak = 0;
    CHECK(lmd_decode_beam_searches(m, pool, together, S, prompts, lens, &peak, count_search_steps, steps, NULL, NULL,
                                   &err) == LMD_OK);
    CHECK(pool_full(pool) && peak > 0);
    for (int s = 0; s < S; s++) {
        CHECK(lmd_beam_search_done(together[s]));
        CHECK(steps[s] == lmd_beam_search_length(together[s]) + 1 || steps[s] == lmd_beam_search_length(together[s]));
        check_same_hypotheses(alone[s], together[s]);
    }
    /* the budgets differ, so the searches end at different steps */
    CHECK(lmd_beam_search_length(together[1]) <= 5 && lmd_beam_search_length(together[2]) == MOST);

    /* errors: one search twice, none, a hook that fails at search 1's third step */
    lmd_beam_search *twice[2] = {alone[0], alone[0]};
    CHECK(lmd_decode_beam_searches(m, pool, twice, 2, prompts, lens, NULL, NULL, NULL, NULL, NULL, &err) ==
          LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "are one search");
    CHECK(lmd_decode_beam_searches(m, pool, together, 0, prompts, lens, NULL, NULL, NULL, NULL, NULL, &err) ==
          LMD_ERR_INVALID_ARG);
    for (int s = 0; s < S; s++) {
        lmd_beam_search_free(together[s]);
        CHECK(lmd_beam_search_init(&together[s], &configs[s], &err) == LMD_OK);
    }
    int32_t failing[4] = {0, 0, 0, 1};
    CHECK(lmd_decode_beam_searches(m, pool, together, S, prompts, lens, NULL, count_search_steps, failing, NULL, NULL,
                                   &err) == LMD_ERR_STOPPED);
    CHECK_MSG_CONTAINS(err, "hook stops search 1");
    CHECK(failing[0] == 3 && failing[1] == 2 && failing[2] == 2 && pool_full(pool));
    for (int s = 0; s < S; s++) {
        lmd_beam_search_free(alone[s]);
        lmd_beam_search_free(together[s]);
    }
    lmd_kvpool_free(pool);
    tiny_close(&t, m);
}

/* Beam searches whose prompts (18 and 17 tokens) begin with the same 16 share the cache of
 * that beginning, as generate()'s prompts do: stopped after their first step, the two
 * searches of width 2 had held 4 blocks of 4 once plus one block each of their prompts'
 * own positions and one copied block each (8); prompts that differ from the first token
 * hold 10 + 2. Run to the end, each search gives what it gives alone. */
static void test_beam_searches_share_a_common_beginning(void) {
    tiny_spec spec = tiny_llama_spec();
    spec.context = MAX_LEN;
    tiny_model t;
    lmd_model *m = tiny_open(&t, &spec, 32);
    const int V = t.config.vocab_size;
    lmd_kvpool *pool = tiny_pool(&t, 4, 64);
    lmd_error err;
    int32_t a[18], b[17];
    common_beginning_pair(a, b, V);
    const int32_t *prompts[2] = {a, b}, lens[2] = {18, 17};
    const lmd_beam_config config = {2, V, 6, 2, 1.0, LMD_EARLY_STOP_NEVER, NULL, 0, 0, 1.0, 0, 0, NULL, 0};
    for (int apart = 0; apart < 2; apart++) {
        b[0] = apart ? (a[0] + 1) % V : a[0];
        lmd_beam_search *searches[2], *alone;
        for (int s = 0; s < 2; s++) CHECK(lmd_beam_search_init(&searches[s], &config, &err) == LMD_OK);
        int calls = 2, peak = 0; /* stop_at_third_call: at its first call */
        CHECK(lmd_decode_beam_searches(m, pool, searches, 2, prompts, lens, &peak, NULL, NULL, stop_at_third_call, &calls,
                                       &err) == LMD_ERR_STOPPED);
        CHECK(peak == (apart ? 10 + 2 : 8) && pool_full(pool));
        for (int s = 0; s < 2; s++) {
            lmd_beam_search_free(searches[s]);
            CHECK(lmd_beam_search_init(&searches[s], &config, &err) == LMD_OK);
        }
        CHECK(lmd_decode_beam_searches(m, pool, searches, 2, prompts, lens, NULL, NULL, NULL, NULL, NULL, &err) ==
              LMD_OK);
        for (int s = 0; s < 2; s++) {
            CHECK(lmd_beam_search_init(&alone, &config, &err) == LMD_OK);
            CHECK(lmd_decode_beam_search(m, pool, alone, prompts[s], lens[s], NULL, NULL, NULL, &err) == LMD_OK);
            check_same_hypotheses(alone, searches[s]);
            lmd_beam_search_free(alone);
            lmd_beam_search_free(searches[s]);
        }
        CHECK(pool_full(pool));
    }
    lmd_kvpool_free(pool);
    tiny_close(&t, m);
}

/* Speculative decoding at temperature 0 gives the target's greedy tokens whatever the draft
 * (its own seed: another random model; a GPT-2 over the same 40 tokens), with batches, short
 * budgets and the context length cutting rounds short; its caches all go back to the pools. */
static void test_speculative_greedy_equals_greedy(void) {
    tiny_spec spec = tiny_llama_spec(), other = tiny_llama_spec(), gpt2 = tiny_gpt2_spec();
    other.seed = 99;
    tiny_model t, d1, d2;
    lmd_model *m = tiny_open(&t, &spec, 16), *drafts[2] = {tiny_open(&d1, &other, 16), tiny_open(&d2, &gpt2, 16)};
    const int V = t.config.vocab_size;
    lmd_kvpool *pool = tiny_pool(&t, 4, 64), *target_pool = tiny_pool(&t, 4, 64);
    lmd_kvpool *draft_pools[2] = {tiny_pool(&d1, 4, 64), tiny_pool(&d2, 4, 64)};
    lmd_sampler *sampler;
    lmd_error err;
    CHECK(lmd_sampler_init(&sampler, V, &err) == LMD_OK);
    const lmd_sampling_params greedy = greedy_params();
    const int32_t a[3] = {1, 5, 9}, b[6] = {2, 3, 4, 5, 6, 7}, c[20] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10,
                                                                         11, 12, 13, 14, 15, 16, 17, 18, 19, 20};
    prompt_set ps = {{0}, {0}, 0};
    add_prompt(&ps, a, 3);
    add_prompt(&ps, b, 6);
    add_prompt(&ps, c, 20); /* 4 positions left in a context of 24 */
    const int32_t budgets[3] = {1, 2, 15};
    for (int di = 0; di < 2; di++)
        for (int bi = 0; bi < 3; bi++)
            for (int32_t n_draft = 1; n_draft <= 5; n_draft += 2) {
                lmd_generator *plain = new_generator(&ps, V, budgets[bi], &greedy, 0, NULL, 0);
                lmd_generator *fast = new_generator(&ps, V, budgets[bi], &greedy, 0, NULL, 0);
                lmd_decode_run *run;
                lmd_speculative_run *spec_run;
                CHECK(lmd_decode_run_init(&run, m, pool, plain, &err) == LMD_OK);
                CHECK(lmd_decode_run_steps(run, &sampler, 1, INT32_MAX, NULL, NULL, NULL, NULL, NULL, &err) == LMD_OK);
                CHECK(lmd_speculative_run_init(&spec_run, m, target_pool, drafts[di], draft_pools[di], fast, n_draft,
                                               &err) == LMD_OK);
                int32_t ids[3 * 6], tokens[3 * 6], n_last = -1;
                CHECK(lmd_speculative_run_rounds(spec_run, &sampler, 1, INT32_MAX, ids, tokens, &n_last, NULL, NULL,
                                                 &err) == LMD_OK);
                int64_t proposed = 0, kept = 0, total_proposed = 0;
                for (int32_t k = 0; k < 3; k++) {
                    int32_t len_plain, len_fast;
                    const int32_t *want = lmd_generator_tokens(plain, k, &len_plain);
                    const int32_t *got = lmd_generator_tokens(fast, k, &len_fast);
                    CHECK(len_plain == len_fast && memcmp(want, got, (size_t)len_plain * sizeof(int32_t)) == 0);
                    CHECK(lmd_generator_finish_reason(fast, k) == lmd_generator_finish_reason(plain, k));
                    lmd_speculative_run_counts(spec_run, k, &proposed, &kept);
                    CHECK(0 <= kept && kept <= proposed);
                    total_proposed += proposed;
                }
                CHECK(budgets[bi] == 1 ? total_proposed == 0 : total_proposed > 0);
                lmd_decode_run_free(run);
                lmd_speculative_run_free(spec_run);
                CHECK(pool_full(pool) && pool_full(target_pool) && pool_full(draft_pools[di]));
                lmd_generator_free(plain);
                lmd_generator_free(fast);
            }
    /* a model that drafts for itself keeps every proposal */
    prompt_set one = {{0}, {0}, 0};
    add_prompt(&one, b, 6);
    lmd_generator *g = new_generator(&one, V, 12, &greedy, 0, NULL, 0);
    lmd_speculative_run *self_run;
    CHECK(lmd_speculative_run_init(&self_run, m, target_pool, m, pool, g, 4, &err) == LMD_OK);
    CHECK(lmd_speculative_run_rounds(self_run, &sampler, 1, INT32_MAX, NULL, NULL, NULL, NULL, NULL, &err) == LMD_OK);
    int64_t proposed, kept;
    lmd_speculative_run_counts(self_run, 0, &proposed, &kept);
    CHECK(proposed == 9 && kept == 9); /* rounds of 4 + 1, 4 + 1, then 1 + 1 (two slots left) */
    lmd_speculative_run_free(self_run);
    lmd_generator_free(g);
    /* bad arguments */
    lmd_speculative_run *bad = NULL;
    g = new_generator(&one, V, 4, &greedy, 0, NULL, 0);
    CHECK(lmd_speculative_run_init(&bad, m, pool, m, pool, g, 4, &err) == LMD_ERR_INVALID_ARG && bad == NULL);
    CHECK_MSG_CONTAINS(err, "pools of their own");
    CHECK(lmd_speculative_run_init(&bad, m, pool, drafts[0], draft_pools[0], g, 0, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "num_draft_tokens (=0)");
    lmd_generator_free(g);
    lmd_sampler_free(sampler);
    lmd_kvpool_free(pool);
    lmd_kvpool_free(target_pool);
    lmd_kvpool_free(draft_pools[0]);
    lmd_kvpool_free(draft_pools[1]);
    tiny_close(&t, m);
    tiny_close(&d1, drafts[0]);
    tiny_close(&d2, drafts[1]);
}

// the prompts of ps decoded greedily by m drafting n_draft tokens a round for itself: after
// one round the target's and the draft's pools hold `blocks` blocks each, and the output is
// plain greedy decoding's
static void check_speculative_blocks_and_output(lmd_model *m, tiny_model *t, const prompt_set *ps, int32_t n_draft,
                                                int32_t max_new, int32_t blocks) {
    const int V = t->config.vocab_size;
    lmd_kvpool *target_pool = tiny_pool(t, 4, 64), *draft_pool = tiny_pool(t, 4, 64);
    lmd_sampler *sampler;
    lmd_error err;
    CHECK(lmd_sampler_init(&sampler, V, &err) == LMD_OK);
    const lmd_sampling_params greedy = greedy_params();
    lmd_generator *plain = new_generator(ps, V, max_new, &greedy, 0, NULL, 0);
    lmd_generator *fast = new_generator(ps, V, max_new, &greedy, 0, NULL, 0);
    lmd_decode_run *run;
    CHECK(lmd_decode_run_init(&run, m, target_pool, plain, &err) == LMD_OK);
    CHECK(lmd_decode_run_steps(run, &sampler, 1, INT32_MAX, NULL, NULL, NULL, NULL, NULL, &err) == LMD_OK);
    lmd_decode_run_free(run);
    lmd_speculative_run *spec_run;
    CHECK(lmd_speculative_run_init(&spec_run, m, target_pool, m, draft_pool, fast, n_draft, &err) == LMD_OK);
    CHECK(lmd_speculative_run_rounds(spec_run, &sampler, 1, 1, NULL, NULL, NULL, NULL, NULL, &err) == LMD_OK);
    CHECK(target_pool->n_blocks - target_pool->n_free == blocks);
    CHECK(draft_pool->n_blocks - draft_pool->n_free == blocks);
    CHECK(lmd_speculative_run_rounds(spec_run, &sampler, 1, INT32_MAX, NULL, NULL, NULL, NULL, NULL, &err) == LMD_OK);
    for (int32_t k = 0; k < ps->n; k++) {
        int32_t len_plain, len_fast;
        const int32_t *want = lmd_generator_tokens(plain, k, &len_plain);
        const int32_t *got = lmd_generator_tokens(fast, k, &len_fast);
        CHECK(len_plain == len_fast && memcmp(want, got, (size_t)len_plain * sizeof(int32_t)) == 0);
    }
    lmd_speculative_run_free(spec_run);
    CHECK(pool_full(target_pool) && pool_full(draft_pool));
    lmd_generator_free(plain);
    lmd_generator_free(fast);
    lmd_sampler_free(sampler);
    lmd_kvpool_free(target_pool);
    lmd_kvpool_free(draft_pool);
}

/* Speculative decoding prefills a prompt once for the sequences that share it (adjacent
 * ones, as lmd_decode_run does) and forks that cache in both models: after one round of a
 * model drafting for itself (every proposal kept), the shared blocks are counted once. */
static void test_speculative_shares_prompts(void) {
    tiny_spec spec = tiny_llama_spec();
    tiny_model t;
    lmd_model *m = tiny_open(&t, &spec, 16);
    const int32_t p[9] = {1, 9, 8, 7, 6, 5, 4, 3, 2}, q[5] = {2, 4, 6, 8, 10};
    prompt_set ps = {{0}, {0}, 0};
    add_prompt(&ps, p, 9);
    add_prompt(&ps, p, 9);
    add_prompt(&ps, q, 5);
    add_prompt(&ps, p, 9);
    /* the target holds tokens + 3 kept proposals: 12 positions (3 blocks of 4) for p, 8 (2)
     * for q; sequence 1 shares the 2 blocks of p's first 8 tokens with sequence 0, sequence 3
     * (after q) prefilled its own: 3 + 1 + 2 + 3. The draft holds one position fewer (it never
     * sees its last proposal): the same blocks. Without sharing: 11. */
    check_speculative_blocks_and_output(m, &t, &ps, 3, 10, 9);
    tiny_close(&t, m);
}

/* Speculative decoding's first round shares a beginning of 16 tokens that the distinct
 * prompts have in common (SHARED_PREFIX_MIN), in the target's and the draft's caches, and
 * decodes as plain greedy does. Prompts of 18 and 17 tokens, 2 kept proposals each after
 * one round: the target holds 19 and 18 positions (5 blocks of 4 each, 10 without sharing),
 * of which the first 16 (4 blocks) are shared: 6. The draft holds one position fewer: the
 * same blocks. */
static void test_speculative_shares_a_common_beginning(void) {
    tiny_spec spec = tiny_llama_spec();
    tiny_model t;
    lmd_model *m = tiny_open(&t, &spec, 32);
    int32_t a[18], b[17];
    common_beginning_pair(a, b, t.config.vocab_size);
    prompt_set ps = {{0}, {0}, 0};
    add_prompt(&ps, a, 18);
    add_prompt(&ps, b, 17);
    check_speculative_blocks_and_output(m, &t, &ps, 2, 5, 6);
    tiny_close(&t, m);
}

/* Speculative decoding's first round shares each group's beginning (add_two_groups) in the
 * target's and the draft's caches: after one round of 2 kept proposals, the a's hold 19 and
 * 18 positions with 16 shared (6 blocks of 4), the b's 23 and 22 with 20 shared (7): 13
 * blocks, 22 without sharing. It decodes as plain greedy does. */
static void test_speculative_shares_beginnings_by_group(void) {
    tiny_spec spec = tiny_llama_spec();
    spec.context = MAX_LEN; /* room for 22-token prompts and their new tokens */
    tiny_model t;
    lmd_model *m = tiny_open(&t, &spec, 32);
    prompt_set ps = {{0}, {0}, 0};
    add_two_groups(&ps, t.config.vocab_size);
    check_speculative_blocks_and_output(m, &t, &ps, 2, 5, 13);
    tiny_close(&t, m);
}

/* A cache the caller gives (lmd_decode_run_use_cache) holding the first tokens of the prompt:
 * the run feeds only the rest, decodes exactly as a fresh run, and leaves the cache (not
 * freed) holding every token but the last. */
static void test_given_cache(void) {
    tiny_spec spec = tiny_llama_spec();
    tiny_model t;
    lmd_model *m = tiny_open(&t, &spec, 16);
    const int V = t.config.vocab_size;
    lmd_kvpool *pool = tiny_pool(&t, 4, 64), *other = tiny_pool(&t, 4, 64);
    lmd_sampler *sampler;
    lmd_error err;
    CHECK(lmd_sampler_init(&sampler, V, &err) == LMD_OK);
    lmd_sampling_params params;
    lmd_sampling_params_default(&params);
    params.temperature = 0.9;
    const int32_t p[7] = {1, 9, 8, 7, 6, 5, 4};
    prompt_set ps = {{0}, {0}, 0};
    add_prompt(&ps, p, 7);
    enum { NEW = 6 };
    lmd_generator *plain = new_generator(&ps, V, NEW, &params, 5, NULL, 0);
    lmd_decode_run *run;
    CHECK(lmd_decode_run_init(&run, m, pool, plain, &err) == LMD_OK);
    CHECK(lmd_decode_run_steps(run, &sampler, 1, INT32_MAX, NULL, NULL, NULL, NULL, NULL, &err) == LMD_OK);
    lmd_decode_run_free(run);

    lmd_kvseq *cache = tiny_seq(pool, t.config.context_length);
    float *logits = malloc((size_t)4 * V * sizeof(float));
    CHECK(tiny_run(m, cache, p, 4, logits, &err) == LMD_OK); /* the first 4 prompt tokens */
    lmd_generator *fast = new_generator(&ps, V, NEW, &params, 5, NULL, 0);
    CHECK(lmd_decode_run_init(&run, m, pool, fast, &err) == LMD_OK);
    lmd_kvseq *foreign = tiny_seq(other, t.config.context_length);
    CHECK(lmd_decode_run_use_cache(run, 0, foreign, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "run's pool");
    CHECK(lmd_decode_run_use_cache(run, 1, cache, &err) == LMD_ERR_INVALID_ARG);
    CHECK(lmd_decode_run_use_cache(run, 0, cache, &err) == LMD_OK);
    CHECK(lmd_decode_run_steps(run, &sampler, 1, INT32_MAX, NULL, NULL, NULL, NULL, NULL, &err) == LMD_OK);
    int32_t len_plain, len_fast;
    const int32_t *want = lmd_generator_tokens(plain, 0, &len_plain);
    const int32_t *got = lmd_generator_tokens(fast, 0, &len_fast);
    CHECK(len_plain == len_fast && memcmp(want, got, (size_t)len_plain * sizeof(int32_t)) == 0);
    CHECK(memcmp(lmd_generator_token_logprobs(plain, 0), lmd_generator_token_logprobs(fast, 0),
                 NEW * sizeof(float)) == 0);
    lmd_decode_run_free(run);
    CHECK(cache->len == 7 + NEW - 1 && !pool_full(pool)); /* the caller's, still holding its blocks */
    /* a cache holding the whole prompt leaves nothing to feed */
    lmd_generator *again = new_generator(&ps, V, NEW, &params, 5, NULL, 0);
    CHECK(lmd_decode_run_init(&run, m, pool, again, &err) == LMD_OK);
    CHECK(lmd_decode_run_use_cache(run, 0, cache, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "at least one must be left to feed");
    lmd_decode_run_free(run);
    lmd_kvseq_free(cache);
    lmd_kvseq_free(foreign);
    CHECK(pool_full(pool) && pool_full(other));
    free(logits);
    lmd_generator_free(plain);
    lmd_generator_free(fast);
    lmd_generator_free(again);
    lmd_sampler_free(sampler);
    lmd_kvpool_free(pool);
    lmd_kvpool_free(other);
    tiny_close(&t, m);
}

int main(void) {
    test_greedy_equals_argmax_chain();
    test_shared_prompts_equal_each_alone();
    test_prompts_with_a_common_beginning_share_its_cache();
    test_prompts_share_beginnings_by_group();
    test_context_length_ends_sequences();
    test_pool_too_small_then_retry();
    test_beam_search();
    test_beam_searches_together_equal_each_alone();
    test_beam_searches_share_a_common_beginning();
    test_speculative_greedy_equals_greedy();
    test_speculative_shares_prompts();
    test_speculative_shares_a_common_beginning();
    test_speculative_shares_beginnings_by_group();
    test_given_cache();
    return test_report("test_decode");
}
