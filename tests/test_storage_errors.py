"""Weights the storage dtype cannot hold are ValueErrors naming the file and the tensor as the
file names it (GGUF, safetensors, from_numpy), never infinities or NaN logits at run time."""
import json
import re

import numpy as np
import pytest

import lmdecode
from lmdecode import _core, loaders
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


# the fp16 scale (q4_1: and minimum) of a block: 65520, the tie between f16's largest value 65504
# and infinity, rounds to infinity; the float below it rounds to 65504
GGUF_TYPES = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1"}


def _gguf_block_overflows(x: np.ndarray, kind: str) -> bool:
    """Whether gguf's reference quantizer (llama.cpp's, in NumPy) writes an infinite fp16 scale
    or minimum for the one block x (32,): the independent account of the threshold."""
    qtype = gguf.GGMLQuantizationType[GGUF_TYPES[kind]]
    with np.errstate(over="ignore"):
        block = np.ascontiguousarray(gguf.quants.quantize(x.reshape(1, 32), qtype)).view(np.uint8).ravel()
    halves = block[:4 if kind == "q4_1" else 2].view(np.float16)
    return not np.isfinite(halves).all()


def _quantize(x: np.ndarray, kind: str) -> np.ndarray:
    return loaders.to_storage({"layers.0.wq": loaders.Source("f32", x, x.shape)}, kind)["layers.0.wq"]


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_1"])
def test_block_scales_beyond_f16_are_refused_at_the_exact_threshold(kind):
    """Finite weights whose block's fp16 scale (q8_0: amax / 127; q4_0: the value of largest
    magnitude / -8; q4_1: (max - min) / 15, and the minimum) rounds to infinity are a
    ValueError naming the row and columns; the float below each threshold quantizes, to the
    very bytes of gguf's quantizer (they were stored as infinite scales: NaN logits). gguf
    decides, independently, which side of the threshold each block is on."""
    limit = {"q8_0": 127 * 65520.0, "q4_0": 8 * 65520.0, "q4_1": 15 * 65520.0}[kind]
    blocks = []  # (32 values, what the message says when refused)
    for sign in (1, -1):
        top = np.zeros(32, np.float32)
        top[5] = sign * np.float32(limit)
        if kind == "q4_1" and sign < 0:
            top[:] = sign * np.float32(65520)  # all equal: scale 0, minimum -65520
        blocks.append(top)
        below = top.copy()
        below[below != 0] = np.nextafter(below[below != 0], np.float32(0))
        blocks.append(below)
    if kind == "q4_1":  # a large positive minimum, and a range within f16 from a minimum just inside it
        blocks += [np.full(32, 65520, np.float32), np.full(32, np.nextafter(np.float32(65520), np.float32(0)))]
        low_ok = np.zeros(32, np.float32)
        low_ok[3] = np.nextafter(np.float32(-65520), np.float32(0))
        blocks.append(low_ok)
    n_refused = 0
    for x in blocks:
        matrix = np.zeros((3, 64), np.float32)
        matrix[2, 32:] = x
        if _gguf_block_overflows(x, kind):
            n_refused += 1
            what = "minimums" if kind == "q4_1" and x.min() == x.max() else "scales"
            with pytest.raises(ValueError, match=rf"^layers\.0\.wq: values too large for {kind}'s fp16 block {what} "
                                                 r"\(row 2, columns 32 to 63: .*\): choose another dtype$"):
                _quantize(matrix, kind)
        else:
            stored = _quantize(matrix, kind)
            qtype = gguf.GGMLQuantizationType[GGUF_TYPES[kind]]
            want = np.ascontiguousarray(gguf.quants.quantize(matrix, qtype)).view(np.uint8).reshape(3, -1)
            packed = _core.pack_q8_0(want) if kind == "q8_0" else _core.pack_q4(want, kind)
            np.testing.assert_array_equal(stored.view(np.uint8), packed)
    # each threshold exactly (both signs of the scale; q4_1 a range and both signs of a minimum):
    # the floats below them pass
    assert n_refused == (3 if kind == "q4_1" else 2)


def test_finite_weights_whose_block_scales_overflow_are_named(tmp_path):
    """The report's case: q_proj[0, 0] = 1e7 loaded as q8_0 or q4_0 (-7e4 as q4_1, its block's
    minimum) gave NaN logits; now a ValueError naming the file and tensor, as f16 storage
    names a weight beyond its range. Just inside the limits the model loads and its logits
    are finite."""
    for where, load in _loaders(tmp_path):
        for dtype, bad, fine, what in [("q8_0", 1e7, 8321039.5, "scales"), ("q4_0", 1e7, 524159.97, "scales"),
                                       ("q4_1", -7e4, -65519.996, "minimums")]:
            weights = llama_weights()
            weights[Q_PROJ][0, :32] = bad  # one block, all of one value (q4_1: its minimum, not its range)
            with pytest.raises(ValueError, match=rf"^{where}: values too large for {dtype}'s fp16 block {what} "
                                                 r"\(row 0, columns 0 to 31: .*\): choose another dtype$"):
                load(weights, dtype)
            weights[Q_PROJ][0, :32] = np.float32(fine)
            model = load(weights, dtype)
            assert model.config.dtype == dtype and np.isfinite(model.logits([1, 2, 3])).all()
