"""The training YAML's schema: llm-foundry's top-level keys as a typed dataclass.

`check_train_config(data, world_size)` gathers the problems of EVERY section (top-level keys, the
model, the loaders, the optimizer, scheduler, algorithms, callbacks, loggers, fsdp_config, duration
strings, batch-size divisibility) and raises one `ConfigError` listing them all, before anything
heavy (tokenizer, model, data, process group) is built.

Sections configured by a registry name (`optimizer: {name: decoupled_adamw, lr: ...}`,
`callbacks: {speed_monitor: {...}}`) are checked against the signature of the registered class or
function, so a plug-in's own arguments are validated the same way.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Union

from llmfoundry_lite import registry
from llmfoundry_lite.config import check, check_kwargs
from llmfoundry_lite.config.schema import join
from llmfoundry_lite.errors import ConfigError

Duration = Union[int, str]


@dataclass
class TokenizerSection:
    name: str                                          # folder, registered name or hub name
    kwargs: Dict[str, Any] = field(default_factory=dict)  # to AutoTokenizer.from_pretrained


@dataclass
class FSDPSection:
    """llm-foundry's `fsdp_config`, mapped onto Composer's FSDP2 (`fully_shard`) path."""
    sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"] = "FULL_SHARD"
    mixed_precision: Literal["DEFAULT", "PURE", "FULL"] = "DEFAULT"
    activation_checkpointing: bool = False
    activation_cpu_offload: bool = False
    state_dict_type: Literal["sharded", "full"] = "sharded"
    data_parallel_shard_degree: int = -1               # HYBRID_SHARD: ranks per shard group (-1: all)
    data_parallel_replicate_degree: Optional[int] = None  # HYBRID_SHARD: number of replicas
    verbose: bool = False
    # FSDP1 knobs kept so llm-foundry YAMLs load; FSDP2 needs none of them (it always uses original
    # params, non-reentrant checkpointing, and its own prefetching).
    limit_all_gathers: bool = True
    use_orig_params: bool = True
    forward_prefetch: bool = False
    backward_prefetch: Optional[str] = None
    sync_module_states: bool = False
    activation_checkpointing_reentrant: bool = False


@dataclass
class TrainConfig:
    """Every top-level key of a training YAML (see yamls/pretrain/*.yaml for commented examples)."""
    model: Dict[str, Any]
    tokenizer: TokenizerSection
    train_loader: Dict[str, Any]
    max_duration: Duration                              # e.g. 10ba, 1ep, 1000000tok
    max_seq_len: int
    global_train_batch_size: int                        # across all ranks
    eval_loader: Optional[Union[Dict[str, Any], List[Dict[str, Any]]]] = None  # one, or a list with `label`s
    icl_tasks: Optional[Union[str, List[Dict[str, Any]]]] = None  # ICL evaluators (llmfoundry_lite/eval), or a YAML path
    optimizer: Dict[str, Any] = field(default_factory=lambda: {"name": "decoupled_adamw"})
    scheduler: Optional[Dict[str, Any]] = None
    # {registered name: kwargs}; `{}` or null uses the defaults, `false` disables one (e.g. from an override)
    algorithms: Dict[str, Union[Dict[str, Any], bool, None]] = field(default_factory=dict)
    callbacks: Dict[str, Union[Dict[str, Any], bool, None]] = field(default_factory=dict)
    loggers: Dict[str, Union[Dict[str, Any], bool, None]] = field(default_factory=dict)
    device_train_microbatch_size: Optional[Union[int, Literal["auto"]]] = None  # None: the device batch
    device_eval_batch_size: Optional[int] = None        # None: the device train batch
    eval_interval: Duration = 1                         # an int counts epochs (Composer)
    eval_first: bool = False
    eval_subset_num_batches: int = -1
    seed: int = 17
    precision: Literal["fp32", "amp_bf16", "amp_fp16"] = "amp_bf16"  # CPU runs fp32 (with a warning)
    fsdp_config: Optional[FSDPSection] = None
    compile_config: Optional[Dict[str, Any]] = None     # torch.compile kwargs per MPT block; {}: defaults
    run_name: Optional[str] = None
    save_folder: Optional[str] = None
    save_interval: Duration = "1000ba"
    save_filename: str = "ep{epoch}-ba{batch}-rank{rank}.pt"
    save_num_checkpoints_to_keep: int = -1
    save_overwrite: bool = False
    save_weights_only: bool = False
    load_path: Optional[str] = None
    load_weights_only: bool = False
    load_strict_model_weights: bool = True
    load_ignore_keys: Optional[List[str]] = None
    autoresume: Optional[bool] = None                   # None: on when run_name and save_folder are set
    progress_bar: bool = False
    log_to_console: bool = True
    console_log_interval: Duration = "1ba"
    python_log_level: Optional[Literal["debug", "info", "warning", "error", "critical"]] = "info"
    dist_timeout: float = 600.0

    def validate(self, path: str) -> List[str]:
        problems = []
        for key in ("max_duration", "eval_interval", "save_interval", "console_log_interval"):
            problems += duration_problems(getattr(self, key), join(path, key))
        for key in ("max_seq_len", "global_train_batch_size", "device_eval_batch_size"):
            value = getattr(self, key)
            if isinstance(value, int) and value <= 0:
                problems.append(f"{join(path, key)}: must be positive, got {value}")
        mb = self.device_train_microbatch_size
        if isinstance(mb, int) and mb <= 0:
            problems.append(f"{join(path, 'device_train_microbatch_size')}: must be positive or 'auto', got {mb}")
        if self.compile_config:
            import torch
            problems += check_kwargs(torch.compile, self.compile_config, join(path, "compile_config"), skip=("model",))
        if self.autoresume and not (self.run_name and self.save_folder):
            problems.append(f"{join(path, 'autoresume')}: needs run_name and save_folder (where to find the "
                            "checkpoints to resume from); set both or set autoresume: false")
        return problems

    def autoresume_enabled(self) -> bool:
        if self.autoresume is not None:
            return self.autoresume
        return bool(self.run_name and self.save_folder)


def duration_problems(value, path: str) -> List[str]:
    """A Composer time string ('10ba', '2ep', '500tok', '0.5dur'), or an int (epochs)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, str)):
        return []  # missing or of the wrong type: reported by the type check
    if isinstance(value, int):
        return [] if value > 0 else [f"{path}: must be positive, got {value}"]
    from composer.core import Time
    try:
        Time.from_timestring(str(value))
    except ValueError:
        return [f"{path}: {value!r} is not a duration; use e.g. '100ba' (batches), '1ep' (epochs), "
                f"'1000000tok' (tokens), '0.5dur' (fraction of max_duration)"]
    return []


def named_section_problems(reg: registry.Registry, name, kwargs, path: str, skip=()) -> List[str]:
    """Problems of one registry-built section: the name must exist and the kwargs must fit its signature."""
    if name is None:
        return [f"{join(path, 'name')}: missing required key; choose one of {reg.names()}"]
    if not isinstance(name, str) or name not in reg:
        return [reg.unknown_message(name, path)]
    if kwargs is not None and not isinstance(kwargs, dict):
        return [f"{path}: expected a mapping of arguments, got {kwargs!r}"]
    return check_kwargs(reg.get(name), kwargs or {}, path, skip=skip)


def eval_loader_sections(eval_loader) -> List[tuple]:
    """[(label, loader_cfg, path)] for a single eval loader or a labelled list of them."""
    if eval_loader is None:
        return []
    if isinstance(eval_loader, dict):
        return [("eval", eval_loader, "eval_loader")]
    return [(c.get("label", f"eval_{i}"), {k: v for k, v in c.items() if k != "label"}, f"eval_loader[{i}]")
            for i, c in enumerate(eval_loader)]


def check_train_config(data: dict, world_size: int = 1) -> TrainConfig:
    """The TrainConfig for `data`, or one ConfigError listing every problem of every section."""
    from llmfoundry_lite.data import dataloader_config_problems
    from llmfoundry_lite.train import builders, composer_model  # noqa: F401  (register the built-in names)

    cfg, problems = check(TrainConfig, data, "")
    if cfg is None:  # top-level errors; still check the cross-field rules and the sections we can read
        cfg = _lenient(data)
        problems += cfg.validate("")
    model = cfg.model if isinstance(cfg.model, dict) else {}
    if model.get("name") is None:
        problems.append(f"model.name: missing required key; choose one of {registry.models.names()}")
    elif not isinstance(model["name"], str) or model["name"] not in registry.models:
        problems.append(registry.models.unknown_message(model.get("name"), "model.name"))
    model_problems = getattr(registry.models.get(model["name"]), "config_problems", None) \
        if model.get("name") in registry.models else None
    if model_problems is not None:  # a plug-in builder may check its own section
        problems += model_problems({k: v for k, v in model.items() if k != "name"}, "model")
    if isinstance(cfg.train_loader, dict):
        problems += dataloader_config_problems(cfg.train_loader, "train_loader")
    if isinstance(cfg.eval_loader, list):
        labels = [c.get("label") for c in cfg.eval_loader if isinstance(c, dict)]
        if len(cfg.eval_loader) > 1 and (None in labels or len(set(labels)) != len(labels)):
            problems.append("eval_loader: a list of eval loaders needs a distinct `label` on each")
    for _, loader, path in eval_loader_sections(cfg.eval_loader if isinstance(cfg.eval_loader, (dict, list)) else None):
        problems += dataloader_config_problems(loader, path)
    if isinstance(cfg.icl_tasks, (str, list)):
        from llmfoundry_lite.eval.icl import icl_tasks_config_problems
        problems += icl_tasks_config_problems(cfg.icl_tasks, "icl_tasks")
    for section, reg, skip in (("optimizer", registry.optimizers, ("params",)),
                               ("scheduler", registry.schedulers, ())):
        sec = getattr(cfg, section)
        if isinstance(sec, dict):
            problems += named_section_problems(reg, sec.get("name"), {k: v for k, v in sec.items() if k != "name"},
                                               section, skip)
    for section, reg in (("algorithms", registry.algorithms), ("callbacks", registry.callbacks),
                         ("loggers", registry.loggers)):
        sec = getattr(cfg, section)
        for name, kwargs in (sec.items() if isinstance(sec, dict) else ()):
            if kwargs is not False:
                problems += named_section_problems(reg, name, None if kwargs is True else kwargs,
                                                   f"{section}.{name}")
    problems += _parallel_problems(cfg, world_size)
    if problems:
        raise ConfigError(problems, header="invalid training config")
    return cfg


def _lenient(data: dict) -> TrainConfig:
    """A TrainConfig-shaped object holding whatever the sections are, to check them even when the top fails."""
    values = {f.name: data.get(f.name, f.default if f.default is not dataclasses.MISSING else None)
              for f in dataclasses.fields(TrainConfig)}
    obj = object.__new__(TrainConfig)
    obj.__dict__.update(values)
    for name in ("optimizer", "algorithms", "callbacks", "loggers"):
        if name not in data:
            setattr(obj, name, TrainConfig.__dataclass_fields__[name].default_factory())
    return obj


def _parallel_problems(cfg: TrainConfig, world_size: int) -> List[str]:
    problems = []
    gbs = cfg.global_train_batch_size
    if isinstance(gbs, int) and gbs > 0 and gbs % world_size:
        problems.append(f"global_train_batch_size: {gbs} is not divisible by the world size {world_size}; "
                        f"use a multiple of {world_size}")
    mb = cfg.device_train_microbatch_size
    if isinstance(gbs, int) and gbs > 0 and isinstance(mb, int) and mb > 0 and not gbs % world_size:
        device_batch = gbs // world_size
        if device_batch % mb:
            problems.append(f"device_train_microbatch_size: {mb} does not divide the per-device batch "
                            f"{device_batch} (= global_train_batch_size {gbs} / {world_size} ranks)")
    fsdp = cfg.fsdp_config
    if isinstance(fsdp, FSDPSection) and fsdp.sharding_strategy == "HYBRID_SHARD" and world_size > 1:
        import torch

        from llmfoundry_lite.compat import FSDP2_HSDP_ON_CPU
        if not torch.cuda.is_available() and not FSDP2_HSDP_ON_CPU:
            problems.append(f"fsdp_config.sharding_strategy: HYBRID_SHARD cannot train on CPU with torch "
                            f"{torch.__version__} (its FSDP2 averages across replicas with an op gloo lacks); use "
                            "FULL_SHARD here, or a newer torch (`make install-current` gives 2.14, where it runs)")
        rep, shard = hybrid_degrees(fsdp, world_size)
        if rep * shard != world_size:
            problems.append(f"fsdp_config: data_parallel_replicate_degree x data_parallel_shard_degree = "
                            f"{rep} x {shard} must equal the world size {world_size}")
    return problems


def hybrid_degrees(fsdp: FSDPSection, world_size: int) -> tuple:
    """(replicate, shard) degrees of HYBRID_SHARD; an unset one is derived from the world size."""
    shard = fsdp.data_parallel_shard_degree
    rep = fsdp.data_parallel_replicate_degree
    if shard in (-1, None):
        shard = world_size // rep if rep else world_size
    if rep is None:
        rep = max(world_size // max(shard, 1), 1)
    return rep, shard
