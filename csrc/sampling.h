/*
 * sampling.h -- logits processors and samplers over rows of logits.
 *
 * One row of V logits goes through a fixed chain (the order of the
 * lmd_sampling_params fields below):
 *
 *   allowed/banned masks and logit bias
 *   -> repetition penalty (CTRL: positive logits divided, negative multiplied,
 *      over every distinct token of the context)
 *   -> frequency and presence penalties (OpenAI/vLLM: z -= f*count + p*(count>0),
 *      counted over the generated part context[prompt_len:])
 *   -> no-repeat-ngram bans (transformers' NoRepeatNGram over the whole context)
 *   -> temperature -> top_k -> top_p -> min_p -> typical_p -> epsilon -> eta
 *   -> a draw by inverse CDF with a caller-supplied coin in [0, 1)
 *
 * Each truncation acts on the distribution the previous ones left, with the
 * rules of Hugging Face transformers' logits warpers (ties with a boundary
 * value are kept). No stage sorts the vocabulary: truncations work on a
 * candidate list that a single filtering pass extracts, and cumulative-mass
 * cuts (top-p, typical) bucket the candidates by key and sort only the bucket
 * that holds the boundary.
 *
 * Usage (one row, one thread):
 *
 *     lmd_sampler *s; lmd_error err;
 *     lmd_sampler_init(&s, vocab, &err);
 *     lmd_sampling_params p; lmd_sampling_params_default(&p);
 *     p.top_p = 0.9;
 *     lmd_row_inputs in = {0}; in.n_allowed = -1;
 *     int32_t token; float logprob;
 *     lmd_sample_row(s, &p, &in, logits, vocab, lmd_rng_uniform(seed, 0, step, 0),
 *                    NULL, &token, &logprob, &err);
 *     lmd_sampler_free(s);
 *
 * Ownership: an lmd_sampler is scratch memory for one thread at a time; all
 * pointers in lmd_row_inputs are borrowed for the duration of the call.
 */
#ifndef LMD_SAMPLING_H
#define LMD_SAMPLING_H

#include "lmdecode.h"

typedef struct {
    double temperature;           /* 0 = greedy over the processed logits, or a normal float32 */
    int32_t top_k;                /* >= 0; 0 = off */
    double top_p;                 /* (0, 1]; 1 = off */
    double min_p;                 /* [0, 1]; 0 = off */
    double typical_p;             /* (0, 1]; 1 = off */
    double epsilon;               /* [0, 1); 0 = off */
    double eta;                   /* [0, 1); 0 = off */
    double repetition_penalty;    /* a normal float32 > 0; 1 = off */
    double frequency_penalty;     /* [-2, 2]; 0 = off */
    double presence_penalty;      /* [-2, 2]; 0 = off */
    int32_t no_repeat_ngram_size; /* >= 0; 0 = off */
    int32_t min_tokens_to_keep;   /* >= 1 */
} lmd_sampling_params;

/* The identity chain: temperature 1, every processor off. */
void lmd_sampling_params_default(lmd_sampling_params *p);

/* LMD_ERR_INVALID_ARG naming the first field outside its domain. */
lmd_status lmd_sampling_params_validate(const lmd_sampling_params *p, lmd_error *err);

/*
 * LMD_ERR_INVALID_ARG naming `name` unless x > 0 rounds to a normal float32, in
 * [FLT_MIN, FLT_MAX] = [1.1754944e-38, 3.4028235e+38]. For the factors the chain applies in
 * float32 (temperature, repetition penalty): a smaller one becomes 0 or subnormal there, a
 * larger one inf, and dividing by those turns finite logits into inf or NaN.
 */
lmd_status lmd_check_float32_factor(const char *name, double x, lmd_error *err);

/*
 * The index of the largest logit of z (vocab,) (its first) when z[i] / t leaves the float32
 * range (is +-inf), else -1; for t a normal float32 > 0. Then every scaled logit is +-inf or
 * NaN: lmd_sample_row refuses such a temperature. (A smaller logit that becomes -inf is at
 * least 2^103 below the largest: probability 0 in float32 anyway.) Only t < 1 can do that,
 * so for t >= 1 this returns -1 without reading z.
 */
int32_t lmd_scaling_overflow(const float *z, int32_t vocab, float t);

/* Per-row inputs of the processors; every pointer may be NULL when its count is 0. */
typedef struct {
    const int32_t *context;    /* (context_len,) tokens already seen, prompt first */
    int32_t context_len;
    int32_t prompt_len;        /* context[:prompt_len] is the prompt, clamped to context_len */
    const int32_t *bias_ids;   /* (n_bias,) tokens whose logit gets bias_values added */
    const float *bias_values;  /* (n_bias,) */
    int32_t n_bias;
    const int32_t *allowed;    /* (n_allowed,) the only tokens that may be drawn */
    int32_t n_allowed;         /* < 0: every token is allowed */
    const int32_t *banned;     /* (n_banned,) tokens that may never be drawn */
    int32_t n_banned;
} lmd_row_inputs;

typedef struct lmd_sampler lmd_sampler;

/* Scratch for rows of up to vocab_capacity logits (36 bytes per token). */
lmd_status lmd_sampler_init(lmd_sampler **out, int32_t vocab_capacity, lmd_error *err);
/* Safe on NULL. */
void lmd_sampler_free(lmd_sampler *s);
int32_t lmd_sampler_capacity(const lmd_sampler *s);

/*
 * Processes one row and optionally draws from it.
 *   logits        (vocab,) float32; not modified. NaN or +inf is an error.
 *   coin          in [0, 1) to draw a token; negative: no draw (out_token gets the argmax).
 *   out_logprobs  (vocab,) or NULL: log-probabilities of the processed distribution,
 *                 -inf where a token was removed.
 *   out_token, out_logprob  or NULL: the drawn token and its log-probability under the
 *                 processed distribution.
 * Errors: LMD_ERR_INVALID_ARG for bad params, token ids outside [0, vocab), non-finite
 * logits, a logit that logit_bias or the repetition penalty takes to +inf or the temperature
 * out of the float32 range (named so), or a row with no token left after masking;
 * LMD_ERR_INTERNAL if no candidate survives the truncations (a bug: never a token read
 * from an empty list).
 */
lmd_status lmd_sample_row(lmd_sampler *s, const lmd_sampling_params *params,
                          const lmd_row_inputs *inputs, const float *logits, int32_t vocab,
                          double coin, float *out_logprobs, int32_t *out_token,
                          float *out_logprob, lmd_error *err);

/*
 * Processes n_rows rows, in parallel when that pays (the result never depends
 * on it). samplers: n_samplers scratch objects of capacity >= vocab; row r uses
 * samplers[thread]. params: n_params entries, 1 (shared) or n_rows. inputs: NULL
 * or n_rows entries. coins: NULL (no draw) or n_rows coins in [0, 1), e.g.
 * lmd_rng_uniform(seed, stream, step, 0), a negative one meaning no draw for its row. Outputs as in lmd_sample_row with
 * row strides vocab (out_logprobs) and 1 (out_tokens, out_token_logprobs).
 * On error, err holds the message of the lowest failing row and *failed_row
 * (if non-NULL) its index; otherwise *failed_row is -1.
 */
lmd_status lmd_sample_rows(lmd_sampler *const *samplers, int n_samplers,
                           const lmd_sampling_params *params, int32_t n_params,
                           const lmd_row_inputs *inputs, const float *logits, int64_t row_stride,
                           int32_t n_rows, int32_t vocab, const double *coins,
                           float *out_logprobs, int32_t *out_tokens, float *out_token_logprobs,
                           int32_t *failed_row, lmd_error *err);

/*
 * log softmax(row r)[targets[r]] for n_rows rows of vocab logits at row_stride, into out
 * (n_rows,): the very value lmd_sample_row's out_logprobs holds for that token at
 * temperature 1 with no processors, without writing whole rows (scoring a sequence needs
 * one entry per row). out_is_max (n_rows,) or NULL: 1 where the target's logit is its row's
 * largest (a greedy choice; ties count), else 0. Errors (target outside [0, vocab), NaN or
 * +inf, a row of -inf) name the lowest failing row in *failed_row; nothing is written then.
 */
lmd_status lmd_target_logprobs(const float *logits, int64_t row_stride, int32_t n_rows, int32_t vocab,
                               const int32_t *targets, float *out, unsigned char *out_is_max, int32_t *failed_row,
                               lmd_error *err);

/*
 * The log-softmax of a row of logits z (vocab,) at temperature t (> 0) as this module
 * computes it: log_softmax(z / t)[i] = (z[i] / t - ms) - *log_total, with ms = max(z) / t
 * the return value. Returns with *bad_index >= 0 at the first NaN or +inf; a row of -inf
 * returns -inf. Beam search ranks its candidates with these values at t = 1, which are
 * generate()'s log-probs; contrastive decoding takes its amateur's at its temperature.
 */
float lmd_row_log_normalizer(const float *z, int32_t vocab, float t, float *log_total, int32_t *bad_index);

/*
 * Two processors of the chain, on their own for beam search (which applies them to log-probs,
 * as transformers' beam search does). Token ids of ctx outside [0, vocab) are skipped, as
 * transformers drops ids beyond its scores.
 *   lmd_penalize_repetitions: transformers' RepetitionPenaltyLogitsProcessor on z (vocab,): each
 *     distinct token of ctx (len,) has z < 0 multiplied by penalty, else divided, in float32.
 *     seen (vocab,) marks the tokens done (seen[t] == epoch); the caller passes an epoch that
 *     no entry holds yet. Returns the first token whose finite z the penalty took to +inf (a
 *     positive z divided by a penalty < 1), or -1; one taken to -inf is float32's mask.
 *   lmd_ban_repeated_ngrams: transformers' NoRepeatNGramLogitsProcessor: for each earlier
 *     position of ctx whose n-1 tokens equal its last n-1, z of the token that followed them
 *     becomes -inf.
 */
int32_t lmd_penalize_repetitions(float *z, int32_t vocab, const int32_t *ctx, int32_t len, float penalty,
                                 uint32_t *seen, uint32_t epoch);
void lmd_ban_repeated_ngrams(float *z, int32_t vocab, const int32_t *ctx, int32_t len, int32_t n);

#endif /* LMD_SAMPLING_H */
