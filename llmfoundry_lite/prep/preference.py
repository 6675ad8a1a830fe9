"""`data-prep preference`: preference pairs -> tokenized MDS shards for DPO (data/preference.py reads them
back), optionally with a reference model's log-probabilities of each reply (`score_pairs`), so that
DPO trains without a reference model."""
from __future__ import annotations

import os
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
from streaming import MDSWriter
from tqdm import tqdm

from llmfoundry_lite.data.chat import ChatTemplate
from llmfoundry_lite.data.collators import PreferenceCollator
from llmfoundry_lite.data.mds import SHARD_HASHES, publish_split
from llmfoundry_lite.data.preference import SIDES, iter_pairs, sequence_logps
from llmfoundry_lite.data.sources import Counts
from llmfoundry_lite.errors import DataError


@torch.no_grad()
def score_pairs(model, pairs: List[Dict[str, List[int]]], pad_token_id: int) -> torch.Tensor:
    """[len(pairs), 2]: the model's log-probabilities of each pair's chosen and rejected reply, in eval mode."""
    batch = PreferenceCollator(pad_token_id, max(len(p["prompt"]) + len(p[s]) for p in pairs for s in SIDES),
                               pad_to_longest=True)(pairs)
    device = next(model.parameters()).device
    ids, mask, labels = (batch[k].flatten(0, 1).to(device) for k in ("input_ids", "attention_mask", "labels"))
    training = model.training
    logits = model.eval()(input_ids=ids, attention_mask=mask).logits
    model.train(training)
    return sequence_logps(logits, labels).view(len(pairs), 2).cpu()


def convert_preference(examples: Iterable[Tuple[str, Dict]], out_dir: str, tokenizer, max_seq_len: int,
                       preprocessing_fn: Optional[str] = None, chat_template: Optional[str] = None,
                       compression: Optional[str] = None, skip_bad_examples: bool = False,
                       reference_model=None, batch_size: int = 8, packed: bool = False) -> Counts:
    """Write the pairs of raw `(where, example)` rows as MDS (see the module docstring), with the
    reference model's log-probabilities when `reference_model` is given; returns what was read, written
    and dropped (`packed`: prompts cut so that both sides fit one row). The split appears only when all
    succeeded; a chat template (`--chat_template`, or the tokenizer's) that Jinja or its sandbox refuses
    stops it first."""
    template = ChatTemplate.resolve(chat_template, tokenizer, "--chat_template").check()
    stats = Counts()
    columns = {side: "ndarray:int32" for side in ("prompt", *SIDES)}
    if reference_model is not None:
        columns["reference_logps"] = "ndarray:float32"
    pairs = iter_pairs(examples, tokenizer, max_seq_len, stats, preprocessing_fn, template, skip_bad_examples, packed)
    with publish_split(out_dir) as tmp, \
            MDSWriter(out=tmp, columns=columns, compression=compression, hashes=SHARD_HASHES) as writer:
        batch: List[Dict[str, List[int]]] = []
        for pair in tqdm(pairs, desc=os.path.basename(out_dir), unit=" pairs"):
            batch.append(pair)
            if len(batch) == batch_size:
                _write_pairs(writer, batch, reference_model, tokenizer.pad_token_id)
                stats.add("written", len(batch))
                batch = []
        if batch:
            _write_pairs(writer, batch, reference_model, tokenizer.pad_token_id)
            stats.add("written", len(batch))
        if not stats.get("pairs"):
            raise DataError(f"no preference pairs read for {out_dir}: the input is empty (or every line was skipped)")
        if not stats.get("written"):
            raise DataError(f"no usable preference pairs for {out_dir}: {stats}")
    return stats


def _write_pairs(writer, pairs, reference_model, pad_token_id: int) -> None:
    logps = score_pairs(reference_model, pairs, pad_token_id) if reference_model is not None else None
    for i, pair in enumerate(pairs):
        sample = {k: np.asarray(v, dtype=np.int32) for k, v in pair.items()}
        if logps is not None:
            sample["reference_logps"] = logps[i].numpy().astype(np.float32)
        writer.write(sample)
