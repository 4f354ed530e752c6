"""Weights the storage dtype cannot hold are ValueErrors naming the file and the tensor as the
file names it (GGUF, safetensors, from_numpy), never infinities or NaN logits at run time."""
import json
import re

import numpy as np
import pytest

import lmdecode
from lmdecode import loaders
from gguf_files import write_gguf

gguf = pytest.importorskip("gguf")

VOCAB, DIM, HIDDEN = 32, 64, 64  # 64 columns: every matrix is quantized in q8_0 and q4 storage
HF_CONFIG = {"architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB, "hidden_size": DIM,
             "intermediate_size": HIDDEN, "num_hidden_layers": 1, "num_attention_heads": 2,
             "max_position_embeddings": 16}
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
# Hugging Face name -> GGUF name (llama.cpp's); the q and k rows are not permuted: only the
# tensor names and values matter to these tests
HF_TO_GGUF = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight", "model.layers.0.input_layernorm.weight": "blk.0.attn_norm.weight",
              "model.layers.0.post_attention_layernorm.weight": "blk.0.ffn_norm.weight",
              Q_PROJ: "blk.0.attn_q.weight", "model.layers.0.self_attn.k_proj.weight": "blk.0.attn_k.weight",
              "model.layers.0.self_attn.v_proj.weight": "blk.0.attn_v.weight",
              "model.layers.0.self_attn.o_proj.weight": "blk.0.attn_output.weight",
              "model.layers.0.mlp.gate_proj.weight": "blk.0.ffn_gate.weight",
              "model.layers.0.mlp.up_proj.weight": "blk.0.ffn_up.weight",
              "model.layers.0.mlp.down_proj.weight": "blk.0.ffn_down.weight"}


def llama_weights(seed=0, scale=0.1):
    """A one-layer Llama's float32 parameters under their Hugging Face names, N(0, scale)."""
    rng = np.random.default_rng(seed)
    shapes = {"model.embed_tokens.weight": (VOCAB, DIM), "model.norm.weight": (DIM,), "lm_head.weight": (VOCAB, DIM),
              "model.layers.0.input_layernorm.weight": (DIM,), "model.layers.0.post_attention_layernorm.weight": (DIM,),
              Q_PROJ: (DIM, DIM), "model.layers.0.self_attn.k_proj.weight": (DIM, DIM),
              "model.layers.0.self_attn.v_proj.weight": (DIM, DIM),
              "model.layers.0.self_attn.o_proj.weight": (DIM, DIM),
              "model.layers.0.mlp.gate_proj.weight": (HIDDEN, DIM), "model.layers.0.mlp.up_proj.weight": (HIDDEN, DIM),
              "model.layers.0.mlp.down_proj.weight": (DIM, HIDDEN)}
    return {k: rng.normal(0, scale, s).astype(np.float32) for k, s in shapes.items()}


def write_llama_gguf(path, weights, kinds=None):
    """weights (Hugging Face names) as a llama GGUF: F32, or the GGML type kinds[hf_name] gives."""
    meta = {"llama.embedding_length": DIM, "llama.block_count": 1, "llama.attention.head_count": 2,
            "llama.attention.head_count_kv": 2, "llama.feed_forward_length": HIDDEN, "llama.context_length": 16,
            "llama.attention.layer_norm_rms_epsilon": 1e-5}
    kinds = kinds or {}
    write_gguf(path, "llama", meta, {HF_TO_GGUF[k]: (v, kinds.get(k, "F32")) for k, v in weights.items()})
    return path


def write_hf_dir(path, weights):
    from safetensors.numpy import save_file

    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(HF_CONFIG))
    save_file(weights, str(path / "model.safetensors"))
    return path


def _loaders(tmp_path):
    """(where the messages name the tensor, a function loading weights in a dtype) for a GGUF
    file, a safetensors checkpoint directory and from_numpy."""
    gguf_path, hf_dir, at = tmp_path / "tiny.gguf", tmp_path / "hf", re.escape(str(tmp_path))
    return [(rf"{at}/tiny\.gguf: tensor 'blk\.0\.attn_q\.weight'",
             lambda w, dtype: lmdecode.Model.load(write_llama_gguf(gguf_path, w), dtype=dtype)),
            (rf"{at}/hf/model\.safetensors: tensor 'model\.layers\.0\.self_attn\.q_proj\.weight'",
             lambda w, dtype: lmdecode.Model.load(write_hf_dir(hf_dir, w), dtype=dtype)),
            (r"from_numpy weights: tensor 'model\.layers\.0\.self_attn\.q_proj\.weight'",
             lambda w, dtype: lmdecode.Model.from_numpy(HF_CONFIG, w, dtype=dtype))]


def test_storage_errors_name_the_file_and_its_tensor(tmp_path):
    """A value beyond f16's range in f16 storage, and a non-finite one in q8_0 and q4 storage,
    are named by file and by the file's own tensor name (they were named
    'layers.0.wq', lmdecode's internal name, without the file)."""
    for where, load in _loaders(tmp_path):
        weights = llama_weights()
        assert np.isfinite(load(weights, "f16").logits([1, 2, 3])).all()
        weights[Q_PROJ][3, 5] = -7e4
        with pytest.raises(ValueError, match=rf"^{where}: values beyond the f16 range \(largest magnitude 70000; "
                                             r"f16 holds 65504\): choose another dtype$"):
            load(weights, "f16")
        weights[Q_PROJ][3, 5] = np.nan
        for dtype in ("q8_0", "q4_0", "q4_1"):
            with pytest.raises(ValueError, match=rf"^{where}: .*non-finite.* {dtype}"):
                load(weights, dtype)


def test_gpt2_fused_qkv_is_named_as_the_checkpoint_names_it():
    """GPT-2's q, k and v come from one Conv1D tensor, which the message names."""
    rng = np.random.default_rng(1)
    D, V, P = 64, 40, 16
    config = {"architectures": ["GPT2LMHeadModel"], "vocab_size": V, "n_embd": D, "n_layer": 1, "n_head": 2,
              "n_positions": P}
    shapes = {"transformer.wte.weight": (V, D), "transformer.wpe.weight": (P, D), "transformer.ln_f.weight": (D,),
              "transformer.ln_f.bias": (D,), "transformer.h.0.ln_1.weight": (D,), "transformer.h.0.ln_1.bias": (D,),
              "transformer.h.0.attn.c_attn.weight": (D, 3 * D), "transformer.h.0.attn.c_attn.bias": (3 * D,),
              "transformer.h.0.attn.c_proj.weight": (D, D), "transformer.h.0.attn.c_proj.bias": (D,),
              "transformer.h.0.ln_2.weight": (D,), "transformer.h.0.ln_2.bias": (D,),
              "transformer.h.0.mlp.c_fc.weight": (D, 4 * D), "transformer.h.0.mlp.c_fc.bias": (4 * D,),
              "transformer.h.0.mlp.c_proj.weight": (4 * D, D), "transformer.h.0.mlp.c_proj.bias": (D,)}
    weights = {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in shapes.items()}
    weights["transformer.h.0.attn.c_attn.weight"][2, D + 7] = 1e5  # in k
    with pytest.raises(ValueError, match=r"^from_numpy weights: tensor 'transformer\.h\.0\.attn\.c_attn\.weight': "
                                         r"values beyond the f16 range"):
        lmdecode.Model.from_numpy(config, weights, dtype="f16")


def test_sources_without_a_file_keep_the_engine_name():
    """to_storage on sources built by hand (no file) names the engine's tensor, as before."""
    tensors = {"layers.0.wq": loaders.Source("f32", np.full((DIM, DIM), np.inf, np.float32), (DIM, DIM))}
    with pytest.raises(ValueError, match=r"^layers\.0\.wq: .*non-finite.* q8_0"):
        loaders.to_storage(tensors, "q8_0")
