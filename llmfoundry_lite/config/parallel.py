"""llm-foundry's `fsdp_config` section, shared by the training and eval YAMLs. What the number of
processes adds to its check (`layout_problems`) runs after the one `check` pass, on its result:
`check_train_config(data, world_size)`, `check_eval_config(data, world_size)`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Literal, Optional

import torch

from llmfoundry_lite.compat.torch import FSDP2_HSDP_ON_CPU


@dataclass
class FSDPSection:
    """llm-foundry's `fsdp_config`, mapped onto Composer's FSDP2 (`fully_shard`) path."""
    sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"] = "FULL_SHARD"
    mixed_precision: Literal["DEFAULT", "PURE", "FULL"] = "DEFAULT"
    activation_checkpointing: bool = False
    activation_cpu_offload: bool = False
    state_dict_type: Literal["sharded", "full"] = "sharded"
    data_parallel_shard_degree: int = -1               # HYBRID_SHARD: ranks per shard group (-1: all)
    data_parallel_replicate_degree: Optional[int] = None  # HYBRID_SHARD: number of replicas
    verbose: bool = False
    # FSDP1 knobs kept so llm-foundry YAMLs load; FSDP2 needs none of them (it always uses original
    # params, non-reentrant checkpointing, and its own prefetching).
    limit_all_gathers: bool = True
    use_orig_params: bool = True
    forward_prefetch: bool = False
    backward_prefetch: Optional[str] = None
    sync_module_states: bool = False
    activation_checkpointing_reentrant: bool = False

    def layout_problems(self, path: str, world_size: int) -> List[str]:
        """HYBRID_SHARD on `world_size` processes: its degrees multiply to it, and this torch runs it."""
        if self.sharding_strategy != "HYBRID_SHARD" or world_size == 1:
            return []
        problems = []
        if not torch.cuda.is_available() and not FSDP2_HSDP_ON_CPU:
            problems.append(f"{path}.sharding_strategy: HYBRID_SHARD cannot train on CPU with torch "
                            f"{torch.__version__} (its FSDP2 averages across replicas with an op gloo lacks); use "
                            "FULL_SHARD here, or a newer torch (`make install-current` gives 2.14, where it runs)")
        rep, shard = hybrid_degrees(self, world_size)
        if rep * shard != world_size:
            problems.append(f"{path}: data_parallel_replicate_degree x data_parallel_shard_degree = "
                            f"{rep} x {shard} must equal the world size {world_size}")
        return problems


def hybrid_degrees(fsdp: FSDPSection, world_size: int) -> tuple:
    """(replicate, shard) degrees of HYBRID_SHARD; an unset one is derived from the world size."""
    shard, rep = fsdp.data_parallel_shard_degree, fsdp.data_parallel_replicate_degree
    if shard in (-1, None):
        shard = world_size // rep if rep else world_size
    if rep is None:
        rep = max(world_size // max(shard, 1), 1)
    return rep, shard

