"""Sequence log-probabilities and perplexity.

``sequence_logprob(logits, targets)`` scores external logits: row ``t`` of the
``(T, V)`` logits is the distribution of ``targets[t]``. Models score a
continuation in one prefill pass over ``context + continuation`` (see
``Model.sequence_logprob``), never token by token.

``perplexity`` follows the sliding-window protocol of the transformers
documentation ("Perplexity of fixed-length models"): windows of ``window``
tokens start every ``stride`` tokens; each window scores only the tokens the
previous windows did not (the last ``end - previous_end`` of it), so
overlapping tokens are scored once, with up to ``window - stride`` tokens of
context. The first token of the text has no context and is never scored; nor,
with disjoint windows (``stride == window``), is the first token of each
window, as in that loop. So ``n_tokens = len(tokens) - 1`` when the windows
overlap (or there is one), ``len(tokens) - windows`` when they do not, and
``perplexity = exp(nll / n_tokens)``.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _core
from .sampling import _float32, as_numpy, as_token_ids

__all__ = ["PerplexityResult", "SequenceScore", "perplexity", "perplexity_of_windows", "perplexity_windows",
           "sequence_logprob"]


@dataclass(frozen=True)
class SequenceScore:
    """The log-probability of a continuation: its sum and its per-token terms."""

    total: float
    token_logprobs: np.ndarray = field(repr=False)  # float64 (T,)
    tokens: tuple = field(default=(), repr=False)  # the scored token ids (from model.sequence_logprob)
    # every token had its position's largest logit (a tie counts), so greedy decoding could
    # produce the continuation: lm-evaluation-harness's is_greedy (True for no tokens)
    is_greedy: bool = True


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float  # exp(nll / n_tokens)
    nll: float  # total negative log-likelihood in nats
    n_tokens: int  # tokens scored


def sequence_logprob(logits: Any, targets: Any) -> SequenceScore:
    """log p(targets) under external logits: (T, V) logits, (T,) target ids.

    Row t of logits must be the model's prediction for targets[t] (the logits
    at the position before it). A (B, T, V) batch with (B, T) targets gives a
    list of scores. Logits of any real dtype are scored in float32, as the
    samplers take them; the per-token log-probabilities and their sum are
    float64.
    """
    z = as_numpy(logits, "logits")
    y = as_numpy(targets, "targets")
    if z.dtype.kind not in "fiu":
        raise TypeError(f"logits must be a real floating-point array, got dtype {z.dtype}")
    if z.ndim == 3:
        if y.ndim != 2 or y.shape[0] != z.shape[0]:
            raise ValueError(f"targets must have shape ({z.shape[0]}, T) for logits of shape {z.shape}")
        return [sequence_logprob(z[b], y[b]) for b in range(z.shape[0])]  # type: ignore[return-value]
    if z.ndim != 2:
        raise ValueError(f"logits must have shape (T, V), got {z.shape}")
    if y.ndim != 1 or y.shape[0] != z.shape[0]:
        raise ValueError(f"targets must have shape ({z.shape[0]},), got {y.shape}")
    if y.size and y.dtype.kind not in "iu":
        raise TypeError(f"targets must be integer token ids, got dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= z.shape[1]):
        bad = int(np.flatnonzero((y < 0) | (y >= z.shape[1]))[0])
        raise ValueError(f"targets[{bad}] (={y[bad]}) is not a token id in [0, {z.shape[1]})")
    if z.shape[0] == 0:
        return SequenceScore(0.0, np.zeros(0))
    # log softmax at each target only: the values log_softmax(z) would hold there, without
    # a second (T, V) array
    lp, is_max = _core.target_logprobs(_float32(z, "logits"), y.astype(np.int32))
    lp = lp.astype(np.float64)
    return SequenceScore(float(lp.sum()), lp, is_greedy=bool(is_max.all()))


def perplexity_windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, n_scored) of every window over n tokens, transformers' protocol."""
    spans, previous_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        spans.append((begin, end, end - previous_end))
        previous_end = end
        if end == n:
            break
    return spans


def _check_positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} (={value}) must be >= 1")
    return int(value)


def perplexity(
    logits_fn: Callable[[np.ndarray], np.ndarray],
    tokens: Sequence[int],
    *,
    window: int,
    stride: int | None = None,
    progress: bool | None = None,
) -> PerplexityResult:
    """Sliding-window perplexity of tokens under ``logits_fn(window_tokens) -> (T, V)``.

    ``stride`` defaults to ``window`` (disjoint windows); ``progress`` shows a
    tqdm bar (default: when there are more than 8 windows and tqdm is installed).
    """

    def score_window(chunk: np.ndarray, first: int) -> np.ndarray:
        # predictions for chunk[1:] come from logits[:-1]
        logits = as_numpy(logits_fn(chunk), "logits_fn's logits")
        if logits.ndim != 2 or logits.shape[0] != len(chunk):  # (1, T, V) from a model's batch, say
            raise ValueError(f"logits_fn must return ({len(chunk)}, V) logits for a window of {len(chunk)} "
                             f"tokens, got shape {logits.shape}")
        return sequence_logprob(logits[first - 1 : len(chunk) - 1], chunk[first:]).token_logprobs

    return perplexity_of_windows(score_window, tokens, window=window, stride=stride, progress=progress)


def perplexity_of_windows(
    score_window: Callable[[np.ndarray, int], np.ndarray],
    tokens: Sequence[int],
    *,
    window: int,
    stride: int | None = None,
    progress: bool | None = None,
) -> PerplexityResult:
    """:func:`perplexity` with ``score_window(window_tokens, first) -> log p`` of
    ``window_tokens[first:]`` given the tokens before them in the window (models score
    their windows without (T, V) logits: ``Model.perplexity``)."""
    ids = as_token_ids(tokens)
    if ids is None:
        raise TypeError(f"tokens must be a 1-D sequence of token ids, got {tokens!r:.80}")
    window = _check_positive("window", window)
    if window < 2:
        raise ValueError(f"window (={window}) must be >= 2: a window of one token predicts nothing")
    stride = window if stride is None else _check_positive("stride", stride)
    if stride > window:
        raise ValueError(f"stride (={stride}) must be <= window (={window}), or tokens go unscored")
    if ids.size < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {ids.size}")
    spans = perplexity_windows(ids.size, window, stride)
    iterator: Any = spans
    if progress or (progress is None and len(spans) > 8):
        try:
            from tqdm.auto import tqdm

            iterator = tqdm(spans, desc="perplexity", unit="window")
        except ImportError:
            pass
    nll, scored = 0.0, 0
    for begin, end, n_new in iterator:
        chunk = ids[begin:end]
        # score the last n_new tokens (the first window's first token has no prediction)
        first = max(len(chunk) - n_new, 1)
        nll -= float(np.asarray(score_window(chunk, first)).sum())
        scored += len(chunk) - first
    return PerplexityResult(perplexity=math.exp(nll / scored), nll=nll, n_tokens=scored)
