"""Data speed: JSONL -> MDS conversion tokens/s (1 vs 2 workers) and text-loader tokens/s.

The corpus is the quickstart's (standard-library docstrings), repeated `--copies` times into one
JSONL file; the tokenizer is a byte-level BPE trained on it (vocab 4096). Both conversions write
128-token rows and must produce identical shards. The loader reads the 2-worker output with the
`text` loader of `yamls/pretrain/mpt-tiny-cpu.yaml` (batch 16 x 128, shuffled, `num_workers: 0`,
i.e. in the training process) and reports tokens/s next to the training figure it must outpace.
Prints one JSON line; `--out FILE` also appends a Markdown row to FILE.
"""
from __future__ import annotations

import argparse
import datetime
import filecmp
import json
import os
import platform
import tempfile
import time

import torch

from llmfoundry_lite.data.loaders import build_dataloader
from llmfoundry_lite.prep.convert import TokenizeSpec, convert_json
from llmfoundry_lite.prep.tokenizer import train_tokenizer
from llmfoundry_lite.quickstart_corpus import documents

SEQ_LEN, BATCH = 128, 16


def same_shards(a: str, b: str) -> bool:
    names = sorted(n for n in os.listdir(a) if n.endswith(".mds") or n == "index.json")
    return names == sorted(n for n in os.listdir(b) if n.endswith(".mds") or n == "index.json") and all(
        filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False) for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=4, help="how many times the corpus is repeated")
    parser.add_argument("--loader_batches", type=int, default=400)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        docs = documents()
        with open(os.path.join(root, "corpus.txt"), "w") as f:
            f.write("\n\n".join(docs))
        tokenizer = os.path.join(root, "tokenizer")
        train_tokenizer([os.path.join(root, "corpus.txt")], tokenizer, vocab_size=4096)
        with open(os.path.join(root, "corpus.jsonl"), "w") as f:
            for _ in range(args.copies):
                for d in docs:
                    f.write(json.dumps({"text": d}) + "\n")
        spec = TokenizeSpec(tokenizer=tokenizer, concat_tokens=SEQ_LEN, eos_text="<|endoftext|>")
        row = {"documents": len(docs) * args.copies}
        for workers in (1, 2):
            summary = convert_json(os.path.join(root, "corpus.jsonl"), os.path.join(root, f"mds{workers}"), spec,
                                   num_workers=workers)
            row["tokens"] = summary.tokens
            row[f"prep_tok_s_{workers}_workers"] = round(summary.tokens / summary.seconds)
        row["prep_speedup_2_vs_1"] = round(row["prep_tok_s_2_workers"] / row["prep_tok_s_1_workers"], 2)
        row["identical_shards"] = same_shards(os.path.join(root, "mds1"), os.path.join(root, "mds2"))

        from llmfoundry_lite.data.tokenizer import build_tokenizer
        loader = build_dataloader({"name": "text", "drop_last": True, "dataset": {
            "local": os.path.join(root, "mds2"), "shuffle": True, "max_seq_len": SEQ_LEN}},
            build_tokenizer(tokenizer), BATCH)
        batches, start = 0, time.perf_counter()
        while batches < args.loader_batches:
            for batch in loader:
                assert batch["input_ids"].shape == (BATCH, SEQ_LEN)
                batches += 1
                if batches == args.loader_batches:
                    break
        seconds = time.perf_counter() - start
        row["loader_batches_s"] = round(batches / seconds, 1)
        row["loader_tok_s"] = round(batches * BATCH * SEQ_LEN / seconds)
    row.update(threads=1, torch=torch.__version__)
    print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(f"\n<!-- {datetime.date.today()} {platform.machine()}, {os.cpu_count()} cores -->\n")
            f.write(f"| {row['documents']} | {row['tokens']:,} | {row['prep_tok_s_1_workers']:,} | "
                    f"{row['prep_tok_s_2_workers']:,} | {row['prep_speedup_2_vs_1']}x | {row['identical_shards']} | "
                    f"{row['loader_batches_s']} | {row['loader_tok_s']:,} |\n")


if __name__ == "__main__":
    main()
