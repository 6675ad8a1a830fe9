"""SIGKILL a rank of a 2-process FSDP2 run (sharded checkpoints every 3 batches) at three points in
turn — mid-step, while a checkpoint is being written, between checkpoints — relaunching the same
command after each kill: every relaunch resumes from the last complete checkpoint and says which,
the partial checkpoint is set aside, and the final weights equal those of an uninterrupted run."""
import os

import pytest
import torch

from train_utils import DRIVER, TINY_YAML, launch, tiny_overrides, write_copy_task

pytestmark = pytest.mark.multiprocess


def test_killed_ranks_resume_to_the_same_weights(tmp_path, tiny_tokenizer_dir):
    data = write_copy_task(str(tmp_path / "data"), n_train=256, n_val=16)

    def command(run_dir):
        return [DRIVER, str(run_dir), TINY_YAML, *tiny_overrides(data, tiny_tokenizer_dir, **{
            "max_duration": "9ba", "global_train_batch_size": 8, "run_name": "r",
            "save_folder": str(run_dir / "ckpt"), "save_interval": "3ba", "python_log_level": "info",
            "fsdp_config.state_dict_type": "sharded", "callbacks.fault_injection": "{}"})]

    straight = tmp_path / "straight"
    launch(command(straight), str(straight / "logs"))
    run = tmp_path / "crashed"
    ckpt = run / "ckpt"

    launch(command(run), str(run / "logs1"), fault="mid_step:1:5")          # batch 5: after ckpt 3
    assert sorted(os.listdir(ckpt)) == ["ep0-ba3", "latest-rank0.pt"]

    log = launch(command(run), str(run / "logs2"), fault="checkpoint_write:1:6")
    assert "ep0-ba3 at batch 3" in log
    assert not os.path.exists(ckpt / "ep0-ba6" / ".metadata")               # killed mid-write
    assert os.readlink(ckpt / "latest-rank0.pt") == "ep0-ba3"

    log = launch(command(run), str(run / "logs3"), fault="between:0:8")     # after ckpt 6 completes
    assert "ep0-ba6" in log and "not written to the end" in log             # the partial one, set aside
    assert "ep0-ba3 at batch 3" in log
    assert os.listdir(ckpt / "incomplete")

    log = launch(command(run), str(run / "logs4"))
    assert "ep0-ba6 at batch 6" in log
    a = torch.load(straight / "weights.pt")
    b = torch.load(run / "weights.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
