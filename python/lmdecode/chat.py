"""Chat templates: a conversation rendered to the prompt text an instruct model was tuned on.

A template is the Jinja source a model file carries (GGUF ``tokenizer.chat_template``,
Hugging Face ``tokenizer_config.json`` or ``chat_template.jinja``). It is rendered as
transformers' ``apply_chat_template`` renders it: a sandboxed Jinja environment with
``trim_blocks`` and ``lstrip_blocks``, the loop-controls extension, a ``tojson`` filter
that keeps non-ASCII characters, and the globals ``raise_exception(message)`` and
``strftime_now(format)``; the variables are ``messages``, ``add_generation_prompt``,
``bos_token``, ``eos_token`` and any extra keyword (``tools``, ``documents``, ...).
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
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)


def render_chat(template: str, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", **extra: Any) -> str:
    """The prompt text of `messages` under `template` (see the module's docstring).

    ``add_generation_prompt`` appends the opening of the assistant's turn, so that the
    model answers. A template's ``raise_exception`` (e.g. roles out of order) raises
    ``jinja2.TemplateError``."""
    if not isinstance(template, str) or not template:
        raise ValueError("this tokenizer has no chat template (give one with tokenizer.chat_template = ...)")
    if not is_conversation(messages):
        raise TypeError(f"messages must be a non-empty list of dicts with 'role' and 'content', got {messages!r:.80}")
    for i, message in enumerate(messages):
        if "role" not in message:
            raise ValueError(f"message {i} has no 'role'")
    return _compiled(template).render(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                                      bos_token=bos_token, eos_token=eos_token, **extra)
