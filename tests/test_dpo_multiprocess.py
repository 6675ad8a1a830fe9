"""DPO on two ranks through the composer launcher (gloo on CPU), each layout against one process with
the same global batch (tests/dpo_driver.py): DDP (NO_SHARD, init_device mixed), FSDP2 FULL_SHARD
(init_device meta, activation checkpointing) and SHARD_GRAD_OP (init_device mixed), full finetuning with
a frozen reference copy, and LoRA under FULL_SHARD (the reference: the adapters disabled) log the same
losses and DPO metrics and end at the same weights (1e-5, as test_lora_multiprocess.py); the frozen copy
holds the starting weights, under FSDP2 as DTensors split across the ranks. Then a FULL_SHARD full
finetuning run with sharded checkpoints and shuffled pairs, rank 1 SIGKILLed while writing a checkpoint
and relaunched with the same command, resumes (weights, optimizer, sampler position across an epoch
boundary; the reference again the starting weights) to the weights and logged losses of a straight run,
bit for bit.

Launches: one process for the 1-process runs; one `composer -n 2` for the 2-rank layouts and the kill
test's straight run; two for the killed run and its relaunch.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from test_dpo import dpo_inputs, string_pairs

from llmfoundry_lite.data.tokenizer import build_tokenizer
from llmfoundry_lite.models import MPTForCausalLM

from train_utils import ROOT, launch, read_losses

pytestmark = pytest.mark.multiprocess
DRIVER = os.path.join(ROOT, "tests", "dpo_driver.py")
STEPS = 8  # 32 pairs, 8 a batch: two epochs
TOL = 1e-5
_LORA = {"model.peft_config.r": 4, "model.peft_config.lora_alpha": 8}
LAYOUTS = {  # name -> (overrides, the 1-process run it must match)
    "ddp-mixed": ({"fsdp_config.sharding_strategy": "NO_SHARD", "model.init_device": "mixed"}, "single"),
    "full_shard-meta-ac": ({"fsdp_config.sharding_strategy": "FULL_SHARD", "model.init_device": "meta",
                            "fsdp_config.activation_checkpointing": "true"}, "single"),
    "shard_grad_op-mixed": ({"fsdp_config.sharding_strategy": "SHARD_GRAD_OP", "model.init_device": "mixed"},
                            "single"),
    "lora-full_shard": ({**_LORA, "fsdp_config.sharding_strategy": "FULL_SHARD"}, "lora-single"),
}
SINGLE = {"single": {}, "lora-single": _LORA}
METRICS = {"DPOLoss", "RewardsChosen", "RewardsRejected", "RewardAccuracy", "RewardMargin", "LogpsChosen",
           "LogpsRejected"}


def overrides(inputs, **extra):
    hf, data = inputs
    values = {"variables.model_name_or_path": hf, "variables.dpo_data": data, "model.peft_config": "null",
              "max_seq_len": 32, "max_duration": f"{STEPS}ba", "global_train_batch_size": 8,
              # the 1-process and 2-rank samplers shuffle differently; in order, each global batch is the same
              "train_loader.dataset.shuffle": "false", "save_folder": "null", "console_log_interval": "1000ba",
              "python_log_level": "warning"}
    if any(k.startswith("model.peft_config.") for k in extra):
        del values["model.peft_config"]
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def kill_command(inputs, run_dir):
    """A FULL_SHARD full-finetuning run: sharded checkpoints every 3 batches, shuffled pairs, 6 batches
    (epoch 0: batches 1-4); the same command for the straight run, the killed one and its relaunch."""
    return overrides(inputs, **{
        "fsdp_config.sharding_strategy": "FULL_SHARD", "fsdp_config.state_dict_type": "sharded",
        "train_loader.dataset.shuffle": "true", "max_duration": "6ba", "run_name": "r",
        "save_folder": str(run_dir / "ckpt"), "save_interval": "3ba", "python_log_level": "info",
        "callbacks.fault_injection": "{}", "loggers.jsonl.path": str(run_dir / "metrics.jsonl")})


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("dpo_inputs")
    hf, data = dpo_inputs(build_tokenizer(tiny_tokenizer_dir), root, string_pairs(32), string_pairs(8, seed=1))
    return str(hf), str(data)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, inputs):
    """name -> (each rank's record, final policy weights, the frozen copy's gathered weights or None)."""
    root = tmp_path_factory.mktemp("dpo_runs")
    spec = {name: overrides(inputs, **extra) for name, extra in SINGLE.items()}
    spec.update({name: overrides(inputs, **extra) for name, (extra, _) in LAYOUTS.items()})
    spec["kill-straight"] = kill_command(inputs, root / "straight")
    spec["kill"] = kill_command(inputs, root / "crashed")  # test_killed_dpo_run_resumes_to_the_same_weights
    with open(root / "runs.json", "w") as f:
        json.dump(spec, f)
    out = str(root / "out")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, DRIVER, out, str(root / "runs.json"), *SINGLE], env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    launch([DRIVER, out, str(root / "runs.json"), *LAYOUTS, "kill-straight"], str(root / "logs"))

    def load(name, n_ranks):
        ranks = [json.load(open(os.path.join(out, f"{name}.rank{r}.json"))) for r in range(n_ranks)]
        ref = os.path.join(out, f"{name}.ref.pt")
        return ranks, torch.load(os.path.join(out, f"{name}.pt")), torch.load(ref) if os.path.exists(ref) else None
    loaded = {name: load(name, 1) for name in SINGLE}
    loaded.update({name: load(name, 2) for name in [*LAYOUTS, "kill-straight"]})
    loaded["root"] = root
    return loaded


def assert_starting_weights(ref_weights, inputs):
    start = MPTForCausalLM.from_pretrained(inputs[0]).state_dict()
    assert ref_weights and set(ref_weights) <= set(start)
    assert all(torch.equal(ref_weights[k], start[k]) for k in ref_weights)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_dpo_layout_trains_as_one_process(runs, inputs, name):
    (ref_run, *_), ref_weights, _ = runs[LAYOUTS[name][1]]
    ranks, weights, frozen_weights = runs[name]
    rank0 = ranks[0]
    assert len(rank0["losses"]) == STEPS
    assert max(abs(a - b) for a, b in zip(rank0["losses"], ref_run["losses"], strict=True)) < TOL, (
        rank0["losses"], ref_run["losses"])
    assert weights.keys() == ref_weights.keys()
    worst = max((weights[k] - ref_weights[k]).abs().max().item() for k in weights)
    assert worst < TOL, worst
    assert set(rank0["metrics"]) == METRICS
    assert all(abs(rank0["metrics"][k] - ref_run["metrics"][k]) < 1e-4 for k in METRICS), (rank0["metrics"],
                                                                                           ref_run["metrics"])
    if name.startswith("lora"):  # the reference is the base model with the adapters disabled: no copy
        assert all("frozen" not in r for r in ranks) and frozen_weights is None
        return
    assert_starting_weights(frozen_weights, inputs)
    frozen = [r["frozen"] for r in ranks]
    if name.startswith("ddp"):  # a full copy on each rank, rank 0's (init_device mixed: rank 1 built on meta)
        assert not any(f["dtensor"] for f in frozen) and frozen[0]["checksum"] == frozen[1]["checksum"]
        assert frozen[0]["local"] == frozen[0]["full"]
    else:  # sharded like the policy: each rank holds its part of every tensor
        assert all(f["dtensor"] for f in frozen)
        for n, shape in frozen[0]["full"].items():
            assert sum(f["local"][n][0] for f in frozen) == shape[0], n


def test_one_process_runs_have_a_frozen_copy_of_the_starting_weights(runs, inputs):
    (single, *_), _, frozen_weights = runs["single"]
    assert not single["frozen"]["dtensor"]
    assert_starting_weights(frozen_weights, inputs)
    assert runs["lora-single"][2] is None


def test_killed_dpo_run_resumes_to_the_same_weights(runs, inputs):
    """Rank 1 SIGKILLed while the checkpoint at batch 6 is written; the relaunch resumes from batch 3 (the
    weights have moved: the learning rate warms up from 0 at batches 1-2), mid-epoch, and crosses into
    epoch 1."""
    straight, run = runs["root"] / "straight", runs["root"] / "crashed"
    args = [DRIVER, str(run / "out"), str(runs["root"] / "runs.json"), "kill"]
    launch(args, str(run / "logs1"), fault="checkpoint_write:1:6")
    assert os.listdir(run / "ckpt" / "ep1-ba6") and not os.path.exists(run / "ckpt" / "ep1-ba6" / ".metadata")
    log = launch(args, str(run / "logs2"))
    assert "ep0-ba3 at batch 3" in log and "not written to the end" in log
    ranks = [json.load(open(run / "out" / f"kill.rank{r}.json")) for r in (0, 1)]
    weights, frozen_weights = torch.load(run / "out" / "kill.pt"), torch.load(run / "out" / "kill.ref.pt")
    assert ranks[0]["batches"] == 6 and all(r["frozen"]["dtensor"] for r in ranks)
    assert_starting_weights(frozen_weights, inputs)  # the resumed run's reference: the starting weights again
    la, lb = read_losses(straight / "metrics.jsonl"), read_losses(run / "metrics.jsonl")
    assert [s for s, _ in la] == list(range(6)) and lb[-3:] == la[3:]
    (straight_rank0, _), straight_weights, _ = runs["kill-straight"]
    assert straight_rank0["batches"] == 6
    assert weights.keys() == straight_weights.keys()
    assert all(torch.equal(weights[k], straight_weights[k]) for k in weights)
