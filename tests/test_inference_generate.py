"""Batched, left-padded generation, the sampling options and the `generate` command."""
import argparse
import importlib
from dataclasses import replace

import pytest
import torch

from llmfoundry_lite.cli import COMMANDS
from llmfoundry_lite.cli import main as cli
from llmfoundry_lite.errors import UserError
from llmfoundry_lite.export import write_hf_folder
from llmfoundry_lite.inference import generate
from llmfoundry_lite.inference.generate import SamplingOptions
from llmfoundry_lite.models import MPTConfig, MPTForCausalLM

pytestmark = pytest.mark.usefixtures("torch_one_thread")

PROMPTS = ["Return a new", "The", "If the path is a directory, then"]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    model = MPTForCausalLM(MPTConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=len(tokenizer)))
    return model.eval(), tokenizer


def _greedy_by_hand(model, tokenizer, prompt, n):
    """Full recompute each step, no cache, no padding: the independent truth."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            if nxt.item() == tokenizer.eos_token_id:
                break
    return prompt + tokenizer.decode(ids[0, len(tokenizer(prompt)["input_ids"]):], skip_special_tokens=True)


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    expected = [_greedy_by_hand(model, tokenizer, p, 8) for p in PROMPTS]
    for batch in (None, 2):
        out = generate(model, tokenizer, PROMPTS, max_new_tokens=8, max_batch_size=batch)
        assert list(out) == expected
        assert 0 < out.new_tokens <= 8 * len(PROMPTS) and out.tokens_per_s > 0


def test_sampling_is_reproducible_with_a_seed(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    kw = dict(max_new_tokens=10, do_sample=True, temperature=1.5, top_k=50, top_p=0.9, repetition_penalty=1.1)
    assert list(generate(model, tokenizer, PROMPTS, seed=3, **kw)) == list(generate(model, tokenizer, PROMPTS, seed=3, **kw))


def test_bad_inputs_are_user_errors(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(UserError, match="prompt 0: .* exceeds the model's max_seq_len 64"):
        generate(model, tokenizer, ["word " * 80], max_new_tokens=4)
    with pytest.raises(UserError, match="non-empty list"):
        generate(model, tokenizer, "a string", max_new_tokens=4)
    with pytest.raises(UserError, match="max_new_tokens: 0 out of range"):
        generate(model, tokenizer, ["x"], max_new_tokens=0)
    with pytest.raises(UserError, match=r"temperature: 0(\.0)? out of range.*top_p: 2(\.0)? out of range"):
        generate(model, tokenizer, ["x"], temperature=0, top_p=2, do_sample=True)


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
def test_every_sampling_option_is_a_flag_of_the_inference_commands(command, capsys):
    parser = argparse.ArgumentParser()
    importlib.import_module(COMMANDS[command][0]).add_arguments(parser)
    default = SamplingOptions(max_new_tokens=256 if command == "chat" else 64)
    assert SamplingOptions.from_args(parser.parse_args(["model"])) == default
    flags = ["--max_new_tokens", "9", "--temperature", "0.5", "--top_k", "5", "--top_p", "0.9",
             "--repetition_penalty", "1.2", "--do_sample", "--seed", "7"]
    assert SamplingOptions.from_args(parser.parse_args(["model", *flags])) == replace(
        default, max_new_tokens=9, temperature=0.5, top_k=5, top_p=0.9, repetition_penalty=1.2, do_sample=True, seed=7)
    # out-of-range values are refused before the model is opened
    assert cli([command, "no/such/model", "--top_p", "1.5"]) == 2
    assert "top_p: 1.5 out of range" in capsys.readouterr().err


def test_generate_command_prints_outputs_and_speed(model_and_tokenizer, tmp_path, capsys):
    model, tokenizer = model_and_tokenizer
    folder = tmp_path / "model"
    write_hf_folder(model.config, model.state_dict(), folder, tokenizer, log=lambda m: None)
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(PROMPTS[2])
    assert cli(["generate", str(folder), "--prompts", PROMPTS[0], f"file::{prompt_file}", "--max_new_tokens", "6",
                "--device", "cpu", "--max_batch_size", "1"]) == 0
    out = capsys.readouterr().out
    assert _greedy_by_hand(model, tokenizer, PROMPTS[0], 6) in out
    assert _greedy_by_hand(model, tokenizer, PROMPTS[2], 6) in out
    assert "tokens/s" in out
    assert cli(["generate", str(tmp_path / "missing"), "--prompts", "x"]) == 2
    assert cli(["generate", str(folder), "--prompts", "file::/nonexistent/p.txt"]) == 2
