"""The process group, as the launchers hand it over: `composer -n N`, `torchrun`, or one process.

Both launchers set RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT.
`torchrun` differs in two ways that matter here:
- it names the node's rank GROUP_RANK, where Composer reads NODE_RANK;
- with `--max-restarts`, it starts the workers again in the same store (its agent hosts it), where
  `init_process_group` would find the addresses the dead attempt's ranks published under the same
  keys; gloo then connects to ports nobody listens on any more ("Gloo connectFullMesh failed"; seen
  about one restart in two, on torch 2.7 and today's). Each attempt therefore gets its own key prefix.
"""
from __future__ import annotations

import datetime
import logging
import os

import torch
from composer.utils import dist

log = logging.getLogger(__name__)


def start_process_group(on_gpu: bool, timeout: float) -> None:
    """Initialise torch.distributed for this rank, however it was launched."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or dist.get_world_size() == 1:
        dist.initialize_dist("gpu" if on_gpu else "cpu", timeout)
        return
    os.environ.setdefault("NODE_RANK", os.environ.get("GROUP_RANK", "0"))
    wait = datetime.timedelta(seconds=timeout)
    store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                       timeout=wait)
    torch.distributed.init_process_group(
        "nccl" if on_gpu else "gloo", store=torch.distributed.PrefixStore(f"llmfoundry_lite/attempt{restart}", store),
        rank=dist.get_global_rank(), world_size=dist.get_world_size(), timeout=wait)
    if restart != "0" and dist.get_global_rank() == 0:
        log.warning("torchrun restarted the workers after one failed (restart %s of at most %s; torchrun's log above "
                    "names the rank, its exit code and when): autoresume continues from the last complete checkpoint",
                    restart, os.environ.get("TORCHELASTIC_MAX_RESTARTS", "?"))
