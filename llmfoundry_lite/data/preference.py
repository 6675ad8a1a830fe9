"""Preference pairs (for DPO): formats, tokenized pairs, the map-style dataset.

A pair is `{"prompt": str, "chosen": str, "rejected": str}`, or chat form: `chosen` and `rejected`
message lists (see data/chat.py) that share every message but the last, the assistant reply compared
(an optional `prompt` message list is put in front of both). A preprocessor (`preprocessing_fn`:
`hh_rlhf`, or `module:function`) maps other layouts to one of these. Each side is read as a
finetuning example is (data/finetuning.py: chat rendered by the chat template, ChatML by default; EOS
closes the reply), and its labels are the last reply's tokens only.

A pair longer than `max_seq_len` keeps the end of its prompt (cut from the left) so that the longer
reply fits whole; a pair to be packed (`packed`: both sides in one row of `max_seq_len`, see
data/collators.py) so that both sides fit together (`pair_length`). Pairs that cannot (not one prompt
token left), pairs whose replies are equal and pairs with an empty prompt or reply are dropped; each
is counted in `stats`, and so are truncations.

`data-prep preference` (prep/preference.py `convert_preference`) writes the tokenized pairs as MDS:
columns `prompt`, `chosen`, `rejected` (int32 ids), and, with `--reference_model`, `reference_logps`
(float32 `[chosen, rejected]`: the reference model's log-probabilities of the two replies, `score_pairs`),
so that DPO needs no reference model in training. `streaming_preference_dataset` reads them back.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from streaming import StreamingDataset

from llmfoundry_lite.data.chat import ChatTemplate
from llmfoundry_lite.data.finetuning import Turn, example_turns, get_preprocessor, numbered, to_turns, tokenize_turns
from llmfoundry_lite.data.mds import streaming_init
from llmfoundry_lite.data.sources import Counts
from llmfoundry_lite.errors import DataError
from llmfoundry_lite.models.mpt import IGNORE_INDEX

log = logging.getLogger(__name__)
SIDES = ("chosen", "rejected")
COUNTED = ("prompt truncated", "dropped too long", "dropped chosen equals rejected", "dropped empty")


def pair_turns(example: Dict, tokenizer=None, chat_template: Union[None, str, ChatTemplate] = None
               ) -> Tuple[List[Turn], List[Turn]]:
    """The (prompt, response) turns of the chosen and of the rejected side of a pair."""
    if not isinstance(example, dict):
        raise DataError(f"a preference pair is a JSON object (prompt, chosen, rejected), got a {type(example).__name__}")
    example = {k: v for k, v in example.items() if v is not None}  # `datasets` fills missing columns with None
    if not all(s in example for s in SIDES):
        raise DataError(f"pair has keys {sorted(example)}; expected prompt, chosen and rejected (strings), or chosen "
                        "and rejected message lists (set preprocessing_fn to map other layouts, e.g. hh_rlhf)")
    chosen, rejected, prompt = example["chosen"], example["rejected"], example.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if not isinstance(prompt, str):
            raise DataError(f"chosen and rejected are strings, so prompt must be one too, got {type(prompt).__name__}")
        return tuple(to_turns({"prompt": prompt, "response": r}, tokenizer, chat_template) for r in (chosen, rejected))
    if not isinstance(chosen, list) or not isinstance(rejected, list):
        raise DataError(f"chosen and rejected must both be strings or both message lists, got "
                        f"{type(chosen).__name__} and {type(rejected).__name__}")
    if prompt is not None and not isinstance(prompt, list):
        raise DataError(f"with chosen and rejected as message lists, prompt is a message list too (or absent), "
                        f"got a {type(prompt).__name__}")
    prompt = prompt or []
    if prompt + chosen[:-1] != prompt + rejected[:-1] or not chosen or not rejected:
        raise DataError("chosen and rejected must share every message but the last (the assistant reply compared)")
    sides = []
    for name, messages in zip(SIDES, (prompt + chosen, prompt + rejected), strict=True):
        try:
            sides.append(to_turns({"messages": messages}, tokenizer, chat_template))
        except DataError as e:
            raise DataError(f"{name}: {e}") from None
    return tuple(sides)


def build_pair(turns: Tuple[List[Turn], List[Turn]], tokenizer, max_seq_len: int, packed: bool = False
               ) -> Tuple[Optional[Dict[str, List[int]]], str]:
    """(pair, status): pair is `{prompt, chosen, rejected}` token ids (the replies closed by EOS), status
    ok or one of COUNTED (pair None when dropped). `packed`: fit both sides into `max_seq_len` together."""
    (*_, (_, chosen_text)), (*_, (_, rejected_text)) = turns
    if chosen_text == rejected_text:
        return None, "dropped chosen equals rejected"
    if any(not p or not r for side in turns for p, r in side):
        return None, "dropped empty"
    prompts, replies = [], []
    for side in turns:
        tok = tokenize_turns(side, tokenizer)
        prompts.append([t for p, r in tok[:-1] for t in p + r] + tok[-1][0])
        replies.append(tok[-1][1])
    if prompts[0] != prompts[1]:
        raise DataError("chosen and rejected tokenize to different prompts; the chat template must render the "
                        "shared messages the same way on both sides")
    return fit_pair({"prompt": prompts[0], "chosen": replies[0], "rejected": replies[1]}, max_seq_len, packed)


def fit_pair(pair: Dict[str, Any], max_seq_len: int, packed: bool = False) -> Tuple[Optional[Dict[str, Any]], str]:
    """(pair, status) with the prompt cut from the left so that the longer reply fits whole in max_seq_len,
    or (`packed`) both sides fit one row together."""
    # the prompt comes once per side: packed, both sides share the row
    replies = [len(pair[s]) for s in SIDES]
    room = (max_seq_len - sum(replies)) // 2 if packed else max_seq_len - max(replies)
    if room < 1:
        return None, "dropped too long"
    if len(pair["prompt"]) > room:
        return {**pair, "prompt": pair["prompt"][-room:]}, "prompt truncated"
    return pair, "ok"


def iter_pairs(examples: Iterable[Tuple[str, Dict]], tokenizer, max_seq_len: int, stats: Counts,
               preprocessing_fn: Optional[str] = None, chat_template: Union[None, str, ChatTemplate] = None,
               skip_bad_examples: bool = False, packed: bool = False) -> Iterator[Dict[str, List[int]]]:
    """The tokenized pairs of raw `(where, example)` rows (see `build_pair`), counting in `stats` what is
    read, cut or dropped (an invalid row is a DataError naming it, or skipped and counted with
    `skip_bad_examples`)."""
    pre = get_preprocessor(preprocessing_fn)
    for key in ("pairs", *COUNTED):
        stats.setdefault(key, 0)
    for where, raw in examples:
        stats["pairs"] += 1
        try:
            turns = example_turns(where, raw, pre, tokenizer, chat_template, parse=pair_turns)
            try:
                pair, status = build_pair(turns, tokenizer, max_seq_len, packed)
            except DataError as e:
                raise DataError(f"{where}: {e}") from None
        except DataError:
            if not skip_bad_examples:
                raise
            stats.add("skipped invalid")
            continue
        if status != "ok":
            stats[status] += 1
        if pair is not None:
            yield pair


def pair_length(pair: Dict[str, List[int]]) -> int:
    """The tokens of both sides of a pair, what it takes in a packed row."""
    return 2 * len(pair["prompt"]) + len(pair["chosen"]) + len(pair["rejected"])


def side_example(pair: Dict[str, List[int]], side: str) -> Dict[str, List[int]]:
    """One side of a pair as a finetuning example: labels on the reply only."""
    return {"input_ids": pair["prompt"] + pair[side], "labels": [IGNORE_INDEX] * len(pair["prompt"]) + pair[side]}


class PreferenceDataset(list):
    """Map-style dataset of tokenized pairs (see `build_pair`), built eagerly from raw rows, and `stats`."""
    reference_logps = False  # pairs carry no precomputed reference log-probabilities

    def __init__(self, examples, tokenizer, max_seq_len: int, preprocessing_fn: Optional[str] = None,
                 chat_template: Optional[str] = None, packed: bool = False):
        self.stats = Counts()
        template = ChatTemplate.resolve(chat_template, tokenizer, "dataset.chat_template").check()
        self.extend(iter_pairs(numbered(examples), tokenizer, max_seq_len, self.stats, preprocessing_fn, template,
                               packed=packed))
        if not self:
            raise DataError(f"no usable preference pairs ({self.stats})")
        log.warning("preference data: %s", self.stats)


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[N, L]: log p(label at t+1 | tokens up to t) at position t, 0 where that label is -100 (labels are
    aligned with the input ids)."""
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return -nll.view(targets.shape)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the sum of the labelled positions' log-probs (`token_logps`)."""
    return token_logps(logits, labels).sum(-1)


def streaming_preference_dataset(max_seq_len: int, packed: bool = False, **streaming_kwargs: Any):
    """A `StreamingDataset` over MDS written by `data-prep preference`. Its `reference_logps` says whether
    the shards carry the reference model's log-probabilities (all of them must, or none)."""

    class StreamingPreferenceDataset(StreamingDataset):
        def __init__(self):
            streaming_init(self, **streaming_kwargs)
            kinds = {"reference_logps" in shard.column_names for shard in self.shards}
            if len(kinds) > 1:
                raise DataError("some preference shards carry reference_logps and others do not: prepare every "
                                "stream with the same data-prep preference --reference_model (or none)")
            self.reference_logps = kinds.pop()
            missing = {"prompt", *SIDES} - set(self.shards[0].column_names)
            if missing:
                raise DataError(f"MDS shards of {self.shards[0].dirname} lack the columns {sorted(missing)} of "
                                "preference pairs; write them with `llmfoundry-lite data-prep preference`")

        def __getitem__(self, idx):
            sample = super().__getitem__(idx)
            pair = {k: sample[k].tolist() for k in ("prompt", *SIDES)}
            fitted, status = fit_pair(pair, max_seq_len, packed)
            # a pair prepared for a longer max_seq_len: a reply that no longer fits, or stored
            # log-probabilities of a prompt the loader would cut
            if fitted is None or (self.reference_logps and status != "ok"):
                raise DataError(f"a preference pair of {len(pair['prompt'])} prompt and "
                                f"{'+'.join(str(len(pair[s])) for s in SIDES)} reply tokens does not fit the loader's "
                                f"max_seq_len {max_seq_len}{' packed' * packed}"
                                f"{' whole, as its reference_logps need' * self.reference_logps}: prepare the data "
                                f"with data-prep preference --max_seq_len {max_seq_len}{' --packed' * packed} (or "
                                "raise the loader's max_seq_len)")
            if self.reference_logps:
                fitted["reference_logps"] = sample["reference_logps"].tolist()
            return fitted

    return StreamingPreferenceDataset()

