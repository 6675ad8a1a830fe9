"""What a chat is, and how a chat template renders one: for data prep, the finetuning loaders and chat inference.

A chat is a list of messages, each an object with a string `role` and a string `content`: an
optional `system` message first, then `user` and `assistant` alternating, starting with `user`.
A training example ends with an `assistant` message (the reply to learn). llm-foundry enforces the
same roles and order.

Chat templates are Jinja, rendered in jinja2's sandbox (transformers' `apply_chat_template` when there is
a tokenizer, an `ImmutableSandboxedEnvironment` of our own when there is none). A template comes from a
flag or config key, or from a tokenizer folder, i.e. from someone else: `ChatTemplate` renders every one
of them and turns what the sandbox or Jinja refuses into a UserError naming where the template came from.
`ChatTemplate.check` renders a small chat once, before any work, so that a template that cannot parse or
reaches outside the sandbox stops a command before it writes anything.
"""
from __future__ import annotations

import datetime
import os
from typing import Any, Dict, Sequence

from llmfoundry_lite.errors import DataError, UserError

ROLES = ("system", "user", "assistant")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# MPT-7B-Chat's system prompt: the `mpt-7b-chat` chat template's and the chat command's default.
MPT_SYSTEM_PROMPT = ("A conversation between a user and an LLM-based AI assistant. "
                     "The assistant gives helpful and honest answers.")

# ChatML: <|im_start|>role\ncontent<|im_end|>\n per message; the assistant header opens a reply.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '" + IM_START + "' + message['role'] + '\n' + message['content'] + '" + IM_END + "' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + IM_START + "assistant\n' }}{% endif %}"
)
# MPT-7B-Chat: ChatML whose conversation opens with this system prompt unless one is given.
MPT_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '" + IM_START + "system\n" + MPT_SYSTEM_PROMPT + IM_END + "\n' }}"
    "{% endif %}" + CHATML_TEMPLATE
)
CHAT_TEMPLATES = {"chatml": CHATML_TEMPLATE, "mpt-7b-chat": MPT_CHAT_TEMPLATE}  # the names a template flag accepts


def check_messages(messages: Any, for_training: bool = True) -> None:
    """Raise a DataError naming the first problem of `messages` (see the module docstring); a chat
    `for_training` must end with the assistant reply to learn."""
    if not isinstance(messages, list):
        raise DataError(f"messages must be a list of {{role, content}} objects, got a {type(messages).__name__}")
    if not messages:
        raise DataError("messages is empty")
    expected = "user"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"message {i} must be an object with role and content, got {str(m)[:80]!r}")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise DataError(f"message {i} has role {str(role)[:40]!r}; roles are system, user and assistant")
        if not isinstance(content, str):
            raise DataError(f"message {i} ({role}) has a {type(content).__name__} content; contents are strings")
        if role == "system":
            if i:
                raise DataError(f"message {i} is a system message; only the first message may be one")
            continue
        if role != expected:
            raise DataError(f"message {i} ({role}) is out of order: after the optional system message, user "
                            f"and assistant messages alternate, starting with user (expected {expected} here)")
        expected = "assistant" if role == "user" else "user"
    if for_training and messages[-1]["role"] != "assistant":
        raise DataError(f"the chat ends with a {messages[-1]['role']} message; a training example must end with an "
                        "assistant message (the reply to learn)")


# ---- chat templates ----------------------------------------------------------------------------

_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]  # what `check` renders


class ChatTemplate:
    """A Jinja chat template, the tokenizer that renders it (None: our own sandbox), `source`, where the
    template came from (e.g. "--chat_template", "the chat template of tokenizer folder X"), which every
    error names, and `fix`, what its errors suggest."""

    def __init__(self, text: str, source: str, tokenizer=None, fix: str = "fix it"):
        self.text, self.source, self.tokenizer, self.fix = text, source, tokenizer, fix
        self._compiled = None  # without a tokenizer: the template compiled in `_sandbox()`, once

    @classmethod
    def resolve(cls, chat_template: Any, tokenizer=None, flag: str = "chat_template") -> ChatTemplate:
        """The template to render chats with: `chat_template` (a ChatTemplate, a name of CHAT_TEMPLATES, or
        a Jinja string given by `flag`), else the tokenizer's own, else ChatML."""
        if isinstance(chat_template, ChatTemplate):
            return chat_template
        if chat_template is not None and not isinstance(chat_template, str):
            raise UserError(f"{flag} must be a string (chatml, mpt-7b-chat or a Jinja template), got a "
                            f"{type(chat_template).__name__}")
        builtin = f"name a built-in one with {flag} (chatml, mpt-7b-chat)"
        if chat_template in CHAT_TEMPLATES:
            return cls(CHAT_TEMPLATES[chat_template], f"chat template {chat_template!r}", tokenizer)
        own = getattr(tokenizer, "chat_template", None)
        if chat_template:
            if isinstance(own, dict) and chat_template in own:  # a named template of the tokenizer's
                return cls(own[chat_template], f"chat template {chat_template!r} of {_tokenizer_source(tokenizer)}",
                           tokenizer, f"fix or remove it, or {builtin}")
            return cls(chat_template, flag, tokenizer, f"fix it, or {builtin}")
        if isinstance(own, dict):  # several named templates: transformers' default is "default"
            if "default" not in own:
                raise UserError(f"{_tokenizer_source(tokenizer)} has several chat templates ({', '.join(sorted(own))}) "
                                f"and no 'default'; name one with {flag}")
            own = own["default"]
        if own:
            return cls(own, f"the chat template of {_tokenizer_source(tokenizer)}", tokenizer,
                       f"fix or remove it, or {builtin}")
        return cls(CHATML_TEMPLATE, "the default ChatML chat template", tokenizer)

    def render(self, messages: Sequence[Dict], add_generation_prompt: bool = False) -> str:
        """The template's text of `messages`. A template Jinja cannot parse, or one that reaches outside the
        sandbox, is a UserError; one that refuses this chat (`raise_exception`) or fails on it is a DataError
        (the caller names the example)."""
        from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError  # lazy: only templates need it
        try:
            if self.tokenizer is not None:
                return self.tokenizer.apply_chat_template(list(messages), chat_template=self.text, tokenize=False,
                                                          add_generation_prompt=add_generation_prompt)
            self._compiled = self._compiled or _sandbox().from_string(self.text)
            return self._compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt)
        except TemplateSyntaxError as e:  # also an unknown filter or test (TemplateAssertionError)
            raise UserError(f"{self.source} is not a valid Jinja template (line {e.lineno}: "
                            f"{str(e.message).rstrip('.')}); {self.fix}") from None
        except SecurityError as e:
            raise UserError(f"{self.source} is refused by the sandbox ({str(e).rstrip('.')}): a chat template may "
                            f"only format the messages; {self.fix}") from None
        except Exception as e:  # what the template's code raised: raise_exception, an undefined name, a bad argument
            what = str(e).rstrip(".") if isinstance(e, TemplateError) else f"{type(e).__name__}: {e}"
            raise DataError(f"{self.source} cannot render this chat ({what}); fix the chat or the template") from None

    def check(self) -> ChatTemplate:
        """self, after rendering a two-message chat: a UserError if the template does not parse or reaches
        outside the sandbox. Whatever else fails on this chat may be about the chat (a template that wants a
        system message first, say), so each example's render reports it instead."""
        try:
            self.render(_PROBE[:1], add_generation_prompt=True)
            self.render(_PROBE)
        except DataError:
            pass
        return self


def _tokenizer_source(tokenizer) -> str:
    """Where a tokenizer's chat template is: its folder's file, or the tokenizer's name."""
    path = getattr(tokenizer, "name_or_path", "") or "?"
    if not os.path.isdir(path):
        return f"tokenizer {path!r}"
    files = [n for n in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")
             if os.path.isfile(os.path.join(path, n))]
    return f"tokenizer folder {path}" + (f" ({files[0]})" if files else "")


def _raise_exception(message: str):
    from jinja2.exceptions import TemplateError  # lazy: only templates need it
    raise TemplateError(message)


def _sandbox():
    """The Jinja environment of transformers' `apply_chat_template` (block tags trimmed, loop controls,
    `raise_exception`, `strftime_now`), for rendering without a tokenizer: a template renders the same
    text with or without one. (Its `{% generation %}` tag, for assistant masks, is not here.)"""
    import jinja2.ext  # lazy: only templates need it
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # lazy: only templates need it
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.globals.update(raise_exception=_raise_exception,
                       strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    return env
