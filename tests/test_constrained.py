"""Constrained decoding that follows the tokens (generate's prefix_allowed_tokens_fn, with
transformers' semantics): the seeds' example of never closing more brackets than were
opened, the distribution renormalized over the allowed tokens (chi-square), step-by-step
agreement with ld.sample, the C loop over a model against the Python-driven loop, and errors.
The transformers oracle is in test_decoding_model.py."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import lmdecode as ld

import reference
from test_beam_search import brute_force

MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"
PROMPT = [1, 403, 407, 261, 378]  # BOS "Once upon a time" in stories260K's vocabulary

# a four-token language: "(", ")", "x", end; the model would rather close than open
OPEN, CLOSE, X, END = 0, 1, 2, 3
BRACKET_LOGITS = np.array([0.0, 2.0, 0.5, -1.0], dtype=np.float32)


def depth(tokens) -> int:
    return sum(1 if t == OPEN else -1 if t == CLOSE else 0 for t in tokens)


def balanced_brackets(batch_id, input_ids):
    """')' only while a bracket is open, the end only once all are closed (the prompt is [X])."""
    d = depth(input_ids)
    return [OPEN, X] + ([CLOSE] if d > 0 else [END])


def test_the_seeds_example_never_closes_more_brackets_than_it_opened():
    kw = dict(max_new_tokens=12, seed=7, n=400, temperature=1.0, stop_token_ids=[END])
    free = ld.generate(lambda toks: BRACKET_LOGITS, [X], **kw)
    constrained = ld.generate(lambda toks: BRACKET_LOGITS, [X], prefix_allowed_tokens_fn=balanced_brackets, **kw)
    # unconstrained, most samples close a bracket that was never opened
    assert sum(min(np.cumsum([depth([t]) for t in g.tokens]), default=0) < 0 for g in free) > 200
    for g in constrained:
        assert min(np.cumsum([depth([t]) for t in g.tokens]), default=0) >= 0
        if g.finish_reason == "stop":
            assert depth(g.tokens) == 0
    assert sum(g.finish_reason == "stop" for g in constrained) > 100


def test_the_distribution_is_renormalized_over_the_allowed_tokens():
    # first step at depth 0: "(", "x" and the end are allowed, ")" is not
    runs = ld.generate(lambda toks: BRACKET_LOGITS, [X], max_new_tokens=1, seed=3, n=4000, temperature=1.0,
                       prefix_allowed_tokens_fn=balanced_brackets)
    counts = np.bincount([g.tokens[0] for g in runs], minlength=4)
    assert counts[CLOSE] == 0
    allowed = np.array([OPEN, X, END])
    p = np.exp(BRACKET_LOGITS[allowed].astype(np.float64))
    p /= p.sum()
    assert stats.chisquare(counts[allowed], p * counts.sum()).pvalue > 1e-3


def random_step_fn(vocab: int):
    """Logits that depend on the whole token list (the same list gives the same row)."""

    def step(tokens):
        rng = np.random.default_rng([int(t) for t in tokens] + [vocab])
        return rng.normal(0.0, 2.0, vocab).astype(np.float32)

    return step


def changing_constraint(batch_id, input_ids):
    # a different allowed set at every step and for every sequence
    return [t for t in range(20) if (t + len(input_ids) + batch_id) % 3 != 0]


def test_each_step_equals_ld_sample_with_that_steps_allowed_tokens():
    step = random_step_fn(20)
    prompts, n = [[4, 5], [6]], 2
    sampling = dict(temperature=0.8, top_p=0.9, repetition_penalty=1.2)
    got = ld.generate(step, prompts, n=n, max_new_tokens=10, seed=11, prefix_allowed_tokens_fn=changing_constraint,
                      **sampling)
    for p, group in enumerate(got):
        for i, out in enumerate(group):
            k, tokens = p * n + i, list(prompts[p])
            for t in range(10):
                allowed = changing_constraint(k, np.array(tokens))
                token = int(ld.sample(step(tokens), seed=11, stream=k, step=t, context=tokens,
                                      prompt_len=len(prompts[p]), allowed_tokens=allowed, **sampling))
                assert token in allowed
                tokens.append(token)
            assert out.tokens == tokens[len(prompts[p]):]


@pytest.fixture(scope="module")
def stories():
    return ld.Model.load(MODELS / "stories260K.bin")


def by_parity(batch_id, input_ids):
    # tokens of the parity of the sequence's length, and never the end of the story
    return [t for t in range(2 + len(input_ids) % 2, 512, 2)]


def test_the_c_loop_over_a_model_equals_the_python_driven_loop(stories):
    kw = dict(max_new_tokens=24, seed=2, n=2, temperature=0.9, top_k=40, prefix_allowed_tokens_fn=by_parity, logprobs=1)
    in_c = stories.generate([PROMPT, PROMPT[:3]], **kw)
    in_python = ld.generate(lambda toks: stories.logits(toks)[-1], [PROMPT, PROMPT[:3]],
                            stop_token_ids=[stories.config.eos_token_id], **kw)
    for group_c, group_py in zip(in_c, in_python):
        for a, b in zip(group_c, group_py):
            assert a.tokens == b.tokens and len(a.tokens) == 24
            assert all(t % 2 == (len(a.prompt_tokens) + i) % 2 for i, t in enumerate(a.tokens))
            np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=1e-4)
    # streaming yields the same tokens
    chunks = list(stories.generate(PROMPT, stream=True, **{**kw, "n": 1}))
    assert [c.token for c in chunks] == in_c[0][0].tokens


def test_contrastive_decoding_cuts_among_the_allowed_tokens(stories):
    # Both models' rows are masked before the contrastive score, so the plausibility cut
    # (alpha = 0.5: often the expert's top token alone) is taken among the allowed tokens; masking
    # the scores afterwards would often leave nothing to draw. Against a NumPy greedy loop.
    amateur = ld.Model.load(MODELS / "stories260K.bin", dtype="q8_0")
    kw = dict(max_new_tokens=16, temperature=0, prefix_allowed_tokens_fn=by_parity, amateur_model=amateur,
              contrastive_alpha=0.5, amateur_temperature=0.7)
    in_c = stories.generate(PROMPT, **kw)
    in_python = ld.generate(lambda toks: stories.logits(toks)[-1], PROMPT, **{**kw, "amateur_model": lambda toks: amateur.logits(toks)[-1]})
    tokens = list(PROMPT)
    for _ in range(16):
        mask = np.full(512, -np.inf)
        mask[by_parity(0, tokens)] = 0.0
        with np.errstate(invalid="ignore"):
            scores = reference.contrastive_scores(stories.logits(tokens)[-1] + mask, amateur.logits(tokens)[-1] + mask,
                                                  alpha=0.5, amateur_temperature=0.7)
        tokens.append(int(np.argmax(scores)))
    assert in_c.tokens == in_python.tokens == tokens[len(PROMPT):]


def test_none_lifts_the_constraint_for_that_step(stories):
    plain = stories.generate(PROMPT, max_new_tokens=8, temperature=0)
    lifted = stories.generate(PROMPT, max_new_tokens=8, temperature=0, prefix_allowed_tokens_fn=lambda k, t: None)
    assert lifted.tokens == plain.tokens
    # repeats are harmless, even more of them than the vocabulary has tokens
    repeated = stories.generate(PROMPT, max_new_tokens=4, temperature=0.7, seed=1,
                                prefix_allowed_tokens_fn=lambda k, t: [9, 7] * 300)
    assert set(repeated.tokens) <= {7, 9}
    hyps = stories.beam_search(PROMPT, beam_width=2, max_new_tokens=3, prefix_allowed_tokens_fn=lambda b, t: [9, 7] * 300)
    assert set(hyps[0].tokens) <= {7, 9}


def test_bad_constraints_raise(stories):
    cases = [
        (lambda k, t: [], ValueError, "empty list for batch_id 0"),
        (lambda k, t: [3, 512], ValueError, "token 512 for batch_id 0, outside the vocabulary"),
        (lambda k, t: [-1], ValueError, "token -1"),
        (lambda k, t: "abc", TypeError, "must return a list of token ids"),
        (lambda k, t: [[1, 2]], TypeError, "must return a list of token ids"),
        (lambda k, t: [0.5], TypeError, "must return a list of token ids"),
    ]
    for fn, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            stories.generate(PROMPT, max_new_tokens=4, prefix_allowed_tokens_fn=fn)
    with pytest.raises(TypeError, match="prefix_allowed_tokens_fn must be callable"):
        stories.generate(PROMPT, prefix_allowed_tokens_fn=[1, 2])
    with pytest.raises(ValueError, match="not both"):
        stories.generate(PROMPT, prefix_allowed_tokens_fn=by_parity, allowed_tokens=[2, 4])
    with pytest.raises(ValueError, match="does not combine with draft_model"):
        stories.generate(PROMPT, prefix_allowed_tokens_fn=by_parity, draft_model=stories)
    # an error part way leaves nothing half-done for the next call
    assert stories.generate(PROMPT, max_new_tokens=4, temperature=0).tokens == \
        stories.generate(PROMPT, max_new_tokens=4, temperature=0).tokens


# ---------------------------------------------------------------------------- beam search


def no_repeat_late_end(batch_id, input_ids):
    """Never the previous token again; the end (3) only after two new tokens (prompt [0])."""
    return [t for t in range(4) if t != int(input_ids[-1]) and (t != 3 or len(input_ids) >= 3)]


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_full_width_constrained_beam_equals_brute_force(length_penalty):
    step = random_step_fn(4)
    exact = brute_force(step, [0], 4, 4, 3, length_penalty, allowed=no_repeat_late_end)
    hyps = ld.beam_search(step, [0], beam_width=len(exact), max_new_tokens=4, length_penalty=length_penalty,
                          early_stopping="never", num_return_sequences=5, eos_token_id=3,
                          prefix_allowed_tokens_fn=no_repeat_late_end)
    assert [h.tokens for h in hyps] == [seq for _, seq in exact[:5]]
    np.testing.assert_allclose([h.score for h in hyps], [s for s, _ in exact[:5]], rtol=1e-5)
    unconstrained = ld.beam_search(step, [0], beam_width=len(exact), max_new_tokens=4, length_penalty=length_penalty,
                                   early_stopping="never", num_return_sequences=5, eos_token_id=3)
    assert [h.tokens for h in unconstrained] != [h.tokens for h in hyps]


def test_beam_search_in_c_equals_the_step_function_search(stories):
    kw = dict(beam_width=3, max_new_tokens=12, num_return_sequences=2, prefix_allowed_tokens_fn=by_parity)
    in_c = stories.beam_search(PROMPT, **kw)
    in_python = ld.beam_search(lambda toks: stories.logits(toks)[-1], PROMPT, eos_token_id=stories.config.eos_token_id,
                               **kw)
    assert [h.tokens for h in in_c] == [h.tokens for h in in_python]
    np.testing.assert_allclose([h.score for h in in_c], [h.score for h in in_python], atol=1e-4)
    for h in in_c:
        assert all(t % 2 == (len(PROMPT) + i) % 2 for i, t in enumerate(h.tokens))


def test_too_few_allowed_continuations_are_filled_with_minus_inf():
    # one allowed token per beam: 2 beams offer 2 continuations, 4 are kept a step
    step = random_step_fn(6)
    hyps = ld.beam_search(step, [0], beam_width=2, max_new_tokens=3, prefix_allowed_tokens_fn=lambda b, ids: [4])
    assert hyps[0].tokens == [4, 4, 4] and np.isfinite(hyps[0].score)


class ConstraintBroke(Exception):
    pass


def test_beam_search_constraint_errors(stories):
    def broken(batch_id, input_ids):
        if len(input_ids) > len(PROMPT) + 2:
            raise ConstraintBroke("at the third step")
        return None

    with pytest.raises(ConstraintBroke, match="third step"):
        stories.beam_search(PROMPT, beam_width=2, max_new_tokens=8, prefix_allowed_tokens_fn=broken)
    with pytest.raises(ValueError, match="empty list for batch_id 0"):
        stories.beam_search(PROMPT, beam_width=2, max_new_tokens=4, prefix_allowed_tokens_fn=lambda b, ids: [])
    with pytest.raises(ValueError, match="token 600 for batch_id 0"):
        ld.beam_search(random_step_fn(8), [0], beam_width=2, prefix_allowed_tokens_fn=lambda b, ids: [600])
    with pytest.raises(TypeError, match="must be callable"):
        stories.beam_search(PROMPT, prefix_allowed_tokens_fn=3)
    # the model is left usable
    assert stories.beam_search(PROMPT, beam_width=2, max_new_tokens=4)[0].tokens


# ---------------------------------------------------------------------------- properties

@settings(max_examples=60, deadline=None, derandomize=True)
@given(data=st.data())
def test_every_token_and_beam_stays_inside_what_the_function_allowed(data):
    vocab = data.draw(st.integers(2, 12))
    seed = data.draw(st.integers(0, 2**32 - 1))
    # each step's allowed set is a function of the tokens so far, drawn once per distinct prefix
    table: dict[tuple, list[int] | None] = {}

    def allowed(batch_id, input_ids):
        key = (batch_id, tuple(int(t) for t in input_ids))
        if key not in table:
            table[key] = data.draw(st.one_of(st.none(), st.lists(st.integers(0, vocab - 1), min_size=1, max_size=vocab)))
        return table[key]

    step = random_step_fn(vocab)
    sampling = data.draw(st.sampled_from([dict(temperature=0), dict(temperature=1.0), dict(temperature=0.7, top_k=3),
                                          dict(temperature=1.3, top_p=0.8, repetition_penalty=1.3)]))
    outs = ld.generate(step, [0], max_new_tokens=5, n=2, seed=seed, prefix_allowed_tokens_fn=allowed, **sampling)
    for k, out in enumerate(outs):
        tokens = [0]
        for t in out.tokens:
            fixed = table[(k, tuple(tokens))]
            assert fixed is None or t in fixed
            tokens.append(t)
    width = data.draw(st.integers(1, 3))
    for h in ld.beam_search(step, [0], beam_width=width, max_new_tokens=4, num_return_sequences=width,
                            prefix_allowed_tokens_fn=allowed):
        tokens = [0]
        for t, lp in zip(h.tokens, h.token_logprobs):
            fixed = table[(0, tuple(tokens))]
            assert (fixed is None or t in fixed) or lp == -np.inf  # -inf fillers when too few are allowed
            tokens.append(t)


def test_a_constraint_may_call_the_searching_model():
    # the beam search lets go of the model while the function runs: a function that asks the
    # same model for logits works (it used to wait forever on the model's lock). In a child
    # process, so that a regression fails on the timeout instead of hanging the suite.
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import numpy as np, lmdecode as ld
        m = ld.Model.load({str(MODELS / "stories260K.bin")!r})
        prompt = {PROMPT!r}
        def top_100(batch_id, input_ids):  # the tokens the model itself ranks highest here
            return np.argsort(m.logits(input_ids)[-1])[-100:]
        hyps = m.beam_search(prompt, beam_width=3, max_new_tokens=6, prefix_allowed_tokens_fn=top_100)
        plain = m.beam_search(prompt, beam_width=3, max_new_tokens=6)
        print(hyps[0].tokens == plain[0].tokens)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"  # the top 100 hold what plain search takes on this prompt
