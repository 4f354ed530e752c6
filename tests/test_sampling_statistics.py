"""Statistical and determinism tests of ld.sample: chi-square goodness of fit
against the processed distribution (fixed seeds, >= 20,000 draws), and the
same tokens whatever the thread count, batch composition or call repetition."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chisquare

import lmdecode as ld

DRAWS = 20000
CASES = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=6),
    dict(top_p=0.8),
    dict(min_p=0.1, temperature=1.3),
    dict(repetition_penalty=1.3, temperature=0.9, top_k=10, top_p=0.95, context=[0, 1, 2, 2], prompt_len=1,
         frequency_penalty=0.4, presence_penalty=0.2),
]


def fit_p_value(z, kw, seeds):
    probs = np.exp(ld.process_logits(z, **kw).astype(np.float64))
    rows = np.broadcast_to(z, (DRAWS, z.size))
    extra = {}
    if "context" in kw:  # one context per row for a batch
        extra = {"context": [kw["context"]] * DRAWS}
    tokens = ld.sample(rows, seed=seeds, **{**kw, **extra})
    counts = np.bincount(tokens, minlength=z.size)
    assert np.all(counts[probs == 0] == 0), "a removed token was drawn"
    live = probs > 0
    return chisquare(counts[live], DRAWS * probs[live] / probs[live].sum()).pvalue


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(k for k in kw))
def test_chi_square_goodness_of_fit(kw):
    z = np.random.default_rng(0).normal(0, 1.2, 16).astype(np.float32)
    seeds = np.arange(DRAWS, dtype=np.uint64) * 7919 + 11
    assert fit_p_value(z, kw, seeds) > 1e-3


def test_chi_square_rejects_a_wrong_distribution():
    """The test has power: draws at temperature 1 do not fit the temperature-0.8 distribution."""
    z = np.random.default_rng(0).normal(0, 1.2, 16).astype(np.float32)
    seeds = np.arange(DRAWS, dtype=np.uint64)
    tokens = ld.sample(np.broadcast_to(z, (DRAWS, 16)), seed=seeds)
    wrong = np.exp(ld.process_logits(z, temperature=0.8).astype(np.float64))
    wrong /= wrong.sum()
    assert chisquare(np.bincount(tokens, minlength=16), DRAWS * wrong).pvalue < 1e-6


def test_steps_of_one_seed_are_independent_draws():
    z = np.random.default_rng(1).normal(0, 1.0, 10).astype(np.float32)
    tokens = ld.sample(np.broadcast_to(z, (DRAWS, 10)), seed=42, step=np.arange(DRAWS))
    probs = np.exp(ld.process_logits(z).astype(np.float64))
    assert chisquare(np.bincount(tokens, minlength=10), DRAWS * probs / probs.sum()).pvalue > 1e-3


def test_repeated_calls_are_identical():
    z = np.random.default_rng(2).normal(0, 2, (32, 5000)).astype(np.float32)
    a = ld.sample(z, seed=list(range(32)), step=5, top_p=0.9, return_logprobs=True)
    b = ld.sample(z, seed=list(range(32)), step=5, top_p=0.9, return_logprobs=True)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize("kw", [dict(temperature=0.9), dict(top_p=0.9), dict(top_k=40, min_p=0.01), dict(typical_p=0.8)])
def test_one_and_two_threads_give_the_same_tokens(kw):
    z = np.random.default_rng(3).normal(0, 2, (64, 50000)).astype(np.float32)  # big enough to run in parallel
    seeds = list(range(100, 164))
    try:
        ld.set_num_threads(1)
        one = ld.sample(z, seed=seeds, return_logprobs=True, **kw)
        ld.set_num_threads(2)
        two = ld.sample(z, seed=seeds, return_logprobs=True, **kw)
        lp1 = ld.process_logits(z, **kw)
    finally:
        ld.set_num_threads(0)
    np.testing.assert_array_equal(one[0], two[0])
    np.testing.assert_array_equal(one[1], two[1])
    np.testing.assert_array_equal(lp1, ld.process_logits(z, **kw))


@pytest.mark.parametrize("position", [0, 17, 31])
def test_a_row_draws_the_same_alone_or_anywhere_in_a_batch(position):
    rng = np.random.default_rng(4)
    row = rng.normal(0, 2, 3000).astype(np.float32)
    others = rng.normal(0, 2, (32, 3000)).astype(np.float32)
    kw = dict(top_p=0.95, temperature=0.8)
    alone = ld.sample(row, seed=77, step=9, return_logprobs=True, **kw)
    batch = others.copy()
    batch[position] = row
    seeds = list(rng.integers(0, 2**63, size=32))
    seeds[position] = 77
    tokens, logprobs = ld.sample(batch, seed=seeds, step=9, return_logprobs=True, **kw)
    assert tokens[position] == alone[0]
    assert logprobs[position] == alone[1]
