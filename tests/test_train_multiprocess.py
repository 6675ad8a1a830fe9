"""Two ranks with FSDP2 over gloo on CPU: training works, parameters are sharded, and a run that is
stopped and relaunched on other launchers, world sizes and sharding strategies (autoresume from sharded
checkpoints, resharded on load) sees exactly the samples of a straight run and ends with its losses
and weights, within float32 reduction-order noise. (A relaunch on the same layout is bit-exact:
tests/test_reliability_kill.py.)"""
import glob
import json
import os

import pytest
import torch

from train_utils import (
    DRIVER,
    ROOT,
    TINY_YAML,
    TOLERANCE,
    launch,
    read_losses,
    samples,
    tiny_overrides,
    write_copy_task,
)
from train_utils import resize_overrides as overrides

pytestmark = pytest.mark.multiprocess


# A run of 8 batches in four launches, each resuming the one before on another launcher, world size or
# sharding strategy: (launcher, processes, overrides, batches at its end).
RESIZED = [
    ("torchrun", 2, {}, 2),                                        # torchrun scripts/train.py, as composer -n 2
    ("composer", 2, {"fsdp_config.sharding_strategy": "SHARD_GRAD_OP"}, 4),  # FULL_SHARD -> SHARD_GRAD_OP
    ("composer", 1, {}, 6),                                                  # 2 -> 1
    ("composer", 2, {}, 8),                                                  # 1 -> 2
]
@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("fsdp2")
    data = write_copy_task(str(root / "data"))
    straight, resized = str(root / "straight"), str(root / "resized")
    launch([DRIVER, straight, TINY_YAML, *overrides(data, tiny_tokenizer_dir, straight, "8ba")], straight)
    logs = []
    for i, (launcher, nproc, extra, batches) in enumerate(RESIZED):
        args = overrides(data, tiny_tokenizer_dir, resized, f"{batches}ba", **extra)
        if launcher == "torchrun":  # the user-facing script (it has no sample recorder)
            script = [os.path.join(ROOT, "scripts", "train.py"), TINY_YAML, *[a for a in args if "sample_rec" not in a]]
        else:
            script = [DRIVER, resized, TINY_YAML, *args]
        logs.append(launch(script, os.path.join(resized, f"logs{i}"), nproc=nproc,
                           torchrun=[] if launcher == "torchrun" else None))
    return straight, resized, logs


def test_two_ranks_train_with_sharded_parameters(runs):
    straight, _, _ = runs
    losses = [loss for _, loss in read_losses(os.path.join(straight, "metrics.jsonl"))]
    assert len(losses) == 8 and losses[-1] < losses[0] - 1.0, losses
    ranks = [json.load(open(os.path.join(straight, f"rank{r}.json"))) for r in (0, 1)]
    wqkv = "transformer.blocks.0.attn.Wqkv.weight"
    full_rows = ranks[0]["full"][wqkv][0]
    assert [r["local"][wqkv][0] for r in ranks] == [full_rows // 2, full_rows // 2]
    for name, shape in ranks[0]["full"].items():  # every parameter is split along dim 0 across the ranks
        assert sum(r["local"][name][0] for r in ranks) == shape[0], name
    weights = torch.load(os.path.join(straight, "weights.pt"))
    assert list(weights[wqkv].shape) == ranks[0]["full"][wqkv]
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_relaunches_on_other_layouts_continue_the_straight_run(runs):
    straight, resized, logs = runs
    assert glob.glob(os.path.join(resized, "ckpt", "ep0-ba2", "*.distcp")), "sharded (DCP) checkpoint expected"
    for i, (_, _, _, batches) in enumerate(RESIZED[1:]):
        assert f"ep0-ba{batches - 2} at batch {batches - 2}" in logs[i + 1]
    assert "written by 2 processes; 1 go on with the same global batch of 8 (8 each)" in logs[2]
    assert "written by 1 processes; 2 go on with the same global batch of 8 (4 each)" in logs[3]
    assert json.load(open(os.path.join(resized, "rank0.json")))["batches"] == 8
    # the same samples at every step: none repeated, none skipped, whatever the world size
    expected, seen = samples(straight), samples(resized)
    assert sorted(seen) == list(range(2, 8)) and seen == {step: expected[step] for step in seen}
    assert all(len(rows) == 8 for rows in seen.values())
    la = read_losses(os.path.join(straight, "metrics.jsonl"))
    lb = read_losses(os.path.join(resized, "metrics.jsonl"))
    assert [s for s, _ in lb] == list(range(8))
    assert la[:2] == lb[:2]  # torchrun, two ranks, FULL_SHARD: the straight run's very layout
    assert max(abs(a - b) for (_, a), (_, b) in zip(la, lb, strict=True)) < TOLERANCE, (la, lb)
    a = torch.load(os.path.join(straight, "weights.pt"))
    b = torch.load(os.path.join(resized, "weights.pt"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < TOLERANCE


def test_a_relaunch_that_cannot_keep_the_batch_is_refused_before_loading(runs, tiny_tokenizer_dir, capsys):
    from llmfoundry_lite.cli import main
    straight, resized, _ = runs
    before = sorted(os.listdir(os.path.join(resized, "ckpt")))
    args = overrides(os.path.join(os.path.dirname(straight), "data"), tiny_tokenizer_dir, resized, "10ba",
                     device_train_microbatch_size=3)
    assert main(["train", TINY_YAML, *[a for a in args if "sample_recorder" not in a]]) == 2
    err = capsys.readouterr().err
    assert "device_train_microbatch_size: 3 does not divide the per-device batch 8" in err
    assert "ep0-ba8 was written by 2 processes, this launch has 1" in err and "Traceback" not in err
    assert main(["train", TINY_YAML, *[a for a in args if "sample_recorder" not in a and "microbatch" not in a],
                 "global_train_batch_size=12"]) == 2
    err = capsys.readouterr().err
    assert "global_train_batch_size: 12, but autoresume would continue" in err and "trained with 8" in err
    assert sorted(os.listdir(os.path.join(resized, "ckpt"))) == before


@pytest.fixture(scope="module")
def finetuning_runs(tmp_path_factory, tiny_tokenizer_dir):
    """The finetuning loader (a map-style dataset, shuffled per epoch): 2 ranks for 7 batches, then one
    process to 10, against one process throughout; 40 examples are 5 batches of 8 an epoch, so the
    relaunch lands mid-way through the second epoch's reshuffled order. The examples all have the same
    number of tokens: the loss averages each process's tokens, then the processes, so with unequal
    lengths another world size weighs the tokens of a batch differently (a different loss, not noise)."""
    import collections

    import yaml
    from transformers import AutoTokenizer

    from llmfoundry_lite.config import load_config
    root = tmp_path_factory.mktemp("finetuning")
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    by_length = collections.defaultdict(list)
    for i in range(400):
        example = {"prompt": f"{i} plus {i} is", "response": f" {2 * i}"}
        by_length[len(tok(example["prompt"]).input_ids), len(tok(example["response"]).input_ids)].append(example)
    examples = max(by_length.values(), key=len)[:40]
    assert len(examples) == 40
    with open(root / "sft.jsonl", "w") as f:
        f.writelines(json.dumps(example) + "\n" for example in examples)
    cfg = load_config(TINY_YAML, tiny_overrides(str(root), tiny_tokenizer_dir))
    cfg["train_loader"] = {"name": "finetuning", "dataset": {"hf_name": str(root / "sft.jsonl"), "max_seq_len": 17,
                                                             "shuffle": True}, "drop_last": True}
    with open(root / "sft.yaml", "w") as f:
        yaml.safe_dump(cfg, f)
    straight, resized = str(root / "straight"), str(root / "resized")

    def run(out, duration, nproc):
        args = overrides(str(root), tiny_tokenizer_dir, out, duration, save_interval="7ba")
        return launch([DRIVER, out, str(root / "sft.yaml"), *args], os.path.join(out, f"logs{duration}"), nproc=nproc)
    run(straight, "10ba", 1)
    logs = [run(resized, "7ba", 2), run(resized, "10ba", 1)]
    return straight, resized, logs


def test_finetuning_loader_relaunched_on_one_process_continues_the_epoch(finetuning_runs):
    straight, resized, logs = finetuning_runs
    assert "ep0-ba7" not in logs[1] and "ep1-ba7 at batch 7" in logs[1]
    expected, seen = samples(straight), samples(resized)
    assert sorted(seen) == list(range(10)) and seen == expected
    # every example once an epoch, in another order the second time
    epochs = [sorted(r for step in range(e * 5, e * 5 + 5) for r in seen[step]) for e in (0, 1)]
    assert epochs[0] == epochs[1] and len(set(epochs[0])) == 40
    assert [seen[s] for s in range(5)] != [seen[s] for s in range(5, 10)]
    la = read_losses(os.path.join(straight, "metrics.jsonl"))
    lb = read_losses(os.path.join(resized, "metrics.jsonl"))
    assert [s for s, _ in lb] == list(range(10))
    assert max(abs(a - b) for (_, a), (_, b) in zip(la, lb, strict=True)) < TOLERANCE, (la, lb)
