"""torch: shims over torch internals and the differences between torch 2.7 (pinned by Composer 0.32)
and today's (up to 2.14). Each says which version needs it and how we would know it can go."""
from __future__ import annotations

import inspect

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_collectives import _get_gradient_divide_factors
from torch.distributed.tensor import DTensor

# torch 2.7: FSDP2's HYBRID_SHARD averages gradients across replicas with `ReduceOp.AVG`, which gloo
# lacks, and waits on CPU stream events that do not exist, so HSDP cannot train on CPU. Later releases
# (their divide-factor helper takes `force_sum_reduction_for_comms`) run it; torch 2.14 is tested.
FSDP2_HSDP_ON_CPU = "force_sum_reduction_for_comms" in inspect.signature(_get_gradient_divide_factors).parameters

# `apply_activation_checkpointing` (imported above) lives in a private torch module, unchanged from 2.7
# to 2.14; it is the wrapper Composer's FSDP2 path uses. The day it moves, the import above fails.
__all__ = ["FSDP2_HSDP_ON_CPU", "apply_activation_checkpointing", "average_gradients_on_gloo"]


def average_gradients_on_gloo(model: torch.nn.Module) -> None:
    """torch 2.7: FSDP2 averages gradients across its shards with a reduce-scatter of `ReduceOp.AVG`,
    which gloo (CPU) silently computes as a sum: every gradient would be the number of shards times
    too large (Adam hides it, gradient clipping and SGD do not). One probe of the shard group tells;
    where it sums, FSDP2's all-reduce hook divides each reduce-scatter output, before it is accumulated
    into the sharded gradient. It can go when the probe finds a true average on the oldest torch we run."""
    sharded = [p for p in model.parameters() if isinstance(p, DTensor)]
    if not sharded:
        return
    mesh = sharded[0].device_mesh
    group = mesh.get_group(mesh.ndim - 1)  # the shard dimension (HYBRID_SHARD: the last of two)
    size = torch.distributed.get_world_size(group)
    if size == 1 or torch.distributed.get_backend(group) != "gloo":
        return
    probe, out = torch.full((size,), float(torch.distributed.get_rank(group) + 1)), torch.empty(1)
    torch.distributed.reduce_scatter_tensor(out, probe, op=torch.distributed.ReduceOp.AVG, group=group)
    if out.item() == (size + 1) / 2:  # a true average: nothing to mend
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_all_reduce_hook(lambda reduced: reduced.div_(size))
