"""Shared pieces of the training tests: a synthetic copy task as MDS shards, a tiny config, and
`composer -n 2` launches."""
import glob
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(ROOT, "yamls", "pretrain", "mpt-tiny-cpu.yaml")
DRIVER = os.path.join(ROOT, "tests", "train_driver.py")

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


def resize_overrides(data, tok, run_dir, duration, **extra):
    """A run of the tiny model that checkpoints (sharded) every 2 batches and records its losses and samples
    in run_dir, for relaunches on other layouts."""
    return tiny_overrides(data, tok, **{
        "max_duration": duration, "global_train_batch_size": 8, "run_name": "r",
        "save_folder": os.path.join(run_dir, "ckpt"), "save_interval": "2ba", "save_num_checkpoints_to_keep": -1,
        "fsdp_config.state_dict_type": "sharded", "model.init_device": "meta", "python_log_level": "info",
        "loggers.jsonl.path": os.path.join(run_dir, "metrics.jsonl"),
        "callbacks.sample_recorder.out": run_dir, **extra})


# Both runs sum the same float32 numbers in another order (one process adds 8 rows' losses and gradients
# at once, two add 4 each and then average): losses and weights differ by a few float32 ulps.
TOLERANCE = 1e-5


def samples(run_dir) -> dict:
    """step -> the sorted token rows every rank trained on at that step (the copy task's rows are distinct)."""
    import collections
    import json
    steps = collections.defaultdict(list)
    with open(os.path.join(run_dir, "rows.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            steps[record["step"]] += [tuple(row) for row in record["rows"]]
    return {step: sorted(rows) for step, rows in steps.items()}


def fresh_copy(data: str, tmp_path, name: str) -> str:
    """Each run reads its own copy: streaming refuses two live datasets on one local folder."""
    import shutil
    dst = str(tmp_path / name)
    shutil.copytree(data, dst)
    return dst


def run(*overrides):
    """`train(TINY_YAML, overrides)`, closed; returns the Trainer."""
    from llmfoundry_lite import train
    trainer = train(TINY_YAML, list(overrides))
    trainer.close()
    return trainer


def read_losses(jsonl: str) -> list:
    import json
    with open(jsonl) as f:
        rows = [json.loads(line) for line in f]
    return [(r["step"], r["loss/train/total"]) for r in rows if "loss/train/total" in r]


def launch(script_args, log_dir, fault=None, fails=None, prefix=(), nproc=2, torchrun=None):
    """`composer -n 2 ...` with the ranks' output in log_dir/{out,err}{rank}.txt (shown when a run fails).

    `fault` sets LLMF_FAULT (see fault_injection.py): the launch must then fail (or as `fails` says).
    `prefix` runs the launcher through another command (tests/mounts.py). `nproc` processes; `torchrun`
    (a list of its options, e.g. ["--max-restarts", "1"]) launches with `torchrun --standalone` instead,
    every rank's output in the launcher's. Returns the launcher's output, which includes rank 0's (the
    `composer` launcher does not redirect local rank 0)."""
    path = [ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    env.pop("LLMF_FAULT", None)
    if fault:
        env["LLMF_FAULT"] = fault
    os.makedirs(log_dir, exist_ok=True)
    if torchrun is not None:
        cmd = [*prefix, sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               *torchrun, *script_args]
    else:
        cmd = [*prefix, sys.executable, "-m", "composer.cli.launcher", "-n", str(nproc),
               "--stdout", os.path.join(log_dir, "out{rank}.txt"), "--stderr", os.path.join(log_dir, "err{rank}.txt"),
               *script_args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    logs = "".join(open(p).read()[-3000:] for p in sorted(glob.glob(os.path.join(log_dir, "*.txt"))))
    fails = bool(fault) if fails is None else fails
    if bool(proc.returncode) != fails:
        pytest.fail(f"launch {'succeeded despite' if fails else 'failed'} ({proc.returncode}) {fault or ''}:\n"
                    f"{proc.stderr[-3000:]}\n{logs}")
    return proc.stdout + proc.stderr


def mosaicml_hub_folder(folder, max_seq_len=32, vocab_size=96):
    """A stock model saved as on the hub for mosaicml/mpt-7b (custom code, auto_map, triton attn_impl,
    init_device, verbose) with the weights as sharded pytorch_model-*.bin and their index."""
    import json

    import torch
    from transformers import MptConfig, MptForCausalLM
    torch.manual_seed(0)
    stock = MptForCausalLM(MptConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=max_seq_len,
                                     vocab_size=vocab_size)).eval()
    config = {
        "architectures": ["MPTForCausalLM"], "model_type": "mpt",
        "auto_map": {"AutoConfig": "configuration_mpt.MPTConfig", "AutoModelForCausalLM": "modeling_mpt.MPTForCausalLM"},
        "attn_config": {"alibi": True, "alibi_bias_max": 8, "attn_impl": "triton", "attn_pdrop": 0,
                        "attn_type": "multihead_attention", "attn_uses_sequence_id": False, "clip_qkv": None,
                        "prefix_lm": False, "qk_ln": False, "softmax_scale": None},
        "init_config": {"emb_init_std": None, "emb_init_uniform_lim": None, "fan_mode": "fan_in",
                        "init_div_is_residual": True, "init_gain": 0, "init_nonlinearity": "relu",
                        "init_std": 0.02, "name": "kaiming_normal_", "verbose": 0},
        "d_model": 32, "emb_pdrop": 0, "embedding_fraction": 1.0, "expansion_ratio": 4, "init_device": "cpu",
        "learned_pos_emb": True, "logit_scale": None, "max_seq_len": max_seq_len, "n_heads": 4, "n_layers": 2,
        "no_bias": True, "norm_type": "low_precision_layernorm", "resid_pdrop": 0,
        "tokenizer_name": "EleutherAI/gpt-neox-20b", "torch_dtype": "float32", "transformers_version": "4.28.1",
        "use_cache": False, "verbose": 0, "vocab_size": vocab_size,
    }
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    sd = {k: v for k, v in stock.state_dict().items() if k != "lm_head.weight"}
    names = sorted(sd)
    halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for file, keys in halves.items():
        torch.save({k: sd[k] for k in keys}, os.path.join(folder, file))
    with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": {k: f for f, ks in halves.items() for k in ks}}, f)
    return stock


# ---- parallel layouts (tests/test_parallel_layouts.py) -------------------------------------------
# name -> overrides on top of `tiny_overrides`; "single*" run in one process, the others on 2 ranks.
_AC = {"fsdp_config.activation_checkpointing": "true"}
_HYBRID_2X1 = {"fsdp_config.sharding_strategy": "HYBRID_SHARD", "fsdp_config.data_parallel_replicate_degree": 2,
               "fsdp_config.data_parallel_shard_degree": 1}
LAYOUTS = {
    "single": {}, "single-ac": _AC, "single-mb": {"device_train_microbatch_size": 2},
    "ddp": {"fsdp_config.sharding_strategy": "NO_SHARD"},
    "ddp-ac": {"fsdp_config.sharding_strategy": "NO_SHARD", **_AC},
    "full_shard": {}, "full_shard-ac": _AC, "full_shard-mb": {"device_train_microbatch_size": 2},
    "shard_grad_op": {"fsdp_config.sharding_strategy": "SHARD_GRAD_OP"},
    "shard_grad_op-ac": {"fsdp_config.sharding_strategy": "SHARD_GRAD_OP", **_AC},
    "hybrid_2x1": _HYBRID_2X1, "hybrid_2x1-ac": {**_HYBRID_2X1, **_AC},
}
LAYOUT_STEPS = 8
# LoRA (tests/test_lora_multiprocess.py): frozen base weights and trainable adapters in one FSDP2 unit
_LORA = {"model.peft_config.r": 4, "model.peft_config.lora_alpha": 8}
_META = {"model.init_device": "meta"}
LORA_LAYOUTS = {
    "lora-single": _LORA, "lora-single-meta": {**_LORA, **_META},
    "lora-ddp": {**_LORA, "fsdp_config.sharding_strategy": "NO_SHARD"},
    "lora-full_shard-meta-ac": {**_LORA, **_META, **_AC},
    "lora-shard_grad_op": {**_LORA, "fsdp_config.sharding_strategy": "SHARD_GRAD_OP"},
    "lora-full_shard-mixed": {**_LORA, "model.init_device": "mixed"},  # rank 0's weights, broadcast
}


def run_layouts(root, tokenizer: str, single: list, ranked: list) -> dict:
    """tests/layouts_driver.py over `single` layouts in one process and `ranked` ones in one `composer
    -n 2` launch, each on its own copy of the copy task; name -> (each rank's record, final weights)."""
    import json
    import shutil

    import torch
    driver = os.path.join(ROOT, "tests", "layouts_driver.py")
    base = write_copy_task(str(root / "base"))
    for name in [*single, *ranked]:
        shutil.copytree(base, root / "data" / name)
    out = str(root / "out")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, driver, out, str(root / "data"), tokenizer, *single], env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    launch([driver, out, str(root / "data"), tokenizer, *ranked], str(root / "logs"))

    def load(name):
        ranks = [json.load(open(os.path.join(out, f"{name}.rank{r}.json"))) for r in range(1 if name in single else 2)]
        return ranks, torch.load(os.path.join(out, f"{name}.pt"))
    return {name: load(name) for name in [*single, *ranked]}


def stand_in_folders(root: str, splits=(), folders=()) -> str:
    """Empty MDS splits (an index.json) and plain folders under `root`, so a config check that looks
    for the paths a YAML names passes without real data."""
    import json
    for split in splits:
        os.makedirs(os.path.join(root, split), exist_ok=True)
        with open(os.path.join(root, split, "index.json"), "w") as f:
            json.dump({"version": 2, "shards": []}, f)
    for folder in folders:
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    return root
