"""Two ranks through the composer launcher with FSDP2 over gloo on CPU: training works, parameters
are sharded, and a run stopped and relaunched (autoresume from sharded checkpoints) ends with the
same weights and loss sequence as a straight run."""
import glob
import json
import os

import pytest
import torch

from train_utils import DRIVER, ROOT, TINY_YAML, launch, read_losses, tiny_overrides, write_copy_task

pytestmark = pytest.mark.multiprocess


def overrides(data, tok, run_dir, duration):
    return tiny_overrides(data, tok, **{
        "max_duration": duration, "global_train_batch_size": 8, "run_name": "r",
        "save_folder": os.path.join(run_dir, "ckpt"), "save_interval": "3ba",
        "fsdp_config.state_dict_type": "sharded", "model.init_device": "meta",
        "loggers.jsonl.path": os.path.join(run_dir, "metrics.jsonl")})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("fsdp2")
    data = write_copy_task(str(root / "data"))
    straight, resumed = str(root / "straight"), str(root / "resumed")
    launch([DRIVER, straight, TINY_YAML, *overrides(data, tiny_tokenizer_dir, straight, "6ba")], straight)
    # first half through the user-facing script, then the same command with a longer duration
    launch([os.path.join(ROOT, "scripts", "train.py"), TINY_YAML,
            *overrides(data, tiny_tokenizer_dir, resumed, "3ba")], resumed)
    launch([DRIVER, resumed, TINY_YAML, *overrides(data, tiny_tokenizer_dir, resumed, "6ba")], resumed)
    return straight, resumed


def test_two_ranks_train_with_sharded_parameters(runs):
    straight, _ = runs
    losses = [loss for _, loss in read_losses(os.path.join(straight, "metrics.jsonl"))]
    assert len(losses) == 6 and losses[-1] < losses[0] - 1.0, losses
    ranks = [json.load(open(os.path.join(straight, f"rank{r}.json"))) for r in (0, 1)]
    wqkv = "transformer.blocks.0.attn.Wqkv.weight"
    full_rows = ranks[0]["full"][wqkv][0]
    assert [r["local"][wqkv][0] for r in ranks] == [full_rows // 2, full_rows // 2]
    for name, shape in ranks[0]["full"].items():  # every parameter is split along dim 0 across the ranks
        assert sum(r["local"][name][0] for r in ranks) == shape[0], name
    weights = torch.load(os.path.join(straight, "weights.pt"))
    assert list(weights[wqkv].shape) == ranks[0]["full"][wqkv]
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_relaunch_resumes_from_sharded_checkpoint_exactly(runs):
    straight, resumed = runs
    assert glob.glob(os.path.join(resumed, "ckpt", "ep*-ba3", "*.distcp")), "sharded (DCP) checkpoint expected"
    assert json.load(open(os.path.join(resumed, "rank0.json")))["batches"] == 6
    la = read_losses(os.path.join(straight, "metrics.jsonl"))
    lb = read_losses(os.path.join(resumed, "metrics.jsonl"))
    assert [s for s, _ in lb] == list(range(6)) and la == lb
    a = torch.load(os.path.join(straight, "weights.pt"))
    b = torch.load(os.path.join(resumed, "weights.pt"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
