"""SIGKILL a rank of a 2-process FSDP2 run (sharded checkpoints every 3 batches) at three points in
turn — mid-step, while a checkpoint is being written, between checkpoints — relaunching the same
command after each kill: every relaunch resumes from the last complete checkpoint and says which,
the partial checkpoint is set aside, and the final weights equal those of an uninterrupted run. Then
the newest checkpoint's bytes are damaged (found by the rank that wrote them, set aside, the previous
one resumed) and a checkpoint with a code-running entry is planted (refused, nothing executed). On a
disk with room for one sharded checkpoint, the second is 'disk full' on every rank.

Without a person: `torchrun --max-restarts` brings a killed rank's group back and autoresume finishes
the straight run; SIGTERM (preemption) saves a checkpoint that the relaunch resumes, again to the
straight run's weights; a rank that stops answering (SIGSTOP) ends the job through the heartbeat."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from mounts import private_mounts, small_disk
from train_utils import DRIVER, ROOT, TINY_YAML, launch, tiny_overrides, write_copy_task

TRAIN_SCRIPT = os.path.join(ROOT, "scripts", "train.py")

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_tokenizer_dir):
    return write_copy_task(str(tmp_path_factory.mktemp("data")), n_train=256, n_val=16)


def command(data, tokenizer, run_dir, save_folder=None, cli=False):
    """The test driver (it records the final weights), or with `cli` scripts/train.py as users launch it
    (its errors are one line, exit 2)."""
    overrides = tiny_overrides(data, tokenizer, **{
        "max_duration": "9ba", "global_train_batch_size": 8, "run_name": "r",
        "save_folder": str(save_folder or run_dir / "ckpt"), "save_interval": "3ba", "python_log_level": "info",
        "fsdp_config.state_dict_type": "sharded"})
    if cli:
        return [TRAIN_SCRIPT, TINY_YAML, *overrides]
    return [DRIVER, str(run_dir), TINY_YAML, *overrides, "callbacks.fault_injection={}"]


@pytest.fixture(scope="module")
def straight(data, tiny_tokenizer_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("straight")
    launch(command(data, tiny_tokenizer_dir, run), str(run / "logs"))
    return run


def rank_logs(log_dir) -> str:
    return "".join(open(os.path.join(log_dir, n)).read() for n in sorted(os.listdir(log_dir)))


class Payload:
    """Unpickling this calls os.mkdir(marker): the proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def plant(source, target, marker):
    """A copy of the DCP checkpoint `source` at `target`, with a code-running object among its
    non-tensor entries (where Composer keeps callback state)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    whole = str(target) + ".pt"
    dcp_to_torch_save(str(source), whole)
    state = torch.load(whole, weights_only=False)
    os.remove(whole)
    state["state"]["callbacks"]["Evil"] = Payload(marker)
    dcp.save(state, checkpoint_id=str(target), no_dist=True)


def test_killed_ranks_resume_to_the_same_weights(data, tiny_tokenizer_dir, straight, tmp_path):
    run = tmp_path / "crashed"
    ckpt = run / "ckpt"
    cmd = command(data, tiny_tokenizer_dir, run)

    launch(cmd, str(run / "logs1"), fault="mid_step:1:5")          # batch 5: after ckpt 3
    assert sorted(os.listdir(ckpt)) == ["ep0-ba3", "latest-rank0.pt"]
    assert sorted(n for n in os.listdir(ckpt / "ep0-ba3") if "checksums" in n) == [
        ".checksums.rank0.json", ".checksums.rank1.json"]            # each rank recorded its own files

    log = launch(cmd, str(run / "logs2"), fault="checkpoint_write:1:6")
    assert "ep0-ba3 at batch 3" in log
    assert not os.path.exists(ckpt / "ep0-ba6" / ".metadata")               # killed mid-write
    assert os.readlink(ckpt / "latest-rank0.pt") == "ep0-ba3"

    log = launch(cmd, str(run / "logs3"), fault="between:0:8")     # after ckpt 6 completes
    assert "ep0-ba6" in log and "not written to the end" in log             # the partial one, set aside
    assert "ep0-ba3 at batch 3" in log
    assert os.listdir(ckpt / "incomplete")

    # bytes of rank 1's shard of checkpoint 6 damaged (its index intact): rank 1 finds it, 3 is resumed
    shard = ckpt / "ep0-ba6" / "__1_0.distcp"
    damaged = bytearray(shard.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    shard.write_bytes(bytes(damaged))
    # and a newer checkpoint planted with a code-running entry: refused on relaunch, nothing runs
    marker = tmp_path / "PWNED"
    plant(ckpt / "ep0-ba3", ckpt / "ep0-ba7", marker)
    log = launch(command(data, tiny_tokenizer_dir, run, cli=True), str(run / "logs4"), fails=True)
    ranks = rank_logs(run / "logs4")
    assert "ep0-ba7" in ranks and "could run arbitrary code" in ranks and "Traceback" not in ranks
    assert not marker.exists()
    shutil.rmtree(ckpt / "ep0-ba7")                                         # the user removes it

    log = launch(cmd, str(run / "logs5"))
    assert "ep0-ba6 is corrupt" in log and "__1_0.distcp holds other bytes than were written" in log
    assert "ep0-ba3 at batch 3" in log
    assert [n.split(".")[0] for n in os.listdir(ckpt / "corrupt")] == ["ep0-ba6"]
    a = torch.load(straight / "weights.pt")
    b = torch.load(run / "weights.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_disk_while_saving_a_sharded_checkpoint(data, tiny_tokenizer_dir, straight, tmp_path):
    """A real filesystem with room for one sharded checkpoint (FSDP2, 2 ranks), not two: the second save
    fails with 'disk full' on the ranks, no traceback; the first stays intact (its checksums match)."""
    from llmfoundry_lite.export import checksums
    one = sum(f.stat().st_size for f in (straight / "ckpt" / "ep0-ba9").iterdir())  # the one it keeps
    small, copy = tmp_path / "small", tmp_path / "copy"
    prefix = private_mounts(small_disk(small, int(one * 1.5)))
    # the tmpfs lives only inside the namespace: copy what the run left there, to look at it afterwards
    prefix = [*prefix, "sh", "-c", f'"$@"; rc=$?; cp -a {small} {copy}; exit $rc', "sh"]
    launch(command(data, tiny_tokenizer_dir, tmp_path / "run", save_folder=small, cli=True), str(tmp_path / "logs"),
           fails=True, prefix=prefix)
    ranks = rank_logs(tmp_path / "logs")
    assert "disk full" in ranks and str(small) in ranks and "Traceback" not in ranks
    assert all(checksums.verify(str(copy / "ep0-ba3"), rank, 2) == ([], []) for rank in (0, 1))
    assert not os.path.exists(copy / "ep0-ba6" / ".metadata")


def same_weights(a_dir, b_dir) -> bool:
    a, b = torch.load(a_dir / "weights.pt"), torch.load(b_dir / "weights.pt")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_restarts_the_group_after_a_killed_rank(data, tiny_tokenizer_dir, straight, tmp_path):
    run = tmp_path / "restarted"
    log = launch(command(data, tiny_tokenizer_dir, run), str(run / "logs"), fault="mid_step:1:5", fails=False,
                 torchrun=["--max-restarts", "1"])
    assert "failed (exitcode: -9) local_rank: 1" in log                     # torchrun: which rank died, when
    assert "torchrun restarted the workers after one failed (restart 1 of at most 1" in log
    assert "ep0-ba3 at batch 3" in log
    assert same_weights(straight, run)


def test_sigterm_saves_a_checkpoint_that_the_relaunch_resumes(data, tiny_tokenizer_dir, straight, tmp_path):
    """Only rank 1 is signalled: the ranks agree after the batch, and both stop with its checkpoint."""
    run, ckpt = tmp_path / "preempted", tmp_path / "preempted" / "ckpt"
    log = launch(command(data, tiny_tokenizer_dir, run), str(run / "logs1"), fault="sigterm:1:4")
    ranks = rank_logs(run / "logs1") + log
    assert "rank 1: SIGTERM received" in ranks and "exited with code 143" in ranks
    assert "error: stopped by SIGTERM after batch 4, with a checkpoint of it in" in (run / "logs1" / "err1.txt").read_text()
    assert sorted(os.listdir(ckpt)) == ["ep0-ba4", "latest-rank0.pt"] and os.path.isfile(ckpt / "ep0-ba4" / ".metadata")
    log = launch(command(data, tiny_tokenizer_dir, run), str(run / "logs2"))
    assert "ep0-ba4 at batch 4" in log
    assert same_weights(straight, run)


def test_a_stalled_rank_ends_the_job_with_its_name(data, tiny_tokenizer_dir, tmp_path):
    """Rank 1 SIGSTOPs itself after batch 4; with dist_timeout at 600 s, rank 0's heartbeat (4 s) ends the job."""
    import psutil
    run = tmp_path / "stalled"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LLMF_FAULT": "stall:1:4",
           "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")])}
    rank0 = run / "rank0.txt"
    run.mkdir()
    with open(rank0, "w") as out:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "composer.cli.launcher", "-n", "2", "--stdout", str(run / "out{rank}.txt"),
             "--stderr", str(run / "err{rank}.txt"),
             *command(data, tiny_tokenizer_dir, run), "heartbeat_timeout=4", "dist_timeout=600"],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 240
        while launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
            if "stopped answering" in rank0.read_text():  # the launcher would wait 30 s for the stopped rank
                for child in psutil.Process(launcher.pid).children():
                    if child.status() == psutil.STATUS_STOPPED:
                        child.send_signal(signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()
            pytest.fail("the job did not end after a rank stopped answering")
    log = rank0.read_text()
    assert launcher.returncode != 0
    assert "rank 0 stops (this rank completed batch" in log and "exited with code 3" in log
    assert "rank 1 stopped answering: no heartbeat for" in log
    assert re.search(r"its last completed batch is [34] ", log)  # its beat after batch 4 may not have gone out
