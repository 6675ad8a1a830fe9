"""Building a model from (config, weights), once for every reader: Composer checkpoints, eval's
`load_path`, the HF checkpointer; and the one check of weights against a model, for export,
Composer checkpoints and HF folders alike."""
from __future__ import annotations

from typing import Any, List, Mapping

import torch

from llmfoundry_lite.assembly.lora import base_model, wrap_on_meta
from llmfoundry_lite.errors import CheckpointError
from llmfoundry_lite.models import MPTForCausalLM

AS_TRAINED = "it holds another model's weights or was changed after training; use a checkpoint as " \
             "`llmfoundry-lite train` wrote it"


def model_from_weights(config, weights: Mapping[str, Any], source: str, lora=None, fix: str = AS_TRAINED):
    """`MPTForCausalLM(config)` in eval mode on CPU holding every weight of `weights` (a lazy mapping is
    read tensor by tensor, nothing is allocated twice); with `lora` (a `peft.LoraConfig` or its dict)
    the `PeftModel` around it, whose weights carry peft's names (`base_model.model.<MPT name>`)."""
    with torch.device("meta"):
        model = MPTForCausalLM(config)
        model = model if lora is None else wrap_on_meta(model, lora, source)
    return load_weights(model, weights, source, fix, assign=True)


def load_weights(model, weights: Mapping[str, Any], source: str, fix: str = AS_TRAINED, assign: bool = False):
    """`model` in eval mode holding every weight of `weights` (`assign`: the tensors themselves, for a
    model on meta); weights that do not fit are a CheckpointError naming `source`, then `fix`."""
    names = check_state_dict(model, weights, source, fix)
    model.load_state_dict({name: weights[name] for name in names}, strict=False, assign=assign)
    if base_model(model).config.tie_word_embeddings:
        base_model(model).tie_weights()
    return model.eval()


def check_state_dict(model, weights: Mapping[str, Any], source: str, fix: str) -> List[str]:
    """The names of `weights` to load into `model` (all but a tied lm_head: it is the embedding), or a
    CheckpointError naming the weights missing, those `model` lacks, and those of another shape, then
    `fix`: a partly loaded model would keep random weights. `weights` maps names to tensors or shapes
    (None: not the model's); a lazy mapping may offer `shape_of(name)` so that no tensor is read."""
    # (a LoRA model's names start with peft's base_model.model.)
    tied = {"lm_head.weight", "base_model.model.lm_head.weight"} if model.config.tie_word_embeddings else set()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}
    names = set(weights) - tied
    shape_of = getattr(weights, "shape_of", lambda k: getattr(weights[k], "shape", weights[k]))
    shapes = {k: shape_of(k) for k in sorted(names & set(expected))}
    problems = {"missing": sorted(set(expected) - names), "unexpected": sorted(names - set(expected)),
                "size mismatch": [f"{k}{'' if s is None else f' {tuple(s)}'} != model {expected[k]}"
                                  for k, s in shapes.items() if s is None or tuple(s) != expected[k]]}
    found = [f"{kind} {keys[:5]}" + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
             for kind, keys in problems.items() if keys]
    if found:
        raise CheckpointError(f"{source}: the weights do not match the model config ({'; '.join(found)}); {fix}")
    return [k for k in weights if k not in tied]
