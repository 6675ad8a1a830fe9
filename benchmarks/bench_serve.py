"""Serving throughput: total generated tokens/s with 1, 4, 16 and 64 concurrent clients (continuous batching).

`llmfoundry-lite serve MODEL` runs as its own process (its default torch threads); the clients are
threads of this process speaking the OpenAI API with the official `openai` client. Each level sends
the same 64 greedy completion requests (64 different prompts, `--new_tokens` tokens each); with c
clients, c requests are in flight at any time. Figures: the wall time of the whole level, total
completion tokens (from the answers' usage) per second, and its ratio to one client at a time (the
first level). Every answer must equal the one it got alone (at one client): `same_as_alone`.
Prints one JSON line per level; `--out FILE` also appends Markdown rows to FILE.

The model must be trained (a random one's near-tied logits would make "the same answer" a coin
toss): by default the quickstart's (`make quickstart` writes quickstart_out/hf).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import torch

STEMS = ["Return the number of", "Raise ValueError if the", "This module provides", "The default value of",
         "Create a new", "If the file", "Open the", "A path to the", "Read the whole", "Write the data to",
         "Convert the string", "Split the list", "The class of", "Close the", "Each element of", "When the"]
ENDINGS = ["", " given", " current", " last"]
PROMPTS = [stem + ending for ending in ENDINGS for stem in STEMS]  # 64 prompts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(client: openai.OpenAI, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.models.list()
            return
        except openai.APIConnectionError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start (exit code {server.poll()})") from None
            time.sleep(0.5)


def run_level(client: openai.OpenAI, model: str, clients: int, new_tokens: int):
    def one(prompt):
        answer = client.completions.create(model=model, prompt=prompt, max_tokens=new_tokens, temperature=0)
        return answer.choices[0].text, answer.usage.completion_tokens

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, PROMPTS))
    return time.perf_counter() - t0, [text for text, _ in results], sum(n for _, n in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="quickstart_out/hf", help="a trained HF folder (default: the quickstart's)")
    parser.add_argument("--new_tokens", type=int, default=48)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each level; the median time is reported")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not os.path.isdir(args.model):
        raise SystemExit(f"--model {args.model}: no such folder; run `make quickstart` first or pass a trained HF folder")
    port, name = free_port(), "bench"
    server = subprocess.Popen([sys.executable, "-m", "llmfoundry_lite.cli", "serve", args.model, "--port", str(port),
                               "--quiet", "--served_model_name", name, "--max_batch_size", str(max(args.levels)),
                               "--queue_size", str(4 * max(args.levels)), "--max_connections", "1024"])
    rows = []
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
        wait_ready(client, server)
        run_level(client, name, 4, 4)  # warm-up
        alone = None
        for clients in args.levels:
            runs = [run_level(client, name, clients, args.new_tokens) for _ in range(args.repeats)]
            seconds = statistics.median(r[0] for r in runs)
            texts, tokens = runs[0][1], runs[0][2]
            assert all(r[1] == texts for r in runs), "greedy answers changed between repeats"
            alone = alone or (texts, tokens / seconds)
            row = {"clients": clients, "requests": len(PROMPTS), "new_tokens": args.new_tokens,
                   "completion_tokens": tokens, "seconds": round(seconds, 2), "tok_s": round(tokens / seconds, 1),
                   "vs_one_at_a_time": round(tokens / seconds / alone[1], 2),
                   "same_as_alone": sum(a == b for a, b in zip(texts, alone[0], strict=True)),
                   "torch_threads": torch.get_num_threads()}
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        server.terminate()
        server.wait(30)
    if args.out:
        with open(args.out, "a") as f:
            f.write(f"\n<!-- {datetime.date.today()} {platform.processor() or platform.machine()}, torch "
                    f"{torch.__version__}, model {args.model} -->\n")
            for r in rows:
                f.write(f"| {r['clients']} | {r['requests']} | {r['new_tokens']} | {r['completion_tokens']} | "
                        f"{r['seconds']} | {r['tok_s']} | {r['vs_one_at_a_time']}x | "
                        f"{r['same_as_alone']}/{r['requests']} |\n")


if __name__ == "__main__":
    main()
