"""DPO vs SFT on the chosen replies only, on a synthetic preference task: held-out preference accuracy
(how often the chosen reply is the more likely one) before and after, from the same random-init MPT,
with the same steps, batch size and optimizer; one JSON line.

    python benchmarks/dpo_vs_sft.py [--seeds 5] [--steps 150] [--batch 16]     # CPU, about a minute

The task: "Name a colour that is not X or Y." (12 colours, 132 prompts). The preferred reply names one
of the 10 other colours, the rejected one X or Y: a reply of the right form, the one a model that
copies from its prompt would give. All 2,640 pairs are shuffled per seed; 256 are held out, the rest
are the training data (one pass is about 150 steps of 16). No held-out pair is a training pair, but
its prompt is some training pairs' prompt. SFT sees only what to say (a random other colour), never
what not to say: the rule is what the rejected replies add.

Per seed: a byte-level BPE (vocab 320) trained on the training text and a random-init MPT (d_model 64,
2 heads, 2 layers) are saved as an HF folder; from it `llmfoundry_lite.training.train` runs
yamls/finetune/mpt-tiny-cpu-dpo.yaml with full finetuning (`dpo`: `model.peft_config=null`, a frozen
copy of the start is the reference, beta 0.1) and yamls/finetune/mpt-tiny-cpu-sft.yaml on the rows
{prompt, response: chosen} (`sft`), whose optimizer, scheduler, gradient clipping and callbacks are
replaced by the DPO run's. Both use lr 1e-3 (the SFT YAML's; the DPO YAML's 5e-3 suits its LoRA
adapters, and in full finetuning of this model it learned the rule less reliably). Measured on the
held-out pairs with `prep.preference.score_pairs` (a reply's log-probability is the sum over its
tokens, EOS included): `accuracy` (chosen more likely than rejected), `logp_gap` (mean chosen -
rejected, nats), `logp_chosen` (mean), `reward_margin` (DPO's implicit reward margin against the start
model, beta * (gap after - gap before), mean) and `train_s` (seconds in `train`, one thread); per
figure the mean, the minimum and the per-seed values.
"""
import argparse
import json
import os
import random
import statistics
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DPO_YAML = os.path.join(ROOT, "yamls", "finetune", "mpt-tiny-cpu-dpo.yaml")
SFT_YAML = os.path.join(ROOT, "yamls", "finetune", "mpt-tiny-cpu-sft.yaml")
COLOURS = ["red", "blue", "green", "black", "white", "brown", "pink", "gold", "grey", "orange", "purple", "silver"]
MODEL = dict(d_model=64, n_heads=2, n_layers=2, max_seq_len=32)
SEQ, LR, N_TEST = 32, 1e-3, 256
TASK = "name a colour that is not X or Y"


def task(seed: int):
    """(training, held-out) pairs: every pair of the task, shuffled and split."""
    pairs = [{"prompt": f"Name a colour that is not {x} or {y}.", "chosen": f" {other}.", "rejected": f" {bad}."}
             for x in COLOURS for y in COLOURS if x != y
             for other in COLOURS if other not in (x, y) for bad in (x, y)]
    random.Random(seed).shuffle(pairs)
    return pairs[N_TEST:], pairs[:N_TEST]


def write_jsonl(folder: str, rows) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "train.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return folder


def save_start(folder: str, seed: int, train_pairs) -> str:
    """A random-init MPT and a BPE trained on the task's text, as an HF folder both YAMLs start from."""
    from llmfoundry_lite.models import MPTConfig, MPTForCausalLM
    from llmfoundry_lite.prep.tokenizer import train_tokenizer
    corpus = os.path.join(folder, "corpus.txt")
    with open(corpus, "w") as f:
        f.writelines(f"{p['prompt']}{p['chosen']}{p['rejected']}\n" for p in train_pairs)
    hf = os.path.join(folder, "hf")
    tok = train_tokenizer([corpus], hf, vocab_size=320, model_max_length=SEQ)
    torch.manual_seed(seed)
    MPTForCausalLM(MPTConfig(**MODEL, vocab_size=len(tok))).save_pretrained(hf)
    return hf


def configs(hf: str, dpo_data: str, sft_data: str, seed: int, steps: int, batch: int) -> dict:
    """The `dpo` and `sft` training configs, from the two YAMLs; SFT gets DPO's optimizer, schedule,
    gradient clipping and callbacks."""
    from llmfoundry_lite.config import load_config
    common = [f"variables.model_name_or_path={hf}", f"max_seq_len={SEQ}", f"max_duration={steps}ba",
              f"global_train_batch_size={batch}", f"seed={seed}", f"optimizer.lr={LR}", "save_folder=null",
              "log_to_console=false", "python_log_level=warning"]
    dpo = load_config(DPO_YAML, common + [f"variables.dpo_data={dpo_data}", "model.peft_config=null"])
    sft = load_config(SFT_YAML, common + [f"variables.sft_data={sft_data}"])
    del dpo["callbacks"]["speed_monitor"]  # it prints a table of peak FLOP/s per run
    sft.update({k: dpo[k] for k in ("optimizer", "scheduler", "algorithms", "callbacks")})
    return {"dpo": dpo, "sft": sft}


def figures(logps: torch.Tensor, start=None, beta: float = 0.0) -> dict:
    """Held-out figures from a model's [pairs, (chosen, rejected)] log-probabilities; `start`: the start
    model's."""
    chosen, rejected = logps.unbind(1)
    gap = chosen - rejected
    out = {"accuracy": (gap > 0).float().mean().item(), "logp_gap": gap.mean().item(),
           "logp_chosen": chosen.mean().item()}
    if start is not None:
        out["reward_margin"] = beta * (gap - (start[:, 0] - start[:, 1])).mean().item()
    return out


def run_seed(seed: int, steps: int, batch: int) -> dict:
    """The start model's held-out figures and each method's after training (with its seconds)."""
    from transformers import AutoTokenizer

    from llmfoundry_lite import train
    from llmfoundry_lite.data.preference import PreferenceDataset
    from llmfoundry_lite.models import MPTForCausalLM
    from llmfoundry_lite.prep.preference import score_pairs
    train_pairs, test_pairs = task(seed)
    with tempfile.TemporaryDirectory() as tmp:
        hf = save_start(tmp, seed, train_pairs)
        dpo_data = write_jsonl(os.path.join(tmp, "dpo"), train_pairs)
        sft_data = write_jsonl(os.path.join(tmp, "sft"), [{"prompt": p["prompt"], "response": p["chosen"]}
                                                          for p in train_pairs])
        tok = AutoTokenizer.from_pretrained(hf)
        held_out = PreferenceDataset(test_pairs, tok, SEQ)
        start = score_pairs(MPTForCausalLM.from_pretrained(hf), held_out, tok.pad_token_id)
        result = {"start": figures(start)}
        cfgs = configs(hf, dpo_data, sft_data, seed, steps, batch)
        beta = cfgs["dpo"]["model"]["dpo"]["beta"]
        for method, cfg in cfgs.items():
            began = time.perf_counter()
            trainer = train(cfg)
            seconds = time.perf_counter() - began
            trainer.close()
            after = score_pairs(trainer.state.model.model, held_out, tok.pad_token_id)
            result[method] = {**figures(after, start, beta), "train_s": seconds}
    return result


def compare(seeds, steps: int = 150, batch: int = 16) -> dict:
    """The JSON the script prints: per method, each figure's mean, min and per-seed values."""
    torch.set_num_threads(1)
    runs = [run_seed(s, steps, batch) for s in seeds]
    out = {"task": TASK, "model": MODEL, "seq": SEQ, "lr": LR, "seeds": list(seeds), "steps": steps,
           "batch_pairs": batch, "held_out_pairs": N_TEST, "threads": 1, "torch": torch.__version__}
    for method in runs[0]:
        for key in runs[0][method]:
            values = [r[method][key] for r in runs]
            out.setdefault(method, {})[key] = {"mean": round(statistics.mean(values), 4), "min": round(min(values), 4),
                                               "per_seed": [round(v, 4) for v in values]}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=16, help="pairs per step (SFT: chosen replies per step)")
    args = parser.parse_args()
    print(json.dumps(compare(range(args.seeds), args.steps, args.batch)))


if __name__ == "__main__":
    main()
