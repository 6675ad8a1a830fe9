"""Greedy decode tokens/s and time to first token: our MPTForCausalLM (KV cache) vs transformers' MptForCausalLM.

A native HF folder is exported from a random MPT (d_model 256, 4 heads, 4 layers, vocab 8192,
ALiBi, fp32); `load_hf_model` and stock `AutoModelForCausalLM` load it. Both decode with
`model.generate(do_sample=False)` from the same 32-token prompts, exactly `--new_tokens` tokens
(no EOS), batch 1 and batch 16; time to first token (TTFT) is a `generate` of one new token (the
prefill of the prompts plus one sampling step). Timings alternate between the models so background load hits both
alike; the median of the repeats is reported. The generated tokens must be identical. Prints one
JSON line per batch size; `--out FILE` also appends Markdown rows to FILE.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
import time

import torch
import transformers

from llmfoundry_lite.export import load_hf_model, write_hf_folder
from llmfoundry_lite.models import MPTConfig, MPTForCausalLM

SHAPE = dict(d_model=256, n_heads=4, n_layers=4, vocab_size=8192, max_seq_len=512)


def decode(model, ids, new_tokens):
    t0 = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared machine more threads mostly wait on each other)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        model = MPTForCausalLM(MPTConfig(**SHAPE))
        write_hf_folder(model.config, model.state_dict(), folder, log=lambda m: None)
        ours = load_hf_model(folder).eval()
        theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(theirs) is transformers.MptForCausalLM
    rows = []
    with torch.inference_mode():
        for batch in (1, 16):
            ids = torch.randint(1, SHAPE["vocab_size"], (batch, 32))
            times = {"ours": [], "transformers": []}
            ttft = {"ours": [], "transformers": []}
            outputs = {}
            decode(ours, ids, 4), decode(theirs, ids, 4)  # warm-up
            for _ in range(args.repeats):
                for name, m in (("ours", ours), ("transformers", theirs)):
                    seconds, outputs[name] = decode(m, ids, args.new_tokens)
                    times[name].append(seconds)
                    ttft[name].append(decode(m, ids, 1)[0])
            tps = {k: batch * args.new_tokens / statistics.median(v) for k, v in times.items()}
            first = {k: 1000 * statistics.median(v) for k, v in ttft.items()}
            row = {"batch": batch, "new_tokens": args.new_tokens, "ours_tok_s": round(tps["ours"], 1),
                   "transformers_tok_s": round(tps["transformers"], 1),
                   "speedup": round(tps["ours"] / tps["transformers"], 2),
                   "ours_ttft_ms": round(first["ours"], 1), "transformers_ttft_ms": round(first["transformers"], 1),
                   "same_tokens": bool(torch.equal(outputs["ours"], outputs["transformers"])),
                   "threads": torch.get_num_threads()}
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        with open(args.out, "a") as f:
            f.write(f"\n<!-- {datetime.date.today()} {platform.processor() or platform.machine()}, torch "
                    f"{torch.__version__}, transformers {transformers.__version__} -->\n")
            for r in rows:
                f.write(f"| {r['batch']} | {r['new_tokens']} | {r['ours_tok_s']} | {r['transformers_tok_s']} | "
                        f"{r['speedup']}x | {r['ours_ttft_ms']} | {r['transformers_ttft_ms']} | {r['same_tokens']} | "
                        f"{r['threads']} |\n")


if __name__ == "__main__":
    main()
