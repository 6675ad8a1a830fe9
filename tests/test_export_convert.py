"""Composer checkpoint -> HF folder: full and sharded checkpoints of a trained tiny run, fp32 and bf16.

The truth is stock `transformers`: the exported folder must load with `AutoModelForCausalLM` and no
`trust_remote_code`, give the logits of the trained weights, and generate the same greedy text
through `pipeline("text-generation")` as our own `generate`.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from llmfoundry_lite.cli import main as cli
from llmfoundry_lite.export import load_composer_checkpoint

pytestmark = pytest.mark.usefixtures("torch_one_thread")

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_tokenizer_dir):
    out = tmp_path_factory.mktemp("composer_ckpts")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, os.path.join(HERE, "export_checkpoints.py"), str(out), tiny_tokenizer_dir],
                   check=True, env=env, capture_output=True)
    return {"full": str(out / "full" / "latest-rank0.pt"), "sharded": str(out / "sharded" / "ep0-ba3"),
            "full-weights": str(out / "full-weights.pt"), "sharded-weights": str(out / "sharded-weights.pt")}


def _stock_keys():
    from transformers import MptConfig
    return set(MptConfig().to_dict()) | {"architectures", "dtype", "torch_dtype"}


@pytest.mark.parametrize("kind", ["full", "sharded"])
def test_export_loads_in_stock_transformers_with_equal_logits_and_generation(kind, checkpoints, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, MptForCausalLM, pipeline

    from llmfoundry_lite.inference import generate

    out = tmp_path / "hf"
    assert cli(["convert", "--composer_path", checkpoints[kind], "--hf_output_path", str(out),
                "--max_shard_size", "40KB"]) == 0
    assert "native" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mpt" and "auto_map" not in config
    assert set(config) <= _stock_keys(), set(config) - _stock_keys()
    assert (out / "model.safetensors.index.json").exists()  # 40KB forces several shards
    assert (out / "tokenizer.json").exists()
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == gen["pad_token_id"] == 0

    ours, tokenizer = load_composer_checkpoint(checkpoints[kind])
    trained = torch.load(checkpoints[f"{kind}-weights"])
    for name, tensor in ours.state_dict().items():  # the checkpoint holds the trained weights
        torch.testing.assert_close(tensor, trained[name], rtol=0, atol=0)

    stock = AutoModelForCausalLM.from_pretrained(out)  # no trust_remote_code
    assert type(stock) is MptForCausalLM
    ids = torch.randint(0, 400, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, ours(ids).logits, rtol=0, atol=1e-5)

    prompts = ["Return the", "The os module"]
    pipe = pipeline("text-generation", model=str(out), tokenizer=str(out), device="cpu")
    theirs = [r[0]["generated_text"] for r in pipe(prompts, max_new_tokens=10, do_sample=False)]
    assert list(generate(ours, tokenizer, prompts, max_new_tokens=10)) == theirs


def test_bf16_export_has_bf16_config_and_tensors(checkpoints, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf16"
    assert cli(["convert", "--composer_path", checkpoints["full"], "--hf_output_path", str(out),
                "--output_precision", "bf16"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    stock = AutoModelForCausalLM.from_pretrained(out, torch_dtype="auto")
    assert next(stock.parameters()).dtype == torch.bfloat16
    ours, _ = load_composer_checkpoint(checkpoints["full"])
    ids = torch.randint(0, 400, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits.float(), ours.to(torch.bfloat16)(ids).logits.float(),
                                   rtol=0, atol=0.05)


def test_convert_errors_are_user_errors(tmp_path, capsys):
    assert cli(["convert", "--composer_path", str(tmp_path / "nope.pt"), "--hf_output_path", str(tmp_path)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert cli(["convert", "--composer_path", str(bad), "--hf_output_path", str(tmp_path / "o")]) == 2
    assert "is not a Composer checkpoint" in capsys.readouterr().err
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    assert cli(["convert", "--composer_path", str(tmp_path / "plain.pt"), "--hf_output_path", str(tmp_path / "o")]) == 2
    assert "not a Composer checkpoint" in capsys.readouterr().err
