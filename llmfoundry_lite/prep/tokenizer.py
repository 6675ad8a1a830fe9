"""`data-prep train-tokenizer`: train a small byte-level BPE offline, which is how tests, the quickstart
and offline users get a tokenizer, since nothing can be fetched from the hub here. data/tokenizer.py
`build_tokenizer` loads the folder it writes.
"""
from __future__ import annotations

import os
from typing import Iterable, List, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from llmfoundry_lite.data.chat import CHATML_TEMPLATE, IM_END, IM_START
from llmfoundry_lite.errors import UserError
from llmfoundry_lite.files import claim_folder, staged_folder

EOS = "<|endoftext|>"
DEFAULT_SPECIAL_TOKENS = (EOS, IM_START, IM_END)


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
