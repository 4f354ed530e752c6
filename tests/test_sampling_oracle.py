"""Every processor that transformers has, against transformers itself: the
same kept set and the same log-probabilities on random logits; frequency and
presence penalties against the OpenAI formula."""
from __future__ import annotations

import numpy as np
import pytest

import lmdecode as ld

pytestmark = pytest.mark.oracle

B, V = 8, 1000


@pytest.fixture(scope="module")
def hf():
    from oracle import require_transformers

    torch, transformers = require_transformers()
    from transformers.generation import logits_process

    return torch, logits_process


def compare(torch, warper, kw, *, context=None, scale=3.0, seed=0, vocab=V):
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((B, vocab)) * scale).astype(np.float32)
    ids = torch.from_numpy(context) if context is not None else torch.zeros((B, 1), dtype=torch.long)
    theirs = torch.log_softmax(warper(ids, torch.from_numpy(z.copy())).double(), -1).numpy()
    extra = dict(context=context, prompt_len=0) if context is not None else {}
    ours = ld.process_logits(z, **kw, **extra).astype(np.float64)
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs), err_msg="kept sets differ")
    finite = np.isfinite(theirs)
    # float32 results: 1e-6 relative to the magnitude of the log-probability (temperature
    # 0.5 makes logits of magnitude ~20, whose float32 spacing is 2e-6)
    np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-6, atol=1e-6)
    return np.isfinite(ours).sum()


@pytest.mark.parametrize("t", [0.5, 0.8, 1.3, 2.0])
def test_temperature(hf, t):
    torch, lp = hf
    compare(torch, lp.TemperatureLogitsWarper(t), dict(temperature=t))


@pytest.mark.parametrize("k", [1, 5, 50, 999, 2000])
def test_top_k(hf, k):
    torch, lp = hf
    assert compare(torch, lp.TopKLogitsWarper(k), dict(top_k=k)) == B * min(k, V)


@pytest.mark.parametrize("p,keep", [(0.1, 1), (0.5, 1), (0.9, 1), (0.99, 1), (0.9, 5), (0.3, 50)])
def test_top_p(hf, p, keep):
    torch, lp = hf
    compare(torch, lp.TopPLogitsWarper(p, min_tokens_to_keep=keep), dict(top_p=p, min_tokens_to_keep=keep))


@pytest.mark.parametrize("p,keep", [(0.05, 1), (0.2, 1), (0.9, 3)])
def test_min_p(hf, p, keep):
    torch, lp = hf
    compare(torch, lp.MinPLogitsWarper(p, min_tokens_to_keep=keep), dict(min_p=p, min_tokens_to_keep=keep))


@pytest.mark.parametrize("mass,keep", [(0.2, 1), (0.9, 1), (0.5, 10)])
def test_typical(hf, mass, keep):
    torch, lp = hf
    compare(torch, lp.TypicalLogitsWarper(mass, min_tokens_to_keep=keep), dict(typical_p=mass, min_tokens_to_keep=keep))


@pytest.mark.parametrize("eps,keep", [(1e-4, 1), (3e-3, 1), (0.05, 7)])
def test_epsilon(hf, eps, keep):
    torch, lp = hf
    compare(torch, lp.EpsilonLogitsWarper(eps, min_tokens_to_keep=keep), dict(epsilon=eps, min_tokens_to_keep=keep))


@pytest.mark.parametrize("eta,keep", [(1e-4, 1), (3e-3, 1), (0.2, 4)])
def test_eta(hf, eta, keep):
    torch, lp = hf
    compare(torch, lp.EtaLogitsWarper(eta, min_tokens_to_keep=keep), dict(eta=eta, min_tokens_to_keep=keep))


@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty(hf, penalty):
    torch, lp = hf
    context = np.random.default_rng(1).integers(0, V, size=(B, 60))
    compare(torch, lp.RepetitionPenaltyLogitsProcessor(penalty), dict(repetition_penalty=penalty), context=context)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngram(hf, n):
    torch, lp = hf
    vocab = 20  # a small vocabulary makes repeated n-grams likely
    context = np.random.default_rng(2).integers(0, 4, size=(B, 80))  # few symbols: n-grams repeat
    kept = compare(torch, lp.NoRepeatNGramLogitsProcessor(n), dict(no_repeat_ngram_size=n), context=context, vocab=vocab)
    assert kept < B * vocab  # something was banned


def test_frequency_and_presence_follow_the_openai_formula():
    rng = np.random.default_rng(3)
    z = rng.standard_normal((4, 50)).astype(np.float32)
    context = rng.integers(0, 50, size=(4, 40))
    prompt_len = 15
    f, p = 0.7, -0.4
    expect = z.astype(np.float64).copy()
    for r in range(4):
        counts = np.bincount(context[r, prompt_len:], minlength=50)  # only the generated part counts
        expect[r] -= f * counts + p * (counts > 0)
    expect -= expect.max(axis=1, keepdims=True)
    expect -= np.log(np.exp(expect).sum(axis=1, keepdims=True))
    ours = ld.process_logits(z, frequency_penalty=f, presence_penalty=p, context=context, prompt_len=prompt_len)
    np.testing.assert_allclose(ours, expect, atol=1e-5)


def test_chained_warpers_match_a_transformers_chain(hf):
    torch, lp = hf
    chain = lp.LogitsProcessorList([
        lp.RepetitionPenaltyLogitsProcessor(1.2), lp.TemperatureLogitsWarper(0.8), lp.TopKLogitsWarper(100),
        lp.TopPLogitsWarper(0.9), lp.MinPLogitsWarper(0.02),
    ])
    context = np.random.default_rng(4).integers(0, V, size=(B, 30))
    compare(torch, chain, dict(repetition_penalty=1.2, temperature=0.8, top_k=100, top_p=0.9, min_p=0.02), context=context)
