"""Composer checkpoints that llm-foundry's own training wrote (tests/fixtures/llmfoundry_run, made by
tests/make_llmfoundry_checkpoints.py): they convert into folders stock `transformers` loads with
llm-foundry's logits, and training continues from them here as it would in llm-foundry. And a folder
in MosaicML's hub layout finetunes with llm-foundry's `hf_causal_lm` section."""
import os
import shutil

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoTokenizer, MptForCausalLM

from train_utils import launch, mosaicml_hub_folder, read_losses

HERE = os.path.dirname(os.path.abspath(__file__))
RUN = os.path.join(HERE, "fixtures", "llmfoundry_run")
FULL = os.path.join(RUN, "full", "ep0-ba2-rank0.pt")
SHARDED = os.path.join(RUN, "sharded", "ep0-ba2")
EXPECTED = load_file(os.path.join(RUN, "expected.safetensors"))
IDS = EXPECTED["input_ids"]

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits.float()


def convert(source: str, out) -> str:
    from llmfoundry_lite.cli import main
    assert main(["convert", "--composer_path", source, "--hf_output_path", str(out)]) in (None, 0)
    return str(out)


@pytest.mark.parametrize("kind,source", [("full", FULL), ("sharded", SHARDED)])
def test_llmfoundry_checkpoint_converts_to_a_stock_transformers_folder(kind, source, tmp_path):
    folder = convert(source, tmp_path / kind)
    assert not os.path.exists(os.path.join(folder, "modeling_mpt.py"))  # native: no custom code needed
    stock = MptForCausalLM.from_pretrained(folder)
    torch.testing.assert_close(logits(stock), EXPECTED[kind], rtol=0, atol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(folder)  # the tokenizer llm-foundry stored in the checkpoint
    assert tokenizer("w3 w7 w61")["input_ids"] == [5, 9, 63]


def test_converted_checkpoint_generates_as_stock_transformers_does(tmp_path, capsys):
    from llmfoundry_lite.cli import main
    folder = convert(FULL, tmp_path / "hf")
    main(["generate", folder, "--prompts", "w3 w7 w61", "--max_new_tokens", "6"])  # greedy by default
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("w3 w7 w61", return_tensors="pt")["input_ids"]
    stock = MptForCausalLM.from_pretrained(folder).eval()
    expected = stock.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert tokenizer.decode(expected[0, ids.shape[1]:]) in capsys.readouterr().out


def test_a_save_folder_of_llmfoundry_converts_through_its_latest_link(tmp_path):
    """llm-foundry names the latest sharded checkpoint `latest-sharded-rank0` (a full one `latest-rank0.pt`)."""
    save_folder = tmp_path / "run"
    shutil.copytree(os.path.dirname(SHARDED), save_folder)
    os.symlink("ep0-ba2", save_folder / "latest-sharded-rank0")
    folder = convert(str(save_folder), tmp_path / "hf")
    torch.testing.assert_close(logits(MptForCausalLM.from_pretrained(folder)), EXPECTED["sharded"], rtol=0, atol=1e-5)


def _run_copy(tmp_path) -> str:
    """The run's YAML, data and tokenizer in a folder of their own (streaming writes beside the data)."""
    root = str(tmp_path / "run")
    shutil.copytree(RUN, root, ignore=shutil.ignore_patterns("full", "sharded"))
    return root


@pytest.mark.parametrize("weights_only", [False, True])
def test_training_continues_from_an_llmfoundry_checkpoint(weights_only, tmp_path, monkeypatch):
    """The YAML llm-foundry trained with runs here unchanged. Full resume: 2 more batches land where
    llm-foundry's straight 4-batch run did. Weights only: 2 batches with a fresh optimizer and schedule
    land where llm-foundry's own `load_weights_only` run did."""
    from llmfoundry_lite import train
    monkeypatch.chdir(_run_copy(tmp_path))
    trainer = train("train.yaml", [f"load_path={FULL}", f"load_weights_only={str(weights_only).lower()}",
                                   f"max_duration={'2ba' if weights_only else '4ba'}"])
    trainer.close()
    assert trainer.state.timestamp.batch.value == (2 if weights_only else 4)
    expected = EXPECTED["weights_only2" if weights_only else "straight4"]
    torch.testing.assert_close(logits(trainer.state.model.model), expected, rtol=0, atol=1e-5)


@pytest.mark.multiprocess
def test_two_ranks_resume_an_llmfoundry_sharded_checkpoint(tmp_path):
    """FSDP2 on 2 CPU ranks resumes llm-foundry's DCP folder and lands where its straight run did."""
    root = _run_copy(tmp_path)
    out = str(tmp_path / "out")
    launch([os.path.join(HERE, "train_driver.py"), out, os.path.join(root, "train.yaml"),
            f"variables.data_local={root}/data", f"tokenizer.name={root}/tokenizer", f"load_path={SHARDED}",
            "fsdp_config.state_dict_type=sharded", "max_duration=4ba"], str(tmp_path / "logs"))
    from llmfoundry_lite.export.composer_checkpoint import open_composer_checkpoint
    from llmfoundry_lite.models import MPTConfig, MPTForCausalLM
    config = open_composer_checkpoint(FULL)[0]
    model = MPTForCausalLM(MPTConfig(**config.to_dict()))
    model.load_state_dict(torch.load(os.path.join(out, "weights.pt")), strict=False)
    model.tie_weights()
    torch.testing.assert_close(logits(model), EXPECTED["straight4"], rtol=0, atol=1e-5)


def test_a_hub_layout_mpt_finetunes_with_a_raised_max_seq_len(tmp_path, monkeypatch):
    """mosaicml/mpt-7b's layout (triton attn_impl, sharded .bin weights), trained 16 tokens long from a
    config that says 8, as llm-foundry's finetuning YAMLs raise it with `config_overrides`: the first
    loss is stock transformers' loss on the first batch at that length."""
    from llmfoundry_lite import train
    root = _run_copy(tmp_path)
    hub = os.path.join(root, "mpt-7b")
    mosaicml_hub_folder(hub, max_seq_len=8, vocab_size=64)
    monkeypatch.chdir(root)
    with open("train.yaml") as f:
        cfg = yaml.safe_load(f)
    cfg["model"] = {"name": "hf_causal_lm", "pretrained_model_name_or_path": hub,
                    "config_overrides": {"max_seq_len": "${variables.max_seq_len}"}}
    metrics = os.path.join(root, "metrics.jsonl")
    trainer = train(cfg, ["max_duration=1ba", f"loggers.jsonl.path={metrics}"])
    trainer.close()
    from streaming import StreamingDataset
    first = torch.as_tensor(np.stack([StreamingDataset(local="data/train", shuffle=False, batch_size=4)[i]["tokens"]
                                      for i in range(4)]), dtype=torch.long)
    stock = MptForCausalLM.from_pretrained(hub, max_seq_len=16)
    with torch.no_grad():
        expected = stock(input_ids=first, labels=first).loss.item()
    assert read_losses(metrics)[0][1] == pytest.approx(expected, abs=1e-5)


def test_a_checkpoint_that_cannot_resume_this_run_is_refused_up_front(tmp_path, monkeypatch, capsys):
    """Another model's weights, or a full resume with another optimizer (Composer would start it afresh
    silently): exit 2 naming the problem and the fix, before anything is built."""
    from llmfoundry_lite.cli import main
    monkeypatch.chdir(_run_copy(tmp_path))
    assert main(["train", "train.yaml", f"load_path={FULL}", "model.d_model=32"]) == 2
    err = capsys.readouterr().err
    assert "the weights do not match the model config (size mismatch" in err and "Traceback" not in err, err
    assert main(["train", "train.yaml", f"load_path={SHARDED}", "optimizer.name=adamw"]) == 2
    err = capsys.readouterr().err
    assert "holds the state of optimizer ['DecoupledAdamW'], this run uses AdamW" in err, err
    assert "load_weights_only: true" in err
