"""Decoding methods of lmdecode models: generate, beam_search, sequence_logprob, perplexity.

They are the functions of generation.py, search.py and scoring.py with the
model bound, plus text in and out through ``model.tokenizer``. On a Model the
generation and beam-search loops run entirely in C (``_core.ModelDecoder``,
``_core.model_beam_search``): Python is not involved per token.
"""
from __future__ import annotations

import math
import numbers
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _core
from .chat import is_conversation
from .generation import check_prompt_ids
from .sampling import as_token_ids
from .scoring import PerplexityResult, SequenceScore, perplexity_of_windows, sequence_logprob as _sequence_logprob

__all__ = ["DecodingMixin"]

_BLOCK = 16  # positions per KV block of the pools the decoding loops create
# Scoring prefills its caches in one pass and forks them at most once per continuation, so
# larger blocks cost no copying worth counting and spare the attention loops a block
# boundary every 16 positions (stories260K, 512 tokens: 5.0 -> 4.7 ms).
_SCORING_BLOCK = 64
# Scoring (sequence_logprob, perplexity, logits) keeps its KV cache and its logits buffer, one of
# each per model and thread, for the next call, each while it holds at most this many bytes:
# fresh memory every call was faulted in page by page (stories260K's 511-token sequence_logprob:
# ~220 page faults, ~0.4 ms of 4.6 on one thread). Larger ones are allocated per call, where
# the faults weigh little against the pass that fills them.
_SCORING_SCRATCH_BYTES = 8 << 20


def _appended_tokens(full: list[int], plain: list[int], eos: int | None) -> int:
    """How many tokens encode(text, add_bos=True) (full) puts after the text's own (plain)."""
    if plain:
        for start in range(len(full) - len(plain) + 1):
            if full[start:start + len(plain)] == plain:
                return len(full) - start - len(plain)
        return 0
    n = 0  # no text: the trailing EOS tokens, a BOS before them kept
    while n < len(full) - 1 and full[len(full) - 1 - n] == eos:
        n += 1
    return n


class _PromptCache:
    """One sequence kept by generate(cache_prompt=True): its pool, its KVSeq (the keys and values
    of the first seq.len of its tokens), the tokens (computed from the call's generator when
    first asked for), whether a call is using it, and when it was last given back."""

    def __init__(self, pool, seq) -> None:
        self.pool, self.seq = pool, seq
        self.tokens_fn = lambda: []
        self.token_list: list[int] | None = None
        self.busy, self.used = False, 0

    def tokens(self) -> list[int]:
        if self.token_list is None:
            self.token_list = self.tokens_fn()
        return self.token_list


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """How many first tokens a and b share, at most `limit`."""
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class DecodingMixin:
    """Mixed into Model: needs ``config``, ``kv_dtype``, ``_engine``, ``forward``, ``new_cache``, ``_new_pool``,
    ``logits``; the Model's __init__ calls ``_init_decoding``."""

    def _init_decoding(self) -> None:
        self._prompt_caches: list[_PromptCache] = []  # generate(cache_prompt=True)'s kept sequences
        self._prompt_cache_slots = 1  # how many it may keep (prompt_cache_slots)
        # guards the list and the entries' busy flags; re-entrant, because an abandoned stream gives
        # its entry back from a finalizer, which the garbage collector may run inside a locked block
        self._prompt_cache_lock = threading.RLock()
        self._prompt_cache_clock = 0  # counts the calls that gave an entry back (least recently used)
        # the pool new entries take their sequences from, and how many entries it was sized for:
        # entries of one pool fork one another's common beginnings (a shared system prompt)
        self._prompt_pool, self._prompt_pool_slots = None, 0

    # ------------------------------------------------------------------ text

    @property
    def tokenizer(self):
        """The model's tokenizer (``encode(text, add_bos=True)``, ``decode(ids)``), or None."""
        if not hasattr(self, "_tokenizer_cache"):
            self._tokenizer_cache = self._load_tokenizer()
        return self._tokenizer_cache

    @tokenizer.setter
    def tokenizer(self, value) -> None:
        self._tokenizer_cache = value

    def _load_tokenizer(self):
        try:
            from . import tokenizer as tokenizers
        except ImportError:  # pragma: no cover - the module ships with the package
            return None
        if getattr(self, "tokenizer_path", None) is not None:
            return tokenizers.load_tokenizer(self.tokenizer_path)
        gguf_metadata = getattr(self, "_gguf_metadata", None)
        path = getattr(self, "path", None)
        if gguf_metadata is not None:
            # built on first use, so that a model whose vocabulary lmdecode cannot tokenize
            # still runs on token ids; the error then names the file
            try:
                return tokenizers.Tokenizer.from_gguf_metadata(gguf_metadata)
            except ValueError as e:
                raise ValueError(f"{path}: {e}" if path is not None else str(e)) from e
        if path is not None and path.is_dir() and (path / "tokenizer.json").exists():
            return tokenizers.load_tokenizer(path)
        return None

    def _encode(self, text_or_tokens: Any, *, add_bos: bool, name: str) -> list[int]:
        """Token ids of text (BOS first when add_bos), of a conversation (the tokenizer's chat
        template with the assistant's turn opened) or of ids given as such."""
        if isinstance(text_or_tokens, str) or is_conversation(text_or_tokens):
            if self.tokenizer is None:
                raise TypeError(f"{name} is text but the model has no tokenizer; pass token ids or load one")
            if isinstance(text_or_tokens, str):
                return list(self.tokenizer.encode(text_or_tokens, add_bos=add_bos))
            return list(self.tokenizer.apply_chat_template(text_or_tokens, add_generation_prompt=True))
        arr = as_token_ids(text_or_tokens)
        if arr is None:
            raise TypeError(f"{name} must be a str or a 1-D sequence of token ids")
        return arr.tolist()  # Python ints (a loop of int() over NumPy scalars took ~45 us per 511 ids)

    def _scored_pair(self, context: Any, continuations: list[Any]) -> tuple[list[int], list[list[int]]]:
        """The context's tokens and each continuation's, split as lm-evaluation-harness's
        _encode_pair splits text: the context's trailing whitespace moves to the front of the
        continuation, then a continuation's tokens are those of encode(context + continuation)
        after the context's own count, whether or not the joint encoding starts with them (so
        " there" is one token, not a dummy-prefix space then "▁there"). A conversation context
        is its chat template's text (the assistant's turn opened), encoded as the template is;
        token ids are used as given, after the context's text as it is. (All continuations are
        text or all are ids: sequence_logprob scores a batch that mixes them one by one.) What
        encode appends after a text (an EOS) is left out of both; a context with no token left
        (whitespace, no BOS) is lm-evaluation-harness's prefix token, BOS or else EOS."""
        text = None
        if self.tokenizer is not None and isinstance(continuations[0], str):
            if isinstance(context, str):
                text, add_bos, special = context, True, {}
            elif is_conversation(context):
                text = self.tokenizer.apply_chat_template(context, add_generation_prompt=True, tokenize=False)
                add_bos, special = False, {"parse_special": True}
        if text is None:
            ctx = self._encode(context, add_bos=True, name="context")
            return ctx, [self._encode(c, add_bos=False, name="continuation") for c in continuations]
        kept = text.rstrip()
        text, moved = kept, text[len(kept):]
        full = list(self.tokenizer.encode(text, add_bos=add_bos, **special))
        # what encode appends after a text (a GGUF add_eos_token's EOS, a post_processor's "</s>")
        # is no part of the context: the continuation follows its text
        appended = _appended_tokens(full, list(self.tokenizer.encode(text, add_bos=False, **special)) if add_bos
                                    else full, getattr(self.tokenizer, "eos_id", None))
        ctx = full[:len(full) - appended]
        prefix = []
        if not ctx:  # no text and no BOS: lm-evaluation-harness's prefix token (BOS, else EOS)
            token = next((t for t in (self.tokenizer.bos_id, getattr(self.tokenizer, "eos_id", None))
                          if t is not None), None)
            if token is None:
                raise ValueError("context holds no token: its text is empty (or whitespace) and the "
                                 "tokenizer has neither BOS nor EOS to stand for it")
            prefix = [token]
        conts = []
        for c in continuations:
            joint = list(self.tokenizer.encode(text + moved + c, add_bos=add_bos, **special))
            cont = joint[len(ctx):len(joint) - appended]
            if c and not cont:  # lm-evaluation-harness would score nothing: log p = 0
                raise ValueError(f"continuation {c!r:.60} adds no tokens after the context's: its text merges "
                                 "with the context's last token; pass token ids to score it")
            conts.append(cont)
        return prefix + ctx, conts

    # ------------------------------------------------------------------ decoding loops in C

    def _pool(self, positions: int):
        """A KV pool with room for `positions` positions (plus one block per copy-on-write)."""
        return self._new_pool(_BLOCK, max(1, math.ceil(positions / _BLOCK)), self.kv_dtype)

    def _run_pool(self, prompts: list[list[int]], max_new_tokens: int, proposals: int = 0):
        """A pool for one decoding loop over `prompts`: each sequence's positions up to the
        context length, with room for `proposals` speculative tokens, plus two blocks."""
        ctx = self.config.context_length
        return self._pool(sum(min(len(p) + max_new_tokens + proposals, ctx) + 2 * _BLOCK for p in prompts))

    def _decoder(self, generator, prompts: list[list[int]], max_new_tokens: int, *, amateur=None, alpha: float = 0.1,
                 amateur_temperature: float = 1.0):
        """The C loop that runs `generator` on this model (one KV sequence per prompt); with an
        amateur model, contrastive decoding (the amateur's caches in a pool of its own)."""
        pool = self._run_pool(prompts, max_new_tokens)
        if amateur is None:
            return _core.ModelDecoder(self._engine, pool, generator)
        return _core.ModelDecoder(self._engine, pool, generator, amateur._engine,
                                  amateur._run_pool(prompts, max_new_tokens), alpha, amateur_temperature)

    # ------------------------------------------------------------------ prompt cache across calls

    @property
    def prompt_cache_slots(self) -> int:
        """How many sequences generate(cache_prompt=True) keeps between calls (default 1): set it to
        the number of conversations that take turns on this model, each slot holding up to the
        context length's keys and values. A new conversation starts from the longest beginning
        another slot holds (a system prompt), sharing its blocks; when every slot is taken, the
        least recently used gives up its place. Fewer slots than kept sequences drops the least
        recently used ones (not those in use)."""
        return self._prompt_cache_slots

    @prompt_cache_slots.setter
    def prompt_cache_slots(self, slots: int) -> None:
        if isinstance(slots, bool) or not isinstance(slots, numbers.Integral):
            raise TypeError(f"prompt_cache_slots (={slots!r}) must be an integer, not {type(slots).__name__}")
        from .model import MAX_POOL_BLOCKS

        if slots < 1:
            raise ValueError(f"prompt_cache_slots (={slots!r}) must be >= 1")
        # the slots' pool (_new_prompt_cache) has a context length and a block for each
        per_slot = math.ceil((self.config.context_length + _BLOCK) / _BLOCK)
        if slots > MAX_POOL_BLOCKS // per_slot:
            raise ValueError(f"prompt_cache_slots (={slots!r}) must be <= {MAX_POOL_BLOCKS // per_slot}: each slot "
                             f"takes {per_slot} blocks of {_BLOCK} positions (the context length, "
                             f"{self.config.context_length}, and one for copy-on-write), and a KV pool holds at "
                             f"most {MAX_POOL_BLOCKS}")
        with self._prompt_cache_lock:
            self._prompt_cache_slots = int(slots)
            self._drop_prompt_caches(len(self._prompt_caches) - self._prompt_cache_slots)

    def clear_prompt_cache(self) -> None:
        """Lets go of every sequence generate(cache_prompt=True) keeps (not of one in use), and of
        their memory once none is left."""
        with self._prompt_cache_lock:
            self._drop_prompt_caches(len(self._prompt_caches))
            if not self._prompt_caches:
                self._prompt_pool, self._prompt_pool_slots = None, 0

    def _drop_prompt_caches(self, count: int) -> None:
        """Drops up to `count` entries not in use, least recently used first (lock held)."""
        for entry in sorted((e for e in self._prompt_caches if not e.busy), key=lambda e: e.used)[:max(count, 0)]:
            self._prompt_caches.remove(entry)

    def _take_prompt_cache(self, prompt: list[int]):
        """(pool, KVSeq, tokens it holds) for a generate(cache_prompt=True) call of `prompt`, or
        None while every slot is in use (the call then decodes without one). Among the entries not
        in use, the one that shares the longest beginning with the prompt (the least recently used
        of equals): itself when the prompt continues all it holds (the same conversation), else a
        new entry that starts from that beginning in its blocks, so that no other conversation's
        history is cut short; without a free slot, the least recently used entry gives up its
        place. The KVSeq holds the keys and values of the first KVSeq.len of `tokens`; give it
        back with _return_prompt_cache."""
        with self._prompt_cache_lock:
            best, best_common = None, -1
            for entry in list(self._prompt_caches):
                if entry.busy:
                    continue
                common = _common_prefix(entry.tokens(), prompt, entry.seq.len)
                if common > best_common or (common == best_common and entry.used < best.used):
                    best, best_common = entry, common
            full = len(self._prompt_caches) >= self._prompt_cache_slots
            if best is not None and best_common == best.seq.len:
                pass  # the prompt continues best's tokens
            elif best is not None or not full:
                best = self._new_prompt_cache(best if best_common > 0 else None, best_common)
                best.busy = True  # before any entry gives up its place, so that it is not the one
                self._prompt_caches.append(best)
                if full:
                    self._drop_prompt_caches(1)
            if best is None:
                return None
            best.busy = True
            return best.pool, best.seq, best.tokens()

    def _new_prompt_cache(self, donor: _PromptCache | None, common: int) -> _PromptCache:
        """A new entry in the prompt caches' pool, holding donor's first `common` tokens in
        donor's blocks when donor is in that pool (lock held). The pool has room for every slot's
        positions up to the context length, and a block each for copy-on-write; its pages are
        taken as positions are written."""
        ctx = self.config.context_length
        if self._prompt_pool is None or self._prompt_pool_slots < self._prompt_cache_slots:
            # entries of an older, smaller pool keep it; new ones no longer share their blocks
            try:
                self._prompt_pool = self._pool(self._prompt_cache_slots * math.ceil((ctx + _BLOCK) / _BLOCK) * _BLOCK)
            except MemoryError as e:
                raise MemoryError(f"prompt_cache_slots (={self._prompt_cache_slots}) slots of context_length "
                                  f"{ctx} positions: {e}") from e
            self._prompt_pool_slots = self._prompt_cache_slots
        if donor is None or donor.pool is not self._prompt_pool:
            return _PromptCache(self._prompt_pool, _core.KVSeq(self._prompt_pool, ctx))
        entry = _PromptCache(self._prompt_pool, donor.seq.fork())
        entry.seq.truncate(common)
        kept = donor.tokens()[:common]
        entry.tokens_fn = lambda: kept
        return entry

    def _return_prompt_cache(self, entry, tokens_fn) -> None:
        """Ends the use of _take_prompt_cache's entry: tokens_fn() gives the tokens its KVSeq now
        holds (a prefix of them), or tokens_fn is None when the call failed (the entry is dropped)."""
        with self._prompt_cache_lock:
            kept = next((e for e in self._prompt_caches if e.seq is entry[1]), None)
            if kept is None:
                return
            if tokens_fn is None:
                self._prompt_caches.remove(kept)
                return
            kept.tokens_fn, kept.token_list, kept.busy = tokens_fn, None, False
            self._prompt_cache_clock += 1
            kept.used = self._prompt_cache_clock
            self._drop_prompt_caches(len(self._prompt_caches) - self._prompt_cache_slots)

    def _cached_decoder(self, generator, prompt: list[int], entry):
        """The C loop for one sequence decoding in the prompt cache `entry`: the cache keeps the
        longest prefix it shares with `prompt` (all of the prompt but its last token at most) and
        the first step feeds the rest. Returns (decoder, number of prompt tokens reused)."""
        pool, seq, tokens = entry
        reused = min(_common_prefix(tokens, prompt, seq.len), len(prompt) - 1)
        seq.truncate(reused)
        decoder = _core.ModelDecoder(self._engine, pool, generator)
        decoder.use_cache(0, seq)
        return decoder, reused

    def _speculative_decoder(self, draft, generator, prompts: list[list[int]], max_new_tokens: int, n_draft: int):
        """The C speculative loop: this model verifies what `draft` proposes (a pool each)."""
        return _core.SpeculativeDecoder(self._engine, self._run_pool(prompts, max_new_tokens, n_draft), draft._engine,
                                        draft._run_pool(prompts, max_new_tokens, n_draft), generator, n_draft)

    def _beam_search_in_c(self, searches: list, prompts: list[list[int]], beam_width: int, max_new_tokens: int,
                          constraint=None) -> int:
        """Runs the searches (search i from prompts[i], each of beam_width beams) to their end in C,
        all in one batched forward per step; returns the peak number of KV positions the beams
        held. constraint(search, beam, generated tokens) -> allowed int32 ids or None is asked
        before every step."""
        positions = sum(len(p) + 2 * beam_width * (max_new_tokens + 2 * _BLOCK) for p in prompts)
        peak_blocks = _core.model_beam_search(self._engine, self._pool(positions), list(searches),
                                              [np.asarray(p, dtype=np.int32) for p in prompts], constraint)
        return peak_blocks * _BLOCK

    # ------------------------------------------------------------------ public methods

    def generate(self, prompt: Any, **kwargs: Any):
        """ld.generate with this model: see lmdecode.generation.generate."""
        from .generation import generate

        return generate(self, prompt, **kwargs)

    def beam_search(self, prompt: Any, **kwargs: Any):
        """ld.beam_search with this model: see lmdecode.search.beam_search."""
        from .search import beam_search

        return beam_search(self, prompt, **kwargs)

    def sequence_logprob(self, context: Any, continuation: Any) -> SequenceScore | list[SequenceScore]:
        """log p(continuation | context) in one prefill pass over context + continuation.

        context: text (encoded with BOS), a conversation (the chat template with the
        assistant's turn opened: the continuation is then scored as the reply) or token ids;
        continuation: text or token ids,
        or a list of those (the context is then prefilled once and its cache shared by
        every continuation, each scored in one pass of its own). A text continuation
        after a text context (or a conversation) is tokenized as lm-evaluation-harness
        does: the context's trailing whitespace moves to the continuation, and its tokens
        are those of encode(context + continuation) after the context's own (so " there"
        is one token, not a dummy-prefix space followed by "▁there"); one whose text merges
        into the context's last token so that no token is left is a ValueError. Beside
        token-id continuations the context's text stays whole (a batch mixing text and ids
        is scored one continuation at a time).
        """
        batch = isinstance(continuation, (list, tuple)) and len(continuation) > 0 and not isinstance(continuation[0], numbers.Integral)
        if batch and len({isinstance(c, str) for c in continuation}) > 1:  # text and ids split differently
            return [self.sequence_logprob(context, c) for c in continuation]
        ctx, conts = self._scored_pair(context, list(continuation) if batch else [continuation])
        if not ctx:
            raise ValueError("context must hold at least one token (e.g. BOS)")
        # named here: the engine would name a position of context + continuation
        parts = [ctx] + conts
        check_prompt_ids(np.fromiter((t for part in parts for t in part), dtype=np.int64),
                         np.cumsum([0] + [len(part) for part in parts]), self.config.vocab_size,
                         ["context"] + [f"continuation {j}" if batch else "continuation" for j in range(len(conts))])
        longest = max(len(c) for c in conts)
        if len(ctx) + longest > self.config.context_length:
            raise ValueError(f"context ({len(ctx)} tokens) + continuation ({longest}) exceed the context length {self.config.context_length}")
        if not batch and conts[0]:
            # one continuation: context and continuation in one pass, scored from the context's
            # last position on (the shared context below costs an engine call of its own, a
            # fork and a second scoring call: ~1% of a stories260K 511-token call)
            cont = conts[0]
            ids = np.asarray(ctx + cont)
            lp, greedy = self._prefill_target_logprobs(ids[:-1], ids[1:], self._scoring_cache(len(ids)),
                                                       skip=len(ctx) - 1)
            return SequenceScore(float(lp.sum()), lp, tuple(cont), greedy)
        cache = self._scoring_cache(len(ctx) + longest + 2 * _SCORING_BLOCK * len(conts))
        first = self.forward(ctx, cache, logits="last")  # predicts the first continuation token
        scores = []
        for cont in conts:
            if not cont:
                scores.append(SequenceScore(0.0, np.zeros(0)))
                continue
            # each part scored where it lies: concatenating (T, V) logits would copy them all
            head = _sequence_logprob(first[None, :], np.asarray(cont[:1]))
            token_logprobs, greedy = [head.token_logprobs], head.is_greedy
            if len(cont) > 1:
                branch = cache.fork()
                ids = np.asarray(cont)  # converted once, not per engine pass and per use
                rest, rest_greedy = self._prefill_target_logprobs(ids[:-1], ids[1:], branch)
                token_logprobs.append(rest)
                greedy = greedy and rest_greedy
                del branch
            lp = np.concatenate(token_logprobs)
            scores.append(SequenceScore(float(lp.sum()), lp, tuple(cont), greedy))
        return scores if batch else scores[0]

    def perplexity(self, text_or_tokens: Any, *, window: int | None = None, stride: int | None = None,
                   progress: bool | None = None) -> PerplexityResult:
        """Sliding-window perplexity (transformers' protocol; see lmdecode.scoring)."""
        tokens = self._encode(text_or_tokens, add_bos=True, name="text_or_tokens")
        window = self.config.context_length if window is None else window
        if isinstance(window, numbers.Integral) and window > self.config.context_length:
            raise ValueError(f"window (={window}) must be <= the context length {self.config.context_length}")

        def score_window(chunk: np.ndarray, first: int) -> np.ndarray:
            if first >= len(chunk):
                return np.zeros(0)
            cache = self._scoring_cache(len(chunk) - 1)
            return self._prefill_target_logprobs(chunk[:-1], chunk[1:], cache, skip=first - 1)[0]

        return perplexity_of_windows(score_window, tokens, window=window, stride=stride, progress=progress)

    def _prefill_target_logprobs(self, inputs, targets, cache, skip: int = 0) -> tuple[np.ndarray, bool]:
        """Appends inputs to cache and returns log p(targets[i] | the sequence up to inputs[i])
        for i >= skip (float64), and whether each of those targets was its position's most
        likely token. An engine pass of max_batch tokens at a time, each scored as it comes:
        never more than max_batch rows of logits at once (a 2048-token window over a 128k
        vocabulary would otherwise take 1 GB), and the same values as one pass."""
        parts, greedy, start = [], True, len(cache)
        for a in range(0, len(inputs), self._max_batch):
            b = min(a + self._max_batch, len(inputs))
            lo = max(skip, a)
            rows = np.arange(lo - a, b - a) if lo < b else None
            logits = self.forward(inputs[a:b], cache, logits=rows, out=self._scoring_logits(rows))
            if rows is not None:
                try:
                    part = _sequence_logprob(logits, np.asarray(targets[lo:b]))
                except ValueError:
                    bad = np.argwhere(np.isnan(logits) | (logits == np.inf))
                    if not len(bad):
                        raise
                    r, t = bad[0]  # the model computed them: say so, rather than name a row of a chunk
                    raise ValueError(f"the model's logits at position {start + lo + r}: logits[{t}] is "
                                     f"{'NaN' if np.isnan(logits[r, t]) else '+inf'}; logits must be finite or "
                                     "-inf") from None
                parts.append(part.token_logprobs)
                greedy = greedy and part.is_greedy
        return (np.concatenate(parts) if parts else np.zeros(0)), greedy

    def _scoring_cache(self, capacity: int):
        """An empty cache of _SCORING_BLOCK-position blocks with room for capacity positions:
        this thread's kept one when it is free and big enough, else a new one (kept if it holds
        at most _SCORING_SCRATCH_BYTES). Its forks must be gone before the next call. The engine
        sequence is kept, not the KVCache, which refers to the model: a model's memory goes
        when its last reference does, not at a later garbage collection."""
        from .model import KVCache

        cfg = self.config
        n_blocks = -(-capacity // _SCORING_BLOCK)
        scratch = self._scoring_scratch
        kept = getattr(scratch, "seq", None)
        if kept is not None and kept.pool.kv_dtype == self.kv_dtype:
            kept.truncate(0)
            if kept.pool.free_blocks == kept.pool.n_blocks >= n_blocks:  # no fork left, room enough
                return KVCache(kept, self)
        # a kept cache is as long as the context allows, so that one serves every later call
        n_blocks = max(n_blocks, -(-cfg.context_length // _SCORING_BLOCK))
        position_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * (2 if self.kv_dtype == "f16" else 4)
        if n_blocks * _SCORING_BLOCK * position_bytes > _SCORING_SCRATCH_BYTES:
            scratch.seq = None
            return self.new_cache(capacity, block_size=_SCORING_BLOCK)
        cache = self.new_cache(n_blocks * _SCORING_BLOCK, block_size=_SCORING_BLOCK)
        scratch.seq = cache._seq
        return cache

    def _scoring_logits(self, rows) -> np.ndarray | None:
        """(len(rows), vocab) of this thread's reused scoring buffer, or None (forward allocates)
        if rows is None or the buffer would exceed _SCORING_SCRATCH_BYTES."""
        vocab = self.config.vocab_size
        if rows is None or self._max_batch * vocab * 4 > _SCORING_SCRATCH_BYTES:
            return None
        scratch = self._scoring_scratch
        if getattr(scratch, "logits", None) is None:
            scratch.logits = np.empty((self._max_batch, vocab), dtype=np.float32)
        return scratch.logits[:len(rows)]

    def _check_prompt_lengths(self, prompts: Sequence[Sequence[int]]) -> None:
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty: a model needs at least one token (e.g. BOS)")
            if len(p) > self.config.context_length:
                raise ValueError(f"prompt {i} has {len(p)} tokens, more than the context length {self.config.context_length}")
