"""Feed-forward blocks by name (`ffn_config.ffn_type`): `mptmlp`, the gated `mptglu`, and `torch_dmoe`,
llm-foundry's dropless mixture of experts in plain PyTorch.

Parameter names are MPT's (`up_proj`, `down_proj`, and `gate_proj` for the GLU); `down_proj` is
marked `_is_residual` for the init functions (see init.py). The mixture of experts keeps llm-foundry's
names and shapes (`router.layer`, `experts.mlp.w1` / `v1` / `w2`), so its saved models load.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Dict, Optional, Union

import torch
from torch import nn
from torch.nn import functional as F

from llmfoundry_lite.registry import ffns


def activation(act: Dict[str, Any]):
    """{'name': 'gelu', 'approximate': 'none'} -> partial(F.gelu, approximate='none')."""
    return functools.partial(getattr(F, act["name"]), **{k: v for k, v in act.items() if k != "name"})


class MPTMLP(nn.Module):
    def __init__(self, d_model: int, hidden_size: int, act: Dict[str, Any], bias: bool):
        super().__init__()
        self.up_proj = nn.Linear(d_model, hidden_size, bias=bias)
        self.act = activation(act)
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


class ExpertWeights(nn.Module):
    """Every expert's matrices stacked: `w1` (and the GLU's `v1`) and `w2` are (experts * hidden, d_model);
    expert e's rows are [e * hidden, (e + 1) * hidden). Expert e computes act(x w1_e^T) [* x v1_e^T] w2_e."""

    def __init__(self, d_model: int, hidden_size: int, n_experts: int, glu: bool, act: Dict[str, Any]):
        super().__init__()
        self.hidden_size, self.act = hidden_size, activation(act)
        self.w1 = nn.Parameter(torch.empty(n_experts * hidden_size, d_model))
        self.v1 = nn.Parameter(torch.empty(n_experts * hidden_size, d_model)) if glu else None
        self.w2 = nn.Parameter(torch.empty(n_experts * hidden_size, d_model))
        self.reset_parameters()

    def reset_parameters(self):
        """What `nn.Linear` does for each expert's matrix (the `default_` init; llm-foundry leaves
        torch.rand there): uniform within 1/sqrt(fan_in), fan_in d_model for w1/v1, hidden for w2."""
        for w in (self.w1, self.v1, self.w2):
            if w is not None and not w.is_meta:
                bound = 1 / math.sqrt(self.hidden_size if w is self.w2 else w.shape[1])
                nn.init.uniform_(w, -bound, bound)

    def forward(self, x: torch.Tensor, e: int) -> torch.Tensor:
        rows = slice(e * self.hidden_size, (e + 1) * self.hidden_size)
        h = self.act(x @ self.w1[rows].T)
        if self.v1 is not None:
            h = h * (x @ self.v1[rows].T)
        return h @ self.w2[rows]


class TorchDMoE(nn.Module):
    """llm-foundry's `torch_dmoe`: a softmax router picks each token's `moe_top_k` experts (of
    `moe_num_experts`), whose outputs are summed weighted by their router probabilities. Dropless:
    every token reaches its experts (no capacity limit), so a token's output never depends on the
    other tokens of the batch. Options, as there: `moe_jitter_eps` multiplies the router's input by
    noise uniform in [1 - eps, 1 + eps] while training; `moe_normalize_expert_weights: p` divides
    the chosen weights by their p-norm; `uniform_expert_assignment` sends token slot i to expert
    i mod n (a benchmarking mode). There are no biases (llm-foundry's torch_dmoe has none whatever
    `no_bias` says) and no load-balancing loss (llm-foundry adds one for MegaBlocks' MoE only)."""

    def __init__(self, d_model: int, hidden_size: int, act: Dict[str, Any], bias: bool, moe_num_experts: int = 1,
                 moe_top_k: int = 1, mlp_type: str = "mlp", moe_jitter_eps: Optional[float] = None,
                 moe_normalize_expert_weights: Optional[Union[int, float]] = None,
                 uniform_expert_assignment: bool = False):
        super().__init__()
        self.n_experts, self.top_k, self.jitter_eps = moe_num_experts, moe_top_k, moe_jitter_eps
        self.normalize_p, self.uniform = moe_normalize_expert_weights, uniform_expert_assignment
        self.router = nn.Module()
        self.router.layer = nn.Linear(d_model, moe_num_experts, bias=False)
        self.experts = nn.Module()
        self.experts.mlp = ExpertWeights(d_model, hidden_size, moe_num_experts, mlp_type == "glu", act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        router_in = x
        if self.training and self.jitter_eps is not None:
            router_in = x * torch.empty_like(x).uniform_(1 - self.jitter_eps, 1 + self.jitter_eps)
        weights, experts = self.router.layer(router_in).softmax(dim=-1).topk(self.top_k, dim=-1)
        if self.normalize_p:
            weights = weights / weights.norm(p=self.normalize_p, dim=-1, keepdim=True)
        if self.uniform:
            experts = torch.arange(experts.numel(), device=x.device).remainder(self.n_experts).view_as(experts)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        for e in range(self.n_experts):  # in expert order, so each token's sum is added up as llm-foundry does
            token, slot = torch.where(experts == e)
            if token.numel():
                y = self.experts.mlp(x[token], e)
                out.index_add_(0, token, (y * weights[token, slot, None]).to(out.dtype))
        return out.view(shape)


ffns.register("mptmlp", MPTMLP)
ffns.register("mptglu", MPTGLU)
ffns.register("torch_dmoe", TorchDMoE)
