"""Continuous batching: many requests decode together, each joining and leaving the batch at any step.

One thread owns the model. Each step it
  1. drops the sequences that finished or whose client hung up (their rows leave the KV cache),
  2. admits waiting sequences: each prompt is run alone (prefill, its own KV cache), its first token
     chosen, and its cache rows merged into the batch's,
  3. runs one decoding step for every sequence in the batch and chooses each one's next token with
     its own sampling options and its own random generator.
The batch's KV cache is one tensor per layer, (batch, heads, columns, head_dim): every sequence's
tokens end in the last column and the columns before its first token are padding the attention mask
hides (as `generate` left-pads a batch); a sequence joining a longer batch is padded on the left, a
longer one pads the batch, and columns that have become padding for every row are cut.

Sampling is `generate`'s (the same logits processors from `SamplingOptions`), so a greedy answer is
the one `generate` gives. Results go back through each request's `on_update` callback, called from
the model thread.
"""
from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from llmfoundry_lite.inference.generate import SamplingOptions, generation_kwargs, too_long


class BatchCache:
    """A KV cache the model fills through `update` (the interface of transformers' `Cache` it uses), whose
    rows can be selected, merged and trimmed between steps."""

    def __init__(self, layers: Optional[Dict[int, Tuple[torch.Tensor, torch.Tensor]]] = None):
        self.layers = layers or {}

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int):
        if layer_idx in self.layers:
            old_k, old_v = self.layers[layer_idx]
            k, v = torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2)
        self.layers[layer_idx] = k, v
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return next(iter(self.layers.values()))[0].shape[2] if self.layers else 0

    def map(self, fn) -> BatchCache:
        return BatchCache({i: (fn(k), fn(v)) for i, (k, v) in self.layers.items()})


def _left_pad(t: torch.Tensor, columns: int, dim: int) -> torch.Tensor:
    if columns == 0:
        return t
    shape = list(t.shape)
    shape[dim] = columns
    return torch.cat([t.new_zeros(shape), t], dim=dim)


@dataclass
class TokenInfo:
    """A token of a prompt or an answer, with the model's log-probability of it and of the likeliest
    alternatives (when asked for)."""
    id: int
    text: str
    logprob: Optional[float] = None
    top: Optional[List[Tuple[int, str, float]]] = None


@dataclass
class Update:
    """What a sequence produced since its last update. The first update (or an error) comes when the
    sequence is admitted; the last one has `finish_reason` "stop" (an end token or a stop string),
    "length" (max_new_tokens) or "error"."""
    text: str = ""
    tokens: List[TokenInfo] = field(default_factory=list)
    prompt_len: Optional[int] = None           # in the first update: the prompt's length in tokens,
    prompt_text: Optional[str] = None          # with `echo`, its text
    prompt: Optional[List[TokenInfo]] = None   # and with `echo` and `logprobs`, its tokens
    finish_reason: Optional[str] = None
    error: Optional[Exception] = None


class PromptError(ValueError):
    """A prompt the model cannot take (too long, empty, a token id outside the vocabulary)."""


@dataclass
class GenerationRequest:
    prompt: Union[str, List[int]]
    options: SamplingOptions
    on_update: Callable[[Update], None]
    stop: Sequence[str] = ()                  # stop strings: the answer ends before the first one
    stop_ids: Optional[Sequence[int]] = None  # end tokens (default: the tokenizer's EOS)
    logprobs: Optional[int] = None            # log-probabilities of each chosen token and the top N
    echo: bool = False                        # report the prompt (its tokens too, with `logprobs`)
    generator: Optional[torch.Generator] = None
    cancelled: bool = False                   # set by the caller (a client hung up): dropped at the next step

    def cancel(self) -> None:
        self.cancelled = True


class QueueFull(RuntimeError):
    pass


def _numbers_columns(model) -> bool:
    """Whether a token's position counts the columns before it, padding included, as llm-foundry's dail
    RoPE and attention temperature tuning do (ALiBi, hf RoPE and learned positions count real tokens)."""
    cfg = model.config
    dail = cfg.position_scheme == "rope" and cfg.attn_config["rope_impl"] == "dail"
    return dail or any(getattr(m, "temperature", None) for m in model.modules() if hasattr(m, "layer_idx"))


class _Sequence:
    """A request being decoded: its tokens, its sampling processors and what it has reported so far."""

    def __init__(self, req: GenerationRequest, prompt_ids: List[int], tokenizer, eos_id):
        self.req, self.prompt_ids, self.ids = req, prompt_ids, list(prompt_ids)
        self.processors = list(generation_kwargs(tokenizer, req.options)["logits_processor"])
        # greedy without a repetition penalty: the processors (a shift of every logit) keep the argmax
        self.plain_greedy = not req.options.do_sample and req.options.repetition_penalty == 1
        ends = req.stop_ids if req.stop_ids is not None else [eos_id]
        self.end_ids = {i for i in ends if i is not None}
        self.sent = ""
        self.done = False

    @property
    def generated(self) -> List[int]:
        return self.ids[len(self.prompt_ids):]


class Batcher:
    """The model thread and its queue. `submit(requests)` queues requests (all or none: QueueFull when
    `queue_size` are already waiting); at most `max_batch_size` sequences decode at once."""

    def __init__(self, model, tokenizer, max_batch_size: int = 16, queue_size: int = 64):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.queue_size = max_batch_size, queue_size
        self.note = None
        if _numbers_columns(model) and max_batch_size > 1:
            self.max_batch_size = 1
            self.note = ("this model numbers tokens by their column, left padding included (llm-foundry's dail "
                         "RoPE or attention temperature tuning), so a sequence in a padded batch would not compute "
                         "what it computes alone: its requests are decoded one at a time")
        self.device = next(model.parameters()).device
        self.waiting: "collections.deque[GenerationRequest]" = collections.deque()
        self.rows: List[_Sequence] = []
        self.cache: Optional[BatchCache] = None
        self.mask: Optional[torch.Tensor] = None
        self.served = 0
        self.dropped = 0  # sequences whose client hung up before they finished
        self.steps = 0
        self.largest_batch = 0
        self._wake = threading.Condition()
        threading.Thread(target=self._loop, name="model-batcher", daemon=True).start()

    # ---- the caller's side (any thread) ----
    def submit(self, requests: Sequence[GenerationRequest]) -> None:
        with self._wake:
            if len(self.waiting) + len(requests) > self.queue_size:  # first forget those whose client left
                kept = [r for r in self.waiting if not r.cancelled]
                self.dropped += len(self.waiting) - len(kept)
                self.waiting = collections.deque(kept)
            if len(self.waiting) + len(requests) > self.queue_size:
                raise QueueFull(f"{len(self.waiting)} sequences are waiting (the limit is {self.queue_size})")
            self.waiting.extend(requests)
            self._wake.notify()

    def status(self) -> dict:
        return {"queued": len(self.waiting), "running": len(self.rows), "served": self.served,
                "dropped": self.dropped}

    # ---- the model thread ----
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self.waiting and not self.rows:
                        self._wake.wait()
                    room = self.max_batch_size - len(self.rows)
                    joining = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
                for req in joining:
                    try:
                        self._admit(req)
                    except Exception as e:  # its prefill failed (out of memory, ...): this request gets the error
                        req.on_update(Update(finish_reason="error", error=e))
                self._drop_finished()
                if self.rows:
                    try:
                        self._step()
                    except Exception as e:  # the model failed: every sequence still decoding gets the error
                        for seq in self.rows:
                            if not (seq.done or seq.req.cancelled):
                                seq.req.on_update(Update(finish_reason="error", error=e))
                        self.rows, self.cache, self.mask = [], None, None

    def _prompt_ids(self, req: GenerationRequest) -> List[int]:
        ids = self.tokenizer(req.prompt)["input_ids"] if isinstance(req.prompt, str) else list(req.prompt)
        vocab, max_len = self.model.config.vocab_size, self.model.config.max_seq_len
        if not ids:
            raise PromptError("the prompt has no tokens")
        if not all(0 <= i < vocab for i in ids):
            raise PromptError(f"token ids must be in [0, {vocab})")
        problem = too_long(len(ids), req.options.max_new_tokens, max_len)
        if problem:
            raise PromptError(problem)
        return ids

    def _admit(self, req: GenerationRequest) -> None:
        if req.cancelled:
            self.dropped += 1
            return
        try:
            ids = self._prompt_ids(req)
        except PromptError as e:
            req.on_update(Update(finish_reason="error", error=e))
            return
        seq = _Sequence(req, ids, self.tokenizer, self.tokenizer.eos_token_id)
        cache = BatchCache()
        logits = self.model(input_ids=torch.tensor([ids], device=self.device), past_key_values=cache,
                            use_cache=True).logits[0]
        prompt = None
        if req.echo and req.logprobs is not None:
            prompt = [TokenInfo(ids[0], self.tokenizer.decode([ids[0]]))]
            logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
            prompt += [self._info(token, logprobs[i], req.logprobs or 0) for i, token in enumerate(ids[1:])]
        first = Update(prompt_len=len(ids), prompt=prompt,
                       prompt_text=(req.prompt if isinstance(req.prompt, str) else self.tokenizer.decode(ids))
                       if req.echo else None)
        if self._choose(seq, logits[-1], first):
            return
        mask = torch.ones(1, len(ids), dtype=torch.bool, device=self.device)
        if self.cache is None:
            self.cache, self.mask = cache, mask
        else:  # right-align the newcomer and the batch to the same number of columns
            width = max(self.mask.shape[1], len(ids))
            pad_batch, pad_new = width - self.mask.shape[1], width - len(ids)
            self.cache = BatchCache({
                i: tuple(torch.cat([_left_pad(old, pad_batch, 2), _left_pad(new, pad_new, 2)])
                         for old, new in zip(self.cache.layers[i], cache.layers[i], strict=True))
                for i in self.cache.layers})
            self.mask = torch.cat([_left_pad(self.mask, pad_batch, 1), _left_pad(mask, pad_new, 1)])
        self.rows.append(seq)
        self.largest_batch = max(self.largest_batch, len(self.rows))

    def _drop_finished(self) -> None:
        keep = [i for i, seq in enumerate(self.rows) if not (seq.done or seq.req.cancelled)]
        if len(keep) == len(self.rows):
            return
        self.dropped += sum(seq.req.cancelled and not seq.done for seq in self.rows)
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache, self.mask = None, None
            return
        index = torch.tensor(keep, device=self.device)
        mask = self.mask[index]
        first = int(mask.any(dim=0).int().argmax())  # columns before it are padding in every row left
        self.mask = mask[:, first:]
        self.cache = self.cache.map(lambda t: t[index, :, first:])

    def _step(self) -> None:
        last = torch.tensor([[seq.ids[-1]] for seq in self.rows], device=self.device)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        logits = self.model(input_ids=last, attention_mask=self.mask, past_key_values=self.cache,
                            use_cache=True).logits[:, -1]
        self.steps += 1
        greedy = logits.argmax(dim=-1).tolist()  # one batched argmax for the rows that need nothing else
        for seq, row_logits, token in zip(self.rows, logits, greedy, strict=True):
            if not seq.req.cancelled:
                self._choose(seq, row_logits, token=token if seq.plain_greedy else None)

    def _info(self, token: int, logprobs: torch.Tensor, top: int) -> TokenInfo:
        alternatives = None
        if top:
            values, ids = logprobs.topk(top)
            alternatives = [(i, self.tokenizer.decode([i]), v) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
        return TokenInfo(token, self.tokenizer.decode([token]), float(logprobs[token]), alternatives)

    def _choose(self, seq: _Sequence, logits: torch.Tensor, update: Optional[Update] = None,
                token: Optional[int] = None) -> bool:
        """Choose `seq`'s next token from its logits (unless `token` is given), report it (in `update`, if
        given); whether the sequence has finished."""
        req = seq.req
        if token is None:
            ids, scores = torch.tensor([seq.ids], device=self.device), logits[None].float()
            for processor in seq.processors:
                scores = processor(ids, scores)
            if req.options.do_sample:
                probs = torch.softmax(scores[0], dim=-1).cpu()  # the request's generator is a CPU one
                token = int(torch.multinomial(probs, 1, generator=req.generator))
            else:
                token = int(scores[0].argmax())
        seq.ids.append(token)
        update = update or Update()
        if req.logprobs is not None:
            update.tokens = [self._info(token, torch.log_softmax(logits.float(), dim=-1), req.logprobs)]
        # no clean-up of spaces before punctuation: with it, a later token can rewrite text already sent
        text = self.tokenizer.decode(seq.generated, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        cut = min((p for p in (text.find(s, max(0, len(seq.sent) - len(s) + 1)) for s in req.stop) if p >= 0),
                  default=-1)
        if cut >= 0:
            text, update.finish_reason = text[:cut], "stop"
        elif token in seq.end_ids:
            update.finish_reason = "stop"
        elif len(seq.generated) >= req.options.max_new_tokens:
            update.finish_reason = "length"
        else:  # hold back what may be the start of a stop string, or of a character still being decoded
            held = max((k for s in req.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[:len(text) - held].rstrip("\ufffd")
        update.text, seq.sent = text[len(seq.sent):], max(text, seq.sent, key=len)
        seq.done = update.finish_reason is not None
        if seq.done:
            self.served += 1
        req.on_update(update)
        return seq.done
