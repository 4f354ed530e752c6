"""Chat templates: lmdecode renders and tokenizes conversations as transformers'
apply_chat_template does (the oracle, on a tokenizer.json built here with several templates),
reads templates from GGUF metadata and Hugging Face directories, parses special tokens in
sentencepiece-style vocabularies, and generate()/beam_search()/the CLI take conversations."""
from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest

import lmdecode as ld
from lmdecode import cli
from lmdecode.tokenizer import Tokenizer, load_tokenizer

MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"
STORIES = MODELS / "stories260K.bin"

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Llama-2 style: BOS/EOS spelt by the template, alternation enforced with raise_exception
LLAMA2 = """{{ bos_token }}{% for message in messages %}
{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
{% endif %}
{% if message['role'] == 'user' %}
{{ '[INST] ' + message['content'].strip() + ' [/INST]' }}
{% else %}
{{ ' ' + message['content'].strip() + ' ' + eos_token }}
{% endif %}
{% endfor %}"""
# loop controls, tojson of non-ASCII text and an extra variable
TOOLS = """{% for message in messages %}{% if message['role'] == 'system' %}{% continue %}{% endif %}
<{{ message['role'] }}>{{ message['content'] | tojson }}{% if loop.index >= 3 %}{% break %}{% endif %}
{% endfor %}{% if tools %}tools: {{ tools | tojson }}{% endif %}{% if add_generation_prompt %}<assistant>{% endif %}"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": " Hi! How can I help? "},
     {"role": "user", "content": "Tell me about café crème."}],
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A byte-level BPE tokenizer.json with special tokens, trained here, and its config."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [c["content"] for conv in CONVERSATIONS for c in conv] * 20 + ["system user assistant INST"] * 20
    backend.train_from_iterator(corpus, trainer)
    path = tmp_path_factory.mktemp("chat_tokenizer")
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": CHATML}))
    return path


@pytest.mark.oracle
@pytest.mark.parametrize("template", [CHATML, LLAMA2, TOOLS], ids=["chatml", "llama2", "tools"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_transformers_apply_chat_template(tokenizer_dir, template, add_generation_prompt):
    from oracle import require_transformers

    _, transformers = require_transformers()
    hf = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ours = load_tokenizer(tokenizer_dir)
    extra = {"tools": [{"name": "météo", "args": ["ville"]}]} if template is TOOLS else {}
    for conversation in CONVERSATIONS:
        if template is LLAMA2 and conversation[0]["role"] == "system":
            continue
        want = hf.apply_chat_template(conversation, chat_template=template, tokenize=False,
                                      add_generation_prompt=add_generation_prompt, **extra)
        got = ours.apply_chat_template(conversation, chat_template=template, tokenize=False,
                                       add_generation_prompt=add_generation_prompt, **extra)
        assert got == want
        want_ids = hf.apply_chat_template(conversation, chat_template=template, tokenize=True, return_dict=False,
                                          add_generation_prompt=add_generation_prompt, **extra)
        assert ours.apply_chat_template(conversation, chat_template=template,
                                        add_generation_prompt=add_generation_prompt, **extra) == list(want_ids)
    # the default, as transformers': no assistant opening unless asked for
    assert ours.apply_chat_template(CONVERSATIONS[0], chat_template=template, tokenize=False, **extra) == \
        hf.apply_chat_template(CONVERSATIONS[0], chat_template=template, tokenize=False, **extra)
    # the template's own error, as transformers raises it
    bad = [{"role": "assistant", "content": "first"}]
    with pytest.raises(jinja2.TemplateError, match="must alternate"):
        hf.apply_chat_template(bad, chat_template=LLAMA2, tokenize=False)
    with pytest.raises(jinja2.TemplateError, match="must alternate"):
        ours.apply_chat_template(bad, chat_template=LLAMA2, tokenize=False)


# what transformers passes besides the messages: tools and documents (None unless given), the
# {% generation %} block of training templates, reasoning under its three names, special tokens
# that keywords override
EXTRAS = ("{% if tools is not none %}T{{ tools | length }}{{ tools | tojson }}{% endif %}"
          "{% if documents is not none %}D{% endif %}{{ bos_token }}"
          "{% for m in messages %}<{{ m.role }}>{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>"
          "{% endif %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}"
          "{% else %}{{ m.content }}{% endif %}</{{ m.role }}>\n{% endfor %}"
          "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.mark.oracle
def test_renders_what_transformers_passes_to_the_template(tokenizer_dir):
    """tools/documents were undefined (so "is not none" held), {% generation %} a syntax error,
    continue_final_message a variable the template ignored, bos_token= a TypeError (given twice),
    a message's "thinking" not its reasoning_content."""
    from oracle import require_transformers

    _, transformers = require_transformers()
    hf = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ours = load_tokenizer(tokenizer_dir)
    reply = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure, ", "thinking": "because"}]
    cases = [
        (CONVERSATIONS[0], {}),
        (CONVERSATIONS[0], {"tools": [{"name": "f", "parameters": {}}], "documents": [{"title": "a", "text": "b"}]}),
        (reply, {}),
        (reply, {"bos_token": "<BOS>"}),
        (reply, {"continue_final_message": True}),
        (reply, {"continue_final_message": True, "chat_template": CHATML}),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "I think "}],
         {"continue_final_message": True, "chat_template": CHATML.replace("message['content']", "message['content'].strip()")}),
    ]
    for conversation, kw in cases:
        kw = {"chat_template": EXTRAS, **kw}
        want = hf.apply_chat_template(conversation, tokenize=False, **kw)
        assert ours.apply_chat_template(conversation, tokenize=False, **kw) == want, kw
        assert ours.apply_chat_template(conversation, **kw) == list(
            hf.apply_chat_template(conversation, tokenize=True, return_dict=False, **kw)), kw
    assert "<think>because</think>" in ours.apply_chat_template(reply, chat_template=EXTRAS, tokenize=False)
    assert ours.apply_chat_template(reply, chat_template=EXTRAS, tokenize=False, continue_final_message=True).endswith(
        "<assistant><think>because</think>Sure, ")
    assert reply[1] == {"role": "assistant", "content": "Sure, ", "thinking": "because"}  # not modified
    with pytest.raises(ValueError, match="continue_final_message and add_generation_prompt do not combine"):
        ours.apply_chat_template(reply, chat_template=EXTRAS, continue_final_message=True, add_generation_prompt=True)
    with pytest.raises(TypeError, match="tools must be a list of dicts"):
        ours.apply_chat_template(reply, chat_template=EXTRAS, tools=[print])
    with pytest.raises(TypeError, match="chat_template must be a str, got int"):
        ours.apply_chat_template(reply, chat_template=5)


def test_templates_come_from_the_model_files(tokenizer_dir, tmp_path):
    assert load_tokenizer(tokenizer_dir).chat_template == CHATML
    # chat_template.jinja (what transformers saves now) wins over the config's; named templates
    other = tmp_path / "named"
    other.mkdir()
    (other / "tokenizer.json").write_text((tokenizer_dir / "tokenizer.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": TOOLS}, {"name": "default", "template": LLAMA2}]}))
    assert load_tokenizer(other).chat_template == LLAMA2
    (other / "chat_template.jinja").write_text(CHATML)
    assert load_tokenizer(other).chat_template == CHATML
    # GGUF: tokenizer.chat_template
    pieces = ["<unk>", "<s>", "</s>", "\u2581hi", "\u2581h", "\u2581", "<0x0A>"] + list("hi<>s/[]INST")
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": pieces,
            "tokenizer.ggml.scores": [0.0, 0.0, 0.0, 2.0, 1.0] + [0.0] * (len(pieces) - 5),
            "tokenizer.ggml.token_type": [2, 3, 3] + [1] * (len(pieces) - 3),
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    assert Tokenizer.from_gguf_metadata(meta).chat_template is None
    spm = Tokenizer.from_gguf_metadata({**meta, "tokenizer.chat_template": LLAMA2})
    assert spm.chat_template == LLAMA2
    # sentencepiece-style vocabularies parse the special pieces the template writes
    assert spm.encode("<s>hi</s>", add_bos=False) != [1, 3, 2]  # as text by default
    assert spm.encode("<s>hi</s>", add_bos=False, parse_special=True) == [1, 3, 2]
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hi"}]
    # (the newlines after the template's expressions stay, as transformers renders them)
    assert spm.apply_chat_template(conversation, tokenize=False) == "<s>[INST] hi [/INST]\n hi </s>\n"
    ids = spm.apply_chat_template(conversation)
    # ..., </s>, then "\n" with the space llama.cpp puts before text that follows a special token
    assert ids[0] == 1 and ids.count(1) == 1 and ids[-3:] == [2, 5, 6]


def test_no_template_or_a_bad_conversation_raises(tokenizer_dir):
    stories = ld.Model.load(STORIES)
    with pytest.raises(ValueError, match="no chat template"):
        stories.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="no chat template"):
        stories.generate([{"role": "user", "content": "hi"}])
    ours = load_tokenizer(tokenizer_dir)
    with pytest.raises(TypeError, match="messages must be"):
        ours.apply_chat_template("hi")
    with pytest.raises(ValueError, match="message 0 has no 'role'"):
        ours.apply_chat_template([{"content": "hi"}])


SIMPLE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"


@pytest.fixture
def stories_with_template():
    model = ld.Model.load(STORIES)
    model.tokenizer.chat_template = SIMPLE
    return model


def test_generate_and_beam_search_take_conversations(stories_with_template):
    model = stories_with_template
    conversation = [{"role": "user", "content": "Once upon a time"}]
    ids = model.tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
    assert model.tokenizer.decode(ids) == " user: Once upon a time\nassistant:"  # llama2.c's leading space
    kw = dict(max_new_tokens=12, temperature=0.8, seed=3)
    assert model.generate(conversation, **kw).tokens == model.generate(ids, **kw).tokens
    batch = model.generate([conversation, ids], max_new_tokens=12, temperature=0)  # greedy: streams do not matter
    assert batch[0].tokens == batch[1].tokens
    assert model.generate(conversation, **kw).prompt_tokens == ids
    hyps = model.beam_search(conversation, beam_width=2, max_new_tokens=6)
    assert hyps[0].tokens == model.beam_search(ids, beam_width=2, max_new_tokens=6)[0].tokens
    # a reply scored after a conversation: the tokens of the template's text + the reply after the
    # template's own, as lm-evaluation-harness splits text ("▁there", not "▁" then "▁there")
    reply = model.sequence_logprob(conversation, " there was a cat")
    joint = model.tokenizer.encode(model.tokenizer.apply_chat_template(conversation, add_generation_prompt=True,
                                                                       tokenize=False) + " there was a cat",
                                   add_bos=False, parse_special=True)
    assert reply.tokens == tuple(joint[len(ids):]) and reply.tokens[0] == 383
    want = model.sequence_logprob(ids, joint[len(ids):])
    assert reply.total == pytest.approx(want.total, abs=1e-5)


def test_cli_chat(stories_with_template, monkeypatch, capsys):
    monkeypatch.setattr(ld.Model, "load", lambda *args, **kwargs: stories_with_template)
    assert cli.main(["generate", "--model", "stories", "--chat", "--system", "Be kind.", "--temperature", "0",
                     "--max-new-tokens", "10", "--no-stream", "Once upon a time"]) == 0
    conversation = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Once upon a time"}]
    want = stories_with_template.generate(conversation, max_new_tokens=10, temperature=0).text
    assert capsys.readouterr().out == want + "\n"  # the reply alone
    assert cli.main(["generate", "--model", "stories", "--chat", "--system", "Be kind.", "--temperature", "0",
                     "--max-new-tokens", "10", "Once upon a time"]) == 0
    assert capsys.readouterr().out == want + "\n"  # streamed alike
    assert cli.main(["generate", "--model", "stories", "--system", "x", "hi"]) == 1
    assert "--system needs --chat" in capsys.readouterr().err


def test_cli_chat_session_streams_each_reply_and_keeps_the_conversation(stories_with_template, monkeypatch, capsys):
    import io

    model = stories_with_template
    monkeypatch.setattr(ld.Model, "load", lambda *args, **kwargs: model)
    monkeypatch.setattr("sys.stdin", io.StringIO("Once upon a time\nThe cat sat\n\nnever read\n"))
    assert cli.main(["chat", "--model", "stories", "--temperature", "0", "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    # the same replies as generate() on the growing conversation; the empty line ends the session
    conversation = [{"role": "user", "content": "Once upon a time"}]
    first = model.generate(conversation, max_new_tokens=8, temperature=0)
    conversation += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "The cat sat"}]
    second = model.generate(conversation, max_new_tokens=8, temperature=0)
    assert printed == first.text + "\n" + second.text + "\n"
    # the second turn reused the first turn's cache: the same call now reuses all but the new message
    again = model.generate(conversation, max_new_tokens=8, temperature=0, cache_prompt=True)
    assert again.cached_prompt_tokens > len(first.prompt_tokens)


def test_cli_chat_needs_a_template(capsys):
    assert cli.main(["generate", "--model", str(STORIES), "--chat", "hi"]) == 1
    assert "has no chat template" in capsys.readouterr().err
    assert cli.main(["chat", "--model", str(STORIES)]) == 1
    assert "has no chat template" in capsys.readouterr().err
