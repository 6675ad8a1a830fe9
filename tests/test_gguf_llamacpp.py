"""A GGUF export checked by llama.cpp itself (llama-cpp-python, built from source: `make gguf-check`).

The model is the quickstart's (300 batches of FSDP2 training on two processes, a sharded checkpoint, a
byte-level BPE of 4096 tokens with a ChatML template), so its distribution is a trained one. Its
checkpoint is converted to f16 and q8_0 GGUF files by the CLI, and llama.cpp must:
- tokenize held-out text and edge cases exactly as our tokenizer does, and render the chat template
  (its built-in ChatML and llama-cpp-python's Jinja formatter) to our ChatML prompt;
- give our logits on held-out prompts within 0.01, and continue 24 prompts greedily token for token as
  our model does (f16);
- give a held-out perplexity within 0.5 % of ours in f16 and within 2 % in q8_0.
"""
import ctypes
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from llmfoundry_lite.cli import main as cli
from llmfoundry_lite.inference.loading import load_model_and_tokenizer

pytestmark = [pytest.mark.llamacpp, pytest.mark.usefixtures("torch_one_thread")]

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
SEQ = 128        # the quickstart's max_seq_len: llama.cpp's context here
NEW_TOKENS = 24
TIE = 0.02       # logits closer than this are a tie for greedy decoding (see _prompts)
TEXTS = ["Return the number of items in the list.", "  two  spaces\n\nand newlines\tand a tab",
         "café naïve 日本語 😀 — ünïcödé", "it's don't they're I'LL", "x = f(1) + 2 ** 3  # comment",
         "", " ", "\n\n\n", "123456789 3.14159 0xFF", "<|endoftext|> written as text is text"]


def _llama():
    import llama_cpp  # only this module needs it; `make gguf-check` installs it
    return llama_cpp


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The quickstart's trained model, its held-out text, and its checkpoint as f16 and q8_0 GGUF files."""
    out = tmp_path_factory.mktemp("quickstart")
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    subprocess.run([os.path.join(os.path.dirname(sys.executable), "llmfoundry-lite"), "quickstart", "--out_dir", str(out)],
                   check=True, env=env, cwd=REPO, capture_output=True, timeout=1500)
    save_folder = str(out / "checkpoints" / "mpt-tiny-cpu")
    files = {}
    for precision in ("fp16", "q8_0"):
        files[precision] = str(out / f"mpt-tiny-{precision}.gguf")
        assert cli(["convert", "--composer_path", save_folder, "--gguf_output_path", files[precision],
                    "--output_precision", precision]) == 0
    model, tok = load_model_and_tokenizer(save_folder, device="cpu", dtype="fp32")
    with open(out / "corpus" / "val.jsonl", encoding="utf-8") as f:
        held_out = [json.loads(line)["text"] for line in f]
    return dict(out=out, files=files, model=model, tok=tok, held_out=held_out)


def _open(path):
    return _llama().Llama(path, n_ctx=SEQ, n_batch=SEQ, logits_all=True, n_threads=2, seed=0, verbose=False)


@pytest.fixture(scope="module")
def f16(run):
    llm = _open(run["files"]["fp16"])
    yield llm
    llm.close()


def test_llama_cpp_tokenizes_and_renders_chat_as_we_do(run, f16):
    tok = run["tok"]
    texts = TEXTS + run["held_out"][:300]
    # special=True: special tokens written in the text are parsed, as create_completion and our tokenizer do
    differ = [t for t in texts if f16.tokenize(t.encode(), add_bos=True, special=True) != tok(t)["input_ids"]]
    assert differ == [], f"{len(differ)} of {len(texts)} texts tokenize differently, e.g. {differ[:3]}"
    for t in texts[:50]:  # and back
        assert f16.detokenize(tok(t)["input_ids"], special=True).decode("utf-8") == t

    llama_cpp = _llama()
    template = f16.metadata["tokenizer.chat_template"]
    for messages in ([{"role": "user", "content": "Return the number of items."}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye\nnow"}]):
        ours = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # llama.cpp's own renderer (its built-in ChatML, detected from the template) ...
        chat = (llama_cpp.llama_chat_message * len(messages))(
            *[llama_cpp.llama_chat_message(role=m["role"].encode(), content=m["content"].encode()) for m in messages])
        buf = ctypes.create_string_buffer(8192)
        n = llama_cpp.llama_chat_apply_template(template.encode(), chat, len(messages), True, buf, len(buf))
        assert 0 < n < len(buf) and buf.raw[:n].decode("utf-8") == ours
        # ... and llama-cpp-python's Jinja formatter, what create_chat_completion uses
        formatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter(template, eos_token=tok.eos_token,
                                                                    bos_token=tok.bos_token)
        assert formatter(messages=messages).prompt == ours
        assert f16.tokenize(ours.encode(), add_bos=True, special=True) == tok(ours)["input_ids"]


@torch.no_grad()
def _our_greedy(model, ids):
    """(our greedy continuation, the smallest gap between its chosen and next-best logit)."""
    ids, gap = list(ids), float("inf")
    for _ in range(NEW_TOKENS):
        top = model(torch.tensor([ids])).logits[0, -1].topk(2)
        ids.append(int(top.indices[0]))
        gap = min(gap, float(top.values[0] - top.values[1]))
    return ids[-NEW_TOKENS:], gap


def _prompts(run, count=24):
    """The first 6-12 tokens of distinct held-out docstrings whose greedy continuation never hangs on a
    near-tie. f16 weights move a logit by up to ~0.004 here, so where our top two logits are closer than
    TIE, either choice is the same model's; a wrong file moves logits by far more than that."""
    tok, prompts = run["tok"], []
    for text in run["held_out"]:
        ids = tok(text)["input_ids"]
        if len(ids) < 12 or ids[:6] in [p[:6] for p, _ in prompts]:
            continue
        ids = ids[:6 + len(prompts) % 7]
        ours, gap = _our_greedy(run["model"], ids)
        if gap >= TIE:
            prompts.append((ids, ours))
        if len(prompts) == count:
            return prompts
    raise AssertionError("not enough held-out text")


def _llama_greedy(llm, ids):
    llm.reset()
    llm.eval(list(ids))
    out = []
    for _ in range(NEW_TOKENS):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def test_logits_and_greedy_continuations_equal_ours_in_f16(run, f16):
    prompts = _prompts(run)
    with torch.no_grad():
        for ids, _ in prompts[:8]:
            f16.reset()
            f16.eval(ids)
            ours = run["model"](torch.tensor([ids])).logits[0].numpy()
            assert np.abs(np.asarray(f16.scores[:len(ids)]) - ours).max() < 0.01
    differ = [(run["tok"].decode(ids), run["tok"].decode(ours), run["tok"].decode(theirs))
              for ids, ours in prompts if (theirs := _llama_greedy(f16, ids)) != ours]
    assert differ == [], f"{len(differ)} of {len(prompts)} continuations differ: {differ[:3]}"
    # and through the high-level API a user calls, which stops at an end-of-generation token
    tok = run["tok"]
    ids, ours = prompts[0]
    completion = f16.create_completion(tok.decode(ids), max_tokens=NEW_TOKENS, temperature=0.0)["choices"][0]["text"]
    ends = [i for i, t in enumerate(ours) if t in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>"))]
    assert completion == tok.decode(ours[:ends[0] if ends else None])


def _windows(run, count=16):
    tok = run["tok"]
    ids = []
    for text in run["held_out"]:
        ids += tok(text)["input_ids"] + [tok.eos_token_id]
        if len(ids) >= count * SEQ:
            break
    return [ids[i * SEQ:(i + 1) * SEQ] for i in range(count)]


def _nll(logits: np.ndarray, ids) -> float:
    """Summed negative log-likelihood of ids[1:] under logits[:-1] (float64)."""
    logits = logits[:-1].astype(np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return float((logz - logits[np.arange(len(ids) - 1), ids[1:]]).sum())


def test_perplexity_is_ours_within_half_a_percent_in_f16_and_two_in_q8_0(run, f16):
    windows = _windows(run)
    n = sum(len(w) - 1 for w in windows)
    with torch.no_grad():
        ours = sum(_nll(run["model"](torch.tensor([w])).logits[0].numpy(), w) for w in windows)
    q8 = _open(run["files"]["q8_0"])
    ppl = {"ours": np.exp(ours / n)}
    for name, llm in (("f16", f16), ("q8_0", q8)):
        total = 0.0
        for w in windows:
            llm.reset()
            llm.eval(w)
            total += _nll(np.asarray(llm.scores[:len(w)]), w)
        ppl[name] = np.exp(total / n)
    q8.close()
    print(json.dumps({k: round(float(v), 4) for k, v in ppl.items()}))
    assert ppl["ours"] < 400  # trained: an untrained model (or a uniform guess) is at about 4096 and above
    assert abs(ppl["f16"] / ppl["ours"] - 1) < 0.005, ppl
    assert abs(ppl["q8_0"] / ppl["ours"] - 1) < 0.02, ppl


def test_the_readme_llama_cpp_block_runs_on_the_export(run):
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    blocks = [b for b in re.findall(r"^```bash\n(.*?)^```", readme, re.S | re.M)
              if b.startswith("# needs llama-cpp-python")]
    assert len(blocks) == 1
    script = blocks[0].replace("my_run/mpt-tiny-q8_0.gguf", run["files"]["q8_0"])
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], env=env, capture_output=True, text=True,
                          timeout=300, cwd=run["out"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(proc.stdout.strip()) > 0
