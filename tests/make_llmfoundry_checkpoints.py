"""Writes tests/fixtures/llmfoundry_run/: Composer checkpoints that llm-foundry's own training wrote.

Run it with llm-foundry installed in a throwaway venv (never a dependency of this project; the tests
only read what this writes):

    python3 -m venv /tmp/lf && /tmp/lf/bin/pip install "llm-foundry==0.22.*"
    /tmp/lf/bin/python tests/make_llmfoundry_checkpoints.py

What it writes, all from `llmfoundry.command_utils.train` with `train.yaml` (an llm-foundry YAML):
- tokenizer/ and data/train/ (MDS `tokens` as `ndarray:int32`, as llm-foundry's convert_dataset_hf
  writes them) that the run reads;
- full/ep0-ba2-rank0.pt: one process, 2 batches, a full checkpoint with optimizer state;
- sharded/ep0-ba2/: the same run on 2 CPU ranks under FSDP2 (`composer -n 2`, FSDP_VERSION=2) with
  `state_dict_type: sharded`: a DCP folder;
- expected.safetensors: input ids and llm-foundry's fp32 logits of the model in each checkpoint
  (`full`, `sharded`), after 4 batches of the same run straight through (`straight4`: resuming
  either checkpoint for 2 more batches must land there), and after 2 batches from the full
  checkpoint's weights alone (`weights_only2`: `load_weights_only`, a fresh optimizer and schedule).
"""
import copy
import json
import os
import subprocess
import sys

import numpy as np
import torch
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "fixtures", "llmfoundry_run")
VOCAB = 64
SEQ = 16
WORDS = [f"w{i}" for i in range(VOCAB - 2)]  # ids 2..63; 0 is <|endoftext|> (eos and pad), 1 <unk>
IDS = torch.tensor([[5, 9, 17, 33, 2, 60, 41, 8, 8, 23, 50, 12], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])


def write_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                            unk_token="<unk>", model_max_length=SEQ).save_pretrained(folder)


def write_data(folder):
    from streaming import MDSWriter

    rng = np.random.default_rng(0)
    with MDSWriter(out=folder, columns={"tokens": "ndarray:int32"}, size_limit=1 << 20) as out:
        for _ in range(32):  # never 0 (pad): llm-foundry's collator would mask it out of the labels
            out.write({"tokens": rng.integers(2, VOCAB, SEQ, dtype=np.int32)})


def config(max_duration, save_folder=None, sharded=False):
    with open(os.path.join(OUT, "train.yaml")) as f:
        cfg = yaml.safe_load(f)
    cfg["max_duration"] = max_duration
    if save_folder:
        cfg.update(save_folder=save_folder, save_interval=max_duration)  # relative to OUT
    if sharded:
        cfg["fsdp_config"] = {"state_dict_type": "sharded"}
    return cfg


def logits_of(model):
    """fp32 logits of the (unwrapped, full) llm-foundry model for IDS."""
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits.float().clone()


def run(cfg):
    from llmfoundry.command_utils import train
    from omegaconf import OmegaConf
    return train(OmegaConf.create(copy.deepcopy(cfg)))


def sharded_rank():
    """Under `composer -n 2`: train sharded, then rank 0 saves the full model's logits."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    os.chdir(OUT)
    trainer = run(config("2ba", "sharded", sharded=True))
    full = get_model_state_dict(trainer.state.model.model, options=StateDictOptions(full_state_dict=True,
                                                                                       cpu_offload=True))
    if torch.distributed.get_rank() == 0:
        from llmfoundry.models.mpt import MPTForCausalLM
        model = MPTForCausalLM(trainer.state.model.model.config)
        model.load_state_dict(full)
        torch.save(logits_of(model), os.path.join(OUT, "sharded_logits.pt"))


def main():
    from safetensors.torch import save_file
    for sub in ("full", "sharded", "data"):
        subprocess.run(["rm", "-rf", os.path.join(OUT, sub)], check=True)
    write_tokenizer(os.path.join(OUT, "tokenizer"))
    write_data(os.path.join(OUT, "data", "train"))
    os.chdir(OUT)  # the YAML's paths are relative to it
    full = logits_of(run(config("2ba", "full")).state.model.model)
    straight = logits_of(run(config("4ba")).state.model.model)
    weights_only = logits_of(run({**config("2ba"), "load_path": "full/ep0-ba2-rank0.pt",
                                  "load_weights_only": True}).state.model.model)
    env = {**os.environ, "FSDP_VERSION": "2", "OMP_NUM_THREADS": "1"}
    subprocess.run([os.path.join(os.path.dirname(sys.executable), "composer"), "-n", "2", __file__, "sharded"],
                   env=env, check=True)
    sharded = torch.load(os.path.join(OUT, "sharded_logits.pt"))
    os.remove(os.path.join(OUT, "sharded_logits.pt"))
    os.remove(os.path.join(OUT, "full", "latest-rank0.pt"))  # symlinks do not survive every checkout
    os.remove(os.path.join(OUT, "sharded", "latest-sharded-rank0"))  # llm-foundry names it so when sharded
    save_file({"input_ids": IDS, "full": full, "sharded": sharded, "straight4": straight,
               "weights_only2": weights_only},
              os.path.join(OUT, "expected.safetensors"))
    print(json.dumps({"full_vs_sharded_max_diff": (full - sharded).abs().max().item()}))


if __name__ == "__main__":
    sharded_rank() if sys.argv[1:] == ["sharded"] else main()
