"""`StreamingTextDataset`: pretraining samples from MDS shards, as 1-D tensors of token ids.

Shards hold either fixed-length `tokens` chunks (written with `--concat_tokens`) or raw `text`,
which is tokenized on the fly and cut at `max_seq_len`. It is a `StreamingDataset` subclass, so each
rank (and dataloader worker) reads its own part of every epoch, and its `state_dict` /
`load_state_dict` resume an epoch mid-way exactly (Composer checkpoints it).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from streaming import Stream, StreamingDataset

from llmfoundry_lite.data.mds import TOKEN_DTYPES, decode_tokens, streaming_init
from llmfoundry_lite.errors import DataError, UserError


class StreamingTextDataset(StreamingDataset):
    """Token-id rows for causal-LM pretraining.

    Args:
        tokenizer: used only for `text` shards.
        max_seq_len: rows are cut to this many tokens.
        token_encoding_type: dtype of a raw-bytes `tokens` column (llm-foundry's layout): int32 by default.
        streams: `streaming.Stream`s (mixing with proportion/repeat/choose); else `local`/`remote`/`split`.
        **kwargs: the other `StreamingDataset` arguments (shuffle, shuffle_seed, batch_size, ...).
    """

    def __init__(self, tokenizer, max_seq_len: int, token_encoding_type: str = "int32",
                 streams: Optional[Sequence[Stream]] = None, **kwargs: Any):
        if token_encoding_type not in TOKEN_DTYPES:
            raise UserError(f"token_encoding_type {token_encoding_type!r}: expected one of {list(TOKEN_DTYPES)}")
        self.tokenizer = tokenizer
        self.vocab_size = None if tokenizer is None else len(tokenizer)  # ids at or above it: another tokenizer's
        self.max_seq_len = max_seq_len
        self.token_encoding_type = token_encoding_type
        streaming_init(self, streams=streams, **kwargs)

    def __getitem__(self, idx: int) -> torch.Tensor:
        sample = super().__getitem__(idx)
        if "tokens" in sample:
            ids = decode_tokens(sample["tokens"], self.token_encoding_type)[: self.max_seq_len]
            if self.vocab_size is not None and len(ids) and int(ids.max()) >= self.vocab_size:
                raise DataError(f"sample {idx} holds token id {int(ids.max())}, outside the tokenizer's vocabulary of "
                                f"{self.vocab_size}: the shards were written with another tokenizer (or read "
                                "with the wrong token_encoding_type). Use the data's tokenizer or write the data again")
            return torch.from_numpy(ids.astype("int64"))
        if "text" in sample:
            if self.tokenizer is None:
                raise UserError("these shards hold raw `text`; the loader needs a tokenizer to read them")
            ids = self.tokenizer(sample["text"], truncation=True, max_length=self.max_seq_len)["input_ids"]
            return torch.tensor(ids, dtype=torch.long)
        raise DataError(f"MDS sample has columns {sorted(sample)}; a text dataset needs `tokens` or `text`")
