"""transformers: the differences between the versions we run on (4.51-4.57 pinned, 5.x today).

Each shim says which version needs it and how we would know it can go.
"""
from __future__ import annotations

import transformers
from transformers import PretrainedConfig
from transformers.modeling_outputs import CausalLMOutputWithPast

# transformers 5: `PretrainedConfig` no longer holds the special-token ids, the weight-tying flag or
# the generation defaults (they moved to the model configs and to `GenerationConfig`), but config.json
# files written by transformers 4 carry them all and must keep loading. These are the keys transformers
# 4.57's `PretrainedConfig().to_dict()` writes beyond today's, plus the bookkeeping keys either version
# may write into a folder.
_TRANSFORMERS_4_CONFIG_KEYS = frozenset({
    "add_cross_attention", "bad_words_ids", "begin_suppress_tokens", "bos_token_id",
    "cross_attention_hidden_size", "decoder_start_token_id", "diversity_penalty", "do_sample", "early_stopping",
    "encoder_no_repeat_ngram_size", "eos_token_id", "exponential_decay_length_penalty", "finetuning_task",
    "forced_bos_token_id", "forced_eos_token_id", "is_decoder", "length_penalty", "max_length", "min_length",
    "no_repeat_ngram_size", "num_beam_groups", "num_beams", "num_return_sequences", "output_scores",
    "pad_token_id", "prefix", "pruned_heads", "remove_invalid_values", "repetition_penalty",
    "return_dict_in_generate", "sep_token_id", "suppress_tokens", "task_specific_params", "temperature",
    "tf_legacy_loss", "tie_encoder_decoder", "tie_word_embeddings", "tokenizer_class", "top_k", "top_p",
    "torchscript", "typical_p", "use_bfloat16",
})
PRETRAINED_CONFIG_KEYS = frozenset(PretrainedConfig().to_dict()) | _TRANSFORMERS_4_CONFIG_KEYS | {
    "name_or_path", "_commit_hash", "attn_implementation", "torch_dtype", "dtype", "num_labels", "auto_map",
    "classifier_dropout", "hidden_dropout", "_attn_implementation_autoset", "output_attentions",
    "transformers_version",
}

# transformers 4.56 renamed config.json's `torch_dtype` to `dtype`; older releases read only `torch_dtype`.
CONFIG_DTYPE_KEY = "dtype" if "dtype" in PretrainedConfig().to_dict() else "torch_dtype"


def stock_mpt_values(config: dict) -> dict:
    """`config` (MptConfig keys) with whole-number floats as ints and numbers as floats where stock
    `transformers.MptConfig` declares them so.

    transformers 5: MptConfig is a strict dataclass; its float fields refuse ints (`1` for 1.0) and its
    int fields refuse floats (`attn_pdrop: 0.0`, `expansion_ratio: 4.0`). transformers 4 takes both."""
    out = dict(config)
    for key in ("embedding_fraction", "layer_norm_epsilon", "initializer_range", "logit_scale"):
        if isinstance(out.get(key), int) and not isinstance(out.get(key), bool):
            out[key] = float(out[key])
    if isinstance(out.get("expansion_ratio"), float) and out["expansion_ratio"].is_integer():
        out["expansion_ratio"] = int(out["expansion_ratio"])
    attn = out.get("attn_config")
    if isinstance(attn, dict) and isinstance(attn.get("attn_pdrop"), float) and attn["attn_pdrop"].is_integer():
        out["attn_config"] = {**attn, "attn_pdrop": int(attn["attn_pdrop"])}
    return out


# transformers 5 types MptAttentionConfig.attn_pdrop as an int, so stock Mpt cannot hold a dropout
# probability strictly between 0 and 1 there (transformers 4 can).
STOCK_MPT_TAKES_FRACTIONAL_ATTN_PDROP = int(transformers.__version__.split(".")[0]) < 5

# transformers 5.2x renamed the KV cache `past_key_values` to `cache`: the keyword `generate` passes to
# `forward`, and the field of the model outputs (where the old name still works, with a warning).
KV_CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
