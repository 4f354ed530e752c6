"""Readers of model files into the engine's tensor dictionary.

Every reader returns ``(config, tensors, extras)``:

* ``config``: the engine's hyperparameters (a dict with the keys of :class:`lmdecode.ModelConfig`);
* ``tensors``: engine tensor names -> :class:`Source` (the data as it lies in the file, memory
  mapped wherever the file allows, plus its element kind);
* ``extras``: format facts that are not hyperparameters (vocabulary, tokenizer path).

Engine tensor names: ``token_embedding`` (V, D), ``position_embedding`` (T, D), ``final_norm``
(D,), ``final_norm_bias``, ``output`` (V, D), and per layer ``layers.{i}.`` + ``attn_norm``,
``attn_norm_bias``, ``wq`` (Q, D), ``wk`` (K, D), ``wv`` (K, D), ``wo`` (D, Q), ``bq``, ``bk``,
``bv``, ``bo``, ``ffn_norm``, ``ffn_norm_bias``, ``w_gate`` (H, D), ``w_up`` (H, D), ``w_down``
(D, H), ``b_up``, ``b_down``. Matrices are (out_features, in_features).

:func:`to_storage` turns sources into the arrays the C engine reads (float32, float16, bfloat16
bits as uint16, or Q8_0 blocks as uint8, packed by ``_core.pack_q8_0`` in the engine's groups of 16 rows),
borrowing whenever source and storage agree (the engine then copies f32, bf16 and f16 matrices into
its panels).
"""
from __future__ import annotations

import ctypes
import functools
import json
import math
import mmap
import numbers
import os
import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import _core
from .gguf_file import GGUFError, read_gguf_file
from .sampling import as_numpy

Q8_0_BLOCK = 32
Q8_0_BLOCK_BYTES = 34
STORAGE_DTYPES = ("f32", "bf16", "f16", "q8_0", "q4_0", "q4_1")
# quantized file types with more than 4 bits a weight: q8_0 in q4 storage, never rounded to 4 bits
FINER_THAN_4_BITS = frozenset({"q8_0", "q5_0", "q5_1", "q5_k", "q6_k"})
# float source kinds; in q4 storage a quantized file's matrices of these kinds keep their kind
FLOAT_KINDS = frozenset({"f32", "f16", "bf16"})
# bytes of a llama.cpp Q4_0 / Q4_1 block; the engine's arrays hold one numpy void item per block
Q4_BLOCK_BYTES = {"q4_0": 18, "q4_1": 20}
MATRIX_SUFFIXES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


@dataclass
class Source:
    """One tensor as stored in a file.

    kind: "f32", "f16", "bf16" (data is uint16 bits), or a GGUF quantized type in lower case
    ("q8_0", "q4_0", "q4_1", "q6_k", ...; data is the raw uint8 blocks, one row per output
    feature); shape: the logical (rows, cols) or (n,); origin: the file and the file's name of
    the tensor, which storage errors (matrix_storage) name.
    """

    kind: str
    data: np.ndarray
    shape: tuple
    # where messages say it comes from: "{file}: tensor '{the file's name}'" (None: sources
    # built by hand, named by their engine names)
    origin: str | None = None


def _fail(path, message):
    raise ValueError(f"{path}: {message}")


def _origin(path, name: str) -> str:
    """A Source's origin: the file (or "from_numpy weights") and the tensor as the file names it."""
    return f"{path}: tensor {name!r}"


def is_matrix(name: str) -> bool:
    return name in ("token_embedding", "output") or name.rsplit(".", 1)[-1] in MATRIX_SUFFIXES


# ----------------------------------------------------------------------------------------------
# conversions to the engine's storage
# ----------------------------------------------------------------------------------------------


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounded to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)
    return rounded


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (np.ascontiguousarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def _dequantize_gguf(src: Source) -> np.ndarray:
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType[src.kind.upper()]
    return np.ascontiguousarray(quants.dequantize(src.data, qtype), dtype=np.float32).reshape(src.shape)


def to_f32(src: Source) -> np.ndarray:
    """The tensor as float32 (borrowed if it already is)."""
    if src.kind == "f32":
        return np.ascontiguousarray(src.data, dtype=np.float32).reshape(src.shape)
    if src.kind == "f16":
        return np.ascontiguousarray(src.data, dtype=np.float32).reshape(src.shape)
    if src.kind == "bf16":
        return bf16_bits_to_f32(src.data).reshape(src.shape)
    return _dequantize_gguf(src)


def default_storage(tensors: dict) -> str:
    """f32 sources stay f32, bf16 stays bf16, f16 stays f16 (when every matrix is f16: the values
    of any f32 ones would be rounded; else f32, exact). Quantized files keep their Q4_0 or Q4_1
    blocks when those are their only kind of 4 bits or fewer (their matrices of finer types, such
    as the Q8_0 token embedding or Q6_K output head llama.cpp keeps finer, become q8_0, and
    their float matrices, such as the F16 head of llama-quantize --output-tensor-type f16, keep
    their type: matrix_storage); else they become q8_0 (k-quants and other types, read from
    their values)."""
    kinds = {src.kind for name, src in tensors.items() if is_matrix(name)}
    quantized = kinds - FLOAT_KINDS
    for q4 in ("q4_0", "q4_1"):
        if q4 in quantized and quantized <= {q4} | FINER_THAN_4_BITS:
            return q4
    if quantized:
        return "q8_0"
    if "bf16" in kinds and kinds <= {"f32", "bf16"}:
        return "bf16"  # bf16 matrices, perhaps with a few left in f32
    if kinds == {"f16"}:
        return "f16"
    return "f32"


def matrix_storage(src: Source, dtype: str, name: str = "tensor", *, quantized_file: bool = False) -> np.ndarray:
    """A weight matrix in the engine's storage `dtype`, borrowing the source when they agree.

    Q8_0, Q4_0 and Q4_1 need a multiple of 32 columns; narrower or odd tensors stay float32 (as
    llama.cpp's quantizer also leaves them), which is documented in Model.load. In q4 storage a
    file's matrices of finer quantized types (Q8_0, Q5_*, Q6_K: the file's choice) are q8_0 and
    its blocks of the same kind are packed unchanged; so that nothing the file keeps finer is
    rounded to 4 bits, the float matrices of a quantized file (quantized_file: it holds
    quantized matrices, and left these in F16, BF16 or F32, as llama-quantize
    --output-tensor-type f16 or --leave-output-tensor leave the head) keep their kind and
    values (f16, bf16, f32 storage: the engine takes each matrix in its own storage). Float
    matrices of float files (and from_numpy) and other quantized types (read from their values,
    dequantized by the gguf package) are quantized as llama.cpp's reference quantizer does, and
    must be finite. Values that f16 cannot hold (beyond +-65504)
    are a ValueError naming the tensor, not infinities; so are non-finite values for q8_0 and q4,
    and values whose block's fp16 scale or minimum would be infinite (_quantized).
    Messages name src.origin (the file and its name of the tensor) when it has one, else `name`.
    """
    name = src.origin or name
    rows, cols = src.shape
    if dtype in ("q8_0", "q4_0", "q4_1") and cols % Q8_0_BLOCK != 0:
        dtype = "f32"
    if dtype in Q4_BLOCK_BYTES and src.kind in FINER_THAN_4_BITS:
        dtype = "q8_0"
    elif dtype in Q4_BLOCK_BYTES and quantized_file and src.kind in FLOAT_KINDS:
        dtype = src.kind  # the file's choice, as it is (borrowed: the engine copies it into panels)
    if dtype in Q4_BLOCK_BYTES:
        item = np.dtype(f"V{Q4_BLOCK_BYTES[dtype]}")
        if src.kind == dtype:  # the same blocks, packed in groups of rows as the engine stores them
            blocks = np.asarray(src.data, dtype=np.uint8).reshape(rows, cols // Q8_0_BLOCK * item.itemsize)
            return _core.pack_q4(blocks, dtype).view(item)
        return _quantized(src, dtype, name).view(item)
    if dtype == "f32":
        return to_f32(src)
    if dtype == "bf16":
        if src.kind == "bf16":
            return np.ascontiguousarray(src.data, dtype=np.uint16).reshape(rows, cols)
        return f32_to_bf16_bits(to_f32(src)).reshape(rows, cols)
    if dtype == "f16":
        if src.kind == "f16":
            return np.ascontiguousarray(src.data, dtype=np.float16).reshape(rows, cols)
        wide = to_f32(src)
        with np.errstate(over="ignore"):
            half = wide.astype(np.float16)  # rounded to nearest even
        if not np.array_equal(np.isfinite(half), np.isfinite(wide)):
            raise ValueError(f"{name}: values beyond the f16 range (largest magnitude "
                             f"{float(np.max(np.abs(wide[np.isfinite(wide)]))):.6g}; f16 holds 65504): "
                             f"choose another dtype")
        return half.reshape(rows, cols)
    if src.kind == "q8_0":  # the same blocks, packed in groups of rows as the engine stores them
        return _core.pack_q8_0(np.asarray(src.data, dtype=np.uint8).reshape(rows, cols // Q8_0_BLOCK * Q8_0_BLOCK_BYTES))
    return _quantized(src, dtype, name)


def _quantized(src: Source, dtype: str, name: str) -> np.ndarray:
    """The tensor quantized by the C core into q8_0, q4_0 or q4_1 storage. Values the blocks
    cannot hold are a ValueError naming the tensor and, from the core, the row and columns: a
    non-finite value (a block's scale cannot hold an infinity, and a NaN would silently become
    a zero, q8_0, or spoil its block), and finite values whose block's fp16 scale (q4_1: or
    minimum) would be infinite (q8_0: amax / 127, q4_0: the value of largest magnitude / -8,
    q4_1: (max - min) / 15 and min, rounded to fp16 beyond 65504), which made NaN logits."""
    wide = to_f32(src)
    try:
        return _core.quantize_q4(wide, dtype) if dtype in Q4_BLOCK_BYTES else _core.quantize_q8_0(wide)
    except ValueError as e:
        raise ValueError(f"{name}: {e}: choose another dtype") from None


def cache_line_aligned(arr: np.ndarray, copy: bool = False) -> np.ndarray:
    """arr itself if it starts on a 64-byte boundary (and copy is false), else an aligned copy.
    NumPy aligns to 16 or 32 bytes; full-width AVX-512 loads from such rows straddle cache lines
    and the compute-bound kernels (prefill) lose about a third of their speed."""
    if arr.ctypes.data % 64 == 0 and not copy:
        return arr
    buf = np.empty(arr.nbytes + 64, dtype=np.uint8)
    start = -buf.ctypes.data % 64
    out = buf[start:start + arr.nbytes].view(arr.dtype).reshape(arr.shape)
    out[...] = arr
    return out


_MADV_DONTNEED = 4  # the same value on Linux and macOS


def _file_mapped(arr: np.ndarray) -> bool:
    """Whether arr views a read-only memory-mapped file (np.memmap of a path)."""
    base = arr
    while isinstance(base, np.ndarray):
        if isinstance(base, np.memmap) and getattr(base, "filename", None) and base.mode == "r":
            return True
        base = base.base
    return False


def release_file_pages(arr: np.ndarray) -> None:
    """Drop the whole pages under a memory-mapped source tensor from this process's resident set
    (madvise MADV_DONTNEED) once it has been converted into separate engine storage. A file
    stays mapped while the model borrows any tensor from it (a GGUF's norms stay float32), so
    the pages a conversion read would otherwise stay resident: a file loaded into bf16 or q8_0
    would be held twice. The mapping is read-only and file-backed, so nothing is lost: a later
    read faults the bytes back in from the file. Anything but such a mapping is left alone."""
    if os.name != "posix" or arr.nbytes == 0 or not _file_mapped(arr):
        return
    page = mmap.PAGESIZE
    start = arr.__array_interface__["data"][0]
    first, last = -(-start // page) * page, (start + arr.nbytes) // page * page  # pages wholly inside
    if last <= first:
        return
    madvise = _madvise()
    if madvise is not None:  # without it the pages stay until the file is unmapped
        madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), ctypes.c_int(_MADV_DONTNEED))


@functools.lru_cache(maxsize=1)
def _madvise():
    """libc's madvise, looked up once (a model's load releases every converted tensor), or None."""
    try:
        return ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None


def to_storage(tensors: dict, dtype: str, *, copy_borrowed: bool = False) -> dict:
    """Engine arrays for every tensor: matrices in `dtype`, vectors float32. A tensor that appears
    under two names (a tied output head) is converted once and shared.

    copy_borrowed: the arrays the engine reads in place (everything but the weight matrices it
    copies: vectors, and an untied token embedding, whose rows are only looked up) are copies,
    never views of the sources (from_numpy: the caller's arrays, which it may change later). A
    file's memory map is borrowed instead, read-only."""
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype (={dtype!r}) must be one of {', '.join(STORAGE_DTYPES)}")
    embedding, head = tensors.get("token_embedding"), tensors.get("output")
    tied = embedding is not None and head is not None and embedding.data is head.data
    # a quantized file's float matrices are its choice (matrix_storage)
    quantized_file = any(is_matrix(name) and src.kind not in FLOAT_KINDS for name, src in tensors.items())
    out, done = {}, {}
    for name, src in tensors.items():
        key = (id(src.data), is_matrix(name))
        if key in done:
            out[name] = done[key]
            continue
        arr = matrix_storage(src, dtype, name, quantized_file=quantized_file) if is_matrix(name) else to_f32(src)
        # f32, bf16 and f16 matrices: the engine multiplies its own copies (in panels) and Model
        # releases a file's pages under them, so they need no aligned copy here, wherever the
        # file put them (nor does an untied embedding, whose rows are only looked up); q8_0 and
        # q4 blocks are always repacked, into a new array the engine reads in place
        engine_copies = is_matrix(name) and arr.dtype in (np.float32, np.float16, np.uint16)
        if not arr.flags.aligned:  # a view at an odd byte offset (from_numpy takes any array)
            arr = cache_line_aligned(arr)
        engine_borrows = not is_matrix(name) or (name == "token_embedding" and not tied)
        if copy_borrowed and engine_borrows and np.may_share_memory(arr, src.data):
            arr = cache_line_aligned(arr, copy=True)
        if not np.may_share_memory(arr, src.data):
            if not engine_copies:
                arr = cache_line_aligned(arr)  # ours to place; borrowed arrays stay where they are
            release_file_pages(src.data)  # converted: the source's pages are not needed again
        done[key] = arr
        out[name] = arr
    return out


# ----------------------------------------------------------------------------------------------
# shape checks shared by every format
# ----------------------------------------------------------------------------------------------


def expected_shapes(config: dict) -> dict:
    """Engine tensor name -> shape the config demands (optional tensors included)."""
    D, H, V = config["dim"], config["hidden_dim"], config["vocab_size"]
    Q = config["n_heads"] * config["head_dim"]
    K = config["n_kv_heads"] * config["head_dim"]
    shapes = {"token_embedding": (V, D), "output": (V, D), "final_norm": (D,), "final_norm_bias": (D,),
              "position_embedding": (config["context_length"], D), "rope_freq_factors": (config["head_dim"] // 2,)}
    for i in range(config["n_layers"]):
        p = f"layers.{i}."
        shapes.update({p + "attn_norm": (D,), p + "attn_norm_bias": (D,), p + "wq": (Q, D), p + "wk": (K, D),
                       p + "wv": (K, D), p + "wo": (D, Q), p + "bq": (Q,), p + "bk": (K,), p + "bv": (K,),
                       p + "bo": (D,), p + "ffn_norm": (D,), p + "ffn_norm_bias": (D,), p + "w_gate": (H, D),
                       p + "w_up": (H, D), p + "w_down": (D, H), p + "b_up": (H,), p + "b_down": (D,)})
    return shapes


BIAS_NAMES = ("bq", "bk", "bv", "bo", "b_up", "b_down")


def required_names(config: dict) -> list:
    names = ["token_embedding", "output", "final_norm"]
    gpt2 = config["arch"] == "gpt2"
    if gpt2:
        names += ["final_norm_bias", "position_embedding"]
    for i in range(config["n_layers"]):
        p = f"layers.{i}."
        names += [p + s for s in ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w_up", "w_down")]
        names += [p + s for s in (("attn_norm_bias", "ffn_norm_bias") if gpt2 else ("w_gate",))]
        names += [p + s for s in config.get("required_biases", ())]
    return names


def check_layer_count(path, config: dict, tensors: dict, layers_key: str) -> None:
    """ValueError naming layers_key (the file's field) when the config has more layers than the
    tensors hold. Checked before anything is built per layer: check_config lets a layer count up
    to 2^31 - 1 through, and a corrupt one (a GGUF block_count of 1,000,000) had expected_shapes
    and required_names build tens of millions of names before the first missing tensor was
    reported (26 s and 3.5 GB; 16.7 million layers were killed for lack of memory). Every layer
    has tensors of its own, so the count of distinct layer indices among the tensors (at most the
    number of tensors) bounds it."""
    present = {name.split(".", 2)[1] for name in tensors if name.startswith("layers.")}
    n_layers = config["n_layers"]
    if n_layers > len(present):
        missing = next(i for i in range(len(present) + 1) if str(i) not in present)
        _fail(path, f"{layers_key} (={n_layers}) exceeds the {len(present)} layers the tensors hold "
                    f"(none of layer {missing})")


def check_tensors(path, config: dict, tensors: dict, file_names: dict | None = None, *,
                  layers_key: str = "n_layers", name_of=None) -> None:
    """Raises ValueError naming the file and tensor when a tensor is missing or misshapen, or
    the config has more layers than the tensors (check_layer_count, under layers_key).

    Messages name tensors as the file does: file_names maps the engine names of the tensors
    present to the file's, name_of(engine_name) gives the file's name of one that is missing."""
    file_names = file_names or {}
    check_layer_count(path, config, tensors, layers_key)

    def named(name):
        return file_names.get(name) or (name_of(name) if name_of is not None else name)

    shapes = expected_shapes(config)
    for name in required_names(config):
        if name not in tensors:
            _fail(path, f"tensor {named(name)!r} is missing")
    allowed = config.get("allowed_biases")  # None: any the engine has
    if allowed is not None:
        for name in tensors:
            kind = name.split(".")[2] if name.startswith("layers.") and name.count(".") == 2 else None
            if kind in BIAS_NAMES and kind not in allowed:
                # transformers would drop it (an "unexpected" weight) and the engine would add it:
                # the file and its config describe two different models
                _fail(path, f"tensor {named(name)!r} is a bias the configured architecture does not have"
                            f"{config.get('bias_note', '')}")
    for name, src in tensors.items():
        want = shapes.get(name)
        if want is None:
            layer = name.split(".", 2)[1] if name.startswith("layers.") else None
            if layer is not None and layer.isdigit() and int(layer) >= config["n_layers"]:
                _fail(path, f"tensor {named(name)!r} is of layer {int(layer)}, but {layers_key} "
                            f"(={config['n_layers']}) counts layers 0 to {config['n_layers'] - 1}")
            _fail(path, f"unexpected tensor {named(name)!r}")
        if tuple(src.shape) != want:
            _fail(path, f"tensor {named(name)!r} has shape {tuple(src.shape)} but the config "
                        f"(dim={config['dim']}, hidden_dim={config['hidden_dim']}, n_heads={config['n_heads']}, "
                        f"n_kv_heads={config['n_kv_heads']}, vocab_size={config['vocab_size']}) needs {want}")


FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_config(path, config: dict) -> None:
    for key in ("vocab_size", "dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                "context_length"):
        value = config[key]
        if not isinstance(value, (int, np.integer)) or value < 1 or value > 2**31 - 1:
            _fail(path, f"{key} (={value!r}) must be a positive integer")
    if config["n_heads"] % config["n_kv_heads"]:
        _fail(path, f"n_heads (={config['n_heads']}) is not a multiple of n_kv_heads (={config['n_kv_heads']})")
    if config["arch"] == "llama" and config["head_dim"] % 2:
        _fail(path, f"head_dim (={config['head_dim']}) must be even for rotary embeddings")
    # the engine holds them as float32: an infinity (or a value that rounds to one) would make
    # every norm or rotary angle garbage without an error (the readers name the file's field)
    check_float32(path, "norm_eps", config["norm_eps"], positive=False)
    check_float32(path, "rope_theta", config["rope_theta"], positive=True)


def _warn_outside(path, what: str, ids: list, vocab: int) -> None:
    """Special token ids outside the vocabulary are ignored, with a warning naming the file and
    key, as llama.cpp ignores them ("bad special token ..., using default id"; it falls back to
    its vocabulary type's default id, which lmdecode has not got: the model then has no BOS or
    EOS). A config.json can carry such ids legitimately: GPT2Config's defaults (50256) stay in
    the configs of small models built with it, which transformers runs (never stopping on EOS).
    Kept, they made every generate() call fail or every prompt start with an impossible token."""
    warnings.warn(f"{path}: {what}: token id{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))} "
                  f"outside the vocabulary [0, {vocab}) ignored", stacklevel=4)


def check_float32(path, key: str, value, *, positive: bool) -> float:
    """value as a float, which must be a finite number the engine's float32 holds, > 0 if
    positive (else >= 0); ValueError naming the file and key otherwise."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        _fail(path, f"{key} (={value!r}) must be a number")
    value = float(value)
    bound = "> 0" if positive else ">= 0"
    if not (value > 0 if positive else value >= 0) or not value <= FLOAT32_MAX:
        _fail(path, f"{key} (={value!r}) must be finite and {bound} (at most {FLOAT32_MAX:.6g}, float32's largest)")
    return value


# ----------------------------------------------------------------------------------------------
# llama2.c .bin
# ----------------------------------------------------------------------------------------------

LLAMA2C_HEADER = struct.Struct("<7i")


def read_llama2c(path: Path):
    """The legacy llama2.c export: 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
    vocab_size, seq_len; a negative vocab_size means an untied classifier follows), then float32
    tensors in a fixed order, memory mapped."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] == b"ak42":
        _fail(path, "llama2.c export format version 1/2 ('ak42' magic) is not supported; export with the legacy format")
    if size < LLAMA2C_HEADER.size:
        _fail(path, f"file of {size} bytes is too short for a llama2.c header ({LLAMA2C_HEADER.size} bytes)")
    with open(path, "rb") as f:
        dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = LLAMA2C_HEADER.unpack(f.read(LLAMA2C_HEADER.size))
    tied = vocab > 0
    vocab = abs(vocab)
    for key, value in (("dim", dim), ("hidden_dim", hidden), ("n_layers", n_layers), ("n_heads", n_heads),
                       ("n_kv_heads", n_kv_heads), ("vocab_size", vocab), ("seq_len", seq_len)):
        if value < 1 or value > 1 << 24:
            _fail(path, f"llama2.c header field {key} (={value}) is not plausible; not a llama2.c model?")
    if dim % n_heads or n_heads % n_kv_heads:
        _fail(path, f"llama2.c header: dim (={dim}) / n_heads (={n_heads}) / n_kv_heads (={n_kv_heads}) disagree")
    hs = dim // n_heads
    kv = n_kv_heads * hs
    L = n_layers
    layout = [("token_embedding", (vocab, dim)), ("attn_norm", (L, dim)), ("wq", (L, dim, dim)),
              ("wk", (L, kv, dim)), ("wv", (L, kv, dim)), ("wo", (L, dim, dim)), ("ffn_norm", (L, dim)),
              ("w_gate", (L, hidden, dim)), ("w_down", (L, dim, hidden)), ("w_up", (L, hidden, dim)),
              ("final_norm", (dim,)), ("freq_cis_real", (seq_len, hs // 2)), ("freq_cis_imag", (seq_len, hs // 2))]
    if not tied:
        layout.append(("output", (vocab, dim)))
    n_floats = sum(math.prod(shape) for _, shape in layout)
    want = LLAMA2C_HEADER.size + 4 * n_floats
    if size < want:
        _fail(path, f"truncated: the header describes {want} bytes but the file has {size}")
    if size > want:
        _fail(path, f"{size - want} unexpected bytes after the tensors the header describes ({want} bytes)")
    body = np.memmap(path, dtype=np.float32, mode="r", offset=LLAMA2C_HEADER.size, shape=(n_floats,))
    parts, at = {}, 0
    for name, shape in layout:
        n = math.prod(shape)
        parts[name] = body[at:at + n].reshape(shape)
        at += n
    # the format names no tensors: messages name them as the engine does
    tensors = {"token_embedding": Source("f32", parts["token_embedding"], (vocab, dim),
                                         _origin(path, "token_embedding")),
               "final_norm": Source("f32", parts["final_norm"], (dim,))}
    tensors["output"] = (tensors["token_embedding"] if tied
                         else Source("f32", parts["output"], (vocab, dim), _origin(path, "output")))
    for i in range(L):
        for name in ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w_gate", "w_down", "w_up"):
            arr = parts[name][i]
            tensors[f"layers.{i}.{name}"] = Source("f32", arr, arr.shape, _origin(path, f"layers.{i}.{name}"))
    config = dict(arch="llama", vocab_size=vocab, dim=dim, hidden_dim=hidden, n_layers=L, n_heads=n_heads,
                  n_kv_heads=n_kv_heads, head_dim=hs, context_length=seq_len, norm_eps=1e-5, rope_theta=10000.0,
                  rope_layout="adjacent", tied_embeddings=tied, bos_token_id=1, eos_token_id=2)
    return config, tensors, {}


class Llama2cVocab:
    """A llama2.c tokenizer file (``tok*.bin``): int32 max token length, then per token a float32
    score, an int32 byte length and the bytes: its pieces and scores, read and checked (the
    tokenizer module encodes and decodes with them)."""

    def __init__(self, path, vocab_size: int | None = None):
        path = Path(path)
        self.path = path
        data = path.read_bytes()
        if len(data) < 4:
            _fail(path, "too short for a llama2.c tokenizer")
        (self.max_token_length,) = struct.unpack_from("<i", data, 0)
        at, pieces, scores = 4, [], []
        while at < len(data):
            if at + 8 > len(data):
                _fail(path, f"truncated at byte {at} (token {len(pieces)})")
            score, n = struct.unpack_from("<fi", data, at)
            at += 8
            if n < 0 or at + n > len(data):
                _fail(path, f"token {len(pieces)} claims {n} bytes at offset {at}, beyond the file ({len(data)} bytes)")
            pieces.append(data[at:at + n])
            scores.append(score)
            at += n
        if vocab_size is not None and len(pieces) != vocab_size:
            _fail(path, f"holds {len(pieces)} tokens but the model's vocabulary has {vocab_size}")
        self.pieces = pieces
        self.scores = np.array(scores, dtype=np.float32)

    def __len__(self):
        return len(self.pieces)


def find_llama2c_tokenizer(model_path: Path, vocab_size: int) -> Llama2cVocab | None:
    """The llama2.c tokenizer beside a model, read: tok{vocab_size}.bin, else tokenizer.bin
    (llama2.c's default name, the 32000-token Llama 2 vocabulary), whichever first reads as a
    tokenizer of the model's vocabulary size; None if neither does. A file that does not fit is
    passed over, not an error: nobody asked for it (a tokenizer.bin lying beside stories260K.bin
    made its load fail), and Model.load(tokenizer=...) checks the file it is given."""
    for name in (f"tok{vocab_size}.bin", "tokenizer.bin"):
        candidate = model_path.parent / name
        if candidate.is_file():
            try:
                return Llama2cVocab(candidate, vocab_size)
            except ValueError:
                continue
    return None


# ----------------------------------------------------------------------------------------------
# GGUF
# ----------------------------------------------------------------------------------------------

# GGUF tensor types: the float ones and those the engine stores natively (Q8_0, Q4_0, Q4_1), and
# the other quantized types, which the gguf package dequantizes at load (then stored as `dtype`
# asks, q8_0 by default): the 5-bit, k-quant and 4-bit non-linear types of llama.cpp's usual files
GGUF_KINDS = {"F32": "f32", "F16": "f16", "BF16": "bf16", "Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1",
              **{name: name.lower() for name in ("Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                                                 "IQ4_NL", "IQ4_XS")}}
GGUF_LLAMA_NAMES = {"attn_norm": "attn_norm", "attn_q": "wq", "attn_k": "wk", "attn_v": "wv", "attn_output": "wo",
                    "ffn_norm": "ffn_norm", "ffn_gate": "w_gate", "ffn_up": "w_up", "ffn_down": "w_down"}
GGUF_GPT2_NAMES = {("attn_norm", "weight"): "attn_norm", ("attn_norm", "bias"): "attn_norm_bias",
                   ("attn_output", "weight"): "wo", ("attn_output", "bias"): "bo",
                   ("ffn_norm", "weight"): "ffn_norm", ("ffn_norm", "bias"): "ffn_norm_bias",
                   ("ffn_up", "weight"): "w_up", ("ffn_up", "bias"): "b_up",
                   ("ffn_down", "weight"): "w_down", ("ffn_down", "bias"): "b_down"}


def read_gguf(path: Path):
    """GGUF v2/v3, llama, qwen2 and gpt2 architectures (parsed by :mod:`lmdecode.gguf_file`, the
    tensors memory mapped). qwen2 is the llama family with q/k/v biases and the rotate-half RoPE
    layout: llama.cpp's converter permutes a Llama's q and k rows into adjacent pairs, not a Qwen2's."""
    try:
        gguf = read_gguf_file(path)
    except GGUFError as e:
        _fail(path, str(e))

    def meta(key, default=None, required=False):
        if key not in gguf.metadata:
            if required:
                _fail(path, f"GGUF metadata {key!r} is missing")
            return default
        try:  # a string that is not UTF-8 fails only when its key is read
            return gguf.value(key)
        except GGUFError as e:
            _fail(path, str(e))

    def meta_int(key, default=None, required=False):  # a size or count: a non-negative integer
        value = meta(key, default, required)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            _fail(path, f"GGUF metadata {key!r} (={value!r}) must be a non-negative integer")
        return int(value)

    def meta_float(key, default, positive=False, required=False):  # a float32 hyperparameter: finite, >= 0 (> 0)
        return check_float32(path, f"GGUF metadata {key!r}", meta(key, default, required), positive=positive)

    def special_id(key):  # a special token id: an integer in the vocabulary, or absent
        value = meta(key)
        if value is None:
            return None
        # llama.cpp refuses a special id of another type than UINT32 (the file fails to load):
        # any integer type is taken here, anything else refused (int() read a string of digits,
        # a float became a float token id, a bool token 1); one outside the vocabulary is
        # ignored with a warning, as llama.cpp does (_warn_outside)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            _fail(path, f"GGUF metadata {key!r} (={value!r}) must be an integer token id")
        if not 0 <= value < vocab:
            _warn_outside(path, f"GGUF metadata {key!r}", [value], vocab)
            return None
        return int(value)

    version = meta("GGUF.version")
    if version not in (2, 3):
        _fail(path, f"GGUF version {version} is not supported (2 or 3)")
    arch = meta("general.architecture", required=True)
    if arch not in ("llama", "qwen2", "gpt2"):
        _fail(path, f"architecture {arch!r} is not supported (llama, qwen2, gpt2)")
    family = "gpt2" if arch == "gpt2" else "llama"
    dim = meta_int(f"{arch}.embedding_length", required=True)
    n_layers = meta_int(f"{arch}.block_count", required=True)
    n_heads = meta_int(f"{arch}.attention.head_count", required=True)
    n_kv_heads = meta_int(f"{arch}.attention.head_count_kv", n_heads)
    hidden = meta_int(f"{arch}.feed_forward_length", 4 * dim)
    context = meta_int(f"{arch}.context_length", required=True)
    if meta(f"{arch}.expert_count", 0) not in (0, None):
        _fail(path, f"GGUF metadata '{arch}.expert_count' (={meta(f'{arch}.expert_count')!r}): "
                    "mixture-of-experts models are not supported")
    if family == "llama":
        # required, as llama.cpp requires it (a default would run the file with another epsilon)
        eps = meta_float(f"{arch}.attention.layer_norm_rms_epsilon", None, required=True)
        theta = meta_float(f"{arch}.rope.freq_base", 10000.0, positive=True)
        # llama.cpp: the type defaults to linear, the factor is rope.scaling.factor or the older
        # rope.scale_linear (0 or absent: none), and "none" ignores the factor
        scaling = meta(f"{arch}.rope.scaling.type", "linear")
        if scaling not in ("none", "linear"):
            _fail(path, f"rope scaling {scaling!r} is not supported (linear, or Llama 3's rope_freqs tensor)")
        factor_key = next((k for k in (f"{arch}.rope.scaling.factor", f"{arch}.rope.scale_linear")
                           if meta(k) is not None), None)
        rope_factor = meta_float(factor_key, 0.0) if factor_key is not None else 0.0
        if scaling == "none" or rope_factor in (0.0, 1.0):
            scaling = "none"
    else:
        eps = meta_float("gpt2.attention.layer_norm_epsilon", None, required=True)
        theta = 10000.0
    if n_heads < 1 or dim % n_heads:
        _fail(path, f"embedding_length (={dim}) is not a multiple of head_count (={n_heads})")
    head_dim = meta_int(f"{arch}.attention.key_length", dim // n_heads)
    if family == "llama" and meta_int(f"{arch}.rope.dimension_count", head_dim) != head_dim:
        _fail(path, "partial rotary embeddings (rope.dimension_count < head size) are not supported")

    tensors, file_names, qkv = {}, {}, {}
    for t in gguf.tensors:
        kind = GGUF_KINDS.get(t.type_name)
        if kind is None:
            _fail(path, f"tensor {t.name!r} has type {t.type_name}, not supported ({', '.join(GGUF_KINDS)})")
        shape = tuple(reversed(t.dims))  # ggml lists the fastest dimension first
        src = Source(kind, t.data, shape, _origin(path, t.name))  # bf16: uint16 bits
        parts = t.name.split(".")
        name = None
        if t.name == "token_embd.weight":
            name = "token_embedding"
        elif t.name == "position_embd.weight":
            name = "position_embedding"
        elif t.name == "output.weight":
            name = "output"
        elif t.name == "output_norm.weight":
            name = "final_norm"
        elif t.name == "output_norm.bias":
            name = "final_norm_bias"
        elif len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit():
            layer, base, suffix = int(parts[1]), parts[2], parts[3]
            if family == "llama" and suffix == "weight" and base in GGUF_LLAMA_NAMES:
                name = f"layers.{layer}.{GGUF_LLAMA_NAMES[base]}"
            elif family == "llama" and suffix == "bias" and base in ("attn_q", "attn_k", "attn_v", "attn_output"):
                name = f"layers.{layer}.b{ {'attn_q': 'q', 'attn_k': 'k', 'attn_v': 'v', 'attn_output': 'o'}[base]}"
            elif arch == "gpt2" and base == "attn_qkv":
                qkv[(layer, suffix)] = (t.name, src)
                continue
            elif arch == "gpt2" and (base, suffix) in GGUF_GPT2_NAMES:
                name = f"layers.{layer}.{GGUF_GPT2_NAMES[(base, suffix)]}"
        if t.name == "rope_freqs.weight" and family == "llama":
            name = "rope_freq_factors"  # Llama 3's RoPE scaling: factors dividing the frequencies
        if name is None:
            _fail(path, f"tensor {t.name!r} is not part of a supported {arch} model")
        tensors[name] = src
        file_names[name] = t.name
    if "token_embedding" not in tensors:
        _fail(path, "tensor 'token_embd.weight' is missing")
    vocab = tensors["token_embedding"].shape[0]
    tokens = meta("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens) != vocab:
        _fail(path, f"the vocabulary in the metadata has {len(tokens)} tokens but token_embd.weight has {vocab} rows")
    tied = "output" not in tensors
    if tied:
        tensors["output"] = tensors["token_embedding"]
    for (layer, suffix), (file_name, src) in qkv.items():
        # fused (3D, D) projection / (3D,) bias: q, k and v are consecutive row ranges
        rows = src.shape[0]
        if rows != 3 * dim or (suffix == "weight" and src.shape[1] != dim):
            _fail(path, f"tensor {file_name!r} has shape {src.shape}, expected ({3 * dim}, {dim})")
        names = ("wq", "wk", "wv") if suffix == "weight" else ("bq", "bk", "bv")
        flat = src.data.reshape(rows, -1)  # a quantized tensor's rows of blocks stay bytes
        for j, short in enumerate(names):
            piece = flat[j * dim:(j + 1) * dim]
            shape = (dim, dim) if suffix == "weight" else (dim,)
            if src.kind in ("f32", "f16", "bf16"):
                piece = piece.reshape(shape)
            tensors[f"layers.{layer}.{short}"] = Source(src.kind, piece, shape, src.origin)
            file_names[f"layers.{layer}.{short}"] = file_name
    if family == "llama" and scaling == "linear":
        if "rope_freq_factors" in tensors:
            _fail(path, "linear rope scaling and a rope_freqs tensor together are not supported")
        if not (rope_factor > 0 and math.isfinite(rope_factor)):
            _fail(path, f"GGUF metadata {factor_key!r} (={rope_factor}) must be a positive number")
        factors = np.full(head_dim // 2, rope_factor, dtype=np.float32)
        tensors["rope_freq_factors"] = Source("f32", factors, factors.shape)
    config = dict(arch=family, vocab_size=vocab, dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads,
                  n_kv_heads=n_kv_heads, head_dim=head_dim, context_length=context, norm_eps=eps, rope_theta=theta,
                  rope_layout="half" if arch == "qwen2" else "adjacent", tied_embeddings=tied,
                  bos_token_id=special_id("tokenizer.ggml.bos_token_id"),
                  eos_token_id=special_id("tokenizer.ggml.eos_token_id"),
                  required_biases=("bq", "bk", "bv") if arch == "qwen2" else (),
                  # llama.cpp's llama has optional attention biases; qwen2 no output bias; gpt2 all
                  allowed_biases=BIAS_NAMES if arch == "gpt2" else ("bq", "bk", "bv") if arch == "qwen2"
                  else ("bq", "bk", "bv", "bo"))
    check_config(path, config)
    check_tensors(path, config, tensors, file_names, layers_key=f"GGUF metadata '{arch}.block_count'",
                  name_of=lambda name: _gguf_name(name, arch))
    # the tokenizer's metadata, which a model keeps for its tokenizer (built on first use)
    try:
        tokenizer_metadata = gguf.tokenizer_metadata()
    except GGUFError as e:
        _fail(path, str(e))
    for key, engine_key in (("tokenizer.ggml.bos_token_id", "bos_token_id"), ("tokenizer.ggml.eos_token_id", "eos_token_id")):
        if config[engine_key] is None:  # an id ignored above: the tokenizer must not use it either
            tokenizer_metadata.pop(key, None)
    return config, tensors, {"vocab": list(tokens) if tokens is not None else None,
                             "tokenizer_metadata": tokenizer_metadata}


GGUF_TOP_NAMES = {"token_embedding": "token_embd.weight", "position_embedding": "position_embd.weight",
                  "output": "output.weight", "final_norm": "output_norm.weight", "final_norm_bias": "output_norm.bias",
                  "rope_freq_factors": "rope_freqs.weight"}


def _gguf_name(engine_name: str, arch: str) -> str:
    """The GGUF tensor name of an engine tensor (llama.cpp's, for messages about missing ones):
    'layers.5.attn_norm' -> 'blk.5.attn_norm.weight'."""
    if engine_name in GGUF_TOP_NAMES:
        return GGUF_TOP_NAMES[engine_name]
    _, idx, short = engine_name.split(".", 2)
    if arch == "gpt2":
        if short in ("wq", "wk", "wv", "bq", "bk", "bv"):  # one fused tensor holds q, k and v
            return f"blk.{idx}.attn_qkv.{'weight' if short.startswith('w') else 'bias'}"
        base, suffix = {v: k for k, v in GGUF_GPT2_NAMES.items()}[short]
        return f"blk.{idx}.{base}.{suffix}"
    biases = {"bq": "attn_q", "bk": "attn_k", "bv": "attn_v", "bo": "attn_output"}
    if short in biases:
        return f"blk.{idx}.{biases[short]}.bias"
    return f"blk.{idx}.{ {v: k for k, v in GGUF_LLAMA_NAMES.items()}[short]}.weight"


# ----------------------------------------------------------------------------------------------
# Hugging Face checkpoints
# ----------------------------------------------------------------------------------------------

SAFETENSORS_KINDS = {"F32": ("f32", np.float32), "F16": ("f16", np.float16), "BF16": ("bf16", np.uint16)}
HF_LLAMA_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
HF_ARCHS = HF_LLAMA_ARCHS + ("GPT2LMHeadModel",)


def read_safetensors(path: Path) -> dict:
    """name -> Source, memory mapped. The format is an 8-byte little-endian header length, a JSON
    header of {name: {dtype, shape, data_offsets}} and the data. Every entry is checked before
    use (ValueError naming the file and tensor): a dtype string, a shape of non-negative
    integers, and integer offsets [begin, end) inside the data section holding exactly the bytes
    of that shape, no two tensors overlapping (JSON lets a corrupt header say anything: strings,
    floats, lists where numbers go, negative or fractional sizes)."""
    size = path.stat().st_size
    if size < 8:
        _fail(path, f"file of {size} bytes is too short for a safetensors header")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8 or header_len > 100 << 20:
            _fail(path, f"safetensors header length {header_len} exceeds the file ({size} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            _fail(path, f"safetensors header is not valid JSON ({e})")
    if not isinstance(header, dict):
        _fail(path, "safetensors header is not a JSON object")
    data_start = 8 + header_len
    data_size = size - data_start
    out, ranges = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            _fail(path, f"tensor {name!r}: malformed header entry {info!r:.200} (an object of dtype, shape and "
                        f"data_offsets)")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str):
            _fail(path, f"tensor {name!r}: dtype (={dtype!r:.80}) must be a string")
        if dtype not in SAFETENSORS_KINDS:
            _fail(path, f"tensor {name!r} has dtype {dtype}; supported: {', '.join(SAFETENSORS_KINDS)}")
        if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
            _fail(path, f"tensor {name!r}: shape (={shape!r:.80}) must be a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(n) is int and n >= 0 for n in offsets)):
            _fail(path, f"tensor {name!r}: data_offsets (={offsets!r:.80}) must be two non-negative integers")
        kind, np_dtype = SAFETENSORS_KINDS[dtype]
        shape, (begin, end) = tuple(shape), offsets
        n_bytes = math.prod(shape) * np.dtype(np_dtype).itemsize
        if not (begin <= end and end - begin == n_bytes):
            _fail(path, f"tensor {name!r}: data offsets [{begin}, {end}) do not hold shape {shape} of {dtype}")
        if end > data_size:
            _fail(path, f"truncated: tensor {name!r} ends at byte {data_start + end} but the file has {size}")
        ranges.append((begin, end, name))
        if n_bytes == 0:
            arr = np.zeros(shape, dtype=np_dtype)
        else:
            arr = np.memmap(path, dtype=np_dtype, mode="r", offset=data_start + begin, shape=shape)
        if (data_start + begin) % np.dtype(np_dtype).itemsize:
            arr = np.array(arr)  # misaligned for its type: one aligned copy
        out[name] = Source(kind, arr, shape, _origin(path, name))
    ranges.sort()
    for (_, end, first), (begin, _, second) in zip(ranges, ranges[1:]):
        if begin < end:  # two tensors reading one byte: a corrupt header, never a valid file
            _fail(path, f"tensors {first!r} and {second!r} overlap in the data section (bytes {begin} to {end})")
    return out


def hf_config(path, cfg: dict) -> dict:
    """Engine hyperparameters from a Hugging Face config.json dict (raises on what is not supported)."""

    def need(key):  # a required size: a positive integer
        if key not in cfg:
            _fail(path, f"config has no {key!r}")
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            _fail(path, f"config {key!r} (={value!r}) must be a positive integer")
        return int(value)

    def optional(key, default):  # a size that may be left out (or null): a positive integer
        return need(key) if cfg.get(key) is not None else default

    def real(key, value):  # a float hyperparameter, named when it is not a number
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            _fail(path, f"config {key!r} (={value!r}) must be a number")
        return float(value)

    def flag(key, default):  # a boolean, which JSON spells true/false
        value = cfg.get(key, default)
        if not isinstance(value, bool):
            _fail(path, f"config {key!r} (={value!r}) must be true or false")
        return value

    def hyper(key, value, positive=False):  # a float32 hyperparameter: finite, >= 0 (> 0)
        return check_float32(path, f"config {key!r}", value, positive=positive)

    def token_id(key, vocab, several=False):
        """A special token id in [0, vocab), or null; several: a list of them too (Llama 3's
        eos_token_id), as ModelConfig keeps it: one id an int, several a tuple, none None."""
        value = cfg.get(key)
        ids = value if several and isinstance(value, list) else [value]
        if value is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            _fail(path, f"config {key!r} (={value!r}) must be a token id{', a list of them' if several else ''} or null")
        ids = list(dict.fromkeys(ids)) if value is not None else []
        outside = [i for i in ids if i >= vocab]
        if outside:  # ignored with a warning, as llama.cpp ignores them (_warn_outside says why)
            _warn_outside(path, f"config {key!r} (={value!r})", outside, vocab)
            ids = [i for i in ids if i < vocab]
        return None if not ids else ids[0] if len(ids) == 1 else tuple(ids)

    def special_ids(vocab):
        return dict(bos_token_id=token_id("bos_token_id", vocab), eos_token_id=token_id("eos_token_id", vocab, True))

    archs = cfg.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        _fail(path, f"config 'architectures' (={archs!r}) must be a list of class names")
    model_type = cfg.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        _fail(path, f"config 'model_type' (={model_type!r}) must be a string")
    class_of_type = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                     "gpt2": "GPT2LMHeadModel"}
    arch = archs[0] if archs else class_of_type.get(model_type)
    if arch not in HF_ARCHS:
        _fail(path, f"architecture {arch or model_type!r} is not supported ({', '.join(HF_ARCHS)})")
    if model_type is not None and class_of_type.get(model_type) != arch:
        # transformers' Auto classes build the model model_type names, whatever architectures says
        _fail(path, f"config 'model_type' (={model_type!r}) is not {arch}'s "
                    f"({next(t for t, c in class_of_type.items() if c == arch)!r}): the config describes two models")
    if arch == "GPT2LMHeadModel":
        dim, n_heads = need("n_embd"), need("n_head")
        act = cfg.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            _fail(path, f"activation_function {act!r} is not supported (gelu_new)")
        if flag("scale_attn_by_inverse_layer_idx", False):
            _fail(path, "scale_attn_by_inverse_layer_idx is not supported")
        if not flag("scale_attn_weights", True):
            _fail(path, "scale_attn_weights=False is not supported")
        vocab = need("vocab_size")
        return dict(arch="gpt2", vocab_size=vocab, dim=dim, hidden_dim=optional("n_inner", 4 * dim),
                    n_layers=need("n_layer"), n_heads=n_heads, n_kv_heads=n_heads, head_dim=dim // n_heads,
                    context_length=need("n_positions"),
                    norm_eps=hyper("layer_norm_epsilon", cfg.get("layer_norm_epsilon", 1e-5)),
                    rope_theta=10000.0, rope_layout="half",
                    # transformers' default for GPT2Config (PretrainedConfig's): tied
                    tied_embeddings=flag("tie_word_embeddings", True), **special_ids(vocab),
                    required_biases=("bq", "bk", "bv", "bo", "b_up", "b_down"))
    dim, n_heads = need("hidden_size"), need("num_attention_heads")
    # transformers: rope_parameters = rope_scaling or rope_parameters (the older key wins)
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        _fail(path, f"config rope parameters (={rope!r}) must be an object")
    theta = hyper("rope_theta", rope.get("rope_theta", cfg.get("rope_theta", 10000.0)), positive=True)
    head_dim = optional("head_dim", dim // n_heads)
    context = optional("max_position_embeddings", 2048)
    # transformers: a top-level original_max_position_embeddings overrides the rope dict's for
    # llama3, yarn and longrope, and max_position_embeddings stands in for a missing one
    old_context = cfg.get("original_max_position_embeddings", rope.get("original_max_position_embeddings", context))
    factors = hf_rope_freq_factors(path, {**rope, "original_max_position_embeddings": old_context}, head_dim, theta)
    if real("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        _fail(path, "partial rotary embeddings are not supported")
    if flag("mlp_bias", False):
        _fail(path, "mlp_bias=True is not supported")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        _fail(path, f"hidden_act {act!r} is not supported (silu)")
    # MistralConfig and Qwen2Config default the window to 4096 (Qwen2 uses it only with
    # use_sliding_window); an explicit null means none
    window = optional("sliding_window", None) if "sliding_window" in cfg else 4096
    if window and (arch == "MistralForCausalLM" or flag("use_sliding_window", False)):
        context = min(context, window)  # within the window sliding-window attention is full attention
    vocab = need("vocab_size")
    biases = (("bq", "bk", "bv") if arch == "Qwen2ForCausalLM" else ("bq", "bk", "bv", "bo")
              if arch == "LlamaForCausalLM" and flag("attention_bias", False) else ())
    return dict(arch="llama", vocab_size=vocab, dim=dim, hidden_dim=need("intermediate_size"),
                n_layers=need("num_hidden_layers"), n_heads=n_heads,
                n_kv_heads=optional("num_key_value_heads", n_heads),
                head_dim=head_dim,
                context_length=context,
                norm_eps=hyper("rms_norm_eps", cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta,
                rope_layout="half", rope_freq_factors=factors,
                # transformers' default for LlamaConfig, MistralConfig and Qwen2Config: untied
                tied_embeddings=flag("tie_word_embeddings", False), **special_ids(vocab),
                # the biases the architecture has, which a checkpoint must neither leave out nor add
                required_biases=biases, allowed_biases=biases,
                bias_note=f" ({arch}" + ("" if arch != "LlamaForCausalLM" else
                                          f", attention_bias={str(flag('attention_bias', False)).lower()}") + ")")


def hf_rope_freq_factors(path, rope: dict, head_dim: int, theta: float) -> np.ndarray | None:
    """The (head_dim / 2,) factors that divide the rotary frequencies base^(-2i/head_dim) for the
    RoPE scalings of Hugging Face configs the engine runs (None for plain RoPE):
    - "linear": every frequency divided by `factor` (positions interpolated);
    - "llama3" (Llama 3.1 and later): frequencies whose wavelength 2 pi / f exceeds
      original_max_position_embeddings / low_freq_factor divided by `factor`, those under
      original_max_position_embeddings / high_freq_factor kept, and between them
      f / ((1 - s) / factor + s) with s = (original_max_position_embeddings / wavelength -
      low_freq_factor) / (high_freq_factor - low_freq_factor), as transformers computes them
      (and as llama.cpp writes them into a GGUF's rope_freqs tensor).
    Other types (dynamic, yarn, longrope...) change the attention too and are refused."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in ("default", None):
        return None
    if rope_type not in ("linear", "llama3"):
        _fail(path, f"rope scaling type {rope_type!r} is not supported (linear, llama3)")

    def positive(key):
        value = rope.get(key)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0 or not math.isfinite(value):
            _fail(path, f"rope scaling {rope_type!r}: {key} (={value!r}) must be a positive number")
        return float(value)

    factor = positive("factor")
    if rope_type == "linear":
        return np.full(head_dim // 2, factor, dtype=np.float32)
    low, high = positive("low_freq_factor"), positive("high_freq_factor")
    old_context = positive("original_max_position_embeddings")
    if not high > low:
        _fail(path, f"rope scaling 'llama3': high_freq_factor (={high}) must exceed low_freq_factor (={low})")
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelength = 2 * math.pi / inv_freq
    smooth = (old_context / wavelength - low) / (high - low)
    factors = np.where(wavelength > old_context / low, factor,
                       np.where(wavelength < old_context / high, 1.0, 1.0 / ((1 - smooth) / factor + smooth)))
    return factors.astype(np.float32)


HF_LLAMA_LAYER = {"input_layernorm.weight": "attn_norm", "self_attn.q_proj.weight": "wq",
                  "self_attn.k_proj.weight": "wk", "self_attn.v_proj.weight": "wv", "self_attn.o_proj.weight": "wo",
                  "self_attn.q_proj.bias": "bq", "self_attn.k_proj.bias": "bk", "self_attn.v_proj.bias": "bv",
                  "self_attn.o_proj.bias": "bo", "post_attention_layernorm.weight": "ffn_norm",
                  "mlp.gate_proj.weight": "w_gate", "mlp.up_proj.weight": "w_up", "mlp.down_proj.weight": "w_down"}
HF_GPT2_LAYER = {"ln_1.weight": "attn_norm", "ln_1.bias": "attn_norm_bias", "attn.c_proj.weight": "wo",
                 "attn.c_proj.bias": "bo", "ln_2.weight": "ffn_norm", "ln_2.bias": "ffn_norm_bias",
                 "mlp.c_fc.weight": "w_up", "mlp.c_fc.bias": "b_up", "mlp.c_proj.weight": "w_down",
                 "mlp.c_proj.bias": "b_down"}
HF_GPT2_TRANSPOSED = ("wo", "w_up", "w_down")  # Conv1D stores (in, out)


def _transpose(src: Source) -> Source:
    """(in, out) Conv1D weight -> (out, in); one copy, the mapped original is not kept."""
    data = np.ascontiguousarray(src.data.T)
    return Source(src.kind, data, data.shape, src.origin)


def map_hf_tensors(path, config: dict, named: dict) -> tuple:
    """HF parameter names -> engine tensors (dict of Source) and the reverse name map for messages."""
    tensors, file_names = {}, {}
    gpt2 = config["arch"] == "gpt2"
    for hf_name, src in named.items():
        name = hf_name
        for prefix in ("model.", "transformer."):
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        engine = None
        if name in ("embed_tokens.weight", "wte.weight"):
            engine = "token_embedding"
        elif name == "wpe.weight":
            engine = "position_embedding"
        elif name in ("norm.weight", "ln_f.weight"):
            engine = "final_norm"
        elif name == "ln_f.bias":
            engine = "final_norm_bias"
        elif name == "lm_head.weight":
            engine = "output"
        elif name.startswith(("layers.", "h.")):
            _, idx, rest = name.split(".", 2)
            if not idx.isdigit():
                _fail(path, f"tensor {hf_name!r}: unexpected layer index")
            if gpt2 and rest in ("attn.c_attn.weight", "attn.c_attn.bias"):
                D = config["dim"]
                if rest.endswith("weight"):
                    if src.shape != (D, 3 * D):
                        _fail(path, f"tensor {hf_name!r} has shape {src.shape} but the config needs {(D, 3 * D)}")
                    full = _transpose(src)
                    for j, short in enumerate(("wq", "wk", "wv")):
                        tensors[f"layers.{idx}.{short}"] = Source(src.kind, full.data[j * D:(j + 1) * D], (D, D),
                                                                  src.origin)
                        file_names[f"layers.{idx}.{short}"] = hf_name
                else:
                    if src.shape != (3 * D,):
                        _fail(path, f"tensor {hf_name!r} has shape {src.shape} but the config needs {(3 * D,)}")
                    for j, short in enumerate(("bq", "bk", "bv")):
                        tensors[f"layers.{idx}.{short}"] = Source(src.kind, src.data[j * D:(j + 1) * D], (D,),
                                                                  src.origin)
                        file_names[f"layers.{idx}.{short}"] = hf_name
                continue
            if rest in ("attn.bias", "attn.masked_bias", "self_attn.rotary_emb.inv_freq"):
                continue  # buffers, not parameters
            short = (HF_GPT2_LAYER if gpt2 else HF_LLAMA_LAYER).get(rest)
            if short is not None:
                engine = f"layers.{idx}.{short}"
                if gpt2 and short in HF_GPT2_TRANSPOSED:
                    src = _transpose(src)
        if engine is None:
            _fail(path, f"tensor {hf_name!r} is not part of a supported {config['arch']} model")
        tensors[engine] = src
        file_names[engine] = hf_name
    embedding, head = tensors.get("token_embedding"), tensors.get("output")
    if head is None and embedding is not None:
        # without lm_head.weight the head is the embedding only when the config ties them, as
        # transformers reads it (it reports the head MISSING and leaves it random otherwise)
        if not config["tied_embeddings"]:
            _fail(path, "tensor 'lm_head.weight' is missing and the config does not tie the head to the embedding "
                        "(tie_word_embeddings is false, or left out: false for Llama, Mistral and Qwen2)")
        tensors["output"] = embedding
    elif head is not None and embedding is not None:
        # a checkpoint's own lm_head.weight is the head whatever tie_word_embeddings says:
        # transformers (5.x) ties them only when the values agree, and keeps the file's head
        # (warning) when they differ. One array serves both (converted and stored once) when it
        # is the embedding's very memory (a tied model's state_dict() lists the one tensor under
        # both names), or its copy in a config that ties them
        same = head.kind == embedding.kind and head.shape == embedding.shape and (
            _same_array(head.data, embedding.data)
            or (config["tied_embeddings"] and np.array_equal(head.data, embedding.data)))
        if same:
            tensors["output"] = embedding
        config["tied_embeddings"] = same  # the head the engine multiplies by is the embedding
    factors = config.get("rope_freq_factors")
    if factors is not None:  # from the config's rope scaling, not a parameter
        tensors["rope_freq_factors"] = Source("f32", factors, factors.shape)
        file_names["rope_freq_factors"] = "rope scaling (config)"
    # a missing tensor is reported by its Hugging Face name
    check_tensors(path, config, tensors, file_names, layers_key=f"config {'n_layer' if gpt2 else 'num_hidden_layers'!r}",
                  name_of=lambda name: _hf_name(name, gpt2))
    return tensors, file_names


def _same_array(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether a and b view the very same memory as the same array (not merely overlapping)."""
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0] and a.shape == b.shape
            and a.strides == b.strides and a.dtype == b.dtype)


def _hf_name(engine_name: str, gpt2: bool) -> str:
    """The Hugging Face parameter name of an engine tensor (GPT2LMHeadModel's or Llama's)."""
    top = ({"token_embedding": "transformer.wte.weight", "position_embedding": "transformer.wpe.weight",
            "final_norm": "transformer.ln_f.weight", "final_norm_bias": "transformer.ln_f.bias",
            "output": "lm_head.weight"} if gpt2 else
           {"token_embedding": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
            "output": "lm_head.weight"})
    if engine_name in top:
        return top[engine_name]
    _, idx, short = engine_name.split(".", 2)
    if gpt2 and short in ("wq", "wk", "wv"):
        return f"transformer.h.{idx}.attn.c_attn.weight"
    if gpt2 and short in ("bq", "bk", "bv"):
        return f"transformer.h.{idx}.attn.c_attn.bias"
    layer = {v: k for k, v in (HF_GPT2_LAYER if gpt2 else HF_LLAMA_LAYER).items()}
    return f"transformer.h.{idx}.{layer[short]}" if gpt2 else f"model.layers.{idx}.{layer[short]}"


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object; ValueError naming the file otherwise."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        _fail(path, f"not valid JSON ({e})")
    if not isinstance(value, dict):
        _fail(path, f"expected a JSON object, not {type(value).__name__}")
    return value


def read_hf_dir(path: Path):
    config_path = path / "config.json"
    if not config_path.is_file():
        _fail(path, "a Hugging Face checkpoint directory needs config.json")
    config = hf_config(config_path, read_json_object(config_path))
    check_config(config_path, config)
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    named = {}
    if single.is_file():
        named = read_safetensors(single)
        where = single
    elif index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in weight_map.items()):
            _fail(index, "weight_map must map tensor names to shard file names")
        shards = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = path / shard
            if os.path.dirname(shard) or shard in ("", ".", ".."):
                _fail(index, f"shard {shard!r} is not a file name in the checkpoint directory")
            if not shard_path.is_file():
                _fail(index, f"shard {shard!r} is missing")
            shards[shard] = read_safetensors(shard_path)
        for name, shard in weight_map.items():
            if name not in shards[shard]:
                _fail(path / shard, f"tensor {name!r} listed in the index is missing")
            named[name] = shards[shard][name]
        where = path
    else:
        _fail(path, "no model.safetensors or model.safetensors.index.json (only safetensors checkpoints are read)")
    tensors, _ = map_hf_tensors(where, config, named)
    return config, tensors, {}


def from_hf_numpy(config_dict: Any, weights: dict):
    """Engine config and sources from HF config keys (a dict, or a transformers config object)
    and parameter arrays (borrowed when float32, float16 or bf16)."""
    if hasattr(config_dict, "to_dict"):  # a transformers PretrainedConfig
        config_dict = config_dict.to_dict()
    if not isinstance(config_dict, Mapping):
        raise TypeError(f"config must be a dict of config.json keys or a transformers config, "
                        f"got {type(config_dict).__name__}")
    config = hf_config("from_numpy config", dict(config_dict))
    check_config("from_numpy config", config)
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights must be a dict of Hugging Face parameter names to arrays (a state_dict), "
                        f"got {type(weights).__name__}")
    named = {}
    for name, value in weights.items():
        kind, arr = _numpy_weight(name, value)
        named[name] = Source(kind, arr, arr.shape, _origin("from_numpy weights", name))
    tensors, _ = map_hf_tensors("from_numpy weights", config, named)
    return config, tensors


def _numpy_weight(name: str, value: Any) -> tuple[str, np.ndarray]:
    """(Source kind, array) of one from_numpy weight: a NumPy array or a torch tensor (a
    state_dict's, detached). float32 and float16 are used as they are; bfloat16 (torch's, or
    ml_dtypes' in NumPy) as its bits; float64 is rounded to float32, a copy."""
    if type(value).__module__.split(".")[0] == "torch":
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # NumPy has no bfloat16: its bits, borrowed
            import torch

            return "bf16", value.contiguous().view(torch.int16).numpy().view(np.uint16)
    arr = as_numpy(value, f"weights[{name!r}]")
    if arr.dtype == np.float32:
        return "f32", arr
    if arr.dtype == np.float16:
        return "f16", arr
    if arr.dtype.name == "bfloat16" and arr.dtype.itemsize == 2:  # ml_dtypes (JAX)
        return "bf16", arr.view(np.uint16)
    if arr.dtype == np.float64:
        return "f32", arr.astype(np.float32)
    raise TypeError(f"weights[{name!r}] has dtype {arr.dtype}; expected float32, float16, bfloat16 or float64")
