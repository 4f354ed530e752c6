"""Transformer models on the C engine: loading, logits, and a paged KV cache.

Loading::

    model = lmdecode.Model.load("stories260K.bin")              # llama2.c (tok*.bin found beside it)
    model = lmdecode.Model.load("model.gguf", dtype="q8_0")     # GGUF v2/v3, llama or gpt2
    model = lmdecode.Model.load("hf_checkpoint_dir/")           # config.json + safetensors
    model = lmdecode.Model.from_numpy(hf_config_dict, {hf_name: array})

``dtype`` picks the engine's weight storage: ``"f32"``, ``"bf16"``, ``"f16"``, ``"q8_0"``,
``"q4_0"`` or ``"q4_1"`` (llama.cpp's Q8_0, Q4_0 and Q4_1 blocks, interleaved by 16 rows; inputs
are quantized to blocks of 32 int8 as llama.cpp does and multiplied in integers; float weights
are quantized as llama.cpp's reference quantizer does; they must be finite and each block's
fp16 scale (and q4_1 minimum) must not overflow, else a ValueError naming the tensor). By
default f32 files stay f32, bf16 stays bf16, f16 stays f16 when every matrix is f16 (widened
exactly as read: the logits of f32 storage, half the bytes; mixed with f32 matrices it widens to
f32), a GGUF file whose 4-bit matrices are all Q4_0 (or all Q4_1) keeps them (its Q8_0 ones stay
Q8_0 and its F16/BF16/F32 ones keep their type, in q4 storage always), and other quantized GGUF
files become q8_0. The quantized types need a
multiple of 32 input features; a matrix without one (e.g. stories260K's 172-wide feed-forward)
stays f32. Norm weights, biases and
GPT-2's position table are always f32. q8_0 weights whose storage equals the file's are memory
mapped and never copied (Q8_0 blocks are repacked once); the Model keeps the mapping alive. f32,
bf16 and f16 matrices are copied once, into the engine's panels (16 rows side by side, one vector
per column; bf16 in column pairs), and the file's pages under them released: the weights are still
held once.

``kv_dtype`` picks how the KV cache stores keys and values: ``"f32"`` (the default, exact) or
``"f16"`` (IEEE half precision, llama.cpp's default cache type): half the memory and half the
bytes a long-context decode step reads, each key and value rounded to 11 significant bits
(``new_cache(kv_dtype=...)`` overrides it per cache).

Whole sequences::

    logits = model.logits([1, 403, 407, 261, 378])   # (5, vocab) float32, one prefill pass

Incremental decoding with a cache::

    cache = model.new_cache()                        # room for context_length positions
    last = model.forward([1, 403, 407], cache)       # (vocab,): logits of the last token
    last = model.forward([261], cache)               # appends one position
    rows = model.forward(draft, cache, logits="all") # (len(draft), vocab): verify k draft tokens
    cache.truncate(4)                                # rollback to the first 4 positions
    beam = cache.fork()                              # shares the 4 positions, no copy

Several sequences in one pass (each weight matrix read once for all of them)::

    cache_a, cache_b = model.new_caches(2)                         # one pool, room for both
    outs = model.forward_batch([[17], [42]], [cache_a, cache_b])   # list of (vocab,) arrays

Caches forked from one another share a pool of ``ceil(capacity / block_size)`` blocks of
``block_size`` positions (``capacity`` defaults to the context length). A cache holds a block for
every ``block_size`` positions it has begun, and a fork the same blocks as its parent, each counted
once. But only a cache that holds a block alone writes into it: writing into a block that other
caches also hold (one that a fork or a truncate left partly filled) first takes a free block and
copies the filled positions into it (copy-on-write). So n caches that go on from one position
inside a block take n - 1 blocks more than the positions they add fill: with ``capacity=32`` (two
blocks of 16), a cache of 17 positions and a fork of it fill the pool, and neither can add a
position until the other is truncated to 16 positions or fewer, or dropped. A forward call that
would exceed a sequence's context length or the pool raises ValueError and leaves every cache as
it was.

Thread safety: a Model and the caches of one pool may be used from several Python threads; a lock
per model and per pool serialises their calls (the GIL is released while the engine runs).
``lmdecode.set_num_threads`` sets the engine's threads; results do not depend on it.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, asdict
from pathlib import Path
from typing import Any

import numpy as np

from . import _core
from . import loaders
from .decoding import DecodingMixin
from .sampling import as_numpy

__all__ = ["Model", "ModelConfig", "KVCache"]

_SHORT = 64  # token lists up to this long are checked element by element in Python (Model._tokens)
MAX_POOL_BLOCKS = 2**31 - 1  # the engine counts a KV pool's blocks in int32 (kvcache.h)


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a loaded model."""

    arch: str                 # "llama" (also Mistral, Qwen2) or "gpt2"
    vocab_size: int
    dim: int                  # residual width
    hidden_dim: int           # feed-forward width
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    context_length: int
    norm_eps: float
    rope_theta: float
    rope_layout: str          # "adjacent" (llama2.c, GGUF) or "half" (Hugging Face)
    tied_embeddings: bool
    bos_token_id: int | None = None
    # one id, or a tuple of several when a checkpoint's config lists them (Llama 3's
    # [128001, 128008, 128009]): generate() and beam_search() stop at every one; None: no EOS
    eos_token_id: int | tuple[int, ...] | None = None
    dtype: str = "f32"        # the engine's weight storage

    def as_dict(self) -> dict:
        return asdict(self)


class KVCache:
    """One sequence's cached keys and values (a table of blocks in a shared pool).

    ``len(cache)`` is the number of cached positions; :meth:`truncate` rolls back;
    :meth:`fork` returns a cache sharing this one's positions (copy-on-write per block)."""

    __slots__ = ("_seq", "_model")

    def __init__(self, seq, model):
        self._seq = seq
        self._model = model

    def __len__(self) -> int:
        return self._seq.len

    @property
    def max_len(self) -> int:
        return self._seq.max_len

    @property
    def free_blocks(self) -> int:
        """Blocks of the shared pool that no cache holds."""
        return self._seq.pool.free_blocks

    @property
    def block_size(self) -> int:
        return self._seq.pool.block_size

    @property
    def kv_dtype(self) -> str:
        """How the pool stores keys and values: "f32" or "f16"."""
        return self._seq.pool.kv_dtype

    def truncate(self, length: int) -> None:
        """Keep positions [0, length)."""
        self._seq.truncate(_as_int("length", length))

    def fork(self) -> "KVCache":
        return KVCache(self._seq.fork(), self._model)

    def __repr__(self) -> str:
        return f"KVCache(len={len(self)}, max_len={self.max_len}, kv_dtype={self.kv_dtype!r})"


KV_DTYPES = ("f32", "f16")

# Tokens per engine pass when max_batch is not given: 256, or more (up to the context length and
# 1024) while the run state of a pass (activations of every token, float32) stays within
# RUN_STATE_BUDGET bytes. stories260K (2.9 kB a token) takes 512, so that scoring its 511-token
# windows is one pass, not two (on two threads each pass's ~60 parallel regions and its Python
# calls weigh: -5 to -7%); the 110M Llama (37 kB a token) keeps 256.
DEFAULT_MAX_BATCH = 256
RUN_STATE_BUDGET = 4 << 20


def default_max_batch(config: dict) -> int:
    """max_batch for an engine config (dim, hidden_dim, n_heads, n_kv_heads, head_dim,
    context_length): see RUN_STATE_BUDGET."""
    hs = config["head_dim"]
    per_token = 4 * (3 * config["dim"] + 2 * (config["n_heads"] + config["n_kv_heads"]) * hs
                     + 2 * config["hidden_dim"] + hs)
    return max(DEFAULT_MAX_BATCH, min(config["context_length"], 1024, RUN_STATE_BUDGET // per_token))


def _check_kv_dtype(kv_dtype) -> str:
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype (={kv_dtype!r}) must be one of {', '.join(KV_DTYPES)}")
    return kv_dtype


def _as_int(name, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    return int(value)


def _check_listed_ids(name, tokens, vocab_size: int) -> None:
    """For a list or tuple of token ids that NumPy made an object or float64 array: if it holds
    ints alone (Python's or NumPy's, no bool), ValueError naming the first outside the vocabulary
    (an int beyond 64 bits is); otherwise nothing, the caller's TypeError follows."""
    if all(isinstance(t, (int, np.integer)) and not isinstance(t, (bool, np.bool_)) for t in tokens):
        for i, t in enumerate(tokens):
            if not 0 <= t < vocab_size:
                raise ValueError(f"{name}[{i}] (={t}) is outside the vocabulary [0, {vocab_size})")


class Model(DecodingMixin):
    """A decoder-only transformer on the C engine. Build with :meth:`load` or :meth:`from_numpy`.

    Decoding methods (generate, beam_search, sequence_logprob, perplexity, tokenizer) come from
    :class:`lmdecode.decoding.DecodingMixin`."""

    def __init__(self, config: dict, tensors: dict, *, dtype: str | None = None, max_batch: int | None = None,
                 kv_dtype: str = "f32", path=None, tokenizer_path=None, vocab=None, gguf_metadata=None,
                 copy_borrowed: bool = False):
        self.kv_dtype = _check_kv_dtype(kv_dtype)  # the caches' storage (new_cache, generate, scoring)
        storage = dtype if dtype is not None else loaders.default_storage(tensors)
        if storage not in loaders.STORAGE_DTYPES:
            raise ValueError(f"dtype (={dtype!r}) must be one of {', '.join(loaders.STORAGE_DTYPES)}")
        max_batch = default_max_batch(config) if max_batch is None else _as_int("max_batch", max_batch)
        if not 1 <= max_batch <= 65536:
            raise ValueError(f"max_batch (={max_batch}) must be in [1, 65536]")
        arrays = loaders.to_storage(tensors, storage, copy_borrowed=copy_borrowed)
        fields = {k: config[k] for k in ModelConfig.__dataclass_fields__ if k in config and k != "dtype"}
        self.config = ModelConfig(**fields, dtype=storage)
        engine_config = {k: config[k] for k in ("arch", "vocab_size", "dim", "hidden_dim", "n_layers", "n_heads",
                                                "n_kv_heads", "head_dim", "context_length", "norm_eps",
                                                "rope_theta", "rope_layout")}
        self._engine = _core.Model(engine_config, arrays, max_batch)
        # the engine multiplies its own copies of the f32 matrices (in panels): a file's pages
        # under them are not needed again, as for the matrices converted to bf16 or q8_0
        borrowed = self._engine.borrowed
        for name, arr in arrays.items():
            if name not in borrowed:
                loaders.release_file_pages(arr)
        self._max_batch = max_batch  # tokens per engine pass (longer inputs run in chunks)
        self._scoring_scratch = threading.local()  # each thread's kept scoring cache and logits (decoding.py)
        self._init_decoding()
        self._gguf_metadata = gguf_metadata  # a GGUF file's tokenizer.* values, for the tokenizer
        self.path = Path(path) if path is not None else None
        self.tokenizer_path = Path(tokenizer_path) if tokenizer_path is not None else None
        self.vocab = vocab

    # ------------------------------------------------------------------ construction

    @classmethod
    def load(cls, path, *, tokenizer=None, dtype: str | None = None, max_batch: int | None = None,
             kv_dtype: str = "f32") -> "Model":
        """Load a llama2.c ``.bin``, a GGUF file or a Hugging Face checkpoint directory.

        tokenizer: path of a llama2.c ``tok*.bin``, which must hold the model's vocabulary size
        (ValueError otherwise); when not given, a ``.bin`` model takes ``tok{vocab_size}.bin`` or
        ``tokenizer.bin`` from beside it, the first that holds its vocabulary size (one that does
        not is passed over). Its pieces become ``model.vocab`` (list of bytes). GGUF files give
        their vocabulary from the metadata (list of str)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or directory")
        vocab, tokenizer_path, gguf_metadata = None, None, None
        if path.is_dir():
            config, tensors, extras = loaders.read_hf_dir(path)
        else:
            with open(path, "rb") as f:
                magic = f.read(4)
            if magic == b"GGUF":
                config, tensors, extras = loaders.read_gguf(path)
                vocab, gguf_metadata = extras["vocab"], extras["tokenizer_metadata"]
            elif path.suffix == ".bin":
                config, tensors, extras = loaders.read_llama2c(path)
                loaders.check_config(path, config)
                loaders.check_tensors(path, config, tensors, layers_key="llama2.c header field n_layers")
                if tokenizer is None:  # one beside the model, if one fits its vocabulary
                    found = loaders.find_llama2c_tokenizer(path, config["vocab_size"])
                    if found is not None:
                        tokenizer_path, vocab = found.path, found.pieces
            else:
                raise ValueError(f"{path}: unrecognised model format (magic {magic!r}); expected a GGUF file, "
                                 "a llama2.c .bin or a Hugging Face checkpoint directory")
        if tokenizer is not None:  # asked for: it must fit (ValueError naming the file otherwise)
            tokenizer_path = tokenizer
            if Path(tokenizer_path).suffix == ".bin":
                vocab = loaders.Llama2cVocab(tokenizer_path, config["vocab_size"]).pieces
        return cls(config, tensors, dtype=dtype, max_batch=max_batch, kv_dtype=kv_dtype, path=path,
                   tokenizer_path=tokenizer_path, vocab=vocab, gguf_metadata=gguf_metadata)

    @classmethod
    def from_numpy(cls, config: Any, weights: dict, *, dtype: str | None = None, max_batch: int | None = None,
                   kv_dtype: str = "f32") -> "Model":
        """A model from a Hugging Face config (a dict of ``config.json`` keys, with
        ``architectures`` or ``model_type``, or a transformers config object) and parameter
        arrays under their Hugging Face names: NumPy arrays or torch tensors (a
        ``state_dict()``), float32, float16, bfloat16 or float64 (rounded to float32, a copy).
        Everything is copied and the model holds no reference to the arrays, which may change
        or go afterwards: the weight matrices into the engine's own block of weights, the rest
        (norm weights, biases, an untied token embedding, which the engine reads in place)
        into arrays of the model's. Without ``dtype``, the storage follows the weights as for
        files (bfloat16 weights stay bf16)."""
        engine_config, tensors = loaders.from_hf_numpy(config, weights)
        return cls(engine_config, tensors, dtype=dtype, max_batch=max_batch, kv_dtype=kv_dtype, copy_borrowed=True)

    # ------------------------------------------------------------------ inference

    def new_cache(self, capacity: int | None = None, *, block_size: int = 16, kv_dtype: str | None = None) -> KVCache:
        """An empty cache. capacity: positions the pool holds for this cache and its forks
        (default: the context length), rounded up to whole blocks of block_size positions; a
        block that forks share counts once, but writing into one copies its filled positions into
        a free block first (see the module's documentation); kv_dtype: "f32" or "f16" (default:
        the model's)."""
        kv_dtype = self.kv_dtype if kv_dtype is None else _check_kv_dtype(kv_dtype)
        whole_context = capacity is None
        capacity, block_size = self._check_capacity(capacity, block_size)
        try:
            pool = self._new_pool(block_size, math.ceil(capacity / block_size), kv_dtype)
        except MemoryError as e:
            if not whole_context:
                raise
            # the pool's pages are only taken as positions are written, so this is a context
            # length beyond the address space or the system's overcommit limit (a corrupt file's)
            raise MemoryError(f"{e}: new_cache() makes room for the context length (context_length="
                              f"{self.config.context_length} positions); pass capacity= for fewer") from e
        return KVCache(_core.KVSeq(pool, self.config.context_length), self)

    def new_caches(self, n: int, capacity: int | None = None, *, block_size: int = 16,
                   kv_dtype: str | None = None) -> list[KVCache]:
        """n empty caches of one pool, as :meth:`forward_batch` takes them, with room for
        `capacity` positions each (default: the context length) whatever the others hold."""
        n = _as_int("n", n)
        if n < 1:
            raise ValueError(f"n (={n}) must be >= 1")
        capacity, block_size = self._check_capacity(capacity, block_size)
        blocks = -(-capacity // block_size)
        if n > MAX_POOL_BLOCKS // blocks:
            raise ValueError(f"n (={n}) must be in [1, {MAX_POOL_BLOCKS // blocks}]: {n} caches of capacity (={capacity}) "
                             f"positions take {n * blocks} blocks of block_size (={block_size}) positions, and a KV "
                             f"pool holds at most {MAX_POOL_BLOCKS}")
        first = self.new_cache(n * blocks * block_size, block_size=block_size, kv_dtype=kv_dtype)
        return [first] + [first.fork() for _ in range(n - 1)]  # forks of an empty cache share nothing

    def _check_capacity(self, capacity: int | None, block_size: int) -> tuple[int, int]:
        """new_cache's capacity (default: the context length) and block_size, checked."""
        capacity = self.config.context_length if capacity is None else _as_int("capacity", capacity)
        block_size = _as_int("block_size", block_size)
        if not 1 <= block_size <= 4096:
            raise ValueError(f"block_size (={block_size}) must be in [1, 4096]")
        if not 1 <= capacity <= MAX_POOL_BLOCKS * block_size:
            raise ValueError(f"capacity (={capacity}) must be in [1, {MAX_POOL_BLOCKS * block_size}] (a KV pool holds at "
                             f"most {MAX_POOL_BLOCKS} blocks of block_size (={block_size}) positions)")
        return capacity, block_size

    def _new_pool(self, block_size: int, n_blocks: int, kv_dtype: str):
        """An engine KV pool cut to this model's layers and heads (new_cache, the decoding loops)."""
        cfg = self.config
        return _core.KVPool(cfg.n_layers, cfg.n_kv_heads * cfg.head_dim, cfg.head_dim, block_size, n_blocks, kv_dtype)

    def _tokens(self, name, tokens) -> np.ndarray:
        vocab_size = self.config.vocab_size
        if type(tokens) is list and 0 < len(tokens) <= _SHORT and all(type(t) is int for t in tokens):
            # a few Python ints (a decode step): checked here, as NumPy's element-wise
            # operations take microseconds a call, which tiny models feel
            for i, t in enumerate(tokens):
                if t < 0 or t >= vocab_size:
                    raise ValueError(f"{name}[{i}] (={t}) is outside the vocabulary [0, {vocab_size})")
            return np.array(tokens, dtype=np.int32)
        arr = as_numpy(tokens, name)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"{name} must be a non-empty 1-D sequence of token ids (shape {arr.shape})")
        listed = type(tokens) in (list, tuple)
        if arr.dtype.kind not in "iu":  # not np.issubdtype(arr.dtype, np.integer), which takes a microsecond
            if listed and arr.dtype.kind in "Of":
                # NumPy makes ints beyond int64 an object array, and an int in [2**63, 2**64) with
                # a negative one a float64 array: ids outside the vocabulary, said as of short lists
                _check_listed_ids(name, tokens, vocab_size)
            raise TypeError(f"{name} must hold integers, not {arr.dtype}")
        if listed:
            # NumPy reads a bool among ints (Python's or NumPy's) as 1 or 0: the entries that read
            # 0 or 1 (usually BOS alone) are looked at in Python, found in one pass with those
            # outside the vocabulary; when there are many (padding), the list's types are scanned
            # at C speed first
            odd = np.flatnonzero((arr <= 1) | (arr >= vocab_size))
            if odd.size > _SHORT:
                if {bool, np.bool_}.isdisjoint(map(type, tokens)):
                    odd = odd[(arr[odd] < 0) | (arr[odd] >= vocab_size)]
                else:
                    odd = np.arange(arr.size)
            for i in odd.tolist():
                t = tokens[i]
                if isinstance(t, (bool, np.bool_)):
                    raise TypeError(f"{name} must hold integers, not bool ({name}[{i}] is {t!r})")
                if not 0 <= t < vocab_size:
                    raise ValueError(f"{name}[{i}] (={t}) is outside the vocabulary [0, {vocab_size})")
            return arr.astype(np.int32)
        bad = (arr < 0) | (arr >= vocab_size)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"{name}[{i}] (={int(arr[i])}) is outside the vocabulary [0, {vocab_size})")
        return arr.astype(np.int32)

    @staticmethod
    def _logit_rows(logits, n: int) -> np.ndarray:
        """Which of n new tokens' logits to return, as int32 indices (see :meth:`forward`)."""
        if isinstance(logits, str) and logits == "last":
            return np.array([n - 1], dtype=np.int32)
        if isinstance(logits, str) and logits == "all":
            return np.arange(n, dtype=np.int32)
        if logits is None:
            return np.zeros(0, dtype=np.int32)
        want = as_numpy(logits, "logits")
        listed = type(logits) in (list, tuple)
        if want.ndim != 1:
            raise ValueError(f"logits must be 'last', 'all', None or a 1-D int array (got {logits!r:.80})")
        if listed and want.dtype.kind in "Of" and all(
                isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in logits):
            # ints beyond int64 (NumPy made them an object or float64 array)
            raise ValueError(f"logits indices must be in [0, {n}) (got {list(logits)!r:.80})")
        if want.dtype.kind not in "iu":
            raise TypeError(f"logits indices must be integers, not {want.dtype} (got {logits!r:.80})")
        if listed and any(isinstance(v, (bool, np.bool_)) for v in logits):  # NumPy read them as 1 and 0
            raise TypeError(f"logits indices must be integers, not bool (got {logits!r:.80})")
        if want.size and (want.min() < 0 or want.max() >= n):
            raise ValueError(f"logits indices must be in [0, {n}) (got {want.tolist()})")
        return want.astype(np.int32)

    def _check_cache(self, name, cache):
        if not isinstance(cache, KVCache):
            raise TypeError(f"{name} must be a KVCache from model.new_cache(), not {type(cache).__name__}")
        if cache._model is not self:
            raise ValueError(f"{name} was created by a different model")

    def forward(self, tokens, cache: KVCache, *, logits="last", out=None) -> np.ndarray:
        """Append tokens to the cached sequence and return logits.

        logits: "last" -> (vocab,) of the last token; "all" -> (len(tokens), vocab); an int array
        of indices into tokens -> (len(indices), vocab); None -> empty (vocab-less) result.
        out: a writable, C-contiguous float32 array of shape (rows asked for, vocab) to write the
        logits into (the result is then a view of it), instead of a new array."""
        self._check_cache("cache", cache)
        arr = self._tokens("tokens", tokens)
        rows = _core.model_forward(self._engine, [cache._seq], arr, np.zeros(arr.size, dtype=np.int32),
                                   self._logit_rows(logits, arr.size), out)
        return rows[0] if isinstance(logits, str) and logits == "last" else rows

    def forward_batch(self, token_lists, caches, *, logits="last", out=None) -> list:
        """One engine pass over several sequences' new tokens (each weight matrix read once).

        The caches must share one pool: those of :meth:`new_caches`, or a cache and its forks.
        Returns one logits array per sequence, shaped as in :meth:`forward`; with out (as in
        :meth:`forward`, all sequences' rows in order), views of it."""
        if len(token_lists) != len(caches):
            raise ValueError(f"{len(token_lists)} token lists but {len(caches)} caches")
        if len(caches) == 0:
            raise ValueError("forward_batch needs at least one sequence")
        arrays, seq_index, logit_index, splits = [], [], [], []
        offset = 0
        for s, (toks, cache) in enumerate(zip(token_lists, caches)):
            self._check_cache(f"caches[{s}]", cache)
            arr = self._tokens(f"tokens[{s}]" if len(caches) > 1 else "tokens", toks)
            n = arr.size
            want = self._logit_rows(logits, n)
            arrays.append(arr)
            seq_index.append(np.full(n, s, dtype=np.int32))
            logit_index.append(want + offset)
            splits.append(want.size)
            offset += n
        if any(c._seq.pool is not caches[0]._seq.pool for c in caches):
            raise ValueError("the caches of one forward_batch call must share a pool: make them with "
                             "model.new_caches(n), or fork them from one cache")
        out = _core.model_forward(self._engine, [c._seq for c in caches], np.concatenate(arrays),
                                  np.concatenate(seq_index), np.concatenate(logit_index), out)
        results, at = [], 0
        for n in splits:
            part = out[at:at + n]
            at += n
            results.append(part[0] if isinstance(logits, str) and logits == "last" else part)
        return results

    def logits(self, tokens) -> np.ndarray:
        """(T, vocab) float32 logits of every position of `tokens`, in one prefill pass."""
        arr = self._tokens("tokens", tokens)
        if arr.size > self.config.context_length:
            raise ValueError(f"tokens has {arr.size} positions, more than the context length {self.config.context_length}")
        return self.forward(arr, self._scoring_cache(arr.size), logits="all")

    def __repr__(self) -> str:
        c = self.config
        return (f"Model(arch={c.arch!r}, dim={c.dim}, n_layers={c.n_layers}, n_heads={c.n_heads}, "
                f"n_kv_heads={c.n_kv_heads}, vocab_size={c.vocab_size}, dtype={c.dtype!r})")
