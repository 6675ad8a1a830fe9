"""Named registries of building blocks, extensible by plug-in packages.

Each registry is declared below with the module that defines and registers its built-in entries,
named as a string and imported the first time the registry is used: every built-in name is known
before the first config check, and this module stays at the bottom of the layers (see DESIGN.md)
while the entries live in the layer that builds them. A plug-in package adds its own entries by
declaring a module in the entry-point group ``llmfoundry_lite.plugins``; the module is imported (and
so registers itself) the first time a name is missing from a registry::

    [project.entry-points."llmfoundry_lite.plugins"]
    my_plugin = "my_package.llmfoundry_plugin"

An entry configured from YAML has a config dataclass: the one given to `register(..., config=...)`,
or one derived from the entry's signature (`config_of`), so a plug-in's arguments are checked too.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.metadata
import inspect
from typing import Any, Callable, Dict, Iterable, Optional

from llmfoundry_lite.errors import UserError

ENTRY_POINT_GROUP = "llmfoundry_lite.plugins"
_plugins_loaded = False


def load_plugins() -> None:
    """Import every module declared in the `llmfoundry_lite.plugins` entry-point group (once)."""
    global _plugins_loaded
    if not _plugins_loaded:
        _plugins_loaded = True
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            ep.load()


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def signature_config(obj: Callable, supplied: Iterable[str] = ()) -> Optional[type]:
    """A dataclass with one field per keyword argument of `obj` (minus those the framework `supplied`),
    required where the argument has no default; None when `obj` takes **kwargs (any key goes)."""
    params = [p for p in inspect.signature(obj).parameters.values() if p.name not in supplied and p.name != "self"]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    fields = [(p.name, Any) if p.default is p.empty else (p.name, Any, dataclasses.field(default=p.default))
              for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return dataclasses.make_dataclass(f"{getattr(obj, '__name__', 'Entry')}Config", fields, kw_only=True)


class Registry:
    """A name -> object table for one kind of building block (e.g. 'optimizers').

    `builtins`: the module defining the built-in entries, imported on first use. `supplied`: the
    arguments the framework passes itself (an optimizer's `params`), never configured from YAML.
    """

    def __init__(self, kind: str, builtins: Optional[str] = None, supplied: Iterable[str] = ()):
        self.kind, self.builtins, self.supplied = kind, builtins, tuple(supplied)
        self._entries: Dict[str, Any] = {}
        self._configs: Dict[str, Optional[type]] = {}

    def register(self, name: str, obj: Any = None, config: Optional[type] = None) -> Callable:
        """Register `obj` under `name` (with its config dataclass); usable as a decorator when `obj` is omitted."""
        def add(o):
            if name in self._entries and self._entries[name] is not o:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._entries[name] = o
            if config is not None:
                self._configs[name] = config
            return o
        return add if obj is None else add(obj)

    def remove(self, name: str) -> None:
        """Unregister `name` (a plug-in that is done, e.g. in tests)."""
        del self._entries[name]
        self._configs.pop(name, None)

    def _load_builtins(self) -> None:
        if self.builtins is not None:
            module, self.builtins = self.builtins, None
            importlib.import_module(module)

    def __contains__(self, name: str) -> bool:
        if not isinstance(name, str):  # a YAML list or mapping where a name belongs
            return False
        self._load_builtins()
        if name not in self._entries:
            load_plugins()
        return name in self._entries

    def get(self, name: str, path: Optional[str] = None) -> Any:
        if name in self:
            return self._entries[name]
        raise UserError(self.unknown_message(name, path))

    def config_of(self, name: str) -> Optional[type]:
        """The config dataclass of entry `name` (None: it takes any keyword arguments)."""
        if name not in self._configs:
            self._configs[name] = signature_config(self.get(name), self.supplied)
        return self._configs[name]

    def unknown_message(self, name: str, path: Optional[str] = None) -> str:
        where = f"{path}: " if path else ""
        return (f"{where}unknown {self.kind} '{name}'{did_you_mean(name, self.names())}; "
                f"choose one of {self.names()} or register one with a plug-in")

    def names(self):
        self._load_builtins()
        load_plugins()
        return sorted(self._entries)


# The registries every layer shares, each with the module that defines its built-in entries.
attention_impls = Registry("attention implementation", "llmfoundry_lite.models.layers.attention")
norms = Registry("norm", "llmfoundry_lite.models.layers.norms")
ffns = Registry("ffn", "llmfoundry_lite.models.layers.ffn")
param_inits = Registry("init function", "llmfoundry_lite.models.layers.init")
models = Registry("model", "llmfoundry_lite.opening")
tokenizers = Registry("tokenizer", "llmfoundry_lite.data.tokenizer")
dataloaders = Registry("dataloader", "llmfoundry_lite.data.loaders")
preprocessors = Registry("finetuning preprocessor", "llmfoundry_lite.data.finetuning")
icl_tasks = Registry("ICL task type", "llmfoundry_lite.icl.tasks")
optimizers = Registry("optimizer", "llmfoundry_lite.training.builders", supplied=("params",))
schedulers = Registry("scheduler", "llmfoundry_lite.training.builders")
algorithms = Registry("algorithm", "llmfoundry_lite.training.builders")
callbacks = Registry("callback", "llmfoundry_lite.training.builders")
loggers = Registry("logger", "llmfoundry_lite.training.builders")
objectives = Registry("loss", "llmfoundry_lite.training.objectives")
