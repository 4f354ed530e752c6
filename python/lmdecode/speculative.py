"""Speculative decoding: the verification rule over external distributions.

``generate(target, prompt, draft_model=draft, num_draft_tokens=k)`` runs the whole
draft-and-verify loop in C over two lmdecode models (see generation.py). This module
exposes the rule itself (csrc/speculative.h) for distributions of your own models.

Leviathan et al. 2023 / Chen et al. 2023, as vLLM's rejection sampler and
transformers' assisted generation apply it: draft token ``x_i`` (drawn from ``q_i``)
is kept when ``u_i < p_i(x_i) / q_i(x_i)``; at the first rejection the replacement
is drawn from ``norm(max(0, p_i - q_i))``; when every draft token is kept, a bonus
token is drawn from ``p_{k+1}``. The tokens that come out are distributed exactly as
draws from ``p`` alone.
"""
from __future__ import annotations

import numbers

import numpy as np

from . import _core
from .sampling import as_numpy, as_token_ids, rng_uniform, sample

__all__ = ["SPECULATIVE_STREAM", "speculative_accept"]

# the bit set in the stream of the acceptance and residual coins (2**63, csrc/speculative.h)
SPECULATIVE_STREAM: int = _core.SPECULATIVE_STREAM


def _logprob_rows(name: str, rows, vocab: int | None) -> np.ndarray:
    arr = as_numpy(rows, name)
    if arr.dtype.kind not in "fiu" or arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array of log-probabilities (rows, vocab), got shape {arr.shape} of {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if vocab is not None and arr.shape[1] != vocab:
        raise ValueError(f"{name} has {arr.shape[1]} columns but target_logprobs has {vocab}")
    bad = np.isnan(arr) | (arr == np.inf)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise ValueError(f"{name}[{r}, {c}] is {arr[r, c]}; log-probabilities must be finite or -inf")
    with np.errstate(under="ignore"):
        sums = np.exp(arr.astype(np.float64)).sum(axis=1)
    off = np.abs(sums - 1.0) > 1e-3
    if off.any():
        r = int(np.argmax(off))
        raise ValueError(f"{name}[{r}] is not a row of log-probabilities: its probabilities sum to {sums[r]:.6g}")
    return arr


def speculative_accept(draft_tokens, draft_logprobs, target_logprobs, *, seed: int, stream: int = 0, step: int = 0) -> tuple[int, int]:
    """Verifies ``k`` draft tokens: returns ``(n_accepted, next_token)``.

    draft_tokens: (k,) the draft's tokens; draft_logprobs: (k, V) the log-probabilities of the
    distributions they were drawn from (e.g. ``ld.process_logits`` of the draft's logits);
    target_logprobs: (k + 1, V) the target's, at the same positions and the one after. The
    first ``n_accepted`` draft tokens are kept and ``next_token`` follows them: the residual
    draw after a rejection, or the bonus draw from ``target_logprobs[k]``.

    Coins, as the C loop takes them (csrc/speculative.h): position ``i``'s acceptance and
    residual coins are ``rng_uniform(seed, stream | SPECULATIVE_STREAM, step + i, 0 / 1)``;
    the bonus token is ``ld.sample(target_logprobs[k], seed=seed, stream=stream, step=step + k)``.
    """
    for name, value in (("seed", seed), ("stream", stream), ("step", step)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < 1 << 63:
            raise ValueError(f"{name} (={value!r}) must be an int in [0, 2**63)")
    tokens = as_token_ids(draft_tokens)
    if tokens is None:
        raise ValueError(f"draft_tokens must be a 1-D sequence of token ids, got {draft_tokens!r:.80}")
    k = tokens.size
    target = _logprob_rows("target_logprobs", target_logprobs, None)
    vocab = target.shape[1]
    draft = _logprob_rows("draft_logprobs", draft_logprobs, vocab) if k else np.zeros((0, vocab), np.float32)
    if draft.shape[0] != k or target.shape[0] != k + 1:
        raise ValueError(f"{k} draft tokens need draft_logprobs of {k} rows and target_logprobs of {k + 1}, "
                         f"got {draft.shape[0]} and {target.shape[0]}")
    if k and (tokens.min() < 0 or tokens.max() >= vocab):
        i = int(np.argmax((tokens < 0) | (tokens >= vocab)))
        raise ValueError(f"draft_tokens[{i}] (={int(tokens[i])}) is outside the vocabulary [0, {vocab})")
    coins = np.array([[rng_uniform(seed, stream | SPECULATIVE_STREAM, step + i, j) for j in (0, 1)] for i in range(k)],
                     dtype=np.float64).reshape(k, 2)
    kept, residual = _core.speculative_verify(tokens.astype(np.int32), draft, target, coins)
    if kept < k:
        return kept, residual
    return k, int(sample(target[k], seed=seed, stream=stream, step=step + k))
