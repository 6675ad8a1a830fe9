"""Placing a model on devices, as torchtitan does: small `apply_*` functions over an unmodified model,
used alike by training (Composer's FSDP2 path calls `materialize_meta`), eval and DPO's frozen
reference.

- `apply_fsdp`: FSDP2 `fully_shard` on every MPT block (the model's `fsdp_wrap_fn`), then the root.
- `device_mesh`: the 1-D (all ranks shard) or 2-D (HYBRID_SHARD: replicate x shard) mesh.
- `materialize_meta`: real storage and initial weights for a model built on `meta`, sharded or not.
- `shared_parameters` / `retie`: `to_empty` gives each module a new parameter object, which unties
  tied weights (wte / lm_head); these point the sharers back at one.
- `checkpoint_blocks`, `compile_blocks`: activation checkpointing and `torch.compile` per block;
  `prepare_model` applies them (and `materialize_meta`) where Composer's FSDP2 does not.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from llmfoundry_lite.compat.torch import apply_activation_checkpointing
from llmfoundry_lite.models.mpt import MPTBlock


def device_mesh(device_type: str, shape: Sequence[int]) -> DeviceMesh:
    """`(world,)`: every rank holds a shard; `(replicate, shard)`: shard groups, replicated (HYBRID_SHARD)."""
    return init_device_mesh(device_type, tuple(shape))


def apply_fsdp(model: torch.nn.Module, mesh: DeviceMesh, reshard_after_forward: bool = True,
               mp_policy: Optional[MixedPrecisionPolicy] = None) -> None:
    """FSDP2 as Composer applies it in training: each block its own unit (a forward gathers one block
    at a time), then the rest as the root's. `reshard_after_forward` false keeps gathered weights
    until the backward (ZeRO-2)."""
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward,
              "mp_policy": mp_policy or MixedPrecisionPolicy()}
    for block in [m for m in model.modules() if model.fsdp_wrap_fn(m)]:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)


def shared_parameters(model: torch.nn.Module) -> List[List[Tuple[torch.nn.Module, str]]]:
    """Every parameter held by more than one module, as its [(module, name), ...] (first owner first)."""
    owners = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((module, name))
    return [group for group in owners.values() if len(group) > 1]


def retie(groups: List[List[Tuple[torch.nn.Module, str]]]) -> None:
    """Point every sharer of each group (see `shared_parameters`) at its first owner's parameter again."""
    for (first, first_name), *others in groups:
        for module, name in others:
            setattr(module, name, getattr(first, first_name))


def on_meta(model: torch.nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def materialize_meta(module: torch.nn.Module, device: str = "cpu") -> None:
    """Give every meta parameter/buffer storage on `device`, then initialise it with the model's
    `param_init_fn`, one module at a time.

    Under FSDP2 a parameter is a DTensor holding this rank's shard, which init functions working on
    slices (a fused Wqkv is initialised as three matrices) cannot write through; so each module is
    initialised on full-size plain stand-ins and every rank keeps its shard, as if initialised
    unsharded (Composer seeds ranks alike here). Tied weights are tied again afterwards (`retie`).
    LoRA's adapter matrices (peft makes them on the base layer's device) are initialised as peft does.
    """
    init_owner = next((m for m in module.modules() if hasattr(m, "param_init_fn")), None)
    lora_parts = _lora_parts(module)
    tied = shared_parameters(module)
    for sub in module.modules():
        if not any(t.is_meta for t in [*sub.parameters(recurse=False), *sub.buffers(recurse=False)]):
            continue
        if init_owner is None:
            raise RuntimeError(f"{type(module).__name__} was built on meta but has no param_init_fn")
        sub.to_empty(device=device, recurse=False)
        sharded = {n: p for n, p in sub.named_parameters(recurse=False) if isinstance(p, DTensor)}
        for name, p in sharded.items():
            setattr(sub, name, torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device)))
        if id(sub) in lora_parts:
            _init_lora_part(sub, *lora_parts[id(sub)])
        else:
            init_owner.param_init_fn(sub)
        with torch.no_grad():
            for name, p in sharded.items():
                full = getattr(sub, name).detach()
                p.to_local().copy_(distribute_tensor(full, p.device_mesh, p.placements).to_local())
                setattr(sub, name, p)
    retie(tied)


def _lora_parts(module: torch.nn.Module) -> dict:
    """id(LoRA A or B module of a peft layer) -> ('A' or 'B', the LoraConfig's init_lora_weights, r)."""
    configs = next((m.peft_config for m in module.modules() if isinstance(getattr(m, "peft_config", None), dict)), {})
    parts = {}
    for layer in module.modules():
        for kind in ("A", "B"):
            for adapter, part in (getattr(layer, f"lora_{kind}", None) or {}).items():
                parts[id(part)] = (kind, configs[adapter].init_lora_weights, layer.r[adapter])
            table = getattr(layer, f"lora_embedding_{kind}", None)  # a ParameterDict: one tensor per adapter
            for adapter in table or {}:
                parts[id(table)] = ("embedding_" + kind, configs[adapter].init_lora_weights, layer.r[adapter])
    return parts


@torch.no_grad()
def _init_lora_part(part: torch.nn.Module, kind: str, init, r: int) -> None:
    """peft's `reset_lora_parameters` for one matrix (init_lora_weights true, false or 'gaussian'; the
    config check refuses the data-dependent ones on meta): a Linear's A random, B zero (the adapter
    starts as a no-op); an Embedding's A zero, B random; false: both random."""
    for name, p in part.named_parameters(recurse=False):
        zero = init is not False and (kind == "B" or kind == "embedding_A" or name == "bias")
        if zero:
            torch.nn.init.zeros_(p)
        elif kind.startswith("embedding"):
            torch.nn.init.normal_(p)
        elif init == "gaussian":
            torch.nn.init.normal_(p, std=1 / r)
        else:
            torch.nn.init.kaiming_uniform_(p, a=math.sqrt(5))


def checkpoint_blocks(model: torch.nn.Module) -> None:
    """Activation checkpointing of every MPT block without FSDP (one process, or NO_SHARD's DDP): the
    non-reentrant wrapper Composer's FSDP2 path uses, so `fsdp_config.activation_checkpointing` means
    the same in every layout. State-dict names are unchanged (the wrapper strips its prefix)."""
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, MPTBlock))


def compile_blocks(model: torch.nn.Module, compile_config: dict) -> None:
    """`torch.compile` each MPT block in place (`compile_config` are its keyword arguments), as
    torchtitan does: every block runs the same code, so one compilation serves all of them, graphs
    stay small, and FSDP2's per-block hooks and activation checkpointing wrap compiled blocks."""
    for module in model.modules():
        if isinstance(module, MPTBlock):
            module.compile(**compile_config)


def prepare_model(model: torch.nn.Module, compile_config: Optional[dict], checkpoint_activations: bool,
                  sharded: bool, seed: int) -> None:
    """What the model needs before training: per-block compile; without FSDP2 (which does both
    itself), real weights for a meta-device init and activation checkpointing. A meta init draws its
    weights from `seed` as Composer's FSDP2 path does (`seed_context(rank_zero_seed)`), so every layout
    starts from the same weights; not with `seed_context` itself, a collective, which under DDP with
    `init_device: mixed` only the ranks on meta would enter."""
    if compile_config is not None:
        compile_blocks(model, compile_config)
    if not sharded and on_meta(model):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            materialize_meta(model)
    if not sharded and checkpoint_activations:
        checkpoint_blocks(model)
