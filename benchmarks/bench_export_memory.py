"""Peak memory of `convert` (Composer checkpoint -> HF folder, and -> GGUF file) against the checkpoint size.

For each model size a full Composer-layout checkpoint (`state.model` with `model.` prefixes, AdamW
`exp_avg`/`exp_avg_sq` for every weight, the HF config under `state.integrations.huggingface`) is
written with torch.save, then converted in a fresh process that samples its own /proc/self/status
every 5 ms. Reported, as growth over the process's memory just before converting:
- anon: private memory (what conversion allocates; the target: about one shard + one tensor),
- rss: anon + file pages of the mmapped checkpoint that were read (page cache the kernel can drop).
Both fp32 (the shard holds the mmapped tensors themselves) and bf16 (converted copies) exports, and
GGUF files in fp16 and q8_0 (the target: about one tensor and its converted copy).
Prints one JSON line per size and precision; `--out FILE` also appends Markdown rows to FILE.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile

import torch

SIZES = {"51M": dict(d_model=512, n_heads=8, n_layers=8, vocab_size=50368),
         "203M": dict(d_model=1024, n_heads=16, n_layers=12, vocab_size=50368)}
SHARD = "100MB"

CHILD = r"""
import json, sys, threading, time
# import everything conversion uses first, so the baseline includes the code, not just the data
import safetensors.torch, transformers
from transformers import GenerationConfig
from llmfoundry_lite.export.command import convert_composer_to_hf, convert_to_gguf
from llmfoundry_lite.models import MPTForCausalLM

def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile")}

base = status()
peak = dict(base)
done = False
def sample():
    while not done:
        now = status()
        for k in peak:
            peak[k] = max(peak[k], now[k])
        time.sleep(0.005)
thread = threading.Thread(target=sample); thread.start()
t0 = time.perf_counter()
if len(sys.argv) > 5:  # a GGUF file, with the tokenizer folder sys.argv[5]
    convert_to_gguf(sys.argv[2], sys.argv[1], precision=sys.argv[4], tokenizer=sys.argv[5], log=lambda m: None)
else:
    convert_composer_to_hf(sys.argv[1], sys.argv[2], sys.argv[4], sys.argv[3], log=lambda m: None)
seconds = time.perf_counter() - t0
done = True; thread.join()
print(json.dumps({"anon": peak["RssAnon"] - base["RssAnon"],
                  "rss": peak["RssAnon"] + peak["RssFile"] - base["RssAnon"] - base["RssFile"],
                  "seconds": seconds}))
"""


def write_checkpoint(path: str, shape: dict) -> dict:
    from llmfoundry_lite.models import MPTConfig, MPTForCausalLM
    config = MPTConfig(**shape, max_seq_len=2048, init_device="meta")
    with torch.device("meta"):
        params = {k: v.shape for k, v in MPTForCausalLM(config).state_dict().items()}
    model = {f"model.{k}": torch.randn(s) for k, s in params.items()}
    adam = {k: {"exp_avg": torch.randn(s), "exp_avg_sq": torch.rand(s)} for k, s in params.items()}
    content = {**config.to_dict(), "init_device": "cpu"}
    state = {"state": {"model": model, "optimizers": {"DecoupledAdamW": {"state": adam}},
                       "integrations": {"huggingface": {"model": {"config": {"content": content}}, "tokenizer": {}}}}}
    torch.save(state, path)
    tied = {k: v for k, v in model.items() if k != "model.lm_head.weight"}
    return {"weights_bytes": sum(t.numel() * 4 for t in tied.values()),
            "largest_tensor_bytes": max(t.numel() * 4 for t in tied.values()),
            "checkpoint_bytes": os.path.getsize(path)}


def write_tokenizer(folder: str) -> str:
    """A small byte-level BPE (a GGUF file holds its tokenizer; the checkpoint above has none)."""
    from llmfoundry_lite.prep.tokenizer import train_tokenizer
    text = os.path.join(folder, "text.txt")
    with open(text, "w") as f:
        f.write(" ".join(dir(__builtins__)) * 50)
    train_tokenizer([text], os.path.join(folder, "tokenizer"), vocab_size=512)
    return os.path.join(folder, "tokenizer")


EXPORTS = [("fp32", "hf"), ("bf16", "hf"), ("fp16", "gguf"), ("q8_0", "gguf")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for name in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = os.path.join(tmp, "ckpt.pt")
            info = write_checkpoint(ckpt, SIZES[name])
            subprocess.run(["sync"], check=False)
            tokenizer = write_tokenizer(tmp)
            for precision, kind in EXPORTS:
                argv = [ckpt, os.path.join(tmp, precision), SHARD, precision] if kind == "hf" else \
                    [ckpt, os.path.join(tmp, f"{precision}.gguf"), "-", precision, tokenizer]
                out = subprocess.run([sys.executable, "-c", CHILD, *argv], check=True, capture_output=True,
                                     text=True).stdout
                result = {"model": name, "precision": precision if kind == "hf" else f"GGUF {precision}",
                          "shard_limit": SHARD if kind == "hf" else "-", **info,
                          **json.loads(out.strip().splitlines()[-1])}
                mb = {k: round(v / 2 ** 20) for k, v in result.items() if k.endswith("bytes") or k in ("anon", "rss")}
                print(json.dumps({**result, "MiB": mb}), flush=True)
                rows.append((result, mb))
    if args.out:
        with open(args.out, "a") as f:
            f.write(f"\n<!-- {datetime.date.today()} {platform.processor() or platform.machine()}, "
                    f"torch {torch.__version__} -->\n")
            for r, mb in rows:
                f.write(f"| {r['model']} | {r['precision']} | {mb['checkpoint_bytes']} | {mb['weights_bytes']} | "
                        f"{mb['largest_tensor_bytes']} | {r['shard_limit']} | {mb['anon']} | {mb['rss']} | "
                        f"{r['seconds']:.1f} |\n")


if __name__ == "__main__":
    main()
