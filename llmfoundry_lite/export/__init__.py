"""Hugging Face folders in and out, Composer checkpoints in (no Composer import needed), and
`open_model`, the one way every command opens a model.

- `write_hf_folder(config, state_dict, out_dir, tokenizer=None, dtype=torch.float32, max_shard_size="5GB")`
- `load_composer_checkpoint(path) -> (MPTForCausalLM, tokenizer | None)`
- `load_hf_model(path_or_name, **kw) -> MPTForCausalLM`
- `open_model(folder, checkpoint or model section, tokenizer=None) -> (model, tokenizer)`
"""
from llmfoundry_lite.export.composer_checkpoint import load_composer_checkpoint
from llmfoundry_lite.export.hf_export import native_blockers, write_hf_folder
from llmfoundry_lite.export.hf_import import load_hf_model
from llmfoundry_lite.export.opening import open_model

__all__ = ["write_hf_folder", "native_blockers", "load_composer_checkpoint", "load_hf_model", "open_model"]
