"""GGUF quantized types the engine does not multiply natively (k-quants, 5-bit, IQ4): read from
their values, dequantized by the gguf package at load, then stored as `dtype` asks.

Q4_K and Q6_K (the bulk of llama.cpp's usual Q4_K_M files) are checked against decoders written
here from the block layouts of ggml's dequantize_row_q4_K / dequantize_row_q6_K; the other types
against the gguf package's own dequantization, which then only checks the loading around it."""
import numpy as np
import pytest

import lmdecode
from lmdecode import _core, loaders
from gguf_files import write_gguf
from reference_model import llama_logits

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

# block bytes and the byte offsets of the fp16 scales (d, and dmin where the type has one)
BLOCK_LAYOUT = {"Q5_0": (22, (0,)), "Q5_1": (24, (0, 2)), "Q2_K": (84, (80, 82)), "Q3_K": (110, (108,)),
                "Q4_K": (144, (0, 2)), "Q5_K": (176, (0, 2)), "Q6_K": (210, (208,)), "IQ4_NL": (18, (0,)),
                "IQ4_XS": (136, (0,))}
CONFIG = dict(vocab=64, dim=256, hidden=512, n_layers=2, n_heads=4, n_kv_heads=2, context=128)


def _f16(block, offset):
    return float(block[offset:offset + 2].view(np.float16)[0])


def dequantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    """(n, 144) uint8 -> (n * 256,): d, dmin (fp16), 12 bytes of 6-bit scales and mins for 8
    sub-blocks of 32, 128 bytes of 4-bit values (sub-blocks 2c and 2c+1 in the low and high
    nibbles of bytes 32c..32c+31); value = d * scale * q - dmin * min."""
    out = []
    for b in blocks:
        d, dmin, sc, qs = _f16(b, 0), _f16(b, 2), b[4:16].astype(np.int64), b[16:144].astype(np.int64)
        scale = [sc[j] & 63 if j < 4 else (sc[j + 4] & 15) | ((sc[j - 4] >> 6) << 4) for j in range(8)]
        low = [sc[j + 4] & 63 if j < 4 else (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4) for j in range(8)]
        for c in range(4):
            q = qs[32 * c:32 * c + 32]
            out.append(d * scale[2 * c] * (q & 15) - dmin * low[2 * c])
            out.append(d * scale[2 * c + 1] * (q >> 4) - dmin * low[2 * c + 1])
    return np.concatenate(out)


def dequantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    """(n, 210) uint8 -> (n * 256,): 128 bytes of low 4 bits, 64 bytes of high 2 bits, 16 int8
    scales (one per 16 values), d (fp16); each half of 128 values takes 64 low bytes, 32 high
    bytes and 8 scales; value = d * scale * (q - 32)."""
    out = []
    for b in blocks:
        ql, qh, sc, d = b[:128].astype(np.int64), b[128:192].astype(np.int64), b[192:208].view(np.int8), _f16(b, 208)
        for half in range(2):
            lo, hi, s = ql[64 * half:64 * half + 64], qh[32 * half:32 * half + 32], sc[8 * half:8 * half + 8]
            quarters = [(lo[:32] & 15) | ((hi & 3) << 4), (lo[32:] & 15) | (((hi >> 2) & 3) << 4),
                        (lo[:32] >> 4) | (((hi >> 4) & 3) << 4), (lo[32:] >> 4) | (((hi >> 6) & 3) << 4)]
            for k, q in enumerate(quarters):  # values 32k..32k+31: scales 2k and 2k+1, 16 values each
                scale = np.repeat(s[2 * k:2 * k + 2].astype(np.float64), 16)
                out.append(d * scale * (q - 32))
    return np.concatenate(out)


def random_blocks(kind: str, rows: int, cols: int, rng, std: float = 0.05) -> np.ndarray:
    """(rows, cols / block values * block bytes) uint8: random bytes, with random fp16 scales per
    block (dmin a tenth of d) chosen so that the values' standard deviation is about `std`."""
    block_bytes, scale_offsets = BLOCK_LAYOUT[kind]
    values = gguf.GGML_QUANT_SIZES[Q[kind]][0]
    blocks = rng.integers(0, 256, size=(rows * cols // values, block_bytes), dtype=np.uint8)
    spread = rng.uniform(0.5, 2.0, size=(len(blocks), 1))

    def set_scales(unit):
        for offset, share in zip(scale_offsets, (1.0, 0.1)):
            blocks[:, offset:offset + 2] = (unit * share * spread).astype(np.float16).view(np.uint8)

    set_scales(1.0)
    set_scales(std / float(np.std(gguf.quants.dequantize(blocks, Q[kind]))))
    return blocks.reshape(rows, -1)


def _metadata_and_matrix_shapes():
    """CONFIG's GGUF metadata and the (rows, columns) of every matrix, by tensor name."""
    c = CONFIG
    kv = c["n_kv_heads"] * c["dim"] // c["n_heads"]
    meta = {"llama.embedding_length": c["dim"], "llama.block_count": c["n_layers"],
            "llama.attention.head_count": c["n_heads"], "llama.attention.head_count_kv": c["n_kv_heads"],
            "llama.feed_forward_length": c["hidden"], "llama.context_length": c["context"],
            "llama.attention.layer_norm_rms_epsilon": 1e-5}
    shapes = {"token_embd.weight": (c["vocab"], c["dim"]), "output.weight": (c["vocab"], c["dim"])}
    for layer in range(c["n_layers"]):
        p = f"blk.{layer}."
        shapes.update({p + "attn_q.weight": (c["dim"], c["dim"]), p + "attn_k.weight": (kv, c["dim"]),
                       p + "attn_v.weight": (kv, c["dim"]), p + "attn_output.weight": (c["dim"], c["dim"]),
                       p + "ffn_gate.weight": (c["hidden"], c["dim"]), p + "ffn_up.weight": (c["hidden"], c["dim"]),
                       p + "ffn_down.weight": (c["dim"], c["hidden"])})
    return meta, shapes


def _write_model(path, kind, rng, output_kind=None):
    """A 2-layer Llama (dim 256, so that every matrix row holds whole 256-value blocks) with every
    matrix in GGML type `kind` (the output head in output_kind when given) and random norms; returns
    the matrices' blocks by tensor name."""
    c = CONFIG
    meta, shapes = _metadata_and_matrix_shapes()
    blocks, tensors = {}, {}
    for name, (rows, cols) in shapes.items():
        this_kind = output_kind if name == "output.weight" and output_kind else kind
        blocks[name] = random_blocks(this_kind, rows, cols, rng)
        tensors[name] = (blocks[name], this_kind)
    for name in ["output_norm.weight"] + [f"blk.{i}.{n}_norm.weight" for i in range(c["n_layers"]) for n in ("attn", "ffn")]:
        tensors[name] = (1 + 0.1 * rng.standard_normal(c["dim"])).astype(np.float32)
    write_gguf(path, "llama", meta, tensors)
    return blocks


def test_block_generator_places_the_scales():
    """Zero scales make every value zero: the offsets in BLOCK_LAYOUT are the types' fp16 fields."""
    rng = np.random.default_rng(0)
    for kind, (block_bytes, offsets) in BLOCK_LAYOUT.items():
        assert gguf.GGML_QUANT_SIZES[Q[kind]][1] == block_bytes
        blocks = random_blocks(kind, 2, 256, rng)
        assert np.isfinite(gguf.quants.dequantize(blocks, Q[kind])).all()
        each = blocks.reshape(-1, block_bytes)
        for offset in offsets:
            each[:, offset:offset + 2] = 0
        np.testing.assert_array_equal(gguf.quants.dequantize(blocks, Q[kind]), 0, err_msg=kind)


@pytest.mark.parametrize("kind,decoder", [("Q4_K", dequantize_q4_k), ("Q6_K", dequantize_q6_k)])
def test_k_quant_decoders_agree_with_the_gguf_package(kind, decoder):
    """The independent decoders above against gguf's, on random blocks (and a hand-made Q4_K block)."""
    rng = np.random.default_rng(1)
    blocks = random_blocks(kind, 3, 512, rng)
    np.testing.assert_array_equal(decoder(blocks.reshape(-1, BLOCK_LAYOUT[kind][0])),
                                  gguf.quants.dequantize(blocks, Q[kind]).ravel().astype(np.float64))
    if kind == "Q4_K":  # d = 0.5, dmin = 0.25; sub-block 0 scale 3, min 2; sub-block 5 (high nibbles
        # of bytes 64-95) scale 4 + 16 * 1 = 20 (bits 6-7 of byte 1), min 1 + 16 * 2 = 33 (bits 6-7 of byte 5)
        block = np.zeros(144, np.uint8)
        block[0:2] = np.array([0.5], np.float16).view(np.uint8)
        block[2:4] = np.array([0.25], np.float16).view(np.uint8)
        block[4 + 0], block[4 + 4] = 3, 2
        block[4 + 1] |= 1 << 6
        block[4 + 5] |= 2 << 6
        block[4 + 9] = 4 | (1 << 4)
        block[16 + 0] = 7  # value 0: 7 in sub-block 0
        block[16 + 64 + 3] = 9 << 4  # value 5 * 32 + 3: 9 in sub-block 5
        want = np.zeros(256)
        want[0:32] = -0.25 * 2
        want[0] = 0.5 * 3 * 7 - 0.25 * 2
        want[160:192] = -0.25 * 33
        want[163] = 0.5 * 20 * 9 - 0.25 * 33
        for decode in (dequantize_q4_k, lambda b: gguf.quants.dequantize(b, Q.Q4_K).ravel()):
            np.testing.assert_array_equal(decode(block[None])[[0, 1, 163, 164, 200]], want[[0, 1, 163, 164, 200]])


@pytest.mark.parametrize("kind", sorted(BLOCK_LAYOUT))
def test_quantized_gguf_types(kind, tmp_path):
    """A model whose matrices are all of one type: in f32 storage the engine computes with the
    file's values (the NumPy reference on the decoded weights, within 1e-4 of the logit range); by
    default they are stored as q8_0, requantized from those values (the reference on the q8_0
    values with int8 inputs within 2e-2)."""
    rng = np.random.default_rng(len(kind))
    blocks = _write_model(tmp_path / f"{kind}.gguf", kind, rng)
    decode = {"Q4_K": dequantize_q4_k, "Q6_K": dequantize_q6_k}.get(
        kind, lambda b: gguf.quants.dequantize(b, Q[kind]).astype(np.float64))
    config, tensors, _ = loaders.read_gguf(tmp_path / f"{kind}.gguf")
    assert tensors["layers.1.w_down"].kind == kind.lower()
    names = {"token_embd.weight": "token_embedding", "output.weight": "output"}
    for name, b in blocks.items():
        engine = names.get(name) or "layers.{}.{}".format(name.split(".")[1], loaders.GGUF_LLAMA_NAMES[name.split(".")[2]])
        rows = b.shape[0]
        np.testing.assert_array_equal(loaders.to_f32(tensors[engine]), decode(b.reshape(-1, BLOCK_LAYOUT[kind][0]))
                                      .reshape(rows, -1).astype(np.float32), err_msg=name)
    weights = {k: loaders.to_f32(v).astype(np.float64) for k, v in tensors.items()}
    toks = np.random.default_rng(7).integers(0, CONFIG["vocab"], 40)
    ref = llama_logits(config, weights, toks)
    f32 = lmdecode.Model.load(tmp_path / f"{kind}.gguf", dtype="f32").logits(toks)
    scale = float(np.ptp(ref))
    assert scale > 1.0 and float(np.abs(f32 - ref).max()) < 1e-4 * scale
    default = lmdecode.Model.load(tmp_path / f"{kind}.gguf")
    assert default.config.dtype == "q8_0"
    stored = loaders.to_storage(tensors, "q8_0")
    q8 = {k: _core.dequantize_q8_0(v).astype(np.float64) if loaders.is_matrix(k) else weights[k] for k, v in stored.items()}
    got = default.logits(toks)
    # the engine's q8_0 arithmetic (its inputs quantized too) on the requantized values: 1e-7 to
    # 8e-3 measured, the larger where an input that float32 and float64 round to neighbouring
    # int8 values moves later positions; a misread type is off by about the whole range
    assert float(np.abs(got - llama_logits(config, q8, toks, set(q8) - {"token_embedding"})).max()) < 2e-2 * scale
    assert float(np.abs(got - f32).max()) < 0.1 * scale  # 1e-3 to 2.3e-2 measured: random weights, int8 inputs


def test_q4_0_file_with_a_finer_output_head(tmp_path):
    """llama.cpp's Q4_0 files keep the output head finer (Q6_K): the default stays q4_0, the head
    becomes q8_0 (never rounded to 4 bits); a Q4_K file asked for q4_0 is requantized from its
    values, and its Q6_K head is q8_0 there too."""
    rng = np.random.default_rng(3)
    _write_model(tmp_path / "q4_0.gguf", "Q5_0", rng, output_kind="Q6_K")  # Q5_0 stands in below
    config, tensors, _ = loaders.read_gguf(tmp_path / "q4_0.gguf")
    quantized = {name: src for name, src in tensors.items() if loaders.is_matrix(name)}
    q4 = {name: loaders.Source("q4_0", gguf.quants.quantize(loaders.to_f32(src), Q.Q4_0), src.shape)
          for name, src in quantized.items() if name != "output"}
    mixed = {**tensors, **q4}
    assert loaders.default_storage(mixed) == "q4_0"
    stored = loaders.to_storage(mixed, "q4_0")
    assert stored["layers.0.wq"].dtype == np.dtype("V18") and stored["output"].dtype == np.uint8  # q8_0 bytes
    _write_model(tmp_path / "q4_k.gguf", "Q4_K", rng, output_kind="Q6_K")
    model = lmdecode.Model.load(tmp_path / "q4_k.gguf", dtype="q4_0")
    assert model.config.dtype == "q4_0"
    stored = loaders.to_storage(loaders.read_gguf(tmp_path / "q4_k.gguf")[1], "q4_0")
    assert stored["layers.0.wq"].dtype == np.dtype("V18") and stored["output"].dtype == np.uint8
    assert loaders.default_storage(loaders.read_gguf(tmp_path / "q4_k.gguf")[1]) == "q8_0"


def test_unsupported_quantized_type_is_named(tmp_path):
    rng = np.random.default_rng(4)
    write_gguf(tmp_path / "iq2.gguf", "llama", {"llama.embedding_length": 256, "llama.block_count": 1,
                                                 "llama.attention.head_count": 4, "llama.context_length": 64},
               {"token_embd.weight": (rng.integers(0, 256, (8, 66), dtype=np.uint8), "IQ2_XXS")})
    with pytest.raises(ValueError, match=r"iq2\.gguf: tensor 'token_embd\.weight' has type IQ2_XXS, not supported"):
        lmdecode.Model.load(tmp_path / "iq2.gguf")


@pytest.mark.parametrize("layers,head", [("Q4_0", "F16"), ("Q4_1", "F32"), ("Q4_0", "BF16")])
def test_float_head_of_a_q4_file_keeps_its_type(layers, head, tmp_path):
    """llama-quantize --output-tensor-type f16 (or --leave-output-tensor) writes a Q4_0 / Q4_1
    file whose output head stays F16 (F32, BF16). The default storage stays q4, and the head
    keeps the file's type and values, as a Q8_0 head stays q8_0 (it was rounded to 4 bits):
    the logits equal the NumPy reference on the file's values (the q4 matrices as their
    blocks dequantize, their inputs quantized as the engine does) within 1e-2 of the logit
    range, and stray ten times further from a reference whose head is rounded to 4 bits."""
    c = CONFIG
    rng = np.random.default_rng(12)
    meta, shapes = _metadata_and_matrix_shapes()
    del shapes["output.weight"]  # the head is drawn below, of another scale and type
    tensors = {name: (rng.normal(0, 0.05, shape).astype(np.float32), layers) for name, shape in shapes.items()}
    tensors["output.weight"] = (rng.normal(0, 0.5, (c["vocab"], c["dim"])).astype(np.float32), head)
    for name in ["output_norm.weight"] + [f"blk.{i}.{n}_norm.weight" for i in range(c["n_layers"]) for n in ("attn", "ffn")]:
        tensors[name] = (1 + 0.1 * rng.standard_normal(c["dim"])).astype(np.float32)
    path = tmp_path / f"{layers}_{head}.gguf"
    write_gguf(path, "llama", meta, tensors)

    config, sources, _ = loaders.read_gguf(path)
    assert sources["output"].kind == head.lower() and sources["layers.0.wq"].kind == layers.lower()
    storage = layers.lower()
    assert loaders.default_storage(sources) == storage
    stored = loaders.to_storage(sources, storage)
    assert stored["layers.0.wq"].dtype == np.dtype(f"V{loaders.Q4_BLOCK_BYTES[storage]}")
    assert stored["output"].dtype == {"F16": np.float16, "F32": np.float32, "BF16": np.uint16}[head]
    np.testing.assert_array_equal(loaders.to_f32(loaders.Source(head.lower(), stored["output"], stored["output"].shape)),
                                  loaders.to_f32(sources["output"]))  # the file's values
    weights = {k: loaders.to_f32(v).astype(np.float64) for k, v in sources.items()}
    quantized = {k for k, src in sources.items() if src.kind == storage} - {"token_embedding"}
    toks = np.random.default_rng(7).integers(0, c["vocab"], 40)
    model = lmdecode.Model.load(path)
    assert model.config.dtype == storage
    got = model.logits(toks)
    ref = llama_logits(config, weights, toks, quantized)
    scale = float(np.ptp(ref))
    rounded_head = _core.dequantize_q4(_core.quantize_q4(weights["output"].astype(np.float32), storage), storage)
    rounded = llama_logits(config, {**weights, "output": rounded_head.astype(np.float64)}, toks, quantized | {"output"})
    near, far = float(np.abs(got - ref).max()) / scale, float(np.abs(got - rounded).max()) / scale
    # 8e-4 to 1.8e-3 against 4.6e-2 to 5.2e-2 measured
    assert near < 1e-2 and far > 10 * near, (near, far)
    # an explicit q4 dtype keeps it too, as it keeps a Q8_0 head q8_0
    assert loaders.to_storage(sources, "q4_1" if storage == "q4_0" else "q4_0")["output"].dtype == stored["output"].dtype


def test_float_matrices_of_float_files_are_quantized_to_q4_when_asked():
    """The rule is the file's choice: in a file whose matrices are all float (or from_numpy)
    q4 storage asked for rounds every matrix (with 32k columns) to 4 bits, the head included."""
    a = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    for kind, data in (("f32", a), ("f16", a.astype(np.float16))):
        tensors = {"layers.0.wq": loaders.Source(kind, data, a.shape), "output": loaders.Source(kind, data, a.shape)}
        stored = loaders.to_storage(tensors, "q4_0")
        assert stored["layers.0.wq"].dtype == stored["output"].dtype == np.dtype("V18")
    # the audit's repro: beside q4_0 layers an f16 head is kept f16, as a q8_0 head is kept q8_0
    q4 = loaders.Source("q4_0", gguf.quants.quantize(a, Q.Q4_0), a.shape)
    for head, dtype in ((loaders.Source("f16", a.astype(np.float16), a.shape), np.float16),
                        (loaders.Source("q8_0", gguf.quants.quantize(a, Q.Q8_0), a.shape), np.uint8)):
        t = {"layers.0.wq": q4, "output": head}
        assert loaders.default_storage(t) == "q4_0"
        assert loaders.to_storage(t, "q4_0")["output"].dtype == dtype
