"""Beam search over any model: lmdecode models or a step function.

``beam_search(step_fn, prompt, ...)`` reproduces Hugging Face transformers'
``generate(num_beams=..., do_sample=False)``: hypotheses are ranked by
``sum of log-probabilities / L ** length_penalty`` with ``L`` the number of
generated tokens including the EOS, and ``early_stopping`` is True, False or
``"never"`` with transformers' meaning. The search itself runs in C
(``_core.BeamSearch``); this module only feeds it logits.
"""
from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _core
from .chat import is_conversation
from .generation import ReplyText, _prompts, check_count, check_prompt_ids, short_token_list
from .sampling import allowed_token_ids, check_constraint_function, step_logits, token_id_list

__all__ = ["Hypothesis", "beam_search"]

_EARLY_STOPPING = {False: 0, True: 1, "never": 2}


@dataclass(frozen=True)
class Hypothesis:
    """One finished beam: its new tokens (EOS included when it ended on one)."""

    tokens: list[int]
    logprob: float  # sum of the tokens' log-probabilities
    score: float  # logprob / len(tokens) ** length_penalty, the ranking key
    token_logprobs: list[float]
    text: str | None = None
    finish_reason: str = "length"  # "stop": it ends with an EOS token

    def __repr__(self) -> str:  # one line: not every token and log-probability
        return (f"Hypothesis(score={self.score:.4f}, logprob={self.logprob:.4f}, text={self.text!r}, "
                f"tokens={short_token_list(self.tokens)})")


def _finish_reason(tokens: Sequence[int], eos: Any) -> str:
    """"stop" for a hypothesis that ends with an EOS token, "length" for one the length limit ended."""
    return "stop" if len(tokens) and int(tokens[-1]) in eos else "length"


def _processor_context(prompt_ids: Sequence[int], vocab: int) -> np.ndarray:
    """The prompt as the search's processors read it (int32): ids outside the vocabulary
    (which the step function path allows) become -1, which they skip."""
    ids = np.asarray(prompt_ids, dtype=np.int64)
    return np.where((ids >= 0) & (ids < vocab), ids, -1).astype(np.int32)


def beam_search(
    model_or_step_fn: Any,
    prompt: Any,
    *,
    beam_width: int = 4,
    max_new_tokens: int = 64,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int = 1,
    eos_token_id: int | Sequence[int] | None = None,
    prefix_allowed_tokens_fn: Callable[[int, np.ndarray], Any] | None = None,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    min_new_tokens: int = 0,
    batched: bool = False,
) -> list[Hypothesis] | list[list[Hypothesis]]:
    """Beam search over an lmdecode Model or ``step_fn(tokens: int64 array) -> (V,) logits``.

    Returns up to ``num_return_sequences`` finished hypotheses, best first. On a
    Model the whole search runs in C, all beams in one batched forward per step,
    beams sharing their common prefix's KV cache; ``prompt`` may then be text
    (or a conversation) and ``eos_token_id`` defaults to the model's EOS. A step
    function is called once per distinct beam per step (all beams hold the
    prompt at the first).

    ``prompt`` may also be a list of prompts: one search each, returned as one
    list of hypotheses per prompt, each what that prompt gives alone. On a Model
    the searches run together, every step one forward over all their beams (a
    search that is done drops out); a step function runs them one after another.

    ``prefix_allowed_tokens_fn(batch_id, input_ids)`` constrains the search as in
    transformers: before every step it is called for each beam with ``batch_id`` the
    prompt's index in the batch (0 for a single prompt) and the beam's tokens (prompt +
    generated, int64), and returns the ids it may take next (None: any). The other tokens'
    log-probabilities become -inf after the log-softmax (the allowed ones keep theirs, as
    transformers' beam search applies its logits processors).

    ``repetition_penalty``, ``no_repeat_ngram_size`` and ``min_new_tokens`` are transformers'
    processors of those names, applied as its beam search applies them: to each beam's
    log-probs after the log-softmax, without renormalizing, in the order repetition penalty
    (over the prompt and the beam's tokens: a log-prob, being negative, is multiplied by the
    penalty), n-gram bans, the EOS ban before ``min_new_tokens`` tokens, then
    ``prefix_allowed_tokens_fn``. The hypotheses' log-probs (and so their scores) are these
    processed values, as transformers sums them.

    ``batched=True`` (step functions): ``step_fn(sequences: list of int64 arrays) -> (len, V)
    logits`` is called once per step with the distinct beams it has not seen.
    """
    beam_width = check_count("beam_width", beam_width, 1)
    max_new_tokens = check_count("max_new_tokens", max_new_tokens, 1)
    num_return_sequences = check_count("num_return_sequences", num_return_sequences, 1)
    if num_return_sequences > beam_width:
        raise ValueError(f"num_return_sequences (={num_return_sequences}) must be <= beam_width (={beam_width})")
    if not (early_stopping is True or early_stopping is False or early_stopping == "never"):
        raise ValueError(f"early_stopping (={early_stopping!r}) must be True, False or 'never'")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, numbers.Real) or not np.isfinite(length_penalty):
        raise ValueError(f"length_penalty (={length_penalty!r}) must be a finite number")
    if prefix_allowed_tokens_fn is not None:
        check_constraint_function(prefix_allowed_tokens_fn)
    if (isinstance(repetition_penalty, bool) or not isinstance(repetition_penalty, numbers.Real)
            or not (0 < repetition_penalty < float("inf"))):
        raise ValueError(f"repetition_penalty (={repetition_penalty!r}) must be a finite number > 0")
    processors = dict(repetition_penalty=float(repetition_penalty),
                      no_repeat_ngram_size=check_count("no_repeat_ngram_size", no_repeat_ngram_size, 0),
                      min_new_tokens=check_count("min_new_tokens", min_new_tokens, 0))
    model = model_or_step_fn if hasattr(model_or_step_fn, "_beam_search_in_c") else None
    if batched and model is not None:
        raise ValueError("batched=True is for step functions: an lmdecode Model already runs its beams together")
    if model is not None:
        prompts, single = _prompts(prompt, model.tokenizer)
        results = _beam_search_model(model, prompts, beam_width, max_new_tokens, float(length_penalty), early_stopping,
                                     num_return_sequences, eos_token_id, prefix_allowed_tokens_fn, processors)
        return results[0] if single else results
    if not callable(model_or_step_fn):
        raise TypeError(f"model_or_step_fn must be an lmdecode Model or a callable, got {type(model_or_step_fn).__name__}")
    if isinstance(prompt, str) or is_conversation(prompt):
        raise TypeError("beam search over a step function takes token ids: it has no tokenizer for text")
    prompts, single = _prompts(prompt, None)
    results = [_beam_search_step_fn(model_or_step_fn, ids, batch_id, beam_width, max_new_tokens, float(length_penalty),
                                    early_stopping, num_return_sequences, eos_token_id, prefix_allowed_tokens_fn,
                                    processors, batched)
               for batch_id, ids in enumerate(prompts)]
    return results[0] if single else results


def _beam_search_step_fn(step_fn: Callable[[np.ndarray], Any], prompt_ids: list[int], batch_id: int, beam_width: int,
                         max_new_tokens: int, length_penalty: float, early_stopping: bool | str,
                         num_return_sequences: int, eos_token_id: Any,
                         prefix_allowed_tokens_fn: Callable[[int, np.ndarray], Any] | None,
                         processors: dict[str, Any], batched: bool) -> list[Hypothesis]:
    """One search over a step function, asking it once per distinct beam per step (batched:
    once per step, for all the distinct beams it has not seen)."""

    cache: dict[tuple[int, ...], np.ndarray] = {}

    def rows_of(seqs: list[tuple[int, ...]]) -> list[np.ndarray]:
        missing = [seq for seq in dict.fromkeys(seqs) if seq not in cache]
        inputs = [np.array(prompt_ids + list(seq), dtype=np.int64) for seq in missing]
        if batched:
            rows = step_logits(step_fn(inputs)) if missing else np.zeros((0, 0), np.float32)
            if rows.ndim != 2 or rows.shape[0] != len(missing):
                raise ValueError(f"a batched step_fn must return ({len(missing)}, V) logits for {len(missing)} "
                                 f"sequences, got shape {rows.shape}")
        else:
            # copies: a step function may hand back one buffer it refills on every call (a view
            # of llama.cpp's logits, say), and the rows of all the step's beams are kept together
            rows = [np.array(step_logits(step_fn(tokens)), dtype=np.float32) for tokens in inputs]
            for row in rows:
                if row.ndim != 1:
                    raise ValueError(f"step_fn must return a 1-D array of logits, got shape {row.shape}")
        cache.update(zip(missing, rows))
        return [cache[seq] for seq in seqs]

    # prompt ids are not checked against the vocabulary: they are step_fn's business and the
    # search never indexes logits by them (the seeds' example passes a marker id outside it)
    (first,) = rows_of([()])
    vocab = first.shape[0]
    search = _core.BeamSearch(
        beam_width, vocab, max_new_tokens, num_return_sequences, float(length_penalty),
        _EARLY_STOPPING[early_stopping], token_id_list(eos_token_id, "eos_token_id"), dynamic_allowed=prefix_allowed_tokens_fn is not None,
        prompt=_processor_context(prompt_ids, vocab), **processors,
    )
    beams: list[tuple[int, ...]] = [()] * beam_width
    while not search.done:
        rows = rows_of(beams)
        if any(r.shape != first.shape for r in rows):
            raise ValueError("step_fn returned logits of different lengths")
        if prefix_allowed_tokens_fn is not None:
            for b, seq in enumerate(beams):
                input_ids = np.array(prompt_ids + list(seq), dtype=np.int64)
                search.set_allowed(b, allowed_token_ids(prefix_allowed_tokens_fn(batch_id, input_ids), vocab, 0))
        parents, tokens = search.step(np.stack(rows))
        beams = [beams[p] + (int(t),) for p, t in zip(parents, tokens)]
        live = set(beams)
        cache = {k: v for k, v in cache.items() if k in live}
    eos = set(token_id_list(eos_token_id, "eos_token_id"))
    return [
        Hypothesis(tokens=[int(t) for t in toks], logprob=float(logprob), score=float(score),
                   token_logprobs=[float(x) for x in lps], finish_reason=_finish_reason(toks, eos))
        for toks, lps, score, logprob in search.hypotheses()
    ]


def _beam_search_model(model: Any, prompts: list[list[int]], beam_width: int, max_new_tokens: int,
                       length_penalty: float, early_stopping: bool | str, num_return_sequences: int,
                       eos_token_id: Any,
                       prefix_allowed_tokens_fn: Callable[[int, np.ndarray], Any] | None,
                       processors: dict[str, Any]) -> list[list[Hypothesis]]:
    """The searches of the prompts, together in C; the hypotheses of each."""
    model._check_prompt_lengths(prompts)
    vocab = model.config.vocab_size
    check_prompt_ids(np.concatenate([np.asarray(ids, dtype=np.int64) for ids in prompts]),
                     np.cumsum([0] + [len(ids) for ids in prompts]), vocab)
    for i, ids in enumerate(prompts):
        if len(ids) + max_new_tokens > model.config.context_length:
            raise ValueError(f"prompt {i} ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceed the context "
                             f"length {model.config.context_length}")
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_id
    eos = token_id_list(eos_token_id, "eos_token_id")
    searches = [_core.BeamSearch(beam_width, vocab, max_new_tokens, num_return_sequences, length_penalty,
                                 _EARLY_STOPPING[early_stopping], eos, dynamic_allowed=prefix_allowed_tokens_fn is not None,
                                 prompt=_processor_context(ids, vocab), **processors)
                for ids in prompts]
    constraint = None
    if prefix_allowed_tokens_fn is not None:
        prompt_arrays = [np.asarray(ids, dtype=np.int64) for ids in prompts]

        def constraint(search: int, beam: int, generated: np.ndarray) -> np.ndarray | None:
            input_ids = np.concatenate([prompt_arrays[search], generated])
            return allowed_token_ids(prefix_allowed_tokens_fn(search, input_ids), vocab, 0)

    model._beam_search_in_c(searches, prompts, beam_width, max_new_tokens, constraint)
    reply_text = ReplyText(model.tokenizer) if model.tokenizer is not None else None
    results = []
    for search, prompt_ids in zip(searches, prompts):
        hyps = []
        for toks, lps, score, logprob in search.hypotheses():
            tokens = [int(t) for t in toks]
            text = None
            if reply_text is not None:  # what the hypothesis adds to its prompt's text, as generate's .text
                visible = tokens[:-1] if tokens and tokens[-1] in eos else tokens
                text = reply_text.bytes(prompt_ids, visible).decode("utf-8", "replace")
            hyps.append(Hypothesis(tokens=tokens, logprob=float(logprob), score=float(score),
                                   token_logprobs=[float(x) for x in lps], text=text,
                                   finish_reason=_finish_reason(tokens, eos)))
        results.append(hyps)
    return results
