"""llmfoundry_lite: pretrain, finetune, export and serve MPT models from YAML configs.

The public names load their modules on first use, so that `import llmfoundry_lite` stays cheap (no
Composer, no transformers).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from llmfoundry_lite.compat import moved

__version__ = "0.1.0"

_LAZY = {**dict.fromkeys(["MPTConfig", "MPTModel", "MPTForCausalLM", "MPTForSequenceClassification",
                          "MPTForTokenClassification", "MPTForQuestionAnswering"], "llmfoundry_lite.models"),
         "UserError": "llmfoundry_lite.errors"}

__all__ = ["train", *_LAZY]


def train(cfg, overrides=()):
    """Train from a YAML path or dict with `key=value` overrides; returns the fitted Composer Trainer."""
    from llmfoundry_lite.training.entry import train as train_yaml  # lazy: the public facade loads Composer on use
    return train_yaml(cfg, overrides)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llmfoundry_lite' has no attribute {name!r}")


moved.install(train)

if TYPE_CHECKING:  # for type checkers and IDEs
    from llmfoundry_lite.errors import UserError  # noqa: F401  (re-exported for type checkers)
    from llmfoundry_lite.models import (  # noqa: F401  (re-exported for type checkers)
        MPTConfig,
        MPTForCausalLM,
        MPTForQuestionAnswering,
        MPTForSequenceClassification,
        MPTForTokenClassification,
        MPTModel,
    )
