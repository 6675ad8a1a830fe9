"""An HTTP endpoint for real-time inference, speaking the MPT-7B managed-endpoint request format.

    POST /  (or /score)  {"input_data": {"input_string": ["the meaning of life is"],
                          "parameters": {"temperature": 0.5, "top_p": 0.5, "max_new_tokens": 10, "do_sample": true}}}
    -> 200 [{"0": "the meaning of life is ..."}]        (one key per input string, in order)
    GET /health -> 200 {"status": "ok", ...}            (HEAD: the same without the body; other methods: 405)

Standard library only (`http.server`). Each connection gets a thread that validates the request and
puts it on a bounded queue (full -> 503); ONE worker thread owns the model and answers the queue in
order, so concurrent requests never share model state. Every bad request gets a 4xx JSON body
`{"error": message, "field": dotted.path}` naming the offending field, also those that http.server
itself refuses (a garbled request line, oversized headers).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import queue
import sys
import threading
from dataclasses import dataclass, field, fields, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, List, Optional

from llmfoundry_lite.config import check
from llmfoundry_lite.inference.generate import SamplingOptions, generate, overlong
from llmfoundry_lite.inference.loading import add_model_arguments, open_model
from llmfoundry_lite.registry import did_you_mean

MAX_BODY_BYTES = 1 << 20
MAX_JSON_DEPTH = 16  # arrays/objects one inside another; a request needs 3
METHODS = ("GET", "HEAD", "POST")  # any other: 405
_BUSY = json.dumps({"error": "server busy: too many open connections; retry later", "field": "connection"}).encode()
BUSY_RESPONSE = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                 b"Connection: close\r\n\r\n%s" % (len(_BUSY), _BUSY))


class RequestError(Exception):
    def __init__(self, status: int, field_path: str, message: str):
        super().__init__(message)
        self.status, self.field, self.message = status, field_path, message


@dataclass
class Limits:
    max_inputs: int = 8                 # input strings per request
    max_new_tokens: int = 512           # largest max_new_tokens a request may ask for
    queue_size: int = 16                # requests waiting for the model; more -> 503
    max_batch_size: Optional[int] = None
    timeout_s: float = 600.0            # how long a request waits for its answer
    client_timeout_s: float = 30.0      # a client silent this long (slowloris) is disconnected
    max_connections: int = 64           # open connections (one thread each); more -> 503 at once


def _nested_deeper_than(value, limit: int) -> bool:
    """Whether JSON `value` has more than `limit` arrays/objects one inside another (level by level: no recursion)."""
    level = [value]
    for _ in range(limit):
        level = [v for c in level if isinstance(c, (list, dict)) for v in (c.values() if isinstance(c, dict) else c)]
    return any(isinstance(c, (list, dict)) for c in level)


def parse_request(body: bytes, limits: Limits, defaults: SamplingOptions):
    """(prompts, SamplingOptions: `defaults` updated by the request) from a body, or RequestError naming the bad field.

    Token lengths are checked later, by the worker: HF fast tokenizers must not be used by two
    threads at once ("Already borrowed"), so only the worker thread touches the tokenizer."""
    too_deep = RequestError(400, "body", f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        data = json.loads(body)
    except RecursionError:  # deeper than the parser's stack
        raise too_deep from None
    except ValueError as e:  # bad UTF-8 or JSON, 4300+ digit ints
        raise RequestError(400, "body", f"malformed JSON: {str(e)[:200]}") from None
    if _nested_deeper_than(data, MAX_JSON_DEPTH):  # the checks below would recurse over what the parser accepts
        raise too_deep
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


@dataclass
class _Job:
    prompts: List[str]
    options: SamplingOptions
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: Optional[BaseException] = None


class Endpoint:
    """The model, its tokenizer, the bounded request queue and the one worker thread that runs the model."""

    def __init__(self, model, tokenizer, limits: Optional[Limits] = None, defaults: Optional[SamplingOptions] = None):
        limits, defaults = limits or Limits(), (defaults or SamplingOptions()).checked()
        self.model, self.tokenizer, self.limits = model, tokenizer, limits
        self.defaults = replace(defaults, max_new_tokens=min(defaults.max_new_tokens, limits.max_new_tokens))
        self.jobs: "queue.Queue[_Job]" = queue.Queue(maxsize=limits.queue_size)
        self.served = 0
        threading.Thread(target=self._work, name="model-worker", daemon=True).start()

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                for i, message in overlong(self.tokenizer, job.prompts, job.options.max_new_tokens,
                                           self.model.config.max_seq_len):
                    raise RequestError(400, f"input_data.input_string[{i}]", message)
                texts = generate(self.model, self.tokenizer, job.prompts,
                                 max_batch_size=self.limits.max_batch_size, **vars(job.options))
                job.result = [{str(i): t for i, t in enumerate(texts)}]
                self.served += 1
            except Exception as e:  # reported to the client (4xx or 500); the worker keeps serving
                job.error = e
            job.done.set()

    def answer(self, body: bytes):
        job = _Job(*parse_request(body, self.limits, self.defaults))
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise RequestError(503, "input_data", f"server busy: {self.limits.queue_size} requests already "
                                                  "queued; retry later") from None
        if not job.done.wait(self.limits.timeout_s):
            raise RequestError(504, "input_data", f"no answer within {self.limits.timeout_s:.0f}s")
        if isinstance(job.error, RequestError):
            raise job.error
        if job.error is not None:
            raise RequestError(500, "input_data", f"generation failed: {job.error}")
        return job.result


class _Handler(BaseHTTPRequestHandler):
    server: "EndpointServer"
    # http.server answers a request line it cannot parse as HTTP/0.9: a bare body, no status line or headers
    default_request_version = "HTTP/1.0"

    def setup(self):
        self.timeout = self.server.endpoint.limits.client_timeout_s  # socket timeout for every read
        super().setup()

    def _send(self, status: int, payload, headers=()) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (garbled request line, oversized headers, ...) as JSON too."""
        self.log_error("code %d, message %s", code, message)
        self.close_connection = True
        message = (message or HTTPStatus(code).phrase)[:200]  # some quote the whole request line
        self._send(code, {"error": message, "field": {414: "path", 431: "headers"}.get(code, "request line")})

    def parse_request(self) -> bool:
        """http.server's reading of the request line and headers, then 405 for a method not in METHODS
        (where http.server would answer 501, for want of a `do_<METHOD>`)."""
        if not super().parse_request():
            return False
        if self.command not in METHODS:
            self.close_connection = True  # its body, if any, is not read
            self._send(405, {"error": f"method {self.command[:20]!r} not allowed; use GET /health or POST /",
                             "field": "method"}, [("Allow", ", ".join(METHODS))])
            return False
        return True

    def do_GET(self):
        if self.path.rstrip("/") != "/health":
            return self._send(404, {"error": f"no route GET {self.path}; try GET /health or POST /", "field": "path"})
        ep = self.server.endpoint
        self._send(200, {"status": "ok", "queued": ep.jobs.qsize(), "served": ep.served,
                         "max_seq_len": ep.model.config.max_seq_len})

    do_HEAD = do_GET  # `_send` leaves the body out

    def do_POST(self):
        try:
            if self.path not in ("/", "/score"):
                raise RequestError(404, "path", f"no route POST {self.path}; POST to / or /score")
            content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if content_type != "application/json":
                raise RequestError(415, "Content-Type", f"{content_type or 'no Content-Type'}: send the body as "
                                                        "application/json")
            length = self.headers.get("Content-Length", "")
            if not (length.isascii() and length.isdigit()):
                raise RequestError(411, "Content-Length", "a Content-Length header is required")
            if int(length) > MAX_BODY_BYTES:
                raise RequestError(413, "body", f"{length} bytes; at most {MAX_BODY_BYTES}")
            body = self.rfile.read(int(length))
            if len(body) < int(length):
                raise RequestError(400, "body", f"{len(body)} bytes received, Content-Length said {length}")
            self._send(200, self.server.endpoint.answer(body))
        except TimeoutError:
            self.close_connection = True
            limit = self.server.endpoint.limits.client_timeout_s
            self._send(408, {"error": f"the body did not arrive within {limit:g}s", "field": "body"})
        except RequestError as e:
            self._send(e.status, {"error": e.message, "field": e.field})

    def log_message(self, format, *args):
        if not self.server.quiet:
            super().log_message(format, *args)


class EndpointServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # pending TCP connections (the default 5 refuses bursts of clients)

    def __init__(self, address, endpoint: Endpoint, quiet: bool = False):
        super().__init__(address, _Handler)
        self.endpoint, self.quiet = endpoint, quiet
        self.slots = threading.BoundedSemaphore(endpoint.limits.max_connections)

    def process_request(self, request, client_address):
        # One thread per connection, at most max_connections of them: a flood of (slow) clients is
        # answered 503 at once instead of growing threads and memory without bound.
        if not self.slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.sendall(BUSY_RESPONSE)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # a client that hung up: not ours
            super().handle_error(request, client_address)


def make_server(model, tokenizer, host: str = "127.0.0.1", port: int = 8080, limits: Optional[Limits] = None,
                quiet: bool = False, defaults: Optional[SamplingOptions] = None) -> EndpointServer:
    """A ready server (call `.serve_forever()`); port 0 picks a free port (`server.server_address`)."""
    return EndpointServer((host, port), Endpoint(model, tokenizer, limits, defaults), quiet=quiet)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--max_inputs", type=int, default=Limits.max_inputs, help="input strings per request")
    parser.add_argument("--max_new_tokens_limit", type=int, default=Limits.max_new_tokens)
    parser.add_argument("--queue_size", type=int, default=Limits.queue_size, help="waiting requests before 503")
    parser.add_argument("--max_batch_size", type=int, default=None)
    parser.add_argument("--quiet", action="store_true", help="do not log each request")
    SamplingOptions.add_arguments(parser.add_argument_group(
        "request defaults", "for the parameters a request does not set (max_new_tokens capped by --max_new_tokens_limit)"))


def run(args: argparse.Namespace) -> int:
    defaults = SamplingOptions.from_args(args)
    model, tokenizer = open_model(args)
    limits = Limits(args.max_inputs, args.max_new_tokens_limit, args.queue_size, args.max_batch_size)
    server = make_server(model, tokenizer, args.host, args.port, limits, args.quiet, defaults)
    host, port = server.server_address[:2]
    print(f"serving on http://{host}:{port}  (POST / with input_data, GET /health; Ctrl-C stops)", flush=True)
    with server, contextlib.suppress(KeyboardInterrupt):  # leaving the `with` closes the server
        server.serve_forever()
    return 0
