"""Model formats in and out: Hugging Face folders, Composer checkpoints (read without Composer), and
the checks that keep reading them safe (no pickled code runs, checksums verified)."""
from llmfoundry_lite.export.composer_checkpoint import load_composer_checkpoint
from llmfoundry_lite.export.hf_export import native_blockers, write_hf_folder
from llmfoundry_lite.export.hf_import import load_hf_model

__all__ = ["write_hf_folder", "native_blockers", "load_composer_checkpoint", "load_hf_model"]
