"""What a chat is: one validator for data prep, the finetuning loaders and chat inference.

A chat is a list of messages, each an object with a string `role` and a string `content`: an
optional `system` message first, then `user` and `assistant` alternating, starting with `user`.
A training example ends with an `assistant` message (the reply to learn). llm-foundry enforces the
same roles and order.
"""
from __future__ import annotations

from typing import Any

from llmfoundry_lite.errors import DataError

ROLES = ("system", "user", "assistant")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# MPT-7B-Chat's system prompt: the `mpt-7b-chat` chat template's and the chat command's default.
MPT_SYSTEM_PROMPT = ("A conversation between a user and an LLM-based AI assistant. "
                     "The assistant gives helpful and honest answers.")


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
