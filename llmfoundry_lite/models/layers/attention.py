"""MPT self-attention: fused `Wqkv`, MHA / GQA / MQA, ALiBi or RoPE, optional qk-norm and clipping.

The attention kernel is chosen by name (`attn_config.attn_impl`) from `registry.attention_impls`:
- `torch`: `F.scaled_dot_product_attention`. Everything positional or masking (ALiBi, causal, key
  padding, packed `sequence_id`, sliding window) is folded into ONE additive float bias per forward
  (`AttentionContext.bias`), shared by all layers; when no bias is needed (RoPE / learned positions,
  no padding) SDPA's `is_causal` fast path is used instead.
- `flash`: flash-attn 2 on CUDA, with native `alibi_slopes`, sliding window and varlen packing.
  Asking for it without flash-attn or without CUDA is a `UserError`, never a silent fallback.
- `flex`: PyTorch FlexAttention, the fused GPU path without flash-attn: ALiBi and soft-capping as a
  score modifier, causal / window / padding / packed-sequence masks as a block mask.
A plug-in registers another kernel with the signature of `torch_attention`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import flex_attention as flex
from torch.nn.attention.flex_attention import create_block_mask

from llmfoundry_lite.errors import UserError
from llmfoundry_lite.registry import attention_impls


def alibi_slopes(n_heads: int, alibi_bias_max: float = 8, device=None) -> torch.Tensor:
    """MPT's ALiBi slopes (float32, one per head).

    Slopes are 2^(-alibi_bias_max * i / n) for i = 1..n with n the next power of two; for other head
    counts MPT interleaves that list (odd positions first, then even) and keeps the first n_heads.
    """
    n = 2 ** math.ceil(math.log2(n_heads))
    m = torch.arange(1, n + 1, dtype=torch.float32, device=device) * (alibi_bias_max / n)
    slopes = 1.0 / torch.pow(2, m)
    if n != n_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes


def rope_inv_freq(head_dim: int, theta: float, scaling: Dict, max_seq_len: int, seq_len: int,
                  device=None) -> torch.Tensor:
    """RoPE's fp32 inverse frequencies (head_dim / 2) for llm-foundry's `rope_hf_config`, whose `type`
    (`no_scaling` = transformers' 'default') and keys are what it hands transformers' LlamaRotaryEmbedding
    as `rope_scaling`, with `max_position_embeddings = max_seq_len`; numbers as transformers 4.51 (its pin):

    - `linear`: frequencies divided by `factor` (positions interpolated).
    - `dynamic` (NTK): once the sequence (`seq_len`: the largest position + 1) is longer than `max_seq_len`,
      theta * (factor * seq_len / max_seq_len - (factor - 1)) ** (head_dim / (head_dim - 2)) as the base.
      llm-foundry's module keeps the longest length seen until a call shorter than max_seq_len; here each
      call uses its own length (equal within one generation, whose length only grows).
    - `llama3` (Llama 3.1): wavelengths 2 pi / f longer than original_max_position_embeddings /
      low_freq_factor are divided by `factor`, those shorter than .. / high_freq_factor kept, and the ones
      between blended by s = (original_max_position_embeddings / wavelength - low) / (high - low).
    Their cos/sin need no attention scaling (1.0 for these types in transformers).
    """
    kind = scaling.get("type", "no_scaling")
    if kind == "dynamic" and seq_len > max_seq_len:
        # in fp32, as there: transformers gets the length as a tensor (max(position_ids) + 1)
        factor, length = scaling["factor"], torch.tensor(seq_len, device=device)
        theta = theta * ((factor * length / max_seq_len) - (factor - 1)) ** (head_dim / (head_dim - 2))
    # the exponents as int64 turned float, as transformers computes them
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind != "llama3":
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    long_waves = torch.where(wavelength > context / low, inv_freq / factor, inv_freq)
    blend = (context / wavelength - low) / (high - low)
    blended = (1 - blend) * long_waves / factor + blend * long_waves
    between = (wavelength >= context / high) & (wavelength <= context / low)
    return torch.where(between, blended, long_waves)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, scaling: Dict, max_seq_len: int,
                 dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (B, 1, S, head_dim) for integer positions (B, S); computed in fp32.

    `scaling` is llm-foundry's `rope_hf_config` (see `rope_inv_freq`).
    """
    dynamic = scaling.get("type") == "dynamic"  # the only type that needs the length (a device sync)
    seq_len = int(positions.max()) + 1 if dynamic else 0
    inv_freq = rope_inv_freq(head_dim, theta, scaling, max_seq_len, seq_len, positions.device)
    freqs = positions.float()[..., None] * inv_freq  # (B, S, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def dail_rope_cos_sin(past_len: int, seq: int, rotary_dim: int, theta: float, dail: Dict, dtype: torch.dtype,
                      device) -> Tuple[Tuple[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]:
    """(queries' cos/sin, keys' cos/sin), each (seq, rotary_dim), as flash-attn's `RotaryEmbedding`
    computes them for llm-foundry's `rope_impl: dail` (positions past_len.. whatever the padding).

    llm-foundry's rotary_dim is d_model // n_heads even when head_dim is wider: the features past it
    pass through unrotated (see `apply_rope`).

    flash-attn builds its table for positions 0..L-1 with L = past_len + seq (the length llm-foundry
    passes); `pos_idx_in_fp32: false` takes positions and frequencies in the model's dtype. XPos
    (`type: xpos`) multiplies the queries' cos/sin by scale ** ((p - L // 2) / xpos_scale_base) and
    divides the keys' by it, scale = (2i + 0.4 d) / (1.4 d) per frequency i: the centre moves with L.
    """
    length = past_len + seq
    idx_dtype = torch.float32 if dail["pos_idx_in_fp32"] else dtype
    inv_freq = (1.0 / (theta ** (torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float32) / rotary_dim)))
    pos = torch.arange(past_len, length, device=device, dtype=idx_dtype)
    freqs = torch.outer(pos, inv_freq.to(idx_dtype)).float()
    cos, sin = torch.cat([freqs.cos()] * 2, dim=-1), torch.cat([freqs.sin()] * 2, dim=-1)
    if dail["type"] != "xpos":
        return (cos.to(dtype), sin.to(dtype)), (cos.to(dtype), sin.to(dtype))
    power = (torch.arange(past_len, length, device=device, dtype=torch.float32) - length // 2) / dail["xpos_scale_base"]
    base = (torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float32) + 0.4 * rotary_dim) / (1.4 * rotary_dim)
    scale = torch.cat([base ** power[:, None]] * 2, dim=-1)
    return ((cos * scale).to(dtype), (sin * scale).to(dtype)), ((cos / scale).to(dtype), (sin / scale).to(dtype))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, S, D) by the non-interleaved (GPT-NeoX) rotary embedding.

    Only the first cos.shape[-1] features of each head rotate when that is less than D (dail RoPE with a
    wider head_dim); the rest pass through, as in flash-attn's `apply_rotary_emb`.
    """
    rotary_dim = cos.shape[-1]
    if rotary_dim < x.shape[-1]:
        return torch.cat([apply_rope(x[..., :rotary_dim], cos, sin), x[..., rotary_dim:]], dim=-1)
    half = rotary_dim // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


@dataclass
class AttentionContext:
    """What every layer's attention needs about positions and masking, built once per forward.

    key_padding_mask: (B, K) bool, True = real token, or None when there is no padding.
    sequence_id: (B, S) ids of packed sequences (no cache), or None.
    rope: (queries' (cos, sin), keys' (cos, sin)), the same pair unless XPos; None without RoPE.
    shared_kv: layer index -> its keys and values, for the layers that reuse them (block_overrides).
    shared_x: layer index -> its block's input, for the layers whose keys and values read it (block_overrides).
    """
    q_len: int
    past_len: int
    key_padding_mask: Optional[torch.Tensor] = None
    sequence_id: Optional[torch.Tensor] = None
    alibi_slopes: Optional[torch.Tensor] = None
    sliding_window: int = -1
    rope: Optional[Tuple[Tuple[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]] = None
    cache: Dict = field(default_factory=dict)  # per-forward (or shared) store for the built bias
    shared_kv: Dict = field(default_factory=dict)
    shared_x: Dict = field(default_factory=dict)

    def for_layer(self, sliding_window: int, nope: bool) -> "AttentionContext":
        """This context for a block with its own window, or without positions (`nope`): its bias is
        kept in a sub-store of `cache`, so it too is built once and shared by the blocks like it."""
        if sliding_window == self.sliding_window and not nope:
            return self
        return replace(self, sliding_window=sliding_window, alibi_slopes=None if nope else self.alibi_slopes,
                       rope=None if nope else self.rope, cache=self.cache.setdefault((sliding_window, nope), {}))

    @property
    def k_len(self) -> int:
        return self.past_len + self.q_len

    @property
    def needs_bias(self) -> bool:
        """False when plain causal attention (SDPA's is_causal, or no mask for one query) is exact."""
        return (self.alibi_slopes is not None or self.key_padding_mask is not None or self.sequence_id is not None
                or self.sliding_window > 0 or (self.past_len > 0 and self.q_len > 1))

    def bias(self, dtype: torch.dtype, device) -> torch.Tensor:
        """The additive bias (B|1, H|1, S, K): ALiBi where allowed, the dtype's minimum where masked."""
        key = (dtype, str(device))
        if key not in self.cache:
            self.cache[key] = self._build_bias(dtype, device)
        return self.cache[key]

    def _build_bias(self, dtype, device) -> torch.Tensor:
        q_pos = torch.arange(self.past_len, self.k_len, device=device)
        k_pos = torch.arange(self.k_len, device=device)
        rel = k_pos[None, :] - q_pos[:, None]  # (S, K), <= 0 where causal
        allowed = rel <= 0
        if self.sliding_window > 0:
            allowed = allowed & (rel >= -self.sliding_window)
        allowed = allowed[None, None]
        if self.key_padding_mask is not None:
            allowed = allowed & self.key_padding_mask[:, None, None, :].to(device)
        if self.sequence_id is not None:
            seq = self.sequence_id.to(device)
            allowed = allowed & (seq[:, None, :, None] == seq[:, None, None, :])
        values = (torch.zeros((), device=device) if self.alibi_slopes is None
                  else (self.alibi_slopes.to(device)[:, None, None] * rel[None].float())[None])
        return torch.where(allowed, values, torch.finfo(torch.float32).min).to(dtype)


def _repeat_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    groups = n_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


@attention_impls.register("torch")
def torch_attention(q, k, v, ctx: AttentionContext, *, softmax_scale: float, dropout_p: float,
                    softcap: Optional[float] = None) -> torch.Tensor:
    """q (B, H, S, D), k/v (B, Hkv, K, D) -> (B, H, S, D) with PyTorch's SDPA."""
    k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
    bias = ctx.bias(q.dtype, q.device) if ctx.needs_bias else None
    if softcap:  # SDPA has no logit soft-capping: spell the attention out
        scores = torch.matmul(q, k.transpose(-1, -2)) * softmax_scale
        scores = softcap * torch.tanh(scores / softcap)
        if bias is not None:
            scores = scores + bias
        elif ctx.q_len > 1:
            scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
        probs = F.dropout(torch.softmax(scores.float(), dim=-1).to(q.dtype), dropout_p)
        return torch.matmul(probs, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=softmax_scale,
                                          is_causal=bias is None and ctx.q_len > 1)


@attention_impls.register("flash")
def flash_attention(q, k, v, ctx: AttentionContext, *, softmax_scale: float, dropout_p: float,
                    softcap: Optional[float] = None) -> torch.Tensor:
    """flash-attn 2 (CUDA, fp16/bf16); padding and packed sequences go through the varlen kernel."""
    try:
        import flash_attn as fa  # lazy: optional (the gpu extra), only attn_impl: flash needs it
    except ImportError:
        raise UserError("attn_config.attn_impl: 'flash' needs the flash-attn package (pip install "
                        "'llmfoundry-lite[gpu]') and a CUDA GPU; use attn_impl: torch on this machine") from None
    if q.device.type != "cuda":
        raise UserError(f"attn_config.attn_impl: 'flash' runs on CUDA only, but the model is on {q.device}; "
                        f"use attn_impl: torch")
    B, H, S, D = q.shape
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # flash-attn wants (B, S, H, D)
    kw = dict(dropout_p=dropout_p, softmax_scale=softmax_scale, causal=True, softcap=softcap or 0.0,
              window_size=(ctx.sliding_window, 0) if ctx.sliding_window > 0 else (-1, -1),
              alibi_slopes=None if ctx.alibi_slopes is None else ctx.alibi_slopes.to(q.device, torch.float32))
    if ctx.key_padding_mask is None and ctx.sequence_id is None:
        return fa.flash_attn_func(q, k, v, **kw).transpose(1, 2)
    # Varlen: every (row, packed sequence) is its own sequence; padding tokens are dropped.
    K = k.shape[1]
    valid = ctx.key_padding_mask if ctx.key_padding_mask is not None else torch.ones(B, K, dtype=torch.bool)
    valid = valid.to(q.device)
    seg = torch.zeros(B, K, dtype=torch.long, device=q.device)
    if ctx.sequence_id is not None:  # ids may start anywhere (padding is often -1): make them >= 0
        seq = ctx.sequence_id.to(q.device).long()
        seg[:, -S:] = seq - seq.min()
    group = torch.arange(B, device=q.device)[:, None] * (int(seg.max()) + 1) + seg
    k_group = group[valid]
    ids, k_counts = torch.unique_consecutive(k_group, return_counts=True)
    q_valid = valid[:, -S:]
    q_counts = torch.bincount(torch.searchsorted(ids, group[:, -S:][q_valid]), minlength=len(ids))
    cu = lambda c: F.pad(c.cumsum(0), (1, 0)).to(torch.int32)
    out_valid = fa.flash_attn_varlen_func(
        q[q_valid], k[valid], v[valid], cu_seqlens_q=cu(q_counts), cu_seqlens_k=cu(k_counts),
        max_seqlen_q=int(q_counts.max()), max_seqlen_k=int(k_counts.max()), **kw)
    out = q.new_zeros(B, S, H, D)
    out[q_valid] = out_valid
    return out.transpose(1, 2)


def _flex_mask_mod(ctx: AttentionContext, device):
    """FlexAttention's mask function for what `AttentionContext.bias` would mask (causal, window,
    key padding, packed sequences), and its block mask, built once per forward and shared by layers."""
    past = ctx.past_len
    padding = None if ctx.key_padding_mask is None else ctx.key_padding_mask.to(device)
    seq = None if ctx.sequence_id is None else ctx.sequence_id.to(device)

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = kv_idx <= q_idx + past
        if ctx.sliding_window > 0:
            allowed = allowed & (kv_idx >= q_idx + past - ctx.sliding_window)
        if padding is not None:
            allowed = allowed & padding[b, kv_idx]
        if seq is not None:
            allowed = allowed & (seq[b, q_idx] == seq[b, kv_idx])
        return allowed
    batch = next((t.shape[0] for t in (padding, seq) if t is not None), None)  # None: one mask for all rows
    return create_block_mask(mask_mod, batch, None, ctx.q_len, ctx.k_len, device=device)


_compiled_flex = None


@attention_impls.register("flex")
def flex_attention(q, k, v, ctx: AttentionContext, *, softmax_scale: float, dropout_p: float,
                   softcap: Optional[float] = None) -> torch.Tensor:
    """PyTorch FlexAttention: ALiBi and soft-capping as a score modifier, masks as a block mask (whole
    masked blocks are skipped). Compiled on CUDA, where it is a fused kernel; eager elsewhere (a
    reference implementation, slow: use `torch` on CPU)."""
    global _compiled_flex
    if dropout_p:
        raise UserError("attn_config.attn_impl: 'flex' has no attention dropout; set attn_pdrop: 0 or use attn_impl: torch")
    key = ("flex_block_mask", str(q.device))
    if key not in ctx.cache:
        ctx.cache[key] = _flex_mask_mod(ctx, q.device)
    slopes = None if ctx.alibi_slopes is None else ctx.alibi_slopes.to(q.device, torch.float32)
    past = ctx.past_len

    def score_mod(score, b, h, q_idx, kv_idx):
        if softcap:
            score = softcap * torch.tanh(score / softcap)
        if slopes is not None:
            score = score + slopes[h] * (kv_idx - q_idx - past)
        return score
    if q.device.type == "cuda" and _compiled_flex is None:
        _compiled_flex = torch.compile(flex.flex_attention, dynamic=False)
    fn = _compiled_flex if q.device.type == "cuda" else flex.flex_attention
    try:
        return fn(q, k, v, score_mod=score_mod, block_mask=ctx.cache[key], scale=softmax_scale,
                  enable_gqa=k.shape[1] != q.shape[1])
    except NotImplementedError as e:  # torch > 2.7 has no FlexAttention backward on CPU
        raise UserError(f"attn_config.attn_impl: 'flex' cannot run this on {q.device.type} with torch "
                        f"{torch.__version__} ({e}); use attn_impl: torch") from None


def block_attn_configs(attn_config: Dict, block_overrides: Optional[Dict], n_layers: int) -> List[Dict]:
    """Each block's attn_config: `attn_config` with that block's `block_overrides` applied, expanded as
    llm-foundry expands them. `order` lists `{name, repeat}` items or nested `{order, repeat}` lists
    (`default`: no override), the whole order repeated `repeat` times: one name per layer.
    `reuse_kv_layer_idx` (and `reuse_kv_x_layer_idx`) is relative (-1: the layer before) and becomes the
    absolute index of the layer that computes those keys (whose input those keys are computed from);
    pointing at a layer that reuses the same way reuses its source, as llm-foundry resolves them. Raises
    ValueError."""
    if block_overrides is None:
        return [attn_config] * n_layers
    names = _expand_order(block_overrides["order"]) * (block_overrides.get("repeat") or 1)
    if len(names) != n_layers:
        raise ValueError(f"order expands to {len(names)} layers {names}, but n_layers is {n_layers}; "
                         "make them agree (repeat multiplies the order)")
    overrides, configs, sources = block_overrides["overrides"], [], {"reuse_kv_layer_idx": {}, "reuse_kv_x_layer_idx": {}}
    for i, name in enumerate(names):
        if name != "default" and name not in overrides:
            raise ValueError(f"order names {name!r}, which is not in overrides ({sorted(overrides)}); "
                             "define it there or use 'default' for a layer without overrides")
        given = (overrides.get(name) or {}).get("attn_config") or {}
        layer = {**attn_config, **{k: v for k, v in given.items() if v is not None}}
        if given.get("attn_temperature_tuning"):  # its keys are overridden one by one
            layer["attn_temperature_tuning"] = {**attn_config["attn_temperature_tuning"], **{
                k: v for k, v in given["attn_temperature_tuning"].items() if v is not None}}
        reuses = [key for key in sources if given.get(key) is not None]
        if len(reuses) == 2:
            raise ValueError(f"overrides.{name}.attn_config: give one of reuse_kv_layer_idx (an earlier layer's keys "
                             "and values) and reuse_kv_x_layer_idx (an earlier layer's input), not both")
        for key in reuses:
            step, resolved = given[key], sources[key]
            if i + step < 0:
                raise ValueError(f"overrides.{name}.attn_config.{key}: {step} from layer {i} "
                                 "is before the first layer; point at an earlier layer that exists")
            layer[key] = resolved[i] = resolved.get(i + step, i + step)
        if reuses == ["reuse_kv_x_layer_idx"] and attn_config["fused_qkv"]:
            raise ValueError(f"overrides.{name}.attn_config.reuse_kv_x_layer_idx needs attn_config.fused_qkv: false "
                             "(this layer's Wq reads its own input, its Wk and Wv an earlier layer's)")
        configs.append(layer)
    return configs


def _expand_order(order: List[Dict]) -> List[str]:
    names = []
    for item in order:
        names += ([item["name"]] if item.get("name") is not None else _expand_order(item["order"])) * \
            (item.get("repeat") or 1)
    return names


class MPTAttention(nn.Module):
    """Self-attention with MPT's parameter names: `Wqkv` (or `Wq`/`Wk`/`Wv`), `q_ln`/`k_ln`, `out_proj`.

    `attn` is this layer's attn_config (see `block_attn_configs`). A layer with `reuse_kv_layer_idx`
    has only `Wq` (and `q_ln`): it attends over the keys and values that layer computed (its cache
    included), as llm-foundry's does; `shares_kv` marks a layer whose keys another layer reuses.
    A layer with `reuse_kv_x_layer_idx` has all its weights, its keys and values computed from `kv_x`
    (the block normalises that earlier layer's input with its own norm_1); it caches them as its own.
    """

    def __init__(self, config, layer_idx: int, norm_factory, attn: Dict, shares_kv: bool = False):
        super().__init__()
        self.layer_idx, self.shares_kv = layer_idx, shares_kv
        self.n_heads, self.kv_n_heads, self.head_dim = config.n_heads, config.kv_n_heads, config.head_dim
        self.d_model, self.q_dim = config.d_model, config.n_heads * self.head_dim  # q_dim != d_model: head_dim
        self.kv_dim = self.kv_n_heads * self.head_dim
        # llm-foundry scales by the standard head size even when head_dim sets another
        self.softmax_scale = attn["softmax_scale"] or 1 / math.sqrt(config.d_model / config.n_heads)
        self.attn_pdrop, self.clip_qkv = attn["attn_pdrop"], attn["clip_qkv"]
        self.softcap = attn["attn_logit_softcapping"]
        self.sliding_window, self.nope = attn["sliding_window_size"], attn.get("nope", False)
        self.reuse_kv, self.reuse_kv_x = attn.get("reuse_kv_layer_idx"), attn.get("reuse_kv_x_layer_idx")
        tuning = attn["attn_temperature_tuning"]
        self.temperature = (tuning["floor_scale"], tuning["attn_scale"]) if tuning["attn_scale"] else None
        self.impl = attention_impls.get(attn["attn_impl"], "model.attn_config.attn_impl")
        self.fused = attn["fused_qkv"] and self.reuse_kv is None
        bias = not config.no_bias
        qkv_bias = bias if config.attention_bias is None else config.attention_bias  # llm-foundry's rule
        if self.fused:
            self.Wqkv = nn.Linear(self.d_model, self.q_dim + 2 * self.kv_dim, bias=qkv_bias)
            self.Wqkv._fused = (0, [self.q_dim, self.q_dim + self.kv_dim])  # q|k|v rows: see init.py
        else:
            self.Wq = nn.Linear(self.d_model, self.q_dim, bias=qkv_bias)
        if not self.fused and self.reuse_kv is None:
            self.Wk = nn.Linear(self.d_model, self.kv_dim, bias=qkv_bias)
            self.Wv = nn.Linear(self.d_model, self.kv_dim, bias=qkv_bias)
        self.qk_gn = attn["qk_gn"]
        if attn["qk_ln"] or attn["qk_gn"]:  # qk_ln normalises all heads together, qk_gn each head
            self.q_ln = norm_factory(self.head_dim if self.qk_gn else self.q_dim)
            if self.reuse_kv is None:
                self.k_ln = norm_factory(self.head_dim if self.qk_gn else self.kv_dim)
        self.out_proj = nn.Linear(self.q_dim, self.d_model, bias=bias)
        self.out_proj._is_residual = True  # see init.py

    def forward(self, x: torch.Tensor, ctx: AttentionContext, past_key_values=None,
                kv_x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`kv_x`: the keys' and values' input when not `x` (reuse_kv_x_layer_idx; unfused only)."""
        B, S, _ = x.shape
        ctx = ctx.for_layer(self.sliding_window, self.nope)
        own_kv = self.reuse_kv is None
        if self.fused:
            q, k, v = self.Wqkv(x).split([self.q_dim, self.kv_dim, self.kv_dim], dim=-1)
        else:
            kv_x = x if kv_x is None else kv_x
            q, k, v = self.Wq(x), *((self.Wk(kv_x), self.Wv(kv_x)) if own_kv else (None, None))
        if self.clip_qkv:
            q, k, v = [t if t is None else t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v)]
        if hasattr(self, "q_ln"):  # qk_gn: each head on its own
            shape = (B, S, -1, self.head_dim) if self.qk_gn else (B, S, -1)
            q = self.q_ln(q.view(shape)).to(q.dtype)
            k = self.k_ln(k.view(shape)).to(k.dtype) if own_kv else None
        if self.temperature:  # llm-foundry: after the qk norms, before RoPE, computed in fp32
            floor_scale, attn_scale = self.temperature
            pos = torch.arange(ctx.past_len, ctx.k_len, device=q.device, dtype=torch.float32)
            scale = torch.log(torch.floor((pos + 1) / floor_scale) + 1) * attn_scale + 1
            q = (q * scale.view(S, *[1] * (q.dim() - 2))).to(q.dtype)  # q: (B, S, H*D), or (B, S, H, D) after qk_gn
        q = q.reshape(B, S, -1, self.head_dim).transpose(1, 2)
        if ctx.rope is not None:
            q = apply_rope(q, *ctx.rope[0])
        if own_kv:
            k, v = [t.reshape(B, S, -1, self.head_dim).transpose(1, 2) for t in (k, v)]
            if ctx.rope is not None:
                k = apply_rope(k, *ctx.rope[1])
            if past_key_values is not None:
                k, v = past_key_values.update(k, v, self.layer_idx)
            if self.shares_kv:
                ctx.shared_kv[self.layer_idx] = k, v
        else:  # the source layer's keys and values, its cache included; this layer caches nothing
            k, v = ctx.shared_kv[self.reuse_kv]
        out = self.impl(q, k, v, ctx, softmax_scale=self.softmax_scale,
                        dropout_p=self.attn_pdrop if self.training else 0.0, softcap=self.softcap)
        return self.out_proj(out.transpose(1, 2).reshape(B, S, self.q_dim))
