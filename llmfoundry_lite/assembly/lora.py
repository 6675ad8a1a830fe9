"""LoRA through the `peft` library: the `peft_config` section of a `model:` and applying it.

`peft_config` has llm-foundry's shape (the keyword arguments of `peft.LoraConfig`, `peft_type: LORA`,
`task_type: CAUSAL_LM`) and is checked with the rest of the config: value rules here, peft's own
rules by building the `LoraConfig`, and the target modules against the MPT model as configured
(built on `meta` to read its module names; nothing is allocated). `target_modules` defaults to every
projection of attention and FFN the model has: `Wqkv` (fused attention) or `Wq`/`Wk`/`Wv`, `out_proj`,
`up_proj`, `gate_proj` (GLU FFNs), `down_proj` (a mixture of experts keeps its expert weights frozen).

`apply_lora` wraps the model in a `peft.PeftModel` (a fresh adapter from the config, or
`pretrained_lora_id_or_path`'s saved adapter, trainable): the base weights are frozen, only the
adapters (and `modules_to_save`) train. The wrapped model's state-dict names are peft's
(`base_model.model.<MPT name>`, a targeted layer's weight under `.base_layer.`).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Dict, List, Literal, Optional, Union

import torch

from llmfoundry_lite.config import Positive, Rule, cross, join, rule
from llmfoundry_lite.errors import CheckpointError, ConfigError, UserError, pickle_refusal, refused
from llmfoundry_lite.models import MPTForCausalLM

ATTENTION_TARGETS = ("Wqkv", "Wq", "Wk", "Wv", "out_proj")
FFN_TARGETS = ("up_proj", "gate_proj", "down_proj")


def _upper_is(expected: str):
    return Rule(lambda v: None if isinstance(v, str) and v.upper() == expected else
                f"only {expected} is supported (as in llm-foundry), got {v!r}")


@dataclass(kw_only=True)
class LoraSection:
    """`model.peft_config`: `peft.LoraConfig`'s keys, as llm-foundry passes them."""
    peft_type: Annotated[str, _upper_is("LORA")] = "LORA"
    task_type: Annotated[str, _upper_is("CAUSAL_LM")] = "CAUSAL_LM"
    r: Positive = 8                                      # the adapters' rank
    lora_alpha: Annotated[float, rule(lambda v: v > 0, "must be positive")] = 8  # scale: lora_alpha / r
    lora_dropout: Annotated[float, rule(lambda v: 0 <= v < 1, "a dropout probability in [0, 1)")] = 0.0
    # module names (a name matches itself and every module whose dotted name ends with it), a regular
    # expression matched against whole dotted names, or 'all-linear'; None: every attention/FFN projection
    target_modules: Union[List[str], str, None] = None
    exclude_modules: Union[List[str], str, None] = None  # the same kinds of names, left without adapters
    use_rslora: bool = False                             # rank-stabilised scale lora_alpha / sqrt(r)
    use_dora: bool = False                               # weight-decomposed LoRA (a trained magnitude vector)
    modules_to_save: Optional[List[str]] = None          # modules trained in full next to the adapters
    bias: Literal["none", "all", "lora_only"] = "none"   # which biases train (MPT has none by default)
    lora_bias: bool = False                              # a bias on the B matrices
    fan_in_fan_out: bool = False
    init_lora_weights: Union[bool, str] = True           # true: A random, B zero (the adapter starts as a no-op)
    layers_to_transform: Union[List[int], int, None] = None  # only these block indices get adapters
    layers_pattern: Union[List[str], str, None] = None   # the name of the block list ("blocks")
    rank_pattern: Dict[str, Positive] = field(default_factory=dict)   # per-module r (name or regex -> r)
    alpha_pattern: Dict[str, float] = field(default_factory=dict)     # per-module lora_alpha
    # Other keys of peft.LoraConfig pass through to it unchecked here (peft checks them when the config
    # is built, which the config check does).
    EXTRA_KEYS: ClassVar[frozenset] = frozenset({
        "inference_mode", "base_model_name_or_path", "revision", "auto_mapping", "peft_version", "megatron_config",
        "megatron_core", "trainable_token_indices", "loftq_config", "eva_config", "corda_config",
        "layer_replication", "runtime_config", "use_qalora", "qalora_group_size", "alora_invocation_tokens",
        "target_parameters", "ensure_weight_tying"})
    extra: Dict[str, Any] = field(default_factory=dict)

    @cross("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules",
           "use_rslora", "use_dora", "modules_to_save", "bias", "lora_bias", "fan_in_fan_out", "init_lora_weights",
           "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern")
    def _peft_accepts(self, path: str):
        try:
            lora_config(self.as_kwargs())
        except (ValueError, TypeError) as e:
            return f"{path}: peft refuses this LoRA config: {str(e).splitlines()[0][:300]}"

    def as_kwargs(self) -> Dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**values, **self.extra}


def lora_config(keys: Dict[str, Any]):
    """`peft.LoraConfig` from `peft_config`'s keys (peft_type and task_type upper-cased, as peft wants)."""
    import peft  # lazy: peft (and accelerate) load only for a LoRA model
    keys = {k: v for k, v in keys.items() if k != "peft_type"}  # LoraConfig sets it itself
    keys["task_type"] = str(keys.get("task_type", "CAUSAL_LM")).upper()
    return peft.LoraConfig(**keys)


def default_targets(model) -> List[str]:
    """The projection names of attention and FFN that `model` has (see the module docstring)."""
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return [n for n in (*ATTENTION_TARGETS, *FFN_TARGETS) if n in names]


def _matches(name: str, target) -> bool:
    """peft's rule for one `target_modules` entry: the name itself or a dotted suffix of it."""
    return name == target or name.endswith("." + target)


def target_problems(model, keys: Dict[str, Any], path: str) -> List[str]:
    """What is wrong with `keys`' module names for `model` (LoRA takes Linear and Embedding layers)."""
    named = dict(model.named_modules())
    supported = {n for n, m in named.items() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
    leaves = sorted({n.rsplit(".", 1)[-1] for n in supported})
    problems = []
    targets = keys.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        try:
            if not any(re.fullmatch(targets, n) for n in supported):
                problems.append(f"{join(path, 'target_modules')}: the regular expression {targets!r} matches no "
                                f"Linear or Embedding module of this model (dotted names such as "
                                f"{sorted(supported)[:2]}); or give module names, e.g. {leaves}")
        except re.error as e:
            problems.append(f"{join(path, 'target_modules')}: not a regular expression ({e})")
    for i, target in enumerate(targets if isinstance(targets, list) else []):
        if not any(_matches(n, target) for n in named):
            problems.append(f"{join(join(path, 'target_modules'), i)}: no module of this model is named "
                            f"{target!r}; LoRA can target {leaves}")
        elif not any(_matches(n, target) for n in supported):
            problems.append(f"{join(join(path, 'target_modules'), i)}: {target!r} is not a Linear or Embedding "
                            f"layer; LoRA can target {leaves}")
    for i, name in enumerate(keys.get("modules_to_save") or []):
        if not any(_matches(n, name) for n in named if n):
            problems.append(f"{join(join(path, 'modules_to_save'), i)}: no module of this model is named {name!r}")
    return problems


def meta_model(config):
    """`MPTForCausalLM(config)` on meta, to read its module names without allocating its weights."""
    with torch.device("meta"):
        return MPTForCausalLM(config)


def apply_lora(model, peft_config: Optional[Dict[str, Any]], pretrained_lora_id_or_path: Optional[str] = None,
               key: str = "model", trainable: bool = True, adapter_key: Optional[str] = None):
    """`model` wrapped in a `peft.PeftModel` (trainable unless `trainable` is false):
    `pretrained_lora_id_or_path`'s adapter (a folder written by `save_pretrained`, or a hub name), or
    else a fresh one from `peft_config`. `model` itself when neither is given. `adapter_key` names the
    setting in errors (default `<key>.pretrained_lora_id_or_path`)."""
    if peft_config is None and pretrained_lora_id_or_path is None:
        return model
    import peft  # lazy: peft (and accelerate) load only for a LoRA model
    if pretrained_lora_id_or_path is not None:
        where = adapter_key or f"{key}.pretrained_lora_id_or_path"
        if is_peft(model):
            raise UserError(f"{where}: the model already has LoRA adapters (a LoRA run's checkpoint, or "
                            "pretrained_lora_id_or_path); give a base model to apply an adapter to")
        try:  # peft reads an adapter_model.bin with torch.load(weights_only=True)
            return peft.PeftModel.from_pretrained(model, pretrained_lora_id_or_path, is_trainable=trainable)
        except (OSError, ValueError, RuntimeError, KeyError, pickle.UnpicklingError) as e:
            if pickle_refusal(e):
                raise refused(f"{where}: {pretrained_lora_id_or_path}", e) from None
            reason = " ".join(str(e).split())[:400]
            raise ConfigError([f"{where}: cannot apply the adapter {pretrained_lora_id_or_path} to this model "
                               f"({reason}); is it an adapter trained on this base model?"]) from None
    keys = dict(peft_config)
    if keys.get("target_modules") is None:
        keys["target_modules"] = default_targets(model)
    problems = target_problems(model, keys, f"{key}.peft_config")
    if problems:
        raise ConfigError(problems)
    return peft.get_peft_model(model, lora_config(keys))


def load_adapter(model, adapter: Optional[str], flag: str = "--adapter"):
    """`model` with the PEFT adapter folder `adapter` applied for inference (peft's
    `PeftModel.from_pretrained`), or `model` itself when `adapter` is None."""
    if adapter is None:
        return model
    found = adapter_folder_problem(adapter, local=os.path.exists(adapter) or None)
    if found:
        raise UserError(f"{flag}: {found}")
    return apply_lora(model, None, adapter, trainable=False, adapter_key=flag)


def merged(model):
    """A plain MPT model computing what `model` computes: a PeftModel's adapters merged into its base
    weights (peft's `merge_and_unload`), any other model unchanged."""
    return model.merge_and_unload(safe_merge=True) if is_peft(model) else model


def wrap_on_meta(model, peft_config, source: str):
    """`model` (built on meta) in an inference `PeftModel` with adapters as `peft_config` (a
    `peft.LoraConfig` or its dict, as a checkpoint stores it); its weights are loaded afterwards."""
    import peft  # lazy: peft (and accelerate) load only for a LoRA model
    try:
        lora = peft.get_peft_config(dict(peft_config)) if isinstance(peft_config, dict) else copy.deepcopy(peft_config)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{source}: unreadable LoRA config ({str(e).splitlines()[0][:300]})") from None
    lora.inference_mode = True
    base = lora.base_model_name_or_path  # the model the run started from; peft would reset it to the config's
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*was renamed")
        wrapped = peft.get_peft_model(model, lora)
    wrapped.peft_config[wrapped.active_adapter].base_model_name_or_path = base or model.config.name_or_path or None
    return wrapped


def is_peft(model) -> bool:
    """Whether `model` is a peft model; FSDP2 re-classes what it shards (`FSDPPeftModelForCausalLM`,
    defined by torch), so the classes it derives from are looked at."""
    return any(cls.__module__.startswith("peft.") for cls in type(model).__mro__)


def base_model(model):
    """The MPT model inside a PeftModel (the model itself otherwise)."""
    return model.get_base_model() if is_peft(model) else model


def param_counts(model) -> Dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": sum(p.numel() for p in model.parameters())}


def adapter_folder_problem(path: str, local: Optional[bool] = None) -> Optional[str]:
    """A local adapter (a path starting with `.`, `/` or `~`, or any path when `local`) must be a folder
    holding adapter_config.json; None when it is (or names a hub repository)."""
    local = path.startswith((".", "/", "~")) if local is None else local
    if local and not os.path.isfile(os.path.join(os.path.expanduser(path), "adapter_config.json")):
        return (f"adapter folder not found: {path} (a folder written by peft's save_pretrained, "
                "with adapter_config.json)")
    return None
