"""Hugging Face folders in and out, and Composer checkpoints in (no Composer import needed).

- `write_hf_folder(config, state_dict, out_dir, tokenizer=None, dtype=torch.float32, max_shard_size="5GB")`
- `load_composer_checkpoint(path) -> (MPTForCausalLM, tokenizer | None)`, `iter_composer_weights(path)`
- `load_hf_model(path_or_name, **kw) -> MPTForCausalLM`
- `convert_composer_to_hf(composer_path, hf_output_path, output_precision="fp32", max_shard_size="5GB")`
"""
_LAZY = {
    "write_hf_folder": "llmfoundry_lite.export.hf_export",
    "native_blockers": "llmfoundry_lite.export.hf_export",
    "load_composer_checkpoint": "llmfoundry_lite.export.composer_checkpoint",
    "iter_composer_weights": "llmfoundry_lite.export.composer_checkpoint",
    "open_composer_checkpoint": "llmfoundry_lite.export.composer_checkpoint",
    "is_composer_checkpoint": "llmfoundry_lite.export.composer_checkpoint",
    "load_hf_model": "llmfoundry_lite.export.hf_import",
    "convert_composer_to_hf": "llmfoundry_lite.export.command",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llmfoundry_lite.export' has no attribute {name!r}")
