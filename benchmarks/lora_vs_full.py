"""LoRA vs full finetuning on the same MPT and batches: optimizer-state and gradient bytes, peak memory,
step time; one JSON line with both and their ratios (LoRA / full).

    python benchmarks/lora_vs_full.py [--steps 8] [--rounds 2] [--r 8]     # CPU, or the GPU when there is one

The model: d_model 512, 8 heads, 4 layers, expansion 4, seq 128, a 4096-token vocabulary, ALiBi, fp32
(bf16 autocast on a GPU); a batch of 4 random token rows. LoRA: peft's adapters (our `apply_lora`, as
`model.peft_config` builds them) of rank r on Wqkv, out_proj, up_proj and down_proj, lora_alpha 2r;
the optimizer (DecoupledAdamW, as the YAMLs use) gets the trainable parameters only, as `train()` does.
Each mode runs in its own process (peak memory is per process: peak RSS on CPU, Python and torch
included, so the same in both, and `torch.cuda.max_memory_allocated` on a GPU; `training_peak_mib` is
that peak less the one before the first step, with the model built), one thread each;
full, lora, full, lora... alternate `--rounds` times so both see the same machine load, and the step
time of a mode is the median over its rounds of each round's median step.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

VOCAB, SEQ, BATCH = 4096, 128, 4
MODEL = dict(d_model=512, n_heads=8, n_layers=4, expansion_ratio=4, max_seq_len=SEQ, vocab_size=VOCAB,
             attn_config={"attn_impl": "torch", "alibi": True}, no_bias=True)


def peak_memory_mib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB -> MiB


def measure(mode: str, steps: int, warmup: int, r: int) -> dict:
    """One mode in this process: bytes of optimizer state and gradients, peak memory, step times."""
    from composer.optim import DecoupledAdamW

    from llmfoundry_lite.assembly.lora import apply_lora
    from llmfoundry_lite.models import MPTConfig, MPTForCausalLM
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = MPTForCausalLM(MPTConfig(**MODEL)).to(device)
    if mode == "lora":
        model = apply_lora(model, {"r": r, "lora_alpha": 2 * r})
    params = [p for p in model.parameters() if p.requires_grad]
    opt = DecoupledAdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, VOCAB, (BATCH, SEQ), generator=g).to(device) for _ in range(warmup + steps)]
    before = peak_memory_mib(device)  # the model built: Python, torch, weights
    times = []
    for i, ids in enumerate(batches):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grad_bytes = sum(p.grad.nbytes for p in params if p.grad is not None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    state_bytes = sum(t.nbytes for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return {"mode": mode, "device": device.type, "trainable_params": sum(p.numel() for p in params),
            "total_params": sum(p.numel() for p in model.parameters()), "optimizer_state_bytes": state_bytes,
            "gradient_bytes": grad_bytes, "peak_memory_mib": round(peak_memory_mib(device), 1),
            "training_peak_mib": round(peak_memory_mib(device) - before, 1),
            "step_s_median": statistics.median(times), "step_s": [round(t, 4) for t in times]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="processes per mode, alternating")
    parser.add_argument("--r", type=int, default=8, help="LoRA rank")
    parser.add_argument("--child", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.steps, args.warmup, args.r)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    runs = {"full": [], "lora": []}
    for _ in range(args.rounds):
        for mode in ("full", "lora"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, f"--steps={args.steps}",
                                  f"--warmup={args.warmup}", f"--r={args.r}"],
                                 env=env, capture_output=True, text=True, check=True).stdout
            runs[mode].append(json.loads(out.strip().splitlines()[-1]))
    result = {"model": {k: MODEL[k] for k in ("d_model", "n_heads", "n_layers", "vocab_size")}, "seq": SEQ,
              "batch": BATCH, "r": args.r, "lora_alpha": 2 * args.r, "device": runs["full"][0]["device"],
              "threads": 1, "steps": args.steps, "rounds": args.rounds, "torch": torch.__version__}
    for mode, rows in runs.items():
        result[mode] = {**{k: rows[0][k] for k in ("trainable_params", "total_params", "optimizer_state_bytes",
                                                   "gradient_bytes")},
                        "peak_memory_mib": max(r["peak_memory_mib"] for r in rows),
                        "training_peak_mib": max(r["training_peak_mib"] for r in rows),
                        "step_s": round(statistics.median(r["step_s_median"] for r in rows), 4),
                        "step_s_per_round": [round(r["step_s_median"], 4) for r in rows]}
    full, lora = result["full"], result["lora"]
    result["ratios_lora_over_full"] = {
        "optimizer_state_bytes": round(lora["optimizer_state_bytes"] / full["optimizer_state_bytes"], 5),
        "gradient_bytes": round(lora["gradient_bytes"] / full["gradient_bytes"], 5),
        "trainable_params": round(lora["trainable_params"] / full["trainable_params"], 5),
        "peak_memory": round(lora["peak_memory_mib"] / full["peak_memory_mib"], 3),
        "training_peak_memory": round(lora["training_peak_mib"] / full["training_peak_mib"], 3),
        "step_time": round(lora["step_s"] / full["step_s"], 3)}
    result["goals"] = {"optimizer_state_at_most_2pct": result["ratios_lora_over_full"]["optimizer_state_bytes"] <= 0.02,
                       "step_time_no_worse": result["ratios_lora_over_full"]["step_time"] <= 1.0}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
