"""Typed dataclasses are the config schema; this module checks plain dicts against them.

`check(cls, data, path)` returns `(instance, problems)`: it never stops at the first problem, so a
caller can gather the problems of every section and raise one `ConfigError` listing them all. Each
problem starts with the dotted path of the key and, for unknown keys, a did-you-mean suggestion.
Supported field types: the builtins, `Any`, `Optional[...]`, `Union[...]`, `Literal[...]`,
`List[...]`, `Dict[str, ...]` and nested dataclasses.
"""
from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any, Callable, Dict, List, Mapping, Tuple

from llmfoundry_lite.errors import ConfigError
from llmfoundry_lite.registry import did_you_mean


def join(path: str, key) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, List):
        return "a list"
    if origin in (dict, Dict):
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def coerce(tp, value, path: str, problems: List[str]):
    """Return `value` checked (and lightly converted) against type `tp`, appending problems."""
    if tp is Any or tp is object:
        return value
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        if len(others) == 1:  # Optional[X]: report X's own (possibly nested) problems
            return coerce(others[0], value, path, problems)
        for arg in args:
            if arg is type(None):
                continue
            trial: List[str] = []
            out = coerce(arg, value, path, trial)
            if not trial:
                return out
        problems.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            problems.append(f"{path}: {value!r} is not allowed; expected one of {list(choices)}"
                            f"{did_you_mean(value, [str(c) for c in choices])}")
        return value
    if origin in (list, List, tuple):
        if not isinstance(value, (list, tuple)):
            problems.append(f"{path}: expected a list, got {value!r}")
            return value
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        return [coerce(item_tp, v, join(path, i), problems) for i, v in enumerate(value)]
    if origin in (dict, Dict, Mapping):
        if not isinstance(value, Mapping):
            problems.append(f"{path}: expected a mapping, got {value!r}")
            return value
        args = typing.get_args(tp)
        val_tp = args[1] if args else Any
        return {k: coerce(val_tp, v, join(path, k), problems) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            problems.append(f"{path}: expected a mapping, got {value!r}")
            return value
        obj, sub = check(tp, value, path)
        problems.extend(sub)
        return obj
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        problems.append(f"{path}: expected {tp.__name__}, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        problems.append(f"{path}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def unknown_keys(data: Mapping, known, path: str) -> List[str]:
    """One problem per key of `data` that is not in `known`, with a did-you-mean suggestion."""
    known = list(known)
    return [f"{join(path, k)}: unknown key{did_you_mean(k, known)}" for k in data if k not in known]


def check(cls, data: Mapping, path: str = "") -> Tuple[Any, List[str]]:
    """Check `data` against dataclass `cls`; returns (instance or None, problems)."""
    if not isinstance(data, Mapping):
        return None, [f"{path or '<root>'}: expected a mapping, got {data!r}"]
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    problems = unknown_keys(data, fields, path)
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = coerce(hints[name], data[name], join(path, name), problems)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            problems.append(f"{join(path, name)}: missing required key")
    if problems:
        return None, problems
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:  # cross-field rules: `def validate(self, path) -> list[str]`
        problems.extend(validate(path))
    return obj, problems


def parse(cls, data: Mapping, path: str = "", header: str = "invalid config"):
    """`check` that raises one ConfigError listing every problem."""
    obj, problems = check(cls, data, path)
    if problems:
        raise ConfigError(problems, header)
    return obj


def check_kwargs(fn: Callable, kwargs: Mapping, path: str, skip=()) -> List[str]:
    """Problems for keys of `kwargs` that `fn` does not accept, or required arguments that are missing.

    Used for registry entries configured by keyword arguments (optimizers, schedulers, callbacks).
    """
    sig = inspect.signature(fn)
    params = {n: p for n, p in sig.parameters.items() if n not in skip and n != "self"}
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return []
    accepted = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    problems = unknown_keys(kwargs, accepted, path)
    for n in accepted:
        if params[n].default is inspect.Parameter.empty and n not in kwargs:
            problems.append(f"{join(path, n)}: missing required key")
    return problems
