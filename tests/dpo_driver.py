"""Trains DPO runs of yamls/finetune/mpt-tiny-cpu-dpo.yaml one after another in one process group and
records for each run, per rank (<run>.rank<N>.json): the loss logged at every step (Composer's, over the
global batch), the DPO train metrics at the end, and the frozen reference copy's parameters (DTensors or
not, full and local shapes, a checksum of this rank's part); rank 0 saves the gathered final weights of
the policy (<run>.pt) and of the frozen copy (<run>.ref.pt).

    composer -n 2 tests/dpo_driver.py OUT RUNS.json RUN [RUN ...]
    python tests/dpo_driver.py OUT RUNS.json RUN [RUN ...]

RUNS.json maps each run's name to its `key=value` overrides of the YAML.
"""
import json
import os
import sys

import torch
from composer.core import Callback
from composer.utils import dist
from torch.distributed.tensor import DTensor

from llmfoundry_lite import registry, train
from llmfoundry_lite.training.callbacks import full_state_dict, unwrap

import fault_injection  # noqa: F401  (registers the `fault_injection` callback the kill test names)
from train_utils import ROOT

YAML = os.path.join(ROOT, "yamls", "finetune", "mpt-tiny-cpu-dpo.yaml")


class LossRecorder(Callback):
    losses = []

    def batch_end(self, state, logger):  # the logged loss: the microbatches' sum, averaged over the ranks
        LossRecorder.losses.append(state.total_loss_dict["loss/train/total"])


registry.callbacks.register("loss_recorder", LossRecorder)

out, runs, names = sys.argv[1], json.load(open(sys.argv[2])), sys.argv[3:]
rank = dist.get_global_rank()
os.makedirs(out, exist_ok=True)
for name in names:
    LossRecorder.losses = []
    trainer = train(YAML, [*runs[name], "callbacks.loss_recorder={}"])
    model = unwrap(trainer.state)
    metrics = {k: v.compute().item() for k, v in trainer.state.train_metrics.items()}  # every rank: a collective
    record = {"losses": LossRecorder.losses, "metrics": metrics, "batches": trainer.state.timestamp.batch.value}
    weights = full_state_dict(model.model)  # every rank takes part in the gathers
    if model._frozen:
        ref = model._frozen[0]
        local = {n: (p.to_local() if isinstance(p, DTensor) else p) for n, p in ref.named_parameters()}
        record["frozen"] = {"dtensor": all(isinstance(p, DTensor) for p in ref.parameters()),
                            "full": {n: list(p.shape) for n, p in ref.named_parameters()},
                            "local": {n: list(t.shape) for n, t in local.items()},
                            "checksum": sum(t.double().sum().item() for t in local.values())}
        ref_weights = full_state_dict(ref)
        if rank == 0:
            torch.save(ref_weights, os.path.join(out, f"{name}.ref.pt"))
    with open(os.path.join(out, f"{name}.rank{rank}.json"), "w") as f:
        json.dump(record, f)
    if rank == 0:
        torch.save(weights, os.path.join(out, f"{name}.pt"))
    trainer.close()
