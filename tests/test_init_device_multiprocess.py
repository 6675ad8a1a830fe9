"""`init_device: mixed` and `meta` with a pretrained folder on 2 ranks (FSDP2 over gloo): global rank 0
reads the weights (mixed) or every rank reads its shard's (meta), the other ranks never hold the whole
model, and training ends with the weights of an `init_device: cpu` run. One launch runs all three."""
import json
import os

import pytest
import torch
import yaml

from llmfoundry_lite.config import load_config
from llmfoundry_lite.models import MPTConfig, MPTForCausalLM

from train_utils import ROOT, TINY_YAML, launch, tiny_overrides

pytestmark = pytest.mark.multiprocess
DRIVER = os.path.join(ROOT, "tests", "init_device_driver.py")
# many equal blocks, so that one block is small beside half the model: 24 x 3.1 MB, 76 MB in all
MODEL = dict(d_model=256, n_heads=4, n_layers=24, max_seq_len=17, vocab_size=448)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("init_device")
    torch.manual_seed(0)
    model = MPTForCausalLM(MPTConfig(**MODEL))
    model.save_pretrained(root / "hf")
    with open(root / "sft.jsonl", "w") as f:  # finetuning data: a map-style dataset, three runs in one process
        f.writelines(json.dumps({"prompt": f"{i} plus {i} is", "response": f" {2 * i}"}) + "\n" for i in range(16))
    cfg = load_config(TINY_YAML, tiny_overrides(str(root), tiny_tokenizer_dir, max_duration="2ba",
                                                global_train_batch_size=4, **{"scheduler.t_warmup": "0ba"}))
    cfg["model"] = {"name": "hf_causal_lm", "pretrained_model_name_or_path": str(root / "hf")}
    cfg["train_loader"] = {"name": "finetuning", "dataset": {"hf_name": str(root / "sft.jsonl"), "max_seq_len": 17,
                                                             "shuffle": False}, "drop_last": True}
    with open(root / "train.yaml", "w") as f:
        yaml.safe_dump(cfg, f)
    out = str(root / "out")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # freed tensors go back to the kernel: clean peaks per run
    try:
        launch([DRIVER, out, str(root / "train.yaml")], out)
    finally:
        del os.environ["MALLOC_MMAP_THRESHOLD_"]
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return out, model_bytes, [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in (0, 1)]


def test_mixed_and_meta_train_to_the_weights_of_a_cpu_load(run):
    out = run[0]
    cpu, mixed, meta = (torch.load(os.path.join(out, f"{d}.pt")) for d in ("cpu", "mixed", "meta"))
    start = MPTForCausalLM.from_pretrained(os.path.join(os.path.dirname(out), "hf")).state_dict()
    assert cpu.keys() == mixed.keys() == meta.keys()
    assert not torch.equal(cpu["transformer.blocks.0.attn.Wqkv.weight"], start["transformer.blocks.0.attn.Wqkv.weight"])
    for k in cpu:
        assert torch.equal(mixed[k], cpu[k]) and torch.equal(meta[k], cpu[k]), k


def test_only_rank_0_holds_the_whole_model_under_mixed(run):
    """Peak memory growth up to the start of fitting: a rank that read the whole model grew by at least
    its size (cpu: both ranks; mixed: rank 0, which shows the measure sees a whole model); one that did
    not holds half the model plus the tensor being received or read (mixed: rank 1; meta: both)."""
    _, size, (rank0, rank1) = run
    assert rank0["cpu"] > size and rank1["cpu"] > size, (size, rank0, rank1)
    assert rank0["mixed"] > size, (size, rank0)
    for peak in (rank1["mixed"], rank0["meta"], rank1["meta"]):
        assert peak < 0.75 * size, (size, rank0, rank1)
