"""Running a model on ICL tasks outside Composer: greedy generation, scoring, per-task accuracy.

The tasks, prompts, batches and judging rules are `data/icl.py`'s; training runs the same batches as
Composer evaluators (`train/icl_evaluators.py`), so both report the same numbers.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

import torch
from tqdm import tqdm

from llmfoundry_lite.data.icl import ICLDataset, ICLTaskConfig, judge_generations, judge_logits


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                    eos_token_id: Optional[int], pad_token_id: int) -> torch.Tensor:
    """New tokens [batch, <= max_new_tokens] by argmax, for left-padded prompts; rows stop at EOS.

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
        if done.all():
            break
    return input_ids[:, prompt_len:]


def score_batch(model, tokenizer, batch: Dict[str, Any], device: Union[str, torch.device] = "cpu") -> List[bool]:
    """Run the model on one batch and judge each example."""
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    if batch["mode"] == "generate":
        kw = batch["generation_kwargs"]
        eos = kw["eos_token_id"]
        new = greedy_generate(model, ids, mask, kw["max_new_tokens"], eos, kw["pad_token_id"])
        rows = [r[:r.index(eos)] if eos in r else r for r in new.tolist()]
        return judge_generations(tokenizer.batch_decode(rows, skip_special_tokens=True), batch)
    return judge_logits(model(input_ids=ids, attention_mask=mask).logits, batch)


def evaluate_icl_task(model, tokenizer, cfg: ICLTaskConfig, max_seq_len: int, batch_size: int,
                      device: Union[str, torch.device] = "cpu", progress: bool = False) -> Dict[str, float]:
    """Accuracy of `model` on one task at each of its num_fewshot: {'<label>/<k>-shot': accuracy}."""
    results = {}
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        for k in cfg.num_fewshot:
            ds, size = ICLDataset(cfg, k, tokenizer, max_seq_len), cfg.batch_size or batch_size
            batches = tqdm(ds.batches(size), total=-(-len(ds) // size), desc=f"{cfg.label} {k}-shot", leave=False,
                           disable=not progress)
            correct = sum(sum(score_batch(model, tokenizer, b, device)) for b in batches)
            results[f"{cfg.label}/{k}-shot"] = correct / len(ds)
    finally:
        if was_training:
            model.train()
    return results
