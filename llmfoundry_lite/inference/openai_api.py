"""The OpenAI API's requests and answers: `POST /v1/completions`, `POST /v1/chat/completions`.

A request is checked like a YAML config (`config.check` over the dataclasses below: every problem
names its field, with a did-you-mean for a misspelt one). Its sampling fields become the one
`SamplingOptions` (OpenAI's `max_tokens` is `max_new_tokens`; `temperature: 0` is greedy, any other
temperature samples; a field the request leaves out takes the server's default). Answers and
stream chunks have OpenAI's shapes; each choice's `index` is prompt * n + j.
"""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field, fields
from typing import Annotated, Dict, List, Optional, Union

import torch

from llmfoundry_lite.config import check
from llmfoundry_lite.config.schema import rule
from llmfoundry_lite.errors import UserError
from llmfoundry_lite.inference.batching import TokenInfo
from llmfoundry_lite.inference.chat import chatml
from llmfoundry_lite.inference.generate import SamplingOptions

# OpenAI's name for a SamplingOptions field where the two differ.
OPENAI_NAMES = {"max_new_tokens": "max_tokens"}
MAX_STOPS = 16  # OpenAI allows 4; lm-eval's tasks may send more (it adds the EOS text to theirs)


class RequestError(Exception):
    """An answer other than 200: its status, the request field at fault (OpenAI's `param`) and why."""

    def __init__(self, status: int, field_path: Optional[str], message: str):
        super().__init__(message)
        self.status, self.field, self.message = status, field_path, message


@dataclass
class StreamOptions:
    include_usage: bool = False


@dataclass
class _Request:
    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[Annotated[float, rule(lambda v: v >= 0, "must be >= 0 (0: greedy)")]] = None
    top_p: Optional[float] = None
    n: Annotated[int, rule(lambda v: 1 <= v <= 16, "must be in [1, 16]")] = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[int] = None
    user: Optional[str] = None                  # accepted, unused
    # accepted at their neutral values only (this server does not implement them)
    presence_penalty: Annotated[float, rule(lambda v: v == 0, "is not supported; leave it at 0")] = 0.0
    frequency_penalty: Annotated[float, rule(lambda v: v == 0, "is not supported; leave it at 0")] = 0.0
    logit_bias: Annotated[Optional[Dict[str, float]], rule(lambda v: not v, "is not supported; leave it out")] = None
    # SamplingOptions fields OpenAI lacks (as vLLM accepts them)
    top_k: Optional[int] = None
    repetition_penalty: Optional[float] = None

    def stops(self) -> List[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS or not all(stops):
            raise RequestError(400, "stop", f"at most {MAX_STOPS} non-empty stop strings")
        return stops

    def sampling(self, defaults: SamplingOptions, max_new_tokens_limit: int) -> SamplingOptions:
        """`defaults` updated by what the request sets, checked by SamplingOptions' own rules."""
        raw = {name: getattr(self, OPENAI_NAMES.get(name, name)) for name in ("max_new_tokens", "top_p", "top_k",
                                                                             "repetition_penalty", "seed")}
        raw = {k: v for k, v in raw.items() if v is not None}
        if self.temperature is not None:
            raw.update({"do_sample": False} if self.temperature == 0 else
                       {"do_sample": True, "temperature": self.temperature})
        options, problems = check(SamplingOptions, {**vars(defaults), **raw})
        if not problems and options.max_new_tokens > max_new_tokens_limit:
            problems = [f"max_new_tokens: {options.max_new_tokens} out of range: this server's limit is "
                        f"{max_new_tokens_limit}"]
        if problems:
            name = problems[0].split(":")[0]
            raise RequestError(400, OPENAI_NAMES.get(name, name),
                           "; ".join(p.replace("max_new_tokens", "max_tokens") for p in problems))
        return options



@dataclass
class CompletionRequest(_Request):
    prompt: Union[str, List[str], List[int], List[List[int]]] = field(default=None, kw_only=True)
    echo: bool = False
    logprobs: Optional[Annotated[int, rule(lambda v: 0 <= v <= 5, "must be in [0, 5]")]] = None
    best_of: Annotated[Optional[int], rule(lambda v: v in (None, 1), "is not supported; leave it out")] = None
    suffix: Annotated[Optional[str], rule(lambda v: not v, "is not supported; leave it out")] = None

    def prompts(self) -> List[Union[str, List[int]]]:
        p = self.prompt
        listed = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p or [])
        if not listed or not all(listed):
            raise RequestError(400, "prompt", "must be a non-empty string, list of token ids, or a list of either")
        return listed


@dataclass
class ChatMessage:
    role: str
    content: Union[str, List[Dict[str, str]]]
    name: Optional[str] = None

    def text(self) -> str:
        """The content; a list of parts must be text parts (this model reads text only)."""
        if isinstance(self.content, str):
            return self.content
        if not all(part.get("type") == "text" and "text" in part for part in self.content):
            raise RequestError(400, "messages", "content parts must be {\"type\": \"text\", \"text\": ...}")
        return "".join(part["text"] for part in self.content)


@dataclass
class ChatRequest(_Request):
    messages: List[ChatMessage] = field(default=None, kw_only=True)
    logprobs: bool = False
    top_logprobs: Optional[Annotated[int, rule(lambda v: 0 <= v <= 20, "must be in [0, 20]")]] = None

    def prompt(self) -> str:
        messages = [{"role": m.role, "content": m.text()} for m in self.messages]
        try:
            return chatml(messages)
        except UserError as e:
            raise RequestError(400, "messages", str(e)) from None


def new_generator(options: SamplingOptions) -> torch.Generator:
    """A request's own random generator: with `seed`, its samples are reproducible whatever else runs."""
    return torch.Generator().manual_seed(options.seed if options.seed is not None else secrets.randbits(63))


def parse(cls, data) -> _Request:
    """The request, or an RequestError (400) naming its first bad field."""
    request, problems = check(cls, data)
    if problems:
        names = {f.name for f in fields(cls)}
        param = problems[0].split(":")[0]
        top = param.split(".")[0].split("[")[0]
        raise RequestError(400, top if top in names else param, "; ".join(problems)[:1000])
    return request


# ---- answers ----

def envelope(kind: str, model: str, request_id: str, created: int, choices: list, usage=None) -> dict:
    out = {"id": request_id, "object": kind, "created": created, "model": model, "choices": choices}
    if usage is not None:
        out["usage"] = usage
    return out


def new_id(prefix: str) -> tuple:
    return f"{prefix}-{secrets.token_hex(12)}", int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(tokens: List[TokenInfo]) -> dict:
    """The completions `logprobs` object (text offsets from the first token's start)."""
    out, offset = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}, 0
    for t in tokens:
        out["tokens"].append(t.text)
        out["token_logprobs"].append(t.logprob)
        out["top_logprobs"].append(None if t.top is None else {text: lp for _, text, lp in t.top})
        out["text_offset"].append(offset)
        offset += len(t.text)
    return out


def chat_logprobs(tokens: List[TokenInfo]) -> dict:
    def entry(text, logprob):
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
    return {"content": [{**entry(t.text, t.logprob), "top_logprobs": [entry(text, lp) for _, text, lp in t.top or []]}
                        for t in tokens]}


def error_body(status: int, param: Optional[str], message: str) -> dict:
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error",
            503: "server_busy"}.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}
