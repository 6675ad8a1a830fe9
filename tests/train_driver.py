"""`train()` as scripts/train.py runs it, then a record for the multi-process tests: each rank's local
parameter shapes (rank<N>.json) and the gathered full weights (weights.pt, rank 0).

    composer -n 2 tests/train_driver.py OUT_DIR YAML [key=value ...]
"""
import json
import os
import sys

import torch
from composer.utils import dist

from llmfoundry_lite import train
from llmfoundry_lite.training.callbacks import full_state_dict

import fault_injection  # noqa: F401  (registers the `fault_injection` callback some tests name)

out, yaml, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
trainer = train(yaml, overrides)
model = trainer.state.model.model
local = {n: list((p.to_local() if hasattr(p, "to_local") else p).shape) for n, p in model.named_parameters()}
full = {n: list(p.shape) for n, p in model.named_parameters()}
weights = full_state_dict(model)  # every rank takes part in the gather
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, f"rank{dist.get_global_rank()}.json"), "w") as f:
    json.dump({"local": local, "full": full, "batches": trainer.state.timestamp.batch.value}, f)
if dist.get_global_rank() == 0:
    torch.save(weights, os.path.join(out, "weights.pt"))
trainer.close()
