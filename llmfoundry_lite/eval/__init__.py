"""Evaluation: perplexity on held-out data and in-context-learning (ICL) accuracy, outside Composer.

The ICL tasks themselves (formats, prompts, batches, judging) are `icl/tasks.py`; `eval/icl.py` runs a
model over them; `runner.evaluate` is `llmfoundry-lite eval YAML`. During training the same tasks run
as Composer evaluators (`training/icl_evaluators.py`).
"""
from llmfoundry_lite.eval.icl import evaluate_icl_task
from llmfoundry_lite.eval.runner import evaluate

__all__ = ["evaluate", "evaluate_icl_task"]
