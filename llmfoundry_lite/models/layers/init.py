"""MPT's parameter init functions by name (`init_config.name`), applied one module at a time.

Each entry is `fn(module, *, n_layers, d_model, **init_config)` and touches only `module`'s own
parameters, so it works module by module after a `meta`-device build (what FSDP does):
- Linear weights: the chosen initializer; biases are zero. What a Linear alone cannot tell, the
  layer that builds it marks (llm-foundry's attributes, so its plug-in layers work too; only
  `generic_init_` reads them):
  `_is_residual = True` (attention `out_proj`, FFN `down_proj`): it writes into the residual
  stream, so its weight is divided by `init_div_is_residual` (True = sqrt(2 * n_layers));
  `_fused = (dim, split_points)` (attention `Wqkv`): q, k and v stacked along `dim`, each part
  initialised as a matrix of its own.
- A mixture of experts' stacked expert matrices (`ExpertWeights`): the initializer on each whole
  (experts * hidden, d_model) matrix, not divided as residual (as llm-foundry inits torch_dmoe);
  its router is a Linear.
- Embeddings: `emb_init_std` (normal) or `emb_init_uniform_lim` when set, else the initializer.
- Norms: weight 1, bias 0.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import nn

from llmfoundry_lite.models.layers.ffn import ExpertWeights
from llmfoundry_lite.models.layers.norms import NORM_CLASSES
from llmfoundry_lite.registry import param_inits


@torch.no_grad()
def generic_init_(module: nn.Module, init_fn_, *, n_layers: int, init_div_is_residual=True,
                  emb_init_std=None, emb_init_uniform_lim=None, **_):
    if isinstance(module, nn.Linear):
        dim, splits = getattr(module, "_fused", (0, []))  # unfused: one piece, the whole weight
        bounds = [0, *splits, module.weight.shape[dim]]
        for start, end in zip(bounds[:-1], bounds[1:]):  # noqa: B905  (bundled into custom-code folders, Python 3.9 too)
            init_fn_(module.weight.narrow(dim, start, end - start))
        if module.bias is not None:
            module.bias.zero_()
        div = init_div_is_residual  # True: sqrt(2 * n_layers); False: none
        if getattr(module, "_is_residual", False) and div is not False:
            module.weight.div_(math.sqrt(2 * n_layers) if div is True else float(div))
    elif isinstance(module, ExpertWeights):
        for weight in (module.w1, module.v1, module.w2):
            if weight is not None:
                init_fn_(weight)
    elif isinstance(module, nn.Embedding):
        if emb_init_std is not None:
            module.weight.normal_(0.0, emb_init_std)
        elif emb_init_uniform_lim is not None:
            lim = emb_init_uniform_lim
            low, high = (lim if isinstance(lim, (list, tuple)) else (-lim, lim))
            module.weight.uniform_(low, high)
        else:
            init_fn_(module.weight)
    elif isinstance(module, NORM_CLASSES):
        if module.weight is not None:
            module.weight.fill_(1.0)
        if module.bias is not None:
            module.bias.zero_()


def _register(name):
    def wrap(make_init_fn):
        def init(module, *, n_layers, d_model, **cfg):
            init_fn_, overrides = make_init_fn(d_model=d_model, n_layers=n_layers, **cfg)
            generic_init_(module, init_fn_, n_layers=n_layers, **{**cfg, **overrides})
        param_inits.register(name, init)
        return make_init_fn
    return wrap


@_register("kaiming_normal_")
def _kaiming_normal(init_gain=0.0, fan_mode="fan_in", init_nonlinearity="relu", **_):
    return functools.partial(nn.init.kaiming_normal_, a=init_gain, mode=fan_mode, nonlinearity=init_nonlinearity), {}


@_register("kaiming_uniform_")
def _kaiming_uniform(init_gain=0.0, fan_mode="fan_in", init_nonlinearity="relu", **_):
    return functools.partial(nn.init.kaiming_uniform_, a=init_gain, mode=fan_mode, nonlinearity=init_nonlinearity), {}


@_register("xavier_normal_")
def _xavier_normal(init_gain=0.0, **_):
    return functools.partial(nn.init.xavier_normal_, gain=init_gain), {}


@_register("xavier_uniform_")
def _xavier_uniform(init_gain=0.0, **_):
    return functools.partial(nn.init.xavier_uniform_, gain=init_gain), {}


@_register("baseline_")
def _baseline(init_std=None, **_):
    return functools.partial(nn.init.normal_, mean=0.0, std=init_std), {}


@_register("small_init_")
def _small(d_model, **_):
    """Normal with std sqrt(2 / (5 d)) (Nguyen & Salazar, 2019)."""
    return functools.partial(nn.init.normal_, mean=0.0, std=math.sqrt(2 / (5 * d_model))), {}


@_register("neox_init_")
def _neox(d_model, n_layers, **_):
    """small_init_ with the residual layers divided by n_layers / sqrt(10) (GPT-NeoX)."""
    return (functools.partial(nn.init.normal_, mean=0.0, std=math.sqrt(2 / (5 * d_model))),
            {"init_div_is_residual": n_layers / math.sqrt(10)})


@torch.no_grad()
def _default(module, **_):
    """PyTorch's own initialisation of each layer type."""
    if isinstance(module, NORM_CLASSES):
        generic_init_(module, None, n_layers=1)
    elif hasattr(module, "reset_parameters"):
        module.reset_parameters()


param_inits.register("default_", _default)
