"""Training: the only layer that imports Composer. `train(cfg, overrides)` is the entry point.

`train` is imported lazily so that `import llmfoundry_lite.train.schema` (YAML validation) does not
pay for the Trainer import until training starts.
"""
import sys
import types


def train(cfg, overrides=()):
    """Train from a YAML path or dict with `key=value` overrides; returns the fitted Composer Trainer."""
    from llmfoundry_lite.train.entry import train as _train
    return _train(cfg, overrides)


class _CallablePackage(types.ModuleType):
    """`from llmfoundry_lite import train` is the function (DESIGN's public name), but once any
    `llmfoundry_lite.train.*` module is imported, Python binds that name to this package instead:
    so the package calls the function too."""

    def __call__(self, cfg, overrides=()):
        return train(cfg, overrides)


sys.modules[__name__].__class__ = _CallablePackage
__all__ = ["train"]
