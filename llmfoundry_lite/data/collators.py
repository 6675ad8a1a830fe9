"""Collators: lists of examples -> a batch dict of tensors.

Every batch has `input_ids` (long), `attention_mask` and `labels` aligned with `input_ids` (the model
shifts them; -100 is ignored). Padding is masked in `attention_mask` and in `labels`, never judged
by token id (the pad token is often EOS, which is a real target).

- `CausalLMCollator`: pretraining rows; labels are the ids. With `eos_token_id` it also emits
  `sequence_id` numbering the documents inside a concatenated row (EOS ends a document), so a model
  with `attn_uses_sequence_id` does not attend across documents.
- `FinetuningCollator`: `{input_ids, labels}` examples, padded to `max_seq_len` or to the longest.
- `PreferenceCollator`: preference pairs (data/preference.py) as `[B, 2, L]` tensors, side 0 the
  chosen sequence and side 1 the rejected one, labels on the replies only; padded as `FinetuningCollator`.
  A pair is one sample, so Composer's microbatching (which splits dim 0) never separates its sides.
- `PackingCollator`: bin-packs `packing_ratio` times more examples than rows into rows of
  `max_seq_len` (first-fit decreasing), with `sequence_id` per example (-1 on padding). Examples that
  do not fit wait for the next batch (up to `max_leftover_bins_to_keep` bins); those dropped beyond
  that are counted in `stats`.
- `PreferencePackingCollator`: the same packer with a pair as the item (its length: both sides
  together). Both sides of a pair go into the same row, one after the other: `input_ids`, `labels`,
  `attention_mask`, `sequence_id` are `[R, max_seq_len]`, sequence_id 2j the chosen side of the row's
  j-th pair and 2j+1 its rejected side (-1, attention_mask 0 and labels -100 on padding), and
  `pair_mask` `[R, P]` (P: the most pairs in a row) says which (row, j) hold a pair. Microbatches split
  rows, so a pair never spans two.

Pairs may carry `reference_logps` ([chosen, rejected] floats): the batch then has them as `[B, 2]`
(`PreferenceCollator`) or `[R, P, 2]`, 0 where `pair_mask` is False (`PreferencePackingCollator`).
"""
from __future__ import annotations

import random
from typing import Dict, List, Optional, Sequence

import torch

from llmfoundry_lite.data.preference import SIDES, pair_length, side_example
from llmfoundry_lite.errors import DataError
from llmfoundry_lite.models.mpt import IGNORE_INDEX


def _pad(rows: Sequence[Sequence[int]], length: int, value: int) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r[:length], dtype=torch.long)
    return out


class CausalLMCollator:
    def __init__(self, pad_token_id: int, max_seq_len: int, eos_token_id: Optional[int] = None):
        self.pad_token_id, self.max_seq_len, self.eos_token_id = pad_token_id, max_seq_len, eos_token_id

    def __call__(self, rows: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        input_ids = _pad(rows, self.max_seq_len, self.pad_token_id)
        attention_mask = _pad([[1] * len(r) for r in rows], self.max_seq_len, 0)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "labels": input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)}
        if self.eos_token_id is not None:
            is_eos = (input_ids == self.eos_token_id) & (attention_mask == 1)
            # a document's EOS belongs to it; the next document starts after it
            starts = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
            batch["sequence_id"] = starts.masked_fill(attention_mask == 0, -1)
        return batch


class FinetuningCollator:
    def __init__(self, pad_token_id: int, max_seq_len: int, pad_to_longest: bool = False):
        self.pad_token_id, self.max_seq_len, self.pad_to_longest = pad_token_id, max_seq_len, pad_to_longest

    def __call__(self, examples: List[Dict[str, List[int]]]) -> Dict[str, torch.Tensor]:
        ids = [e["input_ids"] for e in examples]
        length = min(self.max_seq_len, max(map(len, ids))) if self.pad_to_longest else self.max_seq_len
        return {"input_ids": _pad(ids, length, self.pad_token_id),
                "attention_mask": _pad([[1] * len(r) for r in ids], length, 0),
                "labels": _pad([e["labels"] for e in examples], length, IGNORE_INDEX)}


class PreferenceCollator:
    def __init__(self, pad_token_id: int, max_seq_len: int, pad_to_longest: bool = False):
        self.rows = FinetuningCollator(pad_token_id, max_seq_len, pad_to_longest)

    def __call__(self, pairs: List[Dict[str, List[int]]]) -> Dict[str, torch.Tensor]:
        batch = self.rows([side_example(p, side) for side in SIDES for p in pairs])  # chosen rows, then rejected
        batch = {k: v.view(2, len(pairs), -1).transpose(0, 1).contiguous() for k, v in batch.items()}
        return {**batch, **{k: v[:, 0] for k, v in _pair_fields([[p] for p in pairs]).items()}}


# per-pair float fields a batch carries when the pairs have them: [chosen, rejected] each
PAIR_FIELDS = ("reference_logps",)


def _pair_fields(rows: List[List[Dict]]) -> Dict[str, torch.Tensor]:
    """Each of PAIR_FIELDS that the pairs have, `[len(rows), P, 2]` for rows of pairs (0 where a row
    has no j-th pair)."""
    out = {}
    for key in PAIR_FIELDS:
        if rows and rows[0] and key in rows[0][0]:
            out[key] = torch.zeros(len(rows), max(map(len, rows)), 2)
            for r, row in enumerate(rows):
                out[key][r, : len(row)] = torch.tensor([p[key] for p in row], dtype=torch.float32)
    return out


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """Bins of example indices whose lengths sum to at most `capacity`, longest examples first."""
    bins: List[List[int]] = []
    room: List[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


class PackingCollator:
    """Packs examples (`{input_ids, labels}`, cut to `max_seq_len`) into `rows` rows; see the module
    docstring. A subclass packs other items by overriding `item`, `length` and `sequences`."""
    unit = "examples"  # what an item is, in `stats`

    def __init__(self, pad_token_id: int, max_seq_len: int, rows: int,
                 max_leftover_bins_to_keep: Optional[int] = None):
        self.pad_token_id, self.max_seq_len, self.rows = pad_token_id, max_seq_len, rows
        self.max_leftover_bins_to_keep = max_leftover_bins_to_keep
        self.leftover: List[Dict] = []
        self.stats = {self.unit: 0, f"dropped leftover {self.unit}": 0, "padding tokens": 0, "tokens": 0}

    def item(self, example: Dict) -> Dict:
        """What is packed for one example."""
        return {k: list(example[k][: self.max_seq_len]) for k in ("input_ids", "labels")}

    def length(self, item: Dict) -> int:
        """The tokens `item` takes in a row (at most `max_seq_len`)."""
        return len(item["input_ids"])

    def sequences(self, item: Dict) -> List[Dict[str, List[int]]]:
        """The `{input_ids, labels}` sequences `item` puts in a row, in order, each its own sequence_id."""
        return [item]

    def pack(self, examples: List[Dict]) -> List[List[Dict]]:
        """The `rows` fullest bins of the leftovers + `examples`; the other bins become the leftovers."""
        pool = self.leftover + [self.item(e) for e in examples]
        self.stats[self.unit] += len(examples)
        lengths = [self.length(e) for e in pool]
        bins = first_fit_decreasing(lengths, self.max_seq_len)
        bins.sort(key=lambda b: -sum(lengths[i] for i in b))
        keep, rest = bins[: self.rows], bins[self.rows:]
        kept = rest[: self.max_leftover_bins_to_keep]  # None: keep them all
        self.stats[f"dropped leftover {self.unit}"] += sum(map(len, rest[len(kept):]))
        self.leftover = [pool[i] for b in kept for i in b]
        return [[pool[i] for i in b] for b in keep]

    def __call__(self, examples: List[Dict]) -> Dict[str, torch.Tensor]:
        return self.collate(self.pack(examples))

    def collate(self, rows: List[List[Dict]]) -> Dict[str, torch.Tensor]:
        """The batch of packed rows of items."""
        rows_seqs = [[s for e in row for s in self.sequences(e)] for row in rows]
        ids = [[t for s in row for t in s["input_ids"]] for row in rows_seqs]
        labels = [[t for s in row for t in s["labels"]] for row in rows_seqs]
        seq = [[n for n, s in enumerate(row) for _ in s["input_ids"]] for row in rows_seqs]
        n = self.max_seq_len
        used = sum(map(len, ids))
        self.stats["tokens"] += used
        self.stats["padding tokens"] += len(rows) * n - used
        return {"input_ids": _pad(ids, n, self.pad_token_id), "attention_mask": _pad([[1] * len(r) for r in ids], n, 0),
                "labels": _pad(labels, n, IGNORE_INDEX), "sequence_id": _pad(seq, n, -1)}


class PreferencePackingCollator(PackingCollator):
    """Packs preference pairs, both sides of a pair in one row (see the module docstring). A pair must
    fit a row whole (PreferenceDataset with `packed=True` cuts prompts so that it does)."""
    unit = "pairs"

    def item(self, pair: Dict) -> Dict:
        if pair_length(pair) > self.max_seq_len:
            raise DataError(f"a preference pair of {pair_length(pair)} tokens (both sides) does not fit a packed "
                            f"row of max_seq_len {self.max_seq_len}; pairs to pack need their prompts cut so that "
                            "both sides fit one row (for MDS pairs: data-prep preference --packed)")
        return pair

    def length(self, pair: Dict) -> int:
        return pair_length(pair)

    def sequences(self, pair: Dict) -> List[Dict[str, List[int]]]:
        return [side_example(pair, side) for side in SIDES]

    def collate(self, rows: List[List[Dict]]) -> Dict[str, torch.Tensor]:
        batch = super().collate(rows)
        batch["pair_mask"] = torch.zeros(len(rows), max(map(len, rows), default=0), dtype=torch.bool)
        for r, row in enumerate(rows):
            batch["pair_mask"][r, : len(row)] = True
        return {**batch, **_pair_fields(rows)}


def auto_packing_ratio(lengths: Sequence[int], max_seq_len: int, rows: int, seed: int = 0) -> float:
    """The largest packing ratio (step 0.25) whose simulated packing of `lengths` does not let
    leftovers pile up (they stay under one batch of examples), i.e. that drops nothing."""
    order = [min(n, max_seq_len) for n in lengths]
    random.Random(seed).shuffle(order)
    fake = [{"input_ids": [0] * n, "labels": [0] * n} for n in order[:4096]]  # enough to see leftovers pile up
    best, ratio = 1.0, 1.0
    upper = max(1.0, max_seq_len / max(1, min(lengths)))
    while ratio <= upper:
        per_batch = max(rows, int(rows * ratio))
        collator = PackingCollator(0, max_seq_len, rows)
        for i in range(0, len(fake), per_batch):
            collator.pack(fake[i:i + per_batch])
        if len(collator.leftover) > per_batch:
            break  # higher ratios pile up even more
        best = ratio
        ratio += 0.25
    return best
