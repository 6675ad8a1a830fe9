"""Feed-forward blocks by name (`ffn_config.ffn_type`): `mptmlp` and the gated `mptglu`.

Parameter names are MPT's (`up_proj`, `down_proj`, and `gate_proj` for the GLU); `down_proj` is
marked `_is_residual` for the init functions (see init.py).
"""
from __future__ import annotations

import functools
from typing import Any, Dict

from torch import nn
from torch.nn import functional as F

from llmfoundry_lite.registry import ffns


class MPTMLP(nn.Module):
    def __init__(self, d_model: int, hidden_size: int, act: Dict[str, Any], bias: bool):
        super().__init__()
        self.up_proj = nn.Linear(d_model, hidden_size, bias=bias)
        # {'name': 'gelu', 'approximate': 'none'} -> partial(F.gelu, approximate='none')
        self.act = functools.partial(getattr(F, act["name"]), **{k: v for k, v in act.items() if k != "name"})
        self.down_proj = nn.Linear(hidden_size, d_model, bias=bias)
        self.down_proj._is_residual = True  # see init.py

    def forward(self, x):
        return self.down_proj(self.act(self.up_proj(x)))


class MPTGLU(MPTMLP):
    def __init__(self, d_model: int, hidden_size: int, act: Dict[str, Any], bias: bool):
        super().__init__(d_model, hidden_size, act, bias)
        self.gate_proj = nn.Linear(d_model, hidden_size, bias=bias)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


ffns.register("mptmlp", MPTMLP)
ffns.register("mptglu", MPTGLU)
