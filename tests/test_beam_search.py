"""Beam search: the seeds' worked example, brute force on a tiny vocabulary,
and transformers' generate(num_beams=...) as the oracle."""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest

import lmdecode as ld
from lmdecode.search import beam_search

MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"


def log_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    m = z.max()
    return z - m - np.log(np.exp(z - m).sum())


# ----------------------------------------------------------------------------
# the seeds' b=2 example
# ----------------------------------------------------------------------------

A, B, C, EOS = 0, 1, 2, 3


def seeds_step(tokens):
    """Step 1: p(A)=0.5, p(B)=0.3; after A: p(A)=0.6, p(B)=0.2; after B: p(C)=0.4, p(<eos>)=0.3."""
    generated = tuple(int(t) for t in tokens[1:])  # tokens[0] is the prompt
    table = {
        (): [0.5, 0.3, 0.1, 0.1],
        (A,): [0.6, 0.2, 0.1, 0.1],
        (B,): [0.15, 0.15, 0.4, 0.3],
    }
    return np.log(np.array(table.get(generated, [0.25] * 4), dtype=np.float32))


def test_seeds_worked_example_top_two_beams():
    hyps = beam_search(seeds_step, [7], beam_width=2, max_new_tokens=2, length_penalty=0.0, num_return_sequences=2, eos_token_id=EOS)
    assert [h.tokens for h in hyps] == [[A, A], [B, C]]
    assert hyps[0].score == pytest.approx(-1.204, abs=1e-3)  # log 0.5 + log 0.6
    assert hyps[1].score == pytest.approx(-2.120, abs=1e-3)  # log 0.3 + log 0.4
    assert hyps[0].token_logprobs == pytest.approx([math.log(0.5), math.log(0.6)], abs=1e-6)
    # B <eos> (-2.408) is the third finished hypothesis, not returned


# ----------------------------------------------------------------------------
# brute force: a beam as wide as all sequences finds the exact argmax
# ----------------------------------------------------------------------------


def hashed_step(vocab, seed):
    def step(tokens):
        rng = np.random.default_rng([seed] + [int(t) for t in tokens])
        return (rng.standard_normal(vocab) * 2.0).astype(np.float32)

    return step


def brute_force(step, prompt, vocab, max_new, eos, length_penalty, allowed=None):
    """Every sequence that ends with EOS or reaches max_new, scored as transformers ranks them.
    allowed(0, tokens) -> the tokens that may follow (a constrained search), which keep their
    log-softmax over the whole vocabulary (transformers does not renormalize)."""
    results = []

    def extend(seq, total):
        lp = log_softmax(step(np.array(prompt + seq)))
        for tok in range(vocab) if allowed is None else allowed(0, np.array(prompt + seq)):
            new_seq, new_total = seq + [tok], total + lp[tok]
            if tok == eos or len(new_seq) == max_new:
                results.append((new_total / len(new_seq) ** length_penalty, new_seq))
            else:
                extend(new_seq, new_total)

    extend([], 0.0)
    return sorted(results, key=lambda r: -r[0])


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_full_width_beam_equals_brute_force(length_penalty):
    vocab, max_new, eos = 3, 4, 2
    step = hashed_step(vocab, seed=11)
    exact = brute_force(step, [0], vocab, max_new, eos, length_penalty)
    width = len(exact)  # every sequence fits in the beam
    hyps = beam_search(step, [0], beam_width=width, max_new_tokens=max_new, length_penalty=length_penalty, early_stopping="never", num_return_sequences=5, eos_token_id=eos)
    assert [h.tokens for h in hyps] == [seq for _, seq in exact[:5]]
    np.testing.assert_allclose([h.score for h in hyps], [s for s, _ in exact[:5]], rtol=1e-5)
    for h in hyps:
        assert h.logprob == pytest.approx(sum(h.token_logprobs), abs=1e-5)
        assert h.score == pytest.approx(h.logprob / len(h.tokens) ** length_penalty, rel=1e-5)


def test_width_one_is_greedy_without_eos():
    vocab = 5
    step = hashed_step(vocab, seed=3)
    hyps = beam_search(step, [1, 2], beam_width=1, max_new_tokens=6)
    seq = [1, 2]
    for _ in range(6):
        seq.append(int(np.argmax(step(np.array(seq)))))
    assert hyps[0].tokens == seq[2:]


def test_step_function_may_refill_one_buffer():
    # a step function returning the same array every call, refilled (as a view of an engine's
    # logits buffer is): each beam must keep the row it was given, batched or not
    step = hashed_step(9, seed=4)
    buffer, batch_buffer = np.empty(9, np.float32), np.empty((8, 9), np.float32)

    def reused(tokens):
        buffer[:] = step(tokens)
        return buffer

    def reused_batched(sequences):
        for i, s in enumerate(sequences):
            batch_buffer[i] = step(s)
        return batch_buffer[: len(sequences)]

    kw = dict(beam_width=3, max_new_tokens=6, num_return_sequences=3)
    want = [(h.tokens, h.score) for h in beam_search(step, [1, 2], **kw)]
    assert [(h.tokens, h.score) for h in beam_search(reused, [1, 2], **kw)] == want
    assert [(h.tokens, h.score) for h in beam_search(reused_batched, [1, 2], batched=True, **kw)] == want


def test_batched_step_function_sees_each_distinct_beam_once():
    step = hashed_step(6, seed=2)
    calls = []

    def batched(sequences):
        calls.append([tuple(s) for s in sequences])
        return np.stack([step(s) for s in sequences])

    kw = dict(beam_width=3, max_new_tokens=5, num_return_sequences=3, eos_token_id=5, repetition_penalty=1.2)
    want = beam_search(step, [0, 1], **kw)
    got = beam_search(batched, [0, 1], batched=True, **kw)
    assert [(h.tokens, h.score, h.token_logprobs) for h in got] == [(h.tokens, h.score, h.token_logprobs) for h in want]
    seen = [seq for call in calls for seq in call]
    assert len(seen) == len(set(seen)) and len(calls) <= 5 and calls[0] == [(0, 1)]  # never asked twice
    with pytest.raises(ValueError, match=r"a batched step_fn must return \(1, V\) logits for 1 sequences, got shape \(6,\)"):
        beam_search(lambda seqs: step(seqs[0]), [0, 1], batched=True)  # one row, not a batch of them
    with pytest.raises(ValueError, match="batched=True is for step functions"):
        beam_search(ld.Model.load(MODELS / "stories260K.bin"), [1], batched=True)


def test_bad_arguments():
    step = hashed_step(4, seed=0)
    with pytest.raises(ValueError, match="num_return_sequences"):
        beam_search(step, [0], beam_width=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="early_stopping"):
        beam_search(step, [0], early_stopping="sometimes")
    with pytest.raises(ValueError, match="beam_width"):
        beam_search(step, [0], beam_width=0)
    with pytest.raises(ValueError, match="eos_token_id"):
        beam_search(step, [0], eos_token_id=9)
    with pytest.raises(ValueError, match="NaN"):
        beam_search(lambda t: np.full(4, np.nan), [0])
    with pytest.raises(TypeError, match="max_new_tokens"):
        beam_search(step, [0], max_new_tokens=2.5)
    with pytest.raises(ValueError, match="step_fn must return a 1-D array of logits"):
        beam_search(lambda t: np.zeros((2, 4)), [0])
    with pytest.raises(TypeError, match="step_fn must return an array of real-valued logits, got None"):
        beam_search(lambda t: None, [0])
    with pytest.raises(ValueError, match="^step_fn must return an array of logits, got the scalar 0.5"):
        beam_search(lambda t: 0.5, [0])


# ----------------------------------------------------------------------------
# the transformers oracle
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_model():
    from oracle import require_transformers

    torch, transformers = require_transformers()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    eos = 7
    rng = np.random.default_rng(0)
    prompts = torch.from_numpy(rng.integers(0, config.vocab_size, size=(16, 8)))
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # sharpen the distribution so that beams differ
        # Point the EOS row of the head along the mean final hidden state, scaled so
        # that EOS gets about 15% of the mass on average: hypotheses then end early.
        hidden = model.model(prompts).last_hidden_state.mean(dim=(0, 1))
        direction = hidden / hidden.norm() ** 2
        for scale in np.linspace(0.0, 20.0, 81):
            model.lm_head.weight[eos] = float(scale) * direction
            p_eos = torch.softmax(model(prompts).logits, -1)[..., eos].mean().item()
            if p_eos >= 0.15:
                break
    return torch, model, eos


def hf_step(torch, model):
    def step(tokens):
        with torch.no_grad():
            return model(torch.from_numpy(np.asarray(tokens).reshape(1, -1))).logits[0, -1].float().numpy()

    return step


CASES = [
    (width, lp, es, nrs)
    for width, lp, es, nrs in itertools.product([2, 3, 5], [0.0, 0.6, 1.0, 2.0], [False, True, "never"], [1, 2])
    if nrs <= width
]


@pytest.mark.oracle
@pytest.mark.parametrize("width,length_penalty,early_stopping,num_return", CASES)
def test_matches_transformers_generate(hf_model, width, length_penalty, early_stopping, num_return):
    torch, model, eos = hf_model
    prompt = [5, 17, 3, 29]
    max_new = 10
    out = model.generate(
        torch.tensor([prompt]), num_beams=width, do_sample=False, max_new_tokens=max_new, length_penalty=length_penalty,
        early_stopping=early_stopping, num_return_sequences=num_return, eos_token_id=eos, pad_token_id=eos,
        output_scores=True, return_dict_in_generate=True,
    )
    hyps = beam_search(hf_step(torch, model), prompt, beam_width=width, max_new_tokens=max_new, length_penalty=length_penalty, early_stopping=early_stopping, num_return_sequences=num_return, eos_token_id=eos)
    assert len(hyps) == num_return
    for h, seq, score in zip(hyps, out.sequences.numpy(), out.sequences_scores.numpy()):
        generated = seq[len(prompt):]
        assert list(generated[: len(h.tokens)]) == h.tokens
        assert all(t == eos for t in generated[len(h.tokens):])  # padding after a short hypothesis
        assert h.score == pytest.approx(float(score), abs=1e-4)


@pytest.mark.oracle
def test_oracle_cases_exercise_eos(hf_model):
    """The chosen EOS must actually end some hypotheses early, or the oracle test proves little."""
    torch, model, eos = hf_model
    hyps = beam_search(hf_step(torch, model), [5, 17, 3, 29], beam_width=5, max_new_tokens=10, length_penalty=0.0, num_return_sequences=5, eos_token_id=eos)
    assert any(h.tokens[-1] == eos and len(h.tokens) < 10 for h in hyps)
    # finish_reason says which ended with EOS, the others ran to the length limit
    assert [h.finish_reason for h in hyps] == ["stop" if h.tokens[-1] == eos else "length" for h in hyps]
    assert all(len(h.tokens) == 10 for h in hyps if h.finish_reason == "length")


# (width, processors); min_new_tokens alone at width 4, whose second hypothesis otherwise ends
# with EOS after 11 tokens
PROCESSOR_CASES = [(width, kw) for kw in (dict(repetition_penalty=1.3), dict(repetition_penalty=0.7),
                                          dict(no_repeat_ngram_size=2),
                                          dict(no_repeat_ngram_size=3, repetition_penalty=1.2, min_new_tokens=6))
                   for width in (2, 4)] + [(4, dict(min_new_tokens=12))]
PROCESSOR_DEFAULTS = dict(repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0)


@pytest.mark.oracle
@pytest.mark.parametrize("width,processors", PROCESSOR_CASES,
                         ids=[f"{w}-" + ",".join(f"{k}={v}" for k, v in kw.items()) for w, kw in PROCESSOR_CASES])
def test_logits_processors_match_transformers_generate(hf_model, width, processors):
    """repetition_penalty, no_repeat_ngram_size and min_new_tokens act on the beams' log-probs
    as in transformers' beam search: the same hypotheses and scores, over a step function and
    over the model loaded into lmdecode (whose search runs in C)."""
    torch, model, eos = hf_model
    prompt = [5, 17, 3, 29, 5, 17]  # a repeated bigram: the n-gram ban applies at once
    kw = dict(beam_width=width, max_new_tokens=12, num_return_sequences=2, eos_token_id=eos, **processors)
    out = model.generate(
        torch.tensor([prompt]), num_beams=width, do_sample=False, max_new_tokens=12, num_return_sequences=2,
        eos_token_id=eos, pad_token_id=eos, output_scores=True, return_dict_in_generate=True, **processors,
    )
    plain = beam_search(hf_step(torch, model), prompt, **{**kw, **PROCESSOR_DEFAULTS})
    engine = ld.Model.from_numpy(model.config, model.state_dict())
    for hyps in (beam_search(hf_step(torch, model), prompt, **kw), engine.beam_search(prompt, **kw)):
        for h, seq, score in zip(hyps, out.sequences.numpy(), out.sequences_scores.numpy()):
            generated = seq[len(prompt):]
            assert list(generated[: len(h.tokens)]) == h.tokens
            assert all(t == eos for t in generated[len(h.tokens):])
            assert h.score == pytest.approx(float(score), abs=1e-4)
            assert h.logprob == pytest.approx(sum(h.token_logprobs), abs=1e-4)
    if "min_new_tokens" in processors:
        assert all(len(h.tokens) >= processors["min_new_tokens"] for h in hyps)
    # each case changes what plain beam search finds, or it would prove little
    assert [(h.tokens, h.score) for h in hyps] != [(h.tokens, h.score) for h in plain]


def test_no_repeat_ngram_bans_by_hand():
    """A step function that always prefers token 1, then 2: with n-grams of 2 banned, the
    beams cannot take (1, 1) again after the prompt [1, 1], so 2 comes first (log-prob
    log_softmax([3, 2, 0])[2]), and the repetition penalty multiplies a repeated token's
    log-prob (beam width 1 is greedy over the processed log-probs)."""
    row = np.array([0.0, 3.0, 2.0], np.float32)
    lp = log_softmax(row.astype(np.float64))
    hyps = beam_search(lambda toks: row, [1, 1], beam_width=1, max_new_tokens=3, no_repeat_ngram_size=2)
    # after [1, 1]: 1 is banned (the bigram (1, 1) exists) -> 2; after [.., 1, 2]: (2, 1)? not seen -> 1;
    # after [.., 2, 1]: (1, 1) and (1, 2) both seen -> 0
    assert hyps[0].tokens == [2, 1, 0]
    np.testing.assert_allclose(hyps[0].token_logprobs, [lp[2], lp[1], lp[0]], rtol=0, atol=1e-6)
    hyps = beam_search(lambda toks: row, [1], beam_width=1, max_new_tokens=1, repetition_penalty=2.0)
    # 1 (in the prompt): 2 * lp[1] = -0.70 against lp[2] = -1.35: still 1, its log-prob doubled
    assert hyps[0].tokens == [1]
    np.testing.assert_allclose(hyps[0].token_logprobs, [2 * lp[1]], rtol=0, atol=1e-6)
    hyps = beam_search(lambda toks: row, [1], beam_width=1, max_new_tokens=1, repetition_penalty=5.0)
    assert hyps[0].tokens == [2]  # 5 * lp[1] = -1.75 < lp[2]
    with pytest.raises(ValueError, match=r"repetition_penalty \(=0\) must be a finite number > 0"):
        beam_search(lambda toks: row, [1], repetition_penalty=0)
    with pytest.raises(ValueError, match=r"no_repeat_ngram_size \(=-1\) must be >= 0"):
        beam_search(lambda toks: row, [1], no_repeat_ngram_size=-1)
    with pytest.raises(TypeError, match="min_new_tokens must be an int"):
        beam_search(lambda toks: row, [1], min_new_tokens=1.5)
