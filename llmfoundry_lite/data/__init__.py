"""Data: tokenizers, MDS readers and writers, finetuning formats, ICL tasks, collators, packing,
data prep. No Composer imports here (streaming and datasets are imported by the pieces that need them)."""
from llmfoundry_lite.data.loaders import build_dataloader
from llmfoundry_lite.data.tokenizer import build_tokenizer, train_tokenizer

__all__ = ["build_tokenizer", "train_tokenizer", "build_dataloader"]
