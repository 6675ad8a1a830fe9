"""The Composer wrapper of `MPTForCausalLM` and the `mpt_causal_lm` model builder.

`ComposerMPTCausalLM` is a `composer.models.HuggingFaceModel`, so Composer checkpoints keep the
weights under `state['model']` as `model.<HF MPT name>` and the HF config and tokenizer under
`state['integrations']['huggingface']`, which the export code reads back. The loss is the model's own
(labels aligned with input_ids, shifted inside, -100 ignored); metrics: cross-entropy, perplexity and
token accuracy over the positions that have a label.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, List

from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity, MaskedAccuracy
from composer.models import HuggingFaceModel

from llmfoundry_lite import registry
from llmfoundry_lite.errors import ConfigError
from llmfoundry_lite.models.mpt import IGNORE_INDEX

LOSS_FNS = ("torch_crossentropy", "fused_crossentropy")


class ComposerMPTCausalLM(HuggingFaceModel):
    """Composer view of an `MPTForCausalLM`: `.model` is the HF model, `.tokenizer` the run's tokenizer.

    `loss_fn`: `torch_crossentropy` (the logits, then the loss) or `fused_crossentropy` (the loss
    straight from the last hidden states in chunks, never materialising the (tokens, vocab) logits:
    much less memory for large vocabularies; training then reports the loss but no train metrics,
    which need the logits). Evaluation computes logits either way.
    """

    def __init__(self, model, tokenizer=None, loss_fn: str = "torch_crossentropy"):
        model.fused_loss = loss_fn == "fused_crossentropy"
        train_metrics = [] if model.fused_loss else [MaskedAccuracy(ignore_index=IGNORE_INDEX)]
        eval_metrics = [LanguageCrossEntropy(ignore_index=IGNORE_INDEX), LanguagePerplexity(ignore_index=IGNORE_INDEX),
                        MaskedAccuracy(ignore_index=IGNORE_INDEX)]
        # shift_labels: labels are aligned with input_ids (HF convention); metrics compare logits at
        # position t with the label at t+1, as the model's loss does.
        with _known_causal_lm():
            super().__init__(model, tokenizer, use_logits=True, metrics=train_metrics, eval_metrics=eval_metrics,
                             shift_labels=True)
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


@contextlib.contextmanager
def _known_causal_lm():
    """HuggingFaceModel asks whether the model is a causal LM by importing every causal-LM class
    transformers has (seconds per process, tens under load); ours is one, so answer directly."""
    from composer.models import huggingface
    original = huggingface._is_registered_causal_lm
    huggingface._is_registered_causal_lm = lambda model: True
    try:
        yield
    finally:
        huggingface._is_registered_causal_lm = original


# Keys of the `model:` section that are not MPTConfig fields.
BUILDER_KEYS = ("pretrained_model_name_or_path", "pretrained", "loss_fn")


def _config_problems(cfg: Dict[str, Any], path: str = "model") -> List[str]:
    from llmfoundry_lite.models import model_config_problems
    problems = []
    if cfg.get("pretrained_model_name_or_path") is not None and not isinstance(cfg["pretrained_model_name_or_path"], str):
        problems.append(f"{path}.pretrained_model_name_or_path: expected a folder path or hub name")
    if cfg.get("loss_fn", LOSS_FNS[0]) not in LOSS_FNS:
        problems.append(f"{path}.loss_fn: {cfg['loss_fn']!r} is not one of {list(LOSS_FNS)}")
    if cfg.get("loss_fn") == "fused_crossentropy" and cfg.get("final_logit_softcapping"):
        problems.append(f"{path}.loss_fn: fused_crossentropy does not support final_logit_softcapping; "
                        "use torch_crossentropy")
    return problems + model_config_problems({k: v for k, v in cfg.items() if k not in BUILDER_KEYS}, path)


def build_mpt_causal_lm(cfg: Dict[str, Any], tokenizer) -> ComposerMPTCausalLM:
    """`model: {name: mpt_causal_lm, <MPTConfig keys>}` from scratch, or with
    `pretrained_model_name_or_path` from an HF MPT folder (the other keys then override its config).

    A missing `vocab_size` is taken from the tokenizer; one smaller than the tokenizer is an error.
    """
    from llmfoundry_lite.models import MPTConfig, MPTForCausalLM
    cfg = dict(cfg)
    cfg.pop("pretrained", None)  # llm-foundry's flag for hf_causal_lm: a named folder is always loaded
    loss_fn = cfg.pop("loss_fn", LOSS_FNS[0])
    source = cfg.pop("pretrained_model_name_or_path", None)
    if source is not None:
        from llmfoundry_lite.export import load_hf_model
        model = load_hf_model(source, **cfg)
    else:
        cfg.setdefault("vocab_size", len(tokenizer))
        model = MPTForCausalLM(MPTConfig(**cfg))
    if tokenizer is not None and model.config.vocab_size < len(tokenizer):
        raise ConfigError([f"model.vocab_size: {model.config.vocab_size} is smaller than the tokenizer's "
                           f"{len(tokenizer)} tokens; set it to at least {len(tokenizer)} (a multiple of 64 is fastest)"])
    return ComposerMPTCausalLM(model, tokenizer, loss_fn)


build_mpt_causal_lm.config_problems = _config_problems
registry.models.register("mpt_causal_lm", build_mpt_causal_lm)
registry.models.register("hf_causal_lm", build_mpt_causal_lm)  # llm-foundry's name for "from an HF folder"
