"""`Objective`: what the config check and `fit` need from a training loss (see the package docstring)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple


@dataclass(frozen=True)
class Objective:
    """A training loss, registered with `registry.objectives.register(name, Objective(...))`; `name` is
    what `model.loss_fn` says."""
    # (inner model, tokenizer, checked options or None, train dataloader) -> the Composer model to train
    build: Callable[[Any, Any, Any, Any], Any]
    accepts: Callable[[str], bool]  # whether it trains and evaluates on loaders of this name
    wrong_loader: str               # the problem of a loader it does not accept; {loader} and {loss_fn} filled in
    options: Optional[type] = None  # the dataclass of its keys, under `model.<name>`
    rules: Tuple[Callable[[Any], List[str]], ...] = ()  # (checked TrainConfig) -> its problems
    # (checked TrainConfig, built model) -> its problems with what only the model knows (an HF folder's config)
    model_rules: Tuple[Callable[[Any, Any], List[str]], ...] = ()
    # (Composer model, eval dataset) -> why the model cannot evaluate on it, or None
    eval_problem: Callable[[Any, Any], Optional[str]] = lambda model, dataset: None
    samples_in_batch: Optional[Callable[[Any], int]] = None  # Composer's get_num_samples_in_batch; None: its own
    callbacks: Callable[[], List[Any]] = list  # the Composer callbacks it adds to the run
    # told, once the Trainer is made, that the run does not start from the model section's weights
    # (load_path, or a resumed run)
    not_at_start: Callable[[Any], None] = lambda model: None
