"""The HTTP endpoint's MPT-7B request format: the sample request, every bad request's 4xx, concurrency."""
import json
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from llmfoundry_lite.inference import generate
from llmfoundry_lite.inference.batching import GenerationRequest, Update
from llmfoundry_lite.inference.generate import SamplingOptions
from llmfoundry_lite.inference.serve import Endpoint, Limits, RequestError, make_server
from llmfoundry_lite.models import MPTConfig, MPTForCausalLM

pytestmark = pytest.mark.usefixtures("torch_one_thread")
SAMPLE = {"input_data": {"input_string": ["the meaning of life is"],
                         "parameters": {"temperature": 0.5, "top_p": 0.5, "max_new_tokens": 10, "do_sample": True}}}


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    model = MPTForCausalLM(MPTConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=len(tokenizer)))
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def url(model_and_tokenizer):
    server = make_server(*model_and_tokenizer, port=0, limits=Limits(max_inputs=8, max_new_tokens=32), quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _request(url, body=None, path="/", method=None, headers=None):
    """(status, parsed JSON body); `body` may be bytes or a JSON-able object."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **(headers or {})}
    req = urllib.request.Request(url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_binds_localhost_and_reports_health(url):
    assert url.startswith("http://127.0.0.1:")
    status, body = _request(url, path="/health")
    assert status == 200 and body["status"] == "ok" and body["max_seq_len"] == 64


def test_sample_request_gets_a_well_formed_answer(url):
    status, body = _request(url, SAMPLE)
    assert status == 200
    assert isinstance(body, list) and len(body) == 1 and list(body[0]) == ["0"]
    assert body[0]["0"].startswith("the meaning of life is") and len(body[0]["0"]) > len("the meaning of life is")


def test_several_inputs_answer_in_order(url, model_and_tokenizer):
    prompts = ["Return the", "A path", "If"]
    status, body = _request(url, {"input_data": {"input_string": prompts, "parameters": {"max_new_tokens": 6}}})
    assert status == 200 and list(body[0]) == ["0", "1", "2"]
    assert list(body[0].values()) == list(generate(*model_and_tokenizer, prompts, max_new_tokens=6))


def _with(**parameters):
    return {"input_data": {"input_string": ["hello"], "parameters": parameters}}


BAD = [
    (b"{not json", 400, "body"),
    (b"[1, 2]", 400, "input_data"),
    ({"input_data": {"input_string": ["x"]}, "extra": 1}, 400, "extra"),
    ({"input_data": ["x"]}, 400, "input_data"),
    ({"input_data": {"input_strings": ["x"]}}, 400, "input_data.input_strings"),
    ({"input_data": {"input_string": "a string"}}, 400, "input_data.input_string"),
    ({"input_data": {"input_string": [1, 2]}}, 400, "input_data.input_string"),
    ({"input_data": {"input_string": []}}, 400, "input_data.input_string"),
    ({"input_data": {"input_string": ["ok", " "]}}, 400, "input_data.input_string[1]"),
    ({"input_data": {"input_string": ["x"] * 9}}, 400, "input_data.input_string"),
    ({"input_data": {"input_string": ["ok", "word " * 70]}}, 400, "input_data.input_string[1]"),
    ({"input_data": {"input_string": ["x"], "parameters": [1]}}, 400, "input_data.parameters"),
    (_with(temprature=0.5), 400, "input_data.parameters.temprature"),
    (_with(temperature="hot"), 400, "input_data.parameters.temperature"),
    (_with(temperature=0), 400, "input_data.parameters.temperature"),
    (_with(top_p=1.5), 400, "input_data.parameters.top_p"),
    (_with(top_k=-1), 400, "input_data.parameters.top_k"),
    (_with(max_new_tokens=0), 400, "input_data.parameters.max_new_tokens"),
    (_with(max_new_tokens=33), 400, "input_data.parameters.max_new_tokens"),
    (_with(max_new_tokens=3.5), 400, "input_data.parameters.max_new_tokens"),
    (_with(max_new_tokens=True), 400, "input_data.parameters.max_new_tokens"),
    (_with(do_sample="yes"), 400, "input_data.parameters.do_sample"),
    (_with(repetition_penalty=0), 400, "input_data.parameters.repetition_penalty"),
]


@pytest.mark.parametrize("body,status,field", BAD, ids=[f"{i}-{f}" for i, (_, _, f) in enumerate(BAD)])
def test_bad_requests_get_a_4xx_naming_the_field(url, body, status, field):
    got, answer = _request(url, body)
    assert (got, answer["field"]) == (status, field), answer
    assert answer["error"]


def test_a_request_gets_the_servers_defaults_for_what_it_does_not_set(model_and_tokenizer, monkeypatch):
    endpoint = Endpoint(*model_and_tokenizer, Limits(max_new_tokens=8),
                        SamplingOptions(max_new_tokens=20, do_sample=True, temperature=0.7, seed=1))
    seen = []

    def submit(requests):  # what the batcher is asked for, answered at once
        for r in requests:
            seen.append(r.options)
            r.on_update(Update(text="x", prompt_len=1, finish_reason="stop"))
    monkeypatch.setattr(endpoint.batcher, "submit", submit)
    assert endpoint.answer(json.dumps(_with()).encode()) == [{"0": "hellox"}]
    endpoint.answer(json.dumps(_with(seed=2, max_new_tokens=3)).encode())
    assert [(o.max_new_tokens, o.do_sample, o.temperature, o.seed) for o in seen] == [
        (8, True, 0.7, 1), (3, True, 0.7, 2)]  # the default max_new_tokens is capped by the limit


def test_unknown_routes_and_oversized_bodies(url):
    assert _request(url, path="/nope")[0] == 404
    assert _request(url, SAMPLE, path="/other")[0] == 404
    assert _request(url, SAMPLE, path="/score")[0] == 200
    status, body = _request(url, b"{}", headers={"Content-Length": str(10 ** 8)})
    assert status == 413 and body["field"] == "body"
    assert _request(url, _with(temprature=1))[1]["error"].find("did you mean 'temperature'") > 0


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", ""])
def test_a_json_body_must_be_sent_as_application_json(url, content_type):
    status, body = _request(url, SAMPLE, headers={"Content-Type": content_type})
    assert status == 415 and body["field"] == "Content-Type" and "application/json" in body["error"]
    assert _request(url, SAMPLE, headers={"Content-Type": "application/json; charset=utf-8"})[0] == 200


def test_concurrent_clients_each_get_their_own_answer(url, model_and_tokenizer):
    prompts = [f"{word} is" for word in ("Return", "A path", "The file", "If", "Each", "This", "When", "An object")]
    expected = list(generate(*model_and_tokenizer, prompts, max_new_tokens=8))
    answers = [None] * len(prompts)

    def client(i):
        answers[i] = _request(url, {"input_data": {"input_string": [prompts[i]],
                                                   "parameters": {"max_new_tokens": 8, "do_sample": False}}})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == [(200, [{"0": text}]) for text in expected]


def test_a_full_queue_answers_503(model_and_tokenizer):
    """One sequence decoding (held inside its first update), one waiting: a third is refused at once."""
    endpoint = Endpoint(*model_and_tokenizer, Limits(queue_size=1, max_batch_size=1))
    release, started = threading.Event(), threading.Event()
    held = GenerationRequest("hello", SamplingOptions(max_new_tokens=2),
                             on_update=lambda update: started.set() or release.wait(30))
    endpoint.batcher.submit([held])
    assert started.wait(30)
    body = json.dumps(_with(max_new_tokens=2)).encode()
    results = []
    waiting = threading.Thread(target=lambda: results.append(endpoint.answer(body)))
    waiting.start()
    while endpoint.batcher.status()["queued"] < 1:
        time.sleep(0.01)
    with pytest.raises(RequestError) as busy:
        endpoint.answer(body)
    assert busy.value.status == 503 and "server busy" in busy.value.message
    release.set()
    waiting.join(30)
    assert results and results[0][0]["0"].startswith("hello")
