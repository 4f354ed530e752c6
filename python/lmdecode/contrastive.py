"""Contrastive decoding (Li et al., ACL 2023): an expert's log-probabilities minus an amateur's.

``generate(expert, prompt, amateur_model=amateur, temperature=0)`` runs it in C over two
lmdecode models (or in Python over two step functions); this module exposes the scores
for logits of your own (csrc/contrastive.h)::

    score(x) = log p_EXP(x) - log p_AMA(x)   if p_EXP(x) >= alpha * max_w p_EXP(w)
             = -inf                          otherwise (the adaptive plausibility constraint)

with ``p_AMA`` the amateur's softmax at ``amateur_temperature``. Greedy decoding takes their
argmax, as in the paper; the sampling chain may also treat them as logits.

Not to be confused with transformers' "contrastive search" (``penalty_alpha``), a different
method (Su et al. 2022) that penalizes similarity of hidden states.
"""
from __future__ import annotations

import numbers

import numpy as np

from . import _core
from .sampling import _as_logits

__all__ = ["contrastive_logits"]


def _check_parameters(alpha, amateur_temperature, alpha_name: str = "contrastive_alpha") -> tuple[float, float]:
    """alpha_name: what the caller calls alpha (generate's contrastive_alpha, contrastive_logits' alpha)."""
    for name, value in ((alpha_name, alpha), ("amateur_temperature", amateur_temperature)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number, got {value!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{alpha_name} (={alpha}) must be in [0, 1]")
    if not (0.0 < amateur_temperature < float("inf")):
        raise ValueError(f"amateur_temperature (={amateur_temperature}) must be > 0")
    return float(alpha), float(amateur_temperature)


def contrastive_logits(expert_logits, amateur_logits, *, alpha: float = 0.1, amateur_temperature: float = 1.0) -> np.ndarray:
    """Contrastive scores of raw expert and amateur logits, (V,) or (B, V) of any real dtype:
    float32 scores of the same shape, computed in float32.

    ``-inf`` marks tokens outside the expert's plausible set; NaN or +inf logits raise
    ValueError. The inputs are not modified."""
    alpha, amateur_temperature = _check_parameters(alpha, amateur_temperature, "alpha")
    expert, one_row = _as_logits(expert_logits, "expert_logits")
    amateur, amateur_one_row = _as_logits(amateur_logits, "amateur_logits")
    if expert.shape != amateur.shape or one_row != amateur_one_row:
        given = [a.shape[1:] if one else a.shape for a, one in ((expert, one_row), (amateur, amateur_one_row))]
        raise ValueError(f"expert_logits {given[0]} and amateur_logits {given[1]} must have one shape")
    out = _core.contrastive_scores(expert, amateur, alpha, amateur_temperature)
    return out[0] if one_row else out
