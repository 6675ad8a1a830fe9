"""Two nodes on one machine: two `composer` launchers started as node 0 and node 1 of a 2-node job
(`--world_size 2 --node_rank 0|1 --master_addr 127.0.0.1 --master_port P -n 1`, the README's
multi-node lines) train with HYBRID_SHARD (shard inside a node, replicate across nodes) and save
sharded checkpoints into one shared `save_folder`.

Each simulated node gets what a real machine has to itself: its own /dev/shm (a fresh tmpfs in a
private mount namespace, `unshare --mount`: streaming coordinates its processes there) and its own
TMPDIR (streaming's lock files). One node then dies (its launcher and rank SIGKILLed together, after
the first checkpoint): the other stops with an error instead of hanging, and relaunching both nodes
resumes and ends with the weights and losses of a run that was never interrupted, bit for bit."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from llmfoundry_lite.compat.torch import FSDP2_HSDP_ON_CPU

from train_utils import DRIVER, ROOT, TINY_YAML, read_losses, tiny_overrides, write_copy_task

pytestmark = [pytest.mark.multiprocess,
              pytest.mark.skipif(not FSDP2_HSDP_ON_CPU, reason="HYBRID_SHARD on CPU needs a torch whose FSDP2 runs "
                                 "it over gloo: this runs in the compatibility run of `make test` (torch 2.14)")]
NODE = 'mount -t tmpfs tmpfs /dev/shm && exec "$@"'  # a private /dev/shm, then the launcher in this process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_nodes(script_args, log_dir, fault_on_node1=None, timeout=300):
    """Start node 0 and node 1 (each in its own session and mount namespace); wait for both.
    Returns [(exit code, seconds), ...] per node."""
    port = _free_port()
    procs, start = [], time.time()
    for node in (0, 1):
        tmp = os.path.join(log_dir, f"tmp{node}")
        os.makedirs(tmp, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": tmp,
               "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")])}
        env.pop("LLMF_FAULT", None)
        if node == 1 and fault_on_node1:
            env["LLMF_FAULT"] = fault_on_node1
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", NODE, "node",
               sys.executable, "-m", "composer.cli.launcher", "--world_size", "2", "--node_rank", str(node),
               "--master_addr", "127.0.0.1", "--master_port", str(port), "-n", "1",
               "--stdout", os.path.join(log_dir, f"node{node}-out{{rank}}.txt"),
               "--stderr", os.path.join(log_dir, f"node{node}-err{{rank}}.txt"), *script_args]
        out = open(os.path.join(log_dir, f"launcher{node}.txt"), "w")
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    results = []
    for proc in procs:
        proc.wait(timeout=max(1, timeout - (time.time() - start)))
        results.append((proc.returncode, time.time() - start))
    return results


def logs(log_dir) -> str:
    return "".join(f"--- {n}\n" + open(os.path.join(log_dir, n), errors="replace").read()[-2500:]
                   for n in sorted(os.listdir(log_dir)) if n.endswith(".txt"))


def args(out, data, tok, run_dir, **extra):
    """tests/train_driver.py's arguments: `train()` as scripts/train.py runs it, recording ranks and weights."""
    return [DRIVER, out, TINY_YAML, *tiny_overrides(data, tok, **{
        "max_duration": "6ba", "global_train_batch_size": 8, "run_name": "two-nodes",
        "save_folder": os.path.join(run_dir, "ckpt"), "save_interval": "3ba",
        "fsdp_config.sharding_strategy": "HYBRID_SHARD", "fsdp_config.state_dict_type": "sharded",
        "loggers.jsonl.path": os.path.join(run_dir, "metrics.jsonl"), **extra})]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("multinode")
    data = write_copy_task(str(root / "data"))
    straight, killed = str(root / "straight"), str(root / "killed")
    for d in (straight, killed):
        os.makedirs(os.path.join(d, "logs"))
    result = run_nodes(args(straight, data, tiny_tokenizer_dir, straight), os.path.join(straight, "logs"))
    assert [code for code, _ in result] == [0, 0], logs(os.path.join(straight, "logs"))
    died = run_nodes(args(killed, data, tiny_tokenizer_dir, killed, **{"callbacks.fault_injection": "{}"}),
                     os.path.join(killed, "logs"), fault_on_node1="node:1:5")
    os.makedirs(os.path.join(killed, "logs2"))
    relaunch = run_nodes(args(killed, data, tiny_tokenizer_dir, killed, python_log_level="info"),
                         os.path.join(killed, "logs2"))
    assert [code for code, _ in relaunch] == [0, 0], logs(os.path.join(killed, "logs2"))
    return straight, killed, died


def test_two_nodes_train_with_hybrid_shard(runs):
    straight, _, _ = runs
    losses = [loss for _, loss in read_losses(os.path.join(straight, "metrics.jsonl"))]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.3, losses
    ranks = [json.load(open(os.path.join(straight, f"rank{r}.json"))) for r in (0, 1)]
    # one process per node shards within its node (a group of one) and replicates across the two nodes
    for r in ranks:
        assert r["local"] == r["full"] and r["batches"] == 6
    assert os.path.isfile(os.path.join(straight, "ckpt", "ep0-ba6", ".metadata"))  # sharded, in the shared folder


def test_a_dead_node_stops_the_other_and_a_relaunch_resumes_exactly(runs):
    straight, killed, died = runs
    (code0, seconds0), (code1, _) = died
    assert code1 == -9, "node 1's launcher is SIGKILLed with its rank"
    assert code0 != 0 and seconds0 < 120, f"node 0 must stop, not hang (exit {code0} after {seconds0:.0f}s)"
    died_log = open(os.path.join(killed, "logs", "launcher0.txt")).read()
    assert "another rank or node stopped during training" in died_log, died_log[-3000:]
    assert "relaunch every node with the same command" in died_log  # `llmfoundry-lite train` prints it alone, exit 2
    relaunched = open(os.path.join(killed, "logs2", "launcher0.txt")).read()  # node 0's rank 0 logs here
    assert "autoresume: resumed from" in relaunched and "ep0-ba3" in relaunched, relaunched[-3000:]
    assert read_losses(os.path.join(killed, "metrics.jsonl"))[-3:] == read_losses(os.path.join(straight, "metrics.jsonl"))[-3:]
    a = torch.load(os.path.join(straight, "weights.pt"))
    b = torch.load(os.path.join(killed, "weights.pt"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
