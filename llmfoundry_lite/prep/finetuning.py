"""`data-prep finetuning`: finetuning examples -> MDS shards, for the `finetuning` loader's MDS datasets
(data/finetuning.py `streaming_finetuning_dataset` reads them back)."""
from __future__ import annotations

import os
from typing import Dict, Iterable, Optional, Tuple

from streaming import MDSWriter
from tqdm import tqdm

from llmfoundry_lite.data.chat import ChatTemplate
from llmfoundry_lite.data.finetuning import COUNTED, build_example, example_turns, get_preprocessor, tokenize_turns
from llmfoundry_lite.data.mds import SHARD_HASHES, publish_split
from llmfoundry_lite.data.sources import Counts
from llmfoundry_lite.errors import DataError


def convert_finetuning(examples: Iterable[Tuple[str, Dict]], out_dir: str, tokenizer=None, max_seq_len: Optional[int] = None,
                       preprocessing_fn: Optional[str] = None, target_prompts: str = "none",
                       target_responses: str = "last", chat_template: Optional[str] = None,
                       compression: Optional[str] = None, skip_bad_examples: bool = False) -> Dict[str, int]:
    """Write finetuning examples, `(where, example)` pairs (`where` names it in errors: a file:line, or
    see `numbered`), as MDS: `turns` text pairs, or `tokenized_turns` when a tokenizer is given (then
    over-long and target-less examples are filtered here, under `max_seq_len`). An invalid example is an
    error, or skipped and counted with `skip_bad_examples`. The split appears only when all succeeded; a
    chat template (`--chat_template`, or the tokenizer's) that Jinja or its sandbox refuses stops it first."""
    pre = get_preprocessor(preprocessing_fn)
    template = ChatTemplate.resolve(chat_template, tokenizer, "--chat_template").check()
    stats = Counts(dict.fromkeys(("examples", "written", *COUNTED), 0))
    column = "tokenized_turns" if tokenizer is not None else "turns"
    with publish_split(out_dir) as tmp, \
            MDSWriter(out=tmp, columns={column: "json"}, compression=compression, hashes=SHARD_HASHES) as writer:
        for where, raw in tqdm(examples, desc=os.path.basename(out_dir), unit=" ex"):
            stats["examples"] += 1
            try:
                turns = example_turns(where, raw, pre, tokenizer, template)
            except DataError:
                if not skip_bad_examples:
                    raise
                stats.add("skipped invalid")
                continue
            if tokenizer is None:
                if any(not p or not r for p, r in turns):
                    stats["dropped empty"] += 1
                    continue
                writer.write({"turns": [list(t) for t in turns]})
            else:
                tok_turns = tokenize_turns(turns, tokenizer)
                ex, status = build_example(tok_turns, max_seq_len or 10**9, target_prompts, target_responses)
                if status != "ok":
                    stats[status] += 1
                if ex is None:
                    continue
                writer.write({"tokenized_turns": [[p, r] for p, r in tok_turns]})
            stats["written"] += 1
        if stats["examples"] == 0:
            raise DataError(f"no examples to convert for {out_dir}: the input is empty")
        if stats["written"] == 0:
            raise DataError(f"no usable examples for {out_dir}: {stats}")
    return stats
