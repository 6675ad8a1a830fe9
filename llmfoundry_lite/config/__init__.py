"""Config: typed dataclass schemas checked by `schema.check`, YAML loading with overrides."""
from llmfoundry_lite.config.loading import load_config
from llmfoundry_lite.config.schema import check, check_kwargs, parse, unknown_keys

__all__ = ["load_config", "check", "check_kwargs", "parse", "unknown_keys"]
