"""llm-foundry 0.22's MPT training YAMLs (tests/fixtures/llmfoundry_yamls/: its scripts/train/yamls
pretrain/mpt-*.yaml and finetune/mpt-*.yaml with comments stripped and paths made variables) pass
the config check at the world size each was written for, with llm-foundry's meaning; its CPU one
trains here as it is."""
import os

import pytest
import torch

from llmfoundry_lite.config import load_config
from llmfoundry_lite.errors import ConfigError
from llmfoundry_lite.training.schema import check_train_config

from train_utils import ROOT, stand_in_folders, write_copy_task

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "llmfoundry_yamls")
# file -> the number of GPUs it was written for (llm-foundry's README: 8 per node)
ACCEPTED = {"mpt-125m.yaml": 8, "mpt-7b.yaml": 8, "mpt-small-cpu.yaml": 1, "mpt-7b_dolly_sft.yaml": 8}


@pytest.fixture(scope="module")
def paths(tmp_path_factory, tiny_tokenizer_dir):
    root = stand_in_folders(str(tmp_path_factory.mktemp("lf")), splits=["c4/train", "c4/val"], folders=["model"])
    with open(os.path.join(root, "sft.jsonl"), "w") as f:
        f.write('{"prompt": "a", "response": "b"}\n')
    return {"data_local": os.path.join(root, "c4"), "tokenizer_name": tiny_tokenizer_dir,
            "model_name_or_path": os.path.join(root, "model"), "sft_data": os.path.join(root, "sft.jsonl")}


def load(name, paths, *overrides):
    path = os.path.join(FIXTURES, name)
    variables = yaml_variables(path)
    return load_config(path, [f"variables.{k}={v}" for k, v in paths.items() if k in variables] + list(overrides))


def yaml_variables(path):
    import yaml
    with open(path) as f:
        return yaml.safe_load(f)["variables"]


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_llmfoundry_yaml_passes_the_check_with_its_meaning(name, paths):
    cfg = check_train_config(load(name, paths), world_size=ACCEPTED[name])
    assert cfg.seed == 17 and cfg.optimizer.name == "decoupled_adamw"
    assert cfg.optimizer.kwargs["betas"][0] == 0.9 and cfg.algorithms["gradient_clipping"].kwargs == {
        "clipping_type": "norm", "clipping_threshold": 1.0}
    assert set(cfg.callbacks) >= {"speed_monitor", "lr_monitor", "runtime_estimator"}
    assert cfg.fsdp_config.sharding_strategy == "FULL_SHARD" and cfg.fsdp_config.mixed_precision == "PURE"
    assert cfg.console_log_interval in ("1ba", "20ba") and cfg.log_to_console and not cfg.progress_bar
    if name.startswith("mpt-7b_dolly"):  # hf_causal_lm with config_overrides; 48 / 8 ranks = 6 < microbatch 8
        assert cfg.model.name == "hf_causal_lm" and cfg.model.config.pretrained is True
        assert cfg.model.config.config_overrides == {"max_seq_len": 2048, "attn_config": {
            "attn_impl": "flash", "attn_uses_sequence_id": False}}
        assert cfg.device_train_microbatch_size == 8 and cfg.eval_first is True
        assert cfg.scheduler.name == "linear_decay_with_warmup"
    else:
        assert cfg.model.name == "mpt_causal_lm" and cfg.scheduler.name == "cosine_with_warmup"
        assert cfg.scheduler.kwargs == {"t_warmup": "100ba", "alpha_f": 0.1}
        assert cfg.train_loader.kwargs["dataset"]["local"] == paths["data_local"]


def test_yaml_llmfoundry_refuses_is_refused_too(paths):
    # llm-foundry 0.22's own finetune/mpt-30b-instruct.yaml has a top-level `icl_max_seq_len`, which its
    # TrainConfig refuses ("Unused parameters ['icl_max_seq_len'] found in cfg"); so do we
    with pytest.raises(ConfigError) as e:
        check_train_config(load("mpt-30b-instruct.yaml", paths), world_size=8)
    assert "icl_max_seq_len: unknown key" in str(e.value)


def test_microbatch_larger_than_the_device_batch_is_one_microbatch(paths, tmp_path):
    """llm-foundry's mpt-small-cpu.yaml as it is (paths and length aside) trains here; its microbatch
    of 16 with 4 rows per step trains exactly as a microbatch of 4 does, as in Composer."""
    from llmfoundry_lite import train
    data = write_copy_task(str(tmp_path / "data"), n_train=64, n_val=8)
    common = ["max_seq_len=17", "max_duration=2ba", "global_train_batch_size=4", "save_folder=null",
              "scheduler.t_warmup=0ba",  # Composer's step 0 and 1 both run at the lr of batch 0, 0 in a warmup
              "callbacks.runtime_estimator=false", "train_loader.num_workers=0", "eval_loader.num_workers=0",
              "python_log_level=warning"]
    paths = {**paths, "data_local": data}
    weights = []
    for extra in (["device_train_microbatch_size=16"], ["device_train_microbatch_size=4"], ["optimizer.lr=0"]):
        trainer = train(load("mpt-small-cpu.yaml", paths, *common, *extra))
        weights.append({k: v.clone() for k, v in trainer.state.model.model.state_dict().items()})
        trainer.close()
    large, exact, untrained = weights
    assert all(torch.equal(large[k], exact[k]) for k in large)
    assert not torch.equal(large["transformer.blocks.0.attn.Wqkv.weight"], untrained["transformer.blocks.0.attn.Wqkv.weight"])


# llm-foundry's scripts/eval/yamls shapes: mpt_eval.yaml (an MPT section and its Composer checkpoint) and
# hf_eval.yaml (an HF folder), each with init_device mixed, fsdp_config, and the tasks and gauntlet in
# files shaped like its tasks_v0.3.yaml and eval_gauntlet_v0.3.yaml
EVAL_COMMON = """
variables:
  max_seq_len: 16
precision: fp32
max_seq_len: ${variables.max_seq_len}
device_eval_batch_size: 4
fsdp_config:
  sharding_strategy: FULL_SHARD
  mixed_precision: FULL
  forward_prefetch: True
  limit_all_gathers: True
icl_tasks: "tasks.yaml"
eval_gauntlet: "eval_gauntlet.yaml"
"""
MPT_EVAL = """
seed: 1
models:
-
  model_name: mpt_test
  tokenizer:
    name: {run}/tokenizer
    kwargs:
      model_max_length: ${{variables.max_seq_len}}
  model:
    name: mpt_causal_lm
    init_device: mixed
    d_model: 16
    n_heads: 2
    n_layers: 2
    expansion_ratio: 4
    no_bias: true
    max_seq_len: ${{variables.max_seq_len}}
    vocab_size: 64
    attn_config:
      attn_impl: torch
      alibi: true
  load_path: {run}/full/ep0-ba2-rank0.pt
"""
HF_EVAL = """
models:
-
  model_name: ${{variables.model_name_or_path}}
  model:
    name: hf_causal_lm
    pretrained_model_name_or_path: ${{variables.model_name_or_path}}
    init_device: mixed
    pretrained: true
  tokenizer:
    name: ${{variables.model_name_or_path}}
    kwargs:
      model_max_length: ${{variables.max_seq_len}}
"""
TASKS = """
icl_tasks:
-
  label: jeopardy
  dataset_uri: jeopardy.jsonl
  num_fewshot: [0, 1]
  icl_task_type: language_modeling
  continuation_delimiter: " w2 "
  has_categories: true
-
  label: copa
  dataset_uri: copa.jsonl
  num_fewshot: [0]
  icl_task_type: multiple_choice
  continuation_delimiter: " "
"""
GAUNTLET = """
eval_gauntlet:
  weighting: EQUAL
  subtract_random_baseline: true
  rescale_accuracy: true
  averages:
    core_average:
    - world_knowledge
    - commonsense_reasoning
  categories:
  - name: world_knowledge
    benchmarks:
    - name: jeopardy
      num_fewshot: 0
      random_baseline: 0
  - name: commonsense_reasoning
    benchmarks:
    - name: copa
      num_fewshot: 0
      random_baseline: 0.5
"""


def test_llmfoundry_eval_yamls_evaluate_its_checkpoint_and_the_converted_folder_alike(tmp_path, monkeypatch):
    """mpt_eval.yaml's shape evaluates llm-foundry's own checkpoint, hf_eval.yaml's shape the folder
    `convert` made of it. The tasks are built from stock transformers' greedy choices on that folder,
    so each score is known in advance: both give them, and the gauntlet llm-foundry computes from them."""
    import json
    import random

    from transformers import AutoTokenizer, MptForCausalLM

    from llmfoundry_lite.cli import main
    from llmfoundry_lite.eval.runner import evaluate

    run = os.path.join(ROOT, "tests", "fixtures", "llmfoundry_run")
    folder = str(tmp_path / "hf")
    main(["convert", "--composer_path", os.path.join(run, "full", "ep0-ba2-rank0.pt"), "--hf_output_path", folder])
    stock, tok = MptForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)

    def next_logits(text):
        with torch.no_grad():
            return stock(input_ids=tok(text, return_tensors="pt")["input_ids"]).logits[0, -1]

    rng = random.Random(0)
    words = [f"w{i}" for i in range(3, 62)]
    jeopardy, copa = [], []
    right = {"history": [1, 1, 0, 1], "science": [0, 1, 0, 0]}  # 3/4 and 1/4 0-shot: a mean of 1/2
    for category, marks in right.items():
        for mark in marks:
            context = " ".join(rng.sample(words, 4))
            greedy = tok.convert_ids_to_tokens(int(next_logits(context + " w2").argmax()))
            wrong = next(w for w in words if w != greedy)
            jeopardy.append({"context": context, "continuation": " " + (greedy if mark else wrong),
                             "category": category})
    for mark in [1, 1, 1, 0, 1, 0]:  # 4/6
        query, choices = " ".join(rng.sample(words, 3)), rng.sample(words, 2)
        logits = next_logits(query)[tok.convert_tokens_to_ids(choices)]
        copa.append({"query": query, "choices": choices, "gold": int(logits.argmax()) if mark else int(logits.argmin())})
    for name, rows in (("jeopardy", jeopardy), ("copa", copa)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks.yaml").write_text(TASKS)
    (tmp_path / "eval_gauntlet.yaml").write_text(GAUNTLET)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mpt_eval.yaml").write_text(EVAL_COMMON + MPT_EVAL.format(run=run))
    (tmp_path / "hf_eval.yaml").write_text(EVAL_COMMON + HF_EVAL.format())
    checkpoint = evaluate("mpt_eval.yaml")["mpt_test"]
    converted = evaluate("hf_eval.yaml", [f"variables.model_name_or_path={folder}"])[folder]
    assert checkpoint == pytest.approx(converted, abs=1e-6)
    expected = {"jeopardy/0-shot/history": 0.75, "jeopardy/0-shot/science": 0.25, "jeopardy/0-shot": 0.5,
                "copa/0-shot": 4 / 6}
    assert {k: checkpoint[k] for k in expected} == pytest.approx(expected)
    # rescaled above the random baseline, each category weighted equally
    core = (checkpoint["jeopardy/0-shot"] + (4 / 6 - 0.5) / 0.5) / 2
    assert checkpoint["eval_gauntlet/core_average"] == pytest.approx(core)
