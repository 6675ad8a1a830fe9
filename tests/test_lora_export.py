"""LoRA export and inference (issue 15): a LoRA run's Composer checkpoint (full .pt and sharded DCP)
converts to a merged native HF folder that stock transformers loads with the LoRA model's logits, or
to a PEFT adapter folder that peft applies to stock transformers' MptForCausalLM; `--adapter` of
generate and eval equals the merged folder; hf_checkpointer writes both kinds; bad adapters are clear
errors (exit 2)."""
import json
import os
import re

import pytest
import torch

from llmfoundry_lite.assembly.lora import is_peft
from llmfoundry_lite.cli import main
from llmfoundry_lite.export import load_composer_checkpoint, write_hf_folder
from llmfoundry_lite.models import MPTConfig, MPTForCausalLM

from train_utils import ROOT, copy_rows

pytestmark = pytest.mark.usefixtures("torch_one_thread")
TINY = dict(d_model=32, n_heads=2, n_layers=2, max_seq_len=64)


@pytest.fixture(scope="module")
def lora_run(tiny_tokenizer_dir, tmp_path_factory):
    """12 batches of yamls/finetune/mpt-tiny-cpu-lora.yaml from a tiny native HF folder, saving a
    Composer checkpoint and an hf_checkpointer folder (merged); the trainer for more callbacks."""
    from llmfoundry_lite import train
    from llmfoundry_lite.data.tokenizer import build_tokenizer
    tmp = tmp_path_factory.mktemp("lora_run")
    tokenizer = build_tokenizer(tiny_tokenizer_dir)
    torch.manual_seed(0)
    base = MPTForCausalLM(MPTConfig(**TINY, vocab_size=448))
    write_hf_folder(base.config, base.state_dict(), tmp / "base", tokenizer)  # a native folder, as quickstart's
    (tmp / "sft").mkdir()
    with open(tmp / "sft" / "train.jsonl", "w") as f:
        for i in range(64):
            f.write(json.dumps({"prompt": f"Repeat {i % 8} twice:", "response": f" {i % 8} {i % 8}"}) + "\n")
    trainer = train(os.path.join(ROOT, "yamls", "finetune", "mpt-tiny-cpu-lora.yaml"), [
        f"variables.model_name_or_path={tmp / 'base'}", f"variables.sft_data={tmp / 'sft'}", "max_seq_len=32",
        "max_duration=6ba", "scheduler.t_warmup=2ba", "console_log_interval=100ba", f"save_folder={tmp / 'ckpt'}",
        "save_interval=6ba", "model.peft_config.lora_dropout=0.0",
        f"callbacks.hf_checkpointer.save_folder={tmp / 'hf_ckpt'}", "callbacks.hf_checkpointer.save_interval=6ba"])
    trainer.close()
    model = trainer.state.model.model
    assert is_peft(model)
    assert all(torch.count_nonzero(p) > 0 for n, p in model.named_parameters() if "lora_B" in n)
    return {"tmp": tmp, "trainer": trainer, "base": str(tmp / "base"), "ckpt": str(tmp / "ckpt" / "latest-rank0.pt")}


def ids():
    return torch.as_tensor(copy_rows(3, seed=5), dtype=torch.long) + 20


def logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=ids()).logits


def sharded(run):
    """The run's checkpoint as a DCP folder (what FSDP2 runs write), saved in this process."""
    import torch.distributed.checkpoint as dcp
    folder = run["tmp"] / "sharded" / "ep0-ba6"
    if not folder.exists():
        full = torch.load(run["ckpt"], weights_only=False)
        state = {"model": full["state"]["model"], "integrations": full["state"]["integrations"]}
        dcp.save({"state": state}, checkpoint_id=str(folder), no_dist=True)
    return str(folder)


@pytest.mark.parametrize("kind", ["full", "sharded"])
def test_merged_export_loads_in_stock_transformers_with_the_lora_models_logits(lora_run, kind, tmp_path):
    from transformers import MptForCausalLM
    source = lora_run["ckpt"] if kind == "full" else sharded(lora_run)
    ours, _ = load_composer_checkpoint(source)
    assert is_peft(ours)
    expected = logits(ours)
    trained = logits(lora_run["trainer"].state.model.model)
    assert torch.equal(expected, trained)
    out = str(tmp_path / "merged")
    assert main(["convert", "--composer_path", source, "--hf_output_path", out]) == 0
    assert json.load(open(os.path.join(out, "config.json")))["model_type"] == "mpt"
    stock = MptForCausalLM.from_pretrained(out)  # no trust_remote_code
    torch.testing.assert_close(logits(stock), expected, atol=1e-5, rtol=0)
    base = logits(MptForCausalLM.from_pretrained(lora_run["base"]))
    assert (base - expected).abs().max() > 1e-3  # the adapters changed the model


@pytest.mark.parametrize("kind", ["full", "sharded"])
def test_adapter_only_export_applies_to_stock_transformers(lora_run, kind, tmp_path):
    from peft import PeftModel
    from transformers import MptForCausalLM
    source = lora_run["ckpt"] if kind == "full" else sharded(lora_run)
    out = str(tmp_path / "adapter")
    assert main(["convert", "--composer_path", source, "--hf_output_path", out, "--adapter_only"]) == 0
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out))
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    assert config["base_model_name_or_path"] == lora_run["base"]
    assert set(config["target_modules"]) == {"Wqkv", "out_proj", "up_proj", "down_proj"}
    stock = PeftModel.from_pretrained(MptForCausalLM.from_pretrained(lora_run["base"]), out)
    expected = logits(load_composer_checkpoint(lora_run["ckpt"])[0])
    torch.testing.assert_close(logits(stock), expected, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def exported(lora_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exported")
    for name, extra in (("merged", []), ("adapter", ["--adapter_only"])):
        assert main(["convert", "--composer_path", lora_run["ckpt"], "--hf_output_path", str(tmp / name), *extra]) == 0
    return {"merged": str(tmp / "merged"), "adapter": str(tmp / "adapter")}


def test_generate_with_adapter_equals_the_merged_folder(lora_run, exported, capsys):
    from llmfoundry_lite.inference import load_model_and_tokenizer
    with_adapter, _ = load_model_and_tokenizer(lora_run["base"], "cpu", adapter=exported["adapter"])
    merged_folder, _ = load_model_and_tokenizer(exported["merged"], "cpu")
    assert not is_peft(with_adapter)  # merged for inference
    a, b = with_adapter.state_dict(), merged_folder.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    outputs = []
    for model, extra in ((lora_run["base"], ["--adapter", exported["adapter"]]), (exported["merged"], [])):
        assert main(["generate", model, *extra, "--prompts", "Repeat 3 twice:", "--max_new_tokens", "8",
                     "--device", "cpu"]) == 0
        out = capsys.readouterr().out
        outputs.append([line for line in out.splitlines() if not re.search(r"in [\d.]+s:", line)])
    assert outputs[0] == outputs[1]


def test_eval_with_adapter_gives_the_merged_folders_scores(lora_run, exported, tmp_path):
    from llmfoundry_lite.eval.runner import evaluate
    task = tmp_path / "mc.jsonl"
    task.write_text("".join(json.dumps({"query": f"Repeat {i} twice:", "choices": [f" {i} {i}", " x", " 7 1"],
                                        "gold": 0}) + "\n" for i in range(6)))

    def cfg(model):
        return {"max_seq_len": 32, "device_eval_batch_size": 4, "device": "cpu", "progress_bar": False,
                "model_name": "m", "model": model, "icl_tasks": [
                    {"label": "mc", "dataset_uri": str(task), "icl_task_type": "multiple_choice", "num_fewshot": [0]}]}
    hf = {"name": "hf_causal_lm", "pretrained_model_name_or_path": lora_run["base"]}
    merged = evaluate(cfg({"name": "hf_causal_lm", "pretrained_model_name_or_path": exported["merged"]}))["m"]
    assert evaluate(cfg(hf), adapter=exported["adapter"])["m"] == merged
    assert evaluate(cfg({**hf, "pretrained_lora_id_or_path": exported["adapter"]}))["m"] == merged  # llm-foundry's key
    base = evaluate(cfg(hf))["m"]
    assert base != merged


def test_hf_checkpointer_writes_merged_and_adapter_folders(lora_run, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import MptForCausalLM

    from llmfoundry_lite.training.callbacks import HFCheckpointer
    # the live model (and so the run's checkpoint) keeps its base weights: merging works on copies
    base = load_file(os.path.join(lora_run["base"], "model.safetensors"))
    live = lora_run["trainer"].state.model.model.get_base_model().state_dict()
    live = {k.replace(".base_layer", ""): v for k, v in live.items() if "lora_" not in k}
    assert all(torch.equal(live[k], base[k]) for k in base)
    expected = logits(lora_run["trainer"].state.model.model)
    merged = lora_run["tmp"] / "hf_ckpt" / "ba6"
    torch.testing.assert_close(logits(MptForCausalLM.from_pretrained(merged)), expected, atol=1e-5, rtol=0)
    HFCheckpointer(str(tmp_path / "adapters"), "6ba", adapter_only=True).save(lora_run["trainer"].state)
    adapter = tmp_path / "adapters" / "ba6"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    stock = PeftModel.from_pretrained(MptForCausalLM.from_pretrained(lora_run["base"]), str(adapter))
    torch.testing.assert_close(logits(stock), expected, atol=1e-5, rtol=0)


def test_bad_adapters_are_clear_errors(lora_run, exported, tmp_path, capsys):
    other = tmp_path / "other"
    MPTForCausalLM(MPTConfig(d_model=64, n_heads=2, n_layers=2, max_seq_len=64, vocab_size=448)).save_pretrained(other)
    for model, adapter, message in ((str(other), exported["adapter"], "cannot apply the adapter"),
                                    (lora_run["base"], str(tmp_path), "adapter folder not found"),
                                    (lora_run["ckpt"], exported["adapter"], "already has LoRA adapters")):
        assert main(["generate", model, "--adapter", adapter, "--prompts", "x", "--device", "cpu",
                     "--tokenizer", lora_run["base"]]) == 2
        err = capsys.readouterr().err
        assert message in err and "--adapter" in err and "Traceback" not in err, err
    assert main(["convert", "--composer_path", os.path.join(exported["merged"], "model.safetensors"),
                 "--hf_output_path", str(tmp_path / "x"), "--adapter_only"]) == 2


def test_gguf_of_a_lora_run_holds_the_merged_weights(lora_run, exported, tmp_path):
    import gguf
    from safetensors.torch import load_file
    out = str(tmp_path / "merged.gguf")
    assert main(["convert", "--composer_path", lora_run["ckpt"], "--gguf_output_path", out,
                 "--output_precision", "fp32"]) == 0
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    merged = load_file(os.path.join(exported["merged"], "model.safetensors"))
    base = load_file(os.path.join(lora_run["base"], "model.safetensors"))
    for ours, theirs in (("blk.0.attn_qkv.weight", "transformer.blocks.0.attn.Wqkv.weight"),
                         ("blk.1.ffn_down.weight", "transformer.blocks.1.ffn.down_proj.weight")):
        t = tensors[ours]
        values = torch.from_numpy(t.data.reshape(tuple(reversed(t.shape.tolist()))).copy())
        assert torch.equal(values, merged[theirs]) and not torch.equal(values, base[theirs])
