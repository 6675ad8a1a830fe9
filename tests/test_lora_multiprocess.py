"""LoRA on two ranks through the composer launcher (gloo on CPU): DDP (NO_SHARD), FSDP2 FULL_SHARD
(init_device meta with activation checkpointing; init_device mixed) and SHARD_GRAD_OP train the same
adapters as one process with the same global batch — frozen base weights and trainable adapters share each FSDP2 unit (mixed
requires_grad) — and a sharded-checkpoint LoRA run SIGKILLed while writing a checkpoint resumes on
relaunch to the weights and losses of a straight run, bit for bit.

Launches: one for the four 2-rank layouts (tests/layouts_driver.py, LORA_LAYOUTS in train_utils), three
for the kill test (straight, killed, relaunched). Tolerance of the layout comparison as in
test_parallel_layouts.py (1e-5: the same arithmetic in another order)."""
import json
import os

import pytest
import torch

from train_utils import (
    DRIVER,
    LAYOUT_STEPS,
    LORA_LAYOUTS,
    TINY_YAML,
    launch,
    read_losses,
    run_layouts,
    tiny_overrides,
    write_copy_task,
)

pytestmark = pytest.mark.multiprocess
SINGLE = [n for n in LORA_LAYOUTS if n.startswith("lora-single")]
RANKED = [n for n in LORA_LAYOUTS if n not in SINGLE]
# each 2-rank layout against the one-process run with the same init_device (meta draws its own weights)
REFERENCE = {n: "lora-single-meta" if "-meta" in n else "lora-single" for n in RANKED}
TOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_tokenizer_dir):
    return run_layouts(tmp_path_factory.mktemp("lora_layouts"), tiny_tokenizer_dir, SINGLE, RANKED)


@pytest.mark.parametrize("name", RANKED)
def test_lora_layout_trains_the_same_adapters_as_one_process(runs, name):
    (ref, *_), ref_weights = runs[REFERENCE[name]]
    ranks, weights = runs[name]
    rank0 = ranks[0]
    assert len(rank0["losses"]) == LAYOUT_STEPS
    assert max(abs(a - b) for a, b in zip(rank0["losses"], ref["losses"], strict=True)) < TOL, (rank0["losses"], ref["losses"])
    assert weights.keys() == ref_weights.keys()
    worst = max((weights[k] - ref_weights[k]).abs().max().item() for k in weights)
    assert worst < TOL, worst
    # only the adapters train, and they did (B starts at zero); the layout is what it says
    lora = sorted(k for k in weights if ".lora_" in k)
    assert all(r["trainable"] == lora for r in ranks) and lora
    assert all(weights[k].abs().max() > 0 for k in lora if ".lora_B." in k)
    assert all(r["checkpointed_blocks"] == (2 if name.endswith("-ac") else 0) for r in ranks)
    assert all(r["sharded"] == name.startswith(("lora-full_shard", "lora-shard_grad_op")) for r in ranks)


def test_killed_lora_run_resumes_to_the_same_weights(tmp_path, tiny_tokenizer_dir):
    """FULL_SHARD, init_device meta, sharded checkpoints every 2 batches; rank 1 SIGKILLed while the
    checkpoint at batch 4 is written; the relaunch (the same command) resumes from batch 2."""
    data = write_copy_task(str(tmp_path / "data"), n_train=256, n_val=16)

    def command(run_dir):
        return [DRIVER, str(run_dir), TINY_YAML, *tiny_overrides(data, tiny_tokenizer_dir, **{
            **LORA_LAYOUTS["lora-full_shard-meta-ac"],
            "max_duration": "6ba", "global_train_batch_size": 8, "run_name": "r",
            "save_folder": str(run_dir / "ckpt"), "save_interval": "2ba", "python_log_level": "info",
            "fsdp_config.state_dict_type": "sharded", "callbacks.fault_injection": "{}",
            "loggers.jsonl.path": str(run_dir / "metrics.jsonl")})]

    straight = tmp_path / "straight"
    launch(command(straight), str(straight / "logs"))
    run = tmp_path / "crashed"
    launch(command(run), str(run / "logs1"), fault="checkpoint_write:1:4")
    assert not os.path.exists(run / "ckpt" / "ep0-ba4" / ".metadata")      # killed mid-write
    log = launch(command(run), str(run / "logs2"))
    assert "ep0-ba2 at batch 2" in log and "not written to the end" in log
    ranks = [json.load(open(run / f"rank{r}.json")) for r in (0, 1)]
    assert ranks[0]["batches"] == 6
    for name, shape in ranks[0]["full"].items():  # adapters and base weights alike split across the ranks
        assert sum(r["local"][name][0] for r in ranks) == shape[0], name
    la, lb = read_losses(straight / "metrics.jsonl"), read_losses(run / "metrics.jsonl")
    assert [s for s, _ in la] == list(range(6)) and lb[-4:] == la[2:]
    a, b = torch.load(straight / "weights.pt"), torch.load(run / "weights.pt")
    assert any(".lora_B." in k for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
