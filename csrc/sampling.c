/*
 * sampling.c -- the logits-processor chain and the sampler (see sampling.h).
 *
 * Glossary: V vocabulary size; z the row's logits after masks and penalties;
 * s = z / T the temperature-scaled logits (transformers divides the same way);
 * ms = max(s); w = e^(s - ms) the unnormalized probability of a token;
 * d = ms - s >= 0 its distance below the best token in nats.
 *
 * A row flows through three phases:
 *   1. processors that touch only a few tokens (masks, bias, penalties,
 *      n-gram bans) write a private copy of the row, so the caller's array is
 *      never modified and an untouched row is never copied;
 *   2. the first active truncation extracts a candidate list (token id and s,
 *      in ascending id order) from the full row in one filtering pass, with a
 *      bound chosen so that the list holds every token the truncation could
 *      keep; the mass of the tokens left out is remembered so that
 *      probabilities stay exact;
 *   3. the remaining truncations shrink the list in place, then a token is
 *      drawn by inverse CDF over the list in id order.
 * Rows without truncation skip the list and draw straight from the row.
 */
#include "sampling.h"

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vec.h"

#ifdef _OPENMP
#include <omp.h>
#endif

/* Cumulative-mass cuts bucket keys (in nats) at this resolution; keys past
 * the last bucket edge share the last bucket. */
#define MASS_BUCKETS_PER_NAT 64
#define MASS_BUCKETS 4096

/* Dense prefilter bounds for top-p: the smallest distance d below the best
 * token whose covered mass already reaches p. */
static const float TOP_P_LADDER[] = {1.0f, 2.0f, 4.0f, 8.0f, 16.0f, 32.0f};
#define TOP_P_LADDER_LEN ((int)(sizeof TOP_P_LADDER / sizeof TOP_P_LADDER[0]))

/* Extra nats added to prefilter bounds so that rounding never drops a token
 * the exact rule keeps (the exact rules run again on the list). */
#define BOUND_SLACK 1e-3f

struct lmd_sampler {
    int32_t capacity;       /* V the buffers hold */
    float *work;            /* (V,) the row after masks and penalties */
    int32_t *cand_id;       /* (V,) candidate token ids, ascending */
    float *cand_s;          /* (V,) their scaled logits s */
    float *key;             /* (V,) per-candidate sort key (scratch) */
    float *weight;          /* (V,) per-candidate w = e^(s - ms) (scratch) */
    float *select;          /* (V,) copy destroyed by selection; boundary-bucket keys (scratch) */
    float *select_w;        /* (V,) boundary-bucket weights (scratch) */
    uint32_t *seen;         /* (V,) seen[t] == epoch: t already met in this call */
    int32_t *count;         /* (V,) occurrences in the generated part; all zero between calls */
    uint32_t epoch;
    double bucket_mass[MASS_BUCKETS];
    int32_t bucket_count[MASS_BUCKETS];
};

/* The candidate list of one row; ids and scaled logits live in the sampler. */
typedef struct {
    int32_t n;
    float ms;             /* max scaled logit of the row (that token is always a candidate) */
    double outside_mass;  /* sum of w over tokens still in the distribution but not listed */
    double outside_wd;    /* sum of w * d over them (for the entropy) */
    int weights_valid;    /* the sampler's weight[] holds w of every listed token */
} cand_list;

/* ------------------------------------------------------------------ */
/* parameters                                                           */
/* ------------------------------------------------------------------ */

void lmd_sampling_params_default(lmd_sampling_params *p) {
    memset(p, 0, sizeof *p);
    p->temperature = 1.0;
    p->top_p = 1.0;
    p->typical_p = 1.0;
    p->repetition_penalty = 1.0;
    p->min_tokens_to_keep = 1;
}

/* x > 0 rounds to a normal float32. Below FLT_MAX + half an ulp (0x1.ffffffp127) the double
 * converts to at most FLT_MAX; above, the conversion would overflow, which C leaves undefined. */
static int rounds_to_normal_float(double x) { return x < 0x1.ffffffp127 && (float)x >= FLT_MIN; }

lmd_status lmd_check_float32_factor(const char *name, double x, lmd_error *err) {
    char v[LMD_NUMBER_CHARS];
    if (!rounds_to_normal_float(x))
        return lmd_fail(err, LMD_ERR_INVALID_ARG,
                        "%s (=%s) must be in [1.1754944e-38, 3.4028235e+38], a normal float32: logits are "
                        "scaled by it in float32",
                        name, lmd_format_double(v, x));
    return LMD_OK;
}

lmd_status lmd_sampling_params_validate(const lmd_sampling_params *p, lmd_error *err) {
    /* Comparisons are written so that NaN fails them. Values print in full (lmd_format_double):
     * a value just outside a range must not read as one inside it. */
    char v[LMD_NUMBER_CHARS];
    if (!(p->temperature >= 0.0) || isinf(p->temperature))
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "temperature (=%s) must be a finite number >= 0",
                        lmd_format_double(v, p->temperature));
    /* no clamping (vLLM raises temperatures below 0.01 and makes those below 1e-5 greedy):
     * the temperature asked for is the one applied, or an error says why it cannot be */
    if (p->temperature > 0.0 && !rounds_to_normal_float(p->temperature))
        return lmd_fail(err, LMD_ERR_INVALID_ARG,
                        "temperature (=%s) must be 0 (greedy) or in [1.1754944e-38, 3.4028235e+38], a "
                        "normal float32: logits are divided by it in float32",
                        lmd_format_double(v, p->temperature));
    if (p->top_k < 0)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "top_k (=%d) must be >= 0 (0 disables it)",
                        (int)p->top_k);
    if (!(p->top_p > 0.0 && p->top_p <= 1.0))
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "top_p (=%s) must be in (0, 1]",
                        lmd_format_double(v, p->top_p));
    if (!(p->min_p >= 0.0 && p->min_p <= 1.0))
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "min_p (=%s) must be in [0, 1]",
                        lmd_format_double(v, p->min_p));
    if (!(p->typical_p > 0.0 && p->typical_p <= 1.0))
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "typical_p (=%s) must be in (0, 1]",
                        lmd_format_double(v, p->typical_p));
    if (!(p->epsilon >= 0.0 && p->epsilon < 1.0))
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "epsilon (=%s) must be in [0, 1)",
                        lmd_format_double(v, p->epsilon));
    if (!(p->eta >= 0.0 && p->eta < 1.0))
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "eta (=%s) must be in [0, 1)",
                        lmd_format_double(v, p->eta));
    if (!(p->repetition_penalty > 0.0) || isinf(p->repetition_penalty))
        return lmd_fail(err, LMD_ERR_INVALID_ARG,
                        "repetition_penalty (=%s) must be a finite number > 0",
                        lmd_format_double(v, p->repetition_penalty));
    lmd_status st = lmd_check_float32_factor("repetition_penalty", p->repetition_penalty, err);
    if (st != LMD_OK) return st;
    if (!(p->frequency_penalty >= -2.0 && p->frequency_penalty <= 2.0))
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "frequency_penalty (=%s) must be in [-2, 2]",
                        lmd_format_double(v, p->frequency_penalty));
    if (!(p->presence_penalty >= -2.0 && p->presence_penalty <= 2.0))
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "presence_penalty (=%s) must be in [-2, 2]",
                        lmd_format_double(v, p->presence_penalty));
    if (p->no_repeat_ngram_size < 0)
        return lmd_fail(err, LMD_ERR_INVALID_ARG,
                        "no_repeat_ngram_size (=%d) must be >= 0 (0 disables it)",
                        (int)p->no_repeat_ngram_size);
    if (p->min_tokens_to_keep < 1)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "min_tokens_to_keep (=%d) must be >= 1",
                        (int)p->min_tokens_to_keep);
    return LMD_OK;
}

static lmd_status check_token_ids(const char *name, const int32_t *ids, int32_t n, int32_t vocab,
                                  lmd_error *err) {
    if (n > 0 && ids == NULL) return lmd_fail(err, LMD_ERR_INVALID_ARG, "%s is NULL", name);
    for (int32_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= vocab)
            return lmd_fail(err, LMD_ERR_INVALID_ARG, "%s[%d] (=%d) is not a token id in [0, %d)",
                            name, (int)i, (int)ids[i], (int)vocab);
    return LMD_OK;
}

static lmd_status check_row_inputs(const lmd_row_inputs *in, int32_t vocab, lmd_error *err) {
    lmd_status st;
    if (in->context_len < 0 || in->prompt_len < 0 || in->n_bias < 0 || in->n_banned < 0)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "negative length in row inputs");
    if ((st = check_token_ids("context", in->context, in->context_len, vocab, err))) return st;
    if ((st = check_token_ids("logit_bias", in->bias_ids, in->n_bias, vocab, err))) return st;
    if (in->n_bias > 0 && in->bias_values == NULL)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "logit_bias values are NULL");
    for (int32_t i = 0; i < in->n_bias; i++)
        if (isnan(in->bias_values[i]) || in->bias_values[i] == INFINITY) {
            char v[LMD_NUMBER_CHARS];
            return lmd_fail(err, LMD_ERR_INVALID_ARG,
                            "logit_bias for token %d (=%s) must not be NaN or +inf",
                            (int)in->bias_ids[i], lmd_format_float(v, in->bias_values[i]));
        }
    if ((st = check_token_ids("allowed_tokens", in->allowed, in->n_allowed, vocab, err))) return st;
    if ((st = check_token_ids("banned_tokens", in->banned, in->n_banned, vocab, err))) return st;
    return LMD_OK;
}

/* ------------------------------------------------------------------ */
/* sampler scratch                                                      */
/* ------------------------------------------------------------------ */

lmd_status lmd_sampler_init(lmd_sampler **out, int32_t vocab_capacity, lmd_error *err) {
    *out = NULL;
    if (vocab_capacity < 1)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "vocab_capacity (=%d) must be >= 1",
                        (int)vocab_capacity);
    lmd_sampler *s = calloc(1, sizeof *s);
    if (s == NULL) return lmd_fail(err, LMD_ERR_NOMEM, "out of memory for the sampler");
    size_t n = (size_t)vocab_capacity;
    s->capacity = vocab_capacity;
    s->work = malloc(n * sizeof *s->work);
    s->cand_id = malloc(n * sizeof *s->cand_id);
    s->cand_s = malloc(n * sizeof *s->cand_s);
    s->key = malloc(n * sizeof *s->key);
    s->weight = malloc(n * sizeof *s->weight);
    s->select = malloc(n * sizeof *s->select);
    s->select_w = malloc(n * sizeof *s->select_w);
    s->seen = calloc(n, sizeof *s->seen);
    s->count = calloc(n, sizeof *s->count);
    if (!s->work || !s->cand_id || !s->cand_s || !s->key || !s->weight || !s->select ||
        !s->select_w || !s->seen || !s->count) {
        lmd_sampler_free(s);
        return lmd_fail(err, LMD_ERR_NOMEM, "out of memory for a sampler of vocabulary %d",
                        (int)vocab_capacity);
    }
    *out = s;
    return LMD_OK;
}

void lmd_sampler_free(lmd_sampler *s) {
    if (s == NULL) return;
    free(s->work);
    free(s->cand_id);
    free(s->cand_s);
    free(s->key);
    free(s->weight);
    free(s->select);
    free(s->select_w);
    free(s->seen);
    free(s->count);
    free(s);
}

int32_t lmd_sampler_capacity(const lmd_sampler *s) { return s ? s->capacity : 0; }

/* A fresh "seen" generation; clears the marks only when the counter wraps. */
static uint32_t next_epoch(lmd_sampler *s) {
    if (++s->epoch == 0) {
        memset(s->seen, 0, (size_t)s->capacity * sizeof *s->seen);
        s->epoch = 1;
    }
    return s->epoch;
}

/* ------------------------------------------------------------------ */
/* phase 1: processors that touch few tokens                            */
/* ------------------------------------------------------------------ */

static int needs_private_copy(const lmd_sampling_params *p, const lmd_row_inputs *in) {
    int32_t generated = in->context_len - (in->prompt_len < in->context_len ? in->prompt_len
                                                                              : in->context_len);
    return in->n_allowed >= 0 || in->n_banned > 0 || in->n_bias > 0 ||
           (p->repetition_penalty != 1.0 && in->context_len > 0) ||
           ((p->frequency_penalty != 0.0 || p->presence_penalty != 0.0) && generated > 0) ||
           (p->no_repeat_ngram_size > 0 && in->context_len > 0);
}

void lmd_ban_repeated_ngrams(float *z, int32_t vocab, const int32_t *ctx, int32_t len, int32_t n) {
    if (len + 1 < n) return;
    const int32_t *tail = ctx + len - (n - 1); /* the last n-1 tokens */
    for (int32_t start = 0; start + n <= len; start++) {
        const int32_t next = ctx[start + n - 1];
        if (next >= 0 && next < vocab && memcmp(ctx + start, tail, (size_t)(n - 1) * sizeof *ctx) == 0)
            z[next] = -INFINITY;
    }
}

int32_t lmd_penalize_repetitions(float *z, int32_t vocab, const int32_t *ctx, int32_t len, float penalty,
                                 uint32_t *seen, uint32_t epoch) {
    int32_t overflowed = -1;
    for (int32_t i = 0; i < len; i++) {
        const int32_t t = ctx[i];
        if (t < 0 || t >= vocab || seen[t] == epoch) continue;
        seen[t] = epoch;
        const float before = z[t];
        z[t] = before < 0.0f ? before * penalty : before / penalty; /* float, as transformers' float32 scores */
        if (overflowed < 0 && z[t] == INFINITY && before != INFINITY) overflowed = t;
    }
    return overflowed;
}

/* The message for a finite logits[token] that a processor (`what`, its value) took to +inf;
 * the logit printed is the caller's, not an intermediate value. */
static lmd_status processor_overflow(const char *what, const char *value, const float *logits, int32_t token,
                                     lmd_error *err) {
    char z[LMD_NUMBER_CHARS];
    return lmd_fail(err, LMD_ERR_INVALID_ARG, "%s (=%s) takes logits[%d] (=%s) to +inf", what,
                    value, (int)token, lmd_format_float(z, logits[token]));
}

/* logits (V,) -> s->work (V,): masks, bias, penalties, n-gram bans; *out = s->work. The
 * caller has checked logits (finite or -inf), so a +inf here is an overflow, reported naming
 * the processor (it used to reach the caller as "logits[i] is +inf"). A -inf from a finite
 * logit is float32 arithmetic's, as in transformers: a token at least 2^103 below any finite
 * logit, of probability 0 in float32 anyway. */
static lmd_status apply_sparse_processors(lmd_sampler *s, const lmd_sampling_params *p,
                                          const lmd_row_inputs *in, const float *logits,
                                          int32_t vocab, const float **out, lmd_error *err) {
    float *z = s->work;
    if (in->n_allowed >= 0) {
        for (int32_t i = 0; i < vocab; i++) z[i] = -INFINITY;
        for (int32_t i = 0; i < in->n_allowed; i++) z[in->allowed[i]] = logits[in->allowed[i]];
    } else {
        memcpy(z, logits, (size_t)vocab * sizeof *z);
    }
    for (int32_t i = 0; i < in->n_banned; i++) z[in->banned[i]] = -INFINITY;
    for (int32_t i = 0; i < in->n_bias; i++) {
        const int32_t t = in->bias_ids[i];
        const float before = z[t], bias = in->bias_values[i];
        z[t] += bias;
        if (z[t] == INFINITY && before != INFINITY) {
            char what[64], v[LMD_NUMBER_CHARS];
            snprintf(what, sizeof what, "logit_bias for token %d", (int)t);
            return processor_overflow(what, lmd_format_float(v, bias), logits, t, err);
        }
    }

    if (p->repetition_penalty != 1.0 && in->context_len > 0) {
        int32_t t = lmd_penalize_repetitions(z, vocab, in->context, in->context_len, (float)p->repetition_penalty,
                                             s->seen, next_epoch(s));
        char v[LMD_NUMBER_CHARS];
        if (t >= 0)
            return processor_overflow("repetition_penalty", lmd_format_double(v, p->repetition_penalty), logits, t,
                                      err);
    }
    /* Frequency and presence penalties cannot overflow: each subtracts less than 2^33 in
     * magnitude, and a float32 needs 2^103 more than FLT_MAX to round to inf. */
    int32_t prompt = in->prompt_len < in->context_len ? in->prompt_len : in->context_len;
    if ((p->frequency_penalty != 0.0 || p->presence_penalty != 0.0) && in->context_len > prompt) {
        const int32_t *gen = in->context + prompt;
        int32_t n_gen = in->context_len - prompt;
        for (int32_t i = 0; i < n_gen; i++) s->count[gen[i]]++;
        for (int32_t i = 0; i < n_gen; i++) {
            int32_t t = gen[i];
            if (s->count[t] == 0) continue; /* already penalized */
            /* two float32 subtractions, as vLLM applies them */
            z[t] -= (float)p->frequency_penalty * (float)s->count[t];
            z[t] -= (float)p->presence_penalty;
            s->count[t] = 0;
        }
    }
    if (p->no_repeat_ngram_size > 0)
        lmd_ban_repeated_ngrams(z, vocab, in->context, in->context_len, p->no_repeat_ngram_size);
    *out = z;
    return LMD_OK;
}

/* ------------------------------------------------------------------ */
/* dense passes over the whole row                                      */
/* ------------------------------------------------------------------ */

/* Max of z (V,), or sets *bad_index to the first NaN/+inf. */
static float row_max(const float *z, int32_t vocab, int32_t *bad_index) {
    vf m = vbroadcast(-INFINITY);
    vi bad = {0};
    int32_t i = 0;
    for (; i + LMD_VEC_LANES <= vocab; i += LMD_VEC_LANES) {
        vf x = vload(z + i);
        m = vmax(x, m);
        bad |= (x != x) | (x == INFINITY);
    }
    float best = vhmax(m);
    int any_bad = vany(bad);
    for (; i < vocab; i++) {
        best = z[i] > best ? z[i] : best;
        any_bad |= isnan(z[i]) || z[i] == INFINITY;
    }
    *bad_index = -1;
    if (any_bad) {
        for (i = 0; i < vocab; i++)
            if (isnan(z[i]) || z[i] == INFINITY) {
                *bad_index = i;
                break;
            }
    }
    return best;
}

static int32_t first_index_of(const float *z, int32_t vocab, float value) {
    int32_t i = 0;
    for (; i + LMD_VEC_LANES <= vocab; i += LMD_VEC_LANES)
        if (vany(vload(z + i) == value)) break;
    for (; i < vocab; i++)
        if (z[i] == value) return i;
    return 0;
}

/* x / t, the temperature scaling transformers applies; t == 1 (the common
 * case) skips the division, which would change nothing. The test is loop
 * invariant, so compilers hoist it out of the loops below. */
static inline vf scaled(vf x, float t) { return t == 1.0f ? x : x / t; }

int32_t lmd_scaling_overflow(const float *z, int32_t vocab, float t) {
    if (!(t < 1.0f)) return -1; /* |z / t| <= |z| <= FLT_MAX */
    int32_t bad_index;
    const float z_max = row_max(z, vocab, &bad_index);
    if (bad_index >= 0 || z_max == -INFINITY || isfinite(z_max / t)) return -1;
    return first_index_of(z, vocab, z_max);
}

/* Statistics of the whole row used to bound the first truncation:
 * mass = sum w, wd = sum w * d, ladder[j] = sum of w over d <= TOP_P_LADDER[j].
 * Lanes accumulate in float for FLUSH_BLOCKS blocks, then flush into double:
 * relative error below FLUSH_BLOCKS * 2^-24 (1.5e-5), far inside the margins
 * the bounds are chosen with. */
#define FLUSH_BLOCKS 256

typedef struct {
    double mass, wd, ladder[TOP_P_LADDER_LEN];
} dense_moments;

static dense_moments row_moments(const float *z, int32_t vocab, float t, float ms, int want_wd,
                                 int want_ladder) {
    enum { N_SUMS = 2 + TOP_P_LADDER_LEN }; /* mass, wd, ladder... */
    vf partial[N_SUMS];
    vd total_lo[N_SUMS], total_hi[N_SUMS];
    for (int j = 0; j < N_SUMS; j++) {
        partial[j] = vbroadcast(0.0f);
        total_lo[j] = total_hi[j] = (vd){0};
    }
    int32_t i = 0, blocks = 0;
    for (; i + LMD_VEC_LANES <= vocab; i += LMD_VEC_LANES) {
        vf sv = scaled(vload(z + i), t);
        vf w = vexp_nonpositive(sv - ms);
        vf d = ms - sv;
        partial[0] += w;
        if (want_wd) partial[1] += vselect(w > 0.0f, w * d, vbroadcast(0.0f)); /* 0*inf is NaN */
        if (want_ladder)
            for (int j = 0; j < TOP_P_LADDER_LEN; j++)
                partial[2 + j] += vselect(d <= TOP_P_LADDER[j], w, vbroadcast(0.0f));
        if (++blocks == FLUSH_BLOCKS) {
            for (int j = 0; j < N_SUMS; j++) {
                vaccumulate_double(&total_lo[j], &total_hi[j], partial[j]);
                partial[j] = vbroadcast(0.0f);
            }
            blocks = 0;
        }
    }
    double sums[N_SUMS];
    for (int j = 0; j < N_SUMS; j++) {
        vaccumulate_double(&total_lo[j], &total_hi[j], partial[j]);
        sums[j] = vsum_double(total_lo[j], total_hi[j]);
    }
    for (; i < vocab; i++) {
        float sv = z[i] / t;
        float w = exp_nonpositive(sv - ms);
        float d = ms - sv;
        sums[0] += w;
        if (w > 0.0f) sums[1] += (double)(w * d);
        for (int j = 0; j < TOP_P_LADDER_LEN; j++)
            if (d <= TOP_P_LADDER[j]) sums[2 + j] += w;
    }
    dense_moments m;
    m.mass = sums[0];
    m.wd = sums[1];
    for (int j = 0; j < TOP_P_LADDER_LEN; j++) m.ladder[j] = sums[2 + j];
    return m;
}

/* Appends every token with d = ms - z/t <= bound to the candidate list, in id order. */
static int32_t gather_within(lmd_sampler *s, const float *z, int32_t vocab, float t, float ms,
                             float bound) {
    int32_t n = 0;
    const float lowest = ms - bound; /* keep s >= lowest */
    int32_t i = 0;
    for (; i + LMD_VEC_LANES <= vocab; i += LMD_VEC_LANES) {
        vf sv = scaled(vload(z + i), t);
        vi hit = (sv >= lowest) & (sv > -INFINITY);
        if (!vany(hit)) continue;
        for (int j = 0; j < LMD_VEC_LANES; j++)
            { /* branch-free: write always, advance on a hit (n <= i + j) */
                s->cand_id[n] = i + j;
                s->cand_s[n] = sv[j];
                n += hit[j] != 0;
            }
    }
    for (; i < vocab; i++) {
        float sv = z[i] / t;
        if (sv >= lowest && sv > -INFINITY) {
            s->cand_id[n] = i;
            s->cand_s[n] = sv;
            n++;
        }
    }
    return n;
}

/* ------------------------------------------------------------------ */
/* selection and sorting helpers                                        */
/* ------------------------------------------------------------------ */

/* The k-th smallest (1-based) of a[0..n), rearranging a. Hoare quickselect
 * with median-of-three pivots: O(n) expected, no allocation. */
static float kth_smallest(float *a, int32_t n, int32_t k) {
    int32_t lo = 0, hi = n - 1, target = k - 1;
    while (lo < hi) {
        int32_t mid = lo + (hi - lo) / 2;
        float x = a[lo], y = a[mid], zz = a[hi];
        float pivot = x < y ? (y < zz ? y : (x < zz ? zz : x)) : (x < zz ? x : (y < zz ? zz : y));
        int32_t i = lo, j = hi;
        while (i <= j) {
            while (a[i] < pivot) i++;
            while (a[j] > pivot) j--;
            if (i <= j) {
                float tmp = a[i];
                a[i] = a[j];
                a[j] = tmp;
                i++;
                j--;
            }
        }
        if (target <= j) hi = j;
        else if (target >= i) lo = i;
        else return a[target];
    }
    return a[target];
}

/* Sorts (key, weight) pairs by key ascending; heapsort, in place, no allocation. */
static void sift_down(float *key, float *w, int32_t root, int32_t n) {
    for (;;) {
        int32_t child = 2 * root + 1;
        if (child >= n) return;
        if (child + 1 < n && key[child + 1] > key[child]) child++;
        if (!(key[child] > key[root])) return;
        float tk = key[root], tw = w[root];
        key[root] = key[child];
        w[root] = w[child];
        key[child] = tk;
        w[child] = tw;
        root = child;
    }
}

static void sort_pairs_by_key(float *key, float *w, int32_t n) {
    for (int32_t i = n / 2 - 1; i >= 0; i--) sift_down(key, w, i, n);
    for (int32_t end = n - 1; end > 0; end--) {
        float tk = key[0], tw = w[0];
        key[0] = key[end];
        w[0] = w[end];
        key[end] = tk;
        w[end] = tw;
        sift_down(key, w, 0, end);
    }
}

/*
 * The smallest key value kappa such that the weights of all candidates with
 * key <= kappa add up to at least target; +inf if they never do. This is the
 * boundary rule of transformers' top-p (ascending cumulative sum) and typical
 * warpers, with ties at the boundary kept. key[i] >= 0 and w[i] describe
 * candidate i. Buckets the keys, then sorts only the bucket holding the
 * boundary (the select buffer is its scratch).
 */
static float mass_threshold(lmd_sampler *s, const float *key, const float *w, int32_t n,
                            double target) {
    memset(s->bucket_mass, 0, sizeof s->bucket_mass);
    memset(s->bucket_count, 0, sizeof s->bucket_count);
    for (int32_t i = 0; i < n; i++) {
        float scaled = key[i] * (float)MASS_BUCKETS_PER_NAT;
        int32_t b = scaled < (float)(MASS_BUCKETS - 1) ? (int32_t)scaled : MASS_BUCKETS - 1;
        s->bucket_mass[b] += w[i];
        s->bucket_count[b]++;
    }
    double below = 0.0;
    int32_t boundary = -1;
    for (int32_t b = 0; b < MASS_BUCKETS; b++) {
        if (s->bucket_count[b] > 0 && below + s->bucket_mass[b] >= target) {
            boundary = b;
            break;
        }
        below += s->bucket_mass[b];
    }
    if (boundary < 0) return INFINITY;

    /* Gather the boundary bucket's (key, w) pairs. */
    int32_t m = 0;
    float *bkey = s->select, *bw = s->select_w;
    for (int32_t i = 0; i < n; i++) {
        float scaled = key[i] * (float)MASS_BUCKETS_PER_NAT;
        int32_t b = scaled < (float)(MASS_BUCKETS - 1) ? (int32_t)scaled : MASS_BUCKETS - 1;
        if (b == boundary) {
            bkey[m] = key[i];
            bw[m] = w[i];
            m++;
        }
    }
    sort_pairs_by_key(bkey, bw, m);
    double cum = below;
    for (int32_t j = 0; j < m; j++) {
        cum += bw[j];
        if (cum >= target) return bkey[j];
    }
    return bkey[m - 1]; /* the bucket sum reached target only through rounding */
}

/* ------------------------------------------------------------------ */
/* phase 3: truncations over the candidate list                         */
/* ------------------------------------------------------------------ */

/* weight[i] = e^(s_i - ms) for every candidate; returns their sum. */
static double list_weights(lmd_sampler *s, cand_list *L) {
    L->weights_valid = 1;
    vd lo = {0}, hi = {0};
    int32_t i = 0;
    for (; i + LMD_VEC_LANES <= L->n; i += LMD_VEC_LANES) {
        vf w = vexp_nonpositive(vload(s->cand_s + i) - L->ms);
        vstore(s->weight + i, w);
        vaccumulate_double(&lo, &hi, w);
    }
    double sum = vsum_double(lo, hi);
    for (; i < L->n; i++) {
        s->weight[i] = exp_nonpositive(s->cand_s[i] - L->ms);
        sum += s->weight[i];
    }
    return sum;
}

/* The scaled logit of the m-th best candidate (ties share a rank). */
static float mth_best_s(lmd_sampler *s, const cand_list *L, int32_t m) {
    if (m >= L->n) m = L->n;
    for (int32_t i = 0; i < L->n; i++) s->select[i] = -s->cand_s[i];
    return -kth_smallest(s->select, L->n, m);
}

/* Keeps candidate i where keep_s (s_i >= floor_s) or its key is <= max_key
 * (when key != NULL); compacts in id order, weights included. Always removes
 * the outside mass. */
static void compact(lmd_sampler *s, cand_list *L, float floor_s, const float *key, float max_key) {
    int32_t n = 0;
    for (int32_t i = 0; i < L->n; i++) {
        int keep = s->cand_s[i] >= floor_s || (key != NULL && key[i] <= max_key);
        s->cand_id[n] = s->cand_id[i]; /* branch-free: n <= i */
        s->cand_s[n] = s->cand_s[i];
        s->weight[n] = s->weight[i];
        n += keep;
    }
    L->n = n;
    L->outside_mass = 0.0;
    L->outside_wd = 0.0;
}

/* top-k: keep s >= the k-th largest s (k raised to min_tokens_to_keep). */
static void truncate_top_k(lmd_sampler *s, cand_list *L, int32_t k) {
    if (k >= L->n) return;
    compact(s, L, mth_best_s(s, L, k), NULL, 0.0f);
}

/* top-p: keep the smallest set of best tokens whose mass reaches p, i.e.
 * remove a token when the cumulative mass of the tokens not better than it is
 * <= 1 - p; then at least the min_keep best. */
static void truncate_top_p(lmd_sampler *s, cand_list *L, double top_p, int32_t min_keep) {
    double total = list_weights(s, L) + L->outside_mass;
    for (int32_t i = 0; i < L->n; i++) s->key[i] = L->ms - s->cand_s[i];
    float max_d = mass_threshold(s, s->key, s->weight, L->n, top_p * total);
    float floor_s = min_keep > 1 ? mth_best_s(s, L, min_keep) : INFINITY;
    compact(s, L, floor_s, s->key, max_d);
}

/* Keeps candidate i where its weight is >= cutoff_weight or s_i >= floor_s; compacts in id
 * order and removes the outside mass. */
static void keep_weights_from(lmd_sampler *s, cand_list *L, double cutoff_weight, float floor_s) {
    int32_t n = 0;
    for (int32_t i = 0; i < L->n; i++) {
        int keep = (double)s->weight[i] >= cutoff_weight || s->cand_s[i] >= floor_s;
        s->cand_id[n] = s->cand_id[i]; /* branch-free: n <= i */
        s->cand_s[n] = s->cand_s[i];
        s->weight[n] = s->weight[i];
        n += keep;
    }
    L->n = n;
    L->outside_mass = L->outside_wd = 0.0;
}

/* min-p: remove p < min_p * p_max, i.e. w < min_p; then at least the min_keep best (the best,
 * whose w is 1, always stays). */
static void truncate_min_p(lmd_sampler *s, cand_list *L, double min_p, int32_t min_keep) {
    list_weights(s, L);
    keep_weights_from(s, L, min_p, min_keep > 1 ? mth_best_s(s, L, min_keep) : INFINITY);
}

/* Entropy in nats of the listed distribution plus the outside mass:
 * H = ln Z + sum(w d) / Z with Z = sum w. Needs list_weights first. */
static double list_entropy(const lmd_sampler *s, const cand_list *L, double total) {
    double wd = L->outside_wd;
    for (int32_t i = 0; i < L->n; i++)
        if (s->weight[i] > 0.0f) wd += (double)s->weight[i] * (double)(L->ms - s->cand_s[i]);
    return log(total) + wd / total;
}

/* typical: order tokens by |-log p - H|, keep the smallest prefix whose mass
 * reaches typical_p (ties with its last key kept), then at least the first
 * min_keep in that order. */
static void truncate_typical(lmd_sampler *s, cand_list *L, double typical_p, int32_t min_keep) {
    double total = list_weights(s, L) + L->outside_mass;
    double entropy = list_entropy(s, L, total);
    double log_total = log(total);
    for (int32_t i = 0; i < L->n; i++) {
        double neg_logp = (double)(L->ms - s->cand_s[i]) + log_total;
        s->key[i] = (float)fabs(neg_logp - entropy);
    }
    float max_key = mass_threshold(s, s->key, s->weight, L->n, typical_p * total);
    if (min_keep > 1) {
        memcpy(s->select, s->key, (size_t)L->n * sizeof *s->key);
        float mth_key = kth_smallest(s->select, L->n, min_keep < L->n ? min_keep : L->n);
        if (mth_key > max_key) max_key = mth_key;
    }
    compact(s, L, INFINITY, s->key, max_key);
}

/* epsilon / eta: remove p < cutoff unless among the min_keep best. */
static void truncate_below_probability(lmd_sampler *s, cand_list *L, double cutoff_mass,
                                       int32_t min_keep) {
    keep_weights_from(s, L, cutoff_mass, mth_best_s(s, L, min_keep));
}

static void truncate_epsilon(lmd_sampler *s, cand_list *L, double epsilon, int32_t min_keep) {
    double total = list_weights(s, L) + L->outside_mass;
    truncate_below_probability(s, L, epsilon * total, min_keep);
}

/* eta: cutoff = min(eta, sqrt(eta) * exp(-H)) (Hewitt et al. 2022, as transformers). */
static void truncate_eta(lmd_sampler *s, cand_list *L, double eta, int32_t min_keep) {
    double total = list_weights(s, L) + L->outside_mass;
    double entropy = list_entropy(s, L, total);
    double cutoff = fmin(eta, sqrt(eta) * exp(-entropy));
    truncate_below_probability(s, L, cutoff * total, min_keep);
}

/* ------------------------------------------------------------------ */
/* phase 2: the first truncation's candidate list                       */
/* ------------------------------------------------------------------ */

/* Dense top-k: one pass that appends tokens at or above a rising threshold to
 * a buffer, compacting it to the k best with quickselect whenever it fills.
 * Blocks with no token at or above the threshold cost one vector compare. */
static void append_or_compact(lmd_sampler *s, int32_t *n, int32_t *cap, float *threshold,
                              int32_t vocab, int32_t k, int32_t id, float sv) {
    s->cand_id[*n] = id;
    s->cand_s[*n] = sv;
    if (++*n < *cap) return;
    for (int32_t j = 0; j < *n; j++) s->select[j] = -s->cand_s[j];
    *threshold = -kth_smallest(s->select, *n, k);
    int32_t kept = 0;
    for (int32_t j = 0; j < *n; j++)
        if (s->cand_s[j] >= *threshold) {
            s->cand_id[kept] = s->cand_id[j];
            s->cand_s[kept] = s->cand_s[j];
            kept++;
        }
    *n = kept;
    /* Ties can keep the buffer crowded: make room before the next compaction. */
    while (*cap < vocab && kept > *cap / 2) *cap = *cap > vocab / 2 ? vocab : 2 * *cap;
}

static int32_t gather_top_k(lmd_sampler *s, const float *z, int32_t vocab, float t, int32_t k) {
    /* A buffer of 2k keeps the threshold close to the k-th best seen so far,
     * so that few later tokens pass it: about k ln(V / k) appends in all for
     * tokens in random order. */
    int32_t cap = 2 * k < 256 ? 256 : 2 * k;
    if (cap > vocab) cap = vocab;
    float threshold = -INFINITY; /* every listed s is >= threshold */
    int32_t n = 0;
    int32_t i = 0;
    for (; i + LMD_VEC_LANES <= vocab; i += LMD_VEC_LANES) {
        vf sv = scaled(vload(z + i), t);
        if (!vany((sv >= threshold) & (sv > -INFINITY))) continue;
        for (int j = 0; j < LMD_VEC_LANES; j++)
            if (sv[j] >= threshold && sv[j] > -INFINITY)
                append_or_compact(s, &n, &cap, &threshold, vocab, k, i + j, sv[j]);
    }
    for (; i < vocab; i++) {
        float sv = z[i] / t;
        if (sv >= threshold && sv > -INFINITY)
            append_or_compact(s, &n, &cap, &threshold, vocab, k, i, sv);
    }
    return n;
}

typedef enum { STAGE_TOP_K, STAGE_TOP_P, STAGE_MIN_P, STAGE_TYPICAL, STAGE_EPSILON, STAGE_ETA } stage;

static int active_stages(const lmd_sampling_params *p, stage out[6]) {
    int n = 0;
    if (p->top_k > 0) out[n++] = STAGE_TOP_K;
    if (p->top_p < 1.0) out[n++] = STAGE_TOP_P;
    if (p->min_p > 0.0) out[n++] = STAGE_MIN_P;
    if (p->typical_p < 1.0) out[n++] = STAGE_TYPICAL;
    if (p->epsilon > 0.0) out[n++] = STAGE_EPSILON;
    if (p->eta > 0.0) out[n++] = STAGE_ETA;
    return n;
}

/* Builds the list for the first stage: a superset of what that stage keeps,
 * plus the mass of the tokens left out. */
static void build_candidates(lmd_sampler *s, cand_list *L, const lmd_sampling_params *p,
                             stage first, const float *z, int32_t vocab, float t) {
    const int32_t min_keep = p->min_tokens_to_keep;
    L->outside_mass = L->outside_wd = 0.0;
    if (first == STAGE_TOP_K) {
        int32_t k = p->top_k > min_keep ? p->top_k : min_keep;
        L->n = gather_top_k(s, z, vocab, t, k < vocab ? k : vocab);
        truncate_top_k(s, L, k);
        return;
    }
    float bound = INFINITY;
    int need_outside_mass = 0;
    dense_moments m = {0};
    if (first == STAGE_MIN_P && min_keep == 1) {
        bound = (float)-log(p->min_p) + BOUND_SLACK;
    } else if (first != STAGE_TYPICAL && min_keep == 1) {
        m = row_moments(z, vocab, t, L->ms, first == STAGE_ETA, first == STAGE_TOP_P);
        need_outside_mass = 1;
        if (first == STAGE_TOP_P) {
            for (int j = 0; j < TOP_P_LADDER_LEN; j++)
                if (m.ladder[j] >= p->top_p * m.mass * (1.0 + 1e-4)) {
                    /* the slack makes the list a superset of the ladder's tokens: "d <= bound"
                     * above and "s >= ms - bound" in the gather round differently */
                    bound = TOP_P_LADDER[j] + BOUND_SLACK;
                    break;
                }
        } else {
            double cutoff = p->epsilon;
            if (first == STAGE_ETA) {
                double entropy = log(m.mass) + m.wd / m.mass;
                cutoff = fmin(p->eta, sqrt(p->eta) * exp(-entropy));
            }
            /* p_i >= cutoff  <=>  d_i <= -ln(cutoff * Z); the best token always stays */
            bound = (float)fmax(-log(cutoff * m.mass), 0.0) + BOUND_SLACK;
        }
    }
    L->n = gather_within(s, z, vocab, t, L->ms, bound);
    if (need_outside_mass && bound < INFINITY) {
        double listed = list_weights(s, L);
        double listed_wd = 0.0;
        for (int32_t i = 0; i < L->n; i++)
            if (s->weight[i] > 0.0f) listed_wd += (double)s->weight[i] * (L->ms - s->cand_s[i]);
        L->outside_mass = fmax(m.mass - listed, 0.0);
        L->outside_wd = fmax(m.wd - listed_wd, 0.0);
    }
}

static void run_stage(lmd_sampler *s, cand_list *L, const lmd_sampling_params *p, stage st) {
    const int32_t min_keep = p->min_tokens_to_keep;
    switch (st) {
    case STAGE_TOP_K: truncate_top_k(s, L, p->top_k > min_keep ? p->top_k : min_keep); break;
    case STAGE_TOP_P: truncate_top_p(s, L, p->top_p, min_keep); break;
    case STAGE_MIN_P: truncate_min_p(s, L, p->min_p, min_keep); break;
    case STAGE_TYPICAL: truncate_typical(s, L, p->typical_p, min_keep); break;
    case STAGE_EPSILON: truncate_epsilon(s, L, p->epsilon, min_keep); break;
    case STAGE_ETA: truncate_eta(s, L, p->eta, min_keep); break;
    }
}

/* ------------------------------------------------------------------ */
/* drawing                                                              */
/* ------------------------------------------------------------------ */

/* Inverse CDF over the list in id order: the first candidate whose
 * cumulative weight exceeds coin * total. Whole vector blocks are skipped by
 * their sum; the block that crosses the target is walked token by token. */
static int32_t draw_from_list(const lmd_sampler *s, const cand_list *L, double total,
                              double coin) {
    const double target = coin * total;
    double cum = 0.0;
    int32_t i = 0;
    for (; i + LMD_VEC_LANES <= L->n; i += LMD_VEC_LANES) {
        double block = vhsum(vload(s->weight + i));
        if (cum + block > target) break;
        cum += block;
    }
    int32_t last_positive = -1;
    for (; i < L->n; i++) {
        if (s->weight[i] <= 0.0f) continue;
        cum += s->weight[i];
        last_positive = i;
        if (cum > target) return i;
    }
    /* rounding left the target at the very top: the last token with weight */
    for (i = L->n - 1; i > 0 && last_positive < 0; i--)
        if (s->weight[i] > 0.0f) last_positive = i;
    return last_positive > 0 ? last_positive : 0;
}

/* Sum of the listed weights (lanes accumulated in double). */
static double list_weight_sum(const lmd_sampler *s, const cand_list *L) {
    vd lo = {0}, hi = {0};
    int32_t i = 0;
    for (; i + LMD_VEC_LANES <= L->n; i += LMD_VEC_LANES)
        vaccumulate_double(&lo, &hi, vload(s->weight + i));
    double sum = vsum_double(lo, hi);
    for (; i < L->n; i++) sum += s->weight[i];
    return sum;
}

/* Drawing from a whole row: one pass stores the mass of every group of
 * GROUP_BLOCKS vector blocks, the draw walks the group masses and recomputes
 * the weights of the one group that holds the coin. */
#define GROUP_BLOCKS 16
#define GROUP_SIZE (GROUP_BLOCKS * LMD_VEC_LANES)

/* group_mass[g] = sum of w over tokens [g*GROUP_SIZE, (g+1)*GROUP_SIZE) (unless group_mass
 * is NULL); returns their sum. */
static double row_group_masses(const float *z, int32_t vocab, float t, float ms,
                               float *group_mass) {
    double total = 0.0;
    int32_t n_groups = (vocab + GROUP_SIZE - 1) / GROUP_SIZE;
    for (int32_t g = 0; g < n_groups; g++) {
        int32_t begin = g * GROUP_SIZE, end = begin + GROUP_SIZE < vocab ? begin + GROUP_SIZE : vocab;
        vf acc = vbroadcast(0.0f);
        int32_t i = begin;
        for (; i + LMD_VEC_LANES <= end; i += LMD_VEC_LANES)
            acc += vexp_nonpositive(scaled(vload(z + i), t) - ms);
        float sum = 0.0f;
        for (int j = 0; j < LMD_VEC_LANES; j++) sum += acc[j];
        for (; i < end; i++) sum += exp_nonpositive(z[i] / t - ms);
        if (group_mass != NULL) group_mass[g] = sum;
        total += sum;
    }
    return total;
}

/* Inverse CDF over the row in id order, given the group masses. */
static int32_t draw_from_row(const float *z, int32_t vocab, float t, float ms,
                             const float *group_mass, double total, double coin) {
    double target = coin * total, cum = 0.0;
    int32_t n_groups = (vocab + GROUP_SIZE - 1) / GROUP_SIZE;
    for (int32_t g = 0; g < n_groups; g++) {
        if (group_mass[g] <= 0.0f) continue;
        if (cum + group_mass[g] <= target) {
            cum += group_mass[g];
            continue;
        }
        int32_t begin = g * GROUP_SIZE, end = begin + GROUP_SIZE < vocab ? begin + GROUP_SIZE : vocab;
        for (int32_t i = begin; i < end; i++) {
            float w = exp_nonpositive(z[i] / t - ms);
            if (w <= 0.0f) continue;
            cum += w;
            if (cum > target) return i;
        }
        /* the group's sum, added in another order, crossed the target; its
         * token-by-token sum fell just short: the target is in this group */
        for (int32_t i = end - 1; i >= begin; i--)
            if (exp_nonpositive(z[i] / t - ms) > 0.0f) return i;
    }
    /* rounding left the target at the very top: the last token with mass */
    for (int32_t i = vocab - 1; i > 0; i--)
        if (exp_nonpositive(z[i] / t - ms) > 0.0f) return i;
    return 0;
}

/* out (V,) = z/t - ms - log_total, which is -inf where z is. */
static void write_row_logprobs(float *out, const float *z, int32_t vocab, float t, float ms,
                               float log_total) {
    int32_t i = 0;
    for (; i + LMD_VEC_LANES <= vocab; i += LMD_VEC_LANES)
        vstore(out + i, (scaled(vload(z + i), t) - ms) - log_total);
    for (; i < vocab; i++) out[i] = (z[i] / t - ms) - log_total;
}

/* ------------------------------------------------------------------ */
/* one row                                                              */
/* ------------------------------------------------------------------ */

lmd_status lmd_sample_row(lmd_sampler *s, const lmd_sampling_params *p, const lmd_row_inputs *in,
                          const float *logits, int32_t vocab, double coin, float *out_logprobs,
                          int32_t *out_token, float *out_logprob, lmd_error *err) {
    lmd_status st;
    static const lmd_row_inputs no_inputs = {NULL, 0, 0, NULL, NULL, 0, NULL, -1, NULL, 0};
    if (in == NULL) in = &no_inputs;
    if (s == NULL || logits == NULL)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "sampler and logits must not be NULL");
    if (vocab < 1 || vocab > s->capacity)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "vocab (=%d) must be in [1, %d]", (int)vocab,
                        (int)s->capacity);
    if (!(coin < 1.0))
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "coin (=%g) must be < 1", coin);
    if ((st = lmd_sampling_params_validate(p, err))) return st;
    if ((st = check_row_inputs(in, vocab, err))) return st;

    int32_t bad_index;
    const float *z = logits;
    float z_max = row_max(logits, vocab, &bad_index); /* the caller's logits, masked tokens too */
    if (bad_index < 0 && needs_private_copy(p, in)) {
        if ((st = apply_sparse_processors(s, p, in, logits, vocab, &z, err))) return st;
        z_max = row_max(z, vocab, &bad_index);
        if (bad_index >= 0) /* apply_sparse_processors reports every overflow it makes */
            return lmd_fail(err, LMD_ERR_INTERNAL, "logits[%d] became %s in the processing chain",
                            (int)bad_index, isnan(z[bad_index]) ? "NaN" : "+inf");
    }
    if (bad_index >= 0)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "logits[%d] is %s; logits must be finite or -inf",
                        (int)bad_index, isnan(logits[bad_index]) ? "NaN" : "+inf");
    if (z_max == -INFINITY)
        return lmd_fail(err, LMD_ERR_INVALID_ARG,
                        "no token is left to sample: every logit is -inf after masking");
    /* Dividing by a temperature < 1 can leave the float32 range. Where the max does, every
     * scaled logit is +-inf or NaN: an error. A smaller logit that becomes -inf is at least
     * 2^103 nats below the max, whose probability is 0 in float32 anyway: a mask, as in
     * transformers' float32 division (and as a torch.finfo(float32).min mask is meant). */
    if (p->temperature > 0.0 && !isfinite(z_max / (float)p->temperature)) {
        const int32_t i = first_index_of(z, vocab, z_max);
        char tv[LMD_NUMBER_CHARS], zv[LMD_NUMBER_CHARS];
        return lmd_fail(err, LMD_ERR_INVALID_ARG,
                        "temperature (=%s) takes the largest logit, logits[%d] (=%s%s), out of the float32 "
                        "range (temperature=0 is greedy)",
                        lmd_format_double(tv, p->temperature), (int)i, lmd_format_float(zv, z[i]),
                        z[i] != logits[i] ? " after bias and penalties" : "");
    }

    if (p->temperature == 0.0) { /* greedy: a one-hot distribution at the first argmax */
        int32_t best = first_index_of(z, vocab, z_max);
        if (out_logprobs != NULL) {
            for (int32_t i = 0; i < vocab; i++) out_logprobs[i] = -INFINITY;
            out_logprobs[best] = 0.0f;
        }
        if (out_token) *out_token = best;
        if (out_logprob) *out_logprob = 0.0f;
        return LMD_OK;
    }

    const float t = (float)p->temperature;
    const float ms = z_max / t;
    stage stages[6];
    int n_stages = active_stages(p, stages);

    if (n_stages == 0) { /* plain softmax at temperature t over the whole row */
        float *group_mass = s->weight; /* (ceil(V / GROUP_SIZE),) */
        double total = row_group_masses(z, vocab, t, ms, group_mass);
        float log_total = (float)log(total);
        if (out_logprobs != NULL) write_row_logprobs(out_logprobs, z, vocab, t, ms, log_total);
        int32_t token = coin >= 0.0 ? draw_from_row(z, vocab, t, ms, group_mass, total, coin)
                                    : first_index_of(z, vocab, z_max);
        if (out_token) *out_token = token;
        if (out_logprob) *out_logprob = (z[token] / t - ms) - log_total;
        return LMD_OK;
    }

    cand_list L = {0, ms, 0.0, 0.0, 0};
    build_candidates(s, &L, p, stages[0], z, vocab, t);
    for (int i = (stages[0] == STAGE_TOP_K ? 1 : 0); i < n_stages; i++)
        run_stage(s, &L, p, stages[i]);

    if (L.n < 1) /* the best token always survives; never read an unwritten candidate */
        return lmd_fail(err, LMD_ERR_INTERNAL, "no candidate token survived the truncations (a bug)");
    /* compactions carry the weights along; only a list never weighed needs them */
    double total = L.weights_valid ? list_weight_sum(s, &L) : list_weights(s, &L);
    float log_total = (float)log(total);
    if (out_logprobs != NULL) {
        for (int32_t i = 0; i < vocab; i++) out_logprobs[i] = -INFINITY;
        for (int32_t i = 0; i < L.n; i++)
            out_logprobs[s->cand_id[i]] = (s->cand_s[i] - ms) - log_total;
    }
    int32_t chosen = 0;
    if (coin >= 0.0) {
        chosen = draw_from_list(s, &L, total, coin);
    } else {
        for (int32_t i = 1; i < L.n; i++)
            if (s->cand_s[i] > s->cand_s[chosen]) chosen = i;
    }
    if (out_token) *out_token = s->cand_id[chosen];
    if (out_logprob) *out_logprob = (s->cand_s[chosen] - ms) - log_total;
    return LMD_OK;
}

/* ------------------------------------------------------------------ */
/* many rows                                                            */
/* ------------------------------------------------------------------ */

/* Rows are independent; below this much work a thread team costs more than it saves. */
#define PARALLEL_MIN_ELEMENTS 65536

lmd_status lmd_sample_rows(lmd_sampler *const *samplers, int n_samplers,
                           const lmd_sampling_params *params, int32_t n_params,
                           const lmd_row_inputs *inputs, const float *logits, int64_t row_stride,
                           int32_t n_rows, int32_t vocab, const double *coins,
                           float *out_logprobs, int32_t *out_tokens, float *out_token_logprobs,
                           int32_t *failed_row, lmd_error *err) {
    if (failed_row) *failed_row = -1;
    if (samplers == NULL || n_samplers < 1)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "at least one sampler is needed");
    if (n_rows < 0 || (n_params != 1 && n_params != n_rows))
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "n_params (=%d) must be 1 or n_rows (=%d)",
                        (int)n_params, (int)n_rows);
    if (row_stride < vocab)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "row_stride (=%lld) must be >= vocab (=%d)",
                        (long long)row_stride, (int)vocab);
    for (int i = 0; i < n_samplers; i++)
        if (lmd_sampler_capacity(samplers[i]) < vocab)
            return lmd_fail(err, LMD_ERR_INVALID_ARG, "sampler %d holds %d tokens, vocab is %d", i,
                            (int)lmd_sampler_capacity(samplers[i]), (int)vocab);

    int n_threads = lmd_get_num_threads();
    if (n_threads > n_samplers) n_threads = n_samplers;
    int parallel = n_threads > 1 && n_rows > 1 && (int64_t)n_rows * vocab >= PARALLEL_MIN_ELEMENTS;
    int32_t first_failure = n_rows;
    lmd_status failure_status = LMD_OK;
    lmd_error failure = {{0}};
    (void)parallel;
#define SAMPLE_ROW(thread, r, row_err)                                                              \
    lmd_sample_row(samplers[thread], &params[n_params == 1 ? 0 : (r)], inputs ? &inputs[r] : NULL,   \
                   logits + (int64_t)(r) * row_stride, vocab, coins ? coins[r] : -1.0,               \
                   out_logprobs ? out_logprobs + (int64_t)(r) * vocab : NULL,                         \
                   out_tokens ? &out_tokens[r] : NULL, out_token_logprobs ? &out_token_logprobs[r] : NULL, \
                   &(row_err))
#ifdef _OPENMP
    if (parallel) { /* never enter an OpenMP region for one thread: it costs more than a short row */
#pragma omp parallel for schedule(static) num_threads(n_threads)
        for (int32_t r = 0; r < n_rows; r++) {
            lmd_error row_err;
            lmd_status st = SAMPLE_ROW(omp_get_thread_num(), r, row_err);
            if (st != LMD_OK) {
#pragma omp critical(lmd_sample_rows_failure)
                if (r < first_failure) {
                    first_failure = r;
                    failure_status = st;
                    failure = row_err;
                }
            }
        }
    } else
#endif
    {
        for (int32_t r = 0; r < n_rows; r++) {
            lmd_error row_err;
            lmd_status st = SAMPLE_ROW(0, r, row_err);
            if (st != LMD_OK) {
                first_failure = r;
                failure_status = st;
                failure = row_err;
                break;
            }
        }
    }
#undef SAMPLE_ROW
    if (failure_status != LMD_OK) {
        if (failed_row) *failed_row = first_failure;
        if (err) *err = failure;
        return failure_status;
    }
    return LMD_OK;
}

/* ------------------------------------------------------------------ */
/* scoring                                                              */
/* ------------------------------------------------------------------ */

float lmd_row_log_normalizer(const float *z, int32_t vocab, float t, float *log_total, int32_t *bad_index) {
    const float ms = row_max(z, vocab, bad_index) / t; /* as lmd_sample_row scales it */
    const int defined = *bad_index < 0 && ms != -INFINITY;
    *log_total = defined ? (float)log(row_group_masses(z, vocab, t, ms, NULL)) : 0.0f;
    return ms;
}

lmd_status lmd_target_logprobs(const float *logits, int64_t row_stride, int32_t n_rows, int32_t vocab,
                               const int32_t *targets, float *out, unsigned char *out_is_max, int32_t *failed_row,
                               lmd_error *err) {
    if (failed_row) *failed_row = -1;
    const int missing = n_rows > 0 && (logits == NULL || targets == NULL || out == NULL);
    if (n_rows < 0 || vocab < 1 || row_stride < vocab || missing)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "target_logprobs: bad arguments (n_rows=%d, vocab=%d)",
                        (int)n_rows, (int)vocab);
    /* every row is checked before any work, so the lowest bad row is the one reported */
    for (int32_t r = 0; r < n_rows; r++) {
        const float *z = logits + (int64_t)r * row_stride;
        int32_t bad_index = -1;
        const float z_max = targets[r] < 0 || targets[r] >= vocab ? 0.0f : row_max(z, vocab, &bad_index);
        lmd_status st = LMD_OK;
        if (targets[r] < 0 || targets[r] >= vocab)
            st = lmd_fail(err, LMD_ERR_INVALID_ARG, "target (=%d) is not a token id in [0, %d)", (int)targets[r],
                          (int)vocab);
        else if (bad_index >= 0)
            st = lmd_fail(err, LMD_ERR_INVALID_ARG, "logits[%d] is %s; logits must be finite or -inf", (int)bad_index,
                          isnan(z[bad_index]) ? "NaN" : "+inf");
        else if (z_max == -INFINITY)
            st = lmd_fail(err, LMD_ERR_INVALID_ARG, "every logit is -inf");
        if (st != LMD_OK) {
            if (failed_row) *failed_row = r;
            return st;
        }
    }
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(lmd_get_num_threads()) \
    if ((int64_t)n_rows * vocab >= PARALLEL_MIN_ELEMENTS && lmd_get_num_threads() > 1)
#endif
    for (int32_t r = 0; r < n_rows; r++) {
        const float *z = logits + (int64_t)r * row_stride;
        int32_t bad_index;
        float log_total;
        const float ms = lmd_row_log_normalizer(z, vocab, 1.0f, &log_total, &bad_index);
        out[r] = (z[targets[r]] / 1.0f - ms) - log_total; /* write_row_logprobs' value at t = 1 */
        if (out_is_max) out_is_max[r] = z[targets[r]] == ms; /* ms: the row's max (t = 1) */
    }
    return LMD_OK;
}
