"""`evaluate(cfg, overrides)`: perplexity and ICL accuracy of one or more models, from an eval YAML.

The YAML is llm-foundry's (`scripts/eval/eval.py`'s keys, same meanings). Each entry of `models:`
names its model one of four ways:
  load_path: a Composer checkpoint (full `.pt` or sharded folder; model and tokenizer come from it)
  model: {name: hf_causal_lm, pretrained_model_name_or_path: <HF folder>, config_overrides: ...}
  model: {name: mpt_causal_lm, d_model: ..., ...}   a training YAML's model section (fresh weights)
  model + load_path: the section builds the model, the checkpoint gives its weights (llm-foundry's
                     MPT eval YAML)
plus an optional `tokenizer: {name, kwargs}` (required when nothing else provides one). A YAML with
a single model may put `model_name`/`model`/`tokenizer`/`load_path` at the top level instead.
`load_path` and the folder may be in an object store (`s3://bucket/path`): reached with short timeouts
before any model is opened, then downloaded into the cache and opened like local ones (opening.py).

Perplexity runs on `eval_loader` (the training YAML's section: one loader or a labelled list; MDS
or local text/JSONL), ICL on `icl_tasks`, and `eval_gauntlet` folds the ICL accuracies into
category scores and averages (`eval/gauntlet.py`). Per model: a table on the console; for the run:
`<results_path>/results.json` and `results.csv` (one row per model); metrics go to `loggers`.
Scoring here is plain torch (no Trainer), so the same numbers come out on any machine.

Launched as `composer -n N scripts/eval.py YAML`, the ranks split the examples (`eval/icl.py`) and,
with `fsdp_config`, each holds a shard of the model (torch FSDP2 `fully_shard` per MPT block, as
training shards it): a model too large for one device evaluates, with the 1-process scores.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import json
import logging
import math
import os
import warnings
from typing import Annotated, Any, ClassVar, Dict, List, Literal, Optional, Sequence, Union

import torch
import torch.distributed as dist
from composer.core import State
from composer.devices import DeviceCPU
from composer.loggers import Logger

from llmfoundry_lite import registry, stores
from llmfoundry_lite.assembly.lora import load_adapter, merged
from llmfoundry_lite.assembly.sharding import apply_fsdp, device_mesh
from llmfoundry_lite.assembly.weights import load_weights
from llmfoundry_lite.config import FromFile, Named, NamedMap, Positive, Rule, check, cross, join, load_config
from llmfoundry_lite.config.parallel import FSDPSection, hybrid_degrees
from llmfoundry_lite.data.loaders import EvalLoaders, build_dataloader, eval_loader_problems, labelled_loaders
from llmfoundry_lite.data.tokenizer import TokenizerSection
from llmfoundry_lite.errors import ConfigError, UserError
from llmfoundry_lite.eval.gauntlet import GauntletConfig, gauntlet_scores
from llmfoundry_lite.eval.icl import evaluate_icl_task
from llmfoundry_lite.export.composer_checkpoint import open_composer_checkpoint
from llmfoundry_lite.files import atomic_write
from llmfoundry_lite.icl.tasks import ICLTasks, icl_tasks, load_task_file
from llmfoundry_lite.inference.loading import resolve_device
from llmfoundry_lite.models.mpt import IGNORE_INDEX
from llmfoundry_lite.opening import local_copy, open_model

SINGLE_MODEL_KEYS = ("model_name", "model", "tokenizer", "load_path")


@dataclasses.dataclass
class ModelEntry:
    model_name: str
    model: Optional[Named[registry.models]] = None
    tokenizer: Optional[TokenizerSection] = None
    load_path: Optional[str] = None

    @cross("model", "load_path", "tokenizer")
    def _a_source(self, path: str):
        if self.model is None and self.load_path is None:
            return (f"{path}: give `load_path` (a Composer checkpoint) and/or `model` (a model section; "
                    "for an HF folder `name: hf_causal_lm` with `pretrained_model_name_or_path`)")
        if self.load_path is not None and not stores.is_remote(self.load_path) and not os.path.exists(self.load_path):
            return f"{join(path, 'load_path')}: not found: {self.load_path}"
        named_folder = self.model is not None and "pretrained_model_name_or_path" in self.model.kwargs
        if self.load_path is None and self.tokenizer is None and not named_folder:
            return (f"{join(path, 'tokenizer')}: missing; a model built from a config needs a tokenizer "
                    "(e.g. tokenizer: {name: path/to/tokenizer_folder})")


def _cuda_visible(device: str):
    if device == "cuda" and not torch.cuda.is_available():
        return "'cuda' asked for but no CUDA device is visible; use device: auto or cpu"


@dataclasses.dataclass
class EvalConfig:
    """Every top-level key of llm-foundry's eval YAML, plus device / results_path / progress_bar."""
    max_seq_len: Positive
    models: List[ModelEntry]
    device_eval_batch_size: Positive = 4
    icl_tasks: Optional[ICLTasks] = None             # a list, or a YAML file with one
    eval_gauntlet: Optional[FromFile[GauntletConfig, "eval_gauntlet"]] = None  # inline, or a YAML file
    eval_loader: Optional[EvalLoaders] = None
    eval_subset_num_batches: int = -1                # perplexity batches per loader; -1: all
    icl_subset_num_batches: Optional[Positive] = None  # ICL batches per task and rank; null: all
    precision: Literal["fp32", "amp_bf16", "amp_fp16"] = "amp_bf16"  # CPU evaluates in fp32 (with a warning)
    fsdp_config: Optional[FSDPSection] = None        # with >1 rank: each holds a shard of the model
    device: Annotated[Literal["auto", "cpu", "cuda"], Rule(_cuda_visible)] = "auto"
    seed: int = 17
    loggers: NamedMap[registry.loggers] = dataclasses.field(default_factory=dict)
    log_config: bool = True                          # the config goes to the loggers as hyperparameters
    metadata: Optional[Dict[str, str]] = None        # logged with the config
    run_name: Optional[str] = None
    python_log_level: Optional[Literal["debug", "info", "warning", "error", "critical"]] = "info"
    console_log_interval: Union[int, str] = "1ba"    # accepted; llm-foundry's eval does not use it either
    dist_timeout: float = 600.0
    code_paths: Optional[List[str]] = None
    callbacks: Optional[Dict[str, Any]] = None
    results_path: Optional[str] = "eval_results"     # folder for results.json / results.csv; null: none
    progress_bar: bool = True
    # llm-foundry's names for a path (what its loader makes of a string) and for a list of loaders
    ALIASES: ClassVar[Dict[str, str]] = {"icl_tasks_str": "icl_tasks", "eval_gauntlet_str": "eval_gauntlet",
                                         "eval_loaders": "eval_loader"}

    @cross("code_paths", "callbacks")
    def _refused(self, path: str):
        return ([f"{join(path, 'code_paths')}: not supported; plug-ins register through the `llmfoundry_lite.plugins` "
                 "entry-point group of an installed package (see README: Plug-ins)"] if self.code_paths else []) + (
            [f"{join(path, 'callbacks')}: eval runs without a Composer Trainer here, so no callback would run; "
             "remove it (results go to results_path and loggers)"] if self.callbacks else [])

    @cross("eval_gauntlet", "icl_tasks")
    def _gauntlet_needs_tasks(self, path: str):
        if self.eval_gauntlet is not None and self.icl_tasks is None:
            return f"{join(path, 'eval_gauntlet')}: needs icl_tasks, whose accuracies it folds into scores"

    @cross("eval_loader")
    def _eval_labels(self, path: str):
        return eval_loader_problems(self.eval_loader)

    @cross("models")
    def _model_names(self, path: str):
        names = [m.model_name for m in self.models]
        return (["models: empty; list at least one model"] if not names else []) + [
            f"models: model_name {n!r} is used twice; names label the results"
            for n in sorted({n for n in names if names.count(n) > 1})]

    @cross("icl_tasks", "eval_loader")
    def _something_to_evaluate(self, path: str):
        if self.icl_tasks is None and self.eval_loader is None:
            return "nothing to evaluate: add `icl_tasks` and/or `eval_loader`"


def check_eval_config(data: Dict[str, Any], world_size: int = 1) -> EvalConfig:
    """The EvalConfig of a loaded YAML run by `world_size` processes, or one ConfigError listing every
    problem of every section."""
    data = dict(data)
    if "models" not in data and any(k in data for k in SINGLE_MODEL_KEYS):
        entry = {k: data.pop(k) for k in SINGLE_MODEL_KEYS if k in data}
        data["models"] = [{"model_name": "model", **entry}]
    ec, problems = check(EvalConfig, data, partial=True)
    if ec is not None and ec.fsdp_config is not None:
        problems += ec.fsdp_config.layout_problems("fsdp_config", world_size)
    if problems:
        raise ConfigError(problems, "invalid eval config")
    return ec


@torch.no_grad()
def perplexity(model, loader, device, max_batches: int = -1) -> Dict[str, float]:
    """Token-weighted cross-entropy (nats) and perplexity over the labelled positions of `loader`
    (with several ranks: over every rank's part)."""
    total, tokens = torch.zeros((), dtype=torch.float64, device=device), torch.zeros((), dtype=torch.long, device=device)
    for i, batch in enumerate(loader):
        if 0 <= max_batches <= i:
            break
        kw = {k: batch[k].to(device) for k in ("attention_mask", "sequence_id") if k in batch}
        logits = model(input_ids=batch["input_ids"].to(device), **kw).logits
        labels = batch["labels"].to(device)[:, 1:]  # labels are aligned with input_ids: shift
        total += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                                   ignore_index=IGNORE_INDEX, reduction="sum")
        tokens += (labels != IGNORE_INDEX).sum()
    if dist.is_initialized():
        dist.all_reduce(total)
        dist.all_reduce(tokens)
    ce = total.item() / max(tokens.item(), 1)
    return {"cross_entropy": ce, "perplexity": math.exp(min(ce, 700.0)), "tokens": int(tokens.item())}


def _amp_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype; as Composer, only fp32 runs on CPU (amp_* falls back with a warning)."""
    amp = {"amp_bf16": torch.bfloat16, "amp_fp16": torch.float16}.get(precision)
    if amp is not None and device.type == "cpu":
        warnings.warn(f"precision {precision} needs a GPU; evaluating in fp32 on CPU", stacklevel=2)
        return None
    return amp


def evaluate_model(model, tokenizer, cfg: EvalConfig, device: torch.device) -> Dict[str, float]:
    """Every configured metric of one model: '<loader>/cross_entropy', '<task>/<k>-shot', ...,
    'eval_gauntlet/<category or average>'."""
    model.eval()
    metrics: Dict[str, float] = {}
    amp = _amp_dtype(cfg.precision, device)
    world = dist.get_world_size() if dist.is_initialized() else 1
    with torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
        for label, section in labelled_loaders(cfg.eval_loader):
            loader = build_dataloader(section, tokenizer, cfg.device_eval_batch_size, "eval_loader")
            for k, v in perplexity(model, loader, device, cfg.eval_subset_num_batches).items():
                metrics[f"{label}/{k}"] = v
        for task in cfg.icl_tasks or []:
            # llm-foundry's subset: the first batches of each rank's share (a task with categories: all)
            limit = None if cfg.icl_subset_num_batches is None or task.has_categories else \
                cfg.icl_subset_num_batches * (task.batch_size or cfg.device_eval_batch_size) * world
            metrics.update(evaluate_icl_task(model, tokenizer, task, cfg.max_seq_len, cfg.device_eval_batch_size,
                                             device, progress=cfg.progress_bar, max_examples=limit))
    if cfg.eval_gauntlet is not None:
        tasks = {t.label: t for t in cfg.icl_tasks}
        metrics.update(gauntlet_scores(cfg.eval_gauntlet, metrics, lambda label: len(load_task_file(
            tasks[label].dataset_uri, icl_tasks.get(tasks[label].icl_task_type)()))))
    return metrics


def shard_model(model, fsdp: FSDPSection, device: torch.device) -> None:
    """Each rank keeps a shard of every MPT block and of the rest (FSDP2 `fully_shard`, as Composer
    applies it in training); a forward gathers one block at a time. FULL_SHARD frees the gathered
    weights after each block's forward, SHARD_GRAD_OP keeps them, HYBRID_SHARD shards within groups
    of ranks and replicates across them; NO_SHARD keeps a whole model per rank. With no backward pass,
    mixed_precision and the activation_* keys change nothing here."""
    if fsdp.sharding_strategy == "NO_SHARD":
        return
    world = dist.get_world_size()
    shape = hybrid_degrees(fsdp, world) if fsdp.sharding_strategy == "HYBRID_SHARD" else (world,)
    apply_fsdp(model, device_mesh(device.type, shape), reshard_after_forward=fsdp.sharding_strategy != "SHARD_GRAD_OP")
    held = sum(p.to_local().numel() for p in model.parameters())
    print(f"rank {dist.get_rank()}: {fsdp.sharding_strategy} holds {held} of "
          f"{sum(p.numel() for p in model.parameters())} parameter values", flush=True)


def format_table(model_name: str, metrics: Dict[str, float]) -> str:
    width = max([len("metric"), *map(len, metrics)])
    lines = [f"== {model_name} ==", f"| {'metric':<{width}} | {'value':>10} |", f"|{'-' * (width + 2)}|{'-' * 12}|"]
    for k, v in metrics.items():
        value = f"{v:>10d}" if isinstance(v, int) else f"{v:>10.4f}"
        lines.append(f"| {k:<{width}} | {value} |")
    return "\n".join(lines)


def write_results(results: Dict[str, Dict[str, float]], folder: str) -> None:
    """results.json ({model: {metric: value}}) and results.csv (a row per model, a column per metric)."""
    os.makedirs(folder, exist_ok=True)
    with atomic_write(os.path.join(folder, "results.json")) as f:
        json.dump(results, f, indent=2)
    columns = list(dict.fromkeys(k for m in results.values() for k in m))
    with open(os.path.join(folder, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, ["model_name", *columns])  # a metric a model lacks: empty cell
        w.writeheader()
        w.writerows({"model_name": name, **m} for name, m in results.items())


def _log(cfg: EvalConfig, raw: Dict[str, Any], results: Dict[str, Dict[str, float]], model) -> None:
    """Send `metrics/<model_name>/<metric>` (and the config, with log_config) to the logger destinations."""
    if not cfg.loggers:
        return

    destinations = [s.build() for s in cfg.loggers.values()]
    state = State(model=model, rank_zero_seed=cfg.seed, run_name=cfg.run_name or "eval", device=DeviceCPU())
    logger = Logger(state, destinations)
    for d in destinations:
        d.init(state, logger)
    if cfg.log_config:
        logger.log_hyperparameters(raw)
    logger.log_metrics({f"metrics/{name}/{k}": v for name, m in results.items() for k, v in m.items()})
    for d in destinations:
        d.close(state, logger)
        d.post_close()


def _setup(ec: EvalConfig) -> torch.device:
    """The device to evaluate on; under a launcher (WORLD_SIZE > 1) the process group comes up first."""
    logging.getLogger("llmfoundry_lite").setLevel((ec.python_log_level or "warning").upper())
    device = torch.device(resolve_device(ec.device))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=ec.dist_timeout))
    return device


def evaluate(cfg: Union[str, os.PathLike, Dict[str, Any]], overrides: Sequence[str] = (),
             adapter: Optional[str] = None) -> Dict[str, Dict[str, float]]:
    """Evaluate every model of an eval YAML (path or dict); returns {model_name: {metric: value}}.
    With several ranks every rank returns the results; rank 0 prints, writes and logs them. `adapter`
    (`--adapter`): a PEFT adapter folder applied to the YAML's one model."""
    raw = load_config(cfg, overrides)
    ec = check_eval_config(raw, int(os.environ.get("WORLD_SIZE", "1")))
    if adapter is not None and len(ec.models) != 1:
        raise UserError(f"--adapter: the config names {len(ec.models)} models; --adapter applies to one. Give "
                        "each its adapter as model.pretrained_lora_id_or_path (an hf_causal_lm section) instead")
    _preflight(ec, adapter)
    device = _setup(ec)
    leader = not dist.is_initialized() or dist.get_rank() == 0
    results, model = {}, None
    for entry in ec.models:
        torch.manual_seed(ec.seed)  # a model built from a config gets the same weights every run (and rank)
        model, tokenizer = _open(entry, adapter)
        if ec.fsdp_config is not None and dist.is_initialized():
            shard_model(model, ec.fsdp_config, device)
        model.to(device)
        results[entry.model_name] = evaluate_model(model, tokenizer, ec, device)
        if leader:
            print(format_table(entry.model_name, results[entry.model_name]), flush=True)
    if ec.results_path and leader:
        write_results(results, ec.results_path)
        print(f"results written to {os.path.join(ec.results_path, 'results.json')} and results.csv")
    if leader:
        _log(ec, raw, results, model)
    return results


def _preflight(ec: EvalConfig, adapter: Optional[str]) -> None:
    """Before any model is opened: every object-store path the config names (`load_path`, an
    hf_causal_lm folder, `--adapter`) reached with short timeouts, every problem reported at once."""
    paths = [("--adapter", adapter)] if adapter else []
    for i, entry in enumerate(ec.models):
        paths.append((join(join("models", i), "load_path"), entry.load_path))
        if entry.model is not None:
            paths.append((join(join(join("models", i), "model"), "pretrained_model_name_or_path"),
                          entry.model.kwargs.get("pretrained_model_name_or_path")))
    problems = [f"{key}: {problem}" for key, uri in paths if isinstance(uri, str) and stores.is_remote(uri)
                for problem in [stores.probe(uri, "folder")] if problem]
    if problems:
        raise ConfigError(problems, "cannot reach what the config names")


def _open(entry: ModelEntry, adapter: Optional[str] = None):
    """(model, tokenizer) of one `models:` entry, LoRA adapters (a LoRA checkpoint's, the section's
    pretrained_lora_id_or_path, or `adapter`) merged into the weights; `model` with `load_path`: the
    section builds the model and the checkpoint's weights go into it (its tokenizer too, unless the
    entry names one)."""
    tokenizer = entry.tokenizer.build() if entry.tokenizer else None
    if entry.model is None or entry.load_path is None:
        model, tokenizer = open_model(entry.load_path or entry.model, tokenizer, adapter)
        return merged(model), tokenizer
    _, saved_tokenizer, weights = open_composer_checkpoint(local_copy(entry.load_path, "load_path"))
    model, tokenizer = open_model(entry.model, tokenizer or saved_tokenizer)
    load_weights(model, weights, entry.load_path, "make `model` describe the checkpoint's model, or drop `model` "
                 "(load_path alone builds the model the checkpoint holds)")
    return merged(load_adapter(model, adapter)), tokenizer
