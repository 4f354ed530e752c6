"""Sampling speed: lmdecode against a NumPy sort-based reference, transformers'
warpers on torch CPU (+ torch.multinomial), and R1 = one vectorized read of the
same rows (the memory floor).

    python benchmarks/bench_sampling.py            # full table (a few minutes)
    python benchmarks/bench_sampling.py --quick    # fewer repetitions

Every figure is the median over repetitions of the mean time per call in
microseconds, rotating through many distinct rows (a fresh row every call, from
a pool larger than the caches) so that neither the caches nor the branch
predictor can learn one input. Ratios in the last columns are taken within the
same run.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import tracemalloc

import numpy as np

import lmdecode as ld

try:
    import torch
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    HAVE_TORCH = True
except ImportError:  # the table then has no transformers column
    HAVE_TORCH = False

POOL_BYTES = 256 << 20  # rows rotate through this much memory (larger than any cache)


def make_rows(kind: str, n: int, vocab: int, rng: np.random.Generator) -> np.ndarray:
    """(n, vocab) float32 logits. peaked: Zipf-like (logit = -1.5 ln rank, ranks
    shuffled, small noise), as language models give; flat: N(0, 1)."""
    if kind == "flat":
        return rng.standard_normal((n, vocab), dtype=np.float32)
    rows = np.empty((n, vocab), dtype=np.float32)
    base = -1.5 * np.log(np.arange(1, vocab + 1, dtype=np.float64))
    for i in range(n):
        rows[i] = (base[rng.permutation(vocab)] + 0.05 * rng.standard_normal(vocab)).astype(np.float32)
    return rows


# ----------------------------------------------------------------------------
# the NumPy sort-based reference (vectorized over the batch)
# ----------------------------------------------------------------------------


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_process(z: np.ndarray, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, context=None, rep=1.0, freq=0.0, pres=0.0):
    z = z.astype(np.float32, copy=True)
    if context is not None:
        rows = np.arange(z.shape[0])[:, None]
        picked = z[rows, context]
        z[rows, context] = np.where(picked < 0, picked * rep, picked / rep)
        counts = np.zeros_like(z)
        np.add.at(counts, (np.broadcast_to(rows, context.shape), context), 1.0)
        z -= freq * counts + pres * (counts > 0)
    z /= temperature
    if top_k:
        kth = -np.partition(-z, top_k - 1, axis=-1)[:, top_k - 1 : top_k]
        z[z < kth] = -np.inf
    if top_p < 1.0:
        order = np.argsort(z, axis=-1)
        sorted_z = np.take_along_axis(z, order, axis=-1)
        cum = np.cumsum(np_softmax(sorted_z), axis=-1)
        remove = cum <= 1 - top_p
        remove[:, -1] = False
        np.put_along_axis(z, order, np.where(remove, -np.inf, sorted_z), axis=-1)
    if min_p > 0.0:
        p = np_softmax(z)
        z[p < min_p * p.max(axis=-1, keepdims=True)] = -np.inf
    return z


def np_sample(z: np.ndarray, rng: np.random.Generator, **kw) -> np.ndarray:
    p = np_softmax(np_process(z, **kw))
    cdf = np.cumsum(p, axis=-1)
    u = rng.random((z.shape[0], 1)) * cdf[:, -1:]
    return (cdf <= u).sum(axis=-1)


# ----------------------------------------------------------------------------
# transformers on torch
# ----------------------------------------------------------------------------


def hf_chain(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, rep=1.0):
    chain = LogitsProcessorList()
    if rep != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(rep))
    if temperature != 1.0:
        chain.append(TemperatureLogitsWarper(temperature))
    if top_k:
        chain.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        chain.append(TopPLogitsWarper(top_p))
    if min_p > 0.0:
        chain.append(MinPLogitsWarper(min_p))
    return chain


def hf_sample(scores: "torch.Tensor", chain, input_ids, freq=0.0, pres=0.0) -> "torch.Tensor":
    scores = chain(input_ids, scores)
    if freq or pres:  # transformers has no OpenAI-style penalties: the formula in torch
        counts = torch.zeros_like(scores).scatter_add_(1, input_ids, torch.ones_like(input_ids, dtype=scores.dtype))
        scores = scores - freq * counts - pres * (counts > 0)
    return torch.multinomial(torch.softmax(scores, dim=-1), 1)[:, 0]


# ----------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------


def time_calls(fn, batches: list, reps: int) -> float:
    """Median over reps of the mean microseconds per call, one distinct batch per call."""
    fn(batches[0])
    results = []
    for _ in range(reps):
        gc.disable()
        start = time.perf_counter()
        for b in batches:
            fn(b)
        results.append((time.perf_counter() - start) / len(batches) * 1e6)
        gc.enable()
    return statistics.median(results)


OPS = {
    "greedy": {"temperature": 0.0},
    "temperature 0.8": {"temperature": 0.8},
    "top-k 50": {"top_k": 50},
    "top-p 0.9": {"top_p": 0.9},
    "min-p 0.05": {"min_p": 0.05},
    "min-p 0.05 + top-p 0.9": {"min_p": 0.05, "top_p": 0.9},
    "full chain": {"repetition_penalty": 1.2, "frequency_penalty": 0.3, "presence_penalty": 0.2, "temperature": 0.8, "top_k": 50, "top_p": 0.9},
}


def run(quick: bool) -> None:
    rng = np.random.default_rng(0)
    reps = 3 if quick else 7
    threads = ld.get_num_threads()
    info = ld.build_info()
    print(f"lmdecode {ld.__version__}; OpenMP {info['openmp']}; vectors {' '.join(info['vector_extensions'])}; "
          f"{threads} threads; torch {torch.__version__ if HAVE_TORCH else 'absent'}; {os.cpu_count()} CPUs")
    print("times in microseconds per call (median of means); ratios within this run\n")
    header = f"{'V':>6} {'B':>3} {'rows':<6} {'operation':<22} {'R1':>8} {'lmdecode':>9} {'numpy':>9} {'hf+torch':>9} {'ld/R1':>6} {'hf/ld':>7} {'np/ld':>6}"
    print(header)
    print("-" * len(header))
    summary = []
    for vocab in (32000, 128256):
        for batch in (1, 32):
            for kind in ("peaked", "flat"):
                n_batches = max(8, min(64, POOL_BYTES // (batch * vocab * 4)))
                if quick:
                    n_batches = min(n_batches, 16)
                pool = make_rows(kind, n_batches * batch, vocab, rng)
                batches = [pool[i * batch : (i + 1) * batch] for i in range(n_batches)]
                if batch == 1:
                    batches = [b[0] for b in batches]
                contexts = [rng.integers(0, vocab, size=(batch, 64)) for _ in range(n_batches)]
                r1 = time_calls(lambda b: b.max(axis=-1), batches, reps)
                for op, kw in OPS.items():
                    penalties = "repetition_penalty" in kw
                    ctx_iter = iter(contexts * (reps + 2))

                    def ld_call(b, kw=kw, penalties=penalties):
                        if penalties:
                            c = next(ctx_iter)
                            ctx = c[0] if b.ndim == 1 else c
                            return ld.sample(b, seed=1, context=ctx, prompt_len=32, **kw)
                        return ld.sample(b, seed=1, **kw)

                    t_ld = time_calls(ld_call, batches, reps)
                    np_kw = dict(temperature=kw.get("temperature", 1.0) or 1.0, top_k=kw.get("top_k", 0), top_p=kw.get("top_p", 1.0), min_p=kw.get("min_p", 0.0))
                    if penalties:
                        np_kw.update(rep=1.2, freq=0.3, pres=0.2)
                    if kw.get("temperature") == 0.0:
                        t_np = time_calls(lambda b: np.argmax(b, axis=-1), batches, reps)
                    else:
                        def np_call(b, np_kw=np_kw, penalties=penalties):
                            b2 = b.reshape(1, -1) if b.ndim == 1 else b
                            c = contexts[0][: b2.shape[0]] if penalties else None
                            return np_sample(b2, rng, context=c, **np_kw)

                        t_np = time_calls(np_call, batches, max(1, reps // 2))
                    t_hf = float("nan")
                    if HAVE_TORCH:
                        tb = [torch.from_numpy(b.reshape(1, -1) if b.ndim == 1 else b) for b in batches]
                        ids = torch.from_numpy(contexts[0][:batch])
                        if kw.get("temperature") == 0.0:
                            t_hf = time_calls(lambda s: torch.argmax(s, dim=-1), tb, reps)
                        else:
                            chain = hf_chain(temperature=np_kw["temperature"], top_k=np_kw["top_k"], top_p=np_kw["top_p"], min_p=np_kw["min_p"], rep=np_kw.get("rep", 1.0))
                            t_hf = time_calls(lambda s, chain=chain: hf_sample(s, chain, ids, np_kw.get("freq", 0.0), np_kw.get("pres", 0.0)), tb, max(1, reps // 2))
                    print(f"{vocab:>6} {batch:>3} {kind:<6} {op:<22} {r1:>8.1f} {t_ld:>9.1f} {t_np:>9.1f} {t_hf:>9.1f} {t_ld / r1:>6.1f} {t_hf / t_ld:>7.1f} {t_np / t_ld:>6.1f}")
                    summary.append((vocab, batch, kind, op, r1, t_ld, t_np, t_hf))
                sys.stdout.flush()
    print()
    threading_table(rng, reps)
    allocation_check(rng)


def threading_table(rng: np.random.Generator, reps: int) -> None:
    """Speed-up from 2 threads on B=32, and that one row is not slowed by them."""
    print("threads: microseconds per call with 1 and 2 threads (same rows)")
    print(f"{'V':>6} {'B':>3} {'operation':<22} {'1 thread':>9} {'2 threads':>10} {'speed-up':>9}")
    for vocab in (32000, 128256):
        for batch in (1, 32):
            n_batches = max(8, min(32, POOL_BYTES // (batch * vocab * 4)))
            pool = make_rows("peaked", n_batches * batch, vocab, rng)
            batches = [pool[i * batch : (i + 1) * batch] for i in range(n_batches)]
            if batch == 1:
                batches = [b[0] for b in batches]
            for op in ("temperature 0.8", "top-p 0.9", "full chain"):
                kw = dict(OPS[op])
                if op == "full chain":
                    ctx = rng.integers(0, vocab, size=(batch, 64))
                    kw.update(context=ctx[0] if batch == 1 else ctx, prompt_len=32)
                times = []
                for n in (1, 2):
                    ld.set_num_threads(n)
                    times.append(time_calls(lambda b: ld.sample(b, seed=1, **kw), batches, reps))
                ld.set_num_threads(0)
                print(f"{vocab:>6} {batch:>3} {op:<22} {times[0]:>9.1f} {times[1]:>10.1f} {times[0] / times[1]:>9.2f}")
    print()


def allocation_check(rng: np.random.Generator) -> None:
    """Bytes NumPy/Python allocate per call (tracemalloc), against the returned arrays."""
    vocab = 128256
    row = make_rows("peaked", 1, vocab, rng)[0]
    batch = make_rows("peaked", 32, vocab, rng)
    print("allocation per call (tracemalloc peak, bytes; the C core reuses its scratch)")
    for name, fn in (
        ("sample top-p, B=1, V=128256", lambda: ld.sample(row, top_p=0.9, seed=1)),
        ("sample top-p, B=32, V=128256", lambda: ld.sample(batch, top_p=0.9, seed=1)),
        ("process_logits, B=1, V=128256 (returns 513 kB)", lambda: ld.process_logits(row, top_p=0.9)),
    ):
        fn()
        tracemalloc.start()
        fn()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(f"  {name:<50} {peak:>9,}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and rows")
    run(parser.parse_args().quick)
