"""The engine against Hugging Face transformers (torch fp32, eager attention) on random models."""
import copy
import json
import shutil

import numpy as np
import pytest

import lmdecode
from gguf_files import write_gguf
from oracle import require_transformers

pytestmark = pytest.mark.oracle

T = 64  # positions compared
RTOL_RANGE = 1e-4  # max |diff| allowed, relative to the range of the reference logits


def _randomise(torch, model, seed, std=0.1):
    """transformers initialises biases to zero and norms to one; random values test them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            p.copy_(1.0 + noise if ("norm" in name or "ln_" in name) and name.endswith("weight") else noise)
    return model.eval()


def _build(kind, torch, transformers):
    common = dict(vocab_size=96, attn_implementation="eager")
    if kind == "llama":  # grouped-query attention, non-default rope base, untied head
        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                       rope_theta=500000.0, tie_word_embeddings=False, **common)
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "qwen2":  # q/k/v biases, multi-query attention, tied head
        cfg = transformers.Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
                                       rope_theta=1000000.0, tie_word_embeddings=True, **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif kind == "llama_wide":  # heads of 32 features, matrices of 256 and 688 columns
        cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                                       num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128,
                                       tie_word_embeddings=False, **common)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        # GPT2Config's special ids default to GPT-2's 50256, outside this vocabulary (ignored
        # with a warning: test_special_ids_outside_the_vocabulary); its last token, as GPT-2's
        cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=95,
                                      eos_token_id=95, **common)
        model = transformers.GPT2LMHeadModel(cfg)
    # noise shrinking as 1 / sqrt(width), as initialisers do: the wide model's activations stay the size of the others'
    return _randomise(torch, model, seed=len(kind), std=0.1 * (64 / model.config.hidden_size) ** 0.5)


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2", "llama_wide"])
def hf(request, tmp_path_factory):
    torch, transformers = require_transformers()
    model = _build(request.param, torch, transformers)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path, safe_serialization=True)
    tokens = np.random.default_rng(0).integers(0, 96, size=T)
    with torch.no_grad():
        ref = model(torch.tensor(tokens[None], dtype=torch.long)).logits[0].numpy()
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return dict(kind=request.param, path=path, tokens=tokens, ref=ref, state=state,
                config=model.config.to_dict(), torch_model=model, torch=torch)


def _assert_close_to(ref, got, rtol_range=RTOL_RANGE):
    scale = float(ref.max() - ref.min())
    diff = float(np.abs(ref - got).max())
    assert diff <= rtol_range * scale, f"max |diff| {diff:.3g} > {rtol_range} x logit range {scale:.3g}"


def test_load_matches_transformers(hf):
    model = lmdecode.Model.load(hf["path"])
    assert model.config.vocab_size == 96 and model.config.dim == hf["torch_model"].config.hidden_size
    got = model.logits(hf["tokens"])
    assert got.shape == (T, 96) and got.dtype == np.float32
    _assert_close_to(hf["ref"], got)


def test_from_numpy_matches_transformers(hf):
    state = {k: v.copy() for k, v in hf["state"].items()}
    before = {k: v.copy() for k, v in state.items()}
    model = lmdecode.Model.from_numpy(hf["config"], state)
    _assert_close_to(hf["ref"], model.logits(hf["tokens"]))
    for k in state:  # the caller's arrays are never written
        np.testing.assert_array_equal(state[k], before[k])


def test_from_numpy_takes_a_config_object_and_torch_tensors(hf, tmp_path):
    """A transformers config and a state_dict as they come: float32 tensors equal the NumPy
    arrays' model bit for bit, float64 ones too (rounded to float32), and bfloat16 tensors give
    the logits of the same checkpoint saved in bf16 and loaded from its file."""
    torch, model = hf["torch"], hf["torch_model"]
    want = lmdecode.Model.from_numpy(hf["config"], hf["state"]).logits(hf["tokens"])
    state = model.state_dict()
    for weights in (state, {k: v.double() for k, v in state.items()}, {k: v.double().numpy() for k, v in state.items()}):
        np.testing.assert_array_equal(lmdecode.Model.from_numpy(model.config, weights).logits(hf["tokens"]), want)
    half = {k: v.to(torch.bfloat16) for k, v in state.items()}
    from_tensors = lmdecode.Model.from_numpy(model.config, half)
    assert from_tensors.config.dtype == "bf16"
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp_path, safe_serialization=True)
    np.testing.assert_array_equal(from_tensors.logits(hf["tokens"]), lmdecode.Model.load(tmp_path).logits(hf["tokens"]))
    with pytest.raises(TypeError, match="config must be a dict of config.json keys or a transformers config, got list"):
        lmdecode.Model.from_numpy([("model_type", "llama")], hf["state"])
    with pytest.raises(TypeError, match=r"weights\['lm_head.weight'\] has dtype int64; expected float32, float16, "
                                        r"bfloat16 or float64"):
        lmdecode.Model.from_numpy(hf["config"], {**hf["state"], "lm_head.weight": np.zeros((96, 64), np.int64)})


def test_sharded_checkpoint(hf, tmp_path):
    hf["torch_model"].save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    _assert_close_to(hf["ref"], lmdecode.Model.load(tmp_path).logits(hf["tokens"]))
    index = tmp_path / "model.safetensors.index.json"
    good = json.loads(index.read_text())
    name = next(iter(good["weight_map"]))
    for bad, message in [("{", "not valid JSON"), ("[]", "expected a JSON object, not list"),
                         ('{"weight_map": 5}', "weight_map must map tensor names to shard file names"),
                         (json.dumps({"weight_map": {**good["weight_map"], name: 7}}), "weight_map must map"),
                         (json.dumps({"weight_map": {**good["weight_map"], name: "../model.safetensors"}}),
                          r"shard '\.\./model\.safetensors' is not a file name in the checkpoint directory"),
                         (json.dumps({"weight_map": {**good["weight_map"], name: "gone.safetensors"}}),
                          "shard 'gone.safetensors' is missing")]:
        index.write_text(bad)
        with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: " + message):
            lmdecode.Model.load(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json: expected a JSON object, not list"):
        lmdecode.Model.load(tmp_path)


def test_qwen2_gguf_matches_transformers(tmp_path):
    """A Qwen2 written as llama.cpp's converter writes one (arch qwen2, q/k/v biases, q and k rows
    unpermuted: rotate-half RoPE, tied head) loads to the oracle's logits."""
    torch, transformers = require_transformers()
    model = _build("qwen2", torch, transformers)
    cfg = model.config
    tokens = np.random.default_rng(2).integers(0, 96, size=T)
    with torch.no_grad():
        ref = model(torch.tensor(tokens[None], dtype=torch.long)).logits[0].numpy()
    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    meta = {f"qwen2.{key}": value for key, value in {
        "embedding_length": cfg.hidden_size, "block_count": cfg.num_hidden_layers,
        "attention.head_count": cfg.num_attention_heads, "attention.head_count_kv": cfg.num_key_value_heads,
        "feed_forward_length": cfg.intermediate_size, "context_length": cfg.max_position_embeddings,
        "attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
        "rope.freq_base": float(cfg.rope_parameters["rope_theta"])}.items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    layer_names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                   "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                   "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                   "mlp.down_proj": "ffn_down"}
    tensors = {}
    for name, arr in state.items():
        if name == "lm_head.weight":
            continue  # tied
        if name not in names:
            _, _, idx, rest = name.split(".", 3)
            module, suffix = rest.rsplit(".", 1)
            names[name] = f"blk.{idx}.{layer_names[module]}.{suffix}"
        tensors[names[name]] = arr
    write_gguf(tmp_path / "qwen2.gguf", "qwen2", meta, tensors)
    loaded = lmdecode.Model.load(tmp_path / "qwen2.gguf")
    assert loaded.config.rope_layout == "half" and loaded.config.tied_embeddings
    _assert_close_to(ref, loaded.logits(tokens))


# head size 16, base 10000: wavelengths 2 pi 10000^(2i/16) = 6.3, 20, 63, 199, ... positions. An
# original context of 32 keeps the first (under 32 / high_freq_factor), smooths the second (between
# 32 / 4 and 32 / 1) and divides the rest by the factor.
ROPE_SCALINGS = {"llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 32},
                 "linear": {"rope_type": "linear", "factor": 2.5}}


@pytest.mark.parametrize("scaling", sorted(ROPE_SCALINGS))
def test_rope_scaling_matches_transformers(scaling, tmp_path):
    """Llama 3's RoPE scaling and linear scaling: the checkpoint and from_numpy match the oracle,
    and the same weights with plain RoPE do not."""
    torch, transformers = require_transformers()
    rope = dict(ROPE_SCALINGS[scaling], rope_theta=10000.0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128, rope_parameters=rope,
                                   tie_word_embeddings=False, vocab_size=96, attn_implementation="eager")
    model = _randomise(torch, transformers.LlamaForCausalLM(cfg), seed=11)
    model.save_pretrained(tmp_path, safe_serialization=True)
    tokens = np.random.default_rng(1).integers(0, 96, size=T)
    with torch.no_grad():
        ref = model(torch.tensor(tokens[None], dtype=torch.long)).logits[0].numpy()
    _assert_close_to(ref, lmdecode.Model.load(tmp_path).logits(tokens))
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    _assert_close_to(ref, lmdecode.Model.from_numpy(model.config.to_dict(), state).logits(tokens))
    plain = dict(model.config.to_dict(), rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    with pytest.raises(AssertionError):
        _assert_close_to(ref, lmdecode.Model.from_numpy(plain, state).logits(tokens), 1e-2)


def test_llama3_rope_factors_by_hand():
    """The factors for ROPE_SCALINGS["llama3"] worked out by hand: frequency 1 (wavelength
    2 pi 10000^(1/8) = 19.87) has s = (32 / 19.87 - 1) / 3 = 0.2035 and the factor
    1 / ((1 - s) / 8 + s) = 3.2996; frequency 0 is kept, the rest are divided by 8."""
    from lmdecode import loaders
    factors = loaders.hf_rope_freq_factors("config.json", ROPE_SCALINGS["llama3"], 16, 10000.0)
    np.testing.assert_allclose(factors, [1.0, 3.2996, 8, 8, 8, 8, 8, 8], rtol=1e-4)
    np.testing.assert_array_equal(loaders.hf_rope_freq_factors("c", ROPE_SCALINGS["linear"], 6, 1e4), [2.5] * 3)
    assert loaders.hf_rope_freq_factors("c", {"rope_type": "default"}, 16, 1e4) is None


@pytest.mark.parametrize("rope,message", [
    ({"rope_type": "yarn", "factor": 4.0}, r"rope scaling type 'yarn' is not supported \(linear, llama3\)"),
    ({"rope_type": "dynamic", "factor": 2.0}, r"rope scaling type 'dynamic' is not supported"),
    ({"rope_type": "linear"}, r"rope scaling 'linear': factor \(=None\) must be a positive number"),
    ({"rope_type": "linear", "factor": -1}, r"rope scaling 'linear': factor \(=-1\) must be a positive number"),
    (dict(ROPE_SCALINGS["llama3"], high_freq_factor=1.0),
     r"rope scaling 'llama3': high_freq_factor \(=1\.0\) must exceed low_freq_factor \(=1\.0\)"),
    (dict(ROPE_SCALINGS["llama3"], original_max_position_embeddings="8k"),
     r"rope scaling 'llama3': original_max_position_embeddings \(='8k'\) must be a positive number"),
])
def test_unsupported_rope_scaling(rope, message):
    cfg = dict(LLAMA_CONFIG, rope_scaling=rope)
    with pytest.raises(ValueError, match=r"from_numpy config: " + message):
        lmdecode.Model.from_numpy(cfg, {})


LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "vocab_size": 96, "hidden_size": 32, "intermediate_size": 64,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}


@pytest.mark.parametrize("key,value,message", [
    ("architectures", "LlamaForCausalLM", r"'architectures' \(='LlamaForCausalLM'\) must be a list of class names"),
    ("architectures", [7], r"'architectures' \(=\[7\]\) must be a list"),
    ("model_type", ["llama"], r"'model_type' \(=\['llama'\]\) must be a string"),
    ("rope_scaling", 1.5, r"rope parameters \(=1\.5\) must be an object"),
    ("rope_theta", "x", r"'rope_theta' \(='x'\) must be a number"),
    ("num_key_value_heads", 1.5, r"'num_key_value_heads' \(=1\.5\) must be a positive integer"),
    ("num_key_value_heads", -2, r"'num_key_value_heads' \(=-2\) must be a positive integer"),
    ("max_position_embeddings", "x", r"'max_position_embeddings' \(='x'\) must be a positive integer"),
    ("head_dim", 0, r"'head_dim' \(=0\) must be a positive integer"),
    ("tie_word_embeddings", "yes", r"'tie_word_embeddings' \(='yes'\) must be true or false"),
    ("attention_bias", 1, r"'attention_bias' \(=1\) must be true or false"),
    ("partial_rotary_factor", [], r"'partial_rotary_factor' \(=\[\]\) must be a number"),
    ("eos_token_id", "2", r"'eos_token_id' \(='2'\) must be a token id, a list of them or null"),
    ("eos_token_id", [2, -1], r"'eos_token_id' \(=\[2, -1\]\) must be a token id"),
])
def test_config_values_of_the_wrong_type(key, value, message):
    """A config.json value of the wrong type is a ValueError naming the file and key (byte-flip
    and value fuzzing found AttributeErrors and TypeErrors from deep inside the loader, and
    tie_word_embeddings="yes" read as true); the unchanged config loads."""
    from lmdecode import loaders
    assert loaders.hf_config("config.json", LLAMA_CONFIG)["n_kv_heads"] == 2
    with pytest.raises(ValueError, match=r"^config\.json: config " + message):
        loaders.hf_config("config.json", {**LLAMA_CONFIG, key: value})


@pytest.mark.parametrize("dtype,bytes_per_weight", [("f32", 4), ("bf16", 2), ("f16", 2)])
def test_weight_matrices_are_multiplied_in_the_engines_own_copies(hf, dtype, bytes_per_weight):
    """The engine copies every f32, bf16 and f16 matrix into panels (no rows of padding here:
    every output dimension is a multiple of the vector lanes; bf16 rows are padded to a multiple
    of 32 columns, AMX's tile depth) and stops holding the sources; a tied head is one copy,
    whose rows the embedding lookups read too. q8_0 matrices are copied as they are (those whose
    columns are no multiple of 32 stay f32, in panels), and their sources dropped too."""
    model = lmdecode.Model.load(hf["path"], dtype=dtype)
    embeddings = ("model.embed_tokens.weight", "transformer.wte.weight", "transformer.wpe.weight")
    # lm_head.weight is in the state dict, tied or not
    matrices = [a.shape for k, a in hf["state"].items() if a.ndim == 2 and k not in embeddings]
    cols = (lambda n: -(-n // 32) * 32) if dtype == "bf16" else (lambda n: n)
    assert any(n % 32 for _, n in matrices) == (hf["kind"] == "llama_wide")  # padding is tested somewhere
    assert model._engine.panel_bytes == sum(d * cols(n) for d, n in matrices) * bytes_per_weight
    borrowed = model._engine.borrowed
    assert not any(name == "output" or name.split(".")[-1].startswith("w") for name in borrowed)
    assert ("token_embedding" in borrowed) == (hf["kind"] not in ("qwen2", "gpt2"))  # untied: looked up in place
    q8_0 = lmdecode.Model.load(hf["path"], dtype="q8_0")._engine
    f32_left = sum(a.nbytes for k, a in hf["state"].items() if a.ndim == 2 and k not in embeddings and a.shape[1] % 32)
    assert q8_0.panel_bytes == f32_left
    assert not any(name == "output" or name.split(".")[-1].startswith("w") for name in q8_0.borrowed)


def test_incremental_decoding_equals_full_recompute(hf):
    model = lmdecode.Model.load(hf["path"])
    full = model.logits(hf["tokens"])
    cache = model.new_cache()
    rows = [model.forward(hf["tokens"][:20], cache, logits="all")]
    for t in hf["tokens"][20:]:
        rows.append(model.forward([t], cache)[None])
    assert len(cache) == T
    np.testing.assert_allclose(np.concatenate(rows), full, rtol=0, atol=1e-6 * float(np.ptp(full)))


def test_logits_do_not_depend_on_the_cache_block_size(hf):
    """Attention's arithmetic is fixed by the head size, never by how the cache cuts the
    sequence into blocks: the values are summed in accumulator sets by position (also for block
    sizes that are not a multiple of the sets), and a score is one lane of a vector whatever run
    of positions filled the vector (blocks shorter than a vector, or 20 positions: a full run
    and a short one) and whatever queries shared it (a prefill's six, one decoding)."""
    model = lmdecode.Model.load(hf["path"])
    toks = hf["tokens"]
    want = model.forward(toks, model.new_cache(), logits="all")
    for block_size in (1, 3, 5, 7, 20, 64):
        cache = model.new_cache(capacity=T + 8, block_size=block_size)
        got = [model.forward(toks[:13], cache, logits="all")]
        got += [model.forward([t], cache)[None] for t in toks[13:]]
        np.testing.assert_array_equal(np.concatenate(got), want, err_msg=f"block_size={block_size}")


def test_truncate_then_redecode_equals_never_decoded(hf):
    model = lmdecode.Model.load(hf["path"])
    toks = hf["tokens"]
    other = (toks[20:30] + 7) % 96
    cache = model.new_cache(capacity=64, block_size=8)
    model.forward(toks[:30], cache)
    free_after_30 = cache.free_blocks
    cache.truncate(20)
    assert len(cache) == 20 and cache.free_blocks == free_after_30 + 1  # block of positions 24..29 freed
    got = model.forward(other, cache, logits="all")
    fresh = model.logits(np.concatenate([toks[:20], other]))[20:]
    np.testing.assert_array_equal(got, fresh)


def test_fork_shares_prefix_and_diverges(hf):
    model = lmdecode.Model.load(hf["path"])
    toks = hf["tokens"]
    cache = model.new_cache(capacity=128, block_size=16)
    model.forward(toks[:40], cache)
    free_before = cache.free_blocks
    beam = cache.fork()
    assert len(beam) == 40 and beam.free_blocks == free_before  # no block copied by the fork
    a = model.forward(toks[40:44], cache, logits="all")
    b = model.forward(toks[50:54], beam, logits="all")
    np.testing.assert_array_equal(a, model.logits(toks[:44])[40:])
    np.testing.assert_array_equal(b, model.logits(np.concatenate([toks[:40], toks[50:54]]))[40:])
    # positions 32..39 sat in a shared, partly filled block: each writer took a private copy
    assert beam.free_blocks == free_before - 1


def test_batch_of_sequences_equals_separate_calls(hf):
    model = lmdecode.Model.load(hf["path"])
    toks = hf["tokens"]
    root = model.new_cache(capacity=256)
    model.forward(toks[:10], root)
    c1, c2 = root.fork(), root.fork()
    out = model.forward_batch([toks[10:13], toks[30:31], toks[40:45]], [root, c1, c2], logits="all")
    assert [o.shape for o in out] == [(3, 96), (1, 96), (5, 96)]
    np.testing.assert_array_equal(out[0], model.logits(toks[:13])[10:])
    np.testing.assert_array_equal(out[1], model.logits(np.concatenate([toks[:10], toks[30:31]]))[10:])
    np.testing.assert_array_equal(out[2], model.logits(np.concatenate([toks[:10], toks[40:45]]))[10:])
    assert [len(root), len(c1), len(c2)] == [13, 11, 15]


def test_new_caches_hold_a_full_capacity_each(hf):
    """new_caches(n, capacity): n independent sequences of one pool, each able to take `capacity`
    positions while the others hold theirs (a cache and its forks share new_cache's capacity)."""
    model = lmdecode.Model.load(hf["path"])
    toks = hf["tokens"]
    caches = model.new_caches(3, capacity=20, block_size=8)
    assert [len(c) for c in caches] == [0, 0, 0] and caches[0].free_blocks == 9
    prompts = [toks[:20], toks[20:40], toks[40:60]]
    outs = model.forward_batch(prompts, caches, logits="all")
    for prompt, out in zip(prompts, outs):
        np.testing.assert_array_equal(out, model.logits(prompt))
    assert [len(c) for c in caches] == [20, 20, 20]
    shared = model.new_cache(capacity=20, block_size=8)
    with pytest.raises(ValueError):  # a cache and its fork: 20 positions between them
        model.forward_batch(prompts[:2], [shared, shared.fork()])
    with pytest.raises(ValueError, match=r"n \(=0\) must be >= 1"):
        model.new_caches(0)
    with pytest.raises(ValueError, match="share a pool: make them with model.new_caches"):
        model.forward_batch(prompts[:2], [model.new_cache(), model.new_cache()])


def test_logit_rows_requested_by_index(hf):
    model = lmdecode.Model.load(hf["path"])
    full = model.logits(hf["tokens"])
    got = model.forward(hf["tokens"], model.new_cache(), logits=np.array([63, 0, 5, 5]))
    np.testing.assert_array_equal(got, full[[63, 0, 5, 5]])


def test_thread_count_does_not_change_results(hf):
    """64 positions are enough work for attention to run in parallel: over kv heads, and with
    1 or 2 kv heads (qwen2, llama) over parts of the tokens too, cut differently per thread count."""
    model = lmdecode.Model.load(hf["path"])
    old = lmdecode.get_num_threads()
    try:
        lmdecode.set_num_threads(1)
        one = model.logits(hf["tokens"])
        for threads in (2, 3):
            lmdecode.set_num_threads(threads)
            np.testing.assert_array_equal(model.logits(hf["tokens"]), one, err_msg=f"{threads} threads")
    finally:
        lmdecode.set_num_threads(old)


# documented tolerances of reduced-precision storage, relative to the f32 logit range (4-bit
# weights: 0.15-0.20 measured on these random-weight models, whose weights 16 levels fit worst)
STORAGE_TOLERANCE = {"bf16": 2e-2, "f16": 2e-3, "q8_0": 2e-2, "q4_0": 0.3, "q4_1": 0.3}


@pytest.mark.parametrize("dtype", ["bf16", "f16", "q8_0", "q4_0", "q4_1"])
def test_reduced_precision_storage(hf, dtype):
    model = lmdecode.Model.load(hf["path"], dtype=dtype)
    assert model.config.dtype == dtype
    _assert_close_to(hf["ref"], model.logits(hf["tokens"]), STORAGE_TOLERANCE[dtype])


def test_chunked_prefill_equals_one_chunk(hf):
    small = lmdecode.Model.load(hf["path"], max_batch=7)
    big = lmdecode.Model.load(hf["path"])
    np.testing.assert_array_equal(small.logits(hf["tokens"]), big.logits(hf["tokens"]))


# ---------------------------------------------------------------------------- bad input


def test_tensor_shape_disagreeing_with_config(hf, tmp_path):
    for f in hf["path"].iterdir():
        shutil.copy(f, tmp_path / f.name)
    cfg = json.loads((tmp_path / "config.json").read_text())
    key = "n_inner" if hf["kind"] == "gpt2" else "intermediate_size"
    cfg[key] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model\.safetensors.*tensor '.*(mlp|c_fc).*' has shape"):
        lmdecode.Model.load(tmp_path)


def test_missing_tensors_are_named_as_hugging_face_names_them(hf):
    """Whatever tensor is left out of from_numpy's weights, the error names it as the state
    dict does (not by the engine's internal name)."""
    import re

    layer_names = [k for k in hf["state"] if ".0." in k and not k.endswith((".attn.bias", ".attn.masked_bias"))]
    top_names = [k for k in hf["state"] if ".0." not in k and ".1." not in k and k != "lm_head.weight"]
    for name in layer_names + top_names:
        weights = {k: v for k, v in hf["state"].items() if k != name}
        with pytest.raises(ValueError, match=re.escape(f"tensor {name!r} is missing")):
            lmdecode.Model.from_numpy(hf["config"], weights)


def test_unsupported_architecture(hf, tmp_path):
    shutil.copy(hf["path"] / "model.safetensors", tmp_path / "model.safetensors")
    cfg = json.loads((hf["path"] / "config.json").read_text())
    cfg["architectures"] = ["BertForMaskedLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json: architecture 'BertForMaskedLM' is not supported"):
        lmdecode.Model.load(tmp_path)


def test_config_sizes_missing_or_not_numbers(hf, tmp_path):
    """A config.json without a size, or with one that is not a positive integer (or a float
    setting that is not a number), names the file and the key, for every architecture."""
    shutil.copy(hf["path"] / "model.safetensors", tmp_path / "model.safetensors")
    good = json.loads((hf["path"] / "config.json").read_text())
    gpt2 = hf["kind"] == "gpt2"
    size, eps = ("n_layer", "layer_norm_epsilon") if gpt2 else ("num_hidden_layers", "rms_norm_eps")
    edits = [(lambda c: c.pop(size), f"config has no '{size}'"),
             (lambda c: c.update({size: "2"}), f"config '{size}' \\(='2'\\) must be a positive integer"),
             (lambda c: c.update({size: 0}), f"config '{size}' \\(=0\\) must be a positive integer"),
             (lambda c: c.update({eps: "tiny"}), f"config '{eps}' \\(='tiny'\\) must be a number")]
    if not gpt2:  # an explicit head_dim of 0 is not "the default"
        edits.append((lambda c: c.update({"head_dim": 0}), "config 'head_dim' \\(=0\\) must be a positive integer"))
    for edit, message in edits:
        cfg = dict(good)
        edit(cfg)
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match="config.json: " + message):
            lmdecode.Model.load(tmp_path)


def test_truncated_safetensors(hf, tmp_path):
    shutil.copy(hf["path"] / "config.json", tmp_path / "config.json")
    data = (hf["path"] / "model.safetensors").read_bytes()
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        (tmp_path / "model.safetensors").write_bytes(data[:cut])
        with pytest.raises(ValueError, match="model.safetensors"):
            lmdecode.Model.load(tmp_path)


def test_bad_tokens_and_context_overflow(hf):
    model = lmdecode.Model.load(hf["path"])
    cache = model.new_cache()
    with pytest.raises(ValueError, match=r"tokens\[2\] \(=96\) is outside the vocabulary \[0, 96\)"):
        model.forward([1, 2, 96], cache)
    with pytest.raises(ValueError, match=r"tokens\[0\] \(=-1\)"):
        model.logits([-1])
    with pytest.raises(TypeError, match="must hold integers"):
        model.logits([1.5])
    # short lists of Python ints are checked in Python, others through NumPy: the same errors
    with pytest.raises(TypeError, match="tokens must hold integers, not bool"):
        model.forward([True], cache)
    with pytest.raises(ValueError, match=r"tokens\[70\] \(=96\) is outside the vocabulary \[0, 96\)"):
        model.forward([1] * 70 + [96], cache)
    with pytest.raises(ValueError, match=r"tokens\[1\] \(=-5\) is outside the vocabulary"):
        model.forward([np.int64(1), np.int64(-5)], cache)
    with pytest.raises(TypeError, match="cache must be a KVCache"):
        model.forward([1], object())
    assert len(cache) == 0  # the failed calls appended nothing
    model.forward(hf["tokens"][:60], cache)
    ctx = model.config.context_length
    model.forward(np.zeros(ctx - 60, dtype=np.int64), cache)
    with pytest.raises(ValueError, match="exceed the context length"):
        model.forward([1], cache)
    assert len(cache) == ctx  # unchanged by the failed call
    with pytest.raises(ValueError, match=r"length \(=999\)"):
        cache.truncate(999)
    with pytest.raises(ValueError, match="more than the context length"):
        model.logits(np.zeros(ctx + 1, dtype=np.int64))


def test_pool_exhaustion_leaves_cache_unchanged(hf):
    model = lmdecode.Model.load(hf["path"])
    cache = model.new_cache(capacity=48, block_size=16)  # 3 blocks
    model.forward(hf["tokens"][:20], cache)  # 2 blocks
    other = cache.fork()
    model.forward(hf["tokens"][20:30], cache)  # copies the shared, partly filled block: pool full
    assert cache.free_blocks == 0
    with pytest.raises(ValueError, match="free blocks"):
        model.forward(hf["tokens"][:13], other)  # positions 20..32 need a new block
    assert len(other) == 20 and len(cache) == 30
    del cache
    model.forward(hf["tokens"][:13], other)  # room again once the other cache is gone
    assert len(other) == 33


V_SMALL = 50  # vocabulary of _one_layer_llama


def _one_layer_llama(rng, *, n_heads, n_kv_heads, head_dim, context, edit=None):
    """A one-layer Llama with random NumPy weights (untied head, unit norms), loaded by from_numpy;
    edit(weights) may change the weights first."""
    V, FF = V_SMALL, 64
    D, kv = n_heads * head_dim, n_kv_heads * head_dim
    cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=V, hidden_size=D,
               intermediate_size=FF, num_hidden_layers=1, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
               max_position_embeddings=context, rms_norm_eps=1e-5, tie_word_embeddings=False)
    p = "model.layers.0."
    w = {"model.embed_tokens.weight": rng.normal(0, 0.5, (V, D)), "model.norm.weight": np.ones(D),
         "lm_head.weight": rng.normal(0, 0.5, (V, D)), p + "input_layernorm.weight": np.ones(D),
         p + "post_attention_layernorm.weight": np.ones(D)}
    for name, shape in (("self_attn.q_proj", (D, D)), ("self_attn.k_proj", (kv, D)), ("self_attn.v_proj", (kv, D)),
                        ("self_attn.o_proj", (D, D)), ("mlp.gate_proj", (FF, D)), ("mlp.up_proj", (FF, D)),
                        ("mlp.down_proj", (D, FF))):
        w[p + name + ".weight"] = rng.normal(0, 1 / np.sqrt(shape[1]), shape)
    if edit is not None:
        edit(w)
    return lmdecode.Model.from_numpy(cfg, {k: v.astype(np.float32) for k, v in w.items()})


@pytest.mark.parametrize("head_dim", [8, 16, 24, 32, 40, 64, 128])
def test_attention_is_bit_identical_for_any_split_and_head_size(head_dim):
    """A prefill, token-by-token decoding and caches of any block size give the very same
    logits, for head sizes the attention kernels unroll (64: four 16-feature steps) and for
    sizes they take at run time (24, 40: 16-feature steps and an 8-feature one). A prefill
    scores neighbouring queries six at a time and sums their values three at a time, decoding
    one by one; heads of 8 and 16 features prefill in query tiles (one query per vector lane),
    here from position 0 and from positions 11 and 27, across block boundaries."""
    rng = np.random.default_rng(head_dim)
    model = _one_layer_llama(rng, n_heads=2, n_kv_heads=2, head_dim=head_dim, context=80)
    toks = rng.integers(0, V_SMALL, 70)
    want = model.forward(toks, model.new_cache(), logits="all")
    assert np.ptp(want) > 1.0  # not degenerate
    for block_size in (1, 5, 16, 64):
        cache = model.new_cache(capacity=72, block_size=block_size)
        got = [model.forward(toks[:11], cache, logits="all")]
        got += [model.forward([t], cache)[None] for t in toks[11:40]]
        got += [model.forward(toks[40:], cache, logits="all")]
        np.testing.assert_array_equal(np.concatenate(got), want, err_msg=f"block_size={block_size}")
        cache = model.new_cache(capacity=72, block_size=block_size)
        got = [model.forward([t], cache)[None] for t in toks[:11]]
        got += [model.forward(toks[11:27], cache, logits="all"), model.forward(toks[27:], cache, logits="all")]
        np.testing.assert_array_equal(np.concatenate(got), want, err_msg=f"block_size={block_size}, tiles at 11")
    old = lmdecode.get_num_threads()
    try:
        lmdecode.set_num_threads(2)
        np.testing.assert_array_equal(model.forward(toks, model.new_cache(), logits="all"), want, err_msg="2 threads")
    finally:
        lmdecode.set_num_threads(old)


def test_part_filled_query_tiles_in_a_batch_of_sequences():
    """Sequences prefilled together in one forward_batch, on one and two threads: prompts of 9,
    12 and 15 tokens fill query tiles in part (the rest of their lanes dropped), 30 tokens one
    and a part, 3 tokens none; the logits equal each prompt's own prefill bit for bit."""
    rng = np.random.default_rng(5)
    model = _one_layer_llama(rng, n_heads=2, n_kv_heads=1, head_dim=8, context=64)
    prompts = [rng.integers(0, V_SMALL, n) for n in (12, 9, 15, 30, 3)]
    alone = [model.forward(p, model.new_cache(), logits="all") for p in prompts]
    old = lmdecode.get_num_threads()
    try:
        for threads in (1, 2):  # two threads cut the tokens between them (one kv head)
            lmdecode.set_num_threads(threads)
            root = model.new_cache(capacity=160)
            got = model.forward_batch(prompts, [root] + [root.fork() for _ in prompts[1:]], logits="all")
            for i, (g, a) in enumerate(zip(got, alone)):
                np.testing.assert_array_equal(g, a, err_msg=f"prompt {i}, {threads} threads")
    finally:
        lmdecode.set_num_threads(old)


@pytest.mark.parametrize("head_dim", [8, 16])
def test_query_tiles_never_read_later_positions(head_dim):
    """A token whose value overflows to inf (its embedding's feature 0 times a huge weight) turns
    the attention of every later query into inf/NaN, and must not touch the earlier queries of its
    prefill tile: their logits stay finite and equal token-by-token decoding's (a masked 0 weight
    times inf would be NaN)."""
    poison = 7

    def edit(w):
        emb = w["model.embed_tokens.weight"]
        emb[:, 0] = 0.0
        emb[poison, 0] = 1.0
        w["model.layers.0.self_attn.v_proj.weight"][:, 0] = 3e38

    rng = np.random.default_rng(head_dim)
    model = _one_layer_llama(rng, n_heads=2, n_kv_heads=1, head_dim=head_dim, context=64, edit=edit)
    toks = rng.integers(0, V_SMALL, 40)
    toks[toks == poison] = poison + 1
    toks[25] = poison
    cache = model.new_cache()
    one_by_one = np.stack([model.forward([t], cache) for t in toks])
    assert np.isfinite(one_by_one[:25]).all() and not np.isfinite(one_by_one[25:]).all()
    got = model.forward(toks, model.new_cache(), logits="all")
    np.testing.assert_array_equal(got[:25], one_by_one[:25])


@pytest.mark.parametrize("n_heads,n_kv_heads", [(8, 1), (14, 2), (9, 3), (6, 6)])
def test_grouped_query_attention_tiles(n_heads, n_kv_heads):
    """The query heads of a kv group share their key and value loads in tiles of at most six
    queries: groups of 8 and 7 are cut into tiles of 6 + 2 and 6 + 1 heads, a group of 3 takes
    two tokens per tile, and without grouping (6, 6) a tile is six tokens. Against transformers,
    and bit for bit between a prefill, token-by-token decoding and 1, 2 or 3 threads (which cut
    the tokens into different parts when there are few kv heads)."""
    torch, transformers = require_transformers()
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=16 * n_heads, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                                   max_position_embeddings=128, tie_word_embeddings=False, attn_implementation="eager")
    torch_model = _randomise(torch, transformers.LlamaForCausalLM(cfg), seed=n_heads)
    toks = np.random.default_rng(n_heads).integers(0, 96, size=T)
    with torch.no_grad():
        ref = torch_model(torch.tensor(toks[None], dtype=torch.long)).logits[0].numpy()
    model = lmdecode.Model.from_numpy(cfg.to_dict(), {k: v.detach().numpy().copy()
                                                      for k, v in torch_model.state_dict().items()})
    old = lmdecode.get_num_threads()
    try:
        lmdecode.set_num_threads(1)
        want = model.logits(toks)
        _assert_close_to(ref, want)
        cache = model.new_cache()
        got = [model.forward(toks[:21], cache, logits="all")] + [model.forward([t], cache)[None] for t in toks[21:]]
        np.testing.assert_array_equal(np.concatenate(got), want)
        for threads in (2, 3):
            lmdecode.set_num_threads(threads)
            np.testing.assert_array_equal(model.logits(toks), want, err_msg=f"{threads} threads")
    finally:
        lmdecode.set_num_threads(old)


@pytest.mark.parametrize("n_heads,n_kv_heads", [(8, 1), (6, 2)])
def test_long_decode_splits_query_heads_across_threads(n_heads, n_kv_heads):
    """Decoding one token after 300 positions is enough attention work for threads; with fewer
    kv heads than two per thread the kv heads' query heads are split between them. Logits equal
    the prefill's and each other's for 1, 2 and 3 threads."""
    rng = np.random.default_rng(n_heads)
    n = 304
    model = _one_layer_llama(rng, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=64, context=512)
    toks = rng.integers(0, V_SMALL, n)
    old = lmdecode.get_num_threads()
    try:
        lmdecode.set_num_threads(1)
        want = model.logits(toks)[300:]
        assert np.ptp(want) > 1.0  # not degenerate
        for threads in (1, 2, 3):
            lmdecode.set_num_threads(threads)
            cache = model.new_cache(capacity=n)
            model.forward(toks[:300], cache)
            got = np.stack([model.forward([t], cache) for t in toks[300:]])
            np.testing.assert_array_equal(got, want, err_msg=f"{threads} threads")
    finally:
        lmdecode.set_num_threads(old)


@pytest.mark.parametrize("head_dim,n_heads,n_kv_heads", [(80, 4, 2), (96, 3, 1), (256, 2, 1)])
def test_head_sizes_without_unrolled_value_sums(head_dim, n_heads, n_kv_heads):
    """Head sizes the value sums do not unroll (they add the positions in order, one chain),
    with multi- and grouped-query attention, against transformers over 150 positions (several
    cache blocks, partial runs), and bit for bit between a prefill and token-by-token decoding."""
    torch, transformers = require_transformers()
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=head_dim * n_heads, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                                   max_position_embeddings=256, tie_word_embeddings=False, attn_implementation="eager")
    torch_model = _randomise(torch, transformers.LlamaForCausalLM(cfg), seed=head_dim)
    toks = np.random.default_rng(head_dim).integers(0, 96, size=150)
    with torch.no_grad():
        ref = torch_model(torch.tensor(toks[None], dtype=torch.long)).logits[0].numpy()
    model = lmdecode.Model.from_numpy(cfg.to_dict(), {k: v.detach().numpy().copy()
                                                      for k, v in torch_model.state_dict().items()})
    want = model.logits(toks)
    _assert_close_to(ref, want)
    cache = model.new_cache()
    got = [model.forward(toks[:37], cache, logits="all")] + [model.forward([t], cache)[None] for t in toks[37:]]
    np.testing.assert_array_equal(np.concatenate(got), want)


# ---------------------------------------------------------------------------- loading audit


def _copy_checkpoint(hf, path, config_edit=None, drop=()):
    """hf's checkpoint in path, its config.json edited and the tensors in drop left out."""
    from safetensors.numpy import load_file, save_file

    cfg = json.loads((hf["path"] / "config.json").read_text())
    if config_edit is not None:
        config_edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))
    weights = {k: v for k, v in load_file(hf["path"] / "model.safetensors").items() if k not in drop}
    save_file(weights, path / "model.safetensors")
    return path


def test_a_corrupt_layer_count_fails_at_once_naming_the_key(hf, tmp_path):
    """num_hidden_layers (n_layer) of 2,000,000 took 131 s and 10.7 GB before an error about the
    first missing tensor (100,000 here: 7 s before); the tensors' layers bound it before anything
    is built per layer."""
    import time
    key = "n_layer" if hf["kind"] == "gpt2" else "num_hidden_layers"
    _copy_checkpoint(hf, tmp_path, lambda c: c.update({key: 100_000}))
    start = time.perf_counter()
    with pytest.raises(ValueError, match=rf"model\.safetensors: config '{key}' \(=100000\) exceeds the 2 layers the "
                                         r"tensors hold \(none of layer 2\)"):
        lmdecode.Model.load(tmp_path)
    with pytest.raises(ValueError, match=rf"^from_numpy weights: config '{key}' \(=100000\) exceeds the 2 layers"):
        lmdecode.Model.from_numpy({**hf["config"], key: 100_000}, hf["state"])
    assert time.perf_counter() - start < 5


def test_a_missing_head_is_an_error_unless_the_config_ties_it(hf, tmp_path):
    """Without lm_head.weight the head is the embedding only when tie_word_embeddings says so
    (left out: transformers' default, false for Llama, Mistral and Qwen2, true for GPT-2); an
    untied model silently ran on its embedding as head, where transformers reports lm_head.weight
    MISSING. From a directory, from a sharded index that leaves it out, and from from_numpy."""
    tied_by_default = hf["kind"] == "gpt2"
    # qwen2 and gpt2 are tied (their files have no head), the llamas not
    assert lmdecode.Model.load(hf["path"]).config.tied_embeddings == hf["config"]["tie_word_embeddings"]
    untie = lambda c: c.update({"tie_word_embeddings": False})  # noqa: E731
    weights = {k: v for k, v in hf["state"].items() if k != "lm_head.weight"}
    missing = (r"tensor 'lm_head\.weight' is missing and the config does not tie the head to the embedding "
               r"\(tie_word_embeddings is false, or left out: false for Llama, Mistral and Qwen2\)")
    _copy_checkpoint(hf, tmp_path, untie, drop=("lm_head.weight",))
    with pytest.raises(ValueError, match=r"model\.safetensors: " + missing):
        lmdecode.Model.load(tmp_path)
    with pytest.raises(ValueError, match=r"^from_numpy weights: " + missing):
        lmdecode.Model.from_numpy({**hf["config"], "tie_word_embeddings": False}, weights)
    absent = {k: v for k, v in hf["config"].items() if k != "tie_word_embeddings"}
    if tied_by_default:
        assert lmdecode.Model.from_numpy(absent, weights).config.tied_embeddings
    else:
        with pytest.raises(ValueError, match=missing):
            lmdecode.Model.from_numpy(absent, weights)
    # a sharded checkpoint whose index leaves the head out
    sharded = tmp_path / "sharded"
    hf["torch_model"].save_pretrained(sharded, safe_serialization=True, max_shard_size="40KB")
    cfg = json.loads((sharded / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (sharded / "config.json").write_text(json.dumps(cfg))
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    if "lm_head.weight" in index["weight_map"]:
        del index["weight_map"]["lm_head.weight"]
        (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"sharded: " + missing):
        lmdecode.Model.load(sharded)


def test_a_checkpoint_head_is_used_as_transformers_uses_it(tmp_path):
    """tie_word_embeddings true and an lm_head.weight of its own in the file: transformers (5.x)
    keeps that head (its values differ from the embedding's), and so does lmdecode, whose
    config.tied_embeddings then says false; a state_dict listing the one tensor under both names,
    or an equal copy, is one head, tied."""
    torch, transformers = require_transformers()
    from safetensors.torch import load_file, save_file

    model = _build("qwen2", torch, transformers)  # tied
    model.save_pretrained(tmp_path, safe_serialization=True)
    weights = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in weights
    weights["lm_head.weight"] = torch.randn(weights["model.embed_tokens.weight"].shape,
                                            generator=torch.Generator().manual_seed(3)) * 0.1
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    import logging
    logging.getLogger("transformers").setLevel(logging.ERROR)  # its warning about the untied head
    reloaded = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert torch.equal(reloaded.lm_head.weight, weights["lm_head.weight"])  # the file's head, untied
    tokens = np.random.default_rng(7).integers(0, 96, size=T)
    with torch.no_grad():
        ref = reloaded(torch.tensor(tokens[None], dtype=torch.long)).logits[0].numpy()
    ours = lmdecode.Model.load(tmp_path)
    assert not ours.config.tied_embeddings
    _assert_close_to(ref, ours.logits(tokens))
    # model.state_dict() of a tied model: one tensor under both names, or equal copies of it
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    for weights in (state, {k: v.detach().numpy().copy() for k, v in state.items()}):
        tied = lmdecode.Model.from_numpy(model.config, weights)
        assert tied.config.tied_embeddings
    # equal copies in a config that does not tie them stay two heads (as transformers keeps them)
    untied = dict(model.config.to_dict(), tie_word_embeddings=False)
    assert not lmdecode.Model.from_numpy(untied, {k: v.detach().numpy().copy() for k, v in state.items()}
                                         ).config.tied_embeddings


def test_special_ids_outside_the_vocabulary(tmp_path):
    """GPT2Config's defaults (bos and eos 50256) stay in the config of a small GPT-2 built with
    it; transformers runs such a model (never stopping on EOS), and lmdecode ignores the ids with
    a warning naming the file and key, as llama.cpp ignores a GGUF's. generate() then runs: it
    failed at every call with the id outside the vocabulary."""
    torch, transformers = require_transformers()
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=32,
                                                                 vocab_size=96))
    assert model.config.eos_token_id == 50256
    model.save_pretrained(tmp_path, safe_serialization=True)
    with pytest.warns(UserWarning) as caught:
        ours = lmdecode.Model.load(tmp_path)
    assert [str(w.message) for w in caught] == [
        f"{tmp_path / 'config.json'}: config 'bos_token_id' (=50256): token id 50256 outside the vocabulary [0, 96) ignored",
        f"{tmp_path / 'config.json'}: config 'eos_token_id' (=50256): token id 50256 outside the vocabulary [0, 96) ignored"]
    assert ours.config.bos_token_id is None and ours.config.eos_token_id is None
    out = ours.generate([1, 2, 3], max_new_tokens=6, temperature=0)
    assert len(out.tokens) == 6 and out.finish_reason == "length"


def test_from_numpy_copies_torch_tensors_changed_in_place_afterwards(hf):
    """Model.from_numpy holds no reference to a state_dict's tensors: scaling them in place
    afterwards (an untied embedding, norms and biases, which the engine reads in place, used to be
    the caller's memory) leaves the logits as they were, in float32 and in bfloat16."""
    torch = hf["torch"]
    for dtype in (torch.float32, torch.bfloat16):
        state = {k: v.detach().clone().to(dtype) for k, v in hf["torch_model"].state_dict().items()}
        model = lmdecode.Model.from_numpy(hf["torch_model"].config, state)
        before = model.logits(hf["tokens"][:16])
        with torch.no_grad():
            for v in state.values():
                v.mul_(0.5)
        np.testing.assert_array_equal(model.logits(hf["tokens"][:16]), before)


def _llama_state(torch, transformers, **config):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
                                   vocab_size=96, attn_implementation="eager", **config)
    model = _randomise(torch, transformers.LlamaForCausalLM(cfg), seed=5)
    return model, {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def test_rope_keys_are_read_as_transformers_reads_them(tmp_path):
    """A config.json with both rope_scaling and rope_parameters runs rope_scaling (transformers:
    rope_parameters = rope_scaling or rope_parameters; lmdecode ran the other), and a top-level
    original_max_position_embeddings overrides the llama3 dict's, as AutoModelForCausalLM loads
    them (lmdecode read the dict's: 0.3 of the logit range off); a llama3 dict without one takes
    max_position_embeddings."""
    torch, transformers = require_transformers()
    tokens = np.random.default_rng(2).integers(0, 96, size=T)
    llama3 = dict(ROPE_SCALINGS["llama3"], rope_theta=10000.0)
    no_original = {k: v for k, v in llama3.items() if k != "original_max_position_embeddings"}
    for i, (rope, edit) in enumerate([
            ({"rope_type": "default", "rope_theta": 10000.0}, {"rope_scaling": {"type": "linear", "factor": 4.0}}),
            (llama3, {"original_max_position_embeddings": 8}),
            (llama3, {"rope_parameters": no_original})]):
        model, _ = _llama_state(torch, transformers, rope_parameters=rope)
        path = tmp_path / str(i)
        model.save_pretrained(path, safe_serialization=True)
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, **edit}))
        oracle = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                   attn_implementation="eager")
        with torch.no_grad():
            ref = oracle(torch.tensor(tokens[None])).logits[0].numpy()
            plain = model(torch.tensor(tokens[None])).logits[0].numpy()
        assert np.abs(ref - plain).max() > 1e-2 * (ref.max() - ref.min())  # the edit changes the model
        _assert_close_to(ref, lmdecode.Model.load(path).logits(tokens))


def test_a_mistral_config_without_sliding_window_has_mistrals_4096():
    """MistralConfig's default window is 4096: a config.json without the key attended over the
    whole max_position_embeddings (0.16 of the logit range off from position 4096 on); an
    explicit null is no window."""
    from lmdecode import loaders
    mistral = dict(LLAMA_CONFIG, architectures=["MistralForCausalLM"], model_type="mistral",
                   max_position_embeddings=8192)
    assert loaders.hf_config("config.json", mistral)["context_length"] == 4096
    assert loaders.hf_config("config.json", dict(mistral, sliding_window=None))["context_length"] == 8192
    assert loaders.hf_config("config.json", dict(mistral, sliding_window=100))["context_length"] == 100
    qwen2 = dict(LLAMA_CONFIG, architectures=["Qwen2ForCausalLM"], model_type="qwen2", max_position_embeddings=8192)
    assert loaders.hf_config("config.json", qwen2)["context_length"] == 8192  # use_sliding_window defaults off
    assert loaders.hf_config("config.json", dict(qwen2, use_sliding_window=True))["context_length"] == 4096


def test_biases_and_model_types_the_config_does_not_describe_are_refused():
    """A checkpoint's bias the configured architecture lacks (Llama without attention_bias,
    Mistral, Qwen2's o_proj) was added to the projections, where transformers drops it as an
    unexpected weight: 46% of the logit range apart. A model_type that names another class than
    architectures was ignored, where transformers' Auto classes build the model_type's class."""
    torch, transformers = require_transformers()
    model, state = _llama_state(torch, transformers, attention_bias=True)
    config = model.config.to_dict()
    lmdecode.Model.from_numpy(config, state)  # attention_bias: q, k, v and o biases belong
    for changes, name in [(dict(attention_bias=False), "q_proj"),
                          (dict(architectures=["MistralForCausalLM"], model_type="mistral"), "q_proj")]:
        with pytest.raises(ValueError, match=rf"from_numpy weights: tensor 'model\.layers\.0\.self_attn\.{name}\.bias' "
                                             r"is a bias the configured architecture does not have"):
            lmdecode.Model.from_numpy(dict(config, **changes), state)
    qwen2 = dict(config, architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.o_proj\.bias' is a bias the configured "
                                         r"architecture does not have \(Qwen2ForCausalLM\)"):
        lmdecode.Model.from_numpy(qwen2, state)
    with pytest.raises(ValueError, match=r"config 'model_type' \(='mistral'\) is not LlamaForCausalLM's \('llama'\)"):
        lmdecode.Model.from_numpy(dict(config, architectures=["LlamaForCausalLM"], model_type="mistral"), state)
