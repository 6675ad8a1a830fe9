"""The HTTP endpoint under hostile clients (127.0.0.1 only, bounded loops): random and adversarial
bodies, broken headers, oversized payloads, slow clients, connection floods. Every request gets a
4xx JSON answer or is served; nothing crashes the server, blocks other clients or grows without bound."""
import json
import socket
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmfoundry_lite.inference.serve import MAX_BODY_BYTES, MAX_JSON_DEPTH, Endpoint, Limits, RequestError, make_server
from llmfoundry_lite.models import MPTConfig, MPTForCausalLM

pytestmark = pytest.mark.usefixtures("torch_one_thread")
LIMITS = Limits(max_inputs=4, max_new_tokens=3, queue_size=4, client_timeout_s=1.0, max_connections=12)
VALID = {"input_data": {"input_string": ["the meaning of life is"], "parameters": {"max_new_tokens": 2}}}


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    model = MPTForCausalLM(MPTConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=32, vocab_size=len(tokenizer)))
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def server(model_and_tokenizer):
    srv = make_server(*model_and_tokenizer, port=0, limits=LIMITS, quiet=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    assert not thread.is_alive()


def _complete(response: bytes) -> bool:
    """Whether `response` holds a whole answer: headers and as many body bytes as they announce."""
    head, _, body = response.partition(b"\r\n\r\n")
    length = head.lower().split(b"\r\ncontent-length: ", 1)[1:]
    return bool(_) and bool(length) and len(body) >= int(length[0].split(b"\r\n", 1)[0])


def exchange(srv, data: bytes, timeout=10.0) -> bytes:
    """Send raw bytes, return the server's answer: one whole response, or all it sent before closing
    (b'' if it just hangs up). The connection may stay open after a response (HTTP/1.1 keep-alive)."""
    with socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while not _complete(out):
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            out += chunk
    return out


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1."), response[:200]  # a status line even for a garbled request
    return int(response.split(b" ", 2)[1])


def json_of(response: bytes):
    """The JSON body of a response (which must have one, of its Content-Length)."""
    head, body = response.split(b"\r\n\r\n", 1)
    head = head.lower() + b"\r\n"  # header names are case-insensitive
    assert b"\r\ncontent-type: application/json\r\n" in head and b"\r\ncontent-length: %d\r\n" % len(body) in head, head
    return json.loads(body)


def post(srv, body: bytes, headers: bytes = b"") -> tuple:
    """(status, parsed JSON body) of a POST with a correct Content-Length."""
    resp = exchange(srv, b"POST / HTTP/1.1\r\nContent-Type: application/json\r\nHost: t\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), headers, body))
    return status_of(resp), json_of(resp)


def assert_healthy(srv):
    status, body = post(srv, json.dumps(VALID).encode())
    assert status == 200 and body[0]["0"].startswith("the meaning of life is")


# ---- bodies ---------------------------------------------------------------------------------------

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=4),
                           max_leaves=12)
param_values = st.sampled_from([0, 1, 2, 3, 4, -1, 2 ** 64, 0.5, 1e308, float("inf"), float("nan"), True, None, "1", [1]])
near_valid = st.fixed_dictionaries({"input_data": st.fixed_dictionaries(
    {"input_string": st.lists(st.text(max_size=30), min_size=0, max_size=6) | json_values},
    optional={"parameters": st.dictionaries(st.sampled_from(["max_new_tokens", "temperature", "top_p", "top_k",
                                                            "repetition_penalty", "do_sample", "seed", "max_tokens"]),
                                            param_values, max_size=4) | json_values})})


@pytest.fixture(scope="module")
def endpoint(model_and_tokenizer):
    return Endpoint(*model_and_tokenizer, LIMITS)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.one_of(near_valid.map(lambda d: json.dumps(d).encode()),
                      json_values.map(lambda d: json.dumps(d).encode()),
                      st.binary(max_size=64)))
def test_fuzz_bodies_answer_4xx_or_serve(endpoint, body):
    try:
        result = endpoint.answer(body)
    except RequestError as e:
        assert 400 <= e.status < 500 and e.field, (e.status, e.message)
    else:
        assert isinstance(result, list) and len(result) == 1


ADVERSARIAL = {
    "deep nesting": b"[" * 200_000,
    "4301-digit integer": b'{"input_data": {"input_string": ["a"], "parameters": {"seed": 1' + b"0" * 5000 + b"}}}",
    "invalid UTF-8": b'{"input_data": {"input_string": ["\xff\xfe"]}}',
    "lone surrogate": b'{"input_data": {"input_string": ["\\ud800 hi"]}}',
    "NaN": b'{"input_data": {"input_string": ["hi"], "parameters": {"temperature": NaN}}}',
    "Infinity": b'{"input_data": {"input_string": ["hi"], "parameters": {"top_p": Infinity}}}',
    "huge key": b'{"' + b"k" * 500_000 + b'": 1}',
    "too many prompts": json.dumps({"input_data": {"input_string": ["a"] * 1000}}).encode(),
    "prompt longer than the model": json.dumps({"input_data": {"input_string": ["word " * 5000]}}).encode(),
    "empty body": b"",
    "NUL bytes": b"\x00" * 1000,
}


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_adversarial_body_gets_400(server, name):
    status, body = post(server, ADVERSARIAL[name])
    assert status == 400 and body["error"] and body["field"], body
    assert len(json.dumps(body)) < 2000  # error messages stay short whatever the input


H = b"Host: t\r\n"  # HTTP/1.1 requires it: without it h11 answers 400 before anything else is read


@pytest.mark.parametrize("request_bytes, expected", [
    (b"POST / HTTP/1.1\r\n" + H + b"Content-Type: application/json\r\nContent-Length: \xb2\r\n\r\n{}", 400),  # non-ASCII digit
    (b"POST / HTTP/1.1\r\n" + H + b"Content-Type: application/json\r\nContent-Length: -1\r\n\r\n{}", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Content-Type: application/json\r\n\r\n{}", 411),
    (b"POST / HTTP/1.1\r\n" + H + b"Content-Type: application/json\r\nContent-Length: 99999999999999999999\r\n\r\n", 413),
    (b"POST /admin HTTP/1.1\r\n" + H + b"Content-Length: 2\r\n\r\n{}", 404),
    (b"GET /../../etc/passwd HTTP/1.1\r\n" + H + b"\r\n", 404),
    (b"GET /health HTTP/1.1\r\n\r\n", 400),                                 # no Host
    (b"\x00\x01\x02 garbage\r\n\r\n", 400),
    (b"GET /health HTTP/1.1\r\n" + H + b"".join(b"X-%d: %s\r\n" % (i, b"y" * 100) for i in range(2000)) + b"\r\n", 400),
    (b"GET /" + b"a" * 300_000 + b" HTTP/1.1\r\n" + H + b"\r\n", 400),
    (b"GET / HTTP/1.1 " + b"x" * 300_000 + b"\r\n\r\n", 400),
    (b"PUT / HTTP/1.1\r\n" + H + b"\r\n", 405),
])
def test_broken_requests_get_a_json_error(server, request_bytes, expected):
    resp = exchange(server, request_bytes)
    answer = json_of(resp)
    assert status_of(resp) == expected and answer["error"] and answer["field"], answer
    assert len(resp) < 2000  # error messages quote the request cut short
    assert_healthy(server)


def test_a_body_cut_short_is_a_408_or_a_close(server):
    """Content-Length 10 and two bytes: a 408 at the deadline; if the client also closes its side,
    nobody is left to answer and the connection just closes."""
    request = b"POST / HTTP/1.1\r\n" + H + b"Content-Type: application/json\r\nContent-Length: 10\r\n\r\n{}"
    resp = exchange(server, request)
    assert status_of(resp) == 408 and json_of(resp)["field"] == "body"
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        assert s.recv(65536) == b""
    assert_healthy(server)


def lists_in_input_string(depth: int) -> bytes:
    """A body whose input_string holds `depth` - 2 empty lists one inside another: `depth` levels in all."""
    return b'{"input_data": {"input_string": ' + b"[" * (depth - 2) + b"]" * (depth - 2) + b"}}"


DEEP = {
    "unterminated, in input_data": b'{"input_data": ' + b"[" * 100_000,  # deeper than the parser's stack
    # well-formed and within the parser's stack, but deep enough to make the checks recurse
    "well-formed list as temperature": b'{"input_data": {"input_string": ["hi"], "parameters": {"temperature": '
                                      + b"[" * 900 + b"]" * 900 + b"}}}",
    "well-formed objects as top_k": b'{"input_data": {"input_string": ["hi"], "parameters": {"top_k": '
                                    + b'{"a": ' * 900 + b"1" + b"}" * 900 + b"}}}",
    "one level too deep": lists_in_input_string(MAX_JSON_DEPTH + 1),
}


@pytest.mark.parametrize("name", DEEP)
def test_deeply_nested_json_is_a_400_naming_it(server, name):
    status, body = post(server, DEEP[name])
    assert (status, body["field"]) == (400, "body") and "nested deeper than" in body["error"], body
    assert_healthy(server)


def test_nesting_up_to_the_limit_is_checked_as_usual(server):
    status, body = post(server, lists_in_input_string(MAX_JSON_DEPTH))
    assert (status, body["field"]) == (400, "input_data.input_string"), body


@pytest.mark.parametrize("method", [b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"TRACE", b"get"])
@pytest.mark.parametrize("path, allow", [(b"/", b"POST"), (b"/v1/completions", b"POST"), (b"/health", b"GET, HEAD")])
def test_other_methods_get_a_json_405_with_allow(server, method, path, allow):
    resp = exchange(server, method + b" " + path + b" HTTP/1.1\r\nHost: t\r\n\r\n")
    answer = json_of(resp)
    allowed = resp.lower().split(b"\r\nallow: ", 1)[1].split(b"\r\n", 1)[0]
    assert status_of(resp) == 405 and set(allowed.split(b", ")) == set(allow.lower().split(b", ")), resp
    error = answer["error"]["message"] if path.startswith(b"/v1/") else answer["error"]
    field = answer["error"]["param"] if path.startswith(b"/v1/") else answer["field"]
    assert field == "method" and "not allowed" in error, answer
    assert_healthy(server)


def test_head_is_get_without_a_body(server):
    for path, status in ((b"/health", 200), (b"/nope", 404)):
        get, head = (exchange(server, m + b" " + path + b" HTTP/1.1\r\nHost: t\r\n\r\n") for m in (b"GET", b"HEAD"))
        assert status_of(head) == status_of(get) == status and json_of(get)
        (head_headers, head_body), get_body = head.split(b"\r\n\r\n", 1), get.split(b"\r\n\r\n", 1)[1]
        assert head_body == b"" and b"\r\ncontent-length: %d\r\n" % len(get_body) in head_headers.lower() + b"\r\n"
    assert_healthy(server)


# ---- sampling values at the edges of their ranges ---------------------------------------------------

TINY = 5e-324  # the smallest positive float: `0 < v` accepts it


@pytest.mark.parametrize("parameters", [
    {"temperature": TINY}, {"temperature": 1e-30}, {"temperature": 100},
    {"repetition_penalty": TINY}, {"repetition_penalty": 1e-30}, {"repetition_penalty": 10},
    {"repetition_penalty": TINY, "temperature": TINY}, {"top_p": TINY}, {"top_k": 2 ** 62},
], ids=json.dumps)
@pytest.mark.parametrize("do_sample", [True, False])
def test_accepted_extreme_sampling_values_generate(server, parameters, do_sample):
    prompt = "the meaning of life is"
    request = {"input_data": {"input_string": [prompt], "parameters": {
        **parameters, "do_sample": do_sample, "max_new_tokens": 3, "seed": 1}}}
    status, body = post(server, json.dumps(request).encode())
    assert status == 200 and body[0]["0"].startswith(prompt) and len(body[0]["0"]) > len(prompt), body
    if parameters.get("temperature") == TINY:  # so cold that sampling is greedy, token for token
        request["input_data"]["parameters"]["do_sample"] = False
        assert post(server, json.dumps(request).encode()) == (200, body)
    assert_healthy(server)


accepted_options = st.fixed_dictionaries({}, optional={
    "temperature": st.floats(0, 100, exclude_min=True),
    "repetition_penalty": st.floats(0, 10, exclude_min=True),
    "top_p": st.none() | st.floats(0, 1, exclude_min=True),
    "top_k": st.none() | st.integers(0, 2 ** 62),
    "do_sample": st.booleans(),
    "seed": st.none() | st.integers(0, 2 ** 63 - 1),
    "max_new_tokens": st.integers(1, LIMITS.max_new_tokens)})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parameters=accepted_options)
def test_every_accepted_sampling_value_generates(endpoint, parameters):
    prompts = ["the meaning of life is", "if"]
    body = {"input_data": {"input_string": prompts, "parameters": parameters}}
    result = endpoint.answer(json.dumps(body).encode())  # neither a 400 nor a 500
    assert [result[0][str(i)][:len(p)] for i, p in enumerate(prompts)] == prompts


def test_oversized_payload_is_refused_before_it_is_read(server):
    """413 after the headers alone: the server never buffers the announced body."""
    t0 = time.monotonic()
    resp = exchange(server, b"POST / HTTP/1.1\r\n" + H + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                    % (MAX_BODY_BYTES + 1) + b"{" * 1000)
    assert status_of(resp) == 413 and time.monotonic() - t0 < LIMITS.client_timeout_s


def test_slow_clients_neither_block_others_nor_stay_forever(server):
    port = server.server_address[1]
    slow = []
    for partial in (b"POST / HTTP/1.1\r\n" + H + b"Content-Type: application/json\r\nContent-Le",
                    b"POST / HTTP/1.1\r\n" + H + b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"in"):
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(partial)  # ... and never the rest (slowloris)
            slow.append(s)
    t0 = time.monotonic()
    assert_healthy(server)  # served while the slow ones hang
    assert time.monotonic() - t0 < 30
    answers = []
    for s in slow:  # each is cut off after client_timeout_s with a 408, in the headers or in the body
        data = s.recv(65536)
        answers.append(status_of(data) if data else None)
        s.close()
    assert answers == [408] * 6, answers


def test_trickling_a_byte_at_a_time_is_cut_off_at_the_deadline(server):
    """Each byte comes well within the deadline; the request as a whole does not: a 408 after
    client_timeout_s, however it trickles, while other clients are served."""
    request = b"POST / HTTP/1.1\r\n" + H + b"Content-Type: application/json\r\nContent-Length: 200\r\n\r\n" + b" " * 200
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as s:
        t0, sent = time.monotonic(), 0
        try:
            for byte in request:
                s.sendall(bytes([byte]))
                sent += 1
                time.sleep(LIMITS.client_timeout_s / 8)
                if sent == 5:
                    assert_healthy(server)
        except (BrokenPipeError, ConnectionResetError):
            pass
        s.settimeout(LIMITS.client_timeout_s * 5)
        answer = s.recv(65536)
        elapsed = time.monotonic() - t0
    assert status_of(answer) == 408 and json_of(answer)["field"] == "body"
    assert sent < len(request) and LIMITS.client_timeout_s <= elapsed < LIMITS.client_timeout_s * 4, (sent, elapsed)


def test_connection_flood_is_bounded_and_recovers(server):
    port = server.server_address[1]
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3 * LIMITS.max_connections)]
    time.sleep(0.3)
    assert server.open_connections() <= LIMITS.max_connections
    refused = 0
    for s in idle:  # beyond max_connections: an immediate 503; the others are closed at the deadline
        s.settimeout(LIMITS.client_timeout_s * 5)
        data = s.recv(65536)
        refused += bool(data) and status_of(data) == 503
        s.close()
    assert refused >= 2 * LIMITS.max_connections - 2
    deadline = time.monotonic() + 10 * LIMITS.client_timeout_s
    while server.open_connections() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.open_connections() == 0
    assert_healthy(server)


def test_concurrent_clients_all_get_answers(server):
    results = []

    def client(i):
        body = {"input_data": {"input_string": [f"request {i}"], "parameters": {"max_new_tokens": 1}}}
        if i % 3 == 0:
            body["input_data"]["parameters"]["temperature"] = -1  # some bad ones in the mix
        results.append(post(server, json.dumps(body).encode())[0])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 10 and set(results) <= {200, 400, 503}
    assert results.count(400) == 4 and 200 in results
    assert_healthy(server)


def test_memory_stays_bounded_under_large_bodies(server):
    psutil = pytest.importorskip("psutil")
    proc = psutil.Process()
    # read and parsed in full, then refused for its misspelt field (the worker never sees it)
    body = b'{"input_data": {"input_string": ["' + b"ab " * ((MAX_BODY_BYTES - 100) // 3) + b'"], "parameterz": {}}}'
    post(server, body)
    before = proc.memory_info().rss
    for _ in range(20):
        status, answer = post(server, body)
        assert status == 400 and answer["field"] == "input_data.parameterz"
    assert proc.memory_info().rss - before < 64 * 2 ** 20
