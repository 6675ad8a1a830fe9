"""`fsdp_config` -> Composer's FSDP2 (`fully_shard`) path, and precision per device.

Composer applies `fully_shard` to each `MPTBlock` (the model's `fsdp_wrap_fn`) and to the model,
activation checkpointing per block (`activation_checkpointing_fn`), and saves sharded (DCP) or full
checkpoints per `state_dict_type`. We only translate llm-foundry's keys:

  FULL_SHARD     -> reshard_after_forward=True (ZeRO-3)
  SHARD_GRAD_OP  -> reshard_after_forward=False (ZeRO-2: params stay gathered between fwd and bwd)
  HYBRID_SHARD   -> a 2-D mesh (replicate, shard): shard inside groups, replicate across them
  NO_SHARD       -> no FSDP: Composer's DDP

With one process FSDP buys nothing, so it is dropped with a warning; `activation_checkpointing`
still applies there and under NO_SHARD (`checkpoint_blocks`).

`init_device: meta` builds the model without memory; Composer shards it, then `materialize_meta` (in
place of Composer's CUDA-only one) initialises each rank's shard exactly as an unsharded init would,
or, for a pretrained folder, fills it from the folder's tensors (export/hf_import.py). Under
`init_device: mixed` global rank 0 holds real weights and the others are on meta: Composer sees this,
shards, and broadcasts rank 0's weights tensor by tensor into the other ranks' shards (its
`sync_module_states`); without FSDP2, DDP broadcasts them from rank 0 at construction.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import warnings
from typing import Optional

import torch
from composer.utils.parallelism import FSDP2Config

from llmfoundry_lite.train.schema import FSDPSection, hybrid_degrees

log = logging.getLogger(__name__)


def resolve_precision(precision: str, on_gpu: bool) -> str:
    """Composer allows only fp32 on CPU: amp_* falls back to fp32 there, so GPU YAMLs still run."""
    if not on_gpu and precision != "fp32":
        warnings.warn(f"precision {precision} needs a GPU; training in fp32 on CPU", stacklevel=2)
        return "fp32"
    return precision


def _resume_planner():
    """Sharded checkpoints load without the entries this run has and the checkpoint lacks: newer torch
    adds state (e.g. LambdaLR's `_is_initial`), llm-foundry saves another HF config. The model's weights
    and the optimizer's state are checked up front instead (`check_resumable`)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    return DefaultLoadPlanner(allow_partial_load=True)


@dataclasses.dataclass
class MeshFSDP2Config(FSDP2Config):
    """Composer 0.32 builds the FSDP2 device mesh from these two degrees, which its FSDP2Config fixes at
    (None, -1) with read-only properties, and overwrites any `device_mesh` given: HYBRID_SHARD would
    silently be FULL_SHARD. These fields shadow the properties."""
    data_parallel_replicate_degree: Optional[int] = None
    data_parallel_shard_degree: int = -1

    @property
    def load_planner(self):  # Composer's is None: DCP's strict default
        return _resume_planner()


def fsdp2_config(section: Optional[FSDPSection], world_size: int):
    """The `FSDP2Config` for `fsdp_config`, or None for no FSDP (none given, one process, NO_SHARD)."""
    if section is None:
        return None
    if world_size == 1:
        warnings.warn("fsdp_config shards nothing with a single process (only its activation_checkpointing applies)",
                      stacklevel=2)
        return None
    if section.sharding_strategy == "NO_SHARD":
        log.info("fsdp_config.sharding_strategy NO_SHARD: using DDP")
        return None
    rep, shard = None, -1  # one shard group of all ranks
    if section.sharding_strategy == "HYBRID_SHARD":
        if section.data_parallel_shard_degree in (-1, None) and section.data_parallel_replicate_degree is None:
            # llm-foundry's default: shard within a node, replicate across nodes
            local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
            section = dataclasses.replace(section, data_parallel_shard_degree=local)
        rep, shard = hybrid_degrees(section, world_size)

    with warnings.catch_warnings():  # "FSDP2 Config/APIs are experimental": we chose them knowingly
        warnings.simplefilter("ignore", UserWarning)
        return MeshFSDP2Config(
            data_parallel_replicate_degree=rep, data_parallel_shard_degree=shard,
            reshard_after_forward=section.sharding_strategy != "SHARD_GRAD_OP",
            activation_checkpointing=section.activation_checkpointing,
            activation_cpu_offload=section.activation_cpu_offload,
            state_dict_type=section.state_dict_type,
            mixed_precision=section.mixed_precision,
            verbose=section.verbose,
        )


def materialize_meta(module: torch.nn.Module, device: str = "cpu") -> None:
    """Give every meta parameter/buffer storage on `device`, then initialise it with the model's
    `param_init_fn`, one module at a time.

    Under FSDP2 a parameter is a DTensor holding this rank's shard, which init functions working on
    slices (a fused Wqkv is initialised as three matrices) cannot write through; so each module is
    initialised on full-size plain stand-ins and every rank keeps its shard, as if initialised
    unsharded (Composer seeds ranks alike here). `to_empty` may replace a plain parameter object,
    untying tied weights (wte / lm_head): modules that shared one are pointed back at the first owner's.
    LoRA's adapter matrices (peft makes them on the base layer's device) are initialised as peft does.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor
    init_owner = next((m for m in module.modules() if hasattr(m, "param_init_fn")), None)
    lora_parts = _lora_parts(module)
    owners = {}
    for sub in module.modules():
        for name, p in sub.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((sub, name))
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
    for (first, first_name), *others in owners.values():
        for sub, name in others:
            setattr(sub, name, getattr(first, first_name))


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
    import math
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


def own_meta_init(device: str):
    """While active, Composer's FSDP2 initialises meta-built models with `materialize_meta` on `device`
    (Composer 0.32's own version materialises on CUDA only and cannot init sliced DTensors)."""
    from unittest import mock

    from composer.distributed import prepare_distributed
    return mock.patch.object(prepare_distributed, "meta_init", functools.partial(materialize_meta, device=device))


def checkpoint_blocks(model: torch.nn.Module) -> None:
    """Activation checkpointing of every MPT block without FSDP (one process, or NO_SHARD's DDP): the
    non-reentrant wrapper Composer's FSDP2 path uses, so `fsdp_config.activation_checkpointing` means
    the same in every layout. State-dict names are unchanged (the wrapper strips its prefix)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    from llmfoundry_lite.models.mpt import MPTBlock
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, MPTBlock))


def compile_blocks(model: torch.nn.Module, compile_config: dict) -> None:
    """`torch.compile` each MPT block in place (`compile_config` are its keyword arguments), as
    torchtitan does: every block runs the same code, so one compilation serves all of them, graphs
    stay small, and FSDP2's per-block hooks and activation checkpointing wrap compiled blocks."""
    from llmfoundry_lite.models.mpt import MPTBlock
    for module in model.modules():
        if isinstance(module, MPTBlock):
            module.compile(**compile_config)


def on_meta(model: torch.nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def prepare_model(model: torch.nn.Module, compile_config: Optional[dict], fsdp: Optional[FSDPSection],
                  sharded: bool, seed: int) -> None:
    """What the model needs before the Trainer: per-block compile; without FSDP2 (which does both
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
    if not sharded and fsdp is not None and fsdp.activation_checkpointing:
        checkpoint_blocks(model)


def average_gradients_on_gloo(model: torch.nn.Module) -> None:
    """FSDP2 averages gradients across its shards with a reduce-scatter of `ReduceOp.AVG`, which gloo
    (CPU) in torch 2.7 silently computes as a sum: every gradient would be the number of shards times
    too large (Adam hides it, gradient clipping and SGD do not). One probe of the shard group tells;
    where it sums, FSDP2's all-reduce hook divides each reduce-scatter output, before it is accumulated
    into the sharded gradient."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
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
