"""Data prep against the tokenizer's own speed, on 1, 2, ... cores; and the text loader's tokens/s.

For each core count N (1 up to the cores this machine has, or `--cores`), a child process pinned to
the first N cores (CPU affinity, so the Rust tokenizer's thread pool and our threads see N cores)
measures on the same input:
- **limit**: `tokenizers`' own `encode_batch` over the documents in batches of 1024, reading each
  encoding's ids (the least any data prep must do), the best of a run before data prep's and one
  after (the machine is shared: noise then favours the limit); `encode_batch_fast` beside it;
- `data-prep json`, `hf` (the `json` builder, its Arrow cache built in the run) and `text` end to end
  with `--num_workers N` (`--processes N`): tokenizer loading, reading, tokenizing, cutting rows,
  writing and publishing the shards, but not the interpreter's start and imports;
and prints one JSON line with each one's tokens/s and its ratio to the limit. The corpus is the
quickstart's (standard-library docstrings) repeated to `--documents` JSONL lines, with a byte-level
BPE (vocab 4096) trained on it and 128-token rows. The `text` input is the same documents in .txt
files of 100 (a file is a document, so its tokens differ). `--out FILE` appends Markdown rows.
Then Spark (`--spark local[1]` and `local[2]`, 4 pieces, merged): the JSON input's tokens/s from the
job's start to the merged split (the JVM's start apart), beside the one-process figures above.
Then the `text` loader of `yamls/pretrain/mpt-tiny-cpu.yaml` (batch 16 x 128, shuffled, in the
training process) reads the json output: its tokens/s next to the ~3,000 that model trains at here.
"""
from __future__ import annotations

import argparse
import datetime
import filecmp
import functools
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

SEQ_LEN, BATCH, EOS = 128, 16, "<|endoftext|>"


def tokens_per_s(run) -> float:
    start = time.perf_counter()
    tokens = run()
    return tokens / (time.perf_counter() - start)


def child(root: str, cores: int) -> dict:
    """Everything measured on `cores` cores (this process is already pinned to them)."""
    from tokenizers import Tokenizer

    from llmfoundry_lite.prep.convert import TokenizeSpec, convert_hf, convert_json, convert_text

    with open(os.path.join(root, "corpus.jsonl")) as f:
        texts = [json.loads(line)["text"] for line in f]
    tok = Tokenizer.from_file(os.path.join(root, "tokenizer", "tokenizer.json"))

    def limit(encode):
        return sum(len(e.ids) for i in range(0, len(texts), 1024) for e in encode(texts[i:i + 1024], add_special_tokens=False))
    row = {"cores": cores, "documents": len(texts)}
    limits = {"encode_batch": [], "encode_batch_fast": []}

    def measure_limits():  # before and after the runs: the best of all, so that noise favours the limit
        for name, values in limits.items():
            values.append(tokens_per_s(functools.partial(limit, getattr(tok, name))))
    measure_limits()
    spec = TokenizeSpec(tokenizer=os.path.join(root, "tokenizer"), concat_tokens=SEQ_LEN, eos_text=EOS)
    runs = {
        "json": lambda: convert_json(os.path.join(root, "corpus.jsonl"), os.path.join(root, f"json{cores}"), spec,
                                     num_workers=cores).tokens,
        "hf": lambda: convert_hf("json", os.path.join(root, f"hf{cores}"), ["train"], spec,
                                 data_files={"train": os.path.join(root, "corpus.jsonl")}, num_workers=cores)["train"].tokens,
        "text": lambda: convert_text(os.path.join(root, "txt"), os.path.join(root, f"text{cores}"), spec,
                                     processes=cores).tokens,
    }
    for name, run in runs.items():
        row[f"{name}_tok_s"] = round(tokens_per_s(run))
    measure_limits()
    for name, values in limits.items():
        row[f"limit_{name}"] = round(max(values))
    for name in runs:
        row[f"{name}_vs_limit"] = round(row[f"{name}_tok_s"] / row["limit_encode_batch"], 2)
    return row


def spark_child(root: str, master: str) -> dict:
    """`data-prep json --spark MASTER --num_shards 4`'s work, timed once Spark is up."""
    from llmfoundry_lite.prep.convert import TokenizeSpec
    from llmfoundry_lite.prep.pieces import PieceJob, merge
    from llmfoundry_lite.prep.spark import run_pieces, session
    start = time.perf_counter()
    spark = session(master)
    spark.sparkContext.parallelize([0]).count()  # executors up
    up = time.perf_counter() - start
    spec = TokenizeSpec(tokenizer=os.path.join(root, "tokenizer"), concat_tokens=SEQ_LEN, eos_text=EOS)
    out = os.path.join(root, f"spark_{master}")
    start = time.perf_counter()
    run_pieces(PieceJob("json", os.path.join(root, "corpus.jsonl"), out, spec, 4), master)
    tokens = merge(out).tokens
    seconds = time.perf_counter() - start
    spark.stop()
    return {"spark": master, "pieces": 4, "tok_s": round(tokens / seconds), "spark_start_s": round(up, 1)}


def same_shards(a: str, b: str) -> bool:
    names = sorted(n for n in os.listdir(a) if n.endswith(".mds") or n == "index.json")
    return names == sorted(n for n in os.listdir(b) if n.endswith(".mds") or n == "index.json") and all(
        filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False) for n in names)


def loader_tok_s(data: str, tokenizer: str, batches: int) -> float:
    import torch

    from llmfoundry_lite.data.loaders import build_dataloader
    from llmfoundry_lite.data.tokenizer import build_tokenizer
    torch.set_num_threads(1)
    loader = build_dataloader({"name": "text", "drop_last": True, "dataset": {
        "local": data, "shuffle": True, "max_seq_len": SEQ_LEN}}, build_tokenizer(tokenizer), BATCH)
    seen, start = 0, time.perf_counter()
    while seen < batches:
        for batch in loader:
            assert batch["input_ids"].shape == (BATCH, SEQ_LEN)
            seen += 1
            if seen == batches:
                break
    seconds = time.perf_counter() - start
    del loader  # its dataset's threads end before the folder goes
    gc.collect()
    return seen * BATCH * SEQ_LEN / seconds


def prepare(root: str, documents: int) -> None:
    from llmfoundry_lite.prep.tokenizer import train_tokenizer
    from llmfoundry_lite.quickstart_corpus import documents as corpus
    docs = corpus()
    with open(os.path.join(root, "corpus.txt"), "w") as f:
        f.write("\n\n".join(docs))
    train_tokenizer([os.path.join(root, "corpus.txt")], os.path.join(root, "tokenizer"), vocab_size=4096)
    lines = [docs[i % len(docs)] for i in range(documents)]
    with open(os.path.join(root, "corpus.jsonl"), "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in lines)
    os.makedirs(os.path.join(root, "txt"))
    for i in range(0, documents, 100):
        with open(os.path.join(root, "txt", f"{i // 100:05d}.txt"), "w") as f:
            f.write("\n\n".join(lines[i:i + 100]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=60_000, help="JSONL lines (quickstart documents, repeated)")
    parser.add_argument("--cores", type=int, nargs="+", default=None, help="core counts (default: 1 .. all)")
    parser.add_argument("--loader_batches", type=int, default=400)
    parser.add_argument("--out", default=None)
    parser.add_argument("--no_spark", action="store_true", help="skip the Spark rows")
    parser.add_argument("--child", nargs=2, metavar=("ROOT", "CORES"), help=argparse.SUPPRESS)
    parser.add_argument("--spark_child", nargs=2, metavar=("ROOT", "MASTER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return
    if args.spark_child:
        print(json.dumps(spark_child(*args.spark_child)))
        return
    available = sorted(os.sched_getaffinity(0))
    rows = []
    with tempfile.TemporaryDirectory() as root:
        prepare(root, args.documents)
        counts = args.cores or list(range(1, len(available) + 1))
        for cores in counts:
            pinned = ",".join(map(str, available[:cores]))
            env = {**os.environ, "HF_DATASETS_CACHE": os.path.join(root, f"hf_cache{cores}"),
                   "TOKENIZERS_PARALLELISM": "true"}
            out = subprocess.run(["taskset", "-c", pinned, sys.executable, __file__, "--child", root, str(cores)],
                                 env=env, check=True, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            row["json_same_shards_as_first"] = same_shards(os.path.join(root, f"json{counts[0]}"), os.path.join(root, f"json{cores}"))
            rows.append(row)
            print(json.dumps(row), flush=True)
        sparks = []
        for master in ([] if args.no_spark else [f"local[{n}]" for n in range(1, len(available) + 1)]):
            out = subprocess.run([sys.executable, __file__, "--spark_child", root, master], check=True,
                                 capture_output=True, text=True).stdout
            sparks.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(sparks[-1]), flush=True)
        loader = round(loader_tok_s(os.path.join(root, f"json{counts[0]}"), os.path.join(root, "tokenizer"),
                                    args.loader_batches))
        print(json.dumps({"loader_tok_s": loader}), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(f"\n<!-- {datetime.date.today()} {platform.machine()}, {os.cpu_count()} cores; "
                    f"{args.documents} documents; loader {loader:,} tok/s -->\n")
            for r in rows:
                f.write(f"| {r['cores']} | {r['limit_encode_batch']:,} | {r['limit_encode_batch_fast']:,} | "
                        f"{r['json_tok_s']:,} ({r['json_vs_limit']}) | {r['hf_tok_s']:,} ({r['hf_vs_limit']}) | "
                        f"{r['text_tok_s']:,} ({r['text_vs_limit']}) | {r['json_same_shards_as_first']} |\n")
            for r in sparks:
                f.write(f"| Spark {r['spark']}, {r['pieces']} pieces | | | {r['tok_s']:,} (Spark up in "
                        f"{r['spark_start_s']} s) | | | |\n")


if __name__ == "__main__":
    main()
