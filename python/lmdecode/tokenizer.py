"""Tokenizers for the model files lmdecode loads.

Three kinds, one interface (``encode``, ``decode``, ``token_bytes``,
``stream_decoder``, ``apply_chat_template``, ``bos_id``, ``eos_id``,
``vocab_size``, ``chat_template``):

- sentencepiece-style BPE by merge scores with byte fallback: llama2.c's
  ``tok*.bin`` (encoding exactly as llama2.c's ``encode``: a leading space,
  characters looked up one by one, then the adjacent pair with the highest
  score merged until none applies) and GGUF "llama" vocabularies (the same
  with U+2581 standing for spaces, as llama.cpp's SPM tokenizer);
- byte-level BPE from a GGUF "gpt2" vocabulary (tokens + merges), run by the
  ``tokenizers`` library;
- Hugging Face ``tokenizer.json`` through ``tokenizers``.

``load_tokenizer(path)`` picks by file: ``.bin`` (llama2.c), ``.gguf``, a
``tokenizer.json`` or a directory holding one.

Special pieces in the text: GGUF vocabularies cut the text as llama.cpp does (its
``tokenizer_st_partition``): user-defined tokens (type 4) always, control and unknown ones
(types 3, 2) only with ``parse_special=True``; ``tokenizer.json`` ones as the ``tokenizers``
package does (added tokens; special ones unless ``parse_special=False``).

``decode(ids)`` reads ids that start with BOS as a document (the space the encoder put before
its first word dropped, as transformers drops it) and any other ids as a
continuation of earlier text, whose leading space stays: so the text of generated tokens, the
stream's chunks and ``decode`` of the whole sequence all agree.
"""
from __future__ import annotations

import codecs
import heapq
import numbers
import struct
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .sampling import token_id_list

__all__ = ["Tokenizer", "StreamDecoder", "load_tokenizer"]

SPACE_MARK = "\u2581"  # sentencepiece's visible space
# texts at least this long are encoded word by word (ScoreBPETokenizer._segments), each distinct
# word merged once; the cache of words' tokens (words up to SEGMENT_CACHE_MAX_CHARS) is emptied
# when it reaches SEGMENT_CACHE_SIZE
SEGMENTED_ENCODE_MIN_CHARS = 256
SEGMENT_CACHE_SIZE = 1 << 14  # a few MB at most; tinyshakespeare (42k distinct words) as fast as with 1 << 16
SEGMENT_CACHE_MAX_CHARS = 64
# GGUF token types (llama.cpp's LLAMA_TOKEN_TYPE_*: 0 undefined, 5 unused, 6 byte are the others)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 2, 3, 4
N_TOKEN_TYPES = 7


class DocumentStart:
    """Pieces one after another: at a document's start (active), the first piece with text loses
    the space a sentencepiece-style encoder put before the document's first word; the rest, and
    every piece when not active, pass as they are."""

    def __init__(self, active: bool) -> None:
        self.active = active

    def __call__(self, piece: bytes) -> bytes:
        if self.active and piece:
            self.active = False
            return piece[1:] if piece.startswith(b" ") else piece
        return piece


class StreamDecoder:
    """Turns token ids into text as they come, never splitting a UTF-8 character."""

    def __init__(self, tokenizer: "Tokenizer") -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        """The text that token completes (continuations keep their leading space)."""
        return self._utf8.decode(self._tokenizer.token_bytes(token))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class Tokenizer:
    """Base class: subclasses set the fields, fill ``_bytes`` (each token's bytes) and
    implement encode."""

    bos_id: int | None = None
    eos_id: int | None = None
    vocab_size: int = 0
    adds_bos: bool = True  # does this model's vocabulary expect a BOS at the start?
    adds_eos: bool = False  # ...and an EOS at the end (GGUF tokenizer.ggml.add_eos_token)?
    # does decoding drop the space the encoder put before a document's first word (the first
    # piece with text after a leading BOS), as sentencepiece, llama2.c and transformers do?
    strips_leading_space_after_bos = False
    chat_template: str | None = None  # Jinja source from the model file (lmdecode.chat), if it has one
    _bytes: list[bytes]  # (vocab_size,) the bytes each token stands for

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
                f"chat_template={self.chat_template is not None})")

    def encode(self, text: str, add_bos: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of text, with BOS first when add_bos and the vocabulary expects one (and
        EOS last where it expects that too: GGUF add_eos_token, as llama.cpp's add_special).
        parse_special: special tokens spelt in the text (``<s>``, ``<|im_start|>``) become
        their ids, as chat templates need; otherwise they are text like any other (GGUF
        user-defined tokens are matched either way, as llama.cpp matches them). Hugging Face
        tokenizers default to True, as the ``tokenizers`` package and transformers do."""
        raise NotImplementedError

    def token_bytes(self, token: int) -> bytes:
        self._check_id(token)
        return self._bytes[token]

    def token_text(self, token: int) -> str:
        """The token's piece as the vocabulary spells it, special tokens included (``<s>``)."""
        raise NotImplementedError

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False,
                            tokenize: bool = True, chat_template: str | None = None, **extra: Any) -> list[int] | str:
        """A conversation as the prompt of an instruct model, as transformers'
        ``apply_chat_template``: the template (``chat_template`` or this tokenizer's) rendered
        with ``bos_token``/``eos_token`` spelt as the vocabulary spells them, then encoded
        without an added BOS (templates write their own) and with special tokens parsed.
        ``tokenize=False`` returns the text. As there, ``add_generation_prompt`` is off unless
        asked for (generate() asks: a conversation as a prompt ends with the assistant's opening)."""
        from .chat import render_chat

        tokens = {"bos_token": self.token_text(self.bos_id) if self.bos_id is not None else "",
                  "eos_token": self.token_text(self.eos_id) if self.eos_id is not None else ""}
        text = render_chat(chat_template if chat_template is not None else self.chat_template, messages,
                           add_generation_prompt=add_generation_prompt, **{**tokens, **extra})
        return self.encode(text, add_bos=False, parse_special=True) if tokenize else text

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids (special tokens such as BOS/EOS contribute nothing). Ids that start with
        BOS are a document: the space sentencepiece-style encoders put before its first word is
        dropped (there only, as transformers' and llama.cpp's decoders drop it). Others are a continuation and keep a leading space (" there" for "▁there"),
        so that generated text reads as it follows its prompt: decode(a) + decode(b) ==
        decode(a + b) wherever a holds a token after its BOS (and b does not start inside a
        UTF-8 character)."""
        ids = token_id_list(ids, "ids")
        first_word = DocumentStart(self.strips_leading_space_after_bos and len(ids) > 0 and ids[0] == self.bos_id)
        return b"".join(first_word(self.token_bytes(t)) for t in ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    def _check_id(self, token: int) -> None:
        if not 0 <= token < self.vocab_size:
            raise ValueError(f"token id {token} is outside the vocabulary [0, {self.vocab_size})")

    @staticmethod
    def _check_text(text: Any) -> None:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            # lone surrogates: what bytes that are not UTF-8 become when read with
            # errors="surrogateescape" (sys.argv, os.environ); no tokenizer can spell them
            # (the tokenizers package said only "TextInputSequence must be str")
            raise ValueError(f"text is not valid Unicode: {text[e.start]!r} at index {e.start} is a lone surrogate "
                             f"(input that was not UTF-8, decoded with errors='surrogateescape'?)") from None

    @staticmethod
    def from_gguf_metadata(reader: Any) -> "Tokenizer":
        """The tokenizer a GGUF file describes: a ``gguf.GGUFReader``, or a dict of its
        ``tokenizer.*`` metadata values (what :func:`lmdecode.loaders.read_gguf` keeps)."""
        model = _gguf_field(reader, "tokenizer.ggml.model")
        tokenizer: Tokenizer
        if not isinstance(model, str):
            raise ValueError(f"tokenizer.ggml.model must be a string, got {model!r:.80}")
        if model == "llama":
            tokenizer = ScoreBPETokenizer.from_gguf(reader)
        elif model == "gpt2":
            tokenizer = ByteLevelBPETokenizer.from_gguf(reader)
        else:
            raise ValueError(f"unsupported GGUF tokenizer model {model!r} (supported: llama, gpt2)")
        template = _gguf_field(reader, "tokenizer.chat_template", None)
        if template is not None and not isinstance(template, str):
            raise ValueError(f"tokenizer.chat_template must be a string, got {template!r:.80}")
        tokenizer.chat_template = template or None
        return tokenizer


# ----------------------------------------------------------------------------
# sentencepiece-style BPE by merge scores (llama2.c, GGUF "llama")
# ----------------------------------------------------------------------------


def _split_order(piece_of: Callable[[int], str], tokens: set[int]) -> list[tuple[str, int]]:
    """The pieces of tokens in the order llama.cpp looks for them in a text: longest (in UTF-8
    bytes) first. Among pieces of one length llama.cpp's order is std::sort's, unspecified; here
    the lower id first. Empty pieces are never looked for."""
    found = [(piece_of(i), i) for i in tokens if piece_of(i)]
    return sorted(found, key=lambda p: (-len(p[0].encode("utf-8", errors="surrogateescape")), p[1]))


def _split_on_pieces(text: str, pieces: list[tuple[str, int]]) -> list[str | int]:
    """text cut as llama.cpp's tokenizer_st_partition cuts it: each piece in turn (longest first)
    takes every occurrence of itself, leftmost first and not overlapping, in the stretches of
    text the pieces before it left; the result alternates text (never empty) and token ids. A
    longer piece wins over a shorter one that overlaps it, even one that starts earlier ("abc"
    over "xa" in "xabc"), which one regular expression scanning left to right would not give."""
    fragments: list[str | int] = [text] if text else []
    for piece, token in pieces:
        if piece not in text:  # the usual case, one fast scan
            continue
        cut: list[str | int] = []
        for fragment in fragments:
            if isinstance(fragment, int) or piece not in fragment:
                cut.append(fragment)
                continue
            start = 0
            at = fragment.find(piece)
            while at >= 0:
                if at > start:
                    cut.append(fragment[start:at])
                cut.append(token)
                start = at + len(piece)
                at = fragment.find(piece, start)
            if start < len(fragment):
                cut.append(fragment[start:])
        fragments = cut
    return fragments


def _byte_fallback(piece: str) -> int | None:
    """The byte a "<0xNN>" piece stands for."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return int(piece[3:5], 16)
        except ValueError:
            return None
    return None


class ScoreBPETokenizer(Tokenizer):
    """BPE that merges the adjacent pair with the highest score first (llama2.c / sentencepiece BPE)."""

    def __init__(self, pieces: list[str], scores: list[float], *, bos_id: int | None, eos_id: int | None,
                 space_mark: bool, adds_bos: bool = True, adds_eos: bool = False, add_space_prefix: bool = True,
                 special: set[int] | None = None, user_defined: set[int] | None = None) -> None:
        """special: control and unknown tokens (no text of their own; matched in the text only
        with parse_special); user_defined: GGUF type-4 tokens (their piece is their text, and
        they are matched in the text always, as llama.cpp does); add_space_prefix: the space
        put before a text (sentencepiece's dummy prefix; GGUF tokenizer.ggml.add_space_prefix),
        which decode drops again after BOS."""
        self.pieces = pieces
        self.scores = scores
        self.vocab_size = len(pieces)
        self.bos_id, self.eos_id, self.adds_bos, self.adds_eos = bos_id, eos_id, adds_bos, adds_eos
        self.space_mark = space_mark  # GGUF/sentencepiece pieces spell spaces as U+2581
        self.add_space_prefix = add_space_prefix
        self.strips_leading_space_after_bos = add_space_prefix
        self.special = special or set()
        self.user_defined = user_defined or set()
        self._split_pieces = (_split_order(pieces.__getitem__, self.user_defined),
                              _split_order(pieces.__getitem__, self.special | self.user_defined))
        self.lookup: dict[str, int] = {}
        for i, p in enumerate(pieces):
            self.lookup.setdefault(p, i)
        self.byte_ids: dict[int, int] = {}
        for i, p in enumerate(pieces):
            b = _byte_fallback(p)
            if b is not None:
                self.byte_ids.setdefault(b, i)
        self._bytes = [self._piece_bytes(i) for i in range(self.vocab_size)]
        self._inner_pairs: set[str] | None = None  # built on the first long encode (_segments)
        self._segment_ids: dict[str, list[int]] = {}

    @classmethod
    def from_llama2c(cls, path: str | Path, vocab_size: int | None = None) -> "ScoreBPETokenizer":
        """llama2.c's tokenizer file: int32 max_token_length, then per token float32 score,
        int32 byte length and the bytes."""
        path = Path(path)
        data = path.read_bytes()
        if len(data) < 4:
            raise ValueError(f"{path}: truncated llama2.c tokenizer (no header)")
        at, pieces, scores = 4, [], []
        while at < len(data) and (vocab_size is None or len(pieces) < vocab_size):
            if at + 8 > len(data):
                raise ValueError(f"{path}: truncated llama2.c tokenizer at token {len(pieces)}")
            score, length = struct.unpack_from("<fi", data, at)
            at += 8
            if length < 0 or at + length > len(data):
                raise ValueError(f"{path}: token {len(pieces)} claims {length} bytes past the end of the file")
            pieces.append(data[at:at + length].decode("utf-8", errors="surrogateescape"))
            scores.append(score)
            at += length
        if vocab_size is not None and len(pieces) != vocab_size:
            raise ValueError(f"{path}: holds {len(pieces)} tokens but the model's vocabulary has {vocab_size}")
        if len(pieces) < 3:
            raise ValueError(f"{path}: a llama2.c tokenizer needs at least <unk>, <s> and </s>")
        return cls(pieces, scores, bos_id=1, eos_id=2, space_mark=False, special={0, 1, 2})

    @classmethod
    def from_gguf(cls, reader: Any) -> "ScoreBPETokenizer":
        pieces, types = _gguf_tokens_and_types(reader)
        scores = _gguf_list(reader, "tokenizer.ggml.scores", len(pieces), "number",
                            lambda v: _is_real(v) and v == v)  # not NaN
        if scores is None:
            scores = [0.0] * len(pieces)
        return cls(pieces, [float(v) for v in scores], space_mark=True,
                   bos_id=_gguf_token_id(reader, "tokenizer.ggml.bos_token_id", len(pieces)),
                   eos_id=_gguf_token_id(reader, "tokenizer.ggml.eos_token_id", len(pieces)),
                   adds_bos=_gguf_bool(reader, "tokenizer.ggml.add_bos_token", True),
                   adds_eos=_gguf_bool(reader, "tokenizer.ggml.add_eos_token", False),
                   add_space_prefix=_gguf_bool(reader, "tokenizer.ggml.add_space_prefix", True),
                   special={i for i, t in enumerate(types) if t in (TOKEN_UNKNOWN, TOKEN_CONTROL)},
                   user_defined={i for i, t in enumerate(types) if t == TOKEN_USER_DEFINED})

    def _piece_bytes(self, token: int) -> bytes:
        if token in self.special:
            return b""
        piece = self.pieces[token]
        if token in self.user_defined:  # its text as written, U+2581 included (llama.cpp's token_to_piece)
            return piece.encode("utf-8", errors="surrogateescape")
        b = _byte_fallback(piece)
        if b is not None:
            return bytes([b])
        if self.space_mark:
            piece = piece.replace(SPACE_MARK, " ")
        return piece.encode("utf-8", errors="surrogateescape")

    def token_text(self, token: int) -> str:
        self._check_id(token)
        return self.pieces[token]

    def encode(self, text: str, add_bos: bool = True, parse_special: bool = False) -> list[int]:
        self._check_text(text)
        # each text run between the pieces is encoded on its own, with its dummy prefix, as
        # llama.cpp does after a token
        return _encode_around_pieces(self, text, add_bos, parse_special, self._encode_plain)

    def _encode_plain(self, text: str) -> list[int]:
        if not text:
            return []
        prefix = " " if self.add_space_prefix else ""  # llama2.c's and sentencepiece's dummy prefix
        if self.space_mark:
            text = (prefix + text).replace(" ", SPACE_MARK)
        else:
            text = prefix + text
        if len(text) < SEGMENTED_ENCODE_MIN_CHARS:
            return self._merge(self._symbols(text))
        ids: list[int] = []
        for segment in self._segments(text):
            segment_ids = self._segment_ids.get(segment)
            if segment_ids is None:
                segment_ids = self._merge(self._symbols(segment))
                if len(segment) <= SEGMENT_CACHE_MAX_CHARS:  # words, not runs of text without spaces
                    if len(self._segment_ids) >= SEGMENT_CACHE_SIZE:
                        self._segment_ids.clear()
                    self._segment_ids[segment] = segment_ids
            ids += segment_ids
        return ids

    def _symbols(self, text: str) -> list[int]:
        """One token per character, or its UTF-8 bytes' tokens where the vocabulary lacks it."""
        symbols: list[int] = []
        for ch in text:
            token = self.lookup.get(ch)
            if token is not None:
                symbols.append(token)
            else:
                for b in ch.encode("utf-8"):
                    if b not in self.byte_ids:
                        raise ValueError(f"character {ch!r} has no token and the vocabulary has no byte fallback")
                    symbols.append(self.byte_ids[b])
        return symbols

    def _segments(self, text: str) -> list[str]:
        """text cut before spaces that no merge can cross, so that each piece merges on its own
        into exactly the tokens the whole text would give there: a merge across the cut between
        characters a and b would make a piece containing the two characters ab, so where no
        piece of the vocabulary contains ab, no merge crosses (merges on either side never meet,
        and each side's merges keep their order). Only between characters that are tokens of
        their own: a character spelt by byte tokens is "<0xNN>" to the merges. Words repeat, so a
        word's ids are kept for the next time (_segment_ids): llama2.c's whole-text merge of a
        1.1 MB text took 2.75 s in Python, this 0.4 s."""
        if self._inner_pairs is None:
            self._inner_pairs = {p[i:i + 2] for p in self.pieces for i in range(len(p) - 1)}
        space = SPACE_MARK if self.space_mark else " "
        if space not in self.lookup:
            return [text]
        segments, start = [], 0
        at = text.find(space, 1)
        while at > 0:
            if text[at - 1:at + 1] not in self._inner_pairs and text[at - 1] in self.lookup:
                segments.append(text[start:at])
                start = at
            at = text.find(space, at + 1)
        segments.append(text[start:])
        return segments

    def _merge(self, symbols: list[int]) -> list[int]:
        """Repeatedly merges the best-scoring adjacent pair (leftmost on ties), with a heap."""
        n = len(symbols)
        text = [self.pieces[t] for t in symbols]
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        alive = [True] * n
        heap: list[tuple[float, int, str, str]] = []

        def offer(left: int) -> None:
            right = nxt[left]
            if right >= n:
                return
            merged = self.lookup.get(text[left] + text[right])
            if merged is not None:
                heapq.heappush(heap, (-self.scores[merged], left, text[left], text[right]))

        for i in range(n - 1):
            offer(i)
        while heap:
            _, left, left_text, right_text = heapq.heappop(heap)
            right = nxt[left] if alive[left] else n
            if right >= n or text[left] != left_text or text[right] != right_text:
                continue  # stale: one side has merged since
            text[left] = left_text + right_text
            alive[right] = False
            nxt[left] = nxt[right]
            if nxt[left] < n:
                prev[nxt[left]] = left
            if prev[left] >= 0:
                offer(prev[left])
            offer(left)
        return [self.lookup[text[i]] for i in range(n) if alive[i]]


# ----------------------------------------------------------------------------
# byte-level BPE (GGUF "gpt2") and Hugging Face tokenizer.json
# ----------------------------------------------------------------------------


def _byte_unicode_table() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in _byte_unicode_table().items()}
# str.translate table turning a byte-level piece into the latin-1 text of its bytes; the latin-1
# characters that stand for no byte become U+FFFF, which latin-1 cannot encode, so that a piece
# with any character outside the table fails the fast path (HFTokenizer._all_token_bytes)
_BYTE_LEVEL_TO_LATIN1 = {ord(c): chr(b) for c, b in _UNICODE_TO_BYTE.items()}
_BYTE_LEVEL_TO_LATIN1.update({b: "\uffff" for b in range(256) if chr(b) not in _UNICODE_TO_BYTE})


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` with lmdecode's interface."""

    def __init__(self, backend: Any, *, bos_id: int | None, eos_id: int | None, adds_bos: bool, byte_level: bool,
                 special: set[int] | None = None, user_defined: set[int] | None = None) -> None:
        """special: tokens without text (default: the backend's special added tokens);
        user_defined: tokens whose piece is their text as written (GGUF type 4)."""
        self.backend = backend
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.adds_bos = bos_id, eos_id, adds_bos
        self.byte_level = byte_level
        if special is None:
            special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self.special = special
        self.user_defined = user_defined or set()
        self._literal: Any = None  # the backend spelling special tokens as text (encode(parse_special=False))
        self._bytes = self._all_token_bytes()

    @classmethod
    def from_file(cls, path: str | Path) -> "HFTokenizer":
        import tokenizers

        from .loaders import read_json_object

        path = Path(path)
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust library raises a bare Exception on a malformed file
            raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from e
        bos = eos = None
        for name in ("tokenizer_config.json", "config.json"):
            cfg_path = path.parent / name
            if cfg_path.exists():
                cfg = read_json_object(cfg_path)
                for key, target in (("bos_token", "bos"), ("eos_token", "eos")):
                    value = cfg.get(key)
                    if isinstance(value, dict):
                        value = value.get("content")
                    if isinstance(value, str) and backend.token_to_id(value) is not None:
                        if target == "bos" and bos is None:
                            bos = backend.token_to_id(value)
                        if target == "eos" and eos is None:
                            eos = backend.token_to_id(value)
                bos = cfg.get("bos_token_id", bos) if bos is None else bos
                eos = cfg.get("eos_token_id", eos) if eos is None else eos
        # What encode(add_bos=True) adds is what the file's post_processor adds (Llama 2's and
        # Llama 3's TemplateProcessing put their BOS first; GPT-2's, SmolLM2's and Qwen's
        # ByteLevel one adds nothing): the tokenizers package's add_special_tokens=True, as
        # transformers applies it. tokenizer_config.json's add_bos_token is not read: transformers
        # 5 ignores it beside a tokenizer.json and does not save it, so a Llama tokenizer it saved
        # carries its BOS only in the post_processor (reading the flag, that file got no BOS).
        added = backend.encode("a", add_special_tokens=True)
        prefix = []
        for token, is_added in zip(added.ids, added.special_tokens_mask):
            if not is_added:
                break
            prefix.append(token)
        if bos is None and prefix:
            bos = prefix[0]  # a bare tokenizer.json: the token its post_processor puts first
        byte_level = '"ByteLevel"' in path.read_text()
        tokenizer = cls(backend, bos_id=bos if isinstance(bos, int) else None,
                        eos_id=eos if isinstance(eos, int) else None, adds_bos=bool(prefix), byte_level=byte_level)
        tokenizer.strips_leading_space_after_bos = tokenizer._decoder_strips_space_after_bos()
        tokenizer.chat_template = _hf_chat_template(path.parent)
        return tokenizer

    def _decoder_strips_space_after_bos(self) -> bool:
        """Whether the file's decoder reads BOS then a piece with a leading space as the piece
        without it (Llama's Metaspace or Strip decoders do; byte-level ones do not), asked of
        the decoder itself with the vocabulary's first such piece."""
        if self.bos_id is None or not 0 <= self.bos_id < self.vocab_size:
            return False
        for token, piece in enumerate(self._bytes):
            if len(piece) > 1 and piece.startswith(b" ") and piece[1:2] != b" " and token not in self.user_defined:
                try:
                    piece[1:].decode("utf-8")
                except UnicodeDecodeError:
                    continue
                return bool(self.backend.decode([self.bos_id, token], skip_special_tokens=True) == piece[1:].decode("utf-8"))
        return False

    def _all_token_bytes(self) -> list[bytes]:
        """Each token's bytes: none for special tokens and ids without a piece; a user-defined
        token's piece as written; a byte-level piece's characters mapped back to bytes (as UTF-8
        where one is not in GPT-2's table); else sentencepiece's byte fallback or the piece with
        its space marks as spaces. One vocabulary read and str.translate per byte-level piece:
        per-token lookups took 0.19 s for SmolLM2's 49,152 pieces, a sixth of the command line's run."""
        piece_of = {i: piece for piece, i in self.backend.get_vocab(with_added_tokens=True).items()}
        out = []
        for token in range(self.vocab_size):
            piece = piece_of.get(token)
            if token in self.special or piece is None:
                out.append(b"")
            elif token in self.user_defined:
                out.append(piece.encode("utf-8"))
            elif self.byte_level:
                try:
                    out.append(piece.translate(_BYTE_LEVEL_TO_LATIN1).encode("latin-1"))
                except UnicodeEncodeError:
                    out.append(piece.encode("utf-8"))
            else:
                b = _byte_fallback(piece)
                out.append(bytes([b]) if b is not None else piece.replace(SPACE_MARK, " ").encode("utf-8"))
        return out

    def token_text(self, token: int) -> str:
        self._check_id(token)
        return self.backend.id_to_token(token) or ""

    def encode(self, text: str, add_bos: bool = True, parse_special: bool = True) -> list[int]:
        """As Tokenizer.encode. add_bos: what the file's post_processor adds, as transformers'
        ``tokenizer(text)`` (a BOS for Llama 2 and 3, nothing for GPT-2, SmolLM2, Qwen; an EOS
        too where it adds one). parse_special=False spells special added tokens as text
        (transformers' ``split_special_tokens=True``); non-special added tokens still match."""
        self._check_text(text)
        backend = self.backend if parse_special else self._literal_backend()
        return list(backend.encode(text, add_special_tokens=bool(add_bos)).ids)

    def _literal_backend(self) -> Any:
        # a copy with the flag set once, rather than toggling the shared backend's flag around
        # each call, which a second thread's encode would see
        if self._literal is None:
            import tokenizers

            literal = tokenizers.Tokenizer.from_str(self.backend.to_str())
            literal.encode_special_tokens = True
            self._literal = literal
        return self._literal

    def decode(self, ids: Sequence[int]) -> str:
        ids = token_id_list(ids, "ids")
        if self.byte_level or not ids or ids[0] != self.bos_id:
            # a continuation: each token's bytes, as the stream decoder shows them. The file's
            # decoder would drop the first token's space (Llama's Strip, Metaspace), as if the
            # tokens began a document: generated " was there" read "was there", unlike its
            # streamed chunks and the GGUF vocabulary's text
            return super().decode(ids)
        for token in ids:
            self._check_id(token)
        return self.backend.decode(ids, skip_special_tokens=True)  # a document, as transformers decodes it


# llama.cpp's pre-tokenizers for byte-level BPE (src/llama-vocab.cpp, ``llm_tokenizer_bpe``: the
# ``regex_exprs`` of each ``LLAMA_VOCAB_PRE_TYPE_*``). Each regex in a list splits every piece the
# previous ones left into its matches and the text between them, as llama.cpp's unicode_regex_split
# and Hugging Face's ``Split(behavior="isolated")`` both do.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_PRE_TOKENIZER_REGEXES = {
    # DEFAULT: punctuation runs, then GPT-2's words, then digit runs cut into threes from the left
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_REGEX, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "gpt2": (_GPT2_REGEX,),  # GPT2
    "smollm": (r"\p{N}", _GPT2_REGEX),  # SMOLLM, STARCODER: digits one by one, then GPT-2's words
    # LLAMA3 (llama.cpp spells Llama-3's "(?i:'s|...)" out as '[sS]' classes): digits in 1-3s, a space
    # or punctuation mark joins the letters after it, whitespace up to a newline stays with it
    "llama3": (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
    # QWEN2: as LLAMA3 but one digit at a time
    "qwen2": (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
}
# tokenizer.ggml.pre -> the regexes llama.cpp gives it (llama_vocab::impl::load), where a file
# without the key is "default" too. Other names are refused, as llama.cpp refuses them: a guess
# would tokenize differently from the model's tokenizer without a word.
_PRE_TOKENIZER_OF_NAME = {
    "default": "default",
    **dict.fromkeys(["gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
                     "mellum", "modern-bert", "exaone4", "mpt", "olmo", "jais", "trillion", "granite-docling"],
                    "gpt2"),
    **dict.fromkeys(["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2"],
                    "smollm"),
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"], "llama3"),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open"],
                    "qwen2"),
}
# LLAMA3's own names (not dbrx or smaug-bpe): llama.cpp (and Llama-3's tokenizer.json) take a
# piece that is itself a token whole, even where the merges would not reach it, and add a BOS
# unless the file's tokenizer.ggml.add_bos_token says otherwise. (glm4 is left out above:
# llama.cpp versions disagree on whether it ignores merges.)
_LLAMA3_OWN_NAMES = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                   "jina-v5-nano"}


class ByteLevelBPETokenizer(HFTokenizer):
    """GGUF "gpt2" vocabularies: byte-level BPE built in the tokenizers library, pre-tokenized
    as llama.cpp does for the file's ``tokenizer.ggml.pre``."""

    @classmethod
    def from_gguf(cls, reader: Any) -> "ByteLevelBPETokenizer":
        import tokenizers
        from tokenizers import decoders, models, pre_tokenizers

        pre = _gguf_string(reader, "tokenizer.ggml.pre", "") or "default"  # llama.cpp: missing or empty
        if pre not in _PRE_TOKENIZER_OF_NAME:
            raise ValueError(f"unsupported GGUF pre-tokenizer tokenizer.ggml.pre={pre!r} "
                             f"(supported: {', '.join(sorted(_PRE_TOKENIZER_OF_NAME))})")
        tokens, types = _gguf_tokens_and_types(reader)
        # llama.cpp cuts a merge at its first space after the first character
        merges = _gguf_list(reader, "tokenizer.ggml.merges", None, "string of two pieces split by a space",
                            lambda v: type(v) is str and v.find(" ", 1) > 0)
        if merges is None:
            raise ValueError("GGUF metadata lacks tokenizer.ggml.merges")
        cut = [m.find(" ", 1) for m in merges]
        vocab = {t: i for i, t in enumerate(tokens)}
        try:
            model = models.BPE(vocab=vocab, merges=[(m[:at], m[at + 1:]) for m, at in zip(merges, cut)],
                               fuse_unk=False, ignore_merges=pre in _LLAMA3_OWN_NAMES)
        except Exception as e:  # the Rust library's bare Exception, e.g. a merge of a piece that is no token
            raise ValueError(f"tokenizer.ggml.merges: {e}") from e
        # no added tokens in the backend: control and user-defined pieces are cut out of the
        # text before it (encode), in llama.cpp's order and with parse_special honoured
        backend = tokenizers.Tokenizer(model)
        splits = [pre_tokenizers.Split(tokenizers.Regex(r), behavior="isolated")
                  for r in _PRE_TOKENIZER_REGEXES[_PRE_TOKENIZER_OF_NAME[pre]]]
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        backend.decoder = decoders.ByteLevel()
        tokenizer = cls(backend, bos_id=_gguf_token_id(reader, "tokenizer.ggml.bos_token_id", len(tokens)),
                        eos_id=_gguf_token_id(reader, "tokenizer.ggml.eos_token_id", len(tokens)),
                        adds_bos=_gguf_bool(reader, "tokenizer.ggml.add_bos_token", pre in _LLAMA3_OWN_NAMES),
                        byte_level=True,
                        special={i for i, t in enumerate(types) if t in (TOKEN_UNKNOWN, TOKEN_CONTROL)},
                        user_defined={i for i, t in enumerate(types) if t == TOKEN_USER_DEFINED})
        tokenizer.adds_eos = _gguf_bool(reader, "tokenizer.ggml.add_eos_token", False)
        return tokenizer

    def __init__(self, backend: Any, **kwargs: Any) -> None:
        super().__init__(backend, **kwargs)

        def piece_of(token: int) -> str:
            return self.backend.id_to_token(token) or ""

        self._split_pieces = (_split_order(piece_of, self.user_defined),
                              _split_order(piece_of, self.special | self.user_defined))

    def encode(self, text: str, add_bos: bool = True, parse_special: bool = False) -> list[int]:
        """As Tokenizer.encode, as llama.cpp tokenizes: user-defined pieces always and control
        pieces with parse_special take their ids, and each stretch of text between them is
        encoded on its own."""
        self._check_text(text)
        return _encode_around_pieces(self, text, add_bos, parse_special,
                                     lambda fragment: self.backend.encode(fragment, add_special_tokens=False).ids)


# ----------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------

_MISSING = object()


def _gguf_field(metadata: Any, key: str, default: Any = _MISSING) -> Any:
    """A GGUF metadata value from a GGUFReader or from a dict of plain values (the key's contents)."""
    if isinstance(metadata, Mapping):
        if key in metadata:
            return metadata[key]
    else:
        field = metadata.fields.get(key)
        if field is not None:
            return field.contents()
    if default is _MISSING:
        raise ValueError(f"GGUF metadata lacks {key}")
    return default


def _gguf_list(metadata: Any, key: str, length: int | None, kind: str, ok: Callable[[Any], bool]) -> list | None:
    """The array at key (None when absent), checked: a list of ``length`` elements (when given)
    each passing ``ok``. Checked when the tokenizer is built, so that a bad file fails there
    with its key named rather than at some later encode (an IndexError, or ``-'a'``)."""
    value = _gguf_field(metadata, key, None)
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{key} must be an array of {kind}s, got {value!r:.80}")
    if length is not None and len(value) != length:
        raise ValueError(f"{key} has {len(value)} entries but tokenizer.ggml.tokens has {length}")
    if not all(map(ok, value)):
        for i, v in enumerate(value):
            if not ok(v):
                raise ValueError(f"{key} must be an array of {kind}s; entry {i} is {v!r:.80}")
    return list(value)


def _is_int(v: Any) -> bool:
    # the exact type first, as GGUF arrays hold them: an ABC isinstance for each of Llama 2's
    # 32,000 entries took 25 ms, more than the rest of building its tokenizer
    return type(v) is int or (isinstance(v, numbers.Integral) and not isinstance(v, bool))


def _is_real(v: Any) -> bool:
    return type(v) is float or (isinstance(v, numbers.Real) and not isinstance(v, bool))


def _gguf_tokens_and_types(metadata: Any) -> tuple[list[str], list[int]]:
    """tokenizer.ggml.tokens and tokenizer.ggml.token_type (all normal when absent), checked."""
    tokens = _gguf_list(metadata, "tokenizer.ggml.tokens", None, "string", lambda v: type(v) is str)
    if not tokens:
        raise ValueError("GGUF metadata lacks tokenizer.ggml.tokens" if tokens is None
                         else "tokenizer.ggml.tokens is empty")
    types = _gguf_list(metadata, "tokenizer.ggml.token_type", len(tokens), f"token type (0-{N_TOKEN_TYPES - 1})",
                       lambda v: _is_int(v) and 0 <= v < N_TOKEN_TYPES)
    if types is None:
        return tokens, [TOKEN_NORMAL] * len(tokens)
    return tokens, [int(t) for t in types]


def _encode_around_pieces(tokenizer: Any, text: str, add_bos: bool, parse_special: bool,
                          encode_plain: Callable[[str], list[int]]) -> list[int]:
    """A GGUF vocabulary's encode: BOS (and EOS at the end) if asked for and the vocabulary adds
    one, as llama.cpp's add_special; user-defined pieces (and, with parse_special, control
    pieces) take their own ids, as llama.cpp matches them, and the text between them goes
    through encode_plain."""
    ids = [tokenizer.bos_id] if add_bos and tokenizer.adds_bos and tokenizer.bos_id is not None else []
    for fragment in _split_on_pieces(text, tokenizer._split_pieces[bool(parse_special)]):
        if isinstance(fragment, int):
            ids.append(fragment)
        else:
            ids += encode_plain(fragment)
    if add_bos and tokenizer.adds_eos and tokenizer.eos_id is not None:
        ids.append(tokenizer.eos_id)
    return ids


def _gguf_token_id(metadata: Any, key: str, vocab_size: int) -> int | None:
    value = _gguf_field(metadata, key, None)
    if value is None:
        return None
    if not _is_int(value):
        raise ValueError(f"{key}={value!r:.80} is not a token id (the vocabulary has {vocab_size} tokens)")
    if not 0 <= value < vocab_size:
        # llama.cpp warns and falls back to a built-in id; there is none here: no such token,
        # as Model.load does with the same file (loaders._warn_outside)
        warnings.warn(f"{key}: token id {value} outside the vocabulary [0, {vocab_size}) ignored", stacklevel=3)
        return None
    return int(value)


def _gguf_bool(metadata: Any, key: str, default: bool) -> bool:
    value = _gguf_field(metadata, key, None)
    if value is None:
        return default
    if not isinstance(value, (bool, np.bool_)):  # bool("false") would be True
        raise ValueError(f"{key} must be a boolean, got {value!r:.80}")
    return bool(value)


def _gguf_string(metadata: Any, key: str, default: str) -> str:
    value = _gguf_field(metadata, key, None)
    if value is None:
        return default
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {value!r:.80}")
    return value


def _hf_chat_template(directory: Path) -> str | None:
    """A Hugging Face directory's chat template: ``chat_template.jinja`` (what transformers
    saves now), else ``tokenizer_config.json``'s ``chat_template`` (a string, or named
    templates of which "default" is taken)."""
    from .loaders import read_json_object

    jinja = directory / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    config_path = directory / "tokenizer_config.json"
    if not config_path.exists():
        return None
    template = read_json_object(config_path).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def load_tokenizer(path: str | Path, vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer in a llama2.c ``.bin``, a ``.gguf``, a ``tokenizer.json`` or a directory holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such tokenizer file")
    if path.suffix == ".json":
        return HFTokenizer.from_file(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        from .gguf_file import read_gguf_file

        try:
            return Tokenizer.from_gguf_metadata(read_gguf_file(path).tokenizer_metadata())
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
    return ScoreBPETokenizer.from_llama2c(path, vocab_size)
