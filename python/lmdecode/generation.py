"""generate(): the sampling loop over lmdecode models or any step function.

The loop's state machine (stops, budgets, seeds, log-probs) is C
(``_core.Generator``, see csrc/generate.h); lmdecode models run the whole loop
in C, a step function is called from here once per running sequence per step.

Sequence ``k`` (prompts in order, ``n`` samples each) draws its token at step
``t`` with the coin ``rng_uniform(seed, k, t)``, so
``ld.sample(logits, seed=seed, stream=k, step=t, context=..., prompt_len=...,
**sampling)`` on the same logits reproduces it. Reported log-probabilities
(``token_logprobs``, ``top_logprobs``) are those of the model's own
distribution (log-softmax of the raw logits), as vLLM reports by default; the
sampling chain only decides which token is drawn.
"""
from __future__ import annotations

import codecs
import numbers
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from . import _core
from .chat import is_conversation
from .contrastive import _check_parameters as _check_contrastive
from .contrastive import contrastive_logits
from .sampling import (KEYWORDS, _check_u64, _params_for, _row_input_arguments, allowed_token_ids,
                       as_token_ids, check_constraint_function, step_logits, token_id_list)
from .tokenizer import DocumentStart

__all__ = ["Generation", "GenerationChunk", "generate"]

_ALL_STEPS = 2**31 - 1


class TokenizerLike(Protocol):
    """What generate() needs of a tokenizer of your own (``tokenizer=``): ``encode`` for text
    prompts and ``token_bytes`` for the text of each id (``.text``, stream chunks and stop
    strings are the new tokens' bytes read as UTF-8). Optional: ``vocab_size`` (ids at or past
    it have no text) and ``strips_leading_space_after_bos`` (True: after a prompt of BOS alone,
    the reply's first piece with text loses its leading space, as a sentencepiece-style
    decoder drops the space before a document's first word)."""

    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_bytes(self, token: int) -> bytes: ...


@dataclass
class Generation:
    """One generated sequence."""

    tokens: list[int]  # the new tokens, a final stop token included
    text: str | None  # their text without a final stop token or stop string (None without a tokenizer)
    token_logprobs: list[float]  # model log-prob of each new token
    top_logprobs: list[dict[int, float]]  # the `logprobs` most likely tokens per step
    finish_reason: str  # "stop" (stop token or string) or "length"
    prompt_tokens: list[int]
    # speculative decoding (draft_model=...): draft tokens proposed and kept; None otherwise
    draft_tokens_proposed: int | None = None
    draft_tokens_accepted: int | None = None
    # cache_prompt=True: prompt tokens whose keys and values came from the model's prompt cache
    cached_prompt_tokens: int | None = None

    def __repr__(self) -> str:  # one line: not every token and log-probability
        return f"Generation(text={self.text!r}, tokens={short_token_list(self.tokens)}, finish_reason={self.finish_reason!r})"


def short_token_list(tokens: Sequence[int], shown: int = 8) -> str:
    """A repr of token ids that stays one line: the first `shown` and how many more."""
    if len(tokens) <= shown + 2:
        return repr(list(tokens))
    return f"[{', '.join(str(t) for t in tokens[:shown])}, ... {len(tokens) - shown} more]"


@dataclass(frozen=True)
class GenerationChunk:
    """What stream=True yields: one new token of sequence `index` and its new text.

    The chunks of a sequence concatenate to its final ``.text``; its last chunk carries
    ``finish_reason``, as the last entry of ``Generation.token_logprobs`` etc. does."""

    index: int
    token: int
    text: str
    logprob: float = 0.0  # the model's log-prob of token (as Generation.token_logprobs)
    top_logprobs: dict[int, float] = field(default_factory=dict, repr=False)  # the `logprobs` best tokens
    finish_reason: str | None = None  # "stop" or "length" on the sequence's last chunk, else None


# ----------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------


def check_count(name: str, value: Any, low: int) -> int:
    """A count keyword (max_new_tokens, beam_width, ...): an int in [low, 2**31 - 1], the C
    core's int32 (a larger one was an OverflowError naming nothing)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{name} (={value}) must be >= {low}")
    if value > _ALL_STEPS:
        raise ValueError(f"{name} (={value}) must be <= {_ALL_STEPS}")
    return int(value)


def _check_same_vocabulary(name: str, second: Any, model: Any, role: str) -> None:
    """A second model (a draft or an amateur) must sample the tokens the first one does."""
    if second.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"{name}'s vocabulary ({second.config.vocab_size} tokens) differs from "
                         f"the {role}'s ({model.config.vocab_size})")


def _prompts(prompt: Any, tokenizer: TokenizerLike | None) -> tuple[list[list[int]], bool]:
    """Token-id prompts and whether a single prompt was given."""

    def one(p: Any) -> list[int]:
        if isinstance(p, str):
            if tokenizer is None:
                raise TypeError("a text prompt needs a model with a tokenizer (or tokenizer=...)")
            return list(tokenizer.encode(p, add_bos=True))
        if is_conversation(p):
            if tokenizer is None or not hasattr(tokenizer, "apply_chat_template"):
                raise TypeError("a conversation prompt needs a tokenizer with a chat template")
            return list(tokenizer.apply_chat_template(p, add_generation_prompt=True))
        arr = as_token_ids(p)
        if arr is None:
            if isinstance(p, Sequence) and p and all(isinstance(t, numbers.Integral) and not isinstance(t, bool)
                                                     for t in p):  # ints NumPy holds in no integer type
                raise ValueError(f"a prompt holds token id {max(p, key=abs)}, outside any vocabulary")
            raise TypeError(f"a prompt must be a str or a sequence of token ids, got {p!r:.80}")
        if arr.dtype == np.uint64 and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
            raise ValueError(f"a prompt holds token id {int(arr.max())}, outside any vocabulary")
        return [int(t) for t in arr]

    if isinstance(prompt, str) or (isinstance(prompt, np.ndarray) and prompt.ndim == 1) or is_conversation(prompt):
        return [one(prompt)], True
    if isinstance(prompt, Sequence) and len(prompt) and all(isinstance(p, numbers.Integral) for p in prompt):
        return [one(prompt)], True
    if isinstance(prompt, (Sequence, np.ndarray)) and len(prompt):
        return [one(p) for p in prompt], False
    raise TypeError(f"prompt must be a str, a sequence of token ids, a conversation (a list of message dicts), "
                    f"or a non-empty list of those, got {prompt!r:.80}")


def check_prompt_ids(prompt_ids: np.ndarray, offsets: np.ndarray, vocab: int, names: Sequence[str] | None = None) -> None:
    """Every token of the prompts (prompt i: prompt_ids[offsets[i]:offsets[i + 1]]) is in
    [0, vocab); else a ValueError naming the prompt ("prompt i", or names[i]), the position and
    the id."""
    bad = np.flatnonzero((prompt_ids < 0) | (prompt_ids >= vocab))
    if bad.size:
        at = int(bad[0])
        i = int(np.searchsorted(offsets, at, side="right")) - 1
        name = names[i] if names is not None else f"prompt {i}"
        raise ValueError(f"{name} holds token id {int(prompt_ids[at])} at position {at - int(offsets[i])}, "
                         f"outside the vocabulary [0, {vocab})")


def _stop_ids(stop_token_ids: Any, default_eos: int | Sequence[int] | None, vocab: int) -> np.ndarray:
    """The ids that end a sequence: stop_token_ids and the default EOS, which may be one id or
    several (ModelConfig.eos_token_id of a Llama 3 checkpoint: each of them stops)."""
    given = token_id_list(stop_token_ids, "stop_token_ids")
    for token in given:
        if not 0 <= token < vocab:
            raise ValueError(f"stop_token_ids holds token id {token}, outside the vocabulary [0, {vocab})")
    ids = token_id_list(default_eos, "the model's eos_token_id") + given
    return np.array(sorted(set(ids)), dtype=np.int32)


def _stop_strings(stop: Any) -> list[str]:
    if stop is None:
        return []
    if not isinstance(stop, str) and not hasattr(stop, "__iter__"):
        raise TypeError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    strings = [stop] if isinstance(stop, str) else list(stop)
    for s in strings:
        if not isinstance(s, str):
            raise TypeError(f"stop must be a non-empty string or a list of them, got {stop!r:.80}")
        if not s:
            raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r:.80}")
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"stop string {s!r:.80} is not valid Unicode: {s[e.start]!r} at index {e.start} "
                             "is a lone surrogate") from None
    return strings


def _text_vocabulary(tokenizer: TokenizerLike) -> int | None:
    """How many ids the tokenizer has text for (None: not said): a model's vocabulary may be
    padded past its tokenizer's (Qwen2.5: 151,936 rows for 151,665 ids)."""
    size = getattr(tokenizer, "vocab_size", None)
    return size if isinstance(size, int) and not isinstance(size, bool) else None


class ReplyText:
    """The bytes that tokens add to a prompt's text, as a generation's ``.text``, its stream's
    chunks and its stop strings (csrc/generate.c) all read them: each token's bytes
    (``token_bytes``; none for ids past the tokenizer's vocabulary, a model's padding rows),
    and after a prompt of BOS and tokens without text, in a vocabulary that drops the space
    before a document's first word (``strips_leading_space_after_bos``), the first piece with
    text without its leading space, as ``decode(prompt + reply)`` reads."""

    def __init__(self, tokenizer: TokenizerLike) -> None:
        self._token_bytes = tokenizer.token_bytes
        self._n_text = _text_vocabulary(tokenizer)
        bos = getattr(tokenizer, "bos_id", None)
        strips = getattr(tokenizer, "strips_leading_space_after_bos", False)
        strips = bool(strips) if isinstance(strips, (bool, np.bool_)) else False
        self.bos_id = bos if strips and isinstance(bos, int) and not isinstance(bos, bool) else None

    def piece(self, token: int) -> bytes:
        if self._n_text is not None and not 0 <= token < self._n_text:
            return b""
        return self._token_bytes(token)

    def starts_document(self, prompt: Sequence[int]) -> bool:
        return (self.bos_id is not None and len(prompt) > 0 and prompt[0] == self.bos_id
                and not any(self.piece(t) for t in prompt))

    def pieces(self, prompt: Sequence[int]) -> Callable[[int], bytes]:
        """token -> its bytes, one new token after another, after prompt."""
        first_word = DocumentStart(self.starts_document(prompt))
        return lambda token: first_word(self.piece(token))

    def bytes(self, prompt: Sequence[int], tokens: Sequence[int]) -> bytes:
        """The bytes tokens add after prompt."""
        next_piece = self.pieces(prompt)
        return b"".join(next_piece(t) for t in tokens)


def _token_byte_table(tokenizer: TokenizerLike, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR bytes of every token (cached on the tokenizer object); ids past the tokenizer's
    vocabulary have none."""
    cached = getattr(tokenizer, "_lmdecode_byte_table", None)
    if cached is not None and cached[1].shape[0] == vocab + 1:
        return cached
    n_text = _text_vocabulary(tokenizer)
    pieces = [tokenizer.token_bytes(i) if n_text is None or i < n_text else b"" for i in range(vocab)]
    offsets = np.zeros(vocab + 1, dtype=np.int64)
    np.cumsum([len(p) for p in pieces], out=offsets[1:])
    table = (np.frombuffer(b"".join(pieces), dtype=np.uint8).copy(), offsets)
    try:
        tokenizer._lmdecode_byte_table = table  # type: ignore[attr-defined]
    except AttributeError:
        pass
    return table


# ----------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------


class _Run:
    """One generate() call: the C generator plus what is needed to read it back."""

    def __init__(self, vocab: int, prompts: list[list[int]], n: int, *, max_new_tokens: int, min_new_tokens: int, seed: Any,
                 stop_ids: np.ndarray, stop: list[str], logprobs: int, tokenizer: TokenizerLike | None, sampling: dict[str, Any],
                 dynamic_allowed: bool = False) -> None:
        for name in ("context", "prompt_len"):
            if name in sampling:
                raise TypeError(f"generate() manages {name} itself; do not pass it")
        unknown = set(sampling) - set(KEYWORDS)
        if unknown:
            raise TypeError(f"unknown keyword(s): {', '.join(sorted(unknown))}")
        self.tokenizer = tokenizer
        self.speculative = None  # the C speculative loop, whose counts the results report
        self.batched = False  # step functions take every running sequence in one call (generate(batched=))
        self.cached_prompt_tokens: int | None = None  # cache_prompt=True: prompt tokens reused
        self.stop = stop
        self.stop_ids = set(int(t) for t in stop_ids)
        self.n_seqs = len(prompts) * n
        self.prompts = [p for p in prompts for _ in range(n)]
        params, row_inputs = _params_for(None, dict(sampling))
        if params._rows is not None and params._rows != self.n_seqs:
            raise ValueError(f"{params._per_row_keyword()} has {params._rows} values: "
                             f"per-row sampling values need one per sequence ({self.n_seqs})")
        offsets = np.zeros(self.n_seqs + 1, dtype=np.int64)
        np.cumsum([len(p) for p in self.prompts], out=offsets[1:])
        kwargs = _row_input_arguments(row_inputs, self.n_seqs, vocab) if row_inputs else {}
        if stop:
            if tokenizer is None:
                raise TypeError("stop strings need a tokenizer")
            token_bytes, token_offsets = _token_byte_table(tokenizer, vocab)
            encoded = [s.encode("utf-8") for s in stop]
            stop_offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
            np.cumsum([len(b) for b in encoded], out=stop_offsets[1:])
            kwargs.update(stop_bytes=np.frombuffer(b"".join(encoded), dtype=np.uint8), stop_offsets=stop_offsets,
                          token_bytes=token_bytes, token_offsets=token_offsets)
        self.reply_text = ReplyText(tokenizer) if tokenizer is not None else None
        # sentencepiece-style vocabularies: a BOS-only prompt's reply reads "Once", not " Once"
        # (its text is what decode(prompt + reply) adds to decode(prompt)); the C side matches
        # stop strings against the same bytes
        if stop and self.reply_text.bos_id is not None and 0 <= self.reply_text.bos_id < vocab:
            kwargs["strip_space_bos"] = self.reply_text.bos_id
        seed = int.from_bytes(os.urandom(8), "little") if seed is None else _check_u64("seed", seed)
        prompt_ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in self.prompts]) if offsets[-1] else np.zeros(0, np.int64)
        check_prompt_ids(prompt_ids, offsets, vocab)
        self.gen = _core.Generator(
            vocab, params._table, int(seed), prompt_ids.astype(np.int32), offsets,
            max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, stop_ids=stop_ids, n_top_logprobs=logprobs,
            dynamic_allowed=dynamic_allowed, **kwargs,
        )

    def result(self, k: int) -> Generation:
        tokens, prompt_len, lps, top_ids, top_lps, reason, stop_offset = self.gen.result(k)
        proposed, accepted = self.speculative.counts(k) if self.speculative is not None else (None, None)
        new = [int(t) for t in tokens[prompt_len:]]
        text = None
        if self.reply_text is not None:
            if reason == "stop" and stop_offset >= 0:  # the text ends where the stop string that fired begins
                data = self.reply_text.bytes(self.prompts[k], new)[:stop_offset]
            else:
                visible = new[:-1] if (new and new[-1] in self.stop_ids and reason == "stop") else new
                data = self.reply_text.bytes(self.prompts[k], visible)
            text = data.decode("utf-8", "replace")
        top = [{int(i): float(v) for i, v in zip(ids, vals)} for ids, vals in zip(top_ids, top_lps)]
        return Generation(tokens=new, text=text, token_logprobs=[float(x) for x in lps], top_logprobs=top,
                          finish_reason=reason or "length", prompt_tokens=[int(t) for t in tokens[:prompt_len]],
                          draft_tokens_proposed=proposed, draft_tokens_accepted=accepted,
                          cached_prompt_tokens=self.cached_prompt_tokens)

    def chunk(self, k: int, i: int, token: int, text: str, reason: str | None) -> GenerationChunk:
        """The stream's chunk for sequence k's generated token i."""
        lp, top_ids, top_lps = self.gen.logprobs_at(k, i)
        top = {int(t): float(v) for t, v in zip(top_ids, top_lps)}
        return GenerationChunk(index=k, token=token, text=text, logprob=lp, top_logprobs=top, finish_reason=reason)


def _step_fn_logits(step_fn: Callable[[Any], Any], run: _Run, running: np.ndarray, vocab: int,
                    name: str = "step_fn") -> np.ndarray:
    """(len(running), vocab) float32 logits of the running sequences: one call of a batched
    step function, or one call per sequence. name: the argument step_fn came as, for errors."""
    if run.batched:
        rows = step_logits(step_fn([run.gen.tokens(int(k)) for k in running]), name)
        if rows.shape != (len(running), vocab):
            raise ValueError(f"a batched {name} must return ({len(running)}, {vocab}) logits for "
                             f"{len(running)} sequences, got shape {rows.shape}")
        return rows
    rows = np.empty((len(running), vocab), dtype=np.float32)
    for i, k in enumerate(running):
        tokens = run.gen.tokens(int(k))
        row = step_logits(step_fn(tokens), name)
        if row.shape != (vocab,):
            raise ValueError(f"{name} must return ({vocab},) logits, got shape {row.shape}")
        rows[i] = row
    return rows


def generate(
    model_or_step_fn: Any,
    prompt: Any,
    *,
    max_new_tokens: int = 128,
    seed: int | None = None,
    stop_token_ids: int | Sequence[int] | None = None,
    stop: str | Sequence[str] | None = None,
    min_new_tokens: int = 0,
    n: int = 1,
    stream: bool = False,
    logprobs: int = 0,
    tokenizer: TokenizerLike | None = None,
    draft_model: Any = None,
    num_draft_tokens: int = 4,
    amateur_model: Any = None,
    contrastive_alpha: float = 0.1,
    amateur_temperature: float = 1.0,
    prefix_allowed_tokens_fn: Callable[[int, np.ndarray], Any] | None = None,
    cache_prompt: bool = False,
    batched: bool = False,
    ignore_eos: bool = False,
    **sampling: Any,
):
    """Generates from an lmdecode model or ``step_fn(tokens: int64 array) -> (V,) logits``.

    ``prompt`` is a str (encoded with BOS), a sequence of token ids, a conversation
    (a list of ``{"role": ..., "content": ...}`` dicts, rendered with the tokenizer's chat
    template and the assistant's turn opened), or a list of those (a batch decoded
    together). ``**sampling`` takes the keywords of
    ``ld.sample`` (``temperature=0`` is greedy). Returns a :class:`Generation`
    for one prompt and ``n == 1``, a list of ``n`` for one prompt, and a list
    (one entry per prompt, each as above) for a batch. With ``stream=True`` it
    returns an iterator of :class:`GenerationChunk` instead: one per new token, with its
    text, its log-probabilities and, on a sequence's last chunk, the finish reason.

    ``draft_model`` (an lmdecode Model with the same vocabulary; the target must be one
    too) turns on speculative decoding: each round the draft proposes up to
    ``num_draft_tokens`` tokens, the target verifies them in one forward pass, and the
    rule of csrc/speculative.h keeps a prefix, so the tokens are distributed exactly as
    the target's own sampling would draw them (at ``temperature=0``: the target's greedy
    tokens, identical). With a seed, the tokens differ from a plain run's (the coins are
    used differently) but are reproducible. Each :class:`Generation` then reports
    ``draft_tokens_proposed`` and ``draft_tokens_accepted``.

    ``amateur_model`` (a model or step function over the same vocabulary, of the same kind
    as the expert ``model_or_step_fn``) turns on contrastive decoding (lmdecode.contrastive):
    each step draws from ``log p_EXP - log p_AMA`` over the tokens with ``p_EXP >=
    contrastive_alpha * max p_EXP`` (``p_AMA`` at ``amateur_temperature``) instead of the
    expert's logits; ``temperature=0`` takes their argmax, as the paper does. The reported
    log-probabilities stay the expert's.

    ``prefix_allowed_tokens_fn(batch_id, input_ids)`` constrains each step as transformers'
    argument of that name does: before every step it is called for each running sequence
    with its index (prompts in order, ``n`` samples each: ``batch_id = prompt * n + sample``)
    and its tokens so far (prompt + generated, an int64 array), and returns the token ids it
    may draw next (None: any). The other tokens are masked out first, so the distribution is
    renormalized over the allowed ones before the rest of the sampling chain. Not with
    ``draft_model`` or ``allowed_tokens``; the loop over a model then returns to Python
    once per step to call it.

    ``batched=True`` (step functions): ``step_fn(sequences: list of int64 arrays) -> (len, V)
    logits`` is called once per step with every running sequence (and the amateur likewise),
    so that a model of your own can run them as one batch; without it, once per sequence.

    ``ignore_eos=True`` (vLLM's option of that name): the model's EOS token does not end a
    sequence (nor is it banned before ``min_new_tokens``); it may be drawn like any token, and
    ``stop_token_ids`` still stop. llama.cpp's ``--ignore-eos`` bans EOS instead: pass
    ``banned_tokens`` for that.

    ``cache_prompt=True`` (one prompt, ``n=1``, an lmdecode model; llama.cpp's option of that
    name) keeps the sequence's keys and values in the model when the call ends, and a later
    ``cache_prompt`` call whose prompt starts with the same tokens (the next turn of a chat:
    the previous prompt, the reply, the new message) feeds only the rest.
    ``Generation.cached_prompt_tokens`` says how many prompt tokens were reused. The output is
    the same as without it, bit for bit. ``model.prompt_cache_slots`` (default 1) sets how many
    such sequences the model keeps, for conversations that take turns; ``model.clear_prompt_cache()``
    lets go of them.
    """
    max_new_tokens = check_count("max_new_tokens", max_new_tokens, 0)
    min_new_tokens = check_count("min_new_tokens", min_new_tokens, 0)
    n = check_count("n", n, 1)
    for name, flag in (("stream", stream), ("cache_prompt", cache_prompt), ("batched", batched),
                       ("ignore_eos", ignore_eos)):
        if not isinstance(flag, (bool, np.bool_)):  # "false" would be true
            raise TypeError(f"{name} must be True or False, got {flag!r:.80}")
    logprobs = check_count("logprobs", logprobs, 0)
    num_draft_tokens = check_count("num_draft_tokens", num_draft_tokens, 1)
    if num_draft_tokens > 64:
        raise ValueError(f"num_draft_tokens (={num_draft_tokens}) must be <= 64")
    model = model_or_step_fn if hasattr(model_or_step_fn, "_decoder") else None
    if amateur_model is not None:
        contrastive_alpha, amateur_temperature = _check_contrastive(contrastive_alpha, amateur_temperature)
        if draft_model is not None:
            raise ValueError("draft_model and amateur_model do not combine: choose speculative or contrastive decoding")
        if model is not None and not hasattr(amateur_model, "_decoder"):
            raise TypeError(f"amateur_model must be an lmdecode Model like the expert, got {type(amateur_model).__name__}")
        if model is None and not callable(amateur_model):
            raise TypeError(f"amateur_model must be a step function like the expert, got {type(amateur_model).__name__}")
        if model is not None:
            _check_same_vocabulary("amateur_model", amateur_model, model, "expert")
    if draft_model is not None:
        if model is None:
            raise TypeError("draft_model needs an lmdecode Model as the target (for external models, "
                            "verify drafts with ld.speculative_accept)")
        if not hasattr(draft_model, "_decoder"):
            raise TypeError(f"draft_model must be an lmdecode Model, got {type(draft_model).__name__}")
        _check_same_vocabulary("draft_model", draft_model, model, "target")
    if prefix_allowed_tokens_fn is not None:
        check_constraint_function(prefix_allowed_tokens_fn)
        if draft_model is not None:
            raise ValueError("prefix_allowed_tokens_fn does not combine with draft_model (the draft's proposals "
                             "would each need the function's answer)")
        if sampling.get("allowed_tokens") is not None:
            raise ValueError("give allowed_tokens or prefix_allowed_tokens_fn, not both")
    if cache_prompt:
        if model is None:
            raise TypeError("cache_prompt needs an lmdecode Model (its keys and values are what is kept)")
        if draft_model is not None or amateur_model is not None:
            raise ValueError("cache_prompt does not combine with draft_model or amateur_model")
    if model is None and not callable(model_or_step_fn):
        raise TypeError(f"model_or_step_fn must be an lmdecode Model or a callable, got {type(model_or_step_fn).__name__}")
    if batched and model is not None:
        raise ValueError("batched=True is for step functions: an lmdecode Model already runs its sequences together")
    if tokenizer is None and model is not None:
        tokenizer = model.tokenizer
    if tokenizer is not None and not callable(getattr(tokenizer, "token_bytes", None)):
        raise TypeError(f"tokenizer must have token_bytes(id) (and encode for text prompts), "
                        f"got {type(tokenizer).__name__}")
    prompts, single = _prompts(prompt, tokenizer)
    if cache_prompt and (len(prompts) != 1 or n != 1):
        raise ValueError("cache_prompt keeps one sequence's cache: give one prompt and n=1")
    if model is not None:
        model._check_prompt_lengths(prompts)
        vocab = model.config.vocab_size
        default_eos = model.config.eos_token_id
        if default_eos is None and tokenizer is not None:
            default_eos = getattr(tokenizer, "eos_id", None)
        if ignore_eos:
            default_eos = None
    else:  # learn V from the first prompt's logits
        first_prompt = np.asarray(prompts[0], dtype=np.int64)
        first = model_or_step_fn([first_prompt]) if batched else model_or_step_fn(first_prompt)
        shape = step_logits(first).shape
        if batched and (len(shape) != 2 or shape[0] != 1 or shape[1] < 1):
            raise ValueError(f"a batched step_fn must return (sequences, V) logits, got {type(first).__name__} "
                             f"of shape {shape} for one sequence")
        if not batched and (len(shape) != 1 or shape[0] < 1):
            raise ValueError(f"step_fn must return a 1-D array of logits, got {type(first).__name__} of shape {shape}")
        vocab = int(shape[-1])
        default_eos = None
    run = _Run(vocab, prompts, n, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, seed=seed,
               stop_ids=_stop_ids(stop_token_ids, default_eos, vocab), stop=_stop_strings(stop), logprobs=logprobs,
               tokenizer=tokenizer, sampling=sampling, dynamic_allowed=prefix_allowed_tokens_fn is not None)
    run.batched = batched

    finish: Callable[[bool], None] | None = None  # cache_prompt: gives the model's prompt cache back
    if model is not None and draft_model is not None:  # the whole speculative loop runs in C
        run.speculative = model._speculative_decoder(draft_model, run.gen, run.prompts, max_new_tokens, num_draft_tokens)

        def advance() -> tuple[np.ndarray, np.ndarray]:
            return run.speculative.rounds(1)

        if not stream:
            run.speculative.rounds(_ALL_STEPS)
    elif model is not None:  # the whole loop runs in C
        entry = model._take_prompt_cache(run.prompts[0]) if cache_prompt else None  # None: every slot busy
        if entry is not None:
            try:
                decoder, run.cached_prompt_tokens = model._cached_decoder(run.gen, run.prompts[0], entry)
            except BaseException:
                model._return_prompt_cache(entry, None)
                raise

            def finish(failed: bool) -> None:  # hands the cache back: it now holds this call's tokens
                model._return_prompt_cache(entry, None if failed else lambda: run.gen.tokens(0).tolist())
        else:
            decoder = model._decoder(run.gen, run.prompts, max_new_tokens, amateur=amateur_model, alpha=contrastive_alpha,
                                     amateur_temperature=amateur_temperature)
            if cache_prompt:
                run.cached_prompt_tokens = 0

        def advance() -> tuple[np.ndarray, np.ndarray]:
            return decoder.steps(1)

        if not stream and prefix_allowed_tokens_fn is None and finish is None:
            decoder.steps(_ALL_STEPS)
    elif amateur_model is not None:

        def advance() -> tuple[np.ndarray, np.ndarray]:
            running = run.gen.running()
            logits = _step_fn_logits(model_or_step_fn, run, running, vocab)
            amateur = _step_fn_logits(amateur_model, run, running, vocab, "amateur_model")
            # both rows get the generator's masks first, as the C loop does (csrc/decode.c)
            masked = [(run.gen.masked(int(k), e), run.gen.masked(int(k), a)) for k, e, a in zip(running, logits, amateur)]
            scores = contrastive_logits(np.array([e for e, _ in masked]), np.array([a for _, a in masked]),
                                        alpha=contrastive_alpha, amateur_temperature=amateur_temperature)
            return running, run.gen.step(logits, scores)
    else:

        def advance() -> tuple[np.ndarray, np.ndarray]:
            running = run.gen.running()
            return running, run.gen.step(_step_fn_logits(model_or_step_fn, run, running, vocab))

    if prefix_allowed_tokens_fn is not None:
        unconstrained = advance

        def advance() -> tuple[np.ndarray, np.ndarray]:
            _constrain_next_step(run, prefix_allowed_tokens_fn, vocab)
            return unconstrained()

    def results():
        outputs = [run.result(k) for k in range(run.n_seqs)]
        per_prompt = [outputs[i * n : (i + 1) * n] for i in range(len(prompts))]
        shaped = [group[0] if n == 1 else group for group in per_prompt]
        return shaped[0] if single else shaped

    if finish is not None:  # the prompt cache goes back when the run ends, or is dropped if it fails
        if stream:
            return _finally(_stream(run, advance), run, finish)
        try:
            if prefix_allowed_tokens_fn is None:
                decoder.steps(_ALL_STEPS)  # the whole loop in C, as without the cache
            while not run.gen.done:
                advance()
        except BaseException:
            finish(True)
            raise
        finish(False)
        return results()
    if stream:
        return _stream(run, advance)
    while not run.gen.done:
        advance()
    return results()


def _finally(chunks: Iterator[GenerationChunk], run: _Run, finish: Callable[[bool], None]) -> Iterator[GenerationChunk]:
    """The stream, then finish(failed) once it ends: failed unless every sequence completed
    (an abandoned or failed stream drops the prompt cache)."""
    try:
        yield from chunks
    finally:
        finish(not run.gen.done)


def _constrain_next_step(run: _Run, fn: Callable[[int, np.ndarray], Any], vocab: int) -> None:
    """Sets each running sequence's allowed tokens for the next step to fn(k, its tokens)."""
    for k in run.gen.running():
        k = int(k)
        run.gen.set_allowed(k, allowed_token_ids(fn(k, run.gen.tokens(k)), vocab, k))


def _new_tokens(run: _Run, advance: Callable[[], tuple[np.ndarray, np.ndarray]]) -> Iterator[tuple[int, int, int, bool]]:
    """Steps the run to its end: every token appended, as (sequence k, token, its index among
    k's generated tokens, whether it ends k)."""
    generated: dict[int, int] = {}
    while not run.gen.done:
        running, tokens = advance()
        still_running = set(int(k) for k in run.gen.running())
        # a speculative round appends several tokens to a sequence: only its last one may end it
        last_of = {int(k): i for i, k in enumerate(running)}
        for i, (k, token) in enumerate(zip(running, tokens)):
            k = int(k)
            generated[k] = generated.get(k, -1) + 1
            yield k, int(token), generated[k], k not in still_running and last_of[k] == i


def _stream(run: _Run, advance: Callable[[], tuple[np.ndarray, np.ndarray]]) -> Iterator[GenerationChunk]:
    if run.stop and run.tokenizer is not None:
        yield from _stream_with_stop_strings(run, advance)
        return
    decoders: dict[int, Any] = {}
    pieces: dict[int, Callable[[int], bytes]] = {}
    for k, token, index, ends in _new_tokens(run, advance):
        text = ""
        if run.reply_text is not None:
            decoder = decoders.setdefault(k, codecs.getincrementaldecoder("utf-8")(errors="replace"))
            if k not in pieces:
                pieces[k] = run.reply_text.pieces(run.prompts[k])
            if token not in run.stop_ids:
                text = decoder.decode(pieces[k](token))
            if ends:  # an unfinished UTF-8 character at the end shows as U+FFFD, as in .text
                text += decoder.decode(b"", final=True)
        yield run.chunk(k, index, token, text, run.gen.result(k)[5] if ends else None)


def _stream_with_stop_strings(run: _Run, advance: Callable[[], tuple[np.ndarray, np.ndarray]]) -> Iterator[GenerationChunk]:
    """Streaming that never shows a stop string, not even its beginning: the bytes at the end of
    a running sequence that could start a stop string are held back until the next tokens
    either complete it (the text then ends where it begins) or rule it out. The concatenated
    chunks equal the final ``.text``."""
    stops = [s.encode("utf-8") for s in run.stop]
    text_bytes: dict[int, bytearray] = {}
    released: dict[int, int] = {}
    decoders: dict[int, Any] = {}

    def held_back(data: bytearray) -> int:
        # the longest end of data that is a proper beginning of some stop string
        longest = 0
        for stop in stops:
            for n in range(min(len(stop) - 1, len(data)), longest, -1):
                if data.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    pieces: dict[int, Callable[[int], bytes]] = {}
    for k, token, index, ends in _new_tokens(run, advance):
        data = text_bytes.setdefault(k, bytearray())
        decoder = decoders.setdefault(k, codecs.getincrementaldecoder("utf-8")(errors="replace"))
        if k not in pieces:
            pieces[k] = run.reply_text.pieces(run.prompts[k])
        if token not in run.stop_ids:
            data += pieces[k](token)
        reason = None  # until the sequence's last token
        if not ends:
            end = len(data) - held_back(data)
        else:
            *_, reason, stop_offset = run.gen.result(k)
            end = stop_offset if reason == "stop" and stop_offset >= 0 else len(data)
        text = decoder.decode(bytes(data[released.get(k, 0):end]), final=ends)
        released[k] = max(end, released.get(k, 0))
        yield run.chunk(k, index, token, text, reason)
