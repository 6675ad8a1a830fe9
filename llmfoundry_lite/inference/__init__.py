"""Inference: batched generation, ChatML chat and an HTTP endpoint over an MPT model.

`generate(model, tokenizer, prompts, ...)` is the function the three commands share;
`load_model_and_tokenizer(path, device, dtype)` opens a model folder or a Composer checkpoint.
"""
# `generate` is imported eagerly: the function shares its name with its module, and a lazy lookup
# would hand out the module once `llmfoundry_lite.inference.generate` has been imported.
from llmfoundry_lite.inference.generate import Generations, generate

_LAZY = {
    "load_model_and_tokenizer": "llmfoundry_lite.inference.loading",
    "ChatSession": "llmfoundry_lite.inference.chat",
    "make_server": "llmfoundry_lite.inference.serve",
}

__all__ = ["generate", "Generations", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llmfoundry_lite.inference' has no attribute {name!r}")
