"""Tokenizers: llama2.c's encoder exactly, GGUF vocabularies, tokenizer.json,
streaming without split characters, and corrupt files."""
from __future__ import annotations

from pathlib import Path

import pytest

import lmdecode as ld
from lmdecode.tokenizer import ScoreBPETokenizer, load_tokenizer

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


def test_heap_merging_equals_llama2c_rescanning(tok512):
    text = (SHARED / "data" / "tinystories_valid_excerpt.txt").read_text()[:3000]
    for chunk in [text[i : i + 300] for i in range(0, 3000, 300)] + ["naïve café ☃ 日本"]:
        assert tok512.encode(chunk) == llama2c_encode_reference(tok512, chunk)


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
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<s>": 0, "</s>": 1, "h": 2, "e": 3, "l": 4, "o": 5, "he": 6, "ll": 7, "hell": 8, "hello": 9, "Ġ": 10, "w": 11, "r": 12, "d": 13}
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o")]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true}')
    tok = load_tokenizer(tmp_path)
    assert tok.bos_id == 0 and tok.eos_id == 1
    assert tok.encode("hello world") == [0, 9, 10, 11, 5, 12, 4, 13]
    assert tok.decode([9, 10, 11, 5, 12, 4, 13]) == "hello world"
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "<s>", ')
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: not valid JSON"):
        load_tokenizer(tmp_path)


def test_model_tokenizer_and_text_generation():
    model = ld.Model.load(MODELS / "stories260K.bin")
    out = model.generate("Once upon a time", max_new_tokens=30, temperature=0)
    assert out.prompt_tokens == [1, 403, 407, 261, 378]
    assert out.text.startswith(", there was a little girl named Lily")
    chunks = list(model.generate("Once upon a time", max_new_tokens=30, temperature=0, stream=True))
    assert "".join(c.text for c in chunks) == out.text


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
