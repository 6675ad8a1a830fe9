"""Forward+backward tokens/s of MPTForCausalLM vs transformers' MptForCausalLM, same weights, same run.

Config (issue 2): d_model 256, 4 heads, 4 layers, seq 256, batch 8, vocab 8192, fp32, CPU, ALiBi.
Timings alternate between the two models so background load hits both alike; the median of the
repeats is reported. Prints one JSON line; `--out FILE` also appends a Markdown row to FILE.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time

import torch
import transformers

from llmfoundry_lite.models import MPTConfig, MPTForCausalLM


def step_time(model, batch) -> float:
    start = time.perf_counter()
    model(batch, labels=batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--n_heads", type=int, default=4)
    parser.add_argument("--n_layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default=None, help="append a Markdown table row to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hf_config = transformers.MptConfig(d_model=args.d_model, n_heads=args.n_heads, n_layers=args.n_layers,
                                       max_seq_len=args.seq, vocab_size=args.vocab)
    hf = transformers.MptForCausalLM(hf_config).train()
    ours = MPTForCausalLM(MPTConfig(**hf_config.to_dict())).train()
    ours.load_state_dict(hf.state_dict())
    batch = torch.randint(0, args.vocab, (args.batch, args.seq))
    with torch.no_grad():  # same weights, same numbers
        diff = (hf(batch).logits - ours(batch).logits).abs().max().item()
    times = {"ours": [], "hf": []}
    for i in range(args.warmup + args.repeats):
        for name, model in (("ours", ours), ("hf", hf)):
            t = step_time(model, batch)
            if i >= args.warmup:
                times[name].append(t)
    tokens = args.batch * args.seq
    ours_tps = tokens / statistics.median(times["ours"])
    hf_tps = tokens / statistics.median(times["hf"])
    result = {"benchmark": "model_vs_hf_fwd_bwd", "date": datetime.date.today().isoformat(),
              "ours_tokens_per_s": round(ours_tps, 1), "hf_tokens_per_s": round(hf_tps, 1),
              "speedup": round(ours_tps / hf_tps, 3), "max_abs_logit_diff": diff,
              "torch": torch.__version__, "transformers": transformers.__version__,
              "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
              "config": {k: getattr(args, k) for k in ("d_model", "n_heads", "n_layers", "seq", "batch", "vocab")}}
    print(json.dumps(result))
    if args.out:
        with open(args.out, "a") as f:
            f.write(f"| {result['date']} | {result['torch']} | {result['transformers']} | {result['threads']} | "
                    f"{result['ours_tokens_per_s']} | {result['hf_tokens_per_s']} | {result['speedup']}x |\n")


if __name__ == "__main__":
    main()
