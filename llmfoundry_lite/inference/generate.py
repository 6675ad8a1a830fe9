"""Batched generation: `generate(model, tokenizer, prompts, ...)` and the `generate` command.

Prompts are sorted by length and cut into batches of `max_batch_size`, each left-padded so that every
row's last prompt token sits in the same column and decoding can continue from the KV cache for the
whole batch at once. Decoding is `model.generate` (transformers' GenerationMixin over our cache); the
repetition penalty and temperature are our own logits processor, finite for every accepted value.
"""
from __future__ import annotations

import argparse
import time
import typing
from dataclasses import dataclass, field, fields
from typing import Annotated, List, Optional, Sequence, Tuple

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TopKLogitsWarper, TopPLogitsWarper

from llmfoundry_lite.config import Rule, check
from llmfoundry_lite.errors import UserError
from llmfoundry_lite.inference.loading import add_model_arguments, open_model


class Generations(list):
    """The completed texts (prompt + continuation, in prompt order) plus speed figures."""

    new_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def _option(default, help: str):
    return field(default=default, metadata={"help": help})


def _within(ok, text: str) -> Rule:
    return Rule(lambda v: None if ok(v) else f"{v} out of range: must be {text}")  # NaN fails every comparison


@dataclass
class SamplingOptions:
    """How new tokens are chosen. The one list of these options: the keyword arguments of `generate`,
    the flags of the generate, chat and serve commands (`add_arguments`) and the `parameters` of a
    serve request (checked with `config.check`)."""

    max_new_tokens: Annotated[int, _within(lambda v: v >= 1, ">= 1")] = _option(64, "tokens to generate after each prompt")
    temperature: Annotated[float, _within(lambda v: 0 < v <= 100, "in (0, 100]")] = _option(
        1.0, "logits are divided by it when sampling (< 1: more predictable)")
    top_k: Optional[Annotated[int, _within(lambda v: v >= 0, ">= 0")]] = _option(
        None, "sample among the k likeliest tokens only (0 or unset: all)")
    top_p: Optional[Annotated[float, _within(lambda v: 0 < v <= 1, "in (0, 1]")]] = _option(
        None, "sample among the likeliest tokens holding probability p only")
    repetition_penalty: Annotated[float, _within(lambda v: 0 < v <= 10, "in (0, 10]")] = _option(
        1.0, "> 1 makes tokens already in the text less likely")
    do_sample: bool = _option(False, "sample (default: greedy)")
    seed: Optional[Annotated[int, _within(lambda v: 0 <= v < 2 ** 63, "in [0, 2**63)")]] = _option(
        None, "random seed, for reproducible sampling")

    def checked(self) -> SamplingOptions:
        """self, or a UserError listing every value out of range."""
        problems = check(SamplingOptions, {f.name: getattr(self, f.name) for f in fields(self)})[1]
        if problems:
            raise UserError("bad sampling options: " + "; ".join(problems))
        return self

    @classmethod
    def add_arguments(cls, parser, **defaults) -> None:
        """A flag per field (`--top_p` ...); `defaults` replaces a field's default (chat: max_new_tokens=256)."""
        for f in fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            tp = next(t for t in typing.get_args(tp) or [tp] if t is not type(None))  # Optional[int] -> int
            kind = {"action": "store_true"} if tp is bool else {"type": tp}
            parser.add_argument(f"--{f.name}", default=defaults.get(f.name, f.default), help=f.metadata["help"], **kind)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SamplingOptions:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)}).checked()


class _PenaltyAndTemperature(LogitsProcessor):
    """transformers' repetition penalty and temperature, finite for every value `SamplingOptions` accepts.

    Theirs divide float32 logits: by a tiny penalty or temperature (1e-30) a logit overflows to inf and
    softmax gives NaN (inf - inf); below 1e-45 the divisor itself rounds to 0. Here the logits are
    float64, a penalty is at least 1e-250 (a float32 logit over it stays finite, and still outweighs
    every other logit by a factor of 1e200, as over any smaller penalty), and the best logit is shifted
    to 0 before dividing by the temperature: it stays 0, the others fall to -inf at worst, so a tiny
    temperature samples exactly the greedy token."""

    def __init__(self, penalty: float, temperature: float):
        self.penalty, self.temperature = max(penalty, 1e-250), temperature

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        x = scores.double()
        if self.penalty != 1.0:  # the logit of a token already in the text: > 0 divided by the penalty, < 0 multiplied
            seen = x.gather(1, input_ids)
            x = x.scatter(1, input_ids, torch.where(seen < 0, seen * self.penalty, seen / self.penalty))
        return ((x - x.max(dim=-1, keepdim=True).values) / self.temperature).float()


def generation_kwargs(tokenizer, options: SamplingOptions, eos_token_id=None) -> dict:
    """Keyword arguments for `model.generate`: the sampling knobs as logits processors of ours (top-k and
    top-p are transformers' own, after the temperature), transformers' knobs switched off (None: also
    those a model's generation_config sets)."""
    sampling = options.do_sample
    processors = [_PenaltyAndTemperature(options.repetition_penalty, options.temperature if sampling else 1.0)]
    if sampling and options.top_k:
        processors.append(TopKLogitsWarper(options.top_k))
    if sampling and options.top_p is not None and options.top_p < 1:
        processors.append(TopPLogitsWarper(options.top_p))
    return dict(max_new_tokens=options.max_new_tokens, do_sample=sampling,
                logits_processor=LogitsProcessorList(processors), temperature=None, top_k=None, top_p=None,
                repetition_penalty=None, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id if eos_token_id is None else eos_token_id)


def too_long(prompt_tokens: int, max_new_tokens: int, max_seq_len: int) -> Optional[str]:
    """Why a prompt of `prompt_tokens` tokens, with `max_new_tokens`, does not fit the model's context; or None."""
    if prompt_tokens + max_new_tokens <= max_seq_len:
        return None
    return (f"{prompt_tokens} tokens + max_new_tokens {max_new_tokens} exceeds the model's max_seq_len "
            f"{max_seq_len}; shorten it or lower max_new_tokens")


def overlong(tokenizer, prompts: Sequence[str], max_new_tokens: int, max_seq_len: int) -> List[Tuple[int, str]]:
    """(index, message) for each prompt that, with `max_new_tokens`, would not fit in the model's context."""
    problems = [(i, too_long(len(ids), max_new_tokens, max_seq_len))
                for i, ids in enumerate(tokenizer(list(prompts))["input_ids"])]
    return [(i, message) for i, message in problems if message]


@torch.inference_mode()
def generate(model, tokenizer, prompts: Sequence[str], max_batch_size: Optional[int] = None, eos_token_id=None,
             streamer=None, **sampling) -> Generations:
    """Complete every prompt; returns `Generations` (prompt + continuation per prompt, in order).

    `sampling` are `SamplingOptions` fields (greedy, 64 new tokens by default). `eos_token_id` (an id or
    a list) overrides the tokenizer's end token; `streamer` (a transformers streamer) receives tokens as
    they come and needs a single prompt.
    """
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise UserError("prompts must be a non-empty list of strings")
    options = SamplingOptions(**sampling).checked()
    kw = generation_kwargs(tokenizer, options, eos_token_id)
    problems = overlong(tokenizer, prompts, options.max_new_tokens, model.config.max_seq_len)
    if problems:
        raise UserError("\n".join(f"prompt {i}: {msg}" for i, msg in problems))
    if options.seed is not None:
        torch.manual_seed(options.seed)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    step = max_batch_size or len(prompts)
    result = Generations([None] * len(prompts))
    for start in range(0, len(order), step):
        idx = order[start:start + step]
        batch = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, padding_side="left")
        batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(**batch, **kw, streamer=streamer)
        if device.type == "cuda":
            torch.cuda.synchronize()
        result.seconds += time.perf_counter() - t0
        new_ids = out[:, batch["input_ids"].shape[1]:]
        # tokens produced: up to and including each row's first end token (the rest is padding)
        is_end = torch.isin(new_ids, torch.tensor(kw["eos_token_id"], device=device)).int()
        result.new_tokens += int((is_end.cumsum(dim=1) - is_end == 0).sum())
        for row, i in enumerate(idx):
            result[i] = prompts[i] + tokenizer.decode(new_ids[row], skip_special_tokens=True)
    return result


def read_prompts(values: Sequence[str]) -> List[str]:
    """--prompts values; `file::PATH` reads a whole file as one prompt (llm-foundry's convention)."""
    prompts = []
    for v in values:
        if v.startswith("file::"):
            path = v[len("file::"):]
            try:
                with open(path, encoding="utf-8") as f:
                    prompts.append(f.read())
            except OSError as e:
                raise UserError(f"--prompts {v}: cannot read {path}: {e.strerror}") from None
        else:
            prompts.append(v)
    return prompts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompts", nargs="+", default=["My name is", "The capital of France is"],
                        help="prompts, or file::PATH to read one prompt from a file")
    SamplingOptions.add_arguments(parser)
    parser.add_argument("--max_batch_size", type=int, default=None, help="prompts per batch (default: all)")


def run(args: argparse.Namespace) -> int:
    sampling = SamplingOptions.from_args(args)
    model, tokenizer = open_model(args)
    prompts = read_prompts(args.prompts)
    outputs = generate(model, tokenizer, prompts, max_batch_size=args.max_batch_size, **vars(sampling))
    for text in outputs:
        print("#" * 60)
        print(text)
    print("#" * 60)
    print(f"{outputs.new_tokens} new tokens in {outputs.seconds:.2f}s: {outputs.tokens_per_s:.1f} tokens/s "
          f"({len(prompts)} prompts, device {next(model.parameters()).device}, "
          f"dtype {next(model.parameters()).dtype})")
    return 0
