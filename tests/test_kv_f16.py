"""The f16 KV cache (kv_dtype="f16"): keys and values stored as IEEE halves, rounded to nearest
even when written and widened exactly when read, against a NumPy forward pass that rounds them
the same way; and the same bit-for-bit guarantees as the float32 cache."""
from pathlib import Path

import numpy as np
import pytest

import lmdecode
from lmdecode import _core, loaders
from reference_model import llama_logits

STORIES_BIN = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "stories260K.bin"


def _rel_max_diff(ref, got):
    return float(np.abs(ref - got).max()) / float(ref.max() - ref.min())


def _random_llama(rng, *, n_heads, n_kv_heads, head_dim, layers=2, context=160, vocab=64, kv_dtype="f16"):
    """A Llama with random weights through from_numpy, and its engine config and weights (float64)
    for the NumPy reference."""
    D, kv, FF = n_heads * head_dim, n_kv_heads * head_dim, 96
    cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=vocab, hidden_size=D,
               intermediate_size=FF, num_hidden_layers=layers, num_attention_heads=n_heads,
               num_key_value_heads=n_kv_heads, head_dim=head_dim, max_position_embeddings=context,
               rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=10000.0)
    w = {"model.embed_tokens.weight": rng.normal(0, 1.0, (vocab, D)), "model.norm.weight": np.ones(D),
         "lm_head.weight": rng.normal(0, 0.5, (vocab, D))}
    for i in range(layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = np.ones(D)
        w[p + "post_attention_layernorm.weight"] = np.ones(D)
        for name, shape in (("self_attn.q_proj", (D, D)), ("self_attn.k_proj", (kv, D)),
                            ("self_attn.v_proj", (kv, D)), ("self_attn.o_proj", (D, D)), ("mlp.gate_proj", (FF, D)),
                            ("mlp.up_proj", (FF, D)), ("mlp.down_proj", (D, FF))):
            w[p + name + ".weight"] = rng.normal(0, 1.5 / np.sqrt(shape[1]), shape)
    w = {k: v.astype(np.float32) for k, v in w.items()}
    engine_config, tensors = loaders.from_hf_numpy(cfg, w)
    weights = {k: np.asarray(v.data, dtype=np.float64) for k, v in tensors.items()}
    return lmdecode.Model.from_numpy(cfg, w, kv_dtype=kv_dtype), engine_config, weights


# head sizes: 8 and 64 take the unrolled value sums (8- and 16-feature vectors), 24 and 80 the
# run-time loop; groups of 2 and 3 query heads per kv head and plain multi-head attention
CASES = [(8, 4, 2), (24, 3, 3), (64, 4, 2), (80, 3, 1)]


def _rel_mean_diff(ref, got):
    return float(np.abs(ref - got).mean()) / float(ref.max() - ref.min())


@pytest.mark.parametrize("head_dim,n_heads,n_kv_heads", CASES)
def test_f16_cache_matches_numpy_with_rounded_keys_and_values(head_dim, n_heads, n_kv_heads):
    """Against the reference rounding its float64 keys and values to halves. A key the engine
    computes in float32 a few float32 ulps from the reference's can round to the neighbouring
    half (about one in a thousand here), which moves a few logits by up to 1e-4 of the range;
    on average the engine is 10 x closer to the rounded reference than to the exact one."""
    rng = np.random.default_rng(head_dim)
    model, cfg, weights = _random_llama(rng, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim)
    toks = rng.integers(0, 64, 150)
    got = model.logits(toks)
    rounded, exact = llama_logits(cfg, weights, toks, kv_dtype="f16"), llama_logits(cfg, weights, toks)
    assert _rel_max_diff(rounded, got) < 2e-4
    assert _rel_mean_diff(rounded, got) < 1e-5
    assert _rel_mean_diff(exact, got) > 10 * _rel_mean_diff(rounded, got)  # the rounding is there


def test_stories_f16_cache_against_the_reference_and_the_f32_cache():
    config, tensors, _ = loaders.read_llama2c(STORIES_BIN)
    weights = {k: np.asarray(v.data, dtype=np.float64) for k, v in tensors.items()}
    toks = np.random.default_rng(1).integers(0, 512, 256)
    f16 = lmdecode.Model.load(STORIES_BIN, kv_dtype="f16").logits(toks)
    f32 = lmdecode.Model.load(STORIES_BIN).logits(toks)
    # a key a few float32 ulps from the reference's can round to the neighbouring half: the
    # largest single difference depends on where that happens (0.8-2.7e-4 of the range over
    # three sequences and the native and portable builds), the mean stays 2-8e-6
    rounded = llama_logits(config, weights, toks, kv_dtype="f16")
    assert _rel_max_diff(rounded, f16) < 5e-4
    assert _rel_mean_diff(rounded, f16) < 1.5e-5
    # the documented cost of half precision: within 2e-3 of the logit range of the f32 cache
    assert 0 < _rel_max_diff(f32, f16) < 2e-3


@pytest.mark.parametrize("head_dim,n_heads,n_kv_heads", CASES)
def test_f16_cache_is_bit_identical_for_any_split(head_dim, n_heads, n_kv_heads):
    """A prefill, token-by-token decoding, caches of any block size, forks (copy on write of a
    shared, partly filled block) and 1 or 2 threads give the very same logits."""
    rng = np.random.default_rng(100 + head_dim)
    model, _, _ = _random_llama(rng, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim)
    toks = rng.integers(0, 64, 70)
    want = model.forward(toks, model.new_cache(), logits="all")
    assert np.ptp(want) > 1.0
    for block_size in (1, 5, 16, 64):
        cache = model.new_cache(capacity=80, block_size=block_size)
        assert cache.kv_dtype == "f16"
        got = [model.forward(toks[:11], cache, logits="all")]
        got += [model.forward([t], cache)[None] for t in toks[11:]]
        np.testing.assert_array_equal(np.concatenate(got), want, err_msg=f"block_size={block_size}")
    # a fork at 21 positions (mid-block) writes into its own copy of the shared block
    cache = model.new_cache(capacity=200, block_size=16)
    model.forward(toks[:21], cache)
    other = cache.fork()
    other_toks = rng.integers(0, 64, 30)
    branch = model.forward(other_toks, other, logits="all")
    trunk = model.forward(toks[21:], cache, logits="all")
    np.testing.assert_array_equal(trunk, want[21:])
    np.testing.assert_array_equal(branch, model.logits(np.concatenate([toks[:21], other_toks]))[21:])
    old = lmdecode.get_num_threads()
    try:
        for threads in (1, 2):
            lmdecode.set_num_threads(threads)
            np.testing.assert_array_equal(model.forward(toks, model.new_cache(), logits="all"), want)
    finally:
        lmdecode.set_num_threads(old)


def test_kv_dtype_is_chosen_per_model_and_per_cache():
    model = lmdecode.Model.load(STORIES_BIN)
    assert model.kv_dtype == "f32" and model.new_cache().kv_dtype == "f32"
    cache = model.new_cache(kv_dtype="f16")
    assert cache.kv_dtype == "f16" and "kv_dtype='f16'" in repr(cache)
    assert cache.fork().kv_dtype == "f16"
    toks = [1, 403, 407, 261, 378]
    np.testing.assert_array_equal(model.forward(toks, cache, logits="all"),
                                  lmdecode.Model.load(STORIES_BIN, kv_dtype="f16").logits(toks))


@pytest.mark.parametrize("bad", ["f8", "bf16", "F16", None, 16])
def test_bad_kv_dtype_is_refused_by_name(bad):
    model = lmdecode.Model.load(STORIES_BIN)
    if bad is not None:  # new_cache(kv_dtype=None) means the model's
        with pytest.raises(ValueError, match=r"kv_dtype \(=.*\) must be one of f32, f16"):
            model.new_cache(kv_dtype=bad)
    with pytest.raises(ValueError, match=r"kv_dtype \(=.*\) must be one of f32, f16"):
        lmdecode.Model.load(STORIES_BIN, kv_dtype=bad)
    with pytest.raises(ValueError, match="kv_dtype"):
        _core.KVPool(1, 8, 8, 4, 4, "f8")


@pytest.mark.parametrize("head_dim, n_heads, n_kv_heads", [(64, 2, 2), (64, 4, 2), (128, 2, 1)])
def test_forks_of_one_prefix_decode_together_as_each_alone(head_dim, n_heads, n_kv_heads):
    """Forks of one prefix decoding a token each in one call (beams, samples of one prompt, in
    heads of 64 and 128 features) get the logits of each sequence decoded alone, bit for bit:
    f32 and f16 caches, blocks of 16 and 5 positions, 1 and 2 threads, a sequence sharing only
    10 positions in between. (It checked a shared-prefix attention that read the shared
    blocks once for all forks, tried and left out: benchmarks/README.md.)"""
    rng = np.random.default_rng(head_dim + n_heads)
    toks = rng.integers(0, 64, size=64)
    try:
        for kv_dtype in ("f32", "f16"):
            model = _random_llama(rng, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
                                  kv_dtype=kv_dtype)[0]
            for block_size in (16, 5):
                for threads in (1, 2):
                    lmdecode.set_num_threads(threads)
                    root = model.new_cache(capacity=320, block_size=block_size)
                    model.forward(toks[:48], root)
                    forks = [root.fork() for _ in range(6)]
                    for i, fork in enumerate(forks[1:5]):  # 1 to 4 positions of their own
                        model.forward(toks[48 + i:49 + 2 * i], fork)
                    forks[5].truncate(10)  # shares 10 positions or fewer: decoded on its own
                    model.forward(toks[30:34], forks[5])
                    order = [0, 1, 5, 2, 3, 4]
                    nexts = [[int(t)] for t in toks[56:62]]
                    alone = [model.forward(nexts[k], forks[k].fork()) for k in order]
                    together = model.forward_batch([nexts[k] for k in order], [forks[k] for k in order])
                    for k, want, got in zip(order, alone, together):
                        np.testing.assert_array_equal(got, want, err_msg=f"{kv_dtype} {block_size} {threads} {k}")
    finally:
        lmdecode.set_num_threads(0)
