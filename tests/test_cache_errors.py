"""Bad counts given to the cache API: a ValueError or TypeError that names the argument and
the value, never an OverflowError from a C conversion, and nothing changed by the refused call.

An audit found: capacities and counts past what a KV pool's int32 block count holds overflowing
in the pool's binding; truncate(2**63) overflowing a C long; prompt_cache_slots=2**40 accepted
and generate failing later."""
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
    with pytest.raises(MemoryError, match=r"KV pool of 2147483646 blocks"):
        model.generate([1, 403], max_new_tokens=2, temperature=0, cache_prompt=True)
    model.prompt_cache_slots = 2
    plain = model.generate([1, 403], max_new_tokens=3, temperature=0).tokens
    assert model.generate([1, 403], max_new_tokens=3, temperature=0, cache_prompt=True).tokens == plain
