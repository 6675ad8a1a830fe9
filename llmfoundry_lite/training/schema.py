"""The training YAML's schema: llm-foundry's top-level keys as a typed dataclass.

`check_train_config(data, world_size)` runs the one `config.check` pass over EVERY section (top-level
keys, the model and its objective, the loaders, the optimizer, scheduler, algorithms, callbacks,
loggers, ICL tasks, fsdp_config, duration strings), adds the rules that depend on the world size
(`layout_problems`: batch divisibility, HYBRID_SHARD degrees), and raises one `ConfigError` listing
them all before anything heavy (tokenizer, model, data, process group) is built. A section naming a
registry entry (`optimizer: {name: decoupled_adamw, lr: ...}`, `callbacks: {speed_monitor: {...}}`)
is checked against that entry's config, for a plug-in too (its signature).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Annotated, Any, Dict, List, Literal, Optional, Tuple, Union

import torch
from composer.core import Time
from composer.utils import format_name_with_dist

from llmfoundry_lite import registry, stores
from llmfoundry_lite.config import Named, NamedMap, Positive, Rule, check, cross, join
from llmfoundry_lite.config.parallel import FSDPSection
from llmfoundry_lite.data.loaders import EvalLoaders, eval_loader_problems
from llmfoundry_lite.data.tokenizer import TokenizerSection
from llmfoundry_lite.errors import ConfigError
from llmfoundry_lite.export import checksums
from llmfoundry_lite.icl.tasks import ICLTasks
from llmfoundry_lite.training.checkpoints import resume_candidate


def _duration_problem(value) -> Optional[str]:
    """A Composer time string ('10ba', '2ep', '500tok', '0.5dur'), or an int (epochs)."""
    if isinstance(value, int):
        return None if value > 0 else f"must be positive, got {value}"
    try:
        Time.from_timestring(value)
    except ValueError:
        return (f"{value!r} is not a duration; use e.g. '100ba' (batches), '1ep' (epochs), "
                "'1000000tok' (tokens), '0.5dur' (fraction of max_duration)")
    return None


Duration = Annotated[Union[int, str], Rule(_duration_problem)]
MicroBatch = Annotated[Union[int, Literal["auto"]],
                       Rule(lambda v: None if v == "auto" or v > 0 else f"must be positive or 'auto', got {v}")]

Seconds = Annotated[float, Rule(lambda v: None if v > 0 else f"must be positive seconds (or null: off), got {v}")]


@dataclass
class TrainConfig:
    """Every top-level key of a training YAML (see yamls/pretrain/*.yaml for commented examples)."""
    model: Named[registry.models]
    tokenizer: TokenizerSection
    train_loader: Named[registry.dataloaders]
    max_duration: Duration                              # e.g. 10ba, 1ep, 1000000tok
    max_seq_len: Positive
    global_train_batch_size: Positive                   # across all ranks
    eval_loader: Optional[EvalLoaders] = None           # one, or a list with `label`s
    icl_tasks: Optional[ICLTasks] = None                # ICL evaluators (icl/tasks.py), or a YAML path
    icl_seq_len: Optional[Positive] = None              # the ICL evaluators' sequence length; None: max_seq_len
    optimizer: Named[registry.optimizers] = field(default_factory=lambda: {"name": "decoupled_adamw"})
    scheduler: Optional[Named[registry.schedulers]] = None
    # {registered name: kwargs}; `{}` or null uses the defaults, `false` disables one (e.g. from an override)
    algorithms: NamedMap[registry.algorithms] = field(default_factory=dict)
    callbacks: NamedMap[registry.callbacks] = field(default_factory=dict)
    loggers: NamedMap[registry.loggers] = field(default_factory=dict)
    device_train_microbatch_size: Optional[MicroBatch] = None  # None: the device batch
    device_eval_batch_size: Optional[Positive] = None   # None: the device train batch
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
    # seconds a rank may go without a heartbeat before every other rank stops (training/heartbeat.py); null: off
    heartbeat_timeout: Optional[Seconds] = 120.0
    # seconds from SIGTERM to exit, saving a checkpoint after the batch in progress (training/preemption.py); null: off
    preemption_grace_period: Optional[Seconds] = 25.0

    @cross("eval_loader")
    def _eval_labels(self, path):
        return eval_loader_problems(self.eval_loader)

    @cross("train_loader")
    def _no_train_label(self, path):
        if self.train_loader.config.label is not None:
            return "train_loader.label: only eval loaders take a label; remove it"

    def loaders(self) -> List[Tuple[str, Any]]:
        """[(key path, loader section)] of the train loader and every eval loader."""
        loaders = [("train_loader", self.train_loader)]
        if isinstance(self.eval_loader, list):
            loaders += [(f"eval_loader[{i}]", s) for i, s in enumerate(self.eval_loader)]
        elif self.eval_loader is not None:
            loaders.append(("eval_loader", self.eval_loader))
        return loaders

    def loss_fn(self) -> str:
        """`model.loss_fn`: the name of the objective this run trains with (registry.objectives)."""
        return self.model.kwargs.get("loss_fn", "torch_crossentropy")

    def objective_options(self, objective) -> Tuple[Any, List[str]]:
        """(the `objective`'s options read from `model.<loss_fn>`, defaults where unset, their problems);
        (None, []) for an objective without options."""
        if objective.options is None:
            return None, []
        return check(objective.options, self.model.kwargs.get(self.loss_fn()) or {}, join("model", self.loss_fn()))

    @cross("model", "train_loader", "eval_loader", "icl_tasks", "load_path", "load_weights_only")
    def _objective(self, path):
        """The objective `model.loss_fn` names (training/objectives/): its options (another's are refused),
        the loaders it reads, and its own rules."""
        name = self.loss_fn()
        if name not in registry.objectives:
            return registry.objectives.unknown_message(name, "model.loss_fn")
        objective = registry.objectives.get(name)
        problems = [f"model.{other}: only used with loss_fn: {other}; set it or remove {other}"
                    for other in registry.objectives.names() if other != name
                    and registry.objectives.get(other).options and self.model.kwargs.get(other) is not None]
        problems += self.objective_options(objective)[1]
        problems += [f"{where}.name: " + objective.wrong_loader.format(loader=section.name, loss_fn=name)
                     for where, section in self.loaders() if not objective.accepts(section.name)]
        for rule in objective.rules:
            problems += rule(self)
        return problems

    @cross("compile_config")
    def _compile_kwargs(self, path):
        if self.compile_config:
            cfg = registry.signature_config(torch.compile, supplied=("model",))
            return check(cfg, self.compile_config, join(path, "compile_config"))[1]

    @cross("autoresume", "run_name", "save_folder")
    def _resumable(self, path):
        if self.autoresume and not (self.run_name and self.save_folder):
            return (f"{join(path, 'autoresume')}: needs run_name and save_folder (where to find the checkpoints to "
                    "resume from); set both or set autoresume: false")

    @cross("load_path")
    def _load_path_exists(self, path):
        if self.load_path and "://" not in self.load_path and not os.path.exists(self.load_path):
            return f"{join(path, 'load_path')}: checkpoint not found: {self.load_path}"

    def autoresume_enabled(self) -> bool:
        return bool(self.run_name and self.save_folder) if self.autoresume is None else self.autoresume


def layout_problems(config, world_size: int) -> List[str]:
    """What is wrong with `config`'s batch sizes and fsdp_config (None: a key with its own problem) on
    `world_size` processes: the batch splits evenly over them, the microbatch divides a rank's batch, HYBRID_SHARD
    fits them."""
    gbs, mb, fsdp = config.global_train_batch_size, config.device_train_microbatch_size, config.fsdp_config
    problems = []
    if gbs is not None and gbs % world_size:
        problems.append(f"global_train_batch_size: {gbs} is not divisible by the world size {world_size}; use a "
                        f"multiple of {world_size}")
    # one larger than the device batch means one microbatch, as in Composer
    elif gbs is not None and isinstance(mb, int) and mb < gbs // world_size and (gbs // world_size) % mb:
        problems.append(f"device_train_microbatch_size: {mb} does not divide the per-device batch {gbs // world_size} "
                        f"(= global_train_batch_size {gbs} / {world_size} ranks)")
    if fsdp is not None:
        problems += fsdp.layout_problems("fsdp_config", world_size)
    return problems


def save_uri(tc: TrainConfig) -> str:
    """`save_folder` with `{run_name}` filled in."""
    return format_name_with_dist(tc.save_folder, tc.run_name) if tc.run_name else tc.save_folder


def resume_problems(tc: TrainConfig, world_size: int, problems: List[str]) -> List[str]:
    """`problems` (the layout's on `world_size` processes), naming the checkpoint autoresume would start from
    when it was written by another number of processes; plus a change of global batch, which would repeat or
    skip samples (a data loader resumes by counting batches) and is refused."""
    folder = save_uri(tc) if tc.save_folder and tc.autoresume_enabled() else None
    checkpoint = resume_candidate(folder) if folder and not stores.is_remote(folder) else None
    saved = checksums.layout(checkpoint) if checkpoint else {}
    before, batch = saved.get("world_size"), saved.get("global_train_batch_size")
    if before and before != world_size:
        problems = [f"{p} (autoresume: {checkpoint} was written by {before} processes, this launch has {world_size})"
                    for p in problems]
        if getattr(getattr(tc.train_loader.config, "dataset", None), "packing_ratio", None) is not None:
            problems.append(f"train_loader.dataset.packing_ratio: autoresume would continue {checkpoint}, written by "
                            f"{before} processes, on {world_size}; each process packs its own examples, so packed "
                            f"rows cannot continue on another world size: relaunch on {before} processes")
    if batch and tc.global_train_batch_size and batch != tc.global_train_batch_size:
        problems.append(f"global_train_batch_size: {tc.global_train_batch_size}, but autoresume would continue "
                        f"{checkpoint}, trained with {batch}: a run resumes with its global batch (on any number of "
                        f"processes that divides it); set global_train_batch_size: {batch}, or start a new run "
                        "(another run_name or save_folder) with load_path and load_weights_only: true")
    return problems


def check_train_config(data: dict, world_size: int = 1) -> TrainConfig:
    """The TrainConfig for `data` run by `world_size` processes, or one ConfigError listing every problem."""
    tc, problems = check(TrainConfig, data, partial=True)
    problems += resume_problems(tc, world_size, layout_problems(tc, world_size)) if tc is not None else []
    if problems:
        raise ConfigError(problems, "invalid training config")
    return tc
