"""Training objectives: the losses `model.loss_fn` names, registered in `registry.objectives`.

An objective (`Objective`, base.py) is everything about a loss that is not the model: the Composer
model that computes it and its metrics (`build`), the loaders whose batches it reads, its own keys (a
dataclass, under `model.<its name>`), the config rules it adds (on the YAML, on the built model, on
the eval loaders), and what the Trainer needs for it (how
many samples a batch holds, callbacks, what changes when a run does not start from the model section's
weights). The training schema checks a config against the objective it names (one rule,
`TrainConfig._objective`) and `fit` builds it, with no branch per loss.

Built in: `torch_crossentropy` and `fused_crossentropy` (crossentropy.py), `dpo` (dpo.py). A new loss is
one module here that registers its `Objective`, imported below (or a plug-in's module doing the same).
"""
from llmfoundry_lite.training.objectives import crossentropy, dpo  # noqa: F401 (they register themselves)
from llmfoundry_lite.training.objectives.base import Objective

__all__ = ["Objective"]
