"""ICL tasks of a training YAML (`icl_tasks:`) as Composer evaluators, run at `eval_interval`.

One `Evaluator` per (task, num_fewshot[, category]), labelled `<label>/<k>-shot[/<category>]`, so
Composer logs `metrics/<label>/<k>-shot/<metric>` (llm-foundry's names). The batches are `icl.ICLDataset`'s:
Composer's `HuggingFaceModel.eval_forward` returns logits for `mode: icl_task` and generated text for
`mode: generate`, and hands the whole batch to metrics that set `needs_batch`; the metrics below
judge with the same functions as the standalone evaluation, so both report the same numbers.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from composer.core import DataSpec, Evaluator
from composer.utils import dist
from torchmetrics import Metric

from llmfoundry_lite.icl import tasks as icl
from llmfoundry_lite.registry import icl_tasks

__all__ = ["build_icl_evaluators", "add_icl_metrics", "ICL_METRICS"]


class _ICLAccuracy(Metric):
    """Fraction of examples judged correct; summed over ranks."""

    needs_batch = True  # Composer then calls update(batch=..., outputs=..., labels=...)
    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("correct", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, batch: Dict[str, Any], outputs: Any, labels: Any = None) -> None:
        ok = (icl.judge_generations(outputs, {**batch, "labels": labels}) if batch["mode"] == "generate"
              else icl.judge_logits(outputs, batch))  # generation: Composer popped the answers into `labels`
        self.correct += sum(ok)
        self.total += len(ok)

    def compute(self) -> torch.Tensor:
        return self.correct / self.total.clamp(min=1)


class InContextLearningLMAccuracy(_ICLAccuracy):
    """language_modeling: greedy continuation exact match."""


class InContextLearningMultipleChoiceAccuracy(_ICLAccuracy):
    """multiple_choice and schema: the gold option has the lowest mean continuation loss."""


class InContextLearningGenerationExactMatchAccuracy(_ICLAccuracy):
    """generation_task_with_answers: normalised greedy generation equals an answer."""


ICL_METRICS = (InContextLearningLMAccuracy, InContextLearningMultipleChoiceAccuracy,
               InContextLearningGenerationExactMatchAccuracy)


def add_icl_metrics(composer_model) -> None:
    """Give a `HuggingFaceModel` the ICL metrics its evaluators name (each evaluator gets a copy)."""
    composer_model.val_metrics = dict(composer_model.val_metrics or {})
    for cls in ICL_METRICS:
        composer_model.val_metrics.setdefault(cls.__name__, cls())


def build_icl_evaluators(tasks: List[icl.ICLTaskConfig], tokenizer, device_eval_batch_size: int, max_seq_len: int,
                         subset_num_batches: Optional[int] = None) -> List[Evaluator]:
    """Evaluators for the checked tasks of an `icl_tasks` section.

    The model must carry the metrics (`add_icl_metrics(composer_model)`). Each batch holds
    `batch_size` examples with all their rows; DataSpec splits never separate one example's rows.
    """
    evaluators = []
    for cfg in tasks:
        batch_size = cfg.batch_size or device_eval_batch_size
        for label, ds in icl.task_datasets(cfg, tokenizer, max_seq_len):
            loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=ds.collate,
                                                 sampler=dist.get_sampler(ds, shuffle=False, drop_last=False))
            spec = DataSpec(loader, get_num_samples_in_batch=icl.num_examples, split_batch=icl.split_examples)
            evaluators.append(Evaluator(label=label, dataloader=spec,
                                        metric_names=[icl_tasks.get(cfg.icl_task_type).metric_name],
                                        subset_num_batches=subset_num_batches,
                                        device_eval_microbatch_size=batch_size))
    return evaluators
