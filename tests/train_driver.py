"""`train()` as scripts/train.py runs it, then a record for the multi-process tests: each rank's local
parameter shapes (rank<N>.json) and the gathered full weights (weights.pt, rank 0). A UserError ends
it as the CLI does (its message, the CLI's exit code). With
`callbacks.sample_recorder.out=OUT_DIR`, each rank also appends the token rows of every batch it trains
to OUT_DIR/rows.jsonl (`{"step", "rank", "rows"}`): the samples a run saw, across relaunches.

    composer -n 2 tests/train_driver.py OUT_DIR YAML [key=value ...]
"""
import json
import os
import sys

import torch
from composer.core import Callback
from composer.utils import dist

from llmfoundry_lite import registry, train
from llmfoundry_lite.errors import UserError
from llmfoundry_lite.training.callbacks import full_state_dict

import fault_injection  # noqa: F401  (registers the `fault_injection` callback some tests name)


class SampleRecorder(Callback):
    def __init__(self, out: str):
        self.path = os.path.join(out, "rows.jsonl")

    def after_dataloader(self, state, logger):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": state.timestamp.batch.value, "rank": dist.get_global_rank(),
                                "rows": state.batch["input_ids"].tolist()}) + "\n")


registry.callbacks.register("sample_recorder", SampleRecorder)

out, yaml, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
try:
    trainer = train(yaml, overrides)
except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(getattr(e, "exit_code", 2))
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
