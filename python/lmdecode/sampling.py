"""Logits processors and samplers over NumPy logits.

Every function takes ``logits`` of shape ``(V,)`` or ``(B, V)`` (float16/32/64,
any strides, or a nested list) and never modifies it. The processing chain, in
order, with the semantics of the systems users already know:

1. ``allowed_tokens`` / ``banned_tokens`` masks and additive ``logit_bias``;
2. ``repetition_penalty`` (CTRL / transformers: a positive logit is divided by
   the penalty, a negative one multiplied) over every distinct token of
   ``context``;
3. ``frequency_penalty`` and ``presence_penalty`` (OpenAI / vLLM:
   ``logit -= f * count + p * (count > 0)``) counted over the generated part
   ``context[prompt_len:]``;
4. ``no_repeat_ngram_size`` bans (transformers' NoRepeatNGram over all of
   ``context``);
5. ``temperature`` (``0`` means greedy over the processed logits);
6. ``top_k`` -> ``top_p`` -> ``min_p`` -> ``typical_p`` -> ``epsilon`` -> ``eta``,
   each acting on the distribution the previous ones left, with transformers'
   rules (ties with the k-th value kept by top-k; top-p removes a token when
   the ascending cumulative probability up to it is ``<= 1 - top_p``;
   ``min_tokens_to_keep`` best tokens always survive).

Random draws are reproducible: row ``r`` uses the coin
``rng_uniform(seed[r], stream, step)`` (Philox4x32-10, see ``rng_uniform``;
``stream`` defaults to 0), so a row's token depends only on its logits, its
seed, the stream and ``step``.
"""
from __future__ import annotations

import functools
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import _core

__all__ = [
    "SamplingParams",
    "greedy",
    "log_softmax",
    "process_logits",
    "rng_uniform",
    "sample",
]

# Column order of the parameter table handed to the C core (lmd_sampling_params).
_PARAM_DEFAULTS: dict[str, float] = {
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "min_p": 0.0,
    "typical_p": 1.0,
    "epsilon": 0.0,
    "eta": 0.0,
    "repetition_penalty": 1.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "no_repeat_ngram_size": 0,
    "min_tokens_to_keep": 1,
}
_INT_PARAMS = frozenset({"top_k", "no_repeat_ngram_size", "min_tokens_to_keep"})
# Keywords that describe each row's tokens rather than the distribution's shape.
_ROW_INPUTS = ("context", "prompt_len", "logit_bias", "allowed_tokens", "banned_tokens")
KEYWORDS = tuple(_PARAM_DEFAULTS) + _ROW_INPUTS

_UINT64_LIMIT = 1 << 64


def check_constraint_function(fn: Any) -> None:
    """prefix_allowed_tokens_fn (generate, beam_search) must be callable."""
    if not callable(fn):
        raise TypeError(f"prefix_allowed_tokens_fn must be callable, got {type(fn).__name__}")


def allowed_token_ids(allowed: Any, vocab: int, batch_id: int) -> np.ndarray | None:
    """What prefix_allowed_tokens_fn returned for batch_id, checked: int32 ids in [0, vocab)
    (repeats removed only when there are more than vocab of them: the C side tolerates them),
    or None (any token). Called once per sequence per step, so it stays cheap."""
    if allowed is None:
        return None
    ids = as_token_ids(allowed)
    if ids is None:
        raise TypeError(f"prefix_allowed_tokens_fn must return a list of token ids or None, got {allowed!r:.80} "
                        f"for batch_id {batch_id}")
    if ids.size == 0:
        raise ValueError(f"prefix_allowed_tokens_fn returned an empty list for batch_id {batch_id}: no token may "
                         "follow, so the constraint cannot be satisfied")
    low, high = ids.min(), ids.max()
    if low < 0 or high >= vocab:
        raise ValueError(f"prefix_allowed_tokens_fn returned token {int(low if low < 0 else high)} for batch_id "
                         f"{batch_id}, outside the vocabulary [0, {vocab})")
    if ids.size > vocab:
        ids = np.unique(ids)
    return ids.astype(np.int32, copy=False)


def rng_uniform(seed: int, stream: int, step: int, index: int = 0) -> float:
    """The documented generator: a double in [0, 1) from Philox4x32-10.

    key = (seed low 32 bits, seed high 32 bits); counter = (step low, step high,
    stream low, stream high); output words (x0, x1, x2, x3) give
    ``((x0 << 32 | x1) >> 11) * 2**-53`` for index 0 and the same of (x2, x3) for
    index 1. Samplers use index 0 of stream 0 as their coin. seed, stream and step are ints
    in [0, 2**64), checked as ``sample`` checks them (the extension's "K" conversion would
    wrap 2**64 to 0 and -1 to 2**64 - 1).
    """
    if isinstance(index, (bool, np.bool_)) or not isinstance(index, numbers.Integral):
        raise TypeError(f"index must be 0 or 1, got {index!r}")
    if index not in (0, 1):
        raise ValueError(f"index (={index}) must be 0 or 1")
    return _core.rng_uniform(_check_u64("seed", seed), _check_u64("stream", stream), _check_u64("step", step),
                             int(index))


# ----------------------------------------------------------------------------
# parameters
# ----------------------------------------------------------------------------


# The C core holds integer parameters in int32.
_INT32_RANGE = (-(1 << 31), 1 << 31)


def _shown(value: Any) -> str:
    """value for a message: ints of more digits than a float holds are summarized."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        digits = len(str(abs(int(value))))
        if digits > 30:
            return f"{'-' if value < 0 else ''}an int of {digits} digits"
    return repr(value)


def _scalar_param(name: str, value: Any, label: str | None = None) -> float | int:
    """One value of distribution parameter `name` (`label` in messages, e.g. top_k[1]) as a
    Python number. Checked here: what the float64 table would lose before the core's checks
    (ints past int32, which the binding saturates, or past float64, where float() overflows)."""
    label = label or name
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{label} must be a number, got {value!r}")
    if name in _INT_PARAMS:
        if not isinstance(value, numbers.Integral):
            raise TypeError(f"{label} must be an int, got {value!r}")
        value = int(value)
        # the core keeps int32: out of range, the value would be saturated or float() would overflow
        if not _INT32_RANGE[0] <= value < _INT32_RANGE[1]:
            low = 1 if name == "min_tokens_to_keep" else 0
            raise ValueError(f"{label} (={_shown(value)}) must be in [{low}, 2**31)")
        return value
    try:
        return float(value)
    except OverflowError:  # an int past float64's range
        raise ValueError(f"{label} (={_shown(value)}) is too large: it must be a finite number") from None


def _param_values(name: str, value: Any) -> np.ndarray:
    """A 0-d (shared) or 1-d (per-row) float64 array of a distribution parameter."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]  # a 0-d array is a scalar
    if isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        return np.asarray(_scalar_param(name, value), dtype=np.float64)
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        raise TypeError(f"{name} must be a number or a sequence of numbers (one per row), got {value!r}")
    arr = as_numpy(value, name)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a number or a 1-D sequence (one per row), got shape {arr.shape}")
    if not isinstance(value, np.ndarray):  # NumPy reads (True, 1) as ints
        for i, v in enumerate(value):
            if isinstance(v, (bool, np.bool_)):
                raise TypeError(f"{name}[{i}] must be a number, got {v!r}")
    if arr.dtype == object and all(isinstance(v, numbers.Integral) for v in arr):  # ints past int64
        return np.array([_scalar_param(name, v, f"{name}[{i}]") for i, v in enumerate(arr)], dtype=np.float64)
    kinds = "iu" if name in _INT_PARAMS else "iuf"
    if arr.size and arr.dtype.kind not in kinds:
        what = "ints" if name in _INT_PARAMS else "numbers"
        raise TypeError(f"{name} must contain {what}, got dtype {arr.dtype}")
    if name in _INT_PARAMS and arr.size:
        outside = np.flatnonzero((arr < _INT32_RANGE[0]) | (arr >= _INT32_RANGE[1]))
        if outside.size:
            _scalar_param(name, arr[outside[0]], f"{name}[{outside[0]}]")  # raises, naming the value
    return arr.astype(np.float64)


class SamplingParams:
    """Validated, reusable sampling keywords (see the module docstring).

    Every keyword may be a scalar shared by all rows or a length-B sequence of
    per-row values; ``context``, ``logit_bias``, ``allowed_tokens`` and
    ``banned_tokens`` take one entry per row for a batch. Values are checked
    once here; the batch size is checked when the parameters are used.
    """

    __slots__ = ("_values", "_table", "_rows", "_row_inputs")

    def __init__(self, **keywords: Any) -> None:
        unknown = set(keywords) - set(KEYWORDS)
        if unknown:
            raise TypeError(f"unknown keyword(s): {', '.join(sorted(unknown))}; valid ones are {', '.join(KEYWORDS)}")
        self._values = dict(keywords)
        columns = [_param_values(name, keywords.get(name, default)) for name, default in _PARAM_DEFAULTS.items()]
        lengths = {c.shape[0] for c in columns if c.ndim == 1}
        if len(lengths) > 1:
            raise ValueError(f"per-row sampling parameters have different lengths: {sorted(lengths)}")
        self._rows = lengths.pop() if lengths else None
        n = self._rows if self._rows is not None else 1
        self._table = np.empty((n, len(columns)), dtype=np.float64)
        for j, column in enumerate(columns):
            self._table[:, j] = column
        self._table.setflags(write=False)
        _core.validate_params(self._table)
        self._row_inputs = {name: keywords[name] for name in _ROW_INPUTS if keywords.get(name) is not None}
        if "prompt_len" in self._row_inputs:
            _check_prompt_len(self._row_inputs["prompt_len"])

    def __getattr__(self, name: str) -> Any:
        if name in KEYWORDS:
            return self._values.get(name, _PARAM_DEFAULTS.get(name))
        raise AttributeError(name)

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self._values.items())
        return f"SamplingParams({shown})"

    def replace(self, **keywords: Any) -> "SamplingParams":
        """A copy with some keywords changed."""
        return SamplingParams(**{**self._values, **keywords})

    def to_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def _per_row_keyword(self) -> str:
        """The first keyword given one value per row (for messages; _rows is not None)."""
        return next(k for k in _PARAM_DEFAULTS if np.ndim(self._values.get(k, 0)) == 1)

    def _core_arguments(self, n_rows: int, vocab: int, row_inputs: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments of _core.sample_rows for a batch of n_rows of vocab logits;
        row_inputs (context, logit_bias, ...) given per call override the stored ones."""
        if self._rows is not None and self._rows != n_rows:
            raise ValueError(f"{self._per_row_keyword()} has {self._rows} values but logits has {n_rows} rows")
        args: dict[str, Any] = {"params": self._table}
        inputs = {**self._row_inputs, **row_inputs} if row_inputs else self._row_inputs
        if inputs:
            args.update(_row_input_arguments(inputs, n_rows, vocab))
        return args


@functools.lru_cache(maxsize=256)
def _shared_params(items: tuple) -> SamplingParams:
    return SamplingParams(**{name: _untyped(value) for name, value in items})


def _typed(value: Any) -> Any:
    """A cache key for a keyword's value that tells 1 from 1.0 and True, inside tuples too:
    values of different types that compare equal hash equal, and top_k=(1.0, 2.0) was served
    the entry validated for (1, 2)."""
    if type(value) is tuple:
        return (tuple, tuple(_typed(v) for v in value))
    return (type(value), value)


def _untyped(key: Any) -> Any:
    kind, value = key
    return tuple(_untyped(v) for v in value) if kind is tuple else value


def _params_for(params: SamplingParams | None, keywords: dict[str, Any]) -> tuple[SamplingParams, dict[str, Any]]:
    """The SamplingParams of a call and the per-call row inputs (context, ...)."""
    row_inputs = {k: keywords.pop(k) for k in _ROW_INPUTS if k in keywords}
    row_inputs = {k: v for k, v in row_inputs.items() if v is not None}
    if "prompt_len" in row_inputs:
        _check_prompt_len(row_inputs["prompt_len"])
    if params is not None:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        return (params.replace(**keywords) if keywords else params), row_inputs
    try:  # scalar keywords are hashable: validate each combination once
        # the types are part of the key so that top_k=1.0 is not served top_k=1's entry
        return _shared_params(tuple((k, _typed(v)) for k, v in sorted(keywords.items()))), row_inputs
    except TypeError as exc:
        if "unhashable" not in str(exc):
            raise
        return SamplingParams(**keywords), row_inputs


# ----------------------------------------------------------------------------
# per-row token inputs -> CSR arrays for the core
# ----------------------------------------------------------------------------


_INT32_MAX = np.iinfo(np.int32).max


def _not_a_token_id(what: str, value: Any, vocab: int | None) -> str:
    """The message for an id the core's int32 lists cannot hold: negative, or past the vocabulary."""
    if value < 0:
        return f"{what} (={value}) is not a token id (must be >= 0)"
    return f"{what} (={value}) is not a token id: outside the vocabulary [0, {vocab if vocab is not None else '2**31'})"


def _token_ids(name: str, value: Any, vocab: int | None = None) -> np.ndarray:
    """int32 token ids; the C core checks that they lie in [0, V) (ids past int32 here)."""
    arr = as_numpy(value, name)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int32)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must contain integer token ids, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of token ids, got shape {arr.shape}")
    if arr.dtype != np.int32:
        low, high = arr.min(), arr.max()
        if low < 0 or high > _INT32_MAX:
            bad = int(np.flatnonzero((arr < 0) | (arr > _INT32_MAX))[0])
            raise ValueError(_not_a_token_id(f"{name}[{bad}]", arr[bad], vocab))
        arr = arr.astype(np.int32)
    return arr


def _is_token_list(value: Any) -> bool:
    """True for a flat sequence of ints (one row), False for a sequence of rows; None stands
    for a row (unrestricted), so [None, None] is two rows, not one list of two ids."""
    if isinstance(value, np.ndarray):
        return value.ndim == 1
    return not any(v is None or isinstance(v, (Sequence, np.ndarray, Mapping)) and not isinstance(v, (str, bytes))
                   for v in value)


def _per_row(name: str, value: Any, n_rows: int) -> tuple[list, bool]:
    """Splits a per-row keyword into n_rows entries, and says whether one value is shared by all rows."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        raise TypeError(f"{name} must be a sequence of token ids or one such sequence per row, got {value!r}")
    if len(value) == 0 or _is_token_list(value):
        return [value] * n_rows, True
    if len(value) != n_rows:
        raise ValueError(f"{name} has {len(value)} rows but logits has {n_rows} rows")
    return list(value), False


def _csr(name: str, rows: list, vocab: int, shared: bool = False) -> tuple[np.ndarray, np.ndarray]:
    ids = [_token_ids(name if shared else f"{name}[{r}]", row, vocab) for r, row in enumerate(rows)]
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum([len(a) for a in ids], out=offsets[1:])
    values = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int32)
    return values.astype(np.int32, copy=False), offsets


def _context_csr(context: Any, n_rows: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids already seen by each row as (values int32, offsets int64 (n_rows + 1,))."""
    arr = context if isinstance(context, np.ndarray) else None
    if arr is None and isinstance(context, Sequence) and not isinstance(context, (str, bytes)):
        if len(context) == 0 or _is_token_list(context):
            arr = np.asarray(context)
    if arr is None:  # a list with one sequence per row
        if isinstance(context, (str, bytes)) or not isinstance(context, Sequence):
            raise TypeError(f"context must be a sequence of token ids, got {type(context).__name__}")
        if len(context) != n_rows:
            raise ValueError(f"context has {len(context)} rows but logits has {n_rows} rows")
        return _csr("context", list(context), vocab)
    if arr.size and arr.dtype.kind not in "iu":
        raise TypeError(f"context must contain integer token ids, got dtype {arr.dtype}")
    if arr.ndim == 2:  # a padded batch: -1 marks padding (left or right)
        if arr.shape[0] != n_rows:
            raise ValueError(f"context has {arr.shape[0]} rows but logits has {n_rows} rows")
        keep = arr != -1
        values = arr[keep]
        bad = np.flatnonzero((values < 0) | (values > _INT32_MAX))
        if bad.size:
            value = values[bad[0]]
            where = "(-1 is padding)" if value < 0 else f"in the vocabulary [0, {vocab})"
            raise ValueError(f"context contains {value}, which is not a token id {where}")
        offsets = np.zeros(n_rows + 1, dtype=np.int64)
        np.cumsum(keep.sum(axis=1), out=offsets[1:])
        return values.astype(np.int32), offsets
    if arr.ndim > 2:
        raise ValueError(f"context must be 1-D (one row) or 2-D (a padded batch), got shape {arr.shape}")
    if n_rows != 1:
        raise ValueError(
            f"context is one sequence but logits has {n_rows} rows; "
            "pass one sequence per row (a list, or a 2-D array padded with -1)"
        )
    values = _token_ids("context", arr.reshape(-1), vocab)
    return values, np.array([0, values.shape[0]], dtype=np.int64)


def _check_prompt_len(value: Any) -> np.ndarray:
    if type(value) is int:
        if value < 0:
            raise ValueError(f"prompt_len (={value}) must be >= 0")
        return np.int32(min(value, _INT32_MAX))
    arr = as_numpy(value, "prompt_len")
    if arr.dtype.kind not in "iu" or arr.ndim > 1:
        raise TypeError(f"prompt_len must be an int or a sequence of ints (one per row), got {value!r}")
    if np.any(arr < 0):
        raise ValueError(f"prompt_len (={value!r}) must be >= 0")
    return np.minimum(arr, _INT32_MAX).astype(np.int32)


def _bias_rows(bias: Any, n_rows: int) -> list[Mapping | np.ndarray]:
    if isinstance(bias, Mapping):
        return [bias] * n_rows
    if isinstance(bias, np.ndarray) and bias.ndim == 1:
        return [bias] * n_rows
    if isinstance(bias, np.ndarray) and bias.ndim == 2:
        if bias.shape[0] != n_rows:
            raise ValueError(f"logit_bias has {bias.shape[0]} rows but logits has {n_rows} rows")
        return list(bias)
    if isinstance(bias, Sequence) and not isinstance(bias, (str, bytes)):
        if len(bias) and all(isinstance(b, (Mapping, np.ndarray, Sequence)) for b in bias):
            if len(bias) != n_rows:
                raise ValueError(f"logit_bias has {len(bias)} rows but logits has {n_rows} rows")
            return list(bias)
        return [as_numpy(bias, "logit_bias")] * n_rows  # a dense (V,) list
    raise TypeError(f"logit_bias must be a dict {{token: bias}}, a (V,) array or one of those per row, got {bias!r}")


def _bias_arguments(bias: Any, n_rows: int, vocab: int) -> dict[str, np.ndarray]:
    ids, values = [], []
    for r, row in enumerate(_bias_rows(bias, n_rows)):
        if isinstance(row, Mapping):
            # key by key: NumPy makes float64 of an int beside an np.uint64, and object of an int past int64
            for key in row:
                if isinstance(key, (bool, np.bool_)) or not isinstance(key, numbers.Integral):
                    raise TypeError(f"logit_bias keys must be integer token ids, got {key!r}")
                if not 0 <= key <= _INT32_MAX:
                    raise ValueError(_not_a_token_id("logit_bias key", int(key), vocab))
            keys = np.array([int(key) for key in row], dtype=np.int64)
            vals = as_numpy(list(row.values()), "logit_bias")
        else:
            dense = as_numpy(row, "logit_bias")
            if dense.shape != (vocab,):
                raise ValueError(f"a dense logit_bias must have shape (V,) = ({vocab},), got {dense.shape}")
            keys = np.flatnonzero(dense)
            vals = dense[keys]
        if vals.size and vals.dtype.kind not in "iuf":
            raise TypeError(f"logit_bias values must be numbers, got dtype {vals.dtype}")
        vals = vals.astype(np.float64)
        if np.any(np.isnan(vals) | (vals == np.inf)):
            raise ValueError(f"logit_bias values must not be NaN or +inf (row {r})")
        ids.append(_token_ids("logit_bias", keys, vocab))
        values.append(vals.astype(np.float32))
    offsets = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum([len(a) for a in ids], out=offsets[1:])
    return {
        "bias_ids": np.concatenate(ids) if ids else np.zeros(0, np.int32),
        "bias_values": np.concatenate(values) if values else np.zeros(0, np.float32),
        "bias_offsets": offsets,
    }


def _row_input_arguments(inputs: dict[str, Any], n_rows: int, vocab: int) -> dict[str, Any]:
    args: dict[str, Any] = {}
    if "context" in inputs:
        args["context"], args["context_offsets"] = _context_csr(inputs["context"], n_rows, vocab)
    if "prompt_len" in inputs:
        prompt = _check_prompt_len(inputs["prompt_len"])
        if prompt.ndim == 1 and prompt.shape[0] != n_rows:
            raise ValueError(f"prompt_len has {prompt.shape[0]} values but logits has {n_rows} rows")
        args["prompt_len"] = prompt if prompt.ndim == 1 else np.full(n_rows, prompt, dtype=np.int32)
    if "logit_bias" in inputs:
        args.update(_bias_arguments(inputs["logit_bias"], n_rows, vocab))
    if "allowed_tokens" in inputs:
        rows, shared = _per_row("allowed_tokens", inputs["allowed_tokens"], n_rows)
        restricted = np.array([row is not None for row in rows], dtype=bool)
        args["allowed_ids"], args["allowed_offsets"] = _csr("allowed_tokens", [[] if row is None else row for row in rows], vocab, shared)
        args["allowed_rows"] = restricted
    if "banned_tokens" in inputs:
        rows, shared = _per_row("banned_tokens", inputs["banned_tokens"], n_rows)
        args["banned_ids"], args["banned_offsets"] = _csr("banned_tokens", [[] if row is None else row for row in rows], vocab, shared)
    return args


# ----------------------------------------------------------------------------
# logits and seeds
# ----------------------------------------------------------------------------


def as_numpy(values: Any, name: str) -> np.ndarray:
    """values as a NumPy array; a torch tensor (a model's logits as they come: requiring grad,
    in bfloat16, on a GPU) is detached and brought to the CPU first, bfloat16 widened to
    float32 (exactly), which NumPy lacks. Nested sequences of different lengths are a
    ValueError naming the argument `name` (NumPy's own message names neither)."""
    if type(values).__module__.split(".")[0] == "torch" and hasattr(values, "detach"):
        values = values.detach().cpu()
        return (values.float() if str(values.dtype) == "torch.bfloat16" else values).numpy()
    if isinstance(values, np.ndarray):
        return values
    try:
        return np.asarray(values)
    except ValueError:  # NumPy: "setting an array element with a sequence ... inhomogeneous shape"
        raise ValueError(f"{name} must be a rectangular array (rows of one length), got {values!r:.80}") from None


def step_logits(values: Any, name: str = "step_fn") -> np.ndarray:
    """What a step function (the argument `name`) returned, as float32 logits of one or more
    dimensions (callers check the shape): any real dtype, torch tensors as they come; text,
    complex numbers, scalars and ragged rows refused."""
    arr = as_numpy(values, f"{name}'s logits")
    if arr.dtype.kind not in "fiu":
        got = f"an array of dtype {arr.dtype}" if isinstance(values, np.ndarray) else f"{values!r:.80}"
        raise TypeError(f"{name} must return an array of real-valued logits, got {got}")
    if arr.ndim == 0:  # ascontiguousarray would make it a vocabulary of one token
        raise ValueError(f"{name} must return an array of logits, got the scalar {values!r:.80}")
    return _float32(arr, f"{name}'s logits")


def as_token_ids(value: Any) -> np.ndarray | None:
    """value as a 1-D integer array (an empty sequence gives an empty int64 one), or None when it
    is not one: text, bytes, floats, nested or ragged sequences. Callers raise their own error."""
    if isinstance(value, (str, bytes)):
        return None
    try:
        arr = as_numpy(value, "value")
    except ValueError:
        return None
    if arr.ndim != 1:
        return None
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        return None
    if isinstance(value, (list, tuple)):
        # NumPy reads [1, True] as [1, 1]: only entries that read 0 or 1 can have been bools,
        # looked at one by one (a scan of every entry's type made a 32,000-id allowed list 4 x slower)
        odd = np.flatnonzero(arr <= 1)
        if odd.size > 64:
            if not {bool, np.bool_}.isdisjoint(map(type, value)):
                return None
        elif any(isinstance(value[i], (bool, np.bool_)) for i in odd.tolist()):
            return None
    return arr


def token_id_list(value: Any, name: str) -> list[int]:
    """Token ids given as an int or a collection of ints (stop and EOS ids, ids to decode; None:
    none), as a list of Python ints. Text, bytes, mappings, bools and floats are refused, naming
    `name` (int() would read floats, digits and bytes as other tokens)."""
    if value is None:
        return []
    items = [value] if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value
    if isinstance(items, (str, bytes, Mapping)) or not hasattr(items, "__iter__"):
        raise TypeError(f"{name} must be an int or a list of ints, got {value!r:.80}")
    items = list(items)
    for t in items:
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise TypeError(f"{name} must be an int or a list of ints, got {value!r:.80}")
    return [int(t) for t in items]


def _as_logits(logits: Any, name: str = "logits") -> tuple[np.ndarray, bool]:
    """A C-contiguous float32 (B, V) view or copy of any real dtype (the C core computes in
    float32), and whether the input was 1-D."""
    arr = as_numpy(logits, name)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real floating-point array, got dtype {arr.dtype}")
    if arr.ndim not in (1, 2):
        raise ValueError(f"{name} must have shape (V,) or (B, V), got {arr.ndim} dimension(s) {arr.shape}")
    if arr.shape[-1] == 0:
        raise ValueError(f"{name} has an empty vocabulary (V == 0)")
    one_row = arr.ndim == 1
    arr = _float32(arr, name)  # before the reshape, so that an error names the caller's index
    return (arr.reshape(1, -1) if one_row else arr), one_row


def _float32(arr: np.ndarray, name: str) -> np.ndarray:
    """arr as C-contiguous float32, the core's precision. A finite value past float32's range
    is a ValueError naming it: the cast would make it +-inf, an error for +inf that blames the
    input's value and a silent mask for -inf. Only wider floats can overflow (np.errstate
    costs more than a float32 row's whole cast)."""
    if arr.dtype.kind != "f" or arr.dtype.itemsize <= 4:
        return np.ascontiguousarray(arr, dtype=np.float32)
    try:
        with np.errstate(over="raise"):
            return np.ascontiguousarray(arr, dtype=np.float32)
    except FloatingPointError:
        with np.errstate(over="ignore"):
            outside = np.isfinite(arr) & ~np.isfinite(arr.astype(np.float32))
        at = tuple(int(i[0]) for i in np.nonzero(outside))
        raise ValueError(f"{name}[{', '.join(map(str, at))}] (={arr[at]!s}) is outside the float32 range "
                         "(|x| <= 3.4028235e+38) that logits are computed in") from None


def _check_u64(name: str, value: Any) -> int:
    if type(value) is int and 0 <= value < _UINT64_LIMIT:  # the common case, without ABC checks
        return value
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]  # a 0-d array is a scalar
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if not 0 <= int(value) < _UINT64_LIMIT:
        raise ValueError(f"{name} (={value}) must be in [0, 2**64)")
    return int(value)


def _counter(name: str, value: Any, n_rows: int) -> tuple[int, np.ndarray | None]:
    """A step or stream: one int for all rows, or one per row."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]  # a 0-d array is a scalar, which has no len()
    if isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, (str, bytes)):
        if len(value) != n_rows:
            raise ValueError(f"{name} has {len(value)} values but logits has {n_rows} rows")
        return 0, np.array([_check_u64(f"{name}[{i}]", v) for i, v in enumerate(value)], dtype=np.uint64)
    return _check_u64(name, value), None


def _seeds(seed: Any, n_rows: int) -> np.ndarray:
    if type(seed) is int and 0 <= seed < _UINT64_LIMIT:
        return np.full(n_rows, seed, dtype=np.uint64)
    if seed is None:
        return np.frombuffer(os.urandom(8 * max(n_rows, 1)), dtype=np.uint64)[:n_rows].copy()
    if isinstance(seed, np.ndarray) and seed.ndim == 0:
        seed = seed[()]  # a 0-d array is a scalar, which has no len()
    if isinstance(seed, numbers.Integral) and not isinstance(seed, (bool, np.bool_)):
        return np.full(n_rows, _check_u64("seed", seed), dtype=np.uint64)
    if isinstance(seed, (Sequence, np.ndarray)) and not isinstance(seed, (str, bytes)):
        if len(seed) != n_rows:
            raise ValueError(f"seed has {len(seed)} values but logits has {n_rows} rows")
        return np.array([_check_u64(f"seed[{i}]", s) for i, s in enumerate(seed)], dtype=np.uint64)
    raise TypeError(f"seed must be None, an int or one int per row, got {seed!r}")


def _run(logits: Any, params: SamplingParams, row_inputs: dict[str, Any], *, seeds: np.ndarray | None, want_logprobs: bool, want_tokens: bool, step: Any = 0, stream: Any = 0):
    rows, one_row = _as_logits(logits)
    n_rows = rows.shape[0]
    args = params._core_arguments(n_rows, rows.shape[1], row_inputs)
    if seeds is not None:
        args["seeds"] = seeds
    step, args["steps"] = _counter("step", step, n_rows)
    stream, args["streams"] = _counter("stream", stream, n_rows)
    try:
        out = _core.sample_rows(rows, step=step, stream=stream, want_logprobs=want_logprobs, want_tokens=want_tokens, **args)
    except ValueError as exc:
        message = str(exc)
        if one_row and message.startswith("row 0: "):
            message = message[len("row 0: ") :]
        raise ValueError(message) from None
    return out, one_row


# ----------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------


def process_logits(logits: Any, params: SamplingParams | None = None, /, **keywords: Any) -> np.ndarray:
    """Log-probabilities (float32, same shape as logits) of the processed distribution.

    Takes the keywords of :class:`SamplingParams` (or one SamplingParams). Tokens
    removed by a mask, a ban or a truncation get ``-inf``; with ``temperature=0``
    the distribution is one-hot at the greedy token.
    """
    p, row_inputs = _params_for(params, keywords)
    (logprobs, _, _), one_row = _run(logits, p, row_inputs, seeds=None, step=0, want_logprobs=True, want_tokens=False)
    return logprobs[0] if one_row else logprobs


def sample(
    logits: Any,
    params: SamplingParams | None = None,
    /,
    *,
    seed: Any = None,
    step: int = 0,
    stream: int = 0,
    return_logprobs: bool = False,
    **keywords: Any,
):
    """Draws one token per row from the processed distribution.

    Returns int64 token ids, shape (B,) for (B, V) logits or a scalar for (V,)
    logits; with ``return_logprobs=True`` also the chosen tokens' float32
    log-probabilities under the processed distribution. ``seed`` is None (fresh
    randomness), an int shared by all rows, or one int per row; rows with the
    same seed, step and logits draw the same token. Row ``r``'s coin is
    ``rng_uniform(seed[r], stream[r], step[r])``; ``step`` and ``stream`` are
    ints shared by all rows or one per row (``generate()`` gives its k-th
    sequence stream k and draws its t-th token at step t).
    """
    p, row_inputs = _params_for(params, keywords)
    logits = as_numpy(logits, "logits")
    rows = logits.shape[0] if logits.ndim == 2 else 1
    (_, tokens, token_logprobs), one_row = _run(logits, p, row_inputs, seeds=_seeds(seed, rows), step=step, stream=stream, want_logprobs=False, want_tokens=True)
    if one_row:
        tokens, token_logprobs = tokens[0], token_logprobs[0]
    return (tokens, token_logprobs) if return_logprobs else tokens


_GREEDY = SamplingParams(temperature=0.0)


def greedy(logits: Any):
    """The argmax of each row (lowest index on ties), int64; a scalar for (V,) logits."""
    (_, tokens, _), one_row = _run(logits, _GREEDY, {}, seeds=None, step=0, want_logprobs=False, want_tokens=True)
    return tokens[0] if one_row else tokens


def log_softmax(logits: Any, temperature: float = 1.0) -> np.ndarray:
    """log softmax(logits / temperature) along the last axis, float32, same shape; temperature
    is a number > 0 or one per row."""
    # process_logits makes a 0 row one-hot (greedy), not a softmax; per row too
    if type(temperature) is float or type(temperature) is int:  # the common case, cheaply
        if temperature == 0:
            raise ValueError(f"temperature (={temperature}) must be > 0 for log_softmax")
    else:
        values = _param_values("temperature", temperature)
        zero = np.flatnonzero(values.reshape(-1) == 0)
        if zero.size:
            where = "" if values.ndim == 0 else f"[{zero[0]}]"
            shown = temperature if values.ndim == 0 else as_numpy(temperature, "temperature")[zero[0]]
            raise ValueError(f"temperature{where} (={shown}) must be > 0 for log_softmax")
    return process_logits(logits, temperature=temperature)
