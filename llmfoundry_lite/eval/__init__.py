"""Evaluation: perplexity on held-out data and in-context-learning (ICL) tasks, standalone or in training.

`icl` is pure torch (task formats, prompts, batches, scoring); `composer_evaluators` turns a training
YAML's `icl_tasks` into Composer evaluators; `runner.evaluate` is `llmfoundry-lite eval YAML`.
Names are imported lazily so `import llmfoundry_lite.eval` does not import Composer.
"""
_LAZY = {
    "ICLTaskConfig": "llmfoundry_lite.eval.icl",
    "ICLTaskType": "llmfoundry_lite.eval.icl",
    "evaluate_icl_task": "llmfoundry_lite.eval.icl",
    "build_icl_evaluators": "llmfoundry_lite.eval.composer_evaluators",
    "icl_tasks_config_problems": "llmfoundry_lite.eval.icl",
    "evaluate": "llmfoundry_lite.eval.runner",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llmfoundry_lite.eval' has no attribute {name!r}")
