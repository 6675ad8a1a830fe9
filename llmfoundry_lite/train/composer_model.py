"""The Composer wrapper of `MPTForCausalLM` (the model a `model:` section opens, see export/opening.py).

`ComposerMPTCausalLM` is a `composer.models.HuggingFaceModel`, so Composer checkpoints keep the
weights under `state['model']` as `model.<HF MPT name>` and the HF config and tokenizer under
`state['integrations']['huggingface']`, which the export code reads back. The loss is the model's own
(labels aligned with input_ids, shifted inside, -100 ignored); metrics: cross-entropy, perplexity and
token accuracy over the positions that have a label.

A LoRA model (a `peft.PeftModel` around the MPT, see export/lora.py) is wrapped the same way; its
checkpoints hold every weight (peft's names: `model.base_model.model.<MPT name>`, a targeted layer's
frozen weight under `.base_layer.`), not Composer's adapter-only default, so full and sharded
checkpoints resume like full finetuning's without the base model at hand.
"""
from __future__ import annotations

from unittest import mock

from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity, MaskedAccuracy
from composer.models import HuggingFaceModel, huggingface

from llmfoundry_lite.export.lora import base_model
from llmfoundry_lite.models.mpt import IGNORE_INDEX


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
        # position t with the label at t+1, as the model's loss does. HuggingFaceModel asks whether the
        # model is a causal LM by importing every causal-LM class transformers has (seconds per process,
        # tens under load); ours is one, so answer directly.
        with mock.patch.object(huggingface, "_is_registered_causal_lm", lambda model: True):
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
