"""LoRA (peft) in one process: a fresh adapter is a no-op, only adapters train (gradients and optimizer
state for them alone), resume is bit-exact, a saved adapter continues, the tiny CPU LoRA YAML runs,
and bad `peft_config` values are config errors with their key paths."""
import json
import os

import pytest
import torch

from llmfoundry_lite import registry
from llmfoundry_lite.assembly.lora import apply_lora, is_peft
from llmfoundry_lite.config import Named, load_config, parse
from llmfoundry_lite.errors import ConfigError
from llmfoundry_lite.models import MPTConfig, MPTForCausalLM
from llmfoundry_lite.training.schema import check_train_config

from train_utils import (
    ROOT,
    TINY_YAML,
    copy_rows,
    fresh_copy,
    read_losses,
    run,
    stand_in_folders,
    tiny_overrides,
    write_copy_task,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")
TINY = dict(d_model=32, n_heads=2, n_layers=2, max_seq_len=32, vocab_size=96)
LORA = {"model.peft_config.r": 4, "model.peft_config.lora_alpha": 8}


class Tokenizer:  # a model section only asks the tokenizer for its size
    def __len__(self):
        return 90


def build(section):
    return parse(Named[registry.models], section, "model").build(Tokenizer())


@pytest.fixture(scope="module")
def copy_data(tmp_path_factory):
    return write_copy_task(str(tmp_path_factory.mktemp("copy_task")))


@pytest.mark.parametrize("fused_qkv", [True, False])
def test_fresh_adapter_gives_the_base_models_logits(fused_qkv):
    torch.manual_seed(0)
    base = MPTForCausalLM(MPTConfig(**TINY, attn_config={"fused_qkv": fused_qkv})).eval()
    ids = torch.as_tensor(copy_rows(4, seed=3), dtype=torch.long)
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    lora = apply_lora(base, {"r": 4, "lora_alpha": 8}).eval()
    targets = {n.rsplit(".", 1)[-1] for n, m in lora.named_modules() if hasattr(m, "lora_A")}
    assert targets == ({"Wqkv"} if fused_qkv else {"Wq", "Wk", "Wv"}) | {"out_proj", "up_proj", "down_proj"}
    with torch.no_grad():
        assert torch.equal(lora(input_ids=ids).logits, expected)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_only_adapters_train_and_hold_optimizer_state(copy_data, tiny_tokenizer_dir, tmp_path, caplog):
    from composer.utils import reproducibility

    from llmfoundry_lite.opening import open_model
    overrides = tiny_overrides(fresh_copy(copy_data, tmp_path, "data"), tiny_tokenizer_dir, max_duration="4ba",
                               python_log_level="info", **LORA)
    tc = check_train_config(load_config(TINY_YAML, overrides))
    reproducibility.seed_all(tc.seed)  # as train() does before building the model
    before = open_model(tc.model, tc.tokenizer.build())[0].state_dict()
    with caplog.at_level("INFO", logger="llmfoundry_lite"):
        trainer = run(*overrides)
    assert any("trainable parameters:" in r.getMessage() for r in caplog.records)
    model = trainer.state.model.model
    assert is_peft(model)  # also as FSDP2 re-classed it (one process runs FSDP2 over a world of one)
    after = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    assert after.keys() == before.keys()
    for name in after:
        if "lora_" in name:
            assert not torch.equal(after[name], before[name]), name   # A and B both moved (B from zero)
        else:
            assert torch.equal(after[name], before[name]), name       # base weights bit-identical
    optimizer = trainer.state.optimizers[0]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == trainable
    assert {id(p) for p in optimizer.state} == trainable
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_autoresume_is_bit_exact(copy_data, tiny_tokenizer_dir, tmp_path):
    def overrides(name, duration):
        return tiny_overrides(fresh_copy(copy_data, tmp_path, f"{name}-{duration}"), tiny_tokenizer_dir, **{
            "max_duration": duration, "run_name": name, "save_folder": str(tmp_path / name / "ckpt"),
            "save_interval": "3ba", "loggers.jsonl.path": str(tmp_path / name / "m.jsonl"),
            "fsdp_config": "null", **LORA})  # a whole-model `.pt`, looked into below

    straight = run(*overrides("straight", "6ba"))
    run(*overrides("resumed", "3ba"))
    resumed = run(*overrides("resumed", "6ba"))  # same command, longer: autoresume picks up at 3ba
    assert resumed.state.timestamp.batch.value == 6
    a, b = straight.state.model.model.state_dict(), resumed.state.model.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_losses(str(tmp_path / "straight" / "m.jsonl")) == read_losses(str(tmp_path / "resumed" / "m.jsonl"))
    # the checkpoint holds the base weights too (resume needs nothing else), and Adam state for adapters only
    ckpt = torch.load(tmp_path / "resumed" / "ckpt" / "latest-rank0.pt", weights_only=False)
    names = set(ckpt["state"]["model"])
    assert "model.base_model.model.transformer.blocks.0.attn.Wqkv.base_layer.weight" in names
    adam = ckpt["state"]["optimizers"]["DecoupledAdamW"]["state"]
    assert adam and all("lora_" in name for name in adam)


def test_pretrained_lora_id_or_path_continues_a_saved_adapter(tmp_path):
    torch.manual_seed(0)
    folder = str(tmp_path / "hf")
    MPTForCausalLM(MPTConfig(**TINY)).save_pretrained(folder)
    section = {"name": "hf_causal_lm", "pretrained_model_name_or_path": folder}
    trained = build({**section, "peft_config": {"r": 4, "target_modules": ["Wqkv", "down_proj"]}})
    with torch.no_grad():  # a trained adapter: B no longer zero
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.normal_()
    trained.save_pretrained(str(tmp_path / "adapter"))  # peft's adapter folder
    assert os.path.isfile(tmp_path / "adapter" / "adapter_config.json")
    again = build({**section, "pretrained_lora_id_or_path": str(tmp_path / "adapter")})
    ids = torch.as_tensor(copy_rows(4, seed=3), dtype=torch.long)
    with torch.no_grad():
        a, b = trained.eval()(input_ids=ids).logits, again.eval()(input_ids=ids).logits
        base = build(section).eval()(input_ids=ids).logits
    assert torch.equal(a, b) and not torch.equal(a, base)
    assert {n for n, p in again.named_parameters() if p.requires_grad} == \
        {n for n, p in trained.named_parameters() if p.requires_grad}


def test_meta_init_makes_adapters_that_start_as_no_ops():
    from llmfoundry_lite.assembly.sharding import materialize_meta
    model = build({"name": "mpt_causal_lm", **TINY, "init_device": "meta", "peft_config": {"r": 4}})
    materialize_meta(model)
    for name, p in model.named_parameters():
        assert not p.is_meta, name
        if "lora_B" in name:
            assert torch.count_nonzero(p) == 0, name
        elif "lora_A" in name:
            assert p.abs().sum() > 0 and p.abs().max() <= 1 / 32 ** 0.5 + 1e-6, name  # kaiming_uniform(a=sqrt 5)


def test_bad_peft_configs_are_config_errors_with_key_paths(tmp_path):
    data = stand_in_folders(str(tmp_path), splits=["train"])

    def problems(model_keys, name="mpt_causal_lm"):
        model = {"name": name, **model_keys} if name == "hf_causal_lm" else {"name": name, **TINY, **model_keys}
        cfg = {"model": model, "tokenizer": {"name": "t"}, "max_duration": "4ba", "max_seq_len": 16,
               "train_loader": {"name": "text", "dataset": {"local": data, "split": "train", "max_seq_len": 16}},
               "global_train_batch_size": 4}
        with pytest.raises(ConfigError) as e:
            check_train_config(cfg)
        return "\n".join(e.value.problems)

    found = problems({"peft_config": {"peft_type": "PREFIX_TUNING", "r": 0, "lora_dropout": 1.0, "rank": 3}})
    for fragment in ("model.peft_config.peft_type: only LORA", "model.peft_config.r: must be positive",
                     "model.peft_config.lora_dropout: a dropout probability in [0, 1)",
                     "model.peft_config.rank: unknown key"):
        assert fragment in found, found
    found = problems({"peft_config": {"target_modules": ["Wq", "norm_1", "up_prj"], "modules_to_save": ["head"]}})
    assert "model.peft_config.target_modules[0]: no module of this model is named 'Wq'; LoRA can target" in found
    assert "model.peft_config.target_modules[1]: 'norm_1' is not a Linear or Embedding layer" in found
    assert "model.peft_config.target_modules[2]: no module" in found
    assert "model.peft_config.modules_to_save[0]: no module of this model is named 'head'" in found
    assert "model.peft_config: peft refuses" in problems({"peft_config": {"layers_pattern": "blocks"}})
    assert "model.peft_config.target_modules: the regular expression" in problems(
        {"peft_config": {"target_modules": r".*\.Wq"}})
    found = problems({"init_device": "meta", "peft_config": {"use_dora": True},
                      "pretrained_lora_id_or_path": str(tmp_path / "none"), "should_save_peft_only": True})
    assert "model.peft_config: use_dora, modules_to_save" in found
    assert "model.pretrained_lora_id_or_path: adapter folder not found" in found
    assert "model.should_save_peft_only: unknown key: not needed" in found
    # hf_causal_lm: the target modules are checked against the folder's config with its overrides
    torch.manual_seed(0)
    MPTForCausalLM(MPTConfig(**TINY)).save_pretrained(str(tmp_path / "hf"))
    found = problems({"pretrained_model_name_or_path": str(tmp_path / "hf"),
                      "config_overrides": {"attn_config": {"fused_qkv": False}},
                      "peft_config": {"target_modules": ["Wqkv"]}}, name="hf_causal_lm")
    assert "model.peft_config.target_modules[0]: no module of this model is named 'Wqkv'" in found


def finetune_inputs(tokenizer_dir, tmp_path, rows) -> tuple:
    """(HF base folder with the tokenizer, data folder with train.jsonl of `rows`) for the finetune YAMLs."""
    from llmfoundry_lite.data.tokenizer import build_tokenizer
    torch.manual_seed(0)
    MPTForCausalLM(MPTConfig(**{**TINY, "max_seq_len": 64, "vocab_size": 448})).save_pretrained(tmp_path / "hf")
    build_tokenizer(tokenizer_dir).save_pretrained(tmp_path / "hf")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "hf", tmp_path / "data"


def test_tiny_cpu_lora_yaml_finetunes(tiny_tokenizer_dir, tmp_path):
    """yamls/finetune/mpt-tiny-cpu-lora.yaml from an HF folder on prompt/response pairs: the loss falls."""
    from llmfoundry_lite import train
    hf, data = finetune_inputs(tiny_tokenizer_dir, tmp_path, [
        {"prompt": f"Repeat {i % 8} twice:", "response": f" {i % 8} {i % 8}"} for i in range(64)])
    yaml = os.path.join(ROOT, "yamls", "finetune", "mpt-tiny-cpu-lora.yaml")
    jsonl = str(tmp_path / "m.jsonl")
    trainer = train(yaml, [f"variables.model_name_or_path={hf}", f"variables.sft_data={data}",
                           "max_seq_len=32", "max_duration=12ba", "save_folder=null", "scheduler.t_warmup=2ba",
                           "console_log_interval=100ba", f"loggers.jsonl.path={jsonl}"])
    trainer.close()
    assert is_peft(trainer.state.model.model)
    losses = [loss for _, loss in read_losses(jsonl)]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_chat_data_packing_and_loss_masks_are_unchanged_by_lora(tiny_tokenizer_dir, tmp_path):
    """Multi-turn ChatML data, packed, with every assistant turn as a target: the first step of a LoRA run
    (its adapters start as no-ops) has exactly the loss of the same full finetuning step, so the batches
    and loss masks LoRA trains on are full finetuning's."""
    from llmfoundry_lite import train
    hf, data = finetune_inputs(tiny_tokenizer_dir, tmp_path, [
        {"messages": [{"role": "user", "content": f"count to {i % 5}"},
                      {"role": "assistant", "content": " ".join(map(str, range(i % 5)))},
                      {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"}]}
        for i in range(32)])
    common = [f"variables.model_name_or_path={hf}", f"variables.sft_data={data}",
              "max_seq_len=64", "max_duration=1ba", "save_folder=null", "console_log_interval=100ba",
              "train_loader.dataset.packing_ratio=3.0", "train_loader.dataset.target_responses=all"]
    first = {}
    for kind in ("sft", "lora"):
        jsonl = str(tmp_path / f"{kind}.jsonl")
        run_yaml = os.path.join(ROOT, "yamls", "finetune", f"mpt-tiny-cpu-{kind}.yaml")
        trainer = train(run_yaml, [*common, f"loggers.jsonl.path={jsonl}"])
        trainer.close()
        first[kind] = read_losses(jsonl)[0][1]
    assert first["lora"] == pytest.approx(first["sft"], abs=1e-6), first
