"""Named registries of building blocks, extensible by plug-in packages.

Every layer registers what it provides (`attention_impls.register("torch")(fn)`) and looks things up
by the names used in YAML configs. A plug-in package adds its own entries by declaring a module in
the entry-point group ``llmfoundry_lite.plugins``; the module is imported (and so registers itself)
the first time any name is missing from a registry::

    [project.entry-points."llmfoundry_lite.plugins"]
    my_plugin = "my_package.llmfoundry_plugin"
"""
from __future__ import annotations

import difflib
import importlib.metadata
from typing import Any, Callable, Dict, Iterable, Optional

from llmfoundry_lite.errors import UserError

ENTRY_POINT_GROUP = "llmfoundry_lite.plugins"
_plugins_loaded = False


def load_plugins() -> None:
    """Import every module declared in the `llmfoundry_lite.plugins` entry-point group (once)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        ep.load()


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Registry:
    """A name -> object table for one kind of building block (e.g. 'optimizers')."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, Any] = {}

    def register(self, name: str, obj: Any = None) -> Callable:
        """Register `obj` under `name`; usable as a decorator when `obj` is omitted."""
        def add(o):
            if name in self._entries and self._entries[name] is not o:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._entries[name] = o
            return o
        return add if obj is None else add(obj)

    def remove(self, name: str) -> None:
        """Unregister `name` (a plug-in that is done, e.g. in tests)."""
        del self._entries[name]

    def __contains__(self, name: str) -> bool:
        if not isinstance(name, str):  # a YAML list or mapping where a name belongs
            return False
        if name not in self._entries:
            load_plugins()
        return name in self._entries

    def get(self, name: str, path: Optional[str] = None) -> Any:
        if name in self:
            return self._entries[name]
        raise UserError(self.unknown_message(name, path))

    def unknown_message(self, name: str, path: Optional[str] = None) -> str:
        where = f"{path}: " if path else ""
        return (f"{where}unknown {self.kind} '{name}'{did_you_mean(name, self._entries)}; "
                f"choose one of {sorted(self._entries)} or register one with a plug-in")

    def names(self):
        load_plugins()
        return sorted(self._entries)


# The registries every layer shares. Each layer fills its own at import time.
attention_impls = Registry("attention implementation")
norms = Registry("norm")
ffns = Registry("ffn")
param_inits = Registry("init function")
models = Registry("model")
tokenizers = Registry("tokenizer")
dataloaders = Registry("dataloader")
preprocessors = Registry("finetuning preprocessor")
optimizers = Registry("optimizer")
schedulers = Registry("scheduler")
algorithms = Registry("algorithm")
callbacks = Registry("callback")
loggers = Registry("logger")
icl_tasks = Registry("ICL task type")
