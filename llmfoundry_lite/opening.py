"""Opening a model: ONE function for an HF folder (or hub name), a Composer checkpoint, or the
`model:` section of a YAML; inference, eval and training all call it.

The `models` registry's built-in entries are here, as llm-foundry defines them: `mpt_causal_lm` builds
a fresh `MPTForCausalLM` from the section's MPT keys; `hf_causal_lm` starts from an HF MPT folder (or
hub name), `config_overrides` merged onto its config, with its weights unless `pretrained` is false.
Both take `init_device` (cpu, meta or mixed; see assembly/sharding.py), and `peft_config` /
`pretrained_lora_id_or_path`, which wrap the model in a LoRA `peft.PeftModel` (assembly/lora.py). A
section also holds training's objective (`loss_fn`, and its options such as `dpo`, as llm-foundry puts
them under `model:`): the training schema checks them, and the model is built without them.

A model, checkpoint, adapter or tokenizer in an object store (`s3://bucket/path`, gs://, oci://) is
downloaded whole into the cache first (`local_copy`, after a quick check that it is there), then opened
by the same local code, with every check and the safe loader.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Dict, List, Mapping, Optional, Tuple, Union

from llmfoundry_lite import stores
from llmfoundry_lite.assembly.lora import (
    LoraSection,
    adapter_folder_problem,
    apply_lora,
    default_targets,
    load_adapter,
    meta_model,
    target_problems,
)
from llmfoundry_lite.config import Rule, Section, cross, join
from llmfoundry_lite.data.tokenizer import build_tokenizer
from llmfoundry_lite.errors import ConfigError, StoreError, UserError
from llmfoundry_lite.export.composer_checkpoint import (
    fetch_checkpoint,
    is_composer_checkpoint,
    load_composer_checkpoint,
)
from llmfoundry_lite.export.hf_import import load_hf_config, load_hf_model, load_when_materialized
from llmfoundry_lite.models import MPTConfig, MPTForCausalLM
from llmfoundry_lite.models.config import MPTSchema, _torch_device
from llmfoundry_lite.registry import did_you_mean, models


def _device_or_mixed(name: str) -> Optional[str]:
    return None if name == "mixed" else _torch_device(name)


@dataclass(kw_only=True)
class _BuilderKeys:
    """llm-foundry's builder keys, shared by both model names."""
    # cpu; meta (built without memory, initialised, or loaded, after FSDP sharding); mixed (global rank 0
    # builds or loads on cpu, the others on meta, and FSDP broadcasts rank 0's weights)
    init_device: Annotated[str, Rule(_device_or_mixed)] = "cpu"
    loss_fn: str = "torch_crossentropy"  # training's objective, checked by the training schema (registry.objectives)
    dpo: Optional[Dict[str, Any]] = None  # its options (loss_fn: dpo), checked by the training schema too
    peft_config: Optional[LoraSection] = None  # LoRA adapters (peft): only they train
    pretrained_lora_id_or_path: Optional[str] = None  # continue from this saved adapter (peft_config unused)
    KEY_HINTS: ClassVar[Dict[str, str]] = {
        "should_save_peft_only": "not needed: checkpoints hold the base weights and the adapters, so a run "
                                 "resumes from them alone (bit-exactly); remove it"}

    @cross("pretrained_lora_id_or_path")
    def _adapter_exists(self, path: str):
        found = self.pretrained_lora_id_or_path and adapter_folder_problem(self.pretrained_lora_id_or_path)
        return found and f"{join(path, 'pretrained_lora_id_or_path')}: {found}"

    @cross("peft_config", "pretrained_lora_id_or_path", "init_device")
    def _lora_on_this_device(self, path: str):
        """LoRA weights are initialised (or loaded) when the adapters are made, except on meta, where
        only the plain initialisations can be redone when the model is materialised."""
        lora = self.peft_config
        problems = []
        if self.init_device in ("meta", "mixed"):
            if self.pretrained_lora_id_or_path:
                problems.append(f"{join(path, 'pretrained_lora_id_or_path')}: needs init_device: cpu (a saved "
                                f"adapter cannot be loaded into a model built on meta)")
            if lora and (lora.use_dora or lora.modules_to_save or lora.init_lora_weights not in (True, False, "gaussian")):
                problems.append(f"{join(path, 'peft_config')}: use_dora, modules_to_save and init_lora_weights "
                                f"other than true/false/gaussian need the base weights when the adapters are made: "
                                "use init_device: cpu")
        return problems

    def lora_problems(self, config, path: str) -> List[str]:
        """The target modules (and modules_to_save) checked against the model `config` describes."""
        if self.peft_config is None or self.pretrained_lora_id_or_path:
            return []
        model = meta_model(config)
        keys = self.peft_config.as_kwargs()
        keys["target_modules"] = keys["target_modules"] or default_targets(model)
        return target_problems(model, keys, join(path, "peft_config"))


_FROM_A_FOLDER = ("mpt_causal_lm builds a model from config keys; to start from a folder use name: hf_causal_lm "
                  "with pretrained_model_name_or_path, and put the MPT keys to change under config_overrides")


@dataclass(kw_only=True)
class MPTModelSection(_BuilderKeys, MPTSchema):
    """`model: {name: mpt_causal_lm, ...}`: the MPT keys plus llm-foundry's builder keys."""
    KEY_HINTS: ClassVar[Dict[str, str]] = {**_BuilderKeys.KEY_HINTS, **dict.fromkeys(
        ("pretrained_model_name_or_path", "pretrained"), _FROM_A_FOLDER)}

    @cross("peft_config", "pretrained_lora_id_or_path")
    def _lora_targets(self, path: str):
        if self.peft_config is None:
            return None
        mpt_keys = {f.name for f in dataclasses.fields(MPTSchema)} - {"extra", "init_device"}
        try:
            config = MPTConfig(**_plain({k: getattr(self, k) for k in mpt_keys}), **self.extra)
        except UserError:  # reported by the MPT keys' own rules
            return None
        return self.lora_problems(config, path)


@dataclass(kw_only=True)
class HFCausalLMSection(_BuilderKeys):
    """`model: {name: hf_causal_lm, ...}` as llm-foundry defines it, for an MPT folder or hub name."""
    pretrained_model_name_or_path: str
    pretrained: bool = True  # false: the folder's config only, initialised afresh by its init_config
    config_overrides: Dict[str, Any] = field(default_factory=dict)  # merged onto the folder's config
    use_flash_attention_2: bool = False  # true: attn_config.attn_impl flash (flash-attn 2, CUDA)
    token: Union[str, bool, None] = None  # for a gated hub model; a local folder needs none
    use_auth_token: Union[str, bool, None] = False  # transformers' old name: use the stored login token
    trust_remote_code: bool = True  # accepted: code in a folder is never run, the model is ours

    @cross("pretrained_model_name_or_path")
    def _folder_exists(self, path: str):
        source = self.pretrained_model_name_or_path
        if source.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(source)):
            return f"{join(path, 'pretrained_model_name_or_path')}: model folder not found: {source}"

    @cross("config_overrides")
    def _known_overrides(self, path: str):
        return _unknown_keys(MPTSchema, self.config_overrides, join(path, "config_overrides"))

    @cross("peft_config", "pretrained_lora_id_or_path", "pretrained_model_name_or_path", "config_overrides")
    def _lora_targets(self, path: str):
        if self.peft_config is None:
            return None
        try:  # a hub name offline, or a folder without a config: peft checks the names when the model is built
            _, config = load_hf_config(self.pretrained_model_name_or_path, self.config_overrides, self.token)
        except (UserError, OSError):
            return None
        return self.lora_problems(config, path)


def _plain(value):
    """A checked (nested) dataclass as the mapping it was read from: keys that another library owns
    (`extra`) merged back in, unset optional keys left out."""
    if dataclasses.is_dataclass(value):
        keys = {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.name != "extra"}
        return {**{k: v for k, v in keys.items() if v is not None}, **getattr(value, "extra", {})}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _unknown_keys(schema, overrides: Dict[str, Any], path: str) -> List[str]:
    """As llm-foundry: an override must name a key of the config (of a nested section, at any depth)."""
    hints = {k: v for k, v in typing.get_type_hints(schema).items() if k != "extra"}
    problems = []
    for key, value in overrides.items():
        name = getattr(schema, "ALIASES", {}).get(key, key)
        if name not in hints and key not in getattr(schema, "EXTRA_KEYS", ()):
            problems.append(f"{join(path, key)}: unknown key{did_you_mean(key, hints)}; config_overrides may "
                            "only change keys of the MPT config")
        elif isinstance(value, Mapping) and dataclasses.is_dataclass(hints.get(name)):
            problems += _unknown_keys(hints[name], value, join(path, key))
    return problems


def _this_rank_device(init_device: str) -> str:
    """As llm-foundry, `mixed` is cpu on global rank 0 (which builds or reads the weights) and meta on
    the others (FSDP hands them their shards of rank 0's weights)."""
    if init_device != "mixed":
        return init_device
    return "cpu" if int(os.environ.get("RANK", "0")) == 0 else "meta"


def _fits(model, tokenizer, key: str = "model.vocab_size"):
    if model.config.vocab_size < len(tokenizer):
        raise ConfigError([f"{key}: {model.config.vocab_size} is smaller than the tokenizer's "
                           f"{len(tokenizer)} tokens; set it to at least {len(tokenizer)} "
                           "(a multiple of 64 is fastest)"])
    return model


def build_mpt_causal_lm(tokenizer, init_device: str = "cpu", peft_config=None, pretrained_lora_id_or_path=None,
                        **keys):
    """A fresh `MPTForCausalLM` from MPT config keys. A missing `vocab_size` is the tokenizer's; one
    smaller than the tokenizer is an error. With LoRA keys, the model wrapped in a `peft.PeftModel`."""
    config = MPTConfig(**{"vocab_size": len(tokenizer), **keys, "init_device": _this_rank_device(init_device)})
    return apply_lora(_fits(MPTForCausalLM(config), tokenizer), peft_config, pretrained_lora_id_or_path)


def build_hf_causal_lm(tokenizer, pretrained_model_name_or_path: str, pretrained: bool = True,
                       init_device: str = "cpu", config_overrides: Optional[Dict[str, Any]] = None,
                       use_flash_attention_2: bool = False, token=None, use_auth_token=None, trust_remote_code=None,
                       peft_config=None, pretrained_lora_id_or_path=None):
    """An `MPTForCausalLM` from an HF MPT folder whose config `config_overrides` override: with its
    weights unless `pretrained` is false (then initialised afresh). On meta the weights are read when
    the model is materialised (after FSDP sharding); the tokenizer must fit the vocabulary. With LoRA
    keys, the model wrapped in a `peft.PeftModel`."""
    device = _this_rank_device(init_device)
    pretrained = pretrained and not (init_device == "mixed" and device == "meta")  # FSDP brings rank 0's weights
    overrides = dict(config_overrides or {})
    if use_flash_attention_2:
        overrides["attn_config"] = {**overrides.get("attn_config", {}), "attn_impl": "flash"}
    if pretrained and device != "meta":
        model = load_hf_model(pretrained_model_name_or_path, token=token, **overrides)
    else:
        folder, config = load_hf_config(pretrained_model_name_or_path, {**overrides, "init_device": device}, token)
        model = MPTForCausalLM(config)
        if pretrained:
            load_when_materialized(model, folder)
    return apply_lora(_fits(model, tokenizer, "model.config_overrides.vocab_size"), peft_config,
                      pretrained_lora_id_or_path)


models.register("mpt_causal_lm", build_mpt_causal_lm, config=MPTModelSection)
models.register("hf_causal_lm", build_hf_causal_lm, config=HFCausalLMSection)

# The keys a `model:` section holds for training's objective (training/objectives/), not for its builder.
OBJECTIVE_KEYS = ("loss_fn", "dpo")


def build_model(section: Section, tokenizer):
    """The model of a checked `model:` section: its builder called with every key but the objective's."""
    keys = {k: v for k, v in section.kwargs.items() if k not in OBJECTIVE_KEYS}
    return dataclasses.replace(section, kwargs=keys).build(tokenizer)


def local_copy(source, what: str = "") -> str:
    """A local path for `source`: itself, or for an object-store URI (an HF folder, adapter or tokenizer
    prefix, a Composer `.pt` object or sharded checkpoint prefix, a save_folder prefix: its latest
    checkpoint) a copy in the cache, downloaded whole after a quick check that it is there (a wrong
    endpoint, bucket or path is a StoreError naming the URI, prefixed by `what`, within seconds)."""
    if not isinstance(source, str) or not stores.is_remote(source):
        return source
    problem = stores.probe(source, "folder")
    if problem:
        raise StoreError(f"{what} {problem}" if what else problem)
    return fetch_checkpoint(source)


def _local_section(section: Section) -> Section:
    """The section with an object-store `pretrained_model_name_or_path` replaced by its local copy."""
    folder = section.kwargs.get("pretrained_model_name_or_path")
    if not isinstance(folder, str) or not stores.is_remote(folder):
        return section
    local = local_copy(folder, "model.pretrained_model_name_or_path")
    return dataclasses.replace(section, kwargs={**section.kwargs, "pretrained_model_name_or_path": local})


def open_model(source: Union[str, Section], tokenizer=None, adapter: Optional[str] = None) -> Tuple[object, object]:
    """(model, tokenizer) from a model folder or hub name, a Composer checkpoint (`.pt` file or sharded
    folder; a LoRA run's opens as its `peft.PeftModel`), or a checked `model:` section. `tokenizer` (an
    object, or a folder/name) replaces the one stored with the model; a section needs one unless it
    names a pretrained folder. `adapter`: a PEFT adapter folder applied to the model (`--adapter`).
    Any of these paths may be in an object store (`local_copy`)."""
    adapter = local_copy(adapter, "--adapter")
    tokenizer = local_copy(tokenizer, "--tokenizer")
    if isinstance(source, Section):
        source = _local_section(source)
        folder = source.kwargs.get("pretrained_model_name_or_path")
        if tokenizer is None and folder is None:
            raise ConfigError(["tokenizer: missing; a model built from a config needs a tokenizer "
                               "(e.g. tokenizer: {name: path/to/tokenizer_folder})"])
        tokenizer = _tokenizer(tokenizer or folder)
        return load_adapter(build_model(source, tokenizer), adapter), tokenizer
    named, source = source, local_copy(source)
    if is_composer_checkpoint(source):  # the model first: its problems are the likelier ones to report
        model, saved = load_composer_checkpoint(source)
    else:
        model, saved = load_hf_model(source), None
        tokenizer = tokenizer or source
    tokenizer = _tokenizer(tokenizer) or saved
    if tokenizer is None:
        raise UserError(f"{named} holds no tokenizer; give one (--tokenizer, or tokenizer: {{name: <folder>}})")
    return load_adapter(model, adapter), tokenizer


def _tokenizer(tokenizer):
    return build_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
