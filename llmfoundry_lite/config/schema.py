"""Typed dataclasses are the config schema; `check` is the one pass that validates a config against them.

`check(cls, data, path)` returns `(instance, problems)`: it never stops at the first problem, so one
`ConfigError` can list every problem of every section, at any depth. Each problem starts with the
dotted path of the key; unknown keys and unknown registry names get a did-you-mean suggestion.

Field types: the builtins, `Any`, `Optional`, `Union`, `Literal`, `List`, `Dict[str, ...]`, nested
dataclasses, and these, which is how a schema reaches into the registries:
  `Name[reg]`            a string naming an entry of registry `reg` (`attn_impl: flash`)
  `Named[reg]`           a mapping whose `name` key picks an entry of `reg`; its other keys are checked
                         against that entry's config dataclass (`optimizer: {name: decoupled_adamw, lr: ..}`).
                         The value is a `Section`.
  `NamedMap[reg]`        `{entry name: its keys}` (`callbacks: {speed_monitor: {window_size: 5}}`); `{}` or
                         null takes the defaults, `false` turns an entry off. The value is `{name: Section}`.
  `FromFile[T, key]`     a T, or the path of a YAML file whose `key` holds one (`ListOrFile[T, key]`: a list of T)
  `Annotated[T, Rule(...)]`   T with a value rule (`Positive`, `Probability`, `ExistingFile`)
A dataclass adds cross-field rules as methods marked `@cross("field", ...)`, each run when the fields
it needs are valid, so one pass reports them next to every other problem. `EXTRA_KEYS` (a ClassVar)
names keys another library owns, collected into the dataclass's `extra` field; `ALIASES` maps other
spellings of a key onto it; `KEY_HINTS` maps a key that is unknown here, but belongs to another
section, to the fix its "unknown key" problem states in place of a did-you-mean.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from typing import Annotated, Any, Callable, Dict, List, Mapping, Optional, Tuple

from llmfoundry_lite.config.loading import load_config
from llmfoundry_lite.errors import ConfigError, shown
from llmfoundry_lite.registry import Registry, did_you_mean


def join(path: str, key) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


@dataclasses.dataclass(frozen=True)
class Rule:
    """A value rule for `Annotated[T, Rule(problem)]`: `problem(value)` is None or what is wrong."""
    problem: Callable[[Any], Optional[str]]


def rule(ok: Callable[[Any], bool], message: str) -> Rule:
    """The rule '<message>, got <value>' for values where `ok(value)` is false."""
    return Rule(lambda v: None if ok(v) else f"{message}, got {v!r}")


Positive = Annotated[int, rule(lambda v: v > 0, "must be positive")]
ExistingFile = Annotated[str, Rule(lambda v: None if os.path.isfile(v) else
                                   f"file not found: {v} (relative paths are relative to the current directory)")]
Probability = Annotated[float, rule(lambda v: 0 <= v <= 1, "a probability in [0, 1]")]


@dataclasses.dataclass
class Section:
    """A checked named section: the registry entry, its config (a dataclass instance, or the keys
    themselves for an entry taking **kwargs) and the keys as written (`kwargs`, without the name)."""
    registry: Registry
    name: str
    config: Any
    kwargs: Dict[str, Any]

    def build(self, *args):
        """The entry called with the framework's `args` and the section's keys."""
        return self.registry.get(self.name)(*args, **self.kwargs)


def flat_values(value, prefix: str = "") -> Dict[str, Any]:
    """A checked config as flat `{"a.b.c": value}` (sections as their name and keys, lists by index):
    what the loggers record as the run's hyperparameters (MLflow params, the W&B config). Values read
    from the environment (`${oc.env:VAR}`: tokens, keys) are recorded as `<from the environment>`."""
    if isinstance(value, Section):
        items = {"name": value.name, **value.kwargs}
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if not f.name.startswith("_")}
    elif isinstance(value, Mapping):
        items = value
    elif isinstance(value, (list, tuple)):
        items = {str(i): v for i, v in enumerate(value)}
    else:
        return {prefix: shown(value)}
    flat = {}
    for key, sub in items.items():
        flat.update(flat_values(sub, f"{prefix}.{key}" if prefix else str(key)))
    return flat


class _FieldType:
    """A field type whose `coerce(value, path, problems)` checks its value (Name, Named, NamedMap, ListOrFile)."""

    def __init__(self, registry: Registry):
        self.registry = registry

    def __class_getitem__(cls, params):
        return Annotated[Any, cls(*(params if isinstance(params, tuple) else (params,)))]


class Name(_FieldType):
    def coerce(self, value, path, problems):
        if value not in self.registry:
            problems.append(self.registry.unknown_message(value, path))
        return value


class Named(_FieldType):
    def coerce(self, value, path, problems):
        if not isinstance(value, Mapping):
            problems.append(f"{path}: expected a mapping, got {value!r}; `{join(path, 'name')}` names "
                            f"the {self.registry.kind} (one of {self.registry.names()})")
            return value
        if "name" not in value:
            problems.append(f"{join(path, 'name')}: missing required key; choose one of {self.registry.names()}")
            return None
        kwargs = {k: v for k, v in value.items() if k != "name"}
        return entry_section(self.registry, value["name"], kwargs, join(path, "name"), path, problems)


def entry_section(registry: Registry, name, kwargs, name_path: str, path: str, problems: List[str]):
    """The Section of entry `name` configured by `kwargs`, or None with the problems appended."""
    if name not in registry:
        problems.append(registry.unknown_message(name, name_path))
        return None
    cls = registry.config_of(name)
    if cls is None:
        return Section(registry, name, dict(kwargs), dict(kwargs))
    config, sub = check(cls, kwargs, path)
    problems.extend(sub)
    return None if config is None else Section(registry, name, config, dict(kwargs))


class NamedMap(_FieldType):
    def coerce(self, value, path, problems):
        if not isinstance(value, Mapping):
            problems.append(f"{path}: expected a mapping of {self.registry.kind} names to their keys, got {value!r}")
            return value
        out = {}
        for name, kwargs in value.items():
            where = join(path, name)
            if name not in self.registry:  # also when turned off: a typo would leave the real one on
                problems.append(self.registry.unknown_message(name, where))
            elif kwargs is not None and kwargs is not True and kwargs is not False and not isinstance(kwargs, Mapping):
                problems.append(f"{where}: expected a mapping of arguments (or null/false), got {kwargs!r}")
            elif kwargs is not False:
                out[name] = entry_section(self.registry, name, kwargs if isinstance(kwargs, Mapping) else {},
                                          where, where, problems)
        return out


class FromFile(_FieldType):
    """`T`, or the path of a YAML file whose `key` holds a `T` (llm-foundry's `icl_tasks: tasks.yaml`)."""

    def __init__(self, tp, key: str):
        self.tp, self.key = tp, key

    def coerce(self, value, path, problems):
        if isinstance(value, str):
            if not os.path.isfile(value):
                problems.append(f"{path}: file not found: {value}")
                return value
            try:
                value, path = load_config(value).get(self.key), f"{value}: {self.key}"
            except ConfigError as e:  # unreadable YAML: one more problem of this pass
                problems.extend(f"{path}: {value}: {p}" for p in e.problems)
                return value
        if _value_shape(value) != _shape(self.tp):
            problems.append(f"{path}: expected {_type_name(self.tp)} (or the path of a YAML file with "
                            f"`{self.key}:`), got {value!r}")
            return value
        return coerce(self.tp, value, path, problems)


class ListOrFile(FromFile):
    """A list of `item_type`, or the path of a YAML file whose `key` holds that list."""

    def __init__(self, item_type, key: str):
        super().__init__(List[item_type], key)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is Annotated:
        return _type_name(typing.get_args(tp)[0])
    if origin in (list, List):
        return "a list"
    if origin in (dict, Dict) or dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _shape(tp) -> str:
    """'mapping', 'list' or 'scalar': which YAML node a type reads."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        meta = typing.get_args(tp)[1]
        if isinstance(meta, (Named, NamedMap)):
            return "mapping"
        return _shape(meta.tp) if isinstance(meta, FromFile) else _shape(typing.get_args(tp)[0])
    if origin in (dict, Dict, Mapping) or dataclasses.is_dataclass(tp):
        return "mapping"
    return "list" if origin in (list, List, tuple) else "scalar"


def _value_shape(value) -> str:
    return "mapping" if isinstance(value, Mapping) else "list" if isinstance(value, (list, tuple)) else "scalar"


def coerce(tp, value, path: str, problems: List[str]):
    """Return `value` checked (and lightly converted) against type `tp`, appending problems."""
    if tp is Any or tp is object:
        return value
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *meta = typing.get_args(tp)
        before = len(problems)
        value = meta[0].coerce(value, path, problems) if isinstance(meta[0], _FieldType) else \
            coerce(base, value, path, problems)
        for r in meta:
            problem = r.problem(value) if isinstance(r, Rule) and len(problems) == before else None
            if problem:
                problems.append(f"{path}: {problem}")
        return value
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        same_shape = args if len(args) == 1 else [a for a in args if _shape(a) == _value_shape(value)]
        if len(same_shape) == 1:  # one arm reads this kind of node: report its own (nested) problems
            return coerce(same_shape[0], value, path, problems)
        for arg in args:
            trial: List[str] = []
            out = coerce(arg, value, path, trial)
            if not trial:
                return out
        problems.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices or isinstance(value, bool) != any(isinstance(c, bool) for c in choices):
            problems.append(f"{path}: {value!r} is not allowed; expected one of {list(choices)}"
                            f"{did_you_mean(value, [str(c) for c in choices])}")
        return value
    if origin in (list, List, tuple):
        if not isinstance(value, (list, tuple)):
            problems.append(f"{path}: expected a list, got {value!r}")
            return value
        item_tp = (typing.get_args(tp) or (Any,))[0]
        return [coerce(item_tp, v, join(path, i), problems) for i, v in enumerate(value)]
    if origin in (dict, Dict, Mapping):
        if not isinstance(value, Mapping):
            problems.append(f"{path}: expected a mapping, got {value!r}")
            return value
        val_tp = (typing.get_args(tp) or (Any, Any))[1]
        return {k: coerce(val_tp, v, join(path, k), problems) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
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


def check(cls, data: Mapping, path: str = "", partial: bool = False) -> Tuple[Any, List[str]]:
    """Check `data` against dataclass `cls`; returns (instance or None, problems). `partial`: the
    instance even with problems, a field that has its own problems None (for rules run afterwards)."""
    if not isinstance(data, Mapping):
        return None, [f"{path or '<root>'}: expected a mapping, got {data!r}"]
    hints = typing.get_type_hints(cls, include_extras=True)
    extra_keys = getattr(cls, "EXTRA_KEYS", None)  # then the `extra` field collects them; it is not a key
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and not (extra_keys and f.name == "extra")}
    data = {getattr(cls, "ALIASES", {}).get(k, k): v for k, v in data.items()}
    extra = {k: v for k, v in data.items() if extra_keys and k in extra_keys and k not in fields}
    key_hints = getattr(cls, "KEY_HINTS", {})
    problems = [f"{join(path, k)}: unknown key" + (f": {key_hints[k]}" if k in key_hints else did_you_mean(k, fields))
                for k in data if k not in fields and k not in extra]
    kwargs, valid = {}, set()
    for name, field in fields.items():
        if name not in data and field.default_factory is dataclasses.MISSING:
            if field.default is dataclasses.MISSING:
                problems.append(f"{join(path, name)}: missing required key")
                kwargs[name] = None
            else:
                valid.add(name)
            continue
        value = data[name] if name in data else field.default_factory()  # default sections are checked as if written
        before = len(problems)
        kwargs[name] = coerce(hints[name], value, join(path, name), problems)
        if len(problems) == before or _built(kwargs[name]) or _names_an_entry(hints[name]):
            valid.add(name)
        else:
            kwargs[name] = None  # rules that need this field are not run
    if extra_keys:
        kwargs["extra"] = extra
    obj = cls(**kwargs)
    for rule in [getattr(cls, n) for n in dir(cls) if hasattr(getattr(cls, n, None), "needs")]:  # @cross methods
        if valid.issuperset(rule.needs):
            found = rule(obj, path)
            problems.extend([found] if isinstance(found, str) else found or [])
    return (obj if partial or valid == set(fields) else None), problems


def cross(*needs: str):
    """Mark a method `(self, path) -> problem | [problems] | None` as a cross-field rule of its
    dataclass; `check` runs it when every field it `needs` is valid, whatever else is wrong."""
    def mark(method):
        method.needs = needs
        return method
    return mark


def _names_an_entry(tp) -> bool:
    """A `Name[...]` field: an unknown name is still a string that cross-field rules can compare."""
    return typing.get_origin(tp) is Annotated and isinstance(typing.get_args(tp)[1], Name)


def _built(value) -> bool:
    """A nested section (or a list/mapping of them) that was built despite its problems (unknown keys,
    cross-field rules): the enclosing section can still apply its own rules."""
    if isinstance(value, (list, dict)):
        items = list(value.values() if isinstance(value, dict) else value)
        return bool(items) and all(_built(v) for v in items)
    return isinstance(value, Section) or dataclasses.is_dataclass(value)


def parse(cls, data: Mapping, path: str = "", header: str = "invalid config"):
    """`check` that raises one ConfigError listing every problem (`cls` may be any field type)."""
    problems: List[str] = []
    obj = coerce(cls, data, path, problems)
    if problems:
        raise ConfigError(problems, header)
    return obj

