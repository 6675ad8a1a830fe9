"""`loss_fn: torch_crossentropy` and `fused_crossentropy`: the Composer wrapper of `MPTForCausalLM` (the
model a `model:` section opens, see opening.py) training on the next token's cross-entropy.

`ComposerMPTCausalLM` is a `composer.models.HuggingFaceModel`, so Composer checkpoints keep the
weights under `state['model']` as `model.<HF MPT name>` and the HF config and tokenizer under
`state['integrations']['huggingface']`, which the export code reads back. The loss is the model's own
(labels aligned with input_ids, shifted inside, -100 ignored); metrics: cross-entropy, perplexity and
token accuracy over the positions that have a label.

A LoRA model (a `peft.PeftModel` around the MPT, see assembly/lora.py) is wrapped the same way; its
checkpoints hold every weight (peft's names: `model.base_model.model.<MPT name>`, a targeted layer's
frozen weight under `.base_layer.`), not Composer's adapter-only default, so full and sharded
checkpoints resume like full finetuning's without the base model at hand.
"""
from __future__ import annotations

from typing import List

from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity, MaskedAccuracy
from composer.models import HuggingFaceModel

from llmfoundry_lite import registry
from llmfoundry_lite.assembly.lora import base_model
from llmfoundry_lite.compat.composer import causal_lm_known
from llmfoundry_lite.models.mpt import IGNORE_INDEX
from llmfoundry_lite.training.objectives.base import Objective


class ComposerMPTCausalLM(HuggingFaceModel):
    """Composer view of an `MPTForCausalLM`: `.model` is the HF model, `.tokenizer` the run's tokenizer.

    `loss_fn`: `torch_crossentropy` (the logits, then the loss) or `fused_crossentropy` (the loss
    straight from the last hidden states in chunks, never materialising the (tokens, vocab) logits:
    much less memory for large vocabularies; training then reports the loss but no train metrics,
    which need the logits). Evaluation computes logits either way.
    """

    def __init__(self, model, tokenizer=None, loss_fn: str = "torch_crossentropy"):
        base_model(model).fused_loss = fused = loss_fn == "fused_crossentropy"
        train_metrics = [] if fused else [MaskedAccuracy(ignore_index=IGNORE_INDEX)]
        eval_metrics = [LanguageCrossEntropy(ignore_index=IGNORE_INDEX), LanguagePerplexity(ignore_index=IGNORE_INDEX),
                        MaskedAccuracy(ignore_index=IGNORE_INDEX)]
        # shift_labels: labels are aligned with input_ids (HF convention); metrics compare logits at
        # position t with the label at t+1, as the model's loss does.
        with causal_lm_known():
            super().__init__(model, tokenizer, use_logits=True, metrics=train_metrics, eval_metrics=eval_metrics,
                             shift_labels=True, should_save_peft_only=False)
        if train_metrics:  # logged under the usual name
            self.train_metrics["LanguageCrossEntropy"] = LossCrossEntropy(ignore_index=IGNORE_INDEX)
        self._train_loss = None

    def eval_forward(self, batch, outputs=None):
        # Composer computes train metrics from the training forward's outputs: keep their loss
        self._train_loss = None if outputs is None else outputs.get("loss")
        return super().eval_forward(batch, outputs)

    def update_metric(self, batch, outputs, metric):
        if isinstance(metric, LossCrossEntropy):
            metric.update(self._train_loss, self.labels)
            return {}
        return super().update_metric(batch, outputs, metric)


class LossCrossEntropy(LanguageCrossEntropy):
    """The training cross-entropy taken from the model's loss (the same mean over labelled positions)
    instead of a second pass over the (tokens, vocab) logits, which costs ~15% of a small model's step."""

    def update(self, loss, target) -> None:
        n = (target != self.ignore_index).sum()
        self.sum_loss += loss.detach().float() * n
        self.total_items += n


def _fused_problems(tc) -> List[str]:
    """The fused loss reads lm_head's weight itself (a LoRA adapter on it would be skipped) and computes
    no logits to softcap."""
    model, problems = tc.model.config, []
    lora = getattr(model, "peft_config", None)
    targets = lora.target_modules if lora is not None and not model.pretrained_lora_id_or_path else None
    if isinstance(targets, list) and "lm_head" in targets:
        problems.append("model.peft_config.target_modules: loss_fn fused_crossentropy reads lm_head's weight "
                        "directly, without its adapter; use torch_crossentropy or leave lm_head out")
    if getattr(model, "final_logit_softcapping", None):
        problems.append("model.loss_fn: fused_crossentropy does not support final_logit_softcapping; "
                        "use torch_crossentropy")
    return problems


def _objective(loss_fn: str, rules=()) -> Objective:
    """The next-token cross-entropy (`loss_fn` says how it is computed), on every loader but preference pairs."""
    def build(model, tokenizer, options, train_dataloader):
        return ComposerMPTCausalLM(model, tokenizer, loss_fn)
    return Objective(build=build, accepts=lambda loader: loader != "preference",
                     wrong_loader="preference pairs need model.loss_fn: dpo (got {loss_fn})", rules=rules)


registry.objectives.register("torch_crossentropy", _objective("torch_crossentropy"))
registry.objectives.register("fused_crossentropy", _objective("fused_crossentropy", rules=(_fused_problems,)))
