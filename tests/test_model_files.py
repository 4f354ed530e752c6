"""Model files: the shared real models, GGUF tensor types, llama2.c exports and corrupt input."""
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lmdecode
from lmdecode import _core, loaders
from lmdecode.tokenizer import load_tokenizer
from gguf_files import write_gguf
from reference_model import llama_logits

MODELS = Path(__file__).parents[1] / ".." / "shared" / "models"
STORIES_BIN = MODELS / "stories260K.bin"
STORIES_GGUF = MODELS / "stories260K.gguf"
TINY_RANDOM = MODELS / "llama-2-tiny-random.gguf"
TOKENIZER = MODELS / "tok512.bin"
ONCE_UPON_A_TIME = [1, 403, 407, 261, 378]  # BOS + "Once upon a time" in tok512

gguf = pytest.importorskip("gguf")  # a runtime dependency of lmdecode, always installed with it
Q = gguf.GGMLQuantizationType


def _rel_max_diff(ref, got):
    return float(np.abs(ref - got).max()) / float(ref.max() - ref.min())


def _tokens(n, vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=n)


# ---------------------------------------------------------------------------- shared real models


def test_stories_bin_and_gguf_give_identical_logits():
    a = lmdecode.Model.load(STORIES_BIN)
    b = lmdecode.Model.load(STORIES_GGUF)
    assert a.config.context_length == 512 and b.config.context_length == 2048
    assert (a.config.dim, a.config.n_layers, a.config.n_heads, a.config.n_kv_heads) == (64, 5, 8, 4)
    toks = _tokens(64, 512)
    np.testing.assert_array_equal(a.logits(toks), b.logits(toks))


def test_stories_matches_numpy_reference():
    model = lmdecode.Model.load(STORIES_BIN)
    config, tensors, _ = loaders.read_llama2c(STORIES_BIN)
    weights = {k: np.asarray(v.data, dtype=np.float64) for k, v in tensors.items()}
    toks = _tokens(64, 512, seed=1)
    assert _rel_max_diff(llama_logits(config, weights, toks), model.logits(toks)) < 1e-4


def test_greedy_once_upon_a_time_is_tinystories_text():
    model = lmdecode.Model.load(STORIES_BIN)
    assert model.tokenizer_path.name == "tok512.bin" and len(model.vocab) == 512
    cache = model.new_cache()
    tokens = list(ONCE_UPON_A_TIME)
    logits = model.forward(tokens, cache)
    for _ in range(40):
        tokens.append(int(np.argmax(logits)))
        logits = model.forward(tokens[-1:], cache)
    text = model.tokenizer.decode(tokens)
    assert text.startswith("Once upon a time, there was a little girl named Lily."), text


def test_tiny_random_f16_gguf_matches_numpy_reference():
    """An F16 file stays f16 in the engine (half the bytes of f32), and since widening a half is
    exact its logits are those of f32 storage bit for bit."""
    model = lmdecode.Model.load(TINY_RANDOM)
    c = model.config
    assert (c.vocab_size, c.dim, c.n_layers, c.n_heads, c.dtype) == (32000, 8, 1, 2, "f16")
    assert len(model.vocab) == 32000 and model.vocab[1] == "<s>"
    config, tensors, _ = loaders.read_gguf(TINY_RANDOM)
    weights = {k: np.asarray(v.data, dtype=np.float64).reshape(v.shape) for k, v in tensors.items()}
    toks = _tokens(64, 32000, seed=2)
    assert _rel_max_diff(llama_logits(config, weights, toks), model.logits(toks)) < 1e-4
    f32 = lmdecode.Model.load(TINY_RANDOM, dtype="f32")
    np.testing.assert_array_equal(f32.logits(toks), model.logits(toks))
    assert model._engine.panel_bytes * 2 == f32._engine.panel_bytes > 0


def _one_layer_llama(vocab, dim, hidden, scale, seed):
    """An HF config of a one-layer Llama with two heads and its float32 weights, N(0, scale)."""
    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": dim,
              "intermediate_size": hidden, "num_hidden_layers": 1, "num_attention_heads": 2,
              "max_position_embeddings": 16}
    p = "model.layers.0."
    shapes = {"model.embed_tokens.weight": (vocab, dim), "model.norm.weight": (dim,), "lm_head.weight": (vocab, dim),
              p + "input_layernorm.weight": (dim,), p + "post_attention_layernorm.weight": (dim,),
              p + "self_attn.q_proj.weight": (dim, dim), p + "self_attn.k_proj.weight": (dim, dim),
              p + "self_attn.v_proj.weight": (dim, dim), p + "self_attn.o_proj.weight": (dim, dim),
              p + "mlp.gate_proj.weight": (hidden, dim), p + "mlp.up_proj.weight": (hidden, dim),
              p + "mlp.down_proj.weight": (dim, hidden)}
    rng = np.random.default_rng(seed)
    return config, {k: rng.normal(0, scale, s).astype(np.float32) for k, s in shapes.items()}


def test_f16_storage_refuses_values_beyond_its_range():
    """Converting to f16 must not turn large weights into infinities silently."""
    config, weights = _one_layer_llama(vocab=10, dim=8, hidden=16, scale=0.1, seed=0)
    assert lmdecode.Model.from_numpy(config, weights, dtype="f16").config.dtype == "f16"
    weights["model.layers.0.mlp.up_proj.weight"][3, 5] = -7e4
    with pytest.raises(ValueError, match=r"^from_numpy weights: tensor 'model\.layers\.0\.mlp\.up_proj\.weight': "
                                         r"values beyond the f16 range \(largest magnitude 70000; f16 holds 65504\)"):
        lmdecode.Model.from_numpy(config, weights, dtype="f16")
    assert lmdecode.Model.from_numpy(config, weights, dtype="bf16").config.dtype == "bf16"


def test_tiny_random_in_bf16_storage():
    f32 = lmdecode.Model.load(TINY_RANDOM).logits(_tokens(32, 32000))
    bf16 = lmdecode.Model.load(TINY_RANDOM, dtype="bf16").logits(_tokens(32, 32000))
    assert _rel_max_diff(f32, bf16) < 2e-2


BF16_IN_A_CHILD = """
import sys, numpy as np, lmdecode
model = lmdecode.Model.load(sys.argv[1], dtype="bf16")
np.save(sys.argv[2], model.logits(np.load(sys.argv[3])))
print(lmdecode.build_info()["bf16_kernel"])
"""


def test_bf16_products_in_amx_tiles_and_on_the_vector_unit_agree(tmp_path):
    """Where the build, the CPU and Linux allow it, bf16 weights are multiplied in AMX tiles
    (build_info()["bf16_kernel"] == "amx"); a process started with LMDECODE_NO_AMX=1 multiplies
    them with the vector unit's bf16 dot products instead: the same inputs rounded to bf16,
    summed in another order. Where a last-bit difference moves an activation across a bf16
    rounding boundary the next layer sees a step of 2^-8 relative, so stories260K's logits
    (dims 64 and 172, whose pairs are padded to 96) differ by up to 1.8e-3 of their range:
    a third of bf16's own distance from f32 (5.4e-3 here). Elsewhere both processes use one
    kernel and agree exactly."""
    kernel = lmdecode.build_info()["bf16_kernel"]
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    vectors = lmdecode.build_info()["vector_extensions"]
    if ("amx_bf16" in flags and "avx512bf16" in vectors and os.environ.get("LMDECODE_NO_AMX", "") in ("", "0")
            and platform.machine() == "x86_64"):
        # where Linux grants the tiles (arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA), asked in a
        # child), the native build on an AMX machine does use them
        ask = "import ctypes; print(ctypes.CDLL(None, use_errno=True).syscall(158, 0x1023, 18))"
        granted = subprocess.run([sys.executable, "-c", ask], capture_output=True, text=True).stdout.split() == ["0"]
        assert kernel == ("amx" if granted else "avx512_bf16")
    toks = _tokens(64, 512)
    np.save(tmp_path / "tokens.npy", toks)
    child = subprocess.run([sys.executable, "-c", BF16_IN_A_CHILD, str(STORIES_BIN), str(tmp_path / "logits.npy"),
                            str(tmp_path / "tokens.npy")], env={**os.environ, "LMDECODE_NO_AMX": "1"},
                           capture_output=True, text=True, check=True)
    here = lmdecode.Model.load(STORIES_BIN, dtype="bf16").logits(toks)
    there = np.load(tmp_path / "logits.npy")
    if kernel == "amx":
        assert child.stdout.split() == ["avx512_bf16"]
        assert 0 < _rel_max_diff(here, there) < 4e-3
    else:
        assert child.stdout.split() == [kernel]
        np.testing.assert_array_equal(here, there)


# ---------------------------------------------------------------------------- GGUF tensor types


def _stories_as(kind, path):
    """stories260K re-encoded with its matrices in GGML type `kind` (those with a multiple of 32
    columns; the 172-wide feed-forward stays F32, as llama.cpp's quantizer would leave it)."""
    reader = gguf.GGUFReader(str(STORIES_GGUF))
    meta = {k: reader.fields[k].contents() for k in reader.fields
            if k.startswith("llama.")}
    tensors = {}
    for t in reader.tensors:
        arr = np.array(t.data, dtype=np.float32)
        quantizable = arr.ndim == 2 and arr.shape[1] % 32 == 0
        tensors[t.name] = (arr, kind if quantizable else "F32")
    write_gguf(path, "llama", meta, tensors)
    return path


@pytest.mark.parametrize("kind", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_tensor_types(kind, tmp_path):
    path = _stories_as(kind, tmp_path / f"stories_{kind}.gguf")
    config, tensors, _ = loaders.read_gguf(path)
    weights = {k: loaders.to_f32(v).astype(np.float64) for k, v in tensors.items()}
    toks = _tokens(48, 512, seed=3)
    ref = llama_logits(config, weights, toks)  # the file's own (dequantized) weights
    # in f32 storage the engine computes with exactly the file's values
    assert _rel_max_diff(ref, lmdecode.Model.load(path, dtype="f32").logits(toks)) < 1e-4
    default = lmdecode.Model.load(path)
    expected_storage = {"F16": "f32", "BF16": "bf16", "Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1"}[kind]
    assert default.config.dtype == expected_storage
    if kind in ("Q8_0", "Q4_0", "Q4_1"):
        # the file's very blocks; the engine also quantizes the inputs of its quantized matrices
        # (the 172-wide feed-forward stays F32), which the reference reproduces
        quantized = {name for name, src in tensors.items() if src.kind == kind.lower()}
        assert "layers.0.wq" in quantized and "layers.0.w_down" not in quantized
        # 1e-4 for Q8_0; 4-bit weights turn the rare input that the engine's float32 and the
        # reference's float64 round to neighbouring int8 values into a larger step (the C tests
        # pin the integer arithmetic down bit for bit)
        tight = 1e-4 if kind == "Q8_0" else 1e-2
        assert _rel_max_diff(llama_logits(config, weights, toks, quantized), default.logits(toks)) < tight
        assert _rel_max_diff(ref, default.logits(toks)) < 2e-2
        return
    # F16 widens exactly; in bf16 storage the file's F32 feed-forward is rounded
    tolerance = 1e-4 if kind == "F16" else 2e-2
    assert _rel_max_diff(ref, default.logits(toks)) < tolerance


def _stories_with(path, extra_meta=None, extra_tensors=None):
    """stories260K.gguf rewritten with more metadata and tensors (float32)."""
    reader = gguf.GGUFReader(str(STORIES_GGUF))
    meta = {k: reader.fields[k].contents() for k in reader.fields if k.startswith("llama.")}
    tensors = {t.name: (np.array(t.data, dtype=np.float32), "F32") for t in reader.tensors}
    tensors.update({name: (arr, "F32") for name, arr in (extra_tensors or {}).items()})
    write_gguf(path, "llama", {**meta, **(extra_meta or {})}, tensors)
    return path


def test_gguf_unsupported_tokenizer_names_the_file(tmp_path):
    """A vocabulary lmdecode cannot tokenize does not stop the model: it runs on token ids, and
    its tokenizer, built on first use, is refused with the file named."""
    path = _stories_with(tmp_path / "tekken.gguf",
                         {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "tekken"})
    model = lmdecode.Model.load(path)
    np.testing.assert_array_equal(model.logits([1, 403, 407]), lmdecode.Model.load(STORIES_GGUF).logits([1, 403, 407]))
    with pytest.raises(ValueError, match=r"tekken\.gguf: unsupported GGUF pre-tokenizer tokenizer\.ggml\.pre='tekken'"):
        model.generate("Once upon a time", max_new_tokens=2)
    with pytest.raises(ValueError, match=r"tekken\.gguf: unsupported GGUF pre-tokenizer"):
        load_tokenizer(path)


def test_gguf_rope_scaling(tmp_path):
    """Llama 3's rope_freqs tensor divides each rotary frequency by its factor (as llama.cpp
    applies it) and linear scaling divides them all; the NumPy reference with the same factors
    agrees, and plain RoPE does not."""
    config, tensors, _ = loaders.read_gguf(STORIES_GGUF)
    weights = {k: loaders.to_f32(v).astype(np.float64) for k, v in tensors.items()}
    toks = _tokens(64, 512, seed=9)
    plain = llama_logits(config, weights, toks)
    factors = np.array([1.0, 1.7, 4.0, 8.0], np.float32)  # head size 8: four frequencies
    for path, want in [(_stories_with(tmp_path / "freqs.gguf", extra_tensors={"rope_freqs.weight": factors}), factors),
                       (_stories_with(tmp_path / "linear.gguf", {"llama.rope.scaling.type": "linear",
                                                                  "llama.rope.scaling.factor": 3.0}), [3.0] * 4),
                       # as llama.cpp reads them: no type is linear, and the older key scale_linear
                       # (both were ignored: plain RoPE, 0.4 of the logit range off)
                       (_stories_with(tmp_path / "untyped.gguf", {"llama.rope.scaling.factor": 2.0}), [2.0] * 4),
                       (_stories_with(tmp_path / "old.gguf", {"llama.rope.scale_linear": 4.0}), [4.0] * 4)]:
        ref = llama_logits(config, {**weights, "rope_freq_factors": np.array(want, np.float64)}, toks)
        got = lmdecode.Model.load(path).logits(toks)
        assert _rel_max_diff(ref, got) < 1e-4
        assert _rel_max_diff(plain, got) > 1e-2
    # type "none" ignores a factor, as llama.cpp does
    none = _stories_with(tmp_path / "none.gguf", {"llama.rope.scaling.type": "none", "llama.rope.scaling.factor": 2.0})
    assert _rel_max_diff(plain, lmdecode.Model.load(none).logits(toks)) < 1e-4
    bad = _stories_with(tmp_path / "bad.gguf", extra_tensors={"rope_freqs.weight": np.array([1, 0, 2, 2], np.float32)})
    with pytest.raises(ValueError, match=r"rope_freq_factors\[1\] \(=0\) must be finite and > 0"):
        lmdecode.Model.load(bad)
    short = _stories_with(tmp_path / "short.gguf", extra_tensors={"rope_freqs.weight": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match=r"tensor 'rope_freqs\.weight' has shape \(3,\) but the config .* needs \(4,\)"):
        lmdecode.Model.load(short)
    yarn = _stories_with(tmp_path / "yarn.gguf", {"llama.rope.scaling.type": "yarn"})
    with pytest.raises(ValueError, match=r"yarn\.gguf: rope scaling 'yarn' is not supported"):
        lmdecode.Model.load(yarn)


def test_gguf_keys_llama_cpp_requires_or_refuses(tmp_path):
    """The normalization epsilon llama.cpp requires (a missing one was taken as 1e-5, a guess:
    transformers' Llama default is 1e-6) and mixture-of-experts metadata (ran as a dense model)."""
    no_eps = _stories_with(tmp_path / "no_eps.gguf", {"llama.attention.layer_norm_rms_epsilon": None})
    with pytest.raises(ValueError, match=r"no_eps\.gguf: GGUF metadata 'llama\.attention\.layer_norm_rms_epsilon' "
                                         r"is missing"):
        lmdecode.Model.load(no_eps)
    moe = _stories_with(tmp_path / "moe.gguf", {"llama.expert_count": 4})
    with pytest.raises(ValueError, match=r"moe\.gguf: GGUF metadata 'llama\.expert_count' \(=4\): "
                                         r"mixture-of-experts models are not supported"):
        lmdecode.Model.load(moe)


def test_q8_0_gguf_blocks_are_packed_unchanged(tmp_path):
    """Q8_0 tensors keep their blocks bit for bit, rearranged in groups of 16 rows."""
    path = _stories_as("Q8_0", tmp_path / "q8.gguf")
    config, tensors, _ = loaders.read_gguf(path)
    arrays = loaders.to_storage(tensors, "q8_0")
    src = tensors["layers.0.wq"]
    assert arrays["layers.0.wq"].shape == src.data.shape and not np.shares_memory(arrays["layers.0.wq"], src.data)
    np.testing.assert_array_equal(_core.dequantize_q8_0(arrays["layers.0.wq"]), loaders.to_f32(src))
    # the packed bytes are a permutation of the file's: same multiset per group of rows
    np.testing.assert_array_equal(np.sort(arrays["layers.0.wq"][:16].ravel()), np.sort(np.asarray(src.data[:16]).ravel()))


@pytest.mark.parametrize("kind", ["q4_0", "q4_1"])
def test_q4_gguf_blocks_are_packed_unchanged(kind, tmp_path):
    """Q4_0 and Q4_1 tensors keep their blocks bit for bit in their own storage, rearranged in
    groups of 16 rows; in the other q4 storage (and q8_0) they are requantized from their values."""
    path = _stories_as(kind.upper(), tmp_path / f"{kind}.gguf")
    config, tensors, _ = loaders.read_gguf(path)
    arrays = loaders.to_storage(tensors, kind)
    src, packed = tensors["layers.0.wq"], arrays["layers.0.wq"]
    assert packed.dtype == np.dtype(f"V{loaders.Q4_BLOCK_BYTES[kind]}") and packed.shape == (src.shape[0], src.shape[1] // 32)
    np.testing.assert_array_equal(_core.dequantize_q4(packed.view(np.uint8), kind), loaders.to_f32(src))
    np.testing.assert_array_equal(np.sort(packed.view(np.uint8)[:16].ravel()), np.sort(np.asarray(src.data[:16]).ravel()))
    other = "q4_1" if kind == "q4_0" else "q4_0"
    requantized = loaders.to_storage(tensors, other)["layers.0.wq"]
    assert requantized.dtype.itemsize == loaders.Q4_BLOCK_BYTES[other]
    np.testing.assert_array_equal(requantized.view(np.uint8), _core.quantize_q4(loaders.to_f32(src), other))


def test_q4_storage_of_float_weights(tmp_path):
    """from_numpy in q4_0 and q4_1 storage: the model computes with llama.cpp's quantization of
    its weights (the logits of the dequantized weights, inputs quantized as the engine does,
    within 1e-2), is close to f32 (within 0.15 of the logit range), and
    refuses non-finite weights naming the tensor. A file's Q8_0 matrices stay Q8_0 in q4
    storage."""
    q8_path = tmp_path / "q8.gguf"
    config, tensors, _ = loaders.read_gguf(STORIES_GGUF)
    weights = {k: loaders.to_f32(v).astype(np.float64) for k, v in tensors.items()}
    toks = _tokens(40, 512, seed=5)
    f32 = lmdecode.Model.load(STORIES_GGUF, dtype="f32").logits(toks)
    diffs = {}
    for kind in ("q4_0", "q4_1"):
        model = lmdecode.Model.load(STORIES_GGUF, dtype=kind)
        assert model.config.dtype == kind
        stored = loaders.to_storage(tensors, kind)
        quantized = {name for name, arr in stored.items() if arr.dtype.kind == "V"}
        assert "layers.0.wq" in quantized and "layers.0.w_down" not in quantized  # 172 columns: f32
        dequantized = {k: (_core.dequantize_q4(stored[k].view(np.uint8), kind).astype(np.float64) if k in quantized else w)
                       for k, w in weights.items()}
        got = model.logits(toks)
        # an input the engine (float32) and the reference (float64) round to neighbouring int8
        # values moves a logit by a 4-bit weight's step: 3e-3 in one build; layout or type
        # errors give 1e-1 and more (the C tests pin the arithmetic down bit for bit)
        assert _rel_max_diff(llama_logits(config, dequantized, toks, quantized), got) < 1e-2
        diffs[kind] = _rel_max_diff(f32, got)
    assert max(diffs.values()) < 0.15, diffs  # 0.10 and 0.11 on stories260K (q8_0: under 0.02)
    bad = {k: loaders.to_f32(v).copy() for k, v in tensors.items()}
    bad["layers.1.wk"][3, 5] = np.inf
    with pytest.raises(ValueError, match=r"layers\.1\.wk: non-finite values cannot be stored as q4_0"):
        loaders.to_storage({k: loaders.Source("f32", v, v.shape) for k, v in bad.items()}, "q4_0")
    bad["layers.1.wk"][3, 5] = np.nan  # q8_0 refuses them too: a NaN would have become a zero
    with pytest.raises(ValueError, match=r"layers\.1\.wk: non-finite values cannot be stored as q8_0"):
        loaders.to_storage({k: loaders.Source("f32", v, v.shape) for k, v in bad.items()}, "q8_0")
    q8 = loaders.read_gguf(_stories_as("Q8_0", q8_path))[1]
    assert loaders.to_storage(q8, "q4_1")["layers.0.wq"].dtype == np.uint8  # Q8_0 kept


def test_q4_conversions_reject_bad_arrays():
    with pytest.raises(ValueError, match="kind \\(=q5_0\\) must be 'q4_0' or 'q4_1'"):
        _core.quantize_q4(np.zeros((2, 32), np.float32), "q5_0")
    with pytest.raises(ValueError, match="blocks must be 2-D uint8 with a multiple of 20 bytes per row"):
        _core.pack_q4(np.zeros((2, 36), np.uint8), "q4_1")
    with pytest.raises(ValueError, match="multiple of 32 columns"):
        _core.quantize_q4(np.zeros((2, 40), np.float32), "q4_0")
    config, tensors, _ = loaders.read_gguf(STORIES_GGUF)
    arrays = loaders.to_storage(tensors, "q4_0")
    arrays["layers.0.wq"] = np.zeros(arrays["layers.0.wq"].shape, np.dtype("V19"))
    with pytest.raises(TypeError, match="tensor 'layers.0.wq' has items of 19 bytes; q4_0 storage has 18, q4_1 20"):
        _core.Model(config, arrays)


@pytest.mark.parametrize("kind", ["q4_0", "q4_1"])
def test_q4_quantizer_equals_the_gguf_package(kind):
    """lmdecode's Q4_0 / Q4_1 quantizer gives the very bytes of gguf-py's (llama.cpp's reference
    in NumPy), rows of every magnitude and a zero block included, once packed."""
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((37, 256)) * np.exp(rng.uniform(-8, 8, (37, 1)))).astype(np.float32)
    x[3, :32] = 0
    x[5, :32] = np.arange(32) - 16.0  # the hand case of the C tests
    qtype = {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q4_1": gguf.GGMLQuantizationType.Q4_1}[kind]
    blocks = np.ascontiguousarray(gguf.quants.quantize(x, qtype)).view(np.uint8)
    np.testing.assert_array_equal(_core.quantize_q4(x, kind), _core.pack_q4(blocks.reshape(37, -1), kind))


def _q4_boundary_blocks(kind: str, n_blocks: int, rng) -> np.ndarray:
    """(n_blocks, 32) float32 blocks whose values sit within a few ulps of the points where
    llama.cpp's quantizer moves to the next 4-bit code: trunc(x * id + 8.5) (Q4_0) or
    trunc((x - min) * id + 0.5) (Q4_1) changes where the product, rounded to float, crosses an
    integer minus the offset. There the code depends on whether x * id is rounded before the
    offset is added (llama.cpp and gguf round it) or fused with it into one FMA."""
    blocks = np.empty((n_blocks, 32), np.float32)
    for b in range(n_blocks):
        unit = np.float32(np.exp(rng.uniform(-12, 8)))  # the block's magnitude, its scales within f16
        if kind == "q4_0":
            top = unit * np.float32(rng.choice([-1, 1])) * np.float32(rng.uniform(1, 2))
            d = top / np.float32(-8)
            inv = np.float32(1) / d
            low, offset = np.float32(0), np.float32(8.5)
            fixed = [top]
        else:
            low = -unit * np.float32(rng.uniform(0.5, 2))
            high = unit * np.float32(rng.uniform(0.5, 2))
            inv = np.float32(1) / ((high - low) / np.float32(15))
            offset = np.float32(0.5)
            fixed = [low, high]
        # x with (x - low) * inv near k - offset: code k - 1 below, k above (k in 1..15)
        k = rng.integers(1, 16, 32 - len(fixed))
        x = (low + (k - offset) / inv).astype(np.float32)
        x = np.nextafter(x, np.float32(np.inf) * np.sign(rng.standard_normal(x.shape)).astype(np.float32))
        for _ in range(int(rng.integers(0, 3))):  # 0 to 2 ulps further, either way
            x = np.nextafter(x, np.float32(np.inf) * np.sign(rng.standard_normal(x.shape)).astype(np.float32))
        if kind == "q4_0":  # the value of largest magnitude stays `top`
            x = np.clip(x, -abs(top), abs(top))
        else:
            x = np.clip(x, low, high)
        blocks[b] = np.concatenate([fixed, x]).astype(np.float32)[rng.permutation(32)]
    return blocks


@pytest.mark.parametrize("kind", ["q4_0", "q4_1"])
def test_q4_quantizer_equals_the_gguf_package_at_rounding_boundaries(kind):
    """Values within a few ulps of a 4-bit code's boundary, under 4000 random scales, get the
    very bytes of gguf-py's quantizer, which rounds x * id to float before adding the offset
    as llama.cpp's reference does (a fused multiply-add moved 3.0, 2.8125 from codes 0, 1 of
    d = -0.375 to 0, 0: dequantized 3.0, 3.0 instead of 3.0, 2.625)."""
    qtype = {"q4_0": Q.Q4_0, "q4_1": Q.Q4_1}[kind]
    x = _q4_boundary_blocks(kind, 4000, np.random.default_rng(11)).reshape(125, 32 * 32)
    blocks = np.ascontiguousarray(gguf.quants.quantize(x, qtype)).view(np.uint8).reshape(125, -1)
    np.testing.assert_array_equal(_core.quantize_q4(x, kind), _core.pack_q4(blocks, kind))
    # the case of the report, by hand: d = 3 / -8, 2.8125 / d = -7.5 exactly once rounded
    hand = np.zeros((1, 32), np.float32)
    hand[0, :2] = [3.0, 2.8125]
    want = gguf.quants.dequantize(gguf.quants.quantize(hand, qtype), qtype).reshape(1, 32)
    np.testing.assert_array_equal(_core.dequantize_q4(_core.quantize_q4(hand, kind), kind), want)
    if kind == "q4_0":
        np.testing.assert_array_equal(want[0, :2], [3.0, 2.625])


def test_q8_0_conversions_reject_bad_arrays():
    with pytest.raises(ValueError, match="blocks must be 2-D uint8 with a multiple of 34 bytes per row"):
        _core.pack_q8_0(np.zeros((2, 33), np.uint8))
    with pytest.raises(ValueError, match="packed must be 2-D"):
        _core.dequantize_q8_0(np.zeros(68, np.uint8))
    with pytest.raises(ValueError, match="multiple of 32 columns"):
        _core.quantize_q8_0(np.zeros((2, 40), np.float32))
    # the packing round-trips through dequantization, for a row count that leaves a short group
    x = np.random.default_rng(8).normal(size=(21, 64)).astype(np.float32)
    rows = np.stack([_core.dequantize_q8_0(_core.quantize_q8_0(x[i:i + 1]))[0] for i in range(21)])
    np.testing.assert_array_equal(_core.dequantize_q8_0(_core.quantize_q8_0(x)), rows)


def test_q8_0_quantizer_equals_the_gguf_package():
    """lmdecode's Q8_0 quantizer gives the very bytes of gguf-py's (llama.cpp's reference in
    NumPy), rows of every magnitude, a zero block and exact halves included, once packed."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((37, 256)) * np.exp(rng.uniform(-8, 8, (37, 1)))).astype(np.float32)
    x[3, :32] = 0
    x[5, :32] = np.arange(32) - 15.5  # halves, amax 15.5
    x[6, :32] = np.concatenate([[127.0], np.arange(31) - 15.5])  # scale 1: every value a tie
    blocks = np.ascontiguousarray(gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)).view(np.uint8)
    np.testing.assert_array_equal(_core.quantize_q8_0(x), _core.pack_q8_0(blocks.reshape(37, -1)))


def test_gpt2_gguf_matches_from_numpy(tmp_path):
    rng = np.random.default_rng(4)
    D, L, V, P, H = 32, 2, 50, 40, 4
    hf = {"transformer.wte.weight": rng.normal(0, 0.2, (V, D)), "transformer.wpe.weight": rng.normal(0, 0.2, (P, D)),
          "transformer.ln_f.weight": 1 + rng.normal(0, 0.1, D), "transformer.ln_f.bias": rng.normal(0, 0.1, D)}
    gg = {"token_embd.weight": hf["transformer.wte.weight"], "position_embd.weight": hf["transformer.wpe.weight"],
          "output_norm.weight": hf["transformer.ln_f.weight"], "output_norm.bias": hf["transformer.ln_f.bias"]}
    for i in range(L):
        p = f"transformer.h.{i}."
        layer = {"ln_1.weight": 1 + rng.normal(0, 0.1, D), "ln_1.bias": rng.normal(0, 0.1, D),
                 "attn.c_attn.weight": rng.normal(0, 0.2, (D, 3 * D)), "attn.c_attn.bias": rng.normal(0, 0.1, 3 * D),
                 "attn.c_proj.weight": rng.normal(0, 0.2, (D, D)), "attn.c_proj.bias": rng.normal(0, 0.1, D),
                 "ln_2.weight": 1 + rng.normal(0, 0.1, D), "ln_2.bias": rng.normal(0, 0.1, D),
                 "mlp.c_fc.weight": rng.normal(0, 0.2, (D, 4 * D)), "mlp.c_fc.bias": rng.normal(0, 0.1, 4 * D),
                 "mlp.c_proj.weight": rng.normal(0, 0.2, (4 * D, D)), "mlp.c_proj.bias": rng.normal(0, 0.1, D)}
        hf.update({p + k: v for k, v in layer.items()})
        b = f"blk.{i}."
        gg.update({b + "attn_norm.weight": layer["ln_1.weight"], b + "attn_norm.bias": layer["ln_1.bias"],
                   b + "attn_qkv.weight": layer["attn.c_attn.weight"].T, b + "attn_qkv.bias": layer["attn.c_attn.bias"],
                   b + "attn_output.weight": layer["attn.c_proj.weight"].T, b + "attn_output.bias": layer["attn.c_proj.bias"],
                   b + "ffn_norm.weight": layer["ln_2.weight"], b + "ffn_norm.bias": layer["ln_2.bias"],
                   b + "ffn_up.weight": layer["mlp.c_fc.weight"].T, b + "ffn_up.bias": layer["mlp.c_fc.bias"],
                   b + "ffn_down.weight": layer["mlp.c_proj.weight"].T, b + "ffn_down.bias": layer["mlp.c_proj.bias"]})
    hf = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in hf.items()}
    meta = {"gpt2.embedding_length": D, "gpt2.block_count": L, "gpt2.attention.head_count": H,
            "gpt2.feed_forward_length": 4 * D, "gpt2.context_length": P, "gpt2.attention.layer_norm_epsilon": 1e-5}
    write_gguf(tmp_path / "gpt2.gguf", "gpt2", meta, {k: (np.asarray(v, np.float32), "F32") for k, v in gg.items()})
    from_file = lmdecode.Model.load(tmp_path / "gpt2.gguf")
    config = {"architectures": ["GPT2LMHeadModel"], "vocab_size": V, "n_embd": D, "n_layer": L, "n_head": H,
              "n_positions": P, "layer_norm_epsilon": 1e-5}
    from_arrays = lmdecode.Model.from_numpy(config, hf)
    assert from_file.config.arch == "gpt2" and from_file.config.tied_embeddings
    toks = _tokens(P, V, seed=5)
    np.testing.assert_allclose(from_file.logits(toks), from_arrays.logits(toks), rtol=0, atol=1e-5)
    # a quantized fused qkv splits into q, k and v by rows of blocks
    kinds = {k: (np.asarray(v, np.float32), "Q8_0" if k.endswith("attn_qkv.weight") else "F32") for k, v in gg.items()}
    write_gguf(tmp_path / "gpt2_q8.gguf", "gpt2", meta, kinds)
    for i in range(L):
        fused = np.ascontiguousarray(hf[f"transformer.h.{i}.attn.c_attn.weight"].T)
        hf[f"transformer.h.{i}.attn.c_attn.weight"] = np.ascontiguousarray(
            gguf.quants.dequantize(gguf.quants.quantize(fused, Q.Q8_0), Q.Q8_0).T)
    np.testing.assert_allclose(lmdecode.Model.load(tmp_path / "gpt2_q8.gguf", dtype="f32").logits(toks),
                               lmdecode.Model.from_numpy(config, hf).logits(toks), rtol=0, atol=1e-5)


def test_untied_llama2c_export(tmp_path):
    data = bytearray(STORIES_BIN.read_bytes())
    header = np.frombuffer(bytes(data[:28]), dtype=np.int32).copy()
    header[5] = -header[5]  # negative vocab_size: a classifier follows the RoPE tables
    head = np.random.default_rng(6).normal(0, 0.1, (512, 64)).astype(np.float32)
    (tmp_path / "untied.bin").write_bytes(header.tobytes() + bytes(data[28:]) + head.tobytes())
    model = lmdecode.Model.load(tmp_path / "untied.bin", tokenizer=TOKENIZER)
    assert not model.config.tied_embeddings
    config, tensors, _ = loaders.read_llama2c(tmp_path / "untied.bin")
    weights = {k: np.asarray(v.data, dtype=np.float64) for k, v in tensors.items()}
    np.testing.assert_array_equal(weights["output"], head)
    toks = _tokens(32, 512, seed=7)
    assert _rel_max_diff(llama_logits(config, weights, toks), model.logits(toks)) < 1e-4


# ---------------------------------------------------------------------------- corrupt and unsupported input


@pytest.mark.parametrize("source", [STORIES_BIN, STORIES_GGUF])
def test_truncated_files(source, tmp_path):
    data = source.read_bytes()
    path = tmp_path / source.name
    for cut in (0, 3, 27, 200, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=str(path.name)):
            lmdecode.Model.load(path)


def _mutations(data: bytes, n: int, seed: int):
    """n corrupt copies of a file: bytes set or flipped, 4- and 8-byte fields set to extremes
    (sizes, counts, offsets, lengths), tails cut; mostly in the header and metadata."""
    rng = np.random.default_rng(seed)
    extremes = [0, 1, 255, 2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1, 2**64 - 1]
    for _ in range(n):
        b = bytearray(data)
        region = int(rng.choice([64, 512, 4096, 65536, len(b)]))
        for _ in range(int(rng.choice([1, 1, 2, 4, 16]))):
            at, op = int(rng.integers(min(region, len(b)))), rng.random()
            if op < 0.5:
                b[at] = int(rng.integers(256))
            elif op < 0.7:
                b[at] ^= 1 << int(rng.integers(8))
            elif op < 0.85:
                width = int(rng.choice([4, 8]))
                value = int(rng.choice(extremes)) % (1 << (8 * width))
                b[at:at + width] = value.to_bytes(width, "little")[:len(b) - at]
            elif len(b) > 1:
                b = b[:int(rng.integers(1, len(b)))]
        yield bytes(b)


@pytest.mark.parametrize("source, n", [(STORIES_GGUF, 150), (STORIES_BIN, 150), (TOKENIZER, 150), (TINY_RANDOM, 6)])
def test_mutated_files_load_or_fail_cleanly(source, n, tmp_path):
    """Seeded corruptions of the shared files (the tokenizer's beside stories260K.bin): each
    either loads and then runs, or fails with a ValueError naming the file; never another
    exception, never a crash. A NaN weight may load; decoding then blames the model's logits.
    (Scratch runs over 2,900 such files, a Hugging Face config.json and model.safetensors
    among them, found no crash.)"""
    path = tmp_path / source.name
    loaded = failed = 0
    for i, data in enumerate(_mutations(source.read_bytes(), n, seed=len(source.name))):
        path.write_bytes(data)
        try:
            if source == TOKENIZER:
                model = lmdecode.Model.load(STORIES_BIN, tokenizer=path)
            else:
                model = lmdecode.Model.load(path, tokenizer=TOKENIZER if source == STORIES_BIN else None)
        except ValueError as e:
            assert source.name in str(e), f"mutation {i}: {e}"
            failed += 1
            continue
        loaded += 1
        V = model.config.vocab_size
        assert model.logits([1, 2 % V, 3 % V]).shape == (3, V)
        try:  # the tokenizer is built on first use: a corrupt vocabulary fails here, naming the file
            if model.tokenizer is not None:
                model.tokenizer.decode(model.tokenizer.encode("Once upon a time, \u00e9 \u2713"))
        except ValueError as e:  # or lacks a character and its bytes
            assert source.name in str(e) or "has no token and the vocabulary has no byte fallback" in str(e), \
                f"mutation {i}: {e}"
        try:
            model.generate([1, 2 % V], max_new_tokens=3, seed=0)
        except ValueError as e:
            assert source.name in str(e) or str(e).startswith("the model's logits: "), f"mutation {i}: {e}"
    assert failed > 0 and (loaded > 0 or source == TINY_RANDOM)


def test_wrong_magic(tmp_path):
    data = STORIES_GGUF.read_bytes()
    (tmp_path / "model.gguf").write_bytes(b"GGUX" + data[4:])
    with pytest.raises(ValueError, match=r"model\.gguf: unrecognised model format"):
        lmdecode.Model.load(tmp_path / "model.gguf")
    (tmp_path / "model.bin").write_bytes(b"ak42" + bytes(100))
    with pytest.raises(ValueError, match="'ak42' magic"):
        lmdecode.Model.load(tmp_path / "model.bin")
    (tmp_path / "garbage.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"garbage\.gguf"):
        lmdecode.Model.load(tmp_path / "garbage.gguf")
    with pytest.raises(FileNotFoundError):
        lmdecode.Model.load(tmp_path / "missing.gguf")


def test_gguf_metadata_strings_that_are_not_utf8(tmp_path):
    """The gguf reader decodes strings only when asked: a corrupt one must still be an error
    naming the file and the key (it was a bare UnicodeDecodeError from inside gguf)."""
    data = bytearray(STORIES_GGUF.read_bytes())
    key = data.index(b"general.architecture")
    value = data.index(b"llama", key)  # the value string follows its type and length
    data[value:value + 5] = b"\xff\xfe\xfd\xfc\xfb"
    (tmp_path / "model.gguf").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.gguf: GGUF metadata 'general\.architecture' is unreadable "
                                         r"\(UnicodeDecodeError"):
        lmdecode.Model.load(tmp_path / "model.gguf")
    data = bytearray(STORIES_GGUF.read_bytes())
    piece = data.index(b"<unk>", data.index(b"tokenizer.ggml.tokens"))  # the first vocabulary piece
    data[piece] = 0xFF
    (tmp_path / "vocab.gguf").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"vocab\.gguf: GGUF metadata 'tokenizer\.ggml\.tokens' is unreadable"):
        lmdecode.Model.load(tmp_path / "vocab.gguf")


def test_gguf_metadata_of_the_wrong_type(tmp_path):
    """A size stored as another type (here llama.context_length's UINT32 type tag turned into
    FLOAT32, the same four bytes) is a ValueError naming the file and key; int() of it had
    silently read 2048 as 0."""
    import struct
    data = bytearray(STORIES_GGUF.read_bytes())
    key = b"llama.context_length"
    at = data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key)  # the value's type tag
    assert struct.unpack_from("<I", data, at)[0] == 4  # GGUF's UINT32
    struct.pack_into("<I", data, at, 6)  # FLOAT32
    (tmp_path / "model.gguf").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.gguf: GGUF metadata 'llama\.context_length' \(=[\d.]+e-42\) "
                                         r"must be a non-negative integer"):
        lmdecode.Model.load(tmp_path / "model.gguf")


def test_gguf_tensor_off_the_file_alignment(tmp_path):
    """A tensor whose offset breaks general.alignment (a corrupt file: here 4 bytes on) is a
    ValueError naming the file and tensor, not a TypeError from a misaligned float array."""
    import struct
    data = bytearray(STORIES_GGUF.read_bytes())
    name = b"blk.3.attn_norm.weight"
    at = data.find(struct.pack("<Q", len(name)) + name) + 8 + len(name)  # its tensor info follows
    n_dims = struct.unpack_from("<I", data, at)[0]
    offset_at = at + 4 + 8 * n_dims + 4  # past n_dims, the dims and the type
    struct.pack_into("<Q", data, offset_at, struct.unpack_from("<Q", data, offset_at)[0] + 4)
    path = tmp_path / "shifted.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"shifted\.gguf: tensor 'blk\.3\.attn_norm\.weight' starts at byte \d+, "
                                         r"off the file's 32-byte alignment"):
        lmdecode.Model.load(path)


def test_nan_weights_are_blamed_on_the_model_not_on_the_caller(tmp_path):
    """A file that loads but holds a NaN weight (here in token 15's embedding, which the tied
    head turns into a NaN logit for token 15 at every position) makes every decoding call fail
    with a ValueError that says the logits were the model's: the caller passed none."""
    data = bytearray(STORIES_BIN.read_bytes())
    at = 28 + 4 * (15 * 64 + 40)  # past the 7-int header: token 15's embedding, feature 40
    data[at:at + 4] = np.float32(np.nan).tobytes()
    (tmp_path / "nan.bin").write_bytes(bytes(data))
    model = lmdecode.Model.load(tmp_path / "nan.bin", tokenizer=TOKENIZER)
    good = lmdecode.Model.load(STORIES_BIN, tokenizer=TOKENIZER)
    good_tokens = good.generate("Once upon a time", max_new_tokens=4, temperature=0).tokens
    assert np.isnan(model.logits(ONCE_UPON_A_TIME)[:, 15]).all()  # logits() returns them as they are
    nan_15 = r"logits\[15\] is NaN; logits must be finite or -inf"
    with pytest.raises(ValueError, match=r"^the model's logits: sequence 0: " + nan_15):
        model.generate("Once upon a time", max_new_tokens=4, seed=0)
    with pytest.raises(ValueError, match=r"^the model's logits: sequence 0: " + nan_15):
        model.generate("Once upon a time", max_new_tokens=4, temperature=0)
    with pytest.raises(ValueError, match=r"^the model's logits: logits of beam 0, token 15 is NaN"):
        model.beam_search("Once upon a time", beam_width=2, max_new_tokens=4)
    # the logits at position 4 ("time") are the first that score the continuation
    with pytest.raises(ValueError, match=r"^the model's logits at position 4: " + nan_15):
        model.sequence_logprob(ONCE_UPON_A_TIME, [261, 378])
    with pytest.raises(ValueError, match=r"^the model's logits at position 0: " + nan_15):
        model.perplexity(ONCE_UPON_A_TIME)
    with pytest.raises(ValueError, match=r"^the draft model's logits of sequence 0: " + nan_15):
        good.generate("Once upon a time", max_new_tokens=4, temperature=0, draft_model=model)
    with pytest.raises(ValueError, match=r"^the target model's logits, verification row 0: " + nan_15):
        model.generate("Once upon a time", max_new_tokens=4, temperature=0, draft_model=good)
    # the good model is unharmed by the failures around it
    assert good.generate("Once upon a time", max_new_tokens=4, temperature=0).tokens == good_tokens


def test_unsupported_gguf_tensor_type(tmp_path):
    reader = gguf.GGUFReader(str(STORIES_GGUF))
    meta = {k: reader.fields[k].contents() for k in reader.fields if k.startswith("llama.")}
    tensors = {t.name: (np.array(t.data), "MXFP4" if t.name == "blk.0.attn_q.weight" else "F32") for t in reader.tensors}
    write_gguf(tmp_path / "mxfp4.gguf", "llama", meta, tensors)
    with pytest.raises(ValueError, match=r"mxfp4\.gguf: tensor 'blk\.0\.attn_q\.weight' has type MXFP4, not supported"):
        lmdecode.Model.load(tmp_path / "mxfp4.gguf")


def test_unsupported_gguf_architecture(tmp_path):
    write_gguf(tmp_path / "falcon.gguf", "falcon", {"falcon.embedding_length": 8},
                {"token_embd.weight": (np.zeros((4, 8), np.float32), "F32")})
    with pytest.raises(ValueError, match=r"falcon\.gguf: architecture 'falcon' is not supported"):
        lmdecode.Model.load(tmp_path / "falcon.gguf")


def test_gguf_shapes_disagreeing_with_metadata(tmp_path):
    reader = gguf.GGUFReader(str(STORIES_GGUF))
    meta = {k: reader.fields[k].contents() for k in reader.fields if k.startswith("llama.")}
    meta["llama.feed_forward_length"] = 96
    write_gguf(tmp_path / "bad.gguf", "llama", meta, {t.name: (np.array(t.data), "F32") for t in reader.tensors})
    with pytest.raises(ValueError, match=r"bad\.gguf: tensor 'blk\.0\.ffn_gate\.weight' has shape \(172, 64\)"):
        lmdecode.Model.load(tmp_path / "bad.gguf")


def test_llama2c_header_disagreeing_with_size(tmp_path):
    data = bytearray(STORIES_BIN.read_bytes())
    header = np.frombuffer(bytes(data[:28]), dtype=np.int32).copy()
    header[1] = 200  # hidden_dim
    (tmp_path / "bad.bin").write_bytes(header.tobytes() + bytes(data[28:]))
    with pytest.raises(ValueError, match=r"bad\.bin: truncated: the header describes"):
        lmdecode.Model.load(tmp_path / "bad.bin")
    header[1] = -5
    (tmp_path / "bad.bin").write_bytes(header.tobytes() + bytes(data[28:]))
    with pytest.raises(ValueError, match=r"hidden_dim \(=-5\) is not plausible"):
        lmdecode.Model.load(tmp_path / "bad.bin")


def test_tokenizer_of_the_wrong_size(tmp_path):
    with pytest.raises(ValueError, match=r"tok512\.bin: holds 512 tokens but the model's vocabulary has 32000"):
        lmdecode.Model.load(TINY_RANDOM, tokenizer=TOKENIZER)


def test_from_numpy_shape_mismatch_names_tensor():
    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
              "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 16}
    z = lambda *s: np.zeros(s, np.float32)  # noqa: E731
    weights = {"model.embed_tokens.weight": z(10, 8), "model.norm.weight": z(8), "lm_head.weight": z(10, 8),
               "model.layers.0.input_layernorm.weight": z(8), "model.layers.0.post_attention_layernorm.weight": z(8),
               "model.layers.0.self_attn.q_proj.weight": z(8, 8), "model.layers.0.self_attn.k_proj.weight": z(8, 8),
               "model.layers.0.self_attn.v_proj.weight": z(8, 8), "model.layers.0.self_attn.o_proj.weight": z(8, 8),
               "model.layers.0.mlp.gate_proj.weight": z(16, 8), "model.layers.0.mlp.up_proj.weight": z(16, 8),
               "model.layers.0.mlp.down_proj.weight": z(8, 15)}
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.mlp\.down_proj\.weight' has shape \(8, 15\)"):
        lmdecode.Model.from_numpy(config, weights)
    weights["model.layers.0.mlp.down_proj.weight"] = z(8, 16)
    model = lmdecode.Model.from_numpy(config, weights)
    with pytest.raises(ValueError, match="dtype"):
        lmdecode.Model.from_numpy(config, weights, dtype="q4")
    assert model.logits([0, 9]).shape == (2, 10)
    del weights["lm_head.weight"]  # tied when the head is absent and the config ties them
    assert lmdecode.Model.from_numpy({**config, "tie_word_embeddings": True}, weights).config.tied_embeddings
    # LlamaConfig's default is untied: the head is missing, as transformers reports it
    with pytest.raises(ValueError, match=r"^from_numpy weights: tensor 'lm_head\.weight' is missing and the config "
                                         r"does not tie the head to the embedding"):
        lmdecode.Model.from_numpy(config, weights)


@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16", "q8_0"])
def test_from_numpy_takes_misaligned_arrays(dtype):
    """Arrays viewed at odd byte offsets (NumPy allows them; the engine cannot read them) are
    copied, so from_numpy gives the same logits as from the same values aligned."""
    config, aligned = _one_layer_llama(vocab=64, dim=32, hidden=64, scale=0.3, seed=3)

    def misaligned(a):
        buf = bytearray(a.nbytes + 1)
        out = np.frombuffer(buf, dtype=np.float32, offset=1, count=a.size).reshape(a.shape)
        out[...] = a
        return out

    odd = {k: misaligned(a) for k, a in aligned.items()}
    assert not any(a.flags.aligned for a in odd.values())
    toks = [1, 5, 9, 33]
    want = lmdecode.Model.from_numpy(config, aligned, dtype=dtype).logits(toks)
    np.testing.assert_array_equal(lmdecode.Model.from_numpy(config, odd, dtype=dtype).logits(toks), want)


def test_bad_cache_arguments():
    model = lmdecode.Model.load(STORIES_BIN)
    other = lmdecode.Model.load(STORIES_BIN)
    with pytest.raises(TypeError, match="KVCache"):
        model.forward([1], object())
    with pytest.raises(ValueError, match="different model"):
        model.forward([1], other.new_cache())
    with pytest.raises(ValueError, match=r"capacity \(=0\)"):
        model.new_cache(0)
    with pytest.raises(ValueError, match="non-empty"):
        model.forward([], model.new_cache())
    with pytest.raises(ValueError, match=r"logits indices must be in \[0, 2\)"):
        model.forward([1, 2], model.new_cache(), logits=[2])
    a, b = model.new_cache(), model.new_cache()
    with pytest.raises(ValueError, match="share a pool"):
        model.forward_batch([[1], [1]], [a, b])
    with pytest.raises(ValueError, match="appears twice"):
        model.forward_batch([[1], [1]], [a, a])
    assert len(a) == 0


def _mapping_rss_bytes(path):
    """Resident bytes of this process's mappings of `path` (Linux /proc/self/smaps)."""
    total, current = 0, None
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 5 and "-" in fields[0] and ":" in fields[3]:  # a mapping's header line
                current = fields[5] if len(fields) > 5 else None
            elif fields and fields[0] == "Rss:" and current == str(path):
                total += int(fields[1]) * 1024
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc/self/smaps")
@pytest.mark.parametrize("kind,dtype", [("F32", "f32"), ("F32", "bf16"), ("F32", "q8_0"), ("Q8_0", "q8_0"),
                                        ("BF16", "bf16"), ("F16", "f16"), ("F32", "f16")])
def test_converted_gguf_tensors_leave_the_resident_set(kind, dtype, tmp_path):
    """Weights are never held twice: F32, BF16 and F16 tensors copied into the engine's panels or
    converted into bf16/f16/q8_0 storage, and Q8_0 tensors packed into the engine's groups of rows, must not
    stay resident through the file mapping the model keeps (for its tokenizer metadata; the
    untied token embedding, read in place, only has the rows looked up)."""
    rng = np.random.default_rng(5)
    D, H, L, V = 256, 512, 2, 4096
    meta = {"llama.embedding_length": D, "llama.block_count": L, "llama.attention.head_count": 4,
            "llama.attention.head_count_kv": 4, "llama.feed_forward_length": H, "llama.context_length": 64,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.rope.dimension_count": D // 4}
    tensors = {"token_embd.weight": (rng.normal(0, 0.02, (V, D)), "F32"), "output_norm.weight": (np.ones(D), "F32"),
               "output.weight": (rng.normal(0, 0.02, (V, D)), "F32")}
    for i in range(L):
        b = f"blk.{i}."
        tensors.update({b + "attn_norm.weight": (np.ones(D), "F32"), b + "ffn_norm.weight": (np.ones(D), "F32")})
        for name, shape in (("attn_q", (D, D)), ("attn_k", (D, D)), ("attn_v", (D, D)), ("attn_output", (D, D)),
                            ("ffn_gate", (H, D)), ("ffn_up", (H, D)), ("ffn_down", (D, H))):
            tensors[b + name + ".weight"] = (rng.normal(0, 0.02, shape), kind)
    tensors["output.weight"] = (tensors["output.weight"][0], kind)
    path = tmp_path / f"random-{kind}.gguf"
    write_gguf(path, "llama", meta, tensors)
    matrix_bytes = sum(a.size * {"F32": 4, "BF16": 2, "F16": 2, "Q8_0": 34 / 32}[k] for a, k in tensors.values())
    model = lmdecode.Model.load(path, dtype=dtype)
    model.forward([1, 2, 3], model.new_cache(8))
    assert model.config.dtype == dtype
    resident = _mapping_rss_bytes(path)
    assert resident < 0.05 * matrix_bytes, f"{resident} bytes of the {matrix_bytes}-byte source stay resident"


def _write_safetensors_off_lines(path, tensors, lead, dtype="F32"):
    """A safetensors file whose tensors (float32 arrays, stored as `dtype`: F32, or BF16 by
    dropping the low 16 bits of values that have none) start `lead` bytes past 64-byte file
    offsets (a header padded so, as real checkpoints put data anywhere 8-byte aligned)."""
    import json
    import struct
    header, offset = {}, 0
    for name, arr in tensors.items():
        offset += (-(offset - lead)) % 64  # each tensor `lead` bytes past a line
        nbytes = arr.size * (4 if dtype == "F32" else 2)
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header).encode()
    text += b" " * ((-(8 + len(text))) % 64)  # the data section starts on a 64-byte file offset
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        data = bytearray(offset)
        for name, arr in tensors.items():
            begin, end = header[name]["data_offsets"]
            bits = np.ascontiguousarray(arr, dtype="<f4").view("<u4")
            data[begin:end] = (bits if dtype == "F32" else (bits >> 16).astype("<u2")).tobytes()
        f.write(bytes(data))


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc/self/smaps")
@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_checkpoint_matrices_off_cache_lines_are_copied_aligned(dtype, tmp_path):
    """f32 and bf16 matrices that a file holds off 64-byte boundaries are copied by the engine
    into its panels (aligned) and their file pages released, so they are still held once; the
    logits equal those of the same arrays passed to from_numpy."""
    import json
    rng = np.random.default_rng(11)
    D, H, L, V = 256, 512, 2, 1024
    cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=V, hidden_size=D,
               intermediate_size=H, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=4,
               max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False)
    w = {"model.embed_tokens.weight": rng.normal(0, 0.02, (V, D)), "model.norm.weight": np.ones(D),
         "lm_head.weight": rng.normal(0, 0.02, (V, D))}
    for i in range(L):
        p = f"model.layers.{i}."
        w.update({p + "input_layernorm.weight": np.ones(D), p + "post_attention_layernorm.weight": np.ones(D)})
        for name, shape in (("self_attn.q_proj", (D, D)), ("self_attn.k_proj", (D, D)), ("self_attn.v_proj", (D, D)),
                            ("self_attn.o_proj", (D, D)), ("mlp.gate_proj", (H, D)), ("mlp.up_proj", (H, D)),
                            ("mlp.down_proj", (D, H))):
            w[p + name + ".weight"] = rng.normal(0, 0.02, shape)
    w = {k: v.astype(np.float32) for k, v in w.items()}
    if dtype == "BF16":  # values bf16 holds exactly
        w = {k: (v.view(np.uint32) & 0xFFFF0000).view(np.float32) for k, v in w.items()}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    path = tmp_path / "model.safetensors"
    _write_safetensors_off_lines(path, w, lead=16, dtype=dtype)
    model = lmdecode.Model.load(tmp_path)
    assert model.config.dtype == dtype.lower()
    toks = rng.integers(0, V, 12)
    got = model.logits(toks)
    np.testing.assert_array_equal(got, lmdecode.Model.from_numpy(cfg, w, dtype=dtype.lower()).logits(toks))
    # the untied embedding is read in place: its looked-up rows (and the pages the kernel maps
    # around them) are resident, which is not a second copy
    stored = 4 if dtype == "F32" else 2  # bytes per weight in the file
    embedding_bytes = w["model.embed_tokens.weight"].size * stored
    matrix_bytes = sum(a.size for a in w.values() if a.ndim == 2) * stored - embedding_bytes
    resident = _mapping_rss_bytes(path)
    assert resident < 0.05 * matrix_bytes + embedding_bytes, \
        f"{resident} bytes of the file's {matrix_bytes} bytes of other matrices stay resident"


# ---------------------------------------------------------------------------- loading audit: corrupt fields


def _stories_rewritten(path, meta=None, drop=()):
    """stories260K.gguf rewritten with every metadata value it has (tokenizer included), some
    replaced or added (meta: key -> (GGUFValueType, value)), and without the tensors in drop."""
    V = gguf.GGUFValueType
    reader = gguf.GGUFReader(str(STORIES_GGUF))
    w = gguf.GGUFWriter(str(path), "llama")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in (meta or {}):
            continue
        w.add_key_value(key, field.contents(), field.types[0], field.types[1] if len(field.types) > 1 else None)
    for key, (vtype, value) in (meta or {}).items():
        w.add_key_value(key, value, vtype, V.INT32 if vtype == V.ARRAY else None)
    for t in reader.tensors:
        if t.name not in drop:
            w.add_tensor(t.name, np.array(t.data, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _patched_metadata(path, key: str, fmt: str, value):
    """stories260K.gguf with the scalar value of metadata `key` overwritten in place (same type)."""
    import struct
    data = bytearray(STORIES_GGUF.read_bytes())
    name = key.encode()
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name) + 4  # past the key and its type
    struct.pack_into(fmt, data, at, value)
    path.write_bytes(bytes(data))
    return path


def test_a_corrupt_layer_count_fails_at_once_naming_the_field(tmp_path):
    """A block_count beyond the layers the file's tensors hold is a ValueError naming the key, before
    anything is built per layer: 1,000,000 took 26 s and 3.5 GB before naming an internal tensor
    'layers.5.attn_norm', 16,777,221 was killed for lack of memory. One too few names the tensor of
    the layer beyond it."""
    import time
    for n in (100_000, 6):  # (2^31 - 1 is as quick now; before, it would exhaust the memory)
        path = _patched_metadata(tmp_path / f"blocks_{n}.gguf", "llama.block_count", "<I", n)
        start = time.perf_counter()
        with pytest.raises(ValueError, match=rf"blocks_{n}\.gguf: GGUF metadata 'llama\.block_count' \(={n}\) exceeds "
                                             r"the 5 layers the tensors hold \(none of layer 5\)"):
            lmdecode.Model.load(path)
        assert time.perf_counter() - start < 5
    path = _patched_metadata(tmp_path / "blocks_4.gguf", "llama.block_count", "<I", 4)
    with pytest.raises(ValueError, match=r"tensor 'blk\.4\.attn_q\.weight' is of layer 4, but GGUF metadata "
                                         r"'llama\.block_count' \(=4\) counts layers 0 to 3"):
        lmdecode.Model.load(path)
    # a layer whose tensors are all gone: the same message, naming the layer
    layer_2 = [t.name for t in gguf.GGUFReader(str(STORIES_GGUF)).tensors if t.name.startswith("blk.2.")]
    with pytest.raises(ValueError, match=r"'llama\.block_count' \(=5\) exceeds the 4 layers the tensors hold "
                                         r"\(none of layer 2\)"):
        lmdecode.Model.load(_stories_rewritten(tmp_path / "no_layer_2.gguf", drop=layer_2))


def test_missing_gguf_tensors_are_named_as_the_file_names_them(tmp_path):
    """Not by the engine's names ('layers.3.attn_norm'): read_gguf maps them back as the
    Hugging Face reader does, for every architecture's naming (gpt2's fused q/k/v, qwen2's biases)."""
    for name in ("blk.3.attn_norm.weight", "blk.0.ffn_gate.weight", "output_norm.weight"):
        path = _stories_rewritten(tmp_path / "missing.gguf", drop=(name,))
        with pytest.raises(ValueError, match=rf"missing\.gguf: tensor '{name.replace('.', chr(92) + '.')}' is missing$"):
            lmdecode.Model.load(path)
    # every tensor of the shared files maps back to its own name
    for source in (STORIES_GGUF, TINY_RANDOM):
        file = gguf.GGUFReader(str(source))
        config, tensors, _ = loaders.read_gguf(source)
        names = {t.name for t in file.tensors}
        back = {loaders._gguf_name(name, "llama") for name in tensors}
        assert back == names, back ^ names
    assert loaders._gguf_name("layers.1.wk", "gpt2") == "blk.1.attn_qkv.weight"
    assert loaders._gguf_name("layers.1.bv", "gpt2") == "blk.1.attn_qkv.bias"
    assert loaders._gguf_name("layers.1.b_up", "gpt2") == "blk.1.ffn_up.bias"
    assert loaders._gguf_name("layers.0.attn_norm_bias", "gpt2") == "blk.0.attn_norm.bias"
    assert loaders._gguf_name("layers.7.bq", "qwen2") == "blk.7.attn_q.bias"
    assert loaders._gguf_name("position_embedding", "gpt2") == "position_embd.weight"


def test_gguf_special_token_ids_are_checked_at_load(tmp_path):
    """tokenizer.ggml.bos_token_id / eos_token_id: any integer type is taken; another type is a
    ValueError naming the file and key (as llama.cpp refuses the file); an id outside the
    vocabulary is ignored with a warning naming them (as llama.cpp ignores it), the model and its
    tokenizer then having no such token. They had surfaced later: an OverflowError or ValueError on
    every generate(), a prompt error, int() of a string, float BOS ids, token 1 as EOS for True."""
    V = gguf.GGUFValueType
    for key, vtype, value, shown in [("tokenizer.ggml.eos_token_id", V.STRING, "</s>", "'</s>'"),
                                     ("tokenizer.ggml.bos_token_id", V.FLOAT32, 1.0, "1.0"),
                                     ("tokenizer.ggml.eos_token_id", V.BOOL, True, "True"),
                                     ("tokenizer.ggml.bos_token_id", V.ARRAY, [1, 2], r"\[1, 2\]")]:
        path = _stories_rewritten(tmp_path / "typed.gguf", {key: (vtype, value)})
        with pytest.raises(ValueError, match=rf"typed\.gguf: GGUF metadata '{key}' \(={shown}\) must be an integer "
                                             r"token id"):
            lmdecode.Model.load(path)
    # other integer types hold ids as well as UINT32
    model = lmdecode.Model.load(_stories_rewritten(tmp_path / "int.gguf",
                                                   {"tokenizer.ggml.eos_token_id": (V.INT64, 13)}))
    assert model.config.eos_token_id == 13 and model.tokenizer.eos_id == 13
    good = lmdecode.Model.load(STORIES_GGUF)
    free = good.generate("Once upon a time", max_new_tokens=20, temperature=0)
    for key, value in [("tokenizer.ggml.eos_token_id", 2**32 - 1), ("tokenizer.ggml.eos_token_id", 512),
                       ("tokenizer.ggml.bos_token_id", 2**32 - 1)]:
        path = _patched_metadata(tmp_path / "outside.gguf", key, "<I", value)
        with pytest.warns(UserWarning, match=rf"outside\.gguf: GGUF metadata '{key}': token id {value} outside the "
                                             r"vocabulary \[0, 512\) ignored"):
            model = lmdecode.Model.load(path)
        out = model.generate("Once upon a time", max_new_tokens=20, temperature=0)
        if key.endswith("eos_token_id"):
            assert model.config.eos_token_id is None and model.tokenizer.eos_id is None
            assert out.tokens == free.tokens  # the same text, never stopped by an EOS
        else:
            assert model.config.bos_token_id is None and model.tokenizer.bos_id is None
            assert out.prompt_tokens == free.prompt_tokens[1:]  # no BOS in front


def _write_fake_llama2c_tokenizer(path, n_tokens):
    """A llama2.c tokenizer file of n_tokens pieces ("<0>", "<1>", ...)."""
    import struct
    parts = [struct.pack("<i", 16)]
    for i in range(n_tokens):
        piece = f"<{i}>".encode()
        parts.append(struct.pack("<fi", 0.0, len(piece)) + piece)
    path.write_bytes(b"".join(parts))


def test_llama2c_tokenizer_discovery_passes_over_one_that_does_not_fit(tmp_path):
    """llama2.c's default tokenizer.bin (32000 tokens) beside a 512-token model is not its
    tokenizer: it is passed over, not an error ("tokenizer.bin: holds 32000 tokens but the
    model's vocabulary has 512" failed the load though no tokenizer was asked for); tok512.bin
    is found first, and a tokenizer.bin that fits is taken. One passed as tokenizer= must fit."""
    import shutil
    model_path = tmp_path / "stories260K.bin"
    shutil.copy(STORIES_BIN, model_path)
    _write_fake_llama2c_tokenizer(tmp_path / "tokenizer.bin", 32000)
    model = lmdecode.Model.load(model_path)
    assert model.tokenizer_path is None and model.vocab is None and model.tokenizer is None
    np.testing.assert_array_equal(model.logits(ONCE_UPON_A_TIME), lmdecode.Model.load(STORIES_BIN).logits(ONCE_UPON_A_TIME))
    shutil.copy(TOKENIZER, tmp_path / "tok512.bin")
    model = lmdecode.Model.load(model_path)
    assert model.tokenizer_path == tmp_path / "tok512.bin" and len(model.vocab) == 512
    assert model.tokenizer.encode("Once upon a time") == ONCE_UPON_A_TIME
    (tmp_path / "tok512.bin").unlink()
    shutil.copy(TOKENIZER, tmp_path / "tokenizer.bin")  # llama2.c's name, this model's vocabulary
    model = lmdecode.Model.load(model_path)
    assert model.tokenizer_path == tmp_path / "tokenizer.bin"
    assert model.tokenizer.encode("Once upon a time") == ONCE_UPON_A_TIME
    _write_fake_llama2c_tokenizer(tmp_path / "big.bin", 32000)
    with pytest.raises(ValueError, match=r"big\.bin: holds 32000 tokens but the model's vocabulary has 512"):
        lmdecode.Model.load(model_path, tokenizer=tmp_path / "big.bin")


def _safetensors_file(path, header: dict, body: bytes):
    import json
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + body)


def test_malformed_safetensors_headers_name_the_file_and_tensor(tmp_path):
    """Header values of the wrong kind were TypeErrors from inside the reader (offsets as strings,
    floats or an object; a dtype in a list), a negative shape NumPy's error naming nothing, and a
    fractional size (64.5) was read as 64 and loaded. Each is a ValueError naming the file and
    tensor now; so are offsets outside the data section and tensors sharing bytes."""
    import json
    config, weights = _one_layer_llama(vocab=10, dim=8, hidden=16, scale=0.1, seed=0)
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    header, body, at = {}, b"", 0
    for name, arr in weights.items():
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [at, at + arr.nbytes]}
        body += arr.tobytes()
        at += arr.nbytes
    path = tmp_path / "model.safetensors"
    _safetensors_file(path, header, body)
    want = lmdecode.Model.from_numpy(config, weights).logits([1, 2, 3])
    np.testing.assert_array_equal(lmdecode.Model.load(tmp_path).logits([1, 2, 3]), want)
    norm = "model.layers.0.input_layernorm.weight"  # 8 floats
    begin, end = header[norm]["data_offsets"]
    tensor = r"model\.safetensors: tensor 'model\.layers\.0\.input_layernorm\.weight'"
    cases = [("data_offsets", [str(begin), str(end)], r": data_offsets \(=\['\d+', '\d+'\]\) must be two non-negative integers"),
             ("data_offsets", [float(begin), float(end)], r": data_offsets \(=\[[\d.]+, [\d.]+\]\) must be two"),
             ("data_offsets", {"a": 1, "b": 2}, r": data_offsets \(=\{'a': 1, 'b': 2\}\) must be two"),
             ("data_offsets", [begin], r": data_offsets \(=\[\d+\]\) must be two"),
             ("data_offsets", [at, at + 32], r" ends at byte \d+ but the file has \d+"),
             ("data_offsets", [0, 32], None),  # the embedding's first bytes
             ("dtype", ["F32"], r": dtype \(=\['F32'\]\) must be a string"),
             ("dtype", "F64", r" has dtype F64; supported: F32, F16, BF16"),
             ("shape", [-8, -1], r": shape \(=\[-8, -1\]\) must be a list of non-negative integers"),
             ("shape", [7.5], r": shape \(=\[7\.5\]\) must be a list of non-negative integers"),
             ("shape", [True], r": shape \(=\[True\]\) must be"),
             ("shape", [4], r": data offsets \[\d+, \d+\) do not hold shape \(4,\) of F32")]
    for field, value, message in cases:
        bad = json.loads(json.dumps(header))
        bad[norm][field] = value
        _safetensors_file(path, bad, body)
        if message is None:
            message = (r"model\.safetensors: tensors 'model\.layers\.0\.input_layernorm\.weight' and "
                       r"'model\.embed_tokens\.weight' overlap in the data section \(bytes 0 to 32\)")
        else:
            message = tensor + message if not message.startswith(" ends") else r"model\.safetensors: truncated: " + tensor[20:] + message
        with pytest.raises(ValueError, match=message):
            lmdecode.Model.load(tmp_path)
    bad = dict(header, **{norm: [1, 2]})
    _safetensors_file(path, bad, body)
    with pytest.raises(ValueError, match=tensor + r": malformed header entry \[1, 2\]"):
        lmdecode.Model.load(tmp_path)


@pytest.mark.parametrize("dtype", [None, "f16", "bf16", "q8_0"])
def test_from_numpy_holds_no_reference_to_the_callers_arrays(dtype):
    """Model.from_numpy copies everything: changing the arrays afterwards, in place, leaves the
    model's logits as they were. An untied float32 (or float16) token embedding, which the engine
    reads in place, used to stay the caller's array, and so did the norm weights."""
    config, weights = _one_layer_llama(vocab=64, dim=32, hidden=64, scale=0.3, seed=2)
    config = {**config, "tie_word_embeddings": False}
    if dtype == "f16":
        weights = {k: v.astype(np.float16) for k, v in weights.items()}
    model = lmdecode.Model.from_numpy(config, weights, dtype=dtype)
    toks = [1, 5, 9, 33, 60]
    before = model.logits(toks)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight",
                 "lm_head.weight", "model.layers.0.mlp.up_proj.weight"):
        weights[name] *= 0.5
        np.testing.assert_array_equal(model.logits(toks), before, err_msg=name)


def test_non_finite_norm_eps_and_rope_theta_are_refused(tmp_path):
    """The engine holds them as float32: an infinite epsilon (NaN and negative ones were already
    refused) or a base that float32 cannot hold (a GGUF float64 of 1e300) gave garbage logits
    without an error. ValueErrors naming the file's field now, and the engine's own check too."""
    V = gguf.GGUFValueType
    for key, value, shown in [("llama.attention.layer_norm_rms_epsilon", float("inf"), "inf"),
                              ("llama.rope.freq_base", 1e300, "1e\\+300"),
                              ("llama.rope.freq_base", float("nan"), "nan")]:
        path = _stories_rewritten(tmp_path / "float.gguf", {key: (V.FLOAT64, value)})
        with pytest.raises(ValueError, match=rf"float\.gguf: GGUF metadata '{key}' \(={shown}\) must be finite and "):
            lmdecode.Model.load(path)
    # finite values read as float64 load
    path = _stories_rewritten(tmp_path / "f64.gguf", {"llama.rope.freq_base": (V.FLOAT64, 10000.0)})
    np.testing.assert_array_equal(lmdecode.Model.load(path).logits(ONCE_UPON_A_TIME),
                                  lmdecode.Model.load(STORIES_GGUF).logits(ONCE_UPON_A_TIME))
    config, weights = _one_layer_llama(vocab=10, dim=8, hidden=16, scale=0.1, seed=0)
    for key, value in [("rms_norm_eps", float("inf")), ("rope_theta", 1e39), ("rope_theta", float("inf"))]:
        with pytest.raises(ValueError, match=rf"^from_numpy config: config .{key}. \(={re.escape(repr(value))}\) must be finite"):
            lmdecode.Model.from_numpy({**config, key: value}, weights)
    engine_config = dict(arch="llama", vocab_size=10, dim=8, hidden_dim=16, n_layers=1, n_heads=2, n_kv_heads=2,
                         head_dim=4, context_length=16, norm_eps=float("inf"), rope_theta=1e4, rope_layout="half")
    with pytest.raises(ValueError, match=r"norm_eps \(=inf\) must be finite and >= 0"):
        _core.Model(engine_config, {})


def test_eos_token_id_lists_stop_generation_at_every_id():
    """A config.json's list of EOS ids (Llama 3's [128001, 128008, 128009]) is ModelConfig's tuple,
    and every id in it ends generate() (plain, speculative, contrastive) and beam_search(); it
    was a TypeError ("unhashable type: 'list'") in generate(). One id stays an int, none None."""
    config, weights = _one_layer_llama(vocab=64, dim=32, hidden=64, scale=0.5, seed=1)
    config = {**config, "tie_word_embeddings": False}
    assert lmdecode.Model.from_numpy({**config, "eos_token_id": [7]}, weights).config.eos_token_id == 7
    assert lmdecode.Model.from_numpy({**config, "eos_token_id": []}, weights).config.eos_token_id is None
    plain = lmdecode.Model.from_numpy(config, weights)
    amateur = lmdecode.Model.from_numpy(_one_layer_llama(vocab=64, dim=32, hidden=64, scale=0.5, seed=9)[0],
                                        _one_layer_llama(vocab=64, dim=32, hidden=64, scale=0.5, seed=9)[1])
    prompt = [1, 2, 3]
    for kind, kwargs in [("greedy", {}), ("speculative", {"draft_model": plain}),
                         ("contrastive", {"amateur_model": amateur})]:
        free = plain.generate(prompt, max_new_tokens=10, temperature=0, **kwargs).tokens
        assert len(free) == 10
        k = next(i for i in range(1, 10) if free[i] not in free[:i])  # a token's first appearance
        unused = next(t for t in range(64) if t not in free)
        model = lmdecode.Model.from_numpy({**config, "eos_token_id": [unused, free[k]]}, weights)
        assert model.config.eos_token_id == (unused, free[k])
        if kind == "speculative":
            kwargs = {"draft_model": model}
        out = model.generate(prompt, max_new_tokens=10, temperature=0, **kwargs)
        assert out.tokens == free[:k + 1] and out.finish_reason == "stop", kind
        streamed = list(model.generate(prompt, max_new_tokens=10, temperature=0, stream=True, **kwargs))
        assert [c.token for c in streamed] == free[:k + 1] and streamed[-1].finish_reason == "stop"
    free = plain.beam_search(prompt, beam_width=1, max_new_tokens=10)[0].tokens
    k = next(i for i in range(1, 10) if free[i] not in free[:i])
    unused = next(t for t in range(64) if t not in free)
    model = lmdecode.Model.from_numpy({**config, "eos_token_id": [unused, free[k]]}, weights)
    (best,) = model.beam_search(prompt, beam_width=1, max_new_tokens=10)
    assert best.tokens == free[:k + 1] and best.finish_reason == "stop"
    with pytest.warns(UserWarning, match=r"from_numpy config: config 'eos_token_id' \(=\[5, 64, 99\]\): token ids "
                                         r"64, 99 outside the vocabulary \[0, 64\) ignored"):
        assert lmdecode.Model.from_numpy({**config, "eos_token_id": [5, 64, 99]}, weights).config.eos_token_id == 5
    with pytest.raises(ValueError, match=r"config 'bos_token_id' \(=\[1, 2\]\) must be a token id or null"):
        lmdecode.Model.from_numpy({**config, "bos_token_id": [1, 2]}, weights)


def test_attention_scores_grow_with_the_positions_and_not_with_the_context_length():
    """The run state's attention scores are sized by the positions calls attend to, not by the
    context length up front: a context length of 2^31 - 1 (a corrupt file's, or a config's) loads
    and decodes (it was a MemoryError "allocating the run state for 1024 tokens" naming no field),
    while new_cache() of the whole context says which field asked for so much. Growing the buffer
    between calls keeps every logit bit-identical to a single prefill."""
    config, weights = _one_layer_llama(vocab=64, dim=32, hidden=64, scale=0.5, seed=3)
    huge = lmdecode.Model.from_numpy({**config, "max_position_embeddings": 2**31 - 1}, weights)
    small = lmdecode.Model.from_numpy(config, weights)
    np.testing.assert_array_equal(huge.logits([1, 2, 3]), small.logits([1, 2, 3]))
    assert huge.generate([1, 2, 3], max_new_tokens=5, temperature=0).tokens == \
        small.generate([1, 2, 3], max_new_tokens=5, temperature=0).tokens
    assert len(huge.new_cache(capacity=64)) == 0
    with pytest.raises(MemoryError, match=r"new_cache\(\) makes room for the context length \(context_length="
                                          r"2147483647 positions\); pass capacity= for fewer"):
        huge.new_cache()
    # 1024 positions at first: a call beyond them grows the buffer (to twice that, then to what
    # the call needs), each call's logits bit-identical to one prefill's, which grew it at once
    long_config = {**config, "max_position_embeddings": 4096}
    toks = _tokens(3000, 64, seed=4)
    whole = lmdecode.Model.from_numpy(long_config, weights).logits(toks)
    model = lmdecode.Model.from_numpy(long_config, weights)
    cache = model.new_cache(3000)
    for begin, end in [(0, 1000), (1000, 1500), (1500, 3000)]:
        np.testing.assert_array_equal(model.forward(toks[begin:end], cache, logits="all"), whole[begin:end])
    engine_config, tensors = loaders.from_hf_numpy(long_config, weights)
    ref = llama_logits(engine_config, {k: loaders.to_f32(v).astype(np.float64) for k, v in tensors.items()}, toks[:1100])
    assert _rel_max_diff(ref, whole[:1100]) < 1e-4
