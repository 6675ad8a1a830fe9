"""Trains the tiny model once per named layout in one process group, recording for each: the loss
logged at every step (Composer's, over the global batch) and the gradient's norm (before clipping), the
token rows each rank took per step, how many blocks are activation-checkpointed, whether parameters are split across ranks, and
(rank 0) the final full weights. One launch serves every 2-rank layout.

    composer -n 2 tests/layouts_driver.py OUT DATA_ROOT TOKENIZER LAYOUT [LAYOUT ...]
    python tests/layouts_driver.py OUT DATA_ROOT TOKENIZER single single-ac ...

DATA_ROOT/<layout> is each layout's own copy of the data (streaming wants one live dataset per folder).
"""
import json
import os
import sys

import torch
from composer.core import Callback
from composer.utils import dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.tensor import DTensor

from llmfoundry_lite import registry, train
from llmfoundry_lite.training.callbacks import full_state_dict, unwrap

from train_utils import LAYOUT_STEPS, LAYOUTS, LORA_LAYOUTS, TINY_YAML, tiny_overrides


class LayoutRecorder(Callback):
    runs = {}

    def __init__(self, name: str):
        self.record = LayoutRecorder.runs.setdefault(name, {"losses": [], "rows": []})

    def after_dataloader(self, state, logger):
        self.record["rows"].append(state.batch["input_ids"].tolist())

    def after_backward(self, state, logger):  # after the last microbatch: the step's whole gradient
        norms = [g.full_tensor() if isinstance(g, DTensor) else g
                 for g in (p.grad.norm() for p in state.model.parameters() if p.grad is not None)]
        self.grad_norm = torch.stack(norms).norm().item()

    def batch_end(self, state, logger):  # the logged loss: the microbatches' sum, averaged over the ranks
        self.record["losses"].append(state.total_loss_dict["loss/train/total"])
        self.record.setdefault("grad_norms", []).append(self.grad_norm)


registry.callbacks.register("layout_recorder", LayoutRecorder)

out, data_root, tokenizer, names = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
rank = dist.get_global_rank()
os.makedirs(out, exist_ok=True)
for name in names:
    overrides = tiny_overrides(os.path.join(data_root, name), tokenizer, **{
        "max_duration": f"{LAYOUT_STEPS}ba", "global_train_batch_size": 8, "callbacks.layout_recorder.name": name,
        **{**LAYOUTS, **LORA_LAYOUTS}[name]})
    trainer = train(TINY_YAML, overrides)
    model = unwrap(trainer.state).model
    record = LayoutRecorder.runs[name]
    record["checkpointed_blocks"] = sum(isinstance(m, CheckpointWrapper) for m in model.modules())
    record["trainable"] = sorted(n.replace("._checkpoint_wrapped_module", "")  # state-dict names
                                 for n, p in model.named_parameters() if p.requires_grad)
    record["sharded"] = any(isinstance(p, DTensor) and p.to_local().shape != p.shape for p in model.parameters())
    weights = full_state_dict(model)  # every rank takes part in the gather
    with open(os.path.join(out, f"{name}.rank{rank}.json"), "w") as f:
        json.dump(record, f)
    if rank == 0:
        torch.save(weights, os.path.join(out, f"{name}.pt"))
    trainer.close()
