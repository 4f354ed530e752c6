"""Chat templates: a conversation rendered to the prompt text an instruct model was tuned on.

A template is the Jinja source a model file carries (GGUF ``tokenizer.chat_template``,
Hugging Face ``tokenizer_config.json`` or ``chat_template.jinja``). It is rendered as
transformers' ``apply_chat_template`` renders it (``utils/chat_template_utils.py``): a
sandboxed Jinja environment with ``trim_blocks`` and ``lstrip_blocks``, the loop-controls
extension, the ``{% generation %}`` block (its body rendered as it is), a ``tojson`` filter
that keeps non-ASCII characters, and the globals ``raise_exception(message)`` and
``strftime_now(format)``; the variables are ``messages`` (a message's ``reasoning_content``,
``thinking`` or ``reasoning`` under all three names), ``add_generation_prompt``, ``tools``
and ``documents`` (None unless given), ``bos_token``, ``eos_token`` and any extra keyword,
which may override those two. ``continue_final_message`` cuts the text right after the last
message's content, so the model continues it.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

__all__ = ["render_chat", "is_conversation"]


def is_conversation(value: Any) -> bool:
    """A conversation is a non-empty list of message dicts ({"role": ..., "content": ...})."""
    return (isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and len(value) > 0
            and all(isinstance(m, Mapping) for m in value))


@lru_cache(maxsize=16)
def _compiled(template: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """``{% generation %}...{% endgeneration %}`` marks an assistant's text for training
        masks (transformers' AssistantTracker); rendering keeps the body as it is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)


# a message's reasoning goes by these names; templates read the first (transformers' _REASONING_FIELDS)
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def render_chat(template: str, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                continue_final_message: bool | str = False, tools: Sequence[Mapping[str, Any]] | None = None,
                documents: Sequence[Mapping[str, Any]] | None = None, bos_token: str = "", eos_token: str = "",
                **extra: Any) -> str:
    """The prompt text of `messages` under `template` (see the module's docstring).

    ``add_generation_prompt`` appends the opening of the assistant's turn, so that the
    model answers; ``continue_final_message`` (True, or the name of the field to continue)
    instead ends the text with the last message's content, unclosed, so that the model goes
    on with it. ``tools`` and ``documents`` are lists of dicts (JSON schemas; transformers
    also turns Python functions into schemas, lmdecode does not). A template's
    ``raise_exception`` (e.g. roles out of order) raises ``jinja2.TemplateError``."""
    if template is not None and not isinstance(template, str):
        raise TypeError(f"chat_template must be a str, got {type(template).__name__}")
    if not template:
        raise ValueError("this tokenizer has no chat template (give one with tokenizer.chat_template = ...)")
    if not is_conversation(messages):
        raise TypeError(f"messages must be a non-empty list of dicts with 'role' and 'content', got {messages!r:.80}")
    for i, message in enumerate(messages):
        if "role" not in message:
            raise ValueError(f"message {i} has no 'role'")
    for name, items in (("tools", tools), ("documents", documents)):
        if items is not None and (isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Sequence)
                                  or not all(isinstance(item, Mapping) for item in items)):
            raise TypeError(f"{name} must be a list of dicts (JSON schemas for tools), got {items!r:.80}")
    chat = []
    for message in messages:  # copies: the caller's messages are never changed
        message = dict(message)
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        chat.append(message)
    final = None
    if continue_final_message:
        if add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt do not combine: the first continues the "
                             "last message, the second opens a new assistant turn")
        field = continue_final_message if isinstance(continue_final_message, str) else "content"
        final = chat[-1].get(field)
        if not isinstance(final, str):
            raise ValueError(f"continue_final_message: the last message has no {field!r} text to continue")
        fields = [f for f in _REASONING_FIELDS if chat[-1].get(f) == final] if field in _REASONING_FIELDS else [field]
        if not any(f in template for f in fields):
            raise ValueError(f"continue_final_message: the chat template never reads {field!r}")
        for f in fields:
            chat[-1][f] = final + _CONTINUE_TAG
    variables = {"bos_token": bos_token, "eos_token": eos_token, **extra}  # extra keywords override the tokens
    text = _compiled(template).render(messages=chat, tools=None if tools is None else [dict(t) for t in tools],
                                      documents=None if documents is None else [dict(d) for d in documents],
                                      add_generation_prompt=add_generation_prompt, **variables)
    if final is not None:
        tag = _CONTINUE_TAG.strip()
        if final.strip() not in text or tag not in text:
            raise ValueError("continue_final_message: the chat template dropped part of the last message, "
                             "so the text cannot end with it")
        at = text.rindex(tag)
        # a template that keeps the message's spacing shows the tag whole; one that trims it, not
        text = text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()
    return text
