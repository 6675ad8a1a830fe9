"""Finetuning examples: formats, preprocessors, chat templates, label masks, datasets.

An example is either prompt/response (`{"prompt": ..., "response": ...}`) or chat
(`{"messages": [{"role": ..., "content": ...}, ...]}`); a preprocessor (a registered name such as
`dolly` or `alpaca`, or `module:function`) maps other layouts to one of these. Every example becomes
a list of turns `(prompt, response)`; a chat is rendered with the tokenizer's chat template (ChatML
when it has none, or `chat_template: mpt-7b-chat`, or a Jinja string: data/chat.py `ChatTemplate`) and
cut at the start of each assistant reply.

Labels are -100 except the targets: `target_responses` `last` (default) or `all`;
`target_prompts` `none` (default), `all` or `length>=N` (a prompt of at least N tokens is a target).
EOS closes the last response. An example longer than `max_seq_len` is cut on the right (as
llm-foundry's collator does); one left without any target token is dropped. Both are counted in
`stats`, and so are examples with an empty prompt or response.
"""
from __future__ import annotations

import importlib
import logging
import os
import re
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from streaming import StreamingDataset

from llmfoundry_lite.data.chat import ChatTemplate, check_messages
from llmfoundry_lite.data.mds import streaming_init
from llmfoundry_lite.data.sources import Counts, load_hf_dataset
from llmfoundry_lite.errors import DataError, UserError
from llmfoundry_lite.models.mpt import IGNORE_INDEX as IGNORE
from llmfoundry_lite.registry import preprocessors

log = logging.getLogger(__name__)
Turn = Tuple[str, str]
COUNTED = ("truncated", "dropped empty", "dropped without targets")  # build_example's statuses besides ok


# ---- preprocessors -----------------------------------------------------------------------------

@preprocessors.register("dolly")
def dolly(ex: Dict) -> Dict:
    """databricks-dolly-15k: instruction, context, response."""
    context = f"\n{ex['context']}" if ex.get("context") else ""
    return {"prompt": f"### Instruction:\n{ex['instruction']}{context}\n### Response:\n", "response": ex["response"]}


@preprocessors.register("alpaca")
def alpaca(ex: Dict) -> Dict:
    """tatsu-lab/alpaca: instruction, input, output."""
    extra = f"\n### Input:\n{ex['input']}" if ex.get("input") else ""
    return {"prompt": f"### Instruction:\n{ex['instruction']}{extra}\n### Response:\n", "response": ex["output"]}


@preprocessors.register("hh_rlhf")
def hh_rlhf(ex: Dict) -> Dict:
    """Anthropic/hh-rlhf: `chosen` and `rejected` conversations as text ("\n\nHuman: ...\n\nAssistant:
    ..."), identical up to the last "\n\nAssistant:" -> a preference pair: that shared prompt (ending with
    it) and the two replies after it."""
    chosen, rejected = ex["chosen"], ex["rejected"]
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise DataError(f"hh_rlhf: chosen and rejected must be strings, got {type(chosen).__name__} and "
                        f"{type(rejected).__name__}")
    end = chosen.rfind(HH_ASSISTANT)
    if end < 0:
        raise DataError(f"hh_rlhf: chosen has no {HH_ASSISTANT!r} turn: {chosen[:80]!r}")
    prompt = chosen[: end + len(HH_ASSISTANT)]
    if not rejected.startswith(prompt):
        raise DataError(f"hh_rlhf: rejected does not share chosen's conversation up to its last {HH_ASSISTANT!r}")
    return {"prompt": prompt, "chosen": chosen[len(prompt):], "rejected": rejected[len(prompt):]}


HH_ASSISTANT = "\n\nAssistant:"


def get_preprocessor(name: Optional[str]) -> Optional[Callable[[Dict], Dict]]:
    """A registered preprocessor, or `module:function`, or None."""
    if not name:
        return None
    if ":" in name:
        module, _, fn = name.partition(":")
        try:
            return getattr(importlib.import_module(module), fn)
        except (ImportError, AttributeError) as e:
            raise UserError(f"preprocessing_fn '{name}': cannot import it ({e})") from None
    return preprocessors.get(name, "preprocessing_fn")


# ---- turns -------------------------------------------------------------------------------------

def to_turns(example: Dict, tokenizer=None, chat_template: Union[None, str, ChatTemplate] = None) -> List[Turn]:
    """(prompt, response) text pairs of a prompt/response or chat example (a chat rendered by
    `ChatTemplate.resolve(chat_template, tokenizer)`)."""
    if not isinstance(example, dict):
        raise DataError(f"an example is a JSON object (prompt/response or messages), got a {type(example).__name__}")
    # `datasets` gives every row of a mixed file every column, the missing ones as None
    example = {k: v for k, v in example.items() if v is not None}
    if "messages" in example:
        check_messages(example["messages"])
        return _chat_turns(example["messages"], tokenizer, chat_template)
    if "prompt" in example and "response" in example:
        p, r = example["prompt"], example["response"]
        if not isinstance(p, str) or not isinstance(r, str):
            raise DataError(f"prompt and response must be strings, got {type(p).__name__} and {type(r).__name__}")
        return [(p, r)]
    raise DataError(f"example has keys {sorted(example)}; expected prompt/response or messages "
                    "(set preprocessing_fn to map other layouts, e.g. dolly or alpaca)")


def _chat_turns(messages: Sequence[Dict], tokenizer, chat_template: Union[None, str, ChatTemplate]) -> List[Turn]:
    template = ChatTemplate.resolve(chat_template, tokenizer)
    turns, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        with_prompt, full = template.render(messages[:i], True), template.render(messages[: i + 1])
        if not (with_prompt.startswith(done) and full.startswith(with_prompt)):
            raise UserError(f"{template.source} does not render a conversation as a prefix of its continuation, "
                            f"so replies cannot be cut out of it; {template.fix}")
        turns.append((with_prompt[len(done):], full[len(with_prompt):]))
        done = full
    return turns


def numbered(examples: Iterable[Dict]) -> Iterator[Tuple[str, Dict]]:
    """("example i", example) pairs: how errors name examples that have no file and line."""
    return ((f"example {i}", ex) for i, ex in enumerate(examples))


def example_turns(where: str, raw: Dict, pre: Optional[Callable], tokenizer=None,
                  chat_template: Union[None, str, ChatTemplate] = None, parse: Callable = to_turns):
    """`parse` (`to_turns`, or data/preference.py's `pair_turns`) of a raw example after its preprocessor;
    errors start with `where`."""
    try:
        return parse(pre(raw) if pre else raw, tokenizer, chat_template)
    except KeyError as e:
        raise DataError(f"{where}: missing field {e}; choose the right preprocessor "
                        "(preprocessing_fn, or --preprocessor)") from None
    except DataError as e:
        raise DataError(f"{where}: {e}") from None


def tokenize_turns(turns: Sequence[Turn], tokenizer) -> List[Tuple[List[int], List[int]]]:
    """Token ids per turn; EOS closes the last response (unless it already ends with it)."""
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]
    out = [(enc(p), enc(r)) for p, r in turns]
    if out and (not out[-1][1] or out[-1][1][-1] != tokenizer.eos_token_id):
        out[-1] = (out[-1][0], out[-1][1] + [tokenizer.eos_token_id])
    return out


def parse_target_prompts(value: str) -> Optional[int]:
    """`none` -> None (never), `all` -> 0, `length>=N` -> N: the prompt length from which it is a target."""
    if value == "none":
        return None
    if value == "all":
        return 0
    m = re.fullmatch(r"length>=(\d+)", str(value))
    if not m:
        raise UserError(f"target_prompts {value!r}: expected none, all or length>=N")
    return int(m.group(1))


def build_example(tok_turns, max_seq_len: int, target_prompts: str = "none",
                  target_responses: str = "last") -> Tuple[Optional[Dict[str, List[int]]], str]:
    """(example, status): status is ok or one of COUNTED, the stats key it is counted under (example None
    when dropped)."""
    if target_responses not in ("last", "all"):
        raise UserError(f"target_responses {target_responses!r}: expected last or all")
    min_prompt = parse_target_prompts(target_prompts)
    if not tok_turns or any(not p or not r for p, r in tok_turns):
        return None, "dropped empty"
    ids: List[int] = []
    labels: List[int] = []
    for k, (p, r) in enumerate(tok_turns):
        prompt_target = min_prompt is not None and len(p) >= min_prompt
        response_target = target_responses == "all" or k == len(tok_turns) - 1
        ids += p + r
        labels += (p if prompt_target else [IGNORE] * len(p)) + (r if response_target else [IGNORE] * len(r))
    status = "ok"
    if len(ids) > max_seq_len:
        ids, labels, status = ids[:max_seq_len], labels[:max_seq_len], "truncated"
    if all(t == IGNORE for t in labels):
        return None, "dropped without targets"
    return {"input_ids": ids, "labels": labels}, status


# ---- datasets ----------------------------------------------------------------------------------

def load_raw_examples(hf_name: str, split: str, hf_kwargs: Optional[Dict] = None):
    """A `datasets.Dataset` from a local .json/.jsonl/.csv/.parquet file or folder, or a hub name."""
    builders = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
    ext = os.path.splitext(hf_name)[1]
    if os.path.isfile(hf_name) and ext in builders:
        return load_hf_dataset(builders[ext], split, data_files={split: hf_name}, **(hf_kwargs or {}))
    return load_hf_dataset(hf_name, split, **(hf_kwargs or {}))


class FinetuningDataset(list):
    """Map-style dataset: the `{input_ids, labels}` examples, built eagerly from raw examples, and their `stats`."""

    def __init__(self, examples, tokenizer, max_seq_len: int, preprocessing_fn: Optional[str] = None,
                 target_prompts: str = "none", target_responses: str = "last", chat_template: Optional[str] = None):
        pre = get_preprocessor(preprocessing_fn)
        template = ChatTemplate.resolve(chat_template, tokenizer, "dataset.chat_template").check()
        self.stats = Counts(dict.fromkeys(("examples", *COUNTED), 0))
        for where, raw in numbered(examples):
            self.stats["examples"] += 1
            turns = example_turns(where, raw, pre, tokenizer, template)
            ex, status = build_example(tokenize_turns(turns, tokenizer), max_seq_len, target_prompts, target_responses)
            if status != "ok":
                self.stats[status] += 1
            if ex is not None:
                self.append(ex)
        if not self:
            raise DataError(f"no usable finetuning examples ({self.stats})")
        log.warning("finetuning data: %s", self.stats)


def streaming_finetuning_dataset(tokenizer, max_seq_len: int, target_prompts: str, target_responses: str,
                                 chat_template: Optional[str] = None, **streaming_kwargs: Any):
    """A `StreamingDataset` over MDS written by `data-prep finetuning` (prep/finetuning.py: `turns` tokenized,
    or text)."""

    class StreamingFinetuningDataset(StreamingDataset):
        def __init__(self):
            streaming_init(self, **streaming_kwargs)

        def __getitem__(self, idx):
            sample = super().__getitem__(idx)
            if "tokenized_turns" in sample:
                tok_turns = sample["tokenized_turns"]
            elif "turns" in sample:
                tok_turns = tokenize_turns(sample["turns"], tokenizer)
            else:
                raise DataError(f"MDS finetuning sample has columns {sorted(sample)}; expected turns or tokenized_turns")
            ex, _ = build_example(tok_turns, max_seq_len, target_prompts, target_responses)
            if ex is None:  # the converter drops these; keep the sample count stable with nothing to learn
                ids = [t for p, r in tok_turns for t in p + r][:max_seq_len]
                ex = {"input_ids": ids, "labels": [IGNORE] * len(ids)}
            return ex

    return StreamingFinetuningDataset()
