"""The wider resume-on-another-world-size matrix (`make test-resize`, on today's stack: torch 2.7's FSDP2
cannot run HYBRID_SHARD over gloo): a run of 8 batches in four launches, 4 ranks -> 2 -> 4 as HYBRID_SHARD
(2 replicas of 2 shards) -> 2, and a whole-model (`state_dict_type: full`) run 2 -> 4; each sees exactly
the samples of a straight 2-rank run and ends with its losses and weights within float32 noise."""
import os

import pytest
import torch

from train_utils import DRIVER, TINY_YAML, TOLERANCE, launch, read_losses, samples, write_copy_task
from train_utils import resize_overrides as overrides

pytestmark = pytest.mark.resize

HYBRID = {"fsdp_config.sharding_strategy": "HYBRID_SHARD", "fsdp_config.data_parallel_shard_degree": 2}
FULL = {"fsdp_config.state_dict_type": "full"}
# name -> [(processes, overrides, batches at the end of that launch)]
CHAINS = {
    "sharded": [(4, {}, 2), (2, {}, 4), (4, HYBRID, 6), (2, {}, 8)],
    "full": [(2, FULL, 4), (4, FULL, 8)],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("resize")
    data = write_copy_task(str(root / "data"))
    straight = str(root / "straight")
    launch([DRIVER, straight, TINY_YAML, *overrides(data, tiny_tokenizer_dir, straight, "8ba")], straight)
    logs = {}
    for name, chain in CHAINS.items():
        run = str(root / name)
        logs[name] = [launch([DRIVER, run, TINY_YAML, *overrides(data, tiny_tokenizer_dir, run, f"{end}ba", **extra)],
                             os.path.join(run, f"logs{i}"), nproc=nproc)
                      for i, (nproc, extra, end) in enumerate(chain)]
    return root, logs


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_relaunches_on_other_world_sizes_continue_the_straight_run(runs, name):
    root, logs = runs
    chain, straight, run = CHAINS[name], str(root / "straight"), str(root / name)
    for i in range(1, len(chain)):
        before, after = chain[i - 1][0], chain[i][0]
        resumed = chain[i - 1][2]
        assert f"at batch {resumed}" in logs[name][i]
        assert f"written by {before} processes; {after} go on with the same global batch of 8 ({8 // after} each)" \
            in logs[name][i]
    expected, seen = samples(straight), samples(run)
    assert sorted(seen) == list(range(8)) and seen == expected
    la = read_losses(os.path.join(straight, "metrics.jsonl"))
    lb = read_losses(os.path.join(run, "metrics.jsonl"))
    assert [s for s, _ in lb] == list(range(8))
    assert max(abs(a - b) for (_, a), (_, b) in zip(la, lb, strict=True)) < TOLERANCE, (la, lb)
    a = torch.load(os.path.join(straight, "weights.pt"))
    b = torch.load(os.path.join(run, "weights.pt"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < TOLERANCE
