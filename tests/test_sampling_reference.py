"""process_logits and sample against the NumPy reference (tests/reference.py):
property tests on random shapes, values and parameters (ties and -inf
included), and the fast paths of large peaked and flat vocabularies."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import lmdecode as ld
import reference

# Values agree to float32 rounding of logits of magnitude up to ~40 (the
# temperature divides them); kept sets agree exactly away from thresholds.
ATOL = 2e-5
MARGIN = 1e-5  # inputs whose truncation decisions sit closer to a threshold are skipped


@st.composite
def logit_rows(draw):
    vocab = draw(st.integers(1, 120))
    pool = draw(st.sampled_from(["continuous", "ties"]))
    if pool == "continuous":
        values = draw(st.lists(st.floats(-15, 15, allow_nan=False, width=32), min_size=vocab, max_size=vocab))
    else:
        values = draw(st.lists(st.sampled_from([-3.0, -1.0, 0.0, 0.5, 2.0, 4.0]), min_size=vocab, max_size=vocab))
    z = np.array(values, dtype=np.float32)
    n_masked = draw(st.integers(0, vocab - 1))
    if n_masked:
        idx = draw(st.lists(st.integers(0, vocab - 1), min_size=n_masked, max_size=n_masked, unique=True))
        z[idx] = -np.inf
    return z


@st.composite
def chains(draw, vocab):
    kw = {}
    if draw(st.booleans()):
        kw["temperature"] = draw(st.sampled_from([0.3, 0.7, 1.0, 1.5, 2.5]))
    if draw(st.booleans()):
        kw["top_k"] = draw(st.integers(0, vocab + 2))
    if draw(st.booleans()):
        kw["top_p"] = draw(st.sampled_from([0.05, 0.3, 0.5, 0.8, 0.9, 0.95, 0.999]))
    if draw(st.booleans()):
        kw["min_p"] = draw(st.sampled_from([0.01, 0.05, 0.2, 0.5]))
    if draw(st.integers(0, 3)) == 0:
        kw["typical_p"] = draw(st.sampled_from([0.2, 0.5, 0.9]))
    if draw(st.integers(0, 3)) == 0:
        kw["epsilon"] = draw(st.sampled_from([1e-4, 3e-3, 0.05]))
    if draw(st.integers(0, 3)) == 0:
        kw["eta"] = draw(st.sampled_from([1e-4, 3e-3, 0.05]))
    if draw(st.integers(0, 2)) == 0:
        kw["min_tokens_to_keep"] = draw(st.integers(1, 4))
    if draw(st.booleans()):
        context = draw(st.lists(st.integers(0, vocab - 1), min_size=0, max_size=12))
        kw["context"] = np.array(context, dtype=np.int64)
        kw["prompt_len"] = draw(st.integers(0, 12))
        if draw(st.booleans()):
            kw["repetition_penalty"] = draw(st.sampled_from([0.8, 1.2, 2.0]))
        if draw(st.booleans()):
            kw["frequency_penalty"] = draw(st.sampled_from([-0.5, 0.3, 1.5]))
            kw["presence_penalty"] = draw(st.sampled_from([-1.0, 0.0, 0.7]))
        if draw(st.integers(0, 2)) == 0:
            kw["no_repeat_ngram_size"] = draw(st.integers(1, 3))
    if draw(st.integers(0, 3)) == 0:
        kw["logit_bias"] = {draw(st.integers(0, vocab - 1)): draw(st.sampled_from([-5.0, 1.0, 3.0]))}
    if draw(st.integers(0, 4)) == 0:
        kw["banned_tokens"] = draw(st.lists(st.integers(0, vocab - 1), max_size=3, unique=True))
    if draw(st.integers(0, 4)) == 0:
        kw["allowed_tokens"] = draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=vocab, unique=True))
    return kw


def reference_or_skip(z, kw):
    try:
        expect, margin = reference.process(z, **kw)
    except ValueError:  # the reference's "no token left": lmdecode must raise too
        with pytest.raises(ValueError, match="no token is left"):
            ld.process_logits(z, **kw)
        assume(False)
    assume(margin > MARGIN)
    return expect


def check_same(ours, expect):
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(expect), err_msg="kept sets differ")
    finite = np.isfinite(expect)
    np.testing.assert_allclose(ours[finite], expect[finite], atol=ATOL, rtol=0)


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(data=st.data())
def test_process_logits_matches_reference(data):
    z = data.draw(logit_rows())
    kw = data.draw(chains(z.size))
    expect = reference_or_skip(z, kw)
    check_same(ld.process_logits(z, **kw).astype(np.float64), expect)


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(data=st.data())
def test_sample_draws_the_reference_token_for_the_same_coin(data):
    z = data.draw(logit_rows())
    kw = data.draw(chains(z.size))
    expect = reference_or_skip(z, kw)
    seed, step = data.draw(st.integers(0, 2**64 - 1)), data.draw(st.integers(0, 2**40))
    coin = ld.rng_uniform(seed, 0, step)
    token, logprob = ld.sample(z, seed=seed, step=step, return_logprobs=True, **kw)
    # the reference's cumulative sums may straddle the coin differently within rounding
    probs = np.exp(expect)
    cum = np.cumsum(probs) / probs.sum()
    assume(np.min(np.abs(cum - coin)) > 1e-6)
    assert int(token) == reference.draw(expect, coin)
    assert float(logprob) == pytest.approx(expect[int(token)], abs=ATOL)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(data=st.data())
def test_batches_with_per_row_values_match_row_by_row(data):
    rows = data.draw(st.integers(2, 4))
    vocab = data.draw(st.integers(2, 60))
    z = np.stack([np.random.default_rng(data.draw(st.integers(0, 10**6))).normal(0, 3, vocab).astype(np.float32) for _ in range(rows)])
    top_p = data.draw(st.lists(st.sampled_from([0.3, 0.8, 1.0]), min_size=rows, max_size=rows))
    temperature = data.draw(st.lists(st.sampled_from([0.5, 1.0, 2.0]), min_size=rows, max_size=rows))
    contexts = [data.draw(st.lists(st.integers(0, vocab - 1), max_size=6)) for _ in range(rows)]
    padded = np.full((rows, 6), -1)
    for r, c in enumerate(contexts):
        padded[r, 6 - len(c):] = c  # left padding
    batch_list = ld.process_logits(z, top_p=top_p, temperature=temperature, context=contexts, repetition_penalty=1.5)
    batch_padded = ld.process_logits(z, top_p=top_p, temperature=temperature, context=padded, repetition_penalty=1.5)
    np.testing.assert_array_equal(batch_list, batch_padded)
    for r in range(rows):
        alone = ld.process_logits(z[r], top_p=top_p[r], temperature=temperature[r], context=contexts[r], repetition_penalty=1.5)
        np.testing.assert_array_equal(batch_list[r], alone)


# ----------------------------------------------------------------------------
# large vocabularies: the prefilter and bucketed paths
# ----------------------------------------------------------------------------


def peaked_rows(n, vocab, seed, exponent=1.5):
    rng = np.random.default_rng(seed)
    base = -exponent * np.log(np.arange(1, vocab + 1))
    return np.stack([base[rng.permutation(vocab)] + rng.normal(0, 0.05, vocab) for _ in range(n)]).astype(np.float32)


LARGE_CASES = [
    dict(top_p=0.9), dict(top_p=0.5), dict(top_p=0.999999), dict(top_p=0.9, min_tokens_to_keep=20),
    dict(min_p=0.05), dict(min_p=0.05, top_p=0.9), dict(top_k=50), dict(top_k=50, top_p=0.9, temperature=0.7),
    dict(typical_p=0.9), dict(epsilon=3e-4), dict(eta=3e-4), dict(temperature=1.3),
]


@pytest.mark.parametrize("shape", ["peaked", "flat"])
@pytest.mark.parametrize("kw", LARGE_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_large_vocabulary_matches_reference(shape, kw):
    vocab = 128256
    z = peaked_rows(2, vocab, seed=1) if shape == "peaked" else np.random.default_rng(2).normal(0, 1.5, (2, vocab)).astype(np.float32)
    ours = ld.process_logits(z, **kw).astype(np.float64)
    for r in range(2):
        expect, margin = reference.process(z[r], **kw)
        assert margin > 1e-9  # random rows: no decision sits on a threshold
        check_same(ours[r], expect)


def test_top_p_boundary_exactly_one_ladder_step_from_the_best():
    # At temperature 1.5 the tied tokens 3 and 4 sit exactly 1 nat below the best (the first rung of
    # the prefilter's distance ladder), with probabilities [.0175, .1295, .4914, .1808, .1808]: the best
    # alone (.49) does not reach 0.5, so the tie group must stay. The prefilter once rounded them out.
    z = np.array([-3.0, 0.0, 2.0, 0.5, 0.5], dtype=np.float32)
    kept = np.isfinite(ld.process_logits(z, temperature=1.5, top_p=0.5))
    np.testing.assert_array_equal(kept, [False, False, True, True, True])
    expect, _ = reference.process(z, temperature=1.5, top_p=0.5)
    np.testing.assert_array_equal(kept, np.isfinite(expect))
