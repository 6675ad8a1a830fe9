"""Loading a YAML (or dict) config with omegaconf: dotted overrides, `${variables.x}` interpolation, and
values from environment variables (`${oc.env:VAR}`, `${oc.env:VAR,default}`), which no error shows."""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Sequence, Union

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from omegaconf.resolvers import oc

from llmfoundry_lite.errors import ConfigError, UserError, hide_in_messages


def _env(key: str, *default):
    """omegaconf's own `oc.env`, whose values are then kept out of error messages."""
    value = oc.env(key, *default)
    hide_in_messages(value)
    return value


OmegaConf.register_resolver("oc.env", _env, replace=True)


def load_config(source: Union[str, os.PathLike, Mapping], overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """YAML path or dict + `key.sub=value` overrides -> plain dict with interpolations resolved.

    The top-level `variables` section only feeds interpolation and is removed from the result.
    """
    if not isinstance(source, Mapping) and not os.path.isfile(source):
        raise UserError(f"config file not found: {source}")
    try:
        cfg = OmegaConf.create(dict(source)) if isinstance(source, Mapping) else OmegaConf.load(source)
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError([f"override {o!r}: expected key=value (e.g. max_duration=10ba)" for o in bad])
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        data = OmegaConf.to_container(cfg, resolve=True)
    except (OmegaConfBaseException, yaml.YAMLError, UnicodeDecodeError) as e:  # YAML syntax errors keep their line
        detail = str(e).splitlines()[0] if isinstance(e, OmegaConfBaseException) else " ".join(str(e).split())[:300]
        raise ConfigError([detail], header=f"cannot read config {source if not isinstance(source, Mapping) else ''}".strip()) from None
    if not isinstance(data, dict):
        raise ConfigError([f"the top level must be a mapping, got {type(data).__name__}"])
    data.pop("variables", None)
    return data
