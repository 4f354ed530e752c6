"""lmdecode: autoregressive language-model inference with a C core.

Samplers over external logits::

    import lmdecode as ld
    token = ld.sample(logits, temperature=0.8, top_p=0.9, seed=0)
    logprobs = ld.process_logits(logits, top_k=50)
"""
from . import _core
from .sampling import SamplingParams, greedy, log_softmax, process_logits, rng_uniform, sample
from .generation import Generation, GenerationChunk, generate
from .model import KVCache, Model, ModelConfig
from .scoring import PerplexityResult, SequenceScore, sequence_logprob
from .search import Hypothesis, beam_search
from .speculative import speculative_accept
from .contrastive import contrastive_logits
from .chat import render_chat

__version__ = "0.1.0"

__all__ = [
    "Generation",
    "GenerationChunk",
    "Hypothesis",
    "KVCache",
    "Model",
    "ModelConfig",
    "PerplexityResult",
    "SamplingParams",
    "SequenceScore",
    "beam_search",
    "build_info",
    "contrastive_logits",
    "generate",
    "get_num_threads",
    "greedy",
    "log_softmax",
    "process_logits",
    "render_chat",
    "rng_uniform",
    "sample",
    "sequence_logprob",
    "set_num_threads",
    "speculative_accept",
]


def build_info() -> dict:
    """How the C core was built: OpenMP on/off, vector extensions, thread count, and what
    multiplies bf16 weights: ``bf16_kernel`` is ``"amx"`` (Intel's AMX tiles, where the build,
    the CPU and the kernel allow them and ``LMDECODE_NO_AMX`` is unset), ``"avx512_bf16"`` (the
    vector unit's bf16 dot products; both round the inputs to bf16) or ``"f32"`` (weights widened
    to float against exact inputs)."""
    info = _core.build_info()
    info["vector_extensions"] = info["vector_extensions"].split()
    return info


def set_num_threads(n: int) -> None:
    """Threads used by the C core's parallel loops; 0 restores the default."""
    _core.set_num_threads(n)


def get_num_threads() -> int:
    """Threads the C core's parallel loops use now."""
    return _core.get_num_threads()

