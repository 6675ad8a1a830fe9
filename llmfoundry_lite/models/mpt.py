"""MPT, the MosaicML Pretrained Transformer, in plain PyTorch, numerically equal to `transformers`' Mpt.

Architecture choices (each set in `MPTConfig`, see config.py):
- decoder-only, pre-norm blocks: x += attn(norm_1(x)); x += ffn(norm_2(x)); a final `norm_f`.
- positions: ALiBi (default; slopes as MPT defines them, so `max_seq_len` can be raised at load
  time to extrapolate), or RoPE (`rope`, `rope_theta`; hf scaling, or flash-attn's dail incl. XPos),
  or learned embeddings (`wpe`).
- per-layer `block_overrides` (llm-foundry's): a layer's own sliding window, no positions (`nope`),
  the keys/values of an earlier layer (`reuse_kv_layer_idx`; such a layer has only `Wq`), or its own
  keys/values computed from an earlier layer's input (`reuse_kv_x_layer_idx`, normed by its own norm_1).
- attention: fused `Wqkv`, multi-head / grouped-query / multi-query, optional qk LayerNorm or
  per-head GroupNorm, `clip_qkv`, packed-sequence masking by `sequence_id`, sliding window, KV cache
  (transformers' `Cache`); the kernel (`torch` SDPA or `flash`) comes from a registry.
- no biases and low-precision LayerNorm by default; `mptmlp` (GELU) or `mptglu` FFNs, or llm-foundry's
  dropless mixture of experts `torch_dmoe` (no load-balancing loss, as there).
- weight-tied unembedding by default, optional `logit_scale` and final logit soft-capping.
Parameter names equal transformers' Mpt state-dict keys, so HF folders load in both directions.
Padding is given by `attention_mask` (left or right); RoPE / learned positions count only real
tokens, ALiBi is relative and needs no position ids.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)

from llmfoundry_lite.compat.hf import KV_CACHE
from llmfoundry_lite.errors import UserError
from llmfoundry_lite.models.config import MPTConfig
from llmfoundry_lite.models.layers.attention import (
    AttentionContext,
    MPTAttention,
    alibi_slopes,
    block_attn_configs,
    dail_rope_cos_sin,
    rope_cos_sin,
)
from llmfoundry_lite.models.layers.norms import build_norm
from llmfoundry_lite.registry import ffns, param_inits

FFN_COMMON_KEYS = ("ffn_type", "ffn_act_fn", "ffn_hidden_size", "fc_type")  # the rest go to the FFN
IGNORE_INDEX = -100  # a label without a target (transformers' and torch's convention); data and eval use it too


class MPTBlock(nn.Module):
    def __init__(self, config: MPTConfig, layer_idx: int, attn: dict, shares_kv: bool = False,
                 shares_x: bool = False):
        super().__init__()
        self.layer_idx, self.shares_x = layer_idx, shares_x  # shares_x: a later layer's keys read this input
        bias = not config.no_bias
        norm = functools.partial(build_norm, config.norm_type, eps=config.layer_norm_epsilon, bias=bias)
        self.norm_1 = norm(config.d_model)
        self.attn = MPTAttention(config, layer_idx, norm, attn, shares_kv)
        self.norm_2 = norm(config.d_model)
        ffn = config.ffn_config
        ffn_cls = ffns.get(ffn["ffn_type"], "model.ffn_config.ffn_type")
        own_keys = {k: v for k, v in ffn.items() if k not in FFN_COMMON_KEYS}  # e.g. torch_dmoe's moe_* keys
        self.ffn = ffn_cls(config.d_model, config.ffn_hidden_size, ffn["ffn_act_fn"], bias, **own_keys)
        self.ffn_skips_padding = not config.use_pad_tok_in_ffn
        self.resid_attn_dropout = nn.Dropout(config.resid_pdrop)
        self.resid_ffn_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, past_key_values: Optional[Cache] = None):
        if self.shares_x:
            ctx.shared_x[self.layer_idx] = x
        kv_x = None if self.attn.reuse_kv_x is None else self.norm_1(ctx.shared_x[self.attn.reuse_kv_x])
        x = x + self.resid_attn_dropout(self.attn(self.norm_1(x), ctx, past_key_values, kv_x))
        return x + self.resid_ffn_dropout(self._ffn(self.norm_2(x), ctx))

    def _ffn(self, h: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """`use_pad_tok_in_ffn: false` (llm-foundry): padding tokens skip the FFN, which adds 0 to them."""
        if not (self.ffn_skips_padding and ctx.key_padding_mask is not None):
            return self.ffn(h)
        real = ctx.key_padding_mask[:, -h.shape[1]:].to(h.device)
        out = h.new_zeros(h.shape)
        out[real] = self.ffn(h[real]).to(h.dtype)
        return out


class MPTPreTrainedModel(PreTrainedModel):
    """Hooks that other code finds by name (so the model imports no Composer): transformers calls
    `_init_weights`; Composer and assembly/sharding.py call `param_init_fn` for each module built on
    `meta`, and `fsdp_wrap_fn` / `activation_checkpointing_fn` to pick what FSDP shards and
    activation checkpointing wraps (each `MPTBlock`)."""
    config_class = MPTConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["MPTBlock"]
    _supports_cache_class = True
    _supports_sdpa = True

    def _build_device(self):
        """Build parameters on `config.init_device` (e.g. 'meta' for FSDP, initialised later)."""
        device = self.config.init_device
        return contextlib.nullcontext() if device in ("cpu", None) else torch.device(device)

    def param_init_fn(self, module: nn.Module) -> None:
        """Initialise `module`'s own parameters as `config.init_config` says (for meta-device builds)."""
        if module is getattr(self, "lm_head", None) and self.config.tie_word_embeddings:
            return  # it is the embedding matrix, initialised as one
        cfg = {k: v for k, v in self.config.init_config.items() if k != "name"}
        param_inits.get(self.config.init_config["name"], "model.init_config.name")(
            module, n_layers=self.config.n_layers, d_model=self.config.d_model, **cfg)

    def _init_weights(self, module: nn.Module) -> None:
        if not any(p.is_meta for p in module.parameters(recurse=False)):
            self.param_init_fn(module)

    @staticmethod
    def fsdp_wrap_fn(module: nn.Module) -> bool:
        return isinstance(module, MPTBlock)

    activation_checkpointing_fn = fsdp_wrap_fn


class MPTModel(MPTPreTrainedModel):
    """Embeddings, the blocks and the final norm; returns hidden states."""

    def __init__(self, config: MPTConfig):
        super().__init__(config)
        with self._build_device():
            self.wte = nn.Embedding(config.vocab_size, config.d_model)
            if config.position_scheme == "learned":
                self.wpe = nn.Embedding(config.max_seq_len, config.d_model)
            self.emb_drop = nn.Dropout(config.emb_pdrop)
            attn = block_attn_configs(config.attn_config, config.block_overrides, config.n_layers)
            sources, x_sources = ({a.get(key) for a in attn} for key in ("reuse_kv_layer_idx", "reuse_kv_x_layer_idx"))
            self.blocks = nn.ModuleList([MPTBlock(config, i, a, i in sources, i in x_sources)
                                         for i, a in enumerate(attn)])
            self.norm_f = build_norm(config.norm_type, config.d_model, config.layer_norm_epsilon, not config.no_bias)
        self._bias_cache = {}  # the ALiBi/causal bias of the last unpadded shape, reused across steps
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, sequence_id=None,
                inputs_embeds=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        if output_attentions:
            raise UserError("output_attentions is not supported by MPTModel (its attention kernels never "
                            "materialise the probabilities)")
        if (input_ids is None) == (inputs_embeds is None):
            raise UserError("pass exactly one of input_ids or inputs_embeds")
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = kwargs.get(KV_CACHE, past_key_values)
        if isinstance(cache, (tuple, list)):  # transformers' legacy format
            cache = DynamicCache.from_legacy_cache(cache)
        if use_cache and cache is None:
            cache = DynamicCache()
        past_len = cache.get_seq_length() if cache is not None else 0
        attention_mask, sequence_id = self._checked_masks(x, attention_mask, sequence_id, past_len)
        positions = self._positions(x, attention_mask, sequence_id, past_len)
        if self.config.position_scheme == "learned":
            x = x + self.wpe(positions)
        if (fraction := self.config.embedding_fraction) != 1:  # scale the embedding gradient only (stability trick)
            x = x * fraction + x.detach() * (1 - fraction)
        x = self.emb_drop(x)
        ctx = self._attention_context(x, attention_mask, sequence_id, positions, past_len)
        hidden_states = () if output_hidden_states else None
        for block in self.blocks:
            if output_hidden_states:
                hidden_states += (x,)
            x = block(x, ctx, cache)
        x = self.norm_f(x)
        if output_hidden_states:
            hidden_states += (x,)
        out = BaseModelOutputWithPast(last_hidden_state=x, hidden_states=hidden_states,
                                      **{KV_CACHE: cache if use_cache else None})
        return out if return_dict is not False else out.to_tuple()

    def _checked_masks(self, x, attention_mask, sequence_id, past_len: int):
        """Check the length against `max_seq_len` and the masks against the input; the masks to use."""
        (B, S), max_len = x.shape[:2], self.config.max_seq_len
        if past_len + S > max_len:
            raise UserError(f"the sequence ({past_len + S} tokens) is longer than max_seq_len ({max_len}); "
                            f"shorten the input, or raise config.max_seq_len when loading (ALiBi/RoPE models "
                            f"extrapolate; learned position embeddings cannot)")
        if attention_mask is not None:
            attention_mask = attention_mask.to(x.device).bool()
            if attention_mask.shape != (B, past_len + S):
                raise UserError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected "
                                f"(batch, past + new tokens) = {(B, past_len + S)}")
        if not self.config.attn_config["attn_uses_sequence_id"]:
            sequence_id = None  # as in llm-foundry: packed sequences see each other unless asked not to
        if sequence_id is not None and past_len:
            raise UserError("sequence_id cannot be combined with a KV cache (past_key_values)")
        return attention_mask, sequence_id

    def _positions(self, x, attention_mask, sequence_id, past_len: int) -> Optional[torch.Tensor]:
        """Position ids (B, S) for hf RoPE / learned positions (None otherwise): real tokens, per sequence."""
        scheme = self.config.position_scheme
        if scheme != "learned" and (scheme != "rope" or self.config.attn_config["rope_impl"] == "dail"):
            return None
        (batch, seq), device = x.shape[:2], x.device
        if sequence_id is not None:
            idx = torch.arange(seq, device=device).expand(batch, seq)
            starts = torch.ones_like(sequence_id, dtype=torch.bool)
            starts[:, 1:] = sequence_id[:, 1:] != sequence_id[:, :-1]
            return idx - torch.where(starts, idx, 0).cummax(dim=1).values
        if attention_mask is not None:
            return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]
        return torch.arange(past_len, past_len + seq, device=device).expand(batch, seq)

    def _attention_context(self, x, attention_mask, sequence_id, positions, past_len: int) -> AttentionContext:
        """Positions and masks for every layer's attention; without padding or packing the bias
        depends on shapes only, so the last shape's bias is kept and reused across calls."""
        cfg, attn, S = self.config, self.config.attn_config, x.shape[1]
        padded = attention_mask is not None and not bool(attention_mask.all())
        ctx = AttentionContext(
            q_len=S, past_len=past_len, key_padding_mask=attention_mask if padded else None,
            sequence_id=sequence_id, sliding_window=attn["sliding_window_size"],
            alibi_slopes=alibi_slopes(cfg.n_heads, attn["alibi_bias_max"], x.device)
            if cfg.position_scheme == "alibi" else None,
            rope=self._rope(x, positions, past_len) if cfg.position_scheme == "rope" else None)
        if not padded and sequence_id is None:
            self._bias_cache = {(S, past_len): self._bias_cache.get((S, past_len), {})}
            ctx.cache = self._bias_cache[(S, past_len)]
        return ctx

    def _rope(self, x, positions, past_len: int):
        """(queries', keys') RoPE cos/sin. llm-foundry's dail RoPE counts positions from the first token
        whatever the padding or packing (flash-attn's `seqlen_offset`); its hf RoPE counts real tokens."""
        attn, S = self.config.attn_config, x.shape[1]
        if attn["rope_impl"] == "dail":
            rotary_dim = self.config.d_model // self.config.n_heads  # llm-foundry's, whatever head_dim is
            return dail_rope_cos_sin(past_len, S, rotary_dim, attn["rope_theta"], attn["rope_dail_config"],
                                     x.dtype, x.device)
        cos_sin = rope_cos_sin(positions, self.config.head_dim, attn["rope_theta"], attn["rope_hf_config"],
                               self.config.max_seq_len, x.dtype)
        return cos_sin, cos_sin


def _cross_entropy_grad_(logp: torch.Tensor, index: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """The cross-entropy gradient w.r.t. the logits, written over `logp` (log-softmax, (tokens, vocab)):
    softmax minus one-hot of the targets, each row times `row_scale` (0 for ignored targets)."""
    grad = logp.exp_()
    grad.scatter_add_(1, index, torch.full_like(index, -1, dtype=grad.dtype))
    return grad.mul_(row_scale.to(grad.dtype)[:, None])


class CrossEntropy(torch.autograd.Function):
    """Mean next-token cross-entropy over targets != -100 (0 when there are none).

    Equal to `F.cross_entropy(..., ignore_index=-100)` but its backward writes the (tokens, vocab)
    gradient in one pass (softmax minus one-hot, in place) instead of filling a dense zero gradient
    and running log-softmax's backward over it: ~2x faster for this, the largest tensor of a step.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        valid = targets != IGNORE_INDEX
        index = torch.where(valid, targets, 0)[:, None]
        logp = torch.log_softmax(logits, dim=-1)
        count = valid.sum().clamp(min=1)
        ctx.save_for_backward(logp, index, valid, count)
        return -(logp.gather(1, index).squeeze(1) * valid).sum() / count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        logp, index, valid, count = ctx.saved_tensors  # logp is not needed again: overwritten in place
        return _cross_entropy_grad_(logp, index, valid * (grad_out / count)), None


class FusedLinearCrossEntropy(torch.autograd.Function):
    """`CrossEntropy(hidden @ weight.T * scale, targets)` without the (tokens, vocab) logits.

    Tokens go through the unembedding in chunks; each chunk's logits exist only while its loss and its
    gradients (w.r.t. hidden and weight, computed at once while the softmax is at hand) are computed:
    the extra memory is one chunk's logits plus the gradients, not three (tokens, vocab) tensors (the
    logits, their fp32 copy, the saved log-softmax). Backward only scales the stored gradients.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: float,
                chunk: int) -> torch.Tensor:
        acc = torch.promote_types(hidden.dtype, torch.float32)  # softmax and sums in fp32 (or fp64)
        valid = targets != IGNORE_INDEX
        count = valid.sum().clamp(min=1)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=acc)
        loss = hidden.new_zeros((), dtype=acc)
        for start in range(0, hidden.shape[0], chunk):
            h, t, v = hidden[start:start + chunk], targets[start:start + chunk], valid[start:start + chunk]
            index = torch.where(v, t, 0)[:, None]
            logits = (h @ weight.T).to(acc) * scale
            lse = torch.logsumexp(logits, dim=-1)
            loss += ((lse - logits.gather(1, index).squeeze(1)) * v).sum()
            grad = _cross_entropy_grad_(logits.sub_(lse[:, None]), index, v * (scale / count)).to(weight.dtype)
            grad_hidden[start:start + chunk] = grad @ weight
            grad_weight += (grad.T @ h).to(acc)
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return loss / count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_out, grad_weight * grad_out, None, None, None


class MPTForCausalLM(MPTPreTrainedModel, GenerationMixin):
    """`fused_loss = True` (set by the training code for `loss_fn: fused_crossentropy`) computes the
    training loss with `FusedLinearCrossEntropy` and returns no logits while training with labels."""
    # target -> source; transformers 5 reads the mapping, transformers 4 iterates it for the names
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}
    fused_loss = False

    def __init__(self, config: MPTConfig):
        super().__init__(config)
        self.transformer = MPTModel(config)
        with self._build_device():
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        scale = config.logit_scale
        self.logit_scale = 1 / math.sqrt(config.d_model) if scale == "inv_sqrt_d_model" else scale
        self.post_init()
        self._register_load_state_dict_pre_hook(self._tied_head_from_embedding)

    def _tied_head_from_embedding(self, state_dict, prefix, *args):
        """A tied model's weights may come without `lm_head.weight`: llm-foundry's MPT has no lm_head
        module (its Composer checkpoints hold the embedding alone), so it is the embedding here too."""
        embedding = state_dict.get(prefix + "transformer.wte.weight")
        if self.config.tie_word_embeddings and embedding is not None:
            state_dict.setdefault(prefix + "lm_head.weight", embedding)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, sequence_id=None, labels=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        """labels are aligned with input_ids (shifted inside, -100 ignored), as in transformers."""
        out = self.transformer(input_ids, past_key_values=kwargs.get(KV_CACHE, past_key_values),
                               attention_mask=attention_mask,
                               sequence_id=sequence_id, inputs_embeds=inputs_embeds, use_cache=use_cache,
                               output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        hidden = out.last_hidden_state
        # shift the labels, not the logits: slicing the (B, S, vocab) logits would copy them
        targets = (None if labels is None
                   else F.pad(labels[:, 1:].to(hidden.device), (0, 1), value=IGNORE_INDEX).flatten())
        cap = self.config.final_logit_softcapping
        if targets is not None and self.fused_loss and self.training and torch.is_grad_enabled():
            if cap:
                raise UserError("loss_fn: fused_crossentropy does not support final_logit_softcapping; "
                                "use loss_fn: torch_crossentropy")
            logits, chunk = None, max(256, 2**28 // self.config.vocab_size)  # ~1 GiB of fp32 logits per chunk
            loss = FusedLinearCrossEntropy.apply(hidden.flatten(0, 1), self.lm_head.weight, targets,
                                                 self.logit_scale or 1.0, chunk)
        else:
            logits = self.lm_head(hidden)
            if self.logit_scale is not None:
                logits = logits * self.logit_scale
            if cap:
                logits = cap * torch.tanh(logits / cap)
            loss = None if targets is None else CrossEntropy.apply(logits.flatten(0, 1).float(), targets)
        result = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                        **{KV_CACHE: getattr(out, KV_CACHE)})
        return result if return_dict is not False else result.to_tuple()


class MPTForSequenceClassification(MPTPreTrainedModel):
    """Classifies the last non-pad token (the rightmost token that is not `pad_token_id`)."""

    def __init__(self, config: MPTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = MPTModel(config)
        with self._build_device():
            self.score = nn.Linear(config.d_model, config.num_labels, bias=False)
        self.post_init()

    def forward(self, input_ids=None, labels=None, return_dict=None, **inputs):
        """`inputs`: MPTModel's (attention_mask, past_key_values, inputs_embeds, use_cache, ...)."""
        out = self.transformer(input_ids, **inputs)
        logits = self.score(out.last_hidden_state)
        B, pad = logits.shape[0], self.config.pad_token_id
        if pad is None and B != 1:
            raise UserError("sequence classification of a batch needs config.pad_token_id to find the last token")
        if pad is None or input_ids is None:  # no way to find padding: the last position
            pooled = logits[:, -1]
        else:
            nonpad = torch.arange(input_ids.shape[-1], device=logits.device) * (input_ids != pad).to(logits.device)
            pooled = logits[torch.arange(B, device=logits.device), nonpad.argmax(-1)]
        loss = None if labels is None else _classification_loss(self.config, pooled, labels.to(pooled.device))
        result = SequenceClassifierOutputWithPast(loss=loss, logits=pooled, **{KV_CACHE: getattr(out, KV_CACHE)},
                                                  hidden_states=out.hidden_states)
        return result if return_dict is not False else result.to_tuple()


def _classification_loss(config, logits, labels):
    """transformers' rule: regression for one label, CE for integer labels, else multi-label BCE."""
    if config.problem_type is None:
        config.problem_type = ("regression" if config.num_labels == 1
                               else "single_label_classification" if labels.dtype in (torch.long, torch.int)
                               else "multi_label_classification")
    if config.problem_type == "regression":
        return F.mse_loss(logits.squeeze(), labels.squeeze()) if config.num_labels == 1 else F.mse_loss(logits, labels)
    if config.problem_type == "single_label_classification":
        return F.cross_entropy(logits, labels)
    return F.binary_cross_entropy_with_logits(logits, labels)


class MPTForTokenClassification(MPTPreTrainedModel):
    def __init__(self, config: MPTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = MPTModel(config)
        dropout = next((p for p in (getattr(config, "classifier_dropout", None),
                                    getattr(config, "hidden_dropout", None)) if p is not None), 0.1)
        self.dropout = nn.Dropout(dropout)
        with self._build_device():
            self.classifier = nn.Linear(config.d_model, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, labels=None, return_dict=None, **inputs):
        """`inputs`: MPTModel's (attention_mask, past_key_values, inputs_embeds, use_cache, ...)."""
        out = self.transformer(input_ids, **inputs)
        logits = self.classifier(self.dropout(out.last_hidden_state))
        loss = None if labels is None else F.cross_entropy(logits.flatten(0, 1), labels.to(logits.device).flatten())
        result = TokenClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)
        return result if return_dict is not False else result.to_tuple()


class MPTForQuestionAnswering(MPTPreTrainedModel):
    def __init__(self, config: MPTConfig):
        super().__init__(config)
        self.transformer = MPTModel(config)
        with self._build_device():
            self.qa_outputs = nn.Linear(config.d_model, 2)
        self.post_init()

    def forward(self, input_ids=None, start_positions=None, end_positions=None, return_dict=None, **inputs):
        """`inputs`: MPTModel's (attention_mask, inputs_embeds, output_hidden_states, ...)."""
        out = self.transformer(input_ids, **inputs)
        start_logits, end_logits = (t.contiguous() for t in self.qa_outputs(out.last_hidden_state).unbind(-1))
        loss = None
        if start_positions is not None and end_positions is not None:
            # positions outside the input are clamped to an ignored index, as in transformers
            ignored = start_logits.size(1)
            start = start_positions.reshape(-1).clamp(0, ignored).to(start_logits.device)
            end = end_positions.reshape(-1).clamp(0, ignored).to(end_logits.device)
            loss = (F.cross_entropy(start_logits, start, ignore_index=ignored)
                    + F.cross_entropy(end_logits, end, ignore_index=ignored)) / 2
        result = QuestionAnsweringModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits,
                                              hidden_states=out.hidden_states)
        return result if return_dict is not False else result.to_tuple()


def flops_per_token(config: MPTConfig, seq_len: int, recompute: bool = False) -> float:
    """Training FLOPs per token: 6 * (matmul parameters) + 12 * n_layers * d_model * seq_len (attention).

    `recompute=True` counts the hardware FLOPs of activation checkpointing, which runs every block's
    forward (2 * block matmul parameters + 4 * n_layers * d_model * seq_len) a second time (for HFU)."""
    d, q, kv = config.d_model, config.n_heads * config.head_dim, config.kv_n_heads * config.head_dim
    ffn = config.ffn_config
    n_ffn_mats = 3 if "glu" in (ffn["ffn_type"], ffn.get("mlp_type")) else 2
    ffn_params = n_ffn_mats * d * config.ffn_hidden_size
    if ffn["ffn_type"] == "torch_dmoe":  # a token runs the router and its top_k experts
        ffn_params = d * ffn["moe_num_experts"] + ffn["moe_top_k"] * ffn_params
    blocks = config.n_layers * (d * (q + 2 * kv) + q * d + ffn_params)
    model_flops = 6.0 * (blocks + d * config.vocab_size) + 12.0 * config.n_layers * q * seq_len
    return model_flops + (2.0 * blocks + 4.0 * config.n_layers * q * seq_len if recompute else 0.0)
