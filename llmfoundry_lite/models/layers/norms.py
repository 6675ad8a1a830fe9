"""Norms by name (`norm_type`): layernorm, rmsnorm and their low-precision variants.

"Low precision" (MPT's default) means: under autocast, normalise in the autocast dtype (bf16/fp16)
instead of letting autocast upcast to fp32; it is faster and was how MPT was trained. Outside
autocast the low-precision norms equal the plain ones, which is what the fp32 parity tests see.
`bias=False` (MPT's `no_bias`) drops the additive bias of a LayerNorm, as transformers' Mpt does; RMS
norms have no bias in llm-foundry (`torch.nn.RMSNorm`), whatever `no_bias` says.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from llmfoundry_lite.registry import norms


class RMSNorm(nn.Module):
    def __init__(self, normalized_shape: int, eps: float = 1e-5, bias: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = None  # `bias` is accepted like the other norms' and ignored (see above)

    def _normalize(self, x, weight, bias):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * weight

    def forward(self, x):
        return self._normalize(x.float(), self.weight, self.bias).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    def _normalize(self, x, weight, bias):
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


class _LowPrecision:
    """Mixin: under autocast, normalise input and parameters in the autocast dtype."""

    def forward(self, x):
        device = x.device.type
        if device not in ("cuda", "cpu", "xpu") or not torch.is_autocast_enabled(device):
            return super().forward(x)
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            cast = lambda t: None if t is None else t.to(dtype)
            return self._normalize(cast(x), cast(self.weight), cast(self.bias))


class LowPrecisionLayerNorm(_LowPrecision, LayerNorm):
    pass


class LowPrecisionRMSNorm(_LowPrecision, RMSNorm):
    def forward(self, x):  # unlike the LayerNorm, llm-foundry returns the input's dtype
        return super().forward(x).to(x.dtype)


norms.register("layernorm", LayerNorm)
norms.register("low_precision_layernorm", LowPrecisionLayerNorm)
norms.register("rmsnorm", RMSNorm)
norms.register("low_precision_rmsnorm", LowPrecisionRMSNorm)
norms.register("triton_rmsnorm", RMSNorm)  # llm-foundry's flash-attn kernel: the same fp32 math

NORM_CLASSES = (nn.LayerNorm, RMSNorm)


def build_norm(norm_type: str, size: int, eps: float, bias: bool) -> nn.Module:
    return norms.get(norm_type.lower(), "model.norm_type")(size, eps=eps, bias=bias)
