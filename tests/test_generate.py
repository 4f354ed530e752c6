"""generate() over step functions: reproduction with ld.sample, stops,
budgets, n samples, log-probs and streaming."""
from __future__ import annotations

import numpy as np
import pytest

import lmdecode as ld


def hashed_model(vocab, seed=0, scale=2.0):
    """A deterministic 'model': logits are a hash of the whole token sequence."""

    def step(tokens):
        rng = np.random.default_rng([seed] + [int(t) for t in tokens])
        return (rng.standard_normal(vocab) * scale).astype(np.float32)

    return step


SAMPLING = dict(temperature=0.9, top_k=20, top_p=0.95, repetition_penalty=1.2, frequency_penalty=0.3, presence_penalty=0.1)


def assert_stream_equals(chunks, outs):
    """The chunks of a stream against the Generations of the same call without stream=True
    (sequence k is outs[k]): per sequence, the same tokens with the same log-probabilities
    and top log-probabilities, text that concatenates to .text, and finish_reason on the
    last chunk alone."""
    assert sorted({c.index for c in chunks}) == list(range(len(outs)))
    for k, out in enumerate(outs):
        mine = [c for c in chunks if c.index == k]
        assert [c.token for c in mine] == out.tokens
        assert [c.logprob for c in mine] == out.token_logprobs
        assert [c.top_logprobs for c in mine] == out.top_logprobs
        assert [c.finish_reason for c in mine] == [None] * (len(mine) - 1) + [out.finish_reason]
        if out.text is not None:
            assert "".join(c.text for c in mine) == out.text


def test_reproduced_token_for_token_by_sample():
    step = hashed_model(64)
    prompt = [3, 14, 15]
    out = ld.generate(step, prompt, max_new_tokens=25, seed=1234, **SAMPLING)
    seq = list(prompt)
    for t in range(25):
        token = ld.sample(step(np.array(seq)), seed=1234, stream=0, step=t, context=seq, prompt_len=len(prompt), **SAMPLING)
        seq.append(int(token))
    assert out.tokens == seq[len(prompt):]
    assert out.finish_reason == "length"
    assert out.prompt_tokens == prompt


def test_batch_and_n_samples_use_one_stream_per_sequence():
    step = hashed_model(50, seed=3)
    prompts = [[1, 2, 3], [4, 5]]
    outs = ld.generate(step, prompts, max_new_tokens=12, seed=99, n=3, temperature=1.0)
    assert len(outs) == 2 and all(len(group) == 3 for group in outs)
    for i, prompt in enumerate(prompts):
        for j, gen in enumerate(outs[i]):
            k = i * 3 + j
            seq = list(prompt)
            for t in range(12):
                seq.append(int(ld.sample(step(np.array(seq)), seed=99, stream=k, step=t)))
            assert gen.tokens == seq[len(prompt):]
    assert len({tuple(g.tokens) for g in outs[0]}) > 1  # the samples differ


def test_same_seed_same_result_and_greedy():
    step = hashed_model(40, seed=5)
    a = ld.generate(step, [1], max_new_tokens=10, seed=7, temperature=1.3)
    b = ld.generate(step, [1], max_new_tokens=10, seed=7, temperature=1.3)
    assert a.tokens == b.tokens
    g = ld.generate(step, [1], max_new_tokens=10, temperature=0)
    seq = [1]
    for _ in range(10):
        seq.append(int(np.argmax(step(np.array(seq)))))
    assert g.tokens == seq[1:]


def test_stop_token_and_min_new_tokens():
    vocab, eos = 16, 2
    step = hashed_model(vocab, seed=8)
    out = ld.generate(step, [1], max_new_tokens=60, seed=0, stop_token_ids=[eos], temperature=1.5)
    assert out.finish_reason == "stop" and out.tokens[-1] == eos and eos not in out.tokens[:-1]
    blocked = ld.generate(step, [1], max_new_tokens=60, seed=0, stop_token_ids=[eos], min_new_tokens=len(out.tokens) + 3, temperature=1.5)
    assert eos not in blocked.tokens[: len(out.tokens) + 3]
    assert len(blocked.tokens) >= len(out.tokens) + 3


def test_logprobs_are_the_models_distribution():
    step = hashed_model(30, seed=1)
    out = ld.generate(step, [0, 1], max_new_tokens=8, seed=4, logprobs=3, top_k=5)
    seq = [0, 1]
    for t, token in enumerate(out.tokens):
        lp = ld.log_softmax(step(np.array(seq)))
        assert out.token_logprobs[t] == pytest.approx(float(lp[token]), abs=1e-5)
        best = np.argsort(-lp, kind="stable")[:3]
        assert list(out.top_logprobs[t]) == [int(b) for b in best]
        assert list(out.top_logprobs[t].values()) == pytest.approx([float(lp[b]) for b in best], abs=1e-5)
        seq.append(token)


def test_batched_step_function_is_called_once_a_step_with_every_running_sequence():
    step = hashed_model(40, seed=4)
    calls = []

    def batched(sequences):
        calls.append([list(s) for s in sequences])
        return np.stack([step(s) for s in sequences])

    prompts = [[1, 2, 3], [7]]
    kw = dict(max_new_tokens=12, seed=8, n=2, stop_token_ids=[0], logprobs=2, **SAMPLING)
    want = ld.generate(step, prompts, **kw)
    got = ld.generate(batched, prompts, batched=True, **kw)
    assert [[(o.tokens, o.token_logprobs, o.top_logprobs) for o in g] for g in got] == \
           [[(o.tokens, o.token_logprobs, o.top_logprobs) for o in g] for g in want]
    lengths = [len(o.tokens) for g in want for o in g]
    assert len(calls) == 1 + max(lengths)  # one call to learn V, then one per step
    assert [len(c) for c in calls[1:]] == [sum(n > t for n in lengths) for t in range(max(lengths))]
    assert calls[1] == [[1, 2, 3], [1, 2, 3], [7], [7]]
    # contrastive decoding with a batched expert and amateur
    amateur = hashed_model(40, seed=5)
    contrastive = dict(max_new_tokens=8, temperature=0, amateur_model=amateur, contrastive_alpha=0.2)
    assert ld.generate(lambda seqs: np.stack([step(s) for s in seqs]), prompts, batched=True,
                       **{**contrastive, "amateur_model": lambda seqs: np.stack([amateur(s) for s in seqs])}) == \
           ld.generate(step, prompts, **contrastive)
    with pytest.raises(ValueError, match=r"a batched step_fn must return \(sequences, V\) logits, got ndarray of shape \(40,\)"):
        ld.generate(lambda seqs: step(seqs[0]), prompts, batched=True)  # one row, not a batch of them
    with pytest.raises(ValueError, match=r"must return \(2, 40\) logits for 2 sequences, got shape \(1, 40\)"):
        ld.generate(lambda seqs: np.stack([step(s) for s in seqs[:1]]), prompts, batched=True, max_new_tokens=2)


def test_stream_yields_the_same_tokens():
    step = hashed_model(32, seed=2)
    full = ld.generate(step, [5], max_new_tokens=9, seed=11)
    chunks = list(ld.generate(step, [5], max_new_tokens=9, seed=11, stream=True))
    assert [c.token for c in chunks] == full.tokens
    assert all(c.index == 0 for c in chunks)
    # sequences of a batch end at different steps (stop token 0) or at the length limit, each
    # chunk with its log-probs
    kw = dict(max_new_tokens=12, seed=5, n=2, logprobs=3, stop_token_ids=[0], temperature=1.5)
    outs = ld.generate(step, [[5], [6, 7]], **kw)
    assert {o.finish_reason for group in outs for o in group} == {"stop", "length"}
    assert_stream_equals(list(ld.generate(step, [[5], [6, 7]], stream=True, **kw)), [o for group in outs for o in group])


class LetterTokenizer:
    """A tokenizer of one's own, with just what generate() asks for: ids 2.. are letters "a"...
    (0 and 1, BOS and EOS, have no text), one of them two bytes."""

    bos_id, eos_id = 0, 1

    def encode(self, text, add_bos=True):
        return [0] * add_bos + [ord(c) - 95 for c in text]

    def decode(self, ids):
        raise AssertionError("generate() reads token_bytes, as its streams do")

    def token_bytes(self, token):
        return b"" if token < 2 else ("\u00e9" if token == 7 else chr(95 + token)).encode()


def test_a_tokenizer_of_ones_own_streams_the_text_of_its_token_bytes():
    """.text, stream chunks and stop strings all read token_bytes (chunks were "" for a tokenizer
    without lmdecode's stream_decoder); a tokenizer= without token_bytes is a TypeError."""
    step = hashed_model(32, seed=4)
    for stop in (None, "zzz"):
        kw = dict(max_new_tokens=20, seed=3, tokenizer=LetterTokenizer(), stop=stop, stop_token_ids=[])
        out = ld.generate(step, "bc", **kw)
        assert out.prompt_tokens == [0, 3, 4]
        assert out.text == b"".join(LetterTokenizer().token_bytes(t) for t in out.tokens).decode()
        assert len(out.text) > 10
        assert_stream_equals(list(ld.generate(step, "bc", stream=True, **kw)), [out])
    with pytest.raises(TypeError, match="tokenizer must have token_bytes\\(id\\) .* got int"):
        ld.generate(step, [1], tokenizer=5, stop="a")


def test_constraints_from_sampling_keywords():
    step = hashed_model(20, seed=6)
    out = ld.generate(step, [0], max_new_tokens=15, seed=2, allowed_tokens=[3, 4, 5], banned_tokens=[4])
    assert set(out.tokens) <= {3, 5}


def test_bad_arguments():
    step = hashed_model(10)
    with pytest.raises(ValueError, match="max_new_tokens"):
        ld.generate(step, [1], max_new_tokens=-1)
    with pytest.raises(TypeError, match="unknown keyword"):
        ld.generate(step, [1], top_q=0.5)
    with pytest.raises(TypeError, match="tokenizer"):
        ld.generate(step, "text prompt")
    with pytest.raises(ValueError, match="top_p"):
        ld.generate(step, [1], top_p=2.0)
    with pytest.raises(ValueError, match=r"prompt 0 holds token id 11 at position 0, outside the vocabulary \[0, 10\)"):
        ld.generate(step, [11])
    with pytest.raises(ValueError, match=r"prompt 2 holds token id -1 at position 1, outside the vocabulary \[0, 10\)"):
        ld.generate(step, [[1], [2, 3], [4, -1, 10]])
    with pytest.raises(TypeError, match="context"):
        ld.generate(step, [1], context=[1, 2])
    with pytest.raises(TypeError, match=r"stop must be a non-empty string or a list of them, got 5"):
        ld.generate(step, [1], stop=5)
    # a list holding a non-string is a TypeError too (it was a ValueError), an empty string a ValueError
    with pytest.raises(TypeError, match=r"stop must be a non-empty string or a list of them, got \['a', 5\]"):
        ld.generate(step, [1], stop=["a", 5])
    with pytest.raises(ValueError, match=r"stop must be a non-empty string or a list of them, got \['a', ''\]"):
        ld.generate(step, [1], stop=["a", ""])
    with pytest.raises(ValueError, match=r"stop string 'a\\udce9' is not valid Unicode: '\\udce9' at index 1"):
        ld.generate(step, [1], stop=b"a\xe9".decode("utf-8", "surrogateescape"), tokenizer=LetterTokenizer())
    # ids no integer type holds, or bools among ids (NumPy read [1, True] as [1, 1])
    with pytest.raises(ValueError, match=r"a prompt holds token id 9223372036854775813, outside any vocabulary"):
        ld.generate(step, np.array([1, 2**63 + 5], dtype=np.uint64))
    with pytest.raises(ValueError, match=r"a prompt holds token id 1180591620717411303424, outside any vocabulary"):
        ld.generate(step, [1, 2**70])
    with pytest.raises(TypeError, match=r"a prompt must be a str or a sequence of token ids, got \[1, True\]"):
        ld.generate(step, [[1, True]])
    # a per-row value of the wrong length is named
    with pytest.raises(ValueError, match=r"^temperature has 2 values: per-row sampling values need one per sequence \(1\)"):
        ld.generate(step, [1], temperature=[1.0, 2.0])
    with pytest.raises(TypeError, match=r"stop_token_ids must be an int or a list of ints, got 2\.5"):
        ld.generate(step, [1], stop_token_ids=2.5)
    with pytest.raises(TypeError, match="seed must be an int, got 'a'"):
        ld.generate(step, [1], seed="a")
    with pytest.raises(ValueError, match=r"seed \(=-1\) must be in \[0, 2\*\*64\)"):
        ld.generate(step, [1], seed=-1)
    assert ld.generate(step, [1], max_new_tokens=0).tokens == []
    with pytest.raises(TypeError, match="step_fn must return an array of real-valued logits, got None"):
        ld.generate(lambda tokens: None, [1])
    with pytest.raises(ValueError, match=r"step_fn must return a 1-D array of logits, got list of shape \(1, 3\)"):
        ld.generate(lambda tokens: [[0.0, 1.0, 2.0]], [1])
    # a scalar is no vocabulary of one token (it generated token 0 again and again)
    for scalar in (1.0, np.float32(2.0), np.array(3.0)):
        with pytest.raises(ValueError, match="^step_fn must return an array of logits, got the scalar"):
            ld.generate(lambda tokens: scalar, [0])


def test_reprs_stay_one_line_however_long_the_output():
    long = ld.Generation(tokens=list(range(100, 130)), text="a b c", token_logprobs=[-1.0] * 30,
                         top_logprobs=[{}] * 30, finish_reason="length", prompt_tokens=[1])
    assert repr(long) == ("Generation(text='a b c', tokens=[100, 101, 102, 103, 104, 105, 106, 107, ... 22 more], "
                          "finish_reason='length')")
    short = ld.Generation(tokens=[5, 2], text=None, token_logprobs=[-0.5, -0.25], top_logprobs=[{}, {}],
                          finish_reason="stop", prompt_tokens=[1])
    assert repr(short) == "Generation(text=None, tokens=[5, 2], finish_reason='stop')"
    hyp = ld.Hypothesis(tokens=list(range(11)), logprob=-3.0, score=-3.0 / 11, token_logprobs=[-3.0 / 11] * 11,
                        text="xyz", finish_reason="length")
    assert repr(hyp) == ("Hypothesis(score=-0.2727, logprob=-3.0000, text='xyz', "
                         "tokens=[0, 1, 2, 3, 4, 5, 6, 7, ... 3 more])")


def test_ignore_eos_lets_the_models_eos_be_drawn_and_go_on():
    """vLLM's ignore_eos: the model's EOS neither ends a sequence nor is banned before
    min_new_tokens; stop_token_ids still stop. The same tokens as a model without an EOS."""
    from test_speculative import random_llama

    plain = random_llama(40, seed=7, scale=0.6)
    free = plain.generate([1, 2, 3], max_new_tokens=30, temperature=0)
    eos = free.tokens[4]
    assert free.tokens.index(eos) == 4 and len(set(free.tokens[5:]) - {eos}) > 3
    model = random_llama(40, seed=7, scale=0.6, eos_token_id=eos)
    stopped = model.generate([1, 2, 3], max_new_tokens=30, temperature=0)
    assert stopped.tokens == free.tokens[:5] and stopped.finish_reason == "stop"
    for kw in (dict(temperature=0), dict(temperature=0.8, seed=3, min_new_tokens=10)):
        for stream in (False, True):
            got = model.generate([1, 2, 3], max_new_tokens=30, ignore_eos=True, stream=stream, **kw)
            want = plain.generate([1, 2, 3], max_new_tokens=30, **kw)
            tokens = [c.token for c in got] if stream else got.tokens
            assert tokens == want.tokens and eos in tokens, kw
    other = free.tokens[8]
    out = model.generate([1, 2, 3], max_new_tokens=30, temperature=0, ignore_eos=True, stop_token_ids=[other])
    assert out.tokens == free.tokens[:free.tokens.index(other) + 1] and out.finish_reason == "stop"
    with pytest.raises(TypeError, match="ignore_eos must be True or False, got 'yes'"):
        model.generate([1], ignore_eos="yes")
    with pytest.raises(TypeError, match="stream must be True or False, got 1"):
        model.generate([1], stream=1)


def test_counts_past_int32_and_stop_ids_past_the_vocabulary_are_named():
    """They were OverflowErrors from the C core's argument parsing, naming nothing."""
    step = hashed_model(10)
    for name in ("max_new_tokens", "min_new_tokens", "logprobs"):
        with pytest.raises(ValueError, match=rf"^{name} \(=2147483648\) must be <= 2147483647"):
            ld.generate(step, [1], **{name: 2**31})
    with pytest.raises(ValueError, match=r"^stop_token_ids holds token id 1180591620717411303424, outside the "
                                         r"vocabulary \[0, 10\)"):
        ld.generate(step, [1], stop_token_ids=[2, 2**70])
    with pytest.raises(ValueError, match=r"^stop_token_ids holds token id 10, outside the vocabulary \[0, 10\)"):
        ld.generate(step, [1], stop_token_ids=10)
    for name in ("beam_width", "no_repeat_ngram_size", "min_new_tokens"):
        with pytest.raises(ValueError, match=rf"^{name} \(=2147483648\) must be <= 2147483647"):
            ld.beam_search(step, [1], **{name: 2**31})
