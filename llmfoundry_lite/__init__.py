"""llmfoundry_lite: pretrain, finetune, export and serve MPT models from YAML configs.

The public names are imported lazily so that `import llmfoundry_lite` stays cheap (no Composer).
"""
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {
    "MPTConfig": "llmfoundry_lite.models",
    "MPTModel": "llmfoundry_lite.models",
    "MPTForCausalLM": "llmfoundry_lite.models",
    "MPTForSequenceClassification": "llmfoundry_lite.models",
    "MPTForTokenClassification": "llmfoundry_lite.models",
    "MPTForQuestionAnswering": "llmfoundry_lite.models",
    "train": "llmfoundry_lite.train",
    "UserError": "llmfoundry_lite.errors",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llmfoundry_lite' has no attribute {name!r}")


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
    from llmfoundry_lite.train import train  # noqa: F401  (re-exported for type checkers)
