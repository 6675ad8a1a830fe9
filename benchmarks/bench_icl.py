"""ICL examples/s on CPU: batched scoring (rows padded to the batch's longest) vs one example at a time.

Model: MPT-tiny's shape (d_model 128, 4 heads, 4 layers, ALiBi, fp32), random weights (speed does not
depend on them). Tokenizer: a byte-level BPE (vocab 512) trained here on standard-library
docstrings. Tasks: the shipped suite (llmfoundry_lite/eval/tasks/): facts (multiple_choice, 3 choices,
3-shot), arithmetic (language_modeling, 3-shot), copy_reverse (generation, 3-shot). Timings
alternate between the batch sizes so background load hits each alike; the best of the repeats is
reported. Prints one JSON line; `--out FILE` also appends Markdown rows to FILE.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time

import torch

from llmfoundry_lite.eval.icl import score_batch
from llmfoundry_lite.icl.tasks import ICLDataset, ICLTaskConfig
from llmfoundry_lite.models import MPTConfig, MPTForCausalLM

TASKS = os.path.join(os.path.dirname(__file__), "..", "llmfoundry_lite", "eval", "tasks")
SUITE = [("facts", "multiple_choice"), ("arithmetic", "language_modeling"),
         ("copy_reverse", "generation_task_with_answers")]


def make_tokenizer(folder: str):
    import inspect
    import pathlib
    import textwrap

    from transformers import AutoTokenizer

    from llmfoundry_lite.prep.tokenizer import train_tokenizer
    text = "\n\n".join(inspect.getdoc(o) or "" for m in (json, pathlib, textwrap, inspect, argparse)
                       for o in vars(m).values())
    path = os.path.join(folder, "corpus.txt")
    with open(path, "w") as f:
        f.write(text)
    train_tokenizer([path], os.path.join(folder, "tok"), vocab_size=512, model_max_length=256)
    return AutoTokenizer.from_pretrained(os.path.join(folder, "tok"))


def seconds(model, tok, ds: ICLDataset, batch_size: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for batch in ds.batches(batch_size):
            score_batch(model, tok, batch)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_fewshot", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default=None, help="append Markdown table rows to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tok = make_tokenizer(tmp)
    torch.manual_seed(0)
    model = MPTForCausalLM(MPTConfig(d_model=128, n_heads=4, n_layers=4, max_seq_len=256,
                                     vocab_size=len(tok), no_bias=True)).eval()
    rows = []
    for name, kind in SUITE:
        cfg = ICLTaskConfig(label=name, dataset_uri=os.path.join(TASKS, f"{name}.jsonl"), icl_task_type=kind)
        ds = ICLDataset(cfg, args.num_fewshot, tok, max_seq_len=256)
        seconds(model, tok, ds, args.batch_size)  # warm-up
        best = {1: float("inf"), args.batch_size: float("inf")}
        for _ in range(args.repeats):
            for bs in best:
                best[bs] = min(best[bs], seconds(model, tok, ds, bs))
        one, batched = len(ds) / best[1], len(ds) / best[args.batch_size]
        rows.append({"task": name, "type": kind, "examples": len(ds), "one_at_a_time_examples_per_s": round(one, 1),
                     "batched_examples_per_s": round(batched, 1), "speedup": round(batched / one, 2)})
    result = {"bench": "icl", "batch_size": args.batch_size, "num_fewshot": args.num_fewshot,
              "threads": torch.get_num_threads(), "torch": torch.__version__, "tasks": rows}
    print(json.dumps(result))
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(f"| {datetime.date.today()} | {torch.__version__} | {platform.machine()} | "
                        f"{result['threads']} | {r['task']} ({r['type']}) | {args.batch_size} | "
                        f"{r['one_at_a_time_examples_per_s']} | {r['batched_examples_per_s']} | {r['speedup']}x |\n")


if __name__ == "__main__":
    main()
