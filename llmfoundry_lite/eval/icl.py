"""Running a model on ICL tasks outside Composer: greedy generation, scoring, per-task accuracy.

The tasks, prompts, batches and judging rules are `icl/tasks.py`'s; training runs the same batches as
Composer evaluators (`training/icl_evaluators.py`), so both report the same numbers.

Several processes (`composer -n N`, torch.distributed up) each score every N-th example and sum the
counts. They run the same number of forward passes, as a model sharded with FSDP2 needs (every
forward gathers weights from all ranks): a rank with fewer batches scores a filler batch whose result
it drops, and generation goes on until every rank's rows are done.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Union

import torch
import torch.distributed as dist
from tqdm import tqdm

from llmfoundry_lite.icl.tasks import ICLDataset, ICLTaskConfig, judge_generations, judge_logits, task_datasets


def _rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _all_ranks_done(done: torch.Tensor) -> bool:
    """Whether every row of every rank is done (one rank alone with one process)."""
    if not dist.is_initialized():
        return bool(done.all())
    flag = done.all().int()
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                    eos_token_id: Optional[int], pad_token_id: int,
                    stopped: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """New tokens [batch, <= max_new_tokens] by argmax, for left-padded prompts; a row stops at EOS
    or when `stopped(new tokens so far)` marks it.

    Recomputes the whole sequence each step (no KV cache): answers are a few tokens, and this needs
    nothing from the model beyond forward(input_ids, attention_mask).logits.
    """
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    prompt_len = input_ids.shape[1]
    for _ in range(max_new_tokens):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -1]
        nxt = logits.argmax(-1).masked_fill(done, pad_token_id)
        if eos_token_id is not None:
            done |= nxt == eos_token_id
        # what a finished row attends to no longer matters: its later tokens are dropped at decoding
        input_ids = torch.cat([input_ids, nxt[:, None]], 1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], 1)
        if stopped is not None:
            done |= stopped(input_ids[:, prompt_len:]).to(done.device)
        if _all_ranks_done(done):
            break
    return input_ids[:, prompt_len:]


def score_batch(model, tokenizer, batch: Dict[str, Any], device: Union[str, torch.device] = "cpu") -> List[bool]:
    """Run the model on one batch and judge each example."""
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    if batch["mode"] == "generate":
        kw, criteria = batch["generation_kwargs"], batch["early_stopping_criteria"]
        eos = kw["eos_token_id"]

        def decode(new: torch.Tensor) -> List[str]:
            rows = [r[:r.index(eos)] if eos in r else r for r in new.tolist()]
            return tokenizer.batch_decode(rows, skip_special_tokens=True)

        def stopped(new: torch.Tensor) -> torch.Tensor:  # llm-foundry stops once a criterion appears
            return torch.tensor([any(c in text for c in criteria) for text in decode(new)])

        new = greedy_generate(model, ids, mask, kw["max_new_tokens"], eos, kw["pad_token_id"],
                              stopped if criteria else None)
        return judge_generations(decode(new), batch)
    return judge_logits(model(input_ids=ids, attention_mask=mask).logits, batch)


def accuracy(model, tokenizer, ds: ICLDataset, batch_size: int, device: Union[str, torch.device] = "cpu",
             desc: str = "", progress: bool = False) -> float:
    """The fraction of `ds`'s examples judged correct; with several ranks, each scores its share."""
    rank, world = _rank_world()
    mine = ds.items[rank::world]
    steps = -(-len(ds.items[::world]) // batch_size)  # rank 0's share is the largest
    correct = 0
    for step in tqdm(range(steps), desc=desc, leave=False, disable=not progress):
        chunk = mine[step * batch_size:(step + 1) * batch_size]
        ok = score_batch(model, tokenizer, ds.collate(chunk or ds.items[:1]), device)
        correct += sum(ok) if chunk else 0  # a filler batch keeps the ranks in step
    if world > 1:
        total = torch.tensor(correct, device=device)
        dist.all_reduce(total)
        correct = int(total.item())
    return correct / len(ds)


def evaluate_icl_task(model, tokenizer, cfg: ICLTaskConfig, max_seq_len: int, batch_size: int,
                      device: Union[str, torch.device] = "cpu", progress: bool = False,
                      max_examples: Optional[int] = None) -> Dict[str, float]:
    """Accuracy of `model` on one task at each of its num_fewshot: {'<label>/<k>-shot': accuracy}; with
    has_categories also '<label>/<k>-shot/<category>', and '<label>/<k>-shot' is their mean."""
    results: Dict[str, float] = {}
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        for name, ds in task_datasets(cfg, tokenizer, max_seq_len, max_examples):
            results[name] = accuracy(model, tokenizer, ds, cfg.batch_size or batch_size, device, name, progress)
    finally:
        if was_training:
            model.train()
    if cfg.has_categories:
        for k in cfg.num_fewshot:
            shot = f"{cfg.label}/{k}-shot"
            parts = [v for name, v in results.items() if name.startswith(shot + "/")]
            results[shot] = sum(parts) / len(parts)
    return results
