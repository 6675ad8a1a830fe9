"""One launch, three trainings of the same YAML, with `model.init_device` cpu, mixed and meta; for
each, every rank's peak memory growth from just before `train()` to the start of fitting (the model
built, loaded and sharded) in out/rank<N>.json, and rank 0's trained weights in out/<device>.pt.

    composer -n 2 tests/init_device_driver.py OUT_DIR YAML [key=value ...]

Peak memory is the kernel's resident high-water mark (VmHWM), reset before each run (Linux
clear_refs); launch with MALLOC_MMAP_THRESHOLD_ set so freed tensors leave the process at once.
"""
import gc
import json
import os
import sys

import torch
from composer import Callback
from composer.utils import dist

from llmfoundry_lite import registry, train
from llmfoundry_lite.training.callbacks import full_state_dict


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


class PeakAtFitStart(Callback):
    def __init__(self):
        self.peak = None

    def fit_start(self, state, logger):
        self.peak = _status_kib("VmHWM") * 1024


registry.callbacks.register("peak_at_fit_start", PeakAtFitStart)

out, yaml, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
os.makedirs(out, exist_ok=True)
growth = {}
for device in ("cpu", "mixed", "meta"):  # cpu first: its peak also takes the imports of a first run
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS") * 1024
    trainer = train(yaml, [*overrides, f"model.init_device={device}", "callbacks.peak_at_fit_start={}"])
    meter = next(cb for cb in trainer.state.callbacks if isinstance(cb, PeakAtFitStart))
    growth[device] = meter.peak - before
    weights = full_state_dict(trainer.state.model.model)  # every rank takes part in the gather
    if dist.get_global_rank() == 0:
        torch.save(weights, os.path.join(out, f"{device}.pt"))
    trainer.close()
    del trainer, meter, weights
with open(os.path.join(out, f"rank{dist.get_global_rank()}.json"), "w") as f:
    json.dump(growth, f)
