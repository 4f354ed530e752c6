"""Random work on caches that share one pool, against recomputing every sequence from scratch.

Batches of several caches' new tokens in one forward_batch call, forks, truncations, caches let
go and a pool small enough to run out: after each call, every returned logit row must equal,
bit for bit, the row of model.logits over that cache's whole history (the engine sums every
product in one order whatever the batch, the cache's blocks or the thread count), and a call
the pool cannot hold must raise and leave every cache's length as it was. The C tests do the
same for the pool alone (tests/c/test_kvcache.c); this drives it through attention's splits
(tokens, query heads, query tiles for heads of 8 and 16 features) as the decoding loops do."""
import numpy as np
import pytest

import lmdecode
from test_kv_f16 import _random_llama

VOCAB = 64


def _run(model, rng, *, steps, block_size, blocks, kv_dtype):
    """Random operations; returns how many calls were refused (pool full) and run."""
    first = model.new_cache(capacity=blocks * block_size, block_size=block_size, kv_dtype=kv_dtype)
    caches = [first]
    history = {id(first): []}  # tokens each cache holds
    refused = ran = 0
    for step in range(steps):
        op = rng.integers(10)
        if op < 6:  # a batch over some of the caches
            chosen = sorted(rng.choice(len(caches), size=rng.integers(1, min(4, len(caches)) + 1), replace=False))
            batch = [caches[i] for i in chosen]
            lists = [rng.integers(0, VOCAB, size=rng.integers(1, 13)).tolist() for _ in batch]
            lengths = [len(c) for c in batch]
            room = [len(history[id(c)]) + len(t) <= model.config.context_length for c, t in zip(batch, lists)]
            if not all(room):
                continue
            try:
                got = model.forward_batch(lists, batch, logits="all")
            except ValueError as e:
                assert "free blocks" in str(e), e
                assert [len(c) for c in batch] == lengths, f"step {step}: a refused call changed a cache"
                refused += 1
                continue
            ran += 1
            for c, toks, rows in zip(batch, lists, got):
                history[id(c)] += toks
                want = model.logits(history[id(c)])[-len(toks):]
                np.testing.assert_array_equal(rows, want, err_msg=f"step {step}")
        elif op < 7 and len(caches) < 8:  # fork one
            parent = caches[rng.integers(len(caches))]
            child = parent.fork()
            caches.append(child)
            history[id(child)] = list(history[id(parent)])
        elif op < 9:  # truncate one
            c = caches[rng.integers(len(caches))]
            n = int(rng.integers(len(c) + 1))
            c.truncate(n)
            history[id(c)] = history[id(c)][:n]
        elif len(caches) > 1:  # let one go (its blocks return to the pool)
            gone = caches.pop(rng.integers(len(caches)))
            del history[id(gone)]
            del gone
        for c in caches:
            assert len(c) == len(history[id(c)])
    return refused, ran


@pytest.mark.parametrize("head_dim, n_heads, n_kv_heads", [(8, 4, 2), (16, 4, 1), (32, 2, 2), (24, 3, 3)])
@pytest.mark.parametrize("kv_dtype", ["f32", "f16"])
def test_random_batches_forks_and_truncations_equal_recompute(head_dim, n_heads, n_kv_heads, kv_dtype):
    rng = np.random.default_rng(head_dim * 10 + n_heads + (kv_dtype == "f16"))
    model = _random_llama(rng, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, layers=2, context=96,
                          vocab=VOCAB, kv_dtype=kv_dtype)[0]
    try:
        refused = ran = 0
        for threads, block_size in ((1, 4), (2, 4), (2, 7)):
            lmdecode.set_num_threads(threads)
            r, n = _run(model, rng, steps=100, block_size=block_size, blocks=40, kv_dtype=kv_dtype)
            refused, ran = refused + r, ran + n
    finally:
        lmdecode.set_num_threads(0)
    assert ran > 100 and refused > 5  # the runs did batches and filled the pool
