"""Tokenizers: `build_tokenizer` loads one for configs (`tokenizer: {name: ..., kwargs: {...}}`);
`train_tokenizer` trains a small byte-level BPE offline, which is how tests, the quickstart and
offline users get a tokenizer, since nothing can be fetched from the hub here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence

from llmfoundry_lite.config.schema import cross
from llmfoundry_lite.data.chat import CHATML_TEMPLATE, IM_END, IM_START
from llmfoundry_lite.errors import UserError
from llmfoundry_lite.files import claim_folder, read_json_file, staged_folder
from llmfoundry_lite.registry import tokenizers as tokenizer_registry

EOS = "<|endoftext|>"
DEFAULT_SPECIAL_TOKENS = (EOS, IM_START, IM_END)


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
        from transformers import AutoTokenizer
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


def _read_texts(files: Sequence[str]) -> Iterable[str]:
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                yield from f
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); "
                            "convert it to UTF-8 first") from None


WRITER = "data-prep train-tokenizer"  # named in the manifest of the folders it writes (files.py)
OVERWRITE_DOES = ("it replaces the tokenizer files (tokenizer.json, tokenizer_config.json, special_tokens_map.json, "
                  "chat_template.jinja), so a model in that folder gets a tokenizer of another vocabulary")


def train_tokenizer(inputs: Sequence[str], out_dir: str, vocab_size: int = 8192,
                    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS, eos_token: str = EOS,
                    model_max_length: int = 2048, min_frequency: int = 2, overwrite: bool = False):
    """Train a byte-level BPE on text files (or folders of .txt/.md) and save it to `out_dir`, with a
    ChatML chat template, as a folder `AutoTokenizer.from_pretrained` loads.

    `eos_token` (also the pad token) must be one of `special_tokens`. Returns the loaded `PreTrainedTokenizerFast`.
    `out_dir` must be new, empty or a tokenizer this function saved (its manifest, files.py), whose files
    it replaces; any other folder (say a model's, whose vocabulary it would change) is refused before
    training, unless `overwrite`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    claim_folder(out_dir, WRITER, "--out", overwrite, mark=False, overwrite_does=OVERWRITE_DOES)
    special_tokens = list(dict.fromkeys(special_tokens))
    if eos_token not in special_tokens:
        raise UserError(f"eos_token {eos_token!r} must be one of the special tokens {special_tokens}")
    if vocab_size < 256 + len(special_tokens):
        raise UserError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs at least "
                        f"{256 + len(special_tokens)} (256 bytes + special tokens)")
    files: List[str] = []
    for p in inputs:
        if os.path.isdir(p):
            files += sorted(os.path.join(root, n) for root, _, names in os.walk(p) for n in names
                            if n.endswith((".txt", ".md", ".text")))
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise UserError(f"tokenizer training input not found: {p}")
    if not files:
        raise UserError(f"no .txt/.md files found in {list(inputs)}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_read_texts(files), trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos_token, pad_token=eos_token,
                                     bos_token=eos_token, unk_token=None,
                                     additional_special_tokens=[t for t in special_tokens if t != eos_token],
                                     model_max_length=model_max_length)
    hf_tok.chat_template = CHATML_TEMPLATE
    with staged_folder(out_dir, WRITER, "--out", overwrite, overwrite_does=OVERWRITE_DOES) as staging:
        hf_tok.save_pretrained(staging)
    return hf_tok
