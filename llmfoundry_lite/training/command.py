"""`llmfoundry-lite train YAML [key=value ...]` (also `composer -n N scripts/train.py YAML ...`).

With `-n N` (N > 1) the command relaunches itself under Composer's launcher with N processes, so
`llmfoundry-lite train -n 2 YAML` and `composer -n 2 scripts/train.py YAML` are the same run.
"""
import os
import subprocess
import sys

from llmfoundry_lite.training.entry import train


def add_arguments(parser):
    parser.add_argument("yaml", help="training YAML (llm-foundry schema), e.g. yamls/pretrain/mpt-tiny-cpu.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. max_duration=20ba optimizer.lr=1e-3")
    parser.add_argument("-n", "--nproc", type=int, default=1,
                        help="processes on this machine (launches `composer -n N`); default 1")


def run(args):
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        cmd = [sys.executable, "-m", "composer.cli.launcher", "-n", str(args.nproc), "-m",
               "llmfoundry_lite.cli", "train", args.yaml, *args.overrides]
        return subprocess.call(cmd)
    train(args.yaml, args.overrides)
    return 0
