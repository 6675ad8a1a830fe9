"""llm-foundry's eval gauntlet: ICL accuracies folded into one score per category and named averages.

As its `EvalGauntlet` callback computes them: a benchmark's score is its accuracy at `num_fewshot`
(a task with categories: the mean over them), minus `random_baseline` when subtract_random_baseline,
divided by (1 - random_baseline) when also rescale_accuracy. A category is the weighted mean of its
benchmarks' scores, weighted EQUAL (1), SAMPLE_SZ (the task's number of examples) or LOG_SAMPLE_SZ
(max(log2 of it, 1)); a category with a benchmark that was not evaluated is left out (with a warning).
Each average is the plain mean of its categories that have a score (0 when none has: llm-foundry's own
suites name categories they do not define);
without `averages`, `default_average` averages them all.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Annotated, Callable, Dict, List, Literal, Optional

from llmfoundry_lite.config import cross, join, rule

NonNegative = Annotated[int, rule(lambda v: v >= 0, "must be >= 0")]


@dataclasses.dataclass
class GauntletBenchmark:
    name: str                       # an ICL task label
    num_fewshot: NonNegative
    random_baseline: Annotated[float, rule(lambda v: 0 <= v < 1, "must be in [0, 1)")]


@dataclasses.dataclass
class GauntletCategory:
    name: str
    benchmarks: List[GauntletBenchmark]


@dataclasses.dataclass
class GauntletConfig:
    """`eval_gauntlet:` inline, or the path of a YAML file with an `eval_gauntlet` section."""
    categories: List[GauntletCategory]
    weighting: Literal["EQUAL", "SAMPLE_SZ", "LOG_SAMPLE_SZ"] = "EQUAL"
    subtract_random_baseline: bool = True
    rescale_accuracy: bool = True
    averages: Optional[Dict[str, List[str]]] = None   # {average name: [category names]}

    @cross("subtract_random_baseline", "rescale_accuracy")
    def _rescale_needs_subtract(self, path: str):
        if self.rescale_accuracy and not self.subtract_random_baseline:
            return (f"{join(path, 'rescale_accuracy')}: rescaling only makes sense after subtracting the random "
                    "baseline; set subtract_random_baseline: true or rescale_accuracy: false")

    @cross("categories", "averages")
    def _average_names(self, path: str):
        names = {c.name for c in self.categories}
        return [f"{join(path, 'averages')}.{a}: is also a category name; name averages apart from categories"
                for a in self.averages or {} if a in names]

    def average_names(self) -> Dict[str, List[str]]:
        return self.averages if self.averages is not None else {"default_average": [c.name for c in self.categories]}


def _weight(weighting: str, size_of: Callable[[str], int], label: str) -> float:
    if weighting == "EQUAL":
        return 1.0
    size = max(size_of(label), 1)
    return float(size) if weighting == "SAMPLE_SZ" else max(math.log2(size), 1.0)


def gauntlet_scores(cfg: GauntletConfig, accuracies: Dict[str, float],
                    size_of: Callable[[str], int]) -> Dict[str, float]:
    """{'eval_gauntlet/<category or average>': score} from ICL accuracies keyed '<label>/<k>-shot'.
    `size_of(label)` is a task's number of examples (asked only for SAMPLE_SZ / LOG_SAMPLE_SZ)."""
    scores: Dict[str, float] = {}
    for category in cfg.categories:
        missing = [f"{b.name}/{b.num_fewshot}-shot" for b in category.benchmarks
                   if f"{b.name}/{b.num_fewshot}-shot" not in accuracies]
        if missing:
            warnings.warn(f"eval_gauntlet: category {category.name!r} left out: no results for {missing}", stacklevel=2)
            continue
        weighted = []
        for b in category.benchmarks:
            score = accuracies[f"{b.name}/{b.num_fewshot}-shot"]
            if cfg.subtract_random_baseline:
                score -= b.random_baseline
                if cfg.rescale_accuracy:
                    score /= 1.0 - b.random_baseline
            weighted.append((score, _weight(cfg.weighting, size_of, b.name)))
        total = sum(w for _, w in weighted)
        scores[category.name] = sum(s * w / total for s, w in weighted)
    for name, members in cfg.average_names().items():
        found = [scores[m] for m in members if m in scores]
        scores[name] = sum(found) / len(found) if found else 0.0
    return {f"eval_gauntlet/{k}": v for k, v in scores.items()}
