"""The MPT model in plain PyTorch (no Composer, no YAML): config, model classes, FLOP counting."""
from llmfoundry_lite.models.config import MPTConfig
from llmfoundry_lite.models.mpt import (
    MPTBlock,
    MPTForCausalLM,
    MPTForQuestionAnswering,
    MPTForSequenceClassification,
    MPTForTokenClassification,
    MPTModel,
    MPTPreTrainedModel,
    flops_per_token,
)

__all__ = ["MPTConfig", "MPTBlock", "MPTModel", "MPTPreTrainedModel", "MPTForCausalLM",
           "MPTForSequenceClassification", "MPTForTokenClassification", "MPTForQuestionAnswering",
           "flops_per_token"]
