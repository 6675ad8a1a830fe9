"""The one check of weights against a model, for export, Composer checkpoints and HF folders alike."""
from __future__ import annotations

from typing import Any, List, Mapping

from llmfoundry_lite.errors import CheckpointError


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
