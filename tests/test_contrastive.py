"""Contrastive decoding: the scores against a NumPy reference and a hand-computed case, and
the decoding loop in C against the same loop driven from Python and against a NumPy
reference of greedy contrastive decoding."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import lmdecode as ld

import reference
from test_speculative import random_llama

MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"
PROMPT = [1, 403, 407, 261, 378]  # BOS "Once upon a time" in stories260K's vocabulary


@pytest.fixture(scope="module")
def expert():
    return ld.Model.load(MODELS / "stories260K.bin")


@pytest.fixture(scope="module")
def amateur():
    """A weak model over the same 512 tokens (random weights, peaky enough to matter)."""
    return random_llama(512, seed=3, scale=0.5, context=512)


def test_scores_match_the_numpy_reference():
    rng = np.random.default_rng(0)
    for alpha, tau in ((0.1, 1.0), (0.0, 0.5), (0.5, 2.0), (1.0, 1.0)):
        expert_logits = (rng.standard_normal((6, 300)) * 3).astype(np.float32)
        amateur_logits = (rng.standard_normal((6, 300)) * 3).astype(np.float32)
        expert_logits[0, :5] = -np.inf  # masked tokens stay out
        got = ld.contrastive_logits(expert_logits, amateur_logits, alpha=alpha, amateur_temperature=tau)
        for r in range(6):
            want = reference.contrastive_scores(expert_logits[r], amateur_logits[r], alpha, tau)
            np.testing.assert_array_equal(np.isfinite(got[r]), np.isfinite(want))
            np.testing.assert_allclose(got[r][np.isfinite(want)], want[np.isfinite(want)], rtol=0, atol=2e-5)
        single = ld.contrastive_logits(expert_logits[1], amateur_logits[1], alpha=alpha, amateur_temperature=tau)
        np.testing.assert_array_equal(single, got[1])


@pytest.mark.parametrize("dtype", [np.float16, np.float64, np.int64])
def test_scores_take_any_real_dtype_as_float32(dtype):
    rng = np.random.default_rng(2)
    expert_logits, amateur_logits = ((rng.standard_normal((2, 3, 50)) * 3).astype(dtype))
    before = expert_logits.copy()
    got = ld.contrastive_logits(expert_logits, amateur_logits, alpha=0.2)
    want = ld.contrastive_logits(expert_logits.astype(np.float32), amateur_logits.astype(np.float32), alpha=0.2)
    assert got.dtype == np.float32 and got.shape == (3, 50)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(ld.contrastive_logits(expert_logits[1], amateur_logits[1], alpha=0.2), want[1])
    np.testing.assert_array_equal(expert_logits, before)
    with pytest.raises(TypeError, match="expert_logits must be a real floating-point array"):
        ld.contrastive_logits(["a"], ["b"])
    with pytest.raises(ValueError, match="must have one shape"):
        ld.contrastive_logits(expert_logits[0], amateur_logits)  # (V,) against (B, V)


def test_the_amateur_demotes_what_it_also_finds_likely():
    # expert (0.5, 0.3, 0.15, 0.05), amateur (0.6, 0.1, 0.2, 0.1), alpha 0.2 (cut at 0.1):
    # token 3 is implausible; scores log(5/6), log 3, log(3/4): the expert's second choice wins
    expert = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    amateur = np.log(np.array([0.6, 0.1, 0.2, 0.1], dtype=np.float32))
    scores = ld.contrastive_logits(expert, amateur, alpha=0.2)
    np.testing.assert_allclose(scores[:3], np.log([5 / 6, 3.0, 0.75]), rtol=0, atol=1e-6)
    assert scores[3] == -np.inf and int(np.argmax(scores)) == 1
    # alpha = 1 keeps the expert's argmax alone
    only = ld.contrastive_logits(expert, amateur, alpha=1.0)
    assert np.isfinite(only).tolist() == [True, False, False, False]


def test_bad_scores_input_raises():
    row = np.zeros(4, dtype=np.float32)
    # named as this function calls it (they said contrastive_alpha, generate's keyword)
    with pytest.raises(ValueError, match=r"^alpha \(=1.5\) must be in \[0, 1\]"):
        ld.contrastive_logits(row, row, alpha=1.5)
    with pytest.raises(TypeError, match=r"^alpha must be a number, got '0.1'"):
        ld.contrastive_logits(row, row, alpha="0.1")
    with pytest.raises(ValueError, match=r"amateur_temperature \(=0.0\) must be > 0"):
        ld.contrastive_logits(row, row, amateur_temperature=0.0)
    with pytest.raises(ValueError, match="must have one shape"):
        ld.contrastive_logits(row, np.zeros(5, np.float32))
    bad = row.copy(); bad[2] = np.nan
    with pytest.raises(ValueError, match=r"amateur logits\[2\] is NaN"):
        ld.contrastive_logits(row, bad)
    with pytest.raises(ValueError, match=r"row 1: expert logits\[0\] is \+inf"):
        ld.contrastive_logits(np.stack([row, row + np.array([np.inf, 0, 0, 0], np.float32)]), np.stack([row, row]))
    kept = bad.copy()
    with pytest.raises(ValueError):
        ld.contrastive_logits(row, bad)
    np.testing.assert_array_equal(bad, kept)


def steps_of(model):
    return lambda tokens: model.logits(tokens)[-1]


def test_greedy_loop_in_c_equals_the_numpy_reference(expert, amateur):
    for alpha, tau in ((0.1, 1.0), (0.05, 0.5)):
        got = expert.generate(PROMPT, max_new_tokens=30, temperature=0, stop_token_ids=[], amateur_model=amateur,
                              contrastive_alpha=alpha, amateur_temperature=tau)
        tokens = list(PROMPT)
        for _ in range(30):
            scores = reference.contrastive_scores(expert.logits(tokens)[-1], amateur.logits(tokens)[-1], alpha, tau)
            tokens.append(int(np.argmax(scores)))
        assert got.tokens == tokens[len(PROMPT):]
        # the reported log-probs are the expert's own
        np.testing.assert_array_equal(got.token_logprobs, expert.sequence_logprob(PROMPT, got.tokens).token_logprobs)
    plain = expert.generate(PROMPT, max_new_tokens=30, temperature=0, stop_token_ids=[])
    assert got.tokens != plain.tokens  # the amateur changed the output


def test_loop_in_c_equals_the_python_driven_loop(expert, amateur):
    prompts = [PROMPT, PROMPT[:2]]
    kw = dict(max_new_tokens=25, seed=6, n=2, min_new_tokens=4, temperature=0.8, top_k=30, repetition_penalty=1.1,
              contrastive_alpha=0.05, logprobs=2)
    in_c = ld.generate(expert, prompts, amateur_model=amateur, **kw)
    in_python = ld.generate(steps_of(expert), prompts, amateur_model=steps_of(amateur),
                            stop_token_ids=[expert.config.eos_token_id], **kw)
    for group_c, group_py in zip(in_c, in_python):
        for a, b in zip(group_c, group_py):
            assert a.tokens == b.tokens and a.finish_reason == b.finish_reason
            np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, rtol=0, atol=1e-5)
            assert list(a.top_logprobs[0]) == list(b.top_logprobs[0])


def test_alpha_one_is_the_experts_greedy_decoding(expert, amateur):
    plain = expert.generate(PROMPT, max_new_tokens=20, temperature=0, stop_token_ids=[])
    cd = expert.generate(PROMPT, max_new_tokens=20, temperature=0, stop_token_ids=[], amateur_model=amateur,
                         contrastive_alpha=1.0)
    assert cd.tokens == plain.tokens


def test_the_shorter_context_length_ends_it(expert):
    short = random_llama(512, seed=4, context=12)
    out = expert.generate(PROMPT, max_new_tokens=30, temperature=0, stop_token_ids=[], amateur_model=short)
    assert len(out.tokens) == 12 - len(PROMPT) and out.finish_reason == "length"


def test_bad_arguments_raise(expert, amateur):
    with pytest.raises(ValueError, match="vocabulary \\(16 tokens\\) differs from the expert's \\(512\\)"):
        expert.generate(PROMPT, max_new_tokens=3, amateur_model=random_llama(16, seed=0))
    with pytest.raises(ValueError, match="do not combine"):
        expert.generate(PROMPT, max_new_tokens=3, amateur_model=amateur, draft_model=amateur)
    with pytest.raises(TypeError, match="amateur_model must be an lmdecode Model like the expert"):
        expert.generate(PROMPT, max_new_tokens=3, amateur_model=steps_of(amateur))
    with pytest.raises(TypeError, match="amateur_model must be a step function like the expert"):
        ld.generate(steps_of(expert), PROMPT, max_new_tokens=3, amateur_model=3)
    with pytest.raises(ValueError, match="contrastive_alpha \\(=-0.1\\)"):
        expert.generate(PROMPT, max_new_tokens=3, amateur_model=amateur, contrastive_alpha=-0.1)
    # a step function amateur that returns the wrong shape is named (the message said step_fn)
    row = np.zeros(6, np.float32)
    with pytest.raises(ValueError, match=r"^amateur_model must return \(6,\) logits, got shape \(1, 6\)"):
        ld.generate(lambda t: row, [0], max_new_tokens=2, amateur_model=lambda t: row[None])
    with pytest.raises(ValueError, match=r"^amateur_model must return an array of logits, got the scalar 1.0"):
        ld.generate(lambda t: row, [0], max_new_tokens=2, amateur_model=lambda t: 1.0)


def test_tokens_the_amateur_rules_out_outrank_every_other_at_any_temperature():
    """A plausible token with amateur probability 0 scores +inf: only such tokens stay, scored
    by the expert's log-probability. The score was the largest float32, which a temperature
    below 1 took past float32 (a ValueError blaming temperature) and which left other tokens
    in the draw at temperatures above 1."""
    expert = np.array([1.0, 0.5, 0.0, -1.0, 0.2], np.float32)
    amateur = np.array([2.0, 0.0, -np.inf, 0.0, -np.inf], np.float32)  # rules out tokens 2 and 4
    scores = ld.contrastive_logits(expert, amateur, alpha=0.0)
    log_e = expert - np.log(np.exp(expert.astype(np.float64)).sum())
    np.testing.assert_allclose(scores[[2, 4]], log_e[[2, 4]], rtol=0, atol=1e-6)
    assert np.isneginf(scores[[0, 1, 3]]).all()
    np.testing.assert_array_equal(np.isfinite(scores), np.isfinite(reference.contrastive_scores(expert, amateur, 0.0)))
    # a cut that drops token 2 (p_EXP below alpha * max) leaves token 4 alone
    assert np.isfinite(ld.contrastive_logits(expert, amateur, alpha=0.4)).tolist() == [False, False, False, False, True]
    for temperature in (0, 0.5, 1.0, 2.0):
        out = ld.generate(lambda t: expert, [0], max_new_tokens=40, seed=1, temperature=temperature,
                          amateur_model=lambda t: amateur, contrastive_alpha=0.0)
        assert set(out.tokens) <= {2, 4}, temperature
        if temperature == 0:
            assert out.tokens == [4] * 40  # the expert prefers token 4 (0.2 > 0.0)
        else:
            assert set(out.tokens) == {2, 4}, temperature
