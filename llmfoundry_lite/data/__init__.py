"""Data: tokenizers, MDS readers and writers, finetuning formats, collators, packing, data prep.

No Composer imports here. The public names are imported lazily so `import llmfoundry_lite.data`
stays cheap (streaming and datasets are imported only by the pieces that need them).
"""
_LAZY = {
    "build_tokenizer": "llmfoundry_lite.data.tokenizer",
    "train_tokenizer": "llmfoundry_lite.data.tokenizer",
    "build_dataloader": "llmfoundry_lite.data.loaders",
    "dataloader_config_problems": "llmfoundry_lite.data.loaders",
    "StreamingTextDataset": "llmfoundry_lite.data.text_dataset",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llmfoundry_lite.data' has no attribute {name!r}")
