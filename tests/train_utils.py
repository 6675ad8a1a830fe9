"""Shared pieces of the training tests: a synthetic copy task as MDS shards and a tiny config."""
import os

import numpy as np

SYMBOLS = 16         # the copy task's alphabet: token ids 10..25
SEP = 3
HALF = 8             # rows are [a_1..a_8, SEP, a_1..a_8], a_i distinct: the second half is predictable
ROW = 2 * HALF + 1
# The best possible mean loss per row: a_2..a_8 are uniform over the symbols not yet used (ln 15 ..
# ln 9), everything after them is determined: ln(15!/8!) / 16 predicted positions = 1.06.
BEST_LOSS = sum(np.log(np.arange(SYMBOLS - HALF + 1, SYMBOLS))) / (ROW - 1)


def copy_rows(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    first = np.stack([rng.permutation(SYMBOLS)[:HALF] + 10 for _ in range(n)])
    return np.concatenate([first, np.full((n, 1), SEP), first], axis=1).astype(np.int32)


def write_copy_task(root: str, n_train: int = 512, n_val: int = 64) -> str:
    """MDS `tokens` shards of the copy task under root/{train,val}; returns root."""
    from streaming import MDSWriter
    for split, n, seed in (("train", n_train, 0), ("val", n_val, 1)):
        with MDSWriter(out=os.path.join(root, split), columns={"tokens": "ndarray:int32"}) as writer:
            for row in copy_rows(n, seed):
                writer.write({"tokens": row})
    return root


def tiny_overrides(data: str, tokenizer: str, **extra) -> list:
    """`key=value` overrides that shrink yamls/pretrain/mpt-tiny-cpu.yaml to a seconds-long run."""
    values = {
        "variables.data_local": data, "variables.tokenizer_name": tokenizer,
        "max_seq_len": ROW, "model.d_model": 32, "model.n_heads": 2, "model.n_layers": 2,
        "global_train_batch_size": 16, "eval_loader": "null", "callbacks.runtime_estimator": "false",
        "console_log_interval": "1000ba", "save_folder": "null", "run_name": "tiny",
        "scheduler.t_warmup": "2ba", "scheduler.t_max": "64ba",  # absolute t_max: the same lr whatever max_duration
        "python_log_level": "warning",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def read_losses(jsonl: str) -> list:
    import json
    with open(jsonl) as f:
        rows = [json.loads(line) for line in f]
    return [(r["step"], r["loss/train/total"]) for r in rows if "loss/train/total" in r]
