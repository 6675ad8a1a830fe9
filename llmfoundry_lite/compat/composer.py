"""Composer 0.32: its private helpers we use and the places we patch it. Each shim says why and how we
would know it can go."""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional
from unittest import mock

from composer.distributed import prepare_distributed
from composer.models import huggingface
from composer.optim.scheduler import _convert_time
from composer.utils.parallelism import FSDP2Config
from torch.distributed.checkpoint import DefaultLoadPlanner

# Composer 0.32 has no public way to turn a scheduler's Time (or time string) into the unit of the
# run's duration; its own schedulers use this private helper. Goes when Composer exposes one.
convert_time = _convert_time


@dataclasses.dataclass
class MeshFSDP2Config(FSDP2Config):
    """Composer 0.32 builds the FSDP2 device mesh from these two degrees, which its FSDP2Config fixes at
    (None, -1) with read-only properties, and overwrites any `device_mesh` given: HYBRID_SHARD would
    silently be FULL_SHARD. These fields shadow the properties. Goes when FSDP2Config takes the degrees.

    `load_planner`: sharded checkpoints load without the entries this run has and the checkpoint lacks
    (newer torch adds state, e.g. LambdaLR's `_is_initial`; llm-foundry saves another HF config); the
    weights and the optimizer's state are checked up front instead (`check_resumable`). Composer's
    is None: DCP's strict default."""
    data_parallel_replicate_degree: Optional[int] = None
    data_parallel_shard_degree: int = -1

    @property
    def load_planner(self):
        return DefaultLoadPlanner(allow_partial_load=True)


def meta_init_by(init: Callable, device: str):
    """While active, Composer's FSDP2 initialises meta-built models with `init(module, device=device)`:
    Composer 0.32's own `meta_init` materialises on CUDA only and cannot initialise sliced DTensors.
    Goes when Composer's runs on CPU and calls the model's `param_init_fn` per module on full tensors."""
    return mock.patch.object(prepare_distributed, "meta_init", functools.partial(init, device=device))


def causal_lm_known():
    """While active, Composer's `HuggingFaceModel` takes every model for a causal LM (ours are): Composer
    0.32 asks `huggingface._is_registered_causal_lm`, which imports every causal-LM class transformers
    has (seconds per process, tens under load). Goes when that helper no longer imports them (a
    `HuggingFaceModel` then builds in well under a second without it)."""
    return mock.patch.object(huggingface, "_is_registered_causal_lm", lambda model: True)


def give_wandb_runs_get_url() -> None:
    """Composer 0.32's WandBLogger calls `Run.get_url()`, which wandb 0.31 replaced by the `Run.url`
    property: add the method where it is missing (on wandb's class, process-wide). Goes when Composer
    reads `run.url`."""
    from wandb.sdk.wandb_run import Run  # lazy: wandb loads only when a run logs to it
    if not hasattr(Run, "get_url"):
        Run.get_url = lambda run: run.url
