"""Opening a model: ONE function for an HF folder (or hub name), a Composer checkpoint, or the
`model:` section of a YAML; inference, eval and training all call it.

The `models` registry's built-in entries are here: `mpt_causal_lm` (and llm-foundry's name for it,
`hf_causal_lm`) builds an `MPTForCausalLM` from the section's MPT keys, or loads the HF MPT folder
named by `pretrained_model_name_or_path` with the other keys overriding its config.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, Optional, Tuple, Union

from llmfoundry_lite.config import Section, cross, join
from llmfoundry_lite.data.tokenizer import build_tokenizer
from llmfoundry_lite.errors import ConfigError, UserError
from llmfoundry_lite.models.config import MPTSchema
from llmfoundry_lite.registry import models


@dataclass(kw_only=True)
class MPTModelSection(MPTSchema):
    """`model: {name: mpt_causal_lm, ...}`: the MPT keys plus llm-foundry's builder keys."""
    pretrained_model_name_or_path: Optional[str] = None  # an HF MPT folder or hub name to load
    pretrained: Optional[bool] = None  # llm-foundry's flag for hf_causal_lm: a named folder is always loaded
    loss_fn: Literal["torch_crossentropy", "fused_crossentropy"] = "torch_crossentropy"  # training's loss

    @cross("pretrained_model_name_or_path")
    def _folder_exists(self, path: str):
        source = self.pretrained_model_name_or_path
        if source and source.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(source)):
            return f"{join(path, 'pretrained_model_name_or_path')}: model folder not found: {source}"

    @cross("loss_fn", "final_logit_softcapping")
    def _fused_loss_without_softcap(self, path: str):
        if self.loss_fn == "fused_crossentropy" and self.final_logit_softcapping:
            return (f"{join(path, 'loss_fn')}: fused_crossentropy does not support final_logit_softcapping; "
                    "use torch_crossentropy")


def build_mpt_causal_lm(tokenizer, pretrained_model_name_or_path: Optional[str] = None, pretrained=None,
                        loss_fn=None, **keys):
    """An `MPTForCausalLM` from MPT config keys, or from an HF folder with `keys` overriding its config.
    A missing `vocab_size` is the tokenizer's; one smaller than the tokenizer is an error."""
    from llmfoundry_lite.models import MPTConfig, MPTForCausalLM
    if pretrained_model_name_or_path is not None:
        from llmfoundry_lite.export.hf_import import load_hf_model
        model = load_hf_model(pretrained_model_name_or_path, **keys)
    else:
        model = MPTForCausalLM(MPTConfig(**{"vocab_size": len(tokenizer), **keys}))
    if model.config.vocab_size < len(tokenizer):
        raise ConfigError([f"model.vocab_size: {model.config.vocab_size} is smaller than the tokenizer's "
                           f"{len(tokenizer)} tokens; set it to at least {len(tokenizer)} "
                           "(a multiple of 64 is fastest)"])
    return model


models.register("mpt_causal_lm", build_mpt_causal_lm, config=MPTModelSection)
models.register("hf_causal_lm", build_mpt_causal_lm, config=MPTModelSection)


def open_model(source: Union[str, Section], tokenizer=None) -> Tuple[object, object]:
    """(model, tokenizer) from a model folder or hub name, a Composer checkpoint (`.pt` file or sharded
    folder), or a checked `model:` section. `tokenizer` (an object, or a folder/name) replaces the one
    stored with the model; a section needs one unless it names a pretrained folder."""
    from llmfoundry_lite.export.composer_checkpoint import is_composer_checkpoint, load_composer_checkpoint
    from llmfoundry_lite.export.hf_import import load_hf_model
    if isinstance(source, Section):
        folder = source.kwargs.get("pretrained_model_name_or_path")
        if tokenizer is None and folder is None:
            raise ConfigError(["tokenizer: missing; a model built from a config needs a tokenizer "
                               "(e.g. tokenizer: {name: path/to/tokenizer_folder})"])
        tokenizer = _tokenizer(tokenizer or folder)
        return source.build(tokenizer), tokenizer
    if is_composer_checkpoint(source):  # the model first: its problems are the likelier ones to report
        model, saved = load_composer_checkpoint(source)
    else:
        model, saved = load_hf_model(source), None
        tokenizer = tokenizer or source
    tokenizer = _tokenizer(tokenizer) or saved
    if tokenizer is None:
        raise UserError(f"{source} holds no tokenizer; give one (--tokenizer, or tokenizer: {{name: <folder>}})")
    return model, tokenizer


def _tokenizer(tokenizer):
    return build_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
