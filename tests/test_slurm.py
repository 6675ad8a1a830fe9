"""The README's `sbatch` recipe on a real one-machine Slurm cluster (tests/slurm_cluster.py; run by
`make test-slurm`, which installs slurm-wlm and munge with apt): submitted as written but for its sizes
(one node of 2 CPU processes, no GPUs), the tiny YAML and FULL_SHARD (torch 2.7's FSDP2 cannot run
HYBRID_SHARD over gloo), it trains; `scancel` (SIGTERM to every process of the job) makes the ranks save
a checkpoint and stop; the same script submitted again resumes from that checkpoint and finishes."""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
from slurm_cluster import SlurmCluster

from train_utils import ROOT, tiny_overrides, write_copy_task

pytestmark = pytest.mark.slurm
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def recipe(data: str, tokenizer: str, run_dir: str) -> str:
    """The README's Slurm block with this machine's sizes and the tiny run."""
    body = next(b for b in re.findall(r"^```bash\n(.*?)^```", README, re.S | re.M)
                if b.startswith("#!/bin/bash\n# needs a Slurm cluster"))
    overrides = tiny_overrides(data, tokenizer, **{
        "max_duration": "400ba", "scheduler.t_max": "400ba", "global_train_batch_size": 8, "run_name": "slurm",
        "save_folder": os.path.join(run_dir, "ckpt"), "save_interval": "2ba", "python_log_level": "info",
        "fsdp_config.state_dict_type": "sharded", "loggers.jsonl.path": os.path.join(run_dir, "metrics.jsonl")})
    sized = {"#SBATCH --nodes=2": "#SBATCH --nodes=1", "NPROC=8": "NPROC=2",
             "yamls/pretrain/mpt-7b.yaml variables.data_local=/data/c4 \\\n    run_name=mpt-7b "
             "save_folder=/shared/checkpoints/{run_name} fsdp_config.sharding_strategy=HYBRID_SHARD":
             "yamls/pretrain/mpt-tiny-cpu.yaml " + " ".join(overrides)}
    for before, after in sized.items():
        assert before in body, f"the README's Slurm recipe changed: {before!r} is not in it"
        body = body.replace(before, after)
    return "\n".join(line for line in body.splitlines() if "--gpus-per-node" not in line) + "\n"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if shutil.which("slurmctld") is None:
        pytest.fail("Slurm is not installed: run `make test-slurm` (it installs slurm-wlm and munge with apt)")
    cluster = SlurmCluster(str(tmp_path_factory.mktemp("slurm"))).start()
    yield cluster
    cluster.stop()


def submit(env: dict, script: str, out: str) -> str:
    """`sbatch` from the repository's root; the job inherits `env` (sbatch's default --export=ALL)."""
    proc = subprocess.run(["sbatch", "--parsable", f"--output={out}", f"--chdir={ROOT}", script],
                          capture_output=True, text=True, env=env, check=True)
    return proc.stdout.strip().split(";")[0]


def wait_until(check, timeout: float, what: str, cluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}:\n{cluster.run('squeue')}\n{cluster.logs()}")


def in_queue(cluster, job: str) -> bool:
    return bool(cluster.run("squeue", "-h", "-j", job).strip())


@pytest.mark.timeout(600)
def test_sbatch_recipe_is_preempted_by_scancel_and_resumes(cluster, tmp_path, tiny_tokenizer_dir):
    data = write_copy_task(str(tmp_path / "data"), n_train=4096, n_val=16)
    run = tmp_path / "run"
    script = tmp_path / "train.sbatch"
    script.write_text(recipe(data, tiny_tokenizer_dir, str(run)))
    env = {**cluster.env, "OMP_NUM_THREADS": "1", "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    first = submit(env, str(script), str(tmp_path / "first.out"))
    # any checkpoint: the first ones are rotated away within a second (save_interval 2ba), too fast to poll for
    wait_until(lambda: bool(glob.glob(str(run / "ckpt" / "ep0-ba*" / ".metadata"))), 240, "the first checkpoint", cluster)
    subprocess.run(["scancel", first], env=cluster.env, check=True)
    wait_until(lambda: not in_queue(cluster, first), 120, "the cancelled job to end", cluster)
    log = (tmp_path / "first.out").read_text()
    stopped = re.findall(r"stopped by SIGTERM after batch (\d+), with a checkpoint of it", log)
    assert stopped and len(set(stopped)) == 1, log[-5000:]     # every rank that said so: the same batch
    batch = int(stopped[0])
    assert 2 < batch < 400 and os.path.isfile(run / "ckpt" / f"ep0-ba{batch}" / ".metadata")

    second = submit(env, str(script), str(tmp_path / "second.out"))
    wait_until(lambda: not in_queue(cluster, second), 400, "the resubmitted job to finish", cluster)
    log = (tmp_path / "second.out").read_text()
    assert f"ep0-ba{batch} at batch {batch}" in log, log[-5000:]
    steps = [json.loads(line)["step"] for line in open(run / "metrics.jsonl") if "loss/train/total" in line]
    assert steps == list(range(400))  # every batch once, in order, none lost or repeated
