"""Type stubs of the C extension (see _core.c). Use the public API in lmdecode instead."""
from typing import Any

import numpy as np
import numpy.typing as npt

def build_info() -> dict[str, Any]: ...
def set_num_threads(n: int, /) -> None: ...
def get_num_threads() -> int: ...
def rng_uniform(seed: int, stream: int, step: int, index: int = 0, /) -> float: ...
def validate_params(params: npt.NDArray[np.float64], /) -> None: ...
def sample_rows(
    logits: npt.NDArray[np.float32],
    params: npt.NDArray[np.float64],
    *,
    context: npt.NDArray[np.int32] | None = None,
    context_offsets: npt.NDArray[np.int64] | None = None,
    prompt_len: npt.NDArray[np.int32] | None = None,
    bias_ids: npt.NDArray[np.int32] | None = None,
    bias_values: npt.NDArray[np.float32] | None = None,
    bias_offsets: npt.NDArray[np.int64] | None = None,
    allowed_ids: npt.NDArray[np.int32] | None = None,
    allowed_offsets: npt.NDArray[np.int64] | None = None,
    allowed_rows: npt.NDArray[np.bool_] | None = None,
    banned_ids: npt.NDArray[np.int32] | None = None,
    banned_offsets: npt.NDArray[np.int64] | None = None,
    seeds: npt.NDArray[np.uint64] | None = None,
    stream: int = 0,
    step: int = 0,
    want_logprobs: bool = False,
    want_tokens: bool = True,
    streams: npt.NDArray[np.uint64] | None = None,
    steps: npt.NDArray[np.uint64] | None = None,
) -> tuple[npt.NDArray[np.float32] | None, npt.NDArray[np.int64] | None, npt.NDArray[np.float32] | None]: ...

class BeamSearch:
    """Beam search state machine with transformers' semantics (see csrc/search.h)."""

    def __init__(self, num_beams: int, vocab: int, max_new_tokens: int, num_return_sequences: int, length_penalty: float, early_stopping: int, eos_ids: Any) -> None: ...
    def step(self, logits: npt.NDArray[np.float32], /) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...
    def hypotheses(self) -> list[tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], float, float]]: ...
    @property
    def done(self) -> bool: ...
    @property
    def length(self) -> int: ...

class Generator:
    """Sampling-loop state machine (see csrc/generate.h)."""

    def __init__(self, vocab: int, params: npt.NDArray[np.float64], seed: int, prompts: npt.NDArray[np.int32], prompt_offsets: npt.NDArray[np.int64], *, max_new_tokens: int = 0, min_new_tokens: int = 0, stop_ids: Any = None, stop_bytes: Any = None, stop_offsets: Any = None, token_bytes: Any = None, token_offsets: Any = None, n_top_logprobs: int = 0, **row_inputs: Any) -> None: ...
    def running(self) -> npt.NDArray[np.int64]: ...
    def step(self, logits: npt.NDArray[np.float32], /) -> npt.NDArray[np.int64]: ...
    def result(self, k: int, /) -> tuple[npt.NDArray[np.int64], int, npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.float32], str | None, int]: ...
    @property
    def done(self) -> bool: ...
