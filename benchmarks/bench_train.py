"""Training speed of mpt-tiny-cpu on CPU: tokens/s and MFU with 1 and 2 processes (FSDP2 over gloo),
and the Composer loop's overhead against a plain PyTorch loop on the same model and batches.

    python benchmarks/bench_train.py [--steps 40]        # prints one JSON line

The model is the architecture of yamls/pretrain/mpt-tiny-cpu.yaml (d_model 128, 4 layers, 4 heads,
seq 128) with a 4096-token vocab; batches are random token ids held in memory, so data loading is
not measured. Each process uses one thread (OMP_NUM_THREADS=1), as on the 2-core CI machine.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

SEQ, VOCAB, BATCH = 128, 4096, 16
MODEL = dict(d_model=128, n_heads=4, n_layers=4, expansion_ratio=4, max_seq_len=SEQ, vocab_size=VOCAB,
             attn_config={"attn_impl": "torch", "alibi": True})


def batches(n, batch_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n * batch_size, SEQ), generator=g)
    return [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()} for x in ids]


def build_model():
    from llmfoundry_lite.models import MPTConfig, MPTForCausalLM
    torch.manual_seed(0)
    return MPTForCausalLM(MPTConfig(**MODEL))


def plain_loop(steps, warmup):
    from composer.optim import DecoupledAdamW
    model = build_model()
    opt = DecoupledAdamW(model.parameters(), lr=1e-3)
    data = torch.utils.data.DataLoader(batches(steps + warmup, BATCH), batch_size=BATCH)
    for i, batch in enumerate(data):
        if i == warmup:
            start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * BATCH * SEQ / (time.perf_counter() - start)


class _Timer:
    """A Composer callback taking the wall time from the first timed batch to fit end."""

    def __new__(cls, warmup):
        from composer.core import Callback

        class Timer(Callback):
            def __init__(self):
                self.start, self.end = None, None

            def batch_end(self, state, logger):
                if state.timestamp.batch.value == warmup:
                    self.start = time.perf_counter()

            def fit_end(self, state, logger):
                self.end = time.perf_counter()
        return Timer()


def composer_loop(steps, warmup, world_size=1):
    """Our Trainer setup (ComposerMPTCausalLM, DecoupledAdamW, FSDP2 when world_size > 1, speed monitor)."""
    from composer import Trainer
    from composer.optim import DecoupledAdamW
    from composer.utils import dist

    from llmfoundry_lite.training.callbacks import SpeedMonitor
    from llmfoundry_lite.training.entry import fsdp2_config
    from llmfoundry_lite.training.objectives.crossentropy import ComposerMPTCausalLM
    from llmfoundry_lite.training.schema import FSDPSection

    if world_size > 1:
        dist.initialize_dist("cpu", 300)
    model = ComposerMPTCausalLM(build_model())
    device_batch = BATCH // world_size
    data = batches(steps + warmup, BATCH)
    sampler = dist.get_sampler(data, shuffle=False) if world_size > 1 else None
    loader = torch.utils.data.DataLoader(data, batch_size=device_batch, sampler=sampler,
                                         collate_fn=torch.utils.data.default_collate)
    timer, speed = _Timer(warmup), SpeedMonitor(window_size=steps)
    fsdp = fsdp2_config(FSDPSection(), world_size) if world_size > 1 else None
    trainer = Trainer(model=model, train_dataloader=loader, max_duration=f"{steps + warmup}ba",
                      optimizers=DecoupledAdamW(model.parameters(), lr=1e-3), device="cpu", precision="fp32",
                      callbacks=[timer, speed], progress_bar=False, log_to_console=False,
                      parallelism_config={"fsdp": fsdp} if fsdp else None, seed=0)
    trainer.fit()
    tokens_per_sec = steps * BATCH * SEQ / (timer.end - timer.start)
    from llmfoundry_lite.models import MPTConfig, flops_per_token
    mfu = tokens_per_sec / world_size * flops_per_token(MPTConfig(**MODEL), SEQ) / speed.peak
    return tokens_per_sec, mfu, speed.peak


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.worker:  # one of the 2 ranks launched below
        tps, mfu, _ = composer_loop(args.steps, args.warmup, world_size=2)
        from composer.utils import dist
        if dist.get_global_rank() == 0:
            print("RESULT " + json.dumps({"tokens_per_sec": tps, "mfu": mfu}), flush=True)
        return

    plain = plain_loop(args.steps, args.warmup)
    one, mfu_one, peak = composer_loop(args.steps, args.warmup)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "composer.cli.launcher", "-n", "2", os.path.abspath(__file__),
                          "--worker", "--steps", str(args.steps), "--warmup", str(args.warmup)],
                         env=env, capture_output=True, text=True, check=True).stdout
    two = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    import composer
    print(json.dumps({
        "model": "mpt-tiny-cpu (d128 L4 H4 seq128 vocab4096)", "batch": BATCH, "steps": args.steps,
        "torch": torch.__version__, "composer": composer.__version__, "peak_flops_per_process": peak,
        "plain_pytorch_tokens_per_sec": round(plain), "composer_1proc_tokens_per_sec": round(one),
        "composer_1proc_mfu": round(mfu_one, 4), "composer_overhead_pct": round(100 * (plain / one - 1), 1),
        "composer_fsdp2_2proc_tokens_per_sec": round(two["tokens_per_sec"]), "composer_fsdp2_2proc_mfu": round(two["mfu"], 4),
    }))


if __name__ == "__main__":
    main()
