"""The import paths the redesign moved, kept working until the next release with a DeprecationWarning.

`llmfoundry_lite.train` is the training function (DESIGN's public name), so the training package is
`llmfoundry_lite.training`; a plug-in's `from llmfoundry_lite.train.builders import ...` still finds it.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

MOVED = {  # old module or package -> new one (a package's modules follow it)
    "llmfoundry_lite.train": "llmfoundry_lite.training",
    "llmfoundry_lite.train.composer_model": "llmfoundry_lite.training.objectives.crossentropy",
    "llmfoundry_lite.train.dpo": "llmfoundry_lite.training.objectives.dpo",
    "llmfoundry_lite.export.opening": "llmfoundry_lite.opening",
    "llmfoundry_lite.export.lora": "llmfoundry_lite.assembly.lora",
    "llmfoundry_lite.export.state_dict": "llmfoundry_lite.assembly.weights",
    "llmfoundry_lite.data.icl": "llmfoundry_lite.icl.tasks",
    "llmfoundry_lite.data.command": "llmfoundry_lite.prep.command",
    "llmfoundry_lite.data.convert": "llmfoundry_lite.prep.convert",
}


def new_name(name: str):
    old = max((o for o in MOVED if name == o or name.startswith(o + ".")), key=len, default=None)
    return None if old is None else MOVED[old] + name[len(old):]


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports a moved module under its old name: the new module itself (one copy, one registration)."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if new_name(name) else None

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {new_name(spec.name)}; the old name goes in the next release",
                      DeprecationWarning, stacklevel=3)
        return importlib.import_module(new_name(spec.name))

    def exec_module(self, module):  # already executed under its new name
        pass


def install(train) -> None:
    """Serve the old names. `llmfoundry_lite.train` is registered up front, holding the function: a
    module imported on demand under that name would replace the package attribute, the function."""
    sys.meta_path.append(_Alias())
    alias = types.ModuleType("llmfoundry_lite.train", "Deprecated: the training package is llmfoundry_lite.training.")
    alias.__path__, alias.train = [], train  # a package, so that its (moved) modules import
    sys.modules.setdefault("llmfoundry_lite.train", alias)
