"""Decoding loops in C over lmdecode models: they must equal the same state
machines driven from Python with model.logits, and the transformers oracle."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lmdecode as ld
from test_generate import assert_stream_equals

MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"
PROMPT = [1, 403, 407, 261, 378]  # BOS "Once upon a time" in stories260K's vocabulary


@pytest.fixture(scope="module", params=["f32", "f16"])
def stories(request):
    """stories260K with either KV cache type: every loop must equal its Python-driven twin."""
    return ld.Model.load(MODELS / "stories260K.bin", kv_dtype=request.param)


def step_fn_of(model):
    return lambda tokens: model.logits(tokens)[-1]


SAMPLING = dict(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.1, frequency_penalty=0.2)


def test_generate_in_c_equals_the_python_driven_loop(stories):
    in_c = ld.generate(stories, PROMPT, max_new_tokens=40, seed=5, **SAMPLING)
    in_python = ld.generate(step_fn_of(stories), PROMPT, max_new_tokens=40, seed=5, stop_token_ids=[stories.config.eos_token_id], **SAMPLING)
    assert in_c.tokens == in_python.tokens
    assert in_c.finish_reason == in_python.finish_reason
    np.testing.assert_allclose(in_c.token_logprobs, in_python.token_logprobs, atol=1e-4)


def test_batch_and_samples_share_the_prompt_cache(stories):
    prompts = [PROMPT, [1, 403, 407], PROMPT[:2]]
    batch = ld.generate(stories, prompts, max_new_tokens=15, seed=3, n=2, temperature=1.0)
    alone = ld.generate(step_fn_of(stories), prompts, max_new_tokens=15, seed=3, n=2, temperature=1.0,
                        stop_token_ids=[stories.config.eos_token_id])
    for group_c, group_py in zip(batch, alone):
        assert [g.tokens for g in group_c] == [g.tokens for g in group_py]


def test_prompts_with_a_common_beginning_equal_each_alone(stories):
    """A batch whose prompts share a 40-token beginning (computed once, its cache forked: the
    C tests count the blocks) gives what the Python-driven loop gives, token for token and log
    probability for log probability, sampled with n = 2; greedy, each prompt what it gives
    alone; so does contrastive decoding, whose amateur shares the beginning too."""
    rng = np.random.default_rng(4)
    system = [1] + list(rng.integers(3, 512, 39))
    prompts = [system + [403, 407], system + [261], system + [403, 407, 261, 378], system + [261]]
    batch = stories.generate(prompts, max_new_tokens=12, seed=8, n=2, temperature=0.9, top_k=50)
    # the Python-driven loop over the same batch (each step a full recompute of each sequence)
    step = ld.generate(step_fn_of(stories), prompts, max_new_tokens=12, seed=8, n=2, temperature=0.9, top_k=50,
                       stop_token_ids=[stories.config.eos_token_id])
    for group, reference in zip(batch, step):
        assert [g.tokens for g in group] == [g.tokens for g in reference]
        for g, r in zip(group, reference):
            np.testing.assert_allclose(g.token_logprobs, r.token_logprobs, atol=1e-4)
    greedy = stories.generate(prompts, max_new_tokens=12, temperature=0)
    for prompt, got in zip(prompts, greedy):
        assert got.tokens == stories.generate(prompt, max_new_tokens=12, temperature=0).tokens
    amateur = ld.Model.load(MODELS / "stories260K.bin", kv_dtype=stories.kv_dtype, dtype="bf16")
    contrastive = stories.generate(prompts, max_new_tokens=12, temperature=0, amateur_model=amateur)
    for prompt, got in zip(prompts, contrastive):
        assert got.tokens == stories.generate(prompt, max_new_tokens=12, temperature=0, amateur_model=amateur).tokens


@pytest.fixture(scope="module")
def stories_f32():
    return ld.Model.load(MODELS / "stories260K.bin")


@settings(max_examples=40, deadline=None, derandomize=True)
@given(data=st.data())
def test_any_batch_of_prompts_decodes_as_each_alone(stories_f32, data):
    """Batches of prompts around the sharing threshold: one or two groups, each with a common
    beginning of 12 to 20 tokens (shared from 16), tails of 0 to 3 tokens (a prompt may be all
    beginning), the groups' prompts mixed, repeats next to each other or apart, n = 1 or 2.
    Greedy, each prompt's output is what it gives alone."""
    model = stories_f32
    heads = []
    for group in range(data.draw(st.integers(1, 2), label="groups")):
        common = data.draw(st.integers(12, 20), label=f"common {group}")
        heads.append([1] + data.draw(st.lists(st.integers(3, 511), min_size=common - 1, max_size=common - 1),
                                     label=f"head {group}"))
    tails = data.draw(st.lists(st.lists(st.integers(3, 511), max_size=3), min_size=1, max_size=5), label="tails")
    prompts = [heads[data.draw(st.integers(0, len(heads) - 1), label="group")] + tail for tail in tails]
    if data.draw(st.booleans(), label="repeat"):
        prompts.insert(data.draw(st.integers(0, len(prompts)), label="at"), list(prompts[0]))
    n = data.draw(st.integers(1, 2), label="n")
    batch = model.generate(prompts, max_new_tokens=6, temperature=0, n=n, stop_token_ids=[])
    for prompt, got in zip(prompts, batch):
        want = model.generate(prompt, max_new_tokens=6, temperature=0, stop_token_ids=[])
        for g in (got if n > 1 else [got]):
            assert g.tokens == want.tokens
            np.testing.assert_array_equal(g.token_logprobs, want.token_logprobs)


def test_stream_yields_the_tokens_of_the_full_call(stories):
    full = stories.generate(PROMPT, max_new_tokens=12, seed=9, temperature=0.7)
    chunks = list(stories.generate(PROMPT, max_new_tokens=12, seed=9, temperature=0.7, stream=True))
    assert_stream_equals(chunks, [full])
    # a batch whose sequences stop (at EOS or ".", or at stop strings) at different steps or run
    # to the length limit, with top log-probs
    prompts = ["Once upon a time", "The dog", "Lily"]
    full_stop = stories.tokenizer.encode(".", add_bos=False)[-1]
    for kw in (dict(max_new_tokens=14, seed=3, n=2, logprobs=2, temperature=1.0, stop_token_ids=[2, full_stop]),
               dict(max_new_tokens=14, seed=3, n=2, logprobs=2, temperature=1.0, stop=[" the", "."])):
        outs = [o for group in stories.generate(prompts, **kw) for o in group]
        assert {o.finish_reason for o in outs} == {"stop", "length"}
        assert_stream_equals(list(stories.generate(prompts, stream=True, **kw)), outs)


def test_stop_strings_end_the_text_where_they_begin(stories):
    free = stories.generate("Once upon a time", max_new_tokens=40, temperature=0)
    assert "Lily" in free.text  # greedy TinyStories text: ", there was a little girl named Lily..."
    for stop in (["Lily"], ["ily. She", "Lily"], ["named L"]):  # within one token, across tokens
        out = stories.generate("Once upon a time", max_new_tokens=40, temperature=0, stop=stop)
        first = min(free.text.index(s) for s in stop)
        assert out.finish_reason == "stop"
        assert out.text == free.text[:first]
        assert out.tokens == free.tokens[:len(out.tokens)]  # the token completing the stop string ends it
        decoded = stories.tokenizer.decode(out.tokens)
        assert any(s in decoded for s in stop)  # generation ran until a stop string was complete...
        assert not any(s in stories.tokenizer.decode(out.tokens[:-1]) for s in stop)  # ...and no further
        chunks = list(stories.generate("Once upon a time", max_new_tokens=40, temperature=0, stop=stop, stream=True))
        assert "".join(c.text for c in chunks) == out.text  # nothing of the stop string is ever shown
        assert [c.token for c in chunks] == out.tokens
    blocked = stories.generate("Once upon a time", max_new_tokens=40, temperature=0, stop=["Lily"],
                               min_new_tokens=len(free.tokens))
    assert blocked.tokens == free.tokens and blocked.finish_reason == "length"
    assert blocked.text == free.text  # an ignored occurrence does not cut the text
    streamed = stories.generate("Once upon a time", max_new_tokens=40, temperature=0, stop=["Lily"],
                                min_new_tokens=len(free.tokens), stream=True)
    assert "".join(c.text for c in streamed) == free.text
    # a held-back beginning ("named L" could start "named Lucy") is released once ruled out
    lucy = list(stories.generate("Once upon a time", max_new_tokens=40, temperature=0, stop=["named Lucy"], stream=True))
    assert "".join(c.text for c in lucy) == free.text


def test_generation_stops_at_the_context_length(stories):
    ctx = stories.config.context_length
    prompt = [1] + [403] * (ctx - 4)
    out = stories.generate(prompt, max_new_tokens=50, temperature=0, stop_token_ids=[])
    assert out.finish_reason == "length"
    assert len(prompt) + len(out.tokens) == ctx
    with pytest.raises(ValueError, match="context length"):
        stories.generate([1] * (ctx + 1), max_new_tokens=1)


def test_a_stream_ended_by_the_context_length_says_so_on_its_last_token(stories):
    """The token that fills the context length ends its sequence in the same step, so its
    chunk carries finish_reason and text a stop string might have begun is released: the loops
    ended such a sequence at the next step, which yields no token, so the stream had no last
    chunk and lost the held-back text ("ve a smil" for "ve a smile"). Plain, speculative and
    contrastive loops, alone and beside a sequence that goes on."""
    ctx = stories.config.context_length
    prompt = [1] + [300] * (ctx - 7)
    free = stories.generate(prompt, max_new_tokens=20, temperature=0)
    assert len(free.tokens) == 6 and free.finish_reason == "length"
    # a stop string that begins with the last token's text and never completes: held back until the end
    stop = stories.tokenizer.token_bytes(free.tokens[-1]).decode() + "Qzz"
    q8 = ld.Model.load(MODELS / "stories260K.bin", dtype="q8_0")
    for extra in (dict(), dict(draft_model=q8), dict(amateur_model=q8)):
        for kw in (dict(max_new_tokens=20, temperature=0, stop=stop, **extra),
                   dict(max_new_tokens=20, temperature=0, **extra)):
            outs = stories.generate([prompt, PROMPT], **kw)
            assert outs[0].finish_reason == "length" and len(outs[0].tokens) == 6, extra
            if not extra:
                assert outs[0].text == free.text
            assert_stream_equals(list(stories.generate([prompt, PROMPT], stream=True, **kw)), outs)


def test_beam_search_in_c_equals_the_step_function_search(stories):
    eos = stories.config.eos_token_id
    for width, lp, es in [(2, 1.0, False), (4, 0.6, True), (3, 2.0, "never")]:
        in_c = stories.beam_search(PROMPT, beam_width=width, max_new_tokens=25, length_penalty=lp, early_stopping=es,
                                   num_return_sequences=2)
        driven = ld.beam_search(step_fn_of(stories), PROMPT, beam_width=width, max_new_tokens=25, length_penalty=lp,
                                early_stopping=es, num_return_sequences=2, eos_token_id=eos)
        assert [h.tokens for h in in_c] == [h.tokens for h in driven]
        np.testing.assert_allclose([h.score for h in in_c], [h.score for h in driven], atol=1e-4)
        assert [h.finish_reason for h in in_c] == [h.finish_reason for h in driven]
    # a story's end ("." then EOS lies beyond 25 tokens) against an EOS the search meets
    assert stories.beam_search(PROMPT, beam_width=2, max_new_tokens=25)[0].finish_reason == "length"
    period = stories.tokenizer.encode(".", add_bos=False)[-1]
    (stopped,) = stories.beam_search(PROMPT, beam_width=2, max_new_tokens=25, eos_token_id=period)
    assert stopped.finish_reason == "stop" and stopped.tokens[-1] == period and len(stopped.tokens) < 25


def test_a_batch_of_beam_searches_gives_each_prompt_what_it_gives_alone(stories):
    """A list of prompts (texts and token ids of different lengths) runs one search each, all
    in one forward per step: each prompt's hypotheses are those of its search alone, bit for
    bit, and the step-function loop (one search after another) agrees. batch_id is the
    prompt's index."""
    prompts = ["Once upon a time", [1, 261, 378, 403, 407, 261, 378, 432], "The little dog"]
    kw = dict(beam_width=3, max_new_tokens=20, length_penalty=0.6, num_return_sequences=2)
    batch = stories.beam_search(prompts, **kw)
    assert len(batch) == 3 and all(len(hyps) == 2 for hyps in batch)
    for prompt, hyps in zip(prompts, batch):
        alone = stories.beam_search(prompt, **kw)
        assert [(h.tokens, h.score, h.logprob, h.token_logprobs, h.text) for h in hyps] == \
            [(h.tokens, h.score, h.logprob, h.token_logprobs, h.text) for h in alone]
    ids = [stories.tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
    driven = ld.beam_search(step_fn_of(stories), ids, eos_token_id=stories.config.eos_token_id, **kw)
    for hyps, ref in zip(batch, driven):
        assert [h.tokens for h in hyps] == [h.tokens for h in ref]
        np.testing.assert_allclose([h.score for h in hyps], [h.score for h in ref], atol=1e-4)
    # early stopping ends the searches at different steps; batch_id tells the prompts apart
    seen = set()

    def by_prompt(batch_id, input_ids):
        seen.add(batch_id)
        return [261, 378, 403, 13, 2] if batch_id == 1 else None

    constrained = stories.beam_search(prompts, beam_width=2, max_new_tokens=15, early_stopping=True,
                                      prefix_allowed_tokens_fn=by_prompt)
    assert seen == {0, 1, 2}
    assert set(constrained[1][0].tokens) <= {261, 378, 403, 13, 2}
    for i in (0, 2):
        assert constrained[i][0].tokens == stories.beam_search(prompts[i], beam_width=2, max_new_tokens=15,
                                                               early_stopping=True)[0].tokens
    assert stories.beam_search([PROMPT], beam_width=2, max_new_tokens=4)[0][0].tokens == \
        stories.beam_search(PROMPT, beam_width=2, max_new_tokens=4)[0].tokens
    with pytest.raises(ValueError, match=r"prompt 1 \(508 tokens\) \+ max_new_tokens \(8\) exceed"):
        stories.beam_search([PROMPT, [1] * 508], max_new_tokens=8)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        stories.beam_search([PROMPT, []], max_new_tokens=8)
    with pytest.raises(TypeError, match="step function takes token ids"):
        ld.beam_search(step_fn_of(stories), "Once upon a time")
    for call in (stories.beam_search, stories.generate):  # before the C loop reads the concatenated prompts
        with pytest.raises(ValueError, match=r"prompt 1 holds token id 600 at position 1, outside the vocabulary"):
            call([PROMPT, [1, 600]], max_new_tokens=2)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(data=st.data())
def test_any_batch_of_beam_searches_gives_what_each_gives_alone(stories_f32, data):
    """Batches of 1 to 4 prompts of 1 to 20 tokens (the same prompt twice, sometimes; all of them
    after a common beginning of 14 to 20 tokens, sometimes, shared from 16), any width, budget,
    length penalty and early-stopping rule, an EOS the model meets: each prompt's hypotheses
    are those of its search alone, bit for bit."""
    model = stories_f32
    head = data.draw(st.sampled_from([[], [1] + [7] * 13, [1] + list(range(100, 119))]), label="head")
    prompts = data.draw(st.lists(st.lists(st.integers(3, 511), min_size=1, max_size=20), min_size=1, max_size=4),
                        label="prompts")
    prompts = [head + p for p in prompts]
    if data.draw(st.booleans(), label="repeat"):
        prompts.append(list(prompts[0]))
    kw = dict(beam_width=data.draw(st.integers(1, 4), label="width"),
              max_new_tokens=data.draw(st.integers(1, 10), label="max_new_tokens"),
              length_penalty=data.draw(st.sampled_from([0.0, 0.6, 1.0, 2.0]), label="length_penalty"),
              early_stopping=data.draw(st.sampled_from([False, True, "never"]), label="early_stopping"),
              eos_token_id=data.draw(st.sampled_from([13, 261, 403]), label="eos"))
    kw["num_return_sequences"] = data.draw(st.integers(1, kw["beam_width"]), label="num_return_sequences")
    batch = model.beam_search(prompts, **kw)
    for prompt, hyps in zip(prompts, batch):
        alone = model.beam_search(prompt, **kw)
        assert [(h.tokens, h.score, h.logprob, h.token_logprobs) for h in hyps] == \
            [(h.tokens, h.score, h.logprob, h.token_logprobs) for h in alone]


def test_sequence_logprob_is_one_prefill(stories):
    context, continuation = [1, 403, 407], [261, 378, 432]
    s = stories.sequence_logprob(context, continuation)
    full = stories.logits(context + continuation)
    expect = ld.sequence_logprob(full[len(context) - 1 : -1], continuation)
    assert s.total == pytest.approx(expect.total, abs=1e-5)
    batch = stories.sequence_logprob(context, [continuation, [261], []])
    assert batch[0].total == pytest.approx(s.total, abs=1e-5)
    assert batch[1].total == pytest.approx(float(s.token_logprobs[0]), abs=1e-5)
    assert batch[2].total == 0.0


def test_sequence_logprob_says_whether_greedy_decoding_gives_the_continuation(stories):
    """is_greedy on a model: the greedy continuation is, one token changed anywhere (in the
    first pass, the shared context's last row, or an engine chunk after it) is not; the same
    as every target having its row's largest logit in model.logits."""
    chunked = ld.Model.load(MODELS / "stories260K.bin", max_batch=16)  # 40 tokens: three engine passes
    greedy = stories.generate(PROMPT, max_new_tokens=40, temperature=0, stop_token_ids=[]).tokens
    for model in (stories, chunked):
        assert model.sequence_logprob(PROMPT, greedy).is_greedy
        for at in (0, 20, 39):
            changed = greedy[:at] + [(greedy[at] + 1) % 512] + greedy[at + 1:]
            s = model.sequence_logprob(PROMPT, changed)
            logits = model.logits(PROMPT + changed)[len(PROMPT) - 1:-1]
            assert not s.is_greedy and not (logits.argmax(axis=1) == changed).all()
            batch = model.sequence_logprob(PROMPT, [greedy, changed, greedy[:1], changed[:1]])
            assert [b.is_greedy for b in batch] == [True, False, True, at != 0]


def test_every_loop_reports_the_same_log_probabilities(stories):
    # generate(), beam search and scoring share one log-softmax, and decoding's logits equal
    # prefill's bit for bit, so a token's log-probability is one number whichever call reports it
    sampled = stories.generate(PROMPT, max_new_tokens=30, seed=2, temperature=0.8, top_p=0.9)
    scored = stories.sequence_logprob(PROMPT, sampled.tokens)
    np.testing.assert_array_equal(sampled.token_logprobs, scored.token_logprobs)
    greedy = stories.generate(PROMPT, max_new_tokens=30, temperature=0, stop_token_ids=[])
    (beam,) = stories.beam_search(PROMPT, beam_width=1, max_new_tokens=30, eos_token_id=[])
    assert beam.tokens == greedy.tokens
    np.testing.assert_array_equal(beam.token_logprobs, greedy.token_logprobs)


def test_text_continuation_is_split_from_the_joint_encoding(stories):
    # llama2.c's encoder prefixes a space: " there was" alone would be [410 ' ', 383 ' there', 286],
    # but after a context the joint encoding gives [383, 286], as lm-evaluation-harness splits it.
    ctx = stories.tokenizer.encode("Once upon a time", add_bos=True)
    assert stories.tokenizer.encode(" there was", add_bos=False)[:2] == [410, 383]
    by_text = stories.sequence_logprob("Once upon a time", " there was")
    by_ids = stories.sequence_logprob(ctx, [383, 286])
    assert by_text.tokens == (383, 286)
    np.testing.assert_allclose(by_text.token_logprobs, by_ids.token_logprobs, rtol=0, atol=0)
    # the context's trailing space moves to the continuation (lm-evaluation-harness's _encode_pair):
    # "time " + "there" scored "there" as "▁there" after a "▁" of the context's (" time  there")
    moved = stories.sequence_logprob("Once upon a time ", "there was")
    assert moved.tokens == (383, 286) and moved.total == by_text.total


def lm_eval_split(tokenizer, context, continuation):
    """lm-evaluation-harness's _encode_pair (lm_eval/models/huggingface.py), with lmdecode's BOS."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_bos=True)
    context_ids = tokenizer.encode(context, add_bos=True)
    return context_ids, whole[len(context_ids):]


def test_text_continuations_split_as_lm_evaluation_harness_at_every_cut(stories):
    """Every cut of a text into context and continuation (mid-word cuts included) scores the
    tokens lm-evaluation-harness's split gives, after the context's own tokens; a cut whose
    continuation merges wholly into the context's last token is refused, not scored as log p = 0."""
    text = "Once upon a time, there was a little girl named Lily. She  liked\nto play."
    tok = stories.tokenizer
    refused = 0
    for cut in range(1, len(text)):
        context, continuation = text[:cut], text[cut:]
        context_ids, want = lm_eval_split(tok, context, continuation)
        if not want:
            with pytest.raises(ValueError, match="adds no tokens after the context's"):
                stories.sequence_logprob(context, continuation)
            refused += 1
            continue
        got = stories.sequence_logprob(context, continuation)
        assert got.tokens == tuple(want), (context, continuation)
        by_ids = stories.sequence_logprob(context_ids, want)
        np.testing.assert_array_equal(got.token_logprobs, by_ids.token_logprobs)
    assert 0 < refused < 20
    # a batch of text continuations shares the moved-space context; beside token ids the context stays whole
    batch = stories.sequence_logprob("Once upon a time ", ["there was", "a girl"])
    assert [b.tokens for b in batch] == [tuple(lm_eval_split(tok, "Once upon a time ", c)[1]) for c in ("there was", "a girl")]
    mixed = stories.sequence_logprob("Once upon a time ", ["there", [286]])
    assert mixed[0].tokens == (383,)
    assert mixed[0].total == stories.sequence_logprob(tok.encode("Once upon a time"), [383]).total
    assert mixed[1].total == stories.sequence_logprob(tok.encode("Once upon a time "), [286]).total
    # a conversation context: its template's text, then the reply's tokens from the joint text
    # (the reply alone was encoded with its own dummy-prefix space: "▁Lily" after the template's "\n")
    template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    chat = [{"role": "user", "content": "Once upon a time"}]
    rendered = tok.apply_chat_template(chat, chat_template=template, tokenize=False)
    assert rendered == "Once upon a time\n"
    original = tok.chat_template
    tok.chat_template = template
    try:
        reply = stories.sequence_logprob(chat, "Lily was happy.")
    finally:
        tok.chat_template = original
    whole = tok.encode("Once upon a time\nLily was happy.", add_bos=False, parse_special=True)
    assert reply.tokens == tuple(whole[len(tok.encode("Once upon a time", add_bos=False, parse_special=True)):])
    assert tok.decode(list(reply.tokens)) == "\nLily was happy."


def test_perplexity_of_the_model_matches_its_logits(stories):
    rng = np.random.default_rng(0)
    tokens = [1] + list(rng.integers(3, 512, size=100))
    r = stories.perplexity(tokens, window=64, stride=32, progress=False)
    assert r.n_tokens == 100
    # the first window by hand
    lp = ld.log_softmax(stories.logits(tokens[:64]))
    first = -sum(float(lp[i - 1, tokens[i]]) for i in range(1, 64))
    assert r.nll > first  # more tokens scored after the first window
    whole = stories.perplexity(tokens, window=stories.config.context_length, progress=False)
    lp_all = ld.log_softmax(stories.logits(tokens))
    assert whole.nll == pytest.approx(-sum(float(lp_all[i - 1, tokens[i]]) for i in range(1, len(tokens))), rel=1e-5)


def test_scoring_runs_in_engine_chunks_without_a_whole_logits_array():
    """Model scoring feeds max_batch tokens per engine pass and scores each pass's rows as
    they come: the same values as scoring model.logits of the whole window, bit for bit, and
    never a (window, vocab) array (a 2048-token window of a 128k vocabulary is 1 GB)."""
    import tracemalloc

    chunked = ld.Model.load(MODELS / "stories260K.bin", max_batch=16)
    rng = np.random.default_rng(3)
    tokens = [1] + [int(t) for t in rng.integers(3, 512, size=300)]
    from lmdecode.scoring import perplexity as perplexity_of_logits

    want = perplexity_of_logits(chunked.logits, tokens, window=256, stride=100, progress=False)
    tracemalloc.start()
    try:
        got = chunked.perplexity(tokens, window=256, stride=100, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (got.nll, got.n_tokens) == (want.nll, want.n_tokens) == (got.nll, 300)
    window_logits = 256 * chunked.config.vocab_size * 4
    assert peak < window_logits / 4, f"peak {peak} bytes against {window_logits} for one window's logits"
    context, continuation = tokens[:40], tokens[40:240]  # 199 rows: 13 engine passes of 16
    s = chunked.sequence_logprob(context, continuation)
    full = chunked.logits(context + continuation)
    np.testing.assert_array_equal(s.token_logprobs,
                                  ld.sequence_logprob(full[len(context) - 1 : -1], continuation).token_logprobs)


def test_forward_writes_logits_into_out(stories):
    """forward(out=...) fills the caller's array and returns views of it; an array of the wrong
    type, dtype, shape or layout, or a read-only one, is refused naming `out` before the cache
    changes."""
    toks = PROMPT + [432, 261]
    want = stories.logits(toks)
    out = np.full((len(toks), stories.config.vocab_size), np.nan, dtype=np.float32)
    got = stories.forward(toks, stories.new_cache(), logits="all", out=out)
    assert np.shares_memory(got, out)
    np.testing.assert_array_equal(out, want)
    rows = stories.forward(toks, stories.new_cache(), logits=np.array([0, 4]), out=out[:2])
    np.testing.assert_array_equal(rows, want[[0, 4]])
    readonly = np.zeros_like(out)
    readonly.flags.writeable = False
    transposed = np.zeros(out.shape[::-1], np.float32).T
    for bad, error in [(np.zeros(out.shape), ValueError), (out[:-1], ValueError), (transposed, ValueError),
                       (readonly, ValueError), (out.tolist(), TypeError)]:
        cache = stories.new_cache()
        with pytest.raises(error, match="out"):
            stories.forward(toks, cache, logits="all", out=bad)
        assert len(cache) == 0


def test_scoring_keeps_its_cache_and_logits_between_calls_without_mixing_them(stories):
    """sequence_logprob, perplexity and logits reuse one KV cache and one logits buffer per
    model and thread (fresh memory every call cost page faults): later calls, calls from other
    threads at the same time, and a call after an interrupted one (its fork still alive) give
    what a model that never scored before gives."""
    import threading

    rng = np.random.default_rng(11)
    cases = [([1] + [int(t) for t in rng.integers(3, 512, size=n)], [int(t) for t in rng.integers(3, 512, size=m)])
             for n, m in [(3, 300), (200, 5), (40, 120), (1, 510)]]

    def fresh_results():
        model = ld.Model.load(MODELS / "stories260K.bin", kv_dtype=stories.kv_dtype)
        return [model.sequence_logprob(c, x).token_logprobs for c, x in cases]

    want = fresh_results()
    got = [stories.sequence_logprob(c, x).token_logprobs for c, x in cases]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    kept = stories._scoring_scratch.seq
    assert kept is not None
    stories.perplexity(cases[0][0] + cases[0][1], window=128, stride=64, progress=False)
    stories.logits(cases[1][0])
    assert stories._scoring_scratch.seq is kept  # one cache served every call
    # a fork left alive (as by an interrupted call): the next call takes a new cache
    held = kept.fork()
    np.testing.assert_array_equal(stories.sequence_logprob(*cases[2]).token_logprobs, want[2])
    assert stories._scoring_scratch.seq is not kept
    del held
    errors = []

    def score(k):
        try:
            for i in range(6):
                c, x = cases[(k + i) % len(cases)]
                np.testing.assert_array_equal(stories.sequence_logprob(c, x).token_logprobs, want[(k + i) % len(cases)])
        except AssertionError as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=score, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_default_max_batch_follows_the_run_state_budget():
    """Without max_batch, a model takes 256 tokens per engine pass, or more while a pass's run
    state stays within 4 MB (capped by the context length and 1024): stories260K's 511-token
    scoring is then one pass. max_batch given is kept."""
    from lmdecode.model import default_max_batch

    assert ld.Model.load(MODELS / "stories260K.bin")._max_batch == 512
    assert ld.Model.load(MODELS / "stories260K.bin", max_batch=100)._max_batch == 100
    llama_110m = dict(dim=768, hidden_dim=2048, n_heads=12, n_kv_heads=12, head_dim=64, context_length=2048)
    assert default_max_batch(llama_110m) == 256  # 37 kB a token
    tiny = dict(dim=64, hidden_dim=172, n_heads=8, n_kv_heads=4, head_dim=8)
    assert default_max_batch({**tiny, "context_length": 4096}) == 1024
    assert default_max_batch({**tiny, "context_length": 100}) == 256
    middling = dict(dim=256, hidden_dim=688, n_heads=4, n_kv_heads=4, head_dim=64, context_length=4096)
    assert default_max_batch(middling) == (4 << 20) // (4 * (3 * 256 + 2 * 8 * 64 + 2 * 688 + 64)) == 324


def test_a_scored_model_is_freed_with_its_last_reference():
    """The kept scoring buffers hold no reference to the model: dropping it frees its weights
    at once, not at some later garbage collection."""
    import gc
    import weakref

    model = ld.Model.load(MODELS / "stories260K.bin")
    model.sequence_logprob(PROMPT, [432, 261])
    model.perplexity(PROMPT * 20, window=64, progress=False)
    gone = weakref.ref(model)
    gc.disable()
    try:
        del model
        assert gone() is None
    finally:
        gc.enable()


@pytest.fixture(scope="module")
def model_60mb():
    """A random 60 MB Llama (dim 512, 4 layers) with a 4096-token context: about a millisecond
    a decoded token, so thousands of tokens are seconds of work."""
    rng = np.random.default_rng(0)
    dim, hidden, layers, vocab = 512, 1536, 4, 1024
    names = {"model.embed_tokens.weight": (vocab, dim), "lm_head.weight": (vocab, dim), "model.norm.weight": (dim,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        names.update({p + "self_attn.q_proj.weight": (dim, dim), p + "self_attn.k_proj.weight": (dim, dim),
                      p + "self_attn.v_proj.weight": (dim, dim), p + "self_attn.o_proj.weight": (dim, dim),
                      p + "mlp.gate_proj.weight": (hidden, dim), p + "mlp.up_proj.weight": (hidden, dim),
                      p + "mlp.down_proj.weight": (dim, hidden), p + "input_layernorm.weight": (dim,),
                      p + "post_attention_layernorm.weight": (dim,)})
    weights = {k: rng.normal(0, 0.02, shape).astype(np.float32) for k, shape in names.items()}
    config = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=vocab, hidden_size=dim,
                  intermediate_size=hidden, num_hidden_layers=layers, num_attention_heads=8, max_position_embeddings=4096)
    return ld.Model.from_numpy(config, weights)


def _interrupted_after(seconds, fn):
    """Runs fn with Ctrl-C (_thread.interrupt_main, as a notebook's interrupt button) sent after
    `seconds`; returns how long fn ran before KeyboardInterrupt ended it."""
    import _thread
    import signal
    import threading
    import time

    # Python's own handler even where the test runner was started with SIGINT ignored (a shell's
    # background job), in which case interrupt_main does nothing
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(seconds, _thread.interrupt_main)
    t0 = time.perf_counter()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            fn()
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    return time.perf_counter() - t0


@pytest.mark.parametrize("search", ["generate", "beam_search"])
def test_long_decoding_loops_stop_at_ctrl_c(model_60mb, search):
    """generate() and beam_search() run their loops in C with the GIL released; Ctrl-C must
    still stop them within a few tens of milliseconds, not after the whole loop."""
    import time

    if search == "generate":
        def run(n_new):
            return model_60mb.generate([1, 2, 3], max_new_tokens=n_new, temperature=0, stop_token_ids=[])
    else:
        def run(n_new):
            return model_60mb.beam_search([1, 2, 3], beam_width=2, max_new_tokens=n_new, early_stopping="never")
    t0 = time.perf_counter()
    run(50)
    per_token = (time.perf_counter() - t0) / 50
    n_new = 4000  # seconds of work
    elapsed = _interrupted_after(0.3, lambda: run(n_new))
    assert elapsed < 1.0 and elapsed < 0.5 * n_new * per_token, (elapsed, per_token)


# ----------------------------------------------------------------------------
# transformers oracle on a random-weight Llama loaded by lmdecode
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_pair():
    from oracle import require_transformers

    torch, transformers = require_transformers()
    torch.manual_seed(1)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rope_theta=5000.0, tie_word_embeddings=False,
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    eos = 5
    with torch.no_grad():
        hf.lm_head.weight.mul_(6.0)
        prompts = torch.from_numpy(np.random.default_rng(0).integers(0, 64, size=(8, 8)))
        hidden = hf.model(prompts).last_hidden_state.mean(dim=(0, 1))
        hf.lm_head.weight[eos] = 4.0 * hidden / hidden.norm() ** 2  # EOS gets real mass
    weights = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
    ours = ld.Model.from_numpy(config.to_dict(), weights)
    return torch, hf, ours, eos


@pytest.mark.oracle
@pytest.mark.parametrize("width,length_penalty,early_stopping", [(2, 1.0, False), (4, 0.0, True), (3, 2.0, "never"), (4, 0.6, False)])
def test_model_beam_search_matches_transformers(hf_pair, width, length_penalty, early_stopping):
    torch, hf, ours, eos = hf_pair
    prompt = [3, 9, 27, 14, 50]
    out = hf.generate(torch.tensor([prompt]), num_beams=width, do_sample=False, max_new_tokens=12, length_penalty=length_penalty,
                      early_stopping=early_stopping, num_return_sequences=2, eos_token_id=eos, pad_token_id=eos,
                      output_scores=True, return_dict_in_generate=True)
    hyps = ours.beam_search(prompt, beam_width=width, max_new_tokens=12, length_penalty=length_penalty,
                            early_stopping=early_stopping, num_return_sequences=2, eos_token_id=eos)
    for h, seq, score in zip(hyps, out.sequences.numpy(), out.sequences_scores.numpy()):
        generated = list(seq[len(prompt):])
        assert generated[: len(h.tokens)] == h.tokens
        assert h.score == pytest.approx(float(score), abs=1e-4)


@pytest.mark.oracle
def test_model_sequence_logprob_matches_transformers(hf_pair):
    torch, hf, ours, _ = hf_pair
    context, continuation = [3, 9, 27, 14], [50, 2, 61, 7, 7]
    with torch.no_grad():
        logits = hf(torch.tensor([context + continuation])).logits[0].double()
    lp = torch.log_softmax(logits, -1).numpy()
    expect = [lp[len(context) - 1 + i, t] for i, t in enumerate(continuation)]
    s = ours.sequence_logprob(context, continuation)
    np.testing.assert_allclose(s.token_logprobs, expect, atol=1e-4)
    assert s.total == pytest.approx(sum(expect), abs=1e-4)


@pytest.mark.oracle
def test_model_greedy_generate_matches_transformers(hf_pair):
    torch, hf, ours, eos = hf_pair
    prompt = [3, 9, 27, 14, 50]
    out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=20, eos_token_id=eos, pad_token_id=eos)
    expect = list(out[0, len(prompt):].numpy())
    got = ours.generate(prompt, max_new_tokens=20, temperature=0, stop_token_ids=[eos])
    assert got.tokens == expect[: len(got.tokens)]
    assert all(t == eos for t in expect[len(got.tokens):])


@pytest.mark.oracle
def test_model_constrained_greedy_generate_matches_transformers(hf_pair):
    torch, hf, ours, eos = hf_pair
    prompt = [3, 9, 27, 14, 50]

    def allowed(batch_id, input_ids):  # changes with the length, EOS allowed at odd lengths
        return [t for t in range(64) if t % 4 == len(input_ids) % 4] + ([eos] if len(input_ids) % 2 else [])

    stops = [eos, ours.config.eos_token_id]  # lmdecode also stops at the config's EOS
    out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=20, eos_token_id=stops, pad_token_id=eos,
                      prefix_allowed_tokens_fn=lambda b, ids: allowed(b, ids.tolist()))
    expect = list(out[0, len(prompt):].numpy())
    got = ours.generate(prompt, max_new_tokens=20, temperature=0, stop_token_ids=[eos], prefix_allowed_tokens_fn=allowed)
    assert got.tokens == expect[: len(got.tokens)]
    assert all(t == eos for t in expect[len(got.tokens):])  # transformers pads a finished row
    assert len(got.tokens) > 5 and all(t in allowed(0, prompt + got.tokens[:i]) for i, t in enumerate(got.tokens))


@pytest.mark.oracle
@pytest.mark.parametrize("width,length_penalty", [(2, 1.0), (4, 0.6)])
def test_model_constrained_beam_search_matches_transformers(hf_pair, width, length_penalty):
    torch, hf, ours, eos = hf_pair
    prompt = [3, 9, 27, 14, 50]

    def allowed(batch_id, input_ids):  # a third of the vocabulary, changing with the length; EOS always
        return sorted({t for t in range(64) if t % 3 == len(input_ids) % 3} | {eos})

    out = hf.generate(torch.tensor([prompt]), num_beams=width, do_sample=False, max_new_tokens=12,
                      length_penalty=length_penalty, num_return_sequences=2, eos_token_id=eos, pad_token_id=eos,
                      output_scores=True, return_dict_in_generate=True,
                      prefix_allowed_tokens_fn=lambda b, ids: allowed(b, ids.tolist()))
    hyps = ours.beam_search(prompt, beam_width=width, max_new_tokens=12, length_penalty=length_penalty,
                            num_return_sequences=2, eos_token_id=eos, prefix_allowed_tokens_fn=allowed)
    plain = ours.beam_search(prompt, beam_width=width, max_new_tokens=12, length_penalty=length_penalty,
                             num_return_sequences=2, eos_token_id=eos)
    assert [h.tokens for h in hyps] != [h.tokens for h in plain]
    for h, seq, score in zip(hyps, out.sequences.numpy(), out.sequences_scores.numpy()):
        generated = list(seq[len(prompt):])
        assert generated[: len(h.tokens)] == h.tokens
        assert h.score == pytest.approx(float(score), abs=1e-4)
        assert all(t in allowed(0, prompt + h.tokens[:i]) for i, t in enumerate(h.tokens))


def test_token_inputs_that_are_no_token_ids_are_refused_naming_the_argument():
    """Nested sequences of different lengths, floats, text and mappings where token ids go:
    a TypeError or ValueError naming the argument, where NumPy's message named nothing and
    int() or an int64 cast read floats, digits, bytes and dict keys as other tokens."""
    model = ld.Model.load(MODELS / "stories260K.bin")
    ragged = [[1, 403], [407]]
    rectangular = r"must be a rectangular array \(rows of one length\)"
    with pytest.raises(ValueError, match="tokens " + rectangular):
        model.forward(ragged, model.new_cache(8))
    with pytest.raises(ValueError, match="tokens " + rectangular):
        model.logits(ragged)
    with pytest.raises(ValueError, match="logits " + rectangular):
        model.forward(PROMPT, model.new_cache(8), logits=[[0], [0, 1]])
    with pytest.raises(TypeError, match="context must be a str or a 1-D sequence of token ids"):
        model.sequence_logprob(ragged, [3])
    # ids outside the vocabulary are named by argument and position (the engine's message named
    # targets[1] or tokens[3], positions of context + continuation)
    with pytest.raises(ValueError, match=r"^continuation holds token id 900 at position 1, outside the vocabulary"):
        model.sequence_logprob([1, 403], [407, 900])
    with pytest.raises(ValueError, match=r"^context holds token id -3 at position 1, outside the vocabulary"):
        model.sequence_logprob([1, -3], [5])
    with pytest.raises(ValueError, match=r"^continuation 1 holds token id 600 at position 1"):
        model.sequence_logprob([1, 403], [[5], [6, 600]])
    with pytest.raises(TypeError, match="text_or_tokens must be a str or a 1-D sequence of token ids"):
        model.perplexity(ragged)
    with pytest.raises(TypeError, match=r"a prompt must be a str or a sequence of token ids, got \[\[3\]\]"):
        model.generate([PROMPT, [[3]]], max_new_tokens=2)
    with pytest.raises(TypeError, match="tokens must be a 1-D sequence of token ids"):
        ld.scoring.perplexity(lambda t: np.zeros((len(t), 4)), [1.5, 2.0, 3.0], window=4)
    with pytest.raises(TypeError, match=r"stop_token_ids must be an int or a list of ints, got \{2: 0\}"):
        model.generate(PROMPT, max_new_tokens=2, stop_token_ids={2: 0})
    for bad in (b"\x02", 2.0, "2"):
        with pytest.raises(TypeError, match="eos_token_id must be an int or a list of ints"):
            model.beam_search(PROMPT, max_new_tokens=2, eos_token_id=bad)
    assert model.beam_search(PROMPT, max_new_tokens=2, eos_token_id={2, 13})[0].tokens  # any collection of ints
    with pytest.raises(ValueError, match=r"step_fn's logits " + rectangular):
        ld.generate(lambda tokens: [[0.0, 1.0], [2.0]], [1])
    decode = model.tokenizer.decode
    assert decode(np.array(PROMPT)) == decode(PROMPT) == "Once upon a time"
    for bad in ([403.0, 407.0], "403", b"\x01", {403: 0}, [True]):
        with pytest.raises(TypeError, match="ids must be an int or a list of ints"):
            decode(bad)
    config = dict(model_type="llama", vocab_size=4, hidden_size=2, intermediate_size=2, num_hidden_layers=1,
                  num_attention_heads=1)
    with pytest.raises(TypeError, match="weights must be a dict of Hugging Face parameter names to arrays"):
        ld.Model.from_numpy(config, [[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"weights\['model.embed_tokens.weight'\] " + rectangular):
        ld.Model.from_numpy(config, {"model.embed_tokens.weight": [[1.0, 2.0], [3.0]]})


def test_beam_hypotheses_text_is_what_they_add_to_the_prompts_text(stories):
    """As generate's .text: decode(prompt) + hypothesis.text == decode(prompt + tokens), so after a
    prompt of BOS alone the text starts "Once", not " Once" (tokenizer.decode of the tokens alone
    kept the space)."""
    tok = stories.tokenizer
    for prompt in ("", "Once upon a time"):
        ids = tok.encode(prompt)
        for hyp in stories.beam_search(prompt, beam_width=2, max_new_tokens=8, num_return_sequences=2):
            assert tok.decode(ids) + hyp.text == tok.decode(ids + hyp.tokens)
            if not prompt:
                assert hyp.text[0].isalpha() and tok.decode(hyp.tokens) == " " + hyp.text
