"""Training: the only layer that imports Composer. `train(cfg, overrides)` is the entry point.

`train` is imported lazily so that `import llmfoundry_lite.train.schema` (YAML validation) does not
pay for the Trainer import until training starts.
"""


def train(cfg, overrides=()):
    """Train from a YAML path or dict with `key=value` overrides; returns the fitted Composer Trainer."""
    from llmfoundry_lite.train.entry import train as _train
    return _train(cfg, overrides)


__all__ = ["train"]
