"""Training throughput of one figure: tokens/s, tokens/s per device, MFU, HFU, peak memory, versions.

    python benchmarks/bench_throughput.py benchmarks/figures/cpu-d256-seq256.yaml [--vs_transformers]
    composer -n 2 benchmarks/bench_throughput.py benchmarks/figures/cpu-d256-seq256.yaml --vs_transformers
    composer -n 8 benchmarks/bench_throughput.py benchmarks/figures/gpu-mpt-1b.yaml [key=value ...]

A figure is an ordinary training YAML (model size, seq len, batch, precision, fsdp_config,
compile_config) whose data and tokenizer are this script's plug-ins: `train_loader: {name: synthetic}`
(random token rows, generated on the fly, so nothing is read from disk) and `tokenizer: {name:
synthetic}`. `train()` runs it for `--warmup + --steps` batches; the timed part is the last `--steps`.
MFU = model FLOPs (6 x matmul params + attention) / the device's declared dense peak; HFU adds the
recomputed forward of activation checkpointing. `--vs_transformers` then trains stock
`transformers.MptForCausalLM` of the same shape with a plain PyTorch loop on every rank at once (same
per-rank batch, precision and optimizer; DDP across ranks) and reports our/their ratio. Rank 0 prints one JSON line;
`--out FILE.md` appends it as a table row.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import subprocess
import time

import torch
from composer.core import Callback

from llmfoundry_lite import registry
from llmfoundry_lite.data.loaders import LoaderOptions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- the plug-ins a figure YAML names ----------------------------------------------------------

@dataclasses.dataclass
class SyntheticConfig:
    max_seq_len: int
    vocab_size: int
    seed: int = 0


@dataclasses.dataclass(kw_only=True)
class SyntheticLoader(LoaderOptions):
    dataset: SyntheticConfig


class RandomRows(torch.utils.data.Dataset):
    def __init__(self, cfg: SyntheticConfig):
        self.cfg = cfg

    def __len__(self):
        return 10**7

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.cfg.seed * 10**7 + i)
        return torch.randint(0, self.cfg.vocab_size, (self.cfg.max_seq_len,), generator=g)


def _build_synthetic(loader: SyntheticLoader, tokenizer, batch_size: int):
    cfg = loader.dataset
    from llmfoundry_lite.data.collators import CausalLMCollator
    from llmfoundry_lite.data.loaders import map_sampler
    dataset = RandomRows(cfg)
    return dataset, CausalLMCollator(tokenizer.pad_token_id, cfg.max_seq_len), batch_size, map_sampler(dataset, False, 0)


def _synthetic_tokenizer():
    """A one-word tokenizer: the figures give vocab_size and feed token ids directly."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<|endoftext|>": 0}, "<|endoftext|>")),
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>")


class Timer(Callback):
    """Time and global token count at the end of the warm-up and at the end of training."""

    def __init__(self, warmup: int = 0):
        self.warmup, self.marks = warmup, []

    def batch_end(self, state, logger):
        if state.timestamp.batch.value == self.warmup:
            self._mark(state)

    def fit_end(self, state, logger):
        self._mark(state)

    def _mark(self, state):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.marks.append((time.perf_counter(), state.timestamp.token.value))


registry.dataloaders.register("synthetic", _build_synthetic, config=SyntheticLoader)
registry.tokenizers.register("synthetic", _synthetic_tokenizer)
registry.callbacks.register("benchmark_timer", Timer)


# ---- the transformers baseline -----------------------------------------------------------------

def transformers_plain_loop(config, batch: int, seq: int, steps: int, warmup: int, precision: str) -> float:
    """tokens/s of stock MptForCausalLM (same shape) trained by a plain loop on this rank (with DDP's
    gradient all-reduce when there are several ranks, as any data-parallel run needs)."""
    import transformers
    from composer.optim import DecoupledAdamW

    from llmfoundry_lite.export.hf_export import native_config
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = transformers.MptForCausalLM(native_config(config, torch.float32)).to(device).train()
    opt = DecoupledAdamW(model.parameters(), lr=1e-4)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)  # data parallel: gradients all-reduced
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if precision == "amp_bf16" and device == "cuda" else None
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    for i in range(warmup + steps):
        if i == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        with amp or torch.autocast(device, enabled=False):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * batch * seq / (time.perf_counter() - start)


# ---- the run -----------------------------------------------------------------------------------

def _versions() -> dict:
    import composer
    import transformers
    out = {"torch": torch.__version__, "composer": composer.__version__, "transformers": transformers.__version__}
    try:
        import flash_attn
        out["flash_attn"] = flash_attn.__version__
    except ImportError:
        pass
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                       text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return out


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB: the process's peak RSS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("figure", help="a YAML in benchmarks/figures/")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--steps", type=int, default=20, help="timed batches")
    parser.add_argument("--warmup", type=int, default=5, help="batches before timing (compilation, caches)")
    parser.add_argument("--vs_transformers", action="store_true")
    parser.add_argument("--out", default=None, help="append the result as a Markdown row to this file")
    args = parser.parse_args()

    from composer.utils import dist

    from llmfoundry_lite import train
    from llmfoundry_lite.models import flops_per_token
    from llmfoundry_lite.training.callbacks import device_peak_flops, unwrap

    trainer = train(args.figure, [*args.overrides, f"max_duration={args.warmup + args.steps}ba",
                                  f"callbacks.benchmark_timer.warmup={args.warmup}"])
    state = trainer.state
    timer = next(cb for cb in state.callbacks if isinstance(cb, Timer))
    (t0, n0), (t1, n1) = timer.marks
    config = unwrap(state).model.config
    world, device_batch = dist.get_world_size(), state.train_dataloader.batch_size
    seq = state.batch["input_ids"].shape[1]
    precision = state.precision.value
    device, peak = device_peak_flops(precision)
    recompute = bool(getattr(state.fsdp_config, "activation_checkpointing", False))
    tokens_per_sec = (n1 - n0) / (t1 - t0)
    per_device = tokens_per_sec / world
    row = {"figure": os.path.splitext(os.path.basename(args.figure))[0], "overrides": " ".join(args.overrides),
           "device": device, "world_size": world, "precision": precision, "seq_len": seq,
           "global_batch": device_batch * world, "params_M": round(sum(p.numel() for p in unwrap(state).model.parameters()) / 1e6, 1),  # DTensors: global
           "steps": args.steps, "tokens_per_sec": round(tokens_per_sec, 1),
           "tokens_per_sec_per_device": round(per_device, 1),
           "mfu": round(per_device * flops_per_token(config, seq) / peak, 4) if peak else None,
           "hfu": round(per_device * flops_per_token(config, seq, recompute) / peak, 4) if peak else None,
           "peak_memory_gib": round(peak_memory_gib(), 2), "date": str(datetime.date.today()),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores", **_versions()}
    trainer.close()
    if args.vs_transformers:
        theirs = torch.tensor([transformers_plain_loop(config, device_batch, seq, args.steps, args.warmup, precision)])
        dist.all_reduce(theirs, reduce_operation="SUM")  # every rank ran its share at once, as in the training run
        row["transformers_plain_loop_tokens_per_sec"] = round(theirs.item(), 1)
        row["ours_vs_transformers"] = round(tokens_per_sec / theirs.item(), 3)
    if dist.get_global_rank() == 0:
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write("| " + " | ".join(str(row.get(k, "")) for k in TABLE) + " |\n")


TABLE = ("date", "figure", "overrides", "device", "world_size", "precision", "params_M", "seq_len", "global_batch",
         "tokens_per_sec", "tokens_per_sec_per_device", "mfu", "hfu", "peak_memory_gib",
         "transformers_plain_loop_tokens_per_sec", "ours_vs_transformers", "torch", "commit")


if __name__ == "__main__":
    main()
