"""An HTTP endpoint: the OpenAI API and the MPT-7B managed-endpoint format, over continuous batching.

    POST /v1/completions         OpenAI completions (prompt: text or token ids, n, stop, logprobs, echo, stream)
    POST /v1/chat/completions    OpenAI chat completions (ChatML), streaming or not
    GET  /v1/models              the one model served
    POST /  (or /score)          {"input_data": {"input_string": ["the meaning of life is"],
                                  "parameters": {"temperature": 0.5, "max_new_tokens": 10, "do_sample": true}}}
                                 -> [{"0": "the meaning of life is ..."}]   (one key per input string, in order)
    GET  /health                 {"status": "ok", "queued": ..., "running": ..., "served": ...}

Starlette routes on uvicorn (`http_server` adds a whole-request deadline and a bound on open
connections). Every request's sequences go to the `Batcher`, where they join the running batch at the
next step; a client that hangs up has its sequences dropped at the next step. Every refusal is JSON
naming the field at fault: `{"error": message, "field": path}` on the endpoint-format routes,
OpenAI's `{"error": {"message", "type", "param", "code"}}` under /v1. With an API key (`--api_key`
or LLMFOUNDRY_LITE_API_KEY) every route needs `Authorization: Bearer KEY`.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hmac
import ipaddress
import json
import os
import sys
from dataclasses import dataclass, fields, replace
from typing import Callable, List, Optional

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llmfoundry_lite.config import check
from llmfoundry_lite.errors import UserError
from llmfoundry_lite.inference import openai_api as oa
from llmfoundry_lite.inference.batching import Batcher, GenerationRequest, PromptError, QueueFull
from llmfoundry_lite.inference.chat import chat_stop_ids
from llmfoundry_lite.inference.generate import SamplingOptions
from llmfoundry_lite.inference.http_server import EndpointServer, guarded_protocol
from llmfoundry_lite.inference.loading import add_model_arguments, open_model
from llmfoundry_lite.inference.openai_api import RequestError
from llmfoundry_lite.registry import did_you_mean

MAX_BODY_BYTES = 1 << 20
MAX_JSON_DEPTH = 16  # arrays/objects one inside another; a request needs 3
API_KEY_ENV = "LLMFOUNDRY_LITE_API_KEY"

__all__ = ["Endpoint", "Limits", "RequestError", "make_app", "make_server", "parse_request"]


@dataclass
class Limits:
    max_inputs: int = 8                 # sequences per request (input strings; OpenAI: prompts x n)
    max_new_tokens: int = 512           # largest max_new_tokens (max_tokens) a request may ask for
    queue_size: int = 64                # sequences waiting to join the batch; more -> 503
    max_batch_size: int = 16            # sequences decoding together
    timeout_s: float = 600.0            # how long a request waits for its (non-streamed) answer -> 504
    client_timeout_s: float = 30.0      # a request's headers and body must arrive within this -> 408
    max_connections: int = 256          # open connections; more -> 503 at once


# ---- the endpoint-format request ----

def load_json(body: bytes):
    """The parsed body, or a RequestError (400) for malformed or too deeply nested JSON."""
    too_deep = RequestError(400, "body", f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        data = json.loads(body)
    except RecursionError:  # deeper than the parser's stack
        raise too_deep from None
    except ValueError as e:  # bad UTF-8 or JSON, 4300+ digit ints
        raise RequestError(400, "body", f"malformed JSON: {str(e)[:200]}") from None
    level = [data]  # level by level, no recursion: the checks after this would recurse over what the parser accepts
    for _ in range(MAX_JSON_DEPTH):
        level = [v for c in level if isinstance(c, (list, dict)) for v in (c.values() if isinstance(c, dict) else c)]
    if any(isinstance(c, (list, dict)) for c in level):
        raise too_deep
    return data


def parse_request(body: bytes, limits: Limits, defaults: SamplingOptions):
    """(prompts, SamplingOptions: `defaults` updated by the request) from an endpoint-format body, or a
    RequestError naming the bad field."""
    data = load_json(body)
    if not isinstance(data, dict) or "input_data" not in data:
        raise RequestError(400, "input_data", 'expected {"input_data": {"input_string": [...], "parameters": {...}}}')
    for key in data:
        if key != "input_data":
            raise RequestError(400, key, f"unknown field{did_you_mean(key, ['input_data'])}")
    inp = data["input_data"]
    if not isinstance(inp, dict):
        raise RequestError(400, "input_data", "must be an object with input_string and parameters")
    for key in inp:
        if key not in ("input_string", "parameters"):
            raise RequestError(400, f"input_data.{key}",
                               f"unknown field{did_you_mean(key, ['input_string', 'parameters'])}")
    prompts, where = inp.get("input_string"), "input_data.input_string"
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise RequestError(400, where, "must be a list of strings")
    if not prompts:
        raise RequestError(400, where, "must not be empty")
    if len(prompts) > limits.max_inputs:
        raise RequestError(400, where, f"{len(prompts)} inputs; at most {limits.max_inputs} per request")
    for i, p in enumerate(prompts):
        if not p.strip():
            raise RequestError(400, f"{where}[{i}]", "must not be an empty string")
        if not p.isascii() and any("\ud800" <= c <= "\udfff" for c in p):  # lone surrogates: no tokenizer encodes them
            raise RequestError(400, f"{where}[{i}]", "is not valid Unicode (lone surrogate)")
    where, raw = "input_data.parameters", inp.get("parameters", {})
    if not isinstance(raw, dict):
        raise RequestError(400, where, "must be an object")
    options, problems = check(SamplingOptions, {**vars(defaults), **raw}, where)
    if not problems and options.max_new_tokens > limits.max_new_tokens:
        problems = [f"{where}.max_new_tokens: {options.max_new_tokens} out of range: this server's limit is "
                    f"{limits.max_new_tokens}"]
    if problems:  # named by the first problem's key: the longest one its text starts with (a key may hold ':')
        key = max((k for k in raw if problems[0].startswith(f"{where}.{k}:")), key=len, default=None)
        names = [f.name for f in fields(SamplingOptions)]
        known = f" (parameters: {', '.join(names)})" if set(raw) - set(names) else ""
        raise RequestError(400, where if key is None else f"{where}.{key}", ("; ".join(problems) + known)[:1000])
    return prompts, options


# ---- the model side ----

class Endpoint:
    """The model, its tokenizer, the batcher that runs them, and what requests may ask."""

    def __init__(self, model, tokenizer, limits: Optional[Limits] = None, defaults: Optional[SamplingOptions] = None,
                 model_name: str = "mpt", api_key: Optional[str] = None):
        limits, defaults = limits or Limits(), (defaults or SamplingOptions()).checked()
        self.model, self.tokenizer, self.limits = model, tokenizer, limits
        self.defaults = replace(defaults, max_new_tokens=min(defaults.max_new_tokens, limits.max_new_tokens))
        self.model_name, self.api_key = model_name, api_key
        # read before the batcher starts: a fast tokenizer must not be used by two threads at once
        self.chat_stop_ids: Optional[List[int]] = None
        self.no_chat: Optional[RequestError] = None
        try:
            self.chat_stop_ids = chat_stop_ids(tokenizer)
        except UserError as e:
            self.no_chat = RequestError(400, "messages", f"{e}; or use /v1/completions")
        self.batcher = Batcher(model, tokenizer, limits.max_batch_size, limits.queue_size)

    def answer(self, body: bytes):
        """The endpoint-format answer to `body` (for callers outside the HTTP server)."""
        return asyncio.run(_endpoint_answer(self, body, None))


class _Run:
    """A request's sequences in the batcher; their updates arrive in this event loop, in order."""

    def __init__(self, endpoint: Endpoint, specs: List[dict], field_of: Callable[[int], str]):
        loop, self.updates = asyncio.get_running_loop(), asyncio.Queue()
        self.field_of, self.open, self.buffered = field_of, len(specs), []

        def deliver(i, update):
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits for this any more
                loop.call_soon_threadsafe(self.updates.put_nowait, (i, update))

        self.requests = [GenerationRequest(on_update=functools.partial(deliver, i), **spec)
                         for i, spec in enumerate(specs)]
        try:
            endpoint.batcher.submit(self.requests)
        except QueueFull as e:
            raise RequestError(503, field_of(0), f"server busy: {e}; retry later") from None

    async def _next(self):
        i, update = await self.updates.get()
        if update.finish_reason is not None:
            self.open -= 1
        if isinstance(update.error, PromptError):
            raise RequestError(400, self.field_of(i), str(update.error))
        if update.error is not None:
            raise RequestError(500, None, f"generation failed: {update.error}")
        return i, update

    async def admitted(self) -> None:
        """Wait until every sequence has joined the batch (or been refused: RequestError)."""
        seen = {i for i, _ in self.buffered}
        while len(seen) < len(self.requests):
            self.buffered.append(await self._next())
            seen.add(self.buffered[-1][0])

    async def __aiter__(self):
        while self.buffered:
            yield self.buffered.pop(0)
        while self.open:
            yield await self._next()

    async def collect(self) -> list:
        """Per sequence: its prompt's length, text and tokens (as asked), answer text, tokens, token count,
        finish reason."""
        out = [{"prompt_len": 0, "prompt_text": None, "prompt": None, "text": "", "tokens": [],
                "count": 0, "finish": None}
               for _ in self.requests]
        async for i, u in self:
            o = out[i]
            if u.prompt_len is not None:
                o.update(prompt_len=u.prompt_len, prompt_text=u.prompt_text, prompt=u.prompt)
            o["text"] += u.text
            o["tokens"] += u.tokens
            o["count"] += 1
            o["finish"] = u.finish_reason or o["finish"]
        return out

    def cancel(self) -> None:
        for r in self.requests:
            r.cancel()


class _HungUp(Exception):
    pass


async def _until_hang_up(request: Optional[Request]) -> None:
    if request is None:
        await asyncio.Event().wait()  # never
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _watched(run: _Run, work, request: Optional[Request], timeout: Optional[float]):
    """`work` (a coroutine over `run`); the run's sequences are dropped if the client hangs up (_HungUp),
    the time runs out (504) or the work fails."""
    task, hang_up = asyncio.ensure_future(work), asyncio.ensure_future(_until_hang_up(request))
    try:
        done, _ = await asyncio.wait({task, hang_up}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        run.cancel()
        if hang_up in done:
            raise _HungUp()
        raise RequestError(504, None, f"no answer within {timeout:.0f}s")
    except BaseException:
        run.cancel()
        raise
    finally:
        task.cancel()
        hang_up.cancel()


# ---- routes ----

async def _read_body(request: Request, limits: Limits) -> bytes:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise RequestError(415, "Content-Type", f"{content_type or 'no Content-Type'}: send the body as "
                                                "application/json")
    length = request.headers.get("content-length", "")
    if not (length.isascii() and length.isdigit()):
        raise RequestError(411, "Content-Length", "a Content-Length header is required")
    if int(length) > MAX_BODY_BYTES:
        raise RequestError(413, "body", f"{length} bytes; at most {MAX_BODY_BYTES}")
    body = await request.body()
    if len(body) < int(length):
        raise RequestError(400, "body", f"{len(body)} bytes received, Content-Length said {length}")
    return body


async def _endpoint_answer(endpoint: Endpoint, body: bytes, request: Optional[Request]):
    prompts, options = parse_request(body, endpoint.limits, endpoint.defaults)
    generator = oa.new_generator(options)
    run = _Run(endpoint, [dict(prompt=p, options=options, generator=generator) for p in prompts],
               lambda i: f"input_data.input_string[{i}]")
    results = await _watched(run, run.collect(), request, endpoint.limits.timeout_s)
    return [{str(i): p + r["text"] for i, (p, r) in enumerate(zip(prompts, results, strict=True))}]


async def endpoint_route(request: Request):
    endpoint = request.app.state.endpoint
    return JSONResponse(await _endpoint_answer(endpoint, await _read_body(request, endpoint.limits), request))


async def health(request: Request):
    endpoint = request.app.state.endpoint
    return JSONResponse({"status": "ok", **endpoint.batcher.status(), "model": endpoint.model_name,
                         "max_seq_len": endpoint.model.config.max_seq_len})


async def models(request: Request):
    endpoint = request.app.state.endpoint
    return JSONResponse({"object": "list", "data": [{
        "id": endpoint.model_name, "object": "model", "created": 0, "owned_by": "llmfoundry_lite",
        "max_model_len": endpoint.model.config.max_seq_len}]})


def _sse(payload) -> bytes:
    return b"data: " + (payload if isinstance(payload, bytes) else json.dumps(payload).encode()) + b"\n\n"


def _choice(chat: bool, index: int, text: str, tokens, logprobs: bool, finish, delta: Optional[bool] = None) -> dict:
    """One choice of an answer (`delta` None) or of a stream chunk (`delta`: whether it is the first)."""
    if not chat:
        return {"index": index, "text": text, "logprobs": oa.completion_logprobs(tokens) if logprobs else None,
                "finish_reason": finish}
    if delta is None:
        body = {"message": {"role": "assistant", "content": text}}
    else:
        body = {"delta": {**({"role": "assistant"} if delta else {}), **({"content": text} if text or delta else {})}}
    return {"index": index, **body, "logprobs": oa.chat_logprobs(tokens) if logprobs else None,
            "finish_reason": finish}


async def _openai(request: Request, chat: bool):
    endpoint = request.app.state.endpoint
    req = oa.parse(oa.ChatRequest if chat else oa.CompletionRequest,
                   load_json(await _read_body(request, endpoint.limits)))
    if req.model is not None and req.model != endpoint.model_name:
        raise RequestError(404, "model", f"model {req.model[:100]!r} is not served here; this server serves "
                                         f"{endpoint.model_name!r} (GET /v1/models)")
    options = req.sampling(endpoint.defaults, endpoint.limits.max_new_tokens)
    stops, generator = req.stops(), oa.new_generator(options)
    if chat:
        if req.top_logprobs is not None and not req.logprobs:
            raise RequestError(400, "top_logprobs", "top_logprobs needs logprobs: true")
        if endpoint.no_chat:
            raise endpoint.no_chat
        prompts, field = [req.prompt()], "messages"
        extra = dict(stop_ids=endpoint.chat_stop_ids, logprobs=(req.top_logprobs or 0) if req.logprobs else None)
    else:
        prompts, field = req.prompts(), "prompt"
        extra = dict(logprobs=req.logprobs, echo=req.echo)
    logprobs = extra["logprobs"] is not None
    if len(prompts) * req.n > endpoint.limits.max_inputs:
        raise RequestError(400, "n", f"{len(prompts)} prompts x n={req.n} sequences; at most "
                                     f"{endpoint.limits.max_inputs} per request")
    run = _Run(endpoint, [dict(prompt=p, options=options, stop=stops, generator=generator, **extra)
                          for p in prompts for _ in range(req.n)], lambda i: field)
    request_id, created = oa.new_id("chatcmpl" if chat else "cmpl")
    kind = "chat.completion" if chat else "text_completion"

    def envelope(choices, usage=None, chunk=False):
        return oa.envelope(kind + (".chunk" if chunk and chat else ""), endpoint.model_name, request_id, created,
                           choices, usage)

    if not req.stream:
        results = await _watched(run, run.collect(), request, endpoint.limits.timeout_s)
        choices = [_choice(chat, i, (r["prompt_text"] or "") + r["text"], (r["prompt"] or []) + r["tokens"],
                           logprobs, r["finish"]) for i, r in enumerate(results)]
        usage = oa.usage(sum(r["prompt_len"] for r in results[::req.n]), sum(r["count"] for r in results))
        return JSONResponse(envelope(choices, usage))

    await _watched(run, run.admitted(), request, endpoint.limits.timeout_s)  # a refusal is still a 4xx answer
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    async def chunks():
        prompt_tokens = completion_tokens = 0
        try:
            async for i, u in run:
                first = u.prompt_len is not None
                prompt_tokens += u.prompt_len if first and i % req.n == 0 else 0
                completion_tokens += 1
                text = (u.prompt_text or "") + u.text
                tokens = (u.prompt or []) + u.tokens
                if text or tokens or u.finish_reason or (chat and first):
                    choice = _choice(chat, i, text, tokens, logprobs, u.finish_reason, delta=first if chat else None)
                    yield _sse(envelope([choice], chunk=True))
            if include_usage:
                yield _sse(envelope([], oa.usage(prompt_tokens, completion_tokens), chunk=True))
            yield _sse(b"[DONE]")
        except RequestError as e:  # the model failed mid-stream: the status has been sent, so an error event
            yield _sse(oa.error_body(e.status, e.field, e.message))
        finally:  # also when the client hangs up (Starlette cancels this generator)
            run.cancel()

    return StreamingResponse(chunks(), media_type="text/event-stream")


async def completions(request: Request):
    return await _openai(request, chat=False)


async def chat_completions(request: Request):
    return await _openai(request, chat=True)


# ---- the application ----

def _error(path: str, status: int, field: Optional[str], message: str, headers=None) -> JSONResponse:
    body = oa.error_body(status, field, message) if path.startswith("/v1/") else {"error": message, "field": field}
    return JSONResponse(body, status, headers=headers)


async def _request_error(request: Request, e: RequestError):
    return _error(request.url.path, e.status, e.field, e.message)


async def _http_error(request: Request, e: HTTPException):
    path, method = request.url.path, request.method[:20]
    if e.status_code == 405:
        return _error(path, 405, "method", f"method {method!r} not allowed on {path[:100]}", e.headers)
    return _error(path, e.status_code, "path", f"no route {path[:100]}; routes: POST /v1/completions, "
                                               "POST /v1/chat/completions, GET /v1/models, POST /, GET /health")


async def _hung_up(request: Request, e: Exception):
    return Response(status_code=499)  # nobody is listening; uvicorn drops it


class _ApiKey:
    """ASGI middleware: every route needs `Authorization: Bearer KEY`."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, b"Bearer " + key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = _error(scope["path"], 401, "Authorization", "missing or wrong API key: send "
                                  "'Authorization: Bearer KEY' with the key the server was started with",
                                  {"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def make_app(endpoint: Endpoint) -> Starlette:
    app = Starlette(routes=[
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/", endpoint_route, methods=["POST"]),
        Route("/score", endpoint_route, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ], exception_handlers={RequestError: _request_error, HTTPException: _http_error,
                           _HungUp: _hung_up, ClientDisconnect: _hung_up})
    app.state.endpoint = endpoint
    return _ApiKey(app, endpoint.api_key) if endpoint.api_key else app


def make_server(model, tokenizer, host: str = "127.0.0.1", port: int = 8080, limits: Optional[Limits] = None,
                quiet: bool = False, defaults: Optional[SamplingOptions] = None, model_name: str = "mpt",
                api_key: Optional[str] = None) -> EndpointServer:
    """A ready server (call `.serve_forever()`; `.endpoint` is its Endpoint); port 0 picks a free port
    (`server.server_address`)."""
    endpoint = Endpoint(model, tokenizer, limits, defaults, model_name, api_key)
    limits = endpoint.limits
    protocol = guarded_protocol(limits.client_timeout_s, limits.max_connections,
                                lambda status, field, message: {"error": message, "field": field})
    server = EndpointServer(make_app(endpoint), host, port, protocol, quiet)
    server.endpoint = endpoint
    return server


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--api_key", default=os.environ.get(API_KEY_ENV),
                        help=f"require 'Authorization: Bearer KEY' on every route (default: ${API_KEY_ENV})")
    parser.add_argument("--served_model_name", default=None,
                        help="the model's name in the OpenAI API (default: MODEL's folder name)")
    parser.add_argument("--max_inputs", type=int, default=Limits.max_inputs,
                        help="sequences per request (input strings; prompts x n)")
    parser.add_argument("--max_new_tokens_limit", type=int, default=Limits.max_new_tokens)
    parser.add_argument("--max_batch_size", type=int, default=Limits.max_batch_size, help="sequences decoding together")
    parser.add_argument("--queue_size", type=int, default=Limits.queue_size,
                        help="sequences waiting to join the batch before 503")
    parser.add_argument("--client_timeout", type=float, default=Limits.client_timeout_s,
                        help="seconds a request's headers and body may take to arrive (then 408)")
    parser.add_argument("--max_connections", type=int, default=Limits.max_connections)
    parser.add_argument("--quiet", action="store_true", help="do not log each request")
    SamplingOptions.add_arguments(parser.add_argument_group(
        "request defaults", "for the parameters a request does not set (max_new_tokens capped by --max_new_tokens_limit)"))


def run(args: argparse.Namespace) -> int:
    defaults = SamplingOptions.from_args(args)
    model, tokenizer = open_model(args)
    limits = Limits(args.max_inputs, args.max_new_tokens_limit, args.queue_size, args.max_batch_size,
                    client_timeout_s=args.client_timeout, max_connections=args.max_connections)
    path = (getattr(args, "model", None) or args.name_or_path).rstrip("/")
    name = args.served_model_name or os.path.basename(path) or path
    if not args.api_key and not _loopback(args.host):
        print(f"warning: serving on {args.host} without an API key: anyone who can reach it can use it; "
              f"set --api_key or ${API_KEY_ENV}", file=sys.stderr, flush=True)
    server = make_server(model, tokenizer, args.host, args.port, limits, args.quiet, defaults, name, args.api_key)
    if server.endpoint.batcher.note:
        print(f"note: {server.endpoint.batcher.note}", file=sys.stderr, flush=True)
    host, port = server.server_address[:2]
    print(f"serving {name!r} on http://{host}:{port}  (OpenAI API under /v1, POST / with input_data, "
          "GET /health; Ctrl-C stops)", flush=True)
    with server:
        server.serve_forever()
    return 0
