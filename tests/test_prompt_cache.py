"""generate(cache_prompt=True): the model keeps the last call's keys and values, and a call
whose prompt continues that text feeds only the rest, with the same output bit for bit as
without the cache; an abandoned stream or a busy cache never corrupts it."""
from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest

import lmdecode as ld

MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"
PROMPT = [1, 403, 407, 261, 378]  # BOS "Once upon a time" in stories260K's vocabulary


@pytest.fixture
def stories():
    return ld.Model.load(MODELS / "stories260K.bin")


def same(a, b):
    assert a.tokens == b.tokens and a.finish_reason == b.finish_reason
    np.testing.assert_array_equal(a.token_logprobs, b.token_logprobs)


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.9, top_p=0.95, seed=3)])
def test_turns_reuse_the_cache_and_decode_as_without_it(stories, sampling):
    plain = ld.Model.load(MODELS / "stories260K.bin")
    prompt = list(PROMPT)
    for turn in range(4):
        got = stories.generate(prompt, max_new_tokens=12, stop_token_ids=[], cache_prompt=True, **sampling)
        same(got, plain.generate(prompt, max_new_tokens=12, stop_token_ids=[], **sampling))
        # the cache holds the last prompt and all its reply but the last token
        assert got.cached_prompt_tokens == (0 if turn == 0 else previous_len + 12 - 1)
        previous_len = len(prompt)
        prompt = prompt + got.tokens + [13, 403]  # the next "turn": the reply, then more text
    assert plain.generate(PROMPT, max_new_tokens=3).cached_prompt_tokens is None


def test_the_longest_shared_prefix_is_kept(stories):
    stories.generate(PROMPT + [407, 261], max_new_tokens=5, temperature=0, cache_prompt=True)
    # diverges after 3 tokens: those 3 are reused
    out = stories.generate(PROMPT[:3] + [500, 501, 502], max_new_tokens=5, temperature=0, cache_prompt=True)
    assert out.cached_prompt_tokens == 3
    same(out, stories.generate(PROMPT[:3] + [500, 501, 502], max_new_tokens=5, temperature=0))
    # the same prompt again: all of it but the last token (which must be fed for its logits)
    again = stories.generate(PROMPT[:3] + [500, 501, 502], max_new_tokens=5, temperature=0, cache_prompt=True)
    assert again.cached_prompt_tokens == 5
    same(again, out)
    # a chat conversation goes through it too
    stories.tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    chat = [{"role": "user", "content": "Once upon a time"}]
    first = stories.generate(chat, max_new_tokens=6, temperature=0, cache_prompt=True)
    second = stories.generate(chat + [{"role": "assistant", "content": "there was"}], max_new_tokens=6,
                              temperature=0, cache_prompt=True)
    assert second.cached_prompt_tokens > len(first.prompt_tokens) // 2


def test_streams_hand_the_cache_back_at_their_end(stories):
    chunks = list(stories.generate(PROMPT, max_new_tokens=8, temperature=0, stream=True, cache_prompt=True))
    tokens = [c.token for c in chunks]
    out = stories.generate(PROMPT + tokens, max_new_tokens=4, temperature=0, cache_prompt=True)
    assert out.cached_prompt_tokens == len(PROMPT) + 8 - 1
    # an abandoned stream keeps the cache busy: a call meanwhile decodes without it, rightly
    stream = stories.generate(PROMPT, max_new_tokens=8, temperature=0, stream=True, cache_prompt=True)
    next(stream)
    busy = stories.generate(PROMPT + tokens, max_new_tokens=4, temperature=0, cache_prompt=True)
    assert busy.cached_prompt_tokens == 0
    same(busy, out)
    # once the stream is gone the cache is dropped (its run never ended), then built again
    del stream
    gc.collect()
    assert stories.generate(PROMPT, max_new_tokens=4, temperature=0, cache_prompt=True).cached_prompt_tokens == 0
    assert stories.generate(PROMPT, max_new_tokens=4, temperature=0, cache_prompt=True).cached_prompt_tokens == 4


def test_a_failed_call_drops_the_cache(stories):
    stories.generate(PROMPT, max_new_tokens=4, temperature=0, cache_prompt=True)

    def interrupted(batch_id, input_ids):
        raise KeyError("stop here")

    with pytest.raises(KeyError, match="stop here"):
        stories.generate(PROMPT, max_new_tokens=4, cache_prompt=True, prefix_allowed_tokens_fn=interrupted)
    out = stories.generate(PROMPT, max_new_tokens=4, temperature=0, cache_prompt=True)
    assert out.cached_prompt_tokens == 0
    same(out, stories.generate(PROMPT, max_new_tokens=4, temperature=0))


def test_bad_arguments(stories):
    with pytest.raises(ValueError, match="one prompt and n=1"):
        stories.generate(PROMPT, n=2, cache_prompt=True)
    with pytest.raises(ValueError, match="one prompt and n=1"):
        stories.generate([PROMPT, PROMPT], cache_prompt=True)
    with pytest.raises(ValueError, match="does not combine"):
        stories.generate(PROMPT, cache_prompt=True, draft_model=stories)
    with pytest.raises(TypeError, match="needs an lmdecode Model"):
        ld.generate(lambda toks: np.zeros(512, np.float32), PROMPT, cache_prompt=True)


def test_slots_keep_conversations_that_take_turns(stories):
    """With two slots, two conversations alternating on one model each find their own history
    (one slot: each turn evicts the other's, only the BOS they share is reused; the second
    conversation's first turn starts from the first's BOS either way); the output is what plain
    calls give. Fewer slots drop the least recently used sequence; clear_prompt_cache drops them
    all."""
    plain = ld.Model.load(MODELS / "stories260K.bin")
    assert stories.prompt_cache_slots == 1
    for slots in (1, 2):
        stories.clear_prompt_cache()
        stories.prompt_cache_slots = slots
        talks = [list(PROMPT), [1, 261, 378, 403]]
        for turn in range(3):
            for i in range(2):
                got = stories.generate(talks[i], max_new_tokens=6, temperature=0, stop_token_ids=[], cache_prompt=True)
                same(got, plain.generate(talks[i], max_new_tokens=6, temperature=0, stop_token_ids=[]))
                if turn == 0:
                    assert got.cached_prompt_tokens == i
                else:  # the last prompt and all its reply but the last token, or only the shared BOS
                    assert got.cached_prompt_tokens == (len(talks[i]) - 2 if slots == 2 else 1)
                talks[i] = talks[i] + got.tokens + [13]
        assert len(stories._prompt_caches) == slots
    stories.prompt_cache_slots = 1  # the least recently used (conversation 0's) goes
    assert len(stories._prompt_caches) == 1
    out = stories.generate(talks[1], max_new_tokens=2, temperature=0, cache_prompt=True)
    assert out.cached_prompt_tokens == len(talks[1]) - 2
    stories.clear_prompt_cache()
    assert stories.generate(talks[1], max_new_tokens=2, temperature=0, cache_prompt=True).cached_prompt_tokens == 0
    for bad in (0, -1):
        with pytest.raises(ValueError, match=r"prompt_cache_slots \(=-?\d\) must be >= 1"):
            stories.prompt_cache_slots = bad
    for bad, kind in ((1.5, "float"), (True, "bool"), ("2", "str"), (None, "NoneType")):
        with pytest.raises(TypeError, match=rf"prompt_cache_slots \(=.*\) must be an integer, not {kind}"):
            stories.prompt_cache_slots = bad
    assert stories.prompt_cache_slots == 1
    stories.prompt_cache_slots = np.int64(2)  # any integer type, kept as an int
    assert stories.prompt_cache_slots == 2 and type(stories.prompt_cache_slots) is int


def test_new_conversations_share_the_system_prompt_of_another_slot(stories):
    """Conversations that begin with the same system prompt: each new slot starts from the
    longest beginning another slot holds, in that slot's blocks (the pool holds the shared
    prompt once), the first turns' outputs are the plain calls', and each conversation's next
    turn still finds its own history."""
    plain = ld.Model.load(MODELS / "stories260K.bin")
    system = plain.generate(PROMPT, max_new_tokens=40, temperature=0, stop_token_ids=[])
    system = PROMPT + system.tokens  # 45 tokens: two whole blocks of 16 and a partial one
    stories.prompt_cache_slots = 3
    talks = [system + [13, first] for first in (261, 378, 407)]
    for i, talk in enumerate(talks):
        got = stories.generate(talk, max_new_tokens=6, temperature=0, stop_token_ids=[], cache_prompt=True)
        same(got, plain.generate(talk, max_new_tokens=6, temperature=0, stop_token_ids=[]))
        assert got.cached_prompt_tokens == (0 if i == 0 else len(system) + 1)  # the system prompt and 13
        talks[i] = talk + got.tokens + [13]
    pool = stories._prompt_caches[0].pool
    assert all(e.pool is pool for e in stories._prompt_caches)
    # each holds 47 + 5 = 52 positions (4 blocks); the first two blocks are held once
    used = pool.n_blocks - pool.free_blocks
    assert used == 3 * 4 - 2 * 2, used
    for i, talk in enumerate(talks):
        got = stories.generate(talk, max_new_tokens=6, temperature=0, stop_token_ids=[], cache_prompt=True)
        same(got, plain.generate(talk, max_new_tokens=6, temperature=0, stop_token_ids=[]))
        assert got.cached_prompt_tokens == len(talk) - 2
        talks[i] = talk + got.tokens + [13]
    # a fourth conversation with every slot taken: it starts from the system prompt held by the
    # others, and the least recently used conversation (the first) gives up its slot, rather
    # than the one it shares the most with being cut short
    fourth = system + [13, 500]
    got = stories.generate(fourth, max_new_tokens=6, temperature=0, stop_token_ids=[], cache_prompt=True)
    same(got, plain.generate(fourth, max_new_tokens=6, temperature=0, stop_token_ids=[]))
    assert got.cached_prompt_tokens == len(system) + 1 and len(stories._prompt_caches) == 3
    for i in (2, 1, 0):  # the third and second keep their histories; the first starts anew
        got = stories.generate(talks[i], max_new_tokens=2, temperature=0, stop_token_ids=[], cache_prompt=True)
        assert got.cached_prompt_tokens == (len(system) + 1 if i == 0 else len(talks[i]) - 2)
    stories.clear_prompt_cache()
    assert stories._prompt_pool is None


def test_threads_taking_turns_share_the_slots_safely(stories):
    """Four threads holding conversations at once on one model with two slots: every call either
    gets a slot or decodes without one (all slots busy), and every output is the plain call's."""
    import threading
    plain = ld.Model.load(MODELS / "stories260K.bin")
    stories.prompt_cache_slots = 2
    failures, reused = [], []

    def talk(first_token):
        try:
            prompt = [1, first_token, 403]
            for _ in range(4):
                got = stories.generate(prompt, max_new_tokens=5, temperature=0, stop_token_ids=[], cache_prompt=True)
                want = plain.generate(prompt, max_new_tokens=5, temperature=0, stop_token_ids=[])
                if got.tokens != want.tokens:
                    failures.append((prompt, got.tokens, want.tokens))
                reused.append(got.cached_prompt_tokens)
                prompt = prompt + got.tokens + [13]
        except Exception as e:  # noqa: BLE001 - reported below
            failures.append(e)

    threads = [threading.Thread(target=talk, args=(t,)) for t in (261, 378, 407, 500)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    assert len(reused) == 16 and all(r is not None and r >= 0 for r in reused)
    assert len(stories._prompt_caches) <= 2 and not any(e.busy for e in stories._prompt_caches)
