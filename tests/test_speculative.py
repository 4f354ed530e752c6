"""Speculative decoding: the verification rule against hand-computed cases and chi-square
tests, and the C loop over two models against the target's own greedy output and against a
NumPy reference of the whole loop (tests/reference.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import stats

import lmdecode as ld
from lmdecode import _core

import reference
from test_generate import assert_stream_equals

MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"
PROMPT = [1, 403, 407, 261, 378]  # BOS "Once upon a time" in stories260K's vocabulary


def random_llama(vocab, seed, *, dim=64, layers=2, scale=0.3, context=256, eos_token_id=None):
    """A small random Llama; larger `scale` gives peakier next-token distributions."""
    rng = np.random.default_rng(seed)
    hidden = 2 * dim
    shapes = {"model.embed_tokens.weight": (vocab, dim), "lm_head.weight": (vocab, dim), "model.norm.weight": (dim,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (dim, dim), p + "self_attn.k_proj.weight": (dim // 2, dim),
                       p + "self_attn.v_proj.weight": (dim // 2, dim), p + "self_attn.o_proj.weight": (dim, dim),
                       p + "mlp.gate_proj.weight": (hidden, dim), p + "mlp.up_proj.weight": (hidden, dim),
                       p + "mlp.down_proj.weight": (dim, hidden), p + "input_layernorm.weight": (dim,),
                       p + "post_attention_layernorm.weight": (dim,)})
    weights = {k: (np.ones(s) if len(s) == 1 else rng.normal(0, scale, s)).astype(np.float32) for k, s in shapes.items()}
    config = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=vocab, hidden_size=dim,
                  intermediate_size=hidden, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=context)
    if eos_token_id is not None:
        config["eos_token_id"] = eos_token_id
    return ld.Model.from_numpy(config, weights)


@pytest.fixture(scope="module")
def stories():
    return ld.Model.load(MODELS / "stories260K.bin")


@pytest.fixture(scope="module")
def close_draft():
    """stories260K in q8_0: a draft that agrees with the f32 model most of the time."""
    return ld.Model.load(MODELS / "stories260K.bin", dtype="q8_0")


@pytest.fixture(scope="module")
def poor_draft():
    """A random model over stories260K's 512 tokens: its proposals are mostly rejected."""
    return random_llama(512, seed=7, context=512)


def one_hot_logprobs(vocab, token):
    row = np.full(vocab, -np.inf, dtype=np.float32)
    row[token] = 0.0
    return row


# ---------------------------------------------------------------------------- the rule


def test_rule_on_hand_computed_cases():
    p = np.log(np.array([[0.5, 0.3, 0.2]], dtype=np.float32))
    q = np.log(np.array([[0.2, 0.6, 0.2]], dtype=np.float32))
    # token 1: p/q = 0.5, kept for coins below it; the residual max(0, p - q) = (0.3, 0, 0) is token 0
    assert _core.speculative_verify([1], q, p, [[0.49, 0.7]]) == (1, -1)
    assert _core.speculative_verify([1], q, p, [[0.51, 0.7]]) == (0, 0)
    # token 0: p >= q, kept whatever the coin
    assert _core.speculative_verify([0], q, p, [[0.999999, 0.0]]) == (1, -1)
    # residual (0.3, 0, 0.1) / 0.4 after rejecting token 1 when p = (0.5, 0.3, 0.2), q = (0.2, 0.6, 0.1)... :
    p2 = np.log(np.array([[0.5, 0.2, 0.3]], dtype=np.float32))
    q2 = np.log(np.array([[0.2, 0.6, 0.2]], dtype=np.float32))
    # residual = (0.3, 0, 0.1): token 0 for coins below 0.75, token 2 above
    assert _core.speculative_verify([1], q2, p2, [[0.9, 0.74]]) == (0, 0)
    assert _core.speculative_verify([1], q2, p2, [[0.9, 0.76]]) == (0, 2)
    # the second of two proposals rejected: one kept
    pp = np.log(np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]], dtype=np.float32))
    qq = np.log(np.array([[0.2, 0.6, 0.2], [0.1, 0.8, 0.1]], dtype=np.float32))
    assert _core.speculative_verify([0, 1], qq, pp, [[0.5, 0.5], [0.2, 0.5]]) == (1, 2)


def test_greedy_rows_keep_exactly_the_targets_argmax():
    V = 5
    draft = np.stack([one_hot_logprobs(V, 3), one_hot_logprobs(V, 1)])
    same = np.stack([one_hot_logprobs(V, 3), one_hot_logprobs(V, 1), one_hot_logprobs(V, 4)])
    assert ld.speculative_accept([3, 1], draft, same, seed=0) == (2, 4)  # bonus: the third row's argmax
    other = np.stack([one_hot_logprobs(V, 3), one_hot_logprobs(V, 2), one_hot_logprobs(V, 4)])
    for seed in range(20):
        assert ld.speculative_accept([3, 1], draft, other, seed=seed) == (1, 2)


def test_first_token_is_distributed_as_the_target():
    rng = np.random.default_rng(0)
    V, N = 8, 20000
    p = rng.dirichlet(np.ones(V) * 0.7)
    q = rng.dirichlet(np.ones(V) * 0.7)
    lp, lq = np.log(p).astype(np.float32), np.log(q).astype(np.float32)
    counts = np.zeros(V)
    for seed in range(N):
        x = reference.draw(lq.astype(np.float64), ld.rng_uniform(seed, 0, 0, 1))
        kept, following = ld.speculative_accept([x], lq[None], np.stack([lp, lp]), seed=seed)
        counts[x if kept else following] += 1
    expected = N * np.exp(lp.astype(np.float64)) / np.exp(lp.astype(np.float64)).sum()
    assert stats.chisquare(counts, expected).pvalue > 1e-3
    # the draft alone is far from the target: the test could tell them apart
    assert stats.chisquare(counts, N * q).pvalue < 1e-6


def test_bonus_token_is_distributed_as_the_last_target_row():
    rng = np.random.default_rng(1)
    V, N = 6, 12000
    q = np.log(rng.dirichlet(np.ones(V))).astype(np.float32)
    bonus = rng.dirichlet(np.ones(V))
    target = np.stack([q, np.log(bonus).astype(np.float32)])  # p = q at the proposal: always kept
    counts = np.zeros(V)
    for seed in range(N):
        x = reference.draw(q.astype(np.float64), ld.rng_uniform(seed, 0, 0, 1))
        kept, following = ld.speculative_accept([x], q[None], target, seed=seed)
        assert kept == 1
        counts[following] += 1
    assert stats.chisquare(counts, N * bonus).pvalue > 1e-3


def test_accept_rejects_bad_input():
    V = 4
    row = np.log(np.full(V, 0.25, dtype=np.float32))
    with pytest.raises(ValueError, match="draft_tokens\\[0\\] \\(=4\\) is outside"):
        ld.speculative_accept([4], row[None], np.stack([row, row]), seed=0)
    with pytest.raises(ValueError, match="target_logprobs\\[1, 2\\] is nan"):
        bad = np.stack([row, row]); bad[1, 2] = np.nan
        ld.speculative_accept([1], row[None], bad, seed=0)
    with pytest.raises(ValueError, match="sum to 2"):
        ld.speculative_accept([1], (row + np.log(2))[None], np.stack([row, row]), seed=0)
    with pytest.raises(ValueError, match="1 draft tokens need draft_logprobs of 1 rows and target_logprobs of 2"):
        ld.speculative_accept([1], row[None], row[None], seed=0)
    with pytest.raises(ValueError, match="probability 0"):
        zero = np.array([np.log(0.5), np.log(0.5), -np.inf, -np.inf], dtype=np.float32)
        _core.speculative_verify([3], zero[None], row[None], [[0.5, 0.5]])
    with pytest.raises(ValueError, match="seed"):
        ld.speculative_accept([1], row[None], np.stack([row, row]), seed=-1)
    kept = row.copy()
    args = ([1], row[None], np.stack([row, row]))
    ld.speculative_accept(*args, seed=3)
    np.testing.assert_array_equal(args[1][0], kept)  # the caller's arrays are not modified


# ---------------------------------------------------------------------------- the C loop


@pytest.mark.parametrize("num_draft", [1, 3, 8])
def test_greedy_output_is_the_targets_token_for_token(stories, close_draft, poor_draft, num_draft):
    plain = stories.generate(PROMPT, max_new_tokens=70, temperature=0, stop_token_ids=[], logprobs=2)
    for draft in (close_draft, poor_draft):
        fast = stories.generate(PROMPT, max_new_tokens=70, temperature=0, stop_token_ids=[], logprobs=2,
                                draft_model=draft, num_draft_tokens=num_draft)
        assert fast.tokens == plain.tokens
        np.testing.assert_array_equal(fast.token_logprobs, plain.token_logprobs)
        assert fast.top_logprobs == plain.top_logprobs
        assert 0 <= fast.draft_tokens_accepted <= fast.draft_tokens_proposed
    close = stories.generate(PROMPT, max_new_tokens=70, temperature=0, stop_token_ids=[], draft_model=close_draft,
                             num_draft_tokens=num_draft)
    poor = stories.generate(PROMPT, max_new_tokens=70, temperature=0, stop_token_ids=[], draft_model=poor_draft,
                            num_draft_tokens=num_draft)
    # a model agrees with its own q8_0 copy far more often than with random weights
    assert close.draft_tokens_accepted / close.draft_tokens_proposed > 0.8
    assert poor.draft_tokens_accepted / poor.draft_tokens_proposed < 0.3
    assert plain.draft_tokens_proposed is None


def test_batches_budgets_and_stops_keep_the_targets_greedy_output(stories, close_draft):
    prompts = [PROMPT, [1, 403], PROMPT[:3] + [600 % 512]]
    eos = stories.config.eos_token_id
    for max_new, min_new in ((1, 0), (2, 0), (37, 0), (90, 30)):
        kw = dict(max_new_tokens=max_new, min_new_tokens=min_new, temperature=0, n=2, stop_token_ids=[eos, 13])
        plain = stories.generate(prompts, **kw)
        fast = stories.generate(prompts, draft_model=close_draft, num_draft_tokens=5, **kw)
        for group_plain, group_fast in zip(plain, fast):
            for a, b in zip(group_plain, group_fast):
                assert (a.tokens, a.finish_reason, a.text) == (b.tokens, b.finish_reason, b.text)


def test_prompts_with_a_common_beginning_keep_the_targets_greedy_output(stories, close_draft):
    """Distinct prompts in two groups, each sharing its first 40 or 25 tokens: the first round
    computes each beginning once in each model (the C tests count the blocks); the output is
    plain greedy's."""
    rng = np.random.default_rng(6)
    system = [1] + [int(t) for t in rng.integers(3, 512, 39)]
    other = [1] + [int(t) for t in rng.integers(3, 512, 24)]
    prompts = [system + [403, 407], other + [261], system + [261], other + [378, 403], system + [403, 407, 261, 378]]
    plain = stories.generate(prompts, max_new_tokens=20, temperature=0)
    fast = stories.generate(prompts, max_new_tokens=20, temperature=0, draft_model=close_draft, num_draft_tokens=4)
    assert [g.tokens for g in fast] == [g.tokens for g in plain]


def test_the_context_length_ends_it_as_without_a_draft(stories, close_draft):
    long_prompt = list(np.random.default_rng(2).integers(3, 512, size=stories.config.context_length - 6))
    plain = stories.generate(long_prompt, max_new_tokens=50, temperature=0, stop_token_ids=[])
    fast = stories.generate(long_prompt, max_new_tokens=50, temperature=0, stop_token_ids=[], draft_model=close_draft,
                            num_draft_tokens=4)
    assert fast.tokens == plain.tokens and len(fast.tokens) == 6
    assert fast.finish_reason == plain.finish_reason == "length"


SAMPLING = dict(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.1, frequency_penalty=0.2)


@pytest.mark.parametrize("draft_name", ["close", "poor"])
def test_sampling_equals_the_numpy_reference_loop(stories, close_draft, poor_draft, draft_name):
    draft = close_draft if draft_name == "close" else poor_draft
    for seed in (0, 1):
        got = stories.generate(PROMPT, max_new_tokens=30, seed=seed, draft_model=draft, num_draft_tokens=3,
                               min_new_tokens=5, **SAMPLING)
        want, reason = reference.speculative_generate(
            lambda toks: stories.logits(toks)[-1], lambda toks: draft.logits(toks)[-1], PROMPT, num_draft=3,
            max_new=30, seed=seed, stop_ids=[stories.config.eos_token_id], min_new=5, **SAMPLING)
        assert got.tokens == want and got.finish_reason == reason


def test_samples_of_one_prompt_share_its_prefill_and_draw_as_each_alone(stories, close_draft):
    # n samples (and a batch whose prompts repeat) prefill each distinct prompt once and fork
    # the caches; sample k still draws what the reference loop draws with stream k
    prompts = [PROMPT, PROMPT, [1, 403], PROMPT]
    got = stories.generate(prompts, max_new_tokens=20, seed=4, n=2, draft_model=close_draft, num_draft_tokens=3,
                           stop_token_ids=[], **SAMPLING)
    for p, group in enumerate(got):
        for i, out in enumerate(group):
            want, reason = reference.speculative_generate(
                lambda toks: stories.logits(toks)[-1], lambda toks: close_draft.logits(toks)[-1], prompts[p],
                num_draft=3, max_new=20, seed=4, stream=2 * p + i, **SAMPLING)
            assert out.tokens == want and out.finish_reason == reason == "length"
    assert len({tuple(out.tokens) for group in got for out in group}) > 3  # the streams differ


def test_sampled_tokens_follow_the_targets_distribution():
    # a 12-token vocabulary: the exact distribution of the first two tokens is computable
    target, draft = random_llama(12, seed=1, scale=0.5), random_llama(12, seed=2, scale=0.5)
    prompt, N = [3, 5], 6000
    runs = target.generate(prompt, max_new_tokens=2, seed=11, n=N, temperature=1.0, draft_model=draft,
                           num_draft_tokens=2, stop_token_ids=[])
    counts = np.zeros((12, 12))
    for r in runs:
        counts[r.tokens[0], r.tokens[1]] += 1
    first = ld.log_softmax(target.logits(prompt)[-1]).astype(np.float64)
    expected = np.array([np.exp(first[a]) * np.exp(ld.log_softmax(target.logits(prompt + [a])[-1]).astype(np.float64))
                         for a in range(12)]) * N
    keep = expected > 5  # chi-square needs expected counts of 5 or more; the rest pooled
    observed = np.append(counts[keep], counts[~keep].sum())
    wanted = np.append(expected[keep], expected[~keep].sum())
    assert stats.chisquare(observed, wanted * observed.sum() / wanted.sum()).pvalue > 1e-3
    assert sum(r.draft_tokens_proposed for r in runs) == N  # one proposal each: the second token is the bonus or a fix


def test_same_seed_same_tokens_whatever_the_threads(stories, close_draft):
    before = ld.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            ld.set_num_threads(threads)
            outs.append(stories.generate([PROMPT, PROMPT[:2]], max_new_tokens=40, seed=9, draft_model=close_draft,
                                         **SAMPLING))
        assert [o.tokens for o in outs[0]] == [o.tokens for o in outs[1]]
    finally:
        ld.set_num_threads(before)


def test_stream_yields_the_full_calls_tokens_and_text(stories, close_draft):
    kw = dict(max_new_tokens=60, seed=4, draft_model=close_draft, num_draft_tokens=4, temperature=0.7)
    full = stories.generate("Once upon a time", **kw)
    chunks = list(stories.generate("Once upon a time", stream=True, **kw))
    assert_stream_equals(chunks, [full])
    stopped = stories.generate("Once upon a time", stop=["Lily", "park"], **kw)
    streamed = list(stories.generate("Once upon a time", stop=["Lily", "park"], stream=True, **kw))
    assert_stream_equals(streamed, [stopped])
    assert stopped.finish_reason == "stop" and "Lily" not in stopped.text and "park" not in stopped.text


def test_bad_arguments_raise(stories, close_draft):
    with pytest.raises(TypeError, match="draft_model needs an lmdecode Model as the target"):
        ld.generate(lambda toks: np.zeros(512, np.float32), PROMPT, max_new_tokens=3, draft_model=close_draft)
    with pytest.raises(TypeError, match="draft_model must be an lmdecode Model"):
        stories.generate(PROMPT, max_new_tokens=3, draft_model=lambda toks: None)
    with pytest.raises(ValueError, match="vocabulary \\(16 tokens\\) differs from the target's \\(512\\)"):
        stories.generate(PROMPT, max_new_tokens=3, draft_model=random_llama(16, seed=0))
    for bad in (0, 65):
        with pytest.raises(ValueError, match=f"num_draft_tokens \\(={bad}\\)"):
            stories.generate(PROMPT, max_new_tokens=3, draft_model=close_draft, num_draft_tokens=bad)
    with pytest.raises(TypeError, match="num_draft_tokens must be an int"):
        stories.generate(PROMPT, max_new_tokens=3, draft_model=close_draft, num_draft_tokens=2.0)


def test_a_model_may_draft_for_itself(stories):
    out = stories.generate(PROMPT, max_new_tokens=30, temperature=0.8, seed=1, draft_model=stories, num_draft_tokens=4)
    assert out.draft_tokens_accepted == out.draft_tokens_proposed  # p == q: every proposal is kept
    assert len(out.tokens) == 30
