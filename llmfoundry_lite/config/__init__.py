"""Config: typed dataclass schemas checked by `schema.check`, YAML loading with overrides."""
from llmfoundry_lite.config.loading import load_config
from llmfoundry_lite.config.schema import (
    ExistingFile,
    FromFile,
    ListOrFile,
    Name,
    Named,
    NamedMap,
    Positive,
    Probability,
    Rule,
    Section,
    check,
    cross,
    join,
    parse,
    rule,
)

__all__ = ["load_config", "check", "cross", "parse", "join", "rule", "Name", "Named", "NamedMap", "ListOrFile", "FromFile",
           "Section", "Positive", "Probability", "Rule", "ExistingFile"]
