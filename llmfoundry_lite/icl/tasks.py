"""In-context-learning (ICL) tasks: llm-foundry's task configs and JSONL formats, few-shot prompts,
batches, and how an example is judged from logits or generated text. Pure torch and data: evaluation
(`eval/icl.py`) and training (`training/icl_evaluators.py`) run a model over these batches and judge with
these functions, so both report the same numbers, and every rule is testable with a stub model.

Task types live in the `icl_tasks` registry, keyed by `icl_task_type`; a plug-in adds one by
registering a subclass of `ICLTaskType`. The shipped types and the JSON fields of one example:

  language_modeling             {context, continuation}: correct when greedy decoding reproduces the
                                continuation token for token
  multiple_choice               {query, choices, gold}: correct when the gold choice has the lowest mean
                                per-token loss (length-normalised)
  schema                        {context_options, continuation, gold}: Winograd-style, correct when the
                                gold context gives the continuation the lowest mean per-token loss
  generation_task_with_answers  {context, answer, aliases?, chain_of_thought?}: judged as llm-foundry's
  (also question_answering)     InContextLearningGenerationExactMatchAccuracy: the greedy generation, cut
                                at the first `early_stopping_criteria` match and after the last
                                `cot_delimiter`, starts with the answer or an alias (both normalised
                                unless do_normalization: false, then only stripped)

`code_evaluation` (running model-written code) is refused: it needs a sandbox. With `has_categories`
every example has a `category`; each category is its own task (shots drawn within it), reported as
`<label>/<k>-shot/<category>`, and `<label>/<k>-shot` is the mean over categories (llm-foundry's
results table and gauntlet average them so).

The prompt of one example with k shots (a shot is a solved example of the same file, never the
example itself, drawn with a `random.Random` seeded by (fewshot_random_seed, example index), so the
prompts are the same on every run, rank and batching):

  [prompt_string + example_delimiter] shot_1 + example_delimiter ... shot_k + example_delimiter
  + question_prelimiter + context + continuation_delimiter

where a shot is question_prelimiter + context + continuation_delimiter + answer (a generation
example with a `chain_of_thought`: + chain_of_thought + cot_delimiter + answer).

Sequences longer than max_seq_len lose tokens from the left of the context. When the tokenizer
folds a leading space into the word (GPT-style BPE: " a" is one token), trailing spaces of the
context move onto the continuation, so a choice is scored as the tokens the model would produce.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import string
import typing
from typing import Annotated, Any, ClassVar, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from llmfoundry_lite.config import ExistingFile, ListOrFile, Positive, Rule, cross, join, rule
from llmfoundry_lite.errors import DataError
from llmfoundry_lite.models.mpt import IGNORE_INDEX
from llmfoundry_lite.registry import icl_tasks

NonNegative = Annotated[int, rule(lambda v: v >= 0, "must be >= 0")]

# ---- Config of one task (an item of `icl_tasks:`), llm-foundry's keys -------------------------

HUB_REFUSED = ("tasks are read from local JSONL files here (nothing is downloaded); save the hub split as "
               "JSONL (`datasets.load_dataset(...).to_json(path)`) and give its path as dataset_uri")


def _task_file_problem(uri: str) -> Optional[str]:
    if uri.startswith("hf://"):
        return HUB_REFUSED
    return typing.get_args(ExistingFile)[1].problem(uri)



@dataclasses.dataclass
class ICLTaskConfig:
    label: str
    dataset_uri: Annotated[str, Rule(_task_file_problem)]
    icl_task_type: Annotated[str, Rule(_task_type_problem)]   # a name in the `icl_tasks` registry
    num_fewshot: Union[NonNegative, List[NonNegative]] = dataclasses.field(default_factory=lambda: [0])
    batch_size: Optional[Positive] = None       # examples per batch; default device_eval_batch_size
    max_seq_len: Optional[Positive] = None      # default: the run's max_seq_len
    continuation_delimiter: str = " "
    example_delimiter: str = "\n"
    prompt_string: str = ""
    fewshot_random_seed: int = 1234
    question_prelimiter: str = ""               # before every context, the shots' too
    has_categories: bool = False                # per-category scores (examples need a `category`)
    metric_names: Optional[List[str]] = None    # llm-foundry's; only the task type's own metric exists here
    # generation tasks
    max_new_tokens: Optional[Positive] = None   # default: longest answer + 1 tokens (+10 with cot_delimiter)
    cot_delimiter: str = ""                     # the answer is what follows its last occurrence
    early_stopping_criteria: Optional[List[str]] = None  # regular expressions; generation stops at them
    do_normalization: bool = True               # false: answers compared after strip() only
    hf_loading_vars: Optional[Dict[str, Any]] = None  # llm-foundry's hub datasets: refused (below)
    hf_parsing_map: Optional[Dict[str, List[str]]] = None
    ALIASES: ClassVar[Dict[str, str]] = {"prelimiter": "question_prelimiter"}  # llm-foundry's older name

    def __post_init__(self):
        if isinstance(self.num_fewshot, int):
            self.num_fewshot = [self.num_fewshot]

    @cross("hf_loading_vars", "hf_parsing_map")
    def _no_hub_dataset(self, path: str):
        return [f"{join(path, key)}: {HUB_REFUSED}" for key in ("hf_loading_vars", "hf_parsing_map")
                if getattr(self, key)]

    @cross("icl_task_type", "metric_names")
    def _own_metric(self, path: str):
        own = icl_tasks.get(self.icl_task_type).metric_name if self.icl_task_type in icl_tasks else None
        if own and self.metric_names is not None and self.metric_names != [own]:
            return (f"{join(path, 'metric_names')}: {self.metric_names} is not computed here; a "
                    f"{self.icl_task_type} task reports [{own}] (remove the key or write that)")


def _distinct_labels(tasks) -> Optional[str]:
    labels = [t.label for t in tasks if isinstance(t, ICLTaskConfig)]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    return f"labels {twice} are used by more than one task; labels name the results" if twice else None


# `icl_tasks:` a list of tasks, or the path of a YAML file with an `icl_tasks` list (as in llm-foundry).
ICLTasks = Annotated[ListOrFile[ICLTaskConfig, "icl_tasks"], Rule(_distinct_labels)]


def _task_type_problem(name) -> Optional[str]:
    if name == "code_evaluation":
        return ("'code_evaluation' runs the code the model writes, which needs a sandbox this framework does not "
                "have; remove the task (llm-foundry runs it in a sandbox)")
    return None if name in icl_tasks else icl_tasks.unknown_message(name)


# ---- Task types -------------------------------------------------------------------------------


class ICLTaskType:
    """How examples of one `icl_task_type` are checked, prompted and judged."""

    name = ""
    fields: Dict[str, type] = {}            # required JSON fields and their types
    optional_fields: Dict[str, type] = {}
    generates = False                        # scored by greedy generation instead of loglikelihood
    metric_name = ""                         # the metric's name in logs (llm-foundry's names)

    def problems(self, ex: Any) -> List[str]:
        """What is wrong with one parsed JSON line, each naming the field."""
        if not isinstance(ex, dict):
            return [f"expected a JSON object, got {type(ex).__name__}"]
        out = [f"missing field '{k}'" for k in self.fields if k not in ex]
        for k, tp in {**self.fields, **self.optional_fields}.items():
            if k in ex and not (isinstance(ex[k], tp) and not (tp is int and isinstance(ex[k], bool))):
                out.append(f"field '{k}' must be {tp.__name__}, got {type(ex[k]).__name__} {ex[k]!r}"[:200])
        return out or self.more_problems(ex)

    def more_problems(self, ex: dict) -> List[str]:
        return []

    def requests(self, ex: dict, cfg: ICLTaskConfig) -> List[Tuple[str, str]]:
        """The (context, continuation) pairs to score, before the few-shot prefix."""
        raise NotImplementedError

    def gold(self, ex: dict) -> int:
        return ex.get("gold", 0)

    def solved(self, ex: dict, cfg: ICLTaskConfig) -> str:
        """The example with its answer: a few-shot demonstration."""
        return "".join(self.requests(ex, cfg)[self.gold(ex)])

    def correct(self, mean_losses: Sequence[float], greedy_ok: Sequence[bool], gold: int) -> bool:
        """Loglikelihood types: judge one example from the scores of its requests."""
        return min(range(len(mean_losses)), key=lambda i: mean_losses[i]) == gold


def _list_of_str_problems(ex: dict, field: str) -> List[str]:
    items = ex[field]
    if not items or not all(isinstance(c, str) for c in items):
        return [f"field '{field}' must be a non-empty list of strings"]
    if not 0 <= ex["gold"] < len(items):
        return [f"field 'gold' must index '{field}' (0..{len(items) - 1}), got {ex['gold']}"]
    return []


@icl_tasks.register("language_modeling")
class LanguageModeling(ICLTaskType):
    name = "language_modeling"
    fields = {"context": str, "continuation": str}
    metric_name = "InContextLearningLMAccuracy"

    def requests(self, ex, cfg):
        return [(ex["context"] + cfg.continuation_delimiter, ex["continuation"])]

    def correct(self, mean_losses, greedy_ok, gold):
        return bool(greedy_ok[0])


@icl_tasks.register("multiple_choice")
class MultipleChoice(ICLTaskType):
    name = "multiple_choice"
    fields = {"query": str, "choices": list, "gold": int}
    metric_name = "InContextLearningMultipleChoiceAccuracy"

    def more_problems(self, ex):
        return _list_of_str_problems(ex, "choices")

    def requests(self, ex, cfg):
        return [(ex["query"] + cfg.continuation_delimiter, c) for c in ex["choices"]]


@icl_tasks.register("schema")
class Schema(ICLTaskType):
    name = "schema"
    fields = {"context_options": list, "continuation": str, "gold": int}
    metric_name = "InContextLearningMultipleChoiceAccuracy"  # as llm-foundry: a choice among contexts

    def more_problems(self, ex):
        return _list_of_str_problems(ex, "context_options")

    def requests(self, ex, cfg):
        return [(c + cfg.continuation_delimiter, ex["continuation"]) for c in ex["context_options"]]


@icl_tasks.register("generation_task_with_answers")
class GenerationWithAnswers(ICLTaskType):
    name = "generation_task_with_answers"
    fields = {"context": str, "answer": str}
    optional_fields = {"aliases": list, "chain_of_thought": str}
    generates = True
    metric_name = "InContextLearningGenerationExactMatchAccuracy"

    def more_problems(self, ex):
        ok = all(isinstance(a, str) for a in ex.get("aliases", []))
        return [] if ok else ["field 'aliases' must be a list of strings"]

    def requests(self, ex, cfg):
        return [(ex["context"] + cfg.continuation_delimiter, self.response(ex, ex["answer"], cfg))]

    def response(self, ex, answer: str, cfg: ICLTaskConfig) -> str:
        """What the model should write: the answer, after the example's chain of thought if it has one."""
        return ex["chain_of_thought"] + cfg.cot_delimiter + answer if "chain_of_thought" in ex else answer

    def answers(self, ex) -> List[str]:
        return [ex["answer"], *ex.get("aliases", [])]


icl_tasks.register("question_answering", GenerationWithAnswers)  # llm-foundry's other name for it


# ---- Task files and prompts -------------------------------------------------------------------


def load_task_file(path: str, task_type: ICLTaskType, has_categories: bool = False) -> List[dict]:
    """The examples of a JSONL task file; a malformed line raises DataError naming file, line, field.
    With `has_categories` every example needs a string `category`."""
    if not os.path.isfile(path):
        raise DataError(f"ICL task file not found: {path} (relative paths are relative to the current directory)")
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object") from None
            problems = task_type.problems(ex)
            if has_categories and isinstance(ex, dict) and not isinstance(ex.get("category"), str):
                problems.append("has_categories: true needs a string field 'category' in every example")
            if problems:
                need = ", ".join([*task_type.fields, *(f"{k} (optional)" for k in task_type.optional_fields)])
                raise DataError(f"{path}:{lineno}: {'; '.join(problems)} "
                                f"(a {task_type.name} example has the fields {need})")
            examples.append(ex)
    if not examples:
        raise DataError(f"{path}: no examples; write one JSON object per line")
    return examples


def fewshot_indices(n_examples: int, index: int, k: int, seed: int) -> List[int]:
    """k distinct example indices other than `index`, the same for a given (seed, index)."""
    rng = random.Random(f"{seed}:{index}")
    return [j + (j >= index) for j in rng.sample(range(n_examples - 1), k)]


def build_prompts(examples: List[dict], task_type: ICLTaskType, cfg: ICLTaskConfig,
                  num_fewshot: int) -> List[List[Tuple[str, str]]]:
    """Per example, its (prompt, continuation) requests with the few-shot prefix in front."""
    if num_fewshot >= len(examples):
        raise DataError(f"{cfg.dataset_uri}: num_fewshot {num_fewshot} needs at least "
                        f"{num_fewshot + 1} examples, the file has {len(examples)}")
    out, pre = [], cfg.question_prelimiter
    for i, ex in enumerate(examples):
        shots = [pre + task_type.solved(examples[j], cfg) for j in
                 fewshot_indices(len(examples), i, num_fewshot, cfg.fewshot_random_seed)]
        parts = ([cfg.prompt_string] if cfg.prompt_string else []) + shots
        prefix = "".join(p + cfg.example_delimiter for p in parts)
        out.append([(prefix + pre + ctx, cont) for ctx, cont in task_type.requests(ex, cfg)])
    return out


def task_datasets(cfg: ICLTaskConfig, tokenizer, max_seq_len: int,
                  max_examples: Optional[int] = None) -> Iterator[Tuple[str, "ICLDataset"]]:
    """(result name, dataset) of a task at each num_fewshot: '<label>/<k>-shot', or with has_categories
    one per category (sorted), '<label>/<k>-shot/<category>'. `max_examples` evaluates only the first
    examples of each (shots are still drawn from all)."""
    task_type = icl_tasks.get(cfg.icl_task_type)()
    examples = load_task_file(cfg.dataset_uri, task_type, cfg.has_categories)
    groups = {"": examples}
    if cfg.has_categories:
        groups = {c: [ex for ex in examples if ex["category"] == c] for c in sorted({ex["category"] for ex in examples})}
    for k in cfg.num_fewshot:
        for category, group in groups.items():
            name = f"{cfg.label}/{k}-shot" + (f"/{category}" if category else "")
            yield name, ICLDataset(cfg, k, tokenizer, max_seq_len, group, max_examples)


# ---- Tokenized examples and batches -----------------------------------------------------------


def _encode(tokenizer, text: str) -> List[int]:
    # verbose=False: prompts may exceed model_max_length; they are truncated here, not by the tokenizer
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


@dataclasses.dataclass
class EncodedExample:
    rows: List[List[int]]         # one token sequence per request (generation: the prompt)
    cont_lens: List[int]          # continuation tokens at the end of each row (generation: 0)
    gold: int
    answers: List[str]


class ICLDataset(torch.utils.data.Dataset):
    """One task at one num_fewshot, tokenized; items sorted longest first so batches pad little."""

    def __init__(self, cfg: ICLTaskConfig, num_fewshot: int, tokenizer, max_seq_len: int,
                 examples: Optional[List[dict]] = None, max_examples: Optional[int] = None):
        self.cfg, self.num_fewshot, self.tokenizer = cfg, num_fewshot, tokenizer
        self.task_type: ICLTaskType = icl_tasks.get(cfg.icl_task_type)()
        self.max_seq_len = cfg.max_seq_len or max_seq_len
        path = cfg.dataset_uri
        examples = load_task_file(path, self.task_type) if examples is None else examples
        prompts = build_prompts(examples, self.task_type, cfg, num_fewshot)[:max_examples]
        examples = examples[:len(prompts)]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.prefix_space = len(_encode(tokenizer, " a")) == 1
        if self.task_type.generates:
            answers = [self.task_type.answers(ex) for ex in examples]
            self.max_new_tokens = cfg.max_new_tokens or 1 + 10 * bool(cfg.cot_delimiter) + max(
                len(_encode(tokenizer, " " + self.task_type.response(ex, a, cfg)))
                for ex, alts in zip(examples, answers, strict=True) for a in alts)
            if self.max_new_tokens >= self.max_seq_len:
                raise DataError(f"{path}: max_new_tokens {self.max_new_tokens} leaves no room for the prompt "
                                f"within max_seq_len {self.max_seq_len}")
            items = [self._encode_generation(reqs[0][0], alts) for reqs, alts in zip(prompts, answers, strict=True)]
        else:
            self.max_new_tokens = 0
            items = [self._encode_scored(reqs, self.task_type.gold(ex), f"{path}:{i + 1}")
                     for i, (reqs, ex) in enumerate(zip(prompts, examples, strict=True))]
        self.items = sorted(items, key=lambda it: -max(len(r) for r in it.rows))

    def _encode_scored(self, requests, gold: int, where: str) -> EncodedExample:
        rows, cont_lens = [], []
        for ctx, cont in requests:
            n = len(ctx) - len(ctx.rstrip(" "))
            if self.prefix_space and n and not cont.startswith(" "):  # the trailing spaces go with the word
                ctx, cont = ctx[:-n], ctx[-n:] + cont
            ctx_ids, cont_ids = _encode(self.tokenizer, ctx), _encode(self.tokenizer, cont)
            if not ctx_ids:
                raise DataError(f"{where}: the prompt is empty; the first continuation token needs a context "
                                "(give the example a context or the task a prompt_string)")
            if not cont_ids or len(cont_ids) >= self.max_seq_len:
                raise DataError(f"{where}: the continuation {cont!r} has {len(cont_ids)} tokens; it needs "
                                f"1..{self.max_seq_len - 1} (max_seq_len {self.max_seq_len})")
            rows.append((ctx_ids + cont_ids)[-self.max_seq_len:])  # truncation from the left
            cont_lens.append(len(cont_ids))
        return EncodedExample(rows, cont_lens, gold, [])

    def _encode_generation(self, prompt: str, answers: List[str]) -> EncodedExample:
        if self.prefix_space:
            prompt = prompt.rstrip(" ")  # the model produces the space with the first word
        ids = _encode(self.tokenizer, prompt)[-(self.max_seq_len - self.max_new_tokens):]
        return EncodedExample([ids], [0], 0, answers)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> EncodedExample:
        return self.items[i]

    def collate(self, items: List[EncodedExample]) -> Dict[str, Any]:
        """A batch: right-padded rows for scoring, left-padded prompts for generation.

        Keys besides input_ids/attention_mask/labels carry what scoring needs, so that the same
        batch serves the standalone loop and Composer's evaluators (which pop `labels` and look at
        `mode`: 'icl_task' returns logits, 'generate' calls `generate(**generation_kwargs)`).
        """
        rows = [r for it in items for r in it.rows]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        left = self.task_type.generates
        for i, r in enumerate(rows):
            span = slice(width - len(r), width) if left else slice(0, len(r))
            input_ids[i, span] = torch.tensor(r, dtype=torch.long)
            attention_mask[i, span] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "icl_task_type": self.task_type.name}
        if left:
            batch.update(mode="generate", labels=[it.answers for it in items], cot_delimiter=self.cfg.cot_delimiter,
                         early_stopping_criteria=self.cfg.early_stopping_criteria or [],
                         do_normalization=self.cfg.do_normalization,
                         generation_kwargs={"max_new_tokens": self.max_new_tokens, "do_sample": False,
                                            "pad_token_id": self.pad_id, "eos_token_id": self.tokenizer.eos_token_id})
            return batch
        cont = [c for it in items for c in it.cont_lens]
        cont_span = torch.tensor([[len(r) - c, len(r)] for r, c in zip(rows, cont, strict=True)], dtype=torch.long)
        pos = torch.arange(width)
        labels = input_ids.masked_fill((pos < cont_span[:, :1]) | (pos >= cont_span[:, 1:]), IGNORE_INDEX)
        batch.update(mode="icl_task", labels=labels, cont_span=cont_span,
                     example_index=torch.tensor([i for i, it in enumerate(items) for _ in it.rows]),
                     gold=torch.tensor([it.gold for it in items]))
        return batch

    def batches(self, batch_size: int) -> Iterator[Dict[str, Any]]:
        for start in range(0, len(self.items), batch_size):
            yield self.collate(self.items[start:start + batch_size])


def num_examples(batch: Dict[str, Any]) -> int:
    """Examples in a batch (a multiple-choice example spans several rows)."""
    return len(batch["labels"]) if batch["mode"] == "generate" else len(batch["gold"])


def split_examples(batch: Dict[str, Any], size: int) -> List[Dict[str, Any]]:
    """The batch cut into pieces of `size` examples, never separating the rows of one example."""
    n = num_examples(batch)
    if size >= n:
        return [batch]
    pieces = []
    for a in range(0, n, size):
        b = min(a + size, n)
        piece = dict(batch)
        if batch["mode"] == "generate":
            for key in ("input_ids", "attention_mask", "labels"):
                piece[key] = batch[key][a:b]
        else:
            rows = (batch["example_index"] >= a) & (batch["example_index"] < b)
            for key in ("input_ids", "attention_mask", "labels", "cont_span"):
                piece[key] = batch[key][rows]
            piece["example_index"] = batch["example_index"][rows] - a
            piece["gold"] = batch["gold"][a:b]
        pieces.append(piece)
    return pieces


# ---- Scoring ----------------------------------------------------------------------------------


def continuation_scores(logits: torch.Tensor, batch: Dict[str, Any]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per row: the mean per-token loss of its continuation, and whether greedy decoding reproduces it."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)[:, :-1]
    target = batch["input_ids"][:, 1:].to(logprobs.device)
    token_lp = logprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    greedy = logprobs.argmax(-1) == target
    span = batch["cont_span"].to(logprobs.device) - 1  # position p predicts token p + 1
    pos = torch.arange(target.shape[1], device=logprobs.device)
    in_cont = (pos >= span[:, :1]) & (pos < span[:, 1:])
    mean_loss = -(token_lp * in_cont).sum(1) / in_cont.sum(1)
    return mean_loss, (greedy | ~in_cont).all(1)


def judge_logits(logits: torch.Tensor, batch: Dict[str, Any]) -> List[bool]:
    """Per example of a loglikelihood batch: correct or not, from the model's logits."""
    mean_loss, greedy_ok = continuation_scores(logits, batch)
    task_type = icl_tasks.get(batch["icl_task_type"])()
    owner = batch["example_index"].to(mean_loss.device)
    return [task_type.correct(mean_loss[owner == e].tolist(), greedy_ok[owner == e].tolist(), gold)
            for e, gold in enumerate(batch["gold"].tolist())]


_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation + "‘’´`"})


def normalize_answer(text: str) -> str:
    """llm-foundry's (TriviaQA's) normalisation: lowercase, '_' and punctuation become spaces, the
    articles a/an/the go, whitespace collapses."""
    text = text.replace("_", " ").lower().translate(_PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def final_answer(text: str, batch: Dict[str, Any]) -> str:
    """The part of a generation that is judged: before the first early-stopping match (the criteria are
    joined into one regular expression, as llm-foundry does), after the last cot_delimiter."""
    if batch["early_stopping_criteria"]:
        text = re.split("|".join(batch["early_stopping_criteria"]), text)[0]
    return text.split(batch["cot_delimiter"])[-1] if batch["cot_delimiter"] else text


def judge_generations(texts: Sequence[str], batch: Dict[str, Any]) -> List[bool]:
    """Per example of a generation batch: its final answer starts with the answer or an alias."""
    clean = normalize_answer if batch["do_normalization"] else str.strip
    return [any(clean(final_answer(text, batch)).startswith(clean(a)) for a in answers)
            for text, answers in zip(texts, batch["labels"], strict=True)]
