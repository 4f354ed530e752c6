"""Bad counts and token lists given to the cache and forward API: a ValueError or TypeError that
names the argument and the value, never an OverflowError from a C conversion nor a bool read as
token 1, and nothing changed by the refused call.

An audit found: capacities and counts past what a KV pool's int32 block count holds overflowing
in the pool's binding; truncate(2**63) overflowing a C long; prompt_cache_slots=2**40 accepted
and generate failing later; [1, True] read as [1, 1] while [True, False] was refused; and lists
longer than the per-element fast path (64) with an id beyond int64 refused as "not object" or
"not float64" where shorter ones said which id is outside the vocabulary."""
import re
from pathlib import Path

import numpy as np
import pytest

import lmdecode as ld

MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"
MAX_BLOCKS = 2**31 - 1  # kvcache.h: a pool's blocks are counted in int32


@pytest.fixture(scope="module")
def model():
    return ld.Model.load(MODELS / "stories260K.bin")


def test_pool_block_limit_is_the_engines():
    assert ld.model.MAX_POOL_BLOCKS == MAX_BLOCKS


@pytest.mark.parametrize("capacity, block_size", [(2**40, 16), (MAX_BLOCKS * 16 + 1, 16), (2**36, 16),
                                                  (MAX_BLOCKS + 1, 1), (10**30, 4096)])
def test_new_cache_capacity_beyond_a_pool_is_a_value_error(model, capacity, block_size):
    limit = MAX_BLOCKS * block_size
    with pytest.raises(ValueError, match=rf"capacity \(={capacity}\) must be in \[1, {limit}\] \(a KV pool holds at "
                                         rf"most {MAX_BLOCKS} blocks of block_size \(={block_size}\) positions\)"):
        model.new_cache(capacity, block_size=block_size)


def test_new_cache_capacity_bounds_are_inclusive(model):
    with pytest.raises(ValueError, match=r"capacity \(=0\) must be in \[1, "):
        model.new_cache(0)
    assert model.new_cache(1).max_len == model.config.context_length
    assert model.new_cache(1).free_blocks == 1
    # representable: the engine is asked, and the memory is not there (this model's blocks take
    # 20 kB each; 2**31 - 1 of them, 44 TB)
    with pytest.raises(MemoryError, match=rf"KV pool of {MAX_BLOCKS} blocks"):
        model.new_cache(MAX_BLOCKS * 16)
    with pytest.raises(MemoryError, match=r"KV pool of 134217728 blocks"):
        model.new_cache(2**31)


def test_new_caches_counts_beyond_a_pool_are_value_errors(model):
    blocks = model.config.context_length // 16  # 32 a cache by default
    most = MAX_BLOCKS // blocks
    for n in (2**40, most + 1, 2**64):
        with pytest.raises(ValueError, match=rf"n \(={n}\) must be in \[1, {most}\]: {n} caches of capacity "
                                             rf"\(=512\) positions take {n * blocks} blocks of block_size \(=16\) "
                                             rf"positions, and a KV pool holds at most {MAX_BLOCKS}"):
            model.new_caches(n)
    # each within a pool, not together
    with pytest.raises(ValueError, match=r"n \(=3\) must be in \[1, 1\]: 3 caches of capacity \(=17179869184\) "
                                         r"positions take 3221225472 blocks"):
        model.new_caches(3, capacity=2**34)
    with pytest.raises(ValueError, match=r"capacity \(=68719476736\) must be in \[1, 34359738352\]"):
        model.new_caches(3, capacity=2**36)
    with pytest.raises(ValueError, match=r"n \(=0\) must be >= 1"):
        model.new_caches(0)
    with pytest.raises(TypeError, match="n must be an int, not bool"):
        model.new_caches(True)
    # the bound is inclusive: one cache of 2**30 blocks is representable (and 22 TB: no
    # new_caches(most) here, which would make most - 1 forks where the memory is there)
    with pytest.raises(MemoryError, match=r"KV pool of 1073741824 blocks"):
        model.new_caches(1, capacity=2**34)
    with pytest.raises(ValueError, match=r"n \(=2\) must be in \[1, 1\]"):
        model.new_caches(2, capacity=2**34)
    a, b, c = model.new_caches(3, capacity=20)
    assert a.free_blocks == 6 and a._seq.pool is c._seq.pool


@pytest.mark.parametrize("length", [2**31, 2**40, 2**63, 2**64, 2**70, -1, -(2**63) - 1, -(2**70)])
def test_truncate_out_of_range_is_a_value_error_with_the_value(model, length):
    cache = model.new_cache()
    model.forward([1, 2, 3], cache)
    with pytest.raises(ValueError, match=rf"^length \(={length}\) must be in \[0, 3\] \(the cached positions\)$"):
        cache.truncate(length)
    assert len(cache) == 3
    cache.truncate(np.int64(2))
    assert len(cache) == 2
    with pytest.raises(TypeError, match="length must be an int, not bool"):
        cache.truncate(True)


def test_prompt_cache_slots_beyond_a_pool_are_refused_when_set(model):
    per_slot = -(-(model.config.context_length + 16) // 16)  # a context length and a block: 33
    most = MAX_BLOCKS // per_slot
    assert most == 65075262
    before = model.prompt_cache_slots
    for slots in (2**40, most + 1, 2**70, np.int64(2**40)):
        with pytest.raises(ValueError, match=rf"prompt_cache_slots \(={re.escape(repr(slots))}\) must be <= {most}: each slot takes "
                                             rf"{per_slot} blocks of 16 positions \(the context length, 512, and "
                                             rf"one for copy-on-write\), and a KV pool holds at most {MAX_BLOCKS}"):
            model.prompt_cache_slots = slots
        assert model.prompt_cache_slots == before
    # generate runs after the refused settings, with the prompt cache
    out = model.generate([1, 403], max_new_tokens=2, temperature=0, cache_prompt=True)
    assert out.tokens == model.generate([1, 403], max_new_tokens=2, temperature=0).tokens
    model.clear_prompt_cache()


def test_prompt_cache_slots_at_the_limit_fail_with_memory_error_and_leave_the_model_working():
    model = ld.Model.load(MODELS / "stories260K.bin")
    model.prompt_cache_slots = 65075262  # representable: the pool of 2**31 - 2 blocks is not there
    with pytest.raises(MemoryError, match=r"^prompt_cache_slots \(=65075262\) slots of context_length 512 "
                                          r"positions: .*KV pool of 2147483646 blocks"):
        model.generate([1, 403], max_new_tokens=2, temperature=0, cache_prompt=True)
    model.prompt_cache_slots = 2
    plain = model.generate([1, 403], max_new_tokens=3, temperature=0).tokens
    assert model.generate([1, 403], max_new_tokens=3, temperature=0, cache_prompt=True).tokens == plain


def _token_calls(model):
    """Every Model entry point that takes one token list, as (label, call)."""
    return [
        ("forward", lambda t: model.forward(t, model.new_cache())),
        ("forward_batch", lambda t: model.forward_batch([t], model.new_caches(1))),
        ("logits", lambda t: model.logits(t)),
    ]


@pytest.mark.parametrize("tokens, index", [([1, True], 1), ([True, 5], 0), ([1, 2, False], 2),
                                           ((1, True), 1), ([1, np.True_], 1), ([7] * 64 + [True], 64),
                                           ([1] * 100 + [False], 100), ([0] * 70 + [True] + [1] * 10, 70),
                                           ([5] * 200 + [np.False_, 3], 200), ([True] + [5] * 99, 0)])
def test_a_bool_among_token_ids_is_a_type_error(model, tokens, index):
    value = tokens[index]
    for label, call in _token_calls(model):
        with pytest.raises(TypeError, match=rf"^tokens must hold integers, not bool \(tokens\[{index}\] is "
                                            rf"{value!r}\)$"):
            call(tokens)
    # all bools: NumPy's bool array, as before
    with pytest.raises(TypeError, match=r"^tokens must hold integers, not bool$"):
        model.forward([True, False], model.new_cache())


@pytest.mark.parametrize("value", [2**64 - 1, 2**63, 2**70, -(2**63) - 1, -(2**64), 512, -1, 2**40])
@pytest.mark.parametrize("length", [1, 3, 64, 65, 300])
def test_an_id_outside_the_vocabulary_is_the_same_value_error_at_every_length(model, value, length):
    tokens = [1] * (length - 1) + [value]
    for label, call in _token_calls(model):
        with pytest.raises(ValueError, match=rf"^tokens\[{length - 1}\] \(={value}\) is outside the vocabulary "
                                             r"\[0, 512\)$"):
            call(tokens)
    # and the first bad one, whichever comes first
    with pytest.raises(ValueError, match=rf"^tokens\[3\] \(=600\) is outside"):
        model.forward([1] * 3 + [600] + [1] * length + [value], model.new_cache())


def test_ids_beyond_int64_among_numpy_ints_and_wrong_types_still_say_what(model):
    with pytest.raises(ValueError, match=r"^tokens\[70\] \(=1180591620717411303424\) is outside the vocabulary"):
        model.forward([np.int64(3)] * 70 + [2**70], model.new_cache())
    with pytest.raises(ValueError, match=r"^tokens\[0\] \(=-1\) is outside the vocabulary"):
        model.forward([-1] + [2] * 70 + [2**64 - 1], model.new_cache())  # a float64 array to NumPy
    with pytest.raises(TypeError, match="^tokens must hold integers, not object$"):
        model.forward([1] * 70 + [2**70, None], model.new_cache())
    with pytest.raises(TypeError, match="^tokens must hold integers, not float64$"):
        model.forward([1] * 70 + [1.5], model.new_cache())
    with pytest.raises(TypeError, match="^tokens must hold integers, not object$"):
        model.forward([1] * 70 + [2**70, 1.5], model.new_cache())


def test_refused_token_lists_change_no_cache(model):
    cache = model.new_cache()
    first = model.forward([1, 403, 407], cache)
    for bad in ([1, True], [1] * 70 + [2**70], [5] * 70 + [False], [1] * 80 + [600]):
        with pytest.raises((TypeError, ValueError)):
            model.forward(bad, cache)
        assert len(cache) == 3
    a, b = model.new_caches(2)
    with pytest.raises(TypeError, match=r"tokens\[1\] must hold integers, not bool \(tokens\[1\]\[1\] is True\)"):
        model.forward_batch([[1, 403], [1, True]], [a, b])
    assert len(a) == len(b) == 0
    np.testing.assert_array_equal(model.forward([261], cache), model.logits([1, 403, 407, 261])[-1])
    np.testing.assert_array_equal(first, model.logits([1, 403, 407])[-1])


@pytest.mark.parametrize("tokens", [
    [1, 403, 407, 261],
    [1] + [int(t) for t in np.random.default_rng(0).integers(0, 512, 299)],
    [1] * 300,                # many entries that read 1: the list's types are looked at
    [0, 1] * 40,
    [511] * 70,
    tuple(range(512)),
    [np.int64(t) for t in range(100)],
    list(np.arange(100, dtype=np.uint64)),
])
def test_valid_token_lists_are_read_as_numpy_reads_them(model, tokens):
    arr = model._tokens("tokens", tokens)
    assert arr.dtype == np.int32
    np.testing.assert_array_equal(arr, np.asarray(tokens, dtype=np.int64))
    assert tokens == (type(tokens))(tokens)  # unchanged (the lists hold immutable ints)


@pytest.mark.parametrize("logits, error, message", [
    ([True, 0], TypeError, r"logits indices must be integers, not bool \(got \[True, 0\]\)"),
    ([1, np.False_], TypeError, r"logits indices must be integers, not bool"),
    ([True], TypeError, r"logits indices must be integers, not bool \(got \[True\]\)"),
    (np.array([True, False]), TypeError, r"logits indices must be integers, not bool"),
    ([1.0], TypeError, r"logits indices must be integers, not float64"),
    ([2**70], ValueError, r"logits indices must be in \[0, 3\) \(got \[1180591620717411303424\]\)"),
    ([0, 2**64 - 1], ValueError, r"logits indices must be in \[0, 3\) \(got \[0, 18446744073709551615\]\)"),
    ([-1, 2**64 - 1], ValueError, r"logits indices must be in \[0, 3\)"),
    ([3], ValueError, r"logits indices must be in \[0, 3\) \(got \[3\]\)"),
    ([[0]], ValueError, r"logits must be 'last', 'all', None or a 1-D int array"),
    ("first", ValueError, r"logits must be 'last', 'all', None or a 1-D int array \(got 'first'\)"),
])
def test_logits_indices_that_are_not_indices(model, logits, error, message):
    cache = model.new_cache()
    with pytest.raises(error, match=message):
        model.forward([1, 403, 407], cache, logits=logits)
    assert len(cache) == 0
    a, b = model.new_caches(2)
    with pytest.raises(error, match=message):
        model.forward_batch([[1, 403, 407], [1, 403, 407]], [a, b], logits=logits)
    assert len(a) == len(b) == 0


def test_logits_indices_that_are_indices(model):
    whole = model.logits([1, 403, 407])
    np.testing.assert_array_equal(model.forward([1, 403, 407], model.new_cache(), logits=[2, 0]), whole[[2, 0]])
    np.testing.assert_array_equal(model.forward([1, 403, 407], model.new_cache(), logits=(np.int64(1),)), whole[[1]])
    np.testing.assert_array_equal(model.forward([1, 403, 407], model.new_cache(), logits=np.array([1], np.uint8)),
                                  whole[[1]])


def test_copy_on_write_takes_a_block_for_a_shared_partly_filled_one(model):
    """The module's documentation: capacity=32 is two blocks of 16; a cache of 17 positions and a
    fork of it fill them, and the first write into the shared second block needs a third."""
    cache = model.new_cache(capacity=32)
    model.forward(list(range(1, 18)), cache)
    assert cache.free_blocks == 0
    fork = cache.fork()
    for c in (fork, cache):
        with pytest.raises(ValueError, match="0 free blocks of 16 positions but this call needs 1"):
            model.forward([5], c)
        assert len(c) == 17
    fork.truncate(16)  # the second block is the cache's alone again: written in place
    assert cache.free_blocks == 0
    model.forward([5], cache)
    assert len(cache) == 18
    # with a third block, the fork's first write copies the shared one into it, and then the
    # cache writes in place: 2 caches going on from inside a block take 1 block more
    cache = model.new_cache(capacity=48)
    model.forward(list(range(1, 18)), cache)
    fork = cache.fork()
    assert cache.free_blocks == 1
    model.forward([5], fork)
    assert cache.free_blocks == 0
    model.forward([6], cache)
    ref = model.logits(list(range(1, 18)) + [5, 7])[-1]
    np.testing.assert_array_equal(model.forward([7], fork), ref)
    # each holds its second block alone now: both fill it without taking another
    model.forward(list(range(8, 22)), cache)
    model.forward(list(range(8, 21)), fork)
    assert len(cache) == len(fork) == 32 and cache.free_blocks == 0
