"""Tokenizers: llama2.c's encoder exactly, GGUF vocabularies, tokenizer.json,
streaming without split characters, and corrupt files."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

import lmdecode as ld
from gguf_files import write_gguf
from lmdecode.tokenizer import _UNICODE_TO_BYTE, ScoreBPETokenizer, Tokenizer, _byte_unicode_table, load_tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MODELS = SHARED / "models"


@pytest.fixture(scope="module")
def tok512():
    return load_tokenizer(MODELS / "tok512.bin")


def llama2c_encode_reference(tok: ScoreBPETokenizer, text: str) -> list[int]:
    """llama2.c's encode() as written there: rescan every pair after each merge (O(n^2))."""
    ids = [tok.lookup[ch] if ch in tok.lookup else None for ch in " " + text]
    symbols = []
    for ch, i in zip(" " + text, ids):
        symbols += [i] if i is not None else [b + 3 for b in ch.encode("utf-8")]
    while True:
        best, best_at = -1e10, -1
        for i in range(len(symbols) - 1):
            merged = tok.lookup.get(tok.pieces[symbols[i]] + tok.pieces[symbols[i + 1]])
            if merged is not None and tok.scores[merged] > best:
                best, best_at = tok.scores[merged], i
        if best_at < 0:
            return [1] + symbols
        symbols[best_at : best_at + 2] = [tok.lookup[tok.pieces[symbols[best_at]] + tok.pieces[symbols[best_at + 1]]]]


def test_once_upon_a_time_as_llama2c(tok512):
    assert tok512.encode("Once upon a time") == [1, 403, 407, 261, 378]
    assert tok512.encode("Once upon a time", add_bos=False) == [403, 407, 261, 378]
    assert tok512.decode([1, 403, 407, 261, 378]) == "Once upon a time"
    assert tok512.encode("") == [1]
    assert repr(tok512) == "ScoreBPETokenizer(vocab_size=512, bos_id=1, eos_id=2, chat_template=False)"


def test_heap_merging_equals_llama2c_rescanning(tok512):
    text = (SHARED / "data" / "tinystories_valid_excerpt.txt").read_text()[:3000]
    for chunk in [text[i : i + 300] for i in range(0, 3000, 300)] + ["naïve café ☃ 日本"]:
        assert tok512.encode(chunk) == llama2c_encode_reference(tok512, chunk)


def _whole_text_merge(tok: ScoreBPETokenizer, text: str) -> list[int]:
    """The merge over the whole text at once (the heap merge, itself checked against llama2.c's
    rescanning above), without the word-by-word encoding of long texts."""
    prefixed = ("\u2581" + text.replace(" ", "\u2581")) if tok.space_mark else " " + text
    return [tok.bos_id] + tok._merge(tok._symbols(prefixed))


@pytest.mark.parametrize("vocab", ["tok512.bin", "llama-2-tiny-random.gguf"])
def test_long_texts_encode_word_by_word_as_one_merge(vocab):
    """Texts of 256 characters and more are cut before spaces no vocabulary piece spans and each
    distinct word is merged once: the same ids as merging the whole text, on the shared texts
    (whitespace runs, newlines, punctuation, characters only bytes can spell)."""
    tok = load_tokenizer(MODELS / vocab)
    texts = [(SHARED / "data" / name).read_text()[:60000] for name in
             ("tinystories_valid_excerpt.txt", "wikitext2_test_excerpt.txt", "tinyshakespeare.txt")]
    texts.append(("  two  spaces\tand tabs\n\n naïve café ☃ 日本 🙂 " * 20).strip())
    for text in texts:
        assert len(text) >= 256
        assert tok.encode(text) == _whole_text_merge(tok, text)
        assert tok.encode(text) == _whole_text_merge(tok, text)  # again, from the words' cache


def test_word_by_word_encoding_keeps_merges_across_spaces():
    """A vocabulary whose pieces span spaces ("a b", " a b"): no cut where a merge could cross,
    so the ids equal the whole-text merge, where cutting before every space would not."""
    pieces = ["<unk>", "<s>", "</s>", " ", "a", "b", " a", " b", "a b", " a b", "ab", " ab"]
    scores = [0, 0, 0, 0, 0, 0, -3, -3, -1, -2, -4, -5]
    tok = ScoreBPETokenizer(pieces, scores, bos_id=1, eos_id=2, space_mark=False, special={0, 1, 2})
    text = " ".join(np.random.default_rng(0).choice(["a", "b", "ab", "a b"], size=200))
    want = _whole_text_merge(tok, text)
    assert tok.encode(text) == want
    naive = [1] + [i for w in text.split(" ") for i in tok._merge(tok._symbols(" " + w))]  # cut before every space
    assert naive != want  # the vocabulary does merge across spaces
    # a character spelt by byte tokens is "<0xNN>" to the merges, so a piece "<0xA9> a" merges
    # the last byte of "é" with " a": no cut after such a character
    pieces += ["<0xC3>", "<0xA9>", "<0xA9> a"]
    scores += [0, 0, 10]
    tok = ScoreBPETokenizer(pieces, scores, bos_id=1, eos_id=2, space_mark=False, special={0, 1, 2})
    text = " ".join(np.random.default_rng(1).choice(["a", "b", "é", "bé"], size=200))
    want = _whole_text_merge(tok, text)
    assert tok.lookup["<0xA9> a"] in want and tok.encode(text) == want


def test_round_trip_and_gguf_vocabulary_agree(tok512):
    gguf = load_tokenizer(MODELS / "stories260K.gguf")
    text = (SHARED / "data" / "tinystories_valid_excerpt.txt").read_text()[:20000]
    ids = tok512.encode(text)
    assert gguf.encode(text) == ids
    assert tok512.decode(ids) == text
    assert gguf.decode(ids) == text


def test_llama2_vocabulary_from_gguf():
    tok = load_tokenizer(MODELS / "llama-2-tiny-random.gguf")
    assert tok.vocab_size == 32000 and tok.bos_id == 1 and tok.eos_id == 2
    assert tok.encode("Hello world") == [1, 15043, 3186]  # Llama-2's ids for "Hello", "▁world"
    for text in ["Hello world", "héllo wörld", "日本語テキスト", "emoji 🙂 ok", "  two  spaces", "tab\tand\nnewline"]:
        assert tok.decode(tok.encode(text)) == text


def test_stream_decoder_never_splits_a_character(tok512):
    text = "Lily saw a ☃ and a 🙂 in the café."
    ids = tok512.encode(text, add_bos=False)
    assert any(0x03 <= i < 0x103 for i in ids)  # byte-fallback tokens are in play
    decoder = tok512.stream_decoder()
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == " " + text
    for piece in pieces:
        piece.encode("utf-8")  # no lone surrogates or replacement halves
        assert "\ufffd" not in piece


def test_hf_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<s>": 0, "</s>": 1, "h": 2, "e": 3, "l": 4, "o": 5, "he": 6, "ll": 7, "hell": 8, "hello": 9, "Ġ": 10, "w": 11, "r": 12, "d": 13}
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o")]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.save(str(tmp_path / "tokenizer.json"))
    # the BOS comes from the post_processor, as transformers 5 adds it: a config's add_bos_token
    # alone adds none (transformers ignores it beside a tokenizer.json)
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true}')
    tok = load_tokenizer(tmp_path)
    assert tok.bos_id == 0 and tok.eos_id == 1
    assert tok.encode("hello world") == [9, 10, 11, 5, 12, 4, 13]
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "</s>", "add_bos_token": false}')
    tok = load_tokenizer(tmp_path)
    assert tok.bos_id == 0  # the token the post_processor puts first, where the config names none
    assert tok.encode("hello world") == [0, 9, 10, 11, 5, 12, 4, 13]
    assert tok.encode("hello world", add_bos=False) == [9, 10, 11, 5, 12, 4, 13]
    assert tok.decode([9, 10, 11, 5, 12, 4, 13]) == "hello world"
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "<s>", ')
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: not valid JSON"):
        load_tokenizer(tmp_path)


# llama.cpp's pre-tokenizer regexes (src/llama-vocab.cpp, llm_tokenizer_bpe's regex_exprs per
# LLAMA_VOCAB_PRE_TYPE_*), written out here rather than imported so that a slip in lmdecode's copy
# shows up; keyed by one tokenizer.ggml.pre name of each type
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
         r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA_CPP_REGEXES = {
    None: [r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],  # DEFAULT: no tokenizer.ggml.pre
    "default": [r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
    "gpt-2": [GPT2],
    "smollm": [r"\p{N}", GPT2],
    "starcoder": [r"\p{N}", GPT2],
    "llama-bpe": [LLAMA3],
    "llama3": [LLAMA3],
    "qwen2": [QWEN2],
    "deepseek-r1-qwen": [QWEN2],
}
# texts on which the types split differently: digit runs, upper-case contractions (which only
# change the pieces when letters follow, as in O'TOOLE), whitespace before newlines, punctuation
# before letters and newlines, non-ASCII letters and digits (Arabic-Indic, fractions, Roman
# numerals, superscripts)
PRE_TOKENIZER_TEXTS = [
    "I'm 12345 HELLO's\n\n  x!!abc  \r\n 3.14",
    "DON'T WE'LL YOU'RE i'VE THEY'D it's O'SULLIVAN O'TOOLE",
    "1 12 123 1234 12345 123456 1234567",
    "a\n  \n\tb   c.\r\n\r\n  ",
    "!!abc ?x ,y ...z",
    "ÄÖ ٣٤٥ ¼½ Ⅻ x² 日本語",
    "$100+200=300 |~^ a<b>c",
]
BYTE_LEVEL = _byte_unicode_table()  # byte -> the character byte-level vocabularies spell it with


def llama_cpp_split(patterns: list[str], text: str) -> list[str]:
    """llama.cpp's unicode_regex_split: each regex in turn cuts every piece into its matches and
    the stretches between them (which stay pieces too)."""
    import regex  # the third-party module: \p{L}, \p{N} as llama.cpp and the tokenizers library read them

    pieces = [text]
    for pattern in patterns:
        cut = []
        for piece in pieces:
            at = 0
            for match in regex.finditer(pattern, piece):
                cut += [piece[at:match.start()]] if match.start() > at else []
                cut.append(match.group())
                at = match.end()
            cut += [piece[at:]] if at < len(piece) else []
        pieces = cut
    return pieces


def byte_level_gguf(pre: str | None, tokens: Sequence[str] = (), merges: Sequence[str] = ()) -> dict:
    """tokenizer.* metadata of a GGUF "gpt2" vocabulary: the 256 byte-level characters (token id =
    byte value), then tokens."""
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": [BYTE_LEVEL[b] for b in range(256)] + list(tokens),
            "tokenizer.ggml.merges": list(merges)}
    if pre is not None:
        meta["tokenizer.ggml.pre"] = pre
    return meta


def pre_tokenized(pre: str | None, text: str) -> list[str]:
    """The pieces that the tokenizer of a GGUF vocabulary with this tokenizer.ggml.pre cuts text
    into before its merges, as text."""
    backend = Tokenizer.from_gguf_metadata(byte_level_gguf(pre)).backend
    return [bytes(_UNICODE_TO_BYTE[c] for c in piece).decode("utf-8")
            for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text)]


@pytest.mark.parametrize("pre", LLAMA_CPP_REGEXES)
def test_gguf_pre_tokenizers_split_as_llama_cpp(pre):
    for text in PRE_TOKENIZER_TEXTS:
        assert pre_tokenized(pre, text) == llama_cpp_split(LLAMA_CPP_REGEXES[pre], text), text


def test_gguf_pre_tokenizer_types_differ_on_the_texts():
    """Each type splits some test text differently from each other type, so a tokenizer built
    with the wrong regexes fails the test above."""
    kinds = [None, "gpt-2", "smollm", "llama-bpe", "qwen2"]
    split = {pre: [pre_tokenized(pre, text) for text in PRE_TOKENIZER_TEXTS] for pre in kinds}
    for i, a in enumerate(kinds):
        for b in kinds[i + 1:]:
            assert split[a] != split[b], (a, b)
    # what the old construction (digits one by one, then GPT-2's regex, for all three) got wrong
    assert pre_tokenized("llama-bpe", "12345 DON'T") == ["123", "45", " DON", "'T"]
    assert pre_tokenized("qwen2", "12345 DON'T") == ["1", "2", "3", "4", "5", " DON", "'T"]
    assert pre_tokenized("gpt-2", "12345 DON'T") == ["12345", " DON", "'", "T"]


def test_gguf_byte_level_encode_by_hand(tmp_path):
    # ids 0-255 are the bytes; then "34" (256), "12" (257), "123" (258) and "abc" (259), which no
    # merge builds. Merges in rank order: 3+4, 1+2, 12+3.
    tokens, merges = ["34", "12", "123", "abc"], ["3 4", "1 2", "12 3"]
    expected = {
        # "123" "4" "abc": 1+2 then 12+3; "abc" is a token, taken whole (llama.cpp's ignore_merges)
        "llama-bpe": [258, 52, 259],
        # the same pieces, but dbrx's vocabularies do not skip the merges
        "dbrx": [258, 52, 97, 98, 99],
        # one digit at a time
        "qwen2": [49, 50, 51, 52, 97, 98, 99],
        "smollm": [49, 50, 51, 52, 97, 98, 99],
        # "1234" "abc": 3+4 ranks first, then 1+2, and 12+34 is no merge
        "gpt-2": [257, 256, 97, 98, 99],
        # "1234" is cut into "123" "4" by [0-9]{3}
        None: [258, 52, 97, 98, 99],
    }
    for pre, ids in expected.items():
        tok = Tokenizer.from_gguf_metadata(byte_level_gguf(pre, tokens, merges))
        assert tok.encode("1234abc", add_bos=False) == ids, pre
        assert tok.decode(ids) == "1234abc"
    # the same through a GGUF file (GGUFReader fields rather than plain values)
    def vocabulary(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("llama-bpe")
        w.add_token_list([BYTE_LEVEL[b] for b in range(256)] + tokens)
        w.add_token_merges(merges)

    write_gguf(tmp_path / "vocab.gguf", "llama", {}, {}, more=vocabulary)
    assert load_tokenizer(tmp_path / "vocab.gguf").encode("1234abc", add_bos=False) == [258, 52, 259]


def test_byte_level_token_bytes_by_hand():
    """Each token's bytes: GPT-2's table characters back to their bytes, a piece with any other
    character (a plain space, a soft hyphen, U+00AD, or a CJK character) as its UTF-8, control
    tokens none."""
    tokens = ["Ġthe", "ĊĊ", "a b", "x\u00ady", "日本", "éé", "Ã©", "<|im_start|>"]
    meta = byte_level_gguf("gpt-2", tokens)
    meta["tokenizer.ggml.token_type"] = [1] * (256 + len(tokens) - 1) + [3]
    tok = Tokenizer.from_gguf_metadata(meta)
    got = [tok.token_bytes(256 + i) for i in range(len(tokens))]
    assert got == [b" the", b"\n\n", b"a b", "x\u00ady".encode(), "日本".encode(), b"\xe9\xe9", "é".encode(), b""]
    assert [tok.token_bytes(b) for b in range(256)] == [bytes([b]) for b in range(256)]


def test_gguf_byte_level_bos_default():
    """llama.cpp adds a BOS for Llama 3's vocabularies unless tokenizer.ggml.add_bos_token says
    otherwise; for the others only when it says so."""
    for pre, add_bos_token, adds in [("llama-bpe", None, True), ("llama-bpe", False, False), ("qwen2", None, False),
                                     ("qwen2", True, True), ("dbrx", None, False)]:
        meta = dict(byte_level_gguf(pre, ["<s>"]), **{"tokenizer.ggml.bos_token_id": 256})
        if add_bos_token is not None:
            meta["tokenizer.ggml.add_bos_token"] = add_bos_token
        assert Tokenizer.from_gguf_metadata(meta).encode("ab") == [256] * adds + [97, 98], (pre, add_bos_token)


@pytest.mark.parametrize("pre", ["gpt2", "tekken", "glm4", "LLAMA3", "no-such-pre-tokenizer"])
def test_gguf_unknown_pre_tokenizer_is_refused(pre):
    # names llama.cpp refuses too (gpt2, LLAMA3: it matches exactly), and ones it knows but lmdecode
    # does not implement (tekken's regex; glm4, on which llama.cpp versions disagree)
    with pytest.raises(ValueError, match=rf"tokenizer\.ggml\.pre='{pre}' \(supported: .*llama-bpe.*qwen2.*smollm"):
        Tokenizer.from_gguf_metadata(byte_level_gguf(pre))


def test_model_tokenizer_and_text_generation():
    model = ld.Model.load(MODELS / "stories260K.bin")
    out = model.generate("Once upon a time", max_new_tokens=30, temperature=0)
    assert out.prompt_tokens == [1, 403, 407, 261, 378]
    assert out.text.startswith(", there was a little girl named Lily")
    chunks = list(model.generate("Once upon a time", max_new_tokens=30, temperature=0, stream=True))
    assert "".join(c.text for c in chunks) == out.text


def test_stream_never_splits_a_utf8_character():
    """Byte-fallback tokens <0xC3> <0xA9> are "é": the stream shows it whole with the second; a
    sequence cut after the first byte ends with U+FFFD in its last chunk, as .text does."""
    model = ld.Model.load(MODELS / "stories260K.bin")
    first, second = 3 + 0xC3, 3 + 0xA9  # tok512.bin: <0x00> .. <0xFF> are ids 3 .. 258
    assert model.tokenizer.token_bytes(first) == b"\xc3" and model.tokenizer.token_bytes(second) == b"\xa9"

    def forced(tokens):  # after the one-token prompt: <0xC3>, then <0xA9>
        logits = np.zeros(512, np.float32)
        logits[first if len(tokens) % 2 else second] = 30.0
        return logits

    for n_new, pieces in ((2, ["", "é"]), (1, ["\ufffd"]), (3, ["", "é", "\ufffd"])):
        out = ld.generate(forced, [1], max_new_tokens=n_new, temperature=0, tokenizer=model.tokenizer)
        chunks = list(ld.generate(forced, [1], max_new_tokens=n_new, temperature=0, tokenizer=model.tokenizer, stream=True))
        assert out.text == "".join(pieces)
        assert [c.text for c in chunks] == pieces
        assert [c.finish_reason for c in chunks] == [None] * (n_new - 1) + ["length"]


def test_corrupt_tokenizer_files(tmp_path):
    data = (MODELS / "tok512.bin").read_bytes()
    (tmp_path / "short.bin").write_bytes(data[:2])
    with pytest.raises(ValueError, match="truncated llama2.c tokenizer"):
        load_tokenizer(tmp_path / "short.bin")
    (tmp_path / "cut.bin").write_bytes(data[:3001])
    with pytest.raises(ValueError, match="short.bin|cut.bin"):
        load_tokenizer(tmp_path / "cut.bin", vocab_size=512)
    with pytest.raises(FileNotFoundError, match="no such tokenizer"):
        load_tokenizer(tmp_path / "missing.bin")
    # tokenizer.json and its config: errors name the file (the tokenizers library raised a
    # bare Exception without it)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": {')
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a readable tokenizer\.json"):
        load_tokenizer(tmp_path / "hf")


# ----------------------------------------------------------------------------
# Hugging Face tokenizer.json files as transformers 5 saves them, built here
# ----------------------------------------------------------------------------

HF_CORPUS = ["Hello world, was there a cat? There was a cat there.", "naïve café ☃", "Once upon a time there was"] * 10
# Llama 3's split (as its tokenizer.json writes it)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def hf_tokenizer_dir(path: Path, kind: str) -> Path:
    """A tokenizer.json trained here and a tokenizer_config.json without add_bos_token (what
    transformers 5's save_pretrained writes), in the shape of:
    - "llama2": sentencepiece-style BPE (Llama 2, Mistral): <unk> <s> </s>, then <0x00>..<0xFF>
      as ids 3..258, U+2581 for spaces, byte fallback, a decoder that drops the first space, and
      a TemplateProcessing post_processor that puts <s> first;
    - "llama3": byte-level BPE whose post_processor puts <|begin_of_text|> first;
    - "smollm": byte-level BPE with the ByteLevel post_processor (SmolLM2, GPT-2, Qwen): no BOS,
      though the config names one (<|im_start|>)."""
    import json

    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
    from tokenizers import Tokenizer as Backend

    path.mkdir(parents=True, exist_ok=True)
    if kind == "llama2":
        specials = ["<unk>", "<s>", "</s>"]
        trained = Backend(models.BPE(unk_token="<unk>"))
        trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        trained.train_from_iterator(HF_CORPUS, trainers.BpeTrainer(vocab_size=100, special_tokens=specials))
        model = json.loads(trained.to_str())["model"]
        # the byte tokens as ids 3..258 of the model's own vocabulary, as in Llama 2's file
        pieces = specials + [f"<0x{b:02X}>" for b in range(256)]
        pieces += [p for p, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]) if p not in specials]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        backend = Backend(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=merges, unk_token="<unk>",
                                     byte_fallback=True, fuse_unk=True))
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                             decoders.Strip(" ", 1, 0)])
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                               special_tokens=[("<s>", 1)])
        config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    else:
        bos, eos = ("<|begin_of_text|>", "<|end_of_text|>") if kind == "llama3" else ("<|im_start|>", "<|im_end|>")
        backend = Backend(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        backend.train_from_iterator(HF_CORPUS, trainers.BpeTrainer(
            vocab_size=330, special_tokens=[bos, eos], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        backend.decoder = decoders.ByteLevel()
        if kind == "llama3":
            backend.post_processor = processors.Sequence([
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                              special_tokens=[(bos, 0)])])
        else:
            backend.post_processor = processors.ByteLevel(trim_offsets=False)
        config = {"bos_token": bos, "eos_token": eos}
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_tokenizers")
    return {kind: hf_tokenizer_dir(root / kind, kind) for kind in ("llama2", "llama3", "smollm")}


HF_TEXTS = ["Hello world", " there was", "  two  spaces", "naïve café ☃ 🙂", "<s>hi</s>", "<|im_start|>hi", ""]


def test_hf_bos_comes_from_the_post_processor(hf_dirs):
    """A Llama tokenizer that transformers 5 saved has no add_bos_token in its config: its BOS
    is in the post_processor only (lmdecode read the config's flag, and added none)."""
    llama2, llama3, smollm = (load_tokenizer(hf_dirs[k]) for k in ("llama2", "llama3", "smollm"))
    hello = llama2.encode("Hello there", add_bos=False)
    assert llama2.encode("Hello there") == [1] + hello and llama2.bos_id == 1 and llama2.adds_bos
    assert [llama2.token_text(i) for i in hello] == ["\u2581Hello", "\u2581there"]
    assert llama2.encode("") == [1] and llama2.encode("", add_bos=False) == []
    begin = llama3.backend.token_to_id("<|begin_of_text|>")
    assert begin == llama3.bos_id == 0
    assert llama3.encode("Hello world") == [0] + llama3.encode("Hello world", add_bos=False)
    assert smollm.bos_id == 0 and not smollm.adds_bos  # the config names a BOS the post_processor never adds
    assert smollm.encode("Hello world") == smollm.encode("Hello world", add_bos=False)
    assert 0 not in smollm.encode("Hello world")


@pytest.mark.oracle
@pytest.mark.parametrize("kind", ["llama2", "llama3", "smollm"])
def test_hf_encode_and_decode_as_transformers(hf_dirs, kind):
    from oracle import require_transformers

    _, transformers = require_transformers()
    ours, theirs = load_tokenizer(hf_dirs[kind]), transformers.AutoTokenizer.from_pretrained(str(hf_dirs[kind]))
    for text in HF_TEXTS:
        ids = theirs(text).input_ids
        assert ours.encode(text) == ids, text
        assert ours.encode(text, add_bos=False) == theirs(text, add_special_tokens=False).input_ids, text
        # parse_special=False: special tokens spelt as text, as transformers' split_special_tokens
        assert ours.encode(text, parse_special=False) == theirs(text, split_special_tokens=True).input_ids, text
        # a document (BOS first where the tokenizer adds one) decodes as transformers decodes it
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text


def test_hf_sentencepiece_continuation_keeps_its_leading_space(hf_dirs):
    """Generated tokens are a continuation: "▁was ▁there ▁there ▁there" reads " was there there
    there" in .text, in the stream's chunks and in decode, as with the GGUF vocabulary; the file's
    decoder dropped the first space, as at the start of a document, so .text read "was there
    there there" while the chunks joined to " was there there there"."""
    tok = load_tokenizer(hf_dirs["llama2"])
    was, there = tok.backend.token_to_id("\u2581was"), tok.backend.token_to_id("\u2581there")
    assert tok.decode([there]) == " there" and tok.decode([was, there]) == " was there"
    forced = [was, there, there, there]

    def step(tokens):
        logits = np.zeros(tok.vocab_size, np.float32)
        logits[forced[len(tokens) - 2]] = 30.0  # after the prompt [BOS, "▁Hello"]
        return logits

    prompt = tok.encode("Hello")
    assert len(prompt) == 2
    out = ld.generate(step, prompt, max_new_tokens=4, temperature=0, tokenizer=tok)
    chunks = list(ld.generate(step, prompt, max_new_tokens=4, temperature=0, tokenizer=tok, stream=True))
    assert out.tokens == forced
    assert out.text == " was there there there"
    assert [c.text for c in chunks] == [" was", " there", " there", " there"]
    # a document keeps decoding as the file's decoder does (the encoder's space before its first
    # word dropped), and cut anywhere after its first word it reads as the whole
    ids = tok.encode("Hello world, was there a cat?")
    assert tok.decode(ids) == "Hello world, was there a cat?"
    for cut in range(2, len(ids)):
        assert tok.decode(ids[:cut]) + tok.decode(ids[cut:]) == "Hello world, was there a cat?"

@pytest.mark.parametrize("source", ["tok512.bin", "llama-2-tiny-random.gguf", "tokenizer.json llama2",
                                    "tokenizer.json llama3"])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("stop", [None, "zzz", "Hello", " Hello"])
def test_reply_to_a_bos_only_prompt_reads_as_decode_of_prompt_and_reply(source, stream, stop, hf_dirs):
    """A reply's text is what decode(prompt + reply) adds to decode(prompt). After a prompt of
    BOS alone, sentencepiece-style vocabularies drop the space their encoder put before a
    text's first word (llama2.c and transformers print "Hello", not " Hello"); .text said
    " Hello". Stop strings are matched against the text shown: " Hello" is not in "Hello world"."""
    tok = load_tokenizer(hf_dirs[source.split()[1]] if source.startswith("tokenizer.json") else MODELS / source)
    sentencepiece = source != "tokenizer.json llama3"
    assert tok.strips_leading_space_after_bos == sentencepiece
    forced = tok.encode("Hello world", add_bos=False)
    assert tok.decode(forced).startswith(" Hello" if sentencepiece else "Hello")

    def replies(prompt):
        def step(tokens):
            logits = np.zeros(tok.vocab_size, np.float32)
            logits[forced[len(tokens) - len(prompt)]] = 30.0
            return logits
        return step

    for prompt in ([tok.bos_id], [tok.bos_id, tok.bos_id]):
        step = replies(prompt)
        kwargs = dict(max_new_tokens=len(forced), temperature=0, tokenizer=tok, stop=stop)
        chunks = list(ld.generate(step, prompt, stream=True, **kwargs)) if stream else None
        out = ld.generate(step, prompt, **kwargs)
        text = "".join(c.text for c in chunks) if stream else out.text
        whole = tok.decode(prompt + forced)
        assert tok.decode(prompt) == "" and whole == "Hello world"
        expected = whole[:whole.find(stop)] if stop and stop in whole else whole
        assert text == out.text == expected, (prompt, stop)
        assert out.finish_reason == ("stop" if stop and stop in whole else "length")
    # after a prompt that holds text, the reply keeps its space, as decode(prompt + reply) shows
    prompt = tok.encode("world")
    out = ld.generate(replies(prompt), prompt, max_new_tokens=len(forced), temperature=0, tokenizer=tok)
    assert tok.decode(prompt) + out.text == tok.decode(prompt + forced)
    assert out.text == (" Hello world" if sentencepiece else "Hello world")



# ----------------------------------------------------------------------------
# GGUF user-defined tokens, parse_special, bad metadata, bad text
# ----------------------------------------------------------------------------

# a sentencepiece-style vocabulary: (piece, score, type). "▁Hello" is a normal token the merges
# reach; "Hello", "abc", "xa" and "x▁y" are user-defined (type 4); "<|c|>" is a control token
SPM_VOCAB = [("<unk>", 0, 2), ("<s>", 0, 3), ("</s>", 0, 3), ("\u2581", -1, 1), ("H", -2, 1), ("e", -2, 1),
             ("l", -2, 1), ("o", -2, 1), ("x", -2, 1), ("a", -2, 1), ("b", -2, 1), ("c", -2, 1), ("y", -2, 1),
             ("\u2581H", 1, 1), ("\u2581He", 2, 1), ("\u2581Hel", 3, 1), ("\u2581Hell", 4, 1), ("\u2581Hello", 5, 1),
             ("\u2581x", 6, 1), ("Hello", 0, 4), ("abc", 0, 4), ("xa", 0, 4), ("x\u2581y", 0, 4), ("<|c|>", 0, 3),
             ("<", -3, 1), (">", -3, 1), ("|", -3, 1)]
# a byte-level one: the 256 bytes, then "ĠHello" (merged from "Ġ" "H" "e" "l" "l" "o"),
# user-defined "Hello" (261) and control "<|im_start|>" (262)
BPE_TOKENS = ["ĠH", "ĠHe", "ĠHel", "ĠHell", "ĠHello", "Hello", "<|im_start|>"]
BPE_TYPES = [1] * 256 + [1, 1, 1, 1, 1, 4, 3]
BPE_MERGES = ["Ġ H", "ĠH e", "ĠHe l", "ĠHel l", "ĠHell o"]


def spm_vocabulary(w):
    w.add_tokenizer_model("llama")
    w.add_token_list([p for p, _, _ in SPM_VOCAB])
    w.add_token_scores([float(s) for _, s, _ in SPM_VOCAB])
    w.add_token_types([t for _, _, t in SPM_VOCAB])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)


def bpe_vocabulary(w):
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list([BYTE_LEVEL[b] for b in range(256)] + BPE_TOKENS)
    w.add_token_types(BPE_TYPES)
    w.add_token_merges(BPE_MERGES)


def test_gguf_user_defined_tokens_are_whole_tokens(tmp_path):
    """llama.cpp cuts user-defined pieces (type 4) out of the text whatever parse_special says,
    longest piece first, and encodes each stretch between them on its own (sentencepiece-style:
    with its dummy-prefix space). The ids below are llama.cpp's (llama-cpp-python 0.3.36,
    tokenize(add_bos=True, special=False and True) on these files), worked out by hand in the
    comments. lmdecode merged through them: "Hello" gave "▁Hello" (17)."""
    write_gguf(tmp_path / "spm.gguf", "llama", {}, {}, more=spm_vocabulary)
    write_gguf(tmp_path / "bpe.gguf", "llama", {}, {}, more=bpe_vocabulary)
    spm, bpe = load_tokenizer(tmp_path / "spm.gguf"), load_tokenizer(tmp_path / "bpe.gguf")
    spm_cases = {
        "Hello": [1, 19],  # the user-defined piece, no dummy prefix before it
        "x Hello x": [1, 18, 3, 19, 3, 18],  # "▁x▁" = ▁x ▁, Hello, then "▁▁x" = ▁ ▁x
        " Hello": [1, 3, 3, 19],  # "▁▁" before the piece
        "HelloHello": [1, 19, 19],
        # "abc" is longer than "xa", so it is cut first although "xa" starts earlier
        "xabc": [1, 18, 20],
        "xabcxa": [1, 18, 20, 21],
        "ax\u2581yb": [1, 3, 9, 22, 3, 10],  # a piece holding U+2581 matches that character in the text
    }
    for parse_special in (False, True):
        for text, ids in spm_cases.items():
            assert spm.encode(text, parse_special=parse_special) == ids, (text, parse_special)
    # the control piece only with parse_special, the user-defined one either way
    assert spm.encode("<|c|>Hello<|c|>", parse_special=True) == [1, 23, 19, 23]
    assert spm.encode("<|c|>Hello<|c|>") == [1, 3, 24, 26, 11, 26, 25, 19, 3, 24, 26, 11, 26, 25]
    # a user-defined token's text is its piece as written (llama.cpp's token_to_piece)
    assert spm.token_bytes(22) == "x\u2581y".encode() and spm.token_bytes(17) == b" Hello"
    # (the space llama.cpp puts before text after a token reads back, as llama.cpp's detokenize has it)
    assert spm.decode([1, 18, 3, 19, 3, 18]) == "x Hello  x"
    bpe_cases = {
        "Hello": [261],
        " Hello there": [32, 261, 32, 116, 104, 101, 114, 101],  # "Ġ", Hello, then the bytes of " there"
        "xHello there": [120, 261, 32, 116, 104, 101, 114, 101],
        " Hell": [259],  # no user-defined piece: the merges as before
    }
    for parse_special in (False, True):
        for text, ids in bpe_cases.items():
            assert bpe.encode(text, parse_special=parse_special) == ids, (text, parse_special)
    assert bpe.encode(" Hello") != [260] and bpe.decode([32, 261]) == " Hello"


def test_gguf_add_space_prefix_and_add_eos_token_are_read(tmp_path):
    """tokenizer.ggml.add_space_prefix=false: no dummy-prefix space before a text (nor before the
    text after a piece), and none dropped after BOS when decoding; add_eos_token=true: EOS
    after the text when add_bos asks for the special tokens. The ids are llama.cpp's
    (llama-cpp-python 0.3.36, tokenize(add_bos=True and False) on these files); both keys were
    ignored, so the first file gave [1, 18, 3, 19, 3, 18] for "x Hello x"."""
    def vocabulary(add_space_prefix, add_eos):
        def more(w):
            spm_vocabulary(w)
            if add_space_prefix is not None:
                w.add_add_space_prefix(add_space_prefix)
            if add_eos is not None:
                w.add_add_eos_token(add_eos)
        return more

    for name, space, eos in (("nospace", False, None), ("eos", None, True), ("both", False, True)):
        write_gguf(tmp_path / f"{name}.gguf", "llama", {}, {}, more=vocabulary(space, eos))
    nospace, eos, both = (load_tokenizer(tmp_path / f"{n}.gguf") for n in ("nospace", "eos", "both"))
    cases = {"Hello": [19], "x Hello x": [8, 3, 19, 18], " Hello": [3, 19], "Hellox": [19, 8]}
    for text, ids in cases.items():
        assert nospace.encode(text) == [1] + ids and nospace.encode(text, add_bos=False) == ids, text
        assert both.encode(text) == [1] + ids + [2] and both.encode(text, add_bos=False) == ids, text
    # with the dummy prefix (the default), EOS after the same ids as without the key
    assert eos.encode("x Hello x") == [1, 18, 3, 19, 3, 18, 2] and eos.encode("x Hello x", add_bos=False) == [18, 3, 19, 3, 18]
    assert eos.decode([1, 17]) == "Hello" and eos.strips_leading_space_after_bos
    # no prefix put before the text, so none is taken away after BOS (llama.cpp drops none either)
    assert nospace.decode([1, 17]) == " Hello" and not nospace.strips_leading_space_after_bos
    assert nospace.decode(nospace.encode("x Hello x")) == "x Hello x"
    # a byte-level ("gpt2") vocabulary too: llama.cpp gives [32, 261, 32, 116, 104, 101, 114, 101, 262]
    def byte_level_with_eos(w):
        bpe_vocabulary(w)
        w.add_eos_token_id(262)
        w.add_add_eos_token(True)

    write_gguf(tmp_path / "bpe_eos.gguf", "llama", {}, {}, more=byte_level_with_eos)
    bpe = load_tokenizer(tmp_path / "bpe_eos.gguf")
    assert bpe.encode(" Hello there") == [32, 261, 32, 116, 104, 101, 114, 101, 262]
    assert bpe.encode(" Hello there", add_bos=False) == [32, 261, 32, 116, 104, 101, 114, 101]


def test_gguf_byte_level_honours_parse_special(tmp_path):
    """A GGUF "gpt2" vocabulary spells control tokens as text unless parse_special=True, as
    llama.cpp does and as the sentencepiece-style ones already did (SmolLM2's "<|im_start|>"
    became id 1 either way)."""
    write_gguf(tmp_path / "bpe.gguf", "llama", {}, {}, more=bpe_vocabulary)
    bpe = load_tokenizer(tmp_path / "bpe.gguf")
    text = "<|im_start|> Hello<|im_start|>"
    spelt = [60, 124, 105, 109, 95, 115, 116, 97, 114, 116, 124, 62]  # the bytes of "<|im_start|>"
    assert bpe.encode(text) == spelt + [32, 261] + spelt
    assert bpe.encode(text, parse_special=False) == spelt + [32, 261] + spelt
    assert bpe.encode(text, parse_special=True) == [262, 32, 261, 262]
    assert bpe.token_bytes(262) == b""
    conversation = [{"role": "user", "content": "Hello"}]
    assert bpe.apply_chat_template(conversation, chat_template="<|im_start|>{{ messages[0]['content'] }}") == [262, 261]


def _spm_metadata(**changes):
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [p for p, _, _ in SPM_VOCAB],
            "tokenizer.ggml.scores": [float(s) for _, s, _ in SPM_VOCAB],
            "tokenizer.ggml.token_type": [t for _, _, t in SPM_VOCAB],
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    meta.update({"tokenizer.ggml." + k: v for k, v in changes.items()})
    return meta


N_SPM = len(SPM_VOCAB)


@pytest.mark.parametrize("changes, message", [
    (dict(scores=[0.0] * 10), rf"tokenizer\.ggml\.scores has 10 entries but tokenizer\.ggml\.tokens has {N_SPM}"),
    (dict(scores=["a"] * N_SPM), r"tokenizer\.ggml\.scores must be an array of numbers; entry 0 is 'a'"),
    (dict(scores=[0.0] * (N_SPM - 1) + [float("nan")]), rf"tokenizer\.ggml\.scores .* entry {N_SPM - 1} is nan"),
    (dict(tokens=list(range(N_SPM))), r"tokenizer\.ggml\.tokens must be an array of strings; entry 0 is 0"),
    (dict(tokens=[]), r"tokenizer\.ggml\.tokens is empty"),
    (dict(tokens="abc"), r"tokenizer\.ggml\.tokens must be an array of strings, got 'abc'"),
    (dict(token_type=[1] * 3), rf"tokenizer\.ggml\.token_type has 3 entries but tokenizer\.ggml\.tokens has {N_SPM}"),
    (dict(token_type=[1] * (N_SPM - 1) + [9]), r"tokenizer\.ggml\.token_type must be an array of token type .* is 9"),
    (dict(eos_token_id="2"), r"tokenizer\.ggml\.eos_token_id='2' is not a token id"),
    (dict(add_bos_token="false"), r"tokenizer\.ggml\.add_bos_token must be a boolean, got 'false'"),
    (dict(model=3), r"tokenizer\.ggml\.model must be a string, got 3"),
])
def test_bad_gguf_sentencepiece_metadata_is_refused_when_built(changes, message):
    """Arrays of the wrong length or element type fail when the tokenizer is built, naming the
    key: they loaded, then the first encode raised IndexError or TypeError (-'a', len(0))."""
    with pytest.raises(ValueError, match=message):
        Tokenizer.from_gguf_metadata(_spm_metadata(**changes))


def test_gguf_special_id_outside_the_vocabulary_is_ignored_with_a_warning():
    # as Model.load treats the same file (and llama.cpp, which then takes a default id)
    with pytest.warns(UserWarning, match=rf"tokenizer\.ggml\.bos_token_id: token id 4294967295 outside the "
                                         rf"vocabulary \[0, {N_SPM}\) ignored"):
        tokenizer = Tokenizer.from_gguf_metadata(_spm_metadata(bos_token_id=4294967295))
    assert tokenizer.bos_id is None and tokenizer.encode("a", add_bos=True) == tokenizer.encode("a", add_bos=False)


@pytest.mark.parametrize("changes, message", [
    (dict(merges=["Ġ H", "ĠHe"]), r"tokenizer\.ggml\.merges must be .* two pieces .*entry 1 is 'ĠHe'"),
    (dict(merges=[3]), r"tokenizer\.ggml\.merges must be an array of string.*entry 0 is 3"),
    (dict(merges=["Ġ Q"]), r"tokenizer\.ggml\.merges: .*Q.* out of vocabulary"),
    (dict(token_type=[1] * 256), r"tokenizer\.ggml\.token_type has 256 entries but tokenizer\.ggml\.tokens has 263"),
    (dict(pre=7), r"tokenizer\.ggml\.pre must be a string, got 7"),
])
def test_bad_gguf_byte_level_metadata_is_refused_when_built(changes, message):
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": [BYTE_LEVEL[b] for b in range(256)] + BPE_TOKENS,
            "tokenizer.ggml.token_type": BPE_TYPES, "tokenizer.ggml.merges": BPE_MERGES}
    meta.update({"tokenizer.ggml." + k: v for k, v in changes.items()})
    with pytest.raises(ValueError, match=message):
        Tokenizer.from_gguf_metadata(meta)


def test_bad_gguf_tokenizer_names_file_and_key(tmp_path):
    def short_scores(w):
        spm_vocabulary(w)
        w.add_token_scores([0.0] * 10)  # GGUFWriter keeps the last value of a key

    path = tmp_path / "short_scores.gguf"
    write_gguf(path, "llama", {}, {}, more=short_scores)
    with pytest.raises(ValueError, match=r"short_scores\.gguf: tokenizer\.ggml\.scores has 10 entries"):
        load_tokenizer(path)


@pytest.mark.parametrize("source", ["tok512.bin", "llama-2-tiny-random.gguf", "byte-level gguf", "tokenizer.json"])
def test_text_must_be_a_str_of_valid_unicode(source, hf_dirs):
    """encode takes a str; one holding lone surrogates (bytes that were not UTF-8, read with
    errors="surrogateescape", as sys.argv is) is refused by every kind with one message (the
    tokenizers package said "TextInputSequence must be str", sentencepiece-style vocabularies
    "surrogates not allowed")."""
    if source == "byte-level gguf":
        tok = Tokenizer.from_gguf_metadata(byte_level_gguf("gpt-2"))
    elif source == "tokenizer.json":
        tok = load_tokenizer(hf_dirs["smollm"])
    else:
        tok = load_tokenizer(MODELS / source)
    with pytest.raises(ValueError, match=r"text is not valid Unicode: '\\udce9' at index 3 is a lone surrogate"):
        tok.encode(b"caf\xe9".decode("utf-8", errors="surrogateescape"))
    for bad in (b"cafe", None, ["cafe"]):
        with pytest.raises(TypeError, match=f"text must be a str, got {type(bad).__name__}"):
            tok.encode(bad)


@pytest.mark.parametrize("stop", [None, "zzz", "time"])
@pytest.mark.parametrize("stream", [False, True])
def test_ids_past_the_tokenizers_vocabulary_have_no_text(tok512, stop, stream):
    """A model's vocabulary may be padded past its tokenizer's (Qwen2.5: 151,936 rows for 151,665
    ids): a padding id drawn reads as no text, as transformers' decode skips it. Stop strings
    raised "token id 512 is outside the vocabulary" before the first step, and .text raised it
    after the whole generation."""
    forced = [403, 515, 407, 519, 261, 378]  # " Once", padding, " upon", padding, " a", " time"

    def step(tokens):
        logits = np.zeros(520, np.float32)
        logits[forced[len(tokens) - 2]] = 30.0
        return logits

    kw = dict(max_new_tokens=6, temperature=0, tokenizer=tok512, stop=stop)
    out = ld.generate(step, [1, 300], **kw)
    text = "".join(c.text for c in ld.generate(step, [1, 300], stream=True, **kw)) if stream else out.text
    assert text == out.text == (" Once upon a " if stop == "time" else " Once upon a time")
    assert out.tokens == forced  # "time" completes with the last token
    assert out.finish_reason == ("stop" if stop == "time" else "length")


@pytest.mark.parametrize("source", ["tok512.bin", "tokenizer.json llama2"])
@pytest.mark.parametrize("stop", [None, "zzz"])
def test_only_a_documents_first_word_loses_its_space(source, stop, hf_dirs):
    """A BOS the model draws mid-reply keeps the space after it, as transformers' decoders (and
    llama.cpp's) drop only the space before a document's first word: .text, the stream and
    decode(prompt + reply) all read " there was" (the space was dropped after every BOS: " therewas")."""
    tok = load_tokenizer(hf_dirs["llama2"] if source.startswith("tokenizer.json") else MODELS / source)
    there, was = tok.encode(" there", add_bos=False)[-1], tok.encode(" was", add_bos=False)[-1]
    assert tok.token_bytes(there) == b" there" and tok.token_bytes(was) == b" was"
    reply = [there, tok.bos_id, was]
    for prompt in ([tok.bos_id, was], [tok.bos_id]):
        step = (lambda p: lambda t: np.where(np.arange(tok.vocab_size) == reply[len(t) - len(p)], 0, -1e9)
                .astype(np.float32))(prompt)
        kw = dict(tokenizer=tok, max_new_tokens=3, temperature=0, stop=stop, stop_token_ids=[])
        out = ld.generate(step, prompt, **kw)
        streamed = "".join(c.text for c in ld.generate(step, prompt, stream=True, **kw))
        want = tok.decode(prompt + reply)[len(tok.decode(prompt)):]
        assert out.tokens == reply and out.text == streamed == want
        assert want == (" there was" if len(prompt) > 1 else "there was")


def test_a_tokenizer_of_ones_own_may_drop_a_documents_first_space():
    """strips_leading_space_after_bos on a tokenizer of one's own: the reply to a prompt of BOS
    alone loses its first space in .text, streams and stop strings alike (the C matcher and the
    text disagreed by that byte for a tokenizer with a piece_after rule of its own)."""
    class Pieces:
        bos_id, eos_id, vocab_size = 0, None, 4
        pieces = [b"", b" Once", b" upon", b" a"]

        def __init__(self, strips):
            self.strips_leading_space_after_bos = strips

        def token_bytes(self, t):
            return self.pieces[t]

        def encode(self, text, add_bos=True):
            raise NotImplementedError

    script = [1, 2, 3, 1, 2, 3]
    step = lambda t: np.where(np.arange(4) == script[len(t) - 1], 0, -1e9).astype(np.float32)  # noqa: E731
    for strips, want in ((True, "Once upon"), (False, " Once upon")):
        kw = dict(tokenizer=Pieces(strips), max_new_tokens=6, temperature=0, stop=" a")
        assert ld.generate(step, [0], **kw).text == want
        assert "".join(c.text for c in ld.generate(step, [0], stream=True, **kw)) == want
        kw["stop"] = None
        assert ld.generate(step, [0], **kw).text == want + " a Once upon a"


def test_scoring_splits_text_around_what_the_tokenizer_adds(hf_dirs):
    """sequence_logprob's context is its text's tokens with BOS but without an EOS the tokenizer
    appends (GGUF add_eos_token): cutting the joint encoding after the context's count scored
    that EOS in place of " time" (-29.5 against -0.0007). A context of whitespace alone, in a
    vocabulary that adds no BOS, stands as lm-evaluation-harness's prefix token (BOS, else EOS)
    rather than failing as an empty context."""
    model = ld.Model.load(MODELS / "stories260K.bin")
    want = model.sequence_logprob("Once upon a", " time")
    with_eos = load_tokenizer(MODELS / "tok512.bin")
    with_eos.adds_eos = True
    assert with_eos.encode("Once upon a")[-1] == 2
    model.tokenizer = with_eos
    got = model.sequence_logprob("Once upon a", [" time", " time there"])
    assert got[0].tokens == want.tokens and got[0].total == want.total
    assert got[1].tokens == want.tokens + (383,)
    byte_level = load_tokenizer(hf_dirs["smollm"])  # no BOS added; its config names <|im_start|> (0) as BOS
    assert byte_level.encode("\n") == byte_level.encode("\n", add_bos=False)
    model.tokenizer = byte_level
    scored = model.sequence_logprob("\n", "Hello world")
    assert scored.tokens == tuple(byte_level.encode("\nHello world"))
    assert scored.total == model.sequence_logprob([0], list(scored.tokens)).total
