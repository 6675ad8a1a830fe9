"""Hugging Face folders in and out, Composer checkpoints in (no Composer import needed), and
`open_model`, the one way every command opens a model."""
from llmfoundry_lite.export.composer_checkpoint import load_composer_checkpoint
from llmfoundry_lite.export.hf_export import native_blockers, write_hf_folder
from llmfoundry_lite.export.hf_import import load_hf_model
from llmfoundry_lite.export.opening import open_model

__all__ = ["write_hf_folder", "native_blockers", "load_composer_checkpoint", "load_hf_model", "open_model"]
