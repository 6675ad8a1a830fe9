"""Tokenizers: `build_tokenizer` loads one for configs (`tokenizer: {name: ..., kwargs: {...}}`).
Training one offline (`data-prep train-tokenizer`) is data prep: prep/tokenizer.py.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from transformers import AutoTokenizer

from llmfoundry_lite.config.schema import cross
from llmfoundry_lite.errors import UserError
from llmfoundry_lite.files import read_json_file
from llmfoundry_lite.registry import tokenizers as tokenizer_registry


@dataclass
class TokenizerSection:
    """The `tokenizer:` section of training and eval YAMLs."""
    name: str                                          # folder, registered name or hub name
    kwargs: Dict[str, Any] = field(default_factory=dict)  # to AutoTokenizer.from_pretrained

    @cross("name")
    def _folder_exists(self, path: str):
        if self.name.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(self.name)):
            return (f"{path}.name: tokenizer folder not found: {self.name} (train one with "
                    "`llmfoundry-lite data-prep train-tokenizer`, or give a registered or hub name)")

    def build(self):
        return build_tokenizer(self.name, self.kwargs)


def build_tokenizer(name_or_path: str, kwargs: Optional[dict] = None):
    """A Hugging Face tokenizer with an EOS token (concatenated pretraining text and finetuning targets
    end with it) and a pad token (EOS when it has none; padded positions are masked anyway).

    `name_or_path` is a name registered in `llmfoundry_lite.registry.tokenizers` (called with
    `**kwargs`), a local folder, or a hub name. `kwargs` go to `AutoTokenizer.from_pretrained`
    (e.g. `model_max_length`, `padding_side`, `trust_remote_code`).
    """
    kwargs = dict(kwargs or {})
    if name_or_path in tokenizer_registry:
        tok = tokenizer_registry.get(name_or_path)(**kwargs)
    else:
        if os.path.isdir(name_or_path):  # the tokenizers library reports bad JSON without naming the file
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                read_json_file(os.path.join(name_or_path, name), "a tokenizer folder", missing_ok=True)
        try:
            tok = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
        except (OSError, ValueError) as e:
            where = "folder" if os.path.isdir(name_or_path) else "tokenizer"
            raise UserError(f"cannot load {where} '{name_or_path}': {str(e).splitlines()[0]}\n"
                            "Give a local tokenizer folder (train one with `llmfoundry-lite data-prep "
                            "train-tokenizer`) or a hub name while online (HF_HUB_OFFLINE=0).") from None
    if tok.eos_token is None:
        raise UserError(f"tokenizer '{name_or_path}' has no EOS token; set one with "
                        "tokenizer.kwargs.eos_token (e.g. '<|endoftext|>')")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
