"""`MPTConfig`: the MPT hyper-parameters, a `transformers.PretrainedConfig` with `model_type = "mpt"`.

It accepts every key of `transformers.MptConfig` (with the same defaults, so a folder written by
`transformers` means the same thing here) plus llm-foundry's MPT keys (`ffn_config`, `init_config`,
`fc_type`, `tie_word_embeddings`, GQA/RoPE/qk-norm keys inside `attn_config`, ...).

The schema is the dataclasses below. Unknown keys at any level, wrong types and conflicting choices
are collected by `model_config_problems` and raised together as one `ConfigError`, each problem
starting with its key path (`model.attn_config.alibi_bias_mx: unknown key (did you mean ...)`).
The nested sections are stored on the config as plain dicts (as llm-foundry and transformers do),
with every default filled in, so `config.attn_config["alibi"]` always exists.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Union

from transformers import PretrainedConfig

from llmfoundry_lite import registry
from llmfoundry_lite.compat import PRETRAINED_CONFIG_KEYS, stock_mpt_values
from llmfoundry_lite.config import check
from llmfoundry_lite.config.schema import join
from llmfoundry_lite.errors import ConfigError
from llmfoundry_lite.models import layers  # noqa: F401  (fills the registries checked below)


@dataclass
class RopeDailConfig:
    type: Literal["original"] = "original"  # 'xpos' (llm-foundry, flash-attn only) is not supported
    pos_idx_in_fp32: bool = True
    xpos_scale_base: float = 512


@dataclass
class RopeHFConfig:
    type: Literal["no_scaling", "linear", "dynamic"] = "no_scaling"
    factor: float = 1.0


@dataclass
class AttnConfig:
    attn_type: Literal["multihead_attention", "multiquery_attention", "grouped_query_attention"] = \
        "multihead_attention"
    attn_pdrop: float = 0.0
    attn_impl: str = "torch"  # a name in registry.attention_impls: 'torch' (SDPA), 'flash' or 'flex'
    qk_ln: bool = False
    qk_gn: bool = False
    fused_qkv: bool = True
    clip_qkv: Optional[float] = None
    softmax_scale: Optional[float] = None
    attn_uses_sequence_id: bool = False
    sliding_window_size: int = -1
    attn_logit_softcapping: Optional[float] = None
    alibi: bool = True
    alibi_bias_max: int = 8
    rope: bool = False
    rope_theta: float = 10000
    rope_impl: Literal["dail", "hf"] = "dail"  # both are the non-interleaved (GPT-NeoX) rotation
    rope_dail_config: RopeDailConfig = field(default_factory=RopeDailConfig)
    rope_hf_config: RopeHFConfig = field(default_factory=RopeHFConfig)
    kv_n_heads: Optional[int] = None
    # Accepted for compatibility with older configs; only the values that mean "off" are supported.
    prefix_lm: Literal[False] = False
    kv_dim: Literal[None] = None
    flex_attn_mod_list: List[Any] = field(default_factory=list)
    model_type: str = ""  # written by transformers' MptAttentionConfig; ignored

    def validate(self, path: str) -> List[str]:
        problems = []
        if self.alibi and self.rope:
            problems.append(f"{join(path, 'rope')}: alibi and rope are both on; choose one positional scheme "
                            f"(set {join(path, 'alibi')}: false to use rope)")
        if self.qk_ln and self.qk_gn:
            problems.append(f"{join(path, 'qk_gn')}: qk_ln and qk_gn are both on; choose one")
        if self.attn_impl not in registry.attention_impls:
            problems.append(registry.attention_impls.unknown_message(self.attn_impl, join(path, "attn_impl")))
        if not 0 <= self.attn_pdrop <= 1:
            problems.append(f"{join(path, 'attn_pdrop')}: a probability in [0, 1], got {self.attn_pdrop}")
        if self.flex_attn_mod_list:
            problems.append(f"{join(path, 'flex_attn_mod_list')}: not needed: attn_impl 'flex' builds its score and "
                            "mask modifiers (ALiBi, causal, window, padding, sequence_id) from the config; remove it")
        if self.sliding_window_size == 0 or self.sliding_window_size < -1:
            problems.append(f"{join(path, 'sliding_window_size')}: -1 (off) or a positive window")
        return problems


@dataclass
class FFNConfig:
    ffn_type: str = "mptmlp"  # a name in registry.ffns: 'mptmlp' or 'mptglu'
    ffn_act_fn: Optional[Dict[str, Any]] = None  # {name: <torch.nn.functional name>, **kwargs}; default exact gelu
    ffn_hidden_size: Optional[int] = None  # default d_model * expansion_ratio
    fc_type: Union[str, Dict[str, Any], None] = None  # llm-foundry copies the top-level fc_type here

    def validate(self, path: str) -> List[str]:
        problems = []
        if self.ffn_type not in registry.ffns:
            problems.append(registry.ffns.unknown_message(self.ffn_type, join(path, "ffn_type")))
        if self.ffn_act_fn is not None:
            import torch.nn.functional as F
            name = self.ffn_act_fn.get("name")
            if not isinstance(name, str) or not callable(getattr(F, name, None)):
                problems.append(f"{join(path, 'ffn_act_fn.name')}: {name!r} is not a torch.nn.functional "
                                f"activation (e.g. gelu, silu, relu)")
        if self.ffn_hidden_size is not None and self.ffn_hidden_size <= 0:
            problems.append(f"{join(path, 'ffn_hidden_size')}: must be positive")
        return problems


@dataclass
class InitConfig:
    name: str = "kaiming_normal_"  # a name in registry.param_inits
    fan_mode: Literal["fan_in", "fan_out"] = "fan_in"
    init_nonlinearity: Literal["linear", "relu", "leaky_relu", "tanh", "sigmoid", "selu"] = "relu"
    init_div_is_residual: Union[bool, int, float, str] = True  # True = sqrt(2 * n_layers)
    emb_init_std: Optional[float] = None
    emb_init_uniform_lim: Union[float, List[float], None] = None
    init_std: Optional[float] = None  # required by baseline_
    init_gain: float = 0.0
    verbose: int = 0  # written by MosaicML's original MPT configs; ignored

    def validate(self, path: str) -> List[str]:
        problems = []
        if self.name not in registry.param_inits:
            problems.append(registry.param_inits.unknown_message(self.name, join(path, "name")))
        if self.name == "baseline_" and self.init_std is None:
            problems.append(f"{join(path, 'init_std')}: baseline_ init needs init_std (e.g. 0.02)")
        if self.emb_init_std is not None and self.emb_init_uniform_lim is not None:
            problems.append(f"{join(path, 'emb_init_uniform_lim')}: set either emb_init_std or "
                            f"emb_init_uniform_lim, not both")
        if isinstance(self.emb_init_uniform_lim, list) and len(self.emb_init_uniform_lim) != 2:
            problems.append(f"{join(path, 'emb_init_uniform_lim')}: a number or a [low, high] pair")
        div = self.init_div_is_residual
        if isinstance(div, str):
            try:
                float(div)
            except ValueError:
                problems.append(f"{join(path, 'init_div_is_residual')}: a bool or a number, got {div!r}")
        return problems


@dataclass
class MPTSchema:
    """The model keys, their types and defaults (transformers' `MptConfig` defaults where they overlap)."""
    d_model: int = 2048
    n_heads: int = 16
    n_layers: int = 24
    expansion_ratio: Union[int, float] = 4
    max_seq_len: int = 2048
    vocab_size: int = 50368
    resid_pdrop: float = 0.0
    emb_pdrop: float = 0.0
    learned_pos_emb: bool = True  # only used when neither alibi nor rope is on (as in llm-foundry)
    attn_config: AttnConfig = field(default_factory=AttnConfig)
    ffn_config: FFNConfig = field(default_factory=FFNConfig)
    init_config: InitConfig = field(default_factory=InitConfig)
    init_device: str = "cpu"
    logit_scale: Union[float, str, None] = None  # a number or 'inv_sqrt_d_model'
    final_logit_softcapping: Optional[float] = None
    no_bias: bool = True
    embedding_fraction: float = 1.0
    norm_type: str = "low_precision_layernorm"
    layer_norm_epsilon: float = 1e-5
    norm_eps: Optional[float] = None  # llm-foundry's name for layer_norm_epsilon
    use_cache: bool = False
    tie_word_embeddings: bool = True
    fc_type: Union[Literal["torch"], Dict[str, Any]] = "torch"
    use_pad_tok_in_ffn: bool = True  # pad tokens always go through the FFN; their outputs are unused
    block_overrides: Literal[None] = None
    initializer_range: float = 0.02  # transformers' key; MPT init is set by init_config
    verbose: int = 0
    tokenizer_name: Optional[str] = None  # written by MosaicML's original MPT configs

    def validate(self, path: str) -> List[str]:
        problems = []
        attn = self.attn_config
        for key in ("d_model", "n_heads", "n_layers", "max_seq_len", "vocab_size", "expansion_ratio"):
            if getattr(self, key) <= 0:
                problems.append(f"{join(path, key)}: must be positive, got {getattr(self, key)}")
        if self.n_heads > 0 and self.d_model % self.n_heads:
            problems.append(f"{join(path, 'd_model')}: d_model ({self.d_model}) must be divisible by n_heads "
                            f"({self.n_heads})")
        kv = attn.kv_n_heads
        if kv is not None and (kv <= 0 or self.n_heads % kv):
            problems.append(f"{join(path, 'attn_config.kv_n_heads')}: kv_n_heads ({kv}) must divide n_heads "
                            f"({self.n_heads})")
        if kv is not None and attn.attn_type == "multihead_attention" and kv != self.n_heads:
            problems.append(f"{join(path, 'attn_config.kv_n_heads')}: only grouped_query_attention takes "
                            f"kv_n_heads ({kv} != n_heads {self.n_heads})")
        if kv is not None and attn.attn_type == "multiquery_attention" and kv != 1:
            problems.append(f"{join(path, 'attn_config.kv_n_heads')}: multiquery_attention has one kv head")
        if attn.attn_type == "grouped_query_attention" and kv is None:
            problems.append(f"{join(path, 'attn_config.kv_n_heads')}: grouped_query_attention needs kv_n_heads")
        if self.norm_type.lower() not in registry.norms:
            problems.append(registry.norms.unknown_message(self.norm_type, join(path, "norm_type")))
        if isinstance(self.logit_scale, str) and self.logit_scale != "inv_sqrt_d_model":
            problems.append(f"{join(path, 'logit_scale')}: a number or 'inv_sqrt_d_model', got {self.logit_scale!r}")
        if not 0 < self.embedding_fraction <= 1:
            problems.append(f"{join(path, 'embedding_fraction')}: must be in (0, 1], got {self.embedding_fraction}")
        for key in ("resid_pdrop", "emb_pdrop"):
            if not 0 <= getattr(self, key) <= 1:
                problems.append(f"{join(path, key)}: a probability in [0, 1], got {getattr(self, key)}")
        if self.ffn_config.ffn_hidden_size is None and int(self.d_model * self.expansion_ratio) != \
                self.d_model * self.expansion_ratio:
            problems.append(f"{join(path, 'expansion_ratio')}: d_model * expansion_ratio must be a whole "
                            f"number, or set ffn_config.ffn_hidden_size")
        fc = self.fc_type if isinstance(self.fc_type, str) else self.fc_type.get("name")
        if fc != "torch":
            problems.append(f"{join(path, 'fc_type')}: only 'torch' linear layers are supported, got {fc!r}")
        if self.norm_eps is not None and self.norm_eps != self.layer_norm_epsilon and \
                self.layer_norm_epsilon != MPTSchema.layer_norm_epsilon:
            problems.append(f"{join(path, 'norm_eps')}: norm_eps and layer_norm_epsilon disagree; set one")
        try:
            import torch
            torch.device(self.init_device)
        except (RuntimeError, TypeError):
            problems.append(f"{join(path, 'init_device')}: not a torch device: {self.init_device!r} "
                            f"(use cpu, meta or cuda)")
        return problems


# Keys `transformers.PretrainedConfig` understands (special-token ids, generation defaults, labels,
# bookkeeping) pass straight through to it. The builder keys are llm-foundry's, in the `model:` section
# next to the architecture; they are not config keys.
_PASSTHROUGH = PRETRAINED_CONFIG_KEYS - {f.name for f in dataclasses.fields(MPTSchema)}
_BUILDER_KEYS = frozenset({"name", "loss_fn", "pretrained", "pretrained_model_name_or_path"})
_ATTRIBUTE_MAP = {"num_attention_heads": "n_heads", "hidden_size": "d_model", "num_hidden_layers": "n_layers"}


def _check(cfg: Dict[str, Any], path: str):
    """(MPTSchema or None, problems) for a dict of model keys."""
    if not isinstance(cfg, dict):
        return None, [f"{path}: expected a mapping, got {cfg!r}"]
    own = {k: v for k, v in cfg.items() if k not in _PASSTHROUGH and k not in _BUILDER_KEYS}
    for alias, key in _ATTRIBUTE_MAP.items():  # `hidden_size=` etc. as transformers allows
        if alias in own:
            own.setdefault(key, own.pop(alias))
    attn = own.get("attn_config")
    if isinstance(attn, dict):  # transformers' MptAttentionConfig.to_dict() carries PretrainedConfig's keys
        own["attn_config"] = {k: v for k, v in attn.items() if k not in PRETRAINED_CONFIG_KEYS}
    schema, problems = check(MPTSchema, own, path)
    if problems:  # also list the cross-field problems, judged on the known keys as far as they can be
        for p in _lenient_validate(own, path):
            if p not in problems:
                problems.append(p)
    return schema, problems


def _lenient_validate(own: Dict[str, Any], path: str) -> List[str]:
    """MPTSchema.validate on the known keys, without the type checks that stopped `check`."""
    top = {f.name for f in dataclasses.fields(MPTSchema)}
    hints = typing.get_type_hints(MPTSchema)
    values, problems = {}, []
    try:
        for key, value in own.items():
            if key in top:
                cls = hints[key]
                if dataclasses.is_dataclass(cls) and isinstance(value, dict):
                    names = {f.name for f in dataclasses.fields(cls)}
                    value = cls(**{k: v for k, v in value.items() if k in names})
                    problems += value.validate(join(path, key))
                values[key] = value
        return problems + MPTSchema(**values).validate(path)
    except (TypeError, ValueError, AttributeError):  # a badly typed value; `check` already reported it
        return problems


def model_config_problems(cfg: Dict[str, Any], path: str = "model") -> List[str]:
    """Every problem of a model config dict (unknown keys with did-you-mean, types, conflicts); [] when valid."""
    return _check(cfg, path)[1]


class MPTConfig(PretrainedConfig):
    """MPT hyper-parameters; see `MPTSchema` for the keys. Invalid keys raise one `ConfigError`."""

    model_type = "mpt"
    attribute_map = _ATTRIBUTE_MAP

    def __init__(self, **kwargs):
        for sub in ("attn_config", "ffn_config", "init_config"):
            if hasattr(kwargs.get(sub), "to_dict"):  # transformers' MptAttentionConfig object
                kwargs[sub] = kwargs[sub].to_dict()
        schema, problems = _check(kwargs, "model")
        if problems:
            raise ConfigError(problems, header="invalid MPT model config")
        values = dataclasses.asdict(schema)
        values["attn_config"].pop("model_type")
        if values.pop("norm_eps") is not None:
            values["layer_norm_epsilon"] = schema.norm_eps
        values["init_config"].pop("verbose")
        if values["ffn_config"]["ffn_act_fn"] is None:
            values["ffn_config"]["ffn_act_fn"] = {"name": "gelu", "approximate": "none"}
        tie = values.pop("tie_word_embeddings")
        for key, value in values.items():
            setattr(self, key, value)
        passthrough = {k: v for k, v in kwargs.items() if k in _PASSTHROUGH}
        super().__init__(tie_word_embeddings=tie, **passthrough)

    def to_dict(self):
        """As written to config.json: numbers typed as stock transformers' MptConfig declares them."""
        return stock_mpt_values(super().to_dict())

    # --- derived values the model uses ----------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

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
