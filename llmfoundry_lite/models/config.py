"""`MPTConfig`: the MPT hyper-parameters, a `transformers.PretrainedConfig` with `model_type = "mpt"`.

It accepts every key of `transformers.MptConfig` (with the same defaults, so a folder written by
`transformers` means the same thing here) plus llm-foundry's MPT keys (`ffn_config`, `init_config`,
`fc_type`, `tie_word_embeddings`, GQA/RoPE/qk-norm keys inside `attn_config`, ...).

The schema is the dataclasses below, checked by `config.check`: unknown keys at any level, wrong
types and conflicting choices are raised together as one `ConfigError`, each problem starting with
its key path (`model.attn_config.alibi_bias_mx: unknown key (did you mean ...)`). The nested
sections are stored on the config as plain dicts (as llm-foundry and transformers do), with every
default filled in, so `config.attn_config["alibi"]` always exists.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Dict, List, Literal, Optional, Union

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig

from llmfoundry_lite import registry
from llmfoundry_lite.compat.hf import PRETRAINED_CONFIG_KEYS, stock_mpt_values
from llmfoundry_lite.config import Name, Positive, Probability, Rule, cross, join, parse, rule
from llmfoundry_lite.models.layers.attention import block_attn_configs


@dataclass
class RopeDailConfig:
    type: Literal["original", "xpos"] = "original"
    pos_idx_in_fp32: bool = True
    xpos_scale_base: float = 512


# llm-foundry's rope_hf_config types (what its MPTConfig accepts) -> the keys each one reads besides `factor`
ROPE_HF_KEYS = {"no_scaling": (), "linear": (), "dynamic": (),
                "llama3": ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def _rope_hf_type(kind) -> Optional[str]:
    if kind in ROPE_HF_KEYS:
        return None
    if kind == "default":
        return "write 'no_scaling', llm-foundry's name for transformers' 'default' rope_type (it refuses 'default')"
    if kind in ("yarn", "longrope"):
        return (f"{kind!r} is a transformers rope_type that llm-foundry's MPTConfig refuses (it accepts "
                f"{', '.join(ROPE_HF_KEYS)}); use one of those")
    return f"{kind!r} is not allowed; expected one of {list(ROPE_HF_KEYS)}{registry.did_you_mean(kind, ROPE_HF_KEYS)}"


@dataclass
class RopeHFConfig:
    """llm-foundry's `rope_hf_config` (with `rope_impl: hf`): transformers' `rope_scaling`, `type` being its
    rope_type; see `rope_inv_freq`. Keys a type does not read are refused (transformers warns and ignores them);
    stored without the unset ones, as llm-foundry would pass them on."""
    type: Annotated[str, Rule(_rope_hf_type)] = "no_scaling"
    factor: Annotated[float, rule(lambda v: v > 0, "must be positive")] = 1.0
    low_freq_factor: Optional[float] = None
    high_freq_factor: Optional[float] = None
    original_max_position_embeddings: Optional[Positive] = None
    KEY_HINTS: ClassVar[Dict[str, str]] = dict.fromkeys(
        ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "short_factor", "long_factor",
         "truncate"), "a key of transformers' yarn / longrope rope types, which llm-foundry's MPTConfig refuses")

    @cross("type", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    def _keys_of_its_type(self, path):
        reads = ROPE_HF_KEYS.get(self.type, ())
        problems = [f"{join(path, key)}: missing required key for type {self.type!r}" for key in reads
                    if getattr(self, key) is None]
        problems += [f"{join(path, key)}: type {self.type!r} does not read it (only "
                     f"{', '.join(t for t, keys in ROPE_HF_KEYS.items() if key in keys)} does); remove it"
                     for key in ROPE_HF_KEYS["llama3"] if key not in reads and getattr(self, key) is not None]
        if self.type == "llama3" and not problems and self.high_freq_factor <= self.low_freq_factor:
            problems.append(f"{join(path, 'high_freq_factor')}: must be greater than low_freq_factor "
                            f"({self.low_freq_factor}), got {self.high_freq_factor}")
        return problems


@dataclass
class TemperatureTuning:
    """llm-foundry's query temperature tuning (Llama 4): queries at position p are multiplied by
    log(floor((p + 1) / floor_scale) + 1) * attn_scale + 1; `attn_scale: 0` (its default) turns it off."""
    floor_scale: Positive = 8192
    attn_scale: float = 0.0


@dataclass
class AttnConfig:
    attn_type: Literal["multihead_attention", "multiquery_attention", "grouped_query_attention"] = \
        "multihead_attention"
    attn_pdrop: Probability = 0.0
    attn_impl: Name[registry.attention_impls] = "torch"  # 'torch' (SDPA), 'flash' or 'flex'
    qk_ln: bool = False
    qk_gn: bool = False
    fused_qkv: bool = True
    clip_qkv: Optional[float] = None
    softmax_scale: Optional[float] = None
    attn_uses_sequence_id: bool = False
    sliding_window_size: Annotated[int, _WINDOW] = -1
    attn_logit_softcapping: Optional[float] = None
    alibi: bool = True
    alibi_bias_max: int = 8
    rope: bool = False
    rope_theta: float = 10000
    rope_impl: Literal["dail", "hf"] = "dail"  # both are the non-interleaved (GPT-NeoX) rotation
    rope_dail_config: RopeDailConfig = field(default_factory=RopeDailConfig)
    rope_hf_config: RopeHFConfig = field(default_factory=RopeHFConfig)
    kv_n_heads: Optional[int] = None
    attn_temperature_tuning: TemperatureTuning = field(default_factory=TemperatureTuning)
    # Accepted for compatibility with older configs and with what llm-foundry writes into every config;
    # only the values that mean "off" are supported.
    nope: Annotated[bool, rule(lambda v: not v, "a model without positions is not an option (as in llm-foundry): "
                                                "make single layers nope in block_overrides")] = False
    prefix_lm: Literal[False] = False
    kv_dim: Optional[Positive] = None  # llm-foundry's key-input width, for cross-attention: only d_model runs
    flex_attn_mod_list: Annotated[List[Any], Rule(lambda v: v and (
        "not needed: attn_impl 'flex' builds its score and mask modifiers (ALiBi, causal, window, padding, "
        "sequence_id) from the config; remove it"))] = field(default_factory=list)
    # transformers' MptAttentionConfig.to_dict() carries PretrainedConfig's keys: ignored
    EXTRA_KEYS: ClassVar[frozenset] = PRETRAINED_CONFIG_KEYS
    extra: Dict[str, Any] = field(default_factory=dict)

    @cross("alibi", "rope")
    def _one_position_scheme(self, path):
        if self.alibi and self.rope:
            return (f"{join(path, 'rope')}: alibi and rope are both on; choose one positional scheme "
                    f"(set {join(path, 'alibi')}: false to use rope)")

    @cross("qk_ln", "qk_gn")
    def _one_qk_norm(self, path):
        if self.qk_ln and self.qk_gn:
            return f"{join(path, 'qk_gn')}: qk_ln and qk_gn are both on; choose one"


def _torch_linear(fc_type) -> Optional[str]:
    name = fc_type if isinstance(fc_type, str) else fc_type.get("name")
    return None if name == "torch" else (f"only 'torch' linear layers are supported (TransformerEngine's 'te' "
                                         f"needs NVIDIA's transformer_engine, not a dependency here), got {name!r}")


# ffn types llm-foundry has that need CUDA-only libraries this project does not use
REFUSED_FFNS = {
    "te_ln_mlp": "TransformerEngine's fused LayerNorm-MLP needs NVIDIA's transformer_engine (CUDA kernels), not a "
                 "dependency here; use mptmlp or mptglu",
    **dict.fromkeys(("mb_moe", "mb_dmoe"), "MegaBlocks' mixture of experts needs MegaBlocks' CUDA kernels, not a "
                                           "dependency here; use torch_dmoe, llm-foundry's dropless MoE in PyTorch"),
}
# torch_dmoe's keys and their values when not written (llm-foundry's dMoE defaults)
MOE_DEFAULTS = {"moe_num_experts": 1, "moe_top_k": 1, "mlp_type": "mlp", "moe_jitter_eps": None,
                "moe_normalize_expert_weights": None, "uniform_expert_assignment": False}
# MegaBlocks' `Arguments` and llm-foundry's MegaBlocks keys that torch_dmoe does not take
MEGABLOCKS_KEYS = frozenset({
    "moe_world_size", "moe_weight_parallelism", "moe_expert_model_parallelism", "expert_parallel_group",
    "weight_parallel_group", "device_mesh", "lbl_process_group", "moe_loss_weight", "moe_lbl_in_fp32",
    "moe_zloss_weight", "moe_zloss_in_fp32", "moe_capacity_factor", "return_bias", "mlp_impl",
    "memory_optimized_mlp", "pipeline_model_parallel_size", "num_layers_per_virtual_pipeline_stage",
    "quantize_inputs_num_bits", "quantize_rematerialize_num_bits", "quantize_scatter_num_bits", "fp16", "bf16",
    "shared_expert", "shared_expert_hidden_size", "shared_expert_weighted_sum", "fc_cls", "fc_kwargs",
    "remat_act_fn", "num_layers", "init_method", "output_layer_init_method", "activation_fn", "args"})


def _ffn_type(name) -> Optional[str]:
    if name in REFUSED_FFNS:
        return f"{name!r} is not supported: {REFUSED_FFNS[name]}"
    return None if name in registry.ffns else registry.ffns.unknown_message(name)


@dataclass
class FFNConfig:
    ffn_type: Annotated[str, Rule(_ffn_type)] = "mptmlp"  # 'mptmlp', 'mptglu' or 'torch_dmoe'
    ffn_act_fn: Optional[Dict[str, Any]] = None  # {name: <torch.nn.functional name>, **kwargs}; default exact gelu
    ffn_hidden_size: Optional[Positive] = None  # default d_model * expansion_ratio (of each expert, for an MoE)
    # llm-foundry copies the top-level fc_type here
    fc_type: Optional[Annotated[Union[str, Dict[str, Any]], Rule(_torch_linear)]] = None
    # torch_dmoe only (None: not written; see MOE_DEFAULTS and TorchDMoE in layers/ffn.py)
    moe_num_experts: Optional[Positive] = None
    moe_top_k: Optional[Positive] = None
    mlp_type: Optional[Literal["mlp", "glu"]] = None
    moe_jitter_eps: Optional[Annotated[float, rule(lambda v: 0 <= v < 1, "in [0, 1)")]] = None
    moe_normalize_expert_weights: Optional[Annotated[float, rule(lambda v: v >= 0, "a p-norm's p (0: off)")]] = None
    uniform_expert_assignment: Optional[bool] = None
    EXTRA_KEYS: ClassVar[frozenset] = MEGABLOCKS_KEYS  # collected to be refused with their reason
    extra: Dict[str, Any] = field(default_factory=dict)

    @cross("ffn_act_fn")
    def _known_activation(self, path):
        name = (self.ffn_act_fn or {"name": "gelu"}).get("name")
        if not isinstance(name, str) or not callable(getattr(F, name, None)):
            return (f"{join(path, 'ffn_act_fn.name')}: {name!r} is not a torch.nn.functional activation "
                    "(e.g. gelu, silu, relu)")

    @cross()  # `extra` is not a key of its own; with a refused or unknown ffn_type, that is the problem
    def _no_megablocks_keys(self, path):
        return [] if self.ffn_type is None else [f"{join(path, key)}: a MegaBlocks key (ffn_type mb_moe / mb_dmoe, which need MegaBlocks' CUDA "
                "kernels, not a dependency here); torch_dmoe keeps every expert on each device and takes none "
                "(llm-foundry refuses them for it too); remove it" for key in self.extra]

    @cross("ffn_type", *MOE_DEFAULTS)
    def _moe_keys(self, path):
        written = [key for key in MOE_DEFAULTS if getattr(self, key) is not None]
        if self.ffn_type != "torch_dmoe":
            return [f"{join(path, key)}: a mixture-of-experts key, taken by ffn_type torch_dmoe only "
                    f"(ffn_type is {self.ffn_type!r})" for key in written]
        experts = self.moe_num_experts or MOE_DEFAULTS["moe_num_experts"]
        if (self.moe_top_k or 1) > experts:
            return f"{join(path, 'moe_top_k')}: {self.moe_top_k} experts per token, but moe_num_experts is {experts}"


_WINDOW = rule(lambda v: v == -1 or v > 0, "-1 (off) or a positive window")


@dataclass
class TemperatureOverride:
    floor_scale: Optional[Positive] = None
    attn_scale: Optional[float] = None


@dataclass
class AttnOverride:
    """The attn_config keys one block may override (llm-foundry's `allowed_block_overrides`)."""
    sliding_window_size: Optional[Annotated[int, _WINDOW]] = None
    nope: Optional[bool] = None  # no positions in this layer: no RoPE rotation, no ALiBi
    reuse_kv_layer_idx: Optional[Annotated[int, rule(lambda v: v < 0, "a negative (relative) layer index, -1 for "
                                                                      "the layer before")]] = None
    # this layer's Wk and Wv read an earlier layer's input (normed by this layer's norm_1); fused_qkv: false
    reuse_kv_x_layer_idx: Optional[Annotated[int, rule(lambda v: v < 0, "a negative (relative) layer index, -1 for "
                                                                        "the layer before")]] = None
    attn_temperature_tuning: Optional[TemperatureOverride] = None


@dataclass
class BlockOverride:
    attn_config: AttnOverride = field(default_factory=AttnOverride)


@dataclass
class OrderItem:
    """A layer kind (`name`: a key of `overrides`, or 'default') or a nested `order`, `repeat` times."""
    name: Optional[str] = None
    order: Optional[List["OrderItem"]] = None
    repeat: Positive = 1

    @cross("name", "order")
    def _name_or_order(self, path):
        if (self.name is None) == (self.order is None):
            return f"{join(path, 'name')}: give exactly one of name or order"


@dataclass
class BlockOverrides:
    """llm-foundry's per-layer overrides: the layers' kinds in `order`, what each kind changes in `overrides`."""
    order: List[OrderItem]
    overrides: Dict[str, BlockOverride]
    repeat: Positive = 1

    @cross("overrides")
    def _default_is_reserved(self, path):
        if "default" in self.overrides:
            return f"{join(path, 'overrides.default')}: 'default' names the layers without overrides; rename it"


_PAIR = rule(lambda v: len(v) == 2, "a number or a [low, high] pair")


def _number_or_bool(value) -> Optional[str]:
    try:
        float(value)
    except ValueError:
        return f"a bool or a number, got {value!r}"
    return None


@dataclass
class InitConfig:
    name: Name[registry.param_inits] = "kaiming_normal_"
    fan_mode: Literal["fan_in", "fan_out"] = "fan_in"
    init_nonlinearity: Literal["linear", "relu", "leaky_relu", "tanh", "sigmoid", "selu"] = "relu"
    # True: divide residual-output weights by sqrt(2 * n_layers); a number: by that
    init_div_is_residual: Annotated[Union[bool, int, float, str], Rule(_number_or_bool)] = True
    emb_init_std: Optional[float] = None
    emb_init_uniform_lim: Union[float, Annotated[List[float], _PAIR], None] = None
    init_std: Optional[float] = None  # required by baseline_
    init_gain: float = 0.0
    verbose: int = 0  # written by MosaicML's original MPT configs; ignored

    @cross("name", "init_std")
    def _baseline_needs_std(self, path):
        if self.name == "baseline_" and self.init_std is None:
            return f"{join(path, 'init_std')}: baseline_ init needs init_std (e.g. 0.02)"

    @cross("emb_init_std", "emb_init_uniform_lim")
    def _one_embedding_init(self, path):
        if self.emb_init_std is not None and self.emb_init_uniform_lim is not None:
            return f"{join(path, 'emb_init_uniform_lim')}: set either emb_init_std or emb_init_uniform_lim, not both"


def _registered_norm(name: str) -> Optional[str]:
    if name.lower() not in registry.norms:  # llm-foundry's names are matched case-insensitively
        return registry.norms.unknown_message(name)
    return None


def _torch_device(name: str) -> Optional[str]:
    try:
        torch.device(name)
    except (RuntimeError, TypeError):
        return f"not a torch device: {name!r} (use cpu, meta or cuda)"
    return None


@dataclass
class MPTSchema:
    """The model keys, their types and defaults (transformers' `MptConfig` defaults where they overlap)."""
    d_model: Positive = 2048
    n_heads: Positive = 16
    n_layers: Positive = 24
    expansion_ratio: Annotated[float, rule(lambda v: v > 0, "must be positive")] = 4
    max_seq_len: Positive = 2048
    vocab_size: Positive = 50368
    resid_pdrop: Probability = 0.0
    emb_pdrop: Probability = 0.0
    learned_pos_emb: bool = True  # only used when neither alibi nor rope is on (as in llm-foundry)
    head_dim: Optional[Positive] = None  # size of a head; None: d_model // n_heads (llm-foundry's key)
    attention_bias: Optional[bool] = None  # biases of the q/k/v projections; None: `not no_bias` (llm-foundry)
    attn_config: AttnConfig = field(default_factory=AttnConfig)
    ffn_config: FFNConfig = field(default_factory=FFNConfig)
    init_config: InitConfig = field(default_factory=InitConfig)
    init_device: Annotated[str, Rule(_torch_device)] = "cpu"
    logit_scale: Union[float, Literal["inv_sqrt_d_model"], None] = None
    final_logit_softcapping: Optional[float] = None
    no_bias: bool = True
    embedding_fraction: Annotated[float, rule(lambda v: 0 < v <= 1, "must be in (0, 1]")] = 1.0
    norm_type: Annotated[str, Rule(_registered_norm)] = "low_precision_layernorm"
    layer_norm_epsilon: float = 1e-5
    norm_eps: Optional[float] = None  # llm-foundry's name for layer_norm_epsilon
    use_cache: bool = False
    tie_word_embeddings: bool = True
    fc_type: Annotated[Union[str, Dict[str, Any]], Rule(_torch_linear)] = "torch"
    use_pad_tok_in_ffn: bool = True  # pad tokens always go through the FFN; their outputs are unused
    block_overrides: Optional[BlockOverrides] = None  # stored as written, as llm-foundry saves it
    initializer_range: float = 0.02  # transformers' key; MPT init is set by init_config
    verbose: int = 0
    tokenizer_name: Optional[str] = None  # written by MosaicML's original MPT configs
    # Keys `transformers.PretrainedConfig` understands (special-token ids, generation defaults, labels,
    # bookkeeping) pass straight through to it; transformers' attribute names are aliases.
    EXTRA_KEYS: ClassVar[frozenset] = PRETRAINED_CONFIG_KEYS
    ALIASES: ClassVar[Dict[str, str]] = {"num_attention_heads": "n_heads", "hidden_size": "d_model",
                                         "num_hidden_layers": "n_layers"}
    extra: Dict[str, Any] = field(default_factory=dict)

    @cross("d_model", "n_heads")
    def _heads_divide_width(self, path):
        if self.d_model % self.n_heads:
            return f"{join(path, 'd_model')}: d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"

    @cross("d_model", "n_heads", "head_dim", "attn_config")
    def _head_size_with_dail_rope(self, path):
        # llm-foundry's dail RoPE rotates d_model // n_heads features of each head whatever head_dim is;
        # flash-attn's rotary asserts "rotary_dim must be <= headdim", so narrower heads fail there
        attn, rotary_dim = self.attn_config, self.d_model // self.n_heads
        if self.head_dim is not None and self.head_dim < rotary_dim and attn.rope and attn.rope_impl == "dail":
            return (f"{join(path, 'head_dim')}: {self.head_dim} is narrower than the {rotary_dim} features "
                    f"(d_model // n_heads) that rope_impl 'dail' rotates in each head, which llm-foundry's flash-attn "
                    f"rotary refuses too; use rope_impl: hf (it rotates head_dim features) or head_dim >= {rotary_dim}")

    @cross("n_layers", "block_overrides", "attn_config", "learned_pos_emb")
    def _block_overrides_expand(self, path):
        if self.block_overrides is None:
            return None
        where = join(path, "block_overrides")
        if self.learned_pos_emb and not (self.attn_config.alibi or self.attn_config.rope) and any(
                o.attn_config.nope for o in self.block_overrides.overrides.values()):
            return (f"{where}: nope layers need alibi or rope: learned positions are added to every layer's input "
                    "(as in llm-foundry)")
        try:
            block_attn_configs(dataclasses.asdict(self.attn_config), dataclasses.asdict(self.block_overrides),
                               self.n_layers)
        except ValueError as e:
            return f"{where}: {e}"

    @cross("d_model", "attn_config")
    def _self_attention_only(self, path):
        if self.attn_config.kv_dim not in (None, self.d_model):
            return (f"{join(path, 'attn_config.kv_dim')}: {self.attn_config.kv_dim} != d_model ({self.d_model}): "
                    "keys of another width are for cross-attention, which MPT never runs; remove kv_dim")

    @cross("n_heads", "attn_config")
    def _kv_heads(self, path):
        kv, attn_type = self.attn_config.kv_n_heads, self.attn_config.attn_type
        where = join(path, "attn_config.kv_n_heads")
        if kv is not None and (kv <= 0 or self.n_heads % kv):
            return f"{where}: kv_n_heads ({kv}) must divide n_heads ({self.n_heads})"
        if kv is not None and attn_type == "multihead_attention" and kv != self.n_heads:
            return f"{where}: only grouped_query_attention takes kv_n_heads ({kv} != n_heads {self.n_heads})"
        if kv is not None and attn_type == "multiquery_attention" and kv != 1:
            return f"{where}: multiquery_attention has one kv head"
        if attn_type == "grouped_query_attention" and kv is None:
            return f"{where}: grouped_query_attention needs kv_n_heads"

    @cross("d_model", "expansion_ratio", "ffn_config")
    def _whole_ffn_width(self, path):
        if self.ffn_config.ffn_hidden_size is None and int(self.d_model * self.expansion_ratio) != \
                self.d_model * self.expansion_ratio:
            return (f"{join(path, 'expansion_ratio')}: d_model * expansion_ratio must be a whole number, or set "
                    "ffn_config.ffn_hidden_size")

    @cross("norm_eps", "layer_norm_epsilon")
    def _one_epsilon(self, path):
        if self.norm_eps is not None and self.norm_eps != self.layer_norm_epsilon and \
                self.layer_norm_epsilon != MPTSchema.layer_norm_epsilon:
            return f"{join(path, 'norm_eps')}: norm_eps and layer_norm_epsilon disagree; set one"


class MPTConfig(PretrainedConfig):
    """MPT hyper-parameters; see `MPTSchema` for the keys. Invalid keys raise one `ConfigError`."""

    model_type = "mpt"
    attribute_map = MPTSchema.ALIASES

    def __init__(self, **kwargs):
        for sub in ("attn_config", "ffn_config", "init_config"):
            if hasattr(kwargs.get(sub), "to_dict"):  # transformers' MptAttentionConfig object
                kwargs[sub] = kwargs[sub].to_dict()
        schema = parse(MPTSchema, kwargs, "model", header="invalid MPT model config")
        values = dataclasses.asdict(schema)
        values.pop("extra")  # passed to PretrainedConfig below
        values["block_overrides"] = copy.deepcopy(kwargs.get("block_overrides"))  # as written (checked above)
        values["head_dim"] = schema.head_dim or schema.d_model // schema.n_heads
        for off in ("extra", "nope"):  # checked to be off: nothing to store
            values["attn_config"].pop(off)
        rope_hf = values["attn_config"]["rope_hf_config"]  # its type's keys only: llm-foundry passes on every key
        values["attn_config"]["rope_hf_config"] = {k: v for k, v in rope_hf.items() if v is not None}
        values["init_config"].pop("verbose")
        if values.pop("norm_eps") is not None:
            values["layer_norm_epsilon"] = schema.norm_eps
        ffn = values["ffn_config"]
        ffn.pop("extra")  # MegaBlocks keys: refused above
        for key in MOE_DEFAULTS:  # stored for torch_dmoe only, all of them (llm-foundry needs each one)
            if ffn[key] is None and ffn["ffn_type"] != "torch_dmoe":
                ffn.pop(key)
            elif ffn[key] is None:
                ffn[key] = MOE_DEFAULTS[key]
        if values["ffn_config"]["ffn_act_fn"] is None:
            values["ffn_config"]["ffn_act_fn"] = {"name": "gelu", "approximate": "none"}
        tie = values.pop("tie_word_embeddings")
        for key, value in values.items():
            setattr(self, key, value)
        super().__init__(tie_word_embeddings=tie, **schema.extra)

    def to_dict(self):
        """As written to config.json: numbers typed as stock transformers' MptConfig declares them."""
        return stock_mpt_values(super().to_dict())

    # --- derived values the model uses ----------------------------------------------------------
    @property
    def kv_n_heads(self) -> int:
        attn_type = self.attn_config["attn_type"]
        if attn_type == "multiquery_attention":
            return 1
        if attn_type == "grouped_query_attention":
            return self.attn_config["kv_n_heads"]
        return self.n_heads

    @property
    def ffn_hidden_size(self) -> int:
        size = self.ffn_config.get("ffn_hidden_size")
        return int(size) if size is not None else int(self.d_model * self.expansion_ratio)

    @property
    def position_scheme(self) -> str:
        """'alibi', 'rope', 'learned' or 'none' (alibi/rope switch learned_pos_emb off, as in llm-foundry)."""
        if self.attn_config["alibi"]:
            return "alibi"
        if self.attn_config["rope"]:
            return "rope"
        return "learned" if self.learned_pos_emb else "none"
