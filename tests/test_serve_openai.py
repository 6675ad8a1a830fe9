"""The OpenAI API of `serve`, spoken by the official `openai` client to a real local server:
completions and chat, streaming and not, logprobs and echo (what lm-eval's local-completions reads),
stop strings, n and seed, errors; continuous batching (a short request overtakes a long one), a
client hanging up, the API key."""
import glob
import json
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time

import openai
import pytest
import torch

from llmfoundry_lite.inference import generate
from llmfoundry_lite.inference.batching import Batcher, GenerationRequest
from llmfoundry_lite.inference.chat import chatml
from llmfoundry_lite.inference.generate import SamplingOptions
from llmfoundry_lite.inference.serve import Limits, make_server
from llmfoundry_lite.models import MPTConfig, MPTForCausalLM

pytestmark = pytest.mark.usefixtures("torch_one_thread")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "mpt-tiny"
LIMITS = Limits(max_inputs=8, max_new_tokens=1000, max_batch_size=8)


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    model = MPTForCausalLM(MPTConfig(d_model=64, n_heads=4, n_layers=4, max_seq_len=1100, vocab_size=len(tokenizer)))
    return model.eval(), tokenizer


def _serve(model_and_tokenizer, **kw):
    server = make_server(*model_and_tokenizer, port=0, limits=LIMITS, quiet=True, model_name=NAME, **kw)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


@pytest.fixture(scope="module")
def server(model_and_tokenizer):
    server, thread = _serve(model_and_tokenizer)
    yield server
    server.shutdown()
    server.server_close()
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="unused", max_retries=0,
                         timeout=120)


def _batcher(server):
    return server.endpoint.batcher


PROMPTS = ["Return the number of", "A path", "If the file"]


def test_greedy_completions_equal_generate_streamed_or_not(client, model_and_tokenizer):
    expected = [text[len(p):] for p, text in zip(PROMPTS, generate(*model_and_tokenizer, PROMPTS, max_new_tokens=12),
                                                 strict=True)]
    answer = client.completions.create(model=NAME, prompt=PROMPTS, max_tokens=12, temperature=0)
    assert [c.text for c in sorted(answer.choices, key=lambda c: c.index)] == expected
    assert {c.finish_reason for c in answer.choices} <= {"length", "stop"}
    tok = model_and_tokenizer[1]
    assert answer.usage.prompt_tokens == sum(len(tok(p)["input_ids"]) for p in PROMPTS)
    assert answer.usage.completion_tokens <= 36 and answer.usage.total_tokens == (
        answer.usage.prompt_tokens + answer.usage.completion_tokens)
    streamed = [""] * len(PROMPTS)
    finish = [None] * len(PROMPTS)
    for chunk in client.completions.create(model=NAME, prompt=PROMPTS, max_tokens=12, temperature=0, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
            finish[c.index] = c.finish_reason or finish[c.index]
    assert streamed == expected and None not in finish


def test_chat_is_chatml_and_ends_at_im_end(client, model_and_tokenizer):
    model, tok = model_and_tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does open return?"}]
    prompt = chatml(messages)
    stop_ids = [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]
    expected = generate(model, tok, [prompt], eos_token_id=stop_ids, max_new_tokens=16)[0][len(prompt):]
    answer = client.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0)
    assert answer.choices[0].message.role == "assistant" and answer.choices[0].message.content == expected
    assert answer.usage.prompt_tokens == len(tok(prompt)["input_ids"])
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == answer.usage.total_tokens


def test_chat_logprobs(client):
    messages = [{"role": "user", "content": "What does open return?"}]
    answer = client.chat.completions.create(model=NAME, messages=messages, max_tokens=6, temperature=0,
                                            logprobs=True, top_logprobs=2)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)  # greedy: the likeliest
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=messages, max_tokens=2, top_logprobs=2)
    assert e.value.body["param"] == "top_logprobs"


def test_models_that_number_padding_decode_one_at_a_time(model_and_tokenizer):
    """llm-foundry's dail RoPE numbers a token by its column, padding included: its sequences cannot
    share a padded batch and still compute what they compute alone, so they take turns."""
    tok = model_and_tokenizer[1]
    torch.manual_seed(0)
    model = MPTForCausalLM(MPTConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=len(tok),
                                     attn_config={"alibi": False, "rope": True, "rope_impl": "dail"})).eval()
    batcher = Batcher(model, tok, max_batch_size=8)
    assert batcher.max_batch_size == 1 and "one at a time" in batcher.note
    expected = [generate(model, tok, [p], max_new_tokens=6)[0] for p in PROMPTS]
    answers = [queue.Queue() for _ in PROMPTS]
    batcher.submit([GenerationRequest(p, SamplingOptions(max_new_tokens=6), on_update=q.put)
                    for p, q in zip(PROMPTS, answers, strict=True)])
    texts = []
    for p, q in zip(PROMPTS, answers, strict=True):
        updates = [q.get(timeout=60)]
        while updates[-1].finish_reason is None:
            updates.append(q.get(timeout=60))
        texts.append(p + "".join(u.text for u in updates))
    assert texts == expected and batcher.largest_batch == 1


def test_echo_logprobs_are_the_models_own(client, model_and_tokenizer):
    """What lm-eval's local-completions sends for a log-likelihood (token ids, echo, logprobs=1,
    max_tokens=1): every prompt token's log-probability, checked against the model's logits."""
    model, tok = model_and_tokenizer
    ids = tok("Return the number of items")["input_ids"]
    answer = client.completions.create(model=NAME, prompt=[ids], max_tokens=1, temperature=0, logprobs=1, echo=True)
    lp = answer.choices[0].logprobs
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.tokens) == len(ids) + 1
    assert lp.token_logprobs[1:len(ids)] == pytest.approx([float(expected[i, t]) for i, t in enumerate(ids[1:])],
                                                          abs=1e-4)
    greedy = int(expected[-1].argmax())
    assert lp.tokens[-1] == tok.decode([greedy]) and lp.token_logprobs[-1] == pytest.approx(
        float(expected[-1, greedy]), abs=1e-4)
    for token, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:], strict=True):  # lm-eval's is_greedy reads these
        assert len(top) == 1 and max(top.values()) >= token - 1e-6
    assert answer.choices[0].text == tok.decode(ids) + lp.tokens[-1]
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_stop_strings_end_the_answer_before_them(client):
    full = client.completions.create(model=NAME, prompt="The file", max_tokens=24, temperature=0).choices[0].text
    stop = full[6:9]
    cut = full[:full.find(stop)]
    answer = client.completions.create(model=NAME, prompt="The file", max_tokens=24, temperature=0, stop=[stop, "@@"])
    assert (answer.choices[0].text, answer.choices[0].finish_reason) == (cut, "stop")
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=NAME, prompt="The file", max_tokens=24, temperature=0, stop=stop, stream=True))
    assert streamed == cut


def test_n_and_seed_sample_reproducibly(client, model_and_tokenizer):
    def sample(seed, n=3):
        answer = client.completions.create(model=NAME, prompt="A path", max_tokens=10, temperature=1.0, n=n, seed=seed)
        assert sorted(c.index for c in answer.choices) == list(range(n))
        return [c.text for c in sorted(answer.choices, key=lambda c: c.index)]
    first = sample(7)
    assert sample(7) == first and sample(8) != first and len(set(first)) > 1
    one = sample(7, n=1)[0]  # one sequence, its own generator seeded 7: what `generate --seed 7` samples
    assert "A path" + one == generate(*model_and_tokenizer, ["A path"], max_new_tokens=10, do_sample=True, seed=7)[0]


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == [NAME] and models[0].max_model_len == 1100


@pytest.mark.parametrize("kwargs, param", [
    (dict(temperature=-1), "temperature"),
    (dict(max_tokens=1001), "max_tokens"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(logprobs=6), "logprobs"),
    (dict(n=9), "n"),
    (dict(stop=[str(i) for i in range(17)]), "stop"),
    (dict(presence_penalty=0.5), "presence_penalty"),
    (dict(extra_body={"temprature": 0.5}), "temprature"),
    (dict(prompt="word " * 300, max_tokens=1000), "prompt"),
    (dict(prompt=[[1, 2, 10 ** 6]]), "prompt"),
    (dict(prompt=[]), "prompt"),
])
def test_bad_completion_requests_name_the_parameter(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**{"model": NAME, "prompt": "x", **kwargs})
    assert e.value.status_code == 400 and e.value.body["param"] == param, e.value.body
    if param == "temprature":
        assert "did you mean 'temperature'" in e.value.body["message"]


def test_bad_chat_requests_and_unknown_models(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=[{"role": "assistant", "content": "hi"}])
    assert e.value.body["param"] == "messages" and "out of order" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x")
    assert e.value.body["param"] == "model" and NAME in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:  # a prompt refused after it was queued is still a 400
        list(client.completions.create(model=NAME, prompt="word " * 300, max_tokens=1000, stream=True))
    assert e.value.body["param"] == "prompt"


def _health(server):
    return _batcher(server).status()


def _wait(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_a_short_request_overtakes_a_long_one_and_a_hang_up_frees_its_row(server, client, model_and_tokenizer):
    """Continuous batching: a short request sent while a long one decodes joins the batch and finishes
    first (answering as it would alone); the long one's client then hangs up, and its sequence leaves
    the batch at once instead of decoding its remaining tokens."""
    batcher = _batcher(server)
    alone = generate(*model_and_tokenizer, ["A path"], max_new_tokens=8)[0]  # (not while the batcher runs the model)
    dropped, served = batcher.dropped, batcher.served
    long_stream = client.completions.create(model=NAME, prompt="If", max_tokens=1000, temperature=0, stream=True)
    chunks = iter(long_stream)
    next(chunks)  # the long one is decoding
    steps_before = batcher.steps
    short = client.completions.create(model=NAME, prompt="A path", max_tokens=8, temperature=0)
    assert batcher.served == served + 1, "the long request finished before the short one"
    assert batcher.steps - steps_before >= 8 and batcher.largest_batch >= 2
    assert "A path" + short.choices[0].text == alone
    long_stream.response.close()  # the client hangs up mid-answer
    _wait(lambda: _health(server)["running"] == 0)
    assert batcher.dropped == dropped + 1 and batcher.steps - steps_before < 900


def test_a_client_hanging_up_before_a_whole_answer_frees_its_row(server):
    batcher = _batcher(server)
    dropped = batcher.dropped
    body = json.dumps({"model": NAME, "prompt": "If", "max_tokens": 1000, "temperature": 0}).encode()
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        _wait(lambda: batcher.status()["running"] == 1)
    _wait(lambda: batcher.status()["running"] == 0)
    assert batcher.dropped == dropped + 1


def test_an_api_key_guards_every_route(model_and_tokenizer):
    server, thread = _serve(model_and_tokenizer, api_key="sekret")
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        import urllib.error
        import urllib.request
        for path, body in (("/health", None), ("/v1/models", None), ("/v1/completions", b"{}"), ("/", b"{}")):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
                request = urllib.request.Request(base + path, body, {"Content-Type": "application/json", **headers})
                with pytest.raises(urllib.error.HTTPError) as e:
                    urllib.request.urlopen(request, timeout=30)
                assert e.value.code == 401 and e.value.headers["WWW-Authenticate"] == "Bearer"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=base + "/v1", api_key="sekret", max_retries=0)
        assert good.completions.create(model=NAME, prompt="If", max_tokens=2).usage.completion_tokens == 2
    finally:
        server.shutdown()
        server.server_close()


def test_lm_eval_local_completions_scores_what_the_model_computes(server, model_and_tokenizer, tiny_tokenizer_dir,
                                                                  tmp_path):
    """lm-evaluation-harness's `local-completions` against the server, on the repository's local task:
    every log-likelihood it records equals the one computed from the model's logits here."""
    model, tok = model_and_tokenizer
    base_url = f"http://127.0.0.1:{server.server_address[1]}/v1/completions"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "ds")}
    proc = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "lm_eval"), "--model", "local-completions", "--model_args",
         f"model={NAME},base_url={base_url},tokenizer={tiny_tokenizer_dir},num_concurrent=4,max_retries=1",
         "--tasks", "stdlib_choice", "--include_path", "yamls/eval/lm_eval", "--log_samples",
         "--output_path", str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"\|stdlib_choice\s*\|.*\|acc\s*\|", proc.stdout), proc.stdout[-2000:]
    samples = [json.loads(line) for path in glob.glob(str(tmp_path / "out" / "*" / "samples_stdlib_choice_*.jsonl"))
               for line in open(path, encoding="utf-8")]
    scored = [(a["arg_0"], a["arg_1"], float(r[0][0])) for s in samples
              for a, r in zip(s["arguments"].values(), s["resps"], strict=True)]
    assert len(scored) == 18
    for context, continuation, loglikelihood in scored:
        ids, start = tok(context + continuation)["input_ids"], len(tok(context)["input_ids"])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        expected = sum(float(logprobs[i - 1, ids[i]]) for i in range(start, len(ids)))
        assert loglikelihood == pytest.approx(expected, abs=1e-3), (context, continuation)


def _start_cli(model_dir, *flags, env=None):
    """`llmfoundry-lite serve` as its own process; (process, first stdout line, base url)."""
    proc = subprocess.Popen([sys.executable, "-m", "llmfoundry_lite.cli", "serve", model_dir, "--port", "0", "--quiet",
                             *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    line = proc.stdout.readline()
    port = re.search(r":(\d+) ", line)
    assert port, line + proc.stderr.read()
    return proc, line, f"http://127.0.0.1:{port.group(1)}"


def test_the_command_warns_when_exposed_without_a_key_and_reads_the_key_from_the_environment(model_and_tokenizer,
                                                                                           tmp_path):
    model, tok = model_and_tokenizer
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    exposed, line, _ = _start_cli(str(tmp_path / "model"), "--host", "0.0.0.0")
    exposed.terminate()
    assert "serving 'model' on http://0.0.0.0:" in line
    assert "without an API key" in exposed.communicate(timeout=30)[1]
    keyed, line, base = _start_cli(str(tmp_path / "model"), env={"LLMFOUNDRY_LITE_API_KEY": "from-env"})
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
        assert openai.OpenAI(base_url=base + "/v1", api_key="from-env").models.list().data[0].id == "model"
    finally:
        keyed.terminate()
    assert "without an API key" not in keyed.communicate(timeout=30)[1]
