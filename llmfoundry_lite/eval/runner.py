"""`evaluate(cfg, overrides)`: perplexity and ICL accuracy of one or more models, from an eval YAML.

Each entry of `models:` names its model one of three ways:
  load_path: a Composer checkpoint (full `.pt` or sharded folder; model and tokenizer come from it)
  model: {name: mpt_causal_lm, pretrained_model_name_or_path: <HF folder>}   an HF MPT folder
  model: {name: mpt_causal_lm, d_model: ..., ...}   a training YAML's model section (fresh weights)
plus an optional `tokenizer: {name, kwargs}` (required when nothing else provides one). A YAML with
a single model may put `model_name`/`model`/`tokenizer`/`load_path` at the top level instead.

Perplexity runs on `eval_loader` (the training YAML's section: one loader or a labelled list; MDS
or local text/JSONL), ICL on `icl_tasks`. Per model: a table on the console; for the run:
`<results_path>/results.json` and `results.csv` (one row per model); metrics go to `loggers`.
Scoring here is plain torch (no Trainer), so the same numbers come out on any machine.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
from typing import Annotated, Any, Dict, List, Literal, Optional, Sequence, Union

import torch

from llmfoundry_lite import registry
from llmfoundry_lite.config import Named, NamedMap, Positive, Rule, cross, join, load_config, parse
from llmfoundry_lite.data.icl import ICLTasks
from llmfoundry_lite.data.loaders import EvalLoaders, build_dataloader, eval_loader_problems, labelled_loaders
from llmfoundry_lite.data.tokenizer import TokenizerSection
from llmfoundry_lite.eval.icl import evaluate_icl_task
from llmfoundry_lite.export.opening import open_model
from llmfoundry_lite.files import atomic_write
from llmfoundry_lite.inference.loading import resolve_device
from llmfoundry_lite.models.mpt import IGNORE_INDEX

SINGLE_MODEL_KEYS = ("model_name", "model", "tokenizer", "load_path")


@dataclasses.dataclass
class ModelEntry:
    model_name: str
    model: Optional[Named[registry.models]] = None
    tokenizer: Optional[TokenizerSection] = None
    load_path: Optional[str] = None

    @cross("model", "load_path", "tokenizer")
    def _one_source(self, path: str):
        if (self.model is None) == (self.load_path is None):
            return (f"{path}: give either `load_path` (a Composer checkpoint) or `model` (a model section, "
                    "with `pretrained_model_name_or_path` for an HF folder)")
        if self.load_path is not None and not os.path.exists(self.load_path):
            return f"{join(path, 'load_path')}: not found: {self.load_path}"
        named_folder = self.model is not None and "pretrained_model_name_or_path" in self.model.kwargs
        if self.model is not None and self.tokenizer is None and not named_folder:
            return (f"{join(path, 'tokenizer')}: missing; a model built from a config needs a tokenizer "
                    "(e.g. tokenizer: {name: path/to/tokenizer_folder})")


def _cuda_visible(device: str):
    if device == "cuda" and not torch.cuda.is_available():
        return "'cuda' asked for but no CUDA device is visible; use device: auto or cpu"


@dataclasses.dataclass
class EvalConfig:
    max_seq_len: Positive
    models: List[ModelEntry]
    device_eval_batch_size: Positive = 4
    icl_tasks: Optional[ICLTasks] = None             # a list, or a YAML file with one
    eval_loader: Optional[EvalLoaders] = None
    eval_subset_num_batches: int = -1                # perplexity batches per loader; -1: all
    precision: Literal["fp32", "amp_bf16", "amp_fp16"] = "fp32"
    device: Annotated[Literal["auto", "cpu", "cuda"], Rule(_cuda_visible)] = "auto"
    seed: int = 17
    loggers: NamedMap[registry.loggers] = dataclasses.field(default_factory=dict)
    run_name: Optional[str] = None
    results_path: Optional[str] = "eval_results"     # folder for results.json / results.csv; null: none
    progress_bar: bool = True

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


def check_eval_config(data: Dict[str, Any]) -> EvalConfig:
    """The EvalConfig of a loaded YAML, or one ConfigError listing every problem of every section."""
    data = dict(data)
    if "models" not in data and any(k in data for k in SINGLE_MODEL_KEYS):
        entry = {k: data.pop(k) for k in SINGLE_MODEL_KEYS if k in data}
        data["models"] = [{"model_name": "model", **entry}]
    return parse(EvalConfig, data, header="invalid eval config")


@torch.no_grad()
def perplexity(model, loader, device, max_batches: int = -1) -> Dict[str, float]:
    """Token-weighted cross-entropy (nats) and perplexity over the labelled positions of `loader`."""
    total, tokens = 0.0, 0
    for i, batch in enumerate(loader):
        if 0 <= max_batches <= i:
            break
        kw = {k: batch[k].to(device) for k in ("attention_mask", "sequence_id") if k in batch}
        logits = model(input_ids=batch["input_ids"].to(device), **kw).logits
        labels = batch["labels"].to(device)[:, 1:]  # labels are aligned with input_ids: shift
        total += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                                   ignore_index=IGNORE_INDEX, reduction="sum").item()
        tokens += int((labels != IGNORE_INDEX).sum())
    ce = total / max(tokens, 1)
    return {"cross_entropy": ce, "perplexity": math.exp(min(ce, 700.0)), "tokens": tokens}


def evaluate_model(model, tokenizer, cfg: EvalConfig, device: torch.device) -> Dict[str, float]:
    """Every configured metric of one model: '<loader>/cross_entropy', '<task>/<k>-shot', ..."""
    model.to(device).eval()
    metrics: Dict[str, float] = {}
    amp = {"amp_bf16": torch.bfloat16, "amp_fp16": torch.float16}.get(cfg.precision)  # None: fp32
    with torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
        for label, section in labelled_loaders(cfg.eval_loader):
            loader = build_dataloader(section, tokenizer, cfg.device_eval_batch_size, "eval_loader")
            for k, v in perplexity(model, loader, device, cfg.eval_subset_num_batches).items():
                metrics[f"{label}/{k}"] = v
        for task in cfg.icl_tasks or []:
            metrics.update(evaluate_icl_task(model, tokenizer, task, cfg.max_seq_len, cfg.device_eval_batch_size,
                                             device, progress=cfg.progress_bar))
    return metrics


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


def _log(cfg: EvalConfig, results: Dict[str, Dict[str, float]], model) -> None:
    """Send `metrics/<model_name>/<metric>` to the configured Composer logger destinations."""
    if not cfg.loggers:
        return
    from composer.core import State
    from composer.devices import DeviceCPU
    from composer.loggers import Logger

    destinations = [s.build() for s in cfg.loggers.values()]
    state = State(model=model, rank_zero_seed=cfg.seed, run_name=cfg.run_name or "eval", device=DeviceCPU())
    logger = Logger(state, destinations)
    for d in destinations:
        d.init(state, logger)
    logger.log_metrics({f"metrics/{name}/{k}": v for name, m in results.items() for k, v in m.items()})
    for d in destinations:
        d.close(state, logger)
        d.post_close()


def evaluate(cfg: Union[str, os.PathLike, Dict[str, Any]], overrides: Sequence[str] = ()) -> Dict[str, Dict[str, float]]:
    """Evaluate every model of an eval YAML (path or dict); returns {model_name: {metric: value}}."""
    ec = check_eval_config(load_config(cfg, overrides))
    device = torch.device(resolve_device(ec.device))
    results, model = {}, None
    for entry in ec.models:
        torch.manual_seed(ec.seed)  # a model built from a config gets the same weights every run
        tokenizer = entry.tokenizer.build() if entry.tokenizer else None
        model, tokenizer = open_model(entry.load_path or entry.model, tokenizer)
        results[entry.model_name] = evaluate_model(model, tokenizer, ec, device)
        print(format_table(entry.model_name, results[entry.model_name]), flush=True)
    if ec.results_path:
        write_results(results, ec.results_path)
        print(f"results written to {os.path.join(ec.results_path, 'results.json')} and results.csv")
    _log(ec, results, model)
    return results
